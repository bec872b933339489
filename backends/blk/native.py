"""The native virtio-blk data path: which storage it can run, and its C handles.

`NativeBlkStorage.of(storage)` describes a `Storage` to the C engine
(``vdev/_native/src/blk.h``) when the engine can execute its I/O itself:

* ``null:`` — nothing to do (reads zeros);
* ``mem:`` — memcpy into the RAM disk's mapping, whose address is taken
  while this object holds an export of it (so the mapping cannot be closed
  under the engine: the storage's ``aclose`` comes after `close`);
* ``file:`` — io_uring on the storage's own fd (O_DIRECT as opened, the
  probed logical block size for alignment).

Any other storage (``nbd://``, a third party's scheme) returns None: it is
served on the Python path.
"""

from __future__ import annotations

from typing import Any

from vdev._native import ffi, lib
from vdev.engine import NativeEngine

from .storage.base import Storage
from .storage.file import FileStorage
from .storage.memory import MemoryStorage, NullStorage

__all__ = ["NATIVE_STAT_NAMES", "NativeBlkEngine", "NativeBlkStorage"]

#: Names of the C engine's per-type counters (``VD_BLK_STAT_*``), as the
#: Python path names them in the device's ``stats``.
NATIVE_STAT_NAMES = ("IN", "OUT", "FLUSH", "GET_ID", "DISCARD", "WRITE_ZEROES", "rejected")


class NativeBlkStorage:
    """``struct vd_blk_storage`` for one open `Storage` (shared by every queue's engine)."""

    def __init__(self, cdata: Any, storage: Storage, held: memoryview | None) -> None:
        self.cdata: Any = cdata
        self.storage = storage
        self._held = held

    @classmethod
    def of(cls, storage: Storage) -> NativeBlkStorage | None:
        """The C description of ``storage``, or None if the C engine cannot run it."""
        held: memoryview | None = None
        if type(storage) is NullStorage:
            cdata = lib.vd_blk_storage_new(lib.VD_BLK_NULL, ffi.NULL, storage.size, -1, 0, 512,
                                           storage.read_only)
        elif type(storage) is MemoryStorage:
            held = memoryview(storage._mem())
            buf = ffi.from_buffer("uint8_t[]", held, require_writable=True)
            addr = ffi.cast("uint8_t *", buf)
            ffi.release(buf)
            cdata = lib.vd_blk_storage_new(lib.VD_BLK_MEM, addr, storage.size, -1, 0, 512,
                                           storage.read_only)
        elif type(storage) is FileStorage:
            cdata = lib.vd_blk_storage_new(lib.VD_BLK_FILE, ffi.NULL, storage.size, storage.fileno,
                                           int(storage.direct), storage.block_size, storage.read_only)
        else:
            return None
        if cdata == ffi.NULL:
            raise MemoryError("cannot allocate the native storage description")
        return cls(cdata, storage, held)

    def close(self) -> None:
        """Free the C side; only once no engine points at it any more."""
        if self.cdata is not None:
            lib.vd_blk_storage_free(self.cdata)
            self.cdata = None
        if self._held is not None:
            self._held.release()
            self._held = None


class NativeBlkEngine(NativeEngine):
    """The C virtio-blk engine of one queue."""

    def __init__(self, storage: NativeBlkStorage, cfg: Any, queue_size: int, *, poll_us: int = 0) -> None:
        super().__init__(lib.vd_blk_engine_new(storage.cdata, cfg, queue_size), poll_us=poll_us)
        self._cfg = cfg
        self._storage = storage

    def set_blk_storage(self, storage: NativeBlkStorage) -> None:
        """Point the engine at other storage; only while it is held and idle."""
        lib.vd_blk_engine_set_storage(self._e, storage.cdata)
        self._storage = storage
