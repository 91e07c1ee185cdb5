//! QEMU's firmware configuration device (`fw_cfg`) in its I/O-port form, as a guest finds it
//! on a PC: a 16-bit selector at port 0x510 and a byte-wide data port at 0x511 (the device is
//! [`LENGTH`] ports from [`BASE_PORT`]). Writing a key to the selector restarts reading at
//! that item's first byte; each data read returns the next byte, and 0 past its end or for an
//! unknown key. There is no DMA interface ([`ID_TRADITIONAL`]) and no write support.
//!
//! The items are the ones a guest without firmware asks for: the signature, the interface id,
//! the RAM size, the CPU counts, and an empty file directory.

use crate::ports::{mask, PortDevice};
use alloc::vec::Vec;

/// The selector port.
pub const BASE_PORT: u16 = 0x510;
/// Selector (offset 0, 16 bits) and data (offset 1, 8 bits).
pub const LENGTH: u16 = 2;
/// Offset of the data port.
pub const DATA_OFFSET: u16 = 1;

/// Item keys (QEMU's `include/standard-headers/linux/qemu_fw_cfg.h`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface features (32 bits, little-endian).
    pub const ID: u16 = 0x01;
    /// RAM size in bytes (64 bits, little-endian).
    pub const RAM_SIZE: u16 = 0x03;
    /// CPUs at boot (16 bits, little-endian).
    pub const NB_CPUS: u16 = 0x05;
    /// CPUs at most (16 bits, little-endian).
    pub const MAX_CPUS: u16 = 0x0f;
    /// The file directory (a 32-bit big-endian count, then the entries).
    pub const FILE_DIR: u16 = 0x19;
}

/// The signature item.
pub const SIGNATURE: &[u8; 4] = b"QEMU";
/// ID bit 0: the traditional (port) interface.
pub const ID_TRADITIONAL: u32 = 1;
/// Keys are this wide; the bits above select write access and architecture-local items,
/// neither of which exists here.
pub const KEY_MASK: u16 = 0x3fff;

/// The device.
#[derive(Debug, Clone)]
pub struct FwCfg {
    items: Vec<(u16, Vec<u8>)>,
    selected: Option<usize>,
    position: usize,
}

impl FwCfg {
    /// The items of a machine with `ram_size` bytes of RAM and `cpus` CPUs.
    pub fn new(ram_size: u64, cpus: u16) -> FwCfg {
        let items = alloc::vec![
            (key::SIGNATURE, SIGNATURE.to_vec()),
            (key::ID, ID_TRADITIONAL.to_le_bytes().to_vec()),
            (key::RAM_SIZE, ram_size.to_le_bytes().to_vec()),
            (key::NB_CPUS, cpus.to_le_bytes().to_vec()),
            (key::MAX_CPUS, cpus.to_le_bytes().to_vec()),
            (key::FILE_DIR, 0u32.to_be_bytes().to_vec()),
        ];
        FwCfg {
            items,
            selected: None,
            position: 0,
        }
    }

    /// Select the item `key` (write to the selector port).
    pub fn select(&mut self, key: u16) {
        self.selected = if key & !KEY_MASK != 0 {
            None
        } else {
            self.items.iter().position(|(k, _)| *k == key)
        };
        self.position = 0;
    }

    /// The next byte of the selected item (a read of the data port).
    pub fn read_byte(&mut self) -> u8 {
        let Some(index) = self.selected else {
            return 0;
        };
        let byte = self.items[index].1.get(self.position).copied().unwrap_or(0);
        self.position = self.position.saturating_add(1);
        byte
    }
}

impl PortDevice for FwCfg {
    /// The data port returns one item byte per byte read (a wider read: successive bytes,
    /// little-endian); the selector port is write-only and reads as all ones.
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        if offset != DATA_OFFSET {
            return mask(size);
        }
        (0..u32::from(size.min(4)))
            .fold(0, |value, i| value | u32::from(self.read_byte()) << (8 * i))
    }

    /// A write to the selector port selects an item; writes to the data port are ignored
    /// (there is no writable item).
    fn write(&mut self, offset: u16, _size: u8, value: u32) {
        if offset == 0 {
            self.select(value as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(device: &mut FwCfg, key: u16, length: usize) -> Vec<u8> {
        device.write(0, 2, u32::from(key));
        (0..length)
            .map(|_| device.read(DATA_OFFSET, 1) as u8)
            .collect()
    }

    #[test]
    fn items_read_byte_by_byte() {
        let mut d = FwCfg::new(256 << 20, 1);
        assert_eq!(item(&mut d, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(item(&mut d, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(item(&mut d, key::RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        assert_eq!(item(&mut d, key::NB_CPUS, 2), [1, 0]);
        assert_eq!(item(&mut d, key::MAX_CPUS, 2), [1, 0]);
        assert_eq!(item(&mut d, key::FILE_DIR, 4), [0, 0, 0, 0]);
        // Reselecting restarts the item; a wide read takes successive bytes.
        d.write(0, 2, u32::from(key::SIGNATURE));
        assert_eq!(d.read(DATA_OFFSET, 4), u32::from_le_bytes(*b"QEMU"));
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut d = FwCfg::new(64 << 20, 2);
        // Nothing selected yet, past the end, unknown keys, write and arch-local keys: zeros.
        assert_eq!(d.read(DATA_OFFSET, 1), 0);
        assert_eq!(item(&mut d, key::NB_CPUS, 4), [2, 0, 0, 0]);
        assert_eq!(item(&mut d, 0x1234, 2), [0, 0]);
        assert_eq!(item(&mut d, 0x4000 | key::SIGNATURE, 2), [0, 0]);
        assert_eq!(item(&mut d, 0x8000 | key::SIGNATURE, 2), [0, 0]);
        // The selector reads as all ones; data writes change nothing.
        assert_eq!(d.read(0, 2), 0xffff);
        d.write(0, 2, u32::from(key::SIGNATURE));
        d.write(DATA_OFFSET, 1, 0x55);
        assert_eq!(d.read(DATA_OFFSET, 1), u32::from(b'Q'));
        // Reading far past the end keeps returning zeros.
        for _ in 0..10_000 {
            d.read(DATA_OFFSET, 4);
        }
        assert_eq!(d.read(DATA_OFFSET, 1), 0);
    }
}
