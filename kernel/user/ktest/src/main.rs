//! The in-QEMU conformance suite of the kernel. The cases of a run are known before it starts
//! (a [`tap::Plan`]: the case tables of its groups): the task prints the plan `1..N` first,
//! then each case's `ok N - area: case` or `not ok N - area: case`, then `not ok N - area: case
//! (did not run)` for each case of the plan that did not report, and a summary; it exits with
//! the number of failures (the root task turns that into QEMU's exit status).
//!
//! The suite needs a factory (module option `factory`). Cross-address-space cases run code of
//! this binary in child tasks: a pager thread of this task maps them its own text pages
//! read-only, copies data pages on write, and gives fresh pages for their stacks. With the
//! module option `huge` it runs only the 1 GiB page cases.
#![no_std]
#![no_main]

extern crate alloc;

mod basic;
mod bounded;
mod fpu;
mod hostile;
mod huge;
mod lifetime;
mod mechanisms;
mod revoke;
mod support;
mod tap;

use l4::println;
use support::{gate, go, Suite};
use tap::Plan;

/// The full suite: its groups' case tables, in the order [`main`] runs the groups.
const FULL: Plan = Plan(&[
    basic::KIP_CASES,
    basic::SYSCALL_CASES,
    basic::CAPABILITY_CASES,
    basic::FACTORY_CASES,
    basic::THREAD_CASES,
    basic::SCHEDULING_CASES,
    basic::IPC_CASES,
    basic::TASK_CASES,
    mechanisms::EXCEPTION_CASES,
    mechanisms::IRQ_CASES,
    mechanisms::MAPPING_CASES,
    mechanisms::STRING_CASES,
    mechanisms::STRING_TIMEOUT_CASE,
    mechanisms::STRING_EDGE_CASES,
    mechanisms::QUOTA_CASES,
    mechanisms::LARGE_PAGE_CASES,
    mechanisms::REGRESSION_CASES,
    mechanisms::OWNERSHIP_CASES,
    mechanisms::ASID_CASES,
    lifetime::LIFETIME_CASES,
    bounded::BOUNDED_DESTROY_CASES,
    revoke::REVOKE_CASES,
    hostile::HOSTILE_CASES,
    mechanisms::FUZZ_CASE,
    mechanisms::IO_CASES,
    fpu::FPU_CASES,
    mechanisms::PRIORITY_CASES,
]);

/// The run with the module option `huge`: the 1 GiB page cases alone.
const HUGE: Plan = Plan(&[huge::HUGE_PAGE_CASES]);

const _: () = assert!(FULL.len() <= tap::MAX_CASES && HUGE.len() <= tap::MAX_CASES);

fn main() -> i64 {
    l4::rt::fault_in_image();
    if l4::rt::arguments().split_whitespace().any(|w| w == "huge") {
        tap::begin(&HUGE);
        println!("# ktest: 1 GiB pages");
        let suite = Suite::new();
        let recorder = go(mechanisms::exception_recorder, 0);
        let suite = Suite {
            recorder: gate(recorder, 0x5eed),
            ..suite
        };
        huge::huge_page_cases(&suite);
        return tap::finish();
    }
    tap::begin(&FULL);
    println!("# ktest: kernel conformance suite");
    basic::kip_cases();
    basic::syscall_cases();
    basic::capability_cases();
    basic::factory_cases();
    basic::thread_cases();
    basic::scheduling_cases();
    basic::ipc_cases();

    let suite = Suite::new();
    basic::task_cases(&suite);
    mechanisms::exception_cases(&suite);
    mechanisms::irq_cases();
    let recorder = go(mechanisms::exception_recorder, 0);
    let suite = Suite {
        recorder: gate(recorder, 0x5eed),
        ..suite
    };
    mechanisms::mapping_cases(&suite);
    mechanisms::string_cases(&suite);
    mechanisms::string_timeout_case(&suite);
    mechanisms::string_edge_cases();
    mechanisms::quota_cases();
    mechanisms::large_page_cases(&suite);
    mechanisms::regression_cases();
    mechanisms::ownership_cases(&suite);
    mechanisms::asid_cases(&suite);
    lifetime::lifetime_cases(&suite);
    // Before the hostile floods, which keep their carved factories to the end.
    bounded::bounded_destroy_cases();
    revoke::revoke_cases(&suite);
    hostile::hostile_cases(&suite);
    mechanisms::fuzz_case(&suite);
    mechanisms::io_cases(&suite);
    fpu::fpu_cases(&suite);
    mechanisms::priority_cases();

    tap::finish()
}

l4::main!(main);
