/*
 * virtio.c - virtio 1.x over PCI (modern transport, spec 4.1) and the split virtqueue (2.7), for a
 * driver at CPL3 that polls: no interrupts are ever taken (MSI-X is programmed so the VMM's delivery
 * can be checked in the LAPIC's IRR, nothing more).
 *
 * Common config fields are accessed with their own width (4.1.4.3); the 64-bit queue addresses as
 * two 32-bit halves, which the spec allows.
 */
#include "virtio.h"

/* virtio_pci_cap.cfg_type */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_DEVICE 4

/* struct virtio_pci_common_cfg */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX_CONFIG 0x10
#define CC_NUM_QUEUES 0x12
#define CC_STATUS 0x14
#define CC_CFG_GEN 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_AVAIL 0x28
#define CC_Q_USED 0x30

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_FAILED 0x80

#define NO_VECTOR 0xffff
#define MSIX_ENABLE 0x8000
#define MSIX_FUNCTION_MASK 0x4000
#define MSI_ADDRESS 0xfee00000u /* destination APIC id 0, physical mode */
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_OFF 0x400

static void common_w64(struct virtio_dev *d, uint32_t off, uint64_t v)
{
    mmio_write32(d->common + off, (uint32_t)v);
    mmio_write32(d->common + off + 4, (uint32_t)(v >> 32));
}

/* Waits (bounded: the device is a host thread) until device_status reads 0 after a reset. */
static int reset_done(struct virtio_dev *d)
{
    uint64_t t0 = rdtsc();
    while (mmio_read8(d->common + CC_STATUS) != 0) {
        if (rdtsc() - t0 > tsc_khz * 5000)
            return 0;
        idle_ms(1);
    }
    return 1;
}

static void find_caps(struct virtio_dev *d, uint8_t *msix_cap)
{
    *msix_cap = 0;
    for (uint8_t p = pci_cap_next(d->pci, 0), n = 0; p && n < 48; p = pci_cap_next(d->pci, p), n++) {
        uint8_t id = pci_read8(d->pci, p);
        if (id == PCI_CAP_MSIX) {
            *msix_cap = p;
            continue;
        }
        if (id != PCI_CAP_VENDOR)
            continue;
        uint32_t w0 = pci_read32(d->pci, p); /* vndr, next, len, cfg_type */
        uint8_t type = (uint8_t)(w0 >> 24);
        uint8_t bar = pci_read8(d->pci, p + 4u);
        uint32_t off = pci_read32(d->pci, p + 8u);
        if (bar > 5)
            continue;
        uint64_t base = pci_bar(d->pci, bar);
        if (!base)
            continue;
        uint64_t addr = base + off;
        if (type == CAP_COMMON && !d->common)
            d->common = addr;
        else if (type == CAP_NOTIFY && !d->notify_base) {
            d->notify_base = addr;
            d->notify_mult = pci_read32(d->pci, p + 16u);
        } else if (type == CAP_DEVICE && !d->device) /* ISR (3): not read, the driver polls */
            d->device = addr;
    }
}

/* MSI-X table entry 0 → `vector` on APIC 0, unmasked; the function enabled and unmasked. */
static void setup_msix(struct virtio_dev *d, uint8_t cap, uint8_t vector)
{
    uint32_t table = pci_read32(d->pci, cap + 4u);
    uint64_t bar = pci_bar(d->pci, table & 7);
    if (!bar)
        return;
    uint16_t ctl = pci_read16(d->pci, cap + 2u);
    pci_write16(d->pci, cap + 2u, (uint16_t)(ctl | MSIX_ENABLE | MSIX_FUNCTION_MASK));
    d->msix_table = bar + (table & ~7u);
    mmio_write32(d->msix_table + 0, MSI_ADDRESS);
    mmio_write32(d->msix_table + 4, 0);
    mmio_write32(d->msix_table + 8, vector);
    mmio_write32(d->msix_table + 12, 0); /* vector control: unmasked */
    pci_write16(d->pci, cap + 2u, (uint16_t)((ctl | MSIX_ENABLE) & ~MSIX_FUNCTION_MASK));
    d->msix_vector = vector;
}

static const char *fail(struct virtio_dev *d, const char *why)
{
    mmio_write8(d->common + CC_STATUS, S_FAILED);
    return why;
}

const char *virtio_init(struct virtio_dev *d, uint32_t pci, uint64_t wanted, uint64_t rings, uint8_t vector)
{
    struct virtq *q = &d->q;
    return virtio_init_queues(d, pci, wanted, &q, &rings, 1, vector);
}

const char *virtio_init_queues(struct virtio_dev *d, uint32_t pci, uint64_t wanted, struct virtq *const *qs,
                               const uint64_t *rings, uint32_t nq, uint8_t vector)
{
    uint8_t msix_cap;
    memset(d, 0, sizeof(*d));
    d->pci = pci;
    find_caps(d, &msix_cap);
    if (!d->common || !d->notify_base || !d->device)
        return "missing virtio capability";
    if (d->common >= (1ul << 32) || d->notify_base >= (1ul << 32) || d->device >= (1ul << 32))
        return "BAR above 4 GiB (not mapped)";
    uint16_t cmd = pci_read16(pci, PCI_COMMAND);
    pci_write16(pci, PCI_COMMAND, (uint16_t)(cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_OFF));

    mmio_write8(d->common + CC_STATUS, 0);
    if (!reset_done(d))
        return "reset did not complete";
    mmio_write8(d->common + CC_STATUS, S_ACKNOWLEDGE);
    mmio_write8(d->common + CC_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write32(d->common + CC_DFSELECT, 0);
    uint64_t offered = mmio_read32(d->common + CC_DF);
    mmio_write32(d->common + CC_DFSELECT, 1);
    offered |= (uint64_t)mmio_read32(d->common + CC_DF) << 32;
    if (!(offered & VIRTIO_F_VERSION_1))
        return fail(d, "device lacks VIRTIO_F_VERSION_1");
    d->features = offered & (wanted | VIRTIO_F_VERSION_1);
    mmio_write32(d->common + CC_GFSELECT, 0);
    mmio_write32(d->common + CC_GF, (uint32_t)d->features);
    mmio_write32(d->common + CC_GFSELECT, 1);
    mmio_write32(d->common + CC_GF, (uint32_t)(d->features >> 32));
    mmio_write8(d->common + CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read8(d->common + CC_STATUS) & S_FEATURES_OK))
        return fail(d, "FEATURES_OK not accepted");

    if (vector && msix_cap)
        setup_msix(d, msix_cap, vector);
    mmio_write16(d->common + CC_MSIX_CONFIG, NO_VECTOR);
    if (mmio_read16(d->common + CC_NUM_QUEUES) < nq)
        return fail(d, "too few queues");
    for (uint32_t i = 0; i < nq; i++) {
        mmio_write16(d->common + CC_Q_SELECT, (uint16_t)i);
        uint16_t size = mmio_read16(d->common + CC_Q_SIZE);
        if (size == 0)
            return fail(d, "queue not available");
        uint16_t cap = qs[i]->size && qs[i]->size < 256 ? qs[i]->size : 256; /* 256: one page of descriptors */
        if (size > cap)
            size = cap;
        if (size & (size - 1)) /* split rings need a power of two */
            return fail(d, "queue size not a power of two");
        struct virtq *q = qs[i];
        uint64_t r = rings[i];
        memset(q, 0, sizeof(*q));
        q->size = size;
        q->desc = (volatile struct vring_desc *)r;
        q->avail = (volatile uint16_t *)(r + 0x1000);
        q->used = (volatile uint16_t *)(r + 0x2000);
        memset((void *)r, 0, 0x3000);
        mmio_write16(d->common + CC_Q_SIZE, size);
        common_w64(d, CC_Q_DESC, r);
        common_w64(d, CC_Q_AVAIL, r + 0x1000);
        common_w64(d, CC_Q_USED, r + 0x2000);
        if (i == 0 && d->msix_vector) {
            mmio_write16(d->common + CC_Q_MSIX, 0);
            if (mmio_read16(d->common + CC_Q_MSIX) != 0)
                d->msix_vector = 0; /* the device could not map it: poll only, as always */
        }
        q->notify = d->notify_base + (uint64_t)mmio_read16(d->common + CC_Q_NOFF) * d->notify_mult;
        mmio_write16(d->common + CC_Q_ENABLE, 1);
    }
    mmio_write8(d->common + CC_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 0;
}

uint32_t virtio_cfg32(struct virtio_dev *d, uint32_t off) { return mmio_read32(d->device + off); }

uint64_t virtio_cfg64(struct virtio_dev *d, uint32_t off)
{
    for (;;) { /* a config change between the halves shows as a new config_generation */
        uint8_t g = mmio_read8(d->common + CC_CFG_GEN);
        uint64_t v = mmio_read32(d->device + off) | (uint64_t)mmio_read32(d->device + off + 4) << 32;
        if (mmio_read8(d->common + CC_CFG_GEN) == g)
            return v;
    }
}

void virtq_add(struct virtq *q, uint16_t head)
{
    q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
    q->avail_idx++;
    STORE_REL(&q->avail[1], q->avail_idx); /* after the descriptors and the ring entry (TSO) */
}

void virtq_kick(struct virtq *q)
{
    mfence(); /* avail->idx visible before the device looks, and before its flags are read (2.7.13.4) */
    if (LOAD_ACQ(&q->used[0]) & VRING_USED_F_NO_NOTIFY)
        return;
    uint64_t t0 = rdtsc();
    mmio_write16(q->notify, 0);
    q->kick_cycles += rdtsc() - t0;
    q->kicks++;
}

void virtq_interrupts(struct virtq *q, int on)
{
    STORE_REL(&q->avail[0], on ? 0 : VRING_AVAIL_F_NO_INTERRUPT);
}

int virtq_poll(struct virtq *q, uint32_t *id)
{
    if (LOAD_ACQ(&q->used[1]) == q->used_seen)
        return 0;
    const volatile struct vring_used_elem *ring = (const volatile struct vring_used_elem *)(q->used + 2);
    *id = ring[q->used_seen & (q->size - 1)].id;
    q->used_seen++;
    return 1;
}
