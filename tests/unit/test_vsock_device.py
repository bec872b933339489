"""virtio-vsock in-process: VsockDevice served over vhost-user, a guest stack on the rings.

Every test goes through the real stack: a Unix vhost-user socket, memfd
guest memory, split rings with EVENT_IDX, and `backends.vsock.testing.
VsockGuest` playing the Linux driver (rx buffers of 4 KiB, credit updates,
RST for unknown ports).  The host side is real Unix sockets, as host
programs use them: ``CONNECT <port>`` on ``--uds-path``, listeners on
``<uds-path>_<port>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backends.vsock import control_handlers
from backends.vsock.connection import BUF_ALLOC, TO_GUEST_CAP
from backends.vsock.device import VsockDevice
from backends.vsock.muxer import ERROR_CAUSES, raise_nofile_limit
from backends.vsock.packet import HEADER_SIZE, Header, Op, Shutdown, SockType
from backends.vsock.testing import GuestStream, VsockGuest, vsock_pair
from vdev.control import ControlServer, control_request
from vdev.testing import Buffer

MiB = 1 << 20
CID = 3


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="vs-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def guest_on(short_dir: str, *, cid: int = CID, events: int = 0, **kwargs: object
                   ) -> AsyncIterator[tuple[VsockDevice, VsockGuest, str]]:
    uds = os.path.join(short_dir, f"v{cid}.sock")
    device = VsockDevice(cid, uds, **kwargs)  # type: ignore[arg-type]
    async with vsock_pair(device, events=events) as guest:
        yield device, guest, uds


async def host_connect(uds: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A host program's side of the hybrid handshake; returns the reply line (b"" if closed)."""
    reader, writer = await asyncio.open_unix_connection(uds, limit=4 * MiB)
    writer.write(b"CONNECT %d\n" % port)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    return reader, writer, line


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def the_connection(device: VsockDevice):  # type: ignore[no-untyped-def]
    (link,) = device.muxer.links.values()
    return link.conn


# -- the device as the driver sees it -------------------------------------------------------------

async def test_config_space_features_and_queues(short_dir: str) -> None:
    async with guest_on(short_dir, cid=1234567) as (_device, guest, _):
        vm = guest.vm
        assert len(vm.queues) == 3
        cfg = await vm.fe.get_config(0, 8)
        assert struct.unpack("<Q", cfg) == (1234567,)
        assert vm.features & 1                       # VIRTIO_VSOCK_F_STREAM
        assert vm.features & (1 << 32)               # VERSION_1


# -- host → guest ---------------------------------------------------------------------------------

async def test_host_connects_to_a_guest_listener_and_data_flows_both_ways(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(1234)
        reader, writer, line = await host_connect(uds, 1234)
        assert line.startswith(b"OK ") and line.endswith(b"\n")
        host_port = int(line.split()[1])
        stream = await asyncio.wait_for(accepted.get(), 5)
        # The guest sees the connection come from the host (CID 2) and the port in the OK line.
        assert (stream.peer_cid, stream.peer_port) == (2, host_port)
        assert host_port >= 1 << 30
        down, up = os.urandom(3 * MiB + 17), os.urandom(2 * MiB + 5)

        async def host_side() -> bytes:
            writer.write(down)
            await writer.drain()
            writer.write_eof()                       # half-close: the guest can still answer
            return await reader.readexactly(len(up))

        host = asyncio.create_task(host_side())
        got = await stream.recv_all()
        assert sha(got) == sha(down)
        await stream.send(up)
        assert sha(await asyncio.wait_for(host, 30)) == sha(up)
        await stream.close()
        assert await reader.read() == b""            # torn down on the host side too
        writer.close()
        await until(lambda: not device.muxer.links)
        assert guest.violations == []
        assert all(v == 0 for v in device.muxer.errors.values()), device.muxer.errors


async def test_port_nobody_listens_on_closes_the_host_socket(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        _reader, writer, line = await host_connect(uds, 999)
        assert line == b""                           # closed, no OK line
        assert guest.received["REQUEST"] == 1        # ... after the guest's RST
        assert [h.op for h in guest.orphans] == [Op.REQUEST]
        writer.close()
        await until(lambda: not device.muxer.links)


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT abc\n", b"HELLO 5\n", b"CONNECT 99999999999\n",
                                  b"CONNECT " + b"1" * 200])
async def test_a_bad_connect_line_closes_the_socket_and_is_counted(short_dir: str, line: bytes) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        reader, writer = await asyncio.open_unix_connection(uds)
        writer.write(line)
        await writer.drain()
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass                 # closed with the rest of the line unread
        writer.close()
        assert device.muxer.errors["bad_connect_line"] == 1
        assert guest.received["REQUEST"] == 0


async def test_connect_line_is_case_insensitive_and_data_may_follow_it_at_once(short_dir: str) -> None:
    async with guest_on(short_dir) as (_device, guest, uds):
        accepted = guest.listen(77)
        reader, writer = await asyncio.open_unix_connection(uds)
        writer.write(b"connect 77\nearly bytes")       # no wait for OK
        await writer.drain()
        assert (await reader.readline()).startswith(b"OK ")
        stream = await asyncio.wait_for(accepted.get(), 5)
        assert await stream.recv_exactly(11) == b"early bytes"
        writer.close()


# -- guest → host -----------------------------------------------------------------------------------

async def test_guest_connects_to_the_host_socket_of_its_port(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()               # until the guest's SHUTDOWN(SEND)
            writer.write(sha(data).encode())
            await writer.drain()
            writer.close()
            got.set_result(data)

        server = await asyncio.start_unix_server(handler, f"{uds}_5000")
        try:
            stream = await guest.connect(5000)
            payload = os.urandom(MiB + 3)
            await stream.send(payload)
            stream.shutdown(Shutdown.SEND)           # no more from the guest
            assert (await stream.recv_all()).decode() == sha(payload)
            assert sha(await got) == sha(payload)
            await until(lambda: stream.state == "closed")
            await until(lambda: not device.muxer.links)
        finally:
            server.close()
        assert device.muxer.stats["guest_connects"] == 1 and guest.violations == []


async def test_guest_connect_to_a_missing_host_socket_gets_rst(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, _uds):
        with pytest.raises(ConnectionRefusedError):
            await guest.connect(4444)
        assert device.muxer.errors["connect_failed"] == 1
        assert not device.muxer.links


# -- credit ------------------------------------------------------------------------------------------

async def test_a_guest_that_does_not_read_stalls_the_host_writer_then_resumes(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(1234, buf_alloc=64 * 1024, auto_credit=False)
        _reader, writer, _line = await host_connect(uds, 1234)
        stream = await asyncio.wait_for(accepted.get(), 5)
        data = os.urandom(4 * MiB)

        async def host_side() -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        host = asyncio.create_task(host_side())
        # The device sends exactly the guest's credit, then waits and asks for more.
        await until(lambda: len(stream.inbox) == 64 * 1024)
        await until(lambda: guest.received["CREDIT_REQUEST"] >= 1)
        await asyncio.sleep(0.3)
        conn = the_connection(device)
        assert len(stream.inbox) == 64 * 1024
        assert len(conn.to_guest) <= TO_GUEST_CAP        # bounded read-ahead ...
        assert not host.done()                           # ... so the host writer blocks
        # The guest reads and grants credit, a window at a time: everything arrives.
        out = bytearray()
        while len(out) < len(data):
            await until(lambda: bool(stream.inbox) or stream.at_eof())
            out += stream.consume(len(stream.inbox))
            stream.grant_credit()
        await asyncio.wait_for(host, 10)
        assert sha(bytes(out)) == sha(data)
        assert guest.violations == []                    # never beyond the credit
        writer.close()


async def test_a_host_that_does_not_read_stalls_the_guest_within_its_credit(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put((reader, writer))

        server = await asyncio.start_unix_server(handler, f"{uds}_6000")
        try:
            stream = await guest.connect(6000)
            reader, writer = await accepted.get()
            data = os.urandom(8 * MiB)
            sender = asyncio.create_task(stream.send(data))
            await until(lambda: stream.peer_credit() == 0, timeout=20)
            await asyncio.sleep(0.3)
            conn = the_connection(device)
            assert not sender.done() and stream.peer_credit() == 0
            assert len(conn.to_host) <= BUF_ALLOC            # the device holds no more than it offered
            got = await reader.readexactly(len(data))        # the host reads: the guest resumes
            await asyncio.wait_for(sender, 10)
            assert sha(got) == sha(data)
            assert device.muxer.errors["credit_overflow"] == 0
            writer.close()
        finally:
            server.close()


async def test_a_stalled_connection_does_not_hold_up_another(short_dir: str) -> None:
    async with guest_on(short_dir) as (_device, guest, uds):
        slow = guest.listen(1, buf_alloc=32 * 1024, auto_credit=False)
        fast = guest.listen(2)
        _r1, w1, _ = await host_connect(uds, 1)
        _r2, w2, _ = await host_connect(uds, 2)
        s1, s2 = await slow.get(), await fast.get()
        w1.write(os.urandom(2 * MiB))                   # s1 never reads past its 32 KiB
        data = os.urandom(2 * MiB)
        w2.write(data)
        w2.write_eof()
        assert sha(await s2.recv_all()) == sha(data)
        assert len(s1.inbox) == 32 * 1024
        w1.close()
        w2.close()


async def test_packets_for_the_guest_are_served_round_robin(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(9)
        conns = [await host_connect(uds, 9) for _ in range(3)]
        streams = [await accepted.get() for _ in range(3)]
        ports = {s.peer_port for s in streams}
        # Starve the rx ring, queue 16 KiB on each connection, then give 12 buffers.
        guest.rx_paused = True
        while guest.vm.queues[0].chains:
            w = conns[0][1]
            w.write(b"f" * 4096)
            await w.drain()
            await until(lambda: bool(streams[0].inbox))
            streams[0].consume(len(streams[0].inbox))
            await asyncio.sleep(0.01)
        for _r, w, _l in conns:
            w.write(b"x" * 16384)
            await w.drain()
        await until(lambda: all(len(link.conn.to_guest) == 16384 for link in device.muxer.links.values()))
        guest.record = True
        guest.rx_paused = False
        guest.fill_rx(12)
        await until(lambda: sum(1 for h in guest.log if h.op == Op.RW) >= 12)
        order = [h.src_port for h in guest.log if h.op == Op.RW][:12]
        assert set(order[:3]) == ports and order[:3] * 4 == order, order
        for _r, w, _l in conns:
            w.close()


# -- many connections ----------------------------------------------------------------------------------

async def test_1024_connections_at_once(short_dir: str) -> None:
    n = 1024
    soft = raise_nofile_limit(4 * n)
    if soft < 3 * n:
        pytest.skip(f"open-file limit {soft} is too low for {n} connections in one process")
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(80)

        async def guest_side() -> int:
            served = 0
            streams = []
            for _ in range(n):
                s = await asyncio.wait_for(accepted.get(), 60)
                streams.append(s)
            for s in streams:                       # every connection is open at this point
                msg = await s.recv_exactly(8)
                await s.send(msg[::-1])
                served += 1
            return served

        async def host_side(i: int) -> bytes:
            reader, writer, line = await host_connect(uds, 80)
            assert line.startswith(b"OK ")
            writer.write(b"%08d" % i)
            reply = await reader.readexactly(8)
            writer.close()
            return reply

        g = asyncio.create_task(guest_side())
        replies = await asyncio.wait_for(asyncio.gather(*(host_side(i) for i in range(n))), 120)
        assert await g == n
        assert [r[::-1] for r in replies] == [b"%08d" % i for i in range(n)]
        assert device.muxer.stats["host_connects"] == n
        await until(lambda: not device.muxer.links, timeout=30)
        assert guest.violations == []


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_nofile_limit() == hard or hard == resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raise_nofile_limit()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


# -- transport reset -------------------------------------------------------------------------------------

async def test_front_end_reconnect_sends_transport_reset_and_closes_old_connections(short_dir: str) -> None:
    async with guest_on(short_dir, events=2) as (device, guest, uds):
        accepted = guest.listen(1234)
        reader, writer, _ = await host_connect(uds, 1234)
        stream = await accepted.get()
        writer.write(b"ping")
        assert await stream.recv_exactly(4) == b"ping"
        assert guest.events == [] and device.transport_resets_sent == 0
        path = guest.vm.fe.sock.getpeername()
        await guest.vm.reconnect(path)
        # The old host-side connection is gone ...
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # ... and the guest hears of it once, on the event queue (virtio 1.2 §5.10.6.7).
        await until(lambda: guest.events == [0])
        assert stream.was_reset and stream.state == "closed"
        assert device.transport_resets_sent == 1
        await asyncio.sleep(0.1)
        assert guest.events == [0]                       # once, not per queue
        # The device serves the reconnected guest.
        _r2, w2, line = await host_connect(uds, 1234)
        s2 = await accepted.get()
        w2.write(b"again")
        assert line.startswith(b"OK ") and await s2.recv_exactly(5) == b"again"
        w2.close()
        writer.close()


async def test_transport_reset_waits_for_an_event_buffer(short_dir: str) -> None:
    async with guest_on(short_dir, events=0) as (device, guest, _uds):
        path = guest.vm.fe.sock.getpeername()
        await guest.vm.reconnect(path)
        await until(lambda: device.transport_reset_pending)
        await asyncio.sleep(0.1)
        assert guest.events == []
        guest.post_event_buffers(1)
        await until(lambda: guest.events == [0])
        assert not device.transport_reset_pending


async def test_a_restart_within_a_session_is_not_a_reset(short_dir: str) -> None:
    # VM paused and resumed: the rings stop (GET_VRING_BASE) and start again, moved.
    async with guest_on(short_dir, events=1) as (device, guest, uds):
        accepted = guest.listen(5)
        _reader, writer, _ = await host_connect(uds, 5)
        stream = await accepted.get()
        writer.write(b"1")
        await stream.recv_exactly(1)
        vm = guest.vm
        bases = await vm.stop()
        assert bases[0] > 0 and bases[1] > 0
        for i, q in enumerate(vm.queues):
            await vm.fe.set_vring_base(i, q.used_idx)
            await vm.fe.set_vring_kick(i, vm.kicks[i])
            await vm.fe.set_vring_call(i, vm.calls[i])
            await vm.fe.set_vring_enable(i, True)
        writer.write(b"2")
        assert await stream.recv_exactly(1) == b"2"        # the connection survived
        assert guest.events == [] and not device.transport_reset_pending
        writer.close()


async def test_a_driver_that_starts_over_closes_the_host_side_of_every_connection(short_dir: str) -> None:
    # A guest reboot behind QEMU 7.2: the rings stop and start again from 0 on the same
    # vhost-user connection, with no other sign.
    async with guest_on(short_dir, events=1) as (device, guest, uds):
        accepted = guest.listen(5)
        reader, writer, _ = await host_connect(uds, 5)
        stream = await accepted.get()
        writer.write(b"x")
        await stream.recv_exactly(1)
        await guest.reinitialize()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert not device.muxer.links
        assert guest.events == []                   # the guest knows; no TRANSPORT_RESET
        accepted = guest.listen(5)
        _r, w2, line = await host_connect(uds, 5)   # and it serves the new driver
        assert line.startswith(b"OK ")
        await accepted.get()
        w2.close()
        writer.close()


# -- bad input ----------------------------------------------------------------------------------------------

def raw(guest: VsockGuest, hdr: Header, payload: bytes = b"", *, buffers: list[Buffer] | None = None) -> None:
    guest.vm.post(1, buffers if buffers is not None else
                  [Buffer.readable(hdr.pack())] + ([Buffer.readable(payload)] if payload else []))


def pkt(op: int, *, src: int = CID, dst: int = 2, sport: int = 40000, dport: int = 7000, length: int = 0,
        type_: int = SockType.STREAM) -> Header:
    return Header(src, dst, sport, dport, length, type_, op, 0, 65536, 0)


BAD_INPUT = {
    # cause: (packet sender, RST expected back)
    "unknown_op": (lambda g: raw(g, pkt(42)), True),
    "unknown_type": (lambda g: raw(g, pkt(Op.REQUEST, type_=2)), True),
    "bad_length": (lambda g: raw(g, pkt(Op.RW, length=100), b"only ten b"), True),
    "unknown_connection": (lambda g: raw(g, pkt(Op.RW, length=3), b"abc"), True),
    "wrong_src_cid": (lambda g: raw(g, pkt(Op.REQUEST, src=CID + 1)), False),
    "wrong_dst_cid": (lambda g: raw(g, pkt(Op.REQUEST, dst=CID + 5)), True),
    "short_header": (lambda g: raw(g, pkt(Op.REQUEST), buffers=[Buffer.readable(b"\x03" * 20)]), False),
}


@pytest.mark.parametrize("cause", sorted(BAD_INPUT))
async def test_bad_input_is_answered_or_dropped_and_counted(short_dir: str, cause: str) -> None:
    send, rst_expected = BAD_INPUT[cause]
    async with guest_on(short_dir) as (device, guest, uds):
        send(guest)
        await until(lambda: device.muxer.errors[cause] == 1)
        await asyncio.sleep(0.1)
        rsts = [h for h in guest.orphans if h.op == Op.RST]
        if rst_expected:
            assert len(rsts) == 1 and (rsts[0].dst_cid, rsts[0].dst_port) == (CID, 40000), guest.orphans
        else:
            assert rsts == []
        others = {k: v for k, v in device.muxer.errors.items() if k != cause}
        assert not any(others.values()), others
        # The daemon keeps serving.
        accepted = guest.listen(1)
        _reader, writer, line = await host_connect(uds, 1)
        assert line.startswith(b"OK ")
        await accepted.get()
        writer.close()


async def test_oversized_and_mid_connection_bad_packets_reset_that_connection_only(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(1)
        r1, w1, _ = await host_connect(uds, 1)
        r2, w2, _ = await host_connect(uds, 1)
        s1, s2 = await accepted.get(), await accepted.get()
        # A 70 KiB RW on s1: more than any packet may carry.
        hdr = Header(CID, 2, s1.local_port, s1.peer_port, 70 * 1024, SockType.STREAM, Op.RW, 0, 65536, 0)
        raw(guest, hdr, bytes(70 * 1024))
        assert await asyncio.wait_for(r1.read(), 5) == b""
        await until(lambda: s1.state == "closed")
        assert s1.got_rst and device.muxer.errors["bad_length"] == 1
        await s2.send(b"still fine")
        assert await r2.readexactly(10) == b"still fine"
        w1.close()
        w2.close()


async def test_late_packets_of_a_closed_connection_are_not_counted_as_mistakes(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(1)
        _reader, writer, _ = await host_connect(uds, 1)
        stream = await accepted.get()
        await stream.close()
        # What Linux sends when socat shuts down a socket that was already reset.
        raw(guest, Header(CID, 2, stream.local_port, stream.peer_port, 0, SockType.STREAM, Op.SHUTDOWN,
                          3, 65536, 0))
        raw(guest, pkt(Op.SHUTDOWN, sport=41000))                   # never existed
        await until(lambda: device.muxer.errors["unknown_connection"] == 1)
        await until(lambda: len([h for h in guest.orphans if h.op == Op.RST]) == 2)
        assert device.muxer.stats["late_packets"] == 1
        writer.close()


async def test_control_info_reports_counters(short_dir: str) -> None:
    async with guest_on(short_dir) as (device, guest, uds):
        ctl = ControlServer(os.path.join(short_dir, "ctl"), control_handlers(device))
        await ctl.start()
        try:
            raw(guest, pkt(42))
            await until(lambda: device.muxer.errors["unknown_op"] == 1)
            info = await control_request(ctl.path, {"command": "info"})
        finally:
            await ctl.close()
        assert info["ok"] and info["guest_cid"] == CID and info["uds_path"] == uds
        assert set(info["errors"]) == set(ERROR_CAUSES) and info["errors"]["unknown_op"] == 1


# -- sibling groups --------------------------------------------------------------------------------------------

async def test_two_guests_in_one_group_reach_each_other_by_cid(short_dir: str) -> None:
    rundir = Path(short_dir, "run")
    async with guest_on(short_dir, cid=3, group="g1", runtime_dir=rundir) as (dev_a, a, _), \
            guest_on(short_dir, cid=4, group="g1", runtime_dir=rundir) as (dev_b, b, _):
        accepted = b.listen(7000)
        sa = await a.connect(7000, cid=4)
        sb = await asyncio.wait_for(accepted.get(), 5)
        assert (sb.peer_cid, sb.peer_port) == (3, sa.local_port)   # it comes from guest 3
        one, two = os.urandom(3 * MiB), os.urandom(MiB)
        send = asyncio.create_task(sa.send(one))
        assert sha(await sb.recv_exactly(len(one))) == sha(one)
        await send
        send = asyncio.create_task(sb.send(two))
        assert sha(await sa.recv_exactly(len(two))) == sha(two)
        await send
        await sa.close()
        await until(lambda: sb.state == "closed")
        await until(lambda: not dev_a.muxer.links and not dev_b.muxer.links)
        # A CID nobody in the group holds, and a port nobody listens on: RST.
        with pytest.raises(ConnectionRefusedError):
            await a.connect(7000, cid=5)
        with pytest.raises(ConnectionRefusedError):
            await a.connect(7001, cid=4)
        assert dev_a.muxer.errors["connect_failed"] == 1
        assert a.violations == [] and b.violations == []


async def test_a_cid_is_held_once_per_group(short_dir: str) -> None:
    from vdev.errors import DeviceError

    rundir = Path(short_dir, "run")
    async with guest_on(short_dir, cid=3, group="g1", runtime_dir=rundir):
        with pytest.raises(DeviceError, match="CID 3 is already held"):
            VsockDevice(3, os.path.join(short_dir, "other.sock"), group="g1", runtime_dir=rundir)
        # The failed device released what it had taken.
        assert not os.path.exists(os.path.join(short_dir, "other.sock"))
    # Without a group, the guest cannot reach another CID at all.
    async with guest_on(short_dir, cid=5) as (device, guest, _):
        with pytest.raises(ConnectionRefusedError):
            await guest.connect(80, cid=3)
        assert device.muxer.errors["wrong_dst_cid"] == 1


async def test_stale_sockets_are_replaced(short_dir: str) -> None:
    uds = os.path.join(short_dir, "v.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds)
    stale.close()                     # a socket file nobody listens on
    device = VsockDevice(CID, uds)
    try:
        assert os.path.exists(uds)
        _r, w = await asyncio.open_unix_connection(uds)
        w.close()
    finally:
        await device.aclose()
    assert not os.path.exists(uds)


async def test_guest_stream_testing_helper_reports_device_overruns(short_dir: str) -> None:
    # The guest stack itself must catch a device that ignores credit, or the credit
    # tests above could not fail.
    async with guest_on(short_dir) as (device, guest, uds):
        accepted = guest.listen(3, buf_alloc=8)
        _reader, writer, _ = await host_connect(uds, 3)
        stream: GuestStream = await accepted.get()
        conn = the_connection(device)
        conn.peer_buf_alloc = 1 << 20              # make the device believe in more credit
        writer.write(b"0123456789abcdef")
        await until(lambda: len(stream.inbox) == 16)
        assert guest.violations and "overran our credit" in guest.violations[0]
        writer.close()


def test_header_size_constant_matches_the_guest_buffers() -> None:
    assert HEADER_SIZE == 44
