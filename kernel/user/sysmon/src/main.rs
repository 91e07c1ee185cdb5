//! The syscall monitor of the L4Linux mode. Its clients are compartments' VMMs (`client=NAME`
//! once per client, in the order of the badges `1..` of their gates, which the root task gives
//! each VMM with `monitor=SYSMON`); each VMM calls it with every system call of its guest's
//! user space before the guest kernel sees it, and this task answers with the verdict of its
//! policy (`l4linux_glue::syscall_monitor`): allow, deny with an errno, or allow and report
//! the result. The guest cannot reach this task: only the VMMs hold gates to it.
//!
//! Arguments: `client=NAME`..., and the policy: `deny=CALL:ERRNO` (a name or number each,
//! e.g. `deny=mkdir:EACCES`), `allow=CALL,...` (only these; the others get ENOSYS),
//! `report=CALL,...|all` (results wanted), `trace` (print every call). A bad policy is
//! refused with the reason, and the task ends (its clients' system calls are then refused).
//!
//! It keeps, per client, counters per system call (since its start and since the last mark)
//! and a ring of the last calls with their arguments, results and instructions; the guest
//! asks for a mark and a report through its VMM (`l4ctl sysmon mark|report`), and the totals
//! are printed when the compartment ends.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use l4::abi::{MessageTag, Timeouts};
use l4::{ipc, println};
use l4linux_glue::syscall_monitor::{
    format_counts, format_entry, Books, Policy, TraceEntry, Verdict, LABEL_END, LABEL_MARK,
    LABEL_REPORT, LABEL_RESULT, LABEL_SYSCALL, SYSCALL_WORDS,
};

/// A message: its tag, the sender's badge, its first [`SYSCALL_WORDS`] words.
struct Message {
    tag: MessageTag,
    badge: u64,
    words: [u64; SYSCALL_WORDS],
}

/// Reply to the last caller (if `reply`), then wait for the next message. This is the L4Linux
/// mode's hot path, every system call of every client passes here: the raw IPC, words 0..4 in
/// registers and the rest read from the UTCB, without `l4::ipc`'s 64-word message copies.
fn next(reply: Option<(MessageTag, [u64; 2])>) -> Option<Message> {
    let (number, tag, registers) = match reply {
        Some((tag, words)) => (l4::abi::Syscall::ReplyWait, tag, [words[0], words[1], 0, 0]),
        None => (l4::abi::Syscall::Receive, MessageTag(0), [0; 4]),
    };
    // SAFETY: IPC moves data only into registers and our UTCB (see `l4::ipc::raw_ipc`).
    let (rax, tag, badge, registers) = unsafe {
        ipc::raw_ipc(
            number,
            0,
            l4::abi::OPEN_WAIT,
            tag.0,
            Timeouts::INFINITE.0,
            registers,
        )
    };
    if rax != 0 {
        return None;
    }
    let tag = MessageTag(tag);
    let mut words = [0u64; SYSCALL_WORDS];
    words[..4].copy_from_slice(&registers);
    let n = tag.words().min(SYSCALL_WORDS);
    if n > 4 {
        l4::utcb::with_utcb(|u| words[4..n].copy_from_slice(&u.mr[4..n]));
    }
    Some(Message { tag, badge, words })
}

/// The task's name in its lines.
fn me() -> &'static str {
    l4::rt::arguments()
        .split_whitespace()
        .next()
        .unwrap_or("sysmon")
}

fn main() -> i64 {
    let args = l4::rt::arguments();
    let names: Vec<&str> = args
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("client="))
        .collect();
    let policy = match Policy::parse(args.split_whitespace(), false) {
        Ok(p) => p,
        Err(e) => {
            println!("[{}] policy refused: {e}", me());
            return 1;
        }
    };
    if names.is_empty() {
        println!("[{}] give at least one client (client=NAME)", me());
        return 1;
    }
    println!(
        "[{}] monitoring {}: {} denied, {}, results of {}{}",
        me(),
        names.join(", "),
        policy.deny.len(),
        match &policy.allow {
            Some(a) => alloc::format!("an allow-list of {}", a.len()),
            None => alloc::string::String::from("no allow-list"),
        },
        if policy.report_all {
            alloc::string::String::from("all")
        } else {
            alloc::format!("{}", policy.report.len())
        },
        if policy.trace { ", tracing" } else { "" }
    );
    let mut books: Vec<Books> = names.iter().map(|_| Books::new()).collect();
    let mut reply: Option<(MessageTag, [u64; 2])> = None;
    loop {
        let Some(message) = next(reply.take()) else {
            // A caller that went away before our reply: go on serving.
            continue;
        };
        let refuse = (MessageTag::new(-1, 0, 0), [0, 0]);
        let k = message.badge.wrapping_sub(1) as usize;
        let Some(book) = books.get_mut(k) else {
            reply = Some(refuse);
            continue;
        };
        let name = names[k];
        let w = &message.words;
        reply = Some(match message.tag.label() {
            LABEL_SYSCALL if message.tag.words() == SYSCALL_WORDS => {
                let entry = TraceEntry {
                    number: w[0],
                    arguments: [w[1], w[2], w[3], w[4], w[5], w[6]],
                    cr3: w[7],
                    result: None,
                    instructions: None,
                };
                let verdict = policy.verdict(entry.number);
                book.record(entry, verdict);
                if policy.trace {
                    let mut shown = entry;
                    if let Verdict::Deny(errno) = verdict {
                        shown.result = Some((-i64::from(errno)) as u64);
                    }
                    println!("[{}] {name}: {}", me(), format_entry(&shown));
                }
                let n = verdict.encode();
                (MessageTag::new(0, 2, 0), n)
            }
            LABEL_RESULT if message.tag.words() == 4 => {
                let (number, result, instructions, cr3) = (w[0], w[1], w[2], w[3]);
                book.result(number, cr3, result, instructions);
                if policy.trace {
                    let entry = TraceEntry {
                        number,
                        cr3,
                        result: Some(result),
                        instructions: Some(instructions),
                        ..TraceEntry::default()
                    };
                    println!("[{}] {name}: returned {}", me(), format_entry(&entry));
                }
                (MessageTag::new(0, 0, 0), [0, 0])
            }
            LABEL_MARK if message.tag.words() == 1 => {
                book.mark(w[0]);
                println!("[{}] {name}: mark (cr3 {:#x})", me(), w[0]);
                (MessageTag::new(0, 0, 0), [0, 0])
            }
            LABEL_REPORT => {
                let (text, total) = format_counts(&book.since_mark, 16);
                println!(
                    "[{}] {name}: {total} system calls since the mark (cr3 {:#x}): {text}; {} by other processes",
                    me(),
                    book.mark_cr3.unwrap_or(0),
                    book.others_since_mark
                );
                println!("[{}] {name}: the last {} calls:", me(), book.trace.len());
                for entry in book.trace_in_order() {
                    println!("[{}] {name}:   {}", me(), format_entry(entry));
                }
                (MessageTag::new(0, 0, 0), [0, 0])
            }
            LABEL_END => {
                let (text, total) = format_counts(&book.total, 24);
                println!(
                    "[{}] {name} ended: {total} system calls ({} denied): {text}",
                    me(),
                    book.denied
                );
                *book = Books::new();
                (MessageTag::new(0, 0, 0), [0, 0])
            }
            _ => refuse,
        });
    }
}

l4::main!(main);
