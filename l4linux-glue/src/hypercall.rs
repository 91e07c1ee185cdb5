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
//! | `0x4c34_0004` | scan | RBX: a seed | RAX: how often the [`secret_pattern`] of the seed occurs in the compartment's guest-physical memory (8-byte aligned), counted by the VMM |
//! | `0x4c34_0005` | monitor mark | — | in the L4Linux mode: the syscall monitor starts counting anew (`-ENOSYS` without a monitor) |
//! | `0x4c34_0006` | monitor report | — | the syscall monitor prints its counts since the mark and its trace ring |
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
/// Count the secret pattern of RBX in guest RAM (the isolation test).
pub const SCAN: u64 = BASE + 4;
/// The syscall monitor's mark (L4Linux mode).
pub const MONITOR_MARK: u64 = BASE + 5;
/// The syscall monitor's report.
pub const MONITOR_REPORT: u64 = BASE + 6;
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
    /// Count the [`secret_pattern`] of this seed in guest RAM.
    Scan(u64),
    /// The syscall monitor starts counting anew.
    MonitorMark,
    /// The syscall monitor prints its counts since the mark.
    MonitorReport,
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
        SCAN => Hypercall::Scan(rbx),
        MONITOR_MARK => Hypercall::MonitorMark,
        MONITOR_REPORT => Hypercall::MonitorReport,
        other => Hypercall::Unknown(other),
    }
}

/// The 32-byte pattern of `seed` for the isolation test: one compartment fills memory with
/// it (`l4ctl fill SEED MB`, which computes the same bytes), another asks its VMM to count it
/// in its own memory (`l4ctl scan SEED`) without ever having the pattern in guest memory. The
/// bytes are four words of SplitMix64 from `seed`, little endian.
pub fn secret_pattern(seed: u64) -> [u64; 4] {
    let mut state = seed;
    core::array::from_fn(|_| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// How often `pattern` occurs in `words` at a word boundary.
pub fn count_pattern(words: impl Iterator<Item = u64>, pattern: &[u64; 4]) -> u64 {
    let mut matched = 0;
    let mut count = 0;
    for word in words {
        if word == pattern[matched] {
            matched += 1;
        } else {
            matched = usize::from(word == pattern[0]);
        }
        if matched == pattern.len() {
            count += 1;
            matched = 0;
        }
    }
    count
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
        assert_eq!(decode(MONITOR_MARK, 0, 0), Hypercall::MonitorMark);
        assert_eq!(decode(MONITOR_REPORT, 0, 0), Hypercall::MonitorReport);
        assert_eq!(decode(BASE + 7, 0, 0), Hypercall::Unknown(BASE + 7));
        assert_eq!(decode(BASE, 0, 0), Hypercall::Unknown(BASE));
    }

    #[test]
    fn the_secret_pattern_is_fixed_and_counted() {
        // SplitMix64's first output for seed 0 (the reference value of the generator).
        assert_eq!(secret_pattern(0)[0], 0xe220_a839_7b1d_cdaf);
        assert_ne!(secret_pattern(7), secret_pattern(8));
        let p = secret_pattern(7);
        let mut memory = alloc::vec![0u64; 3];
        for _ in 0..5 {
            memory.extend_from_slice(&p);
        }
        // A partial match before a real one, and the pattern's first word repeated.
        memory.extend_from_slice(&[p[0], p[1], p[0], p[1], p[2], p[3], 9]);
        assert_eq!(count_pattern(memory.iter().copied(), &p), 6);
        assert_eq!(count_pattern(memory.iter().copied(), &secret_pattern(8)), 0);
        assert_eq!(decode(SCAN, 7, 0), Hypercall::Scan(7));
    }

    #[test]
    fn log_lines_are_one_printable_line() {
        assert_eq!(log_line(b"hello\nworld\x1b[2J"), "hello?world?[2J");
        assert_eq!(log_line(&[0x66, 0xff, 0x6f]), "f\u{fffd}o");
    }
}
