"""Test helpers for code that sits on top of a `Storage`.

`FaultyStorage` wraps a real storage and lets a test make the next N
operations fail with a chosen errno, slow them down, or hold them until
released, while counting and recording every call.  The blk device tests use
it to drive the IOERR/UNSUPP paths without a broken disk.

`QemuNbdServer` runs a real ``qemu-nbd`` on an image for tests of the NBD
client (and of the device over NBD).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno as errno_mod
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from vdev.errors import DeviceError

from .base import STATUS_IOERR, STATUS_UNSUPP, Storage, buffers_length

__all__ = ["FaultyStorage", "Call", "QemuNbdServer", "free_tcp_port"]

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

    async def aclose(self) -> None:
        self._closed = True
        self._gate.set()  # nobody stays parked on a closed disk
        self._paused.clear()
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<FaultyStorage around {self.inner!r}>"


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
    readiness probe) can connect; `kill` simulates a crashed server.
    """

    def __init__(self, image: str | os.PathLike[str], *, socket_path: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None, export: str = "disk",
                 read_only: bool = False, shared: int = 4, extra_args: Sequence[str] = (),
                 start_timeout: float = 10.0) -> None:
        self.image = os.fspath(image)
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.host = host
        self.port = port
        self.export = export
        self.read_only = read_only
        self.shared = shared
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
        if self.socket_path is None and self.port is None:
            self.port = free_tcp_port(self.host)
        argv = ["qemu-nbd", "--format=raw", "--persistent", f"--shared={self.shared}",
                f"--export-name={self.export}"]
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
                if self.socket_path is not None:
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
