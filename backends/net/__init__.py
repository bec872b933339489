"""virtio-net back end: ``vdev net`` (see README.md beside this file).

The device (`device.NetDevice`) serves queue pairs with a C worker each and
is generic over its link: a TAP configured through pyroute2 (`tap`), a
named cable to another guest (`cable`), or a loopback.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from vdev.cli import DeviceCommand, ServeOptions
from vdev.config import parse_int, parse_queue_size
from vdev.control import ControlCommand, ControlServer, accepts
from vdev.device import Device, serve
from vdev.metrics import latency_handler

from .cable import check_cable_name
from .device import (
    MAX_MTU,
    MIN_MTU,
    CableLink,
    Link,
    LoopbackLink,
    NetDevice,
    TapLink,
    parse_mac,
)
from .tap import Tap, TapSpec, check_ifname, check_netns, parse_address

QEMU_EXAMPLE = """\
vdev net --socket /tmp/vdev-net.sock --tap vdev0 --tap-address 10.0.0.1/24 &
qemu-system-x86_64 -machine q35 -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=c0,path=/tmp/vdev-net.sock \\
    -netdev vhost-user,id=n0,chardev=c0 \\
    -device virtio-net-pci,netdev=n0,vectors=0,romfile= \\
    -kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic"""

MAX_QUEUES = 64

#: The control commands, for `vdev ctl --help`, shell completion and the
#: parameter check (each handler takes exactly the parameters named here).
CONTROL_COMMANDS = (
    ControlCommand("info", (), "the link, MAC, MTU, features, and per-queue counters (frames, drops "
                               "by cause)"),
    ControlCommand("latency", ("[reset=true]",), "per-queue latency percentiles since start or the "
                                                 "last reset (vdev ctl ... latency --reset)"),
)
#: Longest busy-poll (--poll-us) accepted: one second.
MAX_POLL_US = 1_000_000


@dataclass(frozen=True)
class NetConfig:
    link: str                      # "tap", "cable" or "loopback"
    tap: TapSpec | None
    cable: str | None
    mac: bytes | None
    queues: int
    mtu: int | None
    queue_size: int
    control: str | None
    poll_us: int = 0


class NetCommand(DeviceCommand):
    name = "net"
    summary = "virtio-net NIC on a TAP, a cable to another guest, or a loopback (vhost-user-net)"
    capability_type = "net"
    qemu_example = QEMU_EXAMPLE
    control_commands = CONTROL_COMMANDS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("virtio-net (one of --tap, --cable, --loopback)")
        g.add_argument("--tap", metavar="NAME", help="create TAP NAME (or open it, with --tap-existing)")
        g.add_argument("--tap-existing", action="store_true",
                       help="open an existing TAP instead of creating one (it stays afterwards)")
        g.add_argument("--tap-netns", metavar="NS", help="move the TAP into network namespace NS "
                                                         "(with --tap-existing: the TAP is in NS)")
        g.add_argument("--tap-address", metavar="CIDR", help="give the TAP this address, e.g. 10.0.0.1/24")
        g.add_argument("--bridge", metavar="BR", help="enslave the TAP to bridge BR")
        g.add_argument("--cable", metavar="NAME",
                       help="join the other device on cable NAME (in this process or another daemon)")
        g.add_argument("--loopback", action="store_true", help="transmitted frames come back on receive")
        g.add_argument("--mac", metavar="MAC", help="MAC address in config space (VIRTIO_NET_F_MAC)")
        g.add_argument("--queues", default="1", metavar="N",
                       help=f"queue pairs, 1..{MAX_QUEUES} (VIRTIO_NET_F_MQ when > 1; a TAP then has "
                            "one queue per pair)")
        g.add_argument("--mtu", metavar="N", help=f"MTU, {MIN_MTU}..{MAX_MTU} (VIRTIO_NET_F_MTU; "
                                                  "also set on the TAP)")
        g.add_argument("--queue-size", default="256", metavar="N",
                       help="largest queue size (power of 2, default 256)")
        g.add_argument("--poll-us", default="0", metavar="N",
                       help="busy-poll each transmit ring after its last frame before sleeping on the "
                            "kick eventfd, for an adaptive window of at most N microseconds (default 0: "
                            "never)")
        g.add_argument("--control", metavar="PATH",
                       help="JSON control socket: info (per-queue counters), latency")

    def configure(self, args: argparse.Namespace) -> NetConfig:
        chosen = [o for o, v in (("--tap", args.tap), ("--cable", args.cable),
                                 ("--loopback", args.loopback)) if v]
        if len(chosen) != 1:
            raise ValueError("give exactly one of --tap NAME, --cable NAME and --loopback"
                             + (f" (got {' and '.join(chosen)})" if chosen else ""))
        if args.tap is None:
            for flag, value in (("--tap-existing", args.tap_existing), ("--tap-netns", args.tap_netns),
                                ("--tap-address", args.tap_address), ("--bridge", args.bridge)):
                if value:
                    raise ValueError(f"{flag} needs --tap NAME")
        queues = parse_int(args.queues, "--queues", lo=1, hi=MAX_QUEUES)
        mtu = parse_int(args.mtu, "--mtu", lo=MIN_MTU, hi=MAX_MTU) if args.mtu is not None else None
        mac = parse_mac(args.mac) if args.mac is not None else None
        queue_size = parse_queue_size(args.queue_size)
        poll_us = parse_int(args.poll_us, "--poll-us", lo=0, hi=MAX_POLL_US)
        tap = None
        if args.tap is not None:
            tap = TapSpec(
                name=check_ifname(args.tap),
                existing=args.tap_existing,
                netns=check_netns(args.tap_netns) if args.tap_netns is not None else None,
                address=parse_address(args.tap_address) if args.tap_address is not None else None,
                bridge=check_ifname(args.bridge, "--bridge") if args.bridge is not None else None,
                queues=queues, mtu=mtu)
        cable = check_cable_name(args.cable) if args.cable is not None else None
        link = "tap" if tap else "cable" if cable else "loopback"
        return NetConfig(link, tap, cable, mac, queues, mtu, queue_size, args.control, poll_us)

    async def create(self, config: NetConfig) -> Device:
        link: Link
        if config.tap is not None:
            link = TapLink(Tap.open(config.tap))      # TapError: the system refused, exit 1
        elif config.cable is not None:
            link = CableLink(config.cable)
        else:
            link = LoopbackLink()
        try:
            device = NetDevice(link, queues=config.queues, queue_size=config.queue_size, mac=config.mac,
                               mtu=config.mtu, poll_us=config.poll_us)
        except BaseException:
            if isinstance(link, TapLink):
                link.tap.close()
            raise
        await device.start()
        return device

    async def serve(self, device: Device, config: Any, where: ServeOptions) -> None:
        assert isinstance(device, NetDevice)
        control = None
        if config.control:
            control = ControlServer(config.control, control_handlers(device))
            await control.start()
        try:
            await serve(device, where.socket, client=where.client, listen_fd=where.fd)
        finally:
            if control is not None:
                await control.close()


def control_handlers(device: NetDevice) -> dict[str, Any]:
    """The net control commands (documented in README.md)."""

    async def info(request: dict[str, Any]) -> dict[str, Any]:
        return device.info()

    handlers = {"info": info, "latency": latency_handler(device)}
    for cmd in CONTROL_COMMANDS:
        accepts(handlers[cmd.name], cmd.params)
    return handlers


__all__ = ["NetCommand", "NetConfig", "NetDevice", "control_handlers"]
