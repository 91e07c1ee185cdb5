//! A 16550A UART of the machine (COM1..COM4), for the task that holds its registers
//! (`io=BASE/3` from the root task). Without the ports, the first access raises #GP (see
//! [`crate::port`]).

use crate::port::{inb, outb};
use alloc::vec::Vec;

const DATA: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const IER_RECEIVE: u8 = 1;

/// The UART whose registers start at I/O port `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uart {
    base: u16,
}

impl Uart {
    /// COM1, the machine's console.
    pub const COM1: Uart = Uart::at(0x3f8);

    /// The UART at `base`.
    pub const fn at(base: u16) -> Uart {
        Uart { base }
    }

    /// Its first I/O port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The next received byte, if one waits.
    pub fn read(&self) -> Option<u8> {
        (inb(self.base + LSR) & LSR_DATA_READY != 0).then(|| inb(self.base + DATA))
    }

    /// What waits, up to `max` bytes.
    pub fn take_input(&self, max: usize) -> Vec<u8> {
        let mut typed = Vec::new();
        while typed.len() < max {
            let Some(byte) = self.read() else { break };
            typed.push(byte);
        }
        typed
    }

    /// Drop what was typed before we were ready.
    pub fn drain_input(&self) {
        while self.read().is_some() {}
    }

    /// Raise the interrupt when a byte arrives.
    pub fn enable_receive_interrupt(&self) {
        outb(self.base + IER, IER_RECEIVE);
    }

    /// Set it up to be polled: 8N1 at 115200 baud, FIFOs on and cleared, no interrupts, what
    /// was typed before dropped.
    pub fn open_polled(&self) {
        let b = self.base;
        outb(b + IER, 0);
        outb(b + LCR, 0x80);
        outb(b + DATA, 1);
        outb(b + IER, 0);
        outb(b + LCR, 0x03);
        outb(b + FCR, 0x07);
        outb(b + MCR, 0x03);
        self.drain_input();
    }

    /// Whether the transmitter takes a byte now.
    pub fn transmit_ready(&self) -> bool {
        inb(self.base + LSR) & LSR_THR_EMPTY != 0
    }

    /// Send `byte` (when [`Uart::transmit_ready`]).
    pub fn send(&self, byte: u8) {
        outb(self.base + DATA, byte);
    }
}
