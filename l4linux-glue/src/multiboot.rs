//! The Multiboot (version 1, spec 0.6.96) boot protocol as a VMM uses it to start a 32-bit
//! kernel the way QEMU's `-kernel` does: finding and checking the multiboot header, reading the
//! image's load plan (ELF32 `PT_LOAD` segments, or the header's own addresses when flag 16 is
//! set), and planning guest-physical memory: the kernel where it asks to be, the modules
//! page-aligned after it, then the boot information (the `multiboot_info` structure, the memory
//! map, the module list, the strings and a flat GDT) in one block the VMM copies into RAM.
//!
//! RAM starts at guest-physical 0. Every address and length in the image is untrusted: each is
//! checked against the file and against RAM before anything is planned, and a malformed image
//! is a [`MultibootError`] value.

use alloc::vec::Vec;
use core::fmt;

/// The header's `magic` field.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies, 4-byte aligned, within this many bytes from the start of the image.
pub const HEADER_SEARCH: usize = 8192;
/// Header flag 0: modules must be page (4 KiB) aligned (always done here).
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag 1: the kernel wants `mem_*` and the memory map (always given).
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag 2: the kernel would like a video mode (there is no display: ignored, as QEMU
/// does).
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag 16: the header's address fields say where to load the image (the "a.out
/// kludge"); otherwise the image must be ELF32.
pub const FLAG_ADDRESSES: u32 = 1 << 16;
/// Required-feature flags (0-15) this loader understands.
pub const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// `multiboot_info.flags` bits the loader sets.
pub mod info_flags {
    /// `mem_lower` and `mem_upper` are valid.
    pub const MEMORY: u32 = 1 << 0;
    /// `cmdline` is valid.
    pub const CMDLINE: u32 = 1 << 2;
    /// `mods_count` and `mods_addr` are valid.
    pub const MODULES: u32 = 1 << 3;
    /// `mmap_length` and `mmap_addr` are valid.
    pub const MEMORY_MAP: u32 = 1 << 6;
    /// `boot_loader_name` is valid.
    pub const LOADER_NAME: u32 = 1 << 9;
}

/// Offsets in `struct multiboot_info` (spec section 3.3).
pub mod offset {
    /// `flags`.
    pub const FLAGS: usize = 0;
    /// `mem_lower`, KiB of memory from 0.
    pub const MEM_LOWER: usize = 4;
    /// `mem_upper`, KiB of memory from 1 MiB.
    pub const MEM_UPPER: usize = 8;
    /// `cmdline`, the address of a NUL-terminated string.
    pub const CMDLINE: usize = 16;
    /// `mods_count`.
    pub const MODS_COUNT: usize = 20;
    /// `mods_addr`, the address of the first module entry.
    pub const MODS_ADDR: usize = 24;
    /// `mmap_length`, bytes of memory-map entries.
    pub const MMAP_LENGTH: usize = 44;
    /// `mmap_addr`, the address of the first entry's `size` field.
    pub const MMAP_ADDR: usize = 48;
    /// `boot_loader_name`, the address of a NUL-terminated string.
    pub const BOOT_LOADER_NAME: usize = 64;
}

/// Size of `struct multiboot_info` up to and including the VBE fields.
pub const INFO_SIZE: usize = 88;
/// Size of one module entry (`mod_start`, `mod_end`, `string`, reserved).
pub const MODULE_ENTRY_SIZE: usize = 16;
/// Size of one memory-map entry including its `size` field.
pub const MMAP_ENTRY_SIZE: usize = 24;
/// Page size for module alignment.
pub const PAGE: u64 = 4096;
/// RAM below this is conventional memory (`mem_lower`: 639 KiB; the last KiB is the EBDA).
pub const LOW_MEMORY_END: u64 = 0x9_fc00;
/// The legacy hole (EBDA, VGA, option ROMs, BIOS) ends here; extended memory starts.
pub const EXTENDED_MEMORY: u64 = 0x10_0000;
/// RAM must end below this (the IOAPIC page at 0xfec00000 and the local APIC above it).
pub const RAM_LIMIT: u64 = 0xfec0_0000;
/// The selectors of the GDT in the boot information: flat 4 GiB code and data.
pub const CODE_SELECTOR: u16 = 0x08;
/// Flat data selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// The boot loader's name in the boot information.
pub const LOADER_NAME: &str = "l4 vmm";

/// Memory-map entry type: usable RAM.
pub const MEMORY_AVAILABLE: u32 = 1;
/// Memory-map entry type: reserved.
pub const MEMORY_RESERVED: u32 = 2;

/// Why an image or a plan was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultibootError {
    /// No header magic at a 4-byte aligned offset within the first 8192 bytes.
    NoHeader,
    /// The header's magic, flags and checksum do not sum to 0.
    BadChecksum,
    /// The header asks for a required feature (flag bit 0-15) this loader does not know.
    UnsupportedFlags(u32),
    /// The header's address fields (flag 16) contradict each other or the file.
    BadAddressFields,
    /// Not an ELF32 little-endian i386 executable (and no flag 16 addresses).
    NotElf32,
    /// The ELF program headers lie outside the file or have the wrong size.
    BadProgramHeaders,
    /// A segment's file bytes lie outside the file, or it has more file than memory bytes.
    SegmentOutsideFile,
    /// A segment does not fit in guest RAM (or wraps around 4 GiB).
    SegmentOutsideRam,
    /// Two segments overlap.
    SegmentsOverlap,
    /// Nothing to load.
    NoSegments,
    /// The entry point is not inside a loaded segment.
    EntryOutsideImage,
    /// Guest RAM too small for the legacy layout, or reaching the APIC area.
    BadRamSize,
    /// The modules and the boot information do not fit in RAM after the kernel.
    NoRoomForBootInformation,
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MultibootError::NoHeader => {
                f.write_str("no multiboot header (magic 0x1badb002) in the first 8192 bytes")
            }
            MultibootError::BadChecksum => f.write_str("multiboot header checksum is wrong"),
            MultibootError::UnsupportedFlags(flags) => write!(
                f,
                "multiboot header requires unsupported features (flags {flags:#x})"
            ),
            MultibootError::BadAddressFields => {
                f.write_str("multiboot header address fields are inconsistent with the file")
            }
            MultibootError::NotElf32 => {
                f.write_str("not an ELF32 i386 executable (and the header gives no load addresses)")
            }
            MultibootError::BadProgramHeaders => {
                f.write_str("ELF program headers lie outside the file")
            }
            MultibootError::SegmentOutsideFile => {
                f.write_str("an ELF segment's contents lie outside the file")
            }
            MultibootError::SegmentOutsideRam => f.write_str("a segment does not fit in guest RAM"),
            MultibootError::SegmentsOverlap => f.write_str("two segments overlap"),
            MultibootError::NoSegments => f.write_str("the image has nothing to load"),
            MultibootError::EntryOutsideImage => {
                f.write_str("the entry point is outside the loaded image")
            }
            MultibootError::BadRamSize => {
                f.write_str("guest RAM must be at least 2 MiB and end below 0xfec00000")
            }
            MultibootError::NoRoomForBootInformation => {
                f.write_str("no room in guest RAM for the modules and the boot information")
            }
        }
    }
}

/// The multiboot header as found in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the file.
    pub offset: usize,
    /// `flags`.
    pub flags: u32,
    /// `header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr`, `entry_addr` (flag 16).
    pub addresses: Option<[u32; 5]>,
}

/// One piece of the image to place in RAM: `file_size` bytes from `file_offset` at
/// guest-physical `address`, then zeros up to `memory_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset in the image file.
    pub file_offset: usize,
    /// Bytes taken from the file.
    pub file_size: usize,
    /// Guest-physical load address.
    pub address: u32,
    /// Bytes in memory (at least `file_size`; the rest is zero).
    pub memory_size: u32,
}

impl Segment {
    fn end(&self) -> u64 {
        u64::from(self.address) + u64::from(self.memory_size)
    }
}

/// A checked multiboot kernel: what to load where, and where to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The header.
    pub header: Header,
    /// The pieces to load, by address.
    pub segments: Vec<Segment>,
    /// The guest-physical entry point.
    pub entry: u32,
}

impl Kernel {
    /// The end of the highest segment (exclusive).
    pub fn end(&self) -> u64 {
        self.segments.iter().map(Segment::end).max().unwrap_or(0)
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Find and check the multiboot header.
pub fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let search = image.len().min(HEADER_SEARCH);
    let offset = (0..search.saturating_sub(11))
        .step_by(4)
        .find(|&at| u32_at(image, at) == Some(HEADER_MAGIC))
        .ok_or(MultibootError::NoHeader)?;
    let flags = u32_at(image, offset + 4).ok_or(MultibootError::NoHeader)?;
    let checksum = u32_at(image, offset + 8).ok_or(MultibootError::NoHeader)?;
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(MultibootError::BadChecksum);
    }
    let unknown = flags & 0xffff & !KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags(flags));
    }
    let addresses = if flags & FLAG_ADDRESSES != 0 {
        let mut fields = [0u32; 5];
        for (i, field) in fields.iter_mut().enumerate() {
            // The address fields must lie in the first 8192 bytes as well.
            let at = offset + 12 + 4 * i;
            if at + 4 > HEADER_SEARCH {
                return Err(MultibootError::BadAddressFields);
            }
            *field = u32_at(image, at).ok_or(MultibootError::BadAddressFields)?;
        }
        Some(fields)
    } else {
        None
    };
    Ok(Header {
        offset,
        flags,
        addresses,
    })
}

/// Check a kernel image against `ram_size` bytes of RAM at 0 and say how to load it.
pub fn parse(image: &[u8], ram_size: u64) -> Result<Kernel, MultibootError> {
    check_ram(ram_size)?;
    let header = find_header(image)?;
    let (mut segments, entry) = match header.addresses {
        Some(fields) => address_fields(image, &header, fields)?,
        None => elf32_segments(image)?,
    };
    segments.retain(|s| s.memory_size > 0);
    if segments.is_empty() {
        return Err(MultibootError::NoSegments);
    }
    segments.sort_by_key(|s| s.address);
    for s in &segments {
        if s.end() > ram_size {
            return Err(MultibootError::SegmentOutsideRam);
        }
    }
    if segments
        .windows(2)
        .any(|pair| pair[0].end() > u64::from(pair[1].address))
    {
        return Err(MultibootError::SegmentsOverlap);
    }
    if !segments
        .iter()
        .any(|s| (u64::from(s.address)..s.end()).contains(&u64::from(entry)))
    {
        return Err(MultibootError::EntryOutsideImage);
    }
    Ok(Kernel {
        header,
        segments,
        entry,
    })
}

fn check_ram(ram_size: u64) -> Result<(), MultibootError> {
    if !(2 * EXTENDED_MEMORY..=RAM_LIMIT).contains(&ram_size) {
        return Err(MultibootError::BadRamSize);
    }
    Ok(())
}

/// Flag 16: the file from `header_addr - load_addr` bytes before the header is loaded at
/// `load_addr` up to `load_end_addr` (0: the end of the file), zeros up to `bss_end_addr`
/// (0: none).
fn address_fields(
    image: &[u8],
    header: &Header,
    [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr]: [u32; 5],
) -> Result<(Vec<Segment>, u32), MultibootError> {
    let bad = MultibootError::BadAddressFields;
    let before_header = header_addr.checked_sub(load_addr).ok_or(bad)? as usize;
    let file_offset = header.offset.checked_sub(before_header).ok_or(bad)?;
    let file_size = if load_end_addr == 0 {
        image.len() - file_offset
    } else {
        load_end_addr.checked_sub(load_addr).ok_or(bad)? as usize
    };
    if file_offset + file_size > image.len() || file_size == 0 {
        return Err(bad);
    }
    let file_end = u64::from(load_addr) + file_size as u64;
    let memory_end = if bss_end_addr == 0 {
        file_end
    } else if u64::from(bss_end_addr) < file_end {
        return Err(bad);
    } else {
        u64::from(bss_end_addr)
    };
    let memory_size = u32::try_from(memory_end - u64::from(load_addr))
        .map_err(|_| MultibootError::SegmentOutsideRam)?;
    Ok((
        alloc::vec![Segment {
            file_offset,
            file_size,
            address: load_addr,
            memory_size,
        }],
        entry_addr,
    ))
}

/// ELF32 header fields (System V ABI, i386 supplement).
mod elf {
    pub const CLASS32: u8 = 1;
    pub const LITTLE_ENDIAN: u8 = 1;
    pub const EXECUTABLE: u16 = 2;
    pub const I386: u16 = 3;
    pub const PT_LOAD: u32 = 1;
    pub const HEADER_SIZE: usize = 52;
    pub const PROGRAM_HEADER_SIZE: usize = 32;
    pub const ENTRY: usize = 24;
    pub const PHOFF: usize = 28;
    pub const PHENTSIZE: usize = 42;
    pub const PHNUM: usize = 44;
}

/// The `PT_LOAD` segments at their physical addresses. The entry point, if it lies in a
/// segment's virtual range, is moved to the same place in its physical range (for kernels
/// linked high and loaded low, as QEMU does).
fn elf32_segments(image: &[u8]) -> Result<(Vec<Segment>, u32), MultibootError> {
    let not_elf = MultibootError::NotElf32;
    if image.len() < elf::HEADER_SIZE
        || image[..4] != *b"\x7fELF"
        || image[4] != elf::CLASS32
        || image[5] != elf::LITTLE_ENDIAN
        || u16_at(image, 16) != Some(elf::EXECUTABLE)
        || u16_at(image, 18) != Some(elf::I386)
    {
        return Err(not_elf);
    }
    let entry = u32_at(image, elf::ENTRY).ok_or(not_elf)?;
    let phoff = u32_at(image, elf::PHOFF).ok_or(not_elf)? as usize;
    let phentsize = u16_at(image, elf::PHENTSIZE).ok_or(not_elf)? as usize;
    let phnum = u16_at(image, elf::PHNUM).ok_or(not_elf)? as usize;
    let bad_headers = MultibootError::BadProgramHeaders;
    if phentsize < elf::PROGRAM_HEADER_SIZE
        || phoff
            .checked_add(phentsize * phnum)
            .is_none_or(|end| end > image.len())
    {
        return Err(bad_headers);
    }
    let mut segments = Vec::new();
    let mut physical_entry = entry;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let field = |n: usize| u32_at(image, at + 4 * n).ok_or(bad_headers);
        if field(0)? != elf::PT_LOAD {
            continue;
        }
        let (offset, vaddr, paddr, file_size, memory_size) =
            (field(1)?, field(2)?, field(3)?, field(4)?, field(5)?);
        if file_size > memory_size || u64::from(offset) + u64::from(file_size) > image.len() as u64
        {
            return Err(MultibootError::SegmentOutsideFile);
        }
        if u64::from(paddr) + u64::from(memory_size) > 1 << 32 {
            return Err(MultibootError::SegmentOutsideRam);
        }
        if vaddr != paddr && entry.wrapping_sub(vaddr) < memory_size {
            physical_entry = paddr + (entry - vaddr);
        }
        segments.push(Segment {
            file_offset: offset as usize,
            file_size: file_size as usize,
            address: paddr,
            memory_size,
        });
    }
    Ok((segments, physical_entry))
}

/// A module to load: its contents and its string (the module's "command line").
#[derive(Debug, Clone, Copy)]
pub struct ModuleInput<'a> {
    /// The bytes.
    pub contents: &'a [u8],
    /// The string the kernel sees for it.
    pub string: &'a str,
}

/// Where everything goes, and the boot information to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Guest-physical address of each module, in the order given.
    pub modules: Vec<u32>,
    /// Guest-physical address of [`Plan::block`]: the `multiboot_info` structure comes first
    /// (EBX at entry).
    pub info: u32,
    /// The boot information block: the structure, the memory map, the module entries, the
    /// strings and the GDT.
    pub block: Vec<u8>,
    /// Guest-physical address of the GDT (3 descriptors: null, flat code, flat data).
    pub gdt: u32,
    /// Its limit (size - 1).
    pub gdt_limit: u16,
}

/// The memory map for `ram_size` bytes of RAM at 0: conventional memory, the reserved legacy
/// hole, extended memory. Entries are (base, length, type).
pub fn memory_map(ram_size: u64) -> [(u64, u64, u32); 3] {
    [
        (0, LOW_MEMORY_END, MEMORY_AVAILABLE),
        (
            LOW_MEMORY_END,
            EXTENDED_MEMORY - LOW_MEMORY_END,
            MEMORY_RESERVED,
        ),
        (
            EXTENDED_MEMORY,
            ram_size - EXTENDED_MEMORY,
            MEMORY_AVAILABLE,
        ),
    ]
}

/// Plan the modules and the boot information for `kernel` in `ram_size` bytes of RAM: the
/// modules page-aligned after the kernel, the block page-aligned after them.
pub fn plan(
    kernel: &Kernel,
    ram_size: u64,
    cmdline: &str,
    modules: &[ModuleInput<'_>],
) -> Result<Plan, MultibootError> {
    check_ram(ram_size)?;
    let no_room = MultibootError::NoRoomForBootInformation;
    let mut next = kernel.end().max(EXTENDED_MEMORY).next_multiple_of(PAGE);
    let mut addresses = Vec::with_capacity(modules.len());
    for module in modules {
        addresses.push(next);
        next = (next + module.contents.len() as u64).next_multiple_of(PAGE);
        if next > ram_size {
            return Err(no_room);
        }
    }
    let info = next;
    let map = memory_map(ram_size);
    let mmap_at = INFO_SIZE;
    let modules_at = mmap_at + map.len() * MMAP_ENTRY_SIZE;
    let strings_at = modules_at + modules.len() * MODULE_ENTRY_SIZE;
    let mut block = alloc::vec![0u8; strings_at];
    let mut strings = Vec::new();
    let mut add_string = |text: &str| {
        let at = info + (strings_at + strings.len()) as u64;
        strings.extend_from_slice(text.as_bytes());
        strings.push(0);
        at
    };
    let cmdline_address = add_string(cmdline);
    let loader_address = add_string(LOADER_NAME);
    let module_strings: Vec<u64> = modules.iter().map(|m| add_string(m.string)).collect();
    block.extend_from_slice(&strings);
    let gdt_at = block.len().next_multiple_of(8);
    block.resize(gdt_at, 0);
    for descriptor in [0u64, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff] {
        block.extend_from_slice(&descriptor.to_le_bytes());
    }
    if info + block.len() as u64 > ram_size {
        return Err(no_room);
    }
    // Every address is below `ram_size` <= RAM_LIMIT, so each fits in 32 bits.
    let put = |block: &mut Vec<u8>, at: usize, value: u64| {
        block[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
    };
    put(
        &mut block,
        offset::FLAGS,
        u64::from(
            info_flags::MEMORY
                | info_flags::CMDLINE
                | info_flags::MODULES
                | info_flags::MEMORY_MAP
                | info_flags::LOADER_NAME,
        ),
    );
    put(&mut block, offset::MEM_LOWER, LOW_MEMORY_END >> 10);
    put(
        &mut block,
        offset::MEM_UPPER,
        (ram_size - EXTENDED_MEMORY) >> 10,
    );
    put(&mut block, offset::CMDLINE, cmdline_address);
    put(&mut block, offset::MODS_COUNT, modules.len() as u64);
    put(&mut block, offset::MODS_ADDR, info + modules_at as u64);
    put(
        &mut block,
        offset::MMAP_LENGTH,
        (map.len() * MMAP_ENTRY_SIZE) as u64,
    );
    put(&mut block, offset::MMAP_ADDR, info + mmap_at as u64);
    put(&mut block, offset::BOOT_LOADER_NAME, loader_address);
    for (i, (base, length, kind)) in map.iter().enumerate() {
        let at = mmap_at + i * MMAP_ENTRY_SIZE;
        put(&mut block, at, (MMAP_ENTRY_SIZE - 4) as u64);
        block[at + 4..at + 12].copy_from_slice(&base.to_le_bytes());
        block[at + 12..at + 20].copy_from_slice(&length.to_le_bytes());
        put(&mut block, at + 20, u64::from(*kind));
    }
    for (i, module) in modules.iter().enumerate() {
        let at = modules_at + i * MODULE_ENTRY_SIZE;
        put(&mut block, at, addresses[i]);
        put(
            &mut block,
            at + 4,
            addresses[i] + module.contents.len() as u64,
        );
        put(&mut block, at + 8, module_strings[i]);
    }
    Ok(Plan {
        modules: addresses.iter().map(|&a| a as u32).collect(),
        info: info as u32,
        gdt: (info + gdt_at as u64) as u32,
        gdt_limit: 23,
        block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const RAM: u64 = 32 << 20;

    fn header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for word in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        ] {
            h.extend_from_slice(&word.to_le_bytes());
        }
        h
    }

    /// An ELF32 executable with one PT_LOAD per (vaddr, paddr, filesz, memsz), the multiboot
    /// header at offset 0x1000 (inside the first segment's file bytes), entry `entry`.
    fn elf32(entry: u32, segments: &[(u32, u32, u32, u32)], flags: u32) -> Vec<u8> {
        let mut image = vec![0u8; 0x1000];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4] = 1;
        image[5] = 1;
        image[6] = 1;
        image[16..18].copy_from_slice(&2u16.to_le_bytes());
        image[18..20].copy_from_slice(&3u16.to_le_bytes());
        image[24..28].copy_from_slice(&entry.to_le_bytes());
        image[28..32].copy_from_slice(&52u32.to_le_bytes());
        image[42..44].copy_from_slice(&32u16.to_le_bytes());
        image[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut file_offset = 0x1000u32;
        for (i, &(vaddr, paddr, filesz, memsz)) in segments.iter().enumerate() {
            let at = 52 + 32 * i;
            for (n, value) in [1, file_offset, vaddr, paddr, filesz, memsz, 7, 0x1000]
                .into_iter()
                .enumerate()
            {
                image[at + 4 * n..at + 4 * n + 4].copy_from_slice(&value.to_le_bytes());
            }
            file_offset += filesz;
        }
        image.resize((file_offset as usize).max(0x1010), 0x90);
        image[0x1000..0x100c].copy_from_slice(&header(flags));
        image
    }

    #[test]
    fn loads_an_elf32_kernel() {
        let image = elf32(0x10_0010, &[(0x10_0000, 0x10_0000, 0x100, 0x2000)], 3);
        let kernel = parse(&image, RAM).unwrap();
        assert_eq!(kernel.header.offset, 0x1000);
        assert_eq!(kernel.entry, 0x10_0010);
        assert_eq!(
            kernel.segments,
            vec![Segment {
                file_offset: 0x1000,
                file_size: 0x100,
                address: 0x10_0000,
                memory_size: 0x2000,
            }]
        );
        assert_eq!(kernel.end(), 0x10_2000);
    }

    #[test]
    fn a_higher_half_entry_moves_to_its_physical_address() {
        let image = elf32(0xc010_0020, &[(0xc010_0000, 0x10_0000, 0x100, 0x100)], 0);
        assert_eq!(parse(&image, RAM).unwrap().entry, 0x10_0020);
    }

    #[test]
    fn header_problems_are_refused() {
        let mut image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x100)], 0);
        // Bad checksum.
        image[0x1008] ^= 1;
        assert_eq!(parse(&image, RAM), Err(MultibootError::BadChecksum));
        // An unknown required flag.
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x100)], 1 << 5);
        assert_eq!(
            parse(&image, RAM),
            Err(MultibootError::UnsupportedFlags(1 << 5))
        );
        // Optional flags (16-31 except 16) and video mode are fine.
        let image = elf32(
            0x10_0000,
            &[(0x10_0000, 0x10_0000, 0x100, 0x100)],
            1 << 20 | 4,
        );
        assert!(parse(&image, RAM).is_ok());
        // Text, an empty file, a header beyond 8192 bytes, a misaligned header.
        assert_eq!(
            parse(b"this is not a kernel", RAM),
            Err(MultibootError::NoHeader)
        );
        assert_eq!(parse(&[], RAM), Err(MultibootError::NoHeader));
        let mut late = vec![0u8; 8192];
        late.extend_from_slice(&header(0));
        assert_eq!(parse(&late, RAM), Err(MultibootError::NoHeader));
        let mut misaligned = vec![0u8; 2];
        misaligned.extend_from_slice(&header(0));
        assert_eq!(parse(&misaligned, RAM), Err(MultibootError::NoHeader));
        // A header cut short by the end of the file.
        assert_eq!(
            parse(&HEADER_MAGIC.to_le_bytes(), RAM),
            Err(MultibootError::NoHeader)
        );
        // A header without ELF and without addresses.
        assert_eq!(parse(&header(0), RAM), Err(MultibootError::NotElf32));
    }

    #[test]
    fn hostile_elf_images_are_refused() {
        let good = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x100)], 0);
        // 64-bit class, big endian, not executable, not i386.
        for (at, value) in [(4, 2u8), (5, 2), (16, 3), (18, 0x3e)] {
            let mut image = good.clone();
            image[at] = value;
            assert_eq!(parse(&image, RAM), Err(MultibootError::NotElf32), "{at}");
        }
        // Program headers beyond the end, or too small.
        let mut image = good.clone();
        image[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert_eq!(parse(&image, RAM), Err(MultibootError::BadProgramHeaders));
        let mut image = good.clone();
        image[42..44].copy_from_slice(&8u16.to_le_bytes());
        assert_eq!(parse(&image, RAM), Err(MultibootError::BadProgramHeaders));
        let mut image = good.clone();
        image[44..46].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(parse(&image, RAM), Err(MultibootError::BadProgramHeaders));
        // File bytes beyond the file; more file than memory bytes.
        let mut image = good.clone();
        image[52 + 4..52 + 8].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        assert_eq!(parse(&image, RAM), Err(MultibootError::SegmentOutsideFile));
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x80)], 0);
        assert_eq!(parse(&image, RAM), Err(MultibootError::SegmentOutsideFile));
        // Outside RAM, wrapping 4 GiB, overlapping, nothing to load, entry elsewhere.
        let image = elf32(RAM as u32, &[(RAM as u32, RAM as u32, 0x100, 0x100)], 0);
        assert_eq!(parse(&image, RAM), Err(MultibootError::SegmentOutsideRam));
        let image = elf32(
            0xffff_f000,
            &[(0xffff_f000, 0xffff_f000, 0x100, 0x10_0000)],
            0,
        );
        assert_eq!(parse(&image, RAM), Err(MultibootError::SegmentOutsideRam));
        let image = elf32(
            0x10_0000,
            &[
                (0x10_0000, 0x10_0000, 0x100, 0x2000),
                (0x10_1000, 0x10_1000, 0x100, 0x100),
            ],
            0,
        );
        assert_eq!(parse(&image, RAM), Err(MultibootError::SegmentsOverlap));
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0, 0)], 0);
        assert_eq!(parse(&image, RAM), Err(MultibootError::NoSegments));
        let image = elf32(0x20_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x100)], 0);
        assert_eq!(parse(&image, RAM), Err(MultibootError::EntryOutsideImage));
        // RAM sizes the layout cannot take.
        assert_eq!(parse(&good, 1 << 20), Err(MultibootError::BadRamSize));
        assert_eq!(parse(&good, 4 << 30), Err(MultibootError::BadRamSize));
    }

    /// A flat image with the header at offset 0x40 and flag 16 addresses.
    fn flat(fields: [u32; 5], length: usize) -> Vec<u8> {
        let mut image = vec![0xf4u8; length];
        image[0x40..0x4c].copy_from_slice(&header(FLAG_ADDRESSES));
        for (i, f) in fields.iter().enumerate() {
            image[0x4c + 4 * i..0x50 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        image
    }

    #[test]
    fn header_addresses_load_a_flat_image() {
        let image = flat([0x10_0040, 0x10_0000, 0, 0x10_4000, 0x10_0080], 0x1000);
        let kernel = parse(&image, RAM).unwrap();
        assert_eq!(kernel.entry, 0x10_0080);
        assert_eq!(
            kernel.segments,
            vec![Segment {
                file_offset: 0,
                file_size: 0x1000,
                address: 0x10_0000,
                memory_size: 0x4000,
            }]
        );
        // Load from the header on: the file before it is skipped.
        let image = flat([0x10_0000, 0x10_0000, 0x10_0800, 0, 0x10_0000], 0x1000);
        let kernel = parse(&image, RAM).unwrap();
        assert_eq!(kernel.segments[0].file_offset, 0x40);
        assert_eq!(kernel.segments[0].file_size, 0x800);
        // Inconsistent: header_addr below load_addr, load before the file, load end beyond
        // it, bss end below the load end, entry outside.
        for fields in [
            [0x0f_ffff, 0x10_0000, 0, 0, 0x10_0000],
            [0x10_1000, 0x10_0000, 0, 0, 0x10_0000],
            [0x10_0040, 0x10_0000, 0x10_2000, 0, 0x10_0000],
            [0x10_0040, 0x10_0000, 0x10_0800, 0x10_0400, 0x10_0000],
            [0x10_0040, 0x10_0000, 0x10_0000, 0, 0x10_0000],
        ] {
            assert_eq!(
                parse(&flat(fields, 0x1000), RAM),
                Err(MultibootError::BadAddressFields),
                "{fields:x?}"
            );
        }
        assert_eq!(
            parse(&flat([0x10_0040, 0x10_0000, 0, 0, 0x30_0000], 0x1000), RAM),
            Err(MultibootError::EntryOutsideImage)
        );
        // Address fields cut off by the end of the file.
        let mut short = vec![0u8; 0x40];
        short.extend_from_slice(&header(FLAG_ADDRESSES));
        assert_eq!(parse(&short, RAM), Err(MultibootError::BadAddressFields));
    }

    fn word(block: &[u8], at: usize) -> u32 {
        u32_at(block, at).unwrap()
    }

    #[test]
    fn boot_information_describes_memory_cmdline_and_modules() {
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x1800)], 1);
        let kernel = parse(&image, RAM).unwrap();
        let first = [7u8; 5000];
        let modules = [
            ModuleInput {
                contents: &first,
                string: "first",
            },
            ModuleInput {
                contents: b"second",
                string: "second arg",
            },
        ];
        let plan = plan(&kernel, RAM, "hello world", &modules).unwrap();
        assert_eq!(plan.modules, vec![0x10_2000, 0x10_4000]);
        assert_eq!(plan.info, 0x10_5000);
        let b = &plan.block;
        let local = |address: u32| (address - plan.info) as usize;
        let string = |address: u32| {
            let at = local(address);
            let end = b[at..].iter().position(|&c| c == 0).unwrap();
            core::str::from_utf8(&b[at..at + end]).unwrap()
        };
        assert_eq!(word(b, offset::FLAGS), 0x24d);
        assert_eq!(word(b, offset::MEM_LOWER), 639);
        assert_eq!(word(b, offset::MEM_UPPER), 31 * 1024);
        assert_eq!(string(word(b, offset::CMDLINE)), "hello world");
        assert_eq!(string(word(b, offset::BOOT_LOADER_NAME)), LOADER_NAME);
        assert_eq!(word(b, offset::MODS_COUNT), 2);
        let mods = local(word(b, offset::MODS_ADDR));
        assert_eq!(word(b, mods), 0x10_2000);
        assert_eq!(word(b, mods + 4), 0x10_2000 + 5000);
        assert_eq!(string(word(b, mods + 8)), "first");
        assert_eq!(word(b, mods + 16), 0x10_4000);
        assert_eq!(word(b, mods + 20), 0x10_4006);
        assert_eq!(string(word(b, mods + 24)), "second arg");
        assert_eq!(word(b, offset::MMAP_LENGTH), 72);
        let mmap = local(word(b, offset::MMAP_ADDR));
        let entry = |i: usize| {
            let at = mmap + i * MMAP_ENTRY_SIZE;
            (
                word(b, at),
                u64::from_le_bytes(b[at + 4..at + 12].try_into().unwrap()),
                u64::from_le_bytes(b[at + 12..at + 20].try_into().unwrap()),
                word(b, at + 20),
            )
        };
        assert_eq!(entry(0), (20, 0, 0x9_fc00, 1));
        assert_eq!(entry(1), (20, 0x9_fc00, 0x6_0400, 2));
        assert_eq!(entry(2), (20, 0x10_0000, RAM - 0x10_0000, 1));
        let gdt = local(plan.gdt);
        assert_eq!(gdt % 8, plan.info as usize % 8);
        assert_eq!(
            u64::from_le_bytes(b[gdt + 8..gdt + 16].try_into().unwrap()),
            0x00cf_9a00_0000_ffff
        );
        assert_eq!(b.len(), gdt + 24);
    }

    #[test]
    fn modules_that_do_not_fit_are_refused() {
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x100)], 0);
        let kernel = parse(&image, 2 << 20).unwrap();
        let big = vec![0u8; 1 << 20];
        let module = [ModuleInput {
            contents: &big,
            string: "big",
        }];
        assert_eq!(
            plan(&kernel, 2 << 20, "", &module),
            Err(MultibootError::NoRoomForBootInformation)
        );
        // A kernel that fills RAM leaves no room for the information.
        let image = elf32(0x10_0000, &[(0x10_0000, 0x10_0000, 0x100, 0x10_0000)], 0);
        let kernel = parse(&image, 2 << 20).unwrap();
        assert_eq!(
            plan(&kernel, 2 << 20, "", &[]),
            Err(MultibootError::NoRoomForBootInformation)
        );
        // A low kernel: the information still starts at 1 MiB.
        let image = elf32(0x8000, &[(0x8000, 0x8000, 0x100, 0x100)], 0);
        let kernel = parse(&image, 2 << 20).unwrap();
        assert_eq!(plan(&kernel, 2 << 20, "", &[]).unwrap().info, 0x10_0000);
    }
}
