//! The scenario file (`scenarios.toml`): its format as written, and the checked form the
//! runner uses. Every problem is reported with the file, the scenario (and its line) and the
//! field; syntax and type errors come from `toml` with their line and column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use regex::Regex;
use serde::Deserialize;

use crate::compartments::CompartmentFile;

/// An error in the scenario file, with the text to show.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The whole file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    build: Build,
    scenario: IndexMap<String, RawScenario>,
}

/// `[build]`: what `cargo build` makes for the modules to name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// The target triple of the kernel (and of any package not in `tasks`).
    pub target: String,
    /// The packages built for it; their binaries are what `binary = "..."` names.
    pub packages: Vec<String>,
    /// `[build.tasks]`: the user tasks, built separately (another target and configuration).
    #[serde(default)]
    pub tasks: Option<TaskBuild>,
    /// `[build.guest32]`: the 32-bit guests (Multiboot kernels), built for a 32-bit target.
    #[serde(default)]
    pub guest32: Option<TaskBuild>,
}

/// `[build.tasks]`: packages built for their own target with an extra cargo configuration
/// file (the user tasks, which may use SSE while the kernel stays soft-float).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBuild {
    /// Their target triple.
    pub target: String,
    /// A cargo configuration file passed with `--config`.
    #[serde(default)]
    pub config: Option<String>,
    /// The packages.
    pub packages: Vec<String>,
}

impl Build {
    /// Each cargo invocation: (target, configuration file, packages).
    pub fn invocations(&self) -> Vec<(&str, Option<&str>, &[String])> {
        let mut out = vec![(self.target.as_str(), None, self.packages.as_slice())];
        for t in self.tasks.iter().chain(&self.guest32) {
            out.push((
                t.target.as_str(),
                t.config.as_deref(),
                t.packages.as_slice(),
            ));
        }
        out
    }

    /// The target a package's binary is built for.
    pub fn target_of(&self, package: &str) -> &str {
        self.tasks
            .iter()
            .chain(&self.guest32)
            .find(|t| t.packages.iter().any(|p| p == package))
            .map_or(&self.target, |t| &t.target)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    description: String,
    #[serde(default)]
    groups: Vec<String>,
    modules: Option<Vec<RawModule>>,
    linux: Option<RawLinux>,
    image: Option<String>,
    compartments: Option<String>,
    sigma0: Option<RawModule>,
    cmdline: Option<String>,
    made_by: Option<String>,
    memory: Option<String>,
    #[serde(default)]
    qemu: Vec<String>,
    loader: Option<String>,
    check: Option<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModule {
    binary: Option<String>,
    file: Option<String>,
    generate: Option<Generator>,
    text: Option<String>,
    name: Option<String>,
    args: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinux {
    kernel: String,
    initrd: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    timeout: u64,
    status: Option<i32>,
    #[serde(default)]
    require: Vec<String>,
    #[serde(default)]
    forbid: Vec<String>,
    #[serde(default)]
    show: Vec<String>,
    tap: Option<Tap>,
    #[serde(default)]
    console: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    expect: String,
    #[serde(default)]
    send: String,
    fetch: Option<String>,
    serial: Option<String>,
}

/// One step of a console dialog: wait until the output since the previous step matches
/// `expect`, then type `send`.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the output must show (across lines: prompts end without a newline).
    pub expect: Regex,
    /// What to type then (may be empty).
    pub send: String,
    /// Then fetch this `http://127.0.0.1:PORT/PATH` from the host (through QEMU's port
    /// forwards); the runner adds a line `[host] GET URL: N bytes, first line: ...` (or
    /// `[host] GET URL failed: ...`) to the output, for the next step to expect.
    pub fetch: Option<String>,
    /// Type `send` on this compartment's own serial port (`serial = "comN"` in its file,
    /// a Unix socket on the host) instead of COM1; from then on the runner adds what comes
    /// out of that port to the output as lines `[serial NAME] ...`.
    pub serial: Option<String>,
}

/// The sigma0 module of a scenario that names none.
pub fn default_sigma0() -> Module {
    Module {
        name: "sigma0".into(),
        source: Source::Binary("sigma0".into()),
        args: vec!["sigma0".into()],
    }
}

/// A special module the runner makes itself.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// An ELF header claiming a 32-bit ARM executable, then 200 zero bytes.
    BadElf,
    /// The first 100 bytes of the real sigma0.
    TruncatedSigma0,
}

impl Generator {
    /// The file name the module gets when the scenario gives none.
    fn default_name(self) -> &'static str {
        match self {
            Generator::BadElf => "bad.elf",
            Generator::TruncatedSigma0 => "sigma0",
        }
    }
}

/// `[scenario.NAME.check.tap]`: the boot runs a TAP suite with a fixed plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tap {
    /// Prefix of the suite's summary line and plan check.
    pub label: String,
    /// The number of cases; exactly `ok`/`not ok` 1..=plan must appear, each once.
    pub plan: u32,
    /// The suite prints its own `1..N` line, which must equal `plan`.
    #[serde(default)]
    pub plan_line: bool,
    /// That line comes first, before any case (the suite knows its cases up front).
    #[serde(default)]
    pub plan_first: bool,
    /// The suite's lines start with this text (a compartment's `[NAME] `), which is removed
    /// before they are read as TAP; lines without it are not the suite's.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// All scenarios, checked, in file order.
#[derive(Debug)]
pub struct Scenarios {
    /// `[build]`.
    pub build: Build,
    /// The scenarios in the order of the file.
    pub list: Vec<Scenario>,
}

/// One scenario, checked.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name (`[scenario.NAME]`), also the name of its ISO and log.
    pub name: String,
    /// One line for `cargo xtask list`.
    pub description: String,
    /// The runs that include it (`test`, `bench`).
    pub groups: Vec<String>,
    /// What QEMU boots.
    pub boot: Boot,
    /// The command that makes its `file` inputs.
    pub made_by: Option<String>,
    /// QEMU `-m`.
    pub memory: String,
    /// Extra QEMU arguments.
    pub qemu: Vec<String>,
    /// How QEMU loads our kernel: `false` directly (`-kernel`, Multiboot 1), `true` from a GRUB
    /// ISO (multiboot2).
    pub grub: bool,
    /// What a test run requires.
    pub check: Option<Check>,
}

/// What QEMU boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Our kernel from a GRUB ISO: sigma0, the root task, then the modules.
    Multiboot {
        /// The kernel command line (before `$KERNEL_CMDLINE` is added).
        cmdline: String,
        /// The sigma0 module.
        sigma0: Module,
        /// The boot modules after sigma0 and the root task.
        modules: Vec<Module>,
    },
    /// A Linux bzImage that QEMU loads itself (`-kernel`, `-initrd`, `-append`).
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// The initramfs, if any.
        initrd: Option<PathBuf>,
        /// Linux's command line.
        cmdline: String,
    },
    /// The image of another scenario (which is a `Multiboot` or a `Linux` one).
    Image(String),
    /// Our kernel with the modules of a compartment file, made when the scenario is built
    /// ([`CompartmentFile::boot`]).
    Compartments {
        /// The kernel command line (before `$KERNEL_CMDLINE` is added).
        cmdline: String,
        /// The compartment file.
        file: Box<CompartmentFile>,
    },
}

/// One boot module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its file name in `/boot`.
    pub name: String,
    /// Where its content comes from.
    pub source: Source,
    /// Its command line, the task name first.
    pub args: Vec<String>,
}

/// Where a module's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A binary of a `[build]` package.
    Binary(String),
    /// A file made elsewhere (see `made_by`), relative to the repository.
    File(PathBuf),
    /// Made by the runner.
    Generate(Generator),
    /// This text.
    Text(String),
}

/// What a test run of a scenario requires.
#[derive(Debug, Clone)]
pub struct Check {
    /// The test's name in the results.
    pub name: String,
    /// When QEMU is killed.
    pub timeout: Duration,
    /// The QEMU exit status; `None`: any.
    pub status: Option<i32>,
    /// Each must match some line.
    pub require: Vec<Regex>,
    /// None may match any line.
    pub forbid: Vec<Regex>,
    /// Lines to copy into the progress output.
    pub show: Vec<Regex>,
    /// The TAP suite and its plan.
    pub tap: Option<Tap>,
    /// A dialog on the serial console, in order (empty: no input).
    pub console: Vec<Step>,
}

/// What `cargo xtask run` may replace in a Linux or Multiboot compartment scenario: the data
/// modules the VMM boots (named `linux` or `kernel`, `initrd`, `cmdline` by their first
/// argument) and its guest RAM.
#[derive(Debug, Default)]
pub struct LinuxOverrides {
    /// `--kernel FILE`: the bzImage (module `linux`) or the Multiboot kernel (module `kernel`).
    pub kernel: Option<PathBuf>,
    /// `--initrd FILE`: the initramfs.
    pub initrd: Option<PathBuf>,
    /// `--append TEXT`: Linux's command line.
    pub append: Option<String>,
    /// `--mem SIZE`: guest RAM (`mem=` of the VMM, whose `ram=` budget grows with it),
    /// e.g. `512M`.
    pub mem: Option<String>,
}

impl LinuxOverrides {
    /// Whether nothing is replaced.
    pub fn is_empty(&self) -> bool {
        self.kernel.is_none()
            && self.initrd.is_none()
            && self.append.is_none()
            && self.mem.is_none()
    }

    /// `scenario` with the overrides applied; an error if it is not a Linux compartment
    /// scenario, a file does not exist or the size is malformed.
    pub fn apply(&self, scenario: &Scenario) -> Result<Scenario, String> {
        let mut s = scenario.clone();
        if let Boot::Compartments { file, .. } = &s.boot {
            return Err(format!(
                "scenario `{}` boots the compartment file {}: change the file instead",
                s.name,
                file.path()
            ));
        }
        let Boot::Multiboot { modules, .. } = &mut s.boot else {
            return Err(format!("scenario `{}` is not booted by our kernel", s.name));
        };
        let by_role = |modules: &mut Vec<Module>, role: &str| -> Result<usize, String> {
            modules
                .iter()
                .position(|m| m.args.first().map(String::as_str) == Some(role))
                .ok_or_else(|| {
                    format!(
                        "scenario `{}` has no `{role}` module for a Linux compartment",
                        scenario.name
                    )
                })
        };
        // `--kernel` replaces a Linux compartment's bzImage or a Multiboot compartment's kernel.
        let kernel_role =
            if by_role(modules, "linux").is_err() && by_role(modules, "kernel").is_ok() {
                "kernel"
            } else {
                "linux"
            };
        for (role, file) in [(kernel_role, &self.kernel), ("initrd", &self.initrd)] {
            if let Some(file) = file {
                if !file.is_file() {
                    return Err(format!(
                        "--{}: no such file: {}",
                        if role == "initrd" { "initrd" } else { "kernel" },
                        file.display()
                    ));
                }
                let i = by_role(modules, role)?;
                modules[i].source =
                    Source::File(std::fs::canonicalize(file).map_err(|e| e.to_string())?);
            }
        }
        if let Some(text) = &self.append {
            let i = by_role(modules, "cmdline")?;
            modules[i].source = Source::Text(text.clone());
        }
        if let Some(mem) = &self.mem {
            let bytes = parse_size(mem)
                .filter(|b| *b >= 16 << 20 && b.is_power_of_two())
                .ok_or_else(|| {
                    format!("--mem {mem}: give a power of two of at least 16M, e.g. 256M or 1G")
                })?;
            let vmm = modules
                .iter_mut()
                .find(|m| {
                    m.args.iter().any(|a| a == "linux" || a == "multiboot")
                        && m.args.first().map(String::as_str) == Some("vmm")
                })
                .ok_or_else(|| format!("scenario `{}` has no VMM module", scenario.name))?;
            vmm.args
                .retain(|a| !a.starts_with("ram=") && !a.starts_with("mem="));
            if vmm.args.iter().any(|a| a == "linux") {
                // The Linux VMM's RAM budget at the root task covers guest RAM (`mem=`) and
                // the virtio disk.
                let disk = vmm
                    .args
                    .iter()
                    .find_map(|a| parse_size(a.strip_prefix("disk=")?))
                    .unwrap_or(16 << 20);
                vmm.args.push(format!("mem={mem}"));
                vmm.args
                    .push(format!("ram={}M", (bytes + disk + (16 << 20)) >> 20));
            } else {
                // A Multiboot guest's RAM is the VMM's budget.
                vmm.args.push(format!("ram={mem}"));
            }
            let machine = parse_size(&s.memory).unwrap_or(0);
            if machine < bytes + (256 << 20) {
                s.memory = format!("{}M", (bytes + (384 << 20)) >> 20);
            }
        }
        Ok(s)
    }
}

/// `64M`, `1G`, `4096K` or bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl Scenarios {
    /// Parses and checks the text of `path`.
    pub fn parse(path: &str, text: &str) -> Result<Scenarios, Error> {
        let raw: RawFile = toml::from_str(text).map_err(|e| Error(format!("{path}: {e}")))?;
        if raw.build.packages.is_empty() {
            return Err(Error(format!("{path}: [build] packages: list no package")));
        }
        let mut list = Vec::new();
        for (name, scenario) in &raw.scenario {
            let context = Context {
                path,
                root: Path::new(path).parent().unwrap_or(Path::new("")),
                name,
                line: header_line(text, name),
            };
            list.push(context.scenario(scenario, &raw.scenario)?);
        }
        Ok(Scenarios {
            build: raw.build,
            list,
        })
    }

    /// The scenario called `name`.
    pub fn get(&self, name: &str) -> Option<&Scenario> {
        self.list.iter().find(|s| s.name == name)
    }

    /// The scenario whose image `scenario` boots (itself unless it says `image = "..."`).
    pub fn image_of<'a>(&'a self, scenario: &'a Scenario) -> &'a Scenario {
        match &scenario.boot {
            Boot::Image(other) => self.get(other).expect("checked when parsed"),
            _ => scenario,
        }
    }
}

/// The line of `[scenario.NAME]` (or of the first `[scenario.NAME.…]` table).
fn header_line(text: &str, name: &str) -> Option<usize> {
    let exact = format!("[scenario.{name}]");
    let nested = format!("[scenario.{name}.");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(&exact) || l.starts_with(&nested)
        })
        .map(|i| i + 1)
}

/// Where an error is: the file and the scenario.
struct Context<'a> {
    path: &'a str,
    /// The directory of the scenario file, which its paths are relative to.
    root: &'a Path,
    name: &'a str,
    line: Option<usize>,
}

/// Characters GRUB's configuration parser would split on or interpret.
const GRUB_SPECIAL: &[char] = &['"', '\'', '\\', ';', '$', '{', '}', '#', '|', '&', '<', '>'];

/// File names the image already uses.
const RESERVED_NAMES: &[&str] = &["kernel", "sigma0", "roottask", "grub"];

impl Context<'_> {
    fn error(&self, field: &str, problem: impl fmt::Display) -> Error {
        let at = match self.line {
            Some(line) => format!("{}:{line}", self.path),
            None => self.path.to_string(),
        };
        Error(format!(
            "{at}: scenario `{}`: {field}: {problem}",
            self.name
        ))
    }

    fn scenario(
        &self,
        raw: &RawScenario,
        all: &IndexMap<String, RawScenario>,
    ) -> Result<Scenario, Error> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(self.error(
                "name",
                "use lower-case letters, digits and `-` only (it names files)",
            ));
        }
        if raw.description.trim().is_empty() {
            return Err(self.error("description", "is empty"));
        }
        if let Some(group) = raw.groups.iter().find(|g| g.trim().is_empty()) {
            return Err(self.error("groups", format!("{group:?} is not a group name")));
        }
        let kinds = [
            raw.modules.is_some(),
            raw.linux.is_some(),
            raw.image.is_some(),
            raw.compartments.is_some(),
        ];
        if kinds.iter().filter(|&&k| k).count() != 1 {
            return Err(self.error(
                "modules/linux/image/compartments",
                "give exactly one of `modules`, `linux`, `image` and `compartments` (what to boot)",
            ));
        }
        let cmdline = raw.cmdline.clone().unwrap_or_default();
        if raw.sigma0.is_some() && raw.modules.is_none() {
            return Err(self.error("sigma0", "only a scenario with `modules` has a sigma0"));
        }
        let boot = if let Some(modules) = &raw.modules {
            if let Some(c) = cmdline.chars().find(|c| GRUB_SPECIAL.contains(c)) {
                return Err(self.error("cmdline", format!("contains {c:?}, which GRUB interprets")));
            }
            let sigma0 = match &raw.sigma0 {
                Some(m) => self.module("sigma0", m)?,
                None => default_sigma0(),
            };
            let mut checked: Vec<Module> = Vec::new();
            for (i, m) in modules.iter().enumerate() {
                let field = format!("modules[{i}]");
                let module = self.module(&field, m)?;
                if RESERVED_NAMES.contains(&module.name.as_str()) {
                    return Err(self.error(
                        &field,
                        format!("name {:?} is taken by the image itself", module.name),
                    ));
                }
                if let Some(other) = checked
                    .iter()
                    .find(|o| o.name == module.name && o.source != module.source)
                {
                    return Err(self.error(
                        &field,
                        format!(
                            "name {:?} is already used for another file ({:?}); give `name`",
                            other.name, other.source
                        ),
                    ));
                }
                checked.push(module);
            }
            Boot::Multiboot {
                cmdline,
                sigma0,
                modules: checked,
            }
        } else if let Some(file) = &raw.compartments {
            if let Some(c) = cmdline.chars().find(|c| GRUB_SPECIAL.contains(c)) {
                return Err(self.error("cmdline", format!("contains {c:?}, which GRUB interprets")));
            }
            if file.is_empty() {
                return Err(self.error("compartments", "is empty; give a compartment file"));
            }
            // Checked now, so that a broken file stops every command; its own path and line
            // come first.
            let parsed =
                CompartmentFile::read(file, &self.root.join(file), self.root).map_err(|e| {
                    let at = match self.line {
                        Some(line) => format!("{}:{line}", self.path),
                        None => self.path.to_string(),
                    };
                    Error(format!(
                        "{e} (the compartments of scenario `{}`, {at})",
                        self.name
                    ))
                })?;
            Boot::Compartments {
                cmdline,
                file: Box::new(parsed),
            }
        } else if let Some(linux) = &raw.linux {
            if linux.kernel.is_empty() {
                return Err(self.error("linux.kernel", "is empty"));
            }
            Boot::Linux {
                kernel: linux.kernel.clone().into(),
                initrd: linux.initrd.clone().map(PathBuf::from),
                cmdline,
            }
        } else {
            let other = raw.image.clone().expect("one kind is set");
            match all.get(&other) {
                None => return Err(self.error("image", format!("no scenario `{other}`"))),
                Some(o) if o.image.is_some() => {
                    return Err(self.error(
                        "image",
                        format!("scenario `{other}` boots another's image itself; name that one"),
                    ))
                }
                Some(_) => {}
            }
            for (field, set) in [
                ("cmdline", raw.cmdline.is_some()),
                ("made_by", raw.made_by.is_some()),
                ("memory", raw.memory.is_some()),
            ] {
                if set {
                    return Err(self.error(
                        field,
                        format!("belongs to scenario `{other}`, whose image this one boots"),
                    ));
                }
            }
            Boot::Image(other)
        };
        let memory = match (&raw.memory, &boot) {
            (Some(memory), _) => memory.clone(),
            (None, Boot::Compartments { file, .. }) => file.machine_memory_text(),
            (None, _) => "256M".into(),
        };
        if memory.is_empty() {
            return Err(self.error("memory", "is empty"));
        }
        let check = raw.check.as_ref().map(|c| self.check(c)).transpose()?;
        let grub = match raw.loader.as_deref() {
            None | Some("direct") => false,
            Some("grub") => true,
            Some(other) => {
                return Err(self.error(
                    "loader",
                    format!("is `{other}`; give `direct` (the default) or `grub`"),
                ))
            }
        };
        let qemu = {
            let mut qemu = raw.qemu.clone();
            if let Boot::Compartments { file, .. } = &boot {
                qemu.extend(file.qemu_args());
            }
            qemu
        };
        Ok(Scenario {
            name: self.name.to_string(),
            description: raw.description.clone(),
            groups: raw.groups.clone(),
            boot,
            made_by: raw.made_by.clone(),
            memory,
            qemu,
            grub,
            check,
        })
    }

    fn module(&self, field: &str, raw: &RawModule) -> Result<Module, Error> {
        let sources = [
            raw.binary.clone().map(Source::Binary),
            raw.file.clone().map(|f| Source::File(f.into())),
            raw.generate.map(Source::Generate),
            raw.text.clone().map(Source::Text),
        ];
        let mut given = sources.into_iter().flatten();
        let (Some(source), None) = (given.next(), given.next()) else {
            return Err(self.error(
                field,
                "give exactly one of `binary`, `file`, `generate` and `text`",
            ));
        };
        let default_name = match &source {
            Source::Binary(b) => Some(b.clone()),
            Source::File(f) => f.file_name().map(|n| n.to_string_lossy().into_owned()),
            Source::Generate(g) => Some(g.default_name().to_string()),
            Source::Text(_) => None,
        };
        let Some(name) = raw.name.clone().or(default_name) else {
            return Err(self.error(field, "a `text` module needs a `name`"));
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(self.error(
                &format!("{field}.name"),
                format!("{name:?} is not a plain file name"),
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| c.is_whitespace() || GRUB_SPECIAL.contains(c))
        {
            return Err(self.error(&format!("{field}.name"), format!("{name:?} contains {c:?}")));
        }
        if raw.args.is_empty() {
            return Err(self.error(
                &format!("{field}.args"),
                "is empty; the first argument is the task's name",
            ));
        }
        for (i, arg) in raw.args.iter().enumerate() {
            if arg.is_empty()
                || arg
                    .chars()
                    .any(|c| c.is_whitespace() || GRUB_SPECIAL.contains(&c))
            {
                return Err(self.error(
                    &format!("{field}.args[{i}]"),
                    format!(
                        "{arg:?}: an argument must be non-empty, without whitespace or any of {}",
                        GRUB_SPECIAL.iter().collect::<String>()
                    ),
                ));
            }
        }
        Ok(Module {
            name,
            source,
            args: raw.args.clone(),
        })
    }

    fn check(&self, raw: &RawCheck) -> Result<Check, Error> {
        if raw.name.trim().is_empty() {
            return Err(self.error("check.name", "is empty"));
        }
        if raw.timeout == 0 {
            return Err(self.error("check.timeout", "must be at least 1 second"));
        }
        let regexes = |field: &str, list: &[String]| -> Result<Vec<Regex>, Error> {
            list.iter()
                .enumerate()
                .map(|(i, r)| Regex::new(r).map_err(|e| self.error(&format!("{field}[{i}]"), e)))
                .collect()
        };
        if let Some(tap) = &raw.tap {
            if tap.plan == 0 {
                return Err(self.error("check.tap.plan", "must be at least 1"));
            }
            if tap.label.trim().is_empty() {
                return Err(self.error("check.tap.label", "is empty"));
            }
            if tap.plan_first && !tap.plan_line {
                return Err(self.error("check.tap.plan_first", "needs plan_line = true"));
            }
        }
        Ok(Check {
            name: raw.name.clone(),
            timeout: Duration::from_secs(raw.timeout),
            status: raw.status,
            require: regexes("check.require", &raw.require)?,
            forbid: regexes("check.forbid", &raw.forbid)?,
            show: regexes("check.show", &raw.show)?,
            tap: raw.tap.as_ref().map(|t| Tap {
                label: t.label.clone(),
                plan: t.plan,
                plan_line: t.plan_line,
                plan_first: t.plan_first,
                prefix: t.prefix.clone(),
            }),
            console: raw
                .console
                .iter()
                .enumerate()
                .map(|(i, step)| {
                    Ok(Step {
                        expect: Regex::new(&step.expect)
                            .map_err(|e| self.error(&format!("check.console[{i}].expect"), e))?,
                        send: step.send.clone(),
                        fetch: step.fetch.clone(),
                        serial: step.serial.clone(),
                    })
                })
                .collect::<Result<_, Error>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "[build]\ntarget = \"x86_64-unknown-none\"\npackages = [\"demo\"]\n";

    fn parse(body: &str) -> Result<Scenarios, Error> {
        Scenarios::parse("s.toml", &format!("{HEAD}{body}"))
    }

    fn error(body: &str) -> String {
        match parse(body) {
            Ok(_) => panic!("accepted:\n{body}"),
            Err(e) => e.0,
        }
    }

    const DEMO: &str = "[scenario.demo]\ndescription = \"d\"\n\
        modules = [{ binary = \"demo\", args = [\"pong\"] }]\n";

    #[test]
    fn linux_overrides_replace_the_modules_and_the_memory() {
        let s = Scenarios::parse(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios.toml"),
            &std::fs::read_to_string("../scenarios.toml").unwrap(),
        )
        .unwrap();
        let linux = s.get("linux").unwrap();
        let here = std::env::current_dir().unwrap().join("Cargo.toml");
        let o = LinuxOverrides {
            kernel: Some(here.clone()),
            append: Some("console=ttyS0 quiet".into()),
            mem: Some("1G".into()),
            ..LinuxOverrides::default()
        };
        let changed = o.apply(linux).unwrap();
        let Boot::Multiboot { modules, .. } = &changed.boot else {
            panic!("not multiboot")
        };
        let role = |r: &str| modules.iter().find(|m| m.args[0] == r).unwrap();
        assert_eq!(
            role("linux").source,
            Source::File(here.canonicalize().unwrap())
        );
        assert_eq!(
            role("cmdline").source,
            Source::Text("console=ttyS0 quiet".into())
        );
        let vmm = role("vmm");
        assert_eq!(vmm.args.iter().filter(|a| a.starts_with("mem=")).count(), 1);
        assert!(vmm.args.contains(&"mem=1G".to_string()));
        assert!(
            vmm.args.contains(&"ram=1056M".to_string()),
            "{:?}",
            vmm.args
        );
        assert!(parse_size(&changed.memory).unwrap() >= (1 << 30) + (256 << 20));
        // Bad input: a missing file, a malformed size, a scenario without a compartment.
        let missing = LinuxOverrides {
            initrd: Some("/nonexistent/initrd".into()),
            ..LinuxOverrides::default()
        };
        assert!(missing.apply(linux).unwrap_err().contains("no such file"));
        let bad = LinuxOverrides {
            mem: Some("100M".into()),
            ..LinuxOverrides::default()
        };
        assert!(bad.apply(linux).unwrap_err().contains("power of two"));
        let demo = LinuxOverrides {
            append: Some("x".into()),
            ..LinuxOverrides::default()
        };
        assert!(demo.apply(s.get("demo").unwrap()).is_err());
    }

    #[test]
    fn overrides_replace_a_multiboot_kernel() {
        let s = Scenarios::parse(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios.toml"),
            &std::fs::read_to_string("../scenarios.toml").unwrap(),
        )
        .unwrap();
        let here = std::env::current_dir().unwrap().join("Cargo.toml");
        let o = LinuxOverrides {
            kernel: Some(here.clone()),
            append: Some("mbtest ram=64M".into()),
            mem: Some("64M".into()),
            ..LinuxOverrides::default()
        };
        let changed = o.apply(s.get("multiboot").unwrap()).unwrap();
        let Boot::Multiboot { modules, .. } = &changed.boot else {
            panic!("not multiboot")
        };
        let role = |r: &str| modules.iter().find(|m| m.args[0] == r).unwrap();
        assert_eq!(
            role("kernel").source,
            Source::File(here.canonicalize().unwrap())
        );
        assert_eq!(
            role("cmdline").source,
            Source::Text("mbtest ram=64M".into())
        );
        assert!(role("vmm").args.contains(&"ram=64M".to_string()));
        // A Multiboot scenario without a command line module cannot take --append.
        let bad = LinuxOverrides {
            append: Some("x".into()),
            ..LinuxOverrides::default()
        };
        assert!(bad.apply(s.get("multiboot-bad-image").unwrap()).is_err());
    }

    #[test]
    fn the_real_file_parses() {
        let s = Scenarios::parse(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios.toml"),
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios.toml")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "test",
            "vm",
            "vm-nosvm",
            "demo",
            "bad-module",
            "bad-sigma0",
            "multiboot",
            "multiboot-bad-image",
            "multiboot-exit-status",
        ] {
            let scenario = s.get(name).expect(name);
            assert!(scenario.groups.contains(&"test".to_string()), "{name}");
            assert!(scenario.check.is_some(), "{name}");
        }
        // The TAP suites have a fixed plan.
        for name in ["test", "vm", "multiboot"] {
            let check = s.get(name).unwrap().check.as_ref().unwrap();
            assert!(check.tap.as_ref().is_some_and(|t| t.plan > 0), "{name}");
        }
        assert_eq!(s.image_of(s.get("vm-nosvm").unwrap()).name, "vm");
        assert!(matches!(
            s.get("linux-native").unwrap().boot,
            Boot::Linux { .. }
        ));
    }

    #[test]
    fn modules_keep_their_argument_lists() {
        let s = parse(
            "[scenario.demo]\ndescription = \"d\"\ncmdline = \"nofastpath\"\nmodules = [\n\
             { binary = \"demo\", args = [\"pong\"] },\n\
             { binary = \"demo\", args = [\"ping\", \"peer=pong\"] },\n\
             { generate = \"bad-elf\", args = [\"broken\"] },\n\
             { text = \"console=ttyS0 quiet\", name = \"linux.cmdline\", args = [\"cmd\", \"data\"] },\n]\n",
        )
        .unwrap();
        let Boot::Multiboot {
            cmdline,
            sigma0,
            modules,
        } = &s.list[0].boot
        else {
            panic!("not multiboot");
        };
        assert_eq!(cmdline, "nofastpath");
        assert_eq!(sigma0.source, Source::Binary("sigma0".into()));
        assert_eq!(modules[1].args, ["ping", "peer=pong"]);
        assert_eq!(modules[2].name, "bad.elf");
        assert_eq!(
            modules[3].source,
            Source::Text("console=ttyS0 quiet".into())
        );
        assert_eq!(s.list[0].memory, "256M");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = error("[scenario.demo]\ndescription = \"d\n");
        assert!(e.starts_with("s.toml: TOML parse error at line 5"), "{e}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let e = error("[scenario.demo]\nmodules = []\n");
        assert!(e.contains("missing field `description`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn an_unknown_field_is_named_with_its_line() {
        let e = error(&format!(
            "{DEMO}[scenario.demo.check]\nname = \"n\"\ntimeout = 5\nstatsu = 33\n"
        ));
        assert!(e.contains("unknown field `statsu`"), "{e}");
        assert!(e.contains("line 10"), "{e}");
    }

    #[test]
    fn a_wrong_type_is_named() {
        let e = error(&format!(
            "{DEMO}[scenario.demo.check]\nname = \"n\"\ntimeout = \"600\"\n"
        ));
        assert!(e.contains("line 9"), "{e}");
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn an_unknown_generator_lists_the_known_ones() {
        let e = error("[scenario.x]\ndescription = \"d\"\nmodules = [{ generate = \"bad-eff\", args = [\"b\"] }]\n");
        assert!(
            e.contains("bad-elf") && e.contains("truncated-sigma0"),
            "{e}"
        );
    }

    #[test]
    fn exactly_one_boot_kind() {
        let e = error("[scenario.x]\ndescription = \"d\"\n");
        assert!(
            e.contains("s.toml:4: scenario `x`: modules/linux/image/compartments"),
            "{e}"
        );
        let e = error("[scenario.x]\ndescription = \"d\"\nmodules = []\nimage = \"x\"\n");
        assert!(
            e.contains("exactly one of `modules`, `linux`, `image` and `compartments`"),
            "{e}"
        );
    }

    #[test]
    fn exactly_one_module_source() {
        let e = error("[scenario.x]\ndescription = \"d\"\nmodules = [{ binary = \"a\", file = \"b\", args = [\"a\"] }]\n");
        assert!(
            e.contains("scenario `x`: modules[0]: give exactly one of"),
            "{e}"
        );
    }

    #[test]
    fn arguments_are_words() {
        let e = error("[scenario.x]\ndescription = \"d\"\nmodules = [{ binary = \"demo\", args = [\"ping\", \"peer pong\"] }]\n");
        assert!(e.contains("modules[0].args[1]: \"peer pong\""), "{e}");
        let e = error(
            "[scenario.x]\ndescription = \"d\"\nmodules = [{ binary = \"demo\", args = [] }]\n",
        );
        assert!(e.contains("modules[0].args: is empty"), "{e}");
    }

    #[test]
    fn module_names_do_not_collide() {
        let e = error("[scenario.x]\ndescription = \"d\"\nmodules = [{ binary = \"kernel\", args = [\"k\"] }]\n");
        assert!(e.contains("taken by the image"), "{e}");
        let e = error(
            "[scenario.x]\ndescription = \"d\"\nmodules = [{ binary = \"demo\", args = [\"a\"] },\n\
             { file = \"elsewhere/demo\", args = [\"b\"] }]\n",
        );
        assert!(
            e.contains("modules[1]: name \"demo\" is already used"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_regex_is_named() {
        let e = error(&format!(
            "{DEMO}[scenario.demo.check]\nname = \"n\"\ntimeout = 5\nrequire = ['ok', '[unclosed']\n"
        ));
        assert!(e.contains("scenario `demo`: check.require[1]"), "{e}");
    }

    #[test]
    fn an_image_must_exist_and_stand_alone() {
        let e = error("[scenario.x]\ndescription = \"d\"\nimage = \"nope\"\n");
        assert!(e.contains("image: no scenario `nope`"), "{e}");
        let e = error(&format!(
            "{DEMO}[scenario.y]\ndescription = \"d\"\nimage = \"demo\"\ncmdline = \"debug\"\n"
        ));
        assert!(
            e.contains("scenario `y`: cmdline: belongs to scenario `demo`"),
            "{e}"
        );
    }

    #[test]
    fn a_compartment_file_is_a_fourth_way_to_boot() {
        let dir = std::env::temp_dir().join(format!("xtask-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("two.toml");
        std::fs::write(
            &good,
            "[[compartment]]\nname = \"a\"\n[[compartment]]\nname = \"b\"\n",
        )
        .unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[compartment]]\nname = \"a\"\nmemory = \"100M\"\n").unwrap();
        let s = parse(&format!(
            "[scenario.two]\ndescription = \"d\"\ncompartments = \"{}\"\ncmdline = \"nofastpath\"\n\
             [scenario.two.check]\nname = \"n\"\ntimeout = 5\n\
             [scenario.big]\ndescription = \"d\"\ncompartments = \"{0}\"\nmemory = \"2G\"\n",
            good.display()
        ))
        .unwrap();
        let two = s.get("two").unwrap();
        let Boot::Compartments { cmdline, file } = &two.boot else {
            panic!("not a compartment file");
        };
        assert_eq!(cmdline, "nofastpath");
        assert_eq!(file.path(), good.display().to_string());
        // The file's machine memory unless the scenario gives one: 2 * 144M + 256M, to 576M.
        assert_eq!(two.memory, "576M");
        assert!(two.check.is_some());
        assert_eq!(s.get("big").unwrap().memory, "2G");
        // --kernel and the like do not apply.
        let o = LinuxOverrides {
            append: Some("x".into()),
            ..LinuxOverrides::default()
        };
        assert!(o.apply(two).unwrap_err().contains("compartment file"));
        // A broken file fails the whole scenario file, with its own path and line first.
        let e = error(&format!(
            "[scenario.x]\ndescription = \"d\"\ncompartments = \"{}\"\n",
            bad.display()
        ));
        assert!(
            e.starts_with(&format!(
                "{}:3: compartment \"a\": memory: \"100M\" is not a power of two >= 16M",
                bad.display()
            )),
            "{e}"
        );
        assert!(
            e.ends_with("(the compartments of scenario `x`, s.toml:4)"),
            "{e}"
        );
        let e = error("[scenario.x]\ndescription = \"d\"\ncompartments = \"/nonexistent.toml\"\n");
        assert!(e.starts_with("/nonexistent.toml: cannot read"), "{e}");
        let e = error(&format!(
            "[scenario.x]\ndescription = \"d\"\ncompartments = \"{}\"\nmodules = []\n",
            good.display()
        ));
        assert!(e.contains("exactly one of"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plan_must_be_positive() {
        let e = error(&format!(
            "{DEMO}[scenario.demo.check]\nname = \"n\"\ntimeout = 5\n[scenario.demo.check.tap]\nlabel = \"t\"\nplan = 0\n"
        ));
        assert!(e.contains("check.tap.plan: must be at least 1"), "{e}");
    }

    #[test]
    fn a_plan_first_needs_a_plan_line() {
        let e = error(&format!(
            "{DEMO}[scenario.demo.check]\nname = \"n\"\ntimeout = 5\n[scenario.demo.check.tap]\nlabel = \"t\"\nplan = 3\nplan_first = true\n"
        ));
        assert!(
            e.contains("check.tap.plan_first: needs plan_line = true"),
            "{e}"
        );
    }
}
