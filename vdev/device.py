"""`Device`, the class a device implements, and the runtime that serves it.

A device is a handful of members (compare libvhost-user's ``VuDevIface``):

* ``device_id``, ``num_queues``, ``queue_size``;
* ``features`` — device-specific feature bits (the framework adds
  VERSION_1, INDIRECT_DESC and EVENT_IDX, which it implements itself);
* ``config()`` — the config space bytes (optional);
* ``async process_queue(vq)`` — take chains from a kicked queue and complete
  them.

A device never sees a vhost-user message, an fd or a memory table: the same
device could sit behind another transport.  `DeviceRuntime` is the bridge: it
implements the protocol handler's `BackendHooks` by mapping guest memory,
and, when a ring starts, asks the device for a queue engine
(`Device.create_engine`, see `vdev.engine`).  A native engine gets the
translated ring, the memory table and its own dups of the kick and call
eventfds, and serves the queue from a C worker thread; without one the
runtime serves the queue on the event loop: it builds a `Queue`, watches the
kick eventfd, calls ``process_queue`` (never twice at once for one queue)
and signals the call eventfd.  Both paths follow the same control: held
while the front-end needs a quiet device (GET_VRING_BASE, memory-table
changes), while a device holds I/O (a storage swap), and when a ring is
disabled.

Errors: a `GuestError` from a queue fails that chain or breaks that queue; an
exception escaping ``process_queue`` is a device bug, logged with its
traceback, and the daemon keeps serving.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

from vhost_user.handler import BackendHooks, RegionFd, Vring
from vhost_user.messages import (
    MAX_CONFIG_SIZE,
    VHOST_F_LOG_ALL,
    VHOST_VRING_F_LOG,
    BackendReq,
    ConfigFlag,
    InflightDescription,
    LogDescription,
    ProtocolFeature,
)
from vhost_user.server import VhostUserServer

from .engine import NativeEngine, RingSpec
from .errors import GuestError, Unsupported
from .memory import MemoryMap, load_u16
from .metrics import QueueAccounts, QueueSnapshot
from .native import NativeMemory
from .queue import Descriptor, DescriptorChain, Queue
from .tracking import DirtyLog, InflightArea
from .uapi.virtio import DeviceId, VirtioFeature

log = logging.getLogger("vdev.device")

#: Transport features the framework implements for every device.
FRAMEWORK_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                      | VirtioFeature.RING_EVENT_IDX)

_EVENTFD_ONE = (1).to_bytes(8, "little")


class VirtQueue:
    """A started queue as a device sees it: chains in, completions out.

    ``mem`` is the current guest-memory snapshot; a request that outlives a
    memory-table change keeps using the snapshot it started with.
    """

    def __init__(self, runtime: DeviceRuntime, queue: Queue, mem: MemoryMap) -> None:
        self.runtime = runtime
        self.queue = queue
        self.mem = mem
        self.index = queue.index
        self.stopped = False
        self.in_pass = False
        self.task: asyncio.Task[None] | None = None
        self.rerun = False
        self.completed = 0
        #: This queue's Python-path counters and latency (kept by the device).
        self.stats = runtime.device.accounts.python_queue(queue.index)

    def chains(self) -> Iterator[DescriptorChain]:
        """Every available chain, with notifications handled per §2.7.10.

        A malformed chain is logged and handed straight back to the driver
        (used length 0), so the guest never loses a descriptor; a broken
        queue ends the iteration.
        """
        for item in self.queue.iter_available(self.mem):
            if isinstance(item, GuestError):
                log.warning("%s: bad chain: %s", self.runtime.device.name, item)
                self.stats.bad_chains += 1
                if item.head is not None and self.queue.broken is None:
                    written = self.runtime.device.bad_chain(self, item)
                    if isinstance(item.tail, Descriptor):
                        self.queue.log_write([item.tail])
                    self.complete(item.head, written)
                continue
            yield item
            if self.runtime.held:
                # Held (a swap, a pause, a shutdown) while this pass runs: take
                # nothing more; `resume` runs the queue again.
                return

    def complete(self, chain: DescriptorChain | int, written: int, t_pop_ns: int = 0) -> None:
        """Return a chain to the driver with ``written`` bytes of device-written data.

        Inside `process_queue` the interrupt is sent once at the end of the
        pass; outside it (an asynchronous completion) right away, unless
        EVENT_IDX says the driver does not want one.  ``t_pop_ns``: when the
        chain was taken (`time.monotonic_ns`), to record its latency; 0: none.
        """
        head = chain if isinstance(chain, int) else chain.head
        if not isinstance(chain, int):
            # Migration: what the device wrote is dirty (after the writes,
            # before the used entry hands it to the driver).
            self.queue.log_write(chain.writable)
        if self.stopped:
            # The ring was stopped (GET_VRING_BASE) or the device reset: the
            # front-end owns the rings now and nothing may be written.
            log.warning("%s: completion for head %d on stopped queue %d dropped",
                        self.runtime.device.name, head, self.index)
            return
        self.queue.add_used(self.mem, head, written)
        self.completed += 1
        self.stats.requests += 1
        if t_pop_ns:
            self.stats.record(t_pop_ns)
        if not self.in_pass:
            self.notify_if_needed()

    def notify_if_needed(self) -> None:
        if self.stopped or self.queue.num_added == 0:
            return
        try:
            needed = self.queue.needs_notification(self.mem)
        except GuestError as exc:
            log.warning("%s: %s", self.runtime.device.name, exc)
            needed = True
        self.stats.batches += 1
        if needed:
            self.stats.calls += 1
            self.runtime.signal(self.index)
        else:
            self.stats.calls_suppressed += 1


class Device(abc.ABC):
    """Base class of every device.  Subclasses set the class attributes and
    implement `process_queue`; everything else has a default."""

    device_id: ClassVar[int]
    name: ClassVar[str] = "device"
    #: Whether requests may be taken again after a back-end crash (vhost-user
    #: INFLIGHT_SHMFD): true for request/response devices such as a disk.
    supports_inflight: ClassVar[bool] = False
    #: Names of the per-type request counters (``by_type`` slots), for metrics.
    request_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, num_queues: int = 1, queue_size: int = 256) -> None:
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues must be 1..256, got {num_queues}")
        if queue_size <= 0 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError(f"queue size must be a power of 2 up to 32768, got {queue_size}")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.acked_features = 0
        self.runtime: DeviceRuntime | None = None
        #: Per-queue counters and latency on both data paths (`vdev.metrics`).
        self.accounts = QueueAccounts()

    @property
    def features(self) -> int:
        """Device-specific feature bits offered to the driver."""
        return 0

    @property
    def has_config(self) -> bool:
        return False

    @property
    def protocol_features(self) -> ProtocolFeature:
        """vhost-user protocol features the device adds (net: RARP, NET_MTU)."""
        return ProtocolFeature(0)

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce ``mac`` after a migration.  Raises Unsupported by default."""
        raise Unsupported("SEND_RARP", f"{self.name} does not send RARP announcements")

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the MTU the front-end gives the guest.  Raises Unsupported by default."""
        raise Unsupported("NET_SET_MTU", f"{self.name} has no MTU")

    def config(self) -> bytes:
        """The device's config space (little-endian, as the driver sees it)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote config space.  Raises Unsupported by default."""
        raise Unsupported("config write", f"{self.name} config space is read-only")

    def set_features(self, features: int) -> None:
        """The driver accepted ``features`` (device and transport bits)."""
        self.acked_features = features

    @abc.abstractmethod
    async def process_queue(self, vq: VirtQueue) -> None:
        """Handle the chains of a kicked queue (iterate ``vq.chains()``)."""

    def create_engine(self, spec: RingSpec) -> NativeEngine | None:
        """A native engine to serve the ring ``spec`` describes, or None (the default)
        to serve it on the event loop with `process_queue`."""
        return None

    def engine_retired(self, index: int, engine: NativeEngine) -> None:
        """The native engine of queue ``index`` stopped (its counters are final).
        The default keeps its totals in `accounts`; an override calls it."""
        self.accounts.retire(index, engine)

    def python_inflight(self, index: int) -> int:
        """Requests of queue ``index`` the Python path took and has not completed."""
        return 0

    def queue_snapshots(self) -> dict[int, QueueSnapshot]:
        """Every queue's counters and latency histogram so far (both data paths,
        stopped engines included), by index.  Safe from any thread."""
        engines = self.runtime.engines if self.runtime is not None else {}
        return self.accounts.snapshot(engines, self.python_inflight)

    def bad_chain(self, vq: VirtQueue, error: GuestError) -> int:
        """A malformed chain is about to go back to the driver; return the used length.

        ``error.tail`` is the chain's last descriptor when it is writable and
        inside guest memory; a device whose requests end in a status byte
        writes an error status there.  The default writes nothing (length 0).
        """
        return 0

    async def drain(self, index: int | None) -> None:
        """Wait until no request of queue ``index`` (None: any) is in flight."""

    def reset(self) -> None:
        """Back to the initial state (RESET_DEVICE or front-end gone)."""
        self.acked_features = 0

    async def aclose(self) -> None:
        """Release everything; always releases, even on error."""

    async def notify_config_change(self) -> bool:
        """Tell the driver the config space changed (CONFIG_CHANGE_MSG).

        Returns False (and logs why) when no front-end with a back-end
        channel is connected.
        """
        if self.runtime is None:
            return False
        return await self.runtime.notify_config_change()


class DeviceRuntime(BackendHooks):
    """Runs a `Device` under the vhost-user handler (implements `BackendHooks`)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        device.runtime = self
        self.mem = MemoryMap.empty()
        self.queues: dict[int, VirtQueue] = {}
        self.enabled: set[int] = set()
        self.call_fds: dict[int, int] = {}
        self.kick_fds: dict[int, int] = {}
        self.server: object = None     # set by serve(); has backend_request()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Native engines of started rings (those rings are not in `queues`).
        self.engines: dict[int, NativeEngine] = {}
        self.vrings: dict[int, Vring] = {}
        self._native_mem: NativeMemory | None = None
        #: How many holders (a storage swap, a pause) keep every queue from taking chains.
        self._holds = 0
        # Migration and reconnection state shared with the front-end.
        self.dirty_log: DirtyLog | None = None
        self.logging = False                 # VHOST_F_LOG_ALL acked
        self.inflight: InflightArea | None = None

    # -- static description ------------------------------------------------------

    @property
    def features(self) -> int:
        # LOG_ALL: every device can be migrated; dirty logging is the runtime's.
        return int(FRAMEWORK_FEATURES) | VHOST_F_LOG_ALL | self.device.features

    @property
    def protocol_features(self) -> ProtocolFeature:
        f = ProtocolFeature.LOG_SHMFD
        if self.device.has_config:
            f |= ProtocolFeature.CONFIG
        if self.device.supports_inflight:
            f |= ProtocolFeature.INFLIGHT_SHMFD
        return f | self.device.protocol_features

    @property
    def num_queues(self) -> int:
        return self.device.num_queues

    @property
    def max_queue_size(self) -> int:
        return self.device.queue_size

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- hooks ----------------------------------------------------------------------

    def set_features(self, features: int) -> None:
        self.device.set_features(features & ~VHOST_F_LOG_ALL)
        logging_ = bool(features & VHOST_F_LOG_ALL)
        if logging_ != self.logging:
            self.logging = logging_
            log.info("%s: dirty logging %s", self.device.name, "on" if logging_ else "off")
            self._apply_log()

    # -- migration: the dirty log --------------------------------------------------------

    def set_log_base(self, fd: int, desc: LogDescription) -> None:
        new = DirtyLog(fd, desc.mmap_size, desc.mmap_offset)   # on failure the handler closes fd
        os.close(fd)                                            # the mapping holds its own reference
        old, self.dirty_log = self.dirty_log, new
        self._apply_log()               # the rings are held (the server drained them)
        if old is not None:
            old.close()

    def set_vring_log(self, index: int) -> None:
        self._apply_log()

    def _ring_log(self, index: int) -> tuple[DirtyLog | None, bool, int]:
        active = self.dirty_log if self.logging else None
        vring = self.vrings.get(index)
        addr = vring.addr if vring is not None else None
        log_used = bool(addr is not None and addr.flags & VHOST_VRING_F_LOG)
        return active, log_used, addr.log if addr is not None else 0

    def _apply_log(self) -> None:
        """Give every started ring the log as it now stands (rings held by the server's drain)."""
        for index, engine in self.engines.items():
            engine.set_log(*self._ring_log(index))
        for index, vq in self.queues.items():
            vq.queue.set_log(*self._ring_log(index))

    # -- reconnection: in-flight regions -------------------------------------------------

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        if not self.device.supports_inflight:
            raise Unsupported("GET_INFLIGHT_FD", f"{self.device.name} does not track requests in flight")
        self._set_inflight(InflightArea.create(num_queues, queue_size))
        assert self.inflight is not None
        return os.dup(self.inflight.fd), self.inflight.size

    def set_inflight(self, fd: int, desc: InflightDescription) -> None:
        if not self.device.supports_inflight:
            raise Unsupported("SET_INFLIGHT_FD", f"{self.device.name} does not track requests in flight")
        # On failure the handler closes fd; on success the area owns it.
        self._set_inflight(InflightArea(fd, desc.mmap_size, desc.mmap_offset, desc.num_queues,
                                        desc.queue_size))

    def _set_inflight(self, area: InflightArea | None) -> None:
        old, self.inflight = self.inflight, area
        if old is not None and old is not area:
            if self.engines or self.queues:
                log.warning("%s: in-flight area replaced under started rings", self.device.name)
            old.close()

    def set_memory(self, regions: Sequence[RegionFd]) -> None:
        old = self.mem
        new = MemoryMap.from_fds([(r.region, r.fd) for r in regions], previous=old)
        self.mem = new
        for vq in self.queues.values():
            vq.mem = new
        old_native, self._native_mem = self._native_mem, None
        if self.engines:
            native = self.native_memory()
            for index, engine in list(self.engines.items()):
                # The server drained before this request, so the engine is held
                # and idle; hold and wait anyway rather than race the worker.
                engine.hold()
                engine.wait_idle()
                try:
                    engine.set_memory(native)
                except GuestError as exc:
                    log.warning("%s: queue %d stopped: %s", self.device.name, index, exc)
                    self.stop_vring(index)
        if old_native is not None:
            old_native.release()      # no engine points at it any more
        old.release_unused(new)

    def native_memory(self) -> NativeMemory:
        """The current memory snapshot as a C region table (made on first use)."""
        if self._native_mem is None:
            self._native_mem = NativeMemory(self.mem)
        return self._native_mem

    def start_vring(self, vring: Vring) -> None:
        assert vring.addr is not None
        acked = self.device.acked_features
        mem = self.mem
        try:
            desc = mem.frontend_to_guest(vring.addr.desc)
            avail = mem.frontend_to_guest(vring.addr.avail)
            used = mem.frontend_to_guest(vring.addr.used)
        except GuestError as exc:
            exc.at(queue=vring.index)
            raise
        queue = Queue(vring.num, desc, avail, used, index=vring.index, next_avail=vring.base,
                      event_idx=bool(acked & VirtioFeature.RING_EVENT_IDX),
                      indirect=bool(acked & VirtioFeature.RING_INDIRECT_DESC))
        queue.check_layout(mem)
        # spec: the used index is not sent; the device resumes from the ring itself.
        queue.next_used = queue.used_idx(mem)
        spec = RingSpec(vring.index, vring.num, desc, avail, used, queue.next_avail, queue.next_used,
                        queue.event_idx, queue.indirect)
        engine = self.device.create_engine(spec)
        self.vrings[vring.index] = vring
        region = self.inflight.region(vring.index) if self.inflight is not None else None
        if region is not None and region.queue_size != vring.num:
            log.warning("%s: queue %d has %d entries, its in-flight region %d: not tracked",
                        self.device.name, vring.index, vring.num, region.queue_size)
            region = None
        resubmit = 0
        if engine is not None:
            try:
                engine.start(self.native_memory(), spec, vring.kick_fd,
                             self.call_fds.get(vring.index))
                if region is not None:
                    resubmit = engine.set_inflight(region)
                engine.set_log(*self._ring_log(vring.index))
            except BaseException:
                engine.close()
                raise
            self.engines[vring.index] = engine
            enabled = vring.index in self.enabled
            engine.set_enabled(enabled)
            if (enabled or engine.serves_disabled) and not self._holds:
                engine.run()
            kind = "native engine"
        else:
            if region is not None:
                resubmit = queue.set_inflight(region, mem)
            queue.set_log(*self._ring_log(vring.index))
            vq = VirtQueue(self, queue, mem)
            self.queues[vring.index] = vq
            if vring.kick_fd is not None:
                self._watch_kick(vring.index, vring.kick_fd)
            kind = "python"
        if resubmit:
            log.warning("%s: queue %d: %d requests were in flight when the previous back end "
                        "stopped; taking them again", self.device.name, vring.index, resubmit)
        log.info("%s: queue %d started (size %d, avail %d, used %d%s, %s)", self.device.name,
                 vring.index, vring.num, queue.next_avail, queue.next_used,
                 ", event idx" if queue.event_idx else "", kind)
        # Buffers may already be waiting (a reconnect, or a kick before we watched).
        self.schedule(vring.index)

    def stop_vring(self, index: int) -> int:
        self.vrings.pop(index, None)
        engine = self.engines.pop(index, None)
        if engine is not None:
            try:
                next_avail, _ = engine.stop()
                self.device.engine_retired(index, engine)
            finally:
                engine.close()
            log.info("%s: queue %d stopped at avail %d", self.device.name, index, next_avail)
            return next_avail
        vq = self.queues.pop(index, None)
        self._unwatch_kick(index)
        if vq is None:
            return 0
        vq.stopped = True
        if vq.task is not None and not vq.task.done():
            vq.task.cancel()
        log.info("%s: queue %d stopped at avail %d", self.device.name, index, vq.queue.next_avail)
        return vq.queue.next_avail

    def restart_rings(self) -> None:
        """Stop every started ring and start it again where it stopped, asking the
        device for an engine anew (a storage swap that changes path).  Only
        while nothing is in flight (`hold`)."""
        for index, vring in list(self.vrings.items()):
            next_avail = self.stop_vring(index)
            self.start_vring(dataclasses.replace(vring, base=next_avail))

    def set_vring_enabled(self, index: int, enabled: bool) -> None:
        engine = self.engines.get(index)
        if enabled:
            self.enabled.add(index)
            if engine is not None:
                engine.set_enabled(True)
                if not self._holds:
                    engine.run()
            self.schedule(index)
        else:
            self.enabled.discard(index)
            if engine is not None:
                engine.set_enabled(False)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        if fd is None:
            self.call_fds.pop(index, None)
        else:
            self.call_fds[index] = fd
        engine = self.engines.get(index)
        if engine is not None:
            engine.set_call(fd)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        engine = self.engines.get(index)
        if engine is not None:
            engine.set_kick(fd)
            return
        # Watch the new fd before dropping the old one: if the loop refuses it
        # (epoll cannot watch a regular file), nothing has changed.
        old = self.kick_fds.get(index)
        if fd != old:
            if fd is None:
                del self.kick_fds[index]
            else:
                self._watch_kick(index, fd)
            if old is not None:
                self.loop.remove_reader(old)
        self.schedule(index)

    def get_config(self, offset: int, size: int) -> bytes:
        if not self.device.has_config:
            raise Unsupported("GET_CONFIG", f"{self.device.name} has no config space")
        # The front-end asks for the size of *its* struct, which may be longer
        # than the fields this device fills in: the rest reads as zero.
        cfg = self.device.config().ljust(MAX_CONFIG_SIZE, b"\0")
        return cfg[offset: offset + size]

    def set_config(self, offset: int, data: bytes, flags: ConfigFlag) -> None:
        self.device.write_config(offset, data)

    def send_rarp(self, mac: bytes) -> None:
        self.device.send_rarp(mac)

    def set_mtu(self, mtu: int) -> None:
        self.device.set_mtu(mtu)

    def reset(self) -> None:
        for index in list(self.queues) + list(self.engines):
            self.stop_vring(index)
        self.enabled.clear()
        self.logging = False
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        self._set_inflight(None)
        self.call_fds.clear()
        self.device.reset()

    # -- kicks and calls ---------------------------------------------------------------

    def _watch_kick(self, index: int, fd: int) -> None:
        """Watch ``fd`` for kicks; recorded only once the loop has accepted it."""
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._on_kick, index, fd)
        self.kick_fds[index] = fd

    def _unwatch_kick(self, index: int) -> None:
        fd = self.kick_fds.pop(index, None)
        if fd is not None:
            self.loop.remove_reader(fd)

    def _on_kick(self, index: int, fd: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(fd, 8)
        vq = self.queues.get(index)
        if vq is not None:
            vq.stats.kicks += 1
        self.schedule(index)

    def signal(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` (write its call eventfd)."""
        fd = self.call_fds.get(index)
        if fd is None:
            return
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass   # counter saturated: the driver has an interrupt pending anyway
        except OSError as exc:
            log.warning("%s: call fd of queue %d failed: %s", self.device.name, index, exc)

    # -- running the device ----------------------------------------------------------------

    def schedule(self, index: int) -> None:
        """Run ``process_queue`` for a queue, or mark it to run again if it is running."""
        vq = self.queues.get(index)
        if vq is None or index not in self.enabled or self._holds:
            return
        if vq.task is not None and not vq.task.done():
            vq.rerun = True
            return
        vq.task = self.loop.create_task(self._run_queue(vq))

    async def _run_queue(self, vq: VirtQueue) -> None:
        while True:
            vq.rerun = False
            if vq.stopped or vq.index not in self.enabled:
                return
            vq.in_pass = True
            vq.stats.wakeups += 1
            try:
                await self.device.process_queue(vq)
            except GuestError as exc:
                log.warning("%s: queue %d: %s", self.device.name, vq.index, exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: process_queue(%d) failed; the daemon goes on",
                              self.device.name, vq.index)
            finally:
                vq.in_pass = False
            vq.notify_if_needed()
            if not vq.rerun:
                return

    async def drain(self, index: int | None) -> None:
        """Wait for queue processing and the device's in-flight requests to finish.

        Native engines of the targeted rings are held and stay held until
        `resume` (the server calls it once the request that needed a quiet
        device is done).
        """
        for i, engine in list(self.engines.items()):
            if index is None or i == index:
                await engine.quiesce()
        targets = [vq for i, vq in self.queues.items() if index is None or i == index]
        for vq in targets:
            while vq.task is not None and not vq.task.done():
                # Waits without cancelling the task, and lets a cancel of
                # drain itself through (suppressing CancelledError around
                # shield() would swallow it).
                await asyncio.wait({vq.task})
        await self.device.drain(index)

    def resume(self) -> None:
        """Let every enabled queue take chains again (unless a device holds I/O)."""
        if self._holds:
            return
        for index, engine in self.engines.items():
            if index in self.enabled or engine.serves_disabled:
                engine.run()
        for index in self.queues:
            self.schedule(index)

    async def hold(self) -> None:
        """Stop every queue taking chains and wait until no request is in flight.

        Holds nest; each `hold` is ended by one `release`.  Requests the
        Python path already took finish first (``device.drain``).
        """
        self.hold_nowait()
        # Every engine was told at once (above); now wait for each.
        for engine in list(self.engines.values()):
            await engine.quiesce()
        for vq in list(self.queues.values()):
            while vq.task is not None and not vq.task.done():
                await asyncio.wait({vq.task})

    def hold_nowait(self) -> None:
        """The first half of `hold`: from now on no queue takes a new chain (a
        Python pass in progress stops at its next chain, every engine is told
        now rather than after the one before it went quiet)."""
        self._holds += 1
        for engine in self.engines.values():
            engine.hold()

    @property
    def held(self) -> bool:
        return self._holds > 0

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        self.resume()

    def ring_backlog(self) -> int:
        """Requests the driver has made available and not yet seen used, over
        every started ring (avail.idx - used.idx, read from guest memory):
        those in flight plus those still waiting in the rings."""
        total = 0
        mem = self.mem
        for vring in list(self.vrings.values()):
            if vring.addr is None:
                continue
            try:
                avail = mem.frontend_to_guest(vring.addr.avail, 4)
                used = mem.frontend_to_guest(vring.addr.used, 4)
                total += (load_u16(mem, avail + 2) - load_u16(mem, used + 2)) & 0xFFFF
            except GuestError:
                continue
        return total

    def engine_stats(self) -> dict[int, dict[str, object]]:
        """Counters of every native engine, by queue index (read without stopping them)."""
        return {i: e.stats() for i, e in sorted(self.engines.items())}

    async def notify_config_change(self) -> bool:
        server = self.server
        if server is None:
            return False
        try:
            await server.backend_request(BackendReq.CONFIG_CHANGE_MSG)  # type: ignore[attr-defined]
        except Unsupported as exc:
            log.warning("%s: cannot signal a config change: %s", self.device.name, exc)
            return False
        return True


#: Called once the vhost-user socket listens.  The `vdev` command line sets it
#: (to write ``--pidfile`` and tell systemd READY=1), so every device command
#: that serves through `serve` gets it without passing it down.
LISTENING_HOOK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "vdev_listening_hook", default=None)


async def serve(device: Device, path: str | None = None, *, client: bool = False,
                listen_fd: int | None = None) -> None:
    """Serve ``device`` over vhost-user until cancelled (one front-end at a time)."""
    runtime = DeviceRuntime(device)
    server = VhostUserServer(runtime, path, client=client, listen_fd=listen_fd)
    runtime.server = server
    hook = LISTENING_HOOK.get()
    announce: asyncio.Task[None] | None = None
    if hook is not None:
        async def when_listening() -> None:
            await server.ready.wait()
            hook()
        announce = asyncio.get_running_loop().create_task(when_listening())
    try:
        await server.serve_forever()
    finally:
        if announce is not None:
            announce.cancel()
        await device.aclose()


__all__ = ["Device", "DeviceId", "DeviceRuntime", "FRAMEWORK_FEATURES", "LISTENING_HOOK", "VirtQueue",
           "serve"]
