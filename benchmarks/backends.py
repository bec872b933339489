"""Back ends for the benchmarks: `vdev blk` and qemu-storage-daemon as pinned subprocesses.

Shared by ``compare_blk.py`` and ``isolation_blk.py``.  Each back end runs as
its own process, started with ``taskset`` on the CPU given, on its own
socket; `Daemon.stop()` ends only the process it started (SIGTERM, then
SIGKILL).  The load comes from the C driver of `vdev bench blk`
(`vdev.bench.driver.BlkSession`), pinned by the caller to another CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

PYTHON = sys.executable
STARTUP_TIMEOUT = 15.0

#: vdev variants: name -> (extra `vdev blk` arguments, the flags that must exist).
VDEV_VARIANTS: dict[str, tuple[list[str], list[str]]] = {
    "native": ([], []),
    "native+poll": (["--poll-us", "50"], ["--poll-us"]),
    "python": (["--dataplane", "python"], ["--dataplane"]),
}


def vdev_blk_help() -> str:
    out = subprocess.run([PYTHON, "-m", "vdev", "blk", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    return out.stdout


def available_variants(names: list[str]) -> tuple[list[str], list[str]]:
    """The variants whose flags `vdev blk --help` knows, and a note for each skipped one."""
    text = vdev_blk_help()
    ok, notes = [], []
    for name in names:
        _args, flags = VDEV_VARIANTS[name]
        missing = [f for f in flags if f not in text]
        if missing:
            notes.append(f"note: skipping vdev variant {name!r}: `vdev blk` has no {', '.join(missing)} yet")
        else:
            ok.append(name)
    if "native" in ok and "--dataplane" not in text:
        notes.append("note: `vdev blk` has no --dataplane flag yet, so variant 'native' (default flags) "
                     "is the pure-Python data path")
    return ok, notes


@dataclass
class Daemon:
    name: str
    argv: list[str]
    socket: str
    log: str
    cpu: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        argv = list(self.argv)
        if self.cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(self.cpu), *argv]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not create {self.socket}: {self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(x.rstrip() for x in f.readlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


def vdev_daemon(name: str, backend: str, workdir: str, *, queues: int = 1, extra: list[str] | None = None,
                cpu: int | None = None) -> Daemon:
    tag = name.replace("+", "-")
    sock = os.path.join(workdir, f"{tag}.sock")
    argv = [PYTHON, "-m", "vdev", "blk", "--socket", sock, "--backend", backend, "--queues", str(queues),
            "--log-level", "warning", *(extra or [])]
    return Daemon(name, argv, sock, os.path.join(workdir, f"{tag}.log"), cpu)


def qsd_daemon(blockdev: str, workdir: str, *, queues: int = 1, cpu: int | None = None,
               name: str = "qsd") -> Daemon:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon not found on PATH (Debian 12: package qemu-system-common)")
    sock = os.path.join(workdir, f"{name}.sock")
    argv = [qsd, "--blockdev", f"{blockdev},node-name=n0",
            "--export", (f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={sock},"
                        f"writable=on,num-queues={queues}")]
    return Daemon(name, argv, sock, os.path.join(workdir, f"{name}.log"), cpu)


def pin_cpus(driver: int | None, backend: int | None) -> tuple[set[int] | None, int | None, str]:
    """Pin this process (the driver threads, created later, inherit it) to every allowed
    CPU but the back ends' one, or to ``driver``; returns (driver CPUs, back-end CPU,
    note).  Without two CPUs nothing is pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, "note: fewer than 2 CPUs: nothing pinned"
    b = cpus[-1] if backend is None else backend
    d = {c for c in cpus if c != b} if driver is None else {driver}
    os.sched_setaffinity(0, d)
    return d, b, f"driver pinned to CPU {','.join(map(str, sorted(d)))}, back ends to CPU {b}"
