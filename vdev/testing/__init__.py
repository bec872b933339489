"""Public test API: the other side of every interface, for device authors.

* `FakeGuestMemory` — guest memory in a bytearray, with the same bounds
  checks as the real mmap-backed map.
* `MemfdGuestMemory` — guest memory in memfds, shareable with a back end over
  vhost-user exactly as QEMU shares it.
* `DriverQueue` — the driver's side of a split virtqueue: lays out the rings,
  posts chains (direct or indirect), reaps used entries, and lets a test
  write any malformed descriptor it likes.
* `VirtioFrontend` — a VMM stand-in over a real Unix socket: handshake,
  memory table, ring set-up, kick and call eventfds, and a `request()` that
  posts a chain and waits for its completion.
* `device_pair()` — a `Device` served in-process on a temporary socket with a
  connected `VirtioFrontend`: the whole stack, no QEMU.
* `check_queue(factory)` — the conformance suite every split-virtqueue
  implementation (the C ring included) must pass against the Python reference.
* `DaemonProcess` — ``python -m vdev <device> …`` as its own process, as an
  operator runs it: started, waited for until its sockets exist, its output
  kept, stopped with SIGTERM (`stop_process` is that stop alone).

The QEMU guest harness lives in `vdev.testing.guest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from vhost_user.frontend import Frontend
from vhost_user.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegion,
    ProtocolFeature,
    VringAddr,
)

from ..device import Device, serve
from ..memory import MappedRegion, RegionTable, load_u16, store_u16
from ..uapi.virtio import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtioFeature,
)
from .conformance import check_queue
from .daemon import DaemonProcess, DaemonStartError, stop_process

__all__ = ["Buffer", "DaemonProcess", "DaemonStartError", "DriverQueue", "check_queue", "FakeGuestMemory",
           "MemfdGuestMemory", "Used", "VirtioFrontend", "device_pair", "stop_process"]


_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")

#: Where `MemfdGuestMemory` pretends the VMM mapped guest RAM, so ring
#: addresses (front-end virtual) differ from descriptor addresses (guest
#: physical) and a back end that mixes them up fails loudly.
FRONTEND_VA_BASE = 0x7F00_0000_0000


class FakeGuestMemory(RegionTable):
    """Guest memory backed by bytearrays: ``FakeGuestMemory(1 << 20)`` or
    ``FakeGuestMemory(regions=[(0, 4096), (8192, 4096)])`` for holes and
    boundaries."""

    def __init__(self, size: int = 0, *, regions: Sequence[tuple[int, int]] = ()) -> None:
        spans = list(regions) or [(0, size)]
        self.backing = [bytearray(n) for _, n in spans]
        super().__init__([MappedRegion(gpa, n, gpa, memoryview(b))
                          for (gpa, n), b in zip(spans, self.backing)])


class MemfdGuestMemory(RegionTable):
    """Guest memory in memfds, one per region, ready for SET_MEM_TABLE."""

    def __init__(self, size: int = 0, *, regions: Sequence[tuple[int, int]] = ()) -> None:
        import mmap

        spans = list(regions) or [(0, size)]
        self.fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        mapped = []
        self.vhost_regions: list[MemoryRegion] = []
        for gpa, n in spans:
            fd = os.memfd_create(f"vdev-guest-{gpa:#x}", os.MFD_CLOEXEC)
            os.ftruncate(fd, n)
            mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.fds.append(fd)
            self._maps.append(mm)
            va = FRONTEND_VA_BASE + gpa
            mapped.append(MappedRegion(gpa, n, va, memoryview(mm)))
            self.vhost_regions.append(MemoryRegion(gpa, n, va, 0))
        super().__init__(mapped)

    def guest_to_frontend(self, gpa: int) -> int:
        return FRONTEND_VA_BASE + gpa

    def close(self) -> None:
        for r in self.regions:
            r.data.release()
        for mm in self._maps:
            with contextlib.suppress(BufferError):
                mm.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


@dataclass(frozen=True)
class Buffer:
    """One buffer of a chain to post: ``data`` for the device to read, or
    ``write_len`` bytes for the device to write."""

    data: bytes = b""
    write_len: int = 0

    @property
    def is_write(self) -> bool:
        return self.write_len > 0

    @staticmethod
    def readable(data: bytes) -> Buffer:
        return Buffer(data=data)

    @staticmethod
    def writable(n: int) -> Buffer:
        return Buffer(write_len=n)


@dataclass(frozen=True)
class Used:
    """One used-ring entry, with the bytes the device wrote into the chain's writable buffers."""

    head: int
    length: int
    written: bytes


class _Allocator:
    """First-fit allocator of guest memory for test buffers."""

    def __init__(self, start: int, size: int, align: int = 16) -> None:
        self.free: list[tuple[int, int]] = [(start, size)]
        self.align = align

    def alloc(self, n: int) -> int:
        n = max(self.align, (n + self.align - 1) // self.align * self.align)
        for i, (addr, size) in enumerate(self.free):
            if size >= n:
                self.free[i] = (addr + n, size - n)
                if self.free[i][1] == 0:
                    del self.free[i]
                return addr
        raise MemoryError(f"test guest memory exhausted allocating {n} bytes")

    def release(self, addr: int, n: int) -> None:
        n = max(self.align, (n + self.align - 1) // self.align * self.align)
        self.free.append((addr, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for a, s in self.free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((a, s))
        self.free = merged


class DriverQueue:
    """The driver side of a split virtqueue, laid out in ``mem`` at ``base``.

    Buffers are allocated from ``[data_start, data_start + data_size)``.
    Ring fields are stored and loaded in one access of their width, as a real
    driver does, so a device under test may read them concurrently.
    """

    def __init__(self, mem: RegionTable, size: int, base: int, *, data_start: int, data_size: int,
                 event_idx: bool = False) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + DESC_SIZE * size
        self.used = (self.avail + 4 + 2 * size + 2 + 3) // 4 * 4
        self.end = self.used + 4 + 8 * size + 2
        self.event_idx = event_idx
        self.alloc = _Allocator(data_start, data_size)
        self.free_desc = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, tuple[list[int], list[tuple[int, int, bool]], int | None]] = {}
        mem.write(base, bytes(self.end - base))

    @staticmethod
    def layout_size(size: int) -> int:
        return DESC_SIZE * size + 6 + 2 * size + 4 + 6 + 8 * size

    # -- low level (for malformed-chain tests) ---------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   *, table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + DESC_SIZE * i, _DESC.pack(addr, length, flags, next))

    def publish(self, head: int) -> None:
        """Put ``head`` on the avail ring and bump avail.idx."""
        store_u16(self.mem, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store_u16(self.mem, self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        store_u16(self.mem, self.avail + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        store_u16(self.mem, self.avail + 4 + 2 * self.size, value)

    def set_avail_flags(self, flags: int) -> None:
        store_u16(self.mem, self.avail, flags)

    @property
    def avail_event(self) -> int:
        return load_u16(self.mem, self.used + 4 + 8 * self.size)

    @property
    def used_flags(self) -> int:
        return load_u16(self.mem, self.used)

    @property
    def used_idx(self) -> int:
        return load_u16(self.mem, self.used + 2)

    # -- posting and reaping ---------------------------------------------------------------

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Post a chain (readable buffers must come first); returns its head.

        Raises MemoryError, with nothing allocated, when the ring has too few
        free descriptors or the test memory is exhausted.
        """
        needed = 1 if indirect else len(buffers)
        if needed > len(self.free_desc):
            raise MemoryError(f"no free descriptors: need {needed}, {len(self.free_desc)} free")
        bufs: list[tuple[int, int, bool]] = []
        try:
            return self._add_chain(buffers, bufs, indirect)
        except MemoryError:
            for a, n, _w in bufs:
                self.alloc.release(a, n)
            raise

    def _add_chain(self, buffers: Sequence[Buffer], bufs: list[tuple[int, int, bool]],
                   indirect: bool) -> int:
        for b in buffers:
            n = b.write_len if b.is_write else len(b.data)
            addr = self.alloc.alloc(n)
            if not b.is_write:
                self.mem.write(addr, b.data)
            else:
                self.mem.write(addr, b"\xaa" * n)   # poison, so unwritten bytes show
            bufs.append((addr, n, b.is_write))
        table = None
        if indirect:
            table = self.alloc.alloc(DESC_SIZE * len(bufs))
            for i, (addr, n, w) in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, addr, n, flags, i + 1, table=table)
            descs = [self.free_desc.pop()]
            self.write_desc(descs[0], table, DESC_SIZE * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            descs = self._link(bufs)
        self.chains[descs[0]] = (descs, bufs, table)
        self.publish(descs[0])
        return descs[0]

    def add_chain_at(self, buffers: Sequence[tuple[int, int, bool]]) -> int:
        """Post a chain of buffers the caller placed, each ``(gpa, length, writable)``
        (readable ones first), e.g. one across the boundary of two adjacent
        regions; returns its head.  The memory stays the caller's: `reap`
        frees none of it and reports nothing written (read it with ``mem.read``)."""
        if len(buffers) > len(self.free_desc):
            raise MemoryError(f"no free descriptors: need {len(buffers)}, {len(self.free_desc)} free")
        descs = self._link(buffers)
        self.chains[descs[0]] = (descs, [], None)
        self.publish(descs[0])
        return descs[0]

    def _link(self, bufs: Sequence[tuple[int, int, bool]]) -> list[int]:
        """Free descriptors for ``bufs``, written and chained; returns them, head first."""
        descs = [self.free_desc.pop() for _ in bufs]
        for j, ((addr, n, w), i) in enumerate(zip(bufs, descs)):
            last = j + 1 == len(bufs)
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(i, addr, n, flags, 0 if last else descs[j + 1])
        return descs

    def reap(self) -> list[Used]:
        """Every new used entry, with what the device wrote; frees their buffers."""
        out: list[Used] = []
        while self.last_used != self.used_idx:
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = _USED.unpack(self.mem.read(elem, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            written = b""
            if head in self.chains:
                descs, bufs, table = self.chains.pop(head)
                written = b"".join(self.mem.read(a, n) for a, n, w in bufs if w)
                for a, n, _w in bufs:
                    self.alloc.release(a, n)
                if table is not None:
                    self.alloc.release(table, DESC_SIZE * len(bufs))
                self.free_desc.extend(descs)
            if self.event_idx:
                self.set_used_event(self.last_used)
            out.append(Used(head, length, written))
        return out


class VirtioFrontend:
    """A VMM stand-in: vhost-user front-end, memfd guest memory, driver queues.

    Use `VirtioFrontend.start()` (or `device_pair()`), then `request()`.
    """

    def __init__(self, fe: Frontend, mem: MemfdGuestMemory, queues: list[DriverQueue],
                 kicks: list[int], calls: list[int], features: int, protocol: ProtocolFeature) -> None:
        self.fe = fe
        self.mem = mem
        self.queues = queues
        self.kicks = kicks
        self.calls = calls
        self.features = features
        self.protocol = protocol
        self._waiters: dict[int, asyncio.Event] = {}
        self._loop = asyncio.get_running_loop()
        for i, fd in enumerate(calls):
            self._waiters[i] = asyncio.Event()
            self._loop.add_reader(fd, self._on_call, i, fd)
        self.interrupts = [0] * len(calls)
        self.wakeups = [0] * len(calls)
        self.last_buffers: list[tuple[int, int, bool]] = []

    @classmethod
    async def start(cls, path: str, *, num_queues: int | None = None, queue_size: int = 128,
                    memory_size: int = 16 << 20, regions: Sequence[tuple[int, int]] = (),
                    features: int | None = None, protocol: ProtocolFeature | None = None,
                    enable: bool = True, timeout: float = 10.0) -> VirtioFrontend:
        """Connect to ``path`` and bring the device up the way QEMU does.

        ``features``: the virtio features to accept (default: all offered);
        ``protocol``: protocol features to accept (default: all offered).
        """
        fe = await Frontend.connect(path, timeout=timeout)
        offered, proto = await fe.handshake(want_protocol=protocol)
        n = await fe.get_queue_num() if proto & ProtocolFeature.MQ else 1
        n = n if num_queues is None else min(n, num_queues)
        if proto & ProtocolFeature.BACKEND_REQ:
            await fe.set_backend_req_fd()
        # By default accept everything offered except LOG_ALL, which QEMU acks
        # only while migrating (it turns on dirty logging).
        wanted = ~VHOST_F_LOG_ALL if features is None else features | VHOST_USER_F_PROTOCOL_FEATURES
        acked = offered & wanted
        await fe.set_features(acked)
        mem = MemfdGuestMemory(memory_size, regions=regions)
        await fe.set_mem_table(mem.vhost_regions, mem.fds)
        ring_bytes = DriverQueue.layout_size(queue_size) + 64
        first = mem.regions[0]
        data_start = first.gpa + n * ring_bytes
        per_queue = (first.size - n * ring_bytes) // n // 16 * 16
        queues, kicks, calls = [], [], []
        for i in range(n):
            q = DriverQueue(mem, queue_size, first.gpa + i * ring_bytes,
                            data_start=data_start + i * per_queue, data_size=per_queue,
                            event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX))
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await fe.set_vring_num(i, queue_size)
            await fe.set_vring_base(i, 0)
            await fe.set_vring_addr(VringAddr(i, 0, mem.guest_to_frontend(q.desc),
                                              mem.guest_to_frontend(q.used),
                                              mem.guest_to_frontend(q.avail)))
            await fe.set_vring_kick(i, kick)
            await fe.set_vring_call(i, call)
            if enable and acked & VHOST_USER_F_PROTOCOL_FEATURES:
                await fe.set_vring_enable(i, True)
            queues.append(q)
            kicks.append(kick)
            calls.append(call)
        return cls(fe, mem, queues, kicks, calls, acked, proto)

    def _on_call(self, index: int, fd: int) -> None:
        # ``interrupts`` counts signals from the device (the eventfd counter
        # adds up several writes), ``wakeups`` how often we were woken.
        with contextlib.suppress(BlockingIOError):
            self.interrupts[index] += int.from_bytes(os.read(fd, 8), "little")
        self.wakeups[index] += 1
        self._waiters[index].set()

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def post(self, index: int, buffers: Sequence[Buffer], *, indirect: bool = False,
             kick: bool = True) -> int:
        head = self.queues[index].add_chain(buffers, indirect=indirect)
        #: (gpa, length, writable) of the chain just posted, for tests that look at addresses.
        self.last_buffers = list(self.queues[index].chains[head][1])
        if kick:
            self.kick(index)
        return head

    async def wait_used(self, index: int, count: int = 1, timeout: float = 10.0) -> list[Used]:
        """Wait until ``count`` used entries arrived on queue ``index``; return them."""
        got: list[Used] = []
        q = self.queues[index]
        async with asyncio.timeout(timeout):
            while True:
                got.extend(q.reap())
                if len(got) >= count:
                    return got
                self._waiters[index].clear()
                if q.used_idx != q.last_used:
                    continue
                await self._waiters[index].wait()

    async def request(self, index: int, buffers: Sequence[Buffer], *, indirect: bool = False,
                      timeout: float = 10.0) -> Used:
        """Post one chain, kick, and wait for its completion."""
        head = self.post(index, buffers, indirect=indirect)
        (used,) = await self.wait_used(index, 1, timeout)
        assert used.head == head, (used.head, head)
        return used

    async def restart_ring(self, index: int, base: int) -> None:
        """Start ring ``index`` again at avail index ``base`` on the same memory and
        eventfds, as QEMU does after a stop or a back-end reconnect."""
        q = self.queues[index]
        await self.fe.set_vring_num(index, q.size)
        await self.fe.set_vring_base(index, base)
        await self.fe.set_vring_addr(VringAddr(index, 0, self.mem.guest_to_frontend(q.desc),
                                               self.mem.guest_to_frontend(q.used),
                                               self.mem.guest_to_frontend(q.avail)))
        await self.fe.set_vring_kick(index, self.kicks[index])
        await self.fe.set_vring_call(index, self.calls[index])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            await self.fe.set_vring_enable(index, True)

    async def stop(self) -> list[int]:
        """Stop every ring the way QEMU does (disable, then GET_VRING_BASE)."""
        bases = []
        for i in range(len(self.queues)):
            if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                await self.fe.set_vring_enable(i, False)
            bases.append(await self.fe.get_vring_base(i))
        return bases

    async def close(self) -> None:
        for fd in self.calls:
            self._loop.remove_reader(fd)
        await self.fe.close()
        for fd in self.kicks + self.calls:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kicks, self.calls = [], []
        self.mem.close()


@contextlib.asynccontextmanager
async def device_pair(device: Device, **frontend_options: object) -> AsyncIterator[VirtioFrontend]:
    """Serve ``device`` in this event loop on a temporary socket and connect a `VirtioFrontend`.

    >>> async with device_pair(MyDevice()) as vm:          # doctest: +SKIP
    ...     used = await vm.request(0, [Buffer.writable(64)])
    """
    with tempfile.TemporaryDirectory(prefix="vdev-") as tmp:
        path = os.path.join(tmp, "vhost.sock")
        server = asyncio.get_running_loop().create_task(serve(device, path))
        vm = None
        try:
            vm = await VirtioFrontend.start(path, **frontend_options)  # type: ignore[arg-type]
            yield vm
        finally:
            if vm is not None:
                await vm.close()
            server.cancel()
            await asyncio.wait({server})
