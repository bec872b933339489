"""``--read-only`` opens the image read-only (issue "Defects found by hostile
testing", item 8).

The image lives on a tmpfs that the test mounts and remounts read-only, so
opening it for writing fails with EROFS for real (root ignores mode 0444, a
read-only mount it cannot).  The daemon runs as users run it, as its own
process; a swap under the read-only disk opens the new image read-only too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from vdev.control import control_request
from vdev.testing import Buffer, VirtioFrontend

SECTOR = 512
F_RO = 1 << 5


@pytest.fixture
def ro_mount() -> Iterator[str]:
    """A tmpfs holding two images, remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    d = tempfile.mkdtemp(prefix="vdev-ro-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], check=True)
    try:
        for name, byte in (("a.img", b"A"), ("b.img", b"B")):
            with open(os.path.join(d, name), "wb") as f:
                f.write(byte * (1 << 20))
        subprocess.run(["mount", "-o", "remount,ro", d], check=True)
        with pytest.raises(OSError) as ei:
            os.open(os.path.join(d, "a.img"), os.O_RDWR)
        assert ei.value.errno == 30      # EROFS: the mount really is read-only
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        shutil.rmtree(d, ignore_errors=True)


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


async def test_read_only_flag_opens_an_image_on_a_read_only_mount(ro_mount: str) -> None:
    sock_dir = tempfile.mkdtemp(prefix="vdev-ro-sock-")
    sock, ctl = os.path.join(sock_dir, "blk.sock"), os.path.join(sock_dir, "blk.ctl")
    proc = subprocess.Popen([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--control", ctl,
                             "--backend", f"file:{ro_mount}/a.img", "--read-only"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            vm = await VirtioFrontend.start(sock, timeout=15)
        except (OSError, TimeoutError) as exc:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
            pytest.fail(f"vdev blk --read-only did not serve: {exc!r}: {err}")
        try:
            assert vm.features & F_RO
            used = await vm.request(0, [header(0, 0), Buffer.writable(SECTOR), Buffer.writable(1)])
            assert used.written == b"A" * SECTOR + b"\0"
            used = await vm.request(0, [header(1, 0), Buffer.readable(bytes(SECTOR)), Buffer.writable(1)])
            assert used.written == b"\x01"                    # IOERR
            # a swap under the read-only disk opens the new image read-only as well
            reply = await control_request(ctl, {"command": "swap", "backend": f"file:{ro_mount}/b.img"})
            assert reply["ok"] is True, reply
            used = await vm.request(0, [header(0, 0), Buffer.writable(SECTOR), Buffer.writable(1)])
            assert used.written == b"B" * SECTOR + b"\0"
        finally:
            await vm.close()
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
