//! A guest's console output on the L4 console as it comes (an interactive shell needs its
//! prompt, which ends without a newline), each line starting with the compartment's name in
//! brackets so that the guest's lines stay distinguishable from the kernel's and the VMM's.

use alloc::string::String;
use alloc::vec::Vec;

/// The output of one compartment's console.
pub struct ConsoleLog {
    prefix: String,
    /// The current line so far (handed to the caller when it ends).
    line: Vec<u8>,
    at_line_start: bool,
    /// A carriage return not yet written: dropped if a newline follows (the kernel console
    /// turns each newline into CR LF itself).
    carriage_return: bool,
}

impl ConsoleLog {
    /// The log of compartment `name`.
    pub fn new(name: &str) -> ConsoleLog {
        ConsoleLog {
            prefix: alloc::format!("[{name}] "),
            line: Vec::new(),
            at_line_start: true,
            carriage_return: false,
        }
    }

    /// The prefix of each line (`[NAME] `).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Print `bytes` of guest output; `on_line` sees each line that ends (without its
    /// newline), e.g. to recognise markers.
    pub fn push(&mut self, bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        if bytes.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(bytes.len() + self.prefix.len());
        for &b in bytes {
            if core::mem::take(&mut self.carriage_return) && b != b'\n' {
                out.push(b'\r');
            }
            if b == b'\r' {
                self.carriage_return = true;
                continue;
            }
            if self.at_line_start {
                out.extend_from_slice(self.prefix.as_bytes());
                self.at_line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.at_line_start = true;
                self.end_of_line(on_line);
            } else {
                self.line.push(b);
            }
        }
        for chunk in out.chunks(256) {
            let _ = l4::sys::debug_write(chunk);
        }
    }

    fn end_of_line(&mut self, on_line: &mut dyn FnMut(&str)) {
        on_line(core::str::from_utf8(&self.line).unwrap_or(""));
        self.line.clear();
    }

    /// End an unfinished line (before the VMM prints its own).
    pub fn break_line(&mut self, on_line: &mut dyn FnMut(&str)) {
        if !self.at_line_start {
            let _ = l4::sys::debug_write(b"\n");
            self.at_line_start = true;
            self.end_of_line(on_line);
        }
    }
}
