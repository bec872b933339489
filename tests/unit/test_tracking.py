"""Dirty logging and in-flight tracking through the real protocol stack, on both blk data paths."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage
from vdev.testing import Buffer, device_pair
from vdev.tracking import InflightArea, inflight_queue_size
from vhost_user.messages import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG, ProtocolFeature, VringAddr

SECTOR = 512
LOG_PAGE = 4096


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


@pytest.mark.parametrize("dataplane", ["python", "native"])
async def test_dirty_log_marks_what_the_device_wrote_and_the_used_ring(dataplane: str) -> None:
    device = BlkDevice(MemoryStorage(1 << 20), dataplane=dataplane)
    async with device_pair(device) as vm:
        assert vm.protocol & ProtocolFeature.LOG_SHMFD
        # Migration starts: a log for 16 MiB of guest memory, LOG_ALL, ring logging.
        size = (16 << 20) // LOG_PAGE // 8
        fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        log = mmap.mmap(fd, size)
        try:
            await vm.fe.set_log_base(fd, size)
            await vm.fe.set_features(vm.features | VHOST_F_LOG_ALL)
            q = vm.queues[0]
            log_gpa = 0x800000                       # log_guest_addr: anywhere inside the log
            await vm.fe.set_vring_addr(VringAddr(0, VHOST_VRING_F_LOG, vm.mem.guest_to_frontend(q.desc),
                                                 vm.mem.guest_to_frontend(q.used),
                                                 vm.mem.guest_to_frontend(q.avail), log_gpa))

            def dirty(gpa: int) -> bool:
                page = gpa // LOG_PAGE
                return bool(log[page // 8] & (1 << (page % 8)))

            used = await vm.request(0, [header(0, 8), Buffer.writable(4096), Buffer.writable(1)])
            assert used.written[-1] == 0
            head_bufs = [b for b in vm.last_buffers if b[2]]        # (gpa, len, writable)
            assert head_bufs and all(dirty(gpa) for gpa, _n, _w in head_bufs)
            assert dirty(log_gpa) and dirty(log_gpa + 4)            # used.idx and an element
            # Logging off: nothing more is marked.
            log[:] = bytes(size)
            await vm.fe.set_features(vm.features & ~VHOST_F_LOG_ALL)
            await vm.request(0, [header(0, 16), Buffer.writable(512), Buffer.writable(1)])
            assert log[:] == bytes(size)
        finally:
            log.close()
            os.close(fd)


@pytest.mark.parametrize("dataplane", ["python", "native"])
async def test_inflight_area_is_created_and_tracks_requests(dataplane: str) -> None:
    device = BlkDevice(MemoryStorage(1 << 20), dataplane=dataplane)
    async with device_pair(device, enable=False) as vm:
        assert vm.protocol & ProtocolFeature.INFLIGHT_SHMFD
        fd, desc = await vm.fe.get_inflight_fd(1, 128)
        assert desc.mmap_size == inflight_queue_size(128) and (desc.num_queues, desc.queue_size) == (1, 128)
        area = InflightArea(os.dup(fd), desc.mmap_size, 0, 1, 128)
        try:
            # The VMM hands it back before the rings start (it did already here:
            # the rings were set up, so restart ring 0 to have it tracked).
            await vm.fe.set_inflight_fd(fd, desc)
            base = await vm.fe.get_vring_base(0)
            await vm.restart_ring(0, base)
            region = area.region(0)
            assert region is not None
            assert region.version == 1 and region.desc_num == 128
            for i in range(5):
                used = await vm.request(0, [header(1, 8 * i), Buffer.readable(b"x" * SECTOR),
                                            Buffer.writable(1)])
                assert used.written == b"\0"
            assert region.marked() == []                            # all answered
            assert region.used_idx == vm.queues[0].used_idx == 5
            assert max(region.counter(h) for h in range(128)) == 4  # five taken, counted in order
        finally:
            area.close()
            os.close(fd)
