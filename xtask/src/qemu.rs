//! The one QEMU command line, and running it on the terminal or into a log with a timeout.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::check::Exit;
use crate::image::Bootable;
use crate::scenario::{Scenario, Step};

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
        Bootable::Direct {
            kernel,
            modules,
            cmdline,
        } => {
            cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"]);
            cmd.arg(kernel);
            let list: Vec<String> = modules
                .iter()
                .map(|(file, args)| format!("{} {args}", file.display()).trim_end().to_string())
                .collect();
            cmd.arg("-initrd").arg(list.join(","));
            cmd.arg("-append").arg(cmdline);
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

/// Runs `cmd` with its output in `log` and a dialog on its console: for each step, waits until
/// the output since the previous step matches `expect`, then types `send`. Kills QEMU after
/// `timeout`. Returns how QEMU ended and how many steps matched.
pub fn run_dialog(
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
    steps: &[Step],
) -> Result<(Exit, usize), String> {
    let mut file =
        fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let output = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut readers = Vec::new();
    for mut pipe in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let output = Arc::clone(&output);
        readers.push(thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .expect("output")
                    .extend_from_slice(&buffer[..n]);
            }
        }));
    }
    let mut stdin = child.stdin.take().expect("piped");
    let deadline = Instant::now() + timeout;
    let (mut done, mut cursor) = (0, 0);
    let exit = loop {
        if done < steps.len() {
            let text = String::from_utf8_lossy(&output.lock().expect("output")).into_owned();
            if let Some(m) = steps[done].expect.find(&text[cursor.min(text.len())..]) {
                cursor += m.end();
                // QEMU reads the serial input as it comes; a pause per line lets the guest
                // keep up with its 16-byte FIFO.
                for line in steps[done].send.split_inclusive('\n') {
                    let _ = stdin.write_all(line.as_bytes());
                    let _ = stdin.flush();
                    thread::sleep(Duration::from_millis(100));
                }
                if let Some(url) = &steps[done].fetch {
                    let line = format!("\n[host] {}\n", http_get(url));
                    output
                        .lock()
                        .expect("output")
                        .extend_from_slice(line.as_bytes());
                }
                done += 1;
                continue;
            }
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status.code().map_or(Exit::Signal, Exit::Status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break Exit::TimedOut;
        }
        thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    for reader in readers {
        let _ = reader.join();
    }
    file.write_all(&output.lock().expect("output"))
        .map_err(|e| format!("cannot write {}: {e}", log.display()))?;
    Ok((exit, done))
}

/// `GET URL` (`http://127.0.0.1:PORT/PATH`) from the host, retried for up to 20 s while the
/// connection is refused or reset; a line saying what came back.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let Some((address, path)) = url.strip_prefix("http://").map(|rest| {
        rest.split_once('/')
            .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")))
    }) else {
        return format!("GET {url} failed: not an http:// URL");
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<Vec<u8>> {
            let mut stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                stream,
                "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
            )?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(response) if !response.is_empty() => {
                let text = String::from_utf8_lossy(&response);
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                let status = head.lines().next().unwrap_or("");
                let first = body.lines().next().unwrap_or("");
                return format!(
                    "GET {url}: {status}, {} bytes, first line: {first}",
                    body.len()
                );
            }
            Ok(_) => last = "empty response".into(),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(500));
    }
    format!("GET {url} failed: {last}")
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
