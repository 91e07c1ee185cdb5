//! The L4 mapping database: which mapping was derived from which, so that `unmap` can revoke
//! recursively. A node records one mapping at the size it was made (a 4 KiB page, a 2 MiB or
//! 1 GiB large page, one port, one capability slot): mapping a large page costs one node, not
//! 512. An operation on part of a large node splits it on demand, only along the touched
//! boundaries, together with the same-sized mappings derived from it; recursive revocation
//! reaches every derived mapping at any mix of sizes.
//!
//! The database only tracks the derivation tree; the caller applies the page-table (or
//! port/slot) changes for the mappings it returns, and charges kernel memory for the nodes an
//! operation will create before it runs it ([`MappingDatabase::split_demand`] says how many a
//! split adds, per space). Nothing here recurses: a hostile task can build derivation chains
//! thousands deep and the kernel stack is small, so every walk uses an explicit work list.

use crate::chunked::ChunkedVec;
use crate::radix_index::RadixIndex;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use smallvec::SmallVec;

/// Mappings an operation removed (most remove a few: they live inline).
pub type Removed<S> = SmallVec<[Mapping<S>; 4]>;

/// Node indices of a small range (inline up to a handful).
type Nodes = SmallVec<[u32; 8]>;

/// Why a mapping-database operation was refused (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingError {
    /// The operation would make a mapping derived from itself (its target range holds the
    /// source or one of the source's ancestors).
    Cycle,
    /// The source range is covered by several smaller mappings, not by one node (the caller
    /// retries at a smaller size).
    Fragmented,
    /// A size the database does not know, or an address not aligned to the size.
    Misaligned,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MappingError::Cycle => "target range holds the source or one of its ancestors",
            MappingError::Fragmented => "source range is covered by several smaller mappings",
            MappingError::Misaligned => "unknown size or misaligned address",
        })
    }
}

/// The name of an address space (task, VM) as the index stores it.
pub trait SpaceKey: Copy + Eq + Ord + fmt::Debug {
    /// A unique number for the space.
    fn to_u64(self) -> u64;
    /// The space of a number made by [`SpaceKey::to_u64`].
    fn from_u64(value: u64) -> Self;
}

impl SpaceKey for u64 {
    fn to_u64(self) -> u64 {
        self
    }
    fn from_u64(value: u64) -> Self {
        value
    }
}

/// One recorded mapping: `1 << order` numbers (bytes of memory, ports, slots) from `base` in
/// `space`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mapping<S> {
    /// The address space holding it.
    pub space: S,
    /// Its first number (address, port, slot).
    pub base: u64,
    /// Log2 of its size.
    pub order: u32,
}

impl<S> Mapping<S> {
    /// Its size.
    pub fn size(&self) -> u64 {
        1 << self.order
    }

    /// One past its last number.
    pub fn end(&self) -> u64 {
        self.base + self.size()
    }
}

const NONE: u32 = u32::MAX;

/// One mapping in the derivation tree. Children form a doubly linked sibling list, so that
/// unlinking one is constant time whatever the fan-out.
#[derive(Debug, Clone)]
struct Node<S> {
    space: S,
    base: u64,
    /// The number in the parent's space that `base` is mapped from (`base` for a root).
    source: u64,
    order: u8,
    parent: u32,
    first_child: u32,
    last_child: u32,
    previous: u32,
    next: u32,
}

/// The derivation tree of mappings of one kind.
#[derive(Debug, Clone)]
pub struct MappingDatabase<S> {
    slab: ChunkedVec<Option<Node<S>>>,
    free: Vec<u32>,
    /// Nodes by (space, base); nodes of one space never overlap, so bases are unique.
    index: RadixIndex,
    /// The sizes a node may have (log2, ascending).
    orders: &'static [u32],
    /// Nodes created by splits during the current operation, per space.
    split_created: Demand<S>,
}

/// A map checked by [`MappingDatabase::plan_map`], to be applied with
/// [`MappingDatabase::apply_map`].
#[derive(Debug, Clone)]
pub struct MapPlan<S> {
    parent: (S, u64),
    child: (S, u64),
    order: u32,
    source: Option<u32>,
    root: Option<(u64, u32)>,
    overlapping: bool,
    /// Nodes the map creates, per space (charge them before applying).
    pub demand: Demand<S>,
    /// Heap bytes the index may grow by, per space (at most; see
    /// [`MappingDatabase::index_bytes`] for what it holds).
    pub index: Demand<S>,
}

/// A revocation planned by [`MappingDatabase::plan_unmap`], to be applied with
/// [`MappingDatabase::apply_unmap`].
#[derive(Debug, Clone)]
pub struct UnmapPlan<S> {
    space: S,
    start: u64,
    end: u64,
    include_self: bool,
    split: [bool; 2],
    /// Nodes its splits create, per space (charge them before applying).
    pub demand: Demand<S>,
    /// Heap bytes the index may grow by, per space (at most).
    pub index: Demand<S>,
}

/// What an operation did: the mappings it removed (for the caller to revoke) and the nodes
/// it created, per space (at most what its plan demanded; for a grant, the splits only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<S> {
    /// Removed mappings, children before their parents.
    pub removed: Removed<S>,
    /// Nodes created, per space.
    pub created: Demand<S>,
}

/// Work units of removing one node in a bounded operation
/// ([`MappingDatabase::apply_unmap_bounded`]).
pub const REMOVE_UNITS: usize = 8;
/// Work units of visiting one node of the range in a bounded operation.
pub const VISIT_UNITS: usize = 1;

/// The budget of one bounded step.
struct Work {
    budget: usize,
    spent: usize,
    /// Whether the step removed a node or finished one (it must, before it may stop).
    progressed: bool,
}

impl Work {
    fn exhausted(&self) -> bool {
        self.progressed && self.spent >= self.budget
    }
}

/// Nodes an operation adds, per space (usually one or two spaces: inline).
pub type Demand<S> = SmallVec<[(S, u64); 2]>;

fn add_demand<S: SpaceKey>(demand: &mut Demand<S>, space: S, nodes: u64) {
    match demand.iter_mut().find(|(s, _)| *s == space) {
        Some((_, n)) => *n += nodes,
        None => demand.push((space, nodes)),
    }
}

impl<S: SpaceKey> MappingDatabase<S> {
    /// An empty database whose nodes have the sizes `orders` (log2, ascending, e.g. `[12,
    /// 21, 30]` for 4 KiB, 2 MiB and 1 GiB pages; `[0]` for ports and slots). Numbers are
    /// multiples of the smallest size.
    pub const fn new(orders: &'static [u32]) -> Self {
        MappingDatabase {
            slab: ChunkedVec::new(),
            free: Vec::new(),
            index: RadixIndex::new(orders[0]),
            orders,
            split_created: SmallVec::new_const(),
        }
    }

    /// Number of mappings recorded.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no mapping is recorded.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Number of mappings recorded in `space` (walks them: for checks, not fast paths).
    pub fn count_in(&self, space: S) -> usize {
        // Counted without collecting: a check may run when the kernel heap is nearly full.
        let mut count = 0;
        self.index
            .visit_space(space.to_u64(), 0, u64::MAX, &mut |_, _| {
                count += 1;
                true
            });
        count
    }

    /// The mapping that covers `number` in `space`.
    pub fn find(&self, space: S, number: u64) -> Option<Mapping<S>> {
        self.cover(space, number).map(|i| self.mapping(i))
    }

    /// The mapping `m` (which must be recorded exactly) was derived from, and the number in
    /// the parent's space that `m.base` is mapped from; `None` for a root or an absent mapping.
    pub fn parent(&self, m: Mapping<S>) -> Option<(Mapping<S>, u64)> {
        let i = self.exact(m)?;
        let node = self.node(i);
        (node.parent != NONE).then(|| (self.mapping(node.parent), node.source))
    }

    /// The mappings directly derived from `m`, in the order they were made (empty if absent).
    pub fn children(&self, m: Mapping<S>) -> Vec<Mapping<S>> {
        match self.exact(m) {
            Some(i) => self
                .child_list(i)
                .into_iter()
                .map(|c| self.mapping(c))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Depth of `m` (a root is 0); `None` if absent.
    pub fn depth(&self, m: Mapping<S>) -> Option<usize> {
        let mut i = self.exact(m)?;
        let mut depth = 0;
        while self.node(i).parent != NONE {
            depth += 1;
            i = self.node(i).parent;
        }
        Some(depth)
    }

    /// Every mapping of `space` that starts in `start..end` (ascending).
    pub fn mappings_in(&self, space: S, start: u64, end: u64) -> Vec<Mapping<S>> {
        self.starting_in(space, start, end)
            .into_iter()
            .map(|i| self.mapping(i))
            .collect()
    }

    /// Nodes that splitting along `start` and `end` in `space` (as [`MappingDatabase::map`],
    /// [`MappingDatabase::grant`] and [`MappingDatabase::unmap`] do for their ranges) adds,
    /// per space: an upper bound of what the operation's splits create (exact for one
    /// boundary; when one node straddles both, splitting along the first makes the second
    /// cheaper).
    pub fn split_demand(&self, space: S, start: u64, end: u64) -> Demand<S> {
        self.split_costs(space, start, end).0
    }

    /// [`MappingDatabase::split_demand`], and the heap bytes the index may grow by, per space.
    pub fn split_costs(&self, space: S, start: u64, end: u64) -> (Demand<S>, Demand<S>) {
        let (mut demand, mut index) = (Demand::new(), Demand::new());
        let heads = self.split_demand_at(space, start, &mut demand, &mut index, &[]);
        self.split_demand_at(space, end, &mut demand, &mut index, &heads);
        (demand, index)
    }

    /// Heap bytes the index holds for `space` (they stay until the space's last mapping goes
    /// with [`MappingDatabase::remove_space`]).
    pub fn index_bytes(&self, space: S) -> u64 {
        self.index.space_bytes(space.to_u64())
    }

    /// Heap bytes the index may grow by when `numbers` of `space` get nodes.
    pub fn index_cost(&self, space: S, numbers: impl IntoIterator<Item = u64>) -> u64 {
        self.index.insert_cost(space.to_u64(), numbers)
    }

    /// Record that `1 << order` numbers from `child` are mapped from `parent` (plan and
    /// apply in one; see [`MappingDatabase::plan_map`]).
    pub fn map(
        &mut self,
        parent: (S, u64),
        root_order: u32,
        child: (S, u64),
        order: u32,
    ) -> Result<Changes<S>, MappingError> {
        let plan = self.plan_map(parent, root_order, child, order)?;
        Ok(self.apply_map(&plan))
    }

    /// Check a map of `1 << order` numbers from `parent` to `child` and say what it will
    /// create ([`MapPlan::demand`]: the new node, a root for an unrecorded source, the nodes
    /// splits add), changing nothing. [`MappingDatabase::apply_map`] then cannot fail, as
    /// long as nothing else changed the database in between.
    ///
    /// The parent range must lie inside one node (it may be larger); if no node intersects
    /// it, a root is created for it, of size `1 << root_order` (the size the source holds the
    /// memory at) when no node intersects that aligned range either. Whatever `child`'s range
    /// overlapped in its space is removed when the plan is applied, with everything derived
    /// from it (a large node that covers more is split so that only the overlapped part goes).
    ///
    /// Errors: [`MappingError::Misaligned`], [`MappingError::Fragmented`] when several
    /// smaller nodes cover the parent range, [`MappingError::Cycle`] when the child range
    /// holds the parent or one of its ancestors.
    pub fn plan_map(
        &self,
        parent: (S, u64),
        root_order: u32,
        child: (S, u64),
        order: u32,
    ) -> Result<MapPlan<S>, MappingError> {
        self.check(parent.1, order)?;
        self.check(child.1, order)?;
        if !self.orders.contains(&root_order) || root_order < order {
            return Err(MappingError::Misaligned);
        }
        let size = 1u64 << order;
        let source = self.source_node(parent, order)?;
        let root = match source {
            Some(p) => {
                self.refuse_cycle(child, order, p)?;
                None
            }
            None => {
                if parent.0 == child.0 && parent.1 < child.1 + size && child.1 < parent.1 + size {
                    return Err(MappingError::Cycle);
                }
                let root_base = parent.1 & !((1u64 << root_order) - 1);
                let root_end = root_base + (1 << root_order);
                let holds_child =
                    parent.0 == child.0 && root_base < child.1 + size && child.1 < root_end;
                let free = !holds_child && !self.overlaps(parent.0, root_base, root_end);
                Some(if free {
                    (root_base, root_order)
                } else {
                    (parent.1, order)
                })
            }
        };
        let overlapping = self.overlaps(child.0, child.1, child.1 + size);
        let (mut demand, mut index) = if overlapping {
            self.split_costs(child.0, child.1, child.1 + size)
        } else {
            (Demand::new(), Demand::new())
        };
        add_demand(&mut demand, child.0, 1);
        let cost = self.index_cost(child.0, [child.1]);
        if cost > 0 {
            add_demand(&mut index, child.0, cost);
        }
        if let Some((base, _)) = root {
            add_demand(&mut demand, parent.0, 1);
            let cost = self.index_cost(parent.0, [base]);
            if cost > 0 {
                add_demand(&mut index, parent.0, cost);
            }
        }
        Ok(MapPlan {
            parent,
            child,
            order,
            source,
            root,
            overlapping,
            demand,
            index,
        })
    }

    /// Carry out a map checked by [`MappingDatabase::plan_map`]; returns the mappings it
    /// removed and the nodes it created (at most the plan's demand).
    pub fn apply_map(&mut self, plan: &MapPlan<S>) -> Changes<S> {
        let MapPlan {
            parent,
            child,
            order,
            source,
            root,
            overlapping,
            ..
        } = *plan;
        let p = match (source, root) {
            (Some(p), _) => p,
            (None, Some((base, o))) => {
                add_demand(&mut self.split_created, parent.0, 1);
                self.alloc(parent.0, base, o, base, NONE)
            }
            (None, None) => unreachable!("a plan has a source or a root"),
        };
        let removed = if overlapping {
            self.clear(child.0, child.1, child.1 + (1 << order))
        } else {
            Removed::new()
        };
        debug_assert!(parent.1 >= self.node(p).base);
        self.alloc(child.0, child.1, order, parent.1, p);
        add_demand(&mut self.split_created, child.0, 1);
        self.changes(removed)
    }

    /// Grant: the `1 << order` numbers from `from` move to `to`, keeping their place in the
    /// tree (same parent, same derived mappings). A node larger than the range is split first
    /// so that only the range moves. If no node intersects the source range, the target
    /// becomes a root. Whatever the target range overlapped is removed first and returned.
    ///
    /// Errors (nothing changes): as for [`MappingDatabase::map`].
    pub fn grant(
        &mut self,
        from: (S, u64),
        to: (S, u64),
        order: u32,
    ) -> Result<Changes<S>, MappingError> {
        self.check(from.1, order)?;
        self.check(to.1, order)?;
        let source = self.source_node(from, order)?;
        if let Some(f) = source {
            self.refuse_cycle(to, order, f)?;
        } else if from.0 == to.0 && from.1 == to.1 {
            return Err(MappingError::Cycle);
        }
        let size = 1u64 << order;
        let Some(_) = source else {
            let removed = self.clear(to.0, to.1, to.1 + size);
            self.alloc(to.0, to.1, order, to.1, NONE);
            return Ok(self.changes(removed));
        };
        self.split_at(from.0, from.1);
        self.split_at(from.0, from.1 + size);
        let removed = self.clear(to.0, to.1, to.1 + size);
        let f = self
            .cover(from.0, from.1)
            .expect("mapping database: the granted node survives the split");
        debug_assert_eq!(
            self.mapping(f).order,
            order,
            "split leaves one node for the range"
        );
        self.index.remove((from.0.to_u64(), from.1));
        let old_base = self.node(f).base;
        {
            let node = self.node_mut(f);
            node.space = to.0;
            node.base = to.1;
            if node.parent == NONE {
                node.source = to.1;
            }
        }
        assert!(
            self.index.insert((to.0.to_u64(), to.1), f),
            "mapping database: number not representable"
        );
        // The children's sources are numbers of the moved node's space: translate them.
        for c in self.child_list(f) {
            let node = self.node_mut(c);
            node.source = node.source - old_base + to.1;
        }
        Ok(self.changes(removed))
    }

    /// Revoke everything derived from `start..end` of `space`, recursively, and with
    /// `include_self` the space's own mappings there (plan and apply in one; see
    /// [`MappingDatabase::plan_unmap`]).
    pub fn unmap(&mut self, space: S, start: u64, end: u64, include_self: bool) -> Changes<S> {
        let plan = self.plan_unmap(space, start, end, include_self);
        self.apply_unmap(&plan)
    }

    /// Nodes that [`MappingDatabase::unmap`] of the same arguments adds by splitting, per
    /// space.
    pub fn unmap_demand(&self, space: S, start: u64, end: u64, include_self: bool) -> Demand<S> {
        self.plan_unmap(space, start, end, include_self).demand
    }

    /// Plan the revocation of `start..end` (4 KiB aligned start; the end is rounded up) of
    /// `space`: nodes that straddle the range are split along it when anything goes from
    /// them ([`UnmapPlan::demand`] counts the nodes that adds). Changes nothing.
    pub fn plan_unmap(&self, space: S, start: u64, end: u64, include_self: bool) -> UnmapPlan<S> {
        let mut plan = UnmapPlan {
            space,
            start,
            end,
            include_self,
            split: [false; 2],
            demand: Demand::new(),
            index: Demand::new(),
        };
        if start >= end || self.check(start, self.orders[0]).is_err() {
            plan.end = start;
            return plan;
        }
        plan.end = end.next_multiple_of(1 << self.orders[0]);
        let mut heads = Vec::new();
        for (k, boundary) in [plan.start, plan.end].into_iter().enumerate() {
            let Some(i) = self.cover(space, boundary) else {
                continue;
            };
            let node = self.node(i);
            if node.base < boundary && (include_self || node.first_child != NONE) {
                plan.split[k] = true;
                heads = self.split_demand_at(
                    space,
                    boundary,
                    &mut plan.demand,
                    &mut plan.index,
                    &heads,
                );
            }
        }
        plan
    }

    /// Carry out a revocation planned by [`MappingDatabase::plan_unmap`]: returns every
    /// removed mapping (children before their parents) and the nodes splits created.
    pub fn apply_unmap(&mut self, plan: &UnmapPlan<S>) -> Changes<S> {
        let (changes, rest) = self.apply_unmap_bounded(plan, usize::MAX);
        debug_assert!(rest.is_none(), "an unbounded step finishes");
        changes
    }

    /// [`MappingDatabase::apply_unmap`] in bounded steps. Does the plan's splits, then removes
    /// nodes leaves first (a node only once everything derived from it is gone), so that a
    /// partial revocation leaves a consistent tree: whatever is removed is removed with
    /// everything derived from it, whatever remains keeps its place. A step stops once it has
    /// spent `budget` work units ([`REMOVE_UNITS`] per node removed, [`VISIT_UNITS`] per node of
    /// `space` visited in the range; the walk down to a subtree's first leaf is not counted)
    /// and has made progress (removed a node, or finished one of the range's nodes).
    ///
    /// Returns the changes and where to go on: `None` when the revocation is complete, or
    /// `Some(number)`: the nodes of the range before `number` are finished, and planning
    /// `number..end` with [`MappingDatabase::plan_unmap`] (same space and `include_self`) and
    /// applying that continues it. Steps until `None` remove exactly what one
    /// [`MappingDatabase::apply_unmap`] removes and create the same split nodes, as long as
    /// nothing else changes the database in between.
    pub fn apply_unmap_bounded(
        &mut self,
        plan: &UnmapPlan<S>,
        budget: usize,
    ) -> (Changes<S>, Option<u64>) {
        let UnmapPlan {
            space,
            start,
            end,
            include_self,
            split,
            ..
        } = *plan;
        let mut out = Removed::new();
        if start >= end {
            return (self.changes(out), None);
        }
        for (boundary, split) in [start, end].into_iter().zip(split) {
            if split {
                self.split_at(space, boundary);
            }
        }
        let mut work = Work {
            budget,
            spent: 0,
            progressed: false,
        };
        let mut cursor = start;
        while let Some((base, i)) = self.index.first_in(space.to_u64(), cursor, end) {
            if work.exhausted() {
                return (self.changes(out), Some(base));
            }
            work.spent += VISIT_UNITS;
            let next = base + (1u64 << self.node(i).order);
            if !self.prune(i, include_self, &mut work, &mut out) {
                return (self.changes(out), Some(base));
            }
            work.progressed = true;
            cursor = next;
            if cursor >= end {
                break;
            }
        }
        (self.changes(out), None)
    }

    /// [`MappingDatabase::remove_space`] in bounded steps (see
    /// [`MappingDatabase::apply_unmap_bounded`] for the budget and the order of removal):
    /// returns the mappings this step removed and whether the space is empty now. Each step
    /// starts afresh (the nodes it finished are gone); steps until `true` remove exactly what
    /// one [`MappingDatabase::remove_space`] removes.
    pub fn remove_space_bounded(&mut self, space: S, budget: usize) -> (Vec<Mapping<S>>, bool) {
        let mut out = Vec::new();
        let mut work = Work {
            budget,
            spent: 0,
            progressed: false,
        };
        while let Some((_, i)) = self.index.first_in(space.to_u64(), 0, u64::MAX) {
            if work.exhausted() {
                return (out, false);
            }
            work.spent += VISIT_UNITS;
            if !self.prune(i, true, &mut work, &mut out) {
                return (out, false);
            }
        }
        self.index.drop_space_if_empty(space.to_u64());
        (out, true)
    }

    /// Remove every node of `space` and all of their descendants (a destroyed address space).
    /// Returns every removed mapping (each once).
    pub fn remove_space(&mut self, space: S) -> Vec<Mapping<S>> {
        let mut out = Vec::new();
        for i in self.space_nodes(space) {
            // Skip nodes already removed as a descendant of an earlier one.
            if self.slot(i).is_some_and(|n| n.space == space) {
                self.unlink(i);
                self.free_subtree(i, &mut out);
            }
        }
        self.index.drop_space_if_empty(space.to_u64());
        out
    }

    /// Check the internal invariants (index and slab agree, the free list is exact, links are
    /// mutual, children lie inside their parent, nodes of a space do not overlap, no cycles);
    /// for tests.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let n = self.slab.len();
        let mut occupied = 0usize;
        let mut roots = Vec::new();
        for (i, slot) in self.slab.iter().enumerate() {
            let Some(node) = slot else { continue };
            let i = i as u32;
            occupied += 1;
            if self.index.get((node.space.to_u64(), node.base)) != Some(i) {
                return Err("slab node is not indexed at its slot");
            }
            if !self.orders.contains(&(node.order as u32)) || node.base % (1 << node.order) != 0 {
                return Err("node of an unknown size or misaligned");
            }
            if node.parent == NONE {
                roots.push(i);
            } else {
                let p = self
                    .slot(node.parent)
                    .ok_or("parent link to a vacant slot")?;
                if !self.child_list(node.parent).contains(&i) {
                    return Err("node not among its parent's children");
                }
                if node.order > p.order
                    || node.source < p.base
                    || node.source + (1 << node.order) > p.base + (1 << p.order)
                    || node.source % (1 << node.order) != 0
                {
                    return Err("child does not lie inside its parent");
                }
            }
            let mut previous = NONE;
            let mut c = node.first_child;
            while c != NONE {
                let cn = self.slot(c).ok_or("child link to a vacant slot")?;
                if cn.parent != i || cn.previous != previous {
                    return Err("child's links do not point back");
                }
                previous = c;
                c = cn.next;
            }
            if node.last_child != previous {
                return Err("last-child link is wrong");
            }
            // No overlap: the next node of the space starts at or after this one's end.
            let inside = self.index.range(
                core::ops::Bound::Excluded((node.space.to_u64(), node.base)),
                core::ops::Bound::Excluded((node.space.to_u64(), node.base + (1 << node.order))),
            );
            if !inside.is_empty() {
                return Err("nodes of one space overlap");
            }
        }
        if occupied != self.index.len() {
            return Err("index and slab sizes differ");
        }
        let mut in_free = vec![false; n];
        for &f in &self.free {
            let f = f as usize;
            if f >= n || self.slab[f].is_some() {
                return Err("free list names an occupied or out-of-range slot");
            }
            if in_free[f] {
                return Err("free list names a slot twice");
            }
            in_free[f] = true;
        }
        if self.free.len() + occupied != n {
            return Err("vacant slot missing from the free list");
        }
        let mut visited = vec![false; n];
        let mut reached = 0usize;
        let mut stack = roots;
        while let Some(i) = stack.pop() {
            if visited[i as usize] {
                return Err("node reached twice from the roots");
            }
            visited[i as usize] = true;
            reached += 1;
            stack.extend(self.child_list(i));
        }
        if reached != occupied {
            return Err("cycle: nodes unreachable from any root");
        }
        Ok(())
    }

    // ---- private helpers ----

    fn changes(&mut self, removed: Removed<S>) -> Changes<S> {
        Changes {
            removed,
            created: core::mem::take(&mut self.split_created),
        }
    }

    fn check(&self, number: u64, order: u32) -> Result<(), MappingError> {
        if self.orders.contains(&order) && number.is_multiple_of(1u64 << order) {
            Ok(())
        } else {
            Err(MappingError::Misaligned)
        }
    }

    fn mapping(&self, i: u32) -> Mapping<S> {
        let n = self.node(i);
        Mapping {
            space: n.space,
            base: n.base,
            order: n.order as u32,
        }
    }

    fn exact(&self, m: Mapping<S>) -> Option<u32> {
        let i = self.index.get((m.space.to_u64(), m.base))?;
        (self.node(i).order as u32 == m.order).then_some(i)
    }

    /// The node covering `number` of `space`.
    fn cover(&self, space: S, number: u64) -> Option<u32> {
        // Smallest size first: a node found at the base for size `o` is at least that large
        // (a smaller one there would have been found at a smaller size), so it covers.
        let key = space.to_u64();
        for &order in self.orders {
            let base = number & !((1u64 << order) - 1);
            if let Some(i) = self.index.get((key, base)) {
                if self.node(i).order as u32 >= order {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Nodes of `space` starting in `start..end`.
    fn starting_in(&self, space: S, start: u64, end: u64) -> Nodes {
        let mut out = Nodes::new();
        if end.checked_sub(start) == Some(1 << self.orders[0]) {
            // One granule: one lookup instead of a range walk.
            out.extend(self.index.get((space.to_u64(), start)));
            return out;
        }
        self.index
            .visit_space(space.to_u64(), start, end, &mut |_, i| {
                out.push(i);
                true
            });
        out
    }

    fn space_nodes(&self, space: S) -> Nodes {
        self.starting_in(space, 0, u64::MAX)
    }

    /// Whether a node of `space` intersects `start..end`.
    fn overlaps(&self, space: S, start: u64, end: u64) -> bool {
        self.cover(space, start).is_some() || self.starts_in_range(space, start, end)
    }

    /// Whether a node of `space` starts in `start..end`.
    fn starts_in_range(&self, space: S, start: u64, end: u64) -> bool {
        if end.checked_sub(start) == Some(1 << self.orders[0]) {
            // One granule: a node there would cover `start`.
            return self.index.get((space.to_u64(), start)).is_some();
        }
        self.index.first_in(space.to_u64(), start, end).is_some()
    }

    /// The node a source range `(space, number) .. + 1 << order` lies in: `Ok(Some)` for one
    /// node at least as large, `Ok(None)` when no node intersects it.
    fn source_node(
        &self,
        (space, number): (S, u64),
        order: u32,
    ) -> Result<Option<u32>, MappingError> {
        match self.cover(space, number) {
            Some(i) if self.node(i).order as u32 >= order => Ok(Some(i)),
            Some(_) => Err(MappingError::Fragmented),
            None if !self.starts_in_range(space, number, number + (1 << order)) => Ok(None),
            None => Err(MappingError::Fragmented),
        }
    }

    /// Refuse if a node overlapping the target range is `source` or one of its ancestors.
    fn refuse_cycle(
        &self,
        (space, number): (S, u64),
        order: u32,
        source: u32,
    ) -> Result<(), MappingError> {
        let end = number + (1 << order);
        let mut n = source;
        loop {
            let node = self.node(n);
            if node.space == space && node.base < end && number < node.base + (1 << node.order) {
                return Err(MappingError::Cycle);
            }
            match node.parent {
                NONE => return Ok(()),
                p => n = p,
            }
        }
    }

    fn slot(&self, i: u32) -> Option<&Node<S>> {
        self.slab.get(i as usize).and_then(Option::as_ref)
    }

    fn node(&self, i: u32) -> &Node<S> {
        self.slot(i)
            .expect("mapping database: link to a vacant slot")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<S> {
        self.slab
            .get_mut(i as usize)
            .and_then(Option::as_mut)
            .expect("mapping database: link to a vacant slot")
    }

    fn child_list(&self, i: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut c = self.node(i).first_child;
        while c != NONE {
            out.push(c);
            c = self.node(c).next;
        }
        out
    }

    fn next_smaller(&self, order: u32) -> Option<u32> {
        self.orders.iter().rev().copied().find(|&o| o < order)
    }

    /// Create a node (its range must be free in its space), appended to `parent`'s children.
    fn alloc(&mut self, space: S, base: u64, order: u32, source: u64, parent: u32) -> u32 {
        let node = Node {
            space,
            base,
            source,
            order: order as u8,
            parent: NONE,
            first_child: NONE,
            last_child: NONE,
            previous: NONE,
            next: NONE,
        };
        let i = match self.free.pop() {
            Some(i) => {
                *self
                    .slab
                    .get_mut(i as usize)
                    .expect("mapping database: free list out of range") = Some(node);
                i
            }
            None => {
                let i = u32::try_from(self.slab.len())
                    .ok()
                    .filter(|&i| i != NONE)
                    .expect("mapping database: more than u32::MAX nodes");
                self.slab.push(Some(node));
                i
            }
        };
        assert!(
            self.index.insert((space.to_u64(), base), i),
            "mapping database: number not representable"
        );
        if parent != NONE {
            self.link(i, parent);
        }
        i
    }

    /// Append unlinked node `i` to `parent`'s children.
    fn link(&mut self, i: u32, parent: u32) {
        let last = self.node(parent).last_child;
        {
            let node = self.node_mut(i);
            node.parent = parent;
            node.previous = last;
            node.next = NONE;
        }
        if last == NONE {
            self.node_mut(parent).first_child = i;
        } else {
            self.node_mut(last).next = i;
        }
        self.node_mut(parent).last_child = i;
    }

    /// Remove `i` from its parent's children.
    fn unlink(&mut self, i: u32) {
        let (parent, previous, next) = {
            let n = self.node(i);
            (n.parent, n.previous, n.next)
        };
        if parent == NONE {
            return;
        }
        if previous == NONE {
            self.node_mut(parent).first_child = next;
        } else {
            self.node_mut(previous).next = next;
        }
        if next == NONE {
            self.node_mut(parent).last_child = previous;
        } else {
            self.node_mut(next).previous = previous;
        }
        let n = self.node_mut(i);
        n.parent = NONE;
        n.previous = NONE;
        n.next = NONE;
    }

    /// Free slot `i` (its links are not touched) and return its mapping.
    fn release(&mut self, i: u32) -> Mapping<S> {
        let m = self.mapping(i);
        self.slab
            .get_mut(i as usize)
            .and_then(Option::take)
            .expect("mapping database: releasing a vacant slot");
        self.index.remove((m.space.to_u64(), m.base));
        self.free.push(i);
        m
    }

    /// Free unlinked node `root` and its subtree, appending their mappings (children before
    /// their parents). Walks the sibling links: no work list, no allocation.
    fn free_subtree(&mut self, root: u32, out: &mut impl Extend<Mapping<S>>) {
        let mut x = root;
        loop {
            while self.node(x).first_child != NONE {
                x = self.node(x).first_child;
            }
            let (next, parent) = {
                let n = self.node(x);
                (n.next, n.parent)
            };
            out.extend(Some(self.release(x)));
            if x == root {
                return;
            }
            // `x` was its parent's first child.
            let p = self.node_mut(parent);
            p.first_child = next;
            if next == NONE {
                p.last_child = NONE;
                x = parent;
            } else {
                x = next;
            }
        }
    }

    /// Remove the descendants of `root`, and with `include_self` `root` itself, leaves first,
    /// until `work` is exhausted; appends their mappings (children before their parents).
    /// Returns whether it finished (stopped only after some progress: a node removed).
    fn prune(
        &mut self,
        root: u32,
        include_self: bool,
        work: &mut Work,
        out: &mut impl Extend<Mapping<S>>,
    ) -> bool {
        let mut x = root;
        loop {
            while self.node(x).first_child != NONE {
                x = self.node(x).first_child;
            }
            if x == root && !include_self {
                return true;
            }
            if work.exhausted() {
                return false;
            }
            let parent = self.node(x).parent;
            self.unlink(x);
            out.extend(Some(self.release(x)));
            work.spent += REMOVE_UNITS;
            work.progressed = true;
            if x == root {
                return true;
            }
            x = parent;
        }
    }

    /// Remove the nodes of `space` inside `start..end` (splitting straddling ones first) with
    /// their subtrees.
    fn clear(&mut self, space: S, start: u64, end: u64) -> Removed<S> {
        if !self.overlaps(space, start, end) {
            return Removed::new();
        }
        self.split_at(space, start);
        self.split_at(space, end);
        let mut out = Removed::new();
        for i in self.starting_in(space, start, end) {
            if self.slot(i).is_some() {
                self.unlink(i);
                self.free_subtree(i, &mut out);
            }
        }
        out
    }

    /// Split nodes of `space` until `boundary` is not inside any node.
    fn split_at(&mut self, space: S, boundary: u64) {
        while let Some(i) = self.cover(space, boundary) {
            if self.node(i).base == boundary {
                return;
            }
            self.split_node(i);
        }
    }

    /// Split node `root` into pieces of the next smaller size, together with every node of
    /// the same size derived from it through nodes of that size (they straddle the new
    /// pieces' boundaries too). Smaller children move to the piece they lie in.
    fn split_node(&mut self, root: u32) {
        let order = self.node(root).order as u32;
        let small = self
            .next_smaller(order)
            .expect("mapping database: splitting a smallest node");
        let count = 1u64 << (order - small);
        let step = 1u64 << small;
        let mut work: Vec<(u32, Option<Vec<u32>>)> = vec![(root, None)];
        while let Some((x, parent_pieces)) = work.pop() {
            let children = self.child_list(x);
            let (space, base, source, parent) = {
                let n = self.node_mut(x);
                n.order = small as u8;
                n.first_child = NONE;
                n.last_child = NONE;
                (n.space, n.base, n.source, n.parent)
            };
            if let Some(pieces) = &parent_pieces {
                self.link(x, pieces[0]);
            }
            let mut pieces = Vec::with_capacity(count as usize);
            pieces.push(x);
            for j in 1..count {
                let piece_parent = match &parent_pieces {
                    Some(pp) => pp[j as usize],
                    None => parent,
                };
                let source = if piece_parent == NONE {
                    base + j * step
                } else {
                    source + j * step
                };
                pieces.push(self.alloc(space, base + j * step, small, source, piece_parent));
                add_demand(&mut self.split_created, space, 1);
            }
            for c in children {
                let (c_order, c_source) = {
                    let n = self.node_mut(c);
                    n.parent = NONE;
                    n.previous = NONE;
                    n.next = NONE;
                    (n.order as u32, n.source)
                };
                if c_order == order {
                    work.push((c, Some(pieces.clone())));
                } else {
                    let k = ((c_source - base) >> small) as usize;
                    self.link(c, pieces[k]);
                }
            }
        }
    }

    /// The nodes that `split_at(space, boundary)` would add, per space (see
    /// [`MappingDatabase::split_node`]); works on the unchanged tree by following, level by
    /// level, the (possibly not yet existing) pieces that hold `boundary`'s image in each
    /// affected node. Returns the piece split at each level (node, start, size); levels whose
    /// piece is in `shared` (split along another boundary first) add nothing.
    fn split_demand_at(
        &self,
        space: S,
        boundary: u64,
        demand: &mut Demand<S>,
        index: &mut Demand<S>,
        shared: &[(u32, u64, u32)],
    ) -> Vec<(u32, u64, u32)> {
        let mut heads = Vec::new();
        let Some(first) = self.cover(space, boundary) else {
            return heads;
        };
        if self.node(first).base == boundary {
            return heads;
        }
        let mut order = self.node(first).order as u32;
        // (node, start of the part of it that is affected); all parts have size 1 << order
        // and correspond to each other; element 0 holds `boundary`.
        let mut current: Vec<(u32, u64)> = self
            .same_size_closure(first)
            .into_iter()
            .map(|i| (i, self.node(i).base))
            .collect();
        loop {
            let Some(small) = self.next_smaller(order) else {
                return heads;
            };
            let head = (current[0].0, current[0].1, order);
            heads.push(head);
            if !shared.contains(&head) {
                for &(i, low) in &current {
                    let space = self.node(i).space;
                    add_demand(demand, space, (1 << (order - small)) - 1);
                    let pieces = (1..1u64 << (order - small)).map(|j| low + (j << small));
                    add_demand(index, space, self.index_cost(space, pieces));
                }
            }
            let offset = (boundary - current[0].1) & !((1u64 << small) - 1);
            if current[0].1 + offset == boundary {
                return heads;
            }
            let mut next = Vec::new();
            for &(i, low) in &current {
                let piece = low + offset;
                next.push((i, piece));
                for c in self.child_list(i) {
                    let n = self.node(c);
                    if n.order as u32 == small && n.source == piece {
                        next.extend(
                            self.same_size_closure(c)
                                .into_iter()
                                .map(|d| (d, self.node(d).base)),
                        );
                    }
                }
            }
            current = next;
            order = small;
        }
    }

    /// `i` and the nodes of its size derived from it through nodes of that size.
    fn same_size_closure(&self, i: u32) -> Vec<u32> {
        let order = self.node(i).order;
        let mut out = Vec::new();
        let mut stack = vec![i];
        while let Some(x) = stack.pop() {
            out.push(x);
            for c in self.child_list(x) {
                if self.node(c).order == order {
                    stack.push(c);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
