//! Child tasks that run code of the parent's own image in a separate address space (used by
//! tests and benchmarks): the parent's pager thread maps its image pages read-only (copying a
//! page on the first write) and fresh zeroed pages for the child's stack.

use crate::sys;
use l4_abi::{
    slots, ExRegsFlags, FaultAccess, Fpage, MapItem, ObjectKind, Rights, NO_CAP, PAGE_SIZE,
    UTCB_AREA,
};

/// Children's stacks end here (1 MiB below are served).
pub const CHILD_STACK_TOP: u64 = 0x0000_5000_0000_0000;
/// The address range of task images.
pub const IMAGE: core::ops::Range<u64> = 0x40_0000..0x1000_0000;

/// A fresh zeroed page of this task's heap (never freed).
pub fn fresh_page() -> u64 {
    let layout = core::alloc::Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize)
        .expect("layout");
    // SAFETY: a valid non-zero layout; the page is handed to a child and never freed.
    let page = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!page.is_null(), "out of heap");
    page as u64
}

/// The mapping that resolves a child's fault at `address` with `access` in the image or stack
/// area, or `None` if the address is neither.
pub fn resolve_image_fault(address: u64, access: u64) -> Option<MapItem> {
    let page = address & !(PAGE_SIZE - 1);
    if IMAGE.contains(&page) {
        // Make sure our own page is present before we map it on.
        // SAFETY: the address lies in this binary's image, which is mapped on demand.
        unsafe { core::ptr::read_volatile(page as *const u8) };
        if FaultAccess::from_bits_truncate(access).contains(FaultAccess::WRITE) {
            let copy = fresh_page();
            // SAFETY: both pages are mapped in this task.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    page as *const u8,
                    copy as *mut u8,
                    PAGE_SIZE as usize,
                )
            };
            return Some(MapItem::map(
                page,
                Fpage::memory(copy, 12, Fpage::READ | Fpage::WRITE),
            ));
        }
        return Some(MapItem::map(
            page,
            Fpage::memory(page, 12, Fpage::READ | Fpage::EXECUTE),
        ));
    }
    if (CHILD_STACK_TOP - 0x10_0000..CHILD_STACK_TOP).contains(&page) {
        return Some(MapItem::map(
            page,
            Fpage::memory(fresh_page(), 12, Fpage::READ | Fpage::WRITE),
        ));
    }
    None
}

/// Create a child task whose first thread will run `entry` (this image's code) with pager
/// `pager` and exception handler `handler` (slots of ours, or [`NO_CAP`]); `peer` (a slot of
/// ours, or [`NO_CAP`]) is copied into the child's `PEER` slot with the send right. The child
/// gets its own task capability. Started at once if `start`. Returns (task, thread) slots.
pub fn create(
    entry: extern "C" fn() -> !,
    pager: u64,
    handler: u64,
    peer: u64,
    start: bool,
) -> Result<(u64, u64), l4_abi::Error> {
    let task = crate::thread::alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Task, task, 0, 0)?;
    let thread = crate::thread::alloc_slot();
    sys::factory_create(slots::FACTORY, ObjectKind::Thread, thread, 0, 0)?;
    sys::thread_control(thread, task, UTCB_AREA, pager, handler)?;
    sys::cap_copy(task, task, slots::SELF_TASK, Rights::all(), 0)?;
    if peer != NO_CAP {
        sys::cap_copy(task, peer, slots::PEER, Rights::SEND, 0)?;
    }
    if start {
        self::start(thread, entry)?;
    }
    Ok((task, thread))
}

/// Start a child's thread at `entry` on the child stack.
pub fn start(thread: u64, entry: extern "C" fn() -> !) -> Result<(), l4_abi::Error> {
    sys::ex_regs(
        thread,
        entry as *const () as u64,
        CHILD_STACK_TOP - 8,
        ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START,
    )
    .map(|_| ())
}
