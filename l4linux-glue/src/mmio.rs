//! The MMIO bus: devices at guest-physical ranges see only offsets inside their own range.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// A memory-mapped device.
pub trait MmioDevice {
    /// Read `size` (1, 2, 4 or 8) bytes at `offset`.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    /// Write `size` bytes of `value` at `offset`.
    fn write(&mut self, offset: u64, size: u8, value: u64);
}

/// A device the VMM keeps a handle to (to poll its interrupt, feed it input, drain its
/// output) while the bus owns another: the bus registers a clone of the `Rc`.
impl<D: MmioDevice> MmioDevice for alloc::rc::Rc<core::cell::RefCell<D>> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        self.borrow_mut().read(offset, size)
    }
    fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.borrow_mut().write(offset, size, value)
    }
}

/// Why a registration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// The range overlaps a registered device.
    Overlap,
    /// The range is empty or wraps.
    BadRange,
}

struct Region {
    base: u64,
    length: u64,
    device: Box<dyn MmioDevice>,
}

/// Devices by guest-physical range.
#[derive(Default)]
pub struct MmioBus {
    regions: Vec<Region>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        MmioBus {
            regions: Vec::new(),
        }
    }

    /// Register `device` at `base .. base + length`.
    pub fn register(
        &mut self,
        base: u64,
        length: u64,
        device: Box<dyn MmioDevice>,
    ) -> Result<(), MmioError> {
        let end = base.checked_add(length).ok_or(MmioError::BadRange)?;
        if length == 0 {
            return Err(MmioError::BadRange);
        }
        if self
            .regions
            .iter()
            .any(|r| base < r.base + r.length && r.base < end)
        {
            return Err(MmioError::Overlap);
        }
        self.regions.push(Region {
            base,
            length,
            device,
        });
        Ok(())
    }

    /// Whether a device claims `address`.
    pub fn claims(&self, address: u64) -> bool {
        self.regions
            .iter()
            .any(|r| address >= r.base && address - r.base < r.length)
    }

    fn find(&mut self, address: u64) -> Option<(&mut Region, u64)> {
        self.regions
            .iter_mut()
            .find(|r| address >= r.base && address - r.base < r.length)
            .map(|r| {
                let offset = address - r.base;
                (r, offset)
            })
    }

    /// A read of `size` bytes at `address`; `None` if no device claims it.
    pub fn read(&mut self, address: u64, size: u8) -> Option<u64> {
        self.find(address)
            .map(|(r, offset)| r.device.read(offset, size) & mask(size))
    }

    /// A write; returns whether a device claimed it.
    pub fn write(&mut self, address: u64, size: u8, value: u64) -> bool {
        match self.find(address) {
            Some((r, offset)) => {
                r.device.write(offset, size, value & mask(size));
                true
            }
            None => false,
        }
    }
}

/// All ones of `size` bytes.
pub fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size as u32)) - 1
    }
}

/// A scratch register device: remembers the last value written (for tests).
#[derive(Debug, Default)]
pub struct Scratch {
    /// The value.
    pub value: u64,
    /// The offset of the last access.
    pub last_offset: u64,
}

impl MmioDevice for Scratch {
    fn read(&mut self, offset: u64, _size: u8) -> u64 {
        self.last_offset = offset;
        self.value
    }
    fn write(&mut self, offset: u64, size: u8, value: u64) {
        self.last_offset = offset;
        self.value = value & mask(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_sizes() {
        let mut bus = MmioBus::new();
        bus.register(0xd000_0000, 0x1000, Box::new(Scratch::default()))
            .unwrap();
        assert!(bus.write(0xd000_0010, 2, 0x1_2345));
        assert_eq!(bus.read(0xd000_0010, 4), Some(0x2345));
        assert_eq!(bus.read(0xd000_0010, 1), Some(0x45));
        assert!(bus.claims(0xd000_0fff));
        assert!(!bus.claims(0xd000_1000));
        assert_eq!(bus.read(0xc000_0000, 4), None);
        assert!(!bus.write(0, 1, 1));
    }

    #[test]
    fn registration_rules() {
        let mut bus = MmioBus::new();
        bus.register(0x1000, 0x1000, Box::new(Scratch::default()))
            .unwrap();
        assert_eq!(
            bus.register(0x1800, 0x100, Box::new(Scratch::default()))
                .err(),
            Some(MmioError::Overlap)
        );
        assert_eq!(
            bus.register(0x5000, 0, Box::new(Scratch::default())).err(),
            Some(MmioError::BadRange)
        );
        assert_eq!(
            bus.register(u64::MAX - 1, 4, Box::new(Scratch::default()))
                .err(),
            Some(MmioError::BadRange)
        );
        assert_eq!(mask(8), u64::MAX);
    }
}
