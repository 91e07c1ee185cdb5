//! The Linux x86 boot protocol, as a VMM uses it to start a 64-bit `bzImage` directly at its
//! 64-bit entry point (no real-mode setup code runs): reading and checking the image's setup
//! header, planning where the kernel, the command line and the initramfs go in guest-physical
//! memory, and building the "zero page" (`struct boot_params`) with the E820 memory map.
//!
//! Offsets follow `Documentation/arch/x86/boot.rst`; the host tests check every offset and a
//! whole zero page against `linux-loader`'s bindings.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Size of the zero page.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Offset of the setup header in the image and in the zero page.
pub const SETUP_HEADER: usize = 0x1f1;
/// The 64-bit entry point is this far into the protected-mode kernel.
pub const ENTRY64_OFFSET: u64 = 0x200;
/// At most this many E820 entries fit in the zero page.
pub const E820_MAX: usize = 128;

/// Zero-page offsets (boot.rst, "the zero page" and "the real-mode kernel header").
pub mod offset {
    /// High 32 bits of the initramfs address (`ext_ramdisk_image`).
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    /// High 32 bits of the initramfs size (`ext_ramdisk_size`).
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    /// High 32 bits of the command-line address (`ext_cmd_line_ptr`).
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    /// Number of E820 entries (`e820_entries`).
    pub const E820_ENTRIES: usize = 0x1e8;
    /// Byte a boot loader must clear (`sentinel`); set means a stale setup header.
    pub const SENTINEL: usize = 0x1ef;
    /// 512-byte setup sectors after the boot sector (`setup_sects`).
    pub const SETUP_SECTS: usize = 0x1f1;
    /// 0xAA55 (`boot_flag`).
    pub const BOOT_FLAG: usize = 0x1fe;
    /// The jump over the header (`jump`).
    pub const JUMP: usize = 0x200;
    /// "HdrS" (`header`).
    pub const HEADER: usize = 0x202;
    /// Boot protocol version (`version`).
    pub const VERSION: usize = 0x206;
    /// The boot loader's id (`type_of_loader`).
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// Load flags (`loadflags`).
    pub const LOADFLAGS: usize = 0x211;
    /// 32-bit entry point (`code32_start`).
    pub const CODE32_START: usize = 0x214;
    /// Initramfs address, low 32 bits (`ramdisk_image`).
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// Initramfs size, low 32 bits (`ramdisk_size`).
    pub const RAMDISK_SIZE: usize = 0x21c;
    /// End of the setup heap (`heap_end_ptr`).
    pub const HEAP_END_PTR: usize = 0x224;
    /// Command-line address, low 32 bits (`cmd_line_ptr`).
    pub const CMD_LINE_PTR: usize = 0x228;
    /// Highest address the initramfs may reach (`initrd_addr_max`).
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    /// Alignment a relocatable kernel needs (`kernel_alignment`).
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    /// Whether the kernel is relocatable (`relocatable_kernel`).
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    /// Extended load flags (`xloadflags`).
    pub const XLOADFLAGS: usize = 0x236;
    /// Longest command line, without its NUL (`cmdline_size`).
    pub const CMDLINE_SIZE: usize = 0x238;
    /// Preferred load address (`pref_address`).
    pub const PREF_ADDRESS: usize = 0x258;
    /// Memory the kernel needs while decompressing (`init_size`).
    pub const INIT_SIZE: usize = 0x260;
    /// The E820 table (`e820_table`).
    pub const E820_TABLE: usize = 0x2d0;
}

/// `boot_flag` value.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS".
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// Oldest protocol we accept: 2.12 has `xloadflags` (64-bit entry) and `pref_address`/`init_size`.
pub const MIN_VERSION: u16 = 0x020c;
/// `loadflags`: the protected-mode kernel loads at 1 MiB.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags`: the kernel has a 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: kernel, boot parameters and initramfs may lie above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// `type_of_loader` for a loader without an assigned id.
pub const LOADER_UNDEFINED: u8 = 0xff;

/// E820 range type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 range type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Why an image or a boot configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The image ends before its setup header (or before its protected-mode kernel).
    TooShort {
        /// Bytes of the image.
        length: usize,
        /// Bytes it would need.
        needed: usize,
    },
    /// `boot_flag` is not 0xAA55.
    BadBootFlag(u16),
    /// No "HdrS" signature: not a bzImage (or a protocol older than 2.00).
    BadHeaderMagic(u32),
    /// The boot protocol is older than 2.12.
    OldProtocol(u16),
    /// The kernel has no 64-bit entry point (`XLF_KERNEL_64` clear).
    Not64Bit,
    /// The kernel does not load at 1 MiB and above (`LOADED_HIGH` clear): a zImage.
    NotLoadedHigh,
    /// `kernel_alignment` is not a power of two of at least 4 KiB.
    BadAlignment(u32),
    /// The command line (with its terminating NUL) is longer than the kernel accepts.
    CmdlineTooLong {
        /// Bytes of the command line with its NUL.
        length: usize,
        /// What the kernel accepts.
        max: usize,
    },
    /// The command line contains a NUL byte.
    CmdlineHasNul,
    /// The initramfs would end above what the kernel can reach (`initrd_addr_max`).
    InitrdTooHigh {
        /// Where it would end.
        end: u64,
        /// The highest address the kernel can reach.
        max: u64,
    },
    /// More E820 entries than the zero page holds.
    TooManyE820Entries(usize),
    /// An E820 entry is empty, overflows, or the entries are unsorted or overlap.
    BadE820,
    /// A piece (named) does not lie in RAM or overlaps another piece.
    Layout(&'static str),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BootError::TooShort { length, needed } => {
                write!(f, "image is {length} bytes, needs at least {needed}")
            }
            BootError::BadBootFlag(v) => write!(f, "boot_flag is {v:#x}, not 0xaa55"),
            BootError::BadHeaderMagic(v) => {
                write!(f, "no \"HdrS\" signature (found {v:#x}): not a bzImage")
            }
            BootError::OldProtocol(v) => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12",
                v >> 8,
                v & 0xff
            ),
            BootError::Not64Bit => write!(f, "kernel has no 64-bit entry point"),
            BootError::NotLoadedHigh => write!(f, "kernel does not load high (zImage)"),
            BootError::BadAlignment(a) => write!(f, "kernel_alignment {a:#x} is not usable"),
            BootError::CmdlineTooLong { length, max } => {
                write!(
                    f,
                    "command line of {length} bytes exceeds the kernel's {max}"
                )
            }
            BootError::CmdlineHasNul => write!(f, "command line contains a NUL byte"),
            BootError::InitrdTooHigh { end, max } => {
                write!(
                    f,
                    "initramfs ends at {end:#x}, above initrd_addr_max {max:#x}"
                )
            }
            BootError::TooManyE820Entries(n) => {
                write!(f, "{n} E820 entries, at most {E820_MAX} fit")
            }
            BootError::BadE820 => write!(f, "E820 entries empty, unsorted or overlapping"),
            BootError::Layout(what) => write!(f, "{what} is not in free guest RAM"),
        }
    }
}

fn u8_at(b: &[u8], o: usize) -> u8 {
    b[o]
}
fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}
fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A checked 64-bit bzImage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    image: &'a [u8],
    /// Boot protocol version (0x020f = 2.15).
    pub version: u16,
    /// Number of 512-byte setup sectors after the boot sector.
    pub setup_sects: u32,
    /// `loadflags` ([`LOADED_HIGH`], [`CAN_USE_HEAP`]).
    pub loadflags: u8,
    /// `xloadflags` ([`XLF_KERNEL_64`], [`XLF_CAN_BE_LOADED_ABOVE_4G`]).
    pub xloadflags: u16,
    /// Whether the kernel may be loaded at another aligned address.
    pub relocatable: bool,
    /// Alignment of a relocated load address.
    pub kernel_alignment: u64,
    /// Preferred load address of the protected-mode kernel.
    pub pref_address: u64,
    /// Bytes of memory the kernel needs from its load address on, while decompressing.
    pub init_size: u64,
    /// Maximum command line length, without the terminating NUL.
    pub cmdline_size: u64,
    /// Highest address the initramfs may occupy.
    pub initrd_addr_max: u64,
    /// The setup header bytes as the image holds them (0x1f1 up to the header's end).
    header_end: usize,
}

impl<'a> BzImage<'a> {
    /// Check `image` and read its setup header.
    pub fn parse(image: &'a [u8]) -> Result<Self, BootError> {
        let needed = offset::INIT_SIZE + 4;
        if image.len() < needed {
            return Err(BootError::TooShort {
                length: image.len(),
                needed,
            });
        }
        let flag = u16_at(image, offset::BOOT_FLAG);
        if flag != BOOT_FLAG_MAGIC {
            return Err(BootError::BadBootFlag(flag));
        }
        let magic = u32_at(image, offset::HEADER);
        if magic != HEADER_MAGIC {
            return Err(BootError::BadHeaderMagic(magic));
        }
        let version = u16_at(image, offset::VERSION);
        if version < MIN_VERSION {
            return Err(BootError::OldProtocol(version));
        }
        let loadflags = u8_at(image, offset::LOADFLAGS);
        if loadflags & LOADED_HIGH == 0 {
            return Err(BootError::NotLoadedHigh);
        }
        let xloadflags = u16_at(image, offset::XLOADFLAGS);
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::Not64Bit);
        }
        let alignment = u32_at(image, offset::KERNEL_ALIGNMENT);
        if !alignment.is_power_of_two() || alignment < 4096 {
            return Err(BootError::BadAlignment(alignment));
        }
        let setup_sects = match u8_at(image, offset::SETUP_SECTS) {
            0 => 4,
            n => u32::from(n),
        };
        // The header runs from 0x1f1 to the target of the 2-byte jump at 0x200.
        let header_end = (offset::HEADER + usize::from(u8_at(image, offset::JUMP + 1)))
            .clamp(offset::INIT_SIZE + 4, ZERO_PAGE_SIZE.min(image.len()));
        let parsed = BzImage {
            image,
            version,
            setup_sects,
            loadflags,
            xloadflags,
            relocatable: u8_at(image, offset::RELOCATABLE_KERNEL) != 0,
            kernel_alignment: u64::from(alignment),
            pref_address: u64_at(image, offset::PREF_ADDRESS),
            init_size: u64::from(u32_at(image, offset::INIT_SIZE)),
            cmdline_size: u64::from(u32_at(image, offset::CMDLINE_SIZE)),
            initrd_addr_max: u64::from(u32_at(image, offset::INITRD_ADDR_MAX)),
            header_end,
        };
        let kernel_start = parsed.kernel_offset();
        if image.len() <= kernel_start {
            return Err(BootError::TooShort {
                length: image.len(),
                needed: kernel_start + 1,
            });
        }
        Ok(parsed)
    }

    /// Offset of the protected-mode kernel in the image.
    pub fn kernel_offset(&self) -> usize {
        (self.setup_sects as usize + 1) * 512
    }

    /// The protected-mode kernel: the bytes to copy to the load address.
    pub fn kernel(&self) -> &'a [u8] {
        &self.image[self.kernel_offset()..]
    }

    /// Where the kernel goes: its preferred address if it is not relocatable (it must run
    /// there) or if that is at least 1 MiB and aligned; else 16 MiB rounded up to the
    /// alignment (a relocatable kernel moves itself as it needs).
    pub fn load_address(&self) -> u64 {
        let aligned = self.pref_address.is_multiple_of(self.kernel_alignment);
        if !self.relocatable || (self.pref_address >= 0x10_0000 && aligned) {
            self.pref_address
        } else {
            0x100_0000_u64.next_multiple_of(self.kernel_alignment)
        }
    }

    /// Bytes the kernel occupies from its load address while it decompresses.
    pub fn footprint(&self) -> u64 {
        self.init_size.max(self.kernel().len() as u64)
    }

    /// The command-line limit the kernel states, or the protocol's 255 if it states none.
    pub fn cmdline_limit(&self) -> usize {
        match self.cmdline_size {
            0 => 255,
            n => n as usize,
        }
    }
}

/// One E820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Where everything goes in guest-physical memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootLayout {
    /// Guest-physical address of the zero page (boot parameters).
    pub zero_page: u64,
    /// Guest-physical address of the command line.
    pub cmdline: u64,
    /// Guest-physical load address of the protected-mode kernel.
    pub kernel: u64,
    /// Guest-physical start of the initramfs (0 and `initrd_size` 0 if none).
    pub initrd: u64,
    /// Bytes of the initramfs.
    pub initrd_size: u64,
    /// The 64-bit entry point: `kernel + 0x200`.
    pub entry64: u64,
    /// The memory map given to the guest.
    pub e820: Vec<E820Entry>,
}

/// Guest-physical address of the zero page (below the EBDA).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of the command line (below the EBDA).
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// End of low RAM (the EBDA and the BIOS areas above are reserved).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The BIOS area (MP table and the like) that Linux scans; reserved, backed by memory.
pub const BIOS_AREA: u64 = 0xf_0000;
/// Start of RAM above the BIOS areas (1 MiB), where the kernel is loaded.
pub const HIGH_RAM: u64 = 0x10_0000;

/// Plan a guest of `ram` bytes (contiguous from 0, at least 2 MiB above 1 MiB) for `image`
/// with an initramfs of `initrd_size` bytes (placed page-aligned at the top of RAM the kernel
/// can reach) and a command line of `cmdline_len` bytes.
pub fn plan(
    image: &BzImage<'_>,
    ram: u64,
    initrd_size: u64,
    cmdline_len: usize,
) -> Result<BootLayout, BootError> {
    if cmdline_len > image.cmdline_limit() {
        return Err(BootError::CmdlineTooLong {
            length: cmdline_len,
            max: image.cmdline_limit(),
        });
    }
    let kernel = image.load_address();
    let kernel_end = kernel
        .checked_add(image.footprint())
        .ok_or(BootError::Layout("kernel"))?;
    if kernel < HIGH_RAM || ram < HIGH_RAM || kernel_end > ram {
        return Err(BootError::Layout("kernel"));
    }
    let (initrd, initrd_size) = if initrd_size == 0 {
        (0, 0)
    } else {
        let top = ram.min(image.initrd_addr_max.saturating_add(1)) & !0xfff;
        let start = top
            .checked_sub(initrd_size)
            .ok_or(BootError::Layout("initramfs"))?
            & !0xfff;
        if start < kernel_end {
            return Err(BootError::Layout("initramfs"));
        }
        (start, initrd_size)
    };
    let e820 = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: BIOS_AREA,
            size: HIGH_RAM - BIOS_AREA,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_RAM,
            size: ram - HIGH_RAM,
            kind: E820_RAM,
        },
    ];
    Ok(BootLayout {
        zero_page: ZERO_PAGE_ADDR,
        cmdline: CMDLINE_ADDR,
        kernel,
        initrd,
        initrd_size,
        entry64: kernel + ENTRY64_OFFSET,
        e820,
    })
}

fn check_e820(e820: &[E820Entry]) -> Result<(), BootError> {
    if e820.len() > E820_MAX {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    let mut previous_end = 0;
    for e in e820 {
        let end = e.addr.checked_add(e.size).ok_or(BootError::BadE820)?;
        if e.size == 0 || e.addr < previous_end {
            return Err(BootError::BadE820);
        }
        previous_end = end;
    }
    Ok(())
}

fn in_ram(e820: &[E820Entry], start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    e820.iter()
        .any(|e| e.kind == E820_RAM && e.addr <= start && end <= e.addr + e.size)
}

/// Build the zero page for `image` booted with `layout` and command line `cmdline` (without
/// NUL). Checks that the command line fits, that the initramfs is reachable, that the E820 map
/// is well formed, and that the zero page, command line, kernel and initramfs lie in RAM
/// without overlapping.
pub fn zero_page(
    image: &BzImage<'_>,
    layout: &BootLayout,
    cmdline: &[u8],
) -> Result<Vec<u8>, BootError> {
    if cmdline.contains(&0) {
        return Err(BootError::CmdlineHasNul);
    }
    if cmdline.len() > image.cmdline_limit() {
        return Err(BootError::CmdlineTooLong {
            length: cmdline.len(),
            max: image.cmdline_limit(),
        });
    }
    check_e820(&layout.e820)?;
    if layout.initrd_size != 0 {
        let end = layout.initrd + layout.initrd_size - 1;
        let max = if image.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
            u64::MAX
        } else {
            image.initrd_addr_max
        };
        if end > max || layout.initrd.checked_add(layout.initrd_size).is_none() {
            return Err(BootError::InitrdTooHigh { end, max });
        }
    }
    let pieces = [
        ("zero page", layout.zero_page, ZERO_PAGE_SIZE as u64),
        ("command line", layout.cmdline, cmdline.len() as u64 + 1),
        ("kernel", layout.kernel, image.footprint()),
        ("initramfs", layout.initrd, layout.initrd_size),
    ];
    for (i, &(name, start, len)) in pieces.iter().enumerate() {
        if len == 0 {
            continue;
        }
        if !in_ram(&layout.e820, start, len) {
            return Err(BootError::Layout(name));
        }
        for &(_, other, other_len) in &pieces[..i] {
            if other_len != 0 && start < other + other_len && other < start + len {
                return Err(BootError::Layout(name));
            }
        }
    }

    let mut zp = vec![0u8; ZERO_PAGE_SIZE];
    zp[SETUP_HEADER..image.header_end]
        .copy_from_slice(&image.image[SETUP_HEADER..image.header_end]);
    zp[offset::TYPE_OF_LOADER] = LOADER_UNDEFINED;
    zp[offset::LOADFLAGS] = (image.loadflags | CAN_USE_HEAP) & !(1 << 5) & !(1 << 6);
    put16(&mut zp, offset::HEAP_END_PTR, 0xfe00);
    put32(&mut zp, offset::CODE32_START, layout.kernel as u32);
    put32(&mut zp, offset::CMD_LINE_PTR, layout.cmdline as u32);
    put32(
        &mut zp,
        offset::EXT_CMD_LINE_PTR,
        (layout.cmdline >> 32) as u32,
    );
    put32(&mut zp, offset::RAMDISK_IMAGE, layout.initrd as u32);
    put32(
        &mut zp,
        offset::EXT_RAMDISK_IMAGE,
        (layout.initrd >> 32) as u32,
    );
    put32(&mut zp, offset::RAMDISK_SIZE, layout.initrd_size as u32);
    put32(
        &mut zp,
        offset::EXT_RAMDISK_SIZE,
        (layout.initrd_size >> 32) as u32,
    );
    zp[offset::E820_ENTRIES] = layout.e820.len() as u8;
    for (i, e) in layout.e820.iter().enumerate() {
        let o = offset::E820_TABLE + i * 20;
        put64(&mut zp, o, e.addr);
        put64(&mut zp, o + 8, e.size);
        put32(&mut zp, o + 16, e.kind);
    }
    Ok(zp)
}

/// A minimal image with a valid header, for tests here and in the VMM: `setup_sects` setup
/// sectors, protocol 2.15, 64-bit, relocatable, `payload` as the protected-mode kernel.
pub fn synthetic_bzimage(setup_sects: u8, payload: &[u8], init_size: u32) -> Vec<u8> {
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let mut image = vec![0u8; (usize::from(sects) + 1) * 512];
    image[offset::SETUP_SECTS] = setup_sects;
    put16(&mut image, offset::BOOT_FLAG, BOOT_FLAG_MAGIC);
    // `jmp short` to the end of the 2.15 header (0x26c).
    image[offset::JUMP] = 0xeb;
    image[offset::JUMP + 1] = (0x26c - offset::HEADER) as u8;
    put32(&mut image, offset::HEADER, HEADER_MAGIC);
    put16(&mut image, offset::VERSION, 0x020f);
    image[offset::LOADFLAGS] = LOADED_HIGH;
    put32(&mut image, offset::CODE32_START, 0x10_0000);
    put32(&mut image, offset::INITRD_ADDR_MAX, 0x7fff_ffff);
    put32(&mut image, offset::KERNEL_ALIGNMENT, 0x20_0000);
    image[offset::RELOCATABLE_KERNEL] = 1;
    put16(
        &mut image,
        offset::XLOADFLAGS,
        XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
    );
    put32(&mut image, offset::CMDLINE_SIZE, 2047);
    put64(&mut image, offset::PREF_ADDRESS, 0x100_0000);
    put32(&mut image, offset::INIT_SIZE, init_size);
    image.extend_from_slice(payload);
    image
}
