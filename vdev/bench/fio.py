"""fio's output as vdev bench results: its JSON, its latency logs, the same files and pictures.

The guest-side measurements (``scripts/demo.py``,
``benchmarks/guest_compare_blk.py``) run fio inside a QEMU guest with

    --output-format=json --percentile_list=50:90:99:99.9:99.99
    --write_lat_log=NAME --log_avg_msec=100 --log_max_value=1   # NAME_clat.log: max per 100 ms
    --write_hist_log=NAME --log_hist_msec=100                   # NAME_clat_hist.log: histogram per 100 ms
    --per_job_logs=0                                            # no job number in the log names

and this module turns what fio wrote into what ``vdev bench blk --out``
writes for the host-side driver:

* `parse_fio_json` / `FioDirection`: fio's JSON (the figures of the printed
  table: IOPS, bandwidth, clat percentiles, min, mean and max, as fio
  computed them);
* `parse_hist_log`: fio's completion-latency histogram per interval, in
  fio's own bins (``FIO_IO_U_PLAT_BITS`` = 6: 64 linear bins per power of two,
  1856 bins; each bin read as the value fio itself reports for it,
  `fio_bin_value`, fio's ``plat_idx_to_val``).  Each line holds the
  completions of its interval only (fio writes the difference to the
  previous line);
* `parse_lat_log`: with ``--log_max_value=1`` the largest completion latency
  of each interval (exact, not binned);
* `fio_run` combines them into a `FioRun`: the whole histogram and one
  `Interval` per 100 ms in our log-linear buckets (`vdev.histogram`), which
  `write_run_files` writes as ``result.json``, ``latency.hlog`` and
  ``latency.hgrm`` (`vdev.bench.report`), and `Series` for the pictures.

fio's histogram log has no line for the last, partial interval of a run, so
the histogram (and the HdrHistogram log and pictures made from it) counts a
few requests fewer than fio's JSON; `FioRun.logged` and `FioRun.requests`
say both.  Values are completion latency (``clat``: submission to
completion, inside the guest), in nanoseconds (fio 3 logs ns).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._native import lib
from ..histogram import BUCKETS, STANDARD_PERCENTILES, LatencyHistogram, bucket_bounds
from .driver import Interval
from .report import (
    Series,
    hdr_encode,
    interval_series,
    latency_us,
    machine,
    write_hdr_files,
    write_json,
)

__all__ = [
    "FIO_LOG_OPTIONS",
    "FIO_PLAT_NR",
    "PACK_BEGIN",
    "PACK_END",
    "FioDirection",
    "FioError",
    "FioRun",
    "fio_bin_value",
    "fio_run",
    "guest_pack_command",
    "parse_fio_json",
    "parse_hist_log",
    "parse_lat_log",
    "unpack_guest_output",
    "write_run_files",
]

#: fio's histogram geometry (stat.h): FIO_IO_U_PLAT_BITS, _VAL, _GROUP_NR, _NR.
FIO_PLAT_BITS = 6
FIO_PLAT_VAL = 1 << FIO_PLAT_BITS
FIO_PLAT_GROUP_NR = 29
FIO_PLAT_NR = FIO_PLAT_GROUP_NR * FIO_PLAT_VAL
#: fio's directions in its logs (0 read, 1 write, 2 trim).
DIRECTIONS = ("read", "write", "trim")
#: The interval of every log, ms.
LOG_MSEC = 100
#: What to give fio (besides the log names) for the files this module reads.
FIO_LOG_OPTIONS = (f"--percentile_list=50:90:99:99.9:99.99 --per_job_logs=0 --log_avg_msec={LOG_MSEC} "
                   f"--log_max_value=1 --log_hist_msec={LOG_MSEC}")


class FioError(ValueError):
    """fio's output is not what this module reads (names the file and the line)."""


def fio_bin_value(index: int) -> int:
    """The latency (ns) fio reports for its histogram bin ``index`` (stat.c plat_idx_to_val)."""
    if not 0 <= index < FIO_PLAT_NR:
        raise FioError(f"fio histogram bin {index} is outside 0..{FIO_PLAT_NR - 1}")
    if index < FIO_PLAT_VAL << 1:
        return index
    error_bits = (index >> FIO_PLAT_BITS) - 1
    base = 1 << (error_bits + FIO_PLAT_BITS)
    k = index % FIO_PLAT_VAL
    return int(base + (k + 0.5) * (1 << error_bits))


#: Our bucket for each of fio's bins.
_OUR_BUCKET = [int(lib.vd_hist_index(fio_bin_value(i))) for i in range(FIO_PLAT_NR)]


# ---- fio's JSON ------------------------------------------------------------------------


def parse_fio_json(text: str, what: str = "fio output") -> dict[str, Any]:
    """fio's ``--output-format=json`` document; text fio printed around it is skipped.

    Raises:
        FioError: no JSON object with a ``jobs`` list in ``text``.
    """
    start = text.find("{")
    while start >= 0:
        try:
            doc, _end = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(doc, dict) and isinstance(doc.get("jobs"), list):
            return doc
        start = text.find("{", start + 1)
    raise FioError(f"{what}: no fio JSON document (an object with 'jobs') in {len(text)} characters")


@dataclass(frozen=True)
class FioDirection:
    """One direction (read, write, trim) of one fio job, as fio's JSON reports it."""

    direction: str
    ios: int
    iops: float
    bw_bytes: float
    runtime_ms: int
    min_ns: int
    mean_ns: float
    max_ns: int
    percentiles_ns: dict[float, int]

    @classmethod
    def of_job(cls, job: dict[str, Any]) -> list[FioDirection]:
        """Every direction of ``job`` that did I/O."""
        out = []
        for d in DIRECTIONS:
            r = job.get(d)
            if not isinstance(r, dict) or not r.get("total_ios"):
                continue
            clat = r.get("clat_ns", {})
            pct = {float(k): int(v) for k, v in clat.get("percentile", {}).items()}
            out.append(cls(d, int(r["total_ios"]), float(r["iops"]), float(r["bw_bytes"]),
                           int(r["runtime"]), int(clat.get("min", 0)), float(clat.get("mean", 0.0)),
                           int(clat.get("max", 0)), pct))
        return out

    def latency_us(self) -> dict[str, float | None]:
        """mean, p50 … p99.99 and max in µs, as fio computed them (None: not asked for).

        fio reports a percentile as the middle of its bin, which can lie above
        the largest latency seen; it is clamped to that maximum, as vdev's
        own percentiles are."""
        out: dict[str, float | None] = {"mean": round(self.mean_ns / 1000, 3)}
        for p in STANDARD_PERCENTILES:
            v = self.percentiles_ns.get(p)
            out[f"p{p:g}"] = None if v is None else round(min(v, self.max_ns) / 1000, 3)
        out["max"] = round(self.max_ns / 1000, 3)
        return out


# ---- fio's logs ----------------------------------------------------------------------------


def _rows(text: str, what: str) -> Iterable[tuple[int, list[int]]]:
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip().rstrip(",")
        if not line:
            continue
        try:
            yield n, [int(x) for x in line.split(",")]
        except ValueError:
            raise FioError(f"{what} line {n}: not comma-separated integers: {line[:80]!r}") from None


def parse_hist_log(text: str, what: str = "histogram log") -> list[tuple[int, int, list[int]]]:
    """(time ms, direction, the interval's counts in fio's 1856 bins) per line.

    A log written with ``--log_hist_coarseness=N`` (bins merged 2^N at a time)
    is spread back onto the full bins, each group's count on its first bin.
    """
    out = []
    for n, fields in _rows(text, what):
        if len(fields) < 4:
            raise FioError(f"{what} line {n}: {len(fields)} fields, expected time, direction, size, bins")
        t, ddir, bins = fields[0], fields[1], fields[3:]
        if FIO_PLAT_NR % len(bins) or (FIO_PLAT_NR // len(bins)) & (FIO_PLAT_NR // len(bins) - 1):
            raise FioError(f"{what} line {n}: {len(bins)} bins is not {FIO_PLAT_NR} / 2^N")
        stride = FIO_PLAT_NR // len(bins)
        counts = [0] * FIO_PLAT_NR
        for i, c in enumerate(bins):
            if c < 0:
                raise FioError(f"{what} line {n}: negative count {c}")
            counts[i * stride] = c
        out.append((t, ddir, counts))
    return out


def parse_lat_log(text: str, what: str = "latency log") -> list[tuple[int, int, int]]:
    """(time ms, value ns, direction) per line of a ``--write_lat_log`` file."""
    out = []
    for n, fields in _rows(text, what):
        if len(fields) < 3:
            raise FioError(f"{what} line {n}: {len(fields)} fields, expected time, value, direction, ...")
        out.append((fields[0], fields[1], fields[2]))
    return out


# ---- a run -----------------------------------------------------------------------------------


@dataclass
class FioRun:
    """One fio job against one disk: fio's figures, and its logs in our buckets."""

    label: str
    jobname: str
    directions: list[FioDirection]
    histogram: LatencyHistogram
    intervals: list[Interval]
    interval: float = LOG_MSEC / 1000
    options: dict[str, Any] = field(default_factory=dict)
    backend_cpu_us: float | None = None

    @property
    def main(self) -> FioDirection:
        """The direction with the most I/O (the one the table shows)."""
        return max(self.directions, key=lambda d: d.ios)

    @property
    def requests(self) -> int:
        return sum(d.ios for d in self.directions)

    @property
    def logged(self) -> int:
        return self.histogram.total

    @property
    def iops(self) -> float:
        return sum(d.iops for d in self.directions)

    @property
    def mib_s(self) -> float:
        return sum(d.bw_bytes for d in self.directions) / (1 << 20)

    @property
    def seconds(self) -> float:
        return max(d.runtime_ms for d in self.directions) / 1000

    def series(self) -> Series:
        return Series(self.label, self.histogram, self.intervals, self.iops, self.backend_cpu_us, self.interval)


def _histogram(counts: Counter[int], min_ns: int, max_ns: int) -> LatencyHistogram:
    ours = [0] * BUCKETS
    sum_ns = 0
    for fio_bin, n in counts.items():
        ours[_OUR_BUCKET[fio_bin]] += n
        sum_ns += fio_bin_value(fio_bin) * n
    total = sum(ours)
    if not total:
        return LatencyHistogram.empty()
    return LatencyHistogram(tuple(ours), total, sum_ns, min_ns, max_ns)


def fio_run(label: str, job: dict[str, Any], hist_text: str, lat_text: str | None = None, *,
            what: str = "") -> FioRun:
    """A `FioRun` from one job of fio's JSON, its ``_clat_hist.log`` and (optional)
    its ``_clat.log`` written with ``--log_max_value=1``.

    Raises:
        FioError: the job did no I/O, or a log does not parse.
    """
    name = str(job.get("jobname", "?"))
    directions = FioDirection.of_job(job)
    if not directions:
        raise FioError(f"{what or name}: fio job {name!r} did no I/O (error {job.get('error')})")
    hist_rows = parse_hist_log(hist_text, f"{what or name} histogram log")
    lat_rows = parse_lat_log(lat_text, f"{what or name} latency log") if lat_text else []
    by_time: dict[int, Counter[int]] = defaultdict(Counter)
    for t, _ddir, counts in hist_rows:
        c = by_time[t]
        for i, n in enumerate(counts):
            if n:
                c[i] += n
    intervals: list[Interval] = []
    previous = None
    for t in sorted(by_time):
        start = max(0, t - LOG_MSEC) if previous is None else previous
        previous = t
        interval_counts = by_time[t]
        if not interval_counts:
            intervals.append(Interval(start / 1000, t / 1000, 0, 0, 0, ()))
            continue
        ours: Counter[int] = Counter()
        for fio_bin, n in interval_counts.items():
            ours[_OUR_BUCKET[fio_bin]] += n
        buckets = tuple(sorted(ours.items()))
        # The interval's exact max from the latency log (its lines carry the same
        # times, give or take a millisecond); else the top bucket's bound.  (The
        # exact max may lie below our bucket of fio's bin value, the middle of a
        # 1.6 % wide bin: percentiles are clamped to it.)
        maxes = [v for tl, v, _d in lat_rows if start < tl <= t + 1]
        max_ns = max(maxes) if maxes else bucket_bounds(buckets[-1][0])[1]
        intervals.append(Interval(start / 1000, t / 1000, sum(ours.values()), bucket_bounds(buckets[0][0])[0],
                                  max_ns, buckets))
    total: Counter[int] = Counter()
    for c in by_time.values():
        total.update(c)
    min_ns = min(d.min_ns for d in directions)
    max_ns = max(d.max_ns for d in directions)
    hist = _histogram(total, min_ns, max_ns)
    return FioRun(label, name, directions, hist, intervals, options=dict(job.get("job options", {})))


def run_document(run: FioRun, *, workload: dict[str, Any], target: dict[str, Any],
                 guest: dict[str, Any], fio_version: str | None = None) -> dict[str, Any]:
    """The ``result.json`` of one fio run (the shape of ``vdev bench blk``'s, plus fio's own)."""
    main = run.main
    return {
        "tool": "fio in a QEMU guest",
        "fio_version": fio_version,
        "label": run.label,
        "machine": machine(),
        "guest": guest,
        "workload": workload,
        "target": target,
        "result": {
            "requests": run.requests,
            "seconds": run.seconds,
            "iops": round(run.iops, 1),
            "bandwidth_mib_s": round(run.mib_s, 3),
            "direction": main.direction,
            "latency_us": main.latency_us(),
            "latency_us_from_hist_log": latency_us(run.histogram) if run.histogram.total else None,
            "requests_in_hist_log": run.logged,
            "backend_cpu_us_per_request": None if run.backend_cpu_us is None else round(run.backend_cpu_us, 3),
        },
        "directions": {d.direction: {"ios": d.ios, "iops": round(d.iops, 1), "bw_bytes": d.bw_bytes,
                                     "latency_us": d.latency_us()} for d in run.directions},
        "fio_job_options": run.options,
        "intervals": {"length_s": run.interval, **interval_series(run.intervals)},
        "histogram": {"format": "HdrHistogram V2 compressed, base64 (as in a histogram log)",
                      "unit": "ns", "source": "fio clat histogram log",
                      "encoded": hdr_encode(run.histogram) if run.histogram.total else None},
    }


def write_run_files(run: FioRun, out_dir: str, doc: dict[str, Any], *, start_unix: float) -> list[str]:
    """``result.json``, ``latency.hlog`` and ``latency.hgrm`` of one run into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "result.json")
    write_json(doc, path)
    written = [path]
    if run.histogram.total:
        written += write_hdr_files(run, out_dir, start_unix=start_unix, tag=f"from fio: {run.label}")
    return written


# ---- getting the files out of a guest --------------------------------------------------------

PACK_BEGIN, PACK_END = "@@vdev-fio-tar-begin@@", "@@vdev-fio-tar-end@@"


def guest_pack_command(directory: str) -> str:
    """Shell lines that print ``directory`` on the guest's console: a gzipped tar
    in base64 between two marker lines (busybox tar and base64; a few tens of
    kB for minutes of 100 ms logs)."""
    return f"echo {PACK_BEGIN}\ntar -cz -C {directory} . | base64\necho {PACK_END}"


def unpack_guest_output(output: str, into: str) -> None:
    """Unpack what `guest_pack_command` printed (found in ``output``) into ``into``.

    Raises:
        FioError: no such block in ``output``.
    """
    m = re.search(re.escape(PACK_BEGIN) + r"\n(.*?)\n" + re.escape(PACK_END), output, re.DOTALL)
    if m is None:
        raise FioError("the guest printed no packed logs")
    data = base64.b64decode("".join(m.group(1).split()))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")


def series_of(runs: Sequence[FioRun]) -> list[Series]:
    return [r.series() for r in runs if r.histogram.total]
