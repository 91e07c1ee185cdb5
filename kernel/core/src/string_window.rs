//! The arithmetic of a string copy in bounded steps: the string items of a message, each
//! copying `min(string length, buffer length)` bytes (0 without a buffer), are treated as one
//! run of bytes; a step copies the window of at most `step` bytes from where the previous one
//! stopped, and only the pages of that window need checking and copying in that step.

/// One step's window of the run: bytes `start..end` of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First byte of the run this step copies.
    pub start: u64,
    /// End of this step's bytes (exclusive).
    pub end: u64,
    /// Bytes of the whole run.
    pub total: u64,
}

/// A piece of a window inside one item: item `item`, bytes `offset..offset + length` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the item.
    pub item: usize,
    /// Offset inside the item's string (and buffer).
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

impl Window {
    /// The window of at most `step` bytes (at least 1 unless the run is done) that starts at
    /// `start` in the run of items copying `lengths` bytes each; a `start` beyond the run is
    /// clamped to its end.
    #[inline]
    pub fn new(lengths: &[u64], start: u64, step: u64) -> Window {
        let total = lengths.iter().fold(0u64, |sum, &l| sum.saturating_add(l));
        let start = start.min(total);
        Window {
            start,
            end: start.saturating_add(step.max(1)).min(total),
            total,
        }
    }

    /// Whether this step copies the run's last bytes.
    #[inline]
    pub fn is_last(&self) -> bool {
        self.end == self.total
    }

    /// The pieces of the window, item by item (items with no bytes in it are skipped).
    #[inline]
    pub fn pieces<'a>(&self, lengths: &'a [u64]) -> impl Iterator<Item = Piece> + 'a {
        let (start, end) = (self.start, self.end);
        let mut at = 0u64;
        lengths
            .iter()
            .enumerate()
            .filter_map(move |(item, &length)| {
                let (first, past) = (at, at.saturating_add(length));
                at = past;
                let (from, to) = (start.max(first), end.min(past));
                (from < to).then(|| Piece {
                    item,
                    offset: from - first,
                    length: to - from,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn pieces(lengths: &[u64], start: u64, step: u64) -> (Window, Vec<(usize, u64, u64)>) {
        let w = Window::new(lengths, start, step);
        let p = w
            .pieces(lengths)
            .map(|p| (p.item, p.offset, p.length))
            .collect();
        (w, p)
    }

    #[test]
    fn one_item_in_steps() {
        let lengths = [10];
        assert_eq!(pieces(&lengths, 0, 4).1, [(0, 0, 4)]);
        assert_eq!(pieces(&lengths, 4, 4).1, [(0, 4, 4)]);
        let (w, p) = pieces(&lengths, 8, 4);
        assert_eq!(p, [(0, 8, 2)]);
        assert!(w.is_last());
        assert!(!Window::new(&lengths, 4, 4).is_last());
    }

    #[test]
    fn windows_span_items_and_skip_empty_ones() {
        let lengths = [3, 0, 5, 2];
        assert_eq!(pieces(&lengths, 0, 4).1, [(0, 0, 3), (2, 0, 1)]);
        assert_eq!(pieces(&lengths, 4, 4).1, [(2, 1, 4)]);
        let (w, p) = pieces(&lengths, 8, 4);
        assert_eq!(p, [(3, 0, 2)]);
        assert_eq!(
            w,
            Window {
                start: 8,
                end: 10,
                total: 10
            }
        );
    }

    #[test]
    fn empty_runs_and_clamped_starts() {
        let (w, p) = pieces(&[0, 0], 0, 4);
        assert!(w.is_last() && p.is_empty());
        let (w, p) = pieces(&[5], 99, 4);
        assert_eq!(
            w,
            Window {
                start: 5,
                end: 5,
                total: 5
            }
        );
        assert!(p.is_empty());
        // A zero step still makes progress.
        assert_eq!(pieces(&[5], 0, 0).1, [(0, 0, 1)]);
    }

    /// Stepping through any run visits every byte of every item exactly once, in order.
    #[test]
    fn steps_cover_the_run_exactly_once() {
        let mut seed = 0x1234_5678u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let count = 1 + next(5) as usize;
            let lengths: Vec<u64> = (0..count).map(|_| next(40)).collect();
            let step = 1 + next(17);
            let mut seen: Vec<Vec<u64>> = lengths.iter().map(|_| Vec::new()).collect();
            let mut start = 0;
            let mut steps = 0;
            loop {
                let w = Window::new(&lengths, start, step);
                for p in w.pieces(&lengths) {
                    seen[p.item].extend(p.offset..p.offset + p.length);
                }
                steps += 1;
                if w.is_last() {
                    break;
                }
                start = w.end;
            }
            for (item, bytes) in seen.iter().enumerate() {
                assert_eq!(*bytes, (0..lengths[item]).collect::<Vec<_>>());
            }
            let total: u64 = lengths.iter().sum();
            assert_eq!(steps, total.div_ceil(step).max(1));
        }
    }
}
