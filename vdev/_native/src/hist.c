#include "hist.h"

#include <string.h>

_Static_assert(VD_HIST_BUCKETS == 5248, "hist.cdef hard-codes the bucket count");

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

void vd_hist_init(struct vd_hist *h)
{
    memset(h, 0, sizeof *h);
    h->min_ns = UINT64_MAX;
}

uint32_t vd_hist_index(uint64_t ns)
{
    if (ns < VD_HIST_SUB)
        return (uint32_t)ns;
    unsigned msb = 63u - (unsigned)__builtin_clzll(ns);
    unsigned octave = msb - VD_HIST_SUB_BITS + 1;
    if (octave > VD_HIST_OCTAVES)
        return VD_HIST_BUCKETS - 1;
    uint32_t sub = (uint32_t)(ns >> (msb - VD_HIST_SUB_BITS)) - VD_HIST_SUB;
    return octave * VD_HIST_SUB + sub;
}

uint64_t vd_hist_lower(uint32_t index)
{
    uint32_t octave = index / VD_HIST_SUB, sub = index % VD_HIST_SUB;
    if (octave == 0)
        return sub;
    return (uint64_t)(VD_HIST_SUB + sub) << (octave - 1);
}

uint64_t vd_hist_upper(uint32_t index)
{
    uint32_t octave = index / VD_HIST_SUB;
    return vd_hist_lower(index) + (octave == 0 ? 0 : ((uint64_t)1 << (octave - 1)) - 1);
}

void vd_hist_record(struct vd_hist *h, uint64_t ns)
{
    uint32_t i = vd_hist_index(ns);
    /* Single writer: a plain read-modify-write, published with relaxed stores. */
    STORE(&h->count[i], h->count[i] + 1);
    STORE(&h->total, h->total + 1);
    STORE(&h->sum_ns, h->sum_ns + ns);
    if (ns < h->min_ns)
        STORE(&h->min_ns, ns);
    if (ns > h->max_ns)
        STORE(&h->max_ns, ns);
}

void vd_hist_snapshot(const struct vd_hist *h, struct vd_hist *out)
{
    out->total = LOAD(&h->total);
    for (uint32_t i = 0; i < VD_HIST_BUCKETS; i++)
        out->count[i] = LOAD(&h->count[i]);
    out->sum_ns = LOAD(&h->sum_ns);
    out->min_ns = LOAD(&h->min_ns);
    out->max_ns = LOAD(&h->max_ns);
}

uint64_t vd_hist_quantile(const struct vd_hist *h, double q)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < VD_HIST_BUCKETS; i++)
        n += h->count[i];
    if (n == 0)
        return 0;
    if (q <= 0)
        return h->min_ns;
    /* The smallest bucket whose cumulative count reaches ceil(q * n). */
    uint64_t want = (uint64_t)(q * (double)n);
    if ((double)want < q * (double)n)
        want++;
    if (want == 0)
        want = 1;
    uint64_t seen = 0;
    for (uint32_t i = 0; i < VD_HIST_BUCKETS; i++) {
        seen += h->count[i];
        if (seen >= want) {
            uint64_t v = vd_hist_upper(i);
            return v > h->max_ns ? h->max_ns : v;
        }
    }
    return h->max_ns;
}
