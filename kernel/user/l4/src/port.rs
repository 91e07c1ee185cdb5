//! x86 port I/O for tasks that were given the ports (`io=PORT/ORDER` from the root task), over
//! the `x86_64` crate's [`Port`]. Without a port, the access raises #GP and the task's exception
//! handler hears of it: port I/O cannot corrupt memory, so these functions are safe.

use x86_64::instructions::port::Port;

/// Read the byte at `port`.
pub fn inb(port: u16) -> u8 {
    // SAFETY: an I/O port read touches no memory; without the port it raises #GP.
    unsafe { Port::new(port).read() }
}

/// Write the byte `value` to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`.
    unsafe { Port::new(port).write(value) }
}

/// Read the double word at `port`.
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for `inb`.
    unsafe { Port::new(port).read() }
}

/// Write the double word `value` to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `inb`.
    unsafe { Port::new(port).write(value) }
}
