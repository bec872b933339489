"""The virtio-vsock header codec against bytes spelled out from the spec's struct."""

from __future__ import annotations

import struct

import pytest

from backends.vsock.packet import HEADER_SIZE, Header, Op, SockType, rst_for

# struct virtio_vsock_hdr (virtio 1.2 §5.10.6), little-endian and packed, written out
# field by field rather than with the module's own struct.
GOLDEN = (
    (3).to_bytes(8, "little")             # src_cid
    + (2).to_bytes(8, "little")           # dst_cid
    + (49152).to_bytes(4, "little")       # src_port
    + (1234).to_bytes(4, "little")        # dst_port
    + (5).to_bytes(4, "little")           # len
    + (1).to_bytes(2, "little")           # type STREAM
    + (5).to_bytes(2, "little")           # op RW
    + (0).to_bytes(4, "little")           # flags
    + (262144).to_bytes(4, "little")      # buf_alloc
    + (0xFFFF_FFF0).to_bytes(4, "little")  # fwd_cnt
)


def test_header_is_44_bytes_and_decodes_the_golden_packet() -> None:
    assert HEADER_SIZE == 44 == len(GOLDEN)
    hdr = Header.unpack(GOLDEN + b"hello")
    assert hdr == Header(3, 2, 49152, 1234, 5, SockType.STREAM, Op.RW, 0, 262144, 0xFFFF_FFF0)
    assert hdr.pack() == GOLDEN
    buf = bytearray(50)
    hdr.pack_into(buf, 3)
    assert bytes(buf[3:47]) == GOLDEN


def test_short_header_error_names_the_length() -> None:
    with pytest.raises(ValueError, match="needs 44 bytes, got 43"):
        Header.unpack(GOLDEN[:43])


def test_unknown_op_and_type_still_decode() -> None:
    raw = bytearray(GOLDEN)
    struct.pack_into("<HH", raw, 28, 9, 42)
    hdr = Header.unpack(raw)
    assert (hdr.type, hdr.op) == (9, 42)
    assert hdr.op_name == "op 42"
    assert "op 42" in str(hdr)


def test_rst_goes_back_to_the_sender() -> None:
    hdr = Header.unpack(GOLDEN)
    rst = rst_for(hdr)
    assert (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port) == (2, 1234, 3, 49152)
    assert (rst.op, rst.type, rst.len) == (Op.RST, SockType.STREAM, 0)
