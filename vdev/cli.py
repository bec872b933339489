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
``NOTIFY_SOCKET`` set, readiness goes to systemd); and ``--metrics
HOST:PORT``, a Prometheus endpoint (`vdev.metrics`), bound before the device
is created so that a port in use ends the program before any vhost-user
socket exists.

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
import textwrap
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, NoReturn

from . import __version__, service
from .control import JOB_FINAL_PHASES, URL_KEYS, ControlCommand, absolute_url
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
    #: The ``--control`` socket's commands, for ``vdev ctl --help`` and completion.
    control_commands: ClassVar[tuple[ControlCommand, ...]] = ()
    #: spec "Backend program conventions": the features --print-capabilities
    #: lists (vhost-user.json, e.g. ``read-only`` for a block device).
    capability_features: ClassVar[tuple[str, ...]] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the device's own options."""

    @abc.abstractmethod
    def configure(self, args: argparse.Namespace) -> Any:
        """Validate ``args`` into a frozen config.  Raise ValueError naming the bad value."""

    @abc.abstractmethod
    async def create(self, config: Any) -> Device:
        """Build the device (open files, connect storage)."""

    def capabilities(self) -> dict[str, Any]:
        return {"type": self.capability_type, "features": list(self.capability_features)}

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


TOOLS = (("ctl", "send a command to a running daemon's --control socket (vdev ctl --help)"),
         ("bench", "drive a back end and measure it (vdev bench blk SOCKET …)"),
         ("completion", "print a shell completion script (vdev completion bash)"))


def _ctl_epilog(commands: dict[str, DeviceCommand]) -> str:
    lines = ["commands (KEY=VALUE parameters; [optional]):"]
    for name, cmd in commands.items():
        if not cmd.control_commands:
            continue
        lines.append(f"  {name}:")
        for c in cmd.control_commands:
            lines.append(f"    {c.synopsis()}")
            lines.extend(textwrap.wrap(c.summary, 88, initial_indent=" " * 8, subsequent_indent=" " * 8))
    lines += ["",
              "--wait (with a command that starts a job, e.g. mirror): show its progress on a",
              "terminal and return when it ends; exit status 0 only if it succeeded.",
              "Relative paths in backend= and target= are made absolute against your directory.",
              "",
              "example:",
              "  vdev ctl /tmp/blk.ctl mirror target=nbd://storage-host/disk --wait"]
    return "\n".join(lines)


def build_parser(commands: dict[str, DeviceCommand], *,
                 tools_as_commands: bool = False) -> argparse.ArgumentParser:
    """The ``vdev`` parser.  The tools are not devices: they get no entry in
    the devices list (no help= on their subparser) and are listed apart, in
    the epilog; ``tools_as_commands`` lists them as subcommands (for the
    completion generator, which skips unlisted ones)."""
    tool_help = dict(TOOLS)

    def tool(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if tools_as_commands:
            kwargs["help"] = tool_help[name]
        p: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
        p.error = _Parser.error.__get__(p)  # type: ignore[method-assign]
        return p

    parser = _Parser(prog="vdev", description="Standalone virtio device back ends over vhost-user.",
                     epilog="tools:\n" + "\n".join(f"  {name:<11} {text}" for name, text in TOOLS),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vdev {__version__}")
    sub = parser.add_subparsers(dest="device", metavar="DEVICE", title="devices")
    ctl = tool("ctl", description="Send one JSON command to a daemon's control socket and print "
                                  "the reply, e.g. `vdev ctl /tmp/blk.ctl swap backend=file:/b.img`.",
               epilog=_ctl_epilog(commands), formatter_class=argparse.RawDescriptionHelpFormatter)
    ctl.add_argument("control", metavar="PATH", help="the daemon's --control socket")
    ctl.add_argument("command", help="command name (listed below)")
    ctl.add_argument("params", nargs="*", metavar="KEY=VALUE", help="command parameters")
    ctl.add_argument("--reset", action="store_true",
                     help="latency: report, then start a new window (the request field reset=true)")
    shape = ctl.add_mutually_exclusive_group()
    shape.add_argument("--table", action="store_true",
                       help="print a table for commands that have one (latency); the default "
                            "when stdout is a terminal")
    shape.add_argument("--json", action="store_true",
                       help="print the JSON reply; the default when stdout is not a terminal")
    ctl.add_argument("--wait", action="store_true",
                     help="wait for the job the command starts; a progress bar on a terminal")
    from .bench.cli import add_arguments as add_bench_arguments
    bench = tool("bench", description="Benchmarks that drive a back end the way a guest does.")
    add_bench_arguments(bench, _Parser.error)
    completion = tool("completion", description="Print a completion script for the shell, generated "
                      "from this command line (devices, options, control commands). Install: vdev "
                      "completion bash > /usr/local/share/bash-completion/completions/vdev")
    completion.add_argument("shell", choices=["bash"], help="the shell (bash)")
    for name, cmd in commands.items():
        epilog = ("QEMU example:\n" + textwrap.indent(cmd.qemu_example, "  ")) if cmd.qemu_example else None
        p = sub.add_parser(name, help=cmd.summary, description=cmd.summary, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.error = _Parser.error.__get__(p)  # type: ignore[method-assign]
        common = p.add_argument_group("vhost-user")
        common.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                            help="vhost-user Unix socket (listened on, or connected to with --client)")
        common.add_argument("--fd", type=int, metavar="N",
                            help="inherited listening socket fd (systemd socket activation: --fd 3)")
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
        common.add_argument("--metrics", metavar="HOST:PORT",
                            help="serve Prometheus metrics at http://HOST:PORT/metrics (per-queue "
                                 "requests, bytes, kicks, calls, latency histograms; off by default)")
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
    metrics = None
    if args.metrics is not None:
        from .metrics import parse_hostport
        metrics = parse_hostport(args.metrics)
    return ServeOptions(args.socket, fd, args.client, args.pidfile, timeout, metrics)


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
        try:
            if runtime is not None:
                # The queues took nothing since the signal (hold_nowait); wait for
                # the native engines' requests (the Python path's are awaited
                # when the connection is torn down, which the cancel starts).
                await runtime.hold()
                runtime.release()          # the hold_nowait of the signal handler
        except Exception:
            # Whatever went wrong while waiting, the daemon must still stop
            # (an exception here once left it serving on after SIGTERM).
            log.exception("%s: while waiting for requests in flight", self.prog)
        finally:
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
    metrics = None
    try:
        if where.metrics is not None:
            from .metrics import MetricsServer
            # Bound first: a port in use ends vdev before storage opens or a socket exists.
            metrics = MetricsServer(*where.metrics)
            metrics.start()
        try:
            life.device = await cmd.create(config)
        except asyncio.CancelledError:
            if life.stopping is None:
                raise
            return                                  # stopped while the device was being made
        if metrics is not None:
            metrics.attach(life.device)
        with contextlib.suppress(asyncio.CancelledError):
            await cmd.serve(life.device, config, where)
        if life.stopping is not None and not life.stopping.done():
            life.stopping.cancel()
        log.info("%s: stopped", cmd.name)
    finally:
        LISTENING_HOOK.reset(token)
        life.finished()
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
        # Otherwise the signals stay bound to a closed loop and are swallowed
        # for the rest of the process (a caller of main() could not be killed).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _ctl(args: argparse.Namespace, commands: dict[str, DeviceCommand]) -> int:
    from .control import control_request

    request: dict[str, Any] = {"command": args.command}
    for param in args.params:
        key, sep, value = param.partition("=")
        if not sep or not key:
            print(f"vdev ctl: error: parameter {param!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        if key in request:
            print(f"vdev ctl: error: parameter {key!r} given twice", file=sys.stderr)
            return 2
        # The daemon's working directory is not ours: a relative path means ours.
        request[key] = absolute_url(value, os.getcwd()) if key in URL_KEYS else value
    if args.reset:
        if args.command != "latency":
            print(f"vdev ctl: error: --reset applies to the latency command, not {args.command!r}",
                  file=sys.stderr)
            return 2
        request["reset"] = True
    if args.wait and not any(c.name == args.command and c.starts_job
                             for cmd in commands.values() for c in cmd.control_commands):
        jobs = sorted({c.name for cmd in commands.values() for c in cmd.control_commands if c.starts_job})
        print(f"vdev ctl: error: --wait: {args.command!r} starts no job (only {', '.join(jobs)} do)",
              file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(control_request(args.control, request))
    except (TimeoutError, OSError, ConnectionError) as exc:
        print(f"vdev ctl: error: {args.control}: {exc}", file=sys.stderr)
        return 1
    if not args.wait or not reply.get("ok"):
        table = _CTL_TABLES.get(args.command)
        if reply.get("ok") and table is not None and (args.table or (sys.stdout.isatty() and not args.json)):
            print(table(reply))
        else:
            print(json.dumps(reply, indent=2))
        return 0 if reply.get("ok") else 1
    job = reply.get("job")
    if not isinstance(job, dict) or "id" not in job:
        print(json.dumps(reply, indent=2))
        print("vdev ctl: error: --wait: the reply names no job", file=sys.stderr)
        return 1
    try:
        final = asyncio.run(_wait_job(args.control, job, sys.stderr.isatty()))
    except KeyboardInterrupt:
        print(f"\nvdev ctl: stopped waiting; job {job['id']} goes on (stop it: vdev ctl {args.control} "
              "cancel)", file=sys.stderr)
        return 130
    except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
        print(f"vdev ctl: error: while waiting for job {job['id']}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(final, indent=2))
    return 0 if final.get("phase") == "done" else 1


#: Seconds between two progress polls of --wait.
WAIT_POLL = 0.2


async def _wait_job(path: str, job: dict[str, Any], tty: bool) -> dict[str, Any]:
    """Poll ``jobs`` until ``job`` reaches a final phase; draw a progress bar on a terminal.

    Raises:
        ValueError: the daemon refused ``jobs`` or forgot the job.
    """
    from .control import control_request

    current = job
    try:
        while current.get("phase") not in JOB_FINAL_PHASES:
            await asyncio.sleep(WAIT_POLL)
            reply = await control_request(path, {"command": "jobs"})
            if not reply.get("ok"):
                raise ValueError(f"jobs failed: {reply.get('error')}")
            found = [j for j in reply.get("jobs", []) if isinstance(j, dict) and j.get("id") == job["id"]]
            if not found:
                raise ValueError("the daemon no longer lists it")
            current = found[0]
            if tty:
                print("\r" + progress_line(current), end="", file=sys.stderr, flush=True)
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
    return current


def _mib(n: object) -> str:
    return f"{n / (1 << 20):.1f}" if isinstance(n, (int, float)) else "?"


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """One line: ``mirror 1 [#####-----]  52.0%  532.1/1024.0 MiB  dirty 12.5 MiB  210.3 MiB/s  copying``."""
    progress = job.get("progress")
    frac = min(1.0, max(0.0, float(progress))) if isinstance(progress, (int, float)) else 0.0
    filled = int(frac * width)
    size = job.get("size")
    done = size * frac if isinstance(size, (int, float)) else None
    return (f"{job.get('type', 'job')} {job.get('id')} [{'#' * filled}{'-' * (width - filled)}] "
            f"{frac * 100:5.1f}%  {_mib(done)}/{_mib(size)} MiB  dirty {_mib(job.get('dirty_bytes'))} MiB  "
            f"{_mib(job.get('rate'))} MiB/s  {job.get('phase')}   ")


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
        return _ctl(args, commands)
    if args.device == "completion":
        from .completion import bash_script
        print(bash_script(commands), end="")
        return 0
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
    runner: Callable[[Coroutine[Any, Any, None]], None]
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
