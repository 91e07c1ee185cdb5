//! A Linux compartment: loads a bzImage, an initramfs and a command line (data modules
//! `linux`, `initrd`, `cmdline`), builds the boot-protocol state and fills in the board
//! ([`crate::platform::Board`]: local APIC, IOAPIC, kvmclock, CPUID/MSR policy and MP table of
//! [`l4linux_glue::platform::Platform`], COM1 as a 16550A, the virtio console and block device)
//! and runs it on the one exit loop as the guest kind [`Linux`]: its hypercalls, console
//! output as `[linux] ...` lines, console input into COM1 or the virtio console, and its ways
//! to end. Interrupts, the guest's timer as the `VcpuRun` deadline and HLT as a blocking wait
//! in L4 are the platform's ([`crate::platform::Compartment`]).
//!
//! The compartment ends when the guest powers off (HLT with interrupts off), reboots (a triple
//! fault: Linux without ACPI reboots that way), or does something the VMM cannot handle; the
//! VMM says which and with how many exits of each kind.

use crate::console_log::ConsoleLog;
use crate::exit::{Next, Words};
use crate::memory::{create_vm, identity_tables, read_guest_virtual, GuestRam, Ram, Vm};
use crate::platform::{size_argument, Board, Compartment, ExitCounts, Kind};
use crate::vcpu::{long_mode_state, rdtsc};
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use l4::abi::vcpu::{self as state, Groups};
use l4linux_glue::boot::{self, BzImage};
use l4linux_glue::exits::IoExit;
use l4linux_glue::mmio::MmioBus;
use l4linux_glue::ports::{PortBus, PortDevice};
use l4linux_glue::uart8250::{self, Uart8250};
use l4linux_glue::virtio::block::VirtioBlock;
use l4linux_glue::virtio::console::VirtioConsole;
use l4linux_glue::virtio::mmio::VirtioMmio;
use l4linux_glue::virtio::net::{NetBackend, VirtioNet};

/// Guest RAM when the arguments name no size (`mem=SIZE`).
const DEFAULT_RAM: u64 = 128 << 20;
const GDT: u64 = 0x500;
/// Where the MP table goes (the BIOS area Linux scans).
const MP_TABLE: u64 = boot::BIOS_AREA;
/// The command line when no `cmdline` module is given.
const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
/// What the VMM recognises in the guest's console lines.
#[derive(Default)]
struct Markers {
    panicked: bool,
    /// A phase of the guest just ended (a workload's result line, or /init reached): its
    /// name, for the exits-per-phase line.
    phase_end: Option<alloc::string::String>,
}

impl Markers {
    fn line(&mut self, text: &str) {
        if text.contains("l4linux: reached /init") {
            self.phase_end = Some("boot".into());
            if l4::rt::arguments()
                .split_whitespace()
                .any(|w| w == "crash-at-init")
            {
                // The containment test's broken VMM: an undefined instruction, which the
                // kernel turns into an exception message to the root task.
                crate::say!("crash-at-init: raising #UD on purpose");
                // SAFETY: `ud2` raises #UD and does nothing else; the root task destroys us.
                unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            }
        }
        if let Some(rest) = text.strip_prefix("l4bench: ") {
            if let Some((workload, _)) = rest.split_once(" total=") {
                self.phase_end = Some(workload.into());
            }
        }
        self.panicked |= text.contains("Kernel panic - not syncing");
    }
}

/// Ports of PC devices the platform does not have, answered so that Linux sees them absent
/// quickly: the PIC reads 0xff (masked, absent), everything else all ones; writes are ignored.
struct Absent;

impl PortDevice for Absent {
    fn read(&mut self, _offset: u16, size: u8) -> u32 {
        l4linux_glue::ports::mask(size)
    }
    fn write(&mut self, _offset: u16, _size: u8, _value: u32) {}
}

/// Where the virtio-mmio devices are (one 4 KiB window each) and their IOAPIC pins.
const VIRTIO_BASE: u64 = 0xd000_0000;
const CONSOLE_WINDOW: u64 = VIRTIO_BASE;
const CONSOLE_IRQ: u8 = 5;
const BLOCK_WINDOW: u64 = VIRTIO_BASE + 0x1000;
const BLOCK_IRQ: u8 = 6;
const NET_WINDOW: u64 = VIRTIO_BASE + 0x2000;
const NET_IRQ: u8 = 7;

type Console = VirtioMmio<VirtioConsole<Vec<u8>>, GuestRam>;
type NetDevice = VirtioMmio<VirtioNet<crate::net::NetPort>, GuestRam>;
type Block = VirtioMmio<VirtioBlock<&'static mut [u8]>, GuestRam>;

/// Boot the Linux named by the data modules; returns the compartment's exit status (0: it
/// powered off or rebooted after reaching /init).
pub fn boot_linux() -> i64 {
    let Some(image) = l4::rt::blob("linux") else {
        crate::say!("no Linux kernel: give the bzImage as data module `linux` (blob=linux)");
        return 1;
    };
    let mut initrd = l4::rt::blob("initrd").unwrap_or(&[]);
    let cmdline_module = l4::rt::blob("cmdline");
    let cmdline = match cmdline_module.map(core::str::from_utf8) {
        None => DEFAULT_CMDLINE,
        Some(Ok(text)) => text.trim(),
        Some(Err(_)) => {
            crate::say!("the command line module is not UTF-8");
            return 1;
        }
    };
    let ram_size = match size_argument("mem").or_else(|| size_argument("ram")) {
        None => DEFAULT_RAM,
        Some(Ok(size)) => size,
        Some(Err(())) => {
            crate::say!("bad memory size (mem=SIZE, e.g. mem=256M)");
            return 1;
        }
    };
    let syscalls = match crate::syscalls::Routing::from_arguments() {
        Ok(routing) => routing,
        Err(e) => {
            crate::say!("{}", e.0);
            return 1;
        }
    };
    let bz = match BzImage::parse(image) {
        Ok(bz) => bz,
        Err(e) => {
            crate::say!("Linux image rejected: {e}");
            return 1;
        }
    };
    // The decompressed kernel, if given (`blob=vmlinux:...`): booted directly, at the place
    // the bzImage's boot plan gives the kernel, so the guest does not decompress itself.
    let vmlinux = match l4::rt::blob("vmlinux").map(l4linux_glue::vmlinux::parse) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            crate::say!("vmlinux rejected: {e}");
            return 1;
        }
    };
    // The devices this VMM gives every compartment, announced as Linux's virtio-mmio driver
    // expects them without ACPI or a device tree.
    // A network port where the arguments ask for one (`net=SWITCH`).
    let net = crate::net::NetPort::attach();
    // A block device only where the arguments ask for one (`disk=SIZE` or a `disk` module).
    let wants_disk = size_argument("disk").is_some() || l4::rt::blob("disk").is_some();
    let mut cmdline =
        alloc::format!("{cmdline} virtio_mmio.device=4K@{CONSOLE_WINDOW:#x}:{CONSOLE_IRQ}");
    if wants_disk {
        cmdline.push_str(&alloc::format!(
            " virtio_mmio.device=4K@{BLOCK_WINDOW:#x}:{BLOCK_IRQ}"
        ));
    }
    if net.is_some() {
        cmdline.push_str(&alloc::format!(
            " virtio_mmio.device=4K@{NET_WINDOW:#x}:{NET_IRQ}"
        ));
    }
    let cmdline = cmdline.as_str();
    let mut planned = boot::plan(&bz, ram_size, initrd.len() as u64, cmdline.len());
    // The initramfs decompressed for us (by the root task, once for every compartment that
    // boots it) may not fit a small guest where the compressed one does: then the guest
    // gets the compressed one (`initrd.gz`) and decompresses it itself.
    if let (Err(boot::BootError::Layout(_)), Some(packed)) = (&planned, l4::rt::blob("initrd.gz")) {
        crate::say!(
            "the decompressed initramfs does not fit in {} MiB of guest RAM: the guest gets it compressed",
            ram_size >> 20
        );
        initrd = packed;
        planned = boot::plan(&bz, ram_size, initrd.len() as u64, cmdline.len());
    }
    let layout = match planned {
        Ok(l) => l,
        Err(e) => {
            crate::say!(
                "Linux does not fit in {} MiB of guest RAM: {e}",
                ram_size >> 20
            );
            return 1;
        }
    };
    if let Some(Err(e)) = vmlinux
        .as_ref()
        .map(|v| v.check_placement(layout.kernel, bz.footprint()))
    {
        crate::say!("vmlinux does not match its bzImage: {e}");
        return 1;
    }
    let zero_page = match boot::zero_page(&bz, &layout, cmdline.as_bytes()) {
        Ok(z) => z,
        Err(e) => {
            crate::say!("cannot build the zero page: {e}");
            return 1;
        }
    };
    let Some((platform, tsc_hz, boot_tsc)) = crate::platform::new_platform() else {
        return 1;
    };
    let mp_table = match platform.mp_table(MP_TABLE) {
        Ok(t) => t,
        Err(e) => {
            crate::say!("{e}");
            return 1;
        }
    };
    let vm: Vm = match create_vm(ram_size, l4::abi::NO_CAP) {
        Ok(vm) => vm,
        Err(e) => {
            crate::say!("cannot create a VM: {e}");
            return 1;
        }
    };
    let disk = match make_disk() {
        Ok(d) => d,
        Err(e) => {
            crate::say!("no virtio disk: {e}");
            return 1;
        }
    };
    let memory = GuestRam::of(&vm.ram);
    let console = Rc::new(RefCell::new(VirtioMmio::new(
        VirtioConsole::with_size(Vec::new(), 80, 25),
        memory,
    )));
    let block = disk.map(|disk| {
        Rc::new(RefCell::new(VirtioMmio::new(
            VirtioBlock::new(disk).with_id(b"l4-disk0"),
            memory,
        )))
    });
    let net = net.map(|port| {
        Rc::new(RefCell::new(VirtioMmio::new(
            VirtioNet::new(port.mac, port),
            memory,
        )))
    });
    let mut bus = MmioBus::new();
    if bus
        .register(
            CONSOLE_WINDOW,
            0x1000,
            alloc::boxed::Box::new(console.clone()),
        )
        .and_then(|()| match &block {
            Some(block) => {
                bus.register(BLOCK_WINDOW, 0x1000, alloc::boxed::Box::new(block.clone()))
            }
            None => Ok(()),
        })
        .and_then(|()| match &net {
            Some(device) => {
                bus.register(NET_WINDOW, 0x1000, alloc::boxed::Box::new(device.clone()))
            }
            None => Ok(()),
        })
        .is_err()
    {
        crate::say!("cannot place the virtio devices");
        return 1;
    }
    // Guest RAM comes zeroed, so segments need only their file data.
    let (entry, kernel_bytes, how) = match &vmlinux {
        Some(v) => {
            for segment in &v.segments {
                vm.ram.write(segment.address, segment.bytes);
            }
            (v.entry, v.data_bytes(), "vmlinux, booted directly")
        }
        None => {
            vm.ram.write(layout.kernel, bz.kernel());
            (layout.entry64, bz.kernel().len(), "compressed")
        }
    };
    vm.ram.write(layout.zero_page, &zero_page);
    let mut bytes = Vec::from(cmdline.as_bytes());
    bytes.push(0);
    vm.ram.write(layout.cmdline, &bytes);
    if !initrd.is_empty() {
        vm.ram.write(layout.initrd, initrd);
    }
    vm.ram.write(MP_TABLE, &mp_table);
    identity_tables(&vm.ram);
    // GDT: null, null, __BOOT_CS (0x10, 64-bit code), __BOOT_DS (0x18, data).
    let gdt: [u64; 4] = [0, 0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    vm.ram.write(GDT, &bytes);
    crate::say!(
        "Linux: protocol {}.{:02}, kernel {} KiB ({how}), initramfs {} KiB, {} MiB RAM, TSC {} kHz; starts at TSC {}",
        bz.version >> 8,
        bz.version & 0xff,
        kernel_bytes / 1024,
        initrd.len() / 1024,
        ram_size >> 20,
        tsc_hz / 1000,
        rdtsc()
    );
    crate::say!("Linux command line: {cmdline}");
    if syscalls.is_some() {
        crate::say!(
            "L4Linux mode: the guest's system calls go to the syscall monitor {}",
            crate::platform::argument("monitor").unwrap_or("?")
        );
    }
    // The images are in guest RAM now: their pages (and the kernel memory of their mappings)
    // go back.
    drop((bz, vmlinux));
    for name in ["linux", "vmlinux", "initrd", "initrd.gz"] {
        // SAFETY: nothing reads the images after this (the BzImage and vmlinux views that
        // borrow them are dropped above; a restart is a new VMM with the blobs mapped anew).
        unsafe { l4::rt::release_blob(name) };
    }

    l4::utcb::with_utcb(|u| {
        let w = &mut u.mr;
        long_mode_state(w, entry);
        w[state::CS] = state::segment(0x10, 0x29b, 0xffff_ffff);
        for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
            w[s] = state::segment(0x18, 0xc93, 0xffff_ffff);
        }
        w[state::GDTR] = 31;
        w[state::GDTR + 1] = GDT;
        w[state::RSI] = layout.zero_page;
        w[state::RSP] = 0;
    });

    let mut compartment = Compartment {
        board: Board {
            vm,
            platform,
            ports: PortBus::new(),
            mmio: bus,
            uart: Rc::new(RefCell::new(Uart8250::new())),
            console: crate::console::HostConsole::open(),
            verbose: l4::rt::arguments()
                .split_whitespace()
                .any(|w| w == "verbose"),
            tsc_hz,
            boot_tsc,
            counts: ExitCounts::default(),
            syscalls,
            no_device_exit: false,
            last_entry: None,
            pv_eoi_set: None,
        },
        kind: Linux {
            log: ConsoleLog::new(),
            markers: Markers::default(),
            phase_start: (ExitCounts::default(), boot_tsc),
            virtio_console: console,
            block,
            net,
            net_due: true,
            input_to_hvc: cmdline.split_whitespace().any(|w| w == "console=hvc0"),
        },
    };
    if compartment.board.console.is_none() {
        crate::say!("no console input (the VMM needs console=SERVER, or io=0x3f8/3 and platform)");
    }
    if attach_devices(&mut compartment.board).is_err() {
        crate::say!("cannot attach the devices");
        return 1;
    }
    let outcome = compartment.run();
    report(&mut compartment, outcome)
}

/// COM1 and the PC devices Linux probes for that this platform does not have.
fn attach_devices(board: &mut Board) -> Result<(), l4linux_glue::ports::BusError> {
    use alloc::boxed::Box;
    board.ports.register(
        uart8250::COM1_PORT,
        uart8250::LENGTH,
        Box::new(board.uart.clone()),
    )?;
    // PIC master and slave: absent.
    board.ports.register(0x20, 2, Box::new(Absent))?;
    board.ports.register(0xa0, 2, Box::new(Absent))?;
    Ok(())
}

/// The virtio disk: the `disk` module's image (copied, so the guest may write it) or
/// `disk=SIZE` of zeroes, in RAM from the root task's RAM service; `None` without either.
fn make_disk() -> Result<Option<&'static mut [u8]>, &'static str> {
    let image = l4::rt::blob("disk").unwrap_or(&[]);
    let size = match size_argument("disk") {
        Some(Ok(size)) => size,
        Some(Err(())) => return Err("bad disk size (disk=SIZE)"),
        None if l4::rt::blob("disk").is_some() => {
            (image.len() as u64).next_multiple_of(512).max(512)
        }
        None => return Ok(None),
    };
    if size < image.len() as u64 || size == 0 {
        return Err("the disk image is larger than disk=SIZE");
    }
    let ram = Ram::new(size).map_err(|_| "no RAM for the disk (raise ram=)")?;
    ram.write(0, image);
    // SAFETY: the RAM service mapped `size` bytes at `ram.base` into this task, only for this
    // disk; nothing else refers to them, and they stay mapped for the task's lifetime.
    Ok(Some(unsafe {
        core::slice::from_raw_parts_mut(ram.base as *mut u8, size as usize)
    }))
}

/// Why the exit loop ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    /// Power-off with this status (HLT with interrupts off is status 0).
    PowerOff(u8),
    /// A reboot, and how the guest asked for it.
    Reboot(&'static str),
    Failed(&'static str),
}

/// What a Linux compartment adds to its board: the virtio devices, console output as
/// `[NAME] ...` lines, the hypercalls, and its ways to end.
struct Linux {
    log: ConsoleLog,
    markers: Markers,
    /// The exit counts and the TSC when the last phase ended (for exits per phase).
    phase_start: (ExitCounts, u64),
    virtio_console: Rc<RefCell<Console>>,
    block: Option<Rc<RefCell<Block>>>,
    /// The guest's virtio-net device on its network port.
    net: Option<Rc<RefCell<NetDevice>>>,
    /// The switch sent frames (its notification came), or the ring to it stayed full at the
    /// last poll: the device must look at its port even if the guest wrote no register.
    net_due: bool,
    /// Console input goes to the virtio console (the guest's console is hvc0), not COM1.
    input_to_hvc: bool,
}

impl Linux {
    /// The machine resets (`how`): a reboot, or the end of a panic.
    fn reset(&self, how: &'static str) -> Outcome {
        if self.markers.panicked {
            Outcome::Failed("guest kernel panic")
        } else {
            Outcome::Reboot(how)
        }
    }
}

impl Kind for Linux {
    type Outcome = Outcome;
    const NAME: &'static str = "Linux";
    const MESSAGES_WAKE: bool = true;

    fn output(&mut self, bytes: &[u8]) {
        let markers = &mut self.markers;
        self.log.push(bytes, &mut |line| markers.line(line));
    }

    fn break_line(&mut self) {
        let markers = &mut self.markers;
        self.log.break_line(&mut |line| markers.line(line));
    }

    /// The switch's notification: frames wait (the next poll takes them).
    fn message(&mut self, message: &l4::ipc::Received) -> bool {
        let frames = message.tag.label() == l4::abi::LABEL_IRQ
            && message.badge == l4::abi::slots::NET_NOTIFY_BADGE
            && self.net.is_some();
        self.net_due |= frames;
        frames
    }

    fn log(&mut self) -> &mut ConsoleLog {
        &mut self.log
    }

    /// Move console input into the UART's receive FIFO (or the virtio console) as far as it
    /// has room, show the virtio console's output, and move frames between the switch and the
    /// network device.
    fn poll(&mut self, board: &mut Board) {
        if let Some(phase) = self.markers.phase_end.take() {
            // Exits per phase of the guest (boot to /init, each workload) and per second.
            let now = rdtsc();
            let (counts, start) = self.phase_start;
            let (text, total) = board.counts.since(&counts);
            let micros = (now - start) as u128 * 1_000_000 / board.tsc_hz.max(1) as u128;
            let rate = total as u128 * 1_000_000 / micros.max(1);
            self.break_line();
            crate::say!(
                "exits in phase {phase}: {total} in {} ms ({rate}/s): {text}",
                micros / 1000
            );
            self.phase_start = (board.counts, now);
        }
        if let Some(console) = board.console.as_mut() {
            console.take_server_input();
            if !console.input.is_empty() {
                let taken = if self.input_to_hvc {
                    let mut hvc = self.virtio_console.borrow_mut();
                    let taken = hvc
                        .backend_mut()
                        .queue_input(console.input.make_contiguous());
                    hvc.poll();
                    taken
                } else {
                    board
                        .uart
                        .borrow_mut()
                        .receive(console.input.make_contiguous())
                };
                console.input.drain(..taken);
            }
        }
        let hvc_output = core::mem::take(self.virtio_console.borrow_mut().backend_mut().sink_mut());
        if !hvc_output.is_empty() {
            self.output(&hvc_output);
        }
        if let Some(device) = &self.net {
            // Receive what the switch sent as far as the guest has buffers, transmit what the
            // guest queued and have the switch forward it; while the ring to the switch was
            // too full for the next frame, kick and go on. The device works only if the switch
            // sent frames, the ring was full, or the guest wrote one of its registers (reading
            // and acknowledging the interrupt, two exits per interrupt, change nothing it
            // works on).
            let mut device = device.borrow_mut();
            let mut due = core::mem::take(&mut self.net_due);
            for _ in 0..crate::net::MAX_KICKS {
                device.poll_if(due);
                let port = device.backend_mut().backend_mut();
                let blocked = !port.transmit_ready();
                port.kick();
                if !blocked {
                    due = false;
                    break;
                }
                due = true;
            }
            self.net_due = due;
        }
    }

    /// The virtio devices' interrupt lines.
    fn drive_lines(&self, board: &mut Board) {
        board
            .platform
            .set_irq(CONSOLE_IRQ.into(), self.virtio_console.borrow().irq_level());
        if let Some(block) = &self.block {
            board
                .platform
                .set_irq(BLOCK_IRQ.into(), block.borrow().irq_level());
        }
        if let Some(device) = &self.net {
            board
                .platform
                .set_irq(NET_IRQ.into(), device.borrow().irq_level());
        }
    }

    /// The keyboard controller's reset line (0xfe to port 0x64): Linux's first reboot method.
    fn port_done(&mut self, _board: &mut Board, io: &IoExit, w: &Words) -> Option<Outcome> {
        (io.port == 0x64 && !io.input && w[state::RAX] as u8 == 0xfe)
            .then(|| self.reset("the keyboard controller's reset line"))
    }

    /// VMMCALL ([`l4linux_glue::hypercall`]).
    fn hypercall(&mut self, board: &mut Board, w: &mut Words) -> Option<Next<Outcome>> {
        use l4linux_glue::hypercall::{self as hc, Hypercall};
        w[state::RIP] += l4linux_glue::exits::VMMCALL_LENGTH;
        let result = match hc::decode(w[state::RAX], w[state::RBX], w[state::RCX]) {
            Hypercall::PowerOff(status) => return Some(Next::Stop(Outcome::PowerOff(status))),
            Hypercall::Reboot => return Some(Next::Stop(Outcome::Reboot("the reboot hypercall"))),
            Hypercall::Log { address, length } => {
                let mut bytes = [0u8; hc::LOG_MAX as usize];
                let bytes = &mut bytes[..length as usize];
                if read_guest_virtual(&board.vm, &w.mr, address, bytes) {
                    let markers = &mut self.markers;
                    let log = &mut self.log;
                    w.lend(|| log.line(&hc::log_line(bytes), &mut |line| markers.line(line)));
                    0
                } else {
                    hc::EFAULT
                }
            }
            Hypercall::Scan(seed) => {
                let pattern = hc::secret_pattern(seed);
                let count = hc::count_pattern(board.vm.ram.words().iter().copied(), &pattern);
                let mib = board.vm.ram.size >> 20;
                w.lend(|| {
                    crate::say!(
                        "isolation scan: the pattern of seed {seed} occurs {count} times in the guest's {mib} MiB"
                    )
                });
                count
            }
            Hypercall::MonitorMark | Hypercall::MonitorReport => {
                let mark = w[state::RAX] == hc::MONITOR_MARK;
                let cr3 = w[state::CR3];
                match board
                    .syscalls
                    .as_mut()
                    .map(|r| if mark { r.mark(w, cr3) } else { r.report(w) })
                {
                    None => hc::ENOSYS,
                    Some(Ok(result)) => result,
                    Some(Err(crate::syscalls::Broken)) => {
                        return Some(Next::Stop(Outcome::Failed(crate::syscalls::Broken::WHY)))
                    }
                }
            }
            Hypercall::Invalid => hc::EINVAL,
            Hypercall::Unknown(_) => hc::ENOSYS,
        };
        w[state::RAX] = result;
        Some(Next::Resume(Groups::GPRS))
    }

    /// A triple fault: how Linux without ACPI reboots with `reboot=t` (and after a panic
    /// too, with `panic=-1`).
    fn shutdown(&mut self) -> Outcome {
        self.reset("a triple fault")
    }

    fn halted(&mut self) -> Outcome {
        Outcome::PowerOff(0)
    }

    fn failed(why: &'static str) -> Outcome {
        Outcome::Failed(why)
    }
}

/// The exit counts and how the compartment ended; its exit status.
fn report(compartment: &mut Compartment<Linux>, outcome: Outcome) -> i64 {
    compartment.flush_output();
    compartment.kind.break_line();
    let board = &compartment.board;
    let rip = l4::utcb::with_utcb(|u| u[state::RIP]);
    let c = &board.counts;
    let seconds = (rdtsc() - board.boot_tsc) / board.tsc_hz.max(1);
    crate::say!(
        "exits: uart {} other-io {} cpuid {} msr {} mmio {} hlt {} deadline {} message {} hypercall {} ud {} other {}; {} MSR accesses refused with #GP; {} interrupts injected ({} ended through the PV EOI flag); {seconds} s",
        c.uart, c.io, c.cpuid, c.msr, c.mmio, c.hlt, c.deadline, c.message, c.hypercall, c.invalid_opcode, c.other, c.msr_refused, c.injected, c.deferred_eois
    );
    if let Some(routing) = compartment.board.syscalls.as_mut() {
        let r = routing.counts;
        crate::say!(
            "L4Linux mode: {} system calls routed to the monitor ({} denied, {} results reported), {} SYSRETs, {} other SYSCALLs emulated, {} faulting as on the CPU, {} other #UDs reflected to the guest",
            r.routed, r.denied, r.reported, r.sysrets, r.unrouted, r.faults, r.reflected
        );
        let exits = (r.routed + r.sysrets + r.unrouted + r.faults + r.reflected).max(1);
        crate::say!(
            "L4Linux mode: per #UD exit {} TSC ticks in the VMM's handler ({} fetching and decoding, {} in IPC with the monitor); {} #UD exits",
            r.handler_ticks / exits,
            r.decode_ticks / exits,
            r.monitor_ticks / exits,
            exits
        );
        routing.end();
    }
    if let Some(device) = &compartment.kind.net {
        let mut device = device.borrow_mut();
        let port = device.backend_mut().backend_mut();
        port.detach();
        let c = port.counts;
        let stats = *device.backend().stats();
        crate::say!(
            "network port: {} frames to the switch ({} GSO), {} from it ({} in whole as GSO frames, {} cut into segments), {} dropped (the ring to the switch was full), {} ring errors; {} frames the guest sent refused ({} bad headers), {} it could not place",
            c.sent,
            stats.tx_gso,
            c.received,
            stats.rx_gso,
            stats.rx_segmented,
            c.dropped,
            c.errors,
            stats.tx_bad_chain + stats.tx_bad_header + stats.tx_bad_size,
            stats.tx_bad_header,
            stats.rx_too_big + stats.rx_bad_chain + stats.rx_bad_size
        );
    }
    let (used, high_water) = l4::rt::heap_usage();
    crate::say!(
        "heap: {} KiB in use, {} KiB at most",
        used >> 10,
        high_water >> 10
    );
    match outcome {
        Outcome::PowerOff(status) => {
            crate::say!("Linux powered off (status {status}): the compartment ends");
            i64::from(status)
        }
        Outcome::Reboot(how) => {
            crate::say!("Linux rebooted ({how}): the compartment ends");
            0
        }
        Outcome::Failed(why) => {
            crate::say!("Linux stopped: {why} (rip {rip:#x}); the compartment ends");
            1
        }
    }
}
