//! Console input for a compartment: from the console server (`console=SERVER`, see
//! [`crate::terminal`]), or from the machine's COM1 when this VMM owns it.
//!
//! COM1 is shared: the kernel writes its log (and the VMM's, and the guests' console lines)
//! through the transmit side with polled output, and never reads. The VMM of the compartment
//! that owns the console gets the receive side: the I/O ports 0x3f8..0x3ff (`io=0x3f8/3`) and
//! an IRQ object for ISA line 4 (`platform`) attached to its vCPU thread, so a key press makes
//! the running vCPU exit (`VcpuRun` returns `MESSAGE`); the VMM then drains the receive FIFO
//! into the guest's UART model and acknowledges the line.

use alloc::collections::VecDeque;
use l4::abi::{slots, IrqOp, ObjectKind, LABEL_IRQ};
use l4::ipc::Received;
use l4::sys;

const COM1_LINE: u64 = l4::com1::LINE;
/// Bytes kept for the guest before the oldest are dropped (the guest reads them as its UART
/// FIFO drains).
const CAPACITY: usize = 4096;

/// Where the input comes from.
enum Source {
    /// COM1's receive side, and our IRQ object for its line.
    Com1 { irq: u64 },
    /// The console server; its notification is an IRQ message too.
    Server,
}

/// The compartment's console input.
pub struct HostConsole {
    source: Source,
    /// Input not yet taken by the guest.
    pub input: VecDeque<u8>,
    /// Bytes dropped because the guest did not read them in time.
    pub dropped: u64,
}

impl HostConsole {
    /// The console server's input if this compartment is its client, else COM1's receive
    /// side if this task was given its ports and the platform capability (`None` otherwise:
    /// the compartment then has no console input).
    pub fn open() -> Option<HostConsole> {
        if crate::terminal::has_server() {
            return Some(HostConsole {
                source: Source::Server,
                input: VecDeque::new(),
                dropped: 0,
            });
        }
        let args = l4::rt::arguments();
        if !args.split_whitespace().any(|w| w == "io=0x3f8/3") {
            return None;
        }
        let irq = l4::thread::alloc_slot();
        sys::factory_create(slots::PLATFORM, ObjectKind::Irq, irq, COM1_LINE, 0).ok()?;
        sys::irq_control(irq, IrqOp::Attach, slots::SELF_THREAD).ok()?;
        l4::com1::open();
        Some(HostConsole {
            source: Source::Com1 { irq },
            input: VecDeque::new(),
            dropped: 0,
        })
    }

    /// Whether `message` is our input's notification; if so, take the input (COM1: drain
    /// the receive FIFO and acknowledge the line).
    pub fn handle(&mut self, message: &Received) -> bool {
        let irq = match self.source {
            Source::Server
                if message.tag.label() == LABEL_IRQ
                    && message.badge == slots::CONSOLE_NOTIFY_BADGE =>
            {
                crate::terminal::fetch();
                self.take_server_input();
                return true;
            }
            Source::Com1 { irq }
                if message.tag.label() == LABEL_IRQ && message.word(0) == COM1_LINE =>
            {
                irq
            }
            _ => return false,
        };
        while let Some(byte) = l4::com1::read() {
            if self.input.len() >= CAPACITY {
                self.input.pop_front();
                self.dropped += 1;
            }
            self.input.push_back(byte);
        }
        let _ = sys::irq_control(irq, IrqOp::Acknowledge, 0);
        true
    }

    /// Take what the console server's replies carried (they may bring input with output).
    pub fn take_server_input(&mut self) {
        if matches!(self.source, Source::Server) {
            crate::terminal::take_input(&mut self.input);
        }
    }
}
