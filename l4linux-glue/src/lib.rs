//! The Linux-facing interface of a compartment (boot protocol, guest memory layout, device
//! models, hypercall ABI). It is filled in by the SVM and Linux issues; it has no `unsafe`.
#![no_std]
#![forbid(unsafe_code)]
