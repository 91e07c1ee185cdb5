//! What the cases share: small helpers, thread bodies, the pager of child tasks and its
//! badges, child task bodies and the [`Suite`] of gates they use.

use crate::mechanisms::{marker_page, race_fault};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Error, ExRegsFlags, FaultAccess, Fpage, MapItem, MessageTag, ObjectKind, Timeout,
    Timeouts, LABEL_PAGE_FAULT, NO_CAP, PAGE_SIZE,
};
use l4::ipc::{self, IpcError, Received};
use l4::thread::{alloc_slot, spawn, Spawn};
use l4::{println, sys};

// ---------------------------------------------------------------------------------------
// Helpers

/// Wait at most two seconds in the receive phase (tests never hang).
pub(crate) const RECEIVE_2S: Timeouts =
    Timeouts::new(Timeout::INFINITE, Timeout::micros(2_000_000));
/// Neither phase waits.
pub(crate) const POLL: Timeouts = Timeouts::new(Timeout::ZERO, Timeout::ZERO);

/// The IPC error `error` of the send (`receive_phase` false) or receive phase.
pub(crate) fn err(error: Error, receive_phase: bool) -> IpcError {
    IpcError {
        error,
        receive_phase,
    }
}

/// A message tag with `label` and `words` untyped words, no items.
pub(crate) fn tag(label: i32, words: usize) -> MessageTag {
    MessageTag::new(label, words, 0)
}

/// A new thread from our factory, not bound to a task yet: its slot.
pub(crate) fn new_thread_slot() -> u64 {
    let slot = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Thread, slot, 0, 0).expect("create thread");
    slot
}

/// Start a thread of ours at `entry(argument)` on an 8 KiB stack: its slot.
pub(crate) fn go(entry: extern "C" fn(u64) -> !, argument: u64) -> u64 {
    spawn(
        entry,
        argument,
        Spawn {
            stack_size: 8 * 1024,
            ..Spawn::default()
        },
    )
    .expect("spawn")
}

/// A new gate to `thread` with `badge`: its slot.
pub(crate) fn gate(thread: u64, badge: u64) -> u64 {
    let slot = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Gate, slot, thread, badge)
        .expect("create gate");
    slot
}

/// Spin-yield until `flag` is set (bounded).
pub(crate) fn wait_flag(flag: &AtomicBool) -> bool {
    for _ in 0..10_000 {
        if flag.load(SeqCst) {
            return true;
        }
        sys::thread_yield();
    }
    false
}

/// The error a raw syscall returned in rax (`None`: success).
pub(crate) fn raw_error(rax: u64) -> Option<Error> {
    Error::from_u64(rax)
}

// ---------------------------------------------------------------------------------------
// Thread bodies

/// Set by thread bodies when they got somewhere (cases reset it first).
pub(crate) static FLAG: AtomicBool = AtomicBool::new(false);
/// What a thread body recorded.
pub(crate) static VALUE: AtomicU64 = AtomicU64::new(0);
/// Tells a spinning thread to stop; also set by a body when it is done.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);
/// Counted up by spinning threads.
pub(crate) static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Record `value` and set [`FLAG`], then exit.
pub(crate) extern "C" fn set_flag(value: u64) -> ! {
    VALUE.store(value, SeqCst);
    FLAG.store(true, SeqCst);
    sys::thread_exit(0)
}

/// Send `[argument, argument*2, argument*3, argument*4]` with label 7 to the main thread.
pub(crate) extern "C" fn send_four(argument: u64) -> ! {
    let words = [argument, argument * 2, argument * 3, argument * 4];
    let _ = ipc::send(slots::SELF_THREAD, tag(7, 4), &words, Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Send 64 words `argument + i` to the main thread.
pub(crate) extern "C" fn send_long(argument: u64) -> ! {
    let mut words = [0u64; 64];
    for (i, w) in words.iter_mut().enumerate() {
        *w = argument + i as u64;
    }
    let _ = ipc::send(slots::SELF_THREAD, tag(9, 64), &words, Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Serve `argument` calls: reply with word 0 plus one; then exit.
pub(crate) extern "C" fn server(count: u64) -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    for i in 0..count {
        let Ok(m) = message else { break };
        let reply = [m.word(0) + 1];
        message = if i + 1 == count {
            let _ = ipc::reply(tag(0, 1), &reply);
            break;
        } else {
            ipc::reply_wait(tag(0, 1), &reply, Timeouts::INFINITE)
        };
    }
    sys::thread_exit(0)
}

/// Send one word through the capability slot `argument >> 32` with value `argument & 0xffff_ffff`.
pub(crate) extern "C" fn send_through(argument: u64) -> ! {
    let _ = ipc::send(
        argument >> 32,
        tag(3, 1),
        &[argument & 0xffff_ffff],
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// Exit at once.
pub(crate) extern "C" fn exit_now(_: u64) -> ! {
    sys::thread_exit(0)
}

/// Yield five times, then exit.
pub(crate) extern "C" fn yield_then_exit(_: u64) -> ! {
    for _ in 0..5 {
        sys::thread_yield();
    }
    sys::thread_exit(0)
}

/// Receive one message and exit without replying.
pub(crate) extern "C" fn receive_and_die(_: u64) -> ! {
    let _ = ipc::wait(Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Closed-wait on the thread in slot `argument` forever; record the result code.
pub(crate) extern "C" fn closed_wait_record(source: u64) -> ! {
    FLAG.store(true, SeqCst);
    let result = ipc::receive(source, Timeouts::INFINITE);
    let code = match result {
        Ok(_) => 0,
        Err(e) => e.error as u64 | if e.receive_phase { 0x100 } else { 0 },
    };
    VALUE.store(code, SeqCst);
    STOP.store(true, SeqCst);
    sys::thread_exit(0)
}

/// Set [`FLAG`], then count [`COUNTER`] up until [`STOP`].
pub(crate) extern "C" fn spinner(_: u64) -> ! {
    FLAG.store(true, SeqCst);
    while !STOP.load(SeqCst) {
        COUNTER.fetch_add(1, SeqCst);
    }
    sys::thread_exit(0)
}

/// Wait open and expect a message through a gate: record the badge and word 0.
pub(crate) extern "C" fn record_message(_: u64) -> ! {
    if let Ok(m) = ipc::wait(Timeouts::INFINITE) {
        VALUE.store(m.badge << 32 | m.word(0), SeqCst);
    }
    FLAG.store(true, SeqCst);
    sys::thread_exit(0)
}

// ---------------------------------------------------------------------------------------
// The pager of child tasks

/// Badge of the normal pager gate.
const PAGER_NORMAL: u64 = 1;
/// Badge of the pager gate that refuses every fault.
const PAGER_REFUSING: u64 = 2;
/// Badge of the pager gate that answers the first fault on a page with a mapping it revoked
/// just before (an unmap racing with the fault), and the second one properly.
pub(crate) const PAGER_RACE: u64 = 4;
/// Badge of the pager gate that serves images and stacks but never answers a fault on
/// [`SILENT_PAGE`].
pub(crate) const PAGER_SILENT: u64 = 5;
/// The page the silent pager ignores.
pub(crate) const SILENT_PAGE: u64 = TEST_AREA + 0x800 * PAGE_SIZE;
/// Badge of the pager gate that maps the marker page for reads in the test area.
const PAGER_PROBE: u64 = 3;

/// Addresses the pager refuses (for fault tests).
pub(crate) const TEST_AREA: u64 = 0x0000_6000_0000_0000;
/// Where the map test places a page in a child.
pub(crate) const MAP_ADDRESS: u64 = 0x0000_6100_0000_0000;

/// Page faults the pager thread received.
pub(crate) static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The address of the last of them.
pub(crate) static LAST_FAULT: AtomicU64 = AtomicU64::new(0);
/// Its access bits ([`FaultAccess`]).
pub(crate) static LAST_ACCESS: AtomicU64 = AtomicU64::new(0);

fn resolve_child_fault(badge: u64, address: u64, access: u64) -> Option<MapItem> {
    let page = address & !(PAGE_SIZE - 1);
    let in_test_area = (TEST_AREA..TEST_AREA + (1 << 40)).contains(&page);
    if badge == PAGER_PROBE
        && in_test_area
        && !FaultAccess::from_bits_retain(access).contains(FaultAccess::WRITE)
    {
        // Probing an unmapped page: answer with the marker page (read-only).
        return Some(MapItem::map(
            page,
            Fpage::memory(marker_page(), 12, Fpage::READ),
        ));
    }
    if badge == PAGER_RACE && in_test_area {
        return race_fault(page);
    }
    if badge == PAGER_REFUSING || in_test_area {
        return None;
    }
    l4::child::resolve_image_fault(address, access)
}

extern "C" fn pager_thread(_: u64) -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        let m = match message {
            Ok(m) => m,
            Err(_) => {
                message = ipc::wait(Timeouts::INFINITE);
                continue;
            }
        };
        if m.tag.label() != LABEL_PAGE_FAULT {
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        }
        FAULTS.fetch_add(1, SeqCst);
        LAST_FAULT.store(m.word(0), SeqCst);
        LAST_ACCESS.store(m.word(1), SeqCst);
        if m.badge == PAGER_SILENT && m.word(0) & !(PAGE_SIZE - 1) == SILENT_PAGE {
            // Never answer this one: the faulting IPC's timeout must end it.
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        }
        message = match resolve_child_fault(m.badge, m.word(0), m.word(1)) {
            Some(item) => ipc::reply_wait(
                MessageTag::new(0, 0, 1),
                &[item.control, item.fpage.0],
                Timeouts::INFINITE,
            ),
            None => ipc::reply_wait(tag(-1, 0), &[], Timeouts::INFINITE),
        };
    }
}

// ---------------------------------------------------------------------------------------
// Child task bodies (run in other address spaces; they use only their stack and IPC)

/// Call the peer with 42, then send the reply's word plus 1000 back, then exit.
pub(crate) extern "C" fn child_echo() -> ! {
    let value = match ipc::call(slots::PEER, tag(1, 1), &[42], Timeouts::INFINITE) {
        Ok(r) => r.word(0) + 1000,
        Err(_) => 0,
    };
    let _ = ipc::send(slots::PEER, tag(2, 1), &[value], Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Read the test area (refused by the pager: this kills the thread).
pub(crate) extern "C" fn child_touch_test_area() -> ! {
    // SAFETY: deliberately touches memory the pager refuses.
    unsafe { core::ptr::read_volatile(TEST_AREA as *const u64) };
    sys::thread_exit(0)
}

/// Send the word at [`MAP_ADDRESS`] (mapped by the parent) to the peer.
pub(crate) extern "C" fn child_read_mapped() -> ! {
    // SAFETY: the parent mapped this page before starting us.
    let value = unsafe { core::ptr::read_volatile(MAP_ADDRESS as *const u64) };
    let _ = ipc::send(slots::PEER, tag(4, 1), &[value], Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Write to [`MAP_ADDRESS`], then tell the peer (label 5).
pub(crate) extern "C" fn child_write_mapped() -> ! {
    // SAFETY: the page is mapped read-only: this write faults on purpose.
    unsafe { core::ptr::write_volatile(MAP_ADDRESS as *mut u64, 7) };
    let _ = ipc::send(slots::PEER, tag(5, 0), &[], Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Try capabilities this task was not given; report the error codes.
pub(crate) extern "C" fn child_capabilities() -> ! {
    let create = sys::factory_create(slots::FACTORY, ObjectKind::Thread, 20, 0, 0);
    let control = sys::ex_regs(slots::SELF_THREAD, 0, 0, ExRegsFlags::empty()).map(|_| ());
    let destroy = sys::shutdown(slots::PLATFORM, 0);
    let code = |r: Result<(), Error>| match r {
        Ok(()) => 0,
        Err(e) => e as u64,
    };
    let words = [code(create), code(control), code(destroy)];
    let _ = ipc::send(slots::PEER, tag(6, 3), &words, Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Wait for one message, then exit.
pub(crate) extern "C" fn child_block() -> ! {
    let _ = ipc::wait(Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// The pager thread of child tasks and the gates the cases hand children.
pub(crate) struct Suite {
    /// The pager thread.
    pub(crate) pager_thread: u64,
    /// Its gate that serves images and stacks ([`PAGER_NORMAL`]).
    pub(crate) pager_normal: u64,
    /// Its gate that refuses every fault ([`PAGER_REFUSING`]).
    pub(crate) pager_refusing: u64,
    /// Its gate that maps the marker page on reads in the test area ([`PAGER_PROBE`]).
    pub(crate) pager_probe: u64,
    /// Our gate children call and send to ([`CHILD_BADGE`]).
    pub(crate) peer: u64,
    /// Our gate death notices arrive through ([`DEATH_BADGE`]).
    pub(crate) death: u64,
    /// The exception recorder's gate (`NO_CAP` until there is one).
    pub(crate) recorder: u64,
}

impl Suite {
    /// The pager thread, its gates, ours; no exception recorder yet.
    pub(crate) fn new() -> Suite {
        let pager = go(pager_thread, 0);
        Suite {
            pager_thread: pager,
            pager_normal: gate(pager, PAGER_NORMAL),
            pager_refusing: gate(pager, PAGER_REFUSING),
            pager_probe: gate(pager, PAGER_PROBE),
            peer: gate(slots::SELF_THREAD, CHILD_BADGE),
            death: gate(slots::SELF_THREAD, DEATH_BADGE),
            recorder: NO_CAP,
        }
    }
}

/// Badge of the gate children talk to the main thread through.
pub(crate) const CHILD_BADGE: u64 = 0x77;
/// Badge of the gate death notices arrive through.
pub(crate) const DEATH_BADGE: u64 = 0x99;

impl Suite {
    /// A child task with one thread at `entry`; not started unless `start`.
    pub(crate) fn child(
        &self,
        entry: extern "C" fn() -> !,
        pager: u64,
        handler: u64,
        start: bool,
    ) -> (u64, u64) {
        l4::child::create(entry, pager, handler, self.peer, start).expect("create child task")
    }

    /// Start the child thread `thread` at `entry`.
    pub(crate) fn start(&self, thread: u64, entry: extern "C" fn() -> !) {
        l4::child::start(thread, entry).expect("start child");
    }
}

/// Wait for a message with `badge` (others are reported and dropped).
pub(crate) fn wait_badge(badge: u64) -> Option<Received> {
    for _ in 0..4 {
        match ipc::wait(RECEIVE_2S) {
            Ok(m) if m.badge == badge => return Some(m),
            Ok(m) => println!(
                "# unexpected message label {} badge {:#x}",
                m.tag.label(),
                m.badge
            ),
            Err(e) => {
                println!("# wait: {e:?}");
                return None;
            }
        }
    }
    None
}

/// The time stamp counter.
pub(crate) fn l4_tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high) };
    (high as u64) << 32 | low as u64
}
