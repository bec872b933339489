"""What systemd sees of a `vdev` daemon: pidfile, sd_notify readiness, socket activation.

Real daemon processes (``python -m vdev blk``), and the other side of each
convention played by the test itself, the way systemd plays it:

* ``NOTIFY_SOCKET``: a datagram socket the test binds (a path, or a name in
  the abstract namespace); the daemon must send exactly ``READY=1`` once
  its sockets accept connections and its ``--pidfile`` is written, and
  ``STOPPING=1`` when a SIGTERM arrives;
* ``--pidfile``: written when listening, removed on exit; a stale one (dead
  pid, a pid now used by something that is not vdev, garbage) is replaced,
  one held by a running vdev is refused before any socket exists;
* ``--fd N``: a listening socket the test made and passed; ``LISTEN_FDS=1``
  with ``LISTEN_PID`` as systemd sets them (fd 3, no option); an fd that is
  not a listening Unix stream socket is a bad value (exit 2, one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdev.testing import Buffer, VirtioFrontend

SECTOR = 512


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vdev-sd-") as d:
        yield Path(d)


def vdev(*args: str, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
         preexec_fn: Callable[[], None] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log is not None else subprocess.DEVNULL      # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, "-m", "vdev", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, pass_fds=pass_fds,
                                # LISTEN_PID must name the child, known only after fork
                                preexec_fn=preexec_fn)  # noqa: PLW1509
    finally:
        if log is not None:
            out.close()       # type: ignore[union-attr]


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    env.update(extra)
    return env


class NotifySocket:
    """The service manager's end of sd_notify: a bound datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    async def receive(self, timeout: float = 20) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        return data.decode()

    def pending(self) -> list[str]:
        out = []
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.sock.recv(4096).decode())
        return out

    def close(self) -> None:
        self.sock.close()


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    async with asyncio.timeout(timeout):
        while proc.poll() is None:
            await asyncio.sleep(0.02)
    return proc.returncode


async def one_write(sock: Path) -> None:
    """A front-end brings the disk up and a write completes: the daemon serves."""
    vm = await VirtioFrontend.start(str(sock), num_queues=1)
    try:
        used = await vm.request(0, [Buffer.readable(struct.pack("<IIQ", 1, 0, 0)),
                                    Buffer.readable(b"\x5a" * SECTOR), Buffer.writable(1)])
        assert used.written[-1] == 0
    finally:
        await vm.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_once_listening_with_pidfile_then_stopping_and_pidfile_removed(
        workdir: Path, abstract: bool) -> None:
    address = f"@vdev-test-notify-{os.getpid()}" if abstract else str(workdir / "notify")
    notify = NotifySocket(address)
    sock, ctl, pidfile = workdir / "blk.sock", workdir / "blk.ctl", workdir / "run" / "vdev.pid"
    pidfile.parent.mkdir()
    proc = vdev("blk", "--socket", str(sock), "--backend", "mem:1M", "--control", str(ctl),
                "--pidfile", str(pidfile), env=env_with(NOTIFY_SOCKET=address), log=workdir / "log")
    try:
        assert await notify.receive() == "READY=1"
        # Ready means: the pidfile names us and both sockets take connections.
        assert pidfile.read_text() == f"{proc.pid}\n"
        for path in (sock, ctl):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
        await one_write(sock)
        assert notify.pending() == []                     # one datagram, not more
        proc.send_signal(signal.SIGTERM)
        assert await notify.receive() == "STOPPING=1"
        assert await wait_exit(proc) == 0, (workdir / "log").read_text()
        assert not pidfile.exists()
        assert notify.pending() == []
    finally:
        proc.kill()
        notify.close()


async def test_without_notify_socket_nothing_is_sent_and_pidfile_still_works(workdir: Path) -> None:
    sock, pidfile = workdir / "blk.sock", workdir / "vdev.pid"
    proc = vdev("blk", "--socket", str(sock), "--backend", "mem:1M", "--pidfile", str(pidfile),
                env=env_with())
    try:
        async with asyncio.timeout(20):
            while not pidfile.exists():
                await asyncio.sleep(0.02)
        assert int(pidfile.read_text()) == proc.pid
        await one_write(sock)
        proc.send_signal(signal.SIGINT)
        assert await wait_exit(proc) == 0
        assert not pidfile.exists()
    finally:
        proc.kill()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("stale", ["dead-pid", "not-vdev", "garbage"])
async def test_stale_pidfile_is_replaced(workdir: Path, stale: str) -> None:
    pidfile, sock = workdir / "vdev.pid", workdir / "blk.sock"
    other = None
    if stale == "dead-pid":
        pidfile.write_text(f"{dead_pid()}\n")
    elif stale == "not-vdev":
        # The number now belongs to a process that is not vdev.
        other = subprocess.Popen(["sleep", "60"])
        pidfile.write_text(f"{other.pid}\n")
    else:
        pidfile.write_text("not a pid\n")
    notify = NotifySocket(str(workdir / "notify"))
    proc = vdev("blk", "--socket", str(sock), "--backend", "mem:1M", "--pidfile", str(pidfile),
                env=env_with(NOTIFY_SOCKET=str(workdir / "notify")))
    try:
        assert await notify.receive() == "READY=1"
        assert pidfile.read_text() == f"{proc.pid}\n"
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
        assert not pidfile.exists()
    finally:
        proc.kill()
        notify.close()
        if other is not None:
            other.kill()
            other.wait()


async def test_pidfile_of_a_running_daemon_is_refused_before_any_socket(workdir: Path) -> None:
    pidfile = workdir / "vdev.pid"
    notify = NotifySocket(str(workdir / "notify"))
    first = vdev("blk", "--socket", str(workdir / "a.sock"), "--backend", "mem:1M", "--pidfile", str(pidfile),
                 env=env_with(NOTIFY_SOCKET=str(workdir / "notify")))
    try:
        assert await notify.receive() == "READY=1"
        second = subprocess.run([sys.executable, "-m", "vdev", "blk", "--socket", str(workdir / "b.sock"),
                                 "--backend", "mem:1M", "--pidfile", str(pidfile), "--control",
                                 str(workdir / "b.ctl")], capture_output=True, text=True, timeout=60,
                                env=env_with(), check=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert str(pidfile) in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert not (workdir / "b.sock").exists() and not (workdir / "b.ctl").exists()
        assert pidfile.read_text() == f"{first.pid}\n"      # the running daemon's, untouched
        first.send_signal(signal.SIGTERM)
        assert await wait_exit(first) == 0
    finally:
        first.kill()
        notify.close()


def listening_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    return s


async def test_fd_serves_a_passed_listening_socket(workdir: Path) -> None:
    sock = workdir / "activated.sock"
    listener = listening_socket(sock)
    fd = listener.fileno()
    proc = vdev("blk", "--fd", str(fd), "--backend", "mem:1M", pass_fds=(fd,), env=env_with(),
                log=workdir / "log")
    listener.close()                                      # the daemon holds its own copy now
    try:
        await one_write(sock)
        await one_write(sock)                             # and the next front-end too
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, (workdir / "log").read_text()
        assert sock.exists()       # the path belongs to whoever made the socket (systemd), not us
    finally:
        proc.kill()


async def test_listen_fds_socket_activation_as_systemd_does_it(workdir: Path) -> None:
    sock = workdir / "activated.sock"
    listener = listening_socket(sock)
    fd = listener.fileno()

    def as_systemd() -> None:
        # In the child, between fork and exec, as systemd does: the socket at
        # fd 3, LISTEN_FDS=1 and LISTEN_PID naming the process itself.
        os.environ.clear()
        os.environ.update(env_with(LISTEN_FDS="1", LISTEN_FDNAMES="vdev", LISTEN_PID=str(os.getpid()),
                                   NOTIFY_SOCKET=str(workdir / "notify")))
        os.dup2(fd, 3)

    notify = NotifySocket(str(workdir / "notify"))
    proc = vdev("blk", "--backend", "mem:1M", env=None, pass_fds=(3,), preexec_fn=as_systemd,
                log=workdir / "log")
    listener.close()
    try:
        assert await notify.receive() == "READY=1"
        await one_write(sock)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, (workdir / "log").read_text()
    finally:
        proc.kill()
        notify.close()


@pytest.mark.parametrize("what", ["closed", "regular-file", "not-listening", "datagram"])
def test_fd_that_is_not_a_listening_unix_stream_socket_is_a_bad_value(workdir: Path, what: str) -> None:
    keep: list[object] = []
    if what == "closed":
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        fd, pass_fds, reason = r, (), "Bad file descriptor"
    elif what == "regular-file":
        f = open(workdir / "file", "wb")                  # noqa: SIM115
        keep.append(f)
        fd, pass_fds, reason = f.fileno(), (f.fileno(),), "not a socket"
    elif what == "not-listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        keep.append(s)
        fd, pass_fds, reason = s.fileno(), (s.fileno(),), "not listening"
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep.append(s)
        fd, pass_fds, reason = s.fileno(), (s.fileno(),), "not a Unix stream socket"
    try:
        done = subprocess.run([sys.executable, "-m", "vdev", "blk", "--fd", str(fd), "--backend", "mem:1M",
                               "--control", str(workdir / "ctl")], capture_output=True, text=True,
                              timeout=60, pass_fds=pass_fds, env=env_with(), check=False)
    finally:
        for k in keep:
            k.close()   # type: ignore[attr-defined]
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--fd {fd}" in lines[0] and reason in lines[0], lines
    assert not (workdir / "ctl").exists()


@pytest.mark.parametrize("bad", [["--pidfile", "/nonexistent-dir/vdev.pid"], ["--shutdown-timeout", "soon"],
                                 ["--shutdown-timeout", "0"]])
def test_bad_service_options_are_named(workdir: Path, bad: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vdev", "blk", "--socket", str(workdir / "s"),
                           "--backend", "mem:1M", *bad], capture_output=True, text=True, timeout=60,
                          env=env_with(), check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and bad[1] in lines[0] and bad[0] in lines[0], lines
    assert not (workdir / "s").exists()
