//! The compartment's terminal: where its guest's console output and the VMM's own messages
//! go, and where its console input comes from.
//!
//! A VMM that is a client of the console server (the root task's `console=SERVER`: a gate in
//! slot `CONSOLE`, and a notification IRQ attached to this thread) sends both kinds of output
//! to the server, which tags each line with the compartment's name and keeps lines of several
//! compartments apart ([`cons_mux`]); the server's notification (an IRQ message, which makes
//! a running vCPU exit with `MESSAGE`) says that typed input waits, and [`fetch`] gets it. A
//! VMM without a server writes to the kernel console itself, through the same line logic with
//! itself as the only client, so its lines look the same; its input, if any, comes from COM1
//! ([`crate::console`]). Either way the guest's lines read `[NAME] ...` and the VMM's
//! `[vmm NAME] ...`.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use cons_mux::protocol::{self, Header, LABEL_CONSOLE, MAX_BYTES, WORDS};
use cons_mux::{Mux, Stream};
use l4::abi::{slots, MessageTag, Timeouts};
use spin::Mutex;

struct Terminal {
    name: String,
    /// Output goes to the console server (else to the kernel console through `local`).
    server: bool,
    local: Mux,
    /// Input the server gave us that the guest has not taken yet.
    input: VecDeque<u8>,
    /// Output the server refused (written to the kernel console instead), and input dropped
    /// because the guest did not take it (reported once the server takes messages again).
    lost: u64,
    lost_input: u64,
    /// Why the server first refused output.
    first_error: Option<l4::abi::Error>,
}

/// Input bytes kept for the guest before the oldest are dropped.
const INPUT_CAPACITY: usize = 16 * 1024;

static TERMINAL: Mutex<Option<Terminal>> = Mutex::new(None);

/// Open the terminal of compartment `name` (the console server if the arguments say
/// `console=...`). Until this is called, [`say`] prints `[vmm] ...` lines.
pub fn open(name: &str) {
    let server = l4::rt::arguments()
        .split_whitespace()
        .any(|w| w.starts_with("console="));
    *TERMINAL.lock() = Some(Terminal {
        name: String::from(name),
        server,
        local: Mux::new(&[name]),
        input: VecDeque::new(),
        lost: 0,
        lost_input: 0,
        first_error: None,
    });
}

/// Whether this compartment's console is the console server's.
pub fn has_server() -> bool {
    TERMINAL.lock().as_ref().is_some_and(|t| t.server)
}

/// The compartment's name (`vmm` before [`open`]).
pub fn name() -> String {
    TERMINAL
        .lock()
        .as_ref()
        .map_or_else(|| String::from("vmm"), |t| t.name.clone())
}

impl Terminal {
    /// Send `bytes` on `stream` to the server, taking the input its replies carry; returns
    /// whether the server took them all.
    fn send(&mut self, stream: Stream, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        let mut all = true;
        loop {
            let n = rest.len().min(MAX_BYTES);
            let mut words = [0u64; WORDS];
            let header = Header {
                count: n,
                stream,
                more: false,
            };
            let used = protocol::encode(header, &rest[..n], &mut words);
            let mut more = false;
            let result = l4::utcb::with_utcb(|u| {
                crate::vcpu::keeping_state(u, |u| {
                    u.call(
                        slots::CONSOLE,
                        MessageTag::new(LABEL_CONSOLE, used, 0),
                        &words[..used],
                        Timeouts::INFINITE,
                    )
                })
            });
            match result {
                Ok(reply) => {
                    if let Some((header, input)) = protocol::decode(&reply.words, reply.tag.words())
                    {
                        for byte in input {
                            if self.input.len() >= INPUT_CAPACITY {
                                self.input.pop_front();
                                self.lost_input += 1;
                            }
                            self.input.push_back(byte);
                        }
                        more = header.more;
                    }
                }
                Err(e) => {
                    if self.first_error.is_none() {
                        self.first_error = Some(e.error);
                        l4::println!(
                            "[vmm {}] the console server refused output: {:?}",
                            self.name,
                            e
                        );
                    }
                    // Not lost: shown on the kernel console directly instead.
                    let mut out = Vec::new();
                    self.local.output(0, stream, &rest[..n], &mut out);
                    l4::sys::debug_write_all(&out);
                    self.lost += n as u64;
                    all = false;
                }
            }
            rest = &rest[n..];
            if rest.is_empty() && !more {
                return all;
            }
        }
    }

    /// Report lost output or input once the server takes messages again.
    fn report_losses(&mut self) {
        if self.lost == 0 && self.lost_input == 0 {
            return;
        }
        let text = alloc::format!(
            "{} bytes of output bypassed the console server ({:?}), {} typed bytes dropped (the guest did not read them)\n",
            self.lost, self.first_error, self.lost_input
        );
        if self.send(Stream::Service, text.as_bytes()) {
            self.lost = 0;
            self.lost_input = 0;
        }
    }

    fn write(&mut self, stream: Stream, bytes: &[u8]) {
        if self.server {
            if self.send(stream, bytes) {
                self.report_losses();
            }
        } else {
            let mut out = Vec::new();
            self.local.output(0, stream, bytes, &mut out);
            l4::sys::debug_write_all(&out);
        }
    }
}

/// Show `bytes` of the guest's console output.
pub fn guest_output(bytes: &[u8]) {
    if let Some(t) = TERMINAL.lock().as_mut() {
        t.write(Stream::Guest, bytes);
    }
}

/// End the guest's open console line, if any (before a line of the VMM's own).
pub fn break_line() {
    if let Some(t) = TERMINAL.lock().as_mut() {
        if t.server {
            // The server ends it when our VMM line arrives (another stream).
        } else {
            let mut out = Vec::new();
            t.local.break_line(0, &mut out);
            l4::sys::debug_write_all(&out);
        }
    }
}

/// A line of the VMM's own: `[vmm NAME] TEXT` (`[vmm] TEXT` before [`open`]).
pub fn say(text: core::fmt::Arguments) {
    let mut guard = TERMINAL.lock();
    match guard.as_mut() {
        Some(t) => {
            let line = alloc::format!("{text}\n");
            t.write(Stream::Service, line.as_bytes());
        }
        None => {
            drop(guard);
            l4::println!("[vmm] {text}");
        }
    }
}

/// Fetch the input the console server has for us (after its notification).
pub fn fetch() {
    if let Some(t) = TERMINAL.lock().as_mut() {
        if t.server {
            t.send(Stream::Guest, &[]);
            t.report_losses();
        }
    }
}

/// Move the input the console server gave us into `into`.
pub fn take_input(into: &mut VecDeque<u8>) {
    if let Some(t) = TERMINAL.lock().as_mut() {
        into.extend(t.input.drain(..));
    }
}

/// Print a line of the VMM's own, `[vmm NAME] ...` ([`terminal::say`](say)).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::terminal::say(format_args!($($arg)*))
    };
}
