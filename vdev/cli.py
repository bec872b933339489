"""The `vdev` command: one subcommand per device, found through entry points.

Every device registers a `DeviceCommand` in the ``vdev.devices`` entry-point
group (see ``pyproject.toml``), so a third party's device appears in
``vdev --help`` exactly as ours do.  A command turns argv into a validated,
frozen config (`configure`), and only then is anything created: a bad value
ends the program with one line naming it, before any socket exists.

Options every device gets, after the spec's "Backend program conventions":
``--socket PATH`` (alias ``--socket-path``), ``--fd N`` (an inherited
listening socket), ``--client`` (connect to a VMM that listens),
``--print-capabilities`` and ``--log-level``; and ``--metrics HOST:PORT``, a
Prometheus endpoint (`vdev.metrics`), bound before the device is created so
that a port in use ends the program before any vhost-user socket exists.
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

from . import __version__
from .device import Device, serve

log = logging.getLogger("vdev")

ENTRY_POINT_GROUP = "vdev.devices"


@dataclass(frozen=True)
class ServeOptions:
    """Where to serve: the common part of every device's config."""

    socket: str | None
    fd: int | None
    client: bool
    #: ``--metrics``: (host, port) of the Prometheus endpoint, or None (off).
    metrics: tuple[str, int] | None = None


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
    ctl.add_argument("--reset", action="store_true",
                     help="latency: report, then start a new window (the request field reset=true)")
    shape = ctl.add_mutually_exclusive_group()
    shape.add_argument("--table", action="store_true",
                       help="print a table for commands that have one (latency); the default "
                            "when stdout is a terminal")
    shape.add_argument("--json", action="store_true",
                       help="print the JSON reply; the default when stdout is not a terminal")
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
        common.add_argument("--print-capabilities", action="store_true",
                            help="print the back end's capabilities as JSON and exit")
        common.add_argument("--log-level", default="info",
                            choices=["debug", "info", "warning", "error"], help="log verbosity")
        common.add_argument("--metrics", metavar="HOST:PORT",
                            help="serve Prometheus metrics at http://HOST:PORT/metrics (per-queue "
                                 "requests, bytes, kicks, calls, latency histograms; off by default)")
        cmd.add_arguments(p)
    return parser


def serve_options(args: argparse.Namespace) -> ServeOptions:
    if (args.socket is None) == (args.fd is None):
        raise ValueError("give exactly one of --socket PATH and --fd N")
    if args.client and args.socket is None:
        raise ValueError("--client needs --socket PATH")
    if args.socket is not None:
        parent = os.path.dirname(os.path.abspath(args.socket)) or "."
        if not os.path.isdir(parent):
            raise ValueError(f"--socket: directory {parent!r} does not exist")
    if args.fd is not None and args.fd < 0:
        raise ValueError(f"--fd: not a file descriptor: {args.fd}")
    metrics = None
    if args.metrics is not None:
        from .metrics import parse_hostport
        metrics = parse_hostport(args.metrics)
    return ServeOptions(args.socket, args.fd, args.client, metrics)


async def _run(cmd: DeviceCommand, config: Any, where: ServeOptions) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    metrics = None
    try:
        if where.metrics is not None:
            from .metrics import MetricsServer
            # Bound first: a port in use ends vdev before storage opens or a socket exists.
            metrics = MetricsServer(*where.metrics)
            metrics.start()
        device = await cmd.create(config)
        if metrics is not None:
            metrics.attach(device)
        with contextlib.suppress(asyncio.CancelledError):
            await cmd.serve(device, config, where)
        log.info("%s: stopped", cmd.name)
    finally:
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
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
    if args.reset:
        if args.command != "latency":
            print(f"vdev ctl: error: --reset applies to the latency command, not {args.command!r}",
                  file=sys.stderr)
            return 2
        request["reset"] = True
    try:
        reply = asyncio.run(control_request(args.control, request))
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        print(f"vdev ctl: error: {args.control}: {exc}", file=sys.stderr)
        return 1
    table = _CTL_TABLES.get(args.command)
    if reply.get("ok") and table is not None and (args.table or (sys.stdout.isatty() and not args.json)):
        print(table(reply))
    else:
        print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def _latency_table(reply: dict[str, Any]) -> str:
    from .metrics import latency_table
    return latency_table(reply)


#: Commands whose reply `vdev ctl` can print as a table (on a terminal, or with --table).
_CTL_TABLES = {"latency": _latency_table}


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
