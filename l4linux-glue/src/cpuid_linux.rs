//! The CPUID and MSR policy of a Linux compartment (the test guests keep theirs in
//! [`crate::exits`]). It shows Linux the minimal no-ACPI platform of PLATFORM.md: an x2APIC
//! with the TSC-deadline timer and ARAT (so no PIT is needed), no invariant TSC (kvmclock is the clocksource), and KVM's
//! signature with kvmclock; it hides what the VMM does not emulate and passes the host's
//! vendor, family/model and harmless instruction-set features through.
//!
//! CPUID, by leaf (what is not listed comes from the host unchanged):
//!
//! | leaf | answer |
//! |------|--------|
//! | 0 | max basic leaf clamped to 0xd; vendor from the host |
//! | 1 | EBX: APIC id, vCPU count; ECX: + x2APIC, TSC-deadline, hypervisor; - DTES64, MONITOR, DS-CPL, VMX, SMX, EST, TM2, SDBG, xTPR, PDCM, PCID, DCA; OSXSAVE = guest CR4.OSXSAVE; EDX: - MCE, MCA, PSN, DS, ACPI, TM, PBE, HTT (one vCPU) |
//! | 4 | cores per package = vCPUs, no cache sharing information |
//! | 5 (MONITOR), 0xa (perfmon), 0xb (topology), 7.n for n > 0, leaves above 0xd | 0 |
//! | 6 | ARAT only |
//! | 7.0 | EBX: - TSC_ADJUST, SGX, HLE, INVPCID, RTM, PQM, MPX, PQE, PT; ECX: - PKU, OSPKE, WAITPKG, LA57, RDPID, SGX_LC; EDX: only FSRM, AVX512_4VNNIW/4FMAPS/VP2INTERSECT, MD_CLEAR, SERIALIZE (no speculation-control MSRs) |
//! | 0xd | XCR0 components x87, SSE, AVX, AVX-512 only; no XSAVES (IA32_XSS is not virtualized) |
//! | 0x4000_0000 | max 0x4000_0010, "KVMKVMKVM\0\0\0" |
//! | 0x4000_0001 | EAX: CLOCKSOURCE2, NOP_IO_DELAY, PV_EOI, CLOCKSOURCE_STABLE_BIT; EDX (hints): 0 |
//! | 0x4000_0010 | TSC and APIC-bus frequency in kHz (VMware's leaf; Linux 6.1 reads it only for VMware and derives the TSC frequency from kvmclock's mul/shift) |
//! | other 0x4000_00xx | 0 |
//! | 0x8000_0000 | max extended leaf clamped to 0x8000_0008 |
//! | 0x8000_0001 | ECX: - CmpLegacy, SVM, ExtApicSpace, IBS, SKINIT, WDT, LWP, NodeId, TopoExt, PerfCtrExt*, DataBkptExt, PerfTsc, MONITORX, AddrMaskExt; EDX: - RDTSCP (TSC_AUX is not virtualized) |
//! | 0x8000_0007 | 0: no invariant TSC, so that Linux keeps kvmclock as its clocksource (with an invariant TSC it prefers the raw TSC, which is not corrected when the VMM is descheduled) |
//! | 0x8000_0008 | address sizes from the host; EBX only CLZERO, XSaveErPtr, WBNOINVD; ECX: vCPUs - 1 |
//!
//! KVM features not offered, because nothing behind them is modelled: the old kvmclock MSRs
//! (CLOCKSOURCE), async page faults, steal time, PV unhalt, PV TLB flush, PV send-IPI,
//! poll control, MSI extended destination id.
//!
//! MSRs ([`LinuxMsrs`] answers those not owned by the APIC or kvmclock; unknown ones are #GP,
//! which Linux's `_safe` accessors expect when probing and its plain ones report once):
//!
//! | MSR | read | write |
//! |-----|------|-------|
//! | 0x10 TSC | the guest's TSC | ignored |
//! | 0x1b APIC_BASE, 0x6e0 TSC_DEADLINE, 0x800..0x8ff x2APIC | [`crate::lapic`] | [`crate::lapic`] |
//! | 0x3a FEATURE_CONTROL | locked, VMX off (1) | #GP |
//! | 0x8b BIOS_SIGN_ID (microcode) | 0 | ignored (Linux writes 0 before CPUID) |
//! | 0xfe MTRRcap | 0: no variable or fixed ranges, no WC | #GP |
//! | 0x1a0 MISC_ENABLE | fast strings, BTS and PEBS unavailable | ignored |
//! | 0x277 PAT | stored (reset 0x0007_0406_0007_0406) | stored; an invalid type is #GP |
//! | 0x2ff MTRRdefType | stored (reset: enabled, write-back, i.e. all memory WB with no ranges; with MTRRs disabled Linux 6.1 would skip PAT) | stored; reserved bits or an invalid type are #GP |
//! | 0x4b56_4d00/01 kvmclock | [`crate::kvmclock`] | [`crate::kvmclock`] |
//! | 0x4b56_4d04 PV_EOI_EN | the value written | bit 0 enables the flag at the 4-byte aligned address in the rest ([`crate::platform::MSR_KVM_PV_EOI_EN`]); bit 1 set is #GP |
//! | 0x179/0x17a MCG, 0x200.. MTRR ranges, perf counters, 0x48/0x49 speculation control, 0xda0 XSS, 0xc0000103 TSC_AUX, SVM's 0xc0010114/0xc0010117, everything else | #GP | #GP |
//!
//! EFER, STAR/LSTAR/CSTAR/SFMASK, FS/GS/KERNEL_GS base and SYSENTER live in the VMCB and are
//! not intercepted.

use core::fmt;

/// The hypervisor leaf base.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// KVM's feature leaf.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// The frequency leaf (TSC and bus kHz).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// KVM_FEATURE_NOP_IO_DELAY: port 0x80 delays are not needed.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// KVM_FEATURE_CLOCKSOURCE2: kvmclock at the 0x4b564d0x MSRs.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_PV_EOI: the guest may end interrupts through a flag in its memory
/// ([`crate::platform::MSR_KVM_PV_EOI_EN`]).
pub const KVM_FEATURE_PV_EOI: u32 = 1 << 6;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: the guest may trust PVCLOCK_TSC_STABLE_BIT.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
/// The highest basic leaf offered.
pub const MAX_BASIC_LEAF: u32 = 0xd;
/// The highest extended leaf offered.
pub const MAX_EXTENDED_LEAF: u32 = 0x8000_0008;

/// CPUID.1:ECX bits.
pub mod leaf1_ecx {
    /// 64-bit debug store.
    pub const DTES64: u32 = 1 << 2;
    /// MONITOR/MWAIT.
    pub const MONITOR: u32 = 1 << 3;
    /// CPL-qualified debug store.
    pub const DS_CPL: u32 = 1 << 4;
    /// VMX.
    pub const VMX: u32 = 1 << 5;
    /// Safer mode extensions.
    pub const SMX: u32 = 1 << 6;
    /// Enhanced SpeedStep.
    pub const EST: u32 = 1 << 7;
    /// Thermal monitor 2.
    pub const TM2: u32 = 1 << 8;
    /// Silicon debug.
    pub const SDBG: u32 = 1 << 11;
    /// xTPR update control.
    pub const XTPR: u32 = 1 << 14;
    /// Perfmon and debug capability MSR.
    pub const PDCM: u32 = 1 << 15;
    /// Process-context identifiers.
    pub const PCID: u32 = 1 << 17;
    /// Direct cache access.
    pub const DCA: u32 = 1 << 18;
    /// x2APIC.
    pub const X2APIC: u32 = 1 << 21;
    /// TSC-deadline timer.
    pub const TSC_DEADLINE: u32 = 1 << 24;
    /// XSAVE.
    pub const XSAVE: u32 = 1 << 26;
    /// OS has set CR4.OSXSAVE.
    pub const OSXSAVE: u32 = 1 << 27;
    /// Running under a hypervisor.
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// CPUID.1:EDX bits.
pub mod leaf1_edx {
    /// Machine-check exception.
    pub const MCE: u32 = 1 << 7;
    /// On-chip APIC.
    pub const APIC: u32 = 1 << 9;
    /// Machine-check architecture.
    pub const MCA: u32 = 1 << 14;
    /// Processor serial number.
    pub const PSN: u32 = 1 << 18;
    /// Debug store.
    pub const DS: u32 = 1 << 21;
    /// Thermal monitor and clock control.
    pub const ACPI: u32 = 1 << 22;
    /// Multi-threading.
    pub const HTT: u32 = 1 << 28;
    /// Thermal monitor.
    pub const TM: u32 = 1 << 29;
    /// Pending break enable.
    pub const PBE: u32 = 1 << 31;
}

/// CPUID.6:EAX: APIC timer always running (ARAT).
pub const LEAF6_ARAT: u32 = 1 << 2;
/// CPUID.8000_0007:EDX: invariant TSC.
pub const INVARIANT_TSC: u32 = 1 << 8;
/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = x86_64::registers::control::Cr4Flags::OSXSAVE.bits();

/// The CPUID policy of one vCPU of a Linux compartment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxCpuid {
    /// This vCPU's APIC id.
    pub apic_id: u32,
    /// vCPUs in the compartment (at least 1).
    pub vcpus: u32,
    /// TSC frequency in kHz (leaf 0x4000_0010).
    pub tsc_khz: u32,
    /// APIC bus frequency in kHz (leaf 0x4000_0010).
    pub bus_khz: u32,
}

impl LinuxCpuid {
    /// The answer for `leaf`/`subleaf`, given what the host CPU answers for it and the guest's
    /// CR4 (for the OSXSAVE bit).
    pub fn answer(&self, leaf: u32, subleaf: u32, host: [u32; 4], guest_cr4: u64) -> [u32; 4] {
        let [a, b, c, d] = host;
        let vcpus = self.vcpus.max(1);
        match leaf {
            0 => [a.min(MAX_BASIC_LEAF), b, c, d],
            1 => {
                use leaf1_ecx::*;
                let hidden = DTES64
                    | MONITOR
                    | DS_CPL
                    | VMX
                    | SMX
                    | EST
                    | TM2
                    | SDBG
                    | XTPR
                    | PDCM
                    | PCID
                    | DCA
                    | OSXSAVE;
                let mut ecx = (c & !hidden) | X2APIC | TSC_DEADLINE | HYPERVISOR;
                if c & XSAVE != 0 && guest_cr4 & CR4_OSXSAVE != 0 {
                    ecx |= OSXSAVE;
                }
                let ebx = (b & 0xffff) | ((vcpus & 0xff) << 16) | (self.apic_id << 24);
                use leaf1_edx as e;
                let mut edx_hidden = e::MCE | e::MCA | e::PSN | e::DS | e::ACPI | e::TM | e::PBE;
                if vcpus == 1 {
                    edx_hidden |= e::HTT;
                }
                [a, ebx, ecx, (d & !edx_hidden) | e::APIC]
            }
            4 => [(a & 0x3fff) | ((vcpus - 1) << 26), b, c, d],
            6 => [LEAF6_ARAT, 0, 0, 0],
            7 if subleaf == 0 => {
                let ebx_hidden = (1 << 1)
                    | (1 << 2)
                    | (1 << 4)
                    | (1 << 10)
                    | (1 << 11)
                    | (1 << 12)
                    | (1 << 14)
                    | (1 << 15)
                    | (1 << 25);
                let ecx_hidden = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 22) | (1 << 30);
                let edx_kept = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 8) | (1 << 10) | (1 << 14);
                [0, b & !ebx_hidden, c & !ecx_hidden, d & edx_kept]
            }
            0xd => xsave_leaf(subleaf, host),
            2..=MAX_BASIC_LEAF => match leaf {
                5 | 7 | 0xa | 0xb => [0; 4],
                _ => host,
            },
            HYPERVISOR_LEAF => [
                TIMING_LEAF,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2],
            ],
            KVM_FEATURES_LEAF => [
                KVM_FEATURE_CLOCKSOURCE2
                    | KVM_FEATURE_NOP_IO_DELAY
                    | KVM_FEATURE_PV_EOI
                    | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
                0,
                0,
                0,
            ],
            TIMING_LEAF => [self.tsc_khz, self.bus_khz, 0, 0],
            0x8000_0000 => [a.min(MAX_EXTENDED_LEAF), b, c, d],
            0x8000_0001 => {
                let ecx_hidden = (1 << 1)
                    | (1 << 2)
                    | (1 << 3)
                    | (1 << 10)
                    | (1 << 12)
                    | (1 << 13)
                    | (1 << 15)
                    | (1 << 19)
                    | (1 << 22)
                    | (1 << 23)
                    | (1 << 24)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 29)
                    | (1 << 30);
                [a, b, c & !ecx_hidden, d & !(1 << 27)]
            }
            0x8000_0007 => [0, 0, 0, 0],
            0x8000_0008 => [
                a,
                b & ((1 << 0) | (1 << 2) | (1 << 9)),
                (vcpus - 1) & 0xff,
                0,
            ],
            0x8000_0002..=0x8000_0006 => host,
            _ => [0; 4],
        }
    }
}

/// Leaf 0xd: user state components x87, SSE, AVX and AVX-512 (XCR0 bits 0-2, 5-7); no
/// XSAVES or supervisor components.
fn xsave_leaf(subleaf: u32, host: [u32; 4]) -> [u32; 4] {
    const USER_COMPONENTS: u32 = 0b1110_0111;
    match subleaf {
        0 => [host[0] & USER_COMPONENTS, host[1], host[2], 0],
        1 => [host[0] & 0b0111, host[1], 0, 0],
        2..=31 if USER_COMPONENTS & (1 << subleaf) != 0 => host,
        _ => [0; 4],
    }
}

/// MSR numbers of the Linux policy.
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const TSC: u32 = 0x10;
    /// IA32_FEATURE_CONTROL.
    pub const FEATURE_CONTROL: u32 = 0x3a;
    /// IA32_BIOS_SIGN_ID (microcode revision).
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    /// IA32_MTRRCAP.
    pub const MTRR_CAP: u32 = 0xfe;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_PAT.
    pub const PAT: u32 = 0x277;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// IA32_PAT at reset: WB, WT, UC-, UC, twice.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// IA32_MTRR_DEF_TYPE at reset: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_RESET: u64 = (1 << 11) | 6;
/// IA32_MISC_ENABLE as read: fast strings (0), BTS unavailable (11), PEBS unavailable (12).
pub const MISC_ENABLE_VALUE: u64 = (1 << 0) | (1 << 11) | (1 << 12);
/// IA32_FEATURE_CONTROL as read: locked, VMX disabled.
pub const FEATURE_CONTROL_VALUE: u64 = 1;

/// An MSR access the policy refuses: the VMM answers #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrError {
    /// Not an MSR of this platform.
    Unknown(u32),
    /// A write of a read-only MSR.
    ReadOnly(u32),
    /// A value with reserved bits or invalid memory types.
    Invalid(u32, u64),
}

impl fmt::Display for MsrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MsrError::Unknown(m) => write!(f, "MSR {m:#x} does not exist here"),
            MsrError::ReadOnly(m) => write!(f, "MSR {m:#x} is read-only"),
            MsrError::Invalid(m, v) => write!(f, "MSR {m:#x}: {v:#x} is invalid"),
        }
    }
}

/// The MSRs of a Linux vCPU that neither the APIC nor kvmclock own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxMsrs {
    pat: u64,
    mtrr_def_type: u64,
}

impl Default for LinuxMsrs {
    fn default() -> Self {
        Self::new()
    }
}

/// A memory type PAT and MTRRs accept (UC, WC, WT, WP, WB; PAT also UC-).
fn valid_memory_type(t: u64, pat: bool) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6) || (pat && t == 7)
}

impl LinuxMsrs {
    /// The reset values.
    pub fn new() -> LinuxMsrs {
        LinuxMsrs {
            pat: PAT_RESET,
            mtrr_def_type: MTRR_DEF_TYPE_RESET,
        }
    }

    /// RDMSR; `tsc` is the guest's TSC now.
    pub fn read(&self, index: u32, tsc: u64) -> Result<u64, MsrError> {
        match index {
            msr::TSC => Ok(tsc),
            msr::FEATURE_CONTROL => Ok(FEATURE_CONTROL_VALUE),
            msr::BIOS_SIGN_ID | msr::MTRR_CAP => Ok(0),
            msr::MISC_ENABLE => Ok(MISC_ENABLE_VALUE),
            msr::PAT => Ok(self.pat),
            msr::MTRR_DEF_TYPE => Ok(self.mtrr_def_type),
            _ => Err(MsrError::Unknown(index)),
        }
    }

    /// WRMSR.
    pub fn write(&mut self, index: u32, value: u64) -> Result<(), MsrError> {
        match index {
            msr::TSC | msr::BIOS_SIGN_ID | msr::MISC_ENABLE => Ok(()),
            msr::FEATURE_CONTROL | msr::MTRR_CAP => Err(MsrError::ReadOnly(index)),
            msr::PAT => {
                let valid = (0..8).all(|i| {
                    let entry = (value >> (8 * i)) & 0xff;
                    valid_memory_type(entry, true)
                });
                if !valid {
                    return Err(MsrError::Invalid(index, value));
                }
                self.pat = value;
                Ok(())
            }
            msr::MTRR_DEF_TYPE => {
                if value & !0xcff != 0 || !valid_memory_type(value & 0xff, false) {
                    return Err(MsrError::Invalid(index, value));
                }
                self.mtrr_def_type = value;
                Ok(())
            }
            _ => Err(MsrError::Unknown(index)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LinuxCpuid {
        LinuxCpuid {
            apic_id: 0,
            vcpus: 1,
            tsc_khz: 1_000_000,
            bus_khz: 1_000_000,
        }
    }

    const ALL: [u32; 4] = [u32::MAX; 4];

    #[test]
    fn basic_leaves() {
        let p = policy();
        assert_eq!(p.answer(0, 0, [0x16, 1, 2, 3], 0), [0xd, 1, 2, 3]);
        assert_eq!(p.answer(0, 0, [0x7, 1, 2, 3], 0)[0], 7);
        let [_, ebx, ecx, edx] = p.answer(1, 0, ALL, 0);
        use leaf1_ecx::*;
        assert_eq!(
            ecx & (X2APIC | TSC_DEADLINE | HYPERVISOR),
            X2APIC | TSC_DEADLINE | HYPERVISOR
        );
        for hidden in [MONITOR, VMX, PCID, PDCM, DTES64, OSXSAVE] {
            assert_eq!(ecx & hidden, 0, "{hidden:#x}");
        }
        assert_eq!(ecx & XSAVE, XSAVE);
        assert_eq!(ebx >> 16, 0x0001); // APIC id 0, one logical processor
        assert_eq!(edx & (leaf1_edx::MCE | leaf1_edx::MCA | leaf1_edx::HTT), 0);
        assert_ne!(edx & leaf1_edx::APIC, 0);
        // OSXSAVE follows the guest's CR4 when XSAVE exists.
        assert_ne!(p.answer(1, 0, ALL, CR4_OSXSAVE)[2] & OSXSAVE, 0);
        assert_eq!(p.answer(1, 0, [0; 4], CR4_OSXSAVE)[2] & OSXSAVE, 0);
        // A second vCPU's leaf 1 names it.
        let q = LinuxCpuid {
            apic_id: 1,
            vcpus: 2,
            ..p
        };
        let [_, ebx, _, edx] = q.answer(1, 0, ALL, 0);
        assert_eq!(ebx >> 16, 0x0102);
        assert_ne!(edx & leaf1_edx::HTT, 0);
        assert_eq!(q.answer(4, 0, ALL, 0)[0] >> 26, 1);
        assert_eq!(q.answer(0x8000_0008, 0, ALL, 0)[2], 1);
    }

    #[test]
    fn hidden_leaves() {
        let p = policy();
        assert_eq!(p.answer(5, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(6, 0, ALL, 0), [LEAF6_ARAT, 0, 0, 0]);
        assert_eq!(p.answer(0xa, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(0xb, 1, ALL, 0), [0; 4]);
        assert_eq!(p.answer(0x14, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(2, 0, [1, 2, 3, 4], 0), [1, 2, 3, 4]);
        let [a, b, c, d] = p.answer(7, 0, ALL, 0);
        assert_eq!(a, 0);
        assert_eq!(b & (1 << 10), 0); // INVPCID
        assert_eq!(b & (1 << 1), 0); // TSC_ADJUST
        assert_ne!(b & (1 << 5), 0); // AVX2 passes
        assert_eq!(c & ((1 << 16) | (1 << 22) | (1 << 3)), 0); // LA57, RDPID, PKU
        assert_eq!(d, 0b0100_0101_0001_1100);
        assert_eq!(p.answer(7, 1, ALL, 0), [0; 4]);
    }

    #[test]
    fn xsave_leaf_has_no_supervisor_state() {
        let p = policy();
        assert_eq!(p.answer(0xd, 0, ALL, 0), [0xe7, u32::MAX, u32::MAX, 0]);
        assert_eq!(p.answer(0xd, 1, ALL, 0), [0b0111, u32::MAX, 0, 0]);
        assert_eq!(p.answer(0xd, 2, [256, 576, 0, 0], 0), [256, 576, 0, 0]);
        assert_eq!(p.answer(0xd, 8, ALL, 0), [0; 4]); // PT
        assert_eq!(p.answer(0xd, 9, ALL, 0), [0; 4]); // PKRU
        assert_eq!(p.answer(0xd, 17, ALL, 0), [0; 4]); // AMX
    }

    #[test]
    fn kvm_leaves() {
        let p = policy();
        let [max, b, c, d] = p.answer(HYPERVISOR_LEAF, 0, ALL, 0);
        assert_eq!(max, TIMING_LEAF);
        let mut signature = [0u8; 12];
        for (i, r) in [b, c, d].iter().enumerate() {
            signature[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&signature, b"KVMKVMKVM\0\0\0");
        assert_eq!(
            p.answer(KVM_FEATURES_LEAF, 0, ALL, 0),
            [(1 << 24) | (1 << 6) | (1 << 3) | (1 << 1), 0, 0, 0]
        );
        assert_eq!(
            p.answer(TIMING_LEAF, 0, ALL, 0),
            [1_000_000, 1_000_000, 0, 0]
        );
        assert_eq!(p.answer(0x4000_0002, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(0x4000_0100, 0, ALL, 0), [0; 4]); // no Xen
    }

    #[test]
    fn extended_leaves() {
        let p = policy();
        assert_eq!(
            p.answer(0x8000_0000, 0, [0x8000_0021, 1, 2, 3], 0)[0],
            MAX_EXTENDED_LEAF
        );
        let [_, _, ecx, edx] = p.answer(0x8000_0001, 0, ALL, 0);
        assert_eq!(ecx & (1 << 2), 0); // SVM
        assert_eq!(ecx & (1 << 29), 0); // MONITORX
        assert_ne!(ecx & 1, 0); // LAHF/SAHF passes
        assert_eq!(edx & (1 << 27), 0); // RDTSCP
        assert_ne!(edx & (1 << 29), 0); // long mode passes
        assert_eq!(p.answer(0x8000_0007, 0, ALL, 0), [0, 0, 0, 0]);
        assert_eq!(
            p.answer(0x8000_0008, 0, [0x3030, u32::MAX, 0xff, 7], 0),
            [0x3030, 0x205, 0, 0]
        );
        assert_eq!(p.answer(0x8000_000a, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(0x8000_001f, 0, ALL, 0), [0; 4]);
        assert_eq!(p.answer(0x8000_0002, 0, [1, 2, 3, 4], 0), [1, 2, 3, 4]);
    }

    #[test]
    fn msr_policy() {
        let mut m = LinuxMsrs::new();
        assert_eq!(m.read(msr::TSC, 1234), Ok(1234));
        assert_eq!(m.read(msr::FEATURE_CONTROL, 0), Ok(1));
        assert_eq!(
            m.write(msr::FEATURE_CONTROL, 0),
            Err(MsrError::ReadOnly(0x3a))
        );
        assert_eq!(m.write(msr::BIOS_SIGN_ID, 0), Ok(()));
        assert_eq!(m.read(msr::BIOS_SIGN_ID, 0), Ok(0));
        assert_eq!(m.read(msr::MTRR_CAP, 0), Ok(0));
        assert!(m.write(msr::MTRR_CAP, 0).is_err());
        assert_eq!(m.read(msr::MISC_ENABLE, 0), Ok(0x1801));
        assert_eq!(m.write(msr::MISC_ENABLE, 0), Ok(()));
        assert_eq!(m.read(msr::MISC_ENABLE, 0), Ok(0x1801));
        // PAT: Linux's value is taken, a reserved type refused.
        assert_eq!(m.read(msr::PAT, 0), Ok(PAT_RESET));
        m.write(msr::PAT, 0x0407_0506_0007_0106).unwrap();
        assert_eq!(m.read(msr::PAT, 0), Ok(0x0407_0506_0007_0106));
        assert!(m.write(msr::PAT, 0x02).is_err());
        assert!(m.write(msr::PAT, 0x08).is_err());
        // MTRRdefType: Linux disables (UC, E=0) around PAT setup and restores.
        assert_eq!(m.read(msr::MTRR_DEF_TYPE, 0), Ok(0x806));
        m.write(msr::MTRR_DEF_TYPE, 0).unwrap();
        m.write(msr::MTRR_DEF_TYPE, 0x806).unwrap();
        assert!(m.write(msr::MTRR_DEF_TYPE, 0x1006).is_err());
        assert!(m.write(msr::MTRR_DEF_TYPE, 0x802).is_err());
        // Everything else is #GP.
        for unknown in [
            0x179,
            0x17a,
            0x200,
            0x250,
            0x48,
            0x49,
            0xda0,
            0xc000_0103,
            0xc001_0114,
            0x12,
        ] {
            assert_eq!(m.read(unknown, 0), Err(MsrError::Unknown(unknown)));
            assert_eq!(m.write(unknown, 0), Err(MsrError::Unknown(unknown)));
        }
    }
}
