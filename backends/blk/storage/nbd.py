"""`NbdStorage`: an asyncio NBD client (``nbd://HOST[:PORT]/EXPORT``,
``nbd+unix:///EXPORT?socket=PATH``).

Handshake (on a plain non-blocking socket, with ``loop.sock_*`` calls): fixed
newstyle; NBD_OPT_GO for the export, asking for NBD_INFO_BLOCK_SIZE too; the
export's size and transmission flags come back in NBD_REP_INFO.  A server
that answers NBD_REP_ERR_UNSUP (or is not fixed-newstyle) gets the old
NBD_OPT_EXPORT_NAME instead.  Structured replies are never negotiated, so
every reply is a simple one.

Transmission: the socket then becomes an asyncio transport whose protocol is
the reply reader (`_NbdProtocol`, the one consumer of the socket's bytes).
Requests are written straight to the transport and may be many in flight;
each carries a 64-bit handle (cookie) and the reader matches replies, which
may come in any order, back to the waiting request.  It is a
``BufferedProtocol`` so the payload of a large READ reply is received
*directly into the guest's buffers* (``recv_into`` a slice of the
memoryview); small replies land in a staging buffer together with the
following headers and are copied, which costs less than a syscall per
scrap.

Failure: when the connection drops (server killed, protocol violation) or a
request has no reply within ``?timeout=`` seconds (default 30; one timer per
connection, at the oldest request's deadline), every pending request fails
with `DeviceError` at once; nothing waits for a reply that cannot come.  The
storage then reconnects in the background with exponential backoff (0.1 s
doubling to at most 5 s), and meanwhile requests wait up to
``?reconnect-delay=`` seconds (default 0) for the new connection before they
fail.  The policy in full is in `NbdStorage` and the package README.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from vdev.errors import DeviceError

from . import nbd_proto as P
from .base import (
    SECTOR_SIZE,
    STATUS_IOERR,
    STATUS_UNSUPP,
    Storage,
    StorageSpec,
    buffers_length,
    io_error,
    unsupported,
)

__all__ = ["NbdStorage", "NbdExportInfo", "NbdHandshakeError"]

log = logging.getLogger(__name__)

#: Largest request sent; bigger I/O is split (qemu-nbd's limit is 32 MiB).
MAX_REQUEST = 32 << 20
#: TRIM / WRITE_ZEROES carry no payload but their length is a u32.
MAX_NOPAYLOAD_REQUEST = 1 << 30
#: Longest option reply accepted during the handshake (strings are <= 4096).
MAX_OPTION_REPLY = 1 << 16

_STAGE_SIZE = 256 << 10     # staging buffer for headers and small payloads
_DIRECT_MIN = 16 << 10      # receive straight into guest memory from this size
_SCRATCH_SIZE = 256 << 10   # sink for payloads nobody waits for any more


class NbdHandshakeError(ConnectionError):
    """The server refused or garbled the negotiation."""


@dataclass(frozen=True)
class NbdExportInfo:
    """What the handshake learnt about the export."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = MAX_REQUEST
    negotiated_with: str = "NBD_OPT_GO"


# ---- handshake (plain socket, before the transport exists) ----------------------

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        if _QUICKACK is not None and sock.family != socket.AF_UNIX:
            # Servers write option replies in pieces (header, then data)
            # without TCP_NODELAY; our delayed ACK would then stall the
            # second piece by ~40 ms per reply.  Quick ACKs avoid that.
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        k = await loop.sock_recv_into(sock, view[pos:])
        if k == 0:
            raise NbdHandshakeError(f"server closed the connection during the handshake"
                                    f" (after {pos} of {n} bytes)")
        pos += k
    return bytes(buf)


async def _send_option(loop: asyncio.AbstractEventLoop, sock: socket.socket, option: int,
                       data: bytes) -> None:
    await loop.sock_sendall(sock, P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)


async def _opt_go(loop: asyncio.AbstractEventLoop, sock: socket.socket, option: int,
                  export: bytes) -> NbdExportInfo | None:
    """NBD_OPT_GO or NBD_OPT_INFO; None if the server does not know the option."""
    data = (P.NAME_LENGTH.pack(len(export)) + export
            + P.INFO_COUNT.pack(1) + P.INFO_TYPE.pack(P.NBD_INFO_BLOCK_SIZE))
    await _send_option(loop, sock, option, data)
    size = flags = None
    min_b, pref_b, max_b = 1, 4096, MAX_REQUEST
    while True:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack(
            await _recv_exactly(loop, sock, P.OPTION_REPLY.size))
        if magic != P.OPTION_REPLY_MAGIC:
            raise NbdHandshakeError(f"bad option reply magic {magic:#x}")
        if opt != option:
            raise NbdHandshakeError(f"option reply for option {opt}, expected {option}")
        if length > MAX_OPTION_REPLY:
            raise NbdHandshakeError(f"option reply of {length} bytes is too long")
        payload = await _recv_exactly(loop, sock, length) if length else b""
        if rtype == P.NBD_REP_ACK:
            if size is None or flags is None:
                raise NbdHandshakeError("server acknowledged without sending NBD_INFO_EXPORT")
            return NbdExportInfo(size=size, flags=flags, min_block=min_b, preferred_block=pref_b,
                                 max_payload=max_b,
                                 negotiated_with="NBD_OPT_GO" if option == P.NBD_OPT_GO else "NBD_OPT_INFO")
        if rtype == P.NBD_REP_INFO:
            if len(payload) < 2:
                raise NbdHandshakeError("NBD_REP_INFO without an info type")
            itype = P.INFO_TYPE.unpack_from(payload)[0]
            if itype == P.NBD_INFO_EXPORT and len(payload) >= P.INFO_EXPORT.size:
                _, size, flags = P.INFO_EXPORT.unpack_from(payload)
            elif itype == P.NBD_INFO_BLOCK_SIZE and len(payload) >= P.INFO_BLOCK_SIZE.size:
                _, min_b, pref_b, max_b = P.INFO_BLOCK_SIZE.unpack_from(payload)
            continue  # other info types: not asked for, ignore
        if rtype == P.NBD_REP_ERR_UNSUP:
            return None
        if rtype & P.NBD_REP_FLAG_ERROR:
            name = P.REP_NAMES.get(rtype, f"error {rtype:#x}")
            text = payload.decode("utf-8", "replace")
            if rtype == P.NBD_REP_ERR_UNKNOWN:
                raise NbdHandshakeError(f"export {export.decode('utf-8', 'replace')!r} not found"
                                        f" ({name}{': ' + text if text else ''})")
            raise NbdHandshakeError(f"server refused the export ({name}{': ' + text if text else ''})")
        # Any other reply type is not ours to understand; the spec lets us skip it.


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, export: str,
                     *, info_only: bool = False, greeting: bytes | None = None) -> NbdExportInfo | None:
    """Run the negotiation.  ``info_only``: use NBD_OPT_INFO, then NBD_OPT_ABORT,
    never entering transmission (None if the server cannot do that).
    ``greeting``: the server's greeting, if the caller has read it already."""
    if greeting is None:
        greeting = await _recv_exactly(loop, sock, P.SERVER_GREETING.size)
    magic, second, hflags = P.SERVER_GREETING.unpack(greeting)
    if magic != P.NBDMAGIC:
        raise NbdHandshakeError(f"not an NBD server (greeting magic {magic:#x})")
    if second == P.CLISERV_MAGIC:
        raise NbdHandshakeError("server speaks oldstyle negotiation, which is not supported")
    if second != P.IHAVEOPT:
        raise NbdHandshakeError(f"unknown negotiation magic {second:#x}")
    fixed = bool(hflags & P.NBD_FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(hflags & P.NBD_FLAG_NO_ZEROES)
    cflags = (P.NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (P.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
    await loop.sock_sendall(sock, P.CLIENT_FLAGS.pack(cflags))
    name = export.encode("utf-8")
    if fixed:
        # Only a fixed-newstyle server answers options it does not know
        # instead of dropping the connection.
        info = await _opt_go(loop, sock, P.NBD_OPT_INFO if info_only else P.NBD_OPT_GO, name)
        if info_only:
            await _send_option(loop, sock, P.NBD_OPT_ABORT, b"")
            return info
        if info is not None:
            return info
    elif info_only:
        return None
    # Fallback: NBD_OPT_EXPORT_NAME; a server that lacks the export just
    # closes the connection (there is no way to say "unknown export").
    await _send_option(loop, sock, P.NBD_OPT_EXPORT_NAME, name)
    try:
        reply = await _recv_exactly(loop, sock, P.EXPORT_NAME_REPLY.size)
    except NbdHandshakeError:
        raise NbdHandshakeError(f"server closed the connection on NBD_OPT_EXPORT_NAME"
                                f" (no export {export!r}?)") from None
    size, flags = P.EXPORT_NAME_REPLY.unpack(reply)
    if not no_zeroes:
        await _recv_exactly(loop, sock, P.EXPORT_NAME_PADDING)
    return NbdExportInfo(size=size, flags=flags, negotiated_with="NBD_OPT_EXPORT_NAME")


async def _connect_socket(loop: asyncio.AbstractEventLoop, *, host: str | None, port: int,
                          socket_path: str | None) -> socket.socket:
    if socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, socket_path)
        except BaseException:
            sock.close()
            raise
        return sock
    assert host is not None
    last: OSError | None = None
    for family, type_, proto, _, addr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        # Requests are small and latency-bound: don't let Nagle hold them.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host!r}")


# ---- transmission ----------------------------------------------------------------

class _Pending:
    """One request waiting for its reply."""

    __slots__ = ("cmd", "future", "buffers", "length", "deadline")

    def __init__(self, cmd: int, future: asyncio.Future[int], buffers: list[memoryview] | None,
                 length: int, deadline: float) -> None:
        self.cmd = cmd
        self.future = future
        self.buffers = buffers   # READ destination; None once nobody wants the data
        self.length = length
        self.deadline = deadline  # loop time by which the whole reply must be in


class _NbdProtocol(asyncio.BufferedProtocol):
    """The reply reader: turns the byte stream back into completed requests."""

    def __init__(self, name: str, timeout: float | None = None,
                 on_dead: Callable[[_NbdProtocol], None] | None = None) -> None:
        self.name = name
        #: Seconds a request may wait for its whole reply; then the connection is dead.
        self.timeout = timeout
        self._on_dead = on_dead
        self._dead_told = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, _Pending] = {}
        self.error: DeviceError | None = None   # set once the connection is unusable
        self._handles = itertools.count(1)
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        # staging buffer: [_pos, _end) holds received, unprocessed bytes
        self._stage = bytearray(_STAGE_SIZE)
        self._sv = memoryview(self._stage)
        self._pos = 0
        self._end = 0
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        # the READ payload being received
        self._cur: _Pending | None = None
        self._dest: list[memoryview] | None = None
        self._di = 0
        self._dpos = 0
        self._remaining = 0
        self._direct = False
        # flow control
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        rem = self._remaining
        if rem and self._pos == self._end:
            if self._dest is None:
                self._direct = True
                return self._scratch[:min(rem, _SCRATCH_SIZE)]
            buf = self._dest[self._di]
            left = min(buf.nbytes - self._dpos, rem)
            if left >= _DIRECT_MIN:
                self._direct = True
                return buf[self._dpos:self._dpos + left]
        self._direct = False
        return self._sv[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._direct = False
            if self._dest is not None:
                self._advance_dest(nbytes)
            self._remaining -= nbytes
            if self._remaining == 0:
                self._finish_payload()
            return
        self._end += nbytes
        try:
            self._process()
        except _ProtocolViolation as e:
            self._abort(DeviceError(f"NBD protocol violation by {self.name}: {e}",
                                    status=STATUS_IOERR, cause=ConnectionError(str(e))))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        cause: BaseException = exc or ConnectionResetError(errno.ECONNRESET, "server closed the connection")
        if self.error is None:
            self.error = DeviceError(f"NBD connection to {self.name} lost", status=STATUS_IOERR, cause=cause)
        self._fail_all()
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        self._tell_dead()

    def _tell_dead(self) -> None:
        """Tell the storage, once, that this connection can serve no more requests."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self._dead_told and self._on_dead is not None:
            self._dead_told = True
            self._on_dead(self)

    def retire(self, error: DeviceError) -> None:
        """Refuse new requests (the server is shutting down) and let the
        storage reconnect; requests already sent still get their replies."""
        if self.error is None:
            self.error = error
        self._tell_dead()

    # -- the per-request timeout --

    def _arm_watchdog(self, deadline: float) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_at(deadline, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """One timer per connection, at the earliest deadline: requests are
        sent in handle order with one timeout, so the oldest entry of
        ``pending`` (or the READ whose payload is arriving) is the earliest."""
        self._watchdog = None
        if self.error is not None or self.timeout is None:
            return
        oldest: list[_Pending] = []
        if self._cur is not None:
            oldest.append(self._cur)
        if self.pending:
            oldest.append(next(iter(self.pending.values())))
        if not oldest:
            return
        first = min(oldest, key=lambda p: p.deadline)
        loop = asyncio.get_running_loop()
        if first.deadline <= loop.time():
            what = P.CMD_NAMES.get(first.cmd, str(first.cmd))
            self._abort(DeviceError(
                f"NBD server {self.name} did not answer a {what} within {self.timeout:g} s; "
                f"connection dropped", status=STATUS_IOERR,
                cause=TimeoutError(errno.ETIMEDOUT, f"no reply within {self.timeout:g} s")))
            return
        self._watchdog = loop.call_at(first.deadline, self._check_deadlines)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    # -- reading --

    def _process(self) -> None:
        sv = self._sv
        pos, end = self._pos, self._end
        while True:
            if self._remaining:
                k = min(self._remaining, end - pos)
                if k == 0:
                    break
                if self._dest is not None:
                    self._copy_to_dest(sv[pos:pos + k])
                self._remaining -= k
                pos += k
                if self._remaining == 0:
                    self._finish_payload()
                continue
            if end - pos < P.SIMPLE_REPLY.size:
                break
            magic, error, handle = P.SIMPLE_REPLY.unpack_from(sv, pos)
            pos += P.SIMPLE_REPLY.size
            self._on_reply(magic, error, handle)
        # Keep the (< 16 byte) unprocessed tail at the front of the buffer.
        left = end - pos
        if left:
            self._stage[0:left] = self._stage[pos:end]
        self._pos, self._end = 0, left

    def _on_reply(self, magic: int, error: int, handle: int) -> None:
        if magic != P.NBD_SIMPLE_REPLY_MAGIC:
            what = " (a structured reply, never negotiated)" if magic == P.NBD_STRUCTURED_REPLY_MAGIC else ""
            raise _ProtocolViolation(f"bad reply magic {magic:#x}{what}")
        p = self.pending.pop(handle, None)
        if p is None:
            raise _ProtocolViolation(f"reply for unknown handle {handle:#x}")
        if p.cmd == P.NBD_CMD_READ and error == 0 and p.length:
            # The payload follows; with simple replies an error has none.
            self._cur = p
            self._dest = p.buffers
            self._di = self._dpos = 0
            self._remaining = p.length
            return
        self._complete(p, error)

    def _copy_to_dest(self, src: memoryview) -> None:
        assert self._dest is not None
        pos, n = 0, src.nbytes
        while pos < n:
            buf = self._dest[self._di]
            k = min(buf.nbytes - self._dpos, n - pos)
            buf[self._dpos:self._dpos + k] = src[pos:pos + k]
            pos += k
            self._advance_dest(k)

    def _advance_dest(self, n: int) -> None:
        assert self._dest is not None
        dest = self._dest
        while n:
            k = min(dest[self._di].nbytes - self._dpos, n)
            self._dpos += k
            n -= k
            if self._dpos == dest[self._di].nbytes:
                self._di += 1
                self._dpos = 0
        # skip empty buffers so get_buffer never offers a zero-length one
        while self._di < len(dest) and dest[self._di].nbytes == 0:
            self._di += 1

    def _finish_payload(self) -> None:
        p, self._cur, self._dest = self._cur, None, None
        if p is not None:
            self._complete(p, 0)

    def _complete(self, p: _Pending, error: int) -> None:
        if not p.future.done():
            p.future.set_result(error)
        if not self.pending and self._cur is None:
            for w in self._idle_waiters:
                if not w.done():
                    w.set_result(None)
            self._idle_waiters.clear()

    def _fail_all(self) -> None:
        assert self.error is not None
        waiting = list(self.pending.values())
        if self._cur is not None:
            waiting.append(self._cur)
        self.pending.clear()
        self._cur = self._dest = None
        self._remaining = 0
        for p in waiting:
            if not p.future.done():
                e = self.error
                p.future.set_exception(DeviceError(e.message, status=e.status, cause=e.cause))
        for w in self._idle_waiters:
            if not w.done():
                w.set_result(None)
        self._idle_waiters.clear()

    def _abort(self, error: DeviceError) -> None:
        if self.error is None:
            self.error = error
        log.error("%s", error)
        self._fail_all()
        if self.transport is not None:
            self.transport.abort()
        self._tell_dead()

    # -- writing --

    async def drain(self) -> None:
        if self._paused and self.error is None:
            w = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(w)
            await w

    async def wait_idle(self) -> None:
        if self.pending or self._cur is not None:
            w = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(w)
            await w

    def submit(self, cmd: int, flags: int, offset: int, length: int, *,
               payload: Sequence[memoryview] = (), dest: list[memoryview] | None = None) -> _Pending:
        """Send one request; its reply resolves the returned entry's future
        with the NBD error number (0 = success)."""
        if self.error is not None:
            e = self.error
            raise DeviceError(e.message, status=e.status, cause=e.cause)
        assert self.transport is not None
        handle = next(self._handles)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout is not None else float("inf")
        p = _Pending(cmd, loop.create_future(), dest, length, deadline)
        self.pending[handle] = p
        if self.timeout is not None:
            self._arm_watchdog(deadline)
        # Header and payload go out back to back with no await in between,
        # so concurrent requests never interleave on the wire.
        self.transport.write(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length))
        for b in payload:
            if b.nbytes:
                self.transport.write(b)
        return p

    def send_disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC,
                                                next(self._handles), 0, 0))

    def abandon(self, p: _Pending) -> None:
        """The waiter went away (cancelled): its payload, if any, still has
        to be read off the wire, but must no longer land in its buffers."""
        p.buffers = None
        if self._cur is p:
            self._dest = None


class _ProtocolViolation(Exception):
    pass


def _split(offset: int, buffers: Sequence[memoryview], limit: int
           ) -> Iterator[tuple[int, int, list[memoryview]]]:
    """Cut a scatter list into requests of at most ``limit`` bytes:
    yields (offset, length, buffers), slicing buffers at the cuts."""
    chunk: list[memoryview] = []
    size = 0
    for b in buffers:
        while b.nbytes:
            k = min(b.nbytes, limit - size)
            chunk.append(b[:k])
            size += k
            b = b[k:]
            if size == limit:
                yield offset, size, chunk
                offset += size
                chunk, size = [], 0
    if size:
        yield offset, size, chunk


# ---- the storage -----------------------------------------------------------------

def _parse_seconds(name: str, value: str, url: str, *, positive: bool = False) -> float:
    """A number of seconds in a URL option; ValueError naming it."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0) or seconds > 86400:
        raise ValueError(f"cannot parse {name}={value!r} in {url!r} (seconds, "
                         f"{'more than 0' if positive else '0 or more'}, at most 86400)")
    return seconds


def _reason(exc: BaseException) -> str:
    """A never-empty description of why something failed."""
    if isinstance(exc, DeviceError):
        cause = f": {_reason(exc.cause)}" if exc.cause is not None else ""
        return f"{exc.message}{cause}"
    text = str(exc)
    return text if text else type(exc).__name__


async def _open_connection(*, host: str | None, port: int, socket_path: str | None, export: str,
                           where: str, connect_timeout: float, timeout: float | None,
                           on_dead: Callable[[_NbdProtocol], None] | None
                           ) -> tuple[_NbdProtocol, NbdExportInfo]:
    """Connect, negotiate and start the reply reader; failures are `DeviceError`."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            sock = await _connect_socket(loop, host=host, port=port, socket_path=socket_path)
            info = await _handshake(loop, sock, export)
            assert info is not None
            protocol = _NbdProtocol(where, timeout, on_dead)
            if socket_path is not None:
                await loop.create_unix_connection(lambda: protocol, sock=sock)
            else:
                await loop.create_connection(lambda: protocol, sock=sock)
    except TimeoutError as e:
        if sock is not None:
            sock.close()
        raise io_error(f"cannot connect to NBD server {where}: timed out after {connect_timeout:g}s",
                       e, value=export) from e
    except OSError as e:  # includes NbdHandshakeError
        if sock is not None:
            sock.close()
        raise io_error(f"cannot connect to NBD server {where}", e, value=export) from e
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return protocol, info


class NbdStorage(Storage):
    """A disk served by an NBD server, over TCP or a Unix socket.

    Timeout and reconnect policy (see the package README):

    * every request must have its whole reply within ``timeout`` seconds
      (``?timeout=``, default 30); otherwise it fails with IOERR and the
      connection is treated as dead (a server that stops answering cannot
      be told apart from a dead one);
    * a dead connection (lost, timed out, or the server shutting down) is
      replaced in the background: attempts after 0.1, 0.2, 0.4 ... seconds,
      at most 5 s apart, for as long as the storage is open;
    * while there is no connection, a request waits until
      ``reconnect-delay`` seconds (``?reconnect-delay=``, default 0) after the
      loss, then fails with IOERR; requests in flight when the connection
      died are sent again on the new one if it comes within that window
      (once), otherwise they fail with IOERR.  With the default 0 nothing
      waits: every request fails at once until the connection is back, as
      QEMU's NBD client does by default.
    """

    url_options = frozenset({"readonly", "socket", "timeout", "reconnect-delay"})

    #: How long `aclose` lets in-flight requests finish before dropping them.
    CLOSE_TIMEOUT = 5.0
    #: Default per-request timeout (``?timeout=``).
    DEFAULT_TIMEOUT = 30.0
    #: Longest a connection attempt (connect + handshake) may take; at most the request timeout.
    CONNECT_TIMEOUT = 10.0
    #: Reconnect backoff: first wait, and the longest wait between attempts.
    BACKOFF_START = 0.1
    BACKOFF_CAP = 5.0
    #: How long `refresh_size` waits for a second connection to be greeted
    #: when the export does not advertise NBD_FLAG_CAN_MULTI_CONN.
    RESIZE_GREETING_TIMEOUT = 1.0

    def __init__(self, *, url: str, info: NbdExportInfo, protocol: _NbdProtocol,
                 host: str | None, port: int, socket_path: str | None, export: str,
                 read_only: bool, connect_timeout: float, max_request: int,
                 timeout: float | None = None, reconnect_delay: float = 0.0) -> None:
        # Use `connect` (or `open_storage`); this only assembles the parts.
        self.url = url
        self.export = export
        self._host, self._port, self._socket_path = host, port, socket_path
        self._where = socket_path if socket_path is not None else f"{host}:{port}"
        self._connect_timeout = connect_timeout
        self._want_max_request = max_request
        self._forced_read_only = read_only
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        self._close_task: asyncio.Future[None] | None = None
        # connection state
        self._state = "connected"
        self._last_error: str | None = None
        self._lost_at = 0.0
        self._up = asyncio.Event()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        self._install(protocol, info)

    def _install(self, protocol: _NbdProtocol, info: NbdExportInfo) -> None:
        self.info = info
        self.export_flags = info.flags
        self._proto = protocol
        protocol._on_dead = self._on_dead
        self.read_only = self._forced_read_only or bool(info.flags & P.NBD_FLAG_READ_ONLY)
        self._size = info.size
        self._max_request = max(SECTOR_SIZE, min(self._want_max_request, info.max_payload or self._want_max_request))
        self._state = "connected"
        self._up.set()

    # ---- URL -------------------------------------------------------------------

    @classmethod
    def parse_spec(cls, spec: StorageSpec) -> StorageSpec:
        for name in ("timeout", "reconnect-delay"):
            if name in spec.options:
                _parse_seconds(name, spec.options[name], spec.url, positive=name == "timeout")
        parts = urlsplit(f"{spec.scheme}:{spec.target}")
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if spec.scheme == "nbd+unix":
            if parts.netloc:
                raise ValueError(f"nbd+unix URL must not name a host ({parts.netloc!r}) in {spec.url!r}")
            sock = spec.options.get("socket")
            if sock is None:
                raise ValueError(f"missing socket=PATH in {spec.url!r}")
            if not sock:
                raise ValueError(f"empty socket= in {spec.url!r}")
            return replace(spec, socket=sock, export=export)
        if not parts.netloc or not parts.hostname:
            raise ValueError(f"missing host in {spec.url!r}")
        if "socket" in spec.options:
            raise ValueError(f"unknown option 'socket' in {spec.url!r} (only nbd+unix takes socket=)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"cannot parse port {parts.netloc.rpartition(':')[2]!r} in {spec.url!r}") from None
        if port == 0:
            raise ValueError(f"cannot parse port '0' in {spec.url!r}")
        return replace(spec, host=parts.hostname, port=port or P.NBD_DEFAULT_PORT, export=export)

    @classmethod
    async def open(cls, spec: StorageSpec) -> NbdStorage:
        timeout = cls.DEFAULT_TIMEOUT
        if "timeout" in spec.options:
            timeout = _parse_seconds("timeout", spec.options["timeout"], spec.url, positive=True)
        delay = 0.0
        if "reconnect-delay" in spec.options:
            delay = _parse_seconds("reconnect-delay", spec.options["reconnect-delay"], spec.url)
        return await cls.connect(host=spec.host, port=spec.port or P.NBD_DEFAULT_PORT,
                                 socket_path=spec.socket, export=spec.export or "",
                                 read_only=spec.read_only, url=spec.url, timeout=timeout,
                                 reconnect_delay=delay)

    @classmethod
    async def connect(cls, *, host: str | None = None, port: int = P.NBD_DEFAULT_PORT,
                      socket_path: str | None = None, export: str = "", read_only: bool = False,
                      url: str | None = None, connect_timeout: float | None = None,
                      max_request: int = MAX_REQUEST, timeout: float | None = DEFAULT_TIMEOUT,
                      reconnect_delay: float = 0.0) -> NbdStorage:
        """Connect and negotiate; failures are `DeviceError` with the cause.

        ``timeout``: seconds each request may wait for its reply (None: for
        ever); ``connect_timeout`` defaults to the smaller of 10 s and it.
        ``reconnect_delay``: see the class docstring.
        """
        if (host is None) == (socket_path is None):
            raise ValueError("give exactly one of host= and socket_path=")
        if connect_timeout is None:
            connect_timeout = min(cls.CONNECT_TIMEOUT, timeout) if timeout is not None else cls.CONNECT_TIMEOUT
        where = socket_path if socket_path is not None else f"{host}:{port}"
        url = url or (f"nbd+unix:///{export}?socket={socket_path}" if socket_path is not None
                      else f"nbd://{host}:{port}/{export}")
        protocol, info = await _open_connection(host=host, port=port, socket_path=socket_path, export=export,
                                                where=where, connect_timeout=connect_timeout,
                                                timeout=timeout, on_dead=None)
        log.debug("%s: export %r size %d flags %#x via %s", where, export, info.size, info.flags,
                  info.negotiated_with)
        return cls(url=url, info=info, protocol=protocol, host=host, port=port, socket_path=socket_path,
                   export=export, read_only=read_only, connect_timeout=connect_timeout,
                   max_request=max_request, timeout=timeout, reconnect_delay=reconnect_delay)

    # ---- the connection: loss, reconnect, state ------------------------------------

    def _on_dead(self, proto: _NbdProtocol) -> None:
        """The current connection can serve no more requests: reconnect."""
        if proto is not self._proto or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._lost_at = loop.time()
        self._up.clear()
        self._state = "reconnecting"
        self._last_error = _reason(proto.error) if proto.error is not None else "connection lost"
        log.warning("%s: %s; reconnecting in the background (requests %s)", self.url, self._last_error,
                    f"wait up to {self.reconnect_delay:g} s" if self.reconnect_delay
                    else "fail until it is back")
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = self.BACKOFF_START
        attempts = 0
        while not self._closed:
            await asyncio.sleep(delay)
            if self._closed:
                return
            attempts += 1
            try:
                proto, info = await _open_connection(
                    host=self._host, port=self._port, socket_path=self._socket_path, export=self.export,
                    where=self._where, connect_timeout=self._connect_timeout, timeout=self.timeout,
                    on_dead=self._on_dead)
            except DeviceError as e:
                # A server that answers but refuses us (export gone, policy)
                # is "failed": retrying goes on, but it needs an operator.
                self._state = "failed" if isinstance(e.cause, NbdHandshakeError) else "reconnecting"
                reason = _reason(e)
                if reason != self._last_error:
                    log.warning("%s: reconnect attempt %d failed: %s (retrying, at most %g s apart)",
                                self.url, attempts, reason, self.BACKOFF_CAP)
                self._last_error = reason
                delay = min(delay * 2, self.BACKOFF_CAP)
                continue
            if self._closed:
                if proto.transport is not None:
                    proto.transport.abort()
                return
            if info.size != self._size:
                log.warning("%s: the export is %d bytes now (was %d); `resize` tells the guest",
                            self.url, info.size, self._size)
            self.reconnects += 1
            self._install(proto, info)
            log.info("%s: reconnected to %s after %d attempt%s", self.url, self._where, attempts,
                     "" if attempts == 1 else "s")
            return

    async def _connection(self, op: str) -> _NbdProtocol:
        """The live connection, waiting for a reconnect per the policy."""
        self.check_open(op)
        proto = self._proto
        if proto.error is None:
            return proto
        loop = asyncio.get_running_loop()
        left = self._lost_at + self.reconnect_delay - loop.time()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._up.wait()
            self.check_open(op)
            if self._proto.error is None:
                return self._proto
        e = proto.error
        raise DeviceError(f"NBD {op} on {self.url} failed: connection to {self._where} lost, "
                          f"{self._state} ({self._last_error})", status=STATUS_IOERR,
                          cause=e.cause if e is not None else None)

    @property
    def connection_state(self) -> str:
        """"connected", "reconnecting" (lost; retrying with backoff), "failed"
        (the server refused the last attempt; still retrying) or "closed"."""
        return "closed" if self._closed else self._state

    @property
    def request_timeout(self) -> float | None:
        """Longest a request can take: the reply timeout, plus, when
        requests wait for a reconnect, that wait and one resend."""
        if self.timeout is None:
            return None
        if self.reconnect_delay:
            return 2 * self.timeout + self.reconnect_delay
        return self.timeout

    def status(self) -> dict[str, object]:
        return {"connection": self.connection_state, "connection_error": self._last_error,
                "reconnects": self.reconnects, "timeout": self.timeout,
                "reconnect_delay": self.reconnect_delay}

    # ---- capabilities ----------------------------------------------------------

    def _has(self, flag: int) -> bool:
        return bool(self.export_flags & flag)

    @property
    def block_size(self) -> int:
        return max(SECTOR_SIZE, self.info.min_block)

    @property
    def supports_flush(self) -> bool:
        return self._has(P.NBD_FLAG_SEND_FLUSH)

    @property
    def supports_discard(self) -> bool:
        return self._has(P.NBD_FLAG_SEND_TRIM) and not self.read_only

    @property
    def connected(self) -> bool:
        return self._proto.error is None and not self._closed

    @property
    def in_flight(self) -> int:
        return len(self._proto.pending)

    # ---- requests --------------------------------------------------------------

    async def _request(self, op: str, cmd: int, flags: int, offset: int, length: int, *,
                       payload: Sequence[memoryview] = (), dest: list[memoryview] | None = None) -> None:
        resent = False
        while True:
            proto = await self._connection(op)
            await proto.drain()
            try:
                p = proto.submit(cmd, flags, offset, length, payload=payload, dest=dest)
                try:
                    err = await p.future
                except asyncio.CancelledError:
                    proto.abandon(p)
                    raise
            except DeviceError:
                # The connection died with this request on it.  Within the
                # reconnect window it is sent once more on the next
                # connection (reads, writes, trims and flushes are all
                # idempotent); otherwise the guest gets IOERR.
                if resent or not self.reconnect_delay or self._closed:
                    raise
                resent = True
                continue
            if err:
                raise self._reply_error(op, err, offset, length)
            return

    def _reply_error(self, op: str, err: int, offset: int, length: int) -> DeviceError:
        code = P.NBD_ERRNO.get(err)
        if code is not None:
            cause = OSError(code, os.strerror(code))
        else:
            # proto.md "Error values": only the listed numbers are defined.
            # Any other (up to 2**32 - 1, beyond a C int, so no strerror)
            # is an I/O error that names the number the server sent.
            cause = OSError(errno.EIO, f"NBD error {err} ({err:#x}), not defined by the protocol")
            return DeviceError(f"NBD {op} on {self.url} failed with unknown NBD error {err}",
                               status=STATUS_IOERR, value=(offset, length), cause=cause)
        if err == P.NBD_ESHUTDOWN and self._proto.error is None:
            # The spec wants a soft disconnect from us now; then reconnect
            # (a restarted server is the usual reason).
            log.warning("%s: server is shutting down; disconnecting", self.url)
            old = self._proto
            old.retire(io_error(f"NBD server {self._where} is shutting down",
                                OSError(errno.ESHUTDOWN, os.strerror(errno.ESHUTDOWN))))
            task = asyncio.ensure_future(self._close_connection(old))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        status = STATUS_UNSUPP if err == P.NBD_ENOTSUP else STATUS_IOERR
        return DeviceError(f"NBD {op} on {self.url} failed", status=status, value=(offset, length),
                           cause=cause)

    async def _chunked(self, op: str, cmd: int, offset: int, buffers: list[memoryview]) -> None:
        chunks = list(_split(offset, buffers, self._max_request))
        if len(chunks) == 1:
            off, n, bufs = chunks[0]
            if cmd == P.NBD_CMD_READ:
                await self._request(op, cmd, 0, off, n, dest=bufs)
            else:
                await self._request(op, cmd, 0, off, n, payload=bufs)
            return
        # Send all pieces at once; wait for every one before reporting, so
        # no reply can still be writing into the buffers after we return.
        results = await asyncio.gather(
            *(self._request(op, cmd, 0, off, n, dest=bufs) if cmd == P.NBD_CMD_READ
              else self._request(op, cmd, 0, off, n, payload=bufs)
              for off, n, bufs in chunks),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        bufs = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]
        length = buffers_length(bufs)
        self.check_range(offset, length, "read")
        if length:
            await self._chunked("read", P.NBD_CMD_READ, offset, bufs)

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.check_writable("write")
        bufs = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]
        length = buffers_length(bufs)
        self.check_range(offset, length, "write")
        if length:
            await self._chunked("write", P.NBD_CMD_WRITE, offset, bufs)

    async def flush(self) -> None:
        self.check_open("flush")
        if not self.supports_flush:
            raise unsupported(f"NBD export of {self.url} does not accept FLUSH")
        await self._request("flush", P.NBD_CMD_FLUSH, 0, 0, 0)

    async def _ranged(self, op: str, cmd: int, flags: int, offset: int, length: int) -> None:
        pieces = []
        pos = 0
        while pos < length:
            k = min(MAX_NOPAYLOAD_REQUEST, length - pos)
            pieces.append(self._request(op, cmd, flags, offset + pos, k))
            pos += k
        results = await asyncio.gather(*pieces, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def discard(self, offset: int, length: int) -> None:
        self.check_writable("discard")
        self.check_range(offset, length, "discard")
        if length and self._has(P.NBD_FLAG_SEND_TRIM):
            await self._ranged("discard", P.NBD_CMD_TRIM, 0, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.check_writable("write_zeroes")
        self.check_range(offset, length, "write_zeroes")
        if not length:
            return
        if self._has(P.NBD_FLAG_SEND_WRITE_ZEROES):
            # NO_HOLE: the guest asked to keep the space allocated.
            flags = 0 if may_unmap else P.NBD_CMD_FLAG_NO_HOLE
            await self._ranged("write_zeroes", P.NBD_CMD_WRITE_ZEROES, flags, offset, length)
        else:
            await super().write_zeroes(offset, length, may_unmap=may_unmap)

    async def refresh_size(self) -> int:
        """The export's size now.

        NBD reports the size only during negotiation (NBD_OPT_INFO/GO); an
        open connection cannot ask again.  So:

        * the size learnt at the last (re)connection is current for a
          server that cannot change it while running (qemu-nbd: a bigger
          image needs a restart, and the reconnect that follows renegotiates);
        * a server that takes more clients is asked with NBD_OPT_INFO on a
          second, short-lived connection (qemu-storage-daemon after
          ``block_resize``).  Whether it does is known for sure only from
          NBD_FLAG_CAN_MULTI_CONN (qemu-nbd sets it exactly when started
          with ``--shared`` > 1); otherwise a second connection is tried, and
          if the server does not greet it within `RESIZE_GREETING_TIMEOUT`
          (qemu-nbd's default ``--shared=1`` queues it for ever) the size
          from the last negotiation stands.

        Raises:
            DeviceError: not connected, or the server refused the question;
                the message always says why.
        """
        self.check_open("refresh_size")
        what = f"cannot re-read the size of {self.url} from {self._where}"
        if self._proto.error is not None:
            raise io_error(f"{what}: not connected ({self.connection_state}: {self._last_error})",
                           self._proto.error.cause)
        loop = asyncio.get_running_loop()
        multi = self._has(P.NBD_FLAG_CAN_MULTI_CONN)
        greet_timeout = self._connect_timeout if multi else min(self.RESIZE_GREETING_TIMEOUT,
                                                                self._connect_timeout)
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                sock = await _connect_socket(loop, host=self._host, port=self._port,
                                             socket_path=self._socket_path)
            try:
                async with asyncio.timeout(greet_timeout):
                    greeting = await _recv_exactly(loop, sock, P.SERVER_GREETING.size)
            except TimeoutError:
                if multi:
                    raise
                log.info("%s: the server did not greet a second connection within %g s (it serves one "
                         "client, e.g. qemu-nbd without --shared); keeping the size from the last "
                         "negotiation, %d bytes", self.url, greet_timeout, self._size)
                return self._size
            async with asyncio.timeout(self._connect_timeout):
                info = await _handshake(loop, sock, self.export, info_only=True, greeting=greeting)
        except TimeoutError as e:
            raise io_error(f"{what}: no answer within {self._connect_timeout:g} s", e) from e
        except OSError as e:
            raise io_error(f"{what}: {_reason(e)}", e) from e
        finally:
            if sock is not None:
                sock.close()
        if info is not None:
            self._size = info.size
        return self._size

    # ---- closing -----------------------------------------------------------------

    async def _shutdown(self) -> None:
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        for retired in list(self._retired):
            await asyncio.wait({retired})
        await self._close_connection(self._proto)
        self._up.set()   # nobody waits for a reconnect that will not come

    async def _close_connection(self, proto: _NbdProtocol) -> None:
        """Soft disconnect: in-flight requests finish (up to CLOSE_TIMEOUT),
        NBD_CMD_DISC, close; a hard abort if the server does not cooperate."""
        transport = proto.transport
        retiring = proto.error is not None and proto.transport is not None \
            and not proto.transport.is_closing() and not proto.lost.done()
        try:
            if (proto.error is None or retiring) and transport is not None and not transport.is_closing():
                # The spec asks the client to let in-flight requests finish
                # before NBD_CMD_DISC.
                try:
                    async with asyncio.timeout(self.CLOSE_TIMEOUT):
                        await proto.wait_idle()
                except TimeoutError:
                    log.warning("%s: %d requests still pending at close", self.url, len(proto.pending))
                proto.send_disconnect()
                transport.close()  # sends what is buffered, then closes
                try:
                    async with asyncio.timeout(self.CLOSE_TIMEOUT):
                        await asyncio.shield(proto.lost)
                except TimeoutError:
                    pass
        finally:
            if transport is not None and not proto.lost.done():
                transport.abort()
            if proto.error is None:
                proto.error = io_error(f"NBD storage {self.url} is closed",
                                       OSError(errno.EBADF, "storage is closed"))

    async def aclose(self) -> None:
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)
