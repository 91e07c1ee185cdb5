//! A virtio console (device ID 3, virtio 1.2 §5.3) with one port and no MULTIPORT: queue 0
//! receives (host to guest), queue 1 transmits (guest to host). Linux drives it as `hvc0`.
//!
//! What the guest transmits goes to a [`ConsoleSink`] in chunks as it is read from guest
//! memory (no copy is allocated), with a [`ConsoleSink::flush`] after each batch of chains
//! (each notify that transmitted anything):
//! the VMM buffers and prints. Input from outside is queued with
//! [`VirtioConsole::queue_input`] (at most [`INPUT_CAPACITY`] bytes wait) and copied into the
//! guest's receive buffers when the VMM calls [`super::mmio::VirtioMmio::poll`] or the guest
//! adds buffers. With a size ([`VirtioConsole::with_size`]) the device offers
//! `VIRTIO_CONSOLE_F_SIZE` and reports columns and rows in its configuration space.

use super::mmio::VirtioBackend;
use super::queue::{Queue, QueueError};
use super::{copy_config, device_id};
use crate::guest_memory::GuestMemory;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// The receive queue (host to guest).
pub const RECEIVE_QUEUE: u16 = 0;
/// The transmit queue (guest to host).
pub const TRANSMIT_QUEUE: u16 = 1;
/// The console reports its size (cols, rows) in the configuration space.
pub const F_SIZE: u64 = 1 << 0;
/// The maximum size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Input bytes that may wait for receive buffers; beyond this, input is refused.
pub const INPUT_CAPACITY: usize = 4096;
/// Bytes of the configuration space (cols, rows, max_nr_ports, emerg_wr).
pub const CONFIG_SIZE: usize = 12;
/// Bytes read from guest memory at a time on transmit.
const CHUNK: usize = 256;

/// Where transmitted bytes go.
pub trait ConsoleSink {
    /// Bytes the guest wrote, in order.
    fn write(&mut self, bytes: &[u8]);
    /// The end of a batch: a good moment to print what was buffered.
    fn flush(&mut self) {}
}

/// Collects the output (for tests, or a VMM that drains it itself).
impl ConsoleSink for Vec<u8> {
    fn write(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The console backend.
pub struct VirtioConsole<S> {
    sink: S,
    input: VecDeque<u8>,
    size: Option<(u16, u16)>,
    generation: u32,
}

impl<S: ConsoleSink> VirtioConsole<S> {
    /// A console without a size, writing to `sink`.
    pub fn new(sink: S) -> Self {
        VirtioConsole {
            sink,
            input: VecDeque::new(),
            size: None,
            generation: 0,
        }
    }

    /// A console that offers `VIRTIO_CONSOLE_F_SIZE` with `columns` x `rows`.
    pub fn with_size(sink: S, columns: u16, rows: u16) -> Self {
        VirtioConsole {
            size: Some((columns, rows)),
            ..VirtioConsole::new(sink)
        }
    }

    /// Change the reported size (only for a console made [`VirtioConsole::with_size`]; the
    /// driver is told with a configuration-change interrupt at the next poll).
    pub fn resize(&mut self, columns: u16, rows: u16) {
        if self.size.is_some() {
            self.size = Some((columns, rows));
            self.generation = self.generation.wrapping_add(1);
        }
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// The sink, writable (to drain it).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Queue bytes for the guest; returns how many were taken (the rest do not fit in
    /// [`INPUT_CAPACITY`]).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_CAPACITY.saturating_sub(self.input.len());
        let taken = bytes.len().min(room);
        self.input.extend(&bytes[..taken]);
        taken
    }

    /// Bytes waiting for receive buffers.
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        let mut chunk = [0u8; CHUNK];
        let mut any = false;
        loop {
            while let Some(chain) = queue.pop(&*memory)? {
                any = true;
                let mut offset = 0u64;
                loop {
                    let n = chain.read(&*memory, offset, &mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    self.sink.write(&chunk[..n]);
                    offset += n as u64;
                }
                queue.add_used(memory, chain.head(), 0)?;
            }
            if !queue.enable_notification(memory)? {
                break;
            }
        }
        if any {
            self.sink.flush();
        }
        Ok(())
    }

    fn receive(
        &mut self,
        queue: &mut Queue,
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        loop {
            while !self.input.is_empty() {
                let Some(chain) = queue.pop(&*memory)? else {
                    break;
                };
                let room = chain.writable_length();
                let (first, second) = self.input.as_slices();
                let mut written = chain.write(memory, 0, first)?;
                if written == first.len() {
                    written += chain.write(memory, written as u64, second)?;
                }
                debug_assert!(written as u64 <= room);
                self.input.drain(..written);
                queue.add_used(memory, chain.head(), written as u32)?;
            }
            if self.input.is_empty() || !queue.enable_notification(memory)? {
                return Ok(());
            }
        }
    }

    fn work(
        &mut self,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        if let Some(queue) = queues.get_mut(usize::from(TRANSMIT_QUEUE)) {
            if queue.is_ready() {
                self.transmit(queue, memory)?;
            }
        }
        if let Some(queue) = queues.get_mut(usize::from(RECEIVE_QUEUE)) {
            if queue.is_ready() {
                self.receive(queue, memory)?;
            }
        }
        Ok(())
    }
}

impl<S: ConsoleSink> VirtioBackend for VirtioConsole<S> {
    fn device_id(&self) -> u32 {
        device_id::CONSOLE
    }

    fn features(&self) -> u64 {
        if self.size.is_some() {
            F_SIZE
        } else {
            0
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let (columns, rows) = self.size.unwrap_or((0, 0));
        let mut config = [0u8; CONFIG_SIZE];
        config[0..2].copy_from_slice(&columns.to_le_bytes());
        config[2..4].copy_from_slice(&rows.to_le_bytes());
        config[4..8].copy_from_slice(&1u32.to_le_bytes()); // max_nr_ports
        copy_config(&config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn reset(&mut self) {
        // Queued input stays for the next driver; the size stays.
    }

    fn notify(
        &mut self,
        _queue: u16,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        self.work(queues, memory)
    }

    fn poll(
        &mut self,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        self.work(queues, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_memory::VecMemory;
    use crate::mmio::MmioDevice;
    use crate::virtio::feature;
    use crate::virtio::mmio::test_transport::*;
    use crate::virtio::mmio::{reg, VirtioMmio, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};
    use crate::virtio::queue::test_driver::Driver;
    use crate::virtio::queue::DESC_F_NEXT;

    const DATA: u64 = 0x8000;
    const RX: usize = RECEIVE_QUEUE as usize;
    const TX: usize = TRANSMIT_QUEUE as usize;

    /// Records writes and batch ends.
    #[derive(Default)]
    struct Recorder {
        bytes: Vec<u8>,
        writes: usize,
        flushes: usize,
    }

    impl ConsoleSink for Recorder {
        fn write(&mut self, bytes: &[u8]) {
            assert!(bytes.len() <= CHUNK);
            self.bytes.extend_from_slice(bytes);
            self.writes += 1;
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
    }

    type Console = VirtioMmio<VirtioConsole<Recorder>, VecMemory>;

    fn console(features: u64) -> (Console, Vec<Driver>) {
        let mut d = VirtioMmio::new(
            VirtioConsole::new(Recorder::default()),
            VecMemory::new(0, 0x20000),
        );
        let drivers = bring_up(&mut d, feature::VERSION_1 | features, 2, 16);
        (d, drivers)
    }

    /// Run `f` on a copy of the device's memory and put it back (the driver side).
    fn guest(d: &mut Console, f: impl FnOnce(&mut VecMemory)) {
        let mut m = d.memory().clone();
        f(&mut m);
        *d.memory_mut() = m;
    }

    #[test]
    fn identity_and_config() {
        let (mut d, _) = console(0);
        assert_eq!(read(&mut d, reg::DEVICE_ID), 3);
        assert_eq!(device_features(&mut d) & F_SIZE, 0);
        assert_eq!(d.read(reg::CONFIG + 4, 4), 1, "max_nr_ports");
        let mut sized = VirtioMmio::new(
            VirtioConsole::with_size(Vec::new(), 80, 25),
            VecMemory::new(0, 0x20000),
        );
        assert_ne!(device_features(&mut sized) & F_SIZE, 0);
        assert_eq!(sized.read(reg::CONFIG, 2), 80);
        assert_eq!(sized.read(reg::CONFIG + 2, 2), 25);
        assert_eq!(sized.read(reg::CONFIG + 12, 4), 0);
        bring_up(&mut sized, feature::VERSION_1 | F_SIZE, 2, 16);
        sized.backend_mut().resize(132, 43);
        sized.poll();
        assert_eq!(take_interrupt(&mut sized), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(read(&mut sized, reg::CONFIG_GENERATION), 1);
        assert_eq!(sized.read(reg::CONFIG, 4), 43 << 16 | 132);
        // Without a size, resizing changes nothing.
        d.backend_mut().resize(1, 1);
        d.poll();
        assert!(!d.irq_level());
    }

    #[test]
    fn transmit_goes_to_the_sink_in_batches() {
        let (mut d, mut drivers) = console(0);
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let heads = {
            let mut heads = Vec::new();
            let dr = &mut drivers[TX];
            guest(&mut d, |m| {
                m.write(DATA, &text).unwrap();
                heads.push(dr.add_chain(m, &[(DATA, 600, false), (DATA + 600, 300, false)]));
                heads.push(dr.add_chain(m, &[(DATA + 900, 100, false)]));
            });
            heads
        };
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        let sink = d.backend().sink();
        assert_eq!(sink.bytes, text);
        assert!(sink.writes >= 5, "chunks of at most {CHUNK}");
        assert_eq!(sink.flushes, 1, "one batch");
        assert_eq!(drivers[TX].used_index(d.memory()), 2);
        assert_eq!(drivers[TX].used_entry(d.memory(), 0), (heads[0].into(), 0));
        assert_eq!(drivers[TX].used_entry(d.memory(), 1), (heads[1].into(), 0));
        assert_eq!(take_interrupt(&mut d), INTERRUPT_USED_BUFFER);
        // Writable descriptors in a transmit chain are skipped.
        guest(&mut d, |m| {
            m.write(DATA, b"xyz").unwrap();
            drivers[TX].add_chain(m, &[(DATA, 3, false), (DATA + 3, 50, true)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(d.backend().sink().bytes.ends_with(b"xyz"));
        assert_eq!(d.backend().sink().bytes.len(), 1003);
        d.backend_mut().sink_mut().bytes.clear();
    }

    #[test]
    fn input_fills_receive_buffers() {
        let (mut d, mut drivers) = console(feature::RING_EVENT_IDX);
        assert_eq!(d.backend_mut().queue_input(b"hello, world"), 12);
        assert_eq!(d.backend().pending_input(), 12);
        // No buffers yet: the input waits.
        d.poll();
        assert_eq!(d.backend().pending_input(), 12);
        assert!(!d.irq_level());
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(DATA, 5, true)]);
            drivers[RX].add_chain(m, &[(DATA + 100, 4, true), (DATA + 200, 4, true)]);
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert_eq!(d.backend().pending_input(), 0);
        let m = d.memory();
        assert_eq!(drivers[RX].used_entry(m, 0), (0, 5));
        assert_eq!(drivers[RX].used_entry(m, 1), (1, 7));
        assert_eq!(&m.bytes()[DATA as usize..][..5], b"hello");
        assert_eq!(&m.bytes()[DATA as usize + 100..][..4], b", wo");
        assert_eq!(&m.bytes()[DATA as usize + 200..][..4], b"rld\0");
        assert!(d.irq_level());
        take_interrupt(&mut d);
        // More input than buffers: the rest waits for the next buffers, delivered on poll.
        d.backend_mut().queue_input(b"abcdefgh");
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(DATA, 3, true)]);
        });
        d.poll();
        assert_eq!(d.backend().pending_input(), 5);
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(DATA + 10, 64, true)]);
        });
        d.poll();
        assert_eq!(d.backend().pending_input(), 0);
        assert_eq!(&d.memory().bytes()[DATA as usize + 10..][..5], b"defgh");
        assert_eq!(drivers[RX].used_entry(d.memory(), 3), (4, 5));
    }

    #[test]
    fn input_wraps_in_the_deque() {
        let (mut d, mut drivers) = console(0);
        d.backend_mut().queue_input(&[1; 4000]);
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(DATA, 3990, true)]);
        });
        d.poll();
        // The deque's storage now wraps around.
        d.backend_mut().queue_input(&[2; 50]);
        guest(&mut d, |m| {
            drivers[RX].add_chain(m, &[(DATA, 100, true)]);
        });
        d.poll();
        let got = &d.memory().bytes()[DATA as usize..][..60];
        assert_eq!(&got[..10], &[1; 10]);
        assert_eq!(&got[10..], &[2; 50]);
        assert_eq!(drivers[RX].used_entry(d.memory(), 1), (1, 60));
    }

    #[test]
    fn input_is_bounded() {
        let (mut d, _) = console(0);
        assert_eq!(d.backend_mut().queue_input(&[0; 3000]), 3000);
        assert_eq!(
            d.backend_mut().queue_input(&[0; 3000]),
            INPUT_CAPACITY - 3000
        );
        assert_eq!(d.backend_mut().queue_input(b"x"), 0);
    }

    #[test]
    fn hostile_transmit_chain_breaks_the_device() {
        let (mut d, mut drivers) = console(0);
        guest(&mut d, |m| {
            drivers[TX].set_descriptor(m, 0, 0x1f_fff0, 0x100, 0, 0);
            drivers[TX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, TRANSMIT_QUEUE.into());
        assert!(matches!(
            d.error(),
            Some(QueueError::BufferOutOfRange { .. })
        ));
        assert!(d.backend().sink().bytes.is_empty());
        // So does a looping receive chain, once there is input for it.
        let (mut d, mut drivers) = console(0);
        guest(&mut d, |m| {
            drivers[RX].set_descriptor(m, 0, DATA, 1, DESC_F_NEXT | 2, 1);
            drivers[RX].set_descriptor(m, 1, DATA, 1, DESC_F_NEXT | 2, 0);
            drivers[RX].publish(m, 0);
        });
        write(&mut d, reg::QUEUE_NOTIFY, RECEIVE_QUEUE.into());
        assert_eq!(d.error(), None, "not looked at without input");
        d.backend_mut().queue_input(b"boom");
        d.poll();
        assert_eq!(d.error(), Some(QueueError::ChainTooLong));
    }
}
