"""The vdev demo: a RAM disk served by `vdev blk`, measured by fio inside a QEMU guest.

1. start ``vdev blk --backend mem:SIZE`` as its own process;
2. boot a TCG guest (Debian kernel + the project's initramfs) with
   ``-device vhost-user-blk-pci`` on that socket;
3. run fio 4 KiB random reads at queue depth 1 and 16 in the guest;
4. print IOPS and completion-latency percentiles (p50, p99, p99.9, max).

The guest runs under TCG (software emulation), so the figures say more about
the emulator than about the device; host-side benchmarks in ``benchmarks/``
measure the back end itself against qemu-storage-daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vdev.control import control_request  # noqa: E402
from vdev.testing.guest import build_guest_image, run_in_guest  # noqa: E402

WORKLOADS = (("4k randread QD1", 1), ("4k randread QD16", 16))
SPLIT = "@@vdev-demo-fio@@"


def fio_command(name: str, depth: int, seconds: int) -> str:
    return (f"fio --name='{name}' --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randread "
            f"--bs=4k --iodepth={depth} --time_based --runtime={seconds} --ramp_time=1 "
            f"--percentile_list=50:99:99.9 --output-format=json")


def summarize(job: dict) -> dict[str, float]:
    read = job["read"]
    pct = read["clat_ns"].get("percentile", {})
    return {
        "iops": read["iops"],
        "p50": pct.get("50.000000", 0) / 1000,
        "p99": pct.get("99.000000", 0) / 1000,
        "p99.9": pct.get("99.900000", 0) / 1000,
        "max": read["clat_ns"]["max"] / 1000,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="fio runtime per workload (default 10)")
    parser.add_argument("--backend", default="mem:256M", help="storage URL for vdev blk (default mem:256M)")
    args = parser.parse_args()

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
            script = "set -e\n" + "\n".join(
                f"echo {SPLIT}\n{fio_command(name, depth, args.seconds)}" for name, depth in WORKLOADS)
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
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()

    runs = [json.loads(part) for part in result.output.split(SPLIT)[1:]]
    print()
    print(f"vdev blk on {args.backend}, guest: Linux {image.kernel_version} under QEMU TCG "
          f"(boot + run {result.duration:.1f} s)")
    print("fio 4 KiB random read, O_DIRECT, libaio; completion latency in microseconds")
    print(f"{'workload':<20}{'IOPS':>10}{'p50':>10}{'p99':>10}{'p99.9':>10}{'max':>10}")
    for (name, _depth), run in zip(WORKLOADS, runs):
        s = summarize(run["jobs"][0])
        print(f"{name:<20}{s['iops']:>10.0f}{s['p50']:>10.1f}{s['p99']:>10.1f}{s['p99.9']:>10.1f}"
              f"{s['max']:>10.1f}")
    stats = info.get("stats", {})
    print(f"\ndevice counters: {stats.get('IN', 0)} reads, {stats.get('OUT', 0)} writes, "
          f"{stats.get('errors', 0)} errors")
    print("(TCG emulates the guest CPU, so these figures bound the whole stack, not the device; "
          "see benchmarks/ for host-side measurements against qemu-storage-daemon.)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
