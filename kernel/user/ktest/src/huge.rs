//! 1 GiB pages (module option `huge`, scenario `ktest-1g`, with `ram=1G` on a machine that has
//! a 1 GiB page free): RAM from the root task's RAM service that arrives as one 1 GiB page,
//! mapped on as one page (one mapping node) into a VM and a task, split on demand by partial unmaps (a 2 MiB piece,
//! then a 4 KiB page of another piece), and revoked whole.

use crate::hostile::{books_balance, used};
use crate::mechanisms::{Agent, MARKER, TWO_MIB};
use crate::support::{Suite, TEST_AREA};
use crate::tap::{check, check_eq, Case};
use l4::abi::{slots, Fpage, ObjectKind, NO_CAP, PAGE_SIZE};
use l4::abi::{MapFlags, UnmapFlags};
use l4::thread::alloc_slot;
use l4::{println, sys};

/// Where our 1 GiB page of RAM is (1 GiB aligned).
const HUGE_AT: u64 = 0x0000_0c00_0000_0000;
/// Where the agent gets it.
const HUGE_TARGET: u64 = TEST_AREA + (4 << 30);
const GIB: u64 = 1 << 30;

/// The cases of [`huge_page_cases`], in the order it reports them.
pub(crate) const HUGE_PAGE_CASES: &[Case] = &[
    ("huge", "1 GiB of RAM from the root task arrives zeroed and writable"),
    ("huge", "1 GiB of guest RAM lands in a VM as one nested 1 GiB page: one node and one table, under 12 KiB"),
    ("huge", "a 1 GiB flexpage lands in another task as one page: one node and one table, under 12 KiB"),
    ("huge", "a partial unmap splits the 1 GiB page down to the 4 KiB that goes; the rest stays"),
    ("huge", "unmapping a 2 MiB piece of the split page takes that piece only"),
    ("huge", "the mapper's own 1 GiB page is untouched"),
    ("huge", "unmapping the whole 1 GiB revokes the rest"),
    ("quota", "the kernel's books balance after the 1 GiB cases"),
];

pub(crate) fn huge_page_cases(suite: &Suite) {
    let got = l4::parent::request_ram(HUGE_AT, GIB);
    // SAFETY: the root task mapped 1 GiB of RAM here for us (when `got` is Ok).
    let ours = |offset: u64| unsafe { core::ptr::read_volatile((HUGE_AT + offset) as *const u64) };
    // SAFETY: as above.
    let write = |offset: u64, value: u64| unsafe {
        core::ptr::write_volatile((HUGE_AT + offset) as *mut u64, value)
    };
    // The first word of pages in three 2 MiB pieces, and of a neighbour of the middle one
    // (a revoked page reads as the probing pager's marker there).
    let marks = [
        (0, 0xa0),
        (512 << 20, 0xa1),
        ((512 << 20) + PAGE_SIZE, 0xa2),
        (GIB - TWO_MIB, 0xa3),
    ];
    let zero = got.is_ok() && marks.iter().all(|&(o, _)| ours(o) == 0);
    if got.is_ok() {
        for (offset, value) in marks {
            write(offset, value);
        }
    }
    check(
        "huge",
        "1 GiB of RAM from the root task arrives zeroed and writable",
        zero && marks.iter().all(|&(o, v)| ours(o) == v),
    );
    if got.is_err() {
        println!("# huge: no 1 GiB of RAM: {got:?}");
    }

    // Into a VM first: partial unmaps below split our own page too (split pages do not
    // merge again).
    let vm = alloc_slot();
    let made = sys::factory_create(slots::FACTORY, ObjectKind::Vm, vm, NO_CAP, 0);
    let before = used(slots::FACTORY);
    let into_vm = made.and_then(|()| {
        sys::map(
            vm,
            Fpage::memory(HUGE_AT, 30, Fpage::RWX),
            0,
            MapFlags::empty(),
        )
    });
    let cost = used(slots::FACTORY) - before;
    println!("# huge: 1 GiB of guest RAM cost a VM {cost} bytes of kernel memory");
    check(
        "huge",
        "1 GiB of guest RAM lands in a VM as one nested 1 GiB page: one node and one table, under 12 KiB",
        into_vm.is_ok() && cost < 12 << 10,
    );
    let _ = sys::cap_delete(vm);

    let a = Agent::new(suite);
    let before = used(slots::FACTORY);
    let mapped = sys::map(
        a.task,
        Fpage::memory(HUGE_AT, 30, Fpage::READ),
        HUGE_TARGET,
        MapFlags::empty(),
    );
    let cost = used(slots::FACTORY) - before;
    let seen = marks.iter().all(|&(o, v)| a.read(HUGE_TARGET + o) == v);
    println!("# huge: mapping 1 GiB into a task cost {cost} bytes of kernel memory");
    // As 2 MiB pages it would be 512 mapping nodes of 64 bytes (32 KiB) and a page directory.
    check(
        "huge",
        "a 1 GiB flexpage lands in another task as one page: one node and one table, under 12 KiB",
        mapped.is_ok() && seen && cost < 12 << 10,
    );

    // SAFETY: revokes only the agent's copy of one 4 KiB page.
    let one = unsafe {
        sys::unmap(
            Fpage::memory(HUGE_AT + (512 << 20), 12, Fpage::RWX),
            UnmapFlags::empty(),
        )
    };
    check_eq(
        "huge",
        "a partial unmap splits the 1 GiB page down to the 4 KiB that goes; the rest stays",
        (one, marks.map(|(o, _)| a.read(HUGE_TARGET + o))),
        (Ok(()), [0xa0, MARKER, 0xa2, 0xa3]),
    );
    // SAFETY: revokes only the agent's copy of the last 2 MiB piece.
    let piece = unsafe {
        sys::unmap(
            Fpage::memory(HUGE_AT + GIB - TWO_MIB, 21, Fpage::RWX),
            UnmapFlags::empty(),
        )
    };
    check_eq(
        "huge",
        "unmapping a 2 MiB piece of the split page takes that piece only",
        (piece, marks.map(|(o, _)| a.read(HUGE_TARGET + o))),
        (Ok(()), [0xa0, MARKER, 0xa2, MARKER]),
    );
    check_eq(
        "huge",
        "the mapper's own 1 GiB page is untouched",
        marks.map(|(o, _)| ours(o)),
        marks.map(|(_, v)| v),
    );

    // SAFETY: revokes only the agent's copies.
    let all = unsafe { sys::unmap(Fpage::memory(HUGE_AT, 30, Fpage::RWX), UnmapFlags::empty()) };
    check_eq(
        "huge",
        "unmapping the whole 1 GiB revokes the rest",
        (
            all,
            a.read(HUGE_TARGET),
            a.read(HUGE_TARGET + (512 << 20) + PAGE_SIZE),
        ),
        (Ok(()), MARKER, MARKER),
    );
    let _ = sys::task_destroy(a.task);

    check(
        "quota",
        "the kernel's books balance after the 1 GiB cases",
        books_balance(),
    );
}
