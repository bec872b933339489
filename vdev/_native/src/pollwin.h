/* The adaptive busy-polling window shared by the blk engine and net ports.
 *
 * After QEMU's AioContext (util/aio-posix.c): --poll-us is the ceiling and
 * the window is what a worker actually polls after its last piece of work.
 * `idle_ns` is how long the worker waited, polling then sleeping, for the
 * work it just found.  Found within the window: the window is right.
 * Longer than the ceiling: polling would not have caught it, so halve the
 * window (QEMU drops it to 0; halving lets one late request cost one short
 * window, not a regrowth through five sleeps).  In between: a longer window
 * would have caught it, so double it, from 4 us, up to the ceiling.  A
 * queue whose work comes further apart than the ceiling thus stops
 * polling, and one served at a steady rate polls just long enough.
 *
 * Header only, no cdef: nothing of it is called from Python.
 */
#ifndef VDEV_POLLWIN_H
#define VDEV_POLLWIN_H

#include <stdint.h>

/* The first window (QEMU starts at 4 us too). */
#define VD_POLL_START_NS 4000u

static inline uint64_t vd_poll_adapt(uint64_t window, uint64_t idle_ns, uint64_t max_ns)
{
    uint64_t w = window > max_ns ? max_ns : window;   /* the ceiling may have been lowered */
    if (idle_ns <= w)
        return w;                                     /* caught by polling */
    if (idle_ns > max_ns) {
        w /= 2;
        return w < VD_POLL_START_NS ? 0 : w;
    }
    w = w ? w * 2 : VD_POLL_START_NS;
    return w > max_ns ? max_ns : w;
}

#endif
