//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2): the register block a Linux guest's
//! `virtio_mmio` driver programs, as an [`MmioDevice`] on the offset-only bus, in front of a
//! [`VirtioBackend`] (console, block, ...) that owns the device-specific part.
//!
//! The transport offers `VIRTIO_F_VERSION_1` (Linux refuses version-2 devices without it),
//! `VIRTIO_F_INDIRECT_DESC` and `VIRTIO_F_EVENT_IDX` on top of the backend's features. Setting
//! FEATURES_OK is refused (the bit stays clear, as §3.1.1 asks the driver to check) when the
//! driver accepts a feature not offered or leaves out VERSION_1; writing 0 to Status resets the
//! device. Queue registers are written while the queue is not ready; QueueReady = 1 checks the
//! queue ([`Queue::activate`]). The device consumes buffers only after DRIVER_OK: buffers
//! the driver made available earlier (Linux's console fills its receive queue in probe) are
//! handled when DRIVER_OK arrives.
//!
//! A guest that breaks a queue (a bad ring address, a looping chain, ...) puts the device in
//! DEVICE_NEEDS_RESET with a configuration-change interrupt (§2.1.2); [`VirtioMmio::error`] says
//! why, and nothing more is processed until the driver resets the device.
//!
//! Interrupts: InterruptStatus bit 0 (used buffer) and bit 1 (configuration change); the line
//! is high while either is set ([`VirtioMmio::irq_level`]) and the driver clears them through
//! InterruptACK. The VMM polls the level after each access and after [`VirtioMmio::poll`], and
//! injects the IRQ the command line names (`virtio_mmio.device=4K@0xd0000000:5`).
//!
//! Register accesses other than 32-bit are ignored (read as 0), as the specification allows
//! only those; the configuration space at 0x100 takes 1, 2, 4 and 8 bytes.

use super::feature;
use super::queue::{Queue, QueueError};
use super::status;
use crate::guest_memory::GuestMemory;
use crate::mmio::MmioDevice;
use alloc::vec::Vec;

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version (virtio 1.x, not legacy).
pub const VERSION: u32 = 2;
/// The vendor ID the devices report ("L4RS").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"L4RS");
/// The size of one device's MMIO window (the `4K` of the command line).
pub const WINDOW_SIZE: u64 = 0x1000;
/// InterruptStatus: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// InterruptStatus: the configuration space changed (or the device needs a reset).
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;
/// Features the transport offers for every device.
pub const TRANSPORT_FEATURES: u64 =
    feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX;

/// Register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    /// R: [`super::MAGIC`].
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: 2.
    pub const VERSION: u64 = 0x004;
    /// R: the backend's device ID.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: [`super::VENDOR_ID`].
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 feature bits, selected by DeviceFeaturesSel.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: which 32 bits DeviceFeatures shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 accepted feature bits, selected by DriverFeaturesSel.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: which 32 bits DriverFeatures sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: the queue the Queue* registers address.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: the selected queue's maximum size (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: the selected queue's size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// W: the driver has new buffers in the queue written.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: interrupt causes handled.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: device status (0 resets).
    pub const STATUS: u64 = 0x070;
    /// W: descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: shared memory region length, low (all ones: no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: shared memory region length, high.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: shared memory region base, low.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: shared memory region base, high.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// R: changes whenever the configuration space may have changed.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// RW: start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// The device-specific half of a virtio device, behind [`VirtioMmio`].
pub trait VirtioBackend {
    /// The virtio device ID (non-zero; [`super::device_id`]).
    fn device_id(&self) -> u32;

    /// Device-specific feature bits (the transport adds [`TRANSPORT_FEATURES`]).
    fn features(&self) -> u64;

    /// The maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Fill `data` from the configuration space at `offset` (bytes past its end read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver wrote `data` at `offset` in the configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// A counter the backend bumps whenever it changes its configuration space; the transport
    /// reports it as ConfigGeneration and interrupts the driver when it moves.
    fn config_generation(&self) -> u32 {
        0
    }

    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, _features: u64) {}

    /// The driver reset the device.
    fn reset(&mut self) {}

    /// The driver notified `queue` (a ready queue, after DRIVER_OK): consume its chains and
    /// return used ones. The transport then decides whether to interrupt. An error breaks the
    /// device until reset.
    fn notify(
        &mut self,
        queue: u16,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError>;

    /// Work not triggered by the driver (input that arrived from outside); nothing by
    /// default.
    fn poll(
        &mut self,
        _queues: &mut [Queue],
        _memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        Ok(())
    }
}

/// A virtio-mmio device: the transport registers, the queues, the guest memory they live in,
/// and the backend.
pub struct VirtioMmio<B, M> {
    backend: B,
    memory: M,
    queues: Vec<Queue>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    error: Option<QueueError>,
    /// A register write since the last poll (any but the interrupt acknowledgement, which
    /// changes nothing the backend works on): see [`VirtioMmio::poll_if`].
    touched: bool,
}

impl<B: VirtioBackend, M: GuestMemory> VirtioMmio<B, M> {
    /// The device in its reset state, with `backend` behind it and its queues in `memory`.
    pub fn new(backend: B, memory: M) -> Self {
        let queues = backend
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect();
        let config_generation = backend.config_generation();
        VirtioMmio {
            backend,
            memory,
            queues,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            interrupt_status: 0,
            config_generation,
            error: None,
            touched: true,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to hand it input or drain its output (then call [`VirtioMmio::poll`]).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The guest memory, writable.
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.memory
    }

    /// The queues.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// The device status the driver set (plus DEVICE_NEEDS_RESET after an error).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Everything offered: the backend's features and [`TRANSPORT_FEATURES`].
    pub fn device_features(&self) -> u64 {
        self.backend.features() | TRANSPORT_FEATURES
    }

    /// The pending interrupt causes ([`INTERRUPT_USED_BUFFER`], [`INTERRUPT_CONFIG_CHANGE`]).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The level of the interrupt line.
    pub fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    /// Why the device needs a reset, if it does.
    pub fn error(&self) -> Option<QueueError> {
        self.error
    }

    /// Let the backend do work that was not triggered by the guest (deliver console input),
    /// then update the interrupt.
    pub fn poll(&mut self) {
        self.touched = false;
        if !self.running() {
            return;
        }
        let result = self
            .backend
            .poll(&mut self.queues, &mut self.memory as &mut dyn GuestMemory);
        self.after_work(result);
    }

    /// Poll only if something the device works on can have changed: a register write since
    /// the last poll, or `outside` (the caller knows its backend has news, such as frames
    /// from the switch). Everything the guest does to its queues that the device has asked to
    /// hear about comes with a notification, a register write; reading the interrupt status
    /// and acknowledging it (two exits per interrupt) need no poll.
    pub fn poll_if(&mut self, outside: bool) {
        if outside || self.touched {
            self.poll();
        }
    }

    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.error.is_none()
    }

    fn negotiated(&self, bit: u64) -> bool {
        self.driver_features & bit != 0
    }

    /// Note config changes, then look at what the backend used and raise the interrupt.
    fn after_work(&mut self, result: Result<(), QueueError>) {
        if let Err(error) = result {
            self.fail(error);
            return;
        }
        let generation = self.backend.config_generation();
        if generation != self.config_generation {
            self.config_generation = generation;
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE;
        }
        for index in 0..self.queues.len() {
            if !self.queues[index].is_ready() {
                continue;
            }
            match self.queues[index].needs_notification(&self.memory) {
                Ok(true) => self.interrupt_status |= INTERRUPT_USED_BUFFER,
                Ok(false) => {}
                Err(error) => {
                    self.fail(error);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, error: QueueError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE;
        }
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
        self.error = None;
        self.backend.reset();
        self.config_generation = self.backend.config_generation();
    }

    fn notify(&mut self, queue: u32) {
        let Ok(index) = u16::try_from(queue) else {
            return;
        };
        if !self.running()
            || !self
                .queues
                .get(usize::from(index))
                .is_some_and(Queue::is_ready)
        {
            return;
        }
        let result = self.backend.notify(
            index,
            &mut self.queues,
            &mut self.memory as &mut dyn GuestMemory,
        );
        self.after_work(result);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        let old = self.status;
        if value & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device_features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & feature::VERSION_1 != 0;
            if !acceptable {
                value &= !status::FEATURES_OK;
            }
        }
        // DRIVER_OK without FEATURES_OK is a driver bug: do not start the device.
        if value & status::FEATURES_OK == 0 {
            value &= !status::DRIVER_OK;
        }
        self.status = value | (old & status::DEVICE_NEEDS_RESET);
        if value & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 && self.error.is_none() {
            self.backend.activate(self.driver_features);
            // Chains made available before DRIVER_OK are handled now.
            for index in 0..self.queues.len() {
                if self.queues[index].is_ready() {
                    self.notify(index as u32);
                }
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The selected queue if the driver may program it (it exists and is not ready).
    fn programmable_queue(&mut self) -> Option<&mut Queue> {
        self.selected_queue().filter(|q| !q.is_ready())
    }

    fn write_queue_ready(&mut self, value: u32) {
        let event_index = self.negotiated(feature::RING_EVENT_IDX);
        let indirect = self.negotiated(feature::RING_INDIRECT_DESC);
        let Some(queue) = self.queues.get_mut(self.queue_select as usize) else {
            return;
        };
        if value == 0 {
            queue.reset();
            return;
        }
        if queue.is_ready() {
            return;
        }
        queue.set_ring_features(event_index, indirect);
        if let Err(error) = queue.activate(&self.memory) {
            self.fail(error);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.backend.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.is_ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.backend.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_open = self.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES if features_open => {
                let value = u64::from(value);
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.programmable_queue() {
                    q.set_size(u16::try_from(value).unwrap_or(0));
                }
            }
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => self.write_queue_address(offset, value),
            _ => {}
        }
    }

    fn write_queue_address(&mut self, offset: u64, value: u32) {
        let Some(q) = self.programmable_queue() else {
            return;
        };
        let old = match offset & !0xf {
            reg::QUEUE_DESC_LOW => q.descriptor_table(),
            reg::QUEUE_DRIVER_LOW => q.available_ring(),
            reg::QUEUE_DEVICE_LOW => q.used_ring(),
            _ => return,
        };
        let new = match offset & 0xf {
            0 => (old & !0xffff_ffff) | u64::from(value),
            4 => (old & 0xffff_ffff) | (u64::from(value) << 32),
            _ => return,
        };
        match offset & !0xf {
            reg::QUEUE_DESC_LOW => q.set_descriptor_table(new),
            reg::QUEUE_DRIVER_LOW => q.set_available_ring(new),
            _ => q.set_used_ring(new),
        }
    }
}

impl<B: VirtioBackend, M: GuestMemory> MmioDevice for VirtioMmio<B, M> {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= reg::CONFIG {
            let size = usize::from(size.min(8));
            let mut bytes = [0u8; 8];
            self.backend
                .read_config(offset - reg::CONFIG, &mut bytes[..size]);
            return u64::from_le_bytes(bytes);
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return 0;
        }
        u64::from(self.read_register(offset))
    }

    fn write(&mut self, offset: u64, size: u8, value: u64) {
        if offset != reg::INTERRUPT_ACK {
            self.touched = true;
        }
        if offset >= reg::CONFIG {
            let size = usize::from(size.min(8));
            let bytes = value.to_le_bytes();
            self.backend
                .write_config(offset - reg::CONFIG, &bytes[..size]);
            return;
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, value as u32);
    }
}

/// A Linux-like driver for this crate's tests: the register sequence of `virtio_mmio.c`.
#[cfg(test)]
pub(crate) mod test_transport {
    use super::*;
    use crate::guest_memory::VecMemory;
    use crate::virtio::queue::test_driver::Driver;

    /// Read a register.
    pub fn read<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>, offset: u64) -> u32 {
        d.read(offset, 4) as u32
    }

    /// Write a register.
    pub fn write<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>, offset: u64, value: u32) {
        d.write(offset, 4, u64::from(value))
    }

    /// Features the device offers, as the driver reads them.
    pub fn device_features<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>) -> u64 {
        write(d, reg::DEVICE_FEATURES_SEL, 1);
        let high = read(d, reg::DEVICE_FEATURES);
        write(d, reg::DEVICE_FEATURES_SEL, 0);
        let low = read(d, reg::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Reset, acknowledge, negotiate `features`; returns whether FEATURES_OK stuck.
    pub fn negotiate<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>, features: u64) -> bool {
        write(d, reg::STATUS, 0);
        write(d, reg::STATUS, status::ACKNOWLEDGE);
        write(d, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(d, reg::DRIVER_FEATURES_SEL, 1);
        write(d, reg::DRIVER_FEATURES, (features >> 32) as u32);
        write(d, reg::DRIVER_FEATURES_SEL, 0);
        write(d, reg::DRIVER_FEATURES, features as u32);
        write(
            d,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        read(d, reg::STATUS) & status::FEATURES_OK != 0
    }

    /// Program queue `index` with `driver`'s layout and set it ready.
    pub fn setup_queue<B: VirtioBackend>(
        d: &mut VirtioMmio<B, VecMemory>,
        index: u32,
        driver: &Driver,
    ) {
        write(d, reg::QUEUE_SEL, index);
        assert_eq!(read(d, reg::QUEUE_READY), 0);
        assert!(read(d, reg::QUEUE_NUM_MAX) >= u32::from(driver.size));
        write(d, reg::QUEUE_NUM, u32::from(driver.size));
        for (low, address) in [
            (reg::QUEUE_DESC_LOW, driver.descriptors),
            (reg::QUEUE_DRIVER_LOW, driver.available),
            (reg::QUEUE_DEVICE_LOW, driver.used),
        ] {
            write(d, low, address as u32);
            write(d, low + 4, (address >> 32) as u32);
        }
        write(d, reg::QUEUE_READY, 1);
    }

    /// Set DRIVER_OK.
    pub fn driver_ok<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>) {
        let s = read(d, reg::STATUS);
        write(d, reg::STATUS, s | status::DRIVER_OK);
    }

    /// Negotiate `features`, set up one queue per driver (queue i at 0x1000 + 0x1000 * i,
    /// `size` entries), DRIVER_OK. Returns the drivers.
    pub fn bring_up<B: VirtioBackend>(
        d: &mut VirtioMmio<B, VecMemory>,
        features: u64,
        queues: u32,
        size: u16,
    ) -> Vec<Driver> {
        assert!(negotiate(d, features));
        let drivers: Vec<Driver> = (0..queues)
            .map(|i| Driver::new(size, 0x1000 + 0x1000 * u64::from(i)))
            .collect();
        for (i, driver) in drivers.iter().enumerate() {
            setup_queue(d, i as u32, driver);
        }
        driver_ok(d);
        assert_eq!(d.error(), None);
        drivers
    }

    /// Take the interrupt as Linux's `vm_interrupt` does: read the status, acknowledge it.
    pub fn take_interrupt<B: VirtioBackend>(d: &mut VirtioMmio<B, VecMemory>) -> u32 {
        let pending = read(d, reg::INTERRUPT_STATUS);
        write(d, reg::INTERRUPT_ACK, pending);
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::test_transport::*;
    use super::*;
    use crate::guest_memory::VecMemory;
    use crate::virtio::queue::test_driver::Driver;
    use crate::virtio::queue::{AVAIL_F_NO_INTERRUPT, DESC_F_NEXT};
    use alloc::boxed::Box;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    const DATA: u64 = 0x8000;
    const FEATURE_TEST: u64 = 1 << 3;

    /// A test backend: two queues; every chain comes back with its readable length.
    #[derive(Default)]
    struct Echo {
        notified: Vec<u16>,
        activated: Option<u64>,
        resets: u32,
        config: [u8; 8],
        generation: u32,
        polls: u32,
    }

    impl VirtioBackend for Echo {
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            FEATURE_TEST
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = *b;
                }
            }
        }
        fn config_generation(&self) -> u32 {
            self.generation
        }
        fn activate(&mut self, features: u64) {
            self.activated = Some(features);
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn notify(
            &mut self,
            queue: u16,
            queues: &mut [Queue],
            memory: &mut dyn GuestMemory,
        ) -> Result<(), QueueError> {
            self.notified.push(queue);
            let q = &mut queues[usize::from(queue)];
            while let Some(chain) = q.pop(&*memory)? {
                q.add_used(memory, chain.head(), chain.readable_length() as u32)?;
            }
            q.enable_notification(memory)?;
            Ok(())
        }
        fn poll(
            &mut self,
            _queues: &mut [Queue],
            _memory: &mut dyn GuestMemory,
        ) -> Result<(), QueueError> {
            self.polls += 1;
            Ok(())
        }
    }

    fn device() -> VirtioMmio<Echo, VecMemory> {
        VirtioMmio::new(Echo::default(), VecMemory::new(0, 0x10000))
    }

    const ALL: u64 = FEATURE_TEST | TRANSPORT_FEATURES;

    #[test]
    fn identification() {
        let mut d = device();
        assert_eq!(read(&mut d, reg::MAGIC_VALUE), MAGIC);
        assert_eq!(read(&mut d, reg::MAGIC_VALUE).to_le_bytes(), *b"virt");
        assert_eq!(read(&mut d, reg::VERSION), 2);
        assert_eq!(read(&mut d, reg::DEVICE_ID), 42);
        assert_eq!(read(&mut d, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(read(&mut d, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(read(&mut d, reg::SHM_LEN_HIGH), u32::MAX);
        assert_eq!(read(&mut d, reg::SHM_BASE_LOW), 0);
        assert_eq!(read(&mut d, 0x0c4), 0, "unknown registers read 0");
        // Registers take 32-bit aligned accesses only.
        assert_eq!(d.read(reg::MAGIC_VALUE, 1), 0);
        assert_eq!(d.read(reg::MAGIC_VALUE, 8), 0);
        assert_eq!(d.read(reg::MAGIC_VALUE + 2, 4), 0);
        d.write(reg::STATUS, 1, 1);
        assert_eq!(d.status(), 0);
        assert_eq!(d.read(reg::STATUS, 2), 0);
    }

    #[test]
    fn features_are_offered_and_negotiated() {
        let mut d = device();
        assert_eq!(device_features(&mut d), ALL);
        write(&mut d, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&mut d, reg::DEVICE_FEATURES), 0);
        // A feature not offered, or no VERSION_1: FEATURES_OK does not stick.
        assert!(!negotiate(&mut d, ALL | 1 << 40));
        assert!(!negotiate(&mut d, FEATURE_TEST));
        assert!(!negotiate(&mut d, 0));
        // DRIVER_OK without FEATURES_OK is not taken.
        driver_ok(&mut d);
        assert_eq!(d.status() & status::DRIVER_OK, 0);
        assert_eq!(d.backend().activated, None);
        assert!(negotiate(&mut d, feature::VERSION_1 | FEATURE_TEST));
        assert_eq!(d.driver_features(), feature::VERSION_1 | FEATURE_TEST);
        // Feature writes after FEATURES_OK are ignored.
        write(&mut d, reg::DRIVER_FEATURES_SEL, 0);
        write(&mut d, reg::DRIVER_FEATURES, 0xffff_ffff);
        write(&mut d, reg::DRIVER_FEATURES_SEL, 5);
        write(&mut d, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(d.driver_features(), feature::VERSION_1 | FEATURE_TEST);
        driver_ok(&mut d);
        assert_eq!(
            d.backend().activated,
            Some(feature::VERSION_1 | FEATURE_TEST)
        );
    }

    #[test]
    fn queue_registers() {
        let mut d = device();
        assert!(negotiate(&mut d, ALL));
        write(&mut d, reg::QUEUE_SEL, 1);
        assert_eq!(read(&mut d, reg::QUEUE_NUM_MAX), 8);
        write(&mut d, reg::QUEUE_SEL, 2);
        assert_eq!(read(&mut d, reg::QUEUE_NUM_MAX), 0, "no queue 2");
        write(&mut d, reg::QUEUE_NUM, 4);
        write(&mut d, reg::QUEUE_READY, 1);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 0);
        let driver = Driver::new(16, 0x3000);
        setup_queue(&mut d, 0, &driver);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 1);
        let q = &d.queues()[0];
        assert_eq!(
            (
                q.size(),
                q.descriptor_table(),
                q.available_ring(),
                q.used_ring()
            ),
            (16, driver.descriptors, driver.available, driver.used)
        );
        // Writes to a ready queue are ignored.
        write(&mut d, reg::QUEUE_NUM, 2);
        write(&mut d, reg::QUEUE_DESC_LOW, 0x100);
        write(&mut d, reg::QUEUE_DEVICE_HIGH, 1);
        assert_eq!(d.queues()[0].size(), 16);
        assert_eq!(d.queues()[0].descriptor_table(), driver.descriptors);
        assert_eq!(d.queues()[0].used_ring(), driver.used);
        // Writing 0 to QueueReady takes the queue down (Linux's vm_del_vq reads it back).
        write(&mut d, reg::QUEUE_READY, 0);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 0);
        assert_eq!(d.queues()[0].descriptor_table(), 0);
        // High halves of addresses.
        write(&mut d, reg::QUEUE_DESC_HIGH, 0x1234);
        assert_eq!(d.queues()[0].descriptor_table(), 0x1234 << 32);
        write(&mut d, reg::QUEUE_NUM, 0x1_0000);
        assert_eq!(d.queues()[0].size(), 0, "a size past 16 bits becomes 0");
        assert_eq!(d.error(), None);
    }

    #[test]
    fn bad_queue_configuration_needs_reset() {
        let mut d = device();
        assert!(negotiate(&mut d, ALL));
        let mut driver = Driver::new(16, 0x1000);
        driver.used += 2; // misaligned
        setup_queue(&mut d, 0, &driver);
        assert_eq!(read(&mut d, reg::QUEUE_READY), 0);
        assert!(matches!(d.error(), Some(QueueError::Misaligned { .. })));
        assert_ne!(read(&mut d, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The driver cannot clear DEVICE_NEEDS_RESET except by a reset.
        write(&mut d, reg::STATUS, status::ACKNOWLEDGE);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        write(&mut d, reg::STATUS, 0);
        assert_eq!((d.status(), d.error()), (0, None));
        // A ring outside guest memory.
        assert!(negotiate(&mut d, ALL));
        setup_queue(&mut d, 0, &Driver::new(16, 0xff00));
        assert!(matches!(d.error(), Some(QueueError::RingOutOfRange { .. })));
        // A size that is not a power of two.
        assert!(negotiate(&mut d, ALL));
        setup_queue(&mut d, 0, &Driver::new(12, 0x1000));
        assert_eq!(d.error(), Some(QueueError::InvalidSize(12)));
    }

    #[test]
    fn notify_uses_buffers_and_interrupts() {
        let mut d = device();
        let mut drivers = bring_up(&mut d, feature::VERSION_1, 2, 8);
        assert_eq!(
            d.backend().notified,
            [0, 1],
            "DRIVER_OK looks at every queue"
        );
        d.backend_mut().notified.clear();
        let mut m = d.memory().clone();
        let head = drivers[1].add_chain(&mut m, &[(DATA, 10, false), (DATA + 10, 5, true)]);
        *d.memory_mut() = m;
        assert!(!d.irq_level());
        write(&mut d, reg::QUEUE_NOTIFY, 1);
        assert_eq!(d.backend().notified, [1]);
        assert!(d.irq_level());
        assert_eq!(drivers[1].used_index(d.memory()), 1);
        assert_eq!(drivers[1].used_entry(d.memory(), 0), (u32::from(head), 10));
        assert_eq!(take_interrupt(&mut d), INTERRUPT_USED_BUFFER);
        assert!(!d.irq_level());
        // Notifies of queues that do not exist, or past 16 bits, are ignored.
        write(&mut d, reg::QUEUE_NOTIFY, 2);
        write(&mut d, reg::QUEUE_NOTIFY, 0x1_0001);
        assert_eq!(d.backend().notified, [1]);
        // The driver suppresses interrupts (no EVENT_IDX negotiated): buffers used, no IRQ.
        let mut m = d.memory().clone();
        m.write_u16(drivers[0].available, AVAIL_F_NO_INTERRUPT)
            .unwrap();
        drivers[0].add_chain(&mut m, &[(DATA, 1, false)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(drivers[0].used_index(d.memory()), 1);
        assert!(!d.irq_level());
    }

    #[test]
    fn event_index_when_negotiated() {
        let mut d = device();
        let mut drivers = bring_up(&mut d, feature::VERSION_1 | feature::RING_EVENT_IDX, 1, 8);
        let used_event = drivers[0].available + 4 + 2 * 8;
        let avail_event = drivers[0].used + 4 + 8 * 8;
        let mut m = d.memory().clone();
        m.write_u16(used_event, 1).unwrap(); // interrupt after the second used entry
        drivers[0].add_chain(&mut m, &[(DATA, 1, false)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert!(!d.irq_level());
        assert_eq!(d.memory().read_u16(avail_event), Ok(1));
        let mut m = d.memory().clone();
        drivers[0].add_chain(&mut m, &[(DATA, 1, false)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert!(d.irq_level());
        assert_eq!(d.memory().read_u16(avail_event), Ok(2));
    }

    #[test]
    fn buffers_before_driver_ok_wait_for_it() {
        let mut d = device();
        assert!(negotiate(&mut d, ALL));
        let mut driver = Driver::new(8, 0x1000);
        setup_queue(&mut d, 0, &driver);
        let mut m = d.memory().clone();
        driver.add_chain(&mut m, &[(DATA, 3, false)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        d.poll();
        assert!(d.backend().notified.is_empty());
        assert_eq!(d.backend().polls, 0);
        assert_eq!(driver.used_index(d.memory()), 0);
        driver_ok(&mut d);
        assert_eq!(d.backend().notified, [0]);
        assert_eq!(driver.used_index(d.memory()), 1);
        assert!(d.irq_level());
        d.poll();
        assert_eq!(d.backend().polls, 1);
    }

    #[test]
    fn polls_only_when_something_can_have_changed() {
        let mut d = device();
        bring_up(&mut d, ALL, 1, 8);
        d.poll();
        let polls = d.backend().polls;
        // Nothing written since: no poll, unless the caller knows of news.
        d.poll_if(false);
        assert_eq!(d.backend().polls, polls);
        d.poll_if(true);
        assert_eq!(d.backend().polls, polls + 1);
        // Reading the interrupt status and acknowledging it change nothing the device works
        // on; any other write does.
        let _ = read(&mut d, reg::INTERRUPT_STATUS);
        write(&mut d, reg::INTERRUPT_ACK, 1);
        d.poll_if(false);
        assert_eq!(d.backend().polls, polls + 1);
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        d.poll_if(false);
        assert_eq!(d.backend().polls, polls + 2);
        d.poll_if(false);
        assert_eq!(d.backend().polls, polls + 2, "once per write");
        d.write(reg::CONFIG, 1, 7);
        d.poll_if(false);
        assert_eq!(d.backend().polls, polls + 3, "a configuration write too");
    }

    #[test]
    fn hostile_chain_breaks_the_device_until_reset() {
        let mut d = device();
        let drivers = bring_up(&mut d, ALL, 1, 8);
        d.backend_mut().notified.clear();
        let mut m = d.memory().clone();
        drivers[0].set_descriptor(&mut m, 0, DATA, 1, DESC_F_NEXT, 0);
        let mut driver = Driver::new(8, 0x1000);
        driver.publish(&mut m, 0);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.error(), Some(QueueError::ChainTooLong));
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(take_interrupt(&mut d), INTERRUPT_CONFIG_CHANGE);
        // Nothing is processed any more.
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        d.poll();
        assert_eq!(d.backend().notified, [0]);
        assert_eq!(d.backend().polls, 0);
        // A reset brings it back.
        write(&mut d, reg::STATUS, 0);
        assert_eq!(d.backend().resets, 2, "one reset in bring-up, one now");
        assert_eq!(d.error(), None);
        assert!(d.queues().iter().all(|q| !q.is_ready()));
        assert_eq!((d.interrupt_status(), d.driver_features()), (0, 0));
        d.memory_mut().bytes_mut().fill(0); // the new driver's fresh rings
        bring_up(&mut d, ALL, 1, 8);
    }

    #[test]
    fn available_index_jump_breaks_the_device() {
        let mut d = device();
        let drivers = bring_up(&mut d, ALL, 1, 8);
        d.memory_mut()
            .write_u16(drivers[0].available + 2, 100)
            .unwrap();
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert!(matches!(
            d.error(),
            Some(QueueError::AvailableIndexJump { .. })
        ));
    }

    #[test]
    fn configuration_space() {
        let mut d = device();
        d.backend_mut().config = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(d.read(reg::CONFIG, 1), 1);
        assert_eq!(d.read(reg::CONFIG + 1, 2), 0x0302);
        assert_eq!(d.read(reg::CONFIG + 4, 4), 0x0807_0605);
        assert_eq!(d.read(reg::CONFIG, 8), 0x0807_0605_0403_0201);
        assert_eq!(d.read(reg::CONFIG + 6, 4), 0x0807, "past the end reads 0");
        assert_eq!(d.read(0xfff, 4), 0);
        d.write(reg::CONFIG + 2, 2, 0xaabb);
        assert_eq!(d.backend().config[2..4], [0xbb, 0xaa]);
        // A change of generation raises the configuration interrupt once running.
        bring_up(&mut d, ALL, 0, 8);
        assert_eq!(read(&mut d, reg::CONFIG_GENERATION), 0);
        d.backend_mut().generation = 1;
        assert_eq!(read(&mut d, reg::CONFIG_GENERATION), 1);
        d.poll();
        assert_eq!(take_interrupt(&mut d), INTERRUPT_CONFIG_CHANGE);
        d.poll();
        assert!(!d.irq_level());
    }

    #[test]
    fn on_the_bus_through_a_shared_handle() {
        let device = Rc::new(RefCell::new(device()));
        let mut bus = crate::mmio::MmioBus::new();
        bus.register(0xd000_0000, WINDOW_SIZE, Box::new(device.clone()))
            .unwrap();
        assert_eq!(bus.read(0xd000_0000, 4), Some(u64::from(MAGIC)));
        assert_eq!(bus.read(0xd000_0008, 4), Some(42));
        assert!(bus.write(0xd000_0070, 4, 1));
        assert_eq!(device.borrow().status(), status::ACKNOWLEDGE);
        assert!(!device.borrow().irq_level());
    }
}
