//! The kernel info page.

use l4_abi::{Kip, KIP_ADDRESS, KIP_MAGIC};

/// The kernel info page (mapped read-only by the kernel in every task).
pub fn kip() -> &'static Kip {
    // SAFETY: the kernel maps the KIP at KIP_ADDRESS in every task before it runs; it is
    // never written after boot.
    let kip = unsafe { &*(KIP_ADDRESS as *const Kip) };
    assert_eq!(kip.magic, KIP_MAGIC, "kernel info page missing");
    kip
}
