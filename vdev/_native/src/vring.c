#include "vring.h"

#include <stdlib.h>
#include <string.h>

#define LOAD16(p, mo) __atomic_load_n((const uint16_t *)(p), (mo))
#define STORE16(p, v, mo) __atomic_store_n((uint16_t *)(p), (uint16_t)(v), (mo))
#define STORE32(p, v) __atomic_store_n((uint32_t *)(p), (uint32_t)(v), __ATOMIC_RELAXED)
#define FULL_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

#define DESC_SIZE 16u

/* ---- guest memory ---------------------------------------------------------------- */

static const struct vd_region *find_region(const struct vd_mem *m, uint64_t gpa)
{
    /* The last region whose start is <= gpa, if gpa lies inside it. */
    uint32_t lo = 0, hi = m->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct vd_region *r = &m->regions[lo - 1];
    return gpa - r->gpa < r->size ? r : NULL;
}

uint8_t *vd_mem_translate(const struct vd_mem *m, uint64_t gpa, uint64_t len)
{
    const struct vd_region *r = find_region(m, gpa);
    if (r == NULL)
        return NULL;
    uint64_t off = gpa - r->gpa;
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

uint64_t vd_mem_span(const struct vd_mem *m, uint64_t gpa, uint8_t **host)
{
    const struct vd_region *r = find_region(m, gpa);
    if (r == NULL)
        return 0;
    *host = r->host + (gpa - r->gpa);
    return r->size - (gpa - r->gpa);
}

int vd_mem_check(const struct vd_mem *m, uint64_t gpa, uint64_t len)
{
    while (len > 0) {
        const struct vd_region *r = find_region(m, gpa);
        if (r == NULL)
            return -1;
        uint64_t room = r->size - (gpa - r->gpa);
        if (len <= room)
            return 0;
        len -= room;
        gpa += room;           /* cannot wrap: gpa + room is the region's end */
    }
    return 0;
}

/* ---- ring layout ------------------------------------------------------------------ */

static inline uint16_t *avail_flags(const struct vd_vring *vr) { return (uint16_t *)vr->avail; }
static inline uint16_t *avail_idx(const struct vd_vring *vr) { return (uint16_t *)(vr->avail + 2); }
static inline uint16_t *avail_ring(const struct vd_vring *vr, uint16_t i)
{
    return (uint16_t *)(vr->avail + 4 + 2u * (i & (vr->size - 1)));
}
static inline uint16_t *used_event(const struct vd_vring *vr) { return (uint16_t *)(vr->avail + 4 + 2u * vr->size); }
static inline uint16_t *used_flags(const struct vd_vring *vr) { return (uint16_t *)vr->used; }
static inline uint16_t *used_idx(const struct vd_vring *vr) { return (uint16_t *)(vr->used + 2); }
static inline uint8_t *used_elem(const struct vd_vring *vr, uint16_t i)
{
    return vr->used + 4 + 8u * (i & (vr->size - 1));
}
static inline uint16_t *avail_event(const struct vd_vring *vr) { return (uint16_t *)(vr->used + 4 + 8u * vr->size); }

/* ---- dirty logging ---------------------------------------------------------------- */

#define LOG_PAGE_SHIFT 12          /* VHOST_LOG_PAGE: 4 KiB per bit */

void vd_log_write(const struct vd_log *log, uint64_t gpa, uint64_t len)
{
    if (log == NULL || log->base == NULL || len == 0)
        return;
    uint64_t first = gpa >> LOG_PAGE_SHIFT, last = (gpa + len - 1) >> LOG_PAGE_SHIFT;
    if (gpa + len - 1 < gpa)
        last = UINT64_MAX >> LOG_PAGE_SHIFT;
    for (uint64_t page = first; page <= last; page++) {
        if (page / 8 >= log->size)
            break;
        /* The front-end clears bits while we set them: one atomic OR per byte. */
        __atomic_fetch_or(&log->base[page / 8], (uint8_t)(1u << (page % 8)), __ATOMIC_RELEASE);
    }
}

/* A write to the used ring at `offset`: logged when the ring asked for it. */
static inline void log_used(const struct vd_vring *vr, uint64_t offset, uint64_t len)
{
    if (vr->log != NULL && vr->log_used)
        vd_log_write(vr->log, vr->log_used_gpa + offset, len);
}

void vd_vring_set_log(struct vd_vring *vr, const struct vd_log *log, bool log_used_ring,
                      uint64_t log_used_gpa)
{
    vr->log = log;
    vr->log_used = log_used_ring;
    vr->log_used_gpa = log_used_gpa;
}

void vd_vring_log_bufs(struct vd_vring *vr, const struct vd_buf *bufs, uint32_t n)
{
    if (vr->log == NULL)
        return;
    for (uint32_t i = 0; i < n; i++)
        vd_log_write(vr->log, bufs[i].gpa, bufs[i].len);
}

static int translate_rings(struct vd_vring *vr, const struct vd_mem *mem)
{
    uint8_t *d = vd_mem_translate(mem, vr->desc_gpa, (uint64_t)DESC_SIZE * vr->size);
    uint8_t *a = vd_mem_translate(mem, vr->avail_gpa, 6u + 2u * vr->size);
    uint8_t *u = vd_mem_translate(mem, vr->used_gpa, 6u + 8u * vr->size);
    if (d == NULL || a == NULL || u == NULL)
        return VD_E_LAYOUT;
    vr->desc = d;
    vr->avail = a;
    vr->used = u;
    vr->mem = mem;
    return VD_OK;
}

int vd_vring_init(struct vd_vring *vr, const struct vd_mem *mem, uint16_t size, uint16_t index,
                  uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                  uint16_t next_avail, uint16_t next_used, bool event_idx, bool indirect)
{
    memset(vr, 0, sizeof *vr);
    if (size == 0 || (size & (size - 1)))
        return VD_E_LAYOUT;
    vr->size = size;
    vr->index = index;
    vr->desc_gpa = desc_gpa;
    vr->avail_gpa = avail_gpa;
    vr->used_gpa = used_gpa;
    vr->next_avail = next_avail;
    vr->next_used = vr->shadow_used = next_used;
    vr->event_idx = event_idx;
    vr->indirect = indirect;
    return translate_rings(vr, mem);
}

void vd_vring_fini(struct vd_vring *vr)
{
    free(vr->resubmit);
    vr->resubmit = NULL;
    vr->nresubmit = vr->resubmit_pos = 0;
}

int vd_vring_set_mem(struct vd_vring *vr, const struct vd_mem *mem)
{
    return translate_rings(vr, mem);
}

uint16_t vd_vring_avail_idx(const struct vd_vring *vr)
{
    return LOAD16(avail_idx(vr), __ATOMIC_ACQUIRE);
}

uint16_t vd_vring_used_idx(const struct vd_vring *vr)
{
    return LOAD16(used_idx(vr), __ATOMIC_RELAXED);
}

int vd_vring_pending(struct vd_vring *vr)
{
    /* Like the reference, this looks at the index only: a queue broken by a
     * bad head still reports what is pending (pop refuses it). */
    /* §2.7.13.3: read the index before the entries it covers (acquire). */
    uint16_t n = (uint16_t)(vd_vring_avail_idx(vr) - vr->next_avail);
    if (n > vr->size) {
        vr->broken = VD_E_AVAIL_IDX_JUMP;
        vr->broken_value = n;
        return -VD_E_AVAIL_IDX_JUMP;
    }
    return n;
}

/* ---- popping ----------------------------------------------------------------------- */

static int chain_error(struct vd_chain *c, int err, uint64_t gpa, int64_t len)
{
    c->err = err;
    c->err_gpa = gpa;
    c->err_len = len;
    return -err;
}

static int walk(struct vd_vring *vr, struct vd_chain *c)
{
    const struct vd_mem *mem = vr->mem;
    const uint8_t *table = vr->desc;
    uint64_t table_gpa = vr->desc_gpa;
    uint32_t table_len = vr->size, i = c->head, budget = vr->size;
    bool in_indirect = false;
    int deferred = 0;
    uint64_t deferred_gpa = 0;
    int64_t deferred_len = -1;

    for (;;) {
        if (budget == 0)
            return chain_error(c, VD_E_LOOP, table_gpa, -1);
        budget--;
        /* One copy of the descriptor: what we check is what we use. */
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        const uint8_t *d = table + (size_t)DESC_SIZE * i;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);

        if (flags & VD_DESC_F_INDIRECT) {
            /* §2.7.5.3.1 */
            if (in_indirect)
                return chain_error(c, VD_E_NESTED_INDIRECT, addr, -1);
            if (!vr->indirect)
                return chain_error(c, VD_E_INDIRECT_NOT_NEGOTIATED, addr, -1);
            if (flags & VD_DESC_F_NEXT)
                return chain_error(c, VD_E_INDIRECT_WITH_NEXT, addr, -1);
            if (len == 0 || len % DESC_SIZE)
                return chain_error(c, VD_E_INDIRECT_BAD_LENGTH, addr, len);
            if (len / DESC_SIZE > (vr->size > VD_INDIRECT_MAX ? vr->size : VD_INDIRECT_MAX))
                return chain_error(c, VD_E_INDIRECT_TOO_LONG, addr, len);
            const uint8_t *t = vd_mem_translate(mem, addr, len);
            if (t == NULL)
                return chain_error(c, VD_E_INDIRECT_OUTSIDE_MEMORY, addr, len);
            table = t;
            table_gpa = addr;
            table_len = len / DESC_SIZE;
            /* The table's own length bounds its walk (a loop inside it runs
             * out of budget); it is not bounded by the ring size, see
             * VD_INDIRECT_MAX. */
            budget = table_len;
            i = 0;
            in_indirect = true;
            continue;
        }
        /* A bad buffer or a wrong order does not stop the walk: the structure
         * is still sound, so go on to the end (loops are still caught by the
         * budget) to learn whether the last descriptor can take a status. */
        /* One lookup: the host address of a buffer inside one region (the
         * device then uses it without translating again); a buffer crossing
         * into an adjacent region is checked piecewise. */
        uint8_t *host = len > 0 ? vd_mem_translate(mem, addr, len) : NULL;
        bool in_bounds = host != NULL || vd_mem_check(mem, addr, len) == 0;
        if (!in_bounds && !deferred) {
            deferred = VD_E_BUFFER_OUTSIDE_MEMORY;
            deferred_gpa = addr;
            deferred_len = len;
        }
        bool is_write = flags & VD_DESC_F_WRITE;
        struct vd_buf b = { addr, len, flags, host };
        if (is_write) {
            c->bufs[c->nread + c->nwrite++] = b;
            c->write_len += len;
        } else if (c->nwrite) {
            if (!deferred) {
                deferred = VD_E_READABLE_AFTER_WRITABLE;
                deferred_gpa = addr;
                deferred_len = -1;
            }
        } else {
            c->bufs[c->nread++] = b;
            c->read_len += len;
        }
        if (!(flags & VD_DESC_F_NEXT)) {
            if (deferred) {
                if (is_write && in_bounds && len > 0) {
                    c->has_tail = 1;
                    c->tail = b;
                }
                return chain_error(c, deferred, deferred_gpa, deferred_len);
            }
            return 1;
        }
        if (next >= table_len)
            return chain_error(c, VD_E_NEXT_OUT_OF_RANGE, addr, -1);
        i = next;
    }
}

int vd_vring_pop(struct vd_vring *vr, struct vd_chain *c)
{
    c->err = 0;
    c->nread = c->nwrite = 0;
    c->read_len = c->write_len = 0;
    c->has_tail = 0;
    c->err_len = -1;
    if (vr->broken)
        return -vr->broken;
    uint16_t head;
    if (vr->resubmit_pos < vr->nresubmit) {
        /* In flight when the previous back end died: taken again, oldest
         * first, before anything new (still marked in flight). */
        head = vr->resubmit[vr->resubmit_pos++];
    } else {
        int n = vd_vring_pending(vr);
        if (n <= 0)
            return n;
        head = LOAD16(avail_ring(vr, vr->next_avail), __ATOMIC_RELAXED);
        vr->next_avail++;
        if (head >= vr->size) {
            vr->broken = VD_E_HEAD_OUT_OF_RANGE;
            vr->broken_value = head;
            return -VD_E_HEAD_OUT_OF_RANGE;
        }
        if (vr->inflight != NULL) {
            /* The order matters only for a later incarnation reading it. */
            struct vd_inflight_desc *d = &vr->inflight->desc[head];
            __atomic_store_n(&d->counter, vr->inflight_counter++, __ATOMIC_RELAXED);
            __atomic_store_n(&d->inflight, 1, __ATOMIC_RELEASE);
        }
    }
    c->head = head;
    /* The budgets keep a chain within vd_chain_cap(size) buffers, which is
     * the capacity the caller must give. */
    if (c->cap < vd_chain_cap(vr->size))
        return chain_error(c, VD_E_LOOP, vr->desc_gpa, -1);
    return walk(vr, c);
}

/* ---- completing -------------------------------------------------------------------- */

void vd_vring_push(struct vd_vring *vr, uint16_t head, uint32_t len)
{
    uint8_t *e = used_elem(vr, vr->shadow_used);
    STORE32(e, head);
    STORE32(e + 4, len);
    log_used(vr, 4 + 8u * (vr->shadow_used & (vr->size - 1)), 8);
    vr->shadow_used++;
    if (vr->inflight != NULL && head < vr->size) {
        /* Chain the batch through `next`, from last_batch_head, so a crash
         * between publishing used.idx and clearing the marks is settled by
         * the next incarnation (vd_vring_set_inflight). */
        if (vr->batch_len == 0)
            __atomic_store_n(&vr->inflight->last_batch_head, head, __ATOMIC_RELAXED);
        else
            __atomic_store_n(&vr->inflight->desc[vr->batch_tail].next, head, __ATOMIC_RELAXED);
        vr->batch_tail = head;
        vr->batch_len++;
    }
}

/* After used.idx is published: the batch is no longer in flight. */
static void inflight_settle(struct vd_inflight_region *r, uint16_t size, uint16_t head, uint16_t n,
                            uint16_t used)
{
    for (uint16_t i = 0; i < n && head < size; i++) {
        uint16_t next = r->desc[head].next;
        __atomic_store_n(&r->desc[head].inflight, 0, __ATOMIC_RELEASE);
        head = next;
    }
    __atomic_store_n(&r->used_idx, used, __ATOMIC_RELEASE);
}

void vd_vring_publish(struct vd_vring *vr)
{
    uint16_t added = (uint16_t)(vr->shadow_used - vr->next_used);
    if (added == 0)
        return;
    /* §2.7.13.3: the elements are visible before the index (release). */
    STORE16(used_idx(vr), vr->shadow_used, __ATOMIC_RELEASE);
    log_used(vr, 2, 2);
    vr->next_used = vr->shadow_used;
    vr->num_added = (uint16_t)(vr->num_added + added);
    if (vr->inflight != NULL && vr->batch_len) {
        inflight_settle(vr->inflight, vr->size, vr->inflight->last_batch_head, vr->batch_len,
                        vr->next_used);
        vr->batch_len = 0;
    }
}

static int cmp_counter(const void *a, const void *b, void *arg)
{
    const struct vd_inflight_region *r = arg;
    uint64_t ca = r->desc[*(const uint16_t *)a].counter, cb = r->desc[*(const uint16_t *)b].counter;
    return ca < cb ? -1 : ca > cb;
}

int vd_vring_set_inflight(struct vd_vring *vr, struct vd_inflight_region *r)
{
    free(vr->resubmit);
    vr->resubmit = NULL;
    vr->nresubmit = vr->resubmit_pos = 0;
    vr->batch_len = 0;
    vr->inflight = r;
    vr->inflight_counter = 0;
    if (r == NULL)
        return 0;
    uint16_t used = LOAD16(used_idx(vr), __ATOMIC_ACQUIRE);
    if (r->version == 0) {
        /* Fresh (a new region, or the VM was reset): nothing was in flight. */
        memset(r->desc, 0, sizeof r->desc[0] * vr->size);
        r->desc_num = vr->size;
        r->last_batch_head = 0;
        r->used_idx = used;
        __atomic_store_n(&r->version, 1, __ATOMIC_RELEASE);
        return 0;
    }
    if (r->used_idx != used)
        /* Died after publishing a batch, before clearing it. */
        inflight_settle(r, vr->size, r->last_batch_head, (uint16_t)(used - r->used_idx), used);
    uint16_t n = 0;
    uint64_t top = 0;
    vr->resubmit = malloc(sizeof *vr->resubmit * vr->size);
    if (vr->resubmit == NULL)
        return -1;
    for (uint16_t i = 0; i < vr->size; i++)
        if (r->desc[i].inflight == 1) {
            vr->resubmit[n++] = i;
            if (r->desc[i].counter >= top)
                top = r->desc[i].counter + 1;
        }
    qsort_r(vr->resubmit, n, sizeof *vr->resubmit, cmp_counter, r);
    vr->nresubmit = n;
    vr->inflight_counter = top;
    vr->next_used = vr->shadow_used = used;
    vr->next_avail = (uint16_t)(used + n);
    return n;
}

bool vd_vring_need_notify(struct vd_vring *vr)
{
    /* §2.7.10: our used.idx store must be visible before we read the driver's
     * used_event or flags; store->load is the one order x86 does not keep. */
    FULL_FENCE();
    uint16_t added = vr->num_added;
    vr->num_added = 0;
    if (vr->event_idx) {
        uint16_t new_idx = vr->next_used, old = (uint16_t)(new_idx - added);
        uint16_t event = LOAD16(used_event(vr), __ATOMIC_RELAXED);
        /* vring_need_event(): notify if event lies in [old, new). */
        return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
    }
    return !(LOAD16(avail_flags(vr), __ATOMIC_RELAXED) & VD_AVAIL_F_NO_INTERRUPT);
}

void vd_vring_disable_notify(struct vd_vring *vr)
{
    if (!vr->event_idx) {
        uint16_t f = LOAD16(used_flags(vr), __ATOMIC_RELAXED);
        STORE16(used_flags(vr), f | VD_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
        log_used(vr, 0, 2);
    }
}

int vd_vring_enable_notify(struct vd_vring *vr)
{
    if (vr->event_idx) {
        STORE16(avail_event(vr), vr->next_avail, __ATOMIC_RELAXED);
        log_used(vr, 4 + 8u * vr->size, 2);
    } else {
        uint16_t f = LOAD16(used_flags(vr), __ATOMIC_RELAXED);
        STORE16(used_flags(vr), f & ~VD_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
        log_used(vr, 0, 2);
    }
    /* §2.7.10: publish before re-reading avail.idx, or a kick can be missed. */
    FULL_FENCE();
    int n = vd_vring_pending(vr);
    return n < 0 ? n : n > 0;
}

/* ---- buffer copies ------------------------------------------------------------------ */

static uint64_t copy_bufs(const struct vd_mem *m, const struct vd_buf *bufs, uint32_t n,
                          uint64_t skip, uint8_t *flat, uint64_t len, bool to_guest)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        uint64_t gpa = bufs[i].gpa, blen = bufs[i].len;
        if (skip >= blen) {
            skip -= blen;
            continue;
        }
        gpa += skip;
        blen -= skip;
        skip = 0;
        while (blen > 0 && done < len) {
            /* A buffer may cross into an adjacent region: copy it piecewise. */
            const struct vd_region *r = find_region(m, gpa);
            if (r == NULL)
                return done;
            uint64_t room = r->size - (gpa - r->gpa);
            uint64_t piece = blen < len - done ? blen : len - done;
            if (piece > room)
                piece = room;
            uint8_t *h = r->host + (gpa - r->gpa);
            if (to_guest)
                memcpy(h, flat + done, piece);
            else
                memcpy(flat + done, h, piece);
            done += piece;
            gpa += piece;
            blen -= piece;
        }
    }
    return done;
}

uint64_t vd_bufs_copy_out(const struct vd_mem *m, const struct vd_buf *bufs, uint32_t n,
                          uint64_t skip, void *dst, uint64_t len)
{
    return copy_bufs(m, bufs, n, skip, dst, len, false);
}

uint64_t vd_bufs_copy_in(const struct vd_mem *m, const struct vd_buf *bufs, uint32_t n,
                         uint64_t skip, const void *src, uint64_t len)
{
    return copy_bufs(m, bufs, n, skip, (uint8_t *)src, len, true);
}

int vd_bufs_iov(const struct vd_mem *m, struct vd_bufs_walk *w, struct iovec *iov, uint32_t cap,
                uint64_t *gpas)
{
    const struct vd_buf *b = w->bufs;
    uint32_t n = w->n, cnt = 0;
    uint64_t skip = w->skip, len = w->len;
    for (; n > 0 && len > 0; b++, n--) {
        uint64_t blen = b->len;
        if (skip >= blen) {
            skip -= blen;
            continue;
        }
        uint64_t gpa = b->gpa + skip;
        blen -= skip;
        skip = 0;
        if (blen > len)
            blen = len;
        while (blen > 0) {
            if (cnt == cap) {
                /* Out of room: stop inside this buffer, where a next call resumes. */
                w->bufs = b;
                w->n = n;
                w->skip = gpa - b->gpa;
                w->len = len;
                return VD_IOV_FULL;
            }
            uint8_t *h;
            uint64_t piece;
            if (b->host != NULL) {
                /* In one region: pop translated it already. */
                h = b->host + (gpa - b->gpa);
                piece = blen;
            } else {
                /* Bounds-checked at pop, crossing regions: split at their ends. */
                piece = vd_mem_span(m, gpa, &h);
                if (piece == 0)
                    return -1;
                if (piece > blen)
                    piece = blen;
            }
            iov[cnt].iov_base = h;
            iov[cnt].iov_len = piece;
            if (gpas != NULL)
                gpas[cnt] = gpa;
            cnt++;
            gpa += piece;
            blen -= piece;
            len -= piece;
        }
    }
    w->bufs = b;
    w->n = n;
    w->skip = skip;
    w->len = len;
    return (int)cnt;
}

void vd_store_u16(void *p, uint16_t v) { STORE16(p, v, __ATOMIC_RELEASE); }
uint16_t vd_load_u16(const void *p) { return LOAD16(p, __ATOMIC_ACQUIRE); }
