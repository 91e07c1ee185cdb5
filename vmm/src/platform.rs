//! The PC platform the compartments' guests run on ([`Board`]): the VM and its RAM, the
//! local APIC, IOAPIC and CPUID/MSR policy of [`l4linux_glue::platform::Platform`], the port
//! and MMIO buses with their device models, COM1 as a 16550A, and COM1's receive side from L4
//! ([`HostConsole`]). [`Compartment`] runs a guest on it with the one exit loop
//! ([`crate::exit`]): CPUID, MSRs, MMIO, HLT as a blocking wait in L4, deadlines and messages
//! are handled here for every guest kind; what differs (extra devices, hypercalls, what ends
//! the guest, how its console output is shown) is the guest kind's [`Kind`].

use crate::console::HostConsole;
use crate::exit::{self, emulate_cpuid_with, emulate_mmio, Entry, Handler, Mmio, Next, Words};
use crate::memory::{fetch_instruction, read_guest_virtual, write_guest_virtual, Vm};
use crate::vcpu::{rdtsc, INJECT_GP0, RFLAGS_IF};
use alloc::rc::Rc;
use core::cell::RefCell;
use l4::abi::vcpu::{self as state, Groups};
use l4::abi::{Error, Timeout, Timeouts};
use l4linux_glue::exits::{self as lengths, IoExit};
use l4linux_glue::mmio::MmioBus;
use l4linux_glue::platform::{Platform, PlatformConfig};
use l4linux_glue::ports::PortBus;
use l4linux_glue::uart8250::{self, Uart8250};
use x86_64::registers::control::Cr0Flags;
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::rflags::RFlags;

const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u64 = EferFlags::LONG_MODE_ENABLE.bits();
const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();
const EFER_SVME: u64 = EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE.bits();
/// RFLAGS.DF.
const RFLAGS_DF: u64 = RFlags::DIRECTION_FLAG.bits();
/// Elements of a REP INS/OUTS done per exit (the guest re-executes the instruction for more).
const STRING_IO_BATCH: u64 = 4096;
/// SCE, LME, LMA (ignored), NXE: what the kernel lets a guest have.
const EFER_WRITABLE: u64 = state::EFER_ALLOWED;

/// The value of the VMM argument `NAME=VALUE`, if given.
pub fn argument(name: &str) -> Option<&'static str> {
    l4::rt::arguments()
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// The VMM argument `NAME=SIZE` (e.g. `mem=256M`): `None` if absent, `Some(Err(()))` if it
/// is not a size.
pub fn size_argument(name: &str) -> Option<Result<u64, ()>> {
    argument(name).map(|value| l4::abi::parse_size(value).ok_or(()))
}

/// The interrupt and time platform of a compartment, clocked by the TSC frequency the kernel
/// measured (KIP), its time 0 now; with that frequency and the TSC of time 0. `None`, said
/// why, if the platform refuses the frequency.
pub fn new_platform() -> Option<(Platform, u64, u64)> {
    let tsc_hz = l4::kip::kip().tsc_hz;
    let boot_tsc = rdtsc();
    match Platform::new(PlatformConfig {
        tsc_hz,
        bus_hz: tsc_hz,
        boot_tsc,
        boot_wall_nanoseconds: 0,
    }) {
        Ok(platform) => Some((platform, tsc_hz, boot_tsc)),
        Err(e) => {
            crate::say!("platform: {e} (TSC {tsc_hz} Hz)");
            None
        }
    }
}

/// Exit counts by reason, for the report at the end.
#[derive(Default, Clone, Copy)]
pub struct ExitCounts {
    /// Port I/O other than COM1.
    pub io: u64,
    /// Port I/O to COM1.
    pub uart: u64,
    /// CPUID.
    pub cpuid: u64,
    /// RDMSR and WRMSR.
    pub msr: u64,
    /// MMIO (nested page faults).
    pub mmio: u64,
    /// HLT.
    pub hlt: u64,
    /// The run's deadline.
    pub deadline: u64,
    /// A message for the vCPU thread.
    pub message: u64,
    /// VMMCALL.
    pub hypercall: u64,
    /// #UD (the L4Linux mode's SYSCALL and SYSRET, and the #UDs it reflects).
    pub invalid_opcode: u64,
    /// MSR accesses refused with #GP.
    pub msr_refused: u64,
    /// Exits no handler took.
    pub other: u64,
    /// Interrupts the guest took.
    pub injected: u64,
    /// Of them, ended through the paravirtual EOI flag (no exit for the EOI).
    pub deferred_eois: u64,
    /// NMIs injected.
    pub nmis: u64,
}

impl ExitCounts {
    /// The exits counted since `earlier`, by reason, as `NAME N` pairs (reasons without exits
    /// left out), and their total.
    pub fn since(&self, earlier: &ExitCounts) -> (alloc::string::String, u64) {
        let pairs = [
            ("uart", self.uart - earlier.uart),
            ("other-io", self.io - earlier.io),
            ("cpuid", self.cpuid - earlier.cpuid),
            ("msr", self.msr - earlier.msr),
            ("mmio", self.mmio - earlier.mmio),
            ("hlt", self.hlt - earlier.hlt),
            ("deadline", self.deadline - earlier.deadline),
            ("message", self.message - earlier.message),
            ("hypercall", self.hypercall - earlier.hypercall),
            ("ud", self.invalid_opcode - earlier.invalid_opcode),
            ("other", self.other - earlier.other),
        ];
        let mut text = alloc::string::String::new();
        let mut total = 0;
        for (name, n) in pairs {
            total += n;
            if n > 0 {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(&alloc::format!("{name} {n}"));
            }
        }
        (text, total)
    }
}

/// The machine a compartment's guest runs on, filled in by its guest kind.
pub struct Board {
    /// The VM, its vCPU and RAM.
    pub vm: Vm,
    /// Local APIC, IOAPIC, kvmclock, CPUID/MSR policy.
    pub platform: Platform,
    /// The port devices (COM1 and the guest kind's).
    pub ports: PortBus,
    /// The MMIO devices besides the platform's own.
    pub mmio: MmioBus,
    /// COM1 (on `ports`).
    pub uart: Rc<RefCell<Uart8250>>,
    /// COM1's receive side, if this compartment has the console.
    pub console: Option<HostConsole>,
    /// Print each refused MSR access.
    pub verbose: bool,
    /// The TSC frequency.
    pub tsc_hz: u64,
    /// The TSC when the compartment started.
    pub boot_tsc: u64,
    /// Exits by reason.
    pub counts: ExitCounts,
    /// The L4Linux mode's system call routing, if the compartment has it.
    pub syscalls: Option<crate::syscalls::Routing>,
    /// The last exit touched no device (a SYSCALL or SYSRET of the L4Linux mode): the next
    /// entry needs no device poll, only the platform's timers. Every device change comes with
    /// an exit of its own (port I/O, MMIO, a message for new input or frames), whose entry
    /// polls as always.
    pub no_device_exit: bool,
    /// What the last entry needed, while nothing can have changed it but time (the platform
    /// changes only at exits that touch it, and when the guest takes an interrupt or NMI):
    /// after a device-free exit, an entry before its deadline needs the same.
    pub last_entry: Option<Entry>,
    /// Where the VMM set the guest's paravirtual EOI flag for the run (KVM's PV EOI,
    /// `Platform::eoi_may_be_deferred`), if it did.
    pub pv_eoi_set: Option<u64>,
}

impl Board {
    /// Before a run that offers `requested` as the virtual interrupt: set the guest's
    /// paravirtual EOI flag if the guest may end its interrupt through it in this run, clear
    /// it otherwise (guest memory is written only when that changes).
    fn offer_deferred_eoi(&mut self, requested: Option<u8>) {
        let flag = self.platform.pv_eoi_flag();
        let want = flag
            .filter(|&address| self.vm.ram.contains(address, 1))
            .filter(|_| self.platform.eoi_may_be_deferred(requested));
        if want == self.pv_eoi_set {
            return;
        }
        // Clear the flag only where it still is (the guest may have moved or disabled it,
        // and that memory is no longer ours to write).
        if let Some(old) = self.pv_eoi_set.filter(|&old| Some(old) == flag) {
            self.vm.ram.write(old, &[0]);
        }
        if let Some(address) = want {
            self.vm.ram.write(address, &[1]);
        }
        self.pv_eoi_set = want;
    }

    /// After a run: a flag the VMM set and the guest cleared is the guest's EOI.
    fn collect_deferred_eoi(&mut self) {
        let Some(address) = self.pv_eoi_set else {
            return;
        };
        if self.platform.pv_eoi_flag() != Some(address) {
            // Moved or disabled meanwhile: the guest ends its interrupts by writing the EOI.
            self.pv_eoi_set = None;
            return;
        }
        let mut flag = [1u8];
        if self.vm.ram.read_bytes(address, &mut flag) && flag[0] & 1 == 0 {
            self.pv_eoi_set = None;
            self.platform.deferred_eoi();
            self.counts.deferred_eois += 1;
            // The EOI may let a waiting interrupt in: the next entry must look again.
            self.last_entry = None;
        }
    }
}

/// What a guest kind (Linux, Multiboot) adds to the [`Board`] and its exit handling.
pub trait Kind {
    /// Why the guest ended.
    type Outcome;
    /// The kind's name in the VMM's messages (`[vmm] NAME: ...`).
    const NAME: &'static str;
    /// Whether messages (console input) can wake a halted guest: with no timer armed, HLT
    /// waits for one; otherwise such a HLT ends the guest.
    const MESSAGES_WAKE: bool;

    /// Show the guest's console output.
    fn output(&mut self, bytes: &[u8]);
    /// End an unfinished console line (before the VMM prints its own).
    fn break_line(&mut self);
    /// The console's line log (to show held-back output).
    fn log(&mut self) -> &mut crate::console_log::ConsoleLog;
    /// A message for the vCPU thread that the console did not take: whether the kind did.
    fn message(&mut self, _message: &l4::ipc::Received) -> bool {
        false
    }
    /// Before each entry and while halted: move input into devices and let them work.
    fn poll(&mut self, _board: &mut Board) {}
    /// Set the kind's interrupt lines from its devices' levels (before and after
    /// [`Kind::poll`]).
    fn drive_lines(&self, _board: &mut Board) {}
    /// Right after each exit, before its handler.
    fn after_run(&mut self, _board: &mut Board) {}
    /// After a non-string port access went to the bus: `Some` ends the guest.
    fn port_done(&mut self, _board: &mut Board, _io: &IoExit, _w: &Words) -> Option<Self::Outcome> {
        None
    }
    /// VMMCALL (`None`: the kind has no hypercalls).
    fn hypercall(&mut self, _board: &mut Board, _w: &mut Words) -> Option<Next<Self::Outcome>> {
        None
    }
    /// A triple fault.
    fn shutdown(&mut self) -> Self::Outcome;
    /// HLT with interrupts off (and no NMI due): nothing can wake the guest.
    fn halted(&mut self) -> Self::Outcome;
    /// The VMM cannot go on.
    fn failed(why: &'static str) -> Self::Outcome;
}

/// A guest of kind `K` on its board.
pub struct Compartment<K> {
    /// The machine.
    pub board: Board,
    /// The guest kind's part.
    pub kind: K,
}

/// The guest's MMIO at the current TSC: the platform (local APIC page in xAPIC mode, IOAPIC)
/// and the devices on the bus.
struct DeviceMmio<'a> {
    platform: &'a mut Platform,
    bus: &'a mut MmioBus,
    now: u64,
}

impl Mmio for DeviceMmio<'_> {
    fn read(&mut self, gpa: u64, size: u8) -> Option<u64> {
        self.platform
            .mmio_read(gpa, size, self.now)
            .or_else(|| self.bus.read(gpa, size))
    }
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> bool {
        self.platform.mmio_write(gpa, size, value, self.now) || self.bus.write(gpa, size, value)
    }
}

impl<K: Kind> Compartment<K> {
    /// INS/OUTS (with REP: up to [`STRING_IO_BATCH`] elements per exit; the rest re-executes
    /// the instruction, as the CPU lets a REP string instruction be interrupted), through the
    /// guest's page tables, with RFLAGS.DF and the address size. Flat segments are assumed
    /// (OUTS with a segment override reads through DS as well). Returns whether the
    /// instruction is complete.
    fn string_io(&mut self, io: &IoExit, w: &mut Words) -> Result<bool, &'static str> {
        let size = u64::from(io.size);
        // QEMU leaves EXITINFO1's address-size bits clear: then the code segment tells (L: 64
        // bits, else D: 32, else 16).
        let address_size = if (w[state::EXIT_INFO1] >> 7) & 7 != 0 {
            io.address_size
        } else {
            let attributes = (w[state::CS] >> 16) & 0xfff;
            if w[state::EFER] & EFER_LMA != 0 && attributes & 0x200 != 0 {
                8
            } else if attributes & 0x400 != 0 {
                4
            } else {
                2
            }
        };
        let mask = match address_size {
            2 => 0xffff,
            4 => 0xffff_ffff,
            _ => u64::MAX,
        };
        let step = if w[state::RFLAGS] & RFLAGS_DF != 0 {
            size.wrapping_neg()
        } else {
            size
        };
        let count = if io.rep { w[state::RCX] & mask } else { 1 };
        let batch = count.min(STRING_IO_BATCH);
        let index = if io.input { state::RDI } else { state::RSI };
        for _ in 0..batch {
            let address = w[index] & mask;
            let mut bytes = [0u8; 4];
            let bytes = &mut bytes[..io.size as usize];
            if io.input {
                let ports = &mut self.board.ports;
                let value = w.lend(|| ports.read(io.port, io.size));
                bytes.copy_from_slice(&value.to_le_bytes()[..io.size as usize]);
                if !write_guest_virtual(&self.board.vm, &w.mr, address, bytes) {
                    return Err("INS to guest memory that is not mapped");
                }
            } else {
                if !read_guest_virtual(&self.board.vm, &w.mr, address, bytes) {
                    return Err("OUTS from guest memory that is not mapped");
                }
                let mut value = [0u8; 4];
                value[..bytes.len()].copy_from_slice(bytes);
                let ports = &mut self.board.ports;
                w.lend(|| ports.write(io.port, io.size, u32::from_le_bytes(value)));
            }
            w[index] = (w[index] & !mask) | (w[index].wrapping_add(step) & mask);
        }
        if io.rep {
            w[state::RCX] = (w[state::RCX] & !mask) | ((count - batch) & mask);
        }
        Ok(count == batch)
    }
}

impl<K: Kind> Compartment<K> {
    /// Run the guest to its end (the state words hold its entry state).
    pub fn run(&mut self) -> K::Outcome {
        exit::run(self.board.vm.vcpu, self)
    }

    /// Show COM1's output so far.
    pub fn flush_output(&mut self) {
        let output = core::mem::take(&mut self.board.uart.borrow_mut().output);
        if !output.is_empty() {
            self.kind.output(&output);
        }
    }

    /// Let the guest kind poll its devices, with the interrupt lines driven before and after.
    ///
    /// Before: the exit just handled may have lowered a line (the guest acknowledged its
    /// interrupt). The IOAPIC must see that, or work done now that raises the line again is
    /// no new edge for an edge-triggered pin, and the guest, which acknowledged already,
    /// never hears of it: a device that waits for the guest and a guest that waits for the
    /// device (the stall after a network flood).
    fn poll(&mut self) {
        self.drive_lines();
        self.kind.poll(&mut self.board);
        self.drive_lines();
    }

    /// Set COM1's and the kind's interrupt lines from their devices' levels.
    fn drive_lines(&mut self) {
        self.kind.drive_lines(&mut self.board);
        let level = self.board.uart.borrow().irq_level();
        self.board
            .platform
            .set_irq(uart8250::COM1_IRQ.into(), level);
    }

    /// A line of the VMM's about this guest.
    fn say(&mut self, line: core::fmt::Arguments) {
        self.kind.break_line();
        crate::say!("{}: {line}", K::NAME);
    }

    /// A line of the VMM's about this guest, from a handler (which holds the UTCB as `w`).
    fn say_lent(&mut self, w: &mut Words, line: core::fmt::Arguments) {
        w.lend(|| self.say(line));
    }

    /// Receive what waits for the vCPU thread (console input and the like), waiting at most
    /// `timeout` for the first message.
    fn drain_messages(&mut self, w: &mut Words, timeout: Timeout) {
        let mut timeout = timeout;
        // (A message longer than four words would overwrite the vCPU state words.)
        while let Ok(message) =
            crate::vcpu::keeping_state(w, |u| u.wait(Timeouts::new(Timeout::INFINITE, timeout)))
        {
            w.lend(|| {
                let handled = self
                    .board
                    .console
                    .as_mut()
                    .is_some_and(|c| c.handle(&message))
                    || self.kind.message(&message);
                if !handled {
                    self.say(format_args!(
                        "unexpected message (label {}) ignored",
                        message.tag.label()
                    ));
                }
            });
            timeout = Timeout::ZERO;
        }
    }
}

impl<K: Kind> Handler for Compartment<K> {
    type Outcome = K::Outcome;

    fn prepare(&mut self, w: &mut Words) -> Entry {
        let now = rdtsc();
        if core::mem::take(&mut self.board.no_device_exit) {
            if let Some(entry) = self.board.last_entry {
                if entry.deadline == 0 || now < entry.deadline {
                    // Nothing the paravirtual EOI flag depends on changed either: the guest
                    // took no interrupt and ended none (either drops `last_entry`).
                    return entry;
                }
            }
        } else {
            w.lend(|| self.poll());
        }
        let platform = &mut self.board.platform;
        let interrupt = platform.tick(now);
        let entry = Entry {
            interrupt,
            nmi: platform.nmi_pending(),
            deadline: platform.next_deadline().unwrap_or(0),
        };
        self.board.last_entry = Some(entry);
        self.board.offer_deferred_eoi(interrupt);
        entry
    }

    fn interrupt_taken(&mut self, vector: u8) {
        self.board.platform.accept(vector);
        self.board.counts.injected += 1;
        self.board.last_entry = None;
    }

    fn nmi_delivered(&mut self) {
        self.board.platform.accept_nmi();
        self.board.counts.nmis += 1;
        self.board.last_entry = None;
    }

    fn after_run(&mut self, w: &mut Words) -> Option<K::Outcome> {
        self.board.collect_deferred_eoi();
        if self.board.syscalls.is_some()
            && w[state::EXIT_CODE] == state::exit::EXCEPTION_BASE + u64::from(state::VECTOR_UD)
        {
            // A SYSCALL or SYSRET (or another #UD): no device output to collect.
            return None;
        }
        w.lend(|| {
            self.flush_output();
            let tsc_hz = self.board.tsc_hz;
            self.kind.log().flush_if_stale(rdtsc(), tsc_hz);
            self.kind.after_run(&mut self.board);
        });
        None
    }

    fn refused(&mut self, error: Error, mask: Groups, w: &mut Words) -> K::Outcome {
        let (cr0, cr4, efer) = (w[state::CR0], w[state::CR4], w[state::EFER]);
        w.lend(|| {
            self.kind.break_line();
            crate::say!(
                "VcpuRun refused: {error} (cr0 {cr0:#x} cr4 {cr4:#x} efer {efer:#x} mask {mask:#x})"
            );
        });
        K::failed("VcpuRun refused")
    }

    fn port_io(&mut self, w: &mut Words) -> Next<K::Outcome> {
        let Some(io) = IoExit::decode(w[state::EXIT_INFO1]) else {
            return Next::Stop(K::failed("bad I/O exit"));
        };
        if io.port & !7 == uart8250::COM1_PORT {
            self.board.counts.uart += 1;
        } else {
            self.board.counts.io += 1;
        }
        if io.string {
            let finished = match self.string_io(&io, w) {
                Ok(finished) => finished,
                Err(why) => return Next::Stop(K::failed(why)),
            };
            if let Some(outcome) = self.kind.port_done(&mut self.board, &io, w) {
                return Next::Stop(outcome);
            }
            if finished {
                w[state::RIP] = w[state::EXIT_INFO2];
            }
            return Next::Resume(Groups::GPRS);
        }
        exit::port_io(&mut self.board.ports, &io, w);
        if let Some(outcome) = self.kind.port_done(&mut self.board, &io, w) {
            return Next::Stop(outcome);
        }
        w[state::RIP] = w[state::EXIT_INFO2];
        Next::Resume(Groups::GPRS)
    }

    fn cpuid(&mut self, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.cpuid += 1;
        let cr4 = w[state::CR4];
        let platform = &self.board.platform;
        emulate_cpuid_with(w, |leaf, subleaf, host| {
            platform.cpuid(leaf, subleaf, host, cr4)
        });
        Next::Resume(Groups::GPRS)
    }

    fn msr(&mut self, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.msr += 1;
        let msr = w[state::RCX] as u32;
        let write = w[state::EXIT_INFO1] != 0;
        let value = (w[state::RDX] << 32) | (w[state::RAX] & 0xffff_ffff);
        let now = rdtsc();
        let mut mask = Groups::GPRS;
        let result = match (msr, write) {
            (MSR_EFER, false) => {
                let efer = w[state::EFER] & !EFER_SVME;
                // The L4Linux mode shows the SCE the guest set, not the real one (clear).
                Ok(match &self.board.syscalls {
                    Some(routing) => routing.efer_read(efer),
                    None => efer,
                })
            }
            (MSR_EFER, true) if value & !EFER_WRITABLE == 0 => {
                // LMA follows LME and CR0.PG; the kernel keeps SVME set; in the L4Linux mode
                // SCE stays clear (so SYSCALL and SYSRET exit).
                let paging = w[state::CR0] & Cr0Flags::PAGING.bits() != 0;
                let long = value & EFER_LME != 0;
                let value = match &mut self.board.syscalls {
                    Some(routing) => routing.efer_write(value),
                    None => value,
                };
                w[state::EFER] = (value & !EFER_LMA) | if long && paging { EFER_LMA } else { 0 };
                mask |= Groups::CONTROL;
                Ok(0)
            }
            (_, false) => match self.board.platform.msr_read(msr, now) {
                Ok(value) => Ok(value),
                Err(e) => {
                    if self.board.verbose {
                        self.say_lent(w, format_args!("rdmsr {msr:#x} refused with #GP: {e}"));
                    }
                    Err(())
                }
            },
            (_, true) => match self.board.platform.msr_write(msr, value, now) {
                Ok(Some(update)) => {
                    let ram = &self.board.vm.ram;
                    if ram.contains(update.address, update.bytes.len() as u64) {
                        ram.write(update.address, &update.bytes);
                    }
                    Ok(0)
                }
                Ok(None) => Ok(0),
                Err(e) => {
                    if self.board.verbose {
                        self.say_lent(
                            w,
                            format_args!("wrmsr {msr:#x} <- {value:#x} refused with #GP: {e}"),
                        );
                    }
                    Err(())
                }
            },
        };
        match result {
            Ok(value) => {
                if !write {
                    (w[state::RAX], w[state::RDX]) = (value & 0xffff_ffff, value >> 32);
                }
                w[state::RIP] += lengths::MSR_LENGTH;
                Next::Resume(mask)
            }
            Err(()) => {
                // #GP(0), which Linux's safe accessors expect (it probes MSRs it may not have).
                self.board.counts.msr_refused += 1;
                w[state::EVENT_INJECT] = INJECT_GP0;
                Next::Resume(Groups::EVENTS)
            }
        }
    }

    /// A nested page fault outside RAM: MMIO, emulated by decoding the instruction.
    fn nested_page_fault(&mut self, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.mmio += 1;
        let gpa = w[state::EXIT_INFO2];
        let rip = w[state::RIP];
        let Some(bytes) = fetch_instruction(&self.board.vm, &w.mr) else {
            self.say_lent(
                w,
                format_args!("cannot fetch the instruction at rip {rip:#x} (access to {gpa:#x})"),
            );
            return Next::Stop(K::failed("MMIO instruction not readable"));
        };
        let decoded = if w[state::CS] >> 16 & 0x200 != 0 {
            l4linux_glue::decode::decode_mmio(&bytes)
        } else {
            l4linux_glue::decode::decode_mmio_32(&bytes)
        };
        let instruction = match decoded {
            Ok(i) => i,
            Err(e) => {
                self.say_lent(
                    w,
                    format_args!(
                        "cannot emulate the access to {gpa:#x} at rip {rip:#x}: {e:?} ({:02x?})",
                        &bytes[..8]
                    ),
                );
                return Next::Stop(K::failed("MMIO instruction not emulated"));
            }
        };
        if !self.board.platform.claims_mmio(gpa) && !self.board.mmio.claims(gpa) {
            self.say_lent(
                w,
                format_args!(
                    "access to unclaimed guest-physical {gpa:#x} at rip {rip:#x} (reads all ones)"
                ),
            );
        }
        let mut devices = DeviceMmio {
            platform: &mut self.board.platform,
            bus: &mut self.board.mmio,
            now: rdtsc(),
        };
        emulate_mmio(&mut devices, gpa, instruction.access, w);
        w[state::RIP] += u64::from(instruction.length);
        Next::Resume(Groups::GPRS)
    }

    /// HLT: block in L4 until an interrupt is due (the guest's timer or, where messages wake
    /// the guest, a message).
    fn halt(&mut self, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.hlt += 1;
        w[state::RIP] += lengths::HLT_LENGTH;
        w[state::INTERRUPT_SHADOW] = 0;
        if w[state::RFLAGS] & RFLAGS_IF == 0 && !self.board.platform.nmi_pending() {
            return Next::Stop(self.kind.halted());
        }
        loop {
            w.lend(|| self.poll());
            let now = rdtsc();
            let platform = &mut self.board.platform;
            if platform.tick(now).is_some() || platform.nmi_pending() {
                return Next::Resume(Groups::GPRS | Groups::EVENTS);
            }
            let timeout = match platform.next_deadline() {
                None if K::MESSAGES_WAKE => Timeout::INFINITE,
                None => {
                    return Next::Stop(K::failed(
                        "HLT with no timer armed: nothing can wake the guest",
                    ))
                }
                Some(d) => {
                    let us = (d.saturating_sub(now) as u128 * 1_000_000 / self.board.tsc_hz as u128)
                        .min(u32::MAX as u128 - 2) as u32;
                    if us == 0 {
                        continue;
                    }
                    Timeout::micros(us)
                }
            };
            // The guest waits: show its unfinished line (a prompt) now.
            w.lend(|| self.kind.log().flush());
            self.drain_messages(w, timeout);
        }
    }

    fn hypercall(&mut self, w: &mut Words) -> Next<K::Outcome> {
        match self.kind.hypercall(&mut self.board, w) {
            Some(next) => {
                self.board.counts.hypercall += 1;
                next
            }
            None => self.unhandled(state::exit::VMMCALL, w),
        }
    }

    fn deadline(&mut self, _w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.deadline += 1;
        Next::Resume(Groups::empty())
    }

    fn message(&mut self, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.message += 1;
        self.drain_messages(w, Timeout::ZERO);
        Next::Resume(Groups::empty())
    }

    fn shutdown(&mut self, _w: &mut Words) -> Next<K::Outcome> {
        Next::Stop(self.kind.shutdown())
    }

    /// #UD in the L4Linux mode: SYSCALL or SYSRET (emulated, user system calls routed to the
    /// monitor), or reflected to the guest.
    fn exception(&mut self, vector: u8, w: &mut Words) -> Next<K::Outcome> {
        match self.board.syscalls.as_mut() {
            Some(routing) if vector == state::VECTOR_UD => {
                self.board.counts.invalid_opcode += 1;
                match routing.invalid_opcode(&self.board.vm, w) {
                    Ok(mask) => {
                        self.board.no_device_exit = true;
                        Next::Resume(mask)
                    }
                    Err(crate::syscalls::Broken) => {
                        Next::Stop(K::failed(crate::syscalls::Broken::WHY))
                    }
                }
            }
            _ => self.unhandled(state::exit::EXCEPTION_BASE + u64::from(vector), w),
        }
    }

    fn unstored(&self) -> Groups {
        // The exits read CS (the mode of a string I/O or MMIO instruction) but no other segment
        // register; the L4Linux mode's SYSCALL/SYSRET emulation reads and loads them all.
        if self.board.syscalls.is_some() {
            Groups::empty()
        } else {
            Groups::SEGMENTS | Groups::INTERCEPTS
        }
    }

    fn first_entry(&self, w: &mut Words) -> Groups {
        if self.board.syscalls.is_some() {
            w[state::EXCEPTION_INTERCEPTS] = crate::syscalls::Routing::INTERCEPTS.bits();
            Groups::GUEST | Groups::INTERCEPTS
        } else {
            Groups::GUEST
        }
    }

    fn unhandled(&mut self, code: u64, w: &mut Words) -> Next<K::Outcome> {
        self.board.counts.other += 1;
        let (rip, info1, info2) = (w[state::RIP], w[state::EXIT_INFO1], w[state::EXIT_INFO2]);
        self.say_lent(
            w,
            format_args!(
                "unhandled exit {code:#x} at rip {rip:#x} (info1 {info1:#x} info2 {info2:#x})"
            ),
        );
        Next::Stop(K::failed("unhandled exit"))
    }
}
