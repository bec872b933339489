"""SIGTERM and SIGINT stop a real `vdev blk` process cleanly, under load.

What a clean stop means (issue 10, "Clean shutdown and operation"): the
daemon takes no new request, finishes those in flight, flushes its storage
and exits 0, within ``--shutdown-timeout``; a second signal exits at once
with one line saying so, and so does a shutdown that overruns its bound.

The daemon always runs as its own process (``python -m vdev blk``).  Two
kinds of front-end drive it:

* `vdev bench blk` — the C driver, 4 queues at depth 32 of verified random
  writes: the load.  It checks every completion; when the daemon is gone the
  only complaint allowed is requests that were never answered because they
  were never taken ("no completion"), never a bad status or a wrong length.
* `vdev.testing.VirtioFrontend` — requests placed by hand, with the storage
  stalled (`backends.blk.storage.stall`), so that exactly 8 are certainly in
  flight when the signal comes: all 8 must be answered with OK and be on
  storage, the 4 posted after the signal must not be taken, and the NBD
  server's log must show a FLUSH after the last write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.blk.storage import open_storage
from backends.blk.storage.stall import FuseImage, NbdkitImage, StallUnavailable
from vdev.control import control_request
from vdev.testing import Buffer, VirtioFrontend

SECTOR = 512
MiB = 1 << 20
T_OUT = 1
SIGNALS = [signal.SIGTERM, signal.SIGINT]


class Daemon:
    """``python -m vdev <args>`` with its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "vdev", *args],
                                         stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, pattern: str, timeout: float = 20) -> str:
        async with asyncio.timeout(timeout):
            while not re.search(pattern, self.log()):
                assert self.proc.poll() is None, self.log()
                await asyncio.sleep(0.02)
        return self.log()

    async def wait(self, timeout: float = 60) -> int:
        """The exit status (a bound against a hang, not a speed check)."""
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths must stay short.
    with tempfile.TemporaryDirectory(prefix="vdev-stop-") as d:
        yield Path(d)


@contextlib.asynccontextmanager
async def daemon(workdir: Path, *args: str,
                 image: FuseImage | NbdkitImage | None = None) -> AsyncIterator[Daemon]:
    sock = workdir / "blk.sock"
    d = Daemon(["blk", "--socket", str(sock), "--control", str(workdir / "blk.ctl"), *args],
               workdir / "vdev.log")
    try:
        await d.wait_log(r"listening on")
        yield d
    finally:
        if image is not None:
            # A process with I/O waiting on a stopped FUSE server cannot
            # finish dying (not even on SIGKILL) until the server answers.
            image.unstall()
        d.kill()


@contextlib.contextmanager
def stalled_storage(kind: str, workdir: Path) -> Iterator[FuseImage | NbdkitImage]:
    try:
        image: FuseImage | NbdkitImage = FuseImage(workdir, 16 * MiB) if kind == "native" \
            else NbdkitImage(workdir, 16 * MiB)
    except StallUnavailable as exc:
        if os.environ.get("CI") or os.environ.get("VDEV_REQUIRE_QEMU"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield image
    finally:
        image.close()


def backend_of(image: FuseImage | NbdkitImage) -> list[str]:
    if isinstance(image, FuseImage):
        return ["--backend", f"file:{image.path}", "--dataplane", "native"]
    return ["--backend", image.url, "--dataplane", "python"]


def write_req(sector: int, fill: int) -> list[Buffer]:
    return [Buffer.readable(struct.pack("<IIQ", T_OUT, 0, sector)),
            Buffer.readable(bytes([fill]) * SECTOR), Buffer.writable(1)]


async def info(workdir: Path) -> dict[str, Any]:
    return await control_request(str(workdir / "blk.ctl"), {"command": "info"})


async def until_inflight(workdir: Path, n: int) -> None:
    async with asyncio.timeout(20):
        while (await info(workdir))["inflight"] != n:
            await asyncio.sleep(0.02)


async def read_back(image: FuseImage | NbdkitImage, sectors: range) -> list[int]:
    """The first byte of each sector, read from the storage itself."""
    url = f"file:{image.base}" if isinstance(image, FuseImage) else image.url
    storage = await open_storage(url)
    try:
        out = []
        for s in sectors:
            buf = bytearray(SECTOR)
            await storage.readv(s * SECTOR, [memoryview(buf)])
            out.append(buf[0])
        return out
    finally:
        await storage.aclose()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["native", "python"])
async def test_signal_answers_requests_in_flight_takes_no_new_ones_flushes_and_exits_0(
        workdir: Path, kind: str, sig: signal.Signals) -> None:
    with stalled_storage(kind, workdir) as image:
        async with daemon(workdir, *backend_of(image), "--queues", "1", image=image) as d:
            vm = await VirtioFrontend.start(str(workdir / "blk.sock"))
            try:
                for n in range(4):                              # the disk works
                    assert (await vm.request(0, write_req(n, 0x10 + n))).written[-1] == 0
                image.stall()
                # One kick for all eight, so the worker takes them in one pass
                # (on FUSE its io_uring submit then blocks: FUSE ignores NOWAIT).
                heads = [vm.post(0, write_req(100 + n, 0x40 + n), kick=False) for n in range(8)]
                vm.kick(0)
                await until_inflight(workdir, 8)                # all eight on storage
                d.proc.send_signal(sig)
                await d.wait_log(rf"{sig.name}: stopping")
                late = [vm.post(0, write_req(200 + n, 0x80 + n)) for n in range(4)]
                image.unstall()
                done = await vm.wait_used(0, 8, timeout=30)
                assert sorted(u.head for u in done) == sorted(heads)
                assert all(u.written[-1] == 0 for u in done), done          # VIRTIO_BLK_S_OK
                assert await d.wait() == 0, d.log()
                # Nothing more was answered: the late requests were never taken.
                assert vm.queues[0].reap() == [] and vm.queues[0].used_idx == 12
                assert not set(late) & {u.head for u in done}
            finally:
                await vm.close()
        log = d.log()
        assert re.search(r"queue 0 stopped at avail 12\b", log), log        # 4 + 8, not the late 4
        assert "storage flushed" in log and "Traceback" not in log, log
        assert await read_back(image, range(100, 108)) == [0x40 + n for n in range(8)]
        assert await read_back(image, range(200, 204)) == [0] * 4
        if isinstance(image, NbdkitImage):
            requests = [r for r in image.requests() if r in ("Write", "Flush")]
            assert requests[-1] == "Flush" and requests.count("Write") == 12, requests


@pytest.mark.parametrize("kind", ["native", "python"])
async def test_second_signal_exits_at_once_with_one_line(workdir: Path, kind: str) -> None:
    pidfile = workdir / "vdev.pid"
    with stalled_storage(kind, workdir) as image:
        async with daemon(workdir, *backend_of(image), "--pidfile", str(pidfile), image=image) as d:
            vm = await VirtioFrontend.start(str(workdir / "blk.sock"))
            try:
                image.stall()
                for n in range(4):
                    vm.post(0, write_req(n, 1), kick=False)
                vm.kick(0)
                await until_inflight(workdir, 4)
                d.proc.send_signal(signal.SIGTERM)
                await d.wait_log(r"SIGTERM: stopping")
                assert d.proc.poll() is None          # waiting for the stalled requests
                d.proc.send_signal(signal.SIGINT)
                # The line comes at once; the process itself ends once the kernel
                # lets go of its stalled I/O (a FUSE request holds even SIGKILL).
                await d.wait_log(r"second SIGINT")
                if isinstance(image, NbdkitImage):
                    rc = await d.wait(timeout=30)       # nothing holds it: gone already
                image.unstall()
                rc = await d.wait(timeout=30)
            finally:
                await vm.close()
    assert rc == 128 + signal.SIGINT, d.log()
    last = d.log().strip().splitlines()[-1]
    assert last == "vdev blk: second SIGINT: exiting at once, without waiting for requests in flight", last
    assert not pidfile.exists()


async def test_shutdown_that_overruns_its_bound_exits_1_saying_so(workdir: Path) -> None:
    with stalled_storage("python", workdir) as image:
        async with daemon(workdir, *backend_of(image), "--shutdown-timeout", "0.5", image=image) as d:
            vm = await VirtioFrontend.start(str(workdir / "blk.sock"))
            try:
                image.stall()
                vm.post(0, write_req(0, 1))
                await until_inflight(workdir, 1)
                d.proc.send_signal(signal.SIGTERM)
                rc = await d.wait(timeout=30)
                image.unstall()
            finally:
                await vm.close()
    assert rc == 1, d.log()
    last = d.log().strip().splitlines()[-1]
    assert last.startswith("vdev blk: error: shutdown did not finish within 0.5 s"), last


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("dataplane", ["native", "python"])
async def test_signal_under_c_driver_load(workdir: Path, dataplane: str, sig: signal.Signals) -> None:
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    async with daemon(workdir, "--backend", f"file:{image}", "--dataplane", dataplane,
                      "--queues", "4") as d:
        bench = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vdev", "bench", "blk", str(workdir / "blk.sock"), "--rw", "randwrite",
            "--verify", "--iodepth", "32", "--queues", "4", "--seconds", "60", "--warmup", "0",
            "--timeout", "3", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(60):             # the load is on
                while int((await info(workdir))["stats"].get("OUT", 0)) < 2000:
                    await asyncio.sleep(0.05)
            d.proc.send_signal(sig)
            assert await d.wait() == 0, d.log()
            _out, err = await asyncio.wait_for(bench.communicate(), 60)
        finally:
            if bench.returncode is None:
                bench.kill()
                await bench.wait()
    error = err.decode()
    # Every completion the driver saw was right; what it misses was never taken.
    assert bench.returncode == 1 and "no completion with" in error, error
    assert not re.search(r"status|twice|length|mismatch|verify", error.replace("--verify", "")), error
    log = d.log()
    assert len(re.findall(r"queue \d stopped at avail", log)) == 4, log
    assert "storage flushed" in log and "Traceback" not in log, log


async def test_hold_survives_a_queue_stopping_while_it_waits() -> None:
    # The SIGTERM path waits for every native engine in turn (runtime.hold).
    # If the front-end goes away meanwhile, the queues after the one awaited
    # are stopped and their engines closed under the waiting loop; the hold
    # then reached a closed engine, raised TypeError (a NULL engine passed to
    # C) and the daemon never stopped: contrib's socket-activation test hung.
    from backends.blk.device import BlkDevice
    from vdev.testing import device_pair

    device = BlkDevice(await open_storage("mem:1M"), num_queues=2, dataplane="native")
    async with device_pair(device) as vm:
        used = await vm.request(0, write_req(0, 0x5A))
        assert used.written == b"\x00"
        runtime = device.runtime
        assert runtime is not None and sorted(runtime.engines) == [0, 1]
        engines = list(runtime.engines.values())
        hold = asyncio.get_running_loop().create_task(runtime.hold())
        await asyncio.sleep(0)                 # the hold now waits on queue 0's engine
        runtime.stop_vring(1)                  # as a disconnect does
        assert engines[1]._e is None           # closed
        await asyncio.wait_for(hold, 20)       # a bound against a hang, not a speed check
        hold.result()
        # A closed engine is inert, not a crash.
        engines[1].hold()
        engines[1].run()
        assert engines[1].wait_idle(0)
        runtime.release()
