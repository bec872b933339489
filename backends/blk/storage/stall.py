"""Real storage whose I/O a test can hold up: requests certainly in flight, on demand.

Tests of a daemon's faults (killed mid-request, stopped by SIGTERM with
requests on storage, a second signal while waiting for them) need requests
that are *certainly* in the daemon's storage calls at a chosen moment, with
no timing luck.  Both helpers here are real servers, not mocks:

* `FuseImage` — a raw image exported as a regular file through FUSE by
  ``qemu-storage-daemon`` (QEMU 7.2's ``--export type=fuse``).  `vdev blk`
  opens it as ``file:`` storage, so the native data plane (io_uring) and the
  Python file storage both run on it; `stall` stops the exporter (SIGSTOP) and
  every read and write of the file then waits in the kernel until `unstall`.
  Needs /dev/fuse and root.
* `NbdkitImage` — nbdkit's ``memory`` plugin behind its ``pause`` filter
  (requests wait while paused; the pause itself waits for those already
  running) and its ``log`` filter (every request, FLUSH included, written to
  a log the test reads).  ``nbd+unix://`` storage, so the Python data path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["FuseImage", "NbdkitImage", "StallUnavailable"]


class StallUnavailable(RuntimeError):
    """The host cannot run the helper (no /dev/fuse, not root, tool missing)."""


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], what: str,
          timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise StallUnavailable(f"{what} did not start: {err.strip()}")
        time.sleep(0.02)


class FuseImage:
    """A raw image of ``size`` bytes at ``directory/base.img``, served as the file ``path``."""

    def __init__(self, directory: Path, size: int) -> None:
        if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
            raise StallUnavailable("a FUSE export needs /dev/fuse and root")
        self.base = directory / "base.img"
        self.path = directory / "fuse.img"
        with open(self.base, "wb") as f:
            f.truncate(size)
        self.path.touch()
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={self.base}",
             "--export", f"type=fuse,id=e,node-name=f,mountpoint={self.path},writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # The mount point is an empty file until the export covers it.
        _wait(lambda: os.stat(self.path).st_size == size, self.proc, "qemu-storage-daemon's FUSE export")
        self.stalled = False

    def stall(self) -> None:
        """From now on every read and write of `path` waits (until `unstall`)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.stalled = True

    def unstall(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stalled = False

    def close(self) -> None:
        self.unstall()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", str(self.path)], check=False)


class NbdkitImage:
    """An nbdkit RAM disk on ``directory/nbd.sock`` whose requests can be paused and are logged."""

    def __init__(self, directory: Path, size: int) -> None:
        self.sock = directory / "nbd.sock"
        self.control = directory / "nbd-pause.sock"
        self.log_path = directory / "nbd.log"
        try:
            self.proc = subprocess.Popen(
                ["nbdkit", "--foreground", "--unix", str(self.sock), "--filter=log", "--filter=pause",
                 "memory", str(size), f"pause-control={self.control}", f"logfile={self.log_path}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise StallUnavailable("nbdkit is not installed") from exc
        _wait(lambda: self.sock.exists() and self.control.exists(), self.proc, "nbdkit")

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def _control(self, command: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.control))
            s.sendall(command)
            s.recv(1)        # 'P' once paused (requests running have finished), 'R' once resumed

    stalled = False

    def stall(self) -> None:
        """Requests from now on wait in nbdkit (until `unstall`)."""
        self._control(b"p")
        self.stalled = True

    def unstall(self) -> None:
        if self.stalled:
            self._control(b"r")
            self.stalled = False

    def requests(self) -> list[str]:
        """The request names the log filter recorded, in order (``Write``, ``Flush`` …)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text().splitlines():
                parts = line.split()
                # "<date> <time> connection=N Write id=3 offset=..." (not the "...Write" replies)
                if len(parts) > 3 and parts[2].startswith("connection=") and parts[3].isalpha():
                    out.append(parts[3])
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.unstall()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
