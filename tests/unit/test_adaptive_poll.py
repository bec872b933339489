"""`--poll-us` on the native paths: an adaptive window under a ceiling, as QEMU's iothreads poll.

A worker busy-polls its ring (blk: the request queue; net: the transmit
ring) after its last piece of work for a window that starts at 4 µs,
doubles each time the next request came after the window closed but
within the ceiling, and halves each time it came later than the ceiling
(vdev/_native/src/pollwin.h).  These tests drive a native `vdev blk` queue
and a `vdev net` transmit ring with requests spaced by a known gap and read
the window (``poll_ns``) and the batches polling found (``polled``).  Gaps
are chosen far from the ceiling on either side, so the outcome does not
depend on how loaded the machine is.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from backends.blk.device import BlkDevice
from backends.blk.storage import open_storage
from backends.net.device import LoopbackLink, NetDevice
from backends.net.testing import NetHdr, eth_frame
from vdev.testing import Buffer, VirtioFrontend, device_pair


async def read_spaced(vm: VirtioFrontend, count: int, gap: float) -> None:
    for i in range(count):
        used = await vm.request(0, [Buffer.readable(struct.pack("<IIQ", 0, 0, i)), Buffer.writable(512),
                                    Buffer.writable(1)])
        assert used.written[-1] == 0
        await asyncio.sleep(gap)


def queue0(dev: BlkDevice) -> dict[str, Any]:
    stats = dev.info()["queue_stats"]
    assert isinstance(stats, list)
    q: dict[str, Any] = stats[0]
    assert q["native"], q
    return q


async def test_window_grows_to_catch_requests_within_the_ceiling_and_shrinks_past_it() -> None:
    # A 1 s ceiling and requests ~2 ms apart: each request the window missed
    # doubles it (4 µs, 8 µs, ... 4 ms after 11 misses), until polling catches them.
    dev = BlkDevice(await open_storage("mem:1M"), dataplane="native", poll_us=1_000_000)
    async with device_pair(dev) as vm:
        await read_spaced(vm, 40, 0.002)
        grown = queue0(dev)
        assert grown["polled"] > 0, grown
        assert 4_000 <= grown["poll_ns"] <= 1_000_000_000, grown
        # The ceiling lowered to 100 µs and requests 20 ms apart: polling
        # cannot catch them, so the window halves to nothing (at most 6
        # halvings from 100 µs) and nothing more is found by polling.
        # (The window open when the ceiling changes may still catch the next one.)
        for engine in dev._engines().values():
            engine.set_poll(100)
        await read_spaced(vm, 1, 0.02)
        lowered = queue0(dev)
        await read_spaced(vm, 12, 0.02)
        shrunk = queue0(dev)
        assert shrunk["poll_ns"] == 0, shrunk
        assert shrunk["polled"] == lowered["polled"], (lowered, shrunk)


async def test_no_polling_without_poll_us() -> None:
    dev = BlkDevice(await open_storage("mem:1M"), dataplane="native")
    async with device_pair(dev) as vm:
        await read_spaced(vm, 20, 0.002)
        q = queue0(dev)
    assert q["polled"] == 0 and q["poll_ns"] == 0, q
    assert q["wakeups"] >= 20, q      # every request woke the sleeping worker


async def test_net_transmit_window_grows_and_shrinks_the_same_way() -> None:
    rx, tx = 0, 1
    dev = NetDevice(LoopbackLink(), mac=bytes.fromhex("525400aaaaaa"), poll_us=1_000_000)
    try:
        async with device_pair(dev) as vm:
            async def send_spaced(count: int, gap: float) -> None:
                for i in range(count):
                    vm.post(rx, [Buffer.writable(2048)])
                    frame = eth_frame(b"\xff" * 6, bytes.fromhex("525400aaaaaa"), 0x88B5, bytes([i]) * 60)
                    vm.post(tx, [Buffer.readable(NetHdr().pack() + frame)])
                    await vm.wait_used(tx, 1)
                    await vm.wait_used(rx, 1)
                    await asyncio.sleep(gap)

            await send_spaced(40, 0.002)
            grown = dev.queue_stats()[tx]
            assert grown["polled"] > 0, grown
            assert 4_000 <= grown["poll_ns"] <= 1_000_000_000, grown
            for port in dev.ports:
                port.set_poll(100)
            await send_spaced(1, 0.02)
            lowered = dev.queue_stats()[tx]
            await send_spaced(12, 0.02)
            shrunk = dev.queue_stats()[tx]
            assert shrunk["poll_ns"] == 0, shrunk
            assert shrunk["polled"] == lowered["polled"], (lowered, shrunk)
            assert dev.queue_snapshots()[tx].counters["polled"] == shrunk["polled"]   # --metrics' too
    finally:
        await dev.aclose()
