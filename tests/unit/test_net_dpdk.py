"""A second, independent front end: DPDK's virtio-user PMD driving `vdev net --loopback`.

``dpdk-testpmd --vdev net_virtio_user0,path=SOCK`` is a vhost-user front
end written by other people: its own feature negotiation, its own ring
layout and batching, guest memory in hugetlbfs files (one file per memory
segment list with ``--single-file-segments``).  It runs in txonly, rxonly
and io forwarding modes against a loopback device and the frame counts on
both sides must agree.  A separate test maps hugetlbfs regions with a
non-zero ``mmap_offset`` (DPDK 22.11 sends offset 0 for the memory it
uses, so testpmd alone does not reach that case).

Needs root, dpdk-testpmd (Debian ``dpdk``) and 2 MiB hugepages; the fixture
reserves 256 of them and mounts hugetlbfs at /dev/hugepages if nobody has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends.net.device import LoopbackLink, NetDevice
from backends.net.testing import NetHdr, eth_frame
from vdev.device import serve
from vdev.memory import MappedRegion, RegionTable
from vdev.testing import Buffer, DaemonProcess, DriverQueue
from vhost_user.frontend import Frontend
from vhost_user.messages import MemoryRegion, VringAddr

TESTPMD = shutil.which("dpdk-testpmd")
HUGE_DIR = "/dev/hugepages"
HUGEPAGES = 256
HUGEPAGE = 2 << 20

pytestmark = pytest.mark.skipif(TESTPMD is None or os.geteuid() != 0,
                                reason="needs root and dpdk-testpmd (Debian package dpdk)")


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def hugepages() -> str:
    """2 MiB hugepages reserved and hugetlbfs mounted (what DPDK needs)."""
    if _meminfo("HugePages_Total") < HUGEPAGES:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(HUGEPAGES))
    os.makedirs(HUGE_DIR, exist_ok=True)
    with open("/proc/mounts") as f:
        mounted = any(line.split()[1] == HUGE_DIR and line.split()[2] == "hugetlbfs" for line in f)
    if not mounted:
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", HUGE_DIR], check=True)
    if _meminfo("HugePages_Free") < 128:
        pytest.skip(f"only {_meminfo('HugePages_Free')} free 2 MiB hugepages")
    return HUGE_DIR


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-dpdk-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def loopback_daemon(d: str) -> Iterator[tuple[str, str]]:
    """``vdev net --loopback`` serving; it must exit 0 when the block ends."""
    sock, ctl = os.path.join(d, "net.sock"), os.path.join(d, "net.ctl")
    with DaemonProcess("net", "--socket", sock, "--loopback", "--control", ctl, wait_for=[sock],
                       log=os.path.join(d, "net.log")):
        yield sock, ctl


def run_testpmd(sock: str, mode: str, seconds: float, *, tx_first: bool = False,
                until: Callable[[], bool] | None = None) -> tuple[dict[str, int], str]:
    """Run testpmd's virtio-user on ``sock`` for ``seconds`` (or, with ``until``,
    until it says so, at most 120 s); its forward statistics and output."""
    prefix = f"vdev-{uuid.uuid4().hex[:8]}"
    cmd = [TESTPMD or "dpdk-testpmd", "-l", "0-1", "--no-pci", "--file-prefix", prefix,
           "--single-file-segments", "-m", "256", "--huge-dir", HUGE_DIR,
           "--vdev", f"net_virtio_user0,path={sock},queue_size=256",
           "--", f"--forward-mode={mode}", "--nb-cores=1"] + (["--tx-first"] if tx_first else [])
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        if until is None:
            time.sleep(seconds)
        else:
            deadline = time.monotonic() + 120
            while not until() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        out, _ = proc.communicate("\n", timeout=60)     # "Press enter to exit"
    finally:
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
        for f in Path(HUGE_DIR).glob(f"{prefix}*"):
            f.unlink(missing_ok=True)
    block = out.split("Forward statistics for port 0", 1)
    assert len(block) == 2, out[-3000:]
    port = block[1].split("Accumulated", 1)[0]
    stats = {k: int(v) for k, v in re.findall(r"(RX-packets|RX-dropped|TX-packets|TX-dropped): +(\d+)", port)}
    return stats, out


def vdev_info(ctl: str) -> dict[str, dict[str, int]]:
    done = subprocess.run([sys.executable, "-m", "vdev", "ctl", ctl, "info"], capture_output=True, text=True,
                          timeout=30, check=True)
    info = json.loads(done.stdout)
    return {q["kind"]: q for q in info["queues"]}


ERRORS = ("bad_header", "too_short", "too_big", "offload_drops", "link_errors", "bad_chains", "broken")


def test_testpmd_txonly(hugepages: str, short_dir: str) -> None:
    """Every frame testpmd sent was taken by the device and came back on
    receive or, once testpmd (which never reads in txonly) had filled the
    receive ring, was dropped and counted after the bounded wait."""
    with loopback_daemon(short_dir) as (sock, ctl):
        # Until the drops are well under way: testpmd's start and the 1 s
        # wait bound take a variable time on a loaded machine.
        stats, out = run_testpmd(sock, "txonly", 0,
                                 until=lambda: vdev_info(ctl)["rx"]["no_buffer_drops"] > 2000)
        q = vdev_info(ctl)
    sent = stats["TX-packets"]
    assert sent > 1000, out[-2000:]
    assert sent - 256 <= q["tx"]["buffers"] <= sent          # at most a ring left when it stopped
    # At exit virtio-user disables its rings (SET_VRING_ENABLE 0) before it
    # stops them: frames still in the transmit ring then are discarded as
    # the spec's "Ring states" ask (counted as disabled_drops, not on rx).
    # Seen on a loaded machine, where the worker had not drained the ring.
    assert q["rx"]["frames"] + q["rx"]["no_buffer_drops"] + q["tx"]["disabled_drops"] == q["tx"]["buffers"]
    assert q["rx"]["frames"] == 256                            # one ring of buffers, never refilled
    assert all(q[k][e] == 0 for k in ("rx", "tx") for e in ERRORS), q


def test_testpmd_rxonly_gets_back_what_it_sent(hugepages: str, short_dir: str) -> None:
    """rxonly with --tx-first: one burst goes out and exactly that comes back."""
    with loopback_daemon(short_dir) as (sock, ctl):
        stats, out = run_testpmd(sock, "rxonly", 2, tx_first=True)
        q = vdev_info(ctl)
    assert stats["TX-packets"] == stats["RX-packets"] == 32, out[-2000:]
    assert stats["RX-dropped"] == stats["TX-dropped"] == 0
    assert q["tx"]["frames"] == q["rx"]["frames"] == 32 and q["rx"]["dropped"] == 0


def test_testpmd_io_loop(hugepages: str, short_dir: str) -> None:
    """io with --tx-first: a burst circulates testpmd → device → testpmd for two
    seconds; nothing is lost, at most the frames in flight differ."""
    with loopback_daemon(short_dir) as (sock, ctl):
        stats, out = run_testpmd(sock, "io", 2, tx_first=True)
        q = vdev_info(ctl)
    rx, tx = stats["RX-packets"], stats["TX-packets"]
    assert rx > 10_000 and 0 <= tx - rx <= 64, out[-2000:]
    assert stats["RX-dropped"] == stats["TX-dropped"] == 0, out[-2000:]
    assert 0 <= q["rx"]["frames"] - rx <= 256 and q["tx"]["frames"] == q["rx"]["frames"]
    assert q["rx"]["dropped"] == q["tx"]["dropped"] == 0
    assert all(q[k][e] == 0 for k in ("rx", "tx") for e in ERRORS), q


class HugetlbGuestMemory(RegionTable):
    """Guest memory in one hugetlbfs file, cut into regions at non-zero file offsets."""

    def __init__(self, directory: str, spans: list[tuple[int, int, int]]) -> None:
        path = os.path.join(directory, f"vdev-test-{uuid.uuid4().hex[:8]}")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        length = max(off + n for _, n, off in spans)
        os.ftruncate(self.fd, length)
        self._map = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.fds = [self.fd] * len(spans)
        self.vhost_regions = [MemoryRegion(gpa, n, 0x7F00_0000_0000 + gpa, off) for gpa, n, off in spans]
        super().__init__([MappedRegion(gpa, n, 0x7F00_0000_0000 + gpa, memoryview(self._map)[off:off + n])
                          for gpa, n, off in spans])

    def guest_to_frontend(self, gpa: int) -> int:
        return 0x7F00_0000_0000 + gpa

    def close(self) -> None:
        for r in self.regions:
            r.data.release()
        self._map.close()
        os.close(self.fd)


async def test_hugetlbfs_regions_with_nonzero_mmap_offset(hugepages: str, short_dir: str) -> None:
    """Two regions of one hugetlbfs file, the second at file offset 4 MiB and
    guest address 4 GiB, hold the rings and the frames: the device maps
    ``mmap_offset`` right (a region mapped from offset 0 would read the
    first region's bytes and find no ring there)."""
    sock = os.path.join(short_dir, "net.sock")
    dev = NetDevice(LoopbackLink())
    server = asyncio.get_running_loop().create_task(serve(dev, sock))
    mem = HugetlbGuestMemory(hugepages, [(0, 2 * HUGEPAGE, 0), (1 << 32, 2 * HUGEPAGE, 2 * HUGEPAGE)])
    fe = None
    try:
        async with asyncio.timeout(10):
            while not os.path.exists(sock):
                await asyncio.sleep(0.01)
        fe = await Frontend.connect(sock)
        offered, _ = await fe.handshake()
        await fe.set_features(offered)
        await fe.set_mem_table(mem.vhost_regions, mem.fds)
        base = 1 << 32
        ring = DriverQueue.layout_size(64) + 64
        queues, kicks, calls = [], [], []
        for i in range(2):
            q = DriverQueue(mem, 64, base + i * ring, data_start=base + 2 * ring + i * (1 << 20),
                            data_size=1 << 20, event_idx=True)
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.set_vring_num(i, 64)
            await fe.set_vring_base(i, 0)
            await fe.set_vring_addr(VringAddr(i, 0, mem.guest_to_frontend(q.desc), mem.guest_to_frontend(q.used),
                                              mem.guest_to_frontend(q.avail)))
            await fe.set_vring_kick(i, kick)
            await fe.set_vring_call(i, call)
            await fe.set_vring_enable(i, True)
            queues.append(q)
            kicks.append(kick)
            calls.append(call)
        queues[0].add_chain([Buffer.writable(2048)])
        os.eventfd_write(kicks[0], 1)
        frame = eth_frame(b"\xff" * 6, b"\x52\x54\x00\x00\x00\x01", 0x88B5, b"in a huge page" * 10)
        queues[1].add_chain([Buffer.readable(NetHdr().pack() + frame)])
        os.eventfd_write(kicks[1], 1)
        got = []
        async with asyncio.timeout(10):
            while not got:
                got = queues[0].reap()
                await asyncio.sleep(0.01)
        (rx,) = got
        assert rx.written[12:rx.length] == frame
        # The bytes really live at file offset 4 MiB + (ring address - 4 GiB).
        used_idx = bytes(memoryview(mem._map)[2 * HUGEPAGE + (queues[0].used - base) + 2:][:2])
        assert used_idx == b"\x01\x00"
        for fd in kicks + calls:
            os.close(fd)
    finally:
        if fe is not None:
            await fe.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        mem.close()
