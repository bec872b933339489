"""Two set-up mistakes, made with a real QEMU 7.2, and what the daemon's log says.

Guest RAM without ``share=on``: QEMU keeps the RAM out of the vhost-user
memory table, SeaBIOS's virtio-blk driver starts a ring whose addresses are
then in no region, and QEMU sits at "Booting from ROM".  The daemon's log
must say that guest RAM is probably not shared.

A ``num-queues`` above what the daemon offers: QEMU asks GET_QUEUE_NUM,
refuses ("The maximum number of queues supported by the backend is 2") and
leaves.  The daemon's log must say what was offered and that the front-end
probably wants more.

Neither needs a guest to boot, so each costs a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from vdev.testing.guest import QEMU, GuestImage


async def _wait_log(daemon, needle: str, timeout: float = 60) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while needle not in (log := daemon.log()):
        assert time.monotonic() < deadline, log
        await asyncio.sleep(0.1)
    return log


async def _qemu(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        QEMU, "-accel", "tcg", "-machine", "q35", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "null", "-no-reboot", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    _out, err = await proc.communicate()
    return err


async def test_guest_ram_not_shared_is_named_in_the_daemon_log(guest_image: GuestImage, vdev_daemon,
                                                               tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    daemon = vdev_daemon("blk", "--socket", str(sock), "--backend", "mem:64M", wait_for=sock)
    # plain -m: anonymous RAM that QEMU cannot hand to a vhost-user back end
    proc = await _qemu("-m", "256", "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initramfs),
                       "-append", "console=ttyS0", "-chardev", f"socket,id=blk0,path={sock}",
                       "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1")
    try:
        log = await _wait_log(daemon, "front-end address not in any memory region")
    finally:
        await _stop(proc)
    line = next(x for x in log.splitlines() if "front-end address not in any memory region" in x)
    assert "is guest RAM shared with the back end?" in line and "share=on" in line, line
    assert "memory-backend-memfd" in line, line


async def test_queue_count_mismatch_is_named_in_the_daemon_log(vdev_daemon, tmp_path: Path) -> None:
    sock = tmp_path / "blk.sock"
    daemon = vdev_daemon("blk", "--socket", str(sock), "--backend", "mem:64M", "--queues", "2",
                         wait_for=sock)
    proc = await _qemu("-m", "256", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                       "-numa", "node,memdev=mem", "-chardev", f"socket,id=blk0,path={sock}",
                       "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=4", "-S")
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await _stop(proc)
    assert proc.returncode != 0
    assert b"The maximum number of queues supported by the backend is 2" in err, err
    log = await _wait_log(daemon, "probably wants more queues")
    assert "front-end asked for the queue count: 2 offered" in log, log
    line = next(x for x in log.splitlines() if "probably wants more queues" in x)
    assert "which was 2" in line and "--queues N" in line, line
