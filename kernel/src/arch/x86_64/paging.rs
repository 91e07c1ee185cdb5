//! Four-level x86_64 page tables: the kernel's direct map of physical memory and per-task
//! address spaces whose upper half is shared with the kernel.

use crate::memory::FrameSource;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{PageTableFlags, PhysFrame};
use x86_64::PhysAddr;

/// Virtual address of physical address 0 in the kernel's direct map.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;
/// Physical memory the boot page tables map directly (the first 4 GiB).
pub const BOOT_DIRECT_MAP: u64 = 4 << 30;
/// The most physical memory the direct map can cover (one page-directory-pointer table).
pub const DIRECT_MAP_LIMIT: u64 = 512 << 30;

/// Physical memory the direct map covers now (see [`extend_direct_map`]).
static DIRECT_MAP_END: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(BOOT_DIRECT_MAP);

// The entry bits the kernel uses, from the `x86_64` crate's flag set.
/// Entry is present.
pub const PRESENT: u64 = PageTableFlags::PRESENT.bits();
/// Writable.
pub const WRITABLE: u64 = PageTableFlags::WRITABLE.bits();
/// User accessible.
pub const USER: u64 = PageTableFlags::USER_ACCESSIBLE.bits();
/// Write-through.
pub const WRITE_THROUGH: u64 = PageTableFlags::WRITE_THROUGH.bits();
/// Cache disabled.
pub const NO_CACHE: u64 = PageTableFlags::NO_CACHE.bits();
/// Large page (2 MiB in a PD, 1 GiB in a PDPT).
pub const HUGE: u64 = PageTableFlags::HUGE_PAGE.bits();
/// No execute.
pub const NO_EXECUTE: u64 = PageTableFlags::NO_EXECUTE.bits();
/// The physical address bits of an entry.
pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Size of a 4 KiB page.
pub const PAGE_4K: u64 = 0x1000;
/// Size of a 2 MiB page.
pub const PAGE_2M: u64 = 0x20_0000;
/// Size of a 1 GiB page.
pub const PAGE_1G: u64 = 0x4000_0000;

/// Whether the CPU has 1 GiB pages (CPUID 0x8000_0001 EDX bit 26, `Page1GB`; for nested
/// paging the host's support is what counts too).
pub fn has_1g_pages() -> bool {
    let (max, features) = (
        core::arch::x86_64::__cpuid(0x8000_0000).eax,
        core::arch::x86_64::__cpuid(0x8000_0001).edx,
    );
    max >= 0x8000_0001 && features & (1 << 26) != 0
}

/// The page-table level of a leaf of `size` (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
fn leaf_level(size: u64) -> u32 {
    match size {
        PAGE_1G => 2,
        PAGE_2M => 1,
        _ => 0,
    }
}

/// The kernel virtual address of physical address `physical` (must be below 4 GiB).
pub fn phys_to_virt(physical: u64) -> u64 {
    debug_assert!(physical < DIRECT_MAP_END.load(core::sync::atomic::Ordering::Relaxed));
    physical + PHYS_OFFSET
}

/// Extend the direct map to cover physical memory up to `end` (RAM above the 4 GiB the boot
/// page tables map), with 2 MiB pages in page directories from `frames`. Returns how far it
/// reaches (less than asked if frames ran out or `end` exceeds [`DIRECT_MAP_LIMIT`]).
pub fn extend_direct_map(end: u64, frames: &mut impl FrameSource) -> u64 {
    const GIB: u64 = 1 << 30;
    // SAFETY: the boot PML4's direct-map slot (256) points to the boot PDPT; both are kernel
    // page tables that nothing else touches during boot.
    let pdpt = unsafe { table(table(boot_root())[256] & ADDRESS_MASK) };
    let mut reached = DIRECT_MAP_END.load(core::sync::atomic::Ordering::Relaxed);
    while reached < end.min(DIRECT_MAP_LIMIT) {
        let Some(pd) = frames.allocate_zeroed() else {
            break;
        };
        // SAFETY: a fresh frame.
        let entries = unsafe { table(pd) };
        for (i, e) in entries.iter_mut().enumerate() {
            *e = (reached + i as u64 * PAGE_2M) | PRESENT | WRITABLE | HUGE | NO_EXECUTE;
        }
        pdpt[(reached / GIB) as usize] = pd | PRESENT | WRITABLE;
        reached += GIB;
    }
    DIRECT_MAP_END.store(reached, core::sync::atomic::Ordering::Relaxed);
    reached
}

/// A page table (any level) through the direct map.
///
/// # Safety
/// `physical` must be a frame holding a page table that nobody else accesses concurrently
/// (true on this single-CPU kernel with interrupts off).
unsafe fn table<'a>(physical: u64) -> &'a mut [u64; 512] {
    // SAFETY: the frame is in the direct map, page aligned and holds 512 entries.
    unsafe { &mut *(phys_to_virt(physical) as *mut [u64; 512]) }
}

/// Fill a physical frame with zeros.
pub fn zero_frame(physical: u64) {
    // SAFETY: callers pass frames they own; the direct map makes them writable.
    unsafe { core::ptr::write_bytes(phys_to_virt(physical) as *mut u8, 0, PAGE_4K as usize) }
}

fn index(address: u64, level: u32) -> usize {
    ((address >> (12 + 9 * level)) & 0x1ff) as usize
}

/// Errors of page-table updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingError {
    /// No frame for a page table.
    OutOfMemory,
    /// The target range is covered by a large page of another size.
    Conflict,
}

/// A mapping found by [`AddressSpace::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the byte looked up.
    pub physical: u64,
    /// The leaf entry's flags.
    pub flags: u64,
    /// Size of the leaf page.
    pub page_size: u64,
}

/// A task's address space: the physical address of its PML4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// Physical address of the PML4.
    pub root: u64,
}

/// The PML4 the kernel booted with (its upper half is copied into every address space).
pub fn boot_root() -> u64 {
    extern "C" {
        static boot_pml4: u8;
    }
    // Only the address of the boot PML4 is taken (it is a low physical symbol).
    &raw const boot_pml4 as u64
}

impl AddressSpace {
    /// A new address space sharing the kernel half.
    pub fn new(frames: &mut impl FrameSource) -> Result<Self, PagingError> {
        let root = frames.allocate_zeroed().ok_or(PagingError::OutOfMemory)?;
        // SAFETY: both are page tables only the kernel touches.
        let (new, boot) = unsafe { (table(root), table(boot_root())) };
        new[256..].copy_from_slice(&boot[256..]);
        Ok(AddressSpace { root })
    }

    /// Translate `address`.
    pub fn lookup(&self, address: u64) -> Option<Translation> {
        let mut table_phys = self.root;
        for level in (0..4).rev() {
            // SAFETY: walking our own page tables.
            let entry = unsafe { table(table_phys) }[index(address, level)];
            if entry & PRESENT == 0 {
                return None;
            }
            if level == 0 || entry & HUGE != 0 {
                let page_size = 1u64 << (12 + 9 * level);
                let base = entry & ADDRESS_MASK & !(page_size - 1);
                return Some(Translation {
                    physical: base + (address & (page_size - 1)),
                    flags: entry & !ADDRESS_MASK,
                    page_size,
                });
            }
            table_phys = entry & ADDRESS_MASK;
        }
        None
    }

    /// Map the page of `size` (4 KiB, 2 MiB or 1 GiB) at `address` to `physical` with
    /// `flags`, replacing any mapping of the same size.
    pub fn map(
        &self,
        address: u64,
        physical: u64,
        size: u64,
        flags: u64,
        frames: &mut impl FrameSource,
    ) -> Result<(), PagingError> {
        let leaf_level = leaf_level(size);
        let mut table_phys = self.root;
        for level in (leaf_level + 1..4).rev() {
            // SAFETY: walking our own page tables.
            let entries = unsafe { table(table_phys) };
            let i = index(address, level);
            if entries[i] & PRESENT == 0 {
                let next = frames.allocate_zeroed().ok_or(PagingError::OutOfMemory)?;
                entries[i] = next | PRESENT | WRITABLE | USER;
            } else if entries[i] & HUGE != 0 {
                return Err(PagingError::Conflict);
            }
            table_phys = entries[i] & ADDRESS_MASK;
        }
        // SAFETY: as above.
        let entries = unsafe { table(table_phys) };
        let i = index(address, leaf_level);
        if leaf_level > 0 && entries[i] & PRESENT != 0 && entries[i] & HUGE == 0 {
            // A page table where the large page goes: free it (and the empty tables below
            // it) if it maps nothing any more.
            let below = entries[i] & ADDRESS_MASK;
            if maps_anything(below, leaf_level - 1) {
                return Err(PagingError::Conflict);
            }
            entries[i] = 0;
            flush_all();
            free_tables(below, leaf_level - 1, 512, frames);
            frames.free_frame(below);
        }
        let huge = if leaf_level > 0 { HUGE } else { 0 };
        entries[i] = (physical & ADDRESS_MASK) | flags | huge | PRESENT;
        invalidate(address);
        Ok(())
    }

    /// Remove the 4 KiB mapping at `address`, splitting a large page if needed (a 1 GiB page
    /// into 2 MiB pages, then the one of them holding `address` into 4 KiB pages). Returns
    /// the physical address that was mapped.
    pub fn unmap(&self, address: u64, frames: &mut impl FrameSource) -> Option<u64> {
        let translation = self.lookup(address)?;
        let mut size = translation.page_size;
        while size > PAGE_4K {
            if self.split(address, leaf_level(size), frames).is_err() {
                // No frame for a page table: drop the whole large page (a revoked page must
                // not stay mapped; the rest is faulted in again through the pager).
                self.clear_leaf(address & !(size - 1), size);
                return Some(translation.physical & !(PAGE_4K - 1));
            }
            size >>= 9;
        }
        let mut table_phys = self.root;
        for level in (1..4).rev() {
            // SAFETY: walking our own page tables.
            let entry = unsafe { table(table_phys) }[index(address, level)];
            table_phys = entry & ADDRESS_MASK;
        }
        // SAFETY: as above.
        let entries = unsafe { table(table_phys) };
        let i = index(address, 0);
        let old = entries[i];
        entries[i] = 0;
        invalidate(address);
        Some(old & ADDRESS_MASK)
    }

    /// Remove every mapping of `start..end` (4 KiB aligned): large pages inside the range go
    /// whole, large pages that straddle its ends are split first.
    pub fn unmap_range(&self, start: u64, end: u64, frames: &mut impl FrameSource) {
        let mut leaves: smallvec::SmallVec<[(u64, u64); 8]> = smallvec::SmallVec::new();
        if let Some(t) = self.lookup(start) {
            let base = start & !(t.page_size - 1);
            if base < start {
                leaves.push((base, t.page_size));
            }
        }
        self.for_each_mapping(start, end, &mut |va, t| leaves.push((va, t.page_size)));
        for (va, size) in leaves {
            if va >= start && va + size <= end {
                self.clear_leaf(va, size);
            } else if self.split(va, leaf_level(size), frames).is_ok() {
                // A large page across an end: split once, then its smaller pages go as above.
                self.unmap_range(va.max(start), (va + size).min(end), frames);
            } else {
                // No frame for a page table: drop the whole large page (as `unmap` does).
                self.clear_leaf(va, size);
            }
        }
    }

    /// Clear the leaf entry of the page of `size` at `address`.
    fn clear_leaf(&self, address: u64, size: u64) {
        let leaf_level = leaf_level(size);
        let mut table_phys = self.root;
        for level in (leaf_level + 1..4).rev() {
            // SAFETY: walking our own page tables (the leaf was just found by a walk).
            let entry = unsafe { table(table_phys) }[index(address, level)];
            if entry & PRESENT == 0 || entry & HUGE != 0 {
                return;
            }
            table_phys = entry & ADDRESS_MASK;
        }
        // SAFETY: as above.
        let entries = unsafe { table(table_phys) };
        entries[index(address, leaf_level)] = 0;
        invalidate(address);
    }

    /// Split the large page (a leaf at `level`, 1 or 2) holding `address` into a table of
    /// 512 pages of the next smaller size, with the same flags.
    fn split(
        &self,
        address: u64,
        level: u32,
        frames: &mut impl FrameSource,
    ) -> Result<(), PagingError> {
        let mut table_phys = self.root;
        for l in (level + 1..4).rev() {
            // SAFETY: walking our own page tables.
            table_phys = unsafe { table(table_phys) }[index(address, l)] & ADDRESS_MASK;
        }
        // SAFETY: as above.
        let parent = unsafe { table(table_phys) };
        let i = index(address, level);
        let entry = parent[i];
        let size = 1u64 << (12 + 9 * level);
        let new = frames.allocate_zeroed().ok_or(PagingError::OutOfMemory)?;
        // SAFETY: a fresh frame.
        let below = unsafe { table(new) };
        let base = entry & ADDRESS_MASK & !(size - 1);
        // The pieces keep HUGE (and PAT is bit 12 in large entries, which none of ours set)
        // unless they are 4 KiB pages.
        let flags = entry & !ADDRESS_MASK & if level == 1 { !HUGE } else { !0 };
        for (k, e) in below.iter_mut().enumerate() {
            *e = (base + k as u64 * (size >> 9)) | flags;
        }
        parent[i] = new | PRESENT | WRITABLE | USER;
        flush_all();
        Ok(())
    }

    /// Call `f(address, translation)` for every leaf mapping that starts in
    /// `start..end` (user half only).
    pub fn for_each_mapping(&self, start: u64, end: u64, f: &mut impl FnMut(u64, Translation)) {
        walk(self.root, 3, 0, start, end, &mut |va, t| {
            f(va, t);
            true
        });
    }

    /// As [`Self::for_each_mapping`], for at most `limit` leaves (empty tables are skipped
    /// whole): returns the address of the first leaf not visited, if the limit stopped it.
    pub fn for_some_mappings(
        &self,
        start: u64,
        end: u64,
        limit: usize,
        f: &mut impl FnMut(u64, Translation),
    ) -> Option<u64> {
        let (mut seen, mut stopped) = (0, None);
        walk(self.root, 3, 0, start, end, &mut |va, t| {
            if seen == limit {
                stopped = Some(va);
                return false;
            }
            seen += 1;
            f(va, t);
            true
        });
        stopped
    }

    /// Free the user half's page tables (not the pages they map) and the PML4.
    pub fn destroy(self, frames: &mut impl FrameSource) {
        let _ = free_tables(self.root, 3, 256, frames);
        frames.free_frame(self.root);
    }

    /// One bounded step of [`Self::destroy`]: frees the page-directory subtrees (a page
    /// directory and its page tables, at most 513 frames each) from `*cursor` (an index of
    /// the 1 GiB slots of the user half, advanced) until about `budget` frames are freed,
    /// each page-directory-pointer table after its last slot, and the root at the end.
    /// Returns whether the address space is gone.
    pub fn destroy_step(
        &self,
        cursor: &mut u64,
        budget: u64,
        frames: &mut impl FrameSource,
    ) -> bool {
        let mut freed = 0;
        while *cursor < 256 * 512 {
            let (i, j) = ((*cursor / 512) as usize, (*cursor % 512) as usize);
            // SAFETY: walking our own page tables, which nothing else uses any more.
            let top = unsafe { table(self.root) }[i];
            if top & PRESENT == 0 || top & HUGE != 0 {
                *cursor = (i as u64 + 1) * 512;
                continue;
            }
            let pdpt = top & ADDRESS_MASK;
            // SAFETY: as above.
            let entry = unsafe { table(pdpt) }[j];
            if entry & PRESENT != 0 && entry & HUGE == 0 {
                let pd = entry & ADDRESS_MASK;
                let below = free_tables(pd, 1, 512, frames);
                frames.free_frame(pd);
                // SAFETY: as above; the slot no longer names the freed directory.
                let entries = unsafe { table(pdpt) };
                entries[j] = 0;
                freed += below + 1;
            }
            *cursor += 1;
            if j == 511 {
                frames.free_frame(pdpt);
                // SAFETY: as above.
                let entries = unsafe { table(self.root) };
                entries[i] = 0;
                freed += 1;
            }
            if freed >= budget {
                return false;
            }
        }
        frames.free_frame(self.root);
        true
    }

    /// Number of page-table frames below the root in the user half (what [`Self::destroy`]
    /// frees besides the root); walks the tables, allocates nothing.
    pub fn table_frames(&self) -> u64 {
        count_tables(self.root, 3, 256)
    }

    /// Whether this address space is the one loaded in CR3.
    pub fn is_current(&self) -> bool {
        Cr3::read_raw().0.start_address().as_u64() == self.root
    }
}

/// Visit the leaves below `table_phys` that start in `start..end` until `f` returns false;
/// returns whether the walk went on to the end.
fn walk(
    table_phys: u64,
    level: u32,
    base: u64,
    start: u64,
    end: u64,
    f: &mut impl FnMut(u64, Translation) -> bool,
) -> bool {
    let span = 1u64 << (12 + 9 * level);
    let limit: u64 = if level == 3 { 256 } else { 512 };
    // Only the entries that overlap start..end.
    let first = start.saturating_sub(base) / span;
    let last = (end.saturating_sub(base)).div_ceil(span).min(limit);
    for i in first as usize..last as usize {
        let address = base + i as u64 * span;
        if address >= end || address.wrapping_add(span) <= start {
            continue;
        }
        // SAFETY: walking our own page tables.
        let entry = unsafe { table(table_phys) }[i];
        if entry & PRESENT == 0 {
            continue;
        }
        if level == 0 || entry & HUGE != 0 {
            if address >= start
                && !f(
                    address,
                    Translation {
                        physical: entry & ADDRESS_MASK & !(span - 1),
                        flags: entry & !ADDRESS_MASK,
                        page_size: span,
                    },
                )
            {
                return false;
            }
        } else if !walk(entry & ADDRESS_MASK, level - 1, address, start, end, f) {
            return false;
        }
    }
    true
}

/// Whether the table at `level` (and the tables below it) maps any page.
fn maps_anything(table_phys: u64, level: u32) -> bool {
    // SAFETY: walking our own page tables.
    unsafe { table(table_phys) }.iter().any(|&e| {
        e & PRESENT != 0
            && (level == 0 || e & HUGE != 0 || maps_anything(e & ADDRESS_MASK, level - 1))
    })
}

fn count_tables(table_phys: u64, level: u32, limit: usize) -> u64 {
    if level == 0 {
        return 0;
    }
    let mut count = 0;
    for i in 0..limit {
        // SAFETY: walking our own page tables.
        let entry = unsafe { table(table_phys) }[i];
        if entry & PRESENT != 0 && entry & HUGE == 0 {
            count += 1 + count_tables(entry & ADDRESS_MASK, level - 1, 512);
        }
    }
    count
}

/// Free the page tables below `table_phys` (not itself); returns how many.
fn free_tables(table_phys: u64, level: u32, limit: usize, frames: &mut impl FrameSource) -> u64 {
    if level == 0 {
        return 0;
    }
    let mut freed = 0;
    for i in 0..limit {
        // SAFETY: walking our own page tables.
        let entry = unsafe { table(table_phys) }[i];
        if entry & PRESENT != 0 && entry & HUGE == 0 {
            let next = entry & ADDRESS_MASK;
            freed += 1 + free_tables(next, level - 1, 512, frames);
            frames.free_frame(next);
        }
    }
    freed
}

fn invalidate(address: u64) {
    x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(address));
}

/// Switch to the page tables whose PML4 is at physical address `root`.
///
/// # Safety
/// `root` must be a valid PML4 that maps the kernel.
#[inline(always)]
pub unsafe fn load_root(root: u64) {
    // SAFETY: the caller guarantees the kernel stays mapped; a PML4's address is a page-aligned
    // physical address.
    unsafe {
        let frame = PhysFrame::from_start_address_unchecked(PhysAddr::new_unsafe(root));
        Cr3::write(frame, Cr3Flags::empty())
    }
}

/// Flush the whole (non-global) TLB.
pub fn flush_all() {
    x86_64::instructions::tlb::flush_all();
}
