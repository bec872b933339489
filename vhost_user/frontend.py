"""A vhost-user front-end: the VMM's side of the protocol, for tests and benchmarks.

`Frontend` connects to a back-end's socket and offers one coroutine per
front-end request, each returning the decoded reply.  It also keeps the
back-end request channel (SET_BACKEND_REQ_FD): messages the back-end sends
there (CONFIG_CHANGE_MSG, …) are acknowledged and queued in
`backend_requests`.

It speaks the protocol only.  Guest memory, rings and a driver-side queue sit
one layer up, in `vdev.testing`, which builds a complete VMM stand-in from
this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from typing import Protocol, Self, TypeVar

from .errors import ProtocolError
from .messages import (
    FRONTEND_REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    Empty,
    FrontendReq,
    HeaderFlag,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
)
from .server import recv_with_fds, send_message, wait_fd
from .session import (
    NEED_DATA,
    BackendChannelSession,
    FrontendSession,
    Message,
    RawMessage,
    _NeedData,
    close_fds,
    encode,
)

log = logging.getLogger("vhost_user.frontend")

class _Unpackable(Protocol):
    """A payload class: ``unpack`` builds one from its wire bytes."""

    @classmethod
    def unpack(cls, data: bytes) -> Self: ...


P = TypeVar("P", bound=_Unpackable)


class Frontend:
    """An asyncio vhost-user front-end over a Unix socket.

    >>> fe = await Frontend.connect("/tmp/vdev.sock")        # doctest: +SKIP
    >>> features = await fe.get_features()                    # doctest: +SKIP
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.session = FrontendSession()
        self.protocol_features = ProtocolFeature(0)
        self.backend_requests: asyncio.Queue[Message] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._channel: socket.socket | None = None
        self._channel_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> Frontend:
        """Connect to a listening back-end, retrying until it appears or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    # -- generic request/reply -------------------------------------------------

    async def send(self, request: FrontendReq, payload: bytes = b"", fds: Sequence[int] = (),
                   *, need_reply: bool = False) -> None:
        """Send a request without waiting for anything."""
        await send_message(self.sock, self.session.request(request, payload, need_reply=need_reply),
                           tuple(fds))

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (for tests that feed malformed messages)."""
        await send_message(self.sock, data, tuple(fds))

    async def read_reply(self, request: FrontendReq | int, timeout: float = 10.0) -> RawMessage:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                raw = self.session.next_reply()
                if raw is not NEED_DATA:
                    assert isinstance(raw, RawMessage)
                    if raw.request != int(request):
                        close_fds(raw.fds)
                        raise ProtocolError("reply to the wrong request", request=int(request),
                                            value=raw.request, fatal=True)
                    return raw
                await wait_fd(loop, self.sock.fileno())
                try:
                    data, fds = recv_with_fds(self.sock)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionResetError("back-end closed the connection")
                self.session.receive_data(data, fds)

    async def call(self, request: FrontendReq, payload: bytes = b"", fds: Sequence[int] = (),
                   *, ack: bool | None = None) -> RawMessage | None:
        """Send ``request``; read its reply (if it has one) or its REPLY_ACK ack.

        ``ack``: ask for a REPLY_ACK ack; by default whenever REPLY_ACK was
        negotiated and the request has no reply of its own (as QEMU does for
        the requests it cares about).

        Raises:
            ProtocolError: the back-end acked with a failure value.
        """
        spec = FRONTEND_REQUESTS[request]
        if ack is None:
            ack = spec.reply is None and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        async with self._lock:
            await self.send(request, payload, fds, need_reply=ack and spec.reply is None)
            if spec.reply is not None:
                return await self.read_reply(request)
            if ack:
                raw = await self.read_reply(request)
                value = U64.unpack(raw.data).value
                if value != 0:
                    raise ProtocolError("back-end acked a failure", request=request.name, value=value)
            return None

    async def _call_reply(self, request: FrontendReq, payload_type: type[P], payload: bytes = b"",
                          fds: Sequence[int] = ()) -> P:
        raw = await self.call(request, payload, fds)
        assert raw is not None
        return payload_type.unpack(raw.data)

    # -- one method per request --------------------------------------------------

    async def get_features(self) -> int:
        return (await self._call_reply(FrontendReq.GET_FEATURES, U64)).value

    async def set_features(self, features: int) -> None:
        await self.call(FrontendReq.SET_FEATURES, U64(features).pack())

    async def set_owner(self) -> None:
        await self.call(FrontendReq.SET_OWNER)

    async def reset_owner(self) -> None:
        await self.call(FrontendReq.RESET_OWNER)

    async def get_protocol_features(self) -> ProtocolFeature:
        return ProtocolFeature((await self._call_reply(FrontendReq.GET_PROTOCOL_FEATURES, U64)).value)

    async def set_protocol_features(self, features: ProtocolFeature) -> None:
        await self.call(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(features)).pack())
        self.protocol_features = ProtocolFeature(features)

    async def get_queue_num(self) -> int:
        return (await self._call_reply(FrontendReq.GET_QUEUE_NUM, U64)).value

    async def get_max_mem_slots(self) -> int:
        return (await self._call_reply(FrontendReq.GET_MAX_MEM_SLOTS, U64)).value

    async def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        await self.call(FrontendReq.SET_MEM_TABLE, MemoryTable(tuple(regions)).pack(), fds)

    async def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        await self.call(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(region).pack(), (fd,))

    async def rem_mem_reg(self, region: MemoryRegion) -> None:
        await self.call(FrontendReq.REM_MEM_REG, SingleMemoryRegion(region).pack())

    async def set_vring_num(self, index: int, num: int) -> None:
        await self.call(FrontendReq.SET_VRING_NUM, VringState(index, num).pack())

    async def set_vring_addr(self, addr: VringAddr) -> None:
        await self.call(FrontendReq.SET_VRING_ADDR, addr.pack())

    async def set_vring_base(self, index: int, base: int) -> None:
        await self.call(FrontendReq.SET_VRING_BASE, VringState(index, base).pack())

    async def get_vring_base(self, index: int) -> int:
        return (await self._call_reply(FrontendReq.GET_VRING_BASE, VringState,
                                       VringState(index, 0).pack())).num

    async def _set_vring_fd(self, request: FrontendReq, index: int, fd: int | None) -> None:
        await self.call(request, VringFd(index, fd is None).pack(), () if fd is None else (fd,))

    async def set_vring_kick(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    async def set_vring_call(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    async def set_vring_err(self, index: int, fd: int | None) -> None:
        await self._set_vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    async def set_vring_enable(self, index: int, enabled: bool) -> None:
        await self.call(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enabled)).pack())

    async def get_config(self, offset: int, size: int) -> bytes:
        """Read config space.  Raises ProtocolError on the spec's zero-size failure reply."""
        reply = await self._call_reply(FrontendReq.GET_CONFIG, ConfigSpace,
                                       ConfigSpace(offset, size, 0, bytes(size)).pack())
        if reply.size != size:
            raise ProtocolError("GET_CONFIG failed (zero-size reply)", request="GET_CONFIG",
                                value=(offset, size))
        return reply.payload

    async def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self.call(FrontendReq.SET_CONFIG, ConfigSpace(offset, len(data), flags, data).pack())

    async def set_status(self, status: int) -> None:
        await self.call(FrontendReq.SET_STATUS, U64(status).pack())

    async def get_status(self) -> int:
        return (await self._call_reply(FrontendReq.GET_STATUS, U64)).value

    async def reset_device(self) -> None:
        await self.call(FrontendReq.RESET_DEVICE)

    async def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: the MAC in the first 6 bytes of the u64 (as QEMU sends it)."""
        await self.call(FrontendReq.SEND_RARP, U64(int.from_bytes(mac[:6].ljust(8, b"\0"), "little")).pack())

    async def net_set_mtu(self, mtu: int) -> None:
        await self.call(FrontendReq.NET_SET_MTU, U64(mtu).pack())

    # -- migration and reconnection ------------------------------------------------

    async def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """SET_LOG_BASE with the log's fd (LOG_SHMFD); waits for the u64 reply QEMU waits for.

        Raises:
            ProtocolError: the back end answered with a failure value.
        """
        async with self._lock:
            await self.send(FrontendReq.SET_LOG_BASE, LogDescription(size, offset).pack(), (fd,))
            raw = await self.read_reply(FrontendReq.SET_LOG_BASE)
        value = U64.unpack(raw.data).value
        if value != 0:
            raise ProtocolError("back-end could not map the dirty log", request="SET_LOG_BASE",
                                value=value)

    async def set_log_fd(self, fd: int) -> None:
        await self.call(FrontendReq.SET_LOG_FD, b"", (fd,))

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, InflightDescription]:
        """GET_INFLIGHT_FD: the back end's in-flight area (its fd is now the caller's)."""
        raw = await self.call(FrontendReq.GET_INFLIGHT_FD,
                              InflightDescription(0, 0, num_queues, queue_size).pack())
        assert raw is not None
        desc = InflightDescription.unpack(raw.data)
        if len(raw.fds) != 1 or desc.mmap_size == 0:
            close_fds(raw.fds)
            raise ProtocolError("GET_INFLIGHT_FD failed", request="GET_INFLIGHT_FD", value=desc)
        return raw.fds[0], desc

    async def set_inflight_fd(self, fd: int, desc: InflightDescription) -> None:
        await self.call(FrontendReq.SET_INFLIGHT_FD, desc.pack(), (fd,))

    async def set_backend_req_fd(self) -> None:
        """Create the back-end channel, hand one end over, and serve the other."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.call(FrontendReq.SET_BACKEND_REQ_FD, b"", (theirs.fileno(),))
        finally:
            theirs.close()
        self._close_channel()
        self._channel = ours
        ours.setblocking(False)
        self._channel_task = asyncio.get_running_loop().create_task(self._serve_channel(ours))

    async def _serve_channel(self, chan: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        session = BackendChannelSession()
        try:
            while True:
                event = session.next_event()
                if isinstance(event, _NeedData):
                    await wait_fd(loop, chan.fileno())
                    try:
                        data, fds = recv_with_fds(chan)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    session.receive_data(data, fds)
                    continue
                if isinstance(event, Message):
                    log.debug("back-end request %s", event.request.name)
                    if event.need_reply:
                        await send_message(chan, encode(event.request, U64(0).pack(), flags=HeaderFlag.REPLY))
                    await self.backend_requests.put(event)
                else:
                    log.warning("invalid back-end request: %s", event.error)
                    if event.need_reply:
                        await send_message(chan, encode(event.request, U64(1).pack(), flags=HeaderFlag.REPLY))
        finally:
            session.close()

    # -- the usual opening -------------------------------------------------------

    async def handshake(self, *, want_protocol: ProtocolFeature | None = None) -> tuple[int, ProtocolFeature]:
        """The first part of QEMU's start-up: features, protocol features, owner.

        Returns (offered virtio features, negotiated protocol features).
        """
        features = await self.get_features()
        protocol = ProtocolFeature(0)
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            offered = await self.get_protocol_features()
            protocol = offered if want_protocol is None else offered & want_protocol
            await self.set_protocol_features(protocol)
        await self.set_owner()
        return features, protocol

    def _close_channel(self) -> None:
        if self._channel_task is not None:
            self._channel_task.cancel()
            self._channel_task = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def close(self) -> None:
        self._close_channel()
        self.session.close()
        with contextlib.suppress(OSError):
            self.sock.close()


__all__ = ["Frontend", "Empty"]
