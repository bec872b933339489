"""What a benchmark run leaves behind: the table, result.json, HdrHistogram files, pictures.

* `result_document()` — the JSON of one run (workload, machine line, IOPS,
  bandwidth, percentiles, CPU per request, kicks and wake-ups per request,
  the per-interval series and the whole histogram in HdrHistogram's
  compressed form).
* `write_hdr_files()` — ``latency.hlog`` (HdrHistogram's *histogram log*: one
  compressed interval histogram per 100 ms, readable by HdrHistogram's
  ``HistogramLogProcessor`` and the plotters and merge tools built on it) and
  ``latency.hgrm`` (the percentile distribution text that HdrHistogram's
  ``plotFiles.html`` reads).  Encoded with the ``hdrhistogram`` package.
* `plot_percentiles()`, `plot_over_time()`, `plot_bars()` — PNGs with
  matplotlib's Agg backend (no display): the classic "1/(1-p)" percentile
  plot, p50/p99/max per interval, and IOPS plus back-end CPU per request as
  bars when back ends are compared.  Several runs overlay in one figure.

Values are recorded into the HdrHistogram in nanoseconds at 3 significant
digits (finer than our own 0.8 % buckets), each of our buckets as its upper
bound clamped to the run's maximum — the same value our percentiles report,
so HdrHistogram's tools print the figures of our table.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import __version__
from ..histogram import STANDARD_PERCENTILES, LatencyHistogram, bucket_bounds
from .driver import Interval, RunResult, sparse_percentile

#: HdrHistogram range: 1 ns .. 1 hour, 3 significant digits.
HDR_LOWEST = 1
HDR_HIGHEST = 3_600_000_000_000
HDR_DIGITS = 3

PERCENTILE_KEYS = tuple(f"p{p:g}" for p in STANDARD_PERCENTILES)


# ---- the machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _qemu_version() -> str:
    for prog in ("qemu-storage-daemon", "qemu-system-x86_64"):
        path = shutil.which(prog)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"version\s+(\S+)", out)
        if m:
            return m.group(1)
    return "not found"


_MACHINE: dict[str, Any] | None = None


def machine() -> dict[str, Any]:
    """CPU model, cores, kernel, QEMU version, and one line of all four."""
    global _MACHINE
    if _MACHINE is None:
        cpu, cores = _cpu_model(), os.cpu_count() or 0
        kernel, qemu = f"{platform.system()} {platform.release()}", _qemu_version()
        _MACHINE = {"cpu": cpu, "cores": cores, "kernel": kernel, "qemu": qemu,
                    "line": f"{cpu}, {cores} cores, {kernel}, QEMU {qemu}"}
    return dict(_MACHINE)


# ---- HdrHistogram ----------------------------------------------------------------------


def _hdr(buckets: Iterable[tuple[int, int]], max_ns: int) -> Any:
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

    h = HdrHistogram(HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS)
    for index, count in buckets:
        value = min(bucket_bounds(index)[1], max_ns) if max_ns else bucket_bounds(index)[1]
        h.record_value(max(HDR_LOWEST, min(value, HDR_HIGHEST)), count)
    return h


def _sparse(hist: LatencyHistogram) -> list[tuple[int, int]]:
    return [(i, n) for i, n in enumerate(hist.counts) if n]


def hdr_histogram(hist: LatencyHistogram) -> Any:
    """Our histogram as an ``hdrh.histogram.HdrHistogram`` (ns)."""
    return _hdr(_sparse(hist), hist.max_ns)


def hdr_encode(hist: LatencyHistogram) -> str:
    """HdrHistogram V2 compressed, base64 (the histogram log's payload)."""
    encoded: bytes = hdr_histogram(hist).encode()
    return encoded.decode("ascii")


class Histograms(Protocol):
    """What the HdrHistogram files are made of: a `RunResult`, or a fio run (`vdev.bench.fio`)."""

    @property
    def intervals(self) -> Sequence[Interval]: ...

    @property
    def histogram(self) -> LatencyHistogram: ...


def write_hdr_files(result: Histograms, out_dir: str, *, start_unix: float, tag: str = "") -> list[str]:
    """``latency.hlog`` (interval histograms) and ``latency.hgrm`` (percentile table, µs)."""
    from hdrh.log import HistogramLogWriter  # type: ignore[import-untyped]

    hlog = os.path.join(out_dir, "latency.hlog")
    with open(hlog, "w") as f:
        w = HistogramLogWriter(f)
        w.output_comment(f"[Logged with vdev bench blk {__version__}{(' ' + tag) if tag else ''}]")
        w.output_log_format_version()
        # (hdrh's output_start_time() mis-formats the date; this is the same line, right)
        f.write(f"#[StartTime: {start_unix:.3f} (seconds since epoch), "
                f"{time.strftime('%a %b %d %H:%M:%S %Z %Y', time.localtime(start_unix))}]\n")
        w.output_comment("[Values in nanoseconds; the Interval_Max column in milliseconds]")
        w.output_legend()
        for iv in result.intervals:
            if iv.count == 0:
                continue
            # The interval line as HdrHistogram's Java writer prints it.  (hdrh's
            # output_interval_histogram() floors the max to whole milliseconds.)
            payload = _hdr(iv.buckets, iv.max_ns).encode().decode("ascii")
            f.write(f"{iv.start:.3f},{iv.end - iv.start:.3f},{iv.max_ns / 1e6:.3f},{payload}\n")
    hgrm = os.path.join(out_dir, "latency.hgrm")
    buf = io.BytesIO()
    hdr_histogram(result.histogram).output_percentile_distribution(buf, 1000.0)
    with open(hgrm, "wb") as f:
        f.write(buf.getvalue())
    return [hlog, hgrm]


# ---- the document ----------------------------------------------------------------------


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def latency_us(hist: LatencyHistogram) -> dict[str, float]:
    s = hist.summary_us()
    return {k: s[k] for k in ("mean", *PERCENTILE_KEYS, "max")}


def interval_series(intervals: Sequence[Interval]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"start_s": [], "end_s": [], "count": [], "iops": [],
                                   "p50_us": [], "p99_us": [], "max_us": []}
    for iv in intervals:
        out["start_s"].append(round(iv.start, 4))
        out["end_s"].append(round(iv.end, 4))
        out["count"].append(iv.count)
        span = iv.end - iv.start
        out["iops"].append(round(iv.count / span, 1) if span > 0 else 0.0)
        out["p50_us"].append(iv.percentile(50) / 1000)
        out["p99_us"].append(iv.percentile(99) / 1000)
        out["max_us"].append(iv.max_ns / 1000)
    return out


def result_document(result: RunResult, *, workload: dict[str, Any], target: dict[str, Any],
                    label: str | None = None, error: str | None = None) -> dict[str, Any]:
    hist = result.histogram
    summary = {
        "requests": result.requests,
        "seconds": round(result.seconds, 6),
        "iops": round(result.iops, 1),
        "bandwidth_mib_s": round(result.mib_s, 3),
        "latency_us": latency_us(hist),
        "kicks_per_request": _round(result.kicks_per_request, 4),
        "wakeups_per_request": _round(result.wakeups_per_request, 4),
        "backend_cpu_us_per_request": _round(result.backend_cpu_us),
        "driver_cpu_us_per_request": _round(result.driver_cpu_us),
    }
    queues = [{
        "queue": q.index, "rw": q.job.rw, "bs": q.job.bs, "iodepth": q.job.iodepth,
        "requests": q.requests, "reads": q.reads, "writes": q.writes, "verified_reads": q.verified,
        "submitted": q.submitted, "completed": q.completed,
        "iops": round(q.iops, 1), "bandwidth_mib_s": round(q.mib_s, 3),
        "latency_us": latency_us(q.histogram),
        "kicks_per_request": _round(q.kicks / q.requests, 4) if q.requests else None,
        "wakeups_per_request": _round(q.wakeups / q.requests, 4) if q.requests else None,
        "driver_cpu_us_per_request": _round(q.cpu_ns / q.requests / 1000) if q.requests else None,
    } for q in result.queues]
    return {
        "tool": "vdev bench blk",
        "version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": label,
        "machine": machine(),
        "workload": workload,
        "target": target,
        "result": summary,
        "queues": queues,
        "intervals": {"length_s": result.interval, **interval_series(result.intervals)},
        "histogram": {"format": "HdrHistogram V2 compressed, base64 (as in a histogram log)",
                      "unit": "ns", "significant_digits": HDR_DIGITS, "encoded": hdr_encode(hist)},
        "ring_bases": {str(k): {"driver_avail_idx": a, "backend_base": b}
                       for k, (a, b) in result.ring_bases.items()},
        "interrupted": result.interrupted,
        "error": error,
    }


def write_json(doc: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


# ---- pictures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One run as the pictures see it."""

    label: str
    histogram: LatencyHistogram
    intervals: Sequence[Interval]
    iops: float
    backend_cpu_us: float | None = None
    interval: float = 0.1


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percentile_curve(hist: LatencyHistogram) -> tuple[list[float], list[float]]:
    """(1/(1-p), latency µs) points, HdrHistogram's percentile iteration: 5 ticks per
    halving of the distance to 100 %, up to the last recorded value."""
    xs: list[float] = []
    ys: list[float] = []
    if not hist.total:
        return xs, ys
    sparse = _sparse(hist)
    p = 0.0
    while True:
        value = sparse_percentile(sparse, hist.total, p * 100, hist.max_ns)
        xs.append(1 / (1 - p))
        ys.append(value / 1000)
        if 1 - p < 1 / hist.total:
            break
        p = 1 - (1 - p) / 2 ** (1 / 5)
    xs.append(xs[-1])
    ys.append(hist.max_ns / 1000)
    return xs, ys


def plot_percentiles(series: Sequence[Series], path: str, title: str, *,
                     measured: str = "published → used entry seen") -> None:
    """The percentile curves of ``series`` overlaid; ``measured`` names the latency
    on the y axis (fio's runs: "fio clat, submit → complete")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 10.0
    for s in series:
        xs, ys = _percentile_curve(s.histogram)
        if xs:
            ax.plot(xs, ys, drawstyle="steps-post",
                    label=f"{s.label}: p50 {s.histogram.percentile(50) / 1000:.1f} µs, "
                          f"p99.99 {s.histogram.percentile(99.99) / 1000:.1f} µs, "
                          f"max {s.histogram.max_ns / 1000:.1f} µs ({s.histogram.total} requests)")
            top = max(top, xs[-1])
    ax.set_xscale("log")
    ticks = [1.0]
    while ticks[-1] < top * 1.01:
        ticks.append(ticks[-1] * 10)
    names = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%", "99.99999%"]
    ax.set_xticks(ticks, names[:len(ticks)] + [""] * max(0, len(ticks) - len(names)))
    ax.set_xlim(1, ticks[-1])
    ax.set_xlabel("percentile (log scale of 1/(1-p))")
    ax.set_ylabel(f"latency, µs ({measured})")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_over_time(series: Sequence[Series], path: str, title: str) -> None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, s in enumerate(series):
        c = colors[n % len(colors)]
        ivs = [iv for iv in s.intervals if iv.end > iv.start]
        mid = [(iv.start + iv.end) / 2 for iv in ivs]
        ax.plot(mid, [iv.max_ns / 1000 for iv in ivs], color=c, linestyle=":", label=f"{s.label} max")
        ax.plot(mid, [iv.percentile(99) / 1000 for iv in ivs], color=c, linestyle="--",
                label=f"{s.label} p99")
        ax.plot(mid, [iv.percentile(50) / 1000 for iv in ivs], color=c, linestyle="-",
                label=f"{s.label} p50")
        ax2.plot(mid, [iv.count / (iv.end - iv.start) for iv in ivs], color=c, label=s.label)
    interval = series[0].interval if series else 0.1
    ax.set_yscale("log")
    ax.set_ylabel(f"latency per {interval * 1000:.0f} ms interval, µs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(series)), loc="upper right")
    ax.set_title(title, fontsize=9)
    ax2.set_ylabel("IOPS")
    ax2.set_xlabel("time since the measured window began, s")
    ax2.set_ylim(bottom=0)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(series: Sequence[Series], path: str, title: str) -> None:
    """IOPS and back-end CPU per request, one bar per run."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
    labels = [s.label for s in series]
    iops = [s.iops for s in series]
    cpu = [s.backend_cpu_us or 0.0 for s in series]
    b1 = a1.bar(labels, iops, color="tab:blue")
    a1.bar_label(b1, [f"{v:,.0f}" for v in iops], fontsize=8)
    a1.set_ylabel("IOPS (higher is better)")
    b2 = a2.bar(labels, cpu, color="tab:orange")
    a2.bar_label(b2, [f"{v:.2f}" if s.backend_cpu_us is not None else "n/a"
                      for v, s in zip(cpu, series)], fontsize=8)
    a2.set_ylabel("back-end CPU per request, µs (lower is better)")
    for a in (a1, a2):
        a.tick_params(axis="x", labelrotation=20, labelsize=8)
        a.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
