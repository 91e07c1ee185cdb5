//! Kernel memory: one pool of physical frames, sized from RAM at boot (see
//! `bootstrap::pool_size`), from which come page tables, UTCBs, VMCBs, FPU areas, the KIP and
//! the kernel heap. The heap (kernel objects, capability tables, the mapping databases, queues)
//! lives in a virtual area of its own and grows on demand by mapping frames of the pool, so
//! it never needs physically contiguous memory and is never a second, fixed limit beside the
//! pool. Only a small static heap exists for the allocations made before the pool does.
//!
//! Every byte allocated on a task's behalf is charged to a quota first (`Kernel::charge_*`),
//! and every charge first checks [`reserve_kept`]: the sum of the top-level quotas is smaller
//! than the pool, and the reserve is what the kernel keeps for itself, so an allocation within
//! quota finds memory and an allocation failure is `OutOfMemory` to the caller, never a panic.

use crate::arch::x86_64::paging::{boot_root, zero_frame, AddressSpace, NO_EXECUTE, WRITABLE};
use buddy_system_allocator::{Heap, LockedHeapWithRescue};
use core::alloc::Layout;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use kernel_core::FrameAllocator;
use l4_abi::Error;

/// Where the heap's virtual area starts (its own PML4 slot, 320, shared by every address
/// space like the rest of the kernel half).
pub const HEAP_BASE: u64 = 0xffff_a000_0000_0000;
/// Size of the heap's virtual area.
const HEAP_AREA: u64 = 1 << 39;
/// The heap grows by at least this much at a time.
const HEAP_GROWTH: u64 = 256 << 10;
/// The static heap for the allocations made at boot before the pool exists.
const BOOT_HEAP_SIZE: usize = 256 << 10;

/// Pool bytes the kernel keeps beyond every quota (see [`reserve_kept`]); set at boot.
static RESERVE: AtomicU64 = AtomicU64::new(0);
/// The next virtual address the heap grows at.
static HEAP_END: AtomicU64 = AtomicU64::new(HEAP_BASE);

#[repr(C, align(4096))]
struct BootHeap([u8; BOOT_HEAP_SIZE]);

static mut BOOT_HEAP: BootHeap = BootHeap([0; BOOT_HEAP_SIZE]);

#[global_allocator]
static HEAP: LockedHeapWithRescue<32> = LockedHeapWithRescue::new(grow_heap);

/// The frame pool. Locked only inside [`Pool`]'s methods and [`grow_heap`]; the allocator
/// never allocates from the heap, so the heap's growth never finds it locked by its own caller.
static FRAMES: spin::Mutex<Option<FrameAllocator>> = spin::Mutex::new(None);

/// Hand the static boot heap to the allocator (first thing at boot).
pub fn init_heap() {
    // SAFETY: called once at boot; the area is a static used for nothing else.
    unsafe {
        HEAP.lock()
            .init(&raw mut BOOT_HEAP as usize, BOOT_HEAP_SIZE)
    }
}

/// Install the frame pool and prepare the heap's virtual area (before the first task exists,
/// so that every address space shares it). `reserve` is what the kernel keeps beyond all
/// quotas.
pub fn init_pool(frames: FrameAllocator, reserve: u64) -> Pool {
    *FRAMES.lock() = Some(frames);
    RESERVE.store(reserve, Relaxed);
    let mut pool = Pool;
    let top = pool
        .allocate_zeroed()
        .expect("a frame for the heap's page directory pointer table");
    // SAFETY: the boot PML4 is the kernel's; slot 320 is unused until now and only the
    // kernel half (copied into each new address space) refers to it.
    unsafe {
        let pml4 = crate::arch::x86_64::paging::phys_to_virt(boot_root()) as *mut u64;
        *pml4.add(((HEAP_BASE >> 39) & 0x1ff) as usize) =
            top | crate::arch::x86_64::paging::PRESENT | WRITABLE;
    }
    pool
}

/// The allocator's rescue: map fresh frames of the pool at the end of the heap's area and
/// give them to the heap (aligned to the request's size, so one large block results).
fn grow_heap(heap: &mut Heap<32>, layout: &Layout) {
    let size = (layout.size().max(layout.align()) as u64)
        .next_power_of_two()
        .max(HEAP_GROWTH);
    let Some(mut guard) = FRAMES.try_lock() else {
        return;
    };
    let Some(frames) = guard.as_mut() else {
        return;
    };
    let start = HEAP_END.load(Relaxed).next_multiple_of(size);
    // The frames and a page table per 2 MiB; fail early rather than half way.
    if start + size > HEAP_BASE + HEAP_AREA
        || (frames.free_frames() as u64) < size / FRAME_BYTES + size / (2 << 20) + 2
    {
        return;
    }
    let kernel = AddressSpace { root: boot_root() };
    let mut address = start;
    while address < start + size {
        let Some(frame) = frames.allocate() else {
            break;
        };
        if kernel
            .map(address, frame, FRAME_BYTES, WRITABLE | NO_EXECUTE, frames)
            .is_err()
        {
            FrameSource::free_frame(frames, frame);
            break;
        }
        address += FRAME_BYTES;
    }
    if address < start + size {
        // Out of frames after all: give back what was mapped (the page tables stay).
        let mut page = start;
        while page < address {
            if let Some(frame) = kernel.unmap(page, frames) {
                FrameSource::free_frame(frames, frame);
            }
            page += FRAME_BYTES;
        }
        return;
    }
    // SAFETY: the range was just mapped, writable, and belongs to nothing else.
    unsafe { heap.add_to_heap(start as usize, (start + size) as usize) };
    HEAP_END.store(start + size, Relaxed);
}

/// Bytes of memory the kernel can still hand out: free frames of the pool and free heap.
pub fn available() -> u64 {
    let frames = FRAMES
        .lock()
        .as_ref()
        .map_or(0, |f| f.free_frames() as u64 * FRAME_BYTES);
    let heap = HEAP.lock();
    frames + (heap.stats_total_bytes() - heap.stats_alloc_actual()) as u64
}

/// Bytes of the heap in use.
pub fn heap_used() -> usize {
    HEAP.lock().stats_alloc_actual()
}

/// Bytes of the heap's memory (in use or free).
pub fn heap_size() -> usize {
    HEAP.lock().stats_total_bytes()
}

/// Whether more than the kernel's reserve is left. Every charge checks this first: quotas
/// bound each task and their sum is below the pool, so this fails only if charges
/// underestimated what the kernel allocates; then the request fails with `OutOfMemory`
/// instead of the kernel running out of memory.
pub fn reserve_kept() -> Result<(), Error> {
    if available() < RESERVE.load(Relaxed) {
        return Err(Error::OutOfMemory);
    }
    Ok(())
}

/// Heap bytes an object of `size` bytes takes (the allocator rounds to a power of two): what
/// creating it is charged.
pub const fn object_bytes(size: usize) -> u64 {
    let size = if size < 16 { 16 } else { size };
    size.next_power_of_two() as u64
}

/// Arena bookkeeping charged per object on top of the object itself (its slot and free-list
/// entry, doubled for the arena's growth).
pub const ARENA_SLOT_BYTES: u64 = 64;

/// What creating an object of `size` bytes is charged: the boxed object and its arena slot.
pub const fn object_charge(size: usize) -> u64 {
    object_bytes(size) + ARENA_SLOT_BYTES
}

/// The frame pool (a handle: the pool itself is global so that the heap can grow from it).
pub struct Pool;

impl Pool {
    /// Free frames.
    pub fn free_frames(&self) -> usize {
        FRAMES.lock().as_ref().map_or(0, |f| f.free_frames())
    }

    /// All frames of the pool.
    pub fn total_frames(&self) -> usize {
        FRAMES.lock().as_ref().map_or(0, |f| f.total_frames())
    }

    /// `count` contiguous frames aligned to `align_frames` frames.
    pub fn allocate_contiguous(&mut self, count: usize, align_frames: usize) -> Option<u64> {
        FRAMES
            .lock()
            .as_mut()?
            .allocate_contiguous(count, align_frames)
    }
}

impl FrameSource for Pool {
    fn allocate_zeroed(&mut self) -> Option<u64> {
        let frame = FRAMES.lock().as_mut()?.allocate()?;
        zero_frame(frame);
        Some(frame)
    }

    fn free_frame(&mut self, physical: u64) {
        if let Some(frames) = FRAMES.lock().as_mut() {
            FrameSource::free_frame(frames, physical);
        }
    }
}

/// Frames charged to a task's or a VM's quota (page tables and UTCBs it causes).
pub struct Charged<'a> {
    /// The frame pool.
    pub frames: &'a mut Pool,
    /// The quota charged.
    pub quota: &'a mut kernel_core::Quota,
    /// The running total of bytes charged for the task or VM (refunded when it is destroyed).
    pub charged: &'a mut u64,
}

/// Bytes of a frame.
pub const FRAME_BYTES: u64 = 4096;

impl FrameSource for Charged<'_> {
    fn allocate_zeroed(&mut self) -> Option<u64> {
        reserve_kept().ok()?;
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
