//! A 16550A UART (the PC's COM1) as a port device, for a Linux guest's console: Linux's 8250
//! driver probes it (scratch, loopback and FIFO tests) and its tty layer waits for the
//! transmitter-empty interrupt, so both are modelled. Transmission is instantaneous: a byte
//! written to THR is appended to [`Uart8250::output`] and THR is empty again at once.
//!
//! The interrupt line ([`Uart8250::irq_level`]) is level-triggered and, as in QEMU's model,
//! not gated by MCR.OUT2. The VMM polls it after each access and injects the IRQ (4 for COM1).

use crate::ports::PortDevice;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// Ports the device occupies.
pub const LENGTH: u16 = 8;
/// Receive FIFO depth with FIFOs enabled (1 without).
pub const FIFO_DEPTH: usize = 16;

/// Register offsets.
pub mod reg {
    /// Receive buffer (read) / transmit holding register (write); divisor low byte with DLAB.
    pub const DATA: u16 = 0;
    /// Interrupt enable; divisor high byte with DLAB.
    pub const IER: u16 = 1;
    /// Interrupt identification (read) / FIFO control (write).
    pub const IIR_FCR: u16 = 2;
    /// Line control (word length, parity, DLAB).
    pub const LCR: u16 = 3;
    /// Modem control (DTR, RTS, OUT1, OUT2, loopback).
    pub const MCR: u16 = 4;
    /// Line status.
    pub const LSR: u16 = 5;
    /// Modem status.
    pub const MSR: u16 = 6;
    /// Scratch register.
    pub const SCR: u16 = 7;
}

/// IER: interrupt when received data is available.
pub const IER_RDI: u8 = 0x01;
/// IER: interrupt when the transmit holding register is empty.
pub const IER_THRI: u8 = 0x02;
/// IIR: no interrupt pending.
pub const IIR_NO_INT: u8 = 0x01;
/// IIR: transmit holding register empty.
pub const IIR_THRI: u8 = 0x02;
/// IIR: received data available.
pub const IIR_RDI: u8 = 0x04;
/// IIR: FIFOs enabled (both bits set on a 16550A).
pub const IIR_FIFOS: u8 = 0xc0;
/// FCR: enable the FIFOs.
pub const FCR_ENABLE: u8 = 0x01;
/// FCR: clear the receive FIFO.
pub const FCR_CLEAR_RX: u8 = 0x02;
/// LCR: divisor latch access (ports 0 and 1 address the baud divisor).
pub const LCR_DLAB: u8 = 0x80;
/// MCR: data terminal ready.
pub const MCR_DTR: u8 = 0x01;
/// MCR: request to send.
pub const MCR_RTS: u8 = 0x02;
/// MCR: auxiliary output 1 (ring indicator in loopback).
pub const MCR_OUT1: u8 = 0x04;
/// MCR: auxiliary output 2 (gates the interrupt line on PCs).
pub const MCR_OUT2: u8 = 0x08;
/// MCR: loopback mode.
pub const MCR_LOOP: u8 = 0x10;
/// LSR: data ready.
pub const LSR_DR: u8 = 0x01;
/// LSR: overrun error (a received byte was lost).
pub const LSR_OE: u8 = 0x02;
/// LSR: transmit holding register empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty.
pub const LSR_TEMT: u8 = 0x40;
/// MSR: clear to send.
pub const MSR_CTS: u8 = 0x10;
/// MSR: data set ready.
pub const MSR_DSR: u8 = 0x20;
/// MSR: ring indicator.
pub const MSR_RI: u8 = 0x40;
/// MSR: data carrier detect.
pub const MSR_DCD: u8 = 0x80;

/// The UART's state.
#[derive(Debug, Default)]
pub struct Uart8250 {
    divisor: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fifo_enabled: bool,
    overrun: bool,
    /// A transmitter-empty interrupt is pending (cleared by reading IIR or writing THR).
    thr_interrupt: bool,
    rx: VecDeque<u8>,
    /// Bytes the guest transmitted (not in loopback mode), for the VMM to drain.
    /// Bytes the guest transmitted that the VMM has not taken yet.
    pub output: Vec<u8>,
}

impl Uart8250 {
    /// A UART after reset (9600 baud, 8N1, interrupts off).
    pub fn new() -> Self {
        Self {
            divisor: 12, // 9600 baud
            ..Self::default()
        }
    }

    /// Bytes arriving from outside (the console): queued for the guest, beyond the FIFO's
    /// depth they are dropped and LSR.OE reports the overrun. Returns how many were taken.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let mut taken = 0;
        for &b in bytes {
            if self.rx.len() >= self.rx_capacity() {
                self.overrun = true;
                break;
            }
            self.rx.push_back(b);
            taken += 1;
        }
        taken
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// The interrupt the device asserts now, as IIR reports it (`IIR_NO_INT` if none).
    fn pending(&self) -> u8 {
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_interrupt {
            IIR_THRI
        } else {
            IIR_NO_INT
        }
    }

    /// Level of the interrupt line.
    pub fn irq_level(&self) -> bool {
        self.pending() != IIR_NO_INT
    }

    /// The programmed baud-rate divisor (115200 / divisor baud).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn read_reg(&mut self, offset: u16) -> u8 {
        match offset {
            reg::DATA if self.dlab() => self.divisor as u8,
            reg::DATA => self.rx.pop_front().unwrap_or(0),
            reg::IER if self.dlab() => (self.divisor >> 8) as u8,
            reg::IER => self.ier,
            reg::IIR_FCR => {
                let pending = self.pending();
                if pending == IIR_THRI {
                    // Reading IIR while it reports THRE acknowledges that interrupt.
                    self.thr_interrupt = false;
                }
                pending | if self.fifo_enabled { IIR_FIFOS } else { 0 }
            }
            reg::LCR => self.lcr,
            reg::MCR => self.mcr,
            reg::LSR => {
                let mut lsr = LSR_THRE | LSR_TEMT;
                if !self.rx.is_empty() {
                    lsr |= LSR_DR;
                }
                if core::mem::take(&mut self.overrun) {
                    lsr |= LSR_OE;
                }
                lsr
            }
            reg::MSR => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback: the modem outputs feed the modem inputs.
                    let mut msr = 0;
                    if self.mcr & MCR_RTS != 0 {
                        msr |= MSR_CTS;
                    }
                    if self.mcr & MCR_DTR != 0 {
                        msr |= MSR_DSR;
                    }
                    if self.mcr & MCR_OUT1 != 0 {
                        msr |= MSR_RI;
                    }
                    if self.mcr & MCR_OUT2 != 0 {
                        msr |= MSR_DCD;
                    }
                    msr
                } else {
                    // A console that is always there.
                    MSR_DCD | MSR_DSR | MSR_CTS
                }
            }
            _ => self.scr,
        }
    }

    fn write_reg(&mut self, offset: u16, value: u8) {
        match offset {
            reg::DATA if self.dlab() => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            reg::DATA => {
                if self.mcr & MCR_LOOP != 0 {
                    if self.receive(&[value]) == 0 {
                        self.overrun = true;
                    }
                } else {
                    self.output.push(value);
                }
                // Sent at once: THR is empty again and says so.
                self.thr_interrupt = true;
            }
            reg::IER if self.dlab() => {
                self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8)
            }
            reg::IER => {
                let enabling_thri = value & IER_THRI != 0 && self.ier & IER_THRI == 0;
                self.ier = value & 0x0f;
                if enabling_thri {
                    // THR is always empty: enabling its interrupt raises it.
                    self.thr_interrupt = true;
                }
            }
            reg::IIR_FCR => {
                let enable = value & FCR_ENABLE != 0;
                if enable != self.fifo_enabled || value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
                self.fifo_enabled = enable;
            }
            reg::LCR => self.lcr = value,
            reg::MCR => self.mcr = value & 0x1f,
            reg::LSR | reg::MSR => {} // read-only
            _ => self.scr = value,
        }
    }
}

impl PortDevice for Uart8250 {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        // Byte registers: wider accesses see the byte (the rest floats high as on a PC bus).
        (u32::from(self.read_reg(offset)) | 0xffff_ff00) & crate::ports::mask(size)
    }

    fn write(&mut self, offset: u16, _size: u8, value: u32) {
        self.write_reg(offset, value as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(u: &mut Uart8250, o: u16) -> u8 {
        u.read(o, 1) as u8
    }
    fn w(u: &mut Uart8250, o: u16, v: u8) {
        u.write(o, 1, u32::from(v));
    }

    /// What Linux's 8250 `autoconfig` does before it believes a port is a 16550A.
    #[test]
    fn passes_linux_autoconfig_probe() {
        let mut u = Uart8250::new();
        // IER scratch test.
        w(&mut u, reg::IER, 0);
        assert_eq!(r(&mut u, reg::IER) & 0x0f, 0);
        w(&mut u, reg::IER, 0x0f);
        assert_eq!(r(&mut u, reg::IER) & 0x0f, 0x0f);
        w(&mut u, reg::IER, 0);
        // Loopback test: MCR = LOOP | OUT2 | RTS reads back as DCD | CTS.
        w(&mut u, reg::MCR, MCR_LOOP | 0x0a);
        assert_eq!(r(&mut u, reg::MSR) & 0xf0, 0x90);
        w(&mut u, reg::MCR, 0);
        // FIFO detection: IIR bits 7:6 = 3 with FIFOs on, 0 with them off.
        w(&mut u, reg::IIR_FCR, FCR_ENABLE);
        assert_eq!(r(&mut u, reg::IIR_FCR) >> 6, 3);
        w(&mut u, reg::IIR_FCR, 0);
        assert_eq!(r(&mut u, reg::IIR_FCR) >> 6, 0);
        // Scratch register.
        w(&mut u, reg::SCR, 0xa5);
        assert_eq!(r(&mut u, reg::SCR), 0xa5);
        // Idle: transmitter empty, nothing received, no interrupt.
        assert_eq!(r(&mut u, reg::LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(r(&mut u, reg::IIR_FCR), IIR_NO_INT);
        assert!(!u.irq_level());
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let mut u = Uart8250::new();
        w(&mut u, reg::LCR, LCR_DLAB | 0x03);
        w(&mut u, reg::DATA, 0x01);
        w(&mut u, reg::IER, 0x00);
        assert_eq!(u.divisor(), 1);
        assert_eq!(r(&mut u, reg::DATA), 1);
        w(&mut u, reg::LCR, 0x03);
        // The same ports are THR and IER again: nothing was transmitted or enabled.
        assert!(u.output.is_empty());
        assert_eq!(r(&mut u, reg::IER), 0);
        assert_eq!(r(&mut u, reg::LCR), 0x03);
    }

    /// The tty layer's transmit path: enable THRI, get the interrupt, write, get it again.
    #[test]
    fn transmitter_empty_interrupt_drives_output() {
        let mut u = Uart8250::new();
        w(&mut u, reg::IIR_FCR, FCR_ENABLE);
        w(&mut u, reg::IER, IER_THRI);
        assert!(u.irq_level(), "enabling THRI with THR empty raises it");
        assert_eq!(r(&mut u, reg::IIR_FCR), IIR_FIFOS | IIR_THRI);
        assert!(!u.irq_level(), "reading IIR acknowledged it");
        assert_eq!(r(&mut u, reg::IIR_FCR), IIR_FIFOS | IIR_NO_INT);
        for b in b"hi\n" {
            w(&mut u, reg::DATA, *b);
        }
        assert_eq!(u.output, b"hi\n");
        assert!(u.irq_level(), "each byte sent leaves THR empty again");
        // Disabling THRI lowers the line; re-enabling raises it again.
        w(&mut u, reg::IER, 0);
        assert!(!u.irq_level());
        w(&mut u, reg::IER, IER_THRI);
        assert!(u.irq_level());
    }

    #[test]
    fn received_bytes_raise_rdi_and_overrun_is_reported_once() {
        let mut u = Uart8250::new();
        w(&mut u, reg::IIR_FCR, FCR_ENABLE);
        w(&mut u, reg::IER, IER_RDI | IER_THRI);
        r(&mut u, reg::IIR_FCR); // acknowledge THRI
        assert_eq!(u.receive(b"ls\n"), 3);
        assert_eq!(
            r(&mut u, reg::IIR_FCR),
            IIR_FIFOS | IIR_RDI,
            "received data outranks THRE"
        );
        assert_eq!(r(&mut u, reg::LSR) & LSR_DR, LSR_DR);
        assert_eq!(r(&mut u, reg::DATA), b'l');
        assert_eq!(r(&mut u, reg::DATA), b's');
        assert_eq!(r(&mut u, reg::DATA), b'\n');
        assert_eq!(r(&mut u, reg::LSR) & LSR_DR, 0);
        assert!(!u.irq_level());
        // 20 bytes into a 16-byte FIFO: 16 taken, overrun flagged once.
        assert_eq!(u.receive(&[b'x'; 20]), 16);
        assert_eq!(r(&mut u, reg::LSR) & LSR_OE, LSR_OE);
        assert_eq!(r(&mut u, reg::LSR) & LSR_OE, 0);
        // Clearing the receive FIFO drops what was queued.
        w(&mut u, reg::IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(r(&mut u, reg::LSR) & LSR_DR, 0);
        // Without FIFOs the receiver holds one byte.
        w(&mut u, reg::IIR_FCR, 0);
        assert_eq!(u.receive(b"ab"), 1);
    }

    #[test]
    fn loopback_keeps_bytes_inside() {
        let mut u = Uart8250::new();
        w(&mut u, reg::IIR_FCR, FCR_ENABLE);
        w(&mut u, reg::MCR, MCR_LOOP);
        w(&mut u, reg::DATA, 0x5a);
        assert!(u.output.is_empty());
        assert_eq!(r(&mut u, reg::DATA), 0x5a);
        w(&mut u, reg::MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        w(&mut u, reg::DATA, b'A');
        assert_eq!(u.output, b"A");
        assert_eq!(r(&mut u, reg::MSR) & 0xf0, MSR_DCD | MSR_DSR | MSR_CTS);
    }

    #[test]
    fn read_only_registers_ignore_writes_and_wide_reads_float() {
        let mut u = Uart8250::new();
        w(&mut u, reg::LSR, 0);
        w(&mut u, reg::MSR, 0);
        assert_eq!(r(&mut u, reg::LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(
            u.read(reg::LSR, 4),
            0xffff_ff00 | u32::from(LSR_THRE | LSR_TEMT)
        );
        assert_eq!(u.read(reg::LSR, 1), u32::from(LSR_THRE | LSR_TEMT));
        // MCR keeps its five defined bits only, IER its four.
        w(&mut u, reg::MCR, 0xff);
        assert_eq!(r(&mut u, reg::MCR), 0x1f);
        w(&mut u, reg::MCR, 0);
        w(&mut u, reg::IER, 0xff);
        assert_eq!(r(&mut u, reg::IER), 0x0f);
    }
}
