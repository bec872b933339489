"""An h2-style walk of (handler state x request): random request sequences against BackendHandler.

A hypothesis state machine feeds `BackendHandler` real framed messages (through
a `BackendSession`, so malformed payloads and wrong fd counts reach the handler
as `InvalidMessage`) with real eventfds and memfds attached, and checks after
every single request:

* ``handle()`` never raises;
* a reply comes back iff the request has a defined reply, or NEED_REPLY was
  set and REPLY_ACK is negotiated; it parses as one header with exactly the
  REPLY flag and the same request number, and its payload parses as the
  request's reply type (an ack is 0 exactly when no failure was logged);
* a ring is started in the hooks iff the handler says ``vring.started``, and
  a stopped ring answers GET_VRING_BASE with what ``stop_vring`` returned;
* every fd the handler holds is open and held once, every fd it was given
  and no longer holds is closed;
* after ``close()`` no fd given to it stays open.

The fake hooks refuse what the real `vdev.device.DeviceRuntime` refuses
(mmap of a non-file fd or past the end of the file, rings outside the memory
table, a kick fd that cannot be polled) so the failure paths are walked too.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from vdev.errors import GuestError
from vhost_user.errors import Unsupported
from vhost_user.handler import (
    HANDLER_PROTOCOL_FEATURES,
    BackendHandler,
    BackendHooks,
    RegionFd,
    Vring,
)
from vhost_user.messages import (
    FRONTEND_REQUESTS,
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigFlag,
    ConfigSpace,
    FrontendReq,
    HeaderFlag,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringFd,
    VringState,
)
from vhost_user.session import (
    NEED_DATA,
    BackendSession,
    InvalidMessage,
    Message,
    encode,
)

NUM_QUEUES = 2
MAX_QUEUE_SIZE = 256
DEVICE_FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 5) | (1 << 0)
DEVICE_PROTOCOL = ProtocolFeature.CONFIG
OFFERED_FEATURES = DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES
OFFERED_PROTOCOL = int(HANDLER_PROTOCOL_FEATURES | DEVICE_PROTOCOL)
#: Every region of these tests is one 64 KiB memfd; the front-end "maps" it here.
REGION_SIZE = 0x10000
VA_BASE = 0x7F00_0000_0000
#: stop_vring answers STOP_BASE + a counter: above 0xffff, so the handler's masking shows.
STOP_BASE = 0x5_0000
CONFIG_BYTES = bytes(range(0x40, 0x40 + 64))

#: DeviceRuntime.set_vring_kick raises when epoll refuses the fd (a regular file); the
#: fake does the same, so a refused kick-fd replacement on a running ring is walked too.
KICK_HOOK_REFUSES_REGULAR_FILES = True

log = logging.getLogger("vhost_user.handler")


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


class FakeHooks(BackendHooks):
    """Records calls and checks the handler's side of the contract.

    Assertions cannot be raised from a hook (the handler turns any exception
    into a failed request, by design), so broken expectations are collected in
    ``violations`` and checked by the test after each request.
    """

    def __init__(self) -> None:
        self.started: dict[int, Vring] = {}
        self.memory: list[RegionFd] = []
        self.enabled: set[int] = set()
        self.call_fds: dict[int, int] = {}
        self.backend_fd: int | None = None
        self.stops = 0
        self.last_stop: dict[int, int] = {}
        self.violations: list[str] = []
        self.calls: list[str] = []

    def _bad(self, what: str) -> None:
        self.violations.append(what)

    @property
    def features(self) -> int:
        return DEVICE_FEATURES

    @property
    def protocol_features(self) -> ProtocolFeature:
        return DEVICE_PROTOCOL

    @property
    def num_queues(self) -> int:
        return NUM_QUEUES

    @property
    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    def set_features(self, features: int) -> None:
        self.calls.append("set_features")
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            self._bad(f"set_features got bit 30: {features:#x}")
        if features & ~DEVICE_FEATURES:
            self._bad(f"set_features got unoffered bits {features & ~DEVICE_FEATURES:#x}")

    def set_memory(self, regions: Sequence[RegionFd]) -> None:
        self.calls.append("set_memory")
        for r in regions:
            if not fd_open(r.fd):
                self._bad(f"set_memory got closed fd {r.fd}")
                raise OSError(errno.EBADF, "closed fd")
        # What mmap would refuse in DeviceRuntime.set_memory.
        for r in regions:
            if not is_file(r.fd):
                raise OSError(errno.ENODEV, f"fd {r.fd} cannot be mapped")
            if r.region.mmap_offset + r.region.memory_size > os.fstat(r.fd).st_size:
                raise OSError(errno.EINVAL, f"region at {r.region.guest_phys_addr:#x} beyond its file")
        self.memory = list(regions)

    def _in_memory(self, addr: int, length: int) -> bool:
        return any(r.region.userspace_addr <= addr and addr + length <= r.region.userspace_addr
                   + r.region.memory_size for r in self.memory)

    def start_vring(self, vring: Vring) -> None:
        self.calls.append("start_vring")
        if vring.index in self.started:
            self._bad(f"start_vring({vring.index}) on a started ring")
        if vring.addr is None or not 1 <= vring.num <= MAX_QUEUE_SIZE or vring.num & (vring.num - 1):
            self._bad(f"start_vring({vring.index}) without a valid size and address: {vring}")
            raise GuestError("bad ring")
        if vring.kick_fd is not None and not fd_open(vring.kick_fd):
            self._bad(f"start_vring({vring.index}) with closed kick fd {vring.kick_fd}")
        if not 0 <= vring.base <= 0xFFFF:
            self._bad(f"start_vring({vring.index}) with base {vring.base:#x}")
        # What DeviceRuntime.start_vring refuses.
        for addr in (vring.addr.desc, vring.addr.avail, vring.addr.used):
            if not self._in_memory(addr, 16):
                raise GuestError("ring outside guest memory", queue=vring.index, gpa=addr)
        if vring.kick_fd is not None and is_file(vring.kick_fd):
            raise OSError(errno.EPERM, "cannot poll a regular file")
        self.started[vring.index] = Vring(vring.index, vring.num, vring.addr, vring.base,
                                          vring.kick_fd, vring.call_fd, vring.err_fd,
                                          vring.enabled, True)

    def stop_vring(self, index: int) -> int:
        self.calls.append("stop_vring")
        if index not in self.started:
            self._bad(f"stop_vring({index}) on a ring that was never started")
        self.started.pop(index, None)
        self.stops += 1
        value = STOP_BASE + self.stops * 7 + index
        self.last_stop[index] = value
        return value

    def set_vring_enabled(self, index: int, enabled: bool) -> None:
        self.calls.append("set_vring_enabled")
        if (index in self.enabled) == enabled:
            self._bad(f"set_vring_enabled({index}, {enabled}) without a change")
        (self.enabled.add if enabled else self.enabled.discard)(index)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.calls.append("set_vring_call")
        if fd is None:
            self.call_fds.pop(index, None)
            return
        if not fd_open(fd):
            self._bad(f"set_vring_call({index}) with closed fd {fd}")
        self.call_fds[index] = fd

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.calls.append("set_vring_kick")
        if index not in self.started:
            self._bad(f"set_vring_kick({index}) on a ring that is not started")
        if fd is not None and not fd_open(fd):
            self._bad(f"set_vring_kick({index}) with closed fd {fd}")
        if KICK_HOOK_REFUSES_REGULAR_FILES and fd is not None and is_file(fd):
            raise OSError(errno.EPERM, "cannot poll a regular file")

    def get_config(self, offset: int, size: int) -> bytes:
        self.calls.append("get_config")
        if offset + size > len(CONFIG_BYTES):
            raise Unsupported("GET_CONFIG", "beyond the config space")
        return CONFIG_BYTES[offset: offset + size]

    def set_config(self, offset: int, data: bytes, flags: ConfigFlag) -> None:
        self.calls.append("set_config")
        if offset != 0 or len(data) != 1:
            raise Unsupported("config write", "read-only")

    def set_status(self, status: int) -> None:
        self.calls.append("set_status")
        if not 0 <= status <= 0xFF:
            self._bad(f"set_status({status:#x})")

    def set_backend_channel(self, fd: int | None) -> None:
        self.calls.append("set_backend_channel")
        if fd is not None and not fd_open(fd):
            self._bad(f"set_backend_channel with closed fd {fd}")
        self.backend_fd = fd

    def reset(self) -> None:
        self.calls.append("reset")
        if self.started:
            self._bad(f"reset with rings still started: {sorted(self.started)}")
        self.enabled.clear()
        self.call_fds.clear()


class FailureLog(logging.Handler):
    """Collects the handler's "request X failed" lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---- strategies -----------------------------------------------------------------------------

ring_index = st.sampled_from([0, 0, 1, 1, 2, 255])
queue_size = st.sampled_from([0, 1, 2, 4, 64, 256, 3, 512, 0x10000])
region_slot = st.integers(0, 2)
ring_offset = st.integers(0, REGION_SIZE // 16 - 1).map(lambda n: n * 16)


def region(slot: int, size: int = REGION_SIZE) -> MemoryRegion:
    gpa = slot * 0x10_0000
    return MemoryRegion(gpa, size, VA_BASE + gpa, 0)


@st.composite
def vring_addr(draw: st.DrawFn) -> bytes:
    index = draw(ring_index)
    slot = draw(region_slot)
    wild = draw(st.booleans()) and draw(st.booleans())
    base = VA_BASE + slot * 0x10_0000

    def addr() -> int:
        if wild:
            return draw(st.integers(0, (1 << 64) - 1)) & ~0xF
        return base + draw(ring_offset)

    flags = draw(st.sampled_from([0, 0, 0, 1, 2]))
    return struct.pack("=IIQQQQ", index, flags, addr(), addr(), addr(), 0)


@st.composite
def mem_table(draw: st.DrawFn) -> tuple[bytes, int]:
    slots = draw(st.lists(region_slot, min_size=1, max_size=3, unique=True))
    size = draw(st.sampled_from([REGION_SIZE, REGION_SIZE, REGION_SIZE // 2, 2 * REGION_SIZE]))
    return MemoryTable(tuple(region(s, size) for s in slots)).pack(), len(slots)


@st.composite
def u64_for(draw: st.DrawFn, request: FrontendReq) -> bytes:
    if request is FrontendReq.SET_FEATURES:
        value = draw(st.integers(0, (1 << 64) - 1)) & OFFERED_FEATURES
        if draw(st.integers(0, 3)) == 0:
            value |= 1 << draw(st.integers(0, 63))
    elif request is FrontendReq.SET_PROTOCOL_FEATURES:
        value = draw(st.integers(0, (1 << 64) - 1)) & OFFERED_PROTOCOL
        if draw(st.booleans()):
            value |= ProtocolFeature.REPLY_ACK
        if draw(st.integers(0, 3)) == 0:
            value |= 1 << draw(st.integers(0, 63))
    elif request is FrontendReq.SET_STATUS:
        value = draw(st.integers(0, 0x1FF))
    else:
        value = draw(st.integers(0, (1 << 64) - 1))
    return U64(value).pack()


@st.composite
def well_formed(draw: st.DrawFn, request: FrontendReq) -> tuple[bytes, int]:
    """A payload of the right shape for ``request`` and the natural number of fds."""
    spec = FRONTEND_REQUESTS[request]
    natural = spec.fds[0]
    kind = spec.payload.__name__
    if kind == "Empty":
        return b"", natural
    if kind == "U64":
        return draw(u64_for(request)), natural
    if kind == "VringFd":
        nofd = draw(st.booleans()) and draw(st.booleans())
        index = draw(ring_index)
        return VringFd(index, nofd).pack(), 0 if nofd else 1
    if kind == "VringState":
        return VringState(draw(ring_index), draw(queue_size)).pack(), natural
    if kind == "VringAddr":
        return draw(vring_addr()), natural
    if kind == "MemoryTable":
        return draw(mem_table())
    if kind == "SingleMemoryRegion":
        size = draw(st.sampled_from([REGION_SIZE, REGION_SIZE, 2 * REGION_SIZE]))
        return SingleMemoryRegion(region(draw(region_slot), size)).pack(), natural
    if kind == "ConfigSpace":
        offset, size = draw(st.integers(0, 72)), draw(st.integers(0, 8))
        flags = draw(st.sampled_from([0, 0, 1, 2]))
        return ConfigSpace(offset, size, flags, draw(st.binary(min_size=size, max_size=size))).pack(), natural
    # The rest (IOTLB, log, inflight, crypto, shared object, device state):
    # random bytes of the wire size, or the minimum for variable ones.
    sizes = {"IotlbMsg": 32, "LogDescription": 16, "InflightDescription": 24, "SharedObject": 16,
             "DeviceStateTransfer": 8, "CryptoSession": 8, "SingleMemoryRegion": 40}
    n = sizes.get(kind, 8)
    return draw(st.binary(min_size=n, max_size=n)), natural


REQUEST_NUMBERS = st.one_of(st.sampled_from(list(FrontendReq)), st.sampled_from([0, 44, 45, 60, 1000]))
CORE = [FrontendReq.SET_MEM_TABLE, FrontendReq.SET_VRING_NUM, FrontendReq.SET_VRING_ADDR,
        FrontendReq.SET_VRING_BASE, FrontendReq.GET_VRING_BASE, FrontendReq.SET_VRING_KICK,
        FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR, FrontendReq.SET_VRING_ENABLE,
        FrontendReq.SET_FEATURES, FrontendReq.SET_PROTOCOL_FEATURES, FrontendReq.RESET_DEVICE,
        FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG, FrontendReq.RESET_OWNER,
        FrontendReq.GET_CONFIG, FrontendReq.SET_CONFIG, FrontendReq.SET_BACKEND_REQ_FD,
        FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_MAX_MEM_SLOTS, FrontendReq.SET_STATUS, FrontendReq.GET_STATUS,
        FrontendReq.SET_OWNER]


@st.composite
def message(draw: st.DrawFn, requests: st.SearchStrategy = REQUEST_NUMBERS) -> tuple[int, int, bytes, list[str]]:
    """(request number, flags, payload, fd kinds)."""
    request = draw(requests)
    flags = HeaderFlag.NEED_REPLY if draw(st.booleans()) else 0
    if isinstance(request, FrontendReq) and draw(st.integers(0, 7)) > 0:
        payload, nfds = draw(well_formed(request))
    else:
        payload, nfds = draw(st.binary(max_size=48)), 0
    if draw(st.integers(0, 5)) == 0:
        nfds = draw(st.integers(0, 2))
    memory = request in (FrontendReq.SET_MEM_TABLE, FrontendReq.ADD_MEM_REG, FrontendReq.REM_MEM_REG)
    usual = "memfd" if memory else "eventfd"
    kinds = [draw(st.sampled_from([usual, usual, usual, "memfd", "eventfd"])) for _ in range(nfds)]
    return int(request), int(flags), payload, kinds


# ---- the machine ----------------------------------------------------------------------------


def make_fd(kind: str) -> int:
    if kind == "memfd":
        fd = os.memfd_create("vdev-test-region", os.MFD_CLOEXEC)
        os.ftruncate(fd, REGION_SIZE)
        return fd
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class HandlerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.hooks = FakeHooks()
        self.handler = BackendHandler(self.hooks)
        self.session = BackendSession()
        self.given: set[int] = set()        # fds handed over and not yet seen closed
        self.failures = FailureLog()
        self._old_level = log.level
        log.setLevel(logging.DEBUG)
        log.addHandler(self.failures)

    # -- sending one request and checking it ---------------------------------------------------

    def held_fds(self) -> list[int]:
        held: list[int] = []
        for v in self.handler.vrings:
            held += [fd for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None]
        held += [r.fd for r in self.handler.state.regions]
        if self.handler.backend_fd is not None:
            held.append(self.handler.backend_fd)
        return held

    def check_fds(self) -> None:
        held = self.held_fds()
        assert len(held) == len(set(held)), f"one fd held twice: {sorted(held)}"
        for fd in held:
            assert fd in self.given, f"handler holds fd {fd}, which it was never given (or already closed)"
            assert fd_open(fd), f"handler holds fd {fd}, but it is closed"
        for fd in self.given - set(held):
            assert not fd_open(fd), f"fd {fd} was given to the handler, is no longer held, still open"
        self.given = set(held)

    def check_rings(self) -> None:
        started = {v.index for v in self.handler.vrings if v.started}
        assert set(self.hooks.started) == started, (sorted(self.hooks.started), sorted(started))
        for v in self.handler.vrings:
            if v.started:
                assert v.num and v.addr is not None
        enabled = {v.index for v in self.handler.vrings if v.enabled}
        assert self.hooks.enabled == enabled, (sorted(self.hooks.enabled), sorted(enabled))
        calls = {v.index: v.call_fd for v in self.handler.vrings if v.call_fd is not None}
        assert self.hooks.call_fds == calls, (self.hooks.call_fds, calls)
        assert self.hooks.memory == self.handler.state.regions
        assert self.hooks.backend_fd == self.handler.backend_fd

    def send(self, request: int, flags: int, payload: bytes, kinds: Sequence[str]) -> None:
        fds = [make_fd(k) for k in kinds]
        # Numbers of fds seen closed may come back for new fds; they are new files.
        self.given |= set(fds)
        started_before = {v.index for v in self.handler.vrings if v.started}
        self.failures.messages.clear()
        self.session.receive_data(encode(request, payload, flags=flags), fds)
        event = self.session.next_event()
        assert isinstance(event, (Message, InvalidMessage))
        assert self.session.next_event() is NEED_DATA

        reply = self.handler.handle(event)       # must never raise

        assert not self.hooks.violations, self.hooks.violations
        known = request in FrontendReq._value2member_map_
        spec = FRONTEND_REQUESTS[FrontendReq(request)] if known else None
        name = FrontendReq(request).name if known else str(request)
        failed = any(m.startswith(f"request {name} failed") for m in self.failures.messages)
        reply_ack = bool(self.handler.acked_protocol_features & ProtocolFeature.REPLY_ACK)
        expect_reply = (spec is not None and spec.reply is not None) or (
            bool(flags & HeaderFlag.NEED_REPLY) and reply_ack)
        assert (reply is not None) == expect_reply, (name, flags, reply, self.failures.messages)
        if isinstance(event, InvalidMessage):
            assert failed, f"invalid {name} failed without a log line: {self.failures.messages}"
        if reply is not None:
            assert reply.fds == ()
            assert len(reply.data) >= HEADER.size
            r_request, r_flags, r_size = HEADER.unpack_from(reply.data)
            body = reply.data[HEADER.size:]
            assert r_request == request
            assert r_flags == HeaderFlag.VERSION_1 | HeaderFlag.REPLY
            assert r_size == len(body)
            if spec is not None and spec.reply is not None:
                parsed = spec.reply.unpack(body)
                self.check_defined_reply(FrontendReq(request), event, parsed, failed, started_before)
            else:
                value = U64.unpack(body).value
                assert value == (1 if failed else 0), (name, value, self.failures.messages)
        self.check_rings()
        self.check_fds()

    def check_defined_reply(self, request: FrontendReq, event: Message | InvalidMessage, parsed: object,
                            failed: bool, started_before: set[int]) -> None:
        if request is FrontendReq.GET_VRING_BASE and not failed:
            assert isinstance(event, Message) and isinstance(parsed, VringState)
            index = event.payload.index
            vring = self.handler.vrings[index]
            assert parsed.index == index
            assert not vring.started and vring.kick_fd is None and vring.call_fd is None
            if index in started_before:
                assert parsed.num == self.hooks.last_stop[index] & 0xFFFF
            else:
                assert parsed.num == vring.base
        if request is FrontendReq.GET_CONFIG:
            assert isinstance(parsed, ConfigSpace)
            if failed:
                assert parsed.size == 0 and parsed.payload == b""
            else:
                assert isinstance(event, Message)
                p = event.payload
                assert parsed.payload == CONFIG_BYTES[p.offset: p.offset + p.size]
        if request is FrontendReq.GET_FEATURES and not failed:
            assert parsed == U64(OFFERED_FEATURES)
        if request is FrontendReq.GET_PROTOCOL_FEATURES and not failed:
            assert parsed == U64(OFFERED_PROTOCOL)

    # -- rules ---------------------------------------------------------------------------------

    @initialize(drop=st.sets(st.sampled_from([f for f in ProtocolFeature if f & OFFERED_PROTOCOL]),
                             max_size=3),
                features=st.sampled_from([None, 0, OFFERED_FEATURES, DEVICE_FEATURES]))
    def handshake(self, drop: set[ProtocolFeature], features: int | None) -> None:
        """Sessions start the way QEMU's do: the offered protocol features less a
        few (REPLY_ACK among them at times), owner, maybe the virtio features."""
        value = OFFERED_PROTOCOL & ~sum(int(f) for f in drop)
        self.send(FrontendReq.GET_FEATURES, 0, b"", [])
        self.send(FrontendReq.GET_PROTOCOL_FEATURES, 0, b"", [])
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, 0, U64(value).pack(), [])
        self.send(FrontendReq.SET_OWNER, 0, b"", [])
        if features is not None:
            self.send(FrontendReq.SET_FEATURES, HeaderFlag.NEED_REPLY, U64(features).pack(), [])

    @rule(msg=message())
    def any_request(self, msg: tuple[int, int, bytes, list[str]]) -> None:
        self.send(*msg)

    @rule(msg=message(st.sampled_from(CORE)))
    def core_request(self, msg: tuple[int, int, bytes, list[str]]) -> None:
        self.send(*msg)

    @rule(slots=st.lists(region_slot, min_size=1, max_size=3, unique=True), need_reply=st.booleans())
    def good_memory(self, slots: list[int], need_reply: bool) -> None:
        table = MemoryTable(tuple(region(s) for s in slots)).pack()
        self.send(FrontendReq.SET_MEM_TABLE, HeaderFlag.NEED_REPLY if need_reply else 0, table,
                  ["memfd"] * len(slots))

    @rule(index=st.sampled_from([0, 1]), size=st.sampled_from([1, 64, 256]), slot=region_slot,
          offset=ring_offset, base=st.integers(0, 0xFFFF), need_reply=st.booleans(),
          in_table=st.integers(0, 4))
    def bring_up_ring(self, index: int, size: int, slot: int, offset: int, base: int,
                      need_reply: bool, in_table: int) -> None:
        """NUM, BASE, ADDR, CALL, KICK: the way a ring starts (it may still be refused)."""
        f = HeaderFlag.NEED_REPLY if need_reply else 0
        regions = self.handler.state.regions
        if regions and in_table:      # mostly inside the memory table, when there is one
            start = regions[slot % len(regions)].region.userspace_addr
        else:
            start = VA_BASE + slot * 0x10_0000
        va = start + offset
        self.send(FrontendReq.SET_VRING_NUM, f, VringState(index, size).pack(), [])
        self.send(FrontendReq.SET_VRING_BASE, f, VringState(index, base).pack(), [])
        self.send(FrontendReq.SET_VRING_ADDR, f, VringAddr(index, 0, va, va, va).pack(), [])
        self.send(FrontendReq.SET_VRING_CALL, f, VringFd(index).pack(), ["eventfd"])
        self.send(FrontendReq.SET_VRING_KICK, f, VringFd(index).pack(), ["eventfd"])

    @rule(index=st.sampled_from([0, 1]), kind=st.sampled_from(["eventfd", "memfd", None]),
          need_reply=st.booleans())
    def replace_kick(self, index: int, kind: str | None, need_reply: bool) -> None:
        """A new kick fd for a ring that may be running (a memfd is refused by the hooks)."""
        self.send(FrontendReq.SET_VRING_KICK, HeaderFlag.NEED_REPLY if need_reply else 0,
                  VringFd(index, kind is None).pack(), [] if kind is None else [kind])

    @rule(index=st.sampled_from([0, 0, 1, 1, 2]), need_reply=st.booleans())
    def stop_ring(self, index: int, need_reply: bool) -> None:
        self.send(FrontendReq.GET_VRING_BASE, HeaderFlag.NEED_REPLY if need_reply else 0,
                  VringState(index, 0).pack(), [])

    @rule()
    def disconnect(self) -> None:
        """The connection ends: close() must release everything, and the handler stays usable."""
        self.close_and_check()
        # The server makes a new handler per connection; going on with this one
        # must be safe too.  The next front-end negotiates everything again.
        self.session = BackendSession()
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, 0, U64(OFFERED_PROTOCOL).pack(), [])
        self.send(FrontendReq.SET_OWNER, 0, b"", [])

    def close_and_check(self) -> None:
        self.handler.close()
        assert not self.hooks.violations, self.hooks.violations
        assert not self.hooks.started
        assert not any(v.started for v in self.handler.vrings)
        assert self.handler.state.regions == [] and self.handler.backend_fd is None
        assert self.held_fds() == []
        leaked = [fd for fd in self.given if fd_open(fd)]
        assert not leaked, f"fds still open after close(): {leaked}"
        self.given = set()
        assert self.hooks.backend_fd is None and self.hooks.memory == [] and not self.hooks.call_fds

    def teardown(self) -> None:
        try:
            self.close_and_check()
        finally:
            log.removeHandler(self.failures)
            log.setLevel(self._old_level)
            self.session.close()
            for fd in list(self.given):      # only if a check failed above
                try:
                    os.close(fd)
                except OSError:
                    pass


TestHandlerStates = HandlerMachine.TestCase
TestHandlerStates.settings = settings(max_examples=200, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.filter_too_much])


# ---- a refused kick-fd replacement, pinned deterministically -----------------------------------------------------


class RefusingKickHooks(FakeHooks):
    def set_vring_kick(self, index: int, fd: int | None) -> None:
        super().set_vring_kick(index, fd)
        if fd is not None and is_file(fd):
            raise OSError(errno.EPERM, "cannot poll a regular file")


def test_kick_replacement_refused_by_hooks_closes_old_fd() -> None:
    hooks = RefusingKickHooks()
    handler = BackendHandler(hooks)
    session = BackendSession()

    def send(request: FrontendReq, payload: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        session.receive_data(encode(request, payload), fds)
        event = session.next_event()
        assert isinstance(event, (Message, InvalidMessage))
        handler.handle(event)

    mem = make_fd("memfd")
    first_kick = make_fd("eventfd")
    second_kick = make_fd("memfd")          # cannot be polled: DeviceRuntime refuses it
    try:
        send(FrontendReq.SET_MEM_TABLE, MemoryTable((region(0),)).pack(), [mem])
        send(FrontendReq.SET_VRING_NUM, VringState(0, 64).pack())
        send(FrontendReq.SET_VRING_ADDR, VringAddr(0, 0, VA_BASE, VA_BASE + 0x1000, VA_BASE + 0x800).pack())
        send(FrontendReq.SET_VRING_KICK, VringFd(0).pack(), [first_kick])
        assert handler.vrings[0].started and handler.vrings[0].kick_fd == first_kick
        send(FrontendReq.SET_VRING_KICK, VringFd(0).pack(), [second_kick])
        held = {handler.vrings[0].kick_fd}
        # Whichever fd the handler kept, the other one must be closed by now.
        for fd in (first_kick, second_kick):
            assert fd in held or not fd_open(fd), f"kick fd {fd} leaked"
    finally:
        handler.close()
        for fd in (mem, first_kick, second_kick):
            try:
                os.close(fd)
            except OSError:
                pass
