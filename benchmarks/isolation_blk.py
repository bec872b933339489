#!/usr/bin/env python3
"""Latency isolation between queues: does a busy queue slow a quiet one down?

One back end with two queues.  Queue 0 runs a 4 KiB randread at QD1, first
alone, then beside queue 1 saturated by a 4 KiB randread at QD32, on the same
connection.  It prints queue 0's p50/p99/p99.9 both ways and the ratio
beside/alone (1.0: perfect isolation), for ``vdev blk --queues 2`` and, as the
peer measured in the same run, qemu-storage-daemon with ``num-queues=2``.
The load is the C driver of ``vdev bench blk`` (one thread per queue, pinned
with the back end on another CPU).

    .venv/bin/python benchmarks/isolation_blk.py [--seconds 5] [--backend null:1G] [--out DIR]

``--extra`` passes daemon flags to ``vdev blk`` (e.g. ``--extra=--poll-us=50``).
A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends import Daemon, pin_cpus, qsd_daemon, vdev_daemon
from vdev.bench.driver import BlkSession, Job
from vdev.bench.report import Series, machine, plot_percentiles
from vdev.histogram import LatencyHistogram

QUIET = Job("randread", 4096, 1)
BUSY = Job("randread", 4096, 32)
DISK = 1 << 30


def measure(d: Daemon, seconds: float, warmup: float) -> tuple[LatencyHistogram, LatencyHistogram, float]:
    """Queue 0's histogram alone and beside the busy queue, and the busy queue's IOPS."""
    with BlkSession.open(d.socket, [QUIET, BUSY]) as s:
        alone = s.run([QUIET, None], seconds=seconds, warmup=warmup, backend_pid=d.pid)
        if alone.fault:
            raise RuntimeError(f"{d.name}: {alone.fault}")
        beside = s.run([QUIET, BUSY], seconds=seconds, warmup=warmup, backend_pid=d.pid)
        if beside.fault:
            raise RuntimeError(f"{d.name}: {beside.fault}")
        return alone.queues[0].histogram, beside.queues[0].histogram, beside.queues[1].iops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (1)")
    ap.add_argument("--extra", action="append", default=[], help="an extra `vdev blk` argument (repeatable)")
    ap.add_argument("--no-peer", action="store_true", help="skip qemu-storage-daemon")
    ap.add_argument("--out", metavar="DIR", help="write the percentile picture here")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        ap.error("--seconds must be > 0 and --warmup >= 0")

    _d, bcpu, pin_note = pin_cpus(None, None)
    m = machine()
    print(f"latency isolation: queue 0 {QUIET.describe()}, alone and beside queue 1 {BUSY.describe()}")
    print(f"  {m['line']}; {pin_note}; {args.seconds:g} s per run after {args.warmup:g} s warm-up")
    workdir = tempfile.mkdtemp(prefix="vdev-isolation-")
    daemons = [vdev_daemon("vdev", f"null:{DISK}", workdir, queues=2, extra=args.extra, cpu=bcpu)]
    if not args.no_peer and shutil.which("qemu-storage-daemon"):
        daemons.append(qsd_daemon(f"driver=null-co,size={DISK},read-zeroes=on", workdir, queues=2, cpu=bcpu))
    rows = []
    failed = False
    try:
        for d in daemons:
            d.start()
            try:
                d.wait_ready()
                rows.append((d.name, *measure(d, args.seconds, args.warmup)))
            except (RuntimeError, OSError) as exc:
                print(f"  {d.name}: FAILED: {exc}")
                failed = True
            finally:
                d.stop()
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'back end':<8} {'queue 0':<8} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9}   busy queue 1 IOPS")
    for name, alone, beside, busy_iops in rows:
        for what, h, extra in (("alone", alone, ""), ("beside", beside, f"{busy_iops:,.0f}")):
            print(f"{name:<8} {what:<8} {h.percentile(50) / 1000:>8.1f} {h.percentile(99) / 1000:>8.1f} "
                  f"{h.percentile(99.9) / 1000:>9.1f}   {extra}")
        r = [beside.percentile(p) / alone.percentile(p) if alone.percentile(p) else float("nan")
             for p in (50, 99, 99.9)]
        print(f"{name:<8} {'ratio':<8} {r[0]:>8.2f} {r[1]:>8.2f} {r[2]:>9.2f}   (beside / alone; 1.0 = isolated)")
    if len(rows) == 2:
        (_, va, vb, _), (_, qa, qb, _) = rows
        vr = vb.percentile(99) / va.percentile(99)
        qr = qb.percentile(99) / qa.percentile(99)
        print(f"p99 slow-down vdev/qsd: {vr / qr:.2f} (below 1: vdev isolates its queues better)")
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        series = []
        for name, alone, beside, _ in rows:
            series.append(Series(f"{name} queue 0 alone", alone, [], 0.0))
            series.append(Series(f"{name} queue 0 beside QD32", beside, [], 0.0))
        plot_percentiles(series, os.path.join(args.out, "isolation-latency-percentiles.png"),
                         f"queue 0: {QUIET.describe()}, alone / beside queue 1 {BUSY.describe()}\n{m['line']}")
        print(f"picture written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
