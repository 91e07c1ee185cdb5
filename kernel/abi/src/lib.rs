//! The ABI shared by the kernel and user tasks: the single source of truth for syscall numbers,
//! register conventions, message tags, flexpages, capabilities, error codes and the memory layout
//! that user tasks see.
//!
//! # Calling convention
//!
//! A task enters the kernel with the `syscall` instruction. `rax` holds the [`Syscall`] number;
//! arguments travel in `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9` (in that order, `a0`..`a5` below);
//! `rcx` and `r11` are clobbered by the instruction. On return `rax` holds `0` or an [`Error`]
//! code, and the syscall's results come back in `rdi`, `rsi`, `rdx`, `r10`.
//!
//! IPC syscalls ([`Syscall::Send`], [`Syscall::Receive`], [`Syscall::Call`],
//! [`Syscall::ReplyWait`], [`Syscall::Reply`]) use a different register map because message
//! words travel in registers:
//!
//! | register | in                                   | out                              |
//! |----------|--------------------------------------|----------------------------------|
//! | `rax`    | syscall number                       | error code (0 = success)         |
//! | `rdi`    | destination capability slot          | —                                |
//! | `rsi`    | receive source (slot or [`OPEN_WAIT`]) | badge of the sender            |
//! | `rdx`    | message tag ([`MessageTag`])         | received message tag             |
//! | `r10`    | timeouts ([`Timeouts`])              | —                                |
//! | `r8`, `r9`, `r12`, `r13` | message words 0..3   | received words 0..3              |
//!
//! Message words 4..63 live in the sender's and receiver's UTCB ([`Utcb::mr`]), at the same
//! index. The kernel copies a message directly from the sender to the receiver; it never buffers.
#![no_std]
#![forbid(unsafe_code)]

pub mod layout;
pub mod message;
pub mod vcpu;

pub use layout::*;
pub use message::*;

/// Syscall numbers (`rax` on entry). The values are part of the ABI and never change.
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syscall {
    /// Send a message to the thread or gate named by the capability in `rdi`; block until a
    /// receiver takes it or the send timeout expires. Errors: [`Error::InvalidCapability`],
    /// [`Error::WrongType`], [`Error::NoRights`], [`Error::Timeout`], [`Error::DeadPartner`],
    /// [`Error::InvalidArgument`] (bad tag or map item).
    Send = 1,
    /// Receive a message. `rsi` is [`OPEN_WAIT`] (from anyone: open wait) or a thread
    /// capability slot (closed wait: only from that thread). Returns the tag in `rdx`, the
    /// badge of the capability the sender used in `rsi`, the words in registers and the UTCB.
    /// Errors: [`Error::Timeout`] (with [`RECEIVE_PHASE`]), [`Error::DeadPartner`] when the
    /// partner of a closed wait is dead, [`Error::InvalidCapability`].
    Receive = 2,
    /// Send to `rdi`, then atomically wait for the reply from the thread that received the
    /// message. The receiver gets a one-shot reply right, used by [`Syscall::Reply`] or
    /// [`Syscall::ReplyWait`]. Errors as for send and receive; a callee that dies before
    /// replying yields [`Error::DeadPartner`] | [`RECEIVE_PHASE`].
    Call = 3,
    /// Reply to the thread whose call this thread received last (never blocks: fails with
    /// [`Error::NoPartner`] if no call is pending), then open-wait like [`Syscall::Receive`]
    /// with `rsi` = [`OPEN_WAIT`].
    ReplyWait = 4,
    /// Reply to the pending caller without waiting. Errors: [`Error::NoPartner`].
    Reply = 5,
    /// Create a kernel object. `a0` factory capability, `a1` [`ObjectKind`], `a2` the free slot
    /// of the caller's capability table that receives the new capability (full rights),
    /// `a3` kind-specific argument (gate: the slot of the thread capability to bind to),
    /// `a4` badge (gate: the badge the new capability carries). Errors:
    /// [`Error::InvalidCapability`], [`Error::WrongType`], [`Error::NoRights`],
    /// [`Error::SlotOccupied`], [`Error::OutOfMemory`], [`Error::InvalidArgument`].
    FactoryCreate = 10,
    /// Configure a thread. `a0` thread capability (needs [`rights::CONTROL`]), `a1` task
    /// capability to bind the thread to (once; [`NO_CAP`] to leave), `a2` the UTCB address
    /// in that task (page aligned, user half; required with `a1`), `a3` pager capability
    /// slot (thread or gate; [`NO_CAP`] to leave), `a4` exception handler capability slot
    /// ([`NO_CAP`] to leave). Errors: [`Error::InvalidCapability`], [`Error::WrongType`],
    /// [`Error::NoRights`], [`Error::InvalidArgument`], [`Error::AlreadyBound`].
    ThreadControl = 11,
    /// Exchange a thread's registers. `a0` thread capability (needs [`rights::CONTROL`]),
    /// `a1` new instruction pointer, `a2` new stack pointer, `a3` [`ExRegsFlags`] bits.
    /// Returns the old instruction pointer in `rdi`, stack pointer in `rsi`, RFLAGS in `rdx`.
    /// Starting a thread that is not bound to a task fails with [`Error::NotBound`].
    ExRegs = 12,
    /// Copy a capability into a task. `a0` destination task capability (needs
    /// [`rights::CONTROL`]), `a1` source slot in the caller (needs [`rights::COPY`]), `a2`
    /// destination slot (must be free), `a3` rights mask (rights can only shrink), `a4` badge
    /// to mint (only if the source badge is 0; 0 keeps it).
    CapCopy = 13,
    /// Delete the capability in slot `a0` of the caller's table, and every capability derived
    /// from it in other tasks (recursively). Each deleted capability is one reference less on
    /// its object: an object lives while any capability names it and is destroyed with the
    /// last one, its memory going back to its factory (a task counts only the capabilities
    /// other tasks hold to it, and is destroyed in steps after the call); see
    /// [`Syscall::TaskDestroy`].
    CapDelete = 14,
    /// Map a flexpage of the caller into another task. `a0` destination task capability
    /// (needs [`rights::CONTROL`]), `a1` the [`Fpage`] (memory, I/O ports or capability
    /// slots), `a2` destination (memory: an address aligned to the flexpage size, below
    /// [`KERNEL_AREA_START`]; capabilities: the first slot; I/O: ignored, ports keep their
    /// numbers), `a3` [`MAP_GRANT`] or 0. What the caller does not hold is skipped; rights are
    /// the intersection of the flexpage's and the caller's (they only shrink). The mapping
    /// database records the new mappings as derived from the caller's.
    Map = 15,
    /// Revoke a flexpage `a0` of the caller: every mapping derived from it in any task,
    /// recursively; with `a1` = [`UNMAP_SELF`] also the caller's own.
    Unmap = 16,
    /// End the calling thread; `a0` is an exit code for the kernel log.
    ThreadExit = 17,
    /// Give up the rest of the time slice.
    ThreadYield = 18,
    /// Write `a1` bytes at address `a0` to the kernel console (at most 256 bytes per call).
    DebugWrite = 19,
    /// Destroy a task and all threads bound to it. `a0` task capability (needs
    /// [`rights::CONTROL`]). A task cannot destroy itself.
    TaskDestroy = 20,
    /// Power the machine off. `a0` platform capability, `a1` exit code (QEMU's isa-debug-exit
    /// turns it into the emulator's exit status).
    Shutdown = 21,
    /// Set a thread's scheduling parameters. `a0` thread capability (needs
    /// [`rights::SCHEDULE`]), `a1` priority (0..=255, at most the caller's own priority), `a2`
    /// time slice in microseconds (0: leave). Returns the old priority in `rdi` and the old time
    /// slice (µs) in `rsi`. Errors: [`Error::InvalidCapability`], [`Error::WrongType`],
    /// [`Error::NoRights`], [`Error::InvalidArgument`] (priority above the caller's).
    ThreadSchedule = 22,
    /// Switch to another thread: `a0` a thread capability whose thread runs at once if it is
    /// ready (on its own time slice; the caller queues behind it); otherwise, and with
    /// [`NO_CAP`], a plain yield.
    ThreadSwitch = 23,
    /// Operate on an IRQ object: `a0` IRQ capability, `a1` [`IrqOp`], `a2` thread capability
    /// (attach). Attach binds the one receiving thread (a second attach fails with
    /// [`Error::AlreadyBound`]); each interrupt then arrives as a message with label
    /// [`crate::LABEL_IRQ`] and the IRQ capability's badge, and the line stays masked until
    /// [`IrqOp::Acknowledge`]. [`IrqOp::Trigger`] raises the IRQ in software.
    IrqControl = 24,
    /// Run a virtual CPU: `a0` vCPU capability (needs [`rights::CONTROL`]), `a1` transfer mask
    /// ([`vcpu::ALL`] and its groups) of the state to load from the caller's UTCB first. The
    /// guest runs until an exit the kernel does not handle itself; then the call returns with
    /// the exit code in `rdi` and the whole state (see [`vcpu`]) in the UTCB. Physical
    /// interrupts during the run are handled by the kernel (the run resumes transparently).
    /// Errors: [`Error::InvalidCapability`], [`Error::WrongType`], [`Error::NoRights`],
    /// [`Error::InvalidArgument`] (state the kernel refuses, or a VMCB the CPU rejects),
    /// [`Error::NotSupported`] (no SVM).
    VcpuRun = 25,
    /// Read a factory's kernel-memory quota and, with [`QUOTA_CHECK_ALL`] in `a1`, check the
    /// kernel's books (a debug aid for tests). `a0` factory capability (any rights), `a1` 0 or
    /// [`QUOTA_CHECK_ALL`]. Returns the quota's bytes used in `rdi` and its limit in `rsi`;
    /// `rdx` is the number of inconsistencies the check found (0 without the flag): a quota
    /// whose `used` differs from what is held for it, or a task or VM whose charged total
    /// differs from what it holds. The first of each is logged on the kernel console. Errors:
    /// [`Error::InvalidCapability`], [`Error::WrongType`] (not a factory),
    /// [`Error::InvalidArgument`] (unknown flags), [`Error::OutOfMemory`] (no kernel memory
    /// for the check's per-quota totals).
    QuotaCheck = 26,
}

/// [`Syscall::QuotaCheck`] flag: check every quota, task and VM, not just read one quota.
pub const QUOTA_CHECK_ALL: u64 = 1;

/// Operations of [`Syscall::IrqControl`].
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqOp {
    /// Bind the receiving thread (`a2`).
    Attach = 1,
    /// Unbind the receiving thread.
    Detach = 2,
    /// Unmask the line after an interrupt was handled.
    Acknowledge = 3,
    /// Raise the IRQ in software.
    Trigger = 4,
}

impl IrqOp {
    /// Decode an operation.
    pub fn from_u64(value: u64) -> Option<Self> {
        Some(match value {
            1 => IrqOp::Attach,
            2 => IrqOp::Detach,
            3 => IrqOp::Acknowledge,
            4 => IrqOp::Trigger,
            _ => return None,
        })
    }
}

impl Syscall {
    /// Decode a syscall number.
    pub fn from_u64(value: u64) -> Option<Self> {
        use Syscall::*;
        Some(match value {
            1 => Send,
            2 => Receive,
            3 => Call,
            4 => ReplyWait,
            5 => Reply,
            10 => FactoryCreate,
            11 => ThreadControl,
            12 => ExRegs,
            13 => CapCopy,
            14 => CapDelete,
            15 => Map,
            16 => Unmap,
            17 => ThreadExit,
            18 => ThreadYield,
            19 => DebugWrite,
            20 => TaskDestroy,
            21 => Shutdown,
            22 => ThreadSchedule,
            23 => ThreadSwitch,
            24 => IrqControl,
            25 => VcpuRun,
            26 => QuotaCheck,
            _ => return None,
        })
    }
}

/// Error codes returned in `rax`. 0 means success.
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The slot is out of range or empty, or names an object that no longer exists.
    InvalidCapability = 1,
    /// The capability names an object of another kind than the operation needs.
    WrongType = 2,
    /// The capability lacks a right the operation needs.
    NoRights = 3,
    /// An argument is malformed or out of range.
    InvalidArgument = 4,
    /// Kernel memory (or the caller's quota) is exhausted.
    OutOfMemory = 5,
    /// The timeout expired before the partner was ready.
    Timeout = 6,
    /// The IPC was cancelled by `ex_regs` (a dead or destroyed partner gives [`Error::DeadPartner`]).
    Canceled = 7,
    /// The partner thread is dead or its task was destroyed.
    DeadPartner = 8,
    /// The destination slot is occupied.
    SlotOccupied = 9,
    /// No call is pending to reply to.
    NoPartner = 10,
    /// The thread is already bound to a task.
    AlreadyBound = 11,
    /// The thread is not bound to a task.
    NotBound = 12,
    /// The syscall number is unknown.
    UnknownSyscall = 13,
    /// The operation is not supported (by this CPU or this kernel).
    NotSupported = 14,
}

/// Set in an IPC error code when the error happened in the receive phase (for example a
/// receive timeout after a successful send in a call).
pub const RECEIVE_PHASE: u64 = 0x100;

impl Error {
    /// Decode an error code (with [`RECEIVE_PHASE`] stripped).
    pub fn from_u64(value: u64) -> Option<Self> {
        use Error::*;
        Some(match value & !RECEIVE_PHASE {
            1 => InvalidCapability,
            2 => WrongType,
            3 => NoRights,
            4 => InvalidArgument,
            5 => OutOfMemory,
            6 => Timeout,
            7 => Canceled,
            8 => DeadPartner,
            9 => SlotOccupied,
            10 => NoPartner,
            11 => AlreadyBound,
            12 => NotBound,
            13 => UnknownSyscall,
            14 => NotSupported,
            _ => return None,
        })
    }

    /// A short description for logs.
    pub fn message(self) -> &'static str {
        use Error::*;
        match self {
            InvalidCapability => "invalid capability",
            WrongType => "capability names an object of the wrong kind",
            NoRights => "capability lacks the needed right",
            InvalidArgument => "invalid argument",
            OutOfMemory => "out of kernel memory",
            Timeout => "timeout",
            Canceled => "IPC cancelled",
            DeadPartner => "partner is dead",
            SlotOccupied => "capability slot occupied",
            NoPartner => "no pending caller",
            AlreadyBound => "thread already bound",
            NotBound => "thread not bound to a task",
            UnknownSyscall => "unknown syscall",
            NotSupported => "not supported",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}

/// Kinds of kernel objects a capability can name.
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// An address space with a capability table.
    Task = 1,
    /// A thread of execution, bound to one task.
    Thread = 2,
    /// An IPC gate: an endpoint bound to one receiving thread; senders are told apart by the
    /// badge of the capability they send through.
    Gate = 3,
    /// The right to create kernel objects.
    Factory = 4,
    /// Platform control (shutdown; the factory of IRQ objects).
    Platform = 5,
    /// An interrupt line (created through the platform capability; argument: the line,
    /// 0..=23 for IOAPIC inputs, 32..=63 for software-only IRQs).
    Irq = 6,
    /// A virtual machine: a guest-physical address space (nested page tables) populated by
    /// mapping memory flexpages into it ([`Syscall::Map`] with the VM capability as the
    /// destination). Argument: the slot of the VM's pager (a thread or gate that receives
    /// [`crate::LABEL_GUEST_PAGE_FAULT`] messages), or [`NO_CAP`] to hand every nested page
    /// fault to the VMM as an exit. Needs SVM with nested paging ([`Error::NotSupported`]
    /// otherwise).
    Vm = 7,
    /// A virtual CPU of a VM (argument: the VM capability slot), run by [`Syscall::VcpuRun`].
    Vcpu = 8,
}

impl ObjectKind {
    /// Decode an object kind.
    pub fn from_u64(value: u64) -> Option<Self> {
        Some(match value {
            1 => ObjectKind::Task,
            2 => ObjectKind::Thread,
            3 => ObjectKind::Gate,
            4 => ObjectKind::Factory,
            5 => ObjectKind::Platform,
            6 => ObjectKind::Irq,
            7 => ObjectKind::Vm,
            8 => ObjectKind::Vcpu,
            _ => return None,
        })
    }
}

/// Capability rights.
pub mod rights {
    /// May send IPC through the capability (threads, gates).
    pub const SEND: u64 = 1;
    /// May control the object (thread_control, ex_regs, task map/copy/destroy, create).
    pub const CONTROL: u64 = 2;
    /// May copy the capability into another task.
    pub const COPY: u64 = 4;
    /// May set the thread's priority and time slice.
    pub const SCHEDULE: u64 = 8;
    /// All rights.
    pub const ALL: u64 = SEND | CONTROL | COPY | SCHEDULE;
}

/// "No capability": leave a setting unchanged, or send nothing.
pub const NO_CAP: u64 = u64::MAX;
/// Receive source meaning "from anyone" (open wait).
pub const OPEN_WAIT: u64 = u64::MAX;
/// [`Syscall::Map`] flag: grant (move) instead of map.
pub const MAP_GRANT: u64 = 1;
/// [`Syscall::Unmap`] flag: also remove the caller's own mapping.
pub const UNMAP_SELF: u64 = 1;

/// Number of slots in every task's capability table.
pub const CAP_SLOTS: usize = 512;

/// Well-known capability slots that a task's creator fills by convention.
pub mod slots {
    /// The task itself.
    pub const SELF_TASK: u64 = 1;
    /// The task's first thread.
    pub const SELF_THREAD: u64 = 2;
    /// A factory (only where the creator gave one).
    pub const FACTORY: u64 = 3;
    /// The pager of the first thread (also used for memory requests).
    pub const PAGER: u64 = 4;
    /// Platform control (root task only).
    pub const PLATFORM: u64 = 5;
    /// The parent: a gate that takes exit notifications and service requests.
    pub const PARENT: u64 = 6;
    /// A peer the creator wired up (demo and tests).
    pub const PEER: u64 = 7;
    /// First slot free for the task's own use.
    pub const FIRST_FREE: u64 = 16;
}

/// Flags of [`Syscall::ExRegs`].
pub struct ExRegsFlags;
impl ExRegsFlags {
    /// Set the instruction pointer.
    pub const SET_IP: u64 = 1;
    /// Set the stack pointer.
    pub const SET_SP: u64 = 2;
    /// Make the thread runnable (start it).
    pub const START: u64 = 4;
    /// Cancel an IPC the thread is blocked in (it returns [`Error::Canceled`]).
    pub const CANCEL: u64 = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_numbers_round_trip() {
        for n in 0..64 {
            if let Some(s) = Syscall::from_u64(n) {
                assert_eq!(s as u64, n);
            }
        }
        assert_eq!(Syscall::from_u64(0), None);
        assert_eq!(Syscall::from_u64(3), Some(Syscall::Call));
    }

    #[test]
    fn error_codes_round_trip_and_strip_phase() {
        for n in 1..=14 {
            let e = Error::from_u64(n).unwrap();
            assert_eq!(e as u64, n);
            assert_eq!(Error::from_u64(n | RECEIVE_PHASE), Some(e));
            assert!(!e.message().is_empty());
        }
        assert_eq!(Error::from_u64(0), None);
        assert_eq!(Error::from_u64(99), None);
    }

    #[test]
    fn object_kinds_decode() {
        assert_eq!(ObjectKind::from_u64(3), Some(ObjectKind::Gate));
        assert_eq!(ObjectKind::from_u64(0), None);
        assert_eq!(ObjectKind::from_u64(6), Some(ObjectKind::Irq));
        assert_eq!(ObjectKind::from_u64(7), Some(ObjectKind::Vm));
        assert_eq!(ObjectKind::from_u64(9), None);
    }
}
