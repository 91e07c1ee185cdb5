//! `VcpuRun`: the world switch loop, the exits the kernel handles itself (physical interrupts,
//! XSETBV, guest page faults for a VM pager) and its own exits (deadline, message).

use super::vcpu_state::{load_state, store_exit_state, store_state, utcb_registers};
use super::{read, write, VcpuId};
use crate::arch::x86_64::svm::{self, vmcb};
use crate::kernel::Kernel;
use crate::object::ThreadId;
use crate::syscall::Next;
use crate::thread::{utcb_of, Thread};
use l4_abi::vcpu::{self as state, exit};
use l4_abi::Error;

/// CR4.OSXSAVE.
const CR4_OSXSAVE: u64 = x86_64::registers::control::Cr4Flags::OSXSAVE.bits();
/// Event injection of #UD: valid, exception, vector 6.
const INJECT_UD: u64 = state::event::UD;
/// Event injection of #GP(0): valid, error code (0), exception, vector 13.
const INJECT_GP0: u64 = state::event::GP0;

/// The exit `VcpuRun` of `caller` takes instead of entering the guest, if any: a message
/// waiting for the caller (`queued`: whether its sender queue holds anyone) ([`exit::MESSAGE`], checked first), or `deadline` (a TSC value; 0:
/// none) reached ([`exit::DEADLINE`]). Without pending IRQs or queued senders this is two
/// loads and, with a deadline, an `rdtsc`.
#[inline(always)]
fn software_exit(k: &mut Kernel, caller: ThreadId, queued: bool, deadline: u64) -> Option<u64> {
    // The common case (no IRQ pending anywhere, nobody queued on the caller) in two loads.
    if (k.pending_irqs != 0 && crate::irq::pending_for(k, caller).is_some())
        || (queued && crate::ipc::sender_waiting(k, caller))
    {
        return Some(exit::MESSAGE);
    }
    if deadline != 0 && crate::arch::x86_64::cpu::rdtsc() >= deadline {
        return Some(exit::DEADLINE);
    }
    None
}

/// The groups to load and those not to store of `VcpuRun`'s transfer argument
/// ([`state::transfer`]), or `None` for unknown bits.
pub(crate) fn transfer_groups(transfer: u64) -> Option<(state::Groups, state::Groups)> {
    let load = state::Groups::from_bits(transfer & 0xffff_ffff)?;
    let unstored = state::Groups::from_bits(transfer >> 32)?;
    state::Groups::UNSTORABLE
        .contains(unstored)
        .then_some((load, unstored))
}

/// The transfer argument for re-issuing a `VcpuRun` that loaded its state already: nothing to
/// load, the same groups unstored.
pub(crate) fn keep_unstored(transfer: u64) -> u64 {
    transfer & !0xffff_ffff
}

/// `VcpuRun` of thread `caller` on `vcpu`, loading `mask` first, until `deadline` (a TSC
/// value; 0: none). Returns with the exit in the caller's UTCB and the exit code in its `rdi`,
/// or an error; a physical interrupt makes the caller re-issue the call (with an empty mask,
/// the same deadline) after the kernel handled it.
pub fn run(
    k: &mut Kernel,
    caller: ThreadId,
    vcpu_id: VcpuId,
    mask: u64,
    deadline: u64,
) -> Result<Next, Error> {
    let thread = k.threads.get_ptr(caller).ok_or(Error::InvalidCapability)?;
    // SAFETY: just looked up: the live, boxed thread `caller`, no reference to it held.
    unsafe { run_thread(k, caller, thread, vcpu_id, mask, deadline) }
}

/// [`run`] for a caller that holds the thread already (the fast path).
///
/// # Safety
/// `thread` must point to the live, boxed thread `caller`, and no reference to it may be held.
#[inline(always)]
pub unsafe fn run_thread(
    k: &mut Kernel,
    caller: ThreadId,
    thread: *mut Thread,
    vcpu_id: VcpuId,
    mask: u64,
    deadline: u64,
) -> Result<Next, Error> {
    let (host_vmcb, xcr0_switching, xstate) = k
        .svm
        .as_ref()
        .map(|s| (s.host_vmcb, s.xcr0_switching, s.xstate))
        .ok_or(Error::NotSupported)?;
    let (mask, unstored) = transfer_groups(mask).ok_or(Error::InvalidArgument)?;
    // The caller (passed in), its UTCB words, the vCPU and its VM are looked up once: nothing
    // in this call destroys them until it returns (the one IPC it may make, a guest page
    // fault's to the VM's pager, ends it), and no other reference to them is held while these
    // are used.
    // SAFETY: the live caller (per the caller of this function); the reference ends here.
    let words = &mut utcb_of(unsafe { &*thread }).mr;
    let vcpu_ptr = k.vcpus.get_ptr(vcpu_id).ok_or(Error::InvalidCapability)?;
    // SAFETY: the live, boxed vCPU (see above).
    let vm_id = unsafe { (*vcpu_ptr).vm };
    let vm = k.vms.get_ptr(vm_id).ok_or(Error::InvalidCapability)?;
    // SAFETY: as above.
    load_state(unsafe { &mut *vcpu_ptr }, words, mask)?;
    // The guest gets the registers, unless its own are still live from its last run
    // (`fpu::Fpu::guest`): the owner's user state is saved first (the VMM thread gets its own
    // back when it next uses them), or another guest's, and user threads run with the user
    // XCR0. With XCR0 switching the guest's XRSTOR below replaces every user component
    // (`xstate` holds them all), else the registers are cleared here.
    // SAFETY: the live vCPU (see above).
    let area = unsafe { (*vcpu_ptr).fpu };
    if !xcr0_switching || k.fpu.guest != Some(area) {
        crate::fpu::surrender(k, !xcr0_switching);
    }
    let user_xcr0 = k.fpu.hardware.xcr0;
    // Where the guest's RBX..R15 are loaded from for the next entry: the words, when the VMM
    // loaded them (first entry only); else the vCPU's copy. After a run both hold them.
    let mut from_words = mask.contains(state::Groups::GPRS);
    loop {
        // Before every entry: a waiting message or the deadline returns to the VMM with the
        // state as it stands (a pending re-injection stays pending, and is reported).
        // SAFETY: the live caller (see above).
        let queued = unsafe { !(*thread).senders.is_empty() };
        if let Some(code) = software_exit(k, caller, queued, deadline) {
            // SAFETY: the live vCPU and caller (see above).
            let vcpu = unsafe { &mut *vcpu_ptr };
            if from_words {
                // Loaded but never run: the vCPU's copy takes them.
                // SAFETY: fourteen aligned words of `words` (see `utcb_registers`).
                vcpu.registers = unsafe { utcb_registers(words).read() };
            }
            store_state(vcpu, words, unstored);
            words[state::EXIT_CODE] = code;
            words[state::EXIT_INFO1] = 0;
            words[state::EXIT_INFO2] = 0;
            words[state::EXIT_INT_INFO] = vcpu.reinject;
            // SAFETY: as above.
            unsafe { (*thread).frame.rdi = code };
            return Ok(Next::Done);
        }
        if deadline != 0 {
            // The timer interrupt (which makes the guest exit) comes at the deadline even when
            // that is before the next tick; the check above then ends the call.
            crate::arch::x86_64::apic::arm_before(deadline);
        }
        // SAFETY: the live VM and vCPU (see above).
        let (flush, vcpu) = unsafe { (core::mem::take(&mut (*vm).flush), &mut *vcpu_ptr) };
        let frame = vcpu.vmcb;
        // Flush the guest's TLB entries when a guest mapping was removed since the last run.
        write(frame, vmcb::TLB_CONTROL, if flush { 1u8 } else { 0u8 });
        let injected: u64 = read(frame, vmcb::EVENT_INJECT);
        if injected & state::event::VALID == 0 && vcpu.reinject & state::event::VALID != 0 {
            write(frame, vmcb::EVENT_INJECT, vcpu.reinject);
        }
        vcpu.reinject = 0;
        // SAFETY: the VMCB was built by `create_vcpu` and only changed through `load_state`;
        // its nested page tables hold only what the VMM mapped.
        unsafe {
            if xcr0_switching {
                if k.fpu.guest == Some(area) {
                    // Its registers are live (CR0.TS may be set: VMRUN loads the guest's CR0);
                    // only its XCR0 is set, as XCR0 is the user one between runs.
                    if vcpu.xcr0 != user_xcr0 {
                        svm::set_xcr0(vcpu.xcr0);
                    }
                } else {
                    // The guest's x87/SSE/AVX registers, all of `xstate` (nothing of a
                    // thread's or another guest's stays), then its XCR0. CR0.TS is clear
                    // (`fpu::surrender`); each XSETBV is made only if it changes XCR0.
                    if user_xcr0 != xstate {
                        svm::set_xcr0(xstate);
                    }
                    svm::xrstor(area, xstate);
                    k.fpu.guest = Some(area);
                    if vcpu.xcr0 != xstate {
                        svm::set_xcr0(vcpu.xcr0);
                    }
                }
            }
            // Its DR0-DR3 (DR6 and DR7 are in the VMCB) once it has written them; afterwards
            // they are saved and cleared, so no task or other guest sees them. A guest that
            // has not cannot change them (its writes are intercepted) and finds the 0s that
            // are its own values.
            let debug_live = vcpu.debug_live;
            if debug_live {
                svm::load_debug_registers(&vcpu.debug);
            }
            let copy = utcb_registers(words);
            let save: *mut svm::GuestRegisters = &mut vcpu.registers;
            let load = if from_words {
                copy.cast_const()
            } else {
                save.cast_const()
            };
            svm::run(frame, load, save, copy, host_vmcb);
            from_words = false;
            if debug_live {
                vcpu.debug = svm::take_debug_registers();
            }
            if xcr0_switching {
                // Note the XCR0 the guest left (as the CPU accepted it: its XSETBV is not
                // intercepted under QEMU) and return to the user one. The registers keep the
                // guest's values, live for its next run and owned by no thread (`fpu`): none
                // reaches them before they are saved (CR0.TS traps its first use, or the eager
                // switch saves them when it is resumed).
                let guest_xcr0 = svm::xcr0();
                vcpu.xcr0 = guest_xcr0;
                if guest_xcr0 != user_xcr0 {
                    svm::set_xcr0(user_xcr0);
                }
            }
        }
        let code = read::<u64>(frame, vmcb::EXIT_CODE) & 0xffff_ffff;
        let interrupted: u64 = read(frame, vmcb::EXIT_INT_INFO);
        if interrupted & state::event::VALID != 0 {
            vcpu.reinject = interrupted;
        }
        write(frame, vmcb::EVENT_INJECT, 0u64);
        match code {
            exit::INTR | exit::NMI => {
                // A physical interrupt: let the kernel take it (it stays pending until interrupts
                // are enabled again, at the latest when a thread runs) and make the VMM's call
                // resume the guest afterwards, loading nothing new.
                // SAFETY: the live caller (see above).
                let t = unsafe { &mut *thread };
                t.restart_syscall();
                t.frame.rsi = keep_unstored(t.frame.rsi);
                return Ok(Next::Restart);
            }
            exit::INVALID => {
                crate::warn!("VMRUN refused the vCPU state (invalid VMCB)");
                return Err(Error::InvalidArgument);
            }
            exit::NPF if crate::fault::guest_fault_to_pager(k, caller, vm_id, vcpu_id) => {
                // The caller waits for the pager's answer, then issues the call again.
                return Ok(Next::Restart);
            }
            exit::DR0_WRITE..=exit::DR3_WRITE => {
                // The guest's first write to DR0-DR3: from now on they are switched around
                // its runs and its writes go through; it executes the write again.
                let intercepts: u32 = read(frame, vmcb::INTERCEPT_DR);
                write(
                    frame,
                    vmcb::INTERCEPT_DR,
                    intercepts & !svm::intercept::DR0_3_WRITES,
                );
                // SAFETY: the live vCPU (see above).
                unsafe { (*vcpu_ptr).debug_live = true };
                continue;
            }
            exit::XSETBV if xcr0_switching => {
                // Handled here: XCR0 is switched per guest, so the guest may set its own
                // (within what the CPU supports). The intercept comes before the CPU's own
                // checks, so they are made here as the CPU makes them: #UD without the
                // guest's CR4.OSXSAVE, #GP(0) at CPL > 0, for an XCR other than XCR0 or an
                // invalid value.
                // SAFETY: the live vCPU (see above).
                let vcpu = unsafe { &mut *vcpu_ptr };
                let value =
                    (vcpu.registers.rdx << 32) | (read::<u64>(frame, vmcb::RAX) & 0xffff_ffff);
                let supported = svm::supported_xcr0();
                let osxsave = read::<u64>(frame, vmcb::CR4) & CR4_OSXSAVE != 0;
                let valid = read::<u8>(frame, vmcb::CPL) == 0
                    && vcpu.registers.rcx & 0xffff_ffff == 0
                    && value & 1 != 0
                    && value & !supported == 0
                    && (value & 4 == 0 || value & 2 != 0);
                if !osxsave {
                    write(frame, vmcb::EVENT_INJECT, INJECT_UD);
                } else if valid {
                    vcpu.xcr0 = value;
                    let rip: u64 = read(frame, vmcb::RIP);
                    write(frame, vmcb::RIP, rip + 3);
                } else {
                    write(frame, vmcb::EVENT_INJECT, INJECT_GP0);
                }
                continue;
            }
            _ => {
                // SAFETY: the live vCPU and caller (see above).
                unsafe {
                    store_exit_state(&*vcpu_ptr, words, unstored);
                    (*thread).frame.rdi = code;
                }
                return Ok(Next::Done);
            }
        }
    }
}
