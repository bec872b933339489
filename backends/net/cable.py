"""Named cables: ``vdev net --cable NAME`` joins two devices so their guests talk directly.

A cable has two ends.  Where the other end lives decides how frames travel:

* **In the same process** (two `NetDevice` objects created with the same
  cable name): the ends meet in a process-wide registry and each queue
  pair's C worker copies frames from its guest's transmit ring straight into
  the other guest's receive buffers (``VD_NET_LINK_PEER``, a memcpy between
  the two guests' memories; no socket, no Python per frame).
* **In another daemon**: the ends meet at the abstract Unix socket
  ``@vdev-net-cable/NAME`` (abstract sockets need no file and vanish with
  their owner; they are per network namespace, so both daemons must share
  one).  The first end binds and listens there; the second, finding the
  address taken, connects.  On that control connection (SOCK_SEQPACKET) the
  connecting end says hello (version, queue pairs), and the listening end
  answers and passes, with SCM_RIGHTS, one end of a SOCK_SEQPACKET socket
  pair per queue pair it keeps the other end of.  Each queue pair's worker
  then writes ``[12-byte virtio_net_hdr_v1 | frame]`` as one datagram to its
  socket and reads the peer's the same way (``VD_NET_LINK_FD``, as with a
  TAP).  Pairs beyond the smaller queue count have no link.  A full socket
  holds frames back in the sender's transmit ring (the worker waits for
  POLLOUT), so a slow receiver slows its sender instead of losing frames.
  When the control connection ends (the other daemon stopped), the links go
  down and this end returns to the rendezvous: it listens again (or
  connects, if the address was taken meanwhile), so either daemon can be
  restarted.  A third end finds the listener busy and is told so; it keeps
  waiting for a free end.

Messages on the control connection are one JSON object per datagram:
``{"vdev-net-cable": 1, "queues": N}``; a refusal is
``{"vdev-net-cable": 1, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("backends.net.cable")

PROTOCOL_VERSION = 1
#: Socket buffer asked for on each link (root may exceed net.core.wmem_max).
LINK_SNDBUF = 4 << 20
RETRY_DELAY = 0.2
MAX_CONTROL = 4096


def cable_address(name: str) -> str:
    """The abstract Unix socket address of cable ``name``."""
    return "\0vdev-net-cable/" + name


def check_cable_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_.:" for c in name):
        raise ValueError(f"--cable: {name!r} is not a cable name (1..64 letters, digits, '-', '_', '.', ':')")
    return name


class CableEnd:
    """This device's end of a cable.

    ``on_peer(peer_end)`` is called when another end in this process joins
    (or None when it leaves); ``on_links(fds)`` when links to another daemon
    come up (one fd per queue pair, or None per pair without one) and with
    an empty list when they go down.  Both run on the event loop.
    """

    def __init__(self, name: str, queues: int, *, on_peer: Callable[[CableEnd | None], None],
                 on_links: Callable[[list[int | None]], None]) -> None:
        self.name = check_cable_name(name)
        self.queues = queues
        self.on_peer = on_peer
        self.on_links = on_links
        self.peer: CableEnd | None = None
        self.remote = False           # links to another daemon are up
        self.device: Any = None       # the NetDevice, for the in-process peer
        self._task: asyncio.Task[None] | None = None
        self._links: list[socket.socket] = []
        self._closed = False

    # -- in this process ------------------------------------------------------------------------

    def join_local(self) -> None:
        """Meet another end of this cable in this process, if there is one.

        Raises:
            ValueError: the cable already has two ends here.
        """
        ends = _REGISTRY.setdefault(self.name, [])
        if len(ends) >= 2:
            raise ValueError(f"--cable {self.name}: the cable already has two ends in this process")
        if ends and ends[0].remote:
            raise ValueError(f"--cable {self.name}: the other end is already joined to another daemon")
        ends.append(self)
        if len(ends) == 2:
            a, b = ends
            a._stop_rendezvous()
            a.peer, b.peer = b, a
            a.on_peer(b)
            b.on_peer(a)
            log.info("cable %s: both ends in this process, joined directly", self.name)

    # -- across daemons ----------------------------------------------------------------------------

    def start(self) -> None:
        """Look for the other end in another daemon (unless it is here already)."""
        if self.peer is None and self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._rendezvous())

    def _stop_rendezvous(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _rendezvous(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                listener.bind(cable_address(self.name))
            except OSError as exc:
                listener.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                await self._connect(loop)
                continue
            try:
                listener.listen(4)
                listener.setblocking(False)
                log.info("cable %s: waiting for the other end", self.name)
                await self._listen(loop, listener)
            finally:
                listener.close()

    async def _listen(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        busy: set[asyncio.Task[None]] = set()
        control: socket.socket | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            while True:
                conn, _ = await loop.sock_accept(listener)
                conn.setblocking(False)
                if control is not None and watcher is not None and not watcher.done():
                    t = loop.create_task(self._refuse(loop, conn, "the cable already has two ends"))
                    busy.add(t)
                    t.add_done_callback(busy.discard)
                    continue
                try:
                    hello = await asyncio.wait_for(self._recv_json(loop, conn), 5)
                    peer_queues = int(hello["queues"])
                    n = max(0, min(self.queues, peer_queues))
                    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(n)]
                    reply = json.dumps({"vdev-net-cable": PROTOCOL_VERSION, "queues": self.queues}).encode()
                    socket.send_fds(conn, [reply], [b.fileno() for _, b in pairs])
                except (TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("cable %s: a connecting end failed the hello: %s", self.name, exc)
                    conn.close()
                    continue
                for _, b in pairs:
                    b.close()
                control = conn
                self._up([a for a, _ in pairs], peer_queues)
                watcher = loop.create_task(self._watch(loop, conn))
                await asyncio.wait({watcher})
                control = None
                self._down()
        finally:
            if watcher is not None:
                watcher.cancel()
            if control is not None:
                control.close()
            for t in busy:
                t.cancel()
            self._down()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.setblocking(False)
        try:
            try:
                await loop.sock_connect(conn, cable_address(self.name))
            except OSError:
                await asyncio.sleep(RETRY_DELAY)    # the listener went away: try again
                return
            hello = json.dumps({"vdev-net-cable": PROTOCOL_VERSION, "queues": self.queues}).encode()
            await loop.sock_sendall(conn, hello)
            await _wait_readable(loop, conn)
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, MAX_CONTROL, 64)
            except OSError:
                await asyncio.sleep(RETRY_DELAY)
                return
            links = [socket.socket(fileno=fd) for fd in fds]
            try:
                reply = json.loads(data) if data else {}
            except ValueError:
                reply = {"error": f"unreadable reply {data[:80]!r}"}
            if "error" in reply or not data:
                for s in links:
                    s.close()
                log.warning("cable %s: the other end refused: %s", self.name,
                            reply.get("error", "connection closed"))
                await asyncio.sleep(1.0)
                return
            self._up(links, int(reply.get("queues", len(links))))
            try:
                await self._watch(loop, conn)
            finally:
                self._down()
        finally:
            conn.close()

    async def _refuse(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, why: str) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._recv_json(loop, conn), 5)
            await loop.sock_sendall(conn, json.dumps({"vdev-net-cable": PROTOCOL_VERSION,
                                                      "error": why}).encode())
        conn.close()

    @staticmethod
    async def _recv_json(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> dict[str, Any]:
        data = await loop.sock_recv(conn, MAX_CONTROL)
        if not data:
            raise ConnectionResetError("closed before the hello")
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("vdev-net-cable") != PROTOCOL_VERSION:
            raise ValueError(f"not a vdev net cable hello: {data[:80]!r}")
        return obj

    @staticmethod
    async def _watch(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Until the other end goes away (EOF or an error on the control connection)."""
        while True:
            try:
                data = await loop.sock_recv(conn, MAX_CONTROL)
            except OSError:
                return
            if not data:
                return

    def _up(self, links: list[socket.socket], peer_queues: int) -> None:
        for s in links:
            for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
                if opt is None:
                    continue
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, LINK_SNDBUF)
                    break
                except OSError:
                    continue
            s.setblocking(False)
        self._links = links
        self.remote = True
        fds: list[int | None] = [s.fileno() for s in links]
        fds += [None] * (self.queues - len(fds))
        log.info("cable %s: joined to another daemon (%d queue pair%s linked; it has %d)", self.name,
                 len(links), "" if len(links) == 1 else "s", peer_queues)
        self.on_links(fds)

    def _down(self) -> None:
        if not self.remote:
            return
        self.remote = False
        self.on_links([])
        for s in self._links:
            s.close()
        self._links = []
        log.info("cable %s: the other end went away", self.name)

    # -- the end ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the cable (the in-process peer is unlinked first by the devices)."""
        self._closed = True
        self._stop_rendezvous()
        self._down()
        ends = _REGISTRY.get(self.name, [])
        if self in ends:
            ends.remove(self)
        if not ends:
            _REGISTRY.pop(self.name, None)
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.on_peer(None)

    @property
    def connected(self) -> bool:
        return self.peer is not None or self.remote


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


#: Cable ends by name, in this process.
_REGISTRY: dict[str, list[CableEnd]] = {}
