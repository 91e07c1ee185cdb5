//! The compartment's hypercall interface: `VMMCALL` with a number in RAX and arguments in RBX,
//! RCX, RDX; the result comes back in RAX (0 or a negative error). KVM's own hypercall numbers
//! (small values, which Linux's KVM guest code may issue) are answered with `-KVM_ENOSYS`, as
//! KVM answers hypercalls it does not know.
//!
//! | RAX | name | arguments | effect |
//! |-----|------|-----------|--------|
//! | `0x4c34_0001` | power off | RBX: exit status (0..=255) | the compartment ends with that status |
//! | `0x4c34_0002` | reboot | — | the compartment ends as rebooted |
//! | `0x4c34_0003` | log | RBX: guest-virtual address, RCX: length (at most [`LOG_MAX`]) | the bytes are printed on the L4 console as one `[NAME] ...` line |
//!
//! The calls are accepted at every privilege level: they concern only the compartment itself
//! (its power button and a debug line), so the guest's user space may use them; the
//! initramfs's `l4ctl` does (`l4ctl poweroff`). A log call whose buffer is not mapped in the
//! guest fails with [`EFAULT`]; too long a buffer with [`EINVAL`].

/// First number of this interface ("L4" in the upper half).
pub const BASE: u64 = 0x4c34_0000;
/// Power off: RBX is the exit status.
pub const POWER_OFF: u64 = BASE + 1;
/// Reboot.
pub const REBOOT: u64 = BASE + 2;
/// Log a line: RBX address, RCX length.
pub const LOG: u64 = BASE + 3;
/// The longest log line in bytes.
pub const LOG_MAX: u64 = 256;

/// KVM's "no such hypercall" (`-KVM_ENOSYS`).
pub const ENOSYS: u64 = (-1000i64) as u64;
/// A guest buffer that is not mapped (`-EFAULT`).
pub const EFAULT: u64 = (-14i64) as u64;
/// A bad argument (`-EINVAL`).
pub const EINVAL: u64 = (-22i64) as u64;

/// A decoded hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// End the compartment with this status.
    PowerOff(u8),
    /// End the compartment as rebooted.
    Reboot,
    /// Print `length` bytes at guest-virtual `address`.
    Log {
        /// Guest-virtual address of the text.
        address: u64,
        /// Its length.
        length: u64,
    },
    /// Not a hypercall of this interface (answer [`ENOSYS`]).
    Unknown(u64),
    /// A known call with bad arguments (answer [`EINVAL`]).
    Invalid,
}

/// Decode the call from the guest's RAX, RBX, RCX.
pub fn decode(rax: u64, rbx: u64, rcx: u64) -> Hypercall {
    match rax {
        POWER_OFF => match u8::try_from(rbx) {
            Ok(status) => Hypercall::PowerOff(status),
            Err(_) => Hypercall::Invalid,
        },
        REBOOT => Hypercall::Reboot,
        LOG if rcx <= LOG_MAX && rbx.checked_add(rcx).is_some() => Hypercall::Log {
            address: rbx,
            length: rcx,
        },
        LOG => Hypercall::Invalid,
        other => Hypercall::Unknown(other),
    }
}

/// Text of a log call as one printable line: control characters (a newline included) become
/// `?`, invalid UTF-8 is replaced.
pub fn log_line(bytes: &[u8]) -> alloc::string::String {
    alloc::string::String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_decode() {
        assert_eq!(decode(POWER_OFF, 3, 0), Hypercall::PowerOff(3));
        assert_eq!(decode(POWER_OFF, 256, 0), Hypercall::Invalid);
        assert_eq!(decode(REBOOT, 0, 0), Hypercall::Reboot);
        assert_eq!(
            decode(LOG, 0x1000, 5),
            Hypercall::Log {
                address: 0x1000,
                length: 5
            }
        );
        assert_eq!(decode(LOG, 0x1000, LOG_MAX + 1), Hypercall::Invalid);
        assert_eq!(decode(LOG, u64::MAX, 2), Hypercall::Invalid);
        // KVM_HC_KICK_CPU and anything else: unknown.
        assert_eq!(decode(5, 0, 0), Hypercall::Unknown(5));
        assert_eq!(decode(BASE, 0, 0), Hypercall::Unknown(BASE));
    }

    #[test]
    fn log_lines_are_one_printable_line() {
        assert_eq!(log_line(b"hello\nworld\x1b[2J"), "hello?world?[2J");
        assert_eq!(log_line(&[0x66, 0xff, 0x6f]), "f\u{fffd}o");
    }
}
