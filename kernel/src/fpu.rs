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
//! say the CPU is not as this thread needs it.
//!
//! Guests (with XCR0 switching, i.e. XSAVE) take part the same way. A VM run hands the
//! registers to the guest ([`surrender`]): the owner's are saved first, so a VMM thread gets
//! its own state back after `VcpuRun` and never a guest's; the guest's state is loaded from its
//! vCPU's area. After the run the registers still hold the guest's values: that vCPU is the
//! live *guest* ([`Fpu::guest`]; owner and guest are never both set), with CR0.TS as before
//! the run (VMRUN loads the guest's CR0 and the exit restores the host's). The next run of the
//! same vCPU finds them in place and loads nothing, the common case of a VMM whose exit
//! handling does not touch the registers. Whatever else needs them first, a thread's first
//! use (#NM, or the eager switch) or another vCPU's run, saves them to the vCPU's area first
//! ([`evict_guest`]). Between runs XCR0 is always the user one: a guest's smaller or larger
//! XCR0 is set only around its runs, and changing XCR0 leaves the state of the components it
//! no longer covers unmodified (Intel SDM vol. 1, 13.1; QEMU's XSETBV changes only XCR0), so
//! the eviction, made with XCR0 covering every component a guest may use, saves them all.

use crate::arch::x86_64::fpu::{self as hw, Area, Hardware, INITIAL};
use crate::arch::x86_64::svm;
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
    /// The vCPU whose guest registers are live in the CPU, by its extended-state area (a
    /// frame; `None`: no guest's). Set only while `owner` is `None`.
    pub guest: Option<u64>,
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
            guest: None,
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

    /// Save the owner's registers (if another thread owns them) or a live guest's, load
    /// `id`'s and make it the owner. CR0.TS must be clear.
    fn load_fpu(&mut self, id: ThreadId) {
        if self.fpu.owner == Some(id) {
            return;
        }
        save_live(self);
        if let Some(t) = self.threads.get_mut(id) {
            self.fpu
                .hardware
                .restore(t.fpu.as_deref().unwrap_or(&INITIAL));
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

/// Hand the registers to a guest about to run on behalf of the current thread, whose state
/// is not live (see [`Fpu::guest`]): the owner's are saved, or another live guest's, and with
/// `clear` the initial state is loaded (needed when the guest's own state is not loaded over
/// all of them: without XSAVE the guest would otherwise see the owner's); afterwards nobody
/// owns the registers and CR0.TS is clear, so the kernel may load the guest's state. The next
/// thread to run gets its own state back through the usual switch.
pub fn surrender(k: &mut Kernel, clear: bool) {
    if k.fpu.trap {
        hw::clear_task_switched();
        k.fpu.trap = false;
    }
    save_live(k);
    if clear {
        k.fpu.hardware.restore(&INITIAL);
    }
}

/// Save whatever is live in the registers, the owner's (it owns them no longer) or a guest's,
/// so that they can be loaded with someone else's. CR0.TS must be clear.
fn save_live(k: &mut Kernel) {
    if k.fpu.guest.is_some() {
        evict_guest(k);
    } else if let Some(owner) = k.fpu.owner.take() {
        let hardware = k.fpu.hardware;
        if let Some(t) = k.threads.get_mut(owner) {
            t.fpu_loaded = false;
            if let Some(area) = t.fpu.as_deref_mut() {
                hardware.save(area);
            }
        }
    }
}

/// Save the live guest's registers to its vCPU's area and make them nobody's. XCR0 is the user
/// one (as between all runs); the save is made with XCR0 covering all of the area's
/// components. CR0.TS must be clear.
fn evict_guest(k: &mut Kernel) {
    let Some(area) = k.fpu.guest.take() else {
        return;
    };
    let Some(all) = k.svm.as_ref().map(|s| s.xstate) else {
        return;
    };
    let user = k.fpu.hardware.xcr0;
    // SAFETY: a guest is live only with XCR0 switching (CR4.OSXSAVE set, `all` a valid XCR0
    // covering the user one); `area` is that vCPU's extended-state frame, live (destroying the
    // vCPU forgets it first, `forget_guest`) and used only for this.
    unsafe {
        if user != all {
            svm::set_xcr0(all);
        }
        svm::xsave(area, all);
        if user != all {
            svm::set_xcr0(user);
        }
    }
}

/// The vCPU whose extended-state area is `area` goes: its registers, if live, are nobody's (the
/// next restore overwrites them, as a dead thread's).
pub fn forget_guest(k: &mut Kernel, area: u64) {
    if k.fpu.guest == Some(area) {
        k.fpu.guest = None;
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
