//! A virtio block device (device ID 2, virtio 1.2 §5.2) over a disk image in memory (the
//! VMM hands it a boot module), with one request queue.
//!
//! Requests: `VIRTIO_BLK_T_IN` (read), `T_OUT` (write), `T_FLUSH` (nothing to do: the image is
//! memory) and `T_GET_ID` (the 20-byte ID string); anything else is answered
//! `VIRTIO_BLK_S_UNSUPP`. A request is a chain of a 16-byte device-readable header (type,
//! reserved, sector), the data (readable for writes, writable for reads) and a writable status
//! byte, the last writable byte of the chain. Malformed requests are answered, never fatal:
//! a header shorter than 16 bytes, data that is not a whole number of 512-byte sectors,
//! sectors past the end of the image (checked without overflow) and writes to a read-only
//! image (`VIRTIO_BLK_F_RO`) get `VIRTIO_BLK_S_IOERR`; a chain without a writable byte cannot
//! be answered and is returned with nothing written. The capacity in the configuration space is
//! the image's length in whole sectors (a trailing partial sector is not reachable). Data moves
//! straight between guest memory and the image, without an intermediate buffer.

use super::mmio::VirtioBackend;
use super::queue::{Chain, Queue, QueueError};
use super::{copy_config, device_id};
use crate::guest_memory::GuestMemory;
use alloc::vec::Vec;

/// Read sectors into the guest.
pub const T_IN: u32 = 0;
/// Write sectors from the guest.
pub const T_OUT: u32 = 1;
/// Make written data durable.
pub const T_FLUSH: u32 = 4;
/// Read the device ID string.
pub const T_GET_ID: u32 = 8;
/// Status: done.
pub const S_OK: u8 = 0;
/// Status: the request failed.
pub const S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const S_UNSUPP: u8 = 2;
/// Feature: `seg_max` in the configuration space is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device is read-only.
pub const F_RO: u64 = 1 << 5;
/// Feature: the device takes flush requests.
pub const F_FLUSH: u64 = 1 << 9;
/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// The request header's size.
pub const HEADER_SIZE: u64 = 16;
/// Bytes of the ID string.
pub const ID_BYTES: usize = 20;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments a request may have (the header and status take two descriptors of
/// a chain of at most a queue's size).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes of the configuration space the device fills (capacity, size_max, seg_max).
pub const CONFIG_SIZE: usize = 16;

/// A disk image: its bytes, writable unless it is read-only.
pub trait DiskImage {
    /// The image.
    fn bytes(&self) -> &[u8];
    /// The image, writable; `None` for a read-only image.
    fn bytes_mut(&mut self) -> Option<&mut [u8]>;
}

impl DiskImage for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Some(self)
    }
}

impl DiskImage for &mut [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        Some(self)
    }
}

/// A read-only image.
impl DiskImage for &[u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        None
    }
}

/// The block backend.
pub struct VirtioBlock<D> {
    image: D,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl<D: DiskImage> VirtioBlock<D> {
    /// A disk over `image`; read-only if the image cannot be written.
    pub fn new(mut image: D) -> Self {
        let read_only = image.bytes_mut().is_none();
        VirtioBlock {
            image,
            read_only,
            id: [0; ID_BYTES],
        }
    }

    /// A read-only disk over `image` (offers `VIRTIO_BLK_F_RO`, refuses writes).
    pub fn read_only(image: D) -> Self {
        VirtioBlock {
            read_only: true,
            ..VirtioBlock::new(image)
        }
    }

    /// Set the ID string `T_GET_ID` returns (at most 20 bytes are kept).
    pub fn with_id(mut self, id: &[u8]) -> Self {
        self.id = [0; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        self.id[..n].copy_from_slice(&id[..n]);
        self
    }

    /// Whether the disk refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.image.bytes().len() as u64 / SECTOR_SIZE
    }

    /// The image.
    pub fn image(&self) -> &D {
        &self.image
    }

    /// The byte range of `length` bytes at `sector`, if it is inside the image and whole
    /// sectors.
    fn span(&self, sector: u64, length: u64) -> Option<core::ops::Range<usize>> {
        if !length.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(length)?;
        if end > self.capacity() * SECTOR_SIZE {
            return None;
        }
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// Carry out one request; returns (status, bytes written into the chain before the
    /// status byte).
    fn execute(
        &mut self,
        chain: &Chain,
        memory: &mut dyn GuestMemory,
        status_at: u64,
    ) -> Result<(u8, u64), QueueError> {
        let mut header = [0u8; HEADER_SIZE as usize];
        if chain.read(&*memory, 0, &mut header)? < header.len() {
            return Ok((S_IOERR, 0));
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        match kind {
            T_IN => {
                let length = status_at;
                let Some(span) = self.span(sector, length) else {
                    return Ok((S_IOERR, 0));
                };
                chain.write(memory, 0, &self.image.bytes()[span])?;
                Ok((S_OK, length))
            }
            T_OUT => {
                let length = chain.readable_length() - HEADER_SIZE;
                let span = self.span(sector, length);
                let writable = if self.read_only {
                    None
                } else {
                    self.image.bytes_mut()
                };
                let (Some(span), Some(image)) = (span, writable) else {
                    return Ok((S_IOERR, 0));
                };
                chain.read(&*memory, HEADER_SIZE, &mut image[span])?;
                Ok((S_OK, 0))
            }
            T_FLUSH => Ok((S_OK, 0)),
            T_GET_ID => {
                let n = (status_at as usize).min(ID_BYTES);
                let written = chain.write(memory, 0, &self.id[..n])?;
                Ok((S_OK, written as u64))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }

    fn serve(&mut self, queue: &mut Queue, memory: &mut dyn GuestMemory) -> Result<(), QueueError> {
        loop {
            while let Some(chain) = queue.pop(&*memory)? {
                let writable = chain.writable_length();
                let used = match writable.checked_sub(1) {
                    // Nowhere to put a status: hand the chain back untouched.
                    None => 0,
                    Some(status_at) => {
                        let (status, written) = self.execute(&chain, memory, status_at)?;
                        chain.write(memory, status_at, &[status])?;
                        written + 1
                    }
                };
                // Chains are at most 4 GiB, so `used` fits.
                queue.add_used(memory, chain.head(), used as u32)?;
            }
            if !queue.enable_notification(memory)? {
                return Ok(());
            }
        }
    }
}

impl<D: DiskImage> VirtioBackend for VirtioBlock<D> {
    fn device_id(&self) -> u32 {
        device_id::BLOCK
    }

    fn features(&self) -> u64 {
        F_SEG_MAX | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn notify(
        &mut self,
        _queue: u16,
        queues: &mut [Queue],
        memory: &mut dyn GuestMemory,
    ) -> Result<(), QueueError> {
        match queues.first_mut() {
            Some(queue) if queue.is_ready() => self.serve(queue, memory),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_memory::VecMemory;
    use crate::mmio::MmioDevice;
    use crate::virtio::feature;
    use crate::virtio::mmio::test_transport::*;
    use crate::virtio::mmio::{reg, VirtioMmio, INTERRUPT_USED_BUFFER};
    use crate::virtio::queue::test_driver::Driver;
    use crate::virtio::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
    use alloc::vec;

    const HEADER: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0x8ff0;
    const SECTORS: u64 = 16;

    fn image() -> Vec<u8> {
        (0..SECTORS * SECTOR_SIZE).map(|i| (i / 7) as u8).collect()
    }

    type Block<D> = VirtioMmio<VirtioBlock<D>, VecMemory>;

    fn block<D: DiskImage>(disk: VirtioBlock<D>) -> (Block<D>, Driver) {
        let mut d = VirtioMmio::new(disk, VecMemory::new(0, 0x40000));
        let features = feature::VERSION_1 | feature::RING_INDIRECT_DESC | F_FLUSH;
        let mut drivers = bring_up(&mut d, features, 1, 16);
        (d, drivers.remove(0))
    }

    /// Submit a request (header, then `data` buffers, then a status byte) and return
    /// (status, used length).
    fn request<D: DiskImage>(
        d: &mut Block<D>,
        driver: &mut Driver,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> (u8, u32) {
        let mut m = d.memory().clone();
        m.write_u32(HEADER, kind).unwrap();
        m.write_u32(HEADER + 4, 0).unwrap();
        m.write_u64(HEADER + 8, sector).unwrap();
        m.write(STATUS, &[0xff]).unwrap();
        let mut chain = vec![(HEADER, HEADER_SIZE as u32, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        let head = driver.add_chain(&mut m, &chain);
        *d.memory_mut() = m;
        write(d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.error(), None);
        assert_eq!(take_interrupt(d), INTERRUPT_USED_BUFFER);
        let slot = driver.used_index(d.memory()).wrapping_sub(1);
        let (id, length) = driver.used_entry(d.memory(), slot);
        assert_eq!(id, u32::from(head));
        (d.memory().bytes()[STATUS as usize], length)
    }

    #[test]
    fn identity_features_and_capacity() {
        let (mut d, _) = block(VirtioBlock::new(image()));
        assert_eq!(read(&mut d, reg::DEVICE_ID), 2);
        let offered = device_features(&mut d);
        assert_eq!(offered & (F_SEG_MAX | F_FLUSH | F_RO), F_SEG_MAX | F_FLUSH);
        assert_eq!(d.read(reg::CONFIG, 8), SECTORS);
        assert_eq!(d.read(reg::CONFIG + 4, 4), 0);
        assert_eq!(d.read(reg::CONFIG + 12, 4), u64::from(SEG_MAX));
        assert_eq!(d.read(reg::CONFIG + 16, 4), 0);
        // A trailing partial sector is not part of the capacity.
        let mut odd = image();
        odd.extend_from_slice(&[0; 100]);
        assert_eq!(VirtioBlock::new(odd).capacity(), SECTORS);
        let ro = VirtioBlock::read_only(image());
        assert!(ro.is_read_only());
        assert_ne!(ro.features() & F_RO, 0);
        let slice: &[u8] = &[0; 1024];
        assert!(VirtioBlock::new(slice).is_read_only());
        let mut bytes = [0u8; 1024];
        assert!(!VirtioBlock::new(&mut bytes[..]).is_read_only());
    }

    #[test]
    fn reads_and_writes_sectors() {
        let (mut d, mut driver) = block(VirtioBlock::new(image()));
        // Read sectors 2 and 3 into two buffers.
        let (status, used) = request(
            &mut d,
            &mut driver,
            T_IN,
            2,
            &[(DATA, 700, true), (DATA + 0x1000, 324, true)],
        );
        assert_eq!((status, used), (S_OK, 1025));
        let m = d.memory().bytes();
        let disk = image();
        assert_eq!(&m[DATA as usize..][..700], &disk[1024..1724]);
        assert_eq!(&m[DATA as usize + 0x1000..][..324], &disk[1724..2048]);
        // Write sector 15 (the last).
        d.memory_mut().write(DATA, &[0xab; 512]).unwrap();
        let (status, used) = request(&mut d, &mut driver, T_OUT, 15, &[(DATA, 512, false)]);
        assert_eq!((status, used), (S_OK, 1));
        let disk = d.backend().image();
        assert_eq!(&disk[15 * 512..], &[0xab; 512]);
        assert_eq!(disk[15 * 512 - 1], image()[15 * 512 - 1]);
        // Flush and an empty read succeed.
        assert_eq!(request(&mut d, &mut driver, T_FLUSH, 0, &[]), (S_OK, 1));
        assert_eq!(request(&mut d, &mut driver, T_IN, 16, &[]), (S_OK, 1));
    }

    #[test]
    fn get_id() {
        let disk = VirtioBlock::new(image()).with_id(b"l4linux-disk-0-and-more");
        let (mut d, mut driver) = block(disk);
        let (status, used) = request(&mut d, &mut driver, T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((status, used), (S_OK, 21));
        assert_eq!(
            &d.memory().bytes()[DATA as usize..][..20],
            b"l4linux-disk-0-and-m"
        );
        // A short buffer gets what fits.
        d.memory_mut().write(DATA, &[0; 20]).unwrap();
        let (status, used) = request(&mut d, &mut driver, T_GET_ID, 0, &[(DATA, 4, true)]);
        assert_eq!((status, used), (S_OK, 5));
        assert_eq!(&d.memory().bytes()[DATA as usize..][..5], b"l4li\0");
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let (mut d, mut driver) = block(VirtioBlock::new(image()));
        let before = image();
        type Case = (u32, u64, Vec<(u64, u32, bool)>, u8);
        let cases: [Case; 8] = [
            // Past the end, straddling the end, and a sector whose byte offset overflows.
            (T_IN, 16, vec![(DATA, 512, true)], S_IOERR),
            (T_IN, 15, vec![(DATA, 1024, true)], S_IOERR),
            (T_IN, u64::MAX / 256, vec![(DATA, 512, true)], S_IOERR),
            (T_OUT, u64::MAX, vec![(DATA, 512, false)], S_IOERR),
            // Not whole sectors.
            (T_IN, 0, vec![(DATA, 511, true)], S_IOERR),
            (T_OUT, 0, vec![(DATA, 100, false)], S_IOERR),
            // Unknown types.
            (99, 0, vec![(DATA, 512, true)], S_UNSUPP),
            (11, 0, vec![], S_UNSUPP),
        ];
        for (kind, sector, data, expected) in cases {
            let (status, used) = request(&mut d, &mut driver, kind, sector, &data);
            assert_eq!((status, used), (expected, 1), "type {kind} sector {sector}");
        }
        assert_eq!(d.backend().image(), &before);
    }

    #[test]
    fn read_only_images_refuse_writes() {
        let (mut d, mut driver) = block(VirtioBlock::read_only(image()));
        assert_eq!(
            request(&mut d, &mut driver, T_OUT, 0, &[(DATA, 512, false)]),
            (S_IOERR, 1)
        );
        assert_eq!(d.backend().image(), &image());
        assert_eq!(
            request(&mut d, &mut driver, T_IN, 0, &[(DATA, 512, true)]),
            (S_OK, 513)
        );
        let slice: &[u8] = &[7; 1024];
        let (mut d, mut driver) = block(VirtioBlock::new(slice));
        assert_eq!(
            request(&mut d, &mut driver, T_OUT, 0, &[(DATA, 512, false)]),
            (S_IOERR, 1)
        );
    }

    #[test]
    fn short_header_and_missing_status() {
        let (mut d, mut driver) = block(VirtioBlock::new(image()));
        // A 10-byte header.
        let mut m = d.memory().clone();
        m.write(STATUS, &[0xff]).unwrap();
        driver.add_chain(&mut m, &[(HEADER, 10, false), (STATUS, 1, true)]);
        // No writable byte at all: returned with nothing written.
        driver.add_chain(&mut m, &[(HEADER, 16, false), (DATA, 512, false)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.error(), None);
        assert_eq!(d.memory().bytes()[STATUS as usize], S_IOERR);
        assert_eq!(driver.used_entry(d.memory(), 0), (0, 1));
        assert_eq!(driver.used_entry(d.memory(), 1), (2, 0));
        assert_eq!(d.backend().image(), &image());
    }

    #[test]
    fn indirect_requests_as_linux_sends_them() {
        let (mut d, mut driver) = block(VirtioBlock::new(image()));
        let table = 0x7000;
        let mut m = d.memory().clone();
        m.write_u32(HEADER, T_IN).unwrap();
        m.write_u64(HEADER + 8, 4).unwrap();
        let entries = [
            (HEADER, 16, DESC_F_NEXT, 1u16),
            (DATA, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
            (STATUS, 1, DESC_F_WRITE, 0),
        ];
        for (i, &(address, length, flags, next)) in entries.iter().enumerate() {
            let e = table + 16 * i as u64;
            m.write_u64(e, address).unwrap();
            m.write_u32(e + 8, length).unwrap();
            m.write_u16(e + 12, flags).unwrap();
            m.write_u16(e + 14, next).unwrap();
        }
        driver.set_descriptor(&mut m, 0, table, 48, DESC_F_INDIRECT, 0);
        driver.publish(&mut m, 0);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(d.error(), None);
        assert_eq!(driver.used_entry(d.memory(), 0), (0, 4097));
        assert_eq!(d.memory().bytes()[STATUS as usize], S_OK);
        assert_eq!(
            &d.memory().bytes()[DATA as usize..][..4096],
            &image()[4 * 512..12 * 512]
        );
    }

    #[test]
    fn a_broken_chain_is_a_device_error_not_a_status() {
        let (mut d, mut driver) = block(VirtioBlock::new(image()));
        let mut m = d.memory().clone();
        driver.add_chain(&mut m, &[(HEADER, 16, false), (0x3_ff00, 0x200, true)]);
        *d.memory_mut() = m;
        write(&mut d, reg::QUEUE_NOTIFY, 0);
        assert!(matches!(
            d.error(),
            Some(QueueError::BufferOutOfRange { .. })
        ));
    }
}
