#!/usr/bin/env python3
"""virtio-blk per-request latency and IOPS: vdev against qemu-storage-daemon.

Both back ends are driven from the host side, with no guest, by the
project's own vhost-user front end (`vdev.testing.VirtioFrontend`): memfd
guest memory, one split virtqueue, kick and call eventfds.  Each pair puts
the same kind of storage behind both back ends:

* ``null:SIZE``  vdev ``null:SIZE``  vs  QSD ``driver=null-co,read-zeroes=on``
* ``mem:SIZE``   vdev ``mem:SIZE``   vs  QSD ``driver=file`` on a /dev/shm (tmpfs) file
* ``file:PATH``  vdev ``file:PATH``  vs  QSD ``driver=file`` on the same PATH

Workloads, each warmed up and then measured for ``--seconds``: 4 KiB random
read at queue depth 1 and 16, 4 KiB random write at queue depth 1.  The
front end is Python, so its own cost (building the chain, the eventfd kick,
the asyncio wake-up on the call eventfd, reaping) is in both back ends'
figures; the figure to read is the ratio vdev/peer measured in the same run.

    .venv/bin/python benchmarks/blk_latency.py [--seconds N] [--backend mem:256M] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from vdev import __version__ as VDEV_VERSION
from vdev.testing import Buffer, Used, VirtioFrontend
from vhost_user.messages import VHOST_F_LOG_ALL, ProtocolFeature

BLOCK = 4096
SECTOR = 512
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
STATUS_NAMES = {0: "OK", 1: "IOERR", 2: "UNSUPP", -1: "no status byte", -2: "unknown head"}
HEADER = struct.Struct("<IIQ")

QUEUE_SIZE = 128
GUEST_MEMORY = 16 << 20
#: Features to accept: everything offered except VHOST_F_LOG_ALL, which QEMU acks only
#: while migrating (QSD offers it; VirtioFrontend would accept it by default).
ACCEPT_FEATURES = ((1 << 64) - 1) & ~VHOST_F_LOG_ALL
REQUEST_TIMEOUT = 5.0       # seconds without a completion before a back end counts as hung
STARTUP_TIMEOUT = 10.0

PYTHON = sys.executable


@dataclass(frozen=True)
class Workload:
    name: str
    op: int          # VIRTIO_BLK_T_IN / _OUT
    depth: int


WORKLOADS = [
    Workload("randread-4k-qd1", VIRTIO_BLK_T_IN, 1),
    Workload("randread-4k-qd16", VIRTIO_BLK_T_IN, 16),
    Workload("randwrite-4k-qd1", VIRTIO_BLK_T_OUT, 1),
]


@dataclass
class Result:
    pair: str
    workload: str
    backend: str            # "vdev" or "peer"
    requests: int = 0       # completions inside the measured window
    seconds: float = 0.0
    iops: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    p999_us: float = 0.0
    max_us: float = 0.0
    mean_us: float = 0.0
    # CPU time per completed request over the measured window: the back-end process (all its
    # threads, from /proc) and this front end.  The back end's figure excludes the front end.
    backend_cpu_us: float | None = None
    frontend_cpu_us: float | None = None
    # Front-end wake-ups on the call eventfd per completed request, same window (a
    # completion already in the used ring when the front end looks needs no wake-up).
    wakeups_per_request: float | None = None
    errors: int = 0         # completions with a nonzero status (warm-up included)
    error_statuses: dict[str, int] = field(default_factory=dict)
    failure: str | None = None   # the run could not complete (timeout, lost connection)


# ---- back ends ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"cannot parse size {text!r}")
    return int(m.group(1)) << {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}[
        m.group(2).lower() if m.group(2) else None]


@dataclass
class Server:
    """One back end to start: argv plus where it listens."""

    role: str               # "vdev" / "peer"
    describe: str
    argv: list[str]
    socket: str
    log: str
    proc: subprocess.Popen[bytes] | None = None
    features: int | None = None      # virtio features acked, once connected

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def last_words(self) -> str:
        """The back end's last log line, for a one-line failure message."""
        tail = self.log_tail(1)
        return f": {tail}" if tail else ""

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; only the process this object started."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=3)


@dataclass
class Pair:
    name: str               # the vdev storage URL
    storage: str            # what is behind both, in words
    vdev: Server
    peer: Server
    size: int


def make_pair(url: str, workdir: str, cleanup: list[Callable[[], None]]) -> Pair:
    """vdev on ``url`` and a qemu-storage-daemon on the same kind of storage."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon not found on PATH (Debian 12: package qemu-system-common)")
    tag = re.sub(r"[^A-Za-z0-9]+", "-", url).strip("-")
    vsock = os.path.join(workdir, f"vdev-{tag}.sock")
    psock = os.path.join(workdir, f"qsd-{tag}.sock")
    if scheme == "null":
        size = parse_size(rest)
        blockdev = f"driver=null-co,node-name=n0,size={size},read-zeroes=on"
        storage = f"null device, {size >> 20} MiB (reads return zeros)"
        peer_desc = "qemu-storage-daemon null-co,read-zeroes=on"
    elif scheme == "mem":
        size = parse_size(rest)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, image = tempfile.mkstemp(prefix="vdev-bench-", suffix=".img", dir=shm)
        cleanup.append(lambda image=image: _unlink(image))
        os.ftruncate(fd, size)
        os.close(fd)
        blockdev = f"driver=file,node-name=n0,filename={image},cache.direct=off"
        storage = f"RAM, {size >> 20} MiB (vdev: anonymous mmap; QSD: file on {shm} tmpfs)"
        peer_desc = f"qemu-storage-daemon file on {shm}"
    elif scheme == "file" or url.startswith("/"):
        path = url if url.startswith("/") else (rest[2:] if rest.startswith("//") else rest)
        path = path.split("?", 1)[0]
        size = os.path.getsize(path)
        blockdev = f"driver=file,node-name=n0,filename={path},cache.direct=off"
        storage = f"the file {path}, {size >> 20} MiB, for both"
        peer_desc = "qemu-storage-daemon file"
    else:
        raise SystemExit(f"--backend {url!r}: the benchmark pairs null:, mem: and file: only")
    if size < 16 * BLOCK:
        raise SystemExit(f"--backend {url!r}: too small for a random 4 KiB workload")
    vdev = Server("vdev", f"vdev {VDEV_VERSION} blk {url}",
                  [PYTHON, "-m", "vdev", "blk", "--socket", vsock, "--backend", url,
                   "--log-level", "warning"],
                  vsock, os.path.join(workdir, f"vdev-{tag}.log"))
    peer = Server("peer", peer_desc,
                  [qsd, "--blockdev", blockdev,
                   "--export", "type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,"
                               f"addr.path={psock},writable=on,num-queues=1"],
                  psock, os.path.join(workdir, f"qsd-{tag}.log"))
    return Pair(url, storage, vdev, peer, size)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def connect(server: Server) -> tuple[VirtioFrontend, int]:
    """Wait for the back end's socket, bring the device up; returns it and its capacity in bytes."""
    assert server.proc is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    while not os.path.exists(server.socket):
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.role} exited with status {server.proc.returncode} before "
                               f"listening{server.last_words()}\n{server.log_tail()}")
        if loop.time() > deadline:
            raise RuntimeError(f"{server.role} did not create {server.socket} in {STARTUP_TIMEOUT:.0f} s"
                               f"{server.last_words()}\n{server.log_tail()}")
        await asyncio.sleep(0.02)
    try:
        vm = await VirtioFrontend.start(server.socket, queue_size=QUEUE_SIZE, memory_size=GUEST_MEMORY,
                                        features=ACCEPT_FEATURES, timeout=STARTUP_TIMEOUT)
    except Exception as exc:
        raise RuntimeError(f"vhost-user set-up with {server.role} failed: {exc!r}"
                           f"{server.last_words()}\n{server.log_tail()}") from exc
    capacity = 0
    if vm.protocol & ProtocolFeature.CONFIG:
        # virtio_blk_config.capacity, in 512-byte sectors.
        with contextlib.suppress(Exception):
            capacity = struct.unpack("<Q", (await vm.fe.get_config(0, 8))[:8])[0] * SECTOR
    return vm, capacity


# ---- the workloads -----------------------------------------------------------------------


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return 0.0
    k = max(0, min(len(sorted_ns) - 1, int(-(-q * len(sorted_ns) // 1)) - 1))
    return sorted_ns[k] / 1000.0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_ns(pid: int | None) -> int | None:
    """utime + stime of process ``pid`` (every thread), in ns; None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK


class Runner:
    def __init__(self, vm: VirtioFrontend, blocks: int, seed: int, backend_pid: int | None = None) -> None:
        self.vm = vm
        self.backend_pid = backend_pid
        self.blocks = blocks
        self.rng = random.Random(seed)
        payload = random.Random(seed ^ 0x5A5A).randbytes(BLOCK * 8)
        self.payloads = [payload[i * BLOCK:(i + 1) * BLOCK] for i in range(8)]

    def chain(self, op: int) -> list[Buffer]:
        sector = self.rng.randrange(self.blocks) * (BLOCK // SECTOR)
        header = Buffer.readable(HEADER.pack(op, 0, sector))
        if op == VIRTIO_BLK_T_IN:
            return [header, Buffer.writable(BLOCK), Buffer.writable(1)]
        return [header, Buffer.readable(self.payloads[sector & 7]), Buffer.writable(1)]

    async def run(self, w: Workload, res: Result, warmup: float, seconds: float) -> None:
        vm, q = self.vm, 0
        now = time.perf_counter_ns
        lat: list[int] = []
        statuses: dict[int, int] = {}
        inflight: dict[int, int] = {}           # head -> post time
        gc.collect()
        t0 = now()
        measure_from = t0 + int(warmup * 1e9)
        stop_at = measure_from + int(seconds * 1e9)
        last_done = measure_from
        # Samples (CPU, wake-ups, time) at the first event past measure_from and past
        # stop_at; `window` counts the completions reaped between them, which gives IOPS.
        # Latencies are of the requests posted after measure_from.
        cpu: list[tuple[int | None, int]] = []
        calls: list[int] = []
        stamps: list[int] = []
        window = 0

        def sample(t: int) -> None:
            if (len(cpu) == 0 and t >= measure_from) or (len(cpu) == 1 and t >= stop_at):
                cpu.append((proc_cpu_ns(self.backend_pid), time.process_time_ns()))
                calls.append(vm.wakeups[q])
                stamps.append(t)

        def complete(used: list[Used], t: int) -> None:
            nonlocal last_done, window
            if len(cpu) == 1:
                window += len(used)
            for u in used:
                posted = inflight.pop(u.head, None)
                if posted is None:          # a head the driver never posted (or posted once)
                    statuses[-2] = statuses.get(-2, 0) + 1
                    continue
                st = u.written[-1] if u.written else -1
                if st != 0:
                    statuses[st] = statuses.get(st, 0) + 1
                if posted >= measure_from:
                    lat.append(t - posted)
                    last_done = t

        try:
            if w.depth == 1:
                while True:
                    bufs = self.chain(w.op)
                    t = now()
                    sample(t)
                    if t >= stop_at:
                        break
                    inflight[vm.post(q, bufs)] = t
                    used = await vm.wait_used(q, 1, REQUEST_TIMEOUT)
                    complete(used, now())
            else:
                for _ in range(w.depth):
                    inflight[vm.post(q, self.chain(w.op), kick=False)] = now()
                vm.kick(q)
                while inflight:
                    used = await vm.wait_used(q, 1, REQUEST_TIMEOUT)
                    t = now()
                    complete(used, t)
                    sample(t)
                    if t < stop_at:
                        # Refill what completed, one kick per batch (as a guest driver would).
                        for _ in used:
                            bufs = self.chain(w.op)
                            inflight[vm.post(q, bufs, kick=False)] = now()
                        vm.kick(q)
        except TimeoutError:
            res.failure = (f"no completion within {REQUEST_TIMEOUT:.0f} s "
                           f"({len(inflight)} request(s) in flight)")
        except (ConnectionError, OSError) as exc:
            res.failure = f"{type(exc).__name__}: {exc}"
        lat.sort()
        if len(stamps) == 2 and window:
            elapsed = (stamps[1] - stamps[0]) / 1e9
            res.iops = window / elapsed
        else:   # cut short: what completed up to the failure
            elapsed = max(last_done - measure_from, 1) / 1e9
            res.iops = len(lat) / elapsed if lat else 0.0
        res.requests = len(lat)
        res.seconds = round(elapsed, 3)
        res.p50_us = percentile(lat, 0.50)
        res.p99_us = percentile(lat, 0.99)
        res.p999_us = percentile(lat, 0.999)
        res.max_us = lat[-1] / 1000.0 if lat else 0.0
        res.mean_us = sum(lat) / len(lat) / 1000.0 if lat else 0.0
        res.errors = sum(statuses.values())
        if len(cpu) == 2 and window:
            (b0, f0), (b1, f1) = cpu
            res.frontend_cpu_us = (f1 - f0) / window / 1000.0
            res.wakeups_per_request = (calls[1] - calls[0]) / window
            if b0 is not None and b1 is not None:
                res.backend_cpu_us = (b1 - b0) / window / 1000.0
        res.error_statuses = {STATUS_NAMES.get(k, str(k)): v for k, v in sorted(statuses.items())}


async def bench_pair(pair: Pair, args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    vms: dict[str, VirtioFrontend] = {}
    failed: dict[str, str] = {}
    servers = [pair.vdev, pair.peer]
    try:
        for s in servers:
            s.start()
        for s in servers:
            try:
                vm, capacity = await connect(s)
            except RuntimeError as exc:
                failed[s.role] = str(exc)
                continue
            vms[s.role] = vm
            s.features = vm.features
            if capacity and capacity != pair.size:
                print(f"  note: {s.role} reports capacity {capacity} bytes, expected {pair.size}",
                      file=sys.stderr)
        blocks = pair.size // BLOCK
        for w in WORKLOADS:
            # vdev then peer, back to back, the same request sequence for both.
            for s in servers:
                res = Result(pair.name, w.name, s.role)
                results.append(res)
                if s.role in failed:
                    res.failure = "skipped: " + failed[s.role].splitlines()[0]
                    continue
                runner = Runner(vms[s.role], blocks, seed=args.seed + WORKLOADS.index(w),
                                backend_pid=s.proc.pid if s.proc is not None else None)
                await runner.run(w, res, args.warmup, args.seconds)
                if s.proc is not None and s.proc.poll() is not None:
                    res.failure = (res.failure or "") + f" (back end exited, status {s.proc.returncode})"
                if res.failure:
                    failed[s.role] = res.failure + ("\n" + s.log_tail() if s.log_tail() else "")
                print(f"  {w.name:<17} {s.role:<4}  {res.iops:>9.0f} IOPS  p50 {res.p50_us:7.1f} us"
                      + (f"  errors {res.errors}" if res.errors else "")
                      + (f"  FAILED: {res.failure}" if res.failure else ""), file=sys.stderr)
        for role, msg in failed.items():
            print(f"  {role} failed: {msg}", file=sys.stderr)
    finally:
        for role, vm in vms.items():
            proc = (pair.vdev if role == "vdev" else pair.peer).proc
            alive = proc is not None and proc.poll() is None
            with contextlib.suppress(Exception):
                if alive and role not in failed:
                    await asyncio.wait_for(vm.stop(), 3)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(vm.close(), 3)
        for s in servers:
            s.stop()
            _unlink(s.socket)
    return results


# ---- reporting ---------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


def ratios(results: list[Result]) -> list[dict[str, object]]:
    out = []
    by = {(r.pair, r.workload, r.backend): r for r in results}
    for r in results:
        if r.backend != "vdev":
            continue
        p = by.get((r.pair, r.workload, "peer"))
        if p is None:
            continue
        ok = not r.failure and not p.failure
        out.append({"pair": r.pair, "workload": r.workload,
                    "iops_vdev_over_peer": ratio(r.iops, p.iops) if ok else None,
                    "p50_vdev_over_peer": ratio(r.p50_us, p.p50_us) if ok else None,
                    "p99_vdev_over_peer": ratio(r.p99_us, p.p99_us) if ok else None,
                    "backend_cpu_vdev_over_peer":
                        ratio(r.backend_cpu_us or 0.0, p.backend_cpu_us or 0.0) if ok else None})
    return out


def fmt_us(x: float | None) -> str:
    return f"{x:.1f}" if x is not None else "-"


def fmt_ratio(x: object) -> str:
    return f"{x:.2f}x" if isinstance(x, float) else "n/a"


def print_report(pairs: list[Pair], results: list[Result], env: dict[str, object],
                 args: argparse.Namespace) -> None:
    print("virtio-blk back-end latency: vdev vs qemu-storage-daemon (host side, no guest)")
    print(f"  {env['date']}  {env['cpus']} CPUs  {env['kernel']}  Python {env['python']}")
    print(f"  peer: {env['qsd']}")
    for pair in pairs:
        for s in (pair.vdev, pair.peer):
            if s.features is not None:
                print(f"  [{pair.name}] {s.role} features acked {s.features:#x}")
    print(f"  {args.seconds:g} s measured per workload after {args.warmup:g} s warm-up; 4 KiB requests at "
          f"random 4 KiB-aligned offsets; 1 queue of {QUEUE_SIZE}")
    print("  Both back ends are driven by vdev.testing.VirtioFrontend, a Python front end: its cost")
    print("  (building chains, eventfd kick, asyncio wake-up on the call eventfd, reaping) is inside")
    print("  BOTH columns, so a ratio understates the back ends' own difference (pulls it toward 1).")
    print("  'be CPU' is the back-end process's CPU time (all threads, /proc) per request, µs: it")
    print("  excludes the front end.  'fe CPU' is this front end's own CPU time per request, µs.")
    print("  'wake' is front-end sleeps (woken by the call eventfd) per request: a completion already")
    print("  in the used ring when the front end looks costs no sleep, so the front end's cost is")
    print("  lower with a back end that answers within its own few microseconds of Python.")
    print("  Read the ratios: IOPS vdev/peer > 1, and latency or CPU/req vdev/peer < 1, mean vdev wins.")
    for pair in pairs:
        print()
        print(f"[{pair.name}]  {pair.storage}")
        print(f"  vdev: {pair.vdev.describe}")
        print(f"  peer: {pair.peer.describe}")
        hdr = (f"  {'workload':<17} {'back end':<8} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} "
               f"{'p99.9 us':>9} {'max us':>9} {'requests':>9} {'errors':>6} {'be CPU':>7} {'fe CPU':>7} {'wake':>5}")
        print(hdr)
        print("  " + "-" * (len(hdr) - 2))
        rows = [r for r in results if r.pair == pair.name]
        for r in rows:
            if r.failure and not r.requests:
                print(f"  {r.workload:<17} {r.backend:<8} FAILED: {r.failure}")
                continue
            print(f"  {r.workload:<17} {r.backend:<8} {r.iops:>9.0f} {r.p50_us:>8.1f} {r.p99_us:>8.1f} "
                  f"{r.p999_us:>9.1f} {r.max_us:>9.1f} {r.requests:>9} {r.errors:>6} "
                  f"{fmt_us(r.backend_cpu_us):>7} {fmt_us(r.frontend_cpu_us):>7} "
                  f"{(f'{r.wakeups_per_request:.2f}' if r.wakeups_per_request is not None else '-'):>5}"
                  + (f"  FAILED: {r.failure}" if r.failure else ""))
        print(f"  {'ratio vdev/peer':<26} {'IOPS':>9} {'p50':>8} {'p99':>8} {'be CPU/req':>11}")
        for x in ratios(rows):
            print(f"  {x['workload']:<26} {fmt_ratio(x['iops_vdev_over_peer']):>9} "
                  f"{fmt_ratio(x['p50_vdev_over_peer']):>8} {fmt_ratio(x['p99_vdev_over_peer']):>8} "
                  f"{fmt_ratio(x['backend_cpu_vdev_over_peer']):>11}")
    bad = [r for r in results if r.errors or r.failure]
    print()
    if bad:
        print("FAILURES:")
        for r in bad:
            what = []
            if r.errors:
                what.append(f"{r.errors} request(s) with nonzero status {r.error_statuses}")
            if r.failure:
                what.append(r.failure)
            print(f"  [{r.pair}] {r.workload} {r.backend}: {'; '.join(what)}")
    else:
        print("All requests completed with status OK.")


def environment() -> dict[str, object]:
    try:
        qsd = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qsd = "qemu-storage-daemon (version unknown)"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
            "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "vdev": VDEV_VERSION, "qsd": qsd}


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Let SIGTERM/SIGHUP unwind through the finally blocks, so back ends and files go too."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per workload and back end (5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up before each measurement (0.5)")
    ap.add_argument("--backend", action="append", metavar="URL",
                    help="vdev storage to pair with QSD: null:SIZE, mem:SIZE or file:PATH; repeatable "
                         "(default: null:256M and mem:256M)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=1, help="random offsets seed (1)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        ap.error("--seconds must be > 0 and --warmup >= 0")
    urls = args.backend or ["null:256M", "mem:256M"]

    env = environment()
    cleanup: list[Callable[[], None]] = []
    workdir = tempfile.mkdtemp(prefix="vdev-bench-")
    pairs: list[Pair] = []
    results: list[Result] = []
    with sigterm_as_exit():
        try:
            for url in urls:
                try:
                    pair = make_pair(url, workdir, cleanup)
                except (ValueError, OSError) as exc:
                    raise SystemExit(f"--backend {url!r}: {exc}") from None
                pairs.append(pair)
                print(f"[{url}] running ...", file=sys.stderr)
                results += asyncio.run(bench_pair(pair, args))
        finally:
            for pair in pairs:
                pair.vdev.stop()
                pair.peer.stop()
            for fn in cleanup:
                fn()
            shutil.rmtree(workdir, ignore_errors=True)
    print(file=sys.stderr)
    print_report(pairs, results, env, args)
    if args.json:
        doc = {"benchmark": "blk_latency", "environment": env,
               "settings": {"seconds": args.seconds, "warmup": args.warmup, "block_size": BLOCK,
                            "queue_size": QUEUE_SIZE, "seed": args.seed,
                            "frontend": "vdev.testing.VirtioFrontend (Python; its overhead is in "
                                        "both back ends' figures)"},
               "pairs": [{"name": p.name, "storage": p.storage, "vdev": p.vdev.argv, "peer": p.peer.argv,
                          "vdev_features": p.vdev.features, "peer_features": p.peer.features}
                         for p in pairs],
               "results": [asdict(r) for r in results],
               "ratios": ratios(results)}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"\nJSON written to {args.json}")
    return 1 if any(r.errors or r.failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
