/*
 * blk.c - the virtio-blk commands of the test guest: a polling driver at CPL3 (no interrupts),
 * set up on the first `blk` command of a boot. Every disk is initialised; disk 0 does the I/O.
 *
 * A sector the guest writes is a pattern.c block of 64 words: {lba, generation, checksum, fill},
 * so a sector read back (or found in the image file by the host) proves where it belongs, which
 * write it came from, and that it is whole.
 *
 * Fixed RAM, below the `dirty` area at 64 MiB (the VMM's disk reads land here; it must mark them
 * dirty for migration):
 *
 *     8 MiB + 64 KiB * d   disk d: descriptor, avail and used pages, then request headers/status
 *     16 MiB               the expected generation of each of disk 0's first 2^21 sectors (u32)
 *     24 MiB               write buffers (`blk load`: 8 KiB per slot; `blk write`: 1 MiB)
 *     32 MiB               read buffers (`blk load`: 8 KiB per slot; verify and bench: 1 MiB each)
 *
 * Requests in flight each own a slot: DESC_PER_SLOT descriptors (header, at most two data
 * segments, status), a header and a status byte. `blk load` splits its area among its slots so two
 * requests in flight never touch the same sector, and it reads into buffers only the device
 * writes: after a read it checks the data and keeps a record of what the buffer holds, which
 * `blk verify` and `blk stop` check again. On a migration destination a device write the VMM
 * failed to mark dirty shows there as a stale buffer.
 */
#include "virtio.h"

#define MIB (1ul << 20)
#define BLK_BASE (8ul << 20)
#define GEN_TABLE ((volatile uint32_t *)(16ul << 20))
#define GEN_SECTORS (2ul << 20)
#define WBUF_BASE (24ul << 20)
#define RBUF_BASE (32ul << 20)
#define BLK_END (64ul << 20)

#define MAX_DISKS 4
#define DESC_PER_SLOT 4
#define MAX_SLOTS 64
#define LOAD_SLOT_BYTES 8192u
#define LOAD_MAX_SECTORS (LOAD_SLOT_BYTES / 512)
#define BIG_BYTES MIB
#define BIG_SLOTS 32

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_PENDING 0xff

#define F_SIZE_MAX (1ul << 1)
#define F_SEG_MAX (1ul << 2)
#define F_RO (1ul << 5)
#define F_BLK_SIZE (1ul << 6)
#define F_FLUSH (1ul << 9)
/* How long a request may stay unanswered before the device counts as hung: generous, because the
 * TSC runs on while the VMM pauses the guest (a migration, a snapshot) and the host may be busy. */
#define HUNG_MS 60000

struct req {
    uint32_t type, reserved;
    uint64_t sector;
    uint8_t status;
    uint8_t pad[15];
};

struct disk {
    struct virtio_dev v;
    const char *error; /* set up failed: why */
    uint64_t capacity;
    uint32_t max_bytes; /* per request: two segments of size_max, at most 1 MiB */
    uint32_t seg_bytes;
    uint32_t slots;     /* requests that fit in the queue */
    char id[21];
};

/* What `blk load` has in flight, and what each read buffer holds once checked. */
struct slot {
    uint8_t busy, op;
    uint16_t count;
    uint64_t lba, gen; /* gen: a write's generation */
    uint32_t want[LOAD_MAX_SECTORS]; /* a read: the generations expected (0 = unknown) */
    uint16_t kept;                   /* sectors the read buffer holds, checked */
    uint64_t kept_lba;
    uint32_t kept_gen[LOAD_MAX_SECTORS]; /* 0 = an all-zero sector */
};

static int probed;
static uint32_t ndisks;
static struct disk disks[MAX_DISKS];

static struct {
    int on, stopping;
    uint64_t first, sectors; /* the area */
    uint32_t depth, inflight;
    uint64_t reads, writes, rng;
    int bad; /* the first failure, kept until the next `blk load` */
    uint64_t bad_lba, bad_want, bad_got;
    const char *bad_why;
} load;
static struct slot slots[MAX_SLOTS];
static uint64_t next_gen;

static uint64_t ring_area(uint32_t d) { return BLK_BASE + d * 0x10000ul; }
static volatile struct req *req_of(uint32_t d, uint32_t slot) { return (volatile struct req *)(ring_area(d) + 0x3000 + slot * 32ul); }
static uint64_t rbuf(uint32_t slot, uint32_t bytes) { return RBUF_BASE + (uint64_t)slot * bytes; }
static uint64_t wbuf(uint32_t slot, uint32_t bytes) { return WBUF_BASE + (uint64_t)slot * bytes; }

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* ------------------------------------------------------------------ requests */
static void submit(struct disk *k, uint32_t d, uint32_t slot, uint32_t type, uint64_t sector, uint64_t buf, uint32_t bytes)
{
    volatile struct req *r = req_of(d, slot);
    r->type = type;
    r->reserved = 0;
    r->sector = sector;
    r->status = S_PENDING;
    volatile struct vring_desc *desc = k->v.q.desc;
    uint16_t h = (uint16_t)(slot * DESC_PER_SLOT), n = h;
    desc[n].addr = (uint64_t)r;
    desc[n].len = 16;
    desc[n].flags = VRING_DESC_F_NEXT;
    desc[n].next = (uint16_t)(n + 1);
    n++;
    while (bytes) {
        uint32_t seg = bytes < k->seg_bytes ? bytes : k->seg_bytes;
        desc[n].addr = buf;
        desc[n].len = seg;
        desc[n].flags = VRING_DESC_F_NEXT | (type == T_IN || type == T_GET_ID ? VRING_DESC_F_WRITE : 0);
        desc[n].next = (uint16_t)(n + 1);
        buf += seg;
        bytes -= seg;
        n++;
    }
    desc[n].addr = (uint64_t)&r->status;
    desc[n].len = 1;
    desc[n].flags = VRING_DESC_F_WRITE;
    desc[n].next = 0;
    virtq_add(&k->v.q, h);
}

/* Waits for one completion (HUNG_MS at most); returns its slot or -1. */
static int wait_one(struct disk *k)
{
    uint32_t id;
    uint64_t t0 = rdtsc();
    while (!virtq_poll(&k->v.q, &id)) {
        if (rdtsc() - t0 > tsc_khz * HUNG_MS)
            return -1;
        cpu_relax();
    }
    return (int)(id / DESC_PER_SLOT);
}

/* One request on slot 0, waited for: the status byte, or -1 when the device never answered. */
static int sync_request(uint32_t d, uint32_t type, uint64_t sector, uint64_t buf, uint32_t bytes)
{
    struct disk *k = &disks[d];
    submit(k, d, 0, type, sector, buf, bytes);
    virtq_kick(&k->v.q);
    if (wait_one(k) < 0)
        return -1;
    return req_of(d, 0)->status;
}

static void put_status(int st)
{
    if (st == 1)
        put_s("IOERR");
    else if (st == 2)
        put_s("UNSUPP");
    else if (st < 0)
        put_s("TIMEOUT");
    else {
        put_s("ERR status=");
        put_u((uint64_t)st);
    }
}

/* ------------------------------------------------------------------ set up */
static void probe_disk(uint32_t d, uint32_t pci)
{
    struct disk *k = &disks[d];
    k->error = virtio_init(&k->v, pci, F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH, ring_area(d), (uint8_t)(0x40 + d));
    if (k->error)
        return;
    k->capacity = virtio_cfg64(&k->v, 0);
    k->seg_bytes = BIG_BYTES;
    if (k->v.features & F_SIZE_MAX) {
        uint32_t size_max = virtio_cfg32(&k->v, 8);
        if (size_max >= 4096 && size_max < k->seg_bytes)
            k->seg_bytes = size_max & ~511u;
    }
    uint32_t segs = 2;
    if ((k->v.features & F_SEG_MAX) && virtio_cfg32(&k->v, 12) == 1)
        segs = 1;
    k->max_bytes = k->seg_bytes * segs < BIG_BYTES ? k->seg_bytes * segs : BIG_BYTES;
    k->slots = k->v.q.size / DESC_PER_SLOT;
    if (k->slots > MAX_SLOTS)
        k->slots = MAX_SLOTS;
    /* GET_ID: the serial, up to 20 bytes, NUL-padded when shorter */
    volatile char *idbuf = (volatile char *)(ring_area(d) + 0x3800);
    for (int i = 0; i < 20; i++)
        idbuf[i] = 0;
    if (sync_request(d, T_GET_ID, 0, (uint64_t)idbuf, 20) == S_OK) {
        int n = 0;
        for (int i = 0; i < 20 && idbuf[i]; i++)
            if (idbuf[i] > ' ' && idbuf[i] < 127)
                k->id[n++] = idbuf[i];
        k->id[n] = 0;
    }
}

static int probe(void)
{
    if (probed)
        return (int)ndisks;
    probed = 1;
    if (!is_ram(BLK_BASE, BLK_END)) {
        say("ERR blk: needs RAM from 8 MiB to 64 MiB");
        return -1;
    }
    memset((void *)GEN_TABLE, 0, GEN_SECTORS * 4); /* what RAM held before a reboot means nothing */
    /* A software-disabled LAPIC drops fixed interrupts: enable it (spurious vector 0xff) so an MSI-X
     * message is left pending in the IRR, never taken (IF=0), where the host test looks. */
    mmio_write32(LAPIC_SVR, LAPIC_SW_ENABLE | 0xff);
    next_gen = 1;
    load.rng = rdtsc() | 1;
    for (int pci; ndisks < MAX_DISKS && (pci = pci_find(VIRTIO_VENDOR, 0x1042, ndisks)) >= 0;)
        probe_disk(ndisks++, (uint32_t)pci);
    return (int)ndisks;
}

/* Disk 0, ready for I/O; or an answer saying why not (returns 0). */
static struct disk *disk0(void)
{
    if (probe() <= 0) {
        if (probed && ndisks == 0)
            say("ERR blk: no disk");
        return 0;
    }
    if (disks[0].error) {
        put_s("ERR blk: ");
        put_s(disks[0].error);
        put_line();
        return 0;
    }
    return &disks[0];
}

/* ------------------------------------------------------------------ sector checks */
/* 0 when the sector at `p` is what `want` says (0: any whole sector of this lba, or zeros) */
static const char *check_sector(const uint64_t *p, uint64_t lba, uint64_t want, uint64_t *got)
{
    *got = p[1];
    if (want == 0 && p[0] == 0 && p[1] == 0 && p[2] == 0) {
        for (int j = 3; j < 64; j++)
            if (p[j])
                return "checksum";
        return 0;
    }
    if (want && p[1] != want)
        return "gen";
    if (p[0] != lba)
        return "lba";
    if (pattern_checksum(p, 64) != p[2])
        return "checksum";
    return 0;
}

static void record_bad(uint64_t lba, uint64_t want, uint64_t got, const char *why)
{
    if (load.bad)
        return;
    load.bad = 1;
    load.bad_lba = lba;
    load.bad_want = want;
    load.bad_got = got;
    load.bad_why = why;
}

static void put_bad(const char *prefix)
{
    put_s(prefix);
    put_s(" lba=");
    put_u(load.bad_lba);
    put_s(" want_gen=");
    put_u(load.bad_want);
    put_s(" got_gen=");
    put_u(load.bad_got);
    put_s(" reason=");
    put_s(load.bad_why);
}

/* Every read buffer still holds what was checked in it (a stale one: a lost dirty bit). */
static void check_kept(void)
{
    for (uint32_t s = 0; s < MAX_SLOTS; s++) {
        struct slot *sl = &slots[s];
        for (uint32_t i = 0; i < sl->kept; i++) {
            uint64_t got, want = sl->kept_gen[i];
            const uint64_t *p = (const uint64_t *)(rbuf(s, LOAD_SLOT_BYTES) + i * 512ul);
            const char *why = check_sector(p, sl->kept_lba + i, want, &got);
            if (!why && want == 0 && p[1] != 0)
                why = "gen";
            if (why) {
                record_bad(sl->kept_lba + i, want, got, why[0] == 'c' ? "buffer-checksum" : "buffer");
                break;
            }
        }
        sl->kept = 0;
    }
}

/* ------------------------------------------------------------------ blk load */
static uint32_t table_gen(uint64_t lba) { return lba < GEN_SECTORS ? GEN_TABLE[lba] : 0; }

static void load_issue(struct disk *k, uint32_t s)
{
    struct slot *sl = &slots[s];
    uint64_t lo = load.first + load.sectors * s / load.depth, hi = load.first + load.sectors * (s + 1) / load.depth;
    uint64_t r = xorshift(&load.rng);
    uint64_t lba = lo + (r >> 8) % (hi - lo);
    uint32_t count = 1 + (uint32_t)((r >> 4) % LOAD_MAX_SECTORS);
    if (count > hi - lba)
        count = (uint32_t)(hi - lba);
    sl->busy = 1;
    sl->lba = lba;
    sl->count = (uint16_t)count;
    if (r & 1) {
        sl->op = T_OUT;
        sl->gen = next_gen++;
        for (uint32_t i = 0; i < count; i++)
            pattern_fill((uint64_t *)(wbuf(s, LOAD_SLOT_BYTES) + i * 512ul), 64, lba + i, sl->gen);
        submit(k, 0, s, T_OUT, lba, wbuf(s, LOAD_SLOT_BYTES), count * 512);
    } else {
        sl->op = T_IN;
        sl->kept = 0; /* the device is about to overwrite the buffer */
        for (uint32_t i = 0; i < count; i++)
            sl->want[i] = table_gen(lba + i);
        submit(k, 0, s, T_IN, lba, rbuf(s, LOAD_SLOT_BYTES), count * 512);
    }
    load.inflight++;
}

static void load_complete(uint32_t s)
{
    struct slot *sl = &slots[s];
    int st = req_of(0, s)->status;
    sl->busy = 0;
    load.inflight--;
    if (st != S_OK) {
        record_bad(sl->lba, 0, (uint64_t)st, st == 1 ? "ioerr" : "status");
        return;
    }
    if (sl->op == T_OUT) {
        for (uint32_t i = 0; i < sl->count; i++)
            if (sl->lba + i < GEN_SECTORS)
                GEN_TABLE[sl->lba + i] = (uint32_t)sl->gen;
        load.writes++;
        return;
    }
    for (uint32_t i = 0; i < sl->count; i++) {
        uint64_t got;
        const uint64_t *p = (const uint64_t *)(rbuf(s, LOAD_SLOT_BYTES) + i * 512ul);
        const char *why = check_sector(p, sl->lba + i, sl->want[i], &got);
        if (why) {
            record_bad(sl->lba + i, sl->want[i], got, why);
            return;
        }
        sl->kept_gen[i] = (uint32_t)p[1];
    }
    sl->kept_lba = sl->lba;
    sl->kept = sl->count;
    load.reads++;
}

int blk_running(void) { return load.on; }

void blk_step(void)
{
    struct disk *k = &disks[0];
    uint32_t id;
    int issued = 0;
    while (virtq_poll(&k->v.q, &id)) {
        uint32_t s = id / DESC_PER_SLOT;
        if (s >= load.depth || !slots[s].busy)
            continue;
        load_complete(s);
        if (!load.stopping && !load.bad) {
            load_issue(k, s);
            issued = 1;
        }
    }
    if (issued)
        virtq_kick(&k->v.q);
    if ((load.stopping || load.bad) && load.inflight == 0)
        load.on = 0;
}

/* Lets what is in flight complete (bounded: HUNG_MS without a completion is a hung device). */
static int load_stop(void)
{
    if (!load.on)
        return 1;
    load.stopping = 1;
    uint64_t seen = load.inflight, t0 = rdtsc();
    while (load.on) {
        blk_step();
        if (load.inflight != seen) {
            seen = load.inflight;
            t0 = rdtsc();
        } else if (rdtsc() - t0 > tsc_khz * HUNG_MS) {
            return 0;
        }
    }
    return 1;
}

static void put_counts(void)
{
    put_s(" reads=");
    put_u(load.reads);
    put_s(" writes=");
    put_u(load.writes);
}

static void cmd_load(char *args)
{
    uint64_t mib, depth = 16;
    struct disk *k = disk0();
    if (!k)
        return;
    char *w = next_word(&args);
    char *dw = next_word(&args);
    if (!parse_u64(w, &mib) || mib == 0 || (*dw && !parse_u64(dw, &depth)) || depth == 0 || depth > k->slots) {
        say("ERR blk: usage: blk load <MiB> [depth up to the queue's slots]");
        return;
    }
    if (mib * 2048 > k->capacity || mib * 2048 > GEN_SECTORS || mib * 2048 < depth * LOAD_MAX_SECTORS) {
        say("ERR blk: load area larger than the disk (or than 1 GiB), or too small for its depth");
        return;
    }
    if (!load_stop()) {
        say("ERR blk: the device does not complete requests");
        return;
    }
    check_kept();
    uint64_t rng = load.rng;
    memset(&load, 0, sizeof(load));
    load.rng = rng;
    load.first = 0;
    load.sectors = mib * 2048;
    load.depth = (uint32_t)depth;
    load.on = 1;
    for (uint32_t s = 0; s < load.depth; s++)
        load_issue(k, s);
    virtq_kick(&k->v.q);
    put_s("BLK LOAD STARTED mib=");
    put_u(mib);
    put_s(" depth=");
    put_u(depth);
    put_line();
}

static void cmd_stop(void)
{
    if (!load_stop()) {
        put_s("BLK LOAD STUCK inflight=");
        put_u(load.inflight);
        put_line();
        return;
    }
    check_kept();
    if (load.bad)
        put_bad("BLK LOAD BAD");
    else
        put_s("BLK LOAD STOPPED");
    put_counts();
    put_line();
}

static void cmd_status(void)
{
    put_s(load.on ? "BLK STATUS load=on" : "BLK STATUS load=off");
    put_counts();
    put_s(" inflight=");
    put_u(load.inflight);
    if (load.bad)
        put_bad(" bad=1");
    else
        put_s(" bad=0");
    put_line();
}

/* ------------------------------------------------------------------ info, write, verify, flush */
static void cmd_info(void)
{
    if (probe() < 0)
        return;
    if (ndisks == 0) {
        say("BLK info disks=0");
        return;
    }
    for (uint32_t d = 0; d < ndisks; d++) {
        struct disk *k = &disks[d];
        put_s("BLK info disks=");
        put_u(ndisks);
        if (k->error) {
            put_s(" disk=");
            put_u(d);
            put_s(" error=");
            put_s(k->error);
            put_line();
            continue;
        }
        put_s(" capacity=");
        put_u(k->capacity);
        put_s(k->v.features & F_RO ? " ro=1 id=" : " ro=0 id=");
        put_s(k->id[0] ? k->id : "-");
        put_s(" disk=");
        put_u(d);
        put_s(" msix=");
        put_x(k->v.msix_vector);
        put_s(" queue=");
        put_u(k->v.q.size);
        put_s(" features=");
        put_x(k->v.features);
        put_line();
    }
}

/* START COUNT [GEN] within the disk; GEN 0 = not given */
static int parse_range(char *args, struct disk *k, uint64_t *start, uint64_t *count, uint64_t *gen, const char *usage)
{
    char *a = next_word(&args), *b = next_word(&args), *c = next_word(&args);
    *gen = 0;
    if (!parse_u64(a, start) || !parse_u64(b, count) || *count == 0 || (*c && (!parse_u64(c, gen) || *gen == 0))) {
        say(usage);
        return 0;
    }
    if (*start + *count > k->capacity) {
        say("ERR blk: beyond the end of the disk");
        return 0;
    }
    return 1;
}

static void cmd_write(char *args)
{
    uint64_t start, count, gen;
    struct disk *k = disk0();
    if (!k || !parse_range(args, k, &start, &count, &gen, "ERR blk: usage: blk write <start> <count> [gen]"))
        return;
    if (!load_stop()) {
        say("ERR blk: the device does not complete requests");
        return;
    }
    if (!gen)
        gen = next_gen++;
    uint32_t per = k->max_bytes / 512;
    for (uint64_t lba = start; lba < start + count;) {
        uint32_t n = start + count - lba < per ? (uint32_t)(start + count - lba) : per;
        for (uint32_t i = 0; i < n; i++)
            pattern_fill((uint64_t *)(wbuf(0, 0) + i * 512ul), 64, lba + i, gen);
        int st = sync_request(0, T_OUT, lba, wbuf(0, 0), n * 512);
        if (st != S_OK) {
            put_s("BLK WRITE ");
            put_status(st);
            put_s(" lba=");
            put_u(lba);
            put_line();
            return;
        }
        for (uint32_t i = 0; i < n; i++)
            if (lba + i < GEN_SECTORS)
                GEN_TABLE[lba + i] = (uint32_t)gen;
        lba += n;
    }
    put_s("BLK WRITE OK ");
    put_u(count);
    put_s(" gen=");
    put_u(gen);
    put_line();
}

/* Reads START COUNT back: each sector must hold GEN when given, else the generation this boot last
 * wrote there, else (never written in this boot) be whole or all zeros. Checks the read buffers
 * `blk load` kept first. */
static void cmd_verify(char *args)
{
    uint64_t start, count, gen, known = 0, unknown = 0, empty = 0;
    struct disk *k = disk0();
    if (!k || !parse_range(args, k, &start, &count, &gen, "ERR blk: usage: blk verify <start> <count> [gen]"))
        return;
    if (!load_stop()) {
        say("ERR blk: the device does not complete requests");
        return;
    }
    check_kept();
    if (load.bad) {
        put_bad("BLK VERIFY BAD");
        put_line();
        return;
    }
    uint32_t per = k->max_bytes / 512;
    for (uint64_t lba = start; lba < start + count;) {
        uint32_t n = start + count - lba < per ? (uint32_t)(start + count - lba) : per;
        memset((void *)rbuf(0, 0), 0xa5, n * 512ul); /* nothing left over passes for data */
        int st = sync_request(0, T_IN, lba, rbuf(0, 0), n * 512);
        if (st != S_OK) {
            put_s("BLK VERIFY ");
            put_status(st);
            put_s(" lba=");
            put_u(lba);
            put_line();
            return;
        }
        for (uint32_t i = 0; i < n; i++) {
            const uint64_t *p = (const uint64_t *)(rbuf(0, 0) + i * 512ul);
            uint64_t got, want = gen ? gen : table_gen(lba + i);
            const char *why = check_sector(p, lba + i, want, &got);
            if (why) {
                put_s("BLK VERIFY BAD lba=");
                put_u(lba + i);
                put_s(" want_gen=");
                put_u(want);
                put_s(" got_gen=");
                put_u(got);
                put_s(" reason=");
                put_s(why);
                put_line();
                return;
            }
            if (want)
                known++;
            else if (p[1])
                unknown++;
            else
                empty++;
        }
        lba += n;
    }
    put_s("BLK VERIFY OK ");
    put_u(known);
    put_s(" unknown=");
    put_u(unknown);
    put_s(" empty=");
    put_u(empty);
    put_line();
}

static void cmd_flush(void)
{
    struct disk *k = disk0();
    if (!k)
        return;
    if (!load_stop()) {
        say("ERR blk: the device does not complete requests");
        return;
    }
    int st = sync_request(0, T_FLUSH, 0, 0, 0);
    put_s("BLK FLUSH ");
    if (st == S_OK)
        put_s("OK");
    else
        put_status(st);
    put_line();
}

/* ------------------------------------------------------------------ blk bench */
/* `blk bench rand|seq <depth> <ms>`: 4 KiB random or 1 MiB sequential reads over the whole disk
 * for about ms milliseconds, `depth` requests in flight, timed with the TSC. No data checks. */
static void cmd_bench(char *args)
{
    uint64_t depth, ms;
    struct disk *k = disk0();
    if (!k)
        return;
    char *mode = next_word(&args), *a = next_word(&args), *b = next_word(&args);
    int seq = streq(mode, "seq");
    uint32_t bytes = seq ? k->max_bytes : 4096;
    uint32_t max_depth = k->slots < BIG_SLOTS ? k->slots : BIG_SLOTS;
    if ((!seq && !streq(mode, "rand")) || !parse_u64(a, &depth) || !parse_u64(b, &ms) || depth == 0 ||
        depth > max_depth || ms == 0) {
        say("ERR blk: usage: blk bench rand|seq <depth up to 32> <ms>");
        return;
    }
    uint64_t units = k->capacity / (bytes / 512);
    if (units < depth) {
        say("ERR blk: disk too small");
        return;
    }
    if (!load_stop()) {
        say("ERR blk: the device does not complete requests");
        return;
    }
    check_kept();
    struct virtq *q = &k->v.q;
    virtq_interrupts(q, 0); /* polled: an interrupt per completion would only cost the vCPU exits */
    uint64_t next = 0, done = 0, rng = rdtsc() | 1, kicks0 = q->kicks, kc0 = q->kick_cycles;
    uint64_t t0 = rdtsc(), end = t0 + ms * tsc_khz;
    uint32_t inflight = 0, id;
    for (uint32_t s = 0; s < depth; s++) {
        uint64_t unit = seq ? next++ % units : xorshift(&rng) % units;
        submit(k, 0, s, T_IN, unit * (bytes / 512), rbuf(s, BIG_BYTES), bytes);
        inflight++;
    }
    virtq_kick(q);
    int timing = 1, failed = 0;
    uint64_t last = t0;
    while (inflight) {
        int issued = 0;
        while (virtq_poll(q, &id)) {
            uint32_t s = id / DESC_PER_SLOT;
            inflight--;
            done++;
            if (req_of(0, s)->status != S_OK)
                failed = 1;
            if (timing && !failed) {
                uint64_t unit = seq ? next++ % units : xorshift(&rng) % units;
                submit(k, 0, s, T_IN, unit * (bytes / 512), rbuf(s, BIG_BYTES), bytes);
                inflight++;
                issued = 1;
            }
        }
        if (issued)
            virtq_kick(q);
        uint64_t now = rdtsc();
        if (timing && now >= end)
            timing = 0;
        if (now - last > tsc_khz * HUNG_MS) {
            virtq_interrupts(q, 1);
            say("ERR blk: the device does not complete requests");
            return;
        }
        if (issued || !inflight)
            last = now;
    }
    uint64_t cycles = rdtsc() - t0;
    virtq_interrupts(q, 1);
    uint64_t kicks = q->kicks - kicks0;
    put_s(failed ? "BLK BENCH FAILED mode=" : "BLK BENCH mode=");
    put_s(seq ? "seq" : "rand");
    put_s(" qd=");
    put_u(depth);
    put_s(" bs=");
    put_u(bytes);
    put_s(" ios=");
    put_u(done);
    put_s(" us=");
    put_u(cycles * 1000 / tsc_khz);
    put_s(" kicks=");
    put_u(kicks);
    put_s(" kick_ns=");
    put_u(kicks ? (q->kick_cycles - kc0) * 1000000 / tsc_khz / kicks : 0);
    put_line();
}

/* ------------------------------------------------------------------ dispatch */
void blk_command(char *args)
{
    char *sub = next_word(&args);
    if (streq(sub, "info"))
        cmd_info();
    else if (streq(sub, "write"))
        cmd_write(args);
    else if (streq(sub, "verify"))
        cmd_verify(args);
    else if (streq(sub, "flush"))
        cmd_flush();
    else if (streq(sub, "load"))
        cmd_load(args);
    else if (streq(sub, "stop"))
        cmd_stop();
    else if (streq(sub, "status"))
        cmd_status();
    else if (streq(sub, "bench"))
        cmd_bench(args);
    else
        say("ERR blk: usage: blk info|write|verify|flush|load|stop|status|bench");
}
