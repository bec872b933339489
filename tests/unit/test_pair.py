"""The whole stack in-process: RngDevice served on a socket, VirtioFrontend as the VMM."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from backends.rng import MAX_FILL, RngDevice
from vdev.testing import Buffer, VirtioFrontend, device_pair
from vdev.uapi.virtio import VIRTQ_DESC_F_WRITE, VirtioFeature
from vhost_user.errors import ProtocolError
from vhost_user.frontend import Frontend
from vhost_user.messages import HEADER, MemoryRegion, ProtocolFeature
from vhost_user.server import VhostUserServer

POISON = 0xAA   # DriverQueue fills writable buffers with it before posting


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


def server_of(device: RngDevice) -> VhostUserServer:
    assert device.runtime is not None
    server = device.runtime.server
    assert isinstance(server, VhostUserServer)
    return server


def socket_path(vm: VirtioFrontend) -> str:
    return vm.fe.sock.getpeername()


async def test_request_returns_random_bytes_of_the_asked_length() -> None:
    device = RngDevice()
    async with device_pair(device) as vm:
        a = await vm.request(0, [Buffer.writable(64)])
        b = await vm.request(0, [Buffer.writable(7)])
        assert (a.length, len(a.written)) == (64, 64)
        assert (b.length, len(b.written)) == (7, 7)
        assert a.written != bytes([POISON]) * 64 and a.written != bytes(64)
        assert len(set(a.written)) > 16                   # random, not a pattern
        c = await vm.request(0, [Buffer.writable(64)])
        assert c.written != a.written
        assert device.bytes_served == 64 + 7 + 64
        assert vm.interrupts[0] >= 1


async def test_one_request_is_capped_at_max_fill() -> None:
    async with device_pair(RngDevice()) as vm:
        used = await vm.request(0, [Buffer.writable(MAX_FILL + 100)])
        assert used.length == MAX_FILL
        assert used.written[MAX_FILL:] == bytes([POISON]) * 100


async def test_indirect_chain() -> None:
    async with device_pair(RngDevice()) as vm:
        used = await vm.request(0, [Buffer.writable(16), Buffer.writable(48)], indirect=True)
        assert (used.length, len(used.written)) == (64, 64)
        assert used.written[16:].count(POISON) < 16          # the second buffer was written too


async def test_many_requests_wrap_the_ring() -> None:
    device = RngDevice()
    async with device_pair(device) as vm:                 # ring of 128
        for i in range(1000):
            used = await vm.request(0, [Buffer.writable(1 + i % 32)])
            assert used.length == 1 + i % 32
        # and in bursts bigger than half the ring, kicked once
        for _ in range(5):
            heads = [vm.post(0, [Buffer.writable(8)], kick=False) for _ in range(100)]
            vm.kick(0)
            got = await vm.wait_used(0, 100)
            assert sorted(u.head for u in got) == sorted(heads)
            assert all(u.length == 8 for u in got)
        q = vm.queues[0]
        assert q.avail_idx == q.used_idx == 1500
        assert device.bytes_served == sum(1 + i % 32 for i in range(1000)) + 500 * 8
        assert await vm.stop() == [1500]


async def test_malformed_chain_comes_back_empty_and_the_next_request_works() -> None:
    async with device_pair(RngDevice()) as vm:
        q = vm.queues[0]
        bad = q.free_desc.pop()
        q.write_desc(bad, 1 << 40, 64, VIRTQ_DESC_F_WRITE)      # far outside guest memory
        q.publish(bad)
        vm.kick(0)
        (used,) = await vm.wait_used(0, 1)
        assert (used.head, used.length) == (bad, 0)
        q.free_desc.append(bad)
        good = await vm.request(0, [Buffer.writable(32)])
        assert good.length == 32


async def test_stop_returns_the_avail_index_and_the_ring_stays_quiet() -> None:
    async with device_pair(RngDevice()) as vm:
        for _ in range(3):
            await vm.request(0, [Buffer.writable(4)])
        assert await vm.stop() == [3]
        vm.post(0, [Buffer.writable(4)])
        with pytest.raises(TimeoutError):
            await vm.wait_used(0, 1, timeout=0.1)
        assert vm.queues[0].used_idx == 3


async def test_second_concurrent_frontend_is_refused() -> None:
    async with device_pair(RngDevice()) as vm:
        intruder = await Frontend.connect(socket_path(vm))
        try:
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                await intruder.get_features()
        finally:
            await intruder.close()
        used = await vm.request(0, [Buffer.writable(16)])
        assert used.length == 16


async def test_reconnect_after_disconnect_resets_the_device() -> None:
    device = RngDevice()
    async with device_pair(device) as vm:
        path = socket_path(vm)
        server = server_of(device)
        await vm.request(0, [Buffer.writable(16)])
        await vm.close()
        await until(lambda: server.connections_served == 1)
        runtime = device.runtime
        assert runtime is not None
        assert runtime.queues == {} and runtime.mem.total_size == 0 and device.acked_features == 0
        vm2 = await VirtioFrontend.start(path)
        try:
            assert server.connection is not None
            used = await vm2.request(0, [Buffer.writable(24)])
            assert used.length == 24
            assert vm2.queues[0].used_idx == 1                  # a fresh ring, from 0
        finally:
            await vm2.close()


async def test_malformed_bytes_drop_the_connection_not_the_server() -> None:
    device = RngDevice()
    async with device_pair(device) as vm:
        path = socket_path(vm)
        server = server_of(device)
        await vm.close()
        await until(lambda: server.connections_served == 1)
        raw = await Frontend.connect(path)
        try:
            await raw.send_raw(HEADER.pack(1, 0x2, 0))           # version 2
            with pytest.raises(ConnectionResetError):
                await raw.read_reply(1, timeout=5)
        finally:
            await raw.close()
        await until(lambda: server.connections_served == 2)
        vm2 = await VirtioFrontend.start(path)
        try:
            assert (await vm2.request(0, [Buffer.writable(8)])).length == 8
        finally:
            await vm2.close()


async def test_mem_table_with_a_too_small_fd_fails_and_the_device_goes_on() -> None:
    async with device_pair(RngDevice()) as vm:
        fd = os.memfd_create("too-small", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 4096)
            with pytest.raises(ProtocolError) as ei:
                await vm.fe.set_mem_table([MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0)], [fd])
            assert ei.value.value == 1                           # REPLY_ACK failure
        finally:
            os.close(fd)
        assert (await vm.request(0, [Buffer.writable(8)])).length == 8


@pytest.mark.parametrize("options", [
    {"protocol": ProtocolFeature.MQ | ProtocolFeature.CONFIGURE_MEM_SLOTS},   # no REPLY_ACK: no waits
    {"features": int(VirtioFeature.VERSION_1)},                                # no bit 30, no event idx
    {"features": int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC), "queue_size": 16},
], ids=["no-reply-ack", "no-bit-30", "no-event-idx"])
async def test_other_negotiations(options: dict) -> None:
    async with device_pair(RngDevice(), **options) as vm:
        for _ in range(40):
            assert (await vm.request(0, [Buffer.writable(8)], timeout=5)).length == 8
        assert await vm.stop() == [40]


async def test_no_fd_is_left_behind() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    device = RngDevice()
    async with device_pair(device) as vm:
        path = socket_path(vm)
        await vm.request(0, [Buffer.writable(8)])
        await vm.close()
        await until(lambda: server_of(device).connections_served == 1)
        vm2 = await VirtioFrontend.start(path)
        await vm2.request(0, [Buffer.writable(8)])
        await vm2.close()
    assert open_fds() == before


class BuggyConfigRng(RngDevice):
    """An rng with a config space whose write handler has a bug."""

    @property
    def has_config(self) -> bool:
        return True

    def config(self) -> bytes:
        return bytes(8)

    def write_config(self, offset: int, data: bytes) -> None:
        raise KeyError("a device bug")


async def test_a_device_bug_in_a_hook_does_not_stop_the_server() -> None:
    device = BuggyConfigRng()
    async with device_pair(device) as vm:
        with pytest.raises(ProtocolError) as ei:
            await vm.fe.set_config(0, b"\x01")
        assert ei.value.value == 1
        assert await vm.fe.get_config(0, 8) == bytes(8)
        assert (await vm.request(0, [Buffer.writable(8)])).length == 8
        assert server_of(device)._listener is not None


async def test_ring_resumes_from_its_base_across_the_16_bit_wrap() -> None:
    async with device_pair(RngDevice(), queue_size=8) as vm:
        q = vm.queues[0]
        await vm.request(0, [Buffer.writable(4)])
        assert await vm.stop() == [1]
        # Pretend the ring had already carried 65532 requests, then restart it there.
        start = 65532
        q.set_avail_idx(start)
        q.last_used = start
        vm.mem.write(q.used + 2, start.to_bytes(2, "little"))
        q.set_used_event(start)
        await vm.fe.set_vring_base(0, start)
        await vm.fe.set_vring_kick(0, vm.kicks[0])      # the back end dropped its copies at stop
        await vm.fe.set_vring_call(0, vm.calls[0])
        await vm.fe.set_vring_enable(0, True)
        for i in range(20):
            used = await vm.request(0, [Buffer.writable(1 + i)])
            assert used.length == 1 + i
        assert q.avail_idx == q.used_idx == (start + 20) & 0xFFFF == 16
        assert await vm.stop() == [16]
