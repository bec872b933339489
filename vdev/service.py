"""What a service manager needs from a `vdev` daemon: a pidfile, readiness, socket activation, a bounded stop.

systemd (and other supervisors) speak to a daemon through a few conventions,
each implemented here without a dependency:

* **pidfile** (``--pidfile PATH``): written once the daemon listens, removed
  when it exits.  A pidfile naming a process that is gone (or that is no
  `vdev`: the number was reused) is stale and replaced; one naming a running
  `vdev` is refused before any socket is created.
* **readiness** (``sd_notify(3)``): when ``NOTIFY_SOCKET`` is set, one
  datagram ``READY=1`` once the daemon listens and ``STOPPING=1`` when it
  starts to shut down.  The protocol is a single ``sendto`` on an AF_UNIX
  datagram socket; a name starting with ``@`` is in the abstract namespace.
* **socket activation** (``sd_listen_fds(3)``): ``--fd N`` serves an
  inherited listening socket; without ``--socket`` or ``--fd``,
  ``LISTEN_FDS=1`` with ``LISTEN_PID`` equal to our pid means fd 3.  An fd
  that is not a listening AF_UNIX stream socket is a bad value, named before
  anything starts.
* **stopping** (`ShutdownGuard`): after the first SIGTERM/SIGINT the daemon
  finishes the requests in flight; a second signal, or the shutdown taking
  longer than its bound, ends the process at once with one line on stderr.
  The guard runs in its own thread, fed by the signal module's wakeup fd, so
  it acts even if the event loop is stuck in a storage call.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ShutdownGuard", "check_listen_fd", "check_pidfile", "listen_fds", "notify",
           "remove_pidfile", "write_pidfile", "SD_LISTEN_FDS_START"]

#: The first fd systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


# -- pidfile --------------------------------------------------------------------------------

def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _is_running_vdev(pid: int) -> bool:
    """Whether ``pid`` is alive and is a `vdev` (not a stranger that got the number)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                  # alive, someone else's
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True                           # cannot tell: assume it is ours, refuse
    if not cmdline:
        return False                          # a zombie
    return b"vdev" in cmdline


def check_pidfile(path: str) -> None:
    """Refuse a pidfile held by a running daemon (called before any socket exists).

    Raises:
        ValueError: naming the path and the running pid, or a directory that is missing.
    """
    p = Path(path)
    if not p.parent.is_dir():
        raise ValueError(f"--pidfile {path}: directory {str(p.parent)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"--pidfile {path}: is a directory")
    pid = _pid_in(p)
    if pid is not None and _is_running_vdev(pid):
        raise ValueError(f"--pidfile {path}: vdev is already running as pid {pid}; stop it first "
                         "(or give another --pidfile)")


def write_pidfile(path: str) -> None:
    """Write our pid (replacing a stale file) atomically: a reader sees the old file or ours."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, p)


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it is still ours."""
    p = Path(path)
    with contextlib.suppress(OSError, ValueError):
        if _pid_in(p) == os.getpid():
            p.unlink()


# -- sd_notify --------------------------------------------------------------------------------

def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1`` …) to ``$NOTIFY_SOCKET``; False if unset or failed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]               # abstract namespace
    elif addr[0] != "/":
        return False                          # vsock: addresses are not ours to handle here
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as exc:
        print(f"vdev: warning: cannot notify {os.environ.get('NOTIFY_SOCKET')}: {exc}", file=sys.stderr)
        return False
    return True


# -- socket activation ----------------------------------------------------------------------

def listen_fds() -> int | None:
    """The listening fd systemd passed (LISTEN_FDS / LISTEN_PID), or None.

    The variables are removed from the environment (sd_listen_fds with
    unset_environment), so nothing we start inherits them.

    Raises:
        ValueError: more than one fd was passed (this daemon serves one socket).
    """
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    if count is None:
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is None or not pid.isdigit() or int(pid) != os.getpid():
        return None                           # meant for another process
    if count != "1":
        raise ValueError(f"LISTEN_FDS={count}: exactly one listening socket is served")
    return SD_LISTEN_FDS_START


def check_listen_fd(fd: int) -> None:
    """Check that ``fd`` is a listening AF_UNIX stream socket.

    Raises:
        ValueError: naming the fd and what it is instead.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ValueError(f"--fd {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"--fd {fd}: not a socket")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"--fd {fd}: not a Unix stream socket ({sock.family.name}, "
                             f"{sock.type.name})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"--fd {fd}: the socket is not listening")
    finally:
        sock.close()


# -- a bounded stop ----------------------------------------------------------------------------

class ShutdownGuard:
    """Ends the process when a second signal comes or the shutdown overruns its bound.

    Created from the event loop's handler of the first signal (on the main
    thread, as ``signal.set_wakeup_fd`` requires).  It takes over the signal
    wakeup fd — the C-level handler writes each signal's number there from
    whatever thread it interrupts — and watches it from a thread of its own,
    so neither the second signal nor the deadline waits for the event loop.
    ``on_exit`` runs just before ``os._exit`` (pidfile removal).
    """

    def __init__(self, prog: str, timeout: float, on_exit: Callable[[], None]) -> None:
        self.prog = prog
        self.timeout = timeout
        self.on_exit = on_exit
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._deadline = time.monotonic() + timeout
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="vdev-shutdown", daemon=True)
        self._thread.start()

    def _exit(self, code: int, line: str) -> None:
        with contextlib.suppress(Exception):
            self.on_exit()
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode())
        os._exit(code)

    def _watch(self) -> None:
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._exit(1, f"{self.prog}: error: shutdown did not finish within {self.timeout:g} s "
                              "(requests still on storage); exiting without them")
            try:
                ready, _, _ = select.select([self._r, self._stop_r], [], [], left)
            except InterruptedError:
                continue
            if self._stop_r in ready:
                return
            if self._r in ready:
                try:
                    data = os.read(self._r, 64)
                except BlockingIOError:
                    continue
                for signum in data:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        name = signal.Signals(signum).name
                        self._exit(128 + signum, f"{self.prog}: second {name}: exiting at once, "
                                                 "without waiting for requests in flight")

    def cancel(self) -> None:
        """The shutdown finished: stop watching."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join()
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for fd in (self._r, self._w, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
