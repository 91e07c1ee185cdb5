//! Decoding of the guest instruction behind an MMIO exit (a nested page fault on a device range).
//!
//! Only the plain data-moving forms that Linux' MMIO accessors (`readb/w/l/q`, `writeb/w/l/q`)
//! compile to are accepted:
//!
//! * `mov r8/r16/r32/r64, [mem]` (`8a`/`8b`, and the `a0`/`a1` absolute-offset forms),
//! * `mov [mem], r8/r16/r32/r64` (`88`/`89`, and `a2`/`a3`),
//! * `mov [mem], imm8/imm16/imm32` (`c6`/`c7`, with REX.W the imm32 is sign-extended to 64 bits),
//! * `movzx r16/r32/r64, byte/word [mem]` (`0f b6`/`0f b7`),
//!
//! with any ModRM/SIB/displacement/REX/operand-size/segment prefix addressing. The memory address
//! itself is not computed: the exit already reports the faulting guest-physical address. Decoding
//! is done with iced-x86 and never panics; the 32- and 64-bit `mov` forms that nearly every
//! MMIO exit of a Linux guest is are recognized first without it.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// What an MMIO instruction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioAccess {
    /// Load `size` bytes into general register `register` (0=rax, 1=rcx, 2=rdx, 3=rbx, 4=rsp,
    /// 5=rbp, 6=rsi, 7=rdi, 8..15=r8..r15), zero-extended to `extend_to` bytes (the destination
    /// width: 4 or 8 write the whole 64-bit register zero-extended as x86 does for 32-bit
    /// destinations; 1 and 2 merge into the low bytes; `extend_to` for movzx is the destination
    /// width). Apply it with [`merge_read`].
    Read {
        /// Bytes loaded from memory (1, 2, 4 or 8).
        size: u8,
        /// Destination general register number (0..=15).
        register: u8,
        /// Destination width in bytes (1, 2, 4 or 8).
        extend_to: u8,
    },
    /// Store `size` bytes taken from general register `register` (low bytes; for the legacy
    /// high-byte registers ah/ch/dh/bh use register 4..7 with `high_byte: true`, i.e. the value is
    /// bits 8..15 of rax/rcx/rdx/rbx respectively).
    WriteRegister {
        /// Bytes stored to memory (1, 2, 4 or 8).
        size: u8,
        /// Source general register number (0..=15; 4..=7 with `high_byte` for ah/ch/dh/bh).
        register: u8,
        /// The source is ah (4), ch (5), dh (6) or bh (7): bits 8..15 of register `register - 4`.
        high_byte: bool,
    },
    /// Store `size` bytes of the immediate `value`.
    WriteImmediate {
        /// Bytes stored to memory (1, 2, 4 or 8).
        size: u8,
        /// The immediate, already sign-extended where the encoding sign-extends it, and masked to
        /// `size` bytes.
        value: u64,
    },
}

/// A decoded MMIO instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioInstruction {
    /// What the instruction does.
    pub access: MmioAccess,
    /// The instruction's length in bytes (add it to rip to skip the emulated instruction).
    pub length: u8,
}

/// Why an instruction could not be decoded as an MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a valid instruction (or were cut short before the instruction ended).
    Invalid,
    /// A valid instruction, but not one of the supported forms.
    Unsupported,
}

/// Decode the 64-bit-mode instruction at the start of `bytes` (up to 15 bytes; fewer if the
/// caller could not fetch more).
pub fn decode_mmio(bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    decode_with_bitness(64, bytes)
}

/// Decode the 32-bit protected-mode instruction (bitness 32) at the start of `bytes`.
pub fn decode_mmio_32(bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    decode_with_bitness(32, bytes)
}

/// Apply a [`MmioAccess::Read`] to a 64-bit register value: returns the new register value given
/// the loaded `data` (only its low `size` bytes are used). A destination of 1 or 2 bytes merges
/// into the low bytes of `old`; a destination of 4 or 8 bytes (or any other width) replaces the
/// whole register, zero-extended, as x86 does for 32- and 64-bit destinations.
pub fn merge_read(old: u64, data: u64, size: u8, extend_to: u8) -> u64 {
    let value = data & byte_mask(size) & byte_mask(extend_to);
    match extend_to {
        1 | 2 => (old & !byte_mask(extend_to)) | value,
        _ => value,
    }
}

/// All ones in the low `bytes` bytes (all 64 bits for 8 or more).
fn byte_mask(bytes: u8) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(bytes) * 8)) - 1
    }
}

/// The forms Linux's MMIO accessors compile to in 64-bit mode, decoded without iced-x86
/// (which costs some 600 instructions per exit, and whose tables, some 450 KiB, a VMM then
/// never pages in): an optional operand-size prefix `66`, an optional REX prefix, and `88`,
/// `89`, `8a`, `8b` (stores and loads), `c6 /0`, `c7 /0` (immediate stores) or `0f b6`,
/// `0f b7` (zero-extending loads) with a memory ModRM and any SIB and displacement. `None`
/// for everything else (decoded in full); host tests check that every answer agrees with
/// iced-x86's.
fn decode_common_64(bytes: &[u8]) -> Option<MmioInstruction> {
    let mut at = 0;
    let operand16 = bytes.first() == Some(&0x66);
    if operand16 {
        at += 1;
    }
    let rex = match *bytes.get(at)? {
        b @ 0x40..=0x4f => {
            at += 1;
            b
        }
        _ => 0,
    };
    let wide = rex & 8 != 0;
    let mut opcode = u16::from(*bytes.get(at)?);
    at += 1;
    if opcode == 0x0f {
        opcode = 0x0f00 | u16::from(*bytes.get(at)?);
        at += 1;
    }
    let modrm = *bytes.get(at)?;
    at += 1;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if mode == 3 {
        return None;
    }
    if rm == 4 {
        let base = bytes.get(at)? & 7;
        at += 1;
        if mode == 0 && base == 5 {
            at += 4;
        }
    } else if mode == 0 && rm == 5 {
        at += 4;
    }
    at += match mode {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    let register = reg | ((rex & 4) << 1);
    // The operand size of the full-size forms.
    let size = if wide {
        8
    } else if operand16 {
        2
    } else {
        4
    };
    let access = match opcode {
        0x88 | 0x8a | 0xc6 if operand16 => return None,
        0x88 => MmioAccess::WriteRegister {
            size: 1,
            // Without REX, 4..7 are ah, ch, dh, bh.
            register,
            high_byte: rex == 0 && reg >= 4,
        },
        // A load into ah..bh has no `Read`.
        0x8a if rex == 0 && reg >= 4 => return None,
        0x8a => MmioAccess::Read {
            size: 1,
            register,
            extend_to: 1,
        },
        0x89 => MmioAccess::WriteRegister {
            size,
            register,
            high_byte: false,
        },
        0x8b => MmioAccess::Read {
            size,
            register,
            extend_to: size,
        },
        0xc6 | 0xc7 if reg != 0 => return None,
        0xc6 => {
            let value = u64::from(*bytes.get(at)?);
            at += 1;
            MmioAccess::WriteImmediate { size: 1, value }
        }
        0xc7 if operand16 && !wide => {
            let value = u64::from(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
            at += 2;
            MmioAccess::WriteImmediate { size: 2, value }
        }
        0xc7 => {
            let imm = i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            // REX.W sign-extends the 32-bit immediate to 64 bits.
            let value = if wide {
                imm as i64 as u64
            } else {
                u64::from(imm as u32)
            };
            MmioAccess::WriteImmediate { size, value }
        }
        0x0fb6 => MmioAccess::Read {
            size: 1,
            register,
            extend_to: size,
        },
        0x0fb7 if operand16 && !wide => return None,
        0x0fb7 => MmioAccess::Read {
            size: 2,
            register,
            extend_to: size,
        },
        _ => return None,
    };
    if at > bytes.len() {
        return None;
    }
    Some(MmioInstruction {
        access,
        length: at as u8,
    })
}

/// Decode one instruction at `bytes` with the given bitness (32 or 64).
fn decode_with_bitness(bitness: u32, bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Invalid);
    }
    if bitness == 64 {
        if let Some(instruction) = decode_common_64(bytes) {
            return Ok(instruction);
        }
    }
    decode_with_iced(bitness, bytes)
}

/// Decode one instruction at `bytes` with iced-x86.
fn decode_with_iced(bitness: u32, bytes: &[u8]) -> Result<MmioInstruction, DecodeError> {
    let mut decoder = Decoder::new(bitness, bytes, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return Err(DecodeError::Invalid);
    }
    let access = classify(&instruction).ok_or(DecodeError::Unsupported)?;
    let length = u8::try_from(instruction.len()).map_err(|_| DecodeError::Invalid)?;
    Ok(MmioInstruction { access, length })
}

/// The access an instruction performs, if it is a supported form.
fn classify(instruction: &Instruction) -> Option<MmioAccess> {
    if instruction.op_count() != 2 {
        return None;
    }
    let (kind0, kind1) = (instruction.op_kind(0), instruction.op_kind(1));
    let memory_size = u8::try_from(instruction.memory_size().size()).ok()?;
    if !matches!(memory_size, 1 | 2 | 4 | 8) {
        return None;
    }
    match instruction.mnemonic() {
        Mnemonic::Mov => match (kind0, kind1) {
            (OpKind::Register, OpKind::Memory) => {
                let destination = gpr(instruction.op_register(0))?;
                // A load into ah/ch/dh/bh has no `Read` representation.
                if destination.high_byte || destination.size != memory_size {
                    return None;
                }
                Some(MmioAccess::Read {
                    size: memory_size,
                    register: destination.number,
                    extend_to: destination.size,
                })
            }
            (OpKind::Memory, OpKind::Register) => {
                let source = gpr(instruction.op_register(1))?;
                if source.size != memory_size {
                    return None;
                }
                Some(MmioAccess::WriteRegister {
                    size: memory_size,
                    register: source.number,
                    high_byte: source.high_byte,
                })
            }
            (
                OpKind::Memory,
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate32to64,
            ) => {
                let value = instruction.try_immediate(1).ok()? & byte_mask(memory_size);
                Some(MmioAccess::WriteImmediate {
                    size: memory_size,
                    value,
                })
            }
            _ => None,
        },
        Mnemonic::Movzx => match (kind0, kind1) {
            (OpKind::Register, OpKind::Memory) => {
                let destination = gpr(instruction.op_register(0))?;
                if destination.high_byte || destination.size <= memory_size {
                    return None;
                }
                Some(MmioAccess::Read {
                    size: memory_size,
                    register: destination.number,
                    extend_to: destination.size,
                })
            }
            _ => None,
        },
        _ => None,
    }
}

/// A general register operand as the MMIO emulation names it.
struct Gpr {
    /// Register number (0..=15; 4..=7 for ah/ch/dh/bh).
    number: u8,
    /// Operand width in bytes.
    size: u8,
    /// One of ah/ch/dh/bh.
    high_byte: bool,
}

/// Describe `register` if it is a general-purpose register.
fn gpr(register: Register) -> Option<Gpr> {
    if !register.is_gpr() {
        return None;
    }
    let high = match register {
        Register::AH => Some(4),
        Register::CH => Some(5),
        Register::DH => Some(6),
        Register::BH => Some(7),
        _ => None,
    };
    if let Some(number) = high {
        return Some(Gpr {
            number,
            size: 1,
            high_byte: true,
        });
    }
    let number = u8::try_from(register.full_register().number()).ok()?;
    let size = u8::try_from(register.size()).ok()?;
    if number > 15 || !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    Some(Gpr {
        number,
        size,
        high_byte: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(
        size: u8,
        register: u8,
        extend_to: u8,
        length: u8,
    ) -> Result<MmioInstruction, DecodeError> {
        Ok(MmioInstruction {
            access: MmioAccess::Read {
                size,
                register,
                extend_to,
            },
            length,
        })
    }

    fn write_reg(
        size: u8,
        register: u8,
        high_byte: bool,
        length: u8,
    ) -> Result<MmioInstruction, DecodeError> {
        Ok(MmioInstruction {
            access: MmioAccess::WriteRegister {
                size,
                register,
                high_byte,
            },
            length,
        })
    }

    fn write_imm(size: u8, value: u64, length: u8) -> Result<MmioInstruction, DecodeError> {
        Ok(MmioInstruction {
            access: MmioAccess::WriteImmediate { size, value },
            length,
        })
    }

    #[test]
    fn loads_of_each_size() {
        // mov al, [rdi]
        assert_eq!(decode_mmio(&[0x8a, 0x07]), read(1, 0, 1, 2));
        // mov cx, [rdi]
        assert_eq!(decode_mmio(&[0x66, 0x8b, 0x0f]), read(2, 1, 2, 3));
        // mov eax, [rdi]
        assert_eq!(decode_mmio(&[0x8b, 0x07]), read(4, 0, 4, 2));
        // mov rax, [rdi+8]
        assert_eq!(decode_mmio(&[0x48, 0x8b, 0x47, 0x08]), read(8, 0, 8, 4));
    }

    #[test]
    fn load_into_extended_registers() {
        // mov r9, [rax]
        assert_eq!(decode_mmio(&[0x4c, 0x8b, 0x08]), read(8, 9, 8, 3));
        // mov r9d, [rax]
        assert_eq!(decode_mmio(&[0x44, 0x8b, 0x08]), read(4, 9, 4, 3));
        // mov r15b, [r12] (REX.RB; r12 as base needs a SIB byte)
        assert_eq!(decode_mmio(&[0x45, 0x8a, 0x3c, 0x24]), read(1, 15, 1, 4));
        // mov sil, [rax] (REX makes 6 mean sil, not dh)
        assert_eq!(decode_mmio(&[0x40, 0x8a, 0x30]), read(1, 6, 1, 3));
    }

    #[test]
    fn load_into_high_byte_register_is_unsupported() {
        // mov ah, [rax]
        assert_eq!(decode_mmio(&[0x8a, 0x20]), Err(DecodeError::Unsupported));
    }

    #[test]
    fn sib_and_disp32_addressing() {
        // mov rax, [rax+rcx*8+0x12345678]
        let bytes = [0x48, 0x8b, 0x84, 0xc8, 0x78, 0x56, 0x34, 0x12];
        assert_eq!(decode_mmio(&bytes), read(8, 0, 8, 8));
        // mov edx, [rip+0x100]
        assert_eq!(
            decode_mmio(&[0x8b, 0x15, 0x00, 0x01, 0x00, 0x00]),
            read(4, 2, 4, 6)
        );
        // mov ebx, fs:[0x10] (segment prefix, SIB with no base and no index, disp32)
        let bytes = [0x64, 0x8b, 0x1c, 0x25, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(decode_mmio(&bytes), read(4, 3, 4, 8));
        // mov [r13+r14*2-0x80], r11w: 0x66, REX.RXB, disp8
        let bytes = [0x66, 0x47, 0x89, 0x5c, 0x75, 0x80];
        assert_eq!(decode_mmio(&bytes), write_reg(2, 11, false, 6));
    }

    #[test]
    fn stores_from_registers() {
        // mov [rax], bl
        assert_eq!(decode_mmio(&[0x88, 0x18]), write_reg(1, 3, false, 2));
        // mov [rax], dx
        assert_eq!(decode_mmio(&[0x66, 0x89, 0x10]), write_reg(2, 2, false, 3));
        // mov [rax], ecx
        assert_eq!(decode_mmio(&[0x89, 0x08]), write_reg(4, 1, false, 2));
        // mov [rax], rsi
        assert_eq!(decode_mmio(&[0x48, 0x89, 0x30]), write_reg(8, 6, false, 3));
        // mov [rsp], r8d
        assert_eq!(
            decode_mmio(&[0x44, 0x89, 0x04, 0x24]),
            write_reg(4, 8, false, 4)
        );
        // mov [r8], al (REX.B)
        assert_eq!(decode_mmio(&[0x41, 0x88, 0x00]), write_reg(1, 0, false, 3));
    }

    #[test]
    fn stores_from_high_byte_registers() {
        // mov [rax], bh
        assert_eq!(decode_mmio(&[0x88, 0x38]), write_reg(1, 7, true, 2));
        // mov [rax], ah
        assert_eq!(decode_mmio(&[0x88, 0x20]), write_reg(1, 4, true, 2));
        // mov [rax], spl (with REX, 4 is spl, not ah)
        assert_eq!(decode_mmio(&[0x40, 0x88, 0x20]), write_reg(1, 4, false, 3));
    }

    #[test]
    fn stores_of_immediates() {
        // mov byte [rax], 0xff
        assert_eq!(decode_mmio(&[0xc6, 0x00, 0xff]), write_imm(1, 0xff, 3));
        // mov word [rax], 0x1234
        assert_eq!(
            decode_mmio(&[0x66, 0xc7, 0x00, 0x34, 0x12]),
            write_imm(2, 0x1234, 5)
        );
        // mov dword [rax], 0x12345678
        let bytes = [0xc7, 0x00, 0x78, 0x56, 0x34, 0x12];
        assert_eq!(decode_mmio(&bytes), write_imm(4, 0x1234_5678, 6));
        // mov dword [rax], 0x80000000 (no sign extension for a 32-bit store)
        let bytes = [0xc7, 0x00, 0x00, 0x00, 0x00, 0x80];
        assert_eq!(decode_mmio(&bytes), write_imm(4, 0x8000_0000, 6));
    }

    #[test]
    fn qword_immediate_store_sign_extends() {
        // mov qword [rax], -1
        let bytes = [0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode_mmio(&bytes), write_imm(8, u64::MAX, 7));
        // mov qword [rax+0x10], 0x7fffffff
        let bytes = [0x48, 0xc7, 0x40, 0x10, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(decode_mmio(&bytes), write_imm(8, 0x7fff_ffff, 8));
    }

    #[test]
    fn movzx_forms() {
        // movzx eax, byte [rdi]
        assert_eq!(decode_mmio(&[0x0f, 0xb6, 0x07]), read(1, 0, 4, 3));
        // movzx eax, word [rdi]
        assert_eq!(decode_mmio(&[0x0f, 0xb7, 0x07]), read(2, 0, 4, 3));
        // movzx rax, byte [rdi]
        assert_eq!(decode_mmio(&[0x48, 0x0f, 0xb6, 0x07]), read(1, 0, 8, 4));
        // movzx ax, byte [rdi]
        assert_eq!(decode_mmio(&[0x66, 0x0f, 0xb6, 0x07]), read(1, 0, 2, 4));
        // movzx r10d, word [rbx+rdx*4+0x44]
        let bytes = [0x44, 0x0f, 0xb7, 0x54, 0x93, 0x44];
        assert_eq!(decode_mmio(&bytes), read(2, 10, 4, 6));
    }

    #[test]
    fn absolute_offset_forms() {
        // mov eax, [0x1122334455667788]
        let bytes = [0xa1, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11];
        assert_eq!(decode_mmio(&bytes), read(4, 0, 4, 9));
        // mov [0x1122334455667788], al
        let bytes = [0xa2, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11];
        assert_eq!(decode_mmio(&bytes), write_reg(1, 0, false, 9));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        // mov eax, [rdi] followed by the next instructions
        let bytes = [0x8b, 0x07, 0x90, 0x90, 0xc3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_mmio(&bytes), read(4, 0, 4, 2));
    }

    #[test]
    fn thirty_two_bit_mode() {
        // mov eax, [edi]
        assert_eq!(decode_mmio_32(&[0x8b, 0x07]), read(4, 0, 4, 2));
        // mov [eax], dx
        assert_eq!(
            decode_mmio_32(&[0x66, 0x89, 0x10]),
            write_reg(2, 2, false, 3)
        );
        // mov [eax], bh
        assert_eq!(decode_mmio_32(&[0x88, 0x38]), write_reg(1, 7, true, 2));
        // mov dword [0x1000], 0x12345678 (disp32 with no base)
        let bytes = [0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12];
        assert_eq!(decode_mmio_32(&bytes), write_imm(4, 0x1234_5678, 10));
        // movzx ecx, byte [esi+ebx*2+4]
        assert_eq!(
            decode_mmio_32(&[0x0f, 0xb6, 0x4c, 0x5e, 0x04]),
            read(1, 1, 4, 5)
        );
        // 0x48 is `dec eax` in 32-bit code, not REX.W
        assert_eq!(
            decode_mmio_32(&[0x48, 0x8b, 0x07]),
            Err(DecodeError::Unsupported)
        );
    }

    #[test]
    fn errors() {
        assert_eq!(decode_mmio(&[]), Err(DecodeError::Invalid));
        assert_eq!(decode_mmio_32(&[]), Err(DecodeError::Invalid));
        // ud2 is a valid instruction, just not a mov
        assert_eq!(decode_mmio(&[0x0f, 0x0b]), Err(DecodeError::Unsupported));
        assert!(decode_mmio(&[0xff, 0xff]).is_err());
        // add [rdi], eax
        assert_eq!(decode_mmio(&[0x01, 0x07]), Err(DecodeError::Unsupported));
        // mov eax, ecx (no memory operand)
        assert_eq!(decode_mmio(&[0x89, 0xc8]), Err(DecodeError::Unsupported));
        // mov eax, 1 (no memory operand)
        assert_eq!(
            decode_mmio(&[0xb8, 1, 0, 0, 0]),
            Err(DecodeError::Unsupported)
        );
        // mov [rax], ds (segment register)
        assert_eq!(decode_mmio(&[0x8c, 0x18]), Err(DecodeError::Unsupported));
        // movsx eax, byte [rdi] (sign extension is not a supported form)
        assert_eq!(
            decode_mmio(&[0x0f, 0xbe, 0x07]),
            Err(DecodeError::Unsupported)
        );
        // movs (string move)
        assert_eq!(decode_mmio(&[0xa5]), Err(DecodeError::Unsupported));
        // truncated: mov eax, [rdi+disp32] with the displacement cut short
        assert_eq!(decode_mmio(&[0x8b, 0x87, 0x00]), Err(DecodeError::Invalid));
        // truncated: opcode only
        assert_eq!(decode_mmio(&[0x8b]), Err(DecodeError::Invalid));
        // lock mov is #UD
        assert_eq!(decode_mmio(&[0xf0, 0x89, 0x07]), Err(DecodeError::Invalid));
        // 0x06 (push es) does not exist in 64-bit mode
        assert_eq!(decode_mmio(&[0x06]), Err(DecodeError::Invalid));
    }

    /// Checks the invariants of any successful decode of `bytes`.
    fn check_result(bytes: &[u8], result: Result<MmioInstruction, DecodeError>, max_register: u8) {
        if let Ok(instruction) = result {
            assert!(instruction.length >= 1 && usize::from(instruction.length) <= bytes.len());
            assert!(instruction.length <= 15);
            match instruction.access {
                MmioAccess::Read {
                    size,
                    register,
                    extend_to,
                } => {
                    assert!(matches!(size, 1 | 2 | 4 | 8));
                    assert!(matches!(extend_to, 1 | 2 | 4 | 8) && extend_to >= size);
                    assert!(register <= max_register);
                }
                MmioAccess::WriteRegister {
                    size,
                    register,
                    high_byte,
                } => {
                    assert!(matches!(size, 1 | 2 | 4 | 8));
                    assert!(register <= max_register);
                    assert!(!high_byte || (size == 1 && (4..=7).contains(&register)));
                }
                MmioAccess::WriteImmediate { size, value } => {
                    assert!(matches!(size, 1 | 2 | 4 | 8));
                    assert_eq!(value & !byte_mask(size), 0);
                }
            }
        }
    }

    #[test]
    fn the_common_forms_agree_with_iced() {
        // Random REX, opcode, ModRM, SIB and displacement bytes, cut at every length: the
        // shortcut either declines or says exactly what iced-x86 says.
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        let (mut taken, mut declined) = (0, 0);
        for _ in 0..20000 {
            let mut bytes = [0u8; 15];
            for byte in bytes.iter_mut() {
                *byte = next() as u8;
            }
            let mut at = 0;
            if next().is_multiple_of(3) {
                bytes[at] = 0x66;
                at += 1;
            }
            if !next().is_multiple_of(4) {
                bytes[at] = 0x40 | (next() as u8 & 0xf);
                at += 1;
            }
            let opcodes: [&[u8]; 8] = [
                &[0x88],
                &[0x89],
                &[0x8a],
                &[0x8b],
                &[0xc6],
                &[0xc7],
                &[0x0f, 0xb6],
                &[0x0f, 0xb7],
            ];
            let opcode = opcodes[next() as usize % opcodes.len()];
            bytes[at..at + opcode.len()].copy_from_slice(opcode);
            at += opcode.len();
            if matches!(opcode, [0xc6] | [0xc7]) && next().is_multiple_of(2) {
                // Mostly /0, the only valid form with memory.
                bytes[at] &= !0x38;
            }
            for cut in 1..=bytes.len() {
                let b = &bytes[..cut];
                match decode_common_64(b) {
                    Some(fast) => {
                        assert_eq!(Ok(fast), decode_with_iced(64, b), "{b:02x?}");
                        taken += 1;
                    }
                    None => declined += 1,
                }
            }
        }
        assert!(taken > 50_000 && declined > 10_000, "{taken} {declined}");
        // What Linux's accessors look like: `mov eax, [rdi]`, `mov [rdx+0x50], esi`,
        // `mov r8, [rip+0x1234]`.
        for (bytes, length) in [
            (&[0x8b, 0x07][..], 2),
            (&[0x89, 0x72, 0x50], 3),
            (&[0x4c, 0x8b, 0x05, 0x34, 0x12, 0, 0], 7),
            (&[0x66, 0x89, 0x07], 3),
            (&[0x66, 0x8b, 0x47, 0x10], 4),
            (&[0x88, 0x27], 2),
            (&[0x40, 0x88, 0x27], 3),
            (&[0x8a, 0x07], 2),
            (&[0xc6, 0x07, 0x05], 3),
            (&[0xc7, 0x07, 1, 0, 0, 0], 6),
            (&[0x48, 0xc7, 0x44, 0x24, 0x08, 0xff, 0xff, 0xff, 0xff], 9),
            (&[0x66, 0xc7, 0x07, 0x34, 0x12], 5),
            (&[0x0f, 0xb6, 0x07], 3),
            (&[0x0f, 0xb7, 0x07], 3),
            (&[0x48, 0x0f, 0xb6, 0x07], 4),
        ] {
            let fast = decode_common_64(bytes).expect("a common form");
            assert_eq!(fast.length, length);
            assert_eq!(Ok(fast), decode_with_iced(64, bytes));
        }
        // Other prefixes and opcodes go to iced-x86.
        assert_eq!(
            decode_common_64(&[0x64, 0x89, 0x07]),
            None,
            "a segment prefix"
        );
        assert_eq!(decode_common_64(&[0x8d, 0x07]), None, "lea");
        assert_eq!(
            decode_common_64(&[0x8b, 0xc0]),
            None,
            "register to register"
        );
    }

    #[test]
    fn fuzz_never_panics() {
        // Every two-byte input, in both modes.
        for first in 0..=255u8 {
            for second in 0..=255u8 {
                let bytes = [first, second];
                check_result(&bytes, decode_mmio(&bytes), 15);
                check_result(&bytes, decode_mmio_32(&bytes), 7);
            }
        }
        // Every prefix of a few hundred pseudo-random 15-byte strings, biased towards the
        // opcodes and prefixes of the supported forms.
        let interesting = [
            0x66, 0x67, 0x48, 0x4c, 0x41, 0x0f, 0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa1, 0xb6,
            0xb7, 0xf0, 0x64,
        ];
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        let mut supported = 0;
        for _ in 0..500 {
            let mut bytes = [0u8; 15];
            for byte in bytes.iter_mut() {
                let random = next();
                *byte = if random.is_multiple_of(3) {
                    interesting[(random >> 8) as usize % interesting.len()]
                } else {
                    (random >> 16) as u8
                };
            }
            for end in 0..=bytes.len() {
                let prefix = &bytes[..end];
                let result = decode_mmio(prefix);
                if result.is_ok() {
                    supported += 1;
                }
                check_result(prefix, result, 15);
                check_result(prefix, decode_mmio_32(prefix), 7);
            }
        }
        assert!(
            supported > 0,
            "the biased inputs should hit some supported forms"
        );
    }

    #[test]
    fn merge_read_byte_and_word_keep_upper_bytes() {
        let old = 0x1122_3344_5566_7788;
        assert_eq!(merge_read(old, 0xab, 1, 1), 0x1122_3344_5566_77ab);
        // Bytes of `data` above `size` are ignored.
        assert_eq!(merge_read(old, 0xffff_ffab, 1, 1), 0x1122_3344_5566_77ab);
        assert_eq!(merge_read(old, 0xbeef, 2, 2), 0x1122_3344_5566_beef);
    }

    #[test]
    fn merge_read_dword_zero_extends_and_qword_replaces() {
        let old = 0x1122_3344_5566_7788;
        assert_eq!(merge_read(old, 0xdead_beef, 4, 4), 0xdead_beef);
        assert_eq!(merge_read(old, 0xffff_ffff_dead_beef, 4, 4), 0xdead_beef);
        assert_eq!(
            merge_read(old, 0x0102_0304_0506_0708, 8, 8),
            0x0102_0304_0506_0708
        );
    }

    #[test]
    fn merge_read_movzx() {
        let old = 0x1122_3344_5566_7788;
        // movzx eax, byte
        assert_eq!(merge_read(old, 0xff, 1, 4), 0xff);
        // movzx eax, word
        assert_eq!(merge_read(old, 0x12_fffe, 2, 4), 0xfffe);
        // movzx rax, byte
        assert_eq!(merge_read(old, 0x80, 1, 8), 0x80);
        // movzx ax, byte: zero-extends into ax, keeps bits 16..63
        assert_eq!(merge_read(old, 0xff, 1, 2), 0x1122_3344_5566_00ff);
    }

    #[test]
    fn merge_read_odd_sizes_do_not_panic() {
        assert_eq!(merge_read(5, 7, 0, 1), 0);
        assert_eq!(merge_read(5, u64::MAX, 255, 255), u64::MAX);
        assert_eq!(merge_read(0x1234, 0xff, 3, 0), 0);
    }

    #[test]
    fn decoded_reads_merge_as_the_cpu_does() {
        // movzx eax, byte [rdi] on rax = all ones, loading 0x80
        let Ok(MmioInstruction {
            access: MmioAccess::Read {
                size, extend_to, ..
            },
            ..
        }) = decode_mmio(&[0x0f, 0xb6, 0x07])
        else {
            panic!("movzx should decode");
        };
        assert_eq!(merge_read(u64::MAX, 0x80, size, extend_to), 0x80);
        // mov al, [rdi] on rax = all ones, loading 0x80
        let Ok(MmioInstruction {
            access: MmioAccess::Read {
                size, extend_to, ..
            },
            ..
        }) = decode_mmio(&[0x8a, 0x07])
        else {
            panic!("mov al should decode");
        };
        assert_eq!(
            merge_read(u64::MAX, 0x80, size, extend_to),
            0xffff_ffff_ffff_ff80
        );
    }
}
