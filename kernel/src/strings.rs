//! String items (indirect long IPC): the kernel copies bytes named by the sender into buffers
//! named by the receiver, after checking that every range lies in user memory and every page
//! involved is mapped; a missing page becomes a page fault of the thread that lacks it (see
//! [`l4_abi::StringItem`]).

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace, PAGE_4K, USER, WRITABLE};
use crate::kernel::Kernel;
use crate::object::ThreadId;
use crate::thread::{utcb, Message};
use l4_abi::{MessageTag, StringItem, KERNEL_AREA_START, MAX_STRINGS, MAX_STRING_LENGTH};

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

/// The receive buffer `i` of `receiver`.
fn buffer(k: &mut Kernel, receiver: ThreadId, i: usize) -> Option<StringItem> {
    if i >= MAX_STRINGS {
        return None;
    }
    let br = &utcb(k, receiver).br;
    StringItem::decode(br[2 + 2 * i], br[3 + 2 * i])
}

fn space(k: &Kernel, thread: ThreadId) -> Option<AddressSpace> {
    let task = k.threads.get(thread)?.task?;
    Some(k.tasks.get(task)?.space)
}

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

/// Check every range and page the strings of `message` need, in the sender and the
/// receiver: every string must be valid ([`is_valid_string`]), every receive buffer a string
/// goes to must lie in user memory, and their pages must be mapped.
pub fn check(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
) -> Result<(), Obstacle> {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return Ok(());
    };
    for (n, (_, item)) in items(message).enumerate() {
        if !is_valid_string(item) {
            return Err(Obstacle::Invalid(sender));
        }
        let Some(buffer) = buffer(k, receiver, n) else {
            continue;
        };
        if !in_user_memory(buffer) {
            return Err(Obstacle::Invalid(receiver));
        }
        let length = item.length.min(buffer.length);
        if let Some(address) = first_missing(from, item.address, length, false) {
            return Err(Obstacle::Missing(Missing {
                thread: sender,
                address,
                write: false,
            }));
        }
        if let Some(address) = first_missing(to, buffer.address, length, true) {
            return Err(Obstacle::Missing(Missing {
                thread: receiver,
                address,
                write: true,
            }));
        }
    }
    Ok(())
}

/// Copy the strings (after a successful [`check`] in the same kernel entry, so every range is
/// in user memory and mapped) and rewrite the items the receiver sees.
pub fn copy(k: &mut Kernel, sender: ThreadId, receiver: ThreadId, message: &mut Message) {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return;
    };
    let found: alloc::vec::Vec<(usize, StringItem)> = items(message).collect();
    for (n, (at, item)) in found.into_iter().enumerate() {
        let (length, destination) = match buffer(k, receiver, n) {
            Some(b) => (item.length.min(b.length), b.address),
            None => (0, 0),
        };
        let mut done = 0;
        while done < length {
            let (s, d) = (item.address + done, destination + done);
            let chunk = (length - done)
                .min(PAGE_4K - s % PAGE_4K)
                .min(PAGE_4K - d % PAGE_4K);
            let (Some(ts), Some(td)) = (from.lookup(s), to.lookup(d)) else {
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
        let words = StringItem {
            length: done,
            address: destination,
        }
        .words();
        message.words[at] = words[0];
        message.words[at + 1] = words[1];
    }
    let _ = MessageTag(0);
}
