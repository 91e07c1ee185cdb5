//! The console server. Several compartments share the machine's one terminal, COM1: each
//! client (a VMM) sends its guest's console output and its own messages here, and this task
//! shows them line by line, tagged with the client's name and never interleaved mid-line
//! ([`cons_mux::Mux`]). It owns COM1's receive side (the ports `io=0x3f8/3` and the IRQ object
//! for line 4 that the root task made for it, `irq=4`): typed input goes to the client with
//! the focus, switched with `Ctrl-E` and a key. A client learns of new input from its
//! notification IRQ (slot `CONSOLE_CLIENTS + k`, attached by the root task to the client's
//! thread) and fetches it with a call ([`cons_mux::protocol`]); the server never blocks on a
//! client. The transmit side stays the kernel's (its log goes out through it, as ours does).
//!
//! Arguments: `client=NAME` once per client, in the order of the badges `1..` of their gates.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use cons_mux::protocol::{self, Header, LABEL_CONSOLE, MAX_BYTES, WORDS};
use cons_mux::{Mux, Stream};
use l4::abi::{slots, IrqOp, MessageTag, Timeouts, LABEL_IRQ};
use l4::{ipc, println, sys};

/// Write terminal bytes through the kernel's console.
fn write(out: &mut Vec<u8>) {
    sys::debug_write_all(out);
    out.clear();
}

/// Tell the clients in `woken` that input waits for them.
fn notify(woken: u64) {
    for k in 0..slots::MAX_CONSOLE_CLIENTS {
        if woken & (1 << k) != 0 {
            // A client that is not (or no longer) wired simply gets nothing.
            let _ = sys::irq_control(slots::CONSOLE_CLIENTS + k, IrqOp::Trigger, 0);
        }
    }
}

fn main() -> i64 {
    let args = l4::rt::arguments();
    let names: Vec<&str> = args
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("client="))
        .collect();
    if names.is_empty() || names.len() > slots::MAX_CONSOLE_CLIENTS as usize {
        println!(
            "[cons] give 1 to {} clients (client=NAME)",
            slots::MAX_CONSOLE_CLIENTS
        );
        return 1;
    }
    let keyboard = args.split_whitespace().any(|w| w == "io=0x3f8/3")
        && sys::irq_control(slots::IRQ, IrqOp::Attach, slots::SELF_THREAD).is_ok();
    let mut mux = Mux::new(&names);
    let mut out = Vec::new();
    if keyboard {
        l4::com1::open();
        mux.help(&mut out);
    } else {
        mux.notice(
            "no keyboard (needs io=0x3f8/3 and irq=4): output only",
            &mut out,
        );
    }
    write(&mut out);

    let mut words = [0u64; WORDS];
    let mut reply: Option<(MessageTag, usize)> = None;
    loop {
        let next = match reply.take() {
            Some((tag, n)) => ipc::reply_wait(tag, &words[..n], Timeouts::INFINITE),
            None => ipc::wait(Timeouts::INFINITE),
        };
        let message = match next {
            Ok(m) => m,
            // A caller that went away before our reply, or an IPC error: go on serving.
            Err(_) => continue,
        };
        match message.tag.label() {
            LABEL_IRQ if keyboard => {
                let mut typed = Vec::new();
                while typed.len() < 4096 {
                    let Some(byte) = l4::com1::read() else { break };
                    typed.push(byte);
                }
                let _ = sys::irq_control(slots::IRQ, IrqOp::Acknowledge, 0);
                let woken = mux.keyboard(&typed, &mut out);
                while let Some(report) = mux.take_drop_report() {
                    mux.notice(&report, &mut out);
                }
                write(&mut out);
                notify(woken);
            }
            LABEL_CONSOLE => {
                let k = message.badge.wrapping_sub(1) as usize;
                let used = message.tag.words();
                let Some((header, bytes)) =
                    protocol::decode(&message.words, used).filter(|_| k < mux.len())
                else {
                    reply = Some((MessageTag::new(-1, 0, 0), 0));
                    continue;
                };
                mux.output(k, header.stream, &bytes, &mut out);
                write(&mut out);
                let (input, more) = mux.take_input(k, MAX_BYTES);
                let n = protocol::encode(
                    Header {
                        count: 0,
                        stream: Stream::Guest,
                        more,
                    },
                    &input,
                    &mut words,
                );
                reply = Some((MessageTag::new(0, n, 0), n));
            }
            _ => reply = Some((MessageTag::new(-1, 0, 0), 0)),
        }
    }
}

l4::main!(main);
