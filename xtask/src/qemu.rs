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
use crate::scenario::{Boot, Scenario, Step};

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
    // The compartments' own serial ports are sockets QEMU creates: their directory must
    // exist, and a socket left by an earlier run must go.
    for (_, _, path) in serial_sockets(scenario) {
        if let Some(dir) = path.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = fs::remove_file(&path);
    }
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

/// The compartments of `scenario` with a serial port of their own: name, COM number, socket.
pub fn serial_sockets(scenario: &Scenario) -> Vec<(String, u8, std::path::PathBuf)> {
    match &scenario.boot {
        Boot::Compartments { file, .. } => file.serial_sockets(),
        _ => Vec::new(),
    }
}

/// A compartment's serial port, connected: what it prints is collected in `lines` as lines
/// `[serial NAME] ...` (the dialog moves them into the output, [`merge_serial`]); returns the
/// socket to type on.
fn attach_serial(
    name: &str,
    path: &Path,
    output: &Arc<Mutex<Vec<u8>>>,
) -> Result<std::os::unix::net::UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot attach to {}: {e}", path.display()))
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let output = Arc::clone(output);
    let tag = format!("[serial {name}] ");
    thread::spawn(move || {
        let (mut buffer, mut line) = ([0u8; 4096], Vec::new());
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            for &b in &buffer[..n] {
                if b == b'\n' {
                    let mut out = output.lock().expect("output");
                    out.extend_from_slice(tag.as_bytes());
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                    line.clear();
                } else if b != b'\r' {
                    line.push(b);
                }
            }
        }
    });
    Ok(stream)
}

/// Move the serial ports' complete lines (`serial`) into the console output, between its
/// lines: after its last newline, but not before `cursor` (what the dialog has matched so
/// far), so that no line of COM1 is cut in a part not yet matched.
fn merge_serial(output: &Mutex<Vec<u8>>, serial: &Mutex<Vec<u8>>, cursor: usize) {
    let mut lines = serial.lock().expect("serial");
    if lines.is_empty() {
        return;
    }
    let mut out = output.lock().expect("output");
    let after_line = out.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let at = after_line.max(cursor).min(out.len());
    let mut block = Vec::with_capacity(lines.len() + 1);
    if at > 0 && out[at - 1] != b'\n' {
        block.push(b'\n');
    }
    block.append(&mut lines);
    out.splice(at..at, block);
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
    sockets: &[(String, u8, std::path::PathBuf)],
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
    let mut attached: Vec<(String, std::os::unix::net::UnixStream)> = Vec::new();
    let serial = Arc::new(Mutex::new(Vec::<u8>::new()));
    let deadline = Instant::now() + timeout;
    let (mut done, mut cursor) = (0, 0);
    let exit = loop {
        merge_serial(&output, &serial, cursor);
        if done < steps.len() {
            let text = String::from_utf8_lossy(&output.lock().expect("output")).into_owned();
            if let Some(m) = steps[done].expect.find(&text[cursor.min(text.len())..]) {
                cursor += m.end();
                // QEMU reads the serial input as it comes; a pause per line lets the guest
                // keep up with its 16-byte FIFO.
                let mut terminal: &mut dyn Write = &mut stdin;
                if let Some(name) = &steps[done].serial {
                    if !attached.iter().any(|(n, _)| n == name) {
                        let Some((_, _, path)) = sockets.iter().find(|(n, _, _)| n == name) else {
                            return Err(format!(
                                "the dialog types on {name}'s serial port, which it does not have"
                            ));
                        };
                        attached.push((name.clone(), attach_serial(name, path, &serial)?));
                    }
                    let (_, socket) = attached
                        .iter_mut()
                        .find(|(n, _)| n == name)
                        .expect("attached above");
                    terminal = socket;
                }
                for line in steps[done].send.split_inclusive('\n') {
                    let _ = terminal.write_all(line.as_bytes());
                    let _ = terminal.flush();
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
    drop(attached);
    thread::sleep(Duration::from_millis(100));
    merge_serial(&output, &serial, usize::MAX);
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
