//! Object lifetime: deleting the last capability of an object destroys it and returns exactly
//! its bytes to the factory it came from; copies keep it alive; a vCPU keeps its VM; a task
//! dies with the last capability other tasks hold to it (in steps), its own do not count.

use crate::hostile::{books_balance, used};
use crate::mechanisms::{guest_asids, SUPERPAGE};
use crate::support::{child_block, go, tag, Suite, RECEIVE_2S};
use crate::tap::{check, check_eq, skip, Case};
use alloc::vec::Vec;
use l4::abi::{
    slots, Error, Fpage, ObjectKind, Rights, Timeout, Timeouts, NO_CAP, PAGE_SIZE, UTCB_AREA,
};
use l4::abi::{MapFlags, UnmapFlags};
use l4::ipc;
use l4::thread::alloc_slot;
use l4::{println, sys};

/// Answers every message with its badge (word 0), forever.
extern "C" fn badge_echo(_: u64) -> ! {
    let mut m = ipc::wait(Timeouts::INFINITE);
    loop {
        m = match m {
            Ok(r) => ipc::reply_wait(tag(0, 1), &[r.badge], Timeouts::INFINITE),
            Err(_) => ipc::wait(Timeouts::INFINITE),
        };
    }
}

/// Call through `slot` (2 s at most): the badge the echo thread saw, or the error.
fn call_badge(slot: u64) -> Result<u64, Error> {
    ipc::call(slot, tag(0, 0), &[], RECEIVE_2S)
        .map(|m| m.word(0))
        .map_err(|e| e.error)
}

/// Yield until `done` holds, at most `yields` times.
pub(crate) fn yield_until(done: impl Fn() -> bool, yields: u32) -> bool {
    for _ in 0..yields {
        if done() {
            return true;
        }
        sys::thread_yield();
    }
    done()
}

/// A task's destruction after its last capability went goes in steps at the end of syscalls:
/// yield until `factory`'s use is `want` (at most `yields` times); returns the use.
pub(crate) fn settle_at(factory: u64, want: u64, yields: u32) -> u64 {
    yield_until(|| used(factory) == want, yields);
    used(factory)
}

/// The cases of [`lifetime_cases`], in the order it reports them.
pub(crate) const LIFETIME_CASES: &[Case] = &[
    ("lifetime", "a factory for the lifetime cases"),
    ("lifetime", "deleting the last capability of a gate returns exactly its bytes to its factory"),
    ("lifetime", "deleting the last capability of a never-bound thread returns exactly its bytes to its factory"),
    ("lifetime", "deleting the last capability of a sub-factory returns exactly its bytes to its factory"),
    ("lifetime", "deleting the last capability of a task returns exactly its bytes to its factory"),
    ("lifetime", "deleting the last capability of an IRQ object frees its line for a new one"),
    ("lifetime", "an IRQ attached to a never-bound thread can be attached anew once the thread died with its last capability"),
    ("lifetime", "deleting a gate's copy keeps it alive: IPC through the original still works, its bytes stay charged"),
    ("lifetime", "after its last capability is deleted, IPC to the gate fails with InvalidCapability and its bytes are back"),
    ("lifetime", "deleting the original also deletes its copies (derived): the gate is destroyed with them"),
    ("lifetime", "a granted gate capability keeps the gate alive in its new slot until it is deleted there"),
    ("lifetime", "unmapping a thread's only capability with UNMAP_SELF destroys the never-bound thread"),
    ("lifetime", "a sub-factory whose capability is deleted keeps its quota while a gate is charged to it, and returns it with the gate"),
    ("lifetime", "a VM whose capability is deleted stays while its vCPU lives; deleting the vCPU frees both"),
    ("lifetime", "a VM with 2,048 mappings is destroyed in bounded steps after its capability goes, then gives back every byte"),
    ("lifetime", "deleting our capability to a running child task destroys it (its own SELF_TASK does not count) and gives back every byte it held"),
    ("lifetime", "a task's capabilities to itself do not count: deleting a copy of SELF_TASK leaves it running"),
    ("lifetime", "the kernel's books balance after the lifetime cases"),
];

pub(crate) fn lifetime_cases(suite: &Suite) {
    let factory = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 1 << 20, 0);
    check_eq("lifetime", "a factory for the lifetime cases", made, Ok(()));
    let echo = go(badge_echo, 0);

    // Each kind: create, delete the only capability, the factory is back where it was.
    let kinds = [
        (ObjectKind::Gate, echo, "gate"),
        (ObjectKind::Thread, 0, "never-bound thread"),
        (ObjectKind::Factory, 4096, "sub-factory"),
        (ObjectKind::Task, 0, "task"),
    ];
    for (kind, argument, name) in kinds {
        let slot = alloc_slot();
        let before = used(factory);
        let created = sys::factory_create(factory, kind, slot, argument, 0);
        let charged = used(factory) - before;
        let deleted = sys::cap_delete(slot);
        let after = settle_at(factory, before, 200);
        check_eq(
            "lifetime",
            &alloc::format!(
                "deleting the last capability of a {name} returns exactly its bytes to its factory"
            ),
            (
                created,
                charged > 0,
                deleted,
                after,
                sys::quota_check(factory, true).map(|q| q.1),
            ),
            (Ok(()), true, Ok(()), before, Ok(0)),
        );
    }

    // IRQ objects are charged nothing: their line is free again.
    let (irq, again) = (alloc_slot(), alloc_slot());
    let first = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, 58, 0);
    let taken = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, again, 58, 0);
    let deleted = sys::cap_delete(irq);
    let free = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, again, 58, 0);
    let _ = sys::cap_delete(again);
    check_eq(
        "lifetime",
        "deleting the last capability of an IRQ object frees its line for a new one",
        (first, taken, deleted, free),
        (Ok(()), Err(Error::AlreadyBound), Ok(()), Ok(())),
    );

    // An IRQ's receiver does not keep its thread; a destroyed receiver no longer holds the IRQ.
    let (irq, receiver) = (alloc_slot(), alloc_slot());
    let made = sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, 57, 0)
        .and_then(|()| sys::factory_create(factory, ObjectKind::Thread, receiver, 0, 0))
        .and_then(|()| sys::irq_control(irq, l4::abi::IrqOp::Attach, receiver));
    let busy = sys::irq_control(irq, l4::abi::IrqOp::Attach, slots::SELF_THREAD);
    let deleted = sys::cap_delete(receiver);
    let attached = sys::irq_control(irq, l4::abi::IrqOp::Attach, slots::SELF_THREAD);
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Detach, 0);
    let _ = sys::cap_delete(irq);
    check_eq(
        "lifetime",
        "an IRQ attached to a never-bound thread can be attached anew once the thread died with its last capability",
        (made, busy, deleted, attached),
        (Ok(()), Err(Error::AlreadyBound), Ok(()), Ok(())),
    );

    // Copies: the gate lives while any capability names it; its copies go with the original.
    let (original, copy) = (alloc_slot(), alloc_slot());
    let before = used(factory);
    let created = sys::factory_create(factory, ObjectKind::Gate, original, echo, 5);
    let gate_bytes = used(factory) - before;
    let copied = sys::cap_copy(slots::SELF_TASK, original, copy, Rights::all(), 0);
    let both = (call_badge(original), call_badge(copy));
    let copy_deleted = sys::cap_delete(copy);
    let kept = (call_badge(original), used(factory) - before);
    let deleted = sys::cap_delete(original);
    let gone = (call_badge(original), used(factory) - before);
    check_eq(
        "lifetime",
        "deleting a gate's copy keeps it alive: IPC through the original still works, its bytes stay charged",
        (created, copied, both, copy_deleted, kept),
        (Ok(()), Ok(()), (Ok(5), Ok(5)), Ok(()), (Ok(5), gate_bytes)),
    );
    check_eq(
        "lifetime",
        "after its last capability is deleted, IPC to the gate fails with InvalidCapability and its bytes are back",
        (deleted, gone),
        (Ok(()), (Err(Error::InvalidCapability), 0)),
    );
    let created = sys::factory_create(factory, ObjectKind::Gate, original, echo, 6);
    let copied = sys::cap_copy(slots::SELF_TASK, original, copy, Rights::all(), 0);
    let deleted = sys::cap_delete(original);
    check_eq(
        "lifetime",
        "deleting the original also deletes its copies (derived): the gate is destroyed with them",
        (
            created,
            copied,
            deleted,
            call_badge(copy),
            used(factory) - before,
        ),
        (Ok(()), Ok(()), Ok(()), Err(Error::InvalidCapability), 0),
    );
    // Granting moves the capability: the gate lives on in the new slot.
    let moved = alloc_slot();
    let created = sys::factory_create(factory, ObjectKind::Gate, original, echo, 7);
    let granted = sys::map(
        slots::SELF_TASK,
        Fpage::object(original, 0, Rights::all()),
        moved,
        MapFlags::GRANT,
    );
    let after_grant = (call_badge(original), call_badge(moved));
    let deleted = sys::cap_delete(moved);
    check_eq(
        "lifetime",
        "a granted gate capability keeps the gate alive in its new slot until it is deleted there",
        (
            created,
            granted,
            after_grant,
            deleted,
            used(factory) - before,
        ),
        (
            Ok(()),
            Ok(()),
            (Err(Error::InvalidCapability), Ok(7)),
            Ok(()),
            0,
        ),
    );
    // Unmap with UNMAP_SELF of an object flexpage removes (and counts) the capability too.
    let created = sys::factory_create(factory, ObjectKind::Thread, original, 0, 0);
    // SAFETY: the flexpage names one capability slot of ours, no memory.
    let unmapped =
        unsafe { sys::unmap(Fpage::object(original, 0, Rights::all()), UnmapFlags::SELF) };
    check_eq(
        "lifetime",
        "unmapping a thread's only capability with UNMAP_SELF destroys the never-bound thread",
        (created, unmapped, used(factory) - before),
        (Ok(()), Ok(()), 0),
    );

    // A sub-factory with objects still charged to it keeps its quota until they are gone.
    let sub = alloc_slot();
    let gate_slot = alloc_slot();
    let created = sys::factory_create(factory, ObjectKind::Factory, sub, 8192, 0)
        .and_then(|()| sys::factory_create(sub, ObjectKind::Gate, gate_slot, echo, 9));
    let deleted = sys::cap_delete(sub);
    let held = (used(factory) - before, call_badge(gate_slot));
    let gate_deleted = sys::cap_delete(gate_slot);
    check_eq(
        "lifetime",
        "a sub-factory whose capability is deleted keeps its quota while a gate is charged to it, and returns it with the gate",
        (created, deleted, held, gate_deleted, used(factory) - before),
        (Ok(()), Ok(()), (8192, Ok(9)), Ok(()), 0),
    );

    // A vCPU keeps its VM.
    if guest_asids() > 0 {
        let (vm, vcpu) = (alloc_slot(), alloc_slot());
        let created = sys::factory_create(factory, ObjectKind::Vm, vm, NO_CAP, 0)
            .and_then(|()| sys::factory_create(factory, ObjectKind::Vcpu, vcpu, vm, 0));
        let with_both = used(factory) - before;
        let vm_deleted = sys::cap_delete(vm);
        let kept = used(factory) - before;
        let vcpu_deleted = sys::cap_delete(vcpu);
        check_eq(
            "lifetime",
            "a VM whose capability is deleted stays while its vCPU lives; deleting the vCPU frees both",
            (created, vm_deleted, kept == with_both && kept > 0, vcpu_deleted, used(factory) - before),
            (Ok(()), Ok(()), true, Ok(()), 0),
        );
    } else {
        skip("lifetime", "a VM whose capability is deleted stays while its vCPU lives; deleting the vCPU frees both", "without SVM: no VM and vCPU");
    }

    // A VM with thousands of mappings is destroyed in bounded steps after its last capability
    // goes: the deletion returns before anything is refunded, and later syscalls finish it.
    if guest_asids() > 0 {
        const PAGES: u64 = 2048;
        let vm = alloc_slot();
        let created = sys::factory_create(factory, ObjectKind::Vm, vm, NO_CAP, 0);
        let mut mapped = 0;
        for i in 0..PAGES {
            let source = Fpage::memory(SUPERPAGE + (i % 512) * PAGE_SIZE, 12, Fpage::RWX);
            if created.is_ok() && sys::map(vm, source, i * PAGE_SIZE, MapFlags::empty()).is_ok() {
                mapped += 1;
            }
        }
        let with_vm = used(factory) - before;
        let deleted = sys::cap_delete(vm);
        let right_after = used(factory) - before;
        let after = settle_at(factory, before, 5_000) - before;
        check_eq(
            "lifetime",
            "a VM with 2,048 mappings is destroyed in bounded steps after its capability goes, then gives back every byte",
            (created, mapped, deleted, right_after == with_vm && with_vm > 0, after),
            (Ok(()), PAGES, Ok(()), true, 0),
        );
    } else {
        skip("lifetime", "a VM with 2,048 mappings is destroyed in bounded steps after its capability goes, then gives back every byte", "without SVM: no VM destroyed in steps");
    }

    // A child task dies with our capability to it; its own SELF_TASK does not keep it.
    let child_factory = alloc_slot();
    let made = sys::factory_create(
        slots::FACTORY,
        ObjectKind::Factory,
        child_factory,
        1 << 20,
        0,
    );
    let mut rounds = Vec::with_capacity(3);
    for _ in 0..3 {
        let (task, thread) = (alloc_slot(), alloc_slot());
        let created = sys::factory_create(child_factory, ObjectKind::Task, task, 0, 0)
            .and_then(|()| sys::factory_create(child_factory, ObjectKind::Thread, thread, 0, 0))
            .and_then(|()| sys::thread_control(thread, task, UTCB_AREA, suite.pager_normal, NO_CAP))
            .and_then(|()| sys::cap_copy(task, task, slots::SELF_TASK, Rights::all(), 0))
            .and_then(|()| l4::child::start(thread, child_block));
        // It runs: it takes our message (then exits; the task lives on until we let it go).
        let ran = ipc::send(
            thread,
            tag(0, 0),
            &[],
            Timeouts::new(Timeout::micros(2_000_000), Timeout::INFINITE),
        );
        let deleted = sys::cap_delete(task);
        let _ = sys::cap_delete(thread);
        let after = settle_at(child_factory, 0, 200);
        rounds.push((created, ran.map_err(|e| e.error), deleted, after));
    }
    println!("# child tasks: {rounds:?}");
    check(
        "lifetime",
        "deleting our capability to a running child task destroys it (its own SELF_TASK does not count) and gives back every byte it held",
        made.is_ok() && rounds.iter().all(|r| *r == (Ok(()), Ok(()), Ok(()), 0)),
    );
    let own = alloc_slot();
    let copied = sys::cap_copy(slots::SELF_TASK, slots::SELF_TASK, own, Rights::all(), 0);
    let deleted = sys::cap_delete(own);
    check_eq(
        "lifetime",
        "a task's capabilities to itself do not count: deleting a copy of SELF_TASK leaves it running",
        (copied, deleted, sys::quota(slots::SELF_TASK).err()),
        (Ok(()), Ok(()), Some(Error::WrongType)),
    );
    check(
        "lifetime",
        "the kernel's books balance after the lifetime cases",
        books_balance(),
    );
}
