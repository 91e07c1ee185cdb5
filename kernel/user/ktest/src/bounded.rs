//! Bounded kernel work: a task's destruction goes in steps.

use crate::lifetime::yield_until;
use crate::support::{err, go, tag, POLL, RECEIVE_2S};
use crate::tap::{check, check_eq, Case};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{slots, Error, ObjectKind, Timeout, Timeouts, NO_CAP, UTCB_AREA};
use l4::ipc::{self, IpcError};
use l4::thread::alloc_slot;
use l4::{println, sys};

/// The task being destroyed (0 until the destroyer starts).
static BIG_TASK: AtomicU64 = AtomicU64::new(0);
/// What the racer's and the destroyer's `TaskDestroy` returned (`u64::MAX`: not called).
static RACE_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
static DESTROY_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
static DESTROY_DONE: AtomicBool = AtomicBool::new(false);
/// What a thread in a closed receive from one of the task's threads got.
static CLOSED_RECEIVE: AtomicU64 = AtomicU64::new(u64::MAX);

pub(crate) fn result_code(r: Result<(), Error>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => e as u64,
    }
}

/// High priority: wakes every tick; the first time it finds the destruction under way (the
/// destroyer was preempted in its `TaskDestroy`), it destroys the same task itself.
extern "C" fn destroy_racer(_: u64) -> ! {
    for _ in 0..5_000 {
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
        if DESTROY_DONE.load(SeqCst) {
            break;
        }
        let task = BIG_TASK.load(SeqCst);
        if task != 0 && RACE_RESULT.load(SeqCst) == u64::MAX {
            RACE_RESULT.store(result_code(sys::task_destroy(task)), SeqCst);
        }
    }
    sys::thread_exit(0)
}

/// Low priority: destroys the task in slot `task`.
extern "C" fn slow_destroyer(task: u64) -> ! {
    BIG_TASK.store(task, SeqCst);
    DESTROY_RESULT.store(result_code(sys::task_destroy(task)), SeqCst);
    DESTROY_DONE.store(true, SeqCst);
    sys::thread_exit(0)
}

/// Waits in a closed receive from thread `thread` (of the task being destroyed).
extern "C" fn closed_receiver(thread: u64) -> ! {
    let r = ipc::receive(thread, RECEIVE_2S);
    let code = match r {
        Err(IpcError {
            error: Error::DeadPartner,
            receive_phase: true,
        }) => 0,
        Err(e) => e.error as u64 + 1,
        Ok(_) => 1000,
    };
    CLOSED_RECEIVE.store(code, SeqCst);
    sys::thread_exit(0)
}

/// The cases of [`bounded_destroy_cases`], in the order it reports them.
pub(crate) const BOUNDED_DESTROY_CASES: &[Case] = &[
    (
        "task",
        "a task with 2,000 threads is destroyed in steps; a racing TaskDestroy completes it once",
    ),
    (
        "task",
        "after a stepwise destroy the task's capability is stale",
    ),
    ("task", "after a stepwise destroy its threads are gone"),
    (
        "task",
        "a closed receive from a thread of a destroyed task fails with DeadPartner",
    ),
    (
        "quota",
        "a stepwise destroy of 2,000 threads returns their quota exactly",
    ),
];

pub(crate) fn bounded_destroy_cases() {
    const THREADS: u64 = 2000;
    const QUOTA: u64 = 16 << 20;
    let quota = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, quota, QUOTA, 0);
    let task = alloc_slot();
    let made = made.and_then(|_| sys::factory_create(quota, ObjectKind::Task, task, 0, 0));
    // THREADS unstarted threads bound to the task; we keep a capability to the first.
    let first = alloc_slot();
    let scratch = alloc_slot();
    let mut bound = 0;
    while made.is_ok() && bound < THREADS {
        let slot = if bound == 0 { first } else { scratch };
        if sys::factory_create(quota, ObjectKind::Thread, slot, 0, 0).is_err() {
            break;
        }
        let utcb = UTCB_AREA + bound * l4::abi::UTCB_SIZE;
        let ok = sys::thread_control(slot, task, utcb, NO_CAP, NO_CAP).is_ok();
        if slot == scratch {
            let _ = sys::cap_delete(scratch);
        }
        if !ok {
            break;
        }
        bound += 1;
    }
    let receiver = go(closed_receiver, first);
    sys::thread_yield();
    let racer = go(destroy_racer, 0);
    let destroyer = go(slow_destroyer, task);
    let lowered = sys::thread_schedule(destroyer, 50, 0);
    // Block (the destroyer runs below us) until it is done.
    for _ in 0..5_000 {
        if DESTROY_DONE.load(SeqCst) {
            break;
        }
        let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(1000)));
    }
    let (own, raced) = (DESTROY_RESULT.load(SeqCst), RACE_RESULT.load(SeqCst));
    let stale = Error::InvalidCapability as u64;
    println!("# task: destroyer got {own}, racer got {raced} ({bound} threads)");
    check(
        "task",
        "a task with 2,000 threads is destroyed in steps; a racing TaskDestroy completes it once",
        made.is_ok()
            && lowered.is_ok()
            && bound == THREADS
            && DESTROY_DONE.load(SeqCst)
            && ((own == 0 && (raced == stale || raced == u64::MAX))
                || (raced == 0 && own == stale)),
    );
    check_eq(
        "task",
        "after a stepwise destroy the task's capability is stale",
        sys::task_destroy(task),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "task",
        "after a stepwise destroy its threads are gone",
        ipc::send(first, tag(1, 0), &[], POLL),
        Err(err(Error::InvalidCapability, false)),
    );
    yield_until(|| CLOSED_RECEIVE.load(SeqCst) != u64::MAX, 100);
    check_eq(
        "task",
        "a closed receive from a thread of a destroyed task fails with DeadPartner",
        CLOSED_RECEIVE.load(SeqCst),
        0,
    );
    // The whole quota is free again: a sub-factory of all of it can be carved out.
    check_eq(
        "quota",
        "a stepwise destroy of 2,000 threads returns their quota exactly",
        sys::factory_create(quota, ObjectKind::Factory, alloc_slot(), QUOTA, 0),
        Ok(()),
    );
    let _ = (receiver, racer);
}
