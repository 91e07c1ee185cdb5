//! SYSCALL and SYSRET for the L4Linux mode: the guest runs with EFER.SCE clear and #UD
//! intercepted, so both instructions fault; the VMM asks [`decode`] whether the instruction at
//! RIP is one of them (in the mode the guest is in) and carries it out with [`execute`] exactly
//! as the CPU does, following the pseudocode of AMD's APM vol. 3 (SYSCALL, SYSRET), against
//! the EFER the guest believes it has ([`CpuState::efer`], SCE as the guest set it).
//!
//! Segments use the VMCB's attribute format (descriptor bits 40..48 in bits 0..8, bits 52..56
//! in bits 8..12). The current privilege level is SS.DPL (the kernel's vCPU interface derives
//! CPL from it). Where the APM leaves SS's hidden attributes unchanged by SYSRET (only the
//! selector is loaded) the flat DPL-3 data segment is loaded, as Intel CPUs and QEMU do: it is
//! what makes CPL 3 in that interface, and Linux reloads SS itself where AMD's behaviour
//! matters (`X86_BUG_SYSRET_SS_ATTRS`).

use iced_x86::{Code, Decoder, DecoderOptions};
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::rflags::RFlags;

/// EFER.SCE.
pub const EFER_SCE: u64 = EferFlags::SYSTEM_CALL_EXTENSIONS.bits();
/// EFER.LMA.
pub const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();
/// RFLAGS.IF.
const RFLAGS_IF: u64 = RFlags::INTERRUPT_FLAG.bits();
/// RFLAGS.RF.
const RFLAGS_RF: u64 = RFlags::RESUME_FLAG.bits();
/// RFLAGS.VM.
const RFLAGS_VM: u64 = RFlags::VIRTUAL_8086_MODE.bits();
/// The RFLAGS bits SYSRET loads from R11 (all defined flags but RF and VM; bit 1 is set).
const SYSRET_RFLAGS: u64 = 0x003c_7fd7;

/// Code segment attributes: 64-bit (L, G), DPL 0, execute/read, accessed, present.
pub const CODE64_DPL0: u16 = 0xa9b;
/// Code segment attributes: 32-bit (D, G), DPL 0.
pub const CODE32_DPL0: u16 = 0xc9b;
/// Code segment attributes: 64-bit, DPL 3.
pub const CODE64_DPL3: u16 = 0xafb;
/// Code segment attributes: 32-bit, DPL 3.
pub const CODE32_DPL3: u16 = 0xcfb;
/// Data (stack) segment attributes: flat (B, G), read/write, accessed, present, DPL 0.
pub const DATA_DPL0: u16 = 0xc93;
/// The same with DPL 3.
pub const DATA_DPL3: u16 = 0xcf3;

/// A segment register (selector and hidden part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// The selector.
    pub selector: u16,
    /// Attributes (VMCB format).
    pub attributes: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

impl Segment {
    /// A flat segment (base 0, limit 4 GiB).
    pub const fn flat(selector: u16, attributes: u16) -> Segment {
        Segment {
            selector,
            attributes,
            limit: 0xffff_ffff,
            base: 0,
        }
    }
    /// The descriptor privilege level.
    pub const fn dpl(&self) -> u8 {
        ((self.attributes >> 5) & 3) as u8
    }
    /// The L (64-bit code) bit.
    pub const fn long(&self) -> bool {
        self.attributes & 0x200 != 0
    }
    /// The D/B (32-bit) bit.
    pub const fn default_32(&self) -> bool {
        self.attributes & 0x400 != 0
    }
}

/// The vCPU state SYSCALL and SYSRET read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuState {
    /// RIP (of the instruction, before; of the target, after).
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RCX.
    pub rcx: u64,
    /// R11.
    pub r11: u64,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// CR0 (PE tells protected mode).
    pub cr0: u64,
    /// EFER as the guest sees it (SCE as it set it).
    pub efer: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub sfmask: u64,
}

/// The mode the CPU is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Real mode (CR0.PE clear).
    Real,
    /// Virtual-8086 mode.
    Virtual8086,
    /// Legacy protected mode, 16- or 32-bit code (`true`: 32-bit).
    Legacy(bool),
    /// Long mode, compatibility submode, 16- or 32-bit code (`true`: 32-bit).
    Compatibility(bool),
    /// 64-bit mode.
    Long64,
}

impl CpuState {
    /// The mode the state is in.
    pub fn mode(&self) -> Mode {
        if self.cr0 & 1 == 0 {
            Mode::Real
        } else if self.rflags & RFLAGS_VM != 0 {
            Mode::Virtual8086
        } else if self.efer & EFER_LMA != 0 {
            if self.cs.long() {
                Mode::Long64
            } else {
                Mode::Compatibility(self.cs.default_32())
            }
        } else {
            Mode::Legacy(self.cs.default_32())
        }
    }
    /// The current privilege level (SS.DPL).
    pub fn cpl(&self) -> u8 {
        self.ss.dpl()
    }
}

/// SYSCALL or SYSRET, as decoded at RIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// SYSCALL (`0f 05`), `length` bytes with its prefixes.
    Syscall {
        /// Length in bytes.
        length: u8,
    },
    /// SYSRET (`0f 07`; with REX.W in 64-bit mode a return to 64-bit mode).
    Sysret {
        /// Length in bytes.
        length: u8,
        /// The 64-bit operand size (REX.W): return to 64-bit mode.
        to_64: bool,
    },
}

/// Decode the instruction `bytes` (fetched at RIP, at most 15 needed) in `mode`: SYSCALL or
/// SYSRET, or `None` for anything else (including those opcodes where the CPU would not
/// decode them: with LOCK, in real or virtual-8086 mode, cut short).
pub fn decode(bytes: &[u8], mode: Mode) -> Option<Instruction> {
    // The forms compilers and Linux emit (`syscall`, `sysretq`) without the decoder: the same
    // answers, checked against it in the tests.
    if let Some(instruction) = decode_common(bytes, mode) {
        return Some(instruction);
    }
    let bitness = match mode {
        Mode::Real | Mode::Virtual8086 => return None,
        Mode::Long64 => 64,
        Mode::Legacy(true) | Mode::Compatibility(true) => 32,
        Mode::Legacy(false) | Mode::Compatibility(false) => 16,
    };
    let bytes = &bytes[..bytes.len().min(15)];
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() || instruction.has_lock_prefix() {
        return None;
    }
    let length = instruction.len() as u8;
    match instruction.code() {
        Code::Syscall => Some(Instruction::Syscall { length }),
        Code::Sysretd => Some(Instruction::Sysret {
            length,
            to_64: false,
        }),
        Code::Sysretq if mode == Mode::Long64 => Some(Instruction::Sysret {
            length,
            to_64: true,
        }),
        _ => None,
    }
}

/// `0f 05` (SYSCALL) in any protected mode and `48 0f 07` (SYSRET to 64-bit mode) in 64-bit
/// mode, the forms that almost every #UD of the L4Linux mode is; `None` for anything else,
/// which [`decode`] leaves to the full decoder.
pub fn decode_common(bytes: &[u8], mode: Mode) -> Option<Instruction> {
    if matches!(mode, Mode::Real | Mode::Virtual8086) {
        return None;
    }
    match bytes {
        [0x0f, 0x05, ..] => Some(Instruction::Syscall { length: 2 }),
        [0x48, 0x0f, 0x07, ..] if mode == Mode::Long64 => Some(Instruction::Sysret {
            length: 3,
            to_64: true,
        }),
        _ => None,
    }
}

/// An exception the instruction raises instead (the state is unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// #UD: EFER.SCE is clear (as the guest sees it).
    InvalidOpcode,
    /// #GP(0): SYSRET outside protected mode or at CPL > 0, or to a non-canonical RIP.
    GeneralProtection,
}

/// Whether `address` is canonical (48-bit virtual addresses).
pub const fn canonical(address: u64) -> bool {
    let top = address >> 47;
    top == 0 || top == 0x1_ffff
}

/// Carry out `instruction` on `state` as the CPU does (APM vol. 3, SYSCALL and SYSRET).
pub fn execute(instruction: Instruction, state: &mut CpuState) -> Result<(), Fault> {
    if state.efer & EFER_SCE == 0 {
        return Err(Fault::InvalidOpcode);
    }
    let mode = state.mode();
    match instruction {
        Instruction::Syscall { length } => {
            let next = state.rip.wrapping_add(u64::from(length));
            let selector = ((state.star >> 32) & 0xffff) as u16;
            if state.efer & EFER_LMA != 0 {
                // SYSCALL_LONG_MODE.
                state.rcx = next;
                state.r11 = state.rflags & !RFLAGS_RF;
                let target = if mode == Mode::Long64 {
                    state.lstar
                } else {
                    state.cstar
                };
                state.cs = Segment::flat(selector & 0xfffc, CODE64_DPL0);
                state.ss = Segment::flat(selector.wrapping_add(8), DATA_DPL0);
                state.rflags = (state.rflags & !state.sfmask) & !RFLAGS_RF;
                state.rip = target;
            } else {
                // SYSCALL_LEGACY_MODE.
                state.rcx = next & 0xffff_ffff;
                state.cs = Segment::flat(selector & 0xfffc, CODE32_DPL0);
                state.ss = Segment::flat(selector.wrapping_add(8), DATA_DPL0);
                state.rflags &= !(RFLAGS_VM | RFLAGS_IF | RFLAGS_RF);
                state.rip = state.star & 0xffff_ffff;
            }
            Ok(())
        }
        Instruction::Sysret { to_64, .. } => {
            if matches!(mode, Mode::Real | Mode::Virtual8086) || state.cpl() != 0 {
                return Err(Fault::GeneralProtection);
            }
            let selector = ((state.star >> 48) & 0xffff) as u16;
            if state.efer & EFER_LMA != 0 {
                // SYSRET_LONG_MODE.
                if to_64 {
                    if !canonical(state.rcx) {
                        return Err(Fault::GeneralProtection);
                    }
                    state.cs = Segment::flat(selector.wrapping_add(16) | 3, CODE64_DPL3);
                    state.rip = state.rcx;
                } else {
                    state.cs = Segment::flat(selector | 3, CODE32_DPL3);
                    state.rip = state.rcx & 0xffff_ffff;
                }
                state.ss = Segment::flat(selector.wrapping_add(8) | 3, DATA_DPL3);
                state.rflags = (state.r11 & SYSRET_RFLAGS) | 2;
            } else {
                // SYSRET_NON_64BIT_MODE: only IF changes in RFLAGS.
                state.cs = Segment::flat(selector | 3, CODE32_DPL3);
                state.ss = Segment::flat(selector.wrapping_add(8) | 3, DATA_DPL3);
                state.rflags |= RFLAGS_IF;
                state.rip = state.rcx & 0xffff_ffff;
            }
            Ok(())
        }
    }
}

/// Complete a SYSCALL from 64-bit user mode without its kernel, as if the kernel had returned
/// `result` with SYSRET (what a denied system call looks like to the program): RAX = result,
/// RCX = the next RIP, R11 = RFLAGS (RF clear), execution goes on after the instruction.
pub fn complete_in_user_mode(state: &mut CpuState, length: u8, rax: &mut u64, result: u64) {
    let next = state.rip.wrapping_add(u64::from(length));
    state.rcx = next;
    state.rflags &= !RFLAGS_RF;
    state.r11 = state.rflags;
    state.rip = next;
    *rax = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.1's STAR: SYSCALL CS 0x10 (__KERNEL_CS), SYSRET base 0x23 (__USER32_CS, so
    /// __USER_CS = 0x33 and __USER_DS = 0x2b).
    const LINUX_STAR: u64 = (0x23 << 48) | (0x10 << 32);
    const LSTAR: u64 = 0xffff_ffff_8160_0000;
    /// Linux's SFMASK: TF, DF, IF, IOPL, AC, NT (X86_EFLAGS_* in syscall_init).
    const SFMASK: u64 = 0x47700;

    fn user() -> CpuState {
        CpuState {
            rip: 0x40_1000,
            rflags: 0x246,
            rcx: 0x1111,
            r11: 0x2222,
            cs: Segment::flat(0x33, CODE64_DPL3),
            ss: Segment::flat(0x2b, DATA_DPL3),
            cr0: 0x8005_0033,
            efer: 0xd01,
            star: LINUX_STAR,
            lstar: LSTAR,
            cstar: 0xffff_ffff_8160_1000,
            sfmask: SFMASK,
        }
    }

    #[test]
    fn decodes_only_syscall_and_sysret() {
        let long = Mode::Long64;
        assert_eq!(
            decode(&[0x0f, 0x05, 0xcc], long),
            Some(Instruction::Syscall { length: 2 })
        );
        assert_eq!(
            decode(&[0x48, 0x0f, 0x07], long),
            Some(Instruction::Sysret {
                length: 3,
                to_64: true
            })
        );
        assert_eq!(
            decode(&[0x0f, 0x07], long),
            Some(Instruction::Sysret {
                length: 2,
                to_64: false
            })
        );
        // Prefixes that the CPU ignores count in the length.
        assert_eq!(
            decode(&[0x66, 0x0f, 0x05], long),
            Some(Instruction::Syscall { length: 3 })
        );
        // ud2, int3, a lone 0f, SYSENTER, LOCK SYSCALL, nothing: not for us.
        for bytes in [
            &[0x0f, 0x0b][..],
            &[0xcc],
            &[0x0f],
            &[0x0f, 0x34],
            &[0xf0, 0x0f, 0x05],
            &[],
            &[0x0f, 0x06],
        ] {
            assert_eq!(decode(bytes, long), None, "{bytes:02x?}");
        }
        // REX.W SYSRET is a 64-bit return only in 64-bit mode; none of them in real mode.
        assert_eq!(
            decode(&[0x0f, 0x05], Mode::Compatibility(true)),
            Some(Instruction::Syscall { length: 2 })
        );
        assert_eq!(decode(&[0x0f, 0x05], Mode::Real), None);
        assert_eq!(decode(&[0x0f, 0x05], Mode::Virtual8086), None);
        // 15 bytes of prefixes and more: too long, not decoded.
        let mut long_one = [0x66u8; 20];
        long_one[18] = 0x0f;
        long_one[19] = 0x05;
        assert_eq!(decode(&long_one, long), None);
    }

    #[test]
    fn syscall_from_64_bit_user_mode() {
        let mut s = user();
        s.rflags = 0x10346; // RF, TF, IF, ZF, PF
        execute(Instruction::Syscall { length: 2 }, &mut s).unwrap();
        assert_eq!(s.rcx, 0x40_1002);
        assert_eq!(s.r11, 0x0346, "R11 = RFLAGS with RF clear");
        assert_eq!(s.rip, LSTAR);
        assert_eq!(s.rflags, 0x0046, "SFMASK cleared IF and TF, RF is clear");
        assert_eq!(s.cs, Segment::flat(0x10, CODE64_DPL0));
        assert_eq!(s.ss, Segment::flat(0x18, DATA_DPL0));
        assert_eq!(s.cpl(), 0);
    }

    #[test]
    fn syscall_in_compatibility_and_legacy_mode() {
        let mut s = user();
        s.cs = Segment::flat(0x23, CODE32_DPL3);
        s.rip = 0x0804_8000;
        execute(Instruction::Syscall { length: 2 }, &mut s).unwrap();
        assert_eq!(s.rip, 0xffff_ffff_8160_1000, "CSTAR");
        assert_eq!(s.cs.attributes, CODE64_DPL0, "always to 64-bit mode");

        let mut s = user();
        s.efer = EFER_SCE;
        s.cs = Segment::flat(0x1b, CODE32_DPL3);
        s.star = (0x1b << 48) | (0x0b << 32) | 0xc010_0000;
        s.rip = 0x1000;
        s.rflags = 0x10246; // RF, IF
        execute(Instruction::Syscall { length: 2 }, &mut s).unwrap();
        assert_eq!(s.rcx, 0x1002);
        assert_eq!(s.rip, 0xc010_0000, "STAR.EIP");
        assert_eq!(s.cs, Segment::flat(0x08, CODE32_DPL0), "RPL bits cleared");
        assert_eq!(s.ss.selector, 0x13);
        assert_eq!(s.rflags & (RFLAGS_IF | RFLAGS_RF | RFLAGS_VM), 0);
        assert_eq!(s.r11, 0x2222, "R11 untouched in legacy mode");
    }

    #[test]
    fn sysret_to_64_bit_user_mode() {
        let mut s = user();
        execute(Instruction::Syscall { length: 2 }, &mut s).unwrap();
        s.r11 = 0x0003_0246 | (1 << 40) | 0x28; // RF, VM, reserved bits 3, 5 and 40
        execute(
            Instruction::Sysret {
                length: 3,
                to_64: true,
            },
            &mut s,
        )
        .unwrap();
        assert_eq!(s.rip, 0x40_1002);
        assert_eq!(s.rflags, 0x246, "RF, VM and reserved bits dropped");
        assert_eq!(s.cs, Segment::flat(0x33, CODE64_DPL3));
        assert_eq!(s.ss, Segment::flat(0x2b, DATA_DPL3));
        assert_eq!(s.cpl(), 3);
        assert_eq!(s.mode(), Mode::Long64);
    }

    #[test]
    fn sysret_to_compatibility_mode_and_from_legacy_mode() {
        let mut s = user();
        s.cs = Segment::flat(0x10, CODE64_DPL0);
        s.ss = Segment::flat(0x18, DATA_DPL0);
        s.rcx = 0xdead_0000_0804_8000;
        s.r11 = 0x202;
        execute(
            Instruction::Sysret {
                length: 2,
                to_64: false,
            },
            &mut s,
        )
        .unwrap();
        assert_eq!(s.rip, 0x0804_8000, "ECX");
        assert_eq!(s.cs, Segment::flat(0x23, CODE32_DPL3));
        assert_eq!(s.mode(), Mode::Compatibility(true));

        let mut s = user();
        s.efer = EFER_SCE;
        s.cs = Segment::flat(0x08, CODE32_DPL0);
        s.ss = Segment::flat(0x10, DATA_DPL0);
        s.star = 0x1b << 48;
        s.rflags = 0x2;
        s.rcx = 0x1234;
        execute(
            Instruction::Sysret {
                length: 2,
                to_64: false,
            },
            &mut s,
        )
        .unwrap();
        assert_eq!(s.rip, 0x1234);
        assert_eq!(s.rflags, 0x202, "legacy SYSRET only sets IF");
        assert_eq!(s.cs.selector, 0x1b);
        assert_eq!(s.ss.selector, 0x23);
    }

    #[test]
    fn faults_as_the_cpu_raises_them() {
        // SCE clear (as the guest sees it): #UD for both, nothing changed.
        let mut s = user();
        s.efer &= !EFER_SCE;
        let before = s;
        assert_eq!(
            execute(Instruction::Syscall { length: 2 }, &mut s),
            Err(Fault::InvalidOpcode)
        );
        assert_eq!(s, before);
        // SYSRET at CPL 3: #GP(0).
        let mut s = user();
        assert_eq!(
            execute(
                Instruction::Sysret {
                    length: 3,
                    to_64: true
                },
                &mut s
            ),
            Err(Fault::GeneralProtection)
        );
        // SYSRET to a non-canonical RIP: #GP(0), state unchanged.
        let mut s = user();
        s.cs = Segment::flat(0x10, CODE64_DPL0);
        s.ss = Segment::flat(0x18, DATA_DPL0);
        s.rcx = 0x0000_8000_0000_0000;
        let before = s;
        assert_eq!(
            execute(
                Instruction::Sysret {
                    length: 3,
                    to_64: true
                },
                &mut s
            ),
            Err(Fault::GeneralProtection)
        );
        assert_eq!(s, before);
        // A 32-bit return takes ECX: no canonical check.
        assert!(execute(
            Instruction::Sysret {
                length: 2,
                to_64: false
            },
            &mut s
        )
        .is_ok());
        // SYSRET in real mode: #GP(0).
        let mut s = user();
        s.cr0 = 0;
        s.ss = Segment::flat(0, DATA_DPL0);
        assert_eq!(
            execute(
                Instruction::Sysret {
                    length: 2,
                    to_64: false
                },
                &mut s
            ),
            Err(Fault::GeneralProtection)
        );
    }

    #[test]
    fn denied_call_returns_to_user_mode() {
        let mut s = user();
        let mut rax = 83;
        s.rflags = 0x10246;
        complete_in_user_mode(&mut s, 2, &mut rax, (-13i64) as u64);
        assert_eq!(rax as i64, -13);
        assert_eq!(s.rip, 0x40_1002);
        assert_eq!(s.rcx, 0x40_1002);
        assert_eq!(s.r11, 0x246);
        assert_eq!(s.cpl(), 3);
    }

    #[test]
    fn the_shortcut_agrees_with_the_decoder() {
        let modes = [
            Mode::Long64,
            Mode::Compatibility(true),
            Mode::Compatibility(false),
            Mode::Legacy(true),
            Mode::Legacy(false),
            Mode::Real,
            Mode::Virtual8086,
        ];
        for mode in modes {
            for bytes in [
                &[0x0f, 0x05, 0x90][..],
                &[0x48, 0x0f, 0x07],
                &[0x0f, 0x07],
                &[0x48],
            ] {
                let Some(short) = decode_common(bytes, mode) else {
                    continue;
                };
                let mut padded = [0x90u8; 15];
                padded[..bytes.len()].copy_from_slice(bytes);
                let bitness = match mode {
                    Mode::Long64 => 64,
                    Mode::Legacy(true) | Mode::Compatibility(true) => 32,
                    _ => 16,
                };
                let full = Decoder::new(bitness, &padded, DecoderOptions::NONE).decode();
                let expected = match full.code() {
                    Code::Syscall => Instruction::Syscall {
                        length: full.len() as u8,
                    },
                    Code::Sysretq => Instruction::Sysret {
                        length: full.len() as u8,
                        to_64: true,
                    },
                    other => panic!("{bytes:02x?} in {mode:?}: the decoder says {other:?}"),
                };
                assert_eq!(short, expected, "{bytes:02x?} in {mode:?}");
            }
        }
        // In 32-bit code 48 is `dec eax`: not a SYSRET.
        assert_eq!(decode(&[0x48, 0x0f, 0x07], Mode::Legacy(true)), None);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes = seed.to_le_bytes();
            let n = (seed >> 60) as usize % 9;
            for mode in [Mode::Long64, Mode::Legacy(true), Mode::Compatibility(false)] {
                let _ = decode(&bytes[..n], mode);
            }
        }
    }
}
