//! The few privileged x86 operations the kernel needs beyond what the `x86_64` crate wraps
//! (port I/O, MSRs, control and debug registers, TLB and interrupt instructions come from the
//! crate, at their call sites).

use x86_64::instructions::{hlt, interrupts, port::Port};

/// Write a byte to I/O port `port` of a device the kernel owns (COM1, the PICs, the PIT,
/// QEMU's debug-exit port).
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output to the kernel's own legacy devices has no memory effects.
    unsafe { Port::new(port).write(value) }
}

/// Read a byte from I/O port `port` of a device the kernel owns.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`.
    unsafe { Port::new(port).read() }
}

/// Read the time-stamp counter (instructions under QEMU `-icount`).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Halt until the next interrupt with interrupts enabled, then disable them again.
pub fn wait_for_interrupt() {
    // The kernel runs with interrupts disabled; opening a window for one interrupt while idle
    // is the intended use (the handler resets the stack and does not return here).
    interrupts::enable_and_hlt();
    interrupts::disable();
}

/// Stop the CPU for good: interrupts off, halt.
pub fn halt_forever() -> ! {
    interrupts::disable();
    loop {
        hlt();
    }
}
