"""BackendHandler's protocol state rules, driven through a BackendSession with real fds."""

from __future__ import annotations

import dataclasses

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from vhost_user.errors import ProtocolError, Unsupported
from vhost_user.handler import (
    HANDLER_PROTOCOL_FEATURES,
    MAX_MEM_SLOTS,
    BackendHandler,
    BackendHooks,
    RegionFd,
    Vring,
)
from vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    BackendReq,
    ConfigFlag,
    ConfigSpace,
    FrontendReq,
    HeaderFlag,
    InflightDescription,
    IotlbMsg,
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
from vhost_user.session import NEED_DATA, BackendSession, Framer, RawMessage, encode

P = ProtocolFeature
BIT30 = VHOST_USER_F_PROTOCOL_FEATURES
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29
DEVICE_FEATURES = VERSION_1 | EVENT_IDX | (1 << 3)
ALL_PROTOCOL = HANDLER_PROTOCOL_FEATURES | P.CONFIG


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Started:
    index: int
    num: int
    addr: VringAddr | None
    base: int
    kick_fd: int | None


class RecordingHooks(BackendHooks):
    """Records every call; stop_vring answers from ``next_avail``."""

    def __init__(self, *, num_queues: int = 2, max_queue_size: int = 256,
                 features: int = DEVICE_FEATURES, protocol: ProtocolFeature = P.CONFIG) -> None:
        self._features = features
        self._protocol = protocol
        self._num_queues = num_queues
        self._max = max_queue_size
        self.calls: list[tuple] = []
        self.next_avail: dict[int, int] = {}
        self.memory: list[RegionFd] | None = None
        self.started: list[Started] = []
        self.config = bytes(range(64))
        self.fail_memory = False
        self.fail_start = False
        self.bug: Exception | None = None      # raised by set_config and start_vring: a device bug

    @property
    def features(self) -> int:
        return self._features

    @property
    def protocol_features(self) -> ProtocolFeature:
        return self._protocol

    @property
    def num_queues(self) -> int:
        return self._num_queues

    @property
    def max_queue_size(self) -> int:
        return self._max

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def of(self, name: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == name]

    def set_features(self, features: int) -> None:
        self.calls.append(("set_features", features))

    def set_memory(self, regions: Sequence[RegionFd]) -> None:
        self.calls.append(("set_memory", list(regions)))
        if self.fail_memory:
            raise OSError(22, "mmap refused")
        self.memory = list(regions)

    def start_vring(self, vring: Vring) -> None:
        self.calls.append(("start_vring", vring.index))
        if self.bug is not None:
            raise self.bug
        if self.fail_start:
            raise ProtocolError("ring outside memory", value=vring.index)
        self.started.append(Started(vring.index, vring.num, vring.addr, vring.base, vring.kick_fd))

    def stop_vring(self, index: int) -> int:
        self.calls.append(("stop_vring", index))
        return self.next_avail.get(index, 0)

    def set_vring_enabled(self, index: int, enabled: bool) -> None:
        self.calls.append(("set_vring_enabled", index, enabled))

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self.calls.append(("set_vring_call", index, fd))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self.calls.append(("set_vring_kick", index, fd))

    def get_config(self, offset: int, size: int) -> bytes:
        self.calls.append(("get_config", offset, size))
        if offset + size > len(self.config):
            raise Unsupported("GET_CONFIG", "beyond the config space")
        return self.config[offset: offset + size]

    def set_config(self, offset: int, data: bytes, flags: ConfigFlag) -> None:
        self.calls.append(("set_config", offset, data, flags))
        if self.bug is not None:
            raise self.bug

    def set_status(self, status: int) -> None:
        self.calls.append(("set_status", status))

    def set_backend_channel(self, fd: int | None) -> None:
        self.calls.append(("set_backend_channel", fd))

    def reset(self) -> None:
        self.calls.append(("reset",))


class Wire:
    """A front-end's view of a handler: encode, frame, handle, decode the replies."""

    def __init__(self, hooks: RecordingHooks) -> None:
        self.hooks = hooks
        self.handler = BackendHandler(hooks)
        self.session = BackendSession()

    def send(self, request: FrontendReq | int, payload: object = b"", fds: Sequence[int] = (),
             *, need_reply: bool = False) -> list[RawMessage]:
        data = payload if isinstance(payload, bytes) else payload.pack()  # type: ignore[attr-defined]
        self.session.receive_data(encode(request, data, flags=HeaderFlag.NEED_REPLY if need_reply else 0),
                                  list(fds))
        replies = []
        while (ev := self.session.next_event()) is not NEED_DATA:
            reply = self.handler.handle(ev)
            if reply is not None:
                assert reply.fds == ()
                framer = Framer()
                framer.receive_data(reply.data)
                raw = framer.next_raw()
                assert isinstance(raw, RawMessage)
                assert raw.request == int(request)
                assert raw.flags == HeaderFlag.VERSION_1 | HeaderFlag.REPLY
                assert framer.next_raw() is NEED_DATA
                replies.append(raw)
        return replies

    def ack(self, request: FrontendReq | int, payload: object = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY and return the single u64 ack."""
        (reply,) = self.send(request, payload, fds, need_reply=True)
        return U64.unpack(reply.data).value

    def handshake(self, protocol: ProtocolFeature = ALL_PROTOCOL, features: int | None = None) -> None:
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(protocol)))
        assert self.handler.acked_protocol_features == protocol
        self.send(FrontendReq.SET_OWNER)
        if features is not None:
            assert self.ack(FrontendReq.SET_FEATURES, U64(features)) == 0


class Fds:
    """Real fds made by a test, closed at the end if the handler did not."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.made.append(fd)
        return fd

    def memfd(self, size: int = 1 << 20) -> int:
        fd = os.memfd_create("vdev-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.made.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.made:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def fds():
    f = Fds()
    yield f
    f.close()


@pytest.fixture
def hooks() -> RecordingHooks:
    return RecordingHooks()


@pytest.fixture
def wire(hooks: RecordingHooks) -> Wire:
    return Wire(hooks)


@pytest.fixture
def errors(caplog):
    """The error objects the handler logged for failed requests, in order."""
    caplog.set_level(logging.INFO, logger="vhost_user.handler")

    def get() -> list[Exception]:
        return [r.args[1] for r in caplog.records
                if r.name == "vhost_user.handler" and r.msg.startswith("request %s failed")]
    return get


def u64(raw: RawMessage) -> int:
    return U64.unpack(raw.data).value


ADDR0 = VringAddr(0, 0, 0x7F00_0000_0000, 0x7F00_0000_2000, 0x7F00_0000_1000)


def setup_ring(w: Wire, fds: Fds, index: int = 0, *, num: int = 64, base: int = 0) -> int:
    """NUM, BASE, ADDR, KICK (QEMU's order); returns the kick fd."""
    kick = fds.eventfd()
    assert w.ack(FrontendReq.SET_VRING_NUM, VringState(index, num)) == 0
    assert w.ack(FrontendReq.SET_VRING_BASE, VringState(index, base)) == 0
    assert w.ack(FrontendReq.SET_VRING_ADDR, VringAddr(index, 0, ADDR0.desc, ADDR0.used, ADDR0.avail)) == 0
    assert w.ack(FrontendReq.SET_VRING_KICK, VringFd(index), [kick]) == 0
    return kick


# -- features -----------------------------------------------------------------------


def test_get_features_offers_bit_30(wire: Wire) -> None:
    (reply,) = wire.send(FrontendReq.GET_FEATURES)
    assert u64(reply) == DEVICE_FEATURES | BIT30


def test_get_protocol_features_before_set_features(wire: Wire) -> None:
    (reply,) = wire.send(FrontendReq.GET_PROTOCOL_FEATURES)
    assert u64(reply) == int(ALL_PROTOCOL)
    assert P(u64(reply)) & P.REPLY_ACK and P(u64(reply)) & P.CONFIG
    assert not P(u64(reply)) & (P.LOG_SHMFD | P.INFLIGHT_SHMFD | P.SHMEM)


def test_set_features_with_unoffered_bits_fails(wire: Wire, hooks: RecordingHooks, errors) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_FEATURES, U64(VERSION_1 | (1 << 40))) == 1
    assert errors()[-1].value == hex(1 << 40)
    assert wire.handler.acked_features == 0
    assert hooks.of("set_features") == []
    (reply,) = wire.send(FrontendReq.GET_FEATURES)             # still serving
    assert u64(reply) == DEVICE_FEATURES | BIT30
    assert wire.ack(FrontendReq.SET_FEATURES, U64(VERSION_1 | BIT30)) == 0
    assert hooks.of("set_features") == [(VERSION_1,)]          # bit 30 removed for the device


def test_set_protocol_features_with_unoffered_bits_fails(wire: Wire, errors) -> None:
    wire.handshake(P.REPLY_ACK)
    assert wire.ack(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(P.REPLY_ACK | P.LOG_SHMFD))) == 1
    assert errors()[-1].value == hex(int(P.LOG_SHMFD))
    assert wire.handler.acked_protocol_features == P.REPLY_ACK


def test_rings_start_disabled_with_bit_30_and_follow_set_vring_enable(wire: Wire, hooks: RecordingHooks,
                                                                      errors) -> None:
    wire.handshake(features=VERSION_1 | BIT30)
    assert [v.enabled for v in wire.handler.vrings] == [False, False]
    assert hooks.of("set_vring_enabled") == []
    assert wire.ack(FrontendReq.SET_VRING_ENABLE, VringState(1, 1)) == 0
    assert wire.ack(FrontendReq.SET_VRING_ENABLE, VringState(1, 1)) == 0   # no change, no call
    assert [v.enabled for v in wire.handler.vrings] == [False, True]
    assert wire.ack(FrontendReq.SET_VRING_ENABLE, VringState(1, 0)) == 0
    assert [v.enabled for v in wire.handler.vrings] == [False, False]
    assert hooks.of("set_vring_enabled") == [(1, True), (1, False)]
    assert wire.ack(FrontendReq.SET_VRING_ENABLE, VringState(0, 2)) == 1
    assert errors()[-1].value == 2


def test_without_bit_30_set_features_enables_every_ring(wire: Wire, hooks: RecordingHooks) -> None:
    wire.handshake(features=VERSION_1)
    assert [v.enabled for v in wire.handler.vrings] == [True, True]
    assert hooks.of("set_vring_enabled") == [(0, True), (1, True)]


def test_set_features_again_does_not_stop_or_disable_rings(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1)
    setup_ring(wire, fds)
    assert wire.ack(FrontendReq.SET_FEATURES, U64(VERSION_1 | EVENT_IDX)) == 0
    assert wire.handler.vrings[0].started and wire.handler.vrings[0].enabled
    assert hooks.of("stop_vring") == []
    assert hooks.of("set_vring_enabled") == [(0, True), (1, True)]


# -- ring life cycle ----------------------------------------------------------------


def test_kick_starts_the_ring_after_num_and_addr(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1 | BIT30)
    kick = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_NUM, VringState(0, 128)) == 0
    assert wire.ack(FrontendReq.SET_VRING_BASE, VringState(0, 7)) == 0
    assert wire.ack(FrontendReq.SET_VRING_ADDR, ADDR0) == 0
    assert hooks.of("start_vring") == []
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(0), [kick]) == 0
    assert hooks.started == [Started(0, 128, ADDR0, 7, kick)]
    assert wire.handler.vrings[0].started and not wire.handler.vrings[0].enabled
    assert fd_open(kick)


@pytest.mark.parametrize("before", ["num only", "addr only", "nothing"])
def test_kick_before_num_and_addr_fails(wire: Wire, hooks: RecordingHooks, fds: Fds, errors,
                                        before: str) -> None:
    wire.handshake()
    if before == "num only":
        wire.send(FrontendReq.SET_VRING_NUM, VringState(1, 64))
    elif before == "addr only":
        wire.send(FrontendReq.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x3000, 0x2000))
    kick = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(1), [kick]) == 1
    assert errors()[-1].value == 1
    assert hooks.of("start_vring") == []
    assert not wire.handler.vrings[1].started
    assert wire.handler.vrings[1].kick_fd is None
    assert not fd_open(kick)


def test_refused_start_closes_the_kick_fd(wire: Wire, hooks: RecordingHooks, fds: Fds, errors) -> None:
    wire.handshake()
    hooks.fail_start = True
    wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 64))
    wire.send(FrontendReq.SET_VRING_ADDR, ADDR0)
    kick = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(0), [kick]) == 1
    assert errors()[-1].value == 0
    assert not wire.handler.vrings[0].started
    assert not fd_open(kick)


def test_get_vring_base_stops_the_ring_and_drops_its_fds(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1 | BIT30)
    kick = setup_ring(wire, fds, 0, base=3)
    call = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(0), [call]) == 0
    hooks.next_avail[0] = 0x1234
    replies = wire.send(FrontendReq.GET_VRING_BASE, VringState(0, 0), need_reply=True)
    assert len(replies) == 1                                  # its own reply, no extra ack
    assert VringState.unpack(replies[0].data) == VringState(0, 0x1234)
    assert hooks.of("stop_vring") == [(0,)]
    assert hooks.of("set_vring_call")[-1] == (0, None)
    assert not fd_open(kick) and not fd_open(call)
    v = wire.handler.vrings[0]
    assert not v.started and v.kick_fd is None and v.call_fd is None
    # stopping again: the hook is not asked twice, the saved index is answered
    (again,) = wire.send(FrontendReq.GET_VRING_BASE, VringState(0, 0))
    assert VringState.unpack(again.data) == VringState(0, 0x1234)
    assert hooks.of("stop_vring") == [(0,)]


def test_get_vring_base_of_a_ring_never_started(wire: Wire, hooks: RecordingHooks) -> None:
    wire.handshake()
    wire.send(FrontendReq.SET_VRING_BASE, VringState(1, 42))
    (reply,) = wire.send(FrontendReq.GET_VRING_BASE, VringState(1, 0))
    assert VringState.unpack(reply.data) == VringState(1, 42)
    assert hooks.of("stop_vring") == []


def test_ring_restarts_after_get_vring_base(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1)
    setup_ring(wire, fds, 0)
    hooks.next_avail[0] = 9
    wire.send(FrontendReq.GET_VRING_BASE, VringState(0, 0))
    kick2 = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(0), [kick2]) == 0
    assert hooks.started[-1] == Started(0, 64, VringAddr(0, 0, ADDR0.desc, ADDR0.used, ADDR0.avail), 9, kick2)


@pytest.mark.parametrize("num", [0, 3, 100, 512, 1 << 16])
def test_set_vring_num_rejects(wire: Wire, errors, num: int) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_VRING_NUM, VringState(0, num)) == 1
    assert errors()[-1].value == num
    assert wire.handler.vrings[0].num == 0


@pytest.mark.parametrize("num", [1, 2, 256])
def test_set_vring_num_accepts_powers_of_two_up_to_max(wire: Wire, num: int) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_VRING_NUM, VringState(0, num)) == 0
    assert wire.handler.vrings[0].num == num


def test_queue_size_is_capped_at_32768_even_if_the_device_allows_more(errors) -> None:
    w = Wire(RecordingHooks(max_queue_size=1 << 16))
    w.handshake()
    assert w.ack(FrontendReq.SET_VRING_NUM, VringState(0, 32768)) == 0
    assert w.ack(FrontendReq.SET_VRING_NUM, VringState(0, 65536)) == 1
    assert errors()[-1].value == 65536


@pytest.mark.parametrize("request_,payload", [
    (FrontendReq.SET_VRING_NUM, VringState(2, 64)),
    (FrontendReq.SET_VRING_BASE, VringState(7, 0)),
    (FrontendReq.SET_VRING_ADDR, VringAddr(2, 0, 0x1000, 0x3000, 0x2000)),
    (FrontendReq.SET_VRING_ENABLE, VringState(200, 1)),
    (FrontendReq.SET_VRING_CALL, VringFd(2, nofd=True)),
])
def test_ring_index_out_of_range_is_named(wire: Wire, errors, request_: FrontendReq, payload: object) -> None:
    wire.handshake()
    assert wire.ack(request_, payload) == 1
    err = errors()[-1]
    assert isinstance(err, ProtocolError)
    assert err.value == payload.index                          # type: ignore[attr-defined]
    assert err.request == request_.name


def test_ring_index_out_of_range_with_an_fd_closes_it(wire: Wire, fds: Fds, errors) -> None:
    wire.handshake()
    kick = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(5), [kick]) == 1
    assert errors()[-1].value == 5
    assert not fd_open(kick)


def test_get_vring_base_out_of_range_still_replies(wire: Wire, errors) -> None:
    wire.handshake()
    (reply,) = wire.send(FrontendReq.GET_VRING_BASE, VringState(9, 0))
    assert VringState.unpack(reply.data) == VringState(9, 0)
    assert errors()[-1].value == 9


def test_started_ring_refuses_reconfiguration(wire: Wire, hooks: RecordingHooks, fds: Fds, errors) -> None:
    wire.handshake(features=VERSION_1)
    setup_ring(wire, fds)
    assert wire.ack(FrontendReq.SET_VRING_NUM, VringState(0, 32)) == 1
    assert wire.ack(FrontendReq.SET_VRING_BASE, VringState(0, 1)) == 1
    moved = dataclasses.replace(ADDR0, desc=ADDR0.desc + 0x1000)
    assert wire.ack(FrontendReq.SET_VRING_ADDR, moved) == 1
    assert wire.handler.vrings[0].num == 64 and wire.handler.vrings[0].base == 0
    assert wire.handler.vrings[0].addr == ADDR0


def test_started_ring_takes_a_log_flag_change(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    # QEMU turns used-ring logging on for migration by re-sending the same
    # addresses with VHOST_VRING_F_LOG and the log address.
    wire.handshake(features=VERSION_1)
    setup_ring(wire, fds)
    logged = dataclasses.replace(ADDR0, flags=VHOST_VRING_F_LOG, log=0x4000)
    assert wire.ack(FrontendReq.SET_VRING_ADDR, logged) == 0
    assert wire.handler.vrings[0].addr == logged


def test_split_ring_base_above_16_bits(wire: Wire, errors) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_VRING_BASE, VringState(0, 0x1_0000)) == 1
    assert errors()[-1].value == 0x1_0000


# -- fds of rings ---------------------------------------------------------------------


def test_replaced_call_fd_is_closed(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake()
    c1, c2 = fds.eventfd(), fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(1), [c1]) == 0   # QEMU's early placeholder
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(1), [c2]) == 0
    assert not fd_open(c1) and fd_open(c2)
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(1, nofd=True)) == 0
    assert not fd_open(c2)
    assert hooks.of("set_vring_call") == [(1, c1), (1, c2), (1, None)]
    assert wire.handler.vrings[1].call_fd is None


def test_replaced_kick_fd_of_a_running_ring_is_closed(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1)
    k1 = setup_ring(wire, fds)
    k2 = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(0), [k2]) == 0
    assert not fd_open(k1) and fd_open(k2)
    assert hooks.of("set_vring_kick") == [(0, k2)]
    assert len(hooks.started) == 1                              # not restarted
    assert wire.handler.vrings[0].kick_fd == k2


def test_replaced_err_fd_is_closed(wire: Wire, fds: Fds) -> None:
    wire.handshake()
    e1, e2 = fds.eventfd(), fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_ERR, VringFd(0), [e1]) == 0
    assert wire.ack(FrontendReq.SET_VRING_ERR, VringFd(0), [e2]) == 0
    assert not fd_open(e1) and fd_open(e2)


def test_nofd_bit_disagreeing_with_fds(wire: Wire, fds: Fds, errors) -> None:
    wire.handshake()
    c = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(0, nofd=True), [c]) == 1
    assert errors()[-1].value == (True, 1)
    assert not fd_open(c)
    assert wire.ack(FrontendReq.SET_VRING_CALL, VringFd(0)) == 1
    assert errors()[-1].value == (False, 0)


# -- REPLY_ACK ------------------------------------------------------------------------


def test_need_reply_gets_zero_on_success_and_one_on_failure(wire: Wire) -> None:
    wire.handshake()
    (ok,) = wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 64), need_reply=True)
    (bad,) = wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 63), need_reply=True)
    assert (ok.request, u64(ok)) == (FrontendReq.SET_VRING_NUM, 0)
    assert (bad.request, u64(bad)) == (FrontendReq.SET_VRING_NUM, 1)


def test_no_reply_without_need_reply(wire: Wire) -> None:
    wire.handshake()
    assert wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 64)) == []
    assert wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 63)) == []     # failed, still silent
    assert wire.send(FrontendReq.SET_LOG_BASE, LogDescription(4096, 0)) == []


def test_no_ack_when_reply_ack_was_not_negotiated(wire: Wire) -> None:
    wire.handshake(P.MQ | P.CONFIG)
    assert wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 64), need_reply=True) == []
    assert wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 63), need_reply=True) == []
    assert wire.handler.vrings[0].num == 64


@pytest.mark.parametrize("request_,payload,expected", [
    (FrontendReq.GET_FEATURES, b"", DEVICE_FEATURES | BIT30),
    (FrontendReq.GET_QUEUE_NUM, b"", 2),
    (FrontendReq.GET_MAX_MEM_SLOTS, b"", MAX_MEM_SLOTS),
    (FrontendReq.GET_STATUS, b"", 0),
])
def test_requests_with_a_reply_never_get_an_extra_ack(wire: Wire, request_: FrontendReq, payload: bytes,
                                                      expected: int) -> None:
    wire.handshake()
    replies = wire.send(request_, payload, need_reply=True)
    assert len(replies) == 1
    assert u64(replies[0]) == expected


def test_invalid_message_with_need_reply_is_acked_as_failure(wire: Wire, fds: Fds) -> None:
    wire.handshake()
    f1, f2 = fds.eventfd(), fds.eventfd()
    (reply,) = wire.send(FrontendReq.SET_VRING_KICK, VringFd(0), [f1, f2], need_reply=True)
    assert u64(reply) == 1
    assert not fd_open(f1) and not fd_open(f2)
    (unknown,) = wire.send(99, b"", need_reply=True)
    assert (unknown.request, u64(unknown)) == (99, 1)


def test_request_needing_an_unnegotiated_protocol_feature_fails(wire: Wire, hooks: RecordingHooks,
                                                                fds: Fds, errors) -> None:
    wire.handshake(P.REPLY_ACK)
    assert wire.ack(FrontendReq.RESET_DEVICE) == 1
    assert hooks.of("reset") == []
    assert isinstance(errors()[-1], ProtocolError) and "RESET_DEVICE" in str(errors()[-1])
    mem = fds.memfd()
    region = MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)
    assert wire.ack(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(region), [mem]) == 1
    assert not fd_open(mem)
    assert hooks.of("set_memory") == []
    (reply,) = wire.send(FrontendReq.GET_QUEUE_NUM)            # MQ not negotiated: failure value
    assert u64(reply) == 1


def test_request_needing_a_feature_we_do_not_offer_is_unsupported(wire: Wire, fds: Fds, errors) -> None:
    wire.handshake()
    f = fds.memfd()
    assert wire.ack(FrontendReq.SET_INFLIGHT_FD, InflightDescription(4096, 0, 1, 64), [f]) == 1
    assert isinstance(errors()[-1], Unsupported)
    assert not fd_open(f)
    (reply,) = wire.send(FrontendReq.GET_INFLIGHT_FD, InflightDescription(0, 0, 1, 64))
    assert InflightDescription.unpack(reply.data) == InflightDescription(0, 0, 0, 0)


def test_unsupported_requests_fail_and_the_handler_keeps_working(wire: Wire, fds: Fds, errors) -> None:
    wire.handshake()
    log_fd = fds.memfd(4096)
    assert wire.ack(FrontendReq.SET_LOG_BASE, LogDescription(4096, 0), [log_fd]) == 1
    assert isinstance(errors()[-1], Unsupported)
    assert not fd_open(log_fd)
    other = fds.eventfd()
    assert wire.ack(FrontendReq.SET_LOG_FD, b"", [other]) == 1
    assert not fd_open(other)
    (iotlb,) = wire.send(FrontendReq.IOTLB_MSG, IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2))
    assert u64(iotlb) == 1                                     # its own reply says "failed"
    assert wire.ack(FrontendReq.SET_VRING_NUM, VringState(0, 64)) == 0
    (features,) = wire.send(FrontendReq.GET_FEATURES)
    assert u64(features) == DEVICE_FEATURES | BIT30


# -- config -----------------------------------------------------------------------------


def test_get_config(wire: Wire) -> None:
    wire.handshake()
    (reply,) = wire.send(FrontendReq.GET_CONFIG, ConfigSpace(4, 8, 0, bytes(8)))
    assert ConfigSpace.unpack(reply.data) == ConfigSpace(4, 8, 0, bytes(range(4, 12)))


def test_get_config_failure_is_a_zero_size_reply(wire: Wire, errors) -> None:
    wire.handshake()
    (reply,) = wire.send(FrontendReq.GET_CONFIG, ConfigSpace(60, 8, 0, bytes(8)), need_reply=True)
    assert reply.data == ConfigSpace(60, 0, 0).pack()
    assert len(reply.data) == 12
    assert isinstance(errors()[-1], Unsupported)


def test_get_config_without_config_negotiated_is_a_zero_size_reply(wire: Wire) -> None:
    wire.handshake(P.REPLY_ACK)
    (reply,) = wire.send(FrontendReq.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)))
    assert ConfigSpace.unpack(reply.data).size == 0


def test_set_config_refuses_rust_vmm_bit_flag_2(wire: Wire, hooks: RecordingHooks, errors) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_CONFIG, ConfigSpace(0, 2, 2, b"xy")) == 1
    assert errors()[-1].value == 2
    assert hooks.of("set_config") == []
    assert wire.ack(FrontendReq.SET_CONFIG, ConfigSpace(0, 2, 0, b"xy")) == 0
    assert wire.ack(FrontendReq.SET_CONFIG, ConfigSpace(8, 1, 1, b"z")) == 0
    assert hooks.of("set_config") == [(0, b"xy", ConfigFlag.FRONTEND), (8, b"z", ConfigFlag.MIGRATION)]


def test_status_round_trip_and_range(wire: Wire, hooks: RecordingHooks, errors) -> None:
    wire.handshake()
    assert wire.ack(FrontendReq.SET_STATUS, U64(0x0F)) == 0
    assert wire.ack(FrontendReq.SET_STATUS, U64(0x100)) == 1
    assert errors()[-1].value == 0x100
    (reply,) = wire.send(FrontendReq.GET_STATUS)
    assert u64(reply) == 0x0F
    assert hooks.of("set_status") == [(0x0F,)]


# -- memory -------------------------------------------------------------------------------


def region(i: int, *, size: int = 1 << 20, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(i << 24, size, 0x7F00_0000_0000 + (i << 24), offset)


def test_mem_table_and_slot_edits_reach_set_memory(wire: Wire, hooks: RecordingHooks, fds: Fds, errors) -> None:
    wire.handshake()
    m0, m1, m2 = fds.memfd(), fds.memfd(), fds.memfd()
    assert wire.ack(FrontendReq.SET_MEM_TABLE, MemoryTable((region(0), region(1))), [m0, m1]) == 0
    assert hooks.memory == [RegionFd(region(0), m0), RegionFd(region(1), m1)]
    assert wire.ack(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(region(2)), [m2]) == 0
    assert hooks.memory == [RegionFd(region(0), m0), RegionFd(region(1), m1), RegionFd(region(2), m2)]

    # overlapping the first region: refused, its fd closed, nothing changes
    m3 = fds.memfd()
    overlapping = MemoryRegion((0 << 24) + 4096, 1 << 20, 0x7E00_0000_0000, 0)
    calls = len(hooks.of("set_memory"))
    assert wire.ack(FrontendReq.ADD_MEM_REG, SingleMemoryRegion(overlapping), [m3]) == 1
    assert errors()[-1].value == hex(4096)
    assert not fd_open(m3)
    assert len(hooks.of("set_memory")) == calls

    # removal matches gpa + userspace address + size, ignores mmap_offset, closes a stray fd
    stray = fds.memfd(4096)
    assert wire.ack(FrontendReq.REM_MEM_REG, SingleMemoryRegion(region(1, offset=0x5000)), [stray]) == 0
    assert hooks.memory == [RegionFd(region(0), m0), RegionFd(region(2), m2)]
    assert not fd_open(stray) and not fd_open(m1)
    assert fd_open(m0) and fd_open(m2)

    # a removal that names no region fails
    assert wire.ack(FrontendReq.REM_MEM_REG, SingleMemoryRegion(region(1))) == 1
    assert errors()[-1].value == (hex(1 << 24), hex(0x7F00_0000_0000 + (1 << 24)), hex(1 << 20))

    # SET_MEM_TABLE replaces everything and closes the fds it dropped
    m4 = fds.memfd()
    assert wire.ack(FrontendReq.SET_MEM_TABLE, MemoryTable((region(4),)), [m4]) == 0
    assert hooks.memory == [RegionFd(region(4), m4)]
    assert not fd_open(m0) and not fd_open(m2) and fd_open(m4)


def test_mem_table_fd_count_must_match_regions(wire: Wire, hooks: RecordingHooks, fds: Fds, errors) -> None:
    wire.handshake()
    m0 = fds.memfd()
    assert wire.ack(FrontendReq.SET_MEM_TABLE, MemoryTable((region(0), region(1))), [m0]) == 1
    assert errors()[-1].value == (2, 1)
    assert not fd_open(m0)
    assert hooks.of("set_memory") == []


def test_refused_memory_keeps_the_old_table(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake()
    m0, m1 = fds.memfd(), fds.memfd()
    assert wire.ack(FrontendReq.SET_MEM_TABLE, MemoryTable((region(0),)), [m0]) == 0
    hooks.fail_memory = True
    assert wire.ack(FrontendReq.SET_MEM_TABLE, MemoryTable((region(1),)), [m1]) == 1
    assert not fd_open(m1) and fd_open(m0)
    assert wire.handler.state.regions == [RegionFd(region(0), m0)]


# -- reset and close ------------------------------------------------------------------


def test_reset_device_stops_rings_keeps_protocol_features(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1 | BIT30)
    kick = setup_ring(wire, fds, 1)
    call, err = fds.eventfd(), fds.eventfd()
    wire.send(FrontendReq.SET_VRING_CALL, VringFd(1), [call])
    wire.send(FrontendReq.SET_VRING_ERR, VringFd(1), [err])
    wire.send(FrontendReq.SET_VRING_ENABLE, VringState(1, 1))
    assert wire.ack(FrontendReq.RESET_DEVICE) == 0
    assert hooks.of("stop_vring") == [(1,)]
    assert hooks.of("reset") == [()]
    assert not any(map(fd_open, (kick, call, err)))
    assert wire.handler.acked_features == 0
    assert wire.handler.acked_protocol_features == ALL_PROTOCOL
    assert all(not v.started and not v.enabled and v.num == 0 for v in wire.handler.vrings)
    # the session goes on: REPLY_ACK still in force, ring can be set up again
    assert wire.ack(FrontendReq.SET_FEATURES, U64(VERSION_1 | BIT30)) == 0
    setup_ring(wire, fds, 1)
    assert len(hooks.started) == 2


def test_reset_owner_only_disables_rings(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1)
    setup_ring(wire, fds, 0)
    assert wire.ack(FrontendReq.RESET_OWNER) == 0
    assert [v.enabled for v in wire.handler.vrings] == [False, False]
    assert wire.handler.vrings[0].started
    assert wire.handler.acked_features == VERSION_1


def test_close_releases_every_fd(wire: Wire, hooks: RecordingHooks, fds: Fds) -> None:
    wire.handshake(features=VERSION_1)
    kick = setup_ring(wire, fds, 0)
    call, err, call1 = fds.eventfd(), fds.eventfd(), fds.eventfd()
    wire.send(FrontendReq.SET_VRING_CALL, VringFd(0), [call])
    wire.send(FrontendReq.SET_VRING_ERR, VringFd(0), [err])
    wire.send(FrontendReq.SET_VRING_CALL, VringFd(1), [call1])
    m0, m1 = fds.memfd(), fds.memfd()
    wire.send(FrontendReq.SET_MEM_TABLE, MemoryTable((region(0), region(1))), [m0, m1])
    chan = fds.eventfd()
    assert wire.ack(FrontendReq.SET_BACKEND_REQ_FD, b"", [chan]) == 0
    assert wire.handler.backend_fd == chan
    wire.handler.close()
    assert not any(map(fd_open, (kick, call, err, call1, m0, m1, chan)))
    assert hooks.of("set_memory")[-1] == ([],)
    assert hooks.of("set_backend_channel")[-1] == (None,)
    assert hooks.of("stop_vring") == [(0,)]
    assert wire.handler.acked_protocol_features == P(0)


def test_backend_channel_replaced_and_requests_encoded(wire: Wire, fds: Fds) -> None:
    wire.handshake()
    with pytest.raises(Unsupported):
        wire.handler.backend_request(BackendReq.CONFIG_CHANGE_MSG)
    c1, c2 = fds.eventfd(), fds.eventfd()
    wire.send(FrontendReq.SET_BACKEND_REQ_FD, b"", [c1])
    wire.send(FrontendReq.SET_BACKEND_REQ_FD, b"", [c2])
    assert not fd_open(c1) and fd_open(c2)
    data, need_ack = wire.handler.backend_request(BackendReq.CONFIG_CHANGE_MSG)
    assert need_ack
    assert data == bytes.fromhex("02000000 09000000 00000000".replace(" ", ""))


def test_get_queue_num_and_max_mem_slots(wire: Wire) -> None:
    wire.handshake()
    assert [u64(r) for r in wire.send(FrontendReq.GET_QUEUE_NUM)] == [2]
    assert [u64(r) for r in wire.send(FrontendReq.GET_MAX_MEM_SLOTS)] == [509]


def test_a_bug_in_a_hook_fails_only_that_request(wire: Wire, hooks: RecordingHooks, fds: Fds, errors) -> None:
    wire.handshake(features=VERSION_1)
    hooks.bug = KeyError("device bug")
    assert wire.ack(FrontendReq.SET_CONFIG, ConfigSpace(0, 1, 0, b"x")) == 1
    assert "KeyError" in str(errors()[-1])
    wire.send(FrontendReq.SET_VRING_NUM, VringState(0, 64))
    wire.send(FrontendReq.SET_VRING_ADDR, ADDR0)
    kick = fds.eventfd()
    assert wire.ack(FrontendReq.SET_VRING_KICK, VringFd(0), [kick]) == 1
    assert not wire.handler.vrings[0].started and not fd_open(kick)
    hooks.bug = None
    assert wire.ack(FrontendReq.SET_CONFIG, ConfigSpace(0, 1, 0, b"x")) == 0
    setup_ring(wire, fds, 0)
    assert wire.handler.vrings[0].started
