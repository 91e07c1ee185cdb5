//! The receive side of the machine's COM1 for the task that holds its ports (`io=0x3f8/3`):
//! the console server, or a single compartment's VMM. (The kernel keeps the transmit side.)
//! Without the ports, the first access raises #GP (see [`crate::port`]).

use crate::uart::Uart;

/// COM1's ISA interrupt line.
pub const LINE: u64 = 4;

/// The next received byte, if one waits.
pub fn read() -> Option<u8> {
    Uart::COM1.read()
}

/// Drop what was typed before we were ready, then enable the receive interrupt.
pub fn open() {
    Uart::COM1.drain_input();
    Uart::COM1.enable_receive_interrupt();
}
