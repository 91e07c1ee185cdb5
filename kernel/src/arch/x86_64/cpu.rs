//! Thin wrappers around privileged x86 instructions (port I/O, MSRs, control registers).

use core::arch::asm;

/// Write a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; callers choose ports of devices the kernel owns.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Read a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Write a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Read a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reading the MSRs the kernel uses has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (high as u64) << 32 | low as u64
}

/// Write a model-specific register.
///
/// # Safety
/// The MSR and value must keep the CPU in a state the kernel expects.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the register and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// The page-fault address.
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// The current page-table root.
pub fn cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Switch page tables.
///
/// # Safety
/// `root` must be a valid PML4 that maps the kernel.
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the kernel stays mapped.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) }
}

/// Invalidate the TLB entry of one page.
pub fn invlpg(address: u64) {
    // SAFETY: invalidating a TLB entry is always safe.
    unsafe { asm!("invlpg [{}]", in(reg) address, options(nostack, preserves_flags)) }
}

/// Read the time-stamp counter (instructions under QEMU `-icount`).
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    (high as u64) << 32 | low as u64
}

/// Halt until the next interrupt with interrupts enabled, then disable them again.
pub fn wait_for_interrupt() {
    // SAFETY: the kernel runs with interrupts disabled; opening a window for one interrupt
    // while idle is the intended use. The handler never returns here (it resets the stack).
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Stop the CPU for good: interrupts off, halt.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the machine; nothing runs after this.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Model-specific register numbers.
pub mod msr {
    /// Extended feature enable.
    pub const EFER: u32 = 0xC000_0080;
    /// Segment selectors for syscall/sysret.
    pub const STAR: u32 = 0xC000_0081;
    /// Syscall entry point.
    pub const LSTAR: u32 = 0xC000_0082;
    /// RFLAGS bits cleared on syscall.
    pub const SFMASK: u32 = 0xC000_0084;
    /// FS base (the current thread's UTCB).
    pub const FS_BASE: u32 = 0xC000_0100;
    /// Local APIC base.
    pub const APIC_BASE: u32 = 0x1B;
}
