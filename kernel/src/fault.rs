//! Faults of user threads: page faults become IPC to the thread's pager, other exceptions IPC
//! to its exception handler (which may change the state and resume it). Refused faults and
//! unhandled exceptions kill the thread, with a clear log line and a death notice to its
//! exception handler.

use crate::arch::x86_64::entry::Frame;
use crate::arch::x86_64::entry::{RFLAGS_IF, RFLAGS_RESERVED, RFLAGS_USER_MASK};
use crate::arch::x86_64::svm::vmcb;
use crate::ipc;
use crate::kernel::Kernel;
use crate::object::{ThreadId, VcpuId, VmId};
use crate::thread::{utcb, Message};
use crate::thread::{AfterDelivery, KernelMessage, ThreadState, KERNEL_MESSAGE_WORDS};
use l4_abi::{
    FaultAccess, MessageTag, Timeout, LABEL_DEATH, LABEL_EXCEPTION, LABEL_PAGE_FAULT, USER_END,
};

fn words(values: &[u64]) -> [u64; KERNEL_MESSAGE_WORDS] {
    let mut w = [0; KERNEL_MESSAGE_WORDS];
    w[..values.len()].copy_from_slice(values);
    w
}

/// Number of words of an exception message and of the reply that resumes the thread.
pub const EXCEPTION_WORDS: usize = l4_abi::exception::WORDS;

/// The exception message words: vector, error code, then the register state (see
/// [`l4_abi::LABEL_EXCEPTION`]).
fn exception_words(vector: u64, error: u64, f: &Frame) -> [u64; KERNEL_MESSAGE_WORDS] {
    words(&[
        vector, error, f.rip, f.rsp, f.rflags, f.rax, f.rbx, f.rcx, f.rdx, f.rsi, f.rdi, f.rbp,
        f.r8, f.r9, f.r10, f.r11, f.r12, f.r13, f.r14, f.r15,
    ])
}

pub use l4_abi::death::{
    FAULT_REFUSED as DEATH_FAULT_REFUSED, NO_PAGER as DEATH_NO_PAGER,
    PAGER_GONE as DEATH_PAGER_GONE,
};

fn describe(k: &Kernel, id: ThreadId) -> (u32, &str) {
    let t = k.threads.get(id).expect("thread");
    let name = t
        .task
        .and_then(|task| k.tasks.get(task))
        .map(|task| task.name())
        .unwrap_or("?");
    (t.number, name)
}

/// A user page fault of the current thread at `address` with CPU error code `error`.
pub fn page_fault(k: &mut Kernel, address: u64, error: u64) {
    let id = k.current_id();
    page_fault_of(k, id, address, error);
}

/// A page fault of thread `id` (the current one, or one the kernel faults on behalf of for a
/// string copy) at `address`: a call to its pager.
pub fn page_fault_of(k: &mut Kernel, id: ThreadId, address: u64, error: u64) {
    if let Err(e) = page_fault_timed(k, id, address, error, Timeout::INFINITE) {
        let (number, name) = describe(k, id);
        crate::warn!(
            "thread {number} ({name}) killed: page fault at {address:#x} not resolvable: {e}"
        );
        kill(k, id, DEATH_NO_PAGER, address);
    }
}

/// Send the page fault of thread `id` to its pager, both phases bounded by `timeout`. An error
/// means the fault cannot be resolved (no pager, or not taken in time); the caller decides.
pub fn page_fault_timed(
    k: &mut Kernel,
    id: ThreadId,
    address: u64,
    error: u64,
    timeout: Timeout,
) -> Result<(), l4_abi::Error> {
    let rip = k.thread(id).frame.rip;
    let access = FaultAccess::from_bits_truncate(error).bits();
    let target = k.thread(id).pager.map(|cap| k.ipc_target(cap));
    let (pager, badge) = match target {
        Some(Ok(t)) => t,
        Some(Err(_)) => return Err(l4_abi::Error::DeadPartner),
        None => return Err(l4_abi::Error::InvalidArgument),
    };
    k.thread(id).fault_address = address;
    k.thread(id).kernel_message = Some(KernelMessage {
        tag: MessageTag::new(LABEL_PAGE_FAULT, 3, 0),
        words: words(&[address, access, rip]),
        after: AfterDelivery::AwaitFaultReply,
    });
    if let Err(e) = ipc::send(k, id, pager, badge, true, timeout, timeout) {
        k.thread(id).kernel_message = None;
        return Err(e);
    }
    Ok(())
}

/// The pager's answer (`message` from `pager`) to the fault of `faulter`, whose map item
/// (the first typed item) IPC has transferred, `mapped` telling whether without error (see
/// [`crate::items`]).
pub fn apply_fault_reply(
    k: &mut Kernel,
    pager: ThreadId,
    faulter: ThreadId,
    message: &Message,
    mapped: bool,
) {
    let thread = k.thread(faulter);
    // The reply's transfer is over.
    thread.reply_copy = None;
    if let Some((vm, vcpu)) = thread.guest_fault.take() {
        apply_guest_fault_reply(k, faulter, vm, vcpu, message, mapped);
        return;
    }
    let fault_address = thread.fault_address;
    let tag = message.tag;
    let refused = tag.typed() == 0 || tag.label() != 0;
    if !refused {
        if k.task_of(pager).is_none() || k.task_of(faulter).is_none() {
            kill(k, faulter, DEATH_PAGER_GONE, fault_address);
            return;
        }
        if mapped {
            let thread = k.thread(faulter);
            // It no longer awaits the reply.
            thread.state = ThreadState::Ready;
            thread.string_fault = None;
            match thread.resume_receive.take() {
                // Faulted for a string copy while waiting: wait again (and take the sender
                // that is queued by now).
                Some(from) => match ipc::receive(k, faulter, from, Timeout::INFINITE) {
                    Ok(()) if k.thread(faulter).state == ThreadState::Ready => k.wake(faulter),
                    Ok(()) => {}
                    // The receive cannot go on (its partner died, or its buffer is no longer
                    // in user memory): it fails.
                    Err(e) => {
                        k.thread(faulter).frame.rax = e as u64 | l4_abi::RECEIVE_PHASE;
                        k.wake(faulter);
                    }
                },
                None => k.wake(faulter),
            }
            return;
        }
        crate::warn!("fault reply mapping failed");
    }
    if k.thread(faulter).string_fault.is_some() {
        // The fault was taken for a string copy: the IPC fails, the thread lives on.
        ipc::fail_string_fault(k, faulter, l4_abi::Error::InvalidArgument);
        return;
    }
    let rip = k.thread(faulter).frame.rip;
    let (number, name) = describe(k, faulter);
    crate::warn!(
        "thread {number} ({name}) killed: pager refused page fault at {fault_address:#x} (ip {rip:#x})"
    );
    kill(k, faulter, DEATH_FAULT_REFUSED, fault_address);
}

/// A CPU exception (other than a page fault) in the current thread: a call to its exception
/// handler with the exception and the register state; without a handler the thread dies.
pub fn exception(k: &mut Kernel, vector: u64, error: u64) {
    let id = k.current_id();
    let frame: Frame = k.thread(id).frame;
    let handler = k.thread(id).exception_handler.map(|cap| k.ipc_target(cap));
    if let Some(Ok((target, badge))) = handler {
        k.thread(id).kernel_message = Some(KernelMessage {
            tag: MessageTag::new(LABEL_EXCEPTION, EXCEPTION_WORDS, 0),
            words: exception_words(vector, error, &frame),
            after: AfterDelivery::AwaitExceptionReply,
        });
        if ipc::send(
            k,
            id,
            target,
            badge,
            true,
            Timeout::INFINITE,
            Timeout::INFINITE,
        )
        .is_ok()
        {
            return;
        }
        k.thread(id).kernel_message = None;
    }
    let (number, name) = describe(k, id);
    crate::warn!(
        "thread {number} ({name}) killed: exception {vector} ({}) error {error:#x} at ip {:#x} sp {:#x}",
        exception_name(vector),
        frame.rip,
        frame.rsp
    );
    kill(k, id, vector, error);
}

/// The exception handler's answer to the exception of `thread`: label 0 with
/// [`EXCEPTION_WORDS`] words resumes the thread with that register state (words 2..20);
/// anything else kills it.
pub fn apply_exception_reply(k: &mut Kernel, thread: ThreadId, message: &Message) {
    let w = &message.words;
    let valid = message.tag.label() == 0
        && message.tag.untyped() >= EXCEPTION_WORDS
        && w[2] < USER_END
        && w[3] < USER_END;
    if !valid {
        let (number, name) = describe(k, thread);
        crate::warn!("thread {number} ({name}) killed by its exception handler");
        k.thread(thread).kernel_message = None;
        ipc::finish_death(k, thread);
        return;
    }
    let f = &mut k.thread(thread).frame;
    f.rip = w[2];
    f.rsp = w[3];
    f.rflags = (w[4] & RFLAGS_USER_MASK) | RFLAGS_IF | RFLAGS_RESERVED;
    f.rax = w[5];
    f.rbx = w[6];
    f.rcx = w[7];
    f.rdx = w[8];
    f.rsi = w[9];
    f.rdi = w[10];
    f.rbp = w[11];
    f.r8 = w[12];
    f.r9 = w[13];
    f.r10 = w[14];
    f.r11 = w[15];
    f.r12 = w[16];
    f.r13 = w[17];
    f.r14 = w[18];
    f.r15 = w[19];
    k.wake(thread);
}

/// Kill thread `id`: cancel its IPC, send a death notice (label [`LABEL_DEATH`], words:
/// reason, detail, ip) to its exception handler if it has one, then it is dead.
pub fn kill(k: &mut Kernel, id: ThreadId, reason: u64, detail: u64) {
    if let ThreadState::Sending { to, .. } = k.thread(id).state {
        if let Some(target) = k.threads.get_mut(to) {
            target.senders.retain(|&s| s != id);
        }
    }
    k.thread(id).state = ThreadState::Ready;
    k.thread(id).deadline = None;
    let handler = k.thread(id).exception_handler.map(|cap| k.ipc_target(cap));
    if let Some(Ok((target, badge))) = handler {
        if target != id {
            let rip = k.thread(id).frame.rip;
            k.thread(id).kernel_message = Some(KernelMessage {
                tag: MessageTag::new(LABEL_DEATH, 3, 0),
                words: words(&[reason, detail, rip]),
                after: AfterDelivery::Die,
            });
            if ipc::send(
                k,
                id,
                target,
                badge,
                false,
                Timeout::INFINITE,
                Timeout::INFINITE,
            )
            .is_ok()
            {
                return;
            }
        }
    }
    k.thread(id).kernel_message = None;
    ipc::finish_death(k, id);
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

/// Print a kernel-mode fault with the saved state and stop.
pub fn kernel_fault(frame: &Frame) -> ! {
    panic!(
        "kernel exception {} ({}) error {:#x} at rip {:#x} rsp {:#x} cr2 {:#x}\n  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
        frame.vector,
        exception_name(frame.vector),
        frame.error,
        frame.rip,
        frame.rsp,
        x86_64::registers::control::Cr2::read_raw(),
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    );
}

// ---- guest page faults: a VM's nested page faults as IPC to its pager

/// Send the nested page fault of `vcpu` to its VM's pager, in the name of `caller` (which
/// re-issues its `VcpuRun` once the fault is resolved). False if the VM has no usable pager.
pub(crate) fn guest_fault_to_pager(
    k: &mut Kernel,
    caller: ThreadId,
    vm: VmId,
    vcpu: VcpuId,
) -> bool {
    let Some(Ok((pager, badge))) = k
        .vms
        .get(vm)
        .and_then(|v| v.pager)
        .map(|cap| k.ipc_target(cap))
    else {
        return false;
    };
    let frame = k.vcpus.get(vcpu).expect("vcpu").vmcb;
    let (gpa, error, rip): (u64, u64, u64) = (
        crate::vm::read(frame, vmcb::EXIT_INFO2),
        crate::vm::read(frame, vmcb::EXIT_INFO1),
        crate::vm::read(frame, vmcb::RIP),
    );
    let thread = k.thread(caller);
    thread.frame.rip -= 2;
    thread.frame.rsi = crate::vm::keep_unstored(thread.frame.rsi);
    thread.fault_address = gpa;
    thread.guest_fault = Some((vm, vcpu));
    let mut words = [0; crate::thread::KERNEL_MESSAGE_WORDS];
    words[..3].copy_from_slice(&[gpa, error, rip]);
    thread.kernel_message = Some(crate::thread::KernelMessage {
        tag: l4_abi::MessageTag::new(l4_abi::LABEL_GUEST_PAGE_FAULT, 3, 0),
        words,
        after: crate::thread::AfterDelivery::AwaitFaultReply,
    });
    let sent = crate::ipc::send(
        k,
        caller,
        pager,
        badge,
        true,
        l4_abi::Timeout::INFINITE,
        l4_abi::Timeout::INFINITE,
    );
    if sent.is_err() {
        let thread = k.thread(caller);
        thread.kernel_message = None;
        thread.guest_fault = None;
        thread.frame.rip += 2;
        return false;
    }
    true
}

/// The VM pager's answer to the guest page fault of `thread`'s vCPU: a map item maps into the
/// VM and the vCPU run is re-issued; anything else returns the exit to the VMM.
pub fn apply_guest_fault_reply(
    k: &mut Kernel,
    thread: ThreadId,
    vm: VmId,
    vcpu: VcpuId,
    message: &Message,
    mapped: bool,
) {
    let tag = message.tag;
    let gpa = k.thread(thread).fault_address;
    let answered = tag.label() == 0
        && tag.typed() > 0
        && mapped
        && k.vms.get(vm).is_some_and(|v| v.npt.lookup(gpa).is_some());
    if !answered {
        return_guest_fault(k, thread, vcpu);
    }
    k.wake(thread);
}

/// Hand the nested page fault of `vcpu` back to the VMM thread `thread` (whose `VcpuRun` was
/// set to be re-issued): its `VcpuRun` returns the `NPF` exit with the vCPU's state, as if the
/// VM had no pager. For a pager that refused, and for one that died or was destroyed before it
/// answered (the VMM decides what the guest sees; the VMM's thread lives on).
pub fn return_guest_fault(k: &mut Kernel, thread: ThreadId, vcpu: VcpuId) {
    let unstored = crate::vm::transfer_groups(k.thread(thread).frame.rsi)
        .map_or(l4_abi::vcpu::Groups::empty(), |(_, unstored)| unstored);
    let words = &mut utcb(k, thread).mr;
    if let Some(v) = k.vcpus.get(vcpu) {
        crate::vm::store_state(v, words, unstored);
    }
    let t = k.thread(thread);
    t.guest_fault = None;
    t.kernel_message = None;
    t.frame.rip += 2;
    t.frame.rax = 0;
    t.frame.rdi = l4_abi::vcpu::exit::NPF;
}
