#include "engine.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define RELAXED_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define RELAXED_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)

/* Chains taken before the batch is published and the device's I/O submitted:
 * bounds the latency a long burst adds to its first requests. */
#define BATCH_MAX 64
#define NO_CHANGE (-2)

uint64_t vd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vd_stat_add(uint64_t *counter, uint64_t n)
{
    /* Single writer (the worker): a plain add published with a relaxed store. */
    RELAXED_STORE(counter, *counter + n);
}

struct vd_engine *vd_engine_alloc(const struct vd_engine_ops *ops, void *dev)
{
    struct vd_engine *e = calloc(1, sizeof *e);
    if (e == NULL)
        return NULL;
    e->ops = ops;
    e->dev = dev;
    e->kick_fd = e->call_fd = e->ctl_fd = -1;
    e->new_kick_fd = e->new_call_fd = NO_CHANGE;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    vd_hist_init(&e->hist);
    return e;
}

void vd_engine_complete(struct vd_engine *e, uint16_t head, uint32_t used_len, uint64_t t_pop_ns)
{
    if (e->wlog != NULL && head < e->vr.size && e->wlog[head] != NULL) {
        /* Migration: the pages the device wrote are dirty (logged after the
         * writes, before the used entry that hands them to the driver). */
        vd_vring_log_bufs(&e->vr, e->wlog[head], e->nwlog[head]);
        free(e->wlog[head]);
        e->wlog[head] = NULL;
    }
    vd_vring_push(&e->vr, head, used_len);
    if (t_pop_ns)
        vd_hist_record(&e->hist, vd_now_ns() - t_pop_ns);
    e->inflight--;
    vd_stat_add(&e->stats.requests, 1);
    RELAXED_STORE(&e->stats.inflight, e->inflight);
}

static void wake(struct vd_engine *e)
{
    uint64_t one = 1;
    ssize_t r = write(e->ctl_fd, &one, sizeof one);
    (void)r;   /* a saturated counter already means "wake up" */
}

/* Publish what was completed and interrupt the driver once if it wants it. */
static void flush(struct vd_engine *e)
{
    if (e->vr.shadow_used == e->vr.next_used)
        return;
    vd_vring_publish(&e->vr);
    vd_stat_add(&e->stats.batches, 1);
    if (vd_vring_need_notify(&e->vr)) {
        if (e->call_fd >= 0) {
            uint64_t one = 1;
            ssize_t r = write(e->call_fd, &one, sizeof one);
            (void)r;   /* EAGAIN: an interrupt is pending anyway */
        }
        vd_stat_add(&e->stats.calls, 1);
    } else {
        vd_stat_add(&e->stats.calls_suppressed, 1);
    }
}

static int reap(struct vd_engine *e)
{
    return e->ops->reap ? e->ops->reap(e) : 0;
}

static int event_fd(struct vd_engine *e)
{
    return e->ops->event_fd ? e->ops->event_fd(e) : -1;
}

static int parked(struct vd_engine *e)
{
    return e->ops->parked ? e->ops->parked(e) : 0;
}

/* Take every available chain with notifications suppressed; returns how many. */
static int drain(struct vd_engine *e)
{
    int taken = 0;
    vd_vring_disable_notify(&e->vr);
    for (;;) {
        if (RELAXED_LOAD(&e->want) != VD_WANT_RUN)
            break;
        int rc = vd_vring_pop(&e->vr, &e->chain);
        if (rc == 0)
            break;
        if (rc < 0 && e->chain.err == 0) {
            RELAXED_STORE(&e->stats.broken, (uint64_t)-rc);
            break;
        }
        e->inflight++;
        taken++;
        if (e->wlog != NULL && e->vr.log != NULL && e->chain.nwrite > 0) {
            size_t bytes = sizeof(struct vd_buf) * e->chain.nwrite;
            struct vd_buf *copy = malloc(bytes);
            if (copy != NULL) {
                memcpy(copy, e->chain.bufs + e->chain.nread, bytes);
                free(e->wlog[e->chain.head]);
                e->wlog[e->chain.head] = copy;
                e->nwlog[e->chain.head] = e->chain.nwrite;
            }
        }
        if (rc < 0) {
            uint32_t len = e->ops->bad_chain(e, &e->chain);
            vd_stat_add(&e->stats.bad_chains, 1);
            vd_engine_complete(e, e->chain.head, len, 0);
        } else {
            e->ops->handle(e, &e->chain);
        }
        if (taken % BATCH_MAX == 0) {
            if (e->ops->submit)
                e->ops->submit(e);
            reap(e);
        }
        /* Publish what completed now, not at the end of the drain: a driver
         * waiting for its first completion (used_event) is woken while we
         * go on, refills the ring meanwhile and this loop takes the new
         * chains without a kick or a sleep on either side (the overlap
         * QEMU's per-request vu_queue_notify gets).  Publishing is one
         * release store; the call is still written only when the driver's
         * used_event / NO_INTERRUPT asks for it (§2.7.10). */
        flush(e);
    }
    RELAXED_STORE(&e->stats.inflight, e->inflight);
    if (e->ops->submit)
        e->ops->submit(e);
    return taken;
}

static void read_counter(int fd, uint64_t *sum)
{
    uint64_t v;
    if (fd >= 0 && read(fd, &v, sizeof v) == (ssize_t)sizeof v && sum != NULL)
        vd_stat_add(sum, v);
}

/* Reset the eventfds the last wake-up found readable.  Not done on waking:
 * the kick's read() would then sit between the driver's kick and our first
 * look at the ring, on every request's path at queue depth 1.  Each counter
 * is read after the work it announced was looked at and before the look
 * that precedes the next sleep: the control eventfd before take_requests(),
 * the completion eventfd before reap(), the kick before
 * vd_vring_enable_notify()'s last look at the ring.  Whatever arrives after
 * the read leaves the counter set, so the next poll() returns at once and
 * nothing is lost. */
static void settle_ctl(struct vd_engine *e)
{
    if (e->woke_ctl)
        read_counter(e->ctl_fd, NULL);
    e->woke_ctl = false;
}

static void settle_event(struct vd_engine *e)
{
    if (e->woke_event)
        read_counter(event_fd(e), NULL);
    e->woke_event = false;
}

static void settle_kick(struct vd_engine *e)
{
    if (e->woke_kick)
        read_counter(e->kick_fd, &e->stats.kicks);
    e->woke_kick = false;
}

/* Sleep until a kick, a control request or a completion (or `timeout_ms`);
 * the counters of what woke us are read later (settle_*). */
static void sleep_for_work(struct vd_engine *e, bool kicks, int timeout_ms)
{
    struct pollfd p[3];
    int n = 0, ik = -1, ie = -1;
    p[n].fd = e->ctl_fd;
    p[n++].events = POLLIN;
    if (kicks && e->kick_fd >= 0) {
        ik = n;
        p[n].fd = e->kick_fd;
        p[n++].events = POLLIN;
    }
    int efd = event_fd(e);
    if (efd >= 0) {
        ie = n;
        p[n].fd = efd;
        p[n++].events = POLLIN;
    }
    int r = poll(p, (nfds_t)n, timeout_ms);
    if (r <= 0)
        return;
    vd_stat_add(&e->stats.wakeups, 1);
    e->woke_ctl = p[0].revents != 0;
    e->woke_kick = ik >= 0 && p[ik].revents;
    e->woke_event = ie >= 0 && p[ie].revents;
}

/* Apply fd changes asked for by Python; returns the wanted state. */
static int take_requests(struct vd_engine *e)
{
    pthread_mutex_lock(&e->lock);
    if (e->new_call_fd != NO_CHANGE) {
        if (e->call_fd >= 0)
            close(e->call_fd);
        e->call_fd = e->new_call_fd;
        e->new_call_fd = NO_CHANGE;
    }
    if (e->new_kick_fd != NO_CHANGE) {
        if (e->kick_fd >= 0)
            close(e->kick_fd);
        e->kick_fd = e->new_kick_fd;
        e->new_kick_fd = NO_CHANGE;
    }
    int want = e->want;
    if (want == VD_WANT_RUN && e->state != VD_STATE_RUNNING) {
        e->state = VD_STATE_RUNNING;
        pthread_cond_broadcast(&e->cond);
    }
    pthread_mutex_unlock(&e->lock);
    return want;
}

static void *worker(void *arg)
{
    struct vd_engine *e = arg;
    for (;;) {
        settle_ctl(e);
        int want = take_requests(e);
        if (want != VD_WANT_RUN) {
            /* Hold or stop: take nothing new, finish what is in flight. */
            settle_kick(e);
            settle_event(e);
            reap(e);
            flush(e);
            int pk = parked(e);
            if (pk && e->ops->handle_parked) {
                e->ops->handle_parked(e);
                flush(e);
            }
            if (e->inflight > 0) {
                sleep_for_work(e, false, pk ? pk : -1);
                continue;
            }
            pthread_mutex_lock(&e->lock);
            if (e->want == VD_WANT_STOP) {
                e->state = VD_STATE_STOPPED;
                pthread_cond_broadcast(&e->cond);
                pthread_mutex_unlock(&e->lock);
                return NULL;
            }
            if (e->want == VD_WANT_HOLD) {
                e->state = VD_STATE_HELD;
                pthread_cond_broadcast(&e->cond);
                while (e->want == VD_WANT_HOLD && e->new_call_fd == NO_CHANGE
                       && e->new_kick_fd == NO_CHANGE)
                    pthread_cond_wait(&e->cond, &e->lock);
            }
            pthread_mutex_unlock(&e->lock);
            continue;
        }

        if (e->vr.broken) {
            /* Nothing valid can be taken any more; finish, then wait for control. */
            settle_kick(e);
            settle_event(e);
            reap(e);
            flush(e);
            sleep_for_work(e, false, -1);
            continue;
        }

        int taken = drain(e);
        settle_event(e);
        reap(e);
        if (parked(e) && e->ops->handle_parked)
            e->ops->handle_parked(e);
        flush(e);
        settle_kick(e);
        uint64_t poll_max = (uint64_t)RELAXED_LOAD(&e->poll_us) * 1000u;
        if (vd_pollwin_note(&e->poll, taken, poll_max))
            RELAXED_STORE(&e->stats.poll_ns, e->poll.ns);
        if (taken > 0)
            continue;

        uint64_t deadline = vd_pollwin_deadline(&e->poll, poll_max);
        if (deadline != 0) {
            /* Busy-poll with kicks still suppressed: a request arriving now is
             * taken without a kick or a wake-up. */
            bool found = false;
            while (vd_now_ns() < deadline && RELAXED_LOAD(&e->want) == VD_WANT_RUN) {
                if (vd_vring_pending(&e->vr) != 0) {
                    found = true;
                    break;
                }
                if (e->inflight > 0 && reap(e) > 0)
                    flush(e);
                __builtin_ia32_pause();
            }
            if (found) {
                vd_stat_add(&e->stats.polled, 1);
                continue;
            }
        }

        /* §2.7.10: re-enable kicks, then look once more before sleeping. */
        if (vd_vring_enable_notify(&e->vr) != 0)
            continue;
        int pk = parked(e);
        sleep_for_work(e, true, pk ? pk : -1);
    }
}

int vd_engine_start(struct vd_engine *e, const struct vd_mem *mem, uint16_t size, uint16_t index,
                    uint64_t desc, uint64_t avail, uint64_t used, uint16_t next_avail,
                    uint16_t next_used, bool event_idx, bool indirect, int kick_fd, int call_fd,
                    uint32_t poll_us)
{
    int rc = vd_vring_init(&e->vr, mem, size, index, desc, avail, used, next_avail, next_used,
                           event_idx, indirect);
    if (rc)
        return rc;
    e->chain.bufs = calloc(vd_chain_cap(size), sizeof *e->chain.bufs);
    if (e->chain.bufs == NULL)
        return -ENOMEM;
    e->chain.cap = vd_chain_cap(size);
    e->ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->ctl_fd < 0)
        return -errno;
    e->kick_fd = kick_fd;
    e->call_fd = call_fd;
    e->poll_us = poll_us;
    e->want = VD_WANT_HOLD;
    e->state = VD_STATE_NEW;
    rc = pthread_create(&e->thread, NULL, worker, e);
    if (rc) {
        e->kick_fd = e->call_fd = -1;   /* still the caller's */
        return -rc;
    }
    e->thread_started = true;
    return 0;
}

static void set_want(struct vd_engine *e, int want)
{
    pthread_mutex_lock(&e->lock);
    if (e->want != VD_WANT_STOP)
        e->want = want;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    wake(e);
}

void vd_engine_run(struct vd_engine *e) { set_want(e, VD_WANT_RUN); }
void vd_engine_hold(struct vd_engine *e) { set_want(e, VD_WANT_HOLD); }

int vd_engine_wait_idle(struct vd_engine *e, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    if (timeout_ms >= 0) {
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    int rc = 0;
    pthread_mutex_lock(&e->lock);
    while (e->thread_started && e->state != VD_STATE_HELD && e->state != VD_STATE_STOPPED) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&e->cond, &e->lock);
        } else if (pthread_cond_timedwait(&e->cond, &e->lock, &until) == ETIMEDOUT) {
            rc = -1;
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int vd_engine_set_mem(struct vd_engine *e, const struct vd_mem *mem)
{
    pthread_mutex_lock(&e->lock);
    /* The worker is held and idle (or stopped): it does not touch the ring. */
    int rc = vd_vring_set_mem(&e->vr, mem);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

static void replace_fd(struct vd_engine *e, int *pending, int fd)
{
    pthread_mutex_lock(&e->lock);
    if (*pending != NO_CHANGE && *pending >= 0)
        close(*pending);
    *pending = fd;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    wake(e);
}

void vd_engine_set_call(struct vd_engine *e, int fd) { replace_fd(e, &e->new_call_fd, fd); }
void vd_engine_set_kick(struct vd_engine *e, int fd) { replace_fd(e, &e->new_kick_fd, fd); }

void vd_engine_set_poll(struct vd_engine *e, uint32_t poll_us)
{
    RELAXED_STORE(&e->poll_us, poll_us);
}

int vd_engine_set_log(struct vd_engine *e, const struct vd_log *log, bool log_used,
                      uint64_t log_used_gpa)
{
    pthread_mutex_lock(&e->lock);
    int rc = 0;
    if (log != NULL && e->wlog == NULL) {
        e->wlog = calloc(e->vr.size, sizeof *e->wlog);
        e->nwlog = calloc(e->vr.size, sizeof *e->nwlog);
        if (e->wlog == NULL || e->nwlog == NULL) {
            free(e->wlog);
            free(e->nwlog);
            e->wlog = NULL;
            e->nwlog = NULL;
            rc = -ENOMEM;
        }
    }
    if (rc == 0)
        vd_vring_set_log(&e->vr, log, log_used, log_used_gpa);
    pthread_mutex_unlock(&e->lock);
    return rc;
}

int vd_engine_set_inflight(struct vd_engine *e, struct vd_inflight_region *region)
{
    pthread_mutex_lock(&e->lock);
    int n = vd_vring_set_inflight(&e->vr, region);
    pthread_mutex_unlock(&e->lock);
    return n;
}

uint16_t vd_engine_stop(struct vd_engine *e, uint16_t *next_used)
{
    if (e->thread_started) {
        set_want(e, VD_WANT_STOP);
        pthread_join(e->thread, NULL);
        e->thread_started = false;
        /* Changes asked for after the worker's last look are applied here. */
        take_requests(e);
    }
    if (next_used != NULL)
        *next_used = e->vr.next_used;
    return e->vr.next_avail;
}

void vd_engine_free(struct vd_engine *e)
{
    if (e == NULL)
        return;
    vd_engine_stop(e, NULL);
    if (e->ops->destroy)
        e->ops->destroy(e);
    int fds[] = { e->kick_fd, e->call_fd, e->ctl_fd };
    for (unsigned i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (e->new_kick_fd >= 0)
        close(e->new_kick_fd);
    if (e->new_call_fd >= 0)
        close(e->new_call_fd);
    free(e->chain.bufs);
    if (e->wlog != NULL)
        for (uint16_t i = 0; i < e->vr.size; i++)
            free(e->wlog[i]);
    free(e->wlog);
    free(e->nwlog);
    vd_vring_fini(&e->vr);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->cond);
    free(e);
}

void vd_engine_stats(const struct vd_engine *e, struct vd_engine_stats *out)
{
    const uint64_t *src = (const uint64_t *)&e->stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        dst[i] = RELAXED_LOAD(&src[i]);
}

void vd_engine_hist(const struct vd_engine *e, struct vd_hist *out)
{
    vd_hist_snapshot(&e->hist, out);
}
