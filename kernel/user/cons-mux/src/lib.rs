//! The console multiplexer's logic, without I/O: several clients (compartments) share one
//! terminal. Their output is shown line by line, each line tagged with the client's name, and
//! a line is never interleaved with another client's: when a second client prints while the
//! first one's line is still open (a shell prompt), the open line is ended on the terminal and
//! continues, tagged again, when its client prints more. Keyboard input goes to one client at
//! a time, the one with the *focus*; `Ctrl-E` followed by a key switches it (`1`..`9` a client
//! by number, `n` the next one, `?` or `h` lists them, `Ctrl-E` again types a literal `Ctrl-E`).
//! Input a client has not fetched yet is kept up to [`INPUT_CAPACITY`] bytes; beyond that the
//! oldest bytes are dropped, counted, and reported by [`Mux::take_drop_report`].
//!
//! [`protocol`] encodes the messages between a client and the console server.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod protocol;

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The key that starts a console command (`Ctrl-E`).
pub const ESCAPE: u8 = 0x05;
/// Input bytes kept per client until it fetches them.
pub const INPUT_CAPACITY: usize = 4096;

/// What a line of a client's output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The guest's console (`[NAME] ...`).
    Guest,
    /// The client's own messages, e.g. its VMM's (`[vmm NAME] ...`).
    Service,
}

struct Client {
    name: String,
    /// The terminal is at the start of a line of this client's (a tag comes first).
    at_line_start: bool,
    /// The stream of the line in progress.
    stream: Stream,
    /// A carriage return not yet written: dropped when a newline follows (the terminal side
    /// turns each newline into CR LF itself).
    carriage_return: bool,
    input: VecDeque<u8>,
    dropped: u64,
}

/// The multiplexer's state.
pub struct Mux {
    clients: Vec<Client>,
    focus: usize,
    /// `Ctrl-E` was typed; the next key is a command.
    escape: bool,
    /// The client whose line is open on the terminal (written without its newline yet).
    open: Option<usize>,
}

/// Which clients got new input from a keyboard chunk (bit `k`: client `k`).
pub type Woken = u64;

impl Mux {
    /// A multiplexer for clients with these names (at most 64); the first one has the focus.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Mux {
        Mux {
            clients: names
                .iter()
                .take(64)
                .map(|n| Client {
                    name: String::from(n.as_ref()),
                    at_line_start: true,
                    stream: Stream::Guest,
                    carriage_return: false,
                    input: VecDeque::new(),
                    dropped: 0,
                })
                .collect(),
            focus: 0,
            escape: false,
            open: None,
        }
    }

    /// The number of clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether there are no clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The name of client `k`.
    pub fn name(&self, k: usize) -> Option<&str> {
        self.clients.get(k).map(|c| c.name.as_str())
    }

    /// The client that has the focus.
    pub fn focus(&self) -> usize {
        self.focus
    }

    /// The terminal bytes for `bytes` of client `k`'s output on `stream` (appended to `out`).
    /// Unknown clients are ignored.
    pub fn output(&mut self, k: usize, stream: Stream, bytes: &[u8], out: &mut Vec<u8>) {
        if k >= self.clients.len() {
            return;
        }
        for &b in bytes {
            if core::mem::take(&mut self.clients[k].carriage_return) && b != b'\n' {
                self.emit(k, stream, b'\r', out);
            }
            if b == b'\r' {
                self.clients[k].carriage_return = true;
                continue;
            }
            self.emit(k, stream, b, out);
        }
    }

    /// End client `k`'s open line, if any (before it writes a message of its own elsewhere).
    pub fn break_line(&mut self, k: usize, out: &mut Vec<u8>) {
        if self.open == Some(k) {
            self.end_open_line(out);
        }
    }

    fn emit(&mut self, k: usize, stream: Stream, byte: u8, out: &mut Vec<u8>) {
        if self.open.is_some_and(|o| o != k)
            || (self.open == Some(k) && self.clients[k].stream != stream)
        {
            self.end_open_line(out);
        }
        let client = &mut self.clients[k];
        if client.at_line_start {
            match stream {
                Stream::Guest => out.extend_from_slice(format!("[{}] ", client.name).as_bytes()),
                Stream::Service => {
                    out.extend_from_slice(format!("[vmm {}] ", client.name).as_bytes())
                }
            }
            client.at_line_start = false;
            client.stream = stream;
        }
        out.push(byte);
        if byte == b'\n' {
            client.at_line_start = true;
            self.open = None;
        } else {
            self.open = Some(k);
        }
    }

    fn end_open_line(&mut self, out: &mut Vec<u8>) {
        if let Some(o) = self.open.take() {
            out.push(b'\n');
            self.clients[o].at_line_start = true;
        }
    }

    /// A line of the console server's own (`[cons] TEXT`), on a line of its own.
    pub fn notice(&mut self, text: &str, out: &mut Vec<u8>) {
        self.end_open_line(out);
        out.extend_from_slice(b"[cons] ");
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
    }

    /// The help text: the clients, which one has the focus, and the keys.
    pub fn help(&mut self, out: &mut Vec<u8>) {
        let list: Vec<String> = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mark = if i == self.focus { "*" } else { "" };
                format!("{}={}{mark}", i + 1, c.name)
            })
            .collect();
        let text = format!(
            "compartments: {} (* has the input); Ctrl-E then 1-9 switches, n the next, ? lists, Ctrl-E Ctrl-E types Ctrl-E",
            list.join(" ")
        );
        self.notice(&text, out);
    }

    /// Typed `bytes`: commands are carried out (their messages appended to `out`), the rest
    /// is queued for the client with the focus. Returns the clients with new input.
    pub fn keyboard(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Woken {
        let mut woken = 0;
        for &b in bytes {
            if core::mem::take(&mut self.escape) {
                match b {
                    ESCAPE => woken |= self.queue(ESCAPE),
                    b'1'..=b'9' if usize::from(b - b'1') < self.clients.len() => {
                        self.switch(usize::from(b - b'1'), out)
                    }
                    b'n' | b'\t' if !self.clients.is_empty() => {
                        self.switch((self.focus + 1) % self.clients.len(), out)
                    }
                    b'?' | b'h' => self.help(out),
                    _ => self.notice("unknown console command; Ctrl-E ? lists the keys", out),
                }
            } else if b == ESCAPE {
                self.escape = true;
            } else {
                woken |= self.queue(b);
            }
        }
        woken
    }

    /// Bytes typed on client `k`'s own terminal (a serial port of its own): all of them are
    /// its input, whatever has the focus, with no console commands. Returns the clients with
    /// new input.
    pub fn type_to(&mut self, k: usize, bytes: &[u8]) -> Woken {
        let Some(client) = self.clients.get_mut(k) else {
            return 0;
        };
        for &b in bytes {
            if client.input.len() >= INPUT_CAPACITY {
                client.input.pop_front();
                client.dropped += 1;
            }
            client.input.push_back(b);
        }
        if bytes.is_empty() {
            0
        } else {
            1 << k
        }
    }

    fn switch(&mut self, k: usize, out: &mut Vec<u8>) {
        self.focus = k;
        let text = format!("input goes to {} now", self.clients[k].name);
        self.notice(&text, out);
    }

    fn queue(&mut self, byte: u8) -> Woken {
        let Some(client) = self.clients.get_mut(self.focus) else {
            return 0;
        };
        if client.input.len() >= INPUT_CAPACITY {
            client.input.pop_front();
            client.dropped += 1;
        }
        client.input.push_back(byte);
        1 << self.focus
    }

    /// Up to `max` bytes of client `k`'s input, oldest first, and whether more remain.
    pub fn take_input(&mut self, k: usize, max: usize) -> (Vec<u8>, bool) {
        let Some(client) = self.clients.get_mut(k) else {
            return (Vec::new(), false);
        };
        let n = max.min(client.input.len());
        let bytes: Vec<u8> = client.input.drain(..n).collect();
        (bytes, !client.input.is_empty())
    }

    /// A message about input a client did not fetch in time, once per loss (then reset).
    pub fn take_drop_report(&mut self) -> Option<String> {
        self.clients.iter_mut().find(|c| c.dropped > 0).map(|c| {
            let n = core::mem::take(&mut c.dropped);
            format!(
                "{n} typed characters for {} dropped: it did not read its input",
                c.name
            )
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    fn text(out: &[u8]) -> std::string::String {
        std::string::String::from_utf8_lossy(out).to_string()
    }

    #[test]
    fn lines_are_tagged_and_crlf_becomes_lf() {
        let mut mux = Mux::new(&["alpha", "beta"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"one\r\ntwo\n", &mut out);
        assert_eq!(text(&out), "[alpha] one\n[alpha] two\n");
        out.clear();
        mux.output(1, Stream::Service, b"exits: 3\n", &mut out);
        assert_eq!(text(&out), "[vmm beta] exits: 3\n");
    }

    #[test]
    fn a_lone_carriage_return_is_kept() {
        let mut mux = Mux::new(&["a"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"50%\r", &mut out);
        mux.output(0, Stream::Guest, b"99%\n", &mut out);
        assert_eq!(text(&out), "[a] 50%\r99%\n");
    }

    #[test]
    fn an_open_line_is_ended_and_continued_with_its_tag() {
        let mut mux = Mux::new(&["alpha", "beta"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"alpha:/# ", &mut out);
        mux.output(1, Stream::Guest, b"booted\n", &mut out);
        mux.output(0, Stream::Guest, b"ls\n", &mut out);
        assert_eq!(text(&out), "[alpha] alpha:/# \n[beta] booted\n[alpha] ls\n");
        // Every line of the terminal has exactly one tag.
        for line in text(&out).lines() {
            assert_eq!(line.matches('[').count(), 1, "{line}");
        }
    }

    #[test]
    fn the_same_client_continues_its_own_line() {
        let mut mux = Mux::new(&["a", "b"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"pro", &mut out);
        mux.output(0, Stream::Guest, b"mpt ", &mut out);
        assert_eq!(text(&out), "[a] prompt ");
    }

    #[test]
    fn a_service_line_breaks_the_guest_line_of_the_same_client() {
        let mut mux = Mux::new(&["a"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"# ", &mut out);
        mux.output(0, Stream::Service, b"stopped\n", &mut out);
        assert_eq!(text(&out), "[a] # \n[vmm a] stopped\n");
    }

    #[test]
    fn notices_and_break_line_end_open_lines() {
        let mut mux = Mux::new(&["a"]);
        let mut out = Vec::new();
        mux.output(0, Stream::Guest, b"# ", &mut out);
        mux.notice("hello", &mut out);
        assert_eq!(text(&out), "[a] # \n[cons] hello\n");
        out.clear();
        mux.output(0, Stream::Guest, b"x", &mut out);
        mux.break_line(0, &mut out);
        mux.break_line(0, &mut out);
        assert_eq!(text(&out), "[a] x\n");
    }

    #[test]
    fn input_goes_to_the_focus_and_ctrl_e_switches_it() {
        let mut mux = Mux::new(&["alpha", "beta"]);
        let mut out = Vec::new();
        assert_eq!(mux.keyboard(b"ls\n", &mut out), 0b01);
        assert_eq!(mux.keyboard(&[ESCAPE, b'2'], &mut out), 0);
        assert_eq!(mux.focus(), 1);
        assert!(text(&out).contains("[cons] input goes to beta now"));
        assert_eq!(mux.keyboard(b"pwd\n", &mut out), 0b10);
        assert_eq!(mux.take_input(0, 100), (b"ls\n".to_vec(), false));
        assert_eq!(mux.take_input(1, 2), (b"pw".to_vec(), true));
        assert_eq!(mux.take_input(1, 100), (b"d\n".to_vec(), false));
        // n cycles, a literal Ctrl-E passes through, out-of-range numbers are refused.
        mux.keyboard(&[ESCAPE, b'n'], &mut out);
        assert_eq!(mux.focus(), 0);
        assert_eq!(mux.keyboard(&[ESCAPE, ESCAPE], &mut out), 0b01);
        assert_eq!(mux.take_input(0, 10).0, [ESCAPE]);
        out.clear();
        mux.keyboard(&[ESCAPE, b'7'], &mut out);
        assert_eq!(mux.focus(), 0);
        assert!(text(&out).contains("unknown console command"));
    }

    #[test]
    fn a_client_terminal_types_to_its_client_only() {
        let mut mux = Mux::new(&["alpha", "beta"]);
        let mut out = Vec::new();
        // beta's own port: its input whatever has the focus, Ctrl-E included, no commands.
        assert_eq!(mux.type_to(1, &[b'l', ESCAPE, b'2', b'\r']), 0b10);
        assert_eq!(mux.focus(), 0);
        assert_eq!(mux.take_input(1, 10).0, [b'l', ESCAPE, b'2', b'\r']);
        assert_eq!(mux.take_input(0, 10).0, b"");
        // COM1 still goes to the focus; nothing for nobody.
        assert_eq!(mux.keyboard(b"x", &mut out), 0b01);
        assert_eq!(mux.type_to(1, b""), 0);
        assert_eq!(mux.type_to(5, b"y"), 0);
        // Its bound holds as for the keyboard's.
        mux.type_to(1, &[b'z'; INPUT_CAPACITY + 3]);
        assert!(mux
            .take_drop_report()
            .is_some_and(|r| r.contains("3 typed characters for beta")));
    }

    #[test]
    fn an_escape_split_across_chunks_still_works() {
        let mut mux = Mux::new(&["a", "b"]);
        let mut out = Vec::new();
        mux.keyboard(&[ESCAPE], &mut out);
        mux.keyboard(b"2x", &mut out);
        assert_eq!(mux.focus(), 1);
        assert_eq!(mux.take_input(1, 10).0, b"x");
    }

    #[test]
    fn help_lists_clients_and_marks_the_focus() {
        let mut mux = Mux::new(&["alpha", "beta"]);
        let mut out = Vec::new();
        mux.keyboard(&[ESCAPE, b'?'], &mut out);
        let t = text(&out);
        assert!(t.contains("1=alpha* 2=beta"), "{t}");
    }

    #[test]
    fn unread_input_is_bounded_and_its_loss_reported() {
        let mut mux = Mux::new(&["a"]);
        let mut out = Vec::new();
        let flood = std::vec![b'x'; INPUT_CAPACITY + 10];
        mux.keyboard(&flood, &mut out);
        assert_eq!(mux.take_input(0, usize::MAX).0.len(), INPUT_CAPACITY);
        let report = mux.take_drop_report().unwrap();
        assert!(
            report.starts_with("10 typed characters for a dropped"),
            "{report}"
        );
        assert_eq!(mux.take_drop_report(), None);
    }

    #[test]
    fn unknown_clients_are_ignored() {
        let mut mux = Mux::new(&["a"]);
        let mut out = Vec::new();
        mux.output(5, Stream::Guest, b"x\n", &mut out);
        assert!(out.is_empty());
        assert_eq!(mux.take_input(5, 10), (Vec::new(), false));
        let mut empty = Mux::new::<&str>(&[]);
        assert_eq!(empty.keyboard(b"abc", &mut out), 0);
        assert_eq!(empty.keyboard(&[ESCAPE, b'n'], &mut out), 0);
    }
}
