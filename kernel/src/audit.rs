//! The quota self-check ([`l4_abi::Syscall::QuotaCheck`]): reads one factory's quota and,
//! on request, checks the kernel's books on kernel memory against what is actually held.
//!
//! Two identities are checked, without changing any state:
//! * **the ledger**: each quota's `used` equals the sum of what is charged to it: the
//!   `charged` total of each task of that quota, each VM's `charged` plus its object and root table, each vCPU, thread (with its x87/SSE/AVX area while it has one) and
//!   gate, and the whole limit of each sub-factory carved out of it;
//! * **the holdings**: each task's `charged` equals its object ([`TASK_BYTES`]), its user
//!   page-table frames below the PML4, the UTCB frames of its threads, its mapping-database
//!   nodes (memory, I/O ports, capabilities) and its I/O bitmap; each VM's `charged` equals
//!   its nested page-table frames below the root and its mapping nodes. Tasks of the kernel's
//!   unlimited boot quota (sigma0, the root task) got their boot image tables, sigma0's window
//!   and the root task's I/O bitmap from the kernel for free: for them `charged` may only be
//!   less than what they hold.
//!
//! A third identity concerns object lifetime: each object's reference count equals the
//! capabilities that name it (see `lifetime`), and no carved quota that nothing names or uses
//! is left.
//!
//! IRQ objects are not charged to any quota (the platform capability that makes them has
//! none; their number is bounded by the interrupt lines), so they do not appear here.

use crate::factory::{GATE_BYTES, TASK_BYTES, THREAD_BYTES};
use crate::kernel::Kernel;
use crate::map::{Space, NODE_BYTES};
use crate::memory::FRAME_BYTES;
use crate::object::{Object, QuotaId, ThreadId};
use alloc::vec::Vec;
use l4_abi::{Error, QuotaCheckFlags};

/// What is held for one quota, by kind.
#[derive(Clone, Copy, Default, Debug)]
struct Held {
    tasks: u64,
    vms: u64,
    vcpus: u64,
    threads: u64,
    gates: u64,
    factories: u64,
}

impl Held {
    fn total(&self) -> u64 {
        self.tasks + self.vms + self.vcpus + self.threads + self.gates + self.factories
    }
}

use crate::vm::{VCPU_BYTES, VM_BYTES};

/// [`l4_abi::Syscall::QuotaCheck`] for thread `caller`: the quota of factory slot `factory`
/// into its `rdi`/`rsi`, the number of inconsistencies found into `rdx`.
pub fn quota_check(
    k: &mut Kernel,
    caller: ThreadId,
    factory: u64,
    flags: u64,
) -> Result<(), Error> {
    let cap = k.lookup(factory)?;
    let Object::Factory(quota) = cap.object else {
        return Err(Error::WrongType);
    };
    let flags = QuotaCheckFlags::from_bits(flags).ok_or(Error::InvalidArgument)?;
    let q = k.quotas.get(quota).ok_or(Error::InvalidCapability)?;
    let (used, limit) = (q.used(), q.limit());
    let mismatches = if flags.contains(QuotaCheckFlags::ALL) {
        check_all(k)?
    } else {
        0
    };
    let f = &mut k.thread(caller).frame;
    f.rdi = used;
    f.rsi = limit;
    f.rdx = mismatches;
    Ok(())
}

/// Check the ledger of every quota and the holdings of every task and VM; returns the number
/// of inconsistencies and logs the first of each kind.
fn check_all(k: &Kernel) -> Result<u64, Error> {
    let slots = k
        .quotas
        .ids()
        .map(|q| q.index as usize + 1)
        .max()
        .unwrap_or(0);
    let mut held: Vec<Held> = Vec::new();
    // The only allocation: fallible (the check may run with the heap at its reserve).
    held.try_reserve_exact(slots)
        .map_err(|_| Error::OutOfMemory)?;
    held.resize(slots, Held::default());
    let mut add = |quota: QuotaId, field: fn(&mut Held) -> &mut u64, bytes: u64| {
        if let Some(h) = held.get_mut(quota.index as usize) {
            *field(h) += bytes;
        }
    };
    for id in k.tasks.ids() {
        let t = k.tasks.get(id).expect("listed");
        add(t.quota, |h| &mut h.tasks, t.charged);
    }
    for id in k.vms.ids() {
        let v = k.vms.get(id).expect("listed");
        add(v.quota, |h| &mut h.vms, v.charged + VM_BYTES);
    }
    // A dying VM keeps its whole charge until its last destruction step.
    for d in &k.dying_vms {
        add(d.vm.quota, |h| &mut h.vms, d.vm.charged + VM_BYTES);
    }
    for id in k.vcpus.ids() {
        add(
            k.vcpus.get(id).expect("listed").quota,
            |h| &mut h.vcpus,
            VCPU_BYTES,
        );
    }
    for id in k.threads.ids() {
        let t = k.threads.get(id).expect("listed");
        if let Some(quota) = t.quota {
            let area = if t.fpu.is_some() {
                crate::fpu::AREA_BYTES
            } else {
                0
            };
            add(quota, |h| &mut h.threads, THREAD_BYTES + area);
        }
    }
    for id in k.gates.ids() {
        let gate = k.gates.get(id).expect("listed");
        add(gate.quota, |h| &mut h.gates, GATE_BYTES);
    }
    for id in k.quotas.ids() {
        let q = k.quotas.get(id).expect("listed");
        if let Some(parent) = q.parent() {
            add(parent, |h| &mut h.factories, q.limit());
        }
    }
    let mut mismatches = 0;
    for id in k.quotas.ids() {
        let q = k.quotas.get(id).expect("listed");
        let h = held[id.index as usize];
        if q.used() != h.total() {
            if mismatches == 0 {
                crate::warn!(
                    "quota check: quota {} (limit {:#x}): used {}, but {} held for it ({h:?})",
                    id.index,
                    q.limit(),
                    q.used(),
                    h.total()
                );
            }
            mismatches += 1;
        }
    }
    let quota_mismatches = mismatches;
    for id in k.tasks.ids() {
        let t = k.tasks.get(id).expect("listed");
        let space = Space::Task(id);
        let nodes =
            k.memory_db.count_in(space) + k.io_db.count_in(space) + k.cap_db.count_in(space);
        let utcbs = t
            .threads
            .iter()
            .filter(|&&th| k.threads.get(th).is_some_and(|x| x.utcb_frame != 0))
            .count() as u64;
        let tables = t.space.table_frames();
        let bitmap = if t.io_bitmap.is_some() {
            crate::task::IO_BITMAP_BYTES as u64
        } else {
            0
        };
        // The mapping databases' index memory of the task's space.
        let index = k.memory_db.index_bytes(space)
            + k.io_db.index_bytes(space)
            + k.cap_db.index_bytes(space);
        let holds = TASK_BYTES
            + NODE_BYTES * nodes as u64
            + index
            + FRAME_BYTES * (tables + utcbs)
            + bitmap;
        // sigma0 and the root task got their images' page tables (and the root its I/O
        // bitmap) from the kernel at boot, uncharged.
        let boot = t.loaded_at_boot;
        // A dying task is destroyed in steps and keeps its charge until the last one (like a
        // dying VM): what it holds shrinks first, what it is charged never falls below that.
        let consistent = if boot {
            t.charged <= holds
        } else if t.dying.is_some() {
            t.charged >= holds
        } else {
            t.charged == holds
        };
        if !consistent {
            if mismatches == quota_mismatches {
                crate::warn!(
                    "quota check: task '{}': charged {}, but holds {holds} ({tables} page tables, {utcbs} UTCBs, {nodes} mapping nodes, index {index}, I/O bitmap {bitmap})",
                    t.name(),
                    t.charged
                );
            }
            mismatches += 1;
        }
    }
    let task_mismatches = mismatches;
    for id in k.vms.ids() {
        let v = k.vms.get(id).expect("listed");
        let nodes = k.memory_db.count_in(Space::Vm(id)) as u64;
        let index = k.memory_db.index_bytes(Space::Vm(id));
        let tables = v.npt.table_frames();
        let holds = NODE_BYTES * nodes + index + FRAME_BYTES * tables;
        if v.charged != holds {
            if mismatches == task_mismatches {
                crate::warn!(
                    "quota check: VM {}: charged {}, but holds {holds} ({tables} nested page tables, {nodes} mapping nodes, index {index})",
                    id.index,
                    v.charged
                );
            }
            mismatches += 1;
        }
    }
    Ok(mismatches + check_references(k)?)
}

/// The third identity: each object's reference count equals the capabilities naming it in
/// the tables of tasks other than itself, plus one per vCPU for a VM and one kernel reference
/// for each boot task (see `lifetime`). Returns the number of objects whose count differs.
fn check_references(k: &Kernel) -> Result<u64, Error> {
    let counter = |slots: usize| -> Result<Vec<u64>, Error> {
        let mut v = Vec::new();
        v.try_reserve_exact(slots).map_err(|_| Error::OutOfMemory)?;
        v.resize(slots, 0);
        Ok(v)
    };
    let mut tasks = counter(k.tasks.slot_count())?;
    let mut threads = counter(k.threads.slot_count())?;
    let mut gates = counter(k.gates.slot_count())?;
    let mut irqs = counter(k.irqs.slot_count())?;
    let mut vms = counter(k.vms.slot_count())?;
    let mut vcpus = counter(k.vcpus.slot_count())?;
    let mut quotas = counter(k.quotas.slot_count())?;
    for holder in k.tasks.ids() {
        let t = k.tasks.get(holder).expect("listed");
        if t.loaded_at_boot {
            tasks[holder.index as usize] += 1;
        }
        for (_, cap) in t.caps.iter() {
            let (count, id) = match cap.object {
                Object::Task(id) if id == holder => continue,
                Object::Task(id) if k.tasks.contains(id) => (&mut tasks, id),
                Object::Thread(id) if k.threads.contains(id) => (&mut threads, id),
                Object::Gate(id) if k.gates.contains(id) => (&mut gates, id),
                Object::Irq(id) if k.irqs.contains(id) => (&mut irqs, id),
                Object::Vm(id) if k.vms.contains(id) => (&mut vms, id),
                Object::Vcpu(id) if k.vcpus.contains(id) => (&mut vcpus, id),
                Object::Factory(id) if k.quotas.contains(id) => (&mut quotas, id),
                _ => continue,
            };
            count[id.index as usize] += 1;
        }
    }
    for id in k.vcpus.ids() {
        let vm = k.vcpus.get(id).expect("listed").vm;
        if k.vms.contains(vm) {
            vms[vm.index as usize] += 1;
        }
    }
    let mut mismatches = 0;
    let mut compare = |kind: &str, index: u32, have: u64, want: u64| {
        if have != want {
            if mismatches == 0 {
                crate::warn!(
                    "quota check: {kind} {index}: {have} references counted, {want} capabilities"
                );
            }
            mismatches += 1;
        }
    };
    for id in k.tasks.ids() {
        let have = k.tasks.get(id).expect("listed").references;
        compare("task", id.index, have, tasks[id.index as usize]);
    }
    for id in k.threads.ids() {
        let have = k.threads.get(id).expect("listed").references;
        compare("thread", id.index, have, threads[id.index as usize]);
    }
    for id in k.gates.ids() {
        let have = k.gates.get(id).expect("listed").references;
        compare("gate", id.index, have, gates[id.index as usize]);
    }
    for id in k.irqs.ids() {
        let have = k.irqs.get(id).expect("listed").references;
        compare("IRQ", id.index, have, irqs[id.index as usize]);
    }
    for id in k.vms.ids() {
        let have = k.vms.get(id).expect("listed").references;
        compare("VM", id.index, have, vms[id.index as usize]);
    }
    for id in k.vcpus.ids() {
        let have = k.vcpus.get(id).expect("listed").references;
        compare("vCPU", id.index, have, vcpus[id.index as usize]);
    }
    for id in k.quotas.ids() {
        let q = k.quotas.get(id).expect("listed");
        compare(
            "factory",
            id.index,
            q.references(),
            quotas[id.index as usize],
        );
        // A carved quota nothing names or uses should have gone back to its parent.
        compare("released factory", id.index, q.is_released() as u64, 0);
    }
    Ok(mismatches)
}
