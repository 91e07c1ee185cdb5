//! Sigma0, the root pager. The kernel maps it all memory it owns (free RAM and boot modules)
//! at `SIGMA0_PHYS_WINDOW + physical`. It answers page faults of its clients with fresh zeroed
//! frames, and explicit requests for physical ranges (boot modules) with mappings of them.
//! It never allocates from its own heap (it has no pager).
#![no_std]
#![no_main]

use l4::abi::{
    region_kind, Fpage, MapItem, MessageTag, Timeouts, LABEL_PAGE_FAULT, PAGE_SIZE,
    SIGMA0_PHYS_WINDOW,
};
use l4::ipc::{self, Received};
use l4::kip::kip;
use l4::println;

/// Gaps the bump allocator skipped to align a large allocation, kept for later ones.
const HOLES: usize = 32;

/// Bump allocator over the free regions of the KIP, with the gaps that alignment skips kept
/// (up to [`HOLES`] of them) and used first.
struct Frames {
    region: usize,
    offset: u64,
    handed_out: u64,
    holes: [(u64, u64); HOLES],
    hole_count: usize,
}

impl Frames {
    /// Keep `start..end` as a hole (lost if there is no room).
    fn add_hole(&mut self, start: u64, end: u64) {
        if start < end && self.hole_count < HOLES {
            self.holes[self.hole_count] = (start, end);
            self.hole_count += 1;
        }
    }

    /// `size` bytes aligned to `size` from a hole, if one has room.
    fn take_from_hole(&mut self, size: u64) -> Option<u64> {
        let i = (0..self.hole_count).find(|&i| {
            let (start, end) = self.holes[i];
            start.next_multiple_of(size) + size <= end
        })?;
        let (start, end) = self.holes[i];
        let at = start.next_multiple_of(size);
        self.hole_count -= 1;
        self.holes[i] = self.holes[self.hole_count];
        self.add_hole(start, at);
        self.add_hole(at + size, end);
        self.handed_out += size / PAGE_SIZE;
        Some(at)
    }

    /// `size` bytes (a power of two) aligned to `size`: from a hole, else from the current
    /// free region on (what is skipped for alignment becomes a hole).
    fn allocate_aligned(&mut self, size: u64) -> Option<u64> {
        if let Some(at) = self.take_from_hole(size) {
            return Some(at);
        }
        let kip = kip();
        while self.region < kip.region_count as usize {
            let r = kip.regions[self.region];
            if r.kind == region_kind::FREE {
                let free = r.base + self.offset;
                let start = free.next_multiple_of(size);
                if start + size <= r.base + r.size {
                    self.add_hole(free, start);
                    self.offset = start + size - r.base;
                    self.handed_out += size / PAGE_SIZE;
                    return Some(start);
                }
            }
            self.region += 1;
            self.offset = 0;
        }
        None
    }

    fn allocate(&mut self) -> Option<u64> {
        if let Some(at) = self.take_from_hole(PAGE_SIZE) {
            return Some(at);
        }
        let kip = kip();
        while self.region < kip.region_count as usize {
            let r = kip.regions[self.region];
            if r.kind == region_kind::FREE && self.offset + PAGE_SIZE <= r.size {
                let frame = r.base + self.offset;
                self.offset += PAGE_SIZE;
                self.handed_out += 1;
                return Some(frame);
            }
            self.region += 1;
            self.offset = 0;
        }
        None
    }
}

/// Make `frame` all zeros: it is read first, and written only if a byte is not zero. Under
/// QEMU, memory nobody wrote since the machine started reads as zeros cheaply, while the first
/// write to each page costs the host a page fault and QEMU its first-write bookkeeping (about
/// 35 times a later write): a guest's RAM zeroed by writing took some 0.75 s of a 1.6 s boot.
/// Handing out a frame that is already zero is the same as zeroing it, whoever wrote it last.
fn zero(frame: u64) {
    let start = SIGMA0_PHYS_WINDOW + frame;
    let zero = if avx2() {
        // SAFETY: `frame_is_zero_avx2` needs AVX2 with the OS's XCR0 enabling it (checked);
        // it reads the frame, which is in sigma0's window and not yet handed to anyone.
        unsafe { frame_is_zero_avx2(start) }
    } else {
        // SAFETY: as above, with SSE2 (every x86-64 CPU).
        unsafe { frame_is_zero_sse2(start) }
    };
    if !zero {
        // SAFETY: as above: the frame is sigma0's and nobody else's yet.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, PAGE_SIZE as usize) };
    }
}

/// Whether AVX2 can be used: the CPU has it and the kernel enabled the AVX state (XCR0).
fn avx2() -> bool {
    static AVX2: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
    use core::sync::atomic::Ordering::Relaxed;
    match AVX2.load(Relaxed) {
        1 => return false,
        2 => return true,
        _ => {}
    }
    let osxsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 27) != 0;
    let cpu = core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 5) != 0;
    let enabled = osxsave && cpu && {
        let (low, _high): (u32, u32);
        // SAFETY: XGETBV of XCR0 is allowed at any privilege level once OSXSAVE is set.
        unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") _high) };
        low & 6 == 6
    };
    AVX2.store(if enabled { 2 } else { 1 }, Relaxed);
    enabled
}

/// Whether the 4 KiB at `start` (16-byte aligned) are all zero: SSE2 loads ORed together.
///
/// # Safety
/// `start..start + 4096` must be readable.
unsafe fn frame_is_zero_sse2(start: u64) -> bool {
    let mask: u32;
    // SAFETY: per the caller; reads only.
    unsafe {
        core::arch::asm!(
            "pxor xmm0, xmm0",
            "2:",
            "por xmm0, [{p}]",
            "por xmm0, [{p} + 16]",
            "por xmm0, [{p} + 32]",
            "por xmm0, [{p} + 48]",
            "por xmm0, [{p} + 64]",
            "por xmm0, [{p} + 80]",
            "por xmm0, [{p} + 96]",
            "por xmm0, [{p} + 112]",
            "add {p}, 128",
            "cmp {p}, {end}",
            "jne 2b",
            "pxor xmm1, xmm1",
            "pcmpeqb xmm0, xmm1",
            "pmovmskb {mask:e}, xmm0",
            p = inout(reg) start => _,
            end = in(reg) start + PAGE_SIZE,
            mask = out(reg) mask,
            out("xmm0") _,
            out("xmm1") _,
            options(nostack, readonly),
        )
    };
    mask == 0xffff
}

/// [`frame_is_zero_sse2`] with 32-byte AVX2 loads (half the instructions).
///
/// # Safety
/// As for [`frame_is_zero_sse2`], and AVX2 must be usable ([`avx2`]).
unsafe fn frame_is_zero_avx2(start: u64) -> bool {
    let zero: u8;
    // SAFETY: per the caller; reads only.
    unsafe {
        core::arch::asm!(
            "vpxor ymm0, ymm0, ymm0",
            "2:",
            "vpor ymm0, ymm0, [{p}]",
            "vpor ymm0, ymm0, [{p} + 32]",
            "vpor ymm0, ymm0, [{p} + 64]",
            "vpor ymm0, ymm0, [{p} + 96]",
            "vpor ymm0, ymm0, [{p} + 128]",
            "vpor ymm0, ymm0, [{p} + 160]",
            "vpor ymm0, ymm0, [{p} + 192]",
            "vpor ymm0, ymm0, [{p} + 224]",
            "add {p}, 256",
            "cmp {p}, {end}",
            "jne 2b",
            "vptest ymm0, ymm0",
            "setz {zero}",
            "vzeroupper",
            p = inout(reg) start => _,
            end = in(reg) start + PAGE_SIZE,
            zero = out(reg_byte) zero,
            out("ymm0") _,
            options(nostack, readonly),
        )
    };
    zero != 0
}

/// Whether `physical..physical + size` lies in one KIP region of `kind`.
fn in_region(kind: u64, physical: u64, size: u64) -> bool {
    let kip = kip();
    kip.regions[..kip.region_count as usize]
        .iter()
        .any(|r| r.kind == kind && physical >= r.base && physical + size <= r.base + r.size)
}

fn handle(frames: &mut Frames, message: &Received) -> (MessageTag, [u64; 3]) {
    let refuse = (MessageTag::new(-1, 0, 0), [0, 0, 0]);
    match message.tag.label() {
        LABEL_PAGE_FAULT => {
            let address = message.word(0);
            let Some(frame) = frames.allocate() else {
                println!("[sigma0] out of memory at fault {address:#x}");
                return refuse;
            };
            zero(frame);
            let item = MapItem::map(
                address,
                Fpage::memory(SIGMA0_PHYS_WINDOW + frame, 12, Fpage::RWX),
            );
            (MessageTag::new(0, 0, 1), [item.control, item.fpage.0, 0])
        }
        l4::sigma0::LABEL_PHYSICAL => {
            let (physical, order) = (message.word(0), message.word(1));
            if !(12..=30).contains(&order)
                || physical % (1 << order) != 0
                || !(in_region(region_kind::MODULE, physical, 1 << order)
                    || in_region(region_kind::DEVICE, physical, 1 << order))
            {
                println!("[sigma0] refused physical request {physical:#x} order {order}");
                return refuse;
            }
            let item = MapItem::map(
                physical,
                Fpage::memory(SIGMA0_PHYS_WINDOW + physical, order as u32, Fpage::RWX),
            );
            (MessageTag::new(0, 0, 1), [item.control, item.fpage.0, 0])
        }
        l4::sigma0::LABEL_ALLOCATE => {
            let order = message.word(0);
            let Some(base) = (12..=30)
                .contains(&order)
                .then(|| frames.allocate_aligned(1 << order))
                .flatten()
            else {
                println!("[sigma0] cannot allocate 2^{order} bytes");
                return refuse;
            };
            let mut offset = 0;
            while offset < 1 << order {
                zero(base + offset);
                offset += PAGE_SIZE;
            }
            let item = MapItem::map(
                0,
                Fpage::memory(SIGMA0_PHYS_WINDOW + base, order as u32, Fpage::RWX),
            );
            // Word 0: the physical address (what a driver programs a device's DMA with).
            (MessageTag::new(0, 1, 1), [base, item.control, item.fpage.0])
        }
        label => {
            println!("[sigma0] unknown request label {label}");
            refuse
        }
    }
}

fn main() -> i64 {
    let kip = kip();
    let free: u64 = kip.regions[..kip.region_count as usize]
        .iter()
        .filter(|r| r.kind == region_kind::FREE)
        .map(|r| r.size)
        .sum();
    println!("[sigma0] serving {} MiB of free memory", free >> 20);
    let mut frames = Frames {
        region: 0,
        offset: 0,
        handed_out: 0,
        holes: [(0, 0); HOLES],
        hole_count: 0,
    };
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        match message {
            Ok(m) => {
                let (tag, words) = handle(&mut frames, &m);
                message = ipc::reply_wait(tag, &words, Timeouts::INFINITE);
            }
            Err(e) => {
                println!("[sigma0] IPC error {:?}", e);
                message = ipc::wait(Timeouts::INFINITE);
            }
        }
    }
}

l4::main!(main);
