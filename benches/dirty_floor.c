/*
 * The floor for one dirty-log sync: a plain C program around KVM_GET_DIRTY_LOG, a popcount of the
 * bitmap and KVM_CLEAR_DIRTY_LOG (manual-protect mode) of the whole slot, on a 1 GiB memfd-backed
 * slot (MAP_SHARED, as vmmpy's guest RAM). A one-vCPU guest in CPL3 (IOPL 3) writes one word to
 * every page of [64 MiB, 64 MiB + <mib> MiB) -- the pages the test guest's `dirty <mib>` sweeps --
 * then exits with `out`; the host then syncs. One untimed warm-up round, then <rounds> timed ones.
 *
 * Usage: dirty_floor <mib> <rounds>     Build: cc -O2 -o dirty_floor dirty_floor.c
 * Prints one line per timed round: `pages <n> get_ns <ns> scan_ns <ns> clear_ns <ns> total_ns <ns> touch_ms <ms>`.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SLOT_SIZE (1ull << 30)
#define PAGES (SLOT_SIZE >> 12)
#define AREA_BASE (64ull << 20)

/* guest physical layout of this floor (all below 64 MiB) */
#define GDT_GPA 0x1000
#define PML4_GPA 0x4000
#define PDPT_GPA 0x5000
#define PD_GPA 0x6000
#define STACK_TOP 0x7ff0
#define CODE0_GPA 0x8000
#define CODE3_GPA 0x9000

static void die(const char *what) { perror(what); exit(1); }

static uint64_t ns_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* A tiny x86-64 assembler for the few instructions the guest needs. */
struct code { uint8_t *p; int n; };
static void b(struct code *c, uint8_t v) { c->p[c->n++] = v; }
static void d32(struct code *c, uint32_t v) { memcpy(c->p + c->n, &v, 4); c->n += 4; }
static void rel8_to(struct code *c, int target) { int8_t r = (int8_t)(target - (c->n + 1)); b(c, (uint8_t)r); }

static void run_until_io(int vcpu, struct kvm_run *run)
{
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO) {
        fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s <mib> <rounds>\n", argv[0]);
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 0);
    int rounds = atoi(argv[2]);
    if (mib == 0 || AREA_BASE + (mib << 20) > SLOT_SIZE) {
        fprintf(stderr, "the area must lie inside the 1 GiB slot\n");
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    /* Manual protect with whatever flags KVM offers (vmmpy enables the same). */
    int offered = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    if (offered <= 0 || !(offered & 1)) {
        fprintf(stderr, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not offered\n");
        return 1;
    }
    struct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 };
    cap.args[0] = (uint64_t)(offered & 3);
    if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0) die("KVM_ENABLE_CAP manual protect");

    int mfd = memfd_create("dirty-floor", MFD_CLOEXEC);
    if (mfd < 0) die("memfd_create");
    if (ftruncate(mfd, SLOT_SIZE) < 0) die("ftruncate");
    uint8_t *mem = mmap(NULL, SLOT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (mem == MAP_FAILED) die("mmap");

    /* Identity map of the slot with 2 MiB user pages. */
    uint64_t *pml4 = (uint64_t *)(mem + PML4_GPA), *pdpt = (uint64_t *)(mem + PDPT_GPA), *pd = (uint64_t *)(mem + PD_GPA);
    pml4[0] = PDPT_GPA | 0x7;
    pdpt[0] = PD_GPA | 0x7;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x87; /* present, writable, user, 2 MiB */
    /* GDT: 0x08 ring-0 code64, 0x10 ring-0 data, 0x18 ring-3 data, 0x20 ring-3 code64 */
    uint64_t *gdt = (uint64_t *)(mem + GDT_GPA);
    gdt[1] = 0x00209a0000000000ull;
    gdt[2] = 0x0000920000000000ull;
    gdt[3] = 0x0000f20000000000ull;
    gdt[4] = 0x0020fa0000000000ull;

    /* CPL0: push ss, rsp, rflags (IOPL 3), cs, rip; iretq into CPL3. */
    struct code c0 = { mem + CODE0_GPA, 0 };
    b(&c0, 0x6a); b(&c0, 0x18 | 3);
    b(&c0, 0x68); d32(&c0, STACK_TOP);
    b(&c0, 0x68); d32(&c0, 0x3002);
    b(&c0, 0x6a); b(&c0, 0x20 | 3);
    b(&c0, 0x68); d32(&c0, CODE3_GPA);
    b(&c0, 0x48); b(&c0, 0xcf);
    /* CPL3: top: mov edi,BASE ; page: mov [rdi],eax ; add edi,4096 ; cmp edi,END ; jb page ;
     *       mov dx,0x3f8 ; out dx,al ; jmp top */
    struct code c3 = { mem + CODE3_GPA, 0 };
    int top = c3.n;
    b(&c3, 0xbf); d32(&c3, (uint32_t)AREA_BASE);
    int page = c3.n;
    b(&c3, 0x89); b(&c3, 0x07);
    b(&c3, 0x81); b(&c3, 0xc7); d32(&c3, 4096);
    b(&c3, 0x81); b(&c3, 0xff); d32(&c3, (uint32_t)(AREA_BASE + (mib << 20)));
    b(&c3, 0x72); rel8_to(&c3, page);
    b(&c3, 0x66); b(&c3, 0xba); b(&c3, 0xf8); b(&c3, 0x03);
    b(&c3, 0xee);
    b(&c3, 0xeb); rel8_to(&c3, top);

    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = KVM_MEM_LOG_DIRTY_PAGES, .guest_phys_addr = 0,
        .memory_size = SLOT_SIZE, .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0) die("KVM_SET_TSS_ADDR");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    long run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 0xb,
                                .present = 1, .dpl = 0, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0x3,
                                .present = 1, .dpl = 0, .s = 1, .db = 1, .g = 1 };
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 1u << 5;                          /* PAE */
    sregs.cr0 = 0x80050033u;                      /* PG, AM, WP, NE, ET, MP, PE */
    sregs.efer = (1u << 8) | (1u << 10);          /* LME, LMA */
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = CODE0_GPA, .rsp = STACK_TOP, .rflags = 0x2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    uint64_t *bitmap = calloc(PAGES / 64, sizeof(uint64_t));
    if (!bitmap) die("calloc");
    struct kvm_dirty_log get = { .slot = 0, .dirty_bitmap = bitmap };
    struct kvm_clear_dirty_log clear = { .slot = 0, .first_page = 0, .num_pages = PAGES, .dirty_bitmap = bitmap };

    /* With KVM_DIRTY_LOG_INITIALLY_SET every bit starts set and nothing is protected: clear all. */
    memset(bitmap, 0xff, PAGES / 8);
    if (ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear) < 0) die("KVM_CLEAR_DIRTY_LOG (initial)");

    for (int r = -1; r < rounds; r++) { /* round -1: warm-up (first touch allocates the pages) */
        uint64_t t0 = ns_now();
        run_until_io(vcpu, run);
        uint64_t t1 = ns_now();
        if (ioctl(vm, KVM_GET_DIRTY_LOG, &get) < 0) die("KVM_GET_DIRTY_LOG");
        uint64_t t2 = ns_now();
        uint64_t n = 0;
        for (uint64_t w = 0; w < PAGES / 64; w++)
            n += (uint64_t)__builtin_popcountll(bitmap[w]);
        uint64_t t3 = ns_now();
        if (ioctl(vm, KVM_CLEAR_DIRTY_LOG, &clear) < 0) die("KVM_CLEAR_DIRTY_LOG");
        uint64_t t4 = ns_now();
        if (r >= 0)
            printf("pages %llu get_ns %llu scan_ns %llu clear_ns %llu total_ns %llu touch_ms %.2f\n",
                   (unsigned long long)n, (unsigned long long)(t2 - t1), (unsigned long long)(t3 - t2),
                   (unsigned long long)(t4 - t3), (unsigned long long)(t4 - t1), (t1 - t0) / 1e6);
        fflush(stdout);
    }
    return 0;
}
