//! The decompressed kernel (`vmlinux`, the ELF image a bzImage carries compressed) for a
//! direct boot: the VMM copies its loadable segments to their physical addresses and enters
//! it at its ELF entry (`startup_64`) with the same zero page, command line and initramfs it
//! would give the bzImage, as Firecracker boots an uncompressed kernel. The guest then skips
//! its own decompression, the largest single step of its boot under emulation.
//!
//! The segments must lie where the bzImage's boot plan puts the kernel
//! ([`crate::boot::BootLayout::kernel`] and the bzImage's footprint), so the rest of the plan
//! (zero page, command line, initramfs, memory map) holds unchanged: [`Vmlinux::check_placement`].
//!
//! Everything in the file is untrusted: every offset and size is bounds-checked, and
//! [`parse`] never panics.

use alloc::vec::Vec;
use core::fmt;

/// The most loadable segments accepted (Linux has three or four).
pub const MAX_SEGMENTS: usize = 8;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// One loadable segment: `bytes` go to guest-physical `address`, followed by zeros up to
/// `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// The guest-physical address of its first byte (the ELF's `p_paddr`).
    pub address: u64,
    /// Its data in the file.
    pub bytes: &'a [u8],
    /// Its size in memory (at least `bytes.len()`).
    pub size: u64,
    /// Whether it holds code (`PF_X`).
    pub executable: bool,
}

impl Segment<'_> {
    fn end(&self) -> u64 {
        // parse() checked that this does not overflow.
        self.address + self.size
    }
}

/// A checked vmlinux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmlinux<'a> {
    /// The physical entry point (`startup_64`), inside an executable segment.
    pub entry: u64,
    /// The loadable segments, in file order.
    pub segments: Vec<Segment<'a>>,
}

/// Why a vmlinux was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmlinuxError {
    /// Not a little-endian ELF64 executable for x86-64.
    NotElf(&'static str),
    /// The program header table is outside the file or malformed.
    BadProgramHeaders,
    /// No loadable segment, or more than [`MAX_SEGMENTS`].
    SegmentCount(usize),
    /// Segment `index` (counting loadable ones) has data outside the file, more data than
    /// memory size, or an address range that overflows.
    BadSegment(usize),
    /// Two segments overlap.
    Overlap,
    /// The entry point is in no executable segment.
    BadEntry(u64),
    /// A segment lies outside the kernel's place in the boot plan.
    OutsidePlan {
        /// The segment's first byte.
        address: u64,
        /// Its end (exclusive).
        end: u64,
    },
}

impl fmt::Display for VmlinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmlinuxError::NotElf(why) => write!(f, "not an x86-64 ELF executable: {why}"),
            VmlinuxError::BadProgramHeaders => write!(f, "malformed program header table"),
            VmlinuxError::SegmentCount(n) => {
                write!(f, "{n} loadable segments (1 to {MAX_SEGMENTS} accepted)")
            }
            VmlinuxError::BadSegment(i) => write!(f, "loadable segment {i} is malformed"),
            VmlinuxError::Overlap => write!(f, "loadable segments overlap"),
            VmlinuxError::BadEntry(e) => {
                write!(f, "entry point {e:#x} is in no executable segment")
            }
            VmlinuxError::OutsidePlan { address, end } => write!(
                f,
                "segment {address:#x}..{end:#x} lies outside the kernel's place in guest RAM"
            ),
        }
    }
}

fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    bytes_at(b, at).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    bytes_at(b, at).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    bytes_at(b, at).map(u64::from_le_bytes)
}

/// Check `file` as a vmlinux: ELF64, little endian, x86-64, `ET_EXEC`, 1 to
/// [`MAX_SEGMENTS`] loadable segments with their data inside the file and non-overlapping
/// physical ranges, and the entry in an executable one. Trailing data (the relocations a
/// bzImage appends) is ignored.
pub fn parse(file: &[u8]) -> Result<Vmlinux<'_>, VmlinuxError> {
    let header: [u8; EHDR_SIZE] = bytes_at(file, 0).ok_or(VmlinuxError::NotElf("too short"))?;
    if header[..4] != *b"\x7fELF" {
        return Err(VmlinuxError::NotElf("no ELF magic"));
    }
    if header[4] != 2 || header[5] != 1 {
        return Err(VmlinuxError::NotElf("not 64-bit little endian"));
    }
    let h = &header[..];
    if u16_at(h, 18) != Some(EM_X86_64) {
        return Err(VmlinuxError::NotElf("not for x86-64"));
    }
    if u16_at(h, 16) != Some(ET_EXEC) {
        return Err(VmlinuxError::NotElf("not an executable"));
    }
    let bad = VmlinuxError::BadProgramHeaders;
    let entry = u64_at(h, 24).ok_or(bad)?;
    let table = usize::try_from(u64_at(h, 32).ok_or(bad)?).map_err(|_| bad)?;
    let entry_size = usize::from(u16_at(h, 54).ok_or(bad)?);
    let count = usize::from(u16_at(h, 56).ok_or(bad)?);
    if entry_size != PHDR_SIZE {
        return Err(bad);
    }
    let end = count
        .checked_mul(PHDR_SIZE)
        .and_then(|n| n.checked_add(table))
        .ok_or(bad)?;
    if end > file.len() {
        return Err(bad);
    }
    let mut segments: Vec<Segment<'_>> = Vec::new();
    for k in 0..count {
        let at = table + k * PHDR_SIZE;
        if u32_at(file, at) != Some(PT_LOAD) {
            continue;
        }
        let index = segments.len();
        if index == MAX_SEGMENTS {
            return Err(VmlinuxError::SegmentCount(MAX_SEGMENTS + 1));
        }
        let field = |offset: usize| u64_at(file, at + offset).ok_or(bad);
        let (flags, offset, address, file_size, size) = (
            u32_at(file, at + 4).ok_or(bad)?,
            field(8)?,
            field(24)?,
            field(32)?,
            field(40)?,
        );
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(file_size).ok())
            .and_then(|(o, n)| file.get(o..o.checked_add(n)?))
            .ok_or(VmlinuxError::BadSegment(index))?;
        if file_size > size || address.checked_add(size).is_none() {
            return Err(VmlinuxError::BadSegment(index));
        }
        segments.push(Segment {
            address,
            bytes: data,
            size,
            executable: flags & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err(VmlinuxError::SegmentCount(0));
    }
    let mut sorted: Vec<(u64, u64)> = segments.iter().map(|s| (s.address, s.end())).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(VmlinuxError::Overlap);
    }
    if !segments
        .iter()
        .any(|s| s.executable && s.address <= entry && entry < s.end())
    {
        return Err(VmlinuxError::BadEntry(entry));
    }
    Ok(Vmlinux { entry, segments })
}

impl Vmlinux<'_> {
    /// Check that every segment lies in `kernel..kernel + footprint` (the bzImage's place in
    /// the boot plan).
    pub fn check_placement(&self, kernel: u64, footprint: u64) -> Result<(), VmlinuxError> {
        let limit = kernel.saturating_add(footprint);
        match self
            .segments
            .iter()
            .find(|s| s.address < kernel || s.end() > limit)
        {
            Some(s) => Err(VmlinuxError::OutsidePlan {
                address: s.address,
                end: s.end(),
            }),
            None => Ok(()),
        }
    }

    /// Bytes of file data in all segments.
    pub fn data_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.bytes.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec;

    /// An ELF64 executable with loadable segments (flags, offset, address, file size, memory
    /// size) and the given entry; the file is `length` bytes.
    fn elf(entry: u64, segments: &[(u32, u64, u64, u64, u64)], length: usize) -> Vec<u8> {
        let mut f = vec![0u8; length.max(EHDR_SIZE + PHDR_SIZE * segments.len())];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (k, &(flags, offset, address, file_size, size)) in segments.iter().enumerate() {
            let at = EHDR_SIZE + k * PHDR_SIZE;
            f[at..at + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            f[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&address.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&file_size.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        }
        f
    }

    const MB: u64 = 1 << 20;

    /// Code at 16 MiB (the entry), data with zero fill at 17 MiB.
    fn two_segments() -> Vec<u8> {
        elf(
            16 * MB,
            &[
                (5, 0x1000, 16 * MB, 0x800, 0x800),
                (6, 0x1800, 17 * MB, 0x100, 0x4000),
            ],
            0x2000,
        )
    }

    #[test]
    fn segments_and_entry() {
        let f = two_segments();
        let v = parse(&f).unwrap();
        assert_eq!(v.entry, 16 * MB);
        assert_eq!(v.segments.len(), 2);
        assert_eq!(v.segments[1].bytes.len(), 0x100);
        assert_eq!(v.segments[1].size, 0x4000);
        assert_eq!(v.data_bytes(), 0x900);
        assert_eq!(v.check_placement(16 * MB, 2 * MB), Ok(()));
        assert_eq!(
            v.check_placement(16 * MB, MB),
            Err(VmlinuxError::OutsidePlan {
                address: 17 * MB,
                end: 17 * MB + 0x4000
            })
        );
        assert!(v.check_placement(17 * MB, 4 * MB).is_err());
    }

    #[test]
    fn malformed_files_are_refused() {
        let good = elf(16 * MB, &[(5, 0x1000, 16 * MB, 0x800, 0x800)], 0x2000);
        assert!(parse(&good).is_ok());
        assert_eq!(parse(&good[..10]), Err(VmlinuxError::NotElf("too short")));
        let mut f = good.clone();
        f[0] = 0;
        assert!(matches!(parse(&f), Err(VmlinuxError::NotElf(_))));
        let mut f = good.clone();
        f[18] = 3;
        assert!(matches!(parse(&f), Err(VmlinuxError::NotElf(_))));
        let mut f = good.clone();
        f[16] = 3;
        assert!(matches!(parse(&f), Err(VmlinuxError::NotElf(_))));
        // Table past the end of the file, wrong entry size.
        let mut f = good.clone();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse(&f), Err(VmlinuxError::BadProgramHeaders));
        let mut f = good.clone();
        f[54] = 40;
        assert_eq!(parse(&f), Err(VmlinuxError::BadProgramHeaders));
        // Data outside the file, more data than memory, an overflowing range.
        let f = elf(16 * MB, &[(5, 0x1f00, 16 * MB, 0x800, 0x800)], 0x2000);
        assert_eq!(parse(&f), Err(VmlinuxError::BadSegment(0)));
        let f = elf(16 * MB, &[(5, 0x1000, 16 * MB, 0x800, 0x10)], 0x2000);
        assert_eq!(parse(&f), Err(VmlinuxError::BadSegment(0)));
        let f = elf(16 * MB, &[(5, 0x1000, u64::MAX - 4, 0x8, 0x10)], 0x2000);
        assert_eq!(parse(&f), Err(VmlinuxError::BadSegment(0)));
        // No loadable segment, overlap, entry outside executable segments.
        let f = elf(16 * MB, &[], 0x2000);
        assert_eq!(parse(&f), Err(VmlinuxError::SegmentCount(0)));
        let f = elf(
            16 * MB,
            &[
                (5, 0x1000, 16 * MB, 0x800, 0x800),
                (6, 0x1000, 16 * MB + 0x400, 0x10, 0x10),
            ],
            0x2000,
        );
        assert_eq!(parse(&f), Err(VmlinuxError::Overlap));
        let f = elf(
            17 * MB,
            &[
                (5, 0x1000, 16 * MB, 0x800, 0x800),
                (6, 0x1000, 17 * MB, 0x10, 0x10),
            ],
            0x2000,
        );
        assert_eq!(parse(&f), Err(VmlinuxError::BadEntry(17 * MB)));
        let many: Vec<_> = (0..9)
            .map(|k| (5, 0x1000, 16 * MB + k * MB, 0x10, 0x10))
            .collect();
        assert_eq!(
            parse(&elf(16 * MB, &many, 0x2000)),
            Err(VmlinuxError::SegmentCount(MAX_SEGMENTS + 1))
        );
    }

    /// Random bytes and random corruptions of a good file never panic.
    #[test]
    fn corrupt_files_never_panic() {
        let good = two_segments();
        let mut random = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        let mut state = 0;
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..4 {
                state = random();
                let at = (state as usize) % 0x200;
                f[at] = (state >> 32) as u8;
            }
            let cut = (state >> 40) as usize % (f.len() + 1);
            let _ = parse(&f);
            let _ = parse(&f[..cut]);
        }
    }

    /// The vmlinux that `scripts/build-linux.sh` extracts from the bzImage, if it is there.
    #[test]
    fn the_built_vmlinux_fits_its_bzimage() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux");
        let (Ok(elf), Ok(image)) = (
            std::fs::read(root.join("vmlinux")),
            std::fs::read(root.join("bzImage")),
        ) else {
            std::eprintln!("no target/linux/vmlinux and bzImage: skipped");
            return;
        };
        let v = parse(&elf).unwrap();
        let bz = crate::boot::BzImage::parse(&image).unwrap();
        v.check_placement(bz.load_address(), bz.footprint())
            .unwrap();
        assert_eq!(v.entry, bz.load_address());
    }
}
