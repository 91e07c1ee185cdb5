//! The kernel info page: memory and boot modules, written once at boot, mapped read-only into
//! every task.

use crate::arch::x86_64::paging::phys_to_virt;
use l4_abi::{
    BootModule, Kip, MemoryRegion, ABI_VERSION, KIP_CMDLINE_BYTES, KIP_MAGIC, KIP_MAX_MODULES,
    KIP_MAX_REGIONS,
};

/// The KIP in frame `frame` (zeroed).
pub fn kip_mut(frame: u64) -> &'static mut Kip {
    // SAFETY: the KIP frame is a kernel-owned page in the direct map, written at boot and
    // (`tick_due_tsc`) in the timer interrupt, with interrupts off on this single CPU.
    unsafe { &mut *(phys_to_virt(frame) as *mut Kip) }
}

/// Fill the KIP header.
pub fn init(frame: u64, timer_hz: u64) {
    let kip = kip_mut(frame);
    kip.magic = KIP_MAGIC;
    kip.version = ABI_VERSION;
    kip.timer_hz = timer_hz;
}

/// Append a memory region; returns false when the table is full.
pub fn add_region(frame: u64, region: MemoryRegion) -> bool {
    let kip = kip_mut(frame);
    let n = kip.region_count as usize;
    if n >= KIP_MAX_REGIONS {
        return false;
    }
    kip.regions[n] = region;
    kip.region_count += 1;
    true
}

/// Append a boot module; returns false when the table is full.
pub fn add_module(frame: u64, base: u64, size: u64, cmdline: &str) -> bool {
    let kip = kip_mut(frame);
    let n = kip.module_count as usize;
    if n >= KIP_MAX_MODULES {
        return false;
    }
    let mut module = BootModule {
        base,
        size,
        cmdline: [0; KIP_CMDLINE_BYTES],
    };
    let bytes = cmdline.as_bytes();
    let len = bytes.len().min(KIP_CMDLINE_BYTES - 1);
    if len < bytes.len() {
        crate::warn!(
            "module command line '{cmdline}' is {} bytes, more than the KIP's {}: cut",
            bytes.len(),
            KIP_CMDLINE_BYTES - 1
        );
    }
    module.cmdline[..len].copy_from_slice(&bytes[..len]);
    kip.modules[n] = module;
    kip.module_count += 1;
    true
}
