//! Decoding SVM exits for a VMM: instruction lengths (QEMU's SVM has no NRIP save, so the VMM
//! computes them), I/O exit information, and the CPUID and MSR policy test guests see.

/// Length of CPUID.
pub const CPUID_LENGTH: u64 = 2;
/// Length of RDMSR and WRMSR.
pub const MSR_LENGTH: u64 = 2;
/// Length of VMMCALL.
pub const VMMCALL_LENGTH: u64 = 3;
/// Length of HLT.
pub const HLT_LENGTH: u64 = 1;

/// A decoded I/O exit (EXITINFO1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoExit {
    /// The port.
    pub port: u16,
    /// Operand size in bytes.
    pub size: u8,
    /// IN (else OUT).
    pub input: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// Address size of a string instruction in bytes (2, 4 or 8).
    pub address_size: u8,
}

impl IoExit {
    /// Decode EXITINFO1 of an IOIO exit; `None` if the size or address-size bits are invalid.
    pub fn decode(info1: u64) -> Option<IoExit> {
        let size = match (info1 >> 4) & 7 {
            1 => 1,
            2 => 2,
            4 => 4,
            _ => return None,
        };
        let address_size = match (info1 >> 7) & 7 {
            1 => 2,
            2 => 4,
            4 => 8,
            0 => 8,
            _ => return None,
        };
        Some(IoExit {
            port: (info1 >> 16) as u16,
            size,
            input: info1 & 1 != 0,
            string: info1 & 4 != 0,
            rep: info1 & 8 != 0,
            address_size,
        })
    }
}

/// The hypervisor CPUID leaf base and the signature test guests check ("L4RsVMMtests").
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// The signature in EBX, ECX, EDX of [`HYPERVISOR_LEAF`].
pub const SIGNATURE: [u32; 3] = [0x7352_344c, 0x744d_4d56, 0x7374_7365];

/// The CPUID answer a guest gets: `host` is what the VMM's CPU reports for the leaf; the policy
/// hides SVM (no nested virtualization) and advertises the hypervisor leaf.
pub fn cpuid(leaf: u32, subleaf: u32, host: [u32; 4]) -> [u32; 4] {
    let _ = subleaf;
    match leaf {
        0x1 => [host[0], host[1], host[2] | (1 << 31), host[3]],
        0x8000_0001 => [host[0], host[1], host[2] & !(1 << 2), host[3]],
        HYPERVISOR_LEAF => [
            HYPERVISOR_LEAF + 1,
            SIGNATURE[0],
            SIGNATURE[1],
            SIGNATURE[2],
        ],
        0x4000_0001 => [0x1234_5678, 0, 0, 0],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_exit_decoding() {
        // IN al, dx on port 0x3f8: type IN, size 8-bit, address size 64-bit.
        let info = (0x3f8 << 16) | (1 << 4) | (4 << 7) | 1;
        let io = IoExit::decode(info).unwrap();
        assert_eq!(
            (io.port, io.size, io.input, io.string, io.rep),
            (0x3f8, 1, true, false, false)
        );
        let outsd = (0xe0 << 16) | (4 << 4) | (4 << 7) | 4 | 8;
        let io = IoExit::decode(outsd).unwrap();
        assert_eq!(
            (io.size, io.input, io.string, io.rep, io.address_size),
            (4, false, true, true, 8)
        );
        assert_eq!(IoExit::decode(3 << 4), None);
    }

    #[test]
    fn cpuid_policy() {
        let leaf = cpuid(HYPERVISOR_LEAF, 0, [0; 4]);
        assert_eq!(leaf[1..], SIGNATURE);
        let ext = cpuid(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0]);
        assert_eq!(ext[2] & 4, 0);
        assert_eq!(cpuid(1, 0, [0; 4])[2] >> 31, 1);
        assert_eq!(cpuid(7, 0, [1, 2, 3, 4]), [1, 2, 3, 4]);
    }
}
