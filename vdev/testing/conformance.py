"""`check_queue`: one conformance suite for every split-virtqueue implementation.

The pure-Python `vdev.queue.Queue` is the reference.  Another implementation
(the C ring behind `vdev.native.NativeQueue`, or a third party's) passes when,
for every generated scenario, it gives exactly what the reference gives:

* the same chains (head, readable and writable descriptors, in order);
* the same errors (`RingError` code, head, address, length, and the
  status-capable tail of a bad chain), and a queue broken at the same point;
* the same used entries, used index, flags and ``avail_event`` — compared
  as the whole guest memory, byte for byte, after every step;
* the same notification decisions (EVENT_IDX and NO_INTERRUPT) and the same
  answer from re-enabling notifications.

Scenarios are generated with hypothesis: the driver writes arbitrary
descriptors (valid ones, loops, indirect tables nested, too long or outside
memory, buffers crossing into an adjacent region or into a hole, readable
after writable, next out of range) into the table and an indirect area,
publishes any head (also out of range), jumps ``avail.idx``, sets
``used_event`` and flags; the device pops, completes, decides, disables and
re-enables notifications, in any order, near index wrap-around too.

    from vdev.testing import check_queue
    check_queue(MyQueue)       # MyQueue(size, desc, avail, used, *, index, next_avail,
                               #         next_used, event_idx, indirect)

Needs hypothesis (the ``test`` extra).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from ..errors import GuestError
from ..memory import RegionTable, store_u16
from ..tracking import DirtyLog, InflightArea
from ..queue import DescriptorChain, Queue
from ..uapi.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["check_queue", "QueueFactory"]

QueueFactory = Callable[..., Any]

_DESC = struct.Struct("<QIHH")
# Guest memory: two adjacent regions, a hole, and a small third region.
_REGIONS = ((0, 0x4000), (0x4000, 0x4000), (0x10000, 0x1000))
_TABLE_AREA = 0x3000          # indirect tables are written here
_ADDRS = (0x1000, 0x1800, 0x2FF0, 0x3FF8,   # in memory; 0x3FF8 + 16 crosses into the next region
          0x7FF8,                            # runs off the second region into the hole
          0x9000,                            # in the hole
          0x10FF0,                           # the end of the last region
          (1 << 64) - 8)                     # wraps past the top of the address space
_LENS = (0, 1, 16, 100, 0x800, 0x5000, (1 << 32) - 1)
_INDEX = 5
_LOG_BYTES = 64                 # 512 pages: the first 2 MiB of guest-physical space
_LOG_USED_GPA = 0x7000          # where the used ring is logged (any address inside the log)


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        result = fn()
    except GuestError as exc:
        tail = exc.tail
        return ("error", None if exc.code is None else int(exc.code), exc.head, exc.gpa, exc.length,
                None if tail is None else (tail.addr, tail.len, tail.flags))  # type: ignore[attr-defined]
    if isinstance(result, DescriptorChain):
        return ("chain", result.head, tuple((d.addr, d.len, d.flags) for d in result.readable),
                tuple((d.addr, d.len, d.flags) for d in result.writable))
    return ("value", result)


class _Side:
    """One implementation under test, with its own copy of guest memory (and,
    with ``tracking``, its own in-flight region and dirty log)."""

    def __init__(self, factory: QueueFactory, size: int, start: int, event_idx: bool,
                 indirect: bool, tracking: bool = False) -> None:
        from . import FakeGuestMemory

        self.factory = factory
        self.mem: RegionTable = FakeGuestMemory(regions=_REGIONS)
        self.desc = 0
        self.avail = 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) // 4 * 4
        self.size = size
        self.start = start
        self.event_idx, self.indirect = event_idx, indirect
        self.avail_idx = start
        store_u16(self.mem, self.avail + 2, start)
        store_u16(self.mem, self.used + 2, start)
        self.area: InflightArea | None = None
        self.log: DirtyLog | None = None
        self._log_fd = -1
        if tracking:
            self.area = InflightArea.create(1, size)
            self._log_fd = os.memfd_create("vdev-test-log", os.MFD_CLOEXEC)
            os.ftruncate(self._log_fd, _LOG_BYTES)
            self.log = DirtyLog(self._log_fd, _LOG_BYTES)
        self.queue = self._new_queue(start)
        self.popped: list[int] = []

    def _new_queue(self, next_avail: int) -> Any:
        q = self.factory(self.size, self.desc, self.avail, self.used, index=_INDEX, next_avail=next_avail,
                         next_used=next_avail, event_idx=self.event_idx, indirect=self.indirect)
        self.resubmitted = 0
        if self.area is not None:
            q.set_log(self.log, True, _LOG_USED_GPA)
            self.resubmitted = q.set_inflight(self.area.region(0), self.mem)
        return q

    def restart(self) -> tuple[Any, ...]:
        """A new incarnation of the back end on the same memory and region (after a crash)."""
        self.queue = self._new_queue(self.start)
        self.popped = []
        return ("value", self.resubmitted, self.queue.next_avail)

    def snapshot(self) -> bytes:
        out = b"".join(bytes(r.data) for r in self.mem.regions)
        if self.area is not None and self.log is not None:
            region = self.area.region(0)
            assert region is not None
            out += bytes(region.view) + bytes(self.log._view)
        return out

    def close(self) -> None:
        self.queue = None
        if self.log is not None:
            self.log.close()
            os.close(self._log_fd)
        if self.area is not None:
            self.area.close()

    # -- driver actions (identical on both sides) ---------------------------------------

    def write_desc(self, base: int, i: int, desc: tuple[int, int, int, int]) -> None:
        self.mem.write(base + 16 * i, _DESC.pack(*desc))

    def publish(self, head: int) -> None:
        store_u16(self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store_u16(self.mem, self.avail + 2, self.avail_idx)

    def jump(self, n: int) -> None:
        self.avail_idx = (self.avail_idx + n) & 0xFFFF
        store_u16(self.mem, self.avail + 2, self.avail_idx)

    # -- device actions ------------------------------------------------------------------

    def pop(self) -> tuple[Any, ...]:
        def go() -> Any:
            try:
                chain = self.queue.pop(self.mem)
            except GuestError as exc:
                if exc.head is not None:
                    self.popped.append(exc.head)
                raise
            if chain is not None:
                self.popped.append(chain.head)
            return chain
        return _outcome(go)

    def complete(self, length: int) -> tuple[Any, ...]:
        if not self.popped:
            return ("value", None)
        head = self.popped.pop(0)
        return _outcome(lambda: self.queue.add_used(self.mem, head, length))


def _scenarios() -> Any:
    from hypothesis import strategies as st

    @st.composite
    def scenario(draw: Any) -> tuple[int, int, bool, bool, list[tuple[Any, ...]], bool]:
        size = draw(st.sampled_from([2, 4, 8, 16]))
        start = draw(st.sampled_from([0, 1, 0xFFFF - size, 0xFFFE]))
        event_idx = draw(st.booleans())
        indirect = draw(st.booleans())
        flag = st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT,
                                VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
                                VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0xFFF8 | VIRTQ_DESC_F_WRITE])
        table_len = st.sampled_from([0, 16, 17, 32, 16 * size, 16 * (size + 1), 16 * (size + 2)])
        buffer = st.tuples(st.sampled_from(_ADDRS), st.sampled_from(_LENS), flag,
                           st.integers(0, size + 1))
        pointer = st.tuples(st.sampled_from([_TABLE_AREA, _TABLE_AREA + 16, 0x9000, 0x3FF0]),
                            table_len, st.just(VIRTQ_DESC_F_INDIRECT), st.integers(0, 1))
        desc = st.one_of(buffer, buffer, buffer, pointer)
        # A linked chain written at consecutive slots and published: most
        # sound, some with a buffer outside memory or in the wrong order.
        link = st.tuples(st.sampled_from(_ADDRS[:5] + _ADDRS[:3]), st.sampled_from(_LENS[:5]),
                         st.booleans())
        chain = st.tuples(st.just("chain"), st.integers(0, size - 1), st.lists(link, min_size=1,
                                                                               max_size=size))
        # The shape of a virtio-blk request gone wrong: header, a data buffer
        # outside memory or readable after writable, then a sound status byte.
        broken_request = st.tuples(st.just("chain"), st.integers(0, size - 1), st.tuples(
            st.just((0x1000, 16, False)),
            st.sampled_from([(0x7FF8, 0x800, True), (0x9000, 16, False), ((1 << 64) - 8, 16, True),
                             (0x1800, 16, False)]),
            st.sampled_from([(0x2FF0, 1, True), (0x7FF8, 16, True), (0x1010, 0, True)])).map(list))
        if size < 3:
            broken_request = chain
        op = st.one_of(
            chain, chain, broken_request,
            st.tuples(st.just("desc"), st.integers(0, size - 1), desc),
            st.tuples(st.just("table"), st.integers(0, size + 1), desc),
            st.tuples(st.just("publish"), st.one_of(st.integers(0, size - 1), st.just(size),
                                                   st.just(0xFFFF))),
            st.tuples(st.just("pop")),
            st.tuples(st.just("pop")),
            st.tuples(st.just("complete"), st.sampled_from([0, 1, 17, 0xFFFFFFFF])),
            st.tuples(st.just("notify")),
            st.tuples(st.just("disable")),
            st.tuples(st.just("enable")),
            st.tuples(st.just("used_event"), st.integers(0, 0xFFFF)),
            st.tuples(st.just("avail_flags"), st.sampled_from([0, 1])),
            st.tuples(st.just("jump"), st.integers(0, size + 3)),
            st.tuples(st.just("restart")),
        )
        ops = draw(st.lists(op, min_size=1, max_size=40))
        tracking = draw(st.booleans())
        if not tracking:
            ops = [o for o in ops if o[0] != "restart"]
        return size, start, event_idx, indirect, ops, tracking

    return scenario()


def _run(factory: QueueFactory, size: int, start: int, event_idx: bool, indirect: bool,
         ops: list[tuple[Any, ...]], tracking: bool = False) -> None:
    ref = _Side(Queue, size, start, event_idx, indirect, tracking)
    sut = _Side(factory, size, start, event_idx, indirect, tracking)
    try:
        _steps(ref, sut, size, start, event_idx, indirect, ops)
    finally:
        ref.close()
        sut.close()


def _steps(ref: _Side, sut: _Side, size: int, start: int, event_idx: bool, indirect: bool,
           ops: list[tuple[Any, ...]]) -> None:
    for step, op in enumerate(ops):
        outs = []
        for side in (ref, sut):
            kind = op[0]
            if kind == "chain":
                first, links = op[1], op[2]
                for j, (addr, length, write) in enumerate(links):
                    last = j + 1 == len(links)
                    flags = (VIRTQ_DESC_F_WRITE if write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                    side.write_desc(side.desc, (first + j) % size, (addr, length, flags,
                                                                  (first + j + 1) % size))
                side.publish(first)
                out: tuple[Any, ...] = ()
            elif kind == "desc":
                side.write_desc(side.desc, op[1], op[2])
                out = ()
            elif kind == "table":
                side.write_desc(_TABLE_AREA, op[1], op[2])
                out = ()
            elif kind == "publish":
                side.publish(op[1])
                out = ()
            elif kind == "jump":
                side.jump(op[1])
                out = ()
            elif kind == "used_event":
                store_u16(side.mem, side.avail + 4 + 2 * size, op[1])
                out = ()
            elif kind == "avail_flags":
                store_u16(side.mem, side.avail, op[1])
                out = ()
            elif kind == "pop":
                out = side.pop()
            elif kind == "complete":
                out = side.complete(op[1])
            elif kind == "notify":
                out = _outcome(lambda s=side: s.queue.needs_notification(s.mem))
            elif kind == "disable":
                out = _outcome(lambda s=side: s.queue.disable_notification(s.mem))
            elif kind == "enable":
                out = _outcome(lambda s=side: s.queue.enable_notification(s.mem))
            elif kind == "restart":
                out = side.restart()
            else:   # pragma: no cover
                raise AssertionError(op)
            outs.append(out)
        where = f"step {step} {op!r} (size {size}, start {start}, event_idx {event_idx}, indirect {indirect})"
        assert outs[0] == outs[1], f"{where}: reference {outs[0]!r} != {outs[1]!r}"
        assert ref.queue.next_avail == sut.queue.next_avail, f"{where}: next_avail differs"
        assert ref.snapshot() == sut.snapshot(), f"{where}: guest memory differs"
        assert (ref.queue.broken is None) == (sut.queue.broken is None), f"{where}: broken differs"


#: Scenarios run before the generated ones, every time: the cases a queue most
#: often gets wrong, so no run depends on the generator's luck to try them.
FIXED_SCENARIOS: tuple[tuple[Any, ...], ...] = (
    # a request whose data buffer is outside memory, with a sound status byte (the tail)
    (4, 0, False, True, [("chain", 0, [(0x1000, 16, False), (0x9000, 16, False), (0x2FF0, 1, True)]),
                         ("pop",), ("complete", 1), ("notify",)]),
    # readable after writable, near index wrap
    (4, 0xFFFE, True, True, [("chain", 1, [(0x1000, 16, False), (0x1800, 16, True), (0x2000, 16, False)]),
                             ("chain", 2, [(0x1000, 16, True)]), ("pop",), ("pop",), ("complete", 0),
                             ("complete", 16), ("notify",), ("enable",)]),
    # EVENT_IDX: the driver asks for an interrupt only at used index 3
    (8, 0, True, True, [("used_event", 2)] + [("chain", i, [(0x1000, 8, True)]) for i in range(4)]
     + [("pop",)] * 4 + [("complete", 8), ("notify",), ("complete", 8), ("notify",), ("complete", 8),
                         ("notify",), ("complete", 8), ("notify",), ("disable",), ("enable",)]),
    # NO_INTERRUPT without EVENT_IDX, then a jump that breaks the queue
    (4, 0, False, False, [("avail_flags", 1), ("chain", 0, [(0x1000, 8, True)]), ("pop",), ("complete", 8),
                          ("notify",), ("jump", 7), ("pop",), ("enable",)]),
    # in-flight tracking: three taken, one answered, the back end dies and a new
    # one takes the other two again (oldest first); then a crash after a batch
    (8, 0xFFFE, True, True, [("chain", 0, [(0x1000, 16, False), (0x2FF0, 1, True)]),
                             ("chain", 2, [(0x1000, 16, False), (0x2FF0, 1, True)]),
                             ("chain", 4, [(0x1000, 16, False), (0x2FF0, 1, True)]),
                             ("pop",), ("pop",), ("pop",), ("complete", 1), ("notify",), ("restart",),
                             ("pop",), ("pop",), ("pop",), ("complete", 1), ("complete", 1),
                             ("restart",), ("pop",), ("enable",)], True),
    # an indirect table as long as the queue after a direct buffer: one too many
    (4, 0, False, True, [("table", 0, (0x1000, 8, 1, 1)), ("table", 1, (0x1800, 8, 1, 2)),
                         ("table", 2, (0x2000, 8, 1, 3)), ("table", 3, (0x2800, 8, 2, 0)),
                         ("desc", 0, (0x1000, 8, 1, 1)), ("desc", 1, (0x3000, 64, 4, 0)),
                         ("publish", 0), ("pop",)]),
)


def check_queue(factory: QueueFactory, *, max_examples: int = 300, shrink: bool = True) -> None:
    """Assert ``factory``'s queue behaves exactly as `vdev.queue.Queue` in generated scenarios.

    Raises AssertionError (through hypothesis, with the smallest failing
    scenario unless ``shrink`` is False) on the first difference.
    """
    from hypothesis import HealthCheck, Phase, given, settings

    phases = list(Phase) if shrink else [p for p in Phase if p is not Phase.shrink]

    for case in FIXED_SCENARIOS:
        _run(factory, *case)

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
              phases=phases)
    @given(_scenarios())
    def run(case: tuple[int, int, bool, bool, list[tuple[Any, ...]], bool]) -> None:
        _run(factory, *case)

    run()
