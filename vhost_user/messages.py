"""Every vhost-user request number, flag and payload layout, declared once.

Source: QEMU ``docs/interop/vhost-user.rst`` ("Message types", "Message
specification", "Protocol features"), cross-checked against the Linux UAPI
structs.  All integers are in the host's byte order: both ends run on one
machine, and only data *inside guest memory* is little-endian.

Payloads are frozen dataclasses.  Each has ``pack()`` and a classmethod
``unpack(data)``; ``unpack`` checks only syntax (size, reserved bits), never
protocol state, which is the handler's business.  A payload that fails the
check raises `ProtocolError` carrying the offending value.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field
from itertools import pairwise
from typing import ClassVar

from .errors import ProtocolError

# ---------------------------------------------------------------------------
# Request numbers
# ---------------------------------------------------------------------------


class FrontendReq(enum.IntEnum):
    """Requests the front-end (the VMM) sends to the back-end (spec: "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the SET_BACKEND_REQ_FD channel (spec: "Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class HeaderFlag(enum.IntFlag):
    """Bits of the header's ``flags`` word.  Bits 0-1 carry the version, which must be 1."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3
#: Every flag bit the spec defines; the others are reserved and must be zero.
# Fix: a plain int.  As a HeaderFlag, ``~KNOWN_FLAGS`` is the complement within the
# flag's own members (Python 3.11+ IntFlag), i.e. 0, and ``flags & ~KNOWN_FLAGS``
# never saw a reserved bit.
KNOWN_FLAGS = int(VERSION_MASK | HeaderFlag.REPLY | HeaderFlag.NEED_REPLY)


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks (spec: "Protocol features").

    Members are masks, not bit numbers, so ``features & ProtocolFeature.MQ``
    is always right.  Bits 20-23 are from QEMU's newest header and are never
    offered by us; they are here so a log can name them.
    """

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23


#: Virtio feature bit 30 reused by vhost-user: "I understand GET/SET_PROTOCOL_FEATURES".
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
#: Virtio feature bit 26: the back-end can log dirty pages (live migration).
VHOST_F_LOG_ALL = 1 << 26

#: Bit 8 of the u64 of SET_VRING_KICK/CALL/ERR: no fd attached.
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF
#: Bit 0 of SET_VRING_ADDR's flags: log writes to the used ring.
VHOST_VRING_F_LOG = 0x1

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12
#: Largest payload accepted.  rust-vmm caps at 4096; the largest legal payload
#: (a GET_CONFIG of 256 bytes, a crypto session of ~600) fits well inside.
MAX_PAYLOAD_SIZE = 4096
#: At most eight regions per SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS = 8
#: QEMU asserts the same bound on config space (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Largest number of fds one message may carry (SET_MEM_TABLE: one per region).
MAX_FDS = 8


def _need(cls_name: str, data: bytes, size: int, *, exact: bool = True) -> None:
    if (len(data) != size) if exact else (len(data) < size):
        raise ProtocolError(f"{cls_name} payload must be {'' if exact else 'at least '}{size} bytes",
                            value=len(data))


# ---------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (size 0)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _need("Empty", data, 0)
        return cls()


@dataclass(frozen=True, slots=True)
class U64:
    """``uint64_t u64;`` features, counts, status bytes and acks."""

    value: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        _need("U64", data, 8)
        return cls(cls.STRUCT.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK / CALL / ERR: ring index in bits 0-7, NOFD in bit 8."""

    index: int
    nofd: bool = False

    def pack(self) -> bytes:
        return U64.STRUCT.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))

    @classmethod
    def unpack(cls, data: bytes) -> VringFd:
        _need("VringFd", data, 8)
        (raw,) = U64.STRUCT.unpack(data)
        if raw & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError("reserved bits set in vring fd word", value=hex(raw))
        return cls(raw & VRING_IDX_MASK, bool(raw & VRING_NOFD_MASK))


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state { unsigned int index; unsigned int num; }``

    ``num`` is the queue size (SET_VRING_NUM), the next avail index
    (SET/GET_VRING_BASE, split ring: bits 0-15) or 0/1 (SET_VRING_ENABLE).
    """

    index: int
    num: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        _need("VringState", data, 8)
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: index, flags, desc, used, avail, log (note the order).

    The addresses are front-end virtual addresses, not guest-physical.  The
    spec's table shows a "size" column, but no such field is on the wire.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        _need("VringAddr", data, 40)
        v = cls(*cls.STRUCT.unpack(data))
        if v.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError("unknown vring address flags", value=hex(v.flags))
        # virtio 1.2 §2.7: descriptor table 16-byte, avail 2-byte, used 4-byte aligned.
        for name, addr, align in (("desc", v.desc, 16), ("avail", v.avail, 2), ("used", v.used, 4)):
            if addr % align:
                raise ProtocolError(f"vring {name} address not {align}-byte aligned", value=hex(addr))
        return v


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """``VhostUserMemoryRegion { u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset; }``"""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                                self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryRegion:
        _need("MemoryRegion", data, 32)
        r = cls(*cls.STRUCT.unpack(data))
        r.validate()
        return r

    def validate(self) -> None:
        if self.memory_size == 0:
            raise ProtocolError("memory region of size 0", value=hex(self.guest_phys_addr))
        for name, base in (("guest_phys_addr", self.guest_phys_addr),
                           ("userspace_addr", self.userspace_addr),
                           ("mmap_offset", self.mmap_offset)):
            if base + self.memory_size > 1 << 64:
                raise ProtocolError(f"memory region {name} + size overflows 64 bits",
                                    value=(hex(base), hex(self.memory_size)))


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """``VhostUserMemory { u32 nregions; u32 padding; VhostUserMemoryRegion regions[]; }``

    QEMU sends only the used entries: size = 8 + 32 * nregions, at most 8.
    """

    regions: tuple[MemoryRegion, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        _need("MemoryTable", data, 8, exact=False)
        n, _padding = cls.HEAD.unpack_from(data)
        if not 1 <= n <= MAX_MEM_TABLE_REGIONS:
            raise ProtocolError(f"memory table must have 1..{MAX_MEM_TABLE_REGIONS} regions", value=n)
        # Older front-ends sent the whole 8-entry array; accept both.
        if len(data) not in (8 + 32 * n, 8 + 32 * MAX_MEM_TABLE_REGIONS):
            raise ProtocolError(f"memory table with {n} regions has wrong size", value=len(data))
        regions = tuple(MemoryRegion.unpack(data[8 + 32 * i: 40 + 32 * i]) for i in range(n))
        _check_no_overlap(regions)
        return cls(regions)


def _check_no_overlap(regions: tuple[MemoryRegion, ...]) -> None:
    spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
    for (_a0, a1), (b0, _b1) in pairwise(spans):
        if b0 < a1:
            raise ProtocolError("memory regions overlap in guest-physical space", value=hex(b0))


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: ``{ u64 padding; VhostUserMemoryRegion region; }``"""

    region: MemoryRegion

    def pack(self) -> bytes:
        return U64.STRUCT.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemoryRegion:
        _need("SingleMemoryRegion", data, 40)
        return cls(MemoryRegion.unpack(data[8:]))


@dataclass(frozen=True, slots=True)
class LogDescription:
    """SET_LOG_BASE: ``{ u64 mmap_size; u64 mmap_offset; }``"""

    mmap_size: int
    mmap_offset: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LogDescription:
        _need("LogDescription", data, 16)
        return cls(*cls.STRUCT.unpack(data))


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    """``struct vhost_iotlb_msg { u64 iova, size, uaddr; u8 perm, type; }`` (32 bytes with C padding)"""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, data: bytes) -> IotlbMsg:
        _need("IotlbMsg", data, 32)
        m = cls(*cls.STRUCT.unpack(data))
        if m.perm > 3:
            raise ProtocolError("IOTLB permission out of range", value=m.perm)
        if m.type not in IotlbType._value2member_map_:
            raise ProtocolError("unknown IOTLB message type", value=m.type)
        return m


class ConfigFlag(enum.IntEnum):
    """SET_CONFIG flags.  The spec gives an enum (0 guest write, 1 migration);
    rust-vmm uses bit flags 1/2 instead, a known interop trap, so we accept the
    enum values only and name the value we refuse."""

    FRONTEND = 0
    MIGRATION = 1


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """``{ u32 offset; u32 size; u32 flags; u8 payload[size]; }``"""

    offset: int
    size: int
    flags: int
    payload: bytes = b""
    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        _need("ConfigSpace", data, 12, exact=False)
        offset, size, flags = cls.HEAD.unpack_from(data)
        payload = bytes(data[12:])
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config size above {MAX_CONFIG_SIZE}", value=size)
        if offset + size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config offset+size above {MAX_CONFIG_SIZE}", value=(offset, size))
        if len(payload) != size:
            raise ProtocolError("config payload length differs from its size field",
                                value=(size, len(payload)))
        return cls(offset, size, flags, payload)


@dataclass(frozen=True, slots=True)
class VringArea:
    """VRING_HOST_NOTIFIER_MSG: ``{ u64 u64; u64 size; u64 offset; }`` (u64: index | NOFD<<8)"""

    index: int
    size: int
    offset: int
    nofd: bool = False
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0), self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes) -> VringArea:
        _need("VringArea", data, 24)
        u, size, offset = cls.STRUCT.unpack(data)
        if u & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError("reserved bits set in vring area word", value=hex(u))
        return cls(u & VRING_IDX_MASK, size, offset, bool(u & VRING_NOFD_MASK))


@dataclass(frozen=True, slots=True)
class InflightDescription:
    """``{ u64 mmap_size; u64 mmap_offset; u16 num_queues; u16 queue_size; }``

    The C struct is not packed: 24 bytes on the wire (4 bytes tail padding),
    not 20.  libvhost-user refuses any other size, and so do we.
    """

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> InflightDescription:
        _need("InflightDescription", data, 24)
        return cls(*cls.STRUCT.unpack(data))


@dataclass(frozen=True, slots=True)
class SharedObject:
    """``{ u8 uuid[16]; }``: a UUID in its RFC 4122 byte order."""

    uuid: uuid.UUID

    def pack(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def unpack(cls, data: bytes) -> SharedObject:
        _need("SharedObject", data, 16)
        return cls(uuid.UUID(bytes=bytes(data)))


class TransferDirection(enum.IntEnum):
    SAVE = 0
    LOAD = 1


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer:
    """SET_DEVICE_STATE_FD: ``{ u32 direction; u32 phase; }`` (phase 0 = stopped, the only one)."""

    direction: int
    phase: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.direction, self.phase)

    @classmethod
    def unpack(cls, data: bytes) -> DeviceStateTransfer:
        _need("DeviceStateTransfer", data, 8)
        v = cls(*cls.STRUCT.unpack(data))
        if v.direction not in (0, 1):
            raise ProtocolError("unknown device-state transfer direction", value=v.direction)
        if v.phase != 0:
            raise ProtocolError("unknown device-state transfer phase", value=v.phase)
        return v


@dataclass(frozen=True, slots=True)
class CryptoSession:
    """CREATE_CRYPTO_SESSION: ``{ i64 session_id; <session setup data, key, auth key> }``.

    Only the leading session id is interpreted; the rest is kept verbatim,
    because its layout follows QEMU's internal CryptoDevBackendSymSessionInfo
    and no back end of ours offers CRYPTO_SESSION.
    """

    session_id: int
    body: bytes = field(default=b"")

    def pack(self) -> bytes:
        return struct.pack("=q", self.session_id) + self.body

    @classmethod
    def unpack(cls, data: bytes) -> CryptoSession:
        _need("CryptoSession", data, 8, exact=False)
        return cls(struct.unpack_from("=q", data)[0], bytes(data[8:]))


@dataclass(frozen=True, slots=True)
class ShmemMap:
    """BACKEND_SHMEM_MAP/UNMAP: ``{ u8 shmid; u8 pad[7]; u64 fd_offset, shm_offset, len, flags; }``"""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int
    STRUCT: ClassVar[struct.Struct] = struct.Struct("=B7xQQQQ")

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.shmid, self.fd_offset, self.shm_offset, self.len, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> ShmemMap:
        _need("ShmemMap", data, 40)
        return cls(*cls.STRUCT.unpack(data))


Payload = (Empty | U64 | VringFd | VringState | VringAddr | MemoryTable | SingleMemoryRegion
           | LogDescription | IotlbMsg | ConfigSpace | VringArea | InflightDescription
           | SharedObject | DeviceStateTransfer | CryptoSession | ShmemMap)

#: Every payload class, for tests that walk them all.
PAYLOAD_TYPES: tuple[type, ...] = (Empty, U64, VringFd, VringState, VringAddr, MemoryRegion,
                                   MemoryTable, SingleMemoryRegion, LogDescription, IotlbMsg,
                                   ConfigSpace, VringArea, InflightDescription, SharedObject,
                                   DeviceStateTransfer, CryptoSession, ShmemMap)


# ---------------------------------------------------------------------------
# The dispatch table, as data
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What one request looks like on the wire.

    ``fds`` is the allowed number of attached fds as (min, max).  ``reply`` is
    the payload type of the defined reply, or None when the request has none
    (it may still be acked with REPLY_ACK).  ``feature`` is the protocol
    feature that must be negotiated before the request is legal.
    """

    payload: type[Payload]
    fds: tuple[int, int] = (0, 0)
    reply: type[Payload] | None = None
    feature: ProtocolFeature | None = None


_F = ProtocolFeature
FRONTEND_REQUESTS: dict[FrontendReq, RequestSpec] = {
    FrontendReq.GET_FEATURES: RequestSpec(Empty, reply=U64),
    FrontendReq.SET_FEATURES: RequestSpec(U64),
    FrontendReq.SET_OWNER: RequestSpec(Empty),
    FrontendReq.RESET_OWNER: RequestSpec(Empty),
    FrontendReq.SET_MEM_TABLE: RequestSpec(MemoryTable, fds=(1, MAX_MEM_TABLE_REGIONS)),
    FrontendReq.SET_LOG_BASE: RequestSpec(LogDescription, fds=(0, 1)),
    FrontendReq.SET_LOG_FD: RequestSpec(Empty, fds=(1, 1)),
    FrontendReq.SET_VRING_NUM: RequestSpec(VringState),
    FrontendReq.SET_VRING_ADDR: RequestSpec(VringAddr),
    FrontendReq.SET_VRING_BASE: RequestSpec(VringState),
    FrontendReq.GET_VRING_BASE: RequestSpec(VringState, reply=VringState),
    FrontendReq.SET_VRING_KICK: RequestSpec(VringFd, fds=(0, 1)),
    FrontendReq.SET_VRING_CALL: RequestSpec(VringFd, fds=(0, 1)),
    FrontendReq.SET_VRING_ERR: RequestSpec(VringFd, fds=(0, 1)),
    FrontendReq.GET_PROTOCOL_FEATURES: RequestSpec(Empty, reply=U64),
    FrontendReq.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    FrontendReq.GET_QUEUE_NUM: RequestSpec(Empty, reply=U64, feature=_F.MQ),
    FrontendReq.SET_VRING_ENABLE: RequestSpec(VringState),
    FrontendReq.SEND_RARP: RequestSpec(U64, feature=_F.RARP),
    FrontendReq.NET_SET_MTU: RequestSpec(U64, feature=_F.NET_MTU),
    FrontendReq.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=(1, 1), feature=_F.BACKEND_REQ),
    FrontendReq.IOTLB_MSG: RequestSpec(IotlbMsg, reply=U64),
    FrontendReq.SET_VRING_ENDIAN: RequestSpec(VringState, feature=_F.CROSS_ENDIAN),
    FrontendReq.GET_CONFIG: RequestSpec(ConfigSpace, reply=ConfigSpace, feature=_F.CONFIG),
    FrontendReq.SET_CONFIG: RequestSpec(ConfigSpace, feature=_F.CONFIG),
    FrontendReq.CREATE_CRYPTO_SESSION: RequestSpec(CryptoSession, reply=CryptoSession,
                                                   feature=_F.CRYPTO_SESSION),
    FrontendReq.CLOSE_CRYPTO_SESSION: RequestSpec(U64, feature=_F.CRYPTO_SESSION),
    FrontendReq.POSTCOPY_ADVISE: RequestSpec(Empty, reply=Empty, feature=_F.PAGEFAULT),
    FrontendReq.POSTCOPY_LISTEN: RequestSpec(Empty, feature=_F.PAGEFAULT),
    FrontendReq.POSTCOPY_END: RequestSpec(Empty, reply=U64, feature=_F.PAGEFAULT),
    FrontendReq.GET_INFLIGHT_FD: RequestSpec(InflightDescription, reply=InflightDescription,
                                             feature=_F.INFLIGHT_SHMFD),
    FrontendReq.SET_INFLIGHT_FD: RequestSpec(InflightDescription, fds=(1, 1),
                                             feature=_F.INFLIGHT_SHMFD),
    FrontendReq.GPU_SET_SOCKET: RequestSpec(Empty, fds=(1, 1)),
    FrontendReq.RESET_DEVICE: RequestSpec(Empty, feature=_F.RESET_DEVICE),
    FrontendReq.VRING_KICK: RequestSpec(VringState, feature=_F.INBAND_NOTIFICATIONS),
    FrontendReq.GET_MAX_MEM_SLOTS: RequestSpec(Empty, reply=U64, feature=_F.CONFIGURE_MEM_SLOTS),
    FrontendReq.ADD_MEM_REG: RequestSpec(SingleMemoryRegion, fds=(1, 1),
                                         feature=_F.CONFIGURE_MEM_SLOTS),
    # spec: old front-ends attached an fd to REM_MEM_REG; close it, don't fail.
    FrontendReq.REM_MEM_REG: RequestSpec(SingleMemoryRegion, fds=(0, 1),
                                         feature=_F.CONFIGURE_MEM_SLOTS),
    FrontendReq.SET_STATUS: RequestSpec(U64, feature=_F.STATUS),
    FrontendReq.GET_STATUS: RequestSpec(Empty, reply=U64, feature=_F.STATUS),
    FrontendReq.GET_SHARED_OBJECT: RequestSpec(SharedObject, reply=U64, feature=_F.SHARED_OBJECT),
    FrontendReq.SET_DEVICE_STATE_FD: RequestSpec(DeviceStateTransfer, fds=(1, 1), reply=U64,
                                                 feature=_F.DEVICE_STATE),
    FrontendReq.CHECK_DEVICE_STATE: RequestSpec(Empty, reply=U64, feature=_F.DEVICE_STATE),
}

BACKEND_REQUESTS: dict[BackendReq, RequestSpec] = {
    BackendReq.IOTLB_MSG: RequestSpec(IotlbMsg),
    BackendReq.CONFIG_CHANGE_MSG: RequestSpec(Empty, feature=_F.CONFIG),
    BackendReq.VRING_HOST_NOTIFIER_MSG: RequestSpec(VringArea, fds=(0, 1), feature=_F.HOST_NOTIFIER),
    BackendReq.VRING_CALL: RequestSpec(VringState, feature=_F.INBAND_NOTIFICATIONS),
    BackendReq.VRING_ERR: RequestSpec(VringState, feature=_F.INBAND_NOTIFICATIONS),
    BackendReq.SHARED_OBJECT_ADD: RequestSpec(SharedObject, feature=_F.SHARED_OBJECT),
    BackendReq.SHARED_OBJECT_REMOVE: RequestSpec(SharedObject, feature=_F.SHARED_OBJECT),
    BackendReq.SHARED_OBJECT_LOOKUP: RequestSpec(SharedObject, reply=U64, feature=_F.SHARED_OBJECT),
    BackendReq.SHMEM_MAP: RequestSpec(ShmemMap, fds=(1, 1), feature=_F.SHMEM),
    BackendReq.SHMEM_UNMAP: RequestSpec(ShmemMap, feature=_F.SHMEM),
}
