//! A debug-exit port in the manner of QEMU's `isa-debug-exit` device: a write of any width to
//! its ports ends the machine, here the compartment, with a status. Unlike QEMU, which exits
//! with `value * 2 + 1`, the status is the value written, so that 0 means success as it does
//! for every other task. Reads return all ones, as for an absent device.

use crate::ports::{mask, PortDevice};

/// The device's first port (QEMU's `iobase=0xf4`).
pub const BASE_PORT: u16 = 0xf4;
/// Its width (QEMU's `iosize=4`).
pub const LENGTH: u16 = 4;

/// The device: remembers the first status written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugExit {
    /// The status the guest asked to exit with, once it wrote one.
    pub status: Option<u32>,
}

impl PortDevice for DebugExit {
    fn read(&mut self, _offset: u16, size: u8) -> u32 {
        mask(size)
    }

    fn write(&mut self, _offset: u16, size: u8, value: u32) {
        if self.status.is_none() {
            self.status = Some(value & mask(size));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_write_is_the_status() {
        let mut d = DebugExit::default();
        assert_eq!(d.read(0, 1), 0xff);
        assert_eq!(d.status, None);
        d.write(0, 1, 0x1234);
        assert_eq!(d.status, Some(0x34));
        d.write(0, 4, 7);
        assert_eq!(d.status, Some(0x34));
        let mut wide = DebugExit::default();
        wide.write(0, 4, 0x1_0000);
        assert_eq!(wide.status, Some(0x1_0000));
    }
}
