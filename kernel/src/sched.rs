//! The scheduler: 256 priorities, round robin with timeslices within one, preemption by a
//! woken thread of higher priority; and the switch to user mode (address space, UTCB, I/O
//! bitmap, lazy FPU state).

use crate::arch::x86_64::entry::return_to_user;
use crate::kernel::Kernel;
use crate::object::{TaskId, ThreadId};
use crate::thread::{Thread, ThreadState};
use x86_64::registers::model_specific::FsBase;

impl Kernel {
    /// Make `id` runnable; ask for preemption if it outranks the current thread.
    pub fn wake(&mut self, id: ThreadId) {
        let current_priority = self
            .current
            .and_then(|c| self.threads.get(c))
            .map(|t| t.priority);
        let thread = self.thread(id);
        thread.state = ThreadState::Ready;
        thread.deadline = None;
        let priority = thread.priority;
        self.ready.enqueue(id, priority);
        if current_priority.is_some_and(|p| priority > p) {
            self.preempt = true;
        }
    }

    /// Whether the running thread (at `priority`, with `remaining` ticks of its slice) runs on
    /// when the kernel schedules: no ready thread outranks it, and, with its slice used up,
    /// none of its priority waits for its turn.
    #[inline]
    fn keeps_running(&self, priority: u8, remaining: u32) -> bool {
        let highest = self.ready.highest();
        let outranked = highest.is_some_and(|p| p > priority);
        let rotate = remaining == 0 && highest.is_some_and(|p| p >= priority);
        !outranked && !rotate
    }

    /// Return to user mode in the current thread `id` (at `thread`) if [`Kernel::schedule`]
    /// would pick it: it is ready and [`Kernel::keeps_running`]; returns otherwise.
    ///
    /// # Safety
    /// `thread` must point to the live, boxed thread `id`, and no reference to it may be held.
    #[inline(always)]
    pub unsafe fn continue_current(&mut self, id: ThreadId, thread: *mut Thread) {
        // SAFETY: per the caller.
        let (ready, priority, remaining) = unsafe {
            (
                matches!((*thread).state, ThreadState::Ready),
                (*thread).priority,
                (*thread).remaining,
            )
        };
        if !ready || !self.keeps_running(priority, remaining) {
            return;
        }
        self.preempt = false;
        if remaining == 0 {
            // SAFETY: as above.
            unsafe { (*thread).remaining = (*thread).timeslice };
        }
        // SAFETY: as above.
        unsafe { self.resume_thread(id, thread) }
    }

    /// Pick the next thread and return to user mode in it (or idle).
    pub fn schedule(&mut self) -> ! {
        if let Some(current) = self.current {
            if let Some(thread) = self.threads.get_ptr(current) {
                // SAFETY: just looked up: the live thread `current`.
                unsafe { self.continue_current(current, thread) };
                let t = self.thread(current);
                if t.state == ThreadState::Ready {
                    let priority = t.priority;
                    if t.remaining == 0 {
                        t.remaining = t.timeslice;
                        self.ready.enqueue(current, priority);
                    } else {
                        self.ready.enqueue_front(current, priority);
                    }
                }
            }
        }
        self.preempt = false;
        while let Some((next, _)) = self.ready.dequeue() {
            if self
                .threads
                .get(next)
                .is_some_and(|t| t.state == ThreadState::Ready)
            {
                self.resume(next);
            }
        }
        self.current = None;
        idle()
    }

    /// Return to user mode in thread `id`.
    pub fn resume(&mut self, id: ThreadId) -> ! {
        let thread = self.threads.get(id).expect("resuming a dead thread");
        // SAFETY: just looked up: the live thread `id`.
        unsafe { self.resume_thread(id, thread as *const Thread) }
    }

    /// Make the CPU's FPU state right for thread `id` (at `thread`), about to return to user
    /// mode: one flag against one kernel flag, [`Kernel::switch_fpu`] only when they differ.
    ///
    /// # Safety
    /// `thread` must point to the live, boxed thread `id`; no reference to it may be held (the
    /// flag is read through the pointer, and the switch may change it).
    #[inline(always)]
    unsafe fn fpu_for(&mut self, id: ThreadId, thread: *const Thread) {
        // SAFETY: per the caller.
        if unsafe { (*thread).fpu_loaded } == self.fpu.trap {
            self.switch_fpu(id);
        }
    }

    /// Return to user mode in the current thread `id` (at `thread`) after a system call of its
    /// own during which no other thread ran and nothing was switched: its address space, UTCB
    /// pointer, I/O bitmap and kernel stack are still loaded, so only its FPU state (which a
    /// guest run may have taken) is made right ([`Kernel::resume_thread`]'s first step).
    ///
    /// # Safety
    /// `thread` must point to the live, boxed thread `id`, the one last resumed.
    #[inline(always)]
    pub unsafe fn return_to_caller(&mut self, id: ThreadId, thread: *const Thread) -> ! {
        debug_assert_eq!(self.current, Some(id));
        // SAFETY: per the caller.
        unsafe { self.fpu_for(id, thread) };
        // SAFETY: as above: the frame lives in the boxed thread until the next kernel entry.
        unsafe { crate::arch::x86_64::entry::return_to_caller(&raw const (*thread).frame) }
    }

    /// Return to user mode in thread `id`, whose object is at `thread` (a shortcut of
    /// [`Kernel::resume`] for callers that hold the pointer already).
    ///
    /// # Safety
    /// `thread` must point to the live, boxed thread `id`.
    #[inline(always)]
    pub unsafe fn resume_thread(&mut self, id: ThreadId, thread: *const Thread) -> ! {
        self.current = Some(id);
        // SAFETY: the caller passes the live, boxed thread `id`.
        unsafe { self.fpu_for(id, thread) };
        // SAFETY: as above.
        let thread = unsafe { &*thread };
        let (root, utcb, io) = (thread.space_root, thread.utcb_address, thread.task_has_io);
        let frame = &raw const thread.frame;
        if io || self.io_owner.is_some() {
            let task = thread.task.expect("runnable thread without task");
            self.load_io_bitmap(task);
        }
        if root != self.loaded_root {
            // SAFETY: every task's PML4 maps the kernel half.
            unsafe { crate::arch::x86_64::paging::load_root(root) };
            self.loaded_root = root;
        }
        if utcb != self.fs_base {
            let mut fs_base = FsBase::MSR;
            // SAFETY: the UTCB address is a user address chosen at bind time.
            unsafe { fs_base.write(utcb) };
            self.fs_base = utcb;
        }
        // SAFETY: the frame lives in the boxed thread until the thread is destroyed, which
        // cannot happen before the next kernel entry; the page tables are the thread's.
        unsafe { return_to_user(frame) }
    }

    /// Make the TSS's I/O permission bitmap that of `task` (copied only on change).
    fn load_io_bitmap(&mut self, task: TaskId) {
        let has_bitmap = self.tasks.get(task).is_some_and(|t| t.io_bitmap.is_some());
        if has_bitmap {
            if self.io_owner != Some(task) {
                let bitmap = self
                    .tasks
                    .get(task)
                    .and_then(|t| t.io_bitmap.as_deref())
                    .expect("bitmap");
                crate::arch::x86_64::entry::set_io_bitmap(Some(bitmap));
                self.io_owner = Some(task);
            }
        } else if self.io_owner.is_some() {
            crate::arch::x86_64::entry::set_io_bitmap(None);
            self.io_owner = None;
        }
    }
}

/// Halt until an interrupt arrives, on a fresh kernel stack.
pub fn idle() -> ! {
    extern "C" {
        fn kernel_idle() -> !;
    }
    // SAFETY: `kernel_idle` resets the stack pointer and never returns.
    unsafe { kernel_idle() }
}

core::arch::global_asm!(
    r#"
.section .text
.global kernel_idle
kernel_idle:
    mov rsp, [rip + KERNEL_STACK_TOP]
1:
    sti
    hlt
    cli
    jmp 1b
"#
);
