//! The bare-metal guest suite: the test guest (a data module) on the VMM library's exit loop
//! with a port bus, an MMIO device and lazy guest memory on guest-physical faults
//! ([`test_guest`]; its VM's pager thread is here); then the
//! checks that need their own guests and call `VcpuRun` directly, since they test the
//! kernel rather than the VMM ([`cases`]): a 32-bit guest with paging off, a triple fault,
//! state the kernel must refuse, random code and state, memory rights, VcpuRun's deadline
//! and message (recall) exits, and a second VM at the same time (isolation).
//!
//! Every guest case becomes a line `ok N - guest: case` (or `not ok`); the task exits with the
//! number of failures.

use alloc::boxed::Box;
use alloc::rc::Rc;
use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use l4::abi::vcpu::{self as state, exit, Groups};
use l4::abi::{slots, Error, Fpage, ObjectKind, PAGE_SIZE};
use l4::thread::alloc_slot;
use l4::{println, sys};
use l4linux_glue::exits::{self, IoExit};
use l4linux_glue::mmio::{MmioBus, Scratch};
use l4linux_glue::ports::PortBus;
use l4linux_glue::test_device::{self, TestDevice};
use vmm::exit::{emulate_cpuid, emulate_mmio, port_io, Handler, Next, Words};
use vmm::memory::{create_vm, fetch_instruction, identity_tables, Ram, Vm};
use vmm::vcpu::INJECT_GP0;

mod cases;
mod test_guest;

use cases::{second_vm, SECOND_DONE};
use test_guest::run_test_guest;
use vmm::vcpu::{long_mode_state, protected_mode_state};

/// Run `f` on the guest state words (the UTCB's message registers).
fn utcb_words<T>(f: impl FnOnce(&mut [u64; 64]) -> T) -> T {
    l4::utcb::with_utcb(|u| f(&mut u.mr))
}

/// Run `vcpu` (see [`vmm::vcpu::run`]) on the state words in the UTCB.
fn run(vcpu: u64, mask: Groups, deadline: u64) -> Result<u64, Error> {
    l4::utcb::with_utcb(|u| vmm::vcpu::run(u, vcpu, mask, deadline))
}

/// Guest RAM mapped up front: 8 MiB at guest-physical 0.
const RAM_SIZE: u64 = 8 << 20;
/// Guest RAM mapped on first touch: 8..12 MiB.
const LAZY: core::ops::Range<u64> = 0x80_0000..0xc0_0000;
/// The MMIO scratch device.
const MMIO: core::ops::Range<u64> = 0xd000_0000..0xd000_1000;
/// The VMM's test MSR.
const TEST_MSR: u64 = 0x4b56_4d10;

static NEXT: AtomicU64 = AtomicU64::new(1);
/// 1 when started with the argument `bench`: the guest runs its benchmarks.
static BENCH_MODE: AtomicU64 = AtomicU64::new(0);
/// The backing page of each lazy guest page (0: none yet).
static LAZY_PAGES: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];
/// Guest page faults the VM's pager resolved.
static LAZY_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Guest page faults the VM's pager handed back to the VMM (MMIO and the like).
static HANDED_BACK: AtomicU64 = AtomicU64::new(0);

/// The VM's pager: maps fresh pages for the lazy RAM range, hands everything else back to
/// the VMM for emulation.
extern "C" fn vm_pager(_: u64) -> ! {
    use l4::abi::{MapItem, MessageTag, Timeouts, LABEL_GUEST_PAGE_FAULT};
    let mut message = l4::ipc::wait(Timeouts::INFINITE);
    loop {
        let Ok(m) = message else {
            message = l4::ipc::wait(Timeouts::INFINITE);
            continue;
        };
        if m.tag.label() != LABEL_GUEST_PAGE_FAULT {
            message = l4::ipc::wait(Timeouts::INFINITE);
            continue;
        }
        let gpa = m.word(0);
        message = if LAZY.contains(&gpa) {
            LAZY_FAULTS.fetch_add(1, SeqCst);
            // The same backing page every time for a guest page (it may have been revoked).
            let slot = &LAZY_PAGES[((gpa - LAZY.start) / PAGE_SIZE) as usize];
            let page = match slot.load(SeqCst) {
                0 => {
                    let page = l4::child::fresh_page();
                    slot.store(page, SeqCst);
                    page
                }
                page => page,
            };
            let item = MapItem::map(gpa & !(PAGE_SIZE - 1), Fpage::memory(page, 12, Fpage::RWX));
            l4::ipc::reply_wait(
                MessageTag::new(0, 0, 1),
                &[item.control, item.fpage.0],
                Timeouts::INFINITE,
            )
        } else {
            HANDED_BACK.fetch_add(1, SeqCst);
            l4::ipc::reply_wait(MessageTag::new(1, 0, 0), &[], Timeouts::INFINITE)
        };
    }
}
static FAILED: AtomicU64 = AtomicU64::new(0);

fn report(ok: bool, case: &str) {
    let n = NEXT.fetch_add(1, SeqCst);
    if !ok {
        FAILED.fetch_add(1, SeqCst);
    }
    println!("{}ok {n} - guest: {case}", if ok { "" } else { "not " });
}

/// Load the guest ELF into RAM (guest-physical = link address) and build identity page tables
/// for the first 4 GiB (2 MiB pages) at 0x1000..0x7000. Returns the entry point.
fn load_guest(ram: &Ram, image: &[u8]) -> Result<u64, l4_elf::ElfError> {
    let parsed = l4_elf::parse(
        image,
        l4_elf::Limits {
            min_vaddr: 0x10_0000,
            user_limit: RAM_SIZE,
        },
    )?;
    for segment in parsed.segments() {
        let file = &image
            [segment.file_offset as usize..(segment.file_offset + segment.file_size) as usize];
        ram.write(segment.vaddr, file);
    }
    identity_tables(ram);
    Ok(parsed.entry)
}

/// The 32-bit guests built into the guest image (sections `.guest32`: stores 0x12345678 at
/// guest-physical 0x9000 and writes the exit port; `.guest32_sse`: puts 0xdeadbeef into xmm0;
/// `.guest32_peek`: stores DR0-DR3, CR2 and the syscall MSRs it finds, then sets its own).
static GUEST32: spin_once::Once = spin_once::Once::new();
static GUEST32_SSE: spin_once::Once = spin_once::Once::new();
static GUEST32_PEEK: spin_once::Once = spin_once::Once::new();

mod spin_once {
    //! A write-once byte buffer (set at start-up by the one main thread).
    use alloc::vec::Vec;
    use core::cell::UnsafeCell;

    /// The buffer.
    pub struct Once(UnsafeCell<Option<Vec<u8>>>);
    // SAFETY: written once by the main thread before any other thread starts, read after.
    unsafe impl Sync for Once {}

    impl Once {
        /// Empty.
        pub const fn new() -> Self {
            Once(UnsafeCell::new(None))
        }
        /// Set the contents (start-up only).
        pub fn set(&self, bytes: Vec<u8>) {
            // SAFETY: see the Sync impl.
            unsafe { *self.0.get() = Some(bytes) };
        }
        /// The contents (empty if unset).
        pub fn get(&self) -> &[u8] {
            // SAFETY: see the Sync impl.
            unsafe { (*self.0.get()).as_deref().unwrap_or(&[]) }
        }
    }
}

/// Copy the named section of the guest ELF image.
fn section(image: &[u8], name: &str) -> Option<alloc::vec::Vec<u8>> {
    // xmas-elf wants 8-byte aligned input.
    let mut aligned = alloc::vec![0u64; image.len().div_ceil(8)];
    // SAFETY: plain byte copy into a buffer at least as large.
    unsafe {
        core::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len())
    };
    // SAFETY: viewing the u64 buffer as the bytes just copied.
    let bytes = unsafe { core::slice::from_raw_parts(aligned.as_ptr() as *const u8, image.len()) };
    let elf = xmas_elf::ElfFile::new(bytes).ok()?;
    let found = elf.section_iter().find(|s| s.get_name(&elf) == Ok(name))?;
    match found.get_data(&elf).ok()? {
        xmas_elf::sections::SectionData::Undefined(data) => Some(data.to_vec()),
        _ => None,
    }
}

fn error_code(r: Result<(), Error>) -> u64 {
    match r {
        Ok(()) => 0,
        Err(e) => e as u64,
    }
}

/// Run the suite; returns the number of failed checks.
pub fn run_suite() -> i64 {
    let Some(image) = l4::rt::blob("guest") else {
        println!("[vmm] no guest image (module option blob=guest)");
        return 1;
    };
    let pager = l4::thread::spawn(
        vm_pager,
        0,
        l4::thread::Spawn {
            stack_size: 32 * 1024,
            ..Default::default()
        },
    )
    .expect("VM pager thread");
    let vm = match create_vm(RAM_SIZE, pager) {
        Ok(vm) => vm,
        Err(e) => {
            println!("[vmm] cannot create a VM: {e}");
            return 1;
        }
    };
    let entry = match load_guest(&vm.ram, image) {
        Ok(entry) => entry,
        Err(e) => {
            println!("[vmm] guest image rejected: {e}");
            return 1;
        }
    };
    println!(
        "[vmm] VM created, {} MiB guest RAM, guest entry {entry:#x}",
        RAM_SIZE >> 20
    );
    match (
        section(image, ".guest32"),
        section(image, ".guest32_sse"),
        section(image, ".guest32_peek"),
    ) {
        (Some(plain), Some(sse), Some(peek)) => {
            GUEST32.set(plain);
            GUEST32_SSE.set(sse);
            GUEST32_PEEK.set(peek);
        }
        _ => println!("[vmm] the guest image has no 32-bit guests"),
    }
    if l4::rt::arguments().split_whitespace().any(|w| w == "bench") {
        BENCH_MODE.store(1, SeqCst);
        let result = run_test_guest(&vm, entry);
        println!("[vmm] benchmarks done: {result:?}");
        return if result == Ok(0) { 0 } else { 1 };
    }
    let second = l4::thread::spawn(
        second_vm,
        0,
        l4::thread::Spawn {
            stack_size: 32 * 1024,
            ..Default::default()
        },
    );
    match run_test_guest(&vm, entry) {
        Ok(failed) => report(failed == 0, "test guest finished without failures"),
        Err(reason) => report(false, reason),
    }
    report(
        LAZY_FAULTS.load(SeqCst) >= 4,
        "guest page faults arrive as IPC at the VM's pager and its mappings resolve them",
    );
    report(
        HANDED_BACK.load(SeqCst) >= 6,
        "the VM's pager hands MMIO faults back to the VMM for emulation",
    );
    report(
        sys::factory_create(
            slots::FACTORY,
            ObjectKind::Vm,
            alloc_slot(),
            slots::SELF_TASK,
            0,
        ) == Err(Error::WrongType),
        "a VM pager must be a thread or gate",
    );

    cases::direct_cases(&vm);

    // The second VM ran on its own thread at the same time.
    for _ in 0..10_000 {
        if SECOND_DONE.load(SeqCst) != 0 {
            break;
        }
        sys::thread_yield();
    }
    report(
        second.is_ok() && SECOND_DONE.load(SeqCst) == 1,
        "a second VM runs at the same time on another thread",
    );
    report(
        sys::quota_check(slots::FACTORY, true).is_ok_and(|(_, mismatches)| mismatches == 0),
        "the kernel's books balance after the guest suite (QuotaCheck)",
    );
    let failed = FAILED.load(SeqCst);
    println!(
        "[vmm] {} guest checks, {failed} failed",
        NEXT.load(SeqCst) - 1
    );
    failed as i64
}
