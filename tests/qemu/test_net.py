"""QEMU guests on `vdev net`: a multi-queue TAP in a namespace, and two guests on a cable.

QEMU 7.2 under TCG with ``-netdev vhost-user`` and ``-device
virtio-net-pci,...,vectors=0`` (with MSI-X, QEMU 7.2 under TCG segfaults on
vhost-user net).  Each test reuses one boot for several checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.net.device import CableLink, NetDevice
from backends.net.tap import run_in_netns
from backends.net.testing import can_use_tap, throwaway_netns
from vdev.device import serve
from vdev.testing.guest import GuestImage, run_in_guest

pytestmark = pytest.mark.skipif(not can_use_tap(), reason="needs root and /dev/net/tun")

BLOB = 16 << 20


def nic(sock: Path, mac: str, *, queues: int = 1) -> list[str]:
    netdev = f"vhost-user,id=n0,chardev=c0{f',queues={queues}' if queues > 1 else ''}"
    device = f"virtio-net-pci,netdev=n0,vectors=0,romfile=,mac={mac}{',mq=on' if queues > 1 else ''}"
    return ["-chardev", f"socket,id=c0,path={sock}", "-netdev", netdev, "-device", device]


@pytest.fixture
def netns() -> Iterator[str]:
    with throwaway_netns() as ns:
        def quiet() -> None:
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
        run_in_netns(ns, quiet)
        yield ns


class Sink(threading.Thread):
    """Accepts one TCP connection in a namespace and hashes what arrives."""

    def __init__(self, ns: str, port: int) -> None:
        super().__init__(daemon=True)
        self.listener = run_in_netns(ns, lambda: socket.create_server(("0.0.0.0", port)))
        self.listener.settimeout(240)
        self.digest: str | None = None
        self.size = 0

    def run(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            h = hashlib.sha256()
            with conn:
                while chunk := conn.recv(1 << 16):
                    h.update(chunk)
                    self.size += len(chunk)
            self.digest = h.hexdigest()
        self.listener.close()


class Source(threading.Thread):
    """Connects (retrying until the guest listens) from a namespace and sends ``data``."""

    def __init__(self, ns: str, addr: tuple[str, int], data: bytes) -> None:
        super().__init__(daemon=True)
        self.ns, self.addr, self.data = ns, addr, data
        self.sent = False

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not self.sent:
            s = run_in_netns(self.ns, socket.socket)
            try:
                s.settimeout(120)
                s.connect(self.addr)
                s.sendall(self.data)
                self.sent = True
            except OSError:
                time.sleep(0.5)
            finally:
                s.close()


TAP_SCRIPT = """
ip link set eth0 up
ip addr add 10.50.0.2/24 dev eth0
echo "cpus=$(nproc)"
ping -c 3 -W 5 10.50.0.1 && echo PING-OK
(timeout 120 socat -u TCP-LISTEN:6000,reuseaddr - | sha256sum > /tmp/in.sha) &
timeout 60 iperf3 -c 10.50.0.1 -t 5 -P 2 -f m 2>&1 | grep -E 'SUM.*(sender|receiver)'
timeout 60 iperf3 -c 10.50.0.1 -t 5 -P 2 -f m -R 2>&1 | grep -E 'SUM.*(sender|receiver)'
dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null
echo "out-sha=$(sha256sum /tmp/blob | cut -d' ' -f1)"
timeout 120 socat -u FILE:/tmp/blob TCP:10.50.0.1:5001 && echo SENT-OK
wait
echo "in-sha=$(cut -d' ' -f1 /tmp/in.sha)"
"""


def _receiver_rates(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"SUM\].*?([\d.]+) Mbits/sec.*receiver", out)]


async def test_guest_on_a_multiqueue_tap(guest_image: GuestImage, vdev_daemon, netns: str,
                                         tmp_path: Path) -> None:
    """A 2-vCPU guest with mq=on and 2 queue pairs, its TAP in a namespace:
    pings the TAP's address, iperf3 5 s each way, 16 MiB each way through
    socat with equal sha256 on both ends; both pairs carry frames (per-queue
    counters), and the guest's TCP uses 64 KiB GSO frames both ways."""
    sock = tmp_path / "net.sock"
    ctl = tmp_path / "net.ctl"
    daemon = vdev_daemon("net", "--socket", str(sock), "--tap", "vq" + netns[-6:], "--tap-netns", netns,
                         "--tap-address", "10.50.0.1/24", "--queues", "2", "--control", str(ctl),
                         wait_for=sock)
    # A child started from a thread inside the namespace is born in it.
    iperf = await asyncio.to_thread(run_in_netns, netns, lambda: subprocess.Popen(
        ["iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    sink = Sink(netns, 5001)
    sink.start()
    to_guest = random.Random(7).randbytes(BLOB)
    source = Source(netns, ("10.50.0.2", 6000), to_guest)
    source.start()
    try:
        result = await run_in_guest(guest_image, TAP_SCRIPT, timeout=300, smp=2,
                                    qemu_args=nic(sock, "52:54:00:12:34:56", queues=2))
    finally:
        iperf.terminate()
        iperf.wait()
    out = result.output
    assert result.exit_status == 0, result.console
    assert "cpus=2" in out and "PING-OK" in out, out
    rates = _receiver_rates(out)
    assert len(rates) == 2 and min(rates) > 0, out
    assert "SENT-OK" in out, out
    await asyncio.to_thread(sink.join, 60)
    assert sink.size == BLOB and f"out-sha={sink.digest}" in out, out
    assert source.sent and f"in-sha={hashlib.sha256(to_guest).hexdigest()}" in out, out

    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "vdev", "ctl", str(ctl), "info"],
                                   capture_output=True, text=True, timeout=30)
    info = json.loads(done.stdout)
    queues = {q["queue"]: q for q in info["queues"]}
    assert all(queues[i]["frames"] > 0 for i in range(4)), queues
    tx = [queues[1], queues[3]]
    rx = [queues[0], queues[2]]
    # GSO both ways: transmitted frames average well above an MTU; received
    # ones took more buffers than frames (mergeable buffers for 64 KiB frames).
    assert sum(q["bytes"] for q in tx) / sum(q["frames"] for q in tx) > 3000, tx
    assert sum(q["buffers"] for q in rx) > sum(q["frames"] for q in rx), rx
    assert all(q["dropped"] == 0 for q in tx), tx
    assert "Traceback" not in daemon.log()


CABLE_A = """
ip link set eth0 up
ip addr add 10.60.0.1/24 dev eth0
iperf3 -s -D
for i in $(seq 120); do ping -c 1 -W 1 10.60.0.2 >/dev/null && break; done
ping -c 3 -W 5 10.60.0.2 && echo PING-OK
timeout 200 nc -l -p 7000 && echo PEER-DONE
"""

CABLE_B = """
ip link set eth0 up
ip addr add 10.60.0.2/24 dev eth0
for i in $(seq 120); do ping -c 1 -W 1 10.60.0.1 >/dev/null && break; done
ping -c 3 -W 5 10.60.0.1 && echo PING-OK
for i in $(seq 30); do timeout 60 iperf3 -c 10.60.0.1 -t 5 -f m > /tmp/up 2>&1 && break; sleep 1; done
grep receiver /tmp/up
timeout 60 iperf3 -c 10.60.0.1 -t 5 -f m -R 2>&1 | grep receiver
echo done | nc 10.60.0.1 7000
"""


def _rates(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"([\d.]+) Mbits/sec.*receiver", out)]


@pytest.mark.parametrize("where", ["one-process", "two-daemons"])
async def test_two_guests_on_a_cable(guest_image: GuestImage, vdev_daemon, tmp_path: Path, where: str) -> None:
    """Two guests joined by --cable ping each other and run iperf3 both ways:
    in one process the workers copy between the two guests' memories; two
    daemons meet at the cable's rendezvous and pass frames over socket pairs."""
    name = f"qemu-{os.getpid()}-{where}"
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    servers: list[asyncio.Task[None]] = []
    if where == "two-daemons":
        for s in socks:
            vdev_daemon("net", "--socket", str(s), "--cable", name, wait_for=s)
    else:
        for s in socks:
            servers.append(asyncio.get_running_loop().create_task(serve(NetDevice(CableLink(name)), str(s))))
        async with asyncio.timeout(10):
            while not all(s.exists() for s in socks):
                await asyncio.sleep(0.02)
    try:
        a, b = await asyncio.gather(
            run_in_guest(guest_image, CABLE_A, timeout=300, qemu_args=nic(socks[0], "52:54:00:00:00:0a")),
            run_in_guest(guest_image, CABLE_B, timeout=300, qemu_args=nic(socks[1], "52:54:00:00:00:0b")))
    finally:
        for t in servers:
            t.cancel()
        for t in servers:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    assert a.exit_status == 0 and "PING-OK" in a.output and "PEER-DONE" in a.output, a.console
    assert b.exit_status == 0 and "PING-OK" in b.output, b.console
    rates = _rates(b.output)
    assert len(rates) == 2 and min(rates) > 0, b.output
