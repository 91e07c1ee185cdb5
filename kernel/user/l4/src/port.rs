//! x86 port I/O for tasks that were given the ports (`io=PORT/ORDER` from the root task).
//! Without a port, the access raises #GP and the task's exception handler hears of it: port
//! I/O cannot corrupt memory, so these functions are safe.

/// Read the byte at `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: an I/O port read touches no memory; without the port it raises #GP.
    unsafe {
        core::arch::asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack))
    };
    value
}

/// Write the byte `value` to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// Read the double word at `port`.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        core::arch::asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack))
    };
    value
}

/// Write the double word `value` to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `inb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
    };
}
