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
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod layout;
pub mod message;
pub mod size;
pub mod vcpu;
pub use size::parse_size;

pub use layout::*;
pub use message::*;

/// An enum of ABI values with explicit discriminants and its decoder (`$decode`), generated
/// from one list so that the two cannot disagree.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident, decoded by $decode:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $value:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[repr(u64)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$variant_meta])* $variant = $value,)*
        }

        impl $name {
            /// Decode a value (`None` for one the ABI does not define).
            pub const fn $decode(value: u64) -> Option<Self> {
                match value {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

abi_enum! {
    /// Syscall numbers (`rax` on entry). The values are part of the ABI and never change. Each
    /// one's arguments, results, errors and semantics are in `kernel/docs/syscalls.md`
    /// (section 9), the one reference.
    pub enum Syscall, decoded by from_u64 {
        /// Send a message to a thread or gate. See [syscalls.md](../../../kernel/docs/syscalls.md#91-send-1).
        Send = 1,
        /// Receive a message (open or closed wait). See [syscalls.md](../../../kernel/docs/syscalls.md#92-receive-2).
        Receive = 2,
        /// Send, then wait for the reply. See [syscalls.md](../../../kernel/docs/syscalls.md#93-call-3).
        Call = 3,
        /// Reply to the pending caller, then open-wait. See [syscalls.md](../../../kernel/docs/syscalls.md#94-replywait-4).
        ReplyWait = 4,
        /// Reply to the pending caller without waiting. See [syscalls.md](../../../kernel/docs/syscalls.md#95-reply-5).
        Reply = 5,
        /// Create a kernel object through a factory. See [syscalls.md](../../../kernel/docs/syscalls.md#96-factorycreate-10).
        FactoryCreate = 10,
        /// Bind a thread to a task, set its pager and exception handler. See [syscalls.md](../../../kernel/docs/syscalls.md#97-threadcontrol-11).
        ThreadControl = 11,
        /// Exchange a thread's registers. See [syscalls.md](../../../kernel/docs/syscalls.md#98-exregs-12).
        ExRegs = 12,
        /// Copy a capability into a task. See [syscalls.md](../../../kernel/docs/syscalls.md#99-capcopy-13).
        CapCopy = 13,
        /// Delete a capability and everything derived from it. See [syscalls.md](../../../kernel/docs/syscalls.md#910-capdelete-14).
        CapDelete = 14,
        /// Map or grant a flexpage into a task or a VM. See [syscalls.md](../../../kernel/docs/syscalls.md#911-map-15).
        Map = 15,
        /// Revoke what was derived from a flexpage of the caller. See [syscalls.md](../../../kernel/docs/syscalls.md#912-unmap-16).
        Unmap = 16,
        /// End the calling thread. See [syscalls.md](../../../kernel/docs/syscalls.md#913-threadexit-17).
        ThreadExit = 17,
        /// Give up the rest of the time slice. See [syscalls.md](../../../kernel/docs/syscalls.md#914-threadyield-18).
        ThreadYield = 18,
        /// Write bytes to the kernel console. See [syscalls.md](../../../kernel/docs/syscalls.md#915-debugwrite-19).
        DebugWrite = 19,
        /// Destroy a task and its threads (in restartable steps). See [syscalls.md](../../../kernel/docs/syscalls.md#916-taskdestroy-20).
        TaskDestroy = 20,
        /// Power the machine off. See [syscalls.md](../../../kernel/docs/syscalls.md#917-shutdown-21).
        Shutdown = 21,
        /// Set a thread's priority and time slice. See [syscalls.md](../../../kernel/docs/syscalls.md#918-threadschedule-22).
        ThreadSchedule = 22,
        /// Run another ready thread now. See [syscalls.md](../../../kernel/docs/syscalls.md#919-threadswitch-23).
        ThreadSwitch = 23,
        /// Attach, detach, acknowledge or trigger an IRQ object. See [syscalls.md](../../../kernel/docs/syscalls.md#920-irqcontrol-24).
        IrqControl = 24,
        /// Run a virtual CPU until an exit the kernel does not handle, a TSC deadline, or a
        /// message waiting for the caller. See [syscalls.md](../../../kernel/docs/syscalls.md#922-virtual-machines-vm-vcpu-vcpurun).
        VcpuRun = 25,
        /// Read a factory's quota and audit the kernel's books. See [syscalls.md](../../../kernel/docs/syscalls.md#920a-quotacheck-26).
        QuotaCheck = 26,
    }
}

bitflags::bitflags! {
    /// Flags of [`Syscall::QuotaCheck`] (other bits are refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct QuotaCheckFlags: u64 {
        /// Check every quota, task and VM, not just read one quota.
        const ALL = 1;
    }
}

abi_enum! {
    /// Operations of [`Syscall::IrqControl`].
    pub enum IrqOp, decoded by from_u64 {
        /// Bind the receiving thread (`a2`).
        Attach = 1,
        /// Unbind the receiving thread.
        Detach = 2,
        /// Unmask the line after an interrupt was handled.
        Acknowledge = 3,
        /// Raise the IRQ in software.
        Trigger = 4,
    }
}

abi_enum! {
    /// Error codes returned in `rax`. 0 means success.
    pub enum Error, decoded by from_code {
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
}

/// Set in an IPC error code when the error happened in the receive phase (for example a
/// receive timeout after a successful send in a call).
pub const RECEIVE_PHASE: u64 = 0x100;

impl Error {
    /// Decode an error code (with [`RECEIVE_PHASE`] stripped).
    pub const fn from_u64(value: u64) -> Option<Self> {
        Self::from_code(value & !RECEIVE_PHASE)
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

abi_enum! {
    /// Kinds of kernel objects a capability can name.
    pub enum ObjectKind, decoded by from_u64 {
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
}

/// Why the kernel killed a thread: word 0 of a death notice ([`LABEL_DEATH`]).
pub mod death {
    /// The pager refused a page fault (word 1: the fault address).
    pub const FAULT_REFUSED: u64 = 0x100;
    /// The thread has no pager (word 1: the fault address).
    pub const NO_PAGER: u64 = 0x101;
    /// The pager died, or did not answer, while the fault was pending.
    pub const PAGER_GONE: u64 = 0x102;
}

/// The words of an exception message ([`LABEL_EXCEPTION`]) and of the reply that resumes the
/// thread: vector, error code, then the register state.
pub mod exception {
    /// The exception vector.
    pub const VECTOR: usize = 0;
    /// The error code (0 for exceptions without one).
    pub const ERROR: usize = 1;
    /// rip.
    pub const RIP: usize = 2;
    /// rsp.
    pub const RSP: usize = 3;
    /// rflags.
    pub const RFLAGS: usize = 4;
    /// rax; rbx, rcx, rdx, rsi, rdi, rbp, r8..r15 follow in that order.
    pub const RAX: usize = 5;
    /// r15, the last register word.
    pub const R15: usize = 19;
    /// Words of the message and of the resuming reply.
    pub const WORDS: usize = 20;
}

/// QEMU's `isa-debug-exit` device (port [`qemu_exit::PORT`]): a byte `v` written there ends
/// QEMU with status `2v + 1`.
pub mod qemu_exit {
    /// The device's I/O port.
    pub const PORT: u16 = 0xf4;
    /// Every task exited with 0 (QEMU status 33).
    pub const SUCCESS: u8 = 0x10;
    /// A task failed (QEMU status 35).
    pub const FAILURE: u8 = 0x11;
    /// The kernel panicked (QEMU status 37).
    pub const PANIC: u8 = 0x12;
    /// The QEMU exit status for `value`.
    pub const fn status(value: u8) -> i32 {
        2 * value as i32 + 1
    }
}

bitflags::bitflags! {
    /// Capability rights (a system call takes them as the bits of a `u64`; unknown bits are
    /// ignored).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Rights: u64 {
        /// May send IPC through the capability (threads, gates).
        const SEND = 1;
        /// May control the object (thread_control, ex_regs, task map/copy/destroy, create).
        const CONTROL = 2;
        /// May copy the capability into another task.
        const COPY = 4;
        /// May set the thread's priority and time slice.
        const SCHEDULE = 8;
    }
}

/// "No capability": leave a setting unchanged, or send nothing.
pub const NO_CAP: u64 = u64::MAX;
/// Receive source meaning "from anyone" (open wait).
pub const OPEN_WAIT: u64 = u64::MAX;
bitflags::bitflags! {
    /// Flags of [`Syscall::Map`] (other bits are refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MapFlags: u64 {
        /// Grant (move) instead of map.
        const GRANT = 1;
    }
}

bitflags::bitflags! {
    /// Flags of [`Syscall::Unmap`] (other bits are refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct UnmapFlags: u64 {
        /// Also remove the caller's own mapping.
        const SELF = 1;
    }
}

/// [`MapFlags::GRANT`] as a raw word (the fuzzer's, which also runs on kernels that predate
/// the type).
pub const MAP_GRANT: u64 = MapFlags::GRANT.bits();
/// [`UnmapFlags::SELF`] as a raw word (the fuzzer's).
pub const UNMAP_SELF: u64 = UnmapFlags::SELF.bits();

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
    /// A console client's gate to its console server (the root task's `console=SERVER`).
    pub const CONSOLE: u64 = 8;
    /// An IRQ object the creator made for the task (the root task's `irq=LINE`).
    pub const IRQ: u64 = 9;
    /// A console server's notification IRQ of client `k` is in slot `CONSOLE_CLIENTS + k`.
    pub const CONSOLE_CLIENTS: u64 = 448;
    /// The most console clients a server can have.
    pub const MAX_CONSOLE_CLIENTS: u64 = 64;
    /// A network client's gate to its switch (the root task's `net=SWITCH`).
    pub const NET: u64 = 10;
    /// A VMM's gate to its syscall monitor (the root task's `monitor=NAME`; L4Linux mode).
    pub const MONITOR: u64 = 11;
    /// The most clients a syscall monitor can have.
    pub const MAX_MONITOR_CLIENTS: u64 = 64;
    /// A switch's notification IRQ of port `k` is in slot `NET_PORTS + k`.
    pub const NET_PORTS: u64 = 384;
    /// The most ports a switch can have.
    pub const MAX_NET_PORTS: u64 = 64;
    /// The badge of the console notification IRQ (the word a client's IRQ message carries).
    pub const CONSOLE_NOTIFY_BADGE: u64 = 0xc0;
    /// The badge of the network notification IRQ.
    pub const NET_NOTIFY_BADGE: u64 = 0xe0;
    /// First slot free for the task's own use.
    pub const FIRST_FREE: u64 = 16;
}

bitflags::bitflags! {
    /// Flags of [`Syscall::ExRegs`] (other bits are refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ExRegsFlags: u64 {
        /// Set the instruction pointer.
        const SET_IP = 1;
        /// Set the stack pointer.
        const SET_SP = 2;
        /// Make the thread runnable (start it).
        const START = 4;
        /// Cancel an IPC the thread is blocked in (it returns [`Error::Canceled`]).
        const CANCEL = 8;
    }
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
