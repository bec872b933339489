"""The asyncio adapter: the one module of the protocol package that does I/O.

It reads the Unix socket with ``recvmsg`` (asyncio streams drop ancillary
data, so SCM_RIGHTS needs the raw socket and ``loop.add_reader``), feeds the
sans-IO `BackendSession`, hands each message to the `BackendHandler` and
writes the reply.  Messages are handled strictly one after another, as the
protocol requires.

Before requests that must see a quiet device — GET_VRING_BASE (the reply
promises that nothing more will be written to that ring), RESET_DEVICE and
memory-table changes — it awaits ``hooks.drain()`` so in-flight requests
complete first.  That is the only async step; the handler itself is
synchronous.

`VhostUserServer` listens on a path (the default, as qemu-storage-daemon
does) or connects to one (``client=True``, for a VMM started with
``server=on``).  One front-end at a time: when it goes, the device is reset
and the next one may connect.

Hostile or broken peers must not lock the VMM out:

* a connection that has not completed its first request within
  `FIRST_REQUEST_TIMEOUT` seconds of connecting is dropped (a VMM speaks at
  once; something that connects and says nothing is not one);
* a connection that connects and closes at once (a health check) is noticed
  and skipped, so it never takes a newcomer's place;
* a newcomer is held, not refused, while the current connection is being
  torn down (requests still draining) or has not yet proven itself;
* running out of file descriptors (EMFILE/ENFILE) on accept is temporary:
  it is logged once, accepting backs off for `ACCEPT_BACKOFF` seconds and
  retries, and the attached front-end is served throughout.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable

from .errors import ProtocolError, Unsupported
from .handler import BackendHandler, BackendHooks, Reply
from .messages import MAX_FDS, U64, BackendReq, FrontendReq, HeaderFlag
from .session import NEED_DATA, BackendSession, Framer, InvalidMessage, Message, close_fds

log = logging.getLogger("vhost_user.server")

_RECV_SIZE = 65536
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: Requests before which in-flight device work must finish.
_DRAIN_BEFORE = {FrontendReq.GET_VRING_BASE, FrontendReq.RESET_DEVICE, FrontendReq.SET_MEM_TABLE,
                 FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG, FrontendReq.RESET_OWNER,
                 # what turns dirty logging on or off, or swaps the log, under running rings
                 FrontendReq.SET_FEATURES, FrontendReq.SET_LOG_BASE, FrontendReq.SET_VRING_ADDR}
#: Requests whose drain concerns only the ring the payload names.
_DRAIN_ONE = {FrontendReq.GET_VRING_BASE, FrontendReq.SET_VRING_ADDR}
#: How long to wait for the front-end's ack on the back-end channel.
BACKEND_ACK_TIMEOUT = 5.0
#: How long a reply may wait for a front-end that does not read.
SEND_TIMEOUT = 30.0
#: How long a newcomer waits for the current front-end's connection to end.
RECONNECT_GRACE = 2.0
#: A connection must complete its first request within this many seconds of connecting.
FIRST_REQUEST_TIMEOUT = 5.0
#: Longest a newcomer is held while the old connection is torn down (its
#: requests drain; storage bounds that, e.g. NBD's ?timeout=).
TEARDOWN_HOLD = 60.0
#: Pause before accepting again after EMFILE/ENFILE.
ACCEPT_BACKOFF = 0.1
#: accept() errors that mean "out of a resource, try again later".
_ACCEPT_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: accept() errors about that one connection only (it died in the backlog).
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}


async def accept(listener: socket.socket, what: str, meanwhile: str = "") -> socket.socket:
    """Accept one connection; running out of file descriptors is waited out.

    EMFILE/ENFILE (and ENOBUFS/ENOMEM) leave the connection in the backlog
    and the listener readable, so retrying at once would spin: log once per
    episode, back off `ACCEPT_BACKOFF` seconds, retry.  Errors about the one
    connection (ECONNABORTED ...) are skipped.  ``what`` and ``meanwhile``
    word the log line.
    """
    loop = asyncio.get_running_loop()
    exhausted = False
    while True:
        try:
            sock, _ = await loop.sock_accept(listener)
        except OSError as exc:
            if exc.errno in _ACCEPT_EXHAUSTED:
                if not exhausted:
                    log.warning("cannot accept %s: %s; retrying every %g s%s", what, exc, ACCEPT_BACKOFF,
                                f" ({meanwhile})" if meanwhile else "")
                    exhausted = True
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if exc.errno in _ACCEPT_TRANSIENT:
                continue
            raise
        if exhausted:
            log.info("accepting %s again", what)
        return sock


class _SilentPeer(ProtocolError):
    """A connection that did not complete its first request in time."""


def describe_peer(sock: socket.socket) -> str:
    """``pid 123 uid 0`` from SO_PEERCRED, for log lines about a connection."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except OSError:
        return "an unknown peer"
    return f"pid {pid} uid {uid}"


def peer_has_closed(sock: socket.socket) -> bool:
    """True if the peer of a not-yet-served connection has already hung up."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


def recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: data and the fds that came with it (O_CLOEXEC)."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(_RECV_SIZE, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise ProtocolError("more fds attached than any request carries; message dropped",
                            value=len(fds), fatal=True)
    return data, fds


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable, with ``write=True``)."""
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


async def send_message(sock: socket.socket, data: bytes, fds: tuple[int, ...] | list[int] = (),
                       *, timeout: float = SEND_TIMEOUT) -> None:
    """Send a whole message on a non-blocking socket without blocking the loop.

    The fds ride on the first byte.  A peer that does not read fills the
    socket buffer; then we wait for it to drain, up to ``timeout``, and raise
    a fatal ProtocolError if it never does.
    """
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(data)
    deadline = loop.time() + timeout
    while view:
        try:
            n = sock.sendmsg([view], anc)
        except BlockingIOError:
            left = deadline - loop.time()
            if left <= 0:
                raise ProtocolError("peer does not read its messages", fatal=True,
                                    value=f"{len(view)} bytes unsent") from None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await wait_fd(loop, sock.fileno(), write=True)
            continue
        anc = []          # the fds went with the first byte
        view = view[n:]


class Connection:
    """One front-end connection: read, dispatch, reply, until EOF or a fatal error."""

    def __init__(self, sock: socket.socket, handler: BackendHandler, *,
                 first_request_timeout: float | None = FIRST_REQUEST_TIMEOUT) -> None:
        self.sock = sock
        self.first_request_timeout = first_request_timeout
        self.handler = handler
        self.session = BackendSession()
        self._backend_lock = asyncio.Lock()
        sock.setblocking(False)
        self.peer = describe_peer(sock)
        self.connected_at = asyncio.get_running_loop().time()
        self._connected_wall = time.strftime("%H:%M:%S")
        #: The first request has been handled: this is a front-end, not a probe.
        self.proven = False
        #: The front-end is gone and the connection is being torn down.
        self.closing = False

    async def _wait_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.proven or self.first_request_timeout is None:
            await wait_fd(loop, self.sock.fileno())
            return
        left = self.connected_at + self.first_request_timeout - loop.time()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await wait_fd(loop, self.sock.fileno())
        except TimeoutError:
            log.warning("dropping the connection from %s (connected at %s): no complete request "
                        "within %g s of connecting", self.peer, self._connected_wall,
                        self.first_request_timeout)
            raise _SilentPeer("no request within the first-request timeout", fatal=True,
                              value=self.first_request_timeout) from None

    async def run(self) -> None:
        """Serve until the front-end disconnects; always resets the device at the end."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                event = self.session.next_event()
                if event is NEED_DATA:
                    await self._wait_readable(loop)
                    try:
                        data, fds = recv_with_fds(self.sock)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        data, fds = b"", []
                    if not data:
                        close_fds(fds)
                        partial = self.session.partial()
                        if partial is not None:
                            log.warning("front-end closed the connection in the middle of a "
                                        "message: %s", partial)
                        log.info("front-end disconnected")
                        return
                    self.session.receive_data(data, fds)
                    continue
                assert isinstance(event, (Message, InvalidMessage))
                await self._dispatch(event)
                self.proven = True
        except _SilentPeer:
            pass                          # logged where it was noticed
        except ProtocolError as exc:
            log.error("dropping the connection: %s", exc)
        except (BrokenPipeError, ConnectionResetError) as exc:
            log.info("front-end went away before reading a reply (%s)", exc)
        finally:
            self.closing = True
            # Even if cancelled while draining (SIGTERM just after a disconnect),
            # the device is reset and every fd released.
            try:
                await self._drain(None)
            finally:
                self.session.close()
                self.handler.close()
                self.sock.close()

    async def _drain(self, index: int | None) -> None:
        await self.handler.hooks.drain(index)

    async def _dispatch(self, msg: Message | InvalidMessage) -> None:
        if isinstance(msg, Message):
            log.debug("<- %s %s fds=%s", msg.request.name, msg.payload, msg.fds)
            if msg.request in _DRAIN_BEFORE:
                index = getattr(msg.payload, "index", None)
                await self._drain(index if msg.request in _DRAIN_ONE else None)
                try:
                    reply = self.handler.handle(msg)
                finally:
                    # Whatever the request did, the rings it quieted run again
                    # (a stopped one stays stopped).
                    self.handler.hooks.resume()
                await self._reply(reply)
                return
        await self._reply(self.handler.handle(msg))

    async def _reply(self, reply: Reply | None) -> None:
        if reply is not None:
            log.debug("-> reply %d bytes", len(reply.data))
            # A front-end that pipelines without reading makes this wait (up
            # to SEND_TIMEOUT) instead of failing or blocking the loop.
            try:
                await send_message(self.sock, reply.data, reply.fds)
            finally:
                close_fds(reply.fds)     # dups made for the reply; the front-end has its own now

    async def backend_request(self, request: BackendReq, payload: bytes = b"") -> int | None:
        """Send a back-end request (e.g. CONFIG_CHANGE_MSG); return the ack value if one was asked.

        Raises:
            Unsupported: no back-end channel was set up.
            ProtocolError: the channel failed or the ack did not come in time.
        """
        async with self._backend_lock:
            fd = self.handler.backend_fd
            data, need_reply = self.handler.backend_request(request, payload)
            assert fd is not None
            chan = socket.socket(fileno=os.dup(fd))
            chan.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_sendall(chan, data)
                if not need_reply:
                    return None
                framer = Framer()
                async with asyncio.timeout(BACKEND_ACK_TIMEOUT):
                    while True:
                        raw = framer.next_raw()
                        if raw is not NEED_DATA:
                            break
                        chunk = await loop.sock_recv(chan, 4096)
                        if not chunk:
                            raise ProtocolError("back-end channel closed before the ack",
                                                request=request.name)
                        framer.receive_data(chunk)
                assert not isinstance(raw, type(NEED_DATA))
                if raw.request != request or not raw.flags & HeaderFlag.REPLY or len(raw.data) != 8:
                    raise ProtocolError("unexpected reply on the back-end channel",
                                        request=request.name, value=(raw.request, raw.flags))
                return U64.unpack(raw.data).value
            except (OSError, TimeoutError) as exc:
                raise ProtocolError(f"back-end channel failed: {exc!r}", request=request.name) from exc
            finally:
                chan.close()


class VhostUserServer:
    """Serve one `BackendHooks` device on a Unix socket, one front-end at a time.

    ``path``: the socket path; ``client``: connect to ``path`` instead of
    listening on it; ``listen_fd``: an inherited listening socket (the spec's
    ``--fd`` convention).
    """

    def __init__(self, hooks: BackendHooks, path: str | None = None, *, client: bool = False,
                 listen_fd: int | None = None,
                 on_connection: Callable[[Connection | None], Awaitable[None] | None] | None = None,
                 reconnect_delay: float = 0.2) -> None:
        if (path is None) == (listen_fd is None):
            raise ValueError("give exactly one of path and listen_fd")
        if client and path is None:
            raise ValueError("client mode needs a socket path")
        self.hooks = hooks
        self.path = path
        self.client = client
        self.listen_fd = listen_fd
        self.reconnect_delay = reconnect_delay
        self.connection: Connection | None = None
        self._listener: socket.socket | None = None
        self._on_connection = on_connection
        self.ready = asyncio.Event()
        self.connections_served = 0

    def _listen(self) -> socket.socket:
        if self.listen_fd is not None:
            sock = socket.socket(fileno=self.listen_fd)
        else:
            assert self.path is not None
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)   # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(self.path)
            sock.listen(4)
        sock.setblocking(False)
        return sock

    async def _accept(self) -> socket.socket:
        assert self._listener is not None
        return await accept(self._listener, f"a front-end on {self.path or f'fd {self.listen_fd}'}",
                            "the connected front-end is still served")

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        warned = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    raise
                if not warned:
                    log.info("waiting for a front-end to listen on %s", self.path)
                    warned = True
                await asyncio.sleep(self.reconnect_delay)

    async def _serve_one(self, sock: socket.socket) -> None:
        handler = BackendHandler(self.hooks)
        # In client mode we dialled the VMM ourselves: nobody else can take
        # the device, so a slow first request is no lock-out.
        self.connection = Connection(sock, handler,
                                     first_request_timeout=None if self.client else FIRST_REQUEST_TIMEOUT)
        await self._notify(self.connection)
        try:
            await self.connection.run()
        finally:
            self.connection = None
            self.connections_served += 1
            await self._notify(None)

    async def _notify(self, conn: Connection | None) -> None:
        if self._on_connection is not None:
            result = self._on_connection(conn)
            if result is not None:
                await result

    async def serve_forever(self) -> None:
        """Accept (or connect to) front-ends until cancelled."""
        if self.client:
            self.ready.set()
            while True:
                sock = await self._connect()
                log.info("connected to front-end at %s", self.path)
                await self._serve_one(sock)
                await asyncio.sleep(self.reconnect_delay)
        self._listener = self._listen()
        log.info("listening on %s", self.path or f"fd {self.listen_fd}")
        self.ready.set()
        pending: socket.socket | None = None
        try:
            while True:
                if pending is None:
                    sock = await self._accept()
                else:
                    sock, pending = pending, None
                if peer_has_closed(sock):
                    # A health check that connected and left: nothing to serve,
                    # and no reason to reset the device.
                    log.debug("a connection closed before it was served; skipped")
                    sock.close()
                    continue
                log.info("front-end connected (%s)", describe_peer(sock))
                serving = asyncio.ensure_future(self._serve_one(sock))
                try:
                    pending = await self._hold_others_until(serving)
                except BaseException:
                    serving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await serving
                    raise
                await serving
        finally:
            if pending is not None:
                pending.close()
            self.close()

    async def _hold_others_until(self, serving: asyncio.Future[None]) -> socket.socket | None:
        """Accept while a front-end is served; return one that may follow it.

        Two VMMs must never drive one device.  But a VMM that reconnects
        arrives while the old connection is still being torn down (in-flight
        requests drain, the device resets), so a newcomer is held for
        `RECONNECT_GRACE` seconds and served as soon as the old connection
        ends; if the old one is still there by then, the newcomer is refused.
        Any further newcomer is refused at once.
        """
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        pending: socket.socket | None = None
        arrived = 0.0
        while not serving.done():
            accept = asyncio.ensure_future(self._accept())
            deadline = 0.0 if pending is None else self._hold_deadline(arrived)
            timeout = None if pending is None else max(0.0, deadline - loop.time())
            try:
                done, _ = await asyncio.wait({serving, accept}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not accept.done():
                    accept.cancel()
                    # asyncio.wait, not `suppress(CancelledError): await accept`:
                    # the latter also swallowed a cancel aimed at *us* (SIGTERM
                    # just after a disconnect), and the server kept accepting.
                    await asyncio.wait({accept})
            if accept.done() and not accept.cancelled():
                extra = accept.result()
                if pending is not None and peer_has_closed(pending):
                    pending.close()           # a health check: it leaves the slot free
                    pending = None
                if pending is None:
                    pending, arrived = extra, loop.time()
                else:
                    log.warning("refusing a second front-end (%s) while one is connected",
                                describe_peer(extra))
                    extra.close()
            elif pending is not None and loop.time() >= self._hold_deadline(arrived) \
                    and not serving.done():
                log.warning("refusing a second front-end (%s) while one is connected",
                            describe_peer(pending))
                pending.close()
                pending = None
        return pending

    def _hold_deadline(self, arrived: float) -> float:
        """Until when a newcomer that arrived at ``arrived`` is held.

        `RECONNECT_GRACE` after its arrival if the current front-end is
        alive and proven; while that one has not yet completed a request,
        until it must have (it is dropped then); while it is being torn
        down, up to `TEARDOWN_HOLD` (the drain is bounded by the storage).
        """
        deadline = arrived + RECONNECT_GRACE
        conn = self.connection
        if conn is not None:
            if conn.closing:
                deadline = max(deadline, arrived + TEARDOWN_HOLD)
            elif not conn.proven:
                deadline = max(deadline, conn.connected_at + FIRST_REQUEST_TIMEOUT + 1.0)
        return deadline

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.path and not self.client:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    async def backend_request(self, request: BackendReq, payload: bytes = b"") -> int | None:
        """Send a back-end request on the current connection's channel."""
        if self.connection is None:
            raise Unsupported(request.name, "no front-end connected")
        return await self.connection.backend_request(request, payload)
