//! What a user task sees of memory: the user half's bounds, the kernel-managed pages at its
//! top (kernel info page, UTCBs), the UTCB layout and the kernel info page (KIP) layout.

/// End of the user half (exclusive): user addresses are `0..USER_END`.
pub const USER_END: u64 = 0x0000_8000_0000_0000;
/// Lowest address a task can map memory at (page 0 stays unmapped to catch null pointers).
pub const USER_START: u64 = 0x1000;
/// Start of the area at the top of the user half that the kernel manages (KIP, UTCBs); a
/// task cannot map its own memory there.
pub const KERNEL_AREA_START: u64 = 0x0000_7fff_0000_0000;
/// Where the kernel maps the kernel info page (read-only) in every task.
pub const KIP_ADDRESS: u64 = 0x0000_7fff_f000_0000;
/// Where a task's creator places the UTCBs by convention: thread `i` at
/// `UTCB_AREA + i * UTCB_SIZE`.
pub const UTCB_AREA: u64 = 0x0000_7fff_0000_0000;
/// Size of one UTCB (one page).
pub const UTCB_SIZE: u64 = 0x1000;
/// In sigma0 the kernel maps physical memory `p` at `SIGMA0_PHYS_WINDOW + p`.
pub const SIGMA0_PHYS_WINDOW: u64 = 0x0000_4000_0000_0000;
/// Where the first thread's stack ends (grows down from here), by convention; the kernel
/// uses it for sigma0 and the root task, the root task for the tasks it starts.
pub const INITIAL_STACK_TOP: u64 = 0x0000_7ffe_0000_0000;
/// Page size.
pub const PAGE_SIZE: u64 = 0x1000;

/// The user-level thread control block: one page per thread, mapped into its task by the
/// kernel, readable and writable by the thread and the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Utcb {
    /// Message registers. Words 0..4 of a message travel in CPU registers; words 4..64 here.
    pub mr: [u64; 64],
    /// Buffer registers. `br[0]` is the receive window for map items: a memory [`crate::Fpage`]
    /// in the receiver's space (0: map items are refused).
    pub br: [u64; 16],
    /// Free for the user-level runtime (thread-local data), except `user[0]`, which the
    /// kernel sets to the UTCB's own address (the thread finds it at `fs:[UTCB_SELF_OFFSET]`).
    pub user: [u64; 48],
}

/// Index of the receive window for memory map items in [`Utcb::br`].
pub const BR_RECEIVE_WINDOW: usize = 0;
/// Index of the receive window for capability map items in [`Utcb::br`] (an object
/// [`crate::Fpage`]; 0: capability items are refused).
pub const BR_OBJECT_WINDOW: usize = 1;

/// The kernel info page's magic number ("L4RS-KIP").
pub const KIP_MAGIC: u64 = 0x5049_4b2d_5352_344c;
/// Maximum memory regions in the KIP.
pub const KIP_MAX_REGIONS: usize = 32;
/// Maximum boot modules in the KIP.
pub const KIP_MAX_MODULES: usize = 16;
/// Bytes of a module's command line kept in the KIP (with its NUL; the kernel warns about a
/// longer one, which is cut).
pub const KIP_CMDLINE_BYTES: usize = 176;

/// Kinds of memory regions in the KIP.
pub mod region_kind {
    /// Free RAM owned by sigma0.
    pub const FREE: u64 = 1;
    /// A boot module (owned by sigma0, handed out only on explicit request).
    pub const MODULE: u64 = 2;
    /// Device memory (the PCI hole below 4 GiB, above all RAM and below the IOAPIC), owned by
    /// sigma0 and handed out only on explicit request, for user-level drivers.
    pub const DEVICE: u64 = 3;
}

/// A physical memory region.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical base (page aligned).
    pub base: u64,
    /// Size in bytes (page multiple).
    pub size: u64,
    /// One of [`region_kind`].
    pub kind: u64,
}

/// A boot module as loaded by the boot loader.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootModule {
    /// Physical base (page aligned).
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// The module's command line (NUL padded, truncated).
    pub cmdline: [u8; KIP_CMDLINE_BYTES],
}

impl BootModule {
    /// The command line as a string (up to the first NUL; empty if not UTF-8).
    pub fn cmdline(&self) -> &str {
        let len = self
            .cmdline
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.cmdline.len());
        core::str::from_utf8(&self.cmdline[..len]).unwrap_or("")
    }
}

/// The kernel info page, mapped read-only at [`KIP_ADDRESS`] in every task.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Kip {
    /// [`KIP_MAGIC`].
    pub magic: u64,
    /// ABI version.
    pub version: u64,
    /// Timer interrupts per second.
    pub timer_hz: u64,
    /// Valid entries of `regions`.
    pub region_count: u64,
    /// Physical memory owned by sigma0.
    pub regions: [MemoryRegion; KIP_MAX_REGIONS],
    /// Valid entries of `modules`.
    pub module_count: u64,
    /// Boot modules, in boot loader order (module 0 is sigma0, 1 the root task).
    pub modules: [BootModule; KIP_MAX_MODULES],
    /// TSC ticks per second, measured at boot against the PIT (10 ms; under QEMU
    /// `-icount shift=0` about 1 GHz).
    pub tsc_hz: u64,
    /// TSC value at which the latest timer interrupt was due (what the kernel's one-shot
    /// timer was armed for: a periodic tick, an IPC timeout or a `VcpuRun` deadline): a thread
    /// woken by it sees in `rdtsc - tick_due_tsc` how long after its time it runs, including
    /// any time the interrupt waited while the kernel had interrupts off.
    pub tick_due_tsc: u64,
}

/// The ABI version in the KIP.
pub const ABI_VERSION: u64 = 1;

const _: () = assert!(core::mem::size_of::<Utcb>() <= UTCB_SIZE as usize);
const _: () = assert!(core::mem::size_of::<Kip>() <= PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<BootModule>() == 192);

/// Offset of `Utcb::user[0]`, the UTCB's own address, from the UTCB start (FS base).
pub const UTCB_SELF_OFFSET: usize = core::mem::offset_of!(Utcb, user);
const _: () = assert!(UTCB_SELF_OFFSET == 0x280);
