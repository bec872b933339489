"""What the front-end has the back end keep in shared memory: the dirty log and the in-flight regions.

**Dirty log** (live migration; vhost-user "Migration", protocol feature
LOG_SHMFD): while QEMU migrates a guest it hands us a bitmap, one bit per
4 KiB page of guest-physical address, and acks VHOST_F_LOG_ALL; every page
the back end writes — the buffers it fills and, for rings flagged
VHOST_VRING_F_LOG, the used ring at ``log_guest_addr`` — gets its bit set
with an atomic OR (QEMU clears bits concurrently), after the write.
`DirtyLog` maps it; both data paths set bits through ``vd_log_write``.

**In-flight regions** (reconnect after a back-end crash; "Inflight I/O
tracking", INFLIGHT_SHMFD): one region per queue in a memfd the front-end
keeps.  Every request taken from the avail ring is marked (``inflight=1``
and a counter) until its used entry is published; a completed batch is
chained through ``next`` from ``last_batch_head`` and cleared after
``used.idx`` is stored, then ``used_idx`` is copied.  A new back end given
the same memfd settles a batch that was published but not cleared, and
takes every request still marked again, oldest first, before the avail
ring (vdev/_native/src/vring.c ``vd_vring_set_inflight``; the Python
`vdev.queue.Queue` does the same).

Split-ring region layout (the C struct of libvhost-user and DPDK)::

    struct { u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
             struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num]; }

Each queue's region is ``16 + 16 * queue_size`` bytes rounded up to 64.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

from ._native import ffi, lib

__all__ = ["DirtyLog", "InflightArea", "InflightRegion", "inflight_queue_size"]

INFLIGHT_ALIGN = 64
LOG_PAGE = 4096


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's region (DPDK's ``get_pervq_shm_size_split``)."""
    n = 16 + 16 * queue_size
    return -(-n // INFLIGHT_ALIGN) * INFLIGHT_ALIGN


def _address(view: memoryview) -> Any:
    buf = ffi.from_buffer("uint8_t[]", view, require_writable=True)
    addr = ffi.cast("uint8_t *", buf)
    ffi.release(buf)
    return addr


class DirtyLog:
    """The migration dirty log mapped from the front-end's fd (SET_LOG_BASE)."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"dirty log of {size} bytes")
        self._mm = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mm)[offset: offset + size]
        self.size = size
        self.cdata: Any = ffi.new("struct vd_log *")
        self.cdata.base = _address(self._view)
        self.cdata.size = size

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page of ``[gpa, gpa+length)`` (after writing them)."""
        if length > 0:
            lib.vd_log_write(self.cdata, gpa, length)

    def is_dirty(self, gpa: int) -> bool:
        page = gpa // LOG_PAGE
        return page // 8 < self.size and bool(self._view[page // 8] & (1 << (page % 8)))

    def close(self) -> None:
        """Unmap; only once no ring logs into it."""
        self.cdata.base = ffi.NULL
        self.cdata.size = 0
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


class InflightRegion:
    """One queue's region: a Python view for the reference queue, a C pointer for the engines."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.cdata: Any = ffi.cast("struct vd_inflight_region *", _address(view))
        self._u16 = view.cast("H")
        self._u64 = view.cast("Q")

    # header: features u64 @0, version u16 @8, desc_num u16 @10, last_batch_head u16 @12, used_idx u16 @14
    @property
    def version(self) -> int:
        return int(self._u16[4])

    @version.setter
    def version(self, value: int) -> None:
        self._u16[4] = value

    @property
    def desc_num(self) -> int:
        return int(self._u16[5])

    @desc_num.setter
    def desc_num(self, value: int) -> None:
        self._u16[5] = value

    @property
    def last_batch_head(self) -> int:
        return int(self._u16[6])

    @last_batch_head.setter
    def last_batch_head(self, value: int) -> None:
        self._u16[6] = value

    @property
    def used_idx(self) -> int:
        return int(self._u16[7])

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._u16[7] = value & 0xFFFF

    # desc[i]: inflight u8 @16+16i, next u16 @16+16i+6, counter u64 @16+16i+8
    def inflight(self, i: int) -> int:
        return int(self.view[16 + 16 * i])

    def set_inflight(self, i: int, value: int) -> None:
        self.view[16 + 16 * i] = value

    def next(self, i: int) -> int:
        return int(self._u16[(16 + 16 * i + 6) // 2])

    def set_next(self, i: int, value: int) -> None:
        self._u16[(16 + 16 * i + 6) // 2] = value

    def counter(self, i: int) -> int:
        return int(self._u64[(16 + 16 * i + 8) // 8])

    def set_counter(self, i: int, value: int) -> None:
        self._u64[(16 + 16 * i + 8) // 8] = value

    def marked(self) -> list[int]:
        """Heads still marked in flight, oldest first."""
        heads = [i for i in range(self.queue_size) if self.inflight(i) == 1]
        return sorted(heads, key=self.counter)

    def release(self) -> None:
        self._u16.release()
        self._u64.release()
        self.view.release()


class InflightArea:
    """The memfd of every queue's in-flight region (GET_INFLIGHT_FD / SET_INFLIGHT_FD)."""

    def __init__(self, fd: int, size: int, offset: int, num_queues: int, queue_size: int) -> None:
        per = inflight_queue_size(queue_size)
        if num_queues < 1 or queue_size < 1 or size < per * num_queues:
            raise ValueError(f"in-flight area of {size} bytes cannot hold {num_queues} queues "
                             f"of {queue_size}")
        self.fd = fd
        self.size = size
        self.offset = offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self._mm = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._regions: dict[int, InflightRegion] = {}

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightArea:
        """A new zeroed area (GET_INFLIGHT_FD); ``fd`` stays ours, send a dup."""
        size = inflight_queue_size(queue_size) * num_queues
        fd = os.memfd_create("vdev-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise

    def region(self, index: int) -> InflightRegion | None:
        """Queue ``index``'s region, or None if the area has none for it."""
        if not 0 <= index < self.num_queues:
            return None
        r = self._regions.get(index)
        if r is None:
            per = inflight_queue_size(self.queue_size)
            start = self.offset + index * per
            r = InflightRegion(memoryview(self._mm)[start: start + per], self.queue_size)
            self._regions[index] = r
        return r

    def close(self) -> None:
        """Unmap and close; only once no ring uses a region of it."""
        for r in self._regions.values():
            r.release()
        self._regions.clear()
        with contextlib.suppress(BufferError):
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
