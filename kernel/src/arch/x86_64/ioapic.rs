//! The IOAPIC: routes device interrupt lines (GSIs) to vectors [`BASE_VECTOR`]`+line` on the
//! boot CPU. ISA IRQ n arrives on GSI n, except the PIT (IRQ 0), which QEMU wires to GSI 2.

use super::paging::phys_to_virt;

/// Physical base of the IOAPIC.
const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Vector of GSI 0.
pub const BASE_VECTOR: u8 = 48;
/// Number of redirection entries used.
pub const LINES: u32 = 24;

fn write(register: u32, value: u32) {
    let base = phys_to_virt(IOAPIC_BASE);
    // SAFETY: the IOAPIC's MMIO page is in the (uncached) direct map; register select then
    // window, as the device defines.
    unsafe {
        core::ptr::write_volatile(base as *mut u32, register);
        core::ptr::write_volatile((base + 0x10) as *mut u32, value);
    }
}

fn entry_low(line: u32, masked: bool) -> u32 {
    (BASE_VECTOR as u32 + line) | if masked { 1 << 16 } else { 0 }
}

/// Route every line to its vector, masked, edge triggered, active high, to APIC 0.
pub fn init() {
    for line in 0..LINES {
        write(0x10 + 2 * line, entry_low(line, true));
        write(0x11 + 2 * line, 0);
    }
}

/// Mask or unmask `line`.
pub fn set_masked(line: u32, masked: bool) {
    if line < LINES {
        write(0x10 + 2 * line, entry_low(line, masked));
    }
}
