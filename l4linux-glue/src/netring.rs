//! A single-producer, single-consumer ring of Ethernet frames in memory shared between two
//! tasks (a VMM and the virtual switch, one ring per direction), as pure logic over a
//! [`SharedMemory`] trait: the VMM implements it over the mapped pages, tests over atomics.
//!
//! # Layout
//!
//! Both sides agree on a [`RingLayout`] out of band (from their configuration, never from the
//! shared memory, which the other side may rewrite at any time):
//!
//! | offset | bytes | what |
//! | --- | --- | --- |
//! | 0 | 4 | producer index: frames published so far (wrapping `u32`), written only by the producer |
//! | 64 | 4 | consumer index: frames consumed so far (wrapping `u32`), written only by the consumer |
//! | 128 + i * slot_size | slot_size | slot i: a little-endian `u32` length, then the frame |
//!
//! Frame `n` lives in slot `n % slots`; the ring is empty when the indices are equal and full
//! when the producer is `slots` ahead. The indices sit in separate 64-byte lines so that the
//! two sides do not write the same cache line.
//!
//! # Memory-ordering contract (for the shared-memory implementation)
//!
//! * The producer writes the slot (length word and frame) with plain stores, then publishes
//!   the new producer index with [`SharedMemory::store_release`]. The consumer reads the
//!   producer index with [`SharedMemory::load_acquire`] and only then reads the slot: release
//!   and acquire make the slot's contents visible before the index that covers it.
//! * The consumer copies the frame out of the slot, then publishes the new consumer index with
//!   release; the producer reads it with acquire before it reuses the slot, so it never
//!   overwrites a slot that is still being read.
//! * Each side keeps its own index in private memory and only ever writes it to the shared
//!   copy: it never reads its own index back (the other side could have changed it).
//! * The plain accesses ([`SharedMemory::read`], [`SharedMemory::write`]) race with a hostile
//!   peer by design; an implementation must make them well-defined anyway (volatile or relaxed
//!   atomic copies, never a Rust reference to the shared bytes). The indices are aligned
//!   32-bit words, so `AtomicU32` accesses with `Acquire` / `Release` ordering fit.
//!
//! # Hostile peers
//!
//! Each side treats what the other writes as hostile. The consumer reads the length word once
//! into private memory, refuses a length of 0 or past the slot ([`RingError::BadLength`]: the
//! slot is skipped, so one bad frame costs one frame) and refuses a producer index that is
//! more than `slots` ahead of its own ([`RingError::IndexJump`], nothing consumed: the link is
//! broken until the peer's index is sane again). The producer refuses a consumer index that is
//! ahead of its own or more than `slots` behind. Every access lies inside
//! [`RingLayout::bytes`], which [`Producer::new`] and [`Consumer::new`] check against the
//! memory's length, so no index or length from the peer can lead out of the region.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Offset of the producer index.
pub const PRODUCER_INDEX: usize = 0;
/// Offset of the consumer index.
pub const CONSUMER_INDEX: usize = 64;
/// Offset of slot 0.
pub const SLOTS_OFFSET: usize = 128;
/// Bytes of a slot's length word.
pub const LENGTH_WORD: usize = 4;

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
}

/// Why a ring could not be set up or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The slot count is not a power of two (or 0), or a slot cannot hold a length word and
    /// one byte, is not a multiple of 4 bytes, or the ring does not fit in `usize`.
    BadLayout,
    /// The memory is smaller than the layout.
    MemoryTooSmall {
        /// Bytes the layout needs.
        needed: usize,
        /// Bytes the memory has.
        length: usize,
    },
    /// The peer's index is impossible: the producer's more than `slots` ahead of the
    /// consumer's, or the consumer's ahead of the producer's.
    IndexJump {
        /// This side's index.
        own: u32,
        /// The index the peer published.
        peer: u32,
    },
    /// A slot's length word is 0 or more than a slot holds (the slot was skipped).
    BadLength {
        /// The slot's frame number.
        index: u32,
        /// The length word.
        length: u32,
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
                write!(f, "frame {index} has a bad length {length}")
            }
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Every slot is in use (the consumer is behind): drop the frame or retry later.
    Full,
    /// The frame is empty or longer than [`RingLayout::max_frame`].
    BadFrame(usize),
    /// The consumer's index is impossible.
    Ring(RingError),
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PushError::Full => write!(f, "frame ring full"),
            PushError::BadFrame(length) => write!(f, "a frame of {length} bytes does not fit"),
            PushError::Ring(error) => write!(f, "{error}"),
        }
    }
}

/// The geometry of a ring: how many slots of how many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    slots: u32,
    slot_size: u32,
}

impl RingLayout {
    /// A ring of `slots` slots (a power of two) of `slot_size` bytes each (a multiple of 4,
    /// more than the 4-byte length word).
    pub fn new(slots: u32, slot_size: u32) -> Result<Self, RingError> {
        let layout = RingLayout { slots, slot_size };
        if !slots.is_power_of_two()
            || slot_size as usize <= LENGTH_WORD
            || !slot_size.is_multiple_of(4)
            || layout.checked_bytes().is_none()
        {
            return Err(RingError::BadLayout);
        }
        Ok(layout)
    }

    /// The layout the VMM-switch link uses: 256 slots of 2 KiB (516 KiB in all), room for any
    /// Ethernet frame without a jumbo MTU.
    pub fn ethernet() -> Self {
        RingLayout {
            slots: 256,
            slot_size: 2048,
        }
    }

    fn checked_bytes(&self) -> Option<usize> {
        (self.slots as usize)
            .checked_mul(self.slot_size as usize)?
            .checked_add(SLOTS_OFFSET)
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The bytes of one slot.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// The largest frame a slot holds.
    pub fn max_frame(&self) -> usize {
        self.slot_size as usize - LENGTH_WORD
    }

    /// The bytes the ring occupies.
    pub fn bytes(&self) -> usize {
        // Checked in `new`.
        self.slots as usize * self.slot_size as usize + SLOTS_OFFSET
    }

    fn slot(&self, index: u32) -> usize {
        SLOTS_OFFSET + (index & (self.slots - 1)) as usize * self.slot_size as usize
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

    /// Frames published so far (wrapping).
    pub fn index(&self) -> u32 {
        self.head
    }

    /// The memory (to hand it back).
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// Frames published and not yet consumed, as far as the consumer's index tells.
    pub fn pending(&self) -> Result<u32, RingError> {
        let tail = self.memory.load_acquire(CONSUMER_INDEX);
        let used = self.head.wrapping_sub(tail);
        if used > self.layout.slots {
            return Err(RingError::IndexJump {
                own: self.head,
                peer: tail,
            });
        }
        Ok(used)
    }

    /// Copy `frame` into the next slot and publish it.
    pub fn push(&mut self, frame: &[u8]) -> Result<(), PushError> {
        if frame.is_empty() || frame.len() > self.layout.max_frame() {
            return Err(PushError::BadFrame(frame.len()));
        }
        if self.pending().map_err(PushError::Ring)? == self.layout.slots {
            return Err(PushError::Full);
        }
        let slot = self.layout.slot(self.head);
        // Fits: max_frame() < 2^32.
        let length = frame.len() as u32;
        self.memory.write(slot, &length.to_le_bytes());
        self.memory.write(slot + LENGTH_WORD, frame);
        self.head = self.head.wrapping_add(1);
        self.memory.store_release(PRODUCER_INDEX, self.head);
        Ok(())
    }
}

/// The consuming side of a ring.
pub struct Consumer<M> {
    memory: M,
    layout: RingLayout,
    tail: u32,
    buffer: Vec<u8>,
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
            buffer: vec![0; layout.max_frame()],
        })
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Frames consumed so far (wrapping).
    pub fn index(&self) -> u32 {
        self.tail
    }

    /// The memory (to hand it back).
    pub fn into_memory(self) -> M {
        self.memory
    }

    /// Frames published and not yet consumed.
    pub fn pending(&self) -> Result<u32, RingError> {
        let head = self.memory.load_acquire(PRODUCER_INDEX);
        let available = head.wrapping_sub(self.tail);
        if available > self.layout.slots {
            return Err(RingError::IndexJump {
                own: self.tail,
                peer: head,
            });
        }
        Ok(available)
    }

    /// The next frame, copied out of the ring (the slot is released before this returns), or
    /// `None` if the ring is empty. A bad length skips its slot and is reported; an impossible
    /// producer index consumes nothing.
    pub fn pop(&mut self) -> Result<Option<&[u8]>, RingError> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        let index = self.tail;
        let slot = self.layout.slot(index);
        let mut word = [0u8; LENGTH_WORD];
        self.memory.read(slot, &mut word);
        let length = u32::from_le_bytes(word);
        let result = match usize::try_from(length) {
            Ok(n) if n > 0 && n <= self.layout.max_frame() => {
                self.memory.read(slot + LENGTH_WORD, &mut self.buffer[..n]);
                Ok(n)
            }
            _ => Err(RingError::BadLength { index, length }),
        };
        self.tail = self.tail.wrapping_add(1);
        self.memory.store_release(CONSUMER_INDEX, self.tail);
        result.map(|n| Some(&self.buffer[..n]))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
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

    fn layout() -> RingLayout {
        RingLayout::new(8, 64).unwrap()
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

    #[test]
    fn layouts() {
        assert_eq!(RingLayout::new(0, 64), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(6, 64), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(8, 4), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(8, 66), Err(RingError::BadLayout));
        assert_eq!(RingLayout::new(1 << 31, !3).is_ok(), usize::BITS == 64);
        let l = RingLayout::new(1, 8).unwrap();
        assert_eq!(
            (l.slots(), l.slot_size(), l.max_frame(), l.bytes()),
            (1, 8, 4, 136)
        );
        let e = RingLayout::ethernet();
        assert_eq!(RingLayout::new(e.slots(), e.slot_size()), Ok(e));
        assert!(e.max_frame() >= crate::virtio::net::MAX_FRAME);
        assert_eq!(e.bytes(), 128 + 256 * 2048);
        let small = Plain(vec![0; 100]);
        assert_eq!(
            Producer::new(small, layout()).err(),
            Some(RingError::MemoryTooSmall {
                needed: 640,
                length: 100
            })
        );
        assert!(Consumer::new(Plain(vec![0; 639]), layout()).is_err());
        assert!(initialize(&mut Plain(vec![]), layout()).is_err());
        assert!(Plain(vec![]).is_empty());
    }

    #[test]
    fn frames_go_through_in_order() {
        let (mut p, mut c, _) = pair();
        assert_eq!(c.pop(), Ok(None));
        for round in 0..100u32 {
            let n = 1 + (round as usize * 13) % 60;
            p.push(&frame(n, round)).unwrap();
            assert_eq!((p.pending(), c.pending()), (Ok(1), Ok(1)));
            assert_eq!(c.pop().unwrap(), Some(&frame(n, round)[..]));
            assert_eq!(c.pop(), Ok(None));
        }
        assert_eq!((p.index(), c.index()), (100, 100));
        assert_eq!((p.layout(), c.layout()), (layout(), layout()));
    }

    #[test]
    fn full_and_bad_frames() {
        let (mut p, mut c, _) = pair();
        assert_eq!(p.push(&[]), Err(PushError::BadFrame(0)));
        assert_eq!(p.push(&[0; 61]), Err(PushError::BadFrame(61)));
        for i in 0..8 {
            p.push(&frame(60, i)).unwrap();
        }
        assert_eq!(p.push(&[1]), Err(PushError::Full));
        assert_eq!(c.pop().unwrap(), Some(&frame(60, 0)[..]));
        p.push(&[1]).unwrap();
        assert_eq!(p.push(&[1]), Err(PushError::Full));
        for i in 1..8 {
            assert_eq!(c.pop().unwrap(), Some(&frame(60, i)[..]));
        }
        assert_eq!(c.pop().unwrap(), Some(&[1u8][..]));
        assert_eq!(c.pop(), Ok(None));
    }

    #[test]
    fn indices_wrap_around_u32() {
        let mut memory = Atomic::new(layout().bytes());
        memory.store_release(PRODUCER_INDEX, u32::MAX - 2);
        memory.store_release(CONSUMER_INDEX, u32::MAX - 2);
        let mut p = Producer::new(memory.clone(), layout()).unwrap();
        let mut c = Consumer::new(memory.clone(), layout()).unwrap();
        p.head = u32::MAX - 2;
        c.tail = u32::MAX - 2;
        for i in 0..20 {
            p.push(&frame(5, i)).unwrap();
            p.push(&frame(6, i)).unwrap();
            assert_eq!(c.pop().unwrap(), Some(&frame(5, i)[..]));
            assert_eq!(c.pop().unwrap(), Some(&frame(6, i)[..]));
        }
        assert_eq!(c.index(), 37);
    }

    #[test]
    fn hostile_producer() {
        let (mut p, mut c, mut shared) = pair();
        // Indices that jump ahead by more than the ring, or behind the consumer.
        for bad in [9, 1000, u32::MAX] {
            shared.store_release(PRODUCER_INDEX, bad);
            assert_eq!(c.pop(), Err(RingError::IndexJump { own: 0, peer: bad }));
            assert_eq!(c.index(), 0, "nothing consumed");
        }
        // Exactly a ring ahead is a full ring of (here: zero-length) slots.
        shared.store_release(PRODUCER_INDEX, 8);
        assert_eq!(c.pending(), Ok(8));
        // Lengths: 0, a byte past the slot, huge.
        let lengths = [0u32, 61, 0x8000_0000, u32::MAX];
        for (i, &length) in lengths.iter().enumerate() {
            shared.write(SLOTS_OFFSET + 64 * i, &length.to_le_bytes());
        }
        for (i, &length) in lengths.iter().enumerate() {
            assert_eq!(
                c.pop(),
                Err(RingError::BadLength {
                    index: i as u32,
                    length
                })
            );
        }
        // A good slot after the bad ones still comes through.
        shared.write(SLOTS_OFFSET + 64 * 4, &3u32.to_le_bytes());
        shared.write(SLOTS_OFFSET + 64 * 4 + 4, b"abc");
        assert_eq!(c.pop().unwrap(), Some(&b"abc"[..]));
        // The producer sees the consumer's progress.
        p.head = 8;
        assert_eq!(p.pending(), Ok(3));
    }

    #[test]
    fn hostile_consumer() {
        let (mut p, _, mut shared) = pair();
        p.push(b"one").unwrap();
        // A consumer index ahead of the producer (or far behind) is refused.
        for bad in [2, 100, u32::MAX - 7] {
            shared.store_release(CONSUMER_INDEX, bad);
            assert_eq!(
                p.push(b"two"),
                Err(PushError::Ring(RingError::IndexJump { own: 1, peer: bad }))
            );
        }
        assert_eq!(p.index(), 1);
        shared.store_release(CONSUMER_INDEX, 1);
        p.push(b"two").unwrap();
    }

    /// Random bytes everywhere, rewritten between calls: no panic (the memory checks every
    /// access), no frame longer than a slot, every call returns.
    #[test]
    fn garbage() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let layout = RingLayout::new(16, 32).unwrap();
        let mut memory = Plain(vec![0; layout.bytes()]);
        for b in memory.0.iter_mut() {
            *b = random() as u8;
        }
        let mut c = Consumer::new(memory, layout).unwrap();
        let mut good = 0;
        for _ in 0..30_000 {
            let at = (random() as usize) % layout.bytes();
            c.memory.0[at] = random() as u8;
            if random() % 4 == 0 {
                let head = c.tail.wrapping_add((random() % 20) as u32);
                c.memory.store_release(PRODUCER_INDEX, head);
            }
            if random() % 3 == 0 {
                let at = SLOTS_OFFSET + 32 * (c.tail & 15) as usize;
                c.memory.write(at, &((random() % 40) as u32).to_le_bytes());
            }
            if let Ok(Some(f)) = c.pop() {
                assert!(!f.is_empty() && f.len() <= 28);
                good += 1;
            }
        }
        assert!(good > 300, "some frames looked good ({good})");
        let text = alloc::format!(
            "{} {} {} {}",
            RingError::BadLayout,
            RingError::MemoryTooSmall {
                needed: 1,
                length: 0
            },
            PushError::Full,
            PushError::BadFrame(0)
        );
        assert!(!text.is_empty());
    }

    /// Two threads, one ring: every frame arrives once, intact and in order, with the
    /// producer spinning on a full ring and the consumer on an empty one.
    #[test]
    fn two_threads() {
        const FRAMES: u32 = 50_000;
        let layout = RingLayout::new(16, 64).unwrap();
        let mut memory = Atomic::new(layout.bytes());
        initialize(&mut memory, layout).unwrap();
        let mut p = Producer::new(memory.clone(), layout).unwrap();
        let mut c = Consumer::new(memory, layout).unwrap();
        let producer = std::thread::spawn(move || {
            let mut full = 0u64;
            for i in 0..FRAMES {
                let n = 1 + (i as usize % 60);
                let f = frame(n, i);
                loop {
                    match p.push(&f) {
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
        while expected < FRAMES {
            match c.pop() {
                Ok(Some(f)) => {
                    let n = 1 + (expected as usize % 60);
                    assert_eq!(f, &frame(n, expected)[..], "frame {expected}");
                    expected += 1;
                }
                Ok(None) => std::thread::yield_now(),
                Err(e) => panic!("consumer: {e}"),
            }
        }
        producer.join().unwrap();
        assert_eq!(c.pop(), Ok(None));
        assert_eq!(c.index(), FRAMES);
    }
}
