"""The C latency histogram and its Python snapshot."""

from __future__ import annotations

import math
import random
import threading

from vdev._native import ffi, lib
from vdev.histogram import BUCKETS, LatencyHistogram, bucket_bounds


def test_buckets_tile_the_line_without_gaps() -> None:
    prev_hi = -1
    for i in range(BUCKETS - 1):
        lo, hi = bucket_bounds(i)
        assert lo == prev_hi + 1 and hi >= lo
        assert lib.vd_hist_index(lo) == i and lib.vd_hist_index(hi) == i
        # relative width stays under 1 % (HdrHistogram with 2 significant digits)
        assert hi - lo <= max(0, lo // 128)
        prev_hi = hi


def test_percentiles_match_the_exact_ones_within_a_bucket() -> None:
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    rng = random.Random(7)
    values = sorted(rng.randint(1_000, 50_000_000) for _ in range(50_000))
    for v in values:
        lib.vd_hist_record(h, v)
    snap = LatencyHistogram.snapshot(h)
    assert snap.total == len(values) and snap.min_ns == values[0] and snap.max_ns == values[-1]
    for p in (50, 90, 99, 99.9, 99.99):
        exact = values[math.ceil(len(values) * p / 100) - 1]
        assert exact <= snap.percentile(p) <= exact * 1.008 + 1
    assert snap.percentile(100) == values[-1]


def test_difference_and_sum() -> None:
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    for v in (100, 200, 300):
        lib.vd_hist_record(h, v)
    base = LatencyHistogram.snapshot(h)
    for v in (10_000, 20_000):
        lib.vd_hist_record(h, v)
    since = LatencyHistogram.snapshot(h) - base
    assert since.total == 2 and since.percentile(50) >= 10_000
    both = since + base
    assert both.total == 5 and both.sum_ns == 30_600


def test_snapshots_while_a_c_writer_records() -> None:
    # The reader copies without stopping the writer; no counter ever goes back.
    h = ffi.new("struct vd_hist *")
    lib.vd_hist_init(h)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            for v in range(1, 2000):
                lib.vd_hist_record(h, v * 997)

    t = threading.Thread(target=writer)
    t.start()
    try:
        prev = LatencyHistogram.snapshot(h)
        for _ in range(50):
            cur = LatencyHistogram.snapshot(h)
            assert all(b >= a for a, b in zip(prev.counts, cur.counts))
            prev = cur
    finally:
        stop.set()
        t.join()
