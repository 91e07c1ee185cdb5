//! A bitmap allocator of 4 KiB physical frames over one contiguous pool.

use alloc::vec;
use alloc::vec::Vec;

/// Frame size.
pub const FRAME_SIZE: u64 = 4096;

/// Why a frame could not be freed or reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not frame aligned.
    Unaligned,
    /// The address is outside the pool.
    OutOfPool,
    /// The frame is already free (double free).
    AlreadyFree,
    /// The frame is already allocated.
    AlreadyAllocated,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            FrameError::Unaligned => "frame address not aligned",
            FrameError::OutOfPool => "frame outside the pool",
            FrameError::AlreadyFree => "frame already free",
            FrameError::AlreadyAllocated => "frame already allocated",
        })
    }
}

/// Allocates frames of the physical range `base .. base + frames * 4096`.
/// A set bit means "allocated".
#[derive(Debug)]
pub struct FrameAllocator {
    base: u64,
    frames: usize,
    bitmap: Vec<u64>,
    free: usize,
    /// Where the next search starts (a hint: frames below it were full at some point).
    hint: usize,
}

impl FrameAllocator {
    /// A pool of `frames` free frames starting at `base` (must be aligned).
    pub fn new(base: u64, frames: usize) -> Self {
        assert!(
            base.is_multiple_of(FRAME_SIZE),
            "pool base must be frame aligned"
        );
        let words = frames.div_ceil(64);
        let mut bitmap = vec![0u64; words];
        // Mark the bits past the end as allocated so searches never return them.
        if !frames.is_multiple_of(64) {
            bitmap[words - 1] = !0u64 << (frames % 64);
        }
        FrameAllocator {
            base,
            frames,
            bitmap,
            free: frames,
            hint: 0,
        }
    }

    /// Number of free frames.
    pub fn free_frames(&self) -> usize {
        self.free
    }

    /// Number of frames in the pool.
    pub fn total_frames(&self) -> usize {
        self.frames
    }

    /// Allocate one frame; returns its physical address.
    pub fn allocate(&mut self) -> Option<u64> {
        let words = self.bitmap.len();
        for step in 0..words {
            let w = (self.hint + step) % words;
            if self.bitmap[w] != u64::MAX {
                let bit = (!self.bitmap[w]).trailing_zeros() as usize;
                self.bitmap[w] |= 1 << bit;
                self.free -= 1;
                self.hint = w;
                return Some(self.base + ((w * 64 + bit) as u64) * FRAME_SIZE);
            }
        }
        None
    }

    /// Allocate `count` contiguous frames whose first frame index is a multiple of
    /// `align_frames` (a power of two, relative to physical address 0).
    pub fn allocate_contiguous(&mut self, count: usize, align_frames: usize) -> Option<u64> {
        if count == 0 || !align_frames.is_power_of_two() {
            return None;
        }
        let base_frame = (self.base / FRAME_SIZE) as usize;
        // First index i >= 0 with (base_frame + i) aligned.
        let mut start = (align_frames - base_frame % align_frames) % align_frames;
        while start + count <= self.frames {
            match (start..start + count).find(|&i| self.is_allocated(i)) {
                None => {
                    for i in start..start + count {
                        self.set(i, true);
                    }
                    self.free -= count;
                    return Some(self.base + start as u64 * FRAME_SIZE);
                }
                Some(busy) => {
                    start = (busy + 1).next_multiple_of(align_frames);
                    // keep alignment relative to physical 0
                    let misalign = (base_frame + start) % align_frames;
                    if misalign != 0 {
                        start += align_frames - misalign;
                    }
                }
            }
        }
        None
    }

    /// Free the frame at `address`.
    pub fn free(&mut self, address: u64) -> Result<(), FrameError> {
        let index = self.index(address)?;
        if !self.is_allocated(index) {
            return Err(FrameError::AlreadyFree);
        }
        self.set(index, false);
        self.free += 1;
        if index / 64 < self.hint {
            self.hint = index / 64;
        }
        Ok(())
    }

    /// Mark the frame at `address` as allocated (for memory in use before the allocator).
    pub fn reserve(&mut self, address: u64) -> Result<(), FrameError> {
        let index = self.index(address)?;
        if self.is_allocated(index) {
            return Err(FrameError::AlreadyAllocated);
        }
        self.set(index, true);
        self.free -= 1;
        Ok(())
    }

    /// Whether `address` lies in the pool.
    pub fn contains(&self, address: u64) -> bool {
        address >= self.base && address < self.base + self.frames as u64 * FRAME_SIZE
    }

    fn index(&self, address: u64) -> Result<usize, FrameError> {
        if !address.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Unaligned);
        }
        if !self.contains(address) {
            return Err(FrameError::OutOfPool);
        }
        Ok(((address - self.base) / FRAME_SIZE) as usize)
    }

    fn is_allocated(&self, index: usize) -> bool {
        self.bitmap[index / 64] & (1 << (index % 64)) != 0
    }

    fn set(&mut self, index: usize, allocated: bool) {
        if allocated {
            self.bitmap[index / 64] |= 1 << (index % 64);
        } else {
            self.bitmap[index / 64] &= !(1 << (index % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn allocates_every_frame_once_then_runs_out() {
        let mut a = FrameAllocator::new(0x10_0000, 130);
        let mut seen = BTreeSet::new();
        for _ in 0..130 {
            let f = a.allocate().unwrap();
            assert!((0x10_0000..0x10_0000 + 130 * 4096).contains(&f));
            assert_eq!(f % 4096, 0);
            assert!(seen.insert(f), "frame {f:#x} handed out twice");
        }
        assert_eq!(a.allocate(), None);
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn free_makes_frame_reusable_and_detects_double_free() {
        let mut a = FrameAllocator::new(0, 64);
        let f = a.allocate().unwrap();
        assert_eq!(a.free(f), Ok(()));
        assert_eq!(a.free(f), Err(FrameError::AlreadyFree));
        assert_eq!(a.free(f + 1), Err(FrameError::Unaligned));
        assert_eq!(a.free(64 * 4096), Err(FrameError::OutOfPool));
        assert_eq!(a.free_frames(), 64);
        let g = a.allocate().unwrap();
        assert_eq!(g, f);
    }

    #[test]
    fn reserve_excludes_frames() {
        let mut a = FrameAllocator::new(0, 4);
        a.reserve(0x1000).unwrap();
        assert_eq!(a.reserve(0x1000), Err(FrameError::AlreadyAllocated));
        let got: BTreeSet<u64> = (0..3).map(|_| a.allocate().unwrap()).collect();
        assert!(!got.contains(&0x1000));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn contiguous_respects_alignment_and_holes() {
        let mut a = FrameAllocator::new(0x1000, 64);
        // frame index 0 is at physical frame 1; 4-frame alignment starts at index 3
        let run = a.allocate_contiguous(4, 4).unwrap();
        assert_eq!(run, 0x4000);
        a.reserve(0x9000).unwrap();
        let run2 = a.allocate_contiguous(4, 4).unwrap();
        assert_eq!(run2 % 0x4000, 0);
        assert!(
            run2 >= 0xc000,
            "must skip the hole at 0x9000, got {run2:#x}"
        );
        assert_eq!(a.free_frames(), 64 - 9);
        assert_eq!(a.allocate_contiguous(0, 1), None);
        assert_eq!(a.allocate_contiguous(1, 3), None);
        assert_eq!(a.allocate_contiguous(65, 1), None);
    }

    #[test]
    fn randomized_against_model() {
        let mut a = FrameAllocator::new(0x20_0000, 200);
        let mut model: BTreeSet<u64> = BTreeSet::new();
        let mut seed = 0x1234_5678u64;
        for _ in 0..5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if !(seed >> 33).is_multiple_of(3) {
                match a.allocate() {
                    Some(f) => assert!(model.insert(f)),
                    None => assert_eq!(model.len(), 200),
                }
            } else if let Some(&f) = model.iter().nth((seed >> 40) as usize % model.len().max(1)) {
                model.remove(&f);
                a.free(f).unwrap();
            }
            assert_eq!(a.free_frames(), 200 - model.len());
        }
    }
}
