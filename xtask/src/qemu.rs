//! The one QEMU command line, and running it on the terminal or into a log with a timeout.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::check::Exit;
use crate::image::Bootable;
use crate::scenario::Scenario;

/// QEMU's exit status when the root task powers off after every task exited with 0.
pub const STATUS_ALL_EXITED: i32 = 33;
/// QEMU's exit status when the root task powers off after a task failed.
pub const STATUS_TASK_FAILED: i32 = 35;
/// QEMU's exit status after a kernel panic.
pub const STATUS_KERNEL_PANIC: i32 = 37;

/// `qemu-system-x86_64` for `scenario` booting `bootable`, then `extra` arguments. TCG, the
/// serial console (multiplexed with the monitor) on stdio, no reboot; our kernel exits
/// through `isa-debug-exit`.
pub fn command(scenario: &Scenario, bootable: &Bootable, extra: &[String]) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-cpu", "max", "-m", &scenario.memory]);
    cmd.args(["-display", "none", "-serial", "mon:stdio", "-no-reboot"]);
    match bootable {
        Bootable::Iso(iso) => {
            cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-cdrom"]);
            cmd.arg(iso);
        }
        Bootable::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            cmd.arg("-kernel").arg(kernel);
            if let Some(initrd) = initrd {
                cmd.arg("-initrd").arg(initrd);
            }
            cmd.args(["-append", cmdline]);
        }
    }
    cmd.args(&scenario.qemu).args(extra);
    cmd
}

/// Runs `cmd` with no input and its output in `log`; kills it after `timeout`.
pub fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<Exit, String> {
    let file =
        fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status.code().map_or(Exit::Signal, Exit::Status));
        }
        if Instant::now() >= deadline {
            // Already exited if this fails; either way it is over.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Exit::TimedOut);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// What an exit status of our kernel's boot means.
pub fn meaning(status: Option<i32>) -> String {
    match status {
        Some(STATUS_ALL_EXITED) => "system powered off normally (all tasks exited with 0)".into(),
        Some(STATUS_TASK_FAILED) => {
            "system powered off after a task failed (see the log above)".into()
        }
        Some(STATUS_KERNEL_PANIC) => "kernel panic (see the log above)".into(),
        Some(s) => format!("QEMU exited with status {s}"),
        None => "QEMU was killed by a signal".into(),
    }
}
