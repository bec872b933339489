#include "vring.h"

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
            if (len / DESC_SIZE > vr->size)
                return chain_error(c, VD_E_INDIRECT_TOO_LONG, addr, len);
            const uint8_t *t = vd_mem_translate(mem, addr, len);
            if (t == NULL)
                return chain_error(c, VD_E_INDIRECT_OUTSIDE_MEMORY, addr, len);
            table = t;
            table_gpa = addr;
            table_len = len / DESC_SIZE;
            /* The pointer is not a buffer; the chain's buffers, direct ones
             * before it included, stay within the queue size (§2.7.5.3.1). */
            budget = budget + 1 < table_len ? budget + 1 : table_len;
            i = 0;
            in_indirect = true;
            continue;
        }
        /* A bad buffer or a wrong order does not stop the walk: the structure
         * is still sound, so go on to the end (loops are still caught by the
         * budget) to learn whether the last descriptor can take a status. */
        bool in_bounds = vd_mem_check(mem, addr, len) == 0;
        if (!in_bounds && !deferred) {
            deferred = VD_E_BUFFER_OUTSIDE_MEMORY;
            deferred_gpa = addr;
            deferred_len = len;
        }
        bool is_write = flags & VD_DESC_F_WRITE;
        struct vd_buf b = { addr, len, flags };
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
    int n = vd_vring_pending(vr);
    if (n <= 0)
        return n;
    uint16_t head = LOAD16(avail_ring(vr, vr->next_avail), __ATOMIC_RELAXED);
    vr->next_avail++;
    if (head >= vr->size) {
        vr->broken = VD_E_HEAD_OUT_OF_RANGE;
        vr->broken_value = head;
        return -VD_E_HEAD_OUT_OF_RANGE;
    }
    c->head = head;
    /* The budget keeps a chain within the queue size, which is the capacity
     * the caller must give (an indirect table is at most the queue size too). */
    if (c->cap < vr->size)
        return chain_error(c, VD_E_LOOP, vr->desc_gpa, -1);
    return walk(vr, c);
}

/* ---- completing -------------------------------------------------------------------- */

void vd_vring_push(struct vd_vring *vr, uint16_t head, uint32_t len)
{
    uint8_t *e = used_elem(vr, vr->shadow_used);
    STORE32(e, head);
    STORE32(e + 4, len);
    vr->shadow_used++;
}

void vd_vring_publish(struct vd_vring *vr)
{
    uint16_t added = (uint16_t)(vr->shadow_used - vr->next_used);
    if (added == 0)
        return;
    /* §2.7.13.3: the elements are visible before the index (release). */
    STORE16(used_idx(vr), vr->shadow_used, __ATOMIC_RELEASE);
    vr->next_used = vr->shadow_used;
    vr->num_added = (uint16_t)(vr->num_added + added);
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
    }
}

int vd_vring_enable_notify(struct vd_vring *vr)
{
    if (vr->event_idx) {
        STORE16(avail_event(vr), vr->next_avail, __ATOMIC_RELAXED);
    } else {
        uint16_t f = LOAD16(used_flags(vr), __ATOMIC_RELAXED);
        STORE16(used_flags(vr), f & ~VD_USED_F_NO_NOTIFY, __ATOMIC_RELAXED);
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

void vd_store_u16(void *p, uint16_t v) { STORE16(p, v, __ATOMIC_RELEASE); }
uint16_t vd_load_u16(const void *p) { return LOAD16(p, __ATOMIC_ACQUIRE); }
