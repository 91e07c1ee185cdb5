//! The IPC fast path: a chain of checks for the common short call and reply-and-wait (message
//! in registers, no map items, partner already waiting, no timeout to arm, no scheduling
//! decision to make). When every check passes it does exactly what the slow path would do,
//! with fewer steps; when any fails it returns and the slow path (`syscall::dispatch`) runs.
//! It defines no behaviour of its own.

use crate::arch::x86_64::entry::Frame;
use crate::kernel::Kernel;
use crate::object::Object;
use crate::thread::{Awaiting, Thread, ThreadState};
use l4_abi::{rights, Syscall};

/// At most this many untyped words (the ones in registers). With the label (bits 32..64)
/// masked off, a tag is fast exactly when its value is at most this: no typed items (bits
/// 7..12), no reserved bits, at most 4 untyped words (bits 0..7).
const FAST_WORDS: u64 = 4;

/// Whether the fast path is enabled (kernel command line `nofastpath` disables it).
pub static mut ENABLED: bool = true;

/// Try the fast path for the current thread's syscall; returns if the slow path must run.
///
/// # Safety
/// `frame` must be the frame the syscall entry saved: the `frame` field of the current thread.
#[inline(always)]
pub unsafe fn try_fastpath(k: &mut Kernel, frame: *mut Frame) {
    // SAFETY: written once at boot.
    if !unsafe { ENABLED } {
        return;
    }
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
        if cap.rights & rights::SEND == 0 {
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
