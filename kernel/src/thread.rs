//! Threads: saved user registers, the binding to a task and UTCB, scheduling parameters and
//! IPC state; a thread's UTCB and the message that travels between UTCBs.

use crate::arch::x86_64::entry::Frame;
use crate::arch::x86_64::paging::phys_to_virt;
use crate::kernel::Kernel;
use crate::object::{Capability, TaskId, ThreadId};
use alloc::collections::VecDeque;
use l4_abi::{MessageTag, Timeout, Utcb, MAX_WORDS};

/// Default priority of new threads.
pub const DEFAULT_PRIORITY: u8 = 100;
/// Default time slice in timer ticks.
pub const DEFAULT_TIMESLICE: u32 = 10;

/// What a thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadState {
    /// Created, not started.
    Inactive,
    /// Runnable (queued, or the current thread).
    Ready,
    /// Blocked in the send phase, queued at `to`.
    Sending {
        /// The receiving thread.
        to: ThreadId,
        /// Badge of the capability used.
        badge: u64,
        /// Whether a closed receive from `to` follows (call).
        call: bool,
    },
    /// Blocked in the receive phase.
    Receiving {
        /// `None`: open wait; `Some(t)`: only from `t`.
        from: Option<ThreadId>,
        /// What the thread waits for.
        awaiting: Awaiting,
    },
    /// Terminated; IPC with it fails with `DeadPartner`.
    Dead,
}

/// What a receiving thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// A message (its own receive or the receive phase of a call).
    Message,
    /// The pager's answer to a page fault (a map item).
    PageFaultReply,
    /// The exception handler's answer (new register state, or a refusal).
    ExceptionReply,
    /// A message whose strings are being copied into this thread's buffers in steps (by the
    /// sender, whose system call restarts between them; see [`crate::strings::STEP_BYTES`]).
    /// Otherwise like `Message`, but the fast path and IRQ delivery leave it to the slow path.
    Strings,
}

/// Words of the largest kernel-generated message (an exception: vector, error code and 18
/// registers).
pub const KERNEL_MESSAGE_WORDS: usize = 20;

/// What happens to a thread after the kernel delivered a message on its behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDelivery {
    /// Wait for the pager's reply to a page fault.
    AwaitFaultReply,
    /// Wait for the exception handler's reply.
    AwaitExceptionReply,
    /// The thread was killed: it dies once its death notice is delivered.
    Die,
}

/// A message the kernel sends in a thread's name (page fault, death notice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelMessage {
    /// The tag.
    pub tag: MessageTag,
    /// Untyped words.
    pub words: [u64; KERNEL_MESSAGE_WORDS],
    /// What follows the delivery.
    pub after: AfterDelivery,
}

/// A thread.
pub struct Thread {
    /// User registers (saved on kernel entry, restored on exit).
    pub frame: Frame,
    /// The task it runs in.
    pub task: Option<TaskId>,
    /// UTCB address in the task.
    pub utcb_address: u64,
    /// Physical frame of the UTCB (0 while unbound).
    pub utcb_frame: u64,
    /// State.
    pub state: ThreadState,
    /// Priority (0..=255).
    pub priority: u8,
    /// Time slice length in ticks.
    pub timeslice: u32,
    /// Ticks left of the current slice.
    pub remaining: u32,
    /// Where page faults go.
    pub pager: Option<Capability>,
    /// Where exceptions and death notices go.
    pub exception_handler: Option<Capability>,
    /// Threads blocked sending to this one, in arrival order.
    pub senders: VecDeque<ThreadId>,
    /// The thread whose call this one received last and may reply to.
    pub caller: Option<ThreadId>,
    /// Timer tick at which the current IPC phase times out.
    pub deadline: Option<u64>,
    /// Whether it is in the kernel's list of threads with a deadline.
    pub in_timeouts: bool,
    /// A message the kernel sends on this thread's behalf, instead of its registers.
    pub kernel_message: Option<KernelMessage>,
    /// The receive timeout of a call still in its send phase.
    pub receive_timeout: Timeout,
    /// Address of the page fault being resolved.
    pub fault_address: u64,
    /// Set while the thread resolves a fault for a string copy of its own IPC: the phase bit its
    /// IPC fails with if the fault is not resolved in time.
    pub string_fault: Option<u64>,
    /// Set while a receiver resolves a fault in its string buffer: the source it waits for.
    pub resume_receive: Option<Option<ThreadId>>,
    /// How far the thread's restarted `Unmap` got (see [`crate::map::UnmapProgress`]).
    pub unmap_progress: Option<crate::map::UnmapProgress>,
    /// How far the thread's restarted `Map` got (see [`crate::map::MapProgress`]).
    pub map_progress: Option<crate::map::MapProgress>,
    /// The string copy into this thread's buffers that has done some of its steps, while the
    /// receive it is for lasts (see [`crate::strings::PartialCopy`]).
    pub partial_copy: Option<crate::strings::PartialCopy>,
    /// The same for the page-fault reply it waits for (the receive it may have faulted in
    /// keeps its own).
    pub reply_copy: Option<crate::strings::PartialCopy>,
    /// Set while the VM pager resolves a guest page fault of the vCPU this thread runs.
    pub guest_fault: Option<(crate::vm::VmId, crate::vm::VcpuId)>,
    /// Page-table root of its task (cached at bind time).
    pub space_root: u64,
    /// Whether its task has an I/O bitmap (cached; the switch path then loads it).
    pub task_has_io: bool,
    /// The quota its object was charged to.
    pub quota: Option<crate::object::QuotaId>,
    /// The task that created it (an unbound thread dies with it).
    pub creator: Option<TaskId>,
    /// Capabilities that name it: an unbound thread is destroyed when the last one goes (a
    /// bound thread lives as long as its task).
    pub references: u64,
    /// A number for logs.
    pub number: u32,
    /// Its x87/SSE/AVX registers while they are not live in the CPU (`None` once it died).
    pub fpu: Option<alloc::boxed::Box<crate::arch::x86_64::fpu::Area>>,
    /// Whether its registers are the ones live in the CPU (it is the FPU owner).
    pub fpu_loaded: bool,
}

impl Thread {
    /// A new, unbound, inactive thread.
    pub fn new(number: u32) -> Self {
        Thread {
            frame: Frame::new_user(0, 0),
            task: None,
            utcb_address: 0,
            utcb_frame: 0,
            state: ThreadState::Inactive,
            priority: DEFAULT_PRIORITY,
            timeslice: DEFAULT_TIMESLICE,
            remaining: DEFAULT_TIMESLICE,
            pager: None,
            exception_handler: None,
            senders: VecDeque::new(),
            caller: None,
            deadline: None,
            in_timeouts: false,
            kernel_message: None,
            receive_timeout: Timeout::INFINITE,
            fault_address: 0,
            resume_receive: None,
            unmap_progress: None,
            map_progress: None,
            partial_copy: None,
            reply_copy: None,
            string_fault: None,
            guest_fault: None,
            space_root: 0,
            task_has_io: false,
            quota: None,
            creator: None,
            references: 0,
            number,
            fpu: None,
            fpu_loaded: false,
        }
    }

    /// Make the thread re-execute its syscall (`syscall` is two bytes long) when it next
    /// runs: the syscall did part of its work and continues after the kernel served pending
    /// interrupts, or waits for something (a fault) first.
    pub fn restart_syscall(&mut self) {
        self.frame.rip -= 2;
    }

    /// Whether the thread can take part in IPC.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, ThreadState::Dead)
    }
}

/// A message on its way from sender to receiver.
pub struct Message {
    /// The tag.
    pub tag: MessageTag,
    /// All words (untyped, then two per map item).
    pub words: [u64; MAX_WORDS],
}

/// The UTCB of thread `id`.
pub fn utcb(k: &mut Kernel, id: ThreadId) -> &'static mut Utcb {
    utcb_of(k.thread(id))
}

/// The UTCB of `thread` (for callers that hold the thread already).
pub fn utcb_of(thread: &Thread) -> &'static mut Utcb {
    let frame = thread.utcb_frame;
    assert!(frame != 0, "thread without UTCB in IPC");
    // SAFETY: the UTCB frame is kernel-allocated, in the direct map, and lives as long as the
    // thread; only this (single, non-reentrant) kernel path touches it now.
    unsafe { &mut *(phys_to_virt(frame) as *mut Utcb) }
}
