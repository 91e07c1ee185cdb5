//! Creating threads in the current task.

use crate::sys;
use alloc::vec;
use core::sync::atomic::{AtomicU64, Ordering};
use l4_abi::{slots, Error, ExRegsFlags, ObjectKind, NO_CAP, UTCB_AREA, UTCB_SIZE};

static NEXT_SLOT: AtomicU64 = AtomicU64::new(slots::FIRST_FREE);
static NEXT_UTCB: AtomicU64 = AtomicU64::new(1);

/// A free capability slot of this task (never reused).
pub fn alloc_slot() -> u64 {
    NEXT_SLOT.fetch_add(1, Ordering::Relaxed)
}

/// A free UTCB address of this task (never reused).
pub fn alloc_utcb() -> u64 {
    UTCB_AREA + NEXT_UTCB.fetch_add(1, Ordering::Relaxed) * UTCB_SIZE
}

/// Options of a new thread.
#[derive(Clone, Copy)]
pub struct Spawn {
    /// Factory capability slot.
    pub factory: u64,
    /// Pager capability slot ([`NO_CAP`]: none).
    pub pager: u64,
    /// Exception handler slot ([`NO_CAP`]: none).
    pub exception_handler: u64,
    /// Stack bytes.
    pub stack_size: usize,
}

impl Default for Spawn {
    fn default() -> Self {
        Spawn {
            factory: slots::FACTORY,
            pager: slots::PAGER,
            exception_handler: NO_CAP,
            stack_size: 16 * 1024,
        }
    }
}

core::arch::global_asm!(
    r#"
.global l4_thread_trampoline
l4_thread_trampoline:
    pop rdi
    pop rax
    and rsp, -16
    call rax
    ud2
"#
);

extern "C" {
    fn l4_thread_trampoline();
}

/// Create a thread in this task that runs `entry(argument)`; returns its capability slot.
/// The stack comes from the heap and is never freed.
pub fn spawn(entry: extern "C" fn(u64) -> !, argument: u64, options: Spawn) -> Result<u64, Error> {
    let slot = alloc_slot();
    sys::factory_create(options.factory, ObjectKind::Thread, slot, 0, 0)?;
    sys::thread_control(
        slot,
        slots::SELF_TASK,
        alloc_utcb(),
        options.pager,
        options.exception_handler,
    )?;
    let stack = vec![0u64; options.stack_size / 8].leak();
    let top = stack.len() - 2;
    stack[top] = argument;
    stack[top + 1] = entry as *const () as u64;
    let sp = &stack[top] as *const u64 as u64;
    sys::ex_regs(
        slot,
        l4_thread_trampoline as *const () as u64,
        sp,
        ExRegsFlags::SET_IP | ExRegsFlags::SET_SP | ExRegsFlags::START,
    )?;
    Ok(slot)
}
