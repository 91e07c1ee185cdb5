//! A growable array stored in fixed-size chunks: pushing never moves existing elements and
//! never asks the allocator for more than one chunk at a time. The kernel heap is small and a
//! buddy allocator, so one large contiguous `Vec` (which doubles, and needs old and new
//! buffers at once while it does) would fail long before the heap is full.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::{Index, IndexMut};

/// Elements per chunk.
pub const CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct ChunkedVec<T> {
    chunks: Vec<Box<[Option<T>]>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ChunkedVec<T> {
    pub const fn new() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `value`; returns its index.
    pub fn push(&mut self, value: T) -> usize {
        let i = self.len;
        if i / CHUNK == self.chunks.len() {
            self.chunks.push(
                (0..CHUNK)
                    .map(|_| None)
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
        }
        self.chunks[i / CHUNK][i % CHUNK] = Some(value);
        self.len += 1;
        i
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        self.chunks[i / CHUNK][i % CHUNK].as_ref()
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        self.chunks[i / CHUNK][i % CHUNK].as_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        (0..self.len).map(|i| &self[i])
    }
}

impl<T> Index<usize> for ChunkedVec<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.get(i).expect("ChunkedVec index out of range")
    }
}

impl<T> IndexMut<usize> for ChunkedVec<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        self.get_mut(i).expect("ChunkedVec index out of range")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_stay_put_across_chunks() {
        let mut v = ChunkedVec::new();
        assert!(v.is_empty());
        for i in 0..(3 * CHUNK + 7) {
            assert_eq!(v.push(i * 3), i);
        }
        assert_eq!(v.len(), 3 * CHUNK + 7);
        assert_eq!(v.chunks.len(), 4, "grows one chunk at a time");
        let first = &v[0] as *const usize;
        v.push(1);
        assert_eq!(&v[0] as *const usize, first, "pushing never moves elements");
        assert_eq!(v[CHUNK], CHUNK * 3);
        v[CHUNK + 1] = 5;
        assert_eq!(v.get(CHUNK + 1), Some(&5));
        assert_eq!(v.get(v.len()), None);
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &x)| i == CHUNK + 1 || i == v.len() - 1 || x == i * 3));
    }
}
