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
//! A client can also have a serial port of its own (COM2..COM4 of the machine, a socket on the
//! host a user attaches to): `serial=NAME@PORT` with the port's registers (`io=PORT/3`). Its
//! guest's console output is mirrored there as it is (no tags), and what is typed there is
//! that client's input whatever has the focus on COM1 ([`Mux::type_to`]). These ports are
//! polled (every 10 ms while the server waits), not interrupt-driven: COM3 would share COM1's
//! line and COM4 COM2's, and one IRQ object per task is what the root task gives.
//!
//! Arguments: `client=NAME` once per client, in the order of the badges `1..` of their gates;
//! `serial=NAME@PORT` (hexadecimal PORT) for a client's own port.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use cons_mux::protocol::{self, Header, LABEL_CONSOLE, MAX_BYTES, WORDS};
use cons_mux::{Mux, Stream};
use l4::abi::{slots, IrqOp, MessageTag, Timeout, Timeouts, LABEL_IRQ};
use l4::uart::Uart;
use l4::{ipc, println, sys};

/// A client's own serial port.
struct OwnPort {
    client: usize,
    uart: Uart,
    /// Output bytes dropped because the port did not take them (nobody reads its socket
    /// fast enough).
    dropped: u64,
    /// The port did not take the last byte in time: until it is ready again, output is
    /// dropped at once instead of waited for (the server never blocks on a client).
    stalled: bool,
}

/// Bytes taken from a port at a time.
const INPUT_CHUNK: usize = 4096;
/// Reads of the line status before a byte is given up on.
const TRANSMIT_TRIES: u32 = 10_000;
/// How often own ports are looked at while the server waits.
const POLL: Timeout = Timeout::micros(10_000);

impl OwnPort {
    /// Write `bytes`; what the port does not take in time is dropped and counted.
    fn write(&mut self, bytes: &[u8]) {
        if self.stalled {
            if !self.uart.transmit_ready() {
                self.dropped += bytes.len() as u64;
                return;
            }
            self.stalled = false;
        }
        for (i, &byte) in bytes.iter().enumerate() {
            let mut tries = 0;
            while !self.uart.transmit_ready() {
                tries += 1;
                if tries == TRANSMIT_TRIES {
                    self.dropped += (bytes.len() - i) as u64;
                    self.stalled = true;
                    return;
                }
            }
            self.uart.send(byte);
        }
    }
}

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
    let mut own: Vec<OwnPort> = Vec::new();
    for spec in args
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("serial="))
    {
        let parsed = spec.split_once('@').and_then(|(name, port)| {
            let client = names.iter().position(|n| *n == name)?;
            let base = u16::from_str_radix(port.trim_start_matches("0x"), 16).ok()?;
            Some(OwnPort {
                client,
                uart: Uart::at(base),
                dropped: 0,
                stalled: false,
            })
        });
        match parsed {
            Some(port) => own.push(port),
            None => println!("[cons] serial={spec}: not NAME@PORT with a client's NAME; ignored"),
        }
    }
    if keyboard {
        l4::com1::open();
        mux.help(&mut out);
    } else {
        mux.notice(
            "no keyboard (needs io=0x3f8/3 and irq=4): output only",
            &mut out,
        );
    }
    for port in &own {
        port.uart.open_polled();
        let text = alloc::format!(
            "{}'s console is also on the serial port at {:#x}",
            names[port.client],
            port.uart.base()
        );
        mux.notice(&text, &mut out);
    }
    write(&mut out);
    let wait = if own.is_empty() {
        Timeout::INFINITE
    } else {
        POLL
    };

    let mut words = [0u64; WORDS];
    let mut reply: Option<(MessageTag, usize)> = None;
    loop {
        let next = match reply.take() {
            Some((tag, n)) => {
                ipc::reply_wait(tag, &words[..n], Timeouts::new(Timeout::INFINITE, wait))
            }
            None => ipc::wait(Timeouts::new(Timeout::INFINITE, wait)),
        };
        let mut woken = 0;
        for port in &own {
            woken |= mux.type_to(port.client, &port.uart.take_input(INPUT_CHUNK));
        }
        if woken != 0 {
            while let Some(report) = mux.take_drop_report() {
                mux.notice(&report, &mut out);
            }
            write(&mut out);
            notify(woken);
        }
        let message = match next {
            Ok(m) => m,
            // A caller that went away before our reply, or an IPC error: go on serving.
            Err(_) => continue,
        };
        match message.tag.label() {
            LABEL_IRQ if keyboard => {
                let typed = Uart::COM1.take_input(INPUT_CHUNK);
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
                if header.stream == Stream::Guest {
                    for port in own.iter_mut().filter(|p| p.client == k) {
                        let before = port.dropped;
                        port.write(&bytes);
                        if before == 0 && port.dropped > 0 {
                            let text = alloc::format!(
                                "output for {}'s serial port dropped: nobody reads it fast enough",
                                names[k]
                            );
                            mux.notice(&text, &mut out);
                            write(&mut out);
                        }
                    }
                }
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
