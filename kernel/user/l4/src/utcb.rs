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

/// Name receive buffer `index` (0..[`l4_abi::MAX_STRINGS`]) for string items.
pub fn set_string_buffer(index: usize, buffer: &mut [u8]) {
    let words = l4_abi::StringItem {
        length: buffer.len() as u64,
        address: buffer.as_mut_ptr() as u64,
    }
    .words();
    let u = utcb();
    u.br[2 + 2 * index] = words[0];
    u.br[3 + 2 * index] = words[1];
}

/// Remove receive buffer `index`.
pub fn clear_string_buffer(index: usize) {
    let u = utcb();
    u.br[2 + 2 * index] = 0;
    u.br[3 + 2 * index] = 0;
}
