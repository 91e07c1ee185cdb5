//! Mapping memory flexpages from one task's address space into another's (map and grant).

use crate::arch::x86_64::paging::{Translation, NO_EXECUTE, PAGE_2M, PAGE_4K, USER, WRITABLE};
use crate::kernel::Kernel;
use crate::object::TaskId;
use alloc::vec::Vec;
use l4_abi::{place_in_window, Error, Fpage, MapItem, KERNEL_AREA_START, USER_START};

/// Where map item `item` lands in receive window `window`: the part of the sender's flexpage
/// that is transferred, and its destination address.
pub fn place_window(window: Fpage, item: MapItem) -> (Fpage, u64) {
    let fpage = item.fpage;
    let (destination, offset, size) = place_in_window(
        window.base(),
        window.order(),
        fpage.order(),
        item.send_base(),
    );
    let order = size.trailing_zeros();
    (
        Fpage::memory(fpage.base() + offset, order, fpage.rights()),
        destination,
    )
}

fn mappable(address: u64) -> bool {
    (USER_START..KERNEL_AREA_START).contains(&address)
}

/// Map (or grant) the memory of `fpage` in `from` to `destination` in `to`. Pages the source
/// has not mapped are skipped; each page gets the flexpage's rights intersected with the
/// source's. Pages of the kernel-managed area are never transferred or overwritten.
pub fn map_fpage(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    destination: u64,
    grant: bool,
) -> Result<(), Error> {
    if !fpage.is_valid_memory() || !destination.is_multiple_of(fpage.size()) {
        return Err(Error::InvalidArgument);
    }
    let source_space = k.tasks.get(from).ok_or(Error::InvalidCapability)?.space;
    let target_space = k.tasks.get(to).ok_or(Error::InvalidCapability)?.space;
    let start = fpage.base();
    let end = start + fpage.size();
    let rights = fpage.rights();
    if rights & Fpage::READ == 0 {
        return Ok(());
    }
    let mut leaves: Vec<(u64, Translation)> = Vec::new();
    source_space.for_each_mapping(start, end, &mut |va, t| leaves.push((va, t)));
    // A large page that starts before `start` is not found by the walk: look it up.
    if let Some(t) = source_space.lookup(start) {
        if t.page_size > PAGE_4K && !start.is_multiple_of(t.page_size) {
            leaves.insert(
                0,
                (
                    start & !(t.page_size - 1),
                    Translation {
                        physical: t.physical & !(t.page_size - 1),
                        ..t
                    },
                ),
            );
        }
    }
    for (va, t) in leaves {
        if t.flags & USER == 0 {
            continue;
        }
        let mut flags = USER;
        if rights & Fpage::WRITE != 0 && t.flags & WRITABLE != 0 {
            flags |= WRITABLE;
        }
        if rights & Fpage::EXECUTE == 0 || t.flags & NO_EXECUTE != 0 {
            flags |= NO_EXECUTE;
        }
        let leaf_end = va + t.page_size;
        let whole_large = t.page_size == PAGE_2M
            && va >= start
            && leaf_end <= end
            && (destination + (va - start)).is_multiple_of(PAGE_2M)
            && mappable(destination + (va - start))
            && mappable(destination + (va - start) + PAGE_2M - 1)
            && !grant;
        if whole_large
            && target_space
                .map(
                    destination + (va - start),
                    t.physical,
                    PAGE_2M,
                    flags,
                    &mut k.frames,
                )
                .is_ok()
        {
            continue;
        }
        let mut page = va.max(start);
        while page < leaf_end.min(end) {
            let target = destination + (page - start);
            if mappable(page) && mappable(target) {
                let physical = t.physical + (page - va);
                target_space
                    .map(target, physical, PAGE_4K, flags, &mut k.frames)
                    .map_err(|_| Error::OutOfMemory)?;
                if grant && (from != to || page != target) {
                    source_space.unmap(page, &mut k.frames);
                }
            }
            page += PAGE_4K;
        }
    }
    Ok(())
}

/// Unmap `fpage` from task `task` (the kernel-managed area excepted).
pub fn unmap_fpage(k: &mut Kernel, task: TaskId, fpage: Fpage) -> Result<(), Error> {
    if !fpage.is_valid_memory() {
        return Err(Error::InvalidArgument);
    }
    let space = k.tasks.get(task).ok_or(Error::InvalidCapability)?.space;
    let start = fpage.base();
    let end = start + fpage.size();
    let mut pages: Vec<(u64, u64)> = Vec::new();
    space.for_each_mapping(start, end, &mut |va, t| pages.push((va, t.page_size)));
    for (va, size) in pages {
        let mut page = va;
        while page < va + size && page < end {
            if mappable(page) {
                space.unmap(page, &mut k.frames);
            }
            page += PAGE_4K;
        }
    }
    Ok(())
}
