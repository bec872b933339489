"""RegionTable bounds and translation; MemoryMap over real memfds."""

from __future__ import annotations

import gc
import mmap
import os

import pytest

from vdev.errors import GuestError
from vdev.memory import GuestMemory, MappedRegion, MemoryMap, RegionTable
from vdev.testing import FakeGuestMemory
from vhost_user.messages import MemoryRegion

PAGE = mmap.PAGESIZE


# Two adjacent regions, then a hole, then a third:
#   [0x0000, 0x1000) [0x1000, 0x3000)   hole   [0x4000, 0x5000)
@pytest.fixture
def mem() -> FakeGuestMemory:
    return FakeGuestMemory(regions=[(0x1000, 0x2000), (0, 0x1000), (0x4000, 0x1000)])


def test_fake_memory_is_guest_memory(mem: FakeGuestMemory) -> None:
    assert isinstance(mem, GuestMemory)
    assert [r.gpa for r in mem.regions] == [0, 0x1000, 0x4000]      # sorted
    assert mem.total_size == 0x4000


def test_view_at_the_exact_end_of_a_region(mem: FakeGuestMemory) -> None:
    v = mem.view(0x3000 - 16, 16)
    v[:] = b"E" * 16
    assert mem.read(0x2FF0, 16) == b"E" * 16
    assert len(mem.view(0x3000 - 1, 1)) == 1
    with pytest.raises(GuestError) as ei:
        mem.view(0x3000 - 16, 17)
    assert (ei.value.gpa, ei.value.length) == (0x2FF0, 17)


def test_view_one_byte_past_memory(mem: FakeGuestMemory) -> None:
    assert len(mem.view(0x4FFF, 1)) == 1
    with pytest.raises(GuestError) as ei:
        mem.view(0x5000, 1)
    assert (ei.value.gpa, ei.value.length) == (0x5000, 1)
    with pytest.raises(GuestError):
        mem.view(0x4FFF, 2)


def test_view_in_the_hole_and_before_memory() -> None:
    m = FakeGuestMemory(regions=[(0x1000, 0x1000)])
    for gpa in (0, 0xFFF, 0x2000):
        with pytest.raises(GuestError) as ei:
            m.view(gpa, 1)
        assert ei.value.gpa == gpa
    with pytest.raises(GuestError):
        m.view(-1, 1)
    with pytest.raises(GuestError):
        m.view(0x1000, -1)


def test_view_refuses_to_cross_into_an_adjacent_region(mem: FakeGuestMemory) -> None:
    with pytest.raises(GuestError) as ei:
        mem.view(0xFF8, 16)
    assert (ei.value.gpa, ei.value.length) == (0xFF8, 16)


def test_buffers_across_adjacent_regions(mem: FakeGuestMemory) -> None:
    views = mem.buffers(0xFF8, 16)
    assert [len(v) for v in views] == [8, 8]
    mem.write(0xFF8, bytes(range(16)))
    # backing follows the order given: [1] is the region at 0, [0] the one at 0x1000
    assert bytes(mem.backing[1][-8:]) == bytes(range(8))
    assert bytes(mem.backing[0][:8]) == bytes(range(8, 16))
    assert mem.read(0xFF8, 16) == bytes(range(16))
    # three regions would need the hole: refused
    with pytest.raises(GuestError) as ei:
        mem.buffers(0x2FF0, 0x1020)
    assert (ei.value.gpa, ei.value.length) == (0x2FF0, 0x1020)


def test_buffers_across_three_adjacent_regions() -> None:
    m = FakeGuestMemory(regions=[(0, 16), (16, 16), (32, 16)])
    assert [len(v) for v in m.buffers(8, 32)] == [8, 16, 8]
    m.write(0, bytes(range(48)))
    assert m.read(5, 40) == bytes(range(5, 45))


def test_check(mem: FakeGuestMemory) -> None:
    mem.check(0xFF8, 16)
    mem.check(0x4000, 0x1000)
    mem.check(0x3000, 0)                     # an empty range anywhere is fine
    with pytest.raises(GuestError) as ei:
        mem.check(0x2FFF, 2)
    assert (ei.value.gpa, ei.value.length) == (0x2FFF, 2)
    with pytest.raises(GuestError):
        mem.check(0x4000, 0x1001)


def test_write_and_read_outside_memory_fail(mem: FakeGuestMemory) -> None:
    with pytest.raises(GuestError):
        mem.write(0x4FFF, b"ab")
    assert mem.read(0x4FFF, 1) == b"\0"          # the whole range is checked before any byte is written
    with pytest.raises(GuestError):
        mem.read(0x3000, 1)


def test_overlapping_regions_are_refused() -> None:
    with pytest.raises(GuestError) as ei:
        FakeGuestMemory(regions=[(0, 0x2000), (0x1000, 0x1000)])
    assert ei.value.gpa == 0x1000


def _table() -> RegionTable:
    return RegionTable([MappedRegion(0, 0x1000, 0x7F00_0000_0000, memoryview(bytearray(0x1000))),
                        MappedRegion(0x10_0000, 0x2000, 0x7F00_1000_0000, memoryview(bytearray(0x2000)))])


def test_frontend_to_guest() -> None:
    t = _table()
    assert t.frontend_to_guest(0x7F00_0000_0000) == 0
    assert t.frontend_to_guest(0x7F00_0000_0FF0, 16) == 0xFF0
    assert t.frontend_to_guest(0x7F00_1000_1000, 0x1000) == 0x10_1000


@pytest.mark.parametrize("addr,length", [
    (0x7F00_0000_0FF1, 16),           # runs one byte past the region's end
    (0x7F00_0000_1000, 1),            # just after the region
    (0x7EFF_FFFF_FFFF, 1),            # just before it
    (0x10_0000, 1),                   # a guest-physical address is not a front-end address
])
def test_frontend_to_guest_failure(addr: int, length: int) -> None:
    with pytest.raises(GuestError) as ei:
        _table().frontend_to_guest(addr, length)
    assert (ei.value.gpa, ei.value.length) == (addr, length)


# -- MemoryMap over memfds ------------------------------------------------------------------


@pytest.fixture
def memfds():
    made: list[int] = []

    def make(size: int) -> int:
        fd = os.memfd_create("vdev-guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        made.append(fd)
        return fd

    yield make
    for fd in made:
        os.close(fd)


def test_from_fds_shares_memory_between_mappings(memfds) -> None:
    fd = memfds(4 * PAGE)
    region = MemoryRegion(0x10_0000, 2 * PAGE, 0x7F00_0000_0000, PAGE)   # file pages 1-2
    a = MemoryMap.from_fds([(region, fd)])
    b = MemoryMap.from_fds([(region, fd)])
    a.write(0x10_0000 + 5, b"through a")
    assert b.read(0x10_0000 + 5, 9) == b"through a"
    assert os.pread(fd, 9, PAGE + 5) == b"through a"                     # mmap_offset honoured
    os.pwrite(fd, b"from the file", PAGE + 2 * PAGE - 13)
    assert a.read(0x10_0000 + 2 * PAGE - 13, 13) == b"from the file"
    assert a.frontend_to_guest(0x7F00_0000_0000 + 16) == 0x10_0000 + 16
    with pytest.raises(GuestError):
        a.view(0x10_0000 + 2 * PAGE, 1)
    a.release_unused(None)
    b.release_unused(None)


def test_from_fds_several_regions_and_adjacent(memfds) -> None:
    f1, f2 = memfds(PAGE), memfds(PAGE)
    m = MemoryMap.from_fds([(MemoryRegion(PAGE, PAGE, 0x9000_0000, 0), f2),
                            (MemoryRegion(0, PAGE, 0x8000_0000, 0), f1)])
    m.write(PAGE - 4, b"abcdefgh")
    assert os.pread(f1, 4, PAGE - 4) == b"abcd" and os.pread(f2, 4, 0) == b"efgh"
    assert m.total_size == 2 * PAGE
    m.release_unused(None)


def test_from_fds_reuses_unchanged_regions(memfds) -> None:
    f1, f2, f3 = memfds(PAGE), memfds(PAGE), memfds(PAGE)
    r1 = MemoryRegion(0, PAGE, 0x8000_0000, 0)
    r2 = MemoryRegion(PAGE, PAGE, 0x9000_0000, 0)
    r2b = MemoryRegion(PAGE, PAGE, 0xA000_0000, 0)              # same gpa, new front-end address
    old = MemoryMap.from_fds([(r1, f1), (r2, f2)])
    old_view_r1 = old.view(0, 8)
    old_view_r2 = old.regions[1].data
    new = MemoryMap.from_fds([(r1, f1), (r2b, f3)], previous=old)
    assert new.regions[0].data.obj is old.regions[0].data.obj   # the same mapping, not a new one
    old.release_unused(new)
    # r1 still works through the old view and the new map; r2's old mapping is gone
    old_view_r1[:] = b"kept map"
    assert new.read(0, 8) == b"kept map"
    with pytest.raises(ValueError):
        old_view_r2[0]
    new.write(PAGE, b"new")
    assert os.pread(f3, 3, 0) == b"new" and os.pread(f2, 3, 0) == b"\0\0\0"
    new.release_unused(None)


def test_release_unused_leaves_mappings_in_use_alive(memfds) -> None:
    f1 = memfds(PAGE)
    old = MemoryMap.from_fds([(MemoryRegion(0, PAGE, 0x8000_0000, 0), f1)])
    in_flight = old.view(16, 4)                    # a request still holds a view
    old.release_unused(MemoryMap.empty())
    in_flight[:] = b"late"                         # still mapped: no crash, data reaches the file
    assert os.pread(f1, 4, 16) == b"late"
    del in_flight
    gc.collect()


def test_from_fds_region_beyond_the_file_is_an_oserror(memfds) -> None:
    # The handler turns OSError into a failed request; a ValueError escaped and
    # stopped the server (fixed in vdev/memory.py).
    fd = memfds(PAGE)
    with pytest.raises(OSError):
        MemoryMap.from_fds([(MemoryRegion(0, 2 * PAGE, 0x8000_0000, 0), fd)])
    with pytest.raises(OSError):
        MemoryMap.from_fds([(MemoryRegion(0, PAGE, 0x8000_0000, PAGE), fd)])


def test_from_fds_bad_fd_is_an_oserror() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError):
        MemoryMap.from_fds([(MemoryRegion(0, PAGE, 0x8000_0000, 0), r)])


def test_from_fds_overlap_is_a_guest_error(memfds) -> None:
    f1, f2 = memfds(2 * PAGE), memfds(PAGE)
    with pytest.raises(GuestError):
        MemoryMap.from_fds([(MemoryRegion(0, 2 * PAGE, 0x8000_0000, 0), f1),
                            (MemoryRegion(PAGE, PAGE, 0x9000_0000, 0), f2)])


def test_empty_map() -> None:
    m = MemoryMap.empty()
    assert m.total_size == 0
    with pytest.raises(GuestError):
        m.view(0, 1)
