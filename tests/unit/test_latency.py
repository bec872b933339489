"""``vdev ctl SOCK latency [--reset]`` and the Python data path's latency histograms.

* against ``vdev blk`` run as a subprocess and loaded by the C driver of
  `vdev bench blk`, on both data paths: the per-queue count is exactly what
  the driver completed; ``--reset`` reports that window and starts a new one,
  after which the counts are exactly what happened since;
* the table on a terminal (a real pty), JSON otherwise, ``--table`` and
  ``--json`` to choose; ``--reset`` on another command and a bad ``reset``
  value are refused naming the value;
* in-process: the Python path records pop -> completion (a request held by
  slow storage shows at least the delay), per queue;
* a window's min and max come from the window, not from the whole run.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage
from backends.blk.storage.testing import FaultyStorage
from vdev._native import ffi, lib
from vdev.bench.driver import BlkSession, Job
from vdev.cli import main
from vdev.control import control_request
from vdev.histogram import LatencyHistogram
from vdev.metrics import window_histogram
from vdev.testing import Buffer, DaemonProcess, device_pair


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-lat-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Daemon(DaemonProcess):
    """``vdev blk`` with its vhost-user and control sockets in ``short_dir``."""

    def __init__(self, short_dir: str, *extra: str) -> None:
        self.sock = os.path.join(short_dir, "blk.sock")
        self.ctl = os.path.join(short_dir, "blk.ctl")
        super().__init__("blk", "--socket", self.sock, "--control", self.ctl, "--log-level", "warning",
                         *extra, wait_for=[self.sock, self.ctl], log=os.path.join(short_dir, "blk.log"))


@pytest.fixture
def daemon(short_dir: str, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    # leaving the block stops it; it must exit 0
    with Daemon(short_dir, "--backend", "mem:64M", "--queues", "2", "--dataplane", request.param) as d:
        yield d


def run_io(sock: str, jobs: list[Job | None], seconds: float) -> dict[int, int]:
    """Run ``jobs`` (one per queue, None: idle); what each queue completed, drain included."""
    with BlkSession.open(sock, jobs) as s:
        r = s.run(jobs, seconds=seconds, warmup=0.0)
        assert r.fault is None, r.fault
        s.stop_rings(r)
    return {q.index: q.completed for q in r.queues}


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["ctl", *argv])
    return rc, capsys.readouterr().out


def latency(capsys: pytest.CaptureFixture[str], path: str, *flags: str) -> dict[str, Any]:
    rc, out = ctl(capsys, path, "latency", *flags)
    assert rc == 0, out
    reply: dict[str, Any] = json.loads(out)    # stdout is not a terminal: JSON
    assert reply["ok"] is True
    return reply


def counts(reply: dict[str, Any]) -> dict[int, int]:
    return {q["queue"]: q["count"] for q in reply["queues"]}


def check_percentiles(q: dict[str, Any]) -> None:
    keys = ["p50", "p90", "p99", "p99.9", "p99.99", "max"]
    assert all(q[k] > 0 for k in keys), q
    assert [q[k] for k in keys] == sorted(q[k] for k in keys), q


@pytest.mark.parametrize("daemon", ["native", "python"], indirect=True)
def test_latency_since_start_and_since_reset(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    first = run_io(daemon.sock, [Job("randread", 4096, 4), Job("randwrite", 4096, 2)], 0.3)
    reply = latency(capsys, daemon.ctl)
    assert reply["since"] == "start" and reply["unit"] == "us" and reply["reset"] is False
    assert counts(reply) == {0: first[0], 1: first[1]}
    assert reply["all"]["count"] == sum(first.values())
    for q in reply["queues"]:
        check_percentiles(q)

    # --reset reports the window that ends now, then a new one starts.
    reply = latency(capsys, daemon.ctl, "--reset")
    assert reply["reset"] is True and counts(reply) == {0: first[0], 1: first[1]}
    reply = latency(capsys, daemon.ctl)
    assert reply["since"] == "reset" and counts(reply) == {0: 0, 1: 0}
    assert reply["all"] == {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0,
                            "p99.99": 0.0, "max": 0.0}

    # Only queue 1 this time: the counts are exactly what happened after the reset.
    second = run_io(daemon.sock, [None, Job("randread", 4096, 1)], 0.2)
    reply = latency(capsys, daemon.ctl)
    assert counts(reply) == {0: 0, 1: second[1]} and second[1] > 0
    check_percentiles(reply["queues"][1])
    # the control socket speaks the same: reset=true as a request field
    direct = asyncio.run(control_request(daemon.ctl, {"command": "latency", "reset": True}))
    assert direct["ok"] and counts(direct) == {0: 0, 1: second[1]}
    assert counts(latency(capsys, daemon.ctl)) == {0: 0, 1: 0}


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_latency_table_on_a_terminal_json_otherwise(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    run_io(daemon.sock, [Job("randread", 4096, 2)], 0.2)
    # a real terminal: the table
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "vdev", "ctl", daemon.ctl, "latency"],
                              stdout=follower, stderr=subprocess.PIPE, timeout=60, check=False)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    text = out.decode().replace("\r\n", "\n")
    lines = text.strip().splitlines()
    assert lines[0].startswith("latency since start")
    assert lines[1].split() == ["queue", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"0"} and int(rows["0"][0]) > 0      # one queue ran: no "all" row
    # --table without a terminal; --json on demand (and by default here)
    rc, out = ctl(capsys, daemon.ctl, "latency", "--table")
    assert rc == 0 and out.startswith("latency since start") and "p99.99" in out
    rc, out = ctl(capsys, daemon.ctl, "latency", "--json")
    assert rc == 0 and json.loads(out)["queues"][0]["count"] == int(rows["0"][0])
    # commands without a table print JSON even with --table
    rc, out = ctl(capsys, daemon.ctl, "info", "--table")
    assert rc == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("daemon", ["native"], indirect=True)
def test_reset_misuse_is_refused_naming_the_value(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ctl", daemon.ctl, "info", "--reset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["vdev ctl: error: --reset applies to the latency command, not 'info'"]
    rc, out = ctl(capsys, daemon.ctl, "latency", "reset=maybe")
    reply = json.loads(out)
    assert rc == 1 and reply["ok"] is False and "'maybe'" in reply["error"]
    rc, out = ctl(capsys, daemon.ctl, "latency", "reset=false")
    assert rc == 0 and json.loads(out)["reset"] is False


async def test_python_path_records_pop_to_completion_per_queue() -> None:
    storage = FaultyStorage(MemoryStorage(1 << 20))
    dev = BlkDevice(storage, dataplane="python", num_queues=2)
    async with device_pair(dev, num_queues=2) as fe:
        storage.delay(0.02, "read")
        for i in range(3):
            await fe.request(1, [Buffer.readable(struct.pack("<IIQ", 0, 0, i)), Buffer.writable(512),
                                 Buffer.writable(1)])
        storage.heal()
        await fe.request(0, [Buffer.readable(struct.pack("<IIQ", 0, 0, 0)), Buffer.writable(512),
                             Buffer.writable(1)])
        snaps = dev.queue_snapshots()
    assert snaps[1].latency.total == 3 and snaps[0].latency.total == 1
    assert snaps[1].latency.min_ns >= 20_000_000       # held by the storage: counted
    assert snaps[0].latency.max_ns < 20_000_000
    assert not snaps[0].native and snaps[1].counters["requests"] == 3


def test_window_min_and_max_are_the_windows() -> None:
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    for v in (1_000, 5_000_000):
        lib.vd_hist_record(h, v)
    base = LatencyHistogram.snapshot(h)
    for v in (20_000, 30_000):
        lib.vd_hist_record(h, v)
    now = LatencyHistogram.snapshot(h)
    w = window_histogram(now, base)
    assert w.total == 2
    # not the run's 1 µs and 5 ms: the window's extremes, within a bucket (0.8 %)
    assert 20_000 * 0.99 <= w.min_ns <= 20_000 and 30_000 <= w.max_ns <= 30_000 * 1.01
    assert w.percentile(100) == w.max_ns
    assert window_histogram(now, None) is now
    assert window_histogram(now, now).total == 0
