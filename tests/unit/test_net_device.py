"""vdev net through the whole stack, in-process: loopback and in-process cables.

Each test drives a `NetDevice` over a real vhost-user socket with
`vdev.testing.VirtioFrontend` as the driver: frames posted on a transmit
ring (queue 2i+1), buffers posted on a receive ring (queue 2i), used
entries and the bytes written into them read back.  The frame path is the
native one (``vdev/_native/src/net.c``); no TAP or root is needed here
(tests/unit/test_net_tap.py has those).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
from collections.abc import AsyncIterator

import pytest

from backends.net.device import CableLink, LoopbackLink, NetDevice
from backends.net.testing import (
    GSO_TCPV4,
    HDR_F_NEEDS_CSUM,
    NetHdr,
    eth_frame,
    tcp_frame,
    udp_frame,
    verify_l4_checksum,
)
from vdev.testing import Buffer, Used, VirtioFrontend, device_pair
from vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    ProtocolFeature,
    VringAddr,
)

# ---- the wire format, spelled out here rather than imported ------------------------------
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_HOST_TSO4 = 1 << 11
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_VERSION_1 = 1 << 32
ALL = (1 << 64) - 1
RX, TX = 0, 1
MAC_A = bytes.fromhex("525400aaaaaa")
MAC_B = bytes.fromhex("525400bbbbbb")
BCAST = b"\xff" * 6
LOG_PAGE = 4096


def frame_of(payload: bytes, src: bytes = MAC_A, dst: bytes = BCAST) -> bytes:
    return eth_frame(dst, src, 0x88B5, payload)


def send(vm: VirtioFrontend, frame: bytes, hdr: NetHdr | None = None, *, split: int | None = None,
         pair: int = 0) -> int:
    """Post a frame on the transmit ring (header and frame in one buffer, or split at ``split``)."""
    data = (hdr or NetHdr()).pack() + frame
    bufs = [Buffer.readable(data)] if split is None else [Buffer.readable(data[:split]),
                                                          Buffer.readable(data[split:])]
    return vm.post(2 * pair + TX, bufs)


def received(used: list[Used]) -> tuple[NetHdr, bytes]:
    """The header and frame of one frame spread over ``used`` (mergeable buffers in order)."""
    data = b"".join(u.written[:u.length] for u in used)
    return NetHdr.unpack(data), data[12:]


async def stats(dev: NetDevice, index: int) -> dict[str, int]:
    return dev.queue_stats()[index]


async def until(cond, timeout: float = 10.0) -> None:   # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def loopback(**kw: object) -> AsyncIterator[tuple[NetDevice, VirtioFrontend]]:
    features = kw.pop("features", None)
    dev = NetDevice(LoopbackLink(), mac=MAC_A, **kw)  # type: ignore[arg-type]
    try:
        async with device_pair(dev, features=features) as vm:
            yield dev, vm
    finally:
        await dev.aclose()


@pytest.mark.parametrize("mrg", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
async def test_loopback_frame_round_trip(mrg: bool) -> None:
    """A transmitted frame comes back on receive with a valid header; with
    MRG_RXBUF it spreads over small buffers and num_buffers says how many,
    without it one chain (of two descriptors here) takes it and num_buffers is 1."""
    async with loopback(features=ALL if mrg else ALL & ~F_MRG_RXBUF) as (dev, vm):
        assert bool(vm.features & F_MRG_RXBUF) == mrg
        frame = frame_of(bytes(range(256)) * 4)            # 1038 bytes
        if mrg:
            heads = [vm.post(RX, [Buffer.writable(256)]) for _ in range(8)]
        else:
            heads = [vm.post(RX, [Buffer.writable(512), Buffer.writable(1024)])]
        send(vm, frame, split=5)                            # the header split across descriptors
        (tx_used,) = await vm.wait_used(TX, 1)
        assert tx_used.length == 0                          # §5.1.6.2: nothing written to TX
        need = 5 if mrg else 1                              # ceil((12 + 1038) / 256)
        got = await vm.wait_used(RX, need)
        assert [u.head for u in got] == heads[:need]
        hdr, data = received(got)
        assert data == frame
        assert hdr.num_buffers == need
        assert sum(u.length for u in got) == 12 + len(frame)
        q = await stats(dev, RX)
        assert (q["frames"], q["buffers"], q["dropped"]) == (1, need, 0)


async def test_buffers_across_adjacent_regions() -> None:
    """A transmit buffer and a receive buffer may each run from one memory
    region into the next (adjacent regions, as hot-plugged memory gives):
    each is two pieces of host memory, and the frame crosses intact."""
    first, second = 1 << 20, (1 << 20) + (64 << 10)         # the two region boundaries
    dev = NetDevice(LoopbackLink(), mac=MAC_A)
    try:
        async with device_pair(dev, regions=[(0, first), (first, 64 << 10), (second, 64 << 10)]) as vm:
            frame = frame_of(bytes(range(256)) * 4)
            data = NetHdr().pack() + frame
            tx_at, rx_at = first - len(data) // 2, second - 300
            vm.mem.write(rx_at, bytes([0xAA]) * 2048)
            vm.queues[RX].add_chain_at([(rx_at, 2048, True)])
            vm.kick(RX)
            vm.mem.write(tx_at, data)
            vm.queues[TX].add_chain_at([(tx_at, len(data), False)])
            vm.kick(TX)
            (tx_used,) = await vm.wait_used(TX, 1)
            (rx_used,) = await vm.wait_used(RX, 1)
            assert (tx_used.length, rx_used.length) == (0, len(data))
            assert NetHdr.unpack(vm.mem.read(rx_at, 12)).num_buffers == 1
            assert vm.mem.read(rx_at + 12, len(frame) + 1) == frame + b"\xaa"
            assert dev.queue_stats()[RX]["frames"] == 1
    finally:
        await dev.aclose()


async def test_no_rx_buffer_waits_and_is_not_lost() -> None:
    """With no receive buffer a frame waits, counted once, and takes nothing
    from either ring; once a buffer is posted it arrives."""
    async with loopback(no_buffer_wait_ms=600_000) as (dev, vm):
        frame = frame_of(b"waiting" * 20)
        send(vm, frame)
        await until(lambda: dev.queue_stats()[RX]["no_buffer"] == 1)
        await asyncio.sleep(0.2)
        assert vm.queues[TX].used_idx == 0                  # the transmit chain waits in its ring
        assert dev.queue_stats()[TX]["dropped"] == 0
        vm.post(RX, [Buffer.writable(2048)])
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame
        await vm.wait_used(TX, 1)
        q = dev.queue_stats()[RX]
        assert (q["no_buffer"], q["no_buffer_drops"], q["frames"]) == (1, 0, 1)
        # Stopping gives back exact indices: one chain taken from each ring.
        assert await vm.stop() == [1, 1]


async def test_no_rx_buffer_drops_after_the_bound() -> None:
    """Past the wait bound the receiver is treated as gone: frames are dropped
    and counted (the transmit chains come back); with buffers again they flow."""
    async with loopback(no_buffer_wait_ms=50) as (dev, vm):
        for i in range(3):
            send(vm, frame_of(b"lost %d" % i))
        await vm.wait_used(TX, 3)
        q = dev.queue_stats()[RX]
        assert q["no_buffer"] == 1 and q["no_buffer_drops"] == 3
        assert dev.queue_stats()[TX]["dropped"] == 3
        vm.post(RX, [Buffer.writable(2048)])
        frame = frame_of(b"after")
        send(vm, frame)
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame


async def test_frame_too_big_for_a_chain_without_mrg_rxbuf() -> None:
    """Without MRG_RXBUF a frame larger than the receive chain is dropped and
    counted; the chain is left for the next frame, which fits."""
    async with loopback(features=ALL & ~F_MRG_RXBUF) as (dev, vm):
        head = vm.post(RX, [Buffer.writable(300)])
        send(vm, frame_of(b"x" * 1000))
        await vm.wait_used(TX, 1)
        assert dev.queue_stats()[RX]["too_big"] == 1
        small = frame_of(b"fits")
        send(vm, small)
        (rx,) = await vm.wait_used(RX, 1)
        assert rx.head == head and received([rx])[1] == small


@pytest.mark.parametrize("case", ["gso_not_negotiated", "csum_past_the_end", "unknown_gso", "too_short",
                                  "ecn_without_gso"])
async def test_bad_transmit_headers_are_counted(case: str) -> None:
    """Frames the device must refuse are dropped and counted; their chains come back."""
    features = ALL & ~(F_HOST_TSO4 | F_CSUM) if case == "gso_not_negotiated" else ALL
    async with loopback(features=features) as (dev, vm):
        vm.post(RX, [Buffer.writable(4096)])
        frame = frame_of(b"y" * 100)
        hdr = {"gso_not_negotiated": NetHdr(gso_type=GSO_TCPV4, gso_size=1000),
               "csum_past_the_end": NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=100, csum_offset=20),
               "unknown_gso": NetHdr(gso_type=7, gso_size=100),
               "too_short": NetHdr(),
               "ecn_without_gso": NetHdr(gso_type=0x80)}[case]
        if case == "too_short":
            frame = frame[:10]
        send(vm, frame, hdr)
        await vm.wait_used(TX, 1)
        q = dev.queue_stats()[TX]
        cause = "too_short" if case == "too_short" else "bad_header"
        assert q[cause] == 1 and q["dropped"] == 1 and q["frames"] == 0
        assert dev.queue_stats()[RX]["frames"] == 0


async def test_disabled_transmit_ring_discards() -> None:
    """spec "Ring states": started and disabled, TX is processed and discarded."""
    async with loopback() as (dev, vm):
        vm.post(RX, [Buffer.writable(4096)])
        await vm.fe.set_vring_enable(TX, False)
        send(vm, frame_of(b"discard me"))
        await vm.wait_used(TX, 1)
        assert dev.queue_stats()[TX]["disabled_drops"] == 1
        assert dev.queue_stats()[RX]["frames"] == 0
        await vm.fe.set_vring_enable(TX, True)
        frame = frame_of(b"deliver me")
        send(vm, frame)
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame


async def test_malformed_receive_chain_is_returned_and_the_frame_goes_on() -> None:
    """A receive chain with only device-readable buffers is returned with
    length 0 and counted; the frame lands in the next good chain."""
    async with loopback() as (dev, vm):
        bad = vm.post(RX, [Buffer.readable(b"not writable")])
        good = vm.post(RX, [Buffer.writable(2048)])
        frame = frame_of(b"z" * 64)
        send(vm, frame)
        got = await vm.wait_used(RX, 2)
        assert (got[0].head, got[0].length) == (bad, 0)
        assert got[1].head == good and received([got[1]])[1] == frame
        assert dev.queue_stats()[RX]["bad_chains"] == 1


async def test_send_rarp_on_loopback() -> None:
    """SEND_RARP (after a migration) sends a RARP broadcast from the MAC out of the link."""
    async with loopback() as (_dev, vm):
        vm.post(RX, [Buffer.writable(2048)])
        mac = bytes.fromhex("5254000c0ffe")
        await vm.fe.send_rarp(mac)
        (rx,) = await vm.wait_used(RX, 1)
        frame = received([rx])[1]
        assert frame[:6] == BCAST and frame[6:12] == mac and frame[12:14] == b"\x80\x35"
        assert frame[22:28] == mac and len(frame) == 60


async def test_config_space() -> None:
    """mac, status (link up), max_virtqueue_pairs, mtu (§5.1.4)."""
    dev = NetDevice(LoopbackLink(), queues=2, mac=MAC_B, mtu=9000)
    try:
        async with device_pair(dev) as vm:
            cfg = await vm.fe.get_config(0, 12)
            assert struct.unpack("<6sHHH", cfg) == (MAC_B, 1, 2, 9000)
            assert vm.features & F_MAC and vm.features & F_STATUS
            await vm.fe.net_set_mtu(1400)
            assert dev.mtu == 1400
    finally:
        await dev.aclose()


# ---- cables in one process ------------------------------------------------------------------

@contextlib.asynccontextmanager
async def cable(name: str, features_b: int | None = None) -> AsyncIterator[tuple[NetDevice, NetDevice,
                                                                               VirtioFrontend, VirtioFrontend]]:
    a = NetDevice(CableLink(name), mac=MAC_A)
    b = NetDevice(CableLink(name), mac=MAC_B)
    try:
        async with device_pair(a) as vma, device_pair(b, features=features_b) as vmb:
            yield a, b, vma, vmb
    finally:
        await a.aclose()
        await b.aclose()


async def test_cable_carries_frames_both_ways() -> None:
    async with cable("both-ways") as (a, b, vma, vmb):
        assert a.info()["peer"] == "this process" and a.info()["link_up"]
        for vm in (vma, vmb):
            for _ in range(4):
                vm.post(RX, [Buffer.writable(2048)])
        fa = frame_of(b"from a", MAC_A, MAC_B)
        fb = frame_of(b"from b", MAC_B, MAC_A)
        send(vma, fa)
        send(vmb, fb)
        (rb,) = await vmb.wait_used(RX, 1)
        (ra,) = await vma.wait_used(RX, 1)
        assert received([rb])[1] == fa and received([ra])[1] == fb
        assert a.queue_stats()[TX]["frames"] == 1 and b.queue_stats()[RX]["frames"] == 1


async def test_cable_passes_gso_through_to_a_receiver_that_takes_it() -> None:
    """A 60 KB TSO frame crosses intact: header fields as sent, over mergeable buffers."""
    async with cable("gso") as (_a, _b, vma, vmb):
        for _ in range(20):
            vmb.post(RX, [Buffer.writable(4096)])
        frame, hdr = tcp_frame(MAC_A, MAC_B, "10.0.0.1", "10.0.0.2", 5000, 80, bytes(60000),
                               gso_size=1448)
        send(vma, frame, hdr)
        n = -(-(12 + len(frame)) // 4096)
        got = await vmb.wait_used(RX, n)
        rhdr, data = received(got)
        assert data == frame
        assert (rhdr.gso_type, rhdr.gso_size, rhdr.hdr_len, rhdr.csum_start, rhdr.csum_offset,
                rhdr.flags & HDR_F_NEEDS_CSUM) == (GSO_TCPV4, 1448, 54, 34, 16, HDR_F_NEEDS_CSUM)
        assert rhdr.num_buffers == n


async def test_cable_completes_checksums_for_a_receiver_without_guest_csum() -> None:
    """§5.1.6.4: without GUEST_CSUM the receiver gets flags 0, so the device
    completes the partial checksum the sender left; a GSO frame it cannot take
    is dropped and counted."""
    async with cable("csum", features_b=ALL & ~(F_GUEST_CSUM | F_GUEST_TSO4 | (1 << 8) | (1 << 9)
                                               | (1 << 10))) as (_a, b, vma, vmb):
        assert not vmb.features & F_GUEST_CSUM
        for _ in range(4):
            vmb.post(RX, [Buffer.writable(4096)])
        frame, hdr = udp_frame(MAC_A, MAC_B, "10.0.0.1", "10.0.0.2", 4000, 5000, b"check me" * 33,
                               partial=True)
        assert hdr.flags == HDR_F_NEEDS_CSUM and not verify_l4_checksum(frame)
        send(vma, frame, hdr)
        (rx,) = await vmb.wait_used(RX, 1)
        rhdr, data = received([rx])
        assert rhdr.flags == 0 and verify_l4_checksum(data)
        assert data[:40] == frame[:40] and data[42:] == frame[42:]   # only the checksum changed
        big, bhdr = tcp_frame(MAC_A, MAC_B, "10.0.0.1", "10.0.0.2", 1, 2, bytes(9000), gso_size=1448)
        send(vma, big, bhdr)
        await vma.wait_used(TX, 2)
        assert b.queue_stats()[RX]["offload_drops"] == 1


async def test_cable_without_a_peer_drops_and_link_is_down() -> None:
    """One end alone: no link (STATUS down); transmitted frames are dropped and counted."""
    dev = NetDevice(CableLink("lonely"), mac=MAC_A)
    try:
        async with device_pair(dev) as vm:
            cfg = await vm.fe.get_config(6, 2)
            assert cfg == b"\0\0"            # status: link down
            send(vm, frame_of(b"nobody"))
            await vm.wait_used(TX, 1)
            assert dev.queue_stats()[TX]["link_down_drops"] == 1
    finally:
        await dev.aclose()


async def test_third_end_of_a_cable_is_refused() -> None:
    a = NetDevice(CableLink("three"))
    b = NetDevice(CableLink("three"))
    try:
        with pytest.raises(ValueError, match="two ends"):
            NetDevice(CableLink("three"))
    finally:
        await a.aclose()
        await b.aclose()


async def test_stop_while_a_frame_waits_answers_exact_indices() -> None:
    """GET_VRING_BASE while a frame waits for receive buffers: nothing was
    taken from either ring, so both answer 0 and the guest keeps its chains."""
    async with loopback(no_buffer_wait_ms=600_000) as (dev, vm):
        send(vm, frame_of(b"first"))
        await until(lambda: dev.queue_stats()[RX]["no_buffer"] == 1)
        # (No SET_VRING_ENABLE(0) first: a disabled transmit ring discards, by the spec.)
        assert await vm.fe.get_vring_base(TX) == 0
        assert await vm.fe.get_vring_base(RX) == 0
        assert vm.queues[TX].used_idx == 0


def post_like_linux(vm: VirtioFrontend, index: int, buffers: list[list[Buffer]]) -> bool:
    """Post chains and kick only if EVENT_IDX asks for it (vring_need_event, as
    Linux's virtqueue_kick_prepare does); returns whether it kicked."""
    q = vm.queues[index]
    old = q.avail_idx
    for chain in buffers:
        vm.post(index, chain, kick=False)
    event = q.avail_event
    if (q.avail_idx - event - 1) & 0xFFFF < (q.avail_idx - old) & 0xFFFF:
        vm.kick(index)
        return True
    return False


async def test_receiver_with_too_few_buffers_is_woken_by_the_next_ones() -> None:
    """A frame needs more mergeable buffers than the ring holds: it waits, and
    the device must ask to hear of the *next* buffers (avail_event at the
    current avail.idx, not at the chains it gave back), or a driver that
    kicks only when EVENT_IDX asks never wakes it (a stalled host-to-guest
    TCP stream under QEMU before this was fixed)."""
    async with loopback(no_buffer_wait_ms=600_000) as (dev, vm):
        assert vm.queues[RX].event_idx
        post_like_linux(vm, RX, [[Buffer.writable(256)]])
        frame = frame_of(bytes(1000))
        send(vm, frame)
        await until(lambda: dev.queue_stats()[RX]["no_buffer"] == 1)
        assert post_like_linux(vm, RX, [[Buffer.writable(256)] for _ in range(4)])
        got = await vm.wait_used(RX, 5)
        assert received(got)[1] == frame


async def test_repeated_add_mem_reg_from_a_second_queue_pair_is_accepted() -> None:
    """QEMU 7.2 drives a multi-queue vhost-user-net as one vhost device per
    pair on one connection, and each sends ADD_MEM_REG for the same guest
    RAM.  The repeat is acknowledged and counted (a REM_MEM_REG each), the
    table stays whole and frames keep flowing; refusing it made QEMU stop."""
    async with loopback(queues=2) as (_dev, vm):
        region = vm.mem.vhost_regions[0]
        await vm.fe.add_mem_reg(region, vm.mem.fds[0])      # acked 0, or ProtocolError
        vm.post(RX, [Buffer.writable(2048)])
        frame = frame_of(b"after the repeat")
        send(vm, frame)
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame
        await vm.fe.rem_mem_reg(region)                      # takes back the repeat only
        vm.post(RX, [Buffer.writable(2048)])
        send(vm, frame)
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame


@pytest.mark.parametrize("case", ["outside_memory", "looping", "indirect_outside"])
async def test_malformed_transmit_chains_are_returned_and_counted(case: str) -> None:
    """A transmit chain pointing outside guest memory, looping, or with an
    indirect table outside memory goes back to the driver (length 0) and is
    counted; nothing is sent, and the next good frame goes through."""
    async with loopback() as (dev, vm):
        vm.post(RX, [Buffer.writable(2048)])
        q = vm.queues[TX]
        head = q.free_desc.pop()
        if case == "outside_memory":
            q.write_desc(head, 1 << 40, 100)
        elif case == "looping":
            q.write_desc(head, q.alloc.alloc(64), 64, 1, head)          # NEXT to itself
        else:
            q.write_desc(head, 1 << 40, 32, 4)                          # INDIRECT table outside memory
        q.publish(head)
        vm.kick(TX)
        (bad,) = await vm.wait_used(TX, 1)
        assert (bad.head, bad.length) == (head, 0)
        assert dev.queue_stats()[TX]["bad_chains"] == 1
        frame = frame_of(b"still fine")
        send(vm, frame)
        (rx,) = await vm.wait_used(RX, 1)
        assert received([rx])[1] == frame
        assert dev.queue_stats()[RX]["frames"] == 1


async def test_dirty_log_marks_the_receive_buffers_written_and_the_used_ring() -> None:
    """Live migration (LOG_SHMFD + LOG_ALL): the pages of the receive buffers
    a frame was written into, and the used ring's, are marked in the log; the
    buffer the frame did not reach is not; with logging off nothing is."""
    async with loopback() as (_dev, vm):
        assert vm.protocol & ProtocolFeature.LOG_SHMFD
        size = (16 << 20) // LOG_PAGE // 8
        fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        log = mmap.mmap(fd, size)
        try:
            await vm.fe.set_log_base(fd, size)
            await vm.fe.set_features(vm.features | VHOST_F_LOG_ALL)
            q = vm.queues[RX]
            log_gpa = 0x800000
            await vm.fe.set_vring_addr(VringAddr(RX, VHOST_VRING_F_LOG, vm.mem.guest_to_frontend(q.desc),
                                                 vm.mem.guest_to_frontend(q.used),
                                                 vm.mem.guest_to_frontend(q.avail), log_gpa))

            def dirty(gpa: int) -> bool:
                page = gpa // LOG_PAGE
                return bool(log[page // 8] & (1 << (page % 8)))

            # Buffers of two pages: the page holding gpa + 4096 lies wholly
            # inside each, past its first byte.
            posted = []
            for _ in range(3):
                vm.post(RX, [Buffer.writable(2 * LOG_PAGE)])
                posted.append(vm.last_buffers[0][0])
            frame = frame_of(b"m" * (2 * LOG_PAGE - 12 - 14 + 1))   # the first buffer and 1 byte
            send(vm, frame)
            got = await vm.wait_used(RX, 2)
            assert received(got)[1] == frame and got[1].length == 1
            assert [dirty(posted[0]), dirty(posted[0] + LOG_PAGE), dirty(posted[1])] == [True] * 3
            assert [dirty(posted[1] + LOG_PAGE), dirty(posted[2]), dirty(posted[2] + LOG_PAGE)] == [False] * 3
            assert dirty(log_gpa) and dirty(log_gpa + 4)      # used.idx and the elements
            # Logging off: nothing more is marked.
            log[:] = bytes(size)
            await vm.fe.set_features(vm.features & ~VHOST_F_LOG_ALL)
            send(vm, frame_of(b"unlogged"))
            await vm.wait_used(RX, 1)
            assert log[:] == bytes(size)
        finally:
            log.close()
            os.close(fd)


async def test_metrics_and_latency_count_frames_per_ring() -> None:
    """``--metrics`` and the ``latency`` control command read net's rings
    (frames as requests, bytes received as read, sent as written, drops as
    errors), live and after the rings stopped."""
    from prometheus_client import CollectorRegistry, generate_latest

    from backends.net import control_handlers
    from vdev.metrics import DeviceCollector

    def scrape(dev: NetDevice) -> dict[str, float]:
        registry = CollectorRegistry()
        registry.register(DeviceCollector(dev))
        out = {}
        for line in generate_latest(registry).decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    dev = NetDevice(LoopbackLink(), mac=MAC_A, no_buffer_wait_ms=0)
    try:
        async with device_pair(dev) as vm:
            for _ in range(3):
                vm.post(RX, [Buffer.writable(2048)])
            frame = frame_of(b"counted" * 10)
            for _ in range(4):                            # the fourth finds no buffer: dropped
                send(vm, frame)
            await vm.wait_used(RX, 3)
            await vm.wait_used(TX, 4)
            m = scrape(dev)
            assert m['vdev_net_requests_total{queue="0"}'] == 3
            assert m['vdev_net_requests_total{queue="1"}'] == 3
            assert m['vdev_net_read_bytes_total{queue="0"}'] == 3 * len(frame)
            assert m['vdev_net_written_bytes_total{queue="1"}'] == 3 * len(frame)
            assert m['vdev_net_errors_total{queue="0"}'] == 1
            reply = await control_handlers(dev)["latency"]({"command": "latency"})
            assert [q["queue"] for q in reply["queues"]] == [0, 1]
            assert reply["queues"][1]["count"] >= 1       # per batch on the transmit ring
            await vm.stop()
            assert scrape(dev)['vdev_net_requests_total{queue="1"}'] == 3   # retired rings count
    finally:
        await dev.aclose()
