"""Golden wire bytes for every payload layout, the header, and the dispatch table.

The expected bytes are written out by hand from the C layouts in
/work/shared/design/protocol.md §3 (never produced by the classes' own
``pack``).  vhost-user uses the host's byte order; these hex strings are
little-endian, the byte order of every machine we run on.
"""

from __future__ import annotations

import sys
import uuid

import pytest

from vhost_user.errors import ProtocolError
from vhost_user.messages import (
    BACKEND_REQUESTS,
    FRONTEND_REQUESTS,
    HEADER,
    PAYLOAD_TYPES,
    BackendReq,
    ConfigSpace,
    CryptoSession,
    DeviceStateTransfer,
    Empty,
    FrontendReq,
    HeaderFlag,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SharedObject,
    ShmemMap,
    SingleMemoryRegion,
    U64,
    VringAddr,
    VringArea,
    VringFd,
    VringState,
)
from vhost_user.session import BackendSession, Framer, FrontendSession, RawMessage, encode

pytestmark = pytest.mark.skipif(sys.byteorder != "little",
                                reason="golden bytes are written in little-endian host order")


def h(text: str) -> bytes:
    """Hex with free whitespace, so field boundaries can be shown."""
    return bytes.fromhex("".join(text.split()))


# A region used in several layouts: gpa 0x100000, size 0x200000,
# userspace_addr 0x7f00_0000_0000, mmap_offset 0x1000.
REGION = MemoryRegion(0x100000, 0x200000, 0x7F00_0000_0000, 0x1000)
REGION_HEX = ("0000100000000000"    # guest_phys_addr u64 @0
              "0000200000000000"    # memory_size u64 @8
              "00000000007f0000"    # userspace_addr u64 @16
              "0010000000000000")   # mmap_offset u64 @24
REGION2 = MemoryRegion(0x400000, 0x1000, 0x7F00_0030_0000, 0)
REGION2_HEX = ("0000400000000000" "0010000000000000" "0000300000 7f0000" "0000000000000000")

UUID = uuid.UUID("12345678-9abc-def0-1122-334455667788")

# (object, expected bytes): at least one per class in PAYLOAD_TYPES.
GOLDEN: list[tuple[object, bytes]] = [
    (Empty(), b""),
    (U64(0x0123456789ABCDEF), h("efcdab8967452301")),
    (U64(0), h("0000000000000000")),
    (VringFd(3), h("0300000000000000")),
    (VringFd(5, nofd=True), h("0501000000000000")),          # bit 8 = NOFD
    (VringFd(255), h("ff00000000000000")),
    (VringState(1, 256), h("01000000 00010000")),            # index u32, num u32
    # index u32, flags u32, desc u64, USED u64, AVAIL u64, log u64: 40 bytes, no size field.
    (VringAddr(2, 1, desc=0x1000, used=0x3000, avail=0x2000, log=0x4000),
     h("02000000 01000000 0010000000000000 0030000000000000 0020000000000000 0040000000000000")),
    (REGION, h(REGION_HEX)),
    (MemoryTable((REGION,)), h("01000000 00000000" + REGION_HEX)),
    (MemoryTable((REGION, REGION2)), h("02000000 00000000" + REGION_HEX + REGION2_HEX)),
    (SingleMemoryRegion(REGION), h("0000000000000000" + REGION_HEX)),   # u64 padding first
    (LogDescription(0x2000, 0x10), h("0020000000000000 1000000000000000")),
    # iova, size, uaddr u64; perm u8, type u8; 6 bytes C tail padding = 32.
    (IotlbMsg(0x1000, 0x2000, 0x7F00_0000_1000, perm=3, type=2),
     h("0010000000000000 0020000000000000 00100000007f0000 03 02 000000000000")),
    (ConfigSpace(4, 3, 1, b"abc"), h("04000000 03000000 01000000 616263")),
    (ConfigSpace(0, 0, 0), h("00000000 00000000 00000000")),
    # u64 (index | NOFD<<8), size u64, offset u64.
    (VringArea(1, 0x1000, 0x2000), h("0100000000000000 0010000000000000 0020000000000000")),
    (VringArea(7, 0, 0, nofd=True), h("0701000000000000 0000000000000000 0000000000000000")),
    # mmap_size u64, mmap_offset u64, num_queues u16, queue_size u16, 4 bytes padding = 24.
    (InflightDescription(0x3000, 0x40, 2, 256),
     h("0030000000000000 4000000000000000 0200 0001 00000000")),
    (SharedObject(UUID), h("123456789abcdef01122334455667788")),   # RFC 4122 order
    (DeviceStateTransfer(1, 0), h("01000000 00000000")),
    (CryptoSession(-1, b"xyz"), h("ffffffffffffffff 78797a")),
    (CryptoSession(5), h("0500000000000000")),
    # shmid u8, 7 padding, fd_offset, shm_offset, len, flags u64 = 40.
    (ShmemMap(3, 0x1000, 0x2000, 0x3000, 1),
     h("03 00000000000000 0010000000000000 0020000000000000 0030000000000000 0100000000000000")),
]


def _id(case: tuple[object, bytes]) -> str:
    return type(case[0]).__name__


def test_every_payload_type_has_golden_bytes() -> None:
    assert {type(obj) for obj, _ in GOLDEN} == set(PAYLOAD_TYPES)


@pytest.mark.parametrize("case", GOLDEN, ids=[_id(c) for c in GOLDEN])
def test_pack_matches_golden(case: tuple[object, bytes]) -> None:
    obj, wire = case
    assert obj.pack() == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", GOLDEN, ids=[_id(c) for c in GOLDEN])
def test_unpack_golden_gives_object(case: tuple[object, bytes]) -> None:
    obj, wire = case
    assert type(obj).unpack(wire) == obj  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls,size", [
    (Empty, 0), (U64, 8), (VringFd, 8), (VringState, 8), (VringAddr, 40), (MemoryRegion, 32),
    (SingleMemoryRegion, 40), (LogDescription, 16), (IotlbMsg, 32), (VringArea, 24),
    (InflightDescription, 24), (SharedObject, 16), (DeviceStateTransfer, 8), (ShmemMap, 40),
])
def test_fixed_size_payloads_reject_other_sizes(cls: type, size: int) -> None:
    for bad in (size - 1, size + 1, size + 8):
        if bad < 0:
            continue
        with pytest.raises(ProtocolError) as ei:
            cls.unpack(bytes(bad))
        assert ei.value.value == bad
        assert not ei.value.fatal


def rejected(cls: type, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        cls.unpack(data)
    return ei.value


# -- traps -------------------------------------------------------------------------


def test_vring_addr_has_no_size_field() -> None:
    # A 48-byte layout with a size field after flags (the spec table's misleading
    # column) must not be accepted.
    assert rejected(VringAddr, bytes(48)).value == 48
    addr = VringAddr.unpack(h("00000000 00000000 0010000000000000 0030000000000000 "
                              "0020000000000000 0000000000000000"))
    assert (addr.desc, addr.used, addr.avail) == (0x1000, 0x3000, 0x2000)


@pytest.mark.parametrize("field,wire,value", [
    ("desc", "0810000000000000 0030000000000000 0020000000000000", "0x1008"),
    ("used", "0010000000000000 0230000000000000 0020000000000000", "0x3002"),
    ("avail", "0010000000000000 0030000000000000 0120000000000000", "0x2001"),
])
def test_vring_addr_misalignment_names_the_address(field: str, wire: str, value: str) -> None:
    err = rejected(VringAddr, h("00000000 00000000" + wire + "0000000000000000"))
    assert err.value == value
    assert field in err.message


def test_vring_addr_accepts_minimum_alignment() -> None:
    # desc 16, used 4, avail 2 (virtio 1.2 §2.7).
    a = VringAddr.unpack(h("00000000 00000000 1000000000000000 0400000000000000 "
                           "0200000000000000 0000000000000000"))
    assert (a.desc, a.used, a.avail) == (0x10, 0x4, 0x2)


def test_vring_addr_unknown_flags() -> None:
    err = rejected(VringAddr, h("00000000 02000000" + "00" * 32))
    assert err.value == "0x2"


def test_inflight_description_is_24_bytes_not_20() -> None:
    assert rejected(InflightDescription, h("0030000000000000 4000000000000000 0200 0001")).value == 20
    assert len(InflightDescription(1, 2, 3, 4).pack()) == 24


def test_vring_fd_reserved_bits() -> None:
    assert rejected(VringFd, h("0302000000000000")).value == "0x203"          # bit 9
    assert rejected(VringFd, h("0000000000000080")).value == "0x8000000000000000"
    assert VringFd.unpack(h("0001000000000000")) == VringFd(0, nofd=True)


def test_vring_area_reserved_bits() -> None:
    assert rejected(VringArea, h("0104000000000000" + "00" * 16)).value == "0x401"


def test_config_payload_length_must_equal_size() -> None:
    assert rejected(ConfigSpace, h("00000000 04000000 00000000 616263")).value == (4, 3)
    assert rejected(ConfigSpace, h("00000000 02000000 00000000 616263")).value == (2, 3)


def test_config_size_limits() -> None:
    err = rejected(ConfigSpace, h("00000000 01010000 00000000") + bytes(257))
    assert err.value == 257
    assert rejected(ConfigSpace, h("fa000000 08000000 00000000") + bytes(8)).value == (250, 8)
    full = ConfigSpace.unpack(h("00000000 00010000 00000000") + bytes(range(256)))
    assert full.size == 256 and full.payload == bytes(range(256))


def test_config_shorter_than_header() -> None:
    assert rejected(ConfigSpace, bytes(11)).value == 11


def test_memory_table_full_eight_slot_form() -> None:
    # Older front-ends send all 8 slots (264 bytes) with nregions saying how many count.
    wire = h("02000000 00000000" + REGION_HEX + REGION2_HEX) + bytes(32 * 6)
    assert len(wire) == 264
    assert MemoryTable.unpack(wire) == MemoryTable((REGION, REGION2))


def test_memory_table_eight_regions() -> None:
    def u64(v: int) -> bytes:
        return v.to_bytes(8, "little")

    regions = tuple(MemoryRegion(i << 20, 1 << 20, 0x7F00_0000_0000 + (i << 20), 0) for i in range(8))
    wire = h("08000000 00000000") + b"".join(
        u64(i << 20) + u64(1 << 20) + u64(0x7F00_0000_0000 + (i << 20)) + u64(0) for i in range(8))
    assert len(wire) == 264
    assert MemoryTable.unpack(wire).regions == regions


@pytest.mark.parametrize("n", [0, 9])
def test_memory_table_region_count(n: int) -> None:
    wire = h(f"{n:02x}000000 00000000") + bytes(32 * n)
    assert rejected(MemoryTable, wire).value == n


def test_memory_table_size_must_match_count() -> None:
    wire = h("02000000 00000000" + REGION_HEX)            # says 2, carries 1
    assert rejected(MemoryTable, wire).value == 40
    assert rejected(MemoryTable, bytes(7)).value == 7


def test_memory_table_rejects_overlap() -> None:
    # second region starts at 0x2ff000, inside [0x100000, 0x300000)
    overlapping = "00f0 2f00 0000 0000" "0000 1000 0000 0000" "0000 0000 0080 0000" "0000000000000000"
    err = rejected(MemoryTable, h("02000000 00000000" + REGION_HEX + overlapping))
    assert err.value == "0x2ff000"


def test_memory_table_adjacent_regions_are_fine() -> None:
    adjacent = "0000 3000 0000 0000" "0010 0000 0000 0000" "0000 0000 0080 0000" "0000000000000000"
    t = MemoryTable.unpack(h("02000000 00000000" + REGION_HEX + adjacent))
    assert t.regions[1].guest_phys_addr == 0x300000


def test_memory_region_size_zero_and_overflow() -> None:
    assert rejected(MemoryRegion, h("0000100000000000" + "00" * 24)).value == "0x100000"
    err = rejected(MemoryRegion, h("00000000000000ff 0000000000000002" + "00" * 16))
    assert err.value == (hex(0xFF00_0000_0000_0000), hex(0x0200_0000_0000_0000))


def test_iotlb_rejects_bad_perm_and_type() -> None:
    base = "0010000000000000 0020000000000000 0030000000000000"
    assert rejected(IotlbMsg, h(base + "04 02 000000000000")).value == 4
    assert rejected(IotlbMsg, h(base + "03 05 000000000000")).value == 5
    assert rejected(IotlbMsg, h(base + "03 00 000000000000")).value == 0


def test_device_state_transfer_rejects_unknown() -> None:
    assert rejected(DeviceStateTransfer, h("02000000 00000000")).value == 2
    assert rejected(DeviceStateTransfer, h("00000000 01000000")).value == 1


def test_crypto_session_needs_its_id() -> None:
    assert rejected(CryptoSession, bytes(7)).value == 7


# -- header --------------------------------------------------------------------------


def test_header_encode_golden() -> None:
    # request u32, flags u32 (version 1 in bits 0-1), size u32, then the payload.
    assert encode(FrontendReq.GET_FEATURES) == h("01000000 01000000 00000000")
    assert encode(FrontendReq.GET_VRING_BASE, h("0000000000000000")) == \
        h("0b000000 01000000 08000000 0000000000000000")
    assert FrontendSession.request(FrontendReq.SET_VRING_NUM, h("0000000000010000"), need_reply=True) == \
        h("08000000 09000000 08000000 0000000000010000")            # NEED_REPLY = bit 3
    assert BackendSession.reply(FrontendReq.GET_FEATURES, h("0000004000000000")) == \
        h("01000000 05000000 08000000 0000004000000000")            # REPLY = bit 2
    assert HEADER.size == 12


def test_header_decode_golden() -> None:
    f = Framer()
    f.receive_data(h("18000000 0d000000 0c000000 00000000 00000000 00000000"))
    raw = f.next_raw()
    assert raw == RawMessage(24, 0x0D, bytes(12), ())
    assert raw.flags & HeaderFlag.REPLY and raw.flags & HeaderFlag.NEED_REPLY


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(ProtocolError) as ei:
        encode(FrontendReq.SET_CONFIG, bytes(4097))
    assert ei.value.value == 4097


# -- the dispatch table ------------------------------------------------------------


def test_every_frontend_request_has_a_table_entry() -> None:
    assert [r.value for r in FrontendReq] == list(range(1, 44))
    for value in range(1, 44):
        spec = FRONTEND_REQUESTS[FrontendReq(value)]
        assert spec.payload in PAYLOAD_TYPES
    assert set(FRONTEND_REQUESTS) == set(FrontendReq)


def test_every_backend_request_has_a_table_entry() -> None:
    assert [r.value for r in BackendReq] == list(range(1, 11))
    for value in range(1, 11):
        assert BACKEND_REQUESTS[BackendReq(value)].payload in PAYLOAD_TYPES
    assert set(BACKEND_REQUESTS) == set(BackendReq)


@pytest.mark.parametrize("name,number", [
    ("GET_FEATURES", 1), ("SET_MEM_TABLE", 5), ("SET_VRING_ADDR", 9), ("GET_VRING_BASE", 11),
    ("SET_VRING_KICK", 12), ("GET_PROTOCOL_FEATURES", 15), ("SET_VRING_ENABLE", 18),
    ("SET_BACKEND_REQ_FD", 21), ("IOTLB_MSG", 22), ("GET_CONFIG", 24), ("SET_CONFIG", 25),
    ("GET_INFLIGHT_FD", 31), ("RESET_DEVICE", 34), ("VRING_KICK", 35), ("GET_MAX_MEM_SLOTS", 36),
    ("ADD_MEM_REG", 37), ("REM_MEM_REG", 38), ("SET_STATUS", 39), ("GET_SHARED_OBJECT", 41),
    ("CHECK_DEVICE_STATE", 43),
])
def test_frontend_request_numbers(name: str, number: int) -> None:
    assert FrontendReq[name] == number


def test_table_payloads_replies_and_fds_follow_the_spec() -> None:
    t = FRONTEND_REQUESTS
    assert t[FrontendReq.SET_VRING_ADDR].payload is VringAddr
    assert t[FrontendReq.GET_VRING_BASE].reply is VringState
    assert t[FrontendReq.GET_FEATURES].reply is U64
    assert t[FrontendReq.GET_CONFIG].reply is ConfigSpace
    assert t[FrontendReq.GET_INFLIGHT_FD].reply is InflightDescription
    assert t[FrontendReq.SET_FEATURES].reply is None
    assert t[FrontendReq.SET_MEM_TABLE].fds == (1, 8)
    assert t[FrontendReq.ADD_MEM_REG].fds == (1, 1)
    assert t[FrontendReq.REM_MEM_REG].fds == (0, 1)          # a stray fd is closed, not refused
    for r in (FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR):
        assert t[r].payload is VringFd and t[r].fds == (0, 1)
    for r in (FrontendReq.SET_LOG_FD, FrontendReq.SET_BACKEND_REQ_FD, FrontendReq.SET_INFLIGHT_FD,
              FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.GPU_SET_SOCKET):
        assert t[r].fds == (1, 1)
    assert t[FrontendReq.GET_CONFIG].feature is ProtocolFeature.CONFIG
    assert t[FrontendReq.ADD_MEM_REG].feature is ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert t[FrontendReq.RESET_DEVICE].feature is ProtocolFeature.RESET_DEVICE
    assert t[FrontendReq.GET_QUEUE_NUM].feature is ProtocolFeature.MQ
    assert BACKEND_REQUESTS[BackendReq.SHMEM_MAP].fds == (1, 1)


def test_protocol_feature_bits() -> None:
    # Bit numbers from spec §4; SHMEM is 22 as in QEMU (rust-vmm 0.16 says 21 = GPA_ADDRESSES).
    P = ProtocolFeature
    assert (P.MQ, P.REPLY_ACK, P.BACKEND_REQ, P.CONFIG, P.INFLIGHT_SHMFD, P.RESET_DEVICE,
            P.CONFIGURE_MEM_SLOTS, P.STATUS, P.DEVICE_STATE, P.GPA_ADDRESSES, P.SHMEM) == \
        (1 << 0, 1 << 3, 1 << 5, 1 << 9, 1 << 12, 1 << 13, 1 << 15, 1 << 16, 1 << 19, 1 << 21, 1 << 22)
