"""The split virtqueue, device side, against DriverQueue in FakeGuestMemory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.errors import GuestError
from vdev.queue import Descriptor, DescriptorChain, Queue
from vdev.testing import Buffer, DriverQueue, FakeGuestMemory
from vdev.uapi.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MEM_SIZE = 0x10000
DATA = 0x1000          # buffers live in [DATA, DATA + 0x8000)
SCRATCH = 0xA000       # hand-made tables and buffers live here
QINDEX = 3


def make(size: int = 8, *, mem: FakeGuestMemory | None = None, base: int = 0, event_idx: bool = False,
         indirect: bool = True, start: int = 0) -> tuple[FakeGuestMemory, DriverQueue, Queue]:
    mem = mem if mem is not None else FakeGuestMemory(MEM_SIZE)
    dq = DriverQueue(mem, size, base, data_start=DATA, data_size=0x8000, event_idx=event_idx)
    q = Queue(size, dq.desc, dq.avail, dq.used, index=QINDEX, event_idx=event_idx, indirect=indirect,
              next_avail=start, next_used=start)
    if start:
        dq.set_avail_idx(start)
        dq.last_used = start
        mem.write(dq.used + 2, struct.pack("<H", start))
    return mem, dq, q


def complete_all(mem, q: Queue, chains: list[DescriptorChain]) -> None:
    for c in chains:
        w = c.writer(mem)
        w.write(bytes([c.head & 0xFF]) * w.available)
        q.add_used(mem, c.head, w.written)


# -- popping ------------------------------------------------------------------------


def test_pop_direct_chain() -> None:
    mem, dq, q = make()
    head = dq.add_chain([Buffer.readable(b"hello"), Buffer.readable(b"world!"), Buffer.writable(10)])
    assert q.pending(mem) == 1
    chain = q.pop(mem)
    assert chain is not None
    assert (chain.queue, chain.head) == (QINDEX, head)
    assert [d.len for d in chain.readable] == [5, 6] and [d.len for d in chain.writable] == [10]
    assert all(not d.is_write for d in chain.readable) and all(d.is_write for d in chain.writable)
    assert chain.reader(mem).read(11) == b"helloworld!"
    w = chain.writer(mem)
    w.write(b"0123456789")
    q.add_used(mem, chain.head, w.written)
    assert q.pop(mem) is None
    assert dq.used_idx == 1
    assert [(u.head, u.length, u.written) for u in dq.reap()] == [(head, 10, b"0123456789")]


def test_pop_indirect_chain() -> None:
    mem, dq, q = make()
    head = dq.add_chain([Buffer.readable(b"abc"), Buffer.writable(4), Buffer.writable(2)], indirect=True)
    assert len(dq.chains[head][0]) == 1                         # one ring descriptor
    chain = q.pop(mem)
    assert chain.head == head
    assert chain.reader(mem).read(3) == b"abc"
    assert [d.len for d in chain.writable] == [4, 2]
    chain.writer(mem).write(b"wxyz12")
    q.add_used(mem, head, 6)
    assert [(u.head, u.length, u.written) for u in dq.reap()] == [(head, 6, b"wxyz12")]


def test_pop_direct_descriptor_followed_by_an_indirect_table() -> None:
    mem, dq, q = make()
    mem.write(SCRATCH, b"head")
    mem.write(SCRATCH + 0x100, b"body")
    table = SCRATCH + 0x200
    dq.write_desc(0, SCRATCH + 0x100, 4, NEXT, 1, table=table)
    dq.write_desc(1, SCRATCH + 0x300, 8, WRITE, 0, table=table)
    dq.write_desc(2, SCRATCH, 4, NEXT, 5)
    dq.write_desc(5, table, 32, INDIRECT)
    dq.publish(2)
    chain = q.pop(mem)
    assert chain.head == 2
    assert chain.readable == [Descriptor(SCRATCH, 4, NEXT), Descriptor(SCRATCH + 0x100, 4, NEXT)]
    assert chain.writable == [Descriptor(SCRATCH + 0x300, 8, WRITE)]
    assert chain.reader(mem).read(8) == b"headbody"


def test_direct_and_indirect_chains_interleaved() -> None:
    mem, dq, q = make()
    heads = [dq.add_chain([Buffer.readable(bytes([i]) * (i + 1)), Buffer.writable(3)], indirect=i % 2 == 1)
             for i in range(5)]
    chains = [q.pop(mem) for _ in range(5)]
    assert [c.head for c in chains] == heads
    assert [c.reader(mem).read(i + 1) for i, c in enumerate(chains)] == [bytes([i]) * (i + 1) for i in range(5)]
    assert q.pop(mem) is None


def test_add_used_out_of_order_and_used_idx() -> None:
    mem, dq, q = make()
    h = [dq.add_chain([Buffer.writable(4)]) for _ in range(3)]
    chains = [q.pop(mem) for _ in range(3)]
    q.add_used(mem, chains[2].head, 1)
    q.add_used(mem, chains[0].head, 2)
    assert dq.used_idx == 2 and q.next_used == 2
    q.add_used(mem, chains[1].head, 3)
    assert [(u.head, u.length) for u in dq.reap()] == [(h[2], 1), (h[0], 2), (h[1], 3)]
    with pytest.raises(ValueError):
        q.add_used(mem, 8, 0)
    assert dq.used_idx == 3


def test_wrap_around_at_2_16() -> None:
    mem, dq, q = make(size=16, start=65533)      # ring slots 13, 14, 15, 0, 1, 2
    heads = [dq.add_chain([Buffer.readable(bytes([i])), Buffer.writable(2)]) for i in range(6)]
    assert dq.avail_idx == 3                                    # 65533 + 6 wrapped
    assert q.pending(mem) == 6
    chains = []
    while (c := q.pop(mem)) is not None:
        chains.append(c)
    assert [c.head for c in chains] == heads
    assert [c.reader(mem).read(1) for c in chains] == [bytes([i]) for i in range(6)]
    assert q.next_avail == 3
    complete_all(mem, q, chains)
    assert q.next_used == 3 and dq.used_idx == 3
    used = dq.reap()
    assert [(u.head, u.length) for u in used] == [(hd, 2) for hd in heads]
    assert dq.last_used == 3
    # and a second lap goes on from there
    h = dq.add_chain([Buffer.writable(1)])
    assert q.pop(mem).head == h and q.next_avail == 4


def test_wrap_around_exactly_at_65535() -> None:
    mem, dq, q = make(size=4, start=65535)
    a = dq.add_chain([Buffer.readable(b"a")])
    b = dq.add_chain([Buffer.readable(b"b")])
    assert dq.avail_idx == 1
    assert [q.pop(mem).head, q.pop(mem).head] == [a, b]
    assert q.pop(mem) is None and q.next_avail == 1


# -- notifications ---------------------------------------------------------------------


def _used(mem, q: Queue, n: int) -> None:
    for _ in range(n):
        q.add_used(mem, 0, 0)


@pytest.mark.parametrize("start,added,event,expected", [
    (0, 1, 0, True),          # driver asked to hear when entry 0 is used
    (0, 1, 1, False),         # ... only after entry 1
    (0, 3, 1, True),          # a batch that covers the event
    (0, 3, 2, True),
    (0, 3, 3, False),
    (0, 3, 5, False),
    (65535, 2, 65535, True),  # old 65535, new 1: across the wrap
    (65535, 2, 0, True),
    (65535, 2, 1, False),
    (65534, 1, 65533, False),  # the event is behind us
])
def test_event_idx_needs_notification(start: int, added: int, event: int, expected: bool) -> None:
    mem, dq, q = make(event_idx=True, start=start)
    dq.set_used_event(event)
    dq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)          # ignored with EVENT_IDX
    _used(mem, q, added)
    assert q.needs_notification(mem) is expected


def test_needs_notification_counts_only_new_entries() -> None:
    mem, dq, q = make(event_idx=True)
    dq.set_used_event(0)
    _used(mem, q, 1)
    assert q.needs_notification(mem) is True
    assert q.needs_notification(mem) is False                   # nothing added since


def test_no_interrupt_flag_without_event_idx() -> None:
    mem, dq, q = make()
    _used(mem, q, 1)
    assert q.needs_notification(mem) is True
    dq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    _used(mem, q, 1)
    assert q.needs_notification(mem) is False
    dq.set_used_event(0)                                       # ignored without EVENT_IDX
    dq.set_avail_flags(0)
    _used(mem, q, 1)
    assert q.needs_notification(mem) is True


def test_enable_notification_with_event_idx_writes_avail_event() -> None:
    mem, dq, q = make(event_idx=True)
    dq.add_chain([Buffer.writable(1)])
    dq.add_chain([Buffer.writable(1)])
    q.pop(mem), q.pop(mem)
    q.disable_notification(mem)
    assert dq.avail_event == 0 and dq.used_flags == 0           # EVENT_IDX: flags untouched
    assert q.enable_notification(mem) is False
    assert dq.avail_event == 2
    dq.add_chain([Buffer.writable(1)])                          # arrives while "idle"
    assert q.enable_notification(mem) is True
    assert dq.avail_event == 2
    q.pop(mem)
    assert q.enable_notification(mem) is False and dq.avail_event == 3


def test_enable_disable_notification_without_event_idx_use_used_flags() -> None:
    mem, dq, q = make()
    q.disable_notification(mem)
    assert dq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notification(mem) is False
    assert dq.used_flags == 0
    dq.add_chain([Buffer.writable(1)])
    q.disable_notification(mem)
    assert q.enable_notification(mem) is True


def test_iter_available_yields_chains_and_errors() -> None:
    mem, dq, q = make()
    a = dq.add_chain([Buffer.writable(4)])
    bad = dq.free_desc.pop()
    dq.write_desc(bad, MEM_SIZE + 0x1000, 4, WRITE)
    dq.publish(bad)
    b = dq.add_chain([Buffer.writable(4)])
    items = list(q.iter_available(mem))
    assert isinstance(items[0], DescriptorChain) and items[0].head == a
    assert isinstance(items[1], GuestError) and items[1].head == bad
    assert isinstance(items[2], DescriptorChain) and items[2].head == b
    assert len(items) == 3
    assert dq.used_flags == 0                                  # notifications re-enabled


# -- malformed chains: the chain fails, the queue goes on ---------------------------------


def _post_one(dq: DriverQueue, addr: int, length: int, flags: int = 0) -> int:
    i = dq.free_desc.pop()
    dq.write_desc(i, addr, length, flags)
    dq.publish(i)
    return i


def _fails(mem, q: Queue) -> GuestError:
    with pytest.raises(GuestError) as ei:
        q.pop(mem)
    assert q.broken is None
    return ei.value


def test_descriptor_outside_memory() -> None:
    mem, dq, q = make()
    head = _post_one(dq, 0x10_0000, 16, WRITE)
    err = _fails(mem, q)
    assert (err.queue, err.head, err.gpa, err.length) == (QINDEX, head, 0x10_0000, 16)
    assert "queue=3" in str(err) and f"head={head}" in str(err) and "gpa=0x100000" in str(err)
    good = dq.add_chain([Buffer.writable(2)])
    assert q.pop(mem).head == good


def test_descriptor_crossing_the_end_of_memory() -> None:
    mem, dq, q = make()
    head = _post_one(dq, MEM_SIZE - 8, 16)
    err = _fails(mem, q)
    assert (err.head, err.gpa, err.length) == (head, MEM_SIZE - 8, 16)
    _post_one(dq, MEM_SIZE - 16, 16)                           # ending exactly at the end is fine
    assert q.pop(mem).readable == [Descriptor(MEM_SIZE - 16, 16, 0)]


def test_buffer_across_adjacent_regions_is_two_views() -> None:
    mem = FakeGuestMemory(regions=[(0, 0x4000), (0x4000, 0x4000)])
    _, dq, q = make(mem=mem)
    _post_one(dq, 0x3FF0, 32, WRITE)
    chain = q.pop(mem)
    assert chain.writable == [Descriptor(0x3FF0, 32, WRITE)]
    views = chain.writer(mem).views(32)
    assert [len(v) for v in views] == [16, 16]
    w = chain.writer(mem)
    w.write(bytes(range(32)))
    assert mem.read(0x3FF0, 32) == bytes(range(32))
    assert bytes(mem.backing[0][-16:]) == bytes(range(16)) and bytes(mem.backing[1][:16]) == bytes(range(16, 32))


def test_buffer_across_a_hole_is_rejected() -> None:
    mem = FakeGuestMemory(regions=[(0, 0x4000), (0x5000, 0x1000)])
    _, dq, q = make(mem=mem)
    head = _post_one(dq, 0x3FF0, 32)
    err = _fails(mem, q)
    assert (err.head, err.gpa, err.length) == (head, 0x3FF0, 32)


def test_looping_chain_names_its_head() -> None:
    mem, dq, q = make(size=8)
    mem.write(SCRATCH, b"x" * 16)
    dq.write_desc(0, SCRATCH, 8, NEXT, 1)
    dq.write_desc(1, SCRATCH + 8, 8, NEXT, 0)
    dq.publish(0)
    err = _fails(mem, q)
    assert (err.queue, err.head) == (QINDEX, 0)
    assert "loop" in err.message


def test_chain_as_long_as_the_queue_is_fine() -> None:
    mem, dq, q = make(size=4)
    for i in range(4):
        dq.write_desc(i, SCRATCH + 16 * i, 16, NEXT if i < 3 else 0, i + 1)
    dq.publish(0)
    assert len(q.pop(mem).readable) == 4


def test_readable_after_writable_is_rejected() -> None:
    mem, dq, q = make()
    dq.write_desc(4, SCRATCH, 8, WRITE | NEXT, 6)
    dq.write_desc(6, SCRATCH + 0x40, 8, 0)
    dq.publish(4)
    err = _fails(mem, q)
    assert (err.head, err.gpa) == (4, SCRATCH + 0x40)


def test_next_index_beyond_the_table() -> None:
    mem, dq, q = make(size=8)
    dq.write_desc(0, SCRATCH, 8, NEXT, 8)
    dq.publish(0)
    err = _fails(mem, q)
    assert err.head == 0 and "8" in err.message


def test_indirect_without_the_feature() -> None:
    mem, dq, q = make(indirect=False)
    head = dq.add_chain([Buffer.writable(4)], indirect=True)
    err = _fails(mem, q)
    assert err.head == head and "INDIRECT" in err.message


def test_nested_indirect() -> None:
    mem, dq, q = make()
    outer, inner = SCRATCH, SCRATCH + 0x100
    dq.write_desc(0, SCRATCH + 0x200, 4, 0, table=inner)
    dq.write_desc(0, inner, 16, INDIRECT, table=outer)
    dq.write_desc(2, outer, 16, INDIRECT)
    dq.publish(2)
    err = _fails(mem, q)
    assert (err.head, err.gpa) == (2, inner)


def test_indirect_with_next() -> None:
    mem, dq, q = make()
    dq.write_desc(0, SCRATCH + 0x200, 4, 0, table=SCRATCH)
    dq.write_desc(1, SCRATCH, 16, INDIRECT | NEXT, 2)
    dq.write_desc(2, SCRATCH + 0x300, 4, 0)
    dq.publish(1)
    err = _fails(mem, q)
    assert (err.head, err.gpa) == (1, SCRATCH)


@pytest.mark.parametrize("length", [24, 8, 0])
def test_indirect_table_length_not_a_multiple_of_16(length: int) -> None:
    mem, dq, q = make()
    dq.write_desc(3, SCRATCH, length, INDIRECT)
    dq.publish(3)
    err = _fails(mem, q)
    assert (err.head, err.gpa, err.length) == (3, SCRATCH, length)


def test_indirect_table_outside_memory() -> None:
    mem, dq, q = make()
    dq.write_desc(3, MEM_SIZE - 16, 32, INDIRECT)
    dq.publish(3)
    err = _fails(mem, q)
    assert (err.head, err.gpa, err.length) == (3, MEM_SIZE - 16, 32)


def test_loop_inside_an_indirect_table() -> None:
    mem, dq, q = make()
    dq.write_desc(0, SCRATCH + 0x200, 4, NEXT, 1, table=SCRATCH)
    dq.write_desc(1, SCRATCH + 0x200, 4, NEXT, 0, table=SCRATCH)
    dq.write_desc(5, SCRATCH, 32, INDIRECT)
    dq.publish(5)
    err = _fails(mem, q)
    assert err.head == 5 and "loop" in err.message


# -- a broken queue --------------------------------------------------------------------


def test_head_index_out_of_range_breaks_the_queue() -> None:
    mem, dq, q = make(size=8)
    dq.publish(8)
    with pytest.raises(GuestError) as ei:
        q.pop(mem)
    assert q.broken is ei.value
    assert (ei.value.queue, ei.value.head) == (QINDEX, None)
    assert "8" in ei.value.message
    dq.add_chain([Buffer.writable(1)])
    with pytest.raises(GuestError) as again:
        q.pop(mem)
    assert again.value is ei.value


def test_avail_index_jump_breaks_the_queue() -> None:
    mem, dq, q = make(size=8)
    dq.set_avail_idx(9)
    with pytest.raises(GuestError) as ei:
        q.pop(mem)
    assert q.broken is ei.value and ei.value.queue == QINDEX
    assert "9" in ei.value.message
    assert q.next_avail == 0


def test_avail_index_may_run_a_full_queue_ahead() -> None:
    mem, dq, q = make(size=4)
    for _ in range(4):
        dq.add_chain([Buffer.writable(1)])
    assert q.pending(mem) == 4 and q.broken is None


def test_check_layout() -> None:
    mem, dq, q = make()
    q.check_layout(mem)
    bad = Queue(8, dq.desc, dq.avail, MEM_SIZE - 8, index=QINDEX)
    with pytest.raises(GuestError) as ei:
        bad.check_layout(mem)
    assert (ei.value.queue, ei.value.gpa) == (QINDEX, MEM_SIZE - 8)
    assert "used" in ei.value.message


def test_queue_size_must_be_a_power_of_two() -> None:
    for size in (0, 3, 65536):
        with pytest.raises(ValueError):
            Queue(size, 0, 0, 0)


# -- Reader and Writer ------------------------------------------------------------------


def test_reader_across_descriptor_boundaries() -> None:
    mem, dq, q = make()
    dq.add_chain([Buffer.readable(b"abc"), Buffer.readable(b"defgh"), Buffer.readable(b"ij")])
    chain = q.pop(mem)
    r = chain.reader(mem)
    assert r.read(4) == b"abcd"
    assert r.available == 6
    assert r.read_struct(struct.Struct("<HB")) == (int.from_bytes(b"ef", "little"), ord("g"))
    assert r.read(3) == b"hij"
    with pytest.raises(GuestError):
        r.read(1)


def test_writer_across_descriptor_boundaries() -> None:
    mem, dq, q = make()
    head = dq.add_chain([Buffer.readable(b"req"), Buffer.writable(4), Buffer.writable(4), Buffer.writable(4)])
    chain = q.pop(mem)
    w = chain.writer(mem)
    w.write(b"abcdef")
    w.write(memoryview(b"ghijk"))
    assert w.written == 11 and w.available == 1
    with pytest.raises(GuestError):
        w.write(b"xy")
    q.add_used(mem, head, w.written)
    (used,) = dq.reap()
    assert used.written == b"abcdefghijk\xaa"                 # last byte: DriverQueue's poison


def test_zero_length_descriptors_are_skipped_by_the_cursor() -> None:
    mem, dq, q = make()
    dq.write_desc(0, SCRATCH, 0, NEXT, 1)
    dq.write_desc(1, SCRATCH + 16, 3, 0)
    mem.write(SCRATCH + 16, b"xyz")
    dq.publish(0)
    assert q.pop(mem).reader(mem).read(3) == b"xyz"


# -- property: what the driver posts is what pop returns ---------------------------------


chain_layout = st.tuples(
    st.lists(st.binary(min_size=0, max_size=64), max_size=3),       # readable buffers
    st.lists(st.integers(1, 64), max_size=2),                        # writable lengths
    st.booleans(),                                                   # indirect
).filter(lambda c: c[0] or c[1])


@given(chains=st.lists(chain_layout, min_size=1, max_size=3), start=st.sampled_from([0, 65534]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_posted_chains_round_trip(chains, start: int) -> None:
    mem, dq, q = make(size=16, start=start)
    heads = []
    for readable, writable, indirect in chains:
        bufs = [Buffer.readable(d) for d in readable] + [Buffer.writable(n) for n in writable]
        heads.append(dq.add_chain(bufs, indirect=indirect))
    popped = []
    while (c := q.pop(mem)) is not None:
        popped.append(c)
    assert [c.head for c in popped] == heads
    for c, (readable, writable, _indirect) in zip(popped, chains):
        assert [d.len for d in c.readable] == [len(d) for d in readable]
        assert [d.len for d in c.writable] == writable
        assert c.reader(mem).read(c.readable_len) == b"".join(readable)
        w = c.writer(mem)
        w.write(bytes((c.head + i) & 0xFF for i in range(c.writable_len)))
        q.add_used(mem, c.head, w.written)
    used = dq.reap()
    assert [u.head for u in used] == heads
    for u, (_r, writable, _i) in zip(used, chains):
        assert u.length == sum(writable)
        assert u.written == bytes((u.head + i) & 0xFF for i in range(sum(writable)))
    assert q.next_avail == q.next_used == (start + len(chains)) & 0xFFFF


def test_driver_queue_full_ring_fails_cleanly() -> None:
    mem, dq, q = make(size=2)
    dq.add_chain([Buffer.writable(16)])
    dq.add_chain([Buffer.writable(16)])
    free_before = list(dq.alloc.free)
    with pytest.raises(MemoryError):
        dq.add_chain([Buffer.writable(16)], indirect=True)
    with pytest.raises(MemoryError):
        dq.add_chain([Buffer.writable(16)])
    assert dq.alloc.free == free_before
