//! Validation of static ELF64 executables (boot modules) before a root task loads them.
//!
//! [`parse`] checks an image byte by byte and, if everything is acceptable for a
//! loader that maps segments page by page into a fresh user address space, returns
//! an [`Image`]: the entry point plus the `PT_LOAD` segments in file order.
//!
//! Guarantees of a successfully parsed [`Image`]:
//! * the file is a little-endian ELF64 `ET_EXEC` image for x86-64;
//! * there are between 1 and [`MAX_SEGMENTS`] `PT_LOAD` segments;
//! * for every segment, `file_offset..file_offset + file_size` lies inside the
//!   input slice, `file_size <= mem_size`, and
//!   `min_vaddr <= vaddr <= vaddr + mem_size <= user_limit` without overflow;
//! * no two segments touch the same 4 KiB virtual page;
//! * no segment is both writable and executable;
//! * the entry point lies inside an executable segment.
//!
//! The ELF file header is decoded with `xmas-elf` (from an aligned copy, since that
//! crate asserts alignment); the identification bytes and the program header table
//! are checked with plain, bounds-checked byte reads first, so that no input,
//! however truncated or corrupt, can cause a panic.

#![no_std]
#![forbid(unsafe_code)]

#[cfg(test)]
extern crate std;

use core::fmt;

use xmas_elf::header::{self, Machine, Type};
use xmas_elf::program::Flags;

/// The largest number of `PT_LOAD` segments an [`Image`] can describe.
pub const MAX_SEGMENTS: usize = 16;

/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header.
const PHDR_SIZE: usize = 56;
/// `e_ident[EI_CLASS]` value for 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]` value for little-endian objects.
const ELFDATA2LSB: u8 = 1;
/// Program header type of a loadable segment.
const PT_LOAD: u32 = 1;
/// log2 of the page size segments are mapped with (4 KiB).
const PAGE_SHIFT: u32 = 12;

/// One loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address of the first byte of the segment.
    pub vaddr: u64,
    /// Size of the segment in memory (file data followed by zero fill).
    pub mem_size: u64,
    /// Offset of the segment's file data in the image.
    pub file_offset: u64,
    /// Number of bytes of file data (`<= mem_size`).
    pub file_size: u64,
    /// The segment is mapped readable (`PF_R`).
    pub readable: bool,
    /// The segment is mapped writable (`PF_W`).
    pub writable: bool,
    /// The segment is mapped executable (`PF_X`).
    pub executable: bool,
}

impl Segment {
    /// Placeholder for unused slots in [`Image`].
    const EMPTY: Segment = Segment {
        vaddr: 0,
        mem_size: 0,
        file_offset: 0,
        file_size: 0,
        readable: false,
        writable: false,
        executable: false,
    };

    /// Inclusive range of virtual page numbers the segment touches, or `None`
    /// for an empty segment (which maps nothing).
    fn page_span(&self) -> Option<(u64, u64)> {
        let last = self.vaddr.checked_add(self.mem_size.checked_sub(1)?)?;
        Some((self.vaddr >> PAGE_SHIFT, last >> PAGE_SHIFT))
    }

    /// Whether `self` and `other` share at least one virtual page.
    fn shares_page_with(&self, other: &Segment) -> bool {
        match (self.page_span(), other.page_span()) {
            (Some((a0, a1)), Some((b0, b1))) => a0 <= b1 && b0 <= a1,
            _ => false,
        }
    }

    /// Whether `addr` lies in `vaddr..vaddr + mem_size`.
    fn contains(&self, addr: u64) -> bool {
        addr >= self.vaddr && addr - self.vaddr < self.mem_size
    }
}

/// Why an image was rejected. Each variant has a human-readable message via
/// [`core::fmt::Display`].
///
/// Segment indices count `PT_LOAD` program headers only, in file order, i.e. they
/// are the positions the segments would have in [`Image::segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    /// The input is shorter than an ELF64 file header (64 bytes).
    TooShort,
    /// The input does not start with `\x7fELF`.
    BadMagic,
    /// The image is not a 64-bit (ELFCLASS64) object.
    NotElf64,
    /// The image is not little endian.
    NotLittleEndian,
    /// The image is not for x86-64 (`e_machine` 62).
    NotX86_64,
    /// The image is not a static executable (`e_type` is not `ET_EXEC`).
    NotExecutable,
    /// The header or program header table is malformed; the text says how.
    Malformed(&'static str),
    /// A segment's file data lies (partly) outside the image.
    SegmentOutOfFile {
        /// Index of the offending `PT_LOAD` segment.
        index: usize,
    },
    /// A segment has more file data than memory.
    FileSizeExceedsMemSize {
        /// Index of the offending `PT_LOAD` segment.
        index: usize,
    },
    /// `vaddr + mem_size` of a segment overflows.
    AddressOverflow {
        /// Index of the offending `PT_LOAD` segment.
        index: usize,
    },
    /// A segment starts below `min_vaddr` or ends above `user_limit`.
    NotUserAddress {
        /// Index of the offending `PT_LOAD` segment.
        index: usize,
    },
    /// Two segments share a virtual page.
    Overlap {
        /// Index of the earlier `PT_LOAD` segment.
        first: usize,
        /// Index of the later `PT_LOAD` segment.
        second: usize,
    },
    /// The image has no `PT_LOAD` segment.
    NoLoadableSegments,
    /// The image has more than [`MAX_SEGMENTS`] `PT_LOAD` segments.
    TooManySegments,
    /// The entry point is not inside an executable segment.
    EntryOutsideSegments,
    /// A segment is both writable and executable.
    WritableAndExecutable {
        /// Index of the offending `PT_LOAD` segment.
        index: usize,
    },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ElfError::TooShort => f.write_str("image is shorter than an ELF64 header"),
            ElfError::BadMagic => f.write_str("image does not start with the ELF magic"),
            ElfError::NotElf64 => f.write_str("image is not a 64-bit ELF file"),
            ElfError::NotLittleEndian => f.write_str("image is not little endian"),
            ElfError::NotX86_64 => f.write_str("image is not an x86-64 ELF file"),
            ElfError::NotExecutable => f.write_str("image is not a static executable (ET_EXEC)"),
            ElfError::Malformed(why) => write!(f, "malformed ELF image: {why}"),
            ElfError::SegmentOutOfFile { index } => {
                write!(f, "segment {index}: file data lies outside the image")
            }
            ElfError::FileSizeExceedsMemSize { index } => {
                write!(f, "segment {index}: file size exceeds memory size")
            }
            ElfError::AddressOverflow { index } => {
                write!(f, "segment {index}: virtual address range overflows")
            }
            ElfError::NotUserAddress { index } => {
                write!(f, "segment {index}: lies outside the user address range")
            }
            ElfError::Overlap { first, second } => {
                write!(f, "segments {first} and {second} share a virtual page")
            }
            ElfError::NoLoadableSegments => f.write_str("image has no loadable segment"),
            ElfError::TooManySegments => {
                write!(f, "image has more than {MAX_SEGMENTS} loadable segments")
            }
            ElfError::EntryOutsideSegments => {
                f.write_str("entry point is not inside an executable segment")
            }
            ElfError::WritableAndExecutable { index } => {
                write!(f, "segment {index}: both writable and executable")
            }
        }
    }
}

impl core::error::Error for ElfError {}

/// A validated image: entry point plus up to [`MAX_SEGMENTS`] `PT_LOAD` segments
/// (in file order).
#[derive(Debug, Clone)]
pub struct Image {
    /// Virtual address execution starts at; inside an executable segment.
    pub entry: u64,
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
}

impl Image {
    /// The loadable segments, in file order.
    pub fn segments(&self) -> &[Segment] {
        self.segments.get(..self.count).unwrap_or(&[])
    }

    /// The segment that contains `addr` (`vaddr <= addr < vaddr + mem_size`), if any.
    pub fn segment_at(&self, addr: u64) -> Option<&Segment> {
        self.segments().iter().find(|s| s.contains(addr))
    }
}

/// Limits a loader imposes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Lowest virtual address a segment may start at (e.g. to keep page 0 unmapped).
    pub min_vaddr: u64,
    /// Exclusive upper bound of user virtual addresses: segments must end at or below it.
    pub user_limit: u64,
}

/// Copy of the ELF file header with the alignment `xmas-elf` asserts on.
#[repr(C, align(8))]
struct AlignedHeader([u8; EHDR_SIZE]);

/// Reads `N` bytes at `offset`, or `None` if they are not all inside `bytes`.
fn read_bytes<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    bytes.get(offset..end)?.try_into().ok()
}

/// Reads a little-endian `u32` at `offset`.
fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    read_bytes(bytes, offset).map(u32::from_le_bytes)
}

/// Reads a little-endian `u64` at `offset`.
fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    read_bytes(bytes, offset).map(u64::from_le_bytes)
}

/// The fields of one ELF64 program header that matter for loading.
struct ProgramHeader {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    file_size: u64,
    mem_size: u64,
}

impl ProgramHeader {
    /// Decodes the 56-byte program header starting at `at`.
    fn read(bytes: &[u8], at: usize) -> Option<ProgramHeader> {
        Some(ProgramHeader {
            kind: read_u32(bytes, at)?,
            flags: read_u32(bytes, at.checked_add(4)?)?,
            offset: read_u64(bytes, at.checked_add(8)?)?,
            vaddr: read_u64(bytes, at.checked_add(16)?)?,
            file_size: read_u64(bytes, at.checked_add(32)?)?,
            mem_size: read_u64(bytes, at.checked_add(40)?)?,
        })
    }
}

/// Parse and validate.
///
/// Checks, in order: length >= 64, magic, class 64, little endian, machine x86_64
/// (62), type `ET_EXEC`, a well-formed program header table (entry size 56, inside
/// the file), then for each `PT_LOAD` segment in file order: file range within the
/// file (no overflow), `file_size <= mem_size`, `vaddr + mem_size` does not
/// overflow, `vaddr >= min_vaddr` and end `<= user_limit`, no shared 4 KiB page
/// with an earlier segment, not both writable and executable. Finally: at least
/// one `PT_LOAD`, at most [`MAX_SEGMENTS`], entry inside an executable segment.
///
/// Never panics, whatever `bytes` contains.
pub fn parse(bytes: &[u8], limits: Limits) -> Result<Image, ElfError> {
    // Identification, checked on the raw bytes for precise errors.
    let ident: [u8; EHDR_SIZE] = read_bytes(bytes, 0).ok_or(ElfError::TooShort)?;
    if ident[..4] != header::MAGIC {
        return Err(ElfError::BadMagic);
    }
    if ident[4] != ELFCLASS64 {
        return Err(ElfError::NotElf64);
    }
    if ident[5] != ELFDATA2LSB {
        return Err(ElfError::NotLittleEndian);
    }

    // The rest of the file header, decoded by xmas-elf from an aligned copy (its
    // reader asserts alignment, and the caller's slice may not be 8-aligned).
    let copy = AlignedHeader(ident);
    let hdr = header::parse_header(&copy.0).map_err(ElfError::Malformed)?;
    if hdr.pt2.machine().as_machine() != Machine::X86_64 {
        return Err(ElfError::NotX86_64);
    }
    if hdr.pt2.type_().as_type() != Type::Executable {
        return Err(ElfError::NotExecutable);
    }
    let entry = hdr.pt2.entry_point();
    let ph_offset = hdr.pt2.ph_offset();
    let ph_count = usize::from(hdr.pt2.ph_count());

    // Program header table bounds.
    if ph_count == 0 {
        return Err(ElfError::NoLoadableSegments);
    }
    if usize::from(hdr.pt2.ph_entry_size()) != PHDR_SIZE {
        return Err(ElfError::Malformed(
            "program header entry size is not 56 bytes",
        ));
    }
    const TABLE_OUT_OF_RANGE: ElfError =
        ElfError::Malformed("program header table lies outside the image");
    let table_start = usize::try_from(ph_offset).map_err(|_| TABLE_OUT_OF_RANGE)?;
    let table_end = ph_count
        .checked_mul(PHDR_SIZE)
        .and_then(|len| table_start.checked_add(len))
        .ok_or(TABLE_OUT_OF_RANGE)?;
    if table_end > bytes.len() {
        return Err(TABLE_OUT_OF_RANGE);
    }
    let file_len = bytes.len() as u64;

    let mut image = Image {
        entry,
        segments: [Segment::EMPTY; MAX_SEGMENTS],
        count: 0,
    };
    let mut loads = 0usize;
    for at in (table_start..table_end).step_by(PHDR_SIZE) {
        let ph = ProgramHeader::read(bytes, at).ok_or(TABLE_OUT_OF_RANGE)?;
        if ph.kind != PT_LOAD {
            continue;
        }
        let index = loads;
        loads = loads.saturating_add(1);

        match ph.offset.checked_add(ph.file_size) {
            Some(end) if end <= file_len => {}
            _ => return Err(ElfError::SegmentOutOfFile { index }),
        }
        if ph.file_size > ph.mem_size {
            return Err(ElfError::FileSizeExceedsMemSize { index });
        }
        let end = ph
            .vaddr
            .checked_add(ph.mem_size)
            .ok_or(ElfError::AddressOverflow { index })?;
        if ph.vaddr < limits.min_vaddr || end > limits.user_limit {
            return Err(ElfError::NotUserAddress { index });
        }
        let flags = Flags(ph.flags);
        let segment = Segment {
            vaddr: ph.vaddr,
            mem_size: ph.mem_size,
            file_offset: ph.offset,
            file_size: ph.file_size,
            readable: flags.is_read(),
            writable: flags.is_write(),
            executable: flags.is_execute(),
        };
        if let Some(first) = image
            .segments()
            .iter()
            .position(|earlier| earlier.shares_page_with(&segment))
        {
            return Err(ElfError::Overlap {
                first,
                second: index,
            });
        }
        if segment.writable && segment.executable {
            return Err(ElfError::WritableAndExecutable { index });
        }
        if let Some(slot) = image.segments.get_mut(index) {
            *slot = segment;
            image.count = loads;
        }
    }

    if loads == 0 {
        return Err(ElfError::NoLoadableSegments);
    }
    if loads > MAX_SEGMENTS {
        return Err(ElfError::TooManySegments);
    }
    match image.segment_at(entry) {
        Some(segment) if segment.executable => Ok(image),
        _ => Err(ElfError::EntryOutsideSegments),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    const R: u32 = 4;
    const W: u32 = 2;
    const X: u32 = 1;
    const PT_NOTE: u32 = 4;
    const PT_GNU_STACK: u32 = 0x6474_e551;

    const LIMITS: Limits = Limits {
        min_vaddr: 0x1000,
        user_limit: 0x0000_8000_0000_0000,
    };

    const TEXT: u64 = 0x40_0000;
    const DATA: u64 = 0x40_1000;
    const ENTRY: u64 = TEXT + 0x80;

    /// A program header to put into a test image.
    #[derive(Clone, Copy)]
    struct Ph {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        file_size: u64,
        mem_size: u64,
    }

    fn load(flags: u32, offset: u64, vaddr: u64, file_size: u64, mem_size: u64) -> Ph {
        Ph {
            kind: PT_LOAD,
            flags,
            offset,
            vaddr,
            file_size,
            mem_size,
        }
    }

    fn put(buf: &mut [u8], at: usize, val: &[u8]) {
        buf[at..at + val.len()].copy_from_slice(val);
    }

    /// Builds an ELF64 x86-64 ET_EXEC image with the program headers right after
    /// the file header, zero-padded to at least `len` bytes.
    fn build(entry: u64, phs: &[Ph], len: usize) -> Vec<u8> {
        let len = len.max(EHDR_SIZE + phs.len() * PHDR_SIZE);
        let mut b = vec![0u8; len];
        put(&mut b, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        put(&mut b, 16, &2u16.to_le_bytes()); // e_type = ET_EXEC
        put(&mut b, 18, &62u16.to_le_bytes()); // e_machine = EM_X86_64
        put(&mut b, 20, &1u32.to_le_bytes()); // e_version
        put(&mut b, 24, &entry.to_le_bytes());
        put(&mut b, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut b, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut b, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut b, 56, &(phs.len() as u16).to_le_bytes()); // e_phnum
        put(&mut b, 58, &64u16.to_le_bytes()); // e_shentsize
        for (i, ph) in phs.iter().enumerate() {
            let at = EHDR_SIZE + i * PHDR_SIZE;
            put(&mut b, at, &ph.kind.to_le_bytes());
            put(&mut b, at + 4, &ph.flags.to_le_bytes());
            put(&mut b, at + 8, &ph.offset.to_le_bytes());
            put(&mut b, at + 16, &ph.vaddr.to_le_bytes());
            put(&mut b, at + 24, &ph.vaddr.to_le_bytes());
            put(&mut b, at + 32, &ph.file_size.to_le_bytes());
            put(&mut b, at + 40, &ph.mem_size.to_le_bytes());
            put(&mut b, at + 48, &0x1000u64.to_le_bytes());
        }
        b
    }

    fn text() -> Ph {
        load(R | X, 0, TEXT, 0x1000, 0x1000)
    }

    fn data() -> Ph {
        load(R | W, 0x1000, DATA, 0x800, 0x3000)
    }

    /// A valid two-segment image (text + data/bss).
    fn valid() -> Vec<u8> {
        build(ENTRY, &[text(), data()], 0x1800)
    }

    fn check(entry: u64, phs: &[Ph]) -> Result<Image, ElfError> {
        parse(&build(entry, phs, 0x3000), LIMITS)
    }

    #[test]
    fn happy_path_two_segments() {
        let image = parse(&valid(), LIMITS).expect("valid image");
        assert_eq!(image.entry, ENTRY);
        assert_eq!(
            image.segments(),
            &[
                Segment {
                    vaddr: TEXT,
                    mem_size: 0x1000,
                    file_offset: 0,
                    file_size: 0x1000,
                    readable: true,
                    writable: false,
                    executable: true,
                },
                Segment {
                    vaddr: DATA,
                    mem_size: 0x3000,
                    file_offset: 0x1000,
                    file_size: 0x800,
                    readable: true,
                    writable: true,
                    executable: false,
                },
            ]
        );
    }

    #[test]
    fn segment_at_finds_containing_segment() {
        let image = parse(&valid(), LIMITS).unwrap();
        assert_eq!(image.segment_at(ENTRY).map(|s| s.vaddr), Some(TEXT));
        assert_eq!(image.segment_at(TEXT).map(|s| s.vaddr), Some(TEXT));
        assert_eq!(image.segment_at(TEXT + 0xfff).map(|s| s.vaddr), Some(TEXT));
        assert_eq!(image.segment_at(DATA).map(|s| s.vaddr), Some(DATA));
        assert_eq!(image.segment_at(DATA + 0x2fff).map(|s| s.vaddr), Some(DATA));
        assert!(image.segment_at(DATA + 0x3000).is_none());
        assert!(image.segment_at(TEXT - 1).is_none());
        assert!(image.segment_at(0).is_none());
        assert!(image.segment_at(u64::MAX).is_none());
    }

    #[test]
    fn too_short() {
        assert_eq!(parse(&[], LIMITS).unwrap_err(), ElfError::TooShort);
        assert_eq!(
            parse(&valid()[..63], LIMITS).unwrap_err(),
            ElfError::TooShort
        );
    }

    #[test]
    fn bad_magic() {
        let mut b = valid();
        b[1] = b'e';
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::BadMagic);
        assert_eq!(parse(&[0u8; 64], LIMITS).unwrap_err(), ElfError::BadMagic);
    }

    #[test]
    fn not_elf64() {
        let mut b = valid();
        b[4] = 1; // ELFCLASS32
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotElf64);
        b[4] = 0;
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotElf64);
    }

    #[test]
    fn not_little_endian() {
        let mut b = valid();
        b[5] = 2; // ELFDATA2MSB
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotLittleEndian);
    }

    #[test]
    fn not_x86_64() {
        let mut b = valid();
        put(&mut b, 18, &183u16.to_le_bytes()); // EM_AARCH64
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotX86_64);
        put(&mut b, 18, &3u16.to_le_bytes()); // EM_386
        assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotX86_64);
    }

    #[test]
    fn not_executable() {
        let mut b = valid();
        for e_type in [0u16, 1, 3, 4, 0xfe00] {
            put(&mut b, 16, &e_type.to_le_bytes());
            assert_eq!(parse(&b, LIMITS).unwrap_err(), ElfError::NotExecutable);
        }
    }

    #[test]
    fn malformed_program_header_table() {
        let mut b = valid();
        put(&mut b, 54, &32u16.to_le_bytes()); // e_phentsize
        assert!(matches!(parse(&b, LIMITS), Err(ElfError::Malformed(_))));

        for phoff in [
            u64::MAX,
            u64::MAX - 55,
            b.len() as u64,
            b.len() as u64 - 100,
        ] {
            let mut b = valid();
            put(&mut b, 32, &phoff.to_le_bytes());
            assert!(
                matches!(parse(&b, LIMITS), Err(ElfError::Malformed(_))),
                "phoff {phoff:#x}"
            );
        }

        let mut b = valid();
        put(&mut b, 56, &u16::MAX.to_le_bytes()); // e_phnum far too large
        assert!(matches!(parse(&b, LIMITS), Err(ElfError::Malformed(_))));
    }

    #[test]
    fn segment_out_of_file() {
        let b = build(
            ENTRY,
            &[text(), load(R | W, 0x1000, DATA, 0x801, 0x3000)],
            0x1800,
        );
        assert_eq!(
            parse(&b, LIMITS).unwrap_err(),
            ElfError::SegmentOutOfFile { index: 1 }
        );
        let overflow = load(R | W, u64::MAX - 4, DATA, 0x10, 0x3000);
        assert_eq!(
            check(ENTRY, &[text(), overflow]).unwrap_err(),
            ElfError::SegmentOutOfFile { index: 1 }
        );
        let beyond = load(R | W, 0x10_0000, DATA, 0, 0x3000);
        assert_eq!(
            check(ENTRY, &[beyond, text()]).unwrap_err(),
            ElfError::SegmentOutOfFile { index: 0 }
        );
    }

    #[test]
    fn file_size_exceeds_mem_size() {
        let bad = load(R | W, 0x1000, DATA, 0x800, 0x7ff);
        assert_eq!(
            check(ENTRY, &[text(), bad]).unwrap_err(),
            ElfError::FileSizeExceedsMemSize { index: 1 }
        );
    }

    #[test]
    fn address_overflow() {
        let bad = load(R | W, 0x1000, u64::MAX - 0xfff, 0x800, 0x1000);
        assert_eq!(
            check(ENTRY, &[text(), bad]).unwrap_err(),
            ElfError::AddressOverflow { index: 1 }
        );
    }

    #[test]
    fn not_user_address() {
        let low = load(R | W, 0x1000, 0, 0x800, 0x1000);
        assert_eq!(
            check(ENTRY, &[text(), low]).unwrap_err(),
            ElfError::NotUserAddress { index: 1 }
        );
        let high = load(R | W, 0x1000, LIMITS.user_limit - 0x1000, 0x800, 0x1001);
        assert_eq!(
            check(ENTRY, &[text(), high]).unwrap_err(),
            ElfError::NotUserAddress { index: 1 }
        );
        // Ending exactly at the limit and starting exactly at the minimum are fine.
        let top = load(R | W, 0x1000, LIMITS.user_limit - 0x1000, 0x800, 0x1000);
        let bottom = load(R, 0x1000, LIMITS.min_vaddr, 0x10, 0x10);
        let image = check(ENTRY, &[text(), top, bottom]).expect("boundaries are allowed");
        assert_eq!(image.segments().len(), 3);
    }

    #[test]
    fn overlap_in_pages() {
        // Byte ranges are disjoint, but both touch the page at TEXT + 0x1000.
        let long_text = load(R | X, 0, TEXT, 0x1100, 0x1100);
        let data = load(R | W, 0x1200, TEXT + 0x1200, 0x100, 0x100);
        assert_eq!(
            check(ENTRY, &[long_text, data]).unwrap_err(),
            ElfError::Overlap {
                first: 0,
                second: 1
            }
        );
        // Full byte overlap, later segment first in memory.
        let ro = load(R, 0x2000, TEXT + 0x5000, 0x10, 0x10);
        let inside = load(R, 0x2000, TEXT - 0x1000, 0x10, 0x2000);
        assert_eq!(
            check(ENTRY, &[text(), ro, inside]).unwrap_err(),
            ElfError::Overlap {
                first: 0,
                second: 2
            }
        );
        // Adjacent pages do not overlap.
        let next = load(R | W, 0x1000, TEXT + 0x1000, 0x10, 0x10);
        assert!(check(ENTRY, &[text(), next]).is_ok());
    }

    #[test]
    fn empty_segment_overlaps_nothing() {
        let empty = load(R, 0, TEXT + 0x10, 0, 0);
        let image = check(ENTRY, &[text(), empty]).expect("empty segment is harmless");
        assert_eq!(image.segments().len(), 2);
        assert_eq!(
            image.segment_at(TEXT + 0x10).map(|s| s.mem_size),
            Some(0x1000)
        );
    }

    #[test]
    fn writable_and_executable() {
        let rwx = load(R | W | X, 0x1000, DATA, 0x800, 0x3000);
        assert_eq!(
            check(ENTRY, &[text(), rwx]).unwrap_err(),
            ElfError::WritableAndExecutable { index: 1 }
        );
    }

    #[test]
    fn no_loadable_segments() {
        assert_eq!(check(ENTRY, &[]).unwrap_err(), ElfError::NoLoadableSegments);
        let note = Ph {
            kind: PT_NOTE,
            ..text()
        };
        assert_eq!(
            check(ENTRY, &[note, note]).unwrap_err(),
            ElfError::NoLoadableSegments
        );
    }

    #[test]
    fn non_load_headers_are_ignored_and_not_counted() {
        // A GNU_STACK header with absurd values must not be validated as a segment.
        let stack = Ph {
            kind: PT_GNU_STACK,
            flags: R | W | X,
            offset: u64::MAX,
            vaddr: u64::MAX,
            file_size: u64::MAX,
            mem_size: 0,
        };
        let image = check(ENTRY, &[stack, text(), stack, data()]).expect("valid");
        assert_eq!(image.segments().len(), 2);
        assert_eq!(image.segments()[1].vaddr, DATA);
    }

    fn many(n: usize) -> Vec<Ph> {
        (0..n)
            .map(|i| load(R | X, 0, TEXT + 0x1000 * i as u64, 0x100, 0x100))
            .collect()
    }

    #[test]
    fn too_many_segments() {
        let image = check(ENTRY, &many(MAX_SEGMENTS)).expect("exactly MAX_SEGMENTS is fine");
        assert_eq!(image.segments().len(), MAX_SEGMENTS);
        assert_eq!(
            check(ENTRY, &many(MAX_SEGMENTS + 1)).unwrap_err(),
            ElfError::TooManySegments
        );
        assert_eq!(
            check(ENTRY, &many(100)).unwrap_err(),
            ElfError::TooManySegments
        );
    }

    #[test]
    fn entry_outside_segments() {
        // Entry in no segment at all.
        assert_eq!(
            check(0x10_0000, &[text(), data()]).unwrap_err(),
            ElfError::EntryOutsideSegments
        );
        // Just past the end of text, with data placed a page further away.
        assert_eq!(
            check(
                TEXT + 0x1000,
                &[text(), load(R | W, 0x1000, DATA + 0x1000, 1, 1)]
            )
            .unwrap_err(),
            ElfError::EntryOutsideSegments
        );
        // Entry in a non-executable segment.
        assert_eq!(
            check(DATA + 4, &[text(), data()]).unwrap_err(),
            ElfError::EntryOutsideSegments
        );
    }

    #[test]
    fn unaligned_input_is_accepted() {
        let image = valid();
        let mut buf = vec![0u8; image.len() + 8];
        for shift in 1..8 {
            buf[shift..shift + image.len()].copy_from_slice(&image);
            let slice = &buf[shift..shift + image.len()];
            let parsed = parse(slice, LIMITS).expect("alignment must not matter");
            assert_eq!(parsed.segments().len(), 2);
        }
    }

    #[test]
    fn real_host_binary_is_not_exec() {
        // The test binary is a PIE (ET_DYN) on the host: the header is parsed,
        // and rejected for its type, without panicking.
        let path = std::env::current_exe().expect("current_exe");
        let bytes = std::fs::read(path).expect("read test binary");
        assert_eq!(parse(&bytes, LIMITS).unwrap_err(), ElfError::NotExecutable);

        // With its type patched to ET_EXEC it goes through the full segment
        // validation; whatever the verdict, it must not panic.
        let mut patched = bytes;
        put(&mut patched, 16, &2u16.to_le_bytes());
        let _ = parse(&patched, LIMITS);
        let everything = Limits {
            min_vaddr: 0,
            user_limit: u64::MAX,
        };
        let _ = parse(&patched, everything);
    }

    #[test]
    fn truncation_and_byte_flips_never_panic() {
        let image = valid();
        for len in 0..=image.len() {
            let result = parse(&image[..len], LIMITS);
            if len < EHDR_SIZE {
                assert_eq!(result.unwrap_err(), ElfError::TooShort);
            }
        }
        let headers = EHDR_SIZE + 2 * PHDR_SIZE;
        for at in 0..headers {
            for mask in [0x01u8, 0x02, 0x10, 0x40, 0x80, 0xff] {
                let mut b = image.clone();
                b[at] ^= mask;
                let _ = parse(&b, LIMITS);
                let _ = parse(&b[..b.len() / 2], LIMITS);
            }
        }
        // Deterministic pseudo-random multi-byte corruption of the headers.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut b = image.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % headers as u64) as usize;
                b[at] = (state >> 32) as u8;
            }
            let _ = parse(&b, LIMITS);
        }
    }

    #[test]
    fn error_messages_are_distinct_and_nonempty() {
        let errors = [
            ElfError::TooShort,
            ElfError::BadMagic,
            ElfError::NotElf64,
            ElfError::NotLittleEndian,
            ElfError::NotX86_64,
            ElfError::NotExecutable,
            ElfError::Malformed("xyz"),
            ElfError::SegmentOutOfFile { index: 3 },
            ElfError::FileSizeExceedsMemSize { index: 3 },
            ElfError::AddressOverflow { index: 3 },
            ElfError::NotUserAddress { index: 3 },
            ElfError::Overlap {
                first: 1,
                second: 2,
            },
            ElfError::NoLoadableSegments,
            ElfError::TooManySegments,
            ElfError::EntryOutsideSegments,
            ElfError::WritableAndExecutable { index: 3 },
        ];
        let messages: Vec<String> = errors.iter().map(|e| format!("{e}")).collect();
        for (i, m) in messages.iter().enumerate() {
            assert!(!m.is_empty());
            assert!(
                messages[..i].iter().all(|other| other != m),
                "duplicate {m}"
            );
        }
        assert!(messages[6].contains("xyz"));
        assert!(messages[7].contains('3'));
        assert!(messages[11].contains('1') && messages[11].contains('2'));
    }
}
