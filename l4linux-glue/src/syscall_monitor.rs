//! The syscall monitor of the L4Linux mode: the protocol between a compartment's VMM and its
//! monitor task (`kernel/user/sysmon`), the monitor's policy (parsed from its options, every
//! mistake an error value with a message), and its books (counters per system call, since a
//! mark, and a ring of the last calls with their results).
//!
//! Before the guest kernel sees a system call, the VMM calls the monitor with
//! [`LABEL_SYSCALL`] (words: the number, the six arguments, the guest's CR3, the PID as far as
//! known, 0 when not); the reply is a [`Verdict`]. For [`Verdict::Report`] the VMM sends the
//! result when it catches the guest kernel's SYSRET ([`LABEL_RESULT`]: number, result,
//! instructions between SYSCALL and SYSRET, CR3).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// A system call (VMM to monitor): number, six arguments, CR3, PID (0: unknown).
pub const LABEL_SYSCALL: i32 = 0x5343;
/// The result of a reported system call: number, result, instructions, CR3.
pub const LABEL_RESULT: i32 = 0x5352;
/// Start counting anew the calls of one process (the guest's `l4ctl sysmon mark`, through the
/// VMM; word 0: the CR3 of the process that asked).
pub const LABEL_MARK: i32 = 0x534d;
/// Print the counts since the mark and the trace ring.
pub const LABEL_REPORT: i32 = 0x5350;
/// The compartment ended: print the totals.
pub const LABEL_END: i32 = 0x5345;

/// Words of a [`LABEL_SYSCALL`] message.
pub const SYSCALL_WORDS: usize = 9;
/// Entries of the trace ring.
pub const TRACE_ENTRIES: usize = 32;
/// System call numbers counted one by one (higher ones are counted together).
pub const COUNTED: usize = 512;
/// The largest errno a denial may return (Linux's `MAX_ERRNO`).
pub const MAX_ERRNO: u16 = 4095;

/// What the monitor says about a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the guest kernel run it.
    Allow,
    /// Let it run and send the result when it returns.
    Report,
    /// Do not run it: the program sees `-errno`.
    Deny(u16),
}

impl Verdict {
    /// The reply words: kind (0 allow, 1 report, 2 deny) and errno.
    pub fn encode(self) -> [u64; 2] {
        match self {
            Verdict::Allow => [0, 0],
            Verdict::Report => [1, 0],
            Verdict::Deny(errno) => [2, u64::from(errno)],
        }
    }
    /// The verdict of reply words; `None` for anything malformed (the VMM then allows the call
    /// and says so: a monitor that answers nonsense must not crash the VMM).
    pub fn decode(words: [u64; 2]) -> Option<Verdict> {
        match words {
            [0, _] => Some(Verdict::Allow),
            [1, _] => Some(Verdict::Report),
            [2, e] if (1..=u64::from(MAX_ERRNO)).contains(&e) => Some(Verdict::Deny(e as u16)),
            _ => None,
        }
    }
}

/// x86_64 Linux system call names the policy and the reports use (the others go by number).
const NAMES: &[(&str, u64)] = &[
    ("read", 0),
    ("write", 1),
    ("open", 2),
    ("close", 3),
    ("stat", 4),
    ("fstat", 5),
    ("lstat", 6),
    ("poll", 7),
    ("lseek", 8),
    ("mmap", 9),
    ("mprotect", 10),
    ("munmap", 11),
    ("brk", 12),
    ("rt_sigaction", 13),
    ("rt_sigprocmask", 14),
    ("rt_sigreturn", 15),
    ("ioctl", 16),
    ("pread64", 17),
    ("pwrite64", 18),
    ("readv", 19),
    ("writev", 20),
    ("access", 21),
    ("pipe", 22),
    ("select", 23),
    ("sched_yield", 24),
    ("dup", 32),
    ("dup2", 33),
    ("nanosleep", 35),
    ("getpid", 39),
    ("socket", 41),
    ("connect", 42),
    ("clone", 56),
    ("fork", 57),
    ("vfork", 58),
    ("execve", 59),
    ("exit", 60),
    ("wait4", 61),
    ("kill", 62),
    ("uname", 63),
    ("fcntl", 72),
    ("getdents", 78),
    ("getcwd", 79),
    ("chdir", 80),
    ("rename", 82),
    ("mkdir", 83),
    ("rmdir", 84),
    ("unlink", 87),
    ("symlink", 88),
    ("readlink", 89),
    ("chmod", 90),
    ("umask", 95),
    ("gettimeofday", 96),
    ("getuid", 102),
    ("getgid", 104),
    ("geteuid", 107),
    ("getegid", 108),
    ("setpgid", 109),
    ("getppid", 110),
    ("getpgrp", 111),
    ("setsid", 112),
    ("prctl", 157),
    ("arch_prctl", 158),
    ("mount", 165),
    ("reboot", 169),
    ("gettid", 186),
    ("futex", 202),
    ("getdents64", 217),
    ("set_robust_list", 273),
    ("set_tid_address", 218),
    ("clock_gettime", 228),
    ("exit_group", 231),
    ("openat", 257),
    ("mkdirat", 258),
    ("newfstatat", 262),
    ("unlinkat", 263),
    ("pipe2", 293),
    ("prlimit64", 302),
    ("statx", 332),
];

/// Errno names a denial may use (the others go by number).
const ERRNOS: &[(&str, u16)] = &[
    ("EPERM", 1),
    ("ENOENT", 2),
    ("EIO", 5),
    ("EACCES", 13),
    ("EEXIST", 17),
    ("EINVAL", 22),
    ("ENOSPC", 28),
    ("EROFS", 30),
    ("ENOSYS", 38),
];

/// The name of system call `number`, if the table has it.
pub fn name(number: u64) -> Option<&'static str> {
    NAMES.iter().find(|(_, n)| *n == number).map(|(s, _)| *s)
}

/// A system call by name or number (below [`COUNTED`]).
fn parse_number(text: &str) -> Result<u64, PolicyError> {
    if let Some((_, n)) = NAMES.iter().find(|(s, _)| *s == text) {
        return Ok(*n);
    }
    match text.parse::<u64>() {
        Ok(n) if (n as usize) < COUNTED => Ok(n),
        _ => Err(PolicyError::UnknownSyscall(String::from(text))),
    }
}

/// An errno by name or number (1..=4095).
fn parse_errno(text: &str) -> Result<u16, PolicyError> {
    if let Some((_, n)) = ERRNOS.iter().find(|(s, _)| *s == text) {
        return Ok(*n);
    }
    match text.parse::<u16>() {
        Ok(n) if (1..=MAX_ERRNO).contains(&n) => Ok(n),
        _ => Err(PolicyError::BadErrno(String::from(text))),
    }
}

/// A mistake in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// An option the policy does not know.
    UnknownOption(String),
    /// A system call that is neither a known name nor a number below 512.
    UnknownSyscall(String),
    /// An errno that is neither a known name nor 1..=4095.
    BadErrno(String),
    /// `deny=` without `:ERRNO`.
    DenyWithoutErrno(String),
    /// A system call both denied and allowed.
    Contradiction(u64),
}

impl core::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            PolicyError::UnknownOption(o) => write!(
                f,
                "{o:?}: not a policy option (deny=CALL:ERRNO, allow=CALL,..., report=CALL,...|all, trace)"
            ),
            PolicyError::UnknownSyscall(s) => {
                write!(f, "{s:?}: not a system call name or a number below 512")
            }
            PolicyError::BadErrno(s) => write!(f, "{s:?}: not an errno name or 1..=4095"),
            PolicyError::DenyWithoutErrno(s) => {
                write!(f, "deny={s}: needs the errno to return, deny=CALL:ERRNO")
            }
            PolicyError::Contradiction(n) => {
                write!(f, "system call {n} is both denied and allowed")
            }
        }
    }
}

/// What the monitor does with each system call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Denied calls and their errno.
    pub deny: Vec<(u64, u16)>,
    /// If set, only these calls are allowed; every other is denied with ENOSYS.
    pub allow: Option<Vec<u64>>,
    /// Calls whose results are reported (all of them with `report=all`).
    pub report: Vec<u64>,
    /// Report every call's result.
    pub report_all: bool,
    /// Print every call as it happens.
    pub trace: bool,
}

/// ENOSYS, what calls outside an allow-list get.
pub const ENOSYS: u16 = 38;

impl Policy {
    /// The policy of the monitor options `options` (other options, e.g. `client=NAME`, are the
    /// caller's to skip: only `deny=`, `allow=`, `report=` and `trace` are looked at when
    /// `only_policy` is false; with it true every option must be one of them).
    pub fn parse<'a>(
        options: impl Iterator<Item = &'a str>,
        only_policy: bool,
    ) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        for option in options {
            if let Some(rule) = option.strip_prefix("deny=") {
                let (call, errno) = rule
                    .split_once(':')
                    .ok_or_else(|| PolicyError::DenyWithoutErrno(String::from(rule)))?;
                policy.deny.push((parse_number(call)?, parse_errno(errno)?));
            } else if let Some(list) = option.strip_prefix("allow=") {
                let allowed = policy.allow.get_or_insert_with(Vec::new);
                for call in list.split(',') {
                    allowed.push(parse_number(call)?);
                }
            } else if let Some(list) = option.strip_prefix("report=") {
                if list == "all" {
                    policy.report_all = true;
                } else {
                    for call in list.split(',') {
                        policy.report.push(parse_number(call)?);
                    }
                }
            } else if option == "trace" {
                policy.trace = true;
            } else if only_policy {
                return Err(PolicyError::UnknownOption(String::from(option)));
            }
        }
        if let Some(allowed) = &policy.allow {
            if let Some((n, _)) = policy.deny.iter().find(|(n, _)| allowed.contains(n)) {
                return Err(PolicyError::Contradiction(*n));
            }
        }
        Ok(policy)
    }

    /// The verdict for system call `number`.
    pub fn verdict(&self, number: u64) -> Verdict {
        if let Some((_, errno)) = self.deny.iter().find(|(n, _)| *n == number) {
            return Verdict::Deny(*errno);
        }
        if let Some(allowed) = &self.allow {
            if !allowed.contains(&number) {
                return Verdict::Deny(ENOSYS);
            }
        }
        if self.report_all || self.report.contains(&number) {
            Verdict::Report
        } else {
            Verdict::Allow
        }
    }
}

/// One system call in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TraceEntry {
    /// The number.
    pub number: u64,
    /// The six arguments.
    pub arguments: [u64; 6],
    /// The guest's CR3.
    pub cr3: u64,
    /// The result, when reported (a denial's is `-errno`).
    pub result: Option<u64>,
    /// Instructions from SYSCALL to SYSRET, when reported.
    pub instructions: Option<u64>,
}

/// The monitor's books for one compartment.
pub struct Books {
    /// Calls per number since the start (index [`COUNTED`]: all higher numbers).
    pub total: Vec<u64>,
    /// Calls per number since the last mark, of the process that set it (all, before a mark).
    pub since_mark: Vec<u64>,
    /// The CR3 of the process that set the mark.
    pub mark_cr3: Option<u64>,
    /// Calls of other processes since the mark.
    pub others_since_mark: u64,
    /// Calls denied.
    pub denied: u64,
    /// The last [`TRACE_ENTRIES`] calls, oldest first once full (`next` is the slot to write).
    pub trace: Vec<TraceEntry>,
    next: usize,
}

impl Default for Books {
    fn default() -> Books {
        Books::new()
    }
}

impl Books {
    /// Empty books.
    pub fn new() -> Books {
        Books {
            total: alloc::vec![0; COUNTED + 1],
            since_mark: alloc::vec![0; COUNTED + 1],
            mark_cr3: None,
            others_since_mark: 0,
            denied: 0,
            trace: Vec::new(),
            next: 0,
        }
    }

    /// Count system call `entry` and keep it in the ring.
    pub fn record(&mut self, entry: TraceEntry, verdict: Verdict) {
        let i = (entry.number as usize).min(COUNTED);
        self.total[i] += 1;
        if self.mark_cr3.is_none_or(|cr3| cr3 == entry.cr3) {
            self.since_mark[i] += 1;
        } else {
            self.others_since_mark += 1;
        }
        let mut entry = entry;
        if let Verdict::Deny(errno) = verdict {
            self.denied += 1;
            entry.result = Some((-i64::from(errno)) as u64);
        }
        if self.trace.len() < TRACE_ENTRIES {
            self.trace.push(entry);
        } else {
            self.trace[self.next] = entry;
        }
        self.next = (self.next + 1) % TRACE_ENTRIES;
    }

    /// Fill in the result of the latest traced call `number` of `cr3` that has none yet.
    pub fn result(&mut self, number: u64, cr3: u64, result: u64, instructions: u64) -> bool {
        let n = self.trace.len();
        for k in 0..n {
            // Newest first.
            let i = (self.next + TRACE_ENTRIES - 1 - k) % TRACE_ENTRIES;
            if i >= n {
                continue;
            }
            let e = &mut self.trace[i];
            if e.number == number && e.cr3 == cr3 && e.result.is_none() {
                e.result = Some(result);
                e.instructions = Some(instructions);
                return true;
            }
        }
        false
    }

    /// Start counting anew (`since_mark`) the calls of the process with `cr3`.
    pub fn mark(&mut self, cr3: u64) {
        self.since_mark.iter_mut().for_each(|c| *c = 0);
        self.mark_cr3 = Some(cr3);
        self.others_since_mark = 0;
    }

    /// The trace ring, oldest first.
    pub fn trace_in_order(&self) -> impl Iterator<Item = &TraceEntry> {
        let n = self.trace.len();
        let start = if n < TRACE_ENTRIES { 0 } else { self.next };
        (0..n).map(move |k| &self.trace[(start + k) % n])
    }
}

/// `counts` as `NAME N` pairs, largest first (at most `limit`), and their sum.
pub fn format_counts(counts: &[u64], limit: usize) -> (String, u64) {
    let mut pairs: Vec<(usize, u64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (i, *c))
        .collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total = pairs.iter().map(|p| p.1).sum();
    let mut text = String::new();
    for (i, c) in pairs.into_iter().take(limit) {
        if !text.is_empty() {
            text.push(' ');
        }
        match (i < COUNTED).then(|| name(i as u64)).flatten() {
            Some(n) => {
                let _ = write!(text, "{n} {c}");
            }
            None if i == COUNTED => {
                let _ = write!(text, "other {c}");
            }
            None => {
                let _ = write!(text, "#{i} {c}");
            }
        }
    }
    (text, total)
}

/// One trace line: `name(a0, a1, a2) = result [N instructions]`.
pub fn format_entry(entry: &TraceEntry) -> String {
    let mut text = String::new();
    match name(entry.number) {
        Some(n) => text.push_str(n),
        None => {
            let _ = write!(text, "syscall_{}", entry.number);
        }
    }
    let _ = write!(
        text,
        "({:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}) cr3 {:#x}",
        entry.arguments[0],
        entry.arguments[1],
        entry.arguments[2],
        entry.arguments[3],
        entry.arguments[4],
        entry.arguments[5],
        entry.cr3
    );
    match entry.result {
        Some(r) => {
            let _ = write!(text, " = {}", r as i64);
        }
        None => text.push_str(" = ?"),
    }
    if let Some(i) = entry.instructions {
        let _ = write!(text, " [{i} instructions]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(options: &[&str]) -> Result<Policy, PolicyError> {
        Policy::parse(options.iter().copied(), true)
    }

    #[test]
    fn verdicts_round_trip_and_nonsense_is_refused() {
        for v in [
            Verdict::Allow,
            Verdict::Report,
            Verdict::Deny(13),
            Verdict::Deny(4095),
        ] {
            assert_eq!(Verdict::decode(v.encode()), Some(v));
        }
        assert_eq!(Verdict::decode([2, 0]), None);
        assert_eq!(Verdict::decode([2, 4096]), None);
        assert_eq!(Verdict::decode([3, 0]), None);
        assert_eq!(Verdict::decode([u64::MAX, 1]), None);
    }

    #[test]
    fn deny_allow_and_report() {
        let p = policy(&[
            "deny=mkdir:EACCES",
            "deny=84:2",
            "report=getppid,1",
            "trace",
        ])
        .unwrap();
        assert_eq!(p.verdict(83), Verdict::Deny(13));
        assert_eq!(p.verdict(84), Verdict::Deny(2));
        assert_eq!(p.verdict(110), Verdict::Report);
        assert_eq!(p.verdict(1), Verdict::Report);
        assert_eq!(p.verdict(0), Verdict::Allow);
        assert!(p.trace);
        let p = policy(&["allow=read,write,exit_group", "report=all"]).unwrap();
        assert_eq!(p.verdict(0), Verdict::Report);
        assert_eq!(p.verdict(59), Verdict::Deny(ENOSYS));
        assert_eq!(policy(&[]).unwrap().verdict(59), Verdict::Allow);
    }

    #[test]
    fn bad_policies_are_errors_with_messages() {
        let cases: &[(&[&str], &str)] = &[
            (&["deny=mkdir"], "needs the errno"),
            (&["deny=mkdir:"], "not an errno"),
            (&["deny=mkdir:0"], "not an errno"),
            (&["deny=mkdir:4096"], "not an errno"),
            (&["deny=mkdir:EWHAT"], "not an errno"),
            (&["deny=frobnicate:1"], "not a system call"),
            (&["deny=512:1"], "not a system call"),
            (&["allow=read,,write"], "not a system call"),
            (&["report=-1"], "not a system call"),
            (&["denied=mkdir:1"], "not a policy option"),
            (&["allow=mkdir", "deny=mkdir:1"], "both denied and allowed"),
        ];
        for (options, message) in cases {
            let e = policy(options).unwrap_err();
            let text = alloc::format!("{e}");
            assert!(text.contains(message), "{options:?}: {text}");
        }
        // Options of the task (not policy) are skipped unless only policy is allowed.
        assert!(Policy::parse(["client=alpha", "deny=mkdir:1"].into_iter(), false).is_ok());
    }

    #[test]
    fn books_count_mark_and_trace() {
        let mut b = Books::new();
        let call = |number| TraceEntry {
            number,
            cr3: 0x1000,
            ..TraceEntry::default()
        };
        for _ in 0..1000 {
            b.record(call(110), Verdict::Allow);
        }
        b.mark(0x1000);
        b.record(call(83), Verdict::Deny(13));
        b.record(call(1000), Verdict::Allow);
        // Another process's call after the mark is counted apart.
        b.record(
            TraceEntry {
                number: 61,
                cr3: 0x2000,
                ..TraceEntry::default()
            },
            Verdict::Allow,
        );
        assert_eq!(b.others_since_mark, 1);
        assert_eq!(b.since_mark[61], 0);
        assert_eq!(b.total[61], 1);
        assert_eq!(b.total[110], 1000);
        assert_eq!(b.since_mark[110], 0);
        assert_eq!(b.since_mark[83], 1);
        assert_eq!(b.total[COUNTED], 1);
        assert_eq!(b.denied, 1);
        let (text, sum) = format_counts(&b.total, 10);
        assert_eq!(text, "getppid 1000 wait4 1 mkdir 1 other 1");
        assert_eq!(sum, 1003);
        // The ring keeps the last 32, oldest first; results land on the newest match.
        let entries: Vec<_> = b.trace_in_order().map(|e| e.number).collect();
        assert_eq!(entries.len(), TRACE_ENTRIES);
        assert_eq!(&entries[TRACE_ENTRIES - 3..], &[83, 1000, 61]);
        assert_eq!(
            b.trace_in_order().nth(TRACE_ENTRIES - 3).unwrap().result,
            Some((-13i64) as u64)
        );
        b.record(call(110), Verdict::Report);
        assert!(b.result(110, 0x1000, 42, 900));
        assert!(!b.result(110, 0x2000, 42, 900));
        let last = b.trace_in_order().last().unwrap();
        assert_eq!(
            format_entry(last),
            "getppid(0x0, 0x0, 0x0, 0x0, 0x0, 0x0) cr3 0x1000 = 42 [900 instructions]"
        );
    }
}
