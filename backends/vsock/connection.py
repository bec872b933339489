"""One vsock stream connection: state machine and credit accounting, no I/O.

A `Connection` joins a guest's AF_VSOCK stream to one host-side byte stream
(a Unix socket, or a sibling daemon's stream).  It never touches a socket, a
queue or a clock of its own: the muxer (`backends.vsock.muxer`) feeds it
events and does the I/O it asks for, and a faster engine could drive it the
same way.  What goes in and out:

* from the guest: `on_packet` with a decoded header and, for RW, the payload;
* from the host side: `on_host_data`, `on_host_eof`, `on_host_error`, and
  `on_host_written` after the muxer wrote some of `host_pending`;
* to the guest: `next_rx` gives the next packet (header and payload) while
  `has_rx` is true;
* to the host side: `host_pending` (bytes to write), `wants_shut_write`,
  `host_read_budget` (how much may be read now);
* `deadline`/`on_timeout` for the two timers (an unanswered REQUEST, a close
  that the peer never completes).

Who is who: *local* is the host end of the connection (CID 2, or a sibling
guest's CID), *peer* is the guest this device serves — the words Firecracker's
``csm`` uses.

Credit (virtio 1.2 §5.10.6.3), kept per connection with free-running u32
counters:

* towards the guest we may have at most
  ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes outstanding; we read
  from the host only that much (and at most `TO_GUEST_CAP` ahead), so a guest
  that does not read stops the host writer through its own socket buffer;
* from the guest we advertise `BUF_ALLOC` bytes; ``fwd_cnt`` counts what was
  written to the host.  A guest that sends beyond the credit it was given is
  reset.  We volunteer a CREDIT_UPDATE once the guest's view of our free
  space falls below `CREDIT_UPDATE_THRESHOLD` and we have freed some, and
  answer every CREDIT_REQUEST.

Pending packets towards the guest are a set of flags, not a queue
(Firecracker's ``PendingRxSet``): however many packets a guest sends, one
connection owes it at most one RST, one RESPONSE, one SHUTDOWN, one credit
packet and its buffered data.

Closing (virtio 1.2 §5.10.6.5): a SHUTDOWN with both flags from the guest
is answered with RST once what it sent has reached the host; when the host
side has hung up completely we send SHUTDOWN with both flags and wait for
the guest's RST; when it only shut its writing half we send SHUTDOWN(SEND)
and keep carrying the guest's data (half-close).  Each wait is bounded by a
timer, after which we send RST ourselves.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from .packet import Header, Op, Shutdown, SockType

#: Receive buffer we advertise to the guest per connection (``buf_alloc``).
BUF_ALLOC = 256 * 1024
#: Volunteer a CREDIT_UPDATE when the guest believes we have less free space than this.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 2
#: Host data read ahead of the guest per connection (bounded further by the guest's credit).
TO_GUEST_CAP = 64 * 1024
#: How long the guest has to answer our REQUEST (Firecracker waits 2 s too).
REQUEST_TIMEOUT = 2.0
#: How long a closing connection may take to flush or to get the peer's RST.
CLOSE_TIMEOUT = 4.0
#: How long a guest REQUEST may wait for a sibling daemon to accept.
PEER_INIT_TIMEOUT = 4.0

_U32 = 0xFFFF_FFFF


class ConnState(enum.Enum):
    """Where a connection is in its life."""

    #: The host side connected; REQUEST owed or sent to the guest, RESPONSE awaited.
    LOCAL_INIT = "local-init"
    #: The guest sent REQUEST; the host side (a sibling daemon) has not accepted yet.
    PEER_INIT = "peer-init"
    #: Data may flow; either direction may already be shut down (see the shutdown flags).
    ESTABLISHED = "established"
    #: No more data will move; flushing the last bytes to the host, or waiting for the
    #: guest's RST after our SHUTDOWN.  A timer ends it with RST.
    CLOSING = "closing"
    #: RST sent or received.  The muxer drops the connection once nothing is owed.
    CLOSED = "closed"


class Pending:
    """Control packets owed to the guest: bits of `Connection.pending`.

    Plain ints, not an ``enum.Flag``: these are tested on every packet, and
    Flag arithmetic costs a few microseconds each time.
    """

    NONE = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 4
    SHUTDOWN = 8
    CREDIT_UPDATE = 16
    CREDIT_REQUEST = 32
    #: Everything `next_rx` sends regardless of data and credit.
    CONTROL = REQUEST | RESPONSE | RST | CREDIT_UPDATE | CREDIT_REQUEST


#: Shutdown flags (`packet.Shutdown`) as plain ints, for the same reason.
RCV = int(Shutdown.RCV)
SEND = int(Shutdown.SEND)
BOTH = int(Shutdown.BOTH)


class Violation(str, enum.Enum):
    """Why a guest packet reset its connection (counted by the muxer)."""

    CREDIT_OVERFLOW = "credit_overflow"          # RW beyond the credit we gave
    DATA_AFTER_SHUTDOWN = "data_after_shutdown"  # RW after SHUTDOWN(SEND)
    UNEXPECTED_OP = "unexpected_op"              # an op that this state does not allow


def u32(n: int) -> int:
    return n & _U32


class Connection:
    """A guest stream ↔ host stream connection (see the module docstring)."""

    def __init__(self, *, local_cid: int, local_port: int, peer_cid: int, peer_port: int,
                 state: ConnState, clock: Callable[[], float], buf_alloc: int = BUF_ALLOC,
                 peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0) -> None:
        self.local_cid = local_cid
        self.local_port = local_port
        self.peer_cid = peer_cid
        self.peer_port = peer_port
        self.state = state
        self.clock = clock
        self.buf_alloc = buf_alloc
        # Our receive side (guest → host).
        self.rx_cnt = 0            # payload bytes received from the guest
        self.fwd_cnt = 0           # of those, written to the host
        self.last_fwd_cnt_sent = 0
        self.to_host = bytearray()
        self._raw_left = 0         # bytes at the front of to_host outside the credit count
        # The guest's receive side (host → guest).
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.tx_cnt = 0            # payload bytes sent to the guest
        self.to_guest = bytearray()
        self.credit_requested = False
        # Shutdown flags: what the guest told us, what the host side did.
        self.peer_shutdown = 0
        self.host_eof = False          # the host will send no more
        self.host_hangup = False       # ... and reads no more either (fully closed)
        self.host_write_shut = False   # we shut the host's write half (guest sent SHUTDOWN(SEND))
        self.shutdown_flags = 0            # the SHUTDOWN owed to the guest (RCV/SEND bits)
        self.pending = Pending.NONE
        self.deadline: float | None = None
        #: Bytes written to the host when a LOCAL_INIT connection is accepted (``OK <port>\n``).
        self.greeting = b""
        #: Set when the connection was reset because of the guest; read once by the muxer.
        self.violation: Violation | None = None
        self.bytes_to_guest = 0
        self.bytes_to_host = 0
        if state is ConnState.LOCAL_INIT:
            self.pending |= Pending.REQUEST
            # Until the REQUEST is sent (no rx buffers, no front-end): give up quietly then.
            self.deadline = clock() + REQUEST_TIMEOUT
        elif state is ConnState.PEER_INIT:
            self.deadline = clock() + PEER_INIT_TIMEOUT

    def __repr__(self) -> str:
        return (f"<Connection {self.local_cid}:{self.local_port} <-> {self.peer_cid}:{self.peer_port} "
                f"{self.state.value}>")

    @property
    def key(self) -> tuple[int, int, int]:
        """(local cid, local port, peer port): how guest packets find this connection."""
        return (self.local_cid, self.local_port, self.peer_port)

    # -- credit ------------------------------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes we may still send the guest (0 if its counters make no sense)."""
        in_flight = u32(self.tx_cnt - self.peer_fwd_cnt)
        return max(0, self.peer_buf_alloc - in_flight)

    def _guest_view_of_free(self) -> int:
        """Free space the guest believes we have, from the fwd_cnt we last sent it."""
        return self.buf_alloc - u32(self.rx_cnt - self.last_fwd_cnt_sent)

    def _maybe_volunteer_credit(self) -> None:
        if (self.fwd_cnt != self.last_fwd_cnt_sent
                and self._guest_view_of_free() < CREDIT_UPDATE_THRESHOLD
                and self.state in (ConnState.ESTABLISHED, ConnState.CLOSING)
                and not self.peer_shutdown & SEND):
            self.pending |= Pending.CREDIT_UPDATE

    # -- from the guest ----------------------------------------------------------------------

    def on_packet(self, hdr: Header, payload: Iterable[bytes | memoryview] = ()) -> None:
        """Absorb one packet the guest sent on this connection.

        ``payload`` is the RW data (``hdr.len`` bytes in chunks); it is copied.
        A packet that breaks the protocol resets the connection and sets
        `violation`.
        """
        if self.state is ConnState.CLOSED:
            return
        if hdr.op == Op.RST:
            self._closed()
            return
        if hdr.buf_alloc != self.peer_buf_alloc or hdr.fwd_cnt != self.peer_fwd_cnt:
            self.credit_requested = False
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        state = self.state
        op = hdr.op
        if state is ConnState.LOCAL_INIT:
            if op == Op.RESPONSE:
                self.state = ConnState.ESTABLISHED
                self.deadline = None
                if self.greeting:
                    self.send_raw(self.greeting)
            else:
                self._violate(Violation.UNEXPECTED_OP)
            return
        if state is ConnState.PEER_INIT:
            # Only credit information makes sense before the host side accepts; it
            # was taken above, and the RESPONSE will carry ours.
            if op not in (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST):
                self._violate(Violation.UNEXPECTED_OP)
            return
        if op == Op.RW:
            self._on_rw(hdr, payload)
        elif op == Op.CREDIT_UPDATE:
            pass       # the credit fields were taken above
        elif op == Op.CREDIT_REQUEST:
            self.pending |= Pending.CREDIT_UPDATE
        elif op == Op.SHUTDOWN:
            self._on_shutdown(hdr.flags & BOTH)
        else:          # REQUEST or RESPONSE on a live connection
            self._violate(Violation.UNEXPECTED_OP)

    def _on_rw(self, hdr: Header, payload: Iterable[bytes | memoryview]) -> None:
        if hdr.len == 0:
            return
        if self.peer_shutdown & SEND:
            self._violate(Violation.DATA_AFTER_SHUTDOWN)
            return
        # virtio 1.2 §5.10.6.3: RW only "when the peer has sufficient free buffer space".
        if u32(self.rx_cnt - self.fwd_cnt) + hdr.len > self.buf_alloc:
            self._violate(Violation.CREDIT_OVERFLOW)
            return
        self.rx_cnt = u32(self.rx_cnt + hdr.len)
        if self.host_hangup or self.state is ConnState.CLOSING:
            # Nobody will read it: count it as forwarded so the credit stays consistent.
            self.fwd_cnt = u32(self.fwd_cnt + hdr.len)
            return
        for chunk in payload:
            self.to_host += chunk

    def _on_shutdown(self, flags: int) -> None:
        # virtio 1.2 §5.10.6.5: the hints are permanent; later packets only add to them.
        self.peer_shutdown |= flags
        if self.peer_shutdown & RCV:
            self.to_guest.clear()
            self.pending &= ~Pending.CREDIT_REQUEST
        self._check_close()

    # -- from the host side --------------------------------------------------------------------

    def reading_allowed(self) -> bool:
        return (self.state is ConnState.ESTABLISHED and not self.host_eof
                and not self.peer_shutdown & RCV)

    def host_read_budget(self) -> int:
        """How many bytes may be read from the host now (0: stop reading)."""
        if not self.reading_allowed():
            return 0
        room = min(self.peer_credit(), TO_GUEST_CAP) - len(self.to_guest)
        return max(0, room)

    def credit_limited(self) -> bool:
        """Reading is allowed but the guest's credit is used up."""
        return self.reading_allowed() and self.peer_credit() <= len(self.to_guest)

    def on_host_blocked_by_credit(self) -> None:
        """The host has data but the guest gave no credit: ask it (once) for an update."""
        if not self.credit_requested and self.credit_limited():
            self.pending |= Pending.CREDIT_REQUEST
            self.credit_requested = True

    def on_host_data(self, data: bytes) -> None:
        """Bytes read from the host (at most `host_read_budget`)."""
        if self.reading_allowed():
            self.to_guest += data

    def on_host_eof(self, *, hangup: bool) -> None:
        """The host side will send no more; ``hangup``: it closed both directions."""
        if self.state is ConnState.CLOSED:
            return
        self.host_eof = True
        if hangup:
            self.host_hangup = True
            self.to_host.clear()
            self._raw_left = 0
        if self.state in (ConnState.LOCAL_INIT, ConnState.PEER_INIT):
            # The host gave up before the guest answered (or the sibling refused).
            self.reset()
            return
        if not self.shutdown_flags & SEND:
            # Data already read goes first; the SHUTDOWN follows it (see next_rx).
            # A hang-up is Firecracker's LocalClosed: nothing can move any more, so we
            # ask the guest to close both ways and wait for its RST.
            self.shutdown_flags |= BOTH if hangup else SEND
            self.pending |= Pending.SHUTDOWN
        self._check_close()

    def on_host_error(self) -> None:
        """Reading or writing the host stream failed: reset the connection."""
        self.to_host.clear()
        self._raw_left = 0
        self.host_hangup = self.host_eof = True
        self.reset()

    def host_pending(self) -> bytearray:
        """Bytes waiting to be written to the host (the muxer writes a prefix of them)."""
        return self.to_host

    def send_raw(self, data: bytes) -> None:
        """Queue bytes for the host outside the credit count (a handshake line)."""
        self.to_host[self._raw_left:self._raw_left] = data
        self._raw_left += len(data)

    def on_host_written(self, n: int) -> None:
        """``n`` bytes from the front of `host_pending` reached the host."""
        if n <= 0:
            return
        del self.to_host[:n]
        raw = min(n, self._raw_left)
        self._raw_left -= raw
        counted = n - raw
        if counted:
            self.fwd_cnt = u32(self.fwd_cnt + counted)
            self.bytes_to_host += counted
            self._maybe_volunteer_credit()
        if not self.to_host:
            self._check_close()
        elif self.state is ConnState.CLOSING:
            self.deadline = self.clock() + CLOSE_TIMEOUT    # still moving: keep waiting

    def wants_shut_write(self) -> bool:
        """The guest will send no more and everything reached the host: shut its write half."""
        return (bool(self.peer_shutdown & SEND) and not self.to_host
                and not self.host_write_shut and not self.host_hangup
                and self.state in (ConnState.ESTABLISHED, ConnState.CLOSING))

    def on_shut_write(self) -> None:
        self.host_write_shut = True

    # -- towards the guest -------------------------------------------------------------------------

    def accept(self) -> None:
        """The host side accepted a guest-initiated connection: RESPONSE, then data."""
        if self.state is ConnState.PEER_INIT:
            self.state = ConnState.ESTABLISHED
            self.deadline = None
            self.pending |= Pending.RESPONSE

    def reset(self) -> None:
        """Abort: owe the guest an RST and drop everything buffered."""
        if self.state is ConnState.CLOSED:
            return
        self.to_guest.clear()
        self.pending = Pending.RST
        self.state = ConnState.CLOSED
        self.deadline = None

    def _violate(self, why: Violation) -> None:
        self.violation = why
        self.reset()

    def _closed(self) -> None:
        """The guest sent RST: nothing more is owed to anyone."""
        self.state = ConnState.CLOSED
        self.pending = Pending.NONE
        self.to_guest.clear()
        self.deadline = None

    def _check_close(self) -> None:
        """Move towards the end once neither direction can carry data any more.

        virtio 1.2 §5.10.6.5: "Clean disconnect is achieved by one or more
        VIRTIO_VSOCK_OP_SHUTDOWN packets that indicate no more data will be sent
        and received, followed by a VIRTIO_VSOCK_OP_RST response from the peer."
        So: when the guest shut down both ways we answer with RST (once what it
        sent reached the host); otherwise we send SHUTDOWN with both flags and
        the guest answers with RST (Linux does so at once, or when its
        application closes).  A timer bounds the wait either way.
        """
        if self.state not in (ConnState.ESTABLISHED, ConnState.CLOSING):
            return
        to_host_done = bool(self.peer_shutdown & SEND) or self.host_hangup
        to_guest_done = self.host_eof or bool(self.peer_shutdown & RCV)
        if not (to_host_done and to_guest_done):
            return
        self.state = ConnState.CLOSING
        if self.to_host:
            # The guest's last bytes first; a host that stops reading them ends it.
            if self.deadline is None:
                self.deadline = self.clock() + CLOSE_TIMEOUT
            return
        if self.peer_shutdown == BOTH:
            self.reset()
            return
        if self.shutdown_flags != BOTH:
            self.shutdown_flags = BOTH
            self.pending |= Pending.SHUTDOWN
        if self.pending & Pending.SHUTDOWN:
            self.deadline = None     # armed when the SHUTDOWN goes out, after the data

    def on_timeout(self) -> None:
        """The deadline passed: an unanswered REQUEST or a close that never completed."""
        if self.deadline is None or self.clock() < self.deadline:
            return
        if self.pending & Pending.REQUEST:
            self._closed()      # the guest never even saw our REQUEST: nothing to reset
        else:
            self.reset()

    def has_rx(self) -> bool:
        """Whether `next_rx` has a packet (for a buffer with room for one payload byte)."""
        p = self.pending
        if p & Pending.CONTROL:
            return True
        if self.to_guest:
            return self.state is not ConnState.CLOSED and self.peer_credit() > 0
        return bool(p & Pending.SHUTDOWN)

    def _header(self, op: Op, *, length: int = 0, flags: int = 0) -> Header:
        self.last_fwd_cnt_sent = self.fwd_cnt
        self.pending &= ~Pending.CREDIT_UPDATE    # every packet carries the credit
        return Header(self.local_cid, self.peer_cid, self.local_port, self.peer_port, length,
                      SockType.STREAM, op, flags, self.buf_alloc, self.fwd_cnt)

    def next_rx(self, max_payload: int) -> tuple[Header, bytes] | None:
        """The next packet for the guest, with at most ``max_payload`` bytes of data."""
        p = self.pending
        if p & Pending.RST:
            self.pending = Pending.NONE
            return self._header(Op.RST), b""
        if p & Pending.REQUEST:
            self.pending &= ~Pending.REQUEST
            self.deadline = self.clock() + REQUEST_TIMEOUT
            return self._header(Op.REQUEST), b""
        if p & Pending.RESPONSE:
            self.pending &= ~Pending.RESPONSE
            return self._header(Op.RESPONSE), b""
        if self.to_guest and self.state is not ConnState.CLOSED:
            n = min(len(self.to_guest), self.peer_credit(), max_payload)
            if n > 0:
                data = bytes(self.to_guest[:n])
                del self.to_guest[:n]
                self.tx_cnt = u32(self.tx_cnt + n)
                self.bytes_to_guest += n
                return self._header(Op.RW, length=n), data
        if p & Pending.SHUTDOWN and not self.to_guest:
            self.pending &= ~Pending.SHUTDOWN
            hdr = self._header(Op.SHUTDOWN, flags=self.shutdown_flags)
            if self.shutdown_flags == BOTH and self.state is ConnState.CLOSING:
                # Everything was delivered; now the guest owes the RST.  Linux sends it
                # when its application closes; do not wait for ever.
                self.deadline = self.clock() + CLOSE_TIMEOUT
            return hdr, b""
        if p & Pending.CREDIT_REQUEST:
            self.pending &= ~Pending.CREDIT_REQUEST
            return self._header(Op.CREDIT_REQUEST), b""
        if p & Pending.CREDIT_UPDATE:
            return self._header(Op.CREDIT_UPDATE), b""
        return None

    @property
    def finished(self) -> bool:
        """CLOSED and nothing more owed: the muxer may forget it and close the host socket."""
        return self.state is ConnState.CLOSED and not self.pending


__all__ = [
    "BUF_ALLOC",
    "CLOSE_TIMEOUT",
    "CREDIT_UPDATE_THRESHOLD",
    "PEER_INIT_TIMEOUT",
    "REQUEST_TIMEOUT",
    "TO_GUEST_CAP",
    "ConnState",
    "Connection",
    "Pending",
    "Violation",
]
