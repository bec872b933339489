"""virtio-vsock (virtio 1.2 §5.10) on the `vdev.Device` framework.

Three queues (§5.10.2): rx (0, device → driver packets), tx (1, driver →
device packets) and event (2, device → driver events).  Config space is
``le64 guest_cid`` (§5.10.4); QEMU reads it with GET_CONFIG, which is why
`has_config` is true (the framework then offers the CONFIG protocol feature).

The device only moves packets between descriptor chains and the `Muxer`
(``backends.vsock.muxer``), which owns every connection and host socket:

* tx: each chain is one packet, a 44-byte header and ``len`` payload bytes
  in device-readable buffers (§5.10.6.4); it is decoded
  (`packet.Header`), checked and handed to `Muxer.send_pkt`, and the chain
  goes back at once with nothing written.  The tx queue is always drained,
  whatever the rx side does (§5.10.6.1: "The tx virtqueue MUST be processed
  even when the rx virtqueue is full"): what the guest sends is bounded by
  the credit each connection gave it, and replies to packets that belong to
  no connection wait in the muxer's bounded control queue.
* rx: while the muxer has a packet, take one chain, write header and
  payload, return it.  A chain is taken only when a packet is ready; when the
  ring runs dry we ask for a kick (`Queue.enable_notification`) and stop.
  The muxer calls back (``wake``) when host data or a reply becomes ready,
  and the rx queue is scheduled (`DeviceRuntime.schedule`).
* event: chains are left in the ring until there is an event to send.  The
  only event is VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.7): after a
  front-end went away (or when the rings show that another back end served
  this guest before us) the guest must drop its connections, because every
  host-side connection has been closed.  It is sent once, into the first
  event buffer the guest provides.

Note on QEMU: QEMU's vhost-user-vsock keeps the event queue for itself and
hands the back end only rx and tx (hw/virtio/vhost-vsock-common.c, "The
event queue belongs to QEMU"), so behind QEMU the TRANSPORT_RESET event is
never ours to send; front-ends that pass all three queues get it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vdev.device import Device, VirtQueue
from vdev.errors import GuestError
from vdev.queue import DescriptorChain
from vdev.uapi.virtio import DeviceId

from .muxer import Muxer
from .packet import (
    CONFIG,
    EVENT,
    EVENT_QUEUE,
    EVENT_TRANSPORT_RESET,
    HEADER_SIZE,
    MAX_PKT_PAYLOAD,
    RX_QUEUE,
    TX_QUEUE,
    Header,
    VsockFeature,
)

log = logging.getLogger("backends.vsock")


class VsockDevice(Device):
    """A virtio-vsock device for guest ``guest_cid``, bridged to Unix sockets at ``uds_path``.

    Create it inside a running event loop: it starts listening on
    ``uds_path`` (and on its group socket) at once.
    """

    device_id = DeviceId.VSOCK
    name = "vsock"

    def __init__(self, guest_cid: int, uds_path: str, *, group: str | None = None,
                 runtime_dir: Path | None = None, queue_size: int = 256) -> None:
        super().__init__(num_queues=3, queue_size=queue_size)
        self.guest_cid = guest_cid
        self.muxer = Muxer(guest_cid, uds_path, group=group, runtime_dir=runtime_dir,
                           wake=self._wake_rx)
        #: A TRANSPORT_RESET is owed to the guest (sent into its next event buffer).
        self.transport_reset_pending = False
        self.transport_resets_sent = 0
        self._session = False          # queues started since the last reset
        self._seen: dict[int, VirtQueue] = {}

    # -- what the driver sees ---------------------------------------------------------------

    @property
    def features(self) -> int:
        return int(VsockFeature.STREAM)

    @property
    def has_config(self) -> bool:
        return True

    def config(self) -> bytes:
        return CONFIG.pack(self.guest_cid)

    # -- queues ---------------------------------------------------------------------------------

    def _wake_rx(self) -> None:
        if self.runtime is not None:
            self.runtime.schedule(RX_QUEUE)

    async def process_queue(self, vq: VirtQueue) -> None:
        if self._seen.get(vq.index) is not vq:
            self._started(vq)
        if vq.index == TX_QUEUE:
            self._process_tx(vq)
            if self.muxer.has_pending_rx():
                self._wake_rx()
        elif vq.index == RX_QUEUE:
            self._process_rx(vq)
        elif vq.index == EVENT_QUEUE:
            self._process_event(vq)

    def _started(self, vq: VirtQueue) -> None:
        """First pass over a (re)started queue, before anything was taken from it.

        A ring that starts already moved in the first start of a session was
        served by another back end (a daemon that died, restarted): the guest
        gets a TRANSPORT_RESET.  A restart within the session where the VM paused
        and resumed (the ring resumes where it stopped) changes nothing; one from
        zero means the driver started over.
        """
        previous = self._seen.get(vq.index)
        self._seen[vq.index] = vq
        self._session = True
        q = vq.queue
        if (previous is not None and previous.queue.next_avail != 0
                and q.next_avail == 0 and q.next_used == 0):
            # Stopped after use and started again from nothing: the driver set the
            # device up afresh (guest reboot, driver reloaded).  The guest dropped its
            # sockets itself; drop ours so host programs see their end.  QEMU 7.2 says
            # no more than this (no SET_STATUS 0, no RESET_DEVICE) when a guest resets
            # the device.
            closed = self.muxer.reset()
            log.info("vsock: queue %d restarted from 0 after %d: the driver reinitialised the "
                     "device; %d connection(s) closed", vq.index, previous.queue.next_avail, closed)
        elif previous is None and (q.next_avail != 0 or q.next_used != 0):
            # Our predecessor (a daemon that died, or this one before a reconnect)
            # left connections in the guest that no longer exist on the host.
            if not self.transport_reset_pending:
                log.info("vsock: queue %d resumes at avail %d, used %d: the guest will get "
                         "a transport reset", vq.index, q.next_avail, q.next_used)
            self.transport_reset_pending = True
            if vq.index != EVENT_QUEUE and self.runtime is not None:
                self.runtime.schedule(EVENT_QUEUE)

    def _process_tx(self, vq: VirtQueue) -> None:
        for chain in vq.chains():
            try:
                self._tx_packet(vq, chain)
            except GuestError as exc:
                log.warning("vsock: tx chain %d: %s", chain.head, exc)
            vq.complete(chain, 0)

    def _tx_packet(self, vq: VirtQueue, chain: DescriptorChain) -> None:
        muxer = self.muxer
        reader = chain.reader(vq.mem)
        if reader.available < HEADER_SIZE:
            muxer.errors["short_header"] += 1
            log.debug("vsock: tx chain %d of %d bytes has no header", chain.head, reader.available)
            return
        hdr = Header.unpack(reader.read(HEADER_SIZE))
        if hdr.len > reader.available or hdr.len > MAX_PKT_PAYLOAD:
            # The header promises more than the chain carries (or than any sane packet).
            muxer.bad_packet(hdr, "bad_length")
            return
        muxer.send_pkt(hdr, reader.views(hdr.len) if hdr.len else ())

    def _pop(self, vq: VirtQueue) -> DescriptorChain | None:
        """The next chain, or None after asking the driver to kick when it adds one.

        Malformed chains go straight back (length 0), as `VirtQueue.chains` does.
        """
        q, mem = vq.queue, vq.mem
        while True:
            try:
                chain = q.pop(mem)
            except GuestError as exc:
                log.warning("vsock: bad chain on queue %d: %s", vq.index, exc)
                if exc.head is not None and q.broken is None:
                    vq.complete(exc.head, 0)
                    continue
                return None
            if chain is not None:
                return chain
            # virtio 1.2 §2.7.10: re-enable notifications, then look once more, or a
            # buffer added in between would wait for a kick that never comes.
            try:
                if not q.enable_notification(mem):
                    return None
            except GuestError as exc:
                log.warning("vsock: queue %d: %s", vq.index, exc)
                return None

    def _process_rx(self, vq: VirtQueue) -> None:
        muxer = self.muxer
        while muxer.has_pending_rx():
            chain = self._pop(vq)
            if chain is None:
                return          # no buffers: the driver's kick brings us back
            try:
                writer = chain.writer(vq.mem)
                room = writer.available - HEADER_SIZE
                if room < 1:
                    muxer.errors["bad_rx_buffer"] += 1
                    vq.complete(chain, 0)
                    continue
                pkt = muxer.recv_pkt(room)
                if pkt is None:     # has_pending_rx promised one; never leave a chain taken
                    vq.complete(chain, 0)
                    return
                hdr, data = pkt
                writer.write(hdr.pack() + data)     # one pass over the chain's buffers
                vq.complete(chain, writer.written)
            except GuestError as exc:
                log.warning("vsock: rx chain %d: %s", chain.head, exc)
                vq.complete(chain, 0)

    def _process_event(self, vq: VirtQueue) -> None:
        while self.transport_reset_pending:
            chain = self._pop(vq)
            if chain is None:
                return
            try:
                writer = chain.writer(vq.mem)
                writer.write(EVENT.pack(EVENT_TRANSPORT_RESET))
            except GuestError as exc:
                log.warning("vsock: event chain %d: %s", chain.head, exc)
                vq.complete(chain, 0)
                continue
            vq.complete(chain, writer.written)
            self.transport_reset_pending = False
            self.transport_resets_sent += 1
            log.info("vsock: sent TRANSPORT_RESET to guest %d", self.guest_cid)

    # -- life cycle -------------------------------------------------------------------------------

    def reset(self) -> None:
        """The front-end went away (or reset the device): every connection is gone.

        The guest learns it from a TRANSPORT_RESET at the next start.
        """
        super().reset()
        closed = self.muxer.reset()
        if self._session or closed:
            self.transport_reset_pending = True
        self._session = False
        self._seen.clear()

    async def aclose(self) -> None:
        self.muxer.close()

    def info(self) -> dict[str, Any]:
        return {
            "guest_cid": self.guest_cid,
            "uds_path": self.muxer.uds_path,
            "group": self.muxer.group,
            "group_socket": self.muxer.group_path,
            "transport_reset_pending": self.transport_reset_pending,
            "transport_resets_sent": self.transport_resets_sent,
            **self.muxer.info(),
        }


__all__ = ["VsockDevice"]
