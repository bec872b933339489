"""The TAP behind ``vdev net --tap NAME``: created or opened, configured through pyroute2.

The interface is created with pyroute2 (``kind="tuntap"``, which makes a
persistent TAP through ``/dev/net/tun``), then opened once per queue pair
with ``TUNSETIFF`` — the queue fds are what the C workers read and write —
and made non-persistent again, so it disappears with the daemon however the
daemon ends.  ``--tap-existing`` opens a TAP someone else created (it must
exist, and stays when we are done).  Everything else is netlink through
pyroute2, never ``ip``: the move into a network namespace (``--tap-netns``),
the MTU, the address (``--tap-address``), the bridge (``--bridge``) and
bringing the link up.

The queue fds carry frames with a 12-byte ``virtio_net_hdr_v1`` in front
(``IFF_VNET_HDR``, ``TUNSETVNETHDRSZ`` 12), so a guest's header and
offloads pass straight through.  ``TUNSETOFFLOAD`` says which offloads the
*reader* (the guest) takes: it is set from the GUEST_* features the driver
accepted, and probed when the TAP opens so the device offers only what this
kernel's TAP accepts.  With more than one queue pair the TAP is
``IFF_MULTI_QUEUE``, one queue per pair; a pair the driver disables is
detached (``TUNSETQUEUE``) so the kernel steers no frames to it, as QEMU's
own TAP back end does.

Constants from ``linux/if_tun.h``; ``struct ifreq`` is the 16-byte name
followed by the ``short`` flags.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

# pyroute2 is imported where it is used, not here: it costs about 8 MiB of
# resident memory, which every `vdev` command would pay (the command loads
# every device's module to list them), `vdev blk` included.

log = logging.getLogger("backends.net.tap")

# linux/if_tun.h
TUNSETIFF = 0x400454CA            #: attach this fd to a tun/tap device (creating it if needed)
TUNSETPERSIST = 0x400454CB        #: keep the device when the last fd closes (1) or not (0)
TUNSETOFFLOAD = 0x400454D0        #: offloads the reader accepts (TUN_F_*)
TUNSETVNETHDRSZ = 0x400454D8      #: size of the vnet header in front of each frame
TUNSETQUEUE = 0x400454D9          #: attach / detach this queue of a multi-queue device
IFF_TAP = 0x0002                  #: Ethernet frames
IFF_MULTI_QUEUE = 0x0100          #: one fd per queue
IFF_ATTACH_QUEUE = 0x0200         #: TUNSETQUEUE: steer frames to this queue again
IFF_DETACH_QUEUE = 0x0400         #: TUNSETQUEUE: no frames for this queue
IFF_NO_PI = 0x1000                #: no 4-byte packet-information prefix
IFF_VNET_HDR = 0x4000             #: a virtio_net_hdr in front of each frame
TUN_F_CSUM = 0x01                 #: the reader takes partial checksums
TUN_F_TSO4 = 0x02                 #: ... TCPv4 GSO frames
TUN_F_TSO6 = 0x04                 #: ... TCPv6 GSO frames
TUN_F_TSO_ECN = 0x08              #: ... GSO frames with ECN
TUN_F_UFO = 0x10                  #: ... UDP fragmentation offload frames

VNET_HDR_SIZE = 12                #: sizeof(struct virtio_net_hdr_v1)
IFNAMSIZ = 16
NETNS_DIR = "/var/run/netns"

T = TypeVar("T")


class TapError(Exception):
    """The system refused the TAP (it exists, it does not, a netns or bridge is missing)."""


def check_ifname(name: str, what: str = "--tap") -> str:
    """An interface name the kernel takes (1..15 bytes, no '/', ':' or whitespace).

    Raises:
        ValueError: naming the bad name.
    """
    if not name or len(name.encode()) >= IFNAMSIZ or name in (".", "..") \
            or any(c in name for c in "/: \t\n") or not name.isascii():
        raise ValueError(f"{what}: {name!r} is not an interface name (1..15 ASCII characters, "
                         "no '/', ':' or spaces)")
    return name


def check_netns(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"--tap-netns: {name!r} is not a network namespace name")
    return name


def parse_address(value: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """``10.0.0.1/24`` or ``fd00::1/64``; a bare address gets a host prefix.

    Raises:
        ValueError: naming the value.
    """
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"--tap-address: {value!r} is not an address with a prefix "
                         "(like 10.0.0.1/24)") from None


@dataclass(frozen=True)
class TapSpec:
    name: str
    existing: bool = False
    netns: str | None = None
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    bridge: str | None = None
    queues: int = 1
    mtu: int | None = None


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in network namespace ``netns`` (None: ours), on a thread of its own.

    setns() moves only the calling thread, so a short-lived thread does it and
    the event loop's thread never changes namespace.  Sockets and tun fds made
    there keep their namespace wherever they are used later.  pyroute2's
    synchronous API runs its own event loop and cannot run on a thread whose
    loop is running, which is another reason every netlink call goes through
    here.
    """
    from pyroute2.netns import setns

    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if netns is not None:
                setns(netns, flags=0)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _ipr(netns: str | None) -> Any:
    """A synchronous netlink socket (only on a `run_in_netns` thread)."""
    from pyroute2 import IPRoute, NetNS
    return NetNS(netns) if netns is not None else IPRoute()


def _ifreq(name: str, flags: int) -> bytes:
    return name.encode().ljust(IFNAMSIZ, b"\0") + struct.pack("H", flags)


class Tap:
    """An open TAP: one queue fd per queue pair, and its netlink configuration."""

    def __init__(self, spec: TapSpec, fds: list[int], created: bool, offloads: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.netns = spec.netns
        self.fds = fds
        self.created = created
        #: TUN_F_* flags this TAP accepts (probed).
        self.offloads = offloads
        self.multi_queue = spec.queues > 1
        self._detached: set[int] = set()

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, spec: TapSpec) -> Tap:
        """Create (or, with ``existing``, open) the TAP and configure it.

        Raises:
            TapError: the system refused (exists already, missing, no such
                netns or bridge, not permitted), naming what.
        """
        from pyroute2.netlink.exceptions import NetlinkError
        if spec.netns is not None and not os.path.exists(os.path.join(NETNS_DIR, spec.netns)):
            raise TapError(f"--tap-netns: network namespace {spec.netns!r} does not exist")
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if spec.queues > 1 else 0)
        # An existing TAP is opened where it lives; a new one is made here and moved.
        where = spec.netns if spec.existing else None

        def create() -> bool:
            with _ipr(None) as ipr:
                present = bool(ipr.link_lookup(ifname=spec.name))
                if spec.existing and not present:
                    raise TapError(f"--tap {spec.name}: no such interface"
                                   + (f" in netns {spec.netns}" if spec.netns else "")
                                   + " (--tap-existing opens a TAP that exists)")
                if spec.existing:
                    return False
                if present:
                    raise TapError(f"--tap {spec.name}: an interface of that name exists "
                                   "(use --tap-existing to open an existing TAP)")
                try:
                    ipr.link("add", ifname=spec.name, kind="tuntap", mode="tap",
                             ifr={"no_pi": 1, "vnet_hdr": 1, "multi_queue": int(spec.queues > 1),
                                  "one_queue": 0, "tun_excl": 0, "persist": 0, "nofilter": 0})
                except (NetlinkError, OSError) as exc:
                    raise TapError(f"--tap {spec.name}: cannot create the TAP: {_strerror(exc)}") from None
                return True

        created = False
        fds: list[int] = []
        try:
            created = run_in_netns(where, create)
            fds = run_in_netns(where, lambda: [_open_queue(spec.name, flags) for _ in range(spec.queues)])
            if created:
                # From now on the TAP lives exactly as long as our fds.
                fcntl.ioctl(fds[0], TUNSETPERSIST, 0)
            fcntl.ioctl(fds[0], TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            offloads = _probe_offloads(fds[0])
            tap = cls(spec, fds, created, offloads)
            tap._configure()
            return tap
        except BaseException:
            for fd in fds:
                os.close(fd)
            if created and not fds:
                def remove() -> None:
                    with _ipr(None) as ipr:
                        ipr.link("del", ifname=spec.name)
                with contextlib.suppress(Exception):
                    run_in_netns(None, remove)
            raise

    def _configure(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        spec = self.spec
        if spec.netns is not None and not spec.existing:
            def move() -> None:
                with IPRoute() as ipr:
                    (index,) = ipr.link_lookup(ifname=self.name)
                    ipr.link("set", index=index, net_ns_fd=spec.netns)
            try:
                run_in_netns(None, move)
            except (NetlinkError, OSError) as exc:
                raise TapError(f"--tap-netns {spec.netns}: cannot move {self.name} there: "
                               f"{_strerror(exc)}") from None
        run_in_netns(spec.netns, self._configure_here)
        log.info("TAP %s %s%s, %d queue%s%s%s", self.name, "created" if self.created else "opened",
                 f" in netns {spec.netns}" if spec.netns else "", len(self.fds),
                 "" if len(self.fds) == 1 else "s",
                 f", address {spec.address}" if spec.address else "",
                 f", bridge {spec.bridge}" if spec.bridge else "")

    def _configure_here(self) -> None:
        spec = self.spec
        with _ipr(None) as ipr:
            (index,) = ipr.link_lookup(ifname=self.name)
            if spec.mtu is not None:
                _netlink(f"--mtu {spec.mtu}", ipr.link, "set", index=index, mtu=spec.mtu)
            if spec.bridge is not None:
                found = ipr.link_lookup(ifname=spec.bridge)
                if not found:
                    raise TapError(f"--bridge {spec.bridge}: no such bridge"
                                   + (f" in netns {spec.netns}" if spec.netns else ""))
                _netlink(f"--bridge {spec.bridge}", ipr.link, "set", index=index, master=found[0])
            if spec.address is not None:
                a = spec.address
                _netlink(f"--tap-address {a}", ipr.addr, "add", index=index, address=str(a.ip),
                         prefixlen=a.network.prefixlen)
            _netlink(f"--tap {self.name}", ipr.link, "set", index=index, state="up")

    # -- at run time -----------------------------------------------------------------------------

    def set_offload(self, flags: int) -> None:
        """What the guest takes (TUN_F_*), limited to what this TAP accepts."""
        fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags & self.offloads)

    def set_queue_attached(self, queue: int, attached: bool) -> None:
        """Steer frames to queue ``queue`` or not (multi-queue TAPs only)."""
        if not self.multi_queue or not 0 <= queue < len(self.fds):
            return
        if attached == (queue not in self._detached):
            return
        flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fds[queue], TUNSETQUEUE, _ifreq("", flags))
        except OSError as exc:
            log.warning("TAP %s: cannot %s queue %d: %s", self.name,
                        "attach" if attached else "detach", queue, exc.strerror)
            return
        if attached:
            self._detached.discard(queue)
        else:
            self._detached.add(queue)

    def set_mtu(self, mtu: int) -> None:
        def body() -> None:
            with _ipr(None) as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if found:
                    ipr.link("set", index=found[0], mtu=mtu)
        run_in_netns(self.netns, body)

    def link_up(self) -> bool | None:
        """Whether the TAP is administratively up (None: it is gone).  Blocks briefly."""
        from pyroute2.netlink.exceptions import NetlinkError
        def body() -> bool | None:
            with _ipr(None) as ipr:
                found = ipr.link_lookup(ifname=self.name)
                if not found:
                    return None
                (link,) = ipr.link("get", index=found[0])
                return bool(link["flags"] & 1)     # IFF_UP
        try:
            return run_in_netns(self.netns, body)
        except (NetlinkError, OSError, ValueError):
            return None

    def close(self) -> None:
        """Close the queue fds: a TAP we created goes with them."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_queue(name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
    except OSError as exc:
        os.close(fd)
        raise TapError(f"--tap {name}: cannot open a queue of the TAP: {exc.strerror}"
                       + (" (an existing TAP must be a TAP with vnet headers, multi-queue exactly "
                          "when --queues > 1)" if exc.errno == errno.EINVAL else "")) from None
    return fd


def _probe_offloads(fd: int) -> int:
    """The TUN_F_* flags this kernel's TAP accepts (each with the CSUM it needs)."""
    accepted = 0
    for flag in (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO):
        want = TUN_F_CSUM | flag | (TUN_F_TSO4 if flag == TUN_F_TSO_ECN else 0)
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, want)
            accepted |= flag
        except OSError:
            pass
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return accepted


def _netlink(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        fn(*args, **kwargs)
    except (NetlinkError, OSError) as exc:
        raise TapError(f"{what}: refused: {_strerror(exc)}") from None


def _strerror(exc: BaseException) -> str:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(exc)
