//! An I/O APIC after the 82093AA datasheet: 24 redirection entries behind the indirect
//! IOREGSEL/IOWIN window (MMIO at [`IOAPIC_BASE`], through [`MmioDevice`]), edge and
//! level-triggered lines, masking, and remote IRR for level-triggered entries, cleared by the
//! local APIC's EOI broadcast ([`IoApic::end_of_interrupt`]).
//!
//! Device models drive lines with [`IoApic::set_line`] (the level is the line's logical state,
//! asserted or not; polarity, as in QEMU's model, is only stored). What the IOAPIC sends is
//! collected per pin and taken with [`IoApic::take_deliveries`], which the VMM hands to the
//! local APIC: an edge is sent on a rising edge of an unmasked line; a level-triggered line is
//! sent while it is asserted, unmasked and its remote IRR is clear, and sending sets remote
//! IRR. An unmask or an EOI re-sends a line that is still asserted. Several edges before a
//! drain coalesce into one delivery, as they would in the local APIC's IRR.
//!
//! Version 0x11 (no EOI register: Linux then relies on the EOI broadcast, and on its
//! mask-and-edge trick, which clears remote IRR when an entry is switched to edge).

use crate::lapic::DeliveryMode;
use crate::mmio::MmioDevice;
use alloc::vec::Vec;

/// The conventional guest-physical base (as in the MP table, [`crate::mptable::IOAPIC_ADDRESS`]).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Redirection entries (pins).
pub const PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23.
pub const VERSION: u32 = ((PINS as u32 - 1) << 16) | 0x11;
/// IOREGSEL offset.
pub const IOREGSEL: u64 = 0x00;
/// IOWIN offset.
pub const IOWIN: u64 = 0x10;
/// Register index: ID.
pub const REG_ID: u8 = 0x00;
/// Register index: version.
pub const REG_VERSION: u8 = 0x01;
/// Register index: arbitration id.
pub const REG_ARBITRATION: u8 = 0x02;
/// Register index of redirection entry 0's low half (entry n: `0x10 + 2n`, high `0x11 + 2n`).
pub const REG_REDIRECTION: u8 = 0x10;

/// Entry: delivery status (read-only; always idle here, deliveries are immediate).
pub const ENTRY_DELIVERY_STATUS: u64 = 1 << 12;
/// Entry: active-low polarity.
pub const ENTRY_POLARITY_LOW: u64 = 1 << 13;
/// Entry: remote IRR (read-only).
pub const ENTRY_REMOTE_IRR: u64 = 1 << 14;
/// Entry: level-triggered.
pub const ENTRY_LEVEL: u64 = 1 << 15;
/// Entry: masked.
pub const ENTRY_MASKED: u64 = 1 << 16;
/// Entry: logical destination mode.
pub const ENTRY_LOGICAL: u64 = 1 << 11;
/// Entry bits the guest may write: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask, destination (63:56).
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt message for the local APIC(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The pin it came from.
    pub pin: u8,
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Level-triggered (the local APIC sets TMR and broadcasts the EOI).
    pub level_triggered: bool,
    /// Destination (bits 63:56 of the entry).
    pub destination: u8,
    /// Logical destination mode.
    pub logical: bool,
}

/// The I/O APIC.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u8,
    select: u8,
    entries: [u64; PINS],
    /// Line levels, one bit per pin.
    lines: u32,
    /// Pins with a delivery waiting for [`IoApic::take_deliveries`].
    pending: u32,
}

impl IoApic {
    /// An IOAPIC with the given id and every entry masked (the reset state).
    pub fn new(id: u8) -> IoApic {
        IoApic {
            id: id & 0xf,
            select: 0,
            entries: [ENTRY_MASKED; PINS],
            lines: 0,
            pending: 0,
        }
    }

    /// The IOAPIC id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// A redirection entry (`None` past the last pin).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// The level of a line as last set.
    pub fn line(&self, pin: usize) -> bool {
        pin < PINS && self.lines & (1 << pin) != 0
    }

    /// Drive line `pin` to `asserted`. Pins past the last are ignored.
    pub fn set_line(&mut self, pin: usize, asserted: bool) {
        if pin >= PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if asserted {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let entry = self.entries[pin];
        if entry & ENTRY_LEVEL != 0 {
            self.evaluate_level(pin);
        } else if asserted && !was && entry & ENTRY_MASKED == 0 {
            self.pending |= bit;
        }
    }

    /// An edge: raise and lower the line (for edge-triggered device models).
    pub fn pulse(&mut self, pin: usize) {
        self.set_line(pin, true);
        self.set_line(pin, false);
    }

    /// A level-triggered pin is due when asserted, unmasked and not awaiting its EOI.
    fn evaluate_level(&mut self, pin: usize) {
        let entry = self.entries[pin];
        let bit = 1u32 << pin;
        if self.lines & bit != 0 && entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR) == 0 {
            self.pending |= bit;
        } else {
            self.pending &= !bit;
        }
    }

    /// The local APIC's EOI broadcast for `vector`: level-triggered entries with that vector
    /// clear remote IRR, and those whose line is still asserted are sent again.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..PINS {
            let entry = self.entries[pin];
            if entry as u8 == vector && entry & ENTRY_LEVEL != 0 && entry & ENTRY_REMOTE_IRR != 0 {
                self.entries[pin] &= !ENTRY_REMOTE_IRR;
                self.evaluate_level(pin);
            }
        }
    }

    /// The messages to send now, lowest pin first; level-triggered ones set remote IRR.
    /// Entries masked since they became due are skipped.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        core::iter::from_fn(|| self.take_delivery()).collect()
    }

    /// The next message to send now (the lowest pin first), as [`IoApic::take_deliveries`]
    /// but one at a time, without allocating.
    pub fn take_delivery(&mut self) -> Option<Delivery> {
        while self.pending != 0 {
            let pin = self.pending.trailing_zeros() as usize;
            self.pending &= self.pending - 1;
            let entry = self.entries[pin];
            if entry & ENTRY_MASKED != 0 {
                continue;
            }
            let level_triggered = entry & ENTRY_LEVEL != 0;
            if level_triggered {
                self.entries[pin] |= ENTRY_REMOTE_IRR;
            }
            return Some(Delivery {
                pin: pin as u8,
                vector: entry as u8,
                mode: DeliveryMode::from_bits(entry),
                level_triggered,
                destination: (entry >> 56) as u8,
                logical: entry & ENTRY_LOGICAL != 0,
            });
        }
        None
    }

    /// Whether deliveries wait.
    pub fn has_deliveries(&self) -> bool {
        self.pending != 0
    }

    /// Read the register IOREGSEL selects.
    pub fn read_register(&self, index: u8) -> u32 {
        match index {
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            REG_ARBITRATION => u32::from(self.id) << 24,
            _ => match Self::entry_index(index) {
                Some((pin, false)) => self.entries[pin] as u32,
                Some((pin, true)) => (self.entries[pin] >> 32) as u32,
                None => 0,
            },
        }
    }

    /// Write the register IOREGSEL selects (version and arbitration are read-only).
    pub fn write_register(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => self.id = ((value >> 24) & 0xf) as u8,
            REG_VERSION | REG_ARBITRATION => {}
            _ => {
                let Some((pin, high)) = Self::entry_index(index) else {
                    return;
                };
                let old = self.entries[pin];
                let written = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                let mut entry = (written & ENTRY_WRITABLE) | (old & ENTRY_REMOTE_IRR);
                if entry & ENTRY_LEVEL == 0 {
                    // Edge entries have no remote IRR (Linux's EOI trick for old IOAPICs).
                    entry &= !ENTRY_REMOTE_IRR;
                }
                self.entries[pin] = entry;
                if entry & ENTRY_LEVEL != 0 {
                    self.evaluate_level(pin);
                } else if entry & ENTRY_MASKED != 0 {
                    self.pending &= !(1 << pin);
                }
            }
        }
    }

    /// (pin, high half) of a redirection register index.
    fn entry_index(index: u8) -> Option<(usize, bool)> {
        let i = usize::from(index.checked_sub(REG_REDIRECTION)?);
        (i < 2 * PINS).then_some((i / 2, i % 2 == 1))
    }
}

/// IOREGSEL (8 bits used) at 0x00 and IOWIN (32 bits) at 0x10; other offsets read 0.
impl MmioDevice for IoApic {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        let value = match offset {
            IOREGSEL => u64::from(self.select),
            IOWIN => u64::from(self.read_register(self.select)),
            _ => 0,
        };
        value & crate::mmio::mask(size)
    }

    fn write(&mut self, offset: u64, _size: u8, value: u64) {
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(self.select, value as u32),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u8, entry: u64) {
        io.write(IOREGSEL, 4, u64::from(REG_REDIRECTION + 2 * pin + 1));
        io.write(IOWIN, 4, entry >> 32);
        io.write(IOREGSEL, 4, u64::from(REG_REDIRECTION + 2 * pin));
        io.write(IOWIN, 4, entry & 0xffff_ffff);
    }

    fn read(io: &mut IoApic, index: u8) -> u32 {
        io.write(IOREGSEL, 4, u64::from(index));
        io.read(IOWIN, 4) as u32
    }

    #[test]
    fn identification_registers() {
        let mut io = IoApic::new(1);
        assert_eq!(read(&mut io, REG_ID), 1 << 24);
        assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011);
        assert_eq!(read(&mut io, REG_ARBITRATION), 1 << 24);
        io.write_register(REG_ID, 0x0200_0000);
        io.write_register(REG_VERSION, 0);
        assert_eq!((io.id(), read(&mut io, REG_VERSION)), (2, VERSION));
        assert_eq!(io.read(IOREGSEL, 1), u64::from(REG_VERSION));
        // Reset: every entry masked; beyond the last entry reads 0.
        for pin in 0..PINS as u8 {
            assert_eq!(
                read(&mut io, REG_REDIRECTION + 2 * pin),
                ENTRY_MASKED as u32
            );
        }
        assert_eq!(read(&mut io, REG_REDIRECTION + 2 * PINS as u8), 0);
        assert_eq!(read(&mut io, 0x05), 0);
        assert_eq!(io.read(0x20, 4), 0);
    }

    #[test]
    fn edge_lines() {
        let mut io = IoApic::new(1);
        program(&mut io, 4, 0x0300_0000_0000_0034);
        io.set_line(4, true);
        let d = io.take_deliveries();
        assert_eq!(
            d,
            [Delivery {
                pin: 4,
                vector: 0x34,
                mode: DeliveryMode::Fixed,
                level_triggered: false,
                destination: 3,
                logical: false
            }]
        );
        // Holding the line high sends nothing more; a new edge does.
        io.set_line(4, true);
        assert!(io.take_deliveries().is_empty());
        io.set_line(4, false);
        io.pulse(4);
        io.pulse(4);
        assert_eq!(io.take_deliveries().len(), 1); // coalesced
                                                   // Masked edges are lost.
        program(&mut io, 4, ENTRY_MASKED | 0x34);
        io.pulse(4);
        program(&mut io, 4, 0x34);
        assert!(io.take_deliveries().is_empty());
        // An edge masked before the drain is dropped too.
        io.pulse(4);
        program(&mut io, 4, ENTRY_MASKED | 0x34);
        assert!(!io.has_deliveries());
        io.set_line(99, true);
    }

    #[test]
    fn level_lines_and_remote_irr() {
        let mut io = IoApic::new(1);
        program(&mut io, 10, ENTRY_LEVEL | ENTRY_LOGICAL | (1 << 56) | 0x3a);
        io.set_line(10, true);
        let d = io.take_deliveries();
        assert_eq!(d.len(), 1);
        assert!(d[0].level_triggered && d[0].logical);
        assert_ne!(io.entry(10).unwrap() & ENTRY_REMOTE_IRR, 0);
        // Still asserted, but remote IRR holds it back until the EOI.
        io.set_line(10, true);
        assert!(io.take_deliveries().is_empty());
        io.end_of_interrupt(0x3b); // another vector
        assert!(io.take_deliveries().is_empty());
        io.end_of_interrupt(0x3a);
        assert_eq!(io.entry(10).unwrap() & ENTRY_REMOTE_IRR, 0);
        assert_eq!(io.take_deliveries().len(), 1); // still asserted: sent again
                                                   // Lowered before the EOI: nothing more.
        io.set_line(10, false);
        io.end_of_interrupt(0x3a);
        assert!(io.take_deliveries().is_empty());
        assert!(!io.line(10));
        // Remote IRR is read-only to the guest.
        io.set_line(10, true);
        io.take_deliveries();
        program(&mut io, 10, ENTRY_LEVEL | 0x3a);
        assert_ne!(io.entry(10).unwrap() & ENTRY_REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_line_sends_it() {
        let mut io = IoApic::new(1);
        program(&mut io, 3, ENTRY_MASKED | ENTRY_LEVEL | 0x23);
        io.set_line(3, true);
        assert!(io.take_deliveries().is_empty());
        program(&mut io, 3, ENTRY_LEVEL | 0x23);
        assert_eq!(io.take_deliveries()[0].vector, 0x23);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        // Linux's EOI for IOAPICs without an EOI register: mask, set edge, restore level.
        let mut io = IoApic::new(1);
        program(&mut io, 9, ENTRY_LEVEL | 0x29);
        io.set_line(9, true);
        io.take_deliveries();
        io.set_line(9, false);
        program(&mut io, 9, ENTRY_MASKED | 0x29);
        assert_eq!(io.entry(9).unwrap() & ENTRY_REMOTE_IRR, 0);
        program(&mut io, 9, ENTRY_LEVEL | 0x29);
        io.set_line(9, true);
        assert_eq!(io.take_deliveries().len(), 1);
    }

    #[test]
    fn delivery_modes_and_read_only_bits() {
        let mut io = IoApic::new(1);
        program(&mut io, 0, (4 << 8) | ENTRY_DELIVERY_STATUS | 0x02);
        assert_eq!(io.entry(0).unwrap() & ENTRY_DELIVERY_STATUS, 0);
        io.pulse(0);
        assert_eq!(io.take_deliveries()[0].mode, DeliveryMode::Nmi);
        program(&mut io, 1, (7 << 8) | ENTRY_POLARITY_LOW);
        assert_ne!(io.entry(1).unwrap() & ENTRY_POLARITY_LOW, 0);
        io.pulse(1);
        assert_eq!(io.take_deliveries()[0].mode, DeliveryMode::ExtInt);
    }
}
