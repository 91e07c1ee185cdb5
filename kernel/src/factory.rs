//! Object construction: what tasks, threads and gates cost in kernel memory, creating them
//! (charged to a quota first), binding a thread to its task, and the `FactoryCreate` system
//! call that makes every kind of object.

use crate::arch::x86_64::paging::{
    phys_to_virt, AddressSpace, NO_EXECUTE, PAGE_4K, USER, WRITABLE,
};
use crate::destroy::destroy_task;
use crate::kernel::Kernel;
use crate::memory::FrameSource;
use crate::object::{Capability, Gate, Object, QuotaId, TaskId, ThreadId};
use crate::syscall::{current_task, ipc_cap, require, thread_cap};
use crate::task::Task;
use crate::thread::Thread;
use l4_abi::{Error, ObjectKind, Rights, Utcb, KIP_ADDRESS, NO_CAP};

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
    charge(k, quota, bytes)?;
    let Some(area) = crate::fpu::new_area() else {
        refund(k, quota, bytes);
        return Err(Error::OutOfMemory);
    };
    k.next_thread_number += 1;
    let mut thread = Thread::new(k.next_thread_number);
    thread.fpu = Some(area);
    thread.quota = Some(quota);
    thread.creator = k.current.and_then(|c| k.task_of(c));
    k.threads.try_insert(thread).map_err(|_| {
        // The save area goes with the thread.
        refund(k, quota, bytes);
        Error::OutOfMemory
    })
}

/// Charge `bytes` for a new object to `quota` (if the kernel keeps its reserve).
pub(crate) fn charge(k: &mut Kernel, quota: QuotaId, bytes: u64) -> Result<(), Error> {
    crate::memory::reserve_kept()?;
    k.quotas
        .get_mut(quota)
        .ok_or(Error::InvalidCapability)?
        .charge(bytes)
        .map_err(|_| Error::OutOfMemory)
}

/// Give back `bytes` charged to `quota` for an object that could not be made.
pub(crate) fn refund(k: &mut Kernel, quota: QuotaId, bytes: u64) {
    if let Some(q) = k.quotas.get_mut(quota) {
        q.refund(bytes);
    }
}

/// `FactoryCreate`: make an object of `kind` through `factory` into `slot`.
pub fn factory_create(
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
    require(cap, Rights::CONTROL)?;
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
                } if rights.contains(Rights::CONTROL) => vm,
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
