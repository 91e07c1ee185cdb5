//! Tasks: an address space, a capability table and the threads bound to it.

use crate::arch::x86_64::paging::AddressSpace;
use crate::object::{Capability, ThreadId};
use alloc::vec::Vec;
use kernel_core::CapabilityTable;

/// A task.
pub struct Task {
    /// Its page tables.
    pub space: AddressSpace,
    /// Its capabilities.
    pub caps: CapabilityTable<Capability>,
    /// Threads bound to it.
    pub threads: Vec<ThreadId>,
    /// A short name for log messages.
    pub name: [u8; 16],
    /// The quota the task's kernel memory is charged to.
    pub quota: crate::object::QuotaId,
    /// Bytes charged to the quota on the task's behalf (refunded when it is destroyed).
    pub charged: u64,
    /// Loaded by the kernel at boot (sigma0, the root task): part of what it holds came from
    /// the kernel uncharged.
    pub loaded_at_boot: bool,
    /// I/O permission bitmap in the CPU's format (a set bit denies the port); `None` while
    /// the task holds no ports.
    pub io_bitmap: Option<alloc::boxed::Box<[u8; IO_BITMAP_BYTES]>>,
    /// Set once a `TaskDestroy` began: how far the destruction got (it goes in steps, see
    /// `destroy::destroy_task_step`). A dying task's capabilities no longer resolve.
    pub dying: Option<Dying>,
    /// Capabilities that name it in other tasks' tables (its own, e.g. `SELF_TASK`, do not
    /// count), plus one the kernel holds for the boot tasks: when the count drops to zero the
    /// task becomes dying and the kernel destroys it in steps (see `lifetime::reap`).
    pub references: u64,
    /// Whether it is in the kernel's list of tasks to destroy (`Kernel::reaping`).
    pub reaping: bool,
}

/// The stages of a task's destruction, each done in bounded steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dying {
    /// Killing and freeing its threads (popped from `threads`).
    Threads,
    /// Failing the closed receives (and calls) that wait on a thread that died: a scan of the
    /// thread arena from `cursor`.
    Waiters {
        /// Next thread slot.
        cursor: usize,
    },
    /// Revoking what was derived from its mappings and capabilities, in mapping database
    /// `database` (0 memory, 1 ports, 2 capabilities).
    Revoke {
        /// The database being emptied of the task's nodes.
        database: u8,
    },
    /// Emptying its capability table from slot `cursor`: each capability removed counts as
    /// gone for the object it names (which may be destroyed with it).
    Caps {
        /// Next slot.
        cursor: u64,
    },
    /// Destroying the objects it created (arena `arena` of gates, IRQs, vCPUs, VMs, unbound
    /// threads), scanning from slot `cursor`.
    Owned {
        /// Which arena.
        arena: u8,
        /// Next slot.
        cursor: usize,
    },
}

/// Bytes of an I/O permission bitmap (65536 ports).
pub const IO_BITMAP_BYTES: usize = 8192;

impl Task {
    /// Whether the task may use `port`.
    pub fn has_port(&self, port: u32) -> bool {
        self.io_bitmap
            .as_ref()
            .is_some_and(|b| b[(port / 8) as usize] & (1 << (port % 8)) == 0)
    }

    /// Allow or deny `port` (allowing creates the bitmap; denying never does).
    pub fn set_port(&mut self, port: u32, allowed: bool) {
        if allowed {
            let bitmap = self
                .io_bitmap
                .get_or_insert_with(|| alloc::boxed::Box::new([0xff; IO_BITMAP_BYTES]));
            bitmap[(port / 8) as usize] &= !(1 << (port % 8));
        } else if let Some(bitmap) = self.io_bitmap.as_mut() {
            bitmap[(port / 8) as usize] |= 1 << (port % 8);
        }
    }
}

impl Task {
    /// A task with an empty capability table, charging `quota`.
    pub fn new(space: AddressSpace, quota: crate::object::QuotaId) -> Self {
        Task {
            space,
            caps: CapabilityTable::new(l4_abi::CAP_SLOTS),
            threads: Vec::new(),
            name: [0; 16],
            io_bitmap: None,
            quota,
            charged: 0,
            loaded_at_boot: false,
            dying: None,
            references: 0,
            reaping: false,
        }
    }

    /// The name as a string.
    pub fn name(&self) -> &str {
        let len = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }

    /// Set the name (truncated to 16 bytes).
    pub fn set_name(&mut self, name: &str) {
        self.name = [0; 16];
        let n = name.len().min(16);
        self.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    }
}
