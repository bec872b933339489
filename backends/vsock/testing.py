"""A guest's side of virtio-vsock, for tests and the in-process benchmark.

`VsockGuest` drives a `VsockDevice` through a `vdev.testing.VirtioFrontend`
(a real vhost-user socket, memfd guest memory, split rings) the way the
Linux driver does: it keeps the rx queue full of 4 KiB buffers, sends each
packet as a header buffer plus a payload buffer on tx, keeps event buffers
when asked, and runs a small stream-socket layer on top (`GuestStream`):
connect, listen/accept, send within the device's credit, receive with
credit updates, shutdown, RST.  It mirrors what the Linux guest does where
that matters (credit updates when free space drops below 64 KiB, RST after
the peer shut down both directions and the data was read) and records
anything odd the device does (`violations`) instead of hiding it.

It is a test peer, not a vsock implementation to rely on: no timers, no
SEQPACKET, and packets it cannot place are kept in `orphans`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from vdev.testing import Buffer, DriverQueue, VirtioFrontend, device_pair
from vhost_user.frontend import Frontend
from vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, VringAddr

from .device import VsockDevice
from .packet import (
    CID_HOST,
    EVENT,
    EVENT_QUEUE,
    HEADER_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    Header,
    Op,
    Shutdown,
    SockType,
)

__all__ = ["GUEST_BUF_ALLOC", "RX_BUF", "GuestStream", "VsockFrontend", "VsockGuest", "vsock_pair"]

#: Linux's rx buffer size (VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE) and default per-socket buffer.
RX_BUF = 4096
GUEST_BUF_ALLOC = 256 * 1024
#: Linux sends a credit update once its free space falls below this (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
CREDIT_UPDATE_BELOW = 64 * 1024
MAX_PKT = 64 * 1024
EPHEMERAL_FIRST = 49152
_U32 = 0xFFFF_FFFF


class VsockFrontend(VirtioFrontend):
    """A `VirtioFrontend` with one event set by any interrupt (``activity``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.activity = asyncio.Event()
        super().__init__(*args, **kwargs)

    def _on_call(self, index: int, fd: int) -> None:
        super()._on_call(index, fd)
        self.activity.set()

    async def reinitialize(self) -> None:
        """Set the rings up again from nothing, as a driver does after a guest reboot.

        Stops every ring (GET_VRING_BASE), lays out fresh zeroed rings at the
        same addresses and starts them at index 0, on the same connection.
        """
        await self.stop()
        for i, q in enumerate(self.queues):
            for _descs, bufs, table in q.chains.values():
                for addr, n, _w in bufs:
                    q.alloc.release(addr, n)
                if table is not None:
                    q.alloc.release(table, 16 * len(bufs))
            fresh = DriverQueue(self.mem, q.size, q.desc, data_start=0, data_size=0, event_idx=q.event_idx)
            fresh.alloc = q.alloc
            self.queues[i] = fresh
            await self.fe.set_vring_num(i, q.size)
            await self.fe.set_vring_base(i, 0)
            await self.fe.set_vring_addr(VringAddr(i, 0, self.mem.guest_to_frontend(fresh.desc),
                                                   self.mem.guest_to_frontend(fresh.used),
                                                   self.mem.guest_to_frontend(fresh.avail)))
            await self.fe.set_vring_kick(i, self.kicks[i])
            await self.fe.set_vring_call(i, self.calls[i])
            if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                await self.fe.set_vring_enable(i, True)

    async def reconnect(self, path: str, *, timeout: float = 10.0) -> None:
        """Drop the vhost-user connection and come back as the same guest.

        What a VMM that supports back-end reconnection does (vhost-user-blk in
        QEMU, for one): a new connection and handshake, the same guest memory,
        every ring resumed where the device left it (at its used index).
        ``path`` may belong to a restarted daemon; we retry until it listens.
        """
        loop = asyncio.get_running_loop()
        for fd in self.calls:
            loop.remove_reader(fd)
        await self.fe.close()
        for fd in self.kicks + self.calls:
            os.close(fd)
        self.kicks, self.calls = [], []
        fe = await Frontend.connect(path, timeout=timeout)
        offered, proto = await fe.handshake(want_protocol=self.protocol)
        if proto & ProtocolFeature.BACKEND_REQ:
            await fe.set_backend_req_fd()
        await fe.set_features(offered & self.features)
        await fe.set_mem_table(self.mem.vhost_regions, self.mem.fds)
        self.fe = fe
        for i, q in enumerate(self.queues):
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kicks.append(kick)
            self.calls.append(call)
            await fe.set_vring_num(i, q.size)
            await fe.set_vring_base(i, q.used_idx)
            await fe.set_vring_addr(VringAddr(i, 0, self.mem.guest_to_frontend(q.desc),
                                              self.mem.guest_to_frontend(q.used),
                                              self.mem.guest_to_frontend(q.avail)))
            await fe.set_vring_kick(i, kick)
            await fe.set_vring_call(i, call)
            if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                await fe.set_vring_enable(i, True)
            loop.add_reader(call, self._on_call, i, call)
        self.activity.set()


class GuestStream:
    """One guest AF_VSOCK stream socket (see the module docstring).

    ``auto_credit=False`` stops the volunteered credit updates, so a test
    can hold the device at zero credit and release it with `grant_credit`.
    """

    def __init__(self, guest: VsockGuest, local_port: int, peer_cid: int, peer_port: int, *,
                 buf_alloc: int = GUEST_BUF_ALLOC, auto_credit: bool = True) -> None:
        self.guest = guest
        self.local_port = local_port
        self.peer_cid = peer_cid
        self.peer_port = peer_port
        self.buf_alloc = buf_alloc
        self.auto_credit = auto_credit
        self.state = "connecting"
        self.inbox = bytearray()
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shutdown = Shutdown(0)
        self.shut = 0
        #: The device sent RST (on an open connection Linux reads that as end of stream).
        self.got_rst = False
        #: The connection was reset by a TRANSPORT_RESET: reading fails with ECONNRESET.
        self.was_reset = False
        self.changed = asyncio.Event()

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.local_port, self.peer_cid, self.peer_port)

    def __repr__(self) -> str:
        return f"<GuestStream {self.guest.cid}:{self.local_port} <-> {self.peer_cid}:{self.peer_port} {self.state}>"

    # -- packets ------------------------------------------------------------------------------

    def header(self, op: Op, *, length: int = 0, flags: int = 0) -> Header:
        self.last_fwd_sent = self.fwd_cnt
        return Header(self.guest.cid, self.peer_cid, self.local_port, self.peer_port, length,
                      SockType.STREAM, op, flags, self.buf_alloc, self.fwd_cnt)

    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))

    def _notify(self) -> None:
        self.changed.set()

    def on_packet(self, hdr: Header, payload: bytes) -> None:
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        op = hdr.op
        if op == Op.RST:
            self.got_rst = True
            self.peer_shutdown = Shutdown.BOTH
            self._closed()
        elif op == Op.RESPONSE:
            if self.state == "connecting":
                self.state = "established"
            else:
                self.guest.violations.append(f"RESPONSE on {self!r}")
        elif op == Op.RW:
            if self.shut & Shutdown.RCV:
                self.guest.violations.append(f"RW after our SHUTDOWN(RCV) on {self!r}")
            if len(payload) != hdr.len:
                self.guest.violations.append(f"RW len {hdr.len} but {len(payload)} bytes on {self!r}")
            if len(self.inbox) + len(payload) > self.buf_alloc:
                self.guest.violations.append(
                    f"device overran our credit on {self!r}: {len(self.inbox)}+{len(payload)} > {self.buf_alloc}")
            self.inbox += payload
            self.rx_cnt = (self.rx_cnt + len(payload)) & _U32
        elif op == Op.SHUTDOWN:
            self.peer_shutdown |= Shutdown(hdr.flags & Shutdown.BOTH)
            self._maybe_rst_after_shutdown()
        elif op == Op.CREDIT_REQUEST:
            self.guest.transmit(self.header(Op.CREDIT_UPDATE))
        elif op == Op.CREDIT_UPDATE:
            pass
        else:
            self.guest.violations.append(f"unexpected {hdr}")
        self._notify()

    def _closed(self) -> None:
        self.state = "closed"
        self.guest.streams.pop(self.key, None)
        self._notify()

    def _maybe_rst_after_shutdown(self) -> None:
        # Linux virtio_transport_recv_connected: once the peer shut both ways and every
        # byte was read, answer with RST and close.
        if self.peer_shutdown == Shutdown.BOTH and not self.inbox and self.state != "closed":
            self.guest.transmit(self.header(Op.RST))
            self._closed()

    # -- the socket API ---------------------------------------------------------------------------

    async def _wait(self, cond: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                await self.changed.wait()

    async def send(self, data: bytes, *, timeout: float = 30.0) -> None:
        """Send all of ``data`` in packets of at most 64 KiB, within the device's credit."""
        view = memoryview(data)
        while view:
            await self._wait(lambda: self.peer_credit() > 0 or self.state == "closed", timeout)
            if self.state == "closed":
                raise ConnectionResetError(f"{self!r} was reset")
            n = min(len(view), self.peer_credit(), MAX_PKT)
            self.tx_cnt = (self.tx_cnt + n) & _U32
            self.guest.transmit(self.header(Op.RW, length=n), bytes(view[:n]))
            view = view[n:]
            await self.guest.tx_room()

    def consume(self, n: int) -> bytes:
        """Take ``n`` bytes out of the inbox, as an application read does."""
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        self.fwd_cnt = (self.fwd_cnt + len(data)) & _U32
        free = self.buf_alloc - ((self.rx_cnt - self.last_fwd_sent) & _U32)
        if self.auto_credit and free < CREDIT_UPDATE_BELOW and self.state == "established":
            self.grant_credit()
        self._maybe_rst_after_shutdown()
        return data

    def grant_credit(self) -> None:
        """Tell the device how much we have read (CREDIT_UPDATE)."""
        self.guest.transmit(self.header(Op.CREDIT_UPDATE))

    def at_eof(self) -> bool:
        return not self.inbox and (bool(self.peer_shutdown & Shutdown.SEND) or self.state == "closed")

    async def recv(self, n: int = MAX_PKT, *, timeout: float = 30.0) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream.  Raises ConnectionResetError after an RST."""
        await self._wait(lambda: bool(self.inbox) or self.at_eof(), timeout)
        if not self.inbox and self.was_reset:
            raise ConnectionResetError(f"{self!r} was reset")
        return self.consume(n)

    async def recv_exactly(self, n: int, *, timeout: float = 30.0) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = await self.recv(n - len(out), timeout=timeout)
            if not chunk:
                raise EOFError(f"{self!r}: end of stream after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    async def recv_all(self, *, timeout: float = 30.0) -> bytes:
        """Everything until end of stream."""
        out = bytearray()
        while chunk := await self.recv(timeout=timeout):
            out += chunk
        return bytes(out)

    def shutdown(self, flags: int) -> None:
        """Send SHUTDOWN with ``flags`` (`Shutdown` bits) added to those sent before."""
        self.shut |= flags
        self.guest.transmit(self.header(Op.SHUTDOWN, flags=int(self.shut)))

    async def close(self, *, timeout: float = 10.0) -> None:
        """SHUTDOWN both ways and wait for the device's RST, as Linux close() does."""
        if self.state == "closed":
            return
        self.state = "closing"
        self.shutdown(Shutdown.BOTH)
        await self._wait(lambda: self.state == "closed", timeout)

    def rst(self) -> None:
        """Abort the connection (RST)."""
        if self.state != "closed":
            self.guest.transmit(self.header(Op.RST))
            self._closed()


class VsockGuest:
    """The driver side of one vsock device (see the module docstring)."""

    def __init__(self, vm: VsockFrontend, cid: int, *, rx_buffers: int | None = None) -> None:
        self.vm = vm
        self.cid = cid
        self.rx_buffers = rx_buffers if rx_buffers is not None else vm.queues[RX_QUEUE].size
        self.streams: dict[tuple[int, int, int], GuestStream] = {}
        self.listeners: dict[int, asyncio.Queue[GuestStream]] = {}
        self.listen_options: dict[int, dict[str, Any]] = {}
        self.orphans: list[Header] = []
        self.violations: list[str] = []
        self.events: list[int] = []
        self.received: collections.Counter[str] = collections.Counter()
        #: Every header received, in order, when ``record`` is set.
        self.record = False
        self.log: list[Header] = []
        self._out: collections.deque[tuple[Header, bytes]] = collections.deque()
        self._next_port = EPHEMERAL_FIRST
        self._pump_task: asyncio.Task[None] | None = None
        self._tx_drained = asyncio.Event()
        self.rx_paused = False

    # -- running ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.fill_rx(self.rx_buffers)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.wait({self._pump_task})
            self._pump_task = None

    def fill_rx(self, n: int) -> None:
        q = self.vm.queues[RX_QUEUE]
        posted = 0
        for _ in range(n):
            try:
                q.add_chain([Buffer.writable(HEADER_SIZE + RX_BUF)])
            except MemoryError:
                break
            posted += 1
        if posted:
            self.vm.kick(RX_QUEUE)

    async def reinitialize(self) -> None:
        """A guest reboot as the device sees it: every socket gone, rings set up afresh."""
        await self.stop()
        for stream in list(self.streams.values()):
            stream.was_reset = True
            stream._closed()
        self._out.clear()
        await self.vm.reinitialize()
        self.start()

    def post_event_buffers(self, n: int = 1) -> None:
        for _ in range(n):
            self.vm.post(EVENT_QUEUE, [Buffer.writable(EVENT.size)], kick=False)
        self.vm.kick(EVENT_QUEUE)

    async def _pump(self) -> None:
        while True:
            self.vm.activity.clear()
            if not self.poll():
                await self.vm.activity.wait()

    def poll(self) -> bool:
        """Handle every completion; True if anything happened."""
        did = False
        rx = self.vm.queues[RX_QUEUE].reap()
        for used in rx:
            did = True
            self._on_rx(used.written[:used.length])
        if rx and not self.rx_paused:
            self.fill_rx(len(rx))
        if self.vm.queues[TX_QUEUE].reap():
            did = True
        for used in self.vm.queues[EVENT_QUEUE].reap():
            did = True
            (event_id,) = EVENT.unpack(used.written[:EVENT.size])
            self.events.append(event_id)
            self._on_event(event_id)
        if self._out:
            did = self._flush_tx() or did
        if not self._out:
            self._tx_drained.set()
        return did

    def _on_event(self, event_id: int) -> None:
        # virtio 1.2 §5.10.6.7: "Existing connections MUST be shut down".
        for stream in list(self.streams.values()):
            stream.was_reset = True
            stream._closed()

    # -- tx --------------------------------------------------------------------------------------------

    def transmit(self, hdr: Header, payload: bytes = b"") -> None:
        """Queue a packet for the tx ring (posted as header + payload buffers)."""
        self._out.append((hdr, payload))
        self._tx_drained.clear()
        self._flush_tx()

    def _flush_tx(self) -> bool:
        q = self.vm.queues[TX_QUEUE]
        posted = 0
        while self._out:
            hdr, payload = self._out[0]
            buffers = [Buffer.readable(hdr.pack())]
            if payload:
                buffers.append(Buffer.readable(payload))
            try:
                q.add_chain(buffers)
            except MemoryError:
                break
            self._out.popleft()
            posted += 1
        if posted:
            self.vm.kick(TX_QUEUE)
        return posted > 0

    async def tx_room(self, limit: int = 256) -> None:
        """Wait while more than ``limit`` packets wait for tx descriptors."""
        while len(self._out) > limit:
            self._tx_drained.clear()
            await self._tx_drained.wait()

    async def drain_tx(self, timeout: float = 10.0) -> None:
        """Wait until every queued packet was taken by the device."""
        async with asyncio.timeout(timeout):
            while self._out or self.vm.queues[TX_QUEUE].chains:
                await asyncio.sleep(0.001)

    # -- rx ---------------------------------------------------------------------------------------------

    def _on_rx(self, packet: bytes) -> None:
        if len(packet) < HEADER_SIZE:
            self.violations.append(f"rx packet of {len(packet)} bytes")
            return
        hdr = Header.unpack(packet)
        payload = packet[HEADER_SIZE:]
        self.received[hdr.op_name] += 1
        if self.record:
            self.log.append(hdr)
        if hdr.dst_cid != self.cid:
            self.violations.append(f"packet for CID {hdr.dst_cid}, we are {self.cid}: {hdr}")
            return
        stream = self.streams.get((hdr.dst_port, hdr.src_cid, hdr.src_port))
        if stream is not None:
            stream.on_packet(hdr, payload)
            return
        if hdr.op == Op.REQUEST and hdr.dst_port in self.listeners:
            options = self.listen_options.get(hdr.dst_port, {})
            stream = GuestStream(self, hdr.dst_port, hdr.src_cid, hdr.src_port, **options)
            stream.peer_buf_alloc, stream.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            stream.state = "established"
            self.streams[stream.key] = stream
            self.transmit(stream.header(Op.RESPONSE))
            self.listeners[hdr.dst_port].put_nowait(stream)
            return
        self.orphans.append(hdr)
        if hdr.op != Op.RST:
            # What Linux does for a packet to no socket (virtio_transport_reset_no_sock).
            self.transmit(hdr.reply(Op.RST))

    # -- sockets ------------------------------------------------------------------------------------------

    def listen(self, port: int, **options: Any) -> asyncio.Queue[GuestStream]:
        """Accept connections on ``port``; accepted streams arrive on the returned queue."""
        q: asyncio.Queue[GuestStream] = asyncio.Queue()
        self.listeners[port] = q
        self.listen_options[port] = options
        return q

    async def connect(self, port: int, cid: int = CID_HOST, *, timeout: float = 10.0,
                      **options: Any) -> GuestStream:
        """Connect to ``cid:port``.  Raises ConnectionRefusedError on RST."""
        local = self._next_port
        self._next_port += 1
        stream = GuestStream(self, local, cid, port, **options)
        self.streams[stream.key] = stream
        self.transmit(stream.header(Op.REQUEST))
        await stream._wait(lambda: stream.state != "connecting", timeout)
        if stream.state != "established":
            raise ConnectionRefusedError(f"{cid}:{port} refused the connection")
        return stream


@contextlib.asynccontextmanager
async def vsock_pair(device: VsockDevice, *, events: int = 0, memory_size: int = 32 << 20,
                     **options: Any) -> AsyncIterator[VsockGuest]:
    """Serve ``device`` in-process and drive it with a started `VsockGuest`.

    ``events``: event buffers to post at once.
    """
    async with device_pair(device, memory_size=memory_size, **options) as vm:
        assert isinstance(vm, VirtioFrontend)
        guest = await attach_guest(vm, device.guest_cid, events=events)
        try:
            yield guest
        finally:
            await guest.stop()


async def attach_guest(vm: VirtioFrontend, cid: int, *, events: int = 0) -> VsockGuest:
    """Wrap a started front-end in a running `VsockGuest`."""
    fe = vm if isinstance(vm, VsockFrontend) else _adopt(vm)
    guest = VsockGuest(fe, cid)
    guest.start()
    if events:
        guest.post_event_buffers(events)
    return guest


def _adopt(vm: VirtioFrontend) -> VsockFrontend:
    """Give a plain VirtioFrontend the shared ``activity`` event (re-watching its call fds)."""
    vm.__class__ = VsockFrontend
    fe = vm
    assert isinstance(fe, VsockFrontend)
    fe.activity = asyncio.Event()
    loop = asyncio.get_running_loop()
    for index, fd in enumerate(fe.calls):
        loop.remove_reader(fd)
        loop.add_reader(fd, fe._on_call, index, fd)
    return fe
