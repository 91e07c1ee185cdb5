//! The guest-test device: what bare-metal test guests use to report (`ok N - guest: case`
//! lines on a console port) and to exercise port I/O of every size.
//!
//! Offsets: 0 console (bytes, line buffered), 4 exit (a 32-bit write ends the guest with that
//! code), 8 scratch (remembers the last value per size: bytes at 8, words at 8, dwords at 8),
//! 12 counter (each byte read returns the next value), 16 status (32-bit reads return the
//! value the VMM last posted, e.g. the address of a refused guest access).

use crate::ports::PortDevice;
use alloc::string::String;
use alloc::vec::Vec;

/// The base port the VMM registers the device at, and its length.
pub const BASE_PORT: u16 = 0xe0;
/// Ports it occupies.
pub const LENGTH: u16 = 20;

/// Port offsets.
pub mod offset {
    /// Console byte.
    pub const CONSOLE: u16 = 0;
    /// Exit code.
    pub const EXIT: u16 = 4;
    /// Scratch register.
    pub const SCRATCH: u16 = 8;
    /// Counting byte source.
    pub const COUNTER: u16 = 12;
    /// Status word from the VMM.
    pub const STATUS: u16 = 16;
}

/// The device state.
#[derive(Debug, Default)]
pub struct TestDevice {
    line: Vec<u8>,
    /// Completed console lines, for the VMM to print.
    pub lines: Vec<String>,
    /// Set when the guest wrote the exit port.
    pub exit: Option<u32>,
    scratch: [u32; 5],
    counter: u8,
    /// What the status port reads.
    pub status: u32,
}

impl TestDevice {
    /// A fresh device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the completed console lines.
    pub fn take_lines(&mut self) -> Vec<String> {
        core::mem::take(&mut self.lines)
    }
}

impl PortDevice for TestDevice {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        match offset {
            offset::SCRATCH => self.scratch[size as usize],
            offset::COUNTER => {
                let mut value = 0u32;
                for i in 0..size {
                    value |= (self.counter as u32) << (8 * i);
                    self.counter = self.counter.wrapping_add(1);
                }
                value
            }
            offset::STATUS => self.status,
            _ => crate::ports::mask(size),
        }
    }

    fn write(&mut self, offset: u16, size: u8, value: u32) {
        match offset {
            offset::CONSOLE => {
                let byte = value as u8;
                if byte == b'\n' {
                    self.lines
                        .push(String::from_utf8_lossy(&self.line).into_owned());
                    self.line.clear();
                } else if self.line.len() < 200 {
                    self.line.push(byte);
                }
            }
            offset::EXIT => self.exit = Some(value),
            offset::SCRATCH => self.scratch[size as usize] = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_and_exit() {
        let mut d = TestDevice::new();
        for b in b"ok 1 - guest: x\npartial" {
            d.write(offset::CONSOLE, 1, *b as u32);
        }
        assert_eq!(d.take_lines(), ["ok 1 - guest: x"]);
        assert!(d.take_lines().is_empty());
        d.write(offset::EXIT, 4, 7);
        assert_eq!(d.exit, Some(7));
    }

    #[test]
    fn scratch_per_size_and_counter() {
        let mut d = TestDevice::new();
        d.write(offset::SCRATCH, 1, 0xab);
        d.write(offset::SCRATCH, 2, 0xbeef);
        d.write(offset::SCRATCH, 4, 0xdead_beef);
        assert_eq!(d.read(offset::SCRATCH, 1), 0xab);
        assert_eq!(d.read(offset::SCRATCH, 2), 0xbeef);
        assert_eq!(d.read(offset::SCRATCH, 4), 0xdead_beef);
        assert_eq!(d.read(offset::COUNTER, 1), 0);
        assert_eq!(d.read(offset::COUNTER, 2), 0x0201);
        d.status = 5;
        assert_eq!(d.read(offset::STATUS, 4), 5);
        assert_eq!(d.read(3, 1), 0xff);
    }
}
