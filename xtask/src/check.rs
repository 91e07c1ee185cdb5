//! Judging one boot: the serial log and QEMU's exit against a scenario's `[check]`.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;

use crate::scenario::Check;

/// How QEMU ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Status(i32),
    /// A signal ended it.
    Signal,
    /// It ran past the timeout and was killed.
    TimedOut,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(s) => write!(f, "{s}"),
            Exit::Signal => f.write_str("killed by a signal"),
            Exit::TimedOut => f.write_str("timed out"),
        }
    }
}

/// The verdict on one boot.
#[derive(Debug, Default)]
pub struct Report {
    /// Log lines the check asks to show.
    pub shown: Vec<String>,
    /// The TAP suite's summary line.
    pub summary: Option<String>,
    /// `ok N - ` lines of the TAP suite (each counts as a pass).
    pub tap_passed: usize,
    /// `not ok N - ` lines of the TAP suite (each counts as a failure).
    pub tap_failed: usize,
    /// The named checks: passed or not, and the line to print.
    pub results: Vec<(bool, String)>,
}

impl Report {
    /// All passes, TAP lines included.
    pub fn passed(&self) -> usize {
        self.tap_passed + self.results.iter().filter(|r| r.0).count()
    }

    /// All failures, TAP lines included.
    pub fn failed(&self) -> usize {
        self.tap_failed + self.results.iter().filter(|r| !r.0).count()
    }
}

/// The result of a console dialog of which `steps` steps matched.
pub fn dialog_result(check: &Check, steps: usize, log_path: &str) -> (bool, String) {
    match check.console.get(steps) {
        None => (
            true,
            format!("{}: console dialog ({steps} steps)", check.name),
        ),
        Some(step) => (
            false,
            format!(
                "{}: console dialog stopped at step {} of {}: the output never showed /{}/ (log: {log_path})",
                check.name,
                steps + 1,
                check.console.len(),
                step.expect
            ),
        ),
    }
}

/// Judges `log` (the serial output) and `exit` against `check`; `log_path` goes into every
/// failure message.
pub fn judge(check: &Check, log: &str, exit: Exit, log_path: &str) -> Report {
    let lines: Vec<&str> = log.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut report = Report {
        shown: lines
            .iter()
            .filter(|l| check.show.iter().any(|r| r.is_match(l)))
            .map(|l| l.to_string())
            .collect(),
        ..Report::default()
    };
    let exit_text = match exit {
        Exit::TimedOut => format!("timed out after {} s", check.timeout.as_secs()),
        other => other.to_string(),
    };
    if let Some(tap) = &check.tap {
        let tap_line = Regex::new(r"^(not )?ok ([0-9]+) - ").expect("valid");
        let plan_line = Regex::new(r"^1\.\.([0-9]+)$").expect("valid");
        let suite: Vec<&str> = lines
            .iter()
            .filter_map(|l| match &tap.prefix {
                Some(prefix) => l.strip_prefix(prefix.as_str()),
                None => Some(l),
            })
            .collect();
        let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
        let first_case = suite.iter().position(|l| tap_line.is_match(l));
        for caps in suite.iter().filter_map(|l| tap_line.captures(l)) {
            if caps.get(1).is_some() {
                report.tap_failed += 1;
            } else {
                report.tap_passed += 1;
            }
            let number = caps[2].parse().unwrap_or(u64::MAX);
            *seen.entry(number).or_default() += 1;
        }
        // A suite that prints its plan first is judged by its first plan line, others by
        // their last.
        let mut plan_lines = suite
            .iter()
            .enumerate()
            .filter_map(|(i, l)| plan_line.captures(l).map(|c| (i, c[1].to_string())));
        let judged = if tap.plan_first {
            plan_lines.next()
        } else {
            plan_lines.next_back()
        };
        let (plan_at, printed_plan) = judged.unzip();
        let plan = u64::from(tap.plan);
        let mut problems = Vec::new();
        let missing: Vec<u64> = (1..=plan).filter(|n| !seen.contains_key(n)).collect();
        if !missing.is_empty() {
            problems.push(format!("missing {}", numbers(&missing)));
        }
        let twice: Vec<u64> = seen.iter().filter(|e| *e.1 > 1).map(|e| *e.0).collect();
        if !twice.is_empty() {
            problems.push(format!("reported more than once {}", numbers(&twice)));
        }
        let extra: Vec<u64> = seen
            .keys()
            .copied()
            .filter(|&n| n == 0 || n > plan)
            .collect();
        if !extra.is_empty() {
            problems.push(format!(
                "beyond the plan {} (a new case? raise `plan` in scenarios.toml)",
                numbers(&extra)
            ));
        }
        if tap.plan_line && printed_plan.as_deref() != Some(&plan.to_string()) {
            problems.push(match &printed_plan {
                Some(p) => format!("the suite printed plan 1..{p}"),
                None => "no plan line 1..N".to_string(),
            });
        }
        if tap.plan_first {
            if let (Some(plan_at), Some(case_at)) = (plan_at, first_case) {
                if plan_at > case_at {
                    problems.push("the plan line 1..N came after the first case".to_string());
                }
            }
        }
        let cases = report.tap_passed + report.tap_failed;
        report.summary = Some(format!(
            "{}: {} ok, {} not ok, plan {}, QEMU status {}",
            tap.label, report.tap_passed, report.tap_failed, tap.plan, exit_text
        ));
        report.results.push(if problems.is_empty() {
            (
                true,
                format!(
                    "{}: all {plan} planned cases reported, each once",
                    tap.label
                ),
            )
        } else {
            (
                false,
                format!(
                    "{}: {cases} cases reported, plan {plan}: {} (see {log_path})",
                    tap.label,
                    problems.join("; ")
                ),
            )
        });
    }
    let mut problems = Vec::new();
    if let Some(want) = check.status {
        if exit != Exit::Status(want) {
            problems.push(format!("QEMU exit status {exit_text}, want {want}"));
        }
    } else if exit == Exit::TimedOut {
        problems.push(format!("QEMU {exit_text}"));
    }
    for r in &check.require {
        if !lines.iter().any(|l| r.is_match(l)) {
            problems.push(format!("no line matches /{r}/"));
        }
    }
    for r in &check.forbid {
        if let Some(l) = lines.iter().find(|l| r.is_match(l)) {
            problems.push(format!("forbidden /{r}/ in {l:?}"));
        }
    }
    report.results.push(if problems.is_empty() {
        (true, check.name.clone())
    } else {
        (
            false,
            format!("{} ({}; see {log_path})", check.name, problems.join("; ")),
        )
    });
    report
}

/// "3, 5, 9" (at most ten, then "...").
fn numbers(list: &[u64]) -> String {
    let mut text: Vec<String> = list.iter().take(10).map(|n| n.to_string()).collect();
    if list.len() > 10 {
        text.push(format!("... ({} in all)", list.len()));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scenario::Tap;

    fn check(status: Option<i32>, tap: Option<(u32, bool)>) -> Check {
        Check {
            name: "suite: clean power-off".into(),
            timeout: Duration::from_secs(7),
            status,
            require: vec![Regex::new(r"\[root\] all tasks finished").unwrap()],
            forbid: vec![Regex::new("PANIC").unwrap()],
            show: vec![Regex::new("^not ok").unwrap()],
            tap: tap.map(|(plan, plan_line)| Tap {
                label: "suite".into(),
                plan,
                plan_line,
                plan_first: false,
                prefix: None,
            }),
            console: Vec::new(),
        }
    }

    #[test]
    fn a_dialog_passes_only_when_every_step_matched() {
        let mut c = check(None, None);
        for expect in ["# $", "kernel=6"] {
            c.console.push(crate::scenario::Step {
                expect: Regex::new(expect).unwrap(),
                send: String::new(),
                fetch: None,
                serial: None,
            });
        }
        assert!(dialog_result(&c, 2, "log").0);
        let (ok, text) = dialog_result(&c, 1, "log");
        assert!(!ok);
        assert!(
            text.contains("step 2 of 2") && text.contains("kernel=6"),
            "{text}"
        );
    }

    const GOOD: &str = "ok 1 - a\r\nnot ok 2 - b\nok 3 - c\n1..3\n[root] all tasks finished\n";

    #[test]
    fn a_complete_suite_passes_its_plan() {
        let r = judge(
            &check(Some(33), Some((3, true))),
            GOOD,
            Exit::Status(33),
            "l",
        );
        assert_eq!((r.tap_passed, r.tap_failed), (2, 1));
        assert_eq!(r.shown, ["not ok 2 - b"]);
        assert_eq!(
            r.summary.as_deref(),
            Some("suite: 2 ok, 1 not ok, plan 3, QEMU status 33")
        );
        assert!(r.results.iter().all(|r| r.0), "{:?}", r.results);
        assert_eq!((r.passed(), r.failed()), (4, 1));
    }

    #[test]
    fn a_missing_case_fails_the_plan() {
        let log = "ok 1 - a\nok 3 - c\n[root] all tasks finished\n";
        let r = judge(
            &check(Some(33), Some((3, false))),
            log,
            Exit::Status(33),
            "x.log",
        );
        assert!(!r.results[0].0);
        assert_eq!(
            r.results[0].1,
            "suite: 2 cases reported, plan 3: missing 2 (see x.log)"
        );
        assert!(r.results[1].0);
    }

    #[test]
    fn duplicates_extra_cases_and_a_wrong_plan_line_fail() {
        let log = "ok 1 - a\nok 1 - a\nok 2 - b\nok 4 - d\n1..4\n";
        let r = judge(&check(None, Some((3, true))), log, Exit::Status(33), "l");
        let text = &r.results[0].1;
        assert!(!r.results[0].0);
        assert!(text.contains("missing 3"), "{text}");
        assert!(text.contains("more than once 1"), "{text}");
        assert!(text.contains("beyond the plan 4"), "{text}");
        assert!(text.contains("printed plan 1..4"), "{text}");
    }

    #[test]
    fn a_plan_first_suite_must_print_its_plan_before_any_case() {
        let mut c = check(Some(33), Some((3, true)));
        c.tap.as_mut().unwrap().plan_first = true;
        let first = "1..3\nok 1 - a\nnot ok 2 - b\nok 3 - c\n";
        let r = judge(&c, first, Exit::Status(33), "l");
        assert!(r.results[0].0, "{:?}", r.results);
        // GOOD prints it last: right for other suites, a failure here.
        let r = judge(&c, GOOD, Exit::Status(33), "l");
        let text = &r.results[0].1;
        assert!(!r.results[0].0);
        assert!(
            text.contains("plan line 1..N came after the first case"),
            "{text}"
        );
        // The first plan line is the one judged.
        let r = judge(
            &c,
            "1..2\nok 1 - a\nok 2 - b\nok 3 - c\n1..3\n",
            Exit::Status(33),
            "l",
        );
        assert!(
            r.results[0].1.contains("printed plan 1..2"),
            "{}",
            r.results[0].1
        );
    }

    #[test]
    fn a_prefixed_suite_counts_only_its_own_lines() {
        let mut c = check(None, Some((2, true)));
        c.tap.as_mut().unwrap().prefix = Some("[mb] ".into());
        let log = "[mb] ok 1 - a\nok 2 - not the suite's\n[mb] not ok 2 - b\n1..9\n[mb] 1..2\n";
        let r = judge(&c, log, Exit::Status(33), "l");
        assert_eq!((r.tap_passed, r.tap_failed), (1, 1));
        let text = &r.results[0].1;
        assert!(
            !text.contains("missing") && !text.contains("plan 1..9"),
            "{text}"
        );
        let r = judge(&c, "ok 1 - a\nok 2 - b\n1..2\n", Exit::Status(33), "l");
        assert!(
            r.results[0].1.contains("missing 1, 2"),
            "{}",
            r.results[0].1
        );
    }

    #[test]
    fn the_status_and_the_strings_are_checked() {
        let c = check(Some(33), None);
        let r = judge(&c, "[root] all tasks finished\n", Exit::Status(33), "l");
        assert_eq!(r.results, [(true, "suite: clean power-off".to_string())]);
        let r = judge(&c, "[kernel] PANIC: x\n", Exit::Status(37), "d.log");
        let (ok, text) = &r.results[0];
        assert!(!ok);
        assert!(text.contains("QEMU exit status 37, want 33"), "{text}");
        assert!(
            text.contains(r"no line matches /\[root\] all tasks finished/"),
            "{text}"
        );
        assert!(
            text.contains("forbidden /PANIC/ in \"[kernel] PANIC: x\""),
            "{text}"
        );
        assert!(text.ends_with("see d.log)"), "{text}");
    }

    #[test]
    fn a_timeout_fails_even_without_a_status() {
        let r = judge(
            &check(None, None),
            "[root] all tasks finished\n",
            Exit::TimedOut,
            "l",
        );
        assert!(!r.results[0].0);
        assert!(
            r.results[0].1.contains("timed out after 7 s"),
            "{}",
            r.results[0].1
        );
    }
}
