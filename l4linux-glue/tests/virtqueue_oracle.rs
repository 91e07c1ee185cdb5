//! The split virtqueue checked against rust-vmm's `virtio-queue` as a reference oracle: random
//! queues (descriptor tables, indirect tables, available rings; valid and hostile) are laid in
//! two identical guest memories, and both implementations must return the same chains, write
//! the same used rings and notification fields, and agree on when to interrupt.
//!
//! Where the two differ by design, the comparison says so: the oracle ends a broken chain
//! silently (it yields a truncated chain), ours refuses it with an error, so for every error of
//! ours the oracle's chain must be visibly broken (it ends on a descriptor with NEXT set, or it
//! holds a buffer outside guest memory); the oracle does not check buffer addresses; and ours
//! also refuses indirect tables of more entries than the queue's maximum size, and tables that
//! reach past guest memory, which the oracle reads as far as it gets.

use l4linux_glue::guest_memory::{GuestMemory as _, VecMemory};
use l4linux_glue::virtio::queue::{
    Queue, QueueError, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use virtio_queue::{Queue as OracleQueue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 0x10000;
const DESCRIPTORS: u64 = 0x1000;
const AVAILABLE: u64 = 0x2000;
const USED: u64 = 0x3000;
const INDIRECT: u64 = 0x5000;
const MAX_SIZE: u16 = 64;

/// xorshift64*: deterministic, no dependencies.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default)]
struct Counts {
    chains_equal: usize,
    chains_refused: usize,
    descriptors: usize,
    indirect_chains: usize,
    indirect_equal: usize,
    jumps: usize,
    used: usize,
    notifications: usize,
}

/// A descriptor's address and length: mostly inside memory, sometimes not, sometimes huge.
fn buffer(r: &mut Random) -> (u64, u32) {
    match r.below(100) {
        0..=79 => {
            let length = r.below(0x800) as u32;
            (0x8000 + r.below(0x7000), length)
        }
        80..=84 => (0x8000, 0),
        85..=89 => (MEMORY as u64 - r.below(0x100), r.below(0x400) as u32),
        90..=94 => (r.next(), r.next() as u32),
        _ => (0x8000 + r.below(0x100), u32::MAX - r.below(0x1000) as u32),
    }
}

fn descriptor(r: &mut Random, m: &mut VecMemory, at: u64, table_size: u16, allow_indirect: bool) {
    let (address, length) = buffer(r);
    let mut flags = 0;
    if r.chance(60) {
        flags |= DESC_F_NEXT;
    }
    if r.chance(50) {
        flags |= DESC_F_WRITE;
    }
    let next = if r.chance(95) {
        r.below(u64::from(table_size)) as u16
    } else {
        table_size + r.below(4) as u16
    };
    m.write_u64(at, address).unwrap();
    m.write_u32(at + 8, length).unwrap();
    m.write_u16(at + 12, flags).unwrap();
    m.write_u16(at + 14, next).unwrap();
    if allow_indirect && r.chance(8) {
        // An indirect descriptor (never with NEXT: see the module comment), to a table of
        // a random length that is sometimes wrong.
        let entries = 1 + r.below(u64::from(table_size) + 2);
        let length = match r.below(10) {
            0 => 0,
            1 => entries as u32 * 16 + 8,
            _ => entries as u32 * 16,
        };
        let address = if r.chance(95) { INDIRECT } else { 0xfff0 };
        m.write_u64(at, address).unwrap();
        m.write_u32(at + 8, length).unwrap();
        m.write_u16(at + 12, DESC_F_INDIRECT | (flags & DESC_F_WRITE))
            .unwrap();
    }
}

/// Whether the direct chain from `head` ends in an indirect descriptor.
fn through_indirect(m: &VecMemory, head: u16, size: u16) -> bool {
    let mut index = head;
    for _ in 0..size {
        let at = DESCRIPTORS + 16 * u64::from(index);
        let flags = m.read_u16(at + 12).unwrap();
        if flags & DESC_F_INDIRECT != 0 {
            return true;
        }
        if flags & DESC_F_NEXT == 0 {
            return false;
        }
        index = m.read_u16(at + 14).unwrap() % size;
    }
    false
}

/// Whether the oracle's chain shows the fault ours reported.
fn visibly_broken(chain: &[(u64, u32, bool, bool)]) -> bool {
    let outside = |&(address, length, _, _): &(u64, u32, bool, bool)| {
        address
            .checked_add(u64::from(length))
            .is_none_or(|end| end > MEMORY as u64)
    };
    chain.is_empty() || chain.last().is_some_and(|d| d.3) || chain.iter().any(outside)
}

fn same_memory(ours: &VecMemory, oracle: &GuestMemoryMmap) -> bool {
    let mut bytes = vec![0u8; MEMORY];
    oracle.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes == ours.bytes()
}

fn run_case(seed: u64, counts: &mut Counts) {
    let mut r = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let size = 1u16 << r.below(7); // 1 ..= 64
    let event_index = r.chance(50);
    let indirect = r.chance(50);

    let mut ours_memory = VecMemory::new(0, MEMORY);
    for i in 0..size {
        descriptor(
            &mut r,
            &mut ours_memory,
            DESCRIPTORS + 16 * u64::from(i),
            size,
            indirect,
        );
    }
    for i in 0..(u64::from(size) + 2) {
        descriptor(&mut r, &mut ours_memory, INDIRECT + 16 * i, size + 2, false);
        // Inside a table, INDIRECT is refused by both (no nested tables).
        if r.chance(3) {
            let flags = ours_memory.read_u16(INDIRECT + 16 * i + 12).unwrap();
            ours_memory
                .write_u16(INDIRECT + 16 * i + 12, flags | DESC_F_INDIRECT)
                .unwrap();
        }
    }
    let start = r.next() as u16;
    let pending = if r.chance(90) {
        r.below(u64::from(size) + 1) as u16
    } else {
        size + 1 + r.below(1000) as u16
    };
    for i in 0..u64::from(size) {
        let head = if r.chance(97) {
            r.below(u64::from(size))
        } else {
            u64::from(size) + r.below(3)
        };
        ours_memory
            .write_u16(AVAILABLE + 4 + 2 * i, head as u16)
            .unwrap();
    }
    let flags = if r.chance(30) {
        AVAIL_F_NO_INTERRUPT
    } else {
        0
    };
    ours_memory.write_u16(AVAILABLE, flags).unwrap();
    ours_memory
        .write_u16(AVAILABLE + 2, start.wrapping_add(pending))
        .unwrap();
    let used_event = start.wrapping_add(r.below(u64::from(size) + 2) as u16);
    ours_memory
        .write_u16(AVAILABLE + 4 + 2 * u64::from(size), used_event)
        .unwrap();
    // The device's used index starts where its available index does (as after many rounds).
    ours_memory.write_u16(USED + 2, start).unwrap();

    let oracle_memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    oracle_memory
        .write_slice(ours_memory.bytes(), GuestAddress(0))
        .unwrap();

    let mut ours = Queue::new(MAX_SIZE);
    ours.set_size(size);
    ours.set_descriptor_table(DESCRIPTORS);
    ours.set_available_ring(AVAILABLE);
    ours.set_used_ring(USED);
    ours.set_ring_features(event_index, indirect);
    // Start mid-sequence (as after many rounds), so that the indices wrap in some cases.
    ours.set_positions(start, start);
    ours.activate(&ours_memory).unwrap();
    let mut oracle = OracleQueue::new(MAX_SIZE).unwrap();
    oracle.set_size(size);
    oracle.set_desc_table_address(Some(DESCRIPTORS as u32), Some(0));
    oracle.set_avail_ring_address(Some(AVAILABLE as u32), Some(0));
    oracle.set_used_ring_address(Some(USED as u32), Some(0));
    oracle.set_event_idx(event_index);
    oracle.set_ready(true);
    assert!(oracle.is_valid(&oracle_memory));
    oracle.set_next_avail(start);
    oracle.set_next_used(start);

    let mut popped = Vec::new();
    for _ in 0..=pending {
        let mine = ours.pop(&ours_memory);
        let theirs = oracle.pop_descriptor_chain(&oracle_memory).map(|chain| {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain
                .map(|d| (d.addr().0, d.len(), d.is_write_only(), d.has_next()))
                .collect();
            (head, descriptors)
        });
        match mine {
            Ok(None) => {
                assert!(theirs.is_none(), "seed {seed}: oracle found a chain");
                break;
            }
            Ok(Some(chain)) => {
                let (head, descriptors) = theirs.expect("oracle found no chain");
                assert_eq!(chain.head(), head, "seed {seed}");
                let ours_list: Vec<_> = chain
                    .descriptors()
                    .iter()
                    .map(|d| (d.address, d.length, d.writable))
                    .collect();
                let theirs_list: Vec<_> = descriptors.iter().map(|d| (d.0, d.1, d.2)).collect();
                assert_eq!(ours_list, theirs_list, "seed {seed}");
                counts.chains_equal += 1;
                counts.descriptors += ours_list.len();
                if through_indirect(&ours_memory, head, size) {
                    counts.indirect_equal += 1;
                }
                popped.push(head);
            }
            Err(QueueError::AvailableIndexJump { .. }) => {
                assert!(theirs.is_none(), "seed {seed}: oracle took a jump");
                counts.jumps += 1;
                break;
            }
            Err(error) => {
                let (head, descriptors) = theirs.expect("oracle found no chain");
                // Stricter than the oracle by design: indirect tables of more than queue-size
                // entries, and tables that do not lie entirely in guest memory (the oracle
                // reads entries until one is outside).
                let stricter = matches!(
                    error,
                    QueueError::BadIndirectTable { address, length }
                        if (length % 16 == 0 && length / 16 > u32::from(MAX_SIZE))
                            || address + u64::from(length) > MEMORY as u64
                );
                if matches!(
                    error,
                    QueueError::BadIndirectTable { .. } | QueueError::NestedIndirect
                ) {
                    counts.indirect_chains += 1;
                }
                assert!(
                    stricter || visibly_broken(&descriptors),
                    "seed {seed}: we refused head {head} ({error}), the oracle took {descriptors:x?}"
                );
                counts.chains_refused += 1;
            }
        }
    }
    assert_eq!(ours.next_available(), oracle.next_avail(), "seed {seed}");

    // Hand chains back, in a shuffled order, with random lengths; sometimes a bad head.
    for (n, &head) in popped.iter().enumerate().rev() {
        let length = r.next() as u32;
        let head = if r.chance(5) { size + n as u16 } else { head };
        let mine = ours.add_used(&mut ours_memory, head, length);
        let theirs = oracle.add_used(&oracle_memory, head, length);
        assert_eq!(mine.is_ok(), theirs.is_ok(), "seed {seed}: add_used {head}");
        if mine.is_ok() {
            counts.used += 1;
        }
        if r.chance(40) {
            compare_notification(&mut ours, &mut oracle, &ours_memory, &oracle_memory, flags);
            counts.notifications += 1;
        }
    }
    compare_notification(&mut ours, &mut oracle, &ours_memory, &oracle_memory, flags);
    assert_eq!(ours.next_used(), oracle.next_used(), "seed {seed}");

    // Notification suppression writes the same fields.
    if r.chance(50) {
        ours.disable_notification(&mut ours_memory).unwrap();
        oracle.disable_notification(&oracle_memory).unwrap();
    }
    let mine = ours.enable_notification(&mut ours_memory).unwrap();
    let theirs = oracle.enable_notification(&oracle_memory).unwrap();
    assert_eq!(mine, theirs, "seed {seed}: enable_notification");
    assert!(same_memory(&ours_memory, &oracle_memory), "seed {seed}");
}

fn compare_notification(
    ours: &mut Queue,
    oracle: &mut OracleQueue,
    ours_memory: &VecMemory,
    oracle_memory: &GuestMemoryMmap,
    flags: u16,
) {
    let mine = ours.needs_notification(ours_memory).unwrap();
    let theirs = oracle.needs_notification(oracle_memory).unwrap();
    // Without EVENT_IDX the oracle ignores VRING_AVAIL_F_NO_INTERRUPT and always says yes,
    // and it says yes also when nothing was added; compare where both are defined.
    if oracle.event_idx_enabled() || (flags == 0 && mine) {
        assert_eq!(mine, theirs);
    }
}

#[test]
fn random_queues_agree_with_the_oracle() {
    let mut counts = Counts::default();
    for seed in 0..4000 {
        run_case(seed, &mut counts);
    }
    println!(
        "{} chains equal ({} descriptors, {} through indirect tables), {} refused ({} for \
         indirect faults), {} index jumps, {} used entries, {} notification checks",
        counts.chains_equal,
        counts.descriptors,
        counts.indirect_equal,
        counts.chains_refused,
        counts.indirect_chains,
        counts.jumps,
        counts.used,
        counts.notifications
    );
    assert!(counts.chains_equal > 4000);
    assert!(counts.chains_refused > 1000);
    assert!(counts.indirect_chains > 100);
    assert!(counts.indirect_equal > 100);
    assert!(counts.jumps > 100);
}
