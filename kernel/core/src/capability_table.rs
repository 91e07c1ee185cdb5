//! A task's capability table: a fixed number of slots, each empty or holding a capability.
//! The kernel stores its capability type in it; user code names capabilities only by index.

use alloc::vec::Vec;

/// Why a slot operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapabilityError {
    /// The index is beyond the table.
    OutOfRange,
    /// The slot is empty.
    Empty,
    /// The slot is occupied.
    Occupied,
}

/// A table of `T` capabilities indexed by slot number.
#[derive(Debug, Clone)]
pub struct CapabilityTable<T> {
    slots: Vec<Option<T>>,
}

impl<T: Clone> CapabilityTable<T> {
    /// A table of `size` empty slots.
    pub fn new(size: usize) -> Self {
        CapabilityTable {
            slots: (0..size).map(|_| None).collect(),
        }
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, index: u64) -> Result<&Option<T>, CapabilityError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get(i))
            .ok_or(CapabilityError::OutOfRange)
    }

    fn slot_mut(&mut self, index: u64) -> Result<&mut Option<T>, CapabilityError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .ok_or(CapabilityError::OutOfRange)
    }

    /// The capability in slot `index`.
    pub fn get(&self, index: u64) -> Result<&T, CapabilityError> {
        self.slot(index)?.as_ref().ok_or(CapabilityError::Empty)
    }

    /// Whether slot `index` exists and is empty.
    pub fn is_free(&self, index: u64) -> Result<bool, CapabilityError> {
        Ok(self.slot(index)?.is_none())
    }

    /// Put `cap` into the empty slot `index`.
    pub fn insert(&mut self, index: u64, cap: T) -> Result<(), CapabilityError> {
        let slot = self.slot_mut(index)?;
        if slot.is_some() {
            return Err(CapabilityError::Occupied);
        }
        *slot = Some(cap);
        Ok(())
    }

    /// Take the capability out of slot `index`.
    pub fn remove(&mut self, index: u64) -> Result<T, CapabilityError> {
        self.slot_mut(index)?.take().ok_or(CapabilityError::Empty)
    }

    /// Remove every capability for which `stale` returns true; returns how many.
    pub fn remove_where(&mut self, mut stale: impl FnMut(&T) -> bool) -> usize {
        let mut removed = 0;
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(&mut stale) {
                *slot = None;
                removed += 1;
            }
        }
        removed
    }

    /// The first empty slot at or above `from`.
    pub fn find_free(&self, from: u64) -> Option<u64> {
        let from = usize::try_from(from).ok()?;
        (from..self.slots.len())
            .find(|&i| self.slots[i].is_none())
            .map(|i| i as u64)
    }

    /// Iterate over occupied slots.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|c| (i as u64, c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove() {
        let mut t = CapabilityTable::new(8);
        assert_eq!(t.get(3), Err(CapabilityError::Empty));
        t.insert(3, 'a').unwrap();
        assert_eq!(t.get(3), Ok(&'a'));
        assert_eq!(t.insert(3, 'b'), Err(CapabilityError::Occupied));
        assert_eq!(t.remove(3), Ok('a'));
        assert_eq!(t.remove(3), Err(CapabilityError::Empty));
    }

    #[test]
    fn out_of_range_indices_are_errors_not_panics() {
        let mut t: CapabilityTable<u8> = CapabilityTable::new(4);
        for i in [4u64, 5, 1000, u64::MAX] {
            assert_eq!(t.get(i), Err(CapabilityError::OutOfRange));
            assert_eq!(t.insert(i, 1), Err(CapabilityError::OutOfRange));
            assert_eq!(t.remove(i), Err(CapabilityError::OutOfRange));
            assert_eq!(t.is_free(i), Err(CapabilityError::OutOfRange));
        }
        assert_eq!(t.find_free(u64::MAX), None);
    }

    #[test]
    fn find_free_and_remove_where() {
        let mut t = CapabilityTable::new(5);
        for i in 0..4 {
            t.insert(i, i * 10).unwrap();
        }
        assert_eq!(t.find_free(0), Some(4));
        t.insert(4, 40).unwrap();
        assert_eq!(t.find_free(0), None);
        assert_eq!(t.remove_where(|&v| v >= 20), 3);
        assert_eq!(t.find_free(1), Some(2));
        let left: alloc::vec::Vec<_> = t.iter().map(|(i, v)| (i, *v)).collect();
        assert_eq!(left, [(0, 0), (1, 10)]);
    }
}
