#!/usr/bin/env python3
"""virtio-vsock throughput and connection setup through `vdev vsock`, against a Unix-socket ceiling.

What is measured, each in the same run:

* **through vdev vsock, with a real guest** (the default): `vdev vsock` runs
  as its own process, as users run it; a QEMU 7.2 guest (TCG, 1 vCPU,
  Debian's kernel, the test image) runs socat.  host→guest: this script
  connects to ``--uds-path`` (``CONNECT 5000``), writes the bytes, shuts its
  writing half and waits until the guest's socat (``VSOCK-LISTEN`` to
  /dev/null) has read them all and closed.  guest→host: the guest's socat
  sends a tmpfs file (``VSOCK-CONNECT:2:5001``) to this script's listener on
  ``<uds-path>_5001``, timed from accept to end of stream.  Connection setup:
  ``CONNECT 5002`` → ``OK`` → close, one after another, against a static
  helper in the guest that accepts and closes (benchmarks/vsock_accept.c; a
  socat ``fork`` would time the guest's process creation instead).
* **through vdev vsock, in-process driver** (``--mode inprocess``/``both``):
  the same three measurements with the guest side played by
  `backends.vsock.testing.VsockGuest` on the rings, in this process — no
  TCG, but the device, the guest stack and the host program share one CPU.
* **the ceiling**: the same bytes through a plain Unix socket, no VM, no
  vdev, with the same host-side code: this script writes to (or reads from)
  a socat on the other end (``UNIX-LISTEN`` to /dev/null, ``FILE`` to
  ``UNIX-CONNECT``), and connection setup against a Unix listener in another
  process that writes ``OK`` and closes.

The figure to read is vdev/ceiling, measured in the same run.

    .venv/bin/python benchmarks/vsock_throughput.py [--mib 64] [--connects 300] [--mode guest|inprocess|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this directory is sys.path[0], and its backends.py (the blk
# benchmarks' helpers) would hide the `backends` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from backends.vsock.device import VsockDevice  # noqa: E402
from backends.vsock.packet import Shutdown  # noqa: E402
from backends.vsock.testing import vsock_pair  # noqa: E402
from vdev import __version__ as VDEV_VERSION  # noqa: E402
from vdev.testing.guest import build_guest_image, run_in_guest  # noqa: E402

MiB = 1 << 20
CHUNK = 256 * 1024
CID = 3

ACCEPT_SERVER = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"OK 1\\n"); c.close()
"""


@dataclass
class Row:
    vdev: float
    ceiling: float


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


# -- host-side pieces, shared by every measurement ----------------------------------------------

async def send_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: int) -> float:
    """Write ``total`` bytes, shut the writing half, wait for the peer to close; seconds."""
    block = bytes(CHUNK)
    started = time.perf_counter()
    left = total
    while left:
        writer.write(block[:min(left, CHUNK)])
        left -= min(left, CHUNK)
        await writer.drain()
    writer.write_eof()
    await reader.read()
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def receive_bytes(path: str, total: int, start_peer) -> float:  # type: ignore[no-untyped-def]
    """Listen on ``path``, run ``start_peer()``, read ``total`` bytes from the one connection; seconds."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.perf_counter()
        n = 0
        while chunk := await reader.read(CHUNK):
            n += len(chunk)
        elapsed = time.perf_counter() - started
        writer.close()
        if n != total and not done.done():
            done.set_exception(RuntimeError(f"received {n} bytes, expected {total}"))
        elif not done.done():
            done.set_result(elapsed)

    server = await asyncio.start_unix_server(handler, path, limit=4 * MiB)
    try:
        peer = await start_peer()
        elapsed = await asyncio.wait_for(done, 600)
        if peer is not None:
            await peer
        return elapsed
    finally:
        server.close()


async def connects(path: str, count: int, line: bytes | None) -> float:
    """``count`` connections one after another (``line`` sent first if given, reply awaited); per second."""
    started = time.perf_counter()
    for _ in range(count):
        reader, writer = await asyncio.open_unix_connection(path)
        if line is not None:
            writer.write(line)
        reply = await reader.readline()
        if not reply.startswith(b"OK"):
            raise RuntimeError(f"connection refused: {reply!r}")
        writer.close()
    return count / (time.perf_counter() - started)


async def connect_when_listening(uds: str, port: int, timeout: float = 180) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(timeout):
        while True:
            reader, writer = await asyncio.open_unix_connection(uds, limit=4 * MiB)
            writer.write(b"CONNECT %d\n" % port)
            if (await reader.readline()).startswith(b"OK "):
                return reader, writer
            writer.close()
            await asyncio.sleep(0.2)


# -- the ceiling ------------------------------------------------------------------------------------

async def ceiling(tmp: Path, total: int, count: int) -> tuple[float, float, float]:
    sink = tmp / "sink.sock"
    data = Path("/dev/shm") / f"vsock-bench-{os.getpid()}"
    data.write_bytes(bytes(total))
    try:
        proc = await asyncio.create_subprocess_exec("socat", "-u", f"UNIX-LISTEN:{sink}", "OPEN:/dev/null")
        while not sink.exists():
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_unix_connection(str(sink))
        down = mib_s(total, await send_bytes(reader, writer, total))
        await proc.wait()

        async def start_socat():  # type: ignore[no-untyped-def]
            p = await asyncio.create_subprocess_exec("socat", "-u", f"FILE:{data}", f"UNIX-CONNECT:{tmp / 'up.sock'}")
            return p.wait()

        up = mib_s(total, await receive_bytes(str(tmp / "up.sock"), total, start_socat))
    finally:
        data.unlink()
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", ACCEPT_SERVER, str(tmp / "acc.sock"),
                                                  stdout=subprocess.PIPE)
    assert server.stdout is not None
    await server.stdout.readline()
    try:
        rate = await connects(str(tmp / "acc.sock"), count, None)
    finally:
        server.kill()
        await server.wait()
    return down, up, rate


# -- through vdev vsock with a QEMU guest ----------------------------------------------------------------

GUEST_SCRIPT = """
head -c {total} /dev/zero > /tmp/up
socat -u VSOCK-LISTEN:5000 OPEN:/dev/null &
wait
socat -u FILE:/tmp/up VSOCK-CONNECT:2:5001 || echo upload-failed
vsock-accept 5002 {count}
"""


def build_helper(tmp: Path) -> bytes:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("vsock_throughput: a C compiler is needed for the guest helper (apt-get install gcc)")
    out = tmp / "vsock-accept"
    subprocess.run([cc, "-static", "-Os", "-o", str(out), str(ROOT / "benchmarks" / "vsock_accept.c")], check=True)
    return out.read_bytes()


async def with_guest(tmp: Path, total: int, count: int) -> tuple[float, float, float]:
    image = build_guest_image()
    sock, uds = tmp / "vhost.sock", tmp / "vm.vsock"
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vdev", "vsock", "--socket", str(sock), "--guest-cid", "7", "--uds-path", str(uds),
        "--log-level", "warning", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        while not sock.exists():
            if daemon.returncode is not None:
                raise SystemExit("vdev vsock exited before listening")
            await asyncio.sleep(0.02)
        results: dict[str, float] = {}
        upload_done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            started = time.perf_counter()
            n = 0
            while chunk := await reader.read(CHUNK):
                n += len(chunk)
            elapsed = time.perf_counter() - started
            writer.close()
            if n != total:
                upload_done.set_exception(RuntimeError(f"guest sent {n} bytes, expected {total}"))
            else:
                upload_done.set_result(elapsed)

        server = await asyncio.start_unix_server(upload, f"{uds}_5001", limit=4 * MiB)

        async def host_side() -> None:
            reader, writer = await connect_when_listening(str(uds), 5000)
            results["down"] = mib_s(total, await send_bytes(reader, writer, total))
            results["up"] = mib_s(total, await asyncio.wait_for(upload_done, 600))
            # The accept helper starts after the upload; wait for its first OK.
            _r, w = await connect_when_listening(str(uds), 5002)
            w.close()
            results["connects"] = await connects(str(uds), count - 1, b"CONNECT 5002\n")

        host = asyncio.create_task(host_side())
        result = await run_in_guest(image, GUEST_SCRIPT.format(total=total, count=count), timeout=1200,
                                    files={"/usr/bin/vsock-accept": build_helper(tmp)},
                                    qemu_args=["-chardev", f"socket,id=vs0,path={sock}",
                                               "-device", "vhost-user-vsock-pci,chardev=vs0"])
        await asyncio.wait_for(host, 30)
        server.close()
        if result.exit_status != 0 or f"accepted={count}" not in result.output:
            raise SystemExit(f"guest side failed:\n{result.output}")
        return results["down"], results["up"], results["connects"]
    finally:
        daemon.terminate()
        out, _ = await daemon.communicate()
        if out.strip():
            print(f"vdev vsock said:\n{out.decode(errors='replace')}", file=sys.stderr)


# -- through vdev vsock with the in-process guest stack ------------------------------------------------------

async def in_process(tmp: Path, total: int, count: int) -> tuple[float, float, float]:
    uds = str(tmp / "ip.vsock")
    device = VsockDevice(CID, uds)
    async with vsock_pair(device) as guest:
        accepted = guest.listen(5000)
        reader, writer = await connect_when_listening(uds, 5000)
        stream = await accepted.get()

        async def drain() -> None:
            while await stream.recv(1 << 20):
                pass
            await stream.close()

        sink = asyncio.create_task(drain())
        down = mib_s(total, await send_bytes(reader, writer, total))
        await sink

        async def start_guest():  # type: ignore[no-untyped-def]
            s = await guest.connect(5001)

            async def run() -> None:
                await s.send(bytes(total))
                s.shutdown(Shutdown.SEND)
            return asyncio.create_task(run())

        up = mib_s(total, await receive_bytes(f"{uds}_5001", total, start_guest))
        acc = guest.listen(5002)

        async def closer() -> None:
            while True:
                s = await acc.get()
                s.rst()

        closing = asyncio.create_task(closer())
        try:
            rate = await connects(uds, count, b"CONNECT 5002\n")
        finally:
            closing.cancel()
    return down, up, rate


# -- main ------------------------------------------------------------------------------------------------------

def table(title: str, vdev: tuple[float, float, float], ceil: tuple[float, float, float]) -> None:
    print(title)
    print(f"  {'':22} {'vdev vsock':>12} {'unix ceiling':>14} {'vdev/ceiling':>13}")
    for name, v, c in zip(("host->guest MiB/s", "guest->host MiB/s", "connects/s"), vdev, ceil):
        print(f"  {name:22} {v:12.1f} {c:14.1f} {v / c:13.3f}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="MiB each way (default 64)")
    p.add_argument("--connects", type=int, default=300, help="connections for the setup rate (default 300)")
    p.add_argument("--mode", choices=["guest", "inprocess", "both"], default="both")
    args = p.parse_args()
    total = args.mib * MiB
    with tempfile.TemporaryDirectory(prefix="vsb-", dir="/tmp") as d:
        tmp = Path(d)
        print(f"vdev {VDEV_VERSION} vsock: {args.mib} MiB each way, {args.connects} connections; "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.release()}")
        ceil = await ceiling(tmp, total, args.connects)
        if args.mode in ("guest", "both"):
            guest = await with_guest(tmp, total, args.connects)
            table("through vdev vsock to a QEMU 7.2 TCG guest (socat; 1 vCPU) — vs the same bytes over a "
                  "host Unix socket", guest, ceil)
        if args.mode in ("inprocess", "both"):
            inproc = await in_process(tmp, total, args.connects)
            table("through vdev vsock to the in-process guest stack (same process, no VM) — vs the same "
                  "ceiling", inproc, ceil)


if __name__ == "__main__":
    asyncio.run(main())
