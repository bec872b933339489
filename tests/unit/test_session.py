"""The sans-IO session: framing, fds by stream offset, fatal vs non-fatal errors."""

from __future__ import annotations

import array
import os
import socket
import struct
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost_user.errors import ProtocolError
from vhost_user.messages import (
    HEADER,
    BackendReq,
    ConfigSpace,
    Empty,
    FrontendReq,
    HeaderFlag,
    MemoryRegion,
    MemoryTable,
    U64,
    VringAddr,
    VringFd,
    VringState,
)
from vhost_user.server import recv_with_fds
from vhost_user.session import (
    NEED_DATA,
    BackendChannelSession,
    BackendSession,
    FrontendSession,
    InvalidMessage,
    Message,
    encode,
)

V1 = int(HeaderFlag.VERSION_1)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def make_fds():
    """Factory of real fds (memfds of distinct sizes); closes leftovers at the end."""
    made: list[int] = []

    def make(n: int = 1) -> list[int]:
        out = []
        for _ in range(n):
            fd = os.memfd_create("vdev-test", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096 * (len(made) + 1))   # the size tells the fds apart
            made.append(fd)
            out.append(fd)
        return out

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def drain(session: BackendSession) -> list[Message | InvalidMessage]:
    out = []
    while (ev := session.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def kick(index: int) -> bytes:
    return encode(FrontendReq.SET_VRING_KICK, VringFd(index).pack())


def call(index: int) -> bytes:
    return encode(FrontendReq.SET_VRING_CALL, VringFd(index).pack())


ADDR = VringAddr(0, 0, 0x1000, 0x3000, 0x2000)


# -- framing ------------------------------------------------------------------------


def test_message_split_byte_by_byte() -> None:
    stream = (encode(FrontendReq.GET_FEATURES) + encode(FrontendReq.SET_FEATURES, U64(0x1_4000_0000).pack())
              + encode(FrontendReq.SET_VRING_ADDR, ADDR.pack()))
    s = BackendSession()
    events = []
    ends = []
    for i, byte in enumerate(stream):
        s.receive_data(bytes([byte]))
        while (ev := s.next_event()) is not NEED_DATA:
            events.append(ev)
            ends.append(i + 1)
    assert events == [
        Message(FrontendReq.GET_FEATURES, V1, Empty()),
        Message(FrontendReq.SET_FEATURES, V1, U64(0x1_4000_0000)),
        Message(FrontendReq.SET_VRING_ADDR, V1, ADDR),
    ]
    # each message appears exactly when its last byte arrives, not before
    assert ends == [12, 12 + 20, 12 + 20 + 52]


def test_several_messages_in_one_chunk() -> None:
    s = BackendSession()
    s.receive_data(encode(FrontendReq.SET_OWNER) + encode(FrontendReq.SET_VRING_NUM, VringState(1, 64).pack())
                   + encode(FrontendReq.GET_QUEUE_NUM, flags=HeaderFlag.NEED_REPLY)
                   + encode(FrontendReq.SET_VRING_BASE)[:5])
    assert drain(s) == [
        Message(FrontendReq.SET_OWNER, V1, Empty()),
        Message(FrontendReq.SET_VRING_NUM, V1, VringState(1, 64)),
        Message(FrontendReq.GET_QUEUE_NUM, V1 | HeaderFlag.NEED_REPLY, Empty()),
    ]
    assert s.next_event() is NEED_DATA
    assert s._framer.buffered == 5


def test_payload_of_max_size_waits_for_all_bytes() -> None:
    s = BackendSession()
    s.receive_data(HEADER.pack(FrontendReq.SET_CONFIG, V1, 4096) + bytes(4095))
    assert s.next_event() is NEED_DATA        # 4096 is legal: not fatal, just incomplete
    s.receive_data(b"\0")
    ev = s.next_event()
    assert isinstance(ev, InvalidMessage)     # ConfigSpace size 0 with 4084 payload bytes
    assert ev.error.value == (0, 4084)


# -- fds ----------------------------------------------------------------------------


def test_fds_in_separate_chunks(make_fds) -> None:
    k, c = make_fds(2)
    s = BackendSession()
    s.receive_data(kick(0), [k])
    (m1,) = drain(s)
    s.receive_data(call(0), [c])
    (m2,) = drain(s)
    assert (m1.request, m1.fds) == (FrontendReq.SET_VRING_KICK, (k,))
    assert (m2.request, m2.fds) == (FrontendReq.SET_VRING_CALL, (c,))


def test_two_messages_with_fds_buffered_before_decoding(make_fds) -> None:
    k, c = make_fds(2)
    s = BackendSession()
    s.receive_data(kick(0), [k])
    s.receive_data(call(0), [c])
    m1, m2 = drain(s)
    assert (m1.request, m1.fds) == (FrontendReq.SET_VRING_KICK, (k,))
    assert (m2.request, m2.fds) == (FrontendReq.SET_VRING_CALL, (c,))


def test_fds_glued_behind_an_fdless_message(make_fds) -> None:
    # One read returning [SET_VRING_ADDR][SET_VRING_KICK] with the kick's fd: the
    # fd belongs to the message holding the last byte of the read.
    (k,) = make_fds(1)
    s = BackendSession()
    s.receive_data(encode(FrontendReq.SET_VRING_ADDR, ADDR.pack()) + kick(0), [k])
    m1, m2 = drain(s)
    assert (m1.request, m1.fds) == (FrontendReq.SET_VRING_ADDR, ())
    assert (m2.request, m2.fds) == (FrontendReq.SET_VRING_KICK, (k,))


def test_fds_with_a_partial_message_and_behind_a_tail(make_fds) -> None:
    k, c = make_fds(2)
    s = BackendSession()
    first, second = kick(1), call(2)
    s.receive_data(first[:7], [k])               # fds arrive with half of their message
    assert s.next_event() is NEED_DATA
    s.receive_data(first[7:] + second, [c])      # the tail of one, then the next with its fd
    m1, m2 = drain(s)
    assert m1.fds == (k,) and m1.payload == VringFd(1)
    assert m2.fds == (c,) and m2.payload == VringFd(2)


def _send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def test_fds_stay_with_their_message_over_a_real_socket(make_fds) -> None:
    """What Linux really delivers when a front-end sends without waiting for acks."""
    k, c = make_fds(2)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        _send(a, encode(FrontendReq.SET_VRING_NUM, VringState(0, 64).pack()))
        _send(a, kick(0), [k])
        _send(a, call(0), [c])
        _send(a, encode(FrontendReq.GET_FEATURES))
        b.setblocking(False)
        s = BackendSession()
        chunks = []
        while True:
            try:
                data, fds = recv_with_fds(b)
            except BlockingIOError:
                break
            chunks.append((len(data), len(fds)))
            s.receive_data(data, fds)
        # The kernel glued SET_VRING_NUM in front of SET_VRING_KICK's bytes and fd.
        assert chunks[0] == (40, 1)
        events = drain(s)
    assert [e.request for e in events] == [FrontendReq.SET_VRING_NUM, FrontendReq.SET_VRING_KICK,
                                           FrontendReq.SET_VRING_CALL, FrontendReq.GET_FEATURES]
    assert [len(e.fds) for e in events] == [0, 1, 1, 0]
    assert os.fstat(events[1].fds[0]).st_size == os.fstat(k).st_size == 4096
    assert os.fstat(events[2].fds[0]).st_size == os.fstat(c).st_size == 8192
    for e in events:
        for fd in e.fds:
            os.close(fd)


# -- fatal errors -----------------------------------------------------------------


@pytest.mark.parametrize("flags,value", [(0x2, 2), (0x0, 0), (0x3, 3)])
def test_bad_version_is_fatal_and_closes_fds(make_fds, flags: int, value: int) -> None:
    f1, f2, f3 = make_fds(3)
    s = BackendSession()
    s.receive_data(HEADER.pack(FrontendReq.SET_VRING_KICK, flags, 8) + VringFd(0).pack(), [f1, f2])
    s.receive_data(kick(1), [f3])                  # buffered behind it
    with pytest.raises(ProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal and ei.value.value == value
    assert ei.value.request == FrontendReq.SET_VRING_KICK
    assert not any(map(fd_open, (f1, f2, f3)))
    with pytest.raises(ProtocolError) as again:    # the stream stays broken
        s.next_event()
    assert again.value is ei.value


@pytest.mark.parametrize("flags", [0x11, 0x8000_0001, 0x9 | 0x100])
def test_reserved_flag_bit_is_fatal(make_fds, flags: int) -> None:
    (f,) = make_fds(1)
    s = BackendSession()
    s.receive_data(HEADER.pack(FrontendReq.SET_VRING_CALL, flags, 8) + VringFd(0).pack(), [f])
    with pytest.raises(ProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal and ei.value.value == hex(flags)
    assert not fd_open(f)


def test_oversized_payload_is_fatal_on_the_header_alone(make_fds) -> None:
    (f,) = make_fds(1)
    s = BackendSession()
    s.receive_data(HEADER.pack(FrontendReq.SET_MEM_TABLE, V1, 4097), [f])   # no payload yet
    with pytest.raises(ProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal and ei.value.value == 4097
    assert not fd_open(f)


def test_reply_flag_to_the_backend_is_fatal(make_fds) -> None:
    f1, f2 = make_fds(2)
    s = BackendSession()
    s.receive_data(encode(FrontendReq.SET_VRING_KICK, VringFd(0).pack(), flags=HeaderFlag.REPLY), [f1])
    s.receive_data(kick(0), [f2])
    with pytest.raises(ProtocolError) as ei:
        s.next_event()
    assert ei.value.fatal and ei.value.value == "0x5"
    assert not fd_open(f1)
    s.close()                                      # the caller drops the connection
    assert not fd_open(f2)


def test_close_releases_buffered_fds(make_fds) -> None:
    f1, f2 = make_fds(2)
    s = BackendSession()
    s.receive_data(kick(0)[:10], [f1])
    s.receive_data(b"", [f2])
    assert s.next_event() is NEED_DATA
    s.close()
    assert not fd_open(f1) and not fd_open(f2)


# -- non-fatal errors -------------------------------------------------------------


def test_unknown_request_is_invalid_and_the_stream_continues(make_fds) -> None:
    (f,) = make_fds(1)
    s = BackendSession()
    s.receive_data(HEADER.pack(99, V1 | HeaderFlag.NEED_REPLY, 4) + b"abcd", [f])
    s.receive_data(encode(FrontendReq.GET_FEATURES))
    bad, good = drain(s)
    assert isinstance(bad, InvalidMessage)
    assert bad.request == 99 and bad.error.value == 99 and not bad.error.fatal
    assert bad.need_reply
    assert not fd_open(f)
    assert good == Message(FrontendReq.GET_FEATURES, V1, Empty())


def test_request_zero_is_unknown() -> None:
    s = BackendSession()
    s.receive_data(HEADER.pack(0, V1, 0))
    (ev,) = drain(s)
    assert isinstance(ev, InvalidMessage) and ev.error.value == 0


def test_kick_with_two_fds_is_invalid(make_fds) -> None:
    f1, f2 = make_fds(2)
    s = BackendSession()
    s.receive_data(kick(0), [f1, f2])
    s.receive_data(encode(FrontendReq.GET_FEATURES))
    bad, good = drain(s)
    assert isinstance(bad, InvalidMessage)
    assert bad.request is FrontendReq.SET_VRING_KICK
    assert bad.error.value == 2 and bad.error.request == "SET_VRING_KICK" and not bad.error.fatal
    assert not fd_open(f1) and not fd_open(f2)
    assert good.request is FrontendReq.GET_FEATURES


def test_mem_table_without_fds_is_invalid() -> None:
    table = MemoryTable((MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0),))
    s = BackendSession()
    s.receive_data(encode(FrontendReq.SET_MEM_TABLE, table.pack()))
    (bad,) = drain(s)
    assert isinstance(bad, InvalidMessage)
    assert bad.request is FrontendReq.SET_MEM_TABLE and bad.error.value == 0


def test_fd_on_a_request_that_takes_none_is_closed(make_fds) -> None:
    (f,) = make_fds(1)
    s = BackendSession()
    s.receive_data(encode(FrontendReq.GET_FEATURES), [f])
    (bad,) = drain(s)
    assert isinstance(bad, InvalidMessage) and bad.error.value == 1
    assert not fd_open(f)


def test_bad_payload_is_invalid_names_request_and_closes_fds(make_fds) -> None:
    (f,) = make_fds(1)
    s = BackendSession()
    s.receive_data(encode(FrontendReq.SET_VRING_KICK, struct.pack("=Q", 0x200)), [f])   # reserved bit 9
    s.receive_data(encode(FrontendReq.SET_VRING_NUM, b"\0" * 7))                          # short
    bad1, bad2 = drain(s)
    assert bad1.error.value == "0x200" and bad1.error.request == "SET_VRING_KICK"
    assert bad2.error.value == 7 and bad2.error.request == "SET_VRING_NUM"
    assert not fd_open(f)


# -- the other directions -------------------------------------------------------------


def test_frontend_session_refuses_a_non_reply() -> None:
    s = FrontendSession()
    s.receive_data(encode(FrontendReq.GET_FEATURES, U64(1).pack()))
    with pytest.raises(ProtocolError) as ei:
        s.next_reply()
    assert ei.value.fatal and ei.value.value == "0x1"


def test_frontend_session_reads_replies() -> None:
    s = FrontendSession()
    s.receive_data(BackendSession.reply(FrontendReq.GET_FEATURES, U64(7).pack()))
    raw = s.next_reply()
    assert (raw.request, raw.flags, raw.data) == (1, 0x5, U64(7).pack())


def test_backend_channel_session_decodes_backend_requests() -> None:
    s = BackendChannelSession()
    s.receive_data(encode(BackendReq.CONFIG_CHANGE_MSG, flags=HeaderFlag.NEED_REPLY)
                   + encode(BackendReq.VRING_CALL, VringState(1, 0).pack()) + HEADER.pack(11, V1, 0))
    a, b, c = s.next_event(), s.next_event(), s.next_event()
    assert a == Message(BackendReq.CONFIG_CHANGE_MSG, V1 | HeaderFlag.NEED_REPLY, Empty())
    assert b == Message(BackendReq.VRING_CALL, V1, VringState(1, 0))
    assert isinstance(c, InvalidMessage) and c.error.value == 11


# -- property: any split of a valid stream decodes the same ---------------------------

# Fds that can never be open (far above any RLIMIT_NOFILE), so nothing real is closed.
FAKE_FD = 1 << 30


@st.composite
def messages(draw) -> tuple[FrontendReq, bytes, int, object, int]:
    """(request, payload bytes, flags, decoded payload, fd count)"""
    kind = draw(st.sampled_from(["get", "u64", "state", "kick", "nofd", "table", "config"]))
    flags = draw(st.sampled_from([0, int(HeaderFlag.NEED_REPLY)]))
    if kind == "get":
        return FrontendReq.GET_FEATURES, b"", flags, Empty(), 0
    if kind == "u64":
        p = U64(draw(st.integers(0, 2**64 - 1)))
        return FrontendReq.SET_FEATURES, p.pack(), flags, p, 0
    if kind == "state":
        p = VringState(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
        return FrontendReq.SET_VRING_BASE, p.pack(), flags, p, 0
    if kind == "kick":
        p = VringFd(draw(st.integers(0, 255)))
        return FrontendReq.SET_VRING_KICK, p.pack(), flags, p, 1
    if kind == "nofd":
        p = VringFd(draw(st.integers(0, 255)), nofd=True)
        return FrontendReq.SET_VRING_CALL, p.pack(), flags, p, 0
    if kind == "table":
        n = draw(st.integers(1, 8))
        p = MemoryTable(tuple(MemoryRegion(i << 30, draw(st.integers(1, 1 << 30)),
                                           draw(st.integers(0, 1 << 47)), draw(st.integers(0, 1 << 20)))
                              for i in range(n)))
        return FrontendReq.SET_MEM_TABLE, p.pack(), flags, p, n
    data = draw(st.binary(max_size=256))
    offset = draw(st.integers(0, 256 - len(data)))
    p = ConfigSpace(offset, len(data), draw(st.integers(0, 2**32 - 1)), data)
    return FrontendReq.SET_CONFIG, p.pack(), flags, p, 0


@given(msgs=st.lists(messages(), min_size=1, max_size=12), data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_splits_decode_the_same(msgs, data) -> None:
    stream = b""
    starts, ends, expected = [], [], []
    next_fd = FAKE_FD
    for request, payload, flags, decoded, nfds in msgs:
        starts.append(len(stream))
        stream += encode(request, payload, flags=flags)
        ends.append(len(stream))
        fds = tuple(range(next_fd, next_fd + nfds))
        next_fd += nfds
        expected.append(Message(request, flags | V1, decoded, fds))
    cuts = set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20)) if len(stream) > 1 else [])
    # As Linux does: a read that brings a message's fds ends inside that message.
    cuts |= {end for end, m in zip(ends, expected) if m.fds and end < len(stream)}
    bounds = [0, *sorted(cuts), len(stream)]
    s = BackendSession()
    got = []
    for lo, hi in pairwise(bounds):
        fds = [fd for start, m in zip(starts, expected) if lo <= start < hi for fd in m.fds]
        s.receive_data(stream[lo:hi], fds)
        got.extend(drain(s))
    assert got == expected
    assert s._framer.buffered == 0
