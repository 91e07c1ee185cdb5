//! A bare-metal test guest, started by the VMM in 64-bit mode with identity-mapped paging.
//! Each case checks one mechanism of the VM (port I/O, CPUID, MSRs, hypercalls, interrupts,
//! lazy memory, MMIO, exceptions) and prints `ok - case` or `not ok - case` on the test
//! device's console port; the VMM numbers the lines. It ends by writing the number of failures
//! to the exit port.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use x86_64::instructions::port::Port;
use x86_64::registers::control::{Cr2, Cr4};
use x86_64::registers::debug::{DebugAddressRegister, Dr0, Dr1, Dr2, Dr3};
use x86_64::registers::model_specific::Msr;
use x86_64::registers::xcontrol::XCr0;

const BASE: u16 = 0xe0;
const CONSOLE: u16 = BASE;
const EXIT: u16 = BASE + 4;
const SCRATCH: u16 = BASE + 8;
const COUNTER: u16 = BASE + 12;
const STATUS: u16 = BASE + 16;
/// The VMM's MMIO scratch device.
const MMIO: u64 = 0xd000_0000;
/// Guest RAM the VMM maps only when touched.
const LAZY: u64 = 0x80_0000;
/// An address outside RAM and devices.
const NOWHERE: u64 = 0x8000_0000;
/// The VMM's test MSR.
const TEST_MSR: u32 = 0x4b56_4d10;

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O in the guest; the VMM intercepts it.
    unsafe { Port::new(port).write(v) }
}
fn outw(port: u16, v: u16) {
    // SAFETY: as above.
    unsafe { Port::new(port).write(v) }
}
fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { Port::new(port).write(v) }
}
fn inb(port: u16) -> u8 {
    // SAFETY: as above.
    unsafe { Port::new(port).read() }
}
fn inw(port: u16) -> u16 {
    // SAFETY: as above.
    unsafe { Port::new(port).read() }
}
fn inl(port: u16) -> u32 {
    // SAFETY: as above.
    unsafe { Port::new(port).read() }
}

struct Console;
impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(CONSOLE, b);
        }
        Ok(())
    }
}

static FAILED: AtomicU64 = AtomicU64::new(0);

fn check(case: &str, ok: bool) {
    if !ok {
        FAILED.fetch_add(1, SeqCst);
    }
    let _ = writeln!(Console, "{}ok - {case}", if ok { "" } else { "not " });
}

// ---- interrupts: GDT, IDT and handlers

static TIMER: AtomicU64 = AtomicU64::new(0);
static WINDOW: AtomicU64 = AtomicU64::new(0);
static UD: AtomicU64 = AtomicU64::new(0);
static GP: AtomicU64 = AtomicU64::new(0);
static NMI: AtomicU64 = AtomicU64::new(0);
static TS_ERROR: AtomicU64 = AtomicU64::new(0);
static REINJECTED: AtomicU64 = AtomicU64::new(0);
/// How many bytes the #UD and #GP handlers skip: the length of the faulting instruction
/// (`ud2`, `rdmsr`, `wrmsr`: 2; `xsetbv`: 3).
static SKIP: AtomicU64 = AtomicU64::new(2);

#[no_mangle]
extern "C" fn guest_interrupt(vector: u64, frame: *mut u64) {
    match vector {
        2 => {
            NMI.fetch_add(1, SeqCst);
        }
        10 => {
            // SAFETY: the error code sits just below the interrupt frame.
            TS_ERROR.store(unsafe { *frame.sub(1) }, SeqCst);
        }
        6 => {
            UD.fetch_add(1, SeqCst);
            // SAFETY: `frame` points at the interrupt frame; skip the faulting instruction.
            unsafe { *frame += SKIP.load(SeqCst) };
        }
        13 => {
            GP.fetch_add(1, SeqCst);
            // SAFETY: as above.
            unsafe { *frame += SKIP.load(SeqCst) };
        }
        0x30 => {
            TIMER.fetch_add(1, SeqCst);
        }
        0x31 => {
            WINDOW.fetch_add(1, SeqCst);
        }
        0x32 => {
            REINJECTED.fetch_add(1, SeqCst);
        }
        _ => {}
    }
}

global_asm!(
    r#"
.section .text.start, "ax"
.global _start
_start:
    lgdt [rip + guest_gdt_pointer]
    lea rax, [rip + 2f]
    push 0x08
    push rax
    retfq
2:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    call guest_main
3:
    hlt
    jmp 3b

.macro STUB vector, error
guest_isr_\vector:
    .if \error == 0
    push 0
    .endif
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov edi, \vector
    lea rsi, [rsp + 80]
    call guest_interrupt
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq
.endm
STUB 2, 0
STUB 6, 0
STUB 10, 1
STUB 13, 1
STUB 48, 0
STUB 49, 0
STUB 50, 0

.section .rodata
.balign 8
.global guest_isr_table
guest_isr_table:
            .quad guest_isr_2, guest_isr_6, guest_isr_10, guest_isr_13, guest_isr_48, guest_isr_49, guest_isr_50

.section .data
.balign 16
.global guest_gdt
guest_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .quad 0, 0
guest_gdt_pointer:
    .short 55
    .quad guest_gdt

// Run `xsetbv` with ecx = 0, edx:eax = rsi at CPL 3 on the user stack whose top is rdi, and
// come back: the ring-3 code ends with `int 0x33`, whose gate (DPL 3) is `guest_user_return`.
// The TSS's RSP0 is the stack of this call.
.section .text
.global guest_xsetbv_user
guest_xsetbv_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + guest_saved_rsp], rsp
    mov [rip + guest_tss + 4], rsp
    mov rax, rsi
    mov rdx, rsi
    shr rdx, 32
    push 0x1b
    push rdi
    push 0x2
    push 0x23
    lea rcx, [rip + 8f]
    push rcx
    xor ecx, ecx
    iretq
8:
    xsetbv
    int 0x33
.global guest_user_return
guest_user_return:
    mov rsp, [rip + guest_saved_rsp]
    mov ax, 0x10
    mov ss, ax
    mov ds, ax
    mov es, ax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.section .data
.balign 16
.global guest_tss
guest_tss:
    .fill 104, 1, 0
guest_saved_rsp:
    .quad 0
"#
);

// 32-bit protected-mode guests (paging off) the VMM runs in VMs of their own: it finds them by
// section name in this image and copies them to guest-physical 0x7000. `.guest32_peek` stores
// what it finds in DR0-DR3, CR2 and the syscall MSRs (at 0x9000: the debug registers and CR2
// as dwords, from 0x9020 the MSRs as qwords), then writes values of its own to all of them.
global_asm!(
    r#"
.section .guest32, "ax"
.global guest32_store
guest32_store:
.code32
    mov eax, 0x12345678
    mov dword ptr [0x9000], eax
    xor eax, eax
    mov dx, 0xe4
    out dx, eax
2:
    hlt
    jmp 2b
.section .guest32_sse, "ax"
.global guest32_sse
guest32_sse:
    mov eax, 0xdeadbeef
    movd xmm0, eax
    xor eax, eax
    mov dx, 0xe4
    out dx, eax
3:
    hlt
    jmp 3b
.section .guest32_peek, "ax"
.global guest32_peek
guest32_peek:
    jmp 7f
guest32_peek_msrs:
    .long 0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, 0xc0000102, 0x174, 0x175, 0x176, 0
.set PEEK_MSRS, guest32_peek_msrs - guest32_peek + 0x7000
7:
    mov eax, dr0
    mov dword ptr [0x9000], eax
    mov eax, dr1
    mov dword ptr [0x9004], eax
    mov eax, dr2
    mov dword ptr [0x9008], eax
    mov eax, dr3
    mov dword ptr [0x900c], eax
    mov eax, cr2
    mov dword ptr [0x9010], eax
    mov esi, 0x9020
    mov edi, offset PEEK_MSRS
4:
    mov ecx, dword ptr [edi]
    test ecx, ecx
    jz 5f
    rdmsr
    mov dword ptr [esi], eax
    mov dword ptr [esi + 4], edx
    mov eax, ecx
    and eax, 0xff
    or eax, 0x5a5a0000
    xor edx, edx
    wrmsr
    add esi, 8
    add edi, 4
    jmp 4b
5:
    mov eax, 0x5a5a0010
    mov dr0, eax
    mov eax, 0x5a5a0020
    mov dr1, eax
    mov eax, 0x5a5a0030
    mov dr2, eax
    mov eax, 0x5a5a0040
    mov dr3, eax
    mov eax, 0x5a5a0050
    mov cr2, eax
    xor eax, eax
    mov dx, 0xe4
    out dx, eax
6:
    hlt
    jmp 6b
.code64
"#
);

extern "C" {
    fn guest32_store();
    fn guest32_sse();
    fn guest32_peek();
}

/// Keeps the 32-bit guests' sections in the image (nothing in this guest calls them).
#[used]
static GUEST32_SECTIONS: [unsafe extern "C" fn(); 3] = [guest32_store, guest32_sse, guest32_peek];

#[repr(C, align(16))]
struct Idt([[u64; 2]; 64]);
static mut IDT: Idt = Idt([[0; 2]; 64]);

fn setup_idt() {
    extern "C" {
        static guest_isr_table: [u64; 7];
    }
    for (i, vector) in [2usize, 6, 10, 13, 0x30, 0x31, 0x32]
        .into_iter()
        .enumerate()
    {
        // SAFETY: reading the table of stub addresses.
        let handler = unsafe { guest_isr_table[i] };
        let low =
            (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | ((handler >> 16) & 0xffff) << 48;
        // SAFETY: single-threaded guest; the IDT is ours.
        unsafe { (*core::ptr::addr_of_mut!(IDT)).0[vector] = [low, handler >> 32] };
    }
    let handler = guest_user_return as *const () as u64;
    let low = (handler & 0xffff) | (0x08 << 16) | (0xee00 << 32) | ((handler >> 16) & 0xffff) << 48;
    // SAFETY: as above; vector 0x33 may be raised at CPL 3 (DPL 3) to come back from it.
    unsafe { (*core::ptr::addr_of_mut!(IDT)).0[0x33] = [low, handler >> 32] };
    load_idt(core::ptr::addr_of!(IDT) as u64);
    // A 64-bit TSS (for RSP0 when an exception or `int 0x33` comes from CPL 3) in GDT slot 5.
    // SAFETY: single-threaded guest; the GDT slots 5 and 6 are reserved for it.
    unsafe {
        let tss = core::ptr::addr_of!(guest_tss) as u64;
        let gdt = core::ptr::addr_of_mut!(guest_gdt) as *mut u64;
        let low = 103 | (tss & 0xff_ffff) << 16 | 0x89 << 40 | ((tss >> 24) & 0xff) << 56;
        gdt.add(5).write(low);
        gdt.add(6).write(tss >> 32);
        asm!("ltr {0:x}", in(reg) 0x28u16);
    }
}

extern "C" {
    static mut guest_gdt: [u64; 7];
    static guest_tss: [u8; 104];
    fn guest_user_return();
    fn guest_xsetbv_user(user_stack_top: u64, value: u64);
}

/// A stack for the excursion to CPL 3.
#[repr(C, align(16))]
struct UserStack([u8; 4096]);
static mut USER_STACK: UserStack = UserStack([0; 4096]);

fn xgetbv() -> u64 {
    // (Only called with CR4.OSXSAVE set.)
    XCr0::read_raw()
}

/// `xsetbv` of `value` into XCR `index`; returns how many #UD and #GP it raised.
fn xsetbv_faults(index: u32, value: u64) -> (u64, u64) {
    let (ud, gp) = (UD.load(SeqCst), GP.load(SeqCst));
    SKIP.store(3, SeqCst);
    // SAFETY: the value is one the kernel must refuse (the handlers skip the instruction) or
    // the XCR0 the guest already has.
    unsafe {
        asm!("xsetbv", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32)
    };
    SKIP.store(2, SeqCst);
    (UD.load(SeqCst) - ud, GP.load(SeqCst) - gp)
}

fn set_cr4_bit(bit: u32, on: bool) {
    let cr4 = Cr4::read_raw();
    let cr4 = if on {
        cr4 | 1 << bit
    } else {
        cr4 & !(1 << bit)
    };
    // SAFETY: toggles OSXSAVE in our own CR4.
    unsafe { Cr4::write_raw(cr4) }
}

/// XSETBV behaves as on the CPU: #UD without CR4.OSXSAVE, #GP(0) at CPL 3 or for an invalid
/// XCR0, and a refused XSETBV changes nothing. Starts and ends with CR4.OSXSAVE set and XCR0 = 3.
fn xsetbv_cases() {
    set_cr4_bit(18, false);
    let faults = xsetbv_faults(0, 1);
    set_cr4_bit(18, true);
    check(
        "xsetbv: #UD when the guest's CR4.OSXSAVE is clear",
        faults == (1, 0) && xgetbv() == 3,
    );
    let gp = GP.load(SeqCst);
    SKIP.store(3, SeqCst);
    // SAFETY: runs `xsetbv` at CPL 3 on our user stack (identity pages are user-accessible);
    // the #GP handler skips it and `int 0x33` brings us back.
    unsafe {
        let top = core::ptr::addr_of_mut!(USER_STACK) as u64 + 4096;
        guest_xsetbv_user(top, 1);
    }
    SKIP.store(2, SeqCst);
    check(
        "xsetbv: #GP(0) at CPL 3",
        GP.load(SeqCst) == gp + 1 && xgetbv() == 3,
    );
    let before = xgetbv();
    let refused = [(0, 0), (0, 2), (0, 1 << 2 | 1), (0, 1 << 63 | 3), (1, 3)]
        .iter()
        .all(|&(index, value)| xsetbv_faults(index, value) == (0, 1));
    check(
        "xsetbv: #GP(0) for an invalid XCR0 or XCR index, nothing changed",
        refused && xgetbv() == before,
    );
}

fn load_idt(base: u64) {
    let pointer: [u16; 5] = [
        64 * 16 - 1,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ];
    // SAFETY: loads an IDT whose entries we wrote.
    unsafe { asm!("lidt [{}]", in(reg) pointer.as_ptr()) };
}

/// An event whose delivery is interrupted by a guest-physical fault (the IDT's page was
/// revoked) must be re-injected once the fault is resolved.
fn reinjection_case() {
    let page = LAZY + 0x30_0000;
    // SAFETY: copy our IDT into a lazy page (mapped on the first touch) and use that copy.
    unsafe {
        core::ptr::copy_nonoverlapping(
            core::ptr::addr_of!(IDT) as *const u8,
            page as *mut u8,
            64 * 16,
        )
    };
    load_idt(page);
    let revoked = vmmcall(5, page, 0); // the VMM revokes the page from the VM
    let faults_before = inl(STATUS);
    vmmcall(6, 0x32, 0); // and injects vector 0x32, whose delivery reads the revoked IDT page
    let seen = REINJECTED.load(SeqCst);
    let faulted = inl(STATUS) > faults_before;
    load_idt(core::ptr::addr_of!(IDT) as u64);
    check(
        "events: an injection interrupted by a guest page fault is re-injected",
        revoked == 0 && faulted && seen == 1,
    );
}

/// The syscall MSRs VMLOAD/VMSAVE switch (the guest reaches them without exits): STAR, LSTAR,
/// CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP, in the order `.guest32_peek` reads them.
const SYSCALL_MSRS: [u32; 8] = [
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0x174,
    0x175,
    0x176,
];

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only MSRs the VMM passes through or emulates.
    unsafe { Msr::new(msr).read() }
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`; the values written are valid for each MSR.
    unsafe { Msr::new(msr).write(value) }
}

fn debug_registers() -> [u64; 4] {
    [Dr0::read(), Dr1::read(), Dr2::read(), Dr3::read()]
}

/// DR0-DR3, CR2 and the syscall MSRs belong to this guest: another VM that runs in between
/// (the VMM's hypercall 8 runs `.guest32_peek`) finds its own reset values, not ours, and what
/// it writes there does not reach us.
fn debug_register_case() {
    let pattern: [u64; 4] = [
        0x1111_0000_0000_1000,
        0x2222_0000_0000_2000,
        0x3333_0000_0000_3000,
        0x4444_0000_0000_4000,
    ];
    let msrs: [u64; 8] = [
        0x0023_0010_0000_0000,
        0xffff_8000_1234_5000,
        0xffff_8000_1234_6000,
        0x0004_7700,
        0xffff_8000_1234_7000,
        0x10,
        0x0007_e000,
        0x0010_2340,
    ];
    // (DR7 keeps every breakpoint disabled, so the addresses are never matched.)
    Dr0::write(pattern[0]);
    Dr1::write(pattern[1]);
    Dr2::write(pattern[2]);
    Dr3::write(pattern[3]);
    // SAFETY: CR2 is only read back.
    unsafe { asm!("mov cr2, {}", in(reg) 0xffff_8000_dead_b000u64) };
    for (msr, value) in SYSCALL_MSRS.iter().zip(msrs) {
        wrmsr(*msr, value);
    }
    let seen = vmmcall(8, 0, 0);
    let own = debug_registers();
    let cr2 = Cr2::read_raw();
    let own_msrs = SYSCALL_MSRS.map(rdmsr);
    check(
        "isolation: another VM finds its own DR0-DR3, not this guest's",
        seen & 0xf == 0,
    );
    check(
        "isolation: DR0-DR3 are this guest's own after another VM wrote its own",
        own == pattern,
    );
    check(
        "isolation: another VM finds its own CR2 and syscall MSRs, not this guest's",
        seen & !0xf == 0,
    );
    check(
        "isolation: CR2 and the syscall MSRs are this guest's own after another VM wrote its own",
        cr2 == 0xffff_8000_dead_b000 && own_msrs == msrs,
    );
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn vmmcall(nr: u64, a: u64, b: u64) -> u64 {
    let result: u64;
    // SAFETY: a hypercall to the VMM; rbx is saved by hand (LLVM reserves it).
    unsafe {
        asm!("xchg {a}, rbx", "vmmcall", "xchg {a}, rbx", a = inout(reg) a => _, inout("rax") nr => result, in("rcx") b)
    };
    result
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Print `bench: NAME median=M min=N iterations=K` for samples (sorted in place).
fn bench_report(name: &str, samples: &mut [u64], overhead: u64) {
    samples.sort_unstable();
    let median = samples[samples.len() / 2].saturating_sub(overhead);
    let min = samples[0].saturating_sub(overhead);
    let _ = writeln!(
        Console,
        "bench: {name} median={median} min={min} iterations={}",
        samples.len()
    );
}

/// Exit-cost benchmarks (the VMM asks for them through CPUID leaf 0x40000002).
fn benchmarks() -> ! {
    const N: usize = 1000;
    let mut samples = [0u64; N];
    let mut empty = [0u64; N];
    for s in empty.iter_mut() {
        let t0 = rdtsc();
        *s = rdtsc() - t0;
    }
    empty.sort_unstable();
    let overhead = empty[N / 2];
    // Measured in the extended-state setup a Linux guest has: CR4.OSFXSR and OSXSAVE set and
    // XCR0 = every component of x87, SSE and AVX that CPUID offers (Linux enables all it
    // knows). A guest whose XCR0 differs from the host's user XCR0 adds two XSETBVs per exit.
    // SAFETY: our own CR4 and XCR0; the value is one CPUID reports as supported.
    unsafe {
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4);
        asm!("mov cr4, {}", in(reg) cr4 | (1 << 9) | (1 << 18));
        let xcr0 = u64::from(cpuid(0xd)[0]) & 7;
        asm!("xsetbv", in("ecx") 0, in("eax") xcr0 as u32, in("edx") 0u32);
    }
    for _ in 0..50 {
        vmmcall(1, 1, 2);
    }
    for s in samples.iter_mut() {
        let t0 = rdtsc();
        vmmcall(1, 1, 2);
        *s = rdtsc() - t0;
    }
    bench_report("vm_hypercall_round_trip", &mut samples, overhead);
    for s in samples.iter_mut() {
        let t0 = rdtsc();
        outb(SCRATCH, 1);
        *s = rdtsc() - t0;
    }
    bench_report("vm_io_port_exit", &mut samples, overhead);
    let mut faults = [0u64; 512];
    for (i, s) in faults.iter_mut().enumerate() {
        let p = (LAZY + i as u64 * 4096) as *mut u64;
        let t0 = rdtsc();
        // SAFETY: guest RAM the VM's pager provides on demand.
        unsafe { core::ptr::write_volatile(p, 1) };
        *s = rdtsc() - t0;
    }
    bench_report("vm_guest_page_fault_via_pager", &mut faults, overhead);
    outl(EXIT, 0);
    loop {
        // SAFETY: done.
        unsafe { asm!("hlt") };
    }
}

#[no_mangle]
extern "C" fn guest_main() -> ! {
    setup_idt();
    if cpuid(0x4000_0002)[0] == 1 {
        benchmarks();
    }

    // Port I/O of every size.
    outb(SCRATCH, 0x5a);
    outw(SCRATCH, 0xbeef);
    outl(SCRATCH, 0xdead_beef);
    check("port I/O: byte", inb(SCRATCH) == 0x5a);
    check("port I/O: word", inw(SCRATCH) == 0xbeef);
    check("port I/O: dword", inl(SCRATCH) == 0xdead_beef);
    check(
        "port I/O: unclaimed port reads all ones",
        inb(0x300) == 0xff,
    );
    let mut buffer = [0u8; 16];
    // SAFETY: string input into our buffer.
    unsafe {
        asm!("cld", "rep insb", inout("rdi") buffer.as_mut_ptr() => _, inout("rcx") 16u64 => _, in("dx") COUNTER)
    };
    check(
        "string I/O: rep insb",
        (0..16).all(|i| buffer[i] == i as u8),
    );
    let words = [0x1111u16, 0x2222, 0x3333];
    // SAFETY: string output from our array.
    unsafe {
        asm!("cld", "rep outsw", inout("rsi") words.as_ptr() => _, inout("rcx") 3u64 => _, in("dx") SCRATCH)
    };
    check("string I/O: rep outsw", inw(SCRATCH) == 0x3333);

    // CPUID values the VMM chose.
    let leaf = cpuid(0x4000_0000);
    check(
        "cpuid: hypervisor signature",
        leaf[1..] == [0x7352_344c, 0x744d_4d56, 0x7374_7365],
    );
    check(
        "cpuid: SVM hidden from the guest",
        cpuid(0x8000_0001)[2] & 4 == 0,
    );
    check("cpuid: hypervisor bit set", cpuid(1)[2] >> 31 == 1);

    // MSRs.
    wrmsr(TEST_MSR, 0x9abc_1234_5678);
    let value = rdmsr(TEST_MSR);
    let (lo, hi) = (value as u32, (value >> 32) as u32);
    check(
        "msr: write then read the VMM's MSR",
        lo == 0x1234_5678 && hi == 0x9abc,
    );
    let before = GP.load(SeqCst);
    // An MSR the VMM refuses: #GP, handled by our IDT.
    rdmsr(0x1234);
    check(
        "msr: unknown MSR raises #GP in the guest",
        GP.load(SeqCst) == before + 1,
    );

    // Hypercalls.
    check("vmmcall: arguments and result", vmmcall(1, 20, 22) == 42);
    check("vmmcall: unknown hypercall", vmmcall(99, 0, 0) == u64::MAX);

    // Exceptions handled by the guest's own IDT.
    // SAFETY: deliberately raises #UD, which our handler skips.
    unsafe { asm!("ud2") };
    check(
        "exception: #UD handled by the guest's IDT",
        UD.load(SeqCst) == 1,
    );

    // HLT is woken by an injected timer interrupt.
    // SAFETY: enable interrupts and halt until the VMM injects vector 0x30.
    unsafe { asm!("sti", "hlt", "cli") };
    check(
        "hlt: woken by an injected interrupt",
        TIMER.load(SeqCst) == 1,
    );

    // An interrupt requested while interrupts are disabled waits for sti.
    vmmcall(2, 0x31, 0);
    let mut spins = 0u64;
    for _ in 0..1000 {
        spins += 1;
        core::hint::black_box(spins);
    }
    let early = WINDOW.load(SeqCst);
    // SAFETY: open the interrupt window for one instruction.
    unsafe { asm!("sti", "nop", "cli") };
    check(
        "interrupt injection waits while IF=0",
        early == 0 && WINDOW.load(SeqCst) == 1,
    );

    // Lazy memory: the VMM maps these pages on the first touch.
    let mut lazy_ok = true;
    for page in 0..4u64 {
        let p = (LAZY + page * 4096) as *mut u64;
        // SAFETY: guest RAM the VMM provides on demand.
        unsafe {
            lazy_ok &= core::ptr::read_volatile(p) == 0;
            core::ptr::write_volatile(p, page + 1);
            lazy_ok &= core::ptr::read_volatile(p) == page + 1;
        }
    }
    check(
        "lazy memory: guest-physical faults resolved by the VMM",
        lazy_ok && inl(STATUS) >= 4,
    );

    // MMIO decoded from guest memory.
    let m = MMIO as *mut u32;
    // SAFETY: the VMM emulates the MMIO scratch device.
    unsafe {
        core::ptr::write_volatile(m, 0xcafe_f00d);
        check(
            "mmio: 32-bit write and read",
            core::ptr::read_volatile(m) == 0xcafe_f00d,
        );
        core::ptr::write_volatile(m as *mut u8, 0x42);
        check(
            "mmio: 8-bit write and read",
            core::ptr::read_volatile(m as *mut u8) == 0x42,
        );
        core::ptr::write_volatile(m as *mut u64, 0x0123_4567_89ab_cdef);
        check(
            "mmio: 64-bit write and read",
            core::ptr::read_volatile(m as *mut u64) == 0x0123_4567_89ab_cdef,
        );
        asm!("mov dword ptr [{}], 0x77", in(reg) m);
        check("mmio: immediate store", core::ptr::read_volatile(m) == 0x77);
        let zx: u32;
        asm!("movzx {0:e}, word ptr [{1}]", out(reg) zx, in(reg) m);
        check("mmio: movzx load", zx == 0x77);
    }

    // SAFETY: the VMM emulates the MMIO scratch device; SIB addressing and 16-bit stores.
    unsafe {
        let index = 2u64;
        asm!("mov word ptr [{base} + {index} * 4 - 8], {value:x}", base = in(reg) m, index = in(reg) index, value = in(reg) 0x5566u16);
        check(
            "mmio: 16-bit store with SIB addressing",
            core::ptr::read_volatile(m as *mut u16) == 0x5566,
        );
    }
    let in_imm: u8;
    // SAFETY: port input with an immediate port number.
    unsafe { asm!("in al, 0xe8", out("al") in_imm) };
    check("port I/O: in al, imm8", in_imm == 0x5a);
    check(
        "cpuid: hypervisor leaf 0x40000001",
        cpuid(0x4000_0001)[0] == 0x1234_5678,
    );

    // Events the VMM injects: an NMI, and an exception with an error code.
    vmmcall(3, 0, 0);
    check(
        "event injection: NMI delivered to the guest",
        NMI.load(SeqCst) == 1,
    );
    vmmcall(4, 0x1234, 0);
    check(
        "event injection: exception with error code (#TS)",
        TS_ERROR.load(SeqCst) == 0x1234,
    );

    reinjection_case();

    // SSE registers belong to this guest: another VM that runs in between (and sets its own
    // xmm0) changes nothing here.
    let xmm0: u64;
    // SAFETY: enable SSE in our CR4, put a pattern in xmm0, let the VMM run another VM, read
    // xmm0 back (this guest is built without SSE, so nothing else uses the register).
    unsafe {
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4);
        asm!("mov cr4, {}", in(reg) cr4 | (3 << 9));
        asm!("movq xmm0, {}", in(reg) 0x5151_5151_a5a5_a5a5u64);
        vmmcall(7, 0, 0);
        asm!("movq {}, xmm0", out(reg) xmm0);
    }
    check(
        "fpu: SSE registers are the guest's own across another VM's run",
        xmm0 == 0x5151_5151_a5a5_a5a5,
    );

    // The guest's registers stay live after an exit until something else needs them: here
    // the VMM thread itself, whose x87 control word is set by one hypercall and read by the
    // next. Neither side sees the other's.
    let (xmm0, guest_control, vmm_control): (u64, u16, u64);
    // SAFETY: SSE is enabled above; the x87 control word and xmm0 are this guest's own.
    unsafe {
        let mut control = 0u16;
        asm!("movq xmm0, {}", in(reg) 0x6262_6262_c3c3_c3c3u64);
        vmmcall(9, 0x0c7f, 0);
        asm!("movq {}, xmm0", out(reg) xmm0);
        asm!("fnstcw [{}]", in(reg) &mut control, options(nostack));
        guest_control = control;
        vmm_control = vmmcall(10, 0, 0);
    }
    check(
        "fpu: the guest's registers survive the VMM's own x87/SSE use between exits",
        xmm0 == 0x6262_6262_c3c3_c3c3 && guest_control == 0x37f,
    );
    check(
        "fpu: the VMM's own registers survive a guest run",
        vmm_control == 0x0c7f,
    );

    // XCR0 belongs to the guest: set it, exit, and find it unchanged (the kernel switches it).
    // SAFETY: enabling XSAVE in our own CR4 and setting our XCR0 to x87|SSE.
    let xcr0 = unsafe {
        let cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4);
        asm!("mov cr4, {}", in(reg) cr4 | (1 << 18));
        asm!("xsetbv", in("ecx") 0, in("eax") 3u32, in("edx") 0u32);
        vmmcall(1, 0, 0);
        let (lo, hi): (u32, u32);
        asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi);
        (hi as u64) << 32 | lo as u64
    };
    check("xcr0: the guest's XCR0 survives exits", xcr0 == 3);
    xsetbv_cases();

    debug_register_case();

    // A write outside RAM: the VMM sees the guest-physical fault.
    // SAFETY: deliberately touches a guest-physical address nothing backs.
    unsafe { core::ptr::write_volatile(NOWHERE as *mut u32, 1) };
    check(
        "isolation: a write outside guest RAM is seen by the VMM",
        inl(STATUS) == NOWHERE as u32,
    );

    outl(EXIT, FAILED.load(SeqCst) as u32);
    loop {
        // SAFETY: nothing left to do.
        unsafe { asm!("hlt") };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Console, "not ok - guest panicked");
    outl(EXIT, 0xff);
    loop {}
}
