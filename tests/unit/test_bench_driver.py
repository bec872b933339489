"""The C virtio-blk driver of `vdev bench blk`, against real back ends over real sockets.

* end to end against ``vdev blk`` run as users run it (a subprocess) at
  depths 2, 16 and 64, and against qemu-storage-daemon, the reference peer;
* a 20 s stress run with ``--verify``: 4 queues x depth 64, mixed reads and
  writes on ``mem:`` storage (`DAEMON_VARIANTS` lists the daemon arguments
  to run it under, so the native engine joins with one line);
* the driver's own fault detection, against `FaultyBlk`, a deliberately
  broken back end served in-process on a real socket: a bad status, a status
  never written, a wrong used length, a head returned twice, a head that was
  never posted, a lost write (caught by --verify), a request never answered;
* ``--json`` and ``--out`` write what they promise and agree with the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vdev._native import ffi, lib
from vdev.bench.driver import BackEndFault, BlkSession, Job, RunResult, proc_sleeps
from vdev.cli import main
from vdev.device import Device, VirtQueue, serve
from vdev.histogram import LatencyHistogram
from vdev.memory import store_u16, store_u32_pair
from vdev.uapi.virtio import DeviceId

SECTOR = 512
QSD = shutil.which("qemu-storage-daemon")

#: Daemon arguments the stress test runs under (the native engine's flags
#: join here when they exist, e.g. ``["--dataplane", "python"]``).
DAEMON_VARIANTS = [pytest.param([], id="default")]


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="vdev-bench-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        if proc.poll() is not None:
            with open(log) as f:
                pytest.fail(f"back end exited with {proc.returncode}: {f.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"back end did not create {path}")
        time.sleep(0.02)


@contextlib.contextmanager
def daemon(argv: list[str], sock: str, log: str) -> Iterator[subprocess.Popen[bytes]]:
    """A back end as a subprocess; SIGTERM (then SIGKILL) at the end, only this one."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_socket(sock, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def vdev_blk(short_dir: str, backend: str, *extra: str) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    sock = os.path.join(short_dir, "vdev.sock")
    return daemon([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--backend", backend,
                   "--log-level", "warning", *extra], sock, os.path.join(short_dir, "vdev.log"))


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# ---- end to end ------------------------------------------------------------------------------


def _check_clean(result: RunResult, session: BlkSession) -> None:
    assert result.fault is None, result.fault
    for q in result.queues:
        # every request posted came back exactly once (the driver checks each head;
        # here the totals), and the back end's ring base agrees
        assert q.completed == q.submitted >= q.job.iodepth
        assert q.requests > 0 and q.histogram.total == q.requests
    bases = session.stop_rings(result)
    assert all(ours == theirs for ours, theirs in bases.values()), bases


@pytest.mark.parametrize("depth", [2, 16, 64])
def test_driver_against_vdev_blk_null(short_dir: str, depth: int) -> None:
    with vdev_blk(short_dir, "null:1G"):
        jobs = [Job("randrw", 4096, depth)]
        with BlkSession.open(os.path.join(short_dir, "vdev.sock"), jobs) as s:
            assert s.capacity == 1 << 30
            r = s.run(jobs, seconds=1.0, warmup=0.2)
            _check_clean(r, s)
            q = r.queues[0]
            assert q.reads > 0 and q.writes > 0


def test_proc_sleeps_counts_a_thread_going_to_sleep() -> None:
    # The benchmarks' "sleeps" column: voluntary context switches, every thread summed.
    before = proc_sleeps(os.getpid())
    assert before is not None
    t = threading.Thread(target=time.sleep, args=(0.01,))
    t.start()
    t.join()
    time.sleep(0.01)
    after = proc_sleeps(os.getpid())
    assert after is not None and after >= before + 1
    assert proc_sleeps(None) is None
    assert proc_sleeps(2**22 + 1) is None        # above pid_max's ceiling: no such process


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed")
def test_driver_against_qemu_storage_daemon(short_dir: str) -> None:
    sock = os.path.join(short_dir, "qsd.sock")
    assert QSD is not None
    argv = [QSD, "--blockdev", "driver=null-co,node-name=n0,size=1073741824,read-zeroes=on",
            "--export", (f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},"
                        "writable=on,num-queues=2")]
    with daemon(argv, sock, os.path.join(short_dir, "qsd.log")):
        for event_idx in (True, False):
            jobs = [Job("randrw", 4096, 32), Job("read", 65536, 4)]
            with BlkSession.open(sock, jobs, event_idx=event_idx) as s:
                assert s.event_idx == event_idx
                r = s.run(jobs, seconds=0.5, warmup=0.1)
                _check_clean(r, s)
                assert r.queues[0].reads and r.queues[0].writes and r.queues[1].bytes


@pytest.mark.parametrize("extra", DAEMON_VARIANTS)
def test_stress_four_queues_verify_randrw(short_dir: str, extra: list[str]) -> None:
    """4 queues x depth 64 for 20 s, mixed reads and writes, data verified."""
    out = os.path.join(short_dir, "stress.json")
    with vdev_blk(short_dir, "mem:64M", "--queues", "4", *extra):
        rc = run_cli(["bench", "blk", os.path.join(short_dir, "vdev.sock"), "--rw", "randrw",
                      "--iodepth", "64", "--queues", "4", "--seconds", "20", "--warmup", "0",
                      "--verify", "--size", "8M", "--json", out])
    with open(out) as f:
        doc = json.load(f)
    assert rc == 0, doc["error"]
    assert doc["error"] is None and not doc["interrupted"]
    assert len(doc["queues"]) == 4
    for q in doc["queues"]:
        assert q["completed"] == q["submitted"] > 64
        assert q["reads"] > 0 and q["writes"] > 0 and q["verified_reads"] > 0
    assert set(doc["ring_bases"]) == {"0", "1", "2", "3"}
    for b in doc["ring_bases"].values():
        assert b["driver_avail_idx"] == b["backend_base"]


# ---- a deliberately broken back end ---------------------------------------------------------


class FaultyBlk(Device):
    """A small virtio-blk device on a bytearray disk that breaks request ``at`` (1-based)
    in the way ``fault`` names; ``seen`` records (head, sector, type) per request."""

    device_id = DeviceId.BLOCK
    name = "faulty-blk"

    def __init__(self, fault: str | None, at: int, capacity: int = 4 << 20) -> None:
        super().__init__(num_queues=1, queue_size=256)
        self.fault = fault
        self.at = at
        self.disk = bytearray(capacity)
        self.n = 0
        self.seen: list[tuple[int, int, int]] = []

    @property
    def has_config(self) -> bool:
        return True

    def config(self) -> bytes:
        return struct.pack("<Q", len(self.disk) // SECTOR) + bytes(52)

    async def process_queue(self, vq: VirtQueue) -> None:
        for chain in vq.chains():
            self.n += 1
            mem = vq.mem
            rtype, _, sector = struct.unpack("<IIQ", mem.read(chain.readable[0].addr, 16))
            self.seen.append((chain.head, sector, rtype))
            status_d = chain.writable[-1]
            off = sector * SECTOR
            faulty = self.n == self.at
            written = 1
            if rtype == 0:
                d = chain.writable[0]
                mem.write(d.addr, bytes(self.disk[off:off + d.len]))
                written = d.len + 1
            elif rtype == 1 and not (faulty and self.fault == "lose-write"):
                d = chain.readable[1]
                self.disk[off:off + d.len] = mem.read(d.addr, d.len)
            if faulty and self.fault == "never":
                continue
            if self.fault == "twice" and self.n == self.at - 1:
                # swallowed, so that the duplicate below never makes used.idx run
                # ahead of what was posted (which the driver reports as that instead)
                continue
            if not (faulty and self.fault == "no-status"):
                mem.view(status_d.addr + status_d.len - 1, 1)[0] = 1 if faulty and self.fault == "ioerr" else 0
            if faulty and self.fault == "length":
                written += 7
            if faulty and self.fault == "foreign-head":
                vq.complete(chain.head + 1, written)
                continue
            if faulty and self.fault in ("twice", "twice-extra"):
                # both used entries published by one store of used.idx, so the
                # driver sees them in one batch whatever its timing
                q = vq.queue
                for k in range(2):
                    store_u32_pair(mem, q.used + 4 + 8 * ((q.next_used + k) % q.size), chain.head, written)
                q.next_used = (q.next_used + 2) & 0xFFFF
                store_u16(mem, q.used + 2, q.next_used)
                q.num_added += 2
                continue
            vq.complete(chain, written)


@contextlib.contextmanager
def served(device: Device, short_dir: str) -> Iterator[str]:
    """Serve ``device`` on a real socket from a thread with its own event loop."""
    path = os.path.join(short_dir, "faulty.sock")
    loop = asyncio.new_event_loop()
    task: asyncio.Task[None] | None = None

    def run() -> None:
        nonlocal task
        asyncio.set_event_loop(loop)
        task = loop.create_task(serve(device, path))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield path
    finally:
        loop.call_soon_threadsafe(lambda: task.cancel() if task else None)
        t.join(10)
        loop.close()


def _fault_run(short_dir: str, fault: str, at: int, job: Job, seconds: float = 5,
               **kw: Any) -> tuple[FaultyBlk, RunResult]:
    dev = FaultyBlk(fault, at)
    with served(dev, short_dir) as path, BlkSession.open(path, [job]) as s:
        r = s.run([job], seconds=seconds, warmup=0, **kw)
    return dev, r


@pytest.mark.parametrize("fault, code, status", [
    ("ioerr", lib.VD_DRV_E_STATUS, 1),
    ("no-status", lib.VD_DRV_E_STATUS, 0xFF),
    ("length", lib.VD_DRV_E_LEN, 0),
])
def test_driver_reports_the_broken_request(short_dir: str, fault: str, code: int, status: int) -> None:
    dev, r = _fault_run(short_dir, fault, 40, Job("randread", 4096, 8))
    err = r.fault
    assert isinstance(err, BackEndFault), err
    assert err.code == code and err.queue == 0
    head, sector, _rtype = dev.seen[39]
    assert (err.head, err.sector, err.op) == (head, sector, "read")
    assert err.status == status
    if fault == "length":
        assert (err.used_len, err.expected_len) == (4096 + 1 + 7, 4096 + 1)
    assert f"head {head}" in str(err) and f"sector {sector}" in str(err)
    # it stopped at that request: nothing after it was counted as done
    assert r.queues[0].completed == 39


def test_driver_catches_a_head_returned_twice(short_dir: str) -> None:
    dev, r = _fault_run(short_dir, "twice", 25, Job("randwrite", 4096, 8))
    err = r.fault
    assert isinstance(err, BackEndFault) and err.code == lib.VD_DRV_E_DUP, err
    assert err.head == dev.seen[24][0]
    assert "returned twice" in str(err)


def test_driver_catches_more_used_entries_than_posted(short_dir: str) -> None:
    # The same duplicate without the swallowed request: used.idx now runs ahead
    # of what the driver posted, which it reports as such when it sees it first.
    dev = FaultyBlk("twice", 12)
    dev.at, dev.fault = 12, "twice-extra"
    job = Job("randwrite", 4096, 1)
    with served(dev, short_dir) as path, BlkSession.open(path, [job]) as s:
        r = s.run([job], seconds=5, warmup=0)
    err = r.fault
    assert isinstance(err, BackEndFault) and err.code == lib.VD_DRV_E_USED_IDX, err
    assert "ran ahead" in str(err)


def test_driver_catches_a_head_it_never_posted(short_dir: str) -> None:
    dev, r = _fault_run(short_dir, "foreign-head", 10, Job("randread", 4096, 4))
    err = r.fault
    assert isinstance(err, BackEndFault) and err.code == lib.VD_DRV_E_HEAD, err
    assert err.head == dev.seen[9][0] + 1


def test_verify_catches_a_lost_write(short_dir: str) -> None:
    # randwrite --verify writes a block and reads it back: the 31st request is a
    # write (odd requests are writes on each slot), and the back end drops it.
    dev, r = _fault_run(short_dir, "lose-write", 31, Job("randwrite", 4096, 1), verify=True,
                        span=1 << 20)
    err = r.fault
    assert isinstance(err, BackEndFault) and err.code == lib.VD_DRV_E_VERIFY, err
    _head, sector, rtype = dev.seen[30]
    assert rtype == 1 and err.sector == sector and err.op == "read"
    assert err.expected_seq == 16 and err.found_seq != 16
    assert "differs from the last write" in str(err)


def test_driver_gives_up_on_a_request_never_answered(short_dir: str) -> None:
    # the other slot keeps completing, so the stall shows when the run drains
    dev, r = _fault_run(short_dir, "never", 5, Job("randread", 4096, 2), seconds=0.5, stall=0.5)
    err = r.fault
    assert isinstance(err, BackEndFault) and err.code == lib.VD_DRV_E_STALL, err
    assert err.head == dev.seen[4][0] and err.inflight >= 1


def test_cli_bad_status_is_one_line_with_head_and_sector(short_dir: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    dev = FaultyBlk("ioerr", 7)
    with served(dev, short_dir) as path:
        rc = run_cli(["bench", "blk", path, "--iodepth", "2", "--seconds", "5", "--warmup", "0"])
    assert rc == 1
    head, sector, _ = dev.seen[6]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (f"vdev bench blk: error: queue 0: bad status 1 (IOERR) for head {head} "
                      f"(read of 4096 bytes at sector {sector})")


def test_clean_faulty_device_passes(short_dir: str) -> None:
    # The same device without a fault: the tests above fail for the fault, not the device.
    dev, r = _fault_run(short_dir, "none", 0, Job("randrw", 4096, 8), seconds=1, verify=True,
                        span=1 << 20)
    assert r.fault is None and dev.n > 100


# ---- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--rw", "randomread"], "'randomread'"),
    (["--bs", "1000"], "'1000'"),
    (["--bs", "4m"], "'4m'"),
    (["--iodepth", "0"], "--iodepth: 0"),
    (["--iodepth", "50", "--queue-size", "128"], "--iodepth: 50"),
    (["--queues", "x"], "'x'"),
    (["--seconds", "0"], "--seconds: 0"),
    (["--seconds", "nan"], "--seconds: nan"),
    (["--warmup", "-1"], "--warmup: -1"),
    (["--rwmixread", "101"], "--rwmixread: 101"),
    (["--queue-size", "100"], "--queue-size: 100"),
    (["--verify", "--rw", "randread"], "--verify"),
    (["--backend-pid", "999999999"], "--backend-pid: 999999999"),
    (["--json", "/nonexistent-dir/x.json"], "/nonexistent-dir"),
    (["--size", "1k"], "--size: '1k'"),
])
def test_bad_values_exit_2_in_one_line(args: list[str], needle: str, short_dir: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # The socket does not exist: a bad value must be reported before any
    # connection attempt (which would retry for --timeout seconds).
    start = time.monotonic()
    rc = run_cli(["bench", "blk", os.path.join(short_dir, "none.sock"), *args])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert time.monotonic() - start < 2


def test_unreachable_socket_is_one_line_exit_1(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(["bench", "blk", os.path.join(short_dir, "none.sock"), "--timeout", "0.2"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.sock" in err[0]


def test_top_level_help_lists_bench_apart_from_devices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    devices, _, tools = out.partition("tools:")
    assert "blk" in devices and "bench" not in devices
    assert "bench" in tools and "ctl" in tools


def _table_value(out: str, name: str) -> float:
    m = re.search(rf"^\s+{re.escape(name)}\s+([\d.]+)", out, re.MULTILINE)
    assert m, (name, out)
    return float(m.group(1))


def test_json_and_out_write_what_they_promise(short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
    from hdrh.log import HistogramLogReader  # type: ignore[import-untyped]

    out_dir = os.path.join(short_dir, "run")
    json_path = os.path.join(short_dir, "r.json")
    with vdev_blk(short_dir, "null:1G") as proc:
        rc = run_cli(["bench", "blk", os.path.join(short_dir, "vdev.sock"), "--rw", "randread",
                      "--iodepth", "4", "--seconds", "1.5", "--warmup", "0.2", "--json", json_path,
                      "--out", out_dir, "--backend-pid", str(proc.pid), "--label", "vdev-null"])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed
    assert captured.err == ""      # no progress line when stderr is not a terminal
    for name in ("result.json", "latency.hlog", "latency.hgrm", "latency-percentiles.png",
                 "latency-over-time.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    with open(json_path) as f:
        doc = json.load(f)
    with open(os.path.join(out_dir, "result.json")) as f:
        assert json.load(f)["result"] == doc["result"]
    res = doc["result"]
    # the document has what issue 7 asks for
    assert doc["workload"]["rw"] == "randread" and doc["workload"]["iodepth"] == 4
    for key in ("cpu", "cores", "kernel", "qemu", "line"):
        assert doc["machine"][key]
    assert res["backend_cpu_us_per_request"] is not None and res["backend_cpu_us_per_request"] > 0
    assert res["kicks_per_request"] is not None and res["wakeups_per_request"] is not None
    # ... and agrees with the printed table
    assert _table_value(printed, "IOPS") == round(res["iops"])
    assert _table_value(printed, "bandwidth") == pytest.approx(res["bandwidth_mib_s"], abs=0.01)
    lat_line = next(line for line in printed.splitlines() if "latency (µs)" in line)
    for key in ("p50", "p90", "p99", "p99.9", "p99.99", "max"):
        m = re.search(rf"\b{re.escape(key)} ([\d.]+)", lat_line)
        assert m and float(m.group(1)) == pytest.approx(res["latency_us"][key], abs=0.051), key
    assert _table_value(printed, "kicks/request") == pytest.approx(res["kicks_per_request"], abs=0.0006)
    # the HdrHistogram in the JSON and the histogram log hold the same requests,
    # and HdrHistogram's own percentiles are those of the table (within its 0.1 %)
    whole = HdrHistogram.decode(doc["histogram"]["encoded"])
    assert whole.get_total_count() == res["requests"] > 0
    reader = HistogramLogReader(os.path.join(out_dir, "latency.hlog"), HdrHistogram(1, 3600 * 10**9, 3))
    acc = HdrHistogram(1, 3600 * 10**9, 3)
    intervals = 0
    try:
        while (h := reader.get_next_interval_histogram()) is not None:
            acc.add(h)
            intervals += 1
    finally:
        reader.close()     # or a later test's fd check sees the GC close it
    assert acc.get_total_count() == res["requests"]
    assert 10 <= intervals <= 17     # 100 ms each over 1.5 s
    # HdrHistogram rounds the rank (int(p*N/100 + 0.5)), we take ceil(p*N/100): allow
    # one rank either side, and HdrHistogram's 0.1 % value resolution
    step = 150.0 / res["requests"]
    for p in (50, 90, 99, 99.9):
        ours = res["latency_us"][f"p{p:g}"] * 1000
        lo, hi = acc.get_value_at_percentile(p - step), acc.get_value_at_percentile(min(100, p + step))
        assert lo * 0.998 - 1 <= ours <= hi * 1.002 + 1, (p, lo, ours, hi)
    assert sum(doc["intervals"]["count"]) == res["requests"]
    with open(os.path.join(out_dir, "latency.hgrm")) as f:
        assert "1/(1-Percentile)" in f.read()
    for png in ("latency-percentiles.png", "latency-over-time.png"):
        with open(os.path.join(out_dir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_line_on_a_terminal(short_dir: str) -> None:
    import pty

    dev = FaultyBlk(None, 0)
    master, slave = pty.openpty()
    try:
        with served(dev, short_dir) as path:
            proc = subprocess.run([sys.executable, "-m", "vdev", "bench", "blk", path, "--seconds", "2.5",
                                   "--warmup", "0"], stderr=slave, stdout=subprocess.PIPE, timeout=60,
                                  check=False)
        os.close(slave)
        slave = -1
        err = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 4096):
                err += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, proc.stdout
    text = err.decode(errors="replace")
    assert re.search(r"1\.\d / 2\.5 s  IOPS [\d,]+", text), text
    assert b"IOPS" in proc.stdout


# ---- the C helpers the sampler uses -----------------------------------------------------------


def test_interval_deltas_add_up_to_the_whole() -> None:
    live = ffi.new("struct vd_hist *")
    lib.vd_hist_init(live)
    prev = ffi.new("struct vd_hist *")
    delta = ffi.new("struct vd_hist *")
    merged = ffi.new("struct vd_hist *")
    lib.vd_hist_init(merged)
    counts = []
    for step in range(5):
        for v in range(1000 * (step + 1), 1000 * (step + 1) + 300 * (step + 1), 3):
            lib.vd_hist_record(live, v)
        n = lib.vd_drv_hist_delta(live, prev, delta)
        counts.append(n)
        assert delta.min_ns >= 1000 * (step + 1) - 8 and delta.max_ns <= 1000 * (step + 1) + 300 * (step + 1)
        lib.vd_drv_hist_add(merged, delta)
    assert counts == [100 * (s + 1) for s in range(5)]
    assert lib.vd_drv_hist_delta(live, prev, delta) == 0
    whole = LatencyHistogram.snapshot(live)
    assert LatencyHistogram.snapshot(merged).counts == whole.counts
    idx = ffi.new("uint32_t[]", lib.VD_HIST_BUCKETS)
    cnt = ffi.new("uint64_t[]", lib.VD_HIST_BUCKETS)
    n = lib.vd_drv_hist_nonzero(live, idx, cnt, lib.VD_HIST_BUCKETS)
    assert {int(idx[i]): int(cnt[i]) for i in range(n)} == {i: c for i, c in enumerate(whole.counts) if c}
