//! The test guest on the VMM library's exit loop: its handlers, and the other VMs it asks
//! the VMM to run in between (through hypercalls).

use super::*;
use l4::abi::{MapFlags, UnmapFlags};

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
fn resume(result: Result<Groups, &'static str>) -> Next<TestOutcome> {
    match result {
        Ok(mask) => Next::Resume(mask),
        Err(why) => Next::Stop(Err(why)),
    }
}

/// The exit loop of the test guest. Returns when the guest writes the exit port or stops
/// with an unexpected exit.
pub(super) fn run_test_guest(vm: &Vm, entry: u64) -> TestOutcome {
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
    utcb_words(|w| long_mode_state(w, entry));
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
    fn io(&mut self, w: &mut Words) -> Result<Groups, &'static str> {
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
        Ok(Groups::GPRS)
    }

    /// Lazy guest RAM (mapped here, for a VM without a pager thread's help) or MMIO.
    fn fault(&mut self, w: &mut Words) -> Result<Groups, &'static str> {
        let gpa = w[state::EXIT_INFO2];
        if LAZY.contains(&gpa) {
            let page = l4::child::fresh_page();
            sys::map(
                self.vm.vm,
                Fpage::memory(page, 12, Fpage::RWX),
                gpa & !(PAGE_SIZE - 1),
                MapFlags::empty(),
            )
            .map_err(|_| "lazy map")?;
            self.lazy_faults += 1;
            self.device.borrow_mut().status = self.lazy_faults;
            return Ok(Groups::GPRS);
        }
        let instruction =
            fetch_instruction(self.vm, &w.mr).ok_or("cannot fetch the faulting instruction")?;
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
        Ok(Groups::GPRS)
    }
}

impl Handler for TestGuest<'_> {
    type Outcome = TestOutcome;

    /// As the Linux platform's: the handlers read no segment register but CS.
    fn unstored(&self) -> Groups {
        Groups::SEGMENTS | Groups::INTERCEPTS
    }

    /// The guest's TAP lines become ours; its exit-port write ends it (both come from port
    /// writes: after any other exit there is nothing to do).
    fn after_run(&mut self, _w: &mut Words) -> Option<TestOutcome> {
        {
            let device = self.device.borrow();
            if device.lines.is_empty() && device.exit.is_none() {
                return None;
            }
        }
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
        self.device.borrow().exit.map(Ok)
    }

    fn refused(&mut self, _error: Error, _mask: Groups, _w: &mut Words) -> TestOutcome {
        Err("VcpuRun failed")
    }

    fn port_io(&mut self, w: &mut Words) -> Next<TestOutcome> {
        // The status port tells the guest its lazy faults (ours and the pager thread's), or
        // where it touched memory outside RAM and devices.
        if !self.outside_reported {
            self.device.borrow_mut().status = LAZY_FAULTS.load(SeqCst) as u32 + self.lazy_faults;
        }
        resume(self.io(w))
    }

    fn cpuid(&mut self, w: &mut Words) -> Next<TestOutcome> {
        emulate_cpuid(w, |leaf| {
            // Our private leaf: run the benchmarks instead of the tests?
            (leaf == 0x4000_0002).then(|| [BENCH_MODE.load(SeqCst) as u32, 0, 0, 0])
        });
        Next::Resume(Groups::GPRS)
    }

    fn msr(&mut self, w: &mut Words) -> Next<TestOutcome> {
        let msr = w[state::RCX] & 0xffff_ffff;
        if msr != TEST_MSR {
            // #GP(0) into the guest; the instruction does not complete.
            w[state::EVENT_INJECT] = INJECT_GP0;
            return Next::Resume(Groups::GPRS | Groups::EVENTS);
        }
        if w[state::EXIT_INFO1] == 0 {
            w[state::RAX] = self.test_msr & 0xffff_ffff;
            w[state::RDX] = self.test_msr >> 32;
        } else {
            self.test_msr = (w[state::RDX] << 32) | (w[state::RAX] & 0xffff_ffff);
        }
        w[state::RIP] += exits::MSR_LENGTH;
        Next::Resume(Groups::GPRS)
    }

    fn hypercall(&mut self, w: &mut Words) -> Next<TestOutcome> {
        let mut mask = Groups::GPRS;
        w[state::RAX] = match w[state::RAX] {
            1 => w[state::RBX].wrapping_add(w[state::RCX]),
            2 => {
                w[state::VIRTUAL_IRQ] = (1 << 63) | (w[state::RBX] & 0xff);
                w[state::EVENT_INJECT] = 0;
                mask |= Groups::EVENTS;
                0
            }
            3 => {
                // NMI.
                w[state::EVENT_INJECT] = state::event::nmi();
                mask |= Groups::EVENTS;
                0
            }
            7 => {
                // Run another VM that sets its own xmm0, then come back.
                let saved = w.mr;
                let other = w.lend(sse_vm);
                w.mr = saved;
                other
            }
            8 => {
                // Run another VM that reports what it finds in DR0-DR3, CR2 and the
                // syscall MSRs (and sets its own), then come back.
                let saved = w.mr;
                let seen = w.lend(peek_vm);
                w.mr = saved;
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
                        error_code(unsafe {
                            sys::unmap(Fpage::memory(page, 12, Fpage::RWX), UnmapFlags::empty())
                        })
                    }
                    _ => u64::MAX,
                }
            }
            6 => {
                // Inject external interrupt vector rbx.
                w[state::EVENT_INJECT] = state::event::interrupt(w[state::RBX] as u8);
                mask |= Groups::EVENTS;
                0
            }
            4 => {
                // #TS with the error code the guest asked for.
                w[state::EVENT_INJECT] =
                    state::event::exception_with_code(10, w[state::RBX] as u32);
                mask |= Groups::EVENTS;
                0
            }
            9 => {
                // Set this VMM thread's own x87 control word to rbx: its first x87
                // instruction since the run takes the registers from the guest.
                let control = w[state::RBX] as u16;
                // SAFETY: loads the x87 control word (masks, precision, rounding) of this
                // thread only; no Rust code uses x87 arithmetic.
                unsafe { core::arch::asm!("fldcw [{}]", in(reg) &control, options(nostack)) };
                0
            }
            10 => {
                // Report this thread's x87 control word (set by hypercall 9, a guest run
                // since), then reset it to the initial 0x37f.
                let mut control = 0u16;
                let initial = 0x37fu16;
                // SAFETY: stores, then loads, this thread's x87 control word.
                unsafe {
                    core::arch::asm!("fnstcw [{}]", in(reg) &mut control, options(nostack));
                    core::arch::asm!("fldcw [{}]", in(reg) &initial, options(nostack));
                }
                u64::from(control)
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
        Next::Resume(Groups::GPRS | Groups::EVENTS)
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

/// Run a fresh VM whose guest writes xmm0, with the state words of the UTCB (the caller saves
/// and restores its own guest's and lends the UTCB); 0 if it ran to its exit.
fn sse_vm() -> u64 {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        return 1;
    };
    vm.ram.write(0x7000, GUEST32_SSE.get());
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::CR4] = 0x600;
    });
    match run(vm.vcpu, Groups::GUEST, 0) {
        Ok(exit::IOIO) => 0,
        _ => 2,
    }
}

/// Run a fresh VM whose guest reports the DR0-DR3, CR2 and syscall-MSR values it finds (and
/// then writes its own). Returns a bit per non-zero value (0-3: DR0-DR3, 4: CR2, 8-15: the
/// MSRs), or all ones if it did not run to its exit. The state words as for [`sse_vm`].
fn peek_vm() -> u64 {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        return u64::MAX;
    };
    vm.ram.write(0x7000, GUEST32_PEEK.get());
    utcb_words(|w| protected_mode_state(w, 0x7000));
    if run(vm.vcpu, Groups::GUEST, 0) != Ok(exit::IOIO) {
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
