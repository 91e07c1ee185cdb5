//! The L4 mapping database: which mapping was derived from which, so that `unmap` can revoke
//! recursively. It only tracks the derivation tree; the caller applies the page-table (or
//! port/slot) changes for the keys it returns. Nothing here recurses: a hostile task can build
//! derivation chains thousands deep, and the kernel stack is small, so every walk uses an explicit
//! work list.

use crate::radix_index::RadixIndex;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ops::{Bound, RangeBounds};

/// Why a mapping-database operation was refused (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingError {
    /// Source and target are the same key (`child == parent` or `from == to`).
    SameKey,
    /// The target is an ancestor of the source: the operation would create a cycle.
    Cycle,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MappingError::SameKey => "source and target are the same mapping",
            MappingError::Cycle => "target is an ancestor of the source (would create a cycle)",
        })
    }
}

/// One mapping in the derivation tree.
#[derive(Debug, Clone)]
struct Node<K> {
    key: K,
    parent: Option<u32>,
    /// Direct children, in insertion order.
    children: Vec<u32>,
}

/// What [`MappingDatabase::map_detailed`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived<K> {
    /// Keys the new mapping replaced (the old child's descendants), for the caller to revoke.
    pub replaced: Vec<K>,
    /// Whether the parent had no node and was created as a root.
    pub parent_created: bool,
    /// Whether the child had a node before (it was replaced in place).
    pub child_existed: bool,
}

/// The derivation tree of mappings, keyed by `K` (the kernel uses `(space, page/port/slot)`).
///
/// Nodes live in a slab (chunked, so growing it never needs a large contiguous allocation) whose vacant slots are reused through a free list;
/// a `BTreeMap` indexes the slab by key.
#[derive(Debug, Clone)]
pub struct MappingDatabase<K> {
    slab: crate::chunked::ChunkedVec<Option<Node<K>>>,
    free: Vec<u32>,
    index: RadixIndex,
}

impl<K: IndexKey> Default for MappingDatabase<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// Keys the database can index: a space and a number within it.
pub trait IndexKey: Ord + Copy + fmt::Debug {
    /// The (space, number) pair.
    fn pair(self) -> (u64, u64);
    /// The key of a pair.
    fn from_pair(pair: (u64, u64)) -> Self;
}

impl IndexKey for u32 {
    fn pair(self) -> (u64, u64) {
        (0, self as u64)
    }
    fn from_pair(pair: (u64, u64)) -> Self {
        pair.1 as u32
    }
}

impl IndexKey for (u64, u64) {
    fn pair(self) -> (u64, u64) {
        self
    }
    fn from_pair(pair: (u64, u64)) -> Self {
        pair
    }
}

impl<K: IndexKey> MappingDatabase<K> {
    /// An empty database whose keys' numbers are multiples of `1 << shift` (12 for page
    /// addresses: the index then spends no space on the offsets within a page).
    pub const fn with_shift(shift: u32) -> Self {
        MappingDatabase {
            slab: crate::chunked::ChunkedVec::new(),
            free: Vec::new(),
            index: RadixIndex::new(shift),
        }
    }

    /// An empty database.
    pub const fn new() -> Self {
        MappingDatabase {
            slab: crate::chunked::ChunkedVec::new(),
            free: Vec::new(),
            index: RadixIndex::new(0),
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

    /// Whether `key` has a node.
    pub fn contains(&self, key: K) -> bool {
        self.index.get(key.pair()).is_some()
    }

    /// The mapping `key` was derived from; `None` for a root or an absent key.
    pub fn parent(&self, key: K) -> Option<K> {
        let i = self.idx(key)?;
        let p = self.node(i).parent?;
        Some(self.node(p).key)
    }

    /// The mappings directly derived from `key`, in insertion order (empty if absent).
    pub fn children(&self, key: K) -> Vec<K> {
        match self.idx(key) {
            Some(i) => self
                .node(i)
                .children
                .iter()
                .map(|&c| self.node(c).key)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Depth of `key` (a root is 0); None if absent.
    pub fn depth(&self, key: K) -> Option<usize> {
        let mut i = self.idx(key)?;
        let mut depth = 0;
        while let Some(p) = self.node(i).parent {
            depth += 1;
            i = p;
        }
        Some(depth)
    }

    /// Record that `child` is mapped from `parent`. If `parent` has no node it is created as a
    /// root first. If `child` already has a node, that node's descendants AND the node itself are
    /// removed first (an existing mapping is replaced); the removed keys other than `child` itself
    /// are returned so the caller can unmap them (`child` is re-created under `parent`, as its
    /// last child).
    ///
    /// Errors: [`MappingError::SameKey`] if `parent == child`; [`MappingError::Cycle`] if `child`
    /// is an ancestor of `parent` (then nothing changes).
    pub fn map(&mut self, parent: K, child: K) -> Result<Vec<K>, MappingError> {
        self.map_detailed(parent, child).map(|d| d.replaced)
    }

    /// [`MappingDatabase::map`], also telling which nodes it created (callers that account
    /// for nodes use this instead of asking with `contains` first).
    pub fn map_detailed(&mut self, parent: K, child: K) -> Result<Derived<K>, MappingError> {
        if parent == child {
            return Err(MappingError::SameKey);
        }
        let mut replaced = Vec::new();
        let child_existed = match self.idx(child) {
            Some(c) => {
                if let Some(p) = self.idx(parent) {
                    if self.is_ancestor_or_self(c, p) {
                        return Err(MappingError::Cycle);
                    }
                }
                replaced = self.discard(c);
                true
            }
            None => false,
        };
        let (p, parent_created) = match self.idx(parent) {
            Some(p) => (p, false),
            None => (self.alloc(parent, None), true),
        };
        self.alloc(child, Some(p));
        Ok(Derived {
            replaced,
            parent_created,
            child_existed,
        })
    }

    /// Grant: `to` takes `from`'s place in the tree (same parent, same children, same position);
    /// `from` disappears. If `from` has no node, `to` becomes a root (and `from` stays absent).
    /// If `to` already exists, its subtree (including `to`) is removed first and the removed keys
    /// other than `to` are returned.
    ///
    /// Errors: [`MappingError::SameKey`] if `from == to`; [`MappingError::Cycle`] if `to` is an
    /// ancestor of `from` (then nothing changes).
    pub fn grant(&mut self, from: K, to: K) -> Result<Vec<K>, MappingError> {
        if from == to {
            return Err(MappingError::SameKey);
        }
        let f = self.idx(from);
        let t = self.idx(to);
        if let (Some(f), Some(t)) = (f, t) {
            if self.is_ancestor_or_self(t, f) {
                return Err(MappingError::Cycle);
            }
        }
        // `to` is not an ancestor of `from`, so discarding its subtree leaves `f` valid.
        let removed = match t {
            Some(t) => self.discard(t),
            None => Vec::new(),
        };
        match f {
            Some(f) => {
                self.index.remove(from.pair());
                self.node_mut(f).key = to;
                assert!(
                    self.index.insert(to.pair(), f),
                    "mapping database: key not representable"
                );
            }
            None => {
                self.alloc(to, None);
            }
        }
        Ok(removed)
    }

    /// Revoke everything derived from `key`, recursively (all descendants), and `key` itself if
    /// `include_self`. Returns every removed key (top-down, pre-order). Absent key: returns empty.
    pub fn unmap(&mut self, key: K, include_self: bool) -> Vec<K> {
        let mut out = Vec::new();
        if let Some(i) = self.idx(key) {
            self.remove_subtree(i, include_self, &mut out);
        }
        out
    }

    /// Remove every node whose key satisfies `belongs` and all of their descendants (a destroyed
    /// address space). Returns every removed key (each once).
    pub fn remove_where(&mut self, belongs: impl Fn(&K) -> bool) -> Vec<K> {
        let hits: Vec<K> = self
            .index
            .entries()
            .into_iter()
            .map(|(k, _)| K::from_pair(k))
            .filter(|k| belongs(k))
            .collect();
        let mut out = Vec::new();
        for key in hits {
            // Skip keys already removed as a descendant of an earlier hit.
            if let Some(i) = self.idx(key) {
                self.remove_subtree(i, true, &mut out);
            }
        }
        // Give back the index memory of spaces that are empty now.
        let mut spaces: Vec<u64> = out.iter().map(|k| k.pair().0).collect();
        spaces.sort_unstable();
        spaces.dedup();
        for space in spaces {
            self.index.drop_space_if_empty(space);
        }
        out
    }

    /// The keys present in `range` (ascending), e.g. all pages of one space in an address range.
    /// An empty or inverted range yields nothing.
    pub fn keys_in<R: RangeBounds<K>>(&self, range: R) -> Vec<K> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        // `BTreeMap::range` panics on these; they denote empty ranges.
        let empty = match (start, end) {
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e))
                if s > e =>
            {
                true
            }
            (Bound::Excluded(s), Bound::Excluded(e)) => s == e,
            _ => false,
        };
        if empty {
            return Vec::new();
        }
        let pair = |b: Bound<K>| match b {
            Bound::Included(k) => Bound::Included(k.pair()),
            Bound::Excluded(k) => Bound::Excluded(k.pair()),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.index
            .range(pair(start), pair(end))
            .into_iter()
            .map(|(k, _)| K::from_pair(k))
            .collect()
    }

    /// Check the internal invariants (index and slab agree, free list is exact, parent/child
    /// links are mutual, no cycles); for tests.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let n = self.slab.len();
        let mut occupied = 0usize;
        let mut roots = Vec::new();
        for (i, slot) in self.slab.iter().enumerate() {
            let Some(node) = slot else { continue };
            occupied += 1;
            if self.index.get(node.key.pair()).map(|j| j as usize) != Some(i) {
                return Err("slab node is not indexed at its slot");
            }
            match node.parent {
                Some(p) => {
                    let pn = self.slot(p).ok_or("parent link to a vacant slot")?;
                    if pn.children.iter().filter(|&&c| c as usize == i).count() != 1 {
                        return Err("node not listed exactly once among its parent's children");
                    }
                }
                None => roots.push(i),
            }
            for &c in &node.children {
                let cn = self.slot(c).ok_or("child link to a vacant slot")?;
                if cn.parent.map(|p| p as usize) != Some(i) {
                    return Err("child's parent link does not point back");
                }
            }
        }
        if occupied != self.index.len() {
            return Err("index and slab sizes differ");
        }
        for (_, i) in self.index.entries() {
            if self.slot(i).is_none() {
                return Err("index points to a vacant slot");
            }
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
        // With mutual links every node has one parent, so a node on a cycle is unreachable
        // from the roots.
        let mut visited = vec![false; n];
        let mut reached = 0usize;
        let mut stack = roots;
        while let Some(i) = stack.pop() {
            if visited[i] {
                return Err("node reached twice from the roots");
            }
            visited[i] = true;
            reached += 1;
            if let Some(node) = &self.slab[i] {
                stack.extend(node.children.iter().map(|&c| c as usize));
            }
        }
        if reached != occupied {
            return Err("cycle: nodes unreachable from any root");
        }
        Ok(())
    }

    // ---- private helpers ----

    fn idx(&self, key: K) -> Option<u32> {
        self.index.get(key.pair())
    }

    fn slot(&self, i: u32) -> Option<&Node<K>> {
        self.slab.get(i as usize).and_then(Option::as_ref)
    }

    fn node(&self, i: u32) -> &Node<K> {
        self.slot(i)
            .expect("mapping database: link to a vacant slot")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<K> {
        self.slab
            .get_mut(i as usize)
            .and_then(Option::as_mut)
            .expect("mapping database: link to a vacant slot")
    }

    /// Whether `anc` is `n` or one of its ancestors.
    fn is_ancestor_or_self(&self, anc: u32, mut n: u32) -> bool {
        loop {
            if n == anc {
                return true;
            }
            match self.node(n).parent {
                Some(p) => n = p,
                None => return false,
            }
        }
    }

    /// Create a node for `key` (which must be absent), appended to `parent`'s children.
    fn alloc(&mut self, key: K, parent: Option<u32>) -> u32 {
        let node = Node {
            key,
            parent,
            children: Vec::new(),
        };
        let i = match self.free.pop() {
            Some(i) => {
                let slot = self
                    .slab
                    .get_mut(i as usize)
                    .expect("mapping database: free list out of range");
                *slot = Some(node);
                i
            }
            None => {
                let i = u32::try_from(self.slab.len())
                    .expect("mapping database: more than u32::MAX nodes");
                self.slab.push(Some(node));
                i
            }
        };
        assert!(
            self.index.insert(key.pair(), i),
            "mapping database: key not representable"
        );
        if let Some(p) = parent {
            self.node_mut(p).children.push(i);
        }
        i
    }

    /// Free slot `i` (its links are not touched) and return its node.
    fn release(&mut self, i: u32) -> Node<K> {
        let node = self
            .slab
            .get_mut(i as usize)
            .and_then(Option::take)
            .expect("mapping database: releasing a vacant slot");
        self.index.remove(node.key.pair());
        self.free.push(i);
        node
    }

    /// Remove `i` from its parent's child list and clear its parent link.
    fn unlink_from_parent(&mut self, i: u32) {
        if let Some(p) = self.node_mut(i).parent.take() {
            let siblings = &mut self.node_mut(p).children;
            if let Some(pos) = siblings.iter().position(|&c| c == i) {
                siblings.remove(pos);
            }
        }
    }

    /// Free the whole subtrees rooted at `roots` (already unlinked from their parent), appending
    /// their keys in pre-order.
    fn free_subtrees(&mut self, roots: Vec<u32>, out: &mut Vec<K>) {
        let mut stack = roots;
        stack.reverse();
        while let Some(i) = stack.pop() {
            let node = self.release(i);
            out.push(node.key);
            stack.extend(node.children.iter().rev());
        }
    }

    /// Remove all descendants of `i`, and `i` itself if `include_self`.
    fn remove_subtree(&mut self, i: u32, include_self: bool, out: &mut Vec<K>) {
        if include_self {
            self.unlink_from_parent(i);
            self.free_subtrees(vec![i], out);
        } else {
            let children = core::mem::take(&mut self.node_mut(i).children);
            self.free_subtrees(children, out);
        }
    }

    /// Remove `i` and its subtree; return the removed keys other than `i`'s own.
    fn discard(&mut self, i: u32) -> Vec<K> {
        let mut out = Vec::new();
        self.remove_subtree(i, false, &mut out);
        self.unlink_from_parent(i);
        self.release(i);
        out
    }
}

#[cfg(test)]
mod detailed_tests {
    use super::*;

    #[test]
    fn map_detailed_reports_created_and_replaced_nodes() {
        let mut db = MappingDatabase::new();
        let d = db.map_detailed((0u64, 1u64), (1, 1)).unwrap();
        assert_eq!(
            (d.parent_created, d.child_existed, d.replaced.len()),
            (true, false, 0)
        );
        db.map((1, 1), (2, 1)).unwrap();
        let d = db.map_detailed((0, 1), (1, 1)).unwrap();
        assert_eq!((d.parent_created, d.child_existed), (false, true));
        assert_eq!(d.replaced, alloc::vec![(2, 1)]);
        assert!(db.check_invariants().is_ok());
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::collections::{BTreeMap as Map, BTreeSet};
    use std::vec::Vec;

    type Key = (u64, u64);

    fn sorted<K: Ord + Clone>(v: &[K]) -> Vec<K> {
        let mut v = v.to_vec();
        v.sort();
        v
    }

    fn k(space: u64, page: u64) -> Key {
        (space, page)
    }

    /// a -> b -> c -> d -> e in space 0.
    fn chain(len: u64) -> MappingDatabase<Key> {
        let mut db = MappingDatabase::new();
        for i in 0..len - 1 {
            assert_eq!(db.map(k(0, i), k(0, i + 1)), Ok(vec![]));
        }
        db
    }

    #[test]
    fn empty_database() {
        let mut db: MappingDatabase<Key> = MappingDatabase::default();
        assert!(db.is_empty());
        assert_eq!(db.len(), 0);
        assert!(!db.contains(k(0, 0)));
        assert_eq!(db.parent(k(0, 0)), None);
        assert_eq!(db.children(k(0, 0)), vec![]);
        assert_eq!(db.depth(k(0, 0)), None);
        assert_eq!(db.unmap(k(0, 0), true), vec![]);
        assert_eq!(db.remove_where(|_| true), vec![]);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn chain_unmap_middle_without_self() {
        let mut db = chain(5);
        assert_eq!(db.len(), 5);
        assert_eq!(db.depth(k(0, 4)), Some(4));
        assert_eq!(db.depth(k(0, 0)), Some(0));
        assert_eq!(db.unmap(k(0, 2), false), vec![k(0, 3), k(0, 4)]);
        assert_eq!(db.len(), 3);
        assert!(db.contains(k(0, 2)));
        assert_eq!(db.parent(k(0, 2)), Some(k(0, 1)));
        assert_eq!(db.children(k(0, 2)), vec![]);
        assert!(!db.contains(k(0, 3)));
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn chain_unmap_middle_with_self() {
        let mut db = chain(5);
        assert_eq!(db.unmap(k(0, 2), true), vec![k(0, 2), k(0, 3), k(0, 4)]);
        assert_eq!(db.len(), 2);
        assert_eq!(db.children(k(0, 1)), vec![]);
        assert_eq!(db.parent(k(0, 1)), Some(k(0, 0)));
        assert_eq!(db.check_invariants(), Ok(()));
        // Slots are reused.
        let slab_len = db.slab.len();
        db.map(k(0, 1), k(1, 0)).unwrap();
        db.map(k(1, 0), k(1, 1)).unwrap();
        db.map(k(1, 1), k(1, 2)).unwrap();
        assert_eq!(db.slab.len(), slab_len);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn fan_out_and_unmap_root() {
        let mut db = MappingDatabase::new();
        let root = k(0, 0);
        for c in 1..=8 {
            db.map(root, k(1, c)).unwrap();
            for g in 0..3 {
                db.map(k(1, c), k(2, c * 10 + g)).unwrap();
            }
        }
        assert_eq!(db.len(), 1 + 8 + 24);
        assert_eq!(
            db.children(root),
            (1..=8).map(|c| k(1, c)).collect::<Vec<_>>()
        );
        assert_eq!(db.children(k(1, 3)), vec![k(2, 30), k(2, 31), k(2, 32)]);
        assert_eq!(db.depth(k(2, 52)), Some(2));
        assert_eq!(db.check_invariants(), Ok(()));
        let removed = db.unmap(root, false);
        assert_eq!(removed.len(), 32);
        assert_eq!(db.len(), 1);
        assert_eq!(db.children(root), vec![]);
        assert_eq!(db.check_invariants(), Ok(()));
        assert_eq!(db.unmap(root, true), vec![root]);
        assert!(db.is_empty());
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn unlink_keeps_sibling_order() {
        let mut db = MappingDatabase::new();
        for c in 1..=5 {
            db.map(0u32, c).unwrap();
        }
        assert_eq!(db.unmap(3, true), vec![3]);
        assert_eq!(db.children(0), vec![1, 2, 4, 5]);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn grant_keeps_parent_children_and_position() {
        let mut db = MappingDatabase::new();
        db.map(k(0, 0), k(1, 1)).unwrap();
        db.map(k(0, 0), k(1, 2)).unwrap();
        db.map(k(0, 0), k(1, 3)).unwrap();
        db.map(k(1, 2), k(2, 1)).unwrap();
        db.map(k(1, 2), k(2, 2)).unwrap();
        assert_eq!(db.grant(k(1, 2), k(3, 9)), Ok(vec![]));
        assert!(!db.contains(k(1, 2)));
        assert_eq!(db.parent(k(3, 9)), Some(k(0, 0)));
        assert_eq!(db.children(k(0, 0)), vec![k(1, 1), k(3, 9), k(1, 3)]);
        assert_eq!(db.children(k(3, 9)), vec![k(2, 1), k(2, 2)]);
        assert_eq!(db.parent(k(2, 2)), Some(k(3, 9)));
        assert_eq!(db.len(), 6);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn grant_from_absent_makes_root() {
        let mut db: MappingDatabase<Key> = MappingDatabase::new();
        assert_eq!(db.grant(k(0, 1), k(1, 1)), Ok(vec![]));
        assert!(!db.contains(k(0, 1)));
        assert!(db.contains(k(1, 1)));
        assert_eq!(db.parent(k(1, 1)), None);
        assert_eq!(db.depth(k(1, 1)), Some(0));
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn grant_onto_existing_replaces_its_subtree() {
        let mut db = MappingDatabase::new();
        db.map(k(0, 0), k(0, 1)).unwrap();
        db.map(k(5, 0), k(1, 1)).unwrap();
        db.map(k(1, 1), k(1, 2)).unwrap();
        db.map(k(1, 2), k(1, 3)).unwrap();
        let removed = db.grant(k(0, 1), k(1, 1)).unwrap();
        assert_eq!(sorted(&removed), vec![k(1, 2), k(1, 3)]);
        assert_eq!(db.parent(k(1, 1)), Some(k(0, 0)));
        assert_eq!(db.children(k(5, 0)), vec![]);
        assert_eq!(db.children(k(1, 1)), vec![]);
        assert!(!db.contains(k(0, 1)));
        assert_eq!(db.check_invariants(), Ok(()));
        // Granting onto one's own descendant: that descendant's subtree goes, the node moves.
        db.map(k(1, 1), k(2, 1)).unwrap();
        db.map(k(2, 1), k(2, 2)).unwrap();
        assert_eq!(db.grant(k(1, 1), k(2, 1)), Ok(vec![k(2, 2)]));
        assert_eq!(db.parent(k(2, 1)), Some(k(0, 0)));
        assert_eq!(db.children(k(2, 1)), vec![]);
        assert_eq!(db.check_invariants(), Ok(()));
        // Granting from an absent key onto an existing one.
        db.map(k(2, 1), k(3, 1)).unwrap();
        assert_eq!(db.grant(k(9, 9), k(2, 1)), Ok(vec![k(3, 1)]));
        assert_eq!(db.parent(k(2, 1)), None);
        assert_eq!(db.children(k(0, 0)), vec![]);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn map_onto_existing_child_replaces_old_subtree() {
        let mut db = MappingDatabase::new();
        db.map(k(0, 0), k(1, 0)).unwrap();
        db.map(k(1, 0), k(2, 0)).unwrap();
        db.map(k(2, 0), k(3, 0)).unwrap();
        db.map(k(1, 0), k(2, 1)).unwrap();
        let removed = db.map(k(4, 0), k(1, 0)).unwrap();
        assert_eq!(sorted(&removed), vec![k(2, 0), k(2, 1), k(3, 0)]);
        assert_eq!(db.parent(k(1, 0)), Some(k(4, 0)));
        assert_eq!(db.children(k(0, 0)), vec![]);
        assert_eq!(db.children(k(1, 0)), vec![]);
        assert_eq!(db.len(), 3);
        assert_eq!(db.check_invariants(), Ok(()));
        // Re-mapping under the same parent moves it to the end of the child list.
        db.map(k(4, 0), k(1, 1)).unwrap();
        assert_eq!(db.map(k(4, 0), k(1, 0)), Ok(vec![]));
        assert_eq!(db.children(k(4, 0)), vec![k(1, 1), k(1, 0)]);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn cycles_and_same_key_rejected() {
        let mut db = chain(4);
        let before: Vec<_> = db.keys_in(..);
        assert_eq!(db.map(k(0, 3), k(0, 0)), Err(MappingError::Cycle));
        assert_eq!(db.map(k(0, 3), k(0, 2)), Err(MappingError::Cycle));
        assert_eq!(db.map(k(0, 2), k(0, 2)), Err(MappingError::SameKey));
        assert_eq!(db.map(k(7, 7), k(7, 7)), Err(MappingError::SameKey));
        assert_eq!(db.grant(k(0, 3), k(0, 1)), Err(MappingError::Cycle));
        assert_eq!(db.grant(k(0, 1), k(0, 0)), Err(MappingError::Cycle));
        assert_eq!(db.grant(k(0, 1), k(0, 1)), Err(MappingError::SameKey));
        assert_eq!(db.keys_in(..), before);
        assert_eq!(db.parent(k(0, 3)), Some(k(0, 2)));
        assert!(!db.contains(k(7, 7)));
        assert_eq!(db.check_invariants(), Ok(()));
        assert_eq!(
            std::format!("{}", MappingError::Cycle),
            "target is an ancestor of the source (would create a cycle)"
        );
        assert!(!std::format!("{}", MappingError::SameKey).is_empty());
    }

    #[test]
    fn remove_where_destroys_one_space() {
        let mut db = MappingDatabase::new();
        // Space 0 maps to 1, which maps on to 2; space 2 also has an independent tree into 3.
        db.map(k(0, 0), k(1, 0)).unwrap();
        db.map(k(1, 0), k(2, 0)).unwrap();
        db.map(k(2, 5), k(3, 5)).unwrap();
        db.map(k(3, 5), k(1, 5)).unwrap();
        db.map(k(1, 5), k(3, 6)).unwrap();
        db.map(k(0, 1), k(0, 2)).unwrap();
        let removed = db.remove_where(|key| key.0 == 1);
        assert_eq!(sorted(&removed), vec![k(1, 0), k(1, 5), k(2, 0), k(3, 6)]);
        assert_eq!(
            db.keys_in(..),
            vec![k(0, 0), k(0, 1), k(0, 2), k(2, 5), k(3, 5)]
        );
        assert_eq!(db.children(k(0, 0)), vec![]);
        assert_eq!(db.children(k(3, 5)), vec![]);
        assert_eq!(db.check_invariants(), Ok(()));
        // Nested hits are reported once.
        let mut db = chain(6);
        let removed = db.remove_where(|_| true);
        assert_eq!(
            sorted(&removed),
            (0..6).map(|i| k(0, i)).collect::<Vec<_>>()
        );
        assert!(db.is_empty());
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn deep_chain_has_no_recursion() {
        const N: u64 = 10_000;
        let mut db = chain(N);
        assert_eq!(db.len(), N as usize);
        assert_eq!(db.depth(k(0, N - 1)), Some(N as usize - 1));
        assert_eq!(db.check_invariants(), Ok(()));
        // Cycle check walks the whole chain.
        assert_eq!(db.map(k(0, N - 1), k(0, 0)), Err(MappingError::Cycle));
        assert_eq!(db.grant(k(0, N - 1), k(0, 0)), Err(MappingError::Cycle));
        // Grant the root away: the chain hangs under the new key.
        assert_eq!(db.grant(k(0, 0), k(1, 0)), Ok(vec![]));
        assert_eq!(db.depth(k(0, N - 1)), Some(N as usize - 1));
        let removed = db.unmap(k(0, N / 2), false);
        assert_eq!(removed.len(), (N / 2 - 1) as usize);
        assert_eq!(db.check_invariants(), Ok(()));
        let removed = db.unmap(k(1, 0), true);
        assert_eq!(removed.len(), (N / 2 + 1) as usize);
        assert!(db.is_empty());
        // Rebuild and replace the whole chain through `map` onto its root.
        let mut db = chain(N);
        let removed = db.map(k(5, 5), k(0, 0)).unwrap();
        assert_eq!(removed.len(), N as usize - 1);
        assert_eq!(db.len(), 2);
        assert_eq!(db.check_invariants(), Ok(()));
        let mut db = chain(N);
        assert_eq!(db.remove_where(|key| key.1 == 1).len(), N as usize - 1);
        assert_eq!(db.check_invariants(), Ok(()));
    }

    #[test]
    fn keys_in_tuple_ranges() {
        let mut db = MappingDatabase::new();
        for space in 0..3 {
            for page in (0..20).step_by(2) {
                db.grant(k(99, 99), k(space, page)).unwrap();
            }
        }
        assert_eq!(
            db.keys_in(k(1, 4)..k(1, 10)),
            vec![k(1, 4), k(1, 6), k(1, 8)]
        );
        assert_eq!(
            db.keys_in(k(1, 4)..=k(1, 10)),
            vec![k(1, 4), k(1, 6), k(1, 8), k(1, 10)]
        );
        assert_eq!(db.keys_in(k(2, 0)..k(3, 0)).len(), 10);
        assert_eq!(db.keys_in(k(2, 15)..).len(), 2);
        assert_eq!(db.keys_in(..k(0, 3)), vec![k(0, 0), k(0, 2)]);
        assert_eq!(db.keys_in(..).len(), 30);
        // Empty and inverted ranges do not panic.
        assert_eq!(db.keys_in(k(1, 10)..k(1, 4)), vec![]);
        assert_eq!(db.keys_in(k(1, 4)..k(1, 4)), vec![]);
        assert_eq!(
            db.keys_in((Bound::Excluded(k(1, 4)), Bound::Excluded(k(1, 4)))),
            vec![]
        );
        assert_eq!(
            db.keys_in((Bound::Excluded(k(1, 4)), Bound::Included(k(1, 4)))),
            vec![]
        );
        assert_eq!(
            db.keys_in((Bound::Excluded(k(1, 4)), Bound::Included(k(1, 6)))),
            vec![k(1, 6)]
        );
    }

    #[test]
    fn check_invariants_detects_corruption() {
        let mut db = chain(3);
        db.check_invariants().unwrap();
        let mut bad = db.clone();
        bad.index.insert(k(9, 9), 0);
        assert!(bad.check_invariants().is_err());
        let mut bad = db.clone();
        bad.slab[2].as_mut().unwrap().parent = None;
        assert!(bad.check_invariants().is_err());
        let mut bad = db.clone();
        bad.free.push(1);
        assert!(bad.check_invariants().is_err());
        // A two-node cycle detached from the roots.
        let mut bad = db.clone();
        bad.slab[1].as_mut().unwrap().parent = Some(2);
        bad.slab[0].as_mut().unwrap().children.clear();
        bad.slab[2].as_mut().unwrap().children.push(1);
        assert!(bad.check_invariants().is_err());
        db.unmap(k(0, 1), true);
        db.check_invariants().unwrap();
    }

    // ---- randomized comparison against a simple model ----

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn key(&mut self) -> Key {
            (self.below(4), self.below(16))
        }
    }

    /// child -> (parent, insertion stamp); children order is ascending stamp.
    #[derive(Default)]
    struct Model {
        nodes: Map<Key, (Option<Key>, u64)>,
        stamp: u64,
    }

    impl Model {
        fn fresh(&mut self) -> u64 {
            self.stamp += 1;
            self.stamp
        }

        fn is_ancestor_or_self(&self, anc: Key, mut n: Key) -> bool {
            loop {
                if n == anc {
                    return true;
                }
                match self.nodes.get(&n) {
                    Some(&(Some(p), _)) => n = p,
                    _ => return false,
                }
            }
        }

        /// Transitive closure of "child of", excluding the roots themselves.
        fn descendants(&self, roots: &BTreeSet<Key>) -> BTreeSet<Key> {
            let mut set = roots.clone();
            loop {
                let before = set.len();
                for (c, (p, _)) in &self.nodes {
                    if let Some(p) = p {
                        if set.contains(p) {
                            set.insert(*c);
                        }
                    }
                }
                if set.len() == before {
                    break;
                }
            }
            set.difference(roots).copied().collect()
        }

        fn remove_all(&mut self, keys: &BTreeSet<Key>) {
            for key in keys {
                self.nodes.remove(key);
            }
        }

        fn map(&mut self, parent: Key, child: Key) -> Result<Vec<Key>, MappingError> {
            if parent == child {
                return Err(MappingError::SameKey);
            }
            let mut removed = BTreeSet::new();
            if self.nodes.contains_key(&child) {
                if self.is_ancestor_or_self(child, parent) {
                    return Err(MappingError::Cycle);
                }
                let me = BTreeSet::from([child]);
                removed = self.descendants(&me);
                self.remove_all(&removed);
                self.remove_all(&me);
            }
            if !self.nodes.contains_key(&parent) {
                let s = self.fresh();
                self.nodes.insert(parent, (None, s));
            }
            let s = self.fresh();
            self.nodes.insert(child, (Some(parent), s));
            Ok(removed.into_iter().collect())
        }

        fn grant(&mut self, from: Key, to: Key) -> Result<Vec<Key>, MappingError> {
            if from == to {
                return Err(MappingError::SameKey);
            }
            let has_from = self.nodes.contains_key(&from);
            if has_from && self.nodes.contains_key(&to) && self.is_ancestor_or_self(to, from) {
                return Err(MappingError::Cycle);
            }
            let mut removed = BTreeSet::new();
            if self.nodes.contains_key(&to) {
                let me = BTreeSet::from([to]);
                removed = self.descendants(&me);
                self.remove_all(&removed);
                self.remove_all(&me);
            }
            if has_from {
                let entry = self.nodes.remove(&from).unwrap();
                self.nodes.insert(to, entry);
                for (p, _) in self.nodes.values_mut() {
                    if *p == Some(from) {
                        *p = Some(to);
                    }
                }
            } else {
                let s = self.fresh();
                self.nodes.insert(to, (None, s));
            }
            Ok(removed.into_iter().collect())
        }

        fn unmap(&mut self, key: Key, include_self: bool) -> Vec<Key> {
            if !self.nodes.contains_key(&key) {
                return Vec::new();
            }
            let me = BTreeSet::from([key]);
            let mut removed = self.descendants(&me);
            if include_self {
                removed.insert(key);
            }
            self.remove_all(&removed);
            removed.into_iter().collect()
        }

        fn remove_space(&mut self, space: u64) -> Vec<Key> {
            let roots: BTreeSet<Key> = self
                .nodes
                .keys()
                .filter(|key| key.0 == space)
                .copied()
                .collect();
            let mut removed = self.descendants(&roots);
            removed.extend(roots.iter().copied());
            self.remove_all(&removed);
            removed.into_iter().collect()
        }
    }

    fn assert_same(db: &MappingDatabase<Key>, model: &Model, ctx: &str) {
        assert_eq!(db.check_invariants(), Ok(()), "{ctx}");
        let keys: Vec<Key> = model.nodes.keys().copied().collect();
        assert_eq!(db.keys_in(..), keys, "{ctx}");
        assert_eq!(db.len(), keys.len(), "{ctx}");
        let mut kids: Map<Key, Vec<(u64, Key)>> = Map::new();
        for (c, (p, s)) in &model.nodes {
            if let Some(p) = p {
                kids.entry(*p).or_default().push((*s, *c));
            }
        }
        for (key, (p, _)) in &model.nodes {
            assert_eq!(db.parent(*key), *p, "{ctx}: parent of {key:?}");
            let mut expected = kids.remove(key).unwrap_or_default();
            expected.sort();
            let expected: Vec<Key> = expected.into_iter().map(|(_, c)| c).collect();
            assert_eq!(db.children(*key), expected, "{ctx}: children of {key:?}");
        }
    }

    /// Compare one operation's outcome with the model's; returns (was an error, keys removed).
    fn assert_removed(
        got: Result<Vec<Key>, MappingError>,
        want: Result<Vec<Key>, MappingError>,
        ctx: &str,
    ) -> (bool, usize) {
        match (got, want) {
            (Ok(got), Ok(want)) => {
                let got_sorted = sorted(&got);
                let mut dedup = got_sorted.clone();
                dedup.dedup();
                assert_eq!(got_sorted, dedup, "{ctx}: duplicate removed keys");
                assert_eq!(got_sorted, sorted(&want), "{ctx}");
                (false, got.len())
            }
            (got, want) => {
                assert_eq!(got, want, "{ctx}");
                (true, 0)
            }
        }
    }

    #[test]
    fn randomized_against_model() {
        // Coverage counters, so the test proves it exercised the interesting cases.
        let (mut errors, mut same, mut replaced, mut revoked, mut max_len) = (0, 0, 0, 0, 0);
        for run in 0..20u64 {
            let mut rng = Rng(0x5EED_0000 + run);
            let mut db = MappingDatabase::new();
            let mut model = Model::default();
            for step in 0..2_000 {
                let op = rng.below(100);
                let ctx = std::format!("run {run} step {step} op {op}");
                let (is_err, n) = match op {
                    0..=39 => {
                        let (p, c) = (rng.key(), rng.key());
                        let want = model.map(p, c);
                        if want == Err(MappingError::SameKey) {
                            same += 1;
                        }
                        if want.as_ref().is_ok_and(|r| !r.is_empty()) {
                            replaced += 1;
                        }
                        assert_removed(db.map(p, c), want, &ctx)
                    }
                    40..=64 => {
                        let (f, t) = (rng.key(), rng.key());
                        let want = model.grant(f, t);
                        if want.as_ref().is_ok_and(|r| !r.is_empty()) {
                            replaced += 1;
                        }
                        assert_removed(db.grant(f, t), want, &ctx)
                    }
                    65..=94 => {
                        let key = rng.key();
                        let include_self = rng.below(2) == 0;
                        let got = db.unmap(key, include_self);
                        assert_removed(Ok(got), Ok(model.unmap(key, include_self)), &ctx)
                    }
                    _ => {
                        let space = rng.below(4);
                        let got = db.remove_where(|key| key.0 == space);
                        assert_removed(Ok(got), Ok(model.remove_space(space)), &ctx)
                    }
                };
                if is_err {
                    errors += 1;
                }
                revoked += n;
                max_len = max_len.max(db.len());
                assert_same(&db, &model, &ctx);
            }
        }
        std::println!(
            "errors {errors} same-key {same} replaced {replaced} revoked {revoked} max {max_len}"
        );
        assert!(errors > same && same > 0, "errors {errors} same-key {same}");
        assert!(replaced > 0 && revoked > 0 && max_len > 20);
    }

    #[test]
    fn randomized_depth_matches_parent_walk() {
        let mut rng = Rng(42);
        let mut db = MappingDatabase::new();
        for _ in 0..5_000 {
            let (a, b) = (rng.key(), rng.key());
            let _ = if rng.below(3) == 0 {
                db.grant(a, b)
            } else {
                db.map(a, b)
            };
            let key = rng.key();
            let mut walk = 0;
            let mut cur = key;
            while let Some(p) = db.parent(cur) {
                walk += 1;
                cur = p;
            }
            let expected = db.contains(key).then_some(walk);
            assert_eq!(db.depth(key), expected);
        }
        db.check_invariants().unwrap();
    }
}
