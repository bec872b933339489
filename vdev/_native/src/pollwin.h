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

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

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

/* One worker's window and its idle clock. */
struct vd_pollwin {
    uint64_t ns;            /* the window now, <= the ceiling */
    uint64_t idle_since;    /* CLOCK_MONOTONIC ns when the ring was last found empty; 0: busy */
};

static inline uint64_t vd_pollwin_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* After a look at the ring that found `taken` pieces of work, under a
 * ceiling of `max_ns` (0: no polling): work ends an idle spell and adapts
 * the window to it; none starts the idle clock.  True when the window was
 * adapted (the caller publishes it). */
static inline bool vd_pollwin_note(struct vd_pollwin *w, int taken, uint64_t max_ns)
{
    if (taken > 0) {
        bool adapted = w->idle_since != 0 && max_ns > 0;
        if (adapted)
            w->ns = vd_poll_adapt(w->ns, vd_pollwin_now() - w->idle_since, max_ns);
        w->idle_since = 0;
        return adapted;
    }
    if (max_ns > 0 && w->idle_since == 0)
        w->idle_since = vd_pollwin_now();
    return false;
}

/* When polling stops: the idle clock plus the window (clamped to a ceiling
 * that may have been lowered since); 0 when there is nothing to poll. */
static inline uint64_t vd_pollwin_deadline(const struct vd_pollwin *w, uint64_t max_ns)
{
    uint64_t win = w->ns < max_ns ? w->ns : max_ns;
    return win == 0 || w->idle_since == 0 ? 0 : w->idle_since + win;
}

#endif
