//! A local APIC for one vCPU, reachable both as an x2APIC (MSRs 0x800..0x8ff) and as an xAPIC
//! (4 KiB of MMIO at [`MMIO_BASE`], through [`MmioDevice`]), after the Intel SDM vol. 3 ch. 11
//! ("Advanced Programmable Interrupt Controller") and the AMD APM vol. 2 ch. 16.
//!
//! Pure logic: time is an input. Every call that can change the timer takes `now`, the guest's
//! TSC, and [`LocalApic::next_deadline`] says when the VMM must come back (a `VcpuRun`
//! deadline). The VMM asks [`LocalApic::pending_vector`] which vector to inject (the highest in
//! IRR whose priority class is above the PPR), injects it when the guest can take it and calls
//! [`LocalApic::accept`] (IRR to ISR). What the APIC asks of the rest of the machine (the EOI
//! broadcast to the IOAPIC for level-triggered vectors, IPIs for other vCPUs, INIT and SIPI)
//! is queued as [`ApicEffect`]s for [`LocalApic::take_effects`].
//!
//! Modelled: ID, version (integrated APIC, 6 LVT entries, no EOI-broadcast suppression), TPR,
//! PPR, EOI, LDR, DFR, SVR (software enable), ISR, TMR, IRR, ESR (send/receive illegal vector,
//! illegal register), ICR (fixed, lowest-priority and NMI delivered to this APIC when it is
//! addressed; INIT and SIPI recorded), LVT timer, thermal, performance, LINT0, LINT1 and error,
//! the timer in one-shot, periodic and TSC-deadline modes with the divide configuration, and the
//! x2APIC SELF_IPI register. Not modelled: lowest-priority arbitration (APR reads 0), focus
//! processor checks, the CMCI LVT, remote reads.
//!
//! x2APIC accesses the SDM calls invalid are errors ([`ApicError`]) the VMM turns into #GP:
//! any x2APIC MSR while the APIC is not in x2APIC mode, registers x2APIC mode does not have
//! (APR, RRD, DFR, ICR high, CMCI, the reserved holes), reads of EOI and SELF_IPI, writes of
//! the read-only registers, a non-zero write to EOI or ESR, and bits 63:32 set in any register
//! but the ICR. Reserved bits below bit 32 are ignored as in xAPIC mode. In xAPIC mode reads of
//! write-only registers return 0 and writes of read-only ones are dropped; a reserved offset
//! sets ESR's illegal-register bit.

use crate::mmio::{mask, MmioDevice};
use alloc::vec::Vec;
use core::fmt;

/// The architectural default guest-physical base of the xAPIC registers.
pub const MMIO_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC register page.
pub const MMIO_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// The first x2APIC register MSR (offset 0 of the xAPIC page).
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// The last MSR of the x2APIC range.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;
/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode (with [`APIC_BASE_ENABLE`]).
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: the APIC is globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: the base-address field (bits 51:12).
pub const APIC_BASE_ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
/// The version register: integrated APIC (0x14), 6 LVT entries (max index 5 in bits 23:16), no
/// EOI-broadcast suppression (bit 24 clear).
pub const VERSION: u32 = 0x0005_0014;
/// A bus frequency for the APIC timer when the VMM has no better one: 1 GHz, as KVM and QEMU
/// use (Linux with TSC-deadline never calibrates it).
pub const DEFAULT_BUS_HZ: u64 = 1_000_000_000;
/// How many effects are kept before the oldest are dropped (the VMM drains after each exit).
pub const EFFECT_CAPACITY: usize = 64;

/// Register offsets in the xAPIC page (the x2APIC MSR is `0x800 + offset / 16`).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u64 = 0x20;
    /// Version.
    pub const VERSION: u64 = 0x30;
    /// Task priority.
    pub const TPR: u64 = 0x80;
    /// Arbitration priority (xAPIC only).
    pub const APR: u64 = 0x90;
    /// Processor priority.
    pub const PPR: u64 = 0xa0;
    /// End of interrupt (write-only).
    pub const EOI: u64 = 0xb0;
    /// Remote read (xAPIC only).
    pub const RRD: u64 = 0xc0;
    /// Logical destination.
    pub const LDR: u64 = 0xd0;
    /// Destination format (xAPIC only).
    pub const DFR: u64 = 0xe0;
    /// Spurious-interrupt vector.
    pub const SVR: u64 = 0xf0;
    /// In-service register, 8 x 32 bits.
    pub const ISR: u64 = 0x100;
    /// Trigger-mode register, 8 x 32 bits.
    pub const TMR: u64 = 0x180;
    /// Interrupt-request register, 8 x 32 bits.
    pub const IRR: u64 = 0x200;
    /// Error status.
    pub const ESR: u64 = 0x280;
    /// LVT corrected machine-check interrupt (not implemented: 6 LVT entries).
    pub const LVT_CMCI: u64 = 0x2f0;
    /// Interrupt command, low half (the whole 64 bits in x2APIC mode).
    pub const ICR_LOW: u64 = 0x300;
    /// Interrupt command, high half (xAPIC only).
    pub const ICR_HIGH: u64 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u64 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u64 = 0x330;
    /// LVT performance-monitoring counters.
    pub const LVT_PERF: u64 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u64 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u64 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u64 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u64 = 0x380;
    /// Timer current count (read-only).
    pub const TIMER_CURRENT: u64 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u64 = 0x3e0;
    /// Self IPI (x2APIC only, write-only).
    pub const SELF_IPI: u64 = 0x3f0;
}

/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// SVR: focus processor checking disabled.
pub const SVR_FOCUS_DISABLED: u32 = 1 << 9;
/// LVT: masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode field (bits 18:17).
pub const LVT_TIMER_MODE_MASK: u32 = 3 << 17;
/// LVT timer mode: periodic.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// LVT timer mode: TSC-deadline.
pub const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// ESR: a vector below 16 was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR: a vector below 16 was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR: a reserved register offset was accessed (xAPIC mode).
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// Index of an LVT entry in [`LocalApic`]'s table, in register order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lvt {
    /// The timer.
    Timer = 0,
    /// The thermal sensor.
    Thermal = 1,
    /// Performance-monitoring counters.
    Perf = 2,
    /// Local interrupt pin 0 (ExtINT in the MP table).
    Lint0 = 3,
    /// Local interrupt pin 1 (NMI in the MP table).
    Lint1 = 4,
    /// APIC errors.
    Error = 5,
}

/// Writable bits of each LVT entry, in [`Lvt`] order (vector, delivery mode, polarity,
/// trigger mode, mask, timer mode as the entry has them).
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];

/// How an interrupt is delivered (ICR, LVT and IOAPIC redirection entries, bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The vector, to the addressed APICs.
    Fixed,
    /// The vector, to the lowest-priority APIC of those addressed.
    LowestPriority,
    /// A system-management interrupt.
    Smi,
    /// A non-maskable interrupt (the vector is ignored).
    Nmi,
    /// INIT.
    Init,
    /// Startup IPI (the vector is the start page).
    StartUp,
    /// An 8259-compatible interrupt (LINT0, IOAPIC).
    ExtInt,
    /// The reserved encoding 3.
    Reserved,
}

impl DeliveryMode {
    /// Decode bits 10:8 of an ICR, LVT or redirection entry.
    pub fn from_bits(entry: u64) -> DeliveryMode {
        match (entry >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// An ICR's destination shorthand (bits 19:18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field says who.
    None,
    /// This APIC only.
    SelfOnly,
    /// Every APIC, this one included.
    AllIncludingSelf,
    /// Every other APIC.
    AllExcludingSelf,
}

/// An interprocessor interrupt the guest sent that concerns more than this APIC, or INIT/SIPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (the start page for SIPI).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Destination (an APIC id, or a logical destination when `logical`).
    pub destination: u32,
    /// Logical destination mode.
    pub logical: bool,
    /// Destination shorthand.
    pub shorthand: Shorthand,
    /// Level bit (0 = de-assert, used by INIT level de-assert).
    pub assert: bool,
    /// Level-triggered.
    pub level_triggered: bool,
}

/// What the APIC asks of the rest of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicEffect {
    /// The guest ended a level-triggered interrupt: the IOAPIC clears remote IRR of the
    /// entries with this vector.
    EoiBroadcast(u8),
    /// An IPI for other vCPUs, or INIT/SIPI (recorded for a multi-vCPU VMM).
    Ipi(Ipi),
}

/// An invalid APIC access: the VMM answers with #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicError {
    /// The MSR is no x2APIC register, or the APIC is not in x2APIC mode.
    NoSuchRegister(u32),
    /// A read of a write-only register.
    WriteOnly(u32),
    /// A write of a read-only register.
    ReadOnly(u32),
    /// Reserved bits set (the MSR and the value).
    ReservedBits(u32, u64),
    /// An IA32_APIC_BASE write with reserved bits or an illegal mode transition.
    InvalidApicBase(u64),
    /// A TSC or bus frequency of zero.
    BadFrequency,
}

impl fmt::Display for ApicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ApicError::NoSuchRegister(msr) => {
                write!(f, "APIC: MSR {msr:#x} is no x2APIC register now")
            }
            ApicError::WriteOnly(msr) => write!(f, "APIC: MSR {msr:#x} is write-only"),
            ApicError::ReadOnly(msr) => write!(f, "APIC: MSR {msr:#x} is read-only"),
            ApicError::ReservedBits(msr, v) => {
                write!(f, "APIC: {v:#x} sets reserved bits of MSR {msr:#x}")
            }
            ApicError::InvalidApicBase(v) => write!(f, "APIC: IA32_APIC_BASE {v:#x} is invalid"),
            ApicError::BadFrequency => write!(f, "APIC: TSC and bus frequencies must be non-zero"),
        }
    }
}

/// How the APIC is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicConfig {
    /// The initial APIC id (the x2APIC id, and the xAPIC id after reset).
    pub apic_id: u32,
    /// This is the bootstrap processor.
    pub bootstrap: bool,
    /// TSC ticks per second (the unit of every `now`).
    pub tsc_hz: u64,
    /// APIC bus (timer input) ticks per second.
    pub bus_hz: u64,
}

/// The register an offset names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Rrd,
    Ldr,
    Dfr,
    Svr,
    Isr(usize),
    Tmr(usize),
    Irr(usize),
    Esr,
    IcrLow,
    IcrHigh,
    Lvt(usize),
    TimerInitial,
    TimerCurrent,
    TimerDivide,
    SelfIpi,
}

impl Register {
    fn decode(offset: u64) -> Option<Register> {
        let index = ((offset >> 4) & 7) as usize;
        Some(match offset & !0xf {
            reg::ID => Register::Id,
            reg::VERSION => Register::Version,
            reg::TPR => Register::Tpr,
            reg::APR => Register::Apr,
            reg::PPR => Register::Ppr,
            reg::EOI => Register::Eoi,
            reg::RRD => Register::Rrd,
            reg::LDR => Register::Ldr,
            reg::DFR => Register::Dfr,
            reg::SVR => Register::Svr,
            0x100..=0x170 => Register::Isr(index),
            0x180..=0x1f0 => Register::Tmr(index),
            0x200..=0x270 => Register::Irr(index),
            reg::ESR => Register::Esr,
            reg::ICR_LOW => Register::IcrLow,
            reg::ICR_HIGH => Register::IcrHigh,
            0x320..=0x370 => Register::Lvt(((offset - reg::LVT_TIMER) >> 4) as usize),
            reg::TIMER_INITIAL => Register::TimerInitial,
            reg::TIMER_CURRENT => Register::TimerCurrent,
            reg::TIMER_DIVIDE => Register::TimerDivide,
            reg::SELF_IPI => Register::SelfIpi,
            _ => return None,
        })
    }

    /// Read-only in the given mode (ID and LDR are writable in xAPIC mode only).
    fn read_only(self, x2apic: bool) -> bool {
        match self {
            Register::Id | Register::Ldr => x2apic,
            Register::Version
            | Register::Apr
            | Register::Ppr
            | Register::Rrd
            | Register::Isr(_)
            | Register::Tmr(_)
            | Register::Irr(_)
            | Register::TimerCurrent => true,
            _ => false,
        }
    }
}

/// The timer's counting state (the modes that count down; TSC-deadline uses `deadline`).
#[derive(Debug, Clone, Copy, Default)]
struct Timer {
    initial: u32,
    divide: u32,
    /// Counting: the TSC at which the count was `count_at_start`.
    armed: bool,
    start: u64,
    count_at_start: u32,
    /// Expirations since `start` already signalled.
    fired: u64,
    /// IA32_TSC_DEADLINE (0 = disarmed).
    deadline: u64,
}

/// 256 bits, one per vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] |= 1 << (v & 31);
    }
    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 5)] &= !(1 << (v & 31));
    }
    fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn highest(&self) -> Option<u8> {
        (0..8)
            .rev()
            .find(|&i| self.0[i] != 0)
            .map(|i| (i as u32 * 32 + 31 - self.0[i].leading_zeros()) as u8)
    }
    /// Whether the set is empty, holds one vector, or more (without counting bits: the
    /// VMM's target has no POPCNT, and this runs before every entry).
    fn single(&self) -> Single {
        let mut found = Single::Empty;
        for (i, &word) in self.0.iter().enumerate() {
            if word == 0 {
                continue;
            }
            if found != Single::Empty || word & (word - 1) != 0 {
                return Single::Many;
            }
            found = Single::One((i as u32 * 32 + word.trailing_zeros()) as u8);
        }
        found
    }
}

/// How many vectors a [`VectorSet`] holds: none, one, more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Single {
    Empty,
    One(u8),
    Many,
}

/// One vCPU's local APIC.
#[derive(Debug, Clone)]
pub struct LocalApic {
    config: ApicConfig,
    apic_base: u64,
    xapic_id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer: Timer,
    nmi_pending: bool,
    now: u64,
    effects: Vec<ApicEffect>,
    effects_dropped: u64,
}

impl LocalApic {
    /// An APIC in its power-up state: enabled in xAPIC mode at [`MMIO_BASE`], software
    /// disabled (SVR 0xff), every LVT masked.
    pub fn new(config: ApicConfig) -> Result<LocalApic, ApicError> {
        if config.tsc_hz == 0 || config.bus_hz == 0 {
            return Err(ApicError::BadFrequency);
        }
        let mut apic = LocalApic {
            config,
            apic_base: MMIO_BASE
                | APIC_BASE_ENABLE
                | if config.bootstrap { APIC_BASE_BSP } else { 0 },
            xapic_id: config.apic_id as u8,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xff,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer: Timer::default(),
            nmi_pending: false,
            now: 0,
            effects: Vec::new(),
            effects_dropped: 0,
        };
        apic.reset_registers();
        Ok(apic)
    }

    /// The register state of a reset (power-up, or a global disable).
    fn reset_registers(&mut self) {
        self.xapic_id = self.config.apic_id as u8;
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xff;
        self.isr = VectorSet::default();
        self.tmr = VectorSet::default();
        self.irr = VectorSet::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer = Timer::default();
        self.nmi_pending = false;
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &ApicConfig {
        &self.config
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Globally enabled (IA32_APIC_BASE.EN).
    pub fn enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// In x2APIC mode.
    pub fn x2apic_mode(&self) -> bool {
        self.enabled() && self.apic_base & APIC_BASE_EXTD != 0
    }

    /// Software enabled (SVR bit 8) and globally enabled.
    pub fn software_enabled(&self) -> bool {
        self.enabled() && self.svr & SVR_ENABLE != 0
    }

    /// Where the xAPIC page is, when the APIC is in xAPIC mode (`None` when disabled or in
    /// x2APIC mode: the VMM then lets the range be ordinary memory or unbacked).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.enabled() && !self.x2apic_mode()).then_some(self.apic_base & APIC_BASE_ADDRESS_MASK)
    }

    /// The APIC id as the current mode reports it (x2APIC: 32 bits; xAPIC: bits 31:24 of ID).
    pub fn id(&self) -> u32 {
        if self.x2apic_mode() {
            self.config.apic_id
        } else {
            u32::from(self.xapic_id)
        }
    }

    /// The task priority.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// The processor priority: TPR, or the in-service priority class if that is higher.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The logical destination register as the current mode reports it.
    pub fn ldr(&self) -> u32 {
        if self.x2apic_mode() {
            let id = self.config.apic_id;
            ((id >> 4) << 16) | (1 << (id & 0xf))
        } else {
            self.ldr
        }
    }

    /// An LVT entry.
    pub fn lvt(&self, entry: Lvt) -> u32 {
        self.lvt[entry as usize]
    }

    /// Whether `vector` is requested (IRR), in service (ISR), or level-triggered (TMR).
    pub fn vector_state(&self, vector: u8) -> (bool, bool, bool) {
        (
            self.irr.contains(vector),
            self.isr.contains(vector),
            self.tmr.contains(vector),
        )
    }

    /// The ESR as the guest last latched it.
    pub fn esr(&self) -> u32 {
        self.esr
    }

    /// Effects that did not fit in the queue (the VMM drained too rarely).
    pub fn effects_dropped(&self) -> u64 {
        self.effects_dropped
    }

    /// Take the queued effects, oldest first.
    pub fn take_effects(&mut self) -> Vec<ApicEffect> {
        core::mem::take(&mut self.effects)
    }

    fn push_effect(&mut self, effect: ApicEffect) {
        if self.effects.len() >= EFFECT_CAPACITY {
            self.effects.remove(0);
            self.effects_dropped += 1;
        }
        self.effects.push(effect);
    }

    // --- interrupts --------------------------------------------------------------------

    /// The vector to inject now: the highest requested one whose priority class is above the
    /// PPR's (`None` while the APIC is disabled in hardware or software).
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.software_enabled() {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// The vector was injected: move it from IRR to ISR. False if it was not requested.
    pub fn accept(&mut self, vector: u8) -> bool {
        if !self.irr.contains(vector) {
            return false;
        }
        self.irr.clear(vector);
        self.isr.set(vector);
        true
    }

    /// Whether the guest may end, without telling, the interrupt it will have in service in
    /// the next run, with `requested` the vector offered to it as the virtual interrupt
    /// (KVM's paravirtual EOI): exactly one vector is in service or requested, so the guest's
    /// first EOI can only be for it, and it is edge-triggered (a level-triggered one's EOI
    /// must reach the IOAPIC now). Then [`LocalApic::deferred_end_of_interrupt`] does the EOI
    /// once the VMM sees the guest's flag cleared.
    pub fn eoi_may_be_deferred(&self, requested: Option<u8>) -> bool {
        let only = match (requested, self.isr.single()) {
            (Some(vector), Single::Empty) => vector,
            (None, Single::One(vector)) => vector,
            _ => return false,
        };
        !self.tmr.contains(only)
    }

    /// The guest ended its interrupt through the paravirtual flag: the same as a write of the
    /// EOI register.
    pub fn deferred_end_of_interrupt(&mut self) {
        self.end_of_interrupt();
    }

    /// An NMI waits for injection.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// The NMI was injected.
    pub fn accept_nmi(&mut self) {
        self.nmi_pending = false;
    }

    /// An interrupt message for this APIC (from the IOAPIC, or the VMM): fixed and
    /// lowest-priority set IRR (and TMR for level-triggered ones), NMI becomes pending, INIT
    /// and SIPI are recorded as effects, SMI and ExtINT are dropped (no SMM, no PIC).
    pub fn deliver(&mut self, vector: u8, mode: DeliveryMode, level_triggered: bool) {
        if !self.enabled() {
            return;
        }
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.request(vector, level_triggered)
            }
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::Init | DeliveryMode::StartUp => self.push_effect(ApicEffect::Ipi(Ipi {
                vector,
                mode,
                destination: self.id(),
                logical: false,
                shorthand: Shorthand::SelfOnly,
                assert: true,
                level_triggered,
            })),
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    /// Set IRR (vectors below 16 are refused with a receive-illegal-vector error).
    fn request(&mut self, vector: u8, level_triggered: bool) {
        if vector < 16 {
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
    }

    fn signal_error(&mut self, bits: u32) {
        let new = bits & !self.esr_pending;
        self.esr_pending |= bits;
        let lvt = self.lvt[Lvt::Error as usize];
        if new != 0 && lvt & LVT_MASKED == 0 && lvt as u8 >= 16 {
            self.irr.set(lvt as u8);
            self.tmr.clear(lvt as u8);
        }
    }

    /// An edge on LINT0 or LINT1 (`pin` 0 or 1), delivered as its LVT entry says unless
    /// masked: fixed sets IRR (level-triggered if the entry says so), NMI becomes pending.
    pub fn local_interrupt(&mut self, pin: u8) {
        let entry = match pin {
            0 => self.lvt[Lvt::Lint0 as usize],
            1 => self.lvt[Lvt::Lint1 as usize],
            _ => return,
        };
        if entry & LVT_MASKED != 0 || !self.software_enabled() {
            return;
        }
        let level = entry & (1 << 15) != 0 && pin == 0;
        match DeliveryMode::from_bits(u64::from(entry)) {
            DeliveryMode::Fixed => self.request(entry as u8, level),
            DeliveryMode::Nmi => self.nmi_pending = true,
            _ => {}
        }
    }

    /// Whether this APIC is addressed by an 8-bit destination of an IOAPIC (or MSI) message:
    /// 0xff is the broadcast; in x2APIC mode a physical destination is the id and a logical one
    /// a cluster-0 bitmap.
    pub fn accepts_message(&self, destination: u8, logical: bool) -> bool {
        if destination == 0xff {
            return true;
        }
        self.accepts(u32::from(destination), logical)
    }

    /// Whether this APIC is addressed by an ICR destination (32 bits in x2APIC mode, 8 in
    /// xAPIC mode): physical mode matches the id or the broadcast id (all ones); logical mode
    /// matches the LDR (x2APIC cluster; xAPIC flat or cluster as DFR says).
    pub fn accepts(&self, destination: u32, logical: bool) -> bool {
        if self.x2apic_mode() {
            if destination == u32::MAX {
                return true;
            }
            if !logical {
                return destination == self.config.apic_id;
            }
            let ldr = self.ldr();
            destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0
        } else {
            let destination = destination & 0xff;
            if destination == 0xff {
                return true;
            }
            if !logical {
                return destination == u32::from(self.xapic_id);
            }
            let logical_id = self.ldr >> 24;
            if self.dfr >> 28 == 0xf {
                destination & logical_id != 0
            } else {
                destination >> 4 == logical_id >> 4 && destination & logical_id & 0xf != 0
            }
        }
    }

    fn end_of_interrupt(&mut self) {
        if let Some(vector) = self.isr.highest() {
            self.isr.clear(vector);
            if self.tmr.contains(vector) {
                self.tmr.clear(vector);
                self.push_effect(ApicEffect::EoiBroadcast(vector));
            }
        }
    }

    /// Send the ICR's interrupt (`destination` already taken from the mode's field).
    fn send_ipi(&mut self, low: u32, destination: u32) {
        let vector = low as u8;
        let mode = DeliveryMode::from_bits(u64::from(low));
        let logical = low & (1 << 11) != 0;
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        let ipi = Ipi {
            vector,
            mode,
            destination,
            logical,
            shorthand,
            assert: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
        };
        let vectored = matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority);
        if vectored && vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let to_self = match shorthand {
            Shorthand::None => self.accepts(destination, logical),
            Shorthand::SelfOnly | Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => false,
        };
        let only_self = shorthand == Shorthand::SelfOnly
            || (shorthand == Shorthand::None && !logical && destination == self.id());
        let init_or_startup = matches!(mode, DeliveryMode::Init | DeliveryMode::StartUp);
        if !only_self || init_or_startup {
            self.push_effect(ApicEffect::Ipi(ipi));
        }
        if to_self {
            match mode {
                DeliveryMode::Fixed | DeliveryMode::LowestPriority => self.request(vector, false),
                DeliveryMode::Nmi => self.nmi_pending = true,
                _ => {}
            }
        }
    }

    // --- timer -------------------------------------------------------------------------

    fn timer_mode(&self) -> u32 {
        self.lvt[Lvt::Timer as usize] & LVT_TIMER_MODE_MASK
    }

    fn deadline_mode(&self) -> bool {
        self.timer_mode() == LVT_TIMER_TSC_DEADLINE
    }

    fn periodic(&self) -> bool {
        self.timer_mode() == LVT_TIMER_PERIODIC
    }

    /// The divide configuration's divisor (1 to 128).
    pub fn timer_divisor(&self) -> u64 {
        let d = self.timer.divide;
        let code = (d & 3) | ((d >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// Timer counts elapsed since `start` at `now`.
    fn elapsed_counts(&self, now: u64) -> u128 {
        u128::from(now.saturating_sub(self.timer.start)) * u128::from(self.config.bus_hz)
            / (u128::from(self.config.tsc_hz) * u128::from(self.timer_divisor()))
    }

    /// Expirations since `start` by `now` (counting modes).
    fn expirations(&self, now: u64) -> u64 {
        if !self.timer.armed {
            return 0;
        }
        let counts = self.elapsed_counts(now);
        let first = u128::from(self.timer.count_at_start);
        if counts < first {
            0
        } else if self.periodic() {
            let later = (counts - first) / u128::from(self.timer.initial.max(1));
            u64::try_from(later + 1).unwrap_or(u64::MAX)
        } else {
            1
        }
    }

    /// The TSC at which expiration `k` (from 1) since `start` happens.
    fn expiry_tsc(&self, k: u64) -> u64 {
        let counts = u128::from(self.timer.count_at_start)
            + u128::from(k - 1) * u128::from(self.timer.initial);
        let numerator = counts * u128::from(self.timer_divisor()) * u128::from(self.config.tsc_hz);
        let ticks = numerator.div_ceil(u128::from(self.config.bus_hz));
        u64::try_from(u128::from(self.timer.start) + ticks).unwrap_or(u64::MAX)
    }

    /// The current-count register at `now`.
    fn current_count(&self, now: u64) -> u32 {
        if !self.timer.armed || self.deadline_mode() {
            return 0;
        }
        let counts = self.elapsed_counts(now);
        let first = u128::from(self.timer.count_at_start);
        if counts < first {
            (first - counts) as u32
        } else if self.periodic() {
            let initial = u128::from(self.timer.initial.max(1));
            (initial - (counts - first) % initial) as u32
        } else {
            0
        }
    }

    /// Restart counting at `now` from the current count (divide or mode changes).
    fn rebase(&mut self, now: u64) {
        let count = self.current_count(now);
        self.timer.start = now;
        self.timer.count_at_start = count;
        self.timer.fired = 0;
        self.timer.armed = count != 0;
    }

    fn timer_interrupt(&mut self) {
        let lvt = self.lvt[Lvt::Timer as usize];
        if lvt & LVT_MASKED == 0 {
            self.request(lvt as u8, false);
        }
    }

    /// Let time pass until `now` (the guest's TSC): expired timers raise their interrupt
    /// (several periods missed raise it once, as IRR is one bit).
    pub fn advance(&mut self, now: u64) {
        self.now = self.now.max(now);
        let now = self.now;
        if self.deadline_mode() {
            if self.timer.deadline != 0 && now >= self.timer.deadline {
                self.timer.deadline = 0;
                self.timer_interrupt();
            }
        } else if self.timer.armed {
            let expired = self.expirations(now);
            if expired > self.timer.fired {
                self.timer.fired = expired;
                if !self.periodic() {
                    self.timer.armed = false;
                }
                self.timer_interrupt();
            }
        }
    }

    /// The latest `now` the APIC was given.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The TSC at which the timer next raises an interrupt (`None` if disarmed or masked):
    /// the VMM runs the vCPU no longer than that and then calls [`LocalApic::advance`].
    pub fn next_deadline(&self) -> Option<u64> {
        if self.lvt[Lvt::Timer as usize] & LVT_MASKED != 0 {
            return None;
        }
        if self.deadline_mode() {
            (self.timer.deadline != 0).then_some(self.timer.deadline)
        } else if self.timer.armed {
            Some(self.expiry_tsc(self.timer.fired + 1))
        } else {
            None
        }
    }

    fn write_lvt(&mut self, index: usize, value: u32, now: u64) {
        let mut value = value & LVT_WRITABLE[index];
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        if index == Lvt::Timer as usize {
            let old_mode = self.timer_mode();
            let new_mode = value & LVT_TIMER_MODE_MASK;
            if old_mode != new_mode {
                if (old_mode == LVT_TIMER_TSC_DEADLINE) != (new_mode == LVT_TIMER_TSC_DEADLINE) {
                    // Switching between counting and TSC-deadline disarms the timer.
                    self.timer.armed = false;
                    self.timer.initial = 0;
                    self.timer.deadline = 0;
                } else {
                    self.rebase(now);
                }
            }
        }
        self.lvt[index] = value;
    }

    fn write_timer_initial(&mut self, value: u32, now: u64) {
        if self.deadline_mode() {
            return;
        }
        self.timer.initial = value;
        self.timer.start = now;
        self.timer.count_at_start = value;
        self.timer.fired = 0;
        self.timer.armed = value != 0;
    }

    /// IA32_TSC_DEADLINE as the guest reads it (0 unless armed in TSC-deadline mode).
    pub fn tsc_deadline(&self) -> u64 {
        if self.deadline_mode() {
            self.timer.deadline
        } else {
            0
        }
    }

    /// A guest write of IA32_TSC_DEADLINE at `now`: arms (non-zero) or disarms (0) the timer
    /// in TSC-deadline mode; ignored in the other modes. A deadline already past fires at once.
    pub fn set_tsc_deadline(&mut self, value: u64, now: u64) {
        self.advance(now);
        if self.deadline_mode() {
            self.timer.deadline = value;
            self.advance(now);
        }
    }

    // --- registers ---------------------------------------------------------------------

    fn read_register(&self, register: Register) -> u32 {
        match register {
            Register::Id => {
                if self.x2apic_mode() {
                    self.config.apic_id
                } else {
                    u32::from(self.xapic_id) << 24
                }
            }
            Register::Version => VERSION,
            Register::Tpr => u32::from(self.tpr),
            Register::Apr | Register::Rrd | Register::Eoi | Register::SelfIpi => 0,
            Register::Ppr => u32::from(self.ppr()),
            Register::Ldr => self.ldr(),
            Register::Dfr => self.dfr,
            Register::Svr => self.svr,
            Register::Isr(i) => self.isr.0[i],
            Register::Tmr(i) => self.tmr.0[i],
            Register::Irr(i) => self.irr.0[i],
            Register::Esr => self.esr,
            Register::IcrLow => self.icr_low,
            Register::IcrHigh => self.icr_high,
            Register::Lvt(i) => self.lvt[i],
            Register::TimerInitial => self.timer.initial,
            Register::TimerCurrent => self.current_count(self.now),
            Register::TimerDivide => self.timer.divide,
        }
    }

    /// Writes both modes share (read-only registers are filtered by the caller).
    fn write_register(&mut self, register: Register, value: u32, now: u64) {
        match register {
            Register::Id => self.xapic_id = (value >> 24) as u8,
            Register::Tpr => self.tpr = value as u8,
            Register::Eoi => self.end_of_interrupt(),
            Register::Ldr => self.ldr = value & 0xff00_0000,
            Register::Dfr => self.dfr = value | 0x0fff_ffff,
            Register::Svr => {
                self.svr = value & 0x3ff;
                if value & SVR_ENABLE == 0 {
                    for entry in self.lvt.iter_mut() {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            Register::Esr => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            Register::IcrLow => {
                self.icr_low = value & !(1 << 12);
                let destination = self.icr_high >> 24;
                self.send_ipi(self.icr_low, destination);
            }
            Register::IcrHigh => self.icr_high = value & 0xff00_0000,
            Register::Lvt(i) => self.write_lvt(i, value, now),
            Register::TimerInitial => self.write_timer_initial(value, now),
            Register::TimerDivide => {
                // Count at the old divisor up to now, at the new one from now on.
                self.advance(now);
                if self.timer.armed {
                    self.rebase(now);
                }
                self.timer.divide = value & 0xb;
            }
            Register::SelfIpi => self.request(value as u8, false),
            Register::Version
            | Register::Apr
            | Register::Ppr
            | Register::Rrd
            | Register::Isr(_)
            | Register::Tmr(_)
            | Register::Irr(_)
            | Register::TimerCurrent => {}
        }
    }

    /// An xAPIC register read at `offset` of the page (32-bit registers at 16-byte steps).
    pub fn xapic_read(&mut self, offset: u64, now: u64) -> u32 {
        self.advance(now);
        match Register::decode(offset) {
            Some(Register::SelfIpi) | None => {
                self.signal_error(ESR_ILLEGAL_REGISTER);
                0
            }
            Some(register) => self.read_register(register),
        }
    }

    /// An xAPIC register write at `offset` of the page.
    pub fn xapic_write(&mut self, offset: u64, value: u32, now: u64) {
        self.advance(now);
        match Register::decode(offset) {
            Some(Register::SelfIpi) | None => self.signal_error(ESR_ILLEGAL_REGISTER),
            Some(register) if register.read_only(false) => {}
            Some(register) => self.write_register(register, value, now),
        }
        self.advance(now);
    }

    fn x2apic_register(&self, msr: u32) -> Result<Register, ApicError> {
        if !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) || !self.x2apic_mode() {
            return Err(ApicError::NoSuchRegister(msr));
        }
        match Register::decode(u64::from(msr - MSR_X2APIC_FIRST) << 4) {
            None
            | Some(Register::Apr)
            | Some(Register::Rrd)
            | Some(Register::Dfr)
            | Some(Register::IcrHigh) => Err(ApicError::NoSuchRegister(msr)),
            Some(register) => Ok(register),
        }
    }

    /// Whether an MSR belongs to the APIC ([`LocalApic::msr_read`] answers it).
    pub fn handles_msr(msr: u32) -> bool {
        msr == MSR_APIC_BASE
            || msr == MSR_TSC_DEADLINE
            || (MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr)
    }

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register at `now`.
    pub fn msr_read(&mut self, msr: u32, now: u64) -> Result<u64, ApicError> {
        self.advance(now);
        match msr {
            MSR_APIC_BASE => return Ok(self.apic_base),
            MSR_TSC_DEADLINE => return Ok(self.tsc_deadline()),
            _ => {}
        }
        match self.x2apic_register(msr)? {
            Register::Eoi | Register::SelfIpi => Err(ApicError::WriteOnly(msr)),
            Register::IcrLow => Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
            register => Ok(u64::from(self.read_register(register))),
        }
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register at `now`.
    pub fn msr_write(&mut self, msr: u32, value: u64, now: u64) -> Result<(), ApicError> {
        self.advance(now);
        match msr {
            MSR_APIC_BASE => return self.write_apic_base(value),
            MSR_TSC_DEADLINE => {
                self.set_tsc_deadline(value, now);
                return Ok(());
            }
            _ => {}
        }
        let register = self.x2apic_register(msr)?;
        if register.read_only(true) {
            return Err(ApicError::ReadOnly(msr));
        }
        if register == Register::IcrLow {
            self.icr_low = value as u32 & !(1 << 12);
            self.icr_high = (value >> 32) as u32;
            self.send_ipi(self.icr_low, self.icr_high);
            return Ok(());
        }
        let zero_only = matches!(register, Register::Eoi | Register::Esr);
        if value >> 32 != 0 || (zero_only && value != 0) {
            return Err(ApicError::ReservedBits(msr, value));
        }
        self.write_register(register, value as u32, now);
        self.advance(now);
        Ok(())
    }

    /// A write of IA32_APIC_BASE: the base address and the mode. Legal transitions are
    /// disabled <-> xAPIC, xAPIC -> x2APIC and x2APIC -> disabled; disabling resets the
    /// registers. The BSP bit keeps its value.
    fn write_apic_base(&mut self, value: u64) -> Result<(), ApicError> {
        let reserved =
            !(APIC_BASE_ADDRESS_MASK | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_ENABLE);
        let enable = value & APIC_BASE_ENABLE != 0;
        let extd = value & APIC_BASE_EXTD != 0;
        // Illegal: EXTD without EN, x2APIC straight to xAPIC, disabled straight to x2APIC.
        let illegal = matches!(
            (self.enabled(), self.x2apic_mode(), enable, extd),
            (_, _, false, true) | (true, true, true, false) | (false, _, true, true)
        );
        if value & reserved != 0 || illegal {
            return Err(ApicError::InvalidApicBase(value));
        }
        let disabling = self.enabled() && !enable;
        self.apic_base = (value & !APIC_BASE_BSP) | (self.apic_base & APIC_BASE_BSP);
        if disabling {
            self.reset_registers();
        }
        Ok(())
    }
}

/// The xAPIC page: 32-bit registers at 16-byte steps; narrower reads see part of a register,
/// writes other than 32 or 64 bits at a register's start are dropped. Time is the latest `now`
/// given (call [`LocalApic::advance`] before dispatching). Nothing answers while the APIC is
/// not in xAPIC mode (reads 0).
impl MmioDevice for LocalApic {
    fn read(&mut self, offset: u64, size: u8) -> u64 {
        if self.mmio_base().is_none() {
            return 0;
        }
        let within = offset & 0xf;
        if within >= 4 {
            return 0;
        }
        let value = u64::from(self.xapic_read(offset & 0xff0, self.now));
        (value >> (8 * within)) & mask(size)
    }

    fn write(&mut self, offset: u64, size: u8, value: u64) {
        if self.mmio_base().is_none() || offset & 0xf != 0 || size < 4 {
            return;
        }
        self.xapic_write(offset & 0xff0, value as u32, self.now);
    }
}

#[cfg(test)]
mod tests;
