/*
 * entry.S - all of the test guest's supervisor (CPL0) code, plus its static GDT, page tables,
 * stacks and the `vmmpy` ELF note.
 *
 * CPL0 code is instruction-emulated on the PVM hosts we test on (~0.8 us per instruction), so it is
 * kept to a straight line of about fifteen instructions per vCPU: no loops, no waiting. The GDT and
 * the page tables are initialised data in the ELF file, not built at run time; that is also why an
 * AP does not have to wait for the BSP before it loads them.
 *
 * Entry states:
 *  - `_start` (ELF e_entry, Linux's 64-bit boot protocol; BSP): 64-bit mode, CPL0, IF=0, the VMM's
 *    boot GDT/page tables, RSI = zero page.
 *  - `pvh_start` (the Xen PHYS32_ENTRY note, what QEMU microvm, Cloud Hypervisor and vmmpy use by
 *    default; BSP): 32-bit protected mode, paging off, flat segments, EBX = hvm_start_info. Six
 *    more instructions switch to long mode on the static page tables.
 *  - `ap_entry` (the `vmmpy` note; vmmpy only): as `_start`, RDI = vCPU index (1..N-1), RSP undefined.
 * bsp_main(zero_page, start_info) gets exactly one of the two non-zero.
 *
 * The idle fallback for VMMs without vmmpy's idle port (idle.c; under vmmpy it is never used):
 * `int3` from CPL3 enters idle_gate (vector 3, DPL 3), which halts until the next interrupt and
 * returns. Not `int $n`: PVM hosts deliver no software interrupt from CPL3 into a non-PVM guest's
 * IDT (the guest triple-faults), while the #BP that int3 raises is reflected into it like any
 * exception. Not SYSCALL: PVM hosts jump to LSTAR without leaving CPL3. The IDT has only that gate
 * and the LAPIC timer and spurious vectors, so every other exception still ends in a triple fault.
 *
 * The BSP loads a TSS: RSP0 for the gate, and an I/O bitmap that allows every port, because PVM
 * hosts do not honour IOPL=3 at CPL3 and check the bitmap instead, and the TR a VMM leaves points
 * at whatever is in low memory (zeros under vmmpy, firmware data under QEMU).
 */

#define KERNEL_CS   0x10
#define KERNEL_DS   0x18
#define USER_DS     0x23        /* GDT slot 4, RPL 3 */
#define USER_CS     0x2b        /* GDT slot 5, RPL 3 */
#define USER_RFLAGS 0x3002      /* IOPL=3, IF=0, reserved bit 1 */
#define CR4_SMEP_SMAP 0x300000

#define MAX_CPUS      8
#define BSP_STACK_SIZE 65536
#define AP_STACK_SHIFT 14       /* 16 KiB per AP */
#define AP_STACK_SIZE  (1 << AP_STACK_SHIFT)
#define IDLE_PORT      0x5f0
#define KERNEL_TSS    0x30
#define CR0_PE_PG     0x80000001
#define CR4_PAE       0x20
#define MSR_EFER      0xc0000080
#define EFER_LME      0x100
#define LAPIC_EOI     0xfee000b0

    .code64

/* ---------------------------------------------------------------- CPL0 ---------------- */
    .section .text.entry, "ax"
    .globl _start
_start:                                 /* BSP, 64-bit entry */
    mov     %rsi, %rdi                  /* bsp_main(zero_page, 0) */
    xor     %esi, %esi
bsp_enter:
    lgdt    gdt_desc(%rip)
    mov     $KERNEL_TSS, %ax            /* one TSS (LTR marks it busy), so only the BSP */
    ltr     %ax
    lea     bsp_main(%rip), %rbx
    lea     bsp_stack_top(%rip), %rax
    jmp     enter_user

    .globl ap_entry
ap_entry:                               /* APs: RDI = index, RSI = zero page */
    cmp     $MAX_CPUS, %rdi
    jae     ap_park
    test    %rdi, %rdi
    jz      ap_park
    mov     %rdi, %rax
    shl     $AP_STACK_SHIFT, %rax
    lea     ap_stacks(%rip), %rcx
    add     %rcx, %rax                  /* top of this AP's stack: ap_stacks + i*SIZE */
    lea     ap_main(%rip), %rbx         /* ap_main(index, zero_page) */
    /* fall through */

/* RAX = user stack top, RBX = C function to call at CPL3 (RDI/RSI already hold its arguments) */
enter_user:
    lgdt    gdt_desc(%rip)              /* again on the BSP: one path for all vCPUs */
    lidt    idt_desc(%rip)              /* three gates: any other exception triple-faults */
    mov     %cr4, %rcx
    test    $CR4_SMEP_SMAP, %ecx        /* CPL0 runs on from user pages until iretq */
    jz      1f
    and     $~CR4_SMEP_SMAP, %rcx
    mov     %rcx, %cr4
1:  lea     pml4(%rip), %rcx
    mov     %rcx, %cr3
    mov     %rax, %rsp
    pushq   $USER_DS                    /* SS */
    pushq   %rax                        /* RSP */
    pushq   $USER_RFLAGS                /* RFLAGS */
    pushq   $USER_CS                    /* CS */
    lea     user_trampoline(%rip), %rcx
    pushq   %rcx                        /* RIP */
    iretq

/* CPL0 ends of the idle fallback (idle.c): the gate sleeps until an interrupt; IRETQ gives the
 * caller its RFLAGS (IF=0) back. The timer handler only acknowledges. */
    .globl  idle_gate, timer_isr, spurious_isr
idle_gate:
    sti
    hlt
    iretq
timer_isr:
    push    %rax
    mov     $LAPIC_EOI, %eax
    movl    $0, (%rax)
    pop     %rax
spurious_isr:
    iretq

/* PVH entry: EBX = hvm_start_info. Long mode on the static tables, then the 64-bit BSP path. */
    .code32
    .globl pvh_start
pvh_start:
    mov     $CR4_PAE, %eax
    mov     %eax, %cr4
    mov     $pml4, %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr
    mov     $CR0_PE_PG, %eax
    mov     %eax, %cr0
    lgdt    gdt_desc                    /* the 32-bit form reads the low half of the base */
    ljmp    $KERNEL_CS, $pvh_start64
    .code64
pvh_start64:
    mov     %ebx, %esi                  /* bsp_main(0, start_info); zero-extends */
    xor     %edi, %edi
    jmp     bsp_enter

/* An AP index the guest has no room for: sleep in the idle port forever (rarely, never tight). */
ap_park:
    mov     $IDLE_PORT, %dx
    mov     $1000, %eax
    out     %eax, %dx
    jmp     ap_park

/* ---------------------------------------------------------------- CPL3 ---------------- */
    .text
user_trampoline:
    call    *%rbx                       /* RSP is 16-byte aligned here, as the ABI wants */
    ud2                                 /* never returns; if it did: triple fault */

/* ---------------------------------------------------------------- data ---------------- */
    .section .data.pagetables, "aw"
    .balign 4096
/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible: PML4 -> PDPT -> 4 PDs. */
pml4:
    .quad   pdpt + 0x7                  /* present, writable, user */
    .fill   511, 8, 0
pdpt:
    .quad   pd + 0x0000 + 0x7
    .quad   pd + 0x1000 + 0x7
    .quad   pd + 0x2000 + 0x7
    .quad   pd + 0x3000 + 0x7
    .fill   508, 8, 0
pd:
    .set    i, 0
    .rept   2048
    .quad   (i << 21) | 0x87            /* present, writable, user, 2 MiB page */
    .set    i, i + 1
    .endr

    .data
    .balign 16
gdt:
    .quad   0                           /* 0x00 null */
    .quad   0                           /* 0x08 null (Linux's boot GDT layout) */
    .quad   0x00af9b000000ffff          /* 0x10 kernel code64 */
    .quad   0x00cf93000000ffff          /* 0x18 kernel data */
    .quad   0x00cff3000000ffff          /* 0x20 user data  (selector 0x23) */
    .quad   0x00affb000000ffff          /* 0x28 user code64 (selector 0x2b) */
    .word   tss_end - tss - 1           /* 0x30 64-bit TSS: limit, base (split by guest.ld) */
    .word   tss_base_0_15
    .byte   tss_base_16_23
    .byte   0x89                        /* present, available 64-bit TSS */
    .byte   0
    .byte   tss_base_24_31
    .long   0, 0
gdt_end:

    .balign 16
    .globl  tss
tss:
    .long   0
    .quad   idle_stack_top              /* RSP0: the idle gate's stack */
    .fill   102 - 12, 1, 0
    .word   104                         /* I/O bitmap offset */
    .fill   65536 / 8, 1, 0             /* every port allowed */
    .byte   0xff                        /* the bitmap's terminator */
tss_end:

/* Interrupt gates, 16 bytes each: offset 0-15 and 16-31 (split by guest.ld), CS, type (0x8e for
 * DPL 0, 0xee for DPL 3). */
    .balign 16
idt:
    .fill   3 * 2, 8, 0                 /* exceptions 0-2: not present */
    .word   idle_gate_0_15, KERNEL_CS, 0xee00, idle_gate_16_31
    .long   0, 0                        /* 3 (#BP): the idle gate, int3 from CPL3 */
    .fill   (0x20 - 4) * 2, 8, 0        /* exceptions 4-31: not present */
    .word   timer_isr_0_15, KERNEL_CS, 0x8e00, timer_isr_16_31
    .long   0, 0                        /* 0x20: LAPIC timer */
    .word   spurious_isr_0_15, KERNEL_CS, 0x8e00, spurious_isr_16_31
    .long   0, 0                        /* 0x21: LAPIC spurious */
idt_end:

    .balign 8
    .word   0, 0, 0
gdt_desc:
    .word   gdt_end - gdt - 1
    .quad   gdt

    .balign 8
    .word   0, 0, 0
idt_desc:
    .word   idt_end - idt - 1
    .quad   idt

/* ---------------------------------------------------------------- stacks --------------- */
    .section .bss.stacks, "aw", @nobits
    .balign 4096
    .skip   BSP_STACK_SIZE
bsp_stack_top:
ap_stacks:                              /* AP i's stack: [ap_stacks + (i-1)*SIZE, ap_stacks + i*SIZE) */
    .skip   (MAX_CPUS - 1) * AP_STACK_SIZE
    .skip   4096
idle_stack_top:                         /* the idle gate's CPL0 stack (TSS RSP0), BSP only */

/* ---------------------------------------------------------------- ELF note ------------ */
/* name "vmmpy" (namesz 6), type 1, desc = 64-bit physical address of the AP entry.
 * 4-byte note alignment as in Linux: the descriptor starts 20 bytes into the note. */
    .section .note.vmmpy, "a", @note
    .balign 4
    .long   6                           /* namesz, including the NUL */
    .long   8                           /* descsz */
    .long   1                           /* type: AP entry */
    .asciz  "vmmpy"
    .balign 4
    .quad   ap_entry

/* name "Xen" (namesz 4), type 18 (XEN_ELFNOTE_PHYS32_ENTRY), desc = 32-bit PVH entry. */
    .section .note.Xen, "a", @note
    .balign 4
    .long   4
    .long   4
    .long   18
    .asciz  "Xen"
    .long   pvh_start

    .section .note.GNU-stack, "", @progbits
