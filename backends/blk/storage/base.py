"""The `Storage` interface: what the virtio-blk device reads from and writes to.

The blk device turns guest requests into calls on one `Storage` object and
never learns what is behind it (a file, RAM, an NBD server).  Everything here
is async and runs on the device's single event loop; an implementation whose
I/O blocks (files) hands the syscalls to threads so the loop keeps serving
other queues meanwhile.

Contract every implementation keeps, because the device relies on it:

* Offsets and lengths are bytes.  The device checks them against `size`
  before calling, but storage checks again (`check_range`) and refuses with
  `DeviceError` rather than touch anything outside the image: a bug in one
  layer must not become data corruption in the next.
* Every I/O failure is a `DeviceError` with ``status=1`` (virtio-blk IOERR)
  whose ``cause`` is the underlying exception; an operation the back end
  cannot do at all is ``status=2`` (UNSUPP).  Nothing else escapes.
* ``readv`` fills exactly ``sum(len(b))`` bytes or fails; there is no short
  read.
* Buffers are memoryviews into guest memory.  Implementations fill them in
  place instead of building intermediate ``bytes``.

`StorageSpec` is the parsed, validated form of a storage URL (see `url.py`);
it lives here so an implementation's ``parse_spec``/``open`` can name it
without importing the parser.
"""

from __future__ import annotations

import abc
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar

from vdev.errors import DeviceError

__all__ = [
    "Storage",
    "StorageSpec",
    "STATUS_IOERR",
    "STATUS_UNSUPP",
    "SECTOR_SIZE",
    "buffers_length",
    "zero_fill",
    "io_error",
    "unsupported",
]

#: virtio-blk status bytes a `DeviceError` carries (VIRTIO_BLK_S_IOERR/UNSUPP).
STATUS_IOERR = 1
STATUS_UNSUPP = 2

#: virtio-blk addresses the disk in 512-byte sectors whatever the back end.
SECTOR_SIZE = 512

# One shared block of zeros: zero-filling a buffer copies slices of it
# (a memcpy) instead of allocating a fresh ``bytes(n)`` per request.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


@dataclass(frozen=True)
class StorageSpec:
    """A storage URL, parsed and checked, not yet opened.

    ``scheme``/``target``/``options`` are the raw split every scheme gets
    (``options`` already checked against the scheme's accepted names); the
    typed fields are filled by the scheme's ``parse_spec`` where they apply.
    A third-party scheme may ignore the typed fields and read ``target`` and
    ``options`` itself.
    """

    url: str
    scheme: str
    target: str
    options: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    read_only: bool = False
    # file:
    path: str | None = None
    direct: bool = False
    # mem: / null:
    size: int | None = None
    # nbd:// and nbd+unix://
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    export: str | None = None


def buffers_length(buffers: Sequence[memoryview]) -> int:
    """Total bytes of a scatter list (``nbytes``: a view need not be format 'B')."""
    return sum(b.nbytes for b in buffers)


def zero_fill(buf: memoryview) -> None:
    """Overwrite a writable buffer with zeros, in place."""
    view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    n = view.nbytes
    pos = 0
    while pos < n:
        k = min(_ZERO_CHUNK, n - pos)
        view[pos:pos + k] = _ZEROS[:k]
        pos += k


def zero_chunks(length: int, chunk: memoryview | None = None) -> list[memoryview]:
    """A scatter list of ``length`` zero bytes made of slices of one zero block."""
    src = _ZEROS if chunk is None else chunk
    size = src.nbytes
    out: list[memoryview] = []
    while length > 0:
        k = min(size, length)
        out.append(src[:k])
        length -= k
    return out


def io_error(message: str, cause: BaseException | None = None, *, value: object = None) -> DeviceError:
    """A virtio IOERR `DeviceError`; ``cause`` is usually the OSError."""
    return DeviceError(message, status=STATUS_IOERR, value=value, cause=cause)


def unsupported(message: str, *, value: object = None) -> DeviceError:
    """A virtio UNSUPP `DeviceError`: this back end cannot do that at all."""
    return DeviceError(message, status=STATUS_UNSUPP, value=value,
                       cause=OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)))


class Storage(abc.ABC):
    """A byte-addressed disk image the virtio-blk device reads and writes.

    Subclasses set ``url``, ``read_only`` and ``_size`` in their constructor
    and implement `readv`, `writev`, `flush` and `aclose`; `discard`,
    `write_zeroes` and `refresh_size` have working defaults.  To make a
    subclass reachable from a URL, give it ``url_options``, ``parse_spec``
    and ``open`` and call `register_scheme` (see the package README).
    """

    url: str = ""
    read_only: bool = False
    _size: int = 0
    _closed: bool = False

    #: Query options (``?name=value``) the scheme's URLs accept; the parser
    #: rejects any other name before ``parse_spec`` runs.
    url_options: ClassVar[frozenset[str]] = frozenset({"readonly"})

    # ---- opening from a URL ------------------------------------------------

    @classmethod
    def parse_spec(cls, spec: StorageSpec) -> StorageSpec:
        """Validate ``spec.target``/``options`` and fill the typed fields.

        Must not open anything (the command line calls it before creating any
        socket); raises ``ValueError`` naming the offending value.
        """
        return spec

    @classmethod
    async def open(cls, spec: StorageSpec) -> Storage:
        """Open the storage a parsed spec describes."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a URL")

    # ---- size ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Size in bytes, as last read (see `refresh_size`)."""
        return self._size

    async def refresh_size(self) -> int:
        """Re-read the size from the back end (an image grew, an export was
        resized) and return it.  The default: the size never changes."""
        return self._size

    @property
    def block_size(self) -> int:
        """Smallest I/O unit the back end handles without read-modify-write;
        the device may advertise it as the logical block size."""
        return SECTOR_SIZE

    @property
    def request_timeout(self) -> float | None:
        """Longest one request can take before it fails, if the back end
        bounds it (network storage does); None: no bound of its own.  The
        device bounds pause and swap by it."""
        return None

    def status(self) -> dict[str, object]:
        """Extra fields for the control socket's ``info`` (e.g. an NBD
        connection's state); empty by default."""
        return {}

    # ---- capabilities (the device derives feature bits from these) --------

    @property
    def supports_flush(self) -> bool:
        return True

    @property
    def supports_discard(self) -> bool:
        return False

    @property
    def supports_write_zeroes(self) -> bool:
        return not self.read_only

    # ---- I/O ----------------------------------------------------------------

    @abc.abstractmethod
    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill the writable ``buffers``, in order, from ``offset``."""

    @abc.abstractmethod
    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write the ``buffers``, in order, at ``offset``."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def discard(self, offset: int, length: int) -> None:
        """Tell the back end the range is unused.  Advisory: the default
        does nothing, and the range's content afterwards is unspecified."""
        self.check_writable("discard")
        self.check_range(offset, length, "discard")

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make the range read as zeros.  The default writes zeros through
        `writev`, 32 MiB per call; ``may_unmap`` allows freeing the space."""
        self.check_writable("write_zeroes")
        self.check_range(offset, length, "write_zeroes")
        step = 32 * _ZERO_CHUNK
        pos = 0
        while pos < length:
            k = min(step, length - pos)
            await self.writev(offset + pos, zero_chunks(k))
            pos += k

    async def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``[offset, offset+length)`` as consecutive ``(offset, length, data)``
        runs; ``data`` is False where the storage knows the bytes read as
        zeros without reading them (a hole in a sparse file).  A copy (the
        mirror) writes zeros there instead of reading.  The default: one
        run, all data.  The answer is a snapshot: a write that completes
        afterwards may turn a hole into data."""
        self.check_range(offset, length, "extents")
        return [(offset, length, True)] if length else []

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything; idempotent, and releases even on error."""

    # ---- helpers for implementations ---------------------------------------

    def check_open(self, op: str) -> None:
        if self._closed:
            raise io_error(f"{op} on closed storage {self.url}",
                           OSError(errno.EBADF, "storage is closed"))

    def check_writable(self, op: str) -> None:
        """Refuse a modifying operation on a closed or read-only storage."""
        self.check_open(op)
        if self.read_only:
            raise io_error(f"{op} on read-only storage {self.url}",
                           OSError(errno.EROFS, os.strerror(errno.EROFS)))

    def check_range(self, offset: int, length: int, op: str) -> None:
        """Refuse I/O that is not entirely inside ``[0, size)``.

        The device checked already; this is the last line before the back
        end, so a bug upstream cannot write outside the image.
        """
        self.check_open(op)
        if offset < 0 or length < 0 or offset + length > self._size:
            raise io_error(f"{op} out of range for {self.url} (size {self._size})",
                           OSError(errno.EINVAL, "offset/length outside the image"),
                           value=(offset, length))

    # ---- context manager ------------------------------------------------------

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        ro = " ro" if self.read_only else ""
        return f"<{type(self).__name__} {self.url!r} size={self._size}{ro}{state}>"
