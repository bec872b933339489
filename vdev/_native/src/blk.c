#include "blk.h"

#include <errno.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <limits.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

/* virtio 1.2 §5.2.6; the limits are those backends/blk/device.py offers. */
#define SECTOR 512u
#define MAX_TRANSFER (32u << 20)
#define MAX_DISCARD_SECTORS ((1u << 23) - 1)
#define MAX_SEGMENTS 16u
#define WZ_F_UNMAP 1u
#define TYPE_BARRIER (1u << 31)
#define ID_BYTES 20u
#define INLINE_IOV 8

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13 };
enum { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };
enum { PHASE_DATA = 0, PHASE_FLUSH = 1 };

struct blk_req {
    bool busy;
    bool holds_write_ref;
    uint8_t type;
    uint8_t phase;
    uint8_t *status;
    uint64_t t_pop;
    uint64_t offset;        /* storage byte offset of the data */
    uint64_t len;           /* data bytes */
    uint64_t done;          /* bytes moved so far (a short transfer is resubmitted) */
    uint32_t used_len;
    int niov;
    struct iovec *iov;      /* the data's iovecs (inline or allocated) */
    struct iovec *iov_alloc;
    int cur;                /* first iovec not yet fully moved */
    uint8_t *bounce;        /* O_DIRECT, misaligned: aligned bounce buffer */
    uint64_t bounce_skip;   /* where the data starts inside it */
    uint64_t bounce_len;
    struct iovec bounce_iov;
    /* Last: scratch that needs no clearing between requests. */
    struct iovec iov_inline[INLINE_IOV];
};

struct blk_dev {
    struct vd_blk_storage *st;
    struct vd_blk_config *cfg;
    struct io_uring ring;
    bool ring_ok;
    int efd;
    uint16_t qsize;
    struct blk_req *reqs;
    uint16_t *parked;
    uint32_t nparked;
    uint32_t own_writes;    /* this queue's direct writes holding a write reference */
};

static uint8_t *zeros;      /* 1 MiB of aligned zeros, for writing zeros and GET_ID padding */
#define ZEROS_LEN (1u << 20)
static pthread_once_t zeros_once = PTHREAD_ONCE_INIT;
static void make_zeros(void)
{
    if (posix_memalign((void **)&zeros, 4096, ZEROS_LEN) == 0)
        memset(zeros, 0, ZEROS_LEN);
}

/* ---- storage ---------------------------------------------------------------------- */

/* A file whose pages live only in memory (tmpfs, ramfs): see sync_rw in blk.h. */
static int memory_backed(int fd)
{
    struct statfs s;
    if (fstatfs(fd, &s) != 0)
        return 0;
    return s.f_type == TMPFS_MAGIC || s.f_type == RAMFS_MAGIC;
}

struct vd_blk_storage *vd_blk_storage_new(int kind, uint8_t *mem, uint64_t size, int fd, int direct,
                                          uint32_t block, int read_only)
{
    struct vd_blk_storage *st = calloc(1, sizeof *st);
    if (st == NULL)
        return NULL;
    st->kind = kind;
    st->mem = mem;
    st->size = size;
    st->fd = fd;
    st->direct = direct;
    st->block = block ? block : SECTOR;
    st->read_only = read_only;
    if (kind == VD_BLK_FILE && !direct && fd >= 0)
        st->sync_rw = memory_backed(fd);
    pthread_mutex_init(&st->lock, NULL);
    pthread_cond_init(&st->cond, NULL);
    return st;
}

void vd_blk_storage_free(struct vd_blk_storage *st)
{
    if (st == NULL)
        return;
    pthread_mutex_destroy(&st->lock);
    pthread_cond_destroy(&st->cond);
    free(st);
}

/* Direct writes take a reference unless a read-modify-write runs; never blocks. */
static bool write_ref_try(struct vd_blk_storage *st)
{
    pthread_mutex_lock(&st->lock);
    bool ok = !st->rmw_active;
    if (ok)
        st->writes_inflight++;
    pthread_mutex_unlock(&st->lock);
    return ok;
}

static void write_ref_put(struct vd_blk_storage *st)
{
    pthread_mutex_lock(&st->lock);
    if (--st->writes_inflight == 0)
        pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->lock);
}

/* ---- the dirty bitmap of a running mirror ------------------------------------------ */

void vd_bitmap_mark(uint64_t *bits, uint64_t nbits, uint32_t shift, uint64_t off, uint64_t len)
{
    if (bits == NULL || len == 0)
        return;
    uint64_t first = off >> shift, last = (off + len - 1) >> shift;
    if (last >= nbits)
        last = nbits - 1;
    for (uint64_t b = first; b <= last && b < nbits; b++)
        __atomic_fetch_or(&bits[b / 64], (uint64_t)1 << (b % 64), __ATOMIC_RELEASE);
}

uint64_t vd_bitmap_take(uint64_t *bits, uint64_t word)
{
    return __atomic_exchange_n(&bits[word], 0, __ATOMIC_ACQ_REL);
}

static void mark_dirty(const struct vd_blk_config *cfg, uint64_t off, uint64_t len)
{
    vd_bitmap_mark(cfg->dirty, cfg->dirty_bits, cfg->dirty_shift, off, len);
}

/* ---- requests ---------------------------------------------------------------------- */

static struct blk_dev *dev_of(struct vd_engine *e) { return e->dev; }

static void req_reset(struct blk_req *r)
{
    free(r->iov_alloc);
    free(r->bounce);
    memset(r, 0, offsetof(struct blk_req, iov_inline));
}

/* iovecs for bytes [skip, skip+len) of a buffer list (regions split): in
 * r->iov_inline, or in an array grown fourfold each time that is full. */
static int build_iov(struct vd_engine *e, struct blk_req *r, const struct vd_buf *bufs, uint32_t n,
                     uint64_t skip, uint64_t len)
{
    struct vd_bufs_walk w = { bufs, n, skip, len };
    struct iovec *iov = r->iov_inline;
    uint32_t cap = INLINE_IOV, cnt = 0;
    int got;
    while ((got = vd_bufs_iov(e->vr.mem, &w, iov + cnt, cap - cnt, NULL)) == VD_IOV_FULL) {
        /* All `cap` entries are filled: move them to a bigger array, map the rest after. */
        uint32_t ncap = cap * 4;
        struct iovec *bigger = malloc(sizeof *bigger * (size_t)ncap);
        if (bigger == NULL)
            return -1;
        memcpy(bigger, iov, sizeof *iov * (size_t)cap);
        free(r->iov_alloc);
        r->iov_alloc = bigger;
        iov = bigger;
        cnt = cap;
        cap = ncap;
    }
    if (got < 0)
        return -1;
    r->iov = iov;
    r->niov = (int)(cnt + (uint32_t)got);
    return r->niov;
}

static uint8_t *status_byte(struct vd_engine *e, const struct vd_chain *c)
{
    for (uint32_t i = c->nread + c->nwrite; i > c->nread; i--) {
        const struct vd_buf *b = &c->bufs[i - 1];
        if (b->len > 0)
            return b->host != NULL ? b->host + b->len - 1
                                   : vd_mem_translate(e->vr.mem, b->gpa + b->len - 1, 1);
    }
    return NULL;
}

static void finish(struct vd_engine *e, uint16_t head, uint8_t status)
{
    struct blk_dev *d = dev_of(e);
    struct blk_req *r = &d->reqs[head];
    if (r->holds_write_ref) {
        write_ref_put(d->st);
        d->own_writes--;
    }
    /* The status byte is guest memory: one byte store. */
    __atomic_store_n(r->status, status, __ATOMIC_RELAXED);
    uint32_t used = status == S_OK ? r->used_len : 1;
    static const int slot[16] = {
        [T_IN] = VD_BLK_STAT_IN, [T_OUT] = VD_BLK_STAT_OUT, [T_FLUSH] = VD_BLK_STAT_FLUSH,
        [T_GET_ID] = VD_BLK_STAT_GET_ID, [T_DISCARD] = VD_BLK_STAT_DISCARD,
        [T_WRITE_ZEROES] = VD_BLK_STAT_WRITE_ZEROES,
    };
    vd_stat_add(&e->stats.by_type[slot[r->type & 15]], 1);
    if (r->type == T_OUT) {
        /* Even a failed write may have changed part of its range.  A bounced
         * write covered whole blocks from its (aligned) offset. */
        mark_dirty(d->cfg, r->offset, r->bounce != NULL ? r->bounce_len : r->len);
    }
    if (status != S_OK) {
        vd_stat_add(&e->stats.errors, 1);
    } else if (r->type == T_IN) {
        vd_stat_add(&e->stats.bytes_read, r->len);
    } else if (r->type == T_OUT) {
        vd_stat_add(&e->stats.bytes_written, r->len);
    }
    uint64_t t = r->t_pop;
    req_reset(r);
    vd_engine_complete(e, head, used, t);
}

/* Answered without touching storage (the checks of parse_request). */
static void reject(struct vd_engine *e, uint16_t head, uint8_t status)
{
    struct blk_req *r = &dev_of(e)->reqs[head];
    __atomic_store_n(r->status, status, __ATOMIC_RELAXED);
    vd_stat_add(&e->stats.by_type[VD_BLK_STAT_REJECTED], 1);
    uint64_t t = r->t_pop;
    req_reset(r);
    vd_engine_complete(e, head, 1, t);
}

static bool range_ok(const struct vd_blk_config *cfg, uint64_t sector, uint64_t nsect)
{
    uint64_t cap = cfg->capacity / SECTOR;
    return sector <= cap && nsect <= cap - sector;
}

/* ---- io_uring ---------------------------------------------------------------------- */

static struct io_uring_sqe *sqe_for(struct blk_dev *d)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
    if (sqe == NULL) {
        io_uring_submit(&d->ring);
        sqe = io_uring_get_sqe(&d->ring);
    }
    return sqe;
}

static void submit_data(struct blk_dev *d, uint16_t head)
{
    struct blk_req *r = &d->reqs[head];
    struct io_uring_sqe *sqe = sqe_for(d);
    if (r->bounce != NULL) {
        r->bounce_iov.iov_base = r->bounce + r->done;
        r->bounce_iov.iov_len = r->bounce_len - r->done;
        if (r->type == T_IN)
            io_uring_prep_readv(sqe, d->st->fd, &r->bounce_iov, 1, r->offset + r->done);
        else
            io_uring_prep_writev(sqe, d->st->fd, &r->bounce_iov, 1, r->offset + r->done);
    } else if (r->type == T_IN) {
        io_uring_prep_readv(sqe, d->st->fd, r->iov + r->cur, (unsigned)(r->niov - r->cur), r->offset + r->done);
    } else {
        io_uring_prep_writev(sqe, d->st->fd, r->iov + r->cur, (unsigned)(r->niov - r->cur), r->offset + r->done);
    }
    io_uring_sqe_set_data64(sqe, head);
}

static void submit_flush(struct blk_dev *d, uint16_t head)
{
    struct io_uring_sqe *sqe = sqe_for(d);
    io_uring_prep_fsync(sqe, d->st->fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, head);
}

/* Advance past `n` moved bytes (a short transfer resumes where it stopped). */
static void advance(struct blk_req *r, uint64_t n)
{
    r->done += n;
    if (r->bounce != NULL)
        return;
    while (n > 0 && r->cur < r->niov) {
        struct iovec *v = &r->iov[r->cur];
        if (n < v->iov_len) {
            v->iov_base = (uint8_t *)v->iov_base + n;
            v->iov_len -= n;
            return;
        }
        n -= v->iov_len;
        r->cur++;
    }
}

static void copy_out_bounce(struct blk_req *r)
{
    uint64_t pos = r->bounce_skip;
    for (int i = 0; i < r->niov; i++) {
        memcpy(r->iov[i].iov_base, r->bounce + pos, r->iov[i].iov_len);
        pos += r->iov[i].iov_len;
    }
}

static void on_cqe(struct vd_engine *e, uint16_t head, int res)
{
    struct blk_dev *d = dev_of(e);
    struct blk_req *r = &d->reqs[head];
    if (res < 0) {
        finish(e, head, S_IOERR);
        return;
    }
    if (r->phase == PHASE_FLUSH || r->type == T_FLUSH) {
        finish(e, head, S_OK);
        return;
    }
    uint64_t want = r->bounce != NULL ? r->bounce_len : r->len;
    if (res == 0 && r->done < want) {
        /* End of file before the data: a short read or write. */
        if (r->type == T_IN && r->bounce != NULL && r->done >= r->bounce_skip + r->len) {
            /* the bounce span ran past the end of the image, the data did not */
        } else {
            finish(e, head, S_IOERR);
            return;
        }
    } else {
        advance(r, (uint64_t)res);
        if (r->done < want) {
            submit_data(d, head);
            return;
        }
    }
    if (r->type == T_IN && r->bounce != NULL)
        copy_out_bounce(r);
    if (r->type == T_OUT && !__atomic_load_n(&d->cfg->wce, __ATOMIC_RELAXED)) {
        /* Writethrough: durable before it is acknowledged. */
        if (r->holds_write_ref) {
            write_ref_put(d->st);
            d->own_writes--;
            r->holds_write_ref = false;
        }
        r->phase = PHASE_FLUSH;
        submit_flush(d, head);
        return;
    }
    finish(e, head, S_OK);
}

static int blk_reap(struct vd_engine *e)
{
    struct blk_dev *d = dev_of(e);
    if (!d->ring_ok)
        return 0;
    int n = 0;
    struct io_uring_cqe *cqe;
    while (io_uring_peek_cqe(&d->ring, &cqe) == 0) {
        uint16_t head = (uint16_t)io_uring_cqe_get_data64(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&d->ring, cqe);
        on_cqe(e, head, res);
        n++;
    }
    if (n)
        io_uring_submit(&d->ring);   /* resubmissions and flush phases */
    return n;
}

static void blk_submit(struct vd_engine *e)
{
    struct blk_dev *d = dev_of(e);
    if (d->ring_ok && io_uring_sq_ready(&d->ring))
        io_uring_submit(&d->ring);
}

static int blk_event_fd(struct vd_engine *e)
{
    return dev_of(e)->efd;
}

/* ---- the storage kinds ------------------------------------------------------------- */

static void mem_zero(struct vd_blk_storage *st, uint64_t off, uint64_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t first = (off + (uint64_t)page - 1) / (uint64_t)page * (uint64_t)page;
    uint64_t last = (off + len) / (uint64_t)page * (uint64_t)page;
    if (last > first && last - first >= (uint64_t)page
        && madvise(st->mem + first, last - first, MADV_DONTNEED) == 0) {
        /* Whole pages of the private mapping go back to the kernel and read as zeros. */
        memset(st->mem + off, 0, first - off);
        memset(st->mem + last, 0, off + len - last);
    } else {
        memset(st->mem + off, 0, len);
    }
}

static bool unsupported_errno(int err)
{
    return err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS;
}

static int pwrite_full(int fd, const uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n;
        len -= (uint64_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int pread_full(int fd, uint8_t *buf, uint64_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        buf += n;
        len -= (uint64_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

static int file_write_zeros(struct vd_blk_storage *st, uint64_t off, uint64_t len)
{
    pthread_once(&zeros_once, make_zeros);
    if (zeros == NULL)
        return -ENOMEM;
    while (len > 0) {
        uint64_t k = len < ZEROS_LEN ? len : ZEROS_LEN;
        int rc = pwrite_full(st->fd, zeros, k, off);
        if (rc)
            return rc;
        off += k;
        len -= k;
    }
    return 0;
}

/* fallocate(PUNCH_HOLE): 1 done, 0 not possible here (advisory), <0 error. */
static int file_punch(struct vd_blk_storage *st, uint64_t off, uint64_t len)
{
    if (__atomic_load_n(&st->no_punch, __ATOMIC_RELAXED))
        return 0;
    if (fallocate(st->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
        return 1;
    if (unsupported_errno(errno)) {
        __atomic_store_n(&st->no_punch, 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (errno == EINVAL)
        return 0;        /* an unaligned range on a device: advisory, skip */
    return -errno;
}

static int file_discard_or_zero(struct vd_blk_storage *st, bool zero, bool may_unmap, uint64_t off,
                                uint64_t len)
{
    if (len == 0)
        return 0;
    if (!zero) {
        int rc = file_punch(st, off, len);
        return rc < 0 ? rc : 0;
    }
    if (may_unmap && file_punch(st, off, len) == 1)
        return 0;
    if (!__atomic_load_n(&st->no_zero_range, __ATOMIC_RELAXED)) {
        if (fallocate(st->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
            return 0;
        if (unsupported_errno(errno))
            __atomic_store_n(&st->no_zero_range, 1, __ATOMIC_RELAXED);
        else if (errno != EINVAL)
            return -errno;
    }
    return file_write_zeros(st, off, len);
}

/* Exclusive section of a direct storage: every write of every queue finished,
 * none starts until rmw_end.  Our own writes are finished first. */
static void rmw_begin(struct vd_engine *e)
{
    struct blk_dev *d = dev_of(e);
    while (d->own_writes > 0) {
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&d->ring, &cqe) == 0) {
            uint16_t head = (uint16_t)io_uring_cqe_get_data64(cqe);
            int res = cqe->res;
            io_uring_cqe_seen(&d->ring, cqe);
            on_cqe(e, head, res);
            io_uring_submit(&d->ring);
        }
    }
    struct vd_blk_storage *st = d->st;
    pthread_mutex_lock(&st->lock);
    while (st->rmw_active)
        pthread_cond_wait(&st->cond, &st->lock);
    st->rmw_active = 1;
    while (st->writes_inflight > 0)
        pthread_cond_wait(&st->cond, &st->lock);
    pthread_mutex_unlock(&st->lock);
}

static void rmw_end(struct vd_blk_storage *st)
{
    pthread_mutex_lock(&st->lock);
    st->rmw_active = 0;
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->lock);
}

/* A write covering part of a block under O_DIRECT: read the covering blocks,
 * patch them, write them back, with no other write in between. */
static uint8_t rmw_write(struct vd_engine *e, struct blk_req *r)
{
    struct vd_blk_storage *st = dev_of(e)->st;
    uint64_t b = st->block, start = r->offset / b * b;
    uint64_t end = (r->offset + r->len + b - 1) / b * b;
    if (end > st->size)
        return S_IOERR;   /* the covering block would grow the image */
    uint8_t *buf;
    if (posix_memalign((void **)&buf, b < 4096 ? 4096 : b, end - start))
        return S_IOERR;
    uint8_t status = S_OK;
    rmw_begin(e);
    if (pread_full(st->fd, buf, end - start, start)) {
        status = S_IOERR;
    } else {
        uint64_t pos = r->offset - start;
        for (int i = 0; i < r->niov; i++) {
            memcpy(buf + pos, r->iov[i].iov_base, r->iov[i].iov_len);
            pos += r->iov[i].iov_len;
        }
        if (pwrite_full(st->fd, buf, end - start, start))
            status = S_IOERR;
        else if (!__atomic_load_n(&dev_of(e)->cfg->wce, __ATOMIC_RELAXED) && fdatasync(st->fd))
            status = S_IOERR;
    }
    rmw_end(st);
    free(buf);
    return status;
}

static bool iov_aligned(const struct blk_req *r, uint64_t b)
{
    if (r->offset % b || r->len % b)
        return false;
    for (int i = 0; i < r->niov; i++)
        if ((uintptr_t)r->iov[i].iov_base % b || r->iov[i].iov_len % b)
            return false;
    return true;
}

/* A read or write of a memory-backed file, done here (sync_rw): short
 * transfers resume where they stopped; the end of the file before the data
 * is an I/O error, as on the io_uring path. */
static uint8_t file_rw_sync(struct vd_engine *e, struct blk_req *r)
{
    struct blk_dev *d = dev_of(e);
    int fd = d->st->fd;
    while (r->done < r->len) {
        int cnt = r->niov - r->cur;
        if (cnt > IOV_MAX)
            cnt = IOV_MAX;
        off_t off = (off_t)(r->offset + r->done);
        ssize_t n = r->type == T_IN ? preadv(fd, r->iov + r->cur, cnt, off)
                                    : pwritev(fd, r->iov + r->cur, cnt, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return S_IOERR;
        }
        if (n == 0)
            return S_IOERR;
        advance(r, (uint64_t)n);
    }
    /* Writethrough: durable before it is acknowledged. */
    if (r->type == T_OUT && !__atomic_load_n(&d->cfg->wce, __ATOMIC_RELAXED) && fdatasync(fd))
        return S_IOERR;
    return S_OK;
}

/* Start a read or write on a file; returns true if it went to io_uring,
 * false if it was parked (a read-modify-write runs on this storage). */
static bool file_rw(struct vd_engine *e, uint16_t head)
{
    struct blk_dev *d = dev_of(e);
    struct blk_req *r = &d->reqs[head];
    struct vd_blk_storage *st = d->st;
    if (st->direct && !iov_aligned(r, st->block) && r->bounce == NULL) {
        uint64_t b = st->block, start = r->offset / b * b;
        uint64_t end = (r->offset + r->len + b - 1) / b * b;
        if (posix_memalign((void **)&r->bounce, b < 4096 ? 4096 : b, end - start)) {
            finish(e, head, S_IOERR);
            return true;
        }
        r->bounce_skip = r->offset - start;
        r->bounce_len = end - start;
        if (r->type == T_OUT) {
            uint64_t pos = 0;
            for (int i = 0; i < r->niov; i++) {
                memcpy(r->bounce + pos, r->iov[i].iov_base, r->iov[i].iov_len);
                pos += r->iov[i].iov_len;
            }
        }
        r->offset = start;
    }
    if (r->type == T_OUT && st->direct) {
        if (!write_ref_try(st))
            return false;
        r->holds_write_ref = true;
        d->own_writes++;
    }
    submit_data(d, head);
    return true;
}

static void park(struct blk_dev *d, uint16_t head)
{
    d->parked[d->nparked++] = head;
}

static int blk_parked(struct vd_engine *e)
{
    return dev_of(e)->nparked ? 1 : 0;
}

static void blk_handle_parked(struct vd_engine *e)
{
    struct blk_dev *d = dev_of(e);
    uint32_t n = d->nparked, kept = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t head = d->parked[i];
        if (!file_rw(e, head))
            d->parked[kept++] = head;
    }
    d->nparked = kept;
    blk_submit(e);
}

/* ---- requests: parse (exactly parse_request's checks), then execute ----------------- */

static void execute_rw(struct vd_engine *e, uint16_t head)
{
    struct blk_dev *d = dev_of(e);
    struct blk_req *r = &d->reqs[head];
    struct vd_blk_storage *st = d->st;
    switch (st->kind) {
    case VD_BLK_NULL:
        if (r->type == T_IN)
            for (int i = 0; i < r->niov; i++)
                memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
        finish(e, head, S_OK);
        return;
    case VD_BLK_MEM: {
        if (r->offset + r->len > st->size) {
            finish(e, head, S_IOERR);
            return;
        }
        uint64_t pos = r->offset;
        for (int i = 0; i < r->niov; i++) {
            if (r->type == T_IN)
                memcpy(r->iov[i].iov_base, st->mem + pos, r->iov[i].iov_len);
            else
                memcpy(st->mem + pos, r->iov[i].iov_base, r->iov[i].iov_len);
            pos += r->iov[i].iov_len;
        }
        finish(e, head, S_OK);
        return;
    }
    default:
        if (r->offset + r->len > st->size) {
            finish(e, head, S_IOERR);
            return;
        }
        if (r->len == 0) {
            if (r->type == T_OUT && !__atomic_load_n(&d->cfg->wce, __ATOMIC_RELAXED)) {
                r->phase = PHASE_FLUSH;
                submit_flush(d, head);
            } else {
                finish(e, head, S_OK);
            }
            return;
        }
        if (st->sync_rw) {
            finish(e, head, file_rw_sync(e, r));
            return;
        }
        if (r->type == T_OUT && st->direct && (r->offset % st->block || r->len % st->block)) {
            finish(e, head, rmw_write(e, r));
            return;
        }
        if (!file_rw(e, head))
            park(d, head);
        return;
    }
}

static void execute_segments(struct vd_engine *e, uint16_t head, const uint8_t *raw, uint32_t nseg)
{
    struct blk_dev *d = dev_of(e);
    struct blk_req *r = &d->reqs[head];
    struct vd_blk_storage *st = d->st;
    bool zero = r->type == T_WRITE_ZEROES;
    bool exclusive = st->kind == VD_BLK_FILE && st->direct;
    if (exclusive)
        rmw_begin(e);
    uint8_t status = S_OK;
    for (uint32_t i = 0; i < nseg && status == S_OK; i++) {
        uint64_t sector;
        uint32_t nsect, flags;
        memcpy(&sector, raw + 16 * i, 8);
        memcpy(&nsect, raw + 16 * i + 8, 4);
        memcpy(&flags, raw + 16 * i + 12, 4);
        uint64_t off = sector * SECTOR, len = (uint64_t)nsect * SECTOR;
        if (st->read_only) {
            status = S_IOERR;
        } else if (off + len > st->size) {
            status = S_IOERR;
        } else if (st->kind == VD_BLK_MEM) {
            mem_zero(st, off, len);
        } else if (st->kind == VD_BLK_FILE) {
            if (file_discard_or_zero(st, zero, flags & WZ_F_UNMAP, off, len) < 0)
                status = S_IOERR;
        }
        /* Marked even when it failed: part of the range may have changed. */
        mark_dirty(d->cfg, off, len);
    }
    if (exclusive)
        rmw_end(st);
    finish(e, head, status);
}

static int blk_handle(struct vd_engine *e, struct vd_chain *c)
{
    struct blk_dev *d = dev_of(e);
    const struct vd_blk_config *cfg = d->cfg;
    uint16_t head = c->head;
    uint64_t t = vd_now_ns();
    struct blk_req *r = &d->reqs[head];
    uint8_t *status = c->write_len >= 1 ? status_byte(e, c) : NULL;
    if (status == NULL || r->busy) {
        /* No writable byte for a status (or a head the driver reused while
         * it is in flight): nothing can be answered; the head goes back. */
        vd_stat_add(&e->stats.bad_chains, 1);
        vd_engine_complete(e, head, 0, 0);
        return 1;
    }
    r->busy = true;
    r->t_pop = t;
    r->status = status;
    uint64_t in_len = c->write_len - 1;
    const struct vd_buf *rd = c->bufs, *wr = c->bufs + c->nread;

    if (c->read_len < 16) {
        reject(e, head, S_IOERR);
        return 1;
    }
    uint8_t hdr[16];
    if (rd[0].host != NULL && rd[0].len >= 16)
        memcpy(hdr, rd[0].host, 16);
    else
        vd_bufs_copy_out(e->vr.mem, rd, c->nread, 0, hdr, 16);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    type &= ~TYPE_BARRIER;
    r->type = (uint8_t)type;

    switch (type) {
    case T_IN:
    case T_OUT: {
        uint64_t n;
        if (type == T_IN) {
            n = in_len;
        } else {
            if (cfg->read_only) {
                reject(e, head, S_IOERR);
                return 1;
            }
            n = c->read_len - 16;
        }
        if (n % SECTOR || n > MAX_TRANSFER || !range_ok(cfg, sector, n / SECTOR)) {
            reject(e, head, S_IOERR);
            return 1;
        }
        r->offset = sector * SECTOR;
        r->len = n;
        r->used_len = (uint32_t)(type == T_IN ? n + 1 : 1);
        if ((type == T_IN ? build_iov(e, r, wr, c->nwrite, 0, n)
                          : build_iov(e, r, rd, c->nread, 16, n)) < 0) {
            finish(e, head, S_IOERR);
            return 1;
        }
        execute_rw(e, head);
        return !r->busy;
    }
    case T_FLUSH:
        r->used_len = 1;
        if (d->st->kind == VD_BLK_FILE && d->st->sync_rw) {
            finish(e, head, fdatasync(d->st->fd) ? S_IOERR : S_OK);
            return 1;
        }
        if (d->st->kind == VD_BLK_FILE) {
            submit_flush(d, head);
            return 0;
        }
        finish(e, head, S_OK);
        return 1;
    case T_GET_ID: {
        uint64_t n = in_len < ID_BYTES ? in_len : ID_BYTES;
        vd_bufs_copy_in(e->vr.mem, wr, c->nwrite, 0, cfg->serial, n);
        r->used_len = (uint32_t)n + 1;
        finish(e, head, S_OK);
        return 1;
    }
    case T_DISCARD:
    case T_WRITE_ZEROES: {
        bool enabled = type == T_DISCARD ? cfg->discard : cfg->write_zeroes;
        if (!enabled) {
            reject(e, head, S_UNSUPP);
            return 1;
        }
        if (cfg->read_only) {
            reject(e, head, S_IOERR);
            return 1;
        }
        uint64_t payload = c->read_len - 16;
        if (payload == 0 || payload % 16 || payload / 16 > MAX_SEGMENTS) {
            reject(e, head, S_IOERR);
            return 1;
        }
        uint32_t nseg = (uint32_t)(payload / 16);
        uint8_t raw[16 * MAX_SEGMENTS];
        vd_bufs_copy_out(e->vr.mem, rd, c->nread, 16, raw, payload);
        uint32_t allowed = type == T_WRITE_ZEROES ? WZ_F_UNMAP : 0;
        for (uint32_t i = 0; i < nseg; i++) {
            uint64_t s;
            uint32_t nsect, flags;
            memcpy(&s, raw + 16 * i, 8);
            memcpy(&nsect, raw + 16 * i + 8, 4);
            memcpy(&flags, raw + 16 * i + 12, 4);
            /* §5.2.6.2: unknown flags (or UNMAP on a discard) -> UNSUPP */
            if (flags & ~allowed) {
                reject(e, head, S_UNSUPP);
                return 1;
            }
            if (nsect > MAX_DISCARD_SECTORS || !range_ok(cfg, s, nsect)) {
                reject(e, head, S_IOERR);
                return 1;
            }
        }
        r->used_len = 1;
        execute_segments(e, head, raw, nseg);
        return 1;
    }
    default:
        /* unknown types, GET_LIFETIME and SECURE_ERASE */
        reject(e, head, S_UNSUPP);
        return 1;
    }
}

/* §5.2.6: a chain with a buffer outside guest memory still gets IOERR when
 * its last descriptor (the status) is a sound writable buffer. */
static uint32_t blk_bad_chain(struct vd_engine *e, struct vd_chain *c)
{
    if (!c->has_tail)
        return 0;
    uint8_t *s = vd_mem_translate(e->vr.mem, c->tail.gpa + c->tail.len - 1, 1);
    if (s == NULL)
        return 0;
    __atomic_store_n(s, (uint8_t)S_IOERR, __ATOMIC_RELAXED);
    vd_stat_add(&e->stats.by_type[VD_BLK_STAT_REJECTED], 1);
    return 1;
}

static void blk_destroy(struct vd_engine *e)
{
    struct blk_dev *d = dev_of(e);
    if (d == NULL)
        return;
    if (d->ring_ok) {
        io_uring_unregister_eventfd(&d->ring);
        io_uring_queue_exit(&d->ring);
    }
    if (d->efd >= 0)
        close(d->efd);
    for (uint32_t i = 0; i < d->qsize; i++)
        req_reset(&d->reqs[i]);
    free(d->reqs);
    free(d->parked);
    free(d);
    e->dev = NULL;
}

static const struct vd_engine_ops blk_ops = {
    .handle = blk_handle,
    .bad_chain = blk_bad_chain,
    .submit = blk_submit,
    .reap = blk_reap,
    .event_fd = blk_event_fd,
    .parked = blk_parked,
    .handle_parked = blk_handle_parked,
    .destroy = blk_destroy,
};

/* io_uring and its completion eventfd, only for file storage (two fds per
 * queue that null: and mem: do not need).  0, or -1 with errno set. */
static int setup_ring(struct blk_dev *d)
{
    if (d->ring_ok)
        return 0;
    int rc = io_uring_queue_init(d->qsize, &d->ring, 0);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    d->ring_ok = true;
    d->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->efd < 0)
        return -1;
    rc = io_uring_register_eventfd(&d->ring, d->efd);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return 0;
}

struct vd_engine *vd_blk_engine_new(struct vd_blk_storage *st, struct vd_blk_config *cfg,
                                    uint16_t queue_size)
{
    struct blk_dev *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    d->st = st;
    d->cfg = cfg;
    d->qsize = queue_size;
    d->efd = -1;
    d->reqs = calloc(queue_size, sizeof *d->reqs);
    d->parked = calloc(queue_size, sizeof *d->parked);
    if (d->reqs == NULL || d->parked == NULL)
        goto fail;
    if (st->kind == VD_BLK_FILE && setup_ring(d) < 0)
        goto fail;
    struct vd_engine *e = vd_engine_alloc(&blk_ops, d);
    if (e == NULL)
        goto fail;
    return e;
fail:;
    int saved = errno;
    struct vd_engine tmp = { .dev = d };
    blk_destroy(&tmp);
    errno = saved ? saved : ENOMEM;
    return NULL;
}

int vd_blk_engine_set_storage(struct vd_engine *e, struct vd_blk_storage *st)
{
    struct blk_dev *d = dev_of(e);
    if (st->kind == VD_BLK_FILE && setup_ring(d) < 0)
        return -errno;
    d->st = st;
    return 0;
}
