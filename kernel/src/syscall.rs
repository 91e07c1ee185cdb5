//! The syscall dispatcher: one `match` over every syscall. Each handler decodes (validates)
//! all arguments before it changes any state, and returns `Result<_, Error>`; the dispatcher
//! writes the result into the caller's saved registers and schedules.

use crate::arch::x86_64::cpu::outb;
use crate::arch::x86_64::entry::{RFLAGS_IF, RFLAGS_RESERVED, RFLAGS_USER_MASK};
use crate::arch::x86_64::paging::{
    phys_to_virt, AddressSpace, NO_EXECUTE, PAGE_4K, USER, WRITABLE,
};
use crate::ipc::{self, SendOutcome};
use crate::kernel::Kernel;
use crate::map::{
    copy_capability, delete_capability, map_flexpage, unmap_flexpage_step, Space, UnmapProgress,
    UNMAP_STEP_UNITS,
};
use crate::memory::FrameSource;
use crate::object::{Capability, Gate, Object, QuotaId, TaskId, ThreadId};
use crate::task::Task;
use crate::thread::{Thread, ThreadState};
use crate::usermem;
use l4_abi::{
    rights, Error, ExRegsFlags, Fpage, ObjectKind, Syscall, Timeouts, Utcb, KERNEL_AREA_START,
    KIP_ADDRESS, MAP_GRANT, NO_CAP, OPEN_WAIT, RECEIVE_PHASE, UNMAP_SELF, USER_END, USER_START,
    UTCB_AREA,
};

/// Handle the syscall of the current thread (its registers are in its frame).
pub fn dispatch(k: &mut Kernel) -> ! {
    let id = k.current_id();
    let f = k.thread(id).frame;
    let number = f.rax;
    let mut receive_phase = number == Syscall::Receive as u64;
    let result: Result<(), Error> = match Syscall::from_u64(number) {
        Some(Syscall::Send) => ipc_send(k, id, f.rdi, false, Timeouts(f.r10)),
        Some(Syscall::Call) => ipc_send(k, id, f.rdi, true, Timeouts(f.r10)),
        Some(Syscall::Receive) => ipc_receive(k, id, f.rsi, Timeouts(f.r10)),
        Some(Syscall::Reply) => ipc::reply(k, id).map(|done| {
            if done {
                set_ok(k, id)
            }
        }),
        Some(Syscall::ReplyWait) => match ipc::reply(k, id) {
            Ok(false) => Ok(()),
            Ok(true) => {
                receive_phase = true;
                ipc_receive(k, id, OPEN_WAIT, Timeouts(f.r10))
            }
            Err(e) => Err(e),
        },
        Some(Syscall::FactoryCreate) => factory_create(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8),
        Some(Syscall::ThreadControl) => thread_control(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8),
        Some(Syscall::ExRegs) => ex_regs(k, id, f.rdi, f.rsi, f.rdx, f.r10),
        Some(Syscall::CapCopy) => cap_copy(k, f.rdi, f.rsi, f.rdx, f.r10, f.r8),
        Some(Syscall::CapDelete) => cap_delete(k, f.rdi),
        Some(Syscall::Map) => map(k, f.rdi, f.rsi, f.rdx, f.r10),
        Some(Syscall::Unmap) => match unmap(k, id, f.rdi, f.rsi) {
            Ok(true) => Ok(()),
            Ok(false) => {
                // More remains: again after the kernel served what is pending.
                k.thread(id).restart_syscall();
                k.schedule()
            }
            Err(e) => Err(e),
        },
        Some(Syscall::ThreadExit) => {
            thread_exit(k, id, f.rdi);
            Ok(())
        }
        Some(Syscall::ThreadYield) => {
            k.thread(id).remaining = 0;
            Ok(())
        }
        Some(Syscall::DebugWrite) => debug_write(k, id, f.rdi, f.rsi),
        Some(Syscall::TaskDestroy) => match task_destroy(k, id, f.rdi) {
            Ok(true) => Ok(()),
            Ok(false) => {
                // More remains: again after the kernel served what is pending.
                k.thread(id).restart_syscall();
                k.schedule()
            }
            Err(e) => Err(e),
        },
        Some(Syscall::Shutdown) => shutdown(k, f.rdi, f.rsi),
        Some(Syscall::ThreadSchedule) => thread_schedule(k, id, f.rdi, f.rsi, f.rdx),
        Some(Syscall::ThreadSwitch) => thread_switch(k, id, f.rdi),
        Some(Syscall::IrqControl) => irq_control(k, f.rdi, f.rsi, f.rdx),
        Some(Syscall::VcpuRun) => vcpu_run(k, id, f.rdi, f.rsi, f.rdx),
        Some(Syscall::QuotaCheck) => crate::audit::quota_check(k, id, f.rdi, f.rsi),
        None => Err(Error::UnknownSyscall),
    };
    // IPC paths set rax themselves on success (they may block); errors are written here.
    match result {
        Ok(()) => {
            if !is_ipc(number) && k.threads.get(id).is_some() {
                k.thread(id).frame.rax = 0;
            }
        }
        Err(e) => {
            let phase = if receive_phase { RECEIVE_PHASE } else { 0 };
            if let Some(t) = k.threads.get_mut(id) {
                t.frame.rax = e as u64 | phase;
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
    k.schedule()
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

fn require(cap: Capability, right: u64) -> Result<Capability, Error> {
    if cap.rights & right == right {
        Ok(cap)
    } else {
        Err(Error::NoRights)
    }
}

fn task_cap(k: &Kernel, slot: u64) -> Result<TaskId, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Task(t) => require(cap, rights::CONTROL).map(|_| t),
        _ => Err(Error::WrongType),
    }
}

fn thread_cap(k: &Kernel, slot: u64) -> Result<ThreadId, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Thread(t) => require(cap, rights::CONTROL).map(|_| t),
        _ => Err(Error::WrongType),
    }
}

fn ipc_cap(k: &Kernel, slot: u64) -> Result<Capability, Error> {
    let cap = k.lookup(slot)?;
    match cap.object {
        Object::Thread(_) | Object::Gate(_) => require(cap, rights::SEND),
        _ => Err(Error::WrongType),
    }
}

fn current_task(k: &Kernel) -> TaskId {
    k.task_of(k.current_id())
        .expect("current thread has a task")
}

/// Kernel memory of a task object with its capability table and PML4.
pub const TASK_BYTES: u64 = crate::memory::object_charge(core::mem::size_of::<Task>())
    + crate::memory::object_bytes(l4_abi::CAP_SLOTS * core::mem::size_of::<Option<Capability>>())
    + crate::memory::FRAME_BYTES;
/// Kernel memory of a thread object (its x87/SSE/AVX save area is charged separately, see
/// [`crate::fpu::AREA_BYTES`]: it is refunded when the thread dies).
pub const THREAD_BYTES: u64 = crate::memory::object_charge(core::mem::size_of::<Thread>());
/// Kernel memory of a gate.
pub const GATE_BYTES: u64 = crate::memory::object_charge(core::mem::size_of::<Gate>());

/// Create a new task whose kernel memory is charged to `quota`: empty capability table, the
/// KIP mapped.
pub fn new_task(k: &mut Kernel, name: &str, quota: QuotaId) -> Result<TaskId, Error> {
    // Room in the list of tasks to destroy for every live task, this one included, so that
    // queueing a task whose last capability went never allocates.
    let wanted = (k.tasks.len() + 1).saturating_sub(k.reaping.len());
    k.reaping
        .try_reserve(wanted)
        .map_err(|_| Error::OutOfMemory)?;
    charge(k, quota, TASK_BYTES)?;
    let Ok(space) = AddressSpace::new(&mut k.frames) else {
        k.quotas.get_mut(quota).expect("quota").refund(TASK_BYTES);
        return Err(Error::OutOfMemory);
    };
    let mut task = Task::new(space, quota);
    task.set_name(name);
    task.charged = TASK_BYTES;
    let id = match k.tasks.try_insert(task) {
        Ok(id) => id,
        Err(task) => {
            task.space.destroy(&mut k.frames);
            k.quotas.get_mut(quota).expect("quota").refund(TASK_BYTES);
            return Err(Error::OutOfMemory);
        }
    };
    let kip = k.kip_frame;
    let mut frames = k.charged(id).expect("new task");
    if space
        .map(KIP_ADDRESS, kip, PAGE_4K, USER | NO_EXECUTE, &mut frames)
        .is_err()
    {
        destroy_task(k, id);
        return Err(Error::OutOfMemory);
    }
    Ok(id)
}

/// Create a new, unbound thread with its x87/SSE/AVX save area in the initial state, both
/// charged to `quota`.
pub fn new_thread(k: &mut Kernel, quota: QuotaId) -> Result<ThreadId, Error> {
    let bytes = THREAD_BYTES + crate::fpu::AREA_BYTES;
    crate::memory::reserve_kept()?;
    k.quotas
        .get_mut(quota)
        .ok_or(Error::InvalidCapability)?
        .charge(bytes)
        .map_err(|_| Error::OutOfMemory)?;
    let Some(area) = crate::fpu::new_area() else {
        k.quotas.get_mut(quota).expect("quota").refund(bytes);
        return Err(Error::OutOfMemory);
    };
    k.next_thread_number += 1;
    let mut thread = Thread::new(k.next_thread_number);
    thread.fpu = Some(area);
    thread.quota = Some(quota);
    thread.creator = k.current.and_then(|c| k.task_of(c));
    k.threads.try_insert(thread).map_err(|_| {
        // The save area goes with the thread.
        k.quotas.get_mut(quota).expect("quota").refund(bytes);
        Error::OutOfMemory
    })
}

/// Charge `bytes` for a new object to `quota` (if the kernel keeps its reserve).
fn charge(k: &mut Kernel, quota: QuotaId, bytes: u64) -> Result<(), Error> {
    crate::memory::reserve_kept()?;
    k.quotas
        .get_mut(quota)
        .ok_or(Error::InvalidCapability)?
        .charge(bytes)
        .map_err(|_| Error::OutOfMemory)
}

/// Give back `bytes` charged to `quota` for an object that could not be made.
fn refund(k: &mut Kernel, quota: QuotaId, bytes: u64) {
    if let Some(q) = k.quotas.get_mut(quota) {
        q.refund(bytes);
    }
}

fn factory_create(
    k: &mut Kernel,
    factory: u64,
    kind: u64,
    slot: u64,
    argument: u64,
    badge: u64,
) -> Result<(), Error> {
    let cap = k.lookup(factory)?;
    let kind_code = kind;
    let quota = match (cap.object, ObjectKind::from_u64(kind_code)) {
        (Object::Factory(quota), _) => Some(quota),
        // The platform capability is the factory of IRQ objects.
        (Object::Platform, Some(ObjectKind::Irq)) => None,
        _ => return Err(Error::WrongType),
    };
    require(cap, rights::CONTROL)?;
    let task = current_task(k);
    match k.tasks.get(task).expect("task").caps.is_free(slot) {
        Ok(true) => {}
        Ok(false) => return Err(Error::SlotOccupied),
        Err(_) => return Err(Error::InvalidArgument),
    }
    let kind = ObjectKind::from_u64(kind).ok_or(Error::InvalidArgument)?;
    let new = match kind {
        ObjectKind::Task => Capability::full(Object::Task(new_task(
            k,
            "task",
            quota.ok_or(Error::WrongType)?,
        )?)),
        ObjectKind::Thread => Capability::full(Object::Thread(new_thread(
            k,
            quota.ok_or(Error::WrongType)?,
        )?)),
        ObjectKind::Gate => {
            let thread = thread_cap(k, argument)?;
            let quota = quota.ok_or(Error::WrongType)?;
            charge(k, quota, GATE_BYTES)?;
            let gate = Gate {
                thread,
                owner: task,
                quota,
                references: 0,
            };
            let Ok(gate) = k.gates.try_insert(gate) else {
                refund(k, quota, GATE_BYTES);
                return Err(Error::OutOfMemory);
            };
            Capability {
                badge,
                ..Capability::full(Object::Gate(gate))
            }
        }
        ObjectKind::Irq => {
            if cap.object != Object::Platform {
                return Err(Error::WrongType);
            }
            if !crate::irq::valid_line(argument) {
                return Err(Error::InvalidArgument);
            }
            if k.irq_lines[argument as usize].is_some() {
                return Err(Error::AlreadyBound);
            }
            let irq = k.irqs.insert(crate::irq::Irq {
                owner: task,
                line: argument as u32,
                receiver: None,
                pending: false,
                references: 0,
            });
            k.irq_lines[argument as usize] = Some(irq);
            Capability {
                badge,
                ..Capability::full(Object::Irq(irq))
            }
        }
        ObjectKind::Factory => {
            // A factory with a quota of `argument` bytes, carved out of this one's.
            let parent = quota.ok_or(Error::WrongType)?;
            if argument == 0 {
                return Err(Error::InvalidArgument);
            }
            charge(k, parent, argument)?;
            let carved = kernel_core::Quota::carved(argument, parent);
            let Ok(child) = k.quotas.try_insert(carved) else {
                refund(k, parent, argument);
                return Err(Error::OutOfMemory);
            };
            Capability::full(Object::Factory(child))
        }
        ObjectKind::Vm => {
            let pager = if argument == NO_CAP {
                None
            } else {
                Some(ipc_cap(k, argument)?)
            };
            Capability::full(Object::Vm(crate::vm::create_vm(
                k,
                quota.ok_or(Error::WrongType)?,
                pager,
                task,
            )?))
        }
        ObjectKind::Vcpu => {
            let vm = match k.lookup(argument)? {
                Capability {
                    object: Object::Vm(vm),
                    rights,
                    ..
                } if rights & rights::CONTROL != 0 => vm,
                Capability {
                    object: Object::Vm(_),
                    ..
                } => return Err(Error::NoRights),
                _ => return Err(Error::WrongType),
            };
            Capability::full(Object::Vcpu(crate::vm::create_vcpu(
                k,
                vm,
                quota.ok_or(Error::WrongType)?,
                task,
            )?))
        }
        ObjectKind::Platform => return Err(Error::InvalidArgument),
    };
    crate::lifetime::acquire(k, task, new.object);
    let inserted = k.tasks.get_mut(task).expect("task").caps.insert(slot, new);
    if inserted.is_err() {
        // Checked free above; should it fail, the object goes again.
        crate::lifetime::release(k, task, new.object);
        return Err(Error::SlotOccupied);
    }
    Ok(())
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

/// Bind `thread` to `task` with its UTCB at `utcb` (a fresh kernel frame mapped there).
pub fn bind_thread(k: &mut Kernel, thread: ThreadId, task: TaskId, utcb: u64) -> Result<(), Error> {
    let space = k.tasks.get(task).ok_or(Error::InvalidCapability)?.space;
    let mut frames = k.charged(task).ok_or(Error::InvalidCapability)?;
    let frame = frames.allocate_zeroed().ok_or(Error::OutOfMemory)?;
    if space
        .map(
            utcb,
            frame,
            PAGE_4K,
            USER | WRITABLE | NO_EXECUTE,
            &mut frames,
        )
        .is_err()
    {
        frames.free_frame(frame);
        return Err(Error::OutOfMemory);
    }
    // SAFETY: a fresh kernel-owned frame in the direct map.
    let u = unsafe { &mut *(phys_to_virt(frame) as *mut Utcb) };
    u.user[0] = utcb;
    let has_io = k.tasks.get(task).is_some_and(|t| t.io_bitmap.is_some());
    let t = k.thread(thread);
    t.task = Some(task);
    t.utcb_address = utcb;
    t.utcb_frame = frame;
    t.space_root = space.root;
    t.task_has_io = has_io;
    k.tasks.get_mut(task).expect("task").threads.push(thread);
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
    if flags
        & !(ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START | ExRegsFlags::CANCEL)
        != 0
    {
        return Err(Error::InvalidArgument);
    }
    if (flags & ExRegsFlags::SET_IP != 0 && ip >= USER_END)
        || (flags & ExRegsFlags::SET_SP != 0 && sp >= USER_END)
    {
        return Err(Error::InvalidArgument);
    }
    let t = k.thread(target);
    if flags & ExRegsFlags::START != 0 && t.task.is_none() {
        return Err(Error::NotBound);
    }
    if t.state == ThreadState::Dead && flags & (ExRegsFlags::START | ExRegsFlags::CANCEL) != 0 {
        return Err(Error::DeadPartner);
    }
    let old = (t.frame.rip, t.frame.rsp, t.frame.rflags);
    if flags & ExRegsFlags::SET_IP != 0 {
        t.unmap_progress = None;
        t.frame.rip = ip;
    }
    if flags & ExRegsFlags::SET_SP != 0 {
        t.frame.rsp = sp;
    }
    t.frame.rflags = (t.frame.rflags & RFLAGS_USER_MASK) | RFLAGS_IF | RFLAGS_RESERVED;
    // A thread waiting for a fault or exception answer cannot go on: cancelling kills it.
    let blocked = matches!(
        t.state,
        ThreadState::Sending { .. } | ThreadState::Receiving { .. }
    );
    if flags & ExRegsFlags::CANCEL != 0 && blocked && target != caller {
        ipc::abort(k, target, Error::Canceled as u64);
    }
    if flags & ExRegsFlags::START != 0 && k.thread(target).state == ThreadState::Inactive {
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
    let cap = require(k.lookup(source)?, rights::COPY)?;
    if badge != 0 && cap.badge != 0 {
        return Err(Error::InvalidArgument);
    }
    let new = Capability {
        object: cap.object,
        rights: cap.rights & mask,
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

fn map(k: &mut Kernel, task: u64, fpage: u64, destination: u64, flags: u64) -> Result<(), Error> {
    let cap = k.lookup(task)?;
    if let Object::Vm(vm) = cap.object {
        // Guest memory: a memory flexpage of ours at a guest-physical address.
        require(cap, rights::CONTROL)?;
        if flags != 0 {
            return Err(Error::InvalidArgument);
        }
        let source = current_task(k);
        return crate::map::map_memory(k, source, Fpage(fpage), Space::Vm(vm), destination, false);
    }
    let target = task_cap(k, task)?;
    let fpage = Fpage(fpage);
    if !fpage.is_valid() || flags & !MAP_GRANT != 0 {
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
    let source = current_task(k);
    map_flexpage(
        k,
        source,
        fpage,
        target,
        destination,
        flags & MAP_GRANT != 0,
    )
}

/// `Unmap`: one bounded step; `Ok(false)` when more remains (the caller restarts the
/// syscall, and the thread keeps how far it got).
fn unmap(k: &mut Kernel, id: ThreadId, fpage: u64, flags: u64) -> Result<bool, Error> {
    // Progress counts only for the same call re-executed (`ExRegs` forgets it).
    let include_self = flags & UNMAP_SELF != 0;
    let from = k
        .thread(id)
        .unmap_progress
        .take()
        .filter(|p| p.fpage == fpage && p.include_self == include_self)
        .map(|p| p.next);
    if flags & !UNMAP_SELF != 0 {
        return Err(Error::InvalidArgument);
    }
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
    require(cap, rights::SCHEDULE)?;
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

fn thread_switch(k: &mut Kernel, caller: ThreadId, thread: u64) -> Result<(), Error> {
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
            k.thread(caller).frame.rax = 0;
            let own = k.thread(caller).priority;
            k.ready.enqueue(caller, own);
            k.resume(target);
        }
    }
    k.thread(caller).remaining = 0;
    Ok(())
}

fn vcpu_run(
    k: &mut Kernel,
    caller: ThreadId,
    vcpu: u64,
    mask: u64,
    deadline: u64,
) -> Result<(), Error> {
    let cap = k.lookup(vcpu)?;
    let Object::Vcpu(id) = cap.object else {
        return Err(Error::WrongType);
    };
    require(cap, rights::CONTROL)?;
    crate::vm::run(k, caller, id, mask, deadline)
}

fn irq_control(k: &mut Kernel, irq: u64, operation: u64, thread: u64) -> Result<(), Error> {
    let cap = k.lookup(irq)?;
    let Object::Irq(id) = cap.object else {
        return Err(Error::WrongType);
    };
    require(cap, rights::CONTROL)?;
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

/// Destroy `task` at once: kill its threads, free its page tables, UTCBs and capability
/// table (for a task that has not run; `TaskDestroy` goes in steps).
pub fn destroy_task(k: &mut Kernel, task: TaskId) {
    while !destroy_task_step(k, task, usize::MAX) {}
}

/// The work one `TaskDestroy` step may do, in units of about 16 instructions: a thread slot
/// scanned is one unit, a thread or object destroyed [`OBJECT_UNITS`]. About 50,000
/// instructions, so that a timer interrupt waits at most that long for a task's destruction.
pub const STEP_UNITS: usize = 3_000;
/// Units of destroying one thread or object.
const OBJECT_UNITS: usize = 64;
/// Our units per unit of the mapping database's work (revoking a mapping is 8 of those).
const MAPPING_UNITS: usize = 16;

/// Go on destroying `task` for at most `budget` units of work; returns whether it is gone.
///
/// The first step makes the task dying (its capabilities no longer resolve, so it gets no new
/// threads, mappings or objects from outside). The stages then are: its threads die and are
/// freed one by one (its remaining threads may run between steps, they cannot reach their own
/// task); one scan of the thread arena fails the receives that wait on a dead thread; what was
/// derived from its mappings is revoked; one scan of each object arena destroys the objects it
/// created (gates, IRQs, vCPUs, VMs, unbound threads); then the task object goes. Each stage is
/// linear in what it visits, and its progress lives in the task, so the next `TaskDestroy` of
/// any thread holding a capability continues it.
pub fn destroy_task_step(k: &mut Kernel, task: TaskId, budget: usize) -> bool {
    use crate::task::Dying;
    let mut budget = budget;
    loop {
        let Some(t) = k.tasks.get_mut(task) else {
            return true;
        };
        let stage = *t.dying.get_or_insert(Dying::Threads);
        if budget == 0 {
            return false;
        }
        let next = match stage {
            Dying::Threads => {
                if k.io_owner == Some(task) {
                    crate::arch::x86_64::entry::set_io_bitmap(None);
                    k.io_owner = None;
                }
                loop {
                    if budget < OBJECT_UNITS {
                        return false;
                    }
                    let Some(thread) = k.tasks.get_mut(task).and_then(|t| t.threads.pop()) else {
                        break;
                    };
                    free_thread(k, thread);
                    budget -= OBJECT_UNITS;
                }
                Dying::Waiters { cursor: 0 }
            }
            Dying::Waiters { mut cursor } => {
                let start = cursor;
                let done = ipc::fail_waiters_of_dead(k, &mut cursor, budget);
                budget = budget.saturating_sub(cursor - start);
                if done {
                    Dying::Revoke { database: 0 }
                } else {
                    Dying::Waiters { cursor }
                }
            }
            Dying::Revoke { mut database } => {
                // A mapping-database unit is about as much work as 16 of ours.
                let units = (budget / MAPPING_UNITS).max(1);
                let done = crate::map::revoke_task_step(k, task, &mut database, units);
                if !done {
                    if let Some(t) = k.tasks.get_mut(task) {
                        t.dying = Some(Dying::Revoke { database });
                    }
                    // The step used its budget, or finished a database: go on in the next.
                    return false;
                }
                budget = budget.saturating_sub(OBJECT_UNITS);
                Dying::Caps { cursor: 0 }
            }
            Dying::Caps { mut cursor } => {
                // Each capability of its table is one reference less on its object.
                if budget < OBJECT_UNITS {
                    return false;
                }
                let slots = l4_abi::CAP_SLOTS as u64;
                while cursor < slots && budget >= OBJECT_UNITS {
                    let removed = k
                        .tasks
                        .get_mut(task)
                        .and_then(|t| t.caps.remove(cursor).ok());
                    if let Some(cap) = removed {
                        crate::lifetime::release(k, task, cap.object);
                        budget -= OBJECT_UNITS;
                    } else {
                        budget -= 1;
                    }
                    cursor += 1;
                }
                if cursor < slots {
                    Dying::Caps { cursor }
                } else {
                    Dying::Owned {
                        arena: 0,
                        cursor: 0,
                    }
                }
            }
            Dying::Owned { arena, mut cursor } => {
                let start = cursor;
                let (max, end) = (budget / OBJECT_UNITS + 1, arena_slots(k, arena));
                let removed = destroy_owned(k, task, arena, &mut cursor, budget, max);
                budget = budget.saturating_sub(cursor - start + removed * OBJECT_UNITS);
                match (cursor >= end, arena) {
                    (false, _) => Dying::Owned { arena, cursor },
                    (true, 4) => {
                        finish_task(k, task);
                        return true;
                    }
                    (true, _) => Dying::Owned {
                        arena: arena + 1,
                        cursor: 0,
                    },
                }
            }
        };
        if let Some(t) = k.tasks.get_mut(task) {
            t.dying = Some(next);
        }
    }
}

/// Kill and free thread `id` of a dying task.
fn free_thread(k: &mut Kernel, id: ThreadId) {
    if k.threads.get(id).is_some_and(|t| t.is_alive()) {
        ipc::let_die(k, id);
    }
    crate::fpu::release(k, id);
    if let Some(thread) = k.threads.remove(id) {
        if thread.utcb_frame != 0 {
            crate::memory::FrameSource::free_frame(&mut k.frames, thread.utcb_frame);
        }
        if let Some(quota) = thread.quota {
            crate::lifetime::refund(k, quota, THREAD_BYTES);
        }
    }
}

/// Free the task object of a destroyed task, its page tables and capability table.
fn finish_task(k: &mut Kernel, task: TaskId) {
    if let Some(task) = k.tasks.remove(task) {
        if k.loaded_root == task.space.root {
            // A task destroyed by `lifetime::reap` may have been interrupted (or have made
            // the syscall) with its page tables loaded: leave them before they are freed.
            let boot = crate::arch::x86_64::paging::boot_root();
            // SAFETY: the boot PML4 maps the kernel half like every task's.
            unsafe { crate::arch::x86_64::cpu::write_cr3(boot) };
            k.loaded_root = boot;
        }
        task.space.destroy(&mut k.frames);
        // Everything charged on the task's behalf (object, page tables, UTCBs, mapping
        // nodes, I/O bitmap) goes back to its quota.
        crate::lifetime::refund(k, task.quota, task.charged);
    }
}

/// Slots of owned-object arena `arena` (see [`destroy_owned`]).
fn arena_slots(k: &Kernel, arena: u8) -> usize {
    match arena {
        0 => k.gates.slot_count(),
        1 => k.irqs.slot_count(),
        2 => k.vcpus.slot_count(),
        3 => k.vms.slot_count(),
        _ => k.threads.slot_count(),
    }
}

/// Destroy the kernel objects `task` created that are not bound elsewhere, in arena `arena`
/// (0 gates, 1 IRQ objects (their lines become free), 2 vCPUs, 3 VMs, 4 threads never bound
/// to a task), scanning at most `limit` slots from `*cursor` and destroying at most `max`;
/// returns how many it destroyed.
fn destroy_owned(
    k: &mut Kernel,
    task: TaskId,
    arena: u8,
    cursor: &mut usize,
    limit: usize,
    max: usize,
) -> usize {
    match arena {
        0 => {
            let gates = k.gates.drain_where(cursor, limit, max, |g| g.owner == task);
            for (_, gate) in &gates {
                crate::lifetime::refund(k, gate.quota, GATE_BYTES);
            }
            gates.len()
        }
        1 => {
            let irqs = k.irqs.drain_where(cursor, limit, max, |i| i.owner == task);
            for (_, irq) in &irqs {
                crate::irq::destroy(k, irq);
            }
            irqs.len()
        }
        2 => {
            let vcpus = k.vcpus.drain_where(cursor, limit, max, |v| v.owner == task);
            let count = vcpus.len();
            for (_, vcpu) in vcpus {
                crate::vm::destroy_vcpu(k, &vcpu);
            }
            count
        }
        3 => {
            let vms = k.vms.drain_where(cursor, limit, max, |v| v.owner == task);
            let count = vms.len();
            for (id, vm) in vms {
                crate::vm::destroy_vm(k, id, vm);
            }
            count
        }
        _ => {
            let threads = k.threads.drain_where(cursor, limit, max, |t| {
                t.creator == Some(task) && t.task.is_none()
            });
            for (id, thread) in &threads {
                if k.fpu.owner == Some(*id) {
                    k.fpu.owner = None;
                }
                if let Some(quota) = thread.quota {
                    let area = if thread.fpu.is_some() {
                        crate::fpu::AREA_BYTES
                    } else {
                        0
                    };
                    crate::lifetime::refund(k, quota, THREAD_BYTES + area);
                }
            }
            threads.len()
        }
    }
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
        Object::Task(t) if k.tasks.contains(t) => require(cap, rights::CONTROL).map(|_| t)?,
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
    require(cap, rights::CONTROL)?;
    crate::info!(
        "shutdown requested (code {code:#x}); {} tasks, {} threads alive",
        k.tasks.len(),
        k.threads.len()
    );
    outb(l4_abi::qemu_exit::PORT, code as u8);
    crate::info!("halted (without an isa-debug-exit device, QEMU keeps running)");
    crate::arch::x86_64::cpu::halt_forever()
}
