//! The local APIC (periodic timer, end of interrupt), with the legacy PIC masked and the
//! timer calibrated against PIT channel 2.

use super::cpu::{inb, outb};
use super::entry::{SPURIOUS_VECTOR, TIMER_VECTOR};
use super::paging::phys_to_virt;
use x86_64::registers::model_specific::ApicBase;

const REG_EOI: u64 = 0xb0;
const REG_SPURIOUS: u64 = 0xf0;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;
const REG_TPR: u64 = 0x80;

fn base() -> u64 {
    phys_to_virt(ApicBase::read_raw().0.start_address().as_u64())
}

fn write(register: u64, value: u32) {
    // SAFETY: the local APIC page is in the direct map (uncached); registers are 32-bit.
    unsafe { core::ptr::write_volatile((base() + register) as *mut u32, value) }
}

fn read(register: u64) -> u32 {
    // SAFETY: as for `write`.
    unsafe { core::ptr::read_volatile((base() + register) as *const u32) }
}

/// Mask the legacy 8259 PICs after moving them out of the exception vectors.
fn disable_pic() {
    for (command, data, offset, cascade) in [(0x20, 0x21, 0x20u8, 4u8), (0xa0, 0xa1, 0x28, 2)] {
        outb(command, 0x11);
        outb(data, offset);
        outb(data, cascade);
        outb(data, 0x01);
        outb(data, 0xff);
    }
}

/// Count local APIC timer ticks (divide by 16) and TSC ticks during 10 ms measured with PIT
/// channel 2.
fn calibrate() -> (u32, u64) {
    const PIT_HZ: u32 = 1_193_182;
    let count = (PIT_HZ / 100) as u16;
    // Gate on, speaker off.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    // Restart the gate to load the count.
    let gate = inb(0x61);
    outb(0x61, gate & !1);
    outb(0x61, gate | 1);
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_TIMER_INITIAL, u32::MAX);
    let tsc_start = super::cpu::rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 && spins < 100_000_000 {
        spins += 1;
    }
    let elapsed = u32::MAX - read(REG_TIMER_CURRENT);
    let tsc_elapsed = super::cpu::rdtsc().wrapping_sub(tsc_start);
    write(REG_TIMER_INITIAL, 0);
    (elapsed, tsc_elapsed)
}

/// The periodic timer's initial count, and TSC ticks per timer count (32.32 fixed point).
static INITIAL: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static TSC_PER_COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// TSC ticks since the periodic timer last expired (read in its interrupt: how late the
/// interrupt is taken; exact to the calibration's precision, and within one period).
pub fn tsc_since_expiry() -> u64 {
    use core::sync::atomic::Ordering::Relaxed;
    let counts = INITIAL
        .load(Relaxed)
        .saturating_sub(read(REG_TIMER_CURRENT));
    ((counts as u128 * TSC_PER_COUNT.load(Relaxed) as u128) >> 32) as u64
}

/// Enable the local APIC and start the periodic timer at `hz` interrupts per second.
/// Returns the calibrated timer ticks per 10 ms and the TSC frequency in Hz.
pub fn init(hz: u32) -> (u32, u64) {
    disable_pic();
    write(REG_SPURIOUS, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_TPR, 0);
    let (per_10ms, tsc_per_10ms) = calibrate();
    let per_10ms = per_10ms.max(1000);
    let initial = (per_10ms as u64 * 100 / hz as u64).max(1) as u32;
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_LVT_TIMER, TIMER_VECTOR as u32 | (1 << 17));
    INITIAL.store(initial, core::sync::atomic::Ordering::Relaxed);
    TSC_PER_COUNT.store(
        ((tsc_per_10ms as u128) << 32).div_ceil(per_10ms as u128) as u64,
        core::sync::atomic::Ordering::Relaxed,
    );
    write(REG_TIMER_INITIAL, initial);
    (per_10ms, tsc_per_10ms * 100)
}

/// Signal the end of the current interrupt.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}
