/* guest.h - shared definitions of the vmmpy test guest (freestanding, CPL3 with IOPL=3). */
#ifndef VMMPY_GUEST_H
#define VMMPY_GUEST_H

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long size_t;

#define MAX_CPUS 8

/* ports (docs/architecture.md) */
#define COM1 0x3f8
#define UART_THR (COM1 + 0)
#define UART_RBR (COM1 + 0)
#define UART_IER (COM1 + 1)
#define UART_FCR (COM1 + 2)
#define UART_LCR (COM1 + 3)
#define UART_LSR (COM1 + 5)
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define IDLE_PORT 0x5f0
#define WAKE_PORT 0x5f4
#define ACPI_PORT 0x600
#define I8042_CMD 0x64
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

/* MMIO (docs/architecture.md): the ACPI GED's event register; reading it clears it */
#define LAPIC_SVR 0xfee000f0ul
#define LAPIC_SW_ENABLE 0x100
#define GED_EVENTS 0xfeb00000ul
#define GED_POWER_BUTTON 0x08

#define barrier() __asm__ volatile("" ::: "memory")
#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

#define PIO_BENCH_PORT 0x80 /* POST code port: no device claims it */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
/* MMIO: one volatile access of exactly the field's width (a device may decode only that width) */
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile const uint8_t *)addr; }
static inline uint16_t mmio_read16(uint64_t addr) { return *(volatile const uint16_t *)addr; }
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile const uint32_t *)addr; }
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }
static inline void mmio_write16(uint64_t addr, uint16_t v) { *(volatile uint16_t *)addr = v; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* idle.c: sleep for at most `ms` milliseconds, in vmmpy's idle port (woken early by serial input,
 * the wake port, pause or kill) or, without vmmpy, in HLT until the LAPIC timer fires. */
void idle_init(void); /* BSP, before it first idles: is vmmpy's idle port there? */
void idle_ms(uint32_t ms);
static inline void wake_all(void) { outb(WAKE_PORT, 1); }

/* main.c */
extern uint32_t ncpus;
extern uint64_t tsc_khz;
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int streq(const char *a, const char *b);
int parse_u64(const char *s, uint64_t *out);
char *next_word(char **s);
int is_ram(uint64_t start, uint64_t end);
/* answer lines: put_* append to the line, put_line sends it */
void put_s(const char *s);
void put_u(uint64_t v);
void put_x(uint64_t v); /* 0x-prefixed hex */
void put_line(void);
void say(const char *s);

/* pattern.c: self-checking blocks (dirty pages, disk sectors): {u64 index, u64 generation,
 * u64 checksum, fill words derived from index and generation} */
void pattern_fill(uint64_t *p, uint32_t words, uint64_t idx, uint64_t gen);
uint64_t pattern_checksum(const uint64_t *p, uint32_t words);

/* dirty.c: the memory-dirtying workload, shared by every vCPU */
#define DIRTY_BASE (64ul << 20)
#define MAX_DIRTY_PAGES (1u << 20) /* 4 GiB of pages */

void dirty_ap_loop(uint32_t index); /* never returns */
/* BSP side */
void dirty_start(uint64_t pages, uint64_t rate);
void dirty_stop(void);
int dirty_running(void);
int dirty_bsp_step(void); /* 64 pages of the BSP's share (returns 0), or a short sleep (1) */
uint32_t dirty_max_gen(void);
uint32_t dirty_min_gen(void);
/* Returns 0 (all good, pages checked in checked) or 1 (first bad page in page, want, got;
 * why: 0 = generation, 1 = index, 2 = checksum). */
int dirty_verify(uint64_t *checked, uint64_t *page, uint64_t *want, uint64_t *got, int *why);

/* pci.c: configuration mechanism #1, bus 0, function 0 of each device */
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11
uint32_t pci_read32(uint32_t dev, uint32_t reg);
uint16_t pci_read16(uint32_t dev, uint32_t reg);
uint8_t pci_read8(uint32_t dev, uint32_t reg);
void pci_write16(uint32_t dev, uint32_t reg, uint16_t v);
int pci_find(uint16_t vendor, uint16_t device, uint32_t nth); /* device number, or -1 */
uint64_t pci_bar(uint32_t dev, uint32_t bar);                 /* memory BAR's address, 0 if none */
uint8_t pci_cap_next(uint32_t dev, uint8_t ptr);              /* 0: first capability; 0 = end */

/* blk.c: the virtio-blk commands (disk 0 does the I/O) */
void blk_command(char *args);
int blk_running(void);
void blk_step(void); /* reap completions, submit more (the BSP calls it while `blk load` runs) */

/* net.c: the virtio-net commands; answers ARP and ICMP echo for its address */
void net_init(const char *cmdline_ip); /* at boot: `ip=` from the command line (or NULL) */
int net_up(void);
void net_poll(int check_status); /* frames in and out; with check_status, the announce bit too */
void net_command(char *args);

/* vsock.c: the virtio-vsock commands (echo service, one-line client) */
void vsock_command(char *args);
int vsock_up(void);
void vsock_step(void); /* serve the queues (the BSP calls it from its main loop once set up) */

#endif
