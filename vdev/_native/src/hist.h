/* Log-linear latency histogram, HdrHistogram style, in nanoseconds.
 *
 * 2^VD_HIST_SUB_BITS linear sub-buckets per power of two, so every value is
 * kept with a relative error below 2^-VD_HIST_SUB_BITS (0.8 %), from 1 ns up
 * to about 2^(VD_HIST_OCTAVES + VD_HIST_SUB_BITS - 1) ns (hours).  Values
 * beyond the last bucket land in it.
 *
 * One writer (the worker thread that owns the histogram) records with
 * relaxed atomic stores; any other thread may copy it at any time with
 * vd_hist_snapshot() (relaxed atomic loads, each counter one 64-bit load),
 * without stopping the writer.  A snapshot may be a few records behind and
 * its total may differ from the sum of its buckets by those records; it is
 * never torn within a counter.  Reset is done by the reader keeping a
 * baseline snapshot and subtracting it, so the writer stays lock-free.
 */
#ifndef VDEV_HIST_H
#define VDEV_HIST_H

#include <stdint.h>

#define VD_HIST_SUB_BITS 7
#define VD_HIST_SUB (1u << VD_HIST_SUB_BITS)
#define VD_HIST_OCTAVES 40
#define VD_HIST_BUCKETS ((VD_HIST_OCTAVES + 1) * VD_HIST_SUB)

struct vd_hist {
    uint64_t count[VD_HIST_BUCKETS];
    uint64_t total;
    uint64_t sum_ns;
    uint64_t min_ns;
    uint64_t max_ns;
};

void vd_hist_init(struct vd_hist *h);
void vd_hist_record(struct vd_hist *h, uint64_t ns);
void vd_hist_snapshot(const struct vd_hist *h, struct vd_hist *out);
uint32_t vd_hist_index(uint64_t ns);
uint64_t vd_hist_lower(uint32_t index);
uint64_t vd_hist_upper(uint32_t index);
/* Value at quantile q (0..1) of a snapshot: the upper bound of the bucket
 * holding it, clamped to the recorded maximum. */
uint64_t vd_hist_quantile(const struct vd_hist *h, double q);

#endif
