"""The virtio-blk load generator: vhost-user set-up in Python, the request loop in C.

`BlkSession.open()` does what a VMM does before a guest driver can run: the
vhost-user handshake with `vhost_user.frontend.Frontend` (features, protocol
features, MQ, GET_CONFIG for the capacity, SET_MEM_TABLE with a memfd region,
ring addresses, kick and call eventfds, SET_VRING_ENABLE), and it lays out the
split rings and every request's buffers in that guest memory.

`BlkSession.run()` then starts one thread per queue, each blocked in the C
driver (`vd_drv_run` in ``vdev/_native/src/driver.c``; cffi releases the GIL),
which keeps ``iodepth`` requests in flight until a deadline and checks every
completion.  Meanwhile this thread takes a snapshot of every queue's live
latency histogram each ``interval`` (100 ms) and keeps the difference, which
gives the latency-over-time picture without stopping or slowing the workers.

Everything per request happens in C; everything per run happens here
(style.md §L10).  A failure found by the driver comes back as a small code and
is turned into one exception, `BackEndFault`, by `_raise_for()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from vhost_user.frontend import Frontend
from vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    VringAddr,
)

from .._native import ffi, lib
from ..errors import VdevError
from ..histogram import LatencyHistogram, bucket_bounds
from ..testing import MemfdGuestMemory
from ..uapi.virtio import VirtioFeature

SECTOR = 512
#: virtio 1.2 §5.2.3 feature bits the driver looks at.
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_MQ = 1 << 12

RW_MODES: dict[str, int] = {
    "read": lib.VD_DRV_READ,
    "write": lib.VD_DRV_WRITE,
    "randread": lib.VD_DRV_RANDREAD,
    "randwrite": lib.VD_DRV_RANDWRITE,
    "randrw": lib.VD_DRV_RANDRW,
}
WRITING = {"write", "randwrite", "randrw"}

STATUS_NAMES = {0: "OK", 1: "IOERR", 2: "UNSUPP", 0xFF: "never written"}

#: Guest-physical base of the one memory region: not 0, so a back end that
#: takes a guest address for an offset fails loudly.
GUEST_BASE = 1 << 32
PAGE = 4096

#: The workers' code → what it means (driver.h).
_CODES = {
    lib.VD_DRV_E_STATUS: "bad status",
    lib.VD_DRV_E_LEN: "wrong used length",
    lib.VD_DRV_E_HEAD: "used id is not a head the driver posted",
    lib.VD_DRV_E_DUP: "head returned twice (not in flight)",
    lib.VD_DRV_E_USED_IDX: "used.idx ran ahead of the requests in flight",
    lib.VD_DRV_E_VERIFY: "data differs from the last write",
    lib.VD_DRV_E_STALL: "no completion",
}


class BenchError(VdevError):
    """The run could not be set up (a value the back end cannot serve, a
    refused handshake); ``value`` names what."""

    def __init__(self, message: str, value: object = None) -> None:
        self.message = message
        self.value = value
        super().__init__(message)


class BackEndFault(VdevError):
    """The back end under test broke the virtio-blk contract; found by the driver.

    Attributes: ``code`` (a ``VD_DRV_E_*``), ``queue``, ``head``, ``sector``,
    ``status`` (the status byte, -1 if not read), ``op`` ("read"/"write"),
    ``used_len`` / ``expected_len``, and for verify errors ``expected_seq`` /
    ``found_seq`` / ``offset``.
    """

    def __init__(self, code: int, queue: int, err: Any, bs: int) -> None:
        self.code = code
        self.queue = queue
        self.head = int(err.head)
        self.sector = int(err.sector)
        self.status = int(err.status)
        self.op = "read" if err.op == 0 else "write"
        self.used_len = int(err.used_len)
        self.expected_len = int(err.expected_len)
        self.expected_seq = int(err.expected_seq)
        self.found_seq = int(err.found_seq)
        self.offset = int(err.offset)
        self.inflight = int(err.inflight)
        self.bs = bs
        super().__init__(str(self))

    def __str__(self) -> str:
        what = _CODES.get(self.code, f"driver error {self.code}")
        req = f"{self.op} of {self.bs} bytes at sector {self.sector}"
        q = f"queue {self.queue}"
        if self.code == lib.VD_DRV_E_STATUS:
            name = STATUS_NAMES.get(self.status, "unknown")
            return f"{q}: bad status {self.status} ({name}) for head {self.head} ({req})"
        if self.code == lib.VD_DRV_E_LEN:
            return (f"{q}: used length {self.used_len}, expected {self.expected_len}, "
                    f"for head {self.head} ({req})")
        if self.code == lib.VD_DRV_E_HEAD:
            return f"{q}: {what}: id {self.head} (used length {self.used_len})"
        if self.code == lib.VD_DRV_E_DUP:
            return f"{q}: {what}: head {self.head} (last {req})"
        if self.code == lib.VD_DRV_E_USED_IDX:
            return (f"{q}: {what}: used.idx {self.head} is {self.used_len} entries ahead with "
                    f"{self.inflight} in flight")
        if self.code == lib.VD_DRV_E_VERIFY:
            found = f"write #{self.found_seq}" if self.found_seq else "no stamp of ours"
            return (f"{q}: {what} at byte {self.offset} of sector {self.sector} (head {self.head}): "
                    f"expected write #{self.expected_seq}, found {found}")
        if self.code == lib.VD_DRV_E_STALL:
            return (f"{q}: {what} with {self.inflight} request(s) in flight; oldest is head "
                    f"{self.head} ({req})")
        return f"{q}: {what}"


class RingBaseMismatch(VdevError):
    """After a drained run, GET_VRING_BASE did not answer the driver's avail.idx (the
    back end lost track of what it consumed), or used.idx differs from it (it
    returned more than it was given, after the driver stopped looking)."""

    def __init__(self, queue: int, ours: int, theirs: int, what: str = "GET_VRING_BASE answered") -> None:
        self.queue, self.ours, self.theirs, self.what = queue, ours, theirs, what
        super().__init__(str(self))

    def __str__(self) -> str:
        return (f"queue {self.queue}: {self.what} {self.theirs} after the ring stopped, but the driver "
                f"made {self.ours} requests available and got every one back once")


def _raise_for(rc: int, q: Any, bs: int) -> None:
    """The one place where a driver code becomes an exception."""
    if rc == lib.VD_DRV_OK:
        return
    if rc == lib.VD_DRV_E_SYS:
        errno = int(q.error.sys_errno)
        raise OSError(errno, f"queue {q.index}: {os.strerror(errno)}")
    if rc == lib.VD_DRV_E_PARAM:
        raise BenchError(f"queue {q.index}: the driver refused its queue description "
                         f"(ring not idle, or a layout bug)", value=int(q.index))
    raise BackEndFault(rc, int(q.index), q.error, bs)


@dataclass(frozen=True)
class Job:
    """What one queue runs."""

    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 1
    rwmix_read: int = 50

    def describe(self) -> str:
        mix = f" {self.rwmix_read}% reads" if self.rw == "randrw" else ""
        return f"{self.rw} bs={format_size(self.bs)} iodepth={self.iodepth}{mix}"


def format_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def proc_cpu_ns(pid: int | None) -> int | None:
    """utime + stime of process ``pid`` (all its threads), ns; None if unreadable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def proc_sleeps(pid: int | None) -> int | None:
    """Voluntary context switches of process ``pid``, all threads summed: how often
    it went to sleep waiting for work (a kick, a completion); None if unreadable."""
    if pid is None:
        return None
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                    open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
    except OSError:
        return None
    return total


def _proc_sample(pid: int | None) -> tuple[int | None, int | None]:
    return proc_cpu_ns(pid), proc_sleeps(pid)


# ---- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Latencies of the completions seen between two snapshots (times in s from the
    window's start); ``buckets`` are (histogram bucket index, count)."""

    start: float
    end: float
    count: int
    min_ns: int
    max_ns: int
    buckets: tuple[tuple[int, int], ...]

    def percentile(self, p: float) -> int:
        return sparse_percentile(self.buckets, self.count, p, self.max_ns)


def sparse_percentile(buckets: Sequence[tuple[int, int]], total: int, p: float, max_ns: int) -> int:
    """Like `LatencyHistogram.percentile`, over (index, count) pairs."""
    if total == 0:
        return 0
    want = max(1, -(-total * p // 100)) if p < 100 else total
    seen = 0
    for index, n in buckets:
        seen += n
        if seen >= want:
            return min(bucket_bounds(index)[1], max_ns)
    return max_ns


@dataclass
class QueueResult:
    index: int
    job: Job
    requests: int
    reads: int
    writes: int
    bytes: int
    kicks: int
    wakeups: int
    verified: int
    submitted: int
    completed: int
    cpu_ns: int
    seconds: float
    histogram: LatencyHistogram

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20) if self.seconds > 0 else 0.0


@dataclass
class RunResult:
    queues: list[QueueResult]
    seconds: float                       # the measured window actually run
    intervals: list[Interval]
    interval: float
    backend_cpu_ns: int | None = None    # back end's CPU over [cpu_t0, cpu_t1]
    backend_cpu_seconds: float = 0.0
    backend_sleeps: int | None = None    # back end's voluntary context switches, same span
    fault: BaseException | None = None
    interrupted: bool = False
    ring_bases: dict[int, tuple[int, int]] = field(default_factory=dict)   # queue -> (ours, theirs)

    @property
    def requests(self) -> int:
        return sum(q.requests for q in self.queues)

    @property
    def histogram(self) -> LatencyHistogram:
        return LatencyHistogram.merge(q.histogram for q in self.queues)

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return sum(q.bytes for q in self.queues) / self.seconds / (1 << 20) if self.seconds > 0 else 0.0

    def per_request(self, total: float) -> float | None:
        return total / self.requests if self.requests else None

    @property
    def kicks_per_request(self) -> float | None:
        return self.per_request(sum(q.kicks for q in self.queues))

    @property
    def wakeups_per_request(self) -> float | None:
        return self.per_request(sum(q.wakeups for q in self.queues))

    @property
    def driver_cpu_us(self) -> float | None:
        v = self.per_request(sum(q.cpu_ns for q in self.queues))
        return None if v is None else v / 1000

    @property
    def backend_cpu_us(self) -> float | None:
        """Back-end CPU per request: its CPU time over the sampled span, divided by
        the requests completed in that span (IOPS x span)."""
        if self.backend_cpu_ns is None or not self.backend_cpu_seconds or not self.iops:
            return None
        return self.backend_cpu_ns / (self.iops * self.backend_cpu_seconds) / 1000

    @property
    def backend_sleeps_per_request(self) -> float | None:
        """How often the back end slept (voluntary context switches) per request, over
        the span its CPU was sampled: a back end that sleeps less pays fewer wake-ups."""
        if self.backend_sleeps is None or not self.backend_cpu_seconds or not self.iops:
            return None
        return self.backend_sleeps / (self.iops * self.backend_cpu_seconds)


# ---- the session ------------------------------------------------------------------------


@dataclass
class _QueueLayout:
    ring: int                # gpa of the descriptor table
    avail: int
    used: int
    slots: list[tuple[int, int, int]]   # (header, data, status) gpa per slot
    depth: int
    bs: int
    kick: int = -1
    call: int = -1


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class BlkSession:
    """One connection to a vhost-user-blk back end, ready to run workloads.

    Use `BlkSession.open()`, `run()` (as often as needed) and `close()`, or
    ``with BlkSession.open(...) as s``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fe: Frontend, mem: MemfdGuestMemory,
                 layouts: list[_QueueLayout], queue_size: int, capacity: int, features: int,
                 protocol: ProtocolFeature) -> None:
        self._loop = loop
        self.fe = fe
        self.mem = mem
        self.layouts = layouts
        self.queue_size = queue_size
        self.capacity = capacity
        self.features = features
        self.protocol = protocol
        self.event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        region = mem.regions[0]
        self._buf = ffi.from_buffer(region.data)
        self._host = ffi.cast("uint8_t *", self._buf)
        self._gpa0 = region.gpa
        self._shadows: dict[tuple[int, int, int, int], Any] = {}
        self._stopped = False

    # -- set-up ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, jobs: Sequence[Job | None], *, queue_size: int | None = None,
             event_idx: bool = True, timeout: float = 10.0) -> BlkSession:
        """Connect to ``path`` and bring up ``len(jobs)`` queues, with buffers for each job
        (a later `run` may use smaller ones).  Raises BenchError, OSError, ProtocolError."""
        depth = max((j.iodepth for j in jobs if j), default=1)
        if queue_size is None:
            queue_size = 128
            while queue_size < 3 * depth:
                queue_size *= 2
        for j in jobs:
            if j is not None and 3 * j.iodepth > queue_size:
                raise BenchError(f"--iodepth {j.iodepth}: needs a queue of at least {3 * j.iodepth} "
                                 f"descriptors (3 per request), --queue-size is {queue_size}",
                                 value=j.iodepth)
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(cls._open(loop, path, list(jobs), queue_size, event_idx, timeout))
        except BaseException:
            loop.close()
            raise

    @classmethod
    async def _open(cls, loop: asyncio.AbstractEventLoop, path: str, jobs: list[Job | None],
                    queue_size: int, event_idx: bool, timeout: float) -> BlkSession:
        fe = await Frontend.connect(path, timeout=timeout)
        mem: MemfdGuestMemory | None = None
        fds: list[int] = []
        try:
            offered, proto = await fe.handshake(
                want_protocol=ProtocolFeature.MQ | ProtocolFeature.CONFIG | ProtocolFeature.REPLY_ACK)
            nq = await fe.get_queue_num() if proto & ProtocolFeature.MQ else 1
            if len(jobs) > nq:
                raise BenchError(f"--queues {len(jobs)}: the back end has {nq} queue(s)", value=len(jobs))
            if not offered & VirtioFeature.VERSION_1:
                raise BenchError("the back end does not offer VIRTIO_F_VERSION_1", value=hex(offered))
            if not proto & ProtocolFeature.CONFIG:
                raise BenchError("the back end does not offer VHOST_USER_PROTOCOL_F_CONFIG: "
                                 "cannot read the disk's capacity", value=hex(int(proto)))
            # virtio 1.2 §5.2.4: le64 capacity in 512-byte sectors at offset 0
            capacity = struct.unpack("<Q", (await fe.get_config(0, 8))[:8])[0] * SECTOR
            wanted = (VirtioFeature.VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_BLK_F_RO
                      | (VirtioFeature.RING_EVENT_IDX if event_idx else 0)
                      | (VIRTIO_BLK_F_MQ if len(jobs) > 1 else 0))
            acked = offered & wanted
            if acked & VIRTIO_BLK_F_RO:
                for j in jobs:
                    if j is not None and j.rw in WRITING:
                        raise BenchError(f"--rw {j.rw}: the disk is read-only (VIRTIO_BLK_F_RO)", value=j.rw)
            await fe.set_features(acked)

            # Layout: per queue a ring area (desc, avail, used), then per slot a
            # 32-byte header+status cell, then the data buffers, page aligned.
            layouts: list[_QueueLayout] = []
            pos = GUEST_BASE
            for j in jobs:
                desc = pos
                avail = desc + 16 * queue_size
                used = _align(avail + 6 + 2 * queue_size, 4)
                pos = _align(used + 6 + 8 * queue_size, PAGE)
                d = j.iodepth if j else 1
                bs = j.bs if j else SECTOR
                cells = pos
                pos = _align(cells + 32 * d, PAGE)
                slots = []
                for s in range(d):
                    slots.append((cells + 32 * s, pos, cells + 32 * s + 16))
                    pos += _align(bs, PAGE)
                layouts.append(_QueueLayout(desc, avail, used, slots, d, bs))
            size = _align(pos - GUEST_BASE, 2 << 20)
            mem = MemfdGuestMemory(regions=[(GUEST_BASE, size)])
            await fe.set_mem_table(mem.vhost_regions, mem.fds)
            for i, lay in enumerate(layouts):
                lay.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                fds.append(lay.kick)
                lay.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                fds.append(lay.call)
                await fe.set_vring_num(i, queue_size)
                await fe.set_vring_base(i, 0)
                await fe.set_vring_addr(VringAddr(i, 0, mem.guest_to_frontend(lay.ring),
                                                  mem.guest_to_frontend(lay.used),
                                                  mem.guest_to_frontend(lay.avail)))
                await fe.set_vring_kick(i, lay.kick)
                await fe.set_vring_call(i, lay.call)
                if acked & VHOST_USER_F_PROTOCOL_FEATURES:
                    await fe.set_vring_enable(i, True)
            return cls(loop, fe, mem, layouts, queue_size, capacity, acked, proto)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if mem is not None:
                mem.close()
            await fe.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------------

    @property
    def verify_state(self) -> dict[tuple[int, int, int, int], Any]:
        """What ``verify`` knows was written: per queue slice, the stamp each block holds.

        Hand it to a later session on the same disk (``later.verify_state =
        earlier.verify_state``) and that session goes on checking what the
        earlier ones wrote: data must survive a reconnection (benchmarks/soak_blk.py).
        """
        return self._shadows

    @verify_state.setter
    def verify_state(self, state: dict[tuple[int, int, int, int], Any]) -> None:
        self._shadows = state

    def _shadow(self, queue: int, first: int, n: int, bs: int) -> Any:
        """The verify shadow of a queue's slice; kept across runs on this session."""
        key = (queue, first, n, bs)
        if key not in self._shadows:
            self._shadows[key] = ffi.new("uint32_t[]", n)
        return self._shadows[key]

    def run(self, jobs: Sequence[Job | None], *, seconds: float, warmup: float = 0.0,
            verify: bool = False, span: int | None = None, busy_poll: bool = False, seed: int = 1,
            interval: float = 0.1, stall: float = 10.0, backend_pid: int | None = None,
            on_tick: Callable[[float, RunResult], None] | None = None) -> RunResult:
        """Run ``jobs[i]`` on queue i (None: idle) for ``seconds`` after ``warmup``.

        ``span``: bytes of the disk addressed, from offset 0 (default: all of it).
        With ``verify`` each queue owns a disjoint slice of it.  ``on_tick(elapsed,
        partial)`` is called about once a second from this thread.

        Returns the result; a back-end fault or an interrupt is in ``result.fault``
        / ``result.interrupted`` with the figures gathered up to then.
        """
        if len(jobs) > len(self.layouts):
            raise BenchError(f"{len(jobs)} jobs for {len(self.layouts)} queues", value=len(jobs))
        span = self.capacity if span is None else min(span, self.capacity)
        active = [(i, j) for i, j in enumerate(jobs) if j is not None]
        if not active:
            raise BenchError("no queue has a job", value=list(jobs))
        queues: list[tuple[int, Job, Any, Any]] = []
        t0 = time.monotonic_ns() + 20_000_000
        t_measure = t0 + int(warmup * 1e9)
        t_stop = t_measure + int(seconds * 1e9)
        for n_active, (i, job) in enumerate(active):
            lay = self.layouts[i]
            if job.iodepth > lay.depth or job.bs > lay.bs:
                raise BenchError(f"queue {i}: {job.describe()} does not fit the buffers laid out "
                                 f"(iodepth {lay.depth}, bs {lay.bs})", value=job)
            nblocks = span // job.bs
            if nblocks == 0:
                raise BenchError(f"--bs {job.bs}: larger than the disk ({span} bytes)", value=job.bs)
            q = ffi.new("struct vd_drv_queue *")
            slots = ffi.new("struct vd_drv_slot[]", job.iodepth)
            for s in range(job.iodepth):
                h, d, st = lay.slots[s]
                slots[s].hdr_gpa, slots[s].data_gpa, slots[s].status_gpa = h, d, st
                slots[s].hdr = self._host + (h - self._gpa0)
                slots[s].data = self._host + (d - self._gpa0)
                slots[s].status = self._host + (st - self._gpa0)
            q.index = i
            q.size = self.queue_size
            q.desc = self._host + (lay.ring - self._gpa0)
            q.avail = self._host + (lay.avail - self._gpa0)
            q.used = self._host + (lay.used - self._gpa0)
            q.kick_fd, q.call_fd = lay.kick, lay.call
            q.event_idx = int(self.event_idx)
            q.busy_poll = int(busy_poll)
            q.rw = RW_MODES[job.rw]
            q.rwmix_read = job.rwmix_read
            q.bs = job.bs
            q.iodepth = job.iodepth
            shadow = None
            if verify:
                k = len(active)
                first, last = nblocks * n_active // k, nblocks * (n_active + 1) // k
                if last - first <= job.iodepth:
                    raise BenchError(f"--verify: queue {i} gets {last - first} blocks of {job.bs} bytes, "
                                     f"fewer than --iodepth {job.iodepth} + 1: use a larger --size",
                                     value=last - first)
                q.first_block, q.nblocks, q.start_block = first, last - first, 0
                shadow = self._shadow(i, first, last - first, job.bs)
                q.shadow = shadow
                q.verify = 1
            else:
                q.first_block, q.nblocks = 0, nblocks
                q.start_block = nblocks * n_active // len(active)
            q.seed = (seed * 0x9E3779B97F4A7C15 + i) & 0xFFFF_FFFF_FFFF_FFFF
            q.slots = slots
            q.t_measure, q.t_stop = t_measure, t_stop
            q.stall_ns = int(stall * 1e9)
            lib.vd_hist_init(ffi.addressof(q[0], "hist"))
            queues.append((i, job, q, (slots, shadow)))

        rcs: dict[int, int] = {}

        def worker(i: int, q: Any) -> None:
            rcs[i] = lib.vd_drv_run(q)

        threads = [threading.Thread(target=worker, args=(i, q), name=f"vdev-bench-q{i}", daemon=True)
                   for i, _j, q, _keep in queues]
        prev = {i: ffi.new("struct vd_hist *") for i, *_ in queues}
        delta = ffi.new("struct vd_hist *")
        merged = ffi.new("struct vd_hist *")
        idx_buf = ffi.new("uint32_t[]", lib.VD_HIST_BUCKETS)
        cnt_buf = ffi.new("uint64_t[]", lib.VD_HIST_BUCKETS)
        intervals: list[Interval] = []
        result = RunResult([], 0.0, intervals, interval)
        cpu_start: tuple[int, tuple[int | None, int | None]] | None = None
        cpu_end: tuple[int, tuple[int | None, int | None]] | None = None
        last_sample = t_measure
        interrupted = False

        def sample(now: int) -> None:
            nonlocal last_sample
            lib.vd_hist_init(merged)
            for i, _j, q, _k in queues:
                lib.vd_drv_hist_delta(ffi.addressof(q[0], "hist"), prev[i], delta)
                lib.vd_drv_hist_add(merged, delta)
            end = min(now, t_stop)
            if merged.total or end > last_sample:
                n = lib.vd_drv_hist_nonzero(merged, idx_buf, cnt_buf, lib.VD_HIST_BUCKETS)
                buckets = tuple((int(idx_buf[k]), int(cnt_buf[k])) for k in range(n))
                intervals.append(Interval((last_sample - t_measure) / 1e9, (end - t_measure) / 1e9,
                                          int(merged.total), int(merged.min_ns) if merged.total else 0,
                                          int(merged.max_ns), buckets))
            last_sample = max(last_sample, end)

        for t in threads:
            t.start()
        try:
            step = int(interval * 1e9)
            next_tick = t_measure
            next_report = t_measure + 1_000_000_000
            while True:
                alive = any(t.is_alive() for t in threads)
                failed = any(rc != lib.VD_DRV_OK for rc in rcs.values())
                if failed:
                    for _i, _j, q, _k in queues:
                        lib.vd_drv_stop(q)
                if not alive:
                    break
                now = time.monotonic_ns()
                if now < next_tick:
                    time.sleep(min((next_tick - now) / 1e9, 0.05))
                    continue
                if cpu_start is None:
                    cpu_start = (now, _proc_sample(backend_pid))
                elif now <= t_stop + step:
                    sample(now)
                    if now >= t_stop and cpu_end is None:
                        cpu_end = (now, _proc_sample(backend_pid))
                next_tick += step
                if on_tick is not None and now >= next_report and now < t_stop:
                    next_report += 1_000_000_000
                    on_tick((now - t_measure) / 1e9, self._partial(queues, now, t_measure, result))
        except KeyboardInterrupt:
            interrupted = True
            for _i, _j, q, _k in queues:
                lib.vd_drv_stop(q)
        finally:
            for t in threads:
                while t.is_alive():
                    try:
                        t.join()
                    except KeyboardInterrupt:
                        interrupted = True
                        for _i, _j, q, _k in queues:
                            lib.vd_drv_stop(q)
        end_now = time.monotonic_ns()
        if cpu_start is not None and cpu_end is None:
            cpu_end = (end_now, _proc_sample(backend_pid))
        sample(end_now)

        window_end = t_measure
        for i, job, q, _keep in queues:
            st = ffi.new("struct vd_drv_stats *")
            lib.vd_drv_stats_read(q, st)
            end = int(st.window_end) or t_measure
            window_end = max(window_end, end)
            secs = max(0, end - t_measure) / 1e9
            result.queues.append(QueueResult(
                i, job, int(st.requests), int(st.reads), int(st.writes), int(st.bytes), int(st.kicks),
                int(st.wakeups), int(st.verified), int(st.submitted), int(st.completed), int(st.cpu_ns),
                secs, LatencyHistogram.snapshot(ffi.addressof(q[0], "hist"))))
        result.seconds = (window_end - t_measure) / 1e9
        result.interrupted = interrupted
        if cpu_start and cpu_end:
            (c0, s0), (c1, s1) = cpu_start[1], cpu_end[1]
            if c0 is not None and c1 is not None:
                result.backend_cpu_ns = c1 - c0
                result.backend_cpu_seconds = (min(cpu_end[0], window_end) - cpu_start[0]) / 1e9
                if s0 is not None and s1 is not None:
                    result.backend_sleeps = s1 - s0
        for i, job, q, _keep in queues:
            try:
                _raise_for(rcs.get(i, lib.VD_DRV_OK), q, job.bs)
            except (BackEndFault, OSError, BenchError) as exc:
                if result.fault is None:
                    result.fault = exc
        return result

    @staticmethod
    def _partial(queues: list[tuple[int, Job, Any, Any]], now: int, t_measure: int,
                 base: RunResult) -> RunResult:
        """Figures so far, for a progress line (no histograms)."""
        st = ffi.new("struct vd_drv_stats *")
        out = RunResult([], max(1, now - t_measure) / 1e9, base.intervals, base.interval)
        for i, job, q, _keep in queues:
            lib.vd_drv_stats_read(q, st)
            out.queues.append(QueueResult(i, job, int(st.requests), int(st.reads), int(st.writes),
                                          int(st.bytes), int(st.kicks), int(st.wakeups), int(st.verified),
                                          int(st.submitted), int(st.completed), int(st.cpu_ns),
                                          out.seconds, LatencyHistogram.empty()))
        return out

    # -- tear-down ----------------------------------------------------------------------

    def stop_rings(self, result: RunResult | None = None) -> dict[int, tuple[int, int]]:
        """Stop every ring the way QEMU does (disable, GET_VRING_BASE); returns
        queue -> (driver's avail.idx, back end's base).  A back end that consumed
        all it was given answers the driver's avail.idx; RingBaseMismatch if not."""
        used: dict[int, int] = {}

        async def stop() -> dict[int, tuple[int, int]]:
            out = {}
            for i, lay in enumerate(self.layouts):
                ours = int.from_bytes(self.mem.read(lay.avail + 2, 2), "little")
                if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                    await self.fe.set_vring_enable(i, False)
                out[i] = (ours, await self.fe.get_vring_base(i))
                # the ring is stopped: nothing may move used.idx any more
                used[i] = int.from_bytes(self.mem.read(lay.used + 2, 2), "little")
            return out
        self._stopped = True
        bases = self._loop.run_until_complete(asyncio.wait_for(stop(), 10))
        if result is not None:
            result.ring_bases = bases
        for i, (ours, theirs) in bases.items():
            if ours != theirs:
                raise RingBaseMismatch(i, ours, theirs)
            if used[i] != ours:
                raise RingBaseMismatch(i, ours, used[i], what="used.idx is")
        return bases

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(asyncio.wait_for(self.fe.close(), 5))
        for lay in self.layouts:
            for fd in (lay.kick, lay.call):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            lay.kick = lay.call = -1
        del self._host
        ffi.release(self._buf)     # the mapping can only be closed once nothing exports it
        self.mem.close()
        self._loop.close()
