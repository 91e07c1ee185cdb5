//! Task destruction in bounded, restartable steps (`TaskDestroy`, and the kernel's own
//! reaping of tasks whose last reference went): threads, waiters, revocation of what was
//! derived from the task, its capabilities, the objects it created, then the task itself.

use crate::factory::{GATE_BYTES, THREAD_BYTES};
use crate::ipc;
use crate::kernel::Kernel;
use crate::object::{TaskId, ThreadId};

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
            // The UTCB frame was charged to its task (`bind_thread`): refunded as it goes, so
            // that the books stay exact while the task dies in steps (found by the fuzzer:
            // QuotaCheck saw a dying task charged for the UTCBs of threads already freed).
            match thread.task.and_then(|task| k.charged(task)) {
                Some(mut frames) => {
                    crate::memory::FrameSource::free_frame(&mut frames, thread.utcb_frame)
                }
                None => crate::memory::FrameSource::free_frame(&mut k.frames, thread.utcb_frame),
            }
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
            unsafe { crate::arch::x86_64::paging::load_root(boot) };
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
