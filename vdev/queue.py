"""The split virtqueue (virtio 1.2 §2.7), device side: plain state, memory passed in.

`Queue` holds what the device must remember about one ring — its size, the
three ring addresses, ``next_avail``, ``next_used``, whether EVENT_IDX and
indirect descriptors were negotiated — and nothing else: no fds, no loop, no
memory.  Every method that touches the rings takes the `GuestMemory` to use,
so one memory snapshot is used consistently for a batch of work and a
memory-table change never leaves a queue holding a stale mapping.

`pop` walks one descriptor chain and checks it completely before a device
sees it:

* every buffer must lie inside guest memory;
* a chain may not hold more buffers than the queue size, and an indirect
  table no more than its own entries — this is what stops a looping chain
  (§2.7.5.3.1 "A driver MUST NOT create a descriptor chain longer than the
  Queue Size of the device", §2.7.4.2);
* all device-readable descriptors come before all device-writable ones
  (§2.7.4.2 "The driver MUST place any device-writable descriptor elements
  after any device-readable descriptor elements");
* INDIRECT only when negotiated, never nested, never together with NEXT, a
  table length that is a non-zero multiple of 16 and holds at most the
  queue size of descriptors (§2.7.5.3.1).

A bad chain raises `GuestError` with queue, head and address.  The avail
entry has been consumed by then, so the caller returns the head to the used
ring and the guest gets its descriptor back.  When the chain is sound in
structure but a buffer lies outside guest memory (or the order is wrong), the
error's ``tail`` is the chain's last descriptor if that one is writable and
in bounds, so a device can still answer with a status there (virtio-blk
writes IOERR); otherwise the head goes back with length 0.  Only a head
index that is itself out of range, or an avail index that jumped by more
than the queue size, leaves the queue `broken`, because nothing valid can be
written back for it.

Every shared ring field (avail/used ``idx`` and ``flags``, used elements,
``used_event``/``avail_event``) is loaded or stored in one access of its
natural width (`vdev.memory.load_u16` and friends): the driver touches them
while we do, and a store split into bytes lets it see a value that was never
written (a ``used.idx`` of 0 made a driver take stale heads).

Memory ordering: the device reads ``avail.idx`` before the ring entries it
covers, and writes used elements before ``used.idx``.  CPython performs the
loads and stores in program order and x86 keeps load-load and store-store
order, so those two need no fence.  The one store→load pair that x86 may
reorder — publishing ``avail_event`` / clearing NO_NOTIFY and then re-reading
``avail.idx`` (§2.7.10) — goes through `full_fence()`.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import GuestError
from .memory import GuestMemory, load_u16, store_u16, store_u32_pair

if TYPE_CHECKING:
    from .tracking import DirtyLog, InflightRegion
from .uapi.virtio import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

_DESC = struct.Struct("<QIHH")

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: taking a lock executes a locked (serialising) instruction."""
    with _fence_lock:
        pass


class RingError(enum.IntEnum):
    """What was wrong with a chain or a ring: `GuestError.code`.

    The native ring (``vdev/_native/src/vring.h``, ``VD_E_*``) returns the
    same numbers, so both implementations can be compared error for error.
    """

    LOOP = 1
    NESTED_INDIRECT = 2
    INDIRECT_NOT_NEGOTIATED = 3
    INDIRECT_WITH_NEXT = 4
    INDIRECT_BAD_LENGTH = 5
    INDIRECT_TOO_LONG = 6
    INDIRECT_OUTSIDE_MEMORY = 7
    BUFFER_OUTSIDE_MEMORY = 8
    READABLE_AFTER_WRITABLE = 9
    NEXT_OUT_OF_RANGE = 10
    AVAIL_IDX_JUMP = 11        # breaks the queue
    HEAD_OUT_OF_RANGE = 12     # breaks the queue
    LAYOUT = 13                # rings outside guest memory: the queue cannot start


#: The message of each chain error (the C ring returns only the code).
RING_ERROR_MESSAGES = {
    RingError.LOOP: "descriptor chain longer than the queue size or its table: a loop?",
    RingError.NESTED_INDIRECT: "indirect descriptor inside an indirect table",
    RingError.INDIRECT_NOT_NEGOTIATED: "indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC",
    RingError.INDIRECT_WITH_NEXT: "descriptor has both INDIRECT and NEXT",
    RingError.INDIRECT_BAD_LENGTH: "indirect table length is not a non-zero multiple of 16",
    RingError.INDIRECT_TOO_LONG: "indirect table has more descriptors than the queue size",
    RingError.INDIRECT_OUTSIDE_MEMORY: "indirect table outside guest memory",
    RingError.BUFFER_OUTSIDE_MEMORY: "buffer outside guest memory",
    RingError.READABLE_AFTER_WRITABLE: "device-readable descriptor after a device-writable one",
    RingError.NEXT_OUT_OF_RANGE: "next index beyond its table",
}


def chain_error(code: RingError, *, gpa: int | None = None, length: int | None = None) -> GuestError:
    return GuestError(RING_ERROR_MESSAGES[code], gpa=gpa, length=length, code=code)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain: guest-physical address, length, and whether the device writes it."""

    addr: int
    len: int
    flags: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


@dataclass(slots=True)
class DescriptorChain:
    """A checked chain: readable descriptors first, then writable ones (indirect tables expanded)."""

    queue: int
    head: int
    readable: list[Descriptor] = field(default_factory=list)
    writable: list[Descriptor] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(d.len for d in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(d.len for d in self.writable)

    def reader(self, mem: GuestMemory) -> Reader:
        return Reader(mem, self.readable)

    def writer(self, mem: GuestMemory) -> Writer:
        return Writer(mem, self.writable)


class _Cursor:
    """Walks a list of descriptors as one byte stream."""

    def __init__(self, mem: GuestMemory, descs: list[Descriptor]) -> None:
        self.mem = mem
        self._descs = descs
        self._i = 0
        self._off = 0
        self.available = sum(d.len for d in descs)

    def views(self, length: int) -> list[memoryview]:
        """Views of the next ``length`` bytes, advancing the cursor."""
        if length > self.available:
            raise GuestError(f"chain too short: need {length} bytes, {self.available} left")
        out: list[memoryview] = []
        left = length
        while left > 0:
            d = self._descs[self._i]
            n = min(left, d.len - self._off)
            if n > 0:
                out.extend(self.mem.buffers(d.addr + self._off, n))
            self._off += n
            left -= n
            if self._off == d.len:
                self._i += 1
                self._off = 0
        self.available -= length
        return out

    def rest(self) -> list[memoryview]:
        return self.views(self.available)


class Reader(_Cursor):
    """Reads the device-readable part of a chain as one stream."""

    def read(self, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.views(length))

    def read_struct(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self.read(st.size))


class Writer(_Cursor):
    """Writes into the device-writable part of a chain; counts what was written."""

    def __init__(self, mem: GuestMemory, descs: list[Descriptor]) -> None:
        super().__init__(mem, descs)
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for v in self.views(len(src)):
            v[:] = src[pos: pos + len(v)]
            pos += len(v)
        self.written += len(src)


@dataclass(frozen=True, slots=True)
class QueueState:
    """The serialisable part of a queue (for GET_VRING_BASE and reconnection)."""

    size: int
    desc: int
    avail: int
    used: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool


class Queue:
    """Device-side state of one split virtqueue."""

    def __init__(self, size: int, desc: int, avail: int, used: int, *, index: int = 0,
                 next_avail: int = 0, next_used: int = 0, event_idx: bool = False,
                 indirect: bool = True) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size must be a power of 2 up to 32768, got {size}")
        self.index = index
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.next_avail = next_avail & 0xFFFF
        self.next_used = next_used & 0xFFFF
        self.event_idx = event_idx
        self.indirect = indirect
        self.num_added = 0        # used entries added since the last needs_notification()
        self.broken: GuestError | None = None
        # Dirty logging (vdev.tracking): None when off.
        self.log: DirtyLog | None = None
        self.log_used = False     # VHOST_VRING_F_LOG: log used-ring writes at log_used_gpa
        self.log_used_gpa = 0
        # In-flight tracking (vdev.tracking): None when off.
        self.inflight: InflightRegion | None = None
        self.inflight_counter = 0
        self.resubmit: list[int] = []

    # -- layout ----------------------------------------------------------------

    @property
    def avail_size(self) -> int:
        return 4 + 2 * self.size + 2       # flags, idx, ring[], used_event

    @property
    def used_size(self) -> int:
        return 4 + USED_ELEM_SIZE * self.size + 2   # flags, idx, ring[], avail_event

    def check_layout(self, mem: GuestMemory) -> None:
        """Raise GuestError unless all three rings lie in guest memory (each contiguous)."""
        for name, addr, size in (("descriptor table", self.desc, DESC_SIZE * self.size),
                                 ("avail ring", self.avail, self.avail_size),
                                 ("used ring", self.used, self.used_size)):
            try:
                mem.view(addr, size)
            except GuestError as exc:
                raise GuestError(f"{name} outside guest memory", queue=self.index, gpa=addr,
                                 length=size, code=RingError.LAYOUT) from exc

    def state(self) -> QueueState:
        return QueueState(self.size, self.desc, self.avail, self.used, self.next_avail,
                          self.next_used, self.event_idx, self.indirect)

    # -- ring fields -------------------------------------------------------------

    # Every ring field is loaded or stored in one access of its width (see
    # vdev.memory.load_u16): the driver reads and writes them concurrently.
    _u16 = staticmethod(load_u16)
    _put_u16 = staticmethod(store_u16)

    def avail_idx(self, mem: GuestMemory) -> int:
        return self._u16(mem, self.avail + 2)

    def avail_flags(self, mem: GuestMemory) -> int:
        return self._u16(mem, self.avail)

    def used_event(self, mem: GuestMemory) -> int:
        return self._u16(mem, self.avail + 4 + 2 * self.size)

    def used_idx(self, mem: GuestMemory) -> int:
        return self._u16(mem, self.used + 2)

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that we have not popped.

        Raises GuestError (and marks the queue broken) when avail.idx moved by
        more than the queue size: the ring no longer means anything.
        """
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            self.broken = GuestError(f"avail index moved by {n}, more than the queue size {self.size}",
                                     queue=self.index, code=RingError.AVAIL_IDX_JUMP)
            raise self.broken
        return n

    # -- popping ------------------------------------------------------------------

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or None when the ring is empty.

        Raises:
            GuestError: the chain is malformed.  ``err.head`` is set and the
            avail entry consumed: return the head with `add_used` (length 0).
            If the queue itself is unusable, ``queue.broken`` is set and
            ``err.head`` is None.
        """
        if self.broken is not None:
            raise self.broken
        if self.resubmit:
            # In flight when the previous back end died: taken again, oldest
            # first, before anything new (still marked in flight).
            head = self.resubmit.pop(0)
        else:
            if self.pending(mem) == 0:
                return None
            slot = self.avail + 4 + 2 * (self.next_avail % self.size)
            head = self._u16(mem, slot)
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            if head >= self.size:
                self.broken = GuestError(f"avail ring names descriptor {head}, queue size is {self.size}",
                                         queue=self.index, code=RingError.HEAD_OUT_OF_RANGE)
                raise self.broken
            if self.inflight is not None:
                self.inflight.set_counter(head, self.inflight_counter)
                self.inflight_counter += 1
                self.inflight.set_inflight(head, 1)
        chain = DescriptorChain(self.index, head)
        try:
            self._walk(mem, chain)
        except GuestError as exc:
            raise exc.at(queue=self.index, head=head)
        return chain

    def _read_desc(self, mem: GuestMemory, table: int, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(mem.view(table + DESC_SIZE * i, DESC_SIZE))

    def _walk(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        table, table_len, i = self.desc, self.size, chain.head
        in_indirect = False
        budget = self.size        # descriptors we may still visit in this table
        deferred: GuestError | None = None
        while True:
            if budget == 0:
                raise chain_error(RingError.LOOP, gpa=table)
            budget -= 1
            addr, length, flags, nxt = self._read_desc(mem, table, i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise chain_error(RingError.NESTED_INDIRECT, gpa=addr)
                if not self.indirect:
                    raise chain_error(RingError.INDIRECT_NOT_NEGOTIATED, gpa=addr)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise chain_error(RingError.INDIRECT_WITH_NEXT, gpa=addr)
                if length == 0 or length % DESC_SIZE:
                    raise chain_error(RingError.INDIRECT_BAD_LENGTH, gpa=addr, length=length)
                if length // DESC_SIZE > self.size:
                    # §2.7.5.3.1: "A driver MUST NOT create a descriptor chain
                    # longer than the Queue Size of the device."
                    raise chain_error(RingError.INDIRECT_TOO_LONG, gpa=addr, length=length)
                try:
                    mem.view(addr, length)
                except GuestError:
                    raise chain_error(RingError.INDIRECT_OUTSIDE_MEMORY, gpa=addr,
                                      length=length) from None
                table, table_len, i = addr, length // DESC_SIZE, 0
                # The pointer is not a buffer; the chain's buffers, direct ones
                # before it included, stay within the queue size (§2.7.5.3.1).
                budget = min(budget + 1, table_len)
                in_indirect = True
                continue
            # A bad buffer or a wrong order does not stop the walk: the chain's
            # structure is still sound, so we go on to its end (loops are still
            # caught by the budget) to learn whether its last descriptor is a
            # writable in-bounds buffer, where a device may still put a status.
            d = Descriptor(addr, length, flags)
            try:
                _check_range(mem, addr, length)
                in_bounds = True
            except GuestError:
                in_bounds = False
                deferred = deferred or chain_error(RingError.BUFFER_OUTSIDE_MEMORY, gpa=addr, length=length)
            if d.is_write:
                chain.writable.append(d)
            elif chain.writable:
                deferred = deferred or chain_error(RingError.READABLE_AFTER_WRITABLE, gpa=addr)
            else:
                chain.readable.append(d)
            if not flags & VIRTQ_DESC_F_NEXT:
                if deferred is not None:
                    deferred.tail = d if d.is_write and in_bounds and d.len > 0 else None
                    raise deferred
                return
            if nxt >= table_len:
                exc = chain_error(RingError.NEXT_OUT_OF_RANGE, gpa=addr)
                exc.message = f"next index {nxt} beyond a table of {table_len}"
                raise exc
            i = nxt

    # -- completing -----------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Put ``head`` on the used ring with ``length`` bytes written, then publish used.idx."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for queue size {self.size}")
        offset = 4 + USED_ELEM_SIZE * (self.next_used % self.size)
        store_u32_pair(mem, self.used + offset, head, length)
        self._log_used(offset, USED_ELEM_SIZE)
        if self.inflight is not None:
            self.inflight.last_batch_head = head      # a batch of one
        # The element is stored before the index (store-store order holds on x86).
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._put_u16(mem, self.used + 2, self.next_used)
        self._log_used(2, 2)
        self.num_added += 1
        if self.inflight is not None:
            self.inflight.set_inflight(head, 0)
            self.inflight.used_idx = self.next_used

    # -- dirty logging and in-flight tracking -------------------------------------------

    def _log_used(self, offset: int, length: int) -> None:
        if self.log is not None and self.log_used:
            self.log.mark(self.log_used_gpa + offset, length)

    def set_log(self, log: DirtyLog | None, log_used: bool = False, log_used_gpa: int = 0) -> None:
        """Log dirty pages into ``log`` (None: stop); the used ring too when ``log_used``."""
        self.log, self.log_used, self.log_used_gpa = log, log_used, log_used_gpa

    def log_write(self, descs: list[Descriptor]) -> None:
        """The device wrote (some of) these buffers: mark their pages dirty."""
        if self.log is not None:
            for d in descs:
                self.log.mark(d.addr, d.len)

    def set_inflight(self, region: InflightRegion | None, mem: GuestMemory) -> int:
        """Track requests in ``region``; returns how many will be taken again.

        A fresh region (version 0) is initialised.  Otherwise a batch that
        was published but not cleared is settled, ``next_avail`` becomes
        ``used.idx`` plus what was in flight, and those heads come first.
        """
        self.inflight, self.resubmit, self.inflight_counter = region, [], 0
        if region is None:
            return 0
        used = self.used_idx(mem)
        if region.version == 0:
            for i in range(self.size):
                region.set_inflight(i, 0)
            region.desc_num = self.size
            region.last_batch_head = 0
            region.used_idx = used
            region.version = 1
            return 0
        if region.used_idx != used:
            # Died after publishing a batch, before clearing it.
            head = region.last_batch_head
            for _ in range((used - region.used_idx) & 0xFFFF):
                if head >= self.size:
                    break
                nxt = region.next(head)
                region.set_inflight(head, 0)
                head = nxt
            region.used_idx = used
        self.resubmit = region.marked()
        self.inflight_counter = max((region.counter(h) + 1 for h in self.resubmit), default=0)
        self.next_used = used
        self.next_avail = (used + len(self.resubmit)) & 0xFFFF
        return len(self.resubmit)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether to interrupt the driver for the entries added since the last call (§2.7.10)."""
        full_fence()   # our used.idx store must be visible before we read the driver's used_event
        added, self.num_added = self.num_added, 0
        if self.event_idx:
            new = self.next_used
            old = (new - added) & 0xFFFF
            event = self.used_event(mem)
            # vring_need_event(): notify if event lies in [old, new).
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self.avail_flags(mem) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notification(self, mem: GuestMemory) -> None:
        """Ask the driver not to kick (a hint; with EVENT_IDX simply do not move avail_event)."""
        if not self.event_idx:
            flags = self._u16(mem, self.used)
            self._put_u16(mem, self.used, flags | VIRTQ_USED_F_NO_NOTIFY)
            self._log_used(0, 2)

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask for kicks again; return True if chains arrived meanwhile (process them first)."""
        if self.event_idx:
            self._put_u16(mem, self.used + 4 + USED_ELEM_SIZE * self.size, self.next_avail)
            self._log_used(4 + USED_ELEM_SIZE * self.size, 2)
        else:
            flags = self._u16(mem, self.used)
            self._put_u16(mem, self.used, flags & ~VIRTQ_USED_F_NO_NOTIFY)
            self._log_used(0, 2)
        full_fence()   # §2.7.10: publish before re-reading avail.idx, or a kick can be missed
        return self.pending(mem) > 0

    def iter_available(self, mem: GuestMemory) -> Iterator[DescriptorChain | GuestError]:
        """Drain the ring with notifications suppressed, the way §2.7.10 asks.

        Yields each chain, or the GuestError of a malformed one (whose head the
        caller returns).  Stops when the ring is empty *after* notifications
        were re-enabled, so a chain made available in the window between the
        last pop and the re-enable is not left waiting for a kick that never
        comes.  Stops early if the queue breaks.
        """
        while True:
            self.disable_notification(mem)
            while True:
                try:
                    chain = self.pop(mem)
                except GuestError as exc:
                    yield exc
                    if self.broken is not None:
                        return
                    continue
                if chain is None:
                    break
                yield chain
            try:
                if not self.enable_notification(mem):
                    return
            except GuestError as exc:
                yield exc
                return


def _check_range(mem: GuestMemory, gpa: int, length: int) -> None:
    check = getattr(mem, "check", None)
    if check is not None:
        check(gpa, length)
    else:
        mem.buffers(gpa, length)
