/*
 * pattern.c - the self-checking block format shared by `dirty` (4 KiB pages, 512 words) and the
 * disk commands (512-byte sectors, 64 words):
 *
 *     u64 index, u64 generation, u64 checksum, fill words derived from index and generation
 *
 * The checksum is a Fletcher-style sum of sums over every word but itself: it catches changed,
 * lost and reordered words, so a torn block (halves of two generations) fails it.
 */
#include "guest.h"

#define K1 0x9e3779b97f4a7c15ul
#define K2 0xd6e8feb86659fd93ul
#define CK0 0x6a09e667f3bcc908ul

static inline uint64_t block_seed(uint64_t idx, uint64_t gen)
{
    uint64_t x = idx * K2 ^ (gen + 1) * K1;
    return x ^ (x >> 29);
}

void pattern_fill(uint64_t *p, uint32_t words, uint64_t idx, uint64_t gen)
{
    uint64_t a = CK0, b = 0, w = block_seed(idx, gen);
    a += idx;
    b += a;
    a += gen;
    b += a;
    for (uint32_t j = 3; j < words; j++) {
        w += K1;
        p[j] = w;
        a += w;
        b += a;
    }
    p[0] = idx;
    p[1] = gen;
    p[2] = a ^ (b * K2);
}

uint64_t pattern_checksum(const uint64_t *p, uint32_t words)
{
    uint64_t a = CK0, b = 0;
    a += p[0];
    b += a;
    a += p[1];
    b += a;
    for (uint32_t j = 3; j < words; j++) {
        a += p[j];
        b += a;
    }
    return a ^ (b * K2);
}
