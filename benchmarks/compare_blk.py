#!/usr/bin/env python3
"""virtio-blk back ends compared: vdev blk variants against qemu-storage-daemon.

The load is the C virtio-blk driver of ``vdev bench blk`` (one thread per
queue, requests checked one by one, latency from avail publish to used entry
seen), so the driver's own cost is small and the same for every back end.

Workloads: 4 KiB randread at QD1, QD16 and QD32, 4 KiB randwrite QD32, 64 KiB
sequential read QD8.  Storage pairs: ``null`` (vdev ``null:1G`` vs QSD
``null-co,read-zeroes=on``) and ``tmpfs`` (one sparse file in /dev/shm,
opened by both).  vdev variants are named by their extra daemon flags
(``native``: default flags, ``native+poll``: ``--poll-us 50``, ``python``:
``--dataplane python``); a variant whose flags ``vdev blk --help`` does not
list is skipped with a note.  All back ends of a storage pair run at once,
each pinned to one CPU and the driver to another; the runs alternate
between back ends (and alternate their order each round), so drift on the
machine hits all alike.

It prints one table: IOPS, p50/p99/p99.9/p99.99/max latency, the back end's
CPU time per request (utime+stime from /proc over the measured window), and
the ratios vdev/qsd.  ``--out DIR`` writes results.json and, per storage and
workload, the percentile curves and latency over time of every back end
overlaid, plus an IOPS / CPU-per-request bar chart.

    .venv/bin/python benchmarks/compare_blk.py [--seconds 5] [--rounds 2] [--out DIR]

This is a benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends import (
    VDEV_VARIANTS,
    Daemon,
    available_variants,
    pin_cpus,
    qsd_daemon,
    vdev_daemon,
)
from vdev.bench.driver import BlkSession, Job, RunResult
from vdev.bench.report import (
    Series,
    machine,
    plot_bars,
    plot_over_time,
    plot_percentiles,
)
from vdev.histogram import LatencyHistogram

WORKLOADS: list[tuple[str, Job]] = [
    ("randread-4k-qd1", Job("randread", 4096, 1)),
    ("randread-4k-qd16", Job("randread", 4096, 16)),
    ("randread-4k-qd32", Job("randread", 4096, 32)),
    ("randwrite-4k-qd32", Job("randwrite", 4096, 32)),
    ("read-64k-qd8", Job("read", 65536, 8)),
]
DISK = 1 << 30


@dataclass
class Cell:
    """One (storage, workload, back end), summed over rounds."""

    storage: str
    workload: str
    backend: str
    requests: int = 0
    seconds: float = 0.0
    cpu_ns: int = 0
    cpu_requests: float = 0.0
    sleeps: int = 0
    sleep_requests: float = 0.0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram.empty)
    runs: list[RunResult] = field(default_factory=list)
    failure: str | None = None

    def add(self, r: RunResult) -> None:
        self.requests += r.requests
        self.seconds += r.seconds
        self.histogram = self.histogram + r.histogram
        if r.backend_cpu_ns is not None and r.backend_cpu_seconds:
            self.cpu_ns += r.backend_cpu_ns
            self.cpu_requests += r.iops * r.backend_cpu_seconds
            if r.backend_sleeps is not None:
                self.sleeps += r.backend_sleeps
                self.sleep_requests += r.iops * r.backend_cpu_seconds
        self.runs.append(r)

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float | None:
        return self.cpu_ns / self.cpu_requests / 1000 if self.cpu_requests else None

    @property
    def sleeps_per_request(self) -> float | None:
        return self.sleeps / self.sleep_requests if self.sleep_requests else None

    def lat(self, p: float | None) -> float:
        return (self.histogram.max_ns if p is None else self.histogram.percentile(p)) / 1000


def storage_pairs(kinds: list[str], workdir: str, variants: list[str], cpu: int | None,
                  cleanup: list[str]) -> list[tuple[str, list[Daemon]]]:
    out = []
    for kind in kinds:
        if kind == "null":
            vdev_url = f"null:{DISK}"
            blockdev = f"driver=null-co,size={DISK},read-zeroes=on"
        elif kind == "tmpfs":
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, image = tempfile.mkstemp(prefix="vdev-compare-", suffix=".img", dir=shm)
            os.ftruncate(fd, DISK)
            os.close(fd)
            cleanup.append(image)
            vdev_url = f"file:{image}"
            blockdev = f"driver=file,filename={image},cache.direct=off"
        else:
            raise SystemExit(f"--storage: unknown kind {kind!r} (null, tmpfs)")
        daemons = [vdev_daemon(f"vdev-{v}-{kind}", vdev_url, workdir, extra=VDEV_VARIANTS[v][0], cpu=cpu)
                   for v in variants]
        daemons.append(qsd_daemon(blockdev, workdir, cpu=cpu, name=f"qsd-{kind}"))
        out.append((kind, daemons))
    return out


def label(d: Daemon) -> str:
    return d.name.rsplit("-", 1)[0]          # "vdev-native", "qsd"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def round_ratios(c: Cell, peer: Cell) -> str:
    """The IOPS ratio of each round's runs (run i of both back ends), lowest-highest:
    how far one round's ratio strays from the table's."""
    rs = [a.iops / b.iops for a, b in zip(c.runs, peer.runs) if a.iops and b.iops]
    if len(rs) < 2:
        return ""
    return f"{min(rs):.2f}-{max(rs):.2f}"


def print_table(cells: dict[tuple[str, str, str], Cell], order: list[tuple[str, str, list[str]]]) -> None:
    hdr = (f"{'storage':<7} {'workload':<18} {'back end':<18} {'IOPS':>9} {'p50':>7} {'p99':>7} "
           f"{'p99.9':>7} {'p99.99':>7} {'max':>8} {'CPU/req':>8} {'sleeps':>6} | {'IOPS':>5} {'p50':>5} {'p99':>5} "
           f"{'p99.9':>5} {'CPU':>5} {'IOPS by round':>13}")
    print(f"{'':<105} ratio vdev/qsd")
    print(hdr)
    print("-" * len(hdr))
    for storage, workload, names in order:
        peer = cells.get((storage, workload, "qsd"))
        for name in names:
            c = cells[(storage, workload, name)]
            if c.failure and not c.requests:
                print(f"{storage:<7} {workload:<18} {name:<18} FAILED: {c.failure}")
                continue
            line = (f"{storage:<7} {workload:<18} {name:<18} {c.iops:>9.0f} {c.lat(50):>7.1f} {c.lat(99):>7.1f} "
                    f"{c.lat(99.9):>7.1f} {c.lat(99.99):>7.1f} {c.lat(None):>8.1f} {fmt(c.cpu_us, '.2f'):>8} "
                    f"{fmt(c.sleeps_per_request, '.2f'):>6} |")
            if name != "qsd" and peer is not None and peer.requests:
                line += (f" {ratio(c.iops, peer.iops):>5} {ratio(c.lat(50), peer.lat(50)):>5} "
                         f"{ratio(c.lat(99), peer.lat(99)):>5} {ratio(c.lat(99.9), peer.lat(99.9)):>5} "
                         f"{ratio(c.cpu_us, peer.cpu_us):>5} {round_ratios(c, peer):>13}")
            print(line + (f"  FAILED: {c.failure}" if c.failure else ""))
    print("latencies in µs (avail publish -> used entry seen); CPU/req: the back end's CPU time per "
          "request, µs;\nsleeps: the back end's voluntary context switches per request (each one a "
          "wake-up to pay).")
    print("ratios: IOPS > 1 and latency/CPU < 1 mean vdev is better than qemu-storage-daemon; "
          "IOPS by round: the lowest and\nhighest ratio of one round's pair of runs.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (1)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per back end and workload, alternated (1)")
    ap.add_argument("--storage", default="null,tmpfs", help="storage kinds: null,tmpfs (both)")
    ap.add_argument("--variants", default="native,native+poll,python",
                    help="vdev variants (native,native+poll,python)")
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(w for w, _ in WORKLOADS))
    ap.add_argument("--driver-cpu", type=int, help="CPU for the driver (default: the first allowed)")
    ap.add_argument("--backend-cpu", type=int, help="CPU for every back end (default: the next allowed)")
    ap.add_argument("--out", metavar="DIR", help="write results.json and pictures here")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        ap.error("--seconds must be > 0, --warmup >= 0, --rounds >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VDEV_VARIANTS:
            ap.error(f"--variants: unknown variant {v!r}")
    workloads = WORKLOADS
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",")]
        unknown = set(wanted) - {w for w, _ in WORKLOADS}
        if unknown:
            ap.error(f"--workloads: unknown {', '.join(sorted(unknown))}")
        workloads = [w for w in WORKLOADS if w[0] in wanted]
    kinds = [k.strip() for k in args.storage.split(",") if k.strip()]

    variants, notes = available_variants(variants)
    _dcpus, bcpu, pin_note = pin_cpus(args.driver_cpu, args.backend_cpu)
    m = machine()
    print(f"virtio-blk back ends, C driver ({m['line']})")
    print(f"  {pin_note}; {args.seconds:g} s per run after {args.warmup:g} s warm-up, {args.rounds} round(s)")
    for n in notes:
        print(f"  {n}")
    sys.stdout.flush()

    workdir = tempfile.mkdtemp(prefix="vdev-compare-")
    cleanup: list[str] = []
    cells: dict[tuple[str, str, str], Cell] = {}
    order: list[tuple[str, str, list[str]]] = []
    try:
        for kind, daemons in storage_pairs(kinds, workdir, variants, bcpu, cleanup):
            sessions: dict[str, BlkSession] = {}
            try:
                for d in daemons:
                    d.start()
                for d in daemons:
                    try:
                        d.wait_ready()
                        sessions[d.name] = BlkSession.open(d.socket, [Job("read", 65536, 32)])
                    except Exception as exc:  # noqa: BLE001 - reported in the table
                        for w, _ in workloads:
                            cells[(kind, w, label(d))] = Cell(kind, w, label(d), failure=str(exc).splitlines()[0])
                names = [label(d) for d in daemons]
                for wname, job in workloads:
                    order.append((kind, wname, names))
                    for n in names:
                        cells.setdefault((kind, wname, n), Cell(kind, wname, n))
                    for rnd in range(args.rounds):
                        seq = daemons if rnd % 2 == 0 else daemons[::-1]
                        for d in seq:
                            cell = cells[(kind, wname, label(d))]
                            s = sessions.get(d.name)
                            if s is None or (cell.failure and not cell.requests):
                                continue
                            r = s.run([job], seconds=args.seconds, warmup=args.warmup, seed=rnd + 1,
                                      backend_pid=d.pid)
                            if r.fault is not None:
                                cell.failure = str(r.fault)
                            cell.add(r)
                            print(f"  {kind:<6} {wname:<18} {label(d):<18} {r.iops:>9.0f} IOPS"
                                  + (f"  FAILED: {r.fault}" if r.fault else ""), file=sys.stderr)
            finally:
                for s in sessions.values():
                    with contextlib.suppress(Exception):
                        s.close()
                for d in daemons:
                    d.stop()
    finally:
        for path in cleanup:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_table(cells, order)
    if args.out:
        write_out(args.out, cells, order, m["line"], args)
        print(f"\npictures and results.json written to {args.out}")
    return 1 if any(c.failure for c in cells.values()) else 0


def write_out(out: str, cells: dict[tuple[str, str, str], Cell], order: list[tuple[str, str, list[str]]],
              machine_line: str, args: argparse.Namespace) -> None:
    os.makedirs(out, exist_ok=True)
    from vdev.bench.report import hdr_encode

    doc: dict[str, object] = {"benchmark": "compare_blk", "machine": machine(),
                              "settings": {"seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds},
                              "cells": []}
    for storage, workload, names in order:
        series = []
        for n in names:
            c = cells[(storage, workload, n)]
            iv = c.runs[0].intervals if c.runs else []
            series.append(Series(n, c.histogram, iv, c.iops, c.cpu_us))
            doc["cells"].append({  # type: ignore[attr-defined]
                "storage": storage, "workload": workload, "backend": n, "requests": c.requests,
                "seconds": c.seconds, "iops": c.iops, "backend_cpu_us_per_request": c.cpu_us,
                "backend_sleeps_per_request": c.sleeps_per_request,
                "latency_us": {k: c.lat(p) for k, p in (("p50", 50), ("p99", 99), ("p99.9", 99.9),
                                                        ("p99.99", 99.99), ("max", None))},
                "failure": c.failure,
                "histogram": hdr_encode(c.histogram) if c.requests else None})
        live = [s for s in series if s.histogram.total]
        if not live:
            continue
        tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{storage}-{workload}")
        title = f"{workload}, {storage} storage, {args.seconds:g} s x {args.rounds}\n{machine_line}"
        plot_percentiles(live, os.path.join(out, f"{tag}-latency-percentiles.png"), title)
        plot_over_time(live, os.path.join(out, f"{tag}-latency-over-time.png"), title + " (round 1)")
        plot_bars(live, os.path.join(out, f"{tag}-iops-cpu.png"), title)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
