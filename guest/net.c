/*
 * net.c - the virtio-net driver of the test guest: polling at CPL3 (no interrupts), one NIC (the
 * first virtio-net device), set up at boot when the command line has `ip=A.B.C.D` (Linux's
 * `ip=<client-ip>:...` reads the same) or on the first `net` command.
 *
 * It answers ARP requests and ICMP echo requests for its IPv4 address, counts what it receives and
 * sends, and when the device raises VIRTIO_NET_S_ANNOUNCE (vmmpy does on a migration destination)
 * it sends a gratuitous ARP and acknowledges with VIRTIO_NET_CTRL_ANNOUNCE_ACK on the control
 * queue. No offloads and no mergeable buffers are negotiated, so every receive buffer holds a
 * whole frame after the 12-byte virtio-net header: RX_BUF bytes each (>= 1526, spec 5.1.6.3.1).
 *
 * The main loop calls net_poll() on every pass: used receive buffers are handled and posted again,
 * answers go out, each queue kicked at most once per pass and only when the device asks for it
 * (it sets VRING_USED_F_NO_NOTIFY while it is busy with the queue anyway; a kick is a VM exit).
 * vmmpy wakes the idle vCPU when the device adds used buffers, as an interrupt would end HLT, so a
 * ping is answered at once.
 *
 * For throughput benchmarks: `net blast N PORT` sends N UDP datagrams of the largest size a
 * 1500-byte MTU takes to PORT of the last host that sent us an ARP request or a ping, from the
 * same port; `net sink PORT` counts the UDP datagrams to PORT from then on, and `net sink`
 * reports them (frames, payload bytes, microseconds from the first to the last).
 */
#include "virtio.h"

#define NET_DEVICE 0x1041
#define F_MAC (1ul << 5)
#define F_STATUS (1ul << 16)
#define F_CTRL_VQ (1ul << 17)
#define F_GUEST_ANNOUNCE (1ul << 21)
#define S_LINK_UP 1
#define S_ANNOUNCE 2
#define CTRL_ANNOUNCE 3
#define CTRL_ANNOUNCE_ACK 0

#define HDR 12
#define RX_BUFS 64
#define TX_BUFS 64
#define RX_BUF 2048
#define TX_BUF 2048
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IP_ICMP 1
#define IP_UDP 17
#define UDP_MAX 1472 /* payload of a datagram in one 1500-byte-MTU frame: 1500 - 20 - 8 */
#define ACK_MS 5000

/* Rings (three pages per queue), then buffers: RAM of the guest image, cleared at set-up. */
#define RINGS (3 * 0x3000)
#define AREA (RINGS + RX_BUFS * RX_BUF + TX_BUFS * TX_BUF + 0x1000)
static uint8_t area[AREA] __attribute__((section(".bss.net"), aligned(4096)));
#define RX_AT (area + RINGS)
#define TX_AT (RX_AT + RX_BUFS * RX_BUF)
#define CTRL_AT (TX_AT + TX_BUFS * TX_BUF)

static struct virtio_dev dev;
static struct virtq rxq, txq, ctrlq;
static int probed, up, has_ctrl;
static const char *error;
static uint8_t mac[6];
static uint8_t ip[4];
static int have_ip;
static uint8_t peer_mac[6], peer_ip[4];
static int have_peer;
static uint32_t tx_next, tx_inflight;
static int rx_posted, tx_posted; /* chains added since the last kick */
static struct {
    uint64_t rx, tx, arp_in, arp_out, echo, garp, ignored, tx_full, acks;
} st;
static struct {
    uint16_t port; /* 0: not counting */
    uint64_t frames, bytes, first, last, kicks, kick_cycles;
} sink;

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static int same(const uint8_t *a, const uint8_t *b, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/* The Internet checksum of n bytes (RFC 1071). */
static uint16_t csum(const uint8_t *p, uint32_t n)
{
    uint32_t sum = 0;
    for (uint32_t i = 0; i + 1 < n; i += 2)
        sum += be16(p + i);
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* "A.B.C.D" (ending at a blank, ':' or NUL) into out; 1 on success. */
static int parse_ip(const char *s, uint8_t out[4])
{
    for (int i = 0; i < 4; i++) {
        uint32_t v = 0, digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4)
            v = v * 10 + (uint32_t)(*s++ - '0'), digits++;
        if (!digits || v > 255)
            return 0;
        out[i] = (uint8_t)v;
        if (i < 3 && *s++ != '.')
            return 0;
    }
    return *s == 0 || *s == ' ' || *s == '\t' || *s == ':';
}

static void put_ip(const uint8_t *a)
{
    for (int i = 0; i < 4; i++) {
        if (i)
            put_s(".");
        put_u(a[i]);
    }
}

static void put_mac(const uint8_t *m)
{
    static const char hex[] = "0123456789abcdef";
    char s[18];
    for (int i = 0; i < 6; i++) {
        s[3 * i] = hex[m[i] >> 4];
        s[3 * i + 1] = hex[m[i] & 15];
        s[3 * i + 2] = i < 5 ? ':' : 0;
    }
    put_s(s);
}

/* ------------------------------------------------------------------ queues */
static void post_rx(uint16_t i)
{
    rxq.desc[i].addr = (uint64_t)(RX_AT + (uint64_t)i * RX_BUF);
    rxq.desc[i].len = RX_BUF;
    rxq.desc[i].flags = VRING_DESC_F_WRITE;
    rxq.desc[i].next = 0;
    virtq_add(&rxq, i);
    rx_posted = 1;
}

static void reclaim_tx(void)
{
    uint32_t id;
    while (virtq_poll(&txq, &id))
        tx_inflight--;
}

/* The next transmit buffer's frame area (the caller checked that one is free). */
static uint8_t *tx_slot(void)
{
    uint8_t *b = TX_AT + (uint64_t)(tx_next % txq.size) * TX_BUF;
    memset(b, 0, HDR); /* no offloads: flags 0, GSO none */
    return b + HDR;
}

/* A transmit buffer for a frame of up to TX_BUF - HDR bytes, or 0 when all are in flight. */
static uint8_t *tx_frame(void)
{
    reclaim_tx();
    if (tx_inflight == txq.size) {
        st.tx_full++;
        return 0;
    }
    return tx_slot();
}

static void tx_send(uint32_t len)
{
    uint16_t i = (uint16_t)(tx_next % txq.size);
    txq.desc[i].addr = (uint64_t)(TX_AT + (uint64_t)i * TX_BUF);
    txq.desc[i].len = HDR + len;
    txq.desc[i].flags = 0;
    txq.desc[i].next = 0;
    virtq_add(&txq, i);
    tx_next++;
    tx_inflight++;
    tx_posted = 1;
    st.tx++;
}

/* ------------------------------------------------------------------ protocols */
/* An ARP packet: `op` (1 request, 2 reply) from us to (tha, tpa), in an Ethernet frame to `dst`. */
static int send_arp(const uint8_t *dst, uint16_t op, const uint8_t *tha, const uint8_t *tpa)
{
    uint8_t *f = tx_frame();
    if (!f)
        return 0;
    memcpy(f, dst, 6);
    memcpy(f + 6, mac, 6);
    put_be16(f + 12, ETH_ARP);
    uint8_t *a = f + 14;
    put_be16(a, 1);      /* Ethernet */
    put_be16(a + 2, ETH_IP);
    a[4] = 6;
    a[5] = 4;
    put_be16(a + 6, op);
    memcpy(a + 8, mac, 6);
    memcpy(a + 14, ip, 4);
    memcpy(a + 18, tha, 6);
    memcpy(a + 24, tpa, 4);
    memset(f + 42, 0, 18); /* padded to the 60-byte minimum */
    tx_send(60);
    return 1;
}

static void set_peer(const uint8_t *m, const uint8_t *a)
{
    memcpy(peer_mac, m, 6);
    memcpy(peer_ip, a, 4);
    have_peer = 1;
}

static void on_arp(const uint8_t *f, uint32_t len)
{
    const uint8_t *a = f + 14;
    if (len < 42 || be16(a) != 1 || be16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4 || be16(a + 6) != 1 ||
        !same(a + 24, ip, 4)) {
        st.ignored++;
        return;
    }
    st.arp_in++;
    set_peer(a + 8, a + 14);
    if (send_arp(a + 8, 2, a + 8, a + 14))
        st.arp_out++;
}

/* A UDP datagram to us (h: its IP header): counted when it is for the sink's port. */
static void on_udp(const uint8_t *h, uint32_t ihl, uint32_t total)
{
    if (!sink.port || be16(h + ihl + 2) != sink.port) {
        st.ignored++;
        return;
    }
    uint64_t now = rdtsc();
    if (!sink.frames)
        sink.first = now;
    sink.last = now;
    sink.frames++;
    sink.bytes += total - ihl - 8;
}

static void on_ip(const uint8_t *f, uint32_t len)
{
    const uint8_t *h = f + 14;
    uint32_t ihl = (uint32_t)(h[0] & 15) * 4;
    uint32_t total = len >= 34 ? be16(h + 2) : 0;
    if (len < 34 || (h[0] >> 4) != 4 || ihl < 20 || total < ihl + 8 || 14 + total > len || !same(h + 16, ip, 4)) {
        st.ignored++;
        return;
    }
    if (h[9] == IP_UDP) {
        on_udp(h, ihl, total);
        return;
    }
    if (h[9] != IP_ICMP || h[ihl] != 8 || total > TX_BUF - HDR - 14) {
        st.ignored++;
        return;
    }
    set_peer(f + 6, h + 12);
    uint8_t *r = tx_frame();
    if (!r)
        return;
    memcpy(r, f + 6, 6); /* back to the sender */
    memcpy(r + 6, mac, 6);
    put_be16(r + 12, ETH_IP);
    uint8_t *o = r + 14;
    memcpy(o, h, total);
    if (14 + total < 60)
        memset(o + total, 0, 46 - total); /* padded to the 60-byte minimum */
    o[8] = 64; /* TTL */
    memcpy(o + 12, ip, 4);
    memcpy(o + 16, h + 12, 4);
    put_be16(o + 10, 0);
    put_be16(o + 10, csum(o, ihl));
    uint8_t *icmp = o + ihl;
    icmp[0] = 0; /* echo reply, same id, sequence and data */
    put_be16(icmp + 2, 0);
    put_be16(icmp + 2, csum(icmp, total - ihl));
    tx_send(14 + total > 60 ? 14 + total : 60);
    st.echo++;
}

static void on_frame(const uint8_t *f, uint32_t len)
{
    st.rx++;
    if (len < 14 || !have_ip) {
        st.ignored++;
        return;
    }
    uint16_t type = be16(f + 12);
    if (type == ETH_ARP)
        on_arp(f, len);
    else if (type == ETH_IP)
        on_ip(f, len);
    else
        st.ignored++;
}

/* Gratuitous ARP (a request for our own address, broadcast), then the device's announce bit
 * acknowledged on the control queue; waited for (ACK_MS at most). */
static void announce(void)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, zero[6] = {0};
    if (have_ip && send_arp(bcast, 1, zero, ip))
        st.garp++;
    if (tx_posted) {
        virtq_kick(&txq);
        tx_posted = 0;
    }
    if (!has_ctrl)
        return;
    uint8_t *cmd = CTRL_AT;
    cmd[0] = CTRL_ANNOUNCE;
    cmd[1] = CTRL_ANNOUNCE_ACK;
    cmd[2] = 0xff; /* the ack the device writes */
    ctrlq.desc[0].addr = (uint64_t)cmd;
    ctrlq.desc[0].len = 2;
    ctrlq.desc[0].flags = VRING_DESC_F_NEXT;
    ctrlq.desc[0].next = 1;
    ctrlq.desc[1].addr = (uint64_t)(cmd + 2);
    ctrlq.desc[1].len = 1;
    ctrlq.desc[1].flags = VRING_DESC_F_WRITE;
    ctrlq.desc[1].next = 0;
    virtq_add(&ctrlq, 0);
    virtq_kick(&ctrlq);
    uint32_t id;
    uint64_t t0 = rdtsc();
    while (!virtq_poll(&ctrlq, &id)) {
        if (rdtsc() - t0 > tsc_khz * ACK_MS)
            return;
        cpu_relax();
    }
    if (LOAD_ACQ(&cmd[2]) == 0)
        st.acks++;
}

/* ------------------------------------------------------------------ set up and polling */
static void probe(void)
{
    probed = 1;
    int pci = pci_find(VIRTIO_VENDOR, NET_DEVICE, 0);
    if (pci < 0) {
        error = "no virtio-net device";
        return;
    }
    memset(area, 0, AREA);
    rxq.size = RX_BUFS;
    txq.size = TX_BUFS;
    ctrlq.size = 2;
    struct virtq *qs[3] = {&rxq, &txq, &ctrlq};
    const uint64_t rings[3] = {(uint64_t)area, (uint64_t)area + 0x3000, (uint64_t)area + 0x6000};
    /* The control queue exists only with F_CTRL_VQ, and GUEST_ANNOUNCE needs it (spec 5.1.3.1). */
    error = virtio_init_queues(&dev, (uint32_t)pci, F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE, qs, rings, 3, 0);
    if (error) {
        /* a device without the control queue: rx and tx only */
        error = virtio_init_queues(&dev, (uint32_t)pci, F_MAC | F_STATUS, qs, rings, 2, 0);
        if (error)
            return;
    }
    has_ctrl = (dev.features & F_CTRL_VQ) != 0;
    for (int i = 0; i < 6; i++)
        mac[i] = dev.features & F_MAC ? mmio_read8(dev.device + (uint64_t)i) : (uint8_t)(i == 0 ? 2 : i);
    for (uint16_t i = 0; i < rxq.size; i++)
        post_rx(i);
    virtq_kick(&rxq);
    rx_posted = 0;
    up = 1;
}

static uint16_t link_status(void) { return dev.features & F_STATUS ? mmio_read16(dev.device + 6) : S_LINK_UP; }

void net_init(const char *cmdline_ip)
{
    if (cmdline_ip && parse_ip(cmdline_ip, ip))
        have_ip = 1;
    if (have_ip && !probed) {
        probe();
        if (!up) {
            put_s("NET ERR ");
            put_s(error);
            put_line();
            return;
        }
        put_s("NET UP mac=");
        put_mac(mac);
        put_s(" ip=");
        put_ip(ip);
        put_line();
    }
}

int net_up(void) { return up; }

void net_poll(int check_status)
{
    if (!up)
        return;
    uint32_t id;
    for (int n = 0; n < RX_BUFS && virtq_poll(&rxq, &id); n++) {
        const volatile struct vring_used_elem *ring = (const volatile struct vring_used_elem *)(rxq.used + 2);
        uint32_t len = ring[(uint16_t)(rxq.used_seen - 1) & (rxq.size - 1)].len;
        if (id >= rxq.size) { /* not a buffer we posted: nothing to post again */
            st.ignored++;
            continue;
        }
        if (len > HDR && len <= RX_BUF)
            on_frame(RX_AT + (uint64_t)id * RX_BUF + HDR, len - HDR);
        else
            st.ignored++; /* the device dropped a frame too large for the buffer */
        post_rx((uint16_t)id);
    }
    if (rx_posted) {
        virtq_kick(&rxq);
        rx_posted = 0;
    }
    if (tx_posted) {
        virtq_kick(&txq);
        tx_posted = 0;
    }
    if (check_status && (dev.features & F_GUEST_ANNOUNCE) && (link_status() & S_ANNOUNCE))
        announce();
}

static void cmd_stats(void)
{
    put_s("NET STATS rx=");
    put_u(st.rx);
    put_s(" tx=");
    put_u(st.tx);
    put_s(" arp_in=");
    put_u(st.arp_in);
    put_s(" arp_out=");
    put_u(st.arp_out);
    put_s(" echo=");
    put_u(st.echo);
    put_s(" garp=");
    put_u(st.garp);
    put_s(" acks=");
    put_u(st.acks);
    put_s(" ignored=");
    put_u(st.ignored);
    put_s(" tx_full=");
    put_u(st.tx_full);
    put_line();
}

static uint64_t us_of(uint64_t cycles) { return cycles * 1000 / tsc_khz; }

/* `n` UDP datagrams of UDP_MAX bytes to the peer's `port`, as fast as the ring takes them; the
 * device is kicked only when it asks (it drains the ring without one while it is busy). */
static void cmd_blast(uint64_t n, uint16_t port)
{
    uint64_t t0 = rdtsc(), kicks0 = txq.kicks, kick_cycles0 = txq.kick_cycles, sent = 0;
    while (sent < n) {
        reclaim_tx();
        if (tx_inflight == txq.size) {
            if (tx_posted) {
                virtq_kick(&txq);
                tx_posted = 0;
            }
            cpu_relax();
            continue;
        }
        uint8_t *f = tx_slot();
        memcpy(f, peer_mac, 6);
        memcpy(f + 6, mac, 6);
        put_be16(f + 12, ETH_IP);
        uint8_t *h = f + 14, *u = h + 20;
        h[0] = 0x45;
        h[1] = 0;
        put_be16(h + 2, 20 + 8 + UDP_MAX);
        put_be16(h + 4, (uint16_t)sent);
        put_be16(h + 6, 0x4000); /* don't fragment */
        h[8] = 64;
        h[9] = IP_UDP;
        put_be16(h + 10, 0);
        memcpy(h + 12, ip, 4);
        memcpy(h + 16, peer_ip, 4);
        put_be16(h + 10, csum(h, 20));
        put_be16(u, port);
        put_be16(u + 2, port);
        put_be16(u + 4, 8 + UDP_MAX);
        put_be16(u + 6, 0); /* no UDP checksum (allowed over IPv4) */
        memset(u + 8, (int)(sent & 0xff), UDP_MAX);
        tx_send(14 + 20 + 8 + UDP_MAX);
        sent++;
        if (tx_posted) {
            virtq_kick(&txq);
            tx_posted = 0;
        }
    }
    uint64_t t1 = rdtsc();
    while (tx_inflight && rdtsc() - t1 < tsc_khz * ACK_MS)
        reclaim_tx();
    uint64_t t = rdtsc() - t0;
    put_s("NET BLAST sent=");
    put_u(sent);
    put_s(" us=");
    put_u(us_of(t));
    put_s(" kicks=");
    put_u(txq.kicks - kicks0);
    put_s(" kick_us=");
    put_u(us_of(txq.kick_cycles - kick_cycles0));
    put_s(" inflight=");
    put_u(tx_inflight);
    put_line();
}

static void cmd_sink(char *port)
{
    uint64_t p;
    if (*port) {
        if (!parse_u64(port, &p) || !p || p > 0xffff) {
            say("ERR net: usage: net sink [PORT]");
            return;
        }
        sink.frames = sink.bytes = sink.first = sink.last = 0;
        sink.kicks = rxq.kicks;
        sink.kick_cycles = rxq.kick_cycles;
        sink.port = (uint16_t)p;
    }
    put_s("NET SINK port=");
    put_u(sink.port);
    put_s(" frames=");
    put_u(sink.frames);
    put_s(" bytes=");
    put_u(sink.bytes);
    put_s(" us=");
    put_u(us_of(sink.last - sink.first));
    put_s(" kicks=");
    put_u(rxq.kicks - sink.kicks);
    put_s(" kick_us=");
    put_u(us_of(rxq.kick_cycles - sink.kick_cycles));
    put_line();
}

void net_command(char *args)
{
    char *sub = next_word(&args);
    if (streq(sub, "ip")) {
        char *a = next_word(&args);
        if (!parse_ip(a, ip)) {
            say("ERR net: usage: net ip A.B.C.D");
            return;
        }
        have_ip = 1;
    } else if (!streq(sub, "info") && !streq(sub, "stats") && !streq(sub, "blast") && !streq(sub, "sink")) {
        say("ERR net: usage: net info|stats|ip A.B.C.D|blast N PORT|sink [PORT]");
        return;
    }
    if (!probed)
        probe();
    if (!up) {
        put_s("ERR net: ");
        put_s(error);
        put_line();
        return;
    }
    if (streq(sub, "stats")) {
        cmd_stats();
        return;
    }
    if (streq(sub, "sink")) {
        cmd_sink(next_word(&args));
        return;
    }
    if (streq(sub, "blast")) {
        uint64_t n, port;
        if (!parse_u64(next_word(&args), &n) || !parse_u64(next_word(&args), &port) || !port || port > 0xffff) {
            say("ERR net: usage: net blast N PORT");
            return;
        }
        if (!have_peer) {
            say("ERR net: blast: no peer yet (ARP or ping the guest first)");
            return;
        }
        cmd_blast(n, (uint16_t)port);
        return;
    }
    uint16_t s = link_status();
    put_s("NET INFO mac=");
    put_mac(mac);
    put_s(" ip=");
    if (have_ip)
        put_ip(ip);
    else
        put_s("none");
    put_s(s & S_LINK_UP ? " link=up" : " link=down");
    put_s(" features=");
    put_x(dev.features);
    put_line();
}
