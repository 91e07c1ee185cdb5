//! Bounded revocation: Unmap and a task's revocation go in steps.

use crate::bounded::result_code;
use crate::hostile::{books_balance, used};
use crate::mechanisms::{child_agent, string_tag, Agent};
use crate::support::{err, gate, go, tag, Suite, TEST_AREA};
use crate::tap::{check, check_eq, Case};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Error, ExRegsFlags, Fpage, MapItem, MessageTag, ObjectKind, Timeout, Timeouts,
    LABEL_PAGE_FAULT, PAGE_SIZE,
};
use l4::abi::{MapFlags, UnmapFlags};
use l4::child::fresh_page;
use l4::ipc;
use l4::thread::alloc_slot;
use l4::{println, sys};

/// Where the fan-out lands in the target task, and where our own chain lies (never touched).
const FAN_OUT_AREA: u64 = 0x0000_7000_0000_0000;
const CHAIN_AREA: u64 = 0x0000_7100_0000_0000;
const FAN_OUT: u64 = 4000;
const CHAIN: u64 = 1000;

/// The unmapper's job: the flexpage (0: none) and whether it is done.
static REVOKE_FPAGE: AtomicU64 = AtomicU64::new(0);
static REVOKE_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
static REVOKE_DONE: AtomicBool = AtomicBool::new(false);
static REVOKE_GO: AtomicBool = AtomicBool::new(false);

/// Low priority: once `REVOKE_GO` is set, revokes what is derived from the flexpage
/// `REVOKE_FPAGE` (never our own).
extern "C" fn slow_unmapper(_: u64) -> ! {
    while !REVOKE_GO.load(SeqCst) {
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
    }
    // SAFETY: the flexpage's own mapping stays (no UNMAP_SELF).
    let r = unsafe { sys::unmap(Fpage(REVOKE_FPAGE.load(SeqCst)), UnmapFlags::empty()) };
    REVOKE_RESULT.store(result_code(r), SeqCst);
    REVOKE_DONE.store(true, SeqCst);
    // Stays (an exit would refund its FPU area to our quota while we compare it).
    loop {
        let _ = ipc::wait(Timeouts::INFINITE);
    }
}

/// A thread (below us) that waits to revoke a flexpage, made before the quotas are read (a
/// thread is charged to our quota).
fn unmapper() -> u64 {
    REVOKE_GO.store(false, SeqCst);
    let unmapper = go(slow_unmapper, 0);
    let _ = sys::thread_schedule(unmapper, 50, 0);
    // Let it run into its wait (its first touch of its stack and heap is paged now).
    let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(3000)));
    unmapper
}

/// Revoke `fpage` in a thread made by [`unmapper`] while we wake every tick and sample
/// `factory`'s quota; returns the unmap's result and whether a sample fell strictly between
/// `from` and `to` (we saw the revocation half done: it went in steps).
fn unmap_watched(fpage: Fpage, factory: u64, from: u64, to: u64) -> (u64, bool) {
    REVOKE_FPAGE.store(fpage.0, SeqCst);
    REVOKE_RESULT.store(u64::MAX, SeqCst);
    REVOKE_DONE.store(false, SeqCst);
    REVOKE_GO.store(true, SeqCst);
    let mut halfway = false;
    for _ in 0..5_000 {
        if REVOKE_DONE.load(SeqCst) {
            break;
        }
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        let now = used(factory);
        halfway |= now < from.max(to) && now > from.min(to);
    }
    (REVOKE_RESULT.load(SeqCst), halfway)
}

fn fan_out_into(task: u64, page: u64) -> bool {
    (0..FAN_OUT).all(|i| {
        sys::map(
            task,
            Fpage::memory(page, 12, Fpage::READ),
            FAN_OUT_AREA + i * PAGE_SIZE,
            MapFlags::empty(),
        )
        .is_ok()
    })
}

/// The cases of [`revoke_cases`], in the order it reports them.
pub(crate) const REVOKE_CASES: &[Case] = &[
    ("revoke", "an Unmap of a fan-out of 4,000 mappings revokes all of them, refunding every node"),
    ("revoke", "the fan-out's revocation goes in steps: a higher-priority thread runs in between"),
    ("revoke", "after the stepwise revocation the page can be mapped again to all 4,000 places"),
    ("revoke", "destroying a task holding 4,000 mappings returns its whole quota"),
    ("revoke", "an Unmap of a chain of 1,000 mappings revokes every level in steps, refunding every node"),
    ("revoke", "after a stepwise Unmap the caller keeps its own mapping"),
    ("revoke", "an Unmap with UNMAP_SELF of the chain's 4 MiB area takes all of it, in steps"),
    ("string", "a 4 MiB string item arrives intact (4 times)"),
    ("string", "a 4 MiB string is copied in steps: a higher-priority thread runs while it is half done"),
    ("map", "a Map of 4 MiB of small pages goes in bounded steps (a higher-priority thread sees it half done) and maps every page"),
    ("map", "a map item of 4 MiB of small pages goes in bounded steps before its message arrives (seen half done), every page mapped"),
    ("map", "a page-fault reply of 4 MiB of small pages goes in bounded steps (seen half done) and maps every page at once"),
    ("string", "three strings (1.2 MiB) in steps across items, buffers faulting in between: exact, absent, truncated"),
    ("string", "a receive canceled mid-copy fails with Canceled; the copy starts over and arrives whole"),
    ("quota", "after the stepwise revocations the kernel's books balance"),
];

pub(crate) fn revoke_cases(suite: &Suite) {
    const QUOTA: u64 = 4 << 20;
    let quota = alloc_slot();
    let task = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, quota, QUOTA, 0)
        .and_then(|_| sys::factory_create(quota, ObjectKind::Task, task, 0, 0));
    let empty = used(quota);

    // A fan-out of 4,000 copies of one page in another task, revoked by a thread below us.
    let page = fresh_page();
    let mut mapped = made.is_ok() && fan_out_into(task, page);
    let full = used(quota);
    let nodes = FAN_OUT * 64;
    let mut halfway = false;
    let mut results = Vec::new();
    // A tick may miss one run's steps: try up to three times.
    for _ in 0..3 {
        let _ = unmapper();
        let (r, seen) = unmap_watched(
            Fpage::memory(page, 12, Fpage::RWX),
            quota,
            full,
            full - nodes,
        );
        results.push(r);
        let after = used(quota);
        mapped &= after == full - nodes;
        halfway |= seen;
        if halfway || !mapped {
            break;
        }
        mapped &= fan_out_into(task, page) && used(quota) == full;
    }
    println!(
        "# revoke: fan-out results {results:?}, {} -> {} -> {}",
        empty,
        full,
        used(quota)
    );
    check(
        "revoke",
        "an Unmap of a fan-out of 4,000 mappings revokes all of them, refunding every node",
        mapped && results.iter().all(|&r| r == 0),
    );
    check(
        "revoke",
        "the fan-out's revocation goes in steps: a higher-priority thread runs in between",
        halfway,
    );
    check(
        "revoke",
        "after the stepwise revocation the page can be mapped again to all 4,000 places",
        fan_out_into(task, page) && used(quota) == full,
    );

    // Destroying the task that holds them: its revocation goes in steps too.
    let destroyed = sys::task_destroy(task);
    check_eq(
        "revoke",
        "destroying a task holding 4,000 mappings returns its whole quota",
        (destroyed, used(quota)),
        (Ok(()), 0),
    );

    // A chain of 1,000 mappings in our own space, each derived from the previous one.
    let root = fresh_page();
    // SAFETY: our page.
    unsafe { core::ptr::write_volatile(root as *mut u64, 0x5eed_cafe) };
    let chain = |n: u64| -> bool {
        let mut from = root;
        (0..n).all(|i| {
            let to = CHAIN_AREA + i * PAGE_SIZE;
            let ok = sys::map(
                slots::SELF_TASK,
                Fpage::memory(from, 12, Fpage::READ),
                to,
                MapFlags::empty(),
            )
            .is_ok();
            from = to;
            ok
        })
    };
    // The first round also makes the page tables, which stay.
    let built = chain(CHAIN);
    // SAFETY: revokes only the copies (CHAIN_AREA.., never touched).
    let first = unsafe { sys::unmap(Fpage::memory(root, 12, Fpage::RWX), UnmapFlags::empty()) };
    let _ = unmapper();
    let before = used(slots::FACTORY);
    let built = built && chain(CHAIN);
    let full = used(slots::FACTORY);
    let (r, _) = unmap_watched(
        Fpage::memory(root, 12, Fpage::RWX),
        slots::FACTORY,
        full,
        before,
    );
    check_eq(
        "revoke",
        "an Unmap of a chain of 1,000 mappings revokes every level in steps, refunding every node",
        (built, first, r, full - before, used(slots::FACTORY)),
        (true, Ok(()), 0, CHAIN * 64, before),
    );
    check(
        "revoke",
        "after a stepwise Unmap the caller keeps its own mapping",
        // SAFETY: our page.
        unsafe { core::ptr::read_volatile(root as *const u64) } == 0x5eed_cafe,
    );
    // With UNMAP_SELF over the whole chain area, in steps: the chain goes again. (Measured
    // from here: the cases above may have faulted in pages of our own, charged to us.)
    let before = used(slots::FACTORY);
    let built = chain(CHAIN);
    // SAFETY: the chain area holds only the chain (never touched).
    let r = unsafe { sys::unmap(Fpage::memory(CHAIN_AREA, 22, Fpage::RWX), UnmapFlags::SELF) };
    check_eq(
        "revoke",
        "an Unmap with UNMAP_SELF of the chain's 4 MiB area takes all of it, in steps",
        (built, r, used(slots::FACTORY)),
        (true, Ok(()), before),
    );

    // A 4 MiB string item arrives whole.
    string_4m_case();
    map_steps_case(suite);
    map_item_steps_case();
    fault_reply_steps_case(suite);
    string_steps_case();
    string_abort_case();
    check(
        "quota",
        "after the stepwise revocations the kernel's books balance",
        books_balance(),
    );
}

const STRING_4M: usize = 4 << 20;

fn pattern(i: usize) -> u8 {
    (i * 7 % 253) as u8
}

/// Sends a 4 MiB string of `pattern` to the main thread, `rounds` times.
extern "C" fn send_4m_string(rounds: u64) -> ! {
    let data: Vec<u8> = (0..STRING_4M).map(pattern).collect();
    let item = l4::abi::StringItem {
        length: STRING_4M as u64,
        address: data.as_ptr() as u64,
    }
    .words();
    for _ in 0..rounds {
        let _ = ipc::send(
            slots::SELF_THREAD,
            string_tag(14, 0, 1),
            &item,
            Timeouts::INFINITE,
        );
    }
    sys::thread_exit(0)
}

/// The string copy watcher: while set, the buffer it watches (address, length) and whether
/// it saw the copy half done (first byte arrived, last not yet).
static WATCHED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static WATCH_ON: AtomicBool = AtomicBool::new(false);
static SAW_HALF: AtomicU64 = AtomicU64::new(0);
static WATCHER_TURNS: AtomicU64 = AtomicU64::new(0);

/// Whether the watched buffer (if any) is half copied: its first byte arrived, its last not.
fn half_copied() -> bool {
    let (address, length) = (WATCHED[0].load(SeqCst), WATCHED[1].load(SeqCst) as usize);
    if length == 0 {
        return false;
    }
    // SAFETY: the main thread keeps the buffer alive while it is watched; bytes only.
    let (first, last) = unsafe {
        (
            core::ptr::read_volatile(address as *const u8),
            core::ptr::read_volatile((address as *const u8).add(length - 1)),
        )
    };
    first == pattern(0) && last != pattern(length - 1)
}

/// Wakes every millisecond (above the copying thread's priority) and looks at the buffer.
extern "C" fn copy_watcher(_: u64) -> ! {
    while WATCH_ON.load(SeqCst) {
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        WATCHER_TURNS.fetch_add(1, SeqCst);
        if half_copied() {
            SAW_HALF.fetch_add(1, SeqCst);
        }
    }
    sys::thread_exit(0)
}

fn string_4m_case() {
    let mut buffer = alloc::vec![1u8; STRING_4M];
    l4::utcb::set_string_buffer(0, &mut buffer);
    WATCHED[0].store(buffer.as_ptr() as u64, SeqCst);
    WATCHED[1].store(STRING_4M as u64, SeqCst);
    WATCH_ON.store(true, SeqCst);
    let watcher = go(copy_watcher, 0);
    // The sender runs below us and the watcher: we wait first, so it copies (in steps at
    // its priority) into our buffer, and the watcher's timer wake-ups come in between.
    // Four rounds, each into a buffer of ones again: a copy takes a few timer ticks.
    const ROUNDS: u64 = 4;
    let t = go(send_4m_string, ROUNDS);
    let lowered = sys::thread_schedule(t, 50, 0);
    let mut intact = 0;
    for round in 0..ROUNDS {
        if round > 0 {
            buffer.fill(1);
        }
        let r = ipc::receive(
            t,
            Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000_000)),
        );
        let length = match r {
            Ok(m) => m.word(0) >> 12,
            Err(_) => 0,
        };
        let whole = buffer.iter().enumerate().all(|(i, &b)| b == pattern(i));
        intact += u64::from(length == STRING_4M as u64 && whole);
    }
    WATCH_ON.store(false, SeqCst);
    WATCHED[1].store(0, SeqCst);
    l4::utcb::clear_string_buffer(0);
    check_eq(
        "string",
        "a 4 MiB string item arrives intact (4 times)",
        intact,
        ROUNDS,
    );
    let (half, turns) = (SAW_HALF.load(SeqCst), WATCHER_TURNS.load(SeqCst));
    println!("# 4 MiB string: the watcher saw it half copied {half} times in {turns} wake-ups");
    check(
        "string",
        "a 4 MiB string is copied in steps: a higher-priority thread runs while it is half done",
        lowered.is_ok() && half > 0,
    );
    let _ = sys::cap_delete(watcher);
}

/// Receive buffers no one touched before (their pages fault in during the copy's steps).
static mut UNTOUCHED_600K: [u8; 600 << 10] = [0; 600 << 10];
static mut UNTOUCHED_512K: [u8; 512 << 10] = [0; 512 << 10];

/// Sends three strings of one 4 MiB run of `pattern`: 600 KiB from byte 0, 10 bytes from
/// byte 123 and 700 KiB from byte 5.
extern "C" fn send_three_strings(_: u64) -> ! {
    let data: Vec<u8> = (0..STRING_4M).map(pattern).collect();
    let base = data.as_ptr() as u64;
    let words: Vec<u64> = [(600 << 10, 0), (10, 123), (700 << 10, 5)]
        .into_iter()
        .flat_map(|(length, offset)| {
            l4::abi::StringItem {
                length,
                address: base + offset,
            }
            .words()
        })
        .collect();
    let _ = ipc::send(
        slots::SELF_THREAD,
        string_tag(15, 0, 3),
        &words,
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// Three strings whose steps span items, into buffers whose pages fault in between steps: one
/// exact, one absent (0 bytes), one shorter than its string (truncated).
fn string_steps_case() {
    // SAFETY: only this thread uses the statics, through the kernel's copy.
    let (b0, b2) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(UNTOUCHED_600K),
            &mut *core::ptr::addr_of_mut!(UNTOUCHED_512K),
        )
    };
    l4::utcb::set_string_buffer(0, b0);
    l4::utcb::clear_string_buffer(1);
    l4::utcb::set_string_buffer(2, b2);
    let t = go(send_three_strings, 0);
    let r = ipc::receive(
        t,
        Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000_000)),
    );
    l4::utcb::clear_string_buffer(0);
    l4::utcb::clear_string_buffer(2);
    let lengths = match r {
        Ok(m) if m.tag.typed() == 3 => [0, 2, 4].map(|i| m.word(i) >> 12),
        _ => [u64::MAX; 3],
    };
    let whole = b0.iter().enumerate().all(|(i, &b)| b == pattern(i))
        && b2.iter().enumerate().all(|(i, &b)| b == pattern(i + 5));
    check_eq(
        "string",
        "three strings (1.2 MiB) in steps across items, buffers faulting in between: exact, absent, truncated",
        (lengths, whole),
        ([600 << 10, 0, 512 << 10], true),
    );
}

/// Wakes every millisecond and, the first time it sees the watched buffer half copied,
/// cancels the main thread's receive (`ExRegs` with `CANCEL`).
extern "C" fn copy_canceler(_: u64) -> ! {
    while WATCH_ON.load(SeqCst) {
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        if half_copied() {
            WATCHED[1].store(0, SeqCst);
            let _ = sys::ex_regs(slots::SELF_THREAD, 0, 0, ExRegsFlags::CANCEL);
        }
    }
    sys::thread_exit(0)
}

/// A receive canceled in the middle of a 4 MiB copy (the sender copies in steps below our
/// priority, a watcher above it cancels us when it sees our buffer half written) fails with
/// `Canceled`; we fill the same buffer with ones again and receive once more: the copy starts
/// over and every byte arrives. Up to four rounds, until one was canceled.
fn string_abort_case() {
    const ROUNDS: u64 = 4;
    let mut buffer = alloc::vec![1u8; STRING_4M];
    l4::utcb::set_string_buffer(0, &mut buffer);
    WATCHED[0].store(buffer.as_ptr() as u64, SeqCst);
    WATCH_ON.store(true, SeqCst);
    let canceler = go(copy_canceler, 0);
    let t = go(send_4m_string, ROUNDS);
    let lowered = sys::thread_schedule(t, 50, 0);
    let (mut canceled, mut whole, mut rounds) = (0, true, 0);
    while rounds < ROUNDS {
        buffer.fill(1);
        WATCHED[1].store(if canceled == 0 { STRING_4M as u64 } else { 0 }, SeqCst);
        match ipc::receive(
            t,
            Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000_000)),
        ) {
            // `Canceled` never carries the receive-phase bit (syscalls.md, 1.4).
            Err(e) if e == err(Error::Canceled, false) && canceled == 0 => canceled += 1,
            Ok(m) => {
                rounds += 1;
                whole &= m.word(0) >> 12 == STRING_4M as u64
                    && buffer.iter().enumerate().all(|(i, &b)| b == pattern(i));
            }
            Err(e) => {
                println!("# string abort: receive failed: {e:?}");
                whole = false;
                break;
            }
        }
    }
    WATCH_ON.store(false, SeqCst);
    WATCHED[1].store(0, SeqCst);
    // After a failure, take what the sender still sends (it must not reach later cases).
    let mut drained = rounds;
    while drained < ROUNDS
        && ipc::receive(
            t,
            Timeouts::new(Timeout::INFINITE, Timeout::micros(2_000_000)),
        )
        .is_ok()
    {
        drained += 1;
    }
    l4::utcb::clear_string_buffer(0);
    println!("# string abort: {canceled} receive canceled mid-copy, {rounds} arrived");
    check(
        "string",
        "a receive canceled mid-copy fails with Canceled; the copy starts over and arrives whole",
        lowered.is_ok() && canceled == 1 && rounds == ROUNDS && whole,
    );
    let _ = sys::cap_delete(canceler);
}

/// The slow mapper's job: the target task's slot, the flexpage, the destination; its result.
static MAP_JOB: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static MAP_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
static MAP_GO: AtomicBool = AtomicBool::new(false);
static MAP_DONE: AtomicBool = AtomicBool::new(false);

/// Low priority: once `MAP_GO` is set, maps the job's flexpage, then waits for the next.
extern "C" fn slow_mapper(_: u64) -> ! {
    loop {
        while !MAP_GO.swap(false, SeqCst) {
            let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        }
        let [task, fpage, destination] = [0, 1, 2].map(|i| MAP_JOB[i].load(SeqCst));
        MAP_RESULT.store(
            result_code(sys::map(task, Fpage(fpage), destination, MapFlags::empty())),
            SeqCst,
        );
        MAP_DONE.store(true, SeqCst);
    }
}

/// A `Map` of 4 MiB of small pages (1,024 mapping nodes) goes in bounded steps: a thread
/// below us maps it into an agent's task while we wake every tick and sample our quota,
/// which must be seen between empty and full at least once (up to three tries); then the
/// agent reads every page's mark.
fn map_steps_case(suite: &Suite) {
    const PAGES: u64 = 1024;
    const TARGET: u64 = TEST_AREA + (16 << 30);
    let layout = core::alloc::Layout::from_size_align((PAGES * PAGE_SIZE) as usize, 4 << 20)
        .expect("layout");
    // SAFETY: a valid layout; the region is leaked (the agent's copies are revoked at the end).
    let region = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    for i in 0..PAGES {
        // SAFETY: inside the region we just allocated.
        unsafe { core::ptr::write_volatile((region + i * PAGE_SIZE) as *mut u64, i + 1) };
    }
    let a = Agent::new(suite);
    let mapper = go(slow_mapper, 0);
    let lowered = sys::thread_schedule(mapper, 50, 0);
    let fpage = Fpage::memory(region, 22, Fpage::READ);
    let (mut halfway, mut results, mut sizes) = (false, Vec::new(), Vec::new());
    for _ in 0..3 {
        // SAFETY: revokes only the agent's copies of our region (none the first time).
        let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
        let empty = used(slots::FACTORY);
        for (i, v) in [a.task, fpage.0, TARGET].into_iter().enumerate() {
            MAP_JOB[i].store(v, SeqCst);
        }
        MAP_DONE.store(false, SeqCst);
        MAP_GO.store(true, SeqCst);
        let mut samples = Vec::with_capacity(5_000);
        for _ in 0..5_000 {
            if MAP_DONE.load(SeqCst) {
                break;
            }
            let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
            samples.push(used(slots::FACTORY));
        }
        let full = used(slots::FACTORY);
        halfway |= samples.iter().any(|&u| u > empty && u < full);
        results.push(MAP_RESULT.load(SeqCst));
        sizes.push(full - empty);
        if halfway {
            break;
        }
    }
    let marks = (0..PAGES)
        .filter(|&i| a.read(TARGET + i * PAGE_SIZE) == i + 1)
        .count() as u64;
    println!("# map steps: results {results:?}, bytes per try {sizes:?}, seen half done: {halfway}, {marks} pages seen");
    check(
        "map",
        "a Map of 4 MiB of small pages goes in bounded steps (a higher-priority thread sees it half done) and maps every page",
        lowered.is_ok() && results.iter().all(|&r| r == 0) && halfway && marks == PAGES,
    );
    // SAFETY: as above.
    let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
    let _ = sys::task_destroy(a.task);
}

/// 4 MiB of small pages of ours, each marked with its index + 1 (leaked: the cases revoke
/// only what was derived from it).
fn marked_region() -> u64 {
    let layout = core::alloc::Layout::from_size_align(4 << 20, 4 << 20).expect("layout");
    // SAFETY: a valid layout; the region is never freed.
    let region = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    for i in 0..1024 {
        // SAFETY: inside the region we just allocated.
        unsafe { core::ptr::write_volatile((region + i * PAGE_SIZE) as *mut u64, i + 1) };
    }
    region
}

/// The quota sampler: while on, wakes every millisecond (above the thread doing the work)
/// and notes our factory's use, so that a transfer seen half done shows as a sample between
/// the use before and after it.
static SAMPLING: AtomicBool = AtomicBool::new(false);
static SAMPLES: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static SAMPLE_COUNT: AtomicU64 = AtomicU64::new(0);

extern "C" fn quota_sampler(_: u64) -> ! {
    loop {
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        if SAMPLING.load(SeqCst) {
            let n = SAMPLE_COUNT.fetch_add(1, SeqCst) as usize;
            SAMPLES[n % SAMPLES.len()].store(used(slots::FACTORY), SeqCst);
        }
    }
}

/// Whether a sample taken since the sampling started lies strictly between `empty` and `full`.
fn sampled_between(empty: u64, full: u64) -> bool {
    let n = (SAMPLE_COUNT.load(SeqCst) as usize).min(SAMPLES.len());
    SAMPLES[..n]
        .iter()
        .map(|s| s.load(SeqCst))
        .any(|u| u > empty && u < full)
}

/// Start the sampler thread the first time (it stays: an exit would refund its FPU area to our
/// quota while later cases compare it), before a case reads the quota it compares with.
fn ensure_sampler() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if !STARTED.swap(true, SeqCst) {
        go(quota_sampler, 0);
        // Let it run into its wait (its first touch of its stack is paged now).
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(3000)));
    }
}

fn start_sampling() {
    SAMPLE_COUNT.store(0, SeqCst);
    SAMPLING.store(true, SeqCst);
}

/// The map item sender's job: the region (0: none yet).
static ITEM_REGION: AtomicU64 = AtomicU64::new(0);

/// Low priority: sends the main thread a map item of the 4 MiB region, `rounds` times, then
/// waits forever.
extern "C" fn send_map_item(rounds: u64) -> ! {
    let item = MapItem::map(0, Fpage::memory(ITEM_REGION.load(SeqCst), 22, Fpage::READ));
    for _ in 0..rounds {
        let _ = ipc::send(
            slots::SELF_THREAD,
            MessageTag::new(16, 0, 1),
            &[item.control, item.fpage.0],
            Timeouts::INFINITE,
        );
    }
    // Stays (an exit would refund its FPU area to our quota while later cases compare it).
    loop {
        let _ = ipc::wait(Timeouts::INFINITE);
    }
}

/// A map item of 4 MiB of small pages (1,024 mapping nodes) goes in bounded steps before its
/// message arrives: a sender below us and the quota sampler sends it to us (a receive window
/// elsewhere in our own address space), and the sampler must see our quota between empty and
/// full at least once (up to three rounds); every page arrives.
fn map_item_steps_case() {
    const ROUNDS: u64 = 3;
    const TARGET: u64 = TEST_AREA + (20 << 30);
    let region = marked_region();
    ITEM_REGION.store(region, SeqCst);
    let fpage = Fpage::memory(region, 22, Fpage::READ);
    ensure_sampler();
    let t = go(send_map_item, ROUNDS);
    let lowered = sys::thread_schedule(t, 50, 0);
    l4::utcb::set_receive_window(Fpage::memory(TARGET, 22, Fpage::RWX));
    let (mut halfway, mut arrived, mut marks) = (false, 0, 0);
    for round in 0..ROUNDS {
        // SAFETY: revokes only the copy at TARGET (none in the first round).
        let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
        let empty = used(slots::FACTORY);
        start_sampling();
        let r = ipc::receive(
            t,
            Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000_000)),
        );
        SAMPLING.store(false, SeqCst);
        let full = used(slots::FACTORY);
        arrived += u64::from(matches!(r, Ok(m) if m.tag.label() == 16 && m.tag.typed() == 1));
        halfway |= sampled_between(empty, full);
        marks = (0..1024)
            // SAFETY: reads of the pages the item mapped (read-only).
            .filter(|&i| unsafe { core::ptr::read_volatile((TARGET + i * PAGE_SIZE) as *const u64) } == i + 1)
            .count();
        if halfway {
            // The sender's remaining rounds are taken below.
            for _ in round + 1..ROUNDS {
                let _ = ipc::receive(
                    t,
                    Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000_000)),
                );
            }
            break;
        }
    }
    l4::utcb::set_receive_window(Fpage(0));
    println!("# map item steps: {arrived} arrived, seen half done: {halfway}, {marks} pages");
    check(
        "map",
        "a map item of 4 MiB of small pages goes in bounded steps before its message arrives (seen half done), every page mapped",
        lowered.is_ok() && arrived > 0 && halfway && marks == 1024,
    );
    // SAFETY: as above.
    let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
}

/// Faults the big pager answered in its area.
static BIG_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Where the big pager answers with the whole region (4 MiB aligned).
const BIG_AREA: u64 = TEST_AREA + (24 << 30);

/// Low priority pager: a fault in `BIG_AREA`'s first 4 MiB gets the whole 4 MiB region in
/// one reply; image faults as usual.
extern "C" fn big_pager(_: u64) -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        let m = match message {
            Ok(m) if m.tag.label() == LABEL_PAGE_FAULT => m,
            _ => {
                message = ipc::wait(Timeouts::INFINITE);
                continue;
            }
        };
        let (address, access) = (m.word(0), m.word(1));
        let item = if (BIG_AREA..BIG_AREA + (4 << 20)).contains(&address) {
            BIG_FAULTS.fetch_add(1, SeqCst);
            Some(MapItem::map(
                BIG_AREA,
                Fpage::memory(ITEM_REGION.load(SeqCst), 22, Fpage::READ),
            ))
        } else {
            l4::child::resolve_image_fault(address, access)
        };
        message = match item {
            Some(item) => ipc::reply_wait(
                MessageTag::new(0, 0, 1),
                &[item.control, item.fpage.0],
                Timeouts::INFINITE,
            ),
            None => ipc::reply_wait(tag(-1, 0), &[], Timeouts::INFINITE),
        };
    }
}

/// A page-fault reply with 4 MiB of small pages goes in bounded steps: an agent's pager below
/// us answers its fault with the whole region, the quota sampler must see the agent's
/// mappings half made at least once (up to three tries), and the agent then reads every page
/// without another fault.
fn fault_reply_steps_case(suite: &Suite) {
    let region = marked_region();
    ITEM_REGION.store(region, SeqCst);
    let fpage = Fpage::memory(region, 22, Fpage::READ);
    let pager = go(big_pager, 0);
    let lowered = sys::thread_schedule(pager, 50, 0);
    ensure_sampler();
    let (task, thread) = suite.child(child_agent, gate(pager, 0), suite.recorder, true);
    let a = Agent { task, thread };
    let (mut halfway, mut first, mut tries) = (false, 0, 0);
    while tries < 3 && !halfway {
        tries += 1;
        // SAFETY: revokes only the agent's copies (none the first time).
        let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
        let empty = used(slots::FACTORY);
        start_sampling();
        first = a.read(BIG_AREA);
        SAMPLING.store(false, SeqCst);
        halfway |= sampled_between(empty, used(slots::FACTORY));
    }
    let faults = BIG_FAULTS.load(SeqCst);
    let marks = (0..1024)
        .filter(|&i| a.read(BIG_AREA + i * PAGE_SIZE) == i + 1)
        .count();
    let later = BIG_FAULTS.load(SeqCst) - faults;
    println!("# fault reply steps: {tries} tries, seen half done: {halfway}, {marks} pages, {later} later faults");
    check(
        "map",
        "a page-fault reply of 4 MiB of small pages goes in bounded steps (seen half done) and maps every page at once",
        lowered.is_ok() && first == 1 && halfway && faults == tries && marks == 1024 && later == 0,
    );
    // SAFETY: as above.
    let _ = unsafe { sys::unmap(fpage, UnmapFlags::empty()) };
    let _ = sys::task_destroy(a.task);
}
