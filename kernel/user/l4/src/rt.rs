//! The task runtime: the entry point, exit (with a notice to the parent), the panic handler,
//! a lazily initialised heap and console output.

use crate::{ipc, sys};
use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use l4_abi::{slots, MessageTag, Timeout, Timeouts, LABEL_EXIT};
use linked_list_allocator::LockedHeap;

/// Start of the heap region; its pages come from the pager on first touch.
pub const HEAP_BASE: u64 = 0x0000_1000_0000_0000;
/// Size of the heap region.
pub const HEAP_SIZE: usize = 64 << 20;

struct LazyHeap {
    heap: LockedHeap,
    ready: AtomicBool,
    /// The highest heap offset ever allocated (the pages touched).
    high_water: AtomicU64,
}

// SAFETY: delegates to LockedHeap, initialising it once before first use.
unsafe impl GlobalAlloc for LazyHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.ready.swap(true, Ordering::AcqRel) {
            // SAFETY: the heap region is reserved for the allocator by convention; pages are
            // supplied by the pager.
            unsafe { self.heap.lock().init(HEAP_BASE as *mut u8, HEAP_SIZE) };
        }
        // SAFETY: forwarded.
        let p = unsafe { self.heap.alloc(layout) };
        if !p.is_null() {
            let end = p as u64 + layout.size() as u64 - HEAP_BASE;
            self.high_water.fetch_max(end, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: LazyHeap = LazyHeap {
    heap: LockedHeap::empty(),
    ready: AtomicBool::new(false),
    high_water: AtomicU64::new(0),
};

/// Heap bytes in use now and the highest heap offset ever allocated (the heap's pages below
/// it have been touched and stay with the task).
pub fn heap_usage() -> (usize, u64) {
    let used = if HEAP.ready.load(Ordering::Acquire) {
        HEAP.heap.lock().used()
    } else {
        0
    };
    (used, HEAP.high_water.load(Ordering::Relaxed))
}

/// Bytes at the top of the first thread's stack that hold the task's command line (NUL
/// terminated), written there by the root task.
pub const ARGUMENTS_SIZE: usize = 1024;

/// The task's command line, as the root task passed it (empty if none).
pub fn arguments() -> &'static str {
    let start = (l4_abi::INITIAL_STACK_TOP - ARGUMENTS_SIZE as u64) as *const u8;
    // SAFETY: the first thread's stack starts below this area, which the root task fills (its
    // page faults in on first read) and nobody writes afterwards.
    let bytes = unsafe { core::slice::from_raw_parts(start, ARGUMENTS_SIZE) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(0);
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// The data module the root task mapped for option `blob=NAME` (announced in the arguments
/// as `blob:NAME=ADDRESS+SIZE`), read-only; `None` if there is none by that name.
pub fn blob(name: &str) -> Option<&'static [u8]> {
    let value = arguments().split_whitespace().find_map(|w| {
        w.strip_prefix("blob:")?
            .strip_prefix(name)?
            .strip_prefix('=')
    })?;
    let (address, size) = value.split_once('+')?;
    let (address, size) = (address.parse::<u64>().ok()?, size.parse::<usize>().ok()?);
    // SAFETY: the root task mapped `size` bytes at `address` read-only before we started and
    // never unmaps them (only the task itself may, through `release_blob`).
    Some(unsafe { core::slice::from_raw_parts(address as *const u8, size) })
}

/// Give back the pages of data module `name` (see [`blob`]) once the task is done with it,
/// and with them the kernel memory its mapping takes (a node per page). Returns whether there
/// was such a blob.
///
/// # Safety
/// Nothing may use the blob's bytes afterwards (they fault): no slice [`blob`] returned for
/// `name` may be read again.
pub unsafe fn release_blob(name: &str) -> bool {
    let Some(bytes) = blob(name) else {
        return false;
    };
    let mut address = bytes.as_ptr() as u64 & !0xfff;
    let end = (bytes.as_ptr() as u64 + bytes.len() as u64).next_multiple_of(0x1000);
    while address < end {
        // The largest aligned power of two from here that stays inside the blob's pages.
        let mut order = address.trailing_zeros().min(63);
        while order > 12 && address + (1u64 << order) > end {
            order -= 1;
        }
        // SAFETY: the caller promises the blob's pages are not used any more; the range lies
        // inside them (the module is page aligned: the root task maps it from a page on).
        let _ = unsafe {
            crate::sys::unmap(
                l4_abi::Fpage::memory(address, order, l4_abi::Fpage::RWX),
                l4_abi::UnmapFlags::SELF,
            )
        };
        address += 1 << order;
    }
    true
}

extern "Rust" {
    fn l4_task_main() -> i64;
}

core::arch::global_asm!(
    r#"
.section .text.start
.global _start
_start:
    and rsp, -16
    call l4_runtime_start
    ud2
"#
);

#[no_mangle]
extern "C" fn l4_runtime_start() -> ! {
    // SAFETY: provided by the task through `l4::main!`.
    let code = unsafe { l4_task_main() };
    exit(code)
}

/// Tell the parent (slot [`slots::PARENT`], if present) that the task exits with `code`, then
/// end this thread.
pub fn exit(code: i64) -> ! {
    let tag = MessageTag::new(LABEL_EXIT, 1, 0);
    // SAFETY: this thread never returns to a frame that borrowed its UTCB (a panic inside
    // `with_utcb` ends up here with the borrow still marked).
    unsafe { crate::utcb::end_borrows() };
    // The parent destroys the task on receipt; if there is none, just end the thread.
    let _ = ipc::call(
        slots::PARENT,
        tag,
        &[code as u64],
        Timeouts::new(Timeout::INFINITE, Timeout::INFINITE),
    );
    sys::thread_exit(code as u64)
}

struct Line {
    buffer: [u8; 256],
    length: usize,
}

impl Line {
    fn flush(&mut self) {
        let _ = sys::debug_write(&self.buffer[..self.length]);
        self.length = 0;
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.length == self.buffer.len() {
                self.flush();
            }
            self.buffer[self.length] = b;
            self.length += 1;
        }
        Ok(())
    }
}

/// Print formatted text to the kernel console (one syscall per 256 bytes).
pub fn print(args: core::fmt::Arguments) {
    let mut line = Line {
        buffer: [0; 256],
        length: 0,
    };
    let _ = line.write_fmt(args);
    line.flush();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    print(format_args!("panic: {info}\n"));
    exit(101)
}

/// Fault in every page of this task's own image (code, read-only data, data, bss): for tests
/// that compare quotas (ktest before its first case, the fuzzer before its first batch), an image
/// page faulted in lazily between two readings would charge its page-table entries to the
/// quota compared (the image's layout decides which reading it hits).
pub fn fault_in_image() {
    extern "C" {
        // The default linker script's start of the image: the ELF header (our first
        // loadable segment starts at the file's beginning).
        static __executable_start: u8;
    }
    let header = (&raw const __executable_start).cast::<u8>();
    // A little-endian field of the ELF header or a program header.
    let word = |offset: usize, bytes: usize| -> u64 {
        (0..bytes).fold(0, |value, i| {
            // SAFETY: the ELF header and program headers lie in our first loadable segment.
            let byte = unsafe { core::ptr::read_volatile(header.add(offset + i)) };
            value | (byte as u64) << (8 * i)
        })
    };
    let (phoff, phentsize, phnum) = (word(32, 8) as usize, word(54, 2) as usize, word(56, 2));
    const PT_LOAD: u64 = 1;
    const PAGE: u64 = l4_abi::PAGE_SIZE;
    for i in 0..phnum as usize {
        let at = phoff + i * phentsize;
        if word(at, 4) != PT_LOAD {
            continue;
        }
        let (start, size) = (word(at + 16, 8), word(at + 40, 8));
        for page in (start & !(PAGE - 1)..start + size).step_by(PAGE as usize) {
            // SAFETY: a byte of one of our loaded segments (mapped on demand by our pager);
            // reading it has no effect.
            unsafe { core::ptr::read_volatile(page.max(start) as *const u8) };
        }
    }
}
