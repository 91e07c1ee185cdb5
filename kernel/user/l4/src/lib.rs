//! The user-side library of L4 tasks: raw syscall stubs ([`sys`]), typed IPC ([`ipc`]), the
//! UTCB, borrowed per thread, and the KIP ([`utcb`], [`kip`]), threads ([`thread`]) and the
//! task runtime ([`rt`]: entry, exit, panic handler, heap, console output).
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

pub mod child;
pub mod com1;
pub mod ipc;
pub mod kip;
#[cfg(target_os = "linux")]
pub mod mem;
pub mod port;
pub mod rt;
pub mod sys;
pub mod thread;
pub mod uart;
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

    /// Label: map the physical range `[word0, word0 + 2^word1)` (a boot module, or device
    /// memory in the PCI hole below 4 GiB) into the caller's receive window.
    pub const LABEL_PHYSICAL: i32 = 0x5330;
    /// Label: allocate fresh zeroed memory of `2^word0` bytes (naturally aligned, order
    /// 12..=30) and map it into the caller's receive window (as a large page where possible).
    pub const LABEL_ALLOCATE: i32 = 0x5331;

    fn allocate_reply(pager: u64, order: u32, window: Fpage) -> Result<ipc::Received, IpcError> {
        crate::utcb::set_receive_window(window);
        ipc::call(
            pager,
            MessageTag::new(LABEL_ALLOCATE, 1, 0),
            &[order as u64],
            Timeouts::INFINITE,
        )
    }

    /// Ask sigma0 (through `pager`) for fresh memory of `1 << order` bytes in `window`.
    pub fn allocate(pager: u64, order: u32, window: Fpage) -> Result<bool, IpcError> {
        Ok(allocate_reply(pager, order, window)?.tag.typed() == 1)
    }

    /// As [`allocate`], and the memory's physical address (for a device's DMA), if it came.
    pub fn allocate_physical(
        pager: u64,
        order: u32,
        window: Fpage,
    ) -> Result<Option<u64>, IpcError> {
        let reply = allocate_reply(pager, order, window)?;
        Ok((reply.tag.typed() == 1 && reply.tag.untyped() == 1).then(|| reply.word(0)))
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

/// What a task asks of its parent (the root task), through slot [`l4_abi::slots::PARENT`].
pub mod parent {
    use crate::ipc::{self, IpcError};
    use l4_abi::{slots, MessageTag, Timeouts};

    /// Label: map `word1` bytes (a multiple of [`RAM_GRANULE`]) of fresh zeroed RAM, as
    /// large pages with all rights, at `word0` (aligned to [`RAM_GRANULE`]) in the caller's
    /// address space, out of the RAM budget its command line gives it (`ram=SIZE`): 1 GiB
    /// pages for the 1 GiB-aligned parts while sigma0 has them, 2 MiB pages for the rest. The reply
    /// has label 0 on success; label -1 and word 0 the [`l4_abi::Error`] code otherwise.
    pub const LABEL_RAM: i32 = 0x5241;
    /// Size and alignment of the RAM the parent hands out: 2 MiB (one large page each).
    pub const RAM_GRANULE: u64 = 2 << 20;

    /// Why a RAM request failed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RamError {
        /// The parent could not be reached.
        Ipc(IpcError),
        /// The parent refused (over budget, bad address, no memory).
        Refused(l4_abi::Error),
    }

    impl core::fmt::Display for RamError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                RamError::Ipc(e) => write!(f, "parent unreachable: {e:?}"),
                RamError::Refused(e) => write!(f, "parent refused: {e}"),
            }
        }
    }

    /// Ask the parent for `bytes` of RAM at `address` (see [`LABEL_RAM`]).
    pub fn request_ram(address: u64, bytes: u64) -> Result<(), RamError> {
        let reply = ipc::call(
            slots::PARENT,
            MessageTag::new(LABEL_RAM, 2, 0),
            &[address, bytes],
            Timeouts::INFINITE,
        )
        .map_err(RamError::Ipc)?;
        if reply.tag.label() == 0 {
            Ok(())
        } else {
            let code = reply.word(0);
            Err(RamError::Refused(
                l4_abi::Error::from_u64(code).unwrap_or(l4_abi::Error::InvalidArgument),
            ))
        }
    }
}
