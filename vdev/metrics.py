"""Per-queue counters and latency of a device, on both data paths; the Prometheus endpoint.

**Accounting.**  A started queue is served either by a native engine (a C
worker keeping ``struct vd_engine_stats`` and a ``struct vd_hist``, see
`vdev.engine`) or on the event loop (`vdev.device.VirtQueue`).  The Python
path keeps the same counters in a `QueueStats` per queue and records each
request's pop-to-completion time into a ``struct vd_hist`` of its own, with
the C recorder (``vd_hist_record``: a few hundred nanoseconds, no
allocation).  `QueueAccounts`, owned by every `Device`, adds up per queue
what the Python path counted, what live engines count, and the totals of
engines that stopped (a reconnect, a storage swap that changes path), so a
queue's counters only grow for the life of the daemon whatever served it.

`QueueSnapshot` is one queue's figures at one instant: copies, never live
views.  Copies are safe from any thread: the C histograms and counters are
single-writer with relaxed atomic stores and are copied with relaxed loads
(`vdev.histogram`), an engine is never freed during a copy
(`NativeEngine`'s lock), and the Python counters are plain ints.  Nothing a
reader does stops a worker or takes a lock the data path takes.

**Prometheus.**  ``--metrics HOST:PORT`` (`MetricsServer`) serves
``/metrics`` from prometheus_client's threaded HTTP server.  Its collector
(`DeviceCollector`) takes snapshots at scrape time, in the HTTP thread, so a
slow or stuck scraper never holds up the event loop or a worker.  Metric
names (documented in backends/blk/README.md):

    vdev_info{device,version}                     gauge, 1
    vdev_<dev>_requests_total{queue,type}         counter (type: IN, OUT, FLUSH, ... for blk)
    vdev_<dev>_read_bytes_total{queue}            counter, storage -> guest buffers
    vdev_<dev>_written_bytes_total{queue}         counter, guest buffers -> storage
    vdev_<dev>_errors_total{queue}                counter, requests answered with an error
    vdev_<dev>_latency_seconds{queue}             histogram, pop -> completion
    vdev_queue_kicks_total{queue}                 counter
    vdev_queue_wakeups_total{queue}               counter
    vdev_queue_calls_total{queue}                 counter, interrupts sent
    vdev_queue_calls_suppressed_total{queue}      counter, interrupts the driver did not want
    vdev_queue_batches_total{queue}               counter, used-ring publications
    vdev_queue_polled_total{queue}                counter, batches found by busy-polling
    vdev_queue_bad_chains_total{queue}            counter
    vdev_queue_inflight{queue}                    gauge

plus prometheus_client's ``process_*`` metrics (CPU seconds, memory, fds).
The latency buckets (`LATENCY_BUCKETS`) run from 1 µs to 1 s in 1-2.5-5
steps: from a native engine on a RAM disk to a slow network disk.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._native import ffi, lib
from .control import quote
from .engine import ENGINE_COUNTERS, EngineClosed, NativeEngine
from .errors import VdevError
from .histogram import STANDARD_PERCENTILES, LatencyHistogram, bucket_bounds

if TYPE_CHECKING:
    from .device import Device

log = logging.getLogger("vdev.metrics")

__all__ = ["LATENCY_BUCKETS", "DeviceCollector", "LatencyWindow", "MetricsServer", "MonotonicSnapshots",
           "QueueAccounts", "QueueSnapshot", "QueueStats", "latency_handler", "latency_table",
           "parse_hostport", "prometheus_buckets"]

#: Counters that only grow (every engine counter but the in-flight gauge).
MONOTONIC = tuple(n for n in ENGINE_COUNTERS if n != "inflight")
#: ``struct vd_engine_stats.by_type`` slots.
TYPE_SLOTS = 8

#: Upper bounds (seconds) of the Prometheus latency histogram: 1 µs .. 1 s.
LATENCY_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
                   1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)


class QueueStats:
    """The Python path's live counters of one queue (written on the event loop only).

    The same names as ``struct vd_engine_stats``; ``hist`` is a ``struct
    vd_hist`` recorded with the C recorder, so a snapshot of it is the same
    kind of thing as a native engine's.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.bad_chains = 0
        self.kicks = 0
        self.wakeups = 0
        self.calls = 0
        self.calls_suppressed = 0
        self.batches = 0
        self.polled = 0
        self.by_type = [0] * TYPE_SLOTS
        self.hist: Any = ffi.new("struct vd_hist *")
        lib.vd_hist_init(self.hist)

    def record(self, t_pop_ns: int) -> None:
        """A request popped at ``t_pop_ns`` (`time.monotonic_ns`) completed now."""
        lib.vd_hist_record(self.hist, max(0, time.monotonic_ns() - t_pop_ns))


@dataclass(frozen=True)
class QueueSnapshot:
    """One queue's counters, per-type counts and latency histogram at one instant."""

    counters: Mapping[str, int]
    by_type: tuple[int, ...]
    latency: LatencyHistogram
    native: bool = False

    @classmethod
    def empty(cls) -> QueueSnapshot:
        return cls({n: 0 for n in ENGINE_COUNTERS}, (0,) * TYPE_SLOTS, LatencyHistogram.empty())

    @classmethod
    def of_engine(cls, engine: NativeEngine) -> QueueSnapshot:
        """Copy a live engine (raises `EngineClosed` if it was closed meanwhile)."""
        q = engine.stats()
        hist = engine.histogram()
        return cls({n: q[n] for n in ENGINE_COUNTERS}, tuple(q["by_type"]), hist, native=True)

    @classmethod
    def of_python(cls, stats: QueueStats, inflight: int) -> QueueSnapshot:
        counters = {n: getattr(stats, n) for n in MONOTONIC}
        counters["inflight"] = inflight
        return cls(counters, tuple(stats.by_type), LatencyHistogram.snapshot(stats.hist))

    def __add__(self, other: QueueSnapshot) -> QueueSnapshot:
        return QueueSnapshot({n: self.counters[n] + other.counters[n] for n in ENGINE_COUNTERS},
                             tuple(a + b for a, b in zip(self.by_type, other.by_type)),
                             self.latency + other.latency, self.native or other.native)

    def at_least(self, last: QueueSnapshot) -> QueueSnapshot:
        """This snapshot, but never below ``last`` in any counter (see `DeviceCollector`)."""
        counters = {n: (v if n == "inflight" else max(v, last.counters[n])) for n, v in self.counters.items()}
        by_type = tuple(max(a, b) for a, b in zip(self.by_type, last.by_type))
        latency = self.latency if self.latency.total >= last.latency.total else last.latency
        return QueueSnapshot(counters, by_type, latency, self.native)


@dataclass
class QueueAccounts:
    """What every queue of a device did, across data paths and engine restarts."""

    python: dict[int, QueueStats] = field(default_factory=dict)
    retired: dict[int, QueueSnapshot] = field(default_factory=dict)

    def python_queue(self, index: int) -> QueueStats:
        """The Python path's counters of queue ``index`` (made on first use, then kept)."""
        stats = self.python.get(index)
        if stats is None:
            stats = self.python[index] = QueueStats()
        return stats

    def retire(self, index: int, engine: NativeEngine) -> None:
        """Engine ``index`` stopped: keep its final totals (nothing is in flight any more)."""
        try:
            snap = QueueSnapshot.of_engine(engine)
        except EngineClosed:
            return
        snap = QueueSnapshot({**snap.counters, "inflight": 0}, snap.by_type, snap.latency)
        self.retired[index] = self.retired.get(index, QueueSnapshot.empty()) + snap

    def snapshot(self, engines: Mapping[int, NativeEngine],
                 inflight: Callable[[int], int]) -> dict[int, QueueSnapshot]:
        """Every queue that ever ran, by index; ``inflight(i)``: the Python path's
        requests in flight on queue ``i``.  Safe from any thread."""
        out: dict[int, QueueSnapshot] = {}
        for index, snap in list(self.retired.items()):
            out[index] = snap
        for index, stats in list(self.python.items()):
            snap = QueueSnapshot.of_python(stats, inflight(index))
            out[index] = out[index] + snap if index in out else snap
        for index, engine in list(engines.items()):
            try:
                snap = QueueSnapshot.of_engine(engine)
            except EngineClosed:     # stopped between the listing and the copy
                continue
            out[index] = out[index] + snap if index in out else snap
        return dict(sorted(out.items()))


class MonotonicSnapshots:
    """`Device.queue_snapshots`, never below what an earlier call returned.

    While a queue's engine retires (GET_VRING_BASE, a reconnect, a path
    change) its totals have left the live engines and not yet reached the
    retired ones; a reader on another thread may see the queue's counters
    dip for that moment.  This reports each queue as at least what it
    reported before, so Prometheus sees no counter reset and a latency
    baseline never lies below the truth.
    """

    def __init__(self) -> None:
        self._last: dict[int, QueueSnapshot] = {}
        self._lock = threading.Lock()

    def __call__(self, device: Device) -> dict[int, QueueSnapshot]:
        with self._lock:
            snaps = device.queue_snapshots()
            for index, snap in snaps.items():
                last = self._last.get(index)
                if last is not None:
                    snaps[index] = snap.at_least(last)
            self._last = dict(snaps)
            return snaps


# ---- latency since start or since a reset ------------------------------------------------


def window_histogram(now: LatencyHistogram, base: LatencyHistogram | None) -> LatencyHistogram:
    """What ``now`` recorded since ``base``, with min and max of that window: exact
    when the whole run's extreme lies in the window's extreme bucket, else that
    bucket's bound (0.8 % resolution)."""
    if base is None:
        return now
    diff = now - base
    if diff.total == 0:
        return LatencyHistogram.empty()
    nonzero = [i for i, n in enumerate(diff.counts) if n]
    lo_first, hi_first = bucket_bounds(nonzero[0])
    lo_last, hi_last = bucket_bounds(nonzero[-1])
    min_ns = now.min_ns if lo_first <= now.min_ns <= hi_first else lo_first
    max_ns = now.max_ns if lo_last <= now.max_ns <= hi_last else hi_last
    return LatencyHistogram(diff.counts, diff.total, diff.sum_ns, min_ns, max_ns)


def _summary(hist: LatencyHistogram) -> dict[str, float]:
    s = hist.summary_us(STANDARD_PERCENTILES)
    s["count"] = hist.total
    return s


class LatencyWindow:
    """The ``latency`` control command: per-queue percentiles since start or the last reset.

    A reset is a baseline snapshot kept here and subtracted from later ones;
    the C histograms are never written from Python (they have one writer,
    the worker).  Prometheus counters are not affected by a reset.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self._lock = threading.Lock()     # reports run in worker threads, possibly two at once
        self._snapshots = MonotonicSnapshots()
        self.base: dict[int, QueueSnapshot] = {}
        self.since_unix = time.time()
        self.since_mono = time.monotonic()
        self.since = "start"

    def report(self, *, reset: bool = False) -> dict[str, Any]:
        """The window up to now; with ``reset`` a new window starts right after it,
        so no request falls between a report and the reset.  Safe from any thread."""
        with self._lock:
            return self._report(reset)

    def _report(self, reset: bool) -> dict[str, Any]:
        snaps = self._snapshots(self.device)
        now_mono, now_unix = time.monotonic(), time.time()
        queues = []
        merged = LatencyHistogram.empty()
        for index, snap in snaps.items():
            base = self.base.get(index)
            hist = window_histogram(snap.latency, base.latency if base else None)
            merged = merged + hist
            queues.append({"queue": index, "native": snap.native, **_summary(hist)})
        reply: dict[str, Any] = {
            "unit": "us",
            "since": self.since,
            "since_unix": round(self.since_unix, 3),
            "seconds": round(now_mono - self.since_mono, 3),
            "queues": queues,
            "all": _summary(merged),
            "reset": reset,
        }
        if reset:
            self.base = snaps
            self.since_unix, self.since_mono, self.since = now_unix, now_mono, "reset"
        return reply


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def latency_handler(device: Device) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """The ``latency`` control command of ``device`` (request field ``reset``: bool)."""
    window = LatencyWindow(device)

    async def latency(request: dict[str, Any]) -> dict[str, Any]:
        reset = request.get("reset", False)
        if isinstance(reset, str) and reset.lower() in _TRUE + _FALSE:
            reset = reset.lower() in _TRUE
        if not isinstance(reset, bool):
            raise ValueError(f"latency: 'reset' must be true or false, got {quote(reset)}")  # noqa: TRY004
        # Copying every queue's histogram takes a few hundred µs per queue:
        # off the event loop, which may be serving the Python data path.
        return await asyncio.to_thread(window.report, reset=reset)

    return latency


def latency_table(reply: Mapping[str, Any]) -> str:
    """The ``latency`` reply as a short text table (what ``vdev ctl`` prints on a terminal)."""
    keys = ["p50", "p90", "p99", "p99.9", "p99.99", "max"]
    since = "start" if reply.get("since") == "start" else "the last reset"
    lines = [f"latency since {since} ({reply.get('seconds', 0):.1f} s ago), µs, pop -> completion"
             + ("; reset now" if reply.get("reset") else "")]
    lines.append(f"{'queue':>6} {'count':>10} " + " ".join(f"{k:>9}" for k in keys))
    rows = [(str(q["queue"]), q) for q in reply.get("queues", [])]
    if len(rows) != 1:
        rows.append(("all", reply.get("all", {})))
    for name, q in rows:
        lines.append(f"{name:>6} {int(q.get('count', 0)):>10} "
                     + " ".join(f"{float(q.get(k, 0)):>9.1f}" for k in keys))
    return "\n".join(lines)


# ---- Prometheus ----------------------------------------------------------------------------


def prometheus_buckets(hist: LatencyHistogram, bounds: Iterable[float] = LATENCY_BUCKETS
                       ) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs from our log-linear buckets, +Inf last (its count
    is the histogram's total).  One of our buckets counts under ``le`` when its
    upper bound is at most ``le``: a straddling bucket (0.8 % wide) goes up."""
    limits = [round(b * 1e9) for b in bounds]
    counts = [0] * (len(limits) + 1)
    for i, n in enumerate(hist.counts):
        if n:
            counts[bisect.bisect_left(limits, bucket_bounds(i)[1])] += n
    out: list[tuple[str, int]] = []
    total = 0
    for b, n in zip(bounds, counts):
        total += n
        out.append((_float_text(b), total))
    out.append(("+Inf", total + counts[-1]))
    return out


def _float_text(x: float) -> str:
    # The le label as Prometheus' own clients spell it (1e-06, 0.0001, 1.0).
    return repr(float(x))


class DeviceCollector:
    """A prometheus_client collector over `Device.queue_snapshots`, read at scrape time.

    Each queue is reported as at least what the previous scrape saw
    (`MonotonicSnapshots`), so Prometheus never sees a counter reset that
    did not happen.
    """

    def __init__(self, device: Device | None = None) -> None:
        self.device = device
        self._snapshots = MonotonicSnapshots()

    def describe(self) -> list[Any]:
        return []      # no collect() at registration time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from . import __version__

        device = self.device
        if device is None:
            return
        name = re.sub(r"[^a-zA-Z0-9_]", "_", device.name)
        info = GaugeMetricFamily("vdev_info", "vdev daemon: the device it serves", labels=["device", "version"])
        info.add_metric([device.name, __version__], 1)
        yield info
        snaps = self._snapshots(device)
        types = tuple(device.request_types)
        p = f"vdev_{name}"
        requests = CounterMetricFamily(f"{p}_requests", "Requests completed, by request type",
                                       labels=["queue", "type"] if types else ["queue"])
        read = CounterMetricFamily(f"{p}_read_bytes", "Bytes read from the device's storage or wire "
                                   "into guest buffers", labels=["queue"])
        written = CounterMetricFamily(f"{p}_written_bytes", "Bytes written from guest buffers to the "
                                      "device's storage or wire", labels=["queue"])
        errors = CounterMetricFamily(f"{p}_errors", "Requests answered with an error status",
                                     labels=["queue"])
        latency = HistogramMetricFamily(f"{p}_latency_seconds", "Request latency from pop (avail ring) "
                                        "to completion (used ring)", labels=["queue"])
        generic = {
            "kicks": ("vdev_queue_kicks", "Kick (eventfd) notifications read"),
            "wakeups": ("vdev_queue_wakeups", "Times the queue's server woke up to work"),
            "calls": ("vdev_queue_calls", "Interrupts (call eventfd writes) sent to the driver"),
            "calls_suppressed": ("vdev_queue_calls_suppressed",
                                 "Used-ring publications the driver did not want an interrupt for"),
            "batches": ("vdev_queue_batches", "Used-ring publications"),
            "polled": ("vdev_queue_polled", "Batches found by busy-polling rather than a kick"),
            "bad_chains": ("vdev_queue_bad_chains", "Malformed descriptor chains returned to the driver"),
        }
        families = {k: CounterMetricFamily(n, h, labels=["queue"]) for k, (n, h) in generic.items()}
        inflight = GaugeMetricFamily("vdev_queue_inflight", "Requests taken from the ring and not yet "
                                     "completed", labels=["queue"])
        for index, snap in snaps.items():
            q = str(index)
            c = snap.counters
            if types:
                for slot, tname in enumerate(types):
                    requests.add_metric([q, tname], snap.by_type[slot])
            else:
                requests.add_metric([q], c["requests"])
            read.add_metric([q], c["bytes_read"])
            written.add_metric([q], c["bytes_written"])
            errors.add_metric([q], c["errors"])
            for key, fam in families.items():
                fam.add_metric([q], c[key])
            inflight.add_metric([q], c["inflight"])
            h = snap.latency
            latency.add_metric([q], prometheus_buckets(h), h.sum_ns / 1e9)
        yield requests
        yield read
        yield written
        yield errors
        yield latency
        yield from families.values()
        yield inflight


def parse_hostport(value: str, what: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) -> (host, port).

    Raises:
        ValueError: naming the value.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"{what}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{what}: {value!r}: write an IPv6 address in brackets, e.g. [::1]:9100")
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                                r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", host):
                raise ValueError(f"{what}: {value!r}: {host!r} is not a host name or address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: {value!r}: port {port_text!r} is not a number 0..65535")
    return host, int(port_text)


class MetricsServer:
    """``/metrics`` over HTTP on its own threads (prometheus_client's threaded server).

    `start` binds (raising OSError, e.g. the port is in use) before the device
    exists; `attach` hands it the device; until then a scrape returns only
    the process metrics.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.collector = DeviceCollector()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            ProcessCollector,
            start_http_server,
        )

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        ProcessCollector(registry=registry)
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise VdevError(f"--metrics {self.address}: cannot listen: {reason}") from None
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def attach(self, device: Device) -> None:
        self.collector.device = device

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
