//! Kernel memory: the kernel heap (a static arena for kernel objects, a buddy allocator) and the pool of physical
//! frames for page tables, UTCBs and the KIP.

use crate::arch::x86_64::paging::zero_frame;
use buddy_system_allocator::LockedHeap;
use kernel_core::FrameAllocator;

/// Bytes of the kernel heap.
pub const HEAP_SIZE: usize = 8 << 20;

#[repr(C, align(4096))]
struct HeapSpace([u8; HEAP_SIZE]);

static mut HEAP_SPACE: HeapSpace = HeapSpace([0; HEAP_SIZE]);

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::<32>::empty();

/// Hand the static heap area to the allocator.
pub fn init_heap() {
    // SAFETY: called once at boot; the area is a static used for nothing else.
    unsafe { HEAP.lock().init(&raw mut HEAP_SPACE as usize, HEAP_SIZE) }
}

/// Bytes of the kernel heap in use.
pub fn heap_used() -> usize {
    HEAP.lock().stats_alloc_actual()
}

/// Frames charged to a task's quota (page tables and UTCBs it causes).
pub struct Charged<'a> {
    /// The frame pool.
    pub frames: &'a mut FrameAllocator,
    /// The quota charged.
    pub quota: &'a mut kernel_core::Quota,
    /// The task's running total of charged bytes (refunded when it is destroyed).
    pub charged: &'a mut u64,
}

/// Bytes of a frame.
pub const FRAME_BYTES: u64 = 4096;

impl FrameSource for Charged<'_> {
    fn allocate_zeroed(&mut self) -> Option<u64> {
        self.quota.charge(FRAME_BYTES).ok()?;
        match self.frames.allocate_zeroed() {
            Some(frame) => {
                *self.charged += FRAME_BYTES;
                Some(frame)
            }
            None => {
                self.quota.refund(FRAME_BYTES);
                None
            }
        }
    }

    fn free_frame(&mut self, physical: u64) {
        self.frames.free_frame(physical);
        self.quota.refund(FRAME_BYTES);
        *self.charged = self.charged.saturating_sub(FRAME_BYTES);
    }
}

/// A source of physical frames for page tables.
pub trait FrameSource {
    /// A zero-filled frame.
    fn allocate_zeroed(&mut self) -> Option<u64>;
    /// Return a frame.
    fn free_frame(&mut self, physical: u64);
}

impl FrameSource for FrameAllocator {
    fn allocate_zeroed(&mut self) -> Option<u64> {
        let frame = self.allocate()?;
        zero_frame(frame);
        Some(frame)
    }

    fn free_frame(&mut self, physical: u64) {
        if let Err(e) = self.free(physical) {
            crate::warn!("freeing frame {physical:#x}: {e}");
        }
    }
}
