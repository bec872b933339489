#!/usr/bin/env python3
"""vdev net against dpdk-testpmd's vhost port: frames per second, CPU per frame, guest iperf3.

Part 1, frames per second.  The generator is ``dpdk-testpmd`` with DPDK's
virtio-user PMD in txonly mode (64 B and 1518 B frames), pinned to one CPU;
the back end under test is pinned to the other:

* ``vdev``       — ``vdev net --loopback`` (the worker sleeps on its kick eventfd when idle);
* ``vdev+poll``  — the same with ``--poll-us 1000`` (busy-polls before sleeping);
* ``dpdk-vhost`` — ``dpdk-testpmd --vdev net_vhost0,iface=SOCK`` in io mode (the peer).

Both back ends do the same with each frame: take it from the generator's
transmit ring and put it in the generator's receive ring, which txonly
never reads, so once that ring is full the frame is dropped (DPDK: the
io-forwarding burst fails and testpmd frees it; vdev: after the bounded
wait for receive buffers).  The rate is the generator's transmitted frames
per second over the measured window (its ``TX-packets`` counter, read
every second); CPU per frame is the back end's utime+stime over the same
window divided by those frames.  Back ends alternate, one at a time (a
polling DPDK core would take the CPU from the other), and the order
reverses each round.

Part 2, guest iperf3 (``--iperf``, on by default).  A QEMU guest (TCG,
pinned to the generator's CPU) runs iperf3 5 s each way to a server behind
a TAP in a network namespace, once through ``vdev net --tap`` and once
through dpdk-testpmd's vhost port forwarding (io mode) to DPDK's TAP PMD
(``--vdev net_tap0``), its TAP moved into the namespace.  Under TCG the
guest is the bottleneck; the row shows whether either back end costs the
guest throughput.

    .venv/bin/python benchmarks/net_pps.py [--seconds 5] [--warmup 3] [--rounds 2] [--no-iperf]

Needs root, dpdk-testpmd, 2 MiB hugepages (it reserves 512 and mounts
hugetlbfs at /dev/hugepages if needed), and for part 2 QEMU and the guest
image.  This is a benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd") or "dpdk-testpmd"
HUGE_DIR = "/dev/hugepages"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def ensure_hugepages(pages: int = 512) -> None:
    with open("/proc/sys/vm/nr_hugepages") as f:
        if int(f.read()) < pages:
            with open("/proc/sys/vm/nr_hugepages", "w") as w:
                w.write(str(pages))
    os.makedirs(HUGE_DIR, exist_ok=True)
    with open("/proc/mounts") as f:
        if not any(line.split()[1] == HUGE_DIR for line in f):
            subprocess.run(["mount", "-t", "hugetlbfs", "nodev", HUGE_DIR], check=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Proc:
    """A child process whose output is read line by line, with arrival times."""

    def __init__(self, argv: list[str], *, name: str, stdin: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def stop(self, *, enter: bool = False) -> None:
        if self.proc.poll() is None:
            if enter and self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.write("\n")
                    self.proc.stdin.flush()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(5)


def testpmd(cpu: int, vdevs: list[str], app: list[str], *, name: str) -> tuple[Proc, str]:
    """dpdk-testpmd with its main and forwarding lcores both on ``cpu``."""
    prefix = f"vdevbench-{uuid.uuid4().hex[:8]}"
    # Line-buffered: the periodic statistics are read as they come (a pipe
    # would otherwise hold them back in stdio's buffer).
    argv = ["stdbuf", "-oL", TESTPMD, "--lcores", f"0@{cpu},1@{cpu}", "--no-pci", "--file-prefix", prefix,
            "--single-file-segments", "-m", "256", "--huge-dir", HUGE_DIR]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--nb-cores=1", "--total-num-mbufs=32768", *app]
    return Proc(argv, name=name, stdin=True), prefix


def cleanup_prefix(prefix: str) -> None:
    shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    for f in Path(HUGE_DIR).glob(f"{prefix}*"):
        f.unlink(missing_ok=True)


def wait_for(path: str, proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not create {path}:\n{proc.text()[-3000:]}")
        time.sleep(0.05)


# ---- part 1: frames per second ------------------------------------------------------------

@dataclass
class Cell:
    frames: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def mpps(self) -> float:
        return self.frames / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def ns_per_frame(self) -> float | None:
        return self.cpu / self.frames * 1e9 if self.frames else None


def start_backend(kind: str, sock: str, cpu: int, workdir: str) -> tuple[Proc, str | None]:
    if kind.startswith("vdev"):
        argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "vdev", "net", "--socket", sock, "--loopback",
                "--log-level", "warning"]
        if kind == "vdev+poll":
            argv += ["--poll-us", "1000"]
        p = Proc(argv, name=kind)
        return p, None
    p, prefix = testpmd(cpu, [f"net_vhost0,iface={sock},queues=1"], ["--forward-mode=io"], name=kind)
    return p, prefix


def tx_samples(gen: Proc) -> list[tuple[float, int]]:
    """(time, cumulative TX-packets) from the generator's periodic port statistics."""
    out = []
    for t, line in gen.lines:
        m = re.match(r"\s*TX-packets: (\d+)\s+TX-errors", line)
        if m:
            out.append((t, int(m.group(1))))
    return out


def measure(kind: str, size: int, gen_cpu: int, be_cpu: int, seconds: float, warmup: float) -> Cell:
    workdir = tempfile.mkdtemp(prefix="vdev-netpps-")
    sock = os.path.join(workdir, "net.sock")
    backend, be_prefix = start_backend(kind, sock, be_cpu, workdir)
    gen = None
    gen_prefix = None
    cell = Cell()
    try:
        wait_for(sock, backend)
        gen, gen_prefix = testpmd(gen_cpu, [f"net_virtio_user0,path={sock},queue_size=256"],
                                  ["--forward-mode=txonly", f"--txpkts={size}", "--stats-period=1"],
                                  name="generator")
        deadline = time.monotonic() + 60
        while not tx_samples(gen):           # EAL and mempool set-up take a few seconds
            if gen.proc.poll() is not None or time.monotonic() > deadline:
                cell.notes.append(f"{kind} {size}B: the generator did not start:\n" + gen.text()[-2000:])
                return cell
            time.sleep(0.1)
        time.sleep(warmup)
        t0, c0 = time.monotonic(), cpu_seconds(backend.pid)
        n0 = len(tx_samples(gen))
        time.sleep(seconds)
        t1, c1 = time.monotonic(), cpu_seconds(backend.pid)
        samples = tx_samples(gen)
        window = [s for s in samples[max(0, n0 - 1):] if t0 - 1.5 <= s[0] <= t1 + 0.5]
        if len(window) < 2:
            cell.notes.append(f"{kind} {size}B: no statistics from the generator:\n" + gen.text()[-2000:])
            return cell
        (ta, na), (tb, nb) = window[0], window[-1]
        cell.frames = nb - na
        cell.seconds = tb - ta
        # CPU over [t0, t1] scaled to the sample window (they nearly coincide).
        cell.cpu = (c1 - c0) * (cell.seconds / (t1 - t0))
        return cell
    finally:
        if gen is not None:
            gen.stop(enter=True)
        backend.stop(enter=be_prefix is not None)
        for prefix in (gen_prefix, be_prefix):
            if prefix:
                cleanup_prefix(prefix)
        shutil.rmtree(workdir, ignore_errors=True)


def part1(args: argparse.Namespace, gen_cpu: int, be_cpu: int) -> None:
    kinds = ["vdev", "vdev+poll", "dpdk-vhost"]
    cells: dict[tuple[int, str], Cell] = {(s, k): Cell() for s in args.sizes for k in kinds}
    for size in args.sizes:
        for rnd in range(args.rounds):
            for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                c = measure(kind, size, gen_cpu, be_cpu, args.seconds, args.warmup)
                total = cells[(size, kind)]
                total.frames += c.frames
                total.seconds += c.seconds
                total.cpu += c.cpu
                total.notes += c.notes
                print(f"  {size:>5} B  {kind:<11} round {rnd + 1}: {c.mpps:7.3f} Mpps", file=sys.stderr)
    print()
    print("Part 1: frames/s through one back-end core (generator: testpmd virtio-user txonly)")
    hdr = f"{'frame':>6} {'back end':<11} {'Mpps':>8} {'CPU ns/frame':>13} {'vs dpdk-vhost':>14}"
    print(hdr)
    print("-" * len(hdr))
    for size in args.sizes:
        peer = cells[(size, "dpdk-vhost")]
        for kind in kinds:
            c = cells[(size, kind)]
            ns = c.ns_per_frame
            ratio = f"{c.mpps / peer.mpps:.2f}x" if peer.mpps and kind != "dpdk-vhost" else ""
            print(f"{size:>4} B {kind:<11} {c.mpps:>8.3f} {('-' if ns is None else f'{ns:.0f}'):>13} {ratio:>14}")
    for c in cells.values():
        for n in c.notes:
            print("note:", n)


# ---- part 2: guest iperf3 ------------------------------------------------------------------

GUEST = """
ip link set eth0 up
ip addr add 10.70.0.2/24 dev eth0
for i in $(seq 60); do ping -c 1 -W 1 10.70.0.1 >/dev/null && break; done
timeout 60 iperf3 -c 10.70.0.1 -t {t} -f m 2>&1 | grep receiver | sed 's/^/up /'
timeout 60 iperf3 -c 10.70.0.1 -t {t} -f m -R 2>&1 | grep receiver | sed 's/^/down /'
"""


@contextlib.contextmanager
def iperf_server(ns: str, cpu: int) -> Iterator[None]:
    from backends.net.tap import run_in_netns
    p = run_in_netns(ns, lambda: subprocess.Popen(["taskset", "-c", str(cpu), "iperf3", "-s"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        p.terminate()
        p.wait()


def move_tap(name: str, ns: str, timeout: float = 20) -> None:
    """Move DPDK's TAP into the namespace and give it the host address (pyroute2)."""
    from pyroute2 import IPRoute, NetNS

    from backends.net.tap import run_in_netns

    def body() -> None:
        deadline = time.monotonic() + timeout
        with IPRoute() as ipr:
            while not ipr.link_lookup(ifname=name):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"DPDK's TAP {name} did not appear")
                time.sleep(0.1)
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], net_ns_fd=ns)
        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=idx, address="10.70.0.1", prefixlen=24)
            ipr.link("set", index=idx, state="up")
    run_in_netns(None, body)


def guest_iperf(kind: str, gen_cpu: int, be_cpu: int, seconds: int) -> dict[str, float]:
    from backends.net.testing import throwaway_netns
    from vdev.testing.guest import build_guest_image, run_in_guest

    image = build_guest_image()
    workdir = tempfile.mkdtemp(prefix="vdev-netiperf-")
    sock = os.path.join(workdir, "net.sock")
    rates: dict[str, float] = {}
    with throwaway_netns("vdevb") as ns:
        prefix = None
        if kind == "vdev":
            be = Proc(["taskset", "-c", str(be_cpu), sys.executable, "-m", "vdev", "net", "--socket", sock,
                       "--tap", "vb" + ns[-6:], "--tap-netns", ns, "--tap-address", "10.70.0.1/24",
                       "--log-level", "warning"], name=kind)
        else:
            tap = "db" + ns[-6:]
            be, prefix = testpmd(be_cpu, [f"net_vhost0,iface={sock},queues=1", f"net_tap0,iface={tap}"],
                                 ["--forward-mode=io"], name=kind)
        try:
            wait_for(sock, be)
            if kind != "vdev":
                move_tap(tap, ns)
            with iperf_server(ns, be_cpu):
                script = GUEST.format(t=seconds)
                qemu_args = ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                             "-device", "virtio-net-pci,netdev=n0,vectors=0,romfile=,mac=52:54:00:70:00:02"]
                result = asyncio.run(_pinned_guest(image, script, qemu_args, gen_cpu, run_in_guest))
            for line in result.output.splitlines():
                m = re.match(r"(up|down) .*?([\d.]+) Mbits/sec", line)
                if m:
                    rates[m.group(1)] = float(m.group(2))
            if len(rates) < 2:
                print(f"note: {kind}: guest output:\n{result.output[-1500:]}", file=sys.stderr)
        finally:
            be.stop(enter=prefix is not None)
            if prefix:
                cleanup_prefix(prefix)
            shutil.rmtree(workdir, ignore_errors=True)
    return rates


async def _pinned_guest(image, script, qemu_args, cpu, run_in_guest):  # type: ignore[no-untyped-def]
    # Pin QEMU (started by run_in_guest) through our own affinity: children inherit it.
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return await run_in_guest(image, script, qemu_args=qemu_args, timeout=300)
    finally:
        os.sched_setaffinity(0, old)


def part2(args: argparse.Namespace, gen_cpu: int, be_cpu: int) -> None:
    kinds = ["vdev", "dpdk-vhost+tap"]
    got: dict[str, dict[str, list[float]]] = {k: {"up": [], "down": []} for k in kinds}
    for rnd in range(args.rounds):
        for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
            r = guest_iperf(kind, gen_cpu, be_cpu, args.iperf_seconds)
            for d in ("up", "down"):
                if d in r:
                    got[kind][d].append(r[d])
            print(f"  iperf3 {kind:<15} round {rnd + 1}: {r}", file=sys.stderr)
    print()
    print(f"Part 2: guest iperf3 (QEMU TCG, 1 vCPU), {args.iperf_seconds} s each way, Mbit/s (mean of rounds)")
    hdr = f"{'back end':<16} {'guest->host':>12} {'host->guest':>12}"
    print(hdr)
    print("-" * len(hdr))
    for kind in kinds:
        vals = [sum(v) / len(v) if v else float("nan") for v in (got[kind]["up"], got[kind]["down"])]
        print(f"{kind:<16} {vals[0]:>12.0f} {vals[1]:>12.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds before measuring (3; vdev waits 1 s for receive buffers before dropping)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per back end, alternated (2)")
    ap.add_argument("--sizes", default="64,1518", help="frame sizes in bytes (64,1518)")
    ap.add_argument("--no-pps", dest="pps", action="store_false", help="skip part 1 (frames per second)")
    ap.add_argument("--no-iperf", dest="iperf", action="store_false", help="skip part 2 (guest iperf3)")
    ap.add_argument("--iperf-seconds", type=int, default=5, help="iperf3 seconds each way (5)")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        ap.error("needs root (hugepages, TAPs, namespaces)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        ap.error("needs two CPUs: one for the generator, one for the back end")
    gen_cpu, be_cpu = cpus[0], cpus[-1]
    ensure_hugepages()
    sys.path.insert(0, str(REPO))
    from vdev.bench.report import machine
    print(f"vdev net vs dpdk-testpmd vhost ({machine()['line']})")
    print(f"  generator (and the guest) on CPU {gen_cpu}, back end on CPU {be_cpu}; "
          f"{args.seconds:g} s measured after {args.warmup:g} s, {args.rounds} round(s), alternating")
    sys.stdout.flush()
    if args.pps:
        part1(args, gen_cpu, be_cpu)
    sys.stdout.flush()
    if args.iperf:
        part2(args, gen_cpu, be_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
