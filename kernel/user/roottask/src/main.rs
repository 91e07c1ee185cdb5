//! The root task. It loads the ELF boot modules after itself (rejecting malformed images with a
//! clear message), creates a task and a thread for each, gives each only the capabilities its
//! command line asks for, and then serves as their pager (ELF pages, stack and heap, with memory
//! it gets from sigma0) and parent: it reports each task's exit, destroys it, and powers the
//! machine off when all are done.
//!
//! Module command line: `[/path] NAME [OPTION...]`:
//! - `factory` gives the task the root task's own factory capability, `factory=SIZE` a factory
//!   of its own with a quota of SIZE bytes of kernel memory (all it may ever use);
//! - `platform` the platform capability (IRQs, shutdown), `irq=LINE` only an IRQ object for
//!   LINE (slot `IRQ`), `io=PORT/ORDER` the 2^ORDER I/O ports from hexadecimal PORT;
//! - `peer=OTHER` gives it, in slot `PEER`, a gate to OTHER's first thread;
//! - `blob=NAME` maps the data module NAME read-only (`blob=AS:NAME`: the task sees it as AS);
//! - `device-memory` lets it ask for device registers in the PCI hole below 4 GiB
//!   (`l4::sigma0::LABEL_PHYSICAL` to its pager), for a device driver;
//! - `dma=SIZE` maps physically contiguous memory and tells the child its physical address
//!   (`dma:ADDRESS+SIZE@PHYSICAL` in its arguments), for a device driver;
//! - `ram=SIZE` lets it request that much RAM in 2 MiB pages (`l4::parent::LABEL_RAM`);
//! - `console=SERVER` makes it a client of the console server task SERVER, whose arguments
//!   list it as `client=NAME`: a gate to the server (slot `CONSOLE`, badge = its position in
//!   that list + 1) and a software IRQ attached to its first thread, which the server holds in
//!   slot `CONSOLE_CLIENTS + position` to tell it that input waits;
//! - `net=SWITCH` likewise makes it a port of the switch task SWITCH (`port=NAME`): gate in
//!   slot `NET`, notification IRQ in the switch's slot `NET_PORTS + position`;
//! - `monitor=SYSMON` makes it a client of the syscall monitor SYSMON (`client=NAME`; the
//!   L4Linux mode): a gate in slot `MONITOR`, no notification;
//! - `priority=P` its first thread's priority (at most the root task's, 100), `timeslice=MS`
//!   its time slice (1..=1000 ms; threads of one priority share the CPU round-robin, each for
//!   its slice, so the slices set their shares);
//! - `service`: a server that runs for good; the machine powers off when all other tasks end;
//! - `restart=N`: if it fails (exits with a non-zero code, raises an unhandled exception or is
//!   killed), it is destroyed, all its memory reclaimed, and started again after 1, 2, 4 ...
//!   seconds, at most N times.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use l4::abi::MapFlags;
use l4::abi::{
    slots, Error, ExRegsFlags, FaultAccess, Fpage, IrqOp, MapItem, MessageTag, ObjectKind, Rights,
    Timeout, Timeouts, INITIAL_STACK_TOP, KERNEL_AREA_START, LABEL_DEATH, LABEL_EXIT,
    LABEL_PAGE_FAULT, PAGE_SIZE, USER_START, UTCB_AREA,
};
use l4::ipc::{self, Received};
use l4::parent::RAM_GRANULE;
use l4::thread::alloc_slot;
use l4::{println, sys};
use l4_elf::{Image, Limits};

/// Where boot module `i` is mapped in the root task.
const MODULE_WINDOW: u64 = 0x0000_3000_0000_0000;
/// Where the root task keeps the pages it hands to its children.
const POOL_BASE: u64 = 0x0000_2000_0000_0000;
/// Where a child with the `blob=NAME` option finds the data module NAME.
pub const BLOB_ADDRESS: u64 = 0x0000_0900_0000_0000;
/// Where the root task keeps 2 MiB pages for children (module index * 2 MiB).
const SUPERPAGE_WINDOW: u64 = 0x0000_2800_0000_0000;
/// Where the root task keeps device memory it passes on (at its physical address from here).
const DEVICE_WINDOW: u64 = 0x0000_2e00_0000_0000;

/// Whether `physical..physical + size` is device memory (the KIP's `region_kind::DEVICE`),
/// the only memory a child with `device-memory` may ask for.
fn is_device_memory(physical: u64, size: u64) -> bool {
    let kip = l4::kip::kip();
    kip.regions[..kip.region_count as usize].iter().any(|r| {
        r.kind == l4::abi::region_kind::DEVICE
            && physical >= r.base
            && physical
                .checked_add(size)
                .is_some_and(|end| end <= r.base + r.size)
    })
}
/// Where the root task keeps DMA memory for children (module index * 2 MiB).
const DMA_WINDOW: u64 = 0x0000_2a00_0000_0000;
/// Where a child with the `dma=SIZE` option finds it (`dma:ADDRESS+SIZE@PHYSICAL`).
pub const DMA_ADDRESS: u64 = 0x0000_0a00_0000_0000;
/// Where a child with the `superpage` option finds its 2 MiB page.
pub const SUPERPAGE_ADDRESS: u64 = 0x0000_0800_0000_0000;
/// Where the root task keeps the 2 MiB pages of RAM it gives children on request.
const RAM_WINDOW: u64 = 0x0000_2c00_0000_0000;
/// Where our 1 GiB pages of RAM for children are (1 GiB aligned).
const RAM_WINDOW_1G: u64 = 0x0000_2d00_0000_0000;
/// A 1 GiB page.
const GIB: u64 = 1 << 30;
/// Stack bytes a child may use below `INITIAL_STACK_TOP`.
const CHILD_STACK: u64 = 1 << 20;
/// QEMU isa-debug-exit codes: all tasks exited with 0 / something failed.
const EXIT_SUCCESS: u64 = l4::abi::qemu_exit::SUCCESS as u64;
const EXIT_FAILURE: u64 = l4::abi::qemu_exit::FAILURE as u64;

struct Child {
    name: String,
    /// The boot module it runs, and that module's command line.
    module: usize,
    module_cmdline: &'static str,
    cmdline: String,
    image: Image,
    bytes: &'static [u8],
    task: u64,
    thread: u64,
    peer: Option<String>,
    pages: Vec<u64>,
    /// RAM the child may request (`ram=SIZE`), and the 2 MiB and 1 GiB pages it has (root
    /// addresses).
    ram_budget: u64,
    ram: Vec<u64>,
    ram_1g: Vec<u64>,
    running: bool,
    /// `console=SERVER`: the server's name, and our slot of its notification IRQ once made.
    /// `console=SERVER`, `net=SWITCH` and `monitor=SYSMON`: the servers' names, and our slots
    /// of the notification IRQs once made (they outlive a restart).
    services: [Option<String>; 3],
    notify_irqs: [Option<u64>; 3],
    service: bool,
    /// Restarts left (`restart=N`), done so far, and when the next one is due (TSC).
    restarts_left: u32,
    restarts: u32,
    restart_at: Option<u64>,
    /// Every slot of ours made for it (released when it is gone).
    made: Vec<u64>,
    /// Its own factory (`factory=SIZE`), kept after it ended until we checked that the
    /// factory holds nothing any more.
    factory: Option<u64>,
}

/// 2 MiB and 1 GiB pages of RAM for children: fresh ones from sigma0, or ones a finished
/// child had.
struct RamPool {
    next: u64,
    free: Vec<u64>,
    next_1g: u64,
    free_1g: Vec<u64>,
    /// Set once sigma0 had no 1 GiB page (it is not asked again).
    no_more_1g: bool,
}

impl Child {
    /// Bytes of RAM it holds.
    fn ram_bytes(&self) -> u64 {
        self.ram.len() as u64 * RAM_GRANULE + self.ram_1g.len() as u64 * GIB
    }
}

impl RamPool {
    /// A zeroed 1 GiB page mapped in the root task, if sigma0 has one (a 1 GiB page of its
    /// window: the kernel keeps it one page, and one mapping node, all the way to a VM).
    fn take_1g(&mut self) -> Option<u64> {
        if let Some(page) = self.free_1g.pop() {
            // SAFETY: a page of ours that no child holds any more.
            unsafe { core::ptr::write_bytes(page as *mut u8, 0, GIB as usize) };
            return Some(page);
        }
        if self.no_more_1g {
            return None;
        }
        let at = self.next_1g;
        match l4::sigma0::allocate(slots::PAGER, 30, Fpage::memory(at, 30, Fpage::RWX)) {
            Ok(true) => {
                self.next_1g += GIB;
                Some(at)
            }
            _ => {
                self.no_more_1g = true;
                None
            }
        }
    }

    /// A zeroed 2 MiB page mapped in the root task.
    fn take(&mut self) -> Option<u64> {
        if let Some(page) = self.free.pop() {
            // SAFETY: a page of ours that no child holds any more.
            unsafe { core::ptr::write_bytes(page as *mut u8, 0, RAM_GRANULE as usize) };
            return Some(page);
        }
        let at = self.next;
        match l4::sigma0::allocate(slots::PAGER, 21, Fpage::memory(at, 21, Fpage::RWX)) {
            Ok(true) => {
                self.next += RAM_GRANULE;
                Some(at)
            }
            _ => None,
        }
    }
}

/// Give `child` `bytes` of RAM at `address` in its address space (the `LABEL_RAM` request).
fn give_ram(child: &mut Child, pool: &mut RamPool, address: u64, bytes: u64) -> Result<(), Error> {
    let end = address.checked_add(bytes).ok_or(Error::InvalidArgument)?;
    if bytes == 0
        || !bytes.is_multiple_of(RAM_GRANULE)
        || !address.is_multiple_of(RAM_GRANULE)
        || address < USER_START
        || end > KERNEL_AREA_START
    {
        return Err(Error::InvalidArgument);
    }
    let held = child.ram_bytes();
    if held + bytes > child.ram_budget {
        return Err(Error::OutOfMemory);
    }
    let mut at = address;
    while at < end {
        if at.is_multiple_of(GIB) && end - at >= GIB {
            if let Some(page) = pool.take_1g() {
                if let Err(e) = sys::map(
                    child.task,
                    Fpage::memory(page, 30, Fpage::RWX),
                    at,
                    MapFlags::empty(),
                ) {
                    pool.free_1g.push(page);
                    return Err(e);
                }
                child.ram_1g.push(page);
                at += GIB;
                continue;
            }
        }
        let page = pool.take().ok_or(Error::OutOfMemory)?;
        if let Err(e) = sys::map(
            child.task,
            Fpage::memory(page, 21, Fpage::RWX),
            at,
            MapFlags::empty(),
        ) {
            pool.free.push(page);
            return Err(e);
        }
        child.ram.push(page);
        at += RAM_GRANULE;
    }
    Ok(())
}

struct Pool {
    next: u64,
    free: Vec<u64>,
}

impl Pool {
    fn allocate(&mut self) -> u64 {
        if let Some(page) = self.free.pop() {
            // SAFETY: a page of the pool, mapped in this task and no longer mapped elsewhere.
            unsafe { core::ptr::write_bytes(page as *mut u8, 0, PAGE_SIZE as usize) };
            return page;
        }
        let page = self.next;
        self.next += PAGE_SIZE;
        // Touch the page so that sigma0 maps a fresh zeroed frame here.
        // SAFETY: the pool region is reserved for this purpose; reading faults it in.
        unsafe { core::ptr::read_volatile(page as *const u8) };
        page
    }
}

fn module_name(cmdline: &str) -> (String, Vec<String>) {
    let mut words = cmdline.split_whitespace().filter(|w| !w.starts_with('/'));
    let name = words.next().unwrap_or("unnamed").into();
    (name, words.map(String::from).collect())
}

/// Map module `index` (physical range) into the module window, page by page, through sigma0.
fn map_module(index: usize, base: u64, size: u64) -> Option<&'static [u8]> {
    let first = base & !(PAGE_SIZE - 1);
    let end = (base + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let mut page = first;
    while page < end {
        // The window keeps the physical offset within 2 MiB, so both ends are aligned alike:
        // a 10 MiB module takes a few dozen requests to sigma0 instead of some 2,500.
        let order = piece_order(page, end);
        match l4::sigma0::request_physical(
            slots::PAGER,
            page,
            order,
            Fpage::memory(module_address(index, page), order, Fpage::RWX),
        ) {
            Ok(true) => {}
            _ => return None,
        }
        page += 1 << order;
    }
    // SAFETY: the pages were just mapped into this window and stay mapped.
    Some(unsafe {
        core::slice::from_raw_parts(module_address(index, base) as *const u8, size as usize)
    })
}

/// The order of the next piece to map of the page range `page..end` (4 KiB aligned): 2 MiB
/// where a whole aligned 2 MiB is left, else 4 KiB.
fn piece_order(page: u64, end: u64) -> u32 {
    if page.is_multiple_of(RAM_GRANULE) && page + RAM_GRANULE <= end {
        21
    } else {
        12
    }
}

/// Where byte `physical` of boot module `index` is mapped in the root task: in the module's
/// 1 GiB window, at the same offset within 2 MiB as physically (so that whole 2 MiB pieces
/// of the module map as 2 MiB pages).
fn module_address(index: usize, physical: u64) -> u64 {
    let kip = l4::kip::kip();
    let origin = kip.modules[index].base & !(RAM_GRANULE - 1);
    MODULE_WINDOW + index as u64 * (1 << 30) + (physical - origin)
}

/// Capability slots of ours, reused after a child is gone (a child that restarts again and
/// again must not use up the table).
struct Slots(Vec<u64>);

impl Slots {
    fn take(&mut self) -> u64 {
        self.0.pop().unwrap_or_else(alloc_slot)
    }

    /// Delete the capability in `slot` and keep the slot for reuse.
    fn release(&mut self, slot: u64) {
        let _ = sys::cap_delete(slot);
        self.0.push(slot);
    }
}

/// What a child was made of, in our slots, so that a failed creation takes back all of it.
struct Made<'a> {
    slots: &'a mut Slots,
    made: Vec<u64>,
    task: Option<u64>,
}

impl Made<'_> {
    fn slot(&mut self) -> u64 {
        let slot = self.slots.take();
        self.made.push(slot);
        slot
    }

    fn undo(mut self) {
        if let Some(task) = self.task {
            let _ = sys::task_destroy(task);
        }
        for slot in core::mem::take(&mut self.made).into_iter().rev() {
            self.slots.release(slot);
        }
    }
}

fn create(
    index: usize,
    cmdline: &'static str,
    bytes: &'static [u8],
    blobs: &[(String, u64, u64)],
    gate_badge: u64,
    slots_: &mut Slots,
) -> Result<Child, String> {
    let mut made = Made {
        slots: slots_,
        made: Vec::new(),
        task: None,
    };
    match build(index, cmdline, bytes, blobs, gate_badge, &mut made) {
        Ok(child) => Ok(child),
        Err(e) => {
            made.undo();
            Err(e)
        }
    }
}

fn build(
    index: usize,
    module_cmdline: &'static str,
    bytes: &'static [u8],
    blobs: &[(String, u64, u64)],
    gate_badge: u64,
    made: &mut Made,
) -> Result<Child, String> {
    let (name, options) = module_name(module_cmdline);
    let limits = Limits {
        min_vaddr: USER_START,
        user_limit: l4::rt::HEAP_BASE.min(KERNEL_AREA_START),
    };
    let image = l4_elf::parse(bytes, limits)
        .map_err(|e| alloc::format!("module {index} ({name}) rejected: {e}"))?;
    let fail = |what: &str, e: l4::Error| alloc::format!("creating {name}: {what}: {e}");
    // `factory=SIZE`: the child's own factory, from which everything for it is made too (its
    // task, page tables, thread and gate), so that it holds all the child's kernel memory.
    let mut own_factory = None;
    for size in options.iter().filter_map(|o| o.strip_prefix("factory=")) {
        let quota = l4::abi::parse_size(size)
            .filter(|&q| q > 0)
            .ok_or_else(|| alloc::format!("creating {name}: bad factory option '{size}'"))?;
        let slot = made.slot();
        sys::factory_create(slots::FACTORY, ObjectKind::Factory, slot, quota, 0)
            .map_err(|e| fail("its factory", e))?;
        own_factory = Some(slot);
    }
    let factory = own_factory.unwrap_or(slots::FACTORY);
    let task = made.slot();
    sys::factory_create(factory, ObjectKind::Task, task, 0, 0).map_err(|e| fail("task", e))?;
    made.task = Some(task);
    let thread = made.slot();
    sys::factory_create(factory, ObjectKind::Thread, thread, 0, 0)
        .map_err(|e| fail("thread", e))?;
    let gate = made.slot();
    sys::factory_create(
        factory,
        ObjectKind::Gate,
        gate,
        slots::SELF_THREAD,
        gate_badge,
    )
    .map_err(|e| fail("gate", e))?;
    sys::thread_control(thread, task, UTCB_AREA, gate, gate)
        .map_err(|e| fail("thread_control", e))?;
    sys::cap_copy(task, task, slots::SELF_TASK, Rights::all(), 0)
        .map_err(|e| fail("self task", e))?;
    sys::cap_copy(task, thread, slots::SELF_THREAD, Rights::all(), 0)
        .map_err(|e| fail("self thread", e))?;
    sys::cap_copy(task, gate, slots::PAGER, Rights::SEND, 0).map_err(|e| fail("pager", e))?;
    sys::cap_copy(task, gate, slots::PARENT, Rights::SEND, 0).map_err(|e| fail("parent", e))?;
    if options.iter().any(|o| o == "factory") || own_factory.is_some() {
        sys::cap_copy(task, factory, slots::FACTORY, Rights::all(), 0)
            .map_err(|e| fail("factory", e))?;
    }
    if options.iter().any(|o| o == "platform") {
        sys::cap_copy(task, slots::PLATFORM, slots::PLATFORM, Rights::all(), 0)
            .map_err(|e| fail("platform", e))?;
    }
    for line in options.iter().filter_map(|o| o.strip_prefix("irq=")) {
        let line = line
            .parse::<u64>()
            .map_err(|_| alloc::format!("creating {name}: bad irq option '{line}'"))?;
        let slot = made.slot();
        sys::factory_create(slots::PLATFORM, ObjectKind::Irq, slot, line, 0)
            .map_err(|e| fail("its IRQ object", e))?;
        sys::cap_copy(task, slot, slots::IRQ, Rights::all(), 0)
            .map_err(|e| fail("its IRQ object", e))?;
    }
    for io in options.iter().filter_map(|o| o.strip_prefix("io=")) {
        // io=PORT/ORDER (hexadecimal port): 2^ORDER ports from PORT.
        let parsed = io.split_once('/').and_then(|(port, order)| {
            Some((
                u64::from_str_radix(port.trim_start_matches("0x"), 16).ok()?,
                order.parse::<u32>().ok()?,
            ))
        });
        let Some((port, order)) = parsed.filter(|&(p, o)| Fpage::io(p, o).is_valid_io()) else {
            return Err(alloc::format!("creating {name}: bad io option '{io}'"));
        };
        sys::map(task, Fpage::io(port, order), 0, MapFlags::empty())
            .map_err(|e| fail("io ports", e))?;
    }
    if options.iter().any(|o| o == "superpage") {
        // A 2 MiB page from sigma0, passed on at SUPERPAGE_ADDRESS (both large pages).
        let at = SUPERPAGE_WINDOW + index as u64 * (2 << 20);
        match l4::sigma0::allocate(slots::PAGER, 21, Fpage::memory(at, 21, Fpage::RWX)) {
            Ok(true) => sys::map(
                task,
                Fpage::memory(at, 21, Fpage::READ | Fpage::WRITE),
                SUPERPAGE_ADDRESS,
                MapFlags::empty(),
            )
            .map_err(|e| fail("superpage", e))?,
            _ => return Err(alloc::format!("creating {name}: sigma0 gave no 2 MiB page")),
        }
    }
    let mut ram_budget = 0;
    for size in options.iter().filter_map(|o| o.strip_prefix("ram=")) {
        ram_budget = l4::abi::parse_size(size)
            .filter(|s| s.is_multiple_of(RAM_GRANULE))
            .ok_or_else(|| {
                alloc::format!("creating {name}: bad ram option '{size}' (a multiple of 2M)")
            })?;
    }
    let mut dma = None;
    if let Some(size) = options.iter().find_map(|o| o.strip_prefix("dma=")) {
        // dma=SIZE: physically contiguous memory (a power of two of 4 KiB to 2 MiB) whose
        // physical address the child learns, for a device driver's rings and buffers.
        let bytes = l4::abi::parse_size(size)
            .filter(|b| b.is_power_of_two() && (PAGE_SIZE..=RAM_GRANULE).contains(b))
            .ok_or_else(|| {
                alloc::format!("creating {name}: bad dma option '{size}' (4K..2M, a power of two)")
            })?;
        let order = bytes.trailing_zeros();
        let at = DMA_WINDOW + index as u64 * RAM_GRANULE;
        let physical = match l4::sigma0::allocate_physical(
            slots::PAGER,
            order,
            Fpage::memory(at, order, Fpage::RWX),
        ) {
            Ok(Some(p)) => p,
            _ => return Err(alloc::format!("creating {name}: sigma0 gave no DMA memory")),
        };
        sys::map(
            task,
            Fpage::memory(at, order, Fpage::READ | Fpage::WRITE),
            DMA_ADDRESS,
            MapFlags::empty(),
        )
        .map_err(|e| fail("dma", e))?;
        dma = Some(alloc::format!(" dma:{DMA_ADDRESS}+{bytes}@{physical}"));
    }
    let priority = match options.iter().find_map(|o| o.strip_prefix("priority=")) {
        Some(p) => Some(
            p.parse::<u8>()
                .ok()
                .ok_or_else(|| alloc::format!("creating {name}: bad priority '{p}'"))?,
        ),
        None => None,
    };
    let timeslice_ms = match options.iter().find_map(|o| o.strip_prefix("timeslice=")) {
        Some(t) => t
            .parse::<u64>()
            .ok()
            .filter(|t| (1..=1000).contains(t))
            .ok_or_else(|| alloc::format!("creating {name}: bad timeslice '{t}' (1..=1000 ms)"))?,
        None => 0,
    };
    let restarts_left = match options.iter().find_map(|o| o.strip_prefix("restart=")) {
        Some(n) => n
            .parse::<u32>()
            .map_err(|_| alloc::format!("creating {name}: bad restart option '{n}'"))?,
        None => 0,
    };
    let mut cmdline = String::from(module_cmdline);
    // Each data module named by `blob=NAME` (or `blob=AS:NAME`) is mapped read-only (page by
    // page) at the next free place from BLOB_ADDRESS; the child learns where from
    // `blob:AS=ADDRESS+SIZE` (`l4::rt::blob`).
    let mut next_blob = BLOB_ADDRESS;
    for option in options.iter().filter_map(|o| o.strip_prefix("blob=")) {
        let (seen_as, wanted) = option.split_once(':').unwrap_or((option, option));
        let Some(&(_, address, size)) = blobs.iter().find(|(n, _, _)| n == wanted) else {
            return Err(alloc::format!(
                "creating {name}: no data module named {wanted}"
            ));
        };
        // Mapped at the same offset within 2 MiB as ours, so that whole 2 MiB pieces (mapped
        // to us as 2 MiB pages, `map_module`) go as one mapping each.
        let origin = address & !(RAM_GRANULE - 1);
        let end = (address + size).next_multiple_of(PAGE_SIZE);
        let mut page = address & !(PAGE_SIZE - 1);
        while page < end {
            let order = piece_order(page, end);
            sys::map(
                task,
                Fpage::memory(page, order, Fpage::READ),
                next_blob + (page - origin),
                MapFlags::empty(),
            )
            .map_err(|e| fail("blob", e))?;
            page += 1 << order;
        }
        cmdline.push_str(&alloc::format!(
            " blob:{seen_as}={}+{size}",
            next_blob + (address - origin)
        ));
        next_blob += (end - origin).next_multiple_of(RAM_GRANULE);
    }
    if let Some(dma) = dma {
        cmdline.push_str(&dma);
    }
    let peer = options
        .iter()
        .find_map(|o| o.strip_prefix("peer="))
        .map(String::from);
    let service = |prefix: &str| {
        options
            .iter()
            .find_map(|o| o.strip_prefix(prefix))
            .map(String::from)
    };
    let services = [service("console="), service("net="), service("monitor=")];
    if cmdline.len() >= l4::rt::ARGUMENTS_SIZE {
        return Err(alloc::format!(
            "creating {name}: its arguments are {} bytes, at most {} fit",
            cmdline.len(),
            l4::rt::ARGUMENTS_SIZE - 1
        ));
    }
    if priority.is_some() || timeslice_ms > 0 {
        // Threads start at priority 100, the root task's own.
        sys::thread_schedule(thread, priority.unwrap_or(100), timeslice_ms * 1000)
            .map_err(|e| fail("priority and time slice", e))?;
    }
    let service = options.iter().any(|o| o == "service");
    Ok(Child {
        name,
        module: index,
        module_cmdline,
        cmdline,
        image,
        bytes,
        task,
        thread,
        peer,
        pages: Vec::new(),
        ram_budget,
        ram: Vec::new(),
        ram_1g: Vec::new(),
        running: false,
        services,
        notify_irqs: [None, None, None],
        service,
        restarts_left,
        restarts: 0,
        restart_at: None,
        made: core::mem::take(&mut made.made),
        factory: own_factory,
    })
}

/// Resolve a page fault of `child` at `address`: returns the map item, or `None` to refuse.
fn resolve(child: &mut Child, pool: &mut Pool, address: u64, access: u64) -> Option<MapItem> {
    if FaultAccess::from_bits_truncate(access).contains(FaultAccess::PRESENT) {
        return None; // a protection violation: the page is there with fewer rights
    }
    let page = address & !(PAGE_SIZE - 1);
    let rights = if let Some(segment) = child.image.segment_at(address) {
        let local = pool.allocate();
        let file_start = segment.vaddr;
        let file_end = segment.vaddr + segment.file_size;
        let from = page.max(file_start);
        let to = (page + PAGE_SIZE).min(file_end);
        if from < to {
            let offset = (segment.file_offset + (from - file_start)) as usize;
            let length = (to - from) as usize;
            // SAFETY: `local` is a fresh page of ours; the source range is inside the module
            // (checked by the ELF parser).
            unsafe {
                core::ptr::copy_nonoverlapping(
                    child.bytes.as_ptr().add(offset),
                    (local + (from - page)) as *mut u8,
                    length,
                )
            };
        }
        child.pages.push(local);
        let mut rights = Fpage::READ;
        if segment.writable {
            rights |= Fpage::WRITE;
        }
        if segment.executable {
            rights |= Fpage::EXECUTE;
        }
        return Some(MapItem::map(page, Fpage::memory(local, 12, rights)));
    } else if (INITIAL_STACK_TOP - CHILD_STACK..INITIAL_STACK_TOP).contains(&address)
        || (l4::rt::HEAP_BASE..l4::rt::HEAP_BASE + l4::rt::HEAP_SIZE as u64).contains(&address)
    {
        Fpage::READ | Fpage::WRITE
    } else {
        return None;
    };
    let local = pool.allocate();
    if page == INITIAL_STACK_TOP - PAGE_SIZE {
        // The top of the stack holds the command line (see `l4::rt::arguments`).
        let bytes = child.cmdline.as_bytes();
        let n = bytes.len().min(l4::rt::ARGUMENTS_SIZE - 1);
        // SAFETY: a fresh page of ours; the arguments area lies inside it.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (local + PAGE_SIZE - l4::rt::ARGUMENTS_SIZE as u64) as *mut u8,
                n,
            )
        };
    }
    child.pages.push(local);
    Some(MapItem::map(page, Fpage::memory(local, 12, rights)))
}

/// Destroy `child`'s task and take back its memory and our capabilities of it (the IRQ that
/// notifies it of console input stays ours, for a restart).
fn finish(child: &mut Child, pool: &mut Pool, ram: &mut RamPool, slots_: &mut Slots, how: &str) {
    println!("[root] task {} {how}", child.name);
    // What it held beyond its RAM budget (the memory overhead of a compartment): the kernel
    // memory of its own factory, and our 4 KiB pages for its image, stack and heap.
    if let Some(used) = child
        .factory
        .and_then(|f| sys::quota(f).ok())
        .map(|q| q.used)
    {
        println!(
            "[root] {} held {} KiB of kernel memory and {} KiB of task memory beyond {} MiB of RAM",
            child.name,
            used / 1024,
            child.pages.len() as u64 * PAGE_SIZE / 1024,
            child.ram_bytes() >> 20
        );
    }
    if let Err(e) = sys::task_destroy(child.task) {
        println!("[root] destroying {}: {e}", child.name);
    }
    for slot in child.made.drain(..).rev() {
        if Some(slot) != child.factory {
            slots_.release(slot);
        }
    }
    if child.ram_bytes() > 0 {
        println!(
            "[root] {}'s {} MiB of RAM back in the pool",
            child.name,
            child.ram_bytes() >> 20
        );
    }
    pool.free.append(&mut child.pages);
    ram.free.append(&mut child.ram);
    ram.free_1g.append(&mut child.ram_1g);
    child.running = false;
}

/// Give child `i` its gates to other children (`peer=`, `console=`) and its console
/// notification IRQ.
/// A service a child may be a client of: the console server (`console=SERVER`, clients
/// listed as `client=NAME`), a network switch (`net=SWITCH`, ports `port=NAME`) or a syscall
/// monitor (`monitor=SYSMON`, clients `client=NAME`).
struct Service {
    what: &'static str,
    /// The server's option that lists its clients.
    list: &'static str,
    /// Where the client finds its gate to the server.
    client_slot: u64,
    /// Where the server finds client `k`'s notification IRQ: `server_slots + k`.
    server_slots: u64,
    max_clients: u64,
    /// The badge of the notification's IRQ messages.
    badge: u64,
    /// Whether the server notifies its clients (with an IRQ).
    notifies: bool,
}

const CONSOLE_SERVICE: Service = Service {
    what: "console server",
    list: "client=",
    client_slot: slots::CONSOLE,
    server_slots: slots::CONSOLE_CLIENTS,
    max_clients: slots::MAX_CONSOLE_CLIENTS,
    badge: slots::CONSOLE_NOTIFY_BADGE,
    notifies: true,
};

const NET_SERVICE: Service = Service {
    what: "switch",
    list: "port=",
    client_slot: slots::NET,
    server_slots: slots::NET_PORTS,
    max_clients: slots::MAX_NET_PORTS,
    badge: slots::NET_NOTIFY_BADGE,
    notifies: true,
};

const MONITOR_SERVICE: Service = Service {
    what: "syscall monitor",
    list: "client=",
    client_slot: slots::MONITOR,
    server_slots: 0,
    max_clients: slots::MAX_MONITOR_CLIENTS,
    badge: 0,
    notifies: false,
};

/// Give child `i` a gate (badge `badge`, in its slot `slot`) to child `j`'s first thread.
fn gate_to(
    children: &mut [Child],
    i: usize,
    j: usize,
    badge: u64,
    slot: u64,
    slots_: &mut Slots,
) -> Result<(), Error> {
    let gate = slots_.take();
    // Ours stays while the child lives: deleting it would revoke the child's copy.
    children[i].made.push(gate);
    sys::factory_create(
        slots::FACTORY,
        ObjectKind::Gate,
        gate,
        children[j].thread,
        badge,
    )
    .and_then(|()| sys::cap_copy(children[i].task, gate, slot, Rights::SEND, 0))
}

/// Give child `i` its gates to other children (`peer=`, `console=`, `net=`) and its
/// notification IRQs.
fn wire(children: &mut [Child], i: usize, slots_: &mut Slots, software_lines: &mut u64) {
    if let Some(peer) = children[i].peer.clone() {
        match children.iter().position(|c| c.name == peer) {
            Some(j) => {
                if let Err(e) = gate_to(children, i, j, 0x1000 + i as u64, slots::PEER, slots_) {
                    println!("[root] wiring {} to {peer}: {e}", children[i].name);
                }
            }
            None => println!("[root] {}: no peer named {peer}", children[i].name),
        }
    }
    for (n, service) in [CONSOLE_SERVICE, NET_SERVICE, MONITOR_SERVICE]
        .iter()
        .enumerate()
    {
        if let Some(server) = children[i].services[n].clone() {
            wire_service(children, i, n, service, &server, slots_, software_lines);
        }
    }
}

/// Make child `i` a client of `server`, the `service` (number `n` of the child's).
fn wire_service(
    children: &mut [Child],
    i: usize,
    n: usize,
    service: &Service,
    server: &str,
    slots_: &mut Slots,
    software_lines: &mut u64,
) {
    let name = children[i].name.clone();
    let what = service.what;
    let Some(j) = children.iter().position(|c| c.name == server) else {
        println!("[root] {name}: no {what} named {server}");
        return;
    };
    let (_, server_options) = module_name(children[j].module_cmdline);
    let Some(k) = server_options
        .iter()
        .filter_map(|o| o.strip_prefix(service.list))
        .position(|c| c == name)
        .filter(|&k| (k as u64) < service.max_clients)
    else {
        println!(
            "[root] {name}: {what} {server} does not list it ({}{name})",
            service.list
        );
        return;
    };
    if let Err(e) = gate_to(children, i, j, k as u64 + 1, service.client_slot, slots_) {
        println!("[root] wiring {name} to {server}: {e}");
        return;
    }
    if !service.notifies {
        return;
    }
    // The notification IRQ: made once, attached to each new first thread of the client.
    let irq = match children[i].notify_irqs[n] {
        Some(irq) => irq,
        None => {
            let irq = slots_.take();
            let line = 32 + *software_lines;
            let made =
                sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, line, service.badge)
                    .and_then(|()| {
                        sys::cap_copy(
                            children[j].task,
                            irq,
                            service.server_slots + k as u64,
                            Rights::all(),
                            0,
                        )
                    });
            if let Err(e) = made {
                println!("[root] {name}: no {what} notification: {e}");
                slots_.release(irq);
                return;
            }
            *software_lines += 1;
            children[i].notify_irqs[n] = Some(irq);
            irq
        }
    };
    if let Err(e) = sys::irq_control(irq, IrqOp::Attach, children[i].thread) {
        println!("[root] {name}: attaching its {what} notification: {e}");
    }
}

/// Start child `child`'s first thread.
fn start(child: &mut Child) -> bool {
    match sys::ex_regs(
        child.thread,
        child.image.entry,
        INITIAL_STACK_TOP - l4::rt::ARGUMENTS_SIZE as u64,
        ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START,
    ) {
        Ok(_) => {
            child.running = true;
            println!("[root] started {}", child.name);
            true
        }
        Err(e) => {
            println!("[root] starting {}: {e}", child.name);
            false
        }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: reading the time-stamp counter has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A page-aligned copy of `text` in memory of ours that holds nothing else (so that a child
/// it is mapped into sees only it); returns its address.
fn text_blob(text: &str) -> u64 {
    bytes_blob(text.as_bytes())
}

/// The contents of the gzip file `data` (RFC 1952; its CRC-32 checked), at most 1 GiB.
fn gunzip(data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let options = zune_inflate::DeflateOptions::default()
        .set_limit(1 << 30)
        .set_confirm_checksum(true);
    zune_inflate::DeflateDecoder::new_with_options(data, options)
        .decode_gzip()
        .map_err(|_| "not a gzip file, or corrupt")
}

/// A page-aligned copy of `bytes` in memory of ours that holds nothing else (see
/// [`text_blob`]); returns its address, or 0 without memory.
fn bytes_blob(bytes: &[u8]) -> u64 {
    let size = (bytes.len() as u64).max(1).next_multiple_of(PAGE_SIZE) as usize;
    let layout = core::alloc::Layout::from_size_align(size, PAGE_SIZE as usize)
        .expect("a page multiple with page alignment");
    // SAFETY: the layout has a non-zero size.
    let memory = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if memory.is_null() {
        return 0;
    }
    // SAFETY: `memory` is a fresh allocation of `size` >= `bytes.len()` bytes, never freed.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), memory, bytes.len()) };
    memory as u64
}

/// The address and bytes of the data module `name` (a boot module or a blob the launch list
/// made).
fn data_module(blobs: &[(String, u64, u64)], name: &str) -> Option<(u64, &'static [u8])> {
    let &(_, address, size) = blobs.iter().find(|b| b.0 == name)?;
    // SAFETY: data modules stay mapped at `address` for good (`map_module`), the blobs the
    // launch list makes are never freed.
    Some((address, unsafe {
        core::slice::from_raw_parts(address as *const u8, size as usize)
    }))
}

/// Read the launch list (the data module `launch`): one task or text per line, for scenarios
/// with more tasks than the kernel has boot modules. `task NAME PROGRAM [OPTION...]` starts the
/// data module PROGRAM (an ELF image) as task NAME with those options, like a module with the
/// command line `NAME OPTION...`; `text NAME CONTENT` makes a data module NAME of the rest of
/// the line (a Linux command line, say); `inflate NAME SOURCE` makes a data module NAME of the
/// data module SOURCE decompressed (a gzip file: an initramfs that several compartments share
/// is decompressed once, here, instead of by each guest; if it cannot be, NAME is SOURCE
/// itself); `#` starts a comment line. Returns the number of lines refused.
fn launch(
    text: &[u8],
    first_index: usize,
    blobs: &mut Vec<(String, u64, u64)>,
    programs: &mut Vec<(usize, &'static str, &'static [u8])>,
) -> u32 {
    let Ok(text) = core::str::from_utf8(text) else {
        println!("[root] launch: the list is not UTF-8");
        return 1;
    };
    let mut refused = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (what, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (name, rest) = rest.trim_start().split_once(' ').unwrap_or((rest, ""));
        match what {
            "text" if !name.is_empty() => {
                let address = text_blob(rest);
                if address == 0 {
                    println!("[root] launch:{}: no memory for text {name}", n + 1);
                    refused += 1;
                    continue;
                }
                blobs.push((String::from(name), address, rest.len() as u64));
            }
            "inflate" if !name.is_empty() => {
                let source = rest.trim();
                let Some((address, packed)) = data_module(blobs, source) else {
                    println!(
                        "[root] launch:{}: inflate {name}: no data module named '{source}'",
                        n + 1
                    );
                    refused += 1;
                    continue;
                };
                let size = packed.len() as u64;
                let start = rdtsc();
                let blob = match gunzip(packed) {
                    Ok(bytes) => {
                        let at = bytes_blob(&bytes);
                        (at != 0)
                            .then_some((at, bytes.len() as u64))
                            .ok_or("no memory")
                    }
                    Err(e) => Err(e),
                };
                match blob {
                    Ok((at, length)) => {
                        println!(
                            "[root] {source} decompressed once for its tasks: {size} -> {length} bytes in {} TSC ticks",
                            rdtsc() - start
                        );
                        blobs.push((String::from(name), at, length));
                    }
                    Err(e) => {
                        println!(
                            "[root] {source} stays compressed ({e}): each task gets it as it is"
                        );
                        blobs.push((String::from(name), address, size));
                    }
                }
            }
            "task" if !name.is_empty() => {
                let (program, options) = rest.trim_start().split_once(' ').unwrap_or((rest, ""));
                let Some((_, bytes)) = data_module(blobs, program) else {
                    println!(
                        "[root] launch:{}: task {name}: no data module named '{program}'",
                        n + 1
                    );
                    refused += 1;
                    continue;
                };
                let cmdline: &'static str = alloc::format!("{name} {options}").leak();
                programs.push((first_index + n, cmdline, bytes));
            }
            _ => {
                println!(
                    "[root] launch:{}: '{line}' is none of `task NAME PROGRAM [OPTION...]`, `text NAME CONTENT`, `inflate NAME SOURCE`",
                    n + 1
                );
                refused += 1;
            }
        }
    }
    refused
}

fn main() -> i64 {
    let kip = l4::kip::kip();
    let modules = &kip.modules[..kip.module_count as usize];
    println!("[root] {} boot modules", modules.len());
    let mut children: Vec<Child> = Vec::new();
    let mut failures = 0u32;
    let mut slots_ = Slots(Vec::new());
    let mut software_lines = 0u64;
    // Data modules (option `data`) are not started; tasks get them with `blob=NAME`.
    let mut blobs: Vec<(String, u64, u64)> = Vec::new();
    let mut programs: Vec<(usize, &'static [u8])> = Vec::new();
    for (index, module) in modules.iter().enumerate().skip(2) {
        let Some(bytes) = map_module(index, module.base, module.size) else {
            println!(
                "[root] module {index} ({}) could not be mapped",
                module.cmdline()
            );
            failures += 1;
            continue;
        };
        let (name, options) = module_name(module.cmdline());
        if options.iter().any(|o| o == "data") {
            blobs.push((name, module_address(index, module.base), module.size));
        } else {
            programs.push((index, bytes));
        }
    }
    let mut programs: Vec<(usize, &'static str, &'static [u8])> = programs
        .into_iter()
        .map(|(index, bytes)| (index, modules[index].cmdline(), bytes))
        .collect();
    if let Some(&(_, address, size)) = blobs.iter().find(|b| b.0 == "launch") {
        // SAFETY: the launch module is mapped at `address` for good (`map_module`).
        let text = unsafe { core::slice::from_raw_parts(address as *const u8, size as usize) };
        failures += launch(text, modules.len(), &mut blobs, &mut programs);
    }
    for (index, cmdline, bytes) in programs {
        match create(
            index,
            cmdline,
            bytes,
            &blobs,
            children.len() as u64 + 1,
            &mut slots_,
        ) {
            Ok(child) => children.push(child),
            Err(message) => {
                println!("[root] {message}");
                failures += 1;
            }
        }
    }
    // Wire peers and consoles, then start everything.
    for i in 0..children.len() {
        wire(&mut children, i, &mut slots_, &mut software_lines);
    }
    for child in children.iter_mut() {
        if !start(child) {
            failures += 1;
        }
    }
    let tsc_hz = kip.tsc_hz.max(1);
    let mut pool = Pool {
        next: POOL_BASE,
        free: Vec::new(),
    };
    let mut ram = RamPool {
        next: RAM_WINDOW,
        free: Vec::new(),
        next_1g: RAM_WINDOW_1G,
        free_1g: Vec::new(),
        no_more_1g: false,
    };
    let mut reply: Option<(MessageTag, [u64; 2])> = None;
    while children
        .iter()
        .any(|c| (c.running && !c.service) || c.restart_at.is_some())
    {
        // Restarts that are due.
        let now = rdtsc();
        for i in 0..children.len() {
            if children[i].restart_at.is_some_and(|at| at <= now) {
                children[i].restart_at = None;
                let c = &children[i];
                let (module, cmdline, bytes, restarts_left, restarts) = (
                    c.module,
                    c.module_cmdline,
                    c.bytes,
                    c.restarts_left,
                    c.restarts,
                );
                let notify_irqs = c.notify_irqs;
                // Everything the child had is destroyed by now: its factory must hold
                // nothing, and the kernel's books must balance.
                let held = c
                    .factory
                    .map(|f| sys::quota(f).map_or(u64::MAX, |q| q.used));
                if let Some(f) = children[i].factory.take() {
                    slots_.release(f);
                }
                let books = sys::quota_check(slots::FACTORY, true).map_or(u64::MAX, |(_, m)| m);
                let reclaimed = match held {
                    Some(0) => String::from("all its kernel memory came back"),
                    Some(bytes) => alloc::format!("its old factory still holds {bytes} bytes"),
                    None => String::from("its kernel memory was the root task's"),
                };
                println!(
                    "[root] restarting {}: {reclaimed}; kernel books: {books} inconsistencies",
                    children[i].name
                );
                match create(module, cmdline, bytes, &blobs, i as u64 + 1, &mut slots_) {
                    Ok(mut child) => {
                        child.restarts_left = restarts_left;
                        child.restarts = restarts;
                        child.notify_irqs = notify_irqs;
                        children[i] = child;
                        wire(&mut children, i, &mut slots_, &mut software_lines);
                        if !start(&mut children[i]) {
                            failures += 1;
                        }
                    }
                    Err(message) => {
                        println!("[root] restarting: {message}");
                        failures += 1;
                    }
                }
            }
        }
        // Wait for the next message, or until the next restart is due.
        let next_restart = children.iter().filter_map(|c| c.restart_at).min();
        let timeouts = match next_restart {
            Some(at) => {
                let micros = (at.saturating_sub(rdtsc()) as u128 * 1_000_000 / tsc_hz as u128)
                    .clamp(1, u32::MAX as u128 - 2) as u32;
                Timeouts::new(Timeout::INFINITE, Timeout::micros(micros))
            }
            None => Timeouts::INFINITE,
        };
        let next: Result<Received, ipc::IpcError> = match reply.take() {
            Some((tag, words)) => ipc::reply_wait(tag, &words, timeouts),
            None => ipc::wait(timeouts),
        };
        let message = match next {
            Ok(m) => m,
            Err(e) if e.error == Error::Timeout => continue,
            Err(e) => {
                println!("[root] IPC error {:?}", e);
                continue;
            }
        };
        let index = message.badge.wrapping_sub(1) as usize;
        let Some(child) = children.get_mut(index).filter(|c| c.running) else {
            println!("[root] message from unknown badge {}", message.badge);
            continue;
        };
        // How the child ended, if it did: (what to report, whether it failed).
        let ended: Option<(String, bool)> = match message.tag.label() {
            LABEL_PAGE_FAULT => {
                let (address, access) = (message.word(0), message.word(1));
                match resolve(child, &mut pool, address, access) {
                    Some(item) => {
                        reply = Some((MessageTag::new(0, 0, 1), [item.control, item.fpage.0]))
                    }
                    None => {
                        println!("[root] task {}: refusing page fault at {address:#x} (access {access:#x}, ip {:#x})", child.name, message.word(2));
                        reply = Some((MessageTag::new(-1, 0, 0), [0, 0]));
                    }
                }
                None
            }
            LABEL_EXIT => {
                let code = message.word(0) as i64;
                Some((alloc::format!("exited with code {code}"), code != 0))
            }
            l4::abi::LABEL_EXCEPTION => {
                let (vector, error, ip) = (message.word(0), message.word(1), message.word(2));
                Some((alloc::format!("raised unhandled exception {vector} (error {error:#x}) at ip {ip:#x}; destroyed"), true))
            }
            LABEL_DEATH => {
                let (reason, detail, ip) = (message.word(0), message.word(1), message.word(2));
                Some((
                    alloc::format!(
                        "was killed (reason {reason:#x}, detail {detail:#x}, ip {ip:#x})"
                    ),
                    true,
                ))
            }
            l4::sigma0::LABEL_PHYSICAL
                if module_name(child.module_cmdline)
                    .1
                    .iter()
                    .any(|o| o == "device-memory") =>
            {
                // A driver's device registers: passed on from sigma0, nothing but the PCI hole.
                let (physical, order) = (message.word(0), message.word(1));
                let size = 1u64.checked_shl(order as u32).unwrap_or(0);
                let inside = (12..=24).contains(&order)
                    && physical.is_multiple_of(size)
                    && is_device_memory(physical, size);
                let at = DEVICE_WINDOW + physical;
                let mapped = inside
                    && matches!(
                        l4::sigma0::request_physical(
                            slots::PAGER,
                            physical,
                            order as u32,
                            Fpage::memory(at, order as u32, Fpage::RWX)
                        ),
                        Ok(true)
                    );
                reply = Some(if mapped {
                    let item = MapItem::map(
                        0,
                        Fpage::memory(at, order as u32, Fpage::READ | Fpage::WRITE),
                    );
                    (MessageTag::new(0, 0, 1), [item.control, item.fpage.0])
                } else {
                    println!(
                        "[root] task {}: device memory {physical:#x} (order {order}) refused",
                        child.name
                    );
                    (MessageTag::new(-1, 0, 0), [0, 0])
                });
                None
            }
            l4::parent::LABEL_RAM => {
                let (address, bytes) = (message.word(0), message.word(1));
                reply = Some(match give_ram(child, &mut ram, address, bytes) {
                    Ok(()) => (MessageTag::new(0, 0, 0), [0, 0]),
                    Err(e) => {
                        println!("[root] task {}: RAM request of {bytes:#x} bytes at {address:#x} refused: {e}", child.name);
                        (MessageTag::new(-1, 1, 0), [e as u64, 0])
                    }
                });
                None
            }
            label => {
                println!("[root] task {}: unknown request label {label}", child.name);
                reply = Some((MessageTag::new(-1, 0, 0), [0, 0]));
                None
            }
        };
        if let Some((how, failed)) = ended {
            finish(child, &mut pool, &mut ram, &mut slots_, &how);
            if failed && child.restarts_left > 0 {
                child.restarts_left -= 1;
                child.restarts += 1;
                let delay = 1u64 << (child.restarts - 1).min(5);
                child.restart_at = Some(rdtsc() + delay * tsc_hz);
                println!(
                    "[root] {} failed: restart {} of {} in {delay} s",
                    child.name,
                    child.restarts,
                    child.restarts + child.restarts_left
                );
            } else {
                if failed {
                    failures += 1;
                }
                // Its quota goes back to ours once the destruction is complete.
                if let Some(f) = child.factory.take() {
                    slots_.release(f);
                }
            }
        }
    }
    let code = if failures == 0 {
        EXIT_SUCCESS
    } else {
        EXIT_FAILURE
    };
    println!("[root] all tasks finished, {failures} failures; shutting down");
    if let Err(e) = sys::shutdown(slots::PLATFORM, code) {
        println!("[root] shutdown: {e}");
    }
    0
}

l4::main!(main);
