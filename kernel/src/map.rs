//! Mapping flexpages of all three kinds (memory, I/O ports, capabilities) from one task into
//! another (map keeps the source, grant moves it), and their recursive revocation. Every
//! transfer is recorded in the mapping database, so that `unmap` and task destruction revoke
//! whatever was derived, in every task, at any depth.

use crate::arch::x86_64::paging::{AddressSpace, Translation, NO_EXECUTE, PAGE_4K, USER, WRITABLE};
use crate::kernel::Kernel;
use crate::object::{Capability, TaskId, VmId};
use alloc::vec::Vec;
use kernel_core::mapping_database::Removed;
use kernel_core::{Demand, Mapping, MappingError, ObjectId, SpaceKey};
use l4_abi::{place_in_window, Error, Fpage, FpageKind, MapItem, KERNEL_AREA_START, USER_START};
use smallvec::SmallVec;

/// An address space the mapping databases record mappings in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Space {
    /// A task's virtual address space (also its ports and capability slots).
    Task(TaskId),
    /// A VM's guest-physical address space.
    Vm(VmId),
}

/// The index stores a space as a number: the object's index and generation, and bit 63 for
/// VMs.
const VM_BIT: u64 = 1 << 63;

impl SpaceKey for Space {
    fn to_u64(self) -> u64 {
        match self {
            Space::Task(t) => (t.index as u64) << 32 | t.generation as u64,
            Space::Vm(v) => VM_BIT | (v.index as u64) << 32 | v.generation as u64,
        }
    }

    fn from_u64(value: u64) -> Self {
        let id = ObjectId {
            index: ((value & !VM_BIT) >> 32) as u32,
            generation: value as u32,
        };
        if value & VM_BIT != 0 {
            Space::Vm(id)
        } else {
            Space::Task(id)
        }
    }
}

/// A recorded mapping.
pub type Recorded = Mapping<Space>;

/// Sizes of memory mappings the database records (log2): 4 KiB, 2 MiB and 1 GiB pages.
pub const MEMORY_ORDERS: &[u32] = &[12, 21, 30];
/// Ports and capability slots are recorded one by one.
pub const UNIT_ORDERS: &[u32] = &[0];

/// Kernel memory charged per mapping-database node (to the space that holds the mapping).
pub const NODE_BYTES: u64 = 64;

/// Which mapping database.
#[derive(Clone, Copy)]
enum Db {
    Memory,
    Io,
    Caps,
}

fn db(k: &mut Kernel, which: Db) -> &mut kernel_core::MappingDatabase<Space> {
    match which {
        Db::Memory => &mut k.memory_db,
        Db::Io => &mut k.io_db,
        Db::Caps => &mut k.cap_db,
    }
}

/// Charge `nodes` mapping nodes to each space of `demand`; all or nothing.
fn charge_nodes(k: &mut Kernel, demand: &Demand<Space>) -> Result<(), Error> {
    charge_all(k, demand, NODE_BYTES)
}

fn refund_nodes(k: &mut Kernel, demand: &[(Space, u64)]) {
    refund_all(k, demand, NODE_BYTES);
}

/// Charge `amount * unit` bytes to each space of `demand`; all or nothing.
fn charge_all(k: &mut Kernel, demand: &[(Space, u64)], unit: u64) -> Result<(), Error> {
    for (n, &(space, amount)) in demand.iter().enumerate() {
        if let Err(e) = k.charge_space(space, amount * unit) {
            refund_all(k, &demand[..n], unit);
            return Err(e);
        }
    }
    Ok(())
}

fn refund_all(k: &mut Kernel, demand: &[(Space, u64)], unit: u64) {
    for &(space, amount) in demand {
        k.refund_space(space, amount * unit);
    }
}

/// Refund what was charged for `demand` beyond what the operation's splits created.
fn settle(k: &mut Kernel, demand: &Demand<Space>, split: &Demand<Space>) {
    if demand.is_empty() {
        return;
    }
    for &(space, nodes) in demand {
        let used = split
            .iter()
            .filter(|(s, _)| *s == space)
            .map(|(_, n)| n)
            .sum::<u64>();
        k.refund_space(space, nodes.saturating_sub(used) * NODE_BYTES);
    }
}

/// Record `to` (in its space) as mapped or granted from `from`, `1 << order` numbers,
/// charging every node the operation creates before it changes anything (decode, charge,
/// invoke). Returns the mappings the new one replaced (the caller revokes them with
/// [`revoke_memory`] or its kin).
fn derive(
    k: &mut Kernel,
    which: Db,
    from: (Space, u64),
    root_order: u32,
    to: (Space, u64),
    order: u32,
    grant: bool,
) -> Result<Removed<Space>, Refusal> {
    if grant {
        return derive_grant(k, which, from, to, order);
    }
    let plan = db(k, which)
        .plan_map(from, root_order, to, order)
        .map_err(Refusal::Mapping)?;
    charge_nodes(k, &plan.demand).map_err(|_| Refusal::OutOfMemory)?;
    let index = match IndexCharge::charge(k, which, &plan.index) {
        Ok(index) => index,
        Err(_) => {
            refund_nodes(k, &plan.demand);
            return Err(Refusal::OutOfMemory);
        }
    };
    let changes = db(k, which).apply_map(&plan);
    settle(k, &plan.demand, &changes.created);
    index.settle(k, which);
    Ok(changes.removed)
}

/// Heap bytes charged for the growth of a mapping database's index, per space: the plan's
/// upper bound before the operation, settled to what the index actually grew by after it (the
/// index keeps its nodes until the space's last mapping goes, and the space's charges are
/// refunded with the task or VM).
struct IndexCharge {
    charged: Demand<Space>,
    before: SmallVec<[u64; 2]>,
}

impl IndexCharge {
    fn charge(k: &mut Kernel, which: Db, bound: &Demand<Space>) -> Result<Self, Error> {
        let bound: Demand<Space> = bound.iter().copied().filter(|&(_, b)| b > 0).collect();
        if bound.is_empty() {
            return Ok(IndexCharge {
                charged: bound,
                before: SmallVec::new(),
            });
        }
        charge_all(k, &bound, 1)?;
        let before = bound
            .iter()
            .map(|&(space, _)| db(k, which).index_bytes(space))
            .collect();
        Ok(IndexCharge {
            charged: bound,
            before,
        })
    }

    fn settle(self, k: &mut Kernel, which: Db) {
        for (&(space, bound), before) in self.charged.iter().zip(self.before) {
            let grown = db(k, which).index_bytes(space).saturating_sub(before);
            debug_assert!(grown <= bound, "index grew beyond its plan");
            k.refund_space(space, bound.saturating_sub(grown));
        }
    }
}

/// [`derive`] for a grant: the node moves from `from`'s space to `to`'s.
fn derive_grant(
    k: &mut Kernel,
    which: Db,
    from: (Space, u64),
    to: (Space, u64),
    order: u32,
) -> Result<Removed<Space>, Refusal> {
    let size = 1u64 << order;
    let moved = db(k, which).find(from.0, from.1).is_some();
    let (mut demand, mut index) = db(k, which).split_costs(to.0, to.1, to.1 + size);
    let (from_demand, from_index) = db(k, which).split_costs(from.0, from.1, from.1 + size);
    demand.extend(from_demand);
    index.extend(from_index);
    // The node in its new place.
    demand.push((to.0, 1));
    index.push((to.0, db(k, which).index_cost(to.0, [to.1])));
    charge_nodes(k, &demand).map_err(|_| Refusal::OutOfMemory)?;
    let index = match IndexCharge::charge(k, which, &index) {
        Ok(index) => index,
        Err(_) => {
            refund_nodes(k, &demand);
            return Err(Refusal::OutOfMemory);
        }
    };
    match db(k, which).grant(from, to, order) {
        Ok(changes) => {
            index.settle(k, which);
            let mut created = changes.created;
            created.push((to.0, 1));
            settle(k, &demand, &created);
            if moved {
                // The source's space no longer holds the node.
                k.refund_space(from.0, NODE_BYTES);
            }
            Ok(changes.removed)
        }
        Err(e) => {
            index.settle(k, which);
            refund_nodes(k, &demand);
            Err(Refusal::Mapping(e))
        }
    }
}

/// Why [`derive`] refused.
enum Refusal {
    /// A quota cannot pay for the nodes.
    OutOfMemory,
    /// The mapping database refused (nothing changed).
    Mapping(MappingError),
}

/// Where map item `item` lands in receive window `window`: the part of the sender's flexpage
/// that is transferred, and its destination (address or slot).
#[inline]
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
                    l4_abi::Rights::from_bits_truncate(fpage.rights()),
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
                Fpage::memory(
                    fpage.base() + offset,
                    size.trailing_zeros(),
                    fpage.memory_rights(),
                ),
                destination,
            )
        }
    }
}

/// Whether a task may hold a mapping at `address` (not below the first user page, not in
/// the kernel-managed area of UTCBs and the KIP).
fn mappable(address: u64) -> bool {
    (USER_START..KERNEL_AREA_START).contains(&address)
}

/// Guest-physical addresses a VM can map (what its nested page tables can hold).
pub const GUEST_PHYSICAL_LIMIT: u64 = 1 << 46;

/// Whether `space` may hold a mapping at `address`.
fn accepts(space: Space, address: u64) -> bool {
    match space {
        Space::Task(_) => mappable(address),
        Space::Vm(_) => address < GUEST_PHYSICAL_LIMIT,
    }
}

/// One bounded step of mapping (or granting) flexpage `fpage` of task `from` to
/// `destination` in `to` (memory: a task or a VM; ports and capability slots: a task): the
/// one mapping routine of `Map`, map items and page-fault replies. Transfers from `resume` on
/// (an address, port or slot of the flexpage; its first for the first step) for at most
/// `budget` units ([`MAP_STEP_UNITS`] is one step's), takes what it spends from `budget`, and
/// returns where the next step goes on (`None`: done). What lies before `resume` is left as
/// earlier steps made it.
#[allow(clippy::too_many_arguments)]
pub fn map_step(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: Space,
    destination: u64,
    grant: bool,
    resume: u64,
    budget: &mut u32,
) -> Result<Option<u64>, Error> {
    if *budget == 0 {
        return Ok(Some(resume));
    }
    match (fpage.kind(), to) {
        (Some(FpageKind::Memory), _) => {
            map_memory_step(k, from, fpage, to, destination, grant, resume, budget)
        }
        (Some(FpageKind::Io), Space::Task(to)) => map_io(k, from, fpage, to, grant, resume, budget),
        (Some(FpageKind::Object), Space::Task(to)) => {
            map_objects(k, from, fpage, to, destination, grant, resume, budget)
        }
        _ => Err(Error::InvalidArgument),
    }
}

/// Where the first step of [`map_step`] for `fpage` starts.
pub fn map_start(fpage: Fpage) -> u64 {
    match fpage.kind() {
        Some(FpageKind::Memory) => fpage.base(),
        _ => fpage.index(),
    }
}

/// The page tables of `space` (a task's, or a VM's nested ones).
fn tables(k: &Kernel, space: Space) -> Option<AddressSpace> {
    match space {
        Space::Task(t) => k.tasks.get(t).map(|t| t.space),
        Space::Vm(v) => k.vms.get(v).map(|v| v.npt),
    }
}

/// One page-table leaf of the source, clipped to the flexpage.
struct Leaf {
    /// Source address of the leaf's first byte.
    va: u64,
    translation: Translation,
}

/// Pages (of any size) one step of a map transfers at most (a 4 KiB page costs about 2,700
/// instructions, a 2 MiB or 1 GiB page about 3,500).
pub const MAP_STEP_UNITS: u32 = 24;

/// [`map_step`] for memory: the source's pages in `fpage` go to `destination` in `to` (a
/// task or a VM). Pages the source has not mapped are skipped; each page gets the
/// flexpage's rights intersected with the source's (a page without `EXECUTE` is not
/// executable, for a guest too). Pages of the kernel-managed area (UTCBs, KIP) are never
/// transferred or overwritten. A source large page that the flexpage covers whole lands as a
/// large page (one mapping node) when the destination is aligned. Each page (of any size)
/// costs one unit; the source's empty page tables are skipped whole.
#[allow(clippy::too_many_arguments)]
fn map_memory_step(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: Space,
    destination: u64,
    grant: bool,
    resume: u64,
    budget: &mut u32,
) -> Result<Option<u64>, Error> {
    if !fpage.is_valid_memory() || !destination.is_multiple_of(fpage.size()) {
        return Err(Error::InvalidArgument);
    }
    if matches!(to, Space::Vm(_))
        && (grant
            || destination
                .checked_add(fpage.size())
                .is_none_or(|end| end > GUEST_PHYSICAL_LIMIT))
    {
        return Err(Error::InvalidArgument);
    }
    let source_space = k.tasks.get(from).ok_or(Error::InvalidCapability)?.space;
    let target_space = tables(k, to).ok_or(Error::InvalidCapability)?;
    let start = fpage.base();
    let end = start + fpage.size();
    let first = resume.clamp(start, end) & !(PAGE_4K - 1);
    let rights = fpage.memory_rights();
    let source = Space::Task(from);
    // Onto itself: every page would be skipped (a cycle).
    if !rights.contains(Fpage::READ) || first >= end || (to == source && destination == start) {
        return Ok(None);
    }
    let mut leaves: SmallVec<[Leaf; 8]> = SmallVec::new();
    // A large page that starts before `first` is not found by the walk: look it up. When
    // the page found covers the rest of the flexpage (a single page, a whole large page),
    // the lookup is all there is to do.
    let mut covered = end - first == PAGE_4K;
    if let Some(t) = source_space.lookup(first) {
        let va = first & !(t.page_size - 1);
        covered |= va + t.page_size >= end;
        if (t.page_size > PAGE_4K && va < first) || covered {
            leaves.push(Leaf {
                va,
                translation: Translation {
                    physical: t.physical & !(t.page_size - 1),
                    ..t
                },
            });
        }
    }
    let walk_stopped = if covered {
        None
    } else {
        let limit = (*budget as usize).saturating_sub(leaves.len()).max(1);
        source_space.for_some_mappings(first, end, limit, &mut |va, translation| {
            leaves.push(Leaf { va, translation })
        })
    };
    for Leaf { va, translation: t } in leaves {
        if t.flags & USER == 0 {
            continue;
        }
        let mut flags = USER;
        if rights.contains(Fpage::WRITE) && t.flags & WRITABLE != 0 {
            flags |= WRITABLE;
        }
        if !rights.contains(Fpage::EXECUTE) || t.flags & NO_EXECUTE != 0 {
            flags |= NO_EXECUTE;
        }
        let transfer = Transfer {
            source,
            to,
            target_space,
            source_space,
            start,
            first,
            end,
            destination,
            grant,
            flags,
            leaf_va: va,
            leaf_physical: t.physical,
            root_order: t.page_size.trailing_zeros(),
        };
        if let Some(next) = place(k, &transfer, va, t.page_size, budget)? {
            return Ok(Some(next));
        }
    }
    Ok(walk_stopped)
}

/// What [`place`] transfers: one source leaf, clipped to the flexpage `start..end` that goes
/// to `destination`, from source address `first` on.
struct Transfer {
    source: Space,
    to: Space,
    target_space: AddressSpace,
    source_space: AddressSpace,
    start: u64,
    first: u64,
    end: u64,
    destination: u64,
    grant: bool,
    flags: u64,
    leaf_va: u64,
    leaf_physical: u64,
    /// The size the source holds the leaf at (log2).
    root_order: u32,
}

/// Transfer the piece of `size` at source address `va` of a source leaf: whole as one large
/// page (one mapping node) when the flexpage covers it and the target is aligned and takes
/// it, else as its 512 pieces of the next smaller size (a 1 GiB leaf in 2 MiB pages, those in
/// 4 KiB pages), only the parts inside the flexpage from `first` on. Each page transferred
/// takes one unit of `budget`; when none is left, returns the address of the first piece
/// not transferred.
fn place(
    k: &mut Kernel,
    x: &Transfer,
    va: u64,
    size: u64,
    budget: &mut u32,
) -> Result<Option<u64>, Error> {
    let piece_end = va + size;
    if piece_end <= x.first || va >= x.end {
        return Ok(None);
    }
    if *budget == 0 {
        return Ok(Some(va.max(x.first)));
    }
    let target = x.destination.wrapping_add(va.wrapping_sub(x.start));
    let inside = va >= x.first && piece_end <= x.end;
    let page = Page {
        va,
        physical: x.leaf_physical + (va - x.leaf_va),
        size,
        flags: x.flags,
        root_order: x.root_order,
    };
    // (A 4 KiB piece that overlaps the flexpage from `first` on lies inside it.)
    let whole = inside
        && target.is_multiple_of(size)
        && mappable(va)
        && mappable(piece_end - 1)
        && accepts(x.to, target)
        && accepts(x.to, target + size - 1)
        && !(x.to == x.source && va == target);
    if whole {
        *budget -= 1;
        let placed = map_page(
            k,
            x.source,
            x.to,
            x.target_space,
            x.source_space,
            page,
            target,
            x.grant,
        )?;
        if matches!(placed, Placed::Done) {
            return Ok(None);
        }
    }
    if size == PAGE_4K {
        return Ok(None);
    }
    // A piece wholly outside what the source may give or the target take has no page to
    // transfer: skip it whole rather than page by page.
    let outside = |a: u64, b: u64, space: Space| match space {
        Space::Task(_) => b <= USER_START || a >= KERNEL_AREA_START,
        Space::Vm(_) => a >= GUEST_PHYSICAL_LIMIT,
    };
    if outside(va, piece_end, x.source) || outside(target, target.wrapping_add(size), x.to) {
        return Ok(None);
    }
    let smaller = size >> 9;
    // Only the pieces that overlap the flexpage from `first` on.
    let first = x.first.max(va);
    let mut piece = va + (first - va) / smaller * smaller;
    while piece < piece_end.min(x.end) {
        if let Some(next) = place(k, x, piece, smaller, budget)? {
            return Ok(Some(next));
        }
        piece += smaller;
    }
    Ok(None)
}

/// One page (4 KiB, 2 MiB or 1 GiB) to transfer.
#[derive(Clone, Copy)]
struct Page {
    va: u64,
    physical: u64,
    size: u64,
    flags: u64,
    /// The size the source holds it at (log2; for an unrecorded source's root).
    root_order: u32,
}

/// What became of a page.
enum Placed {
    /// Mapped, or skipped for good (a cycle).
    Done,
    /// A large page that must go as small pages (the source is recorded in smaller parts, or
    /// the target has small mappings in the way).
    Split,
}

/// Record and enter one page; undoes the record when the page table cannot take it.
#[allow(clippy::too_many_arguments)]
fn map_page(
    k: &mut Kernel,
    source: Space,
    to: Space,
    target_space: AddressSpace,
    source_space: AddressSpace,
    page: Page,
    target: u64,
    grant: bool,
) -> Result<Placed, Error> {
    let order = page.size.trailing_zeros();
    let replaced = match derive(
        k,
        Db::Memory,
        (source, page.va),
        page.root_order,
        (to, target),
        order,
        grant,
    ) {
        Ok(replaced) => replaced,
        Err(Refusal::OutOfMemory) => return Err(Error::OutOfMemory),
        Err(Refusal::Mapping(MappingError::Fragmented)) => return Ok(Placed::Split),
        Err(Refusal::Mapping(MappingError::Cycle | MappingError::Misaligned)) => {
            return Ok(Placed::Done)
        }
    };
    revoke_memory(k, &replaced);
    let mapped = {
        let mut frames = k.space_frames(to).ok_or(Error::InvalidCapability)?;
        target_space.map(target, page.physical, page.size, page.flags, &mut frames)
    };
    if let Err(e) = mapped {
        // The page table cannot take it: undo the record (the new node has no children).
        let undone = k.memory_db.unmap(to, target, target + page.size, true);
        for m in &undone.removed {
            k.refund_space(m.space, NODE_BYTES);
        }
        return match e {
            crate::arch::x86_64::paging::PagingError::Conflict if page.size > PAGE_4K => {
                Ok(Placed::Split)
            }
            _ => Err(Error::OutOfMemory),
        };
    }
    if let Space::Vm(vm) = to {
        if let Some(v) = k.vms.get_mut(vm) {
            v.flush = true;
        }
    }
    if grant {
        let mut frames = k.space_frames(source).ok_or(Error::InvalidCapability)?;
        source_space.unmap_range(page.va, page.va + page.size, &mut frames);
    }
    Ok(Placed::Done)
}

/// Remove the page mappings of `removed` (revoked entries of the memory database) from their
/// page tables and refund their nodes.
pub fn revoke_memory(k: &mut Kernel, removed: &[Recorded]) {
    for m in removed {
        if let Some(tables) = tables(k, m.space) {
            if let Some(mut frames) = k.space_frames(m.space) {
                tables.unmap_range(m.base, m.end(), &mut frames);
            }
            if let Space::Vm(vm) = m.space {
                if let Some(v) = k.vms.get_mut(vm) {
                    v.flush = true;
                }
            }
        }
        k.refund_space(m.space, NODE_BYTES);
    }
}

fn task_of(space: Space) -> Option<TaskId> {
    match space {
        Space::Task(t) => Some(t),
        Space::Vm(_) => None,
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

fn revoke_io(k: &mut Kernel, removed: &[Recorded]) {
    for m in removed {
        let Some(id) = task_of(m.space) else { continue };
        if let Some(task) = k.tasks.get_mut(id) {
            task.set_port(m.base as u32, false);
            refresh_io(k, id);
        }
        k.refund_space(m.space, NODE_BYTES);
    }
}

/// Empty the capability slots of `removed` (revoked entries of the capability database),
/// each one reference less on its object, and refund their nodes.
fn revoke_caps(k: &mut Kernel, removed: &[Recorded]) {
    for m in removed {
        let Some(id) = task_of(m.space) else { continue };
        let cap = k
            .tasks
            .get_mut(id)
            .and_then(|task| task.caps.remove(m.base).ok());
        k.refund_space(m.space, NODE_BYTES);
        if let Some(cap) = cap {
            crate::lifetime::release(k, id, cap.object);
        }
    }
}

/// Record one port or capability slot as derived (or granted); errors other than quota
/// exhaustion become `InvalidArgument`.
fn derive_unit(
    k: &mut Kernel,
    which: Db,
    from: (TaskId, u64),
    to: (TaskId, u64),
    grant: bool,
) -> Result<Removed<Space>, Error> {
    let (from, to) = ((Space::Task(from.0), from.1), (Space::Task(to.0), to.1));
    derive(k, which, from, 0, to, 0, grant).map_err(|e| match e {
        Refusal::OutOfMemory => Error::OutOfMemory,
        Refusal::Mapping(_) => Error::InvalidArgument,
    })
}

/// Ports or capability slots of a flexpage looked at (and skipped: not held, or not
/// transferable) per unit of a map step's budget; one transferred costs a unit.
const UNITS_PER_SKIP: u32 = 64;

/// [`map_step`] for I/O ports: gives `to` the ports of `fpage` from `resume` on that `from`
/// holds.
fn map_io(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    grant: bool,
    resume: u64,
    budget: &mut u32,
) -> Result<Option<u64>, Error> {
    if !fpage.is_valid_io() {
        return Err(Error::InvalidArgument);
    }
    if !k.tasks.contains(to) {
        return Err(Error::InvalidCapability);
    }
    let end = fpage.index() + (1 << fpage.order());
    let mut port = resume.max(fpage.index());
    let mut skipped = 0;
    let result = loop {
        if port >= end {
            break Ok(None);
        }
        if *budget == 0 {
            break Ok(Some(port));
        }
        let held = k.tasks.get(from).is_some_and(|t| t.has_port(port as u32));
        if !held || from == to {
            skipped += 1;
            if skipped % UNITS_PER_SKIP == 0 {
                *budget -= 1;
            }
            port += 1;
            continue;
        }
        *budget -= 1;
        if let Err(e) = map_port(k, from, to, port, grant) {
            break Err(e);
        }
        port += 1;
    };
    refresh_io(k, to);
    refresh_io(k, from);
    result
}

/// Give `to` port `port` of `from` (which holds it).
fn map_port(k: &mut Kernel, from: TaskId, to: TaskId, port: u64, grant: bool) -> Result<(), Error> {
    let had_bitmap = k.tasks.get(to).is_some_and(|t| t.io_bitmap.is_some());
    if !had_bitmap {
        k.charge_task(to, crate::task::IO_BITMAP_BYTES as u64)?;
    }
    let replaced = match derive_unit(k, Db::Io, (from, port), (to, port), grant) {
        Ok(replaced) => replaced,
        Err(e) => {
            if !had_bitmap {
                k.refund_task(to, crate::task::IO_BITMAP_BYTES as u64);
            }
            return Err(e);
        }
    };
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
    Ok(())
}

/// [`map_step`] for capabilities: copies (or moves) the capabilities of `fpage` in `from`
/// from slot `resume` on to the matching slots from `destination` in `to`. Only
/// capabilities with the `COPY` right are transferred; their rights are cut to the
/// flexpage's. An occupied destination slot is replaced (and what was derived from it
/// revoked).
#[allow(clippy::too_many_arguments)]
fn map_objects(
    k: &mut Kernel,
    from: TaskId,
    fpage: Fpage,
    to: TaskId,
    destination: u64,
    grant: bool,
    resume: u64,
    budget: &mut u32,
) -> Result<Option<u64>, Error> {
    let count = 1u64 << fpage.order();
    if !fpage.is_valid_object()
        || destination
            .checked_add(count)
            .is_none_or(|e| e > l4_abi::CAP_SLOTS as u64)
    {
        return Err(Error::InvalidArgument);
    }
    let mut skipped = 0;
    for source in resume.max(fpage.index())..fpage.index() + count {
        if *budget == 0 {
            return Ok(Some(source));
        }
        let target = destination + (source - fpage.index());
        let cap = match k.lookup_in(from, source) {
            Ok(cap)
                if cap.rights.contains(l4_abi::Rights::COPY)
                    && !(from == to && source == target) =>
            {
                cap
            }
            _ => {
                skipped += 1;
                if skipped % UNITS_PER_SKIP == 0 {
                    *budget -= 1;
                }
                continue;
            }
        };
        *budget -= 1;
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
    Ok(None)
}

/// Install `cap` (derived from slot `source` of `from`) in slot `target` of `to`, recording
/// the derivation; with `grant` the source slot is emptied. The new capability counts as a
/// reference before anything it replaces is let go, so replacing a capability with one to
/// the same object never destroys the object.
pub fn copy_capability(
    k: &mut Kernel,
    from: TaskId,
    source: u64,
    to: TaskId,
    target: u64,
    cap: Capability,
    grant: bool,
) -> Result<(), Error> {
    let replaced = derive_unit(k, Db::Caps, (from, source), (to, target), grant)?;
    crate::lifetime::acquire(k, to, cap.object);
    revoke_caps(k, &replaced);
    let Some(task) = k.tasks.get_mut(to) else {
        crate::lifetime::release(k, to, cap.object);
        return Err(Error::InvalidCapability);
    };
    // An unrecorded capability in the slot (one `FactoryCreate` made) is replaced too.
    let old = task.caps.remove(target).ok();
    let inserted = task.caps.insert(target, cap);
    if let Some(old) = old {
        crate::lifetime::release(k, to, old.object);
    }
    if inserted.is_err() {
        crate::lifetime::release(k, to, cap.object);
        return Err(Error::InvalidArgument);
    }
    if grant {
        let moved = k
            .tasks
            .get_mut(from)
            .and_then(|t| t.caps.remove(source).ok());
        if let Some(moved) = moved {
            crate::lifetime::release(k, from, moved.object);
        }
    }
    Ok(())
}

/// Delete slot `slot` of `task` and every capability derived from it; each is one reference
/// less on its object (the last destroys it, see `lifetime`).
pub fn delete_capability(k: &mut Kernel, task: TaskId, slot: u64) -> Result<(), Error> {
    let cap = k
        .tasks
        .get_mut(task)
        .ok_or(Error::InvalidCapability)?
        .caps
        .remove(slot)
        .map_err(|_| Error::InvalidCapability)?;
    let revoked = k.cap_db.unmap(Space::Task(task), slot, slot + 1, true);
    revoke_caps(k, &revoked.removed);
    crate::lifetime::release(k, task, cap.object);
    Ok(())
}

/// The work one `Unmap` step may do, in the mapping database's units
/// ([`kernel_core::mapping_database::REMOVE_UNITS`] per mapping revoked): 32 mappings, about
/// 30,000 instructions for 4 KiB pages in tasks and 80,000 for 2 MiB pages of a VM.
pub const UNMAP_STEP_UNITS: usize = 256;
/// Units of looking at one port or capability slot of the flexpage.
const UNIT_VISIT_UNITS: usize = 2;

/// Where a restarted `Map` of memory goes on: its arguments, and the source address from
/// which pages are not yet transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapProgress {
    /// The call's arguments: the target's slot, the flexpage, destination and flags.
    pub task: u64,
    pub fpage: u64,
    pub destination: u64,
    pub flags: u64,
    /// The source address to go on from.
    pub next: u64,
}

/// Where a restarted `Unmap` goes on: its arguments, and the first number (address, port,
/// slot) of the flexpage not yet revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapProgress {
    /// The flexpage, as passed.
    pub fpage: u64,
    /// Whether the caller's own mappings go too.
    pub include_self: bool,
    /// The next number to revoke from.
    pub next: u64,
}

/// One bounded step of `Unmap`: revokes `fpage` of `task` (everything derived from it in every
/// task and VM, recursively, and with `include_self` the task's own mappings) from number
/// `from` of the flexpage (its
/// start for `None`) for about `budget` units of work, and returns where to go on (`None`:
/// done). Every step is a revocation of its own (planned, charged and settled), so a partial
/// one leaves every quota exact: what was revoked is refunded, splits are paid.
pub fn unmap_flexpage_step(
    k: &mut Kernel,
    task: TaskId,
    fpage: Fpage,
    include_self: bool,
    from: Option<u64>,
    budget: usize,
) -> Result<Option<u64>, Error> {
    let space = Space::Task(task);
    match fpage.kind() {
        Some(FpageKind::Memory) if fpage.is_valid_memory() => {
            let address_space = k.tasks.get(task).ok_or(Error::InvalidCapability)?.space;
            let end = fpage.base() + fpage.size();
            let start = from.unwrap_or(fpage.base()).clamp(fpage.base(), end);
            // Large mappings that straddle the range are split along it: pay for the nodes.
            let plan = k.memory_db.plan_unmap(space, start, end, include_self);
            charge_nodes(k, &plan.demand)?;
            let index = match IndexCharge::charge(k, Db::Memory, &plan.index) {
                Ok(index) => index,
                Err(e) => {
                    refund_nodes(k, &plan.demand);
                    return Err(e);
                }
            };
            let (changes, rest) = k.memory_db.apply_unmap_bounded(&plan, budget);
            settle(k, &plan.demand, &changes.created);
            index.settle(k, Db::Memory);
            revoke_memory(k, &changes.removed);
            if include_self {
                // Also what the task holds without a record (its initial mappings) in the
                // part done, except the kernel-managed area.
                let done = rest.unwrap_or(end);
                let (low, high) = (start.max(USER_START), done.min(KERNEL_AREA_START));
                if low < high {
                    if let Some(mut frames) = k.charged(task) {
                        address_space.unmap_range(low, high, &mut frames);
                    }
                }
            }
            Ok(rest)
        }
        Some(FpageKind::Io) if fpage.is_valid_io() => {
            let (start, end) = (fpage.index(), fpage.index() + (1 << fpage.order()));
            unmap_units(k, Db::Io, task, (start, end), from, include_self, budget)
        }
        Some(FpageKind::Object) if fpage.is_valid_object() => {
            let (start, end) = (fpage.index(), fpage.index() + (1 << fpage.order()));
            unmap_units(k, Db::Caps, task, (start, end), from, include_self, budget)
        }
        _ => Err(Error::InvalidArgument),
    }
}

/// [`unmap_flexpage_step`] for ports or capability slots `range` (from `from`): each
/// number's derived tree is revoked leaves first, a large one over several steps.
fn unmap_units(
    k: &mut Kernel,
    which: Db,
    task: TaskId,
    (start, end): (u64, u64),
    from: Option<u64>,
    include_self: bool,
    budget: usize,
) -> Result<Option<u64>, Error> {
    let space = Space::Task(task);
    let mut spent = 0usize;
    for number in from.unwrap_or(start).max(start)..end {
        if spent >= budget {
            return Ok(Some(number));
        }
        // One unit: nothing to split, nothing to charge.
        let plan = db(k, which).plan_unmap(space, number, number + 1, include_self);
        let (changes, rest) = db(k, which).apply_unmap_bounded(&plan, budget - spent);
        let revoked = changes.removed;
        spent += UNIT_VISIT_UNITS + revoked.len() * kernel_core::mapping_database::REMOVE_UNITS;
        let own = revoked.iter().any(|m| m.space == space && m.base == number);
        match which {
            Db::Io => revoke_io(k, &revoked),
            _ => revoke_caps(k, &revoked),
        }
        if rest.is_some() {
            return Ok(Some(number));
        }
        if include_self && !own {
            // Held without a database node (the root task's ports, capabilities that
            // `FactoryCreate` installed): nothing to refund.
            let mut released = None;
            if let Some(t) = k.tasks.get_mut(task) {
                match which {
                    Db::Io => t.set_port(number as u32, false),
                    _ => released = t.caps.remove(number).ok(),
                }
            }
            if let Db::Io = which {
                refresh_io(k, task);
            }
            // A capability removed is one reference less on its object.
            if let Some(cap) = released {
                crate::lifetime::release(k, task, cap.object);
            }
        }
    }
    Ok(None)
}

/// One bounded step of revoking everything derived from `task`'s mappings and capabilities (it
/// is being destroyed; its own nodes are refunded with the rest of what it was charged): removes
/// the task's nodes of database `*database` (0
/// memory, 1 ports, 2 capabilities; advanced as each is done) for about `budget` units of the
/// mapping database's work; returns whether all three are done.
pub fn revoke_task_step(k: &mut Kernel, task: TaskId, database: &mut u8, budget: usize) -> bool {
    let space = Space::Task(task);
    let which = match *database {
        0 => Db::Memory,
        1 => Db::Io,
        2 => Db::Caps,
        _ => return true,
    };
    let (removed, done) = db(k, which).remove_space_bounded(space, budget);
    let others: Vec<Recorded> = removed.into_iter().filter(|m| m.space != space).collect();
    match which {
        Db::Memory => revoke_memory(k, &others),
        Db::Io => revoke_io(k, &others),
        Db::Caps => revoke_caps(k, &others),
    }
    if done {
        *database += 1;
    }
    *database > 2
}
