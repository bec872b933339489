#include "net.h"
#include "pollwin.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define RELAXED_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define RELAXED_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)

/* Frames per batch: one used-index publication and at most one interrupt
 * per ring per batch; also bounds how long a batch holds the ring locks. */
#define BATCH 64
#define NO_CHANGE (-2)
/* The bounce buffer: a link header and the largest frame a TAP can hand us
 * (64 KiB of GSO payload plus headers), with room to spare so that a frame
 * filling it is recognised as too big rather than silently cut. */
#define BOUNCE_SIZE (VD_NET_LINK_HDR + 128u * 1024u)

enum { RX_OK = 0, RX_NO_BUFFER = 1, RX_DROPPED = 2, RX_DOWN = 3 };
enum { TX_DONE = 0, TX_RETRY = 1 };

struct vd_net_port {
    struct vd_net_ring ring[2];
    struct vd_net_cfg *cfg;
    uint16_t pair;

    /* control (under lock) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int ctl_fd;
    pthread_t thread;
    bool thread_started;
    bool quit;
    uint64_t req_gen, ack_gen;
    int link;
    int fd;
    struct vd_net_port *peer;
    int new_fd;                 /* NO_CHANGE, or the fd to switch to (-1: none) */

    /* the worker's own view, refreshed from the above at each loop */
    int w_link;
    int w_fd;
    struct vd_net_port *w_peer;

    /* worker-private state */
    uint8_t *bounce;
    uint32_t pend_len;          /* a frame waiting in the bounce buffer (header included) */
    uint64_t wait_since;        /* ns; 0: not waiting for receive buffers */
    bool dropping;              /* the wait bound passed: drop until buffers come */
    int rx_dry;                 /* this batch: the peer's receive ring was empty (1), not (0), unknown (-1) */
    bool blocked_out;           /* the link socket is full: wait for POLLOUT */
    bool link_dead;             /* the fd said EOF or EBADFD: stop polling it */
    uint32_t poll_us;           /* ceiling of the transmit ring's busy-polling window */
    struct vd_pollwin poll;     /* the transmit ring's adaptive window (pollwin.h) */
    struct iovec *txiov;
    uint32_t txiov_cap;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void stat_add(uint64_t *counter, uint64_t n)
{
    /* One writer at a time (the worker holding the ring): a plain add
     * published with a relaxed store, read by Python with relaxed loads. */
    RELAXED_STORE(counter, *counter + n);
}

static void wake(struct vd_net_port *p)
{
    uint64_t one = 1;
    ssize_t r = write(p->ctl_fd, &one, sizeof one);
    (void)r;   /* a saturated counter already means "wake up" */
}

static void read_counter(int fd, uint64_t *sum)
{
    uint64_t v;
    if (fd >= 0 && read(fd, &v, sizeof v) == (ssize_t)sizeof v && sum != NULL)
        stat_add(sum, v);
}

static uint32_t guest_hdr_len(uint64_t features)
{
    /* §5.1.6: the 12-byte header with VERSION_1 or MRG_RXBUF, else the legacy 10 bytes. */
    return (features & (VD_NET_F_VERSION_1 | VD_NET_F_MRG_RXBUF)) ? 12u : 10u;
}

/* ---- headers ------------------------------------------------------------------------ */

static void hdr_decode(const uint8_t *b, struct vd_net_hdr *h)
{
    /* VERSION_1: little-endian (§5.1.6); legacy devices on x86 are too. */
    h->flags = b[0];
    h->gso_type = b[1];
    h->hdr_len = (uint16_t)(b[2] | b[3] << 8);
    h->gso_size = (uint16_t)(b[4] | b[5] << 8);
    h->csum_start = (uint16_t)(b[6] | b[7] << 8);
    h->csum_offset = (uint16_t)(b[8] | b[9] << 8);
    h->num_buffers = (uint16_t)(b[10] | b[11] << 8);
}

static void hdr_encode(const struct vd_net_hdr *h, uint8_t *b)
{
    b[0] = h->flags;
    b[1] = h->gso_type;
    b[2] = (uint8_t)h->hdr_len;
    b[3] = (uint8_t)(h->hdr_len >> 8);
    b[4] = (uint8_t)h->gso_size;
    b[5] = (uint8_t)(h->gso_size >> 8);
    b[6] = (uint8_t)h->csum_start;
    b[7] = (uint8_t)(h->csum_start >> 8);
    b[8] = (uint8_t)h->csum_offset;
    b[9] = (uint8_t)(h->csum_offset >> 8);
    b[10] = (uint8_t)h->num_buffers;
    b[11] = (uint8_t)(h->num_buffers >> 8);
}

/* A transmit header the device accepts (§5.1.6.2): offloads only as
 * negotiated, checksum offsets inside the frame, a GSO type we know. */
static bool tx_hdr_ok(uint64_t features, const struct vd_net_hdr *h, uint32_t frame_len)
{
    if (h->flags & VD_NET_HDR_F_NEEDS_CSUM) {
        if (!(features & VD_NET_F_CSUM))
            return false;
        if ((uint32_t)h->csum_start + h->csum_offset + 2u > frame_len)
            return false;
    }
    uint8_t gso = h->gso_type & (uint8_t)~VD_NET_HDR_GSO_ECN;
    if (h->gso_type & VD_NET_HDR_GSO_ECN) {
        if (gso == VD_NET_HDR_GSO_NONE || !(features & VD_NET_F_HOST_ECN))
            return false;
    }
    switch (gso) {
    case VD_NET_HDR_GSO_NONE:
        return true;
    case VD_NET_HDR_GSO_TCPV4:
        return (features & VD_NET_F_HOST_TSO4) && h->gso_size > 0;
    case VD_NET_HDR_GSO_TCPV6:
        return (features & VD_NET_F_HOST_TSO6) && h->gso_size > 0;
    case VD_NET_HDR_GSO_UDP:
        return (features & VD_NET_F_HOST_UFO) && h->gso_size > 0;
    default:
        return false;
    }
}

/* Whether a receiver with `features` takes a frame with this GSO type (§5.1.6.4). */
static bool rx_gso_ok(uint64_t features, uint8_t gso_type)
{
    uint8_t gso = gso_type & (uint8_t)~VD_NET_HDR_GSO_ECN;
    if ((gso_type & VD_NET_HDR_GSO_ECN) && !(features & VD_NET_F_GUEST_ECN))
        return false;
    switch (gso) {
    case VD_NET_HDR_GSO_NONE:
        return true;
    case VD_NET_HDR_GSO_TCPV4:
        return features & VD_NET_F_GUEST_TSO4;
    case VD_NET_HDR_GSO_TCPV6:
        return features & VD_NET_F_GUEST_TSO6;
    case VD_NET_HDR_GSO_UDP:
        return features & VD_NET_F_GUEST_UFO;
    default:
        return false;
    }
}

/* ---- scatter lists ---------------------------------------------------------------------- */

/* A cursor over an iovec array. */
struct cursor {
    const struct iovec *iov;
    int n;
    int i;
    size_t off;
};

static void cur_init(struct cursor *c, const struct iovec *iov, int n, size_t skip)
{
    c->iov = iov;
    c->n = n;
    c->i = 0;
    c->off = 0;
    while (c->i < c->n && skip >= c->iov[c->i].iov_len - c->off) {
        skip -= c->iov[c->i].iov_len - c->off;
        c->i++;
        c->off = 0;
    }
    c->off += skip;
}

/* Copy up to len bytes from src to dst; returns the bytes copied. */
static size_t cur_copy(struct cursor *dst, struct cursor *src, size_t len)
{
    size_t done = 0;
    while (done < len && dst->i < dst->n && src->i < src->n) {
        size_t d = dst->iov[dst->i].iov_len - dst->off;
        size_t s = src->iov[src->i].iov_len - src->off;
        size_t k = len - done;
        if (d < k)
            k = d;
        if (s < k)
            k = s;
        /* Both sides are guest memory (or our bounce buffer) checked at pop;
         * memmove, as a confused guest may hand overlapping buffers. */
        memmove((uint8_t *)dst->iov[dst->i].iov_base + dst->off,
                (const uint8_t *)src->iov[src->i].iov_base + src->off, k);
        done += k;
        dst->off += k;
        src->off += k;
        if (dst->off == dst->iov[dst->i].iov_len) {
            dst->i++;
            dst->off = 0;
        }
        if (src->off == src->iov[src->i].iov_len) {
            src->i++;
            src->off = 0;
        }
    }
    return done;
}

/* The Internet checksum of bytes [start, start+len) of src, finished as
 * skb_checksum_help does: ones' complement sum, folded, inverted. */
static uint16_t iov_csum(const struct iovec *iov, int n, size_t start, size_t len)
{
    struct cursor c;
    cur_init(&c, iov, n, start);
    uint64_t sum = 0;
    size_t pos = 0;
    while (pos < len && c.i < c.n) {
        const uint8_t *b = (const uint8_t *)c.iov[c.i].iov_base + c.off;
        size_t k = c.iov[c.i].iov_len - c.off;
        if (k > len - pos)
            k = len - pos;
        for (size_t j = 0; j < k; j++, pos++)
            sum += (pos & 1) ? b[j] : (uint64_t)b[j] << 8;
        c.off += k;
        if (c.off == c.iov[c.i].iov_len) {
            c.i++;
            c.off = 0;
        }
    }
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t r = (uint16_t)~sum;
    return r ? r : 0xffff;   /* 0 means "no checksum" to UDP */
}

static void iov_put(const struct iovec *iov, int n, size_t at, const uint8_t *src, size_t len)
{
    struct cursor d;
    cur_init(&d, iov, n, at);
    struct iovec s = { (void *)src, len };
    struct cursor sc;
    cur_init(&sc, &s, 1, 0);
    cur_copy(&d, &sc, len);
}

/* ---- rings -------------------------------------------------------------------------------- */

/* Ask for a kick when the driver adds *any* buffer (§2.7.10), then look
 * again; 1 if buffers arrived meanwhile.  Unlike vd_vring_enable_notify,
 * which asks to hear of chains past next_avail, this is for a receiver
 * that has buffers in its ring but too few for the frame: with EVENT_IDX
 * avail_event must be the current avail.idx, or the driver's next
 * additions (already past next_avail) would never kick us. */
static int rx_want_more(struct vd_vring *vr)
{
    uint16_t seen = vd_vring_avail_idx(vr);
    uint16_t *flags = (uint16_t *)vr->used;
    uint16_t *avail_event = (uint16_t *)(vr->used + 4 + 8u * vr->size);
    if (vr->event_idx) {
        __atomic_store_n(avail_event, seen, __ATOMIC_RELAXED);
    } else {
        uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
        __atomic_store_n(flags, (uint16_t)(f & ~VD_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    }
    /* Publish the request before re-reading avail.idx, or a kick can be missed. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vd_vring_avail_idx(vr) != seen;
}

/* Publish what was pushed and interrupt the driver once if it wants it.
 * Caller holds the ring's lock. */
static void flush_ring(struct vd_net_ring *r, uint64_t t0)
{
    if (r->vr.shadow_used == r->vr.next_used)
        return;
    vd_vring_publish(&r->vr);
    stat_add(&r->stats.batches, 1);
    if (t0)
        vd_hist_record(&r->hist, now_ns() - t0);
    if (vd_vring_need_notify(&r->vr)) {
        if (r->call_fd >= 0) {
            uint64_t one = 1;
            ssize_t w = write(r->call_fd, &one, sizeof one);
            (void)w;   /* EAGAIN: an interrupt is pending anyway */
        }
        stat_add(&r->stats.calls, 1);
    } else {
        stat_add(&r->stats.calls_suppressed, 1);
    }
}

static void drop(struct vd_net_ring *r, uint64_t *cause)
{
    if (cause != NULL)
        stat_add(cause, 1);
    stat_add(&r->stats.dropped, 1);
}

/* Place one frame into `dst`'s receive ring.  `h` is the frame's header,
 * `src` its bytes (without the header).  Caller holds the receive ring's
 * lock.  On RX_NO_BUFFER nothing was taken from the ring. */
static int rx_deliver(struct vd_net_port *dst, const struct vd_net_hdr *h, const struct iovec *src,
                      int nsrc, uint32_t len, bool dropping)
{
    struct vd_net_ring *r = &dst->ring[VD_NET_RX];
    if (!r->started || r->vr.broken)
        return RX_DOWN;
    if (!r->running)
        return RX_NO_BUFFER;      /* held for a moment (a memory-table change): wait */
    if (!r->enabled)
        return RX_DOWN;           /* spec "Ring states": a disabled ring gets no new RX packets */
    uint64_t feat = RELAXED_LOAD(&dst->cfg->features);
    if (!rx_gso_ok(feat, h->gso_type)) {
        drop(r, &r->stats.offload_drops);
        return RX_DROPPED;
    }
    uint32_t hlen = guest_hdr_len(feat);
    bool mrg = feat & VD_NET_F_MRG_RXBUF;
    bool fix_csum = (h->flags & VD_NET_HDR_F_NEEDS_CSUM) && !(feat & VD_NET_F_GUEST_CSUM);
    uint64_t need = (uint64_t)hlen + len;
    uint64_t cap = 0;
    uint32_t nch = 0, niov = 0;

    while (cap < need) {
        if (nch > 0 && !mrg) {
            /* §5.1.6.3: without MRG_RXBUF a frame takes exactly one chain. */
            r->vr.next_avail = (uint16_t)(r->vr.next_avail - nch);
            drop(r, &r->stats.too_big);
            return RX_DROPPED;
        }
        if (nch == r->vr.size) {
            r->vr.next_avail = (uint16_t)(r->vr.next_avail - nch);
            drop(r, &r->stats.too_big);
            return RX_DROPPED;
        }
        int rc = vd_vring_pop(&r->vr, &r->chain);
        if (rc == 0) {
            /* Not enough buffers: give back what was taken, ask for a kick,
             * and look once more (§2.7.10) before reporting the wait. */
            r->vr.next_avail = (uint16_t)(r->vr.next_avail - nch);
            nch = niov = 0;
            cap = 0;
            /* Already dropping for this receiver: it is looked at again with
             * the next frame, so no kick (and no fence) is needed. */
            if (dropping)
                return RX_NO_BUFFER;
            if (rx_want_more(&r->vr)) {
                vd_vring_disable_notify(&r->vr);
                continue;
            }
            return RX_NO_BUFFER;
        }
        if (rc < 0 && r->chain.err == 0) {
            RELAXED_STORE(&r->stats.broken, (uint64_t)-rc);
            r->vr.next_avail = (uint16_t)(r->vr.next_avail - nch);
            return RX_DOWN;
        }
        int got = -1;
        if (rc > 0 && r->chain.nwrite > 0 && r->chain.write_len > 0) {
            struct vd_bufs_walk walk = { r->chain.bufs + r->chain.nread, r->chain.nwrite, 0,
                                         r->chain.write_len };
            got = vd_bufs_iov(r->vr.mem, &walk, r->iov + niov, r->iov_cap - niov,
                              r->vr.log != NULL ? r->iov_gpa + niov : NULL);
        }
        if (got < 0) {
            if (rc > 0 && r->chain.nwrite > 0 && niov > 0) {
                /* Out of iovec room for this frame: it cannot be placed. */
                r->vr.next_avail = (uint16_t)(r->vr.next_avail - nch - 1);
                drop(r, &r->stats.too_big);
                return RX_DROPPED;
            }
            /* A malformed or unusable chain (no writable bytes): return it
             * with nothing written, together with any chains already taken
             * for this frame (they come back empty; the frame looks on). */
            for (uint32_t i = 0; i < nch; i++)
                vd_vring_push(&r->vr, r->heads[i], 0);
            vd_vring_push(&r->vr, r->chain.head, 0);
            stat_add(&r->stats.bad_chains, 1);
            nch = niov = 0;
            cap = 0;
            continue;
        }
        r->heads[nch] = r->chain.head;
        r->iov_at[nch] = niov;
        niov += (uint32_t)got;
        nch++;
        r->iov_at[nch] = niov;
        cap += r->chain.write_len;
    }

    /* The header: the sender's, with what this receiver may see (§5.1.6.4). */
    struct vd_net_hdr out = *h;
    if (!(feat & VD_NET_F_GUEST_CSUM))
        out.flags = 0;      /* "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero" */
    out.flags &= VD_NET_HDR_F_NEEDS_CSUM | VD_NET_HDR_F_DATA_VALID;
    out.num_buffers = mrg ? (uint16_t)nch : 1;
    uint8_t hb[VD_NET_LINK_HDR];
    hdr_encode(&out, hb);
    iov_put(r->iov, (int)niov, 0, hb, hlen);
    struct cursor dc, sc;
    cur_init(&dc, r->iov, (int)niov, hlen);
    cur_init(&sc, src, nsrc, 0);
    cur_copy(&dc, &sc, len);
    if (fix_csum) {
        /* The receiver cannot finish a partial checksum: do it here. */
        uint16_t sum = iov_csum(src, nsrc, h->csum_start, len - h->csum_start);
        uint8_t be[2] = { (uint8_t)(sum >> 8), (uint8_t)sum };
        iov_put(r->iov, (int)niov, (size_t)hlen + h->csum_start + h->csum_offset, be, 2);
    }
    /* Used lengths: the chains were filled in order. */
    uint64_t left = need;
    for (uint32_t i = 0; i < nch; i++) {
        uint64_t c = 0;
        for (uint32_t k = r->iov_at[i]; k < r->iov_at[i + 1]; k++)
            c += r->iov[k].iov_len;
        uint64_t used = c < left ? c : left;
        if (r->vr.log != NULL) {
            /* Migration: what was written is dirty, after the writes and
             * before the used entry hands it to the driver. */
            uint64_t l = used;
            for (uint32_t k = r->iov_at[i]; k < r->iov_at[i + 1] && l > 0; k++) {
                uint64_t piece = r->iov[k].iov_len < l ? r->iov[k].iov_len : l;
                vd_log_write(r->vr.log, r->iov_gpa[k], piece);
                l -= piece;
            }
        }
        vd_vring_push(&r->vr, r->heads[i], (uint32_t)used);
        left -= used;
    }
    stat_add(&r->stats.frames, 1);
    stat_add(&r->stats.bytes, len);
    stat_add(&r->stats.buffers, nch);
    return RX_OK;
}

/* Start or continue waiting for receive buffers; true when the wait bound
 * has passed and the frame is to be dropped. */
static bool wait_expired(struct vd_net_port *p, struct vd_net_ring *rx)
{
    if (p->dropping)
        return true;
    uint64_t now = now_ns();
    if (p->wait_since == 0) {
        p->wait_since = now ? now : 1;
        stat_add(&rx->stats.no_buffer, 1);
    }
    uint64_t bound = (uint64_t)RELAXED_LOAD(&p->cfg->no_buffer_wait_ms) * 1000000ull;
    if (now - p->wait_since >= bound) {
        p->dropping = true;
        return true;
    }
    return false;
}

static void wait_over(struct vd_net_port *p)
{
    p->wait_since = 0;
    p->dropping = false;
}

/* ---- transmit ------------------------------------------------------------------------------ */

static int tx_one(struct vd_net_port *p, struct vd_net_ring *t, struct vd_chain *c,
                  struct vd_net_port *dst)
{
    uint64_t feat = RELAXED_LOAD(&p->cfg->features);
    uint32_t hlen = guest_hdr_len(feat);
    if (c->read_len < hlen + VD_NET_ETH_HLEN) {
        drop(t, &t->stats.too_short);
        return TX_DONE;
    }
    uint64_t frame = c->read_len - hlen;
    if (frame > VD_NET_MAX_FRAME) {
        drop(t, &t->stats.too_big);
        return TX_DONE;
    }
    /* One copy of the header: what we check is what we send.  Usually it
     * lies in the first buffer, and two fixed-size loads take it (the
     * general copy cost as much as the rest of a dropped frame's path). */
    uint8_t hb[VD_NET_LINK_HDR] = { 0 };
    const uint8_t *hp = c->bufs[0].len >= hlen ? vd_mem_translate(t->vr.mem, c->bufs[0].gpa, hlen) : NULL;
    if (hp == NULL)
        vd_bufs_copy_out(t->vr.mem, c->bufs, c->nread, 0, hb, hlen);
    else if (hlen == VD_NET_LINK_HDR)
        memcpy(hb, hp, VD_NET_LINK_HDR);
    else
        memcpy(hb, hp, 10);
    struct vd_net_hdr h;
    hdr_decode(hb, &h);
    h.num_buffers = 0;
    if (!tx_hdr_ok(feat, &h, (uint32_t)frame)) {
        drop(t, &t->stats.bad_header);
        return TX_DONE;
    }
    if (!t->enabled) {
        /* spec "Ring states": started and disabled, TX is processed and discarded. */
        drop(t, &t->stats.disabled_drops);
        return TX_DONE;
    }
    if (p->w_link == VD_NET_LINK_PEER && p->dropping && dst != NULL) {
        /* Past the wait bound for this receiver: while it has no buffers,
         * drop without building the frame's scatter list.  Its ring is
         * looked at once per batch: buffers it posts meanwhile are seen by
         * the next batch, and the index load is not paid per frame. */
        struct vd_net_ring *rx = &dst->ring[VD_NET_RX];
        if (p->rx_dry < 0)
            p->rx_dry = rx->started && rx->running && rx->enabled && !rx->vr.broken
                        && vd_vring_pending(&rx->vr) == 0;
        if (p->rx_dry) {
            drop(rx, &rx->stats.no_buffer_drops);
            drop(t, NULL);
            return TX_DONE;
        }
    }
    struct vd_bufs_walk walk = { c->bufs, c->nread, hlen, frame };
    int n = vd_bufs_iov(t->vr.mem, &walk, p->txiov + 1, p->txiov_cap - 1, NULL);
    if (n < 0) {        /* more pieces than txiov holds (or memory pop excluded) */
        drop(t, &t->stats.too_big);
        return TX_DONE;
    }
    switch (p->w_link) {
    case VD_NET_LINK_FD: {
        if (p->w_fd < 0 || p->link_dead) {
            drop(t, &t->stats.link_down_drops);
            return TX_DONE;
        }
        hdr_encode(&h, hb);
        p->txiov[0].iov_base = hb;
        p->txiov[0].iov_len = VD_NET_LINK_HDR;
        ssize_t w;
        do {
            w = writev(p->w_fd, p->txiov, n + 1);
        } while (w < 0 && errno == EINTR);
        if (w < 0) {
            if (errno == EAGAIN || errno == ENOBUFS) {
                /* A full socket (a cable to another daemon): the frame waits
                 * in the ring until the link drains. */
                p->blocked_out = true;
                return TX_RETRY;
            }
            RELAXED_STORE(&t->stats.last_errno, (uint64_t)errno);
            if (errno == EBADFD)
                p->link_dead = true;   /* the TAP is gone */
            drop(t, &t->stats.link_errors);
            return TX_DONE;
        }
        stat_add(&t->stats.frames, 1);
        stat_add(&t->stats.bytes, frame);
        return TX_DONE;
    }
    case VD_NET_LINK_PEER: {
        int rc = dst != NULL ? rx_deliver(dst, &h, p->txiov + 1, n, (uint32_t)frame, p->dropping) : RX_DOWN;
        struct vd_net_ring *rx = dst != NULL ? &dst->ring[VD_NET_RX] : NULL;
        if (rc == RX_OK) {
            wait_over(p);
            stat_add(&t->stats.frames, 1);
            stat_add(&t->stats.bytes, frame);
            return TX_DONE;
        }
        if (rc == RX_NO_BUFFER) {
            if (!rx->running)
                return TX_RETRY;    /* held, not empty: no wait counted */
            if (!wait_expired(p, rx))
                return TX_RETRY;
            drop(rx, &rx->stats.no_buffer_drops);
            drop(t, NULL);
            return TX_DONE;
        }
        wait_over(p);
        if (rc == RX_DROPPED) {
            drop(t, NULL);    /* the cause is counted on the receiving ring */
            return TX_DONE;
        }
        drop(t, &t->stats.link_down_drops);
        return TX_DONE;
    }
    default:
        drop(t, &t->stats.link_down_drops);
        return TX_DONE;
    }
}

/* One batch of the transmit ring; returns the chains completed. */
static int do_tx(struct vd_net_port *p)
{
    struct vd_net_ring *t = &p->ring[VD_NET_TX];
    pthread_mutex_lock(&t->lock);
    if (!t->started || !t->running || t->vr.broken || p->blocked_out) {
        pthread_mutex_unlock(&t->lock);
        return 0;
    }
    struct vd_net_port *dst = p->w_link == VD_NET_LINK_PEER ? p->w_peer : NULL;
    struct vd_net_ring *rx = dst != NULL ? &dst->ring[VD_NET_RX] : NULL;
    if (rx != NULL) {
        pthread_mutex_lock(&rx->lock);
        if (rx->started && rx->running)
            vd_vring_disable_notify(&rx->vr);
    }
    vd_vring_disable_notify(&t->vr);
    p->rx_dry = -1;
    int done = 0;
    bool retry = false;
    uint64_t t0 = 0;
    while (done < BATCH) {
        int rc = vd_vring_pop(&t->vr, &t->chain);
        if (rc == 0)
            break;
        if (rc < 0 && t->chain.err == 0) {
            RELAXED_STORE(&t->stats.broken, (uint64_t)-rc);
            break;
        }
        if (t0 == 0)
            t0 = now_ns();
        if (rc < 0) {
            stat_add(&t->stats.bad_chains, 1);
        } else if (tx_one(p, t, &t->chain, dst) == TX_RETRY) {
            t->vr.next_avail--;     /* un-pop: it stays in the ring */
            retry = true;
            break;
        }
        /* §5.1.6.2: the device writes nothing into a transmit chain. */
        vd_vring_push(&t->vr, t->chain.head, 0);
        stat_add(&t->stats.buffers, 1);
        done++;
    }
    if (rx != NULL) {
        flush_ring(rx, t0);
        pthread_mutex_unlock(&rx->lock);
    }
    flush_ring(t, t0);
    pthread_mutex_unlock(&t->lock);
    return retry && done == 0 ? 0 : done;
}

/* ---- receive from an fd link ------------------------------------------------------------------ */

static int do_rx_fd(struct vd_net_port *p)
{
    struct vd_net_ring *r = &p->ring[VD_NET_RX];
    if (p->w_link != VD_NET_LINK_FD || p->w_fd < 0)
        return 0;
    pthread_mutex_lock(&r->lock);
    if (!r->started || !r->running || !r->enabled || r->vr.broken) {
        if (!r->started && p->pend_len) {
            p->pend_len = 0;     /* the ring stopped: the frame waiting for it goes */
            wait_over(p);
        }
        pthread_mutex_unlock(&r->lock);
        return 0;
    }
    vd_vring_disable_notify(&r->vr);
    int done = 0;
    uint64_t t0 = 0;
    while (done < BATCH) {
        if (p->pend_len == 0) {
            if (p->link_dead)
                break;
            ssize_t n;
            do {
                n = read(p->w_fd, p->bounce, BOUNCE_SIZE);
            } while (n < 0 && errno == EINTR);
            if (n < 0) {
                if (errno == EAGAIN)
                    break;
                RELAXED_STORE(&r->stats.last_errno, (uint64_t)errno);
                stat_add(&r->stats.link_errors, 1);
                if (errno == EBADFD || errno == ENOTCONN || errno == ECONNRESET)
                    p->link_dead = true;
                break;
            }
            if (n == 0) {
                p->link_dead = true;     /* the cable's other end closed */
                break;
            }
            if (t0 == 0)
                t0 = now_ns();
            if ((size_t)n < VD_NET_LINK_HDR + VD_NET_ETH_HLEN) {
                drop(r, &r->stats.too_short);
                done++;
                continue;
            }
            if ((size_t)n >= BOUNCE_SIZE || (size_t)n - VD_NET_LINK_HDR > VD_NET_MAX_FRAME) {
                drop(r, &r->stats.too_big);
                done++;
                continue;
            }
            p->pend_len = (uint32_t)n;
        }
        struct vd_net_hdr h;
        hdr_decode(p->bounce, &h);
        uint32_t len = p->pend_len - VD_NET_LINK_HDR;
        if ((h.flags & VD_NET_HDR_F_NEEDS_CSUM)
            && (uint32_t)h.csum_start + h.csum_offset + 2u > len) {
            drop(r, &r->stats.bad_header);     /* a cable peer's header we cannot honour */
            p->pend_len = 0;
            done++;
            continue;
        }
        struct iovec src = { p->bounce + VD_NET_LINK_HDR, len };
        int rc = rx_deliver(p, &h, &src, 1, len, p->dropping);
        if (rc == RX_NO_BUFFER) {
            if (!wait_expired(p, r))
                break;                           /* the frame waits in the bounce buffer */
            drop(r, &r->stats.no_buffer_drops);
        } else {
            if (rc == RX_DOWN)
                drop(r, &r->stats.link_down_drops);   /* the ring broke meanwhile */
            wait_over(p);
        }
        p->pend_len = 0;
        done++;
    }
    flush_ring(r, t0);
    pthread_mutex_unlock(&r->lock);
    return done;
}

/* ---- the worker ---------------------------------------------------------------------------------- */

/* Take Python's changes: fds, link, peer.  Returns false when told to quit. */
static bool take_control(struct vd_net_port *p)
{
    pthread_mutex_lock(&p->lock);
    for (int w = 0; w < 2; w++) {
        struct vd_net_ring *r = &p->ring[w];
        if (r->new_kick_fd != NO_CHANGE) {
            if (r->kick_fd >= 0)
                close(r->kick_fd);
            r->kick_fd = r->new_kick_fd;
            r->new_kick_fd = NO_CHANGE;
        }
    }
    if (p->new_fd != NO_CHANGE) {
        if (p->fd >= 0)
            close(p->fd);
        p->fd = p->new_fd;
        p->new_fd = NO_CHANGE;
        p->link_dead = false;
        p->blocked_out = false;
        p->pend_len = 0;
    }
    if (p->w_link != p->link || p->w_peer != p->peer) {
        wait_over(p);
        p->blocked_out = false;
    }
    p->w_link = p->link;
    p->w_fd = p->fd;
    p->w_peer = p->peer;
    bool quit = p->quit;
    if (p->ack_gen != p->req_gen) {
        p->ack_gen = p->req_gen;
        pthread_cond_broadcast(&p->cond);
    }
    pthread_mutex_unlock(&p->lock);
    return !quit;
}

/* Who fills this port's receive ring: the cable peer, else the port itself. */
static struct vd_net_port *rx_filler(struct vd_net_port *p)
{
    return p->w_link == VD_NET_LINK_PEER && p->w_peer != NULL ? p->w_peer : p;
}

static bool ring_live(struct vd_net_ring *r)
{
    return RELAXED_LOAD(&r->started) && RELAXED_LOAD(&r->running);
}

/* The transmit ring's idle clock for the adaptive window (pollwin.h): `sent`
 * frames were just taken from it.  Receive work does not count: polling
 * looks at the transmit ring only. */
static void tx_idle_clock(struct vd_net_port *p, int sent)
{
    if (vd_pollwin_note(&p->poll, sent, (uint64_t)RELAXED_LOAD(&p->poll_us) * 1000u)) {
        struct vd_net_ring *t = &p->ring[VD_NET_TX];
        pthread_mutex_lock(&t->lock);
        RELAXED_STORE(&t->stats.poll_ns, p->poll.ns);
        pthread_mutex_unlock(&t->lock);
    }
}

/* Busy-poll the transmit ring with kicks still suppressed (as QEMU's
 * iothread poll-max-ns and DPDK's polling cores do), until the adaptive
 * window opened when the ring was last found empty closes: a frame
 * arriving meanwhile is taken without a kick or a wake-up.  True when one
 * arrived (or Python wants the worker). */
static bool poll_tx(struct vd_net_port *p)
{
    uint64_t deadline = vd_pollwin_deadline(&p->poll, (uint64_t)RELAXED_LOAD(&p->poll_us) * 1000u);
    struct vd_net_ring *t = &p->ring[VD_NET_TX];
    if (deadline == 0 || p->blocked_out || (p->wait_since && !p->dropping))
        return false;
    while (now_ns() < deadline) {
        for (int i = 0; i < 64; i++) {
            if (RELAXED_LOAD(&p->req_gen) != p->ack_gen)
                return true;
            pthread_mutex_lock(&t->lock);
            int n = t->started && t->running && !t->vr.broken ? vd_vring_pending(&t->vr) : 0;
            if (n > 0)
                stat_add(&t->stats.polled, 1);
            pthread_mutex_unlock(&t->lock);
            if (n != 0)
                return true;
            __builtin_ia32_pause();
        }
    }
    return false;
}

static void *worker(void *arg)
{
    struct vd_net_port *p = arg;
    struct vd_net_ring *tx = &p->ring[VD_NET_TX], *rx = &p->ring[VD_NET_RX];
    while (take_control(p)) {
        int sent = do_tx(p);
        tx_idle_clock(p, sent);
        int work = sent + do_rx_fd(p);
        if (work > 0 || poll_tx(p))
            continue;

        /* §2.7.10: ask for kicks again, then look once more before sleeping.
         * Not while the transmit ring waits for the receiver: its kicks
         * would only wake us to find the same full receiver. */
        bool tx_waiting = (p->wait_since && !p->dropping && p->w_link == VD_NET_LINK_PEER)
                          || p->blocked_out;
        if (ring_live(tx) && !tx_waiting) {
            pthread_mutex_lock(&tx->lock);
            int more = tx->started && tx->running && !tx->vr.broken ? vd_vring_enable_notify(&tx->vr) : 0;
            pthread_mutex_unlock(&tx->lock);
            if (more > 0)
                continue;
        }

        struct pollfd pf[4];
        int n = 0, ik_tx = -1, ik_rx = -1, il = -1;
        pf[n].fd = p->ctl_fd;
        pf[n++].events = POLLIN;
        if (tx->kick_fd >= 0) {
            ik_tx = n;
            pf[n].fd = tx->kick_fd;
            pf[n++].events = POLLIN;
        }
        if (rx->kick_fd >= 0) {
            ik_rx = n;
            pf[n].fd = rx->kick_fd;
            pf[n++].events = POLLIN;
        }
        if (p->w_link == VD_NET_LINK_FD && p->w_fd >= 0 && !p->link_dead) {
            short ev = 0;
            if (ring_live(rx) && RELAXED_LOAD(&rx->enabled) && p->pend_len == 0)
                ev |= POLLIN;
            if (p->blocked_out)
                ev |= POLLOUT;
            if (ev) {
                il = n;
                pf[n].fd = p->w_fd;
                pf[n++].events = ev;
            }
        }
        int timeout = -1;
        if (p->wait_since && !p->dropping) {
            uint64_t bound = (uint64_t)RELAXED_LOAD(&p->cfg->no_buffer_wait_ms) * 1000000ull;
            uint64_t spent = now_ns() - p->wait_since;
            timeout = spent >= bound ? 0 : (int)((bound - spent) / 1000000ull) + 1;
        }
        int r = poll(pf, (nfds_t)n, timeout);
        if (r <= 0)
            continue;
        stat_add(&tx->stats.wakeups, 1);
        if (pf[0].revents)
            read_counter(p->ctl_fd, NULL);
        if (ik_tx >= 0 && pf[ik_tx].revents)
            read_counter(tx->kick_fd, &tx->stats.kicks);
        if (ik_rx >= 0 && pf[ik_rx].revents) {
            read_counter(rx->kick_fd, &rx->stats.kicks);
            /* New receive buffers: whoever fills this ring may go on. */
            struct vd_net_port *f = rx_filler(p);
            if (f != p)
                wake(f);
        }
        if (il >= 0 && pf[il].revents) {
            if (pf[il].revents & POLLOUT)
                p->blocked_out = false;
            if (pf[il].revents & (POLLERR | POLLHUP | POLLNVAL) && !(pf[il].revents & POLLIN)) {
                /* A vanished TAP polls as an error (a read says which); a
                 * cable whose other end closed polls as a hang-up. */
                int err = pf[il].revents & POLLNVAL ? EBADF : 0;
                if (!err && p->pend_len == 0 && read(p->w_fd, p->bounce, BOUNCE_SIZE) < 0 && errno != EAGAIN)
                    err = errno;
                if (err) {
                    RELAXED_STORE(&rx->stats.last_errno, (uint64_t)err);
                    stat_add(&rx->stats.link_errors, 1);
                }
                p->link_dead = true;
                p->blocked_out = false;
            }
        }
    }
    return NULL;
}

/* ---- control ---------------------------------------------------------------------------------------- */

/* Wait until the worker has taken every change made so far. */
static void sync_worker(struct vd_net_port *p)
{
    pthread_mutex_lock(&p->lock);
    uint64_t gen = ++p->req_gen;
    wake(p);
    while (p->thread_started && p->ack_gen < gen)
        pthread_cond_wait(&p->cond, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

/* Wake the port's worker and whoever fills its receive ring. */
static void wake_all(struct vd_net_port *p)
{
    wake(p);
    pthread_mutex_lock(&p->lock);
    if (p->link == VD_NET_LINK_PEER && p->peer != NULL && p->peer != p)
        wake(p->peer);
    pthread_mutex_unlock(&p->lock);
}

static void ring_init(struct vd_net_ring *r)
{
    pthread_mutex_init(&r->lock, NULL);
    r->call_fd = r->kick_fd = -1;
    r->new_kick_fd = NO_CHANGE;
    vd_hist_init(&r->hist);
}

static void ring_free_buffers(struct vd_net_ring *r)
{
    free(r->chain.bufs);
    r->chain.bufs = NULL;
    r->chain.cap = 0;
    free(r->iov);
    r->iov = NULL;
    free(r->iov_gpa);
    r->iov_gpa = NULL;
    r->iov_cap = 0;
    free(r->heads);
    r->heads = NULL;
    free(r->iov_at);
    r->iov_at = NULL;
}

struct vd_net_port *vd_net_port_new(struct vd_net_cfg *cfg, uint16_t pair)
{
    struct vd_net_port *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->cfg = cfg;
    p->pair = pair;
    p->fd = p->w_fd = -1;
    p->new_fd = NO_CHANGE;
    p->link = p->w_link = VD_NET_LINK_NONE;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    ring_init(&p->ring[0]);
    ring_init(&p->ring[1]);
    p->bounce = malloc(BOUNCE_SIZE);
    p->ctl_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->bounce == NULL || p->ctl_fd < 0)
        goto fail;
    int rc = pthread_create(&p->thread, NULL, worker, p);
    if (rc) {
        errno = rc;
        goto fail;
    }
    p->thread_started = true;
    return p;
fail:
    if (p->ctl_fd >= 0)
        close(p->ctl_fd);
    free(p->bounce);
    free(p);
    return NULL;
}

void vd_net_port_free(struct vd_net_port *p)
{
    if (p == NULL)
        return;
    if (p->thread_started) {
        pthread_mutex_lock(&p->lock);
        p->quit = true;
        pthread_mutex_unlock(&p->lock);
        wake(p);
        pthread_join(p->thread, NULL);
        p->thread_started = false;
    }
    for (int w = 0; w < 2; w++) {
        struct vd_net_ring *r = &p->ring[w];
        int fds[] = { r->kick_fd, r->call_fd, r->new_kick_fd };
        for (unsigned i = 0; i < 3; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        ring_free_buffers(r);
        pthread_mutex_destroy(&r->lock);
    }
    if (p->fd >= 0)
        close(p->fd);
    if (p->new_fd >= 0)
        close(p->new_fd);
    close(p->ctl_fd);
    free(p->bounce);
    free(p->txiov);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p);
}

void vd_net_port_set_poll(struct vd_net_port *p, uint32_t poll_us)
{
    RELAXED_STORE(&p->poll_us, poll_us);
    wake(p);
}

void vd_net_port_set_fd(struct vd_net_port *p, int fd)
{
    pthread_mutex_lock(&p->lock);
    if (p->new_fd >= 0)
        close(p->new_fd);
    p->new_fd = fd;
    p->link = fd >= 0 ? VD_NET_LINK_FD : VD_NET_LINK_NONE;
    p->peer = NULL;
    pthread_mutex_unlock(&p->lock);
    sync_worker(p);
}

void vd_net_port_set_peer(struct vd_net_port *p, struct vd_net_port *peer)
{
    pthread_mutex_lock(&p->lock);
    if (p->new_fd >= 0)
        close(p->new_fd);
    p->new_fd = -1;      /* a peer link has no fd: close any */
    p->link = peer != NULL ? VD_NET_LINK_PEER : VD_NET_LINK_NONE;
    p->peer = peer;
    pthread_mutex_unlock(&p->lock);
    sync_worker(p);
}

int vd_net_port_inject(struct vd_net_port *p, const uint8_t *frame, uint32_t len)
{
    if (len < VD_NET_LINK_HDR + VD_NET_ETH_HLEN)
        return -EINVAL;
    pthread_mutex_lock(&p->lock);
    int link = p->link, fd = p->fd;
    struct vd_net_port *peer = p->peer;
    int rc = -ENOTCONN;
    if (link == VD_NET_LINK_FD && fd >= 0) {
        /* Under the port lock, so the fd cannot be closed meanwhile; one
         * write is one frame, however it interleaves with the worker's. */
        ssize_t w = write(fd, frame, len);
        rc = w < 0 ? -errno : 0;
    } else if (link == VD_NET_LINK_PEER && peer != NULL) {
        struct vd_net_ring *rx = &peer->ring[VD_NET_RX];
        struct vd_net_hdr h;
        hdr_decode(frame, &h);
        struct iovec src = { (void *)(frame + VD_NET_LINK_HDR), len - VD_NET_LINK_HDR };
        pthread_mutex_lock(&rx->lock);
        int d = rx_deliver(peer, &h, &src, 1, len - VD_NET_LINK_HDR, false);
        flush_ring(rx, 0);
        pthread_mutex_unlock(&rx->lock);
        rc = d == RX_OK ? 0 : d == RX_NO_BUFFER ? -EAGAIN : -ENOTCONN;
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

int vd_net_ring_start(struct vd_net_port *p, int which, const struct vd_mem *mem, uint16_t size,
                      uint16_t index, uint64_t desc, uint64_t avail, uint64_t used,
                      uint16_t next_avail, uint16_t next_used, bool event_idx, bool indirect,
                      int kick_fd, int call_fd)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    if (r->started) {
        pthread_mutex_unlock(&r->lock);
        return -EBUSY;
    }
    int rc = vd_vring_init(&r->vr, mem, size, index, desc, avail, used, next_avail, next_used,
                           event_idx, indirect);
    if (rc) {
        pthread_mutex_unlock(&r->lock);
        return rc;
    }
    ring_free_buffers(r);
    r->chain.bufs = calloc(vd_chain_cap(size), sizeof *r->chain.bufs);
    r->chain.cap = vd_chain_cap(size);
    r->iov_cap = 2u * size + 64u;
    r->iov = calloc(r->iov_cap, sizeof *r->iov);
    r->iov_gpa = calloc(r->iov_cap, sizeof *r->iov_gpa);
    r->heads = calloc(size, sizeof *r->heads);
    r->iov_at = calloc((size_t)size + 1u, sizeof *r->iov_at);
    struct iovec *txiov = NULL;
    uint32_t txcap = 2u * size + 64u;
    if (which == VD_NET_TX)
        txiov = calloc(txcap, sizeof *txiov);
    if (r->chain.bufs == NULL || r->iov == NULL || r->iov_gpa == NULL || r->heads == NULL || r->iov_at == NULL
        || (which == VD_NET_TX && txiov == NULL)) {
        ring_free_buffers(r);
        free(txiov);
        pthread_mutex_unlock(&r->lock);
        return -ENOMEM;
    }
    if (which == VD_NET_TX) {
        /* Only the worker's transmit batches use it, under this lock. */
        free(p->txiov);
        p->txiov = txiov;
        p->txiov_cap = txcap;
    }
    memset(&r->stats, 0, sizeof r->stats);
    vd_hist_init(&r->hist);
    if (r->call_fd >= 0)
        close(r->call_fd);
    r->call_fd = call_fd;
    r->running = false;
    r->started = true;
    pthread_mutex_unlock(&r->lock);

    pthread_mutex_lock(&p->lock);
    if (r->new_kick_fd >= 0)
        close(r->new_kick_fd);
    r->new_kick_fd = kick_fd;
    pthread_mutex_unlock(&p->lock);
    sync_worker(p);
    return 0;
}

static void set_running(struct vd_net_port *p, int which, bool running)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    RELAXED_STORE(&r->running, running);
    pthread_mutex_unlock(&r->lock);
    /* Once the lock was ours no batch runs on the ring: a hold is complete. */
    if (running)
        wake_all(p);
}

void vd_net_ring_run(struct vd_net_port *p, int which) { set_running(p, which, true); }
void vd_net_ring_hold(struct vd_net_port *p, int which) { set_running(p, which, false); }

void vd_net_ring_set_enabled(struct vd_net_port *p, int which, bool enabled)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    RELAXED_STORE(&r->enabled, enabled);
    pthread_mutex_unlock(&r->lock);
    wake_all(p);
}

int vd_net_ring_set_mem(struct vd_net_port *p, int which, const struct vd_mem *mem)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    int rc = r->started ? vd_vring_set_mem(&r->vr, mem) : 0;
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void vd_net_ring_set_log(struct vd_net_port *p, int which, const struct vd_log *log, bool log_used,
                         uint64_t log_used_gpa)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    /* Under the ring's lock: no batch is between a write and its log entry. */
    pthread_mutex_lock(&r->lock);
    vd_vring_set_log(&r->vr, log, log_used, log_used_gpa);
    pthread_mutex_unlock(&r->lock);
}

void vd_net_ring_set_call(struct vd_net_port *p, int which, int fd)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    /* Whoever signals this ring does so under this lock: the old fd is unused now. */
    if (r->call_fd >= 0)
        close(r->call_fd);
    r->call_fd = fd;
    pthread_mutex_unlock(&r->lock);
}

void vd_net_ring_set_kick(struct vd_net_port *p, int which, int fd)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&p->lock);
    if (r->new_kick_fd >= 0)
        close(r->new_kick_fd);
    r->new_kick_fd = fd;
    pthread_mutex_unlock(&p->lock);
    sync_worker(p);
}

uint16_t vd_net_ring_stop(struct vd_net_port *p, int which, uint16_t *next_used)
{
    struct vd_net_ring *r = &p->ring[which & 1];
    pthread_mutex_lock(&r->lock);
    /* No batch runs now, and none keeps chains popped: next_avail is exact. */
    uint16_t na = r->vr.next_avail, nu = r->vr.next_used;
    bool was = r->started;
    RELAXED_STORE(&r->started, false);
    RELAXED_STORE(&r->running, false);
    if (r->call_fd >= 0)
        close(r->call_fd);
    r->call_fd = -1;
    pthread_mutex_unlock(&r->lock);
    /* The worker stops polling the kick fd and closes it. */
    vd_net_ring_set_kick(p, which, -1);
    if (next_used != NULL)
        *next_used = was ? nu : 0;
    return was ? na : 0;
}

void vd_net_ring_stats(struct vd_net_port *p, int which, struct vd_net_stats *out)
{
    const uint64_t *src = (const uint64_t *)&p->ring[which & 1].stats;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        dst[i] = RELAXED_LOAD(&src[i]);
}

void vd_net_ring_hist(struct vd_net_port *p, int which, struct vd_hist *out)
{
    vd_hist_snapshot(&p->ring[which & 1].hist, out);
}
