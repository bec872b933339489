"""Test helpers for code that sits on top of a `Storage`.

`FaultyStorage` wraps a real storage and lets a test make the next N
operations fail with a chosen errno, slow them down, or hold them until
released, while counting and recording every call.  The blk device tests use
it to drive the IOERR/UNSUPP paths without a broken disk.

`FakeNbdServer` is an NBD server in the test's own event loop whose
misbehaviour is scriptable (held or reordered replies, error codes, bad
magic, a connection that dies mid-request), for the branches a real server
never takes.  `QemuNbdServer` runs a real ``qemu-nbd`` on an image for tests
of the NBD client (and of the device over NBD).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as errno_mod
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from vdev.errors import DeviceError

from . import nbd_proto as P
from .base import STATUS_IOERR, STATUS_UNSUPP, Storage, buffers_length

__all__ = ["FAKE_NBD_FLAGS", "Call", "FakeNbdServer", "FaultyStorage", "QemuNbdServer", "free_tcp_port"]

#: Operation names FaultyStorage knows (the keys of ``calls``).
OPS = ("read", "write", "flush", "discard", "write_zeroes", "refresh_size")


@dataclass(frozen=True)
class Call:
    """One recorded call: operation, offset and length (0 where none)."""

    op: str
    offset: int = 0
    length: int = 0
    failed: bool = False


@dataclass
class _Fault:
    remaining: int | None   # None: until healed
    errno: int
    status: int


class FaultyStorage(Storage):
    """A `Storage` wrapper that injects faults.

    ::

        disk = FaultyStorage(MemoryStorage(1 << 20))
        disk.fail("read", count=2, errno=errno.EIO)   # next two reads fail
        disk.fail_flushes()                            # next flush fails
        disk.delay(0.01, "write")                      # every write sleeps 10 ms
        disk.pause("read"); ...; disk.resume()         # hold reads until resumed
        disk.calls["read"], disk.history               # what the device did

    A failing call raises `DeviceError` (status 1, or 2 for ENOTSUP/EOPNOTSUPP)
    whose cause is ``OSError(errno)`` and does *not* reach the inner storage.
    Everything else is passed through.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()
        self.history: list[Call] = []
        self.in_flight = 0
        self._faults: dict[str, _Fault] = {}
        self._delays: dict[str | None, float] = {}
        self._gate = asyncio.Event()
        self._gate.set()
        self._paused: set[str] = set()

    # ---- pass-through identity ----------------------------------------------

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    @property
    def read_only(self) -> bool:  # type: ignore[override]
        return self.inner.read_only

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def supports_flush(self) -> bool:
        return self.inner.supports_flush

    @property
    def request_timeout(self) -> float | None:
        return self.inner.request_timeout

    def status(self) -> dict[str, object]:
        return self.inner.status()

    @property
    def supports_discard(self) -> bool:
        return self.inner.supports_discard

    @property
    def supports_write_zeroes(self) -> bool:
        return self.inner.supports_write_zeroes

    # ---- programming faults -------------------------------------------------------

    def fail(self, op: str, count: int | None = 1, errno: int = errno_mod.EIO) -> None:
        """Make the next ``count`` calls of ``op`` fail (``None``: all, until `heal`)."""
        self._check_op(op)
        status = STATUS_UNSUPP if errno in (errno_mod.EOPNOTSUPP, errno_mod.ENOTSUP) else STATUS_IOERR
        self._faults[op] = _Fault(count, errno, status)

    def fail_reads(self, count: int | None = 1, errno: int = errno_mod.EIO) -> None:
        self.fail("read", count, errno)

    def fail_writes(self, count: int | None = 1, errno: int = errno_mod.EIO) -> None:
        self.fail("write", count, errno)

    def fail_flushes(self, count: int | None = 1, errno: int = errno_mod.EIO) -> None:
        self.fail("flush", count, errno)

    def delay(self, seconds: float, op: str | None = None) -> None:
        """Sleep ``seconds`` before every ``op`` (every operation if None); 0 clears."""
        if op is not None:
            self._check_op(op)
        if seconds > 0:
            self._delays[op] = seconds
        else:
            self._delays.pop(op, None)

    def pause(self, *ops: str) -> None:
        """Hold the named operations (all if none named) until `resume`."""
        for op in ops:
            self._check_op(op)
        self._paused = set(ops) if ops else set(OPS)
        self._gate.clear()

    def resume(self) -> None:
        self._paused.clear()
        self._gate.set()

    def heal(self) -> None:
        """Forget every fault, delay and pause."""
        self._faults.clear()
        self._delays.clear()
        self.resume()

    def reset_counts(self) -> None:
        self.calls.clear()
        self.history.clear()

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in OPS:
            raise ValueError(f"unknown storage operation {op!r} (one of {', '.join(OPS)})")

    # ---- the interception ------------------------------------------------------------

    async def _enter(self, op: str, offset: int = 0, length: int = 0) -> None:
        self.calls[op] += 1
        wait = self._delays.get(op, self._delays.get(None, 0.0))
        if wait:
            await asyncio.sleep(wait)
        while op in self._paused:
            await self._gate.wait()
        fault = self._faults.get(op)
        if fault is not None:
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[op]
            self.history.append(Call(op, offset, length, failed=True))
            raise DeviceError(f"injected {op} failure on {self.url}", status=fault.status,
                              value=(offset, length),
                              cause=OSError(fault.errno, os.strerror(fault.errno)))
        self.history.append(Call(op, offset, length))

    async def _forward(self, op: str, offset: int, length: int, coro_fn, *args, **kw):  # type: ignore[no-untyped-def]
        await self._enter(op, offset, length)
        self.in_flight += 1
        try:
            return await coro_fn(*args, **kw)
        finally:
            self.in_flight -= 1

    async def refresh_size(self) -> int:
        return await self._forward("refresh_size", 0, 0, self.inner.refresh_size)

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        await self._forward("read", offset, buffers_length(buffers), self.inner.readv, offset, buffers)

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        await self._forward("write", offset, buffers_length(buffers), self.inner.writev, offset, buffers)

    async def flush(self) -> None:
        await self._forward("flush", 0, 0, self.inner.flush)

    async def discard(self, offset: int, length: int) -> None:
        await self._forward("discard", offset, length, self.inner.discard, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        await self._forward("write_zeroes", offset, length, self.inner.write_zeroes, offset, length,
                            may_unmap=may_unmap)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return await self.inner.extents(offset, length)

    async def aclose(self) -> None:
        self._closed = True
        self._gate.set()  # nobody stays parked on a closed disk
        self._paused.clear()
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<FaultyStorage around {self.inner!r}>"


# ---- a scriptable NBD server -------------------------------------------------------

#: Transmission flags `FakeNbdServer` offers by default.
FAKE_NBD_FLAGS = (P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_TRIM
                  | P.NBD_FLAG_SEND_WRITE_ZEROES)


class FakeNbdServer:
    """A scriptable NBD server on a Unix socket, in the test's event loop."""

    def __init__(self, path: str, *, size: int = 1 << 20, flags: int = FAKE_NBD_FLAGS,
                 fixed_newstyle: bool = True, no_zeroes: bool = True, opt_go: bool = True,
                 exports: tuple[str, ...] = ("disk",), block_size: tuple[int, int, int] | None = None,
                 fragment: bool = False) -> None:
        self.path = path
        self.data = bytearray(size)
        self.flags = flags
        self.fixed_newstyle = fixed_newstyle
        self.no_zeroes = no_zeroes
        self.opt_go = opt_go
        self.exports = exports
        self.block_size = block_size
        self.fragment = fragment
        self.options: list[int] = []
        self.requests: list[tuple[int, int, int, int]] = []   # (cmd, flags, offset, length)
        self.errors: dict[int, int] = {}       # cmd -> NBD error for the next such request
        self.hold = False                      # queue replies until release()
        self.reverse = False                   # release() answers newest first
        self.bad_magic = False
        self.wrong_handle = False
        self.die_on_request = False            # drop the connection when a request arrives
        self.silent = False                    # accept, never greet
        self.garbage = False                   # greet with nonsense
        self.greeting: bytes | None = None     # replace the greeting
        self.go_reply: bytes | None = None     # raw bytes answering NBD_OPT_GO, then hang up
        self.split_reply: asyncio.Event | None = None  # send half a READ reply, wait for this
        self.cut_reply = False                 # send half a READ reply, then drop the connection
        self.got_request = asyncio.Event()
        self.disconnected = asyncio.Event()
        self._held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"nbd+unix:///disk?socket={self.path}"

    async def __aenter__(self) -> FakeNbdServer:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        # Let the handlers see EOF and end on their own (a handler cancelled
        # by loop teardown makes asyncio log a spurious error).
        await asyncio.wait(self._tasks, timeout=2) if self._tasks else None
        await self._server.wait_closed()

    # -- scripting --

    async def release(self) -> None:
        held, self._held = self._held, []
        if self.reverse:
            held.reverse()
        for writer, reply in held:
            await self._send(writer, reply)

    async def wait_requests(self, n: int) -> None:
        while len([r for r in self.requests if r[0] != P.NBD_CMD_DISC]) < n:
            self.got_request.clear()
            await asyncio.wait_for(self.got_request.wait(), 5)

    # -- protocol --

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.fragment:
            writer.write(data)
            await writer.drain()
            return
        # Cut into scraps of random size so replies straddle every boundary.
        rnd = random.Random(len(data))
        pos = 0
        while pos < len(data):
            k = rnd.choice((1, 2, 3, 5, 7, 16, 100, 5000))
            writer.write(data[pos:pos + k])
            await writer.drain()
            await asyncio.sleep(0)
            pos += k

    async def _option_reply(self, writer: asyncio.StreamWriter, opt: int, rtype: int,
                            data: bytes = b"") -> None:
        writer.write(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data)
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        try:
            if self.silent:
                await reader.read()
                return
            if self.garbage:
                writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                await writer.drain()
                return
            hflags = (P.NBD_FLAG_FIXED_NEWSTYLE if self.fixed_newstyle else 0) | \
                     (P.NBD_FLAG_NO_ZEROES if self.no_zeroes else 0)
            writer.write(self.greeting or P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, hflags))
            await writer.drain()
            (cflags,) = P.CLIENT_FLAGS.unpack(await reader.readexactly(4))
            no_zeroes = bool(cflags & P.NBD_FLAG_C_NO_ZEROES)
            while True:
                magic, opt, length = P.OPTION_HEADER.unpack(await reader.readexactly(P.OPTION_HEADER.size))
                assert magic == P.IHAVEOPT
                data = await reader.readexactly(length)
                self.options.append(opt)
                if opt == P.NBD_OPT_EXPORT_NAME:
                    if data.decode() not in self.exports:
                        return  # the only way to refuse EXPORT_NAME
                    writer.write(P.EXPORT_NAME_REPLY.pack(len(self.data), self.flags)
                                 + (b"" if no_zeroes else bytes(P.EXPORT_NAME_PADDING)))
                    await writer.drain()
                    break
                if opt == P.NBD_OPT_ABORT:
                    await self._option_reply(writer, opt, P.NBD_REP_ACK)
                    return
                if opt == P.NBD_OPT_GO and self.go_reply is not None:
                    writer.write(self.go_reply)
                    await writer.drain()
                    return
                if opt in (P.NBD_OPT_GO, P.NBD_OPT_INFO) and self.opt_go:
                    (nlen,) = P.NAME_LENGTH.unpack_from(data)
                    name = data[4:4 + nlen].decode()
                    if name not in self.exports:
                        await self._option_reply(writer, opt, P.NBD_REP_ERR_UNKNOWN, b"no such export")
                        continue
                    # An info type we never asked for must be skipped by the client.
                    await self._option_reply(writer, opt, P.NBD_REP_INFO, struct.pack(">H", 2) + b"nameish")
                    await self._option_reply(writer, opt, P.NBD_REP_INFO,
                                             P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, len(self.data), self.flags))
                    if self.block_size:
                        await self._option_reply(writer, opt, P.NBD_REP_INFO,
                                                 P.INFO_BLOCK_SIZE.pack(P.NBD_INFO_BLOCK_SIZE, *self.block_size))
                    await self._option_reply(writer, opt, P.NBD_REP_ACK)
                    if opt == P.NBD_OPT_GO:
                        break
                    continue
                await self._option_reply(writer, opt, P.NBD_REP_ERR_UNSUP)
            await self._transmission(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(
                await reader.readexactly(P.REQUEST.size))
            assert magic == P.NBD_REQUEST_MAGIC
            self.requests.append((cmd, flags, offset, length))
            self.got_request.set()
            if cmd == P.NBD_CMD_DISC:
                self.disconnected.set()
                return
            payload = await reader.readexactly(length) if cmd == P.NBD_CMD_WRITE else b""
            if self.die_on_request:
                writer.transport.abort()
                return
            error = self.errors.pop(cmd, 0)
            body = b""
            if not error:
                if cmd == P.NBD_CMD_READ:
                    body = bytes(self.data[offset:offset + length])
                elif cmd == P.NBD_CMD_WRITE:
                    self.data[offset:offset + length] = payload
                elif cmd in (P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES):
                    self.data[offset:offset + length] = bytes(length)
            magic_out = 0x12345678 if self.bad_magic else P.NBD_SIMPLE_REPLY_MAGIC
            reply = P.SIMPLE_REPLY.pack(magic_out, error, handle + (1 if self.wrong_handle else 0)) + body
            if self.hold:
                self._held.append((writer, reply))
            elif cmd == P.NBD_CMD_READ and (self.split_reply or self.cut_reply) and body:
                resume = self.split_reply
                half = len(reply) // 2
                writer.write(reply[:half])
                await writer.drain()
                if self.cut_reply:
                    await asyncio.sleep(0.02)
                    writer.transport.abort()
                    return
                assert resume is not None
                await resume.wait()
                writer.write(reply[half:])
                await writer.drain()
            else:
                await self._send(writer, reply)


# ---- qemu-nbd -----------------------------------------------------------------------

def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (racy by nature; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class QemuNbdServer:
    """``qemu-nbd`` serving ``image`` (raw) on a Unix socket or TCP port.

    ::

        with QemuNbdServer(img, socket_path=tmp / "nbd.sock", export="disk") as srv:
            storage = await open_storage(srv.url)

    Starts with ``--persistent --shared=N`` so several clients (and the
    readiness probe) can connect; ``persistent=False, shared=1`` is
    qemu-nbd's default (one client, exits when it leaves).  `suspend` and
    `resume` simulate a hung server, `kill` a crashed one; `start` again
    restarts it on the same socket.
    """

    def __init__(self, image: str | os.PathLike[str], *, socket_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None, export: str = "disk",
                 read_only: bool = False, shared: int = 4, persistent: bool = True,
                 extra_args: Sequence[str] = (), start_timeout: float = 10.0) -> None:
        self.image = os.fspath(image)
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.host = host
        self.port = port
        self.export = export
        self.read_only = read_only
        self.shared = shared
        self.persistent = persistent
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("qemu-nbd") is not None

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{self.export}"

    def start(self) -> QemuNbdServer:
        if self.proc is not None:          # a restart: the old one is gone (killed or stopped)
            if self.proc.poll() is None:
                raise RuntimeError("qemu-nbd is still running")
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)    # a killed qemu-nbd leaves its socket behind
        if self.socket_path is None and self.port is None:
            self.port = free_tcp_port(self.host)
        argv = ["qemu-nbd", "--format=raw", f"--shared={self.shared}", f"--export-name={self.export}"]
        if self.persistent:
            argv.append("--persistent")
        if self.socket_path is not None:
            argv.append(f"--socket={self.socket_path}")
        else:
            argv += ["--bind", self.host, "--port", str(self.port)]
        if self.read_only:
            argv.append("--read-only")
        argv += self.extra_args
        argv.append(self.image)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # Poll until the listening socket accepts; qemu-nbd prints nothing
        # when it is ready.  --persistent makes the probe harmless.
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"qemu-nbd exited with {self.proc.returncode}: {err.strip()}")
            try:
                if self.socket_path is not None and not self.persistent:
                    # A probe would be this qemu-nbd's one client, and it
                    # exits when its last client leaves: wait for the socket.
                    if not os.path.exists(self.socket_path):
                        raise FileNotFoundError(self.socket_path)
                elif self.socket_path is not None:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(self.socket_path)
                else:
                    with socket.create_connection((self.host, self.port), timeout=1):
                        pass
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"qemu-nbd did not start listening within {self.start_timeout}s") from None
                time.sleep(0.01)

    def suspend(self) -> None:
        """SIGSTOP: requests sit unanswered (to have some in flight)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `suspend`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the kernel closes its sockets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def __enter__(self) -> QemuNbdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
