//! The Multiboot 1 and multiboot2 headers and the 32-bit entry: builds boot page tables
//! (identity, direct map of the first 4 GiB at [`super::paging::PHYS_OFFSET`], and the kernel
//! image at `0xffffffff80000000`), enters long mode and calls [`crate::kernel_main`] on the
//! kernel stack with the loader's magic and information pointer.

use core::arch::global_asm;

/// Bytes of the kernel stack (the one stack of this event-driven kernel).
pub const KERNEL_STACK_SIZE: usize = 64 * 1024;

/// The kernel stack.
#[repr(C, align(16))]
pub struct KernelStack(pub [u8; KERNEL_STACK_SIZE]);

/// The kernel stack. Every kernel entry from user mode starts at its top.
#[no_mangle]
pub static mut KERNEL_STACK: KernelStack = KernelStack([0; KERNEL_STACK_SIZE]);

/// Address of the top of [`KERNEL_STACK`], read by the entry stubs.
#[no_mangle]
pub static mut KERNEL_STACK_TOP: u64 = 0;

global_asm!(
    r#"
.section .multiboot_header, "a"
/* Multiboot 1 with the address fields (flag 16), for QEMU's -kernel with the flat image the
   runner makes from this ELF (kernel.bin): page-aligned modules, a memory map. */
.balign 4
mb1_header:
    .long 0x1badb002
    .long 0x00010003
    .long 0x100000000 - (0x1badb002 + 0x00010003)
    .long mb1_header
    .long __kernel_phys_start
    .long __kernel_load_end
    .long __kernel_phys_end
    .long _start
.balign 8
mb2_header_start:
    .long 0xe85250d6
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header_start))
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

.section .boot.bss, "aw", @nobits
.balign 4096
.global boot_pml4
boot_pml4:      .skip 4096
boot_pdpt_low:  .skip 4096
boot_pdpt_high: .skip 4096
boot_pd:        .skip 4096 * 4
boot_stack:     .skip 4096
boot_stack_top:

.section .boot.data, "aw"
.balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdtr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .boot.text, "ax"
.code32
.global _start
_start:
    cli
    mov esp, offset boot_stack_top
    mov edi, eax
    mov esi, ebx

    /* zero the page-table area (pml4, two pdpts, four pds) */
    push edi
    mov edi, offset boot_pml4
    mov ecx, 7 * 1024
    xor eax, eax
    rep stosd
    pop edi

    mov eax, offset boot_pdpt_low
    or eax, 3
    mov [boot_pml4], eax
    mov [boot_pml4 + 256 * 8], eax
    mov eax, offset boot_pdpt_high
    or eax, 3
    mov [boot_pml4 + 511 * 8], eax

    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset boot_pd
    or eax, 3
    mov [boot_pdpt_low + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b

    mov eax, offset boot_pd
    or eax, 3
    mov [boot_pdpt_high + 510 * 8], eax

    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    cmp ecx, 1536
    jb 3f
    or eax, 0x18
3:
    mov [boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, cr4
    or eax, 0x20 | 0x80 | 0x200 | 0x400
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100 | 0x800 | 0x1
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    and eax, 0x9fffffff
    mov cr0, eax

    lgdt [boot_gdtr]
    mov eax, 0x08
    push eax
    mov eax, offset boot_long_mode
    push eax
    retf

.code64
boot_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov edi, edi
    mov esi, esi
    movabs rax, offset KERNEL_STACK
    add rax, {stack_size}
    mov rsp, rax
    movabs rcx, offset KERNEL_STACK_TOP
    mov [rcx], rax
    movabs rax, offset kernel_main
    call rax
4:
    hlt
    jmp 4b
"#,
    stack_size = const KERNEL_STACK_SIZE,
);
