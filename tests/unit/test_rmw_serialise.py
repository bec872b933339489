"""O_DIRECT read-modify-write is ordered against overlapping writes (issue
"Defects found by hostile testing", item 1).

On storage with 4 KiB logical blocks, a 512-byte write becomes a
read-modify-write (RMW) of its block.  A whole-block write to the same block
that runs meanwhile must not be lost: any write overlapping a block under RMW
waits for it, and an RMW waits for overlapping writes in flight, as QEMU's
request serialisation does.  The device also advertises the storage's
logical block size (``blk_size``) so that a Linux guest never sends
sub-block writes in the first place.

The storage is a real loop device with 4 KiB sectors (``losetup
--sector-size 4096``) opened with ``?direct=on``; the writes are posted by
the in-process front-end before one kick, so they are in flight together.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from backends.blk.device import BlkDevice
from backends.blk.storage import FileStorage, open_storage
from vdev.testing import Buffer, device_pair

SECTOR = 512
BLOCK = 4096
F_BLK_SIZE = 1 << 6


@pytest.fixture
def loop4k() -> Iterator[str]:
    """A 1 MiB loop device with 4 KiB logical sectors; detached at teardown."""
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    d = tempfile.mkdtemp(prefix="vdev-loop-")
    image = os.path.join(d, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    dev = subprocess.run(["losetup", "--sector-size", "4096", "-f", "--show", image],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(d, ignore_errors=True)


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


def write_req(sector: int, data: bytes) -> list[Buffer]:
    return [header(1, sector), Buffer.readable(data), Buffer.writable(1)]


@pytest.mark.parametrize("dataplane", ["python", "native"])
@pytest.mark.parametrize("queues", [1, 2], ids=["one-queue", "two-queues"])
async def test_aligned_write_is_not_lost_to_a_read_modify_write(loop4k: str, dataplane: str,
                                                               queues: int) -> None:
    # With two queues the RMW and the aligned write run on different queues
    # (on the native path: two worker threads), which only a storage-wide
    # exclusion keeps apart.
    storage = await open_storage(f"file:{loop4k}?direct=on")
    assert isinstance(storage, FileStorage) and storage.block_size == BLOCK
    device = BlkDevice(storage, dataplane=dataplane, num_queues=queues)
    other = queues - 1
    async with device_pair(device) as vm:
        assert device.info()["dataplane"] == dataplane
        # What the guest is told: 4 KiB logical blocks.
        assert vm.features & F_BLK_SIZE
        cfg = await vm.fe.get_config(0, 60)
        assert struct.unpack_from("<I", cfg, 20)[0] == BLOCK          # blk_size
        lost = []
        for run in range(200):
            block = run % 16
            base = block * (BLOCK // SECTOR)
            used = await vm.request(0, write_req(base, b"A" * BLOCK))
            assert used.written == b"\0"
            # One kick: a 512-byte write of B into the block's second sector
            # (an RMW) and a whole-block write of C, in flight together.
            vm.post(0, write_req(base + 1, b"B" * SECTOR), kick=False)
            vm.post(other, write_req(base, b"C" * BLOCK), kick=False)
            vm.kick(0)
            vm.kick(other)
            if other:
                done = (await vm.wait_used(0, 1)) + (await vm.wait_used(other, 1))
            else:
                done = await vm.wait_used(0, 2)
            assert [u.written for u in done] == [b"\0", b"\0"]
            used = await vm.request(0, [header(0, base), Buffer.writable(BLOCK), Buffer.writable(1)])
            got = used.written[:BLOCK]
            # Either order is fine; losing the whole-block write is not.
            if got not in (b"C" * BLOCK, b"C" * SECTOR + b"B" * SECTOR + b"C" * (BLOCK - 2 * SECTOR)):
                lost.append((run, got[:8], got[SECTOR:SECTOR + 8], got[-8:]))
        assert not lost, f"{len(lost)} of 200 runs lost a write: {lost[:5]}"
