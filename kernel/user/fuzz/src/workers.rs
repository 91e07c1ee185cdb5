//! The fuzzer's other threads: a server that answers calls, page faults and exceptions with
//! random replies (or never), a pager that gives worker tasks this image's pages, and the code
//! worker tasks run (random calls with short timeouts until the fuzzer destroys them, often in
//! the middle of one).

use crate::coverage;
use crate::rng::Rng;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use l4::abi::{
    exception, Fpage, MapItem, MessageTag, Syscall, Timeout, Timeouts, LABEL_EXCEPTION,
    LABEL_GUEST_PAGE_FAULT, LABEL_PAGE_FAULT, OPEN_WAIT, PAGE_SIZE,
};

/// Label of the liveness probe the main thread sends the server (answered with the word + 1).
pub const PROBE: i32 = 0x7072;
/// Each turn of the server's loop counts here (the main thread checks that it moves).
pub static SERVER_TURNS: AtomicU64 = AtomicU64::new(0);
/// The memory the server may hand out in its random map replies: (base, size).
pub static ARENA: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Worker stacks end here in their task (the pager serves the 64 KiB below).
pub const WORKER_STACK_TOP: u64 = 0x0000_5000_0000_0000;
/// Where this image starts (what worker tasks run).
const IMAGE: core::ops::Range<u64> = 0x40_0000..0x1000_0000;

extern "C" {
    /// The end of this image's segments (defined by the linker).
    static _end: u8;
}

/// The end of this image: a worker's fault beyond it is refused (our own pager would refuse
/// ours there, and kill the image pager).
fn image_end() -> u64 {
    // Only the symbol's address is taken (no read: safe).
    (core::ptr::addr_of!(_end) as u64).min(IMAGE.end)
}

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

/// The arena the server maps from and strings of ours live in: (base, size).
pub fn arena() -> (u64, u64) {
    (ARENA[0].load(SeqCst), ARENA[1].load(SeqCst))
}

/// The server: waits (100 ms at most) for anything, answers the probe, and answers the rest
/// at random: a page fault with a random flexpage of the arena or nothing, an exception with
/// random register state, a call with random words, or not at all.
pub extern "C" fn server(seed: u64) -> ! {
    let mut rng = Rng::new(seed);
    loop {
        SERVER_TURNS.fetch_add(1, SeqCst);
        if rng.chance(20) {
            crate::strings::receive_buffers(&mut rng, arena());
        }
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
            // A VM's guest page fault always gets an answer: a VMM thread waits for it
            // without a timeout, its VcpuRun deadline only counts at guest entries (see
            // syscalls.md, VcpuRun), and the runner's liveness is checked after each batch.
            LABEL_GUEST_PAGE_FAULT => {
                let (base, size) = (ARENA[0].load(SeqCst), ARENA[1].load(SeqCst));
                let order = 12 + rng.below(10) as u32;
                let offset = rng.below(size.max(1)) & !((1u64 << order) - 1);
                let fpage = crate::ops::raw_memory_fpage(base + offset, order, rng.below(8));
                let item = MapItem::map(words[0] & !(PAGE_SIZE - 1), fpage);
                if rng.chance(70) {
                    reply(MessageTag::new(0, 0, 1), [item.control, item.fpage.0, 0, 0]);
                } else {
                    reply(MessageTag::new(1, 0, 0), [0; 4]); // "emulate it": an NPF exit
                }
            }
            _ if rng.chance(25) => {} // never answer this one
            LABEL_PAGE_FAULT => {
                let (base, size) = (ARENA[0].load(SeqCst), ARENA[1].load(SeqCst));
                let order = 12 + rng.below(10) as u32;
                let offset = rng.below(size.max(1)) & !((1u64 << order) - 1);
                let fpage = crate::ops::raw_memory_fpage(base + offset, order, rng.below(8));
                let item = MapItem::map(words[0] & !(PAGE_SIZE - 1), fpage);
                if rng.chance(80) {
                    reply(MessageTag::new(0, 0, 1), [item.control, item.fpage.0, 0, 0]);
                } else {
                    reply(MessageTag::new(0, 0, 0), [0; 4]);
                }
            }
            LABEL_EXCEPTION => {
                // Resume with random state: the words beyond the registers go through the UTCB.
                l4::utcb::with_utcb(|utcb| {
                    for word in utcb.mr[4..exception::WORDS].iter_mut() {
                        *word = rng.garbage();
                    }
                });
                let w = [rng.garbage(), rng.garbage(), rng.garbage(), rng.garbage()];
                let words = if rng.chance(50) {
                    exception::WORDS
                } else {
                    rng.below(64) as usize
                };
                reply(MessageTag::new(0, words, 0), w);
            }
            _ if rng.chance(20) => {
                let mut w = [rng.next(), rng.next(), rng.next(), rng.next()];
                let tag = crate::strings::message(&mut rng, arena(), 0, &mut w);
                reply(tag, w);
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
        let item = if (IMAGE.start..image_end()).contains(&page) {
            // SAFETY: the page lies in this image, which is mapped on demand.
            unsafe { core::ptr::read_volatile(page as *const u8) };
            if access & FAULT_WRITE != 0 {
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
    // Strings from this image (faulted in read-only by the image pager), buffers in the lower
    // half of the stack's 64 KiB (fresh pages from the pager; the stack stays above).
    let image = (IMAGE.start, image_end() - IMAGE.start);
    let buffers = (WORKER_STACK_TOP - 0x1_0000, 0x8000);
    loop {
        let mut words = [rng.next(), rng.next(), rng.next(), rng.next()];
        if rng.chance(20) {
            crate::strings::receive_buffers(&mut rng, buffers);
        }
        let tag = if rng.chance(20) {
            crate::strings::message(&mut rng, image, 8, &mut words).0
        } else {
            MessageTag::new(rng.below(8) as i32, rng.below(5) as usize, 0).0
        };
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

/// The vCPU the runner should run next (a slot of the main thread's; [`NO_VCPU`]: none).
pub static RUN_VCPU: AtomicU64 = AtomicU64::new(NO_VCPU);
/// No vCPU to run.
pub const NO_VCPU: u64 = u64::MAX;
/// Whether the runner garbles state words (`garble=1`; see the README on what that finds).
pub static GARBLE: AtomicU64 = AtomicU64::new(0);
/// Each run the runner made.
pub static RUNNER_TURNS: AtomicU64 = AtomicU64::new(0);
/// Each time the runner found no vCPU to run (the main thread checks that it gets there after
/// a batch: no `VcpuRun` outlives its deadline).
pub static RUNNER_IDLE: AtomicU64 = AtomicU64::new(0);

/// The write bit of a page fault's access word (`l4_abi::FaultAccess::WRITE`), raw: see
/// [`GUEST_GROUPS`].
const FAULT_WRITE: u64 = 2;

/// The transfer mask of the guest's whole state (`l4_abi::vcpu::Groups::GUEST`), raw: the
/// fuzzer also runs on kernels that predate the type (`scripts/fuzz-old-kernel.sh`).
const GUEST_GROUPS: u64 = 15;

/// 32-bit protected mode at `entry`, paging off, flat segments: a state the CPU enters.
fn protected_mode(words: &mut [u64; 64], entry: u64) {
    use l4::abi::vcpu as state;
    words.fill(0);
    words[state::RIP] = entry;
    words[state::RSP] = 0x8000;
    words[state::RFLAGS] = 2;
    words[state::CR0] = 0x11; // PE, ET
    words[state::CS] = state::segment(0x08, 0xc9b, 0xffff_ffff);
    for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
        words[s] = state::segment(0x10, 0xc93, 0xffff_ffff);
    }
    words[state::TR] = state::segment(0, 0x8b, 0x67);
    words[state::LDTR] = state::segment(0, 0x82, 0);
}

/// The vCPU runner: runs the vCPU the main thread names (which the main thread may unmap the
/// memory of, or delete, at any moment) from a state valid enough to enter the guest (with a
/// few words garbled now and then) for at most about 2 ms, again and again.
pub extern "C" fn vcpu_runner(seed: u64) -> ! {
    use l4::abi::vcpu as state;
    let mut rng = Rng::new(seed);
    loop {
        let vcpu = RUN_VCPU.load(SeqCst);
        if vcpu == NO_VCPU {
            RUNNER_IDLE.fetch_add(1, SeqCst);
            coverage::ipc(
                Syscall::Receive,
                0,
                OPEN_WAIT,
                0,
                timeouts(0, 10_000),
                [0; 4],
            );
            continue;
        }
        RUNNER_TURNS.fetch_add(1, SeqCst);
        l4::utcb::with_utcb(|utcb| {
            let words = &mut utcb.mr;
            protected_mode(words, rng.below(1 << 30) & !0xfff);
            for _ in 0..rng.below(4) * GARBLE.load(SeqCst) {
                let w = rng.below(state::STATE_WORDS as u64) as usize;
                words[w] = if rng.chance(50) {
                    rng.garbage()
                } else {
                    words[w] ^ (1 << rng.below(64))
                };
            }
        });
        let mask = if rng.chance(90) {
            GUEST_GROUPS
        } else {
            rng.below(16)
        };
        let deadline = coverage::rdtsc() + 2_000_000;
        // SAFETY: VcpuRun touches only our UTCB, to which no reference is live (the borrow
        // above has ended).
        let (rax, ..) =
            unsafe { coverage::syscall(Syscall::VcpuRun as u64, [vcpu, mask, deadline, 0, 0]) };
        if rax != 0 {
            // A vCPU that is gone (or refused): wait a millisecond for the next one.
            coverage::ipc(
                Syscall::Receive,
                0,
                OPEN_WAIT,
                0,
                timeouts(0, 1_000),
                [0; 4],
            );
        }
    }
}
