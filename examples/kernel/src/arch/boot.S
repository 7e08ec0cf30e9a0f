/*
 * PVH entry: QEMU (`-kernel`) finds XEN_ELFNOTE_PHYS32_ENTRY and jumps to pvh_start in 32-bit
 * protected mode, paging off, with %ebx = physical address of struct hvm_start_info.
 * We identity-map the first 4 GiB with 2 MiB pages, enter long mode and call kernel_main(ebx).
 */

    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi                     /* keep hvm_start_info across the set-up */

    /* Zero .bss: the page tables and boot stack live there. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories. */
    movl $boot_pdpt + 0x3, boot_pml4
    movl $boot_pd + 0x3, %eax
    movl %eax, boot_pdpt
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 8
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 16
    addl $0x1000, %eax
    movl %eax, boot_pdpt + 24

    /* 2048 entries of 2 MiB: present, writable, page size. */
    movl $boot_pd, %edi
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    /* CR4.PAE, then CR3. */
    movl %cr4, %eax
    orl $(1 << 5), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER: LME and SCE always, NXE when CPUID.80000001H:EDX.NX says it exists. */
    movl $0x80000001, %eax
    cpuid
    xorl %edi, %edi
    testl $(1 << 20), %edx
    jz 2f
    movl $(1 << 11), %edi
2:  movl $0xC0000080, %ecx
    rdmsr
    orl $((1 << 8) | 1), %eax
    orl %edi, %eax
    wrmsr

    /* CR0.PG and CR0.WP: long mode is active from here. */
    movl %cr0, %eax
    orl $((1 << 31) | (1 << 16)), %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi
    call kernel_main
3:  cli
    hlt
    jmp 3b

    .section .rodata.boot, "a"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit kernel code */
    .quad 0x00cf92000000ffff            /* 0x10: kernel data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 12
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .global boot_stack_top
boot_stack:
    .skip 65536
boot_stack_top:
