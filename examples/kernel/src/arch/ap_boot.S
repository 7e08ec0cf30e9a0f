/*
 * The application-processor trampoline. smp.rs copies ap_trampoline_start..ap_trampoline_end
 * to the fixed page AP_BASE below 1 MiB and sends STARTUP with that page: the AP starts here
 * in real mode with CS = AP_BASE >> 4, IP = 0. It loads a small GDT, enters protected mode,
 * turns on PAE, loads the boot page tables (ap_param_cr3), sets EFER (ap_param_efer: LME, SCE,
 * NXE as on the boot CPU), enables paging (long mode), and calls ap_param_entry(ap_param_cpu)
 * on the stack ap_param_stack. Every address is AP_BASE + offset: the code runs at the copy.
 */
    .section .text.ap_trampoline, "ax"
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl AP_BASE + (ap_gdt_ptr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(AP_BASE + (ap_pm32 - ap_trampoline_start))

    .code32
ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl AP_BASE + (ap_param_cr3 - ap_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    movl AP_BASE + (ap_param_efer - ap_trampoline_start), %eax
    xorl %edx, %edx
    wrmsr
    movl %cr0, %eax
    orl $((1 << 31) | (1 << 16)), %eax
    movl %eax, %cr0
    ljmpl $0x18, $(AP_BASE + (ap_lm64 - ap_trampoline_start))

    .code64
ap_lm64:
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq AP_BASE + (ap_param_stack - ap_trampoline_start), %rsp
    movq AP_BASE + (ap_param_cpu - ap_trampoline_start), %rdi
    movq AP_BASE + (ap_param_entry - ap_trampoline_start), %rax
    xorl %ebp, %ebp
    call *%rax
    ud2

    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
    .quad 0x00af9a000000ffff            /* 0x18: 64-bit code */
ap_gdt_ptr:
    .word ap_gdt_ptr - ap_gdt - 1
    .long AP_BASE + (ap_gdt - ap_trampoline_start)

    .p2align 3
    .global ap_param_cr3, ap_param_efer, ap_param_stack, ap_param_cpu, ap_param_entry
ap_param_cr3:
    .quad 0
ap_param_efer:
    .quad 0
ap_param_stack:
    .quad 0
ap_param_cpu:
    .quad 0
ap_param_entry:
    .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
    .code64
