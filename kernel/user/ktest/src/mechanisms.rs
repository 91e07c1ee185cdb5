//! Cases for the complete L4 mechanisms: exception IPC, IRQ objects, the mapping database
//! (recursive unmap of memory, I/O ports and capabilities), priorities.

use crate::hostile::books_balance;
use crate::support::{
    err, gate, go, new_thread_slot, receive_and_die, server, set_flag, tag, wait_badge, wait_flag,
    Suite, CHILD_BADGE, COUNTER, DEATH_BADGE, FAULTS, FLAG, LAST_ACCESS, LAST_FAULT, PAGER_RACE,
    PAGER_SILENT, POLL, RECEIVE_2S, SILENT_PAGE, TEST_AREA, VALUE,
};
use crate::tap::{check, check_eq, skip, Case};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Error, ExRegsFlags, Fpage, MapItem, MemoryRights, MessageTag, ObjectKind, Rights,
    Syscall, Timeout, Timeouts, LABEL_DEATH, NO_CAP, PAGE_SIZE,
};
use l4::abi::{MapFlags, UnmapFlags};
use l4::child::{fresh_page, IMAGE};
use l4::ipc::{self, IpcError};
use l4::thread::{alloc_slot, alloc_utcb};
use l4::{println, sys};

/// What a probe read returns for a page that is not mapped.
pub(crate) const MARKER: u64 = 0x6d61_726b_6572_2121;

static MARKER_PAGE: AtomicU64 = AtomicU64::new(0);

pub(crate) fn marker_page() -> u64 {
    let page = MARKER_PAGE.load(SeqCst);
    if page != 0 {
        return page;
    }
    let page = fresh_page();
    // SAFETY: a fresh page of ours.
    unsafe { core::ptr::write_volatile(page as *mut u64, MARKER) };
    MARKER_PAGE.store(page, SeqCst);
    page
}

static EXCEPTION_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);

/// Handles exceptions of agents: records the vector, skips the one-byte faulting instruction
/// (`in al, dx`) and makes it return `u64::MAX` in rax.
pub(crate) extern "C" fn exception_recorder(_: u64) -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        let Ok(m) = message else {
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        };
        if m.tag.label() != l4::abi::LABEL_EXCEPTION {
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        }
        EXCEPTION_VECTOR.store(m.word(0), SeqCst);
        let mut state = [0u64; 20];
        state.copy_from_slice(&m.words[..20]);
        state[2] += 1; // rip
        state[5] = u64::MAX; // rax
        message = ipc::reply_wait(tag(0, 20), &state, Timeouts::INFINITE);
    }
}

// Agent commands (labels).
const AGENT_READ: i32 = 1;
const AGENT_MAP: i32 = 2;
const AGENT_UNMAP: i32 = 3;
const AGENT_WRITE: i32 = 4;
const AGENT_SEND: i32 = 5;
const AGENT_IN: i32 = 6;
pub(crate) const AGENT_CAP_COPY: i32 = 7;
pub(crate) const AGENT_CREATE: i32 = 8;

fn code(r: Result<(), Error>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => e as u64,
    }
}

/// A child task that performs commands in its own address space and capability table.
pub(crate) extern "C" fn child_agent() -> ! {
    let mut message = ipc::wait(Timeouts::INFINITE);
    loop {
        let Ok(m) = message else {
            message = ipc::wait(Timeouts::INFINITE);
            continue;
        };
        let w = |i| m.word(i);
        let result = match m.tag.label() {
            // SAFETY: the agent reads or writes where its parent tells it; faults go to the
            // probing pager.
            AGENT_READ => unsafe { core::ptr::read_volatile(w(0) as *const u64) },
            AGENT_WRITE => {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(w(0) as *mut u64, w(1)) };
                0
            }
            AGENT_MAP => code(sys::map(
                w(0),
                Fpage(w(1)),
                w(2),
                MapFlags::from_bits_retain(w(3)),
            )),
            AGENT_UNMAP => {
                let flags = UnmapFlags::from_bits_retain(w(1));
                // SAFETY: the agent keeps nothing of its own in the test area.
                code(unsafe { sys::unmap(Fpage(w(0)), flags) })
            }
            AGENT_SEND => match ipc::send(w(0), tag(0x55, 1), &[w(1)], RECEIVE_2S) {
                Ok(()) => 0,
                Err(e) => e.error as u64,
            },
            AGENT_IN => {
                let value: u64;
                // SAFETY: port input; without the port the CPU raises #GP, which the
                // exception recorder turns into rax = u64::MAX. (Not `x86_64::instructions::port`:
                // the case needs the result in rax, where the recorder writes it.)
                unsafe {
                    core::arch::asm!("xor eax, eax", "in al, dx", in("dx") w(0) as u16, out("rax") value)
                };
                value
            }
            AGENT_CAP_COPY => code(sys::cap_copy(
                w(0),
                w(1),
                w(2),
                Rights::from_bits_retain(w(3)),
                0,
            )),
            AGENT_CREATE => match ObjectKind::from_u64(w(1)) {
                Some(kind) => code(sys::factory_create(w(0), kind, w(2), w(3), 0)),
                None => u64::MAX - 3,
            },
            _ => u64::MAX - 1,
        };
        message = ipc::reply_wait(tag(0, 1), &[result], Timeouts::INFINITE);
    }
}

/// A started agent: its task and thread capabilities (in our table).
#[derive(Clone, Copy)]
pub(crate) struct Agent {
    pub(crate) task: u64,
    pub(crate) thread: u64,
}

impl Agent {
    pub(crate) fn new(suite: &Suite) -> Agent {
        let (task, thread) = suite.child(child_agent, suite.pager_probe, suite.recorder, true);
        Agent { task, thread }
    }

    pub(crate) fn command(&self, label: i32, words: &[u64]) -> u64 {
        match ipc::call(self.thread, tag(label, words.len()), words, RECEIVE_2S) {
            Ok(m) => m.word(0),
            Err(e) => {
                println!("# agent command {label}: {e:?}");
                u64::MAX - 2
            }
        }
    }

    pub(crate) fn read(&self, address: u64) -> u64 {
        self.command(AGENT_READ, &[address])
    }

    /// Make the agent map its `fpage` into the task in its slot `task_slot` at `destination`.
    pub(crate) fn map(&self, task_slot: u64, fpage: Fpage, destination: u64, flags: u64) -> u64 {
        self.command(AGENT_MAP, &[task_slot, fpage.0, destination, flags])
    }

    fn unmap(&self, fpage: Fpage, flags: u64) -> u64 {
        self.command(AGENT_UNMAP, &[fpage.0, flags])
    }

    /// Give the agent, in its slot `slot`, a capability to `other`'s task.
    pub(crate) fn give_task(&self, other: &Agent, slot: u64) {
        sys::cap_copy(self.task, other.task, slot, Rights::all(), 0).expect("give task cap");
    }
}

fn page_at(n: u64) -> u64 {
    TEST_AREA + n * PAGE_SIZE
}

/// The cases of [`exception_cases`], in the order it reports them.
pub(crate) const EXCEPTION_CASES: &[Case] = &[
    (
        "exception",
        "invalid opcode arrives as exception IPC with vector and state",
    ),
    (
        "exception",
        "handler's reply changes the state and resumes the thread",
    ),
    ("exception", "handler cannot give a thread I/O privilege"),
    ("exception", "handler refusing kills the thread"),
    ("exception", "breakpoint (int3) arrives with vector 3"),
    ("exception", "divide error arrives with vector 0"),
    ("exception", "privileged instruction arrives as #GP (13)"),
    (
        "exception",
        "unanswered exception: cancel kills the thread with a death notice",
    ),
];

pub(crate) fn exception_cases(suite: &Suite) {
    let (_, t) = suite.child(child_ud2_report, suite.pager_normal, suite.death, true);
    let m = wait_badge(DEATH_BADGE);
    let ok = matches!(m, Some(m) if m.tag.label() == l4::abi::LABEL_EXCEPTION && m.tag.untyped() == 20 && m.word(0) == 6 && IMAGE.contains(&m.word(2)));
    check(
        "exception",
        "invalid opcode arrives as exception IPC with vector and state",
        ok,
    );
    if let Some(m) = m {
        let mut state = [0u64; 20];
        state.copy_from_slice(&m.words[..20]);
        state[2] += 2; // skip ud2
        state[5] = 0x1234_5678; // rax
        state[4] |= 0x3000; // try to raise IOPL: must be ignored
        let _ = ipc::reply(tag(0, 20), &state);
    }
    let r = wait_badge(CHILD_BADGE);
    check(
        "exception",
        "handler's reply changes the state and resumes the thread",
        matches!(r, Some(m) if m.word(0) == 0x1234_5678),
    );
    check(
        "exception",
        "handler cannot give a thread I/O privilege",
        matches!(r, Some(m) if m.word(1) & 0x3000 == 0 && m.word(1) & 0x200 != 0),
    );
    for _ in 0..3 {
        sys::thread_yield();
    }
    let _ = t;

    let (_, t) = suite.child(child_ud2_report, suite.pager_normal, suite.death, true);
    let m = wait_badge(DEATH_BADGE);
    let _ = ipc::reply(tag(-1, 0), &[]);
    for _ in 0..3 {
        sys::thread_yield();
    }
    check(
        "exception",
        "handler refusing kills the thread",
        m.is_some() && ipc::receive(t, POLL).map(|_| ()) == Err(err(Error::DeadPartner, true)),
    );

    for (entry, vector, name) in [
        (
            child_int3 as extern "C" fn() -> !,
            3u64,
            "breakpoint (int3) arrives with vector 3",
        ),
        (child_divide, 0, "divide error arrives with vector 0"),
        (
            child_privileged,
            13,
            "privileged instruction arrives as #GP (13)",
        ),
    ] {
        let (_, _) = suite.child(entry, suite.pager_normal, suite.death, true);
        let m = wait_badge(DEATH_BADGE);
        check(
            "exception",
            name,
            matches!(m, Some(m) if m.tag.label() == l4::abi::LABEL_EXCEPTION && m.word(0) == vector),
        );
        let _ = ipc::reply(tag(-1, 0), &[]);
    }

    // A handler that never answers: the creator cancels, the thread is killed.
    let (_, t) = suite.child(child_ud2_report, suite.pager_normal, suite.death, true);
    let m = wait_badge(DEATH_BADGE);
    let cancel = sys::ex_regs(t, 0, 0, ExRegsFlags::CANCEL);
    let notice = wait_badge(DEATH_BADGE);
    check(
        "exception",
        "unanswered exception: cancel kills the thread with a death notice",
        m.is_some()
            && cancel.is_ok()
            && matches!(notice, Some(n) if n.tag.label() == LABEL_DEATH && n.word(0) == l4::abi::death::PAGER_GONE),
    );
}

extern "C" fn child_ud2_report() -> ! {
    let value: u64;
    let flags: u64;
    // SAFETY: deliberately raises #UD; the handler skips the instruction and sets rax.
    unsafe {
        core::arch::asm!("xor eax, eax", "ud2", "pushfq", "pop {f}", out("rax") value, f = out(reg) flags)
    };
    let _ = ipc::send(slots::PEER, tag(8, 2), &[value, flags], Timeouts::INFINITE);
    sys::thread_exit(0)
}

extern "C" fn child_int3() -> ! {
    // SAFETY: deliberately raises #BP.
    unsafe { core::arch::asm!("int3") };
    sys::thread_exit(0)
}

extern "C" fn child_divide() -> ! {
    // SAFETY: deliberately divides by zero.
    unsafe {
        core::arch::asm!("xor edx, edx", "xor ecx, ecx", "mov eax, 1", "div ecx", out("rax") _, out("rdx") _, out("rcx") _)
    };
    sys::thread_exit(0)
}

extern "C" fn child_privileged() -> ! {
    // SAFETY: deliberately executes a privileged instruction in user mode.
    unsafe { core::arch::asm!("cli") };
    sys::thread_exit(0)
}

/// The cases of [`irq_cases`], in the order it reports them.
pub(crate) const IRQ_CASES: &[Case] = &[
    (
        "irq",
        "create a software IRQ through the platform capability",
    ),
    ("irq", "one IRQ object per line"),
    ("irq", "invalid line rejected"),
    ("irq", "IRQ objects need the platform capability"),
    ("irq", "attach the receiving thread"),
    ("irq", "exactly one receiver per IRQ"),
    ("irq", "attach without the control right rejected"),
    ("irq", "IRQ operation on a non-IRQ capability rejected"),
    ("irq", "software trigger"),
    (
        "irq",
        "a pending IRQ arrives as IPC with its badge and line",
    ),
    ("irq", "no second message without a new interrupt"),
    ("irq", "a device interrupt (PIT on GSI 2) arrives as IPC"),
];

pub(crate) fn irq_cases() {
    let irq = alloc_slot();
    check_eq(
        "irq",
        "create a software IRQ through the platform capability",
        sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, 40, 0x1140),
        Ok(()),
    );
    check_eq(
        "irq",
        "one IRQ object per line",
        sys::factory_create(slots::PLATFORM, ObjectKind::Irq, alloc_slot(), 40, 0),
        Err(Error::AlreadyBound),
    );
    check_eq(
        "irq",
        "invalid line rejected",
        sys::factory_create(slots::PLATFORM, ObjectKind::Irq, alloc_slot(), 30, 0),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "irq",
        "IRQ objects need the platform capability",
        sys::factory_create(slots::FACTORY, ObjectKind::Irq, alloc_slot(), 41, 0),
        Err(Error::WrongType),
    );
    check_eq(
        "irq",
        "attach the receiving thread",
        sys::irq_control(irq, l4::abi::IrqOp::Attach, slots::SELF_THREAD),
        Ok(()),
    );
    let other = go(receive_and_die, 0);
    check_eq(
        "irq",
        "exactly one receiver per IRQ",
        sys::irq_control(irq, l4::abi::IrqOp::Attach, other),
        Err(Error::AlreadyBound),
    );
    let weak = alloc_slot();
    sys::cap_copy(slots::SELF_TASK, irq, weak, Rights::SEND, 0).expect("copy");
    check_eq(
        "irq",
        "attach without the control right rejected",
        sys::irq_control(weak, l4::abi::IrqOp::Attach, slots::SELF_THREAD),
        Err(Error::NoRights),
    );
    check_eq(
        "irq",
        "IRQ operation on a non-IRQ capability rejected",
        sys::irq_control(slots::SELF_TASK, l4::abi::IrqOp::Trigger, 0),
        Err(Error::WrongType),
    );
    check_eq(
        "irq",
        "software trigger",
        sys::irq_control(irq, l4::abi::IrqOp::Trigger, 0),
        Ok(()),
    );
    let m = ipc::wait(RECEIVE_2S);
    check(
        "irq",
        "a pending IRQ arrives as IPC with its badge and line",
        matches!(m, Ok(m) if m.tag.label() == l4::abi::LABEL_IRQ && m.badge == 0x1140 && m.word(0) == 40),
    );
    check_eq(
        "irq",
        "no second message without a new interrupt",
        ipc::wait(POLL).map(|_| ()),
        Err(err(Error::Timeout, true)),
    );
    sys::irq_control(irq, l4::abi::IrqOp::Acknowledge, 0).expect("ack");

    // A real device: the PIT (ports 0x40..0x43, given by the root task) on GSI 2.
    let pit = alloc_slot();
    let created = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, pit, 2, 0x2222);
    let attached = sys::irq_control(pit, l4::abi::IrqOp::Attach, slots::SELF_THREAD);
    // Channel 0, lobyte/hibyte, mode 0 (interrupt on terminal count), ~1 ms.
    // SAFETY: the root task gave us ports 0x40..0x43.
    unsafe {
        core::arch::asm!("out 0x43, al", in("al") 0x30u8);
        core::arch::asm!("out 0x40, al", in("al") 0xa9u8);
        core::arch::asm!("out 0x40, al", in("al") 0x04u8);
    }
    let m = ipc::wait(RECEIVE_2S);
    check(
        "irq",
        "a device interrupt (PIT on GSI 2) arrives as IPC",
        created.is_ok()
            && attached.is_ok()
            && matches!(m, Ok(m) if m.tag.label() == l4::abi::LABEL_IRQ && m.badge == 0x2222 && m.word(0) == 2),
    );
    let _ = sys::irq_control(pit, l4::abi::IrqOp::Detach, 0);
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Detach, 0);
}

/// The cases of [`mapping_cases`], in the order it reports them.
pub(crate) const MAPPING_CASES: &[Case] = &[
    ("mapdb", "a three-level chain of mappings shares the page"),
    ("mapdb", "unmap in the middle revokes below, keeps above"),
    ("mapdb", "unmap at the root revokes every level"),
    ("mapdb", "unmap without self keeps the caller's own mapping"),
    (
        "mapdb",
        "fan-out: revoking one mapping revokes all its copies",
    ),
    (
        "mapdb",
        "a 16 KiB flexpage maps four pages; a partial unmap revokes only its range",
    ),
    ("mapdb", "grant moves a mapping to the receiver"),
    (
        "mapdb",
        "a granted mapping stays revocable by the original mapper",
    ),
    ("mapdb", "granting what one does not hold gives nothing"),
    (
        "mapdb",
        "a read-only mapping passed on as writable stays read-only",
    ),
    ("mapdb", "the write did not reach the page"),
    (
        "mapdb",
        "destroying a task revokes mappings derived from it",
    ),
    ("mapdb", "a capability flexpage gives a usable capability"),
    (
        "mapdb",
        "rights of a mapped capability only shrink (no copy right)",
    ),
    (
        "mapdb",
        "revoking a capability removes it from the receiver",
    ),
    (
        "mapdb",
        "revoking a capability also revokes copies made from it",
    ),
    ("mapdb", "flexpage of the reserved kind rejected"),
    ("mapdb", "capability flexpage beyond the table rejected"),
    (
        "mapdb",
        "capability flexpage to slots beyond the table rejected",
    ),
    ("mapdb", "I/O flexpage beyond port 65535 rejected"),
    ("mapdb", "unmap of a malformed flexpage rejected"),
];

pub(crate) fn mapping_cases(suite: &Suite) {
    let a = Agent::new(suite);
    let b = Agent::new(suite);
    let c = Agent::new(suite);
    const TASK_SLOT: u64 = 40;
    a.give_task(&b, TASK_SLOT);
    b.give_task(&c, TASK_SLOT);
    a.give_task(&c, TASK_SLOT + 1);

    // A chain: ktest -> a -> b -> c.
    let page = fresh_page();
    // SAFETY: our page.
    unsafe { core::ptr::write_volatile(page as *mut u64, 0xc0ffee) };
    let (x, y, z) = (page_at(1), page_at(2), page_at(3));
    let mapped = sys::map(
        a.task,
        Fpage::memory(page, 12, Fpage::READ | Fpage::WRITE),
        x,
        MapFlags::empty(),
    )
    .is_ok()
        && a.map(
            TASK_SLOT,
            Fpage::memory(x, 12, Fpage::READ | Fpage::WRITE),
            y,
            0,
        ) == 0
        && b.map(
            TASK_SLOT,
            Fpage::memory(y, 12, Fpage::READ | Fpage::WRITE),
            z,
            0,
        ) == 0;
    check(
        "mapdb",
        "a three-level chain of mappings shares the page",
        mapped && c.read(z) == 0xc0ffee,
    );
    check_eq(
        "mapdb",
        "unmap in the middle revokes below, keeps above",
        (
            b.unmap(Fpage::memory(y, 12, Fpage::RWX), 0),
            c.read(z),
            b.read(y),
            a.read(x),
        ),
        (0, MARKER, 0xc0ffee, 0xc0ffee),
    );
    let _ = c.unmap(Fpage::memory(z, 12, Fpage::RWX), l4::abi::UNMAP_SELF);
    let remapped = b.map(TASK_SLOT, Fpage::memory(y, 12, Fpage::READ), z, 0);
    // SAFETY: the page is ours; revoke everything derived from it, keep ours.
    let revoked = unsafe { sys::unmap(Fpage::memory(page, 12, Fpage::RWX), UnmapFlags::empty()) };
    check_eq(
        "mapdb",
        "unmap at the root revokes every level",
        (remapped, revoked, a.read(x), b.read(y), c.read(z)),
        (0, Ok(()), MARKER, MARKER, MARKER),
    );
    // SAFETY: our page is still ours.
    check(
        "mapdb",
        "unmap without self keeps the caller's own mapping",
        unsafe { core::ptr::read_volatile(page as *const u64) } == 0xc0ffee,
    );

    // Fan-out: a maps one page to b and c; a revokes; both lose it.
    let (p, q) = (page_at(10), page_at(11));
    let _ = a.unmap(Fpage::memory(x, 12, Fpage::RWX), l4::abi::UNMAP_SELF);
    let _ = b.unmap(Fpage::memory(p, 12, Fpage::RWX), l4::abi::UNMAP_SELF);
    let _ = c.unmap(Fpage::memory(q, 12, Fpage::RWX), l4::abi::UNMAP_SELF);
    let fan = sys::map(
        a.task,
        Fpage::memory(page, 12, Fpage::READ),
        x,
        MapFlags::empty(),
    )
    .is_ok()
        && a.map(TASK_SLOT, Fpage::memory(x, 12, Fpage::READ), p, 0) == 0
        && a.map(TASK_SLOT + 1, Fpage::memory(x, 12, Fpage::READ), q, 0) == 0
        && b.read(p) == 0xc0ffee
        && c.read(q) == 0xc0ffee;
    let revoke = a.unmap(Fpage::memory(x, 12, Fpage::RWX), 0);
    check_eq(
        "mapdb",
        "fan-out: revoking one mapping revokes all its copies",
        (fan, revoke, b.read(p), c.read(q), a.read(x)),
        (true, 0, MARKER, MARKER, 0xc0ffee),
    );

    // Partial ranges: map 4 pages, revoke the middle two.
    let pages: Vec<u64> = (0..4)
        .map(|i| {
            let p = fresh_page();
            // SAFETY: our page.
            unsafe { core::ptr::write_volatile(p as *mut u64, 100 + i) };
            p
        })
        .collect();
    let base = page_at(0x100);
    let mut ok = true;
    for (i, &p) in pages.iter().enumerate() {
        ok &= sys::map(
            a.task,
            Fpage::memory(p, 12, Fpage::READ),
            base + i as u64 * PAGE_SIZE,
            MapFlags::empty(),
        )
        .is_ok();
    }
    ok &= a.map(TASK_SLOT, Fpage::memory(base, 14, Fpage::READ), base, 0) == 0;
    ok &= (0..4).all(|i| b.read(base + i * PAGE_SIZE) == 100 + i);
    let r = a.unmap(Fpage::memory(base + 2 * PAGE_SIZE, 13, Fpage::RWX), 0);
    let seen: Vec<u64> = (0..4).map(|i| b.read(base + i * PAGE_SIZE)).collect();
    check_eq(
        "mapdb",
        "a 16 KiB flexpage maps four pages; a partial unmap revokes only its range",
        (ok, r, seen),
        (true, 0, alloc::vec![100, 101, MARKER, MARKER]),
    );

    // Grant moves the mapping: a loses it, b has it, and it still derives from ours.
    let g = page_at(0x200);
    let granted = sys::map(
        a.task,
        Fpage::memory(page, 12, Fpage::READ),
        g,
        MapFlags::empty(),
    )
    .is_ok()
        && a.map(
            TASK_SLOT,
            Fpage::memory(g, 12, Fpage::READ),
            g,
            l4::abi::MAP_GRANT,
        ) == 0;
    check_eq(
        "mapdb",
        "grant moves a mapping to the receiver",
        (granted, a.read(g), b.read(g)),
        (true, MARKER, 0xc0ffee),
    );
    let _ = a.unmap(Fpage::memory(g, 12, Fpage::RWX), l4::abi::UNMAP_SELF);
    // SAFETY: ours stays.
    let _ = unsafe { sys::unmap(Fpage::memory(page, 12, Fpage::RWX), UnmapFlags::empty()) };
    check_eq(
        "mapdb",
        "a granted mapping stays revocable by the original mapper",
        b.read(g),
        MARKER,
    );
    let h = page_at(0x300);
    check_eq(
        "mapdb",
        "granting what one does not hold gives nothing",
        (
            a.map(
                TASK_SLOT,
                Fpage::memory(h, 12, Fpage::READ),
                h,
                l4::abi::MAP_GRANT,
            ),
            b.read(h),
        ),
        (0, MARKER),
    );

    // Rights only shrink along the chain.
    let r1 = page_at(0x400);
    let ro = sys::map(
        a.task,
        Fpage::memory(page, 12, Fpage::READ),
        r1,
        MapFlags::empty(),
    )
    .is_ok()
        && a.map(
            TASK_SLOT,
            Fpage::memory(r1, 12, Fpage::READ | Fpage::WRITE),
            r1,
            0,
        ) == 0;
    let before = EXCEPTION_VECTOR.load(SeqCst);
    let faults = FAULTS.load(SeqCst);
    let _ = before;
    let w = ipc::call(
        b.thread,
        tag(AGENT_WRITE, 2),
        &[r1, 5],
        Timeouts::new(Timeout::INFINITE, Timeout::micros(300_000)),
    );
    check(
        "mapdb",
        "a read-only mapping passed on as writable stays read-only",
        ro && w.is_err()
            && FAULTS.load(SeqCst) > faults
            && LAST_FAULT.load(SeqCst) == r1
            && LAST_ACCESS.load(SeqCst) & 3 == 3,
    );
    // SAFETY: ours.
    check(
        "mapdb",
        "the write did not reach the page",
        unsafe { core::ptr::read_volatile(page as *const u64) } == 0xc0ffee,
    );

    // Destroying a task revokes what was derived from its mappings.
    let d = Agent::new(suite);
    let e = Agent::new(suite);
    d.give_task(&e, TASK_SLOT);
    let t1 = page_at(0x500);
    let chain = sys::map(
        d.task,
        Fpage::memory(page, 12, Fpage::READ),
        t1,
        MapFlags::empty(),
    )
    .is_ok()
        && d.map(TASK_SLOT, Fpage::memory(t1, 12, Fpage::READ), t1, 0) == 0
        && e.read(t1) == 0xc0ffee;
    let destroyed = sys::task_destroy(d.task);
    check_eq(
        "mapdb",
        "destroying a task revokes mappings derived from it",
        (chain, destroyed, e.read(t1)),
        (true, Ok(()), MARKER),
    );

    // Capabilities: map a gate into an agent, use it, revoke it. (The gate's receiver is a
    // separate thread: a send from the agent to our own thread would count as the reply to
    // the call we make to it.)
    COUNTER.store(0, SeqCst);
    let recorder = go(record_loop, 0);
    let g = gate(recorder, 0xca);
    let slot_in_agent = 50;
    let mapped = sys::map(
        e.task,
        Fpage::object(g, 0, Rights::SEND),
        slot_in_agent,
        MapFlags::empty(),
    );
    let sent = e.command(AGENT_SEND, &[slot_in_agent, 77]);
    for _ in 0..3 {
        sys::thread_yield();
    }
    check(
        "mapdb",
        "a capability flexpage gives a usable capability",
        mapped.is_ok() && sent == 0 && VALUE.load(SeqCst) == (0xca << 32 | 77),
    );
    let copied = e.command(
        AGENT_CAP_COPY,
        &[
            slots::SELF_TASK,
            slot_in_agent,
            slot_in_agent + 1,
            Rights::all().bits(),
        ],
    );
    check_eq(
        "mapdb",
        "rights of a mapped capability only shrink (no copy right)",
        copied,
        Error::NoRights as u64,
    );
    // SAFETY: object flexpages touch no memory.
    let revoked = unsafe { sys::unmap(Fpage::object(g, 0, Rights::all()), UnmapFlags::empty()) };
    check_eq(
        "mapdb",
        "revoking a capability removes it from the receiver",
        (revoked, e.command(AGENT_SEND, &[slot_in_agent, 78])),
        (Ok(()), Error::InvalidCapability as u64),
    );
    // Capabilities delegated along a chain are revoked recursively.
    let with_copy = sys::map(
        e.task,
        Fpage::object(g, 0, Rights::SEND | Rights::COPY),
        slot_in_agent,
        MapFlags::empty(),
    )
    .is_ok()
        && e.command(
            AGENT_CAP_COPY,
            &[
                slots::SELF_TASK,
                slot_in_agent,
                slot_in_agent + 1,
                Rights::SEND.bits(),
            ],
        ) == 0;
    let sent = e.command(AGENT_SEND, &[slot_in_agent + 1, 79]);
    // SAFETY: as above.
    let _ = unsafe { sys::unmap(Fpage::object(g, 0, Rights::all()), UnmapFlags::empty()) };
    check_eq(
        "mapdb",
        "revoking a capability also revokes copies made from it",
        (
            with_copy,
            sent,
            e.command(AGENT_SEND, &[slot_in_agent + 1, 80]),
        ),
        (true, 0, Error::InvalidCapability as u64),
    );

    // Hostile flexpages.
    check_eq(
        "mapdb",
        "flexpage of the reserved kind rejected",
        sys::map(
            a.task,
            Fpage(page | (3 << 10) | (12 << 4) | 7),
            x,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "mapdb",
        "capability flexpage beyond the table rejected",
        sys::map(
            a.task,
            Fpage::object(510, 2, Rights::all()),
            0,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "mapdb",
        "capability flexpage to slots beyond the table rejected",
        sys::map(
            a.task,
            Fpage::object(g, 0, Rights::all()),
            600,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "mapdb",
        "I/O flexpage beyond port 65535 rejected",
        sys::map(a.task, Fpage::io(0xfff0, 5), 0, MapFlags::empty()),
        Err(Error::InvalidArgument),
    );
    // SAFETY: invalid flexpage, nothing happens.
    check_eq(
        "mapdb",
        "unmap of a malformed flexpage rejected",
        unsafe { sys::unmap(Fpage(0x1000 | (3 << 10)), UnmapFlags::empty()) },
        Err(Error::InvalidArgument),
    );
    let _ = sys::task_destroy(a.task);
    let _ = sys::task_destroy(b.task);
    let _ = sys::task_destroy(c.task);
    let _ = sys::task_destroy(e.task);
}

/// The cases of [`io_cases`], in the order it reports them.
pub(crate) const IO_CASES: &[Case] = &[
    ("io", "a task without I/O ports gets #GP on in/out"),
    ("io", "an I/O flexpage grants exactly its ports"),
    ("io", "ports outside the flexpage stay denied"),
    ("io", "mapping ports one does not hold gives nothing"),
    ("io", "unmap revokes the ports from the receiver"),
];

pub(crate) fn io_cases(suite: &Suite) {
    let a = Agent::new(suite);
    EXCEPTION_VECTOR.store(u64::MAX, SeqCst);
    let denied = a.command(AGENT_IN, &[0x42]);
    check(
        "io",
        "a task without I/O ports gets #GP on in/out",
        denied == u64::MAX && EXCEPTION_VECTOR.load(SeqCst) == 13,
    );
    let mapped = sys::map(a.task, Fpage::io(0x40, 2), 0, MapFlags::empty());
    EXCEPTION_VECTOR.store(u64::MAX, SeqCst);
    let allowed = a.command(AGENT_IN, &[0x42]);
    check(
        "io",
        "an I/O flexpage grants exactly its ports",
        mapped.is_ok() && allowed != u64::MAX && EXCEPTION_VECTOR.load(SeqCst) == u64::MAX,
    );
    let other = a.command(AGENT_IN, &[0x61]);
    check(
        "io",
        "ports outside the flexpage stay denied",
        other == u64::MAX && EXCEPTION_VECTOR.load(SeqCst) == 13,
    );
    check_eq(
        "io",
        "mapping ports one does not hold gives nothing",
        (
            sys::map(a.task, Fpage::io(0x60, 2), 0, MapFlags::empty()),
            a.command(AGENT_IN, &[0x61]),
        ),
        (Ok(()), u64::MAX),
    );
    // SAFETY: I/O flexpages touch no memory.
    let revoked = unsafe { sys::unmap(Fpage::io(0x40, 2), UnmapFlags::empty()) };
    EXCEPTION_VECTOR.store(u64::MAX, SeqCst);
    let after = a.command(AGENT_IN, &[0x42]);
    check(
        "io",
        "unmap revokes the ports from the receiver",
        revoked.is_ok() && after == u64::MAX && EXCEPTION_VECTOR.load(SeqCst) == 13,
    );
    let _ = sys::task_destroy(a.task);
}

/// Record every message (badge and word 0) in VALUE, count them in COUNTER.
extern "C" fn record_loop(_: u64) -> ! {
    loop {
        if let Ok(m) = ipc::wait(Timeouts::INFINITE) {
            VALUE.store(m.badge << 32 | m.word(0), SeqCst);
            COUNTER.fetch_add(1, SeqCst);
        }
    }
}

static ORDER: AtomicU64 = AtomicU64::new(0);

extern "C" fn record_order(mark: u64) -> ! {
    let _ = ORDER.fetch_update(SeqCst, SeqCst, |v| Some(v * 16 + mark));
    sys::thread_exit(0)
}

/// The cases of [`priority_cases`], in the order it reports them.
pub(crate) const PRIORITY_CASES: &[Case] = &[
    ("sched", "thread_schedule reports priority and time slice"),
    ("sched", "priority above one's own rejected"),
    ("sched", "thread_schedule needs the schedule right"),
    ("sched", "thread_schedule on a task capability rejected"),
    ("sched", "lower-priority threads wait while we run"),
    (
        "sched",
        "when we block, the higher of two waiting priorities runs first",
    ),
    (
        "sched",
        "a woken thread of equal priority does not preempt the sender",
    ),
    ("sched", "it runs at the next yield"),
    ("sched", "thread_switch runs the target thread"),
    ("sched", "thread_switch to a non-thread rejected"),
];

pub(crate) fn priority_cases() {
    let (own, slice) = sys::thread_schedule(slots::SELF_THREAD, 100, 0).expect("read own priority");
    check(
        "sched",
        "thread_schedule reports priority and time slice",
        own == 100 && slice > 0,
    );
    let t = new_thread_slot();
    sys::thread_control(t, slots::SELF_TASK, alloc_utcb(), NO_CAP, NO_CAP).expect("bind");
    check_eq(
        "sched",
        "priority above one's own rejected",
        sys::thread_schedule(t, 101, 0).map(|_| ()),
        Err(Error::InvalidArgument),
    );
    let weak = alloc_slot();
    sys::cap_copy(slots::SELF_TASK, t, weak, Rights::SEND | Rights::CONTROL, 0).expect("copy");
    check_eq(
        "sched",
        "thread_schedule needs the schedule right",
        sys::thread_schedule(weak, 50, 0).map(|_| ()),
        Err(Error::NoRights),
    );
    check_eq(
        "sched",
        "thread_schedule on a task capability rejected",
        sys::thread_schedule(slots::SELF_TASK, 50, 0).map(|_| ()),
        Err(Error::WrongType),
    );

    // Lower-priority threads run only when we block; among them, higher priority first.
    ORDER.store(0, SeqCst);
    let low = spawn_with_priority(record_order, 1, 40);
    let high = spawn_with_priority(record_order, 2, 60);
    let _ = (low, high);
    check_eq(
        "sched",
        "lower-priority threads wait while we run",
        ORDER.load(SeqCst),
        0,
    );
    let _ = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(20_000)));
    check_eq(
        "sched",
        "when we block, the higher of two waiting priorities runs first",
        ORDER.load(SeqCst),
        0x21,
    );

    // A higher-priority thread woken by IPC preempts at once.
    ORDER.store(0, SeqCst);
    let waiter = go(wait_then_mark, 0);
    sys::thread_yield();
    sys::thread_schedule(waiter, 100, 0).expect("same priority");
    for _ in 0..3 {
        sys::thread_yield();
    }
    let raised = sys::thread_schedule(waiter, 100, 0).is_ok();
    let _ = ipc::send(waiter, tag(1, 0), &[], RECEIVE_2S);
    let after_send = ORDER.load(SeqCst);
    check(
        "sched",
        "a woken thread of equal priority does not preempt the sender",
        raised && after_send == 0,
    );
    for _ in 0..5 {
        sys::thread_yield();
    }
    check_eq("sched", "it runs at the next yield", ORDER.load(SeqCst), 3);

    // thread_switch donates the rest of the slice to a ready thread.
    FLAG.store(false, SeqCst);
    let t = go(set_flag, 9);
    let switched = sys::thread_switch(t);
    check(
        "sched",
        "thread_switch runs the target thread",
        switched.is_ok() && FLAG.load(SeqCst),
    );
    check_eq(
        "sched",
        "thread_switch to a non-thread rejected",
        sys::thread_switch(slots::SELF_TASK),
        Err(Error::WrongType),
    );
}

extern "C" fn wait_then_mark(_: u64) -> ! {
    let _ = ipc::wait(Timeouts::INFINITE);
    ORDER.store(3, SeqCst);
    sys::thread_exit(0)
}

fn spawn_with_priority(entry: extern "C" fn(u64) -> !, argument: u64, priority: u8) -> u64 {
    // Create it stopped, set the priority, then start it.
    let slot = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Thread, slot, 0, 0).expect("thread");
    sys::thread_control(slot, slots::SELF_TASK, alloc_utcb(), slots::PAGER, NO_CAP).expect("bind");
    sys::thread_schedule(slot, priority, 0).expect("priority");
    let stack = alloc::vec![0u64; 1024].leak();
    let top = stack.len() - 2;
    stack[top] = argument;
    stack[top + 1] = entry as *const () as u64;
    let sp = &stack[top] as *const u64 as u64;
    extern "C" {
        fn l4_thread_trampoline();
    }
    sys::ex_regs(
        slot,
        l4_thread_trampoline as *const () as u64,
        sp,
        ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START,
    )
    .expect("start");
    slot
}

// ---- string items

static mut UNTOUCHED_SOURCE: [u8; 3 * 4096] = [0; 3 * 4096];
static mut UNTOUCHED_BUFFER: [u8; 3 * 4096] = [0; 3 * 4096];

pub(crate) fn string_tag(label: i32, untyped: usize, strings: usize) -> MessageTag {
    MessageTag::new(label, untyped, strings)
}

/// Send a string of `argument` bytes (pattern i % 251) with one untyped word.
extern "C" fn send_string(length: u64) -> ! {
    let data: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
    let item = l4::abi::StringItem {
        length,
        address: data.as_ptr() as u64,
    }
    .words();
    let _ = ipc::send(
        slots::SELF_THREAD,
        string_tag(12, 1, 1),
        &[length, item[0], item[1]],
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// Send the untouched static source (first page marked) as a string.
extern "C" fn send_untouched(_: u64) -> ! {
    let address = core::ptr::addr_of!(UNTOUCHED_SOURCE) as u64;
    let item = l4::abi::StringItem {
        length: 3 * 4096,
        address,
    }
    .words();
    let _ = ipc::send(
        slots::SELF_THREAD,
        string_tag(13, 0, 1),
        &item,
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// In a child (agent-like): send a string from the test area (the probing pager maps the
/// marker page there) to the peer.
extern "C" fn child_send_test_area_string() -> ! {
    let item = l4::abi::StringItem {
        length: 64,
        address: page_at(0x700),
    }
    .words();
    let _ = ipc::send(slots::PEER, string_tag(14, 0, 1), &item, Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// The cases of [`string_cases`], in the order it reports them.
pub(crate) const STRING_CASES: &[Case] = &[
    (
        "string",
        "a 5000-byte string item is copied into the receive buffer",
    ),
    (
        "string",
        "a string longer than the buffer is truncated to it, with the length reported",
    ),
    (
        "string",
        "without a receive buffer nothing is copied (length 0)",
    ),
    (
        "string",
        "missing pages in the receive buffer are faulted in first",
    ),
    (
        "string",
        "missing pages in the sender's string are faulted in, then sent",
    ),
    (
        "string",
        "a string from another task, faulted in by its pager",
    ),
    ("string", "string longer than the maximum rejected"),
    ("string", "string in kernel memory rejected"),
    ("string", "more than four strings rejected"),
];

pub(crate) fn string_cases(suite: &Suite) {
    let mut buffer = alloc::vec![0u8; 8192];
    l4::utcb::set_string_buffer(0, &mut buffer);
    let t = go(send_string, 5000);
    let r = ipc::receive(t, RECEIVE_2S);
    let copied = matches!(r, Ok(m) if m.tag.typed() == 1 && m.word(0) == 5000 && l4::abi::StringItem::decode(m.word(1), m.word(2)) == Some(l4::abi::StringItem { length: 5000, address: buffer.as_ptr() as u64 }));
    check(
        "string",
        "a 5000-byte string item is copied into the receive buffer",
        copied && (0..5000).all(|i| buffer[i] == (i % 251) as u8),
    );

    let mut small = alloc::vec![0u8; 100];
    l4::utcb::set_string_buffer(0, &mut small);
    let t = go(send_string, 4096);
    let r = ipc::receive(t, RECEIVE_2S);
    check(
        "string",
        "a string longer than the buffer is truncated to it, with the length reported",
        matches!(r, Ok(m) if m.word(1) >> 12 == 100) && small[99] == 99,
    );

    l4::utcb::clear_string_buffer(0);
    let t = go(send_string, 64);
    let r = ipc::receive(t, RECEIVE_2S);
    check(
        "string",
        "without a receive buffer nothing is copied (length 0)",
        matches!(r, Ok(m) if m.word(1) >> 12 == 0),
    );

    // Missing pages in the receiver's buffer: we fault (through our pager) before the copy.
    // SAFETY: only this thread uses the static, through the kernel's copy.
    let target = unsafe { &mut *core::ptr::addr_of_mut!(UNTOUCHED_BUFFER) };
    l4::utcb::set_string_buffer(0, target);
    let t = go(send_string, 3 * 4096);
    let r = ipc::receive(t, RECEIVE_2S);
    check(
        "string",
        "missing pages in the receive buffer are faulted in first",
        matches!(r, Ok(m) if m.word(1) >> 12 == 3 * 4096)
            && target[3 * 4096 - 1] == ((3 * 4096 - 1) % 251) as u8,
    );

    // Missing pages in the sender's string: it faults, then its IPC is redone.
    l4::utcb::set_string_buffer(0, &mut buffer);
    let t = go(send_untouched, 0);
    let r = ipc::receive(t, RECEIVE_2S);
    check(
        "string",
        "missing pages in the sender's string are faulted in, then sent",
        matches!(r, Ok(m) if m.word(0) >> 12 == 8192),
    );

    // Across address spaces, with the pager of the sender resolving the fault.
    let faults = FAULTS.load(SeqCst);
    let (_, _) = suite.child(
        child_send_test_area_string,
        suite.pager_probe,
        suite.recorder,
        true,
    );
    let r = wait_badge(CHILD_BADGE);
    let marker = u64::from_le_bytes(buffer[..8].try_into().expect("8 bytes"));
    check(
        "string",
        "a string from another task, faulted in by its pager",
        matches!(r, Some(m) if m.word(0) >> 12 == 64)
            && marker == MARKER
            && FAULTS.load(SeqCst) > faults,
    );

    // Hostile strings.
    let s = go(server, 1);
    let too_long = l4::abi::StringItem {
        length: l4::abi::MAX_STRING_LENGTH + 1,
        address: buffer.as_ptr() as u64,
    }
    .words();
    check_eq(
        "string",
        "string longer than the maximum rejected",
        ipc::send(s, string_tag(1, 0, 1), &too_long, POLL),
        Err(err(Error::InvalidArgument, false)),
    );
    let kernel = l4::abi::StringItem {
        length: 8,
        address: 0xffff_8000_0000_0000,
    }
    .words();
    check_eq(
        "string",
        "string in kernel memory rejected",
        ipc::send(s, string_tag(1, 0, 1), &kernel, POLL),
        Err(err(Error::InvalidArgument, false)),
    );
    let item = l4::abi::StringItem {
        length: 8,
        address: buffer.as_ptr() as u64,
    }
    .words();
    let five: Vec<u64> = (0..5).flat_map(|_| item).collect();
    check_eq(
        "string",
        "more than four strings rejected",
        ipc::send(s, string_tag(1, 0, 5), &five, POLL),
        Err(err(Error::InvalidArgument, false)),
    );
    let _ = ipc::call(s, tag(1, 1), &[0], RECEIVE_2S);
    l4::utcb::clear_string_buffer(0);
}

// ---- kernel memory quotas

/// The cases of [`quota_cases`], in the order it reports them.
pub(crate) const QUOTA_CASES: &[Case] = &[
    ("quota", "create a factory with a 64 KiB quota"),
    ("quota", "a factory with an empty quota is rejected"),
    ("quota", "a quota larger than the parent's is refused"),
    (
        "quota",
        "creating threads stops with OutOfMemory when the quota is used up",
    ),
    ("quota", "the exhausted factory refuses a task too"),
    ("quota", "other factories are unaffected"),
    (
        "quota",
        "mapping into a task stops with OutOfMemory when its page tables exceed its quota",
    ),
    (
        "quota",
        "destroying a task returns its kernel memory to the quota",
    ),
    ("quota", "the kernel keeps serving after quota exhaustion"),
];

pub(crate) fn quota_cases() {
    let small = alloc_slot();
    check_eq(
        "quota",
        "create a factory with a 64 KiB quota",
        sys::factory_create(slots::FACTORY, ObjectKind::Factory, small, 64 << 10, 0),
        Ok(()),
    );
    check_eq(
        "quota",
        "a factory with an empty quota is rejected",
        sys::factory_create(slots::FACTORY, ObjectKind::Factory, alloc_slot(), 0, 0),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "quota",
        "a quota larger than the parent's is refused",
        sys::factory_create(
            slots::FACTORY,
            ObjectKind::Factory,
            alloc_slot(),
            1 << 50,
            0,
        ),
        Err(Error::OutOfMemory),
    );

    // Threads until the quota runs out.
    let mut created = 0;
    let last = loop {
        let slot = alloc_slot();
        match sys::factory_create(small, ObjectKind::Thread, slot, 0, 0) {
            Ok(()) => created += 1,
            Err(e) => break e,
        }
        if created > 10_000 {
            break Error::InvalidArgument;
        }
    };
    check(
        "quota",
        "creating threads stops with OutOfMemory when the quota is used up",
        created > 0 && last == Error::OutOfMemory,
    );
    check_eq(
        "quota",
        "the exhausted factory refuses a task too",
        sys::factory_create(small, ObjectKind::Task, alloc_slot(), 0, 0),
        Err(Error::OutOfMemory),
    );
    let fine = alloc_slot();
    check_eq(
        "quota",
        "other factories are unaffected",
        sys::factory_create(slots::FACTORY, ObjectKind::Thread, fine, 0, 0),
        Ok(()),
    );

    // Page tables and mapping nodes of a task are charged to its quota.
    let pages = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Factory, pages, 96 << 10, 0).expect("factory");
    let task = alloc_slot();
    let made = sys::factory_create(pages, ObjectKind::Task, task, 0, 0);
    let page = fresh_page();
    let mut mapped = 0;
    let result = loop {
        // One page per GiB: each needs fresh page tables in the target.
        let destination = TEST_AREA + (mapped as u64) * (1 << 30);
        match sys::map(
            task,
            Fpage::memory(page, 12, Fpage::READ),
            destination,
            MapFlags::empty(),
        ) {
            Ok(()) => mapped += 1,
            Err(e) => break e,
        }
        if mapped > 1000 {
            break Error::InvalidArgument;
        }
    };
    check(
        "quota",
        "mapping into a task stops with OutOfMemory when its page tables exceed its quota",
        made.is_ok() && mapped > 0 && result == Error::OutOfMemory,
    );
    let destroyed = sys::task_destroy(task);
    let again = sys::factory_create(pages, ObjectKind::Task, alloc_slot(), 0, 0);
    check(
        "quota",
        "destroying a task returns its kernel memory to the quota",
        destroyed.is_ok() && again.is_ok(),
    );
    check_eq(
        "quota",
        "the kernel keeps serving after quota exhaustion",
        ipc::wait(POLL).map(|_| ()),
        Err(err(Error::Timeout, true)),
    );
}

// ---- large pages and a fault racing with an unmap

/// Where the root task put our 2 MiB page (module option `superpage`).
pub(crate) const SUPERPAGE: u64 = 0x0000_0800_0000_0000;
pub(crate) const TWO_MIB: u64 = 2 << 20;

static RACE_FAULTS: AtomicU64 = AtomicU64::new(0);

/// The racing pager: the first fault on a page gets a map item for a page the pager has just
/// unmapped from itself (so nothing can be mapped); the second gets a real page.
pub(crate) fn race_fault(page: u64) -> Option<MapItem> {
    let n = RACE_FAULTS.fetch_add(1, SeqCst);
    let local = fresh_page();
    // SAFETY: a fresh page of ours.
    unsafe { core::ptr::write_volatile(local as *mut u64, 0x5ace) };
    if n == 0 {
        // SAFETY: nothing of ours lives in this page any more.
        let _ = unsafe { sys::unmap(Fpage::memory(local, 12, Fpage::RWX), UnmapFlags::SELF) };
    }
    Some(MapItem::map(page, Fpage::memory(local, 12, Fpage::READ)))
}

/// The cases of [`large_page_cases`], in the order it reports them.
pub(crate) const LARGE_PAGE_CASES: &[Case] = &[
    (
        "large",
        "a 2 MiB page from sigma0 is mapped, zeroed and writable",
    ),
    ("large", "a 2 MiB flexpage is mapped into another task"),
    (
        "large",
        "a partial unmap splits the large page: only the 4 KiB page goes",
    ),
    ("large", "the mapper's own large page is untouched"),
    ("large", "unmapping the whole 2 MiB revokes the rest"),
    (
        "large",
        "a 2 MiB flexpage at a misaligned destination rejected",
    ),
    (
        "pagefault",
        "unmap racing with a fault: the thread faults again and gets the new page",
    ),
];

pub(crate) fn large_page_cases(suite: &Suite) {
    // SAFETY: the root task mapped a 2 MiB page here for us.
    let ours =
        |offset: u64| unsafe { core::ptr::read_volatile((SUPERPAGE + offset) as *const u64) };
    // SAFETY: as above.
    let write = |offset: u64, value: u64| unsafe {
        core::ptr::write_volatile((SUPERPAGE + offset) as *mut u64, value)
    };
    let zero = (0..512).all(|i| ours(i * PAGE_SIZE) == 0);
    write(0x10_0000, 0xb16);
    write(0x10_1000, 0xb17);
    check(
        "large",
        "a 2 MiB page from sigma0 is mapped, zeroed and writable",
        zero && ours(0x10_0000) == 0xb16,
    );

    let a = Agent::new(suite);
    let destination = TEST_AREA + 64 * TWO_MIB;
    let mapped = sys::map(
        a.task,
        Fpage::memory(SUPERPAGE, 21, Fpage::READ),
        destination,
        MapFlags::empty(),
    );
    check(
        "large",
        "a 2 MiB flexpage is mapped into another task",
        mapped.is_ok()
            && a.read(destination + 0x10_0000) == 0xb16
            && a.read(destination + TWO_MIB - 8) == 0,
    );
    // SAFETY: only the copy in the agent is revoked.
    let split = unsafe {
        sys::unmap(
            Fpage::memory(SUPERPAGE + 0x10_0000, 12, Fpage::RWX),
            UnmapFlags::empty(),
        )
    };
    check_eq(
        "large",
        "a partial unmap splits the large page: only the 4 KiB page goes",
        (
            split,
            a.read(destination + 0x10_0000),
            a.read(destination + 0x10_1000),
            a.read(destination),
        ),
        (Ok(()), MARKER, 0xb17, 0),
    );
    check_eq(
        "large",
        "the mapper's own large page is untouched",
        (ours(0x10_0000), ours(0x10_1000)),
        (0xb16, 0xb17),
    );
    // SAFETY: as above.
    let all = unsafe {
        sys::unmap(
            Fpage::memory(SUPERPAGE, 21, Fpage::RWX),
            UnmapFlags::empty(),
        )
    };
    check_eq(
        "large",
        "unmapping the whole 2 MiB revokes the rest",
        (all, a.read(destination + 0x10_1000)),
        (Ok(()), MARKER),
    );
    check_eq(
        "large",
        "a 2 MiB flexpage at a misaligned destination rejected",
        sys::map(
            a.task,
            Fpage::memory(SUPERPAGE, 21, Fpage::READ),
            destination + PAGE_SIZE,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    let _ = sys::task_destroy(a.task);

    // A fault whose answer names memory the pager just unmapped: nothing is mapped, the thread
    // faults again, and the second answer is used. No stale mapping survives.
    let race_gate = gate(suite.pager_thread, PAGER_RACE);
    let (task, thread) = suite.child(child_agent, race_gate, suite.recorder, true);
    let agent = Agent { task, thread };
    let value = agent.read(page_at(0x900));
    check_eq(
        "pagefault",
        "unmap racing with a fault: the thread faults again and gets the new page",
        (value, RACE_FAULTS.load(SeqCst)),
        (0x5ace, 2),
    );
    let _ = sys::task_destroy(task);
}

// ---- regressions found in review

/// Receive a call, try a malformed reply (65 words), record the error, then reply properly.
extern "C" fn bad_reply_server(_: u64) -> ! {
    if ipc::wait(Timeouts::INFINITE).is_ok() {
        // SAFETY: raw IPC with an invalid tag: 64 untyped words plus a typed item.
        let (rax, ..) = unsafe { ipc::raw_ipc(Syscall::Reply, 0, 0, 64 | (1 << 7), 0, [0; 4]) };
        VALUE.store(rax, SeqCst);
        let _ = ipc::reply(tag(0, 1), &[7]);
    }
    sys::thread_exit(0)
}

/// Echo a call's untyped words back.
extern "C" fn echo_words_server(_: u64) -> ! {
    if let Ok(m) = ipc::wait(Timeouts::INFINITE) {
        let n = m.tag.untyped();
        let _ = ipc::reply(tag(0, n), &m.words[..n]);
    }
    sys::thread_exit(0)
}

/// Receive a call and try to reply; record the reply's result.
extern "C" fn late_reply_server(_: u64) -> ! {
    if ipc::wait(Timeouts::INFINITE).is_ok() {
        for _ in 0..3 {
            sys::thread_yield();
        }
        let r = ipc::reply(tag(0, 0), &[]);
        VALUE.store(r.map(|_| 0).unwrap_or_else(|e| e.error as u64), SeqCst);
        FLAG.store(true, SeqCst);
    }
    sys::thread_exit(0)
}

/// The cases of [`regression_cases`], in the order it reports them.
pub(crate) const REGRESSION_CASES: &[Case] = &[
    (
        "ipc",
        "a reply with a malformed tag is rejected, the kernel survives",
    ),
    (
        "ipc",
        "a 6-word call arrives whole (words beyond the registers through the UTCB)",
    ),
    (
        "ipc",
        "a call with a zero receive timeout fails at once; the late reply finds no caller",
    ),
];

pub(crate) fn regression_cases() {
    VALUE.store(0, SeqCst);
    let s = go(bad_reply_server, 0);
    sys::thread_yield();
    let r = ipc::call(s, tag(1, 0), &[], RECEIVE_2S);
    check(
        "ipc",
        "a reply with a malformed tag is rejected, the kernel survives",
        VALUE.load(SeqCst) == Error::InvalidArgument as u64 && matches!(r, Ok(m) if m.word(0) == 7),
    );

    let s = go(echo_words_server, 0);
    sys::thread_yield();
    let words = [11, 12, 13, 14, 15, 16];
    let r = ipc::call(s, tag(1, 6), &words, RECEIVE_2S);
    check(
        "ipc",
        "a 6-word call arrives whole (words beyond the registers through the UTCB)",
        matches!(r, Ok(m) if m.tag.untyped() == 6 && m.words[..6] == words),
    );

    FLAG.store(false, SeqCst);
    let s = go(late_reply_server, 0);
    sys::thread_yield();
    let r = ipc::call(
        s,
        tag(1, 0),
        &[],
        Timeouts::new(Timeout::INFINITE, Timeout::ZERO),
    );
    let _ = wait_flag(&FLAG);
    check(
        "ipc",
        "a call with a zero receive timeout fails at once; the late reply finds no caller",
        r.map(|_| ()) == Err(err(Error::Timeout, true))
            && VALUE.load(SeqCst) == Error::NoPartner as u64,
    );
}

// ---- robustness: random syscalls from a hostile task

const FUZZ_ROUNDS: u64 = 20_000;
/// Label and magic word of the fuzzer's final report (its random IPC also reaches us).
const FUZZ_DONE: i32 = 0x7e57;
const FUZZ_MAGIC: u64 = 0x0123_4567_89ab_cdef;

fn fuzz_next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A value that is often interesting: small slots, boundaries, flexpage-like words, garbage.
fn fuzz_value(state: &mut u64) -> u64 {
    let r = fuzz_next(state);
    match r % 8 {
        0 => r >> 56, // small numbers (slots, kinds, flags)
        1 => [0, 1, u64::MAX, u64::MAX - 1, 1 << 47, 0xffff_8000_0000_0000][(r >> 8) as usize % 6],
        2 => {
            Fpage::memory(
                (r >> 20) << 12,
                12 + (r >> 4) as u32 % 40,
                MemoryRights::from_bits_retain(r & 7),
            )
            .0
        }
        3 => Fpage::io((r >> 16) & 0xffff, (r >> 4) as u32 % 17).0,
        4 => {
            Fpage::object(
                (r >> 20) & 0x3ff,
                (r >> 4) as u32 % 11,
                Rights::from_bits_retain(r & 7),
            )
            .0
        }
        5 => TEST_AREA + ((r >> 12) & 0xffff) * PAGE_SIZE,
        6 => (r >> 32) << 32 | (r & 0x7f), // tag-like
        _ => r,
    }
}

/// Issue random syscalls (all but the ones that end the thread or block without a timeout)
/// and report how many ran.
extern "C" fn child_fuzzer() -> ! {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let numbers = [
        1u64, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 22, 23, 24, 25, 26, 0, 27, 99,
    ];
    // (25, VcpuRun, is skipped below; the VM and vCPU creation paths are still fuzzed.)
    let mut done = 0u64;
    for _ in 0..FUZZ_ROUNDS {
        done += 1;
        let number = numbers[(fuzz_next(&mut state) % numbers.len() as u64) as usize];
        let mut a = [0u64; 6];
        for v in a.iter_mut() {
            *v = fuzz_value(&mut state);
        }
        if (1..=5).contains(&number) {
            // IPC: never wait (zero timeouts), any words.
            // SAFETY: raw IPC with hostile arguments; only registers and our UTCB change.
            unsafe {
                ipc::raw_ipc(
                    Syscall::from_u64(number).expect("ipc"),
                    a[0],
                    a[1],
                    a[2],
                    POLL.0,
                    [a[3], a[4], a[5], 0],
                )
            };
        } else if number == 16 {
            // Unmap: never our own mappings (UNMAP_SELF could take our code and stack).
            // SAFETY: revokes only what others derived from us.
            unsafe { sys::raw(16, a[0], 0, 0, 0, 0) };
        } else if (number == 12 && a[0] == slots::SELF_THREAD)
            || (number == 15 && a[0] == slots::SELF_TASK)
        {
            // ex_regs on ourselves could send us anywhere, and mapping into ourselves could
            // replace our own code or stack: the kernel would be fine, but this fuzzer would not.
            continue;
        } else if number == 25 {
            continue; // a vCPU with random state may legitimately run its guest forever
        } else if (number == 14 && a[0] == slots::PEER)
            || (number == 15 && a[3] & l4::abi::MAP_GRANT != 0 && Fpage(a[1]).is_valid_object())
        {
            continue; // keep the capability we report through
        } else {
            // SAFETY: hostile arguments; the kernel must refuse what is invalid.
            unsafe { sys::raw(number, a[0], a[1], a[2], a[3], a[4]) };
        }
    }
    let _ = ipc::send(
        slots::PEER,
        tag(FUZZ_DONE, 2),
        &[done, FUZZ_MAGIC],
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// The cases of [`fuzz_case`], in the order it reports them.
pub(crate) const FUZZ_CASE: &[Case] = &[
    (
        "robustness",
        "20,000 random syscalls from a hostile task leave the kernel running",
    ),
    (
        "quota",
        "the kernel's books balance after the random syscalls, and once their task is gone",
    ),
];

pub(crate) fn fuzz_case(suite: &Suite) {
    // The fuzzer gets a small factory of its own (so creation paths run, within a quota).
    let (task, thread) = suite.child(child_fuzzer, suite.pager_normal, suite.recorder, false);
    let small = alloc_slot();
    let factory = sys::factory_create(slots::FACTORY, ObjectKind::Factory, small, 256 << 10, 0)
        .and_then(|()| sys::cap_copy(task, small, slots::FACTORY, Rights::all(), 0));
    suite.start(thread, child_fuzzer);
    // The fuzzer's random IPC reaches us too: skip it until its report (or two silent
    // seconds).
    let mut result = None;
    for _ in 0..100_000 {
        match ipc::wait(RECEIVE_2S) {
            Ok(m)
                if m.badge == CHILD_BADGE
                    && m.tag.label() == FUZZ_DONE
                    && m.word(1) == FUZZ_MAGIC =>
            {
                result = Some(m.word(0));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    check(
        "robustness",
        "20,000 random syscalls from a hostile task leave the kernel running",
        factory.is_ok()
            && result == Some(FUZZ_ROUNDS)
            && ipc::wait(POLL).map(|_| ()) == Err(err(Error::Timeout, true)),
    );
    let balanced = books_balance();
    let _ = sys::task_destroy(task);
    check(
        "quota",
        "the kernel's books balance after the random syscalls, and once their task is gone",
        balanced && books_balance(),
    );
}

/// Send a string from an untouched page with a 20 ms send timeout; report the result.
extern "C" fn child_string_with_silent_pager() -> ! {
    let item = l4::abi::StringItem {
        length: 64,
        address: SILENT_PAGE,
    }
    .words();
    let r = ipc::send(
        slots::PEER,
        string_tag(16, 0, 1),
        &item,
        Timeouts::new(Timeout::micros(20_000), Timeout::INFINITE),
    );
    let code = match r {
        Ok(()) => 0,
        Err(e) => e.error as u64,
    };
    let _ = ipc::send(slots::PEER, tag(17, 1), &[code], Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// The cases of [`string_timeout_case`], in the order it reports them.
pub(crate) const STRING_TIMEOUT_CASE: &[Case] = &[(
    "string",
    "the IPC timeout bounds a string fault: a pager that never answers makes the send time out",
)];

pub(crate) fn string_timeout_case(suite: &Suite) {
    let silent = gate(suite.pager_thread, PAGER_SILENT);
    let mut buffer = alloc::vec![0u8; 4096];
    l4::utcb::set_string_buffer(0, &mut buffer);
    let (_, _) = suite.child(child_string_with_silent_pager, silent, suite.recorder, true);
    let r = wait_badge(CHILD_BADGE);
    l4::utcb::clear_string_buffer(0);
    check(
        "string",
        "the IPC timeout bounds a string fault: a pager that never answers makes the send time out",
        matches!(r, Some(m) if m.tag.label() == 17 && m.word(0) == Error::Timeout as u64),
    );
}

// ---- objects die with the task that created them

/// The cases of [`ownership_cases`], in the order it reports them.
pub(crate) const OWNERSHIP_CASES: &[Case] = &[
    (
        "task",
        "an IRQ line held by a task's IRQ object is free again once the task is destroyed",
    ),
    (
        "quota",
        "the objects a destroyed task created (thread, gate, VM, vCPU) return their memory",
    ),
];

pub(crate) fn ownership_cases(suite: &Suite) {
    let small = alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Factory, small, 64 << 10, 0).expect("factory");
    let a = Agent::new(suite);
    sys::cap_copy(a.task, small, slots::FACTORY, Rights::all(), 0).expect("factory for the agent");
    sys::cap_copy(a.task, slots::PLATFORM, slots::PLATFORM, Rights::all(), 0)
        .expect("platform for the agent");
    let irq = a.command(
        AGENT_CREATE,
        &[slots::PLATFORM, ObjectKind::Irq as u64, 60, 42],
    );
    let thread = a.command(
        AGENT_CREATE,
        &[slots::FACTORY, ObjectKind::Thread as u64, 61, 0],
    );
    let gate = a.command(
        AGENT_CREATE,
        &[slots::FACTORY, ObjectKind::Gate as u64, 62, 61],
    );
    let vm = a.command(
        AGENT_CREATE,
        &[slots::FACTORY, ObjectKind::Vm as u64, 63, NO_CAP],
    );
    let vcpu = a.command(
        AGENT_CREATE,
        &[slots::FACTORY, ObjectKind::Vcpu as u64, 64, 63],
    );
    let created = [irq, thread, gate, vm, vcpu];
    let taken = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, alloc_slot(), 42, 0);
    let destroyed = sys::task_destroy(a.task);
    let again = alloc_slot();
    let free_again = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, again, 42, 0);
    check(
        "task",
        "an IRQ line held by a task's IRQ object is free again once the task is destroyed",
        irq == 0 && taken == Err(Error::AlreadyBound) && destroyed.is_ok() && free_again.is_ok(),
    );
    // Everything the agent created from `small` was charged to it; all of it came back.
    let whole = sys::factory_create(small, ObjectKind::Factory, alloc_slot(), 64 << 10, 0);
    let vm_ok = if vm == 0 {
        vcpu == 0
    } else {
        vm == Error::NotSupported as u64
    };
    check(
        "quota",
        "the objects a destroyed task created (thread, gate, VM, vCPU) return their memory",
        created[1..3] == [0, 0] && vm_ok && whole.is_ok(),
    );
}

// ---- VM address-space identifiers

/// The ASIDs the CPU offers guests (CPUID Fn8000_000A EBX, less ASID 0, the host's); 0 without
/// SVM.
pub(crate) fn guest_asids() -> u64 {
    use core::arch::x86_64::__cpuid;
    if __cpuid(0x8000_0000).eax < 0x8000_000a || __cpuid(0x8000_0001).ecx & 4 == 0 {
        return 0;
    }
    (__cpuid(0x8000_000a).ebx as u64).saturating_sub(1)
}

/// A fresh agent with our factory creates VMs (slots 100..) until one is refused, at most
/// `limit`; then its task is destroyed. Returns how many it created and the refusal (0: none).
fn agent_creates_vms(suite: &Suite, limit: u64) -> (u64, u64) {
    let a = Agent::new(suite);
    sys::cap_copy(a.task, slots::FACTORY, slots::FACTORY, Rights::all(), 0)
        .expect("factory for the agent");
    let mut result = (limit, 0);
    for i in 0..limit {
        let r = a.command(
            AGENT_CREATE,
            &[slots::FACTORY, ObjectKind::Vm as u64, 100 + i, NO_CAP],
        );
        if r != 0 {
            result = (i, r);
            break;
        }
    }
    sys::task_destroy(a.task).expect("destroy the agent");
    result
}

/// The cases of [`asid_cases`], in the order it reports them.
pub(crate) const ASID_CASES: &[Case] = &[
    (
        "vm",
        "VMs beyond the CPU's ASIDs are refused with OutOfMemory (no wraparound, no panic)",
    ),
    (
        "vm",
        "ASIDs come back when their VMs die: 3 more rounds of all of them, in new tasks",
    ),
];

pub(crate) fn asid_cases(suite: &Suite) {
    let asids = guest_asids();
    // Room for 8 more than the CPU has (bounded: the agent has 512 slots).
    let limit = (asids + 8).min(300);
    let (first, refusal) = agent_creates_vms(suite, limit);
    if asids == 0 {
        // No ASIDs to run out of: every VM creation must fail with NotSupported.
        let beyond =
            "VMs beyond the CPU's ASIDs are refused with OutOfMemory (no wraparound, no panic)";
        let want = (0, Error::NotSupported as u64);
        if (first, refusal) == want {
            skip(
                "vm",
                beyond,
                "without SVM: VM creation fails with NotSupported",
            );
        } else {
            check_eq("vm", beyond, (first, refusal), want);
        }
        skip(
            "vm",
            "ASIDs come back when their VMs die: 3 more rounds of all of them, in new tasks",
            "without SVM: no ASIDs",
        );
        return;
    }
    let bounded = if asids + 8 > limit {
        first == limit
    } else {
        first >= 1 && first <= asids && refusal == Error::OutOfMemory as u64
    };
    println!("# vm: {asids} guest ASIDs, {first} VMs created, then {refusal}");
    check(
        "vm",
        "VMs beyond the CPU's ASIDs are refused with OutOfMemory (no wraparound, no panic)",
        bounded,
    );
    let mut same = true;
    let mut total = 0;
    for _ in 0..3 {
        let (n, r) = agent_creates_vms(suite, limit);
        same &= (n, r) == (first, refusal);
        total += n;
    }
    check(
        "vm",
        "ASIDs come back when their VMs die: 3 more rounds of all of them, in new tasks",
        same && total == 3 * first,
    );
}

// ---- string ranges at the edges of the address space

/// The result of the last recorded string IPC (0: success, else the error code; `u64::MAX`:
/// not done yet).
static STRING_RESULT: AtomicU64 = AtomicU64::new(u64::MAX);
/// The UTCB of the recording sender (set just before it sends).
static STRING_SENDER_UTCB: AtomicU64 = AtomicU64::new(0);
/// Length of the strings the recording threads send.
const EDGE_STRING: u64 = 0x2000;

fn record(r: Result<(), IpcError>) {
    STRING_RESULT.store(r.map_or_else(|e| e.error as u64, |()| 0), SeqCst);
}

/// Wait (bounded) until the recording thread reported.
fn recorded() -> u64 {
    for _ in 0..10_000 {
        let r = STRING_RESULT.load(SeqCst);
        if r != u64::MAX {
            return r;
        }
        sys::thread_yield();
    }
    u64::MAX
}

/// Send an `EDGE_STRING`-byte string (pattern i % 239) after `untyped` untyped words (so with
/// 4 the item lies in the UTCB) to the main thread, with a 1 s send timeout; record the result.
extern "C" fn send_edge_string(untyped: u64) -> ! {
    let data: Vec<u8> = (0..EDGE_STRING).map(|i| (i % 239) as u8).collect();
    let item = l4::abi::StringItem {
        length: EDGE_STRING,
        address: data.as_ptr() as u64,
    }
    .words();
    let mut words = [0u64; 6];
    words[untyped as usize..untyped as usize + 2].copy_from_slice(&item);
    STRING_SENDER_UTCB.store(l4::utcb::address(), SeqCst);
    let r = ipc::send(
        slots::SELF_THREAD,
        string_tag(18, untyped as usize, 1),
        &words[..untyped as usize + 2],
        Timeouts::new(Timeout::micros(1_000_000), Timeout::INFINITE),
    );
    record(r);
    sys::thread_exit(0)
}

/// Answer one call with an `EDGE_STRING`-byte string; record the reply's result.
extern "C" fn reply_edge_string(_: u64) -> ! {
    let data: Vec<u8> = (0..EDGE_STRING).map(|i| (i % 239) as u8).collect();
    let item = l4::abi::StringItem {
        length: EDGE_STRING,
        address: data.as_ptr() as u64,
    }
    .words();
    if ipc::wait(Timeouts::INFINITE).is_ok() {
        record(ipc::reply(string_tag(0, 0, 1), &item));
    }
    sys::thread_exit(0)
}

fn set_buffer_words(address: u64, length: u64) {
    let words = l4::abi::StringItem { length, address }.words();
    l4::utcb::with_utcb(|u| {
        u.br[2] = words[0];
        u.br[3] = words[1];
    });
}

/// Start the recording sender and let it block in its send (we do not receive yet).
fn queued_edge_sender(untyped: u64) -> u64 {
    STRING_RESULT.store(u64::MAX, SeqCst);
    STRING_SENDER_UTCB.store(0, SeqCst);
    let t = go(send_edge_string, untyped);
    for _ in 0..100 {
        sys::thread_yield();
    }
    t
}

/// The cases of [`string_edge_cases`], in the order it reports them.
pub(crate) const STRING_EDGE_CASES: &[Case] = &[
    (
        "string",
        "a receive buffer wrapping around the address space is refused (InvalidArgument)",
    ),
    (
        "string",
        "after a refused buffer, the waiting sender's string reaches a valid one",
    ),
    (
        "string",
        "a receive buffer above the top of user memory (in the UTCB area) is refused",
    ),
    (
        "string",
        "after a refused buffer, the queued sender's string reaches a valid one",
    ),
    (
        "string",
        "a reply into a wrapping receive buffer fails for both (InvalidArgument)",
    ),
    (
        "string",
        "a string item changed in the sender's UTCB after Send checked it is refused at delivery",
    ),
];

pub(crate) fn string_edge_cases() {
    let mut good = alloc::vec![0u8; EDGE_STRING as usize];
    let pattern_ok = |b: &[u8]| b.iter().enumerate().all(|(i, &x)| x == (i % 239) as u8);

    // A buffer that wraps around the top of the address space, the receiver waiting first:
    // its receive fails, the sender is unaffected and delivers into a valid buffer next.
    STRING_RESULT.store(u64::MAX, SeqCst);
    set_buffer_words(0xffff_ffff_ffff_f000, 0x2000);
    let t = go(send_edge_string, 0);
    let bad = ipc::receive(t, RECEIVE_2S).map(|m| m.word(0));
    l4::utcb::set_string_buffer(0, &mut good);
    let r = ipc::receive(t, RECEIVE_2S);
    let delivered = matches!(r, Ok(m) if m.word(0) >> 12 == EDGE_STRING) && pattern_ok(&good);
    check_eq(
        "string",
        "a receive buffer wrapping around the address space is refused (InvalidArgument)",
        bad,
        Err(err(Error::InvalidArgument, true)),
    );
    check(
        "string",
        "after a refused buffer, the waiting sender's string reaches a valid one",
        delivered && recorded() == 0,
    );

    // A buffer in the kernel-managed area at the top of user space (our own UTCB page), the
    // sender queued first.
    good.fill(0);
    let t = queued_edge_sender(0);
    let utcb = l4::utcb::address();
    set_buffer_words(utcb + 0x100, 0x100);
    let bad = ipc::receive(t, RECEIVE_2S).map(|m| m.word(0));
    l4::utcb::set_string_buffer(0, &mut good);
    let r = ipc::receive(t, RECEIVE_2S);
    let delivered = matches!(r, Ok(m) if m.word(0) >> 12 == EDGE_STRING) && pattern_ok(&good);
    check_eq(
        "string",
        "a receive buffer above the top of user memory (in the UTCB area) is refused",
        bad,
        Err(err(Error::InvalidArgument, true)),
    );
    check(
        "string",
        "after a refused buffer, the queued sender's string reaches a valid one",
        delivered && recorded() == 0,
    );

    // A reply into a wrapping buffer: the call fails, and so does the reply.
    STRING_RESULT.store(u64::MAX, SeqCst);
    let s = go(reply_edge_string, 0);
    set_buffer_words(0xffff_ffff_ffff_f000, 0x2000);
    let bad = ipc::call(s, tag(1, 1), &[0], RECEIVE_2S).map(|m| m.word(0));
    check_eq(
        "string",
        "a reply into a wrapping receive buffer fails for both (InvalidArgument)",
        (bad, recorded()),
        (
            Err(err(Error::InvalidArgument, true)),
            Error::InvalidArgument as u64,
        ),
    );

    // The sender's item lies in its UTCB (after 4 untyped words): changing it while the
    // sender waits must not get past the check `Send` made (here: a range that wraps around).
    // The sender's IPC fails; it exits, so our closed receive ends with DeadPartner.
    let mut buffer = alloc::vec![0u8; EDGE_STRING as usize];
    l4::utcb::set_string_buffer(0, &mut buffer);
    let t = queued_edge_sender(4);
    let sender_utcb = STRING_SENDER_UTCB.load(SeqCst) as *mut l4::abi::Utcb;
    let hostile = l4::abi::StringItem {
        length: EDGE_STRING,
        address: 0xffff_ffff_ffff_f000,
    }
    .words();
    if !sender_utcb.is_null() {
        // SAFETY: the sender's UTCB is mapped in our task; it is blocked in its send.
        unsafe {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sender_utcb).mr[4]), hostile[0]);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*sender_utcb).mr[5]), hostile[1]);
        }
    }
    let r = ipc::receive(t, RECEIVE_2S).map(|m| m.word(4) >> 12);
    let (sender, copied) = (recorded(), buffer.iter().filter(|&&b| b != 0).count());
    if r != Err(err(Error::DeadPartner, true))
        || sender != Error::InvalidArgument as u64
        || copied != 0
    {
        println!("# string: changed item: receive {r:?}, sender {sender}, {copied} non-zero bytes received");
    }
    check(
        "string",
        "a string item changed in the sender's UTCB after Send checked it is refused at delivery",
        r == Err(err(Error::DeadPartner, true))
            && sender == Error::InvalidArgument as u64
            && copied == 0,
    );
    l4::utcb::clear_string_buffer(0);
}
