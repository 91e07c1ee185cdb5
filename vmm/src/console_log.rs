//! A guest's console output: shown on the compartment's terminal ([`crate::terminal`] tags
//! the lines) line by line, so that a UART that exits once per character does not cost one
//! console message per character and lines of several compartments arrive whole; an
//! unfinished line (a shell prompt) is shown when the guest halts or after
//! [`STALE_MILLISECONDS`]. The lines also go to the VMM to recognise markers in.

use alloc::vec::Vec;

/// How long an unfinished line waits before it is shown anyway.
pub const STALE_MILLISECONDS: u64 = 200;
/// Output held back at most (a longer line is shown in parts).
const HOLD_BYTES: usize = 4096;

/// The lines of one compartment's console.
#[derive(Default)]
pub struct ConsoleLog {
    /// The current line so far (handed to the caller when it ends).
    line: Vec<u8>,
    /// Output not shown yet (after the last newline shown), and the TSC when it began.
    held: Vec<u8>,
    held_since: u64,
}

impl ConsoleLog {
    /// An empty log.
    pub fn new() -> ConsoleLog {
        ConsoleLog::default()
    }

    /// Show `bytes` of guest output; `on_line` sees each line that ends (without its line
    /// end), e.g. to recognise markers.
    pub fn push(&mut self, bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        if bytes.is_empty() {
            return;
        }
        if self.held.is_empty() {
            self.held_since = crate::vcpu::rdtsc();
        }
        self.held.extend_from_slice(bytes);
        if let Some(end) = self.held.iter().rposition(|&b| b == b'\n') {
            crate::terminal::guest_output(&self.held[..=end]);
            self.held.drain(..=end);
            self.held_since = crate::vcpu::rdtsc();
        }
        if self.held.len() >= HOLD_BYTES {
            self.flush();
        }
        for &b in bytes {
            match b {
                b'\n' => self.end_of_line(on_line),
                b'\r' => {}
                _ => self.line.push(b),
            }
        }
    }

    fn end_of_line(&mut self, on_line: &mut dyn FnMut(&str)) {
        on_line(core::str::from_utf8(&self.line).unwrap_or(""));
        self.line.clear();
    }

    /// Show what is held back.
    pub fn flush(&mut self) {
        if !self.held.is_empty() {
            crate::terminal::guest_output(&self.held);
            self.held.clear();
        }
    }

    /// Show what is held back if it waited for [`STALE_MILLISECONDS`] (at TSC `now`).
    pub fn flush_if_stale(&mut self, now: u64, tsc_hz: u64) {
        if !self.held.is_empty()
            && now.saturating_sub(self.held_since) >= tsc_hz / 1000 * STALE_MILLISECONDS
        {
            self.flush();
        }
    }

    /// End an unfinished line (before the VMM prints its own).
    pub fn break_line(&mut self, on_line: &mut dyn FnMut(&str)) {
        self.flush();
        crate::terminal::break_line();
        if !self.line.is_empty() {
            self.end_of_line(on_line);
        }
    }

    /// A whole line from the guest by another way than its console (a log hypercall).
    pub fn line(&mut self, text: &str, on_line: &mut dyn FnMut(&str)) {
        self.break_line(on_line);
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        crate::terminal::guest_output(&bytes);
    }
}
