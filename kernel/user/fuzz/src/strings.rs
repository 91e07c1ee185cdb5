//! String items (the kernel's long IPC) in fuzzed messages: strings and receive buffers in
//! memory the thread may safely have read or overwritten, at lengths from one byte to the
//! limit, and now and then ranges the kernel must refuse (over the length limit, in the kernel
//! area, wrapping around the address space).

use crate::rng::Rng;
use l4::abi::{MessageTag, StringItem, KERNEL_AREA_START, MAX_STRINGS, MAX_STRING_LENGTH};

/// A range the kernel must refuse as a string or a buffer without touching it: in or across
/// the kernel area, or wrapping around; as a string also one over the length limit, and (for
/// `garbage`) any range at all, which may lie in memory the thread lacks (a string's fault
/// fails the sender's IPC; a receive buffer's fault would go to the receiver's pager, which
/// kills the fuzzer's own threads for it, so buffers never get those).
fn hostile(rng: &mut Rng, garbage: bool) -> StringItem {
    let (address, length) = match rng.below(if garbage { 5 } else { 3 }) {
        0 => (KERNEL_AREA_START - 8, 16),
        1 => (u64::MAX - 8, 64),
        2 => (KERNEL_AREA_START + rng.below(1 << 20), 1 + rng.below(4096)),
        3 => (rng.garbage(), rng.garbage()),
        _ => (0x1000, MAX_STRING_LENGTH + 1 + rng.below(4096)),
    };
    StringItem { length, address }
}

/// A range inside `region` (base, size): mostly short, sometimes up to the whole region or
/// [`MAX_STRING_LENGTH`]; 5% hostile (see [`hostile`]; `garbage` for strings).
fn range_in(rng: &mut Rng, region: (u64, u64), garbage: bool) -> StringItem {
    let (base, size) = region;
    if size == 0 || rng.chance(5) {
        return hostile(rng, garbage);
    }
    let limit = size.min(MAX_STRING_LENGTH);
    let length = if rng.chance(90) {
        rng.size_between(1, limit.min(16 << 10))
    } else {
        rng.size_between(1, limit)
    };
    let address = base + rng.below(size - length + 1);
    StringItem { length, address }
}

/// A message with a label below `labels`, up to two untyped words and string items in
/// `region`: its words into `words` (the first four go in registers, the rest in the UTCB's
/// message registers); returns the tag.
pub fn message(rng: &mut Rng, region: (u64, u64), labels: u64, words: &mut [u64; 4]) -> MessageTag {
    let label = rng.below(labels) as i32;
    let untyped = rng.below(3) as usize;
    // Now and then one item more than the kernel allows.
    let extra = u64::from(rng.chance(5));
    let count = 1 + rng.below(MAX_STRINGS as u64 + extra) as usize;
    for (i, word) in words.iter_mut().enumerate().take(untyped) {
        *word = i as u64;
    }
    l4::utcb::with_utcb(|utcb| {
        for i in 0..count {
            let item = range_in(rng, region, true).words();
            for (j, value) in item.into_iter().enumerate() {
                let at = untyped + 2 * i + j;
                if at < 4 {
                    words[at] = value;
                } else {
                    utcb.mr[at] = value;
                }
            }
        }
    });
    MessageTag::new(label, untyped, count)
}

/// Set our receive buffers: none (the kernel copies nothing), or up to [`MAX_STRINGS`] in
/// `region` (5% hostile each).
pub fn receive_buffers(rng: &mut Rng, region: (u64, u64)) {
    let count = if rng.chance(20) {
        0
    } else {
        1 + rng.below(MAX_STRINGS as u64) as usize
    };
    l4::utcb::with_utcb(|utcb| {
        for i in 0..MAX_STRINGS {
            let words = if i < count {
                range_in(rng, region, false).words()
            } else {
                [0, 0]
            };
            utcb.br[2 + 2 * i] = words[0];
            utcb.br[3 + 2 * i] = words[1];
        }
    });
}
