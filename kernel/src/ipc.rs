//! Synchronous IPC: the send and receive phases, the direct copy of a message from sender to
//! receiver (registers, UTCB words, map items), timeouts, and cancellation on thread death.

use crate::items;
use crate::kernel::Kernel;
use crate::object::ThreadId;
use crate::strings::{self, Obstacle};
use crate::thread::{AfterDelivery, Awaiting, ThreadState, KERNEL_MESSAGE_WORDS};
use l4_abi::{
    Error, Fpage, MessageTag, StringItem, Timeout, TimeoutKind, MAX_STRINGS, MAX_WORDS,
    RECEIVE_PHASE,
};

use crate::thread::{utcb, Message};

/// Check what a sender may put in a message: a valid tag and well-formed map items.
pub fn validate_outgoing(k: &mut Kernel, sender: ThreadId) -> Result<(), Error> {
    let tag = MessageTag(k.thread(sender).frame.rdx);
    if !tag.is_valid() {
        return Err(Error::InvalidArgument);
    }
    if tag.typed() == 0 {
        return Ok(());
    }
    validate_items(&read_message(k, sender))
}

/// [`validate_outgoing`] of a message already read (with [`read_message`]).
fn validate_message(message: &Message) -> Result<(), Error> {
    if !message.tag.is_valid() {
        return Err(Error::InvalidArgument);
    }
    if message.tag.typed() == 0 {
        return Ok(());
    }
    validate_items(message)
}

/// The typed items of `message` (whose tag is valid): well-formed strings and flexpages.
fn validate_items(message: &Message) -> Result<(), Error> {
    let tag = message.tag;
    let mut strings = 0;
    for item in 0..tag.typed() {
        let (w0, w1) = (
            message.words[tag.untyped() + 2 * item],
            message.words[tag.untyped() + 2 * item + 1],
        );
        if let Some(string) = StringItem::decode(w0, w1) {
            strings += 1;
            if strings > MAX_STRINGS || !strings::is_valid_string(string) {
                return Err(Error::InvalidArgument);
            }
        } else if !Fpage(w1).is_valid() {
            return Err(Error::InvalidArgument);
        }
    }
    Ok(())
}

/// Read the message thread `sender` is sending (its kernel message, or its registers and
/// UTCB).
pub fn read_message(k: &mut Kernel, sender: ThreadId) -> Message {
    // One named result, filled in place (no copy of the whole message on return).
    let mut m = Message {
        tag: MessageTag(0),
        words: [0u64; MAX_WORDS],
    };
    let thread = k.thread(sender);
    if let Some(km) = &thread.kernel_message {
        m.tag = km.tag;
        m.words[..KERNEL_MESSAGE_WORDS].copy_from_slice(&km.words);
        return m;
    }
    let f = &thread.frame;
    m.tag = MessageTag(f.rdx);
    m.words[..4].copy_from_slice(&[f.r8, f.r9, f.r12, f.r13]);
    let count = m.tag.words().min(MAX_WORDS);
    if count > 4 {
        let u = utcb(k, sender);
        m.words[4..count].copy_from_slice(&u.mr[4..count]);
    }
    m
}

/// Copy the message of `sender` into `receiver` (which is waiting for it), with `badge`, in the
/// kernel entry whose [`transfer_step`] found it ready (`mapped`: its map items went without
/// error): the strings' last step, the words. A receiver awaiting a page-fault reply resumes
/// instead, or is killed if the pager refused.
fn deliver(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    badge: u64,
    awaiting: Awaiting,
    mapped: bool,
    message: &mut Message,
) {
    match awaiting {
        Awaiting::PageFaultReply => {
            crate::fault::apply_fault_reply(k, sender, receiver, message, mapped);
            return;
        }
        Awaiting::ExceptionReply => {
            crate::fault::apply_exception_reply(k, receiver, message);
            return;
        }
        _ => {}
    }
    if strings::has_strings(message) {
        strings::copy(k, sender, receiver, message);
    }
    k.thread(receiver).partial_copy = None;
    let tag = message.tag;
    let count = tag.words().min(MAX_WORDS);
    let first = [
        message.words[0],
        message.words[1],
        message.words[2],
        message.words[3],
    ];
    k.thread(receiver).frame.deliver(tag.0, badge, first);
    let receiver_utcb = utcb(k, receiver);
    if count > 4 {
        receiver_utcb.mr[4..count].copy_from_slice(&message.words[4..count]);
    }
}

/// What the steps before delivery left.
enum Transfer {
    /// Deliver in this kernel entry; whether the map items went without error.
    Deliver { mapped: bool },
    /// A step was done: the current thread's system call must restart
    /// ([`restart_for_step`]) for the next.
    Restart,
}

/// The steps before delivery of the message `sender` sends to `receiver`: the strings'
/// steps but the last ([`strings::check`]), then the map items' ([`crate::items`]; a reply
/// to a fault or exception copies no strings). A message with strings and map items copies
/// its strings' last step before the map items' first, in separate kernel entries.
fn transfer_step(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    awaiting: Awaiting,
    message: &Message,
) -> Result<Transfer, Obstacle> {
    let ready = Transfer::Deliver { mapped: true };
    // A kernel message (fault, exception, death) has no typed items.
    debug_assert!(message.tag.typed() == 0 || k.thread(sender).kernel_message.is_none());
    if message.tag.typed() == 0 {
        return Ok(ready);
    }
    let maps = |k: &mut Kernel| match items::step(k, sender, receiver, awaiting, message) {
        Some(mapped) => Transfer::Deliver { mapped },
        None => Transfer::Restart,
    };
    if items::is_kernel_reply(awaiting) {
        return Ok(maps(k));
    }
    let window = strings::check(k, sender, receiver, message)?;
    // The strings' last step goes in an entry of its own when map items follow it.
    if !window.is_last()
        || (window.start < window.end && items::pending(k, sender, receiver, awaiting, message))
    {
        strings::copy_step(k, sender, receiver, message, window);
        return Ok(Transfer::Restart);
    }
    Ok(if items::has_map_items(message) {
        maps(k)
    } else {
        ready
    })
}

/// Make `thread` (the current thread, in an IPC syscall that has not taken effect) issue its
/// system call again: after a string copy's step, or a fault. With `reply_done`, a
/// `ReplyWait` whose reply happened repeats only its receive.
fn restart_for_step(k: &mut Kernel, thread: ThreadId, reply_done: bool) {
    k.thread(thread).restart_syscall();
    let f = &mut k.thread(thread).frame;
    if reply_done && f.rax == l4_abi::Syscall::ReplyWait as u64 {
        // The reply already happened: only the receive is repeated.
        f.rax = l4_abi::Syscall::Receive as u64;
        f.rsi = l4_abi::OPEN_WAIT;
    }
    k.thread(thread).state = ThreadState::Ready;
}

/// Mark the waiting `receiver` as receiving a message transferred in steps (a fault or
/// exception reply stays what it is).
fn await_strings(k: &mut Kernel, receiver: ThreadId) {
    if let ThreadState::Receiving {
        from,
        awaiting: Awaiting::Message,
    } = k.thread(receiver).state
    {
        k.thread(receiver).state = ThreadState::Receiving {
            from,
            awaiting: Awaiting::Strings,
        };
    }
}

/// Make `thread` (in an IPC syscall that has not taken effect) fault on `missing` and
/// re-execute the syscall once the fault is resolved. The IPC's own timeout (send timeout for a
/// sender, receive timeout for a receiver) bounds the fault: if the pager does not take or
/// answer it in time, or refuses it, the IPC fails instead (`Timeout`, or `InvalidArgument`
/// for a string no pager can provide).
fn restart_with_fault(
    k: &mut Kernel,
    thread: ThreadId,
    missing: strings::Missing,
    reply_done: bool,
) {
    restart_for_step(k, thread, reply_done);
    let f = &k.thread(thread).frame;
    let receiving = f.rax == l4_abi::Syscall::Receive as u64;
    let timeouts = l4_abi::Timeouts(f.r10);
    let timeout = if receiving {
        timeouts.receive()
    } else {
        timeouts.send()
    };
    let t = k.thread(thread);
    t.string_fault = Some(if receiving { RECEIVE_PHASE } else { 0 });
    let access = if missing.write {
        l4_abi::FaultAccess::WRITE.bits()
    } else {
        0
    };
    if let Err(e) = crate::fault::page_fault_timed(k, thread, missing.address, access, timeout) {
        fail_string_fault(k, thread, e);
    }
}

/// End the string fault of `thread` by failing its re-issued IPC with `error`.
pub fn fail_string_fault(k: &mut Kernel, thread: ThreadId, error: Error) {
    let Some(phase) = k.thread(thread).string_fault.take() else {
        return;
    };
    let t = k.thread(thread);
    t.kernel_message = None;
    t.deadline = None;
    t.frame.rip += 2;
    t.frame.rax = error as u64 | phase;
    if k.current == Some(thread) {
        k.thread(thread).state = ThreadState::Ready;
    } else {
        k.wake(thread);
    }
}

/// Make the waiting `receiver` fault on `missing`; afterwards it resumes its receive.
fn fault_for_receiver(k: &mut Kernel, receiver: ThreadId, missing: strings::Missing) {
    let ThreadState::Receiving { from, .. } = k.thread(receiver).state else {
        return;
    };
    k.thread(receiver).resume_receive = Some(from);
    k.thread(receiver).state = ThreadState::Ready;
    crate::fault::page_fault_of(
        k,
        receiver,
        missing.address,
        l4_abi::FaultAccess::WRITE.bits(),
    );
}

/// Whether thread `id` waits for the answer to a page fault or exception.
pub fn awaits_kernel_reply(k: &Kernel, id: ThreadId) -> bool {
    items::is_kernel_reply(items::awaiting(k, id))
}

/// The TSC at which a timeout started now expires (`None`: never).
pub fn deadline(timeout: Timeout) -> Option<u64> {
    match timeout.kind() {
        TimeoutKind::Infinite | TimeoutKind::Zero => None,
        TimeoutKind::Micros(us) => {
            let hz = crate::arch::x86_64::apic::tsc_hz() as u128;
            let ticks = (us as u128 * hz).div_ceil(1_000_000).max(1) as u64;
            Some(crate::arch::x86_64::cpu::rdtsc().saturating_add(ticks))
        }
    }
}

fn set_deadline(k: &mut Kernel, id: ThreadId, timeout: Timeout) {
    let d = deadline(timeout);
    let t = k.thread(id);
    t.deadline = d;
    if let Some(d) = d {
        if !t.in_timeouts {
            t.in_timeouts = true;
            k.timeouts.push(id);
        }
        // The timer comes for it even when that is before the next tick.
        crate::arch::x86_64::apic::arm_before(d);
    }
}

/// What a send phase did.
pub enum SendOutcome {
    /// The message was delivered.
    Delivered,
    /// The sender blocked.
    Blocked,
}

/// The send phase: deliver to `target` if it waits for us, else block (or fail with a zero
/// timeout). `receive_timeout` applies to the receive phase of a call.
pub fn send(
    k: &mut Kernel,
    sender: ThreadId,
    target: ThreadId,
    badge: u64,
    call: bool,
    send_timeout: Timeout,
    receive_timeout: Timeout,
) -> Result<SendOutcome, Error> {
    let waiting = match k.threads.get(target).map(|t| t.state) {
        Some(ThreadState::Receiving { from, .. }) => from.is_none_or(|f| f == sender),
        Some(ThreadState::Dead) | None => return Err(Error::DeadPartner),
        Some(_) => false,
    };
    k.thread(sender).receive_timeout = receive_timeout;
    if waiting {
        let mut message = read_message(k, sender);
        let awaiting = items::awaiting(k, target);
        match transfer_step(k, sender, target, awaiting, &message) {
            Ok(Transfer::Deliver { mapped }) => {
                deliver(k, sender, target, badge, awaiting, mapped, &mut message);
                if !awaits_kernel_reply(k, target) {
                    k.wake(target);
                }
                sender_done(k, sender, target, call);
                return Ok(SendOutcome::Delivered);
            }
            Ok(Transfer::Restart) => {
                // One step of the transfer done: the receiver waits on, we go again.
                await_strings(k, target);
                restart_for_step(k, sender, false);
                return Ok(SendOutcome::Blocked);
            }
            Err(Obstacle::Invalid(thread)) if thread == sender => {
                return Err(Error::InvalidArgument);
            }
            Err(Obstacle::Invalid(_)) => {
                // The waiting receiver's buffer is not in user memory: its receive fails; we
                // go on as if it had not been waiting.
                abort(k, target, Error::InvalidArgument as u64 | RECEIVE_PHASE);
            }
            Err(Obstacle::Missing(missing)) if missing.thread == sender => {
                restart_with_fault(k, sender, missing, false);
                return Ok(SendOutcome::Blocked);
            }
            Err(Obstacle::Missing(missing)) => {
                // The waiting receiver's buffer lacks a page: it faults first; we queue.
                fault_for_receiver(k, target, missing);
            }
        }
    }
    if send_timeout.kind() == TimeoutKind::Zero {
        return Err(Error::Timeout);
    }
    k.thread(sender).state = ThreadState::Sending {
        to: target,
        badge,
        call,
    };
    push_sender(k, target, sender);
    set_deadline(k, sender, send_timeout);
    Ok(SendOutcome::Blocked)
}

/// Queue `sender` at `target`. Threads that die in a task's destruction leave their entries
/// behind (removing each would cost the whole queue); a queue that reaches a power of two
/// (from 64) is pruned of them first, so stale entries cost O(1) each, amortized.
fn push_sender(k: &mut Kernel, target: ThreadId, sender: ThreadId) {
    let length = k.thread(target).senders.len();
    if length >= 64 && length.is_power_of_two() {
        let mut queue = core::mem::take(&mut k.thread(target).senders);
        queue.retain(|s| {
            matches!(k.threads.get(*s).map(|t| t.state),
                Some(ThreadState::Sending { to, .. }) if to == target)
        });
        k.thread(target).senders = queue;
    }
    k.thread(target).senders.push_back(sender);
}

/// After `sender`'s message reached `receiver`: a call waits for the reply, a kernel
/// message continues as it said, a plain send is done.
fn sender_done(k: &mut Kernel, sender: ThreadId, receiver: ThreadId, call: bool) {
    let kernel_message = k.thread(sender).kernel_message.take();
    match kernel_message.map(|m| m.after) {
        Some(AfterDelivery::Die) => {
            finish_death(k, sender);
        }
        Some(after @ (AfterDelivery::AwaitFaultReply | AfterDelivery::AwaitExceptionReply)) => {
            let awaiting = if after == AfterDelivery::AwaitFaultReply {
                Awaiting::PageFaultReply
            } else {
                Awaiting::ExceptionReply
            };
            k.thread(sender).state = ThreadState::Receiving {
                from: Some(receiver),
                awaiting,
            };
            k.thread(receiver).caller = Some(sender);
            if k.thread(sender).string_fault.is_some() {
                let timeout = k.thread(sender).receive_timeout;
                set_deadline(k, sender, timeout);
            }
        }
        None if call => {
            k.thread(sender).state = ThreadState::Receiving {
                from: Some(receiver),
                awaiting: Awaiting::Message,
            };
            k.thread(receiver).caller = Some(sender);
            let timeout = k.thread(sender).receive_timeout;
            if timeout.kind() == TimeoutKind::Zero {
                // Polling for the reply: it cannot be there yet.
                abort(k, sender, Error::Timeout as u64 | RECEIVE_PHASE);
            } else {
                set_deadline(k, sender, timeout);
            }
        }
        None => {
            k.thread(sender).frame.rax = 0;
            if k.current != Some(sender) {
                k.wake(sender);
            } else {
                k.thread(sender).state = ThreadState::Ready;
            }
        }
    }
}

/// Drop the stale entries (senders that died or gave up) at the head of `receiver`'s queue:
/// afterwards the head, if any, is a thread sending to `receiver`.
fn drop_stale_senders(k: &mut Kernel, receiver: ThreadId) {
    while let Some(&head) = k.thread(receiver).senders.front() {
        let stale = !matches!(k.threads.get(head).map(|t| t.state),
            Some(ThreadState::Sending { to, .. }) if to == receiver);
        if !stale {
            break;
        }
        k.thread(receiver).senders.pop_front();
    }
}

/// Whether a thread is blocked sending to `receiver` (an open receive would take its message
/// at once). Costs nothing beyond a look at the queue when nobody is queued.
pub fn sender_waiting(k: &mut Kernel, receiver: ThreadId) -> bool {
    drop_stale_senders(k, receiver);
    !k.thread(receiver).senders.is_empty()
}

/// The receive phase of thread `receiver` (the current thread): take a waiting sender's
/// message, or block (or fail with a zero timeout).
pub fn receive(
    k: &mut Kernel,
    receiver: ThreadId,
    from: Option<ThreadId>,
    timeout: Timeout,
) -> Result<(), Error> {
    if let Some(partner) = from {
        if !k.threads.get(partner).is_some_and(|t| t.is_alive()) {
            return Err(Error::DeadPartner);
        }
    }
    if from.is_none() && crate::irq::deliver_pending(k, receiver) {
        return Ok(());
    }
    drop_stale_senders(k, receiver);
    let position = {
        let threads = &k.threads;
        let queue = &threads.get(receiver).expect("receiver").senders;
        queue.iter().position(|&s| {
            from.is_none_or(|f| f == s)
                && matches!(threads.get(s).map(|t| t.state), Some(ThreadState::Sending { to, .. }) if to == receiver)
        })
    };
    if let Some(index) = position {
        let sender = k
            .thread(receiver)
            .senders
            .remove(index)
            .expect("queued sender");
        let mut message = read_message(k, sender);
        let awaiting = items::awaiting(k, receiver);
        let mapped = match transfer_step(k, sender, receiver, awaiting, &message) {
            Ok(Transfer::Deliver { mapped }) => mapped,
            Ok(Transfer::Restart) => {
                // One step of the transfer done: the sender stays first in the queue, we go
                // again.
                k.thread(receiver).senders.push_front(sender);
                restart_for_step(k, receiver, true);
                return Ok(());
            }
            Err(Obstacle::Invalid(thread)) if thread == sender => {
                // The queued sender changed its string since `Send` checked it: its IPC
                // fails; we look further.
                abort(k, sender, Error::InvalidArgument as u64);
                return receive(k, receiver, from, timeout);
            }
            Err(Obstacle::Invalid(_)) => {
                // Our buffer is not in user memory: we fail, the sender stays queued.
                k.thread(receiver).senders.push_front(sender);
                return Err(Error::InvalidArgument);
            }
            Err(Obstacle::Missing(missing)) if missing.thread == sender => {
                // The queued sender faults on its string; we look further.
                k.thread(sender).deadline = None;
                restart_with_fault(k, sender, missing, false);
                return receive(k, receiver, from, timeout);
            }
            Err(Obstacle::Missing(missing)) => {
                k.thread(receiver).senders.push_front(sender);
                restart_with_fault(k, receiver, missing, true);
                return Ok(());
            }
        };
        let ThreadState::Sending { badge, call, .. } = k.thread(sender).state else {
            unreachable!("queued sender not sending");
        };
        k.thread(sender).deadline = None;
        k.thread(receiver).state = ThreadState::Receiving {
            from,
            awaiting: Awaiting::Message,
        };
        deliver(
            k,
            sender,
            receiver,
            badge,
            Awaiting::Message,
            mapped,
            &mut message,
        );
        k.thread(receiver).state = ThreadState::Ready;
        sender_done(k, sender, receiver, call);
        return Ok(());
    }
    if timeout.kind() == TimeoutKind::Zero {
        return Err(Error::Timeout);
    }
    k.thread(receiver).state = ThreadState::Receiving {
        from,
        awaiting: Awaiting::Message,
    };
    set_deadline(k, receiver, timeout);
    Ok(())
}

/// Reply from `replier` (the current thread) to its pending caller.
///
/// Returns `Ok(false)` when the replier's own string faulted instead: its syscall is
/// re-issued once the fault is resolved, and the caller must not continue it.
pub fn reply(k: &mut Kernel, replier: ThreadId) -> Result<bool, Error> {
    // Read once: validated here, transferred and delivered below.
    let mut message = read_message(k, replier);
    validate_message(&message)?;
    let caller = k.thread(replier).caller.take().ok_or(Error::NoPartner)?;
    let waiting = matches!(
        k.threads.get(caller).map(|t| t.state),
        Some(ThreadState::Receiving { from: Some(f), .. }) if f == replier
    );
    if !waiting {
        return Err(Error::NoPartner);
    }
    let awaiting = items::awaiting(k, caller);
    let kernel_reply = items::is_kernel_reply(awaiting);
    let mapped = match transfer_step(k, replier, caller, awaiting, &message) {
        Ok(Transfer::Deliver { mapped }) => mapped,
        Ok(Transfer::Restart) => {
            // One step of the transfer done: the caller waits on, we reply again.
            await_strings(k, caller);
            k.thread(replier).caller = Some(caller);
            restart_for_step(k, replier, false);
            return Ok(false);
        }
        Err(Obstacle::Invalid(thread)) if thread == replier => {
            k.thread(replier).caller = Some(caller);
            return Err(Error::InvalidArgument);
        }
        Err(Obstacle::Invalid(_)) => {
            // A reply never waits: the caller's buffer not in user memory fails both.
            abort(k, caller, Error::InvalidArgument as u64 | RECEIVE_PHASE);
            return Err(Error::InvalidArgument);
        }
        Err(Obstacle::Missing(missing)) if missing.thread == replier => {
            k.thread(replier).caller = Some(caller);
            restart_with_fault(k, replier, missing, false);
            return Ok(false);
        }
        Err(Obstacle::Missing(_)) => {
            // A reply never waits: the caller's receive buffer must be mapped.
            abort(k, caller, Error::Timeout as u64 | RECEIVE_PHASE);
            return Err(Error::Timeout);
        }
    };
    deliver(k, replier, caller, 0, awaiting, mapped, &mut message);
    if !kernel_reply {
        k.wake(caller);
    }
    Ok(true)
}

/// End a blocked thread's IPC with `error` and make it runnable.
pub fn abort(k: &mut Kernel, id: ThreadId, error: u64) {
    let Some(thread) = k.threads.get_mut(id) else {
        return;
    };
    // A string copy into its buffers that did some steps ends with the receive.
    thread.partial_copy = None;
    thread.reply_copy = None;
    let thread = &*thread;
    // Its own fault (for a string copy, or a vCPU's guest page fault), sent or awaiting the
    // answer: the fault's outcome, not the error, is what the thread sees.
    let in_fault = matches!(
        thread.state,
        ThreadState::Sending { .. }
            | ThreadState::Receiving {
                awaiting: Awaiting::PageFaultReply,
                ..
            }
    );
    let (string_fault, guest_fault) = (thread.string_fault.is_some(), thread.guest_fault);
    if in_fault && (string_fault || guest_fault.is_some()) {
        if let ThreadState::Sending { to, .. } = thread.state {
            if let Some(target) = k.threads.get_mut(to) {
                target.senders.retain(|&s| s != id);
            }
        }
        if string_fault {
            // A fault taken for a string copy: the IPC that needed it fails instead.
            let error = Error::from_u64(error).unwrap_or(Error::Canceled);
            fail_string_fault(k, id, error);
        } else if let Some((_, vcpu)) = guest_fault {
            // A guest page fault whose VM pager is gone or canceled: the VMM gets the exit.
            crate::debug!(
                "thread {}: its VM pager did not answer a guest page fault; VcpuRun returns it",
                k.thread(id).number
            );
            crate::fault::return_guest_fault(k, id, vcpu);
            k.thread(id).deadline = None;
            k.wake(id);
        }
        return;
    }
    match thread.state {
        ThreadState::Sending { to, .. } => {
            if let Some(target) = k.threads.get_mut(to) {
                target.senders.retain(|&s| s != id);
            }
            if let Some(after) = k.thread(id).kernel_message.take().map(|m| m.after) {
                // A kernel message that cannot be delivered: a dying thread dies now; a thread
                // with an unresolved fault or exception cannot continue and is killed.
                if after == AfterDelivery::Die {
                    finish_death(k, id);
                } else {
                    k.thread(id).guest_fault = None;
                    crate::warn!(
                        "thread {} killed: its fault or exception message could not be delivered",
                        k.thread(id).number
                    );
                    crate::fault::kill(k, id, crate::fault::DEATH_PAGER_GONE, 0);
                }
                return;
            }
        }
        ThreadState::Receiving {
            awaiting: Awaiting::PageFaultReply | Awaiting::ExceptionReply,
            ..
        } => {
            crate::warn!(
                "thread {} killed: its pager or exception handler did not answer",
                k.thread(id).number
            );
            crate::fault::kill(k, id, crate::fault::DEATH_PAGER_GONE, 0);
            return;
        }
        ThreadState::Receiving { .. } => {}
        _ => return,
    }
    k.thread(id).frame.rax = error;
    k.wake(id);
}

/// Expire the IPC deadlines due at TSC `now`; returns the earliest of those left.
pub fn expire_timeouts(k: &mut Kernel, now: u64) -> Option<u64> {
    let mut next: Option<u64> = None;
    let mut i = 0;
    while i < k.timeouts.len() {
        let id = k.timeouts[i];
        let deadline = k.threads.get(id).and_then(|t| t.deadline);
        match deadline {
            None => {
                k.timeouts.swap_remove(i);
                if let Some(t) = k.threads.get_mut(id) {
                    t.in_timeouts = false;
                }
            }
            Some(d) if d <= now => {
                k.timeouts.swap_remove(i);
                k.thread(id).in_timeouts = false;
                let code = match k.thread(id).state {
                    ThreadState::Receiving { .. } => Error::Timeout as u64 | RECEIVE_PHASE,
                    _ => Error::Timeout as u64,
                };
                abort(k, id, code);
            }
            Some(d) => {
                next = Some(next.map_or(d, |n| n.min(d)));
                i += 1;
            }
        }
    }
    next
}

/// Make thread `id` dead and fail every IPC that waits on it.
pub fn finish_death(k: &mut Kernel, id: ThreadId) {
    if let ThreadState::Sending { to, .. } = k.thread(id).state {
        if let Some(target) = k.threads.get_mut(to) {
            target.senders.retain(|&s| s != id);
        }
    }
    let_die(k, id);
    let waiting: alloc::vec::Vec<ThreadId> = k
        .threads
        .ids()
        .filter(|&t| {
            matches!(k.threads.get(t).map(|t| t.state),
                Some(ThreadState::Receiving { from: Some(f), .. }) if f == id)
        })
        .collect();
    for t in waiting {
        abort(k, t, Error::DeadPartner as u64 | RECEIVE_PHASE);
    }
}

/// The part of [`finish_death`] whose cost is the thread's own: it is dead, its queued
/// senders fail. Its entry in the queue it was sending to stays (stale, skipped and pruned by
/// the queue's owner), and the threads that wait to receive from it are the caller's to fail
/// (a task's destruction does it once for all its threads, [`fail_waiters_of_dead`]).
pub fn let_die(k: &mut Kernel, id: ThreadId) {
    crate::fpu::release(k, id);
    let thread = k.thread(id);
    thread.state = ThreadState::Dead;
    thread.deadline = None;
    thread.kernel_message = None;
    thread.caller = None;
    let senders: alloc::vec::Vec<ThreadId> = thread.senders.drain(..).collect();
    for s in senders {
        if matches!(k.threads.get(s).map(|t| t.state), Some(ThreadState::Sending { to, .. }) if to == id)
        {
            abort(k, s, Error::DeadPartner as u64);
        }
    }
}

/// Fail the receives (closed receives, calls awaiting their reply, faults awaiting their
/// answer) that wait on a thread that is dead or gone, among thread slots `*cursor..` (at most
/// `limit`); advances `*cursor`. Returns whether the scan reached the end.
pub fn fail_waiters_of_dead(k: &mut Kernel, cursor: &mut usize, limit: usize) -> bool {
    let end = k.threads.slot_count().min(cursor.saturating_add(limit));
    let ids: alloc::vec::Vec<ThreadId> = k
        .threads
        .ids_in(*cursor..end)
        .filter(|&t| {
            matches!(k.threads.get(t).map(|t| t.state),
                Some(ThreadState::Receiving { from: Some(f), .. })
                    if !k.threads.get(f).is_some_and(|p| p.is_alive()))
        })
        .collect();
    *cursor = end;
    for t in ids {
        abort(k, t, Error::DeadPartner as u64 | RECEIVE_PHASE);
    }
    end >= k.threads.slot_count()
}
