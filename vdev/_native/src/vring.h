/* The split virtqueue, device side, in C (virtio 1.2 §2.7).
 *
 * The same semantics as the Python reference, vdev/queue.py, which the
 * conformance suite (vdev.testing.check_queue) holds both to: the same
 * chains, the same errors (VD_E_* == vdev.queue.RingError), the same used
 * entries and the same notification decisions.
 *
 * Memory: `struct vd_mem` is a table of guest memory regions (guest-physical
 * address, size, host address) sorted by address, built by Python from a
 * memory-map snapshot that it keeps alive while any ring uses the table.
 * Ring addresses are translated once (vd_vring_init / vd_vring_set_mem);
 * every descriptor buffer is bounds-checked by binary search.
 *
 * Concurrency (§2.7.13): the driver reads and writes the rings while we do.
 * Every shared ring field is one load or store of its natural width through
 * C11 atomics: avail.idx is loaded with acquire (the ring entries and
 * descriptors it covers are read after it), used elements are stored before
 * used.idx, which is stored with release; after publishing used.idx (or
 * avail_event / clearing NO_NOTIFY) and before reading the driver's
 * used_event / flags (or re-reading avail.idx) a full fence orders the store
 * before the load (§2.7.10), the one reordering x86 does.  Descriptors are
 * copied once into locals before use, so a driver rewriting them meanwhile
 * cannot make us check one value and use another.
 */
#ifndef VDEV_VRING_H
#define VDEV_VRING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define VD_MAX_REGIONS 512

/* Error codes: the values of vdev.queue.RingError. */
enum {
    VD_OK = 0,
    VD_E_LOOP = 1,
    VD_E_NESTED_INDIRECT = 2,
    VD_E_INDIRECT_NOT_NEGOTIATED = 3,
    VD_E_INDIRECT_WITH_NEXT = 4,
    VD_E_INDIRECT_BAD_LENGTH = 5,
    VD_E_INDIRECT_TOO_LONG = 6,
    VD_E_INDIRECT_OUTSIDE_MEMORY = 7,
    VD_E_BUFFER_OUTSIDE_MEMORY = 8,
    VD_E_READABLE_AFTER_WRITABLE = 9,
    VD_E_NEXT_OUT_OF_RANGE = 10,
    VD_E_AVAIL_IDX_JUMP = 11,
    VD_E_HEAD_OUT_OF_RANGE = 12,
    VD_E_LAYOUT = 13,
};

/* The longest indirect table accepted, whatever the queue size: QEMU's
 * VIRTQUEUE_MAX_SIZE.  Linux checks a chain against the ring size only when
 * it has no indirect descriptors, so a device that advertises seg_max S gets
 * tables of S + 2 descriptors, more than a 128-entry ring (QEMU's default for
 * vhost-user-blk-pci) when S is 254. */
#define VD_INDIRECT_MAX 1024

/* Buffers a chain can hold: direct descriptors before an indirect one (at
 * most size - 1), then a table of at most max(size, VD_INDIRECT_MAX). */
static inline uint32_t vd_chain_cap(uint32_t size)
{
    return size + (size > VD_INDIRECT_MAX ? size : VD_INDIRECT_MAX);
}

#define VD_DESC_F_NEXT 1
#define VD_DESC_F_WRITE 2
#define VD_DESC_F_INDIRECT 4
#define VD_AVAIL_F_NO_INTERRUPT 1
#define VD_USED_F_NO_NOTIFY 1

struct vd_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct vd_mem {
    uint32_t nregions;
    struct vd_region regions[VD_MAX_REGIONS];
};

/* One buffer of a chain, as the descriptor gave it. */
struct vd_buf {
    uint64_t gpa;
    uint32_t len;
    uint16_t flags;
    uint8_t *host;       /* set by pop: [gpa, gpa+len) in one region, else NULL */
};

/* A popped chain: `nread` readable buffers, then `nwrite` writable ones, in
 * `bufs` (capacity `cap`, at least vd_chain_cap(queue size)).  On a malformed chain
 * whose avail entry was consumed, `err` and `err_gpa`/`err_len` say why and
 * where (err_len is -1 when unknown), and `tail` is the chain's last
 * descriptor when it is writable, in guest memory and not empty (has_tail),
 * where a device may still write a status. */
struct vd_chain {
    uint16_t head;
    uint32_t nread;
    uint32_t nwrite;
    uint64_t read_len;
    uint64_t write_len;
    struct vd_buf *bufs;
    uint32_t cap;
    int err;
    uint64_t err_gpa;
    int64_t err_len;
    int has_tail;
    struct vd_buf tail;
};

/* Dirty-page log of live migration (vhost-user "Migration"): one bit per
 * 4 KiB page of guest-physical address, set with an atomic OR because the
 * front-end clears bits concurrently.  Owned by Python, shared by every ring;
 * swapped only while the rings are held. */
struct vd_log {
    uint8_t *base;
    uint64_t size;        /* bytes: covers size * 8 pages */
};

/* The in-flight region of one split queue (vhost-user "Inflight I/O
 * tracking"): a 16-byte header and one 16-byte entry per descriptor, in a
 * memfd the front-end keeps across a back-end crash. */
struct vd_inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct vd_inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct vd_inflight_desc desc[];
};

struct vd_vring {
    uint16_t size;
    uint16_t index;
    uint64_t desc_gpa;
    uint64_t avail_gpa;
    uint64_t used_gpa;
    uint8_t *desc;       /* host pointers, translated against `mem` */
    uint8_t *avail;
    uint8_t *used;
    const struct vd_mem *mem;
    uint16_t next_avail;
    uint16_t next_used;      /* published used.idx */
    uint16_t shadow_used;    /* used entries written, not yet published */
    uint16_t num_added;      /* published since the last notification decision */
    bool event_idx;
    bool indirect;
    int broken;              /* 0, or the error that broke the queue */
    uint16_t broken_value;   /* the head or index step that broke it */
    /* dirty logging: NULL when off; used-ring writes are logged at
     * log_used_gpa + offset when log_used (VHOST_VRING_F_LOG) */
    const struct vd_log *log;
    uint64_t log_used_gpa;
    bool log_used;
    /* in-flight tracking: NULL when off */
    struct vd_inflight_region *inflight;
    uint64_t inflight_counter;
    uint16_t batch_len;      /* pushed since the last publish, chained from last_batch_head */
    uint16_t batch_tail;
    uint16_t *resubmit;      /* heads to take again before the avail ring, in order */
    uint16_t nresubmit;
    uint16_t resubmit_pos;
};

/* Region lookup: host pointer of [gpa, gpa+len) if it lies in one region, else NULL. */
uint8_t *vd_mem_translate(const struct vd_mem *m, uint64_t gpa, uint64_t len);
/* Bytes from gpa to the end of the region holding it (0 if none); *host is set. */
uint64_t vd_mem_span(const struct vd_mem *m, uint64_t gpa, uint8_t **host);
/* 0 if [gpa, gpa+len) is all guest memory (it may cross adjacent regions), else -1. */
int vd_mem_check(const struct vd_mem *m, uint64_t gpa, uint64_t len);

int vd_vring_init(struct vd_vring *vr, const struct vd_mem *mem, uint16_t size, uint16_t index,
                  uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                  uint16_t next_avail, uint16_t next_used, bool event_idx, bool indirect);
/* Free what init/set_inflight allocated. */
void vd_vring_fini(struct vd_vring *vr);
/* Re-translate the rings against a new memory table; VD_E_LAYOUT if they no longer fit. */
int vd_vring_set_mem(struct vd_vring *vr, const struct vd_mem *mem);

uint16_t vd_vring_avail_idx(const struct vd_vring *vr);
uint16_t vd_vring_used_idx(const struct vd_vring *vr);
/* Chains made available and not popped, or -VD_E_AVAIL_IDX_JUMP (queue broken). */
int vd_vring_pending(struct vd_vring *vr);
/* 1: a chain in `c`; 0: ring empty; <0: -error.  With -error and c->err set
 * the avail entry was consumed (return c->head); a broken queue returns
 * -vr->broken with c->err == 0. */
int vd_vring_pop(struct vd_vring *vr, struct vd_chain *c);
/* Write a used element (not yet visible to the driver). */
void vd_vring_push(struct vd_vring *vr, uint16_t head, uint32_t len);
/* Make pushed elements visible: one release store of used.idx. */
void vd_vring_publish(struct vd_vring *vr);
/* Whether to interrupt the driver for what was published since the last call. */
bool vd_vring_need_notify(struct vd_vring *vr);
void vd_vring_disable_notify(struct vd_vring *vr);
/* Ask for kicks again; 1 if chains arrived meanwhile, 0 if not, <0 broken. */
int vd_vring_enable_notify(struct vd_vring *vr);

/* Dirty logging. */
void vd_log_write(const struct vd_log *log, uint64_t gpa, uint64_t len);
void vd_vring_set_log(struct vd_vring *vr, const struct vd_log *log, bool log_used, uint64_t log_used_gpa);
void vd_vring_log_bufs(struct vd_vring *vr, const struct vd_buf *bufs, uint32_t n);

/* In-flight tracking: attach the queue's region (NULL detaches).  A fresh
 * region (version 0) is initialised; otherwise the last batch a crash left
 * half-finished is settled, next_avail becomes used.idx plus what was in
 * flight, and those heads are taken again, oldest first, before the avail
 * ring.  Returns how many will be resubmitted, or -1 (no memory). */
int vd_vring_set_inflight(struct vd_vring *vr, struct vd_inflight_region *region);

/* Helpers the engines share: copy between a buffer list and flat memory. */
uint64_t vd_bufs_copy_out(const struct vd_mem *m, const struct vd_buf *bufs, uint32_t n,
                          uint64_t skip, void *dst, uint64_t len);
uint64_t vd_bufs_copy_in(const struct vd_mem *m, const struct vd_buf *bufs, uint32_t n,
                         uint64_t skip, const void *src, uint64_t len);

/* A walk over bytes [skip, skip+len) of a buffer list, for vd_bufs_iov: the
 * buffers left (`bufs`, `n`), the bytes of bufs[0] already passed (`skip`)
 * and the bytes still to map (`len`). */
struct vd_bufs_walk {
    const struct vd_buf *bufs;
    uint32_t n;
    uint64_t skip;
    uint64_t len;
};

#define VD_IOV_FULL (-2)

/* Host iovecs for the next bytes of a walk, one per buffer that pop found in
 * one region (its `host`, no lookup), else one per region the buffer crosses.
 * Fills at most `cap` entries of `iov`, and of `gpas` (the guest address of
 * each piece, for the dirty log) unless it is NULL; `w` is advanced past what
 * was mapped.  Returns the entries filled when the walk ends (len mapped, or
 * the buffers ran out: w->len says what is left); VD_IOV_FULL when all `cap`
 * entries are filled and more bytes remain (a caller may grow its array and
 * call again with the rest); -1 if a buffer is not guest memory (which pop
 * excluded for the table it used).  No allocation, one pass. */
int vd_bufs_iov(const struct vd_mem *m, struct vd_bufs_walk *w, struct iovec *iov, uint32_t cap,
                uint64_t *gpas);

/* Driver-side stores for tests (one store of the width, release). */
void vd_store_u16(void *p, uint16_t v);
uint16_t vd_load_u16(const void *p);

#endif
