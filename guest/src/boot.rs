//! Boot assembly: multiboot header, 32-bit entry (page tables, long mode), AP trampoline,
//! interrupt/exception stubs and the few services ring-3 code needs (via `int3`).
//!
//! Design notes (all learnt the hard way on a software-assisted nested KVM, "kvm_pvm"):
//! * Guest ring-0 code there is *emulated* instruction by instruction (thousands of times
//!   slower than ring 3), and the emulator knows no SSE. So ring 0 runs only this file's
//!   integer asm: mode switches, descriptor tables, `hlt`, the timer tick. Every CPU does
//!   its real work in ring 3 (Rust) on identity-mapped user pages (LAPIC MMIO included).
//! * Ring-3 port I/O must not depend on RFLAGS.IOPL: that KVM runs user mode with
//!   hardware IOPL=0 and emulates the faulting I/O instruction, honouring only the I/O
//!   permission bitmap of the guest TSS. So every TSS carries a bitmap that allows all
//!   ports (shared: one bitmap after the TSS array), and we also set IOPL=3 for TCG.
//! * User mode there always runs with IF=1 and `int N` from ring 3 raises #UD: ring 3 never
//!   executes cli/sti; `syscall` does not reach ring 0 there either, so services go through a
//!   DPL-3 `int3` gate. Everything interrupt-related is
//!   set up in ring 0 before the first drop to ring 3.

use crate::smp::{IOMAP_OFFSET, MAX_CPUS, STACK_SIZE};

core::arch::global_asm!(
    r#"
    .set KSTACK_SIZE, {stack_size}
    .set MAX_CPUS, {max_cpus}
    .set TRAMP_BASE, 0x8000
    .set IOMAP_OFFSET, {iomap_offset}
    .set TIMER_VECTOR, {timer_vector}
    .set WAKE_VECTOR, {wake_vector}

/* ------------------------------------------------------------------ multiboot v1 header */
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long 0x1BADB002
    .long 0x00000003                /* align modules, want mem_* / mmap */
    .long -(0x1BADB002 + 0x00000003)

/* ------------------------------------------------------------------ enter long mode macro */
    .macro ENTER_LONG_MODE target
    mov %cr4, %eax
    or $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov %cr0, %eax
    and $0x9FFFFFF3, %eax           /* clear CD, NW, TS, EM */
    or $0x80010023, %eax            /* PG | WP | NE | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $\target
    .endm

/* Drop to ring 3 at %rcx with stack %rsp and RFLAGS \flags (IOPL=3; IF as given). */
    .macro ENTER_RING3 flags
    mov %rsp, %rax
    pushq $0x1b                     /* SS: user data | RPL 3 */
    push %rax                       /* RSP */
    pushq $\flags                  /* RFLAGS */
    pushq $0x23                     /* CS: user code | RPL 3 */
    push %rcx                       /* RIP */
    iretq
    .endm

/* ------------------------------------------------------------------ BSP 32-bit entry */
    .section .boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %eax, %esi                  /* multiboot magic */
    mov %ebx, %edi                  /* multiboot info (physical) */
    rdtsc
    mov %eax, BOOT_TSC
    mov %edx, BOOT_TSC+4
    mov %esi, MB_MAGIC
    mov %edi, MB_INFO
    lgdt gdt_ptr
    ljmp $0x28, $1f
1:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $(bsp_kstack + KSTACK_SIZE), %esp

    /* Identity map the low 4 GiB, user-accessible (ring 3 does port I/O and LAPIC MMIO). */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb 20f
    mov $0x80000001, %eax
    cpuid
    bt $26, %edx                    /* 1 GiB pages? */
    jnc 20f
    xor %ecx, %ecx
10: mov %ecx, %eax
    shl $30, %eax
    or $0x87, %eax                  /* P | RW | US | PS */
    mov %eax, pdpt(,%ecx,8)
    movl $0, pdpt+4(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 10b
    jmp 40f
20: xor %ecx, %ecx                  /* 2 MiB pages: 4 page directories */
21: mov %ecx, %eax
    shl $12, %eax
    add $pd, %eax
    or $0x07, %eax                  /* P | RW | US */
    mov %eax, pdpt(,%ecx,8)
    movl $0, pdpt+4(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 21b
    xor %ecx, %ecx
30: mov %ecx, %eax
    shl $21, %eax
    or $0x87, %eax
    cmp $0x7F0, %ecx                /* 0xFE000000 and up: IOAPIC/LAPIC/BIOS, uncached */
    jb 31f
    or $0x18, %eax                  /* PWT | PCD */
31: mov %eax, pd(,%ecx,8)
    movl $0, pd+4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 30b
40: mov $pdpt, %eax
    or $0x07, %eax
    mov %eax, pml4
    movl $0, pml4+4
    ENTER_LONG_MODE bsp_entry64

/* ------------------------------------------------------------------ AP 32-bit entry */
    .global ap_entry32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    ENTER_LONG_MODE ap_entry64

/* ------------------------------------------------------------------ 64-bit entries */
    .code64
bsp_entry64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov %eax, %ss
    mov $(bsp_kstack + KSTACK_SIZE), %rsp

    /* TSS 0 (zeroed bss): rsp0, I/O bitmap offset, bitmap terminator; GDT descriptor. */
    mov $(bsp_kstack + KSTACK_SIZE), %rdx
    mov %rdx, TSS+4
    movl $((IOMAP_OFFSET) << 16), TSS+100
    movb $0xff, TSS+IOMAP_OFFSET+8192
    mov $TSS, %rax
    mov %rax, %rdx
    and $0xFFFFFF, %rdx
    shl $16, %rdx
    or $(IOMAP_OFFSET + 8192), %rdx /* limit (< 64 KiB) */
    mov $0x89, %rcx                 /* present, 64-bit TSS (available) */
    shl $40, %rcx
    or %rcx, %rdx
    mov %rax, %rcx
    shr $24, %rcx
    and $0xFF, %rcx
    shl $56, %rcx
    or %rcx, %rdx
    mov %rdx, gdt+0x30
    shr $32, %rax
    mov %rax, gdt+0x38
    mov $0x30, %ax
    ltr %ax

    /* IDT gates from idt_init: (vector, handler) pairs. */
    mov $idt_init, %rsi
    mov $((idt_init_end - idt_init) / 16), %ecx
1:  mov (%rsi), %rdi               /* vector | DPL << 13 */
    mov %edi, %ebx
    and $0x6000, %ebx
    and $0xFF, %edi
    mov 8(%rsi), %rax
    shl $4, %rdi
    add $IDT, %rdi
    mov %eax, %edx
    and $0xFFFF, %edx
    or $0x80000, %edx               /* selector 0x08 */
    mov %edx, (%rdi)
    mov %eax, %edx
    and $0xFFFF0000, %edx
    or $0x8E00, %edx                /* present, interrupt gate */
    or %ebx, %edx                   /* DPL */
    mov %edx, 4(%rdi)
    shr $32, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    add $16, %rsi
    dec %ecx
    jnz 1b
    lidt idt_ptr

    /* Legacy PICs: remap to 0x20-0x2f and mask everything. PIT channel 0: one last
       one-shot, so it stops interrupting (an idle guest should cost the host nothing). */
    mov $0x11, %al
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $0x04, %al
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xA1
    mov $0x01, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0x30, %al
    out %al, $0x43
    xor %eax, %eax
    out %al, $0x40
    out %al, $0x40

    mov $(bsp_ustack + KSTACK_SIZE - 8), %rsp
    mov $rust_bsp_main, %rcx
    ENTER_RING3 0x3202              /* IOPL=3, IF=1 */

ap_entry64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov %eax, %ss
    mov LAPIC_BASE, %rax
    mov 0x20(%rax), %eax            /* our xAPIC id */
    shr $24, %eax
    mov NCPUS, %edx
    xor %ecx, %ecx
1:  cmp %edx, %ecx
    jae 9f
    cmp CPU_APIC_IDS(,%rcx,4), %eax
    je 2f
    inc %ecx
    jmp 1b
2:  mov AP_KSTACK_TOP(,%rcx,8), %rsp
    mov %ecx, %eax
    shl $4, %eax
    add $0x30, %eax
    ltr %ax
    lidt idt_ptr
    mov %ecx, %esi
    mov %esi, %edi                  /* rust_ap_main(index) */
    mov AP_USTACK_TOP(,%rsi,8), %rsp
    mov $rust_ap_main, %rcx
    ENTER_RING3 0x3202
9:  cli                             /* not in our CPU table: park */
    hlt
    jmp 9b

/* ------------------------------------------------------------------ AP real-mode trampoline */
/* Copied to TRAMP_BASE (SIPI vector 0x08); position dependent on TRAMP_BASE only. */
    .section .text.tramp, "ax"
    .code16
    .global ap_tramp_start
    .global ap_tramp_end
ap_tramp_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (TRAMP_BASE + tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x28, $ap_entry32
    .balign 8
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64

/* ------------------------------------------------------------------ interrupt stubs */
    .section .text.isr, "ax"
    .macro EXC_NOERR n
exc_\n:
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
exc_\n:
    pushq $\n
    jmp exc_common
    .endm
    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3                     /* (unused: vector 3 is the service gate) */
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    EXC_ERR   13
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR   21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR   29
    EXC_ERR   30
    EXC_NOERR 31

exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %cr2, %rax
    push %rax
    /* Report from ring 3 (Rust may use SSE, which some KVMs can't emulate in ring 0): the
       frame stays where it is (user-accessible memory), Rust runs just below it. */
    mov %rsp, %rdi                  /* rust_exception(&frame) */
    lea -256(%rsp), %rsp
    and $-16, %rsp
    sub $8, %rsp
    mov $rust_exception, %rcx
    ENTER_RING3 0x3002              /* IF=0 where that means anything */

/* LAPIC timer tick (idle workload): count it on this CPU unless asked to stall. */
    .global timer_isr
timer_isr:
    push %rax
    push %rdx
    mov %rsp, %rax
    and $-KSTACK_SIZE, %rax
    mov (%rax), %eax                /* CPU index tag at the stack base (BSP: 0) */
    cmpb $0, STALL_REQ(%rax)
    jne 3f
    shl $6, %rax
    incq PERCPU(%rax)
3:  mov LAPIC_BASE, %rdx
    movl $0, 0xB0(%rdx)             /* EOI */
    pop %rdx
    pop %rax
    iretq

    .global spurious_isr
spurious_isr:
    iretq

/* Wake-up IPI: only there to end a `hlt`. */
    .global wake_isr
wake_isr:
    push %rdx
    mov LAPIC_BASE, %rdx
    movl $0, 0xB0(%rdx)             /* EOI */
    pop %rdx
    iretq

/* Services for ring 3: `int3` through a DPL-3 gate (vector 3), interrupts off on entry,
   %rax = 0 wait for one interrupt, 1 halt forever, 2 reset the machine,
   4 sleep until GO != 0. */
    .global service_isr
service_isr:
    cmp $1, %rax
    je 1f
    cmp $2, %rax
    je 2f
    cmp $4, %rax
    je 4f
    sti
    hlt
    cli
    iretq
1:  cli
    hlt
    jmp 1b
2:  lidt null_idt_ptr               /* triple fault: no IDT, then an exception */
    ud2
    mov $0x06, %al                  /* (if we are still here) PCI reset control */
    mov $0xCF9, %dx
    out %al, %dx
    mov $0xFE, %al                  /* 8042 reset line */
    out %al, $0x64
    jmp 1b
4:  cmpl $0, GO                     /* interrupts are off while we look: no lost wake-up */
    jne 5f
    sti
    hlt
    cli
    jmp 4b
5:  iretq

/* ------------------------------------------------------------------ data */
    .section .rodata.idt, "a"

    /* (vector, handler) pairs for the IDT */
    .balign 8
idt_init:
    .irp v, 0,1,2,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad \v, exc_\v
    .endr
    .quad 3 | 0x6000, service_isr   /* DPL 3: callable from ring 3 with int3 */
    .irp v, 0x20,0x21,0x22,0x23,0x24,0x25,0x26,0x27,0x28,0x29,0x2a,0x2b,0x2c,0x2d,0x2e,0x2f
    .quad \v, spurious_isr       /* masked legacy PIC: only spurious IRQs */
    .endr
    .quad TIMER_VECTOR, timer_isr
    .quad WAKE_VECTOR, wake_isr
    .quad 0xFF, spurious_isr
idt_init_end:

    .section .data.gdt, "aw"
    .balign 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF        /* 0x18 user data (DPL 3) */
    .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit (DPL 3) */
    .quad 0x00CF9A000000FFFF        /* 0x28 kernel code, 32-bit */
    .fill 2*MAX_CPUS, 8, 0          /* 0x30 + 16*i: TSS of CPU i */
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0, 0, 0
    .global idt_ptr
idt_ptr:
    .word 4095
    .quad IDT
    .word 0, 0, 0
null_idt_ptr:
    .word 0
    .quad 0

    .section .bss.pagetables, "aw", @nobits
    .balign 4096
    .global pml4
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4 * 4096

    /* 16 KiB aligned by linker.ld (not .balign: that would raise the segment's alignment
       and push the multiboot header past the first 8 KiB of the file) */
    .section .bss.stack, "aw", @nobits
    .global bsp_kstack
    .global bsp_ustack
bsp_kstack: .skip KSTACK_SIZE
bsp_ustack: .skip KSTACK_SIZE
"#,
    stack_size = const STACK_SIZE,
    max_cpus = const MAX_CPUS,
    iomap_offset = const IOMAP_OFFSET,
    timer_vector = const crate::apic::TIMER_VECTOR,
    wake_vector = const crate::apic::WAKE_VECTOR,
    options(att_syntax)
);
