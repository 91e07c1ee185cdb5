//! Reporting in TAP against a plan known before the first case runs.
//!
//! A [`Plan`] is a static table of every case a run reports, group by group in the order they
//! run. [`begin`] prints its `1..N` first. [`check`] looks its case up in the plan and prints
//! `ok N - area: case` (or `not ok N - ...`), N being the case's place in the plan; a case that
//! is not in the plan, is reported twice or out of the plan's order fails. [`finish`] reports
//! every case of the plan that never ran as `not ok N - area: case (did not run)` and returns
//! the number of failures.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use l4::println;

/// A case: its area and its name, reported as `area: name`.
pub(crate) type Case = (&'static str, &'static str);

/// The cases of a run: the case tables of its groups, in the order the groups run.
pub(crate) struct Plan(pub(crate) &'static [&'static [Case]]);

impl Plan {
    /// The number of cases.
    pub(crate) const fn len(&self) -> usize {
        let mut total = 0;
        let mut group = 0;
        while group < self.0.len() {
            total += self.0[group].len();
            group += 1;
        }
        total
    }

    /// The cases in order (the first has number 1).
    fn cases(&self) -> impl Iterator<Item = &'static Case> {
        self.0.iter().flat_map(|group| group.iter())
    }
}

/// The most cases a plan may hold.
pub(crate) const MAX_CASES: usize = 512;

/// The plan of this run (null before [`begin`]); only ever set from a `&'static Plan`.
static PLAN: AtomicPtr<Plan> = AtomicPtr::new(core::ptr::null_mut());
/// Which cases of the plan have been reported, by index.
static REPORTED: [AtomicBool; MAX_CASES] = [const { AtomicBool::new(false) }; MAX_CASES];
/// One past the index of the last case reported.
static NEXT: AtomicUsize = AtomicUsize::new(0);
static PASSED: AtomicU64 = AtomicU64::new(0);
static SKIPPED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Takes `plan` as the plan of this run and prints it (`1..N`). A plan that names a case
/// twice fails the run.
pub(crate) fn begin(plan: &'static Plan) {
    assert!(
        plan.len() <= MAX_CASES,
        "a plan of more than {MAX_CASES} cases"
    );
    PLAN.store(plan as *const Plan as *mut Plan, SeqCst);
    println!("1..{}", plan.len());
    for (index, case) in plan.cases().enumerate() {
        if plan.cases().take(index).any(|earlier| earlier == case) {
            FAILED.fetch_add(1, SeqCst);
            println!("# ktest: the plan names \"{}: {}\" twice", case.0, case.1);
        }
    }
}

fn plan() -> &'static Plan {
    let plan = PLAN.load(SeqCst);
    assert!(!plan.is_null(), "a case reported before tap::begin");
    // SAFETY: PLAN only ever holds null or a pointer made from a `&'static Plan` (in
    // `begin`), which nothing writes through.
    unsafe { &*plan }
}

/// How a case ended.
enum Outcome<'a> {
    Passed,
    Failed,
    Skipped(&'a str),
}

/// Reports the case `area: case` of the plan.
fn report(area: &str, case: &str, outcome: Outcome) {
    let Some(index) = plan().cases().position(|c| c.0 == area && c.1 == case) else {
        FAILED.fetch_add(1, SeqCst);
        println!("not ok 0 - {area}: {case} (not in the plan)");
        return;
    };
    let n = index + 1;
    if REPORTED[index].swap(true, SeqCst) {
        FAILED.fetch_add(1, SeqCst);
        println!("not ok {n} - {area}: {case} (reported twice)");
        return;
    }
    // Cases the plan lists before the last one reported either ran (then the plan's order is
    // wrong) or did not (and `finish` says so); cases skipped over are left to `finish`.
    let last = NEXT.fetch_max(n, SeqCst);
    if n < last {
        FAILED.fetch_add(1, SeqCst);
        println!(
            "not ok {n} - {area}: {case} (reported after case {last}: the plan's order is wrong)"
        );
        return;
    }
    match outcome {
        Outcome::Passed => {
            PASSED.fetch_add(1, SeqCst);
            println!("ok {n} - {area}: {case}");
        }
        Outcome::Skipped(reason) => {
            SKIPPED.fetch_add(1, SeqCst);
            println!("ok {n} - {area}: {case} # SKIP {reason}");
        }
        Outcome::Failed => {
            FAILED.fetch_add(1, SeqCst);
            println!("not ok {n} - {area}: {case}");
        }
    }
}

/// Reports the case `area: case`: passed if `ok`.
pub(crate) fn check(area: &str, case: &str, ok: bool) {
    report(
        area,
        case,
        if ok { Outcome::Passed } else { Outcome::Failed },
    );
}

/// Reports the case `area: case`: passed if `got == want`, else failed with both shown.
pub(crate) fn check_eq<T: PartialEq + core::fmt::Debug>(area: &str, case: &str, got: T, want: T) {
    let ok = got == want;
    if !ok {
        println!("# {area}: {case}: got {got:?}, want {want:?}");
    }
    check(area, case, ok);
}

/// Reports the case `area: case` as skipped (TAP's `# SKIP`), for `reason`.
pub(crate) fn skip(area: &str, case: &str, reason: &str) {
    report(area, case, Outcome::Skipped(reason));
}

/// Reports each case of the plan that never ran as failed, prints the summary and returns the
/// number of failures (the exit status).
pub(crate) fn finish() -> i64 {
    for (index, (area, case)) in plan().cases().enumerate() {
        if !REPORTED[index].load(SeqCst) {
            FAILED.fetch_add(1, SeqCst);
            println!("not ok {} - {area}: {case} (did not run)", index + 1);
        }
    }
    let (passed, skipped, failed) = (
        PASSED.load(SeqCst),
        SKIPPED.load(SeqCst),
        FAILED.load(SeqCst),
    );
    if skipped == 0 {
        println!("# ktest: {passed} passed, {failed} failed");
    } else {
        println!("# ktest: {passed} passed, {failed} failed, {skipped} skipped");
    }
    failed as i64
}
