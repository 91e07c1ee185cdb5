//! Virtio 1.2 devices for a Linux guest over the virtio-mmio transport (version 2): split
//! virtqueues ([`queue`]), the MMIO register block ([`mmio`]) that any [`mmio::VirtioBackend`]
//! sits behind, and three backends, a console ([`console`]), a block device over a memory
//! image ([`block`]) and a network device that exchanges Ethernet frames with a backend
//! ([`net`]).
//!
//! Linux finds each device from its command line (`virtio_mmio.device=4K@0xd0000000:5`): the
//! VMM registers a [`mmio::VirtioMmio`] at that address on the [`crate::mmio::MmioBus`] and
//! injects the IRQ while [`mmio::VirtioMmio::irq_level`] is high.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod queue;

/// Feature bits common to all devices (virtio 1.2 §6).
pub mod feature {
    /// Indirect descriptor tables (`VIRTQ_DESC_F_INDIRECT`).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A virtio 1.x device (not legacy); mandatory for virtio-mmio version 2.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete (refused by the device when the features do not fit).
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Device IDs (virtio 1.2 §5).
pub mod device_id {
    /// Network device.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
}

/// Copy `config[offset..]` into `data`, zeros past its end.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_copies_are_bounded() {
        let config = [1, 2, 3];
        let mut data = [9u8; 4];
        super::copy_config(&config, 1, &mut data);
        assert_eq!(data, [2, 3, 0, 0]);
        super::copy_config(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
