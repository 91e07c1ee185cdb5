//! The receive side of the machine's COM1 for the task that holds its ports (`io=0x3f8/3`):
//! the console server, or a single compartment's VMM. (The kernel keeps the transmit side.)
//! Without the ports, the first access raises #GP (see [`crate::port`]).

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
const IER: u16 = 1;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 1;
const IER_RECEIVE: u8 = 1;
/// COM1's ISA interrupt line.
pub const LINE: u64 = 4;

/// The next received byte, if one waits.
pub fn read() -> Option<u8> {
    (inb(COM1 + LSR) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// Drop what was typed before we were ready, then enable the receive interrupt.
pub fn open() {
    while read().is_some() {}
    outb(COM1 + IER, IER_RECEIVE);
}
