//! The IPC fast path: a chain of checks for the common call and reply-and-wait (untyped words
//! only: up to 4 in registers, the rest copied between UTCBs; no map or string items; the
//! partner already waiting; no timeout to arm; no scheduling decision to make). When every check passes it does exactly what the slow path would do,
//! with fewer steps; when any fails it returns and the slow path (`syscall::dispatch`) runs.
//! It defines no behaviour of its own.
//!
//! `VcpuRun` takes a shortcut of the same kind when the fast path declines ([`try_vcpu_run`]):
//! its vCPU capability looked up through the caller's own task, then [`crate::vm::run`], and
//! after an exit straight back to the caller when the kernel would pick it anyway (the exit
//! loop of a VMM is a call and reply with the guest).

use crate::arch::x86_64::entry::Frame;
use crate::arch::x86_64::paging::phys_to_virt;
use crate::kernel::Kernel;
use crate::object::{Object, ThreadId};
use crate::thread::{Awaiting, Thread, ThreadState};
use l4_abi::{Rights, Syscall};

/// At most this many untyped words. With the label (bits 32..64) masked off, a tag is fast
/// exactly when its value is at most this: no typed items (bits 7..12), no reserved bits, at
/// most 64 untyped words (bits 0..7). Words 0..4 travel in registers, the rest are copied from
/// UTCB to UTCB.
const FAST_WORDS: u64 = l4_abi::MAX_WORDS as u64;
/// Words that travel in registers.
const REGISTER_WORDS: u64 = l4_abi::REGISTER_WORDS as u64;

/// Copy message words 4..`words` from one UTCB frame to another (one `rep movsq`, so that no
/// call disturbs the register-only case).
#[inline(always)]
fn copy_utcb_words(from: u64, to: u64, words: u64) {
    let offset = REGISTER_WORDS * 8;
    // SAFETY: both UTCBs are kernel frames in the direct map and distinct (different threads);
    // the range 4..words lies inside the 64 message registers (the tag was checked); the
    // direction flag is clear in the kernel.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rcx") words - REGISTER_WORDS => _,
            inout("rsi") phys_to_virt(from) + offset => _,
            inout("rdi") phys_to_virt(to) + offset => _,
            options(nostack, preserves_flags),
        );
    }
}

/// Try the fast path for the current thread's syscall; returns if the slow path must run.
///
/// # Safety
/// `frame` must be the frame the syscall entry saved: the `frame` field of the current thread.
#[inline(always)]
pub unsafe fn try_fastpath(k: &mut Kernel, frame: *mut Frame) {
    let Some(current) = k.current else { return };
    // SAFETY: the syscall entry saved the registers into the current thread's `frame` field
    // (CURRENT_FRAME_END points just past it), so stepping back by the field's offset gives
    // the boxed current thread, alive during this entry; no other reference to it exists
    // while this function runs.
    let sender = unsafe {
        &mut *frame
            .byte_sub(core::mem::offset_of!(Thread, frame))
            .cast::<Thread>()
    };
    let f = &sender.frame;
    if f.rdx & 0xffff_ffff > FAST_WORDS || f.r10 >> 32 != 0 {
        return;
    }
    let (target, badge) = if f.rax == Syscall::Call as u64 {
        let Some(task) = sender.task.and_then(|t| k.tasks.get(t)) else {
            return;
        };
        let Ok(cap) = task.caps.get(f.rdi) else {
            return;
        };
        if !cap.rights.contains(Rights::SEND) {
            return;
        }
        let target = match cap.object {
            Object::Thread(t) => t,
            Object::Gate(g) => match k.gates.get(g) {
                Some(gate) => gate.thread,
                None => return,
            },
            _ => return,
        };
        (target, cap.badge)
    } else if f.rax == Syscall::ReplyWait as u64 {
        let Some(caller) = sender.caller else { return };
        if !sender.senders.is_empty() || k.pending_irqs != 0 {
            return;
        }
        (caller, 0)
    } else {
        return;
    };
    if target == current {
        return;
    }
    let Some(receiver_ptr) = k.threads.get_ptr(target) else {
        return;
    };
    // SAFETY: a different boxed thread (target != current), alive during this entry.
    let receiver = unsafe { &mut *receiver_ptr };
    let call = f.rax == Syscall::Call as u64;
    let waiting = match receiver.state {
        ThreadState::Receiving {
            from,
            awaiting: Awaiting::Message,
        } => match from {
            None => call,
            Some(partner) => partner == current,
        },
        _ => false,
    };
    if !waiting || receiver.priority < sender.priority {
        return;
    }
    if f.rdx & 0x7f > REGISTER_WORDS {
        copy_utcb_words(sender.utcb_frame, receiver.utcb_frame, f.rdx & 0x7f);
    }
    // What `Frame::deliver` does, written out: through the helper the compiler loads the
    // four words before storing any, which costs this path 4 instructions (347 instead of 343).
    let r = &mut receiver.frame;
    r.rax = 0;
    r.rdx = f.rdx;
    r.rsi = badge;
    r.r8 = f.r8;
    r.r9 = f.r9;
    r.r12 = f.r12;
    r.r13 = f.r13;
    receiver.state = ThreadState::Ready;
    receiver.deadline = None;
    if call {
        receiver.caller = Some(current);
        sender.state = ThreadState::Receiving {
            from: Some(target),
            awaiting: Awaiting::Message,
        };
    } else {
        sender.caller = None;
        sender.state = ThreadState::Receiving {
            from: None,
            awaiting: Awaiting::Message,
        };
    }
    sender.deadline = None;
    // SAFETY: `receiver_ptr` is the live boxed thread `target`.
    unsafe { k.resume_thread(target, receiver_ptr) }
}

/// The `VcpuRun` shortcut, taken by the syscall entry when the IPC fast path did not take the
/// call ([`try_vcpu_run`]).
///
/// # Safety
/// As for [`try_fastpath`].
#[inline(always)]
pub unsafe fn try_vcpu_run_entry(k: &mut Kernel, frame: *mut Frame) {
    // SAFETY: the current thread's frame (per the caller).
    if unsafe { (*frame).rax } == Syscall::VcpuRun as u64 {
        // SAFETY: as above.
        unsafe { try_vcpu_run(k, frame) }
    }
}

/// `VcpuRun(slot, mask, deadline)` of the current thread, whose syscall entry saved its
/// registers at `frame` ([`vcpu_run`]); returns if the capability is no vCPU capability with
/// `CONTROL` (the slow path reports the error). Out of line: in [`try_fastpath`]'s function
/// any call makes every system call save more registers on entry (4 to 8 instructions per
/// IPC round trip, measured), and after the fast path fails a call costs nothing but itself.
///
/// # Safety
/// As for [`try_fastpath`].
#[inline(never)]
unsafe fn try_vcpu_run(k: &mut Kernel, frame: *mut Frame) {
    let Some(caller) = k.current else { return };
    // SAFETY: as in `try_fastpath`: the frame is the `frame` field of the live, boxed current
    // thread; no reference to the thread is held.
    let thread = unsafe { frame.byte_sub(core::mem::offset_of!(Thread, frame)) }.cast::<Thread>();
    // SAFETY: as above (only fields are read).
    let (task, slot, mask, deadline) = unsafe {
        (
            (*thread).task,
            (*thread).frame.rdi,
            (*thread).frame.rsi,
            (*thread).frame.rdx,
        )
    };
    // SAFETY: as above.
    unsafe { vcpu_run(k, caller, thread, task, slot, mask, deadline) };
}

/// `VcpuRun` of the current thread `caller` (at `thread`, of `task`) on the vCPU in capability
/// slot `slot`: when the capability is a vCPU capability with `CONTROL` (else this returns and
/// the slow path reports the error), runs it and ends the system call: straight back to the
/// caller after an exit, else (a restart, an error, objects to reap) through the dispatcher's
/// end ([`crate::syscall::finish`]).
///
/// # Safety
/// `thread` must point to the live, boxed thread `caller`, and no reference to it may be held.
#[inline(always)]
unsafe fn vcpu_run(
    k: &mut Kernel,
    caller: ThreadId,
    thread: *mut Thread,
    task: Option<crate::object::TaskId>,
    slot: u64,
    mask: u64,
    deadline: u64,
) {
    let Some(cap) = task
        .and_then(|t| k.tasks.get(t))
        .and_then(|t| t.caps.get(slot).ok())
    else {
        return;
    };
    let Object::Vcpu(vcpu) = cap.object else {
        return;
    };
    if !cap.rights.contains(Rights::CONTROL) {
        return;
    }
    // SAFETY: per the caller.
    let result = unsafe { crate::vm::run_thread(k, caller, thread, vcpu, mask, deadline) };
    if matches!(result, Ok(crate::syscall::Next::Done))
        && k.reaping.is_empty()
        && k.dying_vms.is_empty()
    {
        // The dispatcher's end for a finished non-IPC call: rax = 0, then the schedule, which
        // picks the caller: it was running when it entered, and a run that ends `Done` took
        // no interrupt (a physical interrupt ends the run with a restart; it is taken when
        // the caller returns to user mode, and schedules then) and woke no thread (the one
        // IPC a run makes, to a VM's pager, restarts the call too). So it continues, and as
        // nothing else ran, with its address space and the rest still in place.
        // SAFETY: per the caller (`vm::run` holds no reference to it either).
        unsafe {
            (*thread).frame.rax = 0;
            k.return_to_caller(caller, thread);
        }
    }
    crate::syscall::finish(k, caller, Syscall::VcpuRun as u64, false, result)
}
