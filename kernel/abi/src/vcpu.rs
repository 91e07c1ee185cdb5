//! The virtual-CPU state that travels between the kernel and a VMM through the VMM thread's
//! UTCB ([`crate::Syscall::VcpuRun`]): word indices into [`crate::Utcb::mr`], the groups a VMM
//! selects with a transfer mask ([`Groups`]), and the exit codes it sees (SVM's and the kernel's own).

/// Exit code (read only).
pub const EXIT_CODE: usize = 0;
/// EXITINFO1 (read only).
pub const EXIT_INFO1: usize = 1;
/// EXITINFO2 (read only; for I/O exits the next RIP).
pub const EXIT_INFO2: usize = 2;
/// EXITINTINFO: an event whose delivery the exit interrupted (read only; the kernel re-injects
/// it on the next run unless the VMM injects something else).
pub const EXIT_INT_INFO: usize = 3;
/// Instruction pointer ([`Groups::GPRS`]).
pub const RIP: usize = 4;
/// Stack pointer ([`Groups::GPRS`]).
pub const RSP: usize = 5;
/// Flags ([`Groups::GPRS`]).
pub const RFLAGS: usize = 6;
/// rax; then rbx, rcx, rdx, rsi, rdi, rbp, r8..r15 follow in that order ([`Groups::GPRS`]).
pub const RAX: usize = 7;
/// rbx.
pub const RBX: usize = 8;
/// rcx.
pub const RCX: usize = 9;
/// rdx.
pub const RDX: usize = 10;
/// rsi.
pub const RSI: usize = 11;
/// rdi.
pub const RDI: usize = 12;
/// rbp.
pub const RBP: usize = 13;
/// r8 (r9..r15 follow).
pub const R8: usize = 14;
/// CR0 ([`Groups::CONTROL`]).
pub const CR0: usize = 22;
/// CR2 ([`Groups::CONTROL`]).
pub const CR2: usize = 23;
/// CR3 ([`Groups::CONTROL`]).
pub const CR3: usize = 24;
/// CR4 ([`Groups::CONTROL`]).
pub const CR4: usize = 25;
/// EFER ([`Groups::CONTROL`]; SVME is always set by the kernel).
pub const EFER: usize = 26;
/// Event to inject on the next run, in the VMCB EVENTINJ format ([`Groups::EVENTS`]; 0: none).
pub const EVENT_INJECT: usize = 27;
/// Virtual interrupt request ([`Groups::EVENTS`]): bit 63 requests vector `bits 0..8`, delivered
/// when the guest can take interrupts (RFLAGS.IF set, no interrupt shadow); 0 withdraws it.
pub const VIRTUAL_IRQ: usize = 28;
/// Interrupt shadow (bit 0) as of the exit; written back with [`Groups::EVENTS`] (a VMM that completes
/// an instruction clears it, e.g. after a HLT that followed `sti`).
pub const INTERRUPT_SHADOW: usize = 29;
/// First segment register: CS, SS, DS, ES, FS, GS, TR, LDTR follow, two words each
/// (`selector | attributes << 16 | limit << 32`, base) ([`Groups::SEGMENTS`]).
pub const CS: usize = 30;
/// SS.
pub const SS: usize = 32;
/// DS.
pub const DS: usize = 34;
/// ES.
pub const ES: usize = 36;
/// FS.
pub const FS: usize = 38;
/// GS.
pub const GS: usize = 40;
/// TR.
pub const TR: usize = 42;
/// LDTR.
pub const LDTR: usize = 44;
/// GDTR: limit, base ([`Groups::SEGMENTS`]).
pub const GDTR: usize = 46;
/// IDTR: limit, base ([`Groups::SEGMENTS`]).
pub const IDTR: usize = 48;
/// STAR (read only: stored at every exit, never loaded; the guest writes its syscall MSRs
/// itself, without exits). LSTAR, CSTAR and SFMASK follow.
pub const STAR: usize = 50;
/// LSTAR (read only).
pub const LSTAR: usize = 51;
/// CSTAR (read only).
pub const CSTAR: usize = 52;
/// SFMASK (read only).
pub const SFMASK: usize = 53;
/// Exception intercepts ([`Groups::INTERCEPTS`], an [`Exceptions`] set): bit `v` makes exception vector `v` exit to the VMM
/// ([`exit::EXCEPTION_BASE`]` + v`) instead of reaching the guest; only the vectors of
/// [`Exceptions::interceptable`] may be set.
pub const EXCEPTION_INTERCEPTS: usize = 54;
/// Words of the state.
pub const STATE_WORDS: usize = 55;

bitflags::bitflags! {
    /// A set of exception vectors: the exception intercepts ([`EXCEPTION_INTERCEPTS`], bit `v`
    /// for vector `v`). [`Exceptions::interceptable`] is what a VMM may set.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Exceptions: u64 {
        /// Every vector 0..32 (bit `v` is vector `v`; [`Exceptions::vector`] names one).
        const _ = 0xffff_ffff;
    }
}

impl Exceptions {
    /// The set of the one exception `vector` (0..32; others give the empty set).
    pub const fn vector(vector: u8) -> Exceptions {
        if vector < 32 {
            Exceptions::from_bits_retain(1 << vector)
        } else {
            Exceptions::empty()
        }
    }
    /// The exceptions a VMM may intercept: vectors 0..32 except #MC (18), which stays the
    /// host's.
    pub const fn interceptable() -> Exceptions {
        Exceptions::all().difference(Exceptions::vector(VECTOR_MC))
    }
}

/// CR0 bits a guest may have (`VcpuRun` refuses others): PE, MP, EM, TS, ET, NE, WP, AM, NW,
/// CD, PG.
pub const CR0_ALLOWED: u64 = x86_64::registers::control::Cr0Flags::all().bits();
/// CR4 bits a guest may have (VMRUN still rejects what the CPU lacks): VME..OSXMMEXCPT, UMIP,
/// LA57, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE.
pub const CR4_ALLOWED: u64 = {
    use x86_64::registers::control::Cr4Flags as F;
    F::VIRTUAL_8086_MODE_EXTENSIONS
        .union(F::PROTECTED_MODE_VIRTUAL_INTERRUPTS)
        .union(F::TIMESTAMP_DISABLE)
        .union(F::DEBUGGING_EXTENSIONS)
        .union(F::PAGE_SIZE_EXTENSION)
        .union(F::PHYSICAL_ADDRESS_EXTENSION)
        .union(F::MACHINE_CHECK_EXCEPTION)
        .union(F::PAGE_GLOBAL)
        .union(F::PERFORMANCE_MONITOR_COUNTER)
        .union(F::OSFXSR)
        .union(F::OSXMMEXCPT_ENABLE)
        .union(F::USER_MODE_INSTRUCTION_PREVENTION)
        .union(F::L5_PAGING)
        .union(F::FSGSBASE)
        .union(F::PCID)
        .union(F::OSXSAVE)
        .union(F::SUPERVISOR_MODE_EXECUTION_PROTECTION)
        .union(F::SUPERVISOR_MODE_ACCESS_PREVENTION)
        .union(F::PROTECTION_KEY_USER)
        .bits()
};
/// EFER bits a VMM may set: SCE, LME, LMA, NXE (the kernel adds SVME itself).
pub const EFER_ALLOWED: u64 = {
    use x86_64::registers::model_specific::EferFlags;
    EferFlags::SYSTEM_CALL_EXTENSIONS
        .union(EferFlags::LONG_MODE_ENABLE)
        .union(EferFlags::LONG_MODE_ACTIVE)
        .union(EferFlags::NO_EXECUTE_ENABLE)
        .bits()
};
const _: () =
    assert!(CR0_ALLOWED == 0xe005_003f && CR4_ALLOWED == 0x0077_1fff && EFER_ALLOWED == 0x0d01);
/// Exception vector of #UD.
pub const VECTOR_UD: u8 = 6;
/// Exception vector of #MC.
pub const VECTOR_MC: u8 = 18;

bitflags::bitflags! {
    /// The groups of the state a `VcpuRun` loads from the UTCB before it enters the guest
    /// (its transfer mask; other bits are refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Groups: u64 {
        /// RIP, RSP, RFLAGS and the 16 general registers.
        const GPRS = 1;
        /// CR0, CR2, CR3, CR4, EFER.
        const CONTROL = 2;
        /// Segment registers and descriptor tables.
        const SEGMENTS = 4;
        /// Event injection, virtual interrupt request and interrupt shadow.
        const EVENTS = 8;
        /// The exception intercepts ([`EXCEPTION_INTERCEPTS`]). Not part of [`Groups::GUEST`]:
        /// a VMM that never loads it keeps the default (no exception intercepted).
        const INTERCEPTS = 16;
    }
}

impl Groups {
    /// Every group of the guest's own state.
    pub const GUEST: Groups = Groups::GPRS
        .union(Groups::CONTROL)
        .union(Groups::SEGMENTS)
        .union(Groups::EVENTS);
    /// The groups a VMM may leave unstored at the exits ([`transfer`]): control registers,
    /// segments (DS, ES, FS, GS, TR, LDTR, the descriptor tables and the syscall MSRs; CS and
    /// SS, the mode and the privilege level, are stored all the same) and the intercepts. The
    /// exit information, the general registers and the events are always stored.
    pub const UNSTORABLE: Groups = Groups::CONTROL
        .union(Groups::SEGMENTS)
        .union(Groups::INTERCEPTS);
}

/// The transfer argument of `VcpuRun` (`a1`): the groups to load before entering (bits 0..32)
/// and the groups *not* to store at the exit (bits 32..64, within [`Groups::UNSTORABLE`]; 0:
/// store everything). Words of an unstored group keep what the VMM left in them, which may be
/// stale: a VMM leaves out only what it never reads at an exit and never loads without
/// writing first.
pub const fn transfer(load: Groups, unstored: Groups) -> u64 {
    load.bits() | unstored.bits() << 32
}

/// Encode a segment register word.
pub const fn segment(selector: u16, attributes: u16, limit: u32) -> u64 {
    selector as u64 | (attributes as u64) << 16 | (limit as u64) << 32
}

/// A state the CPU enters: 32-bit protected mode at `entry` with paging off, flat segments
/// (code 0x08, data 0x10), the stack at 0x8000; every other word 0.
pub fn protected_mode(words: &mut [u64; 64], entry: u64) {
    words.fill(0);
    words[RIP] = entry;
    words[RSP] = 0x8000;
    words[RFLAGS] = 2;
    words[CR0] = 0x11; // PE, ET
    words[CS] = segment(0x08, 0xc9b, 0xffff_ffff);
    for s in [SS, DS, ES, FS, GS] {
        words[s] = segment(0x10, 0xc93, 0xffff_ffff);
    }
    words[TR] = segment(0, 0x8b, 0x67);
    words[LDTR] = segment(0, 0x82, 0);
}

/// SVM exit codes (the low 32 bits of the VMCB exit code).
pub mod exit {
    /// Write to CR0 (intercepted only when asked).
    pub const CR0_WRITE: u64 = 0x10;
    /// Write to DR0 (handled by the kernel, never seen by a VMM); DR1-DR3 follow.
    pub const DR0_WRITE: u64 = 0x30;
    /// Write to DR3 (handled by the kernel).
    pub const DR3_WRITE: u64 = 0x33;
    /// Exception `vector` is `EXCEPTION_BASE + vector`.
    pub const EXCEPTION_BASE: u64 = 0x40;
    /// Physical interrupt (handled by the kernel, never seen by a VMM).
    pub const INTR: u64 = 0x60;
    /// Physical NMI (handled by the kernel).
    pub const NMI: u64 = 0x61;
    /// Virtual interrupt window.
    pub const VINTR: u64 = 0x64;
    /// CPUID (2 bytes).
    pub const CPUID: u64 = 0x72;
    /// HLT (1 byte).
    pub const HLT: u64 = 0x78;
    /// Port I/O; EXITINFO1 describes it, EXITINFO2 is the next RIP.
    pub const IOIO: u64 = 0x7b;
    /// RDMSR (EXITINFO1 = 0) or WRMSR (1); 2 bytes.
    pub const MSR: u64 = 0x7c;
    /// XSETBV (handled by the kernel when it switches XCR0 per guest).
    pub const XSETBV: u64 = 0x8d;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN in the guest.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL (3 bytes).
    pub const VMMCALL: u64 = 0x81;
    /// Nested page fault: EXITINFO1 the error code, EXITINFO2 the guest-physical address.
    pub const NPF: u64 = 0x400;
    /// The VMCB held invalid state (the run fails with `InvalidArgument`).
    pub const INVALID: u64 = 0xffff_ffff;

    /// First of the kernel's own exit codes. SVM's are below 0x1000 (up to VMGEXIT, 0x403) or
    /// negative at the top of the 32-bit range ([`INVALID`] is -1), so these never come from
    /// the CPU.
    pub const SOFTWARE_BASE: u64 = 0x1_0000;
    /// The deadline of the `VcpuRun` (an absolute TSC value in `a2`) has passed: the kernel
    /// checks it before every guest entry and returns instead of entering. EXITINFO1/2 are 0;
    /// EXITINTINFO is the event the next run re-injects (0: none). Checked after [`MESSAGE`].
    pub const DEADLINE: u64 = SOFTWARE_BASE;
    /// A message waits for the thread running the vCPU (a queued sender or a pending IRQ
    /// attached to it): the kernel returns before entering the guest, and the thread takes
    /// the message with an open receive. EXITINFO1/2 are 0; EXITINTINFO as for [`DEADLINE`].
    pub const MESSAGE: u64 = SOFTWARE_BASE + 1;
}

/// Events to inject ([`EVENT_INJECT`]): the VMCB EVENTINJ encoding (AMD APM vol. 2, 15.20).
pub mod event {
    /// The event is valid (bit 31).
    pub const VALID: u64 = 1 << 31;
    /// An error code is pushed (bit 11; the code is in bits 32..64).
    pub const ERROR_VALID: u64 = 1 << 11;
    /// Type: external interrupt.
    pub const INTERRUPT: u64 = 0 << 8;
    /// Type: non-maskable interrupt.
    pub const NMI: u64 = 2 << 8;
    /// Type: exception.
    pub const EXCEPTION: u64 = 3 << 8;
    /// Type: software interrupt (INTn).
    pub const SOFTWARE: u64 = 4 << 8;
    /// The type field (bits 8..11).
    pub const TYPE: u64 = 7 << 8;
    /// The reserved bits (12..31).
    pub const RESERVED: u64 = 0x7fff_f000;

    /// An external interrupt at `vector`.
    pub const fn interrupt(vector: u8) -> u64 {
        VALID | INTERRUPT | vector as u64
    }
    /// The NMI.
    pub const fn nmi() -> u64 {
        VALID | NMI | 2
    }
    /// Exception `vector` without an error code.
    pub const fn exception(vector: u8) -> u64 {
        VALID | EXCEPTION | vector as u64
    }
    /// Exception `vector` with error code `code`.
    pub const fn exception_with_code(vector: u8, code: u32) -> u64 {
        VALID | EXCEPTION | ERROR_VALID | (code as u64) << 32 | vector as u64
    }
    /// #UD.
    pub const UD: u64 = exception(6);
    /// #GP(0).
    pub const GP0: u64 = exception_with_code(13, 0);
    /// Whether `event` is valid.
    pub const fn is_valid(event: u64) -> bool {
        event & VALID != 0
    }
}

const _: () = assert!(STATE_WORDS <= 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_refuse_unknown_bits() {
        assert_eq!(Groups::GUEST.bits(), 15);
        assert!(!Groups::GUEST.contains(Groups::INTERCEPTS));
        assert_eq!(
            Groups::from_bits(31),
            Some(Groups::GUEST | Groups::INTERCEPTS)
        );
        assert_eq!(Groups::from_bits(1 << 5), None);
    }

    #[test]
    fn exceptions_are_vectors_below_32_without_machine_check() {
        assert_eq!(Exceptions::vector(VECTOR_UD).bits(), 1 << 6);
        assert_eq!(Exceptions::vector(32), Exceptions::empty());
        assert_eq!(Exceptions::from_bits(1 << 32), None);
        let allowed = Exceptions::interceptable();
        assert!(
            allowed.contains(Exceptions::vector(0)) && allowed.contains(Exceptions::vector(31))
        );
        assert!(!allowed.contains(Exceptions::vector(VECTOR_MC)));
        assert_eq!(allowed.bits(), 0xffff_ffff & !(1 << 18));
    }
}
