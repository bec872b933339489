/* The native virtio-net data path (virtio 1.2 §5.1): one worker thread per
 * queue pair, moving frames between rings and a link with no Python per
 * frame.
 *
 * Why not the generic queue engine (engine.h): an engine is one ring with
 * one thread that pops every available chain as soon as it is kicked.  A
 * net queue pair is two rings served together, and its receive ring must
 * be popped only when a frame is there to fill it: a chain popped early
 * and held would be lost at GET_VRING_BASE, and a frame's size decides how
 * many mergeable buffers it takes.  On a cable the receive ring is even
 * filled by the *other* device's worker.  So net has its own worker here,
 * built on vring.h like the engine, with the same control shape per ring
 * (start, run, hold, set_mem, set_call, set_kick, stop, stats, hist) so
 * the Python runtime drives each ring like any native engine.
 *
 * A port is one queue pair: ring 0 receive (the guest's rxq), ring 1
 * transmit.  Its worker serves the port's transmit ring and sends every
 * frame to the port's link:
 *
 *   VD_NET_LINK_FD    a TAP queue fd (IFF_VNET_HDR, header size 12) or one
 *                     end of a SOCK_SEQPACKET socket pair (a cable between
 *                     two daemons): writev of [header | frame]; the worker
 *                     also reads frames from the fd into a bounce buffer
 *                     and delivers them into its own receive ring;
 *   VD_NET_LINK_PEER  another port (a cable inside one process) or the
 *                     port itself (loopback): frames are copied straight
 *                     from the transmit chain into the peer's receive
 *                     buffers (memcpy between the two guests' memories);
 *   VD_NET_LINK_NONE  no link (cable not connected): frames are dropped.
 *
 * Locking.  Each ring has a mutex held by whoever works on it for one
 * batch: the port's own worker (transmit ring; receive ring on an fd link)
 * or the worker filling it (the peer's, or its own on loopback).  Python's
 * control calls take the same mutex, so once `vd_net_ring_hold` returns no
 * batch is running on that ring and none will start until it runs again;
 * chains are never kept popped between batches (what does not go through
 * is un-popped), so a held ring is idle.  A worker takes its own transmit
 * lock, then the receiving ring's lock: never the other way round, so two
 * ports sending to each other cannot deadlock.  Kick fds are polled by the
 * port's own worker and changed through a handshake with it (`sync`).
 *
 * Receive with no buffers (the bounded policy): a frame that finds the
 * receive ring without enough buffers waits, and nothing is taken from
 * either ring: on an fd link the frame stays in the bounce buffer and the
 * fd is not read, so further frames wait in the kernel (a TAP's queue,
 * or the peer daemon's socket, which then stops that sender); on a peer
 * link the transmit chain stays in the sender's ring.  The wait is counted
 * once (`no_buffer`).  When buffers arrive (the receive ring's kick) the
 * frame goes in.  If none arrive within `no_buffer_wait_ms`, the receiver
 * is treated as gone: frames for it are dropped and counted
 * (`no_buffer_drops`) until it posts buffers again, so a stalled guest
 * cannot stall its cable peer for ever or have stale frames queue up.
 *
 * Headers.  The guest's header is `virtio_net_hdr_v1` (12 bytes with
 * VERSION_1 or MRG_RXBUF, else the 10-byte legacy form).  It is copied
 * once out of guest memory, checked (what we check is what we send), and
 * passed on: to a TAP as its vnet header (the kernel does the offloads),
 * or to the receiving guest, whose negotiated offloads it must respect: a
 * partial checksum for a receiver without GUEST_CSUM is completed here, a
 * GSO frame for a receiver without the matching GUEST_ feature is dropped
 * and counted (`offload_drops`).
 *
 * Counters (struct vd_net_stats) are per ring, written by the one worker
 * working on the ring (under its mutex) with relaxed stores and read by
 * Python at any time.  The histogram is per batch: the time from a
 * batch's first pop to its publication, in ns.
 */
#ifndef VDEV_NET_H
#define VDEV_NET_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "hist.h"
#include "vring.h"

enum { VD_NET_RX = 0, VD_NET_TX = 1 };
enum { VD_NET_LINK_NONE = 0, VD_NET_LINK_FD = 1, VD_NET_LINK_PEER = 2 };

/* virtio 1.2 §5.1.3 feature bits (masks), as far as the data path cares. */
#define VD_NET_F_CSUM (1ull << 0)
#define VD_NET_F_GUEST_CSUM (1ull << 1)
#define VD_NET_F_GUEST_TSO4 (1ull << 7)
#define VD_NET_F_GUEST_TSO6 (1ull << 8)
#define VD_NET_F_GUEST_ECN (1ull << 9)
#define VD_NET_F_GUEST_UFO (1ull << 10)
#define VD_NET_F_HOST_TSO4 (1ull << 11)
#define VD_NET_F_HOST_TSO6 (1ull << 12)
#define VD_NET_F_HOST_ECN (1ull << 13)
#define VD_NET_F_HOST_UFO (1ull << 14)
#define VD_NET_F_MRG_RXBUF (1ull << 15)
#define VD_NET_F_VERSION_1 (1ull << 32)

/* virtio_net_hdr (§5.1.6) */
#define VD_NET_HDR_F_NEEDS_CSUM 1
#define VD_NET_HDR_F_DATA_VALID 2
#define VD_NET_HDR_GSO_NONE 0
#define VD_NET_HDR_GSO_TCPV4 1
#define VD_NET_HDR_GSO_UDP 3
#define VD_NET_HDR_GSO_TCPV6 4
#define VD_NET_HDR_GSO_ECN 0x80

/* The header on a link (TAP vnet header, cable datagram): always the 12-byte form. */
#define VD_NET_LINK_HDR 12
/* Largest frame (without the virtio header): a 64 KiB GSO packet plus its
 * Ethernet and VLAN headers. */
#define VD_NET_MAX_FRAME (65535u + 14u + 4u)
#define VD_NET_ETH_HLEN 14u

struct vd_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* Per device, shared by its ports.  Python writes it before the rings start
 * (SET_FEATURES comes first); every field is an aligned word. */
struct vd_net_cfg {
    uint64_t features;          /* negotiated virtio features */
    uint32_t no_buffer_wait_ms; /* see "Receive with no buffers" */
};

struct vd_net_stats {
    uint64_t frames;            /* frames completed (tx: sent or delivered; rx: received) */
    uint64_t bytes;             /* their bytes, without the virtio header */
    uint64_t buffers;           /* chains used (rx: num_buffers summed) */
    uint64_t dropped;           /* frames dropped, every cause below included */
    uint64_t bad_header;        /* tx: a header the device refuses */
    uint64_t too_short;         /* tx: shorter than the header plus an Ethernet header */
    uint64_t too_big;           /* longer than the largest frame, or than a receiver without MRG_RXBUF takes */
    uint64_t no_buffer;         /* rx: a frame found no (or too few) buffers and waited */
    uint64_t no_buffer_drops;   /* rx: frames dropped after the wait bound */
    uint64_t offload_drops;     /* rx: GSO frames the receiver did not accept the offload for */
    uint64_t link_errors;       /* reads or writes the link refused */
    uint64_t link_down_drops;   /* tx: frames with nowhere to go (no link, receiver stopped) */
    uint64_t disabled_drops;    /* tx: frames discarded while the ring was disabled */
    uint64_t bad_chains;        /* malformed chains returned to the driver */
    uint64_t kicks;             /* kick eventfd counts read */
    uint64_t wakeups;           /* worker wake-ups */
    uint64_t calls;             /* call eventfd writes */
    uint64_t calls_suppressed;  /* batches the driver wanted no interrupt for */
    uint64_t batches;           /* batches published */
    uint64_t polled;            /* tx: batches found by busy-polling, not a kick */
    uint64_t poll_ns;           /* tx: the adaptive polling window now (a gauge) */
    uint64_t last_errno;        /* errno of the last link error */
    uint64_t broken;            /* 0, or the ring error that broke the queue */
};

struct vd_net_port;

struct vd_net_ring {
    pthread_mutex_t lock;
    struct vd_vring vr;
    struct vd_chain chain;
    bool started;
    bool running;               /* not held by Python */
    bool enabled;               /* SET_VRING_ENABLE */
    int call_fd;                /* under lock */
    int kick_fd;                /* the worker's */
    int new_kick_fd;            /* -2: no change pending (under the port's lock) */
    struct vd_net_stats stats;
    struct vd_hist hist;
    /* receive ring, for its filler: the chains of the frame being placed */
    struct iovec *iov;
    uint64_t *iov_gpa;          /* guest address of each iovec (dirty log) */
    uint32_t iov_cap;
    uint16_t *heads;
    uint32_t *iov_at;           /* first iovec of each chain */
};

/* Create a port (queue pair `pair`) and start its worker; NULL on ENOMEM. */
struct vd_net_port *vd_net_port_new(struct vd_net_cfg *cfg, uint16_t pair);
/* Stop the worker, unlink any peer, free everything (rings must be stopped). */
void vd_net_port_free(struct vd_net_port *p);
/* Busy-poll the transmit ring after the last frame, for an adaptive window of
 * at most poll_us (pollwin.h; 0: sleep at once). */
void vd_net_port_set_poll(struct vd_net_port *p, uint32_t poll_us);
/* The link.  fd (owned by the port from now on; -1: none) for VD_NET_LINK_FD. */
void vd_net_port_set_fd(struct vd_net_port *p, int fd);
/* A peer port (a cable) or `p` itself (loopback); NULL: none.  Cables are
 * set on both ends by the caller. */
void vd_net_port_set_peer(struct vd_net_port *p, struct vd_net_port *peer);
/* Send one frame (with a link header) out of the port's link as if the guest
 * had sent it (SEND_RARP); 0, or -errno / -1 when there is nowhere to send it. */
int vd_net_port_inject(struct vd_net_port *p, const uint8_t *frame, uint32_t len);

int vd_net_ring_start(struct vd_net_port *p, int which, const struct vd_mem *mem, uint16_t size,
                      uint16_t index, uint64_t desc, uint64_t avail, uint64_t used,
                      uint16_t next_avail, uint16_t next_used, bool event_idx, bool indirect,
                      int kick_fd, int call_fd);
void vd_net_ring_run(struct vd_net_port *p, int which);
void vd_net_ring_hold(struct vd_net_port *p, int which);
void vd_net_ring_set_enabled(struct vd_net_port *p, int which, bool enabled);
/* Only while held: 0 or VD_E_LAYOUT. */
int vd_net_ring_set_mem(struct vd_net_port *p, int which, const struct vd_mem *mem);
/* Dirty logging of live migration: rx buffer writes and (log_used) used-ring writes. */
void vd_net_ring_set_log(struct vd_net_port *p, int which, const struct vd_log *log, bool log_used,
                         uint64_t log_used_gpa);
void vd_net_ring_set_call(struct vd_net_port *p, int which, int fd);
void vd_net_ring_set_kick(struct vd_net_port *p, int which, int fd);
/* Stop the ring: returns next_avail (nothing popped is left unanswered). */
uint16_t vd_net_ring_stop(struct vd_net_port *p, int which, uint16_t *next_used);
void vd_net_ring_stats(struct vd_net_port *p, int which, struct vd_net_stats *out);
void vd_net_ring_hist(struct vd_net_port *p, int which, struct vd_hist *out);

#endif
