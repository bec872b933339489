"""The connection state machine and credit accounting, driven directly (no sockets).

Each test plays the guest with headers it builds and the host side with the
`Connection` methods the muxer calls, and looks at the packets the
connection owes the guest.  The clock is a variable the test moves.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.vsock.connection import (
    BUF_ALLOC,
    CLOSE_TIMEOUT,
    REQUEST_TIMEOUT,
    TO_GUEST_CAP,
    Connection,
    ConnState,
    Violation,
)
from backends.vsock.packet import Header, Op, Shutdown, SockType

GUEST, GPORT, HPORT = 3, 50000, 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def g(op: Op, *, length: int = 0, flags: int = 0, buf_alloc: int = 65536, fwd_cnt: int = 0) -> Header:
    """A packet from the guest on the test connection."""
    return Header(GUEST, 2, GPORT, HPORT, length, SockType.STREAM, op, flags, buf_alloc, fwd_cnt)


def drain(conn: Connection, max_payload: int = 4096) -> Iterator[tuple[Header, bytes]]:
    while conn.has_rx():
        pkt = conn.next_rx(max_payload)
        assert pkt is not None, "has_rx() promised a packet"
        yield pkt


def ops(conn: Connection, max_payload: int = 4096) -> list[str]:
    return [Op(h.op).name for h, _ in drain(conn, max_payload)]


def established(clock: Clock, *, buf_alloc: int = 65536) -> Connection:
    """A host-initiated connection the guest accepted."""
    conn = Connection(local_cid=2, local_port=HPORT, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.LOCAL_INIT, clock=clock)
    conn.greeting = b"OK 1073741824\n"
    assert ops(conn) == ["REQUEST"]
    conn.on_packet(g(Op.RESPONSE, buf_alloc=buf_alloc))
    assert conn.state is ConnState.ESTABLISHED
    conn.on_host_written(len(conn.host_pending()))     # the OK line
    return conn


def test_host_initiated_handshake_writes_the_ok_line_only_after_response(clock: Clock) -> None:
    conn = Connection(local_cid=2, local_port=HPORT, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.LOCAL_INIT, clock=clock)
    conn.greeting = b"OK 1073741824\n"
    [(req, _)] = list(drain(conn))
    assert (req.op, req.src_cid, req.src_port, req.dst_cid, req.dst_port) == (Op.REQUEST, 2, HPORT, GUEST, GPORT)
    assert req.buf_alloc == BUF_ALLOC and req.fwd_cnt == 0
    assert conn.host_pending() == b""
    conn.on_packet(g(Op.RESPONSE))
    assert conn.host_pending() == b"OK 1073741824\n"
    # The greeting is outside the credit count.
    conn.on_host_written(14)
    assert conn.fwd_cnt == 0 and conn.host_pending() == b""


def test_unanswered_request_times_out_with_rst(clock: Clock) -> None:
    conn = Connection(local_cid=2, local_port=HPORT, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.LOCAL_INIT, clock=clock)
    assert ops(conn) == ["REQUEST"]
    clock.now += REQUEST_TIMEOUT
    conn.on_timeout()
    assert ops(conn) == ["RST"]
    assert conn.finished


def test_a_request_never_sent_is_dropped_quietly(clock: Clock) -> None:
    # No rx buffers ever came: the guest never heard of it, so no RST either.
    conn = Connection(local_cid=2, local_port=HPORT, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.LOCAL_INIT, clock=clock)
    clock.now += REQUEST_TIMEOUT
    conn.on_timeout()
    assert conn.finished and not conn.has_rx()


def test_guest_rst_to_our_request_closes_without_reply(clock: Clock) -> None:
    conn = Connection(local_cid=2, local_port=HPORT, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.LOCAL_INIT, clock=clock)
    ops(conn)
    conn.on_packet(g(Op.RST))
    assert conn.finished and ops(conn) == []


def test_data_towards_the_guest_never_exceeds_its_credit(clock: Clock) -> None:
    conn = established(clock, buf_alloc=10000)
    assert conn.host_read_budget() == 10000
    conn.on_host_data(b"x" * 10000)
    assert conn.host_read_budget() == 0
    sent = [(h.op, h.len) for h, _ in drain(conn, 4096)]
    assert sent == [(Op.RW, 4096), (Op.RW, 4096), (Op.RW, 1808)]
    assert conn.peer_credit() == 0 and conn.host_read_budget() == 0
    # The host has more but the guest gave no credit: ask once, not per readiness event.
    conn.on_host_blocked_by_credit()
    conn.on_host_blocked_by_credit()
    assert ops(conn) == ["CREDIT_REQUEST"]
    conn.on_host_blocked_by_credit()
    assert ops(conn) == []
    # The guest read 6000 bytes and says so: exactly that much may follow.
    conn.on_packet(g(Op.CREDIT_UPDATE, buf_alloc=10000, fwd_cnt=6000))
    assert conn.host_read_budget() == 6000


def test_read_ahead_is_capped_even_with_a_large_credit(clock: Clock) -> None:
    conn = established(clock, buf_alloc=4 << 20)
    assert conn.host_read_budget() == TO_GUEST_CAP
    conn.on_host_data(b"y" * TO_GUEST_CAP)
    assert conn.host_read_budget() == 0
    assert not conn.credit_limited()        # blocked by the cap, not by the guest


def test_guest_data_beyond_our_credit_resets_the_connection(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=BUF_ALLOC), [b"a" * BUF_ALLOC])
    assert conn.state is ConnState.ESTABLISHED and len(conn.host_pending()) == BUF_ALLOC
    conn.on_packet(g(Op.RW, length=1), [b"b"])
    assert conn.violation is Violation.CREDIT_OVERFLOW
    assert ops(conn) == ["RST"] and conn.finished


def test_credit_update_volunteered_when_the_guest_runs_low(clock: Clock) -> None:
    conn = established(clock)
    chunk = 64 * 1024
    conn.on_packet(g(Op.RW, length=chunk), [b"a" * chunk])
    conn.on_host_written(chunk)
    assert ops(conn) == []                   # the guest still sees 192 KiB free
    for _ in range(2):
        conn.on_packet(g(Op.RW, length=chunk), [b"a" * chunk])
    conn.on_host_written(2 * chunk)          # it now believes 64 KiB free: tell it 256
    [(upd, _)] = list(drain(conn))
    assert (upd.op, upd.fwd_cnt, upd.buf_alloc) == (Op.CREDIT_UPDATE, 3 * chunk, BUF_ALLOC)


def test_credit_request_is_answered_once_however_often_asked(clock: Clock) -> None:
    conn = established(clock)
    for _ in range(1000):
        conn.on_packet(g(Op.CREDIT_REQUEST))
    assert ops(conn) == ["CREDIT_UPDATE"]


def test_counters_wrap_at_32_bits(clock: Clock) -> None:
    conn = established(clock, buf_alloc=8192)
    conn.tx_cnt = 0xFFFF_FF00
    conn.on_packet(g(Op.CREDIT_UPDATE, buf_alloc=8192, fwd_cnt=0xFFFF_FF00))
    conn.on_host_data(b"z" * 8192)
    sent = sum(h.len for h, _ in drain(conn, 4096))
    assert sent == 8192 and conn.tx_cnt == 0x1F00
    assert conn.peer_credit() == 0
    conn.on_packet(g(Op.CREDIT_UPDATE, buf_alloc=8192, fwd_cnt=0x1F00))
    assert conn.peer_credit() == 8192
    # Our own side wraps too.
    conn.rx_cnt = conn.fwd_cnt = conn.last_fwd_cnt_sent = 0xFFFF_FFFF
    conn.on_packet(g(Op.RW, length=10, buf_alloc=8192, fwd_cnt=0x1F00), [b"0123456789"])
    conn.on_host_written(10)
    assert conn.fwd_cnt == 9 and conn.state is ConnState.ESTABLISHED


def test_guest_close_flushes_to_the_host_then_rst(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=5), [b"hello"])
    conn.on_packet(g(Op.SHUTDOWN, flags=Shutdown.BOTH))
    assert conn.state is ConnState.CLOSING and ops(conn) == []
    assert conn.host_pending() == b"hello"
    conn.on_host_written(5)
    assert ops(conn) == ["RST"] and conn.finished


def test_guest_close_that_never_flushes_ends_by_timer(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=5), [b"hello"])
    conn.on_packet(g(Op.SHUTDOWN, flags=Shutdown.BOTH))
    clock.now += CLOSE_TIMEOUT
    conn.on_timeout()
    assert ops(conn) == ["RST"] and conn.finished


def test_host_half_close_lets_the_guest_keep_sending(clock: Clock) -> None:
    conn = established(clock)
    conn.on_host_data(b"last words")
    conn.on_host_eof(hangup=False)
    got = [(Op(h.op).name, h.flags, d) for h, d in drain(conn)]
    assert got == [("RW", 0, b"last words"), ("SHUTDOWN", Shutdown.SEND, b"")]
    assert conn.state is ConnState.ESTABLISHED
    conn.on_packet(g(Op.RW, length=5), [b"reply"])
    assert conn.host_pending() == b"reply"
    conn.on_host_written(5)
    conn.on_packet(g(Op.SHUTDOWN, flags=Shutdown.SEND))
    # Both directions are done: we say so with both flags and wait for the guest's RST.
    assert conn.state is ConnState.CLOSING and conn.wants_shut_write()
    conn.on_shut_write()
    [(shut, _)] = list(drain(conn))
    assert (shut.op, shut.flags) == (Op.SHUTDOWN, Shutdown.BOTH)
    conn.on_packet(g(Op.RST))
    assert conn.finished and ops(conn) == []


def test_guest_half_close_shuts_the_host_write_half_after_the_data(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=3), [b"abc"])
    conn.on_packet(g(Op.SHUTDOWN, flags=Shutdown.SEND))
    assert not conn.wants_shut_write()        # "abc" first
    conn.on_host_written(3)
    assert conn.wants_shut_write()
    conn.on_shut_write()
    assert not conn.wants_shut_write()
    conn.on_host_data(b"answer")
    assert [(Op(h.op).name, d) for h, d in drain(conn)] == [("RW", b"answer")]
    conn.on_packet(g(Op.RW, length=1), [b"!"])  # it promised not to send
    assert conn.violation is Violation.DATA_AFTER_SHUTDOWN and ops(conn) == ["RST"]


def test_host_hangup_asks_the_guest_to_close_and_waits_for_its_rst(clock: Clock) -> None:
    conn = established(clock)
    conn.on_host_data(b"bye")
    conn.on_host_eof(hangup=True)
    got = [(Op(h.op).name, h.flags, d) for h, d in drain(conn)]
    assert got == [("RW", 0, b"bye"), ("SHUTDOWN", Shutdown.BOTH, b"")]
    assert conn.state is ConnState.CLOSING and not conn.finished
    conn.on_packet(g(Op.RW, length=2), [b"xx"])   # in flight: nobody will read it
    assert conn.host_pending() == b"" and conn.violation is None
    conn.on_packet(g(Op.RST))
    assert conn.finished and ops(conn) == []


def test_host_hangup_without_guest_answer_ends_by_timer(clock: Clock) -> None:
    conn = established(clock)
    conn.on_host_eof(hangup=True)
    assert ops(conn) == ["SHUTDOWN"]
    clock.now += CLOSE_TIMEOUT
    conn.on_timeout()
    assert ops(conn) == ["RST"] and conn.finished


def test_guest_initiated_connection_answers_after_accept(clock: Clock) -> None:
    conn = Connection(local_cid=2, local_port=4000, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.PEER_INIT, clock=clock, peer_buf_alloc=65536)
    assert ops(conn) == []
    conn.accept()
    [(resp, _)] = list(drain(conn))
    assert (resp.op, resp.src_port, resp.dst_port) == (Op.RESPONSE, 4000, GPORT)
    assert conn.host_read_budget() == 65536


def test_sibling_that_never_accepts_times_out(clock: Clock) -> None:
    conn = Connection(local_cid=9, local_port=4000, peer_cid=GUEST, peer_port=GPORT,
                      state=ConnState.PEER_INIT, clock=clock, peer_buf_alloc=65536)
    conn.on_packet(g(Op.RW, length=1), [b"x"])    # no data before RESPONSE
    assert conn.violation is Violation.UNEXPECTED_OP
    assert ops(conn) == ["RST"]


@pytest.mark.parametrize("op", [Op.REQUEST, Op.RESPONSE])
def test_handshake_ops_on_a_live_connection_reset_it(clock: Clock, op: Op) -> None:
    conn = established(clock)
    conn.on_packet(g(op))
    assert conn.violation is Violation.UNEXPECTED_OP and ops(conn) == ["RST"]


def test_host_error_resets(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=4), [b"data"])
    conn.on_host_error()
    assert conn.host_pending() == b"" and ops(conn) == ["RST"] and conn.finished


def test_data_owed_to_a_slow_guest_after_a_hangup_is_never_cut_short(clock: Clock) -> None:
    conn = established(clock, buf_alloc=4096)
    conn.on_host_data(b"d" * 4096)
    assert [h.len for h, _ in drain(conn)] == [4096]
    conn.to_guest += b"e" * 1000                 # read before the host hung up
    conn.on_host_eof(hangup=True)
    assert conn.state is ConnState.CLOSING and conn.deadline is None
    clock.now += 10 * CLOSE_TIMEOUT              # the guest takes its time reading
    conn.on_timeout()
    assert conn.state is ConnState.CLOSING
    conn.on_packet(g(Op.CREDIT_UPDATE, buf_alloc=4096, fwd_cnt=4096))
    got = [(Op(h.op).name, len(d)) for h, d in drain(conn)]
    assert got == [("RW", 1000), ("SHUTDOWN", 0)]
    assert conn.deadline == clock.now + CLOSE_TIMEOUT     # now the guest owes the RST


def test_a_host_still_reading_keeps_a_closing_connection_alive(clock: Clock) -> None:
    conn = established(clock)
    conn.on_packet(g(Op.RW, length=3000), [b"x" * 3000])
    conn.on_packet(g(Op.SHUTDOWN, flags=Shutdown.BOTH))
    for _ in range(5):
        clock.now += CLOSE_TIMEOUT - 1
        conn.on_host_written(500)                # slow, but moving
        conn.on_timeout()
        assert conn.state is ConnState.CLOSING
    conn.on_host_written(500)
    assert ops(conn) == ["RST"]
