//! The vCPU exit loop, once for every kind of guest: an explicit state machine that enters
//! the guest, does the interrupt-injection bookkeeping around each entry, and hands each exit
//! to one handler per exit reason of a [`Handler`] (what differs between guests: their
//! devices, CPUID/MSR policy and what ends them); plus the helpers those handlers share (port
//! I/O, CPUID, MMIO emulation).

use crate::vcpu;
use l4::abi::vcpu::{self as state, exit, Groups};
use l4::abi::Error;
use l4linux_glue::exits::{self, IoExit};
use l4linux_glue::mmio::{mask, MmioBus};
use l4linux_glue::ports::PortBus;

/// The guest state words: the borrowed UTCB, indexed by its message registers (see
/// [`l4::utcb::Utcb`]). Code a handler calls that may do IPC of its own (console output, the
/// switch, messages) runs lent ([`l4::utcb::Utcb::lend`]); IPC of the handler's own keeps the
/// state ([`vcpu::keeping_state`]).
pub type Words = l4::utcb::Utcb;

/// What a handler wants next.
pub enum Next<O> {
    /// Run the vCPU again, loading these state groups.
    Resume(Groups),
    /// The guest is over.
    Stop(O),
}

/// What the next entry needs: the interrupt the guest should take when it can, whether an
/// NMI is due, and the deadline of the run.
#[derive(Clone, Copy, Default)]
pub struct Entry {
    /// The vector to request as the virtual interrupt (V_IRQ), if any.
    pub interrupt: Option<u8>,
    /// An NMI is due: inject it (unless another event is being injected now).
    pub nmi: bool,
    /// The run's deadline (a TSC value; 0: none).
    pub deadline: u64,
}

/// A guest as the exit loop sees it: what happens around each entry and one handler per
/// exit reason. The handlers get the state words of the exit and return what to load next.
pub trait Handler {
    /// Why the guest ended.
    type Outcome;

    /// Before each entry: poll the devices and say what the entry needs.
    fn prepare(&mut self, _w: &mut Words) -> Entry {
        Entry::default()
    }
    /// The guest took the requested virtual interrupt `vector` (it moves from IRR to ISR).
    fn interrupt_taken(&mut self, _vector: u8) {}
    /// The NMI injected at the last entry was delivered.
    fn nmi_delivered(&mut self) {}
    /// Right after each exit, before its handler: collect device output; `Some` ends the
    /// guest.
    fn after_run(&mut self, _w: &mut Words) -> Option<Self::Outcome> {
        None
    }
    /// `VcpuRun` refused the state (loaded with `mask`).
    fn refused(&mut self, error: Error, mask: Groups, w: &mut Words) -> Self::Outcome;

    /// IN, OUT, INS, OUTS.
    fn port_io(&mut self, w: &mut Words) -> Next<Self::Outcome>;
    /// CPUID.
    fn cpuid(&mut self, w: &mut Words) -> Next<Self::Outcome>;
    /// RDMSR, WRMSR.
    fn msr(&mut self, w: &mut Words) -> Next<Self::Outcome>;
    /// A nested page fault: MMIO, or guest RAM not mapped yet.
    fn nested_page_fault(&mut self, w: &mut Words) -> Next<Self::Outcome>;
    /// HLT.
    fn halt(&mut self, w: &mut Words) -> Next<Self::Outcome>;
    /// VMMCALL.
    fn hypercall(&mut self, w: &mut Words) -> Next<Self::Outcome> {
        self.unhandled(exit::VMMCALL, w)
    }
    /// The run's deadline passed.
    fn deadline(&mut self, w: &mut Words) -> Next<Self::Outcome> {
        self.unhandled(exit::DEADLINE, w)
    }
    /// A message waits for the vCPU thread.
    fn message(&mut self, w: &mut Words) -> Next<Self::Outcome> {
        self.unhandled(exit::MESSAGE, w)
    }
    /// A triple fault.
    fn shutdown(&mut self, w: &mut Words) -> Next<Self::Outcome> {
        self.unhandled(exit::SHUTDOWN, w)
    }
    /// An intercepted exception (`vector`; the VMM intercepts only what it asked for).
    fn exception(&mut self, vector: u8, w: &mut Words) -> Next<Self::Outcome> {
        self.unhandled(exit::EXCEPTION_BASE + u64::from(vector), w)
    }
    /// The state groups the exits need not store (within [`Groups::UNSTORABLE`]): those the
    /// handlers never read at an exit and never load without writing them first. Default:
    /// none.
    fn unstored(&self) -> Groups {
        Groups::empty()
    }
    /// The state groups the first entry loads (all of the guest's state; a handler that
    /// intercepts exceptions adds [`Groups::INTERCEPTS`]).
    fn first_entry(&self, _w: &mut Words) -> Groups {
        Groups::GUEST
    }
    /// Any other exit (`code`).
    fn unhandled(&mut self, code: u64, w: &mut Words) -> Next<Self::Outcome>;
}

/// Where the exit loop is.
enum State<O> {
    /// Enter the guest, loading these state groups.
    Enter(Groups),
    /// The guest exited with this code.
    Exited(u64),
    /// The guest is over.
    Stopped(O),
}

/// Run `vcpu` with `handler` until a handler ends the guest; the first entry loads all the
/// state words. The UTCB stays borrowed all along (the state words live there).
pub fn run<H: Handler>(vcpu: u64, handler: &mut H) -> H::Outcome {
    l4::utcb::with_utcb(|w| {
        let mut driver = Driver {
            vcpu,
            requested: None,
            unstored: handler.unstored(),
        };
        let mut state = State::Enter(handler.first_entry(w));
        loop {
            state = match state {
                State::Enter(mask) => driver.enter(handler, mask, w),
                State::Exited(code) => dispatch(handler, code, w),
                State::Stopped(outcome) => return outcome,
            };
        }
    })
}

/// The exit loop's own state: the interrupt requested and not yet taken.
struct Driver {
    vcpu: u64,
    /// The vector requested as the virtual interrupt (not yet taken by the guest).
    requested: Option<u8>,
    /// The groups the exits leave unstored ([`Handler::unstored`]).
    unstored: Groups,
}

impl Driver {
    /// One entry: request the pending interrupt, inject a due NMI, run, and account for what
    /// the guest took.
    fn enter<H: Handler>(
        &mut self,
        handler: &mut H,
        mut mask: Groups,
        w: &mut Words,
    ) -> State<H::Outcome> {
        let entry = handler.prepare(w);
        if entry.interrupt != self.requested {
            w[state::VIRTUAL_IRQ] = entry.interrupt.map_or(0, |v| (1 << 63) | u64::from(v));
            self.requested = entry.interrupt;
            mask |= Groups::EVENTS;
        }
        // An NMI goes in as an event (unless another event is being injected now); the CPU
        // takes it at entry whatever RFLAGS.IF says.
        let injecting = mask.contains(Groups::EVENTS) && w[state::EVENT_INJECT] != 0;
        let nmi = entry.nmi && !injecting;
        if nmi {
            w[state::EVENT_INJECT] = state::event::nmi();
            mask |= Groups::EVENTS;
        }
        let code = match vcpu::run_unstored(w, self.vcpu, mask, self.unstored, entry.deadline) {
            Ok(code) => code,
            Err(e) => return State::Stopped(handler.refused(e, mask, w)),
        };
        if nmi {
            // Delivered at entry (an exit during its delivery has the kernel re-inject it).
            handler.nmi_delivered();
        }
        // The guest took the requested interrupt: it moves from IRR to ISR, before the exit
        // is handled (the exit may be the guest's EOI for it).
        if let Some(v) = self.requested {
            if w[state::VIRTUAL_IRQ] & (1 << 63) == 0 {
                handler.interrupt_taken(v);
                self.requested = None;
            }
        }
        match handler.after_run(w) {
            Some(outcome) => State::Stopped(outcome),
            None => State::Exited(code),
        }
    }
}

/// One handler per exit reason.
fn dispatch<H: Handler>(handler: &mut H, code: u64, w: &mut Words) -> State<H::Outcome> {
    let next = match code {
        exit::IOIO => handler.port_io(w),
        exit::CPUID => handler.cpuid(w),
        exit::MSR => handler.msr(w),
        exit::NPF => handler.nested_page_fault(w),
        exit::HLT => handler.halt(w),
        exit::VMMCALL => handler.hypercall(w),
        exit::DEADLINE => handler.deadline(w),
        exit::MESSAGE => handler.message(w),
        exit::SHUTDOWN => handler.shutdown(w),
        code if (exit::EXCEPTION_BASE..exit::EXCEPTION_BASE + 32).contains(&code) => {
            handler.exception((code - exit::EXCEPTION_BASE) as u8, w)
        }
        other => handler.unhandled(other, w),
    };
    match next {
        Next::Resume(mask) => State::Enter(mask),
        Next::Stop(outcome) => State::Stopped(outcome),
    }
}

/// A non-string IN or OUT through `bus` (which runs with the UTCB lent: a device may do IPC).
/// An IN writes the value as the CPU does: a 32-bit IN zero-extends into RAX, an 8- or 16-bit
/// IN keeps the rest of RAX.
pub fn port_io(bus: &mut PortBus, io: &IoExit, w: &mut Words) {
    if io.input {
        let value = w.lend(|| bus.read(io.port, io.size)) as u64;
        let keep = !((1u64 << (8 * io.size)) - 1);
        w[state::RAX] = if io.size == 4 {
            value
        } else {
            (w[state::RAX] & keep) | value
        };
    } else {
        let value = w[state::RAX] as u32;
        w.lend(|| bus.write(io.port, io.size, value));
    }
}

/// Complete a CPUID exit: the VMM's policy over the host's values (or what `private` says for
/// a leaf it answers itself) into RAX..RDX, and RIP past the instruction.
pub fn emulate_cpuid(w: &mut Words, private: impl Fn(u32) -> Option<[u32; 4]>) {
    emulate_cpuid_with(w, |leaf, subleaf, host| {
        private(leaf).unwrap_or_else(|| exits::cpuid(leaf, subleaf, host))
    });
}

/// Complete a CPUID exit with `policy(leaf, subleaf, host answer)`.
pub fn emulate_cpuid_with(w: &mut Words, policy: impl Fn(u32, u32, [u32; 4]) -> [u32; 4]) {
    let (leaf, subleaf) = (w[state::RAX] as u32, w[state::RCX] as u32);
    let host = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    let r = policy(leaf, subleaf, [host.eax, host.ebx, host.ecx, host.edx]);
    (w[state::RAX], w[state::RBX], w[state::RCX], w[state::RDX]) =
        (r[0] as u64, r[1] as u64, r[2] as u64, r[3] as u64);
    w[state::RIP] += exits::CPUID_LENGTH;
}

/// What an emulated MMIO access goes to: guest-physical addresses, `None`/false if nothing
/// claims them.
pub trait Mmio {
    /// Read `size` bytes at `gpa`.
    fn read(&mut self, gpa: u64, size: u8) -> Option<u64>;
    /// Write `size` bytes of `value` at `gpa`.
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> bool;
}

impl Mmio for MmioBus {
    fn read(&mut self, gpa: u64, size: u8) -> Option<u64> {
        MmioBus::read(self, gpa, size)
    }
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> bool {
        MmioBus::write(self, gpa, size, value)
    }
}

/// Carry out a decoded MMIO access at `gpa` on the bus (with the UTCB lent, as for
/// [`port_io`]), with the guest registers in `w`.
pub fn emulate_mmio(
    bus: &mut impl Mmio,
    gpa: u64,
    access: l4linux_glue::decode::MmioAccess,
    w: &mut Words,
) {
    use l4linux_glue::decode::{merge_read, MmioAccess};
    let register_index = |r: u8| match r {
        0 => state::RAX,
        1 => state::RCX,
        2 => state::RDX,
        3 => state::RBX,
        4 => state::RSP,
        5 => state::RBP,
        6 => state::RSI,
        7 => state::RDI,
        n => state::R8 + (n as usize - 8),
    };
    match access {
        MmioAccess::Read {
            size,
            register,
            extend_to,
        } => {
            let i = register_index(register);
            let data = w.lend(|| bus.read(gpa, size)).unwrap_or(mask(size));
            w[i] = merge_read(w[i], data, size, extend_to);
        }
        MmioAccess::WriteRegister {
            size,
            register,
            high_byte,
        } => {
            let value = if high_byte {
                w[register_index(register - 4)] >> 8
            } else {
                w[register_index(register)]
            };
            w.lend(|| bus.write(gpa, size, value));
        }
        MmioAccess::WriteImmediate { size, value } => {
            w.lend(|| bus.write(gpa, size, value));
        }
    }
}
