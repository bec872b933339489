"""The vhost-user server against peers that are not a well-behaved VMM (issue
"Defects found by hostile testing", items 3 and 6).

* item 6: a connection that never speaks is dropped after
  FIRST_REQUEST_TIMEOUT, and the real front-end that arrived meanwhile is
  served; a health check (connect, close) takes nobody's place;
* item 3: running out of file descriptors on accept, with a front-end
  attached, is waited out: the daemon (a real ``vdev blk`` process under a
  low RLIMIT_NOFILE) keeps serving its guest.

Real sockets and real processes throughout; the front-end is `VirtioFrontend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage
from vdev.device import serve
from vdev.testing import Buffer, VirtioFrontend

SECTOR = 512


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-srv-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def served(path: str) -> AsyncIterator[BlkDevice]:
    device = BlkDevice(MemoryStorage(1 << 20))
    task = asyncio.create_task(serve(device, path))
    try:
        yield device
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=10)


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


async def roundtrip(vm: VirtioFrontend, sector: int, byte: bytes) -> None:
    used = await vm.request(0, [header(1, sector), Buffer.readable(byte * SECTOR), Buffer.writable(1)])
    assert used.written == b"\0"
    used = await vm.request(0, [header(0, sector), Buffer.writable(SECTOR), Buffer.writable(1)])
    assert used.written == byte * SECTOR + b"\0"


# ---- item 6 --------------------------------------------------------------------------------

async def test_a_connection_that_never_speaks_does_not_lock_out_the_vmm(short_dir: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(short_dir, "vhost.sock")
    async with served(path):
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(200):
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                silent.connect(path)
                break
            await asyncio.sleep(0.01)
        try:
            await asyncio.sleep(0.2)          # the silent one is the connection being served
            vm = await VirtioFrontend.start(path, timeout=15)
            try:
                await roundtrip(vm, 0, b"v")
            finally:
                await vm.close()
            # the silent connection was dropped (and said so, naming the peer)
            assert silent.recv(1) == b""
            assert any("no complete request" in r.getMessage() and f"pid {os.getpid()}" in r.getMessage()
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
        finally:
            silent.close()


async def test_a_health_check_takes_nobodys_place(short_dir: str) -> None:
    path = os.path.join(short_dir, "vhost.sock")
    async with served(path):
        # nothing attached: probe, then the VMM is served at once
        vm1 = None
        for _ in range(200):
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError), \
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
                break
            await asyncio.sleep(0.01)
        vm1 = await VirtioFrontend.start(path, timeout=5)
        try:
            await roundtrip(vm1, 0, b"1")
            # A probe while the VMM is attached, then the VMM reconnects: its
            # new connection arrives before the old one is gone.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
            await asyncio.sleep(0.1)
            vm2_start = asyncio.create_task(VirtioFrontend.start(path, timeout=5))
            await asyncio.sleep(0.3)
            assert not vm2_start.done()
            await roundtrip(vm1, 1, b"2")       # the attached VMM never noticed
        finally:
            await vm1.close()
        vm2 = await asyncio.wait_for(vm2_start, 10)
        try:
            await roundtrip(vm2, 2, b"3")
        finally:
            await vm2.close()


# ---- item 3 ------------------------------------------------------------------------------------

NOFILE = 40     # the daemon holds about 21 descriptors with a front-end attached


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def test_out_of_file_descriptors_does_not_end_the_daemon(short_dir: str) -> None:
    sock, ctl = os.path.join(short_dir, "blk.sock"), os.path.join(short_dir, "blk.ctl")
    log_path = os.path.join(short_dir, "daemon.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--control", ctl,
                                 "--backend", "mem:1M", "--queues", "1"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=_limit_fds)  # noqa: PLW1509 (one setrlimit call, no locks taken)
    idle: list[socket.socket] = []
    extra: socket.socket | None = None
    try:
        vm = await VirtioFrontend.start(sock, timeout=15)
        try:
            await roundtrip(vm, 0, b"a")
            # Idle control clients until the daemon has no descriptor left.
            # (Non-blocking: once the daemon cannot accept, the backlog
            # fills and a blocking connect would wait for a free slot.)
            stuck = 0
            while len(idle) < 2 * NOFILE and stuck < 10:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.setblocking(False)
                try:
                    c.connect(ctl)
                except BlockingIOError:      # backlog full: let the daemon accept
                    c.close()
                    stuck += 1
                    await asyncio.sleep(0.05)
                    continue
                idle.append(c)
            assert stuck == 10, "the daemon accepted every connection: the limit did not bite"
            await asyncio.sleep(0.5)
            # One more front-end: accept() now fails with EMFILE.
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.connect(sock)
            await asyncio.sleep(0.5)
            assert proc.poll() is None, open(log_path).read()
            await roundtrip(vm, 1, b"b")          # the guest is still served
            for c in idle:
                c.close()
            idle.clear()
            await asyncio.sleep(0.5)
            await roundtrip(vm, 2, b"c")
        finally:
            await vm.close()
        assert proc.poll() is None, open(log_path).read()
        text = open(log_path).read()
        assert text.count("Too many open files") >= 1, text
        assert text.count("cannot accept a front-end") == 1, text     # logged once, not per retry
        assert 1 <= text.count("cannot accept a control client") <= text.count("accepting a control client") + 1, text
        assert "Traceback" not in text, text
    finally:
        for c in idle:
            c.close()
        if extra is not None:
            extra.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, open(log_path).read()

