"""virtio-net (virtio 1.2 §5.1) over a TAP, a cable to another guest, or a loopback.

The device is a set of queue pairs (receiveq 2i, transmitq 2i+1; with QEMU
the control queue stays in the VMM, which answers it and turns pairs on and
off with SET_VRING_ENABLE).  Each pair is served by a C worker
(`backends.net.native.NativePort`, ``vdev/_native/src/net.c``) that moves
frames between the rings and the pair's *link*, with no Python per frame:

* `TapLink` — a TAP (`backends.net.tap`), one TAP queue per pair; the
  12-byte ``virtio_net_hdr_v1`` passes straight through (IFF_VNET_HDR), so
  checksum and segmentation offloads are the kernel's;
* `CableLink` — the other end of a named cable (`backends.net.cable`):
  another device in this process (frames copied from one guest's transmit
  buffers into the other's receive buffers) or in another daemon (one
  SOCK_SEQPACKET socket per pair);
* `LoopbackLink` — transmitted frames come back on the same pair's receive
  ring (for benchmarks and tests).

Python does what happens per connection or per change: features and config
space (MAC, link STATUS, max_virtqueue_pairs, MTU), the TAP's offloads
(``TUNSETOFFLOAD`` from the GUEST_* features the driver accepted), pairs
enabled and disabled, SEND_RARP after a migration, the link's state, and
the counters (`info`), logged once per cause when a frame is dropped for
it.  See ``vdev/_native/src/net.h`` for the frame-level rules (headers,
mergeable buffers, the bounded wait for receive buffers).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
import os
import struct
from collections import Counter
from typing import Any

from vdev.device import Device, VirtQueue
from vdev.engine import ENGINE_COUNTERS, EngineClosed, NativeEngine, RingSpec
from vdev.errors import DeviceError, Unsupported
from vdev.histogram import LatencyHistogram
from vdev.metrics import TYPE_SLOTS, QueueSnapshot
from vdev.uapi.virtio import DeviceId, VirtioFeature
from vhost_user.messages import ProtocolFeature

from .cable import CableEnd
from .native import NET_COUNTERS, NET_GAUGES, RX, TX, NativePort, NetConfigC, NetQueueEngine
from .tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, Tap

log = logging.getLogger("backends.net")


class NetFeature(enum.IntFlag):
    """VIRTIO_NET_F_* (virtio 1.2 §5.1.3) as masks."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22


#: Offloads the device takes on transmit (the link finishes them: the TAP's
#: kernel, or the receiving guest when it accepted the matching GUEST_ feature).
HOST_OFFLOADS = (NetFeature.CSUM | NetFeature.HOST_TSO4 | NetFeature.HOST_TSO6
                 | NetFeature.HOST_ECN | NetFeature.HOST_UFO)
GUEST_OFFLOADS = (NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6
                  | NetFeature.GUEST_ECN | NetFeature.GUEST_UFO)
#: GUEST_* feature → the TUN_F_* flag that lets the TAP hand such frames to its reader.
GUEST_TO_TUN = {NetFeature.GUEST_CSUM: TUN_F_CSUM, NetFeature.GUEST_TSO4: TUN_F_TSO4,
                NetFeature.GUEST_TSO6: TUN_F_TSO6, NetFeature.GUEST_ECN: TUN_F_TSO_ECN,
                NetFeature.GUEST_UFO: TUN_F_UFO}

#: Config space (§5.1.4): mac[6], status, max_virtqueue_pairs, mtu.
CONFIG = struct.Struct("<6sHHH")
STATUS_LINK_UP = 1
MIN_MTU = 68
MAX_MTU = 65535
#: Default bound on how long a frame waits for receive buffers (see net.h).
NO_BUFFER_WAIT_MS = 1000
#: Counters that mean a frame was refused or lost, logged once per cause.
DROP_CAUSES = {
    "bad_header": "a transmitted frame had a header the device refuses",
    "too_short": "a frame was shorter than a virtio-net header plus an Ethernet header",
    "too_big": "a frame did not fit (larger than 64 KiB, or than a receive chain without MRG_RXBUF)",
    "no_buffer": "a frame found the receive ring without buffers and waited",
    "no_buffer_drops": "frames were dropped because the receive ring had no buffers for too long",
    "offload_drops": "GSO frames were dropped: the receiving driver did not accept that offload",
    "link_errors": "the link refused a read or write",
    "link_down_drops": "transmitted frames were dropped: the link is down",
    "disabled_drops": "transmitted frames were discarded on a disabled queue",
    "bad_chains": "malformed descriptor chains were returned to the driver",
}
MONITOR_INTERVAL = 1.0


def parse_mac(value: str) -> bytes:
    """``52:54:00:12:34:56`` → 6 bytes; multicast addresses are refused.

    Raises:
        ValueError: naming the value.
    """
    parts = value.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"--mac: {value!r} is not a MAC address (like 52:54:00:12:34:56)") from None
    if mac[0] & 1:
        raise ValueError(f"--mac: {value} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def rarp_frame(mac: bytes) -> bytes:
    """A RARP "request reverse" broadcast from ``mac`` (RFC 903), as QEMU and DPDK
    send after a migration so switches learn where the guest now is."""
    eth = b"\xff" * 6 + mac + struct.pack(">H", 0x8035)
    rarp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (eth + rarp).ljust(60, b"\0")


class Link(abc.ABC):
    """Where a device's frames go: what a queue pair's worker is joined to."""

    kind: str

    def attach(self, device: NetDevice) -> None:
        """Join the device's ports (called once, by the device)."""

    async def start(self, device: NetDevice) -> None:
        """Begin anything that needs the event loop (a cable's rendezvous)."""

    def guest_features(self) -> int:
        """GUEST_* offloads a receiver can be given over this link."""
        return int(GUEST_OFFLOADS)

    def set_guest_features(self, features: int) -> None:
        """The driver accepted ``features``."""

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        """The driver turned receive queue ``pair`` on or off."""

    def link_up(self) -> bool:
        return True

    def set_mtu(self, mtu: int) -> None:
        """The front-end set the guest's MTU (NET_SET_MTU)."""

    def info(self) -> dict[str, object]:
        return {"link": self.kind}

    def close(self, device: NetDevice) -> None:
        """Let go of the link (ports are still alive)."""


class TapLink(Link):
    kind = "tap"

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self._up: bool | None = True

    def attach(self, device: NetDevice) -> None:
        if len(self.tap.fds) < device.pairs:
            raise ValueError(f"TAP {self.tap.name} has {len(self.tap.fds)} queues, "
                             f"the device {device.pairs} pairs")
        for port, fd in zip(device.ports, self.tap.fds):
            port.set_fd(fd)

    def guest_features(self) -> int:
        return int(sum((f for f, t in GUEST_TO_TUN.items() if self.tap.offloads & t), NetFeature(0)))

    def set_guest_features(self, features: int) -> None:
        flags = 0
        for feature, tun in GUEST_TO_TUN.items():
            if features & feature:
                flags |= tun
        self.tap.set_offload(flags)

    def pair_enabled(self, pair: int, enabled: bool) -> None:
        self.tap.set_queue_attached(pair, enabled)

    def poll_up(self) -> bool | None:
        self._up = self.tap.link_up()
        return self._up

    def link_up(self) -> bool:
        return bool(self._up)

    def set_mtu(self, mtu: int) -> None:
        self.tap.set_mtu(mtu)

    def info(self) -> dict[str, object]:
        return {"link": "tap", "tap": self.tap.name, "tap_netns": self.tap.netns,
                "tap_created": self.tap.created, "tap_queues": len(self.tap.fds),
                "tap_up": self._up}

    def close(self, device: NetDevice) -> None:
        for port in device.ports:
            port.set_fd(None)
        self.tap.close()


class LoopbackLink(Link):
    kind = "loopback"

    def attach(self, device: NetDevice) -> None:
        for port in device.ports:
            port.set_peer(port)

    def close(self, device: NetDevice) -> None:
        for port in device.ports:
            port.set_peer(None)


class CableLink(Link):
    kind = "cable"

    def __init__(self, name: str) -> None:
        self.name = name
        self.end: CableEnd | None = None
        self.device: NetDevice | None = None

    def attach(self, device: NetDevice) -> None:
        self.device = device
        self.end = CableEnd(self.name, device.pairs, on_peer=self._on_peer, on_links=self._on_links)
        self.end.device = device
        self.end.join_local()

    async def start(self, device: NetDevice) -> None:
        assert self.end is not None
        self.end.start()

    def _on_peer(self, peer: CableEnd | None) -> None:
        dev = self.device
        assert dev is not None
        if peer is None:
            for port in dev.ports:
                port.set_peer(None)
            dev.link_changed()
            with contextlib.suppress(RuntimeError):   # no loop: nobody to meet
                if self.end is not None:
                    self.end.start()
            return
        other: NetDevice = peer.device
        for i, port in enumerate(dev.ports):
            port.set_peer(other.ports[i] if i < other.pairs else None)
        dev.link_changed()

    def _on_links(self, fds: list[int | None]) -> None:
        dev = self.device
        assert dev is not None
        for i, port in enumerate(dev.ports):
            port.set_fd(fds[i] if i < len(fds) else None)
        dev.link_changed()

    def link_up(self) -> bool:
        return self.end is not None and self.end.connected

    def info(self) -> dict[str, object]:
        where = None
        if self.end is not None and self.end.peer is not None:
            where = "this process"
        elif self.end is not None and self.end.remote:
            where = "another daemon"
        return {"link": "cable", "cable": self.name, "peer": where}

    def close(self, device: NetDevice) -> None:
        # Unlink both ends' workers before either port can be freed.
        end, self.end = self.end, None
        for port in device.ports:
            port.set_peer(None)
            port.set_fd(None)
        if end is not None:
            end.close()


class NetDevice(Device):
    device_id = DeviceId.NET
    name = "net"

    def __init__(self, link: Link, *, queues: int = 1, queue_size: int = 256, mac: bytes | None = None,
                 mtu: int | None = None, no_buffer_wait_ms: int = NO_BUFFER_WAIT_MS,
                 poll_us: int = 0) -> None:
        if not 1 <= queues <= 128:
            raise ValueError(f"--queues: {queues} is out of range 1..128")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"--mtu: {mtu} is out of range {MIN_MTU}..{MAX_MTU}")
        super().__init__(num_queues=2 * queues, queue_size=queue_size)
        self.pairs = queues
        self.mac = mac
        self.mtu = mtu
        self.poll_us = poll_us
        self.link = link
        self.cfg = NetConfigC(no_buffer_wait_ms)
        self.ports: list[NativePort] = []
        self._link_up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._logged: set[str] = set()
        #: Counters of rings whose engines stopped, by queue index.
        self._retired: dict[int, Counter[str]] = {}
        self._retired_hist: dict[int, LatencyHistogram] = {}
        self.rarps_sent = 0
        self.closed = False
        try:
            self.ports = [NativePort(self.cfg, i) for i in range(queues)]
            for port in self.ports:
                port.set_poll(poll_us)
            link.attach(self)
        except BaseException:
            for port in self.ports:
                port.close()
            raise
        self._link_up = link.link_up()

    # -- what the driver sees --------------------------------------------------------------------

    @property
    def features(self) -> int:
        f = (NetFeature.MRG_RXBUF | NetFeature.STATUS | NetFeature.GUEST_ANNOUNCE | HOST_OFFLOADS
             | NetFeature(self.link.guest_features()))
        if self.mac is not None:
            f |= NetFeature.MAC
        if self.mtu is not None:
            f |= NetFeature.MTU
        if self.pairs > 1:
            # MQ (and GUEST_ANNOUNCE) need CTRL_VQ, which the VMM adds: with
            # vhost-user the control queue is the front-end's.
            f |= NetFeature.MQ
        return int(f)

    @property
    def protocol_features(self) -> ProtocolFeature:
        return ProtocolFeature.RARP | ProtocolFeature.NET_MTU

    @property
    def has_config(self) -> bool:
        return True

    def config(self) -> bytes:
        status = STATUS_LINK_UP if self._link_up else 0
        return CONFIG.pack(self.mac or bytes(6), status, self.pairs, self.mtu or 0)

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.cfg.features = features
        try:
            self.link.set_guest_features(features)
        except OSError as exc:
            log.warning("net: the link refused offloads %#x: %s", features, exc.strerror)

    # -- queues -----------------------------------------------------------------------------------

    def create_engine(self, spec: RingSpec) -> NativeEngine | None:
        pair, which = divmod(spec.index, 2)
        return _PairEngine(self, self.ports[pair], which)

    async def process_queue(self, vq: VirtQueue) -> None:   # pragma: no cover - native only
        raise Unsupported("python data path", "vdev net serves its queues natively")

    def engine_retired(self, index: int, engine: NativeEngine) -> None:
        self._retired.setdefault(index, Counter()).update(
            {k: v for k, v in engine.stats().items() if k not in NET_GAUGES})
        self._retired_hist[index] = self._retired_hist.get(index, LatencyHistogram.empty()) + engine.histogram()

    def _pair_enabled(self, which: int, pair: int, enabled: bool) -> None:
        if which == RX:
            self.link.pair_enabled(pair, enabled)

    # -- the link ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start what needs the event loop: the link's own work and the monitor."""
        await self.link.start(self)
        self._spawn(self._monitor())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def link_changed(self) -> None:
        """The link went up or down: STATUS follows, and the driver is told."""
        up = self.link.link_up()
        if up == self._link_up:
            return
        self._link_up = up
        log.info("net: link %s (%s)", "up" if up else "down", self.link.kind)
        if self.runtime is not None and self.runtime.vrings:
            # A driver is running: tell it (a driver yet to come reads the config anyway).
            with contextlib.suppress(RuntimeError):      # no loop running: nobody to tell
                self._spawn(self.notify_config_change())

    async def _monitor(self) -> None:
        """Once a second: the TAP's state, and a log line for each new cause of loss."""
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            if isinstance(self.link, TapLink):
                await asyncio.to_thread(self.link.poll_up)
                self.link_changed()
            self.log_new_causes()

    def log_new_causes(self) -> None:
        for index, q in self.queue_stats().items():
            for cause, text in DROP_CAUSES.items():
                if q.get(cause) and cause not in self._logged:
                    self._logged.add(cause)
                    errno_note = ""
                    if cause == "link_errors" and q.get("last_errno"):
                        errno_note = f" ({os.strerror(int(q['last_errno']))})"
                    log.warning("net: queue %d: %s%s; counted in `info`, not logged again",
                                index, text, errno_note)

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: QEMU asks after a migration when the guest cannot announce itself."""
        frame = bytes(12) + rarp_frame(mac)
        rc = self.ports[0].inject(frame)
        if rc < 0:
            log.warning("net: RARP for %s not sent: %s", format_mac(mac), os.strerror(-rc))
            return
        self.rarps_sent += 1
        log.info("net: RARP sent for %s", format_mac(mac))

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"NET_SET_MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}", value=mtu)
        self.mtu = mtu
        try:
            self.link.set_mtu(mtu)
        except Exception as exc:   # the TAP refused: the front-end hears it failed
            raise DeviceError(f"NET_SET_MTU {mtu}: the link refused it: {exc}", value=mtu) from exc
        log.info("net: MTU %d", mtu)

    # -- counters --------------------------------------------------------------------------------

    def queue_stats(self) -> dict[int, dict[str, int]]:
        """Counters of every queue, running engines and retired ones added up."""
        out: dict[int, dict[str, int]] = {}
        engines = self.runtime.engines if self.runtime is not None else {}
        for index in range(self.num_queues):
            total: Counter[str] = Counter(self._retired.get(index, Counter()))
            engine = engines.get(index)
            if engine is not None:
                try:
                    live = engine.stats()
                except EngineClosed:     # stopped meanwhile (another thread's read)
                    live = {}
                total.update({k: v for k, v in live.items() if k not in NET_GAUGES})
                for name in NET_GAUGES:
                    total[name] = live.get(name, 0)
            out[index] = {name: int(total.get(name, 0)) for name in NET_COUNTERS}
        return out

    def queue_snapshots(self) -> dict[int, QueueSnapshot]:
        """Every ring's counters in the shape `vdev.metrics` reports (``--metrics``,
        ``latency``): requests are frames, bytes_read the bytes received into
        guest buffers (rx), bytes_written those sent from them (tx), errors the
        frames dropped.  Safe from any thread."""
        engines = self.runtime.engines if self.runtime is not None else {}
        out: dict[int, QueueSnapshot] = {}
        for index, q in self.queue_stats().items():
            hist = self._retired_hist.get(index, LatencyHistogram.empty())
            engine = engines.get(index)
            if engine is not None:
                with contextlib.suppress(EngineClosed):
                    hist = hist + engine.histogram()
            rx = index % 2 == RX
            counters = {name: q.get(name, 0) for name in ENGINE_COUNTERS}
            counters.update(requests=q["frames"], bytes_read=q["bytes"] if rx else 0,
                            bytes_written=0 if rx else q["bytes"], errors=q["dropped"], polled=q["polled"],
                            inflight=0)
            out[index] = QueueSnapshot(counters, (0,) * TYPE_SLOTS, hist, native=True)
        return out

    def info(self) -> dict[str, object]:
        queues = []
        for index, q in self.queue_stats().items():
            pair, which = divmod(index, 2)
            queues.append({"queue": index, "pair": pair, "kind": "rx" if which == RX else "tx", **q})
        acked = self.acked_features
        return {
            "device": "net",
            **self.link.info(),
            "link_up": self._link_up,
            "mac": format_mac(self.mac) if self.mac else None,
            "mtu": self.mtu,
            "queue_pairs": self.pairs,
            "features": [f.name for f in NetFeature if f.name and acked & f],
            "mergeable_rx_buffers": bool(acked & NetFeature.MRG_RXBUF),
            "version_1": bool(acked & VirtioFeature.VERSION_1),
            "rarps_sent": self.rarps_sent,
            "no_buffer_wait_ms": self.cfg.no_buffer_wait_ms,
            "poll_us": self.poll_us,
            "queues": queues,
        }

    # -- the end -------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        runtime = self.runtime
        if runtime is not None:
            for index in list(runtime.engines):
                runtime.stop_vring(index)
        self.link.close(self)
        for port in self.ports:
            port.close()
        self.ports = []


class _PairEngine(NetQueueEngine):
    """A ring of a pair that also tells the device when the driver turns it on or off."""

    def __init__(self, device: NetDevice, port: NativePort, which: int) -> None:
        super().__init__(port, which)
        self._device = device

    def set_enabled(self, enabled: bool) -> None:
        super().set_enabled(enabled)
        self._device._pair_enabled(self.which, self.port.pair, enabled)


__all__ = [
    "TX",
    "CableLink",
    "Link",
    "LoopbackLink",
    "NetDevice",
    "NetFeature",
    "TapLink",
    "parse_mac",
    "rarp_frame",
]
