//! Kernel microbenchmarks. Run under QEMU with `-icount shift=0`, where `rdtsc` deltas count
//! guest instructions exactly; each result is the median of many iterations (after a warm-up),
//! minus the cost of the `rdtsc` pair itself. Prints one line per benchmark:
//! `bench: NAME median=M min=N iterations=K`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Fpage, IrqOp, MapItem, MessageTag, ObjectKind, Syscall, Timeout, Timeouts,
    LABEL_PAGE_FAULT, NO_CAP, OPEN_WAIT, PAGE_SIZE,
};
use l4::abi::{MapFlags, UnmapFlags};
use l4::child::fresh_page;
use l4::ipc::{self, raw_ipc};
use l4::thread::{alloc_slot, spawn, Spawn};
use l4::{println, sys};

const ITERATIONS: usize = 2000;
const WARMUP: usize = 100;

fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (high as u64) << 32 | low as u64
}

static OVERHEAD: AtomicU64 = AtomicU64::new(0);

fn report(name: &str, samples: &mut [u64]) {
    samples.sort_unstable();
    let overhead = OVERHEAD.load(SeqCst);
    let median = samples[samples.len() / 2].saturating_sub(overhead);
    let min = samples[0].saturating_sub(overhead);
    println!(
        "bench: {name} median={median} min={min} iterations={}",
        samples.len()
    );
}

/// Measure `f` ITERATIONS times after WARMUP runs.
fn measure(name: &str, mut f: impl FnMut()) {
    for _ in 0..WARMUP {
        f();
    }
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let t0 = rdtsc();
        f();
        let t1 = rdtsc();
        samples.push(t1 - t0);
    }
    report(name, &mut samples);
}

/// Echo server: replies with the tag's word count, the words left in registers and the UTCB.
fn echo_loop() -> ! {
    // SAFETY: raw IPC on our own UTCB.
    let (mut rax, mut tag, _, mut words) =
        unsafe { raw_ipc(Syscall::Receive, 0, OPEN_WAIT, 0, 0, [0; 4]) };
    loop {
        let reply = if rax == 0 {
            MessageTag::new(0, MessageTag(tag).untyped(), 0).0
        } else {
            0
        };
        // SAFETY: as above.
        (rax, tag, _, words) =
            unsafe { raw_ipc(Syscall::ReplyWait, 0, OPEN_WAIT, reply, 0, words) };
    }
}

extern "C" fn echo_thread(_: u64) -> ! {
    echo_loop()
}

/// Echo server with a 4 KiB receive buffer for string items (on its stack).
fn string_echo_loop() -> ! {
    let mut buffer = [0u8; 4096];
    l4::utcb::set_string_buffer(0, &mut buffer);
    echo_loop()
}

extern "C" fn string_echo_thread(_: u64) -> ! {
    string_echo_loop()
}

extern "C" fn string_echo_child() -> ! {
    string_echo_loop()
}

fn string_round_trip(name: &str, server: u64) {
    let data = alloc::vec![7u8; 4096];
    let item = l4::abi::StringItem {
        length: 4096,
        address: data.as_ptr() as u64,
    }
    .words();
    let tag = MessageTag::new(1, 0, 1).0;
    measure(name, || {
        // SAFETY: raw IPC; the string item travels in the first two registers.
        let (rax, ..) =
            unsafe { raw_ipc(Syscall::Call, server, 0, tag, 0, [item[0], item[1], 0, 0]) };
        assert_eq!(rax, 0, "string IPC failed in benchmark");
    });
}

extern "C" fn echo_child() -> ! {
    echo_loop()
}

/// Touch the SSE registers (one vector add), as code compiled with SSE does between IPCs.
#[inline(always)]
fn use_sse() {
    // SAFETY: changes only the declared XMM registers.
    unsafe {
        core::arch::asm!("paddq xmm0, xmm1", out("xmm0") _, out("xmm1") _, options(nomem, nostack))
    };
}

/// Echo server that uses the SSE registers before every reply (0-word messages).
extern "C" fn fpu_echo_child() -> ! {
    // SAFETY: raw IPC on our own UTCB.
    let (mut rax, ..) = unsafe { raw_ipc(Syscall::Receive, 0, OPEN_WAIT, 0, 0, [0; 4]) };
    loop {
        use_sse();
        let reply = if rax == 0 {
            MessageTag::new(0, 0, 0).0
        } else {
            0
        };
        // SAFETY: as above.
        (rax, ..) = unsafe { raw_ipc(Syscall::ReplyWait, 0, OPEN_WAIT, reply, 0, [0; 4]) };
    }
}

/// Call and reply, both sides using the SSE registers in between.
fn fpu_round_trips(name: &str, server: u64) {
    let tag = MessageTag::new(1, 0, 0).0;
    measure(name, || {
        use_sse();
        // SAFETY: raw IPC.
        let (rax, ..) = unsafe { raw_ipc(Syscall::Call, server, 0, tag, 0, [1, 2, 3, 4]) };
        assert_eq!(rax, 0, "IPC failed in benchmark");
    });
}

fn round_trips(prefix: &str, server: u64) {
    for words in [0usize, 8, 64] {
        let tag = MessageTag::new(1, words, 0).0;
        let name = alloc::format!("{prefix}_{words}w");
        measure(&name, || {
            // SAFETY: raw IPC; words 4.. come from our UTCB as they are.
            let (rax, ..) = unsafe { raw_ipc(Syscall::Call, server, 0, tag, 0, [1, 2, 3, 4]) };
            assert_eq!(rax, 0, "IPC failed in benchmark");
        });
    }
}

/// Measure mapping `fpage` into `target` and revoking it again (`map_NAME`, `unmap_NAME`).
fn map_unmap(name: &str, target: u64, fpage: Fpage, iterations: usize, warmup: usize) {
    let destination = 0x0000_7000_0000_0000;
    let mut map_samples = Vec::new();
    let mut unmap_samples = Vec::new();
    for i in 0..iterations + warmup {
        let t0 = rdtsc();
        sys::map(target, fpage, destination, MapFlags::empty()).expect("map");
        let t1 = rdtsc();
        // SAFETY: revokes only the copies in the other task.
        unsafe {
            sys::unmap(
                Fpage::memory(fpage.base(), fpage.order(), Fpage::RWX),
                UnmapFlags::empty(),
            )
        }
        .expect("unmap");
        let t2 = rdtsc();
        if i >= warmup {
            map_samples.push(t1 - t0);
            unmap_samples.push(t2 - t1);
        }
    }
    report(&alloc::format!("map_{name}"), &mut map_samples);
    report(&alloc::format!("unmap_{name}"), &mut unmap_samples);
}

/// Guest RAM into a VM: 256 MiB of 2 MiB pages from the root task's RAM service (module
/// option `ram=256M`) mapped into a VM with one `Map` (`map_256m_guest_ram`) and revoked
/// with one `Unmap` (`unmap_256m_guest_ram`); and one 2 MiB page (`map_2m_into_vm`,
/// `unmap_2m_from_vm`), and with `ram=1280M` one 1 GiB page (`map_1g_guest_ram`). Skipped
/// without SVM or without the RAM.
fn guest_ram() {
    const RAM: u64 = 0x0000_4000_0000_0000;
    const RAM_1G: u64 = 0x0000_4040_0000_0000;
    const SIZE_ORDER: u32 = 28;
    if let Err(e) = l4::parent::request_ram(RAM, 1 << SIZE_ORDER) {
        println!("bench: guest RAM benchmarks skipped: {e}");
        return;
    }
    let vm = alloc_slot();
    if let Err(e) = sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, NO_CAP, 0) {
        println!("bench: guest RAM benchmarks skipped: no VM ({e})");
        return;
    }
    // 1 GiB more (module option `ram=1280M` on a machine that has a 1 GiB page free): one
    // 1 GiB page from the root task, mapped as one nested 1 GiB page.
    let big = match l4::parent::request_ram(RAM_1G, 1 << 30) {
        Ok(()) => Some(("1g_guest_ram", RAM_1G, 30, 9)),
        Err(e) => {
            println!("bench: 1 GiB guest RAM benchmark skipped: {e}");
            None
        }
    };
    let runs = [
        ("256m_guest_ram", RAM, SIZE_ORDER, 9),
        ("2m_into_vm", RAM, 21, 200),
    ];
    for (name, base, order, iterations) in runs.into_iter().chain(big) {
        let mut map_samples = Vec::new();
        let mut unmap_samples = Vec::new();
        for i in 0..iterations + 2 {
            let t0 = rdtsc();
            sys::map(
                vm,
                Fpage::memory(base, order, Fpage::RWX),
                0,
                MapFlags::empty(),
            )
            .expect("map into VM");
            let t1 = rdtsc();
            // SAFETY: revokes only the VM's copies.
            unsafe { sys::unmap(Fpage::memory(base, order, Fpage::RWX), UnmapFlags::empty()) }
                .expect("unmap");
            let t2 = rdtsc();
            if i >= 2 {
                map_samples.push(t1 - t0);
                unmap_samples.push(t2 - t1);
            }
        }
        report(&alloc::format!("map_{name}"), &mut map_samples);
        report(&alloc::format!("unmap_{name}"), &mut unmap_samples);
    }
}

// ---- page faults: a child touches pages, our pager maps pre-zeroed ones

const FAULT_AREA: u64 = 0x0000_6000_0000_0000;
static POOL: AtomicU64 = AtomicU64::new(0);
static POOL_NEXT: AtomicU64 = AtomicU64::new(0);

extern "C" fn pager_thread(_: u64) -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        let Ok(m) = message else {
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        };
        let item = if m.tag.label() != LABEL_PAGE_FAULT {
            None
        } else if (FAULT_AREA..FAULT_AREA + (1 << 30)).contains(&m.word(0)) {
            let page = POOL.load(SeqCst) + POOL_NEXT.fetch_add(1, SeqCst) * PAGE_SIZE;
            Some(MapItem::map(
                m.word(0),
                Fpage::memory(page, 12, Fpage::READ | Fpage::WRITE),
            ))
        } else {
            l4::child::resolve_image_fault(m.word(0), m.word(1))
        };
        message = match item {
            Some(item) => ipc::reply_wait(
                MessageTag::new(0, 0, 1),
                &[item.control, item.fpage.0],
                Timeouts::INFINITE,
            ),
            None => ipc::reply_wait(MessageTag::new(-1, 0, 0), &[], Timeouts::INFINITE),
        };
    }
}

const FAULTS: usize = 1000;

extern "C" fn fault_child() -> ! {
    let mut samples = [0u64; FAULTS];
    for (i, sample) in samples.iter_mut().enumerate() {
        let address = FAULT_AREA + i as u64 * PAGE_SIZE;
        let t0 = rdtsc();
        // SAFETY: the pager maps this page on the fault.
        unsafe { core::ptr::write_volatile(address as *mut u64, 1) };
        *sample = rdtsc() - t0;
    }
    samples.sort_unstable();
    let _ = ipc::send(
        slots::PEER,
        MessageTag::new(1, 2, 0),
        &[samples[FAULTS / 2], samples[0]],
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

// ---- IRQ latency

static IRQ_SEEN: AtomicU64 = AtomicU64::new(0);

extern "C" fn irq_thread(irq: u64) -> ! {
    loop {
        if ipc::wait(Timeouts::INFINITE).is_ok() {
            IRQ_SEEN.store(rdtsc(), SeqCst);
            let _ = sys::irq_control(irq, IrqOp::Acknowledge, 0);
        }
    }
}

// ---- worst-case latency of a timer wake-up while a lower-priority thread is in a long syscall

/// How late each wake-up of the watcher was (instructions after its timer tick was due), in
/// order.
static WAKE_LATENESS: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];
static WAKES: AtomicU64 = AtomicU64::new(0);

/// The high-priority thread: sleeps 1 ms at a time (a receive with a 1 ms timeout that nobody
/// answers) and records, at each wake-up, how long after the timer interrupt that woke it was
/// due it runs (the kernel puts the interrupt's due time, what its one-shot timer was armed
/// for, in the KIP).
extern "C" fn watcher(_: u64) -> ! {
    let timeout = Timeouts::new(Timeout::INFINITE, Timeout::micros(1000));
    loop {
        let _ = ipc::wait(timeout);
        let late = rdtsc().wrapping_sub(l4::kip::tick_due_tsc());
        let i = WAKES.load(SeqCst) as usize;
        if i < WAKE_LATENESS.len() {
            WAKE_LATENESS[i].store(late, SeqCst);
            WAKES.store(i as u64 + 1, SeqCst);
        }
    }
}

fn sleep_ms(ms: u32) {
    let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(ms * 1000)));
}

/// Spin in user mode (the CPU stays busy, so QEMU's virtual time is the instruction count)
/// until the watcher woke `more` more times, at most `limit` TSC ticks.
fn spin_for_wakes(more: u64, limit: u64) {
    let (start, target) = (rdtsc(), WAKES.load(SeqCst) + more);
    while WAKES.load(SeqCst) < target && rdtsc().wrapping_sub(start) < limit {
        core::hint::spin_loop();
    }
}

/// Run `op` (in this low-priority thread) while the watcher sleeps tick by tick; print the
/// worst lateness of its wake-ups from the start of `op` to the first one after it
/// (`latency: NAME worst=W op=T wakes=N busy=B`): the instructions from the moment the tick
/// was due (interrupts may have been off then) to the watcher running. `B` is the worst of
/// eight wake-ups just before, while this thread spins in user mode: the floor (the timer
/// interrupt, the timeout, the switch). The CPU is kept busy throughout: an idle CPU waits
/// for QEMU's host timer, which adds the host's latency. A tick that comes while interrupts
/// are off for longer than a period is lost, and the figure then misses whole periods: `op`
/// shows the whole operation.
fn latency(name: &str, op: impl FnOnce()) {
    let mut op = Some(op);
    latency_rounds(name, 1, || {}, || (op.take().expect("one round"))());
}

/// As [`latency`], `op` run `rounds` times, each after `setup` (not measured) and at a
/// different phase of the watcher's wake-ups (operations shorter than its two ticks are hit
/// by its tick at a different point each round, or not at all); `op=` is the longest round.
fn latency_rounds(name: &str, rounds: u64, mut setup: impl FnMut(), mut op: impl FnMut()) {
    let period = l4::kip::kip().tsc_hz / l4::kip::kip().timer_hz.max(1);
    spin_for_wakes(1, 4 * period);
    let before = WAKES.load(SeqCst) as usize;
    spin_for_wakes(8, 16 * period);
    let first = WAKES.load(SeqCst) as usize;
    let busy = lateness(before, first).max().unwrap_or(0);
    let (mut worst, mut longest, mut wakes) = (0, 0, 0);
    for round in 0..rounds {
        setup();
        spin_for_wakes(1, 4 * period);
        let phase = rdtsc();
        // The phases spread over two of the watcher's periods.
        while rdtsc().wrapping_sub(phase) < round * 2 * period / rounds {
            core::hint::spin_loop();
        }
        let start = WAKES.load(SeqCst) as usize;
        let t0 = rdtsc();
        op();
        let t1 = rdtsc();
        let during = WAKES.load(SeqCst) as usize;
        spin_for_wakes(1, 4 * period);
        if WAKES.load(SeqCst) as usize <= during || during >= WAKE_LATENESS.len() {
            println!("# bench: latency {name}: too few wake-ups in round {round}");
            return;
        }
        worst = lateness(start, during + 1).max().unwrap_or(0).max(worst);
        longest = longest.max(t1 - t0);
        wakes += during + 1 - start;
    }
    println!("latency: {name} worst={worst} op={longest} wakes={wakes} busy={busy}");
}

/// The recorded lateness of wake-ups `from..to` (bounded by what was recorded).
fn lateness(from: usize, to: usize) -> impl Iterator<Item = u64> {
    let end = to.min(WAKE_LATENESS.len());
    WAKE_LATENESS[from.min(end)..end]
        .iter()
        .map(|t| t.load(SeqCst))
}

extern "C" fn never_runs() -> ! {
    sys::thread_exit(0)
}

/// Receives 4 MiB strings forever (at the main thread's priority).
extern "C" fn string_sink(buffer: u64) -> ! {
    // SAFETY: the main thread leaked this buffer of STRING_BYTES for us.
    let buffer = unsafe { core::slice::from_raw_parts_mut(buffer as *mut u8, STRING_BYTES) };
    l4::utcb::set_string_buffer(0, buffer);
    loop {
        let _ = ipc::wait(Timeouts::INFINITE);
    }
}

const STRING_BYTES: usize = 4 << 20;

/// Where the map item sink receives (a 16 MiB receive window).
const ITEM_AREA: u64 = 0x0000_7200_0000_0000;
const ITEM_ORDER: u32 = 24;

/// Receives map items of up to 16 MiB forever, into `ITEM_AREA` (at the main thread's
/// priority).
extern "C" fn item_sink(_: u64) -> ! {
    l4::utcb::set_receive_window(Fpage::memory(ITEM_AREA, ITEM_ORDER, Fpage::RWX));
    loop {
        let _ = ipc::wait(Timeouts::INFINITE);
    }
}

/// The latency benchmarks (module argument `latency`): a timer wake-up of a high-priority
/// thread while this low-priority thread destroys a task of 4,000 threads, revokes a fan-out
/// of 4,000 mappings and a chain of 1,000, unmaps 256 MiB of guest RAM, sends a 4 MiB string
/// and a map item of 16 MiB of small pages.
fn latency_benchmarks() {
    let watcher = spawn(watcher, 0, Spawn::default()).expect("watcher");
    sys::thread_schedule(watcher, 100, 0).expect("watcher priority");
    sys::thread_schedule(slots::SELF_THREAD, 10, 0).expect("own priority");
    WAKES.store(0, SeqCst);
    latency("idle", || sleep_ms(3));

    // A task with 4,000 threads, never started.
    let (task, _) = l4::child::create(never_runs, NO_CAP, NO_CAP, NO_CAP, false).expect("task");
    let scratch = alloc_slot();
    let mut threads = 1;
    for i in 1..4000u64 {
        if sys::factory_create(slots::FACTORY, ObjectKind::Thread, scratch, 0, 0).is_err() {
            break;
        }
        let utcb = l4::abi::UTCB_AREA + i * l4::abi::UTCB_SIZE;
        let bound = sys::thread_control(scratch, task, utcb, NO_CAP, NO_CAP);
        sys::cap_delete(scratch).expect("delete");
        if bound.is_err() {
            break;
        }
        threads += 1;
    }
    latency(&alloc::format!("task_destroy_{threads}_threads"), || {
        sys::task_destroy(task).expect("destroy")
    });

    // One page mapped 4,000 times into another task, revoked.
    let (target, _) =
        l4::child::create(never_runs, NO_CAP, NO_CAP, NO_CAP, false).expect("target task");
    let page = fresh_page();
    let read = Fpage::memory(page, 12, Fpage::READ);
    for i in 0..4000u64 {
        sys::map(
            target,
            read,
            0x0000_7000_0000_0000 + i * PAGE_SIZE,
            MapFlags::empty(),
        )
        .expect("map fan-out");
    }
    latency("unmap_fanout_4000", || {
        // SAFETY: revokes only the copies in the other task.
        unsafe { sys::unmap(Fpage::memory(page, 12, Fpage::RWX), UnmapFlags::empty()) }
            .expect("unmap")
    });

    // A chain of 1,000 mappings in our own space, each derived from the previous one.
    let chain = fresh_page();
    const CHAIN: u64 = 0x0000_7100_0000_0000;
    let mut from = chain;
    let mut links = 0;
    for i in 0..1000u64 {
        let to = CHAIN + i * PAGE_SIZE;
        if sys::map(
            slots::SELF_TASK,
            Fpage::memory(from, 12, Fpage::READ),
            to,
            MapFlags::empty(),
        )
        .is_err()
        {
            break;
        }
        links += 1;
        from = to;
    }
    latency(&alloc::format!("unmap_chain_{links}"), || {
        // SAFETY: revokes only the copies (CHAIN.., never touched).
        unsafe { sys::unmap(Fpage::memory(chain, 12, Fpage::RWX), UnmapFlags::empty()) }
            .expect("unmap")
    });
    sys::task_destroy(target).expect("destroy target");

    // 256 MiB of guest RAM (2 MiB pages) in a VM, revoked with one Unmap.
    const RAM: u64 = 0x0000_4000_0000_0000;
    let vm = alloc_slot();
    if l4::parent::request_ram(RAM, 1 << 28).is_ok()
        && sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, NO_CAP, 0).is_ok()
    {
        let map = || {
            sys::map(vm, Fpage::memory(RAM, 28, Fpage::RWX), 0, MapFlags::empty())
                .expect("map into VM")
        };
        let unmap = || {
            let fpage = Fpage::memory(RAM, 28, Fpage::RWX);
            // SAFETY: revokes only the VM's copies.
            unsafe { sys::unmap(fpage, UnmapFlags::empty()) }.expect("unmap")
        };
        latency_rounds("map_256m_guest_ram", 16, unmap, map);
        latency_rounds("unmap_256m_guest_ram", 16, map, unmap);
    } else {
        println!("# bench: no VM or guest RAM: guest latency skipped");
    }

    // A 4 MiB string to a thread of ours.
    let source = alloc::vec![0x5au8; STRING_BYTES];
    let sink_buffer = alloc::vec![1u8; STRING_BYTES].leak();
    let sink = spawn(
        string_sink,
        sink_buffer.as_mut_ptr() as u64,
        Spawn::default(),
    )
    .expect("sink");
    sys::thread_schedule(sink, 10, 0).expect("sink priority");
    sys::thread_yield();
    let item = l4::abi::StringItem {
        length: STRING_BYTES as u64,
        address: source.as_ptr() as u64,
    }
    .words();
    latency_rounds(
        "string_copy_4m",
        8,
        || {},
        || {
            let tag = MessageTag::new(1, 0, 1).0;
            // SAFETY: raw IPC; the string item travels in the first two registers.
            let (rax, ..) =
                unsafe { raw_ipc(Syscall::Send, sink, 0, tag, 0, [item[0], item[1], 0, 0]) };
            assert_eq!(rax, 0, "string send failed");
        },
    );
    let copied = sink_buffer.iter().all(|&b| b == 0x5a);
    println!("# bench: string arrived: {copied}");

    // A map item of 16 MiB of small pages (4,096 mappings) to a thread of ours.
    let layout =
        core::alloc::Layout::from_size_align(1 << ITEM_ORDER, 1 << ITEM_ORDER).expect("layout");
    // SAFETY: a valid layout; leaked (only its copies at ITEM_AREA are revoked).
    let region = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    for page in (region..region + (1 << ITEM_ORDER)).step_by(PAGE_SIZE as usize) {
        // SAFETY: inside the region: fault every page in.
        unsafe { core::ptr::write_volatile(page as *mut u64, page) };
    }
    let sink = spawn(item_sink, 0, Spawn::default()).expect("item sink");
    sys::thread_schedule(sink, 10, 0).expect("item sink priority");
    sys::thread_yield();
    let fpage = Fpage::memory(region, ITEM_ORDER, Fpage::READ);
    let item = l4::abi::MapItem::map(0, fpage);
    latency_rounds(
        "map_item_16m",
        4,
        || {
            let fpage = Fpage::memory(region, ITEM_ORDER, Fpage::RWX);
            // SAFETY: revokes only the sink's copies.
            unsafe { sys::unmap(fpage, UnmapFlags::empty()) }.expect("unmap")
        },
        || {
            let tag = MessageTag::new(1, 0, 1).0;
            // SAFETY: raw IPC; the map item travels in the first two registers.
            let (rax, ..) = unsafe {
                raw_ipc(
                    Syscall::Send,
                    sink,
                    0,
                    tag,
                    0,
                    [item.control, item.fpage.0, 0, 0],
                )
            };
            assert_eq!(rax, 0, "map item send failed");
        },
    );
    // SAFETY: the sink's copies are mapped: read one.
    let last = unsafe {
        core::ptr::read_volatile((ITEM_AREA + (1 << ITEM_ORDER) - PAGE_SIZE) as *const u64)
    };
    println!(
        "# bench: map item arrived: {}",
        last == region + (1 << ITEM_ORDER) - PAGE_SIZE
    );
}

fn main() -> i64 {
    if l4::rt::arguments()
        .split_whitespace()
        .any(|a| a == "latency")
    {
        println!("# bench: latency of a timer wake-up during long syscalls (instructions)");
        latency_benchmarks();
        println!("# bench: done");
        return 0;
    }
    println!("# bench: kernel microbenchmarks (guest instructions under -icount)");
    let mut empty = Vec::new();
    for _ in 0..1000 {
        let t0 = rdtsc();
        let t1 = rdtsc();
        empty.push(t1 - t0);
    }
    empty.sort_unstable();
    OVERHEAD.store(empty[500], SeqCst);

    // Two threads of one address space.
    let local = spawn(echo_thread, 0, Spawn::default()).expect("server thread");
    sys::thread_yield();
    round_trips("ipc_call_reply_same_space", local);
    let local_strings =
        spawn(string_echo_thread, 0, Spawn::default()).expect("string server thread");
    sys::thread_yield();
    string_round_trip("ipc_call_reply_same_space_4k_string", local_strings);

    // Two address spaces.
    let pager = spawn(pager_thread, 0, Spawn::default()).expect("pager thread");
    let pager_gate = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Gate, pager_gate, pager, 1).expect("gate");
    let (_, remote) =
        l4::child::create(echo_child, pager_gate, NO_CAP, NO_CAP, true).expect("child");
    sys::thread_yield();
    round_trips("ipc_call_reply_cross_space", remote);
    let (_, remote_fpu) =
        l4::child::create(fpu_echo_child, pager_gate, NO_CAP, NO_CAP, true).expect("child");
    sys::thread_yield();
    fpu_round_trips("ipc_call_reply_cross_space_0w_both_use_sse", remote_fpu);
    let (_, remote_strings) =
        l4::child::create(string_echo_child, pager_gate, NO_CAP, NO_CAP, true).expect("child");
    sys::thread_yield();
    string_round_trip("ipc_call_reply_cross_space_4k_string", remote_strings);

    // Map and unmap into another task.
    let (target, _) =
        l4::child::create(echo_child, pager_gate, NO_CAP, NO_CAP, false).expect("target task");
    let page = fresh_page();
    map_unmap(
        "4k",
        target,
        Fpage::memory(page, 12, Fpage::READ | Fpage::WRITE),
        ITERATIONS,
        WARMUP,
    );
    let layout = core::alloc::Layout::from_size_align(2 << 20, 2 << 20).expect("layout");
    // SAFETY: a valid layout; the region is leaked.
    let region = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    map_unmap(
        "2m_flexpage_of_4k_pages",
        target,
        Fpage::memory(region, 21, Fpage::READ | Fpage::WRITE),
        100,
        10,
    );
    // A real 2 MiB page (from sigma0 through the root task, module option `superpage`).
    const SUPERPAGE: u64 = 0x0000_0800_0000_0000;
    map_unmap(
        "2m_large_page",
        target,
        Fpage::memory(SUPERPAGE, 21, Fpage::READ | Fpage::WRITE),
        ITERATIONS,
        WARMUP,
    );

    guest_ram();

    // Page faults resolved by a pager in another task.
    let layout =
        core::alloc::Layout::from_size_align((FAULTS + 8) * PAGE_SIZE as usize, PAGE_SIZE as usize)
            .expect("layout");
    // SAFETY: a valid layout; zeroing faults the pool in now, so the pager maps present pages.
    let pool = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    let contiguous = pool != 0;
    POOL.store(pool, SeqCst);
    let peer = alloc_slot();
    sys::factory_create(
        slots::FACTORY,
        ObjectKind::Gate,
        peer,
        slots::SELF_THREAD,
        7,
    )
    .expect("gate");
    let _ = l4::child::create(fault_child, pager_gate, NO_CAP, peer, true).expect("fault child");
    match ipc::wait(Timeouts::INFINITE) {
        Ok(m) if contiguous => println!(
            "bench: page_fault_via_pager median={} min={} iterations={FAULTS}",
            m.word(0).saturating_sub(OVERHEAD.load(SeqCst)),
            m.word(1).saturating_sub(OVERHEAD.load(SeqCst))
        ),
        Ok(_) => println!("# bench: page-fault pool not contiguous; skipped"),
        Err(e) => println!("# bench: page-fault child: {e:?}"),
    }

    // IRQ delivery: software trigger to a waiting handler thread of higher priority.
    let irq = alloc_slot();
    sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, 33, 0).expect("irq");
    let handler = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Thread, handler, 0, 0).expect("thread");
    let _ = handler;
    let receiver = spawn(irq_thread, irq, Spawn::default()).expect("irq thread");
    sys::thread_schedule(receiver, 100, 0).expect("priority");
    sys::irq_control(irq, IrqOp::Attach, receiver).expect("attach");
    sys::thread_yield();
    let mut samples = Vec::new();
    for i in 0..ITERATIONS + WARMUP {
        let t0 = rdtsc();
        sys::irq_control(irq, IrqOp::Trigger, 0).expect("trigger");
        // The handler has equal priority: let it run.
        sys::thread_yield();
        if i >= WARMUP {
            samples.push(IRQ_SEEN.load(SeqCst).wrapping_sub(t0));
        }
    }
    report("irq_delivery_software_trigger", &mut samples);
    println!("# bench: done");
    0
}

l4::main!(main);
