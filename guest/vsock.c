/*
 * vsock.c - the vsock commands of the test guest: a polling virtio-vsock driver at CPL3 (no
 * interrupts), set up by the first `vsock` command of a boot, with an echo service on one port and
 * a one-line client. The BSP's main loop calls vsock_step() on every pass, as it calls net_poll():
 * vmmpy wakes the idle vCPU when the device adds used buffers, as an interrupt would end HLT.
 *
 * Fixed RAM (below blk.c's generation table at 16 MiB):
 *
 *     14 MiB              queues rx, tx, event: descriptor, avail and used pages each
 *     14 MiB + 64 KiB     rx buffers: NBUF x 4 KiB, header and data in one descriptor
 *     14 MiB + 192 KiB    tx slots: NBUF x 4 KiB, likewise
 *     14 MiB + 320 KiB    event buffers: NEV x 8 bytes
 *
 * Credit (virtio 1.2 5.10.6.3): the guest advertises GUEST_BUF_ALLOC and consumes what it receives
 * at once; it sends only within the host's credit (an echo that does not fit resets the connection).
 * A transport reset event drops every connection, as the spec asks, and is announced on the UART.
 */
#include "virtio.h"

#define VSOCK_BASE (14ul << 20)
#define RXBUF(i) (VSOCK_BASE + 0x10000ul + (uint64_t)(i) * BUF_BYTES)
#define TXBUF(i) (VSOCK_BASE + 0x30000ul + (uint64_t)(i) * BUF_BYTES)
#define EVBUF(i) (VSOCK_BASE + 0x50000ul + (uint64_t)(i) * 8ul)
#define NBUF 32
#define NEV 4
#define BUF_BYTES 4096u
#define DATA_MAX (BUF_BYTES - sizeof(struct hdr))
#define GUEST_BUF_ALLOC 65536u
#define MAX_CONNS 8
#define HOST_CID 2
#define CLIENT_PORT_BASE 0x8000u
#define REPLY_MAX 100
#define WAIT_MS 20000

#define VIRTIO_VSOCK_DEVICE 0x1053
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3
#define EVENT_TRANSPORT_RESET 0

struct hdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct conn {
    int used, client;
    int established, finished, failed; /* client: reply complete / connection reset */
    uint32_t lport, pport;
    uint32_t peer_alloc, peer_fwd, tx_cnt, fwd_cnt;
    char reply[REPLY_MAX + 1];
    uint32_t rlen;
};

static struct virtio_dev dev;
static struct virtq rxq, txq, evq;
static int up;
static const char *error;
static uint64_t cid;
static uint32_t listen_port;
static uint32_t tx_busy; /* a bit per tx slot in flight */
static uint64_t resets, echoed, next_client;
static struct conn conns[MAX_CONNS];

int vsock_up(void) { return up; }

static void post(struct virtq *q, uint16_t i, uint64_t addr, uint32_t len)
{
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = VRING_DESC_F_WRITE;
    q->desc[i].next = 0;
    virtq_add(q, i);
}

static void probe(void)
{
    int pci = pci_find(VIRTIO_VENDOR, VIRTIO_VSOCK_DEVICE, 0);
    if (pci < 0) {
        error = "no virtio-vsock device";
        return;
    }
    struct virtq *const qs[3] = {&rxq, &txq, &evq};
    const uint64_t rings[3] = {VSOCK_BASE, VSOCK_BASE + 0x3000, VSOCK_BASE + 0x6000};
    error = virtio_init_queues(&dev, (uint32_t)pci, 0, qs, rings, 3, 0);
    if (error)
        return;
    if (rxq.size < NBUF || txq.size < NBUF || evq.size < NEV) {
        error = "queues too small";
        return;
    }
    cid = virtio_cfg64(&dev, 0);
    for (uint16_t i = 0; i < NBUF; i++)
        post(&rxq, i, RXBUF(i), BUF_BYTES);
    for (uint16_t i = 0; i < NEV; i++)
        post(&evq, i, EVBUF(i), 8);
    virtq_kick(&rxq);
    virtq_kick(&evq);
    up = 1;
}

static void reclaim_tx(void)
{
    uint32_t id;
    while (virtq_poll(&txq, &id))
        tx_busy &= ~(1u << (id % NBUF));
}

/* One packet from local port `lport` to host port `pport`; returns 0 if no tx slot came free. */
static int send_raw(uint32_t lport, uint32_t pport, uint16_t op, uint32_t flags, uint32_t fwd_cnt, const void *data,
                    uint32_t len)
{
    uint64_t t0 = rdtsc();
    while (tx_busy == ~0u) {
        reclaim_tx();
        if (rdtsc() - t0 > tsc_khz * WAIT_MS)
            return 0;
    }
    uint16_t slot = 0;
    while (tx_busy & (1u << slot))
        slot++;
    volatile struct hdr *h = (volatile struct hdr *)TXBUF(slot);
    h->src_cid = cid;
    h->dst_cid = HOST_CID;
    h->src_port = lport;
    h->dst_port = pport;
    h->len = len;
    h->type = TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = GUEST_BUF_ALLOC;
    h->fwd_cnt = fwd_cnt;
    if (len)
        memcpy((void *)(TXBUF(slot) + sizeof(struct hdr)), data, len);
    txq.desc[slot].addr = TXBUF(slot);
    txq.desc[slot].len = (uint32_t)sizeof(struct hdr) + len;
    txq.desc[slot].flags = 0;
    txq.desc[slot].next = 0;
    tx_busy |= 1u << slot;
    virtq_add(&txq, slot);
    virtq_kick(&txq);
    return 1;
}

static int send_pkt(struct conn *c, uint16_t op, uint32_t flags, const void *data, uint32_t len)
{
    if (!send_raw(c->lport, c->pport, op, flags, c->fwd_cnt, data, len))
        return 0;
    c->tx_cnt += len;
    return 1;
}

static struct conn *find(uint32_t lport, uint32_t pport)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].used && conns[i].lport == lport && conns[i].pport == pport)
            return &conns[i];
    return 0;
}

static struct conn *alloc(uint32_t lport, uint32_t pport, int client)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (!conns[i].used) {
            struct conn *c = &conns[i];
            memset(c, 0, sizeof(*c));
            c->used = 1;
            c->client = client;
            c->lport = lport;
            c->pport = pport;
            return c;
        }
    return 0;
}

/* The connection is over on our side: the host is told (RST) and the slot freed. */
static void reset_conn(struct conn *c)
{
    send_pkt(c, OP_RST, 0, 0, 0);
    c->failed = !c->finished;
    c->used = 0;
}

static uint32_t peer_credit(struct conn *c) { return c->peer_alloc - (c->tx_cnt - c->peer_fwd); }

static void on_data(struct conn *c, const char *data, uint32_t len)
{
    c->fwd_cnt += len; /* consumed at once */
    if (!c->client) {
        if (peer_credit(c) < len || !send_pkt(c, OP_RW, 0, data, len)) {
            reset_conn(c);
            return;
        }
        echoed += len;
        return;
    }
    for (uint32_t i = 0; i < len && !c->finished; i++) {
        if (data[i] == '\n')
            c->finished = 1;
        else if (c->rlen < REPLY_MAX)
            c->reply[c->rlen++] = data[i];
    }
}

static void on_packet(volatile struct hdr *h)
{
    if (h->dst_cid != cid || h->src_cid != HOST_CID || h->type != TYPE_STREAM)
        return;
    uint32_t lport = h->dst_port, pport = h->src_port, len = h->len;
    uint16_t op = h->op;
    struct conn *c = find(lport, pport);
    if (c) {
        c->peer_alloc = h->buf_alloc;
        c->peer_fwd = h->fwd_cnt;
    }
    if (op == OP_REQUEST) {
        struct conn *n = !c && listen_port && lport == listen_port ? alloc(lport, pport, 0) : 0;
        if (!n) {
            send_raw(lport, pport, OP_RST, 0, 0, 0, 0);
            return;
        }
        n->peer_alloc = h->buf_alloc;
        n->peer_fwd = h->fwd_cnt;
        n->established = 1;
        send_pkt(n, OP_RESPONSE, 0, 0, 0);
        return;
    }
    if (!c) {
        if (op != OP_RST)
            send_raw(lport, pport, OP_RST, 0, 0, 0, 0);
        return;
    }
    if (op == OP_RST) {
        c->failed = !c->finished;
        c->established = 0;
        if (!c->client) /* a client's slot is freed by its command */
            c->used = 0;
    } else if (op == OP_RESPONSE && c->client && !c->established) {
        c->established = 1;
    } else if (op == OP_RW && c->established) {
        on_data(c, (const char *)(h + 1), len <= DATA_MAX ? len : DATA_MAX);
    } else if (op == OP_SHUTDOWN) {
        reset_conn(c);
    } else if (op == OP_CREDIT_REQUEST) {
        send_pkt(c, OP_CREDIT_UPDATE, 0, 0, 0);
    } else if (op != OP_CREDIT_UPDATE) {
        reset_conn(c);
    }
}

static void transport_reset(void)
{
    uint32_t dropped = 0;
    for (int i = 0; i < MAX_CONNS; i++) {
        if (!conns[i].used)
            continue;
        dropped++;
        conns[i].failed = !conns[i].finished;
        conns[i].established = 0;
        if (!conns[i].client)
            conns[i].used = 0;
    }
    resets++;
    cid = virtio_cfg64(&dev, 0); /* the spec: re-read guest_cid */
    put_s("VSOCK TRANSPORT_RESET resets=");
    put_u(resets);
    put_s(" dropped=");
    put_u(dropped);
    put_line();
}

void vsock_step(void)
{
    uint32_t id;
    int rx = 0, ev = 0;
    reclaim_tx();
    while (virtq_poll(&rxq, &id)) {
        uint16_t i = (uint16_t)(id % NBUF);
        on_packet((volatile struct hdr *)RXBUF(i));
        post(&rxq, i, RXBUF(i), BUF_BYTES);
        rx = 1;
    }
    if (rx)
        virtq_kick(&rxq);
    while (virtq_poll(&evq, &id)) {
        uint16_t i = (uint16_t)(id % NEV);
        if (*(volatile uint32_t *)EVBUF(i) == EVENT_TRANSPORT_RESET)
            transport_reset();
        post(&evq, i, EVBUF(i), 8);
        ev = 1;
    }
    if (ev)
        virtq_kick(&evq);
}

/* ------------------------------------------------------------------ commands */
static void cmd_connect(char *args)
{
    uint64_t port;
    char *word = next_word(&args);
    if (!parse_u64(word, &port) || port > 0xffffffffu) {
        say("ERR vsock: usage: vsock connect <port> [text]");
        return;
    }
    while (*args == ' ' || *args == '\t')
        args++;
    char line[REPLY_MAX + 2];
    uint32_t n = 0;
    for (const char *t = *args ? args : "hello from the guest"; *t && n < REPLY_MAX; t++)
        line[n++] = *t;
    line[n++] = '\n';
    struct conn *c = alloc(CLIENT_PORT_BASE + (uint32_t)(next_client++ % 0x1000), (uint32_t)port, 1);
    if (!c) {
        say("VSOCK CONNECT ERR no free connection");
        return;
    }
    send_pkt(c, OP_REQUEST, 0, 0, 0);
    int sent = 0;
    uint64_t t0 = rdtsc();
    while (!c->finished && !c->failed && rdtsc() - t0 < tsc_khz * WAIT_MS) {
        if (c->established && !sent) {
            if (peer_credit(c) < n) {
                send_pkt(c, OP_CREDIT_REQUEST, 0, 0, 0);
            } else {
                send_pkt(c, OP_RW, 0, line, n);
                sent = 1;
            }
        }
        vsock_step();
        if (!c->finished && !c->failed)
            idle_ms(1);
    }
    if (c->finished) {
        c->reply[c->rlen] = 0;
        put_s("VSOCK REPLY ");
        put_s(c->reply);
        put_line();
        send_pkt(c, OP_SHUTDOWN, SHUTDOWN_BOTH, 0, 0); /* the host answers RST, to nobody */
    } else if (c->failed) {
        say("VSOCK CONNECT RESET");
    } else {
        say("VSOCK CONNECT TIMEOUT");
        send_pkt(c, OP_RST, 0, 0, 0);
    }
    c->used = 0;
}

static void cmd_status(void)
{
    uint32_t n = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        n += conns[i].used != 0;
    put_s("VSOCK STATUS cid=");
    put_u(cid);
    put_s(" listen=");
    put_u(listen_port);
    put_s(" conns=");
    put_u(n);
    put_s(" resets=");
    put_u(resets);
    put_s(" echoed=");
    put_u(echoed);
    put_line();
}

void vsock_command(char *args)
{
    char *sub = next_word(&args);
    if (!up && !error)
        probe();
    if (error) {
        put_s("VSOCK ERR ");
        put_s(error);
        put_line();
        return;
    }
    if (streq(sub, "listen")) {
        uint64_t port;
        if (!parse_u64(next_word(&args), &port) || port > 0xffffffffu) {
            say("ERR vsock: usage: vsock listen <port>");
            return;
        }
        listen_port = (uint32_t)port;
        put_s("VSOCK LISTENING port=");
        put_u(listen_port);
        put_s(" cid=");
        put_u(cid);
        put_line();
    } else if (streq(sub, "connect")) {
        cmd_connect(args);
    } else if (streq(sub, "status")) {
        cmd_status();
    } else {
        say("ERR vsock: usage: vsock listen <port> | connect <port> [text] | status");
    }
}
