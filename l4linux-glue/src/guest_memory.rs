//! Guest-physical memory as the device models see it: byte reads and writes at guest-physical
//! addresses that fail with a bounds error instead of touching anything outside guest RAM.
//!
//! The VMM implements [`GuestMemory`] over the RAM it maps for the guest; tests use
//! [`VecMemory`]. Every access the virtio models make goes through this trait, so a guest
//! pointer that leaves guest RAM is an error value, never a host access. Accesses are plain
//! copies without ordering: the VMM handles a device while the vCPU that notified it is
//! stopped (one vCPU), so no fences are needed yet.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Why a guest-memory access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryError {
    /// `address .. address + length` is not entirely guest RAM (or it wraps).
    OutOfRange {
        /// The first byte of the access.
        address: u64,
        /// Its length in bytes.
        length: u64,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MemoryError::OutOfRange { address, length } => write!(
                f,
                "guest-physical range {address:#x} + {length:#x} is outside guest memory"
            ),
        }
    }
}

/// Guest-physical memory, read and written in bytes (little-endian helpers on top).
pub trait GuestMemory {
    /// Copy `buffer.len()` bytes starting at guest-physical `address` into `buffer`.
    fn read(&self, address: u64, buffer: &mut [u8]) -> Result<(), MemoryError>;

    /// Copy `data` to guest-physical `address`.
    fn write(&mut self, address: u64, data: &[u8]) -> Result<(), MemoryError>;

    /// Whether `address .. address + length` lies entirely in guest memory (a zero-length
    /// range is checked at `address`).
    fn check_range(&self, address: u64, length: u64) -> Result<(), MemoryError>;

    /// Call `f` with the bytes at `address .. address + length`, in place: a device copies
    /// from guest memory to where the bytes go (a frame ring) without a buffer between. The
    /// default reads them into a buffer, piece by piece (`f` may be called several times,
    /// in order, with the pieces).
    fn with_bytes(
        &self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), MemoryError> {
        self.check_range(address, length as u64)?;
        let mut buffer = [0u8; 512];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(buffer.len());
            self.read(address + done as u64, &mut buffer[..n])?;
            f(&buffer[..n]);
            done += n;
        }
        Ok(())
    }

    /// Call `f` with the bytes at `address .. address + length` to fill them in place (the
    /// default fills a buffer, piece by piece, and writes it).
    fn with_bytes_mut(
        &mut self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), MemoryError> {
        self.check_range(address, length as u64)?;
        let mut buffer = [0u8; 512];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(buffer.len());
            f(&mut buffer[..n]);
            self.write(address + done as u64, &buffer[..n])?;
            done += n;
        }
        Ok(())
    }

    /// A little-endian `u16` at `address`.
    fn read_u16(&self, address: u64) -> Result<u16, MemoryError> {
        let mut b = [0; 2];
        self.read(address, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// A little-endian `u32` at `address`.
    fn read_u32(&self, address: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(address, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A little-endian `u64` at `address`.
    fn read_u64(&self, address: u64) -> Result<u64, MemoryError> {
        let mut b = [0; 8];
        self.read(address, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Store `value` little-endian at `address`.
    fn write_u16(&mut self, address: u64, value: u16) -> Result<(), MemoryError> {
        self.write(address, &value.to_le_bytes())
    }

    /// Store `value` little-endian at `address`.
    fn write_u32(&mut self, address: u64, value: u32) -> Result<(), MemoryError> {
        self.write(address, &value.to_le_bytes())
    }

    /// Store `value` little-endian at `address`.
    fn write_u64(&mut self, address: u64, value: u64) -> Result<(), MemoryError> {
        self.write(address, &value.to_le_bytes())
    }
}

/// Guest memory held in a vector: `base .. base + len` (for tests and host tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMemory {
    base: u64,
    bytes: Vec<u8>,
}

impl VecMemory {
    /// `length` zeroed bytes at guest-physical `base`.
    pub fn new(base: u64, length: usize) -> Self {
        VecMemory {
            base,
            bytes: vec![0; length],
        }
    }

    /// The guest-physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The whole memory.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole memory, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The index range in `bytes` of the guest range, if it is inside.
    fn span(&self, address: u64, length: u64) -> Result<core::ops::Range<usize>, MemoryError> {
        let error = MemoryError::OutOfRange { address, length };
        let start = address.checked_sub(self.base).ok_or(error)?;
        let end = start.checked_add(length).ok_or(error)?;
        if end > self.bytes.len() as u64 {
            return Err(error);
        }
        Ok(start as usize..end as usize)
    }
}

impl GuestMemory for VecMemory {
    fn read(&self, address: u64, buffer: &mut [u8]) -> Result<(), MemoryError> {
        let span = self.span(address, buffer.len() as u64)?;
        buffer.copy_from_slice(&self.bytes[span]);
        Ok(())
    }

    fn write(&mut self, address: u64, data: &[u8]) -> Result<(), MemoryError> {
        let span = self.span(address, data.len() as u64)?;
        self.bytes[span].copy_from_slice(data);
        Ok(())
    }

    fn check_range(&self, address: u64, length: u64) -> Result<(), MemoryError> {
        self.span(address, length).map(|_| ())
    }

    fn with_bytes(
        &self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), MemoryError> {
        let span = self.span(address, length as u64)?;
        f(&self.bytes[span]);
        Ok(())
    }

    fn with_bytes_mut(
        &mut self,
        address: u64,
        length: usize,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), MemoryError> {
        let span = self.span(address, length as u64)?;
        f(&mut self.bytes[span]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_inside() {
        let mut m = VecMemory::new(0x1000, 0x100);
        m.write_u32(0x1000, 0x1234_5678).unwrap();
        assert_eq!(m.read_u16(0x1000), Ok(0x5678));
        assert_eq!(m.read_u16(0x1002), Ok(0x1234));
        m.write_u64(0x10f8, u64::MAX).unwrap();
        assert_eq!(m.read_u64(0x10f8), Ok(u64::MAX));
        assert_eq!(m.bytes()[0], 0x78);
        assert_eq!(m.base(), 0x1000);
        assert!(m.check_range(0x1100, 0).is_ok());
    }

    #[test]
    fn bounds_errors() {
        let mut m = VecMemory::new(0x1000, 0x100);
        let before = m.clone();
        assert_eq!(
            m.read_u32(0xffe),
            Err(MemoryError::OutOfRange {
                address: 0xffe,
                length: 4
            })
        );
        assert!(m.read_u32(0x10fd).is_err());
        assert!(m.write_u64(0x10f9, 1).is_err());
        assert!(m.write(u64::MAX, &[1, 2]).is_err());
        assert!(m.check_range(0x1000, u64::MAX).is_err());
        assert!(m.check_range(0x1101, 0).is_err());
        assert_eq!(m, before, "a refused write changes nothing");
        let text = alloc::format!("{}", m.read_u16(0).unwrap_err());
        assert!(text.contains("outside guest memory"));
    }

    /// Guest memory with only the required methods: the in-place accesses' defaults.
    struct Defaults(VecMemory);

    impl GuestMemory for Defaults {
        fn read(&self, address: u64, buffer: &mut [u8]) -> Result<(), MemoryError> {
            self.0.read(address, buffer)
        }
        fn write(&mut self, address: u64, data: &[u8]) -> Result<(), MemoryError> {
            self.0.write(address, data)
        }
        fn check_range(&self, address: u64, length: u64) -> Result<(), MemoryError> {
            self.0.check_range(address, length)
        }
    }

    #[test]
    fn bytes_in_place() {
        let mut m = VecMemory::new(0x1000, 0x1000);
        for (i, b) in m.bytes_mut().iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let mut d = Defaults(m.clone());
        for memory in [&mut m as &mut dyn GuestMemory, &mut d] {
            let mut seen = Vec::new();
            memory
                .with_bytes(0x1003, 1300, &mut |b| seen.extend_from_slice(b))
                .unwrap();
            let expected: Vec<u8> = (3..1303).map(|i| (i * 7) as u8).collect();
            assert_eq!(seen, expected);
            let mut next = 0u8;
            memory
                .with_bytes_mut(0x1100, 1100, &mut |b| {
                    for x in b {
                        *x = next;
                        next = next.wrapping_add(1);
                    }
                })
                .unwrap();
            let mut back = vec![0u8; 1100];
            memory.read(0x1100, &mut back).unwrap();
            assert!(back.iter().enumerate().all(|(i, &b)| b == i as u8));
            // Outside: an error before any byte is touched.
            let mut called = false;
            assert!(memory
                .with_bytes(0x1f00, 0x101, &mut |_| called = true)
                .is_err());
            assert!(memory
                .with_bytes_mut(0xfff, 2, &mut |b| {
                    called = true;
                    b.fill(0xee)
                })
                .is_err());
            assert!(!called);
        }
        assert_eq!(m.bytes(), d.0.bytes());
    }
}
