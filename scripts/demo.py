"""The vdev demo: a RAM disk served by `vdev blk`, measured by fio inside a QEMU guest.

1. start ``vdev blk --backend mem:SIZE`` as its own process;
2. boot a TCG guest (Debian kernel + the project's initramfs) with
   ``-device vhost-user-blk-pci`` on that socket;
3. run fio 4 KiB random reads at queue depth 1 and 16 in the guest;
4. print IOPS and completion-latency percentiles (p50, p99, p99.9, p99.99,
   max), and the device's own latency (``vdev ctl … latency``);
5. write, into ``--out DIR`` (default: a new ``/tmp/vdev-demo-DATE-TIME``),
   what ``vdev bench blk --out`` writes, made from fio's JSON and its latency
   logs (``--write_lat_log``/``--write_hist_log``, 100 ms): per workload
   ``result.json``, ``latency.hlog`` (HdrHistogram log) and ``latency.hgrm``;
   and both workloads overlaid in ``latency-percentiles.png`` and
   ``latency-over-time.png``, plus ``result.json`` with everything.

The guest runs under TCG (software emulation), so the figures say more about
the emulator than about the device; host-side benchmarks in ``benchmarks/``
measure the back end itself against qemu-storage-daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vdev.bench.fio import (  # noqa: E402
    FIO_LOG_OPTIONS,
    FioRun,
    fio_run,
    guest_pack_command,
    parse_fio_json,
    run_document,
    series_of,
    unpack_guest_output,
    write_run_files,
)
from vdev.bench.report import machine, plot_over_time, plot_percentiles, write_json  # noqa: E402
from vdev.control import control_request  # noqa: E402
from vdev.testing.guest import build_guest_image, run_in_guest  # noqa: E402

#: (name, file tag, iodepth)
WORKLOADS = (("4k randread QD1", "randread-4k-qd1", 1), ("4k randread QD16", "randread-4k-qd16", 16))


def fio_command(name: str, tag: str, depth: int, seconds: int) -> str:
    return (f"fio --name='{name}' --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randread "
            f"--bs=4k --iodepth={depth} --time_based --runtime={seconds} --ramp_time=1 "
            f"{FIO_LOG_OPTIONS} --write_lat_log=/tmp/out/{tag} --write_hist_log=/tmp/out/{tag} "
            f"--output-format=json --output=/tmp/out/{tag}.json")


def default_out() -> str:
    return time.strftime("/tmp/vdev-demo-%Y%m%d-%H%M%S")


def write_files(out: str, runs: list[tuple[str, str, FioRun]], *, backend: str, guest: dict[str, object],
                device_latency: dict[str, object], start_unix: float, seconds: int) -> None:
    """What `vdev bench blk --out` writes, from fio's files (see the module docstring)."""
    os.makedirs(out, exist_ok=True)
    docs = []
    for name, tag, run in runs:
        doc = run_document(run, workload={"name": name, **run.options}, target={"backend": backend},
                           guest=guest, fio_version=run.options.get("fio_version"))
        write_run_files(run, os.path.join(out, tag), doc, start_unix=start_unix)
        docs.append(doc)
    write_json({"tool": "vdev demo", "machine": machine(), "guest": guest, "backend": backend,
                "device_latency_us": device_latency, "runs": docs}, os.path.join(out, "result.json"))
    title = (f"vdev demo: fio 4 KiB randread in a QEMU TCG guest, vdev blk on {backend}, {seconds} s each\n"
             f"{machine()['line']}; guest Linux {guest['kernel']}")
    series = series_of([run for _n, _t, run in runs])
    plot_percentiles(series, os.path.join(out, "latency-percentiles.png"), title,
                     measured="fio clat in the guest, submit → complete")
    plot_over_time(series, os.path.join(out, "latency-over-time.png"), title)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="fio runtime per workload (default 10)")
    parser.add_argument("--backend", default="mem:256M", help="storage URL for vdev blk (default mem:256M)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write result.json, HdrHistogram logs and pictures "
                             "(default: a new /tmp/vdev-demo-DATE-TIME)")
    args = parser.parse_args()
    out = args.out or default_out()
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out: {out!r} exists and is not a directory")

    print("vdev demo: building (or reusing) the guest image ...", flush=True)
    image = build_guest_image()
    with tempfile.TemporaryDirectory(prefix="vdev-demo-") as tmp:
        sock, ctl, log = Path(tmp, "blk.sock"), Path(tmp, "blk.ctl"), Path(tmp, "vdev-blk.log")
        cmd = [sys.executable, "-m", "vdev", "blk", "--socket", str(sock), "--backend", args.backend,
               "--control", str(ctl)]
        print("vdev demo: starting", " ".join(cmd[1:]), flush=True)
        with open(log, "wb") as logf:
            daemon = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not sock.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(log.read_text(), file=sys.stderr)
                    raise SystemExit("vdev demo: vdev blk did not start")
                await asyncio.sleep(0.05)
            script = "set -e\nmkdir -p /tmp/out\n" + "\n".join(
                fio_command(name, tag, depth, args.seconds) for name, tag, depth in WORKLOADS)
            script += "\nrm -f /tmp/out/*_lat.log /tmp/out/*_slat.log\n" + guest_pack_command("/tmp/out") + "\n"
            start_unix = time.time()
            print(f"vdev demo: booting a TCG guest with vhost-user-blk-pci and running fio "
                  f"({len(WORKLOADS)} x {args.seconds + 1} s) ...", flush=True)
            result = await run_in_guest(image, script, timeout=120 + 4 * args.seconds, qemu_args=[
                "-chardev", f"socket,id=blk0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1",
            ])
            if result.exit_status != 0:
                print(result.console, file=sys.stderr)
                raise SystemExit(f"vdev demo: the guest script failed ({result.exit_status})")
            info = await control_request(str(ctl), {"command": "info"})
            device_latency = await control_request(str(ctl), {"command": "latency"})
            unpack_guest_output(result.output, str(Path(tmp, "fio")))
            runs = []
            for name, tag, _depth in WORKLOADS:
                doc = parse_fio_json(Path(tmp, "fio", f"{tag}.json").read_text(), f"fio {tag}")
                run = fio_run(name, doc["jobs"][0], Path(tmp, "fio", f"{tag}_clat_hist.log").read_text(),
                              Path(tmp, "fio", f"{tag}_clat.log").read_text(), what=f"fio {tag}")
                run.options["fio_version"] = doc.get("fio version")
                runs.append((name, tag, run))
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()

    print()
    print(f"vdev blk on {args.backend}, guest: Linux {image.kernel_version} under QEMU TCG "
          f"(boot + run {result.duration:.1f} s)")
    print(f"machine: {machine()['line']}")
    print("fio 4 KiB random read, O_DIRECT, libaio; completion latency in microseconds")
    keys = ("p50", "p99", "p99.9", "p99.99", "max")
    print(f"{'workload':<20}{'IOPS':>10}" + "".join(f"{k:>10}" for k in keys))
    for name, _tag, run in runs:
        lat = run.main.latency_us()
        print(f"{name:<20}{run.iops:>10.0f}" + "".join(f"{lat[k] or 0:>10.1f}" for k in keys))
    stats = info.get("stats", {})
    print(f"\ndevice counters: {stats.get('IN', 0)} reads, {stats.get('OUT', 0)} writes, "
          f"{stats.get('errors', 0)} errors")
    dev = device_latency.get("all", {})
    print("device latency (pop -> completion, all queues, `vdev ctl … latency`): "
          + "  ".join(f"{k} {dev.get(k, 0):.1f}" for k in keys) + " µs")
    guest = {"kernel": image.kernel_version, "accel": "tcg", "vcpus": 1, "boot_and_run_s": round(result.duration, 1)}
    write_files(out, runs, backend=args.backend, guest=guest, device_latency=device_latency,
                start_unix=start_unix, seconds=args.seconds)
    print(f"\nfiles: {out}/result.json, {out}/latency-percentiles.png, {out}/latency-over-time.png, "
          f"and per workload {out}/<workload>/latency.hlog (HdrHistogram log), latency.hgrm, result.json")
    print("(TCG emulates the guest CPU, so these figures bound the whole stack, not the device; "
          "see benchmarks/ for host-side measurements against qemu-storage-daemon.)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
