/*
 * The floor for building and tearing down a VM like the one a migration destination builds (and
 * a reboot rebuilds): KVM_CREATE_VM, TSS, in-kernel irqchip, PIT, one memfd-backed RAM slot
 * (MAP_SHARED), vCPUs with the supported CPUID -- and closing it all again. No payload, no threads.
 *
 * Usage: vm_floor <ram_mib> <vcpus> <rounds>     Build: cc -O2 -o vm_floor vm_floor.c
 * Prints one line per round: `create_ms <ms> slot_ms <ms> destroy_ms <ms>` (slot_ms: the
 * KVM_SET_USER_MEMORY_REGION call alone, part of create_ms).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_VCPUS 8
#define CPUID_ENTRIES 256

static void die(const char *what) { perror(what); exit(1); }

static double ms_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s <ram_mib> <vcpus> <rounds>\n", argv[0]);
        return 2;
    }
    size_t size = (size_t)strtoull(argv[1], NULL, 0) << 20;
    int vcpus = atoi(argv[2]), rounds = atoi(argv[3]);
    if (vcpus < 1 || vcpus > MAX_VCPUS || size == 0) return 2;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + CPUID_ENTRIES * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) die("calloc");

    for (int r = 0; r < rounds; r++) {
        double t0 = ms_now();
        int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (kvm < 0) die("/dev/kvm");
        int vm = ioctl(kvm, KVM_CREATE_VM, 0);
        if (vm < 0) die("KVM_CREATE_VM");
        if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0) die("KVM_SET_TSS_ADDR");
        if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
        int mfd = memfd_create("vm-floor", MFD_CLOEXEC);
        if (mfd < 0 || ftruncate(mfd, (off_t)size) < 0) die("memfd");
        void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (mem == MAP_FAILED) die("mmap");
        struct kvm_userspace_memory_region region = { .slot = 0, .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)mem };
        double s0 = ms_now();
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
        double s1 = ms_now();
        cpuid->nent = CPUID_ENTRIES;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
        int fds[MAX_VCPUS];
        for (int i = 0; i < vcpus; i++) {
            fds[i] = ioctl(vm, KVM_CREATE_VCPU, i);
            if (fds[i] < 0) die("KVM_CREATE_VCPU");
            if (ioctl(fds[i], KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
        }
        double t1 = ms_now();
        for (int i = 0; i < vcpus; i++) close(fds[i]);
        munmap(mem, size);
        close(mfd);
        close(vm);
        close(kvm);
        double t2 = ms_now();
        printf("create_ms %.3f slot_ms %.3f destroy_ms %.3f\n", t1 - t0, s1 - s0, t2 - t1);
        fflush(stdout);
    }
    return 0;
}
