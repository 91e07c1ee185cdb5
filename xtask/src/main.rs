//! The scenario runner (`cargo xtask`): reads `scenarios.toml`, builds what a scenario boots,
//! boots it in QEMU on the terminal, or boots scenarios with their checks and counts the
//! results. Behind `scripts/{build,run,test,bench,linux-native}.sh`.

mod check;
mod compartments;
mod image;
mod qemu;
mod scenario;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use compartments::CompartmentFile;
use image::{Bootable, Sink};
use scenario::{Boot, Scenario, Scenarios};

/// The scenario file, relative to the repository.
const SCENARIO_FILE: &str = "scenarios.toml";

const USAGE: &str = "\
usage: cargo xtask COMMAND
  list                                   the scenarios, their groups and descriptions
  build [SCENARIO...]                    build the kernel, the tasks and the scenarios' ISOs
                                         (default: every scenario whose inputs exist)
  run SCENARIO [OPTION...] [QEMU ARG...] build it and boot it with the serial console here;
                                         for a Linux compartment scenario: --kernel BZIMAGE,
                                         --initrd FILE, --append \"CMDLINE\", --mem SIZE;
                                         for a Multiboot one: --kernel ELF, --append, --mem
  run FILE.toml [QEMU ARG...]            boot the compartments of a compartment file (e.g.
                                         scenarios/default.toml; format: xtask/src/
                                         compartments.rs), no checks
  test [--group G] [--logs DIR] [SCENARIO...]
                                         boot each scenario with its checks (default: group
                                         `test`, logs in target/test-logs) and end with
                                         `scenarios: N passed, M failed`
  bench                                  test --group bench --logs target/bench";

fn main() -> ExitCode {
    // Paths in the scenario file and below are relative to the repository; a compartment file
    // named on the command line, to where the command was given.
    let invoked_in = std::env::current_dir().unwrap_or_default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Err(e) = std::env::set_current_dir(&root) {
        eprintln!("xtask: cannot enter {}: {e}", root.display());
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match fs::read_to_string(SCENARIO_FILE) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("xtask: cannot read {SCENARIO_FILE}: {e}");
            return ExitCode::from(2);
        }
    };
    let scenarios = match Scenarios::parse(SCENARIO_FILE, &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("list") => list(&scenarios),
        Some("build") => build(&scenarios, &args[1..]),
        Some("run") => run(&scenarios, &args[1..], &invoked_in),
        Some("test") => test(&scenarios, &args[1..]),
        Some("bench") => test(
            &scenarios,
            &[
                "--group".into(),
                "bench".into(),
                "--logs".into(),
                "target/bench".into(),
            ],
        ),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::from(2)
        }
    }
}

/// The scenarios called `names`.
fn by_name<'a>(scenarios: &'a Scenarios, names: &[String]) -> Result<Vec<&'a Scenario>, String> {
    names
        .iter()
        .map(|n| {
            scenarios.get(n).ok_or_else(|| {
                let known: Vec<&str> = scenarios.list.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "no scenario `{n}` in {SCENARIO_FILE} (known: {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

fn list(scenarios: &Scenarios) -> Result<ExitCode, String> {
    let width = scenarios
        .list
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for s in &scenarios.list {
        let groups = if s.groups.is_empty() {
            String::new()
        } else {
            format!(" [{}]", s.groups.join(", "))
        };
        println!("{:width$}  {}{groups}", s.name, s.description);
    }
    Ok(ExitCode::SUCCESS)
}

fn build(scenarios: &Scenarios, names: &[String]) -> Result<ExitCode, String> {
    let selected = if names.is_empty() {
        let mut all = Vec::new();
        for s in &scenarios.list {
            if !matches!(s.boot, Boot::Multiboot { .. } | Boot::Compartments { .. }) {
                continue;
            }
            match image::missing_inputs(scenarios, s) {
                Some(problem) => eprintln!("build: skipping {}: {problem}", s.name),
                None => all.push(s),
            }
        }
        all
    } else {
        by_name(scenarios, names)?
    };
    image::build(scenarios, &selected, &mut Sink::Stderr)?;
    Ok(ExitCode::SUCCESS)
}

/// An ad-hoc scenario, named after the file, that boots compartment file `arg` (relative to
/// `invoked_in`).
fn compartment_scenario(arg: &str, invoked_in: &Path) -> Result<Scenario, String> {
    let file = invoked_in.join(arg);
    if !file.is_file() {
        return Err(format!("{arg}: no such compartment file"));
    }
    // Its name names its staging directory: lower-case letters, digits and `-`.
    let name: String = file
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    // (A file called `.toml` would stage into target/direct itself.)
    let name = if name.is_empty() {
        "compartments".to_string()
    } else {
        name
    };
    let parsed = CompartmentFile::read(arg, &file, Path::new(".")).map_err(|e| e.0)?;
    let qemu = parsed.qemu_args();
    Ok(Scenario {
        name,
        description: format!("the compartments of {arg}"),
        groups: Vec::new(),
        memory: parsed.machine_memory_text(),
        boot: Boot::Compartments {
            cmdline: String::new(),
            file: Box::new(parsed),
        },
        made_by: Some("scripts/build-linux.sh".into()),
        qemu,
        grub: false,
        check: None,
    })
}

fn run(scenarios: &Scenarios, args: &[String], invoked_in: &Path) -> Result<ExitCode, String> {
    let Some(name) = args.first() else {
        return Err(USAGE.to_string());
    };
    let mut overrides = scenario::LinuxOverrides::default();
    let mut rest = args[1..].iter();
    let mut qemu_args = Vec::new();
    while let Some(a) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--kernel" => overrides.kernel = Some(value()?.into()),
            "--initrd" => overrides.initrd = Some(value()?.into()),
            "--append" => overrides.append = Some(value()?),
            "--mem" => overrides.mem = Some(value()?),
            _ => qemu_args.push(a.clone()),
        }
    }
    let from_file;
    let named = if name.ends_with(".toml") {
        from_file = compartment_scenario(name, invoked_in)?;
        &from_file
    } else {
        by_name(scenarios, std::slice::from_ref(name))?[0]
    };
    let replaced;
    let scenario = if overrides.is_empty() {
        named
    } else {
        replaced = overrides.apply(named)?;
        &replaced
    };
    let bootable = image::build(scenarios, &[scenario], &mut Sink::Stderr)?.remove(0);
    for (name, port, path) in qemu::serial_sockets(scenario) {
        println!(
            "run: {name}'s console is also on COM{port}: attach with scripts/attach.sh {} (Ctrl-] leaves)",
            path.display()
        );
    }
    let status = qemu::command(scenario, &bootable, &qemu_args)
        .status()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    println!();
    let ok = match bootable {
        Bootable::Iso(_) | Bootable::Direct { .. } => {
            println!("run: {}", qemu::meaning(status.code()));
            status.code() == Some(qemu::STATUS_ALL_EXITED)
        }
        Bootable::Linux { .. } => {
            println!("run: QEMU exited ({status})");
            status.success()
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn test(scenarios: &Scenarios, args: &[String]) -> Result<ExitCode, String> {
    let mut group = "test".to_string();
    let mut logs = PathBuf::from("target/test-logs");
    let mut names = Vec::new();
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--group" => group = args.next().ok_or(USAGE)?.clone(),
            "--logs" => logs = args.next().ok_or(USAGE)?.into(),
            _ if a.starts_with('-') => return Err(USAGE.to_string()),
            _ => names.push(a.clone()),
        }
    }
    let selected = if names.is_empty() {
        let in_group: Vec<&Scenario> = scenarios
            .list
            .iter()
            .filter(|s| s.groups.contains(&group))
            .collect();
        if in_group.is_empty() {
            return Err(format!("no scenario in group `{group}`"));
        }
        in_group
    } else {
        by_name(scenarios, &names)?
    };
    if let Some(s) = selected.iter().find(|s| s.check.is_none()) {
        return Err(format!(
            "scenario `{}` has no [scenario.{}.check]",
            s.name, s.name
        ));
    }
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;

    let build_log = logs.join("build.log");
    let file = fs::File::create(&build_log).map_err(|e| e.to_string())?;
    let bootables = match image::build(scenarios, &selected, &mut Sink::File(file)) {
        Ok(b) => b,
        Err(e) => {
            print!("{}", fs::read_to_string(&build_log).unwrap_or_default());
            println!(
                "not ok - build of kernel, tasks and ISOs ({e}; see {})",
                build_log.display()
            );
            println!("scenarios: 0 passed, 1 failed");
            return Ok(ExitCode::FAILURE);
        }
    };

    let (mut passed, mut failed) = (0, 0);
    for (scenario, bootable) in selected.iter().zip(&bootables) {
        let check = scenario.check.as_ref().expect("checked above");
        let log = logs.join(format!("{}.log", scenario.name));
        let command = qemu::command(scenario, bootable, &[]);
        let started = std::time::Instant::now();
        let (exit, steps) = if check.console.is_empty() {
            (qemu::run_logged(command, &log, check.timeout)?, 0)
        } else {
            qemu::run_dialog(
                command,
                &log,
                check.timeout,
                &check.console,
                &qemu::serial_sockets(scenario),
            )?
        };
        // The wall-clock time of the QEMU run, for benchmarks (NAME.seconds beside the log).
        let _ = fs::write(
            logs.join(format!("{}.seconds", scenario.name)),
            format!("{:.3}\n", started.elapsed().as_secs_f64()),
        );
        let bytes = fs::read(&log).map_err(|e| format!("cannot read {}: {e}", log.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let mut report = check::judge(check, &text, exit, &log.display().to_string());
        if !check.console.is_empty() {
            report.results.push(check::dialog_result(
                check,
                steps,
                &log.display().to_string(),
            ));
        }
        for line in &report.shown {
            println!("{line}");
        }
        if let Some(summary) = &report.summary {
            println!("{summary}");
        }
        for (ok, line) in &report.results {
            println!("{}ok - {line}", if *ok { "" } else { "not " });
        }
        passed += report.passed();
        failed += report.failed();
    }
    println!("scenarios: {passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
