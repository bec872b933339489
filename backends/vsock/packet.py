"""The virtio-vsock packet header and its constants (virtio 1.2 §5.10).

Every packet on the rx and tx queues starts with a 44-byte little-endian
header, ``struct virtio_vsock_hdr``::

    struct virtio_vsock_hdr {
        le64 src_cid;     /*  0 */
        le64 dst_cid;     /*  8 */
        le32 src_port;    /* 16 */
        le32 dst_port;    /* 20 */
        le32 len;         /* 24: payload bytes after the header */
        le16 type;        /* 28: 1 STREAM, 2 SEQPACKET */
        le16 op;          /* 30: Op */
        le32 flags;       /* 32: SHUTDOWN_* for OP_SHUTDOWN */
        le32 buf_alloc;   /* 36: sender's receive buffer for this connection */
        le32 fwd_cnt;     /* 40: bytes the sender has taken out of that buffer */
    };

This module is pure: bytes in, `Header` out and back.  It knows nothing of
queues, descriptor chains or sockets, so a native engine can use the same
codec (or reimplement it against the same tests).  Decoding never fails on
values: an unknown ``op`` or ``type`` is kept as a plain int so the caller
can answer it (RST) and count it, rather than drop it unseen.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

#: ``struct virtio_vsock_hdr``: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
#: buf_alloc, fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 44

#: Well-known CIDs (virtio 1.2 §5.10.4): 0 hypervisor, 1 local, 2 host; guests are >= 3.
CID_HYPERVISOR = 0
CID_LOCAL = 1
CID_HOST = 2
#: VMADDR_CID_ANY; the largest CID a guest may have is one below it.
CID_ANY = 0xFFFF_FFFF
MIN_GUEST_CID = 3
MAX_GUEST_CID = CID_ANY - 1

#: Ports are 32-bit.
MAX_PORT = 0xFFFF_FFFF

#: The largest payload we accept in one tx packet.  Linux sends at most 64 KiB
#: (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); Firecracker refuses more than that too.
MAX_PKT_PAYLOAD = 64 * 1024

#: Config space (virtio 1.2 §5.10.4): ``le64 guest_cid``.
CONFIG = struct.Struct("<Q")

#: ``struct virtio_vsock_event { le32 id; }`` (virtio 1.2 §5.10.6.7 Device Events).
EVENT = struct.Struct("<I")
EVENT_TRANSPORT_RESET = 0

#: Queue indices (virtio 1.2 §5.10.2).
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2


class VsockFeature(enum.IntFlag):
    """VIRTIO_VSOCK_F_* (virtio 1.2 §5.10.3) as masks."""

    STREAM = 1 << 0
    SEQPACKET = 1 << 1


class SockType(enum.IntEnum):
    """``hdr.type`` (virtio 1.2 §5.10.6.2 Addressing)."""

    STREAM = 1
    SEQPACKET = 2


class Op(enum.IntEnum):
    """``hdr.op`` (virtio 1.2 §5.10.6)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Shutdown(enum.IntFlag):
    """``hdr.flags`` of OP_SHUTDOWN (virtio 1.2 §5.10.6.5 Stream Sockets)."""

    RCV = 1    # the sender will receive no more data
    SEND = 2   # the sender will send no more data
    BOTH = 3


@dataclass(frozen=True, slots=True)
class Header:
    """One decoded ``virtio_vsock_hdr``.

    ``op`` and ``type`` are ints (compare with `Op` / `SockType`): a header
    with an unknown value still decodes, so it can be answered.
    """

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        """Decode the first 44 bytes of ``data``.

        Raises:
            ValueError: fewer than 44 bytes, naming how many there were.
        """
        if len(data) < HEADER_SIZE:
            raise ValueError(f"vsock header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                           self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        HEADER.pack_into(buf, offset, self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                         self.len, self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @property
    def op_name(self) -> str:
        try:
            return Op(self.op).name
        except ValueError:
            return f"op {self.op}"

    def reply(self, op: Op, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0,
              length: int = 0) -> Header:
        """A header going back to this one's sender: addresses swapped."""
        return Header(self.dst_cid, self.src_cid, self.dst_port, self.src_port, length,
                      SockType.STREAM, op, flags, buf_alloc, fwd_cnt)

    def with_len(self, length: int) -> Header:
        return replace(self, len=length)

    def __str__(self) -> str:
        return (f"{self.op_name} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} "
                f"len={self.len} type={self.type} flags={self.flags:#x} buf_alloc={self.buf_alloc} "
                f"fwd_cnt={self.fwd_cnt}")


def rst_for(hdr: Header) -> Header:
    """The RST answering ``hdr`` (virtio 1.2 §5.10.6.5: no socket at the destination → RST)."""
    return hdr.reply(Op.RST)


__all__ = [
    "CID_ANY",
    "CID_HOST",
    "CONFIG",
    "EVENT",
    "EVENT_QUEUE",
    "EVENT_TRANSPORT_RESET",
    "HEADER",
    "HEADER_SIZE",
    "MAX_GUEST_CID",
    "MAX_PKT_PAYLOAD",
    "MAX_PORT",
    "MIN_GUEST_CID",
    "RX_QUEUE",
    "TX_QUEUE",
    "Header",
    "Op",
    "Shutdown",
    "SockType",
    "VsockFeature",
    "rst_for",
]
