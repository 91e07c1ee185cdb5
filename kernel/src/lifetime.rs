//! Object lifetime: every capability in a task's table counts as a reference on the object
//! it names, and an object is destroyed when its last reference goes (or, as before, when
//! the task that created it is destroyed, whichever comes first).
//!
//! The rules:
//! * gates, IRQ objects (freeing their line), vCPUs and threads never bound to a task are
//!   destroyed at once when their count drops to zero; a bound thread lives as long as its
//!   task;
//! * a VM counts its capabilities and its vCPUs (each vCPU holds one reference on its VM);
//! * a carved factory quota goes back to its parent when no capability names it *and*
//!   nothing is charged to it any more: objects still charged to it keep it (and the limit
//!   carved from the parent) until the last of them is destroyed ([`release_quota`] is called
//!   wherever an object's bytes are refunded); top-level quotas are never released;
//! * a task counts the capabilities naming it in *other* tasks' tables (its own `SELF_TASK`
//!   and other self-references do not count, or no task would ever be released by its
//!   creator), and the boot tasks hold one kernel reference each; when the count drops to
//!   zero the task becomes dying (its capabilities stop resolving at once) and is queued in
//!   [`Kernel::reaping`]; [`reap`] then destroys it in bounded steps (the `TaskDestroy`
//!   machinery) at the end of every syscall and at every timer tick until it is gone.
//!
//! Kernel-internal references do not count and are tolerated dead: a thread's pager and
//! exception handler and a VM's pager are stored capabilities (IPC through a dead object
//! fails as for a deleted one), a gate names its thread and an IRQ its receiver by id
//! (generation-checked: a dead one reads as absent). Capabilities to objects destroyed with
//! their creator or by `TaskDestroy` become stale; removing them later changes nothing.

use crate::kernel::Kernel;
use crate::object::{Object, QuotaId, TaskId, ThreadId, VmId};

/// Whether a capability held by `holder` naming `object` counts (a task's capabilities to
/// itself do not).
fn counts(holder: TaskId, object: Object) -> bool {
    object != Object::Task(holder)
}

/// A capability naming `object` was put into `holder`'s table.
pub fn acquire(k: &mut Kernel, holder: TaskId, object: Object) {
    if !counts(holder, object) {
        return;
    }
    match object {
        Object::Task(id) => {
            if let Some(t) = k.tasks.get_mut(id) {
                t.references += 1;
            }
        }
        Object::Thread(id) => {
            if let Some(t) = k.threads.get_mut(id) {
                t.references += 1;
            }
        }
        Object::Gate(id) => {
            if let Some(g) = k.gates.get_mut(id) {
                g.references += 1;
            }
        }
        Object::Irq(id) => {
            if let Some(i) = k.irqs.get_mut(id) {
                i.references += 1;
            }
        }
        Object::Vm(id) => {
            if let Some(v) = k.vms.get_mut(id) {
                v.references += 1;
            }
        }
        Object::Vcpu(id) => {
            if let Some(v) = k.vcpus.get_mut(id) {
                v.references += 1;
            }
        }
        Object::Factory(id) => {
            if let Some(q) = k.quotas.get_mut(id) {
                q.add_reference();
            }
        }
        Object::Platform => {}
    }
}

/// A capability naming `object` left `holder`'s table: destroy the object if it was the last
/// reference. A stale capability (its object gone) changes nothing.
pub fn release(k: &mut Kernel, holder: TaskId, object: Object) {
    if !counts(holder, object) {
        return;
    }
    match object {
        Object::Task(id) => {
            let Some(t) = k.tasks.get_mut(id) else { return };
            t.references = t.references.saturating_sub(1);
            if t.references == 0 {
                queue_task(k, id);
            }
        }
        Object::Thread(id) => {
            let Some(t) = k.threads.get_mut(id) else {
                return;
            };
            t.references = t.references.saturating_sub(1);
            if t.references == 0 && t.task.is_none() {
                destroy_unbound_thread(k, id);
            }
        }
        Object::Gate(id) => {
            let Some(g) = k.gates.get_mut(id) else { return };
            g.references = g.references.saturating_sub(1);
            if g.references == 0 {
                if let Some(gate) = k.gates.remove(id) {
                    refund(k, gate.quota, crate::factory::GATE_BYTES);
                }
            }
        }
        Object::Irq(id) => {
            let Some(i) = k.irqs.get_mut(id) else { return };
            i.references = i.references.saturating_sub(1);
            if i.references == 0 {
                if let Some(irq) = k.irqs.remove(id) {
                    crate::irq::destroy(k, &irq);
                }
            }
        }
        Object::Vm(id) => drop_vm_reference(k, id),
        Object::Vcpu(id) => {
            let Some(v) = k.vcpus.get_mut(id) else { return };
            v.references = v.references.saturating_sub(1);
            if v.references == 0 {
                if let Some(vcpu) = k.vcpus.remove(id) {
                    crate::vm::destroy_vcpu(k, &vcpu);
                }
            }
        }
        Object::Factory(id) => {
            let Some(q) = k.quotas.get_mut(id) else {
                return;
            };
            if q.drop_reference() == 0 {
                release_quota(k, id);
            }
        }
        Object::Platform => {}
    }
}

/// Drop one reference (a capability or a vCPU) on VM `id`; destroy it with the last.
pub fn drop_vm_reference(k: &mut Kernel, id: VmId) {
    let Some(v) = k.vms.get_mut(id) else { return };
    v.references = v.references.saturating_sub(1);
    if v.references == 0 {
        if let Some(vm) = k.vms.remove(id) {
            crate::vm::destroy_vm(k, id, vm);
        }
    }
}

/// Give back `bytes` of a destroyed object to `quota`, releasing the quota if that was the
/// last thing charged to it.
pub fn refund(k: &mut Kernel, quota: QuotaId, bytes: u64) {
    if let Some(q) = k.quotas.get_mut(quota) {
        q.refund(bytes);
    }
    release_quota(k, quota);
}

/// If `quota` is carved, unreferenced and empty, remove it and give its limit back to its
/// parent (and so on up, for parents in the same state).
pub fn release_quota(k: &mut Kernel, quota: QuotaId) {
    let mut next = Some(quota);
    while let Some(id) = next.take() {
        let Some(q) = k.quotas.get(id) else { return };
        if !q.is_released() {
            return;
        }
        let (limit, parent) = (q.limit(), q.parent());
        k.quotas.remove(id);
        if let Some(parent) = parent {
            if let Some(p) = k.quotas.get_mut(parent) {
                p.refund(limit);
            }
            next = Some(parent);
        }
    }
}

/// Destroy thread `id`, never bound to a task, whose last capability went: it dies (queued
/// senders fail with `DeadPartner` at once), its object and save area are refunded. Closed
/// receives waiting on it fail with `DeadPartner` when [`tick`]'s scan finds them: a scan
/// of every thread per destroyed thread would make a create/delete loop quadratic.
pub fn destroy_unbound_thread(k: &mut Kernel, id: ThreadId) {
    if k.threads.get(id).is_some_and(|t| t.is_alive()) {
        crate::ipc::let_die(k, id);
    }
    crate::fpu::release(k, id);
    if let Some(thread) = k.threads.remove(id) {
        if let Some(quota) = thread.quota {
            refund(k, quota, crate::factory::THREAD_BYTES);
        }
    }
    if k.waiter_scan.is_some() {
        k.waiter_rescan = true;
    } else {
        k.waiter_scan = Some(0);
    }
}

/// Timer-tick work of object lifetime: one step of a queued task's destruction ([`reap`]),
/// and one bounded step of the scan that fails the closed receives waiting on destroyed
/// never-bound threads (a waiter is failed within a few ticks of the thread's death).
pub fn tick(k: &mut Kernel) {
    if !k.reaping.is_empty() || !k.dying_vms.is_empty() {
        reap(k);
    }
    if let Some(mut cursor) = k.waiter_scan {
        let done = crate::ipc::fail_waiters_of_dead(k, &mut cursor, crate::destroy::STEP_UNITS);
        k.waiter_scan = if !done {
            Some(cursor)
        } else if core::mem::take(&mut k.waiter_rescan) {
            Some(0)
        } else {
            None
        };
    }
}

/// Make task `id` dying and queue it for [`reap`] (unless it is already queued).
fn queue_task(k: &mut Kernel, id: TaskId) {
    let Some(t) = k.tasks.get_mut(id) else { return };
    if t.reaping {
        return;
    }
    t.dying.get_or_insert(crate::task::Dying::Threads);
    t.reaping = true;
    // `new_task` reserved room for every live task, so this does not allocate.
    k.reaping.push(id);
}

/// One bounded step (see `destroy::STEP_UNITS`) of destroying the first dying VM
/// ([`crate::vm::destroy_vm_step`]) or else of the first queued task (`TaskDestroy`'s steps);
/// called at the end of every syscall and at every timer tick while any is queued.
pub fn reap(k: &mut Kernel) {
    if !k.dying_vms.is_empty() {
        crate::vm::destroy_vm_step(k, crate::destroy::STEP_UNITS);
        return;
    }
    let Some(&task) = k.reaping.first() else {
        return;
    };
    if crate::destroy::destroy_task_step(k, task, crate::destroy::STEP_UNITS) {
        k.reaping.remove(0);
    }
}
