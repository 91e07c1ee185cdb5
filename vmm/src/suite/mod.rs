//! The bare-metal guest suite: the test guest (a data module) on the VMM library's exit loop
//! with a port bus, an MMIO device and lazy guest memory on guest-physical faults; then the
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
use l4::abi::vcpu::{self as state, exit};
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
use vmm::vcpu::{long_mode_state, protected_mode_state, run, state_words as utcb_words};

/// Where the root task maps our guest image (module option `blob=NAME`).
const BLOB_ADDRESS: u64 = 0x0000_0900_0000_0000;
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

/// What the test guest's exit handlers end with: the guest's exit-port value, or why it
/// stopped early.
type TestOutcome = Result<u32, &'static str>;

/// The test guest as the exit loop sees it: the test device on the ports and a scratch device
/// on the MMIO bus, the VMM's test MSR, lazy guest RAM, and the hypercalls of the test cases.
struct TestGuest<'a> {
    vm: &'a Vm,
    device: Rc<RefCell<TestDevice>>,
    bus: PortBus,
    mmio: MmioBus,
    test_msr: u64,
    lazy_faults: u32,
    outside_reported: bool,
}

/// A handler's result as the exit loop wants it.
fn resume(result: Result<u64, &'static str>) -> Next<TestOutcome> {
    match result {
        Ok(mask) => Next::Resume(mask),
        Err(why) => Next::Stop(Err(why)),
    }
}

/// The exit loop of the test guest. Returns when the guest writes the exit port or stops
/// with an unexpected exit.
fn run_test_guest(vm: &Vm, entry: u64) -> TestOutcome {
    let device = Rc::new(RefCell::new(TestDevice::new()));
    let mut bus = PortBus::new();
    bus.register(
        test_device::BASE_PORT,
        test_device::LENGTH,
        Box::new(device.clone()),
    )
    .map_err(|_| "port bus")?;
    let mut mmio = MmioBus::new();
    mmio.register(
        MMIO.start,
        MMIO.end - MMIO.start,
        Box::new(Scratch::default()),
    )
    .map_err(|_| "MMIO bus")?;
    long_mode_state(utcb_words(), entry);
    let mut guest = TestGuest {
        vm,
        device,
        bus,
        mmio,
        test_msr: 0,
        lazy_faults: 0,
        outside_reported: false,
    };
    vmm::exit::run(vm.vcpu, &mut guest)
}

impl TestGuest<'_> {
    /// IN/OUT, and INS/OUTS with identity-mapped guest memory (the test guest's).
    fn io(&mut self, w: &mut Words) -> Result<u64, &'static str> {
        let Some(io) = IoExit::decode(w[state::EXIT_INFO1]) else {
            return Err("bad I/O exit");
        };
        if io.string {
            let count = if io.rep { w[state::RCX] } else { 1 };
            for _ in 0..count {
                let (index, address) = if io.input {
                    (state::RDI, w[state::RDI])
                } else {
                    (state::RSI, w[state::RSI])
                };
                let mut bytes = [0u8; 4];
                if io.input {
                    let value = self.bus.read(io.port, io.size);
                    bytes[..io.size as usize]
                        .copy_from_slice(&value.to_le_bytes()[..io.size as usize]);
                    self.vm.ram.write(address, &bytes[..io.size as usize]);
                } else {
                    if !self
                        .vm
                        .ram
                        .read_bytes(address, &mut bytes[..io.size as usize])
                    {
                        return Err("string I/O outside RAM");
                    }
                    self.bus.write(io.port, io.size, u32::from_le_bytes(bytes));
                }
                w[index] = address + io.size as u64;
            }
            if io.rep {
                w[state::RCX] = 0;
            }
        } else {
            port_io(&mut self.bus, &io, w);
        }
        w[state::RIP] = w[state::EXIT_INFO2];
        Ok(state::GPRS)
    }

    /// Lazy guest RAM (mapped here, for a VM without a pager thread's help) or MMIO.
    fn fault(&mut self, w: &mut Words) -> Result<u64, &'static str> {
        let gpa = w[state::EXIT_INFO2];
        if LAZY.contains(&gpa) {
            let page = l4::child::fresh_page();
            sys::map(
                self.vm.vm,
                Fpage::memory(page, 12, Fpage::RWX),
                gpa & !(PAGE_SIZE - 1),
                0,
            )
            .map_err(|_| "lazy map")?;
            self.lazy_faults += 1;
            self.device.borrow_mut().status = self.lazy_faults;
            return Ok(state::GPRS);
        }
        let instruction =
            fetch_instruction(self.vm, w).ok_or("cannot fetch the faulting instruction")?;
        let decoded = l4linux_glue::decode::decode_mmio(&instruction)
            .map_err(|_| "undecodable MMIO instruction")?;
        if self.mmio.claims(gpa) {
            emulate_mmio(&mut self.mmio, gpa, decoded.access, w);
        } else {
            println!(
                "[vmm] guest touched guest-physical {gpa:#x} outside RAM and devices; skipped"
            );
            self.device.borrow_mut().status = gpa as u32;
            self.outside_reported = true;
        }
        w[state::RIP] += decoded.length as u64;
        Ok(state::GPRS)
    }
}

impl Handler for TestGuest<'_> {
    type Outcome = TestOutcome;

    /// The guest's TAP lines become ours; its exit-port write ends it.
    fn after_run(&mut self, _w: &mut Words) -> Option<TestOutcome> {
        for line in self.device.borrow_mut().take_lines() {
            if line.starts_with("bench: ") {
                println!("{line}");
                continue;
            }
            let (ok, case) = match line.strip_prefix("ok - ") {
                Some(case) => (true, case),
                None => (false, line.strip_prefix("not ok - ").unwrap_or(&line)),
            };
            report(ok, case);
        }
        if let Some(code) = self.device.borrow().exit {
            return Some(Ok(code));
        }
        if !self.outside_reported {
            self.device.borrow_mut().status = LAZY_FAULTS.load(SeqCst) as u32 + self.lazy_faults;
        }
        None
    }

    fn refused(&mut self, _error: Error, _mask: u64, _w: &mut Words) -> TestOutcome {
        Err("VcpuRun failed")
    }

    fn port_io(&mut self, w: &mut Words) -> Next<TestOutcome> {
        resume(self.io(w))
    }

    fn cpuid(&mut self, w: &mut Words) -> Next<TestOutcome> {
        emulate_cpuid(w, |leaf| {
            // Our private leaf: run the benchmarks instead of the tests?
            (leaf == 0x4000_0002).then(|| [BENCH_MODE.load(SeqCst) as u32, 0, 0, 0])
        });
        Next::Resume(state::GPRS)
    }

    fn msr(&mut self, w: &mut Words) -> Next<TestOutcome> {
        let msr = w[state::RCX] & 0xffff_ffff;
        if msr != TEST_MSR {
            // #GP(0) into the guest; the instruction does not complete.
            w[state::EVENT_INJECT] = INJECT_GP0;
            return Next::Resume(state::GPRS | state::EVENTS);
        }
        if w[state::EXIT_INFO1] == 0 {
            w[state::RAX] = self.test_msr & 0xffff_ffff;
            w[state::RDX] = self.test_msr >> 32;
        } else {
            self.test_msr = (w[state::RDX] << 32) | (w[state::RAX] & 0xffff_ffff);
        }
        w[state::RIP] += exits::MSR_LENGTH;
        Next::Resume(state::GPRS)
    }

    fn hypercall(&mut self, w: &mut Words) -> Next<TestOutcome> {
        let mut mask = state::GPRS;
        w[state::RAX] = match w[state::RAX] {
            1 => w[state::RBX].wrapping_add(w[state::RCX]),
            2 => {
                w[state::VIRTUAL_IRQ] = (1 << 63) | (w[state::RBX] & 0xff);
                w[state::EVENT_INJECT] = 0;
                mask |= state::EVENTS;
                0
            }
            3 => {
                // NMI.
                w[state::EVENT_INJECT] = state::event::nmi();
                mask |= state::EVENTS;
                0
            }
            7 => {
                // Run another VM that sets its own xmm0, then come back.
                let saved = *w;
                let other = sse_vm(w);
                *w = saved;
                other
            }
            8 => {
                // Run another VM that reports what it finds in DR0-DR3, CR2 and the
                // syscall MSRs (and sets its own), then come back.
                let saved = *w;
                let seen = peek_vm(w);
                *w = saved;
                seen
            }
            5 => {
                // Revoke the guest page at rbx from the VM (our copy stays).
                let gpa = w[state::RBX];
                let page = LAZY
                    .contains(&gpa)
                    .then(|| LAZY_PAGES[((gpa - LAZY.start) / PAGE_SIZE) as usize].load(SeqCst));
                match page {
                    Some(page) if page != 0 => {
                        // SAFETY: revokes only the mapping derived from ours.
                        error_code(unsafe { sys::unmap(Fpage::memory(page, 12, 7), 0) })
                    }
                    _ => u64::MAX,
                }
            }
            6 => {
                // Inject external interrupt vector rbx.
                w[state::EVENT_INJECT] = state::event::interrupt(w[state::RBX] as u8);
                mask |= state::EVENTS;
                0
            }
            4 => {
                // #TS with the error code the guest asked for.
                w[state::EVENT_INJECT] =
                    state::event::exception_with_code(10, w[state::RBX] as u32);
                mask |= state::EVENTS;
                0
            }
            _ => u64::MAX,
        };
        w[state::RIP] += exits::VMMCALL_LENGTH;
        Next::Resume(mask)
    }

    /// A timer tick for the halted guest: a virtual interrupt, taken when it can.
    fn halt(&mut self, w: &mut Words) -> Next<TestOutcome> {
        w[state::RIP] += exits::HLT_LENGTH;
        w[state::VIRTUAL_IRQ] = (1 << 63) | 0x30;
        w[state::EVENT_INJECT] = 0;
        w[state::INTERRUPT_SHADOW] = 0;
        Next::Resume(state::GPRS | state::EVENTS)
    }

    fn nested_page_fault(&mut self, w: &mut Words) -> Next<TestOutcome> {
        resume(self.fault(w))
    }

    fn unhandled(&mut self, code: u64, w: &mut Words) -> Next<TestOutcome> {
        println!(
            "[vmm] unexpected exit {code:#x} at rip {:#x}",
            w[state::RIP]
        );
        Next::Stop(Err("unexpected exit"))
    }
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

/// Run a fresh VM whose guest writes xmm0, with the state words `w` (the UTCB's: the caller
/// saves and restores its own guest's); 0 if it ran to its exit.
fn sse_vm(w: &mut Words) -> u64 {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        return 1;
    };
    vm.ram.write(0x7000, GUEST32_SSE.get());
    protected_mode_state(w, 0x7000);
    w[state::CR4] = 0x600;
    match run(vm.vcpu, state::ALL, 0) {
        Ok(exit::IOIO) => 0,
        _ => 2,
    }
}

/// Run a fresh VM whose guest reports the DR0-DR3, CR2 and syscall-MSR values it finds (and
/// then writes its own). Returns a bit per non-zero value (0-3: DR0-DR3, 4: CR2, 8-15: the
/// MSRs), or all ones if it did not run to its exit. `w` as for [`sse_vm`].
fn peek_vm(w: &mut Words) -> u64 {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        return u64::MAX;
    };
    vm.ram.write(0x7000, GUEST32_PEEK.get());
    protected_mode_state(w, 0x7000);
    if run(vm.vcpu, state::ALL, 0) != Ok(exit::IOIO) {
        return u64::MAX;
    }
    let dword = |gpa| vm.ram.read_u64(gpa).map_or(u64::MAX, |v| v & 0xffff_ffff);
    let mut seen = 0;
    for (bit, gpa) in [0x9000, 0x9004, 0x9008, 0x900c, 0x9010]
        .into_iter()
        .enumerate()
    {
        if dword(gpa) != 0 {
            seen |= 1 << bit;
        }
    }
    for i in 0..8 {
        if vm.ram.read_u64(0x9020 + 8 * i) != Some(0) {
            seen |= 1 << (8 + i);
        }
    }
    seen
}

/// Run the 32-bit guest in `vm` to its exit port write; true if it got there.
fn run_guest32(vm: &Vm) -> bool {
    vm.ram.write(0x7000, GUEST32.get());
    protected_mode_state(utcb_words(), 0x7000);
    let mut mask = state::ALL;
    for _ in 0..8 {
        match run(vm.vcpu, mask, 0) {
            Ok(exit::IOIO) => {
                let w = utcb_words();
                if IoExit::decode(w[state::EXIT_INFO1]).is_some_and(|io| io.port == 0xe4) {
                    return true;
                }
                w[state::RIP] = w[state::EXIT_INFO2];
                mask = state::GPRS;
            }
            _ => return false,
        }
    }
    false
}

/// Guest-physical page the rights cases map with fewer rights (and the kernel-area pages after
/// it).
const RIGHTS_PAGE: u64 = 0x20_0000;

/// Run `code` at 0x7000 of `vm` (32-bit, paging off); the exit and its (info1, info2).
fn run_code(vm: &Vm, code: &[u8]) -> (Result<u64, Error>, u64, u64) {
    vm.ram.write(0x7000, code);
    protected_mode_state(utcb_words(), 0x7000);
    let result = run(vm.vcpu, state::ALL, 0);
    let w = utcb_words();
    (result, w[state::EXIT_INFO1], w[state::EXIT_INFO2])
}

/// Guest NX, rights that only shrink, and the kernel area: pages mapped into a VM with fewer
/// rights than the guest uses fault as nested page faults (exits to us: the VM has no pager).
fn rights_cases() {
    const NPF_PRESENT: u64 = 1;
    const NPF_WRITE: u64 = 2;
    const NPF_FETCH: u64 = 1 << 4;
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..5 {
            report(false, "rights cases: no VM");
        }
        return;
    };
    // mov eax, RIGHTS_PAGE; jmp eax — and there: out 0xe4, al.
    let jump = [0xb8, 0x00, 0x00, 0x20, 0x00, 0xff, 0xe0];
    // A page we hold with all rights (guest RAM from our parent; our heap is not executable).
    let code = vm.ram.base + 0x8_0000;
    vm.ram.write(0x8_0000, &[0xe6, 0xe4]);
    let no_execute = sys::map(
        vm.vm,
        Fpage::memory(code, 12, Fpage::READ | Fpage::WRITE),
        RIGHTS_PAGE,
        0,
    );
    let (exit, info1, gpa) = run_code(&vm, &jump);
    report(
        no_execute.is_ok()
            && exit == Ok(exit::NPF)
            && info1 & (NPF_PRESENT | NPF_FETCH) == NPF_PRESENT | NPF_FETCH
            && gpa == RIGHTS_PAGE,
        "memory mapped into a VM without EXECUTE is not executable: instruction fetch is a nested page fault",
    );
    let executable = sys::map(vm.vm, Fpage::memory(code, 12, Fpage::RWX), RIGHTS_PAGE, 0);
    let (exit, info1, _) = run_code(&vm, &jump);
    let port = IoExit::decode(info1).map(|io| io.port);
    report(
        executable.is_ok() && exit == Ok(exit::IOIO) && port == Some(0xe4),
        "the same page mapped with EXECUTE runs",
    );
    // The guest image is mapped read-only into us: mapped with all rights into the VM, it is
    // still read-only there. mov [RIGHTS_PAGE + 0x1000], eax; out 0xe4, al.
    let read_only = sys::map(
        vm.vm,
        Fpage::memory(BLOB_ADDRESS, 12, Fpage::RWX),
        RIGHTS_PAGE + 0x1000,
        0,
    );
    let (exit, info1, gpa) = run_code(&vm, &[0xa3, 0x00, 0x10, 0x20, 0x00, 0xe6, 0xe4]);
    report(
        read_only.is_ok()
            && exit == Ok(exit::NPF)
            && info1 & (NPF_PRESENT | NPF_WRITE) == NPF_PRESENT | NPF_WRITE
            && gpa == RIGHTS_PAGE + 0x1000,
        "rights only shrink: a page we hold read-only is read-only for the guest too",
    );
    // The KIP and our UTCB: Map succeeds and maps nothing; the guest faults there (not present).
    for (address, offset, what) in [
        (
            l4::abi::KIP_ADDRESS,
            0x2000u64,
            "the KIP cannot be mapped into a VM: the guest faults there",
        ),
        (
            l4::utcb::utcb() as *const _ as u64,
            0x3000,
            "a UTCB cannot be mapped into a VM: the guest faults there",
        ),
    ] {
        let gpa = RIGHTS_PAGE + offset;
        let mapped = sys::map(vm.vm, Fpage::memory(address, 12, Fpage::RWX), gpa, 0);
        // mov eax, [gpa]; out 0xe4, al.
        let load = [0xa1, 0x00, (offset >> 8) as u8, 0x20, 0x00, 0xe6, 0xe4];
        let (exit, info1, fault) = run_code(&vm, &load);
        report(
            mapped.is_ok() && exit == Ok(exit::NPF) && info1 & NPF_PRESENT == 0 && fault == gpa,
            what,
        );
    }
}

/// The TSC (shared with the guests: their TSC offset is 0).
fn tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (high as u64) << 32 | low as u64
}

/// TSC cycles per millisecond, measured against a 10 ms IPC timeout (at least that long, so
/// this errs on the high side).
fn tsc_per_ms() -> u64 {
    let start = tsc();
    let _ = ipc_sleep(10_000);
    ((tsc() - start) / 10).max(1)
}

/// The label of the message [`message_sender`] sends.
const RECALL_LABEL: i32 = 0x77;
/// The software IRQ line of the recall cases.
const RECALL_LINE: u64 = 48;
/// The badge of its IRQ object.
const RECALL_BADGE: u64 = 0xb0b;
/// What the helper threads of the recall cases did (0: not yet; 1: done; 2: failed).
static RECALL_SENT: AtomicU64 = AtomicU64::new(0);

/// After 2 ms, send a message with words `[0x5eed, value]` to the first thread (which runs a
/// spinning guest meanwhile).
extern "C" fn message_sender(value: u64) -> ! {
    use l4::abi::{MessageTag, Timeout, Timeouts};
    let _ = ipc_sleep(2_000);
    let sent = l4::ipc::send(
        slots::SELF_THREAD,
        MessageTag::new(RECALL_LABEL, 2, 0),
        &[0x5eed, value],
        Timeouts::new(Timeout::micros(5_000_000), Timeout::INFINITE),
    );
    RECALL_SENT.store(if sent.is_ok() { 1 } else { 2 }, SeqCst);
    sys::thread_exit(0)
}

/// After 2 ms, trigger the IRQ object in slot `irq` (attached to the first thread).
extern "C" fn irq_trigger(irq: u64) -> ! {
    let _ = ipc_sleep(2_000);
    let triggered = sys::irq_control(irq, l4::abi::IrqOp::Trigger, 0);
    RECALL_SENT.store(if triggered.is_ok() { 1 } else { 2 }, SeqCst);
    sys::thread_exit(0)
}

/// `1: inc ecx; jnz 1b; out 0xe4, al` at 0x7000: spins until ecx wraps (from 0x8000_0000 that
/// is seconds, far beyond any deadline here, yet no case can hang for ever).
const COUNTING_SPIN: [u8; 5] = [0x41, 0x75, 0xfd, 0xe6, 0xe4];
/// Where its `out` is.
const COUNTING_SPIN_OUT: u64 = 0x7003;

/// Load the counting spin into `vm` (32-bit, paging off), with ecx at 0x8000_0000 and a
/// marker in ebx.
fn counting_spin_state(vm: &Vm) {
    vm.ram.write(0x7000, &COUNTING_SPIN);
    let w = utcb_words();
    protected_mode_state(w, 0x7000);
    w[state::RCX] = 0x8000_0000;
    w[state::RBX] = 0x9abc_def0;
}

/// Whether the UTCB shows the counting spin stopped in its loop with its registers intact,
/// at exit `code` of the kernel's own (no EXITINFO).
fn stopped_in_spin(code: u64) -> bool {
    let w = utcb_words();
    w[state::EXIT_CODE] == code
        && w[state::EXIT_INFO1] == 0
        && w[state::EXIT_INFO2] == 0
        && (0x7000..COUNTING_SPIN_OUT).contains(&w[state::RIP])
        && w[state::RBX] == 0x9abc_def0
        && w[state::RCX] & 0xffff_ffff > 0x8000_0000
}

/// Wait (bounded) for the helper thread of a recall case; true if it did its part.
fn helper_done() -> bool {
    for _ in 0..1000 {
        match RECALL_SENT.load(SeqCst) {
            0 => {
                let _ = ipc_sleep(1_000);
            }
            done => return done == 1,
        }
    }
    false
}

/// VcpuRun's own exits: the deadline (a TSC value) and messages waiting for the thread that
/// runs the vCPU (an IPC sender or an IRQ), each before any guest entry.
fn event_cases() {
    use l4::abi::{Timeout, Timeouts};
    const CASES: usize = 7;
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..CASES {
            report(false, "VcpuRun exits: no VM");
        }
        return;
    };
    let per_ms = tsc_per_ms();
    let short_wait = Timeouts::new(Timeout::INFINITE, Timeout::micros(100_000));

    // A deadline 5 ms ahead stops a spinning guest, not before it, with the state intact.
    counting_spin_state(&vm);
    let deadline = tsc() + 5 * per_ms;
    let first = run(vm.vcpu, state::ALL, deadline);
    let returned = tsc();
    let counted = utcb_words()[state::RCX] & 0xffff_ffff;
    println!(
        "[vmm] deadline exit {} us after the deadline",
        returned.saturating_sub(deadline) * 1000 / per_ms
    );
    report(
        first == Ok(exit::DEADLINE) && returned >= deadline && stopped_in_spin(exit::DEADLINE),
        "a deadline stops a spinning guest with exit DEADLINE, not before the deadline, state intact",
    );
    // A second run (loading nothing) continues where the guest stopped; without a deadline
    // the guest runs to its next real exit.
    let deadline = tsc() + 2 * per_ms;
    let again = run(vm.vcpu, 0, deadline);
    let returned = tsc();
    let continued =
        stopped_in_spin(exit::DEADLINE) && utcb_words()[state::RCX] & 0xffff_ffff > counted;
    utcb_words()[state::RIP] = COUNTING_SPIN_OUT;
    let to_out = run(vm.vcpu, state::GPRS, 0);
    let port = IoExit::decode(utcb_words()[state::EXIT_INFO1]).map(|io| io.port);
    report(
        again == Ok(exit::DEADLINE)
            && returned >= deadline
            && continued
            && to_out == Ok(exit::IOIO)
            && port == Some(0xe4),
        "the next run continues the guest to the next deadline; deadline 0 is none",
    );

    // A deadline already past: the exit comes before the guest runs (its `out` is not
    // executed) and the state loaded stays loaded.
    vm.ram.write(0x7000, &[0xe6, 0xe4]);
    protected_mode_state(utcb_words(), 0x7000);
    let past = run(vm.vcpu, state::ALL, 1);
    let unchanged = utcb_words()[state::RIP] == 0x7000;
    let then = run(vm.vcpu, 0, 0);
    report(
        past == Ok(exit::DEADLINE) && unchanged && then == Ok(exit::IOIO),
        "a deadline in the past returns DEADLINE without entering the guest",
    );

    // Another thread sends us a message while our guest spins: VcpuRun returns MESSAGE and a
    // receive takes the message.
    RECALL_SENT.store(0, SeqCst);
    counting_spin_state(&vm);
    let safety = tsc() + 2_000 * per_ms;
    let sender = l4::thread::spawn(message_sender, 0x1234, l4::thread::Spawn::default());
    let recalled = sender.is_ok() && run(vm.vcpu, state::ALL, safety) == Ok(exit::MESSAGE);
    let in_spin = stopped_in_spin(exit::MESSAGE);
    let message = l4::ipc::wait(short_wait);
    report(
        recalled
            && in_spin
            && matches!(&message, Ok(m) if m.tag.label() == RECALL_LABEL
                && m.word(0) == 0x5eed && m.word(1) == 0x1234)
            && helper_done(),
        "an IPC to the vCPU thread from another thread recalls the spinning guest (MESSAGE)",
    );

    // The same with an IRQ attached to us, triggered by another thread.
    RECALL_SENT.store(0, SeqCst);
    let irq = alloc_slot();
    let attached = sys::factory_create(
        slots::PLATFORM,
        ObjectKind::Irq,
        irq,
        RECALL_LINE,
        RECALL_BADGE,
    )
    .and_then(|()| sys::irq_control(irq, l4::abi::IrqOp::Attach, slots::SELF_THREAD));
    counting_spin_state(&vm);
    let safety = tsc() + 2_000 * per_ms;
    let trigger = l4::thread::spawn(irq_trigger, irq, l4::thread::Spawn::default());
    let recalled = attached.is_ok()
        && trigger.is_ok()
        && run(vm.vcpu, state::ALL, safety) == Ok(exit::MESSAGE);
    let in_spin = stopped_in_spin(exit::MESSAGE);
    let message = l4::ipc::wait(short_wait);
    let is_irq = |m: &Result<l4::ipc::Received, l4::ipc::IpcError>| {
        matches!(m, Ok(m) if m.tag.label() == l4::abi::LABEL_IRQ
            && m.badge == RECALL_BADGE && m.word(0) == RECALL_LINE)
    };
    report(
        recalled && in_spin && is_irq(&message) && helper_done(),
        "an IRQ attached to the vCPU thread, triggered by another thread, recalls the guest",
    );
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Acknowledge, 0);

    // A message already waiting (and a deadline past): MESSAGE first, before the guest runs;
    // once the message is taken, the deadline.
    let triggered = sys::irq_control(irq, l4::abi::IrqOp::Trigger, 0);
    vm.ram.write(0x7000, &[0xe6, 0xe4]);
    protected_mode_state(utcb_words(), 0x7000);
    let waiting = run(vm.vcpu, state::ALL, 1);
    let unchanged = utcb_words()[state::RIP] == 0x7000;
    let message = l4::ipc::wait(short_wait);
    let then = run(vm.vcpu, 0, 1);
    report(
        attached.is_ok()
            && triggered.is_ok()
            && waiting == Ok(exit::MESSAGE)
            && unchanged
            && is_irq(&message)
            && then == Ok(exit::DEADLINE),
        "a waiting message comes before the guest runs and before the deadline",
    );
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Acknowledge, 0);
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Detach, 0);
    let _ = sys::cap_delete(irq);

    // An event whose delivery an exit interrupted (an injected #UD reading an IDT nothing is
    // mapped at: a nested page fault) stays pending across a DEADLINE exit, reported in
    // EXITINTINFO, and the next run re-injects it (it faults again instead of running `out`).
    // Last: the vCPU keeps that event.
    const IDT: u64 = 0x20_0000;
    let w = utcb_words();
    protected_mode_state(w, 0x7000);
    w[state::IDTR] = 0x7ff;
    w[state::IDTR + 1] = IDT;
    w[state::EVENT_INJECT] = state::event::UD;
    let faulted = run(vm.vcpu, state::ALL, 0);
    let interrupted = utcb_words()[state::EXIT_INT_INFO];
    let stopped = run(vm.vcpu, 0, 1);
    let reported = utcb_words()[state::EXIT_INT_INFO];
    let again = run(vm.vcpu, 0, 0);
    let w = utcb_words();
    report(
        faulted == Ok(exit::NPF)
            && state::event::is_valid(interrupted)
            && interrupted & 0xff == 6
            && stopped == Ok(exit::DEADLINE)
            && reported == interrupted
            && again == Ok(exit::NPF)
            && w[state::EXIT_INT_INFO] == interrupted
            && w[state::EXIT_INFO2] & !0xfff == IDT,
        "an interrupted event stays pending across a DEADLINE exit and is re-injected",
    );
}

static SECOND_DONE: AtomicU64 = AtomicU64::new(0);
static SPINS_STARTED: AtomicU64 = AtomicU64::new(0);
static SPINNER_RETURNED: AtomicU64 = AtomicU64::new(0);

/// A VM whose guest spins forever (`jmp $`); its thread never returns from VcpuRun.
extern "C" fn spinning_vm(_: u64) -> ! {
    if let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) {
        vm.ram.write(0x7000, &[0xeb, 0xfe]);
        protected_mode_state(utcb_words(), 0x7000);
        SPINS_STARTED.store(1, SeqCst);
        let _ = run(vm.vcpu, state::ALL, 0);
        // The guest spins forever: VcpuRun must never return.
        SPINNER_RETURNED.store(1, SeqCst);
    }
    sys::thread_exit(0)
}

/// Block for `us` microseconds (a receive nobody answers).
fn ipc_sleep(us: u32) -> Result<(), l4::ipc::IpcError> {
    l4::ipc::wait(l4::abi::Timeouts::new(
        l4::abi::Timeout::INFINITE,
        l4::abi::Timeout::micros(us),
    ))
    .map(|_| ())
}

/// A second VM, run by a second thread while the first runs: its guest writes its own RAM.
extern "C" fn second_vm(_: u64) -> ! {
    let result = match create_vm(1 << 20, l4::abi::NO_CAP) {
        Ok(vm) => {
            let mut ok = true;
            for _ in 0..20 {
                ok &= run_guest32(&vm);
            }
            let value = vm.ram.read_u64(0x9000).unwrap_or(0) as u32;
            if ok && value == 0x1234_5678 {
                1
            } else {
                2
            }
        }
        Err(_) => 3,
    };
    SECOND_DONE.store(result, SeqCst);
    sys::thread_exit(0)
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

    // 32-bit protected mode with paging off: nested paging still applies.
    let vm32 = create_vm(1 << 20, l4::abi::NO_CAP).expect("second VM");
    let ran = run_guest32(&vm32);
    report(
        ran && vm32.ram.read_u64(0x9000).map(|v| v as u32) == Some(0x1234_5678),
        "32-bit protected mode, paging off, under nested paging",
    );
    report(
        vm.ram.read_u64(0x9000).map(|v| v as u32) != Some(0x1234_5678),
        "two VMs do not share guest memory",
    );

    // A triple fault (no IDT, then int3) ends in a SHUTDOWN exit to the VMM.
    vm32.ram.write(0x7000, &[0xcc]);
    protected_mode_state(utcb_words(), 0x7000);
    utcb_words()[state::IDTR] = 0;
    report(
        run(vm32.vcpu, state::ALL, 0) == Ok(exit::SHUTDOWN),
        "triple fault is a SHUTDOWN exit to the VMM",
    );

    // State the kernel must refuse: paging without protection, EFER.LMA without paging.
    let w = utcb_words();
    protected_mode_state(w, 0x7000);
    w[state::CR0] = 0x8000_0010;
    report(
        run(vm32.vcpu, state::ALL, 0) == Err(Error::InvalidArgument),
        "invalid guest state (CR0.PG without PE) refused",
    );
    protected_mode_state(w, 0x7000);
    w[state::EFER] = 0x400;
    report(
        run(vm32.vcpu, state::ALL, 0) == Err(Error::InvalidArgument),
        "invalid guest state (EFER.LMA without paging) refused",
    );
    w[state::EFER] = 0;
    w[state::EVENT_INJECT] = state::event::VALID | (7 << 8) | 3;
    report(
        run(vm32.vcpu, state::ALL, 0) == Err(Error::InvalidArgument),
        "invalid event type refused",
    );

    w[state::EVENT_INJECT] = 0;
    protected_mode_state(w, 0x7000);
    w[state::CR0] = 0x8000_0011;
    w[state::EFER] = 0x500;
    report(
        run(vm32.vcpu, state::ALL, 0) == Err(Error::InvalidArgument),
        "invalid guest state (long mode without PAE) refused",
    );
    protected_mode_state(w, 0x7000);
    w[state::CR4] = 1 << 13;
    report(
        run(vm32.vcpu, state::ALL, 0) == Err(Error::InvalidArgument),
        "invalid guest state (CR4.VMXE) refused",
    );

    // A guest that spins forever cannot lock up the machine: timer interrupts preempt it.
    let spinner = l4::thread::spawn(
        spinning_vm,
        0,
        l4::thread::Spawn {
            stack_size: 32 * 1024,
            ..Default::default()
        },
    );
    let mut seen = false;
    for _ in 0..200 {
        let _ = ipc_sleep(10_000);
        if SPINS_STARTED.load(SeqCst) != 0 {
            seen = true;
            break;
        }
    }
    // Our sleep can only end if the timer preempts the spinning guest's thread; the guest must
    // still be spinning afterwards (its VcpuRun has not returned).
    let slept = ipc_sleep(20_000);
    let timed_out = matches!(slept, Err(e) if e.error == Error::Timeout);
    report(
        spinner.is_ok() && seen && timed_out && SPINNER_RETURNED.load(SeqCst) == 0,
        "a spinning guest is preempted; the VMM keeps running",
    );

    // Hostile guests: random bytes as code, in 64-bit and 32-bit mode. Every exit is handled by
    // stopping that run; the kernel and this VMM must survive all of them.
    let fuzz = create_vm(1 << 20, l4::abi::NO_CAP).expect("fuzz VM");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Every run must end in an exit or a refusal of the state (InvalidArgument); some must
    // reach the guest.
    let (mut exits, mut refused, mut other) = (0u64, 0u64, 0u64);
    for round in 0..40u64 {
        let mut code = [0u8; 4096];
        for chunk in code.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        fuzz.ram.write(0x7000, &code);
        let w = utcb_words();
        if round % 2 == 0 {
            protected_mode_state(w, 0x7000);
        } else {
            // 64-bit mode needs page tables: identity-map the first 2 MiB of this 1 MiB VM.
            let tables: [u64; 3] = [0x2000 | 7, 0x3000 | 7, 0x87];
            for (i, entry) in tables.iter().enumerate() {
                fuzz.ram
                    .write(0x1000 * (i as u64 + 1), &entry.to_le_bytes());
            }
            long_mode_state(w, 0x7000);
            w[state::RSP] = 0x6_f000;
        }
        for _ in 0..20 {
            match run(fuzz.vcpu, state::ALL, 0) {
                Ok(exit::SHUTDOWN) => {
                    exits += 1;
                    break;
                }
                Err(Error::InvalidArgument) => {
                    refused += 1;
                    break;
                }
                Err(_) => {
                    other += 1;
                    break;
                }
                Ok(_) => {
                    exits += 1;
                    // Skip a byte and go on from the next state (all of it reloaded).
                    let w = utcb_words();
                    w[state::RIP] += 1;
                    w[state::EVENT_INJECT] = 0;
                }
            }
        }
    }
    // Afterwards a well-formed guest still runs to its HLT. (A new VM: the fuzzed vCPU may
    // still hold an event of its last run for re-injection.)
    let last = match create_vm(1 << 20, l4::abi::NO_CAP) {
        Ok(vm) => {
            vm.ram.write(0x7000, &[0xf4]);
            protected_mode_state(utcb_words(), 0x7000);
            run(vm.vcpu, state::ALL, 0)
        }
        Err(e) => Err(e),
    };
    let healthy = last == Ok(exit::HLT);
    println!(
        "[vmm] random-code guests: {exits} exits, {refused} refused states, {other} other errors; then a HLT guest: {last:?}"
    );
    report(
        exits > 0 && other == 0 && healthy,
        "40 guests of random code (32- and 64-bit) leave the kernel and the VMM running",
    );

    // Hostile vCPU state: random words for every register, control register, segment and
    // event, in a VM without memory (any instruction fetch exits). Each run must end in an
    // exit or an error; the kernel validates what the CPU might accept inconsistently.
    let bare = (|| -> Result<(u64, u64), Error> {
        let vm = alloc_slot();
        sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, l4::abi::NO_CAP, 0)?;
        let vcpu = alloc_slot();
        sys::factory_create(slots::FACTORY, ObjectKind::Vcpu, vcpu, vm, 0)?;
        Ok((vm, vcpu))
    })();
    let mut outcomes = [0u32; 3];
    if let Ok((_, vcpu)) = bare {
        for round in 0..300u64 {
            let w = utcb_words();
            for (i, word) in w.iter_mut().enumerate().take(state::STATE_WORDS) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Every other round keeps values small and plausible.
                *word = if round % 2 == 0 {
                    seed
                } else {
                    seed & (0xfff << (i % 4 * 8))
                };
            }
            if round % 2 == 1 {
                // Consistent control registers (real-ish, protected, paged or long mode) and a
                // valid event, with everything else random: these runs reach the CPU.
                let modes = [
                    (0x10, 0, 0),
                    (0x11, 0, 0),
                    (0x8000_0011, 0x20, 0),
                    (0x8000_0031, 0x20, 0x500),
                ];
                let (cr0, cr4, efer) = modes[(seed % 4) as usize];
                (w[state::CR0], w[state::CR4], w[state::EFER]) = (cr0, cr4, efer);
                w[state::EVENT_INJECT] = if seed & 0x100 != 0 {
                    state::event::exception((seed & 0x1f) as u8)
                } else {
                    0
                };
            }
            match run(vcpu, state::ALL, 0) {
                Ok(_) => outcomes[0] += 1,
                Err(Error::InvalidArgument) => outcomes[1] += 1,
                Err(_) => outcomes[2] += 1,
            }
        }
    }
    report(
        bare.is_ok() && outcomes[0] + outcomes[1] == 300 && outcomes[2] == 0,
        "300 random vCPU states are refused or run to an exit, never crash the kernel",
    );
    println!(
        "[vmm] random vCPU states: {} ran to an exit, {} refused",
        outcomes[0], outcomes[1]
    );

    rights_cases();
    event_cases();

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
