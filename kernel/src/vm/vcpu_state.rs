//! The vCPU state that travels through the VMM thread's UTCB: loaded into the VMCB (after the
//! checks of `kernel_core::vcpu_state`) and stored back at every exit.

use super::{read, write, write_segment, Vcpu};
use crate::arch::x86_64::svm::{self, vmcb, GuestRegisters};
use l4_abi::vcpu as state;
use l4_abi::Error;

/// Where each segment register of the transfer state lives in the VMCB.
const SEGMENT_REGISTERS: [(usize, usize); 8] = [
    (state::CS, vmcb::CS),
    (state::SS, vmcb::SS),
    (state::DS, vmcb::DS),
    (state::ES, vmcb::ES),
    (state::FS, vmcb::FS),
    (state::GS, vmcb::GS),
    (state::TR, vmcb::TR),
    (state::LDTR, vmcb::LDTR),
];
// The ABI's first segment word (`state::segment`) has the layout of a VMCB segment register's
// first eight bytes (selector at 0, attributes at 2, limit at 4, little endian), so
// `store_state` copies it as one word.
const _: () = assert!(
    state::segment(0x1234, 0x0567, 0x89ab_cdef)
        == u64::from_le_bytes([0x34, 0x12, 0x67, 0x05, 0xef, 0xcd, 0xab, 0x89])
);
/// Where the descriptor-table registers live.
const TABLE_REGISTERS: [(usize, usize); 2] = [(state::GDTR, vmcb::GDTR), (state::IDTR, vmcb::IDTR)];

/// Load the state groups in `mask` from `words` into the vCPU, refusing state the kernel does
/// not allow (it cannot count on the CPU to reject inconsistent state).
#[inline(always)]
pub(crate) fn load_state(
    vcpu: &mut Vcpu,
    words: &[u64; 64],
    mask: state::Groups,
) -> Result<(), Error> {
    let frame = vcpu.vmcb;
    if mask.contains(state::Groups::CONTROL) {
        let (cr0, cr4, efer) = (words[state::CR0], words[state::CR4], words[state::EFER]);
        if !kernel_core::vcpu_state::control_valid(cr0, cr4, efer) {
            return Err(Error::InvalidArgument);
        }
        write(frame, vmcb::CR0, cr0);
        write(frame, vmcb::CR2, words[state::CR2]);
        write(frame, vmcb::CR3, words[state::CR3] & 0x000f_ffff_ffff_ffff);
        write(frame, vmcb::CR4, cr4);
        write(frame, vmcb::EFER, efer | svm::EFER_SVME);
    }
    if mask.contains(state::Groups::SEGMENTS) {
        for (index, offset) in SEGMENT_REGISTERS {
            let w = words[index];
            write_segment(
                frame,
                offset,
                (
                    w as u16,
                    (w >> 16) as u16 & 0xfff,
                    (w >> 32) as u32,
                    words[index + 1],
                ),
            );
        }
        for (index, offset) in TABLE_REGISTERS {
            write(frame, offset + 4, words[index] as u32);
            write(frame, offset + 8, words[index + 1]);
        }
        let ss_attributes = (words[state::SS] >> 16) as u16;
        write(frame, vmcb::CPL, ((ss_attributes >> 5) & 3) as u8);
    }
    if mask.contains(state::Groups::GPRS) {
        write(frame, vmcb::RIP, words[state::RIP]);
        write(frame, vmcb::RSP, words[state::RSP]);
        // The defined flags; reserved bit 1 set, the other reserved bits clear.
        write(
            frame,
            vmcb::RFLAGS,
            kernel_core::vcpu_state::guest_rflags(words[state::RFLAGS]),
        );
        write(frame, vmcb::RAX, words[state::RAX]);
        // RBX..R15 are not copied: the world switch loads them from the words
        // ([`utcb_registers`]) for the first entry.
    }
    if mask.contains(state::Groups::INTERCEPTS) {
        let exceptions = state::Exceptions::from_bits(words[state::EXCEPTION_INTERCEPTS])
            .filter(|e| state::Exceptions::interceptable().contains(*e))
            .ok_or(Error::InvalidArgument)?;
        write(frame, vmcb::INTERCEPT_EXCEPTIONS, exceptions.bits() as u32);
    }
    if mask.contains(state::Groups::EVENTS) {
        let event = words[state::EVENT_INJECT];
        if !kernel_core::vcpu_state::event_valid(event) {
            return Err(Error::InvalidArgument);
        }
        write(frame, vmcb::EVENT_INJECT, event);
        if event != 0 {
            vcpu.reinject = 0;
        }
        let irq = words[state::VIRTUAL_IRQ];
        let mut v_intr: u64 = read(frame, vmcb::V_INTR);
        v_intr &= !((1 << 8) | (0xff << 32) | (0xf << 16));
        if irq & (1 << 63) != 0 {
            v_intr |= (1 << 8) | ((irq & 0xff) << 32) | (0xf << 16);
        }
        write(frame, vmcb::V_INTR, v_intr);
        // The VMM may end an interrupt shadow (e.g. after emulating the HLT that `sti` shadowed).
        let shadow: u64 = read(frame, vmcb::INTERRUPT_SHADOW);
        write(
            frame,
            vmcb::INTERRUPT_SHADOW,
            (shadow & !1) | (words[state::INTERRUPT_SHADOW] & 1),
        );
    }
    Ok(())
}

/// The words RBX..R15 of a transfer state as the world switch's `GuestRegisters` (the same
/// fourteen registers in the same order).
pub(crate) fn utcb_registers(words: &mut [u64; 64]) -> *mut GuestRegisters {
    words[state::RBX..state::R8 + 8].as_mut_ptr().cast()
}
const _: () = assert!(
    state::R8 + 7 == state::RBX + 13
        && core::mem::size_of::<GuestRegisters>() == 14 * 8
        && core::mem::align_of::<GuestRegisters>() == 8
);

/// Store the state of `vcpu` into `words` but the groups in `unstored`, RBX..R15 from the
/// vCPU's copy.
pub(crate) fn store_state(vcpu: &Vcpu, words: &mut [u64; 64], unstored: state::Groups) {
    // SAFETY: `utcb_registers` points at fourteen words of `words`, aligned like the struct.
    unsafe { utcb_registers(words).write(vcpu.registers) };
    store_exit_state(vcpu, words, unstored);
}

/// Store the state of `vcpu` into `words` after a run but the groups in `unstored`, and but
/// RBX..R15, which the world switch wrote there itself.
#[inline(always)]
pub(crate) fn store_exit_state(vcpu: &Vcpu, words: &mut [u64; 64], unstored: state::Groups) {
    let frame = vcpu.vmcb;
    words[state::EXIT_CODE] = read::<u64>(frame, vmcb::EXIT_CODE) & 0xffff_ffff;
    words[state::EXIT_INFO1] = read(frame, vmcb::EXIT_INFO1);
    words[state::EXIT_INFO2] = read(frame, vmcb::EXIT_INFO2);
    words[state::EXIT_INT_INFO] = read(frame, vmcb::EXIT_INT_INFO);
    words[state::RIP] = read(frame, vmcb::RIP);
    words[state::RSP] = read(frame, vmcb::RSP);
    words[state::RFLAGS] = read(frame, vmcb::RFLAGS);
    words[state::RAX] = read(frame, vmcb::RAX);
    if !unstored.contains(state::Groups::CONTROL) {
        words[state::CR0] = read(frame, vmcb::CR0);
        words[state::CR2] = read(frame, vmcb::CR2);
        words[state::CR3] = read(frame, vmcb::CR3);
        words[state::CR4] = read(frame, vmcb::CR4);
        words[state::EFER] = read(frame, vmcb::EFER);
    }
    words[state::EVENT_INJECT] = read(frame, vmcb::EVENT_INJECT);
    let v_intr: u64 = read(frame, vmcb::V_INTR);
    words[state::VIRTUAL_IRQ] = if v_intr & (1 << 8) != 0 {
        (1 << 63) | ((v_intr >> 32) & 0xff)
    } else {
        0
    };
    words[state::INTERRUPT_SHADOW] = read::<u64>(frame, vmcb::INTERRUPT_SHADOW) & 1;
    if !unstored.contains(state::Groups::INTERCEPTS) {
        words[state::EXCEPTION_INTERCEPTS] =
            u64::from(read::<u32>(frame, vmcb::INTERCEPT_EXCEPTIONS));
    }
    // A VMCB segment register is the ABI's two words as they stand (selector, attributes and
    // limit in the first, the base in the second; see the assertion above). CS and SS (the
    // mode and the privilege level) are always stored.
    let (always, others) = SEGMENT_REGISTERS.split_at(2);
    for &(index, offset) in always {
        words[index] = read(frame, offset);
        words[index + 1] = read(frame, offset + 8);
    }
    if unstored.contains(state::Groups::SEGMENTS) {
        return;
    }
    for &(index, offset) in others {
        words[index] = read(frame, offset);
        words[index + 1] = read(frame, offset + 8);
    }
    for (index, offset) in TABLE_REGISTERS {
        words[index] = read::<u32>(frame, offset + 4) as u64;
        words[index + 1] = read(frame, offset + 8);
    }
    // The syscall MSRs as the guest left them (VMSAVE put them in the VMCB after the run).
    for (index, offset) in [
        (state::STAR, vmcb::STAR),
        (state::LSTAR, vmcb::LSTAR),
        (state::CSTAR, vmcb::CSTAR),
        (state::SFMASK, vmcb::SFMASK),
    ] {
        words[index] = read(frame, offset);
    }
}
