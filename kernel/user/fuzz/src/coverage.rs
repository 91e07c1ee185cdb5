//! What the fuzzer reached: per syscall, how often each result came back (success and each
//! error code), the slowest call seen (TSC ticks, which are instructions under QEMU's
//! `-icount shift=0`), and how many objects of each kind were alive at most. Every syscall the
//! fuzzer makes goes through [`syscall`] or [`ipc`], from any of its threads.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use l4::abi::{Error, Syscall};

/// Syscall numbers tracked (0..NUMBERS; larger ones count as number NUMBERS - 1).
pub const NUMBERS: usize = 32;
/// Result columns: 0 success, 1..=14 the error codes, 15 anything else.
pub const RESULTS: usize = 16;

static COUNTS: [[AtomicU64; RESULTS]; NUMBERS] =
    [const { [const { AtomicU64::new(0) }; RESULTS] }; NUMBERS];
static SLOWEST: [AtomicU64; NUMBERS] = [const { AtomicU64::new(0) }; NUMBERS];

/// The kinds of objects the fuzzer tracks.
pub const KINDS: [&str; 8] = [
    "task", "thread", "gate", "factory", "irq", "vm", "vcpu", "mapping",
];
static MAX_LIVE: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

/// String items received: items, bytes copied, the longest copy.
static STRINGS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
/// `VcpuRun` exit codes seen: (code + 1, count) pairs, filled first come (0: free).
static EXITS: [[AtomicU64; 2]; 24] = [const { [const { AtomicU64::new(0) }; 2] }; 24];

/// Count the string items of a message this thread just received (`tag`, words 0..4 in
/// `words`, the rest in our UTCB): the kernel rewrote each to the length it copied.
fn note_strings(tag: u64, words: &[u64; 4]) {
    let tag = l4::abi::MessageTag(tag);
    l4::utcb::with_utcb(|utcb| {
        let mr = &utcb.mr;
        let word = |i: usize| {
            if i < 4 {
                words[i]
            } else {
                mr.get(i).copied().unwrap_or(0)
            }
        };
        for i in 0..tag.typed().min(l4::abi::MAX_STRINGS) {
            let at = tag.untyped() + 2 * i;
            if let Some(item) = l4::abi::StringItem::decode(word(at), word(at + 1)) {
                STRINGS[0].fetch_add(1, Relaxed);
                STRINGS[1].fetch_add(item.length, Relaxed);
                STRINGS[2].fetch_max(item.length, Relaxed);
            }
        }
    });
}

/// Count one `VcpuRun` exit with `code`.
fn note_exit(code: u64) {
    for slot in EXITS.iter() {
        let key = slot[0].load(Relaxed);
        let claimed = key == code + 1
            || (key == 0
                && slot[0]
                    .compare_exchange(0, code + 1, Relaxed, Relaxed)
                    .map_or_else(|seen| seen == code + 1, |_| true));
        if claimed {
            slot[1].fetch_add(1, Relaxed);
            return;
        }
    }
}

/// Print every syscall of this thread's fuzzing (its number, arguments and result) while set.
pub static TRACE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// The time stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and is allowed at CPL 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn record(number: u64, rax: u64, ticks: u64, blocking: bool) {
    let row = (number as usize).min(NUMBERS - 1);
    let column = match Error::from_u64(rax) {
        _ if rax == 0 => 0,
        Some(e) => e as usize,
        None => RESULTS - 1,
    };
    COUNTS[row][column].fetch_add(1, Relaxed);
    if !blocking {
        SLOWEST[row].fetch_max(ticks, Relaxed);
    }
}

/// A syscall with the ordinary register map (see `l4::sys::raw`), counted and timed; returns
/// `(rax, rdi, rsi, rdx)`.
///
/// # Safety
/// As `l4::sys::raw`: the call must not take memory the program still uses.
pub unsafe fn syscall(number: u64, a: [u64; 5]) -> (u64, u64, u64, u64) {
    let trace = TRACE.load(Relaxed) && number != Syscall::VcpuRun as u64;
    if trace {
        l4::println!("fuzz: trace: syscall {number} {a:x?}");
    }
    let start = rdtsc();
    // SAFETY: the caller vouches for the call.
    let r = unsafe { l4::sys::raw(number, a[0], a[1], a[2], a[3], a[4]) };
    if trace {
        l4::println!("fuzz: trace: -> {}", r.0);
    }
    let blocking = number == Syscall::ThreadYield as u64
        || number == Syscall::ThreadSwitch as u64
        || number == Syscall::VcpuRun as u64;
    record(number, r.0, rdtsc().wrapping_sub(start), blocking);
    if number == Syscall::VcpuRun as u64 && r.0 == 0 {
        note_exit(r.1);
    }
    r
}

/// An IPC syscall (see `l4::ipc::raw_ipc`), counted and timed; returns (rax, tag, badge,
/// words 0..4).
pub fn ipc(
    number: Syscall,
    destination: u64,
    source: u64,
    tag: u64,
    timeouts: u64,
    words: [u64; 4],
) -> (u64, u64, u64, [u64; 4]) {
    let start = rdtsc();
    // SAFETY: IPC writes only registers and this thread's UTCB, to which no reference is live
    // (the fuzzer borrows it only in `with_utcb` closures that make no syscall).
    let r = unsafe { l4::ipc::raw_ipc(number, destination, source, tag, timeouts, words) };
    record(number as u64, r.0, rdtsc().wrapping_sub(start), true);
    if r.0 == 0 && number != Syscall::Send && number != Syscall::Reply {
        note_strings(r.1, &r.3);
    }
    r
}

/// Note that `live` objects of kind `kind` (an index into [`KINDS`]) are alive now.
pub fn live(kind: usize, live: u64) {
    MAX_LIVE[kind].fetch_max(live, Relaxed);
}

/// All syscalls made so far.
pub fn total() -> u64 {
    COUNTS
        .iter()
        .flat_map(|row| row.iter())
        .map(|c| c.load(Relaxed))
        .sum()
}

/// The slowest syscall so far that cannot block (IPC, yields, switches and vCPU runs are not
/// timed: they wait or run a guest by design): (number, ticks).
pub fn slowest() -> (u64, u64) {
    (0..NUMBERS)
        .map(|n| (n as u64, SLOWEST[n].load(Relaxed)))
        .max_by_key(|&(_, t)| t)
        .unwrap_or((0, 0))
}

fn name(number: usize) -> &'static str {
    if number == 26 {
        return "QuotaCheck";
    }
    match Syscall::from_u64(number as u64) {
        Some(s) => match s {
            Syscall::Send => "Send",
            Syscall::Receive => "Receive",
            Syscall::Call => "Call",
            Syscall::ReplyWait => "ReplyWait",
            Syscall::Reply => "Reply",
            Syscall::FactoryCreate => "FactoryCreate",
            Syscall::ThreadControl => "ThreadControl",
            Syscall::ExRegs => "ExRegs",
            Syscall::CapCopy => "CapCopy",
            Syscall::CapDelete => "CapDelete",
            Syscall::Map => "Map",
            Syscall::Unmap => "Unmap",
            Syscall::ThreadExit => "ThreadExit",
            Syscall::ThreadYield => "ThreadYield",
            Syscall::DebugWrite => "DebugWrite",
            Syscall::TaskDestroy => "TaskDestroy",
            Syscall::Shutdown => "Shutdown",
            Syscall::ThreadSchedule => "ThreadSchedule",
            Syscall::ThreadSwitch => "ThreadSwitch",
            Syscall::IrqControl => "IrqControl",
            Syscall::VcpuRun => "VcpuRun",
            #[allow(unreachable_patterns)]
            _ => "other",
        },
        None => "unknown",
    }
}

/// Short names of the result columns.
const COLUMNS: [&str; RESULTS] = [
    "ok",
    "InvCap",
    "WrongType",
    "NoRights",
    "InvArg",
    "OOM",
    "Timeout",
    "Canceled",
    "Dead",
    "Occupied",
    "NoPartner",
    "Bound",
    "NotBound",
    "Unknown",
    "NotSupp",
    "other",
];

/// Print the coverage table: one `fuzz: coverage` line per syscall number that was called,
/// its results with their counts and its slowest call, then the most live objects per kind.
pub fn report() {
    for (number, row) in COUNTS.iter().enumerate() {
        let calls: u64 = row.iter().map(|c| c.load(Relaxed)).sum();
        if calls == 0 {
            continue;
        }
        let mut line = alloc::format!(
            "fuzz: coverage {number:2} {:<14} {calls:>9} calls:",
            name(number)
        );
        for (column, count) in row.iter().enumerate() {
            let count = count.load(Relaxed);
            if count > 0 {
                line += &alloc::format!(" {}={count}", COLUMNS[column]);
            }
        }
        let slowest = SLOWEST[number].load(Relaxed);
        if slowest > 0 {
            line += &alloc::format!(" (slowest {slowest} ticks)");
        }
        l4::println!("{line}");
    }
    l4::println!(
        "fuzz: strings received: {} items, {} bytes copied, longest {}",
        STRINGS[0].load(Relaxed),
        STRINGS[1].load(Relaxed),
        STRINGS[2].load(Relaxed)
    );
    let mut line = alloc::string::String::from("fuzz: vCPU exits (code=count):");
    for slot in EXITS.iter() {
        let code = slot[0].load(Relaxed);
        if code != 0 {
            line += &alloc::format!(" {:#x}={}", code - 1, slot[1].load(Relaxed));
        }
    }
    l4::println!("{line}");
    let mut line = alloc::string::String::from("fuzz: most alive at once:");
    for (kind, most) in KINDS.iter().zip(MAX_LIVE.iter()) {
        line += &alloc::format!(" {kind}={}", most.load(Relaxed));
    }
    l4::println!("{line}");
}
