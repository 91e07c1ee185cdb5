//! The root task. It loads the ELF boot modules after itself (rejecting malformed images with a
//! clear message), creates a task and a thread for each, gives each only the capabilities its
//! command line asks for, and then serves as their pager (ELF pages, stack and heap, with memory
//! it gets from sigma0) and parent: it reports each task's exit, destroys it, and powers the
//! machine off when all are done.
//!
//! Module command line: `[/path] NAME [factory] [peer=OTHER]`. `factory` gives the task a
//! factory capability, `platform` the platform capability (IRQs, shutdown), `io=PORT/ORDER` the
//! 2^ORDER I/O ports from hexadecimal PORT; `peer=OTHER` gives it, in slot `PEER`, a gate to
//! OTHER's first thread.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use l4::abi::{
    fault_access, rights, slots, Error, ExRegsFlags, Fpage, MapItem, MessageTag, ObjectKind,
    Timeouts, INITIAL_STACK_TOP, KERNEL_AREA_START, LABEL_DEATH, LABEL_EXIT, LABEL_PAGE_FAULT,
    PAGE_SIZE, USER_START, UTCB_AREA,
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
/// Where a child with the `superpage` option finds its 2 MiB page.
pub const SUPERPAGE_ADDRESS: u64 = 0x0000_0800_0000_0000;
/// Where the root task keeps the 2 MiB pages of RAM it gives children on request.
const RAM_WINDOW: u64 = 0x0000_2c00_0000_0000;
/// Stack bytes a child may use below `INITIAL_STACK_TOP`.
const CHILD_STACK: u64 = 1 << 20;
/// QEMU isa-debug-exit codes: all tasks exited with 0 / something failed.
const EXIT_SUCCESS: u64 = l4::abi::qemu_exit::SUCCESS as u64;
const EXIT_FAILURE: u64 = l4::abi::qemu_exit::FAILURE as u64;

struct Child {
    name: String,
    cmdline: String,
    image: Image,
    bytes: &'static [u8],
    task: u64,
    thread: u64,
    peer: Option<String>,
    pages: Vec<u64>,
    /// RAM the child may request (`ram=SIZE`), and the 2 MiB pages it has (root addresses).
    ram_budget: u64,
    ram: Vec<u64>,
    running: bool,
}

/// 2 MiB pages of RAM for children: fresh ones from sigma0, or ones a finished child had.
struct RamPool {
    next: u64,
    free: Vec<u64>,
}

impl RamPool {
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
    let held = child.ram.len() as u64 * RAM_GRANULE;
    if held + bytes > child.ram_budget {
        return Err(Error::OutOfMemory);
    }
    let mut at = address;
    while at < end {
        let page = pool.take().ok_or(Error::OutOfMemory)?;
        if let Err(e) = sys::map(child.task, Fpage::memory(page, 21, Fpage::RWX), at, 0) {
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
    let window = MODULE_WINDOW + index as u64 * (1 << 30);
    let first = base & !(PAGE_SIZE - 1);
    let end = (base + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let mut page = first;
    while page < end {
        let at = window + (page - first);
        match l4::sigma0::request_physical(
            slots::PAGER,
            page,
            12,
            Fpage::memory(at, 12, Fpage::RWX),
        ) {
            Ok(true) => {}
            _ => return None,
        }
        page += PAGE_SIZE;
    }
    // SAFETY: the pages were just mapped into this window and stay mapped.
    Some(unsafe {
        core::slice::from_raw_parts((window + (base - first)) as *const u8, size as usize)
    })
}

fn create(
    index: usize,
    cmdline: &str,
    bytes: &'static [u8],
    blobs: &[(String, u64, u64)],
    gate_badge: u64,
) -> Result<Child, String> {
    let (name, options) = module_name(cmdline);
    let limits = Limits {
        min_vaddr: USER_START,
        user_limit: l4::rt::HEAP_BASE.min(KERNEL_AREA_START),
    };
    let image = l4_elf::parse(bytes, limits)
        .map_err(|e| alloc::format!("module {index} ({name}) rejected: {e}"))?;
    let fail = |what: &str, e: l4::Error| alloc::format!("creating {name}: {what}: {e}");
    let task = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Task, task, 0, 0)
        .map_err(|e| fail("task", e))?;
    let thread = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Thread, thread, 0, 0)
        .map_err(|e| fail("thread", e))?;
    let gate = alloc_slot();
    sys::factory_create(
        slots::FACTORY,
        ObjectKind::Gate,
        gate,
        slots::SELF_THREAD,
        gate_badge,
    )
    .map_err(|e| fail("gate", e))?;
    sys::thread_control(thread, task, UTCB_AREA, gate, gate)
        .map_err(|e| fail("thread_control", e))?;
    sys::cap_copy(task, task, slots::SELF_TASK, rights::ALL, 0)
        .map_err(|e| fail("self task", e))?;
    sys::cap_copy(task, thread, slots::SELF_THREAD, rights::ALL, 0)
        .map_err(|e| fail("self thread", e))?;
    sys::cap_copy(task, gate, slots::PAGER, rights::SEND, 0).map_err(|e| fail("pager", e))?;
    sys::cap_copy(task, gate, slots::PARENT, rights::SEND, 0).map_err(|e| fail("parent", e))?;
    if options.iter().any(|o| o == "factory") {
        sys::cap_copy(task, slots::FACTORY, slots::FACTORY, rights::ALL, 0)
            .map_err(|e| fail("factory", e))?;
    }
    if options.iter().any(|o| o == "platform") {
        sys::cap_copy(task, slots::PLATFORM, slots::PLATFORM, rights::ALL, 0)
            .map_err(|e| fail("platform", e))?;
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
        sys::map(task, Fpage::io(port, order), 0, 0).map_err(|e| fail("io ports", e))?;
    }
    if options.iter().any(|o| o == "superpage") {
        // A 2 MiB page from sigma0, passed on at SUPERPAGE_ADDRESS (both large pages).
        let at = SUPERPAGE_WINDOW + index as u64 * (2 << 20);
        match l4::sigma0::allocate(slots::PAGER, 21, Fpage::memory(at, 21, Fpage::RWX)) {
            Ok(true) => sys::map(
                task,
                Fpage::memory(at, 21, Fpage::READ | Fpage::WRITE),
                SUPERPAGE_ADDRESS,
                0,
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
    let mut cmdline = String::from(cmdline);
    // Each data module named by `blob=NAME` is mapped read-only (page by page) at the next
    // free place from BLOB_ADDRESS; the child learns where from `blob:NAME=ADDRESS+SIZE`
    // (`l4::rt::blob`).
    let mut next_blob = BLOB_ADDRESS;
    for wanted in options.iter().filter_map(|o| o.strip_prefix("blob=")) {
        let Some(&(_, address, size)) = blobs.iter().find(|(n, _, _)| n == wanted) else {
            return Err(alloc::format!(
                "creating {name}: no data module named {wanted}"
            ));
        };
        let first = address & !(PAGE_SIZE - 1);
        let mut page = first;
        while page < address + size {
            sys::map(
                task,
                Fpage::memory(page, 12, Fpage::READ),
                next_blob + (page - first),
                0,
            )
            .map_err(|e| fail("blob", e))?;
            page += PAGE_SIZE;
        }
        cmdline.push_str(&alloc::format!(
            " blob:{wanted}={}+{size}",
            next_blob + (address - first)
        ));
        next_blob += (page - first).next_multiple_of(RAM_GRANULE);
    }
    let peer = options
        .iter()
        .find_map(|o| o.strip_prefix("peer="))
        .map(String::from);
    if cmdline.len() >= l4::rt::ARGUMENTS_SIZE {
        return Err(alloc::format!(
            "creating {name}: its arguments are {} bytes, at most {} fit",
            cmdline.len(),
            l4::rt::ARGUMENTS_SIZE - 1
        ));
    }
    Ok(Child {
        name,
        cmdline,
        image,
        bytes,
        task,
        thread,
        peer,
        pages: Vec::new(),
        ram_budget,
        ram: Vec::new(),
        running: false,
    })
}

/// Resolve a page fault of `child` at `address`: returns the map item, or `None` to refuse.
fn resolve(child: &mut Child, pool: &mut Pool, address: u64, access: u64) -> Option<MapItem> {
    if access & fault_access::PRESENT != 0 {
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

fn finish(child: &mut Child, pool: &mut Pool, ram: &mut RamPool, how: &str) {
    println!("[root] task {} {how}", child.name);
    if let Err(e) = sys::task_destroy(child.task) {
        println!("[root] destroying {}: {e}", child.name);
    }
    pool.free.append(&mut child.pages);
    ram.free.append(&mut child.ram);
    child.running = false;
}

fn main() -> i64 {
    let kip = l4::kip::kip();
    let modules = &kip.modules[..kip.module_count as usize];
    println!("[root] {} boot modules", modules.len());
    let mut children: Vec<Child> = Vec::new();
    let mut failures = 0u32;
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
            blobs.push((
                name,
                MODULE_WINDOW + index as u64 * (1 << 30) + (module.base & (PAGE_SIZE - 1)),
                module.size,
            ));
        } else {
            programs.push((index, bytes));
        }
    }
    for (index, bytes) in programs {
        let module = &modules[index];
        match create(
            index,
            module.cmdline(),
            bytes,
            &blobs,
            children.len() as u64 + 1,
        ) {
            Ok(child) => children.push(child),
            Err(message) => {
                println!("[root] {message}");
                failures += 1;
            }
        }
    }
    // Wire peers, then start everything.
    for i in 0..children.len() {
        let Some(peer) = children[i].peer.clone() else {
            continue;
        };
        let Some(j) = children.iter().position(|c| c.name == peer) else {
            println!("[root] {}: no peer named {peer}", children[i].name);
            continue;
        };
        let gate = alloc_slot();
        let wired = sys::factory_create(
            slots::FACTORY,
            ObjectKind::Gate,
            gate,
            children[j].thread,
            0x1000 + i as u64,
        )
        .and_then(|()| sys::cap_copy(children[i].task, gate, slots::PEER, rights::SEND, 0));
        if let Err(e) = wired {
            println!("[root] wiring {} to {peer}: {e}", children[i].name);
        }
    }
    for child in children.iter_mut() {
        match sys::ex_regs(
            child.thread,
            child.image.entry,
            INITIAL_STACK_TOP - l4::rt::ARGUMENTS_SIZE as u64,
            ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START,
        ) {
            Ok(_) => {
                child.running = true;
                println!("[root] started {}", child.name);
            }
            Err(e) => {
                println!("[root] starting {}: {e}", child.name);
                failures += 1;
            }
        }
    }
    let mut pool = Pool {
        next: POOL_BASE,
        free: Vec::new(),
    };
    let mut ram = RamPool {
        next: RAM_WINDOW,
        free: Vec::new(),
    };
    let mut reply: Option<(MessageTag, [u64; 2])> = None;
    while children.iter().any(|c| c.running) {
        let next: Result<Received, ipc::IpcError> = match reply.take() {
            Some((tag, words)) => ipc::reply_wait(tag, &words, Timeouts::INFINITE),
            None => ipc::wait(Timeouts::INFINITE),
        };
        let message = match next {
            Ok(m) => m,
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
        match message.tag.label() {
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
            }
            LABEL_EXIT => {
                let code = message.word(0) as i64;
                if code != 0 {
                    failures += 1;
                }
                finish(
                    child,
                    &mut pool,
                    &mut ram,
                    &alloc::format!("exited with code {code}"),
                );
            }
            l4::abi::LABEL_EXCEPTION => {
                failures += 1;
                let (vector, error, ip) = (message.word(0), message.word(1), message.word(2));
                finish(child, &mut pool, &mut ram, &alloc::format!("raised unhandled exception {vector} (error {error:#x}) at ip {ip:#x}; destroyed"));
            }
            LABEL_DEATH => {
                failures += 1;
                let (reason, detail, ip) = (message.word(0), message.word(1), message.word(2));
                finish(
                    child,
                    &mut pool,
                    &mut ram,
                    &alloc::format!(
                        "was killed (reason {reason:#x}, detail {detail:#x}, ip {ip:#x})"
                    ),
                );
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
            }
            label => {
                println!("[root] task {}: unknown request label {label}", child.name);
                reply = Some((MessageTag::new(-1, 0, 0), [0, 0]));
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
