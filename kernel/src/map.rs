//! Mapping flexpages of all three kinds (memory, I/O ports, capabilities) from one task into
//! another (map keeps the source, grant moves it), and their recursive revocation. Every
//! transfer is recorded in the mapping database, so that `unmap` and task destruction revoke
//! whatever was derived, in every task, at any depth.

use crate::arch::x86_64::paging::{Translation, NO_EXECUTE, PAGE_2M, PAGE_4K, USER, WRITABLE};
use crate::kernel::Kernel;
use crate::object::{Capability, TaskId};
use alloc::vec::Vec;
use kernel_core::ObjectId;
use l4_abi::{place_in_window, Error, Fpage, FpageKind, MapItem, KERNEL_AREA_START, USER_START};

/// A mapping-database key: the task (see [`space_key`]) and the page address, port or slot.
pub type Key = (u64, u64);

/// The mapping-database name of a task.
pub fn space_key(task: TaskId) -> u64 {
    (task.index as u64) << 32 | task.generation as u64
}

fn task_of_key(space: u64) -> TaskId {
    ObjectId {
        index: (space >> 32) as u32,
        generation: space as u32,
    }
}

/// Kernel memory charged per mapping-database node (to the task that holds the mapping).
pub const NODE_BYTES: u64 = 64;

/// Which mapping database.
#[derive(Clone, Copy)]
enum Db {
    Memory,
    Io,
    Caps,
}

fn db(k: &mut Kernel, which: Db) -> &mut kernel_core::MappingDatabase<Key> {
    match which {
        Db::Memory => &mut k.memory_db,
        Db::Io => &mut k.io_db,
        Db::Caps => &mut k.cap_db,
    }
}

/// Record `to_key` (in task `to`) as mapped (or granted) from `from_key` (in task `from`),
/// charging new nodes to their tasks' quotas. Returns the keys the new mapping replaced (the
/// caller revokes them).
fn derive(
    k: &mut Kernel,
    which: Db,
    from: TaskId,
    from_key: Key,
    to: TaskId,
    to_key: Key,
    grant: bool,
) -> Result<Vec<Key>, Error> {
    let parent_new = !db(k, which).contains(from_key);
    if grant {
        let child_new = !db(k, which).contains(to_key);
        if child_new {
            k.charge_task(to, NODE_BYTES)?;
        }
        return match db(k, which).grant(from_key, to_key) {
            Ok(replaced) => {
                if !parent_new {
                    k.refund_task(from, NODE_BYTES);
                }
                Ok(replaced)
            }
            Err(_) => {
                if child_new {
                    k.refund_task(to, NODE_BYTES);
                }
                Err(Error::InvalidArgument)
            }
        };
    }
    // Map: charge the new parent (if any) and, until we know better, a new child node.
    if parent_new {
        k.charge_task(from, NODE_BYTES)?;
    }
    if let Err(e) = k.charge_task(to, NODE_BYTES) {
        if parent_new {
            k.refund_task(from, NODE_BYTES);
        }
        return Err(e);
    }
    match db(k, which).map_detailed(from_key, to_key) {
        Ok(derived) => {
            if derived.child_existed {
                k.refund_task(to, NODE_BYTES);
            }
            Ok(derived.replaced)
        }
        Err(_) => {
            if parent_new {
                k.refund_task(from, NODE_BYTES);
            }
            k.refund_task(to, NODE_BYTES);
            Err(Error::InvalidArgument)
        }
    }
}

/// Where map item `item` lands in receive window `window`: the part of the sender's flexpage
/// that is transferred, and its destination (address or slot).
pub fn place_window(window: Fpage, item: MapItem) -> (Fpage, u64) {
    let fpage = item.fpage;
    match fpage.kind() {
        Some(FpageKind::Object) => {
            let (destination, offset, size) = place_in_window(
                window.index(),
                window.order(),
                fpage.order(),
                item.send_base() >> 12,
            );
            (
                Fpage::object(
                    fpage.index() + offset,
                    size.trailing_zeros(),
                    fpage.rights(),
                ),
                destination,
            )
        }
        _ => {
            let (destination, offset, size) = place_in_window(
                window.base(),
                window.order(),
                fpage.order(),
                item.send_base(),
            );
            (
                Fpage::memory(fpage.base() + offset, size.trailing_zeros(), fpage.rights()),
                destination,
            )
        }
    }
}

fn mappable(address: u64) -> bool {
    (USER_START..KERNEL_AREA_START).contains(&address)
}

/// Map (or grant) flexpage `fpage` of task `from` into task `to` at `destination`.
pub fn map_flexpage(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    destination: u64,
    grant: bool,
) -> Result<(), Error> {
    match fpage.kind() {
        Some(FpageKind::Memory) => map_fpage(k, from, fpage, to, destination, grant),
        Some(FpageKind::Io) => map_io(k, from, fpage, to, grant),
        Some(FpageKind::Object) => map_objects(k, from, fpage, to, destination, grant),
        None => Err(Error::InvalidArgument),
    }
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
    let (from_key, to_key) = (space_key(from), space_key(to));
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
        let large_target = destination + (va.max(start) - start);
        let whole_large = t.page_size == PAGE_2M
            && va >= start
            && leaf_end <= end
            && large_target.is_multiple_of(PAGE_2M)
            && mappable(large_target)
            && mappable(large_target + PAGE_2M - 1)
            && !grant
            && (0..512).all(|i| !k.memory_db.contains((to_key, large_target + i * PAGE_4K)));
        if whole_large
            && target_space
                .map(large_target, t.physical, PAGE_2M, flags, &mut k.frames)
                .is_ok()
        {
            for i in 0..512 {
                let offset = i * PAGE_4K;
                match derive(
                    k,
                    Db::Memory,
                    from,
                    (from_key, va + offset),
                    to,
                    (to_key, large_target + offset),
                    false,
                ) {
                    Ok(replaced) => revoke_memory(k, &replaced),
                    Err(e) => {
                        // Out of quota: the large page cannot be recorded; take it back.
                        let mut frames = k.charged(to).ok_or(Error::InvalidCapability)?;
                        for j in 0..512 {
                            target_space.unmap(large_target + j * PAGE_4K, &mut frames);
                        }
                        for j in 0..i {
                            k.memory_db
                                .unmap((to_key, large_target + j * PAGE_4K), true);
                            k.refund_task(to, NODE_BYTES);
                        }
                        return Err(e);
                    }
                }
            }
            continue;
        }
        let mut page = va.max(start);
        while page < leaf_end.min(end) {
            let target = destination + (page - start);
            if mappable(page) && mappable(target) && !(from == to && page == target) {
                let physical = t.physical + (page - va);
                match derive(
                    k,
                    Db::Memory,
                    from,
                    (from_key, page),
                    to,
                    (to_key, target),
                    grant,
                ) {
                    Ok(replaced) => revoke_memory(k, &replaced),
                    Err(Error::OutOfMemory) => return Err(Error::OutOfMemory),
                    Err(_) => {
                        page += PAGE_4K;
                        continue;
                    }
                }
                let mapped = {
                    let mut frames = k.charged(to).ok_or(Error::InvalidCapability)?;
                    target_space.map(target, physical, PAGE_4K, flags, &mut frames)
                };
                if mapped.is_err() {
                    // No page-table memory left in the receiver's quota: undo the record.
                    k.memory_db.unmap((to_key, target), true);
                    k.refund_task(to, NODE_BYTES);
                    return Err(Error::OutOfMemory);
                }
                if grant {
                    let mut frames = k.charged(from).ok_or(Error::InvalidCapability)?;
                    source_space.unmap(page, &mut frames);
                }
            }
            page += PAGE_4K;
        }
    }
    Ok(())
}

/// Remove the page mappings named by `keys` (revoked entries of the mapping database).
pub fn revoke_memory(k: &mut Kernel, keys: &[Key]) {
    for &(space, page) in keys {
        if space & crate::vm::VM_KEY_BIT != 0 {
            crate::vm::unmap_guest_page(k, crate::vm::vm_of_key(space), page);
            continue;
        }
        let task = task_of_key(space);
        if let Some(t) = k.tasks.get(task) {
            let space = t.space;
            if let Some(mut frames) = k.charged(task) {
                space.unmap(page, &mut frames);
            }
            k.refund_task(task, NODE_BYTES);
        }
    }
}

/// If the TSS holds `task`'s I/O bitmap, load its new contents now (a revoked port must not
/// stay usable until the next switch).
fn refresh_io(k: &mut Kernel, task: TaskId) {
    if k.io_owner == Some(task) {
        let bitmap = k.tasks.get(task).and_then(|t| t.io_bitmap.as_deref());
        crate::arch::x86_64::entry::set_io_bitmap(bitmap);
    }
}

fn revoke_io(k: &mut Kernel, keys: &[Key]) {
    for &(space, port) in keys {
        let id = task_of_key(space);
        if let Some(task) = k.tasks.get_mut(id) {
            task.set_port(port as u32, false);
            refresh_io(k, id);
            k.refund_task(id, NODE_BYTES);
        }
    }
}

fn revoke_caps(k: &mut Kernel, keys: &[Key]) {
    for &(space, slot) in keys {
        let id = task_of_key(space);
        if let Some(task) = k.tasks.get_mut(id) {
            let _ = task.caps.remove(slot);
            k.refund_task(id, NODE_BYTES);
        }
    }
}

/// Give `to` the I/O ports of `fpage` that `from` holds.
fn map_io(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    grant: bool,
) -> Result<(), Error> {
    if !fpage.is_valid_io() {
        return Err(Error::InvalidArgument);
    }
    if !k.tasks.contains(to) {
        return Err(Error::InvalidCapability);
    }
    let (from_key, to_key) = (space_key(from), space_key(to));
    for port in fpage.index()..fpage.index() + (1 << fpage.order()) {
        let held = k.tasks.get(from).is_some_and(|t| t.has_port(port as u32));
        if !held || from == to {
            continue;
        }
        let had_bitmap = k.tasks.get(to).is_some_and(|t| t.io_bitmap.is_some());
        let replaced = derive(k, Db::Io, from, (from_key, port), to, (to_key, port), grant)?;
        if !had_bitmap {
            if let Err(e) = k.charge_task(to, crate::task::IO_BITMAP_BYTES as u64) {
                k.io_db.unmap((to_key, port), true);
                k.refund_task(to, NODE_BYTES);
                return Err(e);
            }
        }
        {
            revoke_io(k, &replaced);
            k.tasks
                .get_mut(to)
                .expect("task")
                .set_port(port as u32, true);
            if !had_bitmap {
                k.mark_io_task(to);
            }
            if grant {
                k.tasks
                    .get_mut(from)
                    .expect("task")
                    .set_port(port as u32, false);
            }
        }
    }
    refresh_io(k, to);
    refresh_io(k, from);
    Ok(())
}

/// Copy (or move) the capabilities of `fpage` in `from` to the slots from `destination` in
/// `to`. Only capabilities with the `COPY` right are transferred; their rights are cut to the
/// flexpage's. An occupied destination slot is replaced (and what was derived from it revoked).
fn map_objects(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    destination: u64,
    grant: bool,
) -> Result<(), Error> {
    let count = 1u64 << fpage.order();
    if !fpage.is_valid_object()
        || destination
            .checked_add(count)
            .is_none_or(|e| e > l4_abi::CAP_SLOTS as u64)
    {
        return Err(Error::InvalidArgument);
    }
    for i in 0..count {
        let (source, target) = (fpage.index() + i, destination + i);
        let Ok(cap) = k.lookup_in(from, source) else {
            continue;
        };
        if cap.rights & l4_abi::rights::COPY == 0 || (from == to && source == target) {
            continue;
        }
        copy_capability(
            k,
            from,
            source,
            to,
            target,
            Capability {
                rights: cap.rights & fpage.object_rights(),
                ..cap
            },
            grant,
        )?;
    }
    Ok(())
}

/// Install `cap` (derived from slot `source` of `from`) in slot `target` of `to`, recording
/// the derivation; with `grant` the source slot is emptied.
pub fn copy_capability(
    k: &mut Kernel,
    from: TaskId,
    source: u64,
    to: TaskId,
    target: u64,
    cap: Capability,
    grant: bool,
) -> Result<(), Error> {
    let (from_key, to_key) = ((space_key(from), source), (space_key(to), target));
    let replaced = derive(k, Db::Caps, from, from_key, to, to_key, grant)?;
    revoke_caps(k, &replaced);
    let table = &mut k.tasks.get_mut(to).ok_or(Error::InvalidCapability)?.caps;
    let _ = table.remove(target);
    table
        .insert(target, cap)
        .map_err(|_| Error::InvalidArgument)?;
    if grant {
        let _ = k.tasks.get_mut(from).expect("task").caps.remove(source);
    }
    Ok(())
}

/// Delete slot `slot` of `task` and every capability derived from it.
pub fn delete_capability(k: &mut Kernel, task: TaskId, slot: u64) -> Result<(), Error> {
    k.tasks
        .get_mut(task)
        .ok_or(Error::InvalidCapability)?
        .caps
        .remove(slot)
        .map_err(|_| Error::InvalidCapability)?;
    let revoked = k.cap_db.unmap((space_key(task), slot), true);
    revoke_caps(k, &revoked);
    Ok(())
}

/// Revoke `fpage` of `task`: everything derived from it in every task, recursively, and with
/// `include_self` the task's own mappings.
pub fn unmap_flexpage(
    k: &mut Kernel,
    task: TaskId,
    fpage: Fpage,
    include_self: bool,
) -> Result<(), Error> {
    let space = space_key(task);
    match fpage.kind() {
        Some(FpageKind::Memory) if fpage.is_valid_memory() => {
            let start = fpage.base();
            let end = start + fpage.size();
            for (s, page) in k.memory_db.keys_in((space, start)..(space, end)) {
                let revoked = k.memory_db.unmap((s, page), false);
                revoke_memory(k, &revoked);
            }
            if include_self {
                let own: Vec<Key> = k.memory_db.keys_in((space, start)..(space, end));
                for key in own {
                    k.memory_db.unmap(key, true);
                    k.refund_task(task, NODE_BYTES);
                }
                let address_space = k.tasks.get(task).ok_or(Error::InvalidCapability)?.space;
                let mut pages: Vec<(u64, u64)> = Vec::new();
                address_space
                    .for_each_mapping(start, end, &mut |va, t| pages.push((va, t.page_size)));
                for (va, size) in pages {
                    let mut page = va;
                    while page < va + size && page < end {
                        if mappable(page) {
                            if let Some(mut frames) = k.charged(task) {
                                address_space.unmap(page, &mut frames);
                            }
                        }
                        page += PAGE_4K;
                    }
                }
            }
            Ok(())
        }
        Some(FpageKind::Io) if fpage.is_valid_io() => {
            for port in fpage.index()..fpage.index() + (1 << fpage.order()) {
                let revoked = k.io_db.unmap((space, port), include_self);
                revoke_io(k, &revoked);
                if include_self && !revoked.contains(&(space, port)) {
                    // Held without a database node (the root task's ports): nothing to refund.
                    if let Some(t) = k.tasks.get_mut(task) {
                        t.set_port(port as u32, false);
                    }
                    refresh_io(k, task);
                }
            }
            Ok(())
        }
        Some(FpageKind::Object) if fpage.is_valid_object() => {
            for slot in fpage.index()..fpage.index() + (1 << fpage.order()) {
                let revoked = k.cap_db.unmap((space, slot), include_self);
                revoke_caps(k, &revoked);
                if include_self && !revoked.contains(&(space, slot)) {
                    if let Some(t) = k.tasks.get_mut(task) {
                        let _ = t.caps.remove(slot);
                    }
                }
            }
            Ok(())
        }
        _ => Err(Error::InvalidArgument),
    }
}

/// Revoke everything derived from `task`'s mappings and capabilities (it is being destroyed).
pub fn revoke_task(k: &mut Kernel, task: TaskId) {
    let space = space_key(task);
    let memory = k.memory_db.remove_where(|key| key.0 == space);
    let others: Vec<Key> = memory.into_iter().filter(|key| key.0 != space).collect();
    revoke_memory(k, &others);
    let io = k.io_db.remove_where(|key| key.0 == space);
    let others: Vec<Key> = io.into_iter().filter(|key| key.0 != space).collect();
    revoke_io(k, &others);
    let caps = k.cap_db.remove_where(|key| key.0 == space);
    let others: Vec<Key> = caps.into_iter().filter(|key| key.0 != space).collect();
    revoke_caps(k, &others);
}
