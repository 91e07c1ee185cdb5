//! A single-producer, single-consumer ring of variable-length records (Ethernet frames with
//! their virtio-net header) in memory shared between two tasks (a VMM and the virtual switch,
//! one ring per direction), as pure logic over a [`SharedMemory`] trait: the VMM implements it
//! over the mapped pages, tests over atomics.
//!
//! # Layout
//!
//! Both sides agree on a [`RingLayout`] out of band (from their configuration, never from the
//! shared memory, which the other side may rewrite at any time):
//!
//! | offset | bytes | what |
//! | --- | --- | --- |
//! | 0 | 4 | producer index: bytes published so far (wrapping `u32`), written only by the producer |
//! | 64 | 4 | consumer index: bytes consumed so far (wrapping `u32`), written only by the consumer |
//! | 128 | `data` | the records: byte `n` of the stream at `128 + n % data` |
//!
//! A record is a little-endian `u32` length `L` (1 ..= the layout's largest record) and `L`
//! bytes, padded to a multiple of 8 ([`RECORD_ALIGN`]). A record never wraps around the end of
//! the data area: where it would, the producer writes the marker [`WRAP`] instead of a length
//! and the record starts at the beginning (the skipped bytes count as used). The ring is
//! empty when the indices are equal; it holds at most `data` bytes. The indices sit in
//! separate 64-byte lines so that the two sides do not write the same cache line. Large
//! records (64 KiB GSO frames) and small ones (ACKs) share the same bytes, so the ring's
//! capacity is in bytes, like a TCP window.
//!
//! # Memory-ordering contract (for the shared-memory implementation)
//!
//! * The producer writes the record (length word and bytes) with plain stores, then publishes
//!   the new producer index with [`SharedMemory::store_release`]. The consumer reads the
//!   producer index with [`SharedMemory::load_acquire`] and only then reads the record:
//!   release and acquire make the record's contents visible before the index that covers it.
//! * The consumer copies the record out, then publishes the new consumer index with release;
//!   the producer reads it with acquire before it reuses the bytes, so it never overwrites a
//!   record that is still being read.
//! * Each side keeps its own index in private memory and only ever writes it to the shared
//!   copy: it never reads its own index back (the other side could have changed it).
//! * The plain accesses ([`SharedMemory::read`], [`SharedMemory::write`]) race with a hostile
//!   peer by design; an implementation must make them well-defined anyway (volatile,
//!   assembly or relaxed atomic copies, never a Rust reference to the shared bytes). The
//!   indices are aligned 32-bit words, so `AtomicU32` accesses with `Acquire` / `Release`
//!   ordering fit.
//!
//! # Hostile peers
//!
//! Each side treats what the other writes as hostile. The consumer reads a length word once
//! into private memory and refuses a length of 0, one past the largest record, past the end
//! of the data area or past what was published ([`RingError::BadLength`]: since the next
//! record's place is then unknown, everything published so far is skipped; the peer only
//! loses its own records), and refuses a producer index more than `data` bytes ahead of its
//! own or not a multiple of [`RECORD_ALIGN`] ([`RingError::IndexJump`], nothing consumed: the
//! link is broken until the peer's index is sane again). The producer refuses a consumer index that is ahead of its own or more
//! than `data` behind. Every access lies inside [`RingLayout::bytes`], which
//! [`Producer::new`] and [`Consumer::new`] check against the memory's length, so no index or
//! length from the peer can lead out of the region.

use core::fmt;

/// Offset of the producer index.
pub const PRODUCER_INDEX: usize = 0;
/// Offset of the consumer index.
pub const CONSUMER_INDEX: usize = 64;
/// Offset of the data area.
pub const DATA_OFFSET: usize = 128;
/// Bytes of a record's length word.
pub const LENGTH_WORD: usize = 4;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: usize = 8;
/// The length word that says "the next record starts at the beginning of the data area".
pub const WRAP: u32 = u32::MAX;

/// The memory a ring lives in: `len()` bytes, offsets from 0.
///
/// The ring calls these only with ranges inside the [`RingLayout::bytes`] it was created for
/// (checked against [`SharedMemory::len`] once), and the index accesses only at
/// [`PRODUCER_INDEX`] and [`CONSUMER_INDEX`]. See the module documentation for the ordering
/// each method must give.
pub trait SharedMemory {
    /// The size of the region in bytes.
    fn len(&self) -> usize;

    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `buffer.len()` bytes at `offset` into `buffer` (no ordering; the bytes may change
    /// concurrently).
    fn read(&self, offset: usize, buffer: &mut [u8]);

    /// Copy `data` to `offset` (no ordering).
    fn write(&mut self, offset: usize, data: &[u8]);

    /// Read the aligned little-endian `u32` at `offset` with acquire ordering.
    fn load_acquire(&self, offset: usize) -> u32;

    /// Write the aligned little-endian `u32` at `offset` with release ordering.
    fn store_release(&mut self, offset: usize, value: u32);

    /// Copy `length` bytes at `source_offset` of `source` (another region) to `offset` (no
    /// ordering). This default goes through a buffer on the stack; an implementation over
    /// mapped memory copies directly (the switch's ring-to-ring copy of a frame's payload).
    fn copy_from(&mut self, offset: usize, source: &Self, source_offset: usize, length: usize)
    where
        Self: Sized,
    {
        let mut buffer = [0u8; 512];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(buffer.len());
            source.read(source_offset + done, &mut buffer[..n]);
            self.write(offset + done, &buffer[..n]);
            done += n;
        }
    }
}

/// Why a ring could not be set up or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The data area is not a power of two of at least 16 bytes (or does not fit in `u32`),
    /// or the largest record is 0 or takes more than half of it.
    BadLayout,
    /// The memory is smaller than the layout.
    MemoryTooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes the memory has.
        length: usize,
    },
    /// The peer's index is impossible: the producer's more than the data area ahead of the
    /// consumer's, or the consumer's ahead of the producer's.
    IndexJump {
        /// This side's index.
        own: u32,
        /// The index the peer published.
        peer: u32,
    },
    /// A record's length word is 0, past the largest record, the data area's end or what was
    /// published (everything published was skipped).
    BadLength {
        /// Where the record starts in the byte stream.
        index: u32,
        /// The length word.
        length: u32,
    },
    /// The caller's buffer is shorter than the record (the record was skipped).
    BufferTooSmall {
        /// The record's length.
        length: usize,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RingError::BadLayout => write!(f, "invalid frame ring layout"),
            RingError::MemoryTooSmall { needed, length } => {
                write!(f, "frame ring needs {needed} bytes, memory has {length}")
            }
            RingError::IndexJump { own, peer } => {
                write!(f, "peer index {peer} is impossible against ours, {own}")
            }
            RingError::BadLength { index, length } => {
                write!(f, "the record at {index} has a bad length {length}")
            }
            RingError::BufferTooSmall { length } => {
                write!(f, "a record of {length} bytes does not fit the buffer")
            }
        }
    }
}

/// Why a record was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Not enough free bytes (the consumer is behind): drop the record or retry later.
    Full,
    /// The record is empty or longer than [`RingLayout::max_record`].
    BadRecord(usize),
    /// The consumer's index is impossible.
    Ring(RingError),
    /// The caller's fill of [`Producer::push_with`] gave up (nothing was published).
    Aborted,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PushError::Full => write!(f, "frame ring full"),
            PushError::BadRecord(length) => write!(f, "a record of {length} bytes does not fit"),
            PushError::Ring(error) => write!(f, "{error}"),
            PushError::Aborted => write!(f, "the record was not filled"),
        }
    }
}

/// The geometry of a ring: the bytes of its data area and the largest record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    data: u32,
    max_record: u32,
}

/// The bytes a record of `length` bytes takes (length word, record, padding).
fn footprint(length: usize) -> usize {
    (LENGTH_WORD + length).next_multiple_of(RECORD_ALIGN)
}

impl RingLayout {
    /// A ring whose data area has `data` bytes (a power of two, at least 16) for records of
    /// up to `max_record` bytes (at least 1; with its length word and padding at most half the
    /// data area, so that a record always fits once the ring is empty).
    pub fn new(data: u32, max_record: u32) -> Result<Self, RingError> {
        if !data.is_power_of_two()
            || data < 16
            || max_record == 0
            || footprint(max_record as usize) > data as usize / 2
        {
            return Err(RingError::BadLayout);
        }
        Ok(RingLayout { data, max_record })
    }

    /// The layout of the VMM-switch link: 256 KiB of data for records of a virtio-net header
    /// and a frame of up to 64 KiB (a GSO frame).
    pub fn ethernet() -> Self {
        RingLayout {
            data: 256 << 10,
            max_record: (crate::netpacket::HEADER_SIZE + crate::netpacket::MAX_GSO_FRAME) as u32,
        }
    }

    /// The bytes of the data area.
    pub fn data(&self) -> u32 {
        self.data
    }

    /// The largest record.
    pub fn max_record(&self) -> usize {
        self.max_record as usize
    }

    /// The bytes the ring occupies.
    pub fn bytes(&self) -> usize {
        DATA_OFFSET + self.data as usize
    }

    /// Where byte `index` of the stream is, and how many bytes are left to the data area's
    /// end from there.
    fn position(&self, index: u32) -> (usize, usize) {
        let at = (index & (self.data - 1)) as usize;
        (DATA_OFFSET + at, self.data as usize - at)
    }

    fn check<M: SharedMemory>(&self, memory: &M) -> Result<(), RingError> {
        let needed = self.bytes();
        if memory.len() < needed {
            return Err(RingError::MemoryTooSmall {
                needed,
                length: memory.len(),
            });
        }
        Ok(())
    }
}

/// Zero the indices of a ring in `memory` (both sides start at 0). The side that creates the
/// shared memory does this once before handing it out.
pub fn initialize<M: SharedMemory>(memory: &mut M, layout: RingLayout) -> Result<(), RingError> {
    layout.check(memory)?;
    memory.store_release(PRODUCER_INDEX, 0);
    memory.store_release(CONSUMER_INDEX, 0);
    Ok(())
}

/// The producing side of a ring.
pub struct Producer<M> {
    memory: M,
    layout: RingLayout,
    head: u32,
}

impl<M: SharedMemory> Producer<M> {
    /// The producer of the ring `layout` in `memory`, starting at index 0 (see
    /// [`initialize`]).
    pub fn new(memory: M, layout: RingLayout) -> Result<Self, RingError> {
        layout.check(&memory)?;
        Ok(Producer {
            memory,
            layout,
            head: 0,
        })
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Bytes published so far (wrapping).
    pub fn index(&self) -> u32 {
        self.head
    }

    /// The memory (to hand it back).
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// Bytes published and not yet consumed, as far as the consumer's index tells.
    pub fn pending(&self) -> Result<u32, RingError> {
        let tail = self.memory.load_acquire(CONSUMER_INDEX);
        let used = self.head.wrapping_sub(tail);
        if used > self.layout.data {
            return Err(RingError::IndexJump {
                own: self.head,
                peer: tail,
            });
        }
        Ok(used)
    }

    /// Whether a record of `length` bytes would fit now.
    pub fn has_room(&self, length: usize) -> Result<bool, RingError> {
        let free = (self.layout.data - self.pending()?) as usize;
        let (_, rest) = self.layout.position(self.head);
        let need = footprint(length);
        Ok(if need > rest {
            rest + need <= free
        } else {
            need <= free
        })
    }

    /// Copy the record made of `parts` (one after the other) into the ring and publish it.
    pub fn push(&mut self, parts: &[&[u8]]) -> Result<(), PushError> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        self.push_with(length, |slot| {
            let mut at = 0;
            for part in parts {
                slot.write(at, part);
                at += part.len();
            }
            true
        })
    }

    /// Publish a record of `length` bytes that `fill` writes into its place in the ring
    /// ([`Slot`]: straight from where the bytes are, no buffer between). If `fill` returns
    /// false nothing is published ([`PushError::Aborted`]).
    pub fn push_with(
        &mut self,
        length: usize,
        fill: impl FnOnce(&mut Slot<'_, M>) -> bool,
    ) -> Result<(), PushError> {
        if length == 0 || length > self.layout.max_record() {
            return Err(PushError::BadRecord(length));
        }
        if !self.has_room(length).map_err(PushError::Ring)? {
            return Err(PushError::Full);
        }
        let need = footprint(length);
        let mut head = self.head;
        let (mut at, rest) = self.layout.position(head);
        if need > rest {
            self.memory.write(at, &WRAP.to_le_bytes());
            // Fits: rest <= data < 2^32.
            head = head.wrapping_add(rest as u32);
            at = DATA_OFFSET;
        }
        // Fits: max_record < 2^32.
        self.memory.write(at, &(length as u32).to_le_bytes());
        let mut slot = Slot {
            memory: &mut self.memory,
            offset: at + LENGTH_WORD,
            length,
        };
        if !fill(&mut slot) {
            // The bytes written stay unpublished; the next record overwrites them.
            return Err(PushError::Aborted);
        }
        self.head = head.wrapping_add(need as u32);
        self.memory.store_release(PRODUCER_INDEX, self.head);
        Ok(())
    }
}

/// The place of a record being pushed ([`Producer::push_with`]): `len()` bytes, written at
/// offsets from the record's start. Writes outside the record are refused (false).
pub struct Slot<'a, M> {
    memory: &'a mut M,
    offset: usize,
    length: usize,
}

impl<M: SharedMemory> Slot<'_, M> {
    /// The record's length.
    pub fn len(&self) -> usize {
        self.length
    }

    /// Whether the record is empty (never: records have at least a byte).
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    fn inside(&self, at: usize, length: usize) -> bool {
        at.checked_add(length).is_some_and(|end| end <= self.length)
    }

    /// Write `data` at `at` of the record.
    pub fn write(&mut self, at: usize, data: &[u8]) -> bool {
        if !self.inside(at, data.len()) {
            return false;
        }
        self.memory.write(self.offset + at, data);
        true
    }

    /// Copy `length` bytes at `from` of the record `source` has peeked
    /// ([`Consumer::peek`]; another ring) to `at` of this record, memory to memory.
    pub fn copy_from(
        &mut self,
        at: usize,
        source: &Consumer<M>,
        from: usize,
        length: usize,
    ) -> bool {
        let Some(record) = source.peeked else {
            return false;
        };
        let source_inside = from
            .checked_add(length)
            .is_some_and(|end| end <= record.length);
        if !self.inside(at, length) || !source_inside {
            return false;
        }
        self.memory.copy_from(
            self.offset + at,
            &source.memory,
            record.offset + from,
            length,
        );
        true
    }
}

/// The consuming side of a ring.
pub struct Consumer<M> {
    memory: M,
    layout: RingLayout,
    tail: u32,
    /// The record [`Consumer::peek`] found and [`Consumer::release`] has not consumed yet.
    peeked: Option<Peeked>,
}

/// Where a peeked record's bytes lie in the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peeked {
    offset: usize,
    length: usize,
}

impl<M: SharedMemory> Consumer<M> {
    /// The consumer of the ring `layout` in `memory`, starting at index 0 (see
    /// [`initialize`]).
    pub fn new(memory: M, layout: RingLayout) -> Result<Self, RingError> {
        layout.check(&memory)?;
        Ok(Consumer {
            memory,
            layout,
            tail: 0,
            peeked: None,
        })
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Bytes consumed so far (wrapping).
    pub fn index(&self) -> u32 {
        self.tail
    }

    /// The memory (to hand it back).
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// Bytes published and not yet consumed.
    pub fn pending(&self) -> Result<u32, RingError> {
        let head = self.memory.load_acquire(PRODUCER_INDEX);
        let available = head.wrapping_sub(self.tail);
        // Records start and end at multiples of RECORD_ALIGN: an index between is impossible.
        if available > self.layout.data || !(head as usize).is_multiple_of(RECORD_ALIGN) {
            return Err(RingError::IndexJump {
                own: self.tail,
                peer: head,
            });
        }
        Ok(available)
    }

    fn advance(&mut self, bytes: u32) {
        self.tail = self.tail.wrapping_add(bytes);
        self.memory.store_release(CONSUMER_INDEX, self.tail);
    }

    /// Copy the next record into `buffer` and release its bytes; returns its length, or
    /// `None` if the ring is empty. A bad length skips everything published; a record longer
    /// than `buffer` is skipped; an impossible producer index consumes nothing.
    pub fn pop_into(&mut self, buffer: &mut [u8]) -> Result<Option<usize>, RingError> {
        let Some(n) = self.peek()? else {
            return Ok(None);
        };
        let result = match buffer.get_mut(..n) {
            Some(buffer) => {
                self.read(0, buffer);
                Ok(Some(n))
            }
            None => Err(RingError::BufferTooSmall { length: n }),
        };
        self.release();
        result
    }

    /// The length of the next record, left in the ring to be read in place
    /// ([`Consumer::read`], [`Slot::copy_from`]) until [`Consumer::release`]; `None` if the
    /// ring is empty. Peeking again returns the same record. A bad length skips everything
    /// published; an impossible producer index consumes nothing.
    pub fn peek(&mut self) -> Result<Option<usize>, RingError> {
        if let Some(record) = self.peeked {
            return Ok(Some(record.length));
        }
        let mut available = self.pending()?;
        if available == 0 {
            return Ok(None);
        }
        let (mut at, mut rest) = self.layout.position(self.tail);
        let mut word = [0u8; LENGTH_WORD];
        self.memory.read(at, &mut word);
        if u32::from_le_bytes(word) == WRAP && rest as u32 <= available {
            self.advance(rest as u32);
            available -= rest as u32;
            if available == 0 {
                return Ok(None);
            }
            (at, rest) = self.layout.position(self.tail);
            self.memory.read(at, &mut word);
        }
        let length = u32::from_le_bytes(word);
        let n = length as usize;
        if n == 0
            || n > self.layout.max_record()
            || footprint(n) > rest
            || footprint(n) > available as usize
        {
            let index = self.tail;
            self.advance(available);
            return Err(RingError::BadLength { index, length });
        }
        self.peeked = Some(Peeked {
            offset: at + LENGTH_WORD,
            length: n,
        });
        Ok(Some(n))
    }

    /// Copy `buffer.len()` bytes at `at` of the peeked record into `buffer`; false (and
    /// nothing copied) if that is not inside it or nothing is peeked.
    pub fn read(&self, at: usize, buffer: &mut [u8]) -> bool {
        let Some(record) = self.peeked else {
            return false;
        };
        if at
            .checked_add(buffer.len())
            .is_none_or(|end| end > record.length)
        {
            return false;
        }
        self.memory.read(record.offset + at, buffer);
        true
    }

    /// Consume the peeked record (give its bytes back to the producer); nothing if none is.
    pub fn release(&mut self) {
        if let Some(record) = self.peeked.take() {
            self.advance(footprint(record.length) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Shared memory as atomic words, one handle per side (the host stand-in for pages mapped
    /// into two tasks). Bytes are read and written with relaxed word accesses.
    #[derive(Clone)]
    struct Atomic(Arc<Vec<AtomicU32>>);

    impl Atomic {
        fn new(bytes: usize) -> Self {
            Atomic(Arc::new(
                (0..bytes.div_ceil(4)).map(|_| AtomicU32::new(0)).collect(),
            ))
        }

        /// Store a byte (only one side writes any given word).
        fn set(&self, offset: usize, byte: u8) {
            let word = &self.0[offset / 4];
            let shift = (offset % 4) * 8;
            let old = word.load(Ordering::Relaxed);
            word.store(
                (old & !(0xff << shift)) | (u32::from(byte) << shift),
                Ordering::Relaxed,
            );
        }
    }

    impl SharedMemory for Atomic {
        fn len(&self) -> usize {
            self.0.len() * 4
        }
        fn read(&self, offset: usize, buffer: &mut [u8]) {
            assert!(offset + buffer.len() <= self.len(), "read out of bounds");
            for (i, b) in buffer.iter_mut().enumerate() {
                let at = offset + i;
                *b = (self.0[at / 4].load(Ordering::Relaxed) >> ((at % 4) * 8)) as u8;
            }
        }
        fn write(&mut self, offset: usize, data: &[u8]) {
            assert!(offset + data.len() <= self.len(), "write out of bounds");
            for (i, &b) in data.iter().enumerate() {
                self.set(offset + i, b);
            }
        }
        fn load_acquire(&self, offset: usize) -> u32 {
            assert!(offset.is_multiple_of(4));
            self.0[offset / 4].load(Ordering::Acquire)
        }
        fn store_release(&mut self, offset: usize, value: u32) {
            assert!(offset.is_multiple_of(4));
            self.0[offset / 4].store(value, Ordering::Release);
        }
    }

    /// Plain bytes for single-threaded tests; every access is bounds-checked (a panic here
    /// would be a ring bug).
    struct Plain(Vec<u8>);

    impl SharedMemory for Plain {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn read(&self, offset: usize, buffer: &mut [u8]) {
            buffer.copy_from_slice(&self.0[offset..offset + buffer.len()]);
        }
        fn write(&mut self, offset: usize, data: &[u8]) {
            self.0[offset..offset + data.len()].copy_from_slice(data);
        }
        fn load_acquire(&self, offset: usize) -> u32 {
            let mut b = [0; 4];
            self.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn store_release(&mut self, offset: usize, value: u32) {
            self.write(offset, &value.to_le_bytes());
        }
    }

    /// 256 bytes of data, records of up to 100 bytes.
    fn layout() -> RingLayout {
        RingLayout::new(256, 100).unwrap()
    }

    fn pair() -> (Producer<Atomic>, Consumer<Atomic>, Atomic) {
        let mut memory = Atomic::new(layout().bytes());
        initialize(&mut memory, layout()).unwrap();
        let p = Producer::new(memory.clone(), layout()).unwrap();
        let c = Consumer::new(memory.clone(), layout()).unwrap();
        (p, c, memory)
    }

    fn frame(n: usize, seed: u32) -> Vec<u8> {
        (0..n).map(|i| (i as u32 * 7 + seed) as u8).collect()
    }

    /// The next record, copied out.
    fn pop<M: SharedMemory>(c: &mut Consumer<M>) -> Result<Option<Vec<u8>>, RingError> {
        let mut buffer = [0u8; 200];
        c.pop_into(&mut buffer)
            .map(|n| n.map(|n| buffer[..n].to_vec()))
    }

    #[test]
    fn layouts() {
        assert_eq!(RingLayout::new(0, 4), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(96, 4), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(8, 1), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(256, 0), Err(RingError::BadLayout));
        // 4 + 124 = 128: exactly half; one more byte pads to 136.
        assert!(RingLayout::new(256, 124).is_ok());
        assert_eq!(RingLayout::new(256, 125), Err(RingError::BadLayout));
        assert!(RingLayout::new(1 << 31, 1 << 20).is_ok());
        let l = RingLayout::new(16, 4).unwrap();
        assert_eq!((l.data(), l.max_record(), l.bytes()), (16, 4, 144));
        let e = RingLayout::ethernet();
        assert_eq!(RingLayout::new(e.data(), e.max_record() as u32), Ok(e));
        assert_eq!(
            e.max_record(),
            crate::netpacket::HEADER_SIZE + crate::netpacket::MAX_GSO_FRAME
        );
        assert_eq!(e.bytes(), 128 + (256 << 10));
        let small = Plain(vec![0; 100]);
        assert_eq!(
            Producer::new(small, layout()).err(),
            Some(RingError::MemoryTooSmall {
                needed: 384,
                length: 100
            })
        );
        assert!(Consumer::new(Plain(vec![0; 383]), layout()).is_err());
        assert!(initialize(&mut Plain(vec![]), layout()).is_err());
        assert!(Plain(vec![]).is_empty());
    }

    #[test]
    fn records_are_forwarded_in_place() {
        // The switch's path: peek a record in one ring, copy it into the next ring's slot
        // memory to memory (Atomic uses the bounce default), then release it.
        let (mut p1, mut c1, _) = pair();
        let (mut p2, mut c2, _) = pair();
        for i in 0..40u32 {
            let f = frame(1 + (i as usize * 37) % 100, i);
            p1.push(&[&f]).unwrap();
            let n = c1.peek().unwrap().unwrap();
            assert_eq!(
                c1.peek(),
                Ok(Some(n)),
                "peeking again gives the same record"
            );
            let mut head = [0u8; 3];
            let k = n.min(3);
            assert!(c1.read(0, &mut head[..k]));
            assert!(
                !c1.read(n - k + 1, &mut head[..k]),
                "reads stay inside the record"
            );
            p2.push_with(n, |slot| {
                assert_eq!(slot.len(), n);
                assert!(
                    !slot.write(n - k + 1, &head[..k]),
                    "writes stay inside the slot"
                );
                assert!(!slot.copy_from(k, &c1, k, n - k + 1));
                slot.write(0, &head[..k]) && slot.copy_from(k, &c1, k, n - k)
            })
            .unwrap();
            c1.release();
            assert_eq!(c1.peek(), Ok(None));
            assert_eq!(pop(&mut c2), Ok(Some(f)));
        }
        // A fill that gives up publishes nothing, and the ring goes on.
        assert_eq!(p2.push_with(10, |_| false), Err(PushError::Aborted));
        assert_eq!(pop(&mut c2), Ok(None));
        p2.push(&[b"after"]).unwrap();
        assert_eq!(pop(&mut c2), Ok(Some(b"after".to_vec())));
        // Nothing peeked: nothing to read, copy or release.
        assert!(!c2.read(0, &mut [0u8; 1]));
        p2.push_with(4, |slot| {
            !slot.copy_from(0, &c2, 0, 4) && slot.write(0, b"1234")
        })
        .unwrap();
        c2.release();
        assert_eq!(pop(&mut c2), Ok(Some(b"1234".to_vec())));
    }

    #[test]
    fn records_go_through_in_order_and_wrap() {
        let (mut p, mut c, _) = pair();
        assert_eq!(pop(&mut c), Ok(None));
        let mut published = 0u32;
        for round in 0..300u32 {
            let n = 1 + (round as usize * 13) % 100;
            let f = frame(n, round);
            // Pushed in two parts (header and frame, as the VMM does).
            let cut = n / 3;
            p.push(&[&f[..cut], &f[cut..]]).unwrap();
            published = p.index();
            assert_eq!(pop(&mut c).unwrap(), Some(f));
            assert_eq!(pop(&mut c), Ok(None));
        }
        assert_eq!(c.index(), published);
        assert!(published > 3 * 256, "wrapped several times");
        assert_eq!((p.layout(), c.layout()), (layout(), layout()));
    }

    #[test]
    fn full_and_bad_records() {
        let (mut p, mut c, _) = pair();
        assert_eq!(p.push(&[]), Err(PushError::BadRecord(0)));
        assert_eq!(p.push(&[&[]]), Err(PushError::BadRecord(0)));
        assert_eq!(p.push(&[&[0; 101]]), Err(PushError::BadRecord(101)));
        // 60-byte records take 64 bytes: four fill the 256.
        for i in 0..4 {
            assert_eq!(p.has_room(60), Ok(true));
            p.push(&[&frame(60, i)]).unwrap();
        }
        assert_eq!(p.has_room(1), Ok(false));
        assert_eq!(p.push(&[&[1]]), Err(PushError::Full));
        assert_eq!(pop(&mut c).unwrap(), Some(frame(60, 0)));
        // 64 bytes free at the start, but a 100-byte record needs 104.
        assert_eq!(p.push(&[&[1; 100]]), Err(PushError::Full));
        p.push(&[&[1; 4]]).unwrap();
        for i in 1..4 {
            assert_eq!(pop(&mut c).unwrap(), Some(frame(60, i)));
        }
        assert_eq!(pop(&mut c).unwrap(), Some(vec![1; 4]));
        assert_eq!(pop(&mut c), Ok(None));
        // A record that does not fit before the end wraps (the marker, then the record).
        let (mut p, mut c, _) = pair();
        for i in 0..3 {
            p.push(&[&frame(60, i)]).unwrap();
        }
        assert_eq!(pop(&mut c).unwrap(), Some(frame(60, 0)));
        // 64 bytes to the end, 64 free at the start: 100 bytes need 104 contiguous.
        assert_eq!(p.has_room(100), Ok(false));
        assert_eq!(pop(&mut c).unwrap(), Some(frame(60, 1)));
        p.push(&[&frame(100, 9)]).unwrap();
        assert_eq!(p.index(), 192 + 64 + 104);
        assert_eq!(pop(&mut c).unwrap(), Some(frame(60, 2)));
        assert_eq!(pop(&mut c).unwrap(), Some(frame(100, 9)));
        assert_eq!(c.index(), p.index());
        // A buffer too small for a record skips it.
        p.push(&[&frame(50, 1)]).unwrap();
        p.push(&[&frame(5, 2)]).unwrap();
        let mut tiny = [0u8; 10];
        assert_eq!(
            c.pop_into(&mut tiny),
            Err(RingError::BufferTooSmall { length: 50 })
        );
        assert_eq!(c.pop_into(&mut tiny), Ok(Some(5)));
        assert_eq!(tiny[..5], frame(5, 2)[..]);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let mut memory = Atomic::new(layout().bytes());
        let start = u32::MAX - 255;
        memory.store_release(PRODUCER_INDEX, start);
        memory.store_release(CONSUMER_INDEX, start);
        let mut p = Producer::new(memory.clone(), layout()).unwrap();
        let mut c = Consumer::new(memory.clone(), layout()).unwrap();
        p.head = start;
        c.tail = start;
        for i in 0..40 {
            p.push(&[&frame(5, i)]).unwrap();
            p.push(&[&frame(70, i)]).unwrap();
            assert_eq!(pop(&mut c).unwrap(), Some(frame(5, i)));
            assert_eq!(pop(&mut c).unwrap(), Some(frame(70, i)));
        }
        assert!(c.index() < start, "the index wrapped");
    }

    #[test]
    fn hostile_producer() {
        let (mut p, mut c, mut shared) = pair();
        // Indices that jump ahead by more than the ring.
        for bad in [257, 1000, u32::MAX, 12] {
            shared.store_release(PRODUCER_INDEX, bad);
            assert_eq!(pop(&mut c), Err(RingError::IndexJump { own: 0, peer: bad }));
            assert_eq!(c.index(), 0, "nothing consumed");
        }
        // Lengths: 0, past the largest record, huge, past what was published, past the end
        // of the data area: each skips everything published.
        for (length, published) in [(0u32, 64), (101, 256), (0x8000_0000, 8), (60, 32)] {
            let index = c.index();
            shared.write(DATA_OFFSET + (index % 256) as usize, &length.to_le_bytes());
            shared.store_release(PRODUCER_INDEX, index + published);
            assert_eq!(pop(&mut c), Err(RingError::BadLength { index, length }));
            assert_eq!(c.index(), index + published);
            assert_eq!(pop(&mut c), Ok(None));
        }
        // Now at 360 (104 into the area): 100 bytes would reach past its end.
        let index = c.index();
        assert_eq!(index % 256, 104);
        shared.write(DATA_OFFSET + 104, &100u32.to_le_bytes());
        shared.write(DATA_OFFSET + 104 + 100, &100u32.to_le_bytes());
        shared.write(DATA_OFFSET + 208, &44u32.to_le_bytes());
        shared.store_release(PRODUCER_INDEX, index + 152);
        // 100 fits below the end (104 + 104 = 208 <= 256): fine; then 44 at 208 takes 48.
        assert_eq!(pop(&mut c).unwrap().map(|f| f.len()), Some(100));
        assert_eq!(pop(&mut c).unwrap().map(|f| f.len()), Some(44));
        // A wrap marker that claims more than was published is a bad length.
        let index = c.index();
        assert_eq!(index % 256, 0);
        shared.write(DATA_OFFSET, &WRAP.to_le_bytes());
        shared.store_release(PRODUCER_INDEX, index + 8);
        assert_eq!(
            pop(&mut c),
            Err(RingError::BadLength {
                index,
                length: WRAP
            })
        );
        // A good record after the bad ones still comes through.
        let index = c.index();
        let at = DATA_OFFSET + (index % 256) as usize;
        shared.write(at, &3u32.to_le_bytes());
        shared.write(at + 4, b"abc");
        shared.store_release(PRODUCER_INDEX, index + 8);
        assert_eq!(pop(&mut c).unwrap(), Some(b"abc".to_vec()));
        // The producer sees the consumer's progress.
        p.head = index + 8;
        assert_eq!(p.pending(), Ok(0));
    }

    #[test]
    fn hostile_consumer() {
        let (mut p, _, mut shared) = pair();
        p.push(&[b"one"]).unwrap();
        // A consumer index ahead of the producer (or far behind) is refused.
        for bad in [9, 100, u32::MAX - 255] {
            shared.store_release(CONSUMER_INDEX, bad);
            assert_eq!(
                p.push(&[b"two"]),
                Err(PushError::Ring(RingError::IndexJump { own: 8, peer: bad }))
            );
        }
        assert_eq!(p.index(), 8);
        shared.store_release(CONSUMER_INDEX, 8);
        p.push(&[b"two"]).unwrap();
    }

    /// Random bytes everywhere, rewritten between calls: no panic (the memory checks every
    /// access), no record longer than the largest, every call returns.
    #[test]
    fn garbage() {
        let mut random = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        let layout = RingLayout::new(64, 20).unwrap();
        let mut memory = Plain(vec![0; layout.bytes()]);
        for b in memory.0.iter_mut() {
            *b = random() as u8;
        }
        let mut c = Consumer::new(memory, layout).unwrap();
        let mut good = 0;
        let mut buffer = [0u8; 20];
        for _ in 0..30_000 {
            let at = (random() as usize) % layout.bytes();
            c.memory.0[at] = random() as u8;
            if random().is_multiple_of(4) {
                let head = c.tail.wrapping_add(match random() % 8 {
                    0 => (random() % 80) as u32,
                    _ => 8 * (random() % 10) as u32,
                });
                c.memory.store_release(PRODUCER_INDEX, head);
            }
            if random().is_multiple_of(3) {
                let at = DATA_OFFSET + (c.tail & 63) as usize;
                let length = match random() % 4 {
                    0 => WRAP,
                    _ => (random() % 30) as u32,
                };
                c.memory.write(at, &length.to_le_bytes());
            }
            if let Ok(Some(n)) = c.pop_into(&mut buffer) {
                assert!(n > 0 && n <= 20);
                good += 1;
            }
        }
        assert!(good > 300, "some records looked good ({good})");
        let text = alloc::format!(
            "{} {} {} {} {}",
            RingError::BadLayout,
            RingError::MemoryTooSmall {
                needed: 1,
                length: 0
            },
            RingError::BufferTooSmall { length: 3 },
            PushError::Full,
            PushError::BadRecord(0)
        );
        assert!(!text.is_empty());
    }

    /// Two threads, one ring: every record arrives once, intact and in order, with the
    /// producer spinning on a full ring and the consumer on an empty one.
    #[test]
    fn two_threads() {
        const RECORDS: u32 = 50_000;
        let layout = RingLayout::new(512, 200).unwrap();
        let mut memory = Atomic::new(layout.bytes());
        initialize(&mut memory, layout).unwrap();
        let mut p = Producer::new(memory.clone(), layout).unwrap();
        let mut c = Consumer::new(memory, layout).unwrap();
        let size = |i: u32| 1 + (i as usize * 37) % 200;
        let producer = std::thread::spawn(move || {
            let mut full = 0u64;
            for i in 0..RECORDS {
                let f = frame(size(i), i);
                loop {
                    match p.push(&[&f]) {
                        Ok(()) => break,
                        Err(PushError::Full) => {
                            full += 1;
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("producer: {e}"),
                    }
                }
            }
            full
        });
        let mut expected = 0u32;
        let mut buffer = [0u8; 200];
        while expected < RECORDS {
            match c.pop_into(&mut buffer) {
                Ok(Some(n)) => {
                    assert_eq!(&buffer[..n], &frame(size(expected), expected)[..]);
                    expected += 1;
                }
                Ok(None) => std::thread::yield_now(),
                Err(e) => panic!("consumer: {e}"),
            }
        }
        producer.join().unwrap();
        assert_eq!(c.pop_into(&mut buffer), Ok(None));
    }
}
