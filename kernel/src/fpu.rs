//! Per-thread x87/SSE/AVX state. Every thread has its own save area (kernel memory charged to
//! its quota with the thread object, freed when it dies); a new thread starts in the initial
//! state. At most one thread's registers are live in the CPU at a time: the *owner*'s.
//!
//! Two policies, chosen at boot (kernel command line `eagerfpu`, default lazy):
//! * **lazy**: switching to a thread other than the owner only sets CR0.TS; the thread's first
//!   x87/SSE/AVX instruction raises #NM, which saves the owner's registers, loads the thread's
//!   and makes it the owner. Threads that do not touch the registers between switches cost
//!   nothing but the CR0 write when the owner changes hands.
//! * **eager**: switching to a thread other than the owner saves the owner's registers and
//!   loads the thread's right away; CR0.TS is never set.
//!
//! Either way, the switch path ([`Kernel::resume_thread`], also the IPC fast path's) tests one
//! per-thread flag against one kernel flag and calls [`Kernel::switch_fpu`] only when they
//! say the CPU is not as this thread needs it. A VM run hands the registers to the guest
//! ([`surrender`]): the owner's are saved first, so a VMM thread gets its own state back after
//! `VcpuRun` and never a guest's. After the run the registers hold the guest's values (its
//! copy is saved in the vCPU) and belong to nobody: every thread loads its own before it can
//! reach them, and the next guest's XRSTOR replaces them all.

use crate::arch::x86_64::fpu::{self as hw, Area, Hardware, INITIAL};
use crate::kernel::Kernel;
use crate::object::ThreadId;
use alloc::boxed::Box;

/// Bytes of kernel memory of a thread's save area (charged with the thread object).
pub const AREA_BYTES: u64 = crate::memory::object_bytes(core::mem::size_of::<Area>());

/// The kernel's FPU bookkeeping.
pub struct Fpu {
    /// What the CPU offers and how registers are saved.
    pub hardware: Hardware,
    /// The thread whose registers are live in the CPU (`None`: nobody's; the registers hold
    /// a dead thread's, a guest's or the initial state, which no thread sees: each loads its
    /// own before its first use).
    pub owner: Option<ThreadId>,
    /// Whether CR0.TS is set (lazy policy only; always false when eager).
    pub trap: bool,
    /// Whether the eager policy is in force.
    pub eager: bool,
}

impl Fpu {
    /// Enable the registers for user mode (boot).
    pub fn init(eager: bool) -> Fpu {
        let hardware = hw::init();
        crate::info!(
            "FPU: {:?}, user XCR0 {:#x}, {} switching",
            hardware.method,
            hardware.xcr0,
            if eager { "eager" } else { "lazy" }
        );
        Fpu {
            hardware,
            owner: None,
            trap: false,
            eager,
        }
    }
}

/// A save area in the initial state, or `None` if the kernel heap has no room.
pub fn new_area() -> Option<Box<Area>> {
    let layout = core::alloc::Layout::new::<Area>();
    // SAFETY: the layout has a non-zero size.
    let pointer = unsafe { alloc::alloc::alloc(layout) }.cast::<Area>();
    if pointer.is_null() {
        return None;
    }
    // SAFETY: `pointer` is a fresh allocation of `Area`'s layout: writing the initial image
    // makes it a valid `Area`, which the box then owns (and frees with the global allocator).
    unsafe {
        pointer.write(Area::initial());
        Some(Box::from_raw(pointer))
    }
}

impl Kernel {
    /// Make the CPU's FPU state right for thread `id`, about to run: called by
    /// [`Kernel::resume_thread`] when `id`'s `fpu_loaded` equals `fpu.trap`, i.e. when `id`
    /// owns the registers but CR0.TS is set, or it does not and TS is clear.
    #[cold]
    #[inline(never)]
    pub fn switch_fpu(&mut self, id: ThreadId) {
        if self.fpu.trap {
            // Only the owner's flag can equal a set TS.
            hw::clear_task_switched();
            self.fpu.trap = false;
        } else if self.fpu.eager {
            self.load_fpu(id);
        } else {
            hw::set_task_switched();
            self.fpu.trap = true;
        }
    }

    /// Save the owner's registers (if another thread owns them), load `id`'s and make it the
    /// owner. CR0.TS must be clear.
    fn load_fpu(&mut self, id: ThreadId) {
        let hardware = self.fpu.hardware;
        if let Some(owner) = self.fpu.owner.take() {
            if owner == id {
                self.fpu.owner = Some(id);
                return;
            }
            if let Some(t) = self.threads.get_mut(owner) {
                t.fpu_loaded = false;
                if let Some(area) = t.fpu.as_deref_mut() {
                    hardware.save(area);
                }
            }
        }
        if let Some(t) = self.threads.get_mut(id) {
            hardware.restore(t.fpu.as_deref().unwrap_or(&INITIAL));
            t.fpu_loaded = true;
            self.fpu.owner = Some(id);
        }
    }
}

/// #NM from user mode in the current thread (lazy policy: its first FPU instruction since it
/// was switched to): give it its registers. The caller then resumes it.
pub fn device_not_available(k: &mut Kernel) {
    let Some(id) = k.current else { return };
    if k.fpu.trap {
        hw::clear_task_switched();
        k.fpu.trap = false;
    }
    k.load_fpu(id);
}

/// Hand the registers to a guest about to run on behalf of the current thread: the owner's
/// are saved, and with `clear` the initial state is loaded (needed when the guest's own state
/// is not loaded over all of them: without XSAVE the guest would otherwise see the owner's);
/// afterwards nobody owns the registers and CR0.TS is clear, so the kernel may load the
/// guest's state. The next thread to run gets its own state back through the usual switch.
pub fn surrender(k: &mut Kernel, clear: bool) {
    if k.fpu.trap {
        hw::clear_task_switched();
        k.fpu.trap = false;
    }
    let hardware = k.fpu.hardware;
    if let Some(owner) = k.fpu.owner.take() {
        if let Some(t) = k.threads.get_mut(owner) {
            t.fpu_loaded = false;
            if let Some(area) = t.fpu.as_deref_mut() {
                hardware.save(area);
            }
        }
    }
    if clear {
        hardware.restore(&INITIAL);
    }
}

/// Thread `id` died (or its object goes): free its save area and refund it to the thread's
/// quota; its registers, if live, are nobody's (the next owner's restore overwrites them all).
pub fn release(k: &mut Kernel, id: ThreadId) {
    if k.fpu.owner == Some(id) {
        k.fpu.owner = None;
    }
    let Some(t) = k.threads.get_mut(id) else {
        return;
    };
    t.fpu_loaded = false;
    if t.fpu.take().is_some() {
        if let Some(quota) = t.quota.and_then(|q| k.quotas.get_mut(q)) {
            quota.refund(AREA_BYTES);
        }
    }
}
