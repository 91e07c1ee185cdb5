//! Hostile cases against kernel memory: floods of VM mappings and object creation that must end
//! in OutOfMemory (never a kernel panic) and give every byte back, guest mappings of the
//! kernel area, and map/unmap/grant/create cycles that must never raise what a quota has left;
//! each checked against the kernel's own books (`QuotaCheck`).

use crate::lifetime::{settle_at, yield_until};
use crate::mechanisms::{guest_asids, Agent, AGENT_CAP_COPY, AGENT_CREATE};
use crate::support::{err, go, tag, Suite, POLL, TEST_AREA};
use crate::tap::{check, check_eq, skip, Case};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{
    slots, Error, Fpage, ObjectKind, Rights, Syscall, Timeout, Timeouts, NO_CAP, PAGE_SIZE,
    UTCB_AREA,
};
use l4::abi::{MapFlags, UnmapFlags};
use l4::child::fresh_page;
use l4::ipc;
use l4::thread::alloc_slot;
use l4::{println, sys};

/// Where a hostile child holds the 2 MiB page it floods a VM with.
const FLOOD_SOURCE: u64 = 0x0000_0a00_0000_0000;
/// Where we put the 2 MiB page from our parent's RAM service (module option `ram=2M`; the
/// superpage has been split by the large-page cases: it maps as 512 small pages by now).
const FLOOD_RAM: u64 = 0x0000_0b00_0000_0000;
/// Child commands (labels of the call that starts one; the reply is `[count, error code]`).
const HOSTILE_VM_FLOOD: i32 = 1;
const HOSTILE_CREATE_LOOP: i32 = 2;
/// At most this many rounds of a flood (far more than any quota or the heap allows).
const FLOOD_ROUNDS: u64 = 4_000_000;
/// Rounds of a create/delete loop: each object dies with its last capability, so the loop
/// never runs out of memory. Two names in [`HOSTILE_CASES`] spell it out.
const CREATE_ROUNDS: u64 = 100_000;
/// A flood's call waits at most a minute for its reply.
const FLOOD_WAIT: Timeouts = Timeouts::new(Timeout::INFINITE, Timeout::micros(60_000_000));

/// Whether the kernel's books balance (every quota, task and VM; see `QuotaCheck`).
pub(crate) fn books_balance() -> bool {
    match sys::quota_check(slots::FACTORY, true) {
        Ok((_, 0)) => true,
        other => {
            println!("# quota check: {other:?}");
            false
        }
    }
}

pub(crate) fn used(factory: u64) -> u64 {
    sys::quota(factory).map_or(u64::MAX, |q| q.used)
}

/// A hostile child: runs one flood on its factory (slot FACTORY) when called, replies with
/// how many rounds succeeded, the error that ended them and how much its factory's use grew,
/// then waits forever (its objects live until the task is destroyed).
extern "C" fn child_hostile() -> ! {
    let Ok(m) = ipc::wait(Timeouts::INFINITE) else {
        sys::thread_exit(1)
    };
    let before = used(slots::FACTORY);
    let (count, error) = match m.tag.label() {
        HOSTILE_VM_FLOOD => vm_flood(),
        HOSTILE_CREATE_LOOP => create_loop(m.word(0)),
        _ => (0, u64::MAX),
    };
    let grown = used(slots::FACTORY).wrapping_sub(before);
    let _ = ipc::reply(tag(0, 3), &[count, error, grown]);
    let _ = ipc::wait(Timeouts::INFINITE);
    sys::thread_exit(0)
}

/// Map the 2 MiB page at FLOOD_SOURCE into a new VM at ever new guest-physical addresses.
fn vm_flood() -> (u64, u64) {
    let vm = 20;
    if let Err(e) = sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, NO_CAP, 0) {
        return (0, e as u64);
    }
    for i in 0..FLOOD_ROUNDS {
        if let Err(e) = sys::map(
            vm,
            Fpage::memory(FLOOD_SOURCE, 21, Fpage::RWX),
            i << 21,
            MapFlags::empty(),
        ) {
            return (i, e as u64);
        }
    }
    (FLOOD_ROUNDS, 0)
}

/// Create objects of `kind` (gates bound to a thread of ours) and delete their capability,
/// CREATE_ROUNDS times (the receiver thread is made first, so the factory's use must not
/// grow during the loop).
fn create_loop(kind: u64) -> (u64, u64) {
    let (receiver, slot) = (20, 21);
    if let Err(e) = sys::factory_create(slots::FACTORY, ObjectKind::Thread, receiver, 0, 0) {
        return (0, e as u64);
    }
    let Some(kind) = ObjectKind::from_u64(kind) else {
        return (0, u64::MAX);
    };
    let start = used(slots::FACTORY);
    for i in 0..CREATE_ROUNDS {
        if let Err(e) = sys::factory_create(slots::FACTORY, kind, slot, receiver, 0) {
            return (i, e as u64);
        }
        if let Err(e) = sys::cap_delete(slot) {
            return (i, e as u64);
        }
        if i % 1_000 == 999 && used(slots::FACTORY) != start {
            return (i, u64::MAX - 1);
        }
    }
    let _ = sys::cap_delete(receiver);
    (CREATE_ROUNDS, 0)
}

/// Start a hostile child with `factory` as its FACTORY (and our 2 MiB page `source`, if any,
/// at FLOOD_SOURCE),
/// run one flood (`label`, `argument`), check the books while its objects live, destroy it.
/// Returns `(rounds, error code, books balanced, factory used afterwards, growth of the
/// factory's use during the flood)`.
fn flood(
    suite: &Suite,
    factory: u64,
    source: Option<u64>,
    label: i32,
    argument: u64,
) -> (u64, u64, bool, u64, u64) {
    let (task, thread) = suite.child(child_hostile, suite.pager_normal, suite.recorder, false);
    let given =
        sys::cap_copy(task, factory, slots::FACTORY, Rights::all(), 0).and_then(
            |()| match source {
                Some(page) => sys::map(
                    task,
                    Fpage::memory(page, 21, Fpage::RWX),
                    FLOOD_SOURCE,
                    MapFlags::empty(),
                ),
                None => Ok(()),
            },
        );
    suite.start(thread, child_hostile);
    let reply = ipc::call(thread, tag(label, 1), &[argument], FLOOD_WAIT);
    let balanced = books_balance();
    println!(
        "# flood {label}/{argument}: {:?}, destroying its task",
        reply.map(|m| (m.word(0), m.word(1)))
    );
    let _ = sys::task_destroy(task);
    match (given, reply) {
        (Ok(()), Ok(m)) => (m.word(0), m.word(1), balanced, used(factory), m.word(2)),
        (given, reply) => {
            println!("# flood: {given:?} {:?}", reply.map(|_| ()));
            (0, u64::MAX, balanced, used(factory), u64::MAX)
        }
    }
}

fn quota_check_cases() {
    let parent = used(slots::FACTORY);
    let small = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, small, 64 << 10, 0);
    check_eq(
        "quota",
        "QuotaCheck reads a factory's quota: a new 64 KiB factory has 0 of 64 KiB used, carved from its parent",
        (made, sys::quota(small), used(slots::FACTORY) - parent),
        (Ok(()), Ok(sys::QuotaState { used: 0, limit: 64 << 10 }), 64 << 10),
    );
    check_eq(
        "quota",
        "QuotaCheck refuses a capability that is no factory, and unknown flags",
        (
            sys::quota(slots::SELF_TASK),
            sys::quota(alloc_slot()),
            call_quota_check(small, 2),
        ),
        (
            Err(Error::WrongType),
            Err(Error::InvalidCapability),
            Err(Error::InvalidArgument),
        ),
    );
    check(
        "quota",
        "the kernel's books balance: every quota's use is what is held for it",
        books_balance(),
    );
}

fn call_quota_check(factory: u64, flags: u64) -> Result<(), Error> {
    // SAFETY: QuotaCheck changes no state.
    let (rax, ..) = unsafe { sys::raw(Syscall::QuotaCheck as u64, factory, flags, 0, 0, 0) };
    if rax == 0 {
        Ok(())
    } else {
        Err(Error::from_u64(rax).unwrap_or(Error::InvalidArgument))
    }
}

/// The cases of [`hostile_cases`], in the order it reports them.
pub(crate) const HOSTILE_CASES: &[Case] = &[
    ("quota", "QuotaCheck reads a factory's quota: a new 64 KiB factory has 0 of 64 KiB used, carved from its parent"),
    ("quota", "QuotaCheck refuses a capability that is no factory, and unknown flags"),
    ("quota", "the kernel's books balance: every quota's use is what is held for it"),
    ("vm", "mapping one 2 MiB page at ever new guest-physical addresses ends in OutOfMemory from Map, no panic"),
    ("quota", "the books balance with a VM flooded to the kernel heap's reserve"),
    ("quota", "destroying the flooding VM's creator gives its factory back every byte"),
    ("quota", "creating and deleting gates 100000 times never grows the factory's use"),
    ("quota", "the books balance after a create/delete loop of gates"),
    ("quota", "destroying the creator of the gates gives its factory back every byte"),
    ("quota", "creating and deleting threads 100000 times never grows the factory's use"),
    ("quota", "the books balance after a create/delete loop of threads"),
    ("quota", "destroying the creator of the threads gives its factory back every byte"),
    ("vm", "the KIP and a UTCB map nothing into a VM: no mapping node, no nested page table charged"),
    ("quota", "unmapping the unrecorded KIP and UTCB with UNMAP_SELF after mapping them into a VM raises no quota"),
    ("vm", "a VM pager that exits while a guest page fault waits for it: VcpuRun returns the NPF exit, the VMM thread lives"),
    ("quota", "map, grant and unmap cycles through two tasks leave the quota where the first cycle did"),
    ("quota", "creating a task with a bound thread and a mapping and destroying it gives its factory back every byte"),
    ("quota", "two tasks holding each other's capability die with the task that made them: every byte back"),
    ("quota", "the books balance while a task of 200 threads dies in steps, and its factory gets every byte back"),
    ("quota", "the kernel's books balance after the hostile cases"),
];

pub(crate) fn hostile_cases(suite: &Suite) {
    quota_check_cases();
    // One factory larger than the kernel heap (8 MiB) for every flood: the heap bound, not
    // the quota, has to stop them.
    let big = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, big, 16 << 20, 0);
    // The VM flood gets a quota below the heap bound: see the report (mapping-database
    // revocation collects what it removes, which a heap at its reserve cannot hold).
    let vm_factory = alloc_slot();
    let vm_made = sys::factory_create(
        slots::FACTORY,
        ObjectKind::Factory,
        vm_factory,
        256 << 10,
        0,
    );
    let ram = l4::parent::request_ram(FLOOD_RAM, 2 << 20);
    if let Err(e) = &ram {
        println!("# no 2 MiB page from the parent: {e}");
    }
    if guest_asids() > 0 {
        let (rounds, error, balanced, after, _) =
            flood(suite, vm_factory, Some(FLOOD_RAM), HOSTILE_VM_FLOOD, 0);
        println!("# vm flood: {rounds} mappings of 2 MiB, then {error}");
        check("vm", "mapping one 2 MiB page at ever new guest-physical addresses ends in OutOfMemory from Map, no panic", vm_made.is_ok() && ram.is_ok() && rounds > 512 && error == Error::OutOfMemory as u64);
        check(
            "quota",
            "the books balance with a VM flooded to the kernel heap's reserve",
            balanced,
        );
        check_eq(
            "quota",
            "destroying the flooding VM's creator gives its factory back every byte",
            after,
            0,
        );
    } else {
        skip("vm", "mapping one 2 MiB page at ever new guest-physical addresses ends in OutOfMemory from Map, no panic", "without SVM: no VM to flood");
        skip(
            "quota",
            "the books balance with a VM flooded to the kernel heap's reserve",
            "without SVM: no VM flood",
        );
        skip(
            "quota",
            "destroying the flooding VM's creator gives its factory back every byte",
            "without SVM: no VM flood",
        );
    }
    for (kind, name) in [(ObjectKind::Gate, "gates"), (ObjectKind::Thread, "threads")] {
        let (rounds, error, balanced, after, grown) =
            flood(suite, big, None, HOSTILE_CREATE_LOOP, kind as u64);
        println!("# {name}: {rounds} created and their capability deleted, then {error}, use grew by {grown}");
        // Deleting the last capability destroys the object: the loop runs to its end with
        // the factory's use unchanged after every round.
        check_eq(
            "quota",
            &alloc::format!(
                "creating and deleting {name} {CREATE_ROUNDS} times never grows the factory's use"
            ),
            (made, rounds, error, grown),
            (Ok(()), CREATE_ROUNDS, 0, 0),
        );
        check(
            "quota",
            &alloc::format!("the books balance after a create/delete loop of {name}"),
            balanced,
        );
        check_eq(
            "quota",
            &alloc::format!(
                "destroying the creator of the {name} gives its factory back every byte"
            ),
            after,
            0,
        );
    }
    kernel_area_cases(suite);
    vm_pager_death_case();
    cycle_cases(suite);
    check(
        "quota",
        "the kernel's books balance after the hostile cases",
        books_balance(),
    );
}

/// The KIP and UTCB pages are the kernel's: never mapped into a VM, and revoking them changes
/// no quota.
fn kernel_area_cases(suite: &Suite) {
    let _ = suite;
    if guest_asids() == 0 {
        skip("vm", "the KIP and a UTCB map nothing into a VM: no mapping node, no nested page table charged", "without SVM: no VM for the kernel area");
        skip("quota", "unmapping the unrecorded KIP and UTCB with UNMAP_SELF after mapping them into a VM raises no quota", "without SVM: no VM for the kernel area");
        return;
    }
    let factory = alloc_slot();
    let vm = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 64 << 10, 0)
        .and_then(|()| sys::factory_create(factory, ObjectKind::Vm, vm, NO_CAP, 0));
    let before = (used(factory), used(slots::FACTORY));
    let kip = Fpage::memory(l4::abi::KIP_ADDRESS, 12, Fpage::RWX);
    let utcb = Fpage::memory(UTCB_AREA, 12, Fpage::RWX);
    let mapped = (
        sys::map(vm, kip, 0, MapFlags::empty()),
        sys::map(vm, utcb, 0x1000, MapFlags::empty()),
    );
    let after_map = (used(factory), used(slots::FACTORY));
    check_eq(
        "vm",
        "the KIP and a UTCB map nothing into a VM: no mapping node, no nested page table charged",
        (made, mapped, after_map),
        (Ok(()), (Ok(()), Ok(())), before),
    );
    // SAFETY: the kernel area is never unmapped from a task: nothing of ours goes.
    let revoked = unsafe {
        (
            sys::unmap(kip, UnmapFlags::SELF),
            sys::unmap(utcb, UnmapFlags::SELF),
        )
    };
    check_eq(
        "quota",
        "unmapping the unrecorded KIP and UTCB with UNMAP_SELF after mapping them into a VM raises no quota",
        (revoked, (used(factory), used(slots::FACTORY))),
        ((Ok(()), Ok(())), before),
    );
}

/// Map/unmap, grant and create/destroy cycles: after one round (which may leave page tables),
/// every further round ends with the quota exactly where the previous one did.
fn cycle_cases(suite: &Suite) {
    let page = fresh_page();
    let (a, b) = (Agent::new(suite), Agent::new(suite));
    a.give_task(&b, 30);
    let at_a = TEST_AREA + 0x300 * PAGE_SIZE;
    let at_b = TEST_AREA + 0x301 * PAGE_SIZE;
    let mut rounds = Vec::with_capacity(4);
    for _ in 0..4 {
        // Map to A, A grants it on to B, we revoke it from B.
        let mapped = sys::map(
            a.task,
            Fpage::memory(page, 12, Fpage::RWX),
            at_a,
            MapFlags::empty(),
        );
        let granted = a.map(
            30,
            Fpage::memory(at_a, 12, Fpage::RWX),
            at_b,
            l4::abi::MAP_GRANT,
        );
        let seen = b.read(at_b);
        // SAFETY: revokes only what others derived from our page.
        let revoked =
            unsafe { sys::unmap(Fpage::memory(page, 12, Fpage::RWX), UnmapFlags::empty()) };
        rounds.push((
            mapped.is_ok() && granted == 0 && seen == 0 && revoked.is_ok(),
            used(slots::FACTORY),
        ));
    }
    let _ = (sys::task_destroy(a.task), sys::task_destroy(b.task));
    check(
        "quota",
        "map, grant and unmap cycles through two tasks leave the quota where the first cycle did",
        rounds.iter().all(|r| r.0) && rounds[1..].iter().all(|r| r.1 == rounds[0].1),
    );

    let factory = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 256 << 10, 0);
    let mut after = Vec::with_capacity(4);
    for _ in 0..4 {
        let task = alloc_slot();
        let created = sys::factory_create(factory, ObjectKind::Task, task, 0, 0);
        let thread = alloc_slot();
        let bound = sys::factory_create(factory, ObjectKind::Thread, thread, 0, 0)
            .and_then(|()| sys::thread_control(thread, task, UTCB_AREA, NO_CAP, NO_CAP));
        let mapped = sys::map(
            task,
            Fpage::memory(page, 12, Fpage::READ),
            TEST_AREA,
            MapFlags::empty(),
        );
        let destroyed = sys::task_destroy(task);
        let _ = sys::cap_delete(thread);
        after.push((
            created.and(bound).and(mapped).and(destroyed).is_ok(),
            used(factory),
        ));
    }
    check(
        "quota",
        "creating a task with a bound thread and a mapping and destroying it gives its factory back every byte",
        made.is_ok() && after.iter().all(|&(ok, used)| ok && used == 0),
    );
    task_cycle_case(suite);
    dying_task_books_case();
}

/// Found by the fuzzer (seed 4, batch 5): a task whose last capability went dies in bounded
/// steps, its threads first, and QuotaCheck between two steps reported it as inconsistent
/// (charged for the UTCBs of threads already freed). Now each UTCB frame is refunded as its
/// thread goes, and the audit allows a dying task to be charged more than it holds until its
/// last step (never less); every byte comes back at the end.
fn dying_task_books_case() {
    let factory = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 8 << 20, 0);
    let task = alloc_slot();
    let created = sys::factory_create(factory, ObjectKind::Task, task, 0, 0);
    let mut bound = 0;
    // One slot for every thread: a bound thread lives on with its task when its capability
    // goes.
    let thread = alloc_slot();
    for i in 0..200 {
        let ok = sys::factory_create(factory, ObjectKind::Thread, thread, 0, 0)
            .and_then(|()| {
                sys::thread_control(
                    thread,
                    task,
                    UTCB_AREA + i * l4::abi::UTCB_SIZE,
                    NO_CAP,
                    NO_CAP,
                )
            })
            .and_then(|()| sys::cap_delete(thread));
        bound += u64::from(ok.is_ok());
    }
    // Our capability was the last: the kernel destroys the task in steps at the end of each
    // syscall, so the check below runs while it is half gone.
    let deleted = sys::cap_delete(task);
    let during = sys::quota_check(slots::FACTORY, true).map(|(_, mismatches)| mismatches);
    let left = settle_at(factory, 0, 1_000);
    check_eq(
        "quota",
        "the books balance while a task of 200 threads dies in steps, and its factory gets every byte back",
        (made, created, bound, deleted, during, left),
        (Ok(()), Ok(()), 200, Ok(()), Ok(0), 0),
    );
}

/// Two tasks that hold each other's capability (a cycle no reference count ends on its own),
/// made by a task that is then destroyed: its destruction revokes the copies derived from its
/// capabilities, so both go and its factory gets every byte back. (Checked while looking into
/// a leak the fuzzer reported, which was the fuzzer's own: a factory left in slot 0.)
fn task_cycle_case(suite: &Suite) {
    let factory = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 256 << 10, 0);
    let a = Agent::new(suite);
    let given = sys::cap_copy(a.task, factory, slots::FACTORY, Rights::all(), 0);
    let (x, y) = (40, 41);
    let created = [
        a.command(
            AGENT_CREATE,
            &[slots::FACTORY, ObjectKind::Task as u64, x, 0],
        ),
        a.command(
            AGENT_CREATE,
            &[slots::FACTORY, ObjectKind::Task as u64, y, 0],
        ),
        a.command(AGENT_CAP_COPY, &[x, y, 20, Rights::all().bits()]),
        a.command(AGENT_CAP_COPY, &[y, x, 20, Rights::all().bits()]),
    ];
    let held = used(factory);
    let destroyed = sys::task_destroy(a.task);
    let left = settle_at(factory, 0, 1_000);
    check_eq(
        "quota",
        "two tasks holding each other's capability die with the task that made them: every byte back",
        (made, given, created, held > 0, destroyed, left),
        (Ok(()), Ok(()), [0; 4], true, Ok(()), 0),
    );
}

/// The guest-physical address of the VM pager case's fault (the guest's first fetch).
const PAGER_CASE_ENTRY: u64 = 0x7000;
/// The VM pager case: what the pager received (the fault's address + 1; 0: nothing yet), and
/// what its vCPU thread's `VcpuRun` returned (`[rax, exit code, done]`).
static PAGER_GOT: AtomicU64 = AtomicU64::new(0);
static RUNNER_GOT: [AtomicU64; 3] = [
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(0),
];

/// Set to make the silent VM pager exit.
static PAGER_EXIT: AtomicBool = AtomicBool::new(false);

/// A VM pager that takes a guest page fault, never answers it and exits when told.
extern "C" fn silent_vm_pager(_: u64) -> ! {
    if let Ok(m) = ipc::wait(Timeouts::INFINITE) {
        if m.tag.label() == l4::abi::LABEL_GUEST_PAGE_FAULT {
            PAGER_GOT.store(m.word(0) + 1, SeqCst);
        }
    }
    while !PAGER_EXIT.load(SeqCst) {
        sys::thread_yield();
    }
    sys::thread_exit(0)
}

/// Runs vCPU `vcpu` once, from 32-bit protected mode at [`PAGER_CASE_ENTRY`] in a VM with no
/// memory, and reports what `VcpuRun` returned.
extern "C" fn pager_case_runner(vcpu: u64) -> ! {
    use l4::abi::vcpu as state;
    let run = l4::utcb::with_utcb(|u| {
        state::protected_mode(&mut u.mr, PAGER_CASE_ENTRY);
        sys::vcpu_run(u, vcpu, state::Groups::GUEST, u64::MAX)
    });
    let (rax, code) = match run {
        Ok(code) => (0, code),
        Err(e) => (e as u64, 0),
    };
    RUNNER_GOT[0].store(rax, SeqCst);
    RUNNER_GOT[1].store(code, SeqCst);
    RUNNER_GOT[2].store(1, SeqCst);
    sys::thread_exit(0)
}

/// Found while building the fuzzer: a VM pager that died while a guest page fault waited for
/// its answer killed the VMM thread whose `VcpuRun` had raised it. Now that `VcpuRun` returns
/// the nested page fault to the VMM, as for a pager that refuses.
fn vm_pager_death_case() {
    if guest_asids() == 0 {
        skip("vm", "a VM pager that exits while a guest page fault waits for it: VcpuRun returns the NPF exit, the VMM thread lives", "without SVM: no VM pager to lose");
        return;
    }
    let (factory, vm, vcpu) = (alloc_slot(), alloc_slot(), alloc_slot());
    let pager = go(silent_vm_pager, 0);
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Factory, factory, 256 << 10, 0)
        .and_then(|()| sys::factory_create(factory, ObjectKind::Vm, vm, pager, 0))
        .and_then(|()| sys::factory_create(factory, ObjectKind::Vcpu, vcpu, vm, 0));
    let runner = made.map(|()| go(pager_case_runner, vcpu));
    let faulted = yield_until(|| PAGER_GOT.load(SeqCst) != 0, 100_000);
    // The pager exits while the fault waits for its answer.
    PAGER_EXIT.store(true, SeqCst);
    let gone = yield_until(
        || ipc::receive(pager, POLL).map(|_| ()) == Err(err(Error::DeadPartner, true)),
        100_000,
    );
    let destroyed = sys::cap_delete(pager).map(|()| gone);
    let returned = yield_until(|| RUNNER_GOT[2].load(SeqCst) != 0, 100_000);
    let got = (RUNNER_GOT[0].load(SeqCst), RUNNER_GOT[1].load(SeqCst));
    println!(
        "# vm pager death: fault at {:#x}, VcpuRun returned {got:?}",
        PAGER_GOT.load(SeqCst).wrapping_sub(1)
    );
    check_eq(
        "vm",
        "a VM pager that exits while a guest page fault waits for it: VcpuRun returns the NPF exit, the VMM thread lives",
        (made, runner.is_ok(), faulted, PAGER_GOT.load(SeqCst) - 1, destroyed, returned, got),
        (Ok(()), true, true, PAGER_CASE_ENTRY, Ok(true), true, (0, l4::abi::vcpu::exit::NPF)),
    );
    if let Ok(thread) = runner {
        let _ = sys::cap_delete(thread);
    }
    for slot in [vcpu, vm, factory] {
        let _ = sys::cap_delete(slot);
    }
}
