//! The L4 microkernel: boots from GRUB (multiboot2), then only dispatches syscalls, faults and
//! interrupts. Everything else runs in user tasks.
#![no_std]
#![no_main]

extern crate alloc;

pub mod arch;
pub mod audit;
pub mod bootstrap;
pub mod destroy;
pub mod factory;
pub mod fastpath;
pub mod fault;
pub mod fpu;
pub mod ipc;
pub mod irq;
pub mod items;
pub mod kernel;
pub mod kip;
pub mod lifetime;
pub mod log;
pub mod map;
pub mod memory;
pub mod object;
pub mod sched;
pub mod strings;
pub mod syscall;
pub mod task;
pub mod thread;
pub mod usermem;
pub mod vm;

use arch::x86_64::entry::{self, Frame, SPURIOUS_VECTOR, TIMER_VECTOR};
use arch::x86_64::{apic, cpu, ioapic, serial};
use x86_64::registers::control::Cr2;

/// isa-debug-exit value for a kernel panic (QEMU exits with status 2*v+1 = 37).
pub const EXIT_PANIC: u8 = l4_abi::qemu_exit::PANIC;

/// The Rust entry point, called by the boot code in long mode on the kernel stack.
#[no_mangle]
pub extern "C" fn kernel_main(magic: u32, multiboot_info: u32) -> ! {
    serial::init();
    info!("L4 kernel starting (TSC {})", cpu::rdtsc());
    memory::init_heap();
    entry::init();
    let k = bootstrap::boot(magic, multiboot_info as u64);
    arch::x86_64::ioapic::init();
    let (per_10ms, tsc_hz) = apic::init(bootstrap::TIMER_HZ as u32);
    kip::kip_mut(k.kip_frame).tsc_hz = tsc_hz;
    info!(
        "local APIC timer: {} ticks per 10 ms, {} Hz; TSC {} kHz",
        per_10ms,
        bootstrap::TIMER_HZ,
        tsc_hz / 1000
    );
    kernel::install(k);
    kernel::kernel().schedule()
}

/// Entry from the syscall stub; `frame` is the current thread's saved state.
#[no_mangle]
extern "C" fn syscall_dispatch(frame: *mut Frame) -> ! {
    let k = kernel::kernel();
    // SAFETY: the syscall stub passes the current thread's frame.
    unsafe { fastpath::try_fastpath(k, frame) };
    // SAFETY: as above.
    unsafe { fastpath::try_vcpu_run_entry(k, frame) };
    syscall::dispatch(k)
}

/// Entry from the syscall stub when the fast path is disabled (`nofastpath`).
#[no_mangle]
extern "C" fn syscall_dispatch_slow(frame: *mut Frame) -> ! {
    let k = kernel::kernel();
    // SAFETY: the syscall stub passes the current thread's frame.
    unsafe { fastpath::try_vcpu_run_entry(k, frame) };
    syscall::dispatch(k)
}

/// Entry from the interrupt and exception stubs.
#[no_mangle]
extern "C" fn interrupt_dispatch(frame: *mut Frame) -> ! {
    // SAFETY: the stub passes the frame it just pushed (a thread's frame or, while idle, one on
    // the kernel stack); nothing else refers to it now.
    let frame = unsafe { &mut *frame };
    let from_user = frame.cs & 3 == 3;
    let vector = frame.vector;
    let k = kernel::kernel();
    match vector {
        0..=31 if !from_user => fault::kernel_fault(frame),
        14 => fault::page_fault(k, Cr2::read_raw(), frame.error),
        7 => fpu::device_not_available(k),
        0..=31 => fault::exception(k, vector, frame.error),
        v if v == TIMER_VECTOR as u64 => {
            // The timer is one-shot: armed for the next periodic tick or an earlier deadline
            // (an IPC timeout, a `VcpuRun` deadline), and re-armed here.
            let now = cpu::rdtsc();
            kip::kip_mut(k.kip_frame).tick_due_tsc = apic::armed();
            apic::end_of_interrupt();
            let (ticks, next_tick) = apic::ticks_due(now);
            let next_timeout = ipc::expire_timeouts(k, now);
            if ticks > 0 {
                k.ticks += ticks;
                lifetime::tick(k);
                if let Some(current) = k.current {
                    if let Some(t) = k.threads.get_mut(current) {
                        t.remaining = t.remaining.saturating_sub(1);
                    }
                }
            }
            apic::arm(next_timeout.map_or(next_tick, |t| t.min(next_tick)));
        }
        v if v == SPURIOUS_VECTOR as u64 => {}
        v if (ioapic::BASE_VECTOR as u64..ioapic::BASE_VECTOR as u64 + ioapic::LINES as u64)
            .contains(&v) =>
        {
            apic::end_of_interrupt();
            irq::hardware(k, (v - ioapic::BASE_VECTOR as u64) as u32);
        }
        v => {
            warn!("unexpected interrupt vector {v}");
            apic::end_of_interrupt();
        }
    }
    k.schedule()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let _ = write!(serial::Console, "\n[kernel] PANIC: {info}\n");
    cpu::outb(l4_abi::qemu_exit::PORT, EXIT_PANIC);
    cpu::halt_forever()
}
