"""Bad input against a real server: the daemon answers, drops at most the bad connection, and goes on.

A real `vdev.device.serve` runs in-process (RngDevice, and BlkDevice on
``mem:`` storage) on a Unix socket in a short temporary directory.  Fuzz
connections send

* the front-end side of the real QEMU 7.2 captures, mutated (bytes flipped,
  messages truncated, request numbers, sizes and flags rewritten, fds added or
  dropped, messages duplicated, reordered, deleted, garbage inserted);
* purely random bytes, with random fds;
* well-framed headers for request numbers 0..60 with random payloads and 0..3
  fds, after no, a partial or a full (memory + running ring) set-up.

The fuzz client reads the replies as they come and half-closes when done, so
the server always sees a clean EOF; a front-end that does not read, or goes
away before reading, is a plain test of its own.  After every connection: the
server task is still running, a fresh `VirtioFrontend` gets real work done (64
random bytes; a sector written and read back), and this process holds exactly
the fds it held before (every fd sent to the server was closed by it).

Then one plain test per named bad input, each checking the log line that
names the offending value.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.blk.device import BlkDevice
from backends.blk.storage import open_storage
from backends.rng import RngDevice
from vdev.device import FRAMEWORK_FEATURES, Device, serve
from vdev.testing import FRONTEND_VA_BASE, Buffer, VirtioFrontend
from vhost_user.errors import ProtocolError
from vhost_user.frontend import Frontend
from vhost_user.handler import HANDLER_PROTOCOL_FEATURES
from vhost_user.messages import (
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
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
from vhost_user.server import VhostUserServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_golden_qemu import CAPTURES, load

POISON = 0xAA          # DriverQueue fills writable buffers with it before posting
SECTOR = 512
MiB = 1 << 20
#: A memfd announced larger than this is not created at that size (the mmap then fails).
MAX_MEMFD = 1 << 30
LOGGERS = ("vhost_user.handler", "vhost_user.server")
DEVICES = ("rng", "blk")


# ---- fds --------------------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """This process's fds and what they point to (the listing's own fd drops out)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def assert_same_fds(before: dict[int, str], what: str) -> None:
    now = open_fds()
    if set(now) != set(before):
        gc.collect()             # a mapping freed only by the collector is slow, not leaked
        now = open_fds()
    extra = {fd: t for fd, t in now.items() if fd not in before}
    gone = {fd: t for fd, t in before.items() if fd not in now}
    assert not extra and not gone, f"{what}: fds leaked {extra}, fds lost {gone}"


def make_fd(kind: str) -> tuple[int, list[int]]:
    """An fd of ``kind`` to send, and every fd the caller must close after sending."""
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return a.detach(), [b.detach()]
    if kind.startswith("memfd"):
        size = int(kind.partition(":")[2] or MiB)
        fd = os.memfd_create("vdev-fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, size if size <= MAX_MEMFD else MiB)
        return fd, []
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), []


# ---- the server under test --------------------------------------------------------------------


@dataclasses.dataclass
class Running:
    kind: str
    device: Device
    path: str
    task: asyncio.Task[None]

    @property
    def server(self) -> VhostUserServer:
        assert self.device.runtime is not None
        server = self.device.runtime.server
        assert isinstance(server, VhostUserServer)
        return server

    async def wait_idle(self, served_before: int, timeout: float = 5.0) -> None:
        """Wait until the server finished the connection(s) opened since ``served_before``."""
        async with asyncio.timeout(timeout):
            while (self.server.connections_served <= served_before or self.server.connection is not None) \
                    and not self.task.done():
                await asyncio.sleep(0.002)
        # A dropped or refused connection never gets this far: let its teardown finish.
        for _ in range(3):
            await asyncio.sleep(0)

    def assert_alive(self) -> None:
        if self.task.done():
            exc = None if self.task.cancelled() else self.task.exception()
            pytest.fail(f"the server task ended: {exc!r}")


async def make_device(kind: str) -> Device:
    if kind == "rng":
        return RngDevice()
    return BlkDevice(await open_storage("mem:4M"))


@contextlib.asynccontextmanager
async def running(kind: str) -> AsyncIterator[Running]:
    tmp = tempfile.mkdtemp(prefix="vdev-fz-", dir="/tmp")
    path = os.path.join(tmp, "s")
    device = await make_device(kind)
    task = asyncio.get_running_loop().create_task(serve(device, path))
    try:
        async with asyncio.timeout(5):
            while device.runtime is None or not device.runtime.server.ready.is_set():  # type: ignore[attr-defined]
                assert not task.done(), task
                await asyncio.sleep(0.001)
        srv = Running(kind, device, path, task)
        yield srv
        srv.assert_alive()
    finally:
        await stop(task)
        shutil.rmtree(tmp, ignore_errors=True)


async def stop(task: asyncio.Task[None], timeout: float = 5.0) -> None:
    """Cancel the server task and wait for it to end.

    Cancelled right after a front-end left, the server may swallow one
    cancellation (test_cancel_right_after_a_disconnect_stops_the_server), so
    cancel again until it ends rather than hang the run.  A server that died
    was reported by `Running.assert_alive`; its exception is not raised again here.
    """
    async with asyncio.timeout(timeout):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()         # retrieved, so asyncio does not log it as never retrieved


def offered_protocol(kind: str) -> ProtocolFeature:
    return HANDLER_PROTOCOL_FEATURES | (ProtocolFeature.CONFIG if kind == "blk" else ProtocolFeature(0))


async def check_serves(srv: Running) -> None:
    """A fresh front-end connects and real work gets done."""
    srv.assert_alive()
    served = srv.server.connections_served
    async with asyncio.timeout(15):
        vm = await VirtioFrontend.start(srv.path, memory_size=MiB, queue_size=64, timeout=2.0)
        try:
            if srv.kind == "rng":
                used = await vm.request(0, [Buffer.writable(64)])
                assert used.length == 64 and len(used.written) == 64
                assert used.written != bytes([POISON]) * 64
            else:
                data = os.urandom(SECTOR)
                hdr = Buffer.readable(struct.pack("<IIQ", 1, 0, 5))          # OUT, sector 5
                used = await vm.request(0, [hdr, Buffer.readable(data), Buffer.writable(1)])
                assert used.written == b"\0", used                           # status OK
                hdr = Buffer.readable(struct.pack("<IIQ", 0, 0, 5))          # IN, sector 5
                used = await vm.request(0, [hdr, Buffer.writable(SECTOR), Buffer.writable(1)])
                assert used.written == data + b"\0"
        finally:
            await vm.close()
    await srv.wait_idle(served)
    srv.assert_alive()


# ---- a raw fuzz client ------------------------------------------------------------------------


@dataclasses.dataclass
class Send:
    """One sendmsg: bytes and the kinds of fds to attach ("eventfd", "memfd:<size>", "socket")."""

    data: bytes
    fds: list[str] = dataclasses.field(default_factory=list)


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


async def fuzz_connection(path: str, sends: Sequence[Send], *, timeout: float = 10.0) -> bytes:
    """Connect, send everything (reading replies meanwhile), half-close, read to EOF, close.

    Returns what the server sent.  Stops sending quietly if the server drops us.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    received = bytearray()

    async def reader() -> None:
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await _wait(loop, sock.fileno(), write=False)
                continue
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)

    try:
        await loop.sock_connect(sock, path)
        reading = loop.create_task(reader())
        try:
            async with asyncio.timeout(timeout):
                await _send_all(loop, sock, sends)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                await reading
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    finally:
        sock.close()
    return bytes(received)


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, sends: Sequence[Send]) -> None:
    for send in sends:
        if not send.data:          # a stream socket cannot carry fds without a byte
            continue
        made = [make_fd(kind) for kind in send.fds]
        fds = [fd for fd, _ in made]
        try:
            pos = 0
            while pos < len(send.data):
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
                    if fds and pos == 0 else []
                try:
                    pos += sock.sendmsg([send.data[pos:]], anc)
                except BlockingIOError:
                    await _wait(loop, sock.fileno(), write=True)
                except OSError:          # the server dropped the connection: that is allowed
                    return
            await asyncio.sleep(0)
        finally:
            for fd, extra in made:       # the kernel holds its own references now
                for f in (fd, *extra):
                    os.close(f)


async def fuzz_and_check(kind: str, sends: Sequence[Send]) -> None:
    """The property: whatever ``sends`` are, nothing leaks, nothing stops, the next VM is served."""
    before = open_fds()
    async with running(kind) as srv:
        idle = open_fds()
        served = srv.server.connections_served
        await fuzz_connection(srv.path, sends)
        await srv.wait_idle(served)
        srv.assert_alive()
        assert_same_fds(idle, "after the fuzz connection")
        await check_serves(srv)
        assert_same_fds(idle, "after the checking connection")
    assert_same_fds(before, "after the server stopped")


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# ---- (a) mutated QEMU conversations -------------------------------------------------------------


def capture_sends(path: Path) -> list[Send]:
    """The front-end side of a capture as QEMU sent it: one sendmsg per message, fds on
    the message that carried them (the last one of its recvmsg chunk)."""
    sends: list[Send] = []
    for direction, nfds, data in load(path):
        if direction != ">":
            continue
        pos, msgs = 0, []
        while pos < len(data):
            size = HEADER.unpack_from(data, pos)[2]
            msgs.append(data[pos: pos + HEADER.size + size])
            pos += HEADER.size + size
        for i, m in enumerate(msgs):
            sends.append(Send(m, ["?"] * nfds if i == len(msgs) - 1 else []))
    return sends


CAPTURE_SENDS = {p.stem.split("_")[-1]: capture_sends(p) for p in CAPTURES}


def resolve_fd_kinds(send: Send) -> Send:
    """Give "?" fds the kind QEMU sent: memory for memory requests, a socket for the
    back-end channel, an eventfd otherwise.  Memory is sized from the (maybe mutated) table."""
    if "?" not in send.fds:
        return send
    request = HEADER.unpack_from(send.data)[0] if len(send.data) >= HEADER.size else -1
    payload = send.data[HEADER.size:]
    sizes: list[int] = []
    with contextlib.suppress(Exception):
        if request == FrontendReq.SET_MEM_TABLE:
            sizes = [r.mmap_offset + r.memory_size for r in MemoryTable.unpack(payload).regions]
        elif request == FrontendReq.ADD_MEM_REG:
            r = SingleMemoryRegion.unpack(payload).region
            sizes = [r.mmap_offset + r.memory_size]
    kinds = []
    for i, k in enumerate(send.fds):
        if k != "?":
            kinds.append(k)
        elif request in (FrontendReq.SET_MEM_TABLE, FrontendReq.ADD_MEM_REG):
            kinds.append(f"memfd:{sizes[i] if i < len(sizes) else MiB}")
        elif request == FrontendReq.SET_BACKEND_REQ_FD:
            kinds.append("socket")
        else:
            kinds.append("eventfd")
    return Send(send.data, kinds)


def _put_u32(data: bytes, offset: int, value: int) -> bytes:
    if len(data) < offset + 4:
        return data
    return data[:offset] + struct.pack("=I", value & 0xFFFFFFFF) + data[offset + 4:]


index = st.integers(0, 1 << 20)
fd_kind = st.sampled_from(["eventfd", "eventfd", "memfd", "socket"])
mutation = st.one_of(
    st.tuples(st.just("flip"), index, index, st.integers(1, 255)),
    st.tuples(st.just("truncate"), index, index),
    st.tuples(st.just("request"), index, st.integers(0, 60)),
    st.tuples(st.just("size"), index, st.one_of(st.sampled_from([0, 1, 7, 8, 12, 40, 100, 4096, 4097,
                                                                 0xFFFFFFFF]), st.integers(0, 1 << 32))),
    st.tuples(st.just("flags"), index, st.sampled_from([0, 1, 2, 3, 5, 9, 0xD, 0x11, 0x101, 0x80000001])),
    st.tuples(st.just("add_fds"), index, st.lists(fd_kind, min_size=1, max_size=3)),
    st.tuples(st.just("drop_fds"), index),
    st.tuples(st.just("dup"), index),
    st.tuples(st.just("swap"), index, index),
    st.tuples(st.just("delete"), index),
    st.tuples(st.just("garbage"), index, st.binary(min_size=1, max_size=64)),
)


def mutate(sends: list[Send], mutations: Sequence[tuple]) -> list[Send]:
    sends = [Send(s.data, list(s.fds)) for s in sends]
    for op, *args in mutations:
        if not sends:
            break
        i = args[0] % len(sends)
        s = sends[i]
        if op == "flip" and s.data:
            pos = args[1] % len(s.data)
            s.data = s.data[:pos] + bytes([s.data[pos] ^ args[2]]) + s.data[pos + 1:]
        elif op == "truncate" and s.data:
            s.data = s.data[: args[1] % len(s.data)]
        elif op == "request":
            s.data = _put_u32(s.data, 0, args[1])
        elif op == "flags":
            s.data = _put_u32(s.data, 4, args[1])
        elif op == "size":
            s.data = _put_u32(s.data, 8, args[1])
        elif op == "add_fds":
            s.fds += args[1]
        elif op == "drop_fds":
            s.fds = []
        elif op == "dup":
            sends.insert(i, Send(s.data, list(s.fds)))
        elif op == "swap":
            j = args[1] % len(sends)
            sends[i], sends[j] = sends[j], sends[i]
        elif op == "delete":
            del sends[i]
        elif op == "garbage":
            sends.insert(i, Send(args[1]))
    return [resolve_fd_kinds(s) for s in sends if s.data or s.fds]


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@fuzz(300)
@given(kind=st.sampled_from(DEVICES), mutations=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_qemu_conversation(kind: str, mutations: list[tuple]) -> None:
    run(fuzz_and_check(kind, mutate(CAPTURE_SENDS[kind], mutations)))


def test_unmutated_qemu_conversation_is_served() -> None:
    """The baseline the mutations start from: QEMU's own bytes, replayed over a real socket."""
    for kind in DEVICES:
        run(fuzz_and_check(kind, mutate(CAPTURE_SENDS[kind], [])))


# ---- (b) random bytes -------------------------------------------------------------------------


@fuzz(150)
@given(kind=st.sampled_from(DEVICES),
       sends=st.lists(st.builds(Send, st.binary(min_size=1, max_size=600), st.lists(fd_kind, max_size=2)),
                      min_size=1, max_size=5))
def test_random_bytes(kind: str, sends: list[Send]) -> None:
    run(fuzz_and_check(kind, sends))


# ---- (c) well-framed headers, random payloads, after a partial or full set-up ----------------------


RING_DESC, RING_AVAIL, RING_USED = 0x0, 0x800, 0x1000


def setup_sends(kind: str, level: int) -> list[Send]:
    """0: nothing; 1: features and REPLY_ACK; 2: plus memory and ring 0 running (as QEMU does)."""
    if level == 0:
        return []
    ack = HeaderFlag.NEED_REPLY

    def msg(req: FrontendReq, payload: bytes = b"", fds: Sequence[str] = (), flags: int = 0) -> Send:
        return Send(HEADER.pack(req, flags | HeaderFlag.VERSION_1, len(payload)) + payload, list(fds))

    features = int(FRAMEWORK_FEATURES) | VHOST_USER_F_PROTOCOL_FEATURES
    sends = [msg(FrontendReq.GET_FEATURES), msg(FrontendReq.GET_PROTOCOL_FEATURES),
             msg(FrontendReq.SET_PROTOCOL_FEATURES, U64(int(offered_protocol(kind))).pack()),
             msg(FrontendReq.SET_OWNER, flags=ack),
             msg(FrontendReq.SET_FEATURES, U64(features).pack(), flags=ack)]
    if level == 1:
        return sends
    va = FRONTEND_VA_BASE
    sends += [msg(FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, MiB, va, 0),)).pack(),
                  [f"memfd:{MiB}"], ack),
              msg(FrontendReq.SET_VRING_NUM, VringState(0, 64).pack(), flags=ack),
              msg(FrontendReq.SET_VRING_BASE, VringState(0, 0).pack(), flags=ack),
              msg(FrontendReq.SET_VRING_ADDR, VringAddr(0, 0, va + RING_DESC, va + RING_USED,
                                                        va + RING_AVAIL).pack(), flags=ack),
              msg(FrontendReq.SET_VRING_CALL, VringFd(0).pack(), ["eventfd"], ack),
              msg(FrontendReq.SET_VRING_KICK, VringFd(0).pack(), ["eventfd"], ack),
              msg(FrontendReq.SET_VRING_ENABLE, VringState(0, 1).pack(), flags=ack)]
    return sends


payload = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([0, 8, 16, 24, 32, 40, 72, 12 + 60]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.builds(lambda i, n: VringState(i, n).pack(), st.sampled_from([0, 1, 2, 255]),
              st.sampled_from([0, 1, 64, 256, 0xFFFF, 0xFFFFFFFF])),
    st.builds(lambda i, nofd: VringFd(i, nofd).pack(), st.sampled_from([0, 1, 255]), st.booleans()),
    st.builds(lambda v: U64(v).pack(), st.integers(0, (1 << 64) - 1)),
)
framed = st.builds(
    lambda req, flags, data, fds: Send(HEADER.pack(req, flags, len(data)) + data, fds),
    st.integers(0, 60),
    st.sampled_from([1, 1, 1, 9, 9]),
    payload,
    st.one_of(st.just([]), st.lists(st.sampled_from(["eventfd", "eventfd", f"memfd:{MiB}", "memfd:4096",
                                                     "socket"]), min_size=1, max_size=3)),
)


@fuzz(300)
@given(kind=st.sampled_from(DEVICES), level=st.integers(0, 2), sends=st.lists(framed, min_size=1, max_size=25))
def test_framed_random_requests(kind: str, level: int, sends: list[Send]) -> None:
    run(fuzz_and_check(kind, setup_sends(kind, level) + sends))


# ---- specific bad inputs, each with the log line that names it --------------------------------------


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in LOGGERS:
        caplog.set_level(logging.WARNING, logger=name)
    return caplog


def logged(caplog: pytest.LogCaptureFixture, *needles: str) -> bool:
    return any(r.name in LOGGERS and r.levelno >= logging.WARNING
               and all(n in r.getMessage() for n in needles) for r in caplog.records)


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records if r.name in LOGGERS]


@contextlib.asynccontextmanager
async def session(kind: str = "rng") -> AsyncIterator[tuple[Running, Frontend]]:
    """A server and one handshaken front-end (every offered protocol feature, REPLY_ACK too).

    On exit: the front-end is gone, the server served the next VM, and the fds are as before.
    """
    async with running(kind) as srv:
        idle = open_fds()
        served = srv.server.connections_served
        fe = await Frontend.connect(srv.path, timeout=2.0)
        try:
            await fe.handshake()
            assert fe.protocol_features & ProtocolFeature.REPLY_ACK
            yield srv, fe
        finally:
            await fe.close()
        await srv.wait_idle(served)
        srv.assert_alive()
        assert_same_fds(idle, "after the bad connection")
        await check_serves(srv)
        assert_same_fds(idle, "after the checking connection")


async def expect_dropped(fe: Frontend, timeout: float = 5.0) -> None:
    """The server closes the connection (and sends nothing first)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = fe.sock.recv(4096)
            except BlockingIOError:
                await _wait(loop, fe.sock.fileno(), write=False)
                continue
            except ConnectionResetError:
                return
            assert not data, f"expected the connection to be dropped, got {data.hex()}"
            return


async def send_with(fe: Frontend, data: bytes, kinds: Sequence[str] = ()) -> None:
    made = [make_fd(k) for k in kinds]
    try:
        await fe.send_raw(data, [fd for fd, _ in made])
    finally:
        for fd, extra in made:
            for f in [fd, *extra]:
                os.close(f)


async def ack_of(fe: Frontend, request: FrontendReq, payload: bytes, kinds: Sequence[str] = ()) -> int:
    await send_with(fe, HEADER.pack(request, HeaderFlag.VERSION_1 | HeaderFlag.NEED_REPLY, len(payload))
                    + payload, kinds)
    return U64.unpack((await fe.read_reply(request, timeout=5.0)).data).value


async def test_payload_size_over_limit_drops_only_that_connection(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session() as (_srv, fe):
        await send_with(fe, HEADER.pack(FrontendReq.SET_VRING_NUM, 1, 4097) + bytes(64), ["eventfd"])
        await expect_dropped(fe)
    assert logged(warnings_log, "payload size above 4096", "4097"), log_lines(warnings_log)


async def test_header_announcing_100_bytes_then_eof(warnings_log: pytest.LogCaptureFixture) -> None:
    async with running("rng") as srv:
        idle = open_fds()
        served = srv.server.connections_served
        await fuzz_connection(srv.path, [Send(HEADER.pack(FrontendReq.SET_VRING_NUM, 1, 100) + bytes(20),
                                              ["eventfd"])])
        await srv.wait_idle(served)
        srv.assert_alive()
        assert_same_fds(idle, "after EOF inside a message")    # the eventfd went with the framer
        await check_serves(srv)


async def test_eof_inside_a_message_is_reported(warnings_log: pytest.LogCaptureFixture) -> None:
    async with running("rng") as srv:
        served = srv.server.connections_served
        await fuzz_connection(srv.path, [Send(HEADER.pack(FrontendReq.SET_VRING_NUM, 1, 100) + bytes(20))])
        await srv.wait_idle(served)
    assert logged(warnings_log, "100"), log_lines(warnings_log)


async def test_mem_table_with_memfd_smaller_than_region(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session() as (srv, fe):
        table = MemoryTable((MemoryRegion(0x4000_0000, MiB, FRONTEND_VA_BASE, 0),)).pack()
        assert await ack_of(fe, FrontendReq.SET_MEM_TABLE, table, ["memfd:4096"]) == 1
        assert srv.device.runtime is not None and srv.device.runtime.mem.regions == ()
        assert await fe.get_features()          # the connection goes on
    assert logged(warnings_log, "SET_MEM_TABLE", "0x40000000"), log_lines(warnings_log)


async def test_mem_table_with_nine_regions(warnings_log: pytest.LogCaptureFixture) -> None:
    regions = b"".join(MemoryRegion(i * MiB, MiB, FRONTEND_VA_BASE + i * MiB, 0).pack() for i in range(9))
    table = struct.pack("=II", 9, 0) + regions
    async with session() as (_srv, fe):
        # Eight fds (the most one message may carry): the request fails, the connection stays.
        assert await ack_of(fe, FrontendReq.SET_MEM_TABLE, table, [f"memfd:{MiB}"] * 8) == 1
        assert await fe.get_features()
    assert logged(warnings_log, "SET_MEM_TABLE", "value=9"), log_lines(warnings_log)


async def test_mem_table_with_nine_fds_drops_the_connection(warnings_log: pytest.LogCaptureFixture) -> None:
    regions = b"".join(MemoryRegion(i * MiB, MiB, FRONTEND_VA_BASE + i * MiB, 0).pack() for i in range(9))
    table = struct.pack("=II", 9, 0) + regions
    async with session() as (_srv, fe):
        await send_with(fe, HEADER.pack(FrontendReq.SET_MEM_TABLE, 9, len(table)) + table, [f"memfd:{MiB}"] * 9)
        await expect_dropped(fe)
    # The kernel delivers the eight that fit and truncates: the count the server names.
    assert logged(warnings_log, "more fds attached", "value=8"), log_lines(warnings_log)


async def test_kick_for_ring_255(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session() as (_srv, fe):
        assert await ack_of(fe, FrontendReq.SET_VRING_KICK, VringFd(255).pack(), ["eventfd"]) == 1
        assert await fe.get_features()
    assert logged(warnings_log, "SET_VRING_KICK", "ring index out of range", "value=255"), log_lines(warnings_log)


async def test_ring_address_outside_memory_fails_the_start(warnings_log: pytest.LogCaptureFixture) -> None:
    far = 0x1000_0000_0000
    async with session() as (srv, fe):
        await fe.set_features(int(FRAMEWORK_FEATURES) | VHOST_USER_F_PROTOCOL_FEATURES)
        memfd, _ = make_fd(f"memfd:{MiB}")
        try:
            await fe.set_mem_table([MemoryRegion(0, MiB, FRONTEND_VA_BASE, 0)], [memfd])
        finally:
            os.close(memfd)
        await fe.set_vring_num(0, 64)
        await fe.set_vring_addr(VringAddr(0, 0, far, far + 0x1000, far + 0x800))   # accepted: only stored
        assert await ack_of(fe, FrontendReq.SET_VRING_KICK, VringFd(0).pack(), ["eventfd"]) == 1
        assert srv.device.runtime is not None and srv.device.runtime.queues == {}
        assert await fe.get_vring_base(0) == 0          # never started: nothing to stop
    assert logged(warnings_log, "SET_VRING_KICK", hex(far)), log_lines(warnings_log)


async def test_get_vring_base_on_a_never_started_ring(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session() as (_srv, fe):
        await fe.set_vring_base(0, 42)
        assert await fe.get_vring_base(0) == 42           # legal: answers the stored base
        raw = await fe.call(FrontendReq.GET_VRING_BASE, VringState(7, 0).pack())
        assert raw is not None and VringState.unpack(raw.data) == VringState(7, 0)
        assert await fe.get_features()
    warned = [line for line in log_lines(warnings_log) if "WARNING" in line or "ERROR" in line]
    assert warned and all("GET_VRING_BASE" in line and "value=7" in line for line in warned), warned


async def test_second_mem_table_while_rings_run(warnings_log: pytest.LogCaptureFixture) -> None:
    async with running("rng") as srv:
        idle = open_fds()
        served = srv.server.connections_served
        vm = await VirtioFrontend.start(srv.path, memory_size=MiB, queue_size=64)
        try:
            assert (await vm.request(0, [Buffer.writable(64)])).length == 64
            runtime = srv.device.runtime
            assert runtime is not None
            old_map = runtime.mem
            # Region 0 moves in the VMM's address space (so it is mapped afresh from
            # the same memfd) and a second region appears.
            extra, _ = make_fd(f"memfd:{MiB}")
            try:
                moved = MemoryRegion(0, MiB, FRONTEND_VA_BASE + (1 << 40), 0)
                added = MemoryRegion(0x1000_0000, MiB, FRONTEND_VA_BASE + 0x1000_0000, 0)
                await vm.fe.set_mem_table([moved, added], [vm.mem.fds[0], extra])
            finally:
                os.close(extra)
            assert runtime.mem is not old_map and len(runtime.mem.regions) == 2
            assert runtime.queues[0].mem is runtime.mem
            for n in (64, 7, 300):
                used = await vm.request(0, [Buffer.writable(n)])
                assert used.length == n and used.written != bytes([POISON]) * n
        finally:
            await vm.close()
        await srv.wait_idle(served)
        srv.assert_alive()
        assert_same_fds(idle, "after two memory tables")
    assert not [line for line in log_lines(warnings_log) if "WARNING" in line or "ERROR" in line]


async def test_set_features_with_bits_never_offered(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session("blk") as (_srv, fe):
        offered = await fe.get_features()
        assert not offered & (1 << 63)
        assert await ack_of(fe, FrontendReq.SET_FEATURES, U64(offered | (1 << 63)).pack()) == 1
        await fe.set_features(offered)                     # the right set still works afterwards
    assert logged(warnings_log, "SET_FEATURES", hex(1 << 63)), log_lines(warnings_log)


async def test_reply_flag_from_the_frontend_drops_the_connection(warnings_log: pytest.LogCaptureFixture) -> None:
    async with session() as (_srv, fe):
        flags = HeaderFlag.VERSION_1 | HeaderFlag.REPLY
        await send_with(fe, HEADER.pack(FrontendReq.GET_FEATURES, flags, 0), ["eventfd"])
        await expect_dropped(fe)
    assert logged(warnings_log, "REPLY flag", "0x5"), log_lines(warnings_log)


# ---- front-ends that do not read; a refused kick fd ----------------------------------------------------------------


async def test_frontend_closing_without_reading_replies() -> None:
    async with running("rng") as srv:
        served = srv.server.connections_served
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(srv.path)
        sock.sendall(HEADER.pack(FrontendReq.GET_FEATURES, 1, 0) * 3)
        sock.close()                     # QEMU killed right after sending
        with contextlib.suppress(TimeoutError):
            await srv.wait_idle(served, timeout=2.0)
        srv.assert_alive()
        await check_serves(srv)


async def test_frontend_pipelining_without_reading() -> None:
    count = 600
    async with running("rng") as srv:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, srv.path)
        try:
            sock.send(HEADER.pack(FrontendReq.GET_FEATURES, 1, 0) * count)
            await asyncio.sleep(0.3)     # the server answers while nobody reads
            srv.assert_alive()
            got = b""
            async with asyncio.timeout(5):
                while len(got) < count * 20:
                    got += await asyncio.get_running_loop().sock_recv(sock, 65536)
            assert len(got) == count * 20
        finally:
            sock.close()
        await check_serves(srv)


async def test_unpollable_kick_fd_on_a_running_ring_leaks_nothing(
        warnings_log: pytest.LogCaptureFixture) -> None:
    async with running("rng") as srv:
        idle = open_fds()
        served = srv.server.connections_served
        vm = await VirtioFrontend.start(srv.path, memory_size=MiB, queue_size=64)
        try:
            memfd, _ = make_fd("memfd:4096")
            try:
                with pytest.raises(ProtocolError, match="acked a failure"):
                    await vm.fe.set_vring_kick(0, memfd)
            finally:
                os.close(memfd)
            # The refusal changed nothing: the ring still runs on its old kick eventfd.
            used = await vm.request(0, [Buffer.writable(64)], timeout=5.0)
            assert used.length == 64 and used.written != bytes([POISON]) * 64
        finally:
            await vm.close()
        await srv.wait_idle(served)
        srv.assert_alive()
        assert logged(warnings_log, "SET_VRING_KICK"), log_lines(warnings_log)
        assert_same_fds(idle, "after a refused kick fd")


async def test_cancel_right_after_a_disconnect_stops_the_server() -> None:
    """SIGTERM (the task cancelled) at any loop iteration around a disconnect stops the server."""
    stuck = []
    for delay in range(12):
        tmp = tempfile.mkdtemp(prefix="vdev-fz-", dir="/tmp")
        path = os.path.join(tmp, "s")
        device = RngDevice()
        task = asyncio.get_running_loop().create_task(serve(device, path))
        try:
            async with asyncio.timeout(5):
                while device.runtime is None or not device.runtime.server.ready.is_set():  # type: ignore[attr-defined]
                    await asyncio.sleep(0.001)
            fe = await Frontend.connect(path, timeout=2.0)
            await fe.get_features()
            await fe.close()
            for _ in range(delay):           # that many loop iterations after the front-end left
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done:
                stuck.append(delay)
        finally:
            await stop(task)                 # cancels again if the first one was swallowed
            shutil.rmtree(tmp, ignore_errors=True)
    assert not stuck, f"cancellation ignored when it came {stuck} loop iterations after the disconnect"
