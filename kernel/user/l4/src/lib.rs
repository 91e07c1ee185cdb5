//! The user-side library of L4 tasks: raw syscall stubs ([`sys`]), typed IPC ([`ipc`]), the
//! UTCB and KIP ([`utcb`], [`kip`]), threads ([`thread`]) and the task runtime ([`rt`]: entry,
//! exit, panic handler, heap, console output).
#![no_std]

extern crate alloc;

pub mod child;
pub mod ipc;
pub mod kip;
#[cfg(target_os = "linux")]
pub mod mem;
pub mod rt;
pub mod sys;
pub mod thread;
pub mod utcb;

pub use l4_abi as abi;
pub use l4_abi::Error;

/// Print to the kernel console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::rt::print(format_args!($($arg)*)) };
}

/// Print a line to the kernel console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::rt::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Declare the task's main function: `l4::main!(main);` with `fn main() -> i64`. The
/// return value is the task's exit code.
#[macro_export]
macro_rules! main {
    ($function:path) => {
        #[no_mangle]
        extern "Rust" fn l4_task_main() -> i64 {
            $function()
        }
    };
}

/// The sigma0 protocol (spoken to the root pager).
pub mod sigma0 {
    use crate::ipc::{self, IpcError};
    use l4_abi::{Fpage, MessageTag, Timeouts};

    /// Label: map the physical range `[word0, word0 + 2^word1)` (a boot module) into the
    /// caller's receive window.
    pub const LABEL_PHYSICAL: i32 = 0x5330;
    /// Label: allocate fresh zeroed memory of `2^word0` bytes (naturally aligned, order
    /// 12..=21) and map it into the caller's receive window (as a large page where possible).
    pub const LABEL_ALLOCATE: i32 = 0x5331;

    /// Ask sigma0 (through `pager`) for fresh memory of `1 << order` bytes in `window`.
    pub fn allocate(pager: u64, order: u32, window: Fpage) -> Result<bool, IpcError> {
        crate::utcb::set_receive_window(window);
        let reply = ipc::call(
            pager,
            MessageTag::new(LABEL_ALLOCATE, 1, 0),
            &[order as u64],
            Timeouts::INFINITE,
        )?;
        Ok(reply.tag.typed() == 1)
    }

    /// Ask sigma0 (through `pager`) for the physical range at `physical` of `1 << order` bytes,
    /// to be mapped into `window` of this thread.
    pub fn request_physical(
        pager: u64,
        physical: u64,
        order: u32,
        window: Fpage,
    ) -> Result<bool, IpcError> {
        crate::utcb::set_receive_window(window);
        let reply = ipc::call(
            pager,
            MessageTag::new(LABEL_PHYSICAL, 2, 0),
            &[physical, order as u64],
            Timeouts::INFINITE,
        )?;
        Ok(reply.tag.typed() == 1)
    }
}
