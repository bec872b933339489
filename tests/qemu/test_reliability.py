"""QEMU 7.2 guests across faults of the back-end process: `vdev blk` killed and restarted.

A guest runs fio (random writes at depth 16, ``--verify=crc32c``) on a
``vhost-user-blk-pci`` disk whose chardev has ``reconnect=1``; meanwhile the
test kills `vdev blk` with SIGKILL three times and starts it again a second
later on the same socket.  QEMU reconnects, hands the new daemon the
in-flight region it kept (SET_INFLIGHT_FD) and restarts the rings from the
used index; the new daemon takes again every request that was in flight
(vhost-user "Inflight I/O tracking").  fio must finish with no verify error
and the guest's kernel must log no I/O error.

Requests in flight at the moment of the kill are made certain, not left to
chance: the disk image is served through a FUSE export of
qemu-storage-daemon, which the test stops (SIGSTOP) just before the kill, so
the requests the daemon had taken sit in its storage calls; the test reads
how many from the daemon's own counter and checks that the next daemon says
it took exactly that many again.  The second kill of each run falls in the
middle of a live storage swap (`vdev ctl … swap`), held up by those same
stuck requests.

One boot per data path: native (file: storage, two queues, two vCPUs) and
Python (``--dataplane python``, one queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.blk.storage.stall import FuseImage, StallUnavailable
from vdev.control import control_request
from vdev.testing.guest import GuestImage, run_in_guest

MiB = 1 << 20


@pytest.fixture
def fuse_image(tmp_path: Path) -> Iterator[FuseImage]:
    """A 64 MiB image served as a file through qemu-storage-daemon's FUSE export."""
    try:
        image = FuseImage(tmp_path, 64 * MiB)
    except StallUnavailable as exc:
        if os.environ.get("CI") or os.environ.get("VDEV_REQUIRE_QEMU"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield image
    finally:
        image.close()


class Restartable:
    """`vdev blk` as its own process, killed and started again on the same socket."""

    def __init__(self, args: list[str], sock: Path, logdir: Path) -> None:
        self.args = args
        self.sock = sock
        self.logdir = logdir
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.logdir / f"vdev-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()          # the killed daemon's socket: wait for the new one
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "vdev", *self.args],
                                         stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.02)

    def log(self, run: int) -> str:
        return (self.logdir / f"vdev-{run}.log").read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def info(ctl: Path) -> dict[str, Any]:
    return await control_request(str(ctl), {"command": "info"})


async def wait_for(predicate: Callable[[dict[str, Any]], bool], ctl: Path,
                   timeout: float = 120) -> dict[str, Any]:
    """Poll the daemon's info until ``predicate(info)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError, ConnectionError):
                current = await info(ctl)
                if predicate(current):
                    return current
            await asyncio.sleep(0.1)


def resubmitted(log: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) requests were in flight when the previous back end "
                                         r"stopped; taking them again", log))


@pytest.mark.parametrize("dataplane", ["native", "python"])
async def test_fio_verify_survives_three_kills_one_during_a_swap(guest_image: GuestImage,
                                                                  fuse_image: FuseImage,
                                                                  tmp_path: Path, dataplane: str) -> None:
    queues = 2 if dataplane == "native" else 1
    sock, ctl = tmp_path / "blk.sock", tmp_path / "blk.ctl"
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(64 * MiB)
    daemon = Restartable(["blk", "--socket", str(sock), "--backend", f"file:{fuse_image.path}",
                          "--queues", str(queues), "--dataplane", dataplane, "--control", str(ctl)],
                         sock, tmp_path)
    # One job per queue, each verifying its own 16 MiB.
    script = f"""
fio --name=v --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite --bs=4k \
    --size=16M --numjobs={queues} --offset_increment=16M --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --group_reporting
echo "fio-exit=$?"
echo "kernel-errors=$(dmesg | grep -ciE 'error|blocked for more than')"
dmesg | grep -iE 'error|blocked for more than' || true
"""
    kills: list[dict[str, Any]] = []

    async def killer() -> None:
        for k in range(3):
            # Well into the write phase, with requests on storage.
            await wait_for(lambda i: int(i["stats"].get("OUT", 0)) >= 300, ctl)
            fuse_image.stall()
            swap: asyncio.Task[dict[str, Any]] | None = None
            try:
                held = await wait_for(lambda i: int(i["inflight"]) > 0, ctl, timeout=10)
                await asyncio.sleep(0.3)           # let the guest's queue fill up
                held = await info(ctl)
                if k == 1:
                    # A live swap: it holds the queues and waits for the stuck requests.
                    swap = asyncio.create_task(control_request(
                        str(ctl), {"command": "swap", "backend": f"file:{other}"}, timeout=60))
                    held = await wait_for(lambda i: i["paused"] is True, ctl, timeout=10)
                    assert not swap.done(), swap.result()
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGKILL)
            finally:
                await asyncio.sleep(0.2)
                fuse_image.unstall()
            assert daemon.proc is not None
            await asyncio.to_thread(daemon.proc.wait)
            if swap is not None:
                with contextlib.suppress(Exception):
                    await swap                     # the connection died with the daemon
            kills.append({"run": daemon.runs, "inflight": held["inflight"], "swap": swap is not None})
            await asyncio.sleep(1.0)               # "restarted a second later"
            await asyncio.to_thread(daemon.start)

    try:
        await asyncio.to_thread(daemon.start)
        task = asyncio.create_task(killer())
        result = await run_in_guest(
            guest_image, script, timeout=280, smp=queues,
            qemu_args=["-chardev", f"socket,id=c0,path={sock},reconnect=1",
                       "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={queues}"])
        await asyncio.wait_for(task, 5)
    finally:
        rc = daemon.stop()
    out = result.output
    assert result.exit_status == 0, result.console
    assert "fio-exit=0" in out and "err= 0" in out, out
    assert not re.search(r"verify failed|bad magic|bad header", out), out
    assert "kernel-errors=0" in out, out
    assert rc == 0, daemon.log(daemon.runs)
    assert len(kills) == 3 and kills[1]["swap"], kills
    # Each new daemon took again exactly what its predecessor had on storage.
    for kill in kills:
        n, after = kill["inflight"], daemon.log(kill["run"] + 1)
        assert n > 0, kills
        assert resubmitted(after) == n, (kills, after)
