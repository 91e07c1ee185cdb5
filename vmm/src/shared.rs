//! Memory shared with another task, for the frame rings of `l4linux_glue::netring` between a
//! VMM and the network switch. The other side may write at any time (and may be hostile):
//! bytes are copied with string instructions in inline assembly (which the compiler cannot
//! assume anything about, so a concurrent write by the peer is no data race in Rust's sense,
//! only changed bytes), the two index words with acquire and release atomics, as the ring's
//! ordering contract asks; every access is bounds-checked here too.

use core::sync::atomic::{AtomicU32, Ordering};
use l4linux_glue::netring::SharedMemory;

/// `len` bytes at `base` of our address space, shared with another task.
pub struct SharedRegion {
    base: u64,
    len: usize,
}

impl SharedRegion {
    /// The region `base..base + len`.
    ///
    /// # Safety
    /// The range must be mapped readable and writable in this task for the region's whole
    /// lifetime, `base` 4-byte aligned, and no Rust reference may point into it.
    pub unsafe fn new(base: u64, len: usize) -> SharedRegion {
        SharedRegion { base, len }
    }

    fn inside(&self, offset: usize, length: usize) -> bool {
        offset
            .checked_add(length)
            .is_some_and(|end| end <= self.len)
    }
}

/// Copy `length` bytes from `source` to `destination` with `rep movsq` and `rep movsb`: eight
/// bytes per instruction (the ring's frames are the VMM's and the switch's largest copies; a
/// volatile byte loop took about five instructions per byte).
///
/// # Safety
/// Both ranges must be mapped (readable, writable) for `length` bytes and must not overlap.
/// Either may be written concurrently by another task: the assembly's accesses are opaque to
/// the compiler, so that only makes the copied bytes arbitrary.
unsafe fn copy_bytes(source: *const u8, destination: *mut u8, length: usize) {
    // SAFETY: the caller vouches for the ranges; the direction flag is clear (the ABI keeps it
    // so between calls); RCX, RSI and RDI are declared clobbered.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) length & 7,
            inout("rcx") length / 8 => _,
            inout("rsi") source => _,
            inout("rdi") destination => _,
            options(nostack, preserves_flags),
        );
    }
}

impl SharedMemory for SharedRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, buffer: &mut [u8]) {
        if !self.inside(offset, buffer.len()) {
            buffer.fill(0);
            return;
        }
        // SAFETY: the source is inside the region (checked), which `new`'s contract keeps
        // mapped; the destination is `buffer`, exclusively ours.
        unsafe {
            copy_bytes(
                (self.base as usize + offset) as *const u8,
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        if !self.inside(offset, data.len()) {
            return;
        }
        // SAFETY: the destination is inside the region (checked, kept mapped by `new`'s
        // contract), the source is `data`; they do not overlap (no reference points into the
        // region).
        unsafe {
            copy_bytes(
                data.as_ptr(),
                (self.base as usize + offset) as *mut u8,
                data.len(),
            )
        };
    }

    fn load_acquire(&self, offset: usize) -> u32 {
        if !self.inside(offset, 4) || !offset.is_multiple_of(4) {
            return 0;
        }
        // SAFETY: an aligned word inside the region; the other side accesses it only
        // atomically too.
        let word = unsafe { AtomicU32::from_ptr((self.base as usize + offset) as *mut u32) };
        u32::from_le(word.load(Ordering::Acquire))
    }

    fn copy_from(&mut self, offset: usize, source: &Self, source_offset: usize, length: usize) {
        if !self.inside(offset, length) || !source.inside(source_offset, length) {
            return;
        }
        // SAFETY: both ranges are inside their regions (checked), which `new`'s contract keeps
        // mapped; two regions never share memory (`new`: each range is used only through its
        // one region, and `&mut self` and `&Self` are two of them), so they do not overlap.
        unsafe {
            copy_bytes(
                (source.base as usize + source_offset) as *const u8,
                (self.base as usize + offset) as *mut u8,
                length,
            )
        };
    }

    fn store_release(&mut self, offset: usize, value: u32) {
        if !self.inside(offset, 4) || !offset.is_multiple_of(4) {
            return;
        }
        // SAFETY: as for `load_acquire`.
        let word = unsafe { AtomicU32::from_ptr((self.base as usize + offset) as *mut u32) };
        word.store(value.to_le(), Ordering::Release);
    }
}
