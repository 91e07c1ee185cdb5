//! The fuzzer's other threads: a server that answers calls, page faults and exceptions with
//! random replies (or never), a pager that gives worker tasks this image's pages, and the code
//! worker tasks run (random calls with short timeouts until the fuzzer destroys them, often in
//! the middle of one).

use crate::coverage;
use crate::rng::Rng;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{
    exception, fault_access, Fpage, MapItem, MessageTag, Syscall, Timeout, Timeouts,
    LABEL_EXCEPTION, LABEL_PAGE_FAULT, OPEN_WAIT, PAGE_SIZE,
};

/// Label of the liveness probe the main thread sends the server (answered with the word + 1).
pub const PROBE: i32 = 0x7072;
/// Each turn of the server's loop counts here (the main thread checks that it moves).
pub static SERVER_TURNS: AtomicU64 = AtomicU64::new(0);
/// The memory the server may hand out in its random map replies: (base, size).
pub static ARENA: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Worker stacks end here in their task (the pager serves the 64 KiB below).
pub const WORKER_STACK_TOP: u64 = 0x0000_5000_0000_0000;
/// This image's address range (what worker tasks run).
const IMAGE: core::ops::Range<u64> = 0x40_0000..0x1000_0000;

fn timeouts(send_us: u32, receive_us: u32) -> u64 {
    let t = |us: u32| {
        if us == 0 {
            Timeout::ZERO
        } else {
            Timeout::micros(us)
        }
    };
    Timeouts::new(t(send_us), t(receive_us)).0
}

/// The server: waits (100 ms at most) for anything, answers the probe, and answers the rest
/// at random: a page fault with a random flexpage of the arena or nothing, an exception with
/// random register state, a call with random words, or not at all.
pub extern "C" fn server(seed: u64) -> ! {
    let mut rng = Rng::new(seed);
    loop {
        SERVER_TURNS.fetch_add(1, SeqCst);
        let (rax, tag, _, words) = coverage::ipc(
            Syscall::Receive,
            0,
            OPEN_WAIT,
            0,
            timeouts(0, 100_000),
            [0; 4],
        );
        if rax != 0 {
            continue;
        }
        let tag = MessageTag(tag);
        let reply = |tag: MessageTag, words: [u64; 4]| {
            coverage::ipc(Syscall::Reply, 0, 0, tag.0, timeouts(0, 0), words);
        };
        match tag.label() {
            PROBE => reply(MessageTag::new(PROBE, 1, 0), [words[0] + 1, 0, 0, 0]),
            _ if rng.chance(25) => {} // never answer this one
            LABEL_PAGE_FAULT => {
                let (base, size) = (ARENA[0].load(SeqCst), ARENA[1].load(SeqCst));
                let order = 12 + rng.below(10) as u32;
                let offset = rng.below(size.max(1)) & !((1u64 << order) - 1);
                let fpage = Fpage::memory(base + offset, order, rng.below(8));
                let item = MapItem::map(words[0] & !(PAGE_SIZE - 1), fpage);
                if rng.chance(80) {
                    reply(MessageTag::new(0, 0, 1), [item.control, item.fpage.0, 0, 0]);
                } else {
                    reply(MessageTag::new(0, 0, 0), [0; 4]);
                }
            }
            LABEL_EXCEPTION => {
                // Resume with random state: the words beyond the registers go through the UTCB.
                let utcb = l4::utcb::utcb();
                for word in utcb.mr[4..exception::WORDS].iter_mut() {
                    *word = rng.garbage();
                }
                let w = [rng.garbage(), rng.garbage(), rng.garbage(), rng.garbage()];
                let words = if rng.chance(50) {
                    exception::WORDS
                } else {
                    rng.below(64) as usize
                };
                reply(MessageTag::new(0, words, 0), w);
            }
            _ => {
                let w = [rng.next(), rng.next(), rng.next(), rng.next()];
                reply(
                    MessageTag::new(rng.below(4) as i32, rng.below(5) as usize, 0),
                    w,
                );
            }
        }
    }
}

/// Pages handed to worker tasks, reused once every worker of a batch is gone.
struct PagePool {
    free: Vec<u64>,
    given: Vec<u64>,
}

static POOL_LOCK: AtomicBool = AtomicBool::new(false);
static mut POOL: PagePool = PagePool {
    free: Vec::new(),
    given: Vec::new(),
};

fn with_pool<R>(f: impl FnOnce(&mut PagePool) -> R) -> R {
    while POOL_LOCK.swap(true, SeqCst) {
        l4::sys::thread_yield();
    }
    // SAFETY: POOL_LOCK gives one thread at a time access to POOL.
    let r = f(unsafe { &mut *core::ptr::addr_of_mut!(POOL) });
    POOL_LOCK.store(false, SeqCst);
    r
}

/// A zeroed page for a worker task.
fn pool_page() -> u64 {
    let page = with_pool(|p| p.free.pop());
    let page = page.unwrap_or_else(l4::child::fresh_page);
    // SAFETY: a page of our heap that no worker holds any more (or a fresh one).
    unsafe { core::ptr::write_bytes(page as *mut u8, 0, PAGE_SIZE as usize) };
    with_pool(|p| p.given.push(page));
    page
}

/// Every worker task is destroyed: their pages may be handed out again.
pub fn recycle_pages() {
    with_pool(|p| {
        let given = core::mem::take(&mut p.given);
        p.free.extend(given);
    });
}

/// The pager of worker tasks: this image read-only (a private copy on write) and a stack.
pub extern "C" fn image_pager(_: u64) -> ! {
    loop {
        let (rax, tag, _, words) = coverage::ipc(
            Syscall::Receive,
            0,
            OPEN_WAIT,
            0,
            Timeouts::INFINITE.0,
            [0; 4],
        );
        if rax != 0 || MessageTag(tag).label() != LABEL_PAGE_FAULT {
            continue;
        }
        let (address, access) = (words[0], words[1]);
        let page = address & !(PAGE_SIZE - 1);
        let item = if IMAGE.contains(&page) {
            // SAFETY: the page lies in this image, which is mapped on demand.
            unsafe { core::ptr::read_volatile(page as *const u8) };
            if access & fault_access::WRITE != 0 {
                let copy = pool_page();
                // SAFETY: both pages are mapped in this task; the copy is ours alone.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        page as *const u8,
                        copy as *mut u8,
                        PAGE_SIZE as usize,
                    )
                };
                Some(MapItem::map(
                    page,
                    Fpage::memory(copy, 12, Fpage::READ | Fpage::WRITE),
                ))
            } else {
                Some(MapItem::map(
                    page,
                    Fpage::memory(page, 12, Fpage::READ | Fpage::EXECUTE),
                ))
            }
        } else if (WORKER_STACK_TOP - 0x1_0000..WORKER_STACK_TOP).contains(&page) {
            Some(MapItem::map(
                page,
                Fpage::memory(pool_page(), 12, Fpage::READ | Fpage::WRITE),
            ))
        } else {
            None
        };
        let (tag, w) = match item {
            Some(i) => (MessageTag::new(0, 0, 1), [i.control, i.fpage.0, 0, 0]),
            None => (MessageTag::new(1, 0, 0), [0; 4]), // refused: the worker dies
        };
        coverage::ipc(Syscall::Reply, 0, 0, tag.0, timeouts(0, 0), w);
    }
}

/// What a worker task's thread runs: calls to its peer (the server, through a gate) with short
/// timeouts, sends that do not wait, and short receives, forever (until destroyed).
pub extern "C" fn worker() -> ! {
    let mut rng = Rng::new(coverage::rdtsc());
    loop {
        let words = [rng.next(), rng.next(), rng.next(), rng.next()];
        let tag = MessageTag::new(rng.below(8) as i32, rng.below(5) as usize, 0).0;
        let t = timeouts(rng.below(2_000) as u32, rng.below(20_000) as u32);
        let number = rng.pick(&[
            Syscall::Call,
            Syscall::Call,
            Syscall::Send,
            Syscall::Receive,
        ]);
        let source = if number == Syscall::Receive {
            OPEN_WAIT
        } else {
            0
        };
        // SAFETY: IPC writes only registers and this thread's UTCB.
        unsafe { l4::ipc::raw_ipc(number, l4::abi::slots::PEER, source, tag, t, words) };
    }
}
