"""Malformed chains still get an answer: the status is salvaged when it can be.

A chain whose structure is sound but whose data buffer lies outside guest
memory (or whose order is wrong) is walked to its end; if the last
descriptor is a writable in-bounds buffer, it is the error's ``tail``, and
virtio-blk writes IOERR there instead of returning the head with nothing
written.  Loops and broken structure still give no tail.
"""

from __future__ import annotations

import struct

import pytest

from backends.blk.device import BlkDevice, Status
from backends.blk.storage import MemoryStorage
from backends.blk.storage.testing import FaultyStorage
from vdev.errors import GuestError
from vdev.queue import Queue
from vdev.testing import Buffer, DriverQueue, FakeGuestMemory, device_pair
from vdev.uapi.virtio import VIRTQ_DESC_F_NEXT as NEXT
from vdev.uapi.virtio import VIRTQ_DESC_F_WRITE as WRITE

MEM = 1 << 20
OUTSIDE = 4 << 30   # far beyond guest memory


def setup_queue() -> tuple[FakeGuestMemory, DriverQueue, Queue]:
    mem = FakeGuestMemory(MEM)
    dq = DriverQueue(mem, 16, 0, data_start=0x10000, data_size=0x10000)
    return mem, dq, Queue(16, dq.desc, dq.avail, dq.used)


def test_outside_buffer_keeps_a_sound_writable_tail() -> None:
    mem, dq, q = setup_queue()
    dq.write_desc(0, 0x20000, 16, NEXT, 1)            # header: fine
    dq.write_desc(1, OUTSIDE, 4096, WRITE | NEXT, 2)  # data: outside guest memory
    dq.write_desc(2, 0x20100, 1, WRITE)               # status: fine
    dq.publish(0)
    with pytest.raises(GuestError) as err:
        q.pop(mem)
    assert err.value.head == 0 and err.value.gpa == OUTSIDE
    assert err.value.tail is not None and (err.value.tail.addr, err.value.tail.len) == (0x20100, 1)


@pytest.mark.parametrize("last", [
    (OUTSIDE, 1, WRITE),        # the status itself is outside memory
    (0x20100, 1, 0),            # the last descriptor is not writable
    (0x20100, 0, WRITE),        # zero length: nowhere to write
])
def test_no_tail_when_the_last_descriptor_cannot_take_a_status(last: tuple[int, int, int]) -> None:
    mem, dq, q = setup_queue()
    dq.write_desc(0, OUTSIDE, 16, NEXT, 1)
    dq.write_desc(1, *last)
    dq.publish(0)
    with pytest.raises(GuestError) as err:
        q.pop(mem)
    assert err.value.tail is None


def test_loop_still_stops_and_has_no_tail() -> None:
    mem, dq, q = setup_queue()
    dq.write_desc(0, OUTSIDE, 16, NEXT, 1)
    dq.write_desc(1, 0x20100, 1, WRITE | NEXT, 0)     # 1 -> 0 -> 1 ...
    dq.publish(0)
    with pytest.raises(GuestError, match="loop") as err:
        q.pop(mem)
    assert err.value.tail is None


def test_readable_after_writable_keeps_the_tail() -> None:
    mem, dq, q = setup_queue()
    dq.write_desc(0, 0x20000, 16, WRITE | NEXT, 1)
    dq.write_desc(1, 0x20100, 16, NEXT, 2)            # readable after writable
    dq.write_desc(2, 0x20200, 1, WRITE)
    dq.publish(0)
    with pytest.raises(GuestError, match="readable descriptor after") as err:
        q.pop(mem)
    assert err.value.tail is not None and err.value.tail.addr == 0x20200


async def test_blk_answers_ioerr_for_a_read_into_memory_outside_the_guest() -> None:
    storage = FaultyStorage(MemoryStorage(1 << 20))
    async with device_pair(BlkDevice(storage)) as vm:
        dq = vm.queues[0]
        hdr, status = dq.alloc.alloc(16), dq.alloc.alloc(16)
        vm.mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))   # IN, sector 0
        vm.mem.write(status, b"\xaa")
        dq.write_desc(0, hdr, 16, NEXT, 1)
        dq.write_desc(1, OUTSIDE, 4096, WRITE | NEXT, 2)
        dq.write_desc(2, status, 1, WRITE)
        dq.publish(0)
        vm.kick(0)
        (used,) = await vm.wait_used(0, 1)
        assert (used.head, used.length) == (0, 1)
        assert vm.mem.read(status, 1)[0] == Status.IOERR
        assert storage.calls["read"] == 0
        # The queue goes on serving.
        ok = await vm.request(0, [Buffer.readable(struct.pack("<IIQ", 0, 0, 0)),
                                     Buffer.writable(512), Buffer.writable(1)])
        assert ok.written[-1] == Status.OK and ok.length == 513

