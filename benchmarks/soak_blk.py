#!/usr/bin/env python3
"""Soak `vdev blk`: long mixed I/O, reconnections and live swaps; RSS and fds must not grow.

One ``vdev blk`` process (native data path, 4 queues, a file image) is driven
for ``--minutes`` by the C driver of ``vdev bench blk``: random 4 KiB reads
and writes (50/50) at depth 32 on each of the 4 queues, with ``--verify``
(every write is stamped; every read of a written block is checked against
the last write).  The front-end disconnects and reconnects every
``--segment`` seconds (each segment is a new vhost-user session: memory
table, rings, kick/call fds, all set up and torn down again); what earlier
sessions wrote stays checked by the later ones (`BlkSession.verify_state`).
Every ``--swap-every`` seconds, through the control socket, the disk moves
to the other of two image files: ``pause``, copy the image, ``swap`` (which
resumes I/O), so the data the driver checks moves with it.

Every ``--sample`` seconds the daemon's resident set (``VmRSS``) and open
file descriptors (``/proc/PID/fd``) are read.  At the end a table per
minute is printed, and the run fails (exit 1) if

* any completion was wrong (a bad status or length, a read that does not
  hold the last write, a ring that stopped at the wrong index), or the
  daemon counted an error;
* RSS grew: the median of the last minute's samples exceeds the median of
  the first minute's by more than ``--rss-tolerance`` MiB (default 16:
  a leak of 140 KiB per reconnection over 10 minutes would exceed it);
* fds grew: between two sessions (the front-end gone, the daemon's count
  steady) the daemon holds more fds after the last session than after the
  first by more than ``--fd-tolerance`` (default 0).  Counted between
  sessions because one that is up holds its memory and ring fds; counted
  from the first pause after the first swap, because the first swap opens
  one fd (``/dev/null``) that the daemon keeps, however many swaps follow.

A soak, not a test and not in CI (it runs for minutes):

    .venv/bin/python benchmarks/soak_blk.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdev.bench.driver import BlkSession, Job
from vdev.control import control_request

MiB = 1 << 20
QUEUES, DEPTH, BS = 4, 32, 4096
JOB = Job("randrw", BS, DEPTH, 50)


@dataclass
class Totals:
    """What the load thread did; read by the main thread after it ends."""

    segments: int = 0
    requests: int = 0
    reads: int = 0
    writes: int = 0
    verified: int = 0
    faults: list[str] = field(default_factory=list)
    #: (time since start, requests so far, verified so far) after each segment, for the table.
    progress: list[tuple[float, int, int]] = field(default_factory=list)
    #: (time since start, the daemon's open fds) between sessions, once the count is steady.
    idle_fds: list[tuple[float, int]] = field(default_factory=list)


def steady_fds(pid: int, timeout: float = 3.0) -> int:
    """The daemon's fd count once it has finished tearing a session down: the
    same count read 3 times 50 ms apart (or the last read after ``timeout``)."""
    deadline = time.monotonic() + timeout
    seen = [fd_count(pid)]
    while time.monotonic() < deadline and (len(seen) < 3 or len(set(seen[-3:])) > 1):
        time.sleep(0.05)
        seen.append(fd_count(pid))
    return seen[-1]


def load(sock: str, pid: int, size: int, until: float, segment: float, t0: float, totals: Totals,
         stop: threading.Event) -> None:
    """Sessions of ``segment`` seconds back to back until ``until`` (monotonic)."""
    state: dict[tuple[int, int, int, int], Any] = {}
    while time.monotonic() < until and not stop.is_set():
        seconds = min(segment, max(0.5, until - time.monotonic()))
        try:
            session = BlkSession.open(sock, [JOB] * QUEUES, timeout=20)
        except Exception as exc:  # noqa: BLE001 - a soak reports every failure and stops
            totals.faults.append(f"segment {totals.segments}: cannot connect: {type(exc).__name__}: {exc}")
            return
        try:
            session.verify_state = state
            # stall=20: a request may wait out a swap's pause (the copy) on a loaded machine.
            result = session.run([JOB] * QUEUES, seconds=seconds, warmup=0, verify=True, span=size,
                                 seed=totals.segments + 1, stall=20)
            if result.fault is not None:
                totals.faults.append(f"segment {totals.segments}: {result.fault}")
            else:
                session.stop_rings(result)
        except Exception as exc:  # noqa: BLE001
            totals.faults.append(f"segment {totals.segments}: {type(exc).__name__}: {exc}")
        finally:
            session.close()
        totals.segments += 1
        for q in result.queues:
            totals.requests += q.requests
            totals.reads += q.reads
            totals.writes += q.writes
            totals.verified += q.verified
        totals.progress.append((time.monotonic() - t0, totals.requests, totals.verified))
        totals.idle_fds.append((time.monotonic() - t0, steady_fds(pid)))
        if totals.faults:
            return


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def swapper(ctl: str, images: list[Path], every: float, until: float, log: list[str],
                  done: list[float], t0: float, stop: threading.Event) -> None:
    """Every ``every`` seconds: pause, copy the image to the other file, swap to it."""
    current = 0
    while not stop.is_set():
        wake = time.monotonic() + every
        if wake >= until:
            return
        await asyncio.sleep(wake - time.monotonic())
        other = 1 - current
        started = time.monotonic()
        try:
            await control_request(ctl, {"command": "pause"})
            await asyncio.to_thread(shutil.copyfile, images[current], images[other])
            reply = await control_request(ctl, {"command": "swap", "backend": f"file:{images[other]}"})
        except Exception as exc:  # noqa: BLE001
            log.append(f"FAIL at {started - t0:.0f} s: swap to {images[other]}: {exc}")
            stop.set()
            return
        current = other
        done.append(time.monotonic() - t0)
        log.append(f"{started - t0:6.1f} s  swap to {images[other].name} "
                   f"({time.monotonic() - started:.2f} s paused, resumed={reply.get('resumed')})")


async def soak(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="vdev-soak-"))
    images = [work / "a.img", work / "b.img"]
    size = args.disk_mib * MiB
    for img in images:
        with open(img, "wb") as f:
            f.truncate(size)
    sock, ctl, log_path = work / "blk.sock", work / "blk.ctl", work / "vdev.log"
    cmd = [sys.executable, "-m", "vdev", "blk", "--socket", str(sock), "--backend", f"file:{images[0]}",
           "--queues", str(QUEUES), "--dataplane", "native", "--control", str(ctl)]
    print("daemon: " + " ".join(cmd[1:]))
    print(f"load:   C driver, {JOB.describe()} on each of {QUEUES} queues, --verify, "
          f"a new session every {args.segment:g} s; swap every {args.swap_every:g} s; "
          f"{args.minutes:g} minutes")
    out = open(log_path, "wb")
    daemon = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace"))
                return 1
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        totals, stop, swaps, swapped = Totals(), threading.Event(), [], []
        loader = threading.Thread(target=load,
                                  args=(str(sock), daemon.pid, size, until, args.segment, t0, totals, stop),
                                  name="soak-load", daemon=True)
        loader.start()
        swapping = asyncio.get_running_loop().create_task(
            swapper(str(ctl), images, args.swap_every, until, swaps, swapped, t0, stop))
        samples: list[tuple[float, int, int]] = []           # (t, rss KiB, fds)
        while loader.is_alive():
            if daemon.poll() is not None:
                print(f"FAIL: the daemon exited {daemon.returncode}")
                stop.set()
                break
            samples.append((time.monotonic() - t0, rss_kib(daemon.pid), fd_count(daemon.pid)))
            await asyncio.sleep(args.sample)
            if totals.faults:
                stop.set()
        loader.join()
        stop.set()
        swapping.cancel()
        await asyncio.gather(swapping, return_exceptions=True)
        info = await control_request(str(ctl), {"command": "info"}) if daemon.poll() is None else {}
        return report(args, totals, samples, swaps, swapped, info, log_path)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        out.close()
        if daemon.returncode not in (0, None):
            print(f"daemon exit status {daemon.returncode}; its log: {log_path}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, totals: Totals, samples: list[tuple[float, int, int]],
           swaps: list[str], swapped: list[float], info: dict[str, Any], log_path: Path) -> int:
    minutes = max(1, int(max((t for t, _, _ in samples), default=0) // 60) + 1)
    print()
    print(f"{'minute':>6} {'sessions':>8} {'requests':>11} {'verified':>10} {'RSS MiB med':>11} "
          f"{'RSS MiB max':>11} {'fds idle':>8} {'fds max':>7}")
    by_minute: dict[int, list[tuple[float, int, int]]] = {}
    for s in samples:
        by_minute.setdefault(min(int(s[0] // 60), minutes - 1), []).append(s)
    for m in range(minutes):
        rows = by_minute.get(m, [])
        if not rows:
            continue
        done = [p for p in totals.progress if p[0] < (m + 1) * 60]
        sessions, requests, verified = len(done), done[-1][1] if done else 0, done[-1][2] if done else 0
        rss = [r for _, r, _ in rows]
        fds = [f for _, _, f in rows]
        idle = sorted({f for t, f in totals.idle_fds if m * 60 <= t < (m + 1) * 60})
        idle_s = "/".join(map(str, idle)) or "-"
        print(f"{m + 1:>6} {sessions:>8} {requests:>11,} {verified:>10,} {statistics.median(rss) / 1024:>11.1f} "
              f"{max(rss) / 1024:>11.1f} {idle_s:>8} {max(fds):>7}")
    print()
    print(f"swaps: {len(swaps)}")
    for line in swaps:
        print("  " + line)
    print(f"sessions {totals.segments}, requests {totals.requests:,} (reads {totals.reads:,}, "
          f"writes {totals.writes:,}), reads verified against the last write {totals.verified:,}")
    failures = list(totals.faults)
    failures += [s for s in swaps if s.startswith("FAIL")]
    stats = info.get("stats", {})
    print(f"daemon: stats {stats}, inflight {info.get('inflight')}")
    if not info:
        failures.append("the daemon did not answer info at the end")
    elif int(stats.get("errors", 0)) or int(stats.get("rejected", 0)):
        failures.append(f"the daemon counted errors: {stats}")
    first, last = by_minute.get(0, []), by_minute.get(minutes - 1, [])
    if minutes < 2 or not first or not last:
        failures.append("too short to compare the first minute with the last (use --minutes 2 or more)")
    else:
        rss0, rss1 = statistics.median(r for _, r, _ in first), statistics.median(r for _, r, _ in last)
        # From the first pause after the first swap: the first swap opens one fd
        # (/dev/null) that the daemon keeps from then on, whatever follows.
        after = [f for t, f in totals.idle_fds if swapped and t > swapped[0]]
        fd0, fd1 = (after[0], after[-1]) if after else (totals.idle_fds[0][1], totals.idle_fds[-1][1])
        grew = (rss1 - rss0) / 1024
        print(f"RSS: first minute median {rss0 / 1024:.1f} MiB, last minute median {rss1 / 1024:.1f} MiB: "
              f"{grew:+.1f} MiB (tolerance {args.rss_tolerance:g} MiB)")
        print(f"fds between sessions: first after the first swap {fd0}, after the last session {fd1}: "
              f"{fd1 - fd0:+d} "
              f"(tolerance {args.fd_tolerance})")
        if grew > args.rss_tolerance:
            failures.append(f"RSS grew by {grew:.1f} MiB")
        if fd1 - fd0 > args.fd_tolerance:
            failures.append(f"open fds grew by {fd1 - fd0}")
    if not swaps:
        failures.append("no swap happened")
    if failures:
        print("FAIL:")
        for f in failures:
            print("  " + f)
        print(f"daemon log: {log_path}")
        return 1
    print("PASS")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    p.add_argument("--segment", type=float, default=5, help="seconds per front-end session (default 5)")
    p.add_argument("--swap-every", type=float, default=30, help="seconds between live swaps (default 30)")
    p.add_argument("--sample", type=float, default=2, help="seconds between RSS/fd samples (default 2)")
    p.add_argument("--disk-mib", type=int, default=128, help="image size, MiB (default 128)")
    p.add_argument("--rss-tolerance", type=float, default=16, help="MiB of RSS growth allowed (default 16)")
    p.add_argument("--fd-tolerance", type=int, default=0, help="open fds growth allowed (default 0)")
    args = p.parse_args(argv)
    for name in ("minutes", "segment", "swap_every", "sample"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)!r}")
    if args.disk_mib < 8:
        p.error(f"--disk-mib: at least 8, got {args.disk_mib}")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
