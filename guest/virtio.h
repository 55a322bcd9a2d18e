/* virtio.h - the test guest's virtio-pci modern transport and split virtqueue (virtio.c). */
#ifndef VMMPY_GUEST_VIRTIO_H
#define VMMPY_GUEST_VIRTIO_H

#include "guest.h"

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_F_VERSION_1 (1ul << 32)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct vring_used_elem {
    uint32_t id, len;
};

/* One split virtqueue: its three parts each on a page of their own (4 KiB aligned, spec 2.7). */
struct virtq {
    uint16_t size;
    uint16_t avail_idx; /* next free avail slot (free running) */
    uint16_t used_seen; /* used entries consumed (free running) */
    volatile struct vring_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[size] */
    volatile uint16_t *used;  /* flags, idx, then vring_used_elem[size] */
    uint64_t notify;          /* address the driver writes the queue index to */
    uint64_t kicks, kick_cycles;
};

struct virtio_dev {
    uint32_t pci;
    uint64_t common, notify_base, device;
    uint32_t notify_mult;
    uint64_t msix_table;
    uint16_t msix_vector; /* the queue's vector, 0 when MSI-X is not in use */
    uint64_t features;    /* negotiated */
    struct virtq q;
};

/* Finds the capabilities, resets, negotiates `wanted` (plus VERSION_1), sets up queue 0 on the
 * three pages at `rings` (at most 256 entries) with MSI-X `vector` (0: none) and sets DRIVER_OK.
 * Returns 0 or a static message. */
const char *virtio_init(struct virtio_dev *d, uint32_t pci, uint64_t wanted, uint64_t rings, uint8_t vector);
/* The same for `nq` queues: queue i on the three pages at rings[i], its size at most qs[i]->size
 * as the caller preset it (0: 256); MSI-X `vector` on queue 0 only. */
const char *virtio_init_queues(struct virtio_dev *d, uint32_t pci, uint64_t wanted, struct virtq *const *qs,
                               const uint64_t *rings, uint32_t nq, uint8_t vector);
/* Device config space: one access of the field's width (the caller checks config_generation). */
uint32_t virtio_cfg32(struct virtio_dev *d, uint32_t off);
uint64_t virtio_cfg64(struct virtio_dev *d, uint32_t off);

/* Publishes the chain starting at descriptor `head` (no kick). */
void virtq_add(struct virtq *q, uint16_t head);
/* Tells the device about new chains, unless it said it is looking anyway (VRING_USED_F_NO_NOTIFY). */
void virtq_kick(struct virtq *q);
/* Asks the device for interrupts on completions, or (off) not to bother: a driver that polls. */
void virtq_interrupts(struct virtq *q, int on);
/* The next completion: returns 1 and its head descriptor in *id, or 0 when none is there. */
int virtq_poll(struct virtq *q, uint32_t *id);

#endif
