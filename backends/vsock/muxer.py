"""The Unix-socket muxer: every vsock connection of one guest, and their host sockets.

`Muxer` is what the device talks to, in packets (Firecracker's
``VsockChannel``): `send_pkt` takes a packet the guest transmitted,
`has_pending_rx` / `recv_pkt` give packets for the guest's rx buffers.  It
never sees a descriptor chain or a ring, so the Python queue loop in
`backends.vsock.device` and a native engine can drive it alike; when a packet
for the guest becomes ready it calls ``wake()`` (the device then schedules
its rx queue).

Host side, the hybrid-vsock convention of Firecracker, Cloud Hypervisor and
vhost-device-vsock:

* host → guest: a program connects to ``uds_path`` and writes
  ``CONNECT <port>\\n``; the muxer sends the guest a REQUEST from CID 2 and a
  port it allocates (from 2^30 up); on the guest's RESPONSE it writes
  ``OK <that port>\\n`` (Firecracker's form) and the socket carries the
  stream; on the guest's RST the socket is closed.
* guest → host: a REQUEST to CID 2 port P connects to ``<uds_path>_P``; no
  such socket (or nobody listening) → RST.
* guest → sibling guest: with a ``group``, a REQUEST to another guest's CID
  goes through that guest's daemon (see `backends.vsock.group`).

The sockets are watched with the event loop's ``add_reader`` /
``add_writer`` (no thread, no stream objects).  A connection is read only
while its guest has credit and the read-ahead (`connection.TO_GUEST_CAP`)
has room, and at most `READ_CHUNK` at a time, so one busy host socket
cannot starve the others; packets for the guest are served round-robin, one
per connection per turn.  Replies that belong to no connection (RST for an
unknown port) wait in a bounded control queue, served first.

Every guest mistake is counted by cause in `errors` (shown by ``vdev ctl
SOCK info``) and never stops the muxer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import select
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import group as groups
from .connection import Connection, ConnState
from .packet import CID_HOST, MAX_GUEST_CID, MAX_PORT, MIN_GUEST_CID, Header, Op, SockType, rst_for

log = logging.getLogger("backends.vsock")

#: Most bytes read from one host socket per readiness callback.
READ_CHUNK = 64 * 1024
#: Longest handshake line (``CONNECT 4294967295\n`` is 19 bytes).
LINE_MAX = 128
#: How long a host program has to send its ``CONNECT`` line.
LINE_TIMEOUT = 10.0
#: Replies to no connection (RST for unknown ports) waiting for rx buffers.
CONTROL_QUEUE_MAX = 1024
#: Host-side ports of host-initiated connections start here (as in Firecracker).
LOCAL_PORT_FIRST = 1 << 30
#: How many ended connections, for how long, a late packet is not counted as a mistake.
RECENTLY_CLOSED_MAX = 4096
RECENTLY_CLOSED_TTL = 30.0
#: Connections accepted per listener callback, so a connect storm does not hog the loop.
ACCEPT_BATCH = 64
#: After accept() failed (out of fds), how long the listener is left alone.
ACCEPT_RETRY = 0.1

#: Causes counted in `Muxer.errors` (always present in ``info``, zero or not).
ERROR_CAUSES = (
    "short_header",          # tx chain shorter than the 44-byte header: dropped
    "bad_length",            # hdr.len beyond the buffer or above 64 KiB: RST
    "unknown_op",            # hdr.op not one of the seven: RST
    "unknown_type",          # hdr.type not STREAM: RST (virtio 1.2 §5.10.6.4)
    "unknown_connection",    # a packet for no connection: RST
    "wrong_src_cid",         # src_cid is not the guest's CID: dropped
    "wrong_dst_cid",         # dst_cid is neither the host nor a group member: RST
    "credit_overflow",       # RW beyond the credit we gave: connection reset
    "data_after_shutdown",   # RW after SHUTDOWN(SEND): connection reset
    "unexpected_op",         # an op the connection's state does not allow: reset
    "bad_rx_buffer",         # rx chain too small for a header and a byte: returned empty
    "control_dropped",       # control queue full: an RST was not sent
    "connect_failed",        # guest REQUEST: nothing listens at <uds>_P or at the sibling
    "bad_connect_line",      # host program sent no valid CONNECT line
    "bad_sibling_line",      # sibling daemon sent no valid handshake line
    "host_io_error",         # reading or writing a host socket failed: connection reset
    "accept_failed",         # accept() on a listener failed (out of file descriptors)
)


def raise_nofile_limit(wanted: int = 4096) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit.

    Each connection holds one host socket, so 1024 connections need more than
    the usual soft limit of 1024.  Logs a warning when the result is still
    below ``wanted``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < wanted:
        log.warning("open-file limit is %d (hard limit %s): at most about %d vsock connections; "
                    "raise it with ulimit -n", soft, hard, max(0, soft - 64))
    return soft


@dataclass(eq=False)
class _Link:
    """A connection and its host socket, with what the loop watches for it."""

    conn: Connection
    sock: socket.socket
    kind: str                       # "host" (Unix socket), "guest" (<uds>_P), "sibling"
    fd: int = -1
    reading: bool = False
    writing: bool = False
    in_rx: bool = False
    closed: bool = False
    awaiting_ok: bool = False       # sibling: waiting for the other daemon's "OK\n"
    line: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None


@dataclass(eq=False)
class _Greeter:
    """An accepted socket that has not sent its handshake line yet."""

    sock: socket.socket
    kind: str                       # "host" or "sibling"
    fd: int = -1
    line: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


def read_line(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read up to and including a newline, never past it; None until it is complete.

    Peeks first so bytes after the line stay in the socket (they belong to
    the stream).  Raises EOFError on end of stream and ValueError when the
    line grows beyond `LINE_MAX`.
    """
    data = sock.recv(LINE_MAX - len(buf), socket.MSG_PEEK)
    if not data:
        raise EOFError
    end = data.find(b"\n")
    take = len(data) if end < 0 else end + 1
    buf += sock.recv(take)
    if end >= 0:
        line = bytes(buf)
        buf.clear()
        return line
    if len(buf) >= LINE_MAX:
        raise ValueError(f"line longer than {LINE_MAX} bytes: {bytes(buf[:40])!r}...")
    return None


def parse_connect(line: bytes) -> int:
    """``CONNECT <port>`` (any case, any spacing, as vhost-device-vsock accepts) → port."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0].upper() != "CONNECT" or not parts[1].isdigit():
        raise ValueError(f"expected 'CONNECT <port>', got {line[:40]!r}")
    port = int(parts[1])
    if port > MAX_PORT:
        raise ValueError(f"port {port} is not a 32-bit number")
    return port


def parse_sibling(line: bytes) -> tuple[int, int, int]:
    """``SIBLING <src cid> <src port> <dst port>`` → the three numbers."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 4 or parts[0] != "SIBLING" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"expected 'SIBLING <cid> <port> <port>', got {line[:60]!r}")
    cid, src, dst = (int(p) for p in parts[1:])
    if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID or src > MAX_PORT or dst > MAX_PORT:
        raise ValueError(f"sibling address out of range: {line[:60]!r}")
    return cid, src, dst


def _hung_up(fd: int) -> bool:
    """After EOF: did the peer close both directions (POLLHUP) or only its writing half?"""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


class Muxer:
    """All vsock connections of one guest (see the module docstring).

    ``wake`` is called when a packet for the guest becomes ready.  Create it
    inside a running event loop; `close` releases every socket.
    """

    def __init__(self, guest_cid: int, uds_path: str, *, group: str | None = None,
                 runtime_dir: Path | None = None, wake: Callable[[], None] = lambda: None) -> None:
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.group = group
        self.runtime_dir = runtime_dir
        self.wake = wake
        self.loop = asyncio.get_running_loop()
        self.links: dict[tuple[int, int, int], _Link] = {}
        self.greeters: dict[int, _Greeter] = {}
        self._rx: collections.deque[_Link] = collections.deque()
        self._control: collections.deque[Header] = collections.deque()
        self._local_ports: set[int] = set()
        self._recently_closed: collections.OrderedDict[tuple[int, int, int], float] = collections.OrderedDict()
        self._next_port = LOCAL_PORT_FIRST
        self.errors: collections.Counter[str] = collections.Counter({c: 0 for c in ERROR_CAUSES})
        self.stats: collections.Counter[str] = collections.Counter()
        self._listeners: list[tuple[socket.socket, str, str]] = []
        self.group_path: str | None = None
        try:
            uds = groups.listen_unix(uds_path, what="--uds-path")
            self._listen(uds, "host", uds_path)
            if group is not None:
                sock, self.group_path = groups.join_group(group, guest_cid, runtime_dir)
                self._listen(sock, "sibling", self.group_path)
        except BaseException:
            self.close()
            raise

    # -- listening and handshakes ------------------------------------------------------------

    def _listen(self, sock: socket.socket, kind: str, path: str) -> None:
        self._listeners.append((sock, kind, path))
        self.loop.add_reader(sock.fileno(), self._accept, sock, kind)
        log.info("vsock: listening on %s (%s)", path, "host programs" if kind == "host"
                 else f"group {self.group!r}")

    def _accept(self, listener: socket.socket, kind: str) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE and the like: say so, keep serving
                # The connection stays in the backlog and the listener stays readable:
                # look away for a moment instead of spinning on it.
                log.warning("vsock: cannot accept a %s connection: %s", kind, exc)
                self.errors["accept_failed"] += 1
                fd = listener.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(ACCEPT_RETRY, self._rewatch, listener, kind)
                return
            sock.setblocking(False)
            g = _Greeter(sock, kind, sock.fileno())
            self.greeters[g.fd] = g
            self.loop.add_reader(g.fd, self._on_greeter, g)
            g.timer = self.loop.call_later(LINE_TIMEOUT, self._drop_greeter, g, "no handshake line")

    def _rewatch(self, listener: socket.socket, kind: str) -> None:
        if any(sock is listener for sock, _k, _p in self._listeners):
            self.loop.add_reader(listener.fileno(), self._accept, listener, kind)

    def _drop_greeter(self, g: _Greeter, why: str | None = None) -> None:
        if self.greeters.pop(g.fd, None) is None:
            return
        if why:
            log.info("vsock: %s socket closed: %s", g.kind, why)
        self.loop.remove_reader(g.fd)
        if g.timer is not None:
            g.timer.cancel()
        g.sock.close()

    def _release_greeter(self, g: _Greeter) -> socket.socket:
        """Stop watching a greeter whose line arrived; the caller owns its socket now."""
        del self.greeters[g.fd]
        self.loop.remove_reader(g.fd)
        if g.timer is not None:
            g.timer.cancel()
        return g.sock

    def _on_greeter(self, g: _Greeter) -> None:
        cause = "bad_connect_line" if g.kind == "host" else "bad_sibling_line"
        try:
            line = read_line(g.sock, g.line)
        except (BlockingIOError, InterruptedError):
            return
        except EOFError:
            self._drop_greeter(g, "closed before its handshake line")
            return
        except (OSError, ValueError) as exc:
            self.errors[cause] += 1
            self._drop_greeter(g, str(exc))
            return
        if line is None:
            return
        try:
            if g.kind == "host":
                port = parse_connect(line)
            else:
                src_cid, src_port, dst_port = parse_sibling(line)
        except ValueError as exc:
            self.errors[cause] += 1
            self._drop_greeter(g, str(exc))
            return
        sock = self._release_greeter(g)
        if g.kind == "host":
            self._host_connect(sock, port)
        else:
            self._sibling_connect(sock, src_cid, src_port, dst_port)

    def _alloc_port(self) -> int:
        for _ in range(MAX_PORT - LOCAL_PORT_FIRST):
            port = self._next_port
            self._next_port = port + 1 if port < MAX_PORT - 1 else LOCAL_PORT_FIRST
            if port not in self._local_ports:
                self._local_ports.add(port)
                return port
        raise OSError(errno.EADDRINUSE, "no free local vsock port")   # pragma: no cover

    def _host_connect(self, sock: socket.socket, port: int) -> None:
        """A host program asked for guest port ``port``: REQUEST from CID 2."""
        local_port = self._alloc_port()
        conn = Connection(local_cid=CID_HOST, local_port=local_port, peer_cid=self.guest_cid,
                          peer_port=port, state=ConnState.LOCAL_INIT, clock=self.loop.time)
        conn.greeting = b"OK %d\n" % local_port
        self.stats["host_connects"] += 1
        self._add(conn, sock, "host")

    def _sibling_connect(self, sock: socket.socket, src_cid: int, src_port: int, dst_port: int) -> None:
        """A sibling's guest asks for our guest's port ``dst_port``."""
        key = (src_cid, src_port, dst_port)
        if src_cid == self.guest_cid or key in self.links:
            self.errors["bad_sibling_line"] += 1
            log.info("vsock: sibling request %s refused (own CID or in use)", key)
            sock.close()
            return
        conn = Connection(local_cid=src_cid, local_port=src_port, peer_cid=self.guest_cid,
                          peer_port=dst_port, state=ConnState.LOCAL_INIT, clock=self.loop.time)
        conn.greeting = b"OK\n"
        self.stats["sibling_connects_in"] += 1
        self._add(conn, sock, "sibling")

    def _add(self, conn: Connection, sock: socket.socket, kind: str) -> _Link:
        link = _Link(conn, sock, kind, sock.fileno())
        self.links[conn.key] = link
        self._after(link)
        return link

    # -- packets from the guest ------------------------------------------------------------------

    def _dst_ok(self, cid: int) -> bool:
        if cid == CID_HOST:
            return True
        return (self.group is not None and MIN_GUEST_CID <= cid <= MAX_GUEST_CID
                and cid != self.guest_cid)

    def send_pkt(self, hdr: Header, payload: Iterable[bytes | memoryview] = ()) -> None:
        """Take one packet the guest transmitted (``payload``: the RW bytes, copied)."""
        self.stats["tx_packets"] += 1
        if hdr.src_cid != self.guest_cid:
            # Not from our guest's address: answering it would address someone else.
            self.errors["wrong_src_cid"] += 1
            log.debug("vsock: dropped (wrong src_cid): %s", hdr)
            return
        if hdr.type != SockType.STREAM:
            # virtio 1.2 §5.10.6.4: "A VIRTIO_VSOCK_OP_RST reply MUST be sent if a packet
            # is received with an unknown type value."
            self.bad_packet(hdr, "unknown_type")
            return
        if not Op.REQUEST <= hdr.op <= Op.CREDIT_REQUEST:
            self.bad_packet(hdr, "unknown_op")
            return
        key = (hdr.dst_cid, hdr.dst_port, hdr.src_port)
        link = self.links.get(key)
        if link is None:
            if not self._dst_ok(hdr.dst_cid):
                self.errors["wrong_dst_cid"] += 1
                if hdr.op != Op.RST:
                    self._queue_rst(hdr)
            elif hdr.op == Op.REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != Op.RST:
                # virtio 1.2 §5.10.6.5: no socket at the destination → RST.  A packet for a
                # connection that just ended is not a mistake: Linux sends a SHUTDOWN
                # after its RST when an application shuts down a reset socket.
                if key in self._recently_closed:
                    self.stats["late_packets"] += 1
                else:
                    self.errors["unknown_connection"] += 1
                    log.debug("vsock: no connection for %s", hdr)
                self._queue_rst(hdr)
            return
        conn = link.conn
        if hdr.op == Op.REQUEST:
            # A second REQUEST on a live address: the guest lost track; start over.
            self.errors["unexpected_op"] += 1
            conn.reset()
        else:
            conn.on_packet(hdr, payload)
        self._after(link)

    def bad_packet(self, hdr: Header, cause: str) -> None:
        """Count a malformed packet and answer it with RST (resetting its connection)."""
        self.errors[cause] += 1
        log.debug("vsock: bad packet (%s): %s", cause, hdr)
        if hdr.src_cid != self.guest_cid:
            return
        link = self.links.get((hdr.dst_cid, hdr.dst_port, hdr.src_port))
        if link is not None:
            link.conn.reset()
            self._after(link)
        elif hdr.op != Op.RST:
            self._queue_rst(hdr)

    def _queue_rst(self, hdr: Header) -> None:
        if len(self._control) >= CONTROL_QUEUE_MAX:
            self.errors["control_dropped"] += 1
            return
        self._control.append(rst_for(hdr))
        self.wake()

    def _guest_connect(self, hdr: Header) -> None:
        """The guest's REQUEST to the host (``<uds>_P``) or to a sibling."""
        try:
            if hdr.dst_cid == CID_HOST:
                sock = groups.connect_unix(f"{self.uds_path}_{hdr.dst_port}")
                kind = "guest"
            else:
                assert self.group is not None
                sock = groups.connect_member(self.group, hdr.dst_cid, self.runtime_dir)
                kind = "sibling"
        except OSError as exc:
            self.errors["connect_failed"] += 1
            log.info("vsock: guest port %d -> %d:%d refused: %s", hdr.src_port, hdr.dst_cid,
                     hdr.dst_port, exc.strerror or exc)
            self._queue_rst(hdr)
            return
        conn = Connection(local_cid=hdr.dst_cid, local_port=hdr.dst_port, peer_cid=self.guest_cid,
                          peer_port=hdr.src_port, state=ConnState.PEER_INIT, clock=self.loop.time,
                          peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt)
        if kind == "guest":
            self.stats["guest_connects"] += 1
            conn.accept()          # a Unix connect completes at once
            link = _Link(conn, sock, kind, sock.fileno())
        else:
            self.stats["sibling_connects_out"] += 1
            conn.send_raw(b"SIBLING %d %d %d\n" % (self.guest_cid, hdr.src_port, hdr.dst_port))
            link = _Link(conn, sock, kind, sock.fileno(), awaiting_ok=True)
        self.links[conn.key] = link
        self._after(link)

    # -- packets for the guest ----------------------------------------------------------------------

    def has_pending_rx(self) -> bool:
        """Whether `recv_pkt` will return a packet (for a buffer with room for one data byte)."""
        if self._control:
            return True
        while self._rx:
            link = self._rx[0]
            if not link.closed and link.conn.has_rx():
                return True
            self._rx.popleft()
            link.in_rx = False
        return False

    def recv_pkt(self, max_payload: int) -> tuple[Header, bytes] | None:
        """The next packet for the guest: control replies first, then round-robin."""
        if self._control:
            self.stats["rx_packets"] += 1
            return self._control.popleft(), b""
        while self._rx:
            link = self._rx.popleft()
            link.in_rx = False
            if link.closed:
                continue
            pkt = link.conn.next_rx(max_payload)
            self._after(link)       # back in line if it has more; reads more host data
            if pkt is not None:
                self.stats["rx_packets"] += 1
                return pkt
        return None

    # -- host sockets -----------------------------------------------------------------------------------

    def _after(self, link: _Link) -> None:
        """Bring the loop's view of ``link`` in line with its connection after any event."""
        if link.closed:
            return
        conn = link.conn
        if conn.violation is not None:
            self.errors[conn.violation.value] += 1
            log.info("vsock: %r reset: %s", conn, conn.violation.value)
            conn.violation = None
        if conn.host_pending():
            self._flush(link)
        if conn.wants_shut_write():
            with contextlib.suppress(OSError):
                link.sock.shutdown(socket.SHUT_WR)
            conn.on_shut_write()
        if conn.has_rx() and not link.in_rx:
            self._rx.append(link)
            link.in_rx = True
            self.wake()
        if conn.finished:
            self._remove(link)
            return
        want_read = link.awaiting_ok or conn.host_read_budget() > 0 or (
            conn.credit_limited() and not conn.credit_requested)
        want_write = bool(conn.host_pending())
        if want_read != link.reading:
            if want_read:
                self.loop.add_reader(link.fd, self._on_readable, link)
            else:
                self.loop.remove_reader(link.fd)
            link.reading = want_read
        if want_write != link.writing:
            if want_write:
                self.loop.add_writer(link.fd, self._on_writable, link)
            else:
                self.loop.remove_writer(link.fd)
            link.writing = want_write
        if conn.deadline != link.timer_at:
            if link.timer is not None:
                link.timer.cancel()
                link.timer = None
            link.timer_at = conn.deadline
            if conn.deadline is not None:
                link.timer = self.loop.call_at(conn.deadline, self._on_timer, link)

    def _flush(self, link: _Link) -> None:
        conn = link.conn
        try:
            n = link.sock.send(conn.host_pending())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._host_failed(link, exc)
            return
        conn.on_host_written(n)

    def _host_failed(self, link: _Link, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("vsock: %r: host socket failed: %s", link.conn, exc)
        self.errors["host_io_error"] += 1
        link.conn.on_host_error()

    def _on_writable(self, link: _Link) -> None:
        self._after(link)

    def _on_readable(self, link: _Link) -> None:
        if link.closed:
            return
        conn = link.conn
        if link.awaiting_ok:
            self._read_ok(link)
        else:
            budget = conn.host_read_budget()
            if budget <= 0:
                conn.on_host_blocked_by_credit()
            else:
                try:
                    data = link.sock.recv(min(budget, READ_CHUNK))
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._host_failed(link, exc)
                else:
                    if data:
                        conn.on_host_data(data)
                    else:
                        conn.on_host_eof(hangup=_hung_up(link.fd))
        self._after(link)

    def _read_ok(self, link: _Link) -> None:
        try:
            line = read_line(link.sock, link.line)
        except (BlockingIOError, InterruptedError):
            return
        except EOFError:
            link.conn.on_host_eof(hangup=True)      # the sibling's guest refused
            return
        except (OSError, ValueError) as exc:
            self.errors["bad_sibling_line"] += 1
            log.info("vsock: sibling handshake failed: %s", exc)
            link.conn.on_host_error()
            return
        if line is None:
            return
        if line.strip() != b"OK":
            self.errors["bad_sibling_line"] += 1
            link.conn.on_host_error()
            return
        link.awaiting_ok = False
        link.conn.accept()

    def _on_timer(self, link: _Link) -> None:
        link.timer = None
        link.timer_at = None
        link.conn.on_timeout()
        self._after(link)

    def _remove(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        conn = link.conn
        if self.links.get(conn.key) is link:
            del self.links[conn.key]
        self._remember_closed(conn.key)
        if link.kind == "host":
            self._local_ports.discard(conn.local_port)
        if link.reading:
            self.loop.remove_reader(link.fd)
        if link.writing:
            self.loop.remove_writer(link.fd)
        if link.timer is not None:
            link.timer.cancel()
        link.sock.close()

    def _remember_closed(self, key: tuple[int, int, int]) -> None:
        """Keep a bounded, short memory of ended connections (see `send_pkt`)."""
        now = self.loop.time()
        closed = self._recently_closed
        closed[key] = now
        closed.move_to_end(key)
        while closed and (len(closed) > RECENTLY_CLOSED_MAX
                          or next(iter(closed.values())) < now - RECENTLY_CLOSED_TTL):
            closed.popitem(last=False)

    # -- life cycle ---------------------------------------------------------------------------------------

    def reset(self) -> int:
        """Forget every connection (transport reset): close their host sockets; return how many."""
        links = list(self.links.values())
        for link in links:
            self._remove(link)
        self._rx.clear()
        self._control.clear()
        self._local_ports.clear()
        if links:
            log.info("vsock: transport reset: %d connection(s) closed", len(links))
        return len(links)

    def close(self) -> None:
        """Release every socket (connections, half-open handshakes, listeners)."""
        self.reset()
        for g in list(self.greeters.values()):
            self._drop_greeter(g)
        for sock, _kind, path in self._listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._listeners = []

    def info(self) -> dict[str, Any]:
        states = collections.Counter(link.conn.state.value for link in self.links.values())
        return {
            "connections": len(self.links),
            "states": dict(states),
            "handshakes_pending": len(self.greeters),
            "control_queue": len(self._control),
            "stats": dict(self.stats),
            "errors": dict(self.errors),
        }


__all__ = ["ERROR_CAUSES", "Muxer", "parse_connect", "parse_sibling", "raise_nofile_limit", "read_line"]
