//! Validation of the guest state a VMM hands to `VcpuRun` (host-tested). The kernel cannot
//! count on the CPU to refuse inconsistent guest state (QEMU's SVM often runs it), so every
//! field a VMM may set is checked here before it reaches the VMCB.

use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

pub use l4_abi::vcpu::{CR0_ALLOWED, CR4_ALLOWED, EFER_ALLOWED};

/// EFER.SVME, which the kernel keeps set in every guest.
pub const EFER_SVME: u64 = EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();

const CR0_PE: u64 = Cr0Flags::PROTECTED_MODE_ENABLE.bits();
const CR0_NW: u64 = Cr0Flags::NOT_WRITE_THROUGH.bits();
const CR0_CD: u64 = Cr0Flags::CACHE_DISABLE.bits();
const CR0_PG: u64 = Cr0Flags::PAGING.bits();
const CR4_PAE: u64 = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits();
const EFER_LME: u64 = EferFlags::LONG_MODE_ENABLE.bits();
const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();

/// Whether CR0, CR4 and EFER form a state the kernel lets a guest run in: only allowed bits;
/// paging needs protection; NW needs CD; long mode with paging needs PAE; EFER.LMA is set
/// exactly when LME and CR0.PG are.
pub fn control_valid(cr0: u64, cr4: u64, efer: u64) -> bool {
    let paging = cr0 & CR0_PG != 0;
    let long = efer & EFER_LME != 0;
    cr0 & !CR0_ALLOWED == 0
        && cr4 & !CR4_ALLOWED == 0
        && efer & !(EFER_ALLOWED | EFER_SVME) == 0
        && (!paging || cr0 & CR0_PE != 0)
        && (cr0 & CR0_NW == 0 || cr0 & CR0_CD != 0)
        && (!(long && paging) || cr4 & CR4_PAE != 0)
        && ((efer & EFER_LMA != 0) == (long && paging))
}

/// Whether `event` is an injectable EVENTINJ value: 0 (none), or valid (bit 31) with type 0
/// (external interrupt), 2 (NMI), 3 (exception) or 4 (software interrupt) and no reserved bit
/// (12..31) set.
pub fn event_valid(event: u64) -> bool {
    if event == 0 {
        return true;
    }
    use l4_abi::vcpu::event::{EXCEPTION, INTERRUPT, NMI, RESERVED, SOFTWARE, TYPE, VALID};
    event & VALID != 0
        && matches!(event & TYPE, INTERRUPT | NMI | EXCEPTION | SOFTWARE)
        && event & RESERVED == 0
}

/// RFLAGS as loaded into a guest: the defined flags (CF..ID, bits 0..21, VM included: a guest
/// may run virtual-8086 code) kept, reserved bit 1 set, the reserved bits 3, 5, 15 and 22..63
/// clear.
pub fn guest_rflags(rflags: u64) -> u64 {
    (rflags & 0x003f_7fd7) | 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG_CR0: u64 = 0x8000_0031;
    const LONG_CR4: u64 = 0x20;
    const LONG_EFER: u64 = 0x500;

    #[test]
    fn the_states_guests_use_are_valid() {
        assert!(control_valid(LONG_CR0, LONG_CR4, LONG_EFER)); // 64-bit
        assert!(control_valid(LONG_CR0, LONG_CR4, LONG_EFER | EFER_SVME));
        assert!(control_valid(0x11, 0, 0)); // 32-bit, paging off
        assert!(control_valid(0x6000_0010, 0, 0)); // real mode at reset: CD and NW
        assert!(control_valid(0x8000_0011, 0, 0)); // 32-bit paging
        assert!(control_valid(0x11, 0, EFER_LME)); // long mode enabled, not active yet
    }

    #[test]
    fn inconsistent_states_are_refused() {
        assert!(!control_valid(1 << 3 | 1 << 63, 0, 0)); // reserved CR0 bit
        assert!(!control_valid(0x8000_0010, 0, 0)); // paging without protection
        assert!(!control_valid(0x2000_0011, 0, 0)); // NW without CD
        assert!(!control_valid(LONG_CR0, 0, LONG_EFER)); // long mode without PAE
        assert!(!control_valid(LONG_CR0, LONG_CR4, EFER_LME)); // LMA missing
        assert!(!control_valid(0x11, 0, EFER_LMA)); // LMA without long mode
        assert!(!control_valid(LONG_CR0, LONG_CR4 | 1 << 23, LONG_EFER)); // CET
        assert!(!control_valid(LONG_CR0, LONG_CR4, LONG_EFER | 1 << 13)); // LMSLE
        for bit in 0..64 {
            let cr4 = 1u64 << bit;
            assert_eq!(
                control_valid(0x11, cr4, 0),
                cr4 & CR4_ALLOWED != 0,
                "CR4 bit {bit}"
            );
        }
    }

    #[test]
    fn events() {
        assert!(event_valid(0));
        assert!(event_valid((1 << 31) | 0x20)); // interrupt 0x20
        assert!(event_valid((1 << 31) | (2 << 8) | 2)); // NMI
        assert!(event_valid(
            (1 << 31) | (1 << 11) | (3 << 8) | 13 | (0x18 << 32)
        )); // #GP(0x18)
        assert!(event_valid((1 << 31) | (4 << 8) | 0x80)); // int 0x80
        assert!(!event_valid(0x20)); // not valid
        assert!(!event_valid((1 << 31) | (1 << 8) | 0x20)); // type 1 is reserved
        assert!(!event_valid((1 << 31) | (5 << 8)));
        assert!(!event_valid((1 << 31) | (1 << 12) | 0x20)); // reserved bit
    }

    #[test]
    fn rflags_keep_only_what_a_guest_may_set() {
        assert_eq!(guest_rflags(0), 2);
        assert_eq!(guest_rflags(u64::MAX), 0x003f_7fd7); // everything defined, bit 1 set
        assert_eq!(guest_rflags(1 << 3 | 1 << 5 | 1 << 15), 2); // reserved
        assert_eq!(guest_rflags(1 << 9), (1 << 9) | 2); // IF
        assert_eq!(guest_rflags(u64::MAX) >> 22, 0);
    }
}
