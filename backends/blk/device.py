"""virtio-blk (virtio 1.2 §5.2) over a swappable `Storage`.

A request goes through three steps, as in Firecracker's block device:

1. `parse_request` — pure: reads the 16-byte header from the chain, finds
   the data buffers and the status byte, and checks everything that can be
   checked without storage (type, alignment, range against the capacity,
   size limits, segment counts, read-only).  It does no I/O and raises
   `RequestError` carrying the status to answer.
2. `BlkDevice._execute` — the storage call, asynchronous, one task per
   request so a queue keeps many requests in flight.
3. completion — the status byte is written and the chain returned with the
   number of bytes written into it (data plus the status byte).

Every chain that has a writable byte gets a status, whatever failed: a
malformed request is answered IOERR or UNSUPP and never reaches storage, a
storage failure is answered IOERR (logged once per distinct cause), and the
descriptor always goes back to the guest.

The storage can be replaced while the disk runs (`swap_storage`): new
requests wait, requests in flight finish on the old storage, the new one
takes over, and a size change reaches the guest as a config-change
interrupt.

Two data paths serve the queues (``dataplane``): ``native`` — a C worker
per queue that parses and executes requests itself (`backends.blk.native`,
``vdev/_native/src/blk.c``), for the storage it can run (null, mem, file);
and ``python`` — `process_queue` below, on the event loop, for any
storage.  ``auto`` (the default) takes the native path whenever the
storage allows it, so a swap from ``file:`` to ``nbd://`` and back changes
path under the running disk.  Both give the same answers to the same
requests; the Python one is the reference.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vdev._native import ffi
from vdev.device import Device, VirtQueue
from vdev.engine import NativeEngine, RingSpec
from vdev.errors import DeviceError, GuestError, Unsupported
from vdev.memory import GuestMemory
from vdev.queue import Descriptor, DescriptorChain
from vdev.uapi.virtio import DeviceId

from .dirty import DirtyBitmap
from .native import NATIVE_STAT_NAMES, NativeBlkEngine, NativeBlkStorage
from .storage.base import Storage

log = logging.getLogger("backends.blk")

SECTOR = 512
#: How the queues are served: see the module docstring.
DATAPLANES = ("auto", "native", "python")
HEADER = struct.Struct("<IIQ")          # type, ioprio (reserved), sector
SEGMENT = struct.Struct("<QII")         # sector, num_sectors, flags
ID_BYTES = 20


class BlkFeature(enum.IntFlag):
    """VIRTIO_BLK_F_* (virtio 1.2 §5.2.3) as masks."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class ReqType(enum.IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


#: Bound on pause/swap waiting for requests when the storage has no timeout of its own.
QUIESCE_TIMEOUT = 30.0

WRITE_ZEROES_F_UNMAP = 1
#: The legacy BARRIER flag in bit 31 of the type; masked off as QEMU does.
TYPE_BARRIER = 1 << 31

#: Largest single segment (config size_max), and the most segments per request.
SIZE_MAX = 1 << 20
#: Largest data transfer of one read or write request.
MAX_TRANSFER = 32 << 20
#: Sectors per discard/write-zeroes segment: keeps one segment's byte count below 4 GiB.
MAX_DISCARD_SECTORS = (1 << 23) - 1
MAX_DISCARD_SEG = 16
MAX_WRITE_ZEROES_SECTORS = MAX_DISCARD_SECTORS
MAX_WRITE_ZEROES_SEG = 16

#: Config space layout (virtio 1.2 §5.2.4), up to write_zeroes_may_unmap + padding: 60 bytes.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
WCE_OFFSET = 32


class RequestError(Exception):
    """A request that must be answered with ``status`` without touching storage.

    ``status_view`` is where that status goes (set by `parse_request`).
    """

    def __init__(self, status: Status, reason: str) -> None:
        self.status = status
        self.reason = reason
        self.status_view: memoryview | None = None
        super().__init__(reason)


@dataclass
class BlkRequest:
    """A parsed request: everything `_execute` needs, nothing it must still check."""

    type: ReqType
    sector: int
    data: list[memoryview] = field(default_factory=list)   # IN: to fill, OUT: to write
    segments: list[tuple[int, int, int]] = field(default_factory=list)   # DISCARD/WZ

    @property
    def data_len(self) -> int:
        return sum(len(v) for v in self.data)


@dataclass(frozen=True)
class BlkLimits:
    """What the device promises in config space; parse_request enforces it."""

    capacity: int          # bytes
    read_only: bool
    seg_max: int
    discard: bool
    write_zeroes: bool


def parse_request(chain: DescriptorChain, mem: GuestMemory, limits: BlkLimits) -> tuple[BlkRequest, memoryview]:
    """Parse ``chain`` into a request and the view of its status byte.

    Raises:
        GuestError: no writable byte for the status (the chain cannot be answered).
        RequestError: the request is answered with the error's status.
    """
    writer = chain.writer(mem)
    if writer.available < 1:
        raise GuestError("virtio-blk request without a writable status byte", head=chain.head)
    data_in = writer.views(writer.available - 1)
    status = writer.views(1)[0]
    try:
        return _parse_body(chain, mem, limits, data_in), status
    except RequestError as exc:
        exc.status_view = status
        raise


def _parse_body(chain: DescriptorChain, mem: GuestMemory, limits: BlkLimits,
                data_in: list[memoryview]) -> BlkRequest:
    reader = chain.reader(mem)
    if reader.available < HEADER.size:
        raise RequestError(Status.IOERR, f"request header is {reader.available} bytes, needs 16")
    rtype, _ioprio, sector = reader.read_struct(HEADER)
    rtype &= ~TYPE_BARRIER
    try:
        kind = ReqType(rtype)
    except ValueError:
        raise RequestError(Status.UNSUPP, f"unknown request type {rtype}") from None
    in_len = sum(len(v) for v in data_in)

    if kind in (ReqType.IN, ReqType.OUT):
        if kind is ReqType.IN:
            data, n = data_in, in_len
        else:
            if limits.read_only:
                raise RequestError(Status.IOERR, f"write to a read-only disk at sector {sector}")
            data = reader.rest()
            n = sum(len(v) for v in data)
        if n % SECTOR:
            raise RequestError(Status.IOERR, f"{kind.name} length {n} is not a multiple of {SECTOR}")
        if n > MAX_TRANSFER:
            raise RequestError(Status.IOERR, f"{kind.name} of {n} bytes exceeds {MAX_TRANSFER}")
        _check_range(sector, n // SECTOR, limits, kind)
        return BlkRequest(kind, sector, data)
    if kind is ReqType.FLUSH:
        return BlkRequest(kind, 0)
    if kind is ReqType.GET_ID:
        return BlkRequest(kind, 0, data_in)
    if kind in (ReqType.DISCARD, ReqType.WRITE_ZEROES):
        enabled = limits.discard if kind is ReqType.DISCARD else limits.write_zeroes
        if not enabled:
            raise RequestError(Status.UNSUPP, f"{kind.name} not offered")
        if limits.read_only:
            raise RequestError(Status.IOERR, f"{kind.name} on a read-only disk")
        raw = reader.read(reader.available)
        max_seg = MAX_DISCARD_SEG if kind is ReqType.DISCARD else MAX_WRITE_ZEROES_SEG
        if not raw or len(raw) % SEGMENT.size:
            raise RequestError(Status.IOERR, f"{kind.name} payload of {len(raw)} bytes is not "
                                             f"whole 16-byte segments")
        if len(raw) // SEGMENT.size > max_seg:
            raise RequestError(Status.IOERR, f"{kind.name} with {len(raw) // 16} segments, max {max_seg}")
        segments = []
        for off in range(0, len(raw), SEGMENT.size):
            seg_sector, nsect, flags = SEGMENT.unpack_from(raw, off)
            allowed = WRITE_ZEROES_F_UNMAP if kind is ReqType.WRITE_ZEROES else 0
            if flags & ~allowed:
                # spec §5.2.6.2: unknown flags (or UNMAP on a discard) → UNSUPP
                raise RequestError(Status.UNSUPP, f"{kind.name} segment flags {flags:#x}")
            if nsect > MAX_DISCARD_SECTORS:
                raise RequestError(Status.IOERR, f"{kind.name} of {nsect} sectors exceeds "
                                                 f"{MAX_DISCARD_SECTORS}")
            _check_range(seg_sector, nsect, limits, kind)
            segments.append((seg_sector, nsect, flags))
        return BlkRequest(kind, 0, segments=segments)
    raise RequestError(Status.UNSUPP, f"request type {kind.name} not supported")


def _check_range(sector: int, nsect: int, limits: BlkLimits, kind: ReqType) -> None:
    if (sector + nsect) * SECTOR > limits.capacity:
        raise RequestError(Status.IOERR, f"{kind.name} of sectors {sector}+{nsect} beyond capacity "
                                         f"{limits.capacity // SECTOR}")


#: ``struct vd_engine_stats.by_type`` slot of each request type (``VD_BLK_STAT_*``).
_SLOTS = {ReqType[name]: slot for slot, name in enumerate(NATIVE_STAT_NAMES) if name in ReqType.__members__}
_SLOT_REJECTED = NATIVE_STAT_NAMES.index("rejected")


class BlkDevice(Device):
    """The block device.  ``storage`` is any `Storage`; it can be swapped live."""

    device_id = DeviceId.BLOCK
    name = "blk"
    supports_inflight = True
    request_types = NATIVE_STAT_NAMES
    #: The data path when none is given (the test suite runs every blk test on each).
    default_dataplane = "auto"

    def __init__(self, storage: Storage, *, read_only: bool = False, num_queues: int = 1,
                 queue_size: int = 256, serial: str | None = None, dataplane: str | None = None,
                 poll_us: int = 0) -> None:
        super().__init__(num_queues=num_queues, queue_size=queue_size)
        dataplane = self.default_dataplane if dataplane is None else dataplane
        if dataplane not in DATAPLANES:
            raise ValueError(f"dataplane must be one of {', '.join(DATAPLANES)}, got {dataplane!r}")
        self.dataplane = dataplane
        self.poll_us = poll_us
        self.storage = storage
        self.read_only = read_only or storage.read_only
        self.capacity = storage.size // SECTOR * SECTOR
        # virtio 1.2 §5.2.4 blk_size: the storage's logical block (4096 on a
        # 4K-sector disk under O_DIRECT), so a Linux guest never sends writes
        # that need a read-modify-write.  Fixed at creation, like the features.
        self.block_size = max(SECTOR, storage.block_size)
        self.serial = (serial if serial is not None else _default_serial(storage.url)).encode()
        if len(self.serial) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.wce = 1                     # writeback: the guest sends FLUSH when it needs durability
        self._inflight: dict[int, set[asyncio.Task[None]]] = {}
        # Swap gate: requests wait at _resumed while a swap is under way; the
        # swap waits for _executing (requests already on storage) to reach zero.
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._executing = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Requests waiting at the gate.  They never touched storage, so when
        # the front-end goes away they are cancelled rather than run later
        # against a disk that a new guest may already own.
        self._parked: set[asyncio.Task[None]] = set()
        self._swap_lock = asyncio.Lock()
        self._notified_capacity = self.capacity
        self._dirty: DirtyBitmap | None = None
        self.stats: Counter[str] = Counter()
        self._logged_causes: set[str] = set()
        # Features are fixed when the device is created: discard and write-zeroes
        # are offered if the first storage supports them; a later storage that
        # does not still answers (discard is advisory, write-zeroes falls back
        # to writing zeros).
        self._discard = storage.supports_discard
        self._write_zeroes = storage.supports_write_zeroes
        # What the C engines read: the request checks' limits, the write
        # cache mode and the serial, kept in step with the fields above.
        self._cfg: Any = ffi.new("struct vd_blk_config *")
        self._cfg.serial = self.serial.ljust(ID_BYTES, b"\0")
        self._sync_config()
        self._native = self._native_for(storage)
        if dataplane == "native" and self._native is None:
            raise ValueError(f"--dataplane native: storage {storage.url!r} has no native path "
                             f"(null:, mem: and file: do)")

    # -- the native data path -------------------------------------------------------

    def _native_for(self, storage: Storage) -> NativeBlkStorage | None:
        return None if self.dataplane == "python" else NativeBlkStorage.of(storage)

    def _sync_config(self) -> None:
        cfg = self._cfg
        cfg.capacity = self.capacity
        cfg.read_only = int(self.read_only)
        cfg.discard = int(bool(self.acked_features & BlkFeature.DISCARD))
        cfg.write_zeroes = int(bool(self.acked_features & BlkFeature.WRITE_ZEROES))
        cfg.wce = self.wce

    def create_engine(self, spec: RingSpec) -> NativeBlkEngine | None:
        native = self._native
        if native is None:
            return None
        return NativeBlkEngine(native, self._cfg, spec.size, poll_us=self.poll_us)

    @property
    def native_active(self) -> bool:
        """Whether the queues are (or will be, when they start) served in C."""
        return self._native is not None

    def _engines(self) -> dict[int, NativeBlkEngine]:
        engines = self.runtime.engines if self.runtime is not None else {}
        return {i: e for i, e in engines.items() if isinstance(e, NativeBlkEngine)}

    # -- description ---------------------------------------------------------------

    @property
    def features(self) -> int:
        f = (BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
             | BlkFeature.TOPOLOGY | BlkFeature.CONFIG_WCE)
        if self.num_queues > 1:
            f |= BlkFeature.MQ
        if self.read_only:
            f |= BlkFeature.RO
        if self._discard:
            f |= BlkFeature.DISCARD
        if self._write_zeroes:
            f |= BlkFeature.WRITE_ZEROES
        return int(f)

    @property
    def has_config(self) -> bool:
        return True

    @property
    def seg_max(self) -> int:
        # The header and the status byte take two descriptors (QEMU uses the same rule).
        return max(1, self.queue_size - 2)

    def config(self) -> bytes:
        return CONFIG.pack(
            self.capacity // SECTOR,       # capacity (512-byte sectors)
            SIZE_MAX,                      # size_max
            self.seg_max,                  # seg_max
            0, 0, 0,                       # geometry: cylinders, heads, sectors (not offered)
            self.block_size,               # blk_size (logical block, VIRTIO_BLK_F_BLK_SIZE)
            0, 0,                          # physical_block_exp, alignment_offset
            1,                             # min_io_size (in blk_size units)
            0,                             # opt_io_size
            self.wce,                      # wce
            0,                             # unused
            self.num_queues,               # num_queues
            MAX_DISCARD_SECTORS,           # max_discard_sectors
            MAX_DISCARD_SEG,               # max_discard_seg
            self.block_size // SECTOR,     # discard_sector_alignment (512-byte sectors)
            MAX_WRITE_ZEROES_SECTORS,      # max_write_zeroes_sectors
            MAX_WRITE_ZEROES_SEG,          # max_write_zeroes_seg
            1,                             # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, data: bytes) -> None:
        # §5.2.5: only the writeback flag is writable, and only with CONFIG_WCE.
        if offset == WCE_OFFSET and len(data) == 1 and self.acked_features & BlkFeature.CONFIG_WCE:
            self.wce = data[0] & 1
            self._cfg.wce = self.wce     # one int store; the workers read it per request
            log.info("blk: write cache %s", "writeback" if self.wce else "writethrough")
            return
        raise Unsupported("config write", f"offset {offset} size {len(data)} is read-only")

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self._sync_config()

    def limits(self) -> BlkLimits:
        return BlkLimits(self.capacity, self.read_only, self.seg_max,
                         bool(self.acked_features & BlkFeature.DISCARD),
                         bool(self.acked_features & BlkFeature.WRITE_ZEROES))

    # -- the queue --------------------------------------------------------------------

    async def process_queue(self, vq: VirtQueue) -> None:
        inflight = self._inflight.setdefault(vq.index, set())
        limits = self.limits()
        for chain in vq.chains():
            t_pop = time.monotonic_ns()      # latency: pop -> completion, as the C engine measures
            mem = vq.mem
            try:
                request, status = parse_request(chain, mem, limits)
            except GuestError as exc:
                log.warning("blk: queue %d: %s", vq.index, exc.at(queue=vq.index, head=chain.head))
                vq.stats.bad_chains += 1
                vq.complete(chain, 0, t_pop)
                continue
            except RequestError as exc:
                self.stats["rejected"] += 1
                vq.stats.by_type[_SLOT_REJECTED] += 1
                log.info("blk: queue %d head %d: %s -> %s", vq.index, chain.head, exc.reason,
                         exc.status.name)
                assert exc.status_view is not None
                exc.status_view[0] = exc.status
                vq.complete(chain, 1, t_pop)
                continue
            task = asyncio.get_running_loop().create_task(self._run(vq, chain, request, status, t_pop))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    def bad_chain(self, vq: VirtQueue, error: GuestError) -> int:
        # §5.2.6: every request ends in a status byte.  A chain with a buffer
        # outside guest memory still gets IOERR when its last descriptor (the
        # status) is a sound writable buffer; nothing else of it is touched.
        tail = error.tail
        if not isinstance(tail, Descriptor):
            return 0
        vq.mem.view(tail.addr + tail.len - 1, 1)[0] = Status.IOERR
        self.stats["rejected"] += 1
        vq.stats.by_type[_SLOT_REJECTED] += 1
        return 1

    async def _run(self, vq: VirtQueue, chain: DescriptorChain, request: BlkRequest,
                   status: memoryview, t_pop: int = 0) -> None:
        if not self._resumed.is_set():
            task = asyncio.current_task()
            assert task is not None
            self._parked.add(task)
            try:
                while not self._resumed.is_set():
                    await self._resumed.wait()
            finally:
                self._parked.discard(task)
        self._executing += 1
        self._idle.clear()
        try:
            written = await self._execute(request)
            code = Status.OK
        except DeviceError as exc:
            code = Status(exc.status) if exc.status in (1, 2) else Status.IOERR
            written = 0
            self._log_failure(request, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a storage bug: still answer the guest
            code, written = Status.IOERR, 0
            self._log_failure(request, exc)
        finally:
            self._executing -= 1
            if self._executing == 0:
                self._idle.set()
        self.stats[request.type.name] += 1
        qs = vq.stats
        qs.by_type[_SLOTS[request.type]] += 1
        if code is not Status.OK:
            self.stats["errors"] += 1
            qs.errors += 1
        elif request.type is ReqType.IN:
            qs.bytes_read += written
        elif request.type is ReqType.OUT:
            qs.bytes_written += request.data_len
        if vq.stopped:
            return
        status[0] = code
        vq.complete(chain, written + 1, t_pop)
        # Answered: no longer in flight, now rather than when the loop runs the
        # task's done callback, by which time the driver may have seen the entry
        # and asked `info`.
        self._inflight.get(vq.index, set()).discard(asyncio.current_task())

    async def _execute(self, req: BlkRequest) -> int:
        storage = self.storage
        if req.type is ReqType.IN:
            if req.data:
                await storage.readv(req.sector * SECTOR, req.data)
            return req.data_len
        if req.type is ReqType.OUT:
            if req.data:
                try:
                    await storage.writev(req.sector * SECTOR, req.data)
                finally:
                    self._mark_dirty(req.sector * SECTOR, req.data_len)
                if not self.wce:
                    await storage.flush()   # writethrough: durable before we ack
            return 0
        if req.type is ReqType.FLUSH:
            await storage.flush()
            return 0
        if req.type is ReqType.GET_ID:
            serial = self.serial.ljust(ID_BYTES, b"\0")
            pos = 0
            for v in req.data:
                n = min(len(v), ID_BYTES - pos)
                v[:n] = serial[pos: pos + n]
                pos += n
                if pos == ID_BYTES:
                    break
            return pos
        if req.type is ReqType.DISCARD:
            for sector, nsect, _flags in req.segments:
                try:
                    await storage.discard(sector * SECTOR, nsect * SECTOR)
                finally:
                    self._mark_dirty(sector * SECTOR, nsect * SECTOR)
            return 0
        if req.type is ReqType.WRITE_ZEROES:
            for sector, nsect, flags in req.segments:
                try:
                    await storage.write_zeroes(sector * SECTOR, nsect * SECTOR,
                                               may_unmap=bool(flags & WRITE_ZEROES_F_UNMAP))
                finally:
                    self._mark_dirty(sector * SECTOR, nsect * SECTOR)
            return 0
        raise DeviceError(f"request type {req.type.name} not supported", status=Status.UNSUPP)

    def _log_failure(self, req: BlkRequest, exc: BaseException) -> None:
        cause = f"{req.type.name}: {exc}"
        key = f"{req.type.name}:{type(exc).__name__}:{getattr(exc, 'cause', None)!r}"
        if key not in self._logged_causes:
            self._logged_causes.add(key)
            log.warning("blk: %s at sector %d failed -> IOERR (%s); further failures of this kind "
                        "are counted in stats, not logged", req.type.name, req.sector, cause)

    async def drain(self, index: int | None) -> None:
        """Wait for requests in flight.

        For one queue (GET_VRING_BASE) every request popped from it must be
        answered before the reply promises a quiet ring, so while I/O is
        paused this waits for the resume.  For the whole device (memory-table
        change, reset, disconnect) only requests already on storage are
        waited for; parked ones are cancelled by `reset` if it follows.
        """
        sets = [s for i, s in self._inflight.items() if index is None or i == index]
        tasks = [t for s in sets for t in s if index is not None or t not in self._parked]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _settle(self) -> None:
        """Wait until every request the Python path took is answered, parked ones
        included (they run once the gate is open; no new ones are taken while
        the runtime is held)."""
        while True:
            tasks = [t for s in self._inflight.values() for t in s]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    def reset(self) -> None:
        super().reset()
        self.wce = 1
        self._sync_config()
        for task in list(self._parked):
            task.cancel()

    async def aclose(self) -> None:
        await self.drain(None)
        if not self.read_only:
            # Stopping (SIGTERM, or the server's end): what the guest wrote
            # reaches stable storage even if it never sent a FLUSH.
            try:
                await self.storage.flush()
                log.info("blk: storage flushed: %s", self.storage.url)
            except Exception as exc:
                log.warning("blk: flushing %s at close failed: %s", self.storage.url, exc)
        if self._native is not None:
            self._native.close()
            self._native = None
        await self.storage.aclose()

    # -- dirty tracking (for a mirror) -----------------------------------------------------

    def _mark_dirty(self, offset: int, length: int) -> None:
        if self._dirty is not None:
            self._dirty.mark(offset, length)

    @property
    def dirty(self) -> DirtyBitmap | None:
        return self._dirty

    async def track_dirty(self, bitmap: DirtyBitmap | None) -> None:
        """Start (or with None stop) marking every completed write in ``bitmap``.

        Every queue is held for the change, so from the moment this returns
        no completed write goes unmarked (on either data path), and a stopped
        bitmap is no longer touched by any engine.
        """
        runtime = self.runtime
        if runtime is not None:
            await runtime.hold()
        try:
            self._dirty = bitmap
            cfg = self._cfg
            if bitmap is None:
                cfg.dirty, cfg.dirty_bits, cfg.dirty_shift = ffi.NULL, 0, 0
            else:
                cfg.dirty, cfg.dirty_bits, cfg.dirty_shift = bitmap.cdata, bitmap.nbits, bitmap.shift
        finally:
            if runtime is not None:
                runtime.release()

    # -- live storage changes ------------------------------------------------------------

    async def _wait_idle(self, what: str) -> None:
        """Wait until no request is on storage, bounded by the storage's own
        request timeout (NBD's ?timeout=) or QUIESCE_TIMEOUT, plus a second.

        Raises:
            DeviceError: still busy at the bound (a storage that hangs).
        """
        bound = self.storage.request_timeout
        bound = (QUIESCE_TIMEOUT if bound is None else bound) + 1.0
        try:
            async with asyncio.timeout(bound):
                await self._idle.wait()
        except TimeoutError:
            raise DeviceError(f"{what} timed out: {self._executing} requests still on {self.storage.url} "
                              f"after {bound:g} s; nothing changed", status=Status.IOERR,
                              value=self._executing) from None

    async def pause(self) -> None:
        """Hold new requests and wait until none is on storage (for a consistent copy).

        Raises:
            DeviceError: requests still on storage after its timeout (I/O is let go again).
        """
        was_paused = self.paused
        self._resumed.clear()
        if self.runtime is not None and not was_paused:
            await self.runtime.hold()
        try:
            await self._wait_idle("pause")
        except DeviceError:
            if not was_paused:
                self._resumed.set()
                if self.runtime is not None:
                    self.runtime.release()
            raise
        log.info("blk: I/O paused")

    def resume(self) -> None:
        if not self._resumed.is_set():
            self._resumed.set()
            if self.runtime is not None:
                self.runtime.release()
            log.info("blk: I/O resumed")

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    async def swap_storage(self, new: Storage, *, force: bool = False) -> Storage:
        """Replace the storage under the running disk; returns the old one (still open).

        New requests wait, requests in flight complete on the old storage, then
        the new one takes over and I/O resumes (also after `pause`).  When the
        new storage needs the other data path (``file:`` -> ``nbd://``), every
        queue is restarted where it stopped on that path.  A different size
        becomes a config change.  Storage smaller than the disk is refused
        unless ``force``: the guest would lose the end of its disk (a 10-byte
        file made it a disk of 0 sectors).

        Raises:
            ValueError: the new storage cannot stand in (read-only under a
                writable disk, or smaller than the disk without ``force``).
        """
        if new.read_only and not self.read_only:
            raise ValueError(f"cannot swap a writable disk to read-only storage {new.url!r}")
        runtime = self.runtime
        async with self._swap_lock:
            capacity = new.size // SECTOR * SECTOR
            if capacity < self.capacity and not force:
                raise ValueError(f"storage {new.url!r} holds {capacity // SECTOR} sectors "
                                 f"({new.size} bytes), fewer than the disk's {self.capacity // SECTOR}: "
                                 "the guest would lose the end of its disk; swap with force=true "
                                 "to shrink it")
            was_paused = self.paused
            self._resumed.clear()
            if runtime is not None and not was_paused:
                await runtime.hold()
            swapped = False
            try:
                # Bounded, so a hung storage fails the swap now rather than
                # letting it take effect after the operator was told it failed.
                await self._wait_idle("swap")
                old, self.storage = self.storage, new
                old_native, self._native = self._native, self._native_for(new)
                capacity = new.size // SECTOR * SECTOR
                if capacity != self.capacity:
                    log.info("blk: capacity %d -> %d sectors", self.capacity // SECTOR, capacity // SECTOR)
                    self.capacity = capacity
                    self._sync_config()
                engines = self._engines()
                if (old_native is None) != (self._native is None) and runtime is not None:
                    # Requests the Python path took (and parked at the gate) run
                    # on the new storage first; then every ring restarts where it
                    # stopped, on the path the new storage needs.
                    self._resumed.set()
                    await self._settle()
                    runtime.restart_rings()
                    log.info("blk: data path now %s", "native" if self._native else "python")
                elif self._native is not None:
                    for engine in engines.values():
                        engine.set_blk_storage(self._native)
                if old_native is not None:
                    old_native.close()
                swapped = True
            finally:
                # A swap resumes I/O, also after a pause; a failed one leaves a
                # pause in place and lets I/O go again otherwise.
                if swapped or not was_paused:
                    self._resumed.set()
                    if runtime is not None:
                        runtime.release()
            log.info("blk: storage swapped: %s -> %s", old.url, new.url)
            await self._notify_capacity()
            return old

    async def refresh_capacity(self) -> int:
        """Re-read the storage size; a change reaches the guest as a config change."""
        size = await self.storage.refresh_size()
        capacity = size // SECTOR * SECTOR
        if capacity != self.capacity:
            log.info("blk: capacity %d -> %d sectors", self.capacity // SECTOR, capacity // SECTOR)
            runtime = self.runtime
            if runtime is not None:
                await runtime.hold()
            try:
                self.capacity = capacity
                self._sync_config()
                if self._native is not None:
                    # The C side bounds-checks against the storage size it was given.
                    old_native, self._native = self._native, self._native_for(self.storage)
                    assert self._native is not None     # the same storage: still a native one
                    for engine in self._engines().values():
                        engine.set_blk_storage(self._native)
                    old_native.close()
            finally:
                if runtime is not None:
                    runtime.release()
            await self.notify_config_change()
        return self.capacity

    async def _notify_capacity(self) -> None:
        if self._notified_capacity != self.capacity:
            self._notified_capacity = self.capacity
            await self.notify_config_change()

    def engine_retired(self, index: int, engine: NativeEngine) -> None:
        # The totals outlive the engine (a stopped ring, a reconnect, a path change).
        super().engine_retired(index, engine)
        self._count_native(self.stats, engine.stats())

    def python_inflight(self, index: int) -> int:
        return len(self._inflight.get(index, ()))

    @staticmethod
    def _count_native(stats: Counter[str], q: dict[str, Any]) -> None:
        for name, n in zip(NATIVE_STAT_NAMES, q["by_type"]):
            if n:
                stats[name] += n
        if q["errors"]:
            stats["errors"] += q["errors"]

    def info(self) -> dict[str, object]:
        stats = Counter(self.stats)
        # Requests parked at the gate by a pause have not reached storage:
        # they are not in flight.
        inflight = sum(len(s) for s in self._inflight.values()) - len(self._parked)
        poll_ns: dict[int, int] = {}
        for index, engine in self._engines().items():
            q = engine.stats()
            inflight += q["inflight"]
            poll_ns[index] = q["poll_ns"]
            self._count_native(stats, q)
        # Per queue: both data paths and stopped engines, since the daemon started;
        # poll_ns is a running engine's adaptive polling window now (--poll-us).
        per_queue = [{"queue": index, "native": snap.native, **snap.counters,
                      "poll_ns": poll_ns.get(index, 0),
                      "by_type": dict(zip(NATIVE_STAT_NAMES, snap.by_type)),
                      "latency_us": snap.latency.summary_us()}
                     for index, snap in self.queue_snapshots().items()]
        # Held by a pause: what the guest has sent and waits for, minus what
        # is still on storage (parked requests and those left in the rings).
        held = 0
        if self.paused and self.runtime is not None:
            held = max(0, self.runtime.ring_backlog() - inflight)
        return {
            "backend": self.storage.url,
            "capacity": self.capacity,
            "sectors": self.capacity // SECTOR,
            "read_only": self.read_only,
            "queues": self.num_queues,
            "dataplane": "native" if self._native is not None else "python",
            "poll_us": self.poll_us,
            "write_cache": "writeback" if self.wce else "writethrough",
            "inflight": inflight,
            "held": held,
            "paused": self.paused,
            # Guest memory as the front-end last described it (SET_MEM_TABLE,
            # ADD_MEM_REG/REM_MEM_REG: a hot-plugged DIMM shows up here).
            "memory": [{"gpa": r.gpa, "size": r.size} for r in self.runtime.mem.regions]
                      if self.runtime is not None else [],
            "stats": dict(stats),
            "queue_stats": per_queue,
        }


def _default_serial(url: str) -> str:
    # Stable per backend, like Cloud Hypervisor's serial built from the image path.
    return "vdev-" + hashlib.sha256(url.encode()).hexdigest()[:15]
