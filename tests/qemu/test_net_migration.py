"""Live migration of a QEMU 7.2 guest on a `vdev net` TAP while it pings and is pinged.

Two `vdev net` daemons, a source and a destination (as on two hosts), each
with its own TAP; both TAPs are ports of one Linux bridge in a throwaway
network namespace, whose own address is the guest's peer (10.70.0.1/24; the
guest is 10.70.0.2/24).  The guest boots on the source QEMU and pings the
bridge every 0.1 s; the namespace pings the guest every 0.1 s as well.  While
both pings run, the guest migrates through QMP to a second QEMU
(``-incoming``) whose NIC is the destination daemon's, and the pings go on
a few seconds there.

What moves the host→guest direction is the bridge learning that the guest's
MAC now sits behind the destination's port: after a migration the guest has
to be *announced*.  QEMU 7.2 does it one of two ways with a vhost-user
netdev, and each is a case here:

* ``guest-announce`` (QEMU's default, ``guest_announce=on``): `vdev net`
  offers VIRTIO_NET_F_GUEST_ANNOUNCE (QEMU adds CTRL_VQ, its own queue), so
  the guest driver negotiates it.  QEMU then skips SEND_RARP
  (``vhost_user_migration_done``: "If guest supports GUEST_ANNOUNCE do
  nothing"); instead the destination's virtio-net sets
  VIRTIO_NET_S_ANNOUNCE in the status field and raises a config interrupt,
  five rounds (``announce-rounds``), and the guest answers each with a
  gratuitous ARP (and an unsolicited IPv6 neighbour advertisement) that it
  transmits like any frame: through the destination daemon's transmit ring
  into its TAP.  virtio 1.2 §5.1.6.5.4 "Gratuitous Packet Sending".
* ``send-rarp`` (``-device virtio-net-pci,guest_announce=off``: a driver
  that cannot announce itself): QEMU sends VHOST_USER_SEND_RARP with the
  guest's MAC (protocol feature RARP), once per round, before it even starts
  the destination's rings, and the daemon writes a RARP broadcast from that
  MAC into its TAP (`NetDevice.send_rarp`; counted as ``rarps_sent``).

Both cases check: the migration completed and the destination runs; the
guest negotiated what the case says (its virtio feature bits); the
guest's ping of the host answered to the end, with a small bounded loss,
and its echo requests left through the source's port before the move and
the destination's after; the namespace's ping of the guest answered after
the move, to the end; the announcement came in through the destination's
port (captured there with a packet socket, with kernel receive times) and
the bridge's FDB holds the guest's MAC on that port; every frame from the
guest through the source's port came before every frame through the
destination's; the source daemon's per-queue counters froze at the move
while the destination's went up; no Traceback in either daemon's log.

The guest's own pings reach the bridge through the destination's port
within 0.1 s of the move, and the bridge learns from those too, so the
host→guest ping recovers even without an announcement: the announcement is
checked as the frames themselves (and, with SEND_RARP, as the first frame
from the guest's MAC through the destination's port, which the RARP is
because QEMU asks for it before starting the rings).  Checked by hand: with
`NetDevice.send_rarp` returning before it writes, ``send-rarp`` fails (no
RARP frame, ``rarps_sent`` 0); with GUEST_ANNOUNCE left out of
`NetDevice.features`, ``guest-announce`` fails (the guest did not
negotiate it; QEMU fell back to SEND_RARP and no gratuitous ARP came).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backends.net.tap import run_in_netns
from backends.net.testing import can_use_tap, internet_checksum, packet_socket, throwaway_netns
from vdev.control import control_request
from vdev.testing.guest import GuestImage, GuestVM

pytestmark = pytest.mark.skipif(not can_use_tap(), reason="needs root and /dev/net/tun")

HOST, GUEST = "10.70.0.1", "10.70.0.2"
MAC = "52:54:00:70:00:02"
MAC_BYTES = bytes.fromhex(MAC.replace(":", ""))
BRIDGE = "br0"
#: Both pings' interval (s).
INTERVAL = 0.1
#: How long the pings go on before the move, and after it.
BEFORE, AFTER = 2.0, 4.0
#: The last pings of each direction that must all be answered, and the most
#: either direction may lose in all (3 s of pings: the downtime is ~0.2 s).
TAIL, MAX_LOST = 20, 30
ETH_P_ARP, ETH_P_RARP, ETH_P_IP = 0x0806, 0x8035, 0x0800
PACKET_OUTGOING = 4          # linux/if_packet.h: a frame the interface sent, not one it received
SO_TIMESTAMPNS = 35          # asm-generic/socket.h: the kernel's receive time as a timespec
CTRL_VQ, GUEST_ANNOUNCE = 17, 21   # VIRTIO_NET_F_* bit numbers (virtio 1.2 §5.1.3)

SCRIPT = f"""
ip link set eth0 up
ip addr add {GUEST}/24 dev eth0
for i in $(seq 60); do ping -c 1 -W 1 {HOST} >/dev/null && break; done
echo "features=$(cat /sys/bus/virtio/devices/virtio0/features)"
ping -i {INTERVAL} {HOST} > /tmp/ping.out 2>&1 &
pinger=$!
echo ready
read -r step < /dev/ttyS0
kill -INT $pinger
wait $pinger
cat /tmp/ping.out
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # QMP, vhost-user and migration sockets live here: Unix paths stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="vnmig-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bridged_netns() -> Iterator[str]:
    """A throwaway namespace holding bridge ``br0`` with address HOST/24 (and no IPv6 chatter)."""
    with throwaway_netns("vnmig") as ns:
        def setup() -> None:
            from pyroute2 import IPRoute
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            with IPRoute() as ipr:
                ipr.link("add", ifname=BRIDGE, kind="bridge")      # no STP: ports forward at once
                (index,) = ipr.link_lookup(ifname=BRIDGE)
                ipr.addr("add", index=index, address=HOST, prefixlen=24)
                ipr.link("set", index=index, state="up")
        run_in_netns(ns, setup)
        yield ns


def nic(sock: Path, guest_announce: bool) -> list[str]:
    device = f"virtio-net-pci,netdev=n0,vectors=0,romfile=,mac={MAC}"
    return ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
            "-device", device + ("" if guest_announce else ",guest_announce=off")]


class Pinger(threading.Thread):
    """ICMP echo requests from a namespace to ``dst`` every INTERVAL (a raw socket made
    there); the send time of each sequence number, and the time its reply came."""

    def __init__(self, ns: str, dst: str) -> None:
        super().__init__(daemon=True)
        self.sock = run_in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        self.dst = dst
        self.echo_id = os.getpid() & 0xFFFF
        self.sent: dict[int, float] = {}
        self.replies: dict[int, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        due = time.monotonic()
        with self.sock:
            while not self.stopping.is_set():
                if time.monotonic() >= due:
                    body = struct.pack(">BBHHH", 8, 0, 0, self.echo_id, seq) + bytes(56)
                    packet = body[:2] + struct.pack(">H", ~internet_checksum(body) & 0xFFFF) + body[4:]
                    self.sent[seq] = time.time()
                    try:
                        self.sock.sendto(packet, (self.dst, 0))
                    except OSError:
                        pass               # unreachable for now: counted as lost
                    seq += 1
                    due += INTERVAL
                ready, _, _ = select.select([self.sock], [], [], max(0.0, due - time.monotonic()))
                if ready:
                    data = self.sock.recv(2048)
                    kind, _, _, echo_id, rseq = struct.unpack(">BBHHH", data[(data[0] & 0xF) * 4:][:8])
                    if kind == 0 and echo_id == self.echo_id and rseq in self.sent:
                        self.replies.setdefault(rseq, time.time())

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(10)
        else:
            self.sock.close()         # never started (run() closes it otherwise)


@dataclass(frozen=True)
class Frame:
    port: str          # "src" or "dst": whose TAP it came in through
    time: float        # the kernel's receive time (time.time() scale)
    data: bytes        # the first 64 bytes

    @property
    def ethertype(self) -> int:
        return int.from_bytes(self.data[12:14], "big")

    def gratuitous_arp(self) -> bool:
        """An ARP from the guest about itself (sender and target address both the guest's)."""
        return self.ethertype == ETH_P_ARP and self.data[28:32] == self.data[38:42] == ipaddress.IPv4Address(GUEST).packed

    def rarp(self) -> bool:
        """A RARP "request reverse" broadcast for the guest's MAC (RFC 903)."""
        return (self.ethertype == ETH_P_RARP and self.data[:6] == b"\xff" * 6
                and self.data[20:22] == b"\x00\x03" and self.data[22:28] == self.data[32:38] == MAC_BYTES)

    def echo_request_to_host(self) -> bool:
        return (self.ethertype == ETH_P_IP and self.data[23] == 1
                and self.data[30:34] == ipaddress.IPv4Address(HOST).packed and self.data[34] == 8)


class Capture(threading.Thread):
    """Frames from the guest's MAC that the daemons write into their TAPs (that is, that
    enter the bridge through those ports), with the kernel's receive time."""

    def __init__(self, ns: str, ports: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.frames: list[Frame] = []
        self.socks: dict[socket.socket, str] = {}
        for label, ifname in ports.items():
            s = packet_socket(ns, ifname)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.socks[s] = label
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select(list(self.socks), [], [], 0.1)
            for s in ready:
                data, ancillary, _, addr = s.recvmsg(65536, socket.CMSG_SPACE(16))
                if addr[2] == PACKET_OUTGOING or data[6:12] != MAC_BYTES:
                    continue       # the bridge's frames towards the daemon, or not the guest's
                stamp = time.time()
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        stamp = sec + nsec / 1e9
                self.frames.append(Frame(self.socks[s], stamp, bytes(data[:64])))

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(10)
        for s in self.socks:
            s.close()

    def on(self, port: str) -> list[Frame]:
        return [f for f in self.frames if f.port == port]


async def info(ctl: Path) -> dict[str, Any]:
    return await control_request(str(ctl), {"command": "info"})


def frames(d: dict[str, Any]) -> dict[str, int]:
    return {q["kind"]: q["frames"] for q in d["queues"]}


def fdb_ports(ns: str) -> tuple[set[str], dict[str, int]]:
    """The bridge ports (by name) whose FDB entries hold the guest's MAC, and every link's index."""
    def body() -> tuple[set[str], dict[str, int]]:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            links = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
            names = {v: k for k, v in links.items()}
            return {names.get(m["ifindex"], str(m["ifindex"])) for m in ipr.fdb("dump", lladdr=MAC)}, links
    return run_in_netns(ns, body)


def guest_pings(out: str) -> tuple[int, set[int]]:
    """busybox ping's output: packets transmitted, and the sequence numbers answered."""
    m = re.search(r"(\d+) packets transmitted", out)
    assert m is not None, out
    return int(m.group(1)), {int(s) for s in re.findall(r"bytes from [\d.]+: seq=(\d+)", out)}


@pytest.mark.parametrize("announce", ["guest-announce", "send-rarp"])
async def test_migrate_guest_on_vdev_net_while_pinging(guest_image: GuestImage, vdev_daemon, bridged_netns: str,
                                                      short_dir: Path, announce: str) -> None:
    ns = bridged_netns
    guest_announce = announce == "guest-announce"
    # TAPs are made in our namespace and moved: their names must be unique here too.
    taps = {"src": "vs" + ns[-6:], "dst": "vd" + ns[-6:]}
    socks = {k: short_dir / f"{k}.sock" for k in taps}
    ctls = {k: short_dir / f"{k}.ctl" for k in taps}
    daemons = {k: vdev_daemon("net", "--socket", str(socks[k]), "--tap", taps[k], "--tap-netns", ns,
                              "--bridge", BRIDGE, "--control", str(ctls[k]), wait_for=socks[k])
               for k in taps}
    src = GuestVM(guest_image, SCRIPT, workdir=short_dir, name="src", qemu_args=nic(socks["src"], guest_announce))
    dst = src.incoming_twin("dst", qemu_args=nic(socks["dst"], guest_announce))
    capture = Capture(ns, taps)
    pinger = Pinger(ns, GUEST)
    try:
        await src.start()
        await dst.start()
        await src.wait_output(r"\nready\r?\n", timeout=240)
        capture.start()
        pinger.start()
        await asyncio.sleep(BEFORE)
        replies_before = len(pinger.replies)
        migration = await src.migrate(dst, max_bandwidth=1 << 30, timeout=120)
        moved = time.time()
        src_at_move, dst_at_move = await info(ctls["src"]), await info(ctls["dst"])
        assert (await dst.execute("query-status"))["status"] == "running"
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        await asyncio.sleep(AFTER)
        stopped = time.time()
        pinger.stop()
        src_end, dst_end = await info(ctls["src"]), await info(ctls["dst"])
        await dst.send_console("stop\n")
        result = await dst.wait_result(src, timeout=120)
    finally:
        pinger.stop()
        capture.stop()
        await src.close()
        await dst.close()
    out = result.output
    assert migration["status"] == "completed", migration
    assert result.exit_status == 0, result.console

    # What the guest negotiated: CTRL_VQ always (QEMU's), GUEST_ANNOUNCE when QEMU let it.
    features = re.search(r"features=([01]+)", out)
    assert features is not None, out
    assert features.group(1)[CTRL_VQ] == "1", features.group(1)
    assert features.group(1)[GUEST_ANNOUNCE] == ("1" if guest_announce else "0"), features.group(1)
    assert ("GUEST_ANNOUNCE" in dst_end["features"]) == guest_announce, dst_end

    # Guest → host: answered to the end, a few lost at most.
    transmitted, answered = guest_pings(out)
    assert transmitted >= 40, out
    tail = set(range(transmitted - TAIL - 2, transmitted - 2))    # the last one or two may be in flight
    assert tail <= answered, (sorted(tail - answered), out)
    assert transmitted - len(answered) <= MAX_LOST, out
    src_frames, dst_frames = capture.on("src"), capture.on("dst")
    assert any(f.echo_request_to_host() for f in src_frames), "the guest's pings never left through the source"
    assert any(f.echo_request_to_host() for f in dst_frames), "the guest's pings never left through the destination"

    # Host → guest: answered before the move, after it, and to the end.
    assert replies_before > 0, "no reply from the guest before the move"
    assert any(t > moved for t in pinger.replies.values()), "no reply from the guest after the move"
    settled = [seq for seq, t in pinger.sent.items() if t < stopped - 0.5]
    lost = sorted(set(settled) - set(pinger.replies))
    assert set(settled[-TAIL:]) <= set(pinger.replies), (lost, len(settled))
    assert len(lost) <= MAX_LOST, lost

    # The guest's frames came in through the source's port, then only through the destination's.
    assert src_frames and dst_frames, capture.frames
    assert max(f.time for f in src_frames) < min(f.time for f in dst_frames), capture.frames

    # The announcement: through the destination's port, the way this case says.
    garps = [f for f in dst_frames if f.gratuitous_arp()]
    rarps = [f for f in dst_frames if f.rarp()]
    assert not any(f.gratuitous_arp() or f.rarp() for f in src_frames), src_frames
    if guest_announce:
        # QEMU did not ask for SEND_RARP; the guest announced itself.
        assert garps and not rarps, dst_frames
        assert dst_end["rarps_sent"] == 0, dst_end
    else:
        # QEMU asked the daemon (SEND_RARP) before starting the rings: the RARP
        # is the first frame from the guest's MAC through the destination's port.
        assert rarps and not garps, dst_frames
        assert dst_end["rarps_sent"] >= 1 and dst_end["rarps_sent"] == len(rarps), (dst_end, rarps)
        assert dst_frames[0].rarp(), dst_frames[0]
    ports, _ = await asyncio.to_thread(fdb_ports, ns)
    assert ports == {taps["dst"]}, ports

    # The source daemon's rings stopped at the move; the destination's carried on.
    assert frames(src_at_move)["rx"] > 0 and frames(src_at_move)["tx"] > 0, src_at_move
    assert frames(src_end) == frames(src_at_move), (src_at_move, src_end)
    assert src_end["rarps_sent"] == 0, src_end
    assert frames(dst_end)["rx"] > frames(dst_at_move)["rx"], (dst_at_move, dst_end)
    assert frames(dst_end)["tx"] > frames(dst_at_move)["tx"], (dst_at_move, dst_end)
    assert all(q["dropped"] == 0 for q in dst_end["queues"] if q["kind"] == "tx"), dst_end
    assert "dirty logging on" in daemons["src"].log(), daemons["src"].log()
    for name, daemon in daemons.items():
        assert "Traceback" not in daemon.log(), (name, daemon.log())
