"""The `vdev` command: one subcommand per device, found through entry points.

Every device registers a `DeviceCommand` in the ``vdev.devices`` entry-point
group (see ``pyproject.toml``), so a third party's device appears in
``vdev --help`` exactly as ours do.  A command turns argv into a validated,
frozen config (`configure`), and only then is anything created: a bad value
ends the program with one line naming it, before any socket exists.

Options every device gets, after the spec's "Backend program conventions":
``--socket PATH`` (alias ``--socket-path``), ``--fd N`` (an inherited
listening socket; without either, systemd's ``LISTEN_FDS`` socket
activation), ``--client`` (connect to a VMM that listens),
``--print-capabilities``, ``--log-level``, and for service managers
``--pidfile PATH`` and ``--shutdown-timeout S`` (see `vdev.service`; with
``NOTIFY_SOCKET`` set, readiness goes to systemd).

Stopping: SIGTERM or SIGINT makes the daemon take no new requests, finish
those in flight, flush and close its storage and exit 0; a second signal, or
a shutdown longer than ``--shutdown-timeout``, exits at once with one line
saying so (status 128 + signal number, or 1).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, NoReturn

from . import __version__, service
from .device import LISTENING_HOOK, Device, serve

log = logging.getLogger("vdev")

ENTRY_POINT_GROUP = "vdev.devices"
#: Seconds a SIGTERM/SIGINT shutdown may wait for requests in flight.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
MAX_SHUTDOWN_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ServeOptions:
    """Where to serve: the common part of every device's config."""

    socket: str | None
    fd: int | None
    client: bool
    pidfile: str | None = None
    shutdown_timeout: float = 30.0


class DeviceCommand(abc.ABC):
    """What a device contributes to the command line."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: The device type for --print-capabilities (spec "Backend program conventions").
    capability_type: ClassVar[str]
    #: A QEMU command line that attaches the device, shown in --help.
    qemu_example: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the device's own options."""

    @abc.abstractmethod
    def configure(self, args: argparse.Namespace) -> Any:
        """Validate ``args`` into a frozen config.  Raise ValueError naming the bad value."""

    @abc.abstractmethod
    async def create(self, config: Any) -> Device:
        """Build the device (open files, connect storage)."""

    def capabilities(self) -> dict[str, Any]:
        return {"type": self.capability_type, "features": []}

    async def serve(self, device: Device, config: Any, where: ServeOptions) -> None:
        """Serve the device; a command may override this to run more (a control socket)."""
        await serve(device, where.socket, client=where.client, listen_fd=where.fd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the value; the usage is a --help away.
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_commands() -> dict[str, DeviceCommand]:
    commands: dict[str, DeviceCommand] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
            commands[ep.name] = cls()
        except Exception as exc:   # a broken plug-in must not take the others down
            print(f"vdev: warning: cannot load device {ep.name!r}: {exc}", file=sys.stderr)
    return commands


def build_parser(commands: dict[str, DeviceCommand]) -> argparse.ArgumentParser:
    # The tools are not devices: they get no entry in the devices list (no
    # help= on their subparser) and are listed apart, in the epilog.
    parser = _Parser(prog="vdev", description="Standalone virtio device back ends over vhost-user.",
                     epilog="tools:\n"
                            "  ctl       send a command to a running daemon's --control socket\n"
                            "  bench     drive a back end and measure it (vdev bench blk SOCKET …)",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vdev {__version__}")
    sub = parser.add_subparsers(dest="device", metavar="DEVICE", title="devices")
    ctl = sub.add_parser("ctl",
                         description="Send one JSON command to a daemon's control socket and print "
                                     "the reply, e.g. `vdev ctl /tmp/blk.ctl swap backend=file:/b.img`.")
    ctl.error = _Parser.error.__get__(ctl)  # type: ignore[method-assign]
    ctl.add_argument("control", metavar="PATH", help="the daemon's --control socket")
    ctl.add_argument("command", help="command name (blk: info, swap, resize)")
    ctl.add_argument("params", nargs="*", metavar="KEY=VALUE", help="command parameters")
    from .bench.cli import add_arguments as add_bench_arguments
    bench = sub.add_parser("bench", description="Benchmarks that drive a back end the way a guest does.")
    bench.error = _Parser.error.__get__(bench)  # type: ignore[method-assign]
    add_bench_arguments(bench, _Parser.error)
    for name, cmd in commands.items():
        epilog = f"QEMU example:\n  {cmd.qemu_example}" if cmd.qemu_example else None
        p = sub.add_parser(name, help=cmd.summary, description=cmd.summary, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.error = _Parser.error.__get__(p)  # type: ignore[method-assign]
        common = p.add_argument_group("vhost-user")
        common.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                            help="vhost-user Unix socket (listened on, or connected to with --client)")
        common.add_argument("--fd", type=int, metavar="N", help="inherited listening socket fd")
        common.add_argument("--client", action="store_true",
                            help="connect to PATH (a VMM started with server=on) instead of listening")
        common.add_argument("--pidfile", metavar="PATH",
                            help="write the daemon's pid here once it listens (removed on exit)")
        common.add_argument("--shutdown-timeout", default=str(DEFAULT_SHUTDOWN_TIMEOUT), metavar="S",
                            help="on SIGTERM/SIGINT, how long to wait for requests in flight before "
                                 f"giving up (default {DEFAULT_SHUTDOWN_TIMEOUT:g})")
        common.add_argument("--print-capabilities", action="store_true",
                            help="print the back end's capabilities as JSON and exit")
        common.add_argument("--log-level", default="info",
                            choices=["debug", "info", "warning", "error"], help="log verbosity")
        cmd.add_arguments(p)
    return parser


def serve_options(args: argparse.Namespace) -> ServeOptions:
    fd = args.fd
    if args.socket is None and fd is None:
        fd = service.listen_fds()             # systemd socket activation
    if (args.socket is None) == (fd is None):
        raise ValueError("give exactly one of --socket PATH and --fd N")
    if args.client and args.socket is None:
        raise ValueError("--client needs --socket PATH")
    if args.socket is not None:
        parent = os.path.dirname(os.path.abspath(args.socket)) or "."
        if not os.path.isdir(parent):
            raise ValueError(f"--socket: directory {parent!r} does not exist")
    if fd is not None:
        if fd < 0:
            raise ValueError(f"--fd: not a file descriptor: {fd}")
        service.check_listen_fd(fd)
    try:
        timeout = float(args.shutdown_timeout)
    except ValueError:
        raise ValueError(f"--shutdown-timeout: not a number of seconds: {args.shutdown_timeout!r}") from None
    if not 0 < timeout <= MAX_SHUTDOWN_TIMEOUT:
        raise ValueError(f"--shutdown-timeout: {args.shutdown_timeout!r} is not in (0, {MAX_SHUTDOWN_TIMEOUT:g}]")
    if args.pidfile is not None:
        service.check_pidfile(args.pidfile)
    return ServeOptions(args.socket, fd, args.client, args.pidfile, timeout)


class _Lifecycle:
    """Readiness, the pidfile and the two-signal stop of one daemon run."""

    def __init__(self, prog: str, where: ServeOptions, main: asyncio.Task[None]) -> None:
        self.prog = prog
        self.where = where
        self.main = main
        self.device: Device | None = None
        self.guard: service.ShutdownGuard | None = None
        self.stopping: asyncio.Task[None] | None = None
        self.pid_written = False

    def listening(self) -> None:
        """The vhost-user socket listens: write the pidfile, then tell systemd."""
        if self.where.pidfile is not None and not self.pid_written:
            service.write_pidfile(self.where.pidfile)
            self.pid_written = True
        service.notify("READY=1")
        log.info("%s: ready (pid %d)", self.prog, os.getpid())

    def remove_pidfile(self) -> None:
        if self.where.pidfile is not None and self.pid_written:
            service.remove_pidfile(self.where.pidfile)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping is not None:
            # The guard normally sees it first (it holds the wakeup fd); this
            # covers a signal the loop delivers before the guard's thread runs.
            self.remove_pidfile()
            print(f"{self.prog}: second {name}: exiting at once, without waiting for requests "
                  "in flight", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        timeout = self.where.shutdown_timeout
        runtime = self.device.runtime if self.device is not None else None
        if runtime is not None:
            runtime.hold_nowait()          # before anything else runs: no new request
        log.info("%s: %s: stopping: no new requests; finishing those in flight (up to %g s; "
                 "a second signal exits at once)", self.prog, name, timeout)
        service.notify("STOPPING=1")
        self.guard = service.ShutdownGuard(self.prog, timeout, self.remove_pidfile)
        self.stopping = asyncio.get_running_loop().create_task(self._stop())

    async def _stop(self) -> None:
        runtime = self.device.runtime if self.device is not None else None
        if runtime is not None:
            # The queues took nothing since the signal (hold_nowait); wait for
            # the native engines' requests (the Python path's are awaited
            # when the connection is torn down, which the cancel starts).
            await runtime.hold()
            runtime.release()              # the hold_nowait of the signal handler
        self.main.cancel()

    def finished(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
        self.remove_pidfile()


async def _run(cmd: DeviceCommand, config: Any, where: ServeOptions) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    life = _Lifecycle(f"vdev {cmd.name}", where, task)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, life.on_signal, sig)
    token = LISTENING_HOOK.set(life.listening)
    try:
        try:
            life.device = await cmd.create(config)
        except asyncio.CancelledError:
            if life.stopping is None:
                raise
            return                                  # stopped while the device was being made
        with contextlib.suppress(asyncio.CancelledError):
            await cmd.serve(life.device, config, where)
        if life.stopping is not None and not life.stopping.done():
            life.stopping.cancel()
        log.info("%s: stopped", cmd.name)
    finally:
        LISTENING_HOOK.reset(token)
        life.finished()
        # Otherwise the signals stay bound to a closed loop and are swallowed
        # for the rest of the process (a caller of main() could not be killed).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _ctl(args: argparse.Namespace) -> int:
    from .control import control_request

    request: dict[str, Any] = {"command": args.command}
    for param in args.params:
        key, sep, value = param.partition("=")
        if not sep or not key:
            print(f"vdev ctl: error: parameter {param!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        request[key] = value
    try:
        reply = asyncio.run(control_request(args.control, request))
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        print(f"vdev ctl: error: {args.control}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def main(argv: Sequence[str] | None = None) -> int:
    commands = load_commands()
    argv = list(sys.argv[1:] if argv is None else argv)
    # spec "Backend program conventions": --print-capabilities works alone,
    # before the device's required options are checked.
    if len(argv) >= 2 and argv[0] in commands and "--print-capabilities" in argv[1:]:
        print(json.dumps(commands[argv[0]].capabilities()))
        return 0
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra:
        prog = f"vdev {args.device}" if args.device else "vdev"
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    if args.device is None:
        parser.print_help()
        return 2
    if args.device == "ctl":
        return _ctl(args)
    if args.device == "bench":
        from .bench.cli import main as bench_main
        return bench_main(args)
    cmd = commands[args.device]
    prog = f"vdev {args.device}"
    try:
        where = serve_options(args)
        config = cmd.configure(args)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:     # uvloop is a dependency; this only keeps odd platforms working
        runner = asyncio.run
    try:
        runner(_run(cmd, config, where))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        # Typically the device could not be created (storage that will not
        # open); no socket exists yet.  One line, like a bad value.
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
