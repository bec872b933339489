"""vdev net on a real TAP, each test in a throwaway network namespace.

The device creates its TAP through pyroute2 and moves it into the test's
namespace with an address; the test's side of the wire is an AF_PACKET
socket on that TAP inside the namespace (it sees what the guest sent, and
what it sends goes to the guest).  The driver is `vdev.testing`'s
VirtioFrontend.  Needs root (CAP_NET_ADMIN) and /dev/net/tun; skipped
without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from backends.net.device import NetDevice, TapLink
from backends.net.tap import Tap, TapError, TapSpec, parse_address, run_in_netns
from backends.net.testing import (
    GSO_TCPV4,
    HDR_F_NEEDS_CSUM,
    NetHdr,
    can_use_tap,
    eth_frame,
    packet_socket,
    tcp_frame,
    throwaway_netns,
    udp_frame,
)
from vdev.testing import Buffer, Used, VirtioFrontend, device_pair

pytestmark = pytest.mark.skipif(not can_use_tap(), reason="needs root and /dev/net/tun")

F_MRG_RXBUF = 1 << 15
F_GUEST_TSO4 = 1 << 7
ALL = (1 << 64) - 1
RX, TX = 0, 1
GUEST_MAC = bytes.fromhex("525400123456")
MARK = 0x88B5            # IEEE local experimental ethertype: our frames, not the host's chatter


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway namespace whose interfaces start without IPv6 (no router
    solicitations or MLD reports mixed into the frames under test)."""
    with throwaway_netns() as ns:
        def quiet() -> None:
            for conf in ("all", "default"):
                _sysctl(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "1")
        run_in_netns(ns, quiet)
        yield ns


def ifname(ns: str) -> str:
    return "vt" + ns[-8:]


@contextlib.asynccontextmanager
async def tap_device(ns: str, *, features: int | None = None, queues: int = 1,
                     **kw: object) -> AsyncIterator[tuple[NetDevice, VirtioFrontend, str]]:
    name = ifname(ns)
    tap = await asyncio.to_thread(Tap.open, TapSpec(name, netns=ns, address=parse_address("10.99.0.1/24"),
                                                    queues=queues))
    dev = NetDevice(TapLink(tap), mac=GUEST_MAC, queues=queues, **kw)  # type: ignore[arg-type]
    try:
        async with device_pair(dev, features=features) as vm:
            yield dev, vm, name
    finally:
        await dev.aclose()


def marked(payload: bytes, dst: bytes = b"\xff" * 6, src: bytes = GUEST_MAC) -> bytes:
    return eth_frame(dst, src, MARK, payload)


async def recv_frame(sock: socket.socket, want: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    """The first frame on ``sock`` that ``want`` accepts."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    async with asyncio.timeout(timeout):
        while True:
            data = await loop.sock_recv(sock, 1 << 17)
            if want(data):
                return data


async def rx_frames(vm: VirtioFrontend, want: Callable[[NetHdr, bytes], bool], *, pair: int = 0,
                    mrg: bool = True, timeout: float = 10.0) -> tuple[NetHdr, bytes, list[Used]]:
    """Reap the receive ring until a frame ``want`` accepts arrives (others are skipped)."""
    pending: list[Used] = []
    async with asyncio.timeout(timeout):
        while True:
            pending.extend(await vm.wait_used(2 * pair + RX, 1, timeout))
            while pending:
                hdr = NetHdr.unpack(pending[0].written)
                n = hdr.num_buffers if mrg else 1
                if len(pending) < n:
                    break
                used, pending = pending[:n], pending[n:]
                data = b"".join(u.written[:u.length] for u in used)[12:]
                if want(hdr, data):
                    return hdr, data, used


async def test_transmitted_frame_comes_out_of_the_tap(netns: str) -> None:
    async with tap_device(netns) as (dev, vm, name):
        sock = packet_socket(netns, name, proto=MARK)
        frame = marked(b"from the guest" * 10)
        vm.post(TX, [Buffer.readable(bytes(12) + frame)])
        got = await recv_frame(sock, lambda d: d == frame)
        assert got == frame
        await vm.wait_used(TX, 1)
        q = dev.queue_stats()[TX]
        assert q["frames"] == 1 and q["dropped"] == 0
        sock.close()


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
async def test_frame_written_into_the_tap_lands_in_rx_buffers(netns: str, mrg: bool) -> None:
    async with tap_device(netns, features=ALL if mrg else ALL & ~F_MRG_RXBUF) as (dev, vm, name):
        for _ in range(24):
            vm.post(RX, [Buffer.writable(512)] if mrg else [Buffer.writable(1024), Buffer.writable(1024)])
        sock = packet_socket(netns, name, proto=MARK)
        frame = marked(bytes(range(200)) * 7, dst=GUEST_MAC, src=b"\x02" * 6)     # 1414 bytes
        sock.send(frame)
        hdr, data, used = await rx_frames(vm, lambda h, d: d[12:14] == b"\x88\xb5", mrg=mrg)
        assert data == frame
        assert hdr.num_buffers == (3 if mrg else 1) == len(used)
        assert dev.queue_stats()[RX]["frames"] >= 1
        sock.close()


async def test_gso_frames_round_trip_through_the_tap(netns: str) -> None:
    """A 60 KB TSO frame from the guest reaches the host stack as one GSO frame,
    and one the host sends reaches the guest whole, its header intact (the TAP
    was told with TUNSETOFFLOAD that the guest takes TSO4)."""
    async with tap_device(netns) as (_dev, vm, name):
        assert vm.features & F_GUEST_TSO4
        cap = packet_socket(netns, name, vnet_hdr=True, proto=0x0800)
        host_mac = b"\x02" * 6
        frame, hdr = tcp_frame(GUEST_MAC, host_mac, "10.99.0.2", "10.99.0.1", 40000, 9, bytes(60000),
                               gso_size=1448)
        vm.post(TX, [Buffer.readable(hdr.pack()), Buffer.readable(frame)])
        got = await recv_frame(cap, lambda d: len(d) > 1000 and d[10 + 34:10 + 36] == b"\x9c\x40")
        vhdr = NetHdr.unpack(got[:10])
        assert (vhdr.gso_type, vhdr.gso_size) == (GSO_TCPV4, 1448)
        assert got[10:] == frame

        for _ in range(40):
            vm.post(RX, [Buffer.writable(4096)])
        back, bhdr = tcp_frame(host_mac, GUEST_MAC, "10.99.0.1", "10.99.0.2", 9, 40001, bytes(range(250)) * 240,
                               gso_size=1448)
        cap.send(bhdr.pack(10) + back)
        rhdr, data, used = await rx_frames(vm, lambda h, d: d[34:36] == b"\x00\x09" and d[36:38] == b"\x9c\x41")
        assert data == back
        assert (rhdr.gso_type, rhdr.gso_size, rhdr.flags & HDR_F_NEEDS_CSUM) == (GSO_TCPV4, 1448,
                                                                                HDR_F_NEEDS_CSUM)
        assert rhdr.num_buffers == len(used) == -(-(12 + len(back)) // 4096)
        cap.close()


async def test_no_rx_buffer_frame_waits_in_the_tap_and_is_not_lost(netns: str) -> None:
    async with tap_device(netns, no_buffer_wait_ms=600_000) as (dev, vm, name):
        sock = packet_socket(netns, name, proto=MARK)
        frame = marked(b"patience", dst=GUEST_MAC, src=b"\x02" * 6)
        sock.send(frame)
        async with asyncio.timeout(10):
            while dev.queue_stats()[RX]["no_buffer"] < 1:
                await asyncio.sleep(0.01)
        assert vm.queues[RX].used_idx == 0
        vm.post(RX, [Buffer.writable(2048)])
        _, data, _ = await rx_frames(vm, lambda h, d: True)
        assert data == frame
        q = dev.queue_stats()[RX]
        assert (q["no_buffer"], q["no_buffer_drops"], q["frames"]) == (1, 0, 1)
        sock.close()


async def test_link_down_and_a_vanished_tap_are_counted_not_fatal(netns: str) -> None:
    """The TAP set down: STATUS says link down and writes are counted as link
    errors; the TAP deleted: still counted, the device keeps serving."""
    from pyroute2 import NetNS

    async with tap_device(netns) as (dev, vm, name):
        await dev.start()
        assert (await vm.fe.get_config(6, 2)) == b"\x01\x00"

        def set_down() -> None:
            with NetNS(netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="down")
        run_in_netns(None, set_down)
        async with asyncio.timeout(10):
            while (await vm.fe.get_config(6, 2)) != b"\x00\x00":
                await asyncio.sleep(0.1)
        vm.post(TX, [Buffer.readable(bytes(12) + marked(b"into a down link"))])
        await vm.wait_used(TX, 1)
        q = dev.queue_stats()[TX]
        assert q["link_errors"] == 1 and q["last_errno"] == 5       # EIO

        def delete() -> None:
            with NetNS(netns) as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
        # Deleting a TAP whose fds are open detaches them; the kernel then
        # answers EBADFD.  Our fds hold it, so the device is unregistered.
        run_in_netns(None, delete)
        for i in range(3):
            vm.post(TX, [Buffer.readable(bytes(12) + marked(b"gone %d" % i))])
        await vm.wait_used(TX, 3)
        q = dev.queue_stats()[TX]
        assert q["dropped"] == 4 and q["frames"] == 0
        assert dev.info()["link_up"] is False
        # Still serving: a loopback-free check that the rings answer.
        await vm.fe.get_vring_base(TX)


async def test_two_queue_pairs_each_with_its_tap_queue(netns: str) -> None:
    """--queues 2: a multi-queue TAP, one queue per pair.  Both pairs transmit;
    host flows spread over both receive queues; a disabled pair's TAP queue is
    detached, so every flow then lands on the other."""
    async with tap_device(netns, queues=2) as (dev, vm, name):
        sock = packet_socket(netns, name, proto=0x0800)
        for pair in (0, 1):
            frame, hdr = udp_frame(GUEST_MAC, b"\x02" * 6, "10.99.0.2", "10.99.0.1", 7000 + pair, 9, b"tx")
            vm.post(2 * pair + TX, [Buffer.readable(hdr.pack() + frame)])
            await recv_frame(sock, lambda d, p=pair: d[34:36] == struct.pack(">H", 7000 + p))
        for pair in (0, 1):
            for _ in range(64):
                vm.post(2 * pair + RX, [Buffer.writable(2048)])

        def flood(first_port: int) -> None:
            for port in range(first_port, first_port + 32):
                f, _ = udp_frame(b"\x02" * 6, GUEST_MAC, "10.99.0.1", "10.99.0.2", port, 9, b"rx")
                sock.send(f)

        flood(20000)
        async with asyncio.timeout(10):
            while dev.queue_stats()[0]["frames"] + dev.queue_stats()[2]["frames"] < 32:
                await asyncio.sleep(0.02)
        per_queue = (dev.queue_stats()[0]["frames"], dev.queue_stats()[2]["frames"])
        assert min(per_queue) > 0, per_queue

        await vm.fe.set_vring_enable(2 + RX, False)
        before = dev.queue_stats()[2]["frames"]
        flood(21000)
        async with asyncio.timeout(10):
            while dev.queue_stats()[0]["frames"] < per_queue[0] + 32:
                await asyncio.sleep(0.02)
        assert dev.queue_stats()[2]["frames"] == before
        sock.close()


async def test_existing_tap_in_a_netns_enslaved_to_a_bridge(netns: str) -> None:
    """--tap-existing --tap-netns NS --bridge BR: the TAP is opened where it lives,
    enslaved and brought up; it is still there when the device is gone."""
    from pyroute2 import NetNS

    name = ifname(netns)

    def setup() -> None:
        with NetNS(netns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("add", ifname=name, kind="tuntap", mode="tap",
                     ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": 0, "one_queue": 0, "tun_excl": 0,
                          "persist": 0, "nofilter": 0})
    run_in_netns(netns, setup)
    tap = await asyncio.to_thread(Tap.open, TapSpec(name, existing=True, netns=netns, bridge="br0"))
    assert not tap.created

    def state() -> tuple[int, int, bool]:
        with NetNS(netns) as ipr:
            (link,) = ipr.link("get", index=ipr.link_lookup(ifname=name)[0])
            br = ipr.link_lookup(ifname="br0")[0]
            return link.get("IFLA_MASTER"), br, bool(link["flags"] & 1)
    master, br, up = run_in_netns(None, state)
    assert master == br and up
    tap.close()

    def exists() -> bool:
        with NetNS(netns) as ipr:
            return bool(ipr.link_lookup(ifname=name))
    assert run_in_netns(None, exists)


async def test_refusals_name_what_was_refused(netns: str) -> None:
    name = ifname(netns)
    with pytest.raises(TapError, match="no such interface"):
        await asyncio.to_thread(Tap.open, TapSpec(name, existing=True, netns=netns))
    with pytest.raises(TapError, match="does not exist"):
        await asyncio.to_thread(Tap.open, TapSpec(name, netns="vdev-no-such-netns"))
    with pytest.raises(TapError, match="no such bridge"):
        await asyncio.to_thread(Tap.open, TapSpec(name, netns=netns, bridge="nobr0"))
    tap = await asyncio.to_thread(Tap.open, TapSpec(name))
    try:
        with pytest.raises(TapError, match="exists"):
            await asyncio.to_thread(Tap.open, TapSpec(name))
    finally:
        tap.close()
