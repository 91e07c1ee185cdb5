//! Kernel logging to the serial console with levels.

use crate::arch::x86_64::serial::Console;
use core::fmt::Write;

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something is wrong in a task (a refused fault, a killed thread).
    Warn,
    /// Normal progress.
    Info,
    /// Details.
    Debug,
}

/// Messages above this level are dropped.
pub static mut MAX_LEVEL: Level = Level::Info;

/// Print one log line (use the macros).
pub fn log(level: Level, args: core::fmt::Arguments) {
    // SAFETY: single CPU, interrupts off in the kernel: no concurrent access.
    if level > unsafe { MAX_LEVEL } {
        return;
    }
    let tag = match level {
        Level::Warn => "WARN ",
        Level::Info => "",
        Level::Debug => "debug ",
    };
    let _ = writeln!(Console, "[kernel] {tag}{args}");
}

/// Log at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Log at warning level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warn, format_args!($($arg)*)) };
}

/// Log at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Debug, format_args!($($arg)*)) };
}
