"""``--metrics HOST:PORT``: the Prometheus endpoint of a running ``vdev blk``.

The daemon runs as users run it (a subprocess); the load is the C driver of
`vdev bench blk` over the real vhost-user socket; the endpoint is read with a
plain HTTP GET and parsed with prometheus_client's own parser.  On both data
paths: the counters match what the driver completed, exactly, and survive a
reconnect (the engines retire, their totals stay); every latency histogram is
cumulative and its +Inf bucket is its count; a scraper that never finishes
its request holds neither the I/O nor the control socket.  Bad values exit 2
in one line, a port in use exits 1 before the vhost-user socket exists.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vdev._native import ffi, lib
from vdev.bench.driver import BlkSession, Job, RunResult
from vdev.control import control_request
from vdev.histogram import LatencyHistogram
from vdev.metrics import (
    LATENCY_BUCKETS,
    MonotonicSnapshots,
    QueueSnapshot,
    parse_hostport,
    prometheus_buckets,
)
from vdev.testing import DaemonProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-metrics-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Daemon(DaemonProcess):
    """``vdev blk … --metrics 127.0.0.1:0``; learns the port from the log line.
    Leaving its ``with`` block stops it, and it must exit 0."""

    def __init__(self, short_dir: str, *extra: str) -> None:
        self.sock = os.path.join(short_dir, "blk.sock")
        self.ctl = os.path.join(short_dir, "blk.ctl")
        super().__init__("blk", "--socket", self.sock, "--control", self.ctl, "--metrics", "127.0.0.1:0",
                         "--log-level", "info", *extra, wait_for=[self.sock],
                         wait_log=r"metrics on http://127\.0\.0\.1:(\d+)/metrics",
                         log=os.path.join(short_dir, "blk.log"))

    @property
    def port(self) -> int:
        assert self.match is not None, "not started"
        return int(self.match.group(1))

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            assert r.status == 200
            body = r.read().decode()
        out: Samples = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


JOBS = [Job("randrw", 4096, 4), Job("read", 65536, 2)]


def run_io(sock: str, seconds: float = 0.3) -> RunResult:
    with BlkSession.open(sock, JOBS) as s:
        r = s.run(JOBS, seconds=seconds, warmup=0.0)
        assert r.fault is None, r.fault
        s.stop_rings(r)
    return r


def check_counts(samples: Samples, completed: list[int]) -> None:
    """Every counter of both queues against what the driver completed (all of it)."""
    q0, q1 = completed
    ins = value(samples, "vdev_blk_requests_total", queue="0", type="IN")
    outs = value(samples, "vdev_blk_requests_total", queue="0", type="OUT")
    assert ins > 0 and outs > 0 and ins + outs == q0
    assert value(samples, "vdev_blk_requests_total", queue="1", type="IN") == q1
    assert value(samples, "vdev_blk_requests_total", queue="1", type="OUT") == 0
    assert value(samples, "vdev_blk_read_bytes_total", queue="0") == ins * 4096
    assert value(samples, "vdev_blk_written_bytes_total", queue="0") == outs * 4096
    assert value(samples, "vdev_blk_read_bytes_total", queue="1") == q1 * 65536
    for q, n in (("0", q0), ("1", q1)):
        assert value(samples, "vdev_blk_errors_total", queue=q) == 0
        assert value(samples, "vdev_queue_inflight", queue=q) == 0
        assert value(samples, "vdev_queue_kicks_total", queue=q) > 0
        calls = value(samples, "vdev_queue_calls_total", queue=q)
        suppressed = value(samples, "vdev_queue_calls_suppressed_total", queue=q)
        assert calls > 0
        # one decision per used-ring publication: an interrupt sent or suppressed
        assert calls + suppressed == value(samples, "vdev_queue_batches_total", queue=q)
        check_histogram(samples, q, n)


def check_histogram(samples: Samples, queue: str, count: int) -> None:
    buckets = [(le, v) for (name, labels), v in samples.items() if name == "vdev_blk_latency_seconds_bucket"
               for k, le in labels if k == "le" and ("queue", queue) in labels]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    buckets.sort(key=lambda b: float(b[0]))
    assert buckets[-1][0] == "+Inf"
    cumulative = [v for _, v in buckets]
    assert cumulative == sorted(cumulative), "buckets must be cumulative"
    assert cumulative[-1] == value(samples, "vdev_blk_latency_seconds_count", queue=queue) == count
    assert value(samples, "vdev_blk_latency_seconds_sum", queue=queue) > 0


@pytest.mark.parametrize("dataplane", ["native", "python"])
def test_endpoint_counters_move_with_io_and_survive_a_reconnect(short_dir: str, dataplane: str) -> None:
    with Daemon(short_dir, "--backend", "mem:64M", "--queues", "2", "--dataplane", dataplane) as d:
        before = d.scrape()
        assert value(before, "vdev_info", device="blk", version="0.1.0") == 1
        assert value(before, "vdev_blk_requests_total", queue="0", type="IN") == 0
        assert ("process_cpu_seconds_total", ()) in before

        first = run_io(d.sock)
        done1 = [q.completed for q in first.queues]
        # The session is closed: its rings stopped (native engines retired) and
        # every counter still shows what they did.
        check_counts(d.scrape(), done1)

        second = run_io(d.sock)
        done2 = [a + q.completed for a, q in zip(done1, second.queues)]
        check_counts(d.scrape(), done2)


def test_a_scraper_that_never_finishes_holds_nothing(short_dir: str) -> None:
    # The Python path serves I/O on the event loop: if the endpoint were
    # served there, a stuck scraper would stop the I/O and the control socket.
    with Daemon(short_dir, "--backend", "null:1G", "--queues", "2", "--dataplane", "python") as d:
        stuck = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(3)]
        try:
            for s in stuck:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # no blank line: never ends
            r = run_io(d.sock, seconds=0.2)
            assert all(q.completed > 0 for q in r.queues)
            info = asyncio.run(control_request(d.ctl, {"command": "info"}, timeout=10))
            assert info["ok"] and info["stats"]["IN"] > 0
            assert value(d.scrape(), "vdev_blk_requests_total", queue="1", type="IN") == r.queues[1].completed
        finally:
            for s in stuck:
                s.close()


@pytest.mark.parametrize("bad", ["abc", "127.0.0.1", ":9100", "127.0.0.1:", "127.0.0.1:65536",
                                 "127.0.0.1:-1", "127.0.0.1:http", "::1:9100", "[::1:9100",
                                 "[nope]:9100", "bad_host!:9100"])
def test_bad_metrics_value_exits_2_in_one_line(short_dir: str, bad: str) -> None:
    sock = os.path.join(short_dir, "blk.sock")
    r = subprocess.run([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--backend", "null:1G",
                        "--metrics", bad], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdev blk: error: --metrics"), r.stderr
    assert repr(bad) in lines[0]
    assert not os.path.exists(sock)


def test_metrics_port_in_use_exits_1_before_the_socket_exists(short_dir: str) -> None:
    sock = os.path.join(short_dir, "blk.sock")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--backend", "null:1G",
                            "--metrics", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                           check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"vdev blk: error: --metrics 127.0.0.1:{port}: cannot listen: Address already in use"
    assert not os.path.exists(sock)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_hostport("[::1]:0") == ("::1", 0)
    assert parse_hostport("localhost:80") == ("localhost", 80)
    assert parse_hostport("0.0.0.0:65535") == ("0.0.0.0", 65535)


def test_prometheus_buckets_from_the_log_linear_histogram() -> None:
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    values_ns = [400, 999, 3_000, 3_000, 30_000, 2_000_000, 990_000_000, 5_000_000_000]
    for v in values_ns:
        lib.vd_hist_record(h, v)
    hist = LatencyHistogram.snapshot(h)
    got = prometheus_buckets(hist)
    # cumulative: 400 and 999 ns are under 1 µs, the two 3 µs under 5 µs, 30 µs under
    # 50 µs, 2 ms under 2.5 ms, 990 ms under 1 s; 5 s only under +Inf (999 ms would
    # not be: its bucket reaches past 1 s, and a straddling bucket counts above)
    expected = {"1e-06": 2, "2.5e-06": 2, "5e-06": 4, "1e-05": 4, "2.5e-05": 4, "5e-05": 5,
                "0.0001": 5, "0.00025": 5, "0.0005": 5, "0.001": 5, "0.0025": 6, "0.005": 6,
                "0.01": 6, "0.025": 6, "0.05": 6, "0.1": 6, "0.25": 6, "0.5": 6, "1.0": 7, "+Inf": 8}
    assert got == list(expected.items())


def test_a_retiring_engine_never_makes_a_counter_go_back() -> None:
    """While an engine retires its totals are briefly in neither the live nor the
    retired set; readers on other threads must not report that dip."""
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    for v in (1_000, 2_000, 3_000):
        lib.vd_hist_record(h, v)
    full = QueueSnapshot({**QueueSnapshot.empty().counters, "requests": 3, "kicks": 2, "inflight": 1},
                         (3,) + (0,) * 7, LatencyHistogram.snapshot(h))
    dip = QueueSnapshot.empty()
    later = QueueSnapshot({**full.counters, "requests": 4, "inflight": 0}, (4,) + (0,) * 7, full.latency)

    class Device:
        def __init__(self) -> None:
            self.seq = [{0: full}, {0: dip}, {0: later}]

        def queue_snapshots(self) -> dict[int, QueueSnapshot]:
            return self.seq.pop(0)

    read = MonotonicSnapshots()
    dev = Device()
    first, during, after = read(dev), read(dev), read(dev)   # type: ignore[arg-type]
    assert first[0] == full
    assert during[0].counters["requests"] == 3 and during[0].by_type[0] == 3
    assert during[0].latency == full.latency and during[0].counters["inflight"] == 0   # a gauge: as is
    assert after[0].counters["requests"] == 4 and after[0].counters["kicks"] == 2
