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

use crate::console_log::ConsoleLog;
use crate::memory::{create_vm, Vm};
use crate::platform::{argument, size_argument, Board, Compartment, ExitCounts, Kind};
use crate::vcpu::{protected_mode_state, rdtsc};
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use l4::abi::vcpu as state;
use l4linux_glue::debug_exit::{self, DebugExit};
use l4linux_glue::exits::IoExit;
use l4linux_glue::fw_cfg::{self, FwCfg};
use l4linux_glue::mmio::MmioBus;
use l4linux_glue::multiboot::{self, ModuleInput};
use l4linux_glue::ports::PortBus;
use l4linux_glue::uart8250::{self, Uart8250};

/// Guest RAM when the arguments name no size.
const DEFAULT_RAM: u64 = 64 << 20;
/// The stack pointer at entry (the spec leaves it undefined; this is conventional memory).
const ENTRY_STACK: u64 = 0x7000;

/// Boot the multiboot kernel named by the data modules; returns the compartment's exit status.
pub fn boot_multiboot() -> i64 {
    let Some(image) = l4::rt::blob("kernel") else {
        crate::say!("no multiboot kernel: give it as data module `kernel` (blob=kernel)");
        return 1;
    };
    let cmdline = match l4::rt::blob("cmdline").map(core::str::from_utf8) {
        None => "",
        Some(Ok(text)) => text.trim_end_matches(['\n', '\r', '\0']),
        Some(Err(_)) => {
            crate::say!("the command line module is not UTF-8");
            return 1;
        }
    };
    let ram_size = match size_argument("ram") {
        None => DEFAULT_RAM,
        Some(Ok(size)) => size,
        Some(Err(())) => {
            crate::say!("bad memory size (ram=SIZE, e.g. ram=64M)");
            return 1;
        }
    };
    let mut modules = Vec::new();
    for name in argument("modules").unwrap_or("").split(',') {
        if name.is_empty() {
            continue;
        }
        let Some(contents) = l4::rt::blob(name) else {
            crate::say!("no data module `{name}` for the multiboot modules (blob={name})");
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
            crate::say!("multiboot image rejected: {e}");
            return 1;
        }
    };
    let plan = match multiboot::plan(&kernel, ram_size, cmdline, &modules) {
        Ok(p) => p,
        Err(e) => {
            crate::say!(
                "multiboot kernel does not fit in {} MiB of guest RAM: {e}",
                ram_size >> 20
            );
            return 1;
        }
    };
    let Some((platform, tsc_hz, boot_tsc)) = crate::platform::new_platform() else {
        return 1;
    };
    let vm: Vm = match create_vm(ram_size, l4::abi::NO_CAP) {
        Ok(vm) => vm,
        Err(e) => {
            crate::say!("cannot create a VM: {e}");
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
    crate::say!(
        "multiboot: {} segments, entry {:#x}, {} modules, information at {:#x}, {} MiB RAM",
        kernel.segments.len(),
        kernel.entry,
        modules.len(),
        plan.info,
        ram_size >> 20
    );

    l4::utcb::with_utcb(|u| {
        let w = &mut u.mr;
        protected_mode_state(w, u64::from(kernel.entry));
        w[state::CS] = state::segment(multiboot::CODE_SELECTOR, 0xc9b, 0xffff_ffff);
        for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
            w[s] = state::segment(multiboot::DATA_SELECTOR, 0xc93, 0xffff_ffff);
        }
        w[state::GDTR] = plan.gdt_limit.into();
        w[state::GDTR + 1] = plan.gdt.into();
        w[state::RAX] = multiboot::BOOTLOADER_MAGIC.into();
        w[state::RBX] = plan.info.into();
        w[state::RSP] = ENTRY_STACK;
    });

    let mut compartment = Compartment {
        board: Board {
            vm,
            platform,
            ports: PortBus::new(),
            mmio: MmioBus::new(),
            uart: Rc::new(RefCell::new(Uart8250::new())),
            console: None,
            verbose: true,
            tsc_hz,
            boot_tsc,
            counts: ExitCounts::default(),
            syscalls: None,
            no_device_exit: false,
            last_entry: None,
            pv_eoi_set: None,
        },
        kind: Multiboot {
            exit_port: Rc::new(RefCell::new(DebugExit::default())),
            log: ConsoleLog::new(),
        },
    };
    if attach_devices(&mut compartment, ram_size).is_err() {
        crate::say!("cannot attach the devices");
        return 1;
    }
    let outcome = compartment.run();
    report(&mut compartment, outcome)
}

/// COM1, the debug-exit port and fw_cfg.
fn attach_devices(
    compartment: &mut Compartment<Multiboot>,
    ram_size: u64,
) -> Result<(), l4linux_glue::ports::BusError> {
    let ports = &mut compartment.board.ports;
    ports.register(
        uart8250::COM1_PORT,
        uart8250::LENGTH,
        Box::new(compartment.board.uart.clone()),
    )?;
    ports.register(
        debug_exit::BASE_PORT,
        debug_exit::LENGTH,
        Box::new(compartment.kind.exit_port.clone()),
    )?;
    ports.register(
        fw_cfg::BASE_PORT,
        fw_cfg::LENGTH,
        Box::new(FwCfg::new(ram_size, 1)),
    )?;
    Ok(())
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

/// What a Multiboot compartment adds to its board: the debug-exit port, console output as
/// `[NAME] ...` lines, and its ways to end. Nothing but its timer can wake it from HLT.
struct Multiboot {
    exit_port: Rc<RefCell<DebugExit>>,
    log: ConsoleLog,
}

impl Kind for Multiboot {
    type Outcome = Outcome;
    const NAME: &'static str = "multiboot";
    const MESSAGES_WAKE: bool = false;

    fn output(&mut self, bytes: &[u8]) {
        self.log.push(bytes, &mut |_| {});
    }

    fn break_line(&mut self) {
        self.log.break_line(&mut |_| {});
    }

    fn log(&mut self) -> &mut ConsoleLog {
        &mut self.log
    }

    /// INIT and SIPI: logged, nothing else (one vCPU).
    fn after_run(&mut self, board: &mut Board) {
        for ipi in board.platform.take_ipis() {
            self.break_line();
            crate::say!("multiboot: {ipi:?} ignored (one vCPU)");
        }
    }

    fn port_done(
        &mut self,
        _board: &mut Board,
        _io: &IoExit,
        _w: &crate::exit::Words,
    ) -> Option<Outcome> {
        self.exit_port.borrow().status.map(Outcome::DebugExit)
    }

    fn shutdown(&mut self) -> Outcome {
        Outcome::Failed("triple fault")
    }

    fn halted(&mut self) -> Outcome {
        Outcome::Halted
    }

    fn failed(why: &'static str) -> Outcome {
        Outcome::Failed(why)
    }
}

/// The exit counts and how the compartment ended; its exit status.
fn report(compartment: &mut Compartment<Multiboot>, outcome: Outcome) -> i64 {
    compartment.flush_output();
    compartment.kind.break_line();
    let board = &compartment.board;
    let rip = l4::utcb::with_utcb(|u| u[state::RIP]);
    let c = &board.counts;
    let milliseconds = (rdtsc() - board.boot_tsc) / (board.tsc_hz / 1000).max(1);
    crate::say!(
        "exits: uart {} other-io {} cpuid {} msr {} mmio {} hlt {} deadline {} other {}; {} interrupts and {} NMIs injected; {milliseconds} ms",
        c.uart, c.io, c.cpuid, c.msr, c.mmio, c.hlt, c.deadline + c.message, c.other, c.injected, c.nmis
    );
    match outcome {
        Outcome::DebugExit(status) => {
            crate::say!(
                "multiboot guest wrote status {status} to the debug-exit port: the compartment ends"
            );
            i64::from(status)
        }
        Outcome::Halted => {
            crate::say!("multiboot guest halted with interrupts off: the compartment ends");
            0
        }
        Outcome::Failed(why) => {
            crate::say!("multiboot guest stopped: {why} (rip {rip:#x}); the compartment ends");
            1
        }
    }
}
