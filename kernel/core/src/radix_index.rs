//! An ordered index from `(space, number)` keys to `u32` values: per space a 64-ary radix tree
//! over the number shifted right by a fixed amount (12 for page addresses, 0 for ports and
//! slots). Lookups and inserts cost a few array steps instead of a B-tree search; range
//! iteration skips empty subtrees.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Bound;

const BITS: u32 = 6;
const FANOUT: usize = 1 << BITS;
const LEVELS: u32 = 6; // 36 bits of index: page numbers of a 47-bit space, ports, slots
const EMPTY: u32 = u32::MAX;

#[derive(Clone, Debug)]
enum Node {
    Inner {
        children: Box<[Option<Box<Node>>; FANOUT]>,
        count: u32,
    },
    Leaf {
        values: Box<[u32; FANOUT]>,
        count: u32,
    },
}

impl Node {
    fn new(level: u32) -> Node {
        if level == 0 {
            Node::Leaf {
                values: Box::new([EMPTY; FANOUT]),
                count: 0,
            }
        } else {
            Node::Inner {
                children: Box::new([const { None }; FANOUT]),
                count: 0,
            }
        }
    }

    fn count(&self) -> u32 {
        match self {
            Node::Inner { count, .. } | Node::Leaf { count, .. } => *count,
        }
    }
}

fn slot(index: u64, level: u32) -> usize {
    ((index >> (BITS * level)) & (FANOUT as u64 - 1)) as usize
}

/// Heap bytes of a leaf (its box and its value array).
pub const LEAF_BYTES: u64 = 16 + 256;
/// Heap bytes of an inner node below the root (its box and its child array).
pub const INNER_BYTES: u64 = 16 + 512;
/// Heap bytes of a space's tree before any entry (its root's child array and its share of
/// the map of spaces).
pub const SPACE_BYTES: u64 = 512 + 64;

/// The index.
#[derive(Clone, Debug)]
pub struct RadixIndex {
    shift: u32,
    spaces: BTreeMap<u64, Node>,
    /// Heap bytes each space's tree holds (nodes stay until the space's tree is dropped).
    bytes: BTreeMap<u64, u64>,
    len: usize,
}

impl RadixIndex {
    /// An empty index for numbers that are multiples of `1 << shift`.
    pub const fn new(shift: u32) -> Self {
        RadixIndex {
            shift,
            spaces: BTreeMap::new(),
            bytes: BTreeMap::new(),
            len: 0,
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn split(&self, number: u64) -> Option<u64> {
        let index = number >> self.shift;
        (index << self.shift == number && index >> (BITS * LEVELS) == 0).then_some(index)
    }

    /// The value of `(space, number)`.
    pub fn get(&self, (space, number): (u64, u64)) -> Option<u32> {
        let index = self.split(number)?;
        let mut node = self.spaces.get(&space)?;
        for level in (1..LEVELS).rev() {
            match node {
                Node::Inner { children, .. } => node = children[slot(index, level)].as_deref()?,
                Node::Leaf { .. } => return None,
            }
        }
        match node {
            Node::Leaf { values, .. } => Some(values[slot(index, 0)]).filter(|&v| v != EMPTY),
            Node::Inner { .. } => None,
        }
    }

    /// Set `(space, number)` to `value` (returns false, changing nothing, if the number is not
    /// representable: not a multiple of the shift or beyond 48 bits of index).
    pub fn insert(&mut self, (space, number): (u64, u64), value: u32) -> bool {
        let Some(index) = self.split(number) else {
            return false;
        };
        let mut added = 0;
        let mut node = self.spaces.entry(space).or_insert_with(|| {
            added += SPACE_BYTES;
            Node::new(LEVELS - 1)
        });
        for level in (1..LEVELS).rev() {
            let Node::Inner { children, count } = node else {
                unreachable!("inner level holds a leaf")
            };
            let child = &mut children[slot(index, level)];
            if child.is_none() {
                *child = Some(Box::new(Node::new(level - 1)));
                added += if level == 1 { LEAF_BYTES } else { INNER_BYTES };
            }
            let child = child.as_deref_mut().expect("just filled");
            // An empty child (new, or emptied earlier) holds the new entry below: count it.
            if child.count() == 0 {
                *count += 1;
            }
            node = child;
        }
        let Node::Leaf { values, count } = node else {
            unreachable!("leaf level holds an inner node")
        };
        let entry = &mut values[slot(index, 0)];
        if *entry == EMPTY {
            *count += 1;
            self.len += 1;
        }
        *entry = value;
        if added > 0 {
            *self.bytes.entry(space).or_insert(0) += added;
        }
        true
    }

    /// Heap bytes the tree of `space` holds.
    pub fn space_bytes(&self, space: u64) -> u64 {
        self.bytes.get(&space).copied().unwrap_or(0)
    }

    /// Heap bytes inserting `numbers` into `space` would add (at most: each missing node is
    /// counted once; numbers that are not representable add nothing).
    pub fn insert_cost(&self, space: u64, numbers: impl IntoIterator<Item = u64>) -> u64 {
        let root = self.spaces.get(&space);
        let mut cost = if root.is_none() { SPACE_BYTES } else { 0 };
        let mut counted: Vec<(u32, u64)> = Vec::new();
        for number in numbers {
            let Some(index) = self.split(number) else {
                continue;
            };
            let mut node = root;
            for level in (1..LEVELS).rev() {
                let child = match node {
                    Some(Node::Inner { children, .. }) => children[slot(index, level)].as_deref(),
                    _ => None,
                };
                if child.is_none() {
                    let key = (level, index >> (BITS * level));
                    if !counted.contains(&key) {
                        counted.push(key);
                        cost += if level == 1 { LEAF_BYTES } else { INNER_BYTES };
                    }
                }
                node = child;
            }
        }
        cost
    }

    /// Remove `(space, number)`; returns its value. Emptied nodes stay allocated (the same
    /// ranges are typically mapped again; memory stays bounded by the largest population),
    /// except that a space whose tree became empty is dropped.
    pub fn remove(&mut self, (space, number): (u64, u64)) -> Option<u32> {
        let index = self.split(number)?;
        let root = self.spaces.get_mut(&space)?;
        let removed = remove_in(root, index, LEVELS - 1)?;
        self.len -= 1;
        Some(removed)
    }

    /// Drop the tree of `space` if it holds no entries (after a task or VM is destroyed).
    pub fn drop_space_if_empty(&mut self, space: u64) {
        if self
            .spaces
            .get(&space)
            .is_some_and(|root| root.count() == 0)
        {
            self.spaces.remove(&space);
            self.bytes.remove(&space);
        }
    }

    /// Keys (ascending) within the bounds, with their values.
    pub fn range(
        &self,
        start: Bound<(u64, u64)>,
        end: Bound<(u64, u64)>,
    ) -> Vec<((u64, u64), u32)> {
        let mut out = Vec::new();
        let low = match start {
            Bound::Included(k) => Some((k, true)),
            Bound::Excluded(k) => Some((k, false)),
            Bound::Unbounded => None,
        };
        let high = match end {
            Bound::Included(k) => Some((k, true)),
            Bound::Excluded(k) => Some((k, false)),
            Bound::Unbounded => None,
        };
        let space_low = low.map_or(Bound::Unbounded, |((s, _), _)| Bound::Included(s));
        let space_high = high.map_or(Bound::Unbounded, |((s, _), _)| Bound::Included(s));
        if let (Some(((ls, ln), li)), Some(((hs, hn), hi))) = (low, high) {
            if (ls, ln) > (hs, hn) || ((ls, ln) == (hs, hn) && !(li && hi)) {
                return out;
            }
        }
        let last_index = (1u64 << (BITS * LEVELS)) - 1;
        for (&space, root) in self.spaces.range((space_low, space_high)) {
            // Index bounds inside this space (inclusive).
            let first = match low {
                Some(((s, n), inclusive)) if s == space => {
                    let i = n.div_ceil(1 << self.shift);
                    if !inclusive && i << self.shift == n {
                        i + 1
                    } else {
                        i
                    }
                }
                _ => 0,
            };
            let last = match high {
                Some(((s, n), inclusive)) if s == space => {
                    let i = n >> self.shift;
                    if !inclusive && i << self.shift == n {
                        match i.checked_sub(1) {
                            Some(i) => i,
                            None => continue,
                        }
                    } else {
                        i.min(last_index)
                    }
                }
                _ => last_index,
            };
            if first > last {
                continue;
            }
            collect(root, LEVELS - 1, 0, first, last, &mut |index, value| {
                out.push(((space, index << self.shift), value));
                true
            });
        }
        out
    }

    /// Visit the entries of `space` with numbers in `start..end` (ascending) until `visit`
    /// returns false; allocates nothing and skips empty subtrees.
    pub fn visit_space(
        &self,
        space: u64,
        start: u64,
        end: u64,
        visit: &mut impl FnMut(u64, u32) -> bool,
    ) {
        if start >= end {
            return;
        }
        let Some(root) = self.spaces.get(&space) else {
            return;
        };
        let last_index = (1u64 << (BITS * LEVELS)) - 1;
        let first = start.div_ceil(1 << self.shift);
        let last = ((end - 1) >> self.shift).min(last_index);
        if first > last {
            return;
        }
        let shift = self.shift;
        collect(root, LEVELS - 1, 0, first, last, &mut |index, value| {
            visit(index << shift, value)
        });
    }

    /// The first entry of `space` with a number in `start..end`.
    pub fn first_in(&self, space: u64, start: u64, end: u64) -> Option<(u64, u32)> {
        let mut found = None;
        self.visit_space(space, start, end, &mut |number, value| {
            found = Some((number, value));
            false
        });
        found
    }

    /// Every entry, ascending.
    pub fn entries(&self) -> Vec<((u64, u64), u32)> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }
}

fn remove_in(node: &mut Node, index: u64, level: u32) -> Option<u32> {
    match node {
        Node::Leaf { values, count } => {
            let entry = &mut values[slot(index, 0)];
            if *entry == EMPTY {
                return None;
            }
            let value = core::mem::replace(entry, EMPTY);
            *count -= 1;
            Some(value)
        }
        Node::Inner { children, count } => {
            let s = slot(index, level);
            let child = children[s].as_deref_mut()?;
            let empty_before = child.count() == 0;
            let value = remove_in(child, index, level - 1)?;
            if child.count() == 0 && !empty_before {
                // The child is empty now (kept allocated); count only non-empty children.
                *count -= 1;
            }
            Some(value)
        }
    }
}

/// Visit entries with index in `first..=last` below `node` (which covers indices from `base`;
/// the caller guarantees `base <= last`) until `visit` returns false (then returns false).
/// Only the slots that overlap the range are looked at, and empty subtrees are skipped.
/// Recursion depth is bounded by the fixed number of levels.
fn collect(
    node: &Node,
    level: u32,
    base: u64,
    first: u64,
    last: u64,
    visit: &mut impl FnMut(u64, u32) -> bool,
) -> bool {
    if node.count() == 0 {
        return true;
    }
    let span = 1u64 << (BITS * level);
    let low = (first.saturating_sub(base) / span) as usize;
    let high = ((last - base) / span).min(FANOUT as u64 - 1) as usize;
    match node {
        Node::Leaf { values, .. } => {
            for (i, &v) in values.iter().enumerate().take(high + 1).skip(low) {
                if v != EMPTY && !visit(base + i as u64, v) {
                    return false;
                }
            }
        }
        Node::Inner { children, .. } => {
            for (i, child) in children.iter().enumerate().take(high + 1).skip(low) {
                if let Some(child) = child {
                    if !collect(child, level - 1, base + i as u64 * span, first, last, visit) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeMap as Model;

    #[test]
    fn bytes_and_insert_cost_agree() {
        let mut r = RadixIndex::new(12);
        let keys: std::vec::Vec<u64> = (0..600).map(|i| 0x40_0000 + i * 0x1000).collect();
        let sparse: std::vec::Vec<u64> = (0..20).map(|i| i << 33).collect();
        for batch in [&keys[..1], &keys[1..], &sparse[..]] {
            let before = r.space_bytes(7);
            let cost = r.insert_cost(7, batch.iter().copied());
            for &k in batch {
                assert!(r.insert((7, k), 1));
            }
            assert_eq!(r.space_bytes(7) - before, cost);
        }
        assert_eq!(r.insert_cost(7, keys.iter().copied()), 0);
        for k in keys.iter().chain(&sparse) {
            r.remove((7, *k));
        }
        r.drop_space_if_empty(7);
        assert_eq!(r.space_bytes(7), 0);
    }

    #[test]
    fn insert_get_remove_and_free() {
        let mut r = RadixIndex::new(12);
        assert!(r.insert((1, 0x40_0000), 7));
        assert!(r.insert((1, 0x7fff_ffff_f000), 8));
        assert!(
            !r.insert((1, 0x40_0001), 9),
            "unaligned numbers are refused"
        );
        assert_eq!(r.get((1, 0x40_0000)), Some(7));
        assert_eq!(r.get((2, 0x40_0000)), None);
        assert_eq!(r.len(), 2);
        assert_eq!(r.remove((1, 0x40_0000)), Some(7));
        assert_eq!(r.remove((1, 0x40_0000)), None);
        assert_eq!(r.remove((1, 0x7fff_ffff_f000)), Some(8));
        r.drop_space_if_empty(1);
        assert!(r.spaces.is_empty(), "an empty space's tree can be dropped");
        assert!(r.is_empty());
        assert!(r.insert((1, 0x40_0000), 9));
        assert_eq!(r.remove((1, 0x40_0000)), Some(9));
        assert!(r.insert((1, 0x40_0000), 10), "emptied nodes are reused");
        assert_eq!(r.get((1, 0x40_0000)), Some(10));
    }

    #[test]
    fn ranges_match_a_btree_model() {
        let mut r = RadixIndex::new(0);
        let mut model = Model::new();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for i in 0..3000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let key = (seed % 4, (seed >> 8) % 5000);
            if seed.is_multiple_of(3) {
                assert_eq!(r.remove(key), model.remove(&key));
            } else {
                r.insert(key, i);
                model.insert(key, i);
            }
            assert_eq!(r.len(), model.len());
        }
        let all: Vec<_> = model.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(r.entries(), all);
        for (a, b) in [
            ((1, 100), (1, 2000)),
            ((0, 0), (3, 4999)),
            ((2, 4000), (1, 10)),
            ((2, 7), (2, 7)),
        ] {
            let bounds = [
                (Bound::Included(a), Bound::Excluded(b)),
                (Bound::Excluded(a), Bound::Included(b)),
                (Bound::Included(a), Bound::Included(b)),
                (Bound::Excluded(a), Bound::Excluded(b)),
                (Bound::Unbounded, Bound::Included(b)),
                (Bound::Included(a), Bound::Unbounded),
            ];
            for (low, high) in bounds {
                let within = |k: &(u64, u64)| {
                    (match low {
                        Bound::Included(x) => *k >= x,
                        Bound::Excluded(x) => *k > x,
                        Bound::Unbounded => true,
                    }) && (match high {
                        Bound::Included(x) => *k <= x,
                        Bound::Excluded(x) => *k < x,
                        Bound::Unbounded => true,
                    })
                };
                let expected: Vec<_> = model
                    .iter()
                    .filter(|(k, _)| within(k))
                    .map(|(&k, &v)| (k, v))
                    .collect();
                assert_eq!(r.range(low, high), expected, "bounds {low:?}..{high:?}");
            }
        }
    }

    #[test]
    fn shifted_ranges() {
        let mut r = RadixIndex::new(12);
        for page in 0..10u64 {
            r.insert((5, page * 0x1000), page as u32);
        }
        let got: Vec<u64> = r
            .range(Bound::Included((5, 0x2000)), Bound::Excluded((5, 0x5000)))
            .iter()
            .map(|(k, _)| k.1)
            .collect();
        assert_eq!(got, [0x2000, 0x3000, 0x4000]);
        let got: Vec<u64> = r
            .range(Bound::Included((5, 0x2001)), Bound::Included((5, 0x4fff)))
            .iter()
            .map(|(k, _)| k.1)
            .collect();
        assert_eq!(got, [0x3000, 0x4000]);
    }
}
