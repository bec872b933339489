"""Typed Python faces of the native ring (``vdev/_native/src/vring.h``).

* `NativeMemory` — a guest-memory snapshot exported to C as a region table
  (guest address, size, host address).  It holds the buffers it exports, so
  the mappings stay alive as long as C may use them: this object *is* the
  lease the engine design asks for; drop it only after every C user has
  moved to the next one.
* `NativeQueue` — the C split virtqueue behind the same methods as the
  Python reference `vdev.queue.Queue` (pop, add_used, needs_notification,
  enable/disable_notification, pending), so one conformance suite
  (`vdev.testing.check_queue`) can hold both to the same results.  The
  engines drive the C ring directly from their worker threads; this class
  is for tests, tools and the conformance suite.
* `ring_error` — turns a C error code into the `GuestError` the Python
  queue would have raised (one place, as trio's ``raise_winerror``).
"""

from __future__ import annotations

from typing import Any

from ._native import ffi, lib
from .errors import GuestError
from .memory import RegionTable
from .queue import RING_ERROR_MESSAGES, Descriptor, DescriptorChain, RingError
from .tracking import DirtyLog, InflightRegion

__all__ = ["NativeMemory", "NativeQueue", "ring_error"]


class NativeMemory:
    """``struct vd_mem`` for one memory snapshot, with its buffers held."""

    def __init__(self, table: RegionTable) -> None:
        regions = table.regions
        if len(regions) > lib.VD_MAX_REGIONS:
            raise GuestError(f"{len(regions)} memory regions, the native ring takes {lib.VD_MAX_REGIONS}")
        self.table = table
        self.cdata: Any = ffi.new("struct vd_mem *")
        self._held: list[Any] = []
        self.cdata.nregions = len(regions)
        for i, r in enumerate(regions):      # RegionTable keeps them sorted by address
            # Our own memoryview is the lease: while it exists the mapping
            # cannot be closed (mmap.close raises BufferError) nor a bytearray
            # resized.  The address is taken through a short-lived from_buffer:
            # a long-lived one, torn down by the cycle collector after its
            # memoryview, crashes CPython 3.11 in memory_dealloc.
            view = memoryview(r.data)
            buf = ffi.from_buffer("uint8_t[]", view, require_writable=True)
            host = ffi.cast("uint8_t *", buf)
            ffi.release(buf)
            self._held.append(view)
            self.cdata.regions[i].gpa = r.gpa
            self.cdata.regions[i].size = r.size
            self.cdata.regions[i].host = host

    def release(self) -> None:
        """Give the buffers back (only when no C code can touch them any more)."""
        for view in self._held:
            view.release()
        self._held = []
        self.cdata.nregions = 0


def ring_error(code: int, *, queue: int | None = None, head: int | None = None,
               gpa: int | None = None, length: int | None = None, value: int = 0) -> GuestError:
    """The `GuestError` for a ``VD_E_*`` code, as `vdev.queue.Queue` words it."""
    kind = RingError(code)
    if kind is RingError.AVAIL_IDX_JUMP:
        return GuestError(f"avail index moved by {value}, more than the queue size", queue=queue, code=kind)
    if kind is RingError.HEAD_OUT_OF_RANGE:
        return GuestError(f"avail ring names descriptor {value}, beyond the queue", queue=queue, code=kind)
    if kind is RingError.LAYOUT:
        return GuestError("ring outside guest memory", queue=queue, code=kind)
    return GuestError(RING_ERROR_MESSAGES[kind], queue=queue, head=head, gpa=gpa, length=length, code=kind)


class NativeQueue:
    """The C split virtqueue with `vdev.queue.Queue`'s methods (memory passed in)."""

    def __init__(self, size: int, desc: int, avail: int, used: int, *, index: int = 0,
                 next_avail: int = 0, next_used: int = 0, event_idx: bool = False,
                 indirect: bool = True) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size must be a power of 2 up to 32768, got {size}")
        self.index, self.size = index, size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx, self.indirect = event_idx, indirect
        self._init = (next_avail & 0xFFFF, next_used & 0xFFFF)
        self._vr: Any = ffi.new("struct vd_vring *")
        self._bufs: Any = ffi.new("struct vd_buf[]", size)
        self._chain: Any = ffi.new("struct vd_chain *")
        self._chain.bufs = self._bufs
        self._chain.cap = size
        self._mem: NativeMemory | None = None
        self._started = False
        self._log: tuple[DirtyLog | None, bool, int] = (None, False, 0)
        self._region: InflightRegion | None = None

    def __del__(self) -> None:
        if getattr(self, "_started", False):
            lib.vd_vring_fini(self._vr)

    def _bind(self, mem: RegionTable) -> Any:
        if self._mem is None or self._mem.table is not mem:
            native = NativeMemory(mem)
            if not self._started:
                na, nu = self._init
                rc = lib.vd_vring_init(self._vr, native.cdata, self.size, self.index, self.desc,
                                       self.avail, self.used, na, nu, self.event_idx, self.indirect)
                self._started = True
                self._apply_log()
            else:
                rc = lib.vd_vring_set_mem(self._vr, native.cdata)
            if rc:
                raise ring_error(rc, queue=self.index)
            self._mem = native
        return self._vr

    # -- the Queue interface -----------------------------------------------------------

    @property
    def next_avail(self) -> int:
        return int(self._vr.next_avail) if self._started else self._init[0]

    @property
    def next_used(self) -> int:
        return int(self._vr.next_used) if self._started else self._init[1]

    @property
    def broken(self) -> GuestError | None:
        if not self._started or not self._vr.broken:
            return None
        return ring_error(self._vr.broken, queue=self.index, value=self._vr.broken_value)

    def check_layout(self, mem: RegionTable) -> None:
        self._bind(mem)

    def avail_idx(self, mem: RegionTable) -> int:
        return int(lib.vd_vring_avail_idx(self._bind(mem)))

    def used_idx(self, mem: RegionTable) -> int:
        return int(lib.vd_vring_used_idx(self._bind(mem)))

    def pending(self, mem: RegionTable) -> int:
        n = lib.vd_vring_pending(self._bind(mem))
        if n < 0:
            raise self._broken_error(-n)
        return int(n)

    def _broken_error(self, code: int) -> GuestError:
        return ring_error(code, queue=self.index, value=self._vr.broken_value)

    def pop(self, mem: RegionTable) -> DescriptorChain | None:
        vr = self._bind(mem)
        c = self._chain
        rc = lib.vd_vring_pop(vr, c)
        if rc == 0:
            return None
        if rc < 0 and not c.err:
            raise self._broken_error(-rc)
        chain = DescriptorChain(self.index, c.head)
        for i in range(c.nread):
            b = c.bufs[i]
            chain.readable.append(Descriptor(b.gpa, b.len, b.flags))
        for i in range(c.nread, c.nread + c.nwrite):
            b = c.bufs[i]
            chain.writable.append(Descriptor(b.gpa, b.len, b.flags))
        if rc < 0:
            exc = ring_error(c.err, queue=self.index, head=c.head, gpa=c.err_gpa,
                             length=None if c.err_len < 0 else c.err_len)
            if c.has_tail:
                exc.tail = Descriptor(c.tail.gpa, c.tail.len, c.tail.flags)
            raise exc
        return chain

    def set_log(self, log: DirtyLog | None, log_used: bool = False, log_used_gpa: int = 0) -> None:
        self._log = (log, log_used, log_used_gpa)
        if self._started:
            self._apply_log()

    def _apply_log(self) -> None:
        log, log_used, gpa = self._log
        lib.vd_vring_set_log(self._vr, ffi.NULL if log is None else log.cdata, log_used, gpa)

    def set_inflight(self, region: InflightRegion | None, mem: RegionTable) -> int:
        self._region = region
        n = lib.vd_vring_set_inflight(self._bind(mem), ffi.NULL if region is None else region.cdata)
        if n < 0:
            raise MemoryError("cannot allocate the resubmit list")
        return int(n)

    def add_used(self, mem: RegionTable, head: int, length: int) -> None:
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for queue size {self.size}")
        vr = self._bind(mem)
        lib.vd_vring_push(vr, head, length)
        lib.vd_vring_publish(vr)

    def needs_notification(self, mem: RegionTable) -> bool:
        return bool(lib.vd_vring_need_notify(self._bind(mem)))

    def disable_notification(self, mem: RegionTable) -> None:
        lib.vd_vring_disable_notify(self._bind(mem))

    def enable_notification(self, mem: RegionTable) -> bool:
        rc = lib.vd_vring_enable_notify(self._bind(mem))
        if rc < 0:
            raise self._broken_error(-rc)
        return bool(rc)
