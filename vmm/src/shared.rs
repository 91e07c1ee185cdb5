//! Memory shared with another task, for the frame rings of `l4linux_glue::netring` between a
//! VMM and the network switch. The other side may write at any time (and may be hostile):
//! bytes are copied with volatile accesses, the two index words with acquire and release
//! atomics, as the ring's ordering contract asks; every access is bounds-checked here too.

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

impl SharedMemory for SharedRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, buffer: &mut [u8]) {
        if !self.inside(offset, buffer.len()) {
            buffer.fill(0);
            return;
        }
        for (i, byte) in buffer.iter_mut().enumerate() {
            // SAFETY: inside the region (checked), which `new`'s contract keeps mapped.
            *byte =
                unsafe { core::ptr::read_volatile((self.base as usize + offset + i) as *const u8) };
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        if !self.inside(offset, data.len()) {
            return;
        }
        for (i, &byte) in data.iter().enumerate() {
            // SAFETY: as for `read`.
            unsafe {
                core::ptr::write_volatile((self.base as usize + offset + i) as *mut u8, byte)
            };
        }
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

    fn store_release(&mut self, offset: usize, value: u32) {
        if !self.inside(offset, 4) || !offset.is_multiple_of(4) {
            return;
        }
        // SAFETY: as for `load_acquire`.
        let word = unsafe { AtomicU32::from_ptr((self.base as usize + offset) as *mut u32) };
        word.store(value.to_le(), Ordering::Release);
    }
}
