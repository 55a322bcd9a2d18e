/*
 * dirty.c - the memory-dirtying workload and its self-check.
 *
 * The dirty area is `pages` 4 KiB pages from DIRTY_BASE (64 MiB physical), split among all vCPUs
 * by page index: vCPU k owns [pages*k/N, pages*(k+1)/N). Each vCPU sweeps its share over and over;
 * every sweep (pass) uses the next generation number. A page is
 *
 *     u64 index, u64 generation, u64 checksum, 509 u64 fill words derived from index and generation
 *
 * (pattern.c), and only after the whole page is written does the vCPU store the generation into gen_table[index].
 * So whenever the vCPUs stand still, every page whose table entry is non-zero holds exactly that
 * generation, whatever instant the VMM paused, snapshotted or migrated the guest at: a vCPU stopped
 * in the middle of a page has not yet published it, and finishes it when it resumes.
 *
 * Coordination is a command sequence number (work.seq) that only the BSP bumps, and per-vCPU
 * acknowledgements; APs poll it between pages and sleep in the idle port when they have nothing
 * to do. All of it runs at CPL3.
 */
#include "guest.h"

#define CMD_IDLE 0
#define CMD_DIRTY 1
#define STEP_NO_WORK 0xffffffffu
#define RATE_QUANTUM_MS 4

/* One u32 per page of the area (sized for 4 GiB). NOBITS: dirty_start zeroes the part it uses. */
static uint32_t gen_table[MAX_DIRTY_PAGES] __attribute__((section(".bss.gentable"), aligned(4096)));

/* Written by the BSP only; params are stable while any vCPU may be using them. */
static struct {
    uint32_t seq; /* bumped for every command */
    uint32_t cmd;
    uint64_t base;
    uint64_t pages;
    uint64_t rate; /* pages per second for the whole guest, 0 = unlimited */
    uint32_t gen_base;
} work;

static struct percpu {
    uint32_t ack; /* last work.seq this vCPU has acted on */
    uint32_t gen; /* highest generation this vCPU has published a page of */
} __attribute__((aligned(64))) percpu[MAX_CPUS];

struct run {
    uint32_t cpu, gen;
    uint64_t base, first, end, cur;
    uint64_t tpp; /* TSC ticks per page when rate limited, else 0 */
    uint64_t t0, done, maxlag;
};

/* BSP state */
static int bsp_on, ever;
static uint64_t last_pages;
static uint32_t bsp_seq;
static struct run bsp_run;

static void run_init(struct run *r, uint32_t cpu)
{
    uint64_t n = ncpus, pages = work.pages, rate = work.rate;
    r->cpu = cpu;
    r->gen = work.gen_base + 1;
    r->base = work.base;
    r->first = pages * cpu / n;
    r->end = pages * (cpu + 1) / n;
    r->cur = r->first;
    r->tpp = 0;
    if (rate) {
        uint64_t mine = rate * (cpu + 1) / n - rate * cpu / n;
        uint64_t hz = tsc_khz * 1000;
        if (!mine)
            r->end = r->first; /* no share of the rate: no pages */
        else
            r->tpp = hz / mine ? hz / mine : 1;
        r->maxlag = hz / 20; /* catch up at most 50 ms of lost time (pause, slow host) */
    }
    r->done = 0;
    r->t0 = rdtsc();
}

/* Writes up to `max` pages of this vCPU's share. Returns 0, or the milliseconds to sleep when the
 * rate limit says so, or STEP_NO_WORK. Stops early when the BSP posts a new command. */
static uint32_t run_step(struct run *r, uint32_t max, uint32_t seq)
{
    if (r->first == r->end)
        return STEP_NO_WORK;
    for (uint32_t i = 0; i < max; i++) {
        if (LOAD_ACQ(&work.seq) != seq)
            return 0;
        if (r->tpp) {
            uint64_t now = rdtsc();
            int64_t ahead = (int64_t)(r->t0 + r->done * r->tpp - now);
            if (ahead > (int64_t)(r->tpp + tsc_khz)) {
                /* further ahead than one page can put us: the TSC went backwards (restore or
                 * migration without TSC state). Start counting afresh from now. */
                r->t0 = now - r->done * r->tpp;
                ahead = 0;
            }
            if (ahead > 0) {
                /* sleep at least RATE_QUANTUM_MS and write the pages due in a burst: one idle
                 * exit per few ms, not per page */
                uint64_t ms = ((uint64_t)ahead + tsc_khz - 1) / tsc_khz;
                return ms < RATE_QUANTUM_MS ? RATE_QUANTUM_MS : ms > 1000 ? 1000 : (uint32_t)ms;
            }
            if ((uint64_t)-ahead > r->maxlag)
                r->t0 += (uint64_t)-ahead - r->maxlag;
        }
        pattern_fill((uint64_t *)(r->base + (r->cur << 12)), 512, r->cur, r->gen);
        STORE_REL(&gen_table[r->cur], r->gen); /* publish: strictly after the page */
        STORE_REL(&percpu[r->cpu].gen, r->gen);
        r->done++;
        if (++r->cur == r->end) {
            r->cur = r->first;
            r->gen++;
        }
    }
    return 0;
}

void dirty_ap_loop(uint32_t cpu)
{
    uint32_t seen = 0;
    struct run r;
    for (;;) {
        uint32_t s = LOAD_ACQ(&work.seq);
        if (s == seen) {
            idle_ms(50);
            continue;
        }
        seen = s;
        uint32_t cmd = LOAD_ACQ(&work.cmd);
        STORE_REL(&percpu[cpu].ack, s);
        if (cmd != CMD_DIRTY)
            continue;
        run_init(&r, cpu);
        while (LOAD_ACQ(&work.seq) == s) {
            uint32_t ms = run_step(&r, 4096, s);
            if (ms == STEP_NO_WORK)
                idle_ms(50);
            else if (ms)
                idle_ms(ms < 50 ? ms : 50);
        }
    }
}

static void post(uint32_t cmd)
{
    STORE_REL(&work.cmd, cmd);
    STORE_REL(&work.seq, work.seq + 1);
    wake_all();
}

void dirty_stop(void)
{
    post(CMD_IDLE);
    uint32_t s = work.seq;
    percpu[0].ack = s;
    for (uint32_t spins = 0;; spins++) {
        uint32_t k;
        for (k = 1; k < ncpus; k++)
            if (LOAD_ACQ(&percpu[k].ack) != s)
                break;
        if (k == ncpus)
            break;
        if (spins < 2000)
            cpu_relax();
        else
            idle_ms(1);
    }
    bsp_on = 0;
}

void dirty_start(uint64_t pages, uint64_t rate)
{
    if (bsp_on)
        dirty_stop();
    memset(gen_table, 0, pages * sizeof(gen_table[0]));
    work.base = DIRTY_BASE;
    work.pages = pages;
    work.rate = rate;
    work.gen_base = dirty_max_gen();
    last_pages = pages;
    ever = 1;
    post(CMD_DIRTY);
    bsp_seq = work.seq;
    percpu[0].ack = bsp_seq;
    run_init(&bsp_run, 0);
    bsp_on = 1;
}

int dirty_running(void) { return bsp_on; }

int dirty_bsp_step(void)
{
    uint32_t ms = run_step(&bsp_run, 64, bsp_seq);
    if (ms == 0)
        return 0;
    idle_ms(ms == STEP_NO_WORK || ms > 100 ? 100 : ms);
    return 1;
}

uint32_t dirty_max_gen(void)
{
    uint32_t g = 0;
    for (uint32_t k = 0; k < MAX_CPUS; k++) {
        uint32_t x = LOAD_ACQ(&percpu[k].gen);
        if (x > g)
            g = x;
    }
    return g;
}

/* The slowest vCPU's generation: every page of the area holds at least this one once it is
 * above the generation the run started from. */
uint32_t dirty_min_gen(void)
{
    uint32_t g = LOAD_ACQ(&percpu[0].gen);
    for (uint32_t k = 1; k < ncpus && k < MAX_CPUS; k++) {
        uint32_t x = LOAD_ACQ(&percpu[k].gen);
        if (x < g)
            g = x;
    }
    return g;
}

int dirty_verify(uint64_t *checked, uint64_t *page, uint64_t *want, uint64_t *got, int *why)
{
    if (bsp_on)
        dirty_stop();
    *checked = 0;
    if (!ever)
        return 0;
    for (uint64_t i = 0; i < last_pages; i++) {
        uint32_t g = gen_table[i];
        if (!g)
            continue;
        const volatile uint64_t *p = (const volatile uint64_t *)(DIRTY_BASE + (i << 12));
        int bad = -1;
        if (p[1] != g)
            bad = 0;
        else if (p[0] != i)
            bad = 1;
        else if (pattern_checksum((const uint64_t *)p, 512) != p[2])
            bad = 2;
        if (bad >= 0) {
            *page = i;
            *want = g;
            *got = p[1];
            *why = bad;
            return 1;
        }
        (*checked)++;
    }
    return 0;
}
