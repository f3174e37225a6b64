/* Test guest: interrupt-driven COM1 receive. Programs the 8259 (IRQ 4 -> vector 0x24) and the
 * local APIC (ExtINT on LINT0), enables the UART receive interrupt, prints ">" and halts; the
 * ISR echoes each received byte plus one, and "q" ends the run through isa-debug-exit (0xf4)
 * with 5, i.e. status 11. */
    .code32
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long _start
    .text
    .globl _start
_start:
    movl $stack_top, %esp
    lidt idtr
    /* IDT entry for vector 0x24 (IRQ 4 after remapping the master PIC to 0x20) */
    movl $isr, %eax
    movw %ax, idt + 0x24*8
    movw $0x08, idt + 0x24*8 + 2
    movw $0x8e00, idt + 0x24*8 + 4
    shrl $16, %eax
    movw %ax, idt + 0x24*8 + 6
    /* 8259 master: ICW1..ICW4, base 0x20, all masked but IRQ 4 */
    movb $0x11, %al; outb %al, $0x20
    movb $0x20, %al; outb %al, $0x21
    movb $0x04, %al; outb %al, $0x21
    movb $0x01, %al; outb %al, $0x21
    movb $0xef, %al; outb %al, $0x21
    movb $0xff, %al; outb %al, $0xa1
    /* UART: DLAB off, MCR OUT2, IER = receive data available */
    movw $0x3fb, %dx; movb $0x03, %al; outb %al, %dx
    movw $0x3fc, %dx; movb $0x08, %al; outb %al, %dx
    movw $0x3f9, %dx; movb $0x01, %al; outb %al, %dx
    movw $0x3f8, %dx; movb $'>', %al; outb %al, %dx
    /* Local APIC: software-enable it and pass 8259 interrupts through LINT0 (ExtINT) */
    movl $0x1ff, 0xfee000f0
    movl $0x700, 0xfee00350
    sti
1:  hlt
    jmp 1b

isr:
    pushl %eax
    pushl %edx
2:  movw $0x3fd, %dx
    inb %dx, %al
    testb $1, %al
    jz 3f
    movw $0x3f8, %dx
    inb %dx, %al
    cmpb $'q', %al
    je 4f
    incb %al            /* echo the next letter up: proves the guest read it */
    outb %al, %dx
    jmp 2b
3:  movb $0x20, %al
    outb %al, $0x20     /* EOI */
    popl %edx
    popl %eax
    iret
4:  movw $0xf4, %dx
    movb $0x05, %al
    outb %al, %dx
    cli
    hlt

    .data
    .balign 8
idtr: .word 256*8-1
      .long idt
    .bss
    .balign 8
idt: .skip 256*8
    .skip 512
stack_top:
