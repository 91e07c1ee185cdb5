//! Compartment files (`scenarios/*.toml`): a list of Linux compartments as a user writes it,
//! checked, and translated into the boot modules that run them (a console server, the data
//! modules, and a command line and a VMM per compartment).
//!
//! # Format
//!
//! ```toml
//! [machine]              # optional
//! memory = "1G"          # QEMU -m; default: the sum over the compartments of memory + disk
//!                        # + 16M, plus 256M, rounded up to a multiple of 64M
//!
//! [uplink]               # optional: a user-level e1000 driver joins this switch, and QEMU
//! switch = "lan"         # gets `-nic user,model=e1000,hostfwd=...` with these forwards
//! forward = ["tcp:8080:10.0.2.15:80"]   # tcp:HOST_PORT:GUEST_ADDRESS:GUEST_PORT
//!
//! [defaults]             # optional: any compartment field but `name`, for every compartment
//! memory = "128M"        # that does not give it itself
//!
//! [[compartment]]        # one table per compartment, 1 to 16
//! name = "alpha"         # required, unique, [a-z][a-z0-9-]{0,15}; not cons, root, sigma0,
//!                        # kernel, vmm or f<digits> (names the image's own tasks and modules)
//! memory = "128M"        # guest RAM, a power of two >= 16M (default 128M)
//! kernel = "PATH"        # the bzImage (default target/linux/bzImage)
//! initrd = "PATH"        # the initramfs (default target/linux/initramfs.cpio.gz; "": none)
//! vmlinux = "PATH"       # the kernel decompressed, booted directly (default: target/linux/vmlinux
//!                        # with the default kernel, none with another; "": none, the guest
//!                        # decompresses its bzImage itself)
//! cmdline = "..."        # appended to the default Linux command line
//! console = "hvc0"       # "hvc0" (virtio console, the default) or "ttyS0" (the 16550A)
//! disk = "16M"           # a blank virtio block disk of this size (default: none), or
//! disk_image = "PATH"    # an image for it (not both)
//! priority = 100         # the VMM's L4 thread priority, 0..=100 (default: the kernel's, 100)
//! timeslice_ms = 10      # the VMM's time slice (1..=1000; default the kernel's, 10): compartments
//!                        # of one priority share the CPU in proportion to their slices
//! restart = "never"      # "never" (the default) or "on-failure"
//! restarts = 3           # with on-failure: at most this many restarts, 1..=100 (default 3)
//! vmm_options = []       # extra VMM options for debugging and tests: "verbose", "probe-isolation", "crash-at-init"
//! switch = "lan"         # a virtio-net port (eth0) on the virtual switch of this name
//! ip = "10.0.0.1/24"     # the guest's address on it (not inherited from [defaults])
//! service = "httpd"      # a service /init starts at boot: "httpd" (busybox httpd on port 80,
//!                        # serving /www with a page naming the compartment) or "echo" (a TCP
//!                        # echo server on port 7); initramfs/services/ has them
//! serial = "com2"        # its console also on this serial port of the machine ("com2",
//!                        # "com3", "com4"; one compartment each, not from [defaults]): a Unix
//!                        # socket on the host, target/serial/FILE-NAME.sock, which
//!                        # scripts/attach.sh attaches a terminal to; typing there reaches
//!                        # this compartment only
//! syscalls = "guest"     # "guest" (the default: Linux's user system calls stay in the guest)
//!                        # or "l4" (the L4Linux mode: each goes through L4 IPC to a syscall
//!                        # monitor task, `mon.NAME`, before the guest kernel sees it)
//! syscall_policy = ["deny=mkdir:EACCES"]   # the monitor's policy (with "l4"): deny=CALL:ERRNO,
//!                        # allow=CALL,..., report=CALL,...|all, trace
//! ```
//!
//! Paths are relative to the repository (or absolute); `scripts/build-linux.sh` makes the
//! default kernel and initramfs. Sizes are bytes or a number with `K`, `M` or `G`.
//!
//! The boot needs a fixed number of modules whatever the number of compartments (the kernel
//! keeps at most `KIP_MAX_MODULES`, 16, with short command lines): the tasks and command lines
//! go to the root task in one launch list. A task's arguments must fit in its 1 KiB arguments
//! area; both are checked when the modules are made.
//!
//! Every problem stops the runner before anything is built, with the file, the line and the
//! field: `scenarios/x.toml:12: compartment "beta": memory: "100M" is not a power of two >=
//! 16M`. The files are looked at only when the modules are made ([`CompartmentFile::modules`]).
//!
//! # Modules
//!
//! For compartments C1..Cn, in this order: the console server and the VMM as data modules
//! (`cons data`, `vmm data`); each distinct file (by canonical path) named as a kernel, initrd
//! or disk image, in the order of first use, as data module `fK data` (K = 1, 2, ...); and the
//! launch list, text module `launch data`, which the root task reads line by line:
//! 1. per compartment C its Linux command line, `text C.cmdline CMDLINE`;
//! 2. the console server, `task cons cons service io=0x3f8/3 irq=4 client=C1 ... client=Cn`;
//! 3. per compartment C its VMM, `task C vmm factory=8M blob=linux:fK [blob=vmlinux:fK] [blob=initrd:fK]
//!    blob=cmdline:C.cmdline [blob=disk:fK] linux name=C mem=SIZE [disk=SIZE] ram=RM
//!    console=cons [restart=N] [priority=P]`, where R is the guest RAM, plus the disk rounded
//!    up to 2 MiB, plus 16 MiB, in MiB (`blob=AS:MODULE`: module MODULE, which the task sees
//!    as AS), and with `syscalls = "l4"` `syscalls=l4 monitor=mon.C`, after the monitor's
//!    line `task mon.C sysmon service client=C POLICY...` (the `sysmon` binary is a data
//!    module then).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::scenario::{default_sigma0, parse_size, Boot, Error, Module, Source};

/// The services a compartment can name (`service`): the scripts in `initramfs/services/`,
/// which the initramfs carries as `/etc/services/NAME`.
pub const SERVICES: [&str; 2] = ["echo", "httpd"];

/// The bzImage when no table names one (`scripts/build-linux.sh` makes it).
const DEFAULT_KERNEL: &str = "target/linux/bzImage";
/// The initramfs when no table names one (`scripts/build-linux.sh` makes it).
const DEFAULT_INITRD: &str = "target/linux/initramfs.cpio.gz";
/// The default kernel decompressed (`scripts/build-linux.sh` extracts it from the bzImage).
const DEFAULT_VMLINUX: &str = "target/linux/vmlinux";
/// What a missing default file needs.
const BUILD_HINT: &str =
    "scripts/build-linux.sh makes the default ones, target/linux/bzImage and target/linux/initramfs.cpio.gz";
/// Guest RAM when no table gives `memory`.
const DEFAULT_MEMORY: u64 = 128 << 20;
/// The smallest guest RAM.
const MIN_MEMORY: u64 = 16 << 20;
/// The largest size of anything (guest RAM, a disk, the machine), which keeps their sums far
/// from overflowing.
const MAX_SIZE: u64 = 1 << 40;
/// The most compartments in one file.
const MAX_COMPARTMENTS: usize = 16;
/// Restarts with `restart = "on-failure"` and no `restarts`.
const DEFAULT_RESTARTS: i64 = 3;
/// The most restarts.
const MAX_RESTARTS: i64 = 100;
/// The VMM options a compartment may add (`vmm_options`): its exits in detail, the isolation
/// probes (vmm/src/probe.rs), and a VMM that crashes when its guest reaches /init (the
/// containment test).
const VMM_OPTIONS: &[&str] = &["verbose", "probe-isolation", "crash-at-init"];
/// The highest VMM priority: `ThreadSchedule` takes 0..=255 but at most the caller's own
/// priority, and every thread, the root task's too, starts at 100 (kernel/docs/syscalls.md).
const MAX_PRIORITY: i64 = 100;
/// What a VMM's RAM budget (`ram=`) has beyond guest RAM and the disk.
const VMM_MARGIN: u64 = 16 << 20;
/// The granule of a RAM budget (the root task's RAM service hands out 2 MiB pages).
const RAM_GRANULE: u64 = 2 << 20;
/// What the machine has beyond the compartments' RAM budgets by default.
const MACHINE_MARGIN: u64 = 256 << 20;
/// The default machine memory is a multiple of this.
const MACHINE_GRANULE: u64 = 64 << 20;
/// The smallest virtio disk: one sector.
const SECTOR: u64 = 512;
/// The longest Linux command line we make: Linux takes 2,047 bytes (`cmdline_size`), and the
/// VMM appends its virtio devices.
const MAX_LINUX_CMDLINE: usize = 2047 - 128;
/// The bytes of a task's arguments (`l4::rt::ARGUMENTS_SIZE`, with the NUL).
const TASK_ARGUMENTS: usize = 1024;
/// What the root task appends to a task's arguments per blob: ` blob:NAME=ADDRESS+SIZE`.
const BLOB_ANNOUNCEMENT: usize = 40;
/// Names the image's own tasks and modules use.
const RESERVED_NAMES: &[&str] = &[
    "cons", "root", "sigma0", "kernel", "vmm", "uplink", "launch",
];

/// The console server's arguments before its clients: COM1's ports and IRQ line.
const CONSOLE_ARGS: &[&str] = &["cons", "service", "io=0x3f8/3", "irq=4"];
/// The I/O bases of COM2, COM3 and COM4 (`serial = "com2"` ...).
const SERIAL_PORTS: [u16; 3] = [0x2f8, 0x3e8, 0x2e8];
/// The first line of the launch list (the root task reads it; see roottask's `launch`).
const LAUNCH_HEADER: &str =
    "# made by xtask from a compartment file: initrds to decompress, texts, then tasks\n";

/// Whether the file at `path` starts with the gzip magic.
fn is_gzip(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 2];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}
/// The Linux command line of a compartment on the virtio console (before `l4.name=NAME`).
const HVC0_CMDLINE: &str = "console=hvc0 quiet earlycon=uart8250,io,0x3f8 panic=-1 printk.time=1";
/// The Linux command line of a compartment on the 16550A (before `l4.name=NAME`).
const TTYS0_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// The file as written: every field optional, so that this module names what is missing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    machine: Option<Spanned<RawMachine>>,
    uplink: Option<Spanned<RawUplink>>,
    defaults: Option<Spanned<RawFields>>,
    #[serde(default)]
    compartment: Vec<Spanned<RawFields>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    switch: Spanned<String>,
    #[serde(default)]
    forward: Vec<Spanned<String>>,
}

/// `[uplink]`: the NIC driver on a switch, and QEMU's port forwards to compartments.
#[derive(Debug, Clone)]
struct Uplink {
    switch: String,
    /// `tcp:HOST_PORT:GUEST_ADDRESS:GUEST_PORT`, as QEMU's hostfwd wants them.
    forwards: Vec<(String, u16, std::net::Ipv4Addr, u16)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    memory: Option<Spanned<String>>,
}

/// A `[[compartment]]` or the `[defaults]` table (which may not give `name`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFields {
    name: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
    kernel: Option<Spanned<String>>,
    vmlinux: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    console: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    disk_image: Option<Spanned<String>>,
    priority: Option<Spanned<i64>>,
    timeslice_ms: Option<Spanned<i64>>,
    restart: Option<Spanned<String>>,
    restarts: Option<Spanned<i64>>,
    vmm_options: Option<Spanned<Vec<String>>>,
    switch: Option<Spanned<String>>,
    ip: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    serial: Option<Spanned<String>>,
    syscalls: Option<Spanned<String>>,
    syscall_policy: Option<Spanned<Vec<String>>>,
}

/// A value and the line it is written on.
#[derive(Debug, Clone)]
struct Located<T> {
    value: T,
    line: usize,
}

/// A file one compartment needs, with where it was named.
#[derive(Debug, Clone)]
struct Input {
    /// As written (relative to the repository, or absolute).
    path: PathBuf,
    /// The field that names it (`kernel`, `initrd`, `disk_image`).
    field: &'static str,
    /// The line it is named on (the compartment's header for a built-in default).
    line: usize,
    /// Where the value comes from, for messages: "", " (from [defaults])" or " (the default)".
    origin: &'static str,
}

/// The Linux console of a compartment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Console {
    /// The virtio console (few exits), with an 8250 earlycon for what comes before it.
    Hvc0,
    /// The 16550A UART (one exit per character).
    TtyS0,
}

/// The virtio block disk of a compartment.
#[derive(Debug, Clone)]
enum Disk {
    /// None asked for.
    None,
    /// Zeroes of this many bytes.
    Blank(u64),
    /// This image.
    Image(Input),
}

/// The fields of one table, each checked on its own.
#[derive(Default)]
struct Fields {
    memory: Option<Located<u64>>,
    kernel: Option<Located<PathBuf>>,
    /// `Some(None)`: `vmlinux = ""`, no direct boot.
    vmlinux: Option<Located<Option<PathBuf>>>,
    /// `Some(None)`: `initrd = ""`, no initramfs.
    initrd: Option<Located<Option<PathBuf>>>,
    cmdline: Option<Located<String>>,
    console: Option<Located<Console>>,
    /// `disk` or `disk_image` (`Disk::Image`'s line and origin are filled in when merged).
    disk: Option<Located<Disk>>,
    priority: Option<Located<u8>>,
    timeslice_ms: Option<Located<u16>>,
    /// `Some(true)`: `restart = "on-failure"`.
    on_failure: Option<Located<bool>>,
    restarts: Option<Located<u32>>,
    vmm_options: Option<Located<Vec<String>>>,
    switch: Option<Located<String>>,
    ip: Option<Located<String>>,
    service: Option<Located<String>>,
    /// `serial = "comN"`: N.
    serial: Option<Located<u8>>,
    /// `Some(true)`: `syscalls = "l4"`.
    l4_syscalls: Option<Located<bool>>,
    syscall_policy: Option<Located<Vec<String>>>,
}

/// One compartment, checked.
#[derive(Debug, Clone)]
struct Compartment {
    name: String,
    /// The line of its `[[compartment]]` header.
    line: usize,
    memory: u64,
    kernel: Input,
    /// The kernel decompressed, for a direct boot.
    vmlinux: Option<Input>,
    initrd: Option<Input>,
    cmdline: String,
    console: Console,
    disk: Disk,
    priority: Option<u8>,
    /// Its VMM's time slice in ms (its CPU share among compartments of its priority).
    timeslice_ms: Option<u16>,
    /// With `restart = "on-failure"`: at most this many restarts.
    restarts: Option<u32>,
    /// Extra VMM options (debugging and tests).
    vmm_options: Vec<String>,
    /// The switch its network port is on, and the guest's address there.
    switch: Option<String>,
    ip: Option<String>,
    /// The service /init starts (one of [`SERVICES`]).
    service: Option<String>,
    /// The machine's serial port (2..=4: COM2..COM4) its console is also on, and the line
    /// that says so.
    serial: Option<Located<u8>>,
    /// The L4Linux mode: the policy of its syscall monitor (`None`: system calls stay in the
    /// guest).
    monitor: Option<Vec<String>>,
}

/// A compartment file, checked (its kernel, initrd and disk image files are not looked at yet).
#[derive(Debug, Clone)]
pub struct CompartmentFile {
    /// Its path as the user named it, for messages.
    path: String,
    /// The directory its paths are relative to (the repository).
    root: PathBuf,
    /// `[machine] memory` and its line.
    memory: Option<Located<u64>>,
    compartments: Vec<Compartment>,
    uplink: Option<Uplink>,
}

/// Where an error is: the file and the table.
struct At<'a> {
    path: &'a str,
    table: String,
}

impl At<'_> {
    fn error(&self, line: usize, field: &str, problem: impl std::fmt::Display) -> Error {
        Error(format!(
            "{}:{line}: {}: {field}: {problem}",
            self.path, self.table
        ))
    }
}

/// The line (from 1) of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line a spanned value is written on.
fn line<T>(text: &str, value: &Spanned<T>) -> usize {
    line_of(text, value.span().start)
}

/// `bytes` as a size argument: `NM` if whole MiB, else `NK` if whole KiB, else bytes.
fn size_text(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

impl CompartmentFile {
    /// Reads and checks `file`, named `path` in messages; its paths are relative to `root`.
    pub fn read(path: &str, file: &Path, root: &Path) -> Result<CompartmentFile, Error> {
        let text =
            fs::read_to_string(file).map_err(|e| Error(format!("{path}: cannot read: {e}")))?;
        CompartmentFile::parse(path, &text, root)
    }

    /// Checks `text`, the content of the file named `path` in messages, whose paths are
    /// relative to `root`.
    pub fn parse(path: &str, text: &str, root: &Path) -> Result<CompartmentFile, Error> {
        let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        let memory = match &raw.machine {
            Some(machine) => {
                let at = At {
                    path,
                    table: "machine".into(),
                };
                machine
                    .get_ref()
                    .memory
                    .as_ref()
                    .map(|m| {
                        let bytes = parse_size(m.get_ref())
                            .filter(|b| {
                                (MIN_MEMORY..=MAX_SIZE).contains(b) && b.is_multiple_of(1 << 20)
                            })
                            .ok_or_else(|| {
                                at.error(
                                    line(text, m),
                                    "memory",
                                    format!(
                                        "{:?} is not a size of whole MiB from 16M to 1T, e.g. 1G",
                                        m.get_ref()
                                    ),
                                )
                            })?;
                        Ok(Located {
                            value: bytes,
                            line: line(text, m),
                        })
                    })
                    .transpose()?
            }
            None => None,
        };
        let defaults = match &raw.defaults {
            Some(d) => {
                let at = At {
                    path,
                    table: "defaults".into(),
                };
                if let Some(name) = &d.get_ref().name {
                    return Err(at.error(
                        line(text, name),
                        "name",
                        "each compartment names itself; [defaults] cannot give a name",
                    ));
                }
                let fields = fields(text, &at, d.get_ref())?;
                if let Some(serial) = &fields.serial {
                    return Err(at.error(
                        serial.line,
                        "serial",
                        "a serial port is one compartment's; give it in that [[compartment]]",
                    ));
                }
                if let Some(restarts) = &fields.restarts {
                    if !fields.on_failure.as_ref().is_some_and(|r| r.value) {
                        return Err(at.error(
                            restarts.line,
                            "restarts",
                            "only with restart = \"on-failure\" in [defaults]",
                        ));
                    }
                }
                fields
            }
            None => Fields::default(),
        };
        if raw.compartment.is_empty() {
            return Err(Error(format!(
                "{path}:{}: compartment: there is no [[compartment]] table; give at least one",
                text.lines().count().max(1)
            )));
        }
        let mut compartments: Vec<Compartment> = Vec::new();
        for (i, table) in raw.compartment.iter().enumerate() {
            let header = line(text, table);
            let raw = table.get_ref();
            let Some(name) = &raw.name else {
                let at = At {
                    path,
                    table: format!("compartment {}", i + 1),
                };
                return Err(at.error(header, "name", "missing; every compartment needs one"));
            };
            let at = At {
                path,
                table: format!("compartment {:?}", name.get_ref()),
            };
            check_name(&at, line(text, name), name.get_ref())?;
            if let Some(other) = compartments.iter().find(|c| &c.name == name.get_ref()) {
                return Err(at.error(
                    line(text, name),
                    "name",
                    format!(
                        "{:?} is already the name of the compartment at line {}",
                        other.name, other.line
                    ),
                ));
            }
            if i == MAX_COMPARTMENTS {
                return Err(at.error(
                    header,
                    "compartment",
                    format!("more than {MAX_COMPARTMENTS} compartments"),
                ));
            }
            let own = fields(text, &at, raw)?;
            let compartment = merge(&at, name.get_ref(), header, own, &defaults)?;
            if let Some(port) = &compartment.serial {
                if let Some(other) = compartments
                    .iter()
                    .find(|c| c.serial.as_ref().is_some_and(|p| p.value == port.value))
                {
                    return Err(at.error(
                        port.line,
                        "serial",
                        format!(
                            "com{} is already the port of compartment {:?} (line {})",
                            port.value, other.name, other.line
                        ),
                    ));
                }
            }
            compartments.push(compartment);
        }
        let uplink = match &raw.uplink {
            Some(u) => Some(uplink(path, text, u, &compartments)?),
            None => None,
        };
        Ok(CompartmentFile {
            path: path.to_string(),
            root: root.to_path_buf(),
            memory,
            compartments,
            uplink,
        })
    }

    /// The QEMU arguments the file needs: with an uplink, an e1000 NIC on QEMU's user
    /// networking with the port forwards (bound to the host's loopback address).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args = match &self.uplink {
            Some(u) => {
                let mut nic = String::from("user,model=e1000");
                for (protocol, host, address, guest) in &u.forwards {
                    nic.push_str(&format!(
                        ",hostfwd={protocol}:127.0.0.1:{host}-{address}:{guest}"
                    ));
                }
                vec!["-nic".into(), nic]
            }
            None => Vec::new(),
        };
        // COM2..COM4 in order after COM1 (QEMU numbers its serial ports as they come): a
        // compartment's port is a Unix socket QEMU listens on, a port nobody has is null.
        let sockets = self.serial_sockets();
        let last = sockets.iter().map(|(_, port, _)| *port).max().unwrap_or(1);
        for n in 2..=last {
            match sockets.iter().find(|(_, port, _)| *port == n) {
                Some((_, _, path)) => {
                    args.push("-chardev".into());
                    args.push(format!(
                        "socket,id=com{n},path={},server=on,wait=off",
                        path.display()
                    ));
                    args.push("-serial".into());
                    args.push(format!("chardev:com{n}"));
                }
                None => {
                    args.push("-serial".into());
                    args.push("null".into());
                }
            }
        }
        args
    }

    /// The compartments with a serial port of their own: name, port (2..=4) and the Unix
    /// socket QEMU offers it on (`target/serial/FILE-NAME.sock`).
    pub fn serial_sockets(&self) -> Vec<(String, u8, PathBuf)> {
        let stem = Path::new(&self.path)
            .file_stem()
            .map_or("compartments".into(), |s| s.to_string_lossy().into_owned());
        self.compartments
            .iter()
            .filter_map(|c| {
                let port = c.serial.as_ref()?.value;
                let path = self
                    .root
                    .join("target/serial")
                    .join(format!("{stem}-{}.sock", c.name));
                Some((c.name.clone(), port, path))
            })
            .collect()
    }

    /// Its path as the user named it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The size of the disk image `input`, 0 if it cannot be read (which
    /// [`CompartmentFile::modules`] reports).
    fn image_size(&self, input: &Input) -> u64 {
        fs::metadata(self.root.join(&input.path)).map_or(0, |m| m.len())
    }

    /// The RAM budget of compartment `c`'s VMM (`ram=`), given its disk image's size.
    fn budget(c: &Compartment, image_size: u64) -> u64 {
        let disk = match &c.disk {
            Disk::None => 0,
            Disk::Blank(bytes) => *bytes,
            Disk::Image(_) => image_size,
        };
        c.memory + disk.next_multiple_of(RAM_GRANULE) + VMM_MARGIN
    }

    /// The RAM all compartments' VMMs may take.
    fn budgets(&self) -> u64 {
        self.compartments
            .iter()
            .map(|c| {
                let size = match &c.disk {
                    Disk::Image(input) => self.image_size(input),
                    _ => 0,
                };
                Self::budget(c, size)
            })
            .sum()
    }

    /// The machine's memory in bytes (QEMU `-m`): `[machine] memory`, or the compartments'
    /// RAM budgets plus 256 MiB, rounded up to 64 MiB.
    pub fn machine_memory(&self) -> u64 {
        match &self.memory {
            Some(m) => m.value,
            None => (self.budgets() + MACHINE_MARGIN).next_multiple_of(MACHINE_GRANULE),
        }
    }

    /// The machine's memory as QEMU's `-m` argument.
    pub fn machine_memory_text(&self) -> String {
        size_text(self.machine_memory())
    }

    /// What QEMU boots: our kernel with command line `cmdline`, the default sigma0 and
    /// [`CompartmentFile::modules`].
    pub fn boot(&self, cmdline: &str) -> Result<Boot, Error> {
        Ok(Boot::Multiboot {
            cmdline: cmdline.to_string(),
            sigma0: default_sigma0(),
            modules: self.modules()?,
        })
    }

    /// The boot modules after sigma0 and the root task (see the module documentation); an
    /// error if a file is missing or a command line or the module list is too long.
    pub fn modules(&self) -> Result<Vec<Module>, Error> {
        let at = |c: &Compartment| At {
            path: &self.path,
            table: format!("compartment {:?}", c.name),
        };
        // The distinct files: canonical path, module name, size.
        let mut files: Vec<(PathBuf, String, u64)> = Vec::new();
        let mut use_file = |c: &Compartment, input: &Input| -> Result<(String, u64), Error> {
            let full = self.root.join(&input.path);
            let canonical = fs::canonicalize(&full)
                .ok()
                .filter(|p| p.is_file())
                .ok_or_else(|| {
                    at(c).error(
                        input.line,
                        &format!("{}{}", input.field, input.origin),
                        format!("{}: no such file ({BUILD_HINT})", input.path.display()),
                    )
                })?;
            if let Some((_, name, size)) = files.iter().find(|f| f.0 == canonical) {
                return Ok((name.clone(), *size));
            }
            let size = fs::metadata(&canonical)
                .map_err(|e| at(c).error(input.line, input.field, e))?
                .len();
            let name = format!("f{}", files.len() + 1);
            files.push((canonical, name.clone(), size));
            Ok((name, size))
        };
        // Per compartment: the module names of its kernel (and the kernel decompressed),
        // initrd and disk image (with size).
        let mut uses = Vec::new();
        for c in &self.compartments {
            let mut kernel = vec![format!("blob=linux:{}", use_file(c, &c.kernel)?.0)];
            if let Some(input) = &c.vmlinux {
                kernel.push(format!("blob=vmlinux:{}", use_file(c, input)?.0));
            }
            let initrd = match &c.initrd {
                Some(input) => Some(use_file(c, input)?.0),
                None => None,
            };
            let image = match &c.disk {
                Disk::Image(input) => Some(use_file(c, input)?),
                _ => None,
            };
            uses.push((kernel, initrd, image));
        }

        // The console server and the VMM binary once each, the files once each, and the
        // launch list: every task and command line as a line (the kernel's boot modules and
        // their command lines are too few and too short for one module per compartment).
        let mut modules = vec![
            Module {
                name: "cons".into(),
                source: Source::Binary("cons".into()),
                args: vec!["cons".into(), "data".into()],
            },
            Module {
                name: "vmm".into(),
                source: Source::Binary("vmm".into()),
                args: vec!["vmm".into(), "data".into()],
            },
        ];
        if self.compartments.iter().any(|c| c.switch.is_some()) {
            modules.push(Module {
                name: "netsw".into(),
                source: Source::Binary("netsw".into()),
                args: vec!["netsw".into(), "data".into()],
            });
        }
        if self.uplink.is_some() {
            modules.push(Module {
                name: "uplink".into(),
                source: Source::Binary("uplink".into()),
                args: vec!["uplink".into(), "data".into()],
            });
        }
        for (path, name, _) in &files {
            modules.push(Module {
                name: name.clone(),
                source: Source::File(path.clone()),
                args: vec![name.clone(), "data".into()],
            });
        }
        let mut launch = String::from(LAUNCH_HEADER);
        // A gzip initrd is decompressed once by the root task (`inflate`), for every
        // compartment that boots it, instead of by each guest.
        let mut inflated: Vec<String> = Vec::new();
        for (_, initrd, _) in &uses {
            let Some(name) = initrd else { continue };
            let path = &files.iter().find(|f| &f.1 == name).expect("a used file").0;
            if !inflated.contains(name) && is_gzip(path) {
                launch.push_str(&format!("inflate {name}.cpio {name}\n"));
                inflated.push(name.clone());
            }
        }
        let mut console: Vec<String> = CONSOLE_ARGS.iter().map(|a| a.to_string()).collect();
        console.extend(
            self.compartments
                .iter()
                .map(|c| format!("client={}", c.name)),
        );
        for c in &self.compartments {
            if let Some(port) = &c.serial {
                let base = SERIAL_PORTS[usize::from(port.value) - 2];
                console.push(format!("io={base:#x}/3"));
                console.push(format!("serial={}@{base:#x}", c.name));
            }
        }
        let mut tasks = vec![("cons", console, None)];
        // One switch task per switch name, in the order of first use: its ports and the RAM
        // for their rings (2 MiB each).
        let mut switches: Vec<(&str, Vec<String>)> = Vec::new();
        for c in &self.compartments {
            if let Some(switch) = &c.switch {
                match switches.iter_mut().find(|(name, _)| name == switch) {
                    Some((_, ports)) => ports.push(c.name.clone()),
                    None => switches.push((switch, vec![c.name.clone()])),
                }
            }
        }
        if let Some(u) = &self.uplink {
            if let Some((_, ports)) = switches.iter_mut().find(|(name, _)| *name == u.switch) {
                ports.push("uplink".into());
            }
        }
        for (switch, ports) in &switches {
            let mut args = vec![
                format!("sw.{switch}"),
                "service".into(),
                format!("ram={}M", ports.len() * 2),
            ];
            args.extend(ports.iter().map(|p| format!("port={p}")));
            tasks.push(("netsw", args, None));
        }
        if let Some(u) = &self.uplink {
            tasks.push((
                "uplink",
                vec![
                    "uplink".into(),
                    "service".into(),
                    "io=0xcf8/3".into(),
                    "device-memory".into(),
                    "dma=2M".into(),
                    format!("irq={UPLINK_IRQ}"),
                    format!("net=sw.{}", u.switch),
                ],
                None,
            ));
        }
        if self.compartments.iter().any(|c| c.monitor.is_some()) {
            modules.push(Module {
                name: "sysmon".into(),
                source: Source::Binary("sysmon".into()),
                args: vec!["sysmon".into(), "data".into()],
            });
        }
        // A syscall monitor per compartment in the L4Linux mode, with its policy.
        for c in &self.compartments {
            if let Some(policy) = &c.monitor {
                let mut args = vec![
                    format!("mon.{}", c.name),
                    "service".into(),
                    format!("client={}", c.name),
                ];
                args.extend(policy.iter().cloned());
                tasks.push(("sysmon", args, Some(c)));
            }
        }
        let mut budgets = 0;
        for (c, (kernel, initrd, image)) in self.compartments.iter().zip(uses) {
            let cmdline_module = format!("{}.cmdline", c.name);
            launch.push_str(&format!("text {cmdline_module} {}\n", c.linux_cmdline()));
            let budget = Self::budget(c, image.as_ref().map_or(0, |i| i.1));
            budgets += budget;
            let mut args = vec![c.name.clone(), "factory=8M".into()];
            args.extend(kernel);
            if let Some(initrd) = initrd {
                if inflated.contains(&initrd) {
                    // The compressed one too, for a guest too small for the other.
                    args.push(format!("blob=initrd:{initrd}.cpio"));
                    args.push(format!("blob=initrd.gz:{initrd}"));
                } else {
                    args.push(format!("blob=initrd:{initrd}"));
                }
            }
            args.push(format!("blob=cmdline:{cmdline_module}"));
            if let Some((image, _)) = &image {
                args.push(format!("blob=disk:{image}"));
            }
            args.push("linux".into());
            args.push(format!("name={}", c.name));
            args.push(format!("mem={}", size_text(c.memory)));
            if let Disk::Blank(bytes) = c.disk {
                args.push(format!("disk={}", size_text(bytes)));
            }
            args.push(format!("ram={}M", budget >> 20));
            args.extend(c.vmm_options.iter().cloned());
            args.push("console=cons".into());
            if c.monitor.is_some() {
                args.push("syscalls=l4".into());
                args.push(format!("monitor=mon.{}", c.name));
            }
            if let Some(switch) = &c.switch {
                args.push(format!("net=sw.{switch}"));
            }
            if let Some(restarts) = c.restarts {
                args.push(format!("restart={restarts}"));
            }
            if let Some(priority) = c.priority {
                args.push(format!("priority={priority}"));
            }
            if let Some(ms) = c.timeslice_ms {
                args.push(format!("timeslice={ms}"));
            }
            tasks.push(("vmm", args, Some(c)));
        }
        let last = self.compartments.last().expect("checked when parsed");
        for (program, args, owner) in &tasks {
            let blobs = args.iter().filter(|a| a.starts_with("blob=")).count();
            let length = args.join(" ").len();
            if length + blobs * BLOB_ANNOUNCEMENT >= TASK_ARGUMENTS {
                let owner = owner.unwrap_or(last);
                return Err(at(owner).error(
                    owner.line,
                    "compartment",
                    format!(
                        "the arguments of task {} ({length} bytes, and {BLOB_ANNOUNCEMENT} per \
                         blob that the root task adds) would not fit in a task's {TASK_ARGUMENTS}",
                        args[0]
                    ),
                ));
            }
            launch.push_str(&format!(
                "task {} {program} {}\n",
                args[0],
                args[1..].join(" ")
            ));
        }
        modules.push(Module {
            name: "launch".into(),
            source: Source::Text(launch),
            args: vec!["launch".into(), "data".into()],
        });
        // sigma0 and the root task come first.
        if modules.len() + 2 > l4_abi::KIP_MAX_MODULES {
            return Err(at(last).error(
                last.line,
                "compartment",
                format!(
                    "the boot would have {} modules (sigma0, the root task, the console \
                     server, the VMM, {} files and the launch list), more than the kernel's {}",
                    modules.len() + 2,
                    files.len(),
                    l4_abi::KIP_MAX_MODULES
                ),
            ));
        }
        if let Some(memory) = &self.memory {
            if memory.value < budgets {
                return Err(Error(format!(
                    "{}:{}: machine: memory: {} is less than the {} the compartments take \
                     (memory + disk + 16M each)",
                    self.path,
                    memory.line,
                    size_text(memory.value),
                    size_text(budgets)
                )));
            }
        }
        Ok(modules)
    }
}

impl Compartment {
    /// Its Linux command line: the default for its console, `l4.name=NAME`, then `cmdline`.
    fn linux_cmdline(&self) -> String {
        let base = match self.console {
            Console::Hvc0 => HVC0_CMDLINE,
            Console::TtyS0 => TTYS0_CMDLINE,
        };
        let mut line = format!("{base} l4.name={}", self.name);
        if let Some(ip) = &self.ip {
            line.push_str(&format!(" l4.ip={ip}"));
        }
        if let Some(service) = &self.service {
            line.push_str(&format!(" l4.service={service}"));
        }
        if !self.cmdline.is_empty() {
            line.push(' ');
            line.push_str(&self.cmdline);
        }
        line
    }
}

/// A compartment name: `[a-z][a-z0-9-]{0,15}`, not one the image uses itself.
/// Whether `name` is 1 to 16 lower-case letters, digits and `-`, a letter first (compartment
/// and switch names).
fn well_formed(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.len() <= 16
}

fn check_name(at: &At, line: usize, name: &str) -> Result<(), Error> {
    if !well_formed(name) {
        return Err(at.error(
            line,
            "name",
            format!("{name:?}: give 1 to 16 lower-case letters, digits and `-`, a letter first"),
        ));
    }
    let module_like =
        name.len() > 1 && name.starts_with('f') && name[1..].chars().all(|c| c.is_ascii_digit());
    if RESERVED_NAMES.contains(&name) || module_like {
        return Err(at.error(
            line,
            "name",
            format!("{name:?} is taken by the image itself (cons, root, sigma0, kernel, vmm, f<digits>)"),
        ));
    }
    Ok(())
}

/// The interrupt line of the uplink's e1000: QEMU's PC puts the first `-nic` at PCI slot 3,
/// whose INTA# the firmware routes to IRQ 11 (the driver checks the line in its PCI
/// configuration and polls if it differs).
const UPLINK_IRQ: u32 = 11;

/// Checks `[uplink]`: a switch that compartments use, and well-formed forwards.
fn uplink(
    path: &str,
    text: &str,
    raw: &Spanned<RawUplink>,
    compartments: &[Compartment],
) -> Result<Uplink, Error> {
    let at = At {
        path,
        table: "uplink".into(),
    };
    let u = raw.get_ref();
    let switch = u.switch.get_ref();
    if !compartments
        .iter()
        .any(|c| c.switch.as_deref() == Some(switch))
    {
        return Err(at.error(
            line(text, &u.switch),
            "switch",
            format!("{switch:?}: no compartment has a port on it"),
        ));
    }
    let mut forwards = Vec::new();
    for f in &u.forward {
        let parts: Vec<&str> = f.get_ref().split(':').collect();
        let parsed = match parts.as_slice() {
            ["tcp", host, address, guest] => (|| {
                Some((
                    "tcp".to_string(),
                    host.parse::<u16>().ok().filter(|&p| p > 0)?,
                    address.parse::<std::net::Ipv4Addr>().ok()?,
                    guest.parse::<u16>().ok().filter(|&p| p > 0)?,
                ))
            })(),
            _ => None,
        };
        let Some(forward) = parsed else {
            return Err(at.error(
                line(text, f),
                "forward",
                format!(
                    "{:?}: give \"tcp:HOST_PORT:GUEST_ADDRESS:GUEST_PORT\", e.g. \"tcp:8080:10.0.2.15:80\"",
                    f.get_ref()
                ),
            ));
        };
        forwards.push(forward);
    }
    Ok(Uplink {
        switch: switch.clone(),
        forwards,
    })
}

/// Whether `option` can be one word of a launch-list line.
fn argument_safe(option: &str) -> bool {
    !option.is_empty() && !option.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Checks each field of one table on its own (`name` aside).
fn fields(text: &str, at: &At, raw: &RawFields) -> Result<Fields, Error> {
    let mut out = Fields::default();
    if let Some(m) = &raw.memory {
        let bytes = parse_size(m.get_ref()).ok_or_else(|| {
            at.error(
                line(text, m),
                "memory",
                format!("{:?} is not a size, e.g. 128M", m.get_ref()),
            )
        })?;
        if bytes > MAX_SIZE {
            return Err(at.error(
                line(text, m),
                "memory",
                format!("{:?} is more than 1T", m.get_ref()),
            ));
        }
        if bytes < MIN_MEMORY || !bytes.is_power_of_two() {
            return Err(at.error(
                line(text, m),
                "memory",
                format!("{:?} is not a power of two >= 16M", m.get_ref()),
            ));
        }
        out.memory = Some(Located {
            value: bytes,
            line: line(text, m),
        });
    }
    let path = |field: &str, value: &Spanned<String>| -> Result<Located<PathBuf>, Error> {
        if value.get_ref().is_empty() {
            return Err(at.error(line(text, value), field, "is empty; give a path"));
        }
        Ok(Located {
            value: PathBuf::from(value.get_ref()),
            line: line(text, value),
        })
    };
    if let Some(k) = &raw.kernel {
        out.kernel = Some(path("kernel", k)?);
    }
    for (field, raw, out) in [
        ("initrd", &raw.initrd, &mut out.initrd),
        ("vmlinux", &raw.vmlinux, &mut out.vmlinux),
    ] {
        if let Some(i) = raw {
            *out = Some(if i.get_ref().is_empty() {
                Located {
                    value: None,
                    line: line(text, i),
                }
            } else {
                let p = path(field, i)?;
                Located {
                    value: Some(p.value),
                    line: p.line,
                }
            });
        }
    }
    if let Some(c) = &raw.cmdline {
        if let Some(bad) = c.get_ref().chars().find(|c| c.is_control()) {
            return Err(at.error(
                line(text, c),
                "cmdline",
                format!("contains {bad:?}; give one line"),
            ));
        }
        out.cmdline = Some(Located {
            value: c.get_ref().trim().to_string(),
            line: line(text, c),
        });
    }
    if let Some(c) = &raw.console {
        let console = match c.get_ref().as_str() {
            "hvc0" => Console::Hvc0,
            "ttyS0" => Console::TtyS0,
            other => {
                return Err(at.error(
                    line(text, c),
                    "console",
                    format!("{other:?} is not a console; give \"hvc0\" or \"ttyS0\""),
                ))
            }
        };
        out.console = Some(Located {
            value: console,
            line: line(text, c),
        });
    }
    match (&raw.disk, &raw.disk_image) {
        (Some(_), Some(image)) => {
            return Err(at.error(
                line(text, image),
                "disk_image",
                "give either `disk` (a blank disk) or `disk_image`, not both",
            ))
        }
        (Some(d), None) => {
            let bytes = parse_size(d.get_ref())
                .filter(|b| (SECTOR..=MAX_SIZE).contains(b) && b.is_multiple_of(SECTOR))
                .ok_or_else(|| {
                    at.error(
                        line(text, d),
                        "disk",
                        format!(
                            "{:?} is not a size of whole 512-byte sectors up to 1T, e.g. 16M",
                            d.get_ref()
                        ),
                    )
                })?;
            out.disk = Some(Located {
                value: Disk::Blank(bytes),
                line: line(text, d),
            });
        }
        (None, Some(image)) => {
            let p = path("disk_image", image)?;
            out.disk = Some(Located {
                value: Disk::Image(Input {
                    path: p.value,
                    field: "disk_image",
                    line: p.line,
                    origin: "",
                }),
                line: p.line,
            });
        }
        (None, None) => {}
    }
    if let Some(p) = &raw.priority {
        let value = *p.get_ref();
        if !(0..=MAX_PRIORITY).contains(&value) {
            return Err(at.error(
                line(text, p),
                "priority",
                format!(
                    "{value} is out of range 0..={MAX_PRIORITY} (a thread gets at most the \
                     priority of the one that sets it, and the root task runs at 100)"
                ),
            ));
        }
        out.priority = Some(Located {
            value: value as u8,
            line: line(text, p),
        });
    }
    if let Some(t) = &raw.timeslice_ms {
        let value = *t.get_ref();
        if !(1..=1000).contains(&value) {
            return Err(at.error(
                line(text, t),
                "timeslice_ms",
                format!("{value} is out of range 1..=1000"),
            ));
        }
        out.timeslice_ms = Some(Located {
            value: value as u16,
            line: line(text, t),
        });
    }
    if let Some(w) = &raw.switch {
        let name = w.get_ref();
        if !well_formed(name) {
            return Err(at.error(
                line(text, w),
                "switch",
                format!(
                    "{name:?}: give 1 to 16 lower-case letters, digits and `-`, a letter first"
                ),
            ));
        }
        out.switch = Some(Located {
            value: name.clone(),
            line: line(text, w),
        });
    }
    if let Some(a) = &raw.ip {
        let text_ip = a.get_ref();
        let valid = text_ip.split_once('/').is_some_and(|(address, prefix)| {
            address.parse::<std::net::Ipv4Addr>().is_ok()
                && prefix.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
        });
        if !valid {
            return Err(at.error(
                line(text, a),
                "ip",
                format!("{text_ip:?}: give an IPv4 address and prefix, e.g. \"10.0.0.1/24\""),
            ));
        }
        out.ip = Some(Located {
            value: text_ip.clone(),
            line: line(text, a),
        });
    }
    if let Some(s) = &raw.service {
        let name = s.get_ref();
        if !SERVICES.contains(&name.as_str()) {
            return Err(at.error(
                line(text, s),
                "service",
                format!("{name:?}: give one of {SERVICES:?} (initramfs/services/)"),
            ));
        }
        out.service = Some(Located {
            value: name.clone(),
            line: line(text, s),
        });
    }
    if let Some(p) = &raw.serial {
        let port = match p.get_ref().as_str() {
            "com2" => 2,
            "com3" => 3,
            "com4" => 4,
            other => {
                let problem = format!("{other:?}: give \"com2\", \"com3\" or \"com4\"");
                return Err(at.error(
                    line(text, p),
                    "serial",
                    problem + " (COM1 is the shared console)",
                ));
            }
        };
        out.serial = Some(Located {
            value: port,
            line: line(text, p),
        });
    }
    if let Some(o) = &raw.vmm_options {
        if let Some(bad) = o
            .get_ref()
            .iter()
            .find(|v| !VMM_OPTIONS.contains(&v.as_str()))
        {
            return Err(at.error(
                line(text, o),
                "vmm_options",
                format!("{bad:?} is not one of {VMM_OPTIONS:?}"),
            ));
        }
        out.vmm_options = Some(Located {
            value: o.get_ref().clone(),
            line: line(text, o),
        });
    }
    if let Some(m) = &raw.syscalls {
        let l4 = match m.get_ref().as_str() {
            "guest" => false,
            "l4" => true,
            other => {
                return Err(at.error(
                    line(text, m),
                    "syscalls",
                    format!("{other:?}: give \"guest\" or \"l4\""),
                ))
            }
        };
        out.l4_syscalls = Some(Located {
            value: l4,
            line: line(text, m),
        });
    }
    if let Some(p) = &raw.syscall_policy {
        if let Some(bad) = p.get_ref().iter().find(|o| !argument_safe(o)) {
            return Err(at.error(
                line(text, p),
                "syscall_policy",
                format!("{bad:?}: an option must be non-empty, without whitespace"),
            ));
        }
        if let Err(e) = l4linux_glue::syscall_monitor::Policy::parse(
            p.get_ref().iter().map(|o| o.as_str()),
            true,
        ) {
            return Err(at.error(line(text, p), "syscall_policy", e));
        }
        out.syscall_policy = Some(Located {
            value: p.get_ref().clone(),
            line: line(text, p),
        });
    }
    if let Some(r) = &raw.restart {
        let on_failure = match r.get_ref().as_str() {
            "never" => false,
            "on-failure" => true,
            other => {
                return Err(at.error(
                    line(text, r),
                    "restart",
                    format!("{other:?}: give \"never\" or \"on-failure\""),
                ))
            }
        };
        out.on_failure = Some(Located {
            value: on_failure,
            line: line(text, r),
        });
    }
    if let Some(r) = &raw.restarts {
        let value = *r.get_ref();
        if !(1..=MAX_RESTARTS).contains(&value) {
            return Err(at.error(
                line(text, r),
                "restarts",
                format!("{value} is out of range 1..={MAX_RESTARTS}"),
            ));
        }
        out.restarts = Some(Located {
            value: value as u32,
            line: line(text, r),
        });
    }
    Ok(out)
}

/// Compartment `name` (header on line `header`): its own fields, else `[defaults]`', else
/// the built-in defaults; checks what depends on both.
fn merge(
    at: &At,
    name: &str,
    header: usize,
    own: Fields,
    defaults: &Fields,
) -> Result<Compartment, Error> {
    const OWN: &str = "";
    const DEFAULTS: &str = " (from [defaults])";
    const BUILT_IN: &str = " (the default)";
    fn pick<'a, T>(
        own: &'a Option<Located<T>>,
        defaults: &'a Option<Located<T>>,
    ) -> Option<(&'a Located<T>, &'static str)> {
        own.as_ref()
            .map(|v| (v, OWN))
            .or_else(|| defaults.as_ref().map(|v| (v, DEFAULTS)))
    }
    let on_failure = pick(&own.on_failure, &defaults.on_failure).is_some_and(|(r, _)| r.value);
    if let Some(restarts) = &own.restarts {
        if !on_failure {
            return Err(at.error(
                restarts.line,
                "restarts",
                "only with restart = \"on-failure\"",
            ));
        }
    }
    let kernel = match pick(&own.kernel, &defaults.kernel) {
        Some((k, origin)) => Input {
            path: k.value.clone(),
            field: "kernel",
            line: k.line,
            origin,
        },
        None => Input {
            path: DEFAULT_KERNEL.into(),
            field: "kernel",
            line: header,
            origin: BUILT_IN,
        },
    };
    let vmlinux = match pick(&own.vmlinux, &defaults.vmlinux) {
        Some((v, origin)) => v.value.clone().map(|path| Input {
            path,
            field: "vmlinux",
            line: v.line,
            origin,
        }),
        // The default kernel's own, another kernel none.
        None => (kernel.origin == BUILT_IN).then(|| Input {
            path: DEFAULT_VMLINUX.into(),
            field: "vmlinux",
            line: header,
            origin: BUILT_IN,
        }),
    };
    let initrd = match pick(&own.initrd, &defaults.initrd) {
        Some((i, origin)) => i.value.clone().map(|path| Input {
            path,
            field: "initrd",
            line: i.line,
            origin,
        }),
        None => Some(Input {
            path: DEFAULT_INITRD.into(),
            field: "initrd",
            line: header,
            origin: BUILT_IN,
        }),
    };
    let disk = match pick(&own.disk, &defaults.disk) {
        Some((d, origin)) => match &d.value {
            Disk::Image(input) => Disk::Image(Input {
                origin,
                ..input.clone()
            }),
            other => other.clone(),
        },
        None => Disk::None,
    };
    let cmdline =
        pick(&own.cmdline, &defaults.cmdline).map_or(String::new(), |(c, _)| c.value.clone());
    let console = pick(&own.console, &defaults.console).map_or(Console::Hvc0, |(c, _)| c.value);
    let compartment = Compartment {
        name: name.to_string(),
        line: header,
        memory: pick(&own.memory, &defaults.memory).map_or(DEFAULT_MEMORY, |(m, _)| m.value),
        kernel,
        vmlinux,
        initrd,
        cmdline,
        console,
        disk,
        priority: pick(&own.priority, &defaults.priority).map(|(p, _)| p.value),
        timeslice_ms: pick(&own.timeslice_ms, &defaults.timeslice_ms).map(|(t, _)| t.value),
        restarts: on_failure.then(|| {
            pick(&own.restarts, &defaults.restarts)
                .map_or(DEFAULT_RESTARTS as u32, |(r, _)| r.value)
        }),
        vmm_options: pick(&own.vmm_options, &defaults.vmm_options)
            .map_or(Vec::new(), |(o, _)| o.value.clone()),
        switch: pick(&own.switch, &defaults.switch).map(|(w, _)| w.value.clone()),
        ip: own.ip.as_ref().map(|a| a.value.clone()),
        service: pick(&own.service, &defaults.service).map(|(s, _)| s.value.clone()),
        serial: own.serial.clone(),
        monitor: None,
    };
    let l4 = pick(&own.l4_syscalls, &defaults.l4_syscalls).is_some_and(|(m, _)| m.value);
    let policy = pick(&own.syscall_policy, &defaults.syscall_policy);
    if let (Some((p, _)), false) = (policy, l4) {
        return Err(at.error(
            p.line,
            "syscall_policy",
            "only with syscalls = \"l4\" (the policy is the syscall monitor's)",
        ));
    }
    let compartment = Compartment {
        monitor: l4.then(|| policy.map_or(Vec::new(), |(p, _)| p.value.clone())),
        ..compartment
    };
    if let (Some(a), None) = (&own.ip, &compartment.switch) {
        return Err(at.error(a.line, "ip", "needs a `switch` for the port"));
    }
    let length = compartment.linux_cmdline().len();
    if length > MAX_LINUX_CMDLINE {
        let line = pick(&own.cmdline, &defaults.cmdline).map_or(header, |(c, _)| c.line);
        return Err(at.error(
            line,
            "cmdline",
            format!(
                "the Linux command line would be {length} bytes, more than {MAX_LINUX_CMDLINE}"
            ),
        ));
    }
    Ok(compartment)
}

/// A `toml` error as `PATH:LINE: TABLE: FIELD: MESSAGE` (the table and field when known).
fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> Error {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return Error(format!("{path}: {message}"));
    };
    let line = line_of(text, span.start);
    let mut out = format!("{path}:{line}: ");
    if let Some(table) = table_at(text, line) {
        out.push_str(&table);
        out.push_str(": ");
    }
    // The key on the error's line, unless the message names it already.
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    if let Some((key, _)) = line_text.split_once('=') {
        let key = key.trim().trim_matches('"');
        if !key.is_empty() && !key.starts_with('[') && !message.contains(&format!("`{key}`")) {
            out.push_str(key);
            out.push_str(": ");
        }
    }
    out.push_str(message);
    Error(out)
}

/// The table line `line` is in: `machine`, `defaults`, `compartment "NAME"` or `compartment
/// N`; `None` before any or in another.
fn table_at(text: &str, line: usize) -> Option<String> {
    let headers: Vec<(usize, String)> = text
        .lines()
        .take(line)
        .enumerate()
        .filter_map(|(i, l)| {
            let l = l.trim_start();
            l.starts_with('[').then(|| {
                let header: String = l
                    .split('#')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                (i, header)
            })
        })
        .collect();
    let (_, header) = headers.last()?;
    match header.as_str() {
        "[machine]" => Some("machine".into()),
        "[defaults]" => Some("defaults".into()),
        "[[compartment]]" => {
            let n = headers
                .iter()
                .filter(|(_, h)| h == "[[compartment]]")
                .count();
            // Its name, if the file is valid TOML and the table gives one.
            let name = toml::from_str::<toml::Table>(text).ok().and_then(|t| {
                t.get("compartment")?
                    .as_array()?
                    .get(n - 1)?
                    .get("name")?
                    .as_str()
                    .map(String::from)
            });
            Some(match name {
                Some(name) => format!("compartment {name:?}"),
                None => format!("compartment {n}"),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary one with `files` (path, size in bytes),
    /// as the repository the compartment files' paths are relative to.
    fn repository(test: &str, files: &[(&str, usize)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xtask-compartments-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (file, size) in files {
            let path = dir.join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, vec![0u8; *size]).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    /// A repository with the default kernel (and its vmlinux) and initramfs.
    fn with_linux(test: &str) -> PathBuf {
        repository(
            test,
            &[
                (DEFAULT_KERNEL, 4096),
                (DEFAULT_VMLINUX, 4096),
                (DEFAULT_INITRD, 4096),
            ],
        )
    }

    fn parse(text: &str) -> Result<CompartmentFile, Error> {
        CompartmentFile::parse("x.toml", text, Path::new("/nonexistent"))
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.0,
        }
    }

    /// The modules of `text` with its paths relative to `root`.
    fn modules(text: &str, root: &Path) -> Result<Vec<Module>, Error> {
        CompartmentFile::parse("x.toml", text, root)?.modules()
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    /// The launch list of `modules`.
    fn launch(modules: &[Module]) -> &str {
        match &modules.last().unwrap().source {
            Source::Text(text) if modules.last().unwrap().name == "launch" => text,
            _ => panic!("no launch list last"),
        }
    }

    /// The content of text `name` in the launch list of `modules`.
    fn launch_text(modules: &[Module], name: &str) -> String {
        let prefix = format!("text {name} ");
        launch(modules)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap()
            .to_string()
    }

    /// The VMM task of compartment `name`, as a module with its arguments.
    fn vmm(modules: &[Module], name: &str) -> Module {
        let line = launch(modules)
            .lines()
            .find(|l| l.starts_with(&format!("task {name} vmm ")))
            .unwrap();
        let mut words = line.split(' ').skip(1);
        let name = words.next().unwrap().to_string();
        words.next();
        Module {
            name: "vmm".into(),
            source: Source::Binary("vmm".into()),
            args: std::iter::once(name)
                .chain(words.map(String::from))
                .collect(),
        }
    }

    const ONE: &str = "[[compartment]]\nname = \"a\"\n";

    #[test]
    fn a_gzip_initrd_is_decompressed_once_by_the_root_task() {
        let root = with_linux("gzip-initrd");
        fs::write(
            root.join(DEFAULT_INITRD),
            [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3],
        )
        .unwrap();
        let two = "[[compartment]]\nname = \"a\"\n[[compartment]]\nname = \"b\"\n";
        let file = CompartmentFile::parse("two.toml", two, &root).unwrap();
        let modules = file.modules().unwrap();
        let launch = modules.iter().find(|m| m.name == "launch").unwrap();
        let Source::Text(text) = &launch.source else {
            panic!("the launch list is a text");
        };
        let initrd = modules
            .iter()
            .find(|m| m.source == Source::File(root.join(DEFAULT_INITRD)))
            .unwrap();
        let inflate = format!("inflate {0}.cpio {0}\n", initrd.name);
        assert_eq!(text.matches(&inflate).count(), 1, "{text}");
        assert!(
            text.starts_with(&format!("{LAUNCH_HEADER}{inflate}")),
            "{text}"
        );
        let blob = format!("blob=initrd:{0}.cpio blob=initrd.gz:{0} ", initrd.name);
        assert_eq!(text.matches(&blob).count(), 2, "{text}");
        // Not gzip (the other tests' files): no inflate line, the file itself.
        fs::write(root.join(DEFAULT_INITRD), [0u8; 16]).unwrap();
        let file = CompartmentFile::parse("two.toml", two, &root).unwrap();
        let modules = file.modules().unwrap();
        let Source::Text(text) = &modules.iter().find(|m| m.name == "launch").unwrap().source
        else {
            panic!("the launch list is a text");
        };
        assert!(!text.contains("inflate "), "{text}");
    }

    #[test]
    fn the_default_file_becomes_these_modules() {
        let root = with_linux("default");
        let file = CompartmentFile::parse(
            "scenarios/default.toml",
            include_str!("../../scenarios/default.toml"),
            &root,
        )
        .unwrap();
        let data = |n: &str| args(&[n, "data"]);
        let expected = vec![
            Module {
                name: "cons".into(),
                source: Source::Binary("cons".into()),
                args: data("cons"),
            },
            Module {
                name: "vmm".into(),
                source: Source::Binary("vmm".into()),
                args: data("vmm"),
            },
            Module {
                name: "netsw".into(),
                source: Source::Binary("netsw".into()),
                args: data("netsw"),
            },
            Module {
                name: "f1".into(),
                source: Source::File(root.join("target/linux/bzImage")),
                args: data("f1"),
            },
            Module {
                name: "f2".into(),
                source: Source::File(root.join("target/linux/vmlinux")),
                args: data("f2"),
            },
            Module {
                name: "f3".into(),
                source: Source::File(root.join("target/linux/initramfs.cpio.gz")),
                args: data("f3"),
            },
            Module {
                name: "launch".into(),
                source: Source::Text(
                    [
                        LAUNCH_HEADER,
                        "text alpha.cmdline console=hvc0 quiet earlycon=uart8250,io,0x3f8 \
                         panic=-1 printk.time=1 l4.name=alpha l4.ip=10.0.0.1/24\n",
                        "text beta.cmdline console=hvc0 quiet earlycon=uart8250,io,0x3f8 \
                         panic=-1 printk.time=1 l4.name=beta l4.ip=10.0.0.2/24\n",
                        "task cons cons service io=0x3f8/3 irq=4 client=alpha client=beta\n",
                        "task sw.lan netsw service ram=4M port=alpha port=beta\n",
                        "task alpha vmm factory=8M blob=linux:f1 blob=vmlinux:f2 blob=initrd:f3 \
                         blob=cmdline:alpha.cmdline linux name=alpha mem=128M disk=16M \
                         ram=160M console=cons net=sw.lan\n",
                        "task beta vmm factory=8M blob=linux:f1 blob=vmlinux:f2 blob=initrd:f3 \
                         blob=cmdline:beta.cmdline linux name=beta mem=128M ram=144M \
                         console=cons net=sw.lan\n",
                    ]
                    .concat(),
                ),
                args: data("launch"),
            },
        ];
        assert_eq!(file.modules().unwrap(), expected);
        // (128M + 16M + 16M) + (128M + 16M) + 256M = 560M, rounded up to 576M.
        assert_eq!(file.machine_memory_text(), "576M");
        let Boot::Multiboot {
            cmdline,
            sigma0,
            modules,
        } = file.boot("").unwrap()
        else {
            panic!("not multiboot");
        };
        assert_eq!(cmdline, "");
        assert_eq!(sigma0, default_sigma0());
        assert_eq!(modules, expected);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_trio_file_has_a_serial_console_restarts_and_a_cmdline() {
        let root = with_linux("trio");
        let file = CompartmentFile::parse(
            "scenarios/trio.toml",
            include_str!("../../scenarios/trio.toml"),
            &root,
        )
        .unwrap();
        let modules = file.modules().unwrap();
        let text = |name: &str| launch_text(&modules, name);
        assert_eq!(
            text("gamma.cmdline"),
            "console=ttyS0 quiet panic=-1 l4.name=gamma"
        );
        assert!(text("epsilon.cmdline").ends_with(" l4.name=epsilon loglevel=4"));
        let delta = &vmm(&modules, "delta").args;
        assert!(delta.contains(&"restart=2".to_string()), "{delta:?}");
        assert!(delta.contains(&"mem=64M".to_string()), "{delta:?}");
        assert!(delta.contains(&"ram=80M".to_string()), "{delta:?}");
        assert!(!vmm(&modules, "gamma")
            .args
            .iter()
            .any(|a| a.starts_with("restart=")));
        assert!(vmm(&modules, "epsilon")
            .args
            .contains(&"mem=128M".to_string()));
        // 80M + 80M + 144M + 256M = 560M, rounded up to 576M.
        assert_eq!(file.machine_memory_text(), "576M");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn files_are_shared_by_canonical_path_in_the_order_of_first_use() {
        let root = repository(
            "dedup",
            &[
                ("k1", 100),
                ("k2", 100),
                ("sub/i", 100),
                ("disk.img", (3 << 20) + 1),
            ],
        );
        let text = "[[compartment]]\nname = \"a\"\nkernel = \"k1\"\ninitrd = \"sub/i\"\n\
                    [[compartment]]\nname = \"b\"\nkernel = \"sub/../k1\"\ninitrd = \"\"\n\
                    disk_image = \"disk.img\"\n\
                    [[compartment]]\nname = \"c\"\nkernel = \"k2\"\ninitrd = \"./sub/i\"\n\
                    disk_image = \"./disk.img\"\n";
        let modules = modules(text, &root).unwrap();
        let files: Vec<(&str, &Source)> = modules
            .iter()
            .filter(|m| m.args.get(1).map(String::as_str) == Some("data"))
            .filter(|m| matches!(m.source, Source::File(_)))
            .map(|m| (m.name.as_str(), &m.source))
            .collect();
        let file = |p: &str| Source::File(root.join(p));
        assert_eq!(
            files,
            [
                ("f1", &file("k1")),
                ("f2", &file("sub/i")),
                ("f3", &file("disk.img")),
                ("f4", &file("k2")),
            ]
        );
        let b = &vmm(&modules, "b").args;
        assert_eq!(
            b[..5],
            args(&[
                "b",
                "factory=8M",
                "blob=linux:f1",
                "blob=cmdline:b.cmdline",
                "blob=disk:f3"
            ])
        );
        // The image's 3 MiB and a byte are rounded up to 4 MiB; no `disk=` for an image.
        assert!(b.contains(&"ram=148M".to_string()), "{b:?}");
        assert!(!b.iter().any(|a| a.starts_with("disk=")), "{b:?}");
        let c = &vmm(&modules, "c").args;
        assert!(c.contains(&"blob=linux:f4".to_string()), "{c:?}");
        assert!(c.contains(&"blob=initrd:f2".to_string()), "{c:?}");
        assert!(c.contains(&"blob=disk:f3".to_string()), "{c:?}");
        // The image counts in the machine's memory too: 144M + 148M + 148M + 256M = 696M,
        // rounded up to 704M.
        let parsed = CompartmentFile::parse("x.toml", text, &root).unwrap();
        assert_eq!(parsed.machine_memory_text(), "704M");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let root = repository("defaults", &[("k", 10), ("i", 10), ("j", 10)]);
        let text = "[defaults]\nkernel = \"k\"\ninitrd = \"i\"\nmemory = \"256M\"\n\
                    console = \"ttyS0\"\ncmdline = \"debug\"\npriority = 50\n\
                    restart = \"on-failure\"\nrestarts = 7\ndisk = \"1M\"\n\
                    [[compartment]]\nname = \"a\"\n\
                    [[compartment]]\nname = \"b\"\nmemory = \"32M\"\ninitrd = \"j\"\n\
                    console = \"hvc0\"\ncmdline = \"\"\npriority = 10\nrestarts = 1\n\
                    disk_image = \"k\"\n\
                    [[compartment]]\nname = \"c\"\ninitrd = \"\"\nrestart = \"never\"\n";
        let modules = modules(text, &root).unwrap();
        assert_eq!(
            vmm(&modules, "a").args,
            args(&[
                "a",
                "factory=8M",
                "blob=linux:f1",
                "blob=initrd:f2",
                "blob=cmdline:a.cmdline",
                "linux",
                "name=a",
                "mem=256M",
                "disk=1M",
                "ram=274M",
                "console=cons",
                "restart=7",
                "priority=50",
            ])
        );
        assert_eq!(
            vmm(&modules, "b").args,
            args(&[
                "b",
                "factory=8M",
                "blob=linux:f1",
                "blob=initrd:f3",
                "blob=cmdline:b.cmdline",
                "blob=disk:f1",
                "linux",
                "name=b",
                "mem=32M",
                "ram=50M",
                "console=cons",
                "restart=1",
                "priority=10",
            ])
        );
        // c: no initrd, and `restart = "never"` drops the inherited restarts.
        assert_eq!(
            vmm(&modules, "c").args,
            args(&[
                "c",
                "factory=8M",
                "blob=linux:f1",
                "blob=cmdline:c.cmdline",
                "linux",
                "name=c",
                "mem=256M",
                "disk=1M",
                "ram=274M",
                "console=cons",
                "priority=50",
            ])
        );
        let text_of = |name: &str| Source::Text(launch_text(&modules, name));
        assert_eq!(
            text_of("a.cmdline"),
            Source::Text("console=ttyS0 quiet panic=-1 l4.name=a debug".into())
        );
        assert_eq!(
            text_of("b.cmdline"),
            Source::Text(format!("{HVC0_CMDLINE} l4.name=b"))
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_machine_memory_is_given_or_computed() {
        let file = parse("[machine]\nmemory = \"1G\"\n[[compartment]]\nname = \"a\"\n").unwrap();
        assert_eq!(file.machine_memory_text(), "1024M");
        // 128M + 16M + 256M = 400M, rounded up to 448M.
        assert_eq!(parse(ONE).unwrap().machine_memory_text(), "448M");
        // 16 compartments of 1G with a 100M disk: 16 * 1140M + 256M = 18496M, to 18496M.
        let mut text = String::new();
        for i in 0..16 {
            text.push_str(&format!(
                "[[compartment]]\nname = \"c{i}\"\nmemory = \"1G\"\ndisk = \"100M\"\n"
            ));
        }
        assert_eq!(parse(&text).unwrap().machine_memory_text(), "18496M");
        // Too little for the compartments is refused when the modules are made.
        let root = with_linux("small-machine");
        let e = modules(
            "[machine]\nmemory = \"128M\"\n[[compartment]]\nname = \"a\"\n",
            &root,
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with("x.toml:2: machine: memory: 128M is less than the 144M"),
            "{e}"
        );
        let e = error("[machine]\nmemory = \"lots\"\n[[compartment]]\nname = \"a\"\n");
        assert!(e.starts_with("x.toml:2: machine: memory: \"lots\""), "{e}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let e = error("[[compartment]]\nname = \"a\n");
        assert!(e.starts_with("x.toml:2: compartment 1: name: "), "{e}");
        let e = error("[[compartment]]\nname = \"a\"\nmemory = 128\n");
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": memory: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = error("[[compartment]]\nname = \"a\"\nmemroy = \"64M\"\n");
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": unknown field `memroy`"),
            "{e}"
        );
        let e = error("[machine]\ncpus = 2\n[[compartment]]\nname = \"a\"\n");
        assert!(
            e.starts_with("x.toml:2: machine: unknown field `cpus`"),
            "{e}"
        );
        let e = error("[machin]\n[[compartment]]\nname = \"a\"\n");
        assert!(e.starts_with("x.toml:1: unknown field `machin`"), "{e}");
        let e = error("[defaults]\nname = \"a\"\n[[compartment]]\nname = \"a\"\n");
        assert!(e.starts_with("x.toml:2: defaults: name: "), "{e}");
    }

    #[test]
    fn names_are_required_unique_and_well_formed() {
        let e = error("[[compartment]]\nname = \"a\"\n\n[[compartment]]\nmemory = \"64M\"\n");
        assert!(
            e.starts_with("x.toml:4: compartment 2: name: missing"),
            "{e}"
        );
        let e = error("[[compartment]]\nname = \"a\"\n[[compartment]]\nname = \"a\"\n");
        assert!(
            e.starts_with("x.toml:4: compartment \"a\": name: \"a\" is already the name of the compartment at line 1"),
            "{e}"
        );
        for bad in [
            "Alpha",
            "1st",
            "",
            "a_b",
            "abcdefghijklmnopq",
            "cons",
            "f1",
            "root",
        ] {
            let e = error(&format!("\n[[compartment]]\nname = \"{bad}\"\n"));
            assert!(
                e.starts_with(&format!("x.toml:3: compartment {bad:?}: name: ")),
                "{e}"
            );
        }
        // 16 letters are fine, and so is `f` alone or `fx`.
        for good in ["abcdefghijklmnop", "f", "fx", "a-1"] {
            parse(&format!("[[compartment]]\nname = \"{good}\"\n")).unwrap();
        }
    }

    #[test]
    fn sizes_are_checked() {
        let e = error(&format!("{ONE}memory = \"12Q\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": memory: \"12Q\" is not a size"),
            "{e}"
        );
        let e = error(&format!("{ONE}memory = \"100M\"\n"));
        assert_eq!(
            e,
            "x.toml:3: compartment \"a\": memory: \"100M\" is not a power of two >= 16M"
        );
        let e = error(&format!("{ONE}memory = \"8M\"\n"));
        assert!(
            e.contains("memory: \"8M\" is not a power of two >= 16M"),
            "{e}"
        );
        let e = error(&format!("{ONE}disk = \"1000\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": disk: \"1000\""),
            "{e}"
        );
        let e = error(&format!("{ONE}memory = \"2048G\"\n"));
        assert!(e.contains("memory: \"2048G\" is more than 1T"), "{e}");
        let e = error(&format!("{ONE}disk = \"99999999999999999999G\"\n"));
        assert!(
            e.contains("disk: \"99999999999999999999G\" is not a size"),
            "{e}"
        );
        let e = error(&format!("[defaults]\nmemory = \"3G\"\n{ONE}"));
        assert!(e.starts_with("x.toml:2: defaults: memory: \"3G\""), "{e}");
    }

    #[test]
    fn a_service_goes_on_the_command_line_and_must_exist() {
        let root = with_linux("service");
        let text = "[defaults]\nservice = \"echo\"\n[[compartment]]\nname = \"a\"\n\
                    service = \"httpd\"\n[[compartment]]\nname = \"b\"\n";
        let m = modules(text, &root).unwrap();
        assert!(launch_text(&m, "a.cmdline").ends_with(" l4.service=httpd"));
        assert!(launch_text(&m, "b.cmdline").ends_with(" l4.service=echo"));
        let e = error(&format!("{ONE}service = \"sshd\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": service: \"sshd\": give one of"),
            "{e}"
        );
        // Every service the files may name is in the initramfs's sources.
        let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("../initramfs/services");
        for name in SERVICES {
            assert!(services.join(name).is_file(), "initramfs/services/{name}");
        }
    }

    #[test]
    fn ports_on_a_switch_become_a_switch_task() {
        let root = with_linux("switch");
        let text = "[[compartment]]\nname = \"a\"\nswitch = \"lan\"\nip = \"10.0.0.1/24\"\n\
                    [[compartment]]\nname = \"b\"\nswitch = \"lan\"\n\
                    [[compartment]]\nname = \"c\"\nswitch = \"dmz\"\n[[compartment]]\nname = \"d\"\n";
        let m = modules(text, &root).unwrap();
        assert!(m.iter().any(|m| m.source == Source::Binary("netsw".into())));
        let list = launch(&m);
        assert!(
            list.contains("task sw.lan netsw service ram=4M port=a port=b\n"),
            "{list}"
        );
        assert!(
            list.contains("task sw.dmz netsw service ram=2M port=c\n"),
            "{list}"
        );
        assert!(vmm(&m, "a").args.contains(&"net=sw.lan".to_string()));
        assert!(!vmm(&m, "d").args.iter().any(|a| a.starts_with("net=")));
        assert!(launch_text(&m, "a.cmdline").ends_with(" l4.ip=10.0.0.1/24"));
        let e = error(&format!("{ONE}ip = \"10.0.0.1/24\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": ip: needs a `switch`"),
            "{e}"
        );
        let e = error(&format!("{ONE}switch = \"lan\"\nip = \"10.0.0.300/24\"\n"));
        assert!(
            e.contains("ip: \"10.0.0.300/24\": give an IPv4 address"),
            "{e}"
        );
        let e = error(&format!("{ONE}switch = \"L A N\"\n"));
        assert!(e.contains("switch: \"L A N\""), "{e}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn compartments_get_serial_ports_of_their_own() {
        let root = with_linux("serial");
        let text = "[[compartment]]\nname = \"a\"\nserial = \"com2\"\n\
                    [[compartment]]\nname = \"b\"\n\
                    [[compartment]]\nname = \"c\"\nserial = \"com4\"\n";
        let file = CompartmentFile::parse("dir/x.toml", text, &root).unwrap();
        let a = root.join("target/serial/x-a.sock");
        let c = root.join("target/serial/x-c.sock");
        assert_eq!(
            file.serial_sockets(),
            [("a".into(), 2, a.clone()), ("c".into(), 4, c.clone())]
        );
        // COM2 and COM4 are sockets, COM3 (nobody's) is null: QEMU numbers ports in order.
        assert_eq!(
            file.qemu_args(),
            [
                "-chardev".to_string(),
                format!("socket,id=com2,path={},server=on,wait=off", a.display()),
                "-serial".into(),
                "chardev:com2".into(),
                "-serial".into(),
                "null".into(),
                "-chardev".into(),
                format!("socket,id=com4,path={},server=on,wait=off", c.display()),
                "-serial".into(),
                "chardev:com4".into(),
            ]
        );
        // The console server gets the ports' registers and whose they are.
        let m = file.modules().unwrap();
        let list = launch(&m);
        assert!(
            list.contains(
                "client=a client=b client=c io=0x2f8/3 serial=a@0x2f8 io=0x2e8/3 serial=c@0x2e8\n"
            ),
            "{list}"
        );
        let _ = fs::remove_dir_all(&root);
        // Nothing without serial ports.
        assert!(parse(ONE).unwrap().qemu_args().is_empty());
        // Bad values, a port twice, a port for everyone.
        let e = error(&format!("{ONE}serial = \"com1\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": serial: \"com1\": give \"com2\""),
            "{e}"
        );
        let e = error(&format!(
            "{ONE}serial = \"com3\"\n[[compartment]]\nname = \"b\"\nserial = \"com3\"\n"
        ));
        assert!(
            e.starts_with("x.toml:6: compartment \"b\": serial: com3 is already the port of compartment \"a\" (line 1)"),
            "{e}"
        );
        let e = error(&format!("[defaults]\nserial = \"com2\"\n{ONE}"));
        assert!(
            e.starts_with("x.toml:2: defaults: serial: a serial port is one compartment's"),
            "{e}"
        );
        let e = error(&format!("{ONE}serial = 2\n"));
        assert!(e.contains("serial"), "{e}");
    }

    #[test]
    fn an_uplink_joins_its_switch_and_forwards_ports() {
        let root = with_linux("uplink");
        let text = "[[compartment]]\nname = \"web\"\nswitch = \"lan\"\nip = \"10.0.2.15/24\"\n\
                    [uplink]\nswitch = \"lan\"\nforward = [\"tcp:8080:10.0.2.15:80\"]\n";
        let file = CompartmentFile::parse("x.toml", text, &root).unwrap();
        assert_eq!(
            file.qemu_args(),
            [
                "-nic",
                "user,model=e1000,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80"
            ]
        );
        let m = file.modules().unwrap();
        let list = launch(&m);
        assert!(
            list.contains("task sw.lan netsw service ram=4M port=web port=uplink\n"),
            "{list}"
        );
        assert!(
            list.contains(
                "task uplink uplink service io=0xcf8/3 device-memory dma=2M irq=11 net=sw.lan\n"
            ),
            "{list}"
        );
        let e = error("[[compartment]]\nname = \"a\"\n[uplink]\nswitch = \"lan\"\n");
        assert!(
            e.starts_with("x.toml:4: uplink: switch: \"lan\": no compartment"),
            "{e}"
        );
        let e = error(&format!(
            "{ONE}switch = \"lan\"\n[uplink]\nswitch = \"lan\"\nforward = [\"udp:1:2\"]\n"
        ));
        assert!(e.contains("uplink: forward: \"udp:1:2\": give"), "{e}");
        assert!(error("[[compartment]]\nname = \"uplink\"\n").contains("taken"));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_l4linux_mode_gets_a_monitor_with_its_policy() {
        let root = with_linux("l4mode");
        let text = "[[compartment]]\nname = \"a\"\nsyscalls = \"l4\"\n\
                    syscall_policy = [\"deny=mkdir:EACCES\", \"report=getppid\"]\n\
                    [[compartment]]\nname = \"b\"\nsyscalls = \"guest\"\n\
                    [[compartment]]\nname = \"c\"\nsyscalls = \"l4\"\n";
        let m = modules(text, &root).unwrap();
        assert!(m
            .iter()
            .any(|m| m.source == Source::Binary("sysmon".into())));
        let list = launch(&m);
        assert!(
            list.contains("task mon.a sysmon service client=a deny=mkdir:EACCES report=getppid\n"),
            "{list}"
        );
        assert!(
            list.contains("task mon.c sysmon service client=c\n"),
            "{list}"
        );
        assert!(!list.contains("mon.b"), "{list}");
        // The monitor's line comes before its client's.
        assert!(list.find("task mon.a ").unwrap() < list.find("task a vmm ").unwrap());
        let a = vmm(&m, "a").args;
        assert!(a.contains(&"syscalls=l4".to_string()) && a.contains(&"monitor=mon.a".to_string()));
        assert!(!vmm(&m, "b").args.iter().any(|a| a.starts_with("syscalls=")));
        // Without the mode nothing of it is there.
        let m = modules(ONE, &root).unwrap();
        assert!(!m
            .iter()
            .any(|m| m.source == Source::Binary("sysmon".into())));
        // [defaults] may set the mode for all.
        let m = modules(&format!("[defaults]\nsyscalls = \"l4\"\n{ONE}"), &root).unwrap();
        assert!(vmm(&m, "a").args.contains(&"monitor=mon.a".to_string()));

        // The files that use the mode.
        for (path, text, monitor) in [
            (
                "scenarios/l4linux.toml",
                include_str!("../../scenarios/l4linux.toml"),
                "task mon.l4 sysmon service client=l4 deny=reboot:EPERM report=all\n",
            ),
            (
                "scenarios/tests/l4mode.toml",
                include_str!("../../scenarios/tests/l4mode.toml"),
                "task mon.traced sysmon service client=traced deny=mkdir:EACCES report=getppid\n",
            ),
        ] {
            let m = CompartmentFile::parse(path, text, &root)
                .unwrap()
                .modules()
                .unwrap();
            assert!(launch(&m).contains(monitor), "{path}: {}", launch(&m));
        }
        let e = error(&format!("{ONE}syscalls = \"L4\"\n"));
        assert!(
            e.starts_with(
                "x.toml:3: compartment \"a\": syscalls: \"L4\": give \"guest\" or \"l4\""
            ),
            "{e}"
        );
        let e = error(&format!("{ONE}syscalls = 4\n"));
        assert!(e.contains("x.toml:3"), "{e}");
        let e = error(&format!("{ONE}syscall_policy = [\"deny=mkdir:13\"]\n"));
        assert!(
            e.contains("syscall_policy: only with syscalls = \"l4\""),
            "{e}"
        );
        for (policy, message) in [
            ("deny=mkdir", "needs the errno"),
            ("deny=mkdir:99999", "not an errno"),
            ("deny=nosuchcall:1", "not a system call"),
            ("allow=read,", "not a system call"),
            ("tracing", "not a policy option"),
            ("deny=mkdir:1 trace", "without whitespace"),
            ("", "non-empty"),
        ] {
            let e = error(&format!(
                "{ONE}syscalls = \"l4\"\nsyscall_policy = [\"{policy}\"]\n"
            ));
            assert!(
                e.starts_with("x.toml:4: compartment \"a\": syscall_policy: ")
                    && e.contains(message),
                "{policy}: {e}"
            );
        }
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn time_slices_are_checked_and_passed_on() {
        let root = with_linux("slices");
        let m = modules(&format!("{ONE}timeslice_ms = 30\n"), &root).unwrap();
        assert!(vmm(&m, "a").args.contains(&"timeslice=30".to_string()));
        let e = error(&format!("{ONE}timeslice_ms = 0\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": timeslice_ms: 0 is out of range"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn vmm_options_are_checked_and_passed_on() {
        let root = with_linux("options");
        let m = modules(
            &format!("{ONE}vmm_options = [\"probe-isolation\"]\n"),
            &root,
        )
        .unwrap();
        assert!(vmm(&m, "a").args.contains(&"probe-isolation".to_string()));
        let e = error(&format!("{ONE}vmm_options = [\"factory=1G\"]\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": vmm_options: \"factory=1G\" is not one of"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn console_disk_restart_and_priority_are_checked() {
        let e = error(&format!("{ONE}console = \"ttyS1\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": console: \"ttyS1\" is not a console"),
            "{e}"
        );
        let e = error(&format!("{ONE}disk = \"16M\"\ndisk_image = \"d.img\"\n"));
        assert!(
            e.starts_with("x.toml:4: compartment \"a\": disk_image: give either"),
            "{e}"
        );
        let e = error(&format!("{ONE}restarts = 2\n"));
        assert!(
            e.starts_with(
                "x.toml:3: compartment \"a\": restarts: only with restart = \"on-failure\""
            ),
            "{e}"
        );
        let e = error(&format!("{ONE}restart = \"on-failure\"\nrestarts = 101\n"));
        assert!(
            e.starts_with("x.toml:4: compartment \"a\": restarts: 101 is out of range"),
            "{e}"
        );
        let e = error(&format!("{ONE}restart = \"on-failure\"\nrestarts = 0\n"));
        assert!(e.contains("restarts: 0 is out of range 1..=100"), "{e}");
        let e = error(&format!("{ONE}restart = \"always\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": restart: "),
            "{e}"
        );
        let e = error(&format!("[defaults]\nrestarts = 2\n{ONE}"));
        assert!(e.starts_with("x.toml:2: defaults: restarts: "), "{e}");
        let e = error(&format!("{ONE}priority = 101\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": priority: 101 is out of range 0..=100"),
            "{e}"
        );
        let e = error(&format!("{ONE}priority = -1\n"));
        assert!(e.contains("priority: -1 is out of range"), "{e}");
        let e = error(&format!("{ONE}kernel = \"\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": kernel: is empty"),
            "{e}"
        );
        let e = error(&format!("{ONE}cmdline = \"a\\nb\"\n"));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": cmdline: "),
            "{e}"
        );
        let e = error(&format!("{ONE}cmdline = \"{}\"\n", "x".repeat(2000)));
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": cmdline: the Linux command line"),
            "{e}"
        );
    }

    #[test]
    fn the_number_of_compartments_is_bounded() {
        let e = error("# nothing\n[machine]\nmemory = \"1G\"\n");
        assert!(
            e.starts_with("x.toml:3: compartment: there is no [[compartment]]"),
            "{e}"
        );
        let mut text = String::new();
        for i in 0..17 {
            text.push_str(&format!("[[compartment]]\nname = \"c{i}\"\n"));
        }
        let e = error(&text);
        assert!(
            e.starts_with("x.toml:33: compartment \"c16\": compartment: more than 16"),
            "{e}"
        );
    }

    #[test]
    fn missing_files_are_named_when_the_modules_are_made() {
        let root = repository("missing", &[("k", 10)]);
        let e = modules(ONE, &root).unwrap_err().0;
        assert!(
            e.starts_with(
                "x.toml:1: compartment \"a\": kernel (the default): target/linux/bzImage: no such file"
            ),
            "{e}"
        );
        assert!(
            e.contains("scripts/build-linux.sh makes the default ones"),
            "{e}"
        );
        let e = modules(&format!("{ONE}kernel = \"k\"\n"), &root)
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("x.toml:1: compartment \"a\": initrd (the default): "),
            "{e}"
        );
        let e = modules(
            &format!("[defaults]\ninitrd = \"nope\"\n{ONE}kernel = \"k\"\n"),
            &root,
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with(
                "x.toml:2: compartment \"a\": initrd (from [defaults]): nope: no such file"
            ),
            "{e}"
        );
        let e = modules(
            &format!("{ONE}kernel = \"k\"\ninitrd = \"\"\ndisk_image = \"d.img\"\n"),
            &root,
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with("x.toml:5: compartment \"a\": disk_image: d.img: no such file"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_default_kernel_boots_directly_from_its_vmlinux() {
        let root = repository(
            "vmlinux",
            &[
                (DEFAULT_KERNEL, 4096),
                (DEFAULT_VMLINUX, 4096),
                (DEFAULT_INITRD, 4096),
                ("k", 4096),
                ("v", 4096),
            ],
        );
        let vmm = |text: &str| {
            let m = modules(text, &root).unwrap();
            let list = launch(&m);
            let line = list.lines().find(|l| l.starts_with("task a vmm")).unwrap();
            (line.to_string(), m)
        };
        // The default kernel: its vmlinux too.
        let (line, m) = vmm(ONE);
        assert!(
            line.contains("blob=linux:f1 blob=vmlinux:f2 blob=initrd:f3"),
            "{line}"
        );
        assert_eq!(m[3].source, Source::File(root.join(DEFAULT_VMLINUX)));
        // `vmlinux = ""`: the guest decompresses itself.
        let (line, _) = vmm(&format!("{ONE}vmlinux = \"\"\n"));
        assert!(line.contains("blob=linux:f1 blob=initrd:f2"), "{line}");
        // Another kernel: none, unless given.
        let (line, _) = vmm(&format!("{ONE}kernel = \"k\"\n"));
        assert!(!line.contains("vmlinux"), "{line}");
        let (line, m) = vmm(&format!(
            "[defaults]\nvmlinux = \"v\"\n{ONE}kernel = \"k\"\n"
        ));
        assert!(line.contains("blob=linux:f1 blob=vmlinux:f2"), "{line}");
        assert_eq!(m[3].source, Source::File(root.join("v")));
        // A missing one is named.
        let e = modules(&format!("{ONE}vmlinux = \"nope\"\n"), &root)
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("x.toml:3: compartment \"a\": vmlinux: nope: no such file"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_kernels_module_limits_are_kept() {
        // Sixteen compartments with long names need no more modules than one does.
        let root = with_linux("kip");
        let mut text = String::new();
        for i in 0..16 {
            text.push_str(&format!("[[compartment]]\nname = \"compartment-{i:04}\"\n"));
        }
        let many = modules(&text, &root).unwrap();
        assert_eq!(many.len(), 6);
        assert_eq!(
            launch(&many)
                .lines()
                .filter(|l| l.starts_with("task "))
                .count(),
            17
        );
        assert!(vmm(&many, "compartment-0015")
            .args
            .contains(&"name=compartment-0015".into()));
        // Each compartment with a kernel of its own: 4 + 12 files (and the initramfs) + the
        // launch list + sigma0 and the root task make 18.
        let mut text = String::new();
        for i in 0..12 {
            let kernel = root.join(format!("k{i}"));
            fs::write(&kernel, b"k").unwrap();
            text.push_str(&format!(
                "[[compartment]]\nname = \"c{i}\"\nkernel = {:?}\n",
                kernel.display().to_string()
            ));
        }
        let e = modules(&text, &root).unwrap_err().0;
        assert!(e.contains("the boot would have 18 modules"), "{e}");
        let _ = fs::remove_dir_all(&root);
    }
}
