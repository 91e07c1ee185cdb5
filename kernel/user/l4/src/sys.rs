//! Raw syscall stubs, one per syscall of [`l4_abi::Syscall`], returning `Result`s.

use core::arch::asm;
use l4_abi::{Error, Syscall};

fn result(rax: u64) -> Result<(), Error> {
    if rax == 0 {
        Ok(())
    } else {
        Err(Error::from_u64(rax).unwrap_or(Error::InvalidArgument))
    }
}

/// A raw syscall with up to five arguments; returns `(rax, rdi, rsi, rdx)`.
///
/// # Safety
/// The syscall must not invalidate memory the program relies on (for example by unmapping
/// its own stack).
#[inline(always)]
pub unsafe fn raw(
    number: u64,
    a0: u64,
    a1: u64,
    a2: u64,
    a3: u64,
    a4: u64,
) -> (u64, u64, u64, u64) {
    let (rax, rdi, rsi, rdx): (u64, u64, u64, u64);
    // SAFETY: the kernel preserves every register except the outputs and rcx/r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => rax,
            inlateout("rdi") a0 => rdi,
            inlateout("rsi") a1 => rsi,
            inlateout("rdx") a2 => rdx,
            in("r10") a3,
            in("r8") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    (rax, rdi, rsi, rdx)
}

fn call(number: Syscall, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> (u64, u64, u64, u64) {
    // SAFETY: the syscalls wrapped by safe functions below cannot break the Rust memory model
    // of the calling task (unmapping is exposed as `unsafe fn`).
    unsafe { raw(number as u64, a0, a1, a2, a3, a4) }
}

/// Create a kernel object of `kind` into `slot` (see [`Syscall::FactoryCreate`]).
pub fn factory_create(
    factory: u64,
    kind: l4_abi::ObjectKind,
    slot: u64,
    argument: u64,
    badge: u64,
) -> Result<(), Error> {
    result(
        call(
            Syscall::FactoryCreate,
            factory,
            kind as u64,
            slot,
            argument,
            badge,
        )
        .0,
    )
}

/// Configure a thread (see [`Syscall::ThreadControl`]).
pub fn thread_control(
    thread: u64,
    task: u64,
    utcb: u64,
    pager: u64,
    handler: u64,
) -> Result<(), Error> {
    result(call(Syscall::ThreadControl, thread, task, utcb, pager, handler).0)
}

/// Exchange registers (see [`Syscall::ExRegs`]); returns old (ip, sp, flags).
pub fn ex_regs(
    thread: u64,
    ip: u64,
    sp: u64,
    flags: l4_abi::ExRegsFlags,
) -> Result<(u64, u64, u64), Error> {
    let (rax, ip, sp, fl) = call(Syscall::ExRegs, thread, ip, sp, flags.bits(), 0);
    result(rax).map(|()| (ip, sp, fl))
}

/// Copy a capability into a task (see [`Syscall::CapCopy`]).
pub fn cap_copy(
    task: u64,
    source: u64,
    destination: u64,
    rights: l4_abi::Rights,
    badge: u64,
) -> Result<(), Error> {
    result(
        call(
            Syscall::CapCopy,
            task,
            source,
            destination,
            rights.bits(),
            badge,
        )
        .0,
    )
}

/// Delete a capability.
pub fn cap_delete(slot: u64) -> Result<(), Error> {
    result(call(Syscall::CapDelete, slot, 0, 0, 0, 0).0)
}

/// Run vCPU `vcpu` (see [`Syscall::VcpuRun`]) with the state groups of `mask` loaded first
/// from this thread's UTCB, until an exit or `deadline` (a TSC value; 0: none); returns the exit code, the guest state being in the UTCB's message
/// registers. `utcb` is the borrow of this thread's UTCB the state goes through.
#[inline]
pub fn vcpu_run(
    utcb: &mut crate::utcb::Utcb,
    vcpu: u64,
    mask: l4_abi::vcpu::Groups,
    deadline: u64,
) -> Result<u64, Error> {
    vcpu_run_unstored(utcb, vcpu, mask, l4_abi::vcpu::Groups::empty(), deadline)
}

/// [`vcpu_run`], leaving the groups of `unstored` (within
/// [`l4_abi::vcpu::Groups::UNSTORABLE`]) unstored at the exit: their words keep what they held
/// (see [`l4_abi::vcpu::transfer`]).
#[inline]
pub fn vcpu_run_unstored(
    utcb: &mut crate::utcb::Utcb,
    vcpu: u64,
    mask: l4_abi::vcpu::Groups,
    unstored: l4_abi::vcpu::Groups,
    deadline: u64,
) -> Result<u64, Error> {
    let (rax, code): (u64, u64);
    // SAFETY: the kernel preserves every register except the outputs and rcx/r11, and of
    // memory writes only this thread's UTCB, which `utcb` borrows exclusively; passing its
    // address tells the compiler that the syscall reads and writes it.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") Syscall::VcpuRun as u64 => rax,
            inlateout("rdi") vcpu => code,
            inlateout("rsi") l4_abi::vcpu::transfer(mask, unstored) => _,
            inlateout("rdx") deadline => _,
            in("r10") 0u64,
            in("r8") 0u64,
            in("r14") utcb as *mut crate::utcb::Utcb,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result(rax).map(|()| code)
}

/// Map a flexpage into another task (see [`Syscall::Map`]).
pub fn map(
    task: u64,
    fpage: l4_abi::Fpage,
    destination: u64,
    flags: l4_abi::MapFlags,
) -> Result<(), Error> {
    result(call(Syscall::Map, task, fpage.0, destination, flags.bits(), 0).0)
}

/// Revoke a flexpage recursively (see [`Syscall::Unmap`]).
///
/// # Safety
/// With [`l4_abi::UnmapFlags::SELF`], nothing the program still uses may live in a memory
/// flexpage.
pub unsafe fn unmap(fpage: l4_abi::Fpage, flags: l4_abi::UnmapFlags) -> Result<(), Error> {
    // SAFETY: the caller vouches for the range.
    result(unsafe { raw(Syscall::Unmap as u64, fpage.0, flags.bits(), 0, 0, 0) }.0)
}

/// Set a thread's priority and time slice; returns the old (priority, time slice in µs).
pub fn thread_schedule(thread: u64, priority: u8, timeslice_us: u64) -> Result<(u64, u64), Error> {
    let (rax, old_priority, old_slice, _) = call(
        Syscall::ThreadSchedule,
        thread,
        priority as u64,
        timeslice_us,
        0,
        0,
    );
    result(rax).map(|()| (old_priority, old_slice))
}

/// Give the rest of the time slice to `thread` (or just yield with [`l4_abi::NO_CAP`]).
pub fn thread_switch(thread: u64) -> Result<(), Error> {
    result(call(Syscall::ThreadSwitch, thread, 0, 0, 0, 0).0)
}

/// Operate on an IRQ object (see [`Syscall::IrqControl`]).
pub fn irq_control(irq: u64, operation: l4_abi::IrqOp, thread: u64) -> Result<(), Error> {
    result(call(Syscall::IrqControl, irq, operation as u64, thread, 0, 0).0)
}

/// End the calling thread.
pub fn thread_exit(code: u64) -> ! {
    call(Syscall::ThreadExit, code, 0, 0, 0, 0);
    unreachable!("thread_exit returned")
}

/// Give up the rest of the time slice.
pub fn thread_yield() {
    call(Syscall::ThreadYield, 0, 0, 0, 0, 0);
}

/// Write bytes to the kernel console (at most 256).
pub fn debug_write(bytes: &[u8]) -> Result<(), Error> {
    result(
        call(
            Syscall::DebugWrite,
            bytes.as_ptr() as u64,
            bytes.len() as u64,
            0,
            0,
            0,
        )
        .0,
    )
}

/// Write all of `bytes` to the kernel console, 256 at a time (a failed part is skipped).
pub fn debug_write_all(bytes: &[u8]) {
    for chunk in bytes.chunks(256) {
        let _ = debug_write(chunk);
    }
}

/// Destroy a task.
pub fn task_destroy(task: u64) -> Result<(), Error> {
    result(call(Syscall::TaskDestroy, task, 0, 0, 0, 0).0)
}

/// Power off (QEMU exits with status `2 * code + 1`).
pub fn shutdown(platform: u64, code: u64) -> Result<(), Error> {
    result(call(Syscall::Shutdown, platform, code, 0, 0, 0).0)
}

/// A factory's kernel-memory quota, as [`quota_check`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    /// Bytes charged now.
    pub used: u64,
    /// Bytes allowed.
    pub limit: u64,
}

/// Read the quota of `factory` (see [`Syscall::QuotaCheck`]).
pub fn quota(factory: u64) -> Result<QuotaState, Error> {
    quota_check(factory, false).map(|(state, _)| state)
}

/// Read the quota of `factory` and, with `check_all`, check the kernel's books on every
/// quota, task and VM; returns the quota and the number of inconsistencies found (each kind's
/// first is logged on the kernel console). See [`Syscall::QuotaCheck`].
pub fn quota_check(factory: u64, check_all: bool) -> Result<(QuotaState, u64), Error> {
    let flags = if check_all {
        l4_abi::QuotaCheckFlags::ALL
    } else {
        l4_abi::QuotaCheckFlags::empty()
    };
    let (rax, used, limit, mismatches) = call(Syscall::QuotaCheck, factory, flags.bits(), 0, 0, 0);
    result(rax).map(|()| (QuotaState { used, limit }, mismatches))
}
