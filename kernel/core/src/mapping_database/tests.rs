//! Host tests of the mapping database: unit cases for each operation at mixed sizes, and a
//! randomized comparison against a model that tracks every smallest unit on its own (the
//! database must behave exactly like it, however it groups units into nodes).

extern crate std;

use super::*;
use std::collections::BTreeMap;
use std::vec::Vec;

/// Pages (4 KiB), large pages (2 MiB) and huge pages (1 GiB), as the kernel uses them.
const PAGES: &[u32] = &[12, 21, 30];
const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;

fn m(space: u64, base: u64, order: u32) -> Mapping<u64> {
    Mapping { space, base, order }
}

fn sorted(v: Removed<u64>) -> Vec<Mapping<u64>> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn pages() -> MappingDatabase<u64> {
    MappingDatabase::new(PAGES)
}

#[test]
fn empty_database() {
    let mut db = pages();
    assert!(db.is_empty());
    assert_eq!(db.find(0, 0), None);
    assert_eq!(db.parent(m(0, 0, 12)), None);
    assert_eq!(db.children(m(0, 0, 12)), vec![]);
    assert_eq!(db.depth(m(0, 0, 12)), None);
    assert!(db.unmap(0, 0, M2, true).removed.is_empty());
    assert_eq!(db.remove_space(0), vec![]);
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn a_large_page_is_one_node_at_every_level() {
    let mut db = pages();
    // sigma0 (space 0) holds 2 MiB; root task (1), VMM (2), VM (3) each get it whole.
    db.map((0, 0x4000_0000), 21, (1, 0x20_0000), 21).unwrap();
    db.map((1, 0x20_0000), 21, (2, 0x80_0000), 21).unwrap();
    let c = db.map((2, 0x80_0000), 21, (3, 0), 21).unwrap();
    assert!(c.removed.is_empty());
    assert_eq!(c.created.to_vec(), vec![(3, 1)]);
    assert_eq!(db.len(), 4);
    assert_eq!(db.find(3, 0x1f_f000), Some(m(3, 0, 21)));
    assert_eq!(db.depth(m(3, 0, 21)), Some(3));
    assert_eq!(
        db.parent(m(1, 0x20_0000, 21)),
        Some((m(0, 0x4000_0000, 21), 0x4000_0000))
    );
    assert_eq!(db.check_invariants(), Ok(()));
    // Revoking the root task's copy takes the VMM's and the VM's with it.
    let removed = sorted(db.unmap(1, 0x20_0000, 0x40_0000, false).removed);
    assert_eq!(removed, vec![m(2, 0x80_0000, 21), m(3, 0, 21)]);
    assert_eq!(db.len(), 2);
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn a_root_is_created_at_the_size_the_source_holds() {
    let mut db = pages();
    db.map((0, 0x20_3000), 21, (1, 0x1000), 12).unwrap();
    assert_eq!(db.find(0, 0x20_3000), Some(m(0, 0x20_0000, 21)));
    assert_eq!(
        db.parent(m(1, 0x1000, 12)),
        Some((m(0, 0x20_0000, 21), 0x20_3000))
    );
    // Another 4 KiB page of the same large page hangs under the same root.
    db.map((0, 0x20_5000), 21, (1, 0x2000), 12).unwrap();
    assert_eq!(
        db.children(m(0, 0x20_0000, 21)),
        vec![m(1, 0x1000, 12), m(1, 0x2000, 12)]
    );
    assert_eq!(db.len(), 3);
    // A 2 MiB map from a source held as small pages is refused: the caller maps page by page.
    db.map((0, 0x41_0000), 12, (1, 0x61_0000), 12).unwrap();
    assert_eq!(
        db.map((0, 0x40_0000), 21, (2, 0), 21),
        Err(MappingError::Fragmented)
    );
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn partial_unmap_splits_only_the_touched_part() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    db.map((1, 0), 21, (2, 0), 21).unwrap();
    let demand = db.unmap_demand(1, 0x5000, 0x6000, true);
    assert_eq!(demand.to_vec(), vec![(1, 511), (2, 511)]);
    let c = db.unmap(1, 0x5000, 0x6000, true);
    assert_eq!(sorted(c.removed), vec![m(1, 0x5000, 12), m(2, 0x5000, 12)]);
    // Both 2 MiB nodes became 511 small ones, still derived page by page.
    assert_eq!(c.created.to_vec(), vec![(1, 511), (2, 511)]);
    assert_eq!(db.len(), 1 + 511 + 511);
    assert_eq!(db.find(1, 0x5000), None);
    assert_eq!(
        db.parent(m(2, 0x7000, 12)),
        Some((m(1, 0x7000, 12), 0x7000))
    );
    assert_eq!(db.parent(m(1, 0x7000, 12)), Some((m(0, 0, 21), 0x7000)));
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn unmap_of_what_is_derived_does_not_split_leaves() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    // Space 1's node has nothing derived from it: nothing to split, nothing removed.
    assert!(db.unmap_demand(1, 0x1000, 0x2000, false).is_empty());
    let c = db.unmap(1, 0x1000, 0x2000, false);
    assert_eq!((c.removed.len(), c.created.len(), db.len()), (0, 0, 2));
    // The root has a child: revoking what is derived from one page of it splits the child.
    let c = db.unmap(0, 0x1000, 0x2000, false);
    assert_eq!(c.removed.to_vec(), vec![m(1, 0x1000, 12)]);
    assert_eq!(db.len(), 1023);
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn a_small_map_over_a_large_node_replaces_only_its_part() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    db.map((1, 0), 21, (2, 0), 21).unwrap();
    // Space 5's page replaces page 0x3000 of space 1's large mapping.
    let c = db.map((5, 0x9000), 12, (1, 0x3000), 12).unwrap();
    assert_eq!(sorted(c.removed), vec![m(1, 0x3000, 12), m(2, 0x3000, 12)]);
    assert_eq!(
        db.parent(m(1, 0x3000, 12)),
        Some((m(5, 0x9000, 12), 0x9000))
    );
    assert_eq!(db.find(2, 0x3000), None);
    assert_eq!(db.find(2, 0x4000), Some(m(2, 0x4000, 12)));
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn a_1g_node_splits_level_by_level() {
    let mut db = pages();
    db.map((0, 0), 30, (1, 0), 30).unwrap();
    let demand = db.unmap_demand(1, 0x4000_0000 - K4, 0x4000_0000, true);
    assert_eq!(demand.to_vec(), vec![(1, 511 + 511)]);
    let c = db.unmap(1, 0x4000_0000 - K4, 0x4000_0000, true);
    assert_eq!(c.created.to_vec(), demand.to_vec());
    assert_eq!(db.find(1, 0), Some(m(1, 0, 21)));
    assert_eq!(db.find(1, 0x3ff0_0000), Some(m(1, 0x3ff0_0000, 12)));
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn grant_moves_a_node_and_keeps_what_was_derived() {
    let mut db = pages();
    db.map((0, 0), 21, (1, M2), 21).unwrap();
    db.map((1, M2), 21, (2, 0), 21).unwrap();
    db.map((1, M2 + K4), 21, (3, 0), 12).unwrap();
    let c = db.grant((1, M2), (4, 4 * M2), 21).unwrap();
    assert_eq!((c.removed.len(), c.created.len()), (0, 0));
    assert_eq!(db.find(1, M2), None);
    assert_eq!(db.parent(m(4, 4 * M2, 21)), Some((m(0, 0, 21), 0)));
    assert_eq!(db.parent(m(2, 0, 21)), Some((m(4, 4 * M2, 21), 4 * M2)));
    assert_eq!(
        db.parent(m(3, 0, 12)),
        Some((m(4, 4 * M2, 21), 4 * M2 + K4))
    );
    assert_eq!(db.check_invariants(), Ok(()));
    // Granting one page of it splits the node (and the same-sized one derived from it).
    let c = db.grant((4, 4 * M2 + K4), (5, 0), 12).unwrap();
    assert_eq!(c.created.to_vec(), vec![(4, 511), (2, 511)]);
    assert_eq!(db.parent(m(5, 0, 12)), Some((m(0, 0, 21), K4)));
    let mut children = db.children(m(5, 0, 12));
    children.sort();
    assert_eq!(children, vec![m(2, K4, 12), m(3, 0, 12)]);
    assert_eq!(db.find(4, 4 * M2 + K4), None);
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn grant_from_nothing_makes_a_root() {
    let mut db = pages();
    db.grant((0, 0), (1, 0), 21).unwrap();
    assert_eq!(db.find(1, 0x0012_3000), Some(m(1, 0, 21)));
    assert_eq!(db.find(0, 0), None);
    assert_eq!(db.grant((1, 0), (1, 0), 21), Err(MappingError::Cycle));
}

#[test]
fn cycles_fragments_and_misalignment_are_refused_without_change() {
    let mut db = pages();
    db.map((0, 0), 12, (1, 0), 12).unwrap();
    db.map((1, 0), 12, (2, 0), 12).unwrap();
    let before = db.clone();
    assert_eq!(db.map((2, 0), 12, (0, 0), 12), Err(MappingError::Cycle));
    assert_eq!(db.map((2, 0), 12, (1, 0), 12), Err(MappingError::Cycle));
    assert_eq!(db.grant((2, 0), (0, 0), 12), Err(MappingError::Cycle));
    assert_eq!(db.map((0, 0), 12, (0, 0), 12), Err(MappingError::Cycle));
    assert_eq!(db.map((7, 0), 12, (7, 0), 12), Err(MappingError::Cycle));
    assert_eq!(
        db.map((0, 0), 21, (3, 0), 21),
        Err(MappingError::Fragmented)
    );
    assert_eq!(
        db.map((0, 0x800), 12, (3, 0), 12),
        Err(MappingError::Misaligned)
    );
    assert_eq!(
        db.map((0, 0), 12, (3, 0x1000), 21),
        Err(MappingError::Misaligned)
    );
    assert_eq!(
        db.map((0, 0), 13, (3, 0), 13),
        Err(MappingError::Misaligned)
    );
    assert_eq!(
        db.map((0, 0), 12, (3, 0), 21),
        Err(MappingError::Misaligned)
    );
    assert_eq!(expand(&db), expand(&before));
    assert_eq!(db.len(), before.len());
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn remove_space_takes_descendants_in_other_spaces() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    db.map((1, 0), 21, (2, 0), 12).unwrap();
    db.map((1, K4), 21, (2, K4), 12).unwrap();
    db.map((2, 0), 12, (3, 0), 12).unwrap();
    db.map((0, M2), 21, (2, M2), 21).unwrap();
    let mut removed = db.remove_space(1);
    removed.sort();
    assert_eq!(
        removed,
        vec![m(1, 0, 21), m(2, 0, 12), m(2, K4, 12), m(3, 0, 12)]
    );
    assert_eq!(db.count_in(2), 1);
    assert_eq!(db.check_invariants(), Ok(()));
}

#[test]
fn deep_chains_need_no_recursion() {
    let mut db = pages();
    for i in 0..20_000u64 {
        db.map((i, 0), 12, (i + 1, 0), 12).unwrap();
    }
    assert_eq!(db.depth(m(20_000, 0, 12)), Some(20_000));
    assert_eq!(db.unmap(0, 0, K4, false).removed.len(), 20_000);
    // A chain of 200 large pages, split along one page boundary.
    for i in 0..200u64 {
        db.map((1000 + i, 0), 21, (1001 + i, 0), 21).unwrap();
    }
    let demand = db.unmap_demand(1100, 0, K4, true);
    let c = db.unmap(1100, 0, K4, true);
    assert_eq!(c.removed.len(), 101);
    assert_eq!(c.created.to_vec(), demand.to_vec());
    assert_eq!(db.check_invariants(), Ok(()));
}

/// Every node and what it is derived from (for databases of any sizes).
fn shape(db: &MappingDatabase<u64>) -> BTreeMap<Mapping<u64>, Option<(Mapping<u64>, u64)>> {
    db.slab
        .iter()
        .flatten()
        .map(|n| {
            let mapping = m(n.space, n.base, n.order as u32);
            (mapping, db.parent(mapping))
        })
        .collect()
}

/// Revoke `start..end` of `space` in bounded steps of `budget`, re-planning from where each
/// step stopped (as the kernel's restarted `Unmap` does); checks the tree after every step.
/// Returns every removed mapping, the nodes the splits created, and the number of steps.
fn unmap_in_steps(
    db: &mut MappingDatabase<u64>,
    space: u64,
    start: u64,
    end: u64,
    include_self: bool,
    budget: usize,
) -> (Vec<Mapping<u64>>, Vec<(u64, u64)>, usize) {
    let (mut removed, mut created, mut steps) = (Vec::new(), Vec::new(), 0);
    let mut from = start;
    loop {
        let plan = db.plan_unmap(space, from, end, include_self);
        let (c, rest) = db.apply_unmap_bounded(&plan, budget);
        steps += 1;
        assert_eq!(db.check_invariants(), Ok(()), "after step {steps}");
        assert!(
            c.removed.len() * REMOVE_UNITS <= budget.max(REMOVE_UNITS) + REMOVE_UNITS,
            "a step removed {} nodes over its budget {budget}",
            c.removed.len()
        );
        removed.extend(c.removed);
        created.extend(c.created);
        match rest {
            None => return (removed, created, steps),
            Some(next) => {
                assert!(next >= from && next < end, "continues inside the range");
                from = next;
            }
        }
    }
}

#[test]
fn a_bounded_unmap_of_a_fan_out_equals_the_one_shot_unmap() {
    let mut db = pages();
    for i in 1..=3000u64 {
        db.map((0, 0), 12, (i, 0x10_0000), 12).unwrap();
    }
    // Some grandchildren, so that subtrees are more than one node.
    for i in 1..=50u64 {
        db.map((i, 0x10_0000), 12, (5000 + i, 0), 12).unwrap();
    }
    let mut one_shot = db.clone();
    let expected = sorted(one_shot.unmap(0, 0, K4, false).removed);
    let (mut removed, created, steps) = unmap_in_steps(&mut db, 0, 0, K4, false, 64);
    removed.sort();
    assert_eq!(removed, expected);
    assert!(created.is_empty());
    assert!(steps >= 3050 * REMOVE_UNITS / 64, "{steps} steps");
    assert_eq!(shape(&db), shape(&one_shot));
    assert_eq!(db.len(), 1);
}

#[test]
fn a_bounded_unmap_of_a_deep_chain_equals_the_one_shot_unmap() {
    let mut db = pages();
    for i in 0..5_000u64 {
        db.map((i, 0), 12, (i + 1, 0), 12).unwrap();
    }
    let mut one_shot = db.clone();
    let expected = one_shot.unmap(1, 0, K4, true).removed.to_vec();
    let (removed, _, steps) = unmap_in_steps(&mut db, 1, 0, K4, true, 100);
    // Leaves first: the same order as the one-shot removal (children before parents).
    assert_eq!(removed, expected);
    assert!(steps > 1);
    assert_eq!(shape(&db), shape(&one_shot));
    assert_eq!(db.len(), 1);
}

#[test]
fn a_bounded_unmap_splits_once_and_continues_over_a_range() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    db.map((1, 0), 21, (2, 0), 21).unwrap();
    db.map((1, 0), 21, (3, 0), 21).unwrap();
    // Revoking part of the large page: the first step splits, later ones find nothing to
    // split and go on where the previous stopped.
    let (start, end) = (0x3000, 0x1f_0000);
    let demand = db.unmap_demand(1, start, end, true);
    let mut one_shot = db.clone();
    let c = one_shot.unmap(1, start, end, true);
    let (mut removed, created, steps) = unmap_in_steps(&mut db, 1, start, end, true, 40);
    removed.sort();
    assert_eq!(removed, sorted(c.removed));
    assert_eq!(total(&created), total(&c.created));
    assert_eq!(total(&created), total(&demand));
    assert!(steps > 10, "{steps} steps");
    assert_eq!(shape(&db), shape(&one_shot));
}

#[test]
fn a_bounded_removal_of_a_space_equals_the_one_shot_removal() {
    let mut db = pages();
    for i in 0..400u64 {
        db.map((0, i * K4), 12, (1, i * K4), 12).unwrap();
        db.map((1, i * K4), 12, (2 + i % 7, i * K4), 12).unwrap();
        db.map((2 + i % 7, i * K4), 12, (20, i * K4), 12).unwrap();
    }
    let mut one_shot = db.clone();
    let mut expected = one_shot.remove_space(1);
    expected.sort();
    let mut removed = Vec::new();
    let mut steps = 0;
    loop {
        let (r, done) = db.remove_space_bounded(1, 50);
        steps += 1;
        assert_eq!(db.check_invariants(), Ok(()));
        removed.extend(r);
        if done {
            break;
        }
    }
    removed.sort();
    assert_eq!(removed, expected);
    assert!(steps > 10);
    assert_eq!(shape(&db), shape(&one_shot));
    assert_eq!(db.index_bytes(1), 0);
    assert_eq!(db.index_bytes(1), one_shot.index_bytes(1));
}

#[test]
fn invariant_check_detects_corruption() {
    let mut db = pages();
    db.map((0, 0), 21, (1, 0), 21).unwrap();
    assert_eq!(db.check_invariants(), Ok(()));
    let mut bad = db.clone();
    bad.free.push(0);
    assert!(bad.check_invariants().is_err());
    let mut bad = db.clone();
    bad.slab.get_mut(1).unwrap().as_mut().unwrap().source = M2;
    assert!(bad.check_invariants().is_err());
}

// ---- randomized comparison against a per-unit model ----

/// Small sizes keep the model cheap: units of 1, 4 and 16.
const SMALL: &[u32] = &[0, 2, 4];
type Unit = (u64, u64);

/// Every recorded unit and the unit it is derived from.
fn expand(db: &MappingDatabase<u64>) -> BTreeMap<Unit, Option<Unit>> {
    let mut out = BTreeMap::new();
    for node in db.slab.iter().flatten() {
        let parent = (node.parent != NONE).then(|| db.node(node.parent).space);
        for x in 0..1u64 << node.order {
            let unit = (node.space, node.base + (x << db.orders[0]));
            let from = parent.map(|p| (p, node.source + (x << db.orders[0])));
            assert!(out.insert(unit, from).is_none(), "unit recorded twice");
        }
    }
    out
}

#[derive(Default, Clone)]
struct Model(BTreeMap<Unit, Option<Unit>>);

impl Model {
    fn subtree(&self, root: Unit) -> Vec<Unit> {
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let x = out[i];
            out.extend(
                self.0
                    .iter()
                    .filter(|(_, p)| **p == Some(x))
                    .map(|(k, _)| *k),
            );
            i += 1;
        }
        out
    }
    fn remove(&mut self, root: Unit, include_self: bool) {
        for u in self.subtree(root) {
            if u != root || include_self {
                self.0.remove(&u);
            }
        }
    }
    fn map(&mut self, parent: Unit, root_order: u32, child: Unit, order: u32) {
        let size = 1u64 << order;
        if !(0..size).all(|i| self.0.contains_key(&(parent.0, parent.1 + i))) {
            let root = parent.1 & !((1u64 << root_order) - 1);
            let root_end = root + (1 << root_order);
            let free = (root..root_end).all(|u| !self.0.contains_key(&(parent.0, u)))
                && !(parent.0 == child.0 && root < child.1 + size && child.1 < root_end);
            let range = if free {
                root..root_end
            } else {
                parent.1..parent.1 + size
            };
            for u in range {
                self.0.insert((parent.0, u), None);
            }
        }
        for i in 0..size {
            if self.0.contains_key(&(child.0, child.1 + i)) {
                self.remove((child.0, child.1 + i), true);
            }
        }
        for i in 0..size {
            self.0
                .insert((child.0, child.1 + i), Some((parent.0, parent.1 + i)));
        }
    }
    fn grant(&mut self, from: Unit, to: Unit, order: u32) {
        let size = 1u64 << order;
        for i in 0..size {
            if self.0.contains_key(&(to.0, to.1 + i)) {
                self.remove((to.0, to.1 + i), true);
            }
        }
        for i in 0..size {
            let (f, t) = ((from.0, from.1 + i), (to.0, to.1 + i));
            let parent = self.0.remove(&f).unwrap_or(None);
            self.0.insert(t, parent);
            for p in self.0.values_mut() {
                if *p == Some(f) {
                    *p = Some(t);
                }
            }
        }
    }
    fn unmap(&mut self, space: u64, start: u64, end: u64, include_self: bool) {
        let present: Vec<Unit> = self
            .0
            .range((space, start)..(space, end))
            .map(|(k, _)| *k)
            .collect();
        for u in present {
            if self.0.contains_key(&u) {
                self.remove(u, include_self);
            }
        }
    }
    fn remove_space(&mut self, space: u64) {
        let own: Vec<Unit> = self.0.keys().filter(|k| k.0 == space).copied().collect();
        for u in own {
            if self.0.contains_key(&u) {
                self.remove(u, true);
            }
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn order(&mut self) -> u32 {
        SMALL[[0, 0, 1, 1, 2][self.below(5) as usize]]
    }
    fn place(&mut self, order: u32) -> (u64, u64) {
        (self.below(4), self.below(64 >> order) << order)
    }
}

fn total(d: &[(u64, u64)]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for &(s, n) in d {
        *out.entry(s).or_insert(0) += n;
    }
    out
}

/// The database did what the model did, and its splits stayed within the demand.
fn check(
    db: &MappingDatabase<u64>,
    model: &Model,
    split: &[(u64, u64)],
    demand: &[(u64, u64)],
    ctx: &str,
) {
    assert_eq!(db.check_invariants(), Ok(()), "{ctx}");
    assert_eq!(expand(db), model.0, "{ctx}");
    let (split, demand) = (total(split), total(demand));
    for (space, n) in &split {
        assert!(
            demand.get(space).is_some_and(|d| d >= n),
            "{ctx}: split {split:?} over demand {demand:?}"
        );
    }
}

fn index_bytes(db: &MappingDatabase<u64>) -> Vec<u64> {
    (0..4).map(|s| db.index_bytes(s)).collect()
}

/// The index grew by no more than the plan said, in every space.
fn check_index(db: &MappingDatabase<u64>, before: &[u64], bound: &[(u64, u64)], ctx: &str) {
    let bound = total(bound);
    for (space, &was) in before.iter().enumerate() {
        let grown = db.index_bytes(space as u64).saturating_sub(was);
        let allowed = bound.get(&(space as u64)).copied().unwrap_or(0);
        assert!(
            grown <= allowed,
            "{ctx}: index of space {space} grew {grown} > {allowed}"
        );
    }
}

#[test]
fn randomized_against_a_per_unit_model() {
    for run in 0..60u64 {
        let mut rng = Rng(0x5EED_0000 + run * 7919);
        let mut db = MappingDatabase::<u64>::new(SMALL);
        let mut model = Model::default();
        for step in 0..300 {
            let ctx = std::format!("run {run} step {step}");
            let before = expand(&db);
            match rng.below(10) {
                0..=4 => {
                    let order = rng.order();
                    let root_order = SMALL
                        .iter()
                        .copied()
                        .filter(|&o| o >= order)
                        .nth(rng.below(2) as usize)
                        .unwrap_or(order);
                    let (parent, child) = (rng.place(order), rng.place(order));
                    let plan = db.plan_map(parent, root_order, child, order).ok();
                    let demand = plan.as_ref().map(|p| p.demand.clone()).unwrap_or_default();
                    let index = plan.map(|p| p.index).unwrap_or_default();
                    let index_before = index_bytes(&db);
                    match db.map(parent, root_order, child, order) {
                        Ok(c) => {
                            model.map(parent, root_order, child, order);
                            check(&db, &model, &c.created, &demand, &ctx);
                            check_index(&db, &index_before, &index, &ctx);
                        }
                        Err(MappingError::Fragmented) => {
                            assert_eq!(expand(&db), before, "{ctx}");
                            // As the kernel does: unit by unit.
                            for i in 0..1u64 << order {
                                let (p, ch) = ((parent.0, parent.1 + i), (child.0, child.1 + i));
                                let demand = db
                                    .plan_map(p, 0, ch, 0)
                                    .map(|p| p.demand)
                                    .unwrap_or_default();
                                if let Ok(c) = db.map(p, 0, ch, 0) {
                                    model.map(p, 0, ch, 0);
                                    check(&db, &model, &c.created, &demand, &ctx);
                                }
                            }
                        }
                        Err(_) => assert_eq!(expand(&db), before, "{ctx}"),
                    }
                }
                5..=6 => {
                    let order = rng.order();
                    let (from, to) = (rng.place(order), rng.place(order));
                    let mut demand = db.split_demand(from.0, from.1, from.1 + (1 << order));
                    demand.extend(db.split_demand(to.0, to.1, to.1 + (1 << order)));
                    match db.grant(from, to, order) {
                        Ok(c) => {
                            model.grant(from, to, order);
                            check(&db, &model, &c.created, &demand, &ctx);
                        }
                        Err(_) => assert_eq!(expand(&db), before, "{ctx}"),
                    }
                }
                7..=8 => {
                    let space = rng.below(4);
                    let start = rng.below(64);
                    let end = start + 1 + rng.below(20);
                    let include_self = rng.below(2) == 0;
                    let plan = db.plan_unmap(space, start, end, include_self);
                    let (demand, index) = (plan.demand.clone(), plan.index.clone());
                    let index_before = index_bytes(&db);
                    let c = if rng.below(2) == 0 {
                        db.apply_unmap(&plan)
                    } else {
                        // In bounded steps: the same as one step, against a one-shot copy.
                        let mut one_shot = db.clone();
                        let whole = one_shot.apply_unmap(&plan);
                        let budget = 1 + rng.below(40) as usize;
                        let (mut removed, created, _) =
                            unmap_in_steps(&mut db, space, start, end, include_self, budget);
                        removed.sort();
                        assert_eq!(removed, sorted(whole.removed.clone()), "{ctx}");
                        assert_eq!(total(&created), total(&whole.created), "{ctx}");
                        assert_eq!(index_bytes(&db), index_bytes(&one_shot), "{ctx}");
                        Changes {
                            removed: removed.into_iter().collect(),
                            created: created.into_iter().collect(),
                        }
                    };
                    check_index(&db, &index_before, &index, &ctx);
                    model.unmap(space, start, end, include_self);
                    check(&db, &model, &c.created, &demand, &ctx);
                    for r in &c.removed {
                        assert!(
                            before.contains_key(&(r.space, r.base)),
                            "{ctx}: removed {r:?} was not there"
                        );
                    }
                }
                _ => {
                    let space = rng.below(4);
                    if rng.below(2) == 0 {
                        db.remove_space(space);
                    } else {
                        let budget = 1 + rng.below(30) as usize;
                        while !db.remove_space_bounded(space, budget).1 {
                            assert_eq!(db.check_invariants(), Ok(()), "{ctx}");
                        }
                    }
                    model.remove_space(space);
                    check(&db, &model, &[], &[], &ctx);
                }
            }
        }
    }
}

#[test]
fn single_boundary_demand_is_exact() {
    for run in 0..200u64 {
        let mut rng = Rng(0xD3_4A4D + run * 104_729);
        let mut db = MappingDatabase::<u64>::new(SMALL);
        // Build a random forest of same- and mixed-size mappings.
        for _ in 0..40 {
            let order = rng.order();
            let _ = db.map(rng.place(order), 4, rng.place(order), order);
        }
        let space = rng.below(4);
        let start = rng.below(64);
        let demand = db.unmap_demand(space, start, start + 1, true);
        let before = db.len() as u64;
        let c = db.unmap(space, start, start + 1, true);
        assert_eq!(total(&c.created), total(&demand), "run {run}");
        let created: u64 = demand.iter().map(|(_, n)| n).sum();
        assert_eq!(
            db.len() as u64,
            before + created - c.removed.len() as u64,
            "run {run}"
        );
        assert_eq!(db.check_invariants(), Ok(()));
    }
}
