//! Building what a scenario boots: the kernel and the tasks (`cargo build`), the special
//! modules, the GRUB configuration and the ISO (`grub-mkrescue`), reused while nothing in it
//! changed.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::Hasher;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::scenario::{Boot, Generator, Module, Scenario, Scenarios, Source};

/// Where build output goes: the terminal (stderr) or a log file.
pub enum Sink {
    /// Standard error.
    Stderr,
    /// A log file.
    File(fs::File),
}

impl Sink {
    /// A handle for a child's stdout or stderr.
    fn stdio(&self) -> io::Result<Stdio> {
        Ok(match self {
            Sink::Stderr => Stdio::from(io::stderr()),
            Sink::File(f) => Stdio::from(f.try_clone()?),
        })
    }

    /// Writes one line.
    pub fn line(&mut self, text: &str) {
        // Build output is informational; a failed write must not stop the build.
        let _ = match self {
            Sink::Stderr => writeln!(io::stderr(), "{text}"),
            Sink::File(f) => writeln!(f, "{text}"),
        };
    }
}

/// What QEMU boots for one scenario.
pub enum Bootable {
    /// A GRUB ISO.
    Iso(PathBuf),
    /// Our kernel as a flat Multiboot 1 image for QEMU's `-kernel`, with its modules (file
    /// and arguments, for `-initrd`) and command line.
    Direct {
        /// The flat kernel image.
        kernel: PathBuf,
        /// Each module's file and arguments, sigma0 and the root task first.
        modules: Vec<(PathBuf, String)>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A Linux kernel, initramfs and command line.
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// The initramfs, if any.
        initrd: Option<PathBuf>,
        /// The command line (`-append`).
        cmdline: String,
    },
}

/// The built binary of package `name`.
pub fn binary(scenarios: &Scenarios, name: &str) -> PathBuf {
    Path::new("target")
        .join(scenarios.build.target_of(name))
        .join("release")
        .join(name)
}

/// Inputs of `scenario` made elsewhere that are missing, with what makes them.
pub fn missing_inputs(scenarios: &Scenarios, scenario: &Scenario) -> Option<String> {
    let owner = scenarios.image_of(scenario);
    let files: Vec<&Path> = match &owner.boot {
        Boot::Multiboot { modules, .. } => modules
            .iter()
            .filter_map(|m| match &m.source {
                Source::File(f) => Some(f.as_path()),
                _ => None,
            })
            .collect(),
        Boot::Linux { kernel, initrd, .. } => std::iter::once(kernel.as_path())
            .chain(initrd.as_deref())
            .collect(),
        // Its files are checked when its modules are made, each named with its field.
        Boot::Compartments { file, .. } => return file.modules().err().map(|e| e.0),
        Boot::Image(_) => unreachable!("image_of resolves it"),
    };
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !f.is_file())
        .map(|f| f.display().to_string())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let hint = match &owner.made_by {
        Some(cmd) => format!("; run {cmd} first"),
        None => String::new(),
    };
    Some(format!("{} missing{hint}", missing.join(" and ")))
}

/// Builds what `selected` boot, writing progress to `sink`; returns one bootable per scenario.
pub fn build(
    scenarios: &Scenarios,
    selected: &[&Scenario],
    sink: &mut Sink,
) -> Result<Vec<Bootable>, String> {
    for s in selected {
        if let Some(problem) = missing_inputs(scenarios, s) {
            return Err(format!("scenario {}: {problem}", s.name));
        }
    }
    let owners: Vec<&Scenario> = selected.iter().map(|s| scenarios.image_of(s)).collect();
    if owners
        .iter()
        .any(|o| matches!(o.boot, Boot::Multiboot { .. } | Boot::Compartments { .. }))
    {
        cargo_build(scenarios, sink)?;
    }
    let mut built: Vec<(String, PathBuf)> = Vec::new();
    let mut result = Vec::new();
    for owner in owners {
        let made;
        let boot = match &owner.boot {
            Boot::Compartments { cmdline, file } => {
                made = file
                    .boot(cmdline)
                    .map_err(|e| format!("scenario {}: {e}", owner.name))?;
                &made
            }
            boot => boot,
        };
        result.push(match boot {
            Boot::Multiboot {
                cmdline,
                sigma0,
                modules,
            } => {
                if owner.grub {
                    let iso = match built.iter().find(|b| b.0 == owner.name) {
                        Some(b) => b.1.clone(),
                        None => {
                            let iso = make_iso(scenarios, owner, cmdline, sigma0, modules, sink)
                                .map_err(|e| format!("scenario {}: {e}", owner.name))?;
                            built.push((owner.name.clone(), iso.clone()));
                            iso
                        }
                    };
                    Bootable::Iso(iso)
                } else {
                    make_direct(scenarios, owner, cmdline, sigma0, modules)
                        .map_err(|e| format!("scenario {}: {e}", owner.name))?
                }
            }
            Boot::Linux {
                kernel,
                initrd,
                cmdline,
            } => Bootable::Linux {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
            Boot::Image(_) => unreachable!("image_of resolves it"),
            Boot::Compartments { .. } => unreachable!("made above"),
        });
    }
    Ok(result)
}

/// `cargo [--config C] build --release --target T -p ...` for each part of `[build]`.
fn cargo_build(scenarios: &Scenarios, sink: &mut Sink) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (target, config, packages) in scenarios.build.invocations() {
        let mut cmd = Command::new(&cargo);
        if let Some(config) = config {
            cmd.args(["--config", config]);
        }
        cmd.args(["build", "--release", "--target", target]);
        for p in packages {
            cmd.args(["-p", p]);
        }
        let status = cmd
            .stdin(Stdio::null())
            .stdout(sink.stdio().map_err(|e| e.to_string())?)
            .stderr(sink.stdio().map_err(|e| e.to_string())?)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build for {target} failed ({status})"));
        }
    }
    Ok(())
}

/// The content of a module.
fn content(scenarios: &Scenarios, module: &Module) -> Result<Vec<u8>, String> {
    let read =
        |path: &Path| fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    match &module.source {
        Source::Binary(b) => {
            let path = binary(scenarios, b);
            if !path.is_file() {
                return Err(format!(
                    "no binary {} (is its package in [build] packages?)",
                    path.display()
                ));
            }
            read(&path)
        }
        Source::File(f) => read(f),
        Source::Text(t) => Ok(t.clone().into_bytes()),
        Source::Generate(Generator::BadElf) => {
            // ELF magic, 32-bit, little endian, version 1; e_type EXEC, e_machine ARM; then
            // garbage.
            let mut bytes = b"\x7fELF\x01\x01\x01\x00".to_vec();
            bytes.extend([0; 8]);
            bytes.extend([0x02, 0x00, 0x28, 0x00]);
            bytes.extend([0; 200]);
            Ok(bytes)
        }
        Source::Generate(Generator::TruncatedSigma0) => {
            let mut bytes = read(&binary(scenarios, "sigma0"))?;
            bytes.truncate(100);
            Ok(bytes)
        }
    }
}

/// Arguments `$MODULE_ARGS` adds to module `m` (direct loader): `TASK: ARG...`, for the
/// modules whose first argument (the task's name) is TASK; later arguments of the same name
/// win in the tasks that read them (e.g. `MODULE_ARGS="fuzz: seed=7 seeds=1"`).
fn extra_args(m: &Module, value: &str) -> Vec<String> {
    match value.split_once(':') {
        Some((task, args)) if m.args.first().map(String::as_str) == Some(task.trim()) => {
            args.split_whitespace().map(String::from).collect()
        }
        _ => Vec::new(),
    }
}

/// The kernel command line: `$KERNEL_CMDLINE`, then the scenario's.
fn kernel_cmdline(scenario_cmdline: &str) -> String {
    let env = std::env::var("KERNEL_CMDLINE").unwrap_or_default();
    [env.trim(), scenario_cmdline.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The GRUB configuration of one ISO.
fn grub_cfg(name: &str, cmdline: &str, sigma0: &Module, modules: &[Module]) -> String {
    let line = |m: &Module| format!("    module2 /boot/{} {}\n", m.name, m.args.join(" "));
    let mut cfg = format!("set timeout=0\nset default=0\nmenuentry \"L4 ({name})\" {{\n");
    cfg.push_str(format!("    multiboot2 /boot/kernel {cmdline}").trim_end());
    cfg.push('\n');
    cfg.push_str(&line(sigma0));
    cfg.push_str("    module2 /boot/roottask root\n");
    for m in modules {
        cfg.push_str(&line(m));
    }
    cfg.push_str("    boot\n}\n");
    cfg
}

/// Stages `target/direct/NAME/`: the flat kernel image and the modules' files, for QEMU's
/// Multiboot 1 loader (`-kernel`, `-initrd`), which boots without a BIOS disk or GRUB.
fn make_direct(
    scenarios: &Scenarios,
    scenario: &Scenario,
    cmdline: &str,
    sigma0: &Module,
    modules: &[Module],
) -> Result<Bootable, String> {
    let io = |e: io::Error| e.to_string();
    let dir = Path::new("target/direct").join(&scenario.name);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io)?;
    }
    fs::create_dir_all(&dir).map_err(io)?;
    let path = binary(scenarios, "kernel");
    let elf = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let kernel = dir.join("kernel.bin");
    fs::write(&kernel, flat_image(&elf)?).map_err(io)?;
    let roottask = dir.join("roottask");
    let from = binary(scenarios, "roottask");
    fs::copy(&from, &roottask).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    let mut files = Vec::new();
    for m in std::iter::once(sigma0).chain(modules) {
        if m.name.contains(',') || m.args.iter().any(|a| a.contains(',')) {
            return Err(format!(
                "module {}: QEMU's -initrd cannot pass a comma in a module's name or arguments",
                m.name
            ));
        }
        let path = dir.join(&m.name);
        fs::write(&path, content(scenarios, m)?).map_err(io)?;
        let mut args = m.args.clone();
        args.extend(extra_args(
            m,
            &std::env::var("MODULE_ARGS").unwrap_or_default(),
        ));
        files.push((path, args.join(" ")));
        if files.len() == 1 {
            files.push((roottask.clone(), "root".into()));
        }
    }
    Ok(Bootable::Direct {
        kernel,
        modules: files,
        cmdline: kernel_cmdline(cmdline),
    })
}

/// The flat image of the kernel ELF from its lowest physical load address: each PT_LOAD
/// segment's file bytes at its physical address, zeroes between, padded to a page (the
/// Multiboot 1 header's load end is page-aligned).
fn flat_image(elf: &[u8]) -> Result<Vec<u8>, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let bad = || "the kernel is not a 64-bit little-endian ELF".to_string();
    if elf.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(bad());
    }
    let (phoff, phentsize, phnum) = (
        u64_at(0x20).ok_or_else(bad)? as usize,
        u16_at(0x36).ok_or_else(bad)? as usize,
        u16_at(0x38).ok_or_else(bad)? as usize,
    );
    let mut segments = Vec::new();
    for i in 0..phnum {
        let h = phoff + i * phentsize;
        let kind = elf.get(h..h + 4).ok_or_else(bad)?;
        let (offset, paddr, filesz) = (
            u64_at(h + 8).ok_or_else(bad)? as usize,
            u64_at(h + 0x18).ok_or_else(bad)?,
            u64_at(h + 0x20).ok_or_else(bad)? as usize,
        );
        if kind == [1, 0, 0, 0] && filesz > 0 {
            let bytes = elf.get(offset..offset + filesz).ok_or_else(bad)?;
            segments.push((paddr, bytes));
        }
    }
    let base = segments.iter().map(|s| s.0).min().ok_or_else(bad)?;
    let end = segments
        .iter()
        .map(|s| s.0 + s.1.len() as u64)
        .max()
        .ok_or_else(bad)?;
    let mut image = vec![0u8; ((end - base) as usize).next_multiple_of(4096)];
    for (paddr, bytes) in segments {
        let at = (paddr - base) as usize;
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }
    Ok(image)
}

/// Stages `target/iso/NAME/` and makes `target/iso/NAME.iso` unless an identical one exists.
fn make_iso(
    scenarios: &Scenarios,
    scenario: &Scenario,
    cmdline: &str,
    sigma0: &Module,
    modules: &[Module],
    sink: &mut Sink,
) -> Result<PathBuf, String> {
    let io = |e: io::Error| e.to_string();
    let dir = Path::new("target/iso").join(&scenario.name);
    let boot = dir.join("boot");
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io)?;
    }
    fs::create_dir_all(boot.join("grub")).map_err(io)?;
    for file in ["kernel", "roottask"] {
        let from = binary(scenarios, file);
        fs::copy(&from, boot.join(file))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    for m in std::iter::once(sigma0).chain(modules) {
        fs::write(boot.join(&m.name), content(scenarios, m)?).map_err(io)?;
    }
    let cfg = grub_cfg(&scenario.name, &kernel_cmdline(cmdline), sigma0, modules);
    fs::write(boot.join("grub/grub.cfg"), cfg).map_err(io)?;

    let iso = Path::new("target/iso").join(format!("{}.iso", scenario.name));
    let stamp_path = iso.with_extension("iso.stamp");
    let stamp = format!("{:016x}", tree_hash(&dir).map_err(io)?);
    if iso.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == stamp) {
        return Ok(iso);
    }
    let quiet = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    if !quiet.success() {
        // Again, with its output, to show why.
        let _ = Command::new("grub-mkrescue")
            .arg("-o")
            .arg(&iso)
            .arg(&dir)
            .stdout(sink.stdio().map_err(io)?)
            .stderr(sink.stdio().map_err(io)?)
            .status();
        return Err("grub-mkrescue failed".into());
    }
    fs::write(&stamp_path, format!("{stamp}\n")).map_err(io)?;
    sink.line(&format!("built {}", iso.display()));
    Ok(iso)
}

/// A hash of every file's relative path and content under `dir` (the ISO's cache key).
fn tree_hash(dir: &Path) -> io::Result<u64> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(d)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hasher = DefaultHasher::new();
    for f in files {
        hasher.write(
            f.strip_prefix(dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .as_bytes(),
        );
        hasher.write(&fs::read(&f)?);
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_joins_the_argument_lists() {
        let m = |name: &str, args: &[&str]| Module {
            name: name.into(),
            source: Source::Binary(name.into()),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let cfg = grub_cfg(
            "demo",
            "",
            &m("sigma0", &["sigma0"]),
            &[m("demo", &["pong"]), m("demo", &["ping", "peer=pong"])],
        );
        assert_eq!(
            cfg,
            "set timeout=0\nset default=0\nmenuentry \"L4 (demo)\" {\n\
             \x20   multiboot2 /boot/kernel\n\
             \x20   module2 /boot/sigma0 sigma0\n\
             \x20   module2 /boot/roottask root\n\
             \x20   module2 /boot/demo pong\n\
             \x20   module2 /boot/demo ping peer=pong\n\
             \x20   boot\n}\n"
        );
    }
}
