"""A `vdev` daemon as its own process, the way an operator runs it, for tests.

Tests of the command line, the control socket, metrics and restarts need
the real daemon: ``python -m vdev <device> …`` in a subprocess, with its
sockets created before the test talks to it, its output kept for the
failure message, and a stop that is a SIGTERM (what systemd and operators
send) with a SIGKILL only after a bound.  `DaemonProcess` is that, once::

    with DaemonProcess("blk", "--socket", sock, "--backend", "mem:64M",
                       wait_for=[sock]) as d:
        vm = await VirtioFrontend.start(sock)
        ...
    # left the block: SIGTERM sent, exit status 0 checked

`stop_process` is the stop alone, for a `subprocess.Popen` a test made itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import IO, Self

__all__ = ["DaemonProcess", "DaemonStartError", "stop_process"]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Stop a daemon a test started as an operator would: SIGTERM, then SIGKILL
    after ``timeout`` seconds; its exit status (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class DaemonStartError(RuntimeError):
    """The daemon exited, or was not ready in time, before it served; its output is ``log``."""

    def __init__(self, message: str, status: int | None, log: str) -> None:
        super().__init__(f"{message}:\n{log}")
        self.status = status     # the exit status, or None when it was stopped for being slow
        self.log = log


class DaemonProcess:
    """``python -m vdev <device> <args…>`` as a subprocess.

    `start` launches it and waits until every path in ``wait_for`` exists (the
    sockets it creates once it serves: remove stale ones first) and, when
    ``wait_log`` is given, until its output matches that regular expression
    (the match is kept in `match`, e.g. for a port it chose).  A daemon that
    exits first, or is not ready within ``timeout`` seconds, is stopped and
    `DaemonStartError` raised with its output.

    Its stdout and stderr go to the file ``log`` (emptied at the first start,
    appended to when the same object is started again after a stop) or, when
    None, to an anonymous temporary file; `log()` returns them so far.  ``env``
    is added to this process's environment; ``cwd`` and ``preexec_fn`` go to
    `subprocess.Popen` (stdin is /dev/null).

    `stop` ends it with `stop_process` (SIGKILL after ``stop_timeout`` s) and
    returns its exit status.  As a context manager it starts on entry, stops on
    exit, and fails the block (AssertionError with the output) when the exit
    status is not 0, unless the block is already failing.
    """

    def __init__(self, device: str, *args: str, wait_for: Iterable[str | os.PathLike[str]] = (),
                 wait_log: str | None = None, log: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
                 preexec_fn: Callable[[], None] | None = None, timeout: float = 15.0,
                 stop_timeout: float = 10.0) -> None:
        self.argv = [sys.executable, "-m", "vdev", device, *args]
        self.name = f"vdev {device}"
        self.wait_for = [os.fspath(p) for p in wait_for]
        self.wait_log = wait_log
        self.log_path = None if log is None else os.fspath(log)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.preexec_fn = preexec_fn
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.match: re.Match[str] | None = None
        self._tmp: IO[bytes] | None = None

    # -- output ----------------------------------------------------------------------------------

    def _log_file(self) -> str:
        """The path the output goes to, made (or emptied) at the first start."""
        if self.log_path is not None:
            if self.proc is None:
                open(self.log_path, "wb").close()
            return self.log_path
        if self._tmp is None:
            self._tmp = tempfile.TemporaryFile(prefix="vdev-daemon-")   # noqa: SIM115 (kept open: log())
        # A file description of its own, in append mode: the child's writes
        # never depend on where this process last read.
        return f"/proc/self/fd/{self._tmp.fileno()}"

    def log(self) -> str:
        """The daemon's output so far (stdout and stderr, interleaved as written)."""
        if self.log_path is not None:
            if not os.path.exists(self.log_path):
                return ""
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        if self._tmp is None:
            return ""
        with open(f"/proc/self/fd/{self._tmp.fileno()}", "rb") as f:
            return f.read().decode(errors="replace")

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Launch the daemon and wait until it is ready (see the class); returns self."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        path = self._log_file()
        with open(path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd,
                preexec_fn=self.preexec_fn)  # noqa: PLW1509 (the caller's; tests start no threads before it)
        self.match = None
        deadline = time.monotonic() + self.timeout
        while True:
            missing = [p for p in self.wait_for if not os.path.exists(p)]
            if not missing:
                if self.wait_log is None:
                    return self
                self.match = re.search(self.wait_log, self.log())
                if self.match is not None:
                    return self
            if self.proc.poll() is not None:
                status: int | None = self.proc.returncode
                why = f"exited with status {status} before it was ready"
            elif time.monotonic() > deadline:
                status = None
                waited = missing or [f"output matching {self.wait_log!r}"]
                why = f"was not ready within {self.timeout} s (no {', '.join(waited)})"
            else:
                time.sleep(0.02)
                continue
            self.stop()
            raise DaemonStartError(f"{self.name} {why}", status, self.log())

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after ``stop_timeout`` s; the exit status."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return stop_process(self.proc, self.stop_timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        status = self.stop()
        if exc_type is None and status != 0:
            raise AssertionError(f"{self.name} exited with status {status}:\n{self.log()}")
