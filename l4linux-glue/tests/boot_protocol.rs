//! The boot protocol module checked against `linux-loader` (bindgen'd `boot_params` and its
//! bzImage loader) as a reference oracle, plus the refusals a hostile image or config gets.

use std::io::Cursor;
use std::mem::offset_of;

use l4linux_glue::boot::{
    self, offset, plan, synthetic_bzimage, zero_page, BootError, BootLayout, BzImage, E820Entry,
    E820_RAM,
};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage as OracleBzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

fn payload() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn offsets_match_linux_bindings() {
    let hdr = offset_of!(boot_params, hdr);
    assert_eq!(hdr, boot::SETUP_HEADER);
    let fields = [
        (
            offset::SETUP_SECTS,
            hdr + offset_of!(setup_header, setup_sects),
        ),
        (offset::BOOT_FLAG, hdr + offset_of!(setup_header, boot_flag)),
        (offset::JUMP, hdr + offset_of!(setup_header, jump)),
        (offset::HEADER, hdr + offset_of!(setup_header, header)),
        (offset::VERSION, hdr + offset_of!(setup_header, version)),
        (
            offset::TYPE_OF_LOADER,
            hdr + offset_of!(setup_header, type_of_loader),
        ),
        (offset::LOADFLAGS, hdr + offset_of!(setup_header, loadflags)),
        (
            offset::CODE32_START,
            hdr + offset_of!(setup_header, code32_start),
        ),
        (
            offset::RAMDISK_IMAGE,
            hdr + offset_of!(setup_header, ramdisk_image),
        ),
        (
            offset::RAMDISK_SIZE,
            hdr + offset_of!(setup_header, ramdisk_size),
        ),
        (
            offset::HEAP_END_PTR,
            hdr + offset_of!(setup_header, heap_end_ptr),
        ),
        (
            offset::CMD_LINE_PTR,
            hdr + offset_of!(setup_header, cmd_line_ptr),
        ),
        (
            offset::INITRD_ADDR_MAX,
            hdr + offset_of!(setup_header, initrd_addr_max),
        ),
        (
            offset::KERNEL_ALIGNMENT,
            hdr + offset_of!(setup_header, kernel_alignment),
        ),
        (
            offset::RELOCATABLE_KERNEL,
            hdr + offset_of!(setup_header, relocatable_kernel),
        ),
        (
            offset::XLOADFLAGS,
            hdr + offset_of!(setup_header, xloadflags),
        ),
        (
            offset::CMDLINE_SIZE,
            hdr + offset_of!(setup_header, cmdline_size),
        ),
        (
            offset::PREF_ADDRESS,
            hdr + offset_of!(setup_header, pref_address),
        ),
        (offset::INIT_SIZE, hdr + offset_of!(setup_header, init_size)),
        (
            offset::EXT_RAMDISK_IMAGE,
            offset_of!(boot_params, ext_ramdisk_image),
        ),
        (
            offset::EXT_RAMDISK_SIZE,
            offset_of!(boot_params, ext_ramdisk_size),
        ),
        (
            offset::EXT_CMD_LINE_PTR,
            offset_of!(boot_params, ext_cmd_line_ptr),
        ),
        (offset::E820_ENTRIES, offset_of!(boot_params, e820_entries)),
        (offset::SENTINEL, offset_of!(boot_params, sentinel)),
        (offset::E820_TABLE, offset_of!(boot_params, e820_table)),
    ];
    for (ours, theirs) in fields {
        assert_eq!(ours, theirs, "offset {ours:#x} vs linux {theirs:#x}");
    }
    assert_eq!(std::mem::size_of::<boot_params>(), boot::ZERO_PAGE_SIZE);
    assert_eq!(std::mem::size_of::<boot_e820_entry>(), 20);
    assert_eq!(
        hdr + std::mem::size_of::<setup_header>(),
        0x26c,
        "the 2.15 header ends at 0x26c"
    );
}

#[test]
fn kernel_placement_matches_linux_loader() {
    let image = synthetic_bzimage(7, &payload(), 0x80_0000);
    let ours = BzImage::parse(&image).unwrap();
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (64 * MIB) as usize)]).unwrap();
    let load = ours.load_address();
    let result = OracleBzImage::load(
        &mem,
        Some(GuestAddress(load)),
        &mut Cursor::new(&image),
        Some(GuestAddress(MIB)),
    )
    .unwrap();
    assert_eq!(result.kernel_load.0, load);
    assert_eq!(result.kernel_end, load + ours.kernel().len() as u64);
    let mut loaded = vec![0u8; ours.kernel().len()];
    mem.read_slice(&mut loaded, GuestAddress(load)).unwrap();
    assert_eq!(loaded, payload());
    assert_eq!(ours.kernel(), &payload()[..]);
    assert_eq!(ours.kernel_offset(), 8 * 512);
    let oracle_hdr = result.setup_header.unwrap();
    assert_eq!({ oracle_hdr.setup_sects }, 7);
    assert_eq!(u64::from(oracle_hdr.init_size), ours.init_size);
    assert_eq!({ oracle_hdr.pref_address }, ours.pref_address);
}

/// The zero page we build, byte for byte the `boot_params` a linux-loader based VMM fills.
#[test]
fn zero_page_matches_linux_loader_boot_params() {
    let image = synthetic_bzimage(0, &payload(), 0x60_0000);
    let bz = BzImage::parse(&image).unwrap();
    let cmdline = b"console=ttyS0 earlyprintk=serial panic=-1";
    let layout = plan(&bz, 128 * MIB, 3 * 4096 + 17, cmdline.len()).unwrap();
    let ours = zero_page(&bz, &layout, cmdline).unwrap();

    let mut hdr = setup_header::default();
    let hdr_bytes = hdr.as_mut_slice();
    let n = hdr_bytes.len();
    hdr_bytes.copy_from_slice(&image[0x1f1..0x1f1 + n]);
    hdr.type_of_loader = 0xff;
    hdr.loadflags |= 0x80;
    hdr.heap_end_ptr = 0xfe00;
    hdr.code32_start = layout.kernel as u32;
    hdr.cmd_line_ptr = layout.cmdline as u32;
    hdr.ramdisk_image = layout.initrd as u32;
    hdr.ramdisk_size = layout.initrd_size as u32;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    for (i, e) in layout.e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
        };
    }
    params.e820_entries = layout.e820.len() as u8;
    assert_eq!(ours.as_slice(), params.as_slice());
}

#[test]
fn plan_places_initrd_high_and_kernel_at_its_preferred_address() {
    let image = synthetic_bzimage(4, &payload(), 0x80_0000);
    let bz = BzImage::parse(&image).unwrap();
    let layout = plan(&bz, 256 * MIB, 1_000_001, 20).unwrap();
    assert_eq!(layout.kernel, 16 * MIB);
    assert_eq!(layout.entry64, 16 * MIB + 0x200);
    assert_eq!(layout.initrd % 4096, 0);
    assert!(layout.initrd + layout.initrd_size <= 256 * MIB);
    assert!(256 * MIB - (layout.initrd + layout.initrd_size) < 4096);
    assert!(layout.initrd >= layout.kernel + bz.footprint());
    // initrd_addr_max below the top of RAM wins.
    let mut capped = image.clone();
    capped[offset::INITRD_ADDR_MAX..offset::INITRD_ADDR_MAX + 4]
        .copy_from_slice(&(64 * MIB as u32 - 1).to_le_bytes());
    let bz = BzImage::parse(&capped).unwrap();
    let layout = plan(&bz, 256 * MIB, 1_000_001, 20).unwrap();
    assert!(layout.initrd + layout.initrd_size <= 64 * MIB);
    // No room: the kernel's footprint does not fit, or the initramfs would hit the kernel.
    assert_eq!(plan(&bz, 20 * MIB, 0, 20), Err(BootError::Layout("kernel")));
    assert_eq!(
        plan(&bz, 64 * MIB, 50 * MIB, 20),
        Err(BootError::Layout("initramfs"))
    );
    // An unaligned preferred address falls back to 16 MiB rounded to the alignment.
    let mut odd = image.clone();
    odd[offset::PREF_ADDRESS..offset::PREF_ADDRESS + 8]
        .copy_from_slice(&0x123_4000u64.to_le_bytes());
    assert_eq!(BzImage::parse(&odd).unwrap().load_address(), 16 * MIB);
    // ... but a kernel that is not relocatable runs only where it asks to be.
    odd[offset::RELOCATABLE_KERNEL] = 0;
    let fixed = BzImage::parse(&odd).unwrap();
    assert_eq!(fixed.load_address(), 0x123_4000);
    assert_eq!(plan(&fixed, 256 * MIB, 0, 20).unwrap().kernel, 0x123_4000);
    odd[offset::PREF_ADDRESS..offset::PREF_ADDRESS + 8].copy_from_slice(&0x8000u64.to_le_bytes());
    assert_eq!(
        plan(&BzImage::parse(&odd).unwrap(), 256 * MIB, 0, 20),
        Err(BootError::Layout("kernel"))
    );
}

#[test]
fn malformed_images_are_refused_with_the_reason() {
    let good = synthetic_bzimage(4, &payload(), 0x80_0000);
    assert!(BzImage::parse(&good).is_ok());
    let patched = |o: usize, bytes: &[u8]| {
        let mut i = good.clone();
        i[o..o + bytes.len()].copy_from_slice(bytes);
        BzImage::parse(&i).map(|_| ())
    };
    assert!(matches!(
        BzImage::parse(&good[..0x200]),
        Err(BootError::TooShort { .. })
    ));
    assert!(matches!(
        BzImage::parse(&good[..5 * 512]),
        Err(BootError::TooShort { .. })
    ));
    assert_eq!(
        patched(offset::BOOT_FLAG, &[0, 0]),
        Err(BootError::BadBootFlag(0))
    );
    assert_eq!(
        patched(offset::HEADER, b"ELF!"),
        Err(BootError::BadHeaderMagic(u32::from_le_bytes(*b"ELF!")))
    );
    assert_eq!(
        patched(offset::VERSION, &[0x0b, 0x02]),
        Err(BootError::OldProtocol(0x020b))
    );
    assert_eq!(
        patched(offset::LOADFLAGS, &[0]),
        Err(BootError::NotLoadedHigh)
    );
    assert_eq!(
        patched(offset::XLOADFLAGS, &[2, 0]),
        Err(BootError::Not64Bit)
    );
    assert_eq!(
        patched(offset::KERNEL_ALIGNMENT, &[0, 0x30, 0, 0]),
        Err(BootError::BadAlignment(0x3000))
    );
    // Huge setup_sects: the kernel would start beyond the image.
    assert!(matches!(
        patched(offset::SETUP_SECTS, &[200]),
        Err(BootError::TooShort { .. })
    ));
    // Random garbage never panics.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        let mut i = good.clone();
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 0x1f0 + (x as usize % 0x80);
            i[at] = (x >> 32) as u8;
        }
        if let Ok(bz) = BzImage::parse(&i) {
            let _ = plan(&bz, 256 * MIB, 4096, 10).and_then(|l| zero_page(&bz, &l, b"quiet"));
        }
    }
}

#[test]
fn bad_configurations_are_refused() {
    let image = synthetic_bzimage(4, &payload(), 0x80_0000);
    let bz = BzImage::parse(&image).unwrap();
    let layout = plan(&bz, 128 * MIB, 8192, 10).unwrap();
    assert_eq!(
        zero_page(&bz, &layout, b"a\0b"),
        Err(BootError::CmdlineHasNul)
    );
    let long = vec![b'x'; 2048];
    assert_eq!(
        zero_page(&bz, &layout, &long),
        Err(BootError::CmdlineTooLong {
            length: 2048,
            max: 2047
        })
    );
    assert!(zero_page(&bz, &layout, &long[..2047]).is_ok());
    assert!(matches!(
        plan(&bz, 128 * MIB, 0, 5000),
        Err(BootError::CmdlineTooLong { .. })
    ));

    let with = |f: &dyn Fn(&mut BootLayout)| {
        let mut l = layout.clone();
        f(&mut l);
        zero_page(&bz, &l, b"console=ttyS0")
    };
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    assert_eq!(
        with(&|l| l.e820 = vec![ram(0, 4096); 129]),
        Err(BootError::TooManyE820Entries(129))
    );
    assert_eq!(
        with(&|l| l.e820 = vec![ram(MIB, 127 * MIB), ram(0, 0x9fc00)]),
        Err(BootError::BadE820)
    );
    assert_eq!(
        with(&|l| l.e820 = vec![ram(0, 0x9fc00), ram(0x9f000, 128 * MIB)]),
        Err(BootError::BadE820)
    );
    assert_eq!(
        with(&|l| l.e820 = vec![ram(0, 0x9fc00), ram(u64::MAX - 10, 100)]),
        Err(BootError::BadE820)
    );
    // Pieces outside RAM or on top of each other.
    assert_eq!(
        with(&|l| l.zero_page = 0xa0000),
        Err(BootError::Layout("zero page"))
    );
    assert_eq!(
        with(&|l| l.cmdline = l.zero_page + 100),
        Err(BootError::Layout("command line"))
    );
    assert_eq!(
        with(&|l| l.initrd = l.kernel + 4096),
        Err(BootError::Layout("initramfs"))
    );
    assert_eq!(
        with(&|l| l.initrd = 200 * MIB),
        Err(BootError::Layout("initramfs"))
    );
    // Without XLF_CAN_BE_LOADED_ABOVE_4G the initramfs must end below initrd_addr_max.
    let mut low_only = image.clone();
    low_only[offset::XLOADFLAGS] = 1;
    let bz_low = BzImage::parse(&low_only).unwrap();
    let mut l = layout.clone();
    l.initrd = 0x8000_0000;
    l.e820.push(ram(0x8000_0000, 16 * MIB));
    assert!(matches!(
        zero_page(&bz_low, &l, b""),
        Err(BootError::InitrdTooHigh { .. })
    ));
    assert!(zero_page(&bz, &l, b"").is_ok());
    // Every refusal has a readable reason.
    assert!(BootError::Layout("kernel").to_string().contains("kernel"));
}

/// The real guest kernel (after `scripts/build-linux.sh`):
/// `cargo test -p l4linux-glue --test boot_protocol -- --ignored`.
#[test]
#[ignore = "needs target/linux/bzImage from scripts/build-linux.sh"]
fn real_bzimage_parses_and_agrees_with_linux_loader() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/linux/bzImage");
    let image = std::fs::read(path).expect("run scripts/build-linux.sh first");
    let bz = BzImage::parse(&image).unwrap();
    assert!(bz.version >= 0x020f, "6.1 speaks protocol 2.15");
    // tinyconfig has no CONFIG_RELOCATABLE: the kernel must be loaded at its preferred address.
    assert_eq!(bz.load_address(), bz.pref_address);
    let layout = plan(&bz, 256 * MIB, 1_500_000, 40).unwrap();
    let zp = zero_page(&bz, &layout, b"console=ttyS0 panic=-1 printk.time=1").unwrap();
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (256 * MIB) as usize)]).unwrap();
    let result = OracleBzImage::load(
        &mem,
        Some(GuestAddress(layout.kernel)),
        &mut Cursor::new(&image),
        Some(GuestAddress(MIB)),
    )
    .unwrap();
    assert_eq!(result.kernel_end, layout.kernel + bz.kernel().len() as u64);
    let hdr = result.setup_header.unwrap();
    let n = hdr.as_slice().len();
    // Same header apart from the fields a loader fills in.
    let ours = &zp[0x1f1..0x1f1 + n];
    let theirs = hdr.as_slice();
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let o = 0x1f1 + i;
        let loader_field = [
            offset::TYPE_OF_LOADER..offset::TYPE_OF_LOADER + 1,
            offset::LOADFLAGS..offset::LOADFLAGS + 1,
            offset::CODE32_START..offset::CODE32_START + 4,
            offset::RAMDISK_IMAGE..offset::RAMDISK_SIZE + 4,
            offset::HEAP_END_PTR..offset::HEAP_END_PTR + 2,
            offset::CMD_LINE_PTR..offset::CMD_LINE_PTR + 4,
        ]
        .iter()
        .any(|r| r.contains(&o));
        assert!(
            loader_field || a == b,
            "header byte {o:#x}: {a:#x} vs {b:#x}"
        );
    }
    println!(
        "bzImage: protocol {:#x}, load {:#x}, init_size {:#x}, kernel {} bytes",
        bz.version,
        layout.kernel,
        bz.init_size,
        bz.kernel().len()
    );
}
