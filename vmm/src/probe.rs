//! `probe-isolation`: a compartment's VMM tries to reach beyond what the scenario gave it, and
//! reports each attempt (the isolation test requires every one refused). It asks its pager for
//! physical memory (the way sigma0's clients get any frame, the other compartments' included),
//! asks the root task for more RAM than its budget, and tries to map a page of its own into
//! every capability slot it holds but its own task's, which would succeed for any other
//! task or VM it could name.

use l4::abi::MapFlags;
use l4::abi::{slots, Fpage, CAP_SLOTS};

/// An address of ours where nothing lives (the probes' receive window and target).
const WINDOW: u64 = 0x0000_5000_0000_0000;

fn report(refused: bool, what: &str) {
    crate::say!(
        "isolation: {}ok - {what}",
        if refused { "" } else { "not " }
    );
}

/// Run the probes (before the VM exists, so that our own VM is not among the slots).
pub fn run() {
    let physical = l4::sigma0::request_physical(
        slots::PAGER,
        0x10_0000,
        12,
        Fpage::memory(WINDOW, 12, Fpage::RWX),
    );
    report(
        !matches!(physical, Ok(true)),
        "its pager refuses to map physical memory",
    );
    let ram = l4::parent::request_ram(WINDOW, 1 << 30);
    report(ram.is_err(), "the root task refuses RAM beyond its budget");
    // A page of ours to offer (the stack's, which is surely mapped).
    let marker = [0u8; 1];
    let page = marker.as_ptr() as u64 & !0xfff;
    let foreign = (0..CAP_SLOTS as u64)
        .filter(|&slot| slot != slots::SELF_TASK)
        .filter(|&slot| {
            l4::sys::map(
                slot,
                Fpage::memory(page, 12, Fpage::READ),
                WINDOW,
                MapFlags::empty(),
            )
            .is_ok()
        })
        .count();
    report(
        foreign == 0,
        "no capability slot but its own task's takes a mapping",
    );
}
