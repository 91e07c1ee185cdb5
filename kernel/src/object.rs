//! Capabilities: what a slot of a task's capability table holds.

use kernel_core::ObjectId;

/// Identifies a task.
pub type TaskId = ObjectId;
/// Identifies a thread.
pub type ThreadId = ObjectId;
/// Identifies a gate.
pub type GateId = ObjectId;
/// Identifies an IRQ object.
pub type IrqId = ObjectId;
/// Identifies a kernel-memory quota.
pub type QuotaId = ObjectId;
/// Identifies a VM.
pub type VmId = ObjectId;
/// Identifies a vCPU.
pub type VcpuId = ObjectId;

/// The kernel object a capability names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    /// A task.
    Task(TaskId),
    /// A thread.
    Thread(ThreadId),
    /// An IPC gate.
    Gate(GateId),
    /// A kernel-object factory, drawing on a quota.
    Factory(QuotaId),
    /// Platform control.
    Platform,
    /// An interrupt line.
    Irq(IrqId),
    /// A virtual machine.
    Vm(VmId),
    /// A virtual CPU.
    Vcpu(VcpuId),
}

/// A capability: an object, the rights held on it, and the badge IPC through it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// The object.
    pub object: Object,
    /// The rights held.
    pub rights: l4_abi::Rights,
    /// Delivered to the receiver of IPC sent through this capability.
    pub badge: u64,
}

impl Capability {
    /// A capability with all rights and no badge.
    pub fn full(object: Object) -> Self {
        Capability {
            object,
            rights: l4_abi::Rights::all(),
            badge: 0,
        }
    }
}

/// A gate: an IPC endpoint bound to the thread that receives what is sent to it.
#[derive(Debug)]
pub struct Gate {
    /// The receiving thread.
    pub thread: ThreadId,
    /// The task that created it (the gate dies with it).
    pub owner: TaskId,
    /// The quota it was charged to.
    pub quota: QuotaId,
    /// Capabilities that name it (it is destroyed when the last one goes).
    pub references: u64,
}
