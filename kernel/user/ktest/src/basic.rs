//! The basic cases: the KIP, syscall and capability decoding, factories, threads,
//! scheduling, IPC, and tasks with their page faults and mappings.

use crate::support::{
    child_block, child_capabilities, child_echo, child_read_mapped, child_touch_test_area,
    child_write_mapped, closed_wait_record, err, exit_now, gate, go, l4_tsc, new_thread_slot,
    raw_error, receive_and_die, record_message, send_four, send_long, send_through, server,
    set_flag, spinner, tag, wait_badge, wait_flag, yield_then_exit, Suite, CHILD_BADGE, COUNTER,
    DEATH_BADGE, FAULTS, FLAG, LAST_ACCESS, LAST_FAULT, MAP_ADDRESS, POLL, RECEIVE_2S, STOP,
    TEST_AREA, VALUE,
};
use crate::tap::{check, check_eq, Case};
use alloc::vec::Vec;
use core::sync::atomic::Ordering::SeqCst;
use l4::abi::MapFlags;
use l4::abi::{
    slots, Error, ExRegsFlags, FaultAccess, Fpage, MessageTag, ObjectKind, Rights, Syscall,
    Timeout, Timeouts, ABI_VERSION, KIP_MAGIC, LABEL_DEATH, NO_CAP, UTCB_AREA,
};
use l4::child::fresh_page;
use l4::ipc;
use l4::thread::{alloc_slot, alloc_utcb};
use l4::{println, sys};

/// The cases of [`kip_cases`], in the order it reports them.
pub(crate) const KIP_CASES: &[Case] = &[
    ("kip", "magic and ABI version"),
    ("kip", "timer frequency published"),
    ("kip", "boot modules listed with command lines"),
];

pub(crate) fn kip_cases() {
    let kip = l4::kip::kip();
    check(
        "kip",
        "magic and ABI version",
        kip.magic == KIP_MAGIC && kip.version == ABI_VERSION,
    );
    check("kip", "timer frequency published", kip.timer_hz == 1000);
    let modules = &kip.modules[..kip.module_count as usize];
    check(
        "kip",
        "boot modules listed with command lines",
        modules.len() >= 3 && modules.iter().any(|m| m.cmdline().contains("ktest")),
    );
}

/// The cases of [`syscall_cases`], in the order it reports them.
pub(crate) const SYSCALL_CASES: &[Case] = &[
    ("syscall", "unknown number rejected"),
    ("syscall", "number zero rejected"),
    ("syscall", "debug write from unmapped memory rejected"),
    ("syscall", "debug write from kernel memory rejected"),
    ("syscall", "debug write over 256 bytes rejected"),
    ("syscall", "debug write with wrapping range rejected"),
];

pub(crate) fn syscall_cases() {
    // SAFETY: unknown syscalls do nothing.
    let (rax, ..) = unsafe { sys::raw(999, 0, 0, 0, 0, 0) };
    check_eq(
        "syscall",
        "unknown number rejected",
        raw_error(rax),
        Some(Error::UnknownSyscall),
    );
    // SAFETY: as above.
    let (rax, ..) = unsafe { sys::raw(0, 0, 0, 0, 0, 0) };
    check_eq(
        "syscall",
        "number zero rejected",
        raw_error(rax),
        Some(Error::UnknownSyscall),
    );
    // SAFETY: the kernel validates the pointer; nothing of ours is touched.
    let (rax, ..) = unsafe { sys::raw(Syscall::DebugWrite as u64, 0x10, 8, 0, 0, 0) };
    check_eq(
        "syscall",
        "debug write from unmapped memory rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
    // SAFETY: as above.
    let (rax, ..) = unsafe {
        sys::raw(
            Syscall::DebugWrite as u64,
            0xffff_8000_0010_0000,
            8,
            0,
            0,
            0,
        )
    };
    check_eq(
        "syscall",
        "debug write from kernel memory rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
    let long = [b'x'; 300];
    check_eq(
        "syscall",
        "debug write over 256 bytes rejected",
        sys::debug_write(&long),
        Err(Error::InvalidArgument),
    );
    // SAFETY: as above (the range wraps around).
    let (rax, ..) = unsafe { sys::raw(Syscall::DebugWrite as u64, u64::MAX - 4, 8, 0, 0, 0) };
    check_eq(
        "syscall",
        "debug write with wrapping range rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
}

/// The cases of [`capability_cases`], in the order it reports them.
pub(crate) const CAPABILITY_CASES: &[Case] = &[
    ("cap", "empty slot is invalid"),
    ("cap", "slot beyond the table is invalid"),
    ("cap", "huge slot number is invalid"),
    ("cap", "wrong object kind rejected"),
    ("cap", "copy with fewer rights cannot control"),
    ("cap", "rights cannot grow back"),
    ("cap", "copy into occupied slot rejected"),
    ("cap", "badge cannot be re-minted"),
    ("cap", "delete succeeds"),
    ("cap", "deleted capability is gone"),
    ("cap", "double delete rejected"),
];

pub(crate) fn capability_cases() {
    check_eq(
        "cap",
        "empty slot is invalid",
        sys::ex_regs(200, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "cap",
        "slot beyond the table is invalid",
        sys::ex_regs(10_000, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "cap",
        "huge slot number is invalid",
        sys::ex_regs(u64::MAX - 1, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "cap",
        "wrong object kind rejected",
        sys::ex_regs(slots::SELF_TASK, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::WrongType),
    );
    let send_only = alloc_slot();
    sys::cap_copy(
        slots::SELF_TASK,
        slots::SELF_THREAD,
        send_only,
        Rights::SEND | Rights::COPY,
        0,
    )
    .expect("copy");
    check_eq(
        "cap",
        "copy with fewer rights cannot control",
        sys::ex_regs(send_only, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::NoRights),
    );
    let no_copy = alloc_slot();
    sys::cap_copy(slots::SELF_TASK, send_only, no_copy, Rights::SEND, 0).expect("copy");
    let again = alloc_slot();
    check_eq(
        "cap",
        "rights cannot grow back",
        sys::cap_copy(slots::SELF_TASK, no_copy, again, Rights::all(), 0),
        Err(Error::NoRights),
    );
    check_eq(
        "cap",
        "copy into occupied slot rejected",
        sys::cap_copy(
            slots::SELF_TASK,
            slots::SELF_THREAD,
            send_only,
            Rights::all(),
            0,
        ),
        Err(Error::SlotOccupied),
    );
    let badged = alloc_slot();
    sys::cap_copy(
        slots::SELF_TASK,
        slots::SELF_THREAD,
        badged,
        Rights::all(),
        5,
    )
    .expect("mint");
    let rebadged = alloc_slot();
    check_eq(
        "cap",
        "badge cannot be re-minted",
        sys::cap_copy(slots::SELF_TASK, badged, rebadged, Rights::all(), 6),
        Err(Error::InvalidArgument),
    );
    check_eq("cap", "delete succeeds", sys::cap_delete(send_only), Ok(()));
    check_eq(
        "cap",
        "deleted capability is gone",
        sys::ex_regs(send_only, 0, 0, ExRegsFlags::empty()).map(|_| ()),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "cap",
        "double delete rejected",
        sys::cap_delete(send_only),
        Err(Error::InvalidCapability),
    );
}

/// The cases of [`factory_cases`], in the order it reports them.
pub(crate) const FACTORY_CASES: &[Case] = &[
    ("factory", "create thread"),
    ("factory", "create into occupied slot rejected"),
    ("factory", "unknown object kind rejected"),
    ("factory", "factories cannot be created"),
    ("factory", "non-factory capability rejected"),
    ("factory", "gate needs a thread to bind"),
    ("factory", "slot beyond the table rejected"),
];

pub(crate) fn factory_cases() {
    let slot = alloc_slot();
    check_eq(
        "factory",
        "create thread",
        sys::factory_create(slots::FACTORY, ObjectKind::Thread, slot, 0, 0),
        Ok(()),
    );
    check_eq(
        "factory",
        "create into occupied slot rejected",
        sys::factory_create(slots::FACTORY, ObjectKind::Thread, slot, 0, 0),
        Err(Error::SlotOccupied),
    );
    // SAFETY: raw syscall with an invalid kind.
    let (rax, ..) = unsafe {
        sys::raw(
            Syscall::FactoryCreate as u64,
            slots::FACTORY,
            99,
            alloc_slot(),
            0,
            0,
        )
    };
    check_eq(
        "factory",
        "unknown object kind rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
    check_eq(
        "factory",
        "factories cannot be created",
        sys::factory_create(slots::FACTORY, ObjectKind::Factory, alloc_slot(), 0, 0),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "factory",
        "non-factory capability rejected",
        sys::factory_create(slots::SELF_TASK, ObjectKind::Thread, alloc_slot(), 0, 0),
        Err(Error::WrongType),
    );
    check_eq(
        "factory",
        "gate needs a thread to bind",
        sys::factory_create(
            slots::FACTORY,
            ObjectKind::Gate,
            alloc_slot(),
            slots::SELF_TASK,
            0,
        ),
        Err(Error::WrongType),
    );
    check_eq(
        "factory",
        "slot beyond the table rejected",
        sys::factory_create(slots::FACTORY, ObjectKind::Thread, 100_000, 0, 0),
        Err(Error::InvalidArgument),
    );
}

/// The cases of [`thread_cases`], in the order it reports them.
pub(crate) const THREAD_CASES: &[Case] = &[
    ("thread", "UTCB outside the UTCB area rejected"),
    ("thread", "unaligned UTCB rejected"),
    ("thread", "UTCB on a used page rejected"),
    ("thread", "starting an unbound thread rejected"),
    ("thread", "pager must be an IPC capability"),
    ("thread", "bind to task"),
    ("thread", "binding twice rejected"),
    ("thread", "ex_regs reads back instruction and stack pointer"),
    ("thread", "kernel-half instruction pointer rejected"),
    ("thread", "unknown ex_regs flag rejected"),
    ("thread", "a started thread runs"),
    ("thread", "128 threads in one task all run and send"),
];

pub(crate) fn thread_cases() {
    let t = new_thread_slot();
    check_eq(
        "thread",
        "UTCB outside the UTCB area rejected",
        sys::thread_control(t, slots::SELF_TASK, 0x10_0000, NO_CAP, NO_CAP),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "thread",
        "unaligned UTCB rejected",
        sys::thread_control(t, slots::SELF_TASK, UTCB_AREA + 0x1_0008, NO_CAP, NO_CAP),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "thread",
        "UTCB on a used page rejected",
        sys::thread_control(t, slots::SELF_TASK, UTCB_AREA, NO_CAP, NO_CAP),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "thread",
        "starting an unbound thread rejected",
        sys::ex_regs(t, 0x40_1000, 0, ExRegsFlags::SET_IP | ExRegsFlags::START).map(|_| ()),
        Err(Error::NotBound),
    );
    check_eq(
        "thread",
        "pager must be an IPC capability",
        sys::thread_control(t, NO_CAP, 0, slots::SELF_TASK, NO_CAP),
        Err(Error::WrongType),
    );
    check_eq(
        "thread",
        "bind to task",
        sys::thread_control(t, slots::SELF_TASK, alloc_utcb(), slots::PAGER, NO_CAP),
        Ok(()),
    );
    check_eq(
        "thread",
        "binding twice rejected",
        sys::thread_control(t, slots::SELF_TASK, alloc_utcb(), NO_CAP, NO_CAP),
        Err(Error::AlreadyBound),
    );
    let set = sys::ex_regs(
        t,
        0x40_2000,
        0x1234_5000,
        ExRegsFlags::SET_IP | ExRegsFlags::SET_SP,
    );
    let read = sys::ex_regs(t, 0, 0, ExRegsFlags::empty());
    check(
        "thread",
        "ex_regs reads back instruction and stack pointer",
        set.is_ok() && matches!(read, Ok((0x40_2000, 0x1234_5000, _))),
    );
    check_eq(
        "thread",
        "kernel-half instruction pointer rejected",
        sys::ex_regs(t, 0xffff_8000_0000_0000, 0, ExRegsFlags::SET_IP).map(|_| ()),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "thread",
        "unknown ex_regs flag rejected",
        sys::ex_regs(t, 0, 0, ExRegsFlags::from_bits_retain(1 << 20)).map(|_| ()),
        Err(Error::InvalidArgument),
    );

    FLAG.store(false, SeqCst);
    go(set_flag, 0xabc);
    check(
        "thread",
        "a started thread runs",
        wait_flag(&FLAG) && VALUE.load(SeqCst) == 0xabc,
    );

    // 128 threads in one task, each sending its index.
    let mut seen = [false; 128];
    for i in 0..128u64 {
        go(send_three_word_index, i);
    }
    let mut received = 0;
    for _ in 0..128 {
        match ipc::wait(RECEIVE_2S) {
            Ok(m)
                if m.tag.label() == 11
                    && (m.word(0) as usize) < 128
                    && m.word(1) == m.word(0) + 1 =>
            {
                seen[m.word(0) as usize] = true;
                received += 1;
            }
            Ok(m) => println!("# unexpected label {}", m.tag.label()),
            Err(e) => {
                println!("# 128 threads: {e:?}");
                break;
            }
        }
    }
    check_eq(
        "thread",
        "128 threads in one task all run and send",
        (received, seen.iter().all(|&s| s)),
        (128, true),
    );
}

extern "C" fn send_three_word_index(index: u64) -> ! {
    let _ = ipc::send(
        slots::SELF_THREAD,
        tag(11, 2),
        &[index, index + 1],
        Timeouts::INFINITE,
    );
    sys::thread_exit(0)
}

/// The cases of [`scheduling_cases`], in the order it reports them.
pub(crate) const SCHEDULING_CASES: &[Case] = &[
    (
        "sched",
        "a spinning thread does not starve others (timer preemption)",
    ),
    ("sched", "yield lets a thread of equal priority run"),
];

pub(crate) fn scheduling_cases() {
    FLAG.store(false, SeqCst);
    STOP.store(false, SeqCst);
    COUNTER.store(0, SeqCst);
    go(spinner, 0);
    // Block with a timeout: the spinner runs meanwhile; the timer must bring us back.
    let r = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(30_000)));
    let spun = COUNTER.load(SeqCst);
    check(
        "sched",
        "a spinning thread does not starve others (timer preemption)",
        r.map(|_| ()) == Err(err(Error::Timeout, true)) && spun > 0,
    );
    let before = COUNTER.load(SeqCst);
    for _ in 0..3 {
        sys::thread_yield();
    }
    check(
        "sched",
        "yield lets a thread of equal priority run",
        COUNTER.load(SeqCst) > before,
    );
    STOP.store(true, SeqCst);
    for _ in 0..10 {
        sys::thread_yield();
    }
}

/// The cases of [`ipc_cases`], in the order it reports them.
pub(crate) const IPC_CASES: &[Case] = &[
    ("ipc", "send/receive of 4 words in registers (closed wait)"),
    ("ipc", "64-word message through the UTCB"),
    ("ipc", "call and reply"),
    ("ipc", "reply-and-wait serves successive calls"),
    ("ipc", "open wait tells senders apart by gate badge"),
    ("ipc", "closed wait receives only from the named thread"),
    ("ipc", "send with zero timeout to a thread not waiting"),
    ("ipc", "receive with zero timeout and no sender"),
    ("ipc", "finite receive timeout expires"),
    (
        "ipc",
        "finite send timeout expires (receiver waits for another thread)",
    ),
    ("ipc", "ex_regs cancels a blocked receive"),
    ("ipc", "send to a dead thread fails"),
    ("ipc", "closed receive from a dead thread fails"),
    ("ipc", "closed wait ends when the partner dies"),
    ("ipc", "call fails when the callee dies before replying"),
    ("ipc", "reply without a pending caller"),
    ("ipc", "tag with more than 64 words rejected"),
    ("ipc", "tag with reserved bits rejected"),
    ("ipc", "map item with malformed flexpage rejected"),
    ("ipc", "map item naming kernel memory rejected"),
    ("ipc", "gate delivers to its bound thread with its badge"),
    ("ipc", "send without the send right rejected"),
    ("ipc", "send through a task capability rejected"),
    ("ipc", "closed wait on a gate rejected"),
    ("ipc", "send through an empty slot rejected"),
];

pub(crate) fn ipc_cases() {
    // Short message in registers, closed receive from the sender.
    let t = go(send_four, 5);
    let r = ipc::receive(t, RECEIVE_2S);
    check(
        "ipc",
        "send/receive of 4 words in registers (closed wait)",
        matches!(r, Ok(m) if m.tag.label() == 7 && m.tag.untyped() == 4 && m.words[..4] == [5, 10, 15, 20] && m.badge == 0),
    );

    let t = go(send_long, 1000);
    let r = ipc::receive(t, RECEIVE_2S);
    let ok = matches!(r, Ok(m) if m.tag.untyped() == 64 && (0..64).all(|i| m.word(i) == 1000 + i as u64));
    check("ipc", "64-word message through the UTCB", ok);

    let s = go(server, 1);
    let r = ipc::call(s, tag(1, 1), &[41], RECEIVE_2S);
    check(
        "ipc",
        "call and reply",
        matches!(r, Ok(m) if m.word(0) == 42),
    );

    let s = go(server, 3);
    let mut ok = true;
    for i in 0..3u64 {
        let r = ipc::call(s, tag(1, 1), &[i * 10], RECEIVE_2S);
        ok &= matches!(r, Ok(m) if m.word(0) == i * 10 + 1);
    }
    check("ipc", "reply-and-wait serves successive calls", ok);

    // Open wait identifies senders by badge.
    let g1 = gate(slots::SELF_THREAD, 0x11);
    let g2 = gate(slots::SELF_THREAD, 0x22);
    go(send_through, g1 << 32 | 1);
    go(send_through, g2 << 32 | 2);
    let mut badges = Vec::new();
    for _ in 0..2 {
        if let Ok(m) = ipc::wait(RECEIVE_2S) {
            badges.push((m.badge, m.word(0)));
        }
    }
    badges.sort();
    check_eq(
        "ipc",
        "open wait tells senders apart by gate badge",
        badges,
        alloc::vec![(0x11, 1), (0x22, 2)],
    );

    // Closed wait takes only the named partner, whatever arrived first.
    let a = go(send_through, slots::SELF_THREAD << 32 | 0xa);
    sys::thread_yield();
    let b = go(send_through, slots::SELF_THREAD << 32 | 0xb);
    sys::thread_yield();
    let from_b = ipc::receive(b, RECEIVE_2S);
    let from_a = ipc::receive(a, RECEIVE_2S);
    check(
        "ipc",
        "closed wait receives only from the named thread",
        matches!((from_b, from_a), (Ok(x), Ok(y)) if x.word(0) == 0xb && y.word(0) == 0xa),
    );

    // Timeouts.
    let idle = new_thread_slot();
    sys::thread_control(idle, slots::SELF_TASK, alloc_utcb(), NO_CAP, NO_CAP).expect("bind");
    check_eq(
        "ipc",
        "send with zero timeout to a thread not waiting",
        ipc::send(idle, tag(1, 0), &[], POLL),
        Err(err(Error::Timeout, false)),
    );
    check_eq(
        "ipc",
        "receive with zero timeout and no sender",
        ipc::wait(POLL).map(|_| ()),
        Err(err(Error::Timeout, true)),
    );
    let start = l4_tsc();
    let r = ipc::wait(Timeouts::new(Timeout::INFINITE, Timeout::micros(5_000)));
    check(
        "ipc",
        "finite receive timeout expires",
        r.map(|_| ()) == Err(err(Error::Timeout, true)) && l4_tsc() > start,
    );
    // A thread in a closed wait for someone else does not take our message.
    FLAG.store(false, SeqCst);
    STOP.store(false, SeqCst);
    let other = new_thread_slot();
    sys::thread_control(other, slots::SELF_TASK, alloc_utcb(), NO_CAP, NO_CAP).expect("bind");
    let waiter = go(closed_wait_record, other);
    wait_flag(&FLAG);
    sys::thread_yield();
    let r = ipc::send(
        waiter,
        tag(1, 0),
        &[],
        Timeouts::new(Timeout::micros(5_000), Timeout::INFINITE),
    );
    check_eq(
        "ipc",
        "finite send timeout expires (receiver waits for another thread)",
        r,
        Err(err(Error::Timeout, false)),
    );
    // ex_regs cancel ends that wait.
    let cancel = sys::ex_regs(waiter, 0, 0, ExRegsFlags::CANCEL);
    let done = wait_flag(&STOP);
    check(
        "ipc",
        "ex_regs cancels a blocked receive",
        cancel.is_ok() && done && VALUE.load(SeqCst) == Error::Canceled as u64,
    );

    // Dead partners.
    let dead = go(exit_now, 0);
    for _ in 0..5 {
        sys::thread_yield();
    }
    check_eq(
        "ipc",
        "send to a dead thread fails",
        ipc::send(dead, tag(1, 0), &[], RECEIVE_2S),
        Err(err(Error::DeadPartner, false)),
    );
    check_eq(
        "ipc",
        "closed receive from a dead thread fails",
        ipc::receive(dead, RECEIVE_2S).map(|_| ()),
        Err(err(Error::DeadPartner, true)),
    );
    let dying = go(yield_then_exit, 0);
    check_eq(
        "ipc",
        "closed wait ends when the partner dies",
        ipc::receive(dying, RECEIVE_2S).map(|_| ()),
        Err(err(Error::DeadPartner, true)),
    );
    let quitter = go(receive_and_die, 0);
    check_eq(
        "ipc",
        "call fails when the callee dies before replying",
        ipc::call(quitter, tag(1, 0), &[], RECEIVE_2S).map(|_| ()),
        Err(err(Error::DeadPartner, true)),
    );
    check_eq(
        "ipc",
        "reply without a pending caller",
        ipc::reply(tag(0, 0), &[]),
        Err(err(Error::NoPartner, false)),
    );

    // Malformed messages.
    let server_thread = go(server, 1);
    // SAFETY: raw IPC with an invalid tag (65 untyped words).
    let (rax, ..) = unsafe { ipc::raw_ipc(Syscall::Send, server_thread, 0, 65, POLL.0, [0; 4]) };
    check_eq(
        "ipc",
        "tag with more than 64 words rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
    // SAFETY: raw IPC with reserved tag bits.
    let (rax, ..) =
        unsafe { ipc::raw_ipc(Syscall::Send, server_thread, 0, 1 << 20, POLL.0, [0; 4]) };
    check_eq(
        "ipc",
        "tag with reserved bits rejected",
        raw_error(rax),
        Some(Error::InvalidArgument),
    );
    let bad_item = [0u64, Fpage::memory(0x1000, 11, Fpage::RWX).0];
    check_eq(
        "ipc",
        "map item with malformed flexpage rejected",
        ipc::send(server_thread, MessageTag::new(0, 0, 1), &bad_item, POLL),
        Err(err(Error::InvalidArgument, false)),
    );
    let kernel_item = [0u64, Fpage::memory(0xffff_8000_0000_0000, 12, Fpage::RWX).0];
    check_eq(
        "ipc",
        "map item naming kernel memory rejected",
        ipc::send(server_thread, MessageTag::new(0, 0, 1), &kernel_item, POLL),
        Err(err(Error::InvalidArgument, false)),
    );
    let _ = ipc::call(server_thread, tag(1, 1), &[0], RECEIVE_2S);

    // Gates deliver to their thread with their badge.
    FLAG.store(false, SeqCst);
    let receiver = go(record_message, 0);
    let g = gate(receiver, 0x5151);
    sys::thread_yield();
    let sent = ipc::send(g, tag(1, 1), &[9], RECEIVE_2S);
    check(
        "ipc",
        "gate delivers to its bound thread with its badge",
        sent.is_ok() && wait_flag(&FLAG) && VALUE.load(SeqCst) == (0x5151 << 32 | 9),
    );

    let no_send = alloc_slot();
    sys::cap_copy(slots::SELF_TASK, receiver, no_send, Rights::CONTROL, 0).expect("copy");
    check_eq(
        "ipc",
        "send without the send right rejected",
        ipc::send(no_send, tag(1, 0), &[], POLL),
        Err(err(Error::NoRights, false)),
    );
    check_eq(
        "ipc",
        "send through a task capability rejected",
        ipc::send(slots::SELF_TASK, tag(1, 0), &[], POLL),
        Err(err(Error::WrongType, false)),
    );
    check_eq(
        "ipc",
        "closed wait on a gate rejected",
        ipc::receive(g, POLL).map(|_| ()),
        Err(err(Error::WrongType, true)),
    );
    check_eq(
        "ipc",
        "send through an empty slot rejected",
        ipc::send(300, tag(1, 0), &[], POLL),
        Err(err(Error::InvalidCapability, false)),
    );
}

/// The cases of [`task_cases`], in the order it reports them.
pub(crate) const TASK_CASES: &[Case] = &[
    ("task", "call and reply between address spaces"),
    (
        "pagefault",
        "a new task's code and stack fault in through its pager",
    ),
    ("task", "IPC to an exited thread of another task fails"),
    (
        "pagefault",
        "refused fault kills the thread and notifies its handler",
    ),
    ("pagefault", "the killed thread is dead"),
    (
        "pagefault",
        "pager sees fault address; refusal reported with it",
    ),
    (
        "pagefault",
        "a thread without pager is killed on its first fault",
    ),
    ("map", "memory mapped into another task is shared"),
    (
        "map",
        "rights only shrink: write to a read-only mapping faults",
    ),
    (
        "map",
        "a writable mapping writes through to the mapper's page",
    ),
    ("map", "mapping into the kernel-managed area rejected"),
    ("map", "mapping beyond the user half rejected"),
    ("map", "mapping at address zero rejected"),
    ("map", "mapping with a misaligned destination rejected"),
    ("map", "malformed flexpage rejected"),
    ("cap", "a task cannot use capabilities it was not given"),
    ("task", "destroy a task"),
    ("task", "threads of a destroyed task are gone"),
    ("task", "a destroyed task's capability is stale"),
    ("task", "a task cannot destroy itself"),
];

pub(crate) fn task_cases(suite: &Suite) {
    // Cross-address-space call/reply; the child's pages come from our pager thread.
    let faults_before = FAULTS.load(SeqCst);
    let (_, child_thread) = suite.child(child_echo, suite.pager_normal, NO_CAP, true);
    let call = wait_badge(CHILD_BADGE);
    let ok = matches!(call, Some(m) if m.tag.label() == 1 && m.word(0) == 42);
    let replied = ipc::reply(tag(0, 1), &[43]).is_ok();
    let result = wait_badge(CHILD_BADGE);
    check(
        "task",
        "call and reply between address spaces",
        ok && replied && matches!(result, Some(m) if m.tag.label() == 2 && m.word(0) == 1043),
    );
    check(
        "pagefault",
        "a new task's code and stack fault in through its pager",
        FAULTS.load(SeqCst) >= faults_before + 2,
    );
    for _ in 0..5 {
        sys::thread_yield();
    }
    check_eq(
        "task",
        "IPC to an exited thread of another task fails",
        ipc::send(child_thread, tag(1, 0), &[], POLL),
        Err(err(Error::DeadPartner, false)),
    );

    // A refused fault kills the thread; the death notice reaches its exception handler.
    let (_, t) = suite.child(child_echo, suite.pager_refusing, suite.death, true);
    let notice = wait_badge(DEATH_BADGE);
    check(
        "pagefault",
        "refused fault kills the thread and notifies its handler",
        matches!(notice, Some(m) if m.tag.label() == LABEL_DEATH && m.word(0) == l4::abi::death::FAULT_REFUSED),
    );
    check_eq(
        "pagefault",
        "the killed thread is dead",
        ipc::receive(t, POLL).map(|_| ()),
        Err(err(Error::DeadPartner, true)),
    );

    let (_, _) = suite.child(child_touch_test_area, suite.pager_normal, suite.death, true);
    let notice = wait_badge(DEATH_BADGE);
    check(
        "pagefault",
        "pager sees fault address; refusal reported with it",
        matches!(notice, Some(m) if m.word(1) == TEST_AREA) && LAST_FAULT.load(SeqCst) == TEST_AREA,
    );

    let (_, _) = suite.child(child_echo, NO_CAP, suite.death, true);
    let notice = wait_badge(DEATH_BADGE);
    check(
        "pagefault",
        "a thread without pager is killed on its first fault",
        matches!(notice, Some(m) if m.word(0) == l4::abi::death::NO_PAGER),
    );

    // Explicit mapping into another task.
    let page = fresh_page();
    // SAFETY: a page of ours.
    unsafe { core::ptr::write_volatile(page as *mut u64, 0xfeed_f00d) };
    let (task, thread) = suite.child(child_read_mapped, suite.pager_normal, suite.death, false);
    let mapped = sys::map(
        task,
        Fpage::memory(page, 12, Fpage::READ),
        MAP_ADDRESS,
        MapFlags::empty(),
    );
    suite.start(thread, child_read_mapped);
    let r = wait_badge(CHILD_BADGE);
    check(
        "map",
        "memory mapped into another task is shared",
        mapped.is_ok() && matches!(r, Some(m) if m.word(0) == 0xfeed_f00d),
    );

    let (task, thread) = suite.child(child_write_mapped, suite.pager_normal, suite.death, false);
    let mapped = sys::map(
        task,
        Fpage::memory(page, 12, Fpage::READ | Fpage::WRITE),
        MAP_ADDRESS,
        MapFlags::empty(),
    );
    let _ = mapped;
    let (task2, thread2) = suite.child(child_write_mapped, suite.pager_normal, suite.death, false);
    let read_only = sys::map(
        task2,
        Fpage::memory(page, 12, Fpage::READ),
        MAP_ADDRESS,
        MapFlags::empty(),
    );
    suite.start(thread2, child_write_mapped);
    let notice = wait_badge(DEATH_BADGE);
    check(
        "map",
        "rights only shrink: write to a read-only mapping faults",
        read_only.is_ok()
            && matches!(notice, Some(m) if m.word(1) == MAP_ADDRESS)
            && FaultAccess::from_bits_retain(LAST_ACCESS.load(SeqCst))
                == FaultAccess::WRITE | FaultAccess::PRESENT,
    );
    // The writable mapping works and the write is visible to us.
    suite.start(thread, child_write_mapped);
    let r = wait_badge(CHILD_BADGE);
    // SAFETY: our page.
    let seen = unsafe { core::ptr::read_volatile(page as *const u64) };
    check(
        "map",
        "a writable mapping writes through to the mapper's page",
        matches!(r, Some(m) if m.tag.label() == 5) && seen == 7,
    );
    let _ = task;

    check_eq(
        "map",
        "mapping into the kernel-managed area rejected",
        sys::map(
            task2,
            Fpage::memory(page, 12, Fpage::READ),
            l4::abi::KIP_ADDRESS,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "map",
        "mapping beyond the user half rejected",
        sys::map(
            task2,
            Fpage::memory(page, 12, Fpage::READ),
            l4::abi::USER_END,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "map",
        "mapping at address zero rejected",
        sys::map(
            task2,
            Fpage::memory(page, 12, Fpage::READ),
            0,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "map",
        "mapping with a misaligned destination rejected",
        sys::map(
            task2,
            Fpage::memory(page, 12, Fpage::READ),
            MAP_ADDRESS + 8,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );
    check_eq(
        "map",
        "malformed flexpage rejected",
        sys::map(
            task2,
            Fpage(page | 0xc00 | (12 << 4)),
            MAP_ADDRESS,
            MapFlags::empty(),
        ),
        Err(Error::InvalidArgument),
    );

    // Capabilities a task was not given.
    let (_, _) = suite.child(child_capabilities, suite.pager_normal, suite.death, true);
    let r = wait_badge(CHILD_BADGE);
    let ic = Error::InvalidCapability as u64;
    check(
        "cap",
        "a task cannot use capabilities it was not given",
        matches!(r, Some(m) if m.words[..3] == [ic, ic, ic]),
    );

    // Destroying a task kills its threads.
    let (victim, victim_thread) = suite.child(child_block, suite.pager_normal, NO_CAP, true);
    for _ in 0..5 {
        sys::thread_yield();
    }
    check_eq("task", "destroy a task", sys::task_destroy(victim), Ok(()));
    check_eq(
        "task",
        "threads of a destroyed task are gone",
        ipc::send(victim_thread, tag(1, 0), &[], POLL),
        Err(err(Error::InvalidCapability, false)),
    );
    check_eq(
        "task",
        "a destroyed task's capability is stale",
        sys::task_destroy(victim),
        Err(Error::InvalidCapability),
    );
    check_eq(
        "task",
        "a task cannot destroy itself",
        sys::task_destroy(slots::SELF_TASK),
        Err(Error::InvalidArgument),
    );
}
