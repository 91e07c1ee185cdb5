//! The port-I/O bus: devices see only offsets inside their own range, never absolute ports.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// A device on the port bus.
pub trait PortDevice {
    /// Read `size` (1, 2 or 4) bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u16, size: u8) -> u32;
    /// Write `size` bytes of `value` at `offset`.
    fn write(&mut self, offset: u16, size: u8, value: u32);
}

/// A device the VMM keeps a handle to (to drain its output, post status, ...) while the bus
/// owns another: the bus registers a clone of the `Rc`.
impl<D: PortDevice> PortDevice for alloc::rc::Rc<core::cell::RefCell<D>> {
    fn read(&mut self, offset: u16, size: u8) -> u32 {
        self.borrow_mut().read(offset, size)
    }
    fn write(&mut self, offset: u16, size: u8, value: u32) {
        self.borrow_mut().write(offset, size, value)
    }
}

/// Why a bus operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a registered device.
    Overlap,
    /// The range is empty or wraps.
    BadRange,
}

struct Slot {
    base: u16,
    length: u16,
    device: Box<dyn PortDevice>,
}

/// Devices by port range. Unclaimed ports read as all ones and ignore writes (as on a PC).
#[derive(Default)]
pub struct PortBus {
    slots: Vec<Slot>,
}

impl PortBus {
    /// An empty bus.
    pub fn new() -> Self {
        PortBus { slots: Vec::new() }
    }

    /// Register `device` at ports `base .. base + length`.
    pub fn register(
        &mut self,
        base: u16,
        length: u16,
        device: Box<dyn PortDevice>,
    ) -> Result<(), BusError> {
        let end = (base as u32) + length as u32;
        if length == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange);
        }
        if self
            .slots
            .iter()
            .any(|s| (base as u32) < s.base as u32 + s.length as u32 && (s.base as u32) < end)
        {
            return Err(BusError::Overlap);
        }
        self.slots.push(Slot {
            base,
            length,
            device,
        });
        Ok(())
    }

    fn find(&mut self, port: u16) -> Option<(&mut Slot, u16)> {
        self.slots
            .iter_mut()
            .find(|s| port >= s.base && (port as u32) < s.base as u32 + s.length as u32)
            .map(|s| {
                let offset = port - s.base;
                (s, offset)
            })
    }

    /// An IN of `size` bytes from `port`.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        match self.find(port) {
            Some((slot, offset)) => slot.device.read(offset, size),
            None => mask(size),
        }
    }

    /// An OUT of `size` bytes of `value` to `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        if let Some((slot, offset)) = self.find(port) {
            slot.device.write(offset, size, value & mask(size));
        }
    }
}

/// All ones of `size` bytes.
pub fn mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    struct Recorder(Rc<RefCell<Vec<(u16, u8, u32)>>>);
    impl PortDevice for Recorder {
        fn read(&mut self, offset: u16, size: u8) -> u32 {
            offset as u32 * 0x100 + size as u32
        }
        fn write(&mut self, offset: u16, size: u8, value: u32) {
            self.0.borrow_mut().push((offset, size, value));
        }
    }

    #[test]
    fn devices_see_offsets_only() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut bus = PortBus::new();
        bus.register(0x3f8, 8, Box::new(Recorder(log.clone())))
            .unwrap();
        assert_eq!(bus.read(0x3fa, 1), 0x201);
        bus.write(0x3ff, 2, 0x1_2345);
        assert_eq!(log.borrow().as_slice(), &[(7, 2, 0x2345)]);
    }

    #[test]
    fn a_shared_device_is_seen_through_both_handles() {
        let device = Rc::new(RefCell::new(crate::uart8250::Uart8250::new()));
        let mut bus = PortBus::new();
        bus.register(0x3f8, 8, Box::new(device.clone())).unwrap();
        bus.write(0x3f8, 1, u32::from(b'x'));
        assert_eq!(device.borrow().output, b"x");
        device.borrow_mut().receive(b"y");
        assert_eq!(bus.read(0x3f8, 1), u32::from(b'y'));
    }

    #[test]
    fn unclaimed_ports_float_high_and_overlaps_are_refused() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut bus = PortBus::new();
        bus.register(0x60, 4, Box::new(Recorder(log.clone())))
            .unwrap();
        assert_eq!(bus.read(0x64, 1), 0xff);
        assert_eq!(bus.read(0x10, 4), 0xffff_ffff);
        assert_eq!(
            bus.register(0x62, 4, Box::new(Recorder(log.clone()))).err(),
            Some(BusError::Overlap)
        );
        assert_eq!(
            bus.register(0xfffe, 4, Box::new(Recorder(log.clone())))
                .err(),
            Some(BusError::BadRange)
        );
        assert_eq!(
            bus.register(0x100, 0, Box::new(Recorder(log))).err(),
            Some(BusError::BadRange)
        );
    }
}
