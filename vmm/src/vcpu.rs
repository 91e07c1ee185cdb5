//! The vCPU as the VMM drives it: the `VcpuRun` syscall, the UTCB words that carry the guest
//! state in and out, and the entry states the guests start in.

use l4::abi::vcpu as state;
use l4::abi::Error;
use l4::sys;
use l4::utcb::Utcb;

/// Run `f`, which may do IPC through `utcb`, and keep the guest state words: a message longer
/// than four words (sent or received) goes through the UTCB's message registers, which hold
/// the vCPU state between exits (where `VcpuRun` loads the state from and leaves it at each
/// exit).
pub fn keeping_state<T>(utcb: &mut Utcb, f: impl FnOnce(&mut Utcb) -> T) -> T {
    let saved = utcb.mr;
    let result = f(utcb);
    utcb.mr = saved;
    result
}

/// Run the vCPU with `mask` of the UTCB state loaded first, until `deadline` (a TSC value;
/// 0: none) at the latest; returns the exit code.
#[inline]
pub fn run(utcb: &mut Utcb, vcpu: u64, mask: state::Groups, deadline: u64) -> Result<u64, Error> {
    sys::vcpu_run(utcb, vcpu, mask, deadline)
}

/// [`run`], the groups of `unstored` left unstored at the exit (`l4::sys::vcpu_run_unstored`).
#[inline]
pub fn run_unstored(
    utcb: &mut Utcb,
    vcpu: u64,
    mask: state::Groups,
    unstored: state::Groups,
    deadline: u64,
) -> Result<u64, Error> {
    sys::vcpu_run_unstored(utcb, vcpu, mask, unstored, deadline)
}

/// Event injection of #GP(0): valid, error code, exception.
pub const INJECT_GP0: u64 = state::event::GP0;

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = x86_64::registers::rflags::RFlags::INTERRUPT_FLAG.bits();

/// The TSC (shared with the guests: their TSC offset is 0).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// 64-bit mode at `entry`: paging on with the tables of [`crate::memory::identity_tables`]
/// (CR3 0x1000), flat segments (code 0x08, data 0x10), the stack at 0x7f000.
pub fn long_mode_state(words: &mut [u64; 64], entry: u64) {
    words.fill(0);
    words[state::RIP] = entry;
    words[state::RSP] = 0x7_f000;
    words[state::RFLAGS] = 2;
    words[state::CR0] = 0x8000_0031; // PG, NE, ET, PE
    words[state::CR3] = 0x1000;
    words[state::CR4] = 0x20; // PAE
    words[state::EFER] = 0x500; // LME, LMA
    words[state::CS] = state::segment(0x08, 0x29b, 0xffff_ffff);
    for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
        words[s] = state::segment(0x10, 0xc93, 0xffff_ffff);
    }
    words[state::TR] = state::segment(0, 0x8b, 0x67);
    words[state::LDTR] = state::segment(0, 0x82, 0);
}

/// 32-bit protected mode at `entry` with paging off, flat segments (code 0x08, data 0x10), the
/// stack at 0x8000 ([`state::protected_mode`]).
pub fn protected_mode_state(words: &mut [u64; 64], entry: u64) {
    state::protected_mode(words, entry);
}
