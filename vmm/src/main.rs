//! The VMM task: runs one guest on the VMM library ([`vmm`]), chosen by its arguments:
//! `linux` boots a Linux compartment ([`vmm::linux`]), `multiboot` a Multiboot kernel
//! ([`vmm::multiboot`]); without either it runs the bare-metal guest suite ([`suite`]).
#![no_std]
#![no_main]

extern crate alloc;

mod suite;

fn main() -> i64 {
    let words = || l4::rt::arguments().split_whitespace();
    let name = vmm::platform::argument("name");
    if words().any(|w| w == "linux") {
        vmm::terminal::open(name.unwrap_or("linux"));
        if words().any(|w| w == "probe-isolation") {
            vmm::probe::run();
        }
        vmm::linux::boot_linux()
    } else if words().any(|w| w == "multiboot") {
        vmm::terminal::open(name.unwrap_or("multiboot"));
        vmm::multiboot::boot_multiboot()
    } else {
        suite::run_suite()
    }
}

l4::main!(main);
