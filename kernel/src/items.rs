//! The map items of a message, and the map item of a page-fault reply, transferred in bounded
//! steps before the message is delivered: each kernel entry of the IPC does at most
//! [`MAP_STEP_UNITS`] of mapping work ([`crate::map::map_step`]); when more remains, the
//! thread in whose system call it happens issues it again, and the receiver keeps how far the
//! transfer got (in its [`PartialCopy`], with the strings' progress) while its receive lasts.
//! The last step's outcome goes straight to the delivery.

use crate::kernel::Kernel;
use crate::map::{map_start, map_step, place_window, Space, MAP_STEP_UNITS};
use crate::object::{TaskId, ThreadId};
use crate::strings::{self, PartialCopy};
use crate::thread::{utcb, Awaiting, Message, ThreadState};
use l4_abi::{Error, Fpage, FpageKind, MapItem, StringItem, BR_OBJECT_WINDOW, BR_RECEIVE_WINDOW};

/// What one map item transfers.
#[derive(Debug, Clone, Copy)]
struct Job {
    /// Index of the typed item in the message.
    item: usize,
    from: TaskId,
    /// The part of the sender's flexpage that goes.
    fpage: Fpage,
    to: Space,
    /// Address or first slot in `to`.
    destination: u64,
    grant: bool,
}

/// The two tasks of a transfer and what the receiver awaits, looked up once per step.
#[derive(Clone, Copy)]
struct Ends {
    from: TaskId,
    to: TaskId,
    awaiting: Awaiting,
}

/// [`Ends`] of a transfer from `sender` to `receiver` (`awaiting`: what the receiver awaits);
/// `None` when a task is gone (no job then).
fn ends(k: &Kernel, sender: ThreadId, receiver: ThreadId, awaiting: Awaiting) -> Option<Ends> {
    Some(Ends {
        from: k.task_of(sender)?,
        to: k.task_of(receiver)?,
        awaiting,
    })
}

/// What `receiver` awaits (`Awaiting::Message` when not receiving).
pub fn awaiting(k: &Kernel, receiver: ThreadId) -> Awaiting {
    match k.threads.get(receiver).map(|t| t.state) {
        Some(ThreadState::Receiving { awaiting, .. }) => awaiting,
        _ => Awaiting::Message,
    }
}

/// Whether a receiver awaiting `awaiting` gets a reply from the kernel's view (a page-fault
/// or exception reply).
pub fn is_kernel_reply(awaiting: Awaiting) -> bool {
    matches!(
        awaiting,
        Awaiting::PageFaultReply | Awaiting::ExceptionReply
    )
}

/// Map job number `n` of `message` from `sender` to `receiver`, in item order (computed
/// afresh each time: no list is kept or moved). A receiver awaiting a page-fault reply gets
/// the reply's first item (memory only: anything else fails), placed in its whole address
/// space, or in its VM's guest-physical space for a guest page fault (never granted); a
/// receiver awaiting an exception reply gets none; any other receiver each map item its
/// receive windows take (items without a window for them are dropped).
#[inline(always)]
fn nth_job(
    k: &mut Kernel,
    ends: &Ends,
    receiver: ThreadId,
    message: &Message,
    n: usize,
) -> Option<Job> {
    let Ends { from, to, awaiting } = *ends;
    let tag = message.tag;
    let item = |i: usize| MapItem {
        control: message.words[tag.untyped() + 2 * i],
        fpage: Fpage(message.words[tag.untyped() + 2 * i + 1]),
    };
    match awaiting {
        Awaiting::ExceptionReply => None,
        Awaiting::PageFaultReply => {
            if n > 0 || tag.label() != 0 || tag.typed() == 0 {
                return None;
            }
            let item = item(0);
            let (window, to, grant) = match k.thread(receiver).guest_fault {
                Some((vm, _)) => (Fpage::memory(0, 46, Fpage::RWX), Space::Vm(vm), false),
                None => (Fpage::whole_space(), Space::Task(to), item.is_grant()),
            };
            let (fpage, destination) = place_window(window, item);
            Some(Job {
                item: 0,
                from,
                fpage,
                to,
                destination,
                grant,
            })
        }
        Awaiting::Message | Awaiting::Strings => {
            let br = &utcb(k, receiver).br;
            let memory_window = Fpage(br[BR_RECEIVE_WINDOW]);
            let object_window = Fpage(br[BR_OBJECT_WINDOW]);
            let mut found = 0;
            for i in 0..tag.typed() {
                let item = item(i);
                if item.control & StringItem::FLAG != 0 {
                    continue;
                }
                let (fpage, destination) = match item.fpage.kind() {
                    Some(FpageKind::Memory) if memory_window.is_valid_memory() => {
                        place_window(memory_window, item)
                    }
                    Some(FpageKind::Object) if object_window.is_valid_object() => {
                        place_window(object_window, item)
                    }
                    Some(FpageKind::Io) => (item.fpage, 0),
                    _ => {
                        if n == 0 {
                            crate::debug!(
                                "map item {i} dropped: receiver has no receive window for it"
                            );
                        }
                        continue;
                    }
                };
                if found == n {
                    return Some(Job {
                        item: i,
                        from,
                        fpage,
                        to: Space::Task(to),
                        destination,
                        grant: item.is_grant(),
                    });
                }
                found += 1;
            }
            None
        }
    }
}

/// Whether a job to a receiver awaiting `awaiting` may go: a page-fault reply's memory only.
fn allowed(awaiting: Awaiting, job: &Job) -> bool {
    awaiting != Awaiting::PageFaultReply || job.fpage.kind() == Some(FpageKind::Memory)
}

/// Whether `message` has typed items that are not strings (map items, or a fault reply's).
pub fn has_map_items(message: &Message) -> bool {
    let tag = message.tag;
    (0..tag.typed()).any(|i| {
        let at = tag.untyped() + 2 * i;
        message
            .words
            .get(at)
            .is_some_and(|&control| control & StringItem::FLAG == 0)
    })
}

/// How far [`work`] got.
enum Progress {
    /// All done; whether an item failed.
    Done { failed: bool },
    /// More remains (kept in the receiver).
    More,
}

/// Do the map items' work (see the module) from where the receiver's transfer got, at most
/// `budget` units of it (`awaiting`: what the receiver awaits).
fn work(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    awaiting: Awaiting,
    message: &Message,
    mut budget: u32,
) -> Progress {
    if !has_map_items(message) {
        return Progress::Done { failed: false };
    }
    let mut p = strings::progress_in(k, sender, receiver, message, is_kernel_reply(awaiting));
    let Some(ends) = ends(k, sender, receiver, awaiting) else {
        return Progress::Done { failed: p.failed };
    };
    while let Some(job) = nth_job(k, &ends, receiver, message, p.mapped as usize) {
        let resume = p.resume.unwrap_or_else(|| map_start(job.fpage));
        let stepped = if allowed(awaiting, &job) {
            map_step(
                k,
                job.from,
                job.fpage,
                job.to,
                job.destination,
                job.grant,
                resume,
                &mut budget,
            )
        } else {
            Err(Error::InvalidArgument)
        };
        match stepped {
            Ok(Some(next)) => {
                p.resume = Some(next);
                strings::save(k, sender, receiver, message, p);
                return Progress::More;
            }
            Ok(None) => {}
            Err(e) => {
                crate::warn!("map item {}: {e}", job.item);
                p.failed = true;
            }
        }
        p.mapped += 1;
        p.resume = None;
        if awaiting == Awaiting::PageFaultReply {
            // A page-fault reply has one job.
            break;
        }
    }
    Progress::Done { failed: p.failed }
}

/// Whether `message` from `sender` has map work for `receiver` (awaiting `awaiting`) that is
/// not done yet.
pub fn pending(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    awaiting: Awaiting,
    message: &Message,
) -> bool {
    if !has_map_items(message) {
        return false;
    }
    let Some(ends) = ends(k, sender, receiver, awaiting) else {
        return false;
    };
    let done = strings::progress_in(k, sender, receiver, message, is_kernel_reply(awaiting)).mapped
        as usize;
    nth_job(k, &ends, receiver, message, done).is_some()
}

/// One step of the map items' work (at most [`MAP_STEP_UNITS`]) to `receiver`, which awaits
/// `awaiting`: `Some(ok)` when all is done and the message can be delivered in this kernel
/// entry (`ok`: every item went without error), `None` when the current thread's system call
/// must restart for more.
pub fn step(
    k: &mut Kernel,
    sender: ThreadId,
    receiver: ThreadId,
    awaiting: Awaiting,
    message: &Message,
) -> Option<bool> {
    match work(k, sender, receiver, awaiting, message, MAP_STEP_UNITS) {
        Progress::Done { failed } => Some(!failed),
        Progress::More => None,
    }
}

/// A fresh transfer's progress, for [`strings::progress`].
pub fn fresh(sender: ThreadId) -> PartialCopy {
    PartialCopy {
        sender,
        fingerprint: 0,
        done: 0,
        mapped: 0,
        resume: None,
        failed: false,
    }
}
