"""RAM-backed storages: `MemoryStorage` (``mem:SIZE``) and `NullStorage` (``null:SIZE``).

`MemoryStorage` is a scratch disk for tests and benchmarks.  It sits on an
anonymous private mmap rather than a bytearray so ``mem:1T`` costs nothing
until the guest writes: untouched pages are the kernel's shared zero page,
and `discard` hands pages back with ``MADV_DONTNEED`` (which makes them read
as zeros again).  Copies run inline on the loop: a memcpy of one request is
cheaper than a thread hop.

`NullStorage` reads zeros and throws writes away, to measure the device and
transport with the back end taken out.
"""

from __future__ import annotations

import mmap
import platform
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Self

from .base import (
    SECTOR_SIZE,
    Storage,
    StorageSpec,
    buffers_length,
    io_error,
    zero_fill,
)
from .url import parse_size_in_url

__all__ = ["MemoryStorage", "NullStorage"]

_PAGE = mmap.PAGESIZE

# mmap.MAP_NORESERVE appears only in Python 3.13; the value is 0x4000 in the
# generic Linux ABI (x86, arm, riscv, s390) but differs on ppc/mips/sparc,
# where we rather go without it.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)
if not _MAP_NORESERVE and sys.platform == "linux" and platform.machine() in (
        "x86_64", "i686", "aarch64", "armv7l", "riscv64", "s390x"):
    _MAP_NORESERVE = 0x4000


def _check_size(size: int) -> int:
    if size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"size {size} is not a positive multiple of {SECTOR_SIZE}")
    return size


def _parse_sized_spec(spec: StorageSpec) -> StorageSpec:
    # Shared by mem: and null:; the target is the size.
    return replace(spec, size=parse_size_in_url(spec.target, spec.url))


class _SizedStorage(Storage):
    """What ``mem:SIZE`` and ``null:SIZE`` share: a URL that is just a size, and discard."""

    if TYPE_CHECKING:
        # The constructor every subclass has, which `open` calls.
        def __init__(self, size: int, *, read_only: bool = False, url: str | None = None) -> None: ...

    @classmethod
    def parse_spec(cls, spec: StorageSpec) -> StorageSpec:
        return _parse_sized_spec(spec)

    @classmethod
    async def open(cls, spec: StorageSpec) -> Self:
        assert spec.size is not None
        return cls(spec.size, read_only=spec.read_only, url=spec.url)

    @property
    def supports_discard(self) -> bool:
        return True


class MemoryStorage(_SizedStorage):
    """A RAM disk of ``size`` bytes, initially all zeros."""

    def __init__(self, size: int, *, read_only: bool = False, url: str | None = None) -> None:
        self._size = _check_size(size)
        self.read_only = read_only
        self.url = url or f"mem:{size}"
        # MAP_NORESERVE: a big RAM disk is sparse; don't make the kernel
        # account (and possibly refuse) memory that may never be touched.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        try:
            self._mm: mmap.mmap | None = mmap.mmap(-1, size, flags=flags)
        except OSError as e:
            raise io_error(f"cannot allocate RAM disk {self.url}", e, value=size) from e
        self._view: memoryview | None = memoryview(self._mm)

    def _mem(self) -> memoryview:
        assert self._view is not None
        return self._view

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_range(offset, buffers_length(buffers), "read")
        mem = self._mem()
        pos = offset
        for buf in buffers:
            n = buf.nbytes
            buf.cast("B")[:] = mem[pos:pos + n]
            pos += n

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_writable("write")
        self.check_range(offset, buffers_length(buffers), "write")
        mem = self._mem()
        pos = offset
        for buf in buffers:
            n = buf.nbytes
            mem[pos:pos + n] = buf.cast("B")
            pos += n

    async def flush(self) -> None:
        # RAM is as durable as this disk will ever be.
        self.check_open("flush")

    async def discard(self, offset: int, length: int) -> None:
        # Discarded RAM reads as zeros: the same as zeroing with unmap.
        self._zero(offset, length, "discard")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self._zero(offset, length, "write_zeroes")

    def _zero(self, offset: int, length: int, op: str) -> None:
        self.check_writable(op)
        self.check_range(offset, length, op)
        assert self._mm is not None
        mem = self._mem()
        end = offset + length
        # Whole pages go back to the kernel (they read as zeros afterwards,
        # and stop costing memory); the ragged edges are zeroed by hand.
        first = -(-offset // _PAGE) * _PAGE
        last = end // _PAGE * _PAGE
        if last - first >= _PAGE:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, first, last - first)
            except OSError as e:  # pragma: no cover - madvise on our own mapping
                raise io_error(f"{op} on {self.url} failed", e) from e
            zero_fill(mem[offset:first])
            zero_fill(mem[last:end])
        else:
            zero_fill(mem[offset:end])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        view, mm = self._view, self._mm
        self._view = self._mm = None
        if view is not None:
            view.release()
        if mm is not None:
            mm.close()


class NullStorage(_SizedStorage):
    """Reads zeros, discards writes: a disk with no back end at all."""

    def __init__(self, size: int, *, read_only: bool = False, url: str | None = None) -> None:
        self._size = _check_size(size)
        self.read_only = read_only
        self.url = url or f"null:{size}"

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_range(offset, buffers_length(buffers), "read")
        for buf in buffers:
            zero_fill(buf)

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_writable("write")
        self.check_range(offset, buffers_length(buffers), "write")

    async def flush(self) -> None:
        self.check_open("flush")

    async def discard(self, offset: int, length: int) -> None:
        self.check_writable("discard")
        self.check_range(offset, length, "discard")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_writable("write_zeroes")
        self.check_range(offset, length, "write_zeroes")

    async def aclose(self) -> None:
        self._closed = True
