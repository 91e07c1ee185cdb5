//! A 32-bit Multiboot (v1) test guest, booted by the VMM as QEMU's `-kernel` would: it checks
//! what the loader promised (EAX magic, the boot information: memory sizes, memory map,
//! command line, a module's contents), reads `fw_cfg` (signature, RAM size, CPU count), and
//! exercises the local APIC: the one-shot timer through the xAPIC page, then, in x2APIC mode,
//! the TSC-deadline timer, a self-IPI, an NMI and INIT/SIPI, waiting in HLT for interrupts.
//! Each case prints `ok N - multiboot: case` (or `not ok`) on COM1, then the plan line; the
//! guest ends by writing its number of failures to the debug-exit port 0xf4.
//!
//! The command line sets the expectations: `ram=SIZE` (what fw_cfg and the boot information
//! must report), `module=TEXT` (the first module's contents and string, `_` for a space), and
//! `exit=N` (write N to the debug-exit port at once, for the VMM's negative test).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering::SeqCst};

/// COM1.
const COM1: u16 = 0x3f8;
/// The debug-exit port.
const DEBUG_EXIT: u16 = 0xf4;
/// fw_cfg selector and data ports.
const FW_CFG_SELECT: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
/// The xAPIC page.
const XAPIC: u32 = 0xfee0_0000;
/// Vectors.
const TIMER_VECTOR: u32 = 0x40;
const IPI_VECTOR: u32 = 0x41;
const DEADLINE_VECTOR: u32 = 0x42;
const X2_IPI_VECTOR: u32 = 0x43;
const SPURIOUS_VECTOR: u32 = 0xff;
/// MSRs.
const IA32_APIC_BASE: u32 = 0x1b;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
const X2APIC_ID: u32 = 0x802;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_SELF_IPI: u32 = 0x83f;

/// Interrupts taken, by kind.
static TIMER: AtomicU32 = AtomicU32::new(0);
static IPI: AtomicU32 = AtomicU32::new(0);
static DEADLINE: AtomicU32 = AtomicU32::new(0);
static X2_IPI: AtomicU32 = AtomicU32::new(0);
static NMI: AtomicU32 = AtomicU32::new(0);
static SPURIOUS: AtomicU32 = AtomicU32::new(0);
/// 1 once the APIC is in x2APIC mode (the EOI goes to the MSR then).
static X2APIC_MODE: AtomicU32 = AtomicU32::new(0);
/// The TSC when the deadline interrupt came (low 32 bits suffice for the check).
static DEADLINE_TSC: AtomicU32 = AtomicU32::new(0);

static NEXT: AtomicU32 = AtomicU32::new(1);
static FAILED: AtomicU32 = AtomicU32::new(0);

global_asm!(
    // The multiboot header: magic, flags (page-aligned modules, memory information), checksum.
    ".section .multiboot, \"a\"",
    ".balign 4",
    ".long 0x1badb002",
    ".long 0x00000003",
    ".long -(0x1badb002 + 0x00000003)",
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "    mov esp, offset {stack}",
    "    add esp, {stack_size}",
    // SSE on (the i686 code uses it): CR4.OSFXSR | OSXMMEXCPT, CR0.MP, not EM.
    "    mov ecx, cr4",
    "    or ecx, 0x600",
    "    mov cr4, ecx",
    "    mov ecx, cr0",
    "    and ecx, 0xfffffffb",
    "    or ecx, 2",
    "    mov cr0, ecx",
    // The i386 ABI wants a 16-byte aligned stack at each call (the compiler's aligned SSE
    // stores of locals rely on it): two arguments of 4 bytes follow.
    "    and esp, 0xfffffff0",
    "    sub esp, 8",
    "    push ebx",
    "    push eax",
    "    call {main}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    // One stub per vector: save the registers, call `interrupt(vector)`, return.
    ".macro stub vector",
    "isr_\\vector:",
    "    pushad",
    "    push \\vector",
    "    call {interrupt}",
    "    add esp, 4",
    "    popad",
    "    iretd",
    ".endm",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,64,65,66,67,255",
    "stub \\v",
    ".endr",
    ".section .rodata.isr_table, \"a\"",
    ".balign 4",
    ".global ISR_TABLE",
    "ISR_TABLE:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,64,65,66,67,255",
    ".long \\v, isr_\\v",
    ".endr",
    ".long 0xffffffff, 0",
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym main,
    interrupt = sym interrupt,
);

const STACK_SIZE: usize = 64 * 1024;
/// The boot stack (only its address is used, by `_start`).
#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; STACK_SIZE]);
static mut STACK: Stack = Stack([0; STACK_SIZE]);

extern "C" {
    /// (vector, handler address) pairs, ended by vector 0xffffffff.
    static ISR_TABLE: [[u32; 2]; 38];
}

/// The IDT and the GDT (null, flat code 0x08, flat data 0x10).
#[repr(C, align(8))]
struct Tables {
    idt: [u64; 256],
    gdt: [u64; 3],
}
static mut TABLES: Tables = Tables {
    idt: [0; 256],
    gdt: [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff],
};

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O; the VMM emulates it.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v) }
}
fn outw(port: u16, v: u16) {
    // SAFETY: as above.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v) }
}
fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v) }
}
fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v) };
    v
}
fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v) };
    v
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the VMM emulates the MSRs this guest uses (or injects #GP, which is reported).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32) }
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID has no side effects; EBX is saved around it (LLVM may use it).
    unsafe {
        asm!(
            "mov {b:e}, ebx",
            "cpuid",
            "xchg {b:e}, ebx",
            b = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0 => c,
            out("edx") d,
        )
    };
    [a, b, c, d]
}

/// An xAPIC register read: a plain `mov` load, as MMIO accessors are (a volatile read in Rust
/// may be folded into another instruction that the VMM does not emulate).
fn xapic_read(offset: u32) -> u32 {
    let value: u32;
    // SAFETY: the xAPIC page is emulated by the VMM (paging is off: physical addresses).
    unsafe {
        asm!("mov {v:e}, dword ptr [{a:e}]", a = in(reg) XAPIC + offset, v = out(reg) value, options(nostack))
    };
    value
}

/// An xAPIC register write: a plain `mov` store.
fn xapic_write(offset: u32, value: u32) {
    // SAFETY: as for `xapic_read`.
    unsafe {
        asm!("mov dword ptr [{a:e}], {v:e}", a = in(reg) XAPIC + offset, v = in(reg) value, options(nostack))
    };
}

/// Let interrupts in until `counter` moves from `before` (HLT between checks); false if it
/// did not within a bound.
fn wait_for(counter: &AtomicU32, before: u32) -> bool {
    for _ in 0..1000 {
        if counter.load(SeqCst) != before {
            return true;
        }
        // SAFETY: the IDT is loaded; the handlers only count.
        unsafe { asm!("sti", "hlt", "cli") };
    }
    counter.load(SeqCst) != before
}

struct Serial;
impl Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            while inb(COM1 + 5) & 0x20 == 0 {}
            outb(COM1, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => { let _ = writeln!(Serial, $($arg)*); };
}

fn report(ok: bool, case: &str) {
    let n = NEXT.fetch_add(1, SeqCst);
    if !ok {
        FAILED.fetch_add(1, SeqCst);
    }
    say!("{}ok {n} - multiboot: {case}", if ok { "" } else { "not " });
}

/// A NUL-terminated string at guest-physical `address` (at most 256 bytes).
fn c_string(address: u32) -> &'static [u8] {
    if address == 0 {
        return &[];
    }
    // SAFETY: the boot information's strings lie in RAM (paging is off).
    let bytes = unsafe { core::slice::from_raw_parts(address as *const u8, 256) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(0);
    &bytes[..end]
}

fn word(address: u32) -> u32 {
    // SAFETY: reads of the boot information, which lies in RAM.
    unsafe { core::ptr::read_volatile(address as *const u32) }
}

fn fw_cfg(key: u16, out: &mut [u8]) {
    outw(FW_CFG_SELECT, key);
    for b in out {
        *b = inb(FW_CFG_DATA);
    }
}

/// `SIZE` with an optional K/M/G suffix.
fn parse_size(text: &[u8]) -> Option<u64> {
    let (digits, shift) = match text.last()? {
        b'K' => (&text[..text.len() - 1], 10),
        b'M' => (&text[..text.len() - 1], 20),
        b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let mut value: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some(value << shift)
}

fn argument<'a>(cmdline: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ')
        .find_map(|word| word.strip_prefix(name)?.strip_prefix(b"="))
}

fn load_tables() {
    let table = {
        // SAFETY: a table the assembly above defines.
        unsafe { &*core::ptr::addr_of!(ISR_TABLE) }
    };
    // SAFETY: set up once, before interrupts are enabled.
    let tables = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    for &[vector, handler] in table.iter().take_while(|e| e[0] != u32::MAX) {
        // 32-bit interrupt gate, present, DPL 0, selector 0x08.
        tables.idt[vector as usize] = u64::from(handler & 0xffff)
            | (0x08 << 16)
            | (0x8e00u64 << 32)
            | (u64::from(handler >> 16) << 48);
    }
    let idtr: [u16; 3] = {
        let base = tables.idt.as_ptr() as u32;
        [256 * 8 - 1, base as u16, (base >> 16) as u16]
    };
    let gdtr: [u16; 3] = {
        let base = tables.gdt.as_ptr() as u32;
        [3 * 8 - 1, base as u16, (base >> 16) as u16]
    };
    // SAFETY: the GDT's flat segments are the ones we run on; the IDT's handlers exist.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "lidt [{idtr}]",
            "mov {t:e}, 0x10",
            "mov ds, {t:e}",
            "mov es, {t:e}",
            "mov fs, {t:e}",
            "mov gs, {t:e}",
            "mov ss, {t:e}",
            "push 0x08",
            "lea {t:e}, [2f]",
            "push {t:e}",
            "retf",
            "2:",
            gdtr = in(reg) gdtr.as_ptr(),
            idtr = in(reg) idtr.as_ptr(),
            t = out(reg) _,
        )
    };
}

extern "C" fn interrupt(vector: u32) {
    let counter = match vector {
        2 => &NMI,
        TIMER_VECTOR => &TIMER,
        IPI_VECTOR => &IPI,
        DEADLINE_VECTOR => {
            DEADLINE_TSC.store(rdtsc() as u32, SeqCst);
            &DEADLINE
        }
        X2_IPI_VECTOR => &X2_IPI,
        SPURIOUS_VECTOR => &SPURIOUS,
        exception => {
            say!("not ok - multiboot: unexpected exception {exception}");
            outl(DEBUG_EXIT, 100 + exception);
            loop {
                // SAFETY: stop here.
                unsafe { asm!("cli", "hlt") };
            }
        }
    };
    counter.fetch_add(1, SeqCst);
    if vector != 2 && vector != SPURIOUS_VECTOR {
        if X2APIC_MODE.load(SeqCst) != 0 {
            wrmsr(X2APIC_EOI, 0);
        } else {
            xapic_write(0xb0, 0);
        }
    }
}

extern "C" fn main(magic: u32, info: u32) -> ! {
    load_tables();
    say!("multiboot guest: magic {magic:#x}, boot information at {info:#x}");
    let cmdline = if word(info) & 4 != 0 {
        c_string(word(info + 16))
    } else {
        &[]
    };
    if let Some(status) = argument(cmdline, b"exit").and_then(parse_size) {
        say!("multiboot guest: exiting with status {status} as asked");
        outl(DEBUG_EXIT, status as u32);
    }
    let ram = argument(cmdline, b"ram").and_then(parse_size).unwrap_or(0);
    boot_information(magic, info, cmdline, ram);
    firmware_configuration(ram);
    apic();
    string_io();
    let n = NEXT.load(SeqCst) - 1;
    say!("1..{n}");
    let failed = FAILED.load(SeqCst);
    say!("multiboot guest: {failed} failed, writing the status to port {DEBUG_EXIT:#x}");
    outl(DEBUG_EXIT, failed);
    loop {
        // SAFETY: the VMM ended the compartment at the write above; stop if not.
        unsafe { asm!("cli", "hlt") };
    }
}

fn boot_information(magic: u32, info: u32, cmdline: &[u8], ram: u64) {
    report(
        magic == 0x2bad_b002,
        "EAX holds the boot loader magic 0x2badb002",
    );
    let flags = word(info);
    report(
        flags & 0x4d == 0x4d,
        "the boot information has memory, command line, modules and memory map",
    );
    report(
        cmdline.starts_with(b"mbtest ") && ram != 0,
        "the command line is the cmdline module's (mbtest ram=...)",
    );
    let (lower, upper) = (word(info + 4), word(info + 8));
    report(
        lower == 639 && u64::from(upper) == (ram - (1 << 20)) >> 10,
        "mem_lower is 639 KiB and mem_upper is RAM above 1 MiB",
    );
    let (length, map) = (word(info + 44), word(info + 48));
    let mut available = 0u64;
    let mut at = map;
    while at < map + length {
        let size = word(at);
        let base = u64::from(word(at + 4)) | u64::from(word(at + 8)) << 32;
        let bytes = u64::from(word(at + 12)) | u64::from(word(at + 16)) << 32;
        if word(at + 20) == 1 && base + bytes <= ram {
            available += bytes;
        }
        at += size + 4;
    }
    report(
        length > 0 && available == ram - 0x6_0400,
        "the memory map lists all RAM but the legacy hole as available",
    );
    let (count, modules) = (word(info + 20), word(info + 24));
    let expected = argument(cmdline, b"module").unwrap_or(b"");
    let matches = |text: &[u8]| {
        text.len() == expected.len()
            && text
                .iter()
                .zip(expected)
                .all(|(&t, &e)| t == e || (t == b' ' && e == b'_'))
    };
    let (start, end) = (word(modules), word(modules + 4));
    let contents = if count >= 1 && end >= start {
        // SAFETY: the module lies in RAM (paging is off).
        unsafe { core::slice::from_raw_parts(start as *const u8, (end - start) as usize) }
    } else {
        &[]
    };
    report(
        count == 1 && start % 4096 == 0 && start >= 0x10_0000,
        "one module, page-aligned above 1 MiB",
    );
    report(
        !expected.is_empty() && matches(contents),
        "the module holds the text the command line names",
    );
    report(
        count == 1 && c_string(word(modules + 8)) == b"greeting",
        "the module's string is its name",
    );
    report(
        c_string(word(info + 64)).starts_with(b"l4"),
        "the boot loader has a name",
    );
}

fn firmware_configuration(ram: u64) {
    let mut signature = [0u8; 4];
    fw_cfg(0, &mut signature);
    report(&signature == b"QEMU", "fw_cfg signature is QEMU");
    let mut size = [0u8; 8];
    fw_cfg(3, &mut size);
    report(
        u64::from_le_bytes(size) == ram,
        "fw_cfg RAM size matches the boot information",
    );
    let mut cpus = [0u8; 2];
    fw_cfg(5, &mut cpus);
    report(u16::from_le_bytes(cpus) == 1, "fw_cfg reports one CPU");
    report(
        inl(0x2f0) == u32::MAX && inb(0x300) == 0xff,
        "unclaimed ports read as all ones",
    );
}

fn apic() {
    // xAPIC: enabled at its default base.
    let base = rdmsr(IA32_APIC_BASE);
    report(
        base & 0xffff_f000 == u64::from(XAPIC) && base & (1 << 11) != 0,
        "the APIC is enabled at 0xfee00000",
    );
    let version = xapic_read(0x30);
    report(
        version & 0xff >= 0x10 && xapic_read(0x20) >> 24 == 0,
        "xAPIC version and id read through MMIO",
    );
    xapic_write(0xf0, 0x100 | SPURIOUS_VECTOR);
    // One-shot timer, divide by 1.
    xapic_write(0x3e0, 0xb);
    xapic_write(0x320, TIMER_VECTOR);
    let before = TIMER.load(SeqCst);
    xapic_write(0x380, 200_000);
    let fired = wait_for(&TIMER, before);
    report(
        fired && xapic_read(0x390) == 0,
        "xAPIC one-shot timer interrupt wakes HLT, count reaches 0",
    );
    report(
        !wait_for_short(&TIMER, before + 1),
        "the one-shot timer fires once",
    );
    // Self-IPI through the ICR (shorthand self, fixed).
    let before = IPI.load(SeqCst);
    xapic_write(0x300, (1 << 18) | IPI_VECTOR);
    report(wait_for_short(&IPI, before), "xAPIC self-IPI is delivered");

    // x2APIC.
    let features = cpuid(1)[2];
    report(
        features & (1 << 21) != 0 && features & (1 << 24) != 0,
        "CPUID offers x2APIC and the TSC-deadline timer",
    );
    wrmsr(IA32_APIC_BASE, base | (1 << 10) | (1 << 11));
    X2APIC_MODE.store(1, SeqCst);
    report(
        rdmsr(IA32_APIC_BASE) & (1 << 10) != 0 && rdmsr(X2APIC_ID) == 0,
        "x2APIC mode on, id 0",
    );
    wrmsr(X2APIC_SVR, u64::from(0x100 | SPURIOUS_VECTOR));
    wrmsr(X2APIC_LVT_TIMER, u64::from(DEADLINE_VECTOR | (2 << 17)));
    let before = DEADLINE.load(SeqCst);
    let deadline = rdtsc() + 2_000_000;
    wrmsr(IA32_TSC_DEADLINE, deadline);
    let fired = wait_for(&DEADLINE, before);
    let late_enough = DEADLINE_TSC.load(SeqCst).wrapping_sub(deadline as u32) < 1 << 31;
    report(
        fired && late_enough,
        "TSC-deadline timer interrupt after its deadline",
    );
    report(
        rdmsr(IA32_TSC_DEADLINE) == 0,
        "the deadline MSR reads 0 once it fired",
    );
    let before = X2_IPI.load(SeqCst);
    wrmsr(X2APIC_SELF_IPI, u64::from(X2_IPI_VECTOR));
    report(
        wait_for_short(&X2_IPI, before),
        "x2APIC SELF IPI is delivered",
    );
    let before = NMI.load(SeqCst);
    // NMI to APIC id 0 (ourselves), physical destination.
    wrmsr(X2APIC_ICR, 4 << 8);
    report(
        wait_for_short(&NMI, before),
        "NMI through the ICR is delivered",
    );
    // INIT and SIPI to a CPU that does not exist: accepted without a fault.
    wrmsr(X2APIC_ICR, (1 << 32) | (5 << 8) | (1 << 14));
    wrmsr(X2APIC_ICR, (1 << 32) | (6 << 8) | 0x10);
    report(true, "INIT and SIPI are accepted");
    report(SPURIOUS.load(SeqCst) == 0, "no spurious interrupts");
}

/// REP OUTSB and REP INSB, which the VMM completes through the guest's memory.
fn string_io() {
    // This case's own TAP line goes out with REP OUTSB: it counts only if it arrives intact.
    let n = NEXT.fetch_add(1, SeqCst);
    let mut line = [0u8; 80];
    let mut cursor = Cursor {
        buf: &mut line,
        len: 0,
    };
    let _ = writeln!(
        cursor,
        "ok {n} - multiboot: REP OUTSB writes this line to COM1"
    );
    let len = cursor.len;
    // SAFETY: reads `len` bytes of `line` and writes them to COM1.
    unsafe {
        // ESI is LLVM's on i686: saved and restored around the instruction.
        asm!(
            "push esi",
            "mov esi, {source:e}",
            "cld",
            "rep outsb",
            "pop esi",
            source = in(reg) line.as_ptr(),
            in("dx") COM1,
            inout("ecx") len => _,
        )
    };
    // REP INSB from an unclaimed port: all ones, RDI and RCX advanced as the CPU does.
    let mut buffer = Aligned([0u8; 64]);
    let buffer = &mut buffer.0;
    let (end, left): (usize, usize);
    // SAFETY: writes at most the 64 bytes of `buffer`.
    unsafe {
        asm!("cld", "rep insb", in("dx") 0x2e8u16, inout("edi") buffer.as_mut_ptr() => end, inout("ecx") 64usize => left)
    };
    report(
        buffer.iter().all(|&b| b == 0xff) && left == 0 && end == buffer.as_ptr() as usize + 64,
        "REP INSB from an unclaimed port fills the buffer with all ones",
    );
}

/// Bytes at a 16-byte boundary.
#[repr(C, align(16))]
struct Aligned<const N: usize>([u8; N]);

/// A `fmt::Write` into a byte buffer.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        // Byte by byte (volatile, so that no call to memcpy, which the guest lacks, appears).
        for (i, b) in s.bytes().enumerate() {
            // SAFETY: inside `buf` (checked above).
            unsafe { core::ptr::write_volatile(&mut self.buf[self.len + i], b) };
        }
        self.len = end;
        Ok(())
    }
}

/// Like [`wait_for`], but without HLT (for events that need no timer: HLT with nothing due
/// would block): a few rounds with interrupts open.
fn wait_for_short(counter: &AtomicU32, before: u32) -> bool {
    for _ in 0..100 {
        if counter.load(SeqCst) != before {
            return true;
        }
        // SAFETY: the IDT is loaded; the handlers only count.
        unsafe { asm!("sti", "nop", "cli") };
    }
    counter.load(SeqCst) != before
}

/// Referred to by the prebuilt `core` of the hosted target; never called (the guest aborts on
/// panic and does not unwind).
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("not ok - multiboot: guest panic: {info}");
    outl(DEBUG_EXIT, 99);
    loop {
        // SAFETY: stop here.
        unsafe { asm!("cli", "hlt") };
    }
}
