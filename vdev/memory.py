"""Guest memory: read and write it, never manage it.

The front-end shares guest RAM as file descriptors (memfd, hugetlbfs) with a
table of regions.  `MemoryMap` maps each region once (``mmap`` of
``mmap_offset + size`` bytes from file offset 0, as libvhost-user does, which
keeps huge-page alignment) and is then **immutable**: a memory-table change
builds a new map and swaps it in whole, while requests in flight keep the
snapshot they started with (their memoryviews keep the old mappings alive).

Two kinds of address, kept apart by name:

* `GuestAddr` — guest-physical, what descriptors carry.
* `FrontendAddr` — the VMM's own virtual address, what SET_VRING_ADDR
  carries; `MemoryMap.frontend_to_guest` converts it (``userspace_addr``).

Every access is bounds-checked against the region table and raises
`GuestError` naming the address; a buffer that crosses from one region into an
adjacent one is returned as several memoryviews (`buffers`), and `view` —
used for rings and headers that must be contiguous — refuses it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType, Protocol, runtime_checkable

from vhost_user.messages import MemoryRegion

from .errors import GuestError

GuestAddr = NewType("GuestAddr", int)
FrontendAddr = NewType("FrontendAddr", int)


@runtime_checkable
class GuestMemory(Protocol):
    """What queues and devices need from guest memory."""

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``length`` contiguous bytes at ``gpa`` (one region)."""

    def buffers(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa+length)``, split at region boundaries."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | memoryview) -> None: ...


# -- ring fields: one load or store of the field's width ----------------------------
#
# The driver reads and writes ring fields while we do (virtio 1.2 §2.7.13), so
# each must be accessed in one go.  ``struct.pack_into`` zeroes its target and
# then stores byte by byte: a driver could read ``used.idx == 0`` in between.
# A ``memoryview.cast`` item access is one load or store of the item's width
# (CPython copies it with a fixed-size memcpy, which the compiler turns into a
# single mov).  Virtio is little-endian, and so is every host we run on.
assert sys.byteorder == "little", "vdev's ring access assumes a little-endian host"


def load_u16(mem: GuestMemory, gpa: int) -> int:
    """One 16-bit load of the ring field at ``gpa``."""
    value: int = mem.view(gpa, 2).cast("H")[0]
    return value


def store_u16(mem: GuestMemory, gpa: int, value: int) -> None:
    """One 16-bit store of ``value`` into the ring field at ``gpa``."""
    mem.view(gpa, 2).cast("H")[0] = value & 0xFFFF


def store_u32_pair(mem: GuestMemory, gpa: int, first: int, second: int) -> None:
    """Two 32-bit stores at ``gpa`` and ``gpa + 4`` (a used-ring element: id, len)."""
    v = mem.view(gpa, 8).cast("I")
    v[0] = first
    v[1] = second


@dataclass(frozen=True, slots=True)
class MappedRegion:
    """One region: guest-physical range, front-end address and its bytes."""

    gpa: int
    size: int
    frontend_addr: int
    data: memoryview          # exactly ``size`` bytes, writable

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RegionTable:
    """Bounds-checked translation over sorted, non-overlapping regions.

    Shared by the mmap-backed `MemoryMap` and the bytearray-backed
    `vdev.testing.FakeGuestMemory`, so both check addresses the same way.
    """

    def __init__(self, regions: Sequence[MappedRegion]) -> None:
        self.regions: tuple[MappedRegion, ...] = tuple(sorted(regions, key=lambda r: r.gpa))
        self._starts = [r.gpa for r in self.regions]
        for a, b in zip(self.regions, self.regions[1:]):
            if b.gpa < a.end:
                raise GuestError("memory regions overlap", gpa=b.gpa)

    def _region(self, gpa: int, length: int) -> MappedRegion:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self.regions[i].end:
            raise GuestError("address outside guest memory", gpa=gpa, length=length)
        return self.regions[i]

    def view(self, gpa: int, length: int) -> memoryview:
        if length < 0 or gpa < 0:
            raise GuestError("negative address or length", gpa=gpa, length=length)
        r = self._region(gpa, length)
        off = gpa - r.gpa
        if off + length > r.size:
            raise GuestError("range crosses the end of a memory region", gpa=gpa, length=length)
        return r.data[off: off + length]

    def buffers(self, gpa: int, length: int) -> list[memoryview]:
        if length < 0 or gpa < 0:
            raise GuestError("negative address or length", gpa=gpa, length=length)
        out: list[memoryview] = []
        addr, left = gpa, length
        while left > 0:
            try:
                r = self._region(addr, left)
            except GuestError:
                raise GuestError("buffer runs outside guest memory", gpa=gpa, length=length) from None
            off = addr - r.gpa
            n = min(left, r.size - off)
            out.append(r.data[off: off + n])
            addr += n
            left -= n
        return out

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestError unless ``[gpa, gpa+length)`` is all guest memory."""
        addr, left = gpa, length
        if gpa < 0 or length < 0:
            raise GuestError("negative address or length", gpa=gpa, length=length)
        while left > 0:
            try:
                r = self._region(addr, left)
            except GuestError:
                raise GuestError("buffer runs outside guest memory", gpa=gpa, length=length) from None
            n = min(left, r.end - addr)
            addr += n
            left -= n

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.buffers(gpa, length))

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.buffers(gpa, len(src)):
            v[:] = src[pos: pos + len(v)]
            pos += len(v)

    def frontend_to_guest(self, addr: int, length: int = 1) -> GuestAddr:
        """Translate a front-end virtual address (ring addresses) to guest-physical."""
        for r in self.regions:
            if r.frontend_addr <= addr and addr + length <= r.frontend_addr + r.size:
                return GuestAddr(r.gpa + (addr - r.frontend_addr))
        # The usual cause: guest RAM the front-end could not share (QEMU sends
        # only regions backed by a file descriptor, so plain -m RAM is missing
        # from the table and every ring address falls outside it).
        raise GuestError(f"front-end address not in any memory region (the table has {len(self.regions)} "
                         f"region{'s' if len(self.regions) != 1 else ''}, {self.total_size >> 20} MiB): "
                         "is guest RAM shared with the back end? QEMU needs "
                         "-object memory-backend-memfd,id=mem,size=...,share=on with "
                         "-numa node,memdev=mem (or -machine memory-backend=mem)", gpa=addr, length=length)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)


class MemoryMap(RegionTable):
    """Guest memory mapped from the front-end's fds; an immutable snapshot."""

    def __init__(self, regions: Sequence[MappedRegion], maps: dict[tuple[int, ...], mmap.mmap]) -> None:
        super().__init__(regions)
        self._maps = maps

    @classmethod
    def empty(cls) -> MemoryMap:
        return cls([], {})

    @classmethod
    def from_fds(cls, regions: Sequence[tuple[MemoryRegion, int]],
                 previous: MemoryMap | None = None) -> MemoryMap:
        """Map every region; regions unchanged since ``previous`` reuse its mapping.

        "Unchanged" means the same region fields *and* the same file behind
        the fd (st_dev, st_ino).

        Raises:
            OSError: fstat or mmap failed (bad fd, size beyond the file).
            GuestError: regions overlap.
        """
        old = previous._maps if previous is not None else {}
        maps: dict[tuple[int, ...], mmap.mmap] = {}
        mapped: list[MappedRegion] = []
        for region, fd in regions:
            # The file is part of the key: a VMM that replaces a DIMM sends the
            # same region fields with a new memfd, and the old mapping then
            # shows memory the VMM has let go of.  Same st_dev and st_ino is
            # the same file (a dup, or the table sent again), so its mapping
            # may be kept.
            st = os.fstat(fd)
            key = (region.guest_phys_addr, region.memory_size, region.userspace_addr,
                   region.mmap_offset, st.st_dev, st.st_ino)
            mm = old.get(key)
            if mm is None:
                try:
                    mm = mmap.mmap(fd, region.mmap_offset + region.memory_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
                except (ValueError, OverflowError) as exc:
                    # Fix: CPython reports a region beyond the end of a regular file
                    # (memfd) as ValueError, an absurd length as OverflowError.  The
                    # handler only turns OSError into a failed request; anything else
                    # escaped the connection and stopped the whole server.
                    raise OSError(errno.EINVAL, f"cannot map region at gpa {region.guest_phys_addr:#x}: "
                                                f"{exc}") from exc
            maps[key] = mm
            view = memoryview(mm)[region.mmap_offset: region.mmap_offset + region.memory_size]
            mapped.append(MappedRegion(region.guest_phys_addr, region.memory_size,
                                       region.userspace_addr, view))
        return cls(mapped, maps)

    def release_unused(self, current: MemoryMap | None) -> None:
        """Unmap mappings of this (old) snapshot that ``current`` does not reuse.

        A mapping still exported to an in-flight request cannot be closed yet
        (BufferError); it is then left to the garbage collector, which unmaps
        it once the last view is gone.
        """
        keep = set(map(id, current._maps.values())) if current is not None else set()
        for key, mm in self._maps.items():
            if id(mm) not in keep:
                for region in self.regions:
                    if region.gpa == key[0]:
                        region.data.release()
        for mm in self._maps.values():
            if id(mm) not in keep:
                with contextlib.suppress(BufferError):
                    mm.close()
        self._maps = {}
