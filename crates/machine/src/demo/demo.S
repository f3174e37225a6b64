/*
 * Keel's built-in demo guest: a PVH kernel (entered in 32-bit protected mode, paging off).
 * It asks CPUID leaf 0x40000000 which hypervisor it runs on, prints a banner on COM1
 * (port 0x3f8), then powers the machine off through the ACPI GED sleep control register
 * (SLP_EN | SLP_TYP=5 at 0xfea00200, microvm's S5), which ends the VMM with status 0.
 * Assembled by build.rs with GNU as; about a hundred instructions run in total.
 */
    .code32

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long _start

    .text
    .globl _start
_start:
    movl $stack_top, %esp
    movl $0x40000000, %eax
    xorl %ecx, %ecx
    cpuid
    movl $name_unknown, %edi
    cmpl $0x4b4d564b, %ebx          /* "KVMK" */
    jne 1f
    movl $name_kvm, %edi
    jmp 2f
1:  cmpl $0x54474354, %ebx          /* "TCGT" */
    jne 2f
    movl $name_tcg, %edi
2:  movl $banner, %esi
    call puts
    movl %edi, %esi
    call puts
    movl $newline, %esi
    call puts
    movb $0x34, 0xfea00200          /* ACPI S5: power off, exit status 0 */
3:  cli
    hlt
    jmp 3b

/* Writes the NUL-terminated string at %esi to COM1. */
puts:
    movw $0x3f8, %dx
4:  lodsb
    testb %al, %al
    jz 5f
    outb %al, %dx
    jmp 4b
5:  ret

    .section .rodata
banner:       .asciz "Hello from the Keel demo guest, running on "
name_kvm:     .asciz "kvm"
name_tcg:     .asciz "tcg"
name_unknown: .asciz "an unknown accelerator"
newline:      .asciz "\n"

    .bss
    .balign 16
    .skip 256
stack_top:
