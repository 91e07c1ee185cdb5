//! The memory functions compiled code calls (`memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`)
//! and the unwinding symbols the prebuilt `core` and `alloc` refer to, for tasks built for the
//! hard-float x86_64 target (see `.cargo/tasks.toml`): there they come from the C library,
//! which tasks do not link. (For `x86_64-unknown-none`, `compiler_builtins` provides them.)
//! The loops are string instructions in assembly, so the compiler cannot turn them back into
//! calls of these functions.

use core::arch::asm;

/// Copy `n` bytes from `source` to `destination` (which do not overlap).
///
/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(destination: *mut u8, source: *const u8, n: usize) -> *mut u8 {
    // SAFETY: per the caller, both ranges are valid for `n` bytes; DF is clear (ABI). Eight
    // bytes a step, then the rest (each step of a string instruction is an instruction).
    unsafe {
        asm!(
            "rep movsq",
            "mov rcx, {rest}",
            "rep movsb",
            rest = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") destination => _,
            inout("rsi") source => _,
            options(nostack, preserves_flags)
        )
    };
    destination
}

/// Copy `n` bytes from `source` to `destination` (which may overlap).
///
/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(destination: *mut u8, source: *const u8, n: usize) -> *mut u8 {
    if (destination as usize).wrapping_sub(source as usize) >= n {
        // SAFETY: copying forwards never overwrites source bytes not yet read.
        return unsafe { memcpy(destination, source, n) };
    }
    // SAFETY: backwards from the last byte (DF set only for this instruction); the ranges are
    // valid per the caller.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") destination.add(n - 1) => _,
            inout("rsi") source.add(n - 1) => _,
            options(nostack)
        )
    };
    destination
}

/// Fill `n` bytes at `destination` with `value`.
///
/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(destination: *mut u8, value: i32, n: usize) -> *mut u8 {
    let pattern = (value as u8 as u64) * 0x0101_0101_0101_0101;
    // SAFETY: per the caller, the range is valid for `n` bytes; DF is clear (ABI). Eight
    // bytes a step, then the rest.
    unsafe {
        asm!(
            "rep stosq",
            "mov rcx, {rest}",
            "rep stosb",
            rest = in(reg) n % 8,
            inout("rcx") n / 8 => _,
            inout("rdi") destination => _,
            in("rax") pattern,
            options(nostack, preserves_flags)
        )
    };
    destination
}

/// Compare `n` bytes.
///
/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: per the caller, both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// Compare `n` bytes for equality (0: equal).
///
/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: per the caller.
    unsafe { memcmp(a, b, n) }
}

/// Referred to by the prebuilt `alloc` of the hosted target; never called (tasks abort on
/// panic and do not unwind).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referred to by landing pads in the prebuilt libraries of the hosted target; never called
/// (nothing unwinds). Faults with #UD if it ever were.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: `ud2` only raises #UD, which the kernel turns into an exception IPC.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}
