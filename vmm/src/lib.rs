//! The VMM library: what a VMM task needs to run guests whose exits arrive over the L4
//! kernel. Guest memory from the parent's RAM service, mapped into the VM as flexpages
//! ([`memory`]); the vCPU and its state words ([`vcpu`]); the one exit loop, an explicit state
//! machine that calls one handler per exit reason ([`exit`]); the PC platform that wires the
//! device models of `l4linux-glue` to the port and MMIO buses, interrupt lines and L4 services
//! ([`platform`], [`console`]); the compartment's terminal, shared through the console server
//! or its own ([`terminal`]); and the guest kinds built on it, Linux ([`linux`]) and
//! Multiboot ([`multiboot`]); the L4Linux mode, which routes a Linux guest's user system calls
//! through a syscall monitor task ([`syscalls`]). The binary (`src/main.rs`) picks one by its arguments; the
//! bare-metal guest suite (`src/suite/`, part of the binary) is another user of the loop.
#![no_std]

extern crate alloc;

pub mod console;
pub mod console_log;
pub mod exit;
pub mod linux;
pub mod memory;
pub mod multiboot;
pub mod net;
pub mod platform;
pub mod probe;
pub mod shared;
pub mod syscalls;
pub mod terminal;
pub mod vcpu;
