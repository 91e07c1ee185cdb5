//! Linux early boot in a compartment (work in progress toward the Linux issue): loads a
//! bzImage with `l4linux_glue::boot`, enters its 64-bit entry point with the boot protocol's
//! state, and runs an exit loop with a 16550A UART on COM1 (its output is printed as
//! `[linux] ...` lines), CPUID policy and MSRs refused with #GP. It stops at the first exit it
//! cannot handle yet (no timer, interrupt controller or virtio devices so far) and says where.

use crate::{create_vm, emulate_cpuid, identity_tables, port_io, run, utcb_words, Vm, INJECT_GP0};
use alloc::vec::Vec;
use l4::abi::vcpu::{self as state, exit};
use l4::println;
use l4linux_glue::boot::{self, BzImage};
use l4linux_glue::exits::{self, IoExit};
use l4linux_glue::ports::PortBus;
use l4linux_glue::uart8250::{self, Uart8250};

/// Guest RAM: the kernel loads at 16 MiB and needs its init_size above that.
const RAM: u64 = 32 << 20;
const GDT: u64 = 0x500;
const CMDLINE: &[u8] = b"console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 printk.time=1";
const MSR_EFER: u64 = 0xc000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_SVME: u64 = 1 << 12;
/// SCE, LME, LMA (ignored), NXE.
const EFER_WRITABLE: u64 = 0x0d01;
/// Exits after which we give up (a guest stuck in a loop of exits we mishandle).
const MAX_EXITS: u64 = 5_000_000;

/// Boot `image`; returns 0 if Linux got as far as printing its version banner.
pub fn boot_linux(image: &[u8]) -> i64 {
    let bz = match BzImage::parse(image) {
        Ok(bz) => bz,
        Err(e) => {
            println!("[vmm] Linux image rejected: {e}");
            return 1;
        }
    };
    let layout = match boot::plan(&bz, RAM, 0, CMDLINE.len()) {
        Ok(l) => l,
        Err(e) => {
            println!("[vmm] Linux does not fit: {e}");
            return 1;
        }
    };
    let zero_page = match boot::zero_page(&bz, &layout, CMDLINE) {
        Ok(z) => z,
        Err(e) => {
            println!("[vmm] cannot build the zero page: {e}");
            return 1;
        }
    };
    let vm: Vm = match create_vm(RAM, l4::abi::NO_CAP) {
        Ok(vm) => vm,
        Err(e) => {
            println!("[vmm] cannot create a VM: {e}");
            return 1;
        }
    };
    vm.ram.write(layout.kernel, bz.kernel());
    vm.ram.write(layout.zero_page, &zero_page);
    let mut cmdline = Vec::from(CMDLINE);
    cmdline.push(0);
    vm.ram.write(layout.cmdline, &cmdline);
    identity_tables(&vm.ram);
    // GDT: null, null, __BOOT_CS (0x10, 64-bit code), __BOOT_DS (0x18, data).
    let gdt: [u64; 4] = [0, 0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    vm.ram.write(GDT, &bytes);
    println!(
        "[vmm] Linux: protocol {}.{:02}, kernel {} KiB at {:#x}, entry {:#x}, {} MiB RAM",
        bz.version >> 8,
        bz.version & 0xff,
        bz.kernel().len() / 1024,
        layout.kernel,
        layout.entry64,
        RAM >> 20
    );

    let w = utcb_words();
    crate::long_mode_state(w, layout.entry64);
    w[state::CS] = state::segment(0x10, 0x29b, 0xffff_ffff);
    for s in [state::SS, state::DS, state::ES, state::FS, state::GS] {
        w[s] = state::segment(0x18, 0xc93, 0xffff_ffff);
    }
    w[state::GDTR] = 31;
    w[state::GDTR + 1] = GDT;
    w[state::RSI] = layout.zero_page;
    w[state::RSP] = 0;

    let uart = alloc::rc::Rc::new(core::cell::RefCell::new(Uart8250::new()));
    let mut bus = PortBus::new();
    if bus
        .register(
            uart8250::COM1_PORT,
            uart8250::LENGTH,
            alloc::boxed::Box::new(uart.clone()),
        )
        .is_err()
    {
        return 1;
    }
    let mut line: Vec<u8> = Vec::new();
    let mut banner = false;
    let mut mask = state::ALL;
    let mut exits_seen = 0u64;
    let outcome = loop {
        exits_seen += 1;
        if exits_seen > MAX_EXITS {
            break "too many exits";
        }
        let code = match run(vm.vcpu, mask, 0) {
            Ok(code) => code,
            Err(e) => {
                let w = utcb_words();
                println!(
                    "[vmm] VcpuRun refused: {e} (cr0 {:#x} cr4 {:#x} efer {:#x} mask {mask:#x})",
                    w[state::CR0],
                    w[state::CR4],
                    w[state::EFER]
                );
                break "VcpuRun refused";
            }
        };
        mask = state::GPRS;
        let w = utcb_words();
        for b in core::mem::take(&mut uart.borrow_mut().output) {
            if b == b'\n' {
                let text = core::str::from_utf8(&line).unwrap_or("<binary>");
                banner |= text.contains("Linux version");
                println!("[linux] {}", text.trim_end_matches('\r'));
                line.clear();
            } else {
                line.push(b);
            }
        }
        match code {
            exit::IOIO => {
                let Some(io) = IoExit::decode(w[state::EXIT_INFO1]) else {
                    break "bad I/O exit";
                };
                if io.string {
                    break "string I/O";
                }
                port_io(&mut bus, &io, w);
                w[state::RIP] = w[state::EXIT_INFO2];
            }
            exit::CPUID => emulate_cpuid(w, |_| None),
            exit::MSR => {
                let msr = w[state::RCX] & 0xffff_ffff;
                let write = w[state::EXIT_INFO1] != 0;
                let value = (w[state::RDX] << 32) | (w[state::RAX] & 0xffff_ffff);
                match (msr, write) {
                    (MSR_EFER, false) => {
                        let efer = w[state::EFER] & !EFER_SVME;
                        (w[state::RAX], w[state::RDX]) = (efer & 0xffff_ffff, efer >> 32);
                    }
                    (MSR_EFER, true) if value & !EFER_WRITABLE == 0 => {
                        // LMA follows LME and CR0.PG; the kernel keeps SVME set.
                        let paging = w[state::CR0] & (1 << 31) != 0;
                        let long = value & EFER_LME != 0;
                        w[state::EFER] =
                            (value & !EFER_LMA) | if long && paging { EFER_LMA } else { 0 };
                        mask |= state::CONTROL;
                    }
                    _ => {
                        // Not emulated: #GP(0), which Linux's safe accessors expect.
                        println!(
                            "[vmm] Linux: {} MSR {msr:#x} refused with #GP",
                            if write { "wrmsr" } else { "rdmsr" }
                        );
                        w[state::EVENT_INJECT] = INJECT_GP0;
                        mask |= state::EVENTS;
                        continue;
                    }
                }
                w[state::RIP] += exits::MSR_LENGTH;
            }
            exit::HLT => break "HLT (no timer or interrupt controller yet)",
            exit::SHUTDOWN => break "SHUTDOWN (triple fault)",
            exit::NPF => {
                println!(
                    "[vmm] Linux touched guest-physical {:#x} outside RAM at rip {:#x}",
                    w[state::EXIT_INFO2],
                    w[state::RIP]
                );
                break "access outside RAM (no MMIO devices yet)";
            }
            other => {
                println!(
                    "[vmm] Linux: unhandled exit {other:#x} at rip {:#x}",
                    w[state::RIP]
                );
                break "unhandled exit";
            }
        }
    };
    if !line.is_empty() {
        println!(
            "[linux] {}",
            core::str::from_utf8(&line).unwrap_or("<binary>")
        );
    }
    let w = utcb_words();
    println!(
        "[vmm] Linux stopped after {exits_seen} exits: {outcome} (rip {:#x})",
        w[state::RIP]
    );
    if banner {
        0
    } else {
        1
    }
}
