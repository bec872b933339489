#!/usr/bin/env python3
"""Live storage migration under a guest's I/O: vdev's mirror against qemu-storage-daemon's.

A QEMU guest (TCG, the test suite's image) runs fio random writes with crc32c
verify on a vhost-user-blk disk of ``--size`` (1 GiB), file-backed.  Once fio
is writing, the disk is mirrored to another file:

* vdev: ``vdev blk --backend file:SRC`` and ``vdev ctl CTL mirror
  target=file:DST`` (it pivots by itself), polled with ``jobs``;
* qemu-storage-daemon: ``--blockdev driver=file`` for SRC, ``--export
  type=vhost-user-blk``, then over QMP (``qemu.qmp``) ``blockdev-add`` DST,
  ``blockdev-mirror`` (sync=full) and ``job-complete`` at BLOCK_JOB_READY,
  until BLOCK_JOB_COMPLETED.

Measured in the guest: every write's completion latency (fio's clat log,
``--log_avg_msec=0``).  "During the mirror" are the writes that completed
between the mirror's start and its end, picked by count: the guest prints
its count of completed writes (``/sys/block/vda/stat``) every 20 ms on the
console, which the host reads as it comes; the last count seen before the
mirror starts and the first seen after it ends index fio's log in
completion order.  The same for both back ends (qemu-storage-daemon does
not count an export's requests), and no guest/host clocks have to agree.  Reported for each: copy time
(start to pivot done), worst and p99.9 write latency during the mirror and
over the whole write phase, and whether fio's verify passed; then the ratios
vdev/qsd.  The runs alternate (``--rounds``), each with its own guest boot,
on the same images and fio job.

    .venv/bin/python benchmarks/mirror_blk.py                     # ~2 min
    .venv/bin/python benchmarks/mirror_blk.py --rounds 3 --bs 4k

Not a test: the numbers depend on the machine (TCG guest, shared CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from backends import PYTHON, Daemon  # noqa: E402
from vdev.control import control_request  # noqa: E402
from vdev.testing.guest import GuestImage, build_guest_image, run_in_guest  # noqa: E402

MiB = 1 << 20
#: Completed writes before the mirror starts (fio is in its stride by then).
WRITES_BEFORE = 500
START_TIMEOUT = 300.0


def parse_size(text: str, what: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    if not m:
        raise ValueError(f"{what}: cannot parse size {text!r} (e.g. 1G, 64k)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


@dataclass
class Run:
    peer: str
    copy_s: float | None = None
    ready_s: float | None = None          # qsd: BLOCK_JOB_READY after the start
    pause_ms: float | None = None         # vdev: the guest's I/O pause at the pivot, from the job
    window: tuple[int, int] | None = None  # completed writes at the mirror's start and end
    clat_us: list[float] = field(default_factory=list)   # every write, completion order
    verify_ok: bool = False
    error: str | None = None
    job: dict[str, object] | None = None  # vdev: the job as `jobs` reported it at the end

    def during(self) -> list[float]:
        if self.window is None:
            return []
        lo, hi = self.window
        return self.clat_us[lo:hi + 1]

    @staticmethod
    def worst(values: list[float]) -> float | None:
        return max(values) if values else None

    @staticmethod
    def p999(values: list[float]) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, -(-len(ordered) * 999 // 1000) - 1)]


#: Seconds between the guest's reports of its completed writes.
SAMPLE_INTERVAL = 0.02


def guest_script(size: int, io_size: int, bs: int) -> str:
    return f"""
( while :; do set -- $(cat /sys/block/vda/stat); echo "@@W $5"; usleep {int(SAMPLE_INTERVAL * 1e6)}; done ) &
sampler=$!
fio --name=mirror --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite \\
    --bs={bs} --size={size} --io_size={io_size} --verify=crc32c --do_verify=1 --verify_fatal=1 \\
    --write_lat_log=/tmp/m --log_avg_msec=0 --output-format=json --output=/tmp/fio.json
echo "fio-exit=$?"
kill $sampler
echo @@FIO-JSON
cat /tmp/fio.json
echo @@CLAT
cat /tmp/m_clat.1.log
echo @@END
"""


def parse_guest(out: str, run: Run) -> None:
    if "@@CLAT" not in out or "fio-exit=0" not in out:
        run.error = "fio failed: " + out[-2000:]
        return
    doc_text = out.split("@@FIO-JSON", 1)[1].split("@@CLAT", 1)[0]
    doc = json.loads(doc_text[doc_text.index("{"):])
    job = doc["jobs"][0]
    run.verify_ok = job.get("error", 1) == 0
    clat = out.split("@@CLAT", 1)[1].split("@@END", 1)[0]
    entries = []
    for line in clat.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[2] == "1":          # writes only (verify reads are 0)
            entries.append((int(parts[0]), int(parts[1])))
    # completion order: the log is written as I/Os complete; a stable sort keeps it
    entries.sort(key=lambda e: e[0])
    run.clat_us = [ns / 1000 for _t, ns in entries]


class GuestWrites:
    """The guest's count of completed writes, as reported on its console."""

    def __init__(self) -> None:
        self.count = 0
        self.reports = 0
        self._buf = b""
        self._changed = asyncio.Event()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            m = re.match(rb"@@W (\d+)", line.strip())
            if m:
                self.count = int(m.group(1))
                self.reports += 1
                self._changed.set()

    async def at_least(self, n: int) -> int:
        async with asyncio.timeout(START_TIMEOUT):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()
        return self.count

    async def next_report(self) -> int:
        """The first count reported after now: it includes every write completed so far."""
        reports = self.reports
        async with asyncio.timeout(10):
            while self.reports <= reports:
                self._changed.clear()
                await self._changed.wait()
        return self.count


async def run_vdev(image: GuestImage, src: Path, dst: Path, work: Path, args: argparse.Namespace) -> Run:
    run = Run("vdev")
    sock, ctl = work / "vdev.sock", work / "vdev.ctl"
    d = Daemon("vdev", [PYTHON, "-m", "vdev", "blk", "--socket", str(sock), "--backend", f"file:{src}",
                        "--queues", "1", "--control", str(ctl), "--log-level", args.vdev_log_level],
               str(sock), str(work / "vdev.log"))
    d.start()
    try:
        d.wait_ready()

        async def mirror(guest: GuestWrites) -> None:
            await guest.at_least(WRITES_BEFORE)
            start_writes = guest.count                  # at most what has completed
            reply = await control_request(str(ctl), {"command": "mirror", "target": f"file:{dst}",
                                                     "granularity": str(args.granularity)})
            if not reply.get("ok"):
                raise RuntimeError(f"mirror refused: {reply}")
            while True:
                job = (await control_request(str(ctl), {"command": "jobs"}))["jobs"][-1]
                if job["phase"] in ("done", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.01)
            end_writes = await guest.next_report()      # at least what has completed
            if job["phase"] != "done":
                raise RuntimeError(f"mirror {job['phase']}: {job.get('error')}")
            run.copy_s, run.pause_ms = job["elapsed"], job["pivot_pause_ms"]
            run.job = job
            run.window = (start_writes, end_writes)

        await _guest_with(image, sock, mirror, run, args)
        if run.error:
            print(f"  vdev's log, last lines: {d.tail(20)}", file=sys.stderr)
    finally:
        d.stop()
    return run


async def run_qsd(image: GuestImage, src: Path, dst: Path, work: Path, args: argparse.Namespace) -> Run:
    from qemu.qmp import QMPClient

    run = Run("qsd")
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon not found on PATH (Debian 12: package qemu-system-common)")
    sock, qmp_sock = work / "qsd.sock", work / "qsd.qmp"
    d = Daemon("qsd", [qsd, "--blockdev", f"driver=file,filename={src},node-name=src,cache.direct=off",
                       "--export", f"type=vhost-user-blk,id=e0,node-name=src,addr.type=unix,"
                                   f"addr.path={sock},writable=on,num-queues=1",
                       "--chardev", f"socket,id=qmp0,path={qmp_sock},server=on,wait=off",
                       "--monitor", "chardev=qmp0"],
               str(sock), str(work / "qsd.log"))
    d.start()
    qmp = QMPClient("qsd")
    try:
        d.wait_ready()
        await qmp.connect(str(qmp_sock))
        await qmp.execute("blockdev-add", {"driver": "file", "filename": str(dst), "node-name": "dst",
                                           "cache": {"direct": False}})

        async def mirror(guest: GuestWrites) -> None:
            await guest.at_least(WRITES_BEFORE)
            start_writes = guest.count
            with qmp.listener(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")) as events:
                started = time.monotonic()
                await qmp.execute("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "dst",
                                                      "sync": "full", "granularity": args.granularity})
                while True:
                    event = await asyncio.wait_for(events.get(), START_TIMEOUT)
                    if event["event"] == "BLOCK_JOB_READY":
                        run.ready_s = time.monotonic() - started
                        await qmp.execute("job-complete", {"id": "m0"})
                    elif event["event"] == "BLOCK_JOB_COMPLETED":
                        run.copy_s = time.monotonic() - started
                        if event["data"].get("error"):
                            raise RuntimeError(f"blockdev-mirror failed: {event['data']['error']}")
                        break
                    elif event["event"] == "BLOCK_JOB_ERROR":
                        raise RuntimeError(f"blockdev-mirror: {event['data']}")
            run.window = (start_writes, await guest.next_report())

        await _guest_with(image, sock, mirror, run, args)
    finally:
        await qmp.disconnect()
        d.stop()
    return run


async def _guest_with(image: GuestImage, sock: Path, mirror, run: Run,  # type: ignore[no-untyped-def]
                      args: argparse.Namespace) -> None:
    guest = GuestWrites()
    task = asyncio.ensure_future(mirror(guest))
    result = await run_in_guest(image, guest_script(args.size, args.io_size, args.bs), timeout=900,
                                on_console=guest.feed,
                                qemu_args=["-chardev", f"socket,id=blk0,path={sock}",
                                           "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])
    try:
        await asyncio.wait_for(task, 30)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        run.error = f"{type(exc).__name__}: {exc}"
    parse_guest(result.output, run)
    if run.window is not None and run.window[1] >= len(run.clat_us):
        run.error = (run.error or "") + " (the mirror outlasted fio's writes: raise --io-size)"


def make_source(path: Path, size: int, seed_image: Path | None, fill: bool) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        if seed_image is not None:
            with open(seed_image, "rb") as src:
                left = size
                while left and (chunk := src.read(min(left, 8 * MiB))):
                    f.write(chunk)
                    left -= len(chunk)
        elif fill:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def summarize(runs: list[Run]) -> tuple[float | None, ...]:
    ok = [r for r in runs if r.error is None]
    if not ok:
        return (None,) * 6

    def med(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else None

    return (med([r.copy_s for r in ok]), med([Run.worst(r.during()) for r in ok]),
            med([Run.p999(r.during()) for r in ok]), med([Run.worst(r.clat_us) for r in ok]),
            med([Run.p999(r.clat_us) for r in ok]), med([r.pause_ms for r in ok]))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[no-untyped-def]
        # One line naming the value, exit 2 (as vdev's own commands do).
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="mirror_blk.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size (1G)")
    ap.add_argument("--io-size", default="384M",
                    help="bytes fio writes (384M): its write phase must outlast the mirror")
    ap.add_argument("--bs", default="64k", help="fio block size (64k)")
    ap.add_argument("--granularity", default="64k", help="dirty-bitmap granularity for both (64k)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per back end, alternated (1)")
    ap.add_argument("--dir", help="where the images go (default /dev/shm, else the temp dir)")
    ap.add_argument("--image", type=Path, help="start the disk from this raw image (default: random data)")
    ap.add_argument("--sparse", action="store_true", help="start from an empty (sparse) disk instead")
    ap.add_argument("--vdev-log-level", default="warning", choices=["debug", "info", "warning"],
                    help="vdev blk's --log-level (debug: each copy pass and the pivot's steps); its "
                         "last lines are printed when a run fails")
    args = ap.parse_args(argv)
    try:
        args.size = parse_size(args.size, "--size")
        args.io_size = parse_size(args.io_size, "--io-size")
        args.bs = parse_size(args.bs, "--bs")
        args.granularity = parse_size(args.granularity, "--granularity")
    except ValueError as exc:
        ap.error(str(exc))
    if args.io_size > args.size:
        ap.error(f"--io-size {args.io_size} is more than the disk ({args.size})")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.image is not None:
        # A missing image is named here, not left to a bare [Errno 2] later.
        if not args.image.is_file():
            ap.error(f"--image: no such image file {str(args.image)!r}")
        if not os.access(args.image, os.R_OK):
            ap.error(f"--image: cannot read {str(args.image)!r}")
    base = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    if not os.path.isdir(base):
        ap.error(f"--dir: no such directory {base!r}")
    if shutil.which("qemu-storage-daemon") is None:
        ap.error("qemu-storage-daemon not found on PATH (Debian 12: package qemu-system-common)")
    return asyncio.run(_main(args, base))


async def _main(args: argparse.Namespace, base: str) -> int:
    image = await asyncio.to_thread(build_guest_image)
    work = Path(tempfile.mkdtemp(prefix="vdev-mirror-bench-", dir=base))
    seed = work / "seed.img"
    src, dst = work / "src.img", work / "dst.img"
    nproc = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"mirror of a {args.size // MiB} MiB file-backed disk under guest fio (randwrite "
          f"{args.bs // 1024}k QD8, crc32c verify, {args.io_size // MiB} MiB written), "
          f"to a file in {base}; granularity {args.granularity // 1024}k; TCG guest; "
          f"{nproc} CPUs, load {load:.2f}; {args.rounds} round(s)")
    sys.stdout.flush()
    runs: dict[str, list[Run]] = {"vdev": [], "qsd": []}
    try:
        await asyncio.to_thread(make_source, seed, args.size, args.image, not args.sparse)
        for rnd in range(args.rounds):
            order = ["vdev", "qsd"] if rnd % 2 == 0 else ["qsd", "vdev"]
            for peer in order:
                await asyncio.to_thread(shutil.copyfile, seed, src)
                with open(dst, "wb") as f:
                    f.truncate(args.size)
                fn = run_vdev if peer == "vdev" else run_qsd
                try:
                    run = await fn(image, src, dst, work, args)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    run = Run(peer, error=f"{type(exc).__name__}: {exc}")
                runs[peer].append(run)
                during = run.during()
                extra = (f", {run.job['passes']} passes, {run.job['pivot_bytes']} bytes in the pause"
                         if run.job else "")
                print(f"  round {rnd + 1} {peer:<4} copy {fmt(run.copy_s, '.2f')} s, "
                      f"{len(during)} writes during the mirror, worst {fmt(Run.worst(during))} µs, "
                      f"verify {'ok' if run.verify_ok else 'FAILED'}{extra}"
                      + (f"  ERROR: {run.error}" if run.error else ""), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    v, q = summarize(runs["vdev"]), summarize(runs["qsd"])
    print()
    hdr = (f"{'back end':<22} {'copy s':>7} {'worst µs':>10} {'p99.9 µs':>10} {'worst µs':>10} "
           f"{'p99.9 µs':>10} {'pause ms':>9} {'verify':>7}")
    print(f"{'':<31}{'during the mirror':^21} {'whole write phase':^21}")
    print(hdr)
    print("-" * len(hdr))
    for name, s, peer in (("vdev mirror", v, "vdev"), ("qemu-storage-daemon", q, "qsd")):
        verify = "ok" if runs[peer] and all(r.verify_ok for r in runs[peer]) else "FAILED"
        print(f"{name:<22} {fmt(s[0], '.2f'):>7} {fmt(s[1]):>10} {fmt(s[2]):>10} {fmt(s[3]):>10} "
              f"{fmt(s[4]):>10} {fmt(s[5], '.1f'):>9} {verify:>7}")
    print(f"{'ratio vdev/qsd':<22} {ratio(v[0], q[0]):>7} {ratio(v[1], q[1]):>10} {ratio(v[2], q[2]):>10} "
          f"{ratio(v[3], q[3]):>10} {ratio(v[4], q[4]):>10}")
    qready = [r.ready_s for r in runs["qsd"] if r.ready_s is not None]
    if qready:
        print(f"qsd: BLOCK_JOB_READY after {statistics.median(qready):.2f} s, then job-complete; "
              "copy s is start to BLOCK_JOB_COMPLETED (vdev: start to pivot done).")
    print("latencies: fio's completion latency of each guest write (µs); 'during the mirror' are "
          "the writes that completed between the mirror's start and its end.")
    print("targets: worst during the mirror vdev/qsd <= 1, copy time vdev/qsd <= 1.2.")
    failed = [r for rs in runs.values() for r in rs if r.error or not r.verify_ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
