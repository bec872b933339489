"""Boot a throwaway Linux guest in QEMU and run a shell script inside it.

This is how the project's integration tests exercise a back end end to end:
the test starts a vhost-user device, boots a real guest kernel whose virtio
drivers talk to it, runs a script in the guest (``fio`` against a disk,
``iperf3`` over a NIC, ``socat`` over vsock, reading ``/dev/hwrng``) and looks
at what the script printed and how it exited.

The guest is Debian's stock amd64 kernel plus a small initramfs (static
busybox, fio, socat, iperf3 with their shared libraries, and the virtio
modules).  Building it needs ``apt-get``, ``dpkg``, ``ldd`` and busybox-static
on the host; it happens once and is cached under
``${VDEV_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vdev}``.  Each run appends a
tiny second cpio archive holding ``/run.sh`` to the cached one (the kernel
unpacks concatenated archives in order), so nothing is rebuilt per test.

Guest RAM is a shared memfd, as vhost-user back ends must map it.  The
initramfs is ~90 MB (fio's libraries) and is held twice while it unpacks,
so give the guest at least 384 MB.  The accelerator defaults to TCG
(``$VDEV_ACCEL`` overrides it): guests have been seen to hang under KVM here.

Most tests want `run_in_guest` (boot, run, power off, collect).  Tests that
act on a guest while it runs — live migration, memory hot-plug — use
`GuestVM`: the same guest, started with a QMP socket driven by QEMU's own
client library (``qemu.qmp``).  `GuestVM.incoming_twin` makes the
destination of a migration (the same command line plus ``-incoming``),
`GuestVM.migrate` moves the guest there (or `start_migration`,
`set_migration` and `wait_migration` step by step), and `guest_result`
reads the script's output across both consoles (the script's later output
appears on the destination's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import lzma
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["GuestBootError", "GuestImage", "GuestResult", "GuestVM", "NewcWriter", "build_guest_image",
           "default_cache_dir", "guest_result", "run_in_guest", "run_in_guest_sync"]

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"  # from busybox-static
KERNEL_META_PACKAGE = "linux-image-amd64"
BINARIES = ("fio", "socat", "iperf3")
# Load order matters: insmod does no dependency resolution.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "virtio-rng", "virtio_blk", "failover", "net_failover", "virtio_net", "vsock",
           "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
RECIPE_VERSION = 1  # bump when the build changes in a way the hash inputs below do not see
BEGIN_MARKER = "@@vdev-guest-begin-5d1c9e@@"
END_MARKER = "@@vdev-guest-end-5d1c9e@@"
_END_RE = re.compile(rb"\r?\n" + re.escape(END_MARKER.encode()) + rb" (\d+)\r?\n")

INIT_TEMPLATE = """#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in {modules}; do
    insmod /lib/modules/vdev/$m.ko || echo "vdev-guest: insmod $m failed"
done
echo {begin}
sh /run.sh </dev/null 2>&1
rc=$?
# The leading newline ends a last line the script left open; the host strips it again.
printf '\\n{end} %d\\n' "$rc"
poweroff -f
"""


class GuestBootError(Exception):
    """The guest did not finish the script: timeout, kernel panic, or QEMU failed.

    ``console_tail`` holds the last serial lines, ``returncode`` QEMU's exit code
    (after we stopped it, on a timeout) and ``stderr`` what QEMU printed there.
    """

    def __init__(self, reason: str, *, console: str, returncode: int | None, stderr: str) -> None:
        self.reason = reason
        self.console_tail = "\n".join(console.splitlines()[-40:])
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{reason} (qemu exit code {returncode})\nqemu stderr: {stderr.strip()}\n"
                         f"--- last console lines ---\n{self.console_tail}")


@dataclass(frozen=True)
class GuestImage:
    """A kernel and initramfs pair from `build_guest_image`."""

    kernel: Path
    initramfs: Path
    kernel_version: str


@dataclass(frozen=True)
class GuestResult:
    """What one `run_in_guest` produced: the script's exit code and output, the whole serial log."""

    exit_status: int
    output: str
    console: str
    duration: float


class NewcWriter:
    """Writes a "newc" (SVR4, no CRC) cpio archive, the format the kernel unpacks as initramfs.

    Parent directories are created implicitly; call `close` to write the trailer.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._out = stream
        self._ino = 0
        self._offset = 0
        self._dirs: set[str] = {""}

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def _pad(self, align: int) -> None:
        self._write(b"\0" * (-self._offset % align))

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad(4)  # both the name (after the 110-byte header) and the data end 4-aligned
        self._write(data)
        self._pad(4)

    def _parents(self, path: str) -> str:
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        if parent not in self._dirs:
            self.directory(parent)
        return path

    def directory(self, path: str, mode: int = 0o755) -> None:
        path = self._parents(path)
        if path not in self._dirs:
            self._dirs.add(path)
            self._entry(path, 0o040000 | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(self._parents(path), 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(self._parents(path), 0o120777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(self._parents(path), 0o020000 | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._pad(512)  # customary block padding; also keeps an appended archive aligned


def default_cache_dir() -> Path:
    """``$VDEV_CACHE_DIR``, else ``$XDG_CACHE_HOME/vdev``, else ``~/.cache/vdev``."""
    if env := os.environ.get("VDEV_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vdev"


def _run(*cmd: str, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # unlike CalledProcessError, say what the tool said
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _apt(*cmd: str, cwd: Path | None = None) -> str:
    # apt-cache/apt-get download only work with package lists; fetch them once if that is the problem.
    try:
        return _run(*cmd, cwd=cwd)
    except RuntimeError:
        _run("apt-get", "update")
        return _run(*cmd, cwd=cwd)


def _kernel_package() -> tuple[str, str]:
    """The concrete ``linux-image-<kver>`` package behind the meta package, and its version."""
    # One apt-cache call (~0.5 s): this runs on every build_guest_image(), cached or not.
    info = _apt("apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE)
    dep = re.search(r"^Depends:.*?\b(linux-image-[^\s,]+)(?: \(= ([^)]+)\))?", info, re.MULTILINE)
    if dep is None:
        raise RuntimeError(f"cannot resolve the kernel package behind {KERNEL_META_PACKAGE}")
    meta_version = re.search(r"^Version: (\S+)", info, re.MULTILINE)
    return dep.group(1), dep.group(2) or (meta_version.group(1) if meta_version else "unknown")


def _recipe_hash(package_version: str) -> str:
    h = hashlib.sha256(repr((RECIPE_VERSION, package_version, MODULES, INIT_TEMPLATE)).encode())
    # A changed host binary (apt upgrade of fio, ...) changes the image, so it is part of the recipe.
    for path in (BUSYBOX, *map(_host_binary, BINARIES)):
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _host_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed on the host; the guest image copies it")
    return path


def _shared_libraries(path: str) -> list[str]:
    """Every library `path` loads, and its ELF interpreter, as ldd resolves them on this host."""
    done = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
    # "libx.so.1 => /lib/.../libx.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)";
    # a static binary makes ldd fail with "not a dynamic executable".
    return re.findall(r"(?:=> |^\s*)(/\S+) \(0x", done.stdout, re.MULTILINE) if done.returncode == 0 else []


def _module_blob(path: Path) -> bytes:
    # Busybox insmod cannot decompress, so compressed modules are stored decompressed.
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return path.read_bytes()


def _modules_in_load_order(moddir: Path) -> list[tuple[str, bytes]]:
    """The wanted modules that exist as .ko files, each preceded by its dependencies.

    A module missing here is built into the kernel and needs no loading.
    """
    files = {}
    for p in moddir.rglob("*.ko*"):
        files[p.name.split(".ko")[0].replace("-", "_")] = p
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key not in files:
            return
        seen.add(key)
        blob = _module_blob(files[key])
        # The .modinfo section is NUL-separated key=value strings; no need for modinfo(8).
        deps = re.search(rb"(?<![^\0])depends=([^\0]*)\0", blob)
        for dep in (deps.group(1).decode().split(",") if deps else []):
            if dep:
                add(dep)
        order.append((name, blob))

    for name in MODULES:
        add(name)
    return order


def _write_initramfs(out: Path, root: Path, kver: str) -> None:
    with open(out, "wb") as f:
        w = NewcWriter(f)
        for d in ("dev", "proc", "sys", "tmp", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
            w.directory(d)
        # The kernel opens /dev/console for init before any devtmpfs is mounted.
        w.char_device("dev/console", 5, 1)
        w.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for applet in _run(BUSYBOX, "--list-full").split():
            if applet != "bin/busybox":
                w.symlink(applet, "/bin/busybox")
        libs = set(_shared_libraries(BUSYBOX))  # none for busybox-static; copes with a dynamic one
        for name in BINARIES:
            path = _host_binary(name)
            w.file("usr/bin/" + name, Path(path).read_bytes(), 0o755)
            libs.update(_shared_libraries(path))
        for lib in sorted(libs):
            w.file(lib, Path(lib).read_bytes(), 0o755)  # read_bytes follows the soname symlink
        modules = _modules_in_load_order(root / "lib/modules" / kver / "kernel")
        for name, blob in modules:
            w.file(f"lib/modules/vdev/{name}.ko", blob)
        init = INIT_TEMPLATE.format(modules=" ".join(n for n, _ in modules), begin=BEGIN_MARKER, end=END_MARKER)
        w.file("init", init.encode(), 0o755)
        w.close()


def build_guest_image(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached guest image, building it first if this recipe has not been built yet."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    package, package_version = _kernel_package()
    kver = package.removeprefix("linux-image-")
    final = cache_dir / f"guest-{kver}-{_recipe_hash(package_version)}"
    image = GuestImage(final / "vmlinuz", final / "initramfs.cpio", kver)
    if image.kernel.exists() and image.initramfs.exists():
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder may have finished meanwhile
        if final.exists():
            return image
        for stale in cache_dir.glob(".build-*"):  # left by a killed build; nobody else builds now
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
            work = Path(tmp)
            _apt("apt-get", "download", package, cwd=work)
            debs = list(work.glob("*.deb"))
            _run("dpkg", "-x", str(debs[0]), str(work / "root"))
            out = work / "out"
            out.mkdir()
            shutil.copyfile(work / "root/boot" / f"vmlinuz-{kver}", out / "vmlinuz")
            _write_initramfs(out / "initramfs.cpio", work / "root", kver)
            # Built beside the final place and renamed, so a killed build never leaves a half cache.
            out.rename(final)
        log.info("built guest image %s in %.1fs", final, time.monotonic() - started)
    return image


def _die_with_parent_hook() -> Any:
    """A preexec hook making the kernel SIGKILL QEMU if the test process dies (PR_SET_PDEATHSIG)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    try:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 5)
    except (ProcessLookupError, TimeoutError):
        pass
    finally:
        # Also reached when cancelled while waiting above: never leave QEMU running.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _write_initrd(initrd: Path, base: Path, script: str, files: Mapping[str, bytes]) -> None:
    shutil.copyfile(base, initrd)
    with open(initrd, "ab") as f:  # the kernel unpacks the appended archive over the cached one
        w = NewcWriter(f)
        for path, data in files.items():
            w.file(path, data, 0o755)
        w.file("run.sh", script.encode(), 0o755)
        w.close()


def _qemu_command(image: GuestImage, initrd: Path, *, memory_mb: int, smp: int, accel: str,
                  qemu_args: Sequence[str], memory_slots: int = 0, max_memory_mb: int = 0,
                  kernel_args: Sequence[str] = ()) -> list[str]:
    # Room for pc-dimms (memory hot-plug) when asked: "-m SIZE,slots=N,maxmem=MAX".
    memory = f"{memory_mb}M,slots={memory_slots},maxmem={max_memory_mb}M" if memory_slots else str(memory_mb)
    return [QEMU, "-accel", accel, "-machine", "q35", "-m", memory, "-smp", str(smp),
            # vhost-user back ends mmap guest RAM, so it must be a shared, fd-backed region.
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on", "-numa", "node,memdev=mem",
            "-kernel", str(image.kernel), "-initrd", str(initrd),
            "-append", " ".join(("console=ttyS0 quiet loglevel=3 panic=-1", *kernel_args)),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            *qemu_args]


async def run_in_guest(image: GuestImage, script: str, *, qemu_args: Sequence[str] = (), memory_mb: int = 512,
                       timeout: float = 300, accel: str | None = None, files: Mapping[str, bytes] | None = None,
                       smp: int = 1, on_console: Callable[[bytes], None] | None = None) -> GuestResult:
    """Boot `image`, run `script` with ``sh`` as root inside it and power off.

    ``qemu_args`` are appended to the QEMU command line (devices, chardevs);
    ``files`` maps guest paths to contents (made executable) placed before the
    script runs; ``accel`` defaults to ``$VDEV_ACCEL`` or ``tcg``;
    ``on_console`` is called with each chunk of console output as it arrives
    (a host that follows the guest while it runs).  A non-zero exit status is
    returned, not raised; `GuestBootError` means the script never finished
    (timeout, panic, QEMU failure).
    """
    accel = accel or os.environ.get("VDEV_ACCEL", "tcg")
    tmp = Path(tempfile.mkdtemp(prefix="vdev-guest-"))
    proc: asyncio.subprocess.Process | None = None
    stderr_task: asyncio.Future[bytes] | None = None
    console = bytearray()
    try:
        initrd = tmp / "initrd"
        # ~100 MB of copying: off the event loop, which may be serving the device under test.
        await asyncio.to_thread(_write_initrd, initrd, image.initramfs, script, files or {})
        cmd = _qemu_command(image, initrd, memory_mb=memory_mb, smp=smp, accel=accel, qemu_args=qemu_args)
        log.debug("starting guest: %s", " ".join(cmd))
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, preexec_fn=_die_with_parent_hook())
        assert proc.stdout is not None and proc.stderr is not None
        stdout = proc.stdout
        stderr_task = asyncio.ensure_future(proc.stderr.read())

        async def read_console(until_end_marker: bool) -> re.Match[bytes] | None:
            scanned = 0  # rescan only the tail, so a chatty script does not cost quadratic time
            while not (until_end_marker and (found := _END_RE.search(console, max(0, scanned - 64)))):
                scanned = len(console)
                chunk = await stdout.read(65536)
                if not chunk:
                    return None  # QEMU exited
                if not console:  # guest output means QEMU holds the initrd in memory: drop our copy
                    shutil.rmtree(tmp, ignore_errors=True)  # now, in case we get SIGKILLed later
                console.extend(chunk)
                if on_console is not None:
                    on_console(chunk)
            return found

        reason = "guest stopped before the script finished"
        try:
            match = await asyncio.wait_for(read_console(True), timeout)
        except TimeoutError:
            match, reason = None, f"guest did not finish within {timeout:g}s"
        duration = time.monotonic() - started
        if match is None:
            await _stop(proc)
            stderr = (await stderr_task).decode(errors="replace")
            raise GuestBootError(reason, console=_text(console), returncode=proc.returncode, stderr=stderr)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read_console(False), 10)  # powering off; collect the rest until EOF
        begin = re.search(re.escape(BEGIN_MARKER.encode()) + rb"\r?\n", console)
        output = _text(console[begin.end():match.start()]) if begin else ""
        return GuestResult(int(match.group(1)), output, _text(console), duration)
    finally:
        if proc is not None:
            await _stop(proc)
        if stderr_task is not None:
            stderr_task.cancel()
        shutil.rmtree(tmp, ignore_errors=True)


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode(errors="replace").replace("\r\n", "\n")


def run_in_guest_sync(image: GuestImage, script: str, **kwargs: Any) -> GuestResult:
    """`run_in_guest` for synchronous callers; takes the same keyword arguments."""
    return asyncio.run(run_in_guest(image, script, **kwargs))


def guest_result(*consoles: bytes | bytearray, duration: float = 0.0) -> GuestResult | None:
    """The script's result from the serial output of one or more QEMUs, in order.

    A migrated guest begins its script on the source's console and ends it
    on the destination's: pass both.  None if the end marker is not there.
    """
    console = b"".join(bytes(c) for c in consoles)
    match = _END_RE.search(console)
    if match is None:
        return None
    begin = re.search(re.escape(BEGIN_MARKER.encode()) + rb"\r?\n", console)
    output = _text(console[begin.end():match.start()]) if begin else ""
    return GuestResult(int(match.group(1)), output, _text(console), duration)


class GuestVM:
    """One running guest with a QMP monitor, for tests that act on it while it runs.

    >>> vm = GuestVM(image, script, qemu_args=[...], workdir=tmp)      # doctest: +SKIP
    >>> await vm.start()                                               # doctest: +SKIP
    >>> await vm.execute("query-status")                               # doctest: +SKIP
    >>> result = await vm.wait_result(timeout=300)                     # doctest: +SKIP
    >>> await vm.close()                                               # doctest: +SKIP

    ``workdir`` holds the initrd and the QMP socket (keep its path short:
    Unix socket paths are limited to 108 bytes).  ``console`` accumulates
    the serial output.  ``memory_slots``/``max_memory_mb`` leave room for
    ``pc-dimm`` hot-plug; ``kernel_args`` are added to the guest kernel's
    command line.  Nothing here replaces `run_in_guest`, which tests
    that only need a script's output keep using.
    """

    def __init__(self, image: GuestImage, script: str = "", *, workdir: Path, name: str = "vm",
                 qemu_args: Sequence[str] = (), memory_mb: int = 512, smp: int = 1,
                 accel: str | None = None, files: Mapping[str, bytes] | None = None,
                 memory_slots: int = 0, max_memory_mb: int = 0, incoming: str | None = None,
                 initrd: Path | None = None, kernel_args: Sequence[str] = ()) -> None:
        self.image = image
        self.script = script
        self.workdir = Path(workdir)
        self.name = name
        self.qemu_args = list(qemu_args)
        self.memory_mb = memory_mb
        self.smp = smp
        self.accel = accel or os.environ.get("VDEV_ACCEL", "tcg")
        self.files = dict(files or {})
        self.memory_slots = memory_slots
        self.max_memory_mb = max_memory_mb
        self.incoming = incoming
        self.kernel_args = list(kernel_args)
        self.initrd = initrd if initrd is not None else self.workdir / f"{name}.initrd"
        self._own_initrd = initrd is None
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.console = bytearray()
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: Any = None
        self._pump: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[bytes] | None = None
        self._output = asyncio.Event()
        self.started = 0.0

    def command(self) -> list[str]:
        extra = ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.incoming is not None:
            extra += ["-incoming", self.incoming]
        return _qemu_command(self.image, self.initrd, memory_mb=self.memory_mb, smp=self.smp,
                             accel=self.accel, qemu_args=[*self.qemu_args, *extra],
                             memory_slots=self.memory_slots, max_memory_mb=self.max_memory_mb,
                             kernel_args=self.kernel_args)

    async def start(self, timeout: float = 30) -> None:
        """Start QEMU and connect to its QMP socket."""
        from qemu.qmp import QMPClient

        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._own_initrd:
            await asyncio.to_thread(_write_initrd, self.initrd, self.image.initramfs, self.script, self.files)
        log.debug("starting guest %s: %s", self.name, " ".join(self.command()))
        self.started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent_hook())
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._stderr = asyncio.ensure_future(self.proc.stderr.read())
        self._pump = asyncio.ensure_future(self._read_console(self.proc.stdout))
        self.qmp = QMPClient(self.name)
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise await self._boot_error(f"QEMU {self.name} exited at start")
                if self.qmp_path.exists():
                    try:
                        await self.qmp.connect(str(self.qmp_path))
                        break
                    except Exception:      # not accepting yet (qemu.qmp wraps the OSError)
                        pass
                await asyncio.sleep(0.05)

    async def _read_console(self, stdout: asyncio.StreamReader) -> None:
        while chunk := await stdout.read(65536):
            self.console.extend(chunk)
            self._output.set()

    async def _boot_error(self, reason: str) -> GuestBootError:
        stderr = b""
        if self._stderr is not None and self.proc is not None and self.proc.returncode is not None:
            stderr = await self._stderr
        return GuestBootError(reason, console=_text(self.console),
                              returncode=None if self.proc is None else self.proc.returncode,
                              stderr=stderr.decode(errors="replace"))

    async def send_console(self, text: str) -> None:
        """Type ``text`` on the serial console (a script reads it with ``read x < /dev/ttyS0``)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        await self.proc.stdin.drain()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its answer (raises qemu.qmp.ExecuteError)."""
        return await self.qmp.execute(command, arguments)

    async def wait_output(self, pattern: str | bytes, *before: GuestVM,
                          timeout: float = 300) -> re.Match[bytes]:
        """Wait until the console shows ``pattern`` (a regex); return the match.

        ``before`` are the guests this one migrated from: their consoles are
        searched first (the line may have come out before the move).
        """
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    console = b"".join(bytes(b.console) for b in before) + self.console
                    if (m := rx.search(console)) is not None:
                        return m
                    if self._pump is not None and self._pump.done():
                        raise await self._boot_error(f"QEMU {self.name} exited before printing {pattern!r}")
                    self._output.clear()
                    if before:      # their consoles may grow too: look again soon
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._output.wait(), 0.1)
                    else:
                        await self._output.wait()
        except TimeoutError:
            raise await self._boot_error(f"{pattern!r} not seen within {timeout:g}s") from None

    async def wait_result(self, *before: GuestVM, timeout: float = 300) -> GuestResult:
        """Wait for the script's end; ``before`` are the guests this one migrated from."""
        await self.wait_output(_END_RE.pattern, timeout=timeout)
        result = guest_result(*(b.console for b in before), self.console,
                              duration=time.monotonic() - (before[0] if before else self).started)
        assert result is not None
        return result

    def incoming_twin(self, name: str, *, qemu_args: Sequence[str] | None = None,
                      uri: str | None = None) -> GuestVM:
        """A destination for migrating this guest: the same machine (memory, CPUs, kernel and
        initrd) waiting on ``-incoming`` (default a Unix socket in the work directory);
        ``qemu_args`` are its device arguments (the same devices, its own back ends)."""
        return GuestVM(self.image, self.script, workdir=self.workdir, name=name,
                       qemu_args=self.qemu_args if qemu_args is None else qemu_args,
                       memory_mb=self.memory_mb, smp=self.smp, accel=self.accel, files=self.files,
                       memory_slots=self.memory_slots, max_memory_mb=self.max_memory_mb,
                       incoming=uri or f"unix:{self.workdir / (name + '.migrate')}", initrd=self.initrd,
                       kernel_args=self.kernel_args)

    async def start_migration(self, dest: GuestVM, *, max_bandwidth: int = 1 << 30,
                              downtime_ms: int = 500) -> None:
        """Set the bandwidth cap and the downtime limit, and start migrating to ``dest``
        (started with `incoming_twin`); returns at once (see `wait_migration`).

        The cap is raised from QEMU's 32 MiB/s default so a TCG guest
        converges quickly.  A small ``downtime_ms`` (1) with a guest that
        keeps dirtying memory keeps the migration iterating until
        `set_migration` raises the limit (a test acts on the guest meanwhile);
        0 does not: QEMU then never re-reads the dirty bitmap and completes
        after the first pass.
        """
        assert dest.incoming is not None
        await self.set_migration(max_bandwidth=max_bandwidth, downtime_ms=downtime_ms)
        await self.execute("migrate", {"uri": dest.incoming})

    async def set_migration(self, *, max_bandwidth: int | None = None,
                            downtime_ms: int | None = None) -> None:
        """Change the bandwidth cap (bytes/s) or the downtime limit (ms), also mid-migration."""
        params: dict[str, object] = {}
        if max_bandwidth is not None:
            params["max-bandwidth"] = max_bandwidth
        if downtime_ms is not None:
            params["downtime-limit"] = downtime_ms
        await self.execute("migrate-set-parameters", params)

    async def migration(self) -> dict[str, Any]:
        """``query-migrate``; raises RuntimeError if the migration failed or was cancelled."""
        info: dict[str, Any] = await self.execute("query-migrate")
        if info.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"migration from {self.name} {info['status']}: "
                               f"{info.get('error-desc', info)}")
        return info

    async def wait_migration(self, *, passes: int | None = None, timeout: float = 120) -> dict[str, Any]:
        """Wait until the migration completed, or (``passes``) until QEMU has
        synchronised the dirty bitmap that many times — 2 means the first
        pass over all of RAM is done, every page sent once.  Returns the
        ``query-migrate`` answer."""
        async with asyncio.timeout(timeout):
            while True:
                info = await self.migration()
                if info.get("status") == "completed":
                    return info
                if passes is not None and info.get("ram", {}).get("dirty-sync-count", 0) >= passes:
                    return info
                await asyncio.sleep(0.05)

    async def migrate(self, dest: GuestVM, *, max_bandwidth: int = 1 << 30, downtime_ms: int = 500,
                      timeout: float = 120) -> dict[str, Any]:
        """Live-migrate to ``dest`` (started with `incoming_twin`) and wait for ``completed``.

        Returns the final ``query-migrate`` answer; raises RuntimeError if the
        migration fails.
        """
        await self.start_migration(dest, max_bandwidth=max_bandwidth, downtime_ms=downtime_ms)
        return await self.wait_migration(timeout=timeout)

    async def close(self) -> None:
        """Disconnect QMP and stop QEMU (if it still runs)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        if self.proc is not None:
            await _stop(self.proc)
        for task in (self._pump, self._stderr):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._own_initrd:
            with contextlib.suppress(FileNotFoundError):
                self.initrd.unlink()
