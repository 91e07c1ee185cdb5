//! The x87/SSE/AVX registers of user threads: enabling them at boot, CR0.TS (the
//! device-not-available trap of lazy switching), and saving and restoring one thread's
//! registers with the XSAVE family (XSAVEOPT where present) or, without XSAVE, FXSAVE.
//!
//! The kernel itself never executes x87 or SSE instructions (it is built soft-float); only the
//! instructions here touch the registers, on behalf of user threads.

use core::arch::asm;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};
use x86_64::registers::xcontrol::{XCr0, XCr0Flags};

/// XCR0 bit: x87 state.
pub const XCR0_X87: u64 = XCr0Flags::X87.bits();
/// XCR0 bit: SSE state (XMM registers, MXCSR).
pub const XCR0_SSE: u64 = XCr0Flags::SSE.bits();
/// XCR0 bit: AVX state (upper halves of the YMM registers).
pub const XCR0_AVX: u64 = XCr0Flags::AVX.bits();

/// Bytes of a thread's save area: the legacy region (512), the XSAVE header (64) and the AVX
/// component (256, at offset 576 in the standard format), which is all that
/// [`XCR0_X87`] | [`XCR0_SSE`] | [`XCR0_AVX`] need.
pub const AREA_BYTES: usize = 832;
/// Offset of the AVX component in the standard (non-compacted) XSAVE format.
const AVX_OFFSET: u32 = 576;

/// One thread's saved x87/SSE/AVX registers (an XSAVE or FXSAVE image).
#[repr(C, align(64))]
pub struct Area(pub [u8; AREA_BYTES]);

const _: () = assert!(core::mem::size_of::<Area>() == AREA_BYTES);

impl Area {
    /// The initial state: x87 control word 0x37f (all exceptions masked, extended precision),
    /// MXCSR 0x1f80 (all SIMD exceptions masked, round to nearest), every register zero, and an
    /// XSAVE header with no component present (XRSTOR then loads each in its initial state).
    pub const fn initial() -> Area {
        let mut bytes = [0u8; AREA_BYTES];
        bytes[0] = 0x7f;
        bytes[1] = 0x03;
        bytes[24] = 0x80;
        bytes[25] = 0x1f;
        Area(bytes)
    }
}

/// The initial state, for threads that have no area of their own (none do after creation).
pub static INITIAL: Area = Area::initial();

/// How the registers are saved and restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// XSAVEOPT / XRSTOR (skips components in their initial or unmodified state).
    XsaveOpt,
    /// XSAVE / XRSTOR.
    Xsave,
    /// FXSAVE / FXRSTOR (x87 and SSE only; no XSAVE on this CPU).
    Fxsave,
}

/// What the CPU offers user threads, found at boot.
#[derive(Debug, Clone, Copy)]
pub struct Hardware {
    /// The save instructions.
    pub method: Method,
    /// The user XCR0 (the components saved and restored; x87 and SSE at least, AVX if the CPU
    /// has it). Without XSAVE: x87 | SSE.
    pub xcr0: u64,
}

fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// Enable the x87, SSE and (with XSAVE) AVX registers for user mode: CR0.MP and NE set, EM
/// clear; CR4.OSFXSR and OSXMMEXCPT (set by the boot code) and OSXSAVE; XCR0 = the user
/// components. Leaves CR0.TS clear. Called once at boot.
pub fn init() -> Hardware {
    let features = cpuid(1, 0);
    let xsave = features.ecx & (1 << 26) != 0;
    let avx = features.ecx & (1 << 28) != 0;
    // SAFETY: CR0.MP/NE/EM and CR4.OSXSAVE only change how x87/SSE/XSAVE instructions behave,
    // which the kernel does not execute outside this module; CR0.TS is cleared.
    unsafe {
        Cr0::update(|cr0| {
            cr0.insert(Cr0Flags::MONITOR_COPROCESSOR | Cr0Flags::NUMERIC_ERROR);
            cr0.remove(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED);
        });
        if xsave {
            Cr4::update(|cr4| cr4.insert(Cr4Flags::OSXSAVE));
        }
    }
    if !xsave {
        return Hardware {
            method: Method::Fxsave,
            xcr0: XCR0_X87 | XCR0_SSE,
        };
    }
    let supported = {
        let r = cpuid(0xd, 0);
        (r.edx as u64) << 32 | r.eax as u64
    };
    let avx_fits = {
        let r = cpuid(0xd, 2);
        r.ebx == AVX_OFFSET && r.ebx + r.eax <= AREA_BYTES as u32
    };
    let mut xcr0 = XCR0_X87 | XCR0_SSE;
    if avx && supported & XCR0_AVX != 0 && avx_fits {
        xcr0 |= XCR0_AVX;
    }
    // SAFETY: OSXSAVE was just set; x87 | SSE (| AVX) is a valid, supported XCR0.
    unsafe { set_xcr0(xcr0) };
    let method = if cpuid(0xd, 1).eax & 1 != 0 {
        Method::XsaveOpt
    } else {
        Method::Xsave
    };
    Hardware { method, xcr0 }
}

/// Write XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `value` a valid XCR0.
unsafe fn set_xcr0(value: u64) {
    // SAFETY: per the caller.
    unsafe { XCr0::write_raw(value) };
}

/// Set CR0.TS: the next x87/SSE/AVX instruction in user mode raises #NM.
pub fn set_task_switched() {
    // SAFETY: CR0.TS only makes FPU instructions trap; the kernel executes none while it is set
    // (every save and restore clears it first).
    unsafe { Cr0::write_raw(Cr0::read_raw() | Cr0Flags::TASK_SWITCHED.bits()) };
}

/// Clear CR0.TS.
pub fn clear_task_switched() {
    // SAFETY: `clts` only re-enables FPU instructions.
    unsafe { asm!("clts", options(nomem, nostack, preserves_flags)) };
}

impl Hardware {
    /// Save the live registers to `area`. CR0.TS must be clear.
    pub fn save(&self, area: &mut Area) {
        let pointer = area.0.as_mut_ptr();
        let (low, high) = (self.xcr0 as u32, (self.xcr0 >> 32) as u32);
        // SAFETY: `area` is a 64-byte aligned, exclusively borrowed buffer as large as the
        // image of `xcr0`'s components; OSXSAVE/OSFXSR are set and TS is clear (callers).
        unsafe {
            match self.method {
                Method::XsaveOpt => {
                    asm!("xsaveopt64 [{}]", in(reg) pointer, in("eax") low, in("edx") high, options(nostack, preserves_flags))
                }
                Method::Xsave => {
                    asm!("xsave64 [{}]", in(reg) pointer, in("eax") low, in("edx") high, options(nostack, preserves_flags))
                }
                Method::Fxsave => {
                    asm!("fxsave64 [{}]", in(reg) pointer, options(nostack, preserves_flags))
                }
            }
        }
    }

    /// Load the registers from `area` (an image written by [`Hardware::save`] or
    /// [`Area::initial`]). CR0.TS must be clear.
    pub fn restore(&self, area: &Area) {
        let pointer = area.0.as_ptr();
        let (low, high) = (self.xcr0 as u32, (self.xcr0 >> 32) as u32);
        // SAFETY: as for `save`; the image is valid (the kernel wrote it, tasks cannot), so
        // XRSTOR/FXRSTOR do not fault.
        unsafe {
            match self.method {
                Method::XsaveOpt | Method::Xsave => {
                    asm!("xrstor64 [{}]", in(reg) pointer, in("eax") low, in("edx") high, options(nostack, preserves_flags, readonly))
                }
                Method::Fxsave => {
                    asm!("fxrstor64 [{}]", in(reg) pointer, options(nostack, preserves_flags, readonly))
                }
            }
        }
    }
}
