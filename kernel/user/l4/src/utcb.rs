//! The current thread's UTCB, borrowed: [`with_utcb`] lends `&mut` [`Utcb`] to a closure,
//! at most one at a time per thread (a second borrow while one is live panics, as a `RefCell`
//! would), and [`Utcb::lend`] gives the borrow back for a while to code below its holder.
//!
//! The UTCB is found through the FS segment base the kernel sets. Its borrow state is a word
//! of the UTCB's runtime area ([`l4_abi::Utcb::user`]`[1]`), so it is per thread by
//! construction; no reference ever covers that area. A [`Utcb`] is neither `Send` nor
//! `Sync`: a thread cannot hand its UTCB to another.

use core::arch::asm;
use core::marker::PhantomData;
use core::mem::{offset_of, size_of};
use l4_abi::UTCB_SELF_OFFSET;

/// The message and buffer registers of the current thread's UTCB (the part of
/// [`l4_abi::Utcb`] a program reads and writes), reached only through [`with_utcb`]. IPC that
/// is to keep a borrow goes through its methods ([`Utcb::call`] and the rest), which give the
/// kernel the borrow for the syscall.
#[repr(C)]
pub struct Utcb {
    /// Message registers. Words 0..4 of a message travel in CPU registers; words 4..64 here.
    pub mr: [u64; 64],
    /// Buffer registers (see [`l4_abi::Utcb::br`]).
    pub br: [u64; 16],
    /// Neither `Send` nor `Sync`: the UTCB belongs to its thread.
    _thread: PhantomData<*mut ()>,
}

const _: () = assert!(offset_of!(Utcb, mr) == offset_of!(l4_abi::Utcb, mr));
const _: () = assert!(offset_of!(Utcb, br) == offset_of!(l4_abi::Utcb, br));
const _: () = assert!(size_of::<Utcb>() == offset_of!(l4_abi::Utcb, user));

/// Offset (from the FS base) of the borrow word: 0 while the UTCB is not borrowed,
/// [`BORROWED`] while a `&mut Utcb` is live, the lender's pointer inside [`Utcb::lend`].
const BORROW_OFFSET: usize = UTCB_SELF_OFFSET + 8;
/// The borrow word while a `&mut Utcb` is live.
const BORROWED: usize = 1;

/// The current thread's UTCB address (the kernel keeps it at `fs:[UTCB_SELF_OFFSET]`).
#[inline(always)]
pub fn address() -> u64 {
    let address: u64;
    // SAFETY: the kernel sets FS to the UTCB of the running thread and stores the UTCB's own
    // address at UTCB_SELF_OFFSET; reading it has no side effects.
    unsafe {
        asm!("mov {}, fs:[{}]", out(reg) address, const UTCB_SELF_OFFSET, options(nostack, readonly, preserves_flags))
    };
    address
}

#[inline(always)]
fn borrow_word() -> *mut Utcb {
    let word: *mut Utcb;
    // SAFETY: as in `address`: the word lies in this thread's UTCB page, which no reference
    // covers (a `Utcb` ends where the runtime area begins).
    unsafe {
        asm!("mov {}, fs:[{}]", out(reg) word, const BORROW_OFFSET, options(nostack, readonly, preserves_flags))
    };
    word
}

#[inline(always)]
fn set_borrow_word(word: *mut Utcb) {
    // SAFETY: as in `borrow_word`; only this thread writes its borrow word.
    unsafe {
        asm!("mov fs:[{}], {}", const BORROW_OFFSET, in(reg) word, options(nostack, preserves_flags))
    };
}

#[cold]
#[inline(never)]
#[track_caller]
fn already_borrowed() -> ! {
    panic!("the UTCB is already borrowed")
}

/// Run `f` with the current thread's UTCB. Panics if it is borrowed already (by a caller up
/// the stack that has not lent it with [`Utcb::lend`]).
#[inline]
#[track_caller]
pub fn with_utcb<T>(f: impl FnOnce(&mut Utcb) -> T) -> T {
    let word = borrow_word();
    if word as usize == BORROWED {
        already_borrowed();
    }
    let utcb = if word.is_null() {
        address() as *mut Utcb
    } else {
        // Lent (see `Utcb::lend`): borrow through the lender's pointer.
        word
    };
    set_borrow_word(BORROWED as *mut Utcb);
    // SAFETY: the UTCB page is mapped for the thread's lifetime and only this thread uses
    // it; the borrow word said no `&mut Utcb` is live (or that its holder lent it and is
    // parked in `lend` until `f` returns), and it says BORROWED until `f` returns, so this is
    // the only live reference; `f` cannot keep it past its return.
    let result = f(unsafe { &mut *utcb });
    set_borrow_word(word);
    result
}

/// End every borrow of the UTCB, for a thread that will not return to their holders (it
/// exits).
///
/// # Safety
/// No frame that holds a `&mut Utcb` (or lent one) may run again: call only on the way to
/// ending the thread.
pub(crate) unsafe fn end_borrows() {
    set_borrow_word(core::ptr::null_mut());
}

impl Utcb {
    /// Give the borrow back while `f` runs: code below may use [`with_utcb`] (and the IPC
    /// functions that borrow the UTCB themselves) again. What `f` leaves in the message
    /// registers stays there.
    #[inline]
    pub fn lend<T>(&mut self, f: impl FnOnce() -> T) -> T {
        set_borrow_word(self as *mut Utcb);
        let result = f();
        set_borrow_word(BORROWED as *mut Utcb);
        result
    }

    /// Set the receive window for map items (see [`l4_abi::BR_RECEIVE_WINDOW`]).
    pub fn set_receive_window(&mut self, window: l4_abi::Fpage) {
        self.br[l4_abi::BR_RECEIVE_WINDOW] = window.0;
    }

    /// Name receive buffer `index` (0..[`l4_abi::MAX_STRINGS`]) for string items.
    pub fn set_string_buffer(&mut self, index: usize, buffer: &mut [u8]) {
        let words = l4_abi::StringItem {
            length: buffer.len() as u64,
            address: buffer.as_mut_ptr() as u64,
        }
        .words();
        self.br[2 + 2 * index] = words[0];
        self.br[3 + 2 * index] = words[1];
    }

    /// Remove receive buffer `index`.
    pub fn clear_string_buffer(&mut self, index: usize) {
        self.br[2 + 2 * index] = 0;
        self.br[3 + 2 * index] = 0;
    }
}

/// Word `i` of the message registers.
impl core::ops::Index<usize> for Utcb {
    type Output = u64;
    #[inline(always)]
    fn index(&self, i: usize) -> &u64 {
        &self.mr[i]
    }
}

/// Word `i` of the message registers.
impl core::ops::IndexMut<usize> for Utcb {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut u64 {
        &mut self.mr[i]
    }
}

/// Set the receive window for map items (see [`l4_abi::BR_RECEIVE_WINDOW`]).
pub fn set_receive_window(window: l4_abi::Fpage) {
    with_utcb(|u| u.set_receive_window(window));
}

/// Name receive buffer `index` (0..[`l4_abi::MAX_STRINGS`]) for string items.
pub fn set_string_buffer(index: usize, buffer: &mut [u8]) {
    with_utcb(|u| u.set_string_buffer(index, buffer));
}

/// Remove receive buffer `index`.
pub fn clear_string_buffer(index: usize) {
    with_utcb(|u| u.clear_string_buffer(index));
}
