"""virtio-blk back end: ``vdev blk`` (see README.md beside this file).

The device (`device.BlkDevice`) is generic over a `Storage`
(`storage.base`), chosen by URL: ``file:PATH``, ``mem:SIZE``, ``null:SIZE``,
``nbd://HOST:PORT/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``.  The storage
can be swapped under a running disk through the control socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
from dataclasses import dataclass, replace
from typing import Any

from vdev.cli import DeviceCommand, ServeOptions
from vdev.config import parse_int, parse_queue_size
from vdev.control import ControlCommand, ControlServer, accepts, relative_url_paths
from vdev.device import Device, serve
from vdev.errors import DeviceError
from vdev.metrics import latency_handler

from .device import DATAPLANES, ID_BYTES, BlkDevice
from .mirror import Jobs
from .storage import StorageSpec, open_storage, parse_storage_url

QEMU_EXAMPLE = """\
vdev blk --socket /tmp/vdev-blk.sock --backend file:/var/lib/images/disk.img --queues 2 &
qemu-system-x86_64 -machine q35 -m 1G \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=blk0,path=/tmp/vdev-blk.sock \\
    -device vhost-user-blk-pci,chardev=blk0,num-queues=2 \\
    -kernel vmlinuz -initrd initrd.img -append console=ttyS0 -nographic"""


#: Queues offered when --queues is not given.  QEMU's vhost-user-blk-pci asks
#: for one per vCPU unless num-queues is set, and refuses a back end that
#: offers fewer; an unused queue costs nothing until the driver starts it.
DEFAULT_QUEUES = 16
#: Storage URL schemes the native data path runs (backends/blk/native.py).
NATIVE_SCHEMES = ("file", "mem", "null")
#: Longest busy-poll (--poll-us) accepted: one second.
MAX_POLL_US = 1_000_000


#: The control commands, for `vdev ctl --help`, shell completion and the
#: parameter check (each handler takes exactly the parameters named here).
CONTROL_COMMANDS = (
    ControlCommand("info", (), "the disk: storage, size, queues, requests in flight and held by a "
                               "pause, counters, the last mirror"),
    ControlCommand("swap", ("backend=URL", "[force=true]"),
                   "switch the disk to other storage now (new requests wait, then I/O resumes, also "
                   "after a pause); smaller storage needs force=true"),
    ControlCommand("pause", (), "hold new requests and wait for those on storage"),
    ControlCommand("resume", (), "let held requests go"),
    ControlCommand("resize", (), "re-read the storage size; a change reaches the guest"),
    ControlCommand("latency", ("[reset=true]",), "per-queue latency percentiles since start or the "
                                                 "last reset (vdev ctl ... latency --reset)"),
    ControlCommand("mirror", ("target=URL", "[granularity=SIZE]", "[rate=BYTES_PER_SEC]",
                              "[pivot=auto|manual]"),
                   "copy the disk to TARGET while the guest runs, then switch to it (--wait: "
                   "progress, return at the end)", starts_job=True),
    ControlCommand("jobs", (), "the running and the last mirror jobs, with progress"),
    ControlCommand("cancel", (), "stop the running mirror; the disk stays on its storage"),
    ControlCommand("pivot", (), "switch a pivot=manual mirror that is ready"),
)


@dataclass(frozen=True)
class BlkConfig:
    backend: str
    read_only: bool
    queues: int
    queue_size: int
    serial: str | None
    control: str | None
    dataplane: str = "auto"
    poll_us: int = 0


class BlkCommand(DeviceCommand):
    name = "blk"
    summary = "virtio-blk disk over swappable storage (vhost-user-blk)"
    capability_type = "block"
    # vhost-user.json VHostUserBackendBlockFeature: --read-only and --blk-file work.
    capability_features = ("read-only", "blk-file")
    qemu_example = QEMU_EXAMPLE

    control_commands = CONTROL_COMMANDS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("virtio-blk")
        g.add_argument("--backend", metavar="URL",
                       help="storage: file:PATH[?direct=on][&readonly=on], a bare path, mem:SIZE, "
                            "null:SIZE, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH")
        g.add_argument("--blk-file", metavar="PATH",
                       help="an image file or block device (the spec's back-end convention; the "
                            "same as --backend file:PATH)")
        g.add_argument("--read-only", action="store_true", help="offer a read-only disk (VIRTIO_BLK_F_RO)")
        g.add_argument("--queues", default=str(DEFAULT_QUEUES), metavar="N",
                       help=f"request queues offered (1..64, default {DEFAULT_QUEUES}; the VMM "
                            "starts as many as it wants, QEMU one per vCPU)")
        g.add_argument("--queue-size", default="256", metavar="N",
                       help="largest queue size (power of 2, 4..32768, default 256)")
        g.add_argument("--serial", metavar="ID", help=f"GET_ID serial (up to {ID_BYTES} ASCII bytes)")
        g.add_argument("--control", metavar="PATH",
                       help="JSON control socket (vdev ctl PATH ...): info, latency, swap, pause, resume, "
                            "resize, mirror (live storage migration), jobs, cancel, pivot")
        g.add_argument("--dataplane", default="auto", metavar="python|native",
                       help="who serves the queues: native (a C worker per queue; null:, mem: and "
                            "file: storage), python (the event loop; any storage), or auto "
                            "(default: native when the storage supports it)")
        g.add_argument("--poll-us", default="0", metavar="N",
                       help="native path: busy-poll the ring after the last request before "
                            "sleeping on the kick eventfd, for an adaptive window of at most N "
                            "microseconds (default 0: never)")

    def configure(self, args: argparse.Namespace) -> BlkConfig:
        if (args.backend is None) == (args.blk_file is None):
            raise ValueError("give exactly one of --backend URL and --blk-file PATH")
        if args.blk_file is not None:
            if not args.blk_file or "?" in args.blk_file:
                raise ValueError(f"--blk-file: {args.blk_file!r} is not a path (use --backend for "
                                 "URL options)")
            args.backend = f"file:{args.blk_file}"
        spec = parse_storage_url(args.backend)    # raises ValueError naming the bad part
        queues = parse_int(args.queues, "--queues", lo=1, hi=64)
        queue_size = parse_queue_size(args.queue_size)
        if queue_size < 4:
            raise ValueError(f"--queue-size: {queue_size} is too small for virtio-blk (min 4)")
        if args.serial is not None and (not args.serial.isascii() or len(args.serial) > ID_BYTES):
            raise ValueError(f"--serial: {args.serial!r} is not at most {ID_BYTES} ASCII bytes")
        if args.dataplane not in DATAPLANES:
            raise ValueError(f"--dataplane: {args.dataplane!r} is not one of {', '.join(DATAPLANES)}")
        if args.dataplane == "native" and spec.scheme not in NATIVE_SCHEMES:
            raise ValueError(f"--dataplane native: {spec.scheme}: storage has no native data path "
                             f"({', '.join(s + ':' for s in NATIVE_SCHEMES)} do)")
        poll_us = parse_int(args.poll_us, "--poll-us", lo=0, hi=MAX_POLL_US)
        if poll_us and args.dataplane == "python":
            raise ValueError(f"--poll-us {poll_us}: busy-polling needs the native data path, "
                             "not --dataplane python")
        return BlkConfig(args.backend, args.read_only, queues, queue_size, args.serial, args.control,
                         args.dataplane, poll_us)

    async def create(self, config: BlkConfig) -> Device:
        # --read-only opens the image read-only too: an image on a read-only
        # mount (or mode 0444 for a non-root user) cannot be opened for writing.
        storage = await open_storage(_storage_spec(config.backend, read_only=config.read_only))
        try:
            return BlkDevice(storage, read_only=config.read_only, num_queues=config.queues,
                             queue_size=config.queue_size, serial=config.serial,
                             dataplane=config.dataplane, poll_us=config.poll_us)
        except BaseException:
            await storage.aclose()
            raise

    async def serve(self, device: Device, config: Any, where: ServeOptions) -> None:
        assert isinstance(device, BlkDevice)
        control = None
        jobs = Jobs(device)
        if config.control:
            control = ControlServer(config.control, control_handlers(device, jobs))
            await control.start()
        serving = asyncio.get_running_loop().create_task(
            serve(device, where.socket, client=where.client, listen_fd=where.fd))
        try:
            await asyncio.wait({serving})
            serving.result()
        finally:
            if control is not None:
                await control.close()
            # A mirror still copying is cancelled while the disk is open (serve
            # closes it when it ends): the disk stays on its storage.
            await jobs.aclose()
            serving.cancel()
            await asyncio.wait({serving})


def _storage_spec(url: str, *, read_only: bool) -> StorageSpec:
    """Parse ``url``; ``read_only`` forces a read-only open (as ``?readonly=on``)."""
    spec = parse_storage_url(url)
    return replace(spec, read_only=True) if read_only else spec


#: open() errors that say "not for writing" (a read-only mount or device, permissions).
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ETXTBSY)
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _flag(value: object, name: str) -> bool:
    """A boolean control parameter: JSON true/false, or the strings `vdev ctl` sends."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _absolute_url(key: str, url: object) -> str:
    """``url`` parsed and checked; a relative file path or NBD socket is refused.

    The daemon's working directory is not the caller's: `vdev ctl` makes
    such paths absolute before sending, a raw JSON client must.
    """
    if not isinstance(url, str):
        raise ValueError(f"{key} must be a storage URL string, got {url!r}")
    for what, path in relative_url_paths(url):
        raise ValueError(f"{key} {url!r}: relative {what} {path!r}; the daemon cannot know the "
                         "directory you meant: give an absolute path (`vdev ctl` resolves "
                         "relative ones against your directory)")
    parse_storage_url(url)
    return url


def control_handlers(device: BlkDevice, jobs: Jobs | None = None) -> dict[str, Any]:
    """The blk control commands (documented in README.md and `CONTROL_COMMANDS`)."""
    jobs = jobs if jobs is not None else Jobs(device)

    def described() -> dict[str, Any]:
        # The device's fields plus the storage's own (an NBD connection's state).
        latest = jobs.latest()
        return {**device.info(), **device.storage.status(),
                "mirror": latest.describe() if latest is not None else None}

    async def info(request: dict[str, Any]) -> dict[str, Any]:
        return described()

    async def swap(request: dict[str, Any]) -> dict[str, Any]:
        url = request.get("backend")
        if url is None:
            raise ValueError("swap needs a storage URL 'backend'")
        url = _absolute_url("backend", url)
        force = _flag(request.get("force", False), "force")
        jobs.check_idle("swap")
        was_paused = device.paused
        # Under a read-only disk the new storage is opened read-only as well;
        # under a writable one it must open read-write, and if it cannot the
        # operator is told why (EROFS, EACCES ...), nothing having changed.
        try:
            new = await open_storage(_storage_spec(url, read_only=device.read_only))
        except DeviceError as exc:
            cause = exc.cause
            if device.read_only or not (isinstance(cause, OSError) and cause.errno in _NOT_WRITABLE):
                raise
            raise DeviceError(f"cannot swap the writable disk to {url}: it does not open read-write",
                              cause=cause) from exc
        try:
            jobs.check_idle("swap")      # a mirror may have started while the storage opened
            old = await device.swap_storage(new, force=force)
        except BaseException:
            await new.aclose()
            raise
        with contextlib.suppress(Exception):
            await asyncio.shield(old.aclose())
        reply = {"previous": old.url, "resumed": was_paused, **described()}
        if was_paused:
            reply["note"] = "I/O was paused; the swap resumed it"
        return reply

    async def resize(request: dict[str, Any]) -> dict[str, Any]:
        jobs.check_idle("resize")
        await device.refresh_capacity()
        return described()

    async def pause(request: dict[str, Any]) -> dict[str, Any]:
        jobs.check_idle("pause")
        await device.pause()
        return described()

    async def resume(request: dict[str, Any]) -> dict[str, Any]:
        jobs.check_idle("resume")
        device.resume()
        return described()

    async def mirror(request: dict[str, Any]) -> dict[str, Any]:
        params = dict(request)
        if "target" in params:
            params["target"] = _absolute_url("target", params["target"])
        job = await jobs.start_mirror(params)
        return {"job": job.describe()}

    async def list_jobs(request: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": jobs.describe()}

    async def cancel(request: dict[str, Any]) -> dict[str, Any]:
        job = await jobs.cancel()
        return {"job": job.describe(), "backend": device.storage.url}

    async def pivot(request: dict[str, Any]) -> dict[str, Any]:
        job = jobs.pivot()
        return {"job": job.describe()}

    handlers = {"info": info, "swap": swap, "resize": resize, "pause": pause, "resume": resume,
                "latency": latency_handler(device), "mirror": mirror, "jobs": list_jobs,
                "cancel": cancel, "pivot": pivot}
    for cmd in CONTROL_COMMANDS:
        accepts(handlers[cmd.name], cmd.params)
    return handlers
