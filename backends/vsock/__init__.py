"""virtio-vsock back end: ``vdev vsock`` (see README.md beside this file).

Hybrid vsock over Unix sockets, the convention of Firecracker, Cloud
Hypervisor and vhost-device-vsock: host programs reach the guest through
``--uds-path`` (``CONNECT <port>\\n``), the guest reaches host programs
listening on ``<uds-path>_<port>``, and devices sharing a ``--group`` reach
each other by CID.

The pieces, from the wire up:

* `packet` — the 44-byte header codec and the constants (pure);
* `connection` — one connection's state machine (`ConnState`) and credit
  accounting (pure: no sockets, no queues, no clock of its own);
* `muxer` — every connection of one guest and their host sockets, the
  hybrid handshake, round-robin service, per-cause error counters;
* `group` — the rendezvous that lets several daemons form a group;
* `device` — the virtio device: descriptor chains in and out of the muxer;
* `testing` — a guest-side vsock stack over `vdev.testing.VirtioFrontend`,
  for tests and the in-process benchmark.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from vdev.cli import DeviceCommand, ServeOptions
from vdev.config import parse_queue_size
from vdev.control import ControlServer
from vdev.device import Device, serve

from .device import VsockDevice
from .group import check_group_name, check_unix_path
from .muxer import raise_nofile_limit
from .packet import MAX_GUEST_CID, MIN_GUEST_CID

QEMU_EXAMPLE = """\
vdev vsock --socket /tmp/vhost-vsock.sock --guest-cid 3 --uds-path /tmp/vm3.vsock &
qemu-system-x86_64 -machine q35 -m 512M \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \\
    -chardev socket,id=vs0,path=/tmp/vhost-vsock.sock \\
    -device vhost-user-vsock-pci,chardev=vs0 \\
    -kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic"""


@dataclass(frozen=True)
class VsockConfig:
    guest_cid: int
    uds_path: str
    group: str | None
    control: str | None
    queue_size: int


def parse_guest_cid(value: str) -> int:
    """A guest CID: 3 .. 2^32-2 (0, 1, 2 and 2^32-1 are reserved, virtio 1.2 §5.10.4)."""
    try:
        cid = int(value, 10)
    except ValueError:
        raise ValueError(f"--guest-cid: not a number: {value!r}") from None
    if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise ValueError(f"--guest-cid: {cid} is reserved or out of range "
                         f"(a guest CID is {MIN_GUEST_CID}..{MAX_GUEST_CID})")
    return cid


def _check_parent(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{option}: directory {parent!r} does not exist")


class VsockCommand(DeviceCommand):
    name = "vsock"
    summary = "virtio-vsock, hybrid vsock over Unix sockets (vhost-user-vsock)"
    capability_type = "vsock"
    qemu_example = QEMU_EXAMPLE

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("virtio-vsock")
        g.add_argument("--guest-cid", required=True, metavar="N",
                       help=f"the guest's context id ({MIN_GUEST_CID}..{MAX_GUEST_CID})")
        g.add_argument("--uds-path", required=True, metavar="PATH",
                       help="Unix socket host programs connect to (CONNECT <port>); the guest's "
                            "connections to host port P go to PATH_P")
        g.add_argument("--group", metavar="NAME",
                       help="sibling group: devices with the same group reach each other by CID")
        g.add_argument("--control", metavar="PATH", help="JSON control socket (command: info)")
        g.add_argument("--queue-size", default="256", metavar="N",
                       help="largest queue size offered (power of 2, default 256)")

    def configure(self, args: argparse.Namespace) -> VsockConfig:
        cid = parse_guest_cid(args.guest_cid)
        _check_parent(args.uds_path, "--uds-path")
        check_unix_path(os.path.abspath(args.uds_path), "--uds-path")
        group = check_group_name(args.group) if args.group is not None else None
        if args.control is not None:
            _check_parent(args.control, "--control")
        return VsockConfig(cid, args.uds_path, group, args.control, parse_queue_size(args.queue_size))

    async def create(self, config: VsockConfig) -> Device:
        raise_nofile_limit()
        return VsockDevice(config.guest_cid, config.uds_path, group=config.group,
                           queue_size=config.queue_size)

    async def serve(self, device: Device, config: Any, where: ServeOptions) -> None:
        assert isinstance(device, VsockDevice)
        control = None
        try:
            if config.control:
                control = ControlServer(config.control, control_handlers(device))
                await control.start()
            await serve(device, where.socket, client=where.client, listen_fd=where.fd)
        finally:
            if control is not None:
                await control.close()
            await device.aclose()


def control_handlers(device: VsockDevice) -> dict[str, Any]:
    """The vsock control commands (documented in README.md)."""

    async def info(request: dict[str, Any]) -> dict[str, Any]:
        return device.info()

    return {"info": info}


__all__ = ["VsockCommand", "VsockConfig", "VsockDevice", "control_handlers", "parse_guest_cid"]
