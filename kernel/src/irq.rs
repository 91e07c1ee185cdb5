//! IRQ objects: an interrupt line delivered as IPC to the one attached thread. The line stays
//! masked from delivery until the thread acknowledges; multiplexing is left to user level.

use crate::arch::x86_64::ioapic;
use crate::kernel::Kernel;
use crate::object::{IrqId, ThreadId};
use crate::thread::{Awaiting, ThreadState};
use l4_abi::{MessageTag, LABEL_IRQ};

/// IOAPIC inputs (global system interrupts) that IRQ objects can name.
pub const HARDWARE_LINES: u32 = 24;
/// Software-only lines (`32..64`), raised by [`l4_abi::IrqOp::Trigger`].
pub const SOFTWARE_LINES: core::ops::Range<u32> = 32..64;
/// Lines in all.
pub const LINES: usize = 64;

/// An IRQ object.
#[derive(Debug)]
pub struct Irq {
    /// The line (GSI for hardware lines).
    pub line: u32,
    /// The receiving thread and the badge its messages carry.
    pub receiver: Option<(ThreadId, u64)>,
    /// An interrupt arrived and was not yet delivered.
    pub pending: bool,
    /// The task that created it (the object dies with it and frees the line).
    pub owner: crate::object::TaskId,
    /// Capabilities that name it (it is destroyed, freeing the line, when the last one goes).
    pub references: u64,
}

/// Free the line of IRQ object `irq` (removed from its arena): masked, pending interrupt
/// dropped, free for a new object.
pub fn destroy(k: &mut Kernel, irq: &Irq) {
    if irq.pending {
        k.pending_irqs -= 1;
    }
    if irq.line < HARDWARE_LINES {
        ioapic::set_masked(irq.line, true);
    }
    if k.irq_lines[irq.line as usize].is_some_and(|id| k.irqs.get(id).is_none()) {
        k.irq_lines[irq.line as usize] = None;
    }
}

/// Whether `line` may be named by an IRQ object.
pub fn valid_line(line: u64) -> bool {
    line < HARDWARE_LINES as u64 || SOFTWARE_LINES.contains(&(line as u32))
}

/// Record an interrupt on `irq` and deliver it if the receiver waits.
pub fn raise(k: &mut Kernel, irq: IrqId) {
    if let Some(object) = k.irqs.get_mut(irq) {
        if !object.pending {
            object.pending = true;
            k.pending_irqs += 1;
        }
    }
    if let Some((thread, _)) = k.irqs.get(irq).and_then(|i| i.receiver) {
        if matches!(
            k.threads.get(thread).map(|t| t.state),
            Some(ThreadState::Receiving {
                from: None,
                awaiting: Awaiting::Message | Awaiting::Strings
            })
        ) && deliver_pending(k, thread)
        {
            k.wake(thread);
        }
    }
}

/// A hardware interrupt on IOAPIC input `line`: masked until acknowledged.
pub fn hardware(k: &mut Kernel, line: u32) {
    ioapic::set_masked(line, true);
    match k.irq_lines.get(line as usize).copied().flatten() {
        Some(irq) => raise(k, irq),
        None => crate::warn!("interrupt on line {line} without an IRQ object; line stays masked"),
    }
}

/// A pending IRQ attached to `thread`, if any (the IRQ objects are scanned only while some
/// interrupt is pending at all).
pub fn pending_for(k: &Kernel, thread: ThreadId) -> Option<IrqId> {
    if k.pending_irqs == 0 {
        return None;
    }
    k.irqs.ids().find(|&id| {
        k.irqs
            .get(id)
            .is_some_and(|i| i.pending && i.receiver.is_some_and(|(t, _)| t == thread))
    })
}

/// If an IRQ attached to `thread` is pending, write its message into the thread's registers
/// and clear it. Returns whether one was delivered.
pub fn deliver_pending(k: &mut Kernel, thread: ThreadId) -> bool {
    let Some(id) = pending_for(k, thread) else {
        return false;
    };
    let irq = k.irqs.get_mut(id).expect("irq");
    irq.pending = false;
    k.pending_irqs -= 1;
    let (line, badge) = (irq.line, irq.receiver.map(|(_, b)| b).unwrap_or(0));
    // The receive ends with the IRQ: a string copy into its buffers starts over.
    k.thread(thread).partial_copy = None;
    k.thread(thread).frame.deliver(
        MessageTag::new(LABEL_IRQ, 1, 0).0,
        badge,
        [line as u64, 0, 0, 0],
    );
    true
}

/// Unmask a hardware line after the receiver handled it.
pub fn acknowledge(line: u32) {
    if line < HARDWARE_LINES {
        ioapic::set_masked(line, false);
    }
}
