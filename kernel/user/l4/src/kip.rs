//! The kernel info page.

use l4_abi::{Kip, KIP_ADDRESS, KIP_MAGIC};

/// The kernel info page (mapped read-only by the kernel in every task).
pub fn kip() -> &'static Kip {
    // SAFETY: the kernel maps the KIP at KIP_ADDRESS in every task before it runs; after boot
    // it writes only `tick_due_tsc` (read that with [`tick_due_tsc`]).
    let kip = unsafe { &*(KIP_ADDRESS as *const Kip) };
    assert_eq!(kip.magic, KIP_MAGIC, "kernel info page missing");
    kip
}

/// When the latest timer tick was due (TSC; see [`Kip::tick_due_tsc`]), read afresh.
pub fn tick_due_tsc() -> u64 {
    // SAFETY: an aligned word of the KIP (mapped as in `kip`), which the kernel updates at
    // every tick: read it volatile.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(kip().tick_due_tsc)) }
}
