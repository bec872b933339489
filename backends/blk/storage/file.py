"""`FileStorage`: a raw image file or a block device (``file:PATH``, bare paths).

Every syscall that can block (preadv, pwritev, fdatasync, fallocate) runs on
a small thread pool owned by the storage, so the event loop keeps serving
other virtqueues while the disk works; Python releases the GIL inside those
calls, so the threads really do overlap.  One executor hop per request: a
request's whole scatter list, its short-transfer retries and any bounce
copies happen inside one worker call.

``?direct=on`` opens with O_DIRECT (no host page cache).  The kernel then
wants memory address, length and file offset aligned to the logical block
size; guest buffers usually are, and go straight to the syscall.  When they
are not, the request goes through an aligned anonymous mmap ("bounce
buffer"); a write whose *offset or length* is unaligned becomes a
read-modify-write (RMW) of the covering blocks.

An RMW reads whole blocks, patches them and writes them back, so any other
write landing on those blocks in between would be undone.  Writes are
therefore serialised the way QEMU serialises requests (`_WriteSerialiser`):
an RMW waits for every overlapping write already in flight, and every write
(aligned or not, discard and write-zeroes included) that overlaps a block
under RMW waits for that RMW.  Writes that overlap no RMW never wait.  The
device advertises the logical block size as ``blk_size``, so a Linux guest
never sends sub-block writes; the serialisation keeps RMW correct for
drivers that do.

discard and write_zeroes map onto fallocate(2) (PUNCH_HOLE, ZERO_RANGE),
called through ctypes because ``os.posix_fallocate`` only allocates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from vdev.errors import DeviceError

from .base import (
    SECTOR_SIZE,
    Storage,
    StorageSpec,
    buffers_length,
    io_error,
    zero_chunks,
)
from .url import parse_bool

__all__ = ["FileStorage"]

log = logging.getLogger(__name__)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>: BLKGETSIZE64 = _IOR(0x12, 114, size_t), BLKSSZGET = _IO(0x12, 104)
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    _IOV_MAX = 1024
if _IOV_MAX <= 0:  # pragma: no cover
    _IOV_MAX = 1024

# Errors meaning "this file system / device cannot do that fallocate mode".
_FALLOC_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY}


# ---- libc fallocate ------------------------------------------------------------

def _load_fallocate() -> Callable[..., int] | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:  # pragma: no cover - glibc and musl both have it
        return None
    # int fallocate(int fd, int mode, off_t offset, off_t len);  off_t is 64-bit
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate_fn = _load_fallocate()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError.  ctypes drops the GIL around the call."""
    if _fallocate_fn is None:  # pragma: no cover
        raise OSError(errno.ENOSYS, "fallocate not available")
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- buffer addresses (for O_DIRECT alignment) ---------------------------------

class _PyBuffer(ctypes.Structure):
    # typedef struct { void *buf; PyObject *obj; Py_ssize_t len, itemsize;
    #                  int readonly, ndim; char *format; Py_ssize_t *shape,
    #                  *strides, *suboffsets; void *internal; } Py_buffer;
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_GetBuffer.restype = ctypes.c_int
_ReleaseBuffer = ctypes.pythonapi.PyBuffer_Release
_ReleaseBuffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_ReleaseBuffer.restype = None


def buffer_address(buf: memoryview) -> int:
    """Address of a contiguous buffer's first byte (read-only ones too,
    which ``ctypes.c_char.from_buffer`` refuses)."""
    view = _PyBuffer()
    _GetBuffer(buf, ctypes.byref(view), 0)  # PyBUF_SIMPLE
    try:
        return view.buf or 0
    finally:
        _ReleaseBuffer(ctypes.byref(view))


def _is_aligned(buffers: Sequence[memoryview], align: int) -> bool:
    for b in buffers:
        if b.nbytes % align or not b.c_contiguous or buffer_address(b) % align:
            return False
    return True


def _as_bytes(buffers: Sequence[memoryview]) -> list[memoryview]:
    """Byte-format 1-D views, so slicing counts bytes (cheap; no copy)."""
    return [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]


# ---- the worker-thread halves of each operation --------------------------------
# These run in the storage's executor and raise OSError; the async side turns
# that into DeviceError.

def _advance(bufs: list[memoryview], i: int, n: int) -> int:
    """Consume ``n`` bytes from ``bufs[i:]`` (in place); return the new index."""
    while n > 0:
        ln = bufs[i].nbytes
        if n >= ln:
            n -= ln
            i += 1
        else:
            bufs[i] = bufs[i][n:]
            n = 0
    return i


def _iov_full(syscall, fd: int, offset: int, buffers: Sequence[memoryview]) -> int:  # type: ignore[no-untyped-def]
    """Repeat ``syscall`` (os.preadv or os.pwritev) until every buffer is done; returns bytes moved.

    A read stops early at end of file (0 returned); a write that moves
    nothing raises EIO, which regular files and devices never do.
    """
    bufs = list(buffers)
    i = total = 0
    while i < len(bufs):
        if bufs[i].nbytes == 0:
            i += 1
            continue
        n = syscall(fd, bufs[i:i + _IOV_MAX], offset)
        if n == 0:
            if syscall is os.preadv:
                break  # end of file
            raise OSError(errno.EIO, "pwritev wrote nothing")  # pragma: no cover
        total += n
        offset += n
        i = _advance(bufs, i, n)
    return total


def _preadv_full(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
    """preadv until the buffers are full or EOF; returns bytes read."""
    return _iov_full(os.preadv, fd, offset, buffers)


def _pwritev_full(fd: int, offset: int, buffers: Sequence[memoryview]) -> int:
    return _iov_full(os.pwritev, fd, offset, buffers)


def _copy_into(dst: memoryview, pos: int, buffers: Sequence[memoryview]) -> None:
    for b in buffers:
        n = b.nbytes
        dst[pos:pos + n] = b
        pos += n


def _copy_out(src: memoryview, pos: int, buffers: Sequence[memoryview]) -> None:
    for b in buffers:
        n = b.nbytes
        b[:] = src[pos:pos + n]
        pos += n


def _bounce_read(fd: int, start: int, span: int, skip: int, buffers: Sequence[memoryview]) -> int:
    """Read the aligned ``[start, start+span)`` into an aligned buffer and copy
    the wanted part (from ``skip``) out; returns how many wanted bytes existed."""
    with mmap.mmap(-1, span) as mm:
        view = memoryview(mm)
        try:
            got = _preadv_full(fd, start, [view])
            want = buffers_length(buffers)
            avail = max(0, min(want, got - skip))
            if avail == want:
                _copy_out(view, skip, buffers)
            return avail
        finally:
            view.release()


def _bounce_write(fd: int, start: int, span: int, skip: int, buffers: Sequence[memoryview],
                  head: bool, tail: bool, block: int) -> None:
    """Write through an aligned buffer; ``head``/``tail``: the first/last
    block is only partly covered, so read it first (read-modify-write)."""
    with mmap.mmap(-1, span) as mm:
        view = memoryview(mm)
        try:
            if head:
                _preadv_full(fd, start, [view[:block]])
            if tail and (not head or span > block):
                _preadv_full(fd, start + span - block, [view[span - block:]])
            _copy_into(view, skip, buffers)
            _pwritev_full(fd, start, [view])
        finally:
            view.release()


#: Data runs found by `_seek_extents` end on a multiple of this (see there).
EXTENT_STEP = 64 << 10


def _seek_extents(fd: int, offset: int, length: int, step: int = EXTENT_STEP) -> list[tuple[int, int, bool]]:
    """Data and hole runs of ``[offset, offset+length)`` by lseek(2) SEEK_DATA.

    Only SEEK_DATA: on tmpfs SEEK_HOLE walks every cached page up to the next
    hole, the end of a full 1 GiB image, costing milliseconds per call.
    SEEK_DATA from a position with data returns at once, and over a hole it
    skips empty ranges quickly.  So a data run is followed ``step`` bytes at
    a time (one probe each: is there data at the next step boundary?), and
    it may take in the start of the hole after it: a hole run is certainly
    zeros, a data run may hold some.  A file system that cannot tell says
    "all data".
    """
    end = offset + length
    runs: list[tuple[int, int, bool]] = []

    def data_from(pos: int) -> int:
        try:
            return min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError as e:
            if e.errno == errno.ENXIO:          # no data from pos to the end of the file
                return end
            raise

    pos = offset
    while pos < end:
        try:
            data = data_from(pos)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(offset, length, True)]
            raise
        if data > pos:
            runs.append((pos, data - pos, False))
            pos = data
            if pos >= end:
                break
        # data at pos: follow it step by step to the first boundary without data
        stop = min(end, (pos // step + 1) * step)
        while stop < end:
            nxt = data_from(stop)
            if nxt != stop:
                break
            stop = min(end, stop + step)
        runs.append((pos, stop - pos, True))
        pos = stop
    return runs


def _device_size(fd: int, is_block: bool) -> int:
    if is_block:
        try:
            raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("=Q", raw)[0]
        except OSError:
            return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


def _probe_block_size(fd: int, is_block: bool, direct: bool) -> int:
    """The logical block size O_DIRECT must respect (512 unless proven larger)."""
    if is_block:
        try:
            raw = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
            return max(SECTOR_SIZE, struct.unpack("=i", raw)[0])
        except OSError:
            return SECTOR_SIZE
    if not direct:
        return SECTOR_SIZE
    # A file: try a 512-byte direct read; EINVAL means the file system's
    # block is bigger (4K-sector disks).  Reading never changes anything.
    with mmap.mmap(-1, 4096) as mm:
        view = memoryview(mm)
        try:
            os.preadv(fd, [view[:SECTOR_SIZE]], 0)
            return SECTOR_SIZE
        except OSError as e:
            if e.errno == errno.EINVAL:
                return 4096
            raise
        finally:
            view.release()


# ---- write serialisation -----------------------------------------------------------

class _Tracked:
    """One write in flight over ``[start, end)`` (block-rounded for an RMW)."""

    __slots__ = ("start", "end", "rmw", "done")

    def __init__(self, start: int, end: int, rmw: bool, done: asyncio.Future[None]) -> None:
        self.start, self.end, self.rmw, self.done = start, end, rmw, done


class _WriteSerialiser:
    """Orders writes against read-modify-writes over the same blocks.

    A request registers at once and then waits only for *earlier* requests
    it conflicts with, so there is no deadlock and no starvation: an RMW
    conflicts with every overlapping write, a plain write only with
    overlapping RMWs (two plain writes to one range are unordered, as on any
    disk).  Cancelling a waiter removes it; a request's range stays held
    until its syscall has really finished (see `FileStorage._run_held`).
    """

    def __init__(self) -> None:
        self._active: list[_Tracked] = []

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int, *, rmw: bool) -> AsyncIterator[None]:
        me = _Tracked(start, end, rmw, asyncio.get_running_loop().create_future())
        earlier = [t.done for t in self._active
                   if t.start < end and start < t.end and (rmw or t.rmw)]
        self._active.append(me)
        try:
            for fut in earlier:
                if not fut.done():
                    await asyncio.wait({fut})   # never cancels the other request's future
            yield
        finally:
            self._active.remove(me)
            me.done.set_result(None)

    @property
    def in_flight(self) -> int:
        return len(self._active)


# ---- the storage -----------------------------------------------------------------

class FileStorage(Storage):
    """A raw image file or block device."""

    url_options = frozenset({"readonly", "direct"})

    #: Worker threads per storage: enough to keep a few requests in the disk
    #: queue at once, few enough to stay "small".
    DEFAULT_WORKERS = 4

    def __init__(self, fd: int, *, path: str, url: str, read_only: bool, direct: bool,
                 size: int, block_size: int, is_block_device: bool,
                 executor: ThreadPoolExecutor) -> None:
        # Use `open_path` (or `open_storage`); this only assembles the parts.
        self._fd = fd
        self.path = path
        self.url = url
        self.read_only = read_only
        self.direct = direct
        self.is_block_device = is_block_device
        self._size = size
        self._block = block_size
        self._executor = executor
        self._serialiser = _WriteSerialiser()
        #: Read-modify-writes done (sub-block writes under O_DIRECT).
        self.rmw_count = 0
        self._can_punch = True
        self._can_zero_range = True
        self._zero_mm: mmap.mmap | None = None
        self._close_task: asyncio.Future[None] | None = None

    # ---- opening ---------------------------------------------------------------

    @classmethod
    def parse_spec(cls, spec: StorageSpec) -> StorageSpec:
        path = spec.target
        if spec.scheme == "file" and path.startswith("//"):
            # file:///abs/path — the URL form with an (empty) authority.
            host, slash, rest = path[2:].partition("/")
            if host not in ("", "localhost"):
                raise ValueError(f"file URL with host {host!r} is not supported in {spec.url!r}")
            path = slash + rest
        if not path:
            raise ValueError(f"empty path in {spec.url!r}")
        direct = parse_bool("direct", spec.options["direct"], spec.url) if "direct" in spec.options else False
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ValueError(f"no such file: {path!r}") from None
        except OSError as e:
            raise ValueError(f"cannot access {path!r}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ValueError(f"not a regular file or block device: {path!r}")
        return replace(spec, path=path, direct=direct)

    @classmethod
    async def open(cls, spec: StorageSpec) -> FileStorage:
        assert spec.path is not None
        return await cls.open_path(spec.path, read_only=spec.read_only, direct=spec.direct, url=spec.url)

    @classmethod
    async def open_path(cls, path: str, *, read_only: bool = False, direct: bool = False,
                        url: str | None = None, workers: int | None = None) -> FileStorage:
        """Open ``path``; failures are `DeviceError` carrying the OSError."""
        url = url or f"file:{path}"
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        executor = ThreadPoolExecutor(max_workers=workers or cls.DEFAULT_WORKERS,
                                      thread_name_prefix="vdev-file")
        loop = asyncio.get_running_loop()

        def do_open() -> tuple[int, int, int, bool]:
            fd = os.open(path, flags)
            try:
                st = os.fstat(fd)
                is_block = stat.S_ISBLK(st.st_mode)
                if not (is_block or stat.S_ISREG(st.st_mode)):
                    raise OSError(errno.EINVAL, "not a regular file or block device")
                return fd, _device_size(fd, is_block), _probe_block_size(fd, is_block, direct), is_block
            except BaseException:
                os.close(fd)
                raise

        try:
            fd, size, block, is_block = await loop.run_in_executor(executor, do_open)
        except OSError as e:
            executor.shutdown(wait=False)
            raise io_error(f"cannot open {url}", e, value=path) from e
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(fd, path=path, url=url, read_only=read_only, direct=direct, size=size,
                   block_size=block, is_block_device=is_block, executor=executor)

    # ---- properties ------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block

    @property
    def supports_discard(self) -> bool:
        return not self.read_only

    @property
    def fileno(self) -> int:
        return self._fd

    def status(self) -> dict[str, object]:
        # Under O_DIRECT: how many sub-block writes needed a read-modify-write
        # (0 for a Linux guest, which is told the block size).
        return {"read_modify_writes": self.rmw_count} if self.direct else {}

    async def refresh_size(self) -> int:
        self._size = await self._run("refresh_size", _device_size, self._fd, self.is_block_device)
        return self._size

    # ---- plumbing ---------------------------------------------------------------

    async def _run(self, op: str, fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn(*args)`` on a worker; OSError becomes DeviceError."""
        self.check_open(op)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except OSError as e:
            raise io_error(f"{op} on {self.url} failed", e) from e

    async def _run_held(self, op: str, fn, *args):  # type: ignore[no-untyped-def]
        """`_run` for a call made while holding a serialised range: if the
        caller is cancelled, the range stays held until the syscall has
        really finished (a thread cannot be stopped mid-pwritev)."""
        self.check_open(op)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise
        except OSError as e:
            raise io_error(f"{op} on {self.url} failed", e) from e

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        """``[offset, offset+length)`` widened to whole logical blocks."""
        b = self._block
        return offset // b * b, -(-(offset + length) // b) * b

    def _direct_ok(self, offset: int, length: int, buffers: Sequence[memoryview]) -> bool:
        b = self._block
        return offset % b == 0 and length % b == 0 and _is_aligned(buffers, b)

    # ---- I/O ------------------------------------------------------------------------

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        bufs = _as_bytes(buffers)
        length = buffers_length(bufs)
        self.check_range(offset, length, "read")
        if length == 0:
            return
        if not self.direct or self._direct_ok(offset, length, bufs):
            got = await self._run("read", _preadv_full, self._fd, offset, bufs)
        else:
            b = self._block
            start = offset // b * b
            span = -(-(offset + length) // b) * b - start
            got = await self._run("read", _bounce_read, self._fd, start, span, offset - start, bufs)
        if got != length:
            raise io_error(f"short read from {self.url}: {got} of {length} bytes (past end of file?)",
                           OSError(errno.EIO, "short read"), value=(offset, length))

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_writable("write")
        bufs = _as_bytes(buffers)
        length = buffers_length(bufs)
        self.check_range(offset, length, "write")
        if length == 0:
            return
        if not self.direct:
            # Buffered I/O: the kernel's page cache does any partial-block
            # work itself, under its own page locks; there is no RMW here.
            await self._run("write", _pwritev_full, self._fd, offset, bufs)
            return
        b = self._block
        start, end = self._blocks(offset, length)
        if self._direct_ok(offset, length, bufs):
            async with self._serialiser.hold(start, end, rmw=False):
                await self._run_held("write", _pwritev_full, self._fd, offset, bufs)
            return
        head = offset != start
        tail = end != offset + length
        if not (head or tail):
            # Aligned on disk, misaligned in memory: bounce, no read needed.
            async with self._serialiser.hold(start, end, rmw=False):
                await self._run_held("write", _bounce_write, self._fd, start, end - start, 0, bufs,
                                     False, False, b)
            return
        if end > self._size:
            # The covering block would reach past the end of the image and
            # an O_DIRECT write of it would grow the file.
            raise io_error(f"unaligned O_DIRECT write crosses the end of {self.url}",
                           OSError(errno.EINVAL, "unaligned write at end of image"),
                           value=(offset, length))
        async with self._serialiser.hold(start, end, rmw=True):
            self.rmw_count += 1
            await self._run_held("write", _bounce_write, self._fd, start, end - start, offset - start,
                                 bufs, head, tail, b)

    async def flush(self) -> None:
        await self._run("flush", os.fdatasync, self._fd)

    async def discard(self, offset: int, length: int) -> None:
        self.check_writable("discard")
        self.check_range(offset, length, "discard")
        if length == 0 or not self._can_punch:
            return
        if not await self._punch(offset, length):
            log.debug("%s: punch hole unsupported; discard is a no-op", self.url)

    async def _fallocate_held(self, op: str, mode: int, offset: int, length: int) -> None:
        """fallocate; under O_DIRECT ordered against RMWs like a write (an
        RMW in flight over the range would write the old bytes back)."""
        if not self.direct:
            await self._run(op, _fallocate, self._fd, mode, offset, length)
            return
        start, end = self._blocks(offset, length)
        async with self._serialiser.hold(start, end, rmw=False):
            await self._run_held(op, _fallocate, self._fd, mode, offset, length)

    async def _punch(self, offset: int, length: int) -> bool:
        """PUNCH_HOLE; False if this file system / device cannot."""
        try:
            await self._fallocate_held("discard", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                       offset, length)
            return True
        except DeviceError as e:
            cause = e.cause
            if isinstance(cause, OSError) and cause.errno in _FALLOC_UNSUPPORTED:
                self._can_punch = False
                return False
            if isinstance(cause, OSError) and cause.errno == errno.EINVAL and self.is_block_device:
                return False  # unaligned range on a device: advisory, skip
            raise

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_writable("write_zeroes")
        self.check_range(offset, length, "write_zeroes")
        if length == 0:
            return
        # A punched hole reads as zeros on files and, on devices, where the
        # kernel allows it; otherwise ZERO_RANGE keeps the space allocated.
        if may_unmap and self._can_punch and await self._punch(offset, length):
            return
        if self._can_zero_range:
            try:
                await self._fallocate_held("write_zeroes", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                           offset, length)
                return
            except DeviceError as e:
                cause = e.cause
                if not isinstance(cause, OSError):
                    raise
                if cause.errno in _FALLOC_UNSUPPORTED:
                    self._can_zero_range = False
                elif cause.errno != errno.EINVAL:
                    raise
        await self._write_zeros(offset, length)

    async def _write_zeros(self, offset: int, length: int) -> None:
        chunk: memoryview | None = None
        if self.direct:
            # An aligned block of zeros keeps the fallback on the direct path.
            if self._zero_mm is None:
                self._zero_mm = mmap.mmap(-1, 1 << 20)
            chunk = memoryview(self._zero_mm)
        step = 32 << 20
        pos = 0
        while pos < length:
            k = min(step, length - pos)
            await self.writev(offset + pos, zero_chunks(k, chunk))
            pos += k

    async def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self.check_range(offset, length, "extents")
        if length == 0:
            return []
        if self.is_block_device:
            return [(offset, length, True)]
        return await self._run("extents", _seek_extents, self._fd, offset, length)

    # ---- closing ---------------------------------------------------------------------

    def _release(self) -> None:
        # Wait for every queued/running syscall before closing the fd: a
        # worker still using the number after close() could hit whatever
        # file gets that number next.
        self._executor.shutdown(wait=True)
        try:
            os.close(self._fd)
        except OSError as e:
            log.warning("%s: close failed: %s", self.url, e)
        if self._zero_mm is not None:
            with contextlib.suppress(BufferError):  # a view still in a caller's hands
                self._zero_mm.close()

    async def aclose(self) -> None:
        if self._close_task is None:
            self._closed = True
            # The release runs to the end even if this aclose is cancelled.
            self._close_task = asyncio.ensure_future(asyncio.to_thread(self._release))
        await asyncio.shield(self._close_task)
