//! The suite's checks of the kernel's VM objects, with guests of their own run by calling
//! `VcpuRun` directly (not through the exit loop: they test the kernel, not the VMM): a
//! 32-bit guest with paging off, a triple fault, state the kernel must refuse, a spinning
//! guest, random code and state, memory rights, VcpuRun's deadline and message (recall)
//! exits, and a second VM at the same time.

use super::*;
use l4::abi::MapFlags;

/// Run the 32-bit guest in `vm` to its exit port write; true if it got there.
fn run_guest32(vm: &Vm) -> bool {
    vm.ram.write(0x7000, GUEST32.get());
    utcb_words(|w| protected_mode_state(w, 0x7000));
    let mut mask = Groups::GUEST;
    for _ in 0..8 {
        match run(vm.vcpu, mask, 0) {
            Ok(exit::IOIO) => {
                let at_port = utcb_words(|w| {
                    let done =
                        IoExit::decode(w[state::EXIT_INFO1]).is_some_and(|io| io.port == 0xe4);
                    w[state::RIP] = w[state::EXIT_INFO2];
                    done
                });
                if at_port {
                    return true;
                }
                mask = Groups::GPRS;
            }
            _ => return false,
        }
    }
    false
}

/// Guest-physical page the rights cases map with fewer rights (and the kernel-area pages after
/// it).
const RIGHTS_PAGE: u64 = 0x20_0000;

/// Run `code` at 0x7000 of `vm` (32-bit, paging off); the exit and its (info1, info2).
fn run_code(vm: &Vm, code: &[u8]) -> (Result<u64, Error>, u64, u64) {
    vm.ram.write(0x7000, code);
    utcb_words(|w| protected_mode_state(w, 0x7000));
    let result = run(vm.vcpu, Groups::GUEST, 0);
    utcb_words(|w| (result, w[state::EXIT_INFO1], w[state::EXIT_INFO2]))
}

/// Guest NX, rights that only shrink, and the kernel area: pages mapped into a VM with fewer
/// rights than the guest uses fault as nested page faults (exits to us: the VM has no pager).
fn rights_cases() {
    const NPF_PRESENT: u64 = 1;
    const NPF_WRITE: u64 = 2;
    const NPF_FETCH: u64 = 1 << 4;
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..5 {
            report(false, "rights cases: no VM");
        }
        return;
    };
    // mov eax, RIGHTS_PAGE; jmp eax — and there: out 0xe4, al.
    let jump = [0xb8, 0x00, 0x00, 0x20, 0x00, 0xff, 0xe0];
    // A page we hold with all rights (guest RAM from our parent; our heap is not executable).
    let code = vm.ram.base + 0x8_0000;
    vm.ram.write(0x8_0000, &[0xe6, 0xe4]);
    let no_execute = sys::map(
        vm.vm,
        Fpage::memory(code, 12, Fpage::READ | Fpage::WRITE),
        RIGHTS_PAGE,
        MapFlags::empty(),
    );
    let (exit, info1, gpa) = run_code(&vm, &jump);
    report(
        no_execute.is_ok()
            && exit == Ok(exit::NPF)
            && info1 & (NPF_PRESENT | NPF_FETCH) == NPF_PRESENT | NPF_FETCH
            && gpa == RIGHTS_PAGE,
        "memory mapped into a VM without EXECUTE is not executable: instruction fetch is a nested page fault",
    );
    let executable = sys::map(
        vm.vm,
        Fpage::memory(code, 12, Fpage::RWX),
        RIGHTS_PAGE,
        MapFlags::empty(),
    );
    let (exit, info1, _) = run_code(&vm, &jump);
    let port = IoExit::decode(info1).map(|io| io.port);
    report(
        executable.is_ok() && exit == Ok(exit::IOIO) && port == Some(0xe4),
        "the same page mapped with EXECUTE runs",
    );
    // The guest image is mapped read-only into us: mapped with all rights into the VM, it is
    // still read-only there. mov [RIGHTS_PAGE + 0x1000], eax; out 0xe4, al.
    let image_page = l4::rt::blob("guest").map_or(0, |b| b.as_ptr() as u64 & !0xfff);
    let read_only = sys::map(
        vm.vm,
        Fpage::memory(image_page, 12, Fpage::RWX),
        RIGHTS_PAGE + 0x1000,
        MapFlags::empty(),
    );
    let (exit, info1, gpa) = run_code(&vm, &[0xa3, 0x00, 0x10, 0x20, 0x00, 0xe6, 0xe4]);
    report(
        read_only.is_ok()
            && exit == Ok(exit::NPF)
            && info1 & (NPF_PRESENT | NPF_WRITE) == NPF_PRESENT | NPF_WRITE
            && gpa == RIGHTS_PAGE + 0x1000,
        "rights only shrink: a page we hold read-only is read-only for the guest too",
    );
    // The KIP and our UTCB: Map succeeds and maps nothing; the guest faults there (not present).
    for (address, offset, what) in [
        (
            l4::abi::KIP_ADDRESS,
            0x2000u64,
            "the KIP cannot be mapped into a VM: the guest faults there",
        ),
        (
            l4::utcb::address(),
            0x3000,
            "a UTCB cannot be mapped into a VM: the guest faults there",
        ),
    ] {
        let gpa = RIGHTS_PAGE + offset;
        let mapped = sys::map(
            vm.vm,
            Fpage::memory(address, 12, Fpage::RWX),
            gpa,
            MapFlags::empty(),
        );
        // mov eax, [gpa]; out 0xe4, al.
        let load = [0xa1, 0x00, (offset >> 8) as u8, 0x20, 0x00, 0xe6, 0xe4];
        let (exit, info1, fault) = run_code(&vm, &load);
        report(
            mapped.is_ok() && exit == Ok(exit::NPF) && info1 & NPF_PRESENT == 0 && fault == gpa,
            what,
        );
    }
}

/// The TSC (shared with the guests: their TSC offset is 0).
fn tsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack)) };
    (high as u64) << 32 | low as u64
}

/// TSC cycles per millisecond, measured against a 10 ms IPC timeout (at least that long, so
/// this errs on the high side).
fn tsc_per_ms() -> u64 {
    let start = tsc();
    let _ = ipc_sleep(10_000);
    ((tsc() - start) / 10).max(1)
}

/// The label of the message [`message_sender`] sends.
const RECALL_LABEL: i32 = 0x77;
/// The software IRQ line of the recall cases.
const RECALL_LINE: u64 = 48;
/// The badge of its IRQ object.
const RECALL_BADGE: u64 = 0xb0b;
/// What the helper threads of the recall cases did (0: not yet; 1: done; 2: failed).
static RECALL_SENT: AtomicU64 = AtomicU64::new(0);

/// After 2 ms, send a message with words `[0x5eed, value]` to the first thread (which runs a
/// spinning guest meanwhile).
extern "C" fn message_sender(value: u64) -> ! {
    use l4::abi::{MessageTag, Timeout, Timeouts};
    let _ = ipc_sleep(2_000);
    let sent = l4::ipc::send(
        slots::SELF_THREAD,
        MessageTag::new(RECALL_LABEL, 2, 0),
        &[0x5eed, value],
        Timeouts::new(Timeout::micros(5_000_000), Timeout::INFINITE),
    );
    RECALL_SENT.store(if sent.is_ok() { 1 } else { 2 }, SeqCst);
    sys::thread_exit(0)
}

/// After 2 ms, trigger the IRQ object in slot `irq` (attached to the first thread).
extern "C" fn irq_trigger(irq: u64) -> ! {
    let _ = ipc_sleep(2_000);
    let triggered = sys::irq_control(irq, l4::abi::IrqOp::Trigger, 0);
    RECALL_SENT.store(if triggered.is_ok() { 1 } else { 2 }, SeqCst);
    sys::thread_exit(0)
}

/// `1: inc ecx; jnz 1b; out 0xe4, al` at 0x7000: spins until ecx wraps (from 0x8000_0000 that
/// is seconds, far beyond any deadline here, yet no case can hang for ever).
const COUNTING_SPIN: [u8; 5] = [0x41, 0x75, 0xfd, 0xe6, 0xe4];
/// Where its `out` is.
const COUNTING_SPIN_OUT: u64 = 0x7003;

/// Load the counting spin into `vm` (32-bit, paging off), with ecx at 0x8000_0000 and a
/// marker in ebx.
fn counting_spin_state(vm: &Vm) {
    vm.ram.write(0x7000, &COUNTING_SPIN);
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::RCX] = 0x8000_0000;
        w[state::RBX] = 0x9abc_def0;
    });
}

/// Whether the UTCB shows the counting spin stopped in its loop with its registers intact,
/// at exit `code` of the kernel's own (no EXITINFO).
fn stopped_in_spin(code: u64) -> bool {
    utcb_words(|w| {
        w[state::EXIT_CODE] == code
            && w[state::EXIT_INFO1] == 0
            && w[state::EXIT_INFO2] == 0
            && (0x7000..COUNTING_SPIN_OUT).contains(&w[state::RIP])
            && w[state::RBX] == 0x9abc_def0
            && w[state::RCX] & 0xffff_ffff > 0x8000_0000
    })
}

/// Wait (bounded) for the helper thread of a recall case; true if it did its part.
fn helper_done() -> bool {
    for _ in 0..1000 {
        match RECALL_SENT.load(SeqCst) {
            0 => {
                let _ = ipc_sleep(1_000);
            }
            done => return done == 1,
        }
    }
    false
}

/// Groups left unstored at the exits (`VcpuRun`'s transfer argument): their words keep what the
/// VMM left; CS and SS, the general registers and the exit information are stored all the
/// same; the general registers and events cannot be left out.
fn unstored_cases() {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..2 {
            report(false, "unstored groups: no VM");
        }
        return;
    };
    const MARK: u64 = 0x5eed_0000_0000_5eed;
    let run_unstored = |mask, unstored| {
        l4::utcb::with_utcb(|u| vmm::vcpu::run_unstored(u, vm.vcpu, mask, unstored, 0))
    };
    // `out 0xe4, al` twice: each run exits at one (RIP at it).
    vm.ram.write(0x7000, &[0xe6, 0xe4, 0xe6, 0xe4]);
    utcb_words(|w| protected_mode_state(w, 0x7000));
    let first = run_unstored(Groups::GUEST, Groups::SEGMENTS | Groups::CONTROL);
    // The marks stand in the unstored words; the stored ones are the guest's.
    let (kept, stored) = utcb_words(|w| {
        let kept = [
            w[state::DS],
            w[state::GDTR + 1],
            w[state::STAR],
            w[state::CR0],
        ];
        let stored = w[state::CS] == state::segment(0x08, 0xc9b, 0xffff_ffff)
            && w[state::RIP] == 0x7000
            && w[state::EXIT_CODE] == exit::IOIO;
        for i in [state::DS, state::GDTR + 1, state::STAR, state::CR0] {
            w[i] = MARK;
        }
        w[state::RIP] = w[state::EXIT_INFO2];
        (kept, stored)
    });
    let second = run_unstored(Groups::GPRS, Groups::SEGMENTS | Groups::CONTROL);
    let marks = utcb_words(|w| {
        [
            w[state::DS],
            w[state::GDTR + 1],
            w[state::STAR],
            w[state::CR0],
        ] == [MARK; 4]
            && w[state::RIP] == 0x7002
    });
    report(
        first == Ok(exit::IOIO) && second == Ok(exit::IOIO) && stored && marks && kept[3] == 0x11,
        "groups left unstored keep the VMM's words; CS, RIP and the exit are stored all the same",
    );
    report(
        run_unstored(Groups::empty(), Groups::GPRS) == Err(Error::InvalidArgument)
            && run_unstored(Groups::empty(), Groups::EVENTS) == Err(Error::InvalidArgument),
        "the general registers and the events cannot be left unstored",
    );
}

/// Deadlines finer than the timer tick, for `VcpuRun` and for IPC timeouts (run before any
/// thread of this task spins: with a thread of our priority ready, we would wait for its time
/// slice, whatever the timer does).
fn fine_timer_cases() {
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..2 {
            report(false, "fine deadlines: no VM");
        }
        return;
    };
    let per_ms = (l4::kip::kip().tsc_hz / 1000).max(1);
    // The timer is armed for deadlines finer than the kernel's 1 ms tick. Nine times: a 1 ms
    // sleep (which a tick-bound kernel ends at a tick), then a spinning guest with a deadline
    // 300 us ahead: the earliest of its exits comes less than 250 us after its deadline (at
    // the ticks it would come some 700 us late every time); nine receive timeouts of 300 us:
    // none ends early, the shortest within 900 us (counted in ticks, each would wait 1-2 ms).
    // The minimum is the measure: a loaded host only ever adds delay.
    let (mut late, mut waited) = ([0u64; 9], [0u64; 9]);
    let mut all_deadline = true;
    for (late, waited) in late.iter_mut().zip(waited.iter_mut()) {
        let _ = ipc_sleep(1000);
        counting_spin_state(&vm);
        let deadline = tsc() + 3 * per_ms / 10;
        all_deadline &= run(vm.vcpu, Groups::GUEST, deadline) == Ok(exit::DEADLINE);
        *late = tsc().saturating_sub(deadline);
        let start = tsc();
        let _ = ipc_sleep(300);
        *waited = tsc() - start;
    }
    late.sort_unstable();
    waited.sort_unstable();
    let us = |t: u64| t * 1000 / per_ms;
    println!(
        "[vmm] 300 us deadlines: {}..{} us late, median {}; 300 us timeouts: {}..{} us, median {}",
        us(late[0]),
        us(late[8]),
        us(late[4]),
        us(waited[0]),
        us(waited[8]),
        us(waited[4])
    );
    report(
        all_deadline && us(late[0]) < 250,
        "a VcpuRun deadline finer than the timer tick ends the run on time (< 250 us late)",
    );
    report(
        us(waited[0]) >= 300 && us(waited[0]) < 900,
        "an IPC timeout finer than the timer tick expires on time (>= 300 us, < 900 us)",
    );
}

/// VcpuRun's own exits: the deadline (a TSC value) and messages waiting for the thread that
/// runs the vCPU (an IPC sender or an IRQ), each before any guest entry.
fn event_cases() {
    use l4::abi::{Timeout, Timeouts};
    const CASES: usize = 7;
    let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) else {
        for _ in 0..CASES {
            report(false, "VcpuRun exits: no VM");
        }
        return;
    };
    let per_ms = tsc_per_ms();
    let short_wait = Timeouts::new(Timeout::INFINITE, Timeout::micros(100_000));

    // A deadline 5 ms ahead stops a spinning guest, not before it, with the state intact.
    counting_spin_state(&vm);
    let deadline = tsc() + 5 * per_ms;
    let first = run(vm.vcpu, Groups::GUEST, deadline);
    let returned = tsc();
    let counted = utcb_words(|w| w[state::RCX]) & 0xffff_ffff;
    println!(
        "[vmm] deadline exit {} us after the deadline",
        returned.saturating_sub(deadline) * 1000 / per_ms
    );
    report(
        first == Ok(exit::DEADLINE) && returned >= deadline && stopped_in_spin(exit::DEADLINE),
        "a deadline stops a spinning guest with exit DEADLINE, not before the deadline, state intact",
    );
    // A second run (loading nothing) continues where the guest stopped; without a deadline
    // the guest runs to its next real exit.
    let deadline = tsc() + 2 * per_ms;
    let again = run(vm.vcpu, Groups::empty(), deadline);
    let returned = tsc();
    let continued =
        stopped_in_spin(exit::DEADLINE) && utcb_words(|w| w[state::RCX]) & 0xffff_ffff > counted;
    utcb_words(|w| w[state::RIP] = COUNTING_SPIN_OUT);
    let to_out = run(vm.vcpu, Groups::GPRS, 0);
    let port = IoExit::decode(utcb_words(|w| w[state::EXIT_INFO1])).map(|io| io.port);
    report(
        again == Ok(exit::DEADLINE)
            && returned >= deadline
            && continued
            && to_out == Ok(exit::IOIO)
            && port == Some(0xe4),
        "the next run continues the guest to the next deadline; deadline 0 is none",
    );

    // A deadline already past: the exit comes before the guest runs (its `out` is not
    // executed) and the state loaded stays loaded.
    vm.ram.write(0x7000, &[0xe6, 0xe4]);
    utcb_words(|w| protected_mode_state(w, 0x7000));
    let past = run(vm.vcpu, Groups::GUEST, 1);
    let unchanged = utcb_words(|w| w[state::RIP]) == 0x7000;
    let then = run(vm.vcpu, Groups::empty(), 0);
    report(
        past == Ok(exit::DEADLINE) && unchanged && then == Ok(exit::IOIO),
        "a deadline in the past returns DEADLINE without entering the guest",
    );

    // Another thread sends us a message while our guest spins: VcpuRun returns MESSAGE and a
    // receive takes the message.
    RECALL_SENT.store(0, SeqCst);
    counting_spin_state(&vm);
    let safety = tsc() + 2_000 * per_ms;
    let sender = l4::thread::spawn(message_sender, 0x1234, l4::thread::Spawn::default());
    let recalled = sender.is_ok() && run(vm.vcpu, Groups::GUEST, safety) == Ok(exit::MESSAGE);
    let in_spin = stopped_in_spin(exit::MESSAGE);
    let message = l4::ipc::wait(short_wait);
    report(
        recalled
            && in_spin
            && matches!(&message, Ok(m) if m.tag.label() == RECALL_LABEL
                && m.word(0) == 0x5eed && m.word(1) == 0x1234)
            && helper_done(),
        "an IPC to the vCPU thread from another thread recalls the spinning guest (MESSAGE)",
    );

    // The same with an IRQ attached to us, triggered by another thread.
    RECALL_SENT.store(0, SeqCst);
    let irq = alloc_slot();
    let attached = sys::factory_create(
        slots::PLATFORM,
        ObjectKind::Irq,
        irq,
        RECALL_LINE,
        RECALL_BADGE,
    )
    .and_then(|()| sys::irq_control(irq, l4::abi::IrqOp::Attach, slots::SELF_THREAD));
    counting_spin_state(&vm);
    let safety = tsc() + 2_000 * per_ms;
    let trigger = l4::thread::spawn(irq_trigger, irq, l4::thread::Spawn::default());
    let recalled = attached.is_ok()
        && trigger.is_ok()
        && run(vm.vcpu, Groups::GUEST, safety) == Ok(exit::MESSAGE);
    let in_spin = stopped_in_spin(exit::MESSAGE);
    let message = l4::ipc::wait(short_wait);
    let is_irq = |m: &Result<l4::ipc::Received, l4::ipc::IpcError>| {
        matches!(m, Ok(m) if m.tag.label() == l4::abi::LABEL_IRQ
            && m.badge == RECALL_BADGE && m.word(0) == RECALL_LINE)
    };
    report(
        recalled && in_spin && is_irq(&message) && helper_done(),
        "an IRQ attached to the vCPU thread, triggered by another thread, recalls the guest",
    );
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Acknowledge, 0);

    // A message already waiting (and a deadline past): MESSAGE first, before the guest runs;
    // once the message is taken, the deadline.
    let triggered = sys::irq_control(irq, l4::abi::IrqOp::Trigger, 0);
    vm.ram.write(0x7000, &[0xe6, 0xe4]);
    utcb_words(|w| protected_mode_state(w, 0x7000));
    let waiting = run(vm.vcpu, Groups::GUEST, 1);
    let unchanged = utcb_words(|w| w[state::RIP]) == 0x7000;
    let message = l4::ipc::wait(short_wait);
    let then = run(vm.vcpu, Groups::empty(), 1);
    report(
        attached.is_ok()
            && triggered.is_ok()
            && waiting == Ok(exit::MESSAGE)
            && unchanged
            && is_irq(&message)
            && then == Ok(exit::DEADLINE),
        "a waiting message comes before the guest runs and before the deadline",
    );
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Acknowledge, 0);
    let _ = sys::irq_control(irq, l4::abi::IrqOp::Detach, 0);
    let _ = sys::cap_delete(irq);

    // An event whose delivery an exit interrupted (an injected #UD reading an IDT nothing is
    // mapped at: a nested page fault) stays pending across a DEADLINE exit, reported in
    // EXITINTINFO, and the next run re-injects it (it faults again instead of running `out`).
    // Last: the vCPU keeps that event.
    const IDT: u64 = 0x20_0000;
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::IDTR] = 0x7ff;
        w[state::IDTR + 1] = IDT;
        w[state::EVENT_INJECT] = state::event::UD;
    });
    let faulted = run(vm.vcpu, Groups::GUEST, 0);
    let interrupted = utcb_words(|w| w[state::EXIT_INT_INFO]);
    let stopped = run(vm.vcpu, Groups::empty(), 1);
    let reported = utcb_words(|w| w[state::EXIT_INT_INFO]);
    let again = run(vm.vcpu, Groups::empty(), 0);
    let (last_interrupted, last_address) =
        utcb_words(|w| (w[state::EXIT_INT_INFO], w[state::EXIT_INFO2]));
    report(
        faulted == Ok(exit::NPF)
            && state::event::is_valid(interrupted)
            && interrupted & 0xff == 6
            && stopped == Ok(exit::DEADLINE)
            && reported == interrupted
            && again == Ok(exit::NPF)
            && last_interrupted == interrupted
            && last_address & !0xfff == IDT,
        "an interrupted event stays pending across a DEADLINE exit and is re-injected",
    );
}

pub(super) static SECOND_DONE: AtomicU64 = AtomicU64::new(0);
static SPINS_STARTED: AtomicU64 = AtomicU64::new(0);
static SPINNER_RETURNED: AtomicU64 = AtomicU64::new(0);

/// A VM whose guest spins forever (`jmp $`); its thread never returns from VcpuRun.
extern "C" fn spinning_vm(_: u64) -> ! {
    if let Ok(vm) = create_vm(1 << 20, l4::abi::NO_CAP) {
        vm.ram.write(0x7000, &[0xeb, 0xfe]);
        utcb_words(|w| protected_mode_state(w, 0x7000));
        SPINS_STARTED.store(1, SeqCst);
        let _ = run(vm.vcpu, Groups::GUEST, 0);
        // The guest spins forever: VcpuRun must never return.
        SPINNER_RETURNED.store(1, SeqCst);
    }
    sys::thread_exit(0)
}

/// Block for `us` microseconds (a receive nobody answers).
fn ipc_sleep(us: u32) -> Result<(), l4::ipc::IpcError> {
    l4::ipc::wait(l4::abi::Timeouts::new(
        l4::abi::Timeout::INFINITE,
        l4::abi::Timeout::micros(us),
    ))
    .map(|_| ())
}

/// A second VM, run by a second thread while the first runs: its guest writes its own RAM.
pub(super) extern "C" fn second_vm(_: u64) -> ! {
    let result = match create_vm(1 << 20, l4::abi::NO_CAP) {
        Ok(vm) => {
            let mut ok = true;
            for _ in 0..20 {
                ok &= run_guest32(&vm);
            }
            let value = vm.ram.read_u64(0x9000).unwrap_or(0) as u32;
            if ok && value == 0x1234_5678 {
                1
            } else {
                2
            }
        }
        Err(_) => 3,
    };
    SECOND_DONE.store(result, SeqCst);
    sys::thread_exit(0)
}

/// The cases that need no test guest; `vm` is the test guest's VM (for the isolation check).
pub(super) fn direct_cases(vm: &Vm) {
    fine_timer_cases();
    unstored_cases();
    // 32-bit protected mode with paging off: nested paging still applies.
    let vm32 = create_vm(1 << 20, l4::abi::NO_CAP).expect("second VM");
    let ran = run_guest32(&vm32);
    report(
        ran && vm32.ram.read_u64(0x9000).map(|v| v as u32) == Some(0x1234_5678),
        "32-bit protected mode, paging off, under nested paging",
    );
    report(
        vm.ram.read_u64(0x9000).map(|v| v as u32) != Some(0x1234_5678),
        "two VMs do not share guest memory",
    );

    // A triple fault (no IDT, then int3) ends in a SHUTDOWN exit to the VMM.
    vm32.ram.write(0x7000, &[0xcc]);
    utcb_words(|w| protected_mode_state(w, 0x7000));
    utcb_words(|w| w[state::IDTR] = 0);
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Ok(exit::SHUTDOWN),
        "triple fault is a SHUTDOWN exit to the VMM",
    );

    // State the kernel must refuse: paging without protection, EFER.LMA without paging.
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::CR0] = 0x8000_0010;
    });
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Err(Error::InvalidArgument),
        "invalid guest state (CR0.PG without PE) refused",
    );
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::EFER] = 0x400;
    });
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Err(Error::InvalidArgument),
        "invalid guest state (EFER.LMA without paging) refused",
    );
    utcb_words(|w| {
        w[state::EFER] = 0;
        w[state::EVENT_INJECT] = state::event::VALID | state::event::TYPE | 3;
    });
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Err(Error::InvalidArgument),
        "invalid event type refused",
    );

    utcb_words(|w| {
        w[state::EVENT_INJECT] = 0;
        protected_mode_state(w, 0x7000);
        w[state::CR0] = 0x8000_0011;
        w[state::EFER] = 0x500;
    });
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Err(Error::InvalidArgument),
        "invalid guest state (long mode without PAE) refused",
    );
    utcb_words(|w| {
        protected_mode_state(w, 0x7000);
        w[state::CR4] = 1 << 13;
    });
    report(
        run(vm32.vcpu, Groups::GUEST, 0) == Err(Error::InvalidArgument),
        "invalid guest state (CR4.VMXE) refused",
    );

    // Exception intercepts (the L4Linux mode's #UD): an intercepted ud2 exits as exception
    // 6 at the instruction; without the intercept the guest's own IDT gets it (here none: a
    // triple fault); #MC may not be intercepted. (A VM of its own: vm32's vCPU may still hold
    // the event its triple fault interrupted, for re-injection.)
    match create_vm(1 << 20, l4::abi::NO_CAP) {
        Ok(exc) => {
            exc.ram.write(0x7000, &[0x0f, 0x0b]);
            utcb_words(|w| {
                protected_mode_state(w, 0x7000);
                w[state::IDTR] = 0;
                w[state::EXCEPTION_INTERCEPTS] = state::Exceptions::vector(state::VECTOR_UD).bits();
            });
            let intercepted = run(exc.vcpu, Groups::GUEST | Groups::INTERCEPTS, 0);
            let (rip, intercepts) = utcb_words(|w| (w[state::RIP], w[state::EXCEPTION_INTERCEPTS]));
            report(
                intercepted == Ok(exit::EXCEPTION_BASE + 6)
                    && rip == 0x7000
                    && intercepts == 1 << 6,
                "an intercepted #UD exits to the VMM at the instruction",
            );
            utcb_words(|w| w[state::EXCEPTION_INTERCEPTS] = 0);
            report(
                run(exc.vcpu, Groups::GUEST | Groups::INTERCEPTS, 0) == Ok(exit::SHUTDOWN),
                "without the intercept the #UD is the guest's (a triple fault without an IDT)",
            );
            utcb_words(|w| {
                protected_mode_state(w, 0x7000);
                w[state::EXCEPTION_INTERCEPTS] = state::Exceptions::vector(state::VECTOR_MC).bits();
            });
            let machine_check = run(exc.vcpu, Groups::GUEST | Groups::INTERCEPTS, 0);
            utcb_words(|w| w[state::EXCEPTION_INTERCEPTS] = 1 << 32);
            let beyond = run(exc.vcpu, Groups::GUEST | Groups::INTERCEPTS, 0);
            report(
                machine_check == Err(Error::InvalidArgument)
                    && beyond == Err(Error::InvalidArgument)
                    && run(exc.vcpu, Groups::from_bits_retain(1 << 5), 0)
                        == Err(Error::InvalidArgument),
                "intercepting #MC, a vector above 31 or an unknown state group is refused",
            );
        }
        Err(_) => {
            for _ in 0..3 {
                report(false, "exception intercepts: no VM");
            }
        }
    }

    // A guest that spins forever cannot lock up the machine: timer interrupts preempt it.
    let spinner = l4::thread::spawn(
        spinning_vm,
        0,
        l4::thread::Spawn {
            stack_size: 32 * 1024,
            ..Default::default()
        },
    );
    let mut seen = false;
    for _ in 0..200 {
        let _ = ipc_sleep(10_000);
        if SPINS_STARTED.load(SeqCst) != 0 {
            seen = true;
            break;
        }
    }
    // Our sleep can only end if the timer preempts the spinning guest's thread; the guest must
    // still be spinning afterwards (its VcpuRun has not returned).
    let slept = ipc_sleep(20_000);
    let timed_out = matches!(slept, Err(e) if e.error == Error::Timeout);
    report(
        spinner.is_ok() && seen && timed_out && SPINNER_RETURNED.load(SeqCst) == 0,
        "a spinning guest is preempted; the VMM keeps running",
    );

    // Hostile guests: random bytes as code, in 64-bit and 32-bit mode. Every exit is handled by
    // stopping that run; the kernel and this VMM must survive all of them.
    let fuzz = create_vm(1 << 20, l4::abi::NO_CAP).expect("fuzz VM");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    // Every run must end in an exit or a refusal of the state (InvalidArgument); some must
    // reach the guest.
    let (mut exits, mut refused, mut other) = (0u64, 0u64, 0u64);
    for round in 0..40u64 {
        let mut code = [0u8; 4096];
        for chunk in code.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        fuzz.ram.write(0x7000, &code);
        if round % 2 == 0 {
            utcb_words(|w| protected_mode_state(w, 0x7000));
        } else {
            // 64-bit mode needs page tables: identity-map the first 2 MiB of this 1 MiB VM.
            let tables: [u64; 3] = [0x2000 | 7, 0x3000 | 7, 0x87];
            for (i, entry) in tables.iter().enumerate() {
                fuzz.ram
                    .write(0x1000 * (i as u64 + 1), &entry.to_le_bytes());
            }
            utcb_words(|w| {
                long_mode_state(w, 0x7000);
                w[state::RSP] = 0x6_f000;
            });
        }
        for _ in 0..20 {
            match run(fuzz.vcpu, Groups::GUEST, 0) {
                Ok(exit::SHUTDOWN) => {
                    exits += 1;
                    break;
                }
                Err(Error::InvalidArgument) => {
                    refused += 1;
                    break;
                }
                Err(_) => {
                    other += 1;
                    break;
                }
                Ok(_) => {
                    exits += 1;
                    // Skip a byte and go on from the next state (all of it reloaded).
                    utcb_words(|w| {
                        w[state::RIP] += 1;
                        w[state::EVENT_INJECT] = 0;
                    });
                }
            }
        }
    }
    // Afterwards a well-formed guest still runs to its HLT. (A new VM: the fuzzed vCPU may
    // still hold an event of its last run for re-injection.)
    let last = match create_vm(1 << 20, l4::abi::NO_CAP) {
        Ok(vm) => {
            vm.ram.write(0x7000, &[0xf4]);
            utcb_words(|w| protected_mode_state(w, 0x7000));
            run(vm.vcpu, Groups::GUEST, 0)
        }
        Err(e) => Err(e),
    };
    let healthy = last == Ok(exit::HLT);
    println!(
        "[vmm] random-code guests: {exits} exits, {refused} refused states, {other} other errors; then a HLT guest: {last:?}"
    );
    report(
        exits > 0 && other == 0 && healthy,
        "40 guests of random code (32- and 64-bit) leave the kernel and the VMM running",
    );

    // Hostile vCPU state: random words for every register, control register, segment and
    // event, in a VM without memory (any instruction fetch exits). Each run must end in an
    // exit or an error; the kernel validates what the CPU might accept inconsistently.
    let bare = (|| -> Result<(u64, u64), Error> {
        let vm = alloc_slot();
        sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, l4::abi::NO_CAP, 0)?;
        let vcpu = alloc_slot();
        sys::factory_create(slots::FACTORY, ObjectKind::Vcpu, vcpu, vm, 0)?;
        Ok((vm, vcpu))
    })();
    let mut outcomes = [0u32; 3];
    if let Ok((_, vcpu)) = bare {
        for round in 0..300u64 {
            utcb_words(|w| {
                for (i, word) in w.iter_mut().enumerate().take(state::STATE_WORDS) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // Every other round keeps values small and plausible.
                    *word = if round % 2 == 0 {
                        seed
                    } else {
                        seed & (0xfff << (i % 4 * 8))
                    };
                }
                if round % 2 == 1 {
                    // Consistent control registers (real-ish, protected, paged or long mode) and a
                    // valid event, with everything else random: these runs reach the CPU.
                    let modes = [
                        (0x10, 0, 0),
                        (0x11, 0, 0),
                        (0x8000_0011, 0x20, 0),
                        (0x8000_0031, 0x20, 0x500),
                    ];
                    let (cr0, cr4, efer) = modes[(seed % 4) as usize];
                    (w[state::CR0], w[state::CR4], w[state::EFER]) = (cr0, cr4, efer);
                    w[state::EVENT_INJECT] = if seed & 0x100 != 0 {
                        state::event::exception((seed & 0x1f) as u8)
                    } else {
                        0
                    };
                }
            });
            match run(vcpu, Groups::GUEST, 0) {
                Ok(_) => outcomes[0] += 1,
                Err(Error::InvalidArgument) => outcomes[1] += 1,
                Err(_) => outcomes[2] += 1,
            }
        }
    }
    report(
        bare.is_ok() && outcomes[0] + outcomes[1] == 300 && outcomes[2] == 0,
        "300 random vCPU states are refused or run to an exit, never crash the kernel",
    );
    println!(
        "[vmm] random vCPU states: {} ran to an exit, {} refused",
        outcomes[0], outcomes[1]
    );

    rights_cases();
    event_cases();
}
