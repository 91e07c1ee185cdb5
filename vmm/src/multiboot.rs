//! A Multiboot (v1) compartment, started as QEMU's `-kernel` starts a 32-bit kernel: the
//! ELF32 (or header-address) image from data module `kernel`, the modules named by the
//! argument `modules=a,b` (data modules of those names; each module's string is its name),
//! the command line from data module `cmdline`, RAM from 0 (`ram=SIZE`), and the vCPU in
//! 32-bit protected mode with paging off, flat segments, EAX = 0x2BADB002 and EBX = the boot
//! information ([`l4linux_glue::multiboot`]).
//!
//! The platform: COM1 (a 16550A whose output is printed as `[NAME] ...` lines), the debug-exit
//! port 0xf4 (the value written is the compartment's exit status), `fw_cfg` at 0x510/0x511,
//! and the local APIC ([`l4linux_glue::platform::Platform`]) in xAPIC (MMIO) and x2APIC (MSR)
//! mode with its timers, self-IPIs and NMIs; INIT and SIPI are accepted and ignored (one
//! vCPU). Unclaimed ports and MMIO read as all ones.
//!
//! The compartment ends when the guest writes the debug-exit port, halts with interrupts off
//! (status 0), waits in HLT for an interrupt that nothing can send, triple-faults, or does
//! something the VMM cannot handle.

use crate::{create_vm, emulate_cpuid_with, fetch_instruction, port_io, run, utcb_words, Vm};
use crate::{Mmio, INJECT_GP0};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use l4::abi::vcpu::{self as state, exit};
use l4::println;
use l4linux_glue::debug_exit::{self, DebugExit};
use l4linux_glue::exits::{self, IoExit};
use l4linux_glue::fw_cfg::{self, FwCfg};
use l4linux_glue::multiboot::{self, ModuleInput};
use l4linux_glue::platform::{Platform, PlatformConfig};
use l4linux_glue::ports::PortBus;
use l4linux_glue::uart8250::{self, Uart8250};

/// Guest RAM when the arguments name no size.
const DEFAULT_RAM: u64 = 64 << 20;
/// The stack pointer at entry (the spec leaves it undefined; this is conventional memory).
const ENTRY_STACK: u64 = 0x7000;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_SVME: u64 = 1 << 12;
/// SCE, LME, LMA (ignored), NXE.
const EFER_WRITABLE: u64 = 0x0d01;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Exit counts by reason, for the report at the end.
#[derive(Default)]
struct ExitCounts {
    io: u64,
    uart: u64,
    cpuid: u64,
    msr: u64,
    mmio: u64,
    hlt: u64,
    deadline: u64,
    other: u64,
    injected: u64,
    nmis: u64,
}

/// COM1 output, a line at a time, each line prefixed with the compartment's name.
struct LineLog {
    prefix: String,
    line: Vec<u8>,
}

impl LineLog {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => self.flush(),
                b'\r' => {}
                _ => self.line.push(b),
            }
            if self.line.len() >= 200 {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        let mut out = Vec::with_capacity(self.prefix.len() + self.line.len() + 1);
        out.extend_from_slice(self.prefix.as_bytes());
        out.append(&mut self.line);
        out.push(b'\n');
        let _ = l4::sys::debug_write(&out);
    }

    /// End an unfinished line (before the VMM prints its own).
    fn break_line(&mut self) {
        if !self.line.is_empty() {
            self.flush();
        }
    }
}

/// The platform's MMIO (local APIC page in xAPIC mode, IOAPIC) at the current TSC.
struct PlatformMmio<'a> {
    platform: &'a mut Platform,
    now: u64,
}

impl Mmio for PlatformMmio<'_> {
    fn read(&mut self, gpa: u64, size: u8) -> Option<u64> {
        self.platform.mmio_read(gpa, size, self.now)
    }
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> bool {
        self.platform.mmio_write(gpa, size, value, self.now)
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn argument(name: &str) -> Option<&'static str> {
    l4::rt::arguments()
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// Boot the multiboot kernel named by the data modules; returns the compartment's exit status.
pub fn boot_multiboot() -> i64 {
    let Some(image) = l4::rt::blob("kernel") else {
        println!("[vmm] no multiboot kernel: give it as data module `kernel` (blob=kernel)");
        return 1;
    };
    let cmdline = match l4::rt::blob("cmdline").map(core::str::from_utf8) {
        None => "",
        Some(Ok(text)) => text.trim_end_matches(['\n', '\r', '\0']),
        Some(Err(_)) => {
            println!("[vmm] the command line module is not UTF-8");
            return 1;
        }
    };
    let ram_size = match argument("ram").map(l4::abi::parse_size) {
        None => DEFAULT_RAM,
        Some(Some(size)) => size,
        Some(None) => {
            println!("[vmm] bad memory size (ram=SIZE, e.g. ram=64M)");
            return 1;
        }
    };
    let mut modules = Vec::new();
    for name in argument("modules").unwrap_or("").split(',') {
        if name.is_empty() {
            continue;
        }
        let Some(contents) = l4::rt::blob(name) else {
            println!("[vmm] no data module `{name}` for the multiboot modules (blob={name})");
            return 1;
        };
        modules.push(ModuleInput {
            contents,
            string: name,
        });
    }
    let kernel = match multiboot::parse(image, ram_size) {
        Ok(k) => k,
        Err(e) => {
            println!("[vmm] multiboot image rejected: {e}");
            return 1;
        }
    };
    let plan = match multiboot::plan(&kernel, ram_size, cmdline, &modules) {
        Ok(p) => p,
        Err(e) => {
            println!(
                "[vmm] multiboot kernel does not fit in {} MiB of guest RAM: {e}",
                ram_size >> 20
            );
            return 1;
        }
    };
    let name = argument("name").unwrap_or("multiboot");
    let tsc_hz = l4::kip::kip().tsc_hz;
    let boot_tsc = rdtsc();
    let platform = match Platform::new(PlatformConfig {
        tsc_hz,
        bus_hz: tsc_hz,
        boot_tsc,
        boot_wall_nanoseconds: 0,
    }) {
        Ok(p) => p,
        Err(e) => {
            println!("[vmm] platform: {e} (TSC {tsc_hz} Hz)");
            return 1;
        }
    };
    let vm: Vm = match create_vm(ram_size, l4::abi::NO_CAP) {
        Ok(vm) => vm,
        Err(e) => {
            println!("[vmm] cannot create a VM: {e}");
            return 1;
        }
    };
    // RAM comes zeroed: only the file bytes are copied, the rest of each segment stays zero.
    for segment in &kernel.segments {
        let bytes = &image[segment.file_offset..segment.file_offset + segment.file_size];
        vm.ram.write(u64::from(segment.address), bytes);
    }
    for (module, &address) in modules.iter().zip(&plan.modules) {
        vm.ram.write(u64::from(address), module.contents);
    }
    vm.ram.write(u64::from(plan.info), &plan.block);
    println!(
        "[vmm] multiboot: {} segments, entry {:#x}, {} modules, information at {:#x}, {} MiB RAM",
        kernel.segments.len(),
        kernel.entry,
        modules.len(),
        plan.info,
        ram_size >> 20
    );

    let w = utcb_words();
    crate::protected_mode_state(w, u64::from(kernel.entry));
    w[state::CS] = state::segment(multiboot::CODE_SELECTOR, 0xc9b, 0xffff_ffff);
    for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
        w[s] = state::segment(multiboot::DATA_SELECTOR, 0xc93, 0xffff_ffff);
    }
    w[state::GDTR] = plan.gdt_limit.into();
    w[state::GDTR + 1] = plan.gdt.into();
    w[state::RAX] = multiboot::BOOTLOADER_MAGIC.into();
    w[state::RBX] = plan.info.into();
    w[state::RSP] = ENTRY_STACK;

    let mut compartment = Compartment {
        vm,
        platform,
        ports: PortBus::new(),
        uart: Rc::new(RefCell::new(Uart8250::new())),
        exit_port: Rc::new(RefCell::new(DebugExit::default())),
        log: LineLog {
            prefix: alloc::format!("[{name}] "),
            line: Vec::new(),
        },
        counts: ExitCounts::default(),
        requested: None,
        tsc_hz,
        boot_tsc,
    };
    if compartment.attach_devices(ram_size).is_err() {
        println!("[vmm] cannot attach the devices");
        return 1;
    }
    let outcome = compartment.run();
    compartment.report(outcome)
}

/// Why the exit loop ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u32),
    /// HLT with interrupts off (and no NMI due).
    Halted,
    Failed(&'static str),
}

struct Compartment {
    vm: Vm,
    platform: Platform,
    ports: PortBus,
    uart: Rc<RefCell<Uart8250>>,
    exit_port: Rc<RefCell<DebugExit>>,
    log: LineLog,
    counts: ExitCounts,
    /// The vector requested as the virtual interrupt (not yet taken by the guest).
    requested: Option<u8>,
    tsc_hz: u64,
    boot_tsc: u64,
}

/// What a handler wants next.
enum Next {
    /// Run the vCPU again, loading these state groups.
    Resume(u64),
    /// The compartment is over.
    Stop(Outcome),
}

impl Compartment {
    fn attach_devices(&mut self, ram_size: u64) -> Result<(), l4linux_glue::ports::BusError> {
        self.ports.register(
            uart8250::COM1_PORT,
            uart8250::LENGTH,
            Box::new(self.uart.clone()),
        )?;
        self.ports.register(
            debug_exit::BASE_PORT,
            debug_exit::LENGTH,
            Box::new(self.exit_port.clone()),
        )?;
        self.ports.register(
            fw_cfg::BASE_PORT,
            fw_cfg::LENGTH,
            Box::new(FwCfg::new(ram_size, 1)),
        )?;
        Ok(())
    }

    /// The exit loop.
    fn run(&mut self) -> Outcome {
        let mut mask = state::ALL;
        loop {
            let w = utcb_words();
            let now = rdtsc();
            self.platform
                .set_irq(uart8250::COM1_IRQ.into(), self.uart.borrow().irq_level());
            let pending = self.platform.tick(now);
            if pending != self.requested {
                w[state::VIRTUAL_IRQ] = pending.map_or(0, |v| (1 << 63) | u64::from(v));
                self.requested = pending;
                mask |= state::EVENTS;
            }
            // An NMI goes in as an event (unless another event is being injected now); the
            // CPU takes it at entry whatever RFLAGS.IF says.
            let mut nmi = false;
            let injecting = mask & state::EVENTS != 0 && w[state::EVENT_INJECT] != 0;
            if self.platform.nmi_pending() && !injecting {
                w[state::EVENT_INJECT] = state::event::nmi();
                mask |= state::EVENTS;
                nmi = true;
            }
            let deadline = self.platform.next_deadline().unwrap_or(0);
            let code = match run(self.vm.vcpu, mask, deadline) {
                Ok(code) => code,
                Err(e) => {
                    println!(
                        "[vmm] VcpuRun refused: {e} (cr0 {:#x} cr4 {:#x} efer {:#x} mask {mask:#x})",
                        w[state::CR0],
                        w[state::CR4],
                        w[state::EFER]
                    );
                    return Outcome::Failed("VcpuRun refused");
                }
            };
            if nmi {
                // Delivered at entry (an exit during its delivery has the kernel re-inject it).
                self.platform.accept_nmi();
                self.counts.nmis += 1;
            }
            // The guest took the requested interrupt: it moves from IRR to ISR, before the
            // exit is handled (the exit may be the guest's EOI for it).
            if let Some(v) = self.requested {
                if w[state::VIRTUAL_IRQ] & (1 << 63) == 0 {
                    self.platform.accept(v);
                    self.requested = None;
                    self.counts.injected += 1;
                }
            }
            mask = match self.handle(code) {
                Next::Resume(mask) => mask,
                Next::Stop(outcome) => return outcome,
            };
            let output = core::mem::take(&mut self.uart.borrow_mut().output);
            self.log.push(&output);
            for ipi in self.platform.take_ipis() {
                self.log.break_line();
                println!("[vmm] multiboot: {ipi:?} ignored (one vCPU)");
            }
        }
    }

    /// One handler per exit reason.
    fn handle(&mut self, code: u64) -> Next {
        let w = utcb_words();
        match code {
            exit::IOIO => self.port_io(),
            exit::CPUID => {
                self.counts.cpuid += 1;
                let cr4 = w[state::CR4];
                let platform = &self.platform;
                emulate_cpuid_with(w, |leaf, subleaf, host| {
                    platform.cpuid(leaf, subleaf, host, cr4)
                });
                Next::Resume(state::GPRS)
            }
            exit::MSR => self.msr(),
            exit::NPF => self.mmio(),
            exit::HLT => self.halt(),
            exit::DEADLINE | exit::MESSAGE => {
                self.counts.deadline += 1;
                Next::Resume(0)
            }
            exit::SHUTDOWN => Next::Stop(Outcome::Failed("triple fault")),
            other => {
                self.counts.other += 1;
                self.log.break_line();
                println!(
                    "[vmm] multiboot: unhandled exit {other:#x} at rip {:#x} (info1 {:#x} info2 {:#x})",
                    w[state::RIP],
                    w[state::EXIT_INFO1],
                    w[state::EXIT_INFO2]
                );
                Next::Stop(Outcome::Failed("unhandled exit"))
            }
        }
    }

    fn port_io(&mut self) -> Next {
        let w = utcb_words();
        let Some(io) = IoExit::decode(w[state::EXIT_INFO1]) else {
            return Next::Stop(Outcome::Failed("bad I/O exit"));
        };
        if io.string {
            return Next::Stop(Outcome::Failed("string I/O"));
        }
        if io.port & !7 == uart8250::COM1_PORT {
            self.counts.uart += 1;
        } else {
            self.counts.io += 1;
        }
        port_io(&mut self.ports, &io, w);
        if let Some(status) = self.exit_port.borrow().status {
            return Next::Stop(Outcome::DebugExit(status));
        }
        w[state::RIP] = w[state::EXIT_INFO2];
        Next::Resume(state::GPRS)
    }

    fn msr(&mut self) -> Next {
        self.counts.msr += 1;
        let w = utcb_words();
        let msr = w[state::RCX] as u32;
        let write = w[state::EXIT_INFO1] != 0;
        let value = (w[state::RDX] << 32) | (w[state::RAX] & 0xffff_ffff);
        let now = rdtsc();
        let mut mask = state::GPRS;
        let result = match (msr, write) {
            (MSR_EFER, false) => Ok(w[state::EFER] & !EFER_SVME),
            (MSR_EFER, true) if value & !EFER_WRITABLE == 0 => {
                // LMA follows LME and CR0.PG; the kernel keeps SVME set.
                let paging = w[state::CR0] & (1 << 31) != 0;
                let long = value & EFER_LME != 0;
                w[state::EFER] = (value & !EFER_LMA) | if long && paging { EFER_LMA } else { 0 };
                mask |= state::CONTROL;
                Ok(0)
            }
            (_, false) => self.platform.msr_read(msr, now).map_err(|e| {
                self.log.break_line();
                println!("[vmm] multiboot: rdmsr {msr:#x} refused with #GP: {e}");
            }),
            (_, true) => match self.platform.msr_write(msr, value, now) {
                Ok(Some(update)) => {
                    if self
                        .vm
                        .ram
                        .contains(update.address, update.bytes.len() as u64)
                    {
                        self.vm.ram.write(update.address, &update.bytes);
                    }
                    Ok(0)
                }
                Ok(None) => Ok(0),
                Err(e) => {
                    self.log.break_line();
                    println!("[vmm] multiboot: wrmsr {msr:#x} <- {value:#x} refused with #GP: {e}");
                    Err(())
                }
            },
        };
        match result {
            Ok(value) => {
                if !write {
                    (w[state::RAX], w[state::RDX]) = (value & 0xffff_ffff, value >> 32);
                }
                w[state::RIP] += exits::MSR_LENGTH;
                Next::Resume(mask)
            }
            Err(()) => {
                w[state::EVENT_INJECT] = INJECT_GP0;
                Next::Resume(state::EVENTS)
            }
        }
    }

    /// A nested page fault outside RAM: MMIO, emulated by decoding the instruction.
    fn mmio(&mut self) -> Next {
        self.counts.mmio += 1;
        let w = utcb_words();
        let gpa = w[state::EXIT_INFO2];
        let Some(bytes) = fetch_instruction(&self.vm, w) else {
            self.log.break_line();
            println!(
                "[vmm] multiboot: cannot fetch the instruction at rip {:#x} (access to {gpa:#x})",
                w[state::RIP]
            );
            return Next::Stop(Outcome::Failed("MMIO instruction not readable"));
        };
        let decoded = if w[state::CS] >> 16 & 0x200 != 0 {
            l4linux_glue::decode::decode_mmio(&bytes)
        } else {
            l4linux_glue::decode::decode_mmio_32(&bytes)
        };
        let instruction = match decoded {
            Ok(i) => i,
            Err(e) => {
                self.log.break_line();
                println!(
                    "[vmm] multiboot: cannot emulate the access to {gpa:#x} at rip {:#x}: {e:?} ({:02x?})",
                    w[state::RIP],
                    &bytes[..8]
                );
                return Next::Stop(Outcome::Failed("MMIO instruction not emulated"));
            }
        };
        if !self.platform.claims_mmio(gpa) {
            self.log.break_line();
            println!(
                "[vmm] multiboot: access to unclaimed guest-physical {gpa:#x} at rip {:#x} (reads all ones)",
                w[state::RIP]
            );
        }
        let mut devices = PlatformMmio {
            platform: &mut self.platform,
            now: rdtsc(),
        };
        crate::emulate_mmio(&mut devices, gpa, instruction.access, w);
        w[state::RIP] += u64::from(instruction.length);
        Next::Resume(state::GPRS)
    }

    /// HLT: block in L4 until the guest's timer is due. Nothing else can wake the guest (no
    /// device interrupts come from outside), so a wait without a timer ends the compartment.
    fn halt(&mut self) -> Next {
        self.counts.hlt += 1;
        let w = utcb_words();
        w[state::RIP] += 1;
        w[state::INTERRUPT_SHADOW] = 0;
        if w[state::RFLAGS] & RFLAGS_IF == 0 && !self.platform.nmi_pending() {
            return Next::Stop(Outcome::Halted);
        }
        loop {
            let now = rdtsc();
            if self.platform.tick(now).is_some() || self.platform.nmi_pending() {
                return Next::Resume(state::GPRS | state::EVENTS);
            }
            let Some(deadline) = self.platform.next_deadline() else {
                return Next::Stop(Outcome::Failed(
                    "HLT with no timer armed: nothing can wake the guest",
                ));
            };
            let us = (deadline.saturating_sub(now) as u128 * 1_000_000 / self.tsc_hz as u128)
                .min(u32::MAX as u128 - 2) as u32;
            if us == 0 {
                continue;
            }
            let timeouts =
                l4::abi::Timeouts::new(l4::abi::Timeout::INFINITE, l4::abi::Timeout::micros(us));
            if let Ok(message) = l4::ipc::wait(timeouts) {
                println!(
                    "[vmm] multiboot: unexpected message (label {}) ignored",
                    message.tag.label()
                );
            }
        }
    }

    fn report(&mut self, outcome: Outcome) -> i64 {
        let output = core::mem::take(&mut self.uart.borrow_mut().output);
        self.log.push(&output);
        self.log.break_line();
        let w = utcb_words();
        let c = &self.counts;
        let milliseconds = (rdtsc() - self.boot_tsc) / (self.tsc_hz / 1000).max(1);
        println!(
            "[vmm] exits: uart {} other-io {} cpuid {} msr {} mmio {} hlt {} deadline {} other {}; {} interrupts and {} NMIs injected; {milliseconds} ms",
            c.uart, c.io, c.cpuid, c.msr, c.mmio, c.hlt, c.deadline, c.other, c.injected, c.nmis
        );
        match outcome {
            Outcome::DebugExit(status) => {
                println!(
                    "[vmm] multiboot guest wrote status {status} to the debug-exit port: the compartment ends"
                );
                i64::from(status)
            }
            Outcome::Halted => {
                println!("[vmm] multiboot guest halted with interrupts off: the compartment ends");
                0
            }
            Outcome::Failed(why) => {
                println!(
                    "[vmm] multiboot guest stopped: {why} (rip {:#x}); the compartment ends",
                    w[state::RIP]
                );
                1
            }
        }
    }
}
