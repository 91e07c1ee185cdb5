//! String items (indirect long IPC): the kernel copies bytes named by the sender into buffers
//! named by the receiver, after checking that every page involved is mapped; a missing page
//! becomes a page fault of the thread that lacks it (see [`l4_abi::StringItem`]).

use crate::arch::x86_64::paging::{phys_to_virt, AddressSpace, PAGE_4K, USER, WRITABLE};
use crate::ipc::{utcb, Message};
use crate::kernel::Kernel;
use crate::object::ThreadId;
use l4_abi::{MessageTag, StringItem, MAX_STRINGS};

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

/// Check every page the strings of `message` need, in the sender and the receiver.
pub fn check(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    message: &Message,
) -> Result<(), Missing> {
    let (Some(from), Some(to)) = (space(k, sender), space(k, receiver)) else {
        return Ok(());
    };
    for (n, (_, item)) in items(message).enumerate() {
        let Some(buffer) = buffer(k, receiver, n) else {
            continue;
        };
        let length = item.length.min(buffer.length);
        if let Some(address) = first_missing(from, item.address, length, false) {
            return Err(Missing {
                thread: sender,
                address,
                write: false,
            });
        }
        if let Some(address) = first_missing(to, buffer.address, length, true) {
            return Err(Missing {
                thread: receiver,
                address,
                write: true,
            });
        }
    }
    Ok(())
}

/// Copy the strings (after a successful [`check`]) and rewrite the items the receiver sees.
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
