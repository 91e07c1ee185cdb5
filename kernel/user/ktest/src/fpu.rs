//! The x87/SSE/AVX state: every thread has its own, new threads start clean.
//!
//! The register work is in assembly (`fpu_exercise`, `fpu_snapshot` below): from loading a
//! pattern into XMM0-15 (YMM0-15 with AVX), MXCSR and the x87 control word until the last check,
//! no compiled code runs in between that could legitimately use the registers, only syscalls.

use crate::support::{go, tag, wait_badge, Suite, CHILD_BADGE, MAP_ADDRESS, RECEIVE_2S};
use crate::tap::{check, Case};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::MapFlags;
use l4::abi::{slots, Fpage, Timeouts};
use l4::child::fresh_page;
use l4::ipc;
use l4::{println, sys};

/// One run of `fpu_exercise`: inputs, then results (the assembly uses these offsets).
#[repr(C)]
#[derive(Default)]
struct FpuRun {
    /// 16 registers of 32 bytes (only the low 16 of each without AVX).
    pattern: u64,
    /// MXCSR to load and expect.
    mxcsr: u64,
    /// Loop iterations (upper bound for spinning).
    iterations: u64,
    /// 0: spin, counting TSC gaps as preemptions; 1: yield; 2: call `slot`; 3: reply and wait.
    op: u64,
    /// Capability slot called (op 2).
    slot: u64,
    /// IPC timeouts (ops 2 and 3).
    timeouts: u64,
    /// Whether to use the YMM registers.
    avx: u64,
    /// Spinning stops after this many preemptions.
    preemption_target: u64,
    /// Checks that found any register, MXCSR or the control word changed.
    mismatches: u64,
    /// Syscalls that failed.
    errors: u64,
    /// Preemptions seen (TSC gaps above `gap`).
    preemptions: u64,
    /// Word 0 of the last IPC received.
    last_word: u64,
    /// x87 control word to load and expect.
    fcw: u64,
    /// TSC cycles between two loop iterations that count as a preemption.
    gap: u64,
    /// Spinning: a counter shared by the participants, incremented by each that reached its
    /// target; all keep spinning (and checking) until it reaches `participants`, so that none
    /// is left spinning alone.
    arrived_counter: u64,
    /// Whether this run has incremented the counter.
    arrived: u64,
    /// How many participants spin together.
    participants: u64,
}

/// What `fpu_snapshot` (called by `fpu_fresh_entry`) stores: MXCSR, x87 control word, then 16 registers of 32 bytes.
#[repr(C)]
struct FpuSnapshot {
    mxcsr: u32,
    fcw: u32,
    registers: [u64; 64],
}

extern "C" {
    fn fpu_exercise(run: *mut FpuRun);
}

core::arch::global_asm!(
    r#"
.section .text
.global fpu_exercise
fpu_exercise:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    sub rsp, 536
    mov r15, rdi
    mov r14, [r15]
    stmxcsr [rsp + 512]
    fnstcw [rsp + 516]
    ldmxcsr [r15 + 8]
    fldcw [r15 + 96]
    cmp qword ptr [r15 + 48], 0
    je 22f
    vmovdqu ymm0, [r14 + 0]
    vmovdqu ymm1, [r14 + 32]
    vmovdqu ymm2, [r14 + 64]
    vmovdqu ymm3, [r14 + 96]
    vmovdqu ymm4, [r14 + 128]
    vmovdqu ymm5, [r14 + 160]
    vmovdqu ymm6, [r14 + 192]
    vmovdqu ymm7, [r14 + 224]
    vmovdqu ymm8, [r14 + 256]
    vmovdqu ymm9, [r14 + 288]
    vmovdqu ymm10, [r14 + 320]
    vmovdqu ymm11, [r14 + 352]
    vmovdqu ymm12, [r14 + 384]
    vmovdqu ymm13, [r14 + 416]
    vmovdqu ymm14, [r14 + 448]
    vmovdqu ymm15, [r14 + 480]
    jmp 23f
22:
    movdqu xmm0, [r14 + 0]
    movdqu xmm1, [r14 + 32]
    movdqu xmm2, [r14 + 64]
    movdqu xmm3, [r14 + 96]
    movdqu xmm4, [r14 + 128]
    movdqu xmm5, [r14 + 160]
    movdqu xmm6, [r14 + 192]
    movdqu xmm7, [r14 + 224]
    movdqu xmm8, [r14 + 256]
    movdqu xmm9, [r14 + 288]
    movdqu xmm10, [r14 + 320]
    movdqu xmm11, [r14 + 352]
    movdqu xmm12, [r14 + 384]
    movdqu xmm13, [r14 + 416]
    movdqu xmm14, [r14 + 448]
    movdqu xmm15, [r14 + 480]
23:
    mov rbx, [r15 + 16]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax
24:
    test rbx, rbx
    jz 92f
    dec rbx
    mov rax, [r15 + 24]
    cmp rax, 1
    je 32f
    cmp rax, 2
    je 33f
    cmp rax, 3
    je 34f
    mov ecx, 64
25:
    dec ecx
    jnz 25b
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rcx, rax
    sub rcx, r12
    mov r12, rax
    cmp rcx, [r15 + 104]
    jb 42f
    inc qword ptr [r15 + 80]
    jmp 42f
32:
    mov eax, 18
    xor edi, edi
    xor esi, esi
    xor edx, edx
    xor r10d, r10d
    xor r8d, r8d
    syscall
    jmp 42f
33:
    mov eax, 3
    mov rdi, [r15 + 32]
    xor esi, esi
    xor edx, edx
    mov r10, [r15 + 40]
    syscall
    jmp 35f
34:
    mov eax, 4
    mov rsi, -1
    xor edx, edx
    mov r10, [r15 + 40]
    syscall
35:
    mov [r15 + 88], r8
    test rax, rax
    jz 42f
    inc qword ptr [r15 + 72]
42:
    stmxcsr [rsp + 520]
    fnstcw [rsp + 524]
    cmp qword ptr [r15 + 48], 0
    je 43f
    vmovdqu [rsp + 0], ymm0
    vmovdqu [rsp + 32], ymm1
    vmovdqu [rsp + 64], ymm2
    vmovdqu [rsp + 96], ymm3
    vmovdqu [rsp + 128], ymm4
    vmovdqu [rsp + 160], ymm5
    vmovdqu [rsp + 192], ymm6
    vmovdqu [rsp + 224], ymm7
    vmovdqu [rsp + 256], ymm8
    vmovdqu [rsp + 288], ymm9
    vmovdqu [rsp + 320], ymm10
    vmovdqu [rsp + 352], ymm11
    vmovdqu [rsp + 384], ymm12
    vmovdqu [rsp + 416], ymm13
    vmovdqu [rsp + 448], ymm14
    vmovdqu [rsp + 480], ymm15
    mov r13d, 4
    jmp 44f
43:
    movdqu [rsp + 0], xmm0
    movdqu [rsp + 32], xmm1
    movdqu [rsp + 64], xmm2
    movdqu [rsp + 96], xmm3
    movdqu [rsp + 128], xmm4
    movdqu [rsp + 160], xmm5
    movdqu [rsp + 192], xmm6
    movdqu [rsp + 224], xmm7
    movdqu [rsp + 256], xmm8
    movdqu [rsp + 288], xmm9
    movdqu [rsp + 320], xmm10
    movdqu [rsp + 352], xmm11
    movdqu [rsp + 384], xmm12
    movdqu [rsp + 416], xmm13
    movdqu [rsp + 448], xmm14
    movdqu [rsp + 480], xmm15
    mov r13d, 2
44:
    xor r8d, r8d
    xor ecx, ecx
45:
    xor edx, edx
46:
    lea rax, [rcx + rdx * 8]
    mov r10, [rsp + rax]
    cmp r10, [r14 + rax]
    je 47f
    mov r8d, 1
47:
    inc edx
    cmp edx, r13d
    jb 46b
    add ecx, 32
    cmp ecx, 512
    jb 45b
    mov eax, [rsp + 520]
    cmp eax, [r15 + 8]
    je 48f
    mov r8d, 1
48:
    movzx eax, word ptr [rsp + 524]
    cmp ax, word ptr [r15 + 96]
    je 49f
    mov r8d, 1
49:
    add [r15 + 64], r8
    cmp qword ptr [r15 + 24], 0
    jne 24b
    cmp qword ptr [r15 + 120], 0
    jne 53f
    mov rax, [r15 + 80]
    cmp rax, [r15 + 56]
    jb 24b
    mov qword ptr [r15 + 120], 1
    mov rax, [r15 + 112]
    lock inc qword ptr [rax]
53:
    mov rax, [r15 + 112]
    mov rax, [rax]
    cmp rax, [r15 + 128]
    jb 24b
92:
    ldmxcsr [rsp + 512]
    fldcw [rsp + 516]
    add rsp, 536
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.global fpu_snapshot
fpu_snapshot:
    stmxcsr [rdi]
    fnstcw [rdi + 4]
    mov word ptr [rdi + 6], 0
    test rsi, rsi
    jz 52f
    vmovdqu [rdi + 8], ymm0
    vmovdqu [rdi + 40], ymm1
    vmovdqu [rdi + 72], ymm2
    vmovdqu [rdi + 104], ymm3
    vmovdqu [rdi + 136], ymm4
    vmovdqu [rdi + 168], ymm5
    vmovdqu [rdi + 200], ymm6
    vmovdqu [rdi + 232], ymm7
    vmovdqu [rdi + 264], ymm8
    vmovdqu [rdi + 296], ymm9
    vmovdqu [rdi + 328], ymm10
    vmovdqu [rdi + 360], ymm11
    vmovdqu [rdi + 392], ymm12
    vmovdqu [rdi + 424], ymm13
    vmovdqu [rdi + 456], ymm14
    vmovdqu [rdi + 488], ymm15
    ret
52:
    movdqu [rdi + 8], xmm0
    movdqu [rdi + 40], xmm1
    movdqu [rdi + 72], xmm2
    movdqu [rdi + 104], xmm3
    movdqu [rdi + 136], xmm4
    movdqu [rdi + 168], xmm5
    movdqu [rdi + 200], xmm6
    movdqu [rdi + 232], xmm7
    movdqu [rdi + 264], xmm8
    movdqu [rdi + 296], xmm9
    movdqu [rdi + 328], xmm10
    movdqu [rdi + 360], xmm11
    movdqu [rdi + 392], xmm12
    movdqu [rdi + 424], xmm13
    movdqu [rdi + 456], xmm14
    movdqu [rdi + 488], xmm15
    ret
"#
);

/// Whether the YMM registers are usable: CPUID says AVX and OSXSAVE, XCR0 enables SSE and AVX.
fn avx_enabled() -> bool {
    let features = core::arch::x86_64::__cpuid_count(1, 0).ecx;
    if features & (1 << 28) == 0 || features & (1 << 27) == 0 {
        return false;
    }
    let (low, _high): (u32, u32);
    // SAFETY: xgetbv(0) is allowed in user mode when CR4.OSXSAVE is set (CPUID said so).
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") _high, options(nomem, nostack))
    };
    low & 6 == 6
}

/// 16 registers' worth of words for participant `seed`, every word distinct and non-zero.
fn fpu_pattern(seed: u64) -> [u64; 64] {
    let mut words = [0u64; 64];
    for (i, w) in words.iter_mut().enumerate() {
        *w = (seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((i as u64 + 1) << 48) ^ (i as u64);
    }
    words
}

/// An MXCSR and x87 control word for participant `seed` (rounding modes and precision differ
/// from the initial 0x1f80 / 0x37f and between participants).
fn fpu_controls(seed: u64) -> (u64, u64) {
    let mxcsr = 0x1f80 | ((seed % 3 + 1) << 13) | ((seed / 3 % 2) << 15);
    let fcw = 0x7f | ((seed % 3) << 8) | (((seed / 3) % 4 + 1) << 10);
    (mxcsr, fcw)
}

/// A run for participant `seed` with `pattern` (which must outlive the run).
fn fpu_run(seed: u64, op: u64, iterations: u64, pattern: &[u64; 64]) -> FpuRun {
    let (mxcsr, fcw) = fpu_controls(seed);
    FpuRun {
        pattern: pattern.as_ptr() as u64,
        mxcsr,
        fcw,
        iterations,
        op,
        avx: avx_enabled() as u64,
        timeouts: RECEIVE_2S.0,
        preemption_target: FPU_PREEMPTIONS,
        gap: FPU_GAP,
        participants: 2,
        ..FpuRun::default()
    }
}

/// A run and its pattern on the heap, for threads of this task (leaked if a thread might
/// still use them).
fn boxed_run(
    seed: u64,
    op: u64,
    iterations: u64,
) -> (alloc::boxed::Box<FpuRun>, alloc::boxed::Box<[u64; 64]>) {
    let pattern = alloc::boxed::Box::new(fpu_pattern(seed));
    let run = alloc::boxed::Box::new(fpu_run(seed, op, iterations, &pattern));
    (run, pattern)
}

/// Preemptions each spinning participant must survive.
const FPU_PREEMPTIONS: u64 = 1500;
/// IPC round trips per IPC case.
const FPU_ROUND_TRIPS: u64 = 3000;
/// TSC cycles (host cycles under TCG) between two spin iterations that mean another thread
/// ran: a 1 ms time slice is millions; one iteration, even with a timer tick, far less.
const FPU_GAP: u64 = 400_000;

/// Run `run` (checking it afterwards is the caller's business).
fn exercise(run: &mut FpuRun) {
    // SAFETY: the assembly follows the C ABI (restores MXCSR and the x87 control word, which
    // are callee-saved) and touches only `run`, the pattern it points to and its own stack.
    unsafe { fpu_exercise(run) }
}

fn is_initial(s: &FpuSnapshot) -> bool {
    s.mxcsr == 0x1f80 && s.fcw == 0x37f && s.registers.iter().all(|&w| w == 0)
}

/// `(mismatches, errors, preemptions)` of a finished run, as one word each.
fn fpu_outcome(run: &FpuRun) -> [u64; 3] {
    [run.mismatches, run.errors, run.preemptions]
}

static FRESH: AtomicU64 = AtomicU64::new(0);
/// Whether `fpu_fresh_entry` stores the YMM or the XMM registers (set before it runs).
static FPU_AVX: AtomicU64 = AtomicU64::new(0);
/// Where `fpu_fresh_entry` stores the registers a fresh thread starts with.
static mut FRESH_SNAPSHOT: FpuSnapshot = FpuSnapshot {
    mxcsr: 0,
    fcw: 0,
    registers: [0xdead; 64],
};

// The first instructions of a fresh thread: store its registers before any compiled code
// could use them, then continue in Rust (`rdi` still holds the thread's argument).
core::arch::global_asm!(
    r#"
.global fpu_fresh_entry
fpu_fresh_entry:
    sub rsp, 8
    push rdi
    lea rdi, [rip + {snapshot}]
    mov rsi, [rip + {avx}]
    call fpu_snapshot
    pop rdi
    call {body}
    ud2
.global fpu_fresh_child_entry
fpu_fresh_child_entry:
    mov edi, 1
    jmp fpu_fresh_entry
"#,
    snapshot = sym FRESH_SNAPSHOT,
    avx = sym FPU_AVX,
    body = sym fpu_fresh_body,
);

// SAFETY: both are thread entry points that store the registers into `FRESH_SNAPSHOT` and
// continue in `fpu_fresh_body`; starting a thread there is safe.
unsafe extern "C" {
    /// A fresh thread of this task (argument 0).
    safe fn fpu_fresh_entry(argument: u64) -> !;
    /// A fresh thread in a new task (continues with argument 1).
    safe fn fpu_fresh_child_entry() -> !;
}

/// The snapshot `fpu_fresh_entry` took.
fn fresh_snapshot() -> FpuSnapshot {
    // SAFETY: written only by `fpu_fresh_entry` of the thread that reads it here, before.
    unsafe { (&raw const FRESH_SNAPSHOT).read() }
}

/// The Rust part of a fresh thread (argument 0: this task, 1: a child task).
extern "C" fn fpu_fresh_body(argument: u64) -> ! {
    let s = fresh_snapshot();
    if !is_initial(&s) {
        println!(
            "# fresh thread: MXCSR {:#x}, FCW {:#x}, registers {:x?}",
            s.mxcsr,
            s.fcw,
            &s.registers[..8]
        );
    }
    if argument == 1 {
        let words = [is_initial(&s) as u64, s.mxcsr as u64, s.fcw as u64];
        let _ = ipc::send(slots::PEER, tag(30, 3), &words, Timeouts::INFINITE);
    } else {
        FRESH.store(if is_initial(&s) { 1 } else { 2 }, SeqCst);
    }
    sys::thread_exit(0)
}

static FPU_DONE: AtomicU64 = AtomicU64::new(0);
static SPIN_ARRIVED: AtomicU64 = AtomicU64::new(0);

/// Spin with the pattern of `run` (a leaked `FpuRun`) until preempted often enough.
extern "C" fn fpu_spin_thread(run: u64) -> ! {
    // SAFETY: the creator passes a leaked, exclusively ours `FpuRun`.
    exercise(unsafe { &mut *(run as *mut FpuRun) });
    FPU_DONE.fetch_add(1, SeqCst);
    sys::thread_exit(0)
}

/// Serve `run.iterations + 1` calls with the pattern of `run`, answering the last with the
/// number of mismatches seen.
extern "C" fn fpu_server_thread(run: u64) -> ! {
    // SAFETY: as for `fpu_spin_thread`.
    let run = unsafe { &mut *(run as *mut FpuRun) };
    if ipc::wait(RECEIVE_2S).is_ok() {
        exercise(run);
        let _ = ipc::reply(tag(0, 1), &[run.mismatches + run.errors]);
    }
    FPU_DONE.fetch_add(1, SeqCst);
    sys::thread_exit(0)
}

/// Call the parent `FPU_ROUND_TRIPS` times with pattern 5, then report its outcome and the
/// parent's (word 0 of the last reply).
extern "C" fn child_fpu_client() -> ! {
    let pattern = fpu_pattern(5);
    let mut run = fpu_run(5, 2, FPU_ROUND_TRIPS, &pattern);
    run.slot = slots::PEER;
    run.timeouts = Timeouts::INFINITE.0;
    exercise(&mut run);
    let words = [run.mismatches, run.errors, run.last_word];
    let _ = ipc::send(slots::PEER, tag(31, 3), &words, Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Spin with pattern 7 until preempted often enough, then report.
extern "C" fn child_fpu_spinner() -> ! {
    let pattern = fpu_pattern(7);
    let mut run = fpu_run(7, 0, u64::MAX, &pattern);
    run.arrived_counter = MAP_ADDRESS;
    exercise(&mut run);
    let _ = ipc::send(
        slots::PEER,
        tag(32, 3),
        &fpu_outcome(&run),
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// Set the x87/SSE control registers to non-initial values (or back).
fn set_fpu_controls(mxcsr: u32, fcw: u16) {
    // SAFETY: loads MXCSR and the x87 control word from locals; the values are valid.
    unsafe {
        core::arch::asm!("ldmxcsr [{}]", "fldcw [{}]", in(reg) &mxcsr, in(reg) &fcw, options(nostack, readonly))
    };
}

/// The cases of [`fpu_cases`], in the order it reports them.
pub(crate) const FPU_CASES: &[Case] = &[
    (
        "fpu",
        "a new thread starts with MXCSR 0x1f80, FCW 0x37f and zero XMM/YMM registers",
    ),
    (
        "fpu",
        "a new thread in a new task starts in the initial x87/SSE/AVX state",
    ),
    (
        "fpu",
        "two threads of one task keep their registers across 1500 timer preemptions each",
    ),
    (
        "fpu",
        "two threads of one task keep their registers across 3000 IPC round trips",
    ),
    (
        "fpu",
        "threads of two tasks keep their registers across 3000 IPC round trips",
    ),
    (
        "fpu",
        "threads of two tasks keep their registers across 1500 timer preemptions each",
    ),
];

pub(crate) fn fpu_cases(suite: &Suite) {
    let avx = avx_enabled();
    FPU_AVX.store(avx as u64, SeqCst);
    println!(
        "# fpu: AVX {}",
        if avx {
            "enabled (YMM registers checked)"
        } else {
            "not available (XMM only)"
        }
    );

    // A new thread (same task, then a new task) starts in the initial state, not with the
    // registers of the thread that ran before it.
    let (mut dirty, _pattern) = boxed_run(1, 0, 1);
    exercise(&mut dirty);
    set_fpu_controls(0x7f80, 0x0f7f);
    let fresh = go(fpu_fresh_entry, 0);
    let mut seen = 0;
    for _ in 0..1000 {
        seen = FRESH.load(SeqCst);
        if seen != 0 {
            break;
        }
        sys::thread_yield();
    }
    set_fpu_controls(0x1f80, 0x037f);
    let _ = fresh;
    check(
        "fpu",
        "a new thread starts with MXCSR 0x1f80, FCW 0x37f and zero XMM/YMM registers",
        seen == 1,
    );
    exercise(&mut dirty);
    set_fpu_controls(0x5f80, 0x0b7f);
    let (_, _) = suite.child(fpu_fresh_child_entry, suite.pager_normal, suite.death, true);
    let r = wait_badge(CHILD_BADGE);
    set_fpu_controls(0x1f80, 0x037f);
    check(
        "fpu",
        "a new thread in a new task starts in the initial x87/SSE/AVX state",
        matches!(r, Some(m) if m.tag.label() == 30 && m.word(0) == 1),
    );

    // Two threads of one task, preempted by the timer (1 ms slices) over and over.
    let priority = 100;
    let slice = sys::thread_schedule(slots::SELF_THREAD, priority, 0).map_or(10_000, |(_, s)| s);
    let (mut a, _pa) = boxed_run(2, 0, u64::MAX);
    let (mut b, _pb) = boxed_run(3, 0, u64::MAX);
    a.arrived_counter = SPIN_ARRIVED.as_ptr() as u64;
    b.arrived_counter = SPIN_ARRIVED.as_ptr() as u64;
    FPU_DONE.store(0, SeqCst);
    let ta = go(fpu_spin_thread, &mut *a as *mut FpuRun as u64);
    let tb = go(fpu_spin_thread, &mut *b as *mut FpuRun as u64);
    let _ = sys::thread_schedule(ta, priority, 1000);
    let _ = sys::thread_schedule(tb, priority, 1000);
    let mut finished = false;
    for _ in 0..200_000 {
        if FPU_DONE.load(SeqCst) == 2 {
            finished = true;
            break;
        }
        sys::thread_yield();
    }
    let outcome = (fpu_outcome(&a), fpu_outcome(&b));
    if !finished || outcome.0[..2] != [0, 0] || outcome.1[..2] != [0, 0] {
        println!("# fpu: spinning threads (mismatches, errors, preemptions): {outcome:?}, finished {finished}");
    }
    check(
        "fpu",
        "two threads of one task keep their registers across 1500 timer preemptions each",
        finished && outcome.0[..2] == [0, 0] && outcome.1[..2] == [0, 0],
    );
    // The spinning threads are done: leak the runs they pointed to only if they are not.
    if !finished {
        core::mem::forget((a, b, _pa, _pb));
    }

    // Two threads of one task in IPC: the main thread calls, a server replies.
    let (mut server, _ps) = boxed_run(4, 3, FPU_ROUND_TRIPS - 1);
    FPU_DONE.store(0, SeqCst);
    let st = go(fpu_server_thread, &mut *server as *mut FpuRun as u64);
    let (mut client, _pc) = boxed_run(6, 2, FPU_ROUND_TRIPS);
    client.slot = st;
    exercise(&mut client);
    let served = wait_flag_count(&FPU_DONE, 1);
    if client.mismatches + client.errors + client.last_word != 0 || !served {
        println!(
            "# fpu: IPC in one task: client {:?}, server reported {}",
            fpu_outcome(&client),
            client.last_word
        );
    }
    check(
        "fpu",
        "two threads of one task keep their registers across 3000 IPC round trips",
        served && client.mismatches == 0 && client.errors == 0 && client.last_word == 0,
    );
    if !served {
        core::mem::forget((server, _ps));
    }

    // Two address spaces in IPC: a child task calls this thread, which replies.
    let (_, _) = suite.child(child_fpu_client, suite.pager_normal, suite.death, true);
    let first = wait_badge(CHILD_BADGE);
    let (mut parent, _pp) = boxed_run(8, 3, FPU_ROUND_TRIPS - 1);
    let mut report = None;
    if first.is_some() {
        exercise(&mut parent);
        let _ = ipc::reply(tag(0, 1), &[parent.mismatches + parent.errors]);
        report = wait_badge(CHILD_BADGE);
    }
    let child_ok = matches!(report, Some(m) if m.tag.label() == 31 && m.words[..3] == [0, 0, 0]);
    if !child_ok || parent.mismatches + parent.errors != 0 {
        println!(
            "# fpu: IPC between tasks: parent {:?}, child reported {:?}",
            fpu_outcome(&parent),
            report.map(|m| [m.word(0), m.word(1), m.word(2)])
        );
    }
    check(
        "fpu",
        "threads of two tasks keep their registers across 3000 IPC round trips",
        child_ok && parent.mismatches == 0 && parent.errors == 0,
    );

    // Two address spaces preempted by the timer: a child task and this thread both spin.
    let (task, child) = suite.child(child_fpu_spinner, suite.pager_normal, suite.death, false);
    let shared = fresh_page();
    let mapped = sys::map(
        task,
        Fpage::memory(shared, 12, Fpage::READ | Fpage::WRITE),
        MAP_ADDRESS,
        MapFlags::empty(),
    );
    let _ = sys::thread_schedule(child, priority, 1000);
    let _ = sys::thread_schedule(slots::SELF_THREAD, priority, 1000);
    suite.start(child, child_fpu_spinner);
    let (mut mine, _pm) = boxed_run(9, 0, u64::MAX);
    mine.arrived_counter = shared;
    if mapped.is_ok() {
        exercise(&mut mine);
    }
    let _ = sys::thread_schedule(slots::SELF_THREAD, priority, slice);
    let report = wait_badge(CHILD_BADGE);
    let child_ok = matches!(report, Some(m) if m.tag.label() == 32 && m.words[..2] == [0, 0] && m.word(2) >= FPU_PREEMPTIONS);
    if !child_ok || mine.mismatches + mine.errors != 0 {
        println!(
            "# fpu: spinning tasks: parent {:?}, child reported {:?}",
            fpu_outcome(&mine),
            report.map(|m| [m.word(0), m.word(1), m.word(2)])
        );
    }
    check(
        "fpu",
        "threads of two tasks keep their registers across 1500 timer preemptions each",
        mapped.is_ok() && child_ok && mine.mismatches == 0 && mine.errors == 0,
    );
}

/// Yield until `counter` reaches `value` (bounded).
fn wait_flag_count(counter: &AtomicU64, value: u64) -> bool {
    for _ in 0..10_000 {
        if counter.load(SeqCst) >= value {
            return true;
        }
        sys::thread_yield();
    }
    false
}
