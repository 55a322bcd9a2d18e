/*
 * entry.S - all of the test guest's supervisor (CPL0) code, plus its static GDT, page tables,
 * stacks and the `vmmpy` ELF note.
 *
 * CPL0 code is instruction-emulated on the PVM hosts we test on (~0.8 us per instruction), so it is
 * kept to a straight line of about fifteen instructions per vCPU: no loops, no waiting. The GDT and
 * the page tables are initialised data in the ELF file, not built at run time; that is also why an
 * AP does not have to wait for the BSP before it loads them.
 *
 * Entry state (BSP and APs alike): 64-bit mode, CPL0, IF=0, the VMM's boot GDT/page tables,
 * RSI = zero page. APs also have RDI = vCPU index (1..N-1); their RSP is undefined.
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

    .code64

/* ---------------------------------------------------------------- CPL0 ---------------- */
    .section .text.entry, "ax"
    .globl _start
_start:                                 /* BSP */
    mov     %rsi, %rdi                  /* bsp_main(zero_page) */
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
    lgdt    gdt_desc(%rip)
    lidt    idt_desc(%rip)              /* limit 0: any exception escalates to a triple fault */
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
gdt_end:

    .balign 8
    .word   0, 0, 0
gdt_desc:
    .word   gdt_end - gdt - 1
    .quad   gdt

    .balign 8
    .word   0, 0, 0
idt_desc:
    .word   0
    .quad   0

/* ---------------------------------------------------------------- stacks --------------- */
    .section .bss.stacks, "aw", @nobits
    .balign 4096
    .skip   BSP_STACK_SIZE
bsp_stack_top:
ap_stacks:                              /* AP i's stack: [ap_stacks + (i-1)*SIZE, ap_stacks + i*SIZE) */
    .skip   (MAX_CPUS - 1) * AP_STACK_SIZE

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

    .section .note.GNU-stack, "", @progbits
