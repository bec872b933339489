"""Queue engines: what serves a started virtqueue.

A device serves each started queue either on the event loop (the Python
path, `vdev.device.VirtQueue` + ``process_queue``: the reference) or with a
**native engine**: a C worker thread that owns the ring, its kick and call
eventfds and the per-request work, with no Python per request
(``vdev/_native/src/engine.h``).  `DeviceRuntime` asks the device for an
engine when a ring starts (`Device.create_engine`); a device that returns
None is served on the Python path.

`NativeEngine` is the Python handle of one C engine.  Its life:

    start(mem, spec, kick, call)   ring set up, worker held
    run() / hold()                 take chains / stop taking them
    set_enabled(flag)              SET_VRING_ENABLE (default: hold while disabled)
    await quiesce()                held and nothing in flight (swap, memory change)
    set_memory(mem)                only while quiesced
    set_call(fd) / set_kick(fd)    at any time (the engine gets its own dup)
    stop() -> (next_avail, next_used)   GET_VRING_BASE: every popped request answered
    close()                        free it

`stats()` and `histogram()` copy the worker's counters and its latency
histogram without stopping it, from any thread (the metrics endpoint reads
them from its HTTP thread); a lock orders them against `close()`, so a copy
never reads an engine being freed (after `close()` they raise `EngineClosed`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from ._native import ffi, lib
from .errors import VdevError
from .histogram import LatencyHistogram
from .native import NativeMemory, ring_error
from .tracking import DirtyLog, InflightRegion

__all__ = ["ENGINE_COUNTERS", "EngineClosed", "NativeEngine", "RingSpec"]

#: The per-queue counters every engine keeps (names as `stats()` returns them).
ENGINE_COUNTERS = ("requests", "bytes_read", "bytes_written", "errors", "bad_chains", "kicks",
                   "wakeups", "calls", "calls_suppressed", "batches", "polled", "inflight")


@dataclass(frozen=True)
class RingSpec:
    """A ring about to start, in guest-physical terms (translated by the runtime)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool


class EngineClosed(VdevError):
    """The engine was closed: it has no counters any more."""


def dup_fd(fd: int | None) -> int:
    """A duplicate for the C side to own (-1 for none)."""
    return -1 if fd is None else os.dup(fd)


def start_failed(rc: int, fds: tuple[int, ...], index: int) -> NoReturn:
    """Close the duplicates a failed C ring start left with us; raise why it failed.

    ``rc`` < 0 is a negated errno (the worker could not start), > 0 a ring
    layout error (`vdev.native.ring_error`).
    """
    for fd in fds:
        if fd >= 0:
            os.close(fd)
    if rc < 0:
        raise OSError(-rc, f"queue {index}: {os.strerror(-rc)}")
    raise ring_error(rc, queue=index)


class NativeEngine:
    """One C queue engine (``struct vd_engine``), created by a device."""

    #: Whether the engine keeps serving a started ring the driver disabled.
    #: spec "Ring states": started and disabled, a ring is processed without
    #: side effects (net: TX discarded, no RX supplied).  Engines without it
    #: are simply held while their ring is disabled.
    serves_disabled = False

    def __init__(self, cdata: Any, *, poll_us: int = 0) -> None:
        if cdata == ffi.NULL:
            err = ffi.errno
            raise VdevError(f"cannot create a native queue engine: {os.strerror(err)}")
        self._e: Any = cdata
        #: Held around the copies and the free (copies come from other threads too).
        self._lock = threading.Lock()
        #: Threads inside `wait_idle`; `close` waits for them (signalled through ``_idle``)
        #: rather than free the engine they sleep on.
        self._waiters = 0
        self._idle = threading.Condition(self._lock)
        self.poll_us = poll_us
        self._mem: NativeMemory | None = None
        self._log: DirtyLog | None = None
        self._region: InflightRegion | None = None
        self.index = -1
        self.started = False
        self.stopped = False

    def start(self, mem: NativeMemory, spec: RingSpec, kick_fd: int | None, call_fd: int | None) -> None:
        """Set up the ring and the (held) worker.

        Raises:
            GuestError: the rings do not lie in guest memory.
            OSError: the worker could not be started.
        """
        kick, call = dup_fd(kick_fd), dup_fd(call_fd)
        rc = lib.vd_engine_start(self._e, mem.cdata, spec.size, spec.index, spec.desc, spec.avail,
                                 spec.used, spec.next_avail & 0xFFFF, spec.next_used & 0xFFFF,
                                 spec.event_idx, spec.indirect, kick, call, self.poll_us)
        if rc:
            start_failed(rc, (kick, call), spec.index)
        self._mem = mem
        self.index = spec.index
        self.started = True

    def run(self) -> None:
        if self._e is not None:
            lib.vd_engine_run(self._e)

    def set_enabled(self, enabled: bool) -> None:
        """SET_VRING_ENABLE for this ring.  The default holds a disabled ring
        (`run` follows an enable unless the runtime holds the device)."""
        if not enabled:
            self.hold()

    def hold(self) -> None:
        # A closed engine (its queue stopped while a `quiesce` of another
        # queue was awaited) holds nothing: no-op rather than a NULL engine.
        if self._e is not None:
            lib.vd_engine_hold(self._e)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until held with nothing in flight (True) or the timeout passed (False)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        with self._lock:
            e = self._e
            if e is None:            # closed (the queue stopped): nothing is in flight
                return True
            self._waiters += 1
        try:
            return bool(lib.vd_engine_wait_idle(e, ms) == 0)
        finally:
            with self._lock:
                self._waiters -= 1
                self._idle.notify_all()

    async def quiesce(self) -> None:
        """Hold, and wait (off the event loop) until every request in flight finished."""
        self.hold()
        await asyncio.get_running_loop().run_in_executor(None, self.wait_idle)

    def set_memory(self, mem: NativeMemory) -> None:
        """A new memory table; only while quiesced.  Raises GuestError if the rings left it."""
        rc = lib.vd_engine_set_mem(self._e, mem.cdata)
        if rc:
            raise ring_error(rc, queue=self.index)
        self._mem = mem

    def set_call(self, fd: int | None) -> None:
        lib.vd_engine_set_call(self._e, dup_fd(fd))

    def set_kick(self, fd: int | None) -> None:
        lib.vd_engine_set_kick(self._e, dup_fd(fd))

    def set_log(self, log: DirtyLog | None, log_used: bool, log_used_gpa: int) -> None:
        """Log dirty pages into ``log`` (None: stop); only while held and idle (or not yet run)."""
        rc = lib.vd_engine_set_log(self._e, ffi.NULL if log is None else log.cdata, log_used, log_used_gpa)
        if rc:
            raise MemoryError(f"queue {self.index}: cannot allocate the dirty-log bookkeeping")
        self._log = log

    def set_inflight(self, region: InflightRegion) -> int:
        """Track requests in flight in ``region`` (before the first run); returns how many
        requests of a previous back end will be taken again."""
        n = lib.vd_engine_set_inflight(self._e, region.cdata)
        if n < 0:
            raise MemoryError(f"queue {self.index}: cannot allocate the resubmit list")
        self._region = region
        return int(n)

    def set_poll(self, poll_us: int) -> None:
        self.poll_us = poll_us
        lib.vd_engine_set_poll(self._e, poll_us)

    def stop(self) -> tuple[int, int]:
        """Finish every request in flight and end the worker: (next_avail, next_used)."""
        used = ffi.new("uint16_t *")
        avail = lib.vd_engine_stop(self._e, used)
        self.stopped = True
        return int(avail), int(used[0])

    def close(self) -> None:
        with self._lock:
            if self._e is not None:
                if self._waiters:
                    # A `quiesce` (a pause, a shutdown) still waits on this engine in an
                    # executor thread: stopping the worker wakes it; free only after.
                    lib.vd_engine_stop(self._e, ffi.NULL)
                    while self._waiters:
                        self._idle.wait()
                lib.vd_engine_free(self._e)
                self._e = None
                self._mem = None

    def stats(self) -> dict[str, Any]:
        out = ffi.new("struct vd_engine_stats *")
        with self._lock:
            if self._e is None:
                raise EngineClosed(f"queue {self.index}: engine closed")
            lib.vd_engine_stats(self._e, out)
        d: dict[str, Any] = {name: int(getattr(out, name)) for name in ENGINE_COUNTERS}
        d["by_type"] = [int(x) for x in out.by_type]
        d["broken"] = int(out.broken)
        d["poll_ns"] = int(out.poll_ns)     # the adaptive polling window now (a gauge)
        return d

    def histogram(self) -> LatencyHistogram:
        out = ffi.new("struct vd_hist *")
        with self._lock:
            if self._e is None:
                raise EngineClosed(f"queue {self.index}: engine closed")
            lib.vd_engine_hist(self._e, out)
        return LatencyHistogram.from_cdata(out)
