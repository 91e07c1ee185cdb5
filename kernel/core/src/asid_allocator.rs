//! Address-space identifiers for guests: a bitmap of the ASIDs `1..count` (0 is the host's),
//! handed out lowest first and given back when a VM dies, so a bounded number of them serves
//! any number of VMs over time.

use alloc::vec;
use alloc::vec::Vec;

/// The ASIDs `1..count`, each free or in use.
#[derive(Debug, Clone)]
pub struct AsidAllocator {
    /// Bit `n` set: ASID `n` is in use (bit 0, the host's, always is).
    used: Vec<u64>,
    /// ASIDs are below this.
    count: u32,
}

impl AsidAllocator {
    /// An allocator of the ASIDs `1..count` (`count` as CPUID Fn8000_000A EBX reports it,
    /// including the host's ASID 0), all free.
    pub fn new(count: u32) -> Self {
        let mut used = vec![0u64; (count as usize).div_ceil(64).max(1)];
        used[0] |= 1;
        AsidAllocator { used, count }
    }

    /// The lowest free ASID, now in use; `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        let (index, word) = self
            .used
            .iter_mut()
            .enumerate()
            .find(|(_, word)| **word != u64::MAX)?;
        let bit = word.trailing_ones();
        let asid = index as u32 * 64 + bit;
        if asid >= self.count {
            return None;
        }
        *word |= 1 << bit;
        Some(asid)
    }

    /// Give back `asid` (one [`allocate`](Self::allocate) returned); others are ignored.
    pub fn free(&mut self, asid: u32) {
        if asid == 0 || asid >= self.count {
            return;
        }
        if let Some(word) = self.used.get_mut(asid as usize / 64) {
            *word &= !(1 << (asid % 64));
        }
    }

    /// How many ASIDs are in use.
    pub fn in_use(&self) -> u32 {
        self.used.iter().map(|w| w.count_ones()).sum::<u32>() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_one_to_count_minus_one_then_refuses() {
        let mut a = AsidAllocator::new(16);
        let got: Vec<u32> = (0..15).map(|_| a.allocate().expect("free ASID")).collect();
        assert_eq!(got, (1..16).collect::<Vec<u32>>());
        assert_eq!(a.allocate(), None);
        assert_eq!(a.in_use(), 15);
    }

    #[test]
    fn freed_asids_are_reused_lowest_first() {
        let mut a = AsidAllocator::new(16);
        for _ in 0..15 {
            a.allocate();
        }
        a.free(7);
        a.free(3);
        assert_eq!(a.allocate(), Some(3));
        assert_eq!(a.allocate(), Some(7));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn many_rounds_never_exceed_the_bound() {
        let mut a = AsidAllocator::new(130);
        for _ in 0..10 {
            let got: Vec<u32> = core::iter::from_fn(|| a.allocate()).collect();
            assert_eq!(got.len(), 129);
            assert!(got.iter().all(|&asid| (1..130).contains(&asid)));
            for asid in got {
                a.free(asid);
            }
            assert_eq!(a.in_use(), 0);
        }
    }

    #[test]
    fn host_asid_and_out_of_range_frees_are_ignored() {
        let mut a = AsidAllocator::new(2);
        a.free(0);
        a.free(5);
        a.free(u32::MAX);
        assert_eq!(a.allocate(), Some(1));
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn no_asids_at_all() {
        for count in [0, 1] {
            let mut a = AsidAllocator::new(count);
            assert_eq!(a.allocate(), None);
            assert_eq!(a.in_use(), 0);
        }
    }

    #[test]
    fn a_count_that_fills_whole_words() {
        let mut a = AsidAllocator::new(128);
        assert_eq!(core::iter::from_fn(|| a.allocate()).count(), 127);
    }
}
