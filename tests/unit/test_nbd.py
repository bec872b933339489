"""Tests of the NBD client (`NbdStorage`).

Most run against `FakeNbdServer` (backends.blk.storage.testing), a small
in-process server whose misbehaviour is scriptable (no NBD_OPT_GO, replies out of order or cut
into scraps, error replies, bad magic, dying mid-request), so every branch of
the handshake and the reply reader is reached deterministically.  The rest
use real servers: qemu-nbd killed in mid-session, qemu-nbd exporting
read-only, and nbdkit with fixed-newstyle masked off (the real-world
NBD_OPT_EXPORT_NAME fallback).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from backends.blk.storage import NbdStorage, open_storage
from backends.blk.storage import nbd_proto as P
from backends.blk.storage.testing import FAKE_NBD_FLAGS as FLAGS_ALL
from backends.blk.storage.testing import FakeNbdServer, QemuNbdServer
from vdev.errors import DeviceError


def pattern(n: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    return rnd.randbytes(n)


@pytest.fixture
async def fake(tmp_path) -> AsyncIterator[FakeNbdServer]:
    async with FakeNbdServer(str(tmp_path / "fake.sock")) as srv:
        yield srv


async def connect(srv: FakeNbdServer, **kw: object) -> NbdStorage:
    return await NbdStorage.connect(socket_path=srv.path, export="disk", **kw)  # type: ignore[arg-type]


# ---- handshake --------------------------------------------------------------------

async def test_opt_go_handshake(fake: FakeNbdServer) -> None:
    fake.block_size = (1, 4096, 65536)
    s = await connect(fake)
    assert s.info.negotiated_with == "NBD_OPT_GO"
    assert fake.options == [P.NBD_OPT_GO]
    assert s.size == 1 << 20
    assert s.info.max_payload == 65536 and s.block_size == 512
    assert s.supports_flush and s.supports_discard and s.supports_write_zeroes and not s.read_only
    await s.aclose()


@pytest.mark.parametrize("no_zeroes", [True, False])
async def test_export_name_fallback_when_opt_go_unsupported(fake: FakeNbdServer, no_zeroes: bool) -> None:
    fake.opt_go = False
    fake.no_zeroes = no_zeroes
    s = await connect(fake)
    assert s.info.negotiated_with == "NBD_OPT_EXPORT_NAME"
    assert fake.options == [P.NBD_OPT_GO, P.NBD_OPT_EXPORT_NAME]
    await s.writev(512, [memoryview(b"abc" * 512)])
    out = bytearray(1536)
    await s.readv(512, [memoryview(out)])
    assert out == b"abc" * 512
    # NBD_OPT_INFO unsupported as well: the cached size stands.
    assert await s.refresh_size() == 1 << 20
    await s.aclose()


async def test_not_fixed_newstyle_goes_straight_to_export_name(fake: FakeNbdServer) -> None:
    fake.fixed_newstyle = False
    s = await connect(fake)
    assert fake.options == [P.NBD_OPT_EXPORT_NAME]
    assert await s.refresh_size() == 1 << 20
    await s.aclose()


async def test_unknown_export(fake: FakeNbdServer) -> None:
    with pytest.raises(DeviceError) as ei:
        await NbdStorage.connect(socket_path=fake.path, export="nope")
    assert "export 'nope' not found" in str(ei.value)
    assert "no such export" in str(ei.value)
    fake.opt_go = False
    with pytest.raises(DeviceError, match="NBD_OPT_EXPORT_NAME"):
        await NbdStorage.connect(socket_path=fake.path, export="nope")


async def test_not_an_nbd_server(fake: FakeNbdServer) -> None:
    fake.garbage = True
    with pytest.raises(DeviceError) as ei:
        await connect(fake)
    assert isinstance(ei.value.cause, ConnectionError)


def _opt_reply(rtype: int, data: bytes = b"", *, magic: int = P.OPTION_REPLY_MAGIC,
               opt: int = P.NBD_OPT_GO, length: int | None = None) -> bytes:
    return P.OPTION_REPLY.pack(magic, opt, rtype, len(data) if length is None else length) + data


_EXPORT_INFO = _opt_reply(P.NBD_REP_INFO, P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, 4096, 1))


@pytest.mark.parametrize(("greeting", "go_reply", "message"), [
    (struct.pack(">QQH", 0x1122334455667788, P.IHAVEOPT, 1), None, "not an NBD server"),
    (struct.pack(">QQ", P.NBDMAGIC, P.CLISERV_MAGIC) + b"\0\0", None, "oldstyle negotiation"),
    (struct.pack(">QQH", P.NBDMAGIC, 0x42, 1), None, "unknown negotiation magic"),
    (None, _opt_reply(P.NBD_REP_ACK, magic=0x99), "bad option reply magic"),
    (None, _opt_reply(P.NBD_REP_ACK, opt=3), "option reply for option 3, expected 7"),
    (None, _opt_reply(P.NBD_REP_INFO, length=1 << 20), "option reply of 1048576 bytes is too long"),
    (None, _opt_reply(P.NBD_REP_ACK), "without sending NBD_INFO_EXPORT"),
    (None, _opt_reply(P.NBD_REP_INFO, b"\0"), "NBD_REP_INFO without an info type"),
    (None, _opt_reply(P.NBD_REP_ERR_POLICY, b"go away"), "NBD_REP_ERR_POLICY: go away"),
    (None, _opt_reply(P.NBD_REP_ERR_TLS_REQD), "refused the export (NBD_REP_ERR_TLS_REQD)"),
    (None, _EXPORT_INFO[:30], "closed the connection during the handshake"),
])
async def test_handshake_failures(fake: FakeNbdServer, greeting: bytes | None, go_reply: bytes | None,
                                  message: str) -> None:
    fake.greeting = greeting
    fake.go_reply = go_reply
    with pytest.raises(DeviceError) as ei:
        await connect(fake, connect_timeout=5)
    assert message in str(ei.value)
    assert isinstance(ei.value.cause, ConnectionError)


async def test_unknown_option_reply_types_are_skipped(fake: FakeNbdServer) -> None:
    fake.go_reply = _opt_reply(P.NBD_REP_SERVER, b"\0\0\0\0") + _EXPORT_INFO + _opt_reply(P.NBD_REP_ACK)
    # The server hangs up right after, but the handshake itself succeeds.
    s = await connect(fake)
    assert s.size == 4096
    await s.aclose()


def test_connect_needs_one_address() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(NbdStorage.connect())
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(NbdStorage.connect(host="h", socket_path="/s"))


async def test_connect_timeout(fake: FakeNbdServer) -> None:
    fake.silent = True
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="timed out"):
        await connect(fake, connect_timeout=0.2)
    assert time.monotonic() - t0 < 2


async def test_connection_refused(tmp_path) -> None:
    with pytest.raises(DeviceError) as ei:
        await NbdStorage.connect(socket_path=str(tmp_path / "none.sock"))
    assert isinstance(ei.value.cause, OSError)
    with socket.socket() as s:   # a TCP port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeviceError) as ei:
        await open_storage(f"nbd://127.0.0.1:{port}/x")
    assert isinstance(ei.value.cause, ConnectionRefusedError)


async def test_refresh_size_sees_resize(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    fake.data.extend(bytes(1 << 20))
    assert s.size == 1 << 20
    assert await s.refresh_size() == 2 << 20
    assert P.NBD_OPT_INFO in fake.options
    await s.writev((2 << 20) - 512, [memoryview(bytes(512))])
    await s.aclose()


# ---- transmission ---------------------------------------------------------------------

async def test_out_of_order_fragmented_replies(fake: FakeNbdServer) -> None:
    fake.data[:] = pattern(len(fake.data))
    fake.fragment = True
    fake.hold = True
    fake.reverse = True
    s = await connect(fake)
    sizes = [(0, 100), (4096, 70000), (200000, 512), (300000, 20000)]
    outs = [bytearray(n) for _, n in sizes]
    tasks = [asyncio.ensure_future(s.readv(off, [memoryview(o)])) for (off, _), o in zip(sizes, outs, strict=True)]
    await fake.wait_requests(len(sizes))
    assert s.in_flight == len(sizes)
    await fake.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for (off, n), o in zip(sizes, outs, strict=True):
        assert o == fake.data[off:off + n]
    await s.aclose()


async def test_large_read_lands_in_scattered_buffers(fake: FakeNbdServer) -> None:
    fake.data[:] = pattern(len(fake.data), seed=3)
    s = await connect(fake)
    backing = bytearray(300001)
    bufs = [memoryview(backing)[1:40000], memoryview(backing)[40000:40512],
            memoryview(backing)[40512:300001]]
    await s.readv(1000, bufs)
    assert backing[1:] == fake.data[1000:1000 + 300000]
    await s.aclose()


async def test_requests_split_at_max_request(fake: FakeNbdServer) -> None:
    s = await connect(fake, max_request=4096)
    data = pattern(10000, seed=4)
    await s.writev(512, [memoryview(data)[:3000], memoryview(data)[3000:]])
    writes = [r for r in fake.requests if r[0] == P.NBD_CMD_WRITE]
    assert [(o, n) for _, _, o, n in writes] == [(512, 4096), (4608, 4096), (8704, 1808)]
    out = bytearray(10000)
    await s.readv(512, [memoryview(out)])
    assert out == data
    assert max(n for c, _, _, n in fake.requests if c == P.NBD_CMD_READ) == 4096
    await s.aclose()


async def test_server_max_payload_limits_requests(fake: FakeNbdServer) -> None:
    fake.block_size = (1, 512, 8192)
    s = await connect(fake)
    await s.readv(0, [memoryview(bytearray(20000))])
    assert [n for c, _, _, n in fake.requests if c == P.NBD_CMD_READ] == [8192, 8192, 3616]
    await s.aclose()


async def test_write_zeroes_flags_and_trim(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    await s.write_zeroes(0, 4096, may_unmap=False)
    await s.write_zeroes(4096, 4096, may_unmap=True)
    await s.discard(8192, 4096)
    await s.flush()
    cmds = [(c, f) for c, f, _, _ in fake.requests]
    assert cmds == [(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_NO_HOLE), (P.NBD_CMD_WRITE_ZEROES, 0),
                    (P.NBD_CMD_TRIM, 0), (P.NBD_CMD_FLUSH, 0)]
    await s.aclose()


async def test_export_without_optional_commands(fake: FakeNbdServer) -> None:
    fake.flags = P.NBD_FLAG_HAS_FLAGS
    fake.data[:8192] = b"\xff" * 8192
    s = await connect(fake)
    assert not s.supports_flush and not s.supports_discard
    assert s.supports_write_zeroes  # by writing zeros
    with pytest.raises(DeviceError) as ei:
        await s.flush()
    assert ei.value.status == 2
    await s.discard(0, 4096)                         # advisory: nothing sent
    await s.write_zeroes(0, 8192, may_unmap=True)    # falls back to WRITE
    assert [c for c, *_ in fake.requests] == [P.NBD_CMD_WRITE]
    assert fake.data[:8192] == bytes(8192)
    await s.aclose()


async def test_server_read_only_flag(fake: FakeNbdServer) -> None:
    fake.flags = FLAGS_ALL | P.NBD_FLAG_READ_ONLY
    s = await connect(fake)
    assert s.read_only and not s.supports_discard and not s.supports_write_zeroes
    with pytest.raises(DeviceError) as ei:
        await s.writev(0, [memoryview(bytes(512))])
    assert ei.value.status == 1
    with pytest.raises(DeviceError):
        await s.write_zeroes(0, 512)
    assert fake.requests == []       # refused locally, nothing sent
    await s.readv(0, [memoryview(bytearray(512))])
    await s.aclose()


async def test_error_replies_map_to_device_errors(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    fake.errors[P.NBD_CMD_WRITE] = 28
    with pytest.raises(DeviceError) as ei:
        await s.writev(0, [memoryview(bytes(512))])
    assert ei.value.status == 1 and ei.value.cause.errno == errno.ENOSPC
    fake.errors[P.NBD_CMD_READ] = 5
    buf = bytearray(b"\x11" * 512)
    with pytest.raises(DeviceError) as ei:
        await s.readv(0, [memoryview(buf)])
    assert ei.value.cause.errno == errno.EIO
    assert buf == b"\x11" * 512      # an error reply carries no payload
    fake.errors[P.NBD_CMD_TRIM] = 95
    with pytest.raises(DeviceError) as ei:
        await s.discard(0, 512)
    assert ei.value.status == 2
    # The connection survives ordinary errors.
    await s.readv(0, [memoryview(bytearray(512))])
    assert s.connected
    await s.aclose()


async def test_eshutdown_makes_client_disconnect(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    fake.errors[P.NBD_CMD_READ] = 108
    with pytest.raises(DeviceError) as ei:
        await s.readv(0, [memoryview(bytearray(512))])
    assert ei.value.cause.errno == errno.ESHUTDOWN
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    with pytest.raises(DeviceError):
        await s.readv(0, [memoryview(bytearray(512))])
    await s.aclose()


@pytest.mark.parametrize("fault", ["bad_magic", "wrong_handle"])
async def test_protocol_violation_fails_everything(fake: FakeNbdServer, fault: str) -> None:
    s = await connect(fake)
    fake.hold = True
    t1 = asyncio.ensure_future(s.readv(0, [memoryview(bytearray(512))]))
    t2 = asyncio.ensure_future(s.writev(0, [memoryview(bytes(512))]))
    await fake.wait_requests(2)
    setattr(fake, fault, True)
    fake.hold = False
    fake.requests.clear()
    t3 = asyncio.ensure_future(s.readv(512, [memoryview(bytearray(512))]))
    results = await asyncio.wait_for(asyncio.gather(t1, t2, t3, return_exceptions=True), 5)
    assert all(isinstance(r, DeviceError) for r in results), results
    assert any("protocol violation" in str(r) for r in results)
    assert not s.connected
    with pytest.raises(DeviceError):
        await s.readv(0, [memoryview(bytearray(512))])
    await s.aclose()


async def test_connection_drop_fails_pending_and_later(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    fake.hold = True
    reads = [asyncio.ensure_future(s.readv(i * 512, [memoryview(bytearray(512))])) for i in range(3)]
    await fake.wait_requests(3)
    fake.die_on_request = True
    fake.hold = False
    results = await asyncio.wait_for(
        asyncio.gather(*reads, s.writev(0, [memoryview(bytes(512))]), return_exceptions=True), 5)
    assert all(isinstance(r, DeviceError) and r.status == 1 for r in results), results
    assert all("lost" in str(r) for r in results)
    with pytest.raises(DeviceError, match="lost"):
        await s.readv(0, [memoryview(bytearray(512))])
    await asyncio.wait_for(s.aclose(), 5)


async def test_cancelled_read_does_not_write_into_buffer(fake: FakeNbdServer) -> None:
    fake.data[:] = b"\x5a" * len(fake.data)
    s = await connect(fake)
    fake.hold = True
    big, small = bytearray(100000), bytearray(100)
    t_big = asyncio.ensure_future(s.readv(0, [memoryview(big)]))
    t_small = asyncio.ensure_future(s.readv(0, [memoryview(small)]))
    await fake.wait_requests(2)
    t_big.cancel()
    t_small.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t_big
    fake.hold = False
    await fake.release()
    await asyncio.sleep(0.05)
    assert big == bytes(100000) and small == bytes(100)
    # the stream is still in step: the next read works
    out = bytearray(700)
    await asyncio.wait_for(s.readv(10, [memoryview(out)]), 5)
    assert out == b"\x5a" * 700
    await s.aclose()


async def test_cancel_in_the_middle_of_a_payload(fake: FakeNbdServer) -> None:
    """The waiter goes away while its payload is half received: the rest is
    drained into scratch, not into the buffer, and the stream stays in step."""
    fake.data[:] = b"\x33" * len(fake.data)
    fake.split_reply = asyncio.Event()
    s = await connect(fake)
    buf = bytearray(1 << 20)
    task = asyncio.ensure_future(s.readv(0, [memoryview(buf)]))
    await fake.wait_requests(1)
    while buf[:1000] != b"\x33" * 1000:      # the first half is arriving
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake.split_reply.set()
    fake.split_reply = None
    out = bytearray(512)
    await asyncio.wait_for(s.readv(0, [memoryview(out)]), 5)
    assert out == b"\x33" * 512
    assert buf[-100000:] == bytes(100000)    # the second half never landed
    await s.aclose()


async def test_connection_drop_in_the_middle_of_a_payload(fake: FakeNbdServer) -> None:
    fake.cut_reply = True
    s = await connect(fake)
    with pytest.raises(DeviceError, match="lost"):
        await asyncio.wait_for(s.readv(0, [memoryview(bytearray(1 << 20))]), 5)
    with pytest.raises(DeviceError):
        await s.writev(0, [memoryview(bytes(512))])
    await s.aclose()


async def test_aclose_waits_for_inflight_then_disconnects(fake: FakeNbdServer) -> None:
    s = await connect(fake)
    fake.hold = True
    w = asyncio.ensure_future(s.writev(0, [memoryview(b"\x07" * 4096)]))
    await fake.wait_requests(1)
    closing = asyncio.ensure_future(s.aclose())
    await asyncio.sleep(0.02)
    assert not closing.done() and not fake.disconnected.is_set()
    with pytest.raises(DeviceError, match="closed"):
        await s.readv(0, [memoryview(bytearray(512))])   # no new requests once closing
    await fake.release()
    await asyncio.wait_for(closing, 5)
    await w
    assert fake.disconnected.is_set()
    assert fake.requests[-1][0] == P.NBD_CMD_DISC
    assert fake.data[:4096] == b"\x07" * 4096
    await s.aclose()


def test_fragmented_replies_under_uvloop(tmp_path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with FakeNbdServer(str(tmp_path / "uv.sock"), fragment=True) as srv:
            srv.data[:] = pattern(len(srv.data), seed=8)
            srv.hold = srv.reverse = True
            s = await connect(srv)
            outs = [bytearray(n) for n in (5000, 70000, 3)]
            tasks = [asyncio.ensure_future(s.readv(i * 100000, [memoryview(o)])) for i, o in enumerate(outs)]
            await srv.wait_requests(3)
            await srv.release()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            for i, o in enumerate(outs):
                assert o == srv.data[i * 100000:i * 100000 + len(o)]
            await s.aclose()

    uvloop.run(main())


# ---- real servers ----------------------------------------------------------------------

needs_qemu_nbd = pytest.mark.skipif(not QemuNbdServer.available(), reason="qemu-nbd not installed")


def make_image(path, size: int = 4 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


@needs_qemu_nbd
async def test_qemu_nbd_killed_mid_session(tmp_path) -> None:
    img = make_image(tmp_path / "k.img")
    srv = QemuNbdServer(img, socket_path=tmp_path / "k.sock", export="k").start()
    try:
        s = await open_storage(srv.url)
        await s.writev(0, [memoryview(b"\x01" * 4096)])
        srv.suspend()          # stopped: the next requests stay in flight
        pending = [asyncio.ensure_future(s.readv(0, [memoryview(bytearray(4096))])),
                   asyncio.ensure_future(s.writev(4096, [memoryview(bytes(4096))]))]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in pending)
        srv.kill()
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
        assert all(isinstance(r, DeviceError) and r.status == 1 for r in results), results
        assert all(r.cause is not None for r in results)
        with pytest.raises(DeviceError):
            await asyncio.wait_for(s.readv(0, [memoryview(bytearray(512))]), 5)
        with pytest.raises(DeviceError, match="cannot re-read the size"):
            await asyncio.wait_for(s.refresh_size(), 5)
        await asyncio.wait_for(s.aclose(), 5)
    finally:
        srv.stop()


@needs_qemu_nbd
async def test_qemu_nbd_read_only_export(tmp_path) -> None:
    img = make_image(tmp_path / "ro.img")
    with QemuNbdServer(img, host="127.0.0.1", export="ro", read_only=True) as srv:
        async with await open_storage(srv.url) as s:
            assert s.read_only and s.export_flags & P.NBD_FLAG_READ_ONLY
            with pytest.raises(DeviceError) as ei:
                await s.writev(0, [memoryview(bytes(512))])
            assert ei.value.status == 1
            out = bytearray(4096)
            await s.readv(0, [memoryview(out)])
            assert out == bytes(4096)


@needs_qemu_nbd
async def test_qemu_nbd_unknown_export(tmp_path) -> None:
    img = make_image(tmp_path / "u.img")
    with QemuNbdServer(img, socket_path=tmp_path / "u.sock", export="right") as srv, \
            pytest.raises(DeviceError, match="'wrong' not found"):
        await open_storage(f"nbd+unix:///wrong?socket={srv.socket_path}")


@needs_qemu_nbd
async def test_qemu_nbd_split_large_io(tmp_path) -> None:
    """A request over 32 MiB goes out in pieces qemu-nbd accepts."""
    img = make_image(tmp_path / "big.img", size=40 << 20)
    with QemuNbdServer(img, socket_path=tmp_path / "big.sock") as srv:
        async with await open_storage(srv.url) as s:
            data = os.urandom(33 << 20)
            await s.writev(0, [memoryview(data)])
            out = bytearray(len(data))
            await s.readv(0, [memoryview(out)])
            assert out == data


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit not installed")
async def test_nbdkit_without_fixed_newstyle(tmp_path) -> None:
    """A real server that is not fixed-newstyle: NBD_OPT_EXPORT_NAME path."""
    sock = str(tmp_path / "kit.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--mask-handshake=0",
                             "memory", "1M"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            await asyncio.sleep(0.01)
        async with await NbdStorage.connect(socket_path=sock, export="") as s:
            assert s.info.negotiated_with == "NBD_OPT_EXPORT_NAME"
            assert s.size == 1 << 20
            await s.writev(4096, [memoryview(b"kit!" * 256)])
            out = bytearray(1024)
            await s.readv(4096, [memoryview(out)])
            assert out == b"kit!" * 256
    finally:
        proc.terminate()
        proc.wait(timeout=10)
