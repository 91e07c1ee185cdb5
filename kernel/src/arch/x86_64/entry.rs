//! Kernel entry and exit: GDT, TSS, IDT, the interrupt and syscall stubs, and the return to
//! user mode.
//!
//! The kernel is event driven with a single kernel stack: every entry from user mode saves the
//! user registers straight into the current thread's [`Frame`] (the TSS's `rsp0` and
//! [`CURRENT_FRAME_END`] point just past it), switches to the top of the kernel stack and calls
//! Rust; every exit restores some thread's frame with `iretq`. Nothing on the kernel stack
//! survives a return to user mode.

use core::arch::global_asm;
use core::mem::size_of;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::{Efer, EferFlags, LStar, SFMask, Star};
use x86_64::registers::rflags::RFlags;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::PrivilegeLevel;
use x86_64::VirtAddr;

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
pub const RFLAGS_IF: u64 = RFlags::INTERRUPT_FLAG.bits();
/// RFLAGS bit 1, always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS bits a user may choose (arithmetic flags, TF, DF, AC).
pub const RFLAGS_USER_MASK: u64 = RFlags::CARRY_FLAG
    .union(RFlags::PARITY_FLAG)
    .union(RFlags::AUXILIARY_CARRY_FLAG)
    .union(RFlags::ZERO_FLAG)
    .union(RFlags::SIGN_FLAG)
    .union(RFlags::OVERFLOW_FLAG)
    .union(RFlags::TRAP_FLAG)
    .union(RFlags::DIRECTION_FLAG)
    .union(RFlags::ALIGNMENT_CHECK)
    .bits();
const _: () = assert!(RFLAGS_USER_MASK == 0xcd5 | (1 << 8) | (1 << 10) | (1 << 18));

/// End of the current thread's frame: where the syscall stub starts pushing. (Named in the
/// stubs through a `sym` operand, not an exported symbol, so that Rust code reaches it
/// directly rather than through the GOT: one instruction less on every return to user mode.)
static mut CURRENT_FRAME_END: u64 = 0;

/// Scratch slot for the user stack pointer during syscall entry.
#[no_mangle]
static mut SYSCALL_USER_RSP: u64 = 0;

/// The TSS followed by the I/O permission bitmap of the running task and the terminating
/// all-ones byte the CPU requires (the bitmap's last byte).
#[repr(C)]
struct TssWithBitmap {
    tss: TaskStateSegment,
    bitmap: [u8; IO_BITMAP_BYTES + 1],
}

/// Bytes of an I/O permission bitmap (65,536 ports).
const IO_BITMAP_BYTES: usize = 8192;

static mut TSS: TssWithBitmap = TssWithBitmap {
    tss: TaskStateSegment::new(),
    bitmap: [0xff; IO_BITMAP_BYTES + 1],
};

/// Load the I/O permission bitmap of the task about to run (`None`: deny every port).
pub fn set_io_bitmap(bitmap: Option<&[u8; 8192]>) {
    // SAFETY: single CPU, kernel mode: the CPU reads the bitmap only in user mode.
    unsafe {
        let tss = &raw mut TSS;
        let ports = &mut (&mut *tss).bitmap[..IO_BITMAP_BYTES];
        match bitmap {
            Some(b) => ports.copy_from_slice(b),
            None => ports.fill(0xff),
        }
    }
}

/// Kernel code and data, user data and code (in the order SYSRET needs), the TSS: the
/// selectors [`KERNEL_CS`], [`KERNEL_SS`], [`USER_SS`], [`USER_CS`] and [`TSS_SELECTOR`].
static mut GDT: GlobalDescriptorTable = GlobalDescriptorTable::new();

static mut IDT: InterruptDescriptorTable = InterruptDescriptorTable::new();

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
    LStar::write(VirtAddr::new(syscall_entry_slow as *const () as u64));
}

/// Load the GDT, TSS and IDT and program the syscall MSRs.
pub fn init() {
    // SAFETY: runs once at boot on the only CPU before any user code; the tables are statics
    // that live forever (nothing else refers to them), and the MSR values point at our entry
    // stub with our selectors.
    unsafe {
        let (tss, gdt, idt) = (&raw const TSS, &raw mut GDT, &raw mut IDT);
        let (tss, gdt, idt): (
            &'static TssWithBitmap,
            &'static mut GlobalDescriptorTable,
            _,
        ) = (&*tss, &mut *gdt, &mut *idt);
        let selectors = [
            gdt.append(Descriptor::kernel_code_segment()),
            gdt.append(Descriptor::kernel_data_segment()),
            gdt.append(Descriptor::user_data_segment()),
            gdt.append(Descriptor::user_code_segment()),
            gdt.append(
                Descriptor::tss_segment_with_iomap(&tss.tss, &tss.bitmap).expect("TSS I/O map"),
            ),
        ];
        let expected = [KERNEL_CS, KERNEL_SS, USER_SS, USER_CS, TSS_SELECTOR as u64];
        assert!(selectors
            .iter()
            .zip(expected)
            .all(|(s, e)| u64::from(s.0) == e));
        let gdt: &'static GlobalDescriptorTable = gdt;
        gdt.load();
        CS::set_reg(selectors[0]);
        SS::set_reg(selectors[1]);
        DS::set_reg(selectors[1]);
        ES::set_reg(selectors[1]);
        load_tss(selectors[4]);

        let handler = |vector: usize| VirtAddr::new(isr_table[vector]);
        for vector in (0..=7).chain([9, 16, 19, 20, 28]).chain(32..=255) {
            let options = idt[vector as u8].set_handler_addr(handler(vector));
            if vector == 3 {
                // int3 may be raised from user mode.
                options.set_privilege_level(PrivilegeLevel::Ring3);
            }
        }
        // The exceptions with an error code (the IDT's entries of other kinds).
        idt.double_fault.set_handler_addr(handler(8));
        idt.invalid_tss.set_handler_addr(handler(10));
        idt.segment_not_present.set_handler_addr(handler(11));
        idt.stack_segment_fault.set_handler_addr(handler(12));
        idt.general_protection_fault.set_handler_addr(handler(13));
        idt.page_fault.set_handler_addr(handler(14));
        idt.alignment_check.set_handler_addr(handler(17));
        idt.machine_check.set_handler_addr(handler(18));
        idt.cp_protection_exception.set_handler_addr(handler(21));
        idt.vmm_communication_exception
            .set_handler_addr(handler(29));
        idt.security_exception.set_handler_addr(handler(30));
        let idt: &'static InterruptDescriptorTable = idt;
        idt.load();

        Efer::update(|flags| flags.insert(EferFlags::SYSTEM_CALL_EXTENSIONS));
        // SYSCALL loads CS = KERNEL_CS (SS = +8); SYSRETQ CS = 0x10 + 16 | 3 (USER_CS), SS =
        // 0x10 + 8 | 3 (USER_SS).
        Star::write_raw(0x10 | 3, KERNEL_CS as u16);
        LStar::write(VirtAddr::new(syscall_entry as *const () as u64));
        // Clear IF, TF, DF, AC, NT on entry.
        SFMask::write(
            RFlags::INTERRUPT_FLAG
                | RFlags::TRAP_FLAG
                | RFlags::DIRECTION_FLAG
                | RFlags::ALIGNMENT_CHECK
                | RFlags::NESTED_TASK,
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
        // (The stack pointer field is a canonical `VirtAddr`, a `u64`; the kernel address
        // `end` is one.)
        let tss = &raw mut TSS;
        let rsp0 = &raw mut (*tss).tss.privilege_stack_table[0];
        core::ptr::write_unaligned(rsp0.cast::<u64>(), end);
        restore_frame(frame)
    }
}

/// Return to user mode in the thread that entered the kernel with `frame`, when no other
/// thread ran since: the kernel stack top and the syscall entry's frame pointer are still this
/// frame's (set when it was resumed), so only the registers are restored.
///
/// # Safety
/// As for [`return_to_user`]; in addition the thread must be the one last resumed.
#[inline(always)]
pub unsafe fn return_to_caller(frame: *const Frame) -> ! {
    // SAFETY: single CPU with interrupts disabled; per the caller.
    unsafe {
        debug_assert!(
            (&raw const CURRENT_FRAME_END).read() == frame as u64 + size_of::<Frame>() as u64
        );
        restore_frame(frame)
    }
}

global_asm!(
    r#"
.section .text
// The general registers in `Frame` order (rax at the highest address), for both entries.
.macro PUSH_GPRS
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
.endm
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
    PUSH_GPRS
    mov rdi, rsp
    mov rsp, [rip + KERNEL_STACK_TOP]
    call \handler
    ud2
.endm
SYSCALL_ENTRY syscall_entry, syscall_dispatch
SYSCALL_ENTRY syscall_entry_slow, syscall_dispatch_slow

interrupt_common:
    PUSH_GPRS
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
