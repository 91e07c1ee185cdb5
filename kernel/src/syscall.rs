//! The syscall dispatcher: one `match` over every syscall. Each handler decodes (validates)
//! all arguments before it changes any state, and returns `Result<Next, Error>`: no handler
//! leaves past the dispatcher, which writes the result into the caller's saved registers, does
//! a step of pending destruction, and then runs the next thread ([`Next`]).

use crate::arch::x86_64::cpu::outb;
use crate::arch::x86_64::entry::{RFLAGS_IF, RFLAGS_RESERVED, RFLAGS_USER_MASK};
use crate::arch::x86_64::paging::PAGE_4K;
use crate::ipc::{self, SendOutcome};
use crate::kernel::Kernel;
use crate::map::{
    copy_capability, delete_capability, unmap_flexpage_step, MapProgress, Space, UnmapProgress,
    MAP_STEP_UNITS, UNMAP_STEP_UNITS,
};
use crate::object::{Capability, Object, TaskId, ThreadId};
use crate::thread::ThreadState;
use crate::usermem;
use l4_abi::{
    Error, ExRegsFlags, Fpage, MapFlags, Rights, Syscall, Timeouts, UnmapFlags, KERNEL_AREA_START,
    KIP_ADDRESS, NO_CAP, OPEN_WAIT, RECEIVE_PHASE, USER_END, USER_START, UTCB_AREA,
};

use crate::destroy::{destroy_task_step, STEP_UNITS};
use crate::factory::{bind_thread, factory_create};

/// What the dispatcher does after a handler succeeded (Hubris's `NextTask`): every handler's
/// way out goes through the one epilogue of [`dispatch`].
pub enum Next {
    /// Done: the result is written (`rax` = 0 for the non-IPC calls), then the scheduler
    /// picks who runs.
    Done,
    /// Not done: the handler rewound the caller to issue the system call again (after the
    /// kernel served what is pending); nothing is written.
    Restart,
    /// Done, and thread `.0` runs now (a `ThreadSwitch` donation) if it still can.
    Switch(ThreadId),
}

/// Handle the syscall of the current thread (its registers are in its frame).
pub fn dispatch(k: &mut Kernel) -> ! {
    let id = k.current_id();
    let f = k.thread(id).frame;
    let number = f.rax;
    let mut receive_phase = number == Syscall::Receive as u64;
    let done = |r: Result<(), Error>| r.map(|()| Next::Done);
    let result: Result<Next, Error> = match Syscall::from_u64(number) {
        Some(Syscall::Send) => done(ipc_send(k, id, f.rdi, false, Timeouts(f.r10))),
        Some(Syscall::Call) => done(ipc_send(k, id, f.rdi, true, Timeouts(f.r10))),
        Some(Syscall::Receive) => done(ipc_receive(k, id, f.rsi, Timeouts(f.r10))),
        Some(Syscall::Reply) => ipc::reply(k, id).map(|replied| {
            if replied {
                set_ok(k, id)
            }
            Next::Done
        }),
        Some(Syscall::ReplyWait) => match ipc::reply(k, id) {
            Ok(false) => Ok(Next::Done),
            Ok(true) => {
                receive_phase = true;
                done(ipc_receive(k, id, OPEN_WAIT, Timeouts(f.r10)))
            }
            Err(e) => Err(e),
        },
        Some(Syscall::FactoryCreate) => done(factory_create(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8)),
        Some(Syscall::ThreadControl) => done(thread_control(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8)),
        Some(Syscall::ExRegs) => done(ex_regs(k, id, f.rdi, f.rsi, f.rdx, f.r10)),
        Some(Syscall::CapCopy) => done(cap_copy(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8)),
        Some(Syscall::CapDelete) => done(cap_delete(k, f.rdi)),
        Some(Syscall::Map) => {
            map(k, id, f.rdi, f.rsi, f.rdx, f.r10).map(|finished| restart_unless(k, id, finished))
        }
        Some(Syscall::Unmap) => {
            unmap(k, id, f.rdi, f.rsi).map(|finished| restart_unless(k, id, finished))
        }
        Some(Syscall::ThreadExit) => {
            thread_exit(k, id, f.rdi);
            Ok(Next::Done)
        }
        Some(Syscall::ThreadYield) => {
            k.thread(id).remaining = 0;
            Ok(Next::Done)
        }
        Some(Syscall::DebugWrite) => done(debug_write(k, id, f.rdi, f.rsi)),
        Some(Syscall::TaskDestroy) => {
            task_destroy(k, id, f.rdi).map(|finished| restart_unless(k, id, finished))
        }
        Some(Syscall::Shutdown) => done(shutdown(k, f.rdi, f.rsi)),
        Some(Syscall::ThreadSchedule) => done(thread_schedule(k, id, f.rdi, f.rsi, f.rdx)),
        Some(Syscall::ThreadSwitch) => thread_switch(k, id, f.rdi),
        Some(Syscall::IrqControl) => done(irq_control(k, f.rdi, f.rsi, f.rdx)),
        Some(Syscall::VcpuRun) => vcpu_run(k, id, f.rdi, f.rsi, f.rdx),
        Some(Syscall::QuotaCheck) => done(crate::audit::quota_check(k, id, f.rdi, f.rsi)),
        None => Err(Error::UnknownSyscall),
    };
    finish(k, id, number, receive_phase, result)
}

/// The end of every system call of thread `id` (number `number`, `receive_phase`: whether an
/// error is reported as the receive phase's) with `result`: writes the result, takes a step
/// of pending destruction, and schedules.
#[inline(always)]
pub fn finish(
    k: &mut Kernel,
    id: ThreadId,
    number: u64,
    receive_phase: bool,
    result: Result<Next, Error>,
) -> ! {
    // IPC paths set rax themselves on success (they may block); errors are written here.
    let mut switch = None;
    match result {
        Ok(Next::Restart) => {}
        Ok(next) => {
            if !is_ipc(number) && k.threads.get(id).is_some() {
                k.thread(id).frame.rax = 0;
            }
            if let Next::Switch(target) = next {
                switch = Some(target);
            }
        }
        Err(e) => {
            let phase = if receive_phase { RECEIVE_PHASE } else { 0 };
            if let Some(t) = k.threads.get_mut(id) {
                t.frame.rax = e as u64 | phase;
                // A receive that fails ends a string copy into its buffers.
                t.partial_copy = None;
                if matches!(
                    t.state,
                    ThreadState::Sending { .. } | ThreadState::Receiving { .. }
                ) {
                    // Should not happen: handlers fail before they block.
                    t.state = ThreadState::Ready;
                }
            }
        }
    }
    if !k.reaping.is_empty() || !k.dying_vms.is_empty() {
        // A task or VM whose last capability went: one bounded step of its destruction.
        crate::lifetime::reap(k);
    }
    if let Some(target) = switch {
        if k.threads
            .get(target)
            .is_some_and(|t| t.state == ThreadState::Ready)
        {
            k.resume(target);
        }
    }
    k.schedule()
}

/// A handler that works in restartable steps: `Next::Done` when it `finished`, else the
/// caller issues the system call again after the kernel served what is pending.
fn restart_unless(k: &mut Kernel, caller: ThreadId, finished: bool) -> Next {
    if finished {
        Next::Done
    } else {
        k.thread(caller).restart_syscall();
        Next::Restart
    }
}

fn is_ipc(number: u64) -> bool {
    (1..=5).contains(&number)
}

fn set_ok(k: &mut Kernel, id: ThreadId) {
    k.thread(id).frame.rax = 0;
}

fn ipc_send(
    k: &mut Kernel,
    id: ThreadId,
    slot: u64,
    call: bool,
    timeouts: Timeouts,
) -> Result<(), Error> {
    let cap = k.lookup(slot)?;
    let (target, badge) = k.ipc_target(cap)?;
    ipc::validate_outgoing(k, id)?;
    match ipc::send(
        k,
        id,
        target,
        badge,
        call,
        timeouts.send(),
        timeouts.receive(),
    )? {
        SendOutcome::Delivered | SendOutcome::Blocked => Ok(()),
    }
}

fn ipc_receive(k: &mut Kernel, id: ThreadId, source: u64, timeouts: Timeouts) -> Result<(), Error> {
    let from = if source == OPEN_WAIT {
        None
    } else {
        match k.lookup(source)?.object {
            Object::Thread(t) => Some(t),
            _ => return Err(Error::WrongType),
        }
    };
    ipc::receive(k, id, from, timeouts.receive())
}

pub(crate) fn require(cap: Capability, right: Rights) -> Result<Capability, Error> {
    if cap.rights.contains(right) {
        Ok(cap)
    } else {
        Err(Error::NoRights)
    }
}

pub(crate) fn task_cap(k: &Kernel, slot: u64) -> Result<TaskId, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Task(t) => require(cap, Rights::CONTROL).map(|_| t),
        _ => Err(Error::WrongType),
    }
}

pub(crate) fn thread_cap(k: &Kernel, slot: u64) -> Result<ThreadId, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Thread(t) => require(cap, Rights::CONTROL).map(|_| t),
        _ => Err(Error::WrongType),
    }
}

pub(crate) fn ipc_cap(k: &Kernel, slot: u64) -> Result<Capability, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Thread(_) | Object::Gate(_) => require(cap, Rights::SEND),
        _ => Err(Error::WrongType),
    }
}

pub(crate) fn current_task(k: &Kernel) -> TaskId {
    k.task_of(k.current_id())
        .expect("current thread has a task")
}

fn thread_control(
    k: &mut Kernel,
    thread: u64,
    task: u64,
    utcb: u64,
    pager: u64,
    handler: u64,
) -> Result<(), Error> {
    let thread = thread_cap(k, thread)?;
    let bind = if task != NO_CAP {
        let task = task_cap(k, task)?;
        if k.thread(thread).task.is_some() {
            return Err(Error::AlreadyBound);
        }
        if !utcb.is_multiple_of(PAGE_4K) || !(UTCB_AREA..KIP_ADDRESS).contains(&utcb) {
            return Err(Error::InvalidArgument);
        }
        if k.tasks
            .get(task)
            .expect("task")
            .space
            .lookup(utcb)
            .is_some()
        {
            return Err(Error::InvalidArgument);
        }
        Some(task)
    } else {
        None
    };
    let pager = if pager != NO_CAP {
        Some(ipc_cap(k, pager)?)
    } else {
        None
    };
    let handler = if handler != NO_CAP {
        Some(ipc_cap(k, handler)?)
    } else {
        None
    };
    // All arguments are valid: apply.
    if let Some(task) = bind {
        bind_thread(k, thread, task, utcb)?;
    }
    if let Some(p) = pager {
        k.thread(thread).pager = Some(p);
    }
    if let Some(h) = handler {
        k.thread(thread).exception_handler = Some(h);
    }
    Ok(())
}

fn ex_regs(
    k: &mut Kernel,
    caller: ThreadId,
    thread: u64,
    ip: u64,
    sp: u64,
    flags: u64,
) -> Result<(), Error> {
    let target = thread_cap(k, thread)?;
    let flags = ExRegsFlags::from_bits(flags).ok_or(Error::InvalidArgument)?;
    if (flags.contains(ExRegsFlags::SET_IP) && ip >= USER_END)
        || (flags.contains(ExRegsFlags::SET_SP) && sp >= USER_END)
    {
        return Err(Error::InvalidArgument);
    }
    let t = k.thread(target);
    if flags.contains(ExRegsFlags::START) && t.task.is_none() {
        return Err(Error::NotBound);
    }
    if t.state == ThreadState::Dead && flags.intersects(ExRegsFlags::START | ExRegsFlags::CANCEL) {
        return Err(Error::DeadPartner);
    }
    let old = (t.frame.rip, t.frame.rsp, t.frame.rflags);
    if flags.intersects(ExRegsFlags::SET_IP | ExRegsFlags::CANCEL) {
        // A string copy's steps count only for the same receive going on.
        t.partial_copy = None;
    }
    if flags.contains(ExRegsFlags::SET_IP) {
        t.unmap_progress = None;
        t.map_progress = None;
        t.frame.rip = ip;
    }
    if flags.contains(ExRegsFlags::SET_SP) {
        t.frame.rsp = sp;
    }
    t.frame.rflags = (t.frame.rflags & RFLAGS_USER_MASK) | RFLAGS_IF | RFLAGS_RESERVED;
    // A thread waiting for a fault or exception answer cannot go on: cancelling kills it.
    let blocked = matches!(
        t.state,
        ThreadState::Sending { .. } | ThreadState::Receiving { .. }
    );
    if flags.contains(ExRegsFlags::CANCEL) && blocked && target != caller {
        ipc::abort(k, target, Error::Canceled as u64);
    }
    if flags.contains(ExRegsFlags::START) && k.thread(target).state == ThreadState::Inactive {
        k.wake(target);
    }
    let f = &mut k.thread(caller).frame;
    f.rdi = old.0;
    f.rsi = old.1;
    f.rdx = old.2;
    Ok(())
}

fn cap_copy(
    k: &mut Kernel,
    task: u64,
    source: u64,
    destination: u64,
    mask: u64,
    badge: u64,
) -> Result<(), Error> {
    let target = task_cap(k, task)?;
    let cap = require(k.lookup(source)?, Rights::COPY)?;
    if badge != 0 && cap.badge != 0 {
        return Err(Error::InvalidArgument);
    }
    let new = Capability {
        object: cap.object,
        rights: cap.rights & Rights::from_bits_truncate(mask),
        badge: if badge != 0 { badge } else { cap.badge },
    };
    match k.tasks.get(target).expect("task").caps.is_free(destination) {
        Ok(true) => {}
        Ok(false) => return Err(Error::SlotOccupied),
        Err(_) => return Err(Error::InvalidArgument),
    }
    let from = current_task(k);
    if from == target && source == destination {
        return Err(Error::SlotOccupied);
    }
    copy_capability(k, from, source, target, destination, new, false)
}

fn cap_delete(k: &mut Kernel, slot: u64) -> Result<(), Error> {
    let task = current_task(k);
    delete_capability(k, task, slot)
}

/// `Map`: in bounded steps ([`crate::map::map_step`]); `Ok(false)` when more remains (the
/// caller restarts the syscall, and the thread keeps how far it got).
fn map(
    k: &mut Kernel,
    id: ThreadId,
    task: u64,
    fpage: u64,
    destination: u64,
    flags: u64,
) -> Result<bool, Error> {
    // Progress counts only for the same call re-executed (`ExRegs` forgets it).
    let call = MapProgress {
        task,
        fpage,
        destination,
        flags,
        next: 0,
    };
    let resume = k
        .thread(id)
        .map_progress
        .take()
        .filter(|p| MapProgress { next: 0, ..*p } == call)
        .map_or(crate::map::map_start(Fpage(fpage)), |p| p.next);
    let cap = k.lookup(task)?;
    let (to, grant) = if let Object::Vm(vm) = cap.object {
        // Guest memory: a memory flexpage of ours at a guest-physical address.
        require(cap, Rights::CONTROL)?;
        if flags != 0 || !Fpage(fpage).is_valid_memory() {
            return Err(Error::InvalidArgument);
        }
        (Space::Vm(vm), false)
    } else {
        let target = task_cap(k, task)?;
        let fpage = Fpage(fpage);
        let flags = MapFlags::from_bits(flags).ok_or(Error::InvalidArgument)?;
        if !fpage.is_valid() {
            return Err(Error::InvalidArgument);
        }
        if fpage.is_valid_memory() {
            let end = destination.checked_add(fpage.size());
            if !destination.is_multiple_of(fpage.size())
                || destination < USER_START
                || end.is_none_or(|end| end > KERNEL_AREA_START)
            {
                return Err(Error::InvalidArgument);
            }
        }
        (Space::Task(target), flags.contains(MapFlags::GRANT))
    };
    let source = current_task(k);
    let mut budget = MAP_STEP_UNITS;
    let next = crate::map::map_step(
        k,
        source,
        Fpage(fpage),
        to,
        destination,
        grant,
        resume,
        &mut budget,
    )?;
    if let Some(next) = next {
        k.thread(id).map_progress = Some(MapProgress { next, ..call });
    }
    Ok(next.is_none())
}

/// `Unmap`: one bounded step; `Ok(false)` when more remains (the caller restarts the
/// syscall, and the thread keeps how far it got).
fn unmap(k: &mut Kernel, id: ThreadId, fpage: u64, flags: u64) -> Result<bool, Error> {
    // Progress counts only for the same call re-executed (`ExRegs` forgets it).
    let progress = k.thread(id).unmap_progress.take();
    let flags = UnmapFlags::from_bits(flags).ok_or(Error::InvalidArgument)?;
    let include_self = flags.contains(UnmapFlags::SELF);
    let from = progress
        .filter(|p| p.fpage == fpage && p.include_self == include_self)
        .map(|p| p.next);
    let task = current_task(k);
    let step = UNMAP_STEP_UNITS;
    match unmap_flexpage_step(k, task, Fpage(fpage), include_self, from, step)? {
        None => Ok(true),
        Some(next) => {
            k.thread(id).unmap_progress = Some(UnmapProgress {
                fpage,
                include_self,
                next,
            });
            Ok(false)
        }
    }
}

fn thread_schedule(
    k: &mut Kernel,
    caller: ThreadId,
    thread: u64,
    priority: u64,
    timeslice_us: u64,
) -> Result<(), Error> {
    let cap = k.lookup(thread)?;
    let Object::Thread(target) = cap.object else {
        return Err(Error::WrongType);
    };
    require(cap, Rights::SCHEDULE)?;
    let own = k.thread(caller).priority as u64;
    if priority > 255 || priority > own || timeslice_us > 10_000_000 {
        return Err(Error::InvalidArgument);
    }
    let hz = k.timer_hz;
    let current = k.current;
    let t = k.thread(target);
    let old = (t.priority as u64, t.timeslice as u64 * 1_000_000 / hz);
    let was_queued = t.state == ThreadState::Ready && Some(target) != current;
    let old_priority = t.priority;
    t.priority = priority as u8;
    if timeslice_us != 0 {
        t.timeslice = (timeslice_us * hz).div_ceil(1_000_000).max(1) as u32;
        t.remaining = t.remaining.min(t.timeslice);
    }
    if was_queued && k.ready.remove(target, old_priority) {
        k.ready.enqueue(target, priority as u8);
        if priority > own {
            k.preempt = true;
        }
    }
    let f = &mut k.thread(caller).frame;
    f.rdi = old.0;
    f.rsi = old.1;
    Ok(())
}

fn thread_switch(k: &mut Kernel, caller: ThreadId, thread: u64) -> Result<Next, Error> {
    if thread != NO_CAP {
        let cap = k.lookup(thread)?;
        let Object::Thread(target) = cap.object else {
            return Err(Error::WrongType);
        };
        let ready = k
            .threads
            .get(target)
            .is_some_and(|t| t.state == ThreadState::Ready);
        if ready && target != caller {
            // Donate: the target runs now with the rest of our slice; we queue behind it.
            let priority = k.thread(target).priority;
            k.ready.remove(target, priority);
            let own = k.thread(caller).priority;
            k.ready.enqueue(caller, own);
            return Ok(Next::Switch(target));
        }
    }
    k.thread(caller).remaining = 0;
    Ok(Next::Done)
}

fn vcpu_run(
    k: &mut Kernel,
    caller: ThreadId,
    vcpu: u64,
    mask: u64,
    deadline: u64,
) -> Result<Next, Error> {
    let cap = k.lookup(vcpu)?;
    let Object::Vcpu(id) = cap.object else {
        return Err(Error::WrongType);
    };
    require(cap, Rights::CONTROL)?;
    crate::vm::run(k, caller, id, mask, deadline)
}

fn irq_control(k: &mut Kernel, irq: u64, operation: u64, thread: u64) -> Result<(), Error> {
    let cap = k.lookup(irq)?;
    let Object::Irq(id) = cap.object else {
        return Err(Error::WrongType);
    };
    require(cap, Rights::CONTROL)?;
    let operation = l4_abi::IrqOp::from_u64(operation).ok_or(Error::InvalidArgument)?;
    let line = k.irqs.get(id).expect("irq").line;
    match operation {
        l4_abi::IrqOp::Attach => {
            let target = thread_cap(k, thread)?;
            // A receiver that died or was destroyed does not hold the IRQ any more.
            let receiver = k.irqs.get(id).expect("irq").receiver;
            if receiver
                .is_some_and(|(t, _)| t != target && k.threads.get(t).is_some_and(|r| r.is_alive()))
            {
                return Err(Error::AlreadyBound);
            }
            let irq = k.irqs.get_mut(id).expect("irq");
            irq.receiver = Some((target, cap.badge));
            crate::irq::acknowledge(line);
        }
        l4_abi::IrqOp::Detach => {
            k.irqs.get_mut(id).expect("irq").receiver = None;
            if line < crate::irq::HARDWARE_LINES {
                crate::arch::x86_64::ioapic::set_masked(line, true);
            }
        }
        l4_abi::IrqOp::Acknowledge => crate::irq::acknowledge(line),
        l4_abi::IrqOp::Trigger => crate::irq::raise(k, id),
    }
    Ok(())
}

fn thread_exit(k: &mut Kernel, id: ThreadId, code: u64) {
    let number = k.thread(id).number;
    crate::debug!("thread {number} exited with code {code}");
    ipc::finish_death(k, id);
}

fn debug_write(k: &mut Kernel, id: ThreadId, address: u64, length: u64) -> Result<(), Error> {
    if length > 256 {
        return Err(Error::InvalidArgument);
    }
    let mut buffer = [0u8; 256];
    let task = k.task_of(id).expect("task");
    let space = k.tasks.get(task).expect("task").space;
    usermem::copy_from_user(space, address, &mut buffer[..length as usize])?;
    crate::arch::x86_64::serial::write_bytes(&buffer[..length as usize]);
    Ok(())
}

/// `TaskDestroy`: one step of the destruction (see [`destroy_task_step`]); `Ok(false)` when
/// more remains (the caller restarts the syscall). The capability may name a dying task.
fn task_destroy(k: &mut Kernel, id: ThreadId, slot: u64) -> Result<bool, Error> {
    let own = current_task(k);
    let cap = k
        .tasks
        .get(own)
        .and_then(|t| t.caps.get(slot).ok().copied())
        .ok_or(Error::InvalidCapability)?;
    let task = match cap.object {
        Object::Task(t) if k.tasks.contains(t) => require(cap, Rights::CONTROL).map(|_| t)?,
        Object::Task(_) => return Err(Error::InvalidCapability),
        _ => {
            k.lookup(slot)?;
            return Err(Error::WrongType);
        }
    };
    if k.task_of(id) == Some(task) {
        return Err(Error::InvalidArgument);
    }
    Ok(destroy_task_step(k, task, STEP_UNITS))
}

fn shutdown(k: &mut Kernel, platform: u64, code: u64) -> Result<(), Error> {
    let cap = k.lookup(platform)?;
    if cap.object != Object::Platform {
        return Err(Error::WrongType);
    }
    require(cap, Rights::CONTROL)?;
    crate::info!(
        "shutdown requested (code {code:#x}); {} tasks, {} threads alive",
        k.tasks.len(),
        k.threads.len()
    );
    outb(l4_abi::qemu_exit::PORT, code as u8);
    crate::info!("halted (without an isa-debug-exit device, QEMU keeps running)");
    crate::arch::x86_64::cpu::halt_forever()
}
