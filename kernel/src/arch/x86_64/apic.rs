//! The local APIC (the timer, one-shot for each next event; end of interrupt), with the
//! legacy PIC masked and the timer calibrated against PIT channel 2.

use super::cpu::{inb, outb};
use super::entry::{SPURIOUS_VECTOR, TIMER_VECTOR};
use super::paging::phys_to_virt;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
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

/// TSC ticks per timer count (32.32 fixed point), per timer tick, the TSC at which the next
/// tick is due, and the TSC the timer is armed for. Only the timer interrupt and kernel code
/// with interrupts off (one CPU) touch them.
static TSC_PER_COUNT: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(0);
static NEXT_TICK: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Enable the local APIC and start the timer: one-shot, armed for each next event (the next
/// of the periodic ticks at `hz` per second, or an earlier deadline, [`arm`]).
/// Returns the calibrated timer ticks per 10 ms and the TSC frequency in Hz.
pub fn init(hz: u32) -> (u32, u64) {
    disable_pic();
    write(REG_SPURIOUS, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_TPR, 0);
    let (per_10ms, tsc_per_10ms) = calibrate();
    let per_10ms = per_10ms.max(1000);
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_LVT_TIMER, TIMER_VECTOR as u32); // one-shot mode
    TSC_PER_COUNT.store(
        ((tsc_per_10ms as u128) << 32).div_ceil(per_10ms as u128) as u64,
        Relaxed,
    );
    let tsc_hz = tsc_per_10ms * 100;
    TSC_HZ.store(tsc_hz, Relaxed);
    let period = (tsc_hz / hz as u64).max(1);
    PERIOD.store(period, Relaxed);
    let first = super::cpu::rdtsc() + period;
    NEXT_TICK.store(first, Relaxed);
    arm(first);
    (per_10ms, tsc_hz)
}

/// The TSC frequency in Hz (0 before [`init`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Relaxed)
}

/// Make the timer interrupt come at TSC `due` (at once if it has passed), instead of when it
/// was armed for.
pub fn arm(due: u64) {
    let delta = due.saturating_sub(super::cpu::rdtsc());
    let counts = ((delta as u128) << 32) / TSC_PER_COUNT.load(Relaxed).max(1) as u128;
    ARMED.store(due, Relaxed);
    write(REG_TIMER_INITIAL, counts.clamp(1, u32::MAX as u128) as u32);
}

/// The TSC the timer is armed for.
pub fn armed() -> u64 {
    ARMED.load(Relaxed)
}

/// Arm the timer for `due` if that comes before what it is armed for.
pub fn arm_before(due: u64) {
    if due < ARMED.load(Relaxed) {
        arm(due);
    }
}

/// In the timer interrupt at TSC `now`: how many periodic ticks have come due since the last
/// call (0 when the interrupt was for an earlier deadline), and the TSC the next is due at.
pub fn ticks_due(now: u64) -> (u64, u64) {
    let next = NEXT_TICK.load(Relaxed);
    if now < next {
        return (0, next);
    }
    let period = PERIOD.load(Relaxed);
    let ticks = (now - next) / period + 1;
    let next = next + ticks * period;
    NEXT_TICK.store(next, Relaxed);
    (ticks, next)
}

/// Signal the end of the current interrupt.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}
