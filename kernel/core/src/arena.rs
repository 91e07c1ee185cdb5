//! A generational arena of boxed kernel objects. Objects keep a stable address (they are
//! boxed), and an identifier of a destroyed object never names its successor in the slot.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Names an object in an [`Arena`]: slot index plus the generation the slot had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    /// Slot index.
    pub index: u32,
    /// Generation of the slot when the object was created.
    pub generation: u32,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<Box<T>>,
}

/// Objects of one kind.
#[derive(Debug)]
pub struct Arena<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    live: usize,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Arena<T> {
    /// An empty arena.
    pub const fn new() -> Self {
        Arena {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }

    /// Store `value`; returns its identifier.
    pub fn insert(&mut self, value: T) -> ObjectId {
        self.live += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(Box::new(value));
            ObjectId {
                index,
                generation: slot.generation,
            }
        } else {
            self.slots.push(Slot {
                generation: 0,
                value: Some(Box::new(value)),
            });
            ObjectId {
                index: (self.slots.len() - 1) as u32,
                generation: 0,
            }
        }
    }

    /// Store `value` unless the allocator has no room for the arena's own bookkeeping (its
    /// slot and free lists grow by doubling, which needs one large block): then `value` comes
    /// back and nothing changed. Once this succeeded, [`Arena::remove`] of any object never
    /// allocates. The object itself is boxed as by [`Arena::insert`] (a small allocation the
    /// caller must have room for).
    pub fn try_insert(&mut self, value: T) -> Result<ObjectId, T> {
        if self.free.is_empty() {
            // Room for the new slot, and for every slot on the free list later.
            let slots = self.slots.len() + 1;
            if self.slots.try_reserve(1).is_err()
                || self.free.try_reserve(slots - self.free.len()).is_err()
            {
                return Err(value);
            }
        }
        Ok(self.insert(value))
    }

    /// The object `id`, if it still exists.
    pub fn get(&self, id: ObjectId) -> Option<&T> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_deref()
    }

    /// The object `id`, mutably, if it still exists.
    pub fn get_mut(&mut self, id: ObjectId) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_deref_mut()
    }

    /// A raw pointer to object `id` (stable while it lives: objects are boxed), for callers
    /// that must hold two objects at once.
    pub fn get_ptr(&mut self, id: ObjectId) -> Option<*mut T> {
        self.get_mut(id).map(|object| object as *mut T)
    }

    /// Whether `id` names a live object.
    pub fn contains(&self, id: ObjectId) -> bool {
        self.get(id).is_some()
    }

    /// Destroy object `id`; returns it.
    pub fn remove(&mut self, id: ObjectId) -> Option<Box<T>> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        Some(value)
    }

    /// Destroy every object for which `doomed` says so, handing each to `removed`, in one pass
    /// over the slots and without collecting them first (it allocates only when the free list
    /// must grow, which it never must for objects stored with [`Arena::try_insert`]).
    pub fn remove_where(
        &mut self,
        mut doomed: impl FnMut(&T) -> bool,
        mut removed: impl FnMut(Box<T>),
    ) {
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if slot.value.as_deref().is_some_and(&mut doomed) {
                let value = slot.value.take().expect("checked");
                slot.generation = slot.generation.wrapping_add(1);
                self.free.push(index as u32);
                self.live -= 1;
                removed(value);
            }
        }
    }

    /// Number of live objects.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether there are no live objects.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Number of slots (live or free): the end of a [`Arena::drain_where`] scan.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Remove the objects that `select` picks, scanning slots from `*cursor` on: at most
    /// `limit` slots, and no further once `max_removed` objects were removed. Advances
    /// `*cursor` past the slots scanned (the scan is done when it reaches
    /// [`Arena::slot_count`]) and returns the removed objects with their identifiers. A scan
    /// of the whole arena in steps costs one visit per slot, however many objects it removes.
    pub fn drain_where(
        &mut self,
        cursor: &mut usize,
        limit: usize,
        max_removed: usize,
        mut select: impl FnMut(&T) -> bool,
    ) -> Vec<(ObjectId, Box<T>)> {
        let mut removed = Vec::new();
        let end = self.slots.len().min(cursor.saturating_add(limit));
        while *cursor < end && removed.len() < max_removed {
            let index = *cursor;
            *cursor += 1;
            let slot = &mut self.slots[index];
            if !slot.value.as_deref().is_some_and(&mut select) {
                continue;
            }
            let id = ObjectId {
                index: index as u32,
                generation: slot.generation,
            };
            if let Some(value) = slot.value.take() {
                slot.generation = slot.generation.wrapping_add(1);
                self.free.push(index as u32);
                self.live -= 1;
                removed.push((id, value));
            }
        }
        removed
    }

    /// Identifiers of the live objects in slots `range`.
    pub fn ids_in(&self, range: core::ops::Range<usize>) -> impl Iterator<Item = ObjectId> + '_ {
        let end = range.end.min(self.slots.len());
        let start = range.start.min(end);
        self.slots[start..end]
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| {
                s.value.as_ref().map(|_| ObjectId {
                    index: (start + i) as u32,
                    generation: s.generation,
                })
            })
    }

    /// Identifiers of all live objects.
    pub fn ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value.as_ref().map(|_| ObjectId {
                index: i as u32,
                generation: s.generation,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_do_not_name_successors() {
        let mut a = Arena::new();
        let x = a.insert(1);
        assert_eq!(a.get(x), Some(&1));
        assert_eq!(*a.remove(x).unwrap(), 1);
        assert_eq!(a.get(x), None);
        assert!(a.remove(x).is_none());
        let y = a.insert(2);
        assert_eq!(y.index, x.index);
        assert_ne!(y.generation, x.generation);
        assert_eq!(a.get(x), None);
        assert_eq!(a.get(y), Some(&2));
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn try_insert_reuses_slots_and_keeps_room_for_removal() {
        let mut a = Arena::new();
        let ids: Vec<_> = (0..100).map(|i| a.try_insert(i).unwrap()).collect();
        assert!(a.free.capacity() >= a.slots.len());
        for &id in &ids {
            a.remove(id);
        }
        let again = a.try_insert(7).unwrap();
        assert_eq!(a.get(again), Some(&7));
        assert_eq!(a.slots.len(), 100);
    }

    #[test]
    fn remove_where_removes_exactly_the_doomed() {
        let mut a = Arena::new();
        let ids: Vec<_> = (0..10).map(|i| a.try_insert(i).unwrap()).collect();
        let mut gone = Vec::new();
        a.remove_where(|&v| v % 3 == 0, |v| gone.push(*v));
        assert_eq!(gone, [0, 3, 6, 9]);
        assert_eq!(a.len(), 6);
        assert!(a.get(ids[3]).is_none());
        assert_eq!(a.get(ids[4]), Some(&4));
    }

    #[test]
    fn drain_where_scans_in_steps() {
        let mut a = Arena::new();
        let ids: Vec<_> = (0..100).map(|i| a.insert(i)).collect();
        let mut cursor = 0;
        let mut removed = Vec::new();
        let mut steps = 0;
        while cursor < a.slot_count() {
            removed.extend(a.drain_where(&mut cursor, 16, 3, |&v| v % 2 == 0));
            steps += 1;
        }
        assert_eq!(removed.len(), 50);
        assert!(steps >= 17);
        assert!(removed
            .iter()
            .all(|(id, v)| **v % 2 == 0 && ids[**v as usize] == *id));
        assert_eq!(a.len(), 50);
        assert!(ids
            .iter()
            .enumerate()
            .all(|(i, &id)| a.contains(id) == (i % 2 == 1)));
        let again = a.insert(7);
        assert!(!ids.contains(&again));
    }

    #[test]
    fn addresses_are_stable() {
        let mut a = Arena::new();
        let first = a.insert([0u8; 64]);
        let p = a.get(first).unwrap() as *const _;
        for i in 0..1000 {
            a.insert([i as u8; 64]);
        }
        assert_eq!(a.get(first).unwrap() as *const _, p);
        assert_eq!(a.ids().count(), 1001);
    }
}
