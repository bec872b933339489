/* The virtio-blk driver of `vdev bench blk`: see driver.h for the contract. */
#include "driver.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Split virtqueue layout (virtio 1.2 §2.7.5, §2.7.6, §2.7.8), addressed by
 * offsets so that every field is reached with its own width:
 *   desc[i]:  u64 addr, u32 len, u16 flags, u16 next        (16 bytes each)
 *   avail:    u16 flags, u16 idx, u16 ring[size], u16 used_event
 *   used:     u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define SECTOR 512
/* Written into the status byte before a request is published, so a back end
 * that never writes it is caught (no virtio status has this value). */
#define STATUS_POISON 0xff
/* Verify reads land in a buffer filled with this first, so a back end that
 * writes nothing cannot pass off the buffer's previous contents. */
#define DATA_POISON 0xa5

#define LD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define LD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define ST_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FULL_BARRIER() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* How long one poll() may sleep, so `stop` and the deadlines are seen. */
#define POLL_SLICE_MS 50

struct ring {
    uint16_t size;
    uint8_t *desc;
    uint16_t *avail_flags, *avail_idx, *avail_ring, *used_event;
    uint16_t *used_flags, *used_idx, *avail_event;
    uint32_t *used_elems;          /* id, len, id, len, ... */
};

struct slot_state {
    uint64_t t_pub;                /* when its avail entry was published */
    uint64_t block;                /* relative to first_block */
    uint32_t seq;                  /* verify: the write's sequence number */
    uint8_t op;                    /* BLK_T_IN / BLK_T_OUT */
    uint8_t data_flags_op;         /* the op the data descriptor's flags are set for */
    bool inflight;
    bool readback;                 /* verify: next request reads back `block` */
};

static inline uint64_t clock_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* virtio 1.2 §2.7.10 (and Linux's vring_need_event): notify when event_idx
 * lies in [old, new). */
static inline bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* ---- verify pattern ---------------------------------------------------------------- */

#define STAMP_MAGIC 0x48434E4256454456ull   /* "VDEVBNCH" */
#define STAMP_WORDS 3                        /* magic, sector, (seq << 16 | queue) */

static uint64_t pattern_key(uint16_t queue, uint64_t sector, uint32_t seq)
{
    uint64_t s = sector ^ ((uint64_t)seq << 32) ^ ((uint64_t)queue << 16);
    uint64_t k = splitmix64(&s);
    return k ? k : 1;
}

static inline uint64_t xorshift64(uint64_t x)
{
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

void vd_drv_fill_pattern(uint8_t *buf, uint32_t bs, uint16_t queue, uint64_t sector, uint32_t seq)
{
    uint64_t w[STAMP_WORDS] = {STAMP_MAGIC, sector, ((uint64_t)seq << 16) | queue};
    memcpy(buf, w, sizeof w);
    uint64_t x = pattern_key(queue, sector, seq);
    for (uint32_t off = sizeof w; off + 8 <= bs; off += 8) {
        x = xorshift64(x);
        memcpy(buf + off, &x, 8);
    }
}

/* 0 when buf holds (queue, sector, seq)'s pattern; else the first differing
 * byte + 1 in *offset, and the seq of the stamp found (0: not ours). */
static int check_pattern(const uint8_t *buf, uint32_t bs, uint16_t queue, uint64_t sector,
                         uint32_t seq, uint32_t *offset, uint32_t *found_seq)
{
    uint64_t w[STAMP_WORDS];
    memcpy(w, buf, sizeof w);
    *found_seq = (w[0] == STAMP_MAGIC && w[1] == sector && (uint16_t)w[2] == queue)
                 ? (uint32_t)(w[2] >> 16) : 0;
    uint64_t want[STAMP_WORDS] = {STAMP_MAGIC, sector, ((uint64_t)seq << 16) | queue};
    for (uint32_t i = 0; i < STAMP_WORDS; i++) {
        if (w[i] != want[i]) {
            *offset = i * 8;
            return 1;
        }
    }
    uint64_t x = pattern_key(queue, sector, seq);
    for (uint32_t off = sizeof w; off + 8 <= bs; off += 8) {
        uint64_t got;
        x = xorshift64(x);
        memcpy(&got, buf + off, 8);
        if (got != x) {
            *offset = off;
            return 1;
        }
    }
    return 0;
}

/* ---- histogram helpers -------------------------------------------------------------- */

uint64_t vd_drv_hist_delta(const struct vd_hist *live, struct vd_hist *prev, struct vd_hist *delta)
{
    uint64_t total = 0;
    int32_t lo = -1, hi = -1;
    for (uint32_t i = 0; i < VD_HIST_BUCKETS; i++) {
        uint64_t now = LD(&live->count[i]);
        uint64_t d = now - prev->count[i];
        prev->count[i] = now;
        delta->count[i] = d;
        if (d) {
            total += d;
            if (lo < 0)
                lo = (int32_t)i;
            hi = (int32_t)i;
        }
    }
    uint64_t sum = LD(&live->sum_ns);
    delta->sum_ns = sum - prev->sum_ns;
    prev->sum_ns = sum;
    delta->total = total;
    prev->total += total;
    if (total) {
        uint64_t live_max = LD(&live->max_ns), live_min = LD(&live->min_ns);
        uint64_t top = vd_hist_upper((uint32_t)hi), bottom = vd_hist_lower((uint32_t)lo);
        delta->max_ns = top < live_max ? top : live_max;
        delta->min_ns = bottom > live_min ? bottom : live_min;
    } else {
        delta->max_ns = 0;
        delta->min_ns = 0;
    }
    return total;
}

void vd_drv_hist_add(struct vd_hist *dst, const struct vd_hist *src)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < VD_HIST_BUCKETS; i++) {
        dst->count[i] += src->count[i];
        total += src->count[i];
    }
    if (!total)
        return;
    if (dst->total == 0 || src->min_ns < dst->min_ns)
        dst->min_ns = src->min_ns;
    if (src->max_ns > dst->max_ns)
        dst->max_ns = src->max_ns;
    dst->total += total;
    dst->sum_ns += src->sum_ns;
}

uint32_t vd_drv_hist_nonzero(const struct vd_hist *h, uint32_t *index, uint64_t *count, uint32_t max)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < VD_HIST_BUCKETS && n < max; i++) {
        uint64_t c = LD(&h->count[i]);
        if (c) {
            index[n] = i;
            count[n] = c;
            n++;
        }
    }
    return n;
}

/* ---- the driver ---------------------------------------------------------------------- */

void vd_drv_stop(struct vd_drv_queue *q) { ST(&q->stop, 1); }

void vd_drv_stats_read(const struct vd_drv_queue *q, struct vd_drv_stats *out)
{
    const struct vd_drv_stats *s = &q->stats;
    out->submitted = LD(&s->submitted);
    out->completed = LD(&s->completed);
    out->requests = LD(&s->requests);
    out->reads = LD(&s->reads);
    out->writes = LD(&s->writes);
    out->bytes = LD(&s->bytes);
    out->kicks = LD(&s->kicks);
    out->wakeups = LD(&s->wakeups);
    out->verified = LD(&s->verified);
    out->cpu_ns = LD(&s->cpu_ns);
    out->window_end = LD(&s->window_end);
    out->avail_idx = LD(&s->avail_idx);
    out->used_idx = LD(&s->used_idx);
}

struct run {
    struct vd_drv_queue *q;
    struct ring r;
    struct slot_state *st;
    uint8_t *busy;                 /* verify: a request on this block is in flight */
    uint64_t rng;
    uint64_t cursor;               /* sequential workloads: next block */
    uint32_t wseq;                 /* verify: last write sequence number used */
    uint16_t avail_shadow;         /* our avail.idx */
    uint16_t kick_old;             /* avail.idx at the last notification decision */
    uint16_t last_used;
    uint32_t inflight;
    uint32_t sectors_per_block;
    uint16_t *batch;               /* slots to publish */
    uint32_t nbatch;
    uint16_t *done;                /* slots completed in this batch */
    /* the measured window */
    bool in_window, window_done;
    uint64_t cpu0;
    /* local counters, flushed to q->stats after each batch */
    struct vd_drv_stats s;
};

static void flush_stats(struct run *x)
{
    struct vd_drv_stats *o = &x->q->stats;
    ST(&o->submitted, x->s.submitted);
    ST(&o->completed, x->s.completed);
    ST(&o->requests, x->s.requests);
    ST(&o->reads, x->s.reads);
    ST(&o->writes, x->s.writes);
    ST(&o->bytes, x->s.bytes);
    ST(&o->kicks, x->s.kicks);
    ST(&o->wakeups, x->s.wakeups);
    ST(&o->verified, x->s.verified);
    ST(&o->cpu_ns, x->s.cpu_ns);
    ST(&o->window_end, x->s.window_end);
    ST(&o->avail_idx, (uint64_t)x->avail_shadow);
    ST(&o->used_idx, (uint64_t)x->last_used);
}

static void close_window(struct run *x, uint64_t end)
{
    if (x->in_window) {
        x->s.cpu_ns = clock_ns(CLOCK_THREAD_CPUTIME_ID) - x->cpu0;
        x->s.window_end = end;
    }
    x->in_window = false;
    x->window_done = true;
}

static inline void update_window(struct run *x, uint64_t now)
{
    if (x->window_done)
        return;
    if (!x->in_window && now >= x->q->t_measure) {
        x->in_window = true;
        x->cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    }
    if (x->in_window && now >= x->q->t_stop)
        close_window(x, x->q->t_stop);
}

static int fail(struct run *x, int code)
{
    x->q->error.code = code;
    x->q->error.inflight = x->inflight;
    return code;
}

static uint64_t pick_block(struct run *x, bool random)
{
    struct vd_drv_queue *q = x->q;
    uint64_t b;
    if (random) {
        b = splitmix64(&x->rng) % q->nblocks;
    } else {
        b = x->cursor;
    }
    if (x->busy) {
        /* verify: never two requests on one block; nblocks > iodepth, so a
         * free block is always found. */
        while (x->busy[b])
            b = b + 1 == q->nblocks ? 0 : b + 1;
        x->busy[b] = 1;
    }
    if (!random)
        x->cursor = b + 1 == q->nblocks ? 0 : b + 1;
    return b;
}

/* Fill slot s with the next request and put it on the avail ring (not yet
 * published: that is one store of avail.idx for the whole batch). */
static void prepare(struct run *x, uint32_t s)
{
    struct vd_drv_queue *q = x->q;
    struct slot_state *st = &x->st[s];
    struct vd_drv_slot *sl = &q->slots[s];
    uint8_t op;
    uint64_t block;
    if (st->readback) {
        op = BLK_T_IN;
        block = st->block;          /* still marked busy */
        st->readback = false;
    } else {
        switch (q->rw) {
        case VD_DRV_READ: op = BLK_T_IN; block = pick_block(x, false); break;
        case VD_DRV_WRITE: op = BLK_T_OUT; block = pick_block(x, false); break;
        case VD_DRV_RANDREAD: op = BLK_T_IN; block = pick_block(x, true); break;
        case VD_DRV_RANDWRITE: op = BLK_T_OUT; block = pick_block(x, true); break;
        default:
            op = (splitmix64(&x->rng) % 100) < (uint64_t)q->rwmix_read ? BLK_T_IN : BLK_T_OUT;
            block = pick_block(x, true);
            break;
        }
    }
    uint64_t sector = (q->first_block + block) * x->sectors_per_block;
    st->op = op;
    st->block = block;
    if (q->verify) {
        if (op == BLK_T_OUT) {
            st->seq = ++x->wseq;
            vd_drv_fill_pattern(sl->data, q->bs, q->index, sector, st->seq);
        } else {
            memset(sl->data, DATA_POISON, q->bs);
        }
    }
    /* struct virtio_blk_req header (virtio 1.2 §5.2.6): le32 type, le32 reserved, le64 sector */
    uint32_t type = op, reserved = 0;
    memcpy(sl->hdr, &type, 4);
    memcpy(sl->hdr + 4, &reserved, 4);
    memcpy(sl->hdr + 8, &sector, 8);
    ST(sl->status, (uint8_t)STATUS_POISON);
    if (st->data_flags_op != op) {
        /* §2.7.4.2: device-writable buffers for reads, device-readable for writes */
        uint16_t *flags = (uint16_t *)(x->r.desc + 16 * (3 * s + 1) + 12);
        ST(flags, (uint16_t)(DESC_F_NEXT | (op == BLK_T_IN ? DESC_F_WRITE : 0)));
        st->data_flags_op = op;
    }
    st->inflight = true;
    x->inflight++;
    x->s.submitted++;
    /* §2.7.13.2: the head goes into avail.ring[idx % size] */
    ST(&x->r.avail_ring[x->avail_shadow & (x->r.size - 1)], (uint16_t)(3 * s));
    x->avail_shadow++;
    x->batch[x->nbatch++] = (uint16_t)s;
}

/* Publish the batch: one release store of avail.idx (§2.7.13.3), then decide
 * whether the device wants a notification (§2.7.13.4). */
static int publish(struct run *x)
{
    if (!x->nbatch)
        return 0;
    uint64_t t = now_ns();
    for (uint32_t i = 0; i < x->nbatch; i++)
        x->st[x->batch[i]].t_pub = t;
    x->nbatch = 0;
    ST_REL(x->r.avail_idx, x->avail_shadow);
    /* §2.7.13.4: "The driver MUST perform a suitable memory barrier before reading
     * flags or avail_event, to avoid missing a notification." */
    FULL_BARRIER();
    bool kick;
    if (x->q->event_idx)
        kick = need_event(LD(x->r.avail_event), x->avail_shadow, x->kick_old);
    else
        kick = !(LD(x->r.used_flags) & USED_F_NO_NOTIFY);
    x->kick_old = x->avail_shadow;
    if (kick) {
        uint64_t one = 1;
        if (write(x->q->kick_fd, &one, sizeof one) != (ssize_t)sizeof one && errno != EAGAIN) {
            x->q->error.sys_errno = errno;
            return fail(x, VD_DRV_E_SYS);
        }
        if (x->in_window)
            x->s.kicks++;
    }
    return 0;
}

static void set_error_slot(struct run *x, uint32_t head, struct slot_state *st)
{
    struct vd_drv_error *e = &x->q->error;
    e->head = head;
    e->op = st->op;
    e->sector = (x->q->first_block + st->block) * x->sectors_per_block;
}

/* Consume the used entries [last_used, uidx) seen at `now`. */
static int complete(struct run *x, uint16_t uidx, uint64_t now, bool stopping)
{
    struct vd_drv_queue *q = x->q;
    uint16_t n = (uint16_t)(uidx - x->last_used);
    if (n > x->inflight) {
        /* §2.7.8: the device can only return what the driver made available */
        q->error.head = uidx;
        q->error.used_len = n;
        return fail(x, VD_DRV_E_USED_IDX);
    }
    update_window(x, now);
    uint32_t ndone = 0;
    for (uint16_t k = 0; k < n; k++) {
        uint32_t e = x->last_used & (x->r.size - 1);
        uint32_t id = LD(&x->r.used_elems[2 * e]);
        uint32_t len = LD(&x->r.used_elems[2 * e + 1]);
        if (id >= x->r.size || id % 3 != 0 || id / 3 >= q->iodepth) {
            q->error.head = id;
            q->error.used_len = len;
            return fail(x, VD_DRV_E_HEAD);
        }
        uint32_t s = id / 3;
        struct slot_state *st = &x->st[s];
        if (!st->inflight) {
            set_error_slot(x, id, st);
            q->error.used_len = len;
            return fail(x, VD_DRV_E_DUP);
        }
        uint8_t status = LD(q->slots[s].status);
        uint32_t want = st->op == BLK_T_IN ? q->bs + 1 : 1;
        if (status != BLK_S_OK) {
            set_error_slot(x, id, st);
            q->error.status = status;
            q->error.used_len = len;
            q->error.expected_len = want;
            return fail(x, VD_DRV_E_STATUS);
        }
        if (len != want) {
            set_error_slot(x, id, st);
            q->error.status = status;
            q->error.used_len = len;
            q->error.expected_len = want;
            return fail(x, VD_DRV_E_LEN);
        }
        if (q->verify) {
            if (st->op == BLK_T_IN) {
                uint32_t expect = q->shadow[st->block];
                if (expect) {
                    uint64_t sector = (q->first_block + st->block) * x->sectors_per_block;
                    uint32_t off = 0, found = 0;
                    if (check_pattern(q->slots[s].data, q->bs, q->index, sector, expect, &off, &found)) {
                        set_error_slot(x, id, st);
                        q->error.status = status;
                        q->error.expected_seq = expect;
                        q->error.found_seq = found;
                        q->error.offset = off;
                        return fail(x, VD_DRV_E_VERIFY);
                    }
                    if (x->in_window)
                        x->s.verified++;
                }
                x->busy[st->block] = 0;
            } else {
                q->shadow[st->block] = st->seq;
                if (q->rw == VD_DRV_RANDRW)
                    x->busy[st->block] = 0;
                else
                    st->readback = true;     /* write, then read it back */
            }
        }
        st->inflight = false;
        x->inflight--;
        x->last_used++;
        x->s.completed++;
        if (x->in_window) {
            vd_hist_record(&q->hist, now - st->t_pub);
            x->s.requests++;
            x->s.bytes += q->bs;
            if (st->op == BLK_T_IN)
                x->s.reads++;
            else
                x->s.writes++;
        }
        x->done[ndone++] = (uint16_t)s;
    }
    /* Refill only now: a slot posted again inside this loop would let a
     * second used entry for its head in the same batch pass as the new
     * request's completion, though the device cannot have seen that yet. */
    for (uint32_t k = 0; k < ndone; k++) {
        struct slot_state *st = &x->st[x->done[k]];
        if (!stopping) {
            prepare(x, x->done[k]);
        } else if (st->readback) {
            st->readback = false;
            x->busy[st->block] = 0;
        }
    }
    if (q->busy_poll && q->event_idx)
        ST(x->r.used_event, (uint16_t)(x->last_used - 1));   /* keep interrupts off */
    return 0;
}

static int check_params(const struct vd_drv_queue *q)
{
    if (!q->desc || !q->avail || !q->used || !q->slots)
        return 1;
    if (q->size == 0 || (q->size & (q->size - 1)))
        return 1;
    if (q->iodepth == 0 || 3u * q->iodepth > q->size)
        return 1;
    if (q->bs == 0 || q->bs % SECTOR)
        return 1;
    if (q->nblocks == 0 || q->start_block >= q->nblocks)
        return 1;
    if (q->rw < VD_DRV_READ || q->rw > VD_DRV_RANDRW || q->rwmix_read < 0 || q->rwmix_read > 100)
        return 1;
    if (q->verify && (!q->shadow || q->nblocks <= q->iodepth || q->bs < 8 * STAMP_WORDS))
        return 1;
    return 0;
}

static int run_loop(struct run *x)
{
    struct vd_drv_queue *q = x->q;
    struct ring *r = &x->r;
    int rc;

    /* The descriptors of every slot, once: header (readable), data, status (writable). */
    for (uint32_t s = 0; s < q->iodepth; s++) {
        const struct vd_drv_slot *sl = &q->slots[s];
        uint64_t addr[3] = {sl->hdr_gpa, sl->data_gpa, sl->status_gpa};
        uint32_t len[3] = {16, q->bs, 1};
        uint16_t flags[3] = {DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE, DESC_F_WRITE};
        for (uint32_t j = 0; j < 3; j++) {
            uint8_t *d = r->desc + 16 * (3 * s + j);
            ST((uint64_t *)d, addr[j]);
            ST((uint32_t *)(d + 8), len[j]);
            ST((uint16_t *)(d + 12), flags[j]);
            ST((uint16_t *)(d + 14), (uint16_t)(j < 2 ? 3 * s + j + 1 : 0));
        }
        x->st[s].data_flags_op = BLK_T_IN;
    }
    /* Start from where the ring is (a queue may run several times on one connection). */
    x->avail_shadow = LD(r->avail_idx);
    x->kick_old = x->avail_shadow;
    x->last_used = LD_ACQ(r->used_idx);
    if (x->avail_shadow != x->last_used) {
        q->error.head = x->avail_shadow;
        q->error.used_len = x->last_used;
        return fail(x, VD_DRV_E_PARAM);
    }
    /* Interrupts off while we work (§2.7.7); on again only before sleeping. */
    if (q->event_idx)
        ST(r->used_event, (uint16_t)(x->last_used - 1));
    else
        ST(r->avail_flags, (uint16_t)AVAIL_F_NO_INTERRUPT);

    uint64_t now = now_ns();
    update_window(x, now);
    bool stopping = now >= q->t_stop || LD(&q->stop);
    if (!stopping) {
        for (uint32_t s = 0; s < q->iodepth; s++)
            prepare(x, s);
        if ((rc = publish(x)))
            return rc;
    }
    flush_stats(x);
    uint64_t last_progress = now;
    uint32_t spins = 0;
    for (;;) {
        uint16_t uidx = LD_ACQ(r->used_idx);    /* §2.7.14: then read the elements */
        if (uidx != x->last_used) {
            now = now_ns();
            if (!stopping && (now >= q->t_stop || LD(&q->stop)))
                stopping = true;
            if ((rc = complete(x, uidx, now, stopping)))
                return rc;
            if ((rc = publish(x)))
                return rc;
            flush_stats(x);
            last_progress = now;
            spins = 0;
            continue;
        }
        if (q->busy_poll && ++spins & 63) {
            cpu_relax();
            continue;
        }
        now = now_ns();
        update_window(x, now);
        if (!stopping && (now >= q->t_stop || LD(&q->stop)))
            stopping = true;
        if (stopping && x->inflight == 0)
            break;
        if (x->inflight && now - last_progress >= q->stall_ns) {
            /* name the oldest request still waiting */
            uint32_t oldest = 0;
            for (uint32_t s = 0; s < q->iodepth; s++)
                if (x->st[s].inflight && (!x->st[oldest].inflight || x->st[s].t_pub < x->st[oldest].t_pub))
                    oldest = s;
            set_error_slot(x, 3 * oldest, &x->st[oldest]);
            return fail(x, VD_DRV_E_STALL);
        }
        if (q->busy_poll)
            continue;
        /* Ask for an interrupt at the next completion, then look again before
         * sleeping, or one that raced with the store is lost (§2.7.10, §2.7.7.2). */
        if (q->event_idx)
            ST(r->used_event, x->last_used);
        else
            ST(r->avail_flags, (uint16_t)0);
        FULL_BARRIER();
        if (LD_ACQ(r->used_idx) != x->last_used)
            goto disable;
        uint64_t left = q->stall_ns - (now - last_progress);
        if (!stopping && q->t_stop > now && q->t_stop - now < left)
            left = q->t_stop - now;
        int timeout = (int)((left + 999999) / 1000000);
        if (timeout > POLL_SLICE_MS)
            timeout = POLL_SLICE_MS;
        struct pollfd pfd = {.fd = q->call_fd, .events = POLLIN};
        int n = poll(&pfd, 1, timeout);
        if (n < 0 && errno != EINTR) {
            q->error.sys_errno = errno;
            return fail(x, VD_DRV_E_SYS);
        }
        if (n > 0) {
            uint64_t cnt;
            if (read(q->call_fd, &cnt, sizeof cnt) < 0 && errno != EAGAIN) {
                q->error.sys_errno = errno;
                return fail(x, VD_DRV_E_SYS);
            }
            if (x->in_window) {
                x->s.wakeups++;
                ST(&q->stats.wakeups, x->s.wakeups);
            }
        }
    disable:
        if (!q->event_idx)
            ST(r->avail_flags, (uint16_t)AVAIL_F_NO_INTERRUPT);
        /* with EVENT_IDX, used_event stays where it is: no further interrupts
         * until it is moved again */
    }
    return VD_DRV_OK;
}

int vd_drv_run(struct vd_drv_queue *q)
{
    memset(&q->error, 0, sizeof q->error);
    q->error.status = -1;
    if (check_params(q))
        return q->error.code = VD_DRV_E_PARAM;

    struct run x;
    memset(&x, 0, sizeof x);
    x.q = q;
    x.r.size = q->size;
    x.r.desc = q->desc;
    uint16_t *a = q->avail, *u = q->used;
    x.r.avail_flags = &a[0];
    x.r.avail_idx = &a[1];
    x.r.avail_ring = &a[2];
    x.r.used_event = &a[2 + q->size];
    x.r.used_flags = &u[0];
    x.r.used_idx = &u[1];
    x.r.used_elems = (uint32_t *)(u + 2);
    x.r.avail_event = (uint16_t *)((uint8_t *)q->used + 4 + 8 * (size_t)q->size);
    x.rng = q->seed ^ ((uint64_t)q->index << 48);
    x.cursor = q->start_block;
    x.sectors_per_block = q->bs / SECTOR;
    /* Keep the counters of an earlier run on this queue (they only grow). */
    vd_drv_stats_read(q, &x.s);
    x.s.window_end = 0;
    x.s.cpu_ns = 0;
    x.st = calloc(q->iodepth, sizeof *x.st);
    x.batch = calloc(q->iodepth, sizeof *x.batch);
    x.done = calloc(q->iodepth, sizeof *x.done);
    if (q->verify) {
        x.busy = calloc(q->nblocks, 1);
        for (uint64_t b = 0; b < q->nblocks; b++)
            if (q->shadow[b] > x.wseq)
                x.wseq = q->shadow[b];
    }
    int rc;
    if (!x.st || !x.batch || !x.done || (q->verify && !x.busy)) {
        q->error.sys_errno = ENOMEM;
        rc = fail(&x, VD_DRV_E_SYS);
    } else {
        rc = run_loop(&x);
    }
    close_window(&x, now_ns());
    flush_stats(&x);
    free(x.st);
    free(x.batch);
    free(x.done);
    free(x.busy);
    return rc;
}
