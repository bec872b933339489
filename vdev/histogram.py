"""Latency histograms kept in C (``struct vd_hist``), read from Python.

The native workers (the device engines and the benchmark's driver) record
one latency per request into a log-linear histogram in nanoseconds
(``vdev/_native/src/hist.h``: 128 linear sub-buckets per power of two, so a
value is kept within 0.8 %).  `LatencyHistogram` is an immutable snapshot of
one, copied without stopping the writer; snapshots subtract (for "since the
last reset") and add (to merge queues or runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ._native import ffi, lib

BUCKETS: int = lib.VD_HIST_BUCKETS

#: The percentiles every report prints.
STANDARD_PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Lowest and highest nanosecond value that falls into bucket ``index``."""
    return int(lib.vd_hist_lower(index)), int(lib.vd_hist_upper(index))


@dataclass(frozen=True)
class LatencyHistogram:
    """A snapshot: per-bucket counts plus count, sum, min and max in ns."""

    counts: tuple[int, ...]
    total: int
    sum_ns: int
    min_ns: int
    max_ns: int

    @classmethod
    def empty(cls) -> LatencyHistogram:
        return cls((0,) * BUCKETS, 0, 0, 0, 0)

    @classmethod
    def snapshot(cls, hist: object) -> LatencyHistogram:
        """Copy a live ``struct vd_hist *`` (relaxed loads; the writer keeps going)."""
        out = ffi.new("struct vd_hist *")
        lib.vd_hist_snapshot(hist, out)
        return cls.from_cdata(out)

    @classmethod
    def from_cdata(cls, out: Any) -> LatencyHistogram:
        """From a ``struct vd_hist`` copy that no one writes any more."""
        total = sum(out.count)
        return cls(tuple(out.count), total, int(out.sum_ns),
                   0 if total == 0 else int(out.min_ns), int(out.max_ns))

    def __sub__(self, base: LatencyHistogram) -> LatencyHistogram:
        """What was recorded since ``base`` (min and max stay those of the whole run)."""
        counts = tuple(a - b for a, b in zip(self.counts, base.counts))
        return LatencyHistogram(counts, sum(counts), self.sum_ns - base.sum_ns, self.min_ns, self.max_ns)

    def __add__(self, other: LatencyHistogram) -> LatencyHistogram:
        if not other.total:
            return self
        if not self.total:
            return other
        return LatencyHistogram(tuple(a + b for a, b in zip(self.counts, other.counts)),
                                self.total + other.total, self.sum_ns + other.sum_ns,
                                min(self.min_ns, other.min_ns), max(self.max_ns, other.max_ns))

    @staticmethod
    def merge(hists: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = LatencyHistogram.empty()
        for h in hists:
            out = out + h
        return out

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """(lowest ns, highest ns, count) of every non-empty bucket, in order."""
        for i, n in enumerate(self.counts):
            if n:
                lo, hi = bucket_bounds(i)
                yield lo, hi, n

    def percentile(self, p: float) -> int:
        """The value (ns) at percentile ``p`` (0..100): the top of the bucket that
        holds it, clamped to the maximum seen; 0 for an empty histogram."""
        if self.total == 0:
            return 0
        if p <= 0:
            return self.min_ns
        want = max(1, math.ceil(self.total * p / 100))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= want:
                return min(bucket_bounds(i)[1], self.max_ns) if self.max_ns else bucket_bounds(i)[1]
        return self.max_ns

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.total if self.total else 0.0

    def summary_us(self, percentiles: Iterable[float] = STANDARD_PERCENTILES) -> dict[str, float]:
        """``{"count", "mean", "p50", …, "max"}`` with latencies in microseconds."""
        out: dict[str, float] = {"count": self.total, "mean": round(self.mean_ns / 1000, 3)}
        for p in percentiles:
            out[f"p{p:g}"] = round(self.percentile(p) / 1000, 3)
        out["max"] = round(self.max_ns / 1000, 3)
        return out
