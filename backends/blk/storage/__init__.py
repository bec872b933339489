"""Swappable storage behind the virtio-blk device.

The device parses guest requests and calls one `Storage`; which one is chosen
by a URL on the command line::

    storage = await open_storage("nbd+unix:///disk?socket=/run/nbd.sock")
    await storage.readv(0, [memoryview(buf)])

Built-in schemes: ``file:`` (and bare paths), ``mem:``, ``null:``, ``nbd:``,
``nbd+unix:``.  `register_scheme` adds more.  `testing.FaultyStorage` wraps
any storage to inject failures in device tests.  See README.md here.
"""

from __future__ import annotations

from .base import STATUS_IOERR, STATUS_UNSUPP, Storage, StorageSpec
from .file import FileStorage
from .memory import MemoryStorage, NullStorage
from .nbd import NbdExportInfo, NbdHandshakeError, NbdStorage
from .url import (
    StorageFactory,
    open_storage,
    parse_bool,
    parse_size,
    parse_storage_url,
    register_scheme,
    registered_schemes,
)

__all__ = [
    "Storage",
    "StorageSpec",
    "StorageFactory",
    "STATUS_IOERR",
    "STATUS_UNSUPP",
    "FileStorage",
    "MemoryStorage",
    "NullStorage",
    "NbdStorage",
    "NbdExportInfo",
    "NbdHandshakeError",
    "open_storage",
    "parse_storage_url",
    "parse_size",
    "parse_bool",
    "register_scheme",
    "registered_schemes",
]

register_scheme("file", FileStorage)
register_scheme("mem", MemoryStorage)
register_scheme("null", NullStorage)
register_scheme("nbd", NbdStorage)
register_scheme("nbd+unix", NbdStorage)
