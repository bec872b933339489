#!/usr/bin/env python3
"""virtio-blk from inside a QEMU guest: fio against a vdev blk disk and a qemu-storage-daemon disk.

One guest (Debian's kernel, the project's initramfs, `vdev.testing.guest`)
gets two ``vhost-user-blk-pci`` disks: one served by ``vdev blk``, one by
qemu-storage-daemon's vhost-user-blk export, on the same kind of storage
(``--storage tmpfs``: a sparse file in /dev/shm each; ``null``: vdev
``null:`` and QSD ``null-co``).  One fio job file,
``benchmarks/guest_compare_blk.fio``, runs against both (``--section`` per
workload, ``DISK`` from the environment), the disks alternating: vdev first
for the first workload, QSD first for the next, and so on.  Each fio run
writes its JSON, the largest completion latency per 100 ms
(``--write_lat_log`` with ``--log_avg_msec=100 --log_max_value=1``) and a
completion-latency histogram per 100 ms (``--write_hist_log``); the guest
packs them up and prints them on the console, and `vdev.bench.fio` turns
them into the files and pictures of ``vdev bench blk --out``.

It prints one table (fio's IOPS and clat percentiles, the back end's CPU per
request, and the ratios vdev/qsd).  ``--out DIR`` writes, per workload, the
two back ends' percentile curves and latency over time overlaid and an IOPS
/ CPU bar chart, and per workload and back end result.json, latency.hlog and
latency.hgrm; plus results.json and the job file.

**TCG bounds both.**  The guest runs under QEMU's TCG (software emulation,
one vCPU): the guest kernel, fio and virtio-pci notifications all run
emulated, and cost far more than either back end.  The figures measure the
whole stack as a guest sees it, with both back ends behind the same
emulator; differences between back ends are damped toward 1, and absolute
figures are far below what a KVM guest gets.  ``benchmarks/compare_blk.py``
measures the back ends themselves.

    .venv/bin/python benchmarks/guest_compare_blk.py [--seconds 10] [--workloads ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backends import Daemon, pin_cpus, qsd_daemon, vdev_daemon
from vdev.bench.fio import (
    FioRun,
    fio_run,
    guest_pack_command,
    parse_fio_json,
    run_document,
    series_of,
    unpack_guest_output,
    write_run_files,
)
from vdev.bench.report import (
    machine,
    plot_bars,
    plot_over_time,
    plot_percentiles,
    write_json,
)
from vdev.testing.guest import GuestBootError, build_guest_image, run_in_guest

HERE = os.path.dirname(os.path.abspath(__file__))
JOB_FILE = os.path.join(HERE, "guest_compare_blk.fio")
WORKLOADS = ("randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd16", "randrw-4k-qd8")
DEFAULT_WORKLOADS = ("randread-4k-qd1", "randread-4k-qd16", "randwrite-4k-qd16")
BACKENDS = ("vdev", "qsd")
SERIAL = "vdev-guest-compare"
DISK = 1 << 30
TCG_NOTE = ("TCG bounds both: the guest (kernel, fio, virtio notifications) runs under QEMU's software "
            "emulation, which costs far more than either back end; ratios are damped toward 1 and "
            "absolute figures are far below a KVM guest's. benchmarks/compare_blk.py measures the back "
            "ends themselves.")


def job_sections(text: str) -> list[str]:
    return [s for s in re.findall(r"^\[([^\]]+)\]", text, re.MULTILINE) if s != "global"]


def order_of(index: int) -> tuple[str, ...]:
    """The back ends in the order workload ``index`` runs them (alternating)."""
    return BACKENDS if index % 2 == 0 else BACKENDS[::-1]


def guest_script(workloads: list[str], seconds: int, ramp: int) -> str:
    runs = []
    for i, w in enumerate(workloads):
        for b in order_of(i):
            disk = "$VDEV" if b == "vdev" else "$QSD"
            runs.append(f"echo 'fio: {w} on {b}'\n"
                        f"DISK={disk} RUNTIME={seconds} RAMP={ramp} LOGS=/tmp/out/{b} "
                        f"fio /job.fio --section={w} --output-format=json --output=/tmp/out/{b}/{w}.json")
    return f"""set -e
VDEV= QSD=
for d in /sys/block/vd*; do
    case "$(cat $d/serial 2>/dev/null)" in
        {SERIAL}*) VDEV=/dev/${{d##*/}} ;;
        *) QSD=/dev/${{d##*/}} ;;
    esac
done
echo "disks: vdev=$VDEV qsd=$QSD"
[ -n "$VDEV" ] && [ -n "$QSD" ]
mkdir -p /tmp/out/vdev /tmp/out/qsd
{chr(10).join(runs)}
rm -f /tmp/out/*/*_lat.log /tmp/out/*/*_slat.log
{guest_pack_command("/tmp/out")}
"""


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def load_runs(logdir: str, workloads: list[str]) -> dict[tuple[str, str], FioRun]:
    runs = {}
    for w in workloads:
        for b in BACKENDS:
            base = os.path.join(logdir, b, w)
            doc = parse_fio_json(read(base + ".json"), f"{b} {w}")
            lat = base + "_clat.log"
            runs[(w, b)] = fio_run(b, doc["jobs"][0], read(base + "_clat_hist.log"),
                                   read(lat) if os.path.exists(lat) else None, what=f"{b} {w}")
            runs[(w, b)].options["fio_version"] = doc.get("fio version")
    return runs


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def print_table(runs: dict[tuple[str, str], FioRun], workloads: list[str]) -> None:
    keys = ("p50", "p99", "p99.9", "p99.99", "max")
    hdr = (f"{'workload':<18} {'back end':<8} {'IOPS':>8} " + " ".join(f"{k:>8}" for k in keys)
           + f" {'CPU/req':>8} | {'IOPS':>5} {'p50':>5} {'p99':>5} {'p99.9':>5} {'CPU':>5}")
    print(f"{'':<{len(hdr) - 30}} ratio vdev/qsd")
    print(hdr)
    print("-" * len(hdr))
    for w in workloads:
        peer = runs[(w, "qsd")]
        plat = peer.main.latency_us()
        for b in BACKENDS:
            r = runs[(w, b)]
            lat = r.main.latency_us()
            line = (f"{w:<18} {b:<8} {r.iops:>8.0f} " + " ".join(f"{fmt(lat[k]):>8}" for k in keys)
                    + f" {fmt(r.backend_cpu_us, '.2f'):>8} |")
            if b == "vdev":
                line += (f" {ratio(r.iops, peer.iops):>5} {ratio(lat['p50'], plat['p50']):>5} "
                         f"{ratio(lat['p99'], plat['p99']):>5} {ratio(lat['p99.9'], plat['p99.9']):>5} "
                         f"{ratio(r.backend_cpu_us, peer.backend_cpu_us):>5}")
            print(line)
    print("fio completion latency (clat) in the guest, µs, as fio's JSON reports it; CPU/req: the back "
          "end's CPU time over the guest's life / the requests fio counted, µs.")
    print("ratios: IOPS > 1 and latency/CPU < 1 mean vdev is better than qemu-storage-daemon.")


def write_out(out: str, runs: dict[tuple[str, str], FioRun], workloads: list[str], *, guest: dict[str, object],
              targets: dict[str, dict[str, object]], args: argparse.Namespace, start_unix: float) -> None:
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(JOB_FILE, os.path.join(out, "guest_compare_blk.fio"))
    m = machine()
    doc: dict[str, object] = {"benchmark": "guest_compare_blk", "machine": m, "guest": guest,
                              "settings": {"seconds": args.seconds, "ramp": args.ramp, "storage": args.storage},
                              "note": TCG_NOTE, "runs": []}
    for w in workloads:
        pair = [runs[(w, b)] for b in BACKENDS]
        for r in pair:
            rdoc = run_document(r, workload={"job": w, "job_file": "guest_compare_blk.fio", **r.options},
                                target=targets[r.label], guest=guest, fio_version=r.options.get("fio_version"))
            write_run_files(r, os.path.join(out, w, r.label), rdoc, start_unix=start_unix)
            doc["runs"].append(rdoc)  # type: ignore[attr-defined]
        title = (f"fio {w} in a QEMU TCG guest, {args.storage} storage, {args.seconds} s: vdev blk vs "
                 f"qemu-storage-daemon\n{m['line']}; guest Linux {guest['kernel']}, TCG bounds both")
        live = series_of(pair)
        if live:
            plot_percentiles(live, os.path.join(out, f"{w}-latency-percentiles.png"), title,
                             measured="fio clat in the guest, submit → complete")
            plot_over_time(live, os.path.join(out, f"{w}-latency-over-time.png"), title)
            plot_bars(live, os.path.join(out, f"{w}-iops-cpu.png"), title)
    write_json(doc, os.path.join(out, "results.json"))


async def run(args: argparse.Namespace, workloads: list[str]) -> int:
    _d, bcpu, pin_note = pin_cpus(None, None)    # QEMU (our child) on the others
    m = machine()
    print(f"virtio-blk inside a QEMU guest: fio, vdev blk vs qemu-storage-daemon ({m['line']})")
    print(f"  {pin_note.replace('driver', 'QEMU')}; {args.seconds} s per run after {args.ramp} s ramp, "
          f"storage {args.storage}")
    print(f"  {TCG_NOTE}")
    print("  building (or reusing) the guest image ...", flush=True)
    image = build_guest_image()
    workdir = tempfile.mkdtemp(prefix="vdev-gcmp-")
    images: list[str] = []
    daemons: list[Daemon] = []
    try:
        if args.storage == "null":
            vdev_url, blockdev = f"null:{DISK}", f"driver=null-co,size={DISK},read-zeroes=on"
        else:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            for _ in BACKENDS:
                fd, path = tempfile.mkstemp(prefix="vdev-gcmp-", suffix=".img", dir=shm)
                os.ftruncate(fd, DISK)
                os.close(fd)
                images.append(path)
            vdev_url, blockdev = f"file:{images[0]}", f"driver=file,filename={images[1]},cache.direct=off"
        vdev = vdev_daemon("vdev", vdev_url, workdir, extra=["--serial", SERIAL, *args.vdev_arg], cpu=bcpu)
        qsd = qsd_daemon(blockdev, workdir, cpu=bcpu)
        daemons = [vdev, qsd]
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_ready()
        targets = {"vdev": {"argv": vdev.argv, "storage": vdev_url},
                   "qsd": {"argv": qsd.argv, "storage": blockdev}}
        before = {d.name: cpu_ns(d.pid) for d in daemons if d.pid}
        script = guest_script(workloads, args.seconds, args.ramp)
        n = len(workloads) * len(BACKENDS)
        print(f"  booting the guest; {n} fio runs of {args.seconds + args.ramp} s ...", flush=True)
        start_unix = time.time()
        try:
            result = await run_in_guest(
                image, script, files={"job.fio": read(JOB_FILE).encode()},
                timeout=180 + n * (args.seconds + args.ramp) * 3,
                qemu_args=["-chardev", f"socket,id=blk0,path={vdev.socket}",
                           "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1",
                           "-chardev", f"socket,id=blk1,path={qsd.socket}",
                           "-device", "vhost-user-blk-pci,chardev=blk1,num-queues=1"])
        except GuestBootError as exc:
            print(exc.console[-3000:], file=sys.stderr)
            raise SystemExit(f"guest_compare_blk: {exc}") from None
        after = {d.name: cpu_ns(d.pid) for d in daemons if d.pid and d.alive()}
        if result.exit_status != 0:
            print(result.output[-3000:], file=sys.stderr)
            raise SystemExit(f"guest_compare_blk: the guest script failed ({result.exit_status})")
        for line in result.output.splitlines():
            if line.startswith("disks:"):
                print(f"  guest {line}")
        unpack_guest_output(result.output, os.path.join(workdir, "logs"))
        runs = load_runs(os.path.join(workdir, "logs"), workloads)
        for d in daemons:
            if d.name in before and d.name in after:
                requests = sum(runs[(w, d.name)].requests for w in workloads)
                if requests:
                    for w in workloads:
                        runs[(w, d.name)].backend_cpu_us = (after[d.name] - before[d.name]) / requests / 1000
        guest = {"kernel": image.kernel_version, "accel": os.environ.get("VDEV_ACCEL", "tcg"), "vcpus": 1,
                 "queues": 1, "boot_and_run_s": round(result.duration, 1)}
        print()
        print(f"guest: Linux {image.kernel_version} under QEMU {guest['accel'].upper()}, 1 vCPU, 1 queue per "
              f"disk; boot + runs {result.duration:.1f} s")
        print_table(runs, workloads)
        print(f"note: {TCG_NOTE}")
        if args.out:
            write_out(args.out, runs, workloads, guest=guest, targets=targets, args=args, start_unix=start_unix)
            print(f"\npictures, HdrHistogram logs and results.json written to {args.out}")
    finally:
        for d in daemons:
            d.stop()
        for path in images:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="fio runtime per run (10)")
    ap.add_argument("--ramp", type=int, default=1, help="fio ramp_time per run, not measured (1)")
    ap.add_argument("--storage", default="tmpfs", choices=["tmpfs", "null"],
                    help="tmpfs: a sparse file in /dev/shm each (default); null: null storage")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"sections of the job file (default {','.join(DEFAULT_WORKLOADS)}; "
                         f"all: {','.join(WORKLOADS)})")
    ap.add_argument("--vdev-arg", action="append", default=[], metavar="ARG",
                    help="extra vdev blk argument (repeat), e.g. --vdev-arg=--poll-us --vdev-arg=50")
    ap.add_argument("--out", metavar="DIR", help="write results.json, HdrHistogram logs and pictures here")
    args = ap.parse_args(argv)
    if args.seconds < 1 or args.ramp < 0:
        ap.error("--seconds must be >= 1 and --ramp >= 0")
    sections = job_sections(read(JOB_FILE))
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in sections]
    if unknown or not workloads:
        ap.error(f"--workloads: {', '.join(unknown) or 'none given'}; the job file has {', '.join(sections)}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out: {args.out!r} exists and is not a directory")
    return asyncio.run(run(args, workloads))


if __name__ == "__main__":
    sys.exit(main())
