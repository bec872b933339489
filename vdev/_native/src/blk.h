/* The native virtio-blk engine (virtio 1.2 §5.2): requests parsed, executed
 * and answered in the queue's worker thread, no Python per request.
 *
 * Parsing applies exactly the checks of backends/blk/device.py
 * `parse_request` (same statuses for the same chains; the blk tests run on
 * both paths).  Storage executed natively:
 *   null  reads zeros, drops writes;
 *   mem   memcpy into / out of the mem: storage's mapping;
 *   file  io_uring (readv / writev / fsync), many requests in flight per
 *         queue; DISCARD and WRITE_ZEROES as fallocate (PUNCH_HOLE,
 *         ZERO_RANGE, falling back to writing zeros), done inline since
 *         they are rare.  A file on tmpfs or ramfs (without O_DIRECT) is
 *         read and written by the worker itself with preadv / pwritev:
 *         such a file cannot be read without blocking (no RWF_NOWAIT), so
 *         io_uring would hand every request to an io-wq thread - a context
 *         switch and a completion-eventfd wake-up each - for a copy from
 *         or into memory that never waits for a device anyway.
 * With O_DIRECT, a request whose offset, length or memory is not aligned to
 * the storage's logical block size goes through an aligned bounce buffer;
 * a write covering part of a block is a read-modify-write, which runs
 * exclusively against every other write to that storage from any queue (a
 * write arriving meanwhile is parked and retried), so an aligned write
 * racing it can never be lost (issue 11, item 1).
 *
 * A `struct vd_blk_storage` is shared by the engines of every queue; a
 * `struct vd_blk_config` too.  Python changes either only while every
 * engine is held and idle, except `wce`, a single int the worker reads
 * atomically per request.
 */
#ifndef VDEV_BLK_H
#define VDEV_BLK_H

#include <pthread.h>
#include <stdint.h>

#include "engine.h"

enum { VD_BLK_NULL = 0, VD_BLK_MEM = 1, VD_BLK_FILE = 2 };

/* Counter slots of struct vd_engine_stats.by_type for virtio-blk. */
enum {
    VD_BLK_STAT_IN = 0,
    VD_BLK_STAT_OUT = 1,
    VD_BLK_STAT_FLUSH = 2,
    VD_BLK_STAT_GET_ID = 3,
    VD_BLK_STAT_DISCARD = 4,
    VD_BLK_STAT_WRITE_ZEROES = 5,
    VD_BLK_STAT_REJECTED = 6,
};

struct vd_blk_storage {
    int kind;
    uint8_t *mem;         /* VD_BLK_MEM */
    uint64_t size;        /* bytes of storage */
    int fd;               /* VD_BLK_FILE: owned by the Python storage object */
    int direct;           /* fd has O_DIRECT */
    int sync_rw;          /* tmpfs / ramfs, not direct: reads and writes done in the worker */
    uint32_t block;       /* logical block size */
    int read_only;
    /* learned: fallocate modes the file does not support */
    int no_punch;
    int no_zero_range;
    /* read-modify-write exclusion (direct only) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t writes_inflight;
    int rmw_active;
};

struct vd_blk_config {
    uint64_t capacity;    /* bytes, a multiple of 512 */
    int read_only;
    int discard;          /* negotiated */
    int write_zeroes;     /* negotiated */
    int wce;              /* 1 writeback; 0 writethrough: flush after every write */
    uint8_t serial[20];
    /* While a mirror runs: one bit per (1 << dirty_shift) bytes, set (atomic
     * OR) when a write, discard or write-zeroes to it completes; NULL otherwise.
     * Only changed while every engine is held. */
    uint64_t *dirty;
    uint64_t dirty_bits;
    uint32_t dirty_shift;
};

struct vd_blk_storage *vd_blk_storage_new(int kind, uint8_t *mem, uint64_t size, int fd, int direct,
                                          uint32_t block, int read_only);
void vd_blk_storage_free(struct vd_blk_storage *st);
/* A queue engine over `st` and `cfg` (both outlive it); NULL on ENOMEM or
 * when io_uring cannot be set up (errno says which). */
struct vd_engine *vd_blk_engine_new(struct vd_blk_storage *st, struct vd_blk_config *cfg,
                                    uint16_t queue_size);
/* Only while the engine is held and idle; 0 or -errno (io_uring set-up for file storage). */
int vd_blk_engine_set_storage(struct vd_engine *e, struct vd_blk_storage *st);

/* The dirty bitmap's two sides: writers mark a byte range, the mirror takes
 * (reads and clears, atomically) one 64-bit word at a time. */
void vd_bitmap_mark(uint64_t *bits, uint64_t nbits, uint32_t shift, uint64_t off, uint64_t len);
uint64_t vd_bitmap_take(uint64_t *bits, uint64_t word);

#endif
