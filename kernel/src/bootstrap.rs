//! From the boot loader's hand-off to the first user threads: the physical memory split
//! (kernel pool, sigma0's memory, boot modules), the KIP, and the creation of sigma0 and the
//! root task from the first two boot modules.

use crate::arch::x86_64::entry::Frame;
use crate::arch::x86_64::paging::{
    has_1g_pages, phys_to_virt, BOOT_DIRECT_MAP, DIRECT_MAP_LIMIT, NO_EXECUTE, PAGE_1G, PAGE_2M,
    PAGE_4K, USER, WRITABLE,
};
use crate::factory::{bind_thread, new_task, new_thread};
use crate::kernel::Kernel;
use crate::memory::FrameSource;
use crate::object::{Capability, Object, TaskId, ThreadId};
use crate::{info, kip};
use alloc::vec::Vec;
use kernel_core::{Arena, FrameAllocator, ReadyQueues};
use l4_abi::{
    region_kind, slots, MemoryRegion, Rights, INITIAL_STACK_TOP, KERNEL_AREA_START,
    SIGMA0_PHYS_WINDOW, USER_START, UTCB_AREA,
};
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

/// Timer interrupts per second.
pub const TIMER_HZ: u64 = 1000;

const MIB: u64 = 1 << 20;

fn page_down(x: u64) -> u64 {
    x & !(PAGE_4K - 1)
}

fn page_up(x: u64) -> u64 {
    (x + PAGE_4K - 1) & !(PAGE_4K - 1)
}

/// `ranges` minus `hole`.
fn subtract(ranges: Vec<(u64, u64)>, hole: (u64, u64)) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (start, end) in ranges {
        if hole.1 <= start || hole.0 >= end {
            out.push((start, end));
            continue;
        }
        if start < hole.0 {
            out.push((start, hole.0));
        }
        if hole.1 < end {
            out.push((hole.1, end));
        }
    }
    out
}

struct Module {
    base: u64,
    end: u64,
    cmdline: alloc::string::String,
}

/// What the boot loader tells: the command line, usable RAM, the modules, and the physical
/// range of its own information (kept until the kernel has copied what it needs).
struct LoaderInfo {
    cmdline: Option<alloc::string::String>,
    available: Vec<(u64, u64)>,
    modules: Vec<Module>,
    info: (u64, u64),
}

/// The multiboot2 magic in EAX (GRUB's `multiboot2`).
pub const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// The Multiboot (v1) magic in EAX (QEMU's `-kernel`, GRUB's `multiboot`).
pub const MULTIBOOT1_MAGIC: u32 = 0x2bad_b002;

fn from_multiboot2(multiboot_info: u64) -> LoaderInfo {
    // SAFETY: the boot loader left a valid multiboot2 information structure at this address,
    // which lies in the direct map; it stays intact until we hand memory out below.
    let boot = unsafe {
        BootInformation::load(phys_to_virt(multiboot_info) as *const BootInformationHeader)
    }
    .unwrap_or_else(|e| panic!("invalid multiboot2 information: {e:?}"));
    let mut available = Vec::new();
    let memory_map = boot
        .memory_map_tag()
        .expect("boot loader gave no memory map");
    for area in memory_map.memory_areas() {
        if MemoryAreaType::from(area.typ()) == MemoryAreaType::Available {
            available.push((area.start_address(), area.end_address()));
        }
    }
    LoaderInfo {
        cmdline: boot
            .command_line_tag()
            .and_then(|t| t.cmdline().ok())
            .map(Into::into),
        available,
        modules: boot
            .module_tags()
            .map(|m| Module {
                base: m.start_address() as u64,
                end: m.end_address() as u64,
                cmdline: m.cmdline().unwrap_or("").into(),
            })
            .collect(),
        info: (multiboot_info, multiboot_info + boot.total_size() as u64),
    }
}

/// A `u32` of the boot loader's information at physical `address` (below 4 GiB).
fn physical_u32(address: u64) -> u32 {
    // SAFETY: the boot page tables map the first 4 GiB in the direct map; the loader's
    // information lies there (its pointers are 32 bits), and nothing has reused it yet.
    unsafe { core::ptr::read_unaligned(phys_to_virt(address) as *const u32) }
}

/// A NUL-terminated string of the loader (at most 4 KiB), and the physical end of it.
fn physical_string(address: u64) -> (alloc::string::String, u64) {
    let mut bytes = Vec::new();
    while bytes.len() < 4096 {
        // SAFETY: as for `physical_u32`.
        let b = unsafe { *(phys_to_virt(address + bytes.len() as u64) as *const u8) };
        if b == 0 {
            break;
        }
        bytes.push(b);
    }
    let end = address + bytes.len() as u64 + 1;
    (
        alloc::string::String::from_utf8_lossy(&bytes).into_owned(),
        end,
    )
}

/// Without its first word: a Multiboot 1 command line starts with the file's name (QEMU's
/// `-kernel`/`-initrd` and GRUB legacy put it there).
fn without_file_name(text: &str) -> alloc::string::String {
    text.trim_start()
        .split_once(char::is_whitespace)
        .map_or("", |(_, rest)| rest)
        .trim()
        .into()
}

fn from_multiboot1(info: u64) -> LoaderInfo {
    let flags = physical_u32(info);
    let mut end = info + 88;
    let cmdline = (flags & (1 << 2) != 0).then(|| {
        let (text, string_end) = physical_string(physical_u32(info + 16) as u64);
        end = end.max(string_end);
        without_file_name(&text)
    });
    let mut modules = Vec::new();
    if flags & (1 << 3) != 0 {
        let (count, list) = (
            physical_u32(info + 20) as u64,
            physical_u32(info + 24) as u64,
        );
        for i in 0..count.min(64) {
            let entry = list + 16 * i;
            let (text, string_end) = physical_string(physical_u32(entry + 8) as u64);
            end = end.max(entry + 16).max(string_end);
            modules.push(Module {
                base: physical_u32(entry) as u64,
                end: physical_u32(entry + 4) as u64,
                cmdline: without_file_name(&text),
            });
        }
    }
    let mut available = Vec::new();
    if flags & (1 << 6) != 0 {
        let (length, map) = (
            physical_u32(info + 44) as u64,
            physical_u32(info + 48) as u64,
        );
        let mut entry = map;
        while entry + 24 <= map + length {
            let size = physical_u32(entry) as u64;
            let base = physical_u32(entry + 4) as u64 | (physical_u32(entry + 8) as u64) << 32;
            let bytes = physical_u32(entry + 12) as u64 | (physical_u32(entry + 16) as u64) << 32;
            if physical_u32(entry + 20) == 1 {
                available.push((base, base.saturating_add(bytes)));
            }
            entry += size + 4;
        }
    } else if flags & (1 << 0) != 0 {
        // Only mem_upper: the KiB of RAM from 1 MiB.
        available.push((MIB, MIB + physical_u32(info + 8) as u64 * 1024));
    }
    if available.is_empty() {
        panic!("the Multiboot loader gave no memory map (flags {flags:#x})");
    }
    LoaderInfo {
        cmdline,
        available,
        modules,
        info: (info, end),
    }
}

/// Parse the boot information (multiboot2 from GRUB, or Multiboot 1 from QEMU's `-kernel`),
/// set up memory and the KIP, create sigma0 and the root task.
pub fn boot(magic: u32, multiboot_info: u64) -> Kernel {
    extern "C" {
        static __kernel_phys_end: u8;
    }
    // Only the symbol's address is used.
    let kernel_end = &raw const __kernel_phys_end as u64;
    let loader = match magic {
        MULTIBOOT2_MAGIC => from_multiboot2(multiboot_info),
        MULTIBOOT1_MAGIC => from_multiboot1(multiboot_info),
        other => panic!("not booted by a Multiboot loader (magic {other:#x})"),
    };
    let mut eager_fpu = false;
    let mut kmem: Option<alloc::string::String> = None;
    if let Some(cmdline) = loader.cmdline.as_deref() {
        info!("command line: {cmdline}");
        kmem = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("kmem="))
            .map(Into::into);
        eager_fpu = cmdline.contains("eagerfpu");
        if cmdline.contains("nofastpath") {
            crate::arch::x86_64::entry::disable_fastpath();
        }
        if cmdline.contains("debug") {
            // SAFETY: single-threaded boot.
            unsafe { crate::log::MAX_LEVEL = crate::log::Level::Debug };
        }
    }
    let mut available: Vec<(u64, u64)> = Vec::new();
    for &(start, end) in &loader.available {
        let start = page_up(start);
        let end = page_down(end).min(DIRECT_MAP_LIMIT);
        if start < end {
            available.push((start, end));
        }
    }
    let modules = loader.modules;
    let mut free = available;
    free = subtract(free, (0, MIB));
    free = subtract(free, (page_down(0x100000), page_up(kernel_end)));
    free = subtract(free, (page_down(loader.info.0), page_up(loader.info.1)));
    for m in &modules {
        free = subtract(free, (page_down(m.base), page_up(m.end)));
    }
    let total: u64 = free.iter().map(|(s, e)| e - s).sum();
    // The kernel pool: a fraction of memory (kernel_core::pool_size, `kmem=SIZE` overrides),
    // from the largest free piece the boot page tables map.
    let (pool_size, refused) = kernel_core::pool_size::pool_size(total, kmem.as_deref());
    if let Some(why) = refused {
        crate::warn!(
            "kmem={} not taken ({why:?}: between 16 MiB and half of memory); using the default",
            kmem.as_deref().unwrap_or("")
        );
    }
    let largest = free
        .iter()
        .map(|&(s, e)| (s, e.min(BOOT_DIRECT_MAP)))
        .filter(|(s, e)| s < e)
        .max_by_key(|(s, e)| e - s)
        .expect("no free memory below 4 GiB");
    let pool_start = (largest.0 + PAGE_2M - 1) & !(PAGE_2M - 1);
    let pool_end = (pool_start + pool_size).min(page_down(largest.1));
    assert!(
        pool_end > pool_start + 4 * MIB,
        "not enough memory for the kernel pool"
    );
    free = subtract(free, (pool_start, pool_end));
    info!(
        "memory: {} MiB free, kernel pool {:#x}..{:#x} ({} MiB), {} boot modules",
        total / MIB,
        pool_start,
        pool_end,
        (pool_end - pool_start) / MIB,
        modules.len()
    );
    // What the kernel keeps beyond all quotas: sigma0's page tables and the mapping nodes of
    // the memory it hands out (one per 2 MiB at most, with their index), and a margin.
    let reserve = 2 * MIB + total / PAGE_2M * 512 + (pool_end - pool_start) / 64;
    let mut frames = crate::memory::init_pool(
        FrameAllocator::new(pool_start, ((pool_end - pool_start) / PAGE_4K) as usize),
        reserve,
    );
    let memory_end = free.iter().map(|&(_, e)| e).max().unwrap_or(0);
    if memory_end > BOOT_DIRECT_MAP {
        let reached = crate::arch::x86_64::paging::extend_direct_map(memory_end, &mut frames);
        if reached < memory_end {
            crate::warn!(
                "memory above {} MiB is not used (direct map limit)",
                reached / MIB
            );
            free = subtract(free, (reached, u64::MAX));
        }
    }
    let kip_frame = frames.allocate_zeroed().expect("frame for the KIP");
    kip::init(kip_frame, TIMER_HZ);
    for (start, end) in &free {
        if !kip::add_region(
            kip_frame,
            MemoryRegion {
                base: *start,
                size: end - start,
                kind: region_kind::FREE,
            },
        ) {
            crate::warn!("KIP full: memory {start:#x}..{end:#x} not given to sigma0");
        }
    }
    // The PCI hole below 4 GiB, from above all RAM (and at least 3 GiB) to below the IOAPIC,
    // HPET and local APIC pages, which the kernel keeps: where the firmware puts PCI memory BARs.
    let top_of_low_ram = free
        .iter()
        .map(|&(_, end)| end)
        .chain(modules.iter().map(|m| page_up(m.end)))
        .filter(|&end| end <= 1 << 32)
        .max()
        .unwrap_or(0)
        .max(0xc000_0000);
    if top_of_low_ram < DEVICE_MEMORY_END {
        kip::add_region(
            kip_frame,
            MemoryRegion {
                base: top_of_low_ram,
                size: DEVICE_MEMORY_END - top_of_low_ram,
                kind: region_kind::DEVICE,
            },
        );
    }
    for m in &modules {
        kip::add_region(
            kip_frame,
            MemoryRegion {
                base: page_down(m.base),
                size: page_up(m.end) - page_down(m.base),
                kind: region_kind::MODULE,
            },
        );
        if !kip::add_module(kip_frame, m.base, m.end - m.base, &m.cmdline) {
            crate::warn!("KIP full: module {} not listed", m.cmdline);
        }
    }

    let mut k = Kernel {
        tasks: Arena::new(),
        threads: Arena::new(),
        gates: Arena::new(),
        irqs: Arena::new(),
        quotas: Arena::new(),
        vms: Arena::new(),
        vcpus: Arena::new(),
        svm: None,
        irq_lines: [None; crate::irq::LINES],
        io_owner: None,
        memory_db: kernel_core::MappingDatabase::new(crate::map::MEMORY_ORDERS),
        io_db: kernel_core::MappingDatabase::new(crate::map::UNIT_ORDERS),
        cap_db: kernel_core::MappingDatabase::new(crate::map::UNIT_ORDERS),
        frames,
        ready: ReadyQueues::new(),
        current: None,
        preempt: false,
        ticks: 0,
        pending_irqs: 0,
        fs_base: 0,
        loaded_root: 0,
        timer_hz: TIMER_HZ,
        timeouts: Vec::new(),
        reaping: Vec::new(),
        dying_vms: Vec::new(),
        waiter_scan: None,
        waiter_rescan: false,
        kip_frame,
        next_thread_number: 0,
        fpu: crate::fpu::Fpu::init(eager_fpu),
    };

    k.svm = crate::arch::x86_64::svm::init(&mut k.frames);
    if modules.len() < 2 {
        panic!(
            "need at least two boot modules (sigma0 and the root task), got {}",
            modules.len()
        );
    }
    // sigma0 is the kernel's own creation (an unlimited quota, bounded by what it can hold:
    // see the reserve above). The root task and everything it creates are charged to the
    // root quota: what is left of the pool after sigma0 minus the reserve, so that the sum of
    // the top-level quotas never exceeds what the pool can give.
    let boot_quota = k.quotas.insert(kernel_core::Quota::new(u64::MAX));
    let (sigma0, sigma0_thread) = start_module(&mut k, &modules[0], "sigma0", boot_quota);
    map_sigma0_window(&mut k, sigma0);
    // sigma0's stack: 64 KiB, mapped up front (sigma0 has no pager).
    let space = k.tasks.get(sigma0).expect("sigma0").space;
    for page in 0..16u64 {
        let frame = k
            .frames
            .allocate_zeroed()
            .expect("frame for sigma0's stack");
        space
            .map(
                INITIAL_STACK_TOP - (page + 1) * PAGE_4K,
                frame,
                PAGE_4K,
                USER | WRITABLE | NO_EXECUTE,
                &mut k.frames,
            )
            .expect("map sigma0 stack");
    }
    // (Less what loading the root task's image takes from the pool uncharged.)
    let root_image = 2 * (modules[1].end - modules[1].base) + MIB;
    let root_quota_bytes = crate::memory::available().saturating_sub(reserve + root_image);
    let root_quota = k.quotas.insert(kernel_core::Quota::new(root_quota_bytes));
    let (root, root_thread) = start_module(&mut k, &modules[1], "root", root_quota);
    let pager = Capability {
        object: Object::Thread(sigma0_thread),
        rights: Rights::SEND,
        badge: 0,
    };
    let caps = &mut k.tasks.get_mut(root).expect("root").caps;
    caps.insert(
        slots::FACTORY,
        Capability::full(Object::Factory(root_quota)),
    )
    .expect("slot");
    caps.insert(slots::PAGER, pager).expect("slot");
    caps.insert(slots::PLATFORM, Capability::full(Object::Platform))
        .expect("slot");
    for object in [Object::Factory(root_quota), pager.object, Object::Platform] {
        crate::lifetime::acquire(&mut k, root, object);
    }
    k.thread(root_thread).pager = Some(pager);
    // The root task holds every I/O port; it hands them out with I/O flexpages.
    k.tasks.get_mut(root).expect("root").io_bitmap =
        Some(alloc::boxed::Box::new([0; crate::task::IO_BITMAP_BYTES]));
    k.mark_io_task(root);
    k.wake(sigma0_thread);
    k.wake(root_thread);
    info!(
        "sigma0 and root task started; kernel pool {} of {} frames free, root quota {} KiB, \
         kernel reserve {} KiB",
        k.frames.free_frames(),
        k.frames.total_frames(),
        root_quota_bytes >> 10,
        reserve >> 10
    );
    k
}

/// Create a task from an ELF boot module with one thread at its entry point and the
/// capabilities to itself.
fn start_module(
    k: &mut Kernel,
    module: &Module,
    name: &str,
    quota: crate::object::QuotaId,
) -> (TaskId, ThreadId) {
    // SAFETY: the boot loader placed the module at this physical range (in the direct map),
    // and the memory is reserved for it.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            phys_to_virt(module.base) as *const u8,
            (module.end - module.base) as usize,
        )
    };
    let limits = l4_elf::Limits {
        min_vaddr: USER_START,
        user_limit: KERNEL_AREA_START.min(SIGMA0_PHYS_WINDOW),
    };
    let image = l4_elf::parse(bytes, limits).unwrap_or_else(|e| {
        panic!(
            "boot module '{}' ({name}) is not a loadable ELF image: {e}",
            module.cmdline
        )
    });
    let task = new_task(k, name, quota).expect("memory for a boot task");
    k.tasks.get_mut(task).expect("task").loaded_at_boot = true;
    let space = k.tasks.get(task).expect("task").space;
    for segment in image.segments() {
        let first = page_down(segment.vaddr);
        let last = page_up(segment.vaddr + segment.mem_size);
        let mut page = first;
        while page < last {
            let frame = k
                .frames
                .allocate_zeroed()
                .expect("memory for a boot task image");
            // Copy the part of the file that falls into this page.
            let file_start = segment.vaddr;
            let file_end = segment.vaddr + segment.file_size;
            let copy_start = page.max(file_start);
            let copy_end = (page + PAGE_4K).min(file_end);
            if copy_start < copy_end {
                let offset = (segment.file_offset + (copy_start - file_start)) as usize;
                let length = (copy_end - copy_start) as usize;
                let destination = phys_to_virt(frame) + (copy_start - page);
                // SAFETY: the source lies within the module (checked by the ELF parser), the
                // destination within the fresh frame.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        bytes.as_ptr().add(offset),
                        destination as *mut u8,
                        length,
                    )
                };
            }
            let mut flags = USER;
            if segment.writable {
                flags |= WRITABLE;
            }
            if !segment.executable {
                flags |= NO_EXECUTE;
            }
            space
                .map(page, frame, PAGE_4K, flags, &mut k.frames)
                .expect("map boot image");
            page += PAGE_4K;
        }
    }
    let thread = new_thread(k, quota).expect("memory for a boot thread");
    bind_thread(k, thread, task, UTCB_AREA).expect("bind boot thread");
    k.thread(thread).frame = Frame::new_user(image.entry, INITIAL_STACK_TOP);
    let caps = &mut k.tasks.get_mut(task).expect("task").caps;
    caps.insert(slots::SELF_TASK, Capability::full(Object::Task(task)))
        .expect("slot");
    caps.insert(slots::SELF_THREAD, Capability::full(Object::Thread(thread)))
        .expect("slot");
    crate::lifetime::acquire(k, task, Object::Task(task));
    crate::lifetime::acquire(k, task, Object::Thread(thread));
    // The kernel's own reference: a boot task is never released (nobody else names it).
    k.tasks.get_mut(task).expect("task").references += 1;
    info!(
        "loaded {name} ('{}'): entry {:#x}, {} segments",
        module.cmdline,
        image.entry,
        image.segments().len()
    );
    (task, thread)
}

/// Device memory sigma0 may hand out: the PCI hole below 4 GiB, from above all RAM (and at
/// least 3 GiB) to below the IOAPIC, HPET and local APIC pages, which the kernel keeps.
pub const DEVICE_MEMORY_END: u64 = 0xfec0_0000;

/// Map every region sigma0 owns at `SIGMA0_PHYS_WINDOW + physical`: its RAM and modules, and
/// the device memory of the PCI hole (for user-level drivers, through the root task).
fn map_sigma0_window(k: &mut Kernel, sigma0: TaskId) {
    let space = k.tasks.get(sigma0).expect("sigma0").space;
    let kip = kip::kip_mut(k.kip_frame);
    let regions: Vec<MemoryRegion> = kip.regions[..kip.region_count as usize].to_vec();
    let top_of_low_ram = regions
        .iter()
        .filter(|r| r.base < 1 << 32)
        .map(|r| r.base + r.size)
        .max()
        .unwrap_or(0)
        .max(0xc000_0000)
        .next_multiple_of(PAGE_4K);
    let device =
        (top_of_low_ram < DEVICE_MEMORY_END).then_some((top_of_low_ram, DEVICE_MEMORY_END));
    let ranges = regions
        .iter()
        .map(|r| (r.base, r.base + r.size))
        .chain(device);
    // The largest page that fits, so that sigma0 can hand out 2 MiB and (where the CPU has
    // them) 1 GiB pages that stay large all the way to a VM's nested page tables.
    let sizes: &[u64] = if has_1g_pages() {
        &[PAGE_1G, PAGE_2M, PAGE_4K]
    } else {
        &[PAGE_2M, PAGE_4K]
    };
    for (base, end) in ranges.collect::<Vec<_>>() {
        let mut physical = base;
        while physical < end {
            let size = sizes
                .iter()
                .copied()
                .find(|&size| physical % size == 0 && physical + size <= end)
                .unwrap_or(PAGE_4K);
            space
                .map(
                    SIGMA0_PHYS_WINDOW + physical,
                    physical,
                    size,
                    USER | WRITABLE,
                    &mut k.frames,
                )
                .expect("map sigma0 window");
            physical += size;
        }
    }
}
