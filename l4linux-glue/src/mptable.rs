//! The MultiProcessor Specification 1.4 table a guest without ACPI needs: Linux finds its CPUs,
//! the IOAPIC and the ISA interrupt routing there (without it the IOAPIC stays off). The VMM
//! places the result in guest memory that the E820 map reserves (the BIOS area at 0xF0000).
//!
//! Layout: a 16-byte floating pointer ("_MP_") immediately followed by the configuration table
//! ("PCMP"): one processor entry per vCPU, an ISA bus, one IOAPIC, one I/O interrupt entry per
//! ISA IRQ (IRQ n to IOAPIC pin n, edge/high as the bus conforms), and the local APIC's LINT0
//! as ExtINT and LINT1 as NMI.

use alloc::vec::Vec;
use core::fmt;

/// Signature of the MP floating pointer structure.
pub const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
/// Signature of the MP configuration table.
pub const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
/// Specification revision 1.4.
pub const SPEC_REV: u8 = 4;
/// Where the table says the local APICs are.
pub const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;
/// Where the table says the IOAPIC is.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// Bytes of the floating pointer structure.
pub const FLOATING_SIZE: usize = 16;
/// Bytes of the configuration table header.
pub const HEADER_SIZE: usize = 44;
/// Bytes of a processor entry.
pub const PROCESSOR_SIZE: usize = 20;
/// Bytes of every other entry (bus, IOAPIC, interrupt assignments).
pub const SMALL_ENTRY_SIZE: usize = 8;

/// Entry type: a processor.
pub const ENTRY_PROCESSOR: u8 = 0;
/// Entry type: a bus.
pub const ENTRY_BUS: u8 = 1;
/// Entry type: an IOAPIC.
pub const ENTRY_IOAPIC: u8 = 2;
/// Entry type: an interrupt routed to an IOAPIC pin.
pub const ENTRY_IO_INTERRUPT: u8 = 3;
/// Entry type: an interrupt routed to a local APIC pin (LINT0/LINT1).
pub const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt type: vectored (INT).
pub const INT_VECTORED: u8 = 0;
/// Interrupt type: NMI.
pub const INT_NMI: u8 = 1;
/// Interrupt type: ExtINT (from an 8259).
pub const INT_EXTINT: u8 = 3;

/// What the table describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpConfig {
    /// vCPUs, with local APIC ids 0..cpus; the first is the bootstrap processor.
    pub cpus: u8,
    /// The IOAPIC's id (after the CPUs' ids).
    pub ioapic_id: u8,
    /// The IOAPIC's number of pins.
    pub ioapic_pins: u8,
    /// ISA IRQs routed, 0..isa_irqs, each to the IOAPIC pin of the same number.
    pub isa_irqs: u8,
}

impl MpConfig {
    /// `cpus` vCPUs, an IOAPIC with 24 pins after them, 16 ISA IRQs.
    pub fn new(cpus: u8) -> Self {
        Self {
            cpus,
            ioapic_id: cpus,
            ioapic_pins: 24,
            isa_irqs: 16,
        }
    }
}

/// Why a table cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpError {
    /// No CPUs, or more than fit in 8-bit APIC ids next to the IOAPIC (and broadcast 0xff).
    BadCpuCount(u8),
    /// The IOAPIC id collides with a CPU's, or is the broadcast id.
    BadIoapicId(u8),
    /// More ISA IRQs routed than the IOAPIC has pins, or more than 16.
    BadIrqCount(u8),
    /// The table must start 16-byte aligned and end below 1 MiB (where Linux looks).
    BadPlacement(u64),
}

impl fmt::Display for MpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MpError::BadCpuCount(n) => write!(f, "MP table: {n} CPUs (1..=254)"),
            MpError::BadIoapicId(id) => write!(f, "MP table: IOAPIC id {id} is taken"),
            MpError::BadIrqCount(n) => write!(f, "MP table: {n} ISA IRQs do not fit"),
            MpError::BadPlacement(a) => {
                write!(f, "MP table at {a:#x}: must be 16-byte aligned below 1 MiB")
            }
        }
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Total size of the structures for `config`.
pub fn size(config: &MpConfig) -> usize {
    FLOATING_SIZE
        + HEADER_SIZE
        + PROCESSOR_SIZE * usize::from(config.cpus)
        + SMALL_ENTRY_SIZE * (1 + 1 + usize::from(config.isa_irqs) + 2)
}

/// Build the floating pointer and configuration table to be placed at guest-physical `base`.
pub fn build(config: &MpConfig, base: u64) -> Result<Vec<u8>, MpError> {
    if config.cpus == 0 || config.cpus > 254 {
        return Err(MpError::BadCpuCount(config.cpus));
    }
    if config.ioapic_id < config.cpus || config.ioapic_id == 0xff {
        return Err(MpError::BadIoapicId(config.ioapic_id));
    }
    if config.isa_irqs > 16 || config.isa_irqs > config.ioapic_pins {
        return Err(MpError::BadIrqCount(config.isa_irqs));
    }
    let total = size(config) as u64;
    if !base.is_multiple_of(16) || base.checked_add(total).is_none_or(|end| end > 0x10_0000) {
        return Err(MpError::BadPlacement(base));
    }
    let table_base = base + FLOATING_SIZE as u64;

    let mut t: Vec<u8> = Vec::with_capacity(total as usize);
    // Configuration table header; lengths, count and checksum are filled in below.
    t.extend_from_slice(TABLE_SIGNATURE);
    t.extend_from_slice(&[0, 0, SPEC_REV, 0]);
    t.extend_from_slice(b"L4LINUX ");
    t.extend_from_slice(b"COMPARTMENT ");
    t.extend_from_slice(&[0; 4]); // OEM table pointer
    t.extend_from_slice(&[0; 2]); // OEM table size
    t.extend_from_slice(&[0; 2]); // entry count
    t.extend_from_slice(&LOCAL_APIC_ADDRESS.to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut entries: u16 = 0;
    for cpu in 0..config.cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap
        t.extend_from_slice(&[ENTRY_PROCESSOR, cpu, 0x14, flags]);
        t.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        t.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[ENTRY_IOAPIC, config.ioapic_id, 0x11, 1]);
    t.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    entries += 2;
    for irq in 0..config.isa_irqs {
        // Flags 0: polarity and trigger conform to the ISA bus (edge, active high).
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_VECTORED, 0, 0, 0, irq]);
        t.extend_from_slice(&[config.ioapic_id, irq]);
        entries += 1;
    }
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        entries += 1;
    }
    let length = t.len() as u16;
    t[4..6].copy_from_slice(&length.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(FLOATING_SIGNATURE);
    out.extend_from_slice(&(table_base as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&t);
    debug_assert_eq!(out.len() as u64, total);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }
    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    /// CPUs (APIC id, flags), IOAPICs (id, address) and interrupt entries.
    type Found = (Vec<(u8, u8)>, Vec<(u8, u32)>, Vec<[u8; 8]>);

    /// Walk the table as Linux's `smp_read_mpc` does and collect what it would find.
    fn walk(image: &[u8], base: u64) -> Found {
        assert_eq!(&image[0..4], FLOATING_SIGNATURE);
        assert_eq!(image[8], 1, "floating pointer is one paragraph");
        assert!(image[9] == 1 || image[9] == 4);
        assert_eq!(sum(&image[..16]), 0, "floating pointer checksum");
        let table = (u64::from(u32_at(image, 4)) - base) as usize;
        let t = &image[table..];
        assert_eq!(&t[0..4], TABLE_SIGNATURE);
        let length = usize::from(u16_at(t, 4));
        assert_eq!(sum(&t[..length]), 0, "table checksum");
        assert_eq!(u32_at(t, 36), LOCAL_APIC_ADDRESS);
        let count = u16_at(t, 34);
        let (mut cpus, mut ioapics, mut irqs) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = HEADER_SIZE;
        for _ in 0..count {
            match t[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((t[at + 1], t[at + 3]));
                    at += PROCESSOR_SIZE;
                }
                ENTRY_BUS => {
                    assert_eq!(&t[at + 2..at + 8], b"ISA   ");
                    at += 8;
                }
                ENTRY_IOAPIC => {
                    ioapics.push((t[at + 1], u32_at(t, at + 4)));
                    at += 8;
                }
                ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => {
                    irqs.push(t[at..at + 8].try_into().unwrap());
                    at += 8;
                }
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(at, length, "entries fill the table exactly");
        (cpus, ioapics, irqs)
    }

    #[test]
    fn table_describes_cpus_ioapic_and_isa_routing() {
        let config = MpConfig::new(2);
        let base = 0xf_0000;
        let image = build(&config, base).unwrap();
        assert_eq!(image.len(), size(&config));
        let (cpus, ioapics, irqs) = walk(&image, base);
        assert_eq!(cpus, [(0, 3), (1, 1)], "CPU 0 enabled + BSP, CPU 1 enabled");
        assert_eq!(ioapics, [(2, IOAPIC_ADDRESS)]);
        let io: Vec<_> = irqs.iter().filter(|e| e[0] == ENTRY_IO_INTERRUPT).collect();
        assert_eq!(io.len(), 16);
        for (n, e) in io.iter().enumerate() {
            assert_eq!(e[1], INT_VECTORED);
            assert_eq!((e[5], e[6], e[7]), (n as u8, 2, n as u8), "IRQ n -> pin n");
        }
        let local: Vec<_> = irqs
            .iter()
            .filter(|e| e[0] == ENTRY_LOCAL_INTERRUPT)
            .collect();
        assert_eq!(local.len(), 2);
        assert_eq!((local[0][1], local[0][7]), (INT_EXTINT, 0));
        assert_eq!((local[1][1], local[1][7]), (INT_NMI, 1));
    }

    #[test]
    fn checksums_break_when_a_byte_changes() {
        let image = build(&MpConfig::new(1), 0x9_fc00).unwrap();
        for at in [5, 20, 40, image.len() - 1] {
            let mut bad = image.clone();
            bad[at] ^= 0x10;
            let region = if at < 16 { &bad[..16] } else { &bad[16..] };
            assert_ne!(sum(region), 0, "byte {at}");
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert_eq!(
            build(&MpConfig::new(0), 0xf_0000),
            Err(MpError::BadCpuCount(0))
        );
        assert_eq!(
            build(&MpConfig::new(255), 0xf_0000),
            Err(MpError::BadCpuCount(255))
        );
        let clash = MpConfig {
            ioapic_id: 1,
            ..MpConfig::new(4)
        };
        assert_eq!(build(&clash, 0xf_0000), Err(MpError::BadIoapicId(1)));
        let many = MpConfig {
            isa_irqs: 17,
            ..MpConfig::new(1)
        };
        assert_eq!(build(&many, 0xf_0000), Err(MpError::BadIrqCount(17)));
        assert_eq!(
            build(&MpConfig::new(1), 0xf_0008),
            Err(MpError::BadPlacement(0xf_0008))
        );
        assert_eq!(
            build(&MpConfig::new(1), 0xf_ff80),
            Err(MpError::BadPlacement(0xf_ff80))
        );
        // The largest table still fits below 1 MiB at the BIOS area.
        let big = build(&MpConfig::new(254), 0xf_0000).unwrap();
        assert_eq!(walk(&big, 0xf_0000).0.len(), 254);
    }
}
