//! Split virtqueues (virtio 1.2 §2.7), device side: the descriptor table, the available ring
//! the driver fills, the used ring the device fills, and notification suppression.
//!
//! Everything in guest memory is hostile. [`Queue::activate`] checks the size (a power of two
//! up to the device's maximum), the ring alignments (16, 2, 4) and that the three rings lie in
//! guest memory; [`Queue::pop`] refuses an available index that ran ahead by more than the
//! queue size, walks a chain for at most queue-size descriptors (so a loop ends as
//! [`QueueError::ChainTooLong`]), refuses descriptor indices past the table, byte totals past
//! `u32::MAX` (§2.7.5.2) and buffers outside guest memory. Each call does a bounded amount of
//! work and allocates at most one descriptor list (of at most size + maximum size entries).
//!
//! Indirect descriptors (`VIRTIO_F_INDIRECT_DESC`) are supported when the transport negotiated
//! them: one table per chain, as the last descriptor of the direct chain (INDIRECT together with
//! NEXT is refused), a length that is a non-zero multiple of 16 and at most as many entries as
//! the queue's maximum size (QueueNumMax, not the size the driver chose: Linux sizes a block
//! device's tables from `seg_max`, and may choose a smaller queue when memory is short), and
//! never INDIRECT inside the table (§2.7.5.3.1).
//!
//! `VIRTIO_F_EVENT_IDX` is supported: exits are what a guest pays most for here, and with it the
//! driver notifies only when the device asks ([`Queue::enable_notification`] publishes
//! `avail_event`) and the device interrupts only when the driver's `used_event` was passed
//! ([`Queue::needs_notification`]). Without it the ring flags are used (`VRING_USED_F_NO_NOTIFY`
//! and `VRING_AVAIL_F_NO_INTERRUPT`).

use crate::guest_memory::{GuestMemory, MemoryError};
use core::fmt;
use smallvec::SmallVec;

/// The descriptor continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const DESC_F_WRITE: u16 = 2;
/// The buffer is a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver does not want interrupts (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not want notifications (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// The largest queue size a split virtqueue can have.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes of one descriptor.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// One of the three areas of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table (QueueDesc).
    Descriptors,
    /// The available ring, written by the driver (QueueDriver).
    Available,
    /// The used ring, written by the device (QueueDevice).
    Used,
}

/// Why a queue operation failed; every one is the guest's fault (or the transport's, for
/// [`QueueError::NotReady`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The queue was used before it was activated.
    NotReady,
    /// The queue size is zero, not a power of two, or above the maximum.
    InvalidSize(u16),
    /// A ring address breaks its alignment (16 for descriptors, 2 available, 4 used).
    Misaligned {
        /// Which ring.
        ring: Ring,
        /// Its guest-physical address.
        address: u64,
    },
    /// A ring does not fit in guest memory.
    RingOutOfRange {
        /// Which ring.
        ring: Ring,
        /// Its guest-physical address.
        address: u64,
    },
    /// The driver's available index is more than a queue size ahead of the device's.
    AvailableIndexJump {
        /// Where the device is.
        next: u16,
        /// The index the driver published.
        available: u16,
    },
    /// A chain head or `next` field names a descriptor past the (direct or indirect) table.
    DescriptorIndex(u16),
    /// A chain has more descriptors than its table (so it loops).
    ChainTooLong,
    /// A chain's lengths add up to more than `u32::MAX` bytes.
    LengthOverflow,
    /// A buffer is not entirely in guest memory.
    BufferOutOfRange {
        /// The buffer's guest-physical address.
        address: u64,
        /// Its length.
        length: u32,
    },
    /// An INDIRECT descriptor on a queue whose driver did not negotiate indirect descriptors.
    IndirectNotNegotiated,
    /// An INDIRECT descriptor inside an indirect table.
    NestedIndirect,
    /// An INDIRECT descriptor that also has NEXT set.
    IndirectWithNext,
    /// An indirect table that is empty, not a multiple of 16 bytes, larger than the queue's
    /// maximum size, or outside guest memory.
    BadIndirectTable {
        /// The table's guest-physical address.
        address: u64,
        /// Its length in bytes.
        length: u32,
    },
    /// A used entry for a head index past the queue.
    UsedIndex(u16),
    /// A ring access left guest memory.
    Memory(MemoryError),
}

impl From<MemoryError> for QueueError {
    fn from(error: MemoryError) -> Self {
        QueueError::Memory(error)
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueError::NotReady => write!(f, "queue used before it was made ready"),
            QueueError::InvalidSize(size) => write!(f, "invalid queue size {size}"),
            QueueError::Misaligned { ring, address } => {
                write!(f, "{ring:?} ring at {address:#x} is misaligned")
            }
            QueueError::RingOutOfRange { ring, address } => {
                write!(f, "{ring:?} ring at {address:#x} is outside guest memory")
            }
            QueueError::AvailableIndexJump { next, available } => write!(
                f,
                "available index {available} is more than a queue ahead of {next}"
            ),
            QueueError::DescriptorIndex(index) => {
                write!(f, "descriptor index {index} is past the table")
            }
            QueueError::ChainTooLong => write!(f, "descriptor chain longer than its table"),
            QueueError::LengthOverflow => write!(f, "descriptor chain longer than 4 GiB"),
            QueueError::BufferOutOfRange { address, length } => write!(
                f,
                "buffer {address:#x} + {length:#x} is outside guest memory"
            ),
            QueueError::IndirectNotNegotiated => {
                write!(f, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            }
            QueueError::NestedIndirect => write!(f, "indirect descriptor in an indirect table"),
            QueueError::IndirectWithNext => write!(f, "indirect descriptor with NEXT set"),
            QueueError::BadIndirectTable { address, length } => {
                write!(f, "bad indirect table at {address:#x}, {length} bytes")
            }
            QueueError::UsedIndex(head) => write!(f, "used entry for head {head} past the queue"),
            QueueError::Memory(error) => write!(f, "{error}"),
        }
    }
}

/// One buffer of a chain, already checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Device-writable (otherwise device-readable).
    pub writable: bool,
}

/// A descriptor chain taken from the available ring: its head index (to hand back with
/// [`Queue::add_used`]) and its buffers in order, indirect tables flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    /// Inline up to [`INLINE_DESCRIPTORS`]: a network device pops a chain per receive buffer
    /// (one descriptor each, some 20 per 64 KiB frame) and per transmitted frame, and a heap
    /// allocation per chain cost its VMM about 0.3 instructions per byte moved.
    descriptors: SmallVec<[Descriptor; INLINE_DESCRIPTORS]>,
}

/// Buffers of a chain kept without a heap allocation.
pub const INLINE_DESCRIPTORS: usize = 4;

impl Chain {
    /// The head descriptor index.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The buffers in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_length(&self) -> u64 {
        self.length(false)
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_length(&self) -> u64 {
        self.length(true)
    }

    fn length(&self, writable: bool) -> u64 {
        self.descriptors
            .iter()
            .filter(|d| d.writable == writable)
            .map(|d| u64::from(d.length))
            .sum()
    }

    /// Copy bytes from the device-readable buffers, taken as one byte stream, starting `offset`
    /// bytes into it, into `buffer`. Returns how many bytes were copied (fewer than
    /// `buffer.len()` if the stream ends first).
    pub fn read<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        offset: u64,
        buffer: &mut [u8],
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for (address, take, at) in self.pieces(false, offset, buffer.len()) {
            memory.read(address, &mut buffer[at..at + take])?;
            done = at + take;
        }
        Ok(done)
    }

    /// Copy `data` into the device-writable buffers, taken as one byte stream, starting
    /// `offset` bytes into it. Returns how many bytes were copied.
    pub fn write<M: GuestMemory + ?Sized>(
        &self,
        memory: &mut M,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for (address, take, at) in self.pieces(true, offset, data.len()) {
            memory.write(address, &data[at..at + take])?;
            done = at + take;
        }
        Ok(done)
    }

    /// Call `f(position, bytes)` with bytes `offset .. offset + length` of the device-readable
    /// stream in place, in order (`position` counts from `offset`; a piece may come in several
    /// calls). Returns how many bytes there were (fewer than `length` if the stream ends).
    pub fn read_in_place<M: GuestMemory + ?Sized>(
        &self,
        memory: &M,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for (address, take, at) in self.pieces(false, offset, length) {
            let mut position = at;
            memory.with_bytes(address, take, &mut |bytes| {
                f(position, bytes);
                position += bytes.len();
            })?;
            done = at + take;
        }
        Ok(done)
    }

    /// Call `f(position, bytes)` to fill bytes `offset .. offset + length` of the
    /// device-writable stream in place, in order (as [`Chain::read_in_place`]). Returns how
    /// many bytes there were.
    pub fn write_in_place<M: GuestMemory + ?Sized>(
        &self,
        memory: &mut M,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for (address, take, at) in self.pieces(true, offset, length) {
            let mut position = at;
            memory.with_bytes_mut(address, take, &mut |bytes| {
                f(position, bytes);
                position += bytes.len();
            })?;
            done = at + take;
        }
        Ok(done)
    }

    /// The (guest address, length, position in the caller's buffer) pieces of a copy of
    /// `length` bytes at `offset` into the readable or writable stream.
    fn pieces(
        &self,
        writable: bool,
        offset: u64,
        length: usize,
    ) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
        let mut skip = offset;
        let mut at = 0usize;
        self.descriptors
            .iter()
            .filter(move |d| d.writable == writable)
            .filter_map(move |d| {
                let len = u64::from(d.length);
                if skip >= len {
                    skip -= len;
                    return None;
                }
                let start = skip;
                skip = 0;
                let take = core::cmp::min(len - start, (length - at) as u64) as usize;
                if take == 0 {
                    return None;
                }
                let piece = (d.address + start, take, at);
                at += take;
                Some(piece)
            })
    }
}

/// A split virtqueue as the device sees it: the addresses the driver programmed and the
/// device's positions in the rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    descriptor_table: u64,
    available_ring: u64,
    used_ring: u64,
    next_available: u16,
    next_used: u16,
    /// Used entries added since the last [`Queue::needs_notification`].
    added: u16,
    event_index: bool,
    indirect: bool,
}

impl Queue {
    /// A queue of at most `max_size` entries (rounded down to a power of two, between 1 and
    /// [`MAX_QUEUE_SIZE`]); its size starts at the maximum.
    pub fn new(max_size: u16) -> Self {
        let max_size = match max_size.clamp(1, MAX_QUEUE_SIZE) {
            n if n.is_power_of_two() => n,
            n => n.next_power_of_two() / 2,
        };
        Queue {
            max_size,
            size: max_size,
            ready: false,
            descriptor_table: 0,
            available_ring: 0,
            used_ring: 0,
            next_available: 0,
            next_used: 0,
            added: 0,
            event_index: false,
            indirect: false,
        }
    }

    /// Back to the state of [`Queue::new`] (not ready, addresses zero, positions zero).
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// The largest size the driver may choose (QueueNumMax).
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The size the driver chose (QueueNum).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Set the size (checked by [`Queue::activate`]; ignored while the queue is ready).
    pub fn set_size(&mut self, size: u16) {
        if !self.ready {
            self.size = size;
        }
    }

    /// The descriptor table's guest-physical address.
    pub fn descriptor_table(&self) -> u64 {
        self.descriptor_table
    }

    /// The available ring's guest-physical address.
    pub fn available_ring(&self) -> u64 {
        self.available_ring
    }

    /// The used ring's guest-physical address.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// Set the descriptor table's address (checked by [`Queue::activate`]; ignored while the queue
    /// is ready).
    pub fn set_descriptor_table(&mut self, address: u64) {
        if !self.ready {
            self.descriptor_table = address;
        }
    }

    /// Set the available ring's address (checked by [`Queue::activate`]; ignored while the queue
    /// is ready).
    pub fn set_available_ring(&mut self, address: u64) {
        if !self.ready {
            self.available_ring = address;
        }
    }

    /// Set the used ring's address (checked by [`Queue::activate`]; ignored while the queue
    /// is ready).
    pub fn set_used_ring(&mut self, address: u64) {
        if !self.ready {
            self.used_ring = address;
        }
    }

    /// Which negotiated ring features apply: `VIRTIO_F_EVENT_IDX` and
    /// `VIRTIO_F_INDIRECT_DESC`.
    pub fn set_ring_features(&mut self, event_index: bool, indirect: bool) {
        self.event_index = event_index;
        self.indirect = indirect;
    }

    /// Whether the queue is activated.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The next available-ring position the device will read.
    pub fn next_available(&self) -> u16 {
        self.next_available
    }

    /// The next used-ring position the device will write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Set the device's positions in the available and used rings (to restore a queue's
    /// state; ignored while the queue is ready). [`Queue::reset`] sets both to 0.
    pub fn set_positions(&mut self, next_available: u16, next_used: u16) {
        if !self.ready {
            self.next_available = next_available;
            self.next_used = next_used;
        }
    }

    /// Give back the chains taken since the available position was `next_available` (a device
    /// that found it cannot use them yet, having used none): they are taken again later.
    /// Ignored if that position is not behind the current one by at most the queue's size.
    pub fn rewind(&mut self, next_available: u16) {
        if self.next_available.wrapping_sub(next_available) <= self.size {
            self.next_available = next_available;
        }
    }

    /// Check the programmed size and addresses against `memory` and make the queue ready.
    /// On an error the queue stays not ready.
    pub fn activate<M: GuestMemory + ?Sized>(&mut self, memory: &M) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        let n = u64::from(size);
        let rings = [
            (
                Ring::Descriptors,
                self.descriptor_table,
                16,
                DESCRIPTOR_SIZE * n,
            ),
            (Ring::Available, self.available_ring, 2, 6 + 2 * n),
            (Ring::Used, self.used_ring, 4, 6 + 8 * n),
        ];
        for (ring, address, align, length) in rings {
            if address % align != 0 {
                return Err(QueueError::Misaligned { ring, address });
            }
            memory
                .check_range(address, length)
                .map_err(|_| QueueError::RingOutOfRange { ring, address })?;
        }
        self.ready = true;
        Ok(())
    }

    /// Take the next chain the driver made available, or `None` if there is none. A chain that
    /// fails its checks is consumed and reported as the error.
    pub fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        memory: &M,
    ) -> Result<Option<Chain>, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let available = memory.read_u16(self.available_ring + 2)?;
        let pending = available.wrapping_sub(self.next_available);
        if pending > self.size {
            return Err(QueueError::AvailableIndexJump {
                next: self.next_available,
                available,
            });
        }
        if pending == 0 {
            return Ok(None);
        }
        let slot = u64::from(self.next_available % self.size);
        let head = memory.read_u16(self.available_ring + 4 + 2 * slot)?;
        self.next_available = self.next_available.wrapping_add(1);
        self.walk(memory, head).map(Some)
    }

    /// Follow the chain that starts at descriptor `head`.
    fn walk<M: GuestMemory + ?Sized>(&self, memory: &M, head: u16) -> Result<Chain, QueueError> {
        let mut descriptors = SmallVec::new();
        let mut table = self.descriptor_table;
        let mut table_size = self.size;
        let mut in_indirect = false;
        let mut budget = table_size;
        let mut index = head;
        let mut total: u32 = 0;
        loop {
            if index >= table_size {
                return Err(QueueError::DescriptorIndex(index));
            }
            if budget == 0 {
                return Err(QueueError::ChainTooLong);
            }
            budget -= 1;
            let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
            memory.read(table + DESCRIPTOR_SIZE * u64::from(index), &mut raw)?;
            let mut address_bytes = [0u8; 8];
            address_bytes.copy_from_slice(&raw[0..8]);
            let address = u64::from_le_bytes(address_bytes);
            let length = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);

            if flags & DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(QueueError::NestedIndirect);
                }
                if flags & DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                let entries = u64::from(length) / DESCRIPTOR_SIZE;
                if length == 0
                    || u64::from(length) % DESCRIPTOR_SIZE != 0
                    || entries > u64::from(self.max_size)
                    || memory.check_range(address, u64::from(length)).is_err()
                {
                    return Err(QueueError::BadIndirectTable { address, length });
                }
                table = address;
                table_size = entries as u16;
                budget = table_size;
                in_indirect = true;
                index = 0;
                continue;
            }

            total = total
                .checked_add(length)
                .ok_or(QueueError::LengthOverflow)?;
            if memory.check_range(address, u64::from(length)).is_err() {
                return Err(QueueError::BufferOutOfRange { address, length });
            }
            descriptors.push(Descriptor {
                address,
                length,
                writable: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, descriptors });
            }
            index = next;
        }
    }

    /// Hand chain `head` back to the driver with `length` bytes written into it.
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        memory: &mut M,
        head: u16,
        length: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if head >= self.size {
            return Err(QueueError::UsedIndex(head));
        }
        let slot = u64::from(self.next_used % self.size);
        let entry = self.used_ring + 4 + 8 * slot;
        memory.write_u32(entry, u32::from(head))?;
        memory.write_u32(entry + 4, length)?;
        self.next_used = self.next_used.wrapping_add(1);
        self.added = self.added.wrapping_add(1);
        memory.write_u16(self.used_ring + 2, self.next_used)?;
        Ok(())
    }

    /// Ask the driver to notify on the next chain it makes available (with EVENT_IDX: publish
    /// `avail_event` = the next position; without: clear `VRING_USED_F_NO_NOTIFY`). Returns
    /// whether chains are already waiting (so the caller should pop again).
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        memory: &mut M,
    ) -> Result<bool, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if self.event_index {
            let avail_event = self.used_ring + 4 + 8 * u64::from(self.size);
            memory.write_u16(avail_event, self.next_available)?;
        } else {
            memory.write_u16(self.used_ring, 0)?;
        }
        Ok(memory.read_u16(self.available_ring + 2)? != self.next_available)
    }

    /// Tell the driver not to notify (without EVENT_IDX: set `VRING_USED_F_NO_NOTIFY`; with
    /// it, not publishing a new `avail_event` already does that).
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        memory: &mut M,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if !self.event_index {
            memory.write_u16(self.used_ring, USED_F_NO_NOTIFY)?;
        }
        Ok(())
    }

    /// Whether the used entries added since the last call should interrupt the driver (with
    /// EVENT_IDX: did they pass its `used_event`; without: is `VRING_AVAIL_F_NO_INTERRUPT`
    /// clear). False when none were added.
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        memory: &M,
    ) -> Result<bool, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let added = core::mem::take(&mut self.added);
        if added == 0 {
            return Ok(false);
        }
        if self.event_index {
            let new = self.next_used;
            let old = new.wrapping_sub(added);
            let used_event = memory.read_u16(self.available_ring + 4 + 2 * u64::from(self.size))?;
            Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
        } else {
            Ok(memory.read_u16(self.available_ring)? & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// Lay out queues in memory the way a driver does (for this crate's tests).
#[cfg(test)]
pub(crate) mod test_driver {
    use super::*;
    use crate::guest_memory::VecMemory;

    /// A driver-side view of one queue in a [`VecMemory`].
    pub struct Driver {
        pub size: u16,
        pub descriptors: u64,
        pub available: u64,
        pub used: u64,
        pub next_free: u16,
        pub available_index: u16,
    }

    impl Driver {
        /// Rings at `base` (descriptors), then available and used, 4 KiB apart per 256 entries.
        pub fn new(size: u16, base: u64) -> Self {
            let n = u64::from(size);
            let descriptors = base;
            let available = descriptors + 16 * n;
            let used = (available + 6 + 2 * n + 3) & !3;
            Driver {
                size,
                descriptors,
                available,
                used,
                next_free: 0,
                available_index: 0,
            }
        }

        /// Program `queue` with this layout.
        pub fn program(&self, queue: &mut Queue) {
            queue.set_size(self.size);
            queue.set_descriptor_table(self.descriptors);
            queue.set_available_ring(self.available);
            queue.set_used_ring(self.used);
        }

        /// Write descriptor `index`.
        pub fn set_descriptor(
            &self,
            memory: &mut VecMemory,
            index: u16,
            address: u64,
            length: u32,
            flags: u16,
            next: u16,
        ) {
            let at = self.descriptors + 16 * u64::from(index);
            memory.write_u64(at, address).unwrap();
            memory.write_u32(at + 8, length).unwrap();
            memory.write_u16(at + 12, flags).unwrap();
            memory.write_u16(at + 14, next).unwrap();
        }

        /// Make chains of `(address, length, writable)` buffers available, one per call.
        pub fn add_chain(&mut self, memory: &mut VecMemory, buffers: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_free;
            for (i, &(address, length, writable)) in buffers.iter().enumerate() {
                let index = (head + i as u16) % self.size;
                let last = i + 1 == buffers.len();
                let flags =
                    if writable { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                self.set_descriptor(
                    memory,
                    index,
                    address,
                    length,
                    flags,
                    (index + 1) % self.size,
                );
            }
            self.next_free = (head + buffers.len() as u16) % self.size;
            self.publish(memory, head);
            head
        }

        /// Put `head` in the available ring and bump its index.
        pub fn publish(&mut self, memory: &mut VecMemory, head: u16) {
            let slot = u64::from(self.available_index % self.size);
            memory
                .write_u16(self.available + 4 + 2 * slot, head)
                .unwrap();
            self.available_index = self.available_index.wrapping_add(1);
            memory
                .write_u16(self.available + 2, self.available_index)
                .unwrap();
        }

        /// The used ring's index.
        pub fn used_index(&self, memory: &VecMemory) -> u16 {
            memory.read_u16(self.used + 2).unwrap()
        }

        /// Used entry `slot`: (id, len).
        pub fn used_entry(&self, memory: &VecMemory, slot: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(slot % self.size);
            (
                memory.read_u32(at).unwrap(),
                memory.read_u32(at + 4).unwrap(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_driver::Driver;
    use super::*;
    use crate::guest_memory::VecMemory;
    use alloc::vec::Vec;

    const DATA: u64 = 0x8000;

    fn setup(size: u16) -> (VecMemory, Driver, Queue) {
        let memory = VecMemory::new(0, 0x10000);
        let driver = Driver::new(size, 0x1000);
        let mut queue = Queue::new(size);
        driver.program(&mut queue);
        queue.activate(&memory).unwrap();
        (memory, driver, queue)
    }

    #[test]
    fn pops_chains_in_order_and_returns_them() {
        let (mut m, mut d, mut q) = setup(8);
        assert_eq!(q.pop(&m), Ok(None));
        let h0 = d.add_chain(&mut m, &[(DATA, 16, false), (DATA + 16, 100, true)]);
        let h1 = d.add_chain(&mut m, &[(DATA + 200, 1, true)]);
        let c0 = q.pop(&m).unwrap().unwrap();
        assert_eq!(c0.head(), h0);
        assert_eq!(
            c0.descriptors(),
            &[
                Descriptor {
                    address: DATA,
                    length: 16,
                    writable: false
                },
                Descriptor {
                    address: DATA + 16,
                    length: 100,
                    writable: true
                }
            ]
        );
        assert_eq!((c0.readable_length(), c0.writable_length()), (16, 100));
        assert_eq!(q.pop(&m).unwrap().unwrap().head(), h1);
        assert_eq!(q.pop(&m), Ok(None));
        q.add_used(&mut m, h1, 1).unwrap();
        q.add_used(&mut m, h0, 50).unwrap();
        assert_eq!(d.used_index(&m), 2);
        assert_eq!(d.used_entry(&m, 0), (u32::from(h1), 1));
        assert_eq!(d.used_entry(&m, 1), (u32::from(h0), 50));
        assert_eq!(q.next_used(), 2);
        assert_eq!(q.next_available(), 2);
    }

    /// A chain of "hello" and " world" (readable) with 3 and 10 writable bytes between and
    /// after, popped.
    fn hello_world_chain() -> (VecMemory, Chain) {
        let (mut m, mut d, mut q) = setup(8);
        m.write(DATA, b"hello").unwrap();
        m.write(DATA + 100, b" world").unwrap();
        d.add_chain(
            &mut m,
            &[
                (DATA, 5, false),
                (DATA + 300, 3, true),
                (DATA + 100, 6, false),
                (DATA + 400, 10, true),
            ],
        );
        let c = q.pop(&m).unwrap().unwrap();
        (m, c)
    }

    #[test]
    fn chain_copies_cross_descriptors() {
        let (mut m, c) = hello_world_chain();
        let mut buffer = [0u8; 20];
        assert_eq!(c.read(&m, 0, &mut buffer), Ok(11));
        assert_eq!(&buffer[..11], b"hello world");
        assert_eq!(c.read(&m, 3, &mut buffer[..4]), Ok(4));
        assert_eq!(&buffer[..4], b"lo w");
        assert_eq!(c.read(&m, 11, &mut buffer), Ok(0));
        assert_eq!(c.write(&mut m, 1, b"abcdefghijklmnop"), Ok(12));
        assert_eq!(&m.bytes()[DATA as usize + 300..][..3], b"\0ab");
        assert_eq!(&m.bytes()[DATA as usize + 400..][..10], b"cdefghijkl");
    }

    #[test]
    fn chain_copies_in_place() {
        let (mut m, c) = hello_world_chain();
        // Pieces come in stream order with their positions from the offset.
        let mut seen = Vec::new();
        let n = c
            .read_in_place(&m, 3, 20, &mut |at, b| seen.push((at, b.to_vec())))
            .unwrap();
        assert_eq!(n, 8);
        assert_eq!(seen, [(0, b"lo".to_vec()), (2, b" world".to_vec())]);
        let source = b"abcdefghijklmnop";
        let n = c
            .write_in_place(&mut m, 1, 16, &mut |at, b| {
                b.copy_from_slice(&source[at..at + b.len()])
            })
            .unwrap();
        assert_eq!(n, 12);
        assert_eq!(&m.bytes()[DATA as usize + 300..][..3], b"\0ab");
        assert_eq!(&m.bytes()[DATA as usize + 400..][..10], b"cdefghijkl");
    }

    #[test]
    fn activation_checks() {
        let m = VecMemory::new(0, 0x10000);
        let d = Driver::new(8, 0x1000);
        let mut q = Queue::new(8);
        d.program(&mut q);
        for bad in [0, 3, 16] {
            q.set_size(bad);
            assert_eq!(q.activate(&m), Err(QueueError::InvalidSize(bad)));
        }
        q.set_size(4);
        q.set_descriptor_table(0x1008);
        assert_eq!(
            q.activate(&m),
            Err(QueueError::Misaligned {
                ring: Ring::Descriptors,
                address: 0x1008
            })
        );
        q.set_descriptor_table(0x1000);
        q.set_available_ring(0x1101);
        assert!(matches!(
            q.activate(&m),
            Err(QueueError::Misaligned {
                ring: Ring::Available,
                ..
            })
        ));
        q.set_available_ring(0x1100);
        q.set_used_ring(0x1202);
        assert!(matches!(
            q.activate(&m),
            Err(QueueError::Misaligned {
                ring: Ring::Used,
                ..
            })
        ));
        q.set_used_ring(0xfffc);
        assert_eq!(
            q.activate(&m),
            Err(QueueError::RingOutOfRange {
                ring: Ring::Used,
                address: 0xfffc
            })
        );
        q.set_used_ring(0x1200);
        q.set_descriptor_table(0xfff0_0000_0000_0000);
        assert!(matches!(
            q.activate(&m),
            Err(QueueError::RingOutOfRange {
                ring: Ring::Descriptors,
                ..
            })
        ));
        q.set_descriptor_table(!15);
        assert!(q.activate(&m).is_err());
        assert!(!q.is_ready());
        assert_eq!(q.pop(&m), Err(QueueError::NotReady));
        assert_eq!(Queue::new(100).max_size(), 64);
        assert_eq!(Queue::new(0).max_size(), 1);
        assert_eq!(Queue::new(u16::MAX).max_size(), MAX_QUEUE_SIZE);
    }

    #[test]
    fn available_index_jump_is_refused() {
        let (mut m, d, mut q) = setup(8);
        m.write_u16(d.available + 2, 9).unwrap();
        assert_eq!(
            q.pop(&m),
            Err(QueueError::AvailableIndexJump {
                next: 0,
                available: 9
            })
        );
        // Exactly a queue ahead is fine (a full ring).
        m.write_u16(d.available + 2, 8).unwrap();
        assert!(q.pop(&m).is_ok());
        // Behind (wrapping backwards) is a huge jump too.
        m.write_u16(d.available + 2, 0).unwrap();
        assert!(matches!(
            q.pop(&m),
            Err(QueueError::AvailableIndexJump { .. })
        ));
    }

    #[test]
    fn descriptor_index_out_of_table() {
        let (mut m, mut d, mut q) = setup(8);
        d.publish(&mut m, 8);
        assert_eq!(q.pop(&m), Err(QueueError::DescriptorIndex(8)));
        d.set_descriptor(&mut m, 0, DATA, 4, DESC_F_NEXT, 200);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::DescriptorIndex(200)));
    }

    #[test]
    fn loops_end_as_too_long() {
        let (mut m, mut d, mut q) = setup(8);
        d.set_descriptor(&mut m, 3, DATA, 4, DESC_F_NEXT, 3);
        d.publish(&mut m, 3);
        assert_eq!(q.pop(&m), Err(QueueError::ChainTooLong));
        for i in 0..8 {
            d.set_descriptor(&mut m, i, DATA, 4, DESC_F_NEXT, (i + 1) % 8);
        }
        d.publish(&mut m, 5);
        assert_eq!(q.pop(&m), Err(QueueError::ChainTooLong));
        // A chain of exactly the queue size is fine.
        d.set_descriptor(&mut m, 4, DATA, 4, 0, 0);
        d.publish(&mut m, 5);
        assert_eq!(q.pop(&m).unwrap().unwrap().descriptors().len(), 8);
    }

    #[test]
    fn huge_lengths_overflow() {
        let (mut m, mut d, mut q) = setup(8);
        // One huge buffer is out of range; two that fit add up past 4 GiB.
        d.set_descriptor(&mut m, 0, DATA, u32::MAX, DESC_F_NEXT, 1);
        d.publish(&mut m, 0);
        assert_eq!(
            q.pop(&m),
            Err(QueueError::BufferOutOfRange {
                address: DATA,
                length: u32::MAX
            })
        );
        d.set_descriptor(&mut m, 0, DATA, 0x8000, DESC_F_NEXT, 1);
        d.set_descriptor(&mut m, 1, DATA, u32::MAX - 0x7fff, 0, 0);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::LengthOverflow));
    }

    #[test]
    fn buffers_outside_memory() {
        let (mut m, mut d, mut q) = setup(8);
        d.add_chain(&mut m, &[(0xfff0, 0x20, true)]);
        assert_eq!(
            q.pop(&m),
            Err(QueueError::BufferOutOfRange {
                address: 0xfff0,
                length: 0x20
            })
        );
        d.add_chain(&mut m, &[(DATA, 1, false), (u64::MAX, 2, false)]);
        assert!(matches!(
            q.pop(&m),
            Err(QueueError::BufferOutOfRange { .. })
        ));
        // Zero-length buffers at the end of memory are in range.
        d.add_chain(&mut m, &[(0x10000, 0, true)]);
        assert!(q.pop(&m).unwrap().is_some());
        // Used entries for heads past the queue are refused.
        assert_eq!(q.add_used(&mut m, 8, 0), Err(QueueError::UsedIndex(8)));
    }

    #[test]
    fn rings_that_leave_memory_after_activation_are_errors() {
        // Memory shrinks from under a queue only in a test, but each ring access is checked.
        let (mut m, mut d, mut q) = setup(8);
        d.add_chain(&mut m, &[(DATA, 1, true)]);
        let small = VecMemory::new(0, 0x1000);
        assert!(matches!(q.pop(&small), Err(QueueError::Memory(_))));
        let mut small = small;
        assert!(matches!(
            q.add_used(&mut small, 0, 0),
            Err(QueueError::Memory(_))
        ));
        assert!(q.enable_notification(&mut small).is_err());
        q.add_used(&mut m, 0, 0).unwrap();
        assert!(q.needs_notification(&small).is_err());
    }

    fn indirect_setup() -> (VecMemory, Driver, Queue) {
        let (m, d, mut q) = setup(8);
        q.set_ring_features(false, true);
        (m, d, q)
    }

    fn write_table(m: &mut VecMemory, at: u64, entries: &[(u64, u32, u16, u16)]) {
        for (i, &(address, length, flags, next)) in entries.iter().enumerate() {
            let e = at + 16 * i as u64;
            m.write_u64(e, address).unwrap();
            m.write_u32(e + 8, length).unwrap();
            m.write_u16(e + 12, flags).unwrap();
            m.write_u16(e + 14, next).unwrap();
        }
    }

    #[test]
    fn indirect_tables_are_flattened() {
        let (mut m, mut d, mut q) = indirect_setup();
        let table = 0x4000;
        write_table(
            &mut m,
            table,
            &[
                (DATA, 16, DESC_F_NEXT, 2),
                (0, 0, 0, 0),
                (DATA + 16, 512, DESC_F_NEXT | DESC_F_WRITE, 3),
                (DATA + 528, 1, DESC_F_WRITE, 0),
            ],
        );
        // A direct descriptor, then the indirect one (its WRITE flag is ignored).
        d.set_descriptor(&mut m, 0, DATA + 1000, 8, DESC_F_NEXT, 1);
        d.set_descriptor(&mut m, 1, table, 64, DESC_F_INDIRECT | DESC_F_WRITE, 0);
        d.publish(&mut m, 0);
        let c = q.pop(&m).unwrap().unwrap();
        let lengths: Vec<_> = c
            .descriptors()
            .iter()
            .map(|d| (d.length, d.writable))
            .collect();
        assert_eq!(lengths, [(8, false), (16, false), (512, true), (1, true)]);
    }

    #[test]
    fn indirect_tables_may_exceed_a_shrunk_queue() {
        // Maximum 8, the driver chose 4: a table of 8 entries is still taken, 9 are not.
        let mut m = VecMemory::new(0, 0x10000);
        let mut d = Driver::new(4, 0x1000);
        let mut q = Queue::new(8);
        d.program(&mut q);
        q.set_ring_features(false, true);
        q.activate(&m).unwrap();
        let table = 0x4000;
        let mut entries = [(DATA, 1, DESC_F_NEXT, 0); 9];
        for (i, e) in entries.iter_mut().enumerate() {
            e.3 = i as u16 + 1;
        }
        entries[7].2 = 0;
        write_table(&mut m, table, &entries);
        d.set_descriptor(&mut m, 0, table, 8 * 16, DESC_F_INDIRECT, 0);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m).unwrap().unwrap().descriptors().len(), 8);
        d.set_descriptor(&mut m, 0, table, 9 * 16, DESC_F_INDIRECT, 0);
        d.publish(&mut m, 0);
        assert!(matches!(
            q.pop(&m),
            Err(QueueError::BadIndirectTable { .. })
        ));
    }

    #[test]
    fn indirect_refusals() {
        let (mut m, mut d, mut q) = indirect_setup();
        let table = 0x4000;
        write_table(&mut m, table, &[(DATA, 4, 0, 0); 9]);
        let cases: [(u64, u32, u16, QueueError); 6] = [
            (
                table,
                0,
                0,
                QueueError::BadIndirectTable {
                    address: table,
                    length: 0,
                },
            ),
            (
                table,
                24,
                0,
                QueueError::BadIndirectTable {
                    address: table,
                    length: 24,
                },
            ),
            (
                table,
                16 * 9,
                0,
                QueueError::BadIndirectTable {
                    address: table,
                    length: 144,
                },
            ),
            (
                0xfff0,
                32,
                0,
                QueueError::BadIndirectTable {
                    address: 0xfff0,
                    length: 32,
                },
            ),
            (table, 16, DESC_F_NEXT, QueueError::IndirectWithNext),
            (
                u64::MAX - 15,
                16,
                0,
                QueueError::BadIndirectTable {
                    address: u64::MAX - 15,
                    length: 16,
                },
            ),
        ];
        for (address, length, extra, error) in cases {
            d.set_descriptor(&mut m, 0, address, length, DESC_F_INDIRECT | extra, 1);
            d.publish(&mut m, 0);
            assert_eq!(q.pop(&m), Err(error));
        }
        // INDIRECT inside the table.
        write_table(&mut m, table, &[(table, 16, DESC_F_INDIRECT, 0)]);
        d.set_descriptor(&mut m, 0, table, 16, DESC_F_INDIRECT, 0);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::NestedIndirect));
        // A loop inside the table, and a next past its end.
        write_table(
            &mut m,
            table,
            &[(DATA, 1, DESC_F_NEXT, 1), (DATA, 1, DESC_F_NEXT, 0)],
        );
        d.set_descriptor(&mut m, 0, table, 32, DESC_F_INDIRECT, 0);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::ChainTooLong));
        write_table(&mut m, table, &[(DATA, 1, DESC_F_NEXT, 2), (0, 0, 0, 0)]);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::DescriptorIndex(2)));
        // Not negotiated.
        q.set_ring_features(false, false);
        d.publish(&mut m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::IndirectNotNegotiated));
    }

    #[test]
    fn notification_suppression_without_event_index() {
        let (mut m, mut d, mut q) = setup(8);
        q.disable_notification(&mut m).unwrap();
        assert_eq!(m.read_u16(d.used), Ok(USED_F_NO_NOTIFY));
        assert_eq!(q.enable_notification(&mut m), Ok(false));
        assert_eq!(m.read_u16(d.used), Ok(0));
        let h = d.add_chain(&mut m, &[(DATA, 1, true)]);
        assert_eq!(q.enable_notification(&mut m), Ok(true));
        assert_eq!(q.needs_notification(&m), Ok(false), "nothing used yet");
        q.pop(&m).unwrap().unwrap();
        q.add_used(&mut m, h, 1).unwrap();
        assert_eq!(q.needs_notification(&m), Ok(true));
        m.write_u16(d.available, AVAIL_F_NO_INTERRUPT).unwrap();
        q.add_used(&mut m, h, 1).unwrap();
        assert_eq!(q.needs_notification(&m), Ok(false));
    }

    #[test]
    fn notification_suppression_with_event_index() {
        let (mut m, mut d, mut q) = setup(8);
        q.set_ring_features(true, false);
        let avail_event = d.used + 4 + 8 * 8;
        let used_event = d.available + 4 + 2 * 8;
        for _ in 0..3 {
            d.add_chain(&mut m, &[(DATA, 1, true)]);
        }
        for _ in 0..3 {
            q.pop(&m).unwrap().unwrap();
        }
        assert_eq!(q.enable_notification(&mut m), Ok(false));
        assert_eq!(m.read_u16(avail_event), Ok(3));
        q.disable_notification(&mut m).unwrap();
        assert_eq!(m.read_u16(d.used), Ok(0), "flags untouched with EVENT_IDX");
        // The driver wants an interrupt once entry 1 (the second) is used.
        m.write_u16(used_event, 1).unwrap();
        q.add_used(&mut m, 0, 1).unwrap();
        assert_eq!(q.needs_notification(&m), Ok(false));
        q.add_used(&mut m, 1, 1).unwrap();
        assert_eq!(q.needs_notification(&m), Ok(true));
        q.add_used(&mut m, 2, 1).unwrap();
        assert_eq!(q.needs_notification(&m), Ok(false));
        // Batches: passing used_event anywhere in the batch notifies.
        m.write_u16(used_event, 4).unwrap();
        for i in 0..3 {
            q.add_used(&mut m, i, 0).unwrap();
        }
        assert_eq!(q.needs_notification(&m), Ok(true));
    }

    #[test]
    fn indices_wrap() {
        let (mut m, mut d, mut q) = setup(4);
        for round in 0..70_000u32 {
            let h = d.add_chain(&mut m, &[(DATA, 4, round % 2 == 0)]);
            let c = q.pop(&m).unwrap().unwrap();
            assert_eq!(c.head(), h);
            q.add_used(&mut m, h, round).unwrap();
            assert_eq!(q.pop(&m), Ok(None));
        }
        assert_eq!(q.next_available(), (70_000u32 % 65_536) as u16);
        assert_eq!(d.used_index(&m), q.next_used());
        q.reset();
        assert!(!q.is_ready());
        assert_eq!((q.next_available(), q.size()), (0, 4));
    }

    #[test]
    fn errors_have_messages() {
        let all = [
            QueueError::NotReady,
            QueueError::InvalidSize(3),
            QueueError::Misaligned {
                ring: Ring::Used,
                address: 1,
            },
            QueueError::RingOutOfRange {
                ring: Ring::Available,
                address: 1,
            },
            QueueError::AvailableIndexJump {
                next: 0,
                available: 9,
            },
            QueueError::DescriptorIndex(9),
            QueueError::ChainTooLong,
            QueueError::LengthOverflow,
            QueueError::BufferOutOfRange {
                address: 0,
                length: 1,
            },
            QueueError::IndirectNotNegotiated,
            QueueError::NestedIndirect,
            QueueError::IndirectWithNext,
            QueueError::BadIndirectTable {
                address: 0,
                length: 0,
            },
            QueueError::UsedIndex(9),
            QueueError::Memory(MemoryError::OutOfRange {
                address: 0,
                length: 1,
            }),
        ];
        for e in all {
            assert!(!alloc::format!("{e}").is_empty());
        }
    }
}

/// Garbage in guest memory never panics the device, and every call returns.
#[cfg(test)]
mod garbage {
    use super::*;
    use crate::guest_memory::VecMemory;

    #[test]
    fn random_memory_and_rings() {
        let mut random = crate::xorshift(0x1234_5678_9abc_def1u64);
        for _ in 0..2000 {
            let mut m = VecMemory::new(0x1000, 0x4000);
            for chunk in m.bytes_mut().chunks_mut(8) {
                let bytes = random().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
            let size = 1u16 << (random() % 8);
            let mut q = Queue::new(128);
            q.set_size(size);
            q.set_descriptor_table((0x1000 + random() % 0x4000) & !15);
            q.set_available_ring((0x1000 + random() % 0x4000) & !1);
            q.set_used_ring((0x1000 + random() % 0x4000) & !3);
            q.set_ring_features(random().is_multiple_of(2), random().is_multiple_of(2));
            if q.activate(&m).is_err() {
                continue;
            }
            for _ in 0..300 {
                match q.pop(&m) {
                    Ok(Some(chain)) => {
                        assert!(chain.descriptors().len() <= usize::from(size));
                        let _ = q.add_used(&mut m, chain.head(), random() as u32);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                let _ = q.needs_notification(&m);
                let _ = q.enable_notification(&mut m);
            }
        }
    }
}
