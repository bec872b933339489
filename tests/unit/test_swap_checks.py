"""`vdev ctl … swap` refuses storage that cannot stand in for the running disk.

Two checks of issue 10, through the real control socket and a front-end
reading the device's config space as a guest would:

* storage smaller than the disk is refused unless ``force=true`` (it used to
  be taken: a 10-byte file made the guest's disk one of 0 sectors);
* under a writable disk, a path that does not open read-write (here a file
  on a read-only bind mount) is refused with the reason.

After a refusal nothing has changed: same storage, same capacity, no
config-change message, I/O not paused, writes still land.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backends.blk import control_handlers
from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage, open_storage
from vdev.control import ControlServer, control_request
from vdev.testing import Buffer, VirtioFrontend, device_pair

SECTOR = 512
DISK = 1 << 20
T_IN, T_OUT = 0, 1


@pytest.fixture(params=["python", "auto"])
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vdev-swap-"))
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            os.rmdir(p)
        else:
            p.unlink()
    os.rmdir(d)


async def capacity(vm: VirtioFrontend) -> int:
    raw = await vm.fe.get_config(0, 8)
    return int(struct.unpack("<Q", raw)[0])


async def write_sector(vm: VirtioFrontend, sector: int, fill: int) -> int:
    used = await vm.request(0, [Buffer.readable(struct.pack("<IIQ", T_OUT, 0, sector)),
                                Buffer.readable(bytes([fill]) * SECTOR), Buffer.writable(1)])
    return used.written[-1]


async def no_config_change(vm: VirtioFrontend) -> None:
    await asyncio.sleep(0.05)
    assert vm.fe.backend_requests.empty()


class Ctl:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    async def __call__(self, command: str, **params: object) -> dict[str, object]:
        return await control_request(self.path, {"command": command, **params})


@contextlib.asynccontextmanager
async def serve_with_control(device: BlkDevice, where: Path) -> AsyncIterator[tuple[VirtioFrontend, Ctl]]:
    server = ControlServer(str(where / "ctl.sock"), control_handlers(device))
    await server.start()
    try:
        async with device_pair(device) as vm:
            yield vm, Ctl(where / "ctl.sock")
    finally:
        await server.close()


async def test_swap_to_smaller_storage_needs_force(short_dir: Path, dataplane: str) -> None:
    image = short_dir / "disk.img"
    image.write_bytes(bytes(DISK))
    tiny = short_dir / "tiny.img"
    tiny.write_bytes(b"0123456789")          # the 10-byte file
    half = short_dir / "half.img"
    half.write_bytes(bytes(DISK // 2))
    device = BlkDevice(await open_storage(f"file:{image}"), dataplane=dataplane)
    async with serve_with_control(device, short_dir) as (vm, ctl):
        assert await capacity(vm) == DISK // SECTOR
        for target in (tiny, half):
            reply = await ctl("swap", backend=f"file:{target}")
            assert reply["ok"] is False, reply
            error = str(reply["error"])
            assert str(target) in error and "force=true" in error, error
            assert f"{target.stat().st_size // SECTOR} sectors" in error, error
        # nothing changed: the guest's disk, its storage, its I/O
        assert await capacity(vm) == DISK // SECTOR
        await no_config_change(vm)
        info = await ctl("info")
        assert info["backend"] == f"file:{image}" and info["sectors"] == DISK // SECTOR, info
        assert info["paused"] is False, info
        assert await write_sector(vm, DISK // SECTOR - 1, 7) == 0
        assert image.read_bytes()[-SECTOR:] == bytes([7]) * SECTOR
        # a force that is not a boolean is named
        reply = await ctl("swap", backend=f"file:{half}", force="maybe")
        assert reply["ok"] is False and "'maybe'" in str(reply["error"]), reply
        # with force, the disk shrinks and the guest hears of it
        reply = await ctl("swap", backend=f"file:{half}", force="true")
        assert reply["ok"] is True and reply["sectors"] == DISK // 2 // SECTOR, reply
        msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
        assert msg.request.name == "CONFIG_CHANGE_MSG"
        assert await capacity(vm) == DISK // 2 // SECTOR
        # growing needs no force
        reply = await ctl("swap", backend=f"file:{image}")
        assert reply["ok"] is True and reply["sectors"] == DISK // SECTOR, reply


async def test_swap_to_equal_or_larger_storage_needs_no_force(dataplane: str) -> None:
    device = BlkDevice(MemoryStorage(DISK, url="mem:a"), dataplane=dataplane)
    async with device_pair(device) as vm:
        for url, size in (("mem:b", DISK), ("mem:c", DISK + SECTOR)):
            old = await device.swap_storage(MemoryStorage(size, url=url))
            await old.aclose()
            assert await capacity(vm) == size // SECTOR
        with pytest.raises(ValueError, match=r"mem:d.*force=true"):
            await device.swap_storage(MemoryStorage(DISK, url="mem:d"))      # one sector short
        assert not device.paused and device.storage.url == "mem:c"
        assert await capacity(vm) == DISK // SECTOR + 1
        old = await device.swap_storage(MemoryStorage(DISK, url="mem:d"), force=True)
        await old.aclose()
        assert await capacity(vm) == DISK // SECTOR


@pytest.fixture
def read_only_dir(short_dir: Path) -> Iterator[Path]:
    """A directory holding a 1 MiB image, bind-mounted read-only at ``short_dir/ro``."""
    src, ro = short_dir / "src", short_dir / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "ro.img").write_bytes(bytes(DISK))
    done = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount (needs root): {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


async def test_swap_to_a_path_that_does_not_open_read_write_is_refused_with_the_reason(
        short_dir: Path, read_only_dir: Path, dataplane: str) -> None:
    target = read_only_dir / "ro.img"
    device = BlkDevice(MemoryStorage(DISK, url="mem:first"), dataplane=dataplane)
    async with serve_with_control(device, short_dir) as (vm, ctl):
        reply = await ctl("swap", backend=f"file:{target}")
        assert reply["ok"] is False, reply
        error = str(reply["error"])
        assert str(target) in error and "read-write" in error, error
        assert "Read-only file system" in error, error            # the reason (EROFS)
        info = await ctl("info")
        assert info["backend"] == "mem:first" and info["paused"] is False, info
        assert await write_sector(vm, 3, 9) == 0
        await no_config_change(vm)
    # A read-only disk may take it (opened read-only).
    ro_device = BlkDevice(MemoryStorage(DISK, url="mem:ro"), read_only=True, dataplane=dataplane)
    async with serve_with_control(ro_device, short_dir) as (_vm, ctl):
        reply = await ctl("swap", backend=f"file:{target}")
        assert reply["ok"] is True and reply["backend"] == f"file:{target}", reply
