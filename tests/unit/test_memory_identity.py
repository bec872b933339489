"""A new memory fd with the same geometry is a new memory (issue "Defects
found by hostile testing", item 2).

A VMM that unplugs a DIMM and plugs another at the same address sends a
memory table whose region fields are identical but whose fd is a different
file.  The back end must map the new file; keeping the old mapping reads and
writes memory the VMM has let go of.  A mapping is reused only when the fd
is provably the same file (same st_dev and st_ino).
"""

from __future__ import annotations

import mmap
import os
import struct

from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage
from vdev.memory import MemoryMap
from vdev.testing import Buffer, MemfdGuestMemory, device_pair
from vhost_user.messages import MemoryRegion

PAGE = mmap.PAGESIZE


def memfd(size: int, fill: bytes = b"\0") -> int:
    fd = os.memfd_create("vdev-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, fill * size, 0)
    return fd


def test_same_geometry_new_file_is_mapped_anew() -> None:
    old_fd, new_fd = memfd(PAGE, b"o"), memfd(PAGE, b"n")
    try:
        region = MemoryRegion(0x10_0000, PAGE, 0x7F00_0000_0000, 0)
        old = MemoryMap.from_fds([(region, old_fd)])
        new = MemoryMap.from_fds([(region, new_fd)], previous=old)
        old.release_unused(new)
        assert new.read(0x10_0000, 4) == b"nnnn"
        new.write(0x10_0000, b"NEW!")
        assert os.pread(new_fd, 4, 0) == b"NEW!"
        assert os.pread(old_fd, 4, 0) == b"oooo"
        # The same file again (a dup, as a VMM resending its table does): reused.
        dup = os.dup(new_fd)
        try:
            again = MemoryMap.from_fds([(region, dup)], previous=new)
            assert next(iter(again._maps.values())) is next(iter(new._maps.values()))
            new.release_unused(again)
            assert again.read(0x10_0000, 4) == b"NEW!"
            again.release_unused(None)
        finally:
            os.close(dup)
    finally:
        os.close(old_fd)
        os.close(new_fd)


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


async def test_set_mem_table_with_a_new_memfd_switches_memory() -> None:
    storage = MemoryStorage(1 << 20)
    async with device_pair(BlkDevice(storage), memory_size=4 << 20) as vm:
        used = await vm.request(0, [header(1, 0), Buffer.readable(b"a" * 512), Buffer.writable(1)])
        assert used.written == b"\0"
        old = vm.mem
        # The same regions (address, size, user address, offset) in new memfds,
        # holding what the guest had (rings included), as after a DIMM swap.
        new = MemfdGuestMemory(regions=[(r.gpa, r.size) for r in old.regions])
        for o, n in zip(old.regions, new.regions, strict=True):
            n.data[:] = o.data
        assert list(new.vhost_regions) == list(old.vhost_regions)
        await vm.fe.set_mem_table(new.vhost_regions, new.fds)
        for q in vm.queues:
            q.mem = new
        vm.mem = new
        # The VMM has let go of the old memory; whatever is there is stale.
        for r in old.regions:
            r.data[:] = bytes(r.size)
        try:
            used = await vm.request(0, [header(1, 8), Buffer.readable(b"b" * 512), Buffer.writable(1)],
                                    timeout=5)
            assert used.written == b"\0"
            used = await vm.request(0, [header(0, 8), Buffer.writable(512), Buffer.writable(1)], timeout=5)
            assert used.written == b"b" * 512 + b"\0"
            got = bytearray(512)
            await storage.readv(8 * 512, [memoryview(got)])
            assert got == b"b" * 512
        finally:
            old.close()
