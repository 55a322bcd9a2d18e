/*
 * The floor for a PIO exit round trip: a plain C loop around KVM_RUN, no devices, no threads,
 * for a 64-bit guest in CPL3 (IOPL 3) running `out dx, al` in a loop, as the test guest's `pio`
 * command does. Prints the mean round trip in ns. Build: cc -O2 -o pio_floor pio_floor.c
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

static void fail(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv)
{
    long exits = argc > 1 ? atol(argv[1]) : 100000;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) fail("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) fail("KVM_CREATE_VM");
    size_t size = 16 << 20;
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region region = { .memory_size = size, .userspace_addr = (uintptr_t)mem };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) fail("KVM_SET_USER_MEMORY_REGION");
    ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);

    /* 2 MiB identity pages, user-accessible; a GDT with kernel and user 64-bit segments. */
    uint64_t *pml4 = (uint64_t *)(mem + 0x10000), *pdpt = (uint64_t *)(mem + 0x11000), *pd = (uint64_t *)(mem + 0x12000);
    pml4[0] = 0x11000 | 7;
    pdpt[0] = 0x12000 | 7;
    for (int i = 0; i < 8; i++) pd[i] = ((uint64_t)i << 21) | 0x87;
    uint64_t *gdt = (uint64_t *)(mem + 0x1000);
    gdt[1] = 0x00af9b000000ffffULL; gdt[2] = 0x00cf93000000ffffULL;
    gdt[3] = 0x00cff3000000ffffULL; gdt[4] = 0x00affb000000ffffULL;

    /* CPL0: iretq to CPL3 with IOPL 3; CPL3: mov dx,0x80 ; L: out dx,al ; jmp L */
    uint8_t code0[] = { 0x6a, 0x1b, 0x68, 0x00, 0x00, 0x20, 0x00, 0x68, 0x02, 0x30, 0x00, 0x00,
                        0x6a, 0x23, 0x68, 0x00, 0x30, 0x00, 0x00, 0x48, 0xcf };
    uint8_t code3[] = { 0x66, 0xba, 0x80, 0x00, 0xee, 0xeb, 0xfd };
    memcpy(mem + 0x2000, code0, sizeof code0);
    memcpy(mem + 0x3000, code3, sizeof code3);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) fail("KVM_CREATE_VCPU");
    struct kvm_run *run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs s;
    ioctl(vcpu, KVM_GET_SREGS, &s);
    struct kvm_segment cs = { .limit = 0xffffffff, .selector = 0x08, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment ds = { .limit = 0xffffffff, .selector = 0x10, .type = 3, .present = 1, .s = 1, .db = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.gdt.base = 0x1000; s.gdt.limit = 5 * 8 - 1;
    s.cr3 = 0x10000; s.cr4 = 0x20; s.cr0 = 0x80050033; s.efer = 0x500;
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) fail("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = 0x2000, .rflags = 2, .rsp = 0x1f0000 };
    ioctl(vcpu, KVM_SET_REGS, &regs);

    for (long i = -1000; i < exits; i++) { /* 1000 warm-up exits */
        static struct timespec t0;
        if (i == 0) clock_gettime(CLOCK_MONOTONIC, &t0);
        if (ioctl(vcpu, KVM_RUN, 0) < 0) fail("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "exit %u\n", run->exit_reason); return 1; }
        if (i == exits - 1) {
            struct timespec t1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double ns = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / exits;
            printf("%.1f\n", ns);
        }
    }
    return 0;
}
