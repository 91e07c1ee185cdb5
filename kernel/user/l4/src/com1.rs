//! The receive side of the machine's COM1 for the task that holds its ports (`io=0x3f8/3`):
//! the console server, or a single compartment's VMM. (The kernel keeps the transmit side.)
//! Without the ports, the first access raises #GP and the task's exception handler hears of
//! it: port I/O cannot corrupt memory, so these functions are safe.

const COM1: u16 = 0x3f8;
const IER: u16 = 1;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 1;
const IER_RECEIVE: u8 = 1;
/// COM1's ISA interrupt line.
pub const LINE: u64 = 4;

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: an I/O port read touches no memory; without the port it raises #GP.
    unsafe {
        core::arch::asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack))
    };
    value
}

fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`; only COM1's interrupt enable register is written.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// The next received byte, if one waits.
pub fn read() -> Option<u8> {
    (inb(COM1 + LSR) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// Drop what was typed before we were ready, then enable the receive interrupt.
pub fn open() {
    while read().is_some() {}
    outb(COM1 + IER, IER_RECEIVE);
}
