//! The L4Linux mode (VMM argument `syscalls=l4`): every system call of the guest's user space
//! goes through L4 IPC to a syscall monitor task (the root task's `monitor=NAME`: a gate in
//! slot `MONITOR`) before the guest kernel sees it.
//!
//! The guest runs with EFER.SCE clear and #UD intercepted, while it is shown the EFER.SCE it
//! set ([`Routing::efer_read`], [`Routing::efer_write`]: its EFER writes cannot turn the real
//! SCE on, and LSTAR does not matter, the VMM reads it at each SYSCALL). So SYSCALL and SYSRET
//! fault and exit to the VMM, which decodes the instruction at RIP and carries it out as the CPU
//! would (`l4linux_glue::syscall`); every other #UD goes back to the guest unchanged. A SYSCALL
//! from 64-bit user mode is first sent to the monitor ([`LABEL_SYSCALL`]: number, arguments,
//! CR3; the PID is not known to the VMM and sent as 0), whose verdict
//! ([`Verdict`]) lets it run, denies it (the VMM completes it with `-errno` and the guest kernel
//! never sees it), or lets it run and asks for the result, which the VMM catches at the SYSRET
//! that returns to the same address space, stack and instruction ([`LABEL_RESULT`]). A call
//! that returns through IRET instead (Linux does for `execve`, a new process's first return,
//! and signal delivery) is not seen returning.

use crate::exit::Words;
use crate::memory::{read_guest_virtual, Vm};
use crate::vcpu::rdtsc;
use alloc::vec::Vec;
use l4::abi::vcpu::{self as state, Groups};
use l4::abi::{slots, MessageTag, Timeouts};
use l4linux_glue::syscall::{self, CpuState, Fault, Instruction, Mode, Segment, EFER_SCE};
use l4linux_glue::syscall_monitor::{
    Verdict, LABEL_END, LABEL_MARK, LABEL_REPORT, LABEL_RESULT, LABEL_SYSCALL,
};

/// Reports waiting for their SYSRET, at most (the oldest is dropped first).
const PENDING: usize = 64;

/// What the mode counted.
#[derive(Default, Clone, Copy, Debug)]
pub struct RoutingCounts {
    /// SYSCALLs from user mode sent to the monitor.
    pub routed: u64,
    /// Of them denied.
    pub denied: u64,
    /// Results sent to the monitor.
    pub reported: u64,
    /// SYSRETs emulated.
    pub sysrets: u64,
    /// SYSCALLs emulated that were not user system calls (from kernel or compatibility mode).
    pub unrouted: u64,
    /// #UDs that were not SYSCALL or SYSRET, reflected to the guest.
    pub reflected: u64,
    /// SYSCALL/SYSRET that fault as on the CPU (#UD with the shown SCE clear, #GP).
    pub faults: u64,
    /// TSC ticks (instructions under `-icount shift=0`) in the #UD handler, in all.
    pub handler_ticks: u64,
    /// Of them fetching and decoding the instruction.
    pub decode_ticks: u64,
    /// Of them in IPC with the monitor (the calls themselves, the monitor's work included).
    pub monitor_ticks: u64,
}

/// A system call whose result the monitor wants: where its SYSRET will return to.
#[derive(Clone, Copy)]
struct Pending {
    cr3: u64,
    rsp: u64,
    rip: u64,
    number: u64,
    start: u64,
}

/// The L4Linux mode's state in the VMM.
pub struct Routing {
    /// EFER.SCE as the guest set it (the real one stays clear).
    shown_sce: bool,
    pending: Vec<Pending>,
    /// What was counted.
    pub counts: RoutingCounts,
    /// The monitor failed once (said once).
    monitor_failed: bool,
}

/// The VMM's arguments asked for something the mode cannot do.
#[derive(Debug, Clone, Copy)]
pub struct RoutingError(pub &'static str);

impl Routing {
    /// The mode the arguments ask for: `syscalls=l4` (which needs `monitor=NAME`),
    /// `syscalls=guest` or none (no routing).
    pub fn from_arguments() -> Result<Option<Routing>, RoutingError> {
        match crate::platform::argument("syscalls") {
            None | Some("guest") => Ok(None),
            Some("l4") if crate::platform::argument("monitor").is_some() => Ok(Some(Routing {
                shown_sce: false,
                pending: Vec::new(),
                counts: RoutingCounts::default(),
                monitor_failed: false,
            })),
            Some("l4") => Err(RoutingError(
                "syscalls=l4 needs a syscall monitor (monitor=NAME)",
            )),
            Some(_) => Err(RoutingError("syscalls= must be \"guest\" or \"l4\"")),
        }
    }

    /// The exception intercepts the mode needs (#UD).
    pub const INTERCEPTS: state::Exceptions = state::Exceptions::vector(state::VECTOR_UD);

    /// EFER as the guest reads it: the real one with the SCE it set.
    pub fn efer_read(&self, efer: u64) -> u64 {
        if self.shown_sce {
            efer | EFER_SCE
        } else {
            efer & !EFER_SCE
        }
    }

    /// A guest write of EFER: remember its SCE, return what the vCPU really gets (SCE clear).
    pub fn efer_write(&mut self, value: u64) -> u64 {
        self.shown_sce = value & EFER_SCE != 0;
        value & !EFER_SCE
    }

    /// The monitor's mark (`l4ctl sysmon mark`) for the calling process (its CR3): the
    /// hypercall's result.
    pub fn mark(&mut self, w: &mut Words, cr3: u64) -> Result<u64, Broken> {
        self.notify(w, LABEL_MARK, &[cr3])
    }

    /// The monitor's report.
    pub fn report(&mut self, w: &mut Words) -> Result<u64, Broken> {
        self.notify(w, LABEL_REPORT, &[])
    }

    /// Tell the monitor that the compartment ends (it prints its totals).
    pub fn end(&mut self) {
        let c = self.counts;
        let _ =
            l4::utcb::with_utcb(|w| self.notify(w, LABEL_END, &[c.routed, c.denied, c.reported]));
    }

    /// Send the monitor `label` with `words`; 0, or -EIO if it did not answer.
    fn notify(&mut self, w: &mut Words, label: i32, words: &[u64]) -> Result<u64, Broken> {
        match monitor_call(w, label, words)? {
            Some(_) => Ok(0),
            None => {
                self.monitor_failed(w);
                Ok((-5i64) as u64)
            }
        }
    }

    fn monitor_failed(&mut self, w: &mut Words) {
        if !self.monitor_failed {
            w.lend(|| {
                crate::say!(
                    "the syscall monitor does not answer; system calls are refused with ENOSYS"
                )
            });
            self.monitor_failed = true;
        }
    }

    /// A #UD exit: SYSCALL or SYSRET carried out (and a user system call routed), or the #UD
    /// reflected to the guest. Returns the state groups to load.
    pub fn invalid_opcode(&mut self, vm: &Vm, w: &mut Words) -> Result<Groups, Broken> {
        let start = rdtsc();
        let mask = self.handle(vm, w, start);
        self.counts.handler_ticks += rdtsc().wrapping_sub(start);
        mask
    }

    fn handle(&mut self, vm: &Vm, w: &mut Words, start: u64) -> Result<Groups, Broken> {
        let mut cpu = cpu_state(w, self.efer_read(w[state::EFER]));
        let mode = cpu.mode();
        let instruction = fetch(vm, w).and_then(|(bytes, n)| syscall::decode(&bytes[..n], mode));
        self.counts.decode_ticks += rdtsc().wrapping_sub(start);
        let Some(instruction) = instruction else {
            self.counts.reflected += 1;
            return Ok(reflect(w, state::event::UD));
        };
        let from_user = mode == Mode::Long64 && cpu.cpl() == 3;
        match instruction {
            Instruction::Syscall { length } if from_user && self.shown_sce => {
                self.counts.routed += 1;
                let number = w[state::RAX];
                let verdict = self.ask(number, w)?;
                match verdict {
                    Verdict::Deny(errno) => {
                        self.counts.denied += 1;
                        let mut rax = number;
                        syscall::complete_in_user_mode(
                            &mut cpu,
                            length,
                            &mut rax,
                            (-i64::from(errno)) as u64,
                        );
                        w[state::RAX] = rax;
                        store(&cpu, w);
                        return Ok(Groups::GPRS);
                    }
                    Verdict::Report => {
                        if self.pending.len() == PENDING {
                            self.pending.remove(0);
                        }
                        self.pending.push(Pending {
                            cr3: w[state::CR3],
                            rsp: w[state::RSP],
                            rip: cpu.rip.wrapping_add(u64::from(length)),
                            number,
                            start: rdtsc(),
                        });
                    }
                    Verdict::Allow => {}
                }
            }
            // (With the shown SCE clear it faults below, as on the CPU.)
            Instruction::Syscall { .. } if self.shown_sce => self.counts.unrouted += 1,
            Instruction::Syscall { .. } => {}
            Instruction::Sysret { .. } => self.counts.sysrets += 1,
        }
        match syscall::execute(instruction, &mut cpu) {
            Ok(()) => {}
            Err(Fault::InvalidOpcode) => {
                self.counts.faults += 1;
                return Ok(reflect(w, state::event::UD));
            }
            Err(Fault::GeneralProtection) => {
                self.counts.faults += 1;
                return Ok(reflect(w, state::event::GP0));
            }
        }
        store(&cpu, w);
        if matches!(instruction, Instruction::Sysret { .. }) && !self.pending.is_empty() {
            self.returned(w)?;
        }
        Ok(Groups::GPRS | Groups::SEGMENTS)
    }

    /// Ask the monitor about system call `number` (arguments in the guest's registers).
    fn ask(&mut self, number: u64, w: &mut Words) -> Result<Verdict, Broken> {
        let words = [
            number,
            w[state::RDI],
            w[state::RSI],
            w[state::RDX],
            w[state::R8 + 2], // r10
            w[state::R8],
            w[state::R8 + 1], // r9
            w[state::CR3],
            0, // the PID: not known to the VMM
        ];
        let before = rdtsc();
        let reply = monitor_call(w, LABEL_SYSCALL, &words)?;
        self.counts.monitor_ticks += rdtsc().wrapping_sub(before);
        Ok(
            match reply.and_then(|r| Verdict::decode([r.word(0), r.word(1)])) {
                Some(verdict) => verdict,
                None => {
                    self.monitor_failed(w);
                    Verdict::Deny(l4linux_glue::syscall_monitor::ENOSYS)
                }
            },
        )
    }

    /// After a SYSRET (the state is the user's again): the result of a pending report that
    /// returns here goes to the monitor.
    fn returned(&mut self, w: &mut Words) -> Result<(), Broken> {
        let (cr3, rsp, rip) = (w[state::CR3], w[state::RSP], w[state::RIP]);
        let Some(i) = self
            .pending
            .iter()
            .rposition(|p| p.cr3 == cr3 && p.rsp == rsp && p.rip == rip)
        else {
            return Ok(());
        };
        let p = self.pending.remove(i);
        self.counts.reported += 1;
        let now = rdtsc();
        let instructions = now.wrapping_sub(p.start);
        let words = [p.number, w[state::RAX], instructions, cr3];
        if monitor_call(w, LABEL_RESULT, &words)?.is_none() {
            self.monitor_failed(w);
        }
        self.counts.monitor_ticks += rdtsc().wrapping_sub(now);
        Ok(())
    }
}

/// The monitor's reply: its first two words.
pub struct Reply([u64; 2]);

impl Reply {
    /// Word `i` (0 or 1).
    pub fn word(&self, i: usize) -> u64 {
        self.0[i]
    }
}

/// Call the monitor with `words` (at most 9) and take its reply (at most 4 words, in
/// registers); `None` if the call failed or the monitor answered with another label. Words
/// beyond the fourth travel in the UTCB's message registers, which hold the vCPU state
/// between exits: only those are saved and put back (this is the L4Linux mode's hot path; the
/// general way, [`crate::vcpu::keeping_state`], copies all 64). A reply longer than four
/// words has overwritten more of the state: [`Broken`], the compartment cannot go on.
fn monitor_call(w: &mut Words, label: i32, words: &[u64]) -> Result<Option<Reply>, Broken> {
    let n = words.len().min(9);
    let long = n.saturating_sub(4);
    let mr = &mut w.mr;
    let mut saved = [0u64; 5];
    saved[..long].copy_from_slice(&mr[4..4 + long]);
    if n > 4 {
        mr[4..n].copy_from_slice(&words[4..n]);
    }
    let mut registers = [0u64; 4];
    registers[..n.min(4)].copy_from_slice(&words[..n.min(4)]);
    let (rax, tag, _, reply) = w.raw_ipc(
        l4::abi::Syscall::Call,
        slots::MONITOR,
        0,
        MessageTag::new(label, n, 0).0,
        Timeouts::INFINITE.0,
        registers,
    );
    let tag = MessageTag(tag);
    let mr = &mut w.mr;
    mr[4..4 + long].copy_from_slice(&saved[..long]);
    if rax == 0 && (tag.words() > 4 || tag.typed() > 0) {
        return Err(Broken);
    }
    if rax != 0 || tag.label() != 0 {
        return Ok(None);
    }
    Ok(Some(Reply([reply[0], reply[1]])))
}

/// The monitor broke the protocol in a way that overwrote the vCPU state.
#[derive(Debug, Clone, Copy)]
pub struct Broken;

impl Broken {
    /// Why the compartment ends.
    pub const WHY: &'static str =
        "the syscall monitor replied with more than four words (the vCPU state is lost)";
}

/// Inject `event` (the #UD back, or the fault the instruction raises); nothing else changes.
fn reflect(w: &mut Words, event: u64) -> Groups {
    w[state::EVENT_INJECT] = event;
    Groups::EVENTS
}

/// The instruction bytes at RIP (up to 15, fewer where the next page is not mapped): the
/// bytes and how many.
fn fetch(vm: &Vm, w: &Words) -> Option<([u8; 15], usize)> {
    // The code segment's base counts outside 64-bit mode.
    let long = w[state::EFER] & syscall::EFER_LMA != 0 && (w[state::CS] >> 16) & 0x200 != 0;
    let base = if long { 0 } else { w[state::CS + 1] };
    let rip = w[state::RIP].wrapping_add(base);
    let mut bytes = [0u8; 15];
    // The common forms are 2 or 3 bytes: try those before the whole 15.
    if read_guest_virtual(vm, &w.mr, rip, &mut bytes[..3])
        && syscall::decode_common(&bytes[..3], mode_of(w)).is_some()
    {
        return Some((bytes, 3));
    }
    if read_guest_virtual(vm, &w.mr, rip, &mut bytes) {
        return Some((bytes, 15));
    }
    let in_page = (4096 - (rip & 4095)).min(15) as usize;
    read_guest_virtual(vm, &w.mr, rip, &mut bytes[..in_page]).then_some((bytes, in_page))
}

/// The mode the exit state is in (for the common forms' shortcut; EFER.LMA is the real one).
fn mode_of(w: &Words) -> Mode {
    cpu_state(w, w[state::EFER]).mode()
}

fn segment(w: &Words, index: usize) -> Segment {
    let word = w[index];
    Segment {
        selector: word as u16,
        attributes: (word >> 16) as u16 & 0xfff,
        limit: (word >> 32) as u32,
        base: w[index + 1],
    }
}

fn set_segment(w: &mut Words, index: usize, s: Segment) {
    w[index] = state::segment(s.selector, s.attributes, s.limit);
    w[index + 1] = s.base;
}

/// What SYSCALL and SYSRET read, from the exit state; `efer` as the guest sees it.
fn cpu_state(w: &Words, efer: u64) -> CpuState {
    CpuState {
        rip: w[state::RIP],
        rflags: w[state::RFLAGS],
        rcx: w[state::RCX],
        r11: w[state::R8 + 3],
        cs: segment(w, state::CS),
        ss: segment(w, state::SS),
        cr0: w[state::CR0],
        efer,
        star: w[state::STAR],
        lstar: w[state::LSTAR],
        cstar: w[state::CSTAR],
        sfmask: w[state::SFMASK],
    }
}

/// Write back what SYSCALL and SYSRET change.
fn store(cpu: &CpuState, w: &mut Words) {
    w[state::RIP] = cpu.rip;
    w[state::RFLAGS] = cpu.rflags;
    w[state::RCX] = cpu.rcx;
    w[state::R8 + 3] = cpu.r11;
    set_segment(w, state::CS, cpu.cs);
    set_segment(w, state::SS, cpu.ss);
}
