/* A queue engine: one worker thread serving one started virtqueue.
 *
 * The worker owns the ring while it runs: it sleeps on the kick eventfd (or
 * busy-polls the avail ring after the last request, with notifications
 * suppressed, for an adaptive window of at most poll_us, as QEMU's iothread
 * poll-max-ns with poll-grow/poll-shrink does), pops a
 * batch of chains, hands each to the device (struct vd_engine_ops), reaps
 * what the device finished, publishes the used entries once per batch and
 * writes the call eventfd at most once per batch, when the EVENT_IDX /
 * NO_INTERRUPT rules ask for it.  No Python runs in the worker.
 *
 * Control comes from Python through the functions below; each takes the
 * engine's lock and, where it must, wakes the worker through its control
 * eventfd:
 *
 *   hold      stop taking chains; requests in flight still complete.
 *   run       take chains again.
 *   wait_idle block until held with nothing in flight (the engine design's
 *             quiesce: a storage swap, a memory-table change or
 *             GET_VRING_BASE may then proceed).
 *   set_mem   a new region table (only while idle).
 *   set_call / set_kick  new eventfds (the engine owns the fds it is given
 *             and closes the old ones itself, after it stopped using them).
 *   stop      hold, finish everything in flight, end the thread; returns
 *             the next avail index (what GET_VRING_BASE answers).
 *
 * Counters and the latency histogram (pop to used, ns) are written by the
 * worker alone with relaxed atomic stores and may be copied at any time.
 */
#ifndef VDEV_ENGINE_H
#define VDEV_ENGINE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "hist.h"
#include "pollwin.h"
#include "vring.h"

#define VD_STAT_TYPES 8

struct vd_engine_stats {
    uint64_t requests;              /* chains completed (bad ones included) */
    uint64_t by_type[VD_STAT_TYPES];/* device-defined request kinds */
    uint64_t bytes_read;            /* from the device's storage or wire into guest buffers */
    uint64_t bytes_written;         /* from guest buffers to storage or wire */
    uint64_t errors;                /* completed with an error status */
    uint64_t bad_chains;            /* malformed chains returned to the driver */
    uint64_t kicks;                 /* kick eventfd counts read */
    uint64_t wakeups;               /* times the worker woke from sleep */
    uint64_t calls;                 /* call eventfd writes */
    uint64_t calls_suppressed;      /* batches the driver did not want an interrupt for */
    uint64_t batches;               /* batches published */
    uint64_t polled;                /* batches found by busy-polling, not a kick */
    uint64_t inflight;              /* requests taken and not yet completed (a gauge) */
    uint64_t broken;                /* 0, or the ring error that broke the queue */
    uint64_t poll_ns;               /* the adaptive polling window now (a gauge) */
};

struct vd_engine;

struct vd_engine_ops {
    /* Take one sound chain; return 1 if it completed (the device pushed its
     * used entry with vd_engine_complete), 0 if it is in flight. */
    int (*handle)(struct vd_engine *e, struct vd_chain *c);
    /* A malformed chain (c->err set); return the used length to answer it with. */
    uint32_t (*bad_chain)(struct vd_engine *e, struct vd_chain *c);
    /* Submit what handle() queued. */
    void (*submit)(struct vd_engine *e);
    /* Finish what completed (vd_engine_complete for each); return how many. */
    int (*reap)(struct vd_engine *e);
    /* Readable when reap() has work; -1 if the device completes inline only. */
    int (*event_fd)(struct vd_engine *e);
    /* Work that is neither a kick nor a completion (parked requests): the
     * worker then sleeps at most this many ms before calling handle_parked. */
    int (*parked)(struct vd_engine *e);
    void (*handle_parked)(struct vd_engine *e);
    /* Free the device part. */
    void (*destroy)(struct vd_engine *e);
};

struct vd_engine {
    struct vd_vring vr;
    struct vd_chain chain;
    const struct vd_engine_ops *ops;
    void *dev;

    int kick_fd;
    int call_fd;
    int ctl_fd;
    int new_kick_fd;        /* -2: no change pending */
    int new_call_fd;
    uint32_t poll_us;       /* polling ceiling, set by Python */
    struct vd_pollwin poll; /* worker-owned: the adaptive window, <= poll_us */

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int want;               /* VD_WANT_* (under lock) */
    int state;              /* VD_STATE_* (under lock) */
    uint32_t inflight;      /* worker-owned; mirrored into stats.inflight */
    /* worker-owned: eventfds the last wake-up found readable, not yet read */
    bool woke_ctl, woke_kick, woke_event;

    struct vd_engine_stats stats;
    struct vd_hist hist;

    /* While dirty logging: the writable buffers of each head in flight,
     * logged when it completes (after the device wrote them). */
    struct vd_buf **wlog;
    uint32_t *nwlog;
};

enum { VD_WANT_RUN = 0, VD_WANT_HOLD = 1, VD_WANT_STOP = 2 };
enum { VD_STATE_NEW = 0, VD_STATE_RUNNING = 1, VD_STATE_HELD = 2, VD_STATE_STOPPED = 3 };

/* For devices: complete a request taken at `t_pop_ns` (0: no latency sample). */
void vd_engine_complete(struct vd_engine *e, uint16_t head, uint32_t used_len, uint64_t t_pop_ns);
uint64_t vd_now_ns(void);
void vd_stat_add(uint64_t *counter, uint64_t n);

/* Set up the ring and the thread (held until vd_engine_run); takes ownership
 * of kick_fd and call_fd (-1: none).  Returns 0, a VD_E_* ring error, or
 * -errno. */
int vd_engine_start(struct vd_engine *e, const struct vd_mem *mem, uint16_t size, uint16_t index,
                    uint64_t desc, uint64_t avail, uint64_t used, uint16_t next_avail,
                    uint16_t next_used, bool event_idx, bool indirect, int kick_fd, int call_fd,
                    uint32_t poll_us);
void vd_engine_run(struct vd_engine *e);
void vd_engine_hold(struct vd_engine *e);
/* 0 once held and idle, -1 on timeout (ms; <0 waits for ever). */
int vd_engine_wait_idle(struct vd_engine *e, int timeout_ms);
/* Only while idle: 0 or VD_E_LAYOUT (the rings are not in the new table). */
int vd_engine_set_mem(struct vd_engine *e, const struct vd_mem *mem);
void vd_engine_set_call(struct vd_engine *e, int fd);
void vd_engine_set_kick(struct vd_engine *e, int fd);
void vd_engine_set_poll(struct vd_engine *e, uint32_t poll_us);
/* Only while held and idle: start (log != NULL) or stop dirty logging;
 * 0 or -ENOMEM. */
int vd_engine_set_log(struct vd_engine *e, const struct vd_log *log, bool log_used,
                      uint64_t log_used_gpa);
/* Before the first run (or while idle): attach the queue's in-flight region;
 * returns how many requests will be resubmitted, or -1. */
int vd_engine_set_inflight(struct vd_engine *e, struct vd_inflight_region *region);
/* Finish and end the thread; returns next_avail, *next_used is set. */
uint16_t vd_engine_stop(struct vd_engine *e, uint16_t *next_used);
/* Stop if needed and free everything, device part included. */
void vd_engine_free(struct vd_engine *e);
void vd_engine_stats(const struct vd_engine *e, struct vd_engine_stats *out);
void vd_engine_hist(const struct vd_engine *e, struct vd_hist *out);
/* Allocate an engine for a device; used by the device constructors. */
struct vd_engine *vd_engine_alloc(const struct vd_engine_ops *ops, void *dev);

#endif
