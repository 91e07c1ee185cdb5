//! x86_64-specific code: boot, CPU tables and entry stubs, paging, interrupt controllers.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod entry;
pub mod fpu;
pub mod ioapic;
pub mod paging;
pub mod serial;
pub mod svm;
