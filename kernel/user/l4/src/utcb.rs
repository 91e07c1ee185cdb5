//! The current thread's UTCB (found through the FS segment base the kernel sets).

use core::arch::asm;
use l4_abi::{Utcb, UTCB_SELF_OFFSET};

/// The current thread's UTCB.
pub fn utcb() -> &'static mut Utcb {
    let address: u64;
    // SAFETY: the kernel sets FS to the UTCB of the running thread and stores the UTCB's own
    // address at UTCB_SELF_OFFSET; reading it has no side effects.
    unsafe {
        asm!("mov {}, fs:[{}]", out(reg) address, const UTCB_SELF_OFFSET, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: the UTCB page is mapped for the thread's lifetime and only this thread uses it.
    unsafe { &mut *(address as *mut Utcb) }
}

/// Set the receive window for map items (see [`l4_abi::BR_RECEIVE_WINDOW`]).
pub fn set_receive_window(window: l4_abi::Fpage) {
    utcb().br[l4_abi::BR_RECEIVE_WINDOW] = window.0;
}
