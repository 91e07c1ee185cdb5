use super::*;

const TSC_HZ: u64 = 2_000_000_000;

fn apic() -> LocalApic {
    LocalApic::new(ApicConfig {
        apic_id: 0,
        bootstrap: true,
        tsc_hz: TSC_HZ,
        bus_hz: DEFAULT_BUS_HZ,
    })
    .unwrap()
}

/// An APIC in x2APIC mode and software enabled, as Linux leaves it.
fn x2apic() -> LocalApic {
    let mut a = apic();
    a.msr_write(
        MSR_APIC_BASE,
        MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
        0,
    )
    .unwrap();
    a.msr_write(msr(reg::SVR), u64::from(SVR_ENABLE | 0xff), 0)
        .unwrap();
    a
}

fn msr(offset: u64) -> u32 {
    MSR_X2APIC_FIRST + (offset >> 4) as u32
}

#[test]
fn reset_state() {
    let mut a = apic();
    assert_eq!(a.apic_base(), MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP);
    assert_eq!(a.mmio_base(), Some(MMIO_BASE));
    assert!(!a.x2apic_mode() && !a.software_enabled());
    assert_eq!(a.read(reg::VERSION, 4), u64::from(VERSION));
    assert_eq!(a.read(reg::SVR, 4), 0xff);
    assert_eq!(a.read(reg::DFR, 4), 0xffff_ffff);
    for lvt in 0..6 {
        assert_eq!(a.read(reg::LVT_TIMER + 16 * lvt, 4), u64::from(LVT_MASKED));
    }
    assert_eq!(
        LocalApic::new(ApicConfig {
            tsc_hz: 0,
            ..*a.config()
        })
        .err(),
        Some(ApicError::BadFrequency)
    );
}

#[test]
fn apic_base_transitions() {
    let mut a = apic();
    let base = MMIO_BASE | APIC_BASE_BSP;
    // Disabled and enabled x2APIC-only bits are refused; reserved bits too.
    assert!(a
        .msr_write(MSR_APIC_BASE, base | APIC_BASE_EXTD, 0)
        .is_err());
    assert!(a
        .msr_write(MSR_APIC_BASE, base | APIC_BASE_ENABLE | 1, 0)
        .is_err());
    assert!(a
        .msr_write(MSR_APIC_BASE, base | APIC_BASE_ENABLE | (1 << 52), 0)
        .is_err());
    // xAPIC -> x2APIC.
    a.msr_write(MSR_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_EXTD, 0)
        .unwrap();
    assert!(a.x2apic_mode());
    assert_eq!(a.mmio_base(), None);
    // x2APIC -> xAPIC is illegal.
    assert_eq!(
        a.msr_write(MSR_APIC_BASE, base | APIC_BASE_ENABLE, 0),
        Err(ApicError::InvalidApicBase(base | APIC_BASE_ENABLE))
    );
    // x2APIC -> disabled resets; disabled -> x2APIC is illegal; disabled -> xAPIC works.
    a.msr_write(msr(reg::TPR), 0x20, 0).unwrap();
    a.msr_write(MSR_APIC_BASE, base, 0).unwrap();
    assert!(!a.enabled());
    assert!(a
        .msr_write(MSR_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_EXTD, 0)
        .is_err());
    // The BSP bit is not the guest's to change; the base may move.
    a.msr_write(MSR_APIC_BASE, 0xfed0_0000 | APIC_BASE_ENABLE, 0)
        .unwrap();
    assert_eq!(
        a.apic_base(),
        0xfed0_0000 | APIC_BASE_ENABLE | APIC_BASE_BSP
    );
    assert_eq!(a.mmio_base(), Some(0xfed0_0000));
    assert_eq!(a.tpr(), 0);
}

#[test]
fn x2apic_invalid_accesses_are_errors() {
    let mut a = apic();
    // Not in x2APIC mode: every x2APIC MSR is #GP.
    assert_eq!(
        a.msr_read(msr(reg::ID), 0),
        Err(ApicError::NoSuchRegister(0x802))
    );
    let mut a = x2apic();
    assert_eq!(a.msr_read(0x80b, 0), Err(ApicError::WriteOnly(0x80b)));
    assert_eq!(a.msr_read(0x83f, 0), Err(ApicError::WriteOnly(0x83f)));
    for ro in [
        0x802, 0x803, 0x80a, 0x80d, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839,
    ] {
        assert_eq!(
            a.msr_write(ro, 0, 0),
            Err(ApicError::ReadOnly(ro)),
            "{ro:#x}"
        );
    }
    for absent in [
        0x800, 0x801, 0x809, 0x80c, 0x80e, 0x82f, 0x831, 0x83a, 0x840, 0x8ff,
    ] {
        assert_eq!(
            a.msr_read(absent, 0),
            Err(ApicError::NoSuchRegister(absent)),
            "{absent:#x}"
        );
    }
    assert_eq!(
        a.msr_write(0x80b, 1, 0),
        Err(ApicError::ReservedBits(0x80b, 1))
    );
    assert_eq!(
        a.msr_write(0x828, 1, 0),
        Err(ApicError::ReservedBits(0x828, 1))
    );
    assert!(a.msr_write(msr(reg::TPR), 1 << 32, 0).is_err());
    assert!(a.msr_write(0x80b, 0, 0).is_ok());
    assert!(a.msr_write(0x828, 0, 0).is_ok());
    assert!(!LocalApic::handles_msr(0x900) && LocalApic::handles_msr(0x6e0));
}

#[test]
fn x2apic_id_and_logical_destination() {
    let mut a = LocalApic::new(ApicConfig {
        apic_id: 0x12,
        bootstrap: false,
        tsc_hz: TSC_HZ,
        bus_hz: DEFAULT_BUS_HZ,
    })
    .unwrap();
    assert_eq!(a.apic_base() & APIC_BASE_BSP, 0);
    assert_eq!(a.read(reg::ID, 4), 0x12 << 24);
    a.msr_write(
        MSR_APIC_BASE,
        MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
        0,
    )
    .unwrap();
    assert_eq!(a.msr_read(0x802, 0), Ok(0x12));
    assert_eq!(a.msr_read(0x80d, 0), Ok((1 << 16) | (1 << 2)));
    assert!(a.accepts(0x12, false) && !a.accepts(0x13, false));
    assert!(a.accepts(u32::MAX, false));
    assert!(a.accepts((1 << 16) | 0x4, true) && !a.accepts(0x4, true));
    assert!(a.accepts_message(0xff, false) && a.accepts_message(0x12, false));
}

#[test]
fn priorities_accept_and_eoi() {
    let mut a = x2apic();
    a.deliver(0x31, DeliveryMode::Fixed, false);
    a.deliver(0x55, DeliveryMode::Fixed, false);
    assert_eq!(a.pending_vector(), Some(0x55));
    assert!(a.accept(0x55));
    assert!(!a.accept(0x55));
    assert_eq!(a.msr_read(0x80a, 0), Ok(0x50)); // PPR: the in-service class
    assert_eq!(a.pending_vector(), None); // 0x31 is below
    a.deliver(0x5f, DeliveryMode::Fixed, false);
    assert_eq!(a.pending_vector(), None); // same class as in service
    a.deliver(0x61, DeliveryMode::Fixed, false);
    assert_eq!(a.pending_vector(), Some(0x61));
    // TPR above blocks it.
    a.msr_write(msr(reg::TPR), 0x70, 0).unwrap();
    assert_eq!(a.pending_vector(), None);
    assert_eq!(a.ppr(), 0x70);
    a.msr_write(msr(reg::TPR), 0, 0).unwrap();
    assert!(a.accept(0x61));
    assert_eq!(a.msr_read(0x813, 0), Ok(1 << 1)); // ISR word 3 holds 0x61
                                                  // EOI ends the highest in service first.
    a.msr_write(0x80b, 0, 0).unwrap();
    assert_eq!(a.vector_state(0x61), (false, false, false));
    assert_eq!(a.vector_state(0x55), (false, true, false));
    a.msr_write(0x80b, 0, 0).unwrap();
    assert_eq!(a.pending_vector(), Some(0x5f));
    assert!(a.take_effects().is_empty()); // edge: no broadcast
                                          // EOI with nothing in service does nothing.
    a.accept(0x5f);
    a.msr_write(0x80b, 0, 0).unwrap();
    a.msr_write(0x80b, 0, 0).unwrap();
    assert_eq!(a.pending_vector(), Some(0x31));
}

#[test]
fn level_triggered_eoi_is_broadcast() {
    let mut a = x2apic();
    a.deliver(0x40, DeliveryMode::Fixed, true);
    assert_eq!(a.vector_state(0x40), (true, false, true));
    assert_eq!(a.msr_read(0x81a, 0), Ok(1)); // TMR word 2, bit 0
    a.accept(0x40);
    a.msr_write(0x80b, 0, 0).unwrap();
    assert_eq!(a.take_effects(), [ApicEffect::EoiBroadcast(0x40)]);
    assert_eq!(a.vector_state(0x40), (false, false, false));
}

#[test]
fn disabled_apic_injects_nothing() {
    let mut a = apic();
    a.deliver(0x40, DeliveryMode::Fixed, false);
    assert_eq!(a.pending_vector(), None); // software disabled
    a.write(reg::SVR, 4, u64::from(SVR_ENABLE | 0xff));
    assert_eq!(a.pending_vector(), Some(0x40));
    // LVT unmasking works while enabled, and disabling masks every LVT again.
    a.write(reg::LVT_LINT0, 4, 0x700);
    assert_eq!(a.read(reg::LVT_LINT0, 4), 0x700);
    a.write(reg::SVR, 4, 0xff);
    assert_eq!(a.read(reg::LVT_LINT0, 4), 0x1_0700);
    a.write(reg::LVT_LINT0, 4, 0x700);
    assert_eq!(a.lvt(Lvt::Lint0), 0x1_0700);
    // Globally disabled: deliveries are dropped.
    a.msr_write(MSR_APIC_BASE, MMIO_BASE, 0).unwrap();
    a.deliver(0x50, DeliveryMode::Fixed, false);
    assert_eq!(a.vector_state(0x50), (false, false, false));
    assert_eq!(a.read(reg::VERSION, 4), 0); // no page while disabled
}

#[test]
fn self_ipis() {
    let mut a = x2apic();
    a.msr_write(0x83f, 0x41, 0).unwrap();
    assert_eq!(a.pending_vector(), Some(0x41));
    // ICR: physical destination = own id.
    a.msr_write(0x830, 0x42, 0).unwrap();
    assert!(a.vector_state(0x42).0);
    // Shorthand self.
    a.msr_write(0x830, (1 << 18) | 0x43, 0).unwrap();
    assert!(a.vector_state(0x43).0);
    assert!(a.take_effects().is_empty());
    assert_eq!(a.msr_read(0x830, 0), Ok((1 << 18) | 0x43));
    // NMI to self.
    a.msr_write(0x830, 4 << 8, 0).unwrap();
    assert!(a.nmi_pending());
    a.accept_nmi();
    assert!(!a.nmi_pending());
}

#[test]
fn ipis_for_others_and_init_sipi_are_effects() {
    let mut a = x2apic();
    // Fixed to APIC 1: only an effect.
    a.msr_write(0x830, (1 << 32) | 0x44, 0).unwrap();
    assert!(!a.vector_state(0x44).0);
    let effects = a.take_effects();
    assert_eq!(effects.len(), 1);
    let ApicEffect::Ipi(ipi) = effects[0] else {
        panic!("{effects:?}")
    };
    assert_eq!(
        (ipi.vector, ipi.destination, ipi.mode),
        (0x44, 1, DeliveryMode::Fixed)
    );
    // All including self: an effect and a request here.
    a.msr_write(0x830, (2 << 18) | 0x45, 0).unwrap();
    assert!(a.vector_state(0x45).0);
    assert_eq!(a.take_effects().len(), 1);
    // INIT assert, INIT de-assert and SIPI (as Linux sends them) are recorded, never requested.
    a.msr_write(0x830, (1 << 32) | (1 << 15) | (1 << 14) | (5 << 8), 0)
        .unwrap();
    a.msr_write(0x830, (1 << 32) | (1 << 15) | (5 << 8), 0)
        .unwrap();
    a.msr_write(0x830, (1 << 32) | (6 << 8) | 0x9a, 0).unwrap();
    let effects = a.take_effects();
    let modes: Vec<_> = effects
        .iter()
        .map(|e| match e {
            ApicEffect::Ipi(i) => (i.mode, i.assert, i.vector),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        modes,
        [
            (DeliveryMode::Init, true, 0),
            (DeliveryMode::Init, false, 0),
            (DeliveryMode::StartUp, false, 0x9a)
        ]
    );
    assert!(!a.vector_state(0x9a).0);
}

#[test]
fn illegal_vectors_and_the_error_interrupt() {
    let mut a = x2apic();
    a.msr_write(msr(reg::LVT_ERROR), 0xfe, 0).unwrap();
    a.msr_write(0x830, 0x05, 0).unwrap(); // fixed, vector 5: send illegal vector
    assert_eq!(a.msr_read(0x828, 0), Ok(0)); // ESR shows errors after a write
    a.msr_write(0x828, 0, 0).unwrap();
    assert_eq!(a.msr_read(0x828, 0), Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR)));
    assert_eq!(a.pending_vector(), Some(0xfe));
    a.deliver(3, DeliveryMode::Fixed, false);
    a.msr_write(0x828, 0, 0).unwrap();
    assert_eq!(a.esr(), ESR_RECEIVE_ILLEGAL_VECTOR);
    a.msr_write(0x828, 0, 0).unwrap();
    assert_eq!(a.esr(), 0);
}

#[test]
fn local_interrupt_pins() {
    let mut a = x2apic();
    a.local_interrupt(1); // masked
    assert!(!a.nmi_pending());
    a.msr_write(msr(reg::LVT_LINT1), 4 << 8, 0).unwrap();
    a.local_interrupt(1);
    assert!(a.nmi_pending());
    a.msr_write(msr(reg::LVT_LINT0), 0x8030, 0).unwrap(); // fixed, level
    a.local_interrupt(0);
    assert_eq!(a.vector_state(0x30), (true, false, true));
    a.local_interrupt(7);
}

#[test]
fn divide_configuration() {
    let mut a = x2apic();
    let expected = [
        (0x0, 2),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xa, 128),
        (0xb, 1),
    ];
    for (code, divisor) in expected {
        a.msr_write(msr(reg::TIMER_DIVIDE), code, 0).unwrap();
        assert_eq!(a.timer_divisor(), divisor, "{code:#x}");
        assert_eq!(a.msr_read(msr(reg::TIMER_DIVIDE), 0), Ok(code));
    }
}

#[test]
fn one_shot_timer() {
    let mut a = x2apic();
    a.msr_write(msr(reg::LVT_TIMER), 0xec, 0).unwrap();
    a.msr_write(msr(reg::TIMER_DIVIDE), 0, 0).unwrap(); // divide by 2
                                                        // 1000 counts x 2 bus ticks at 1 GHz = 2 us = 4000 TSC ticks at 2 GHz.
    a.msr_write(msr(reg::TIMER_INITIAL), 1000, 100).unwrap();
    assert_eq!(a.next_deadline(), Some(4100));
    assert_eq!(a.msr_read(msr(reg::TIMER_CURRENT), 2100), Ok(500));
    a.advance(4099);
    assert_eq!(a.pending_vector(), None);
    a.advance(4100);
    assert_eq!(a.pending_vector(), Some(0xec));
    assert_eq!(a.next_deadline(), None);
    assert_eq!(a.msr_read(msr(reg::TIMER_CURRENT), 5000), Ok(0));
    assert_eq!(a.msr_read(msr(reg::TIMER_INITIAL), 5000), Ok(1000));
    // Stopping with 0.
    a.msr_write(msr(reg::TIMER_INITIAL), 10, 6000).unwrap();
    a.msr_write(msr(reg::TIMER_INITIAL), 0, 6001).unwrap();
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn periodic_timer() {
    let mut a = x2apic();
    a.msr_write(msr(reg::LVT_TIMER), u64::from(LVT_TIMER_PERIODIC | 0xec), 0)
        .unwrap();
    a.msr_write(msr(reg::TIMER_DIVIDE), 0xb, 0).unwrap(); // divide by 1
    a.msr_write(msr(reg::TIMER_INITIAL), 500, 0).unwrap(); // 1000 TSC ticks
    assert_eq!(a.next_deadline(), Some(1000));
    a.advance(1000);
    assert!(a.accept(0xec));
    assert_eq!(a.next_deadline(), Some(2000));
    assert_eq!(a.msr_read(msr(reg::TIMER_CURRENT), 1500), Ok(250));
    // Missing three periods raises the vector once; the next deadline is the next period.
    a.advance(4500);
    assert_eq!(a.vector_state(0xec), (true, true, false));
    assert_eq!(a.next_deadline(), Some(5000));
    // Mask: no interrupts, no deadline, but counting goes on.
    a.msr_write(0x80b, 0, 4600).unwrap();
    a.accept(0xec);
    a.msr_write(0x80b, 0, 4600).unwrap();
    a.msr_write(
        msr(reg::LVT_TIMER),
        u64::from(LVT_MASKED | LVT_TIMER_PERIODIC | 0xec),
        4600,
    )
    .unwrap();
    assert_eq!(a.next_deadline(), None);
    a.advance(9000);
    assert_eq!(a.pending_vector(), None);
    assert_eq!(a.msr_read(msr(reg::TIMER_CURRENT), 9250), Ok(375));
}

#[test]
fn periodic_to_one_shot_keeps_counting() {
    let mut a = x2apic();
    a.msr_write(msr(reg::LVT_TIMER), u64::from(LVT_TIMER_PERIODIC | 0xec), 0)
        .unwrap();
    a.msr_write(msr(reg::TIMER_DIVIDE), 0xb, 0).unwrap();
    a.msr_write(msr(reg::TIMER_INITIAL), 500, 0).unwrap();
    a.msr_write(msr(reg::LVT_TIMER), 0xec, 400).unwrap(); // one-shot, 300 counts left
    assert_eq!(a.next_deadline(), Some(1000));
    a.advance(1000);
    assert_eq!(a.pending_vector(), Some(0xec));
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn divide_change_keeps_current_count() {
    let mut a = x2apic();
    a.msr_write(msr(reg::LVT_TIMER), 0xec, 0).unwrap();
    a.msr_write(msr(reg::TIMER_DIVIDE), 0xb, 0).unwrap();
    a.msr_write(msr(reg::TIMER_INITIAL), 1000, 0).unwrap();
    // After 400 counts (800 ticks), divide by 4: 600 counts of 8 ticks left.
    a.msr_write(msr(reg::TIMER_DIVIDE), 1, 800).unwrap();
    assert_eq!(a.msr_read(msr(reg::TIMER_CURRENT), 800), Ok(600));
    assert_eq!(a.next_deadline(), Some(800 + 600 * 8));
}

#[test]
fn tsc_deadline_timer() {
    let mut a = x2apic();
    // In one-shot mode the MSR ignores writes and reads 0.
    a.msr_write(MSR_TSC_DEADLINE, 5000, 0).unwrap();
    assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    assert_eq!(a.next_deadline(), None);
    a.msr_write(
        msr(reg::LVT_TIMER),
        u64::from(LVT_TIMER_TSC_DEADLINE | 0xef),
        0,
    )
    .unwrap();
    a.msr_write(MSR_TSC_DEADLINE, 5000, 10).unwrap();
    assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 20), Ok(5000));
    assert_eq!(a.next_deadline(), Some(5000));
    // Initial-count writes are ignored in this mode.
    a.msr_write(msr(reg::TIMER_INITIAL), 7, 20).unwrap();
    assert_eq!(a.msr_read(msr(reg::TIMER_INITIAL), 20), Ok(0));
    a.advance(4999);
    assert_eq!(a.pending_vector(), None);
    a.advance(5000);
    assert_eq!(a.pending_vector(), Some(0xef));
    assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 5001), Ok(0));
    assert_eq!(a.next_deadline(), None);
    a.accept(0xef);
    a.msr_write(0x80b, 0, 5001).unwrap();
    // A deadline in the past fires at once; 0 disarms.
    a.msr_write(MSR_TSC_DEADLINE, 100, 6000).unwrap();
    assert_eq!(a.pending_vector(), Some(0xef));
    a.accept(0xef);
    a.msr_write(0x80b, 0, 6000).unwrap();
    a.msr_write(MSR_TSC_DEADLINE, 9000, 6000).unwrap();
    a.msr_write(MSR_TSC_DEADLINE, 0, 6001).unwrap();
    a.advance(10_000);
    assert_eq!(a.pending_vector(), None);
    // Leaving TSC-deadline mode disarms.
    a.msr_write(MSR_TSC_DEADLINE, 20_000, 10_000).unwrap();
    a.msr_write(msr(reg::LVT_TIMER), 0xef, 10_000).unwrap();
    assert_eq!(a.next_deadline(), None);
    a.msr_write(
        msr(reg::LVT_TIMER),
        u64::from(LVT_TIMER_TSC_DEADLINE | 0xef),
        10_000,
    )
    .unwrap();
    assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 10_000), Ok(0));
}

#[test]
fn xapic_mmio_registers() {
    let mut a = apic();
    a.write(reg::SVR, 4, u64::from(SVR_ENABLE | 0xff));
    assert_eq!(a.read(reg::ID, 4), 0);
    assert_eq!(a.read(reg::VERSION, 1), 0x14);
    assert_eq!(a.read(reg::VERSION + 2, 1), 0x05);
    assert_eq!(a.read(reg::VERSION + 4, 4), 0);
    // LDR and DFR are the guest's in xAPIC mode; flat logical destinations match.
    a.write(reg::LDR, 4, 0x0100_00ff);
    a.write(reg::DFR, 4, 0xffff_ffff);
    assert_eq!(a.read(reg::LDR, 4), 0x0100_0000);
    assert!(a.accepts_message(0x03, true) && !a.accepts_message(0x02, true));
    a.write(reg::DFR, 4, 0x0fff_ffff); // cluster model
    assert_eq!(a.read(reg::DFR, 4), 0x0fff_ffff);
    assert!(a.accepts_message(0x01, true) && !a.accepts_message(0x11, true));
    // Self IPI through ICR high/low; ICR high keeps bits 31:24.
    a.write(reg::ICR_HIGH, 4, 0x00ff_ffff);
    assert_eq!(a.read(reg::ICR_HIGH, 4), 0);
    a.write(reg::ICR_LOW, 4, 0x46);
    assert_eq!(a.pending_vector(), Some(0x46));
    assert_eq!(a.read(reg::IRR + 0x20, 4), 1 << 6);
    // Read-only registers ignore writes; write-only ones read 0.
    a.write(reg::VERSION, 4, 0);
    a.write(reg::PPR, 4, 0xff);
    assert_eq!(a.read(reg::VERSION, 4), u64::from(VERSION));
    assert_eq!(a.read(reg::EOI, 4), 0);
    // Narrow writes are dropped.
    a.write(reg::TPR, 1, 0x30);
    assert_eq!(a.read(reg::TPR, 4), 0);
    a.write(reg::TPR, 4, 0x30);
    assert_eq!(a.read(reg::TPR, 4), 0x30);
    // A reserved offset latches the illegal-register error.
    let _ = a.read(0x3f0, 4);
    a.write(reg::ESR, 4, 0);
    assert_eq!(a.read(reg::ESR, 4), u64::from(ESR_ILLEGAL_REGISTER));
    // The ID is writable in xAPIC mode.
    a.write(reg::ID, 4, 0x0500_0000);
    assert_eq!(a.id(), 5);
    // In x2APIC mode the page is gone.
    a.msr_write(
        MSR_APIC_BASE,
        MMIO_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD,
        0,
    )
    .unwrap();
    assert_eq!(a.read(reg::VERSION, 4), 0);
    assert_eq!(a.id(), 0);
}

#[test]
fn mmio_timer_uses_latest_time() {
    let mut a = apic();
    a.write(reg::SVR, 4, u64::from(SVR_ENABLE | 0xff));
    a.write(reg::LVT_TIMER, 4, 0xec);
    a.write(reg::TIMER_DIVIDE, 4, 0xb);
    a.advance(1000);
    a.write(reg::TIMER_INITIAL, 4, 100);
    assert_eq!(a.next_deadline(), Some(1200));
    a.advance(1100);
    assert_eq!(a.read(reg::TIMER_CURRENT, 4), 50);
    // Time never runs backwards.
    a.advance(10);
    assert_eq!(a.now(), 1100);
}

#[test]
fn effect_queue_is_bounded() {
    let mut a = x2apic();
    for _ in 0..EFFECT_CAPACITY + 3 {
        a.msr_write(0x830, (1 << 32) | 0x50, 0).unwrap();
    }
    assert_eq!(a.take_effects().len(), EFFECT_CAPACITY);
    assert_eq!(a.effects_dropped(), 3);
}
