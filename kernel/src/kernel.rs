//! The kernel's state (all objects, the frame pool, the scheduler's queues) and the single
//! point of access to it; the scheduler itself is in `sched.rs`.

use crate::object::{Capability, Gate, Object, TaskId, ThreadId};
use crate::task::Task;
use crate::thread::Thread;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use kernel_core::{Arena, ReadyQueues};
use l4_abi::Error;

/// All kernel state.
pub struct Kernel {
    /// Tasks.
    pub tasks: Arena<Task>,
    /// Threads.
    pub threads: Arena<Thread>,
    /// Gates.
    pub gates: Arena<Gate>,
    /// IRQ objects.
    pub irqs: Arena<crate::irq::Irq>,
    /// Kernel-memory quotas (one per factory).
    pub quotas: Arena<kernel_core::Quota>,
    /// Virtual machines.
    pub vms: Arena<crate::vm::Vm>,
    /// Virtual CPUs.
    pub vcpus: Arena<crate::vm::Vcpu>,
    /// SVM state (`None` without SVM and nested paging).
    pub svm: Option<crate::arch::x86_64::svm::Svm>,
    /// The IRQ object of each line.
    pub irq_lines: [Option<crate::object::IrqId>; crate::irq::LINES],
    /// The task whose I/O bitmap is loaded in the TSS (`None`: all ports denied).
    pub io_owner: Option<TaskId>,
    /// Derivation of memory mappings (tasks' pages and VMs' guest-physical pages).
    pub memory_db: kernel_core::MappingDatabase<crate::map::Space>,
    /// Derivation of I/O-port mappings (task, port).
    pub io_db: kernel_core::MappingDatabase<crate::map::Space>,
    /// Derivation of capabilities (task, slot).
    pub cap_db: kernel_core::MappingDatabase<crate::map::Space>,
    /// The kernel memory pool (frames for page tables, UTCBs, VMCBs; the heap grows from it).
    pub frames: crate::memory::Pool,
    /// Runnable threads other than the current one.
    pub ready: ReadyQueues<ThreadId>,
    /// The thread whose frame holds live user state (`None` while idle).
    pub current: Option<ThreadId>,
    /// Set when a thread of higher priority than the current one became ready.
    pub preempt: bool,
    /// Timer ticks since boot.
    pub ticks: u64,
    /// IRQs raised but not yet delivered (the fast path defers to the slow path while any).
    pub pending_irqs: u32,
    /// The FS base last loaded (the running thread's UTCB).
    pub fs_base: u64,
    /// The page-table root last loaded into CR3.
    pub loaded_root: u64,
    /// Timer interrupts per second.
    pub timer_hz: u64,
    /// Threads with an IPC deadline.
    pub timeouts: Vec<ThreadId>,
    /// Physical frame of the kernel info page.
    pub kip_frame: u64,
    /// The next thread number for logs.
    pub next_thread_number: u32,
    /// Which thread's x87/SSE/AVX registers are live, and the switching policy.
    pub fpu: crate::fpu::Fpu,
    /// Tasks whose last capability went, destroyed in steps by [`crate::lifetime::reap`]
    /// (room for every live task is reserved when a task is created).
    pub reaping: Vec<TaskId>,
    /// VMs whose last reference went (or whose creator died), destroyed in steps by
    /// [`crate::vm::destroy_vm_step`] (room for every live VM is reserved at creation).
    pub dying_vms: Vec<crate::vm::DyingVm>,
    /// A scan for closed receives waiting on a destroyed never-bound thread, in progress
    /// from this thread slot (see [`crate::lifetime::tick`]).
    pub waiter_scan: Option<usize>,
    /// Another such thread was destroyed during the scan: scan once more after it.
    pub waiter_rescan: bool,
}

struct KernelCell(UnsafeCell<MaybeUninit<Kernel>>);

// SAFETY: the kernel runs on one CPU with interrupts disabled; see `kernel()`.
unsafe impl Sync for KernelCell {}

static KERNEL: KernelCell = KernelCell(UnsafeCell::new(MaybeUninit::uninit()));

/// Install the kernel state (once, at boot).
pub fn install(kernel: Kernel) {
    // SAFETY: called once before any call of `kernel()`.
    unsafe { (*KERNEL.0.get()).write(kernel) };
}

/// The kernel state.
///
/// Each kernel entry (syscall, interrupt) calls this exactly once and passes the reference
/// down, so no two references are alive at once. The kernel is single-CPU and not
/// re-entrant (interrupts stay disabled in kernel mode).
pub fn kernel() -> &'static mut Kernel {
    // SAFETY: `install` ran at boot; uniqueness as documented above.
    unsafe { (*KERNEL.0.get()).assume_init_mut() }
}

impl Kernel {
    /// The current thread (panics while idle: only called on paths that have one).
    pub fn current_id(&self) -> ThreadId {
        self.current.expect("no current thread")
    }

    /// A live thread.
    pub fn thread(&mut self, id: ThreadId) -> &mut Thread {
        self.threads.get_mut(id).expect("stale thread id")
    }

    /// The task of thread `id`.
    pub fn task_of(&self, id: ThreadId) -> Option<TaskId> {
        self.threads.get(id).and_then(|t| t.task)
    }

    /// Look up slot `slot` of the current thread's task: it must hold a capability to a live
    /// object.
    pub fn lookup(&self, slot: u64) -> Result<Capability, Error> {
        let task = self
            .task_of(self.current_id())
            .ok_or(Error::InvalidCapability)?;
        self.lookup_in(task, slot)
    }

    /// Look up `slot` in `task`.
    pub fn lookup_in(&self, task: TaskId, slot: u64) -> Result<Capability, Error> {
        let task = self.tasks.get(task).ok_or(Error::InvalidCapability)?;
        let cap = *task.caps.get(slot).map_err(|_| Error::InvalidCapability)?;
        let alive = match cap.object {
            Object::Task(id) => self.tasks.get(id).is_some_and(|t| t.dying.is_none()),
            Object::Thread(id) => self.threads.contains(id),
            Object::Gate(id) => self.gates.contains(id),
            Object::Irq(id) => self.irqs.contains(id),
            Object::Vm(id) => self.vms.contains(id),
            Object::Vcpu(id) => self.vcpus.contains(id),
            Object::Factory(id) => self.quotas.contains(id),
            Object::Platform => true,
        };
        if alive {
            Ok(cap)
        } else {
            Err(Error::InvalidCapability)
        }
    }

    /// Resolve an IPC destination capability to the receiving thread and the badge.
    pub fn ipc_target(&self, cap: Capability) -> Result<(ThreadId, u64), Error> {
        if !cap.rights.contains(l4_abi::Rights::SEND) {
            return Err(Error::NoRights);
        }
        let thread = match cap.object {
            Object::Thread(id) => id,
            Object::Gate(id) => self.gates.get(id).ok_or(Error::InvalidCapability)?.thread,
            _ => return Err(Error::WrongType),
        };
        match self.threads.get(thread) {
            Some(t) if t.is_alive() => Ok((thread, cap.badge)),
            _ => Err(Error::DeadPartner),
        }
    }

    /// Note that `task` now has an I/O bitmap (its threads' switch path must load it).
    pub fn mark_io_task(&mut self, task: TaskId) {
        let threads = self
            .tasks
            .get(task)
            .map(|t| t.threads.clone())
            .unwrap_or_default();
        for t in threads {
            if let Some(thread) = self.threads.get_mut(t) {
                thread.task_has_io = true;
            }
        }
    }
}

impl Kernel {
    /// Frames for `task`'s page tables and UTCBs, charged to its quota.
    pub fn charged(&mut self, task: TaskId) -> Option<crate::memory::Charged<'_>> {
        self.space_frames(crate::map::Space::Task(task))
    }

    /// Frames for the page tables of `space` (a task's, or a VM's nested ones), charged to
    /// its quota.
    pub fn space_frames(&mut self, space: crate::map::Space) -> Option<crate::memory::Charged<'_>> {
        let (quota, charged) = ledger(&mut self.tasks, &mut self.vms, &mut self.quotas, space)?;
        Some(crate::memory::Charged {
            frames: &mut self.frames,
            quota: quota?,
            charged,
        })
    }

    /// Charge `bytes` of kernel memory to `task`'s quota.
    pub fn charge_task(&mut self, task: TaskId, bytes: u64) -> Result<(), Error> {
        self.charge_space(crate::map::Space::Task(task), bytes)
    }

    /// Charge `bytes` of kernel memory to the quota of `space` (if the kernel keeps its
    /// reserve, see [`crate::memory::reserve_kept`]).
    pub fn charge_space(&mut self, space: crate::map::Space, bytes: u64) -> Result<(), Error> {
        let (quota, charged) = ledger(&mut self.tasks, &mut self.vms, &mut self.quotas, space)
            .ok_or(Error::InvalidCapability)?;
        let quota = quota.ok_or(Error::InvalidCapability)?;
        crate::memory::reserve_kept()?;
        quota.charge(bytes).map_err(|_| Error::OutOfMemory)?;
        *charged += bytes;
        Ok(())
    }

    /// Give back `bytes` charged to `space` earlier.
    pub fn refund_space(&mut self, space: crate::map::Space, bytes: u64) {
        if let Some((quota, charged)) =
            ledger(&mut self.tasks, &mut self.vms, &mut self.quotas, space)
        {
            if let Some(quota) = quota {
                quota.refund(bytes);
            }
            *charged = charged.saturating_sub(bytes);
        }
    }

    /// Give back `bytes` charged to `task` earlier.
    pub fn refund_task(&mut self, task: TaskId, bytes: u64) {
        self.refund_space(crate::map::Space::Task(task), bytes)
    }
}

/// Where the charges of `space` go: its quota (`None` if it is gone) and its running total
/// (refunded in one sum when the task or VM is destroyed).
fn ledger<'a>(
    tasks: &'a mut Arena<Task>,
    vms: &'a mut Arena<crate::vm::Vm>,
    quotas: &'a mut Arena<kernel_core::Quota>,
    space: crate::map::Space,
) -> Option<(Option<&'a mut kernel_core::Quota>, &'a mut u64)> {
    let (quota, charged) = match space {
        crate::map::Space::Task(task) => {
            let t = tasks.get_mut(task)?;
            (t.quota, &mut t.charged)
        }
        crate::map::Space::Vm(vm) => {
            let v = vms.get_mut(vm)?;
            (v.quota, &mut v.charged)
        }
    };
    Some((quotas.get_mut(quota), charged))
}
