/*
 * main.c - the vmmpy test guest at CPL3: boot information, the UART command loop, AP check-in.
 *
 * Every variable here is initialised from the ELF file: guest.ld puts the .bss input section into
 * the .data output section, so nothing relies on the loader zeroing .bss. Only the BSP touches
 * the UART.
 */
#include "guest.h"

#define LINE_MAX 128
#define MIB (1ul << 20)
#define FOUR_GIB (1ul << 32)
#define DEFAULT_TSC_KHZ 2000000ul

uint32_t ncpus = 1;
uint64_t tsc_khz;

static uint32_t ap_checkin;
static uint32_t cpus_asked;
static const char *cmdline_ip; /* `ip=` on the command line, for net.c */
static uint64_t boot_id;
static uint64_t ram_bytes;
static struct { uint64_t start, end; } ram[128];
static uint32_t nram;
static uint64_t dirty_mib;

/* ------------------------------------------------------------------ libc bits */
void *memset(void *d, int c, size_t n)
{
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static int starts(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* decimal, at most 18 digits; the whole string must be digits */
int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    int n = 0;
    for (; *s >= '0' && *s <= '9'; s++, n++) {
        if (n == 18)
            return 0;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    if (n == 0 || (*s && *s != ' ' && *s != '\t'))
        return 0;
    *out = v;
    return 1;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ul;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebul;
    return x ^ (x >> 31);
}

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ------------------------------------------------------------------ UART output */
static char obuf[LINE_MAX + 96];
static uint32_t olen;

static void put_ch(char c)
{
    if (olen < sizeof(obuf) - 2)
        obuf[olen++] = c;
}

void put_s(const char *s)
{
    while (*s)
        put_ch(*s++);
}

void put_u(uint64_t v)
{
    char t[21];
    int n = 0;
    do
        t[n++] = (char)('0' + v % 10);
    while (v /= 10);
    while (n)
        put_ch(t[--n]);
}

void put_x(uint64_t v)
{
    int i = 60;
    put_s("0x");
    while (i > 0 && !((v >> i) & 15))
        i -= 4;
    for (; i >= 0; i -= 4)
        put_ch("0123456789abcdef"[(v >> i) & 15]);
}

static void put_x16(uint64_t v)
{
    for (int i = 60; i >= 0; i -= 4)
        put_ch("0123456789abcdef"[(v >> i) & 15]);
}

/* Every port access is a VM exit (~25 us), so LSR is read once per 16 bytes (one FIFO's worth),
 * and a UART that never reports THRE costs a bounded wait, not a hang. */
static void wait_thre(void)
{
    for (int k = 0; k < 1000; k++)
        if (inb(UART_LSR) & LSR_THRE)
            return;
}

void put_line(void)
{
    obuf[olen++] = '\r';
    obuf[olen++] = '\n';
    for (uint32_t i = 0; i < olen; i++) {
        if ((i & 15) == 0)
            wait_thre();
        outb(UART_THR, (uint8_t)obuf[i]);
    }
    olen = 0;
}

void say(const char *s)
{
    put_s(s);
    put_line();
}

/* ------------------------------------------------------------------ UART input */
static char line[LINE_MAX + 1];
static uint32_t llen;
static int too_long;

/* Reads what the UART has; returns 1 as soon as a non-empty line is complete (the rest stays in
 * the UART for the next call). Lines end with \r or \n; empty lines are ignored. */
static int poll_line(void)
{
    while (inb(UART_LSR) & LSR_DR) {
        char c = (char)inb(UART_RBR);
        if (c == '\r' || c == '\n') {
            if (too_long) {
                too_long = 0;
                llen = 0;
                say("ERR line too long");
            } else if (llen) {
                line[llen] = 0;
                return 1;
            }
        } else if (c) {
            if (llen < LINE_MAX)
                line[llen++] = c;
            else
                too_long = 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ boot information */
/* From the zero page (64-bit entry) or from hvm_start_info (PVH: magic, version >= 1 for the map). */
#define PVH_MAGIC 0x336ec578u

static void parse_cmdline(uint64_t ptr)
{
    if (ptr == 0 || ptr >= FOUR_GIB) /* only the first 4 GiB are mapped */
        return;
    const char *s = (const char *)ptr;
    for (uint32_t i = 0; i < 65536 && s[i]; i++) {
        if (i > 0 && s[i - 1] != ' ' && s[i - 1] != '\t' && s[i - 1] != '\n')
            continue;
        uint64_t v;
        if (starts(s + i, "vmmpy.cpus=") && parse_u64(s + i + 11, &v))
            cpus_asked = v > 0xffffffffu ? 0xffffffffu : (uint32_t)v;
        else if (starts(s + i, "vmmpy.tsc_khz=") && parse_u64(s + i + 14, &v))
            tsc_khz = v;
        else if (starts(s + i, "ip="))
            cmdline_ip = s + i + 3;
    }
    ncpus = cpus_asked == 0 ? 1 : cpus_asked > MAX_CPUS ? MAX_CPUS : cpus_asked;
}

/* n entries of `stride` bytes: u64 addr, u64 size, u32 type (e820 and hvm_memmap_table_entry) */
static void parse_memmap(const uint8_t *e, uint32_t n, uint32_t stride)
{
    if (n > 128)
        n = 128;
    for (uint32_t i = 0; i < n; i++, e += stride) {
        uint64_t addr, size;
        uint32_t type;
        memcpy(&addr, e, 8);
        memcpy(&size, e + 8, 8);
        memcpy(&type, e + 16, 4);
        if (type != 1 || size == 0)
            continue;
        ram_bytes += size;
        ram[nram].start = addr;
        ram[nram].end = addr + size;
        nram++;
    }
}

/* Is [start, end) RAM (inside one e820 RAM entry, or entries that touch) and below 4 GiB? */
int is_ram(uint64_t start, uint64_t end)
{
    if (end > FOUR_GIB)
        return 0;
    while (start < end) {
        uint32_t i;
        for (i = 0; i < nram; i++)
            if (ram[i].start <= start && start < ram[i].end)
                break;
        if (i == nram)
            return 0;
        start = ram[i].end;
    }
    return 1;
}

static void uart_init(uint64_t *entropy)
{
    outb(UART_IER, 0x00); /* no interrupts, ever */
    *entropy = mix64(*entropy ^ rdtsc());
    outb(UART_LCR, 0x03); /* 8N1, DLAB off */
    *entropy = mix64(*entropy ^ rdtsc());
    outb(UART_FCR, 0x07); /* FIFOs on and cleared */
    *entropy = mix64(*entropy ^ rdtsc());
}

static uint64_t make_boot_id(uint64_t h)
{
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    h = mix64(h ^ rdtsc() ^ ((uint64_t)a << 32));
    if (c & (1u << 30)) { /* RDRAND */
        for (int tries = 0; tries < 16; tries++) {
            uint64_t r;
            uint8_t ok;
            __asm__ volatile("rdrand %0; setc %1" : "=r"(r), "=qm"(ok));
            if (ok) {
                h = mix64(h ^ r);
                break;
            }
        }
    }
    return mix64(h ^ rdtsc());
}

/* ------------------------------------------------------------------ commands */
static void cmd_status(void)
{
    put_s("STATUS boot_id=");
    put_x16(boot_id);
    put_s(" cpus=");
    put_u(ncpus);
    put_s(dirty_running() ? " dirty=on mib=" : " dirty=off mib=");
    put_u(dirty_mib);
    put_s(" gen=");
    put_u(dirty_max_gen());
    put_s(" min_gen=");
    put_u(dirty_min_gen());
    put_line();
}

static void cmd_dirty(char *args)
{
    uint64_t mib, rate = 0;
    while (*args == ' ' || *args == '\t')
        args++;
    if (!parse_u64(args, &mib) || mib == 0) {
        say("ERR dirty: usage: dirty <MiB> [pages_per_sec]");
        return;
    }
    while (*args && *args != ' ' && *args != '\t')
        args++;
    while (*args == ' ' || *args == '\t')
        args++;
    if (*args && !parse_u64(args, &rate)) {
        say("ERR dirty: usage: dirty <MiB> [pages_per_sec]");
        return;
    }
    if (mib > 4096 || !is_ram(DIRTY_BASE, DIRTY_BASE + mib * MIB)) {
        say("ERR dirty: not enough memory");
        return;
    }
    dirty_start(mib * (MIB >> 12), rate);
    dirty_mib = mib;
    put_s("DIRTY STARTED mib=");
    put_u(mib);
    put_s(" rate=");
    put_u(rate);
    put_line();
}

static void cmd_verify(void)
{
    uint64_t checked, page, want, got;
    int why;
    if (dirty_verify(&checked, &page, &want, &got, &why) == 0) {
        put_s("VERIFY OK ");
        put_u(checked);
    } else {
        put_s("VERIFY BAD page=");
        put_u(page);
        put_s(" want_gen=");
        put_u(want);
        put_s(" got_gen=");
        put_u(got);
        if (why == 1)
            put_s(" reason=index");
        else if (why == 2)
            put_s(" reason=checksum");
    }
    put_line();
}

/* After a reset or power-off request the VMM parks this vCPU for good; if we get past that,
 * give it half a second, then say so. */
static void did_not_happen(const char *what)
{
    uint64_t t0 = rdtsc(), wait = tsc_khz * 500;
    while (rdtsc() - t0 < wait)
        idle_ms(100);
    say(what);
}

static void cmd_reboot(const char *how)
{
    int m = streq(how, "acpi") ? 1 : streq(how, "kbd") ? 2 : streq(how, "cmos") ? 3 : streq(how, "triple") ? 4 : 0;
    if (!m) {
        say("ERR unknown command");
        return;
    }
    put_s("REBOOTING ");
    put_s(how);
    put_line();
    switch (m) {
    case 1:
        outb(ACPI_PORT, 0x01); /* ACPI reset register value */
        break;
    case 2:
        outb(I8042_CMD, 0xfe); /* pulse the reset line */
        break;
    case 3:
        outb(CMOS_INDEX, 0x8f); /* shutdown status byte, NMI off */
        outb(CMOS_DATA, 0x00);  /* 0 = plain reset */
        break;
    case 4:
        __asm__ volatile("ud2"); /* #UD with an IDT of limit 0: #GP, #DF, triple fault */
        break;
    }
    did_not_happen("ERR reboot did not happen");
}

static void acpi_poweroff(void)
{
    outb(ACPI_PORT, 0x34); /* SLP_TYP 5 | SLP_EN */
    did_not_happen("ERR poweroff did not happen");
}

static void cmd_poweroff(void)
{
    say("POWEROFF");
    acpi_poweroff();
}

/* The ACPI power button: the guest takes no interrupts, so it polls the GED's event register
 * (one MMIO exit) and powers off as an OS would on the button's notify. */
static uint64_t button_polled_at;

static void poll_power_button(void)
{
    button_polled_at = rdtsc();
    if (mmio_read8(GED_EVENTS) & GED_POWER_BUTTON) {
        say("POWER BUTTON");
        acpi_poweroff();
    }
}

/* `pio <n>`: n port writes to an unclaimed port, timed with the TSC: the VMM's exit round trip as
 * the guest sees it (benches/ compares it with a plain C KVM loop running the same instruction). */
static void cmd_pio(char *args)
{
    uint64_t n;
    if (!parse_u64(args, &n) || n == 0) {
        say("ERR pio: usage: pio <count>");
        return;
    }
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++)
        outb(PIO_BENCH_PORT, 0);
    uint64_t cycles = rdtsc() - t0;
    put_s("PIO n=");
    put_u(n);
    put_s(" ns_per_exit=");
    put_u(cycles * 1000000 / (tsc_khz ? tsc_khz : 2000000) / n);
    put_line();
}

char *next_word(char **s)
{
    char *p = *s, *w;
    while (*p == ' ' || *p == '\t')
        p++;
    w = p;
    while (*p && *p != ' ' && *p != '\t')
        p++;
    if (*p)
        *p++ = 0;
    *s = p;
    return w;
}

static void handle(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    if (!*s) /* a line of blanks is an empty line */
        return;
    if (starts(s, "echo") && (s[4] == 0 || s[4] == ' ' || s[4] == '\t')) {
        say(s[4] ? s + 5 : s + 4);
        return;
    }
    char *rest = s;
    char *cmd = next_word(&rest);
    if (streq(cmd, "status")) {
        cmd_status();
    } else if (streq(cmd, "dirty")) {
        cmd_dirty(rest);
    } else if (streq(cmd, "stop")) {
        dirty_stop();
        put_s("DIRTY STOPPED gen=");
        put_u(dirty_max_gen());
        put_line();
    } else if (streq(cmd, "verify")) {
        cmd_verify();
    } else if (streq(cmd, "reboot")) {
        cmd_reboot(next_word(&rest));
    } else if (streq(cmd, "poweroff")) {
        cmd_poweroff();
    } else if (streq(cmd, "pio")) {
        cmd_pio(rest);
    } else if (streq(cmd, "blk")) {
        blk_command(rest);
    } else if (streq(cmd, "net")) {
        net_command(rest);
    } else if (streq(cmd, "vsock")) {
        vsock_command(rest);
    } else {
        say("ERR unknown command");
    }
}

/* ------------------------------------------------------------------ entry points (from entry.S) */
void ap_main(uint64_t index, const uint8_t *zero_page)
{
    (void)zero_page;
    __atomic_add_fetch(&ap_checkin, 1, __ATOMIC_SEQ_CST);
    wake_all(); /* the BSP may be sleeping while it waits for us */
    dirty_ap_loop((uint32_t)index);
}

void bsp_main(const uint8_t *zero_page, const uint8_t *start_info)
{
    uint64_t entropy = rdtsc();
    if (zero_page) {
        parse_cmdline(*(const uint32_t *)(zero_page + 0x228) | (uint64_t) * (const uint32_t *)(zero_page + 0x0c8) << 32);
        parse_memmap(zero_page + 0x2d0, zero_page[0x1e8], 20);
    } else if (*(const uint32_t *)start_info == PVH_MAGIC) {
        parse_cmdline(*(const uint64_t *)(start_info + 24));
        uint64_t map = *(const uint64_t *)(start_info + 40);
        if (*(const uint32_t *)(start_info + 4) >= 1 && map && map < FOUR_GIB)
            parse_memmap((const uint8_t *)map, *(const uint32_t *)(start_info + 48), 24);
    }
    if (!tsc_khz)
        tsc_khz = DEFAULT_TSC_KHZ;
    idle_init();
    uart_init(&entropy);
    boot_id = make_boot_id(entropy);

    put_s("vmmpy-testguest boot_id=");
    put_x16(boot_id);
    put_s(" cpus=");
    put_u(ncpus);
    put_s(" mem_mib=");
    put_u((ram_bytes + MIB / 2) / MIB);
    put_line();

    uint64_t t0 = rdtsc();
    int warned = 0;
    while (LOAD_ACQ(&ap_checkin) < ncpus - 1) {
        idle_ms(1);
        if (!warned && rdtsc() - t0 > tsc_khz * 5000) {
            put_s("WARN waiting for APs: ");
            put_u(LOAD_ACQ(&ap_checkin));
            put_s(" of ");
            put_u(ncpus - 1);
            put_s(" checked in");
            put_line();
            warned = 1;
        }
    }
    net_init(cmdline_ip);
    say("READY");

    for (;;) {
        if (poll_line()) {
            handle(line);
            llen = 0;
        } else if (dirty_running() || blk_running()) {
            /* work for ~1 ms between two looks at the UART (each look is a ~25 us VM exit); a
             * rate-limited `dirty` sleeps in between, and `blk load` waits for that sleep */
            uint64_t t0 = rdtsc();
            do {
                net_poll(0);
                if (vsock_up())
                    vsock_step();
                if (blk_running())
                    blk_step();
                if (dirty_running() && dirty_bsp_step())
                    break;
            } while (rdtsc() - t0 < tsc_khz);
            if (rdtsc() - button_polled_at > tsc_khz * 100)
                poll_power_button();
        } else {
            poll_power_button(); /* the VMM wakes us from the idle port when the button is pressed */
            net_poll(1);         /* ... and when a device adds used buffers or changes its config */
            if (vsock_up())
                vsock_step();
            idle_ms(100);
        }
    }
}
