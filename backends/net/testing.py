"""Test helpers for virtio-net back ends: frames, headers, throwaway namespaces.

Public, like `vdev.testing`: a device author (or the tests here) builds
frames with real Ethernet/IPv4/UDP/TCP headers and partial checksums
(`udp_frame`, `tcp_frame`, `internet_checksum`), packs and unpacks the
12-byte ``virtio_net_hdr_v1`` (`NetHdr`), and runs code inside a throwaway
network namespace (`throwaway_netns`, `packet_socket`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from .tap import run_in_netns

__all__ = [
    "ETH_P_ALL",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "HDR_F_DATA_VALID",
    "HDR_F_NEEDS_CSUM",
    "PACKET_VNET_HDR",
    "NetHdr",
    "can_use_tap",
    "eth_frame",
    "internet_checksum",
    "packet_socket",
    "tcp_frame",
    "throwaway_netns",
    "udp_frame",
    "verify_l4_checksum",
]

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
#: linux/if_packet.h: the socket reads and writes a 10-byte virtio_net_hdr before each frame.
PACKET_VNET_HDR = 15
SOL_PACKET = 263

_HDR = struct.Struct("<BBHHHHH")


@dataclass(frozen=True)
class NetHdr:
    """``struct virtio_net_hdr_v1`` (virtio 1.2 §5.1.6), little-endian, 12 bytes."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, size: int = 12) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                         self.csum_offset, self.num_buffers)[:size]

    @classmethod
    def unpack(cls, data: bytes) -> NetHdr:
        return cls(*_HDR.unpack(bytes(data[:12]).ljust(12, b"\0")))


def internet_checksum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement sum of ``data`` (not inverted), plus ``start``."""
    if len(data) % 2:
        data += b"\0"
    s: int = start + sum(struct.unpack(f">{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def eth_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def _ipv4(src: str, dst: str, proto: int, payload_len: int, ident: int = 1) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    csum = ~internet_checksum(hdr) & 0xFFFF
    return hdr[:10] + struct.pack(">H", csum) + hdr[12:]


def _pseudo(src: str, dst: str, proto: int, length: int) -> int:
    ph = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack(">BBH", 0, proto, length)
    return internet_checksum(ph)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, data: bytes,
              *, partial: bool = False) -> tuple[bytes, NetHdr]:
    """An Ethernet/IPv4/UDP frame and the header to send it with.

    ``partial``: the checksum field holds only the pseudo-header sum and the
    header asks for NEEDS_CSUM (csum_start at the UDP header), as a driver
    with CSUM offload sends it; else the checksum is complete.
    """
    length = 8 + len(data)
    udp = struct.pack(">HHHH", sport, dport, length, 0) + data
    pseudo = _pseudo(src, dst, 17, length)
    if partial:
        udp = udp[:6] + struct.pack(">H", pseudo) + udp[8:]
        hdr = NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    else:
        csum = ~internet_checksum(udp, pseudo) & 0xFFFF or 0xFFFF
        udp = udp[:6] + struct.pack(">H", csum) + udp[8:]
        hdr = NetHdr()
    return eth_frame(dst_mac, src_mac, ETH_P_IP, _ipv4(src, dst, 17, length) + udp), hdr


def tcp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int, data: bytes,
              *, gso_size: int = 0, seq: int = 1) -> tuple[bytes, NetHdr]:
    """An Ethernet/IPv4/TCP frame with a partial checksum; with ``gso_size`` a
    TSO (GSO_TCPV4) frame the receiver's stack or NIC cuts into segments."""
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0) + data
    pseudo = _pseudo(src, dst, 6, len(tcp))
    tcp = tcp[:16] + struct.pack(">H", pseudo) + tcp[18:]
    hdr = NetHdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16,
                 gso_type=GSO_TCPV4 if gso_size else GSO_NONE, gso_size=gso_size,
                 hdr_len=14 + 20 + 20 if gso_size else 0)
    return eth_frame(dst_mac, src_mac, ETH_P_IP, _ipv4(src, dst, 6, len(tcp)) + tcp), hdr


def verify_l4_checksum(frame: bytes) -> bool:
    """Whether the UDP or TCP checksum of an Ethernet/IPv4 frame is complete and right."""
    ihl = (frame[14] & 0xF) * 4
    proto = frame[23]
    src = str(ipaddress.IPv4Address(frame[26:30]))
    dst = str(ipaddress.IPv4Address(frame[30:34]))
    total = struct.unpack(">H", frame[16:18])[0]
    l4 = frame[14 + ihl: 14 + total]
    return internet_checksum(l4, _pseudo(src, dst, proto, len(l4))) == 0xFFFF


def can_use_tap() -> bool:
    """Root (CAP_NET_ADMIN) and /dev/net/tun: what the TAP tests need."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@contextlib.contextmanager
def throwaway_netns(prefix: str = "vdevt") -> Iterator[str]:
    """A fresh named network namespace, removed afterwards (with whatever is in it)."""
    from pyroute2 import netns

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    run_in_netns(None, lambda: netns.create(name))
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            run_in_netns(None, lambda: netns.remove(name))


def packet_socket(netns: str | None, ifname: str, *, vnet_hdr: bool = False,
                  proto: int = ETH_P_ALL) -> socket.socket:
    """An AF_PACKET socket on ``ifname`` inside ``netns``: it sees every frame the
    interface sends or receives, and sends frames out of it.  ``vnet_hdr``:
    each frame carries a 10-byte virtio_net_hdr (GSO and checksum metadata)."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        if vnet_hdr:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, 0))
        return s
    return run_in_netns(netns, make)
