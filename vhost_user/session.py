"""The sans-IO vhost-user session: bytes and fds in, typed messages out.

Nothing here touches a socket.  The caller reads from wherever it likes
(`recvmsg` in `vhost_user.server`, a buffer in a test) and feeds what it got
with `receive_data(data, fds)`; `next_event()` then hands back one complete
message at a time, or `NEED_DATA`.  Writing is just as plain: `encode()` turns
a message into bytes, and the caller sends those bytes with the fds.

File descriptors travel as SCM_RIGHTS ancillary data.  The kernel hands
them over with the read that reaches the `sendmsg` that carried them, and ends
that read inside that sendmsg's bytes; earlier fd-less messages may be glued
in front of it in the same read.  The session therefore records the stream
offset of the *last* byte of the read that brought each batch and attaches the
batch to the message whose bytes cover that offset, so fds stay with their
message even when one read returns several messages or half of one.

Errors come in two kinds (`ProtocolError.fatal`):

* fatal — the stream itself is broken (bad version, reserved flag bits, a
  payload size over the limit).  The caller must drop the connection.
* non-fatal — the header was fine but the payload or fd count was wrong for
  that request, or the request number is unknown.  `next_event()` returns an
  `InvalidMessage` so the handler can fail just that request (and ack it if a
  reply was asked for); the stream stays in step.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from .errors import ProtocolError
from .messages import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    VERSION_MASK,
    BackendReq,
    FrontendReq,
    HeaderFlag,
    Payload,
    RequestSpec,
)

#: The request enum of one direction (`decode` is given its table and enum).
_Req = TypeVar("_Req", FrontendReq, BackendReq)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by `next_event` when no complete message is buffered yet.
NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message.  ``fds`` belong to the receiver, who must close them."""

    request: FrontendReq | BackendReq
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.REPLY)


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A well-framed message whose payload or fds were wrong (non-fatal).

    The fds that came with it have already been closed.
    """

    request: FrontendReq | BackendReq | int
    flags: int
    error: ProtocolError

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A framed message before payload decoding (used for replies)."""

    request: int
    flags: int
    data: bytes
    fds: tuple[int, ...]


def encode(request: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """Frame one message: the 12-byte header (version 1 added) plus payload."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ProtocolError("payload too large to send", request=request, value=len(payload))
    return HEADER.pack(int(request), int(flags) | HeaderFlag.VERSION_1, len(payload)) + payload


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Framer:
    """Splits a byte stream into framed messages and keeps fds with their message."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._consumed = 0                      # stream offset of _buf[0]
        self._fds: deque[tuple[int, list[int]]] = deque()   # (stream offset of arrival, fds)
        self._broken: ProtocolError | None = None

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Buffer ``data`` and the fds that arrived with it (ownership passes to the framer)."""
        if fds:
            # Fix: the fds belong to the message holding the *last* byte of this
            # read, not the first.  Linux (unix_stream_read_generic) glues the
            # bytes of fd-less sendmsgs in front of the one carrying fds and stops
            # right after it, so [SET_VRING_ADDR][SET_VRING_KICK+fd] arrives as
            # one read; keyed on the first byte, the kick fd went to
            # SET_VRING_ADDR and both requests failed (any front-end that does
            # not wait for an ack between requests, e.g. QEMU without REPLY_ACK).
            last = self._consumed + len(self._buf) + max(len(data), 1) - 1
            self._fds.append((last, list(fds)))
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def partial(self) -> str | None:
        """Describe an incomplete message still buffered (for the log at EOF), or None."""
        if not self._buf:
            return None
        if len(self._buf) < HEADER_SIZE:
            return f"{len(self._buf)} bytes of a 12-byte header"
        request, _flags, size = HEADER.unpack_from(self._buf)
        return (f"request {request} announcing a {size}-byte payload, "
                f"{len(self._buf) - HEADER_SIZE} payload bytes received")

    def _take_fds(self, end: int) -> list[int]:
        taken: list[int] = []
        while self._fds and self._fds[0][0] < end:
            taken.extend(self._fds.popleft()[1])
        return taken

    def next_raw(self) -> RawMessage | _NeedData:
        """Return the next framed message, or NEED_DATA.  Raises a fatal ProtocolError."""
        if self._broken is not None:
            raise self._broken
        if len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        request, flags, size = HEADER.unpack_from(self._buf)
        try:
            if flags & VERSION_MASK != 1:
                raise ProtocolError("unsupported vhost-user version", request=request,
                                    value=flags & VERSION_MASK, fatal=True)
            if flags & ~KNOWN_FLAGS:
                raise ProtocolError("reserved header flag bits set", request=request,
                                    value=hex(flags), fatal=True)
            if size > MAX_PAYLOAD_SIZE:
                raise ProtocolError(f"payload size above {MAX_PAYLOAD_SIZE}", request=request,
                                    value=size, fatal=True)
        except ProtocolError as exc:
            self._broken = exc
            self.close()
            raise
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return NEED_DATA
        data = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._consumed += end
        fds = self._take_fds(self._consumed)
        return RawMessage(request, flags, data, tuple(fds))

    def close(self) -> None:
        """Close every fd still held (call when the connection ends)."""
        while self._fds:
            close_fds(self._fds.popleft()[1])
        self._buf.clear()


def decode(raw: RawMessage, table: Mapping[_Req, RequestSpec], enum_type: type[_Req]) -> Message | InvalidMessage:
    """Type a framed request by the dispatch table; wrong payload or fds → InvalidMessage."""
    try:
        request = enum_type(raw.request)
    except ValueError:
        close_fds(raw.fds)
        return InvalidMessage(raw.request, raw.flags,
                              ProtocolError("unknown request number", value=raw.request))
    spec: RequestSpec = table[request]
    lo, hi = spec.fds
    if not lo <= len(raw.fds) <= min(hi, MAX_FDS):
        close_fds(raw.fds)
        return InvalidMessage(request, raw.flags, ProtocolError(
            f"expected {lo}..{hi} fds" if lo != hi else f"expected {lo} fd(s)",
            request=request.name, value=len(raw.fds)))
    try:
        payload = spec.payload.unpack(raw.data)
    except ProtocolError as exc:
        close_fds(raw.fds)
        exc.request = request.name
        return InvalidMessage(request, raw.flags, exc)
    return Message(request, raw.flags, payload, raw.fds)


class BackendSession:
    """The back-end's view of the connection: front-end requests in, replies out.

    >>> s = BackendSession()
    >>> s.receive_data(encode(FrontendReq.GET_FEATURES))
    >>> s.next_event().request
    <FrontendReq.GET_FEATURES: 1>
    >>> s.next_event()
    NEED_DATA
    """

    def __init__(self) -> None:
        self._framer = Framer()

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._framer.receive_data(data, fds)

    def next_event(self) -> Message | InvalidMessage | _NeedData:
        raw = self._framer.next_raw()
        if isinstance(raw, _NeedData):
            return raw
        if raw.flags & HeaderFlag.REPLY:
            close_fds(raw.fds)
            # A reply arriving on the request channel means the two sides disagree
            # about who asked what; nothing later can be trusted.
            raise ProtocolError("front-end sent a message with the REPLY flag", request=raw.request,
                                value=hex(raw.flags), fatal=True)
        return decode(raw, FRONTEND_REQUESTS, FrontendReq)

    def partial(self) -> str | None:
        """An incomplete message still buffered, described for a log line; or None."""
        return self._framer.partial()

    @staticmethod
    def reply(request: FrontendReq, payload: bytes) -> bytes:
        """Encode the reply to ``request``: same request number, REPLY flag set."""
        return encode(request, payload, flags=HeaderFlag.REPLY)

    def close(self) -> None:
        self._framer.close()


class FrontendSession:
    """The front-end's view: requests out, replies and back-end requests in.

    Used by `vhost_user.frontend.Frontend` and by tests that speak the VMM side.
    """

    def __init__(self) -> None:
        self._framer = Framer()

    @staticmethod
    def request(request: FrontendReq, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
        return encode(request, payload, flags=HeaderFlag.NEED_REPLY if need_reply else 0)

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._framer.receive_data(data, fds)

    def next_reply(self) -> RawMessage | _NeedData:
        """Next reply on the request channel, payload left raw (the caller knows its type)."""
        raw = self._framer.next_raw()
        if not isinstance(raw, _NeedData) and not raw.flags & HeaderFlag.REPLY:
            close_fds(raw.fds)
            raise ProtocolError("back-end sent a non-reply on the request channel",
                                request=raw.request, value=hex(raw.flags), fatal=True)
        return raw

    def close(self) -> None:
        self._framer.close()


class BackendChannelSession:
    """The front-end's side of the back-end request channel (SET_BACKEND_REQ_FD)."""

    def __init__(self) -> None:
        self._framer = Framer()

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self._framer.receive_data(data, fds)

    def next_event(self) -> Message | InvalidMessage | _NeedData:
        raw = self._framer.next_raw()
        if isinstance(raw, _NeedData):
            return raw
        return decode(raw, BACKEND_REQUESTS, BackendReq)

    def close(self) -> None:
        self._framer.close()
