"""``vdev bench blk SOCKET …``: drive any vhost-user-blk back end and report.

argv → `BlkBenchConfig` (frozen, validated: a bad value is one line naming it,
exit 2, before any socket is touched) → `run_blk()`, which connects, runs the
C driver on every queue, prints the table and writes ``--json`` / ``--out``.

Exit status: 0 when every request completed correctly, 1 when the back end
broke the contract (bad status, wrong used length, a head returned twice, a
verify mismatch, no completion) or could not be reached, 2 for a bad value.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ..config import parse_int, parse_queue_size, parse_size

RW_CHOICES = ("randread", "randwrite", "read", "write", "randrw")
MAX_BS = 1 << 20


def add_arguments(parser: argparse.ArgumentParser, error: Any) -> None:
    """Add ``blk`` under ``vdev bench`` (``error``: the one-line error method)."""
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", title="benchmarks")
    p = kinds.add_parser(
        "blk", help="virtio-blk load from a C driver, against any vhost-user-blk socket",
        description="Drive a vhost-user-blk back end (vdev blk, qemu-storage-daemon, …) from a "
                    "C virtio-blk driver: one thread per queue keeps --iodepth requests in flight, "
                    "checks every completion, and records each request's latency.",
        epilog="example:\n  vdev bench blk /tmp/blk.sock --rw randread --bs 4k --iodepth 16 "
               "--seconds 10 --out /tmp/run1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = error.__get__(p)  # type: ignore[method-assign]
    p.add_argument("socket", metavar="SOCKET", help="the back end's vhost-user socket")
    w = p.add_argument_group("workload")
    w.add_argument("--rw", default="randread", metavar="MODE",
                   help=f"{', '.join(RW_CHOICES)} (default randread)")
    w.add_argument("--bs", default="4k", metavar="SIZE", help="request size, multiple of 512 (default 4k)")
    w.add_argument("--iodepth", default="1", metavar="N", help="requests in flight per queue (default 1)")
    w.add_argument("--queues", default="1", metavar="N", help="queues, one driver thread each (default 1)")
    w.add_argument("--rwmixread", default="50", metavar="PCT", help="randrw: percent reads (default 50)")
    w.add_argument("--size", metavar="SIZE", help="bytes of the disk addressed from offset 0 (default: all)")
    w.add_argument("--seconds", default="10", metavar="S", help="measured time (default 10)")
    w.add_argument("--warmup", default="1", metavar="S", help="run before measuring (default 1)")
    w.add_argument("--verify", action="store_true",
                   help="data integrity: each queue owns a slice; writes are stamped and read back "
                        "(randrw: random reads are checked against the last write)")
    w.add_argument("--seed", default="1", metavar="N", help="random offsets seed (default 1)")
    d = p.add_argument_group("driver")
    d.add_argument("--queue-size", metavar="N",
                   help="ring size (power of 2; default 128, or enough for 3 descriptors per request)")
    d.add_argument("--busy-poll", action="store_true",
                   help="spin on used.idx instead of sleeping on the call eventfd")
    d.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_F_EVENT_IDX")
    d.add_argument("--timeout", default="10", metavar="S",
                   help="connect timeout, and the longest wait for a completion (default 10)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the result document (as result.json) here")
    o.add_argument("--out", metavar="DIR",
                   help="write result.json, latency.hlog, latency.hgrm, latency-percentiles.png and "
                        "latency-over-time.png into DIR (created)")
    o.add_argument("--backend-pid", metavar="PID", help="the back end's pid: report its CPU time per request")
    o.add_argument("--label", metavar="TEXT", help="name of this run in pictures and JSON")


@dataclass(frozen=True)
class BlkBenchConfig:
    socket: str
    rw: str
    bs: int
    iodepth: int
    queues: int
    rwmixread: int
    size: int | None
    seconds: float
    warmup: float
    verify: bool
    seed: int
    queue_size: int | None
    busy_poll: bool
    event_idx: bool
    timeout: float
    json: str | None
    out: str | None
    backend_pid: int | None
    label: str | None


def _parse_seconds(value: str, what: str, *, positive: bool = True) -> float:
    try:
        s = float(value)
    except ValueError:
        raise ValueError(f"{what}: not a number of seconds: {value!r}") from None
    if not math.isfinite(s) or s < 0 or s > 86400 or (positive and s == 0):
        raise ValueError(f"{what}: {value} is out of range ({'> 0' if positive else '>= 0'}, at most 86400)")
    return s


def configure(args: argparse.Namespace) -> BlkBenchConfig:
    """Validate argv; raises ValueError naming the bad value."""
    if args.rw not in RW_CHOICES:
        raise ValueError(f"--rw: {args.rw!r} is not one of {', '.join(RW_CHOICES)}")
    bs = parse_size(args.bs, "--bs")
    if bs <= 0 or bs % 512 or bs > MAX_BS:
        raise ValueError(f"--bs: {args.bs!r} is not a multiple of 512 between 512 and {MAX_BS}")
    queue_size = parse_queue_size(args.queue_size) if args.queue_size is not None else None
    iodepth = parse_int(args.iodepth, "--iodepth", lo=1, hi=(queue_size or 32768) // 3)
    queues = parse_int(args.queues, "--queues", lo=1, hi=64)
    rwmix = parse_int(args.rwmixread, "--rwmixread", lo=0, hi=100)
    size = None
    if args.size is not None:
        size = parse_size(args.size, "--size")
        if size < bs:
            raise ValueError(f"--size: {args.size!r} is smaller than --bs {bs}")
    seconds = _parse_seconds(args.seconds, "--seconds")
    warmup = _parse_seconds(args.warmup, "--warmup", positive=False)
    timeout = _parse_seconds(args.timeout, "--timeout")
    seed = parse_int(args.seed, "--seed", lo=0, hi=(1 << 63) - 1)
    if args.verify and args.rw not in ("randrw", "randwrite", "write"):
        raise ValueError(f"--verify: --rw {args.rw} writes nothing to check; use randrw, randwrite or write")
    pid = None
    if args.backend_pid is not None:
        pid = parse_int(args.backend_pid, "--backend-pid", lo=1, hi=(1 << 22))
        if not os.path.exists(f"/proc/{pid}/stat"):
            raise ValueError(f"--backend-pid: no process {pid}")
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise ValueError(f"--json: directory {parent!r} does not exist")
    if args.out is not None:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise ValueError(f"--out: directory {parent!r} does not exist")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out: {args.out!r} exists and is not a directory")
    return BlkBenchConfig(args.socket, args.rw, bs, iodepth, queues, rwmix, size, seconds, warmup,
                          args.verify, seed, queue_size, args.busy_poll, not args.no_event_idx, timeout,
                          args.json, args.out, pid, args.label)


# ---- running -----------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(doc: dict[str, Any], out: TextIO) -> None:
    """The human summary of a result document (exactly the figures written to JSON)."""
    w, r, t = doc["workload"], doc["result"], doc["target"]
    lat = r["latency_us"]
    print(f"vdev bench blk {t['socket']}: {w['rw']} bs={w['bs']} iodepth={w['iodepth']} "
          f"queues={w['queues']} {w['seconds']:g} s (+{w['warmup']:g} s warm-up)"
          + (" verify" if w["verify"] else "") + (" busy-poll" if w["busy_poll"] else ""), file=out)
    print(f"machine: {doc['machine']['line']}", file=out)
    print(f"device: capacity {t['capacity']} bytes, features {t['features']}, queue size "
          f"{t['queue_size']}, EVENT_IDX {'on' if t['event_idx'] else 'off'}", file=out)
    print(f"  IOPS              {r['iops']:.0f}", file=out)
    print(f"  bandwidth         {r['bandwidth_mib_s']:.2f} MiB/s", file=out)
    print("  latency (µs)      " + "  ".join(f"{k} {lat[k]:.1f}" for k in
                                             ("p50", "p90", "p99", "p99.9", "p99.99", "max")), file=out)
    print(f"  kicks/request     {_fmt(r['kicks_per_request'], '.3f')}", file=out)
    print(f"  wake-ups/request  {_fmt(r['wakeups_per_request'], '.3f')}", file=out)
    print(f"  back-end CPU      {_fmt(r['backend_cpu_us_per_request'])} µs/request", file=out)
    print(f"  driver CPU        {_fmt(r['driver_cpu_us_per_request'])} µs/request", file=out)
    reads = sum(q["reads"] for q in doc["queues"])
    writes = sum(q["writes"] for q in doc["queues"])
    verified = sum(q["verified_reads"] for q in doc["queues"])
    print(f"  requests          {r['requests']} in {r['seconds']:.3f} s (reads {reads}, writes {writes}"
          + (f", reads verified {verified}" if w["verify"] else "") + ")", file=out)
    if len(doc["queues"]) > 1:
        print(f"  {'queue':>5} {'IOPS':>10} {'p50 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9} {'max µs':>9} "
              f"{'kicks/req':>9} {'wake/req':>9}", file=out)
        for q in doc["queues"]:
            ql = q["latency_us"]
            print(f"  {q['queue']:>5} {q['iops']:>10.0f} {ql['p50']:>9.1f} {ql['p99']:>9.1f} "
                  f"{ql['p99.9']:>9.1f} {ql['max']:>9.1f} {_fmt(q['kicks_per_request'], '.3f'):>9} "
                  f"{_fmt(q['wakeups_per_request'], '.3f'):>9}", file=out)


def run_blk(cfg: BlkBenchConfig) -> int:
    from .driver import BenchError, BlkSession, Job
    from .report import (
        Series,
        machine,
        plot_over_time,
        plot_percentiles,
        result_document,
        write_hdr_files,
        write_json,
    )

    prog = "vdev bench blk"
    job = Job(cfg.rw, cfg.bs, cfg.iodepth, cfg.rwmixread)
    jobs = [job] * cfg.queues
    try:
        session = BlkSession.open(cfg.socket, jobs, queue_size=cfg.queue_size, event_idx=cfg.event_idx,
                                  timeout=cfg.timeout)
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        # Not a bare "[Errno 2]": say which file and what it should have been.
        print(f"{prog}: error: no such socket {cfg.socket!r} after {cfg.timeout:g} s (the back end's "
              "vhost-user socket: is the back end running?)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure to connect is one line
        print(f"{prog}: error: cannot set up {cfg.socket}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    tty = sys.stderr.isatty()

    def progress(elapsed: float, partial: Any) -> None:
        if tty:
            print(f"\r  {elapsed:5.1f} / {cfg.seconds:g} s  IOPS {partial.iops:,.0f}   ",
                  end="", file=sys.stderr, flush=True)

    start_unix = time.time() + cfg.warmup
    fault: BaseException | None = None
    with session:
        if cfg.size is not None and cfg.size > session.capacity:
            print(f"{prog}: error: --size {cfg.size} is larger than the disk ({session.capacity} bytes)",
                  file=sys.stderr)
            return 2
        if cfg.bs > session.capacity:
            print(f"{prog}: error: --bs {cfg.bs} is larger than the disk ({session.capacity} bytes)",
                  file=sys.stderr)
            return 2
        try:
            result = session.run(jobs, seconds=cfg.seconds, warmup=cfg.warmup, verify=cfg.verify,
                                 span=cfg.size, busy_poll=cfg.busy_poll, seed=cfg.seed, stall=cfg.timeout,
                                 backend_pid=cfg.backend_pid, on_tick=progress)
        except BenchError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        if tty:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
        fault = result.fault
        if fault is None and not result.interrupted:
            try:
                session.stop_rings(result)
            except Exception as exc:  # noqa: BLE001 - reported in one line below
                fault = exc
    workload = {"rw": cfg.rw, "bs": cfg.bs, "iodepth": cfg.iodepth, "queues": cfg.queues,
                "rwmixread": cfg.rwmixread if cfg.rw == "randrw" else None, "size": cfg.size,
                "seconds": cfg.seconds, "warmup": cfg.warmup, "verify": cfg.verify, "seed": cfg.seed,
                "busy_poll": cfg.busy_poll}
    target = {"socket": cfg.socket, "capacity": session.capacity, "features": hex(session.features),
              "protocol_features": hex(int(session.protocol)), "queue_size": session.queue_size,
              "event_idx": session.event_idx, "backend_pid": cfg.backend_pid}
    error = None if fault is None else str(fault)
    doc = result_document(result, workload=workload, target=target, label=cfg.label, error=error)
    print_table(doc, sys.stdout)
    title = (f"{cfg.label + ': ' if cfg.label else ''}{job.describe()} x{cfg.queues} queue(s), "
             f"{cfg.seconds:g} s\n{machine()['line']}")
    if cfg.json:
        write_json(doc, cfg.json)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        write_json(doc, os.path.join(cfg.out, "result.json"))
        write_hdr_files(result, cfg.out, start_unix=start_unix, tag=cfg.label or "")
        series = [Series(cfg.label or cfg.rw, result.histogram, result.intervals, result.iops,
                         result.backend_cpu_us, result.interval)]
        plot_percentiles(series, os.path.join(cfg.out, "latency-percentiles.png"), title)
        plot_over_time(series, os.path.join(cfg.out, "latency-over-time.png"), title)
    if fault is not None:
        print(f"{prog}: error: {fault}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry from `vdev.cli.main` once argv is parsed."""
    if getattr(args, "bench_kind", None) != "blk":
        print("vdev bench: error: name a benchmark: vdev bench blk SOCKET …", file=sys.stderr)
        return 2
    try:
        cfg = configure(args)
    except ValueError as exc:
        print(f"vdev bench blk: error: {exc}", file=sys.stderr)
        return 2
    return run_blk(cfg)


__all__ = ["BlkBenchConfig", "add_arguments", "configure", "main", "print_table", "run_blk"]
