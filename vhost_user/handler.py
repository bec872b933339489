"""The back-end state machine: what each vhost-user request *means*.

Three layers, as in rust-vmm: `session` checks syntax, this module keeps
protocol state (features, memory table, ring configuration and life cycle,
the back-end channel), and a `BackendHooks` object — the virtio core in
`vdev` — does the work that needs guest memory and queues.  The handler never
touches guest memory and never sees a descriptor; the hooks never see a
vhost-user message.

Rules enforced here, with the spec section they come from (QEMU
``docs/interop/vhost-user.rst``):

* "Ring states": a ring starts when its kick fd arrives (SET_VRING_KICK), and
  stops at GET_VRING_BASE, which answers the next avail index.  Enabled and
  started are independent.  Once VHOST_USER_F_PROTOCOL_FEATURES is negotiated
  rings begin disabled and follow SET_VRING_ENABLE; without it, SET_FEATURES
  enables every ring at once (old QEMU left bit 30 out of SET_FEATURES).
* "Communication": NEED_REPLY with REPLY_ACK negotiated gets a u64 ack
  (0 = success) unless the request has a reply of its own; a request with a
  reply is always answered, with a failure value if it failed, so the
  front-end never waits forever.
* "Memory regions": SET_MEM_TABLE replaces the whole table;
  ADD_MEM_REG/REM_MEM_REG edit it one region at a time (REM_MEM_REG matches on
  guest address, user address and size, and closes a stray fd).
* File descriptors received with a request are owned here and closed when
  they are replaced, when the ring stops, or when the connection ends.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from .errors import ProtocolError, Unsupported, VdevError
from .messages import (
    FRONTEND_REQUESTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendReq,
    ConfigFlag,
    ConfigSpace,
    CryptoSession,
    Empty,
    FrontendReq,
    HeaderFlag,
    InflightDescription,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
)
from .session import InvalidMessage, Message, close_fds, encode

log = logging.getLogger("vhost_user.handler")

#: Protocol features the handler itself implements; a device may add CONFIG.
HANDLER_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                             | ProtocolFeature.BACKEND_REQ | ProtocolFeature.CONFIGURE_MEM_SLOTS
                             | ProtocolFeature.RESET_DEVICE | ProtocolFeature.STATUS)
#: Memory slots answered to GET_MAX_MEM_SLOTS (libvhost-user and rust-vmm say 509 too).
MAX_MEM_SLOTS = 509
#: Largest split-ring size (virtio 1.2 §2.7: Queue Size ≤ 32768, a power of 2).
MAX_SPLIT_QUEUE_SIZE = 32768
#: virtio 1.2 §2.1 device status: the driver is set up and ready to drive the device.
VIRTIO_STATUS_DRIVER_OK = 4


@dataclass
class Vring:
    """Everything the front-end told us about one ring."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False


@dataclass(frozen=True, slots=True)
class RegionFd:
    """A memory region and the fd its bytes live in (owned by the handler)."""

    region: MemoryRegion
    fd: int


class BackendHooks(abc.ABC):
    """What the handler needs from the device side.

    Methods are called synchronously from the message loop, in request order.
    File descriptors passed in stay owned by the handler: dup them to keep them
    beyond the next change of the same kind.
    """

    @property
    @abc.abstractmethod
    def features(self) -> int:
        """Virtio feature bits offered (bit 30 is added by the handler)."""

    @property
    def protocol_features(self) -> ProtocolFeature:
        """Protocol features the device adds to the handler's own (e.g. CONFIG)."""
        return ProtocolFeature(0)

    @property
    @abc.abstractmethod
    def num_queues(self) -> int: ...

    @property
    @abc.abstractmethod
    def max_queue_size(self) -> int: ...

    def set_features(self, features: int) -> None:
        """The driver's accepted feature bits (bit 30 already removed)."""

    @abc.abstractmethod
    def set_memory(self, regions: Sequence[RegionFd]) -> None:
        """The whole memory table changed (empty on disconnect)."""

    @abc.abstractmethod
    def start_vring(self, vring: Vring) -> None:
        """``vring`` (num, addr, base and kick fd set) starts.  Raise to refuse."""

    @abc.abstractmethod
    def stop_vring(self, index: int) -> int:
        """Stop the ring and return the next avail index to resume from."""

    def set_vring_enabled(self, index: int, enabled: bool) -> None:
        """Ring ``index`` was enabled or disabled."""

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """New call (interrupt) eventfd for ring ``index``, or None for no interrupts."""

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """A running ring got a new kick fd (it was not stopped in between)."""

    def get_config(self, offset: int, size: int) -> bytes:
        raise Unsupported("GET_CONFIG", "device has no config space")

    def set_config(self, offset: int, data: bytes, flags: ConfigFlag) -> None:
        raise Unsupported("SET_CONFIG", "device config space is read-only")

    def set_status(self, status: int) -> None:
        """The driver wrote the virtio device-status byte."""

    def set_backend_channel(self, fd: int | None) -> None:
        """The back-end request channel changed (None: gone)."""

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP (protocol feature RARP): announce ``mac`` (6 bytes) after a
        migration, for a guest that cannot announce itself."""
        raise Unsupported("SEND_RARP", "device does not send RARP announcements")

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU (protocol feature NET_MTU): the MTU the front-end gives the guest."""
        raise Unsupported("NET_SET_MTU", "device has no MTU")

    def reset(self) -> None:
        """RESET_DEVICE or a disconnect: return to the initial state."""

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """GET_INFLIGHT_FD: make a zeroed in-flight area; return (an fd to send, its size)."""
        raise Unsupported("GET_INFLIGHT_FD", "this device does not track requests in flight")

    def set_inflight(self, fd: int, desc: InflightDescription) -> None:
        """SET_INFLIGHT_FD: use the front-end's area (the hook owns ``fd`` once it returns;
        if it raises, the handler closes it)."""
        raise Unsupported("SET_INFLIGHT_FD", "this device does not track requests in flight")

    def set_log_base(self, fd: int, desc: LogDescription) -> None:
        """SET_LOG_BASE: the dirty log to set bits in (the hook owns ``fd`` once it returns;
        if it raises, the handler closes it)."""
        raise Unsupported("SET_LOG_BASE", "this device does not log dirty pages")

    def set_vring_log(self, index: int) -> None:
        """A started ring's VHOST_VRING_F_LOG or log address changed (see its ``addr``)."""

    async def drain(self, index: int | None) -> None:
        """Make ring ``index`` (None: every ring) quiet before a request that needs it:
        nothing in flight, nothing taken until `resume`.  The server awaits it
        before GET_VRING_BASE, memory-table changes and resets."""

    def resume(self) -> None:
        """The request that needed a quiet device is done: take chains again."""


@dataclass
class Reply:
    """Bytes to send back on the request channel, with fds to attach."""

    data: bytes
    fds: tuple[int, ...] = ()


@dataclass
class _State:
    owner: bool = False
    acked_features: int = 0
    acked_protocol: ProtocolFeature = ProtocolFeature(0)
    features_set: bool = False
    status: int = 0
    regions: list[RegionFd] = field(default_factory=list)
    #: ADD_MEM_REG repeats of a region already in the table (by its key), so
    #: that as many REM_MEM_REGs are needed to remove it.
    region_repeats: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    backend_fd: int | None = None


def _region_key(r: MemoryRegion) -> tuple[int, int, int, int]:
    return (r.guest_phys_addr, r.userspace_addr, r.memory_size, r.mmap_offset)


class BackendHandler:
    """Applies front-end requests to protocol state and drives `BackendHooks`.

    >>> handler = BackendHandler(hooks)          # doctest: +SKIP
    >>> for reply in handler.handle(message): send(reply.data, reply.fds)   # doctest: +SKIP
    """

    def __init__(self, hooks: BackendHooks) -> None:
        self.hooks = hooks
        self.vrings = [Vring(i) for i in range(hooks.num_queues)]
        self.state = _State()
        #: The last request handled (for the diagnosis when the front-end leaves).
        self.last_request: FrontendReq | None = None

    # -- what we offer -----------------------------------------------------

    @property
    def offered_features(self) -> int:
        return self.hooks.features | VHOST_USER_F_PROTOCOL_FEATURES

    @property
    def offered_protocol_features(self) -> ProtocolFeature:
        return HANDLER_PROTOCOL_FEATURES | self.hooks.protocol_features

    @property
    def acked_features(self) -> int:
        return self.state.acked_features

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        return self.state.acked_protocol

    @property
    def backend_fd(self) -> int | None:
        return self.state.backend_fd

    # -- entry point -------------------------------------------------------

    def handle(self, msg: Message | InvalidMessage) -> Reply | None:
        """Apply one request; return the reply to send, if any.  Never raises Exception."""
        spec = FRONTEND_REQUESTS.get(msg.request) if isinstance(msg.request, FrontendReq) else None
        name = msg.request.name if isinstance(msg.request, FrontendReq) else str(msg.request)
        error: VdevError | None
        result: object = None
        if isinstance(msg, InvalidMessage):
            error = msg.error
        else:
            try:
                self._check_feature(msg)
                result = self._dispatch(msg)
                error = None
            except (ProtocolError, Unsupported) as exc:
                error = exc
            except VdevError as exc:   # a hook's own error: the request fails, we go on
                error = exc
            except OSError as exc:     # e.g. mmap of a bad fd
                error = ProtocolError(f"{name} failed: {exc}", request=name)
            except Exception as exc:
                # Fix: a bug in a hook (say a device's write_config raising KeyError)
                # escaped here, then Connection.run and serve_forever, and stopped the
                # whole daemon.  Fail just this request, as vdev.device does for
                # process_queue; the hooks' cleanup paths already cover any exception.
                log.exception("request %s: unexpected error in a device hook", name)
                error = ProtocolError(f"{name} failed: {exc!r}", request=name)
        if isinstance(msg.request, FrontendReq):
            self.last_request = msg.request
        if error is not None:
            level = logging.INFO if isinstance(error, Unsupported) else logging.WARNING
            log.log(level, "request %s failed: %s", name, error)
        if spec is not None and spec.reply is not None:
            fds: tuple[int, ...] = ()
            if error is None and isinstance(result, tuple):
                result, fds = result          # a reply that carries fds (GET_INFLIGHT_FD)
            # _dispatch returns what the request's _on_ method returns: its reply payload
            payload = cast(Payload, result) if error is None else self._failure_reply(msg)
            assert payload is not None
            return Reply(encode(msg.request, payload.pack(), flags=HeaderFlag.REPLY), fds)
        if (msg.request is FrontendReq.SET_LOG_BASE
                and self.state.acked_protocol & ProtocolFeature.LOG_SHMFD):
            # QEMU waits for a reply to SET_LOG_BASE with LOG_SHMFD (it is not in
            # the spec's reply column): a u64, 0 once the log is mapped.
            return Reply(encode(msg.request, U64(0 if error is None else 1).pack(),
                                flags=HeaderFlag.REPLY))
        if msg.need_reply:
            if self.state.acked_protocol & ProtocolFeature.REPLY_ACK:
                return Reply(encode(msg.request, U64(0 if error is None else 1).pack(),
                                    flags=HeaderFlag.REPLY))
            log.warning("%s asked for a reply without REPLY_ACK negotiated; not answered", name)
        return None

    def _failure_reply(self, msg: Message | InvalidMessage) -> Payload:
        """A reply of the right type that says "failed", so the front-end never hangs."""
        spec = FRONTEND_REQUESTS[FrontendReq(msg.request)]
        payload = getattr(msg, "payload", None)
        if spec.reply is ConfigSpace:
            # spec: "a zero-size reply signals an error" (GET_CONFIG)
            offset = payload.offset if isinstance(payload, ConfigSpace) else 0
            return ConfigSpace(offset, 0, 0, b"")
        if spec.reply is VringState:
            index = payload.index if isinstance(payload, VringState) else 0
            return VringState(index, 0)
        if spec.reply is U64:
            return U64(1)
        if spec.reply is InflightDescription:
            return InflightDescription(0, 0, 0, 0)
        if spec.reply is CryptoSession:
            return CryptoSession(-1)
        return Empty()

    def _check_feature(self, msg: Message) -> None:
        spec = FRONTEND_REQUESTS[FrontendReq(msg.request)]
        if spec.feature is None or self.state.acked_protocol & spec.feature:
            return
        close_fds(msg.fds)
        if not self.offered_protocol_features & spec.feature:
            raise Unsupported(msg.request.name, f"needs protocol feature {spec.feature.name}, "
                                                "which this back end does not offer")
        raise ProtocolError(f"needs protocol feature {spec.feature.name}, not negotiated",
                            request=msg.request.name)

    def _dispatch(self, msg: Message) -> object:
        method = getattr(self, "_on_" + msg.request.name.lower(), None)
        if method is None:
            close_fds(msg.fds)
            raise Unsupported(msg.request.name, "request not implemented by this back end")
        return method(msg)

    # -- helpers -----------------------------------------------------------

    def _vring(self, index: int, request: FrontendReq | BackendReq) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"ring index out of range (device has {len(self.vrings)} queues)",
                                request=request.name, value=index)
        return self.vrings[index]

    @staticmethod
    def _replace_fd(old: int | None) -> None:
        if old is not None:
            close_fds((old,))

    @property
    def protocol_features_negotiated(self) -> bool:
        """Bit 30 in SET_FEATURES: rings then follow SET_VRING_ENABLE."""
        return bool(self.state.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)

    # -- features and ownership ----------------------------------------------

    def _on_get_features(self, msg: Message) -> U64:
        return U64(self.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        features = msg.payload.value
        extra = features & ~self.offered_features
        if extra:
            raise ProtocolError("SET_FEATURES acks bits that were not offered",
                                request=msg.request.name, value=hex(extra))
        self.state.acked_features = features
        self.state.features_set = True
        self.hooks.set_features(features & ~VHOST_USER_F_PROTOCOL_FEATURES)
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            # spec: "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated,
            # the ring starts directly in the enabled state."
            for vring in self.vrings:
                if not vring.enabled:
                    vring.enabled = True
                    self.hooks.set_vring_enabled(vring.index, True)

    def _on_get_protocol_features(self, msg: Message) -> U64:
        # Legal as soon as bit 30 was offered, even before SET_FEATURES.
        return U64(int(self.offered_protocol_features))

    def _on_set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        value = msg.payload.value
        extra = value & ~int(self.offered_protocol_features)
        if extra:
            # Never mirror the peer's bits back: refuse what was not offered.
            raise ProtocolError("SET_PROTOCOL_FEATURES acks bits that were not offered",
                                request=msg.request.name, value=hex(extra))
        self.state.acked_protocol = ProtocolFeature(value)

    def _on_set_owner(self, msg: Message) -> None:
        if self.state.owner:
            log.info("SET_OWNER repeated on the same connection; ignored")
        self.state.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        # spec: deprecated; treat as "disable all rings", never as "forget the session".
        for vring in self.vrings:
            if vring.enabled:
                vring.enabled = False
                self.hooks.set_vring_enabled(vring.index, False)

    def _on_get_queue_num(self, msg: Message) -> U64:
        log.info("front-end asked for the queue count: %d offered", len(self.vrings))
        return U64(len(self.vrings))

    # -- memory --------------------------------------------------------------

    def _on_set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        regions = msg.payload.regions
        if len(msg.fds) != len(regions):
            close_fds(msg.fds)
            raise ProtocolError("SET_MEM_TABLE needs one fd per region",
                                request=msg.request.name, value=(len(regions), len(msg.fds)))
        new = [RegionFd(r, fd) for r, fd in zip(regions, msg.fds)]
        self._install_memory(new)
        self.state.region_repeats.clear()

    def _install_memory(self, new: list[RegionFd]) -> None:
        try:
            self.hooks.set_memory(new)
        except BaseException:
            # The old table stays in force; the new fds were ours to close.
            close_fds([r.fd for r in new if r not in self.state.regions])
            raise
        old = self.state.regions
        self.state.regions = new
        close_fds([r.fd for r in old if r not in new])

    def _on_get_max_mem_slots(self, msg: Message) -> U64:
        return U64(MAX_MEM_SLOTS)

    def _on_add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        region = msg.payload.region
        key = _region_key(region)
        if any(_region_key(r.region) == key for r in self.state.regions):
            # QEMU before 8.1 sends ADD_MEM_REG once per vhost device, and a
            # vhost-user-net with several queue pairs is one device per pair
            # on one connection: the same region arrives again.  Taking it as
            # a repeat (a REM_MEM_REG each) keeps the table whole; refusing it
            # made QEMU stop the pair.  Found by running QEMU 7.2 with mq=on.
            close_fds(msg.fds)
            self.state.region_repeats[key] = self.state.region_repeats.get(key, 0) + 1
            log.info("ADD_MEM_REG repeats region %#x (+%#x); counted, not mapped again",
                     region.guest_phys_addr, region.memory_size)
            return
        if len(self.state.regions) >= MAX_MEM_SLOTS:
            close_fds(msg.fds)
            raise ProtocolError("no free memory slot", request=msg.request.name, value=MAX_MEM_SLOTS)
        start, end = region.guest_phys_addr, region.guest_phys_addr + region.memory_size
        for r in self.state.regions:
            rs, re_ = r.region.guest_phys_addr, r.region.guest_phys_addr + r.region.memory_size
            if start < re_ and rs < end:
                close_fds(msg.fds)
                raise ProtocolError("ADD_MEM_REG overlaps an existing region",
                                    request=msg.request.name, value=hex(start))
        self._install_memory([*self.state.regions, RegionFd(region, msg.fds[0])])
        log.info("memory region added: guest %#x, %d MiB (%d regions)", start,
                 region.memory_size >> 20, len(self.state.regions))

    def _on_rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleMemoryRegion)
        close_fds(msg.fds)   # spec: old front-ends attach one; it is not used
        region = msg.payload.region
        repeats = self.state.region_repeats
        for k, n in list(repeats.items()):
            if k[:3] == (region.guest_phys_addr, region.userspace_addr, region.memory_size):
                # One of the repeated adds (see _on_add_mem_reg) taken back.
                if n > 1:
                    repeats[k] = n - 1
                else:
                    del repeats[k]
                return
        key = (region.guest_phys_addr, region.userspace_addr, region.memory_size)
        keep = [r for r in self.state.regions
                if (r.region.guest_phys_addr, r.region.userspace_addr, r.region.memory_size) != key]
        if len(keep) == len(self.state.regions):
            raise ProtocolError("REM_MEM_REG names no known region", request=msg.request.name,
                                value=tuple(hex(v) for v in key))
        self._install_memory(keep)
        log.info("memory region removed: guest %#x, %d MiB (%d regions)", region.guest_phys_addr,
                 region.memory_size >> 20, len(self.state.regions))

    # -- rings -----------------------------------------------------------------

    def _on_set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index, msg.request)
        num = msg.payload.num
        limit = min(self.hooks.max_queue_size, MAX_SPLIT_QUEUE_SIZE)
        if not (1 <= num <= limit and num & (num - 1) == 0):
            raise ProtocolError(f"queue size must be a power of 2 in 1..{limit}",
                                request=msg.request.name, value=num)
        if vring.started:
            raise ProtocolError("SET_VRING_NUM on a started ring", request=msg.request.name,
                                value=vring.index)
        vring.num = num

    def _on_set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        vring = self._vring(msg.payload.index, msg.request)
        if vring.started:
            # QEMU re-sends the address of a running ring to turn used-ring
            # logging on or off during migration (VHOST_VRING_F_LOG): only the
            # flags and the log address may change then.
            old, new = vring.addr, msg.payload
            assert old is not None
            if (old.desc, old.avail, old.used) != (new.desc, new.avail, new.used):
                raise ProtocolError("SET_VRING_ADDR moves a started ring", request=msg.request.name,
                                    value=vring.index)
            vring.addr = new
            self.hooks.set_vring_log(vring.index)
            return
        vring.addr = msg.payload

    def _on_set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index, msg.request)
        if msg.payload.num > 0xFFFF:
            # Bits 16-31 only carry meaning for packed rings, which we do not offer.
            raise ProtocolError("split-ring base above 0xffff", request=msg.request.name,
                                value=msg.payload.num)
        if vring.started:
            raise ProtocolError("SET_VRING_BASE on a started ring", request=msg.request.name,
                                value=vring.index)
        vring.base = msg.payload.num

    def _on_get_vring_base(self, msg: Message) -> VringState:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index, msg.request)
        self._stop(vring)
        # spec: the ring is stopped; the back-end drops its kick and call fds and
        # gets new ones when the ring starts again.
        self._replace_fd(vring.kick_fd)
        vring.kick_fd = None
        if vring.call_fd is not None:
            self.hooks.set_vring_call(vring.index, None)
            self._replace_fd(vring.call_fd)
            vring.call_fd = None
        return VringState(vring.index, vring.base)

    def _stop(self, vring: Vring) -> None:
        if vring.started:
            vring.started = False
            vring.base = self.hooks.stop_vring(vring.index) & 0xFFFF

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        assert isinstance(msg.payload, VringFd)
        try:
            vring = self._vring(msg.payload.index, msg.request)
        except ProtocolError:
            close_fds(msg.fds)
            raise
        if msg.payload.nofd != (not msg.fds):
            close_fds(msg.fds)
            raise ProtocolError("NOFD bit disagrees with the fds attached", request=msg.request.name,
                                value=(msg.payload.nofd, len(msg.fds)))
        return vring, (msg.fds[0] if msg.fds else None)

    def _on_set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        if vring.started:
            try:
                self.hooks.set_vring_kick(vring.index, fd)
            except BaseException as exc:
                # Refused (e.g. an fd epoll cannot watch): the ring keeps its
                # old kick fd, and the new one was ours to close.
                self._replace_fd(fd)
                if isinstance(exc, OSError):
                    raise ProtocolError(f"ring {vring.index}: new kick fd refused ({exc.strerror})",
                                        request=msg.request.name, value=fd) from exc
                raise
            old, vring.kick_fd = vring.kick_fd, fd
            self._replace_fd(old)
            return
        if vring.num == 0 or vring.addr is None:
            self._replace_fd(fd)
            raise ProtocolError("SET_VRING_KICK before SET_VRING_NUM and SET_VRING_ADDR",
                                request=msg.request.name, value=vring.index)
        if fd is None:
            log.warning("ring %d: kick without an fd asks for polling, which we do not do; "
                        "the ring runs only when kicked in some other way", vring.index)
        old, vring.kick_fd = vring.kick_fd, fd
        self._replace_fd(old)
        try:
            self.hooks.start_vring(vring)
        except BaseException:
            self._replace_fd(vring.kick_fd)
            vring.kick_fd = None
            raise
        vring.started = True

    def _on_set_vring_call(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        old, vring.call_fd = vring.call_fd, fd
        self.hooks.set_vring_call(vring.index, fd)
        self._replace_fd(old)

    def _on_set_vring_err(self, msg: Message) -> None:
        vring, fd = self._vring_fd(msg)
        old, vring.err_fd = vring.err_fd, fd
        self._replace_fd(old)

    def _on_set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index, msg.request)
        if msg.payload.num not in (0, 1):
            raise ProtocolError("SET_VRING_ENABLE takes 0 or 1", request=msg.request.name,
                                value=msg.payload.num)
        enabled = bool(msg.payload.num)
        if vring.enabled != enabled:
            vring.enabled = enabled
            self.hooks.set_vring_enabled(vring.index, enabled)

    # -- config, status, channel, reset ----------------------------------------

    # -- migration and reconnection -----------------------------------------------

    def _on_set_log_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, LogDescription)
        if len(msg.fds) != 1:
            close_fds(msg.fds)
            raise Unsupported(msg.request.name, "a log base without an fd (no LOG_SHMFD) is not "
                                                "supported: the back end cannot reach QEMU's memory")
        try:
            self.hooks.set_log_base(msg.fds[0], msg.payload)
        except BaseException:
            close_fds(msg.fds)      # the hook owns the fd only once it succeeded
            raise

    def _on_set_log_fd(self, msg: Message) -> None:
        # An eventfd to signal after logging; QEMU reads the log when it syncs
        # anyway, so we do not use it.
        close_fds(msg.fds)
        if not self.offered_protocol_features & ProtocolFeature.LOG_SHMFD:
            raise Unsupported(msg.request.name, "this back end does not log dirty pages")

    def _on_get_inflight_fd(self, msg: Message) -> tuple[InflightDescription, tuple[int, ...]]:
        assert isinstance(msg.payload, InflightDescription)
        d = msg.payload
        if not 1 <= d.num_queues <= len(self.vrings) or not 1 <= d.queue_size <= MAX_SPLIT_QUEUE_SIZE:
            raise ProtocolError("GET_INFLIGHT_FD for an impossible queue layout",
                                request=msg.request.name, value=(d.num_queues, d.queue_size))
        fd, size = self.hooks.get_inflight(d.num_queues, d.queue_size)
        return InflightDescription(size, 0, d.num_queues, d.queue_size), (fd,)

    def _on_set_inflight_fd(self, msg: Message) -> None:
        assert isinstance(msg.payload, InflightDescription)
        d = msg.payload
        if not 1 <= d.num_queues <= len(self.vrings) or not 1 <= d.queue_size <= MAX_SPLIT_QUEUE_SIZE:
            close_fds(msg.fds)
            raise ProtocolError("SET_INFLIGHT_FD for an impossible queue layout",
                                request=msg.request.name, value=(d.num_queues, d.queue_size))
        try:
            self.hooks.set_inflight(msg.fds[0], d)
        except BaseException:
            close_fds(msg.fds)      # the hook owns the fd only once it succeeded
            raise

    def _on_get_config(self, msg: Message) -> ConfigSpace:
        assert isinstance(msg.payload, ConfigSpace)
        p = msg.payload
        data = self.hooks.get_config(p.offset, p.size)
        if len(data) != p.size:
            raise ProtocolError("device returned config of the wrong size", request=msg.request.name,
                                value=(p.size, len(data)))
        return ConfigSpace(p.offset, p.size, p.flags, data)

    def _on_set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, ConfigSpace)
        p = msg.payload
        try:
            flags = ConfigFlag(p.flags)
        except ValueError:
            raise ProtocolError("unknown SET_CONFIG flags (spec: 0 = front-end, 1 = migration)",
                                request=msg.request.name, value=p.flags) from None
        self.hooks.set_config(p.offset, p.payload, flags)

    def _on_set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        if msg.payload.value > 0xFF:
            raise ProtocolError("device status is one byte", request=msg.request.name,
                                value=msg.payload.value)
        if msg.payload.value & VIRTIO_STATUS_DRIVER_OK and not self.state.status & VIRTIO_STATUS_DRIVER_OK:
            started = [v.index for v in self.vrings if v.started]
            log.info("front-end set DRIVER_OK with %d of the %d queues offered started%s", len(started),
                     len(self.vrings), f" ({', '.join(map(str, started))})" if started else "")
        self.state.status = msg.payload.value
        self.hooks.set_status(msg.payload.value)

    def _on_get_status(self, msg: Message) -> U64:
        return U64(self.state.status)

    def _on_send_rarp(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        # spec SEND_RARP: "the first 6 bytes of the payload contain the mac address"
        self.hooks.send_rarp(msg.payload.value.to_bytes(8, "little")[:6])

    def _on_net_set_mtu(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.hooks.set_mtu(msg.payload.value)

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        old, self.state.backend_fd = self.state.backend_fd, msg.fds[0]
        self.hooks.set_backend_channel(msg.fds[0])
        self._replace_fd(old)

    def _on_reset_device(self, msg: Message) -> None:
        self.reset_device()

    def reset_device(self) -> None:
        """Stop and disable every ring, forget virtio features, keep protocol features."""
        for vring in self.vrings:
            self._stop(vring)
            if vring.call_fd is not None:
                self.hooks.set_vring_call(vring.index, None)
            for fd in (vring.kick_fd, vring.call_fd, vring.err_fd):
                self._replace_fd(fd)
        self.vrings = [Vring(i) for i in range(len(self.vrings))]
        self.state.acked_features = 0
        self.state.features_set = False
        self.state.status = 0
        self.hooks.reset()

    # -- back-end → front-end ----------------------------------------------------

    def backend_request(self, request: BackendReq, payload: bytes = b"") -> tuple[bytes, bool]:
        """Encode a back-end request; returns (bytes, whether an ack will follow)."""
        if self.state.backend_fd is None:
            raise Unsupported(request.name, "no back-end channel (SET_BACKEND_REQ_FD not received)")
        need_reply = bool(self.state.acked_protocol & ProtocolFeature.REPLY_ACK)
        flags = HeaderFlag.NEED_REPLY if need_reply else 0
        return encode(request, payload, flags=flags), need_reply

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        """The connection ended: stop everything and release every fd."""
        if self.last_request is FrontendReq.GET_QUEUE_NUM:
            # QEMU asks GET_QUEUE_NUM while it sets up and gives up at once
            # when the answer is below its num-queues ("The maximum number of
            # queues supported by the backend is N"); nothing else comes.
            log.warning("front-end disconnected right after asking for the queue count, which was "
                        "%d: it probably wants more queues than this back end offers (QEMU's "
                        "num-queues, by default one per vCPU); start the back end with at least "
                        "as many queues (vdev: --queues N)", len(self.vrings))
        self.last_request = None
        self.reset_device()
        self.state.acked_protocol = ProtocolFeature(0)
        if self.state.regions:
            self.hooks.set_memory([])
            close_fds([r.fd for r in self.state.regions])
            self.state.regions = []
            self.state.region_repeats.clear()
        if self.state.backend_fd is not None:
            self.hooks.set_backend_channel(None)
            self._replace_fd(self.state.backend_fd)
            self.state.backend_fd = None
        self.state.owner = False

