//! String items (indirect long IPC): the kernel copies bytes named by the sender into buffers
//! named by the receiver, after checking that every range lies in user memory and every page
//! involved is mapped; a missing page becomes a page fault of the thread that lacks it (see
//! [`l4_abi::StringItem`]).

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace, PAGE_4K, USER, WRITABLE};
use crate::kernel::Kernel;
use crate::object::ThreadId;
use crate::thread::{utcb, Message};
use kernel_core::string_window::Window;
use l4_abi::{StringItem, KERNEL_AREA_START, MAX_STRINGS, MAX_STRING_LENGTH};
use smallvec::SmallVec;

/// A page that must be faulted in before a string can be copied.
#[derive(Debug, Clone, Copy)]
pub struct Missing {
    /// The thread whose address space lacks the page.
    pub thread: ThreadId,
    /// The address.
    pub address: u64,
    /// Whether write access is needed.
    pub write: bool,
}

/// Why the strings of a message cannot be copied now.
#[derive(Debug, Clone, Copy)]
pub enum Obstacle {
    /// A page must be faulted in first.
    Missing(Missing),
    /// A range of this thread is not in user memory: a string (its item may have changed in
    /// the sender's UTCB since `Send` checked it) or a receive buffer (checked only here).
    Invalid(ThreadId),
}

/// Whether `range` lies wholly below [`KERNEL_AREA_START`] (the top of the memory a task
/// can map), without wrapping around.
fn in_user_memory(range: StringItem) -> bool {
    range
        .address
        .checked_add(range.length)
        .is_some_and(|end| end <= KERNEL_AREA_START)
}

/// Whether a sender may send `item`: at most [`MAX_STRING_LENGTH`] bytes in user memory.
pub fn is_valid_string(item: StringItem) -> bool {
    item.length <= MAX_STRING_LENGTH && in_user_memory(item)
}

/// The string items of a message: (index of the item's first word, item).
fn items(message: &Message) -> impl Iterator<Item = (usize, StringItem)> + '_ {
    let tag = message.tag;
    (0..tag.typed()).filter_map(move |i| {
        let at = tag.untyped() + 2 * i;
        if at + 1 >= message.words.len() {
            return None;
        }
        StringItem::decode(message.words[at], message.words[at + 1]).map(|s| (at, s))
    })
}

/// Whether a message has string items.
pub fn has_strings(message: &Message) -> bool {
    items(message).next().is_some()
}

fn space(k: &Kernel, thread: ThreadId) -> Option<AddressSpace> {
    let task = k.threads.get(thread)?.task?;
    Some(k.tasks.get(task)?.space)
}

#[inline(always)]
fn first_missing(space: AddressSpace, start: u64, length: u64, write: bool) -> Option<u64> {
    let mut page = start & !(PAGE_4K - 1);
    while page < start + length {
        let ok = space
            .lookup(page)
            .is_some_and(|t| t.flags & USER != 0 && (!write || t.flags & WRITABLE != 0));
        if !ok {
            return Some(page.max(start));
        }
        page += PAGE_4K;
    }
    None
}

/// Bytes a string copy moves in one step (about 25,000 instructions): a longer copy goes in
/// steps, the current thread's system call restarting in between so that interrupts are
/// taken (see `kernel/docs/syscalls.md`, 4.5).
pub const STEP_BYTES: u64 = 128 << 10;

/// A transfer (string copy, map items) that has done some of its steps, kept by the receiver
/// (whose buffers hold the bytes copied so far, whose address space or VM the pages mapped so
/// far) while its receive lasts.
#[derive(Debug, Clone, Copy)]
pub struct PartialCopy {
    /// The sender.
    pub sender: ThreadId,
    /// [`fingerprint`] of the message's items and the receiver's buffers and windows: a
    /// continuation must see the same.
    pub fingerprint: u64,
    /// Bytes of the run (see [`kernel_core::string_window`]) copied.
    pub done: u64,
    /// Map items done (see [`crate::items`]).
    pub mapped: u8,
    /// Where the next step of the next map item goes on (`None`: at its start).
    pub resume: Option<u64>,
    /// Whether a map item done failed.
    pub failed: bool,
}

/// The strings of a message to one receiver: for each item the string's address, the
/// buffer's address (0 without a buffer) and the bytes it copies (0 without a buffer), where
/// the item is in the message, and where an earlier step left off.
struct Plan {
    from: [u64; MAX_STRINGS],
    to: [u64; MAX_STRINGS],
    lengths: [u64; MAX_STRINGS],
    at: [usize; MAX_STRINGS],
    count: usize,
    /// String items beyond [`MAX_STRINGS`] (the sender rewrote its UTCB after `Send`
    /// checked it): they have no buffer and copy nothing.
    excess: bool,
    /// Bytes of the run an earlier step of this copy did (0: none).
    start: u64,
}

impl Plan {
    fn lengths(&self) -> &[u64] {
        &self.lengths[..self.count]
    }
}

/// A digest of `message`'s typed items and `receiver`'s buffers and receive windows (not for
/// a reply to a fault or exception, which uses neither): a continuation of a transfer in
/// steps must see the same (a 64-bit multiply-xorshift; it only tells a continuation of the
/// same message to the same buffers from anything else).
fn fingerprint(k: &mut Kernel, receiver: ThreadId, message: &Message) -> u64 {
    let mix = |hash: u64, word: u64| {
        let h = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 29)
    };
    let tag = message.tag;
    let mut hash = mix(0, tag.0);
    let typed = tag.untyped()..(tag.untyped() + 2 * tag.typed()).min(message.words.len());
    for &word in &message.words[typed] {
        hash = mix(hash, word);
    }
    if crate::ipc::awaits_kernel_reply(k, receiver) {
        hash = mix(hash, k.thread(receiver).fault_address);
    } else {
        // The receive windows (words 0 and 1) and the buffers of the strings there can be.
        let br = &utcb(k, receiver).br;
        let used = 2 + 2 * MAX_STRINGS.min(tag.typed());
        for &word in &br[..used.min(br.len())] {
            hash = mix(hash, word);
        }
    }
    hash
}

/// Where `receiver` keeps the progress of the transfer to it: a page-fault or exception
/// reply's apart from that of the receive the thread may have faulted in (which goes on
/// after the fault).
fn slot(k: &mut Kernel, receiver: ThreadId) -> &mut Option<PartialCopy> {
    let kernel_reply = crate::ipc::awaits_kernel_reply(k, receiver);
    slot_of(k.thread(receiver), kernel_reply)
}

/// [`slot`] of thread `thread`, `kernel_reply` telling whether it awaits a page-fault or
/// exception reply.
fn slot_of(thread: &mut crate::thread::Thread, kernel_reply: bool) -> &mut Option<PartialCopy> {
    if kernel_reply {
        &mut thread.reply_copy
    } else {
        &mut thread.partial_copy
    }
}

/// How far the transfer of `message` from `sender` to `receiver` got: the receiver's
/// [`PartialCopy`] when it continues this one, else a fresh one.
pub fn progress(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
) -> PartialCopy {
    let kernel_reply = crate::ipc::awaits_kernel_reply(k, receiver);
    progress_in(k, sender, receiver, message, kernel_reply)
}

/// [`progress`] when the caller knows whether `receiver` awaits a page-fault or exception
/// reply (`kernel_reply`, which picks the slot).
pub fn progress_in(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
    kernel_reply: bool,
) -> PartialCopy {
    let saved = *slot_of(k.thread(receiver), kernel_reply);
    match saved {
        Some(c) if c.sender == sender && c.fingerprint == fingerprint(k, receiver, message) => c,
        _ => crate::items::fresh(sender),
    }
}

/// Keep `progress` of the transfer of `message` from `sender` in `receiver` (see
/// [`progress`]).
pub fn save(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
    progress: PartialCopy,
) {
    let fingerprint = fingerprint(k, receiver, message);
    *slot(k, receiver) = Some(PartialCopy {
        sender,
        fingerprint,
        ..progress
    });
}

/// The plan of `message`'s strings from `sender` to `receiver`; `Err(true)` if a string is
/// invalid (see [`is_valid_string`]), `Err(false)` if a buffer a string goes to is not in
/// user memory.
#[inline(always)]
fn plan(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
) -> Result<Plan, bool> {
    let mut p = Plan {
        from: [0; MAX_STRINGS],
        to: [0; MAX_STRINGS],
        lengths: [0; MAX_STRINGS],
        at: [0; MAX_STRINGS],
        count: 0,
        excess: false,
        start: 0,
    };
    let br = &utcb(k, receiver).br;
    for (n, (at, item)) in items(message).enumerate() {
        if !is_valid_string(item) {
            return Err(true);
        }
        if n >= MAX_STRINGS {
            p.excess = true;
            continue;
        }
        if let Some(b) = StringItem::decode(br[2 + 2 * n], br[3 + 2 * n]) {
            if !in_user_memory(b) {
                return Err(false);
            }
            p.to[n] = b.address;
            p.lengths[n] = item.length.min(b.length);
        }
        p.from[n] = item.address;
        p.at[n] = at;
        p.count = n + 1;
    }
    if slot(k, receiver).is_some() {
        p.start = progress(k, sender, receiver, message).done;
    }
    Ok(p)
}

/// Check the ranges and pages the strings of `message` need for their next step, in the
/// sender and the receiver: every string must be valid ([`is_valid_string`]), every receive
/// buffer a string goes to must lie in user memory, and the pages of this step's window must
/// be mapped. Returns the window (the last one when [`Window::is_last`]: deliver now).
pub fn check(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
) -> Result<Window, Obstacle> {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return Ok(Window::new(&[], 0, STEP_BYTES));
    };
    let p = match plan(k, sender, receiver, message) {
        Ok(p) => p,
        Err(true) => return Err(Obstacle::Invalid(sender)),
        Err(false) => return Err(Obstacle::Invalid(receiver)),
    };
    let lengths = p.lengths();
    let window = Window::new(lengths, p.start, STEP_BYTES);
    for piece in window.pieces(lengths) {
        let (source, buffer) = (p.from[piece.item], p.to[piece.item]);
        if let Some(address) = first_missing(from, source + piece.offset, piece.length, false) {
            return Err(Obstacle::Missing(Missing {
                thread: sender,
                address,
                write: false,
            }));
        }
        if let Some(address) = first_missing(to, buffer + piece.offset, piece.length, true) {
            return Err(Obstacle::Missing(Missing {
                thread: receiver,
                address,
                write: true,
            }));
        }
    }
    Ok(window)
}

/// Copy one window's bytes (checked by [`check`] in this kernel entry: every range is in user
/// memory and mapped).
#[inline(always)]
fn copy_window(from: AddressSpace, to: AddressSpace, p: &Plan, window: Window) {
    for piece in window.pieces(p.lengths()) {
        let (source, buffer) = (p.from[piece.item], p.to[piece.item]);
        let mut done = 0;
        while done < piece.length {
            let (s, d) = (source + piece.offset + done, buffer + piece.offset + done);
            let chunk = (piece.length - done)
                .min(PAGE_4K - s % PAGE_4K)
                .min(PAGE_4K - d % PAGE_4K);
            let (Some(ts), Some(td)) = (from.lookup(s), to.lookup(d)) else {
                crate::warn!("string copy: page {s:#x} or {d:#x} went since its check");
                break;
            };
            // SAFETY: both pages were checked to be mapped (user, and writable for the
            // receiver) in this kernel entry; the chunk stays inside both pages; the direct map
            // covers them. They may be the same physical page: `copy` handles overlap.
            unsafe {
                core::ptr::copy(
                    phys_to_virt(ts.physical) as *const u8,
                    phys_to_virt(td.physical) as *mut u8,
                    chunk as usize,
                )
            };
            done += chunk;
        }
    }
}

/// Copy one step of the strings (not the last, see [`check`]) and note it in the receiver,
/// whose receive goes on; the current thread's system call must restart for the next step.
pub fn copy_step(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
    window: Window,
) {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return;
    };
    let Ok(p) = plan(k, sender, receiver, message) else {
        return;
    };
    copy_window(from, to, &p, window);
    let progress = progress(k, sender, receiver, message);
    save(
        k,
        sender,
        receiver,
        message,
        PartialCopy {
            done: window.end,
            ..progress
        },
    );
}

/// Copy the strings' last step (after a successful [`check`] in the same kernel entry that
/// returned the last window) and rewrite the items the receiver sees: each its buffer's
/// address and the bytes it received (without a buffer, and beyond [`MAX_STRINGS`]: 0, 0).
pub fn copy(k: &mut Kernel, sender: ThreadId, receiver: ThreadId, message: &mut Message) {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return;
    };
    let Ok(p) = plan(k, sender, receiver, message) else {
        return;
    };
    // (`ipc::deliver` ends the receiver's partial copy.)
    copy_window(from, to, &p, Window::new(p.lengths(), p.start, u64::MAX));
    for n in 0..p.count {
        let words = StringItem {
            length: p.lengths[n],
            address: p.to[n],
        }
        .words();
        message.words[p.at[n]] = words[0];
        message.words[p.at[n] + 1] = words[1];
    }
    if p.excess {
        let rest: SmallVec<[usize; 8]> =
            items(message).skip(MAX_STRINGS).map(|(at, _)| at).collect();
        for at in rest {
            let words = StringItem {
                length: 0,
                address: 0,
            }
            .words();
            message.words[at] = words[0];
            message.words[at + 1] = words[1];
        }
    }
}
