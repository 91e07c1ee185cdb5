//! The scheduler's ready queues: one FIFO per priority (256 levels) and a bitmap to find the
//! highest non-empty one in constant time.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Number of priority levels (0 lowest, 255 highest).
pub const PRIORITIES: usize = 256;

/// Ready queues of thread identifiers `T`.
#[derive(Debug)]
pub struct ReadyQueues<T> {
    queues: Vec<VecDeque<T>>,
    bitmap: [u64; PRIORITIES / 64],
    /// Bit `w` set when `bitmap[w]` is not 0: an empty set is one test.
    summary: u8,
}

impl<T: PartialEq + Copy> Default for ReadyQueues<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: PartialEq + Copy> ReadyQueues<T> {
    /// Empty queues.
    pub fn new() -> Self {
        ReadyQueues {
            queues: (0..PRIORITIES).map(|_| VecDeque::new()).collect(),
            bitmap: [0; PRIORITIES / 64],
            summary: 0,
        }
    }

    /// Append `thread` at `priority`.
    pub fn enqueue(&mut self, thread: T, priority: u8) {
        let p = priority as usize;
        self.queues[p].push_back(thread);
        self.mark(p);
    }

    /// Put `thread` at the head of its priority's queue (it keeps the CPU next).
    pub fn enqueue_front(&mut self, thread: T, priority: u8) {
        let p = priority as usize;
        self.queues[p].push_front(thread);
        self.mark(p);
    }

    /// Remove `thread` wherever it is queued at `priority`; returns whether it was there.
    pub fn remove(&mut self, thread: T, priority: u8) -> bool {
        let p = priority as usize;
        let q = &mut self.queues[p];
        let found = match q.iter().position(|&t| t == thread) {
            Some(i) => {
                q.remove(i);
                true
            }
            None => false,
        };
        if q.is_empty() {
            self.unmark(p);
        }
        found
    }

    /// Priority `p`'s queue is not empty.
    fn mark(&mut self, p: usize) {
        self.bitmap[p / 64] |= 1 << (p % 64);
        self.summary |= 1 << (p / 64);
    }

    /// Priority `p`'s queue is empty.
    fn unmark(&mut self, p: usize) {
        self.bitmap[p / 64] &= !(1 << (p % 64));
        if self.bitmap[p / 64] == 0 {
            self.summary &= !(1 << (p / 64));
        }
    }

    /// The highest non-empty priority.
    #[inline]
    pub fn highest(&self) -> Option<u8> {
        if self.summary == 0 {
            return None;
        }
        let w = 7 - self.summary.leading_zeros() as usize;
        Some((w * 64 + 63 - self.bitmap[w].leading_zeros() as usize) as u8)
    }

    /// Take the first thread of the highest non-empty priority.
    pub fn dequeue(&mut self) -> Option<(T, u8)> {
        let p = self.highest()?;
        let q = &mut self.queues[p as usize];
        let t = q.pop_front()?;
        if q.is_empty() {
            self.unmark(p as usize);
        }
        Some((t, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_priority_first_fifo_within() {
        let mut q = ReadyQueues::new();
        q.enqueue(1, 10);
        q.enqueue(2, 200);
        q.enqueue(3, 10);
        q.enqueue(4, 255);
        q.enqueue(5, 0);
        assert_eq!(q.dequeue(), Some((4, 255)));
        assert_eq!(q.dequeue(), Some((2, 200)));
        assert_eq!(q.dequeue(), Some((1, 10)));
        assert_eq!(q.dequeue(), Some((3, 10)));
        assert_eq!(q.dequeue(), Some((5, 0)));
        assert_eq!(q.dequeue(), None);
        assert_eq!(q.highest(), None);
    }

    #[test]
    fn remove_and_front() {
        let mut q = ReadyQueues::new();
        q.enqueue(1, 64);
        q.enqueue(2, 64);
        assert!(q.remove(1, 64));
        assert!(!q.remove(1, 64));
        q.enqueue_front(3, 64);
        assert_eq!(q.dequeue(), Some((3, 64)));
        assert!(q.remove(2, 64));
        assert_eq!(q.highest(), None);
    }

    #[test]
    fn highest_across_words() {
        let mut q = ReadyQueues::new();
        q.enqueue(1, 3);
        q.enqueue(2, 130);
        q.enqueue(3, 129);
        assert_eq!(q.highest(), Some(130));
        assert!(q.remove(2, 130));
        assert_eq!(q.highest(), Some(129));
        assert_eq!(q.dequeue(), Some((3, 129)));
        assert_eq!(q.highest(), Some(3));
        assert_eq!(q.dequeue(), Some((1, 3)));
        assert_eq!(q.highest(), None);
    }
}
