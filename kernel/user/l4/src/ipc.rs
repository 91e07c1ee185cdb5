//! Typed IPC: send, receive (open and closed), call, reply, reply-and-wait. Words 0..4 of a
//! message travel in registers, words 4..64 in the UTCB. The free functions borrow the UTCB
//! for the call ([`with_utcb`]: they panic if a caller holds it); the methods of the same names
//! on [`Utcb`] run through a borrow their caller holds.

use crate::utcb::{with_utcb, Utcb};
use core::arch::asm;
use l4_abi::{Error, MessageTag, Syscall, Timeouts, MAX_WORDS, OPEN_WAIT, RECEIVE_PHASE};

/// An IPC failure: the error and whether it happened in the receive phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcError {
    /// What went wrong.
    pub error: Error,
    /// Whether the send phase had completed.
    pub receive_phase: bool,
}

/// A received message.
#[derive(Clone, Copy)]
pub struct Received {
    /// The tag.
    pub tag: MessageTag,
    /// The badge of the capability the sender used (0 for replies and kernel messages).
    pub badge: u64,
    /// The words (`tag.words()` of them are valid).
    pub words: [u64; MAX_WORDS],
}

impl Received {
    /// Word `i`.
    pub fn word(&self, i: usize) -> u64 {
        self.words[i]
    }
}

/// The IPC system call with its register assignment (see `kernel/docs/syscalls.md`, 4): the
/// words 0..4 in r8, r9, r12, r13; evaluates to (rax, tag, badge, words 0..4). Extra operands
/// (the UTCB's address as a hint) go last. Must be used in an `unsafe` block.
macro_rules! ipc_syscall {
    ($number:expr, $destination:expr, $source:expr, $tag:expr, $timeouts:expr, $w:expr
     $(, $extra:tt($reg:tt) $value:expr)*) => {{
        let (rax, rtag, badge, o0, o1, o2, o3): (u64, u64, u64, u64, u64, u64, u64);
        let w: [u64; 4] = $w;
        asm!(
            "syscall",
            inlateout("rax") $number as u64 => rax,
            in("rdi") $destination,
            inlateout("rsi") $source => badge,
            inlateout("rdx") $tag => rtag,
            in("r10") $timeouts,
            inlateout("r8") w[0] => o0,
            inlateout("r9") w[1] => o1,
            inlateout("r12") w[2] => o2,
            inlateout("r13") w[3] => o3,
            $($extra($reg) $value,)*
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
        (rax, rtag, badge, [o0, o1, o2, o3])
    }};
}

/// Register-level IPC: returns (rax, tag, badge, words 0..4).
///
/// # Safety
/// IPC moves data only into registers and the current thread's UTCB: no reference into that
/// UTCB may be live across the call (no [`with_utcb`] borrow in a caller, unless lent); with a
/// borrow, use [`Utcb::raw_ipc`].
#[inline(always)]
pub unsafe fn raw_ipc(
    number: Syscall,
    destination: u64,
    source: u64,
    tag: u64,
    timeouts: u64,
    w: [u64; 4],
) -> (u64, u64, u64, [u64; 4]) {
    // SAFETY: the kernel writes only the listed output registers (and rcx/r11).
    unsafe { ipc_syscall!(number, destination, source, tag, timeouts, w) }
}

fn error(rax: u64) -> IpcError {
    IpcError {
        error: Error::from_u64(rax).unwrap_or(Error::InvalidArgument),
        receive_phase: rax & RECEIVE_PHASE != 0,
    }
}

impl Utcb {
    /// Register-level IPC through this UTCB: returns (rax, tag, badge, words 0..4). Words 4..
    /// of a message travel in [`Utcb::mr`]; the kernel reads the buffer registers and writes
    /// the message registers of a message received.
    #[inline(always)]
    pub fn raw_ipc(
        &mut self,
        number: Syscall,
        destination: u64,
        source: u64,
        tag: u64,
        timeouts: u64,
        w: [u64; 4],
    ) -> (u64, u64, u64, [u64; 4]) {
        // SAFETY: the kernel writes only the listed output registers (and rcx/r11) and, of
        // memory, only this UTCB, which `self` borrows exclusively; passing its address tells
        // the compiler that the syscall reads and writes it.
        unsafe {
            ipc_syscall!(number, destination, source, tag, timeouts, w, in("r14") self as *mut Utcb)
        }
    }

    fn load(&mut self, tag: MessageTag, words: &[u64]) -> [u64; 4] {
        let n = tag.words().min(words.len());
        if n > 4 {
            self.mr[4..n].copy_from_slice(&words[4..n]);
        }
        let mut regs = [0u64; 4];
        let r = n.min(4);
        regs[..r].copy_from_slice(&words[..r]);
        regs
    }

    fn received(&self, tag: u64, badge: u64, regs: [u64; 4]) -> Received {
        let tag = MessageTag(tag);
        let mut words = [0u64; MAX_WORDS];
        words[..4].copy_from_slice(&regs);
        let n = tag.words().min(MAX_WORDS);
        if n > 4 {
            words[4..n].copy_from_slice(&self.mr[4..n]);
        }
        Received { tag, badge, words }
    }

    fn ipc(
        &mut self,
        number: Syscall,
        destination: u64,
        source: u64,
        tag: MessageTag,
        words: &[u64],
        timeouts: Timeouts,
    ) -> Result<Received, IpcError> {
        let regs = self.load(tag, words);
        let (rax, rtag, badge, out) =
            self.raw_ipc(number, destination, source, tag.0, timeouts.0, regs);
        if rax != 0 {
            return Err(error(rax));
        }
        Ok(self.received(rtag, badge, out))
    }

    /// [`send`] through this UTCB.
    pub fn send(
        &mut self,
        destination: u64,
        tag: MessageTag,
        words: &[u64],
        timeouts: Timeouts,
    ) -> Result<(), IpcError> {
        self.ipc(Syscall::Send, destination, 0, tag, words, timeouts)
            .map(|_| ())
    }

    /// [`wait`] through this UTCB.
    pub fn wait(&mut self, timeouts: Timeouts) -> Result<Received, IpcError> {
        self.ipc(Syscall::Receive, 0, OPEN_WAIT, MessageTag(0), &[], timeouts)
    }

    /// [`receive`] through this UTCB.
    pub fn receive(&mut self, source: u64, timeouts: Timeouts) -> Result<Received, IpcError> {
        self.ipc(Syscall::Receive, 0, source, MessageTag(0), &[], timeouts)
    }

    /// [`call`] through this UTCB.
    pub fn call(
        &mut self,
        destination: u64,
        tag: MessageTag,
        words: &[u64],
        timeouts: Timeouts,
    ) -> Result<Received, IpcError> {
        self.ipc(Syscall::Call, destination, 0, tag, words, timeouts)
    }

    /// [`reply_wait`] through this UTCB.
    pub fn reply_wait(
        &mut self,
        tag: MessageTag,
        words: &[u64],
        timeouts: Timeouts,
    ) -> Result<Received, IpcError> {
        self.ipc(Syscall::ReplyWait, 0, OPEN_WAIT, tag, words, timeouts)
    }

    /// [`reply`] through this UTCB.
    pub fn reply(&mut self, tag: MessageTag, words: &[u64]) -> Result<(), IpcError> {
        self.ipc(Syscall::Reply, 0, 0, tag, words, Timeouts::INFINITE)
            .map(|_| ())
    }
}

/// Send `words` (as described by `tag`) to the thread or gate in slot `destination`.
pub fn send(
    destination: u64,
    tag: MessageTag,
    words: &[u64],
    timeouts: Timeouts,
) -> Result<(), IpcError> {
    with_utcb(|u| u.send(destination, tag, words, timeouts))
}

/// Receive from anyone (open wait).
pub fn wait(timeouts: Timeouts) -> Result<Received, IpcError> {
    with_utcb(|u| u.wait(timeouts))
}

/// Receive only from the thread in slot `source` (closed wait).
pub fn receive(source: u64, timeouts: Timeouts) -> Result<Received, IpcError> {
    with_utcb(|u| u.receive(source, timeouts))
}

/// Send to `destination` and wait for the reply of the thread that received the message.
pub fn call(
    destination: u64,
    tag: MessageTag,
    words: &[u64],
    timeouts: Timeouts,
) -> Result<Received, IpcError> {
    with_utcb(|u| u.call(destination, tag, words, timeouts))
}

/// Reply to the pending caller, then wait for the next message from anyone.
pub fn reply_wait(
    tag: MessageTag,
    words: &[u64],
    timeouts: Timeouts,
) -> Result<Received, IpcError> {
    with_utcb(|u| u.reply_wait(tag, words, timeouts))
}

/// Reply to the pending caller.
pub fn reply(tag: MessageTag, words: &[u64]) -> Result<(), IpcError> {
    with_utcb(|u| u.reply(tag, words))
}
