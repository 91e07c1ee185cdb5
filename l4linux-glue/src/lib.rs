//! The Linux-facing interface of a compartment (boot protocol, guest memory layout, device
//! models, hypercall ABI), host-testable and free of `unsafe`. So far: the port bus and the
//! guest-test device, the MMIO bus, the Linux boot protocol (bzImage header, layout, zero page),
//! a 16550A UART, the MP table, exit decoding and the test guests' CPUID policy, MMIO
//! instruction decoding and guest page-table walks for VMMs; the interrupt and time platform
//! of a Linux guest, which the VMM's Linux exit loop runs: a local APIC as x2APIC and xAPIC
//! with its timer (`lapic`), an IOAPIC (`ioapic`), kvmclock (`kvmclock`), the Linux CPUID and
//! MSR policy (`cpuid_linux`), and `platform`, which ties them together; the compartment's
//! hypercalls (`hypercall`). For 32-bit Multiboot kernels: the boot protocol (`multiboot`: ELF32
//! and header checks, the boot information), QEMU's `fw_cfg` device and a debug-exit port.
//!
//! Virtio ([`virtio`]): devices reach guest RAM only through [`guest_memory::GuestMemory`]
//! (bounds-checked byte reads and writes; the VMM implements it over the RAM it maps). Split
//! virtqueues ([`virtio::queue`]) with indirect descriptors and EVENT_IDX, where every hostile
//! ring or chain is an error value; the virtio-mmio version-2 transport ([`virtio::mmio`]) as an
//! [`mmio::MmioDevice`] in front of a backend; a console ([`virtio::console`]) and a block
//! device over a memory image ([`virtio::block`]) and a network device that exchanges Ethernet
//! frames with a backend ([`virtio::net`], with checksum and TCP segmentation offloads and
//! mergeable receive buffers). For networking between compartments: a single-producer,
//! single-consumer ring of variable-length records over shared memory that treats its peer as
//! hostile ([`netring`]), the virtio-net header that travels with each frame, its checks and
//! the software segmentation and checksum completion for receivers without the offloads
//! ([`netpacket`]), and the switch's forwarding decision ([`netswitch`]).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod boot;
pub mod cpuid_linux;
pub mod debug_exit;
pub mod decode;
pub mod exits;
pub mod fw_cfg;
pub mod guest_memory;
pub mod guest_paging;
pub mod hypercall;
pub mod ioapic;
pub mod kvmclock;
pub mod lapic;
pub mod mmio;
pub mod mptable;
pub mod multiboot;
pub mod netpacket;
pub mod netring;
pub mod netswitch;
pub mod platform;
pub mod ports;
pub mod syscall;
pub mod syscall_monitor;
pub mod test_device;
pub mod uart8250;
pub mod virtio;
pub mod vmlinux;

/// A xorshift64 generator for the host tests' random inputs: the same sequence for the same
/// seed, so a failing case repeats.
#[cfg(test)]
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
