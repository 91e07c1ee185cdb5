//! AMD SVM: detection and enabling, the VMCB layout the kernel uses, and the world switch
//! (`vmrun` with the guest's general registers and the host's hidden state saved around it).

use super::paging::{phys_to_virt, PAGE_4K};
use crate::memory::FrameSource;
use core::arch::global_asm;
use x86_64::registers::debug::{DebugAddressRegister, Dr0, Dr1, Dr2, Dr3};
use x86_64::registers::model_specific::{Efer, EferFlags, Msr};
use x86_64::registers::xcontrol::XCr0;

/// VM_HSAVE_PA: the host state-save area.
const VM_HSAVE_PA: u32 = 0xc001_0117;
/// EFER.SVME (one definition, beside the guest-state checks that keep it set).
pub use kernel_core::vcpu_state::EFER_SVME;

/// VMCB control-area and state-save offsets (AMD APM vol. 2, appendix B).
pub mod vmcb {
    /// CR read (bits 0..16) and write (16..32) intercepts.
    pub const INTERCEPT_CR: usize = 0x000;
    /// DR read (bits 0..16) and write (16..32) intercepts.
    pub const INTERCEPT_DR: usize = 0x004;
    /// Exception intercepts (bit per vector).
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    /// Intercept vector 3 (INTR .. SHUTDOWN).
    pub const INTERCEPT_MISC1: usize = 0x00c;
    /// Intercept vector 4 (VMRUN .. XSETBV).
    pub const INTERCEPT_MISC2: usize = 0x010;
    /// Physical address of the I/O permission map.
    pub const IOPM_BASE: usize = 0x040;
    /// Physical address of the MSR permission map.
    pub const MSRPM_BASE: usize = 0x048;
    /// TSC offset.
    pub const TSC_OFFSET: usize = 0x050;
    /// Guest ASID (u32).
    pub const ASID: usize = 0x058;
    /// TLB control (u8).
    pub const TLB_CONTROL: usize = 0x05c;
    /// Virtual interrupt control (V_TPR, V_IRQ, V_INTR_PRIO, V_INTR_MASKING, V_INTR_VECTOR).
    pub const V_INTR: usize = 0x060;
    /// Interrupt shadow.
    pub const INTERRUPT_SHADOW: usize = 0x068;
    /// Exit code.
    pub const EXIT_CODE: usize = 0x070;
    /// EXITINFO1.
    pub const EXIT_INFO1: usize = 0x078;
    /// EXITINFO2.
    pub const EXIT_INFO2: usize = 0x080;
    /// EXITINTINFO.
    pub const EXIT_INT_INFO: usize = 0x088;
    /// Nested paging enable (bit 0).
    pub const NP_ENABLE: usize = 0x090;
    /// Event injection.
    pub const EVENT_INJECT: usize = 0x0a8;
    /// Nested page-table root.
    pub const N_CR3: usize = 0x0b0;
    /// Segment registers: 16 bytes each (selector u16, attributes u16, limit u32, base u64).
    pub const ES: usize = 0x400;
    /// CS.
    pub const CS: usize = 0x410;
    /// SS.
    pub const SS: usize = 0x420;
    /// DS.
    pub const DS: usize = 0x430;
    /// FS.
    pub const FS: usize = 0x440;
    /// GS.
    pub const GS: usize = 0x450;
    /// GDTR.
    pub const GDTR: usize = 0x460;
    /// LDTR.
    pub const LDTR: usize = 0x470;
    /// IDTR.
    pub const IDTR: usize = 0x480;
    /// TR.
    pub const TR: usize = 0x490;
    /// CPL (u8).
    pub const CPL: usize = 0x4cb;
    /// EFER.
    pub const EFER: usize = 0x4d0;
    /// CR4.
    pub const CR4: usize = 0x548;
    /// CR3.
    pub const CR3: usize = 0x550;
    /// CR0.
    pub const CR0: usize = 0x558;
    /// DR7.
    pub const DR7: usize = 0x560;
    /// DR6.
    pub const DR6: usize = 0x568;
    /// RFLAGS.
    pub const RFLAGS: usize = 0x570;
    /// RIP.
    pub const RIP: usize = 0x578;
    /// RSP.
    pub const RSP: usize = 0x5d8;
    /// RAX.
    pub const RAX: usize = 0x5f8;
    /// STAR (LSTAR, CSTAR, SFMASK follow, 8 bytes each).
    pub const STAR: usize = 0x600;
    /// LSTAR.
    pub const LSTAR: usize = 0x608;
    /// CSTAR.
    pub const CSTAR: usize = 0x610;
    /// SFMASK.
    pub const SFMASK: usize = 0x618;
    /// CR2.
    pub const CR2: usize = 0x640;
    /// Guest PAT.
    pub const G_PAT: usize = 0x668;
}

/// Intercept vector 3 bits.
pub mod intercept {
    /// Physical interrupts.
    pub const INTR: u32 = 1 << 0;
    /// NMIs.
    pub const NMI: u32 = 1 << 1;
    /// SMIs.
    pub const SMI: u32 = 1 << 2;
    /// INIT.
    pub const INIT: u32 = 1 << 3;
    /// CPUID.
    pub const CPUID: u32 = 1 << 18;
    /// RSM.
    pub const RSM: u32 = 1 << 19;
    /// INVD.
    pub const INVD: u32 = 1 << 22;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// INVLPGA.
    pub const INVLPGA: u32 = 1 << 26;
    /// I/O instructions (with the permission map).
    pub const IOIO: u32 = 1 << 27;
    /// MSR accesses (with the permission map).
    pub const MSR: u32 = 1 << 28;
    /// Task switches.
    pub const TASK_SWITCH: u32 = 1 << 29;
    /// Shutdown.
    pub const SHUTDOWN: u32 = 1 << 31;
    /// Vector 4: VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, (RDTSCP no), ICEBP,
    /// WBINVD, MONITOR, MWAIT, MWAIT_CONDITIONAL, XSETBV.
    pub const MISC2_ALL: u32 = 0b11_1111_0111_1111;
    /// In the DR intercept word: writes to DR0-DR3 (set until the guest's first one, see
    /// `Vcpu::debug_live`).
    pub const DR0_3_WRITES: u32 = 0xf << 16;
}

/// Whether the CPU offers SVM with nested paging.
pub fn supported() -> bool {
    let id = raw_cpuid::CpuId::new();
    let svm = id
        .get_extended_processor_and_feature_identifiers()
        .is_some_and(|f| f.has_svm());
    let npt = id.get_svm_info().is_some_and(|s| s.has_nested_paging());
    svm && npt
}

/// How many ASIDs the CPU has (CPUID Fn8000_000A EBX, counting the host's ASID 0).
pub fn asid_count() -> u32 {
    raw_cpuid::CpuId::new()
        .get_svm_info()
        .map_or(0, |s| s.supported_asids())
}

/// Whether the CPU has XSAVE (then the kernel enables CR4.OSXSAVE to switch XCR0 around guest
/// runs: a guest's XSETBV cannot be intercepted under QEMU and would otherwise leak into the
/// host and other guests).
pub fn enable_xcr0_switching() -> bool {
    let xsave = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_xsave());
    if xsave {
        // SAFETY: CR4.OSXSAVE only enables XGETBV/XSETBV (the FPU setup at boot has set it
        // already where XSAVE exists); user threads run with the user XCR0 (`fpu::init`).
        unsafe {
            x86_64::registers::control::Cr4::update(|flags| {
                flags.insert(x86_64::registers::control::Cr4Flags::OSXSAVE)
            })
        };
    }
    xsave
}

/// The XCR0 bits the CPU supports (CPUID leaf 0xD).
pub fn supported_xcr0() -> u64 {
    let r = core::arch::x86_64::__cpuid_count(0xd, 0);
    (r.edx as u64) << 32 | r.eax as u64
}

/// Save the extended state components in `mask` (with XCR0 covering them) to the 64-byte
/// aligned area at `area` (physical frame, through the direct map).
///
/// # Safety
/// CR4.OSXSAVE must be set, `area` a kernel-owned frame used only for this.
pub unsafe fn xsave(area: u64, mask: u64) {
    let pointer = super::paging::phys_to_virt(area);
    // SAFETY: per the caller.
    unsafe {
        core::arch::asm!("xsave64 [{}]", in(reg) pointer, in("eax") mask as u32, in("edx") (mask >> 32) as u32)
    };
}

/// Load the extended state components in `mask` from `area` (a zeroed area loads the initial
/// state: all registers cleared).
///
/// # Safety
/// As for [`xsave`]; the area must hold a valid XSAVE image or zeros.
pub unsafe fn xrstor(area: u64, mask: u64) {
    let pointer = super::paging::phys_to_virt(area);
    // SAFETY: per the caller.
    unsafe {
        core::arch::asm!("xrstor64 [{}]", in(reg) pointer, in("eax") mask as u32, in("edx") (mask >> 32) as u32)
    };
}

/// The extended-state components to save and restore around guest runs: everything the CPU
/// supports if its XSAVE image fits a 4 KiB frame, else x87, SSE and AVX.
pub fn saved_xstate() -> u64 {
    let all = supported_xcr0();
    let size = core::arch::x86_64::__cpuid_count(0xd, 0).ecx;
    if size <= 4096 {
        all
    } else {
        all & 7
    }
}

/// Read XCR0.
pub fn xcr0() -> u64 {
    // (Only called when CR4.OSXSAVE is set.)
    XCr0::read_raw()
}

/// Write XCR0.
///
/// # Safety
/// CR4.OSXSAVE must be set and `value` a valid XCR0 (bit 0 set, supported components only).
pub unsafe fn set_xcr0(value: u64) {
    // SAFETY: per the caller.
    unsafe { XCr0::write_raw(value) };
}

/// Load a guest's DR0-DR3 before its run. VMRUN switches DR6 and DR7 (they live in the VMCB)
/// but not DR0-DR3; outside the runs of guests that wrote them they hold 0 (see
/// [`take_debug_registers`]), so only the non-zero values need writing.
///
/// # Safety
/// Only right before `run`: the host's DR7 enables no breakpoint, so the addresses take effect
/// only under the guest's DR7, inside the guest.
pub unsafe fn load_debug_registers(values: &[u64; 4]) {
    // (Writing DR0-DR3 at CPL 0 cannot fault, and the values are ones the CPU accepted from
    // the guest, or 0.)
    if values[0] != 0 {
        Dr0::write(values[0]);
    }
    if values[1] != 0 {
        Dr1::write(values[1]);
    }
    if values[2] != 0 {
        Dr2::write(values[2]);
    }
    if values[3] != 0 {
        Dr3::write(values[3]);
    }
}

/// Read DR0-DR3 (a guest's, right after its run) and set the non-zero ones to 0, so that no
/// task or other guest finds them (the kernel itself uses no breakpoints).
pub fn take_debug_registers() -> [u64; 4] {
    // (Reading and clearing debug registers at CPL 0 has no other effect: the host's DR7
    // enables no breakpoint.)
    let (a, b, c, d) = (Dr0::read(), Dr1::read(), Dr2::read(), Dr3::read());
    if a != 0 {
        Dr0::write(0);
    }
    if b != 0 {
        Dr1::write(0);
    }
    if c != 0 {
        Dr2::write(0);
    }
    if d != 0 {
        Dr3::write(0);
    }
    [a, b, c, d]
}

/// Enable SVM on this CPU with `host_save_area` (a frame) as VM_HSAVE_PA.
pub fn enable(host_save_area: u64) {
    // SAFETY: EFER.SVME only enables the SVM instructions; the host save area is a frame the
    // kernel reserved for the CPU.
    unsafe {
        Efer::update(|flags| flags.insert(EferFlags::SECURE_VIRTUAL_MACHINE_ENABLE));
        Msr::new(VM_HSAVE_PA).write(host_save_area);
    }
}

/// The guest's general registers that `vmrun` does not switch (rax, rsp, rip live in the VMCB).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestRegisters {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

extern "C" {
    fn svm_world_switch(
        guest_vmcb: u64,
        load: *const GuestRegisters,
        host_vmcb: u64,
        save: *mut GuestRegisters,
        copy: *mut GuestRegisters,
    );
}

/// Run the guest of `guest_vmcb` (physical) until the next #VMEXIT, with its general
/// registers from `load`; at the exit they go to `save` and to `copy` both. `host_vmcb`
/// (physical) holds the host's hidden state (FS/GS/TR/LDTR bases, syscall MSRs) across the run.
///
/// # Safety
/// Both VMCBs must be valid, kernel-owned frames; the guest VMCB's nested page tables must
/// map only memory the guest may use. The three pointers must be valid for reads (`load`) and
/// writes of a `GuestRegisters`; `load` may be `save` or `copy`.
pub unsafe fn run(
    guest_vmcb: u64,
    load: *const GuestRegisters,
    save: *mut GuestRegisters,
    copy: *mut GuestRegisters,
    host_vmcb: u64,
) {
    // SAFETY: per the caller; the assembly saves and restores every host register it uses.
    unsafe { svm_world_switch(guest_vmcb, load, host_vmcb, save, copy) }
}

// rdi: guest VMCB, rsi: registers to load, rdx: host VMCB, rcx: where to save them, r8: where
// to copy them.
global_asm!(
    r#"
.section .text
// The guest's general registers into the `GuestRegisters` at rsi (its rsi in rax).
.macro SAVE_GUEST_REGISTERS
    mov [rsi + 0], rbx
    mov [rsi + 8], rcx
    mov [rsi + 16], rdx
    mov [rsi + 24], rax
    mov [rsi + 32], rdi
    mov [rsi + 40], rbp
    mov [rsi + 48], r8
    mov [rsi + 56], r9
    mov [rsi + 64], r10
    mov [rsi + 72], r11
    mov [rsi + 80], r12
    mov [rsi + 88], r13
    mov [rsi + 96], r14
    mov [rsi + 104], r15
.endm
.global svm_world_switch
svm_world_switch:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push r8
    push rcx
    push rdx
    push rdi
    mov rax, rdx
    vmsave rax
    mov rax, rdi
    vmload rax
    mov rbx, [rsi + 0]
    mov rcx, [rsi + 8]
    mov rdx, [rsi + 16]
    mov rdi, [rsi + 32]
    mov rbp, [rsi + 40]
    mov r8,  [rsi + 48]
    mov r9,  [rsi + 56]
    mov r10, [rsi + 64]
    mov r11, [rsi + 72]
    mov r12, [rsi + 80]
    mov r13, [rsi + 88]
    mov r14, [rsi + 96]
    mov r15, [rsi + 104]
    mov rsi, [rsi + 24]
    clgi
    sti
    vmrun rax
    cli
    mov rax, rsi
    mov rsi, [rsp + 16]
    SAVE_GUEST_REGISTERS
    mov rsi, [rsp + 24]
    SAVE_GUEST_REGISTERS
    mov rax, [rsp]
    vmsave rax
    mov rax, [rsp + 8]
    vmload rax
    stgi
    add rsp, 32
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);

/// Per-CPU SVM state, set up at boot when the CPU supports SVM with nested paging.
pub struct Svm {
    /// Host VMCB for `vmsave`/`vmload` of the host's hidden state.
    pub host_vmcb: u64,
    /// I/O permission map (12 KiB, all ports intercepted).
    pub iopm: u64,
    /// MSR permission map (8 KiB, all MSRs intercepted).
    pub msrpm: u64,
    /// The guests' address-space identifiers: each live VM holds one; a VM's death frees it.
    pub asids: kernel_core::AsidAllocator,
    /// Whether XCR0 and the extended state are switched between host and guests.
    pub xcr0_switching: bool,
    /// The state components saved and restored around guest runs (all the CPU supports whose
    /// XSAVE image fits a page, at least x87 and SSE; so at least the user XCR0's).
    pub xstate: u64,
}

/// SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, SFMASK, FS_BASE, GS_BASE, KERNEL_GS_BASE.
const PASSTHROUGH_MSRS: [u32; 10] = [
    0x174,
    0x175,
    0x176,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
];

/// Set up SVM if the CPU has it (called at boot); `None` otherwise.
pub fn init(frames: &mut crate::memory::Pool) -> Option<Svm> {
    if !supported() {
        crate::info!("SVM with nested paging not available: VM objects are not supported");
        return None;
    }
    let host_save = frames.allocate_zeroed()?;
    let host_vmcb = frames.allocate_zeroed()?;
    let iopm = frames.allocate_contiguous(3, 1)?;
    let msrpm = frames.allocate_contiguous(2, 1)?;
    for (base, pages) in [(iopm, 3), (msrpm, 2)] {
        // SAFETY: freshly allocated kernel frames in the direct map.
        unsafe {
            core::ptr::write_bytes(
                phys_to_virt(base) as *mut u8,
                0xff,
                pages * PAGE_4K as usize,
            )
        };
    }
    // MSRs that VMRUN/VMLOAD/VMSAVE keep per guest (the world switch saves and restores the
    // host's around each run): the guest accesses them directly. Everything else exits.
    for msr in PASSTHROUGH_MSRS {
        let (region, index) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (0x800, msr - 0xc000_0000),
            _ => continue,
        };
        let bit = index as usize * 2;
        let byte = phys_to_virt(msrpm) as usize + region + bit / 8;
        // SAFETY: inside the MSR permission map allocated above (two pages); clears the read
        // and write intercept bits of this MSR.
        unsafe { *(byte as *mut u8) &= !(0b11 << (bit % 8)) };
    }
    enable(host_save);
    // DR0-DR3 are 0 outside guest runs (whatever the boot loader left).
    take_debug_registers();
    let xcr0_switching = enable_xcr0_switching();
    crate::info!(
        "SVM enabled with nested paging{}",
        if xcr0_switching {
            ", XCR0 switched per guest"
        } else {
            ""
        }
    );
    Some(Svm {
        host_vmcb,
        iopm,
        msrpm,
        // At most 2^16 (a bitmap of 8 KiB), however many the CPU has.
        asids: kernel_core::AsidAllocator::new(asid_count().min(1 << 16)),
        xcr0_switching,
        xstate: saved_xstate(),
    })
}

/// Make a zeroed XSAVE area the initial state: all components absent (XSTATE_BV = 0) and
/// MXCSR at its reset value (it is loaded whenever SSE state is restored).
pub fn init_xsave_area(frame: u64) {
    // SAFETY: a kernel-owned frame in the direct map; MXCSR lives at byte 24 of the area.
    unsafe { core::ptr::write_unaligned((phys_to_virt(frame) + 24) as *mut u32, 0x1f80) }
}
