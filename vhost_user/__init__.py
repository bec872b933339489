"""vhost-user, the protocol: a sans-IO core plus one small asyncio adapter.

Layers, bottom up:

* `messages` — every request number, flag and payload layout of the spec as
  typed, frozen dataclasses, and the dispatch table (payload type, fds,
  reply, required protocol feature) as data.
* `session` — framing: (bytes, fds) in, typed `Message` events out.  No I/O.
* `handler` — the back-end state machine: what each request means for
  features, the memory table and the rings.  The device side plugs in through
  `BackendHooks`; the handler never sees guest memory.
* `server` — the asyncio adapter that owns the Unix socket.
* `frontend` — the VMM side, used by tests and benchmarks.

This package imports nothing else of the project.
"""

from __future__ import annotations

from .errors import ProtocolError, Unsupported, VdevError
from .handler import BackendHandler, BackendHooks, RegionFd, Vring
from .messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    FrontendReq,
    HeaderFlag,
    MemoryRegion,
    ProtocolFeature,
    VringAddr,
)
from .session import NEED_DATA, BackendSession, FrontendSession, InvalidMessage, Message

__all__ = [
    "VHOST_USER_F_PROTOCOL_FEATURES", "BackendHandler", "BackendHooks", "BackendReq",
    "BackendSession", "FrontendReq", "FrontendSession", "HeaderFlag", "InvalidMessage",
    "MemoryRegion", "Message", "NEED_DATA", "ProtocolError", "ProtocolFeature", "RegionFd",
    "Unsupported", "VdevError", "Vring", "VringAddr",
]
