/* A virtio-blk *driver* (the guest's side of a split virtqueue): the load
 * generator of `vdev bench blk`.
 *
 * Python does everything per connection (vhost-user handshake, the memfd
 * guest memory, ring and buffer layout) and then calls vd_drv_run() once per
 * queue, from one thread per queue (cffi releases the GIL).  vd_drv_run keeps
 * `iodepth` requests in flight until a deadline, checks every completion, and
 * returns a code (VD_DRV_OK or VD_DRV_E_*) with the details in q->error.
 *
 * The driver must be a *correct* driver, because it is used to find bugs in
 * back ends (virtio 1.2 §2.7.13, §2.7.14, §2.7.7, §2.7.10):
 *   - every ring field is one load or store of its width (C11 atomics);
 *   - avail entries are published with one release store of avail.idx;
 *   - a full barrier separates that store from the load of used.flags /
 *     avail_event that decides whether to kick;
 *   - used.idx is loaded with acquire before the used elements and buffers;
 *   - with EVENT_IDX, used_event is stored before sleeping, then a full
 *     barrier and a re-check of used.idx close the race with the device.
 * Every used element is checked: the head must be one of ours and in flight
 * (each head comes back exactly once), the used length must be data + 1 for
 * a read and 1 for a write, the status byte must be VIRTIO_BLK_S_OK, and the
 * used index may not run ahead of what is in flight.  With `verify`, reads
 * check the data against a per-block shadow of the last write.
 *
 * Statistics are written by the one worker with relaxed atomic stores and
 * may be read at any time with vd_drv_stats_read() and vd_hist_snapshot().
 */
#ifndef VDEV_DRIVER_H
#define VDEV_DRIVER_H

#include <stdint.h>

#include "hist.h"

/* Workloads. */
#define VD_DRV_READ 0        /* sequential reads */
#define VD_DRV_WRITE 1       /* sequential writes */
#define VD_DRV_RANDREAD 2
#define VD_DRV_RANDWRITE 3
#define VD_DRV_RANDRW 4      /* random, `rwmix_read` percent reads */

/* Results of vd_drv_run (q->error.code). */
#define VD_DRV_OK 0
#define VD_DRV_E_STATUS 1    /* status byte != VIRTIO_BLK_S_OK */
#define VD_DRV_E_LEN 2       /* used length != data + 1 (read) or 1 (write) */
#define VD_DRV_E_HEAD 3      /* used id is not the head of one of our chains */
#define VD_DRV_E_DUP 4       /* used id is a head that is not in flight (returned twice) */
#define VD_DRV_E_USED_IDX 5  /* used.idx advanced past the requests in flight */
#define VD_DRV_E_VERIFY 6    /* read data differs from what was last written */
#define VD_DRV_E_STALL 7     /* no completion for stall_ns with requests in flight */
#define VD_DRV_E_SYS 8       /* a system call failed (error.sys_errno) */
#define VD_DRV_E_PARAM 9     /* the queue description is inconsistent */

/* One in-flight request's buffers: guest-physical addresses for the
 * descriptors, host pointers for the driver's own access. */
struct vd_drv_slot {
    uint64_t hdr_gpa;        /* 16-byte struct virtio_blk_req header */
    uint64_t data_gpa;       /* bs bytes */
    uint64_t status_gpa;     /* 1 byte */
    uint8_t *hdr;
    uint8_t *data;
    uint8_t *status;
};

struct vd_drv_stats {
    /* Whole run, warm-up and drain included. */
    uint64_t submitted;
    uint64_t completed;
    /* Inside the measured window [t_measure, t_stop): completions, and the
     * kicks and wake-ups (poll() returns) that happened in it. */
    uint64_t requests;
    uint64_t reads;
    uint64_t writes;
    uint64_t bytes;
    uint64_t kicks;
    uint64_t wakeups;
    uint64_t verified;       /* reads whose data was checked (verify mode), in the window */
    uint64_t cpu_ns;         /* this worker thread's CPU time in the window */
    uint64_t window_end;     /* CLOCK_MONOTONIC ns when the window closed (t_stop, or earlier) */
    uint64_t avail_idx;      /* the driver's avail.idx when it returned */
    uint64_t used_idx;       /* the last used.idx it consumed */
};

struct vd_drv_error {
    int code;
    int sys_errno;
    uint32_t head;           /* the used element's id */
    uint32_t used_len;
    uint32_t expected_len;
    int status;              /* the status byte (-1 if not read) */
    int op;                  /* 0 read, 1 write (VIRTIO_BLK_T_IN / _OUT) */
    uint64_t sector;
    uint32_t expected_seq;   /* verify: the write the block should hold */
    uint32_t found_seq;      /* verify: the write whose stamp was found (0: none) */
    uint32_t offset;         /* verify: first differing byte in the block */
    uint32_t inflight;       /* requests in flight when it stopped */
};

struct vd_drv_queue {
    /* Set by the caller before vd_drv_run. */
    uint16_t index;          /* queue number: reports and verify stamps */
    uint16_t size;           /* ring size (power of 2), >= 3 * iodepth */
    void *desc;              /* host pointers of the three ring parts */
    void *avail;
    void *used;
    int kick_fd;
    int call_fd;
    int event_idx;           /* VIRTIO_F_EVENT_IDX negotiated */
    int busy_poll;           /* spin on used.idx instead of sleeping on call_fd */
    int rw;                  /* VD_DRV_* workload */
    int rwmix_read;          /* randrw: percent of reads */
    uint32_t bs;             /* bytes per request, a multiple of 512 */
    uint32_t iodepth;        /* requests kept in flight, 1..size/3 */
    uint64_t first_block;    /* the blocks (of bs bytes) this queue addresses */
    uint64_t nblocks;
    uint64_t start_block;    /* sequential workloads start here (relative) */
    uint64_t seed;
    int verify;              /* stamp writes, check reads against `shadow` */
    uint32_t *shadow;        /* verify: nblocks entries, last write's seq (0: none) */
    struct vd_drv_slot *slots;   /* iodepth entries */
    uint64_t t_measure;      /* CLOCK_MONOTONIC ns: the measured window */
    uint64_t t_stop;         /* no new requests from here; drain and return */
    uint64_t stall_ns;       /* give up when nothing completes for this long */
    int stop;                /* set (atomically) by another thread to end early */

    /* Written by the worker, readable at any time. */
    struct vd_drv_stats stats;
    struct vd_hist hist;     /* latency of completions inside the window, ns */
    struct vd_drv_error error;
};

/* Run the workload on one queue until t_stop (or `stop`), then drain what
 * is in flight.  Blocks; returns VD_DRV_OK or a VD_DRV_E_* code. */
int vd_drv_run(struct vd_drv_queue *q);

/* Ask a running queue to stop submitting and return (any thread). */
void vd_drv_stop(struct vd_drv_queue *q);

/* A consistent-per-field copy of the live counters (any thread). */
void vd_drv_stats_read(const struct vd_drv_queue *q, struct vd_drv_stats *out);

/* Per-interval histograms without stopping the worker: *delta = snapshot of
 * live minus *prev, then *prev = that snapshot.  delta's min/max are the
 * bounds of its lowest and highest non-empty bucket (max clamped to live's).
 * Returns delta's count. */
uint64_t vd_drv_hist_delta(const struct vd_hist *live, struct vd_hist *prev, struct vd_hist *delta);
/* *dst += *src (counts, total, sum, min, max). */
void vd_drv_hist_add(struct vd_hist *dst, const struct vd_hist *src);
/* The non-empty buckets of h: up to max (index, count) pairs; returns how many. */
uint32_t vd_drv_hist_nonzero(const struct vd_hist *h, uint32_t *index, uint64_t *count, uint32_t max);

/* The verify stamp and pattern of (queue, sector, seq) into a block of bs
 * bytes (exposed so tests can tamper with a disk knowingly). */
void vd_drv_fill_pattern(uint8_t *buf, uint32_t bs, uint16_t queue, uint64_t sector, uint32_t seq);

#endif
