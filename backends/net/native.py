"""Python handles of the native virtio-net data path (``vdev/_native/src/net.h``).

* `NativePort` — one queue pair's C worker (``struct vd_net_port``): its
  link (a TAP queue fd, a cable socket, a peer port, itself for loopback)
  and its two rings.
* `NetQueueEngine` — one ring of a port, behind the `NativeEngine`
  interface the runtime drives per ring index (start, run, hold,
  set_enabled, set_memory, set_call, set_kick, set_log, stop, stats,
  histogram).
  The two rings of a pair are started separately by the runtime; they
  meet in the port they share.

Ring numbering (virtio 1.2 §5.1.2): receiveq of pair i is queue 2i,
transmitq is 2i+1.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from vdev._native import ffi, lib
from vdev.engine import EngineClosed, NativeEngine, RingSpec, dup_fd, start_failed
from vdev.errors import VdevError
from vdev.histogram import LatencyHistogram
from vdev.native import NativeMemory, ring_error
from vdev.tracking import DirtyLog

__all__ = ["NET_COUNTERS", "NET_GAUGES", "RX", "TX", "NativePort", "NetConfigC", "NetQueueEngine"]

RX = 0
TX = 1

#: The per-ring counters of ``struct vd_net_stats``, in order.
NET_COUNTERS = ("frames", "bytes", "buffers", "dropped", "bad_header", "too_short", "too_big",
                "no_buffer", "no_buffer_drops", "offload_drops", "link_errors", "link_down_drops",
                "disabled_drops", "bad_chains", "kicks", "wakeups", "calls", "calls_suppressed",
                "batches", "polled", "poll_ns", "last_errno", "broken")
#: Those of them that say how things are now rather than count: a stopped
#: ring's are not added to a restarted one's.
NET_GAUGES = ("poll_ns", "last_errno", "broken")


class NetConfigC:
    """``struct vd_net_cfg``: what every port of one device reads (negotiated features)."""

    def __init__(self, no_buffer_wait_ms: int) -> None:
        self.cdata: Any = ffi.new("struct vd_net_cfg *")
        self.cdata.no_buffer_wait_ms = no_buffer_wait_ms

    @property
    def features(self) -> int:
        return int(self.cdata.features)

    @features.setter
    def features(self, value: int) -> None:
        # Written before the rings start (SET_FEATURES comes first); one aligned word.
        self.cdata.features = value

    @property
    def no_buffer_wait_ms(self) -> int:
        return int(self.cdata.no_buffer_wait_ms)

    @no_buffer_wait_ms.setter
    def no_buffer_wait_ms(self, value: int) -> None:
        self.cdata.no_buffer_wait_ms = value


class NativePort:
    """One queue pair's C worker thread and its link."""

    def __init__(self, cfg: NetConfigC, pair: int) -> None:
        cdata = lib.vd_net_port_new(cfg.cdata, pair)
        if cdata == ffi.NULL:
            raise VdevError(f"cannot start the worker of queue pair {pair}: {os.strerror(ffi.errno)}")
        self.cdata: Any = cdata
        #: Orders counter copies (any thread: metrics, control) against `close`.
        self._lock = threading.Lock()
        self.cfg = cfg          # the C side points at it: keep it alive
        self.pair = pair
        self.peer: NativePort | None = None

    def set_poll(self, poll_us: int) -> None:
        """Busy-poll the transmit ring up to ``poll_us`` µs after the last frame (0: never)."""
        lib.vd_net_port_set_poll(self.cdata, poll_us)

    def set_fd(self, fd: int | None) -> None:
        """Link to ``fd`` (a TAP queue, a cable socket; the port gets its own dup), or none."""
        lib.vd_net_port_set_fd(self.cdata, dup_fd(fd))
        self.peer = None

    def set_peer(self, peer: NativePort | None) -> None:
        """Link straight to ``peer``'s receive ring (a cable in this process), or ``self`` (loopback)."""
        lib.vd_net_port_set_peer(self.cdata, ffi.NULL if peer is None else peer.cdata)
        self.peer = peer

    def inject(self, frame: bytes) -> int:
        """Send ``frame`` (with its 12-byte link header) out of the link; 0 or -errno."""
        return int(lib.vd_net_port_inject(self.cdata, frame, len(frame)))

    def ring_stats(self, which: int) -> dict[str, int]:
        """Raises EngineClosed once the port is closed."""
        out = ffi.new("struct vd_net_stats *")
        with self._lock:
            if self.cdata is None:
                raise EngineClosed(f"queue pair {self.pair}: closed")
            lib.vd_net_ring_stats(self.cdata, which, out)
        return {name: int(getattr(out, name)) for name in NET_COUNTERS}

    def ring_histogram(self, which: int) -> LatencyHistogram:
        out = ffi.new("struct vd_hist *")
        with self._lock:
            if self.cdata is None:
                raise EngineClosed(f"queue pair {self.pair}: closed")
            lib.vd_net_ring_hist(self.cdata, which, out)
        return LatencyHistogram.from_cdata(out)

    def close(self) -> None:
        """End the worker and free the port; peers must have been unlinked first."""
        with self._lock:
            if self.cdata is not None:
                lib.vd_net_port_free(self.cdata)
                self.cdata = None


class NetQueueEngine(NativeEngine):
    """One ring (receive or transmit) of a `NativePort`, driven by the runtime."""

    #: spec "Ring states": a started, disabled net ring discards TX and supplies no RX.
    serves_disabled = True

    def __init__(self, port: NativePort, which: int) -> None:
        super().__init__(port.cdata)
        self.port = port
        self.which = which
        self._final: dict[str, int] | None = None

    def start(self, mem: NativeMemory, spec: RingSpec, kick_fd: int | None, call_fd: int | None) -> None:
        """Raises GuestError if the rings are not in guest memory, OSError if out of memory."""
        kick, call = dup_fd(kick_fd), dup_fd(call_fd)
        rc = lib.vd_net_ring_start(self.port.cdata, self.which, mem.cdata, spec.size, spec.index,
                                   spec.desc, spec.avail, spec.used, spec.next_avail & 0xFFFF,
                                   spec.next_used & 0xFFFF, spec.event_idx, spec.indirect, kick, call)
        if rc:
            start_failed(rc, (kick, call), spec.index)
        self._mem = mem
        self.index = spec.index
        self.started = True

    def run(self) -> None:
        lib.vd_net_ring_run(self.port.cdata, self.which)

    def hold(self) -> None:
        # Synchronous: once it returns no batch runs on the ring, and none
        # keeps chains popped, so the ring is idle.
        lib.vd_net_ring_hold(self.port.cdata, self.which)

    def set_enabled(self, enabled: bool) -> None:
        lib.vd_net_ring_set_enabled(self.port.cdata, self.which, enabled)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    async def quiesce(self) -> None:
        self.hold()

    def set_memory(self, mem: NativeMemory) -> None:
        rc = lib.vd_net_ring_set_mem(self.port.cdata, self.which, mem.cdata)
        if rc:
            raise ring_error(rc, queue=self.index)
        self._mem = mem

    def set_call(self, fd: int | None) -> None:
        lib.vd_net_ring_set_call(self.port.cdata, self.which, dup_fd(fd))

    def set_kick(self, fd: int | None) -> None:
        lib.vd_net_ring_set_kick(self.port.cdata, self.which, dup_fd(fd))

    def set_log(self, log: DirtyLog | None, log_used: bool, log_used_gpa: int) -> None:
        """Migration: log the receive buffers written and (``log_used``) the used ring."""
        lib.vd_net_ring_set_log(self.port.cdata, self.which, ffi.NULL if log is None else log.cdata,
                                log_used, log_used_gpa)
        self._log = log         # the C side points at it: keep it alive

    def set_poll(self, poll_us: int) -> None:
        """Net workers sleep on their fds; busy-polling is not offered."""

    def stop(self) -> tuple[int, int]:
        used = ffi.new("uint16_t *")
        avail = lib.vd_net_ring_stop(self.port.cdata, self.which, used)
        self.stopped = True
        self._final = self.port.ring_stats(self.which)
        return int(avail), int(used[0])

    def close(self) -> None:
        if self.started and not self.stopped:
            self.stop()
        self._mem = None

    def stats(self) -> dict[str, Any]:
        if self._final is not None:
            return dict(self._final)
        return dict(self.port.ring_stats(self.which))

    def histogram(self) -> LatencyHistogram:
        return self.port.ring_histogram(self.which)
