"""QEMU 7.2 guest on a 4K-sector disk (issue "Defects found by hostile
testing", item 1: what the guest should see).

`vdev blk` serves a loop device with 4 KiB logical sectors under O_DIRECT.
The Linux guest must be told that block size (``blk_size``), so it sends no
write smaller than a block: the daemon's read-modify-write count stays 0
while the guest writes through its page cache, with O_DIRECT and with fio,
and everything it wrote is on the loop device's backing file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.control import control_request
from vdev.testing.guest import GuestImage, run_in_guest

MiB = 1 << 20


@pytest.fixture
def loop4k() -> Iterator[tuple[str, Path]]:
    """(loop device, backing file): 64 MiB with 4 KiB logical sectors; detached at teardown."""
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    d = Path(tempfile.mkdtemp(prefix="vdev-loop-"))
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(["losetup", "--sector-size", "4096", "-f", "--show", str(image)],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev, image
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(d, ignore_errors=True)


def seq_pattern(n: int, size: int) -> bytes:
    return "".join(f"{i}\n" for i in range(1, n + 1)).encode()[:size]


async def test_guest_sees_4k_blocks_and_sends_no_sub_block_write(guest_image: GuestImage, vdev_daemon,
                                                                  loop4k: tuple[str, Path],
                                                                  tmp_path: Path) -> None:
    dev, backing = loop4k
    sock, ctl = tmp_path / "blk.sock", tmp_path / "blk.ctl"
    vdev_daemon("blk", "--socket", str(sock), "--backend", f"file:{dev}?direct=on", "--control", str(ctl),
                wait_for=sock)
    script = """
set -e
echo "lbs=$(cat /sys/block/vda/queue/logical_block_size)"
seq 1 200000 | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=512 seek=8192 conv=fsync 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=4096 seek=2048 oflag=direct 2>/dev/null
fio --name=v --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite --bs=4k \
    --size=16M --offset=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
sync
echo done-ok
"""
    result = await run_in_guest(guest_image, script, timeout=240,
                                qemu_args=["-chardev", f"socket,id=blk0,path={sock}",
                                           "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])
    assert result.exit_status == 0, result.console
    out = result.output
    assert "lbs=4096" in out, out
    assert "err= 0" in out and "done-ok" in out, out
    info = await control_request(str(ctl), {"command": "info"})
    assert info["read_modify_writes"] == 0, info
    assert info["stats"].get("errors", 0) == 0, info
    data = backing.read_bytes()
    pat = seq_pattern(200000, MiB)
    assert data[4 * MiB: 5 * MiB] == pat                  # 512-byte buffered writes, as 4K blocks
    assert data[8 * MiB: 9 * MiB] == pat                  # O_DIRECT 4K writes
