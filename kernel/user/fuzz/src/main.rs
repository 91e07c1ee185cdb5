//! The stateful kernel fuzzer: for each seed, batches of random operations on objects it
//! creates and tracks (tasks, threads, gates, factories, IRQ objects, VMs, vCPUs, mappings of
//! its own memory into tasks and VMs), with worker tasks calling a server that answers at
//! random and getting destroyed mid-call, and a thread that runs vCPUs while the main thread
//! maps and unmaps their memory; after every batch it checks that the kernel answers, that the
//! kernel's books balance (`QuotaCheck`), that destroying everything gives every byte back and
//! that the vCPU runner comes back. Prints a TAP line per seed, the coverage table and a
//! summary line.
//!
//! Arguments: `seed=N` (first seed; `seed=random` takes the TSC), `seeds=N`, `batches=N` (per
//! seed), `batch=N` (the first batch's number, to replay one), `ops=N` (per batch), `trace=K`
//! (print the syscalls of each batch from its K-th operation on), `ram=SIZE` (RAM from the
//! parent to map into VMs), `runner=0` (no vCPU runner), `garble=1` (the runner garbles state
//! words), `vmpager=server` (VM pagers only the server, never a gate that dies with the
//! batch), `audit=1` (the kernel's books checked after every operation, to find the one that
//! upsets them). The last of an argument counts.
#![no_std]
#![no_main]

extern crate alloc;

mod coverage;
mod ops;
mod rng;
mod strings;
mod workers;

use alloc::string::String;
use core::sync::atomic::Ordering::SeqCst;
use l4::abi::{slots, MessageTag, ObjectKind, Syscall, Timeout, Timeouts, NO_CAP, PAGE_SIZE};
use l4::sys;
use ops::{Infra, Memory, Model};
use rng::Rng;

l4::main!(main);

/// The slot of each batch's sandbox factory (below the fuzzer's object range).
const SANDBOX: u64 = 100;
/// Where RAM from the parent goes.
const RAM_AT: u64 = 0x0000_0c00_0000_0000;

fn argument(name: &str) -> Option<&'static str> {
    l4::rt::arguments()
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

fn number(name: &str, default: u64) -> u64 {
    argument(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `QuotaCheck` (26) of `factory` with `flags`: (used, limit, inconsistencies), if the kernel
/// has the syscall (kernels before the kernel memory issue's fixes do not).
fn quota_check(factory: u64, flags: u64) -> Option<(u64, u64, u64)> {
    // SAFETY: QuotaCheck changes nothing.
    let (rax, used, limit, mismatches) =
        unsafe { coverage::syscall(26, [factory, flags, 0, 0, 0]) };
    (rax == 0).then_some((used, limit, mismatches))
}

/// `used` of a factory's quota, if the kernel can tell.
fn used(factory: u64) -> Option<u64> {
    quota_check(factory, 0).map(|q| q.0)
}

/// The kernel's own audit of every quota, task and VM: the number of inconsistencies.
fn audit() -> Option<u64> {
    quota_check(slots::FACTORY, 1).map(|q| q.2)
}

/// A region of `size` bytes of heap aligned to `align`, every page present.
fn heap_region(size: u64, align: u64) -> (u64, u64) {
    let block = alloc::vec![0u8; (size + align) as usize].leak();
    let base = (block.as_ptr() as u64).next_multiple_of(align);
    for page in (base..base + size).step_by(PAGE_SIZE as usize) {
        // SAFETY: inside the leaked block; writing faults the page in.
        unsafe { core::ptr::write_volatile(page as *mut u8, 1) };
    }
    (base, size)
}

/// RAM from the parent (`ram=SIZE`, 2 MiB pages), if it gives any.
fn parent_ram() -> (u64, u64) {
    let Some(size) = argument("ram").and_then(l4::abi::parse_size) else {
        return (RAM_AT, 0);
    };
    match l4::parent::request_ram(RAM_AT, size) {
        Ok(()) => (RAM_AT, size),
        Err(e) => {
            l4::println!("fuzz: no RAM from the parent ({e}): VMs get heap pages only");
            (RAM_AT, 0)
        }
    }
}

/// Whether the server answers a probe within a second.
fn kernel_answers(gate: u64, word: u64) -> bool {
    let timeouts = Timeouts::new(Timeout::micros(1_000_000), Timeout::micros(1_000_000)).0;
    let tag = MessageTag::new(workers::PROBE, 1, 0).0;
    // The server may have left a caller unanswered: try a few times.
    (0..5).any(|_| {
        let (rax, tag, _, words) =
            coverage::ipc(Syscall::Call, gate, 0, tag, timeouts, [word, 0, 0, 0]);
        rax == 0 && MessageTag(tag).label() == workers::PROBE && words[0] == word + 1
    })
}

/// Without `QuotaCheck` (a kernel before the kernel memory issue's fixes, where a deleted
/// factory never gives its quota back), one sandbox for all batches: the largest of 32 MiB,
/// 16 MiB, ... that our factory grants. Returns its size.
fn lasting_sandbox() -> Result<u64, String> {
    static SIZE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
    let known = SIZE.load(SeqCst);
    if known != 0 {
        return Ok(known);
    }
    let mut size = 32 << 20;
    while sys::factory_create(slots::FACTORY, ObjectKind::Factory, SANDBOX, size, 0).is_err() {
        size /= 2;
        if size < PAGE_SIZE {
            return Err("no sandbox factory at all".into());
        }
    }
    l4::println!("fuzz: one sandbox of {} KiB for every batch", size >> 10);
    SIZE.store(size, SeqCst);
    Ok(size)
}

/// Whether the vCPU runner reaches its idle loop within a second (its runs have a deadline
/// of about 2 ms, whatever the guest does or the main thread took from the VM).
fn runner_idles() -> bool {
    let idle = workers::RUNNER_IDLE.load(SeqCst);
    if idle >= u64::MAX / 2 {
        return true; // no runner (`runner=0`)
    }
    let sleep = Timeouts::new(Timeout::ZERO, Timeout::micros(10_000)).0;
    for _ in 0..100 {
        if workers::RUNNER_IDLE.load(SeqCst) > idle {
            return true;
        }
        coverage::ipc(Syscall::Receive, 0, l4::abi::OPEN_WAIT, 0, sleep, [0; 4]);
    }
    false
}

/// One batch: a sandbox factory of random size, `ops` operations, then the invariants.
fn batch(
    rng: &mut Rng,
    memory: &Memory,
    base: Infra,
    ops: u64,
    quotas: bool,
) -> Result<(), String> {
    let size = if quotas {
        let room =
            quota_check(slots::FACTORY, 0).map_or(0, |(used, limit, _)| limit.saturating_sub(used));
        let size = rng.size_between(PAGE_SIZE, room * 3 / 4);
        // A sandbox a failed batch left behind goes (its quota with its last object).
        let _ = sys::cap_delete(SANDBOX);
        sys::factory_create(slots::FACTORY, ObjectKind::Factory, SANDBOX, size, 0)
            .map_err(|e| alloc::format!("sandbox factory of {size} bytes: {e}"))?;
        size
    } else {
        lasting_sandbox()?
    };
    let infra = Infra {
        sandbox: SANDBOX,
        sandbox_size: size,
        ..base
    };
    let mut model = Model::new();
    let turns = workers::SERVER_TURNS.load(SeqCst);
    let trace = number("trace", u64::MAX);
    let every_step = quotas && number("audit", 0) == 1;
    for i in 0..ops {
        coverage::TRACE.store(i + 1 >= trace, SeqCst);
        ops::step(rng, &mut model, memory, &infra);
        if every_step && audit().is_some_and(|m| m != 0) {
            return Err(alloc::format!(
                "the books disagree after operation {}",
                i + 1
            ));
        }
    }
    coverage::TRACE.store(false, SeqCst);
    let mismatches = ops::MISMATCHES.swap(0, SeqCst);
    if mismatches != 0 {
        return Err(alloc::format!(
            "a QuotaCheck in the batch found {mismatches} inconsistencies (see the kernel's WARN)"
        ));
    }
    if !kernel_answers(infra.server_gate, rng.next() >> 1) {
        return Err("the server does not answer".into());
    }
    if quotas && audit() != Some(0) {
        return Err(alloc::format!(
            "QuotaCheck with objects alive: {:?} inconsistencies",
            audit()
        ));
    }
    ops::teardown(&mut model, memory);
    workers::recycle_pages();
    if !runner_idles() {
        return Err("the vCPU runner did not come back from VcpuRun within a second".into());
    }
    if quotas {
        // A dying task may take a few steps of the kernel's to go.
        let mut left = used(SANDBOX);
        for _ in 0..1_000 {
            if left == Some(0) {
                break;
            }
            sys::thread_yield();
            left = used(SANDBOX);
        }
        if left != Some(0) {
            return Err(alloc::format!(
                "after destroying everything the sandbox of {size} bytes still has {left:?} used"
            ));
        }
        let before = used(slots::FACTORY);
        sys::cap_delete(SANDBOX).map_err(|e| alloc::format!("deleting the sandbox: {e}"))?;
        let after = used(slots::FACTORY);
        if before.zip(after).map(|(b, a)| b.wrapping_sub(a)) != Some(size) {
            return Err(alloc::format!(
                "deleting the sandbox of {size} bytes gave back {before:?} -> {after:?}"
            ));
        }
        if audit() != Some(0) {
            return Err(alloc::format!(
                "QuotaCheck after the batch: {:?} inconsistencies",
                audit()
            ));
        }
    }
    if workers::SERVER_TURNS.load(SeqCst) == turns {
        return Err("the server thread did not come back from its wait".into());
    }
    Ok(())
}

fn main() -> i64 {
    let first = match argument("seed") {
        Some("random") => coverage::rdtsc(),
        _ => number("seed", 1),
    };
    let (seeds, batches, ops) = (
        number("seeds", 1),
        number("batches", 10),
        number("ops", 500),
    );
    l4::println!(
        "fuzz: seeds {first}..{}, {batches} batches of {ops} operations each",
        first + seeds
    );
    l4::println!("1..{seeds}");
    l4::rt::fault_in_image();
    let quotas = used(slots::FACTORY).is_some();
    if !quotas {
        l4::println!("fuzz: this kernel has no QuotaCheck: quota invariants off, only panics and hangs are found");
    }
    let memory = Memory {
        arena: heap_region(4 << 20, 2 << 20),
        ram: parent_ram(),
        scratch: heap_region(64 << 10, 64 << 10),
    };
    workers::ARENA[0].store(memory.arena.0, SeqCst);
    workers::ARENA[1].store(memory.arena.1, SeqCst);
    let spawn = l4::thread::Spawn {
        pager: slots::PAGER,
        ..Default::default()
    };
    let server = l4::thread::spawn(workers::server, first, spawn).expect("server thread");
    let pager = l4::thread::spawn(workers::image_pager, 0, spawn).expect("pager thread");
    workers::GARBLE.store(number("garble", 0), SeqCst);
    if number("runner", 1) == 1 {
        l4::thread::spawn(workers::vcpu_runner, first ^ 0x5555, spawn).expect("vCPU runner");
    } else {
        workers::RUNNER_IDLE.store(u64::MAX / 2, SeqCst);
    }
    let (server_gate, image_gate) = (l4::thread::alloc_slot(), l4::thread::alloc_slot());
    sys::factory_create(slots::FACTORY, ObjectKind::Gate, server_gate, server, 0x5e)
        .expect("server gate");
    sys::factory_create(slots::FACTORY, ObjectKind::Gate, image_gate, pager, 0x9a)
        .expect("pager gate");
    let base = Infra {
        sandbox: SANDBOX,
        sandbox_size: 0,
        server,
        server_gate,
        image_gate,
        any_vm_pager: argument("vmpager") != Some("server"),
    };
    let _ = NO_CAP;
    let mut failures = 0;
    for (case, seed) in (first..first + seeds).enumerate() {
        l4::println!("fuzz: seed {seed}");
        let start = coverage::total();
        let mut result = Ok(());
        let from = number("batch", 0);
        for b in from..from + batches {
            let mut rng = Rng::new(seed.wrapping_mul(0x1_0000_0001).wrapping_add(b));
            l4::println!(
                "fuzz: seed {seed} batch {b} ({} syscalls so far)",
                coverage::total()
            );
            if let Err(e) = batch(&mut rng, &memory, base, ops, quotas) {
                result = Err(alloc::format!("batch {b}: {e}"));
                break;
            }
        }
        let done = coverage::total() - start;
        match result {
            Ok(()) => l4::println!(
                "ok {} - fuzz: seed {seed}: {batches} batches, {done} syscalls, invariants held",
                case + 1
            ),
            Err(e) => {
                failures += 1;
                l4::println!("not ok {} - fuzz: seed {seed}: {e}", case + 1);
            }
        }
    }
    coverage::report();
    let (number, ticks) = coverage::slowest();
    l4::println!(
        "fuzz: summary: {} operations, {seeds} seeds, {failures} failures, slowest syscall {number} took {ticks} ticks",
        coverage::total()
    );
    i64::from(failures > 0)
}
