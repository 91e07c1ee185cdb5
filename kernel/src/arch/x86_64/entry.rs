//! Kernel entry and exit: GDT, TSS, IDT, the interrupt and syscall stubs, and the return to
//! user mode.
//!
//! The kernel is event driven with a single kernel stack: every entry from user mode saves the
//! user registers straight into the current thread's [`Frame`] (the TSS's `rsp0` and
//! [`CURRENT_FRAME_END`] point just past it), switches to the top of the kernel stack and calls
//! Rust; every exit restores some thread's frame with `iretq`. Nothing on the kernel stack
//! survives a return to user mode.

use super::cpu::{self, msr, wrmsr};
use core::arch::{asm, global_asm};
use core::mem::size_of;

/// Kernel code selector.
pub const KERNEL_CS: u64 = 0x08;
/// Kernel data selector.
pub const KERNEL_SS: u64 = 0x10;
/// User data selector (RPL 3).
pub const USER_SS: u64 = 0x18 | 3;
/// User code selector (RPL 3).
pub const USER_CS: u64 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

/// Vector number recorded in a frame saved by the syscall entry.
pub const SYSCALL_VECTOR: u64 = 0x100;
/// Local APIC timer vector.
pub const TIMER_VECTOR: u8 = 32;
/// Spurious interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// User register state as saved on kernel entry (the order of the stubs' pushes).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Interrupt vector, or [`SYSCALL_VECTOR`].
    pub vector: u64,
    /// CPU error code (0 where the CPU pushes none).
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(size_of::<Frame>() == 22 * 8);
const _: () = assert!(size_of::<Frame>().is_multiple_of(16));

impl Frame {
    /// A frame that starts a user thread at `rip` with stack `rsp`.
    pub fn new_user(rip: u64, rsp: u64) -> Frame {
        Frame {
            rip,
            rsp,
            cs: USER_CS,
            ss: USER_SS,
            rflags: RFLAGS_IF | RFLAGS_RESERVED,
            ..Frame::default()
        }
    }

    /// Deliver a message into the registers of a receiving thread: success in `rax`, the tag
    /// in `rdx`, the badge in `rsi`, the first four words in `r8`, `r9`, `r12`, `r13` (the
    /// rest travel in the UTCB). The delivery of IPC and IRQ messages; the fast path writes
    /// the same registers itself (see `fastpath.rs`).
    #[inline(always)]
    pub fn deliver(&mut self, tag: u64, badge: u64, words: [u64; 4]) {
        let [w0, w1, w2, w3] = words;
        self.r8 = w0;
        self.r9 = w1;
        self.r12 = w2;
        self.r13 = w3;
        self.rsi = badge;
        self.rdx = tag;
        self.rax = 0;
    }
}

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bit 1, always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS bits a user may choose (arithmetic flags, TF, DF, AC).
pub const RFLAGS_USER_MASK: u64 = 0xcd5 | (1 << 8) | (1 << 10) | (1 << 18);

/// End of the current thread's frame: where the syscall stub starts pushing. (Named in the
/// stubs through a `sym` operand, not an exported symbol, so that Rust code reaches it
/// directly rather than through the GOT: one instruction less on every return to user mode.)
static mut CURRENT_FRAME_END: u64 = 0;

/// Scratch slot for the user stack pointer during syscall entry.
#[no_mangle]
static mut SYSCALL_USER_RSP: u64 = 0;

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

/// The TSS followed by the I/O permission bitmap of the running task (and the terminating
/// all-ones byte the CPU requires).
#[repr(C, packed)]
struct TssWithBitmap {
    tss: Tss,
    bitmap: [u8; 8192],
    end: u8,
}

static mut TSS: TssWithBitmap = TssWithBitmap {
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: size_of::<Tss>() as u16,
    },
    bitmap: [0xff; 8192],
    end: 0xff,
};

/// Load the I/O permission bitmap of the task about to run (`None`: deny every port).
pub fn set_io_bitmap(bitmap: Option<&[u8; 8192]>) {
    // SAFETY: single CPU, kernel mode: the CPU reads the bitmap only in user mode.
    unsafe {
        let tss = &raw mut TSS;
        match bitmap {
            Some(b) => (*tss).bitmap = *b,
            None => (*tss).bitmap = [0xff; 8192],
        }
    }
}

static mut GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff, // kernel code
    0x00cf_9200_0000_ffff, // kernel data
    0x00cf_f200_0000_ffff, // user data
    0x00af_fa00_0000_ffff, // user code
    0,                     // TSS low
    0,                     // TSS high
];

#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256];

extern "C" {
    static isr_table: [u64; 256];
    fn syscall_entry();
    fn syscall_entry_slow();
    fn restore_frame(frame: *const Frame) -> !;
}

/// Make syscalls bypass the IPC fast path (kernel command line `nofastpath`, to measure the
/// slow path).
pub fn disable_fastpath() {
    // SAFETY: points LSTAR at the other, equivalent entry stub.
    unsafe { wrmsr(msr::LSTAR, syscall_entry_slow as *const () as u64) };
}

/// Load the GDT, TSS and IDT and program the syscall MSRs.
pub fn init() {
    // SAFETY: runs once at boot on the only CPU before any user code; the tables are statics
    // that live forever, and the MSR values point at our entry stub with our selectors.
    unsafe {
        let tss = &raw const TSS as u64;
        let limit = (size_of::<TssWithBitmap>() - 1) as u64;
        let gdt = &raw mut GDT;
        (*gdt)[5] = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        (*gdt)[6] = tss >> 32;
        let gdtr = TablePointer {
            limit: (size_of::<[u64; 7]>() - 1) as u16,
            base: gdt as u64,
        };
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ss}",
            "mov ss, {tmp:e}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "ltr {tss:x}",
            gdtr = in(reg) &gdtr,
            cs = const KERNEL_CS,
            ss = const KERNEL_SS,
            tss = in(reg) TSS_SELECTOR,
            tmp = out(reg) _,
        );

        let idt = &raw mut IDT;
        for (vector, entry) in (*idt).iter_mut().enumerate() {
            let handler = isr_table[vector];
            *entry = IdtEntry {
                offset_low: handler as u16,
                selector: KERNEL_CS as u16,
                ist: 0,
                // present, interrupt gate; int3 (3) may be raised from user mode
                attributes: if vector == 3 { 0xee } else { 0x8e },
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let idtr = TablePointer {
            limit: (size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: idt as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr);

        wrmsr(msr::EFER, cpu::rdmsr(msr::EFER) | 1); // SCE
        wrmsr(msr::STAR, (KERNEL_CS << 32) | ((0x10 | 3) << 48));
        wrmsr(msr::LSTAR, syscall_entry as *const () as u64);
        // Clear IF, TF, DF, AC, NT on entry.
        wrmsr(
            msr::SFMASK,
            (1 << 9) | (1 << 8) | (1 << 10) | (1 << 18) | (1 << 14),
        );
    }
}

/// Resume the thread whose frame is at `frame`: point the entry path at it and `iretq`.
///
/// # Safety
/// `frame` must be a user frame (user selectors, canonical user `rip`) inside a thread object
/// that stays alive until the next kernel entry, and the current page tables must be that
/// thread's.
#[inline(always)]
pub unsafe fn return_to_user(frame: *const Frame) -> ! {
    let end = frame as u64 + size_of::<Frame>() as u64;
    // SAFETY: single CPU with interrupts disabled: nobody else reads these statics now. The
    // caller guarantees the frame is valid.
    unsafe {
        CURRENT_FRAME_END = end;
        let tss = &raw mut TSS;
        core::ptr::write_unaligned(&raw mut (*tss).tss.rsp[0], end);
        restore_frame(frame)
    }
}

global_asm!(
    r#"
.section .text
.macro SYSCALL_ENTRY name, handler
.global \name
\name:
    mov [rip + SYSCALL_USER_RSP], rsp
    mov rsp, [rip + {frame_end}]
    push {user_ss}
    push [rip + SYSCALL_USER_RSP]
    push r11
    push {user_cs}
    push rcx
    push 0
    push {syscall_vector}
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    mov rsp, [rip + KERNEL_STACK_TOP]
    call \handler
    ud2
.endm
SYSCALL_ENTRY syscall_entry, syscall_dispatch
SYSCALL_ENTRY syscall_entry_slow, syscall_dispatch_slow

interrupt_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    test qword ptr [rsp + 18 * 8], 3
    jz 1f
    mov rsp, [rip + KERNEL_STACK_TOP]
1:
    cld
    call interrupt_dispatch
    ud2

.global restore_frame
restore_frame:
    mov rsp, rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

.macro ISR_NOERR n
isr_\n:
    push 0
    push \n
    jmp interrupt_common
.endm
.macro ISR_ERR n
isr_\n:
    push \n
    jmp interrupt_common
.endm

.irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
ISR_NOERR \n
.endr
.irp n, 8,10,11,12,13,14,17,21,29,30
ISR_ERR \n
.endr
.macro ISR_ADDRESS n
    .quad isr_\n
.endm
.altmacro
.set i, 32
.rept 224
ISR_NOERR %i
.set i, i + 1
.endr

.section .rodata
.balign 8
.global isr_table
isr_table:
.set i, 0
.rept 256
ISR_ADDRESS %i
.set i, i + 1
.endr
.noaltmacro
.section .text
"#,
    user_ss = const USER_SS,
    user_cs = const USER_CS,
    syscall_vector = const SYSCALL_VECTOR,
    frame_end = sym CURRENT_FRAME_END,
);
