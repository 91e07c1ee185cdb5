//! The interrupt and time platform of a one-vCPU Linux compartment in one object: the local
//! APIC, the IOAPIC, kvmclock, the CPUID/MSR policy and the MP table that describes them. The
//! VMM's exit loop calls it on CPUID, RDMSR/WRMSR and MMIO exits in the APIC and IOAPIC pages,
//! drives device interrupt lines into it, and before each `VcpuRun` asks [`Platform::tick`]
//! what to inject and [`Platform::next_deadline`] how long the vCPU may run.
//!
//! Interrupt routing happens inside: IOAPIC messages go to the local APIC if it accepts their
//! destination (others are counted in [`Platform::dropped_deliveries`]), and the APIC's EOI
//! broadcasts go back to the IOAPIC. IPIs for other vCPUs, INIT and SIPI wait in
//! [`Platform::take_ipis`] for a multi-vCPU VMM.
//!
//! Every error is a #GP for the guest ([`PlatformError`]).

use crate::cpuid_linux::{LinuxCpuid, LinuxMsrs, MsrError};
use crate::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use crate::kvmclock::{ClockError, GuestWrite, KvmClock};
use crate::lapic::{ApicConfig, ApicEffect, ApicError, Ipi, LocalApic, MMIO_SIZE};
use crate::mmio::MmioDevice;
use crate::mptable::{self, MpConfig, MpError};
use alloc::vec::Vec;
use core::fmt;

/// KVM's paravirtual EOI MSR: the guest-physical address of a flag (4-byte aligned) and bit 0
/// to enable it. While the VMM sets bit 0 of the flag's byte, the guest may end its interrupt
/// by clearing it instead of writing the EOI register (one exit fewer per interrupt); the VMM
/// does the EOI when it sees the bit cleared ([`Platform::deferred_eoi`]).
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// How many IPIs are kept for [`Platform::take_ipis`] before the oldest are dropped.
pub const IPI_CAPACITY: usize = 64;

/// What the platform is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformConfig {
    /// TSC ticks per second (1 GHz under QEMU `-icount shift=0`).
    pub tsc_hz: u64,
    /// APIC timer input ticks per second.
    pub bus_hz: u64,
    /// The TSC at which the guest's system time is 0.
    pub boot_tsc: u64,
    /// Wall-clock time at `boot_tsc`, nanoseconds since the Unix epoch (0 if unknown).
    pub boot_wall_nanoseconds: u64,
}

/// A refused access; the VMM injects #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformError {
    /// Refused by the local APIC.
    Apic(ApicError),
    /// Refused by kvmclock.
    Clock(ClockError),
    /// Refused by the MSR policy.
    Msr(MsrError),
    /// The MP table could not be built.
    MpTable(MpError),
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::Apic(e) => e.fmt(f),
            PlatformError::Clock(e) => e.fmt(f),
            PlatformError::Msr(e) => e.fmt(f),
            PlatformError::MpTable(e) => e.fmt(f),
        }
    }
}

impl From<ApicError> for PlatformError {
    fn from(e: ApicError) -> Self {
        PlatformError::Apic(e)
    }
}

impl From<ClockError> for PlatformError {
    fn from(e: ClockError) -> Self {
        PlatformError::Clock(e)
    }
}

impl From<MsrError> for PlatformError {
    fn from(e: MsrError) -> Self {
        PlatformError::Msr(e)
    }
}

/// The platform of one vCPU.
#[derive(Debug, Clone)]
pub struct Platform {
    /// The local APIC (APIC id 0, the bootstrap processor).
    pub lapic: LocalApic,
    /// The IOAPIC (id 1, after the CPU, as the MP table says).
    pub ioapic: IoApic,
    /// kvmclock.
    pub kvmclock: KvmClock,
    /// The MSRs of the Linux policy.
    pub msrs: LinuxMsrs,
    /// The CPUID policy.
    pub cpuid: LinuxCpuid,
    mp: MpConfig,
    ipis: Vec<Ipi>,
    dropped_deliveries: u64,
    /// The value of [`MSR_KVM_PV_EOI_EN`].
    pv_eoi: u64,
}

impl Platform {
    /// The platform in its reset state.
    pub fn new(config: PlatformConfig) -> Result<Platform, PlatformError> {
        let mp = MpConfig::new(1);
        let lapic = LocalApic::new(ApicConfig {
            apic_id: 0,
            bootstrap: true,
            tsc_hz: config.tsc_hz,
            bus_hz: config.bus_hz,
        })?;
        let kvmclock = KvmClock::new(config.tsc_hz, config.boot_tsc, config.boot_wall_nanoseconds)?;
        Ok(Platform {
            lapic,
            ioapic: IoApic::new(mp.ioapic_id),
            kvmclock,
            msrs: LinuxMsrs::new(),
            cpuid: LinuxCpuid {
                apic_id: 0,
                vcpus: 1,
                tsc_khz: u32::try_from(config.tsc_hz / 1000).unwrap_or(u32::MAX),
                bus_khz: u32::try_from(config.bus_hz / 1000).unwrap_or(u32::MAX),
            },
            mp,
            ipis: Vec::new(),
            dropped_deliveries: 0,
            pv_eoi: 0,
        })
    }

    /// The MP table describing this platform, to be placed at guest-physical `base`.
    pub fn mp_table(&self, base: u64) -> Result<Vec<u8>, PlatformError> {
        mptable::build(&self.mp, base).map_err(PlatformError::MpTable)
    }

    /// The CPUID answer (see [`LinuxCpuid::answer`]).
    pub fn cpuid(&self, leaf: u32, subleaf: u32, host: [u32; 4], guest_cr4: u64) -> [u32; 4] {
        self.cpuid.answer(leaf, subleaf, host, guest_cr4)
    }

    /// RDMSR at TSC `now`.
    pub fn msr_read(&mut self, msr: u32, now: u64) -> Result<u64, PlatformError> {
        if LocalApic::handles_msr(msr) {
            return Ok(self.lapic.msr_read(msr, now)?);
        }
        if let Some(value) = self.kvmclock.msr_read(msr) {
            return Ok(value);
        }
        if msr == MSR_KVM_PV_EOI_EN {
            return Ok(self.pv_eoi);
        }
        Ok(self.msrs.read(msr, now)?)
    }

    /// WRMSR at TSC `now`; kvmclock writes return the structure to store in guest memory.
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Option<GuestWrite>, PlatformError> {
        if LocalApic::handles_msr(msr) {
            self.lapic.msr_write(msr, value, now)?;
            self.route();
            return Ok(None);
        }
        if KvmClock::handles_msr(msr) {
            return Ok(self.kvmclock.msr_write(msr, value, now)?);
        }
        if msr == MSR_KVM_PV_EOI_EN {
            // As KVM: the flag's address must be 4-byte aligned (bit 0 enables it).
            if value & 2 != 0 {
                return Err(MsrError::Invalid(msr, value).into());
            }
            self.pv_eoi = value;
            return Ok(None);
        }
        self.msrs.write(msr, value)?;
        Ok(None)
    }

    /// The guest-physical address of the paravirtual EOI flag, if the guest enabled it.
    pub fn pv_eoi_flag(&self) -> Option<u64> {
        (self.pv_eoi & 1 != 0).then_some(self.pv_eoi & !3)
    }

    /// Whether the guest may end its interrupt through the flag in the next run, with
    /// `requested` the vector offered to it (see [`LocalApic::eoi_may_be_deferred`]): the VMM
    /// sets the flag before the run if so, clears it otherwise.
    pub fn eoi_may_be_deferred(&self, requested: Option<u8>) -> bool {
        self.pv_eoi_flag().is_some() && self.lapic.eoi_may_be_deferred(requested)
    }

    /// The guest cleared the flag the VMM set: its EOI.
    pub fn deferred_eoi(&mut self) {
        self.lapic.deferred_end_of_interrupt();
        self.route();
    }

    /// Whether an MMIO address belongs to the platform (the APIC page while in xAPIC mode, the
    /// IOAPIC page).
    pub fn claims_mmio(&self, address: u64) -> bool {
        self.device_at(address).is_some()
    }

    /// (is the APIC, offset) for an address.
    fn device_at(&self, address: u64) -> Option<(bool, u64)> {
        if let Some(base) = self.lapic.mmio_base() {
            if address.wrapping_sub(base) < MMIO_SIZE {
                return Some((true, address - base));
            }
        }
        (address.wrapping_sub(IOAPIC_BASE) < IOAPIC_SIZE).then(|| (false, address - IOAPIC_BASE))
    }

    /// An MMIO read at TSC `now` (`None` if the address is not the platform's).
    pub fn mmio_read(&mut self, address: u64, size: u8, now: u64) -> Option<u64> {
        let (apic, offset) = self.device_at(address)?;
        self.lapic.advance(now);
        let value = if apic {
            self.lapic.read(offset, size)
        } else {
            self.ioapic.read(offset, size)
        };
        self.route();
        Some(value)
    }

    /// An MMIO write at TSC `now`; false if the address is not the platform's.
    pub fn mmio_write(&mut self, address: u64, size: u8, value: u64, now: u64) -> bool {
        let Some((apic, offset)) = self.device_at(address) else {
            return false;
        };
        self.lapic.advance(now);
        if apic {
            self.lapic.write(offset, size, value);
        } else {
            self.ioapic.write(offset, size, value);
        }
        self.route();
        true
    }

    /// A device drives IOAPIC line `pin`.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) {
        // A line that stays where it is changes nothing (an asserted level-triggered line is
        // sent again at its EOI or unmask, without help from here).
        if self.ioapic.line(pin) == asserted {
            return;
        }
        self.ioapic.set_line(pin, asserted);
        self.route();
    }

    /// Let time pass until TSC `now` and say which vector to inject, if any (the VMM injects
    /// it when the guest can take interrupts and then calls [`Platform::accept`]).
    pub fn tick(&mut self, now: u64) -> Option<u8> {
        self.lapic.advance(now);
        self.route();
        self.lapic.pending_vector()
    }

    /// `vector` was injected.
    pub fn accept(&mut self, vector: u8) -> bool {
        self.lapic.accept(vector)
    }

    /// An NMI waits for injection.
    pub fn nmi_pending(&self) -> bool {
        self.lapic.nmi_pending()
    }

    /// The NMI was injected.
    pub fn accept_nmi(&mut self) {
        self.lapic.accept_nmi();
    }

    /// The TSC by which the VMM must call [`Platform::tick`] again (`None`: no timer armed).
    pub fn next_deadline(&self) -> Option<u64> {
        self.lapic.next_deadline()
    }

    /// IPIs for other vCPUs, INIT and SIPI, oldest first.
    pub fn take_ipis(&mut self) -> Vec<Ipi> {
        core::mem::take(&mut self.ipis)
    }

    /// IOAPIC messages no APIC accepted.
    pub fn dropped_deliveries(&self) -> u64 {
        self.dropped_deliveries
    }

    /// Move messages between the APIC and the IOAPIC until neither has any (an EOI can make
    /// the IOAPIC resend, which cannot cause another EOI, so this ends).
    fn route(&mut self) {
        loop {
            let effects = self.lapic.take_effects();
            if effects.is_empty() && !self.ioapic.has_deliveries() {
                return;
            }
            for effect in effects {
                match effect {
                    ApicEffect::EoiBroadcast(vector) => self.ioapic.end_of_interrupt(vector),
                    ApicEffect::Ipi(ipi) => {
                        if self.ipis.len() >= IPI_CAPACITY {
                            self.ipis.remove(0);
                        }
                        self.ipis.push(ipi);
                    }
                }
            }
            while let Some(d) = self.ioapic.take_delivery() {
                if self.lapic.accepts_message(d.destination, d.logical) {
                    self.lapic.deliver(d.vector, d.mode, d.level_triggered);
                } else {
                    self.dropped_deliveries += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::{ENTRY_LEVEL, ENTRY_MASKED, IOREGSEL, IOWIN, REG_REDIRECTION};
    use crate::kvmclock::MSR_KVM_SYSTEM_TIME_NEW;
    use crate::lapic::{
        DeliveryMode, APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_EXTD, LVT_TIMER_TSC_DEADLINE,
        MMIO_BASE, MSR_APIC_BASE, MSR_TSC_DEADLINE,
    };

    const GHZ: u64 = 1_000_000_000;

    fn platform() -> Platform {
        Platform::new(PlatformConfig {
            tsc_hz: GHZ,
            bus_hz: GHZ,
            boot_tsc: 0,
            boot_wall_nanoseconds: 0,
        })
        .unwrap()
    }

    /// What Linux does first: x2APIC on, APIC software-enabled, timer in TSC-deadline mode.
    fn linux_apic_setup(p: &mut Platform) {
        let base = p.msr_read(MSR_APIC_BASE, 0).unwrap();
        assert_eq!(base, MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP);
        p.msr_write(MSR_APIC_BASE, base | APIC_BASE_EXTD, 0)
            .unwrap();
        p.msr_write(0x80f, 0x1ff, 0).unwrap();
        p.msr_write(0x832, u64::from(LVT_TIMER_TSC_DEADLINE | 0xec), 0)
            .unwrap();
    }

    fn program(p: &mut Platform, pin: u8, entry: u64) {
        let index = u64::from(REG_REDIRECTION + 2 * pin);
        p.mmio_write(IOAPIC_BASE + IOREGSEL, 4, index + 1, 0);
        p.mmio_write(IOAPIC_BASE + IOWIN, 4, entry >> 32, 0);
        p.mmio_write(IOAPIC_BASE + IOREGSEL, 4, index, 0);
        p.mmio_write(IOAPIC_BASE + IOWIN, 4, entry & 0xffff_ffff, 0);
    }

    #[test]
    fn deadline_timer_round_trip() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        assert_eq!(p.next_deadline(), None);
        p.msr_write(MSR_TSC_DEADLINE, 1_000_000, 10).unwrap();
        assert_eq!(p.next_deadline(), Some(1_000_000));
        assert_eq!(p.tick(999_999), None);
        assert_eq!(p.tick(1_000_000), Some(0xec));
        assert!(p.accept(0xec));
        assert_eq!(p.tick(1_000_001), None);
        p.msr_write(0x80b, 0, 1_000_100).unwrap();
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn edge_interrupt_from_a_device() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        program(&mut p, 4, 0x24); // physical, APIC 0
        p.set_irq(4, true);
        assert_eq!(p.tick(5), Some(0x24));
        p.accept(0x24);
        p.set_irq(4, false);
        p.msr_write(0x80b, 0, 6).unwrap();
        assert_eq!(p.tick(7), None);
    }

    #[test]
    fn level_interrupt_is_resent_after_eoi_while_asserted() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        program(&mut p, 10, ENTRY_LEVEL | 0x3a);
        p.set_irq(10, true);
        assert_eq!(p.tick(1), Some(0x3a));
        p.accept(0x3a);
        assert_eq!(p.lapic.vector_state(0x3a), (false, true, true));
        p.msr_write(0x80b, 0, 2).unwrap(); // EOI: broadcast, remote IRR clear, resend
        assert_eq!(p.tick(3), Some(0x3a));
        p.accept(0x3a);
        p.set_irq(10, false); // the handler quietened the device
        p.msr_write(0x80b, 0, 4).unwrap();
        assert_eq!(p.tick(5), None);
        assert_eq!(
            p.ioapic.entry(10).unwrap() & crate::ioapic::ENTRY_REMOTE_IRR,
            0
        );
    }

    #[test]
    fn paravirtual_eoi() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        program(&mut p, 4, 0x31);
        program(&mut p, 10, ENTRY_LEVEL | 0x3a);
        // Not enabled: never deferred. A misaligned flag is refused.
        p.set_irq(4, true);
        assert_eq!(p.tick(1), Some(0x31));
        assert!(!p.eoi_may_be_deferred(Some(0x31)));
        assert!(p.msr_write(MSR_KVM_PV_EOI_EN, 0x1003, 1).is_err());
        p.msr_write(MSR_KVM_PV_EOI_EN, 0x1001, 1).unwrap();
        assert_eq!(p.msr_read(MSR_KVM_PV_EOI_EN, 1), Ok(0x1001));
        assert_eq!(p.pv_eoi_flag(), Some(0x1000));
        // One edge-triggered vector requested, none in service: deferred; taken and ended
        // through the flag, it leaves service as with an EOI write.
        assert!(p.eoi_may_be_deferred(Some(0x31)));
        p.accept(0x31);
        assert!(p.eoi_may_be_deferred(None), "the one vector in service");
        p.deferred_eoi();
        assert_eq!(p.lapic.vector_state(0x31), (false, false, false));
        assert!(
            !p.eoi_may_be_deferred(None),
            "nothing in service or requested"
        );
        // Two at once (one in service, one requested): the guest's EOI could be for either.
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.tick(2), Some(0x31));
        p.accept(0x31);
        p.msr_write(0x80b, 0, 2).unwrap();
        p.msr_write(0x832, u64::from(LVT_TIMER_TSC_DEADLINE | 0xec), 2)
            .unwrap();
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.tick(3), Some(0x31));
        p.accept(0x31);
        p.msr_write(0x6e0, 4, 3).unwrap();
        assert_eq!(
            p.tick(5),
            Some(0xec),
            "the timer, above the vector in service"
        );
        assert!(!p.eoi_may_be_deferred(Some(0xec)));
        p.msr_write(0x80b, 0, 5).unwrap();
        // Level-triggered: its EOI must reach the IOAPIC at once.
        p.set_irq(10, true);
        assert_eq!(p.tick(6), Some(0xec));
        p.accept(0xec);
        p.msr_write(0x80b, 0, 6).unwrap();
        assert_eq!(p.tick(7), Some(0x3a));
        assert!(!p.eoi_may_be_deferred(Some(0x3a)));
        p.accept(0x3a);
        assert!(!p.eoi_may_be_deferred(None));
        // Disabled again.
        p.msr_write(MSR_KVM_PV_EOI_EN, 0, 8).unwrap();
        assert_eq!(p.pv_eoi_flag(), None);
    }

    #[test]
    fn messages_for_other_apics_are_dropped() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        program(&mut p, 5, (7 << 56) | 0x25);
        p.set_irq(5, true);
        assert_eq!(p.tick(1), None);
        assert_eq!(p.dropped_deliveries(), 1);
        program(&mut p, 6, ENTRY_MASKED | 0x26);
        p.set_irq(6, true);
        assert_eq!(p.dropped_deliveries(), 1);
    }

    #[test]
    fn msrs_are_routed() {
        let mut p = platform();
        let write = p
            .msr_write(MSR_KVM_SYSTEM_TIME_NEW, 0x9001, 2 * GHZ)
            .unwrap()
            .unwrap();
        assert_eq!(write.address, 0x9000);
        assert_eq!(p.msr_read(MSR_KVM_SYSTEM_TIME_NEW, 0), Ok(0x9001));
        assert_eq!(p.msr_read(0x277, 0), Ok(crate::cpuid_linux::PAT_RESET));
        assert_eq!(
            p.msr_read(0x179, 0),
            Err(PlatformError::Msr(MsrError::Unknown(0x179)))
        );
        // x2APIC registers before x2APIC mode: #GP from the APIC.
        assert!(matches!(
            p.msr_read(0x803, 0),
            Err(PlatformError::Apic(ApicError::NoSuchRegister(0x803)))
        ));
        assert_eq!(
            p.cpuid(0x4000_0010, 0, [0; 4], 0),
            [1_000_000, 1_000_000, 0, 0]
        );
    }

    #[test]
    fn xapic_page_and_ioapic_page() {
        let mut p = platform();
        assert!(p.claims_mmio(MMIO_BASE + 0x30) && p.claims_mmio(IOAPIC_BASE + 0x10));
        assert!(!p.claims_mmio(MMIO_BASE + 0x1000) && !p.claims_mmio(0));
        assert_eq!(p.mmio_read(MMIO_BASE + 0x30, 4, 0), Some(0x0005_0014));
        assert_eq!(p.mmio_read(0x1000, 4, 0), None);
        assert!(!p.mmio_write(0x1000, 4, 0, 0));
        // Software enable and a self IPI through the page.
        p.mmio_write(MMIO_BASE + 0xf0, 4, 0x1ff, 0);
        p.mmio_write(MMIO_BASE + 0x300, 4, 0x4_0051, 0);
        assert_eq!(p.tick(0), Some(0x51));
        // In x2APIC mode the page is no longer the platform's.
        p.msr_write(
            MSR_APIC_BASE,
            MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
            0,
        )
        .unwrap();
        assert!(!p.claims_mmio(MMIO_BASE));
    }

    #[test]
    fn ipis_and_nmis() {
        let mut p = platform();
        linux_apic_setup(&mut p);
        p.msr_write(0x830, (1 << 32) | (5 << 8) | (1 << 14), 0)
            .unwrap(); // INIT to APIC 1
        let ipis = p.take_ipis();
        assert_eq!(ipis.len(), 1);
        assert_eq!((ipis[0].mode, ipis[0].destination), (DeliveryMode::Init, 1));
        p.msr_write(0x830, 4 << 8, 0).unwrap(); // NMI to self
        assert!(p.nmi_pending());
        p.accept_nmi();
        assert!(!p.nmi_pending());
    }

    #[test]
    fn mp_table_matches_the_ioapic() {
        let p = platform();
        let table = p.mp_table(0xf_0000).unwrap();
        assert_eq!(&table[0..4], b"_MP_");
        assert_eq!(p.ioapic.id(), 1);
        assert!(p.mp_table(0xf_0001).is_err());
        assert!(Platform::new(PlatformConfig {
            tsc_hz: 0,
            bus_hz: GHZ,
            boot_tsc: 0,
            boot_wall_nanoseconds: 0
        })
        .is_err());
    }
}
