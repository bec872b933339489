"""Live migration of a QEMU 7.2 guest whose disk is a `vdev blk`, driven through QMP.

A guest runs fio (random writes at depth 16 with ``--verify=crc32c`` and
``--verify_backlog``, so it reads back and checks what it wrote all along)
on a ``vhost-user-blk-pci`` disk served by `vdev blk` from an image file.
While fio runs, the test migrates the guest to a second QEMU on this machine
(``-incoming unix:…``) whose disk is a second `vdev blk` on the same image,
through QMP with QEMU's own client library (``qemu.qmp``): raise the
bandwidth cap, ``migrate``, poll ``query-migrate`` until ``completed``.
fio finishes on the destination (its output arrives on the destination's
serial console) with no verify error and no kernel I/O error.

What makes this a test of the back end's dirty logging (LOG_SHMFD,
VHOST_F_LOG_ALL): QEMU copies guest RAM while the source daemon keeps writing
into it, and only the daemon can say which pages it wrote (the guest's CPU
did not).  The test makes that certain rather than lucky:

1. The migration copies all of RAM once at full speed, then is held short
   of converging: near the end of that first pass the bandwidth cap drops to
   8 MiB/s with a 1 ms downtime limit, below what the guest's CPU dirties
   (it rewrites 32 MiB in a loop), so QEMU keeps iterating.  (A downtime
   limit of 0 does not do it: QEMU then never re-reads its dirty bitmap and
   completes after the first pass; at full speed it converges within a
   second of the first pass ending.)
2. Once QEMU reports the first pass done (``dirty-sync-count`` 2: every page
   sent once), the guest reads 48 MiB of known random bytes from the disk
   *buffered*: the daemon writes them into page-cache pages the CPU never
   touches, all of them behind the copy's cursor.  (The guest kernel runs
   with ``init_on_alloc=0``: Debian's default zeroes every page it hands
   out, a CPU write that makes QEMU resend the page whatever the back end
   logs.)
3. Then the limit is raised and the migration completes.  On the
   destination the guest reads the same range again from its page cache
   (the disk's read counter must not move: an opener holds ``/dev/vda`` all
   along, since its last close drops the cache, and fio runs with
   ``--invalidate=0``) and the hash must match.  A page the daemon wrote but
   did not log arrives stale.  Checked: with `DeviceRuntime._ring_log`
   handing the rings no log, the hash differs on both data paths.

fio (random writes at depth 16, ``--verify=crc32c --verify_backlog``) runs
across the whole move and must finish on the destination without a verify
error.  The used ring cannot be checked this way: it shares its page with
the avail ring, which the guest writes, so QEMU resends it anyway.  Both data
paths log separately (C and Python), so both are migrated.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.control import control_request
from vdev.testing.guest import GuestImage, GuestVM

MiB = 1 << 20

FIO = ("fio --name=m --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite "
       "--bs=4k --size=48M --time_based --runtime=40 --verify=crc32c --verify_backlog=64 "
       "--verify_fatal=1 --invalidate=0 --group_reporting")
#: The disk's second half holds random bytes the host knows; the guest reads
#: them into its page cache while the migration copies RAM.
CACHED_MB, CACHED_AT_MB = 48, 64
#: The migration's bandwidth caps: the first pass and the end; the hold.
FAST, SLOW = 512 * MiB, 8 * MiB
#: Throttle when this much of the first pass is left (at SLOW: 6 s at most).
TAIL = 48 * MiB

SCRIPT = f"""
# Held open to the end: the last close of a block device drops its page cache,
# and the final read must come from the cache, not from the disk.
exec 3< /dev/vda
{FIO} > /tmp/fio.out 2>&1 &
fio=$!
# The CPU rewrites 32 MiB over and over: with a 1 ms downtime limit the
# migration cannot converge until the host raises it.
(while :; do dd if=/dev/zero of=/tmp/dirt bs=32M count=1 conv=notrunc 2>/dev/null; done) &
dirt=$!
echo ready
read -r step < /dev/ttyS0
# Buffered: the page cache pages are written by the back end (DMA) alone.
dd if=/dev/vda of=/dev/null bs=1M skip={CACHED_AT_MB} count={CACHED_MB} 2>/dev/null
echo cached
read -r step < /dev/ttyS0
kill $dirt
wait $fio
echo "fio-exit=$?"
cat /tmp/fio.out
before=$(awk '{{print $3}}' /sys/block/vda/stat)
echo "cached-sha=$(dd if=/dev/vda bs=1M skip={CACHED_AT_MB} count={CACHED_MB} 2>/dev/null | sha256sum)"
echo "sectors-read-from-disk=$(( $(awk '{{print $3}}' /sys/block/vda/stat) - before ))"
echo "kernel-errors=$(dmesg | grep -ciE 'error|blocked for more than')"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # QMP, vhost-user and migration sockets live here: Unix paths stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="vmig-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def blk_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=blk0,path={sock}", "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"]


async def first_pass_then_hold(src: GuestVM, dst: GuestVM) -> dict[str, Any]:
    """Migrate at full speed until the first pass over RAM nears its end, then
    throttle so that it cannot converge; return once the first pass is done
    (``dirty-sync-count`` 2) with the migration still active."""
    await src.start_migration(dst, max_bandwidth=FAST, downtime_ms=1)
    async with asyncio.timeout(240):
        while True:
            state = await src.migration()
            assert state["status"] in ("setup", "active"), f"converged before it was held: {state}"
            ram = state.get("ram", {})
            if state["status"] == "active" and (ram.get("remaining", TAIL) < TAIL
                                                 or ram.get("dirty-sync-count", 0) >= 2):
                await src.set_migration(max_bandwidth=SLOW)
                break
            await asyncio.sleep(0.02)
    return await src.wait_migration(passes=2, timeout=240)


async def info(ctl: Path) -> dict[str, Any]:
    return await control_request(str(ctl), {"command": "info"})


@pytest.mark.parametrize("dataplane", ["native", "python"])
async def test_migrate_guest_with_vdev_blk_under_fio_verify(guest_image: GuestImage, vdev_daemon,
                                                            short_dir: Path, dataplane: str) -> None:
    image = short_dir / "disk.img"
    cached = os.urandom(CACHED_MB * MiB)
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
        f.seek(CACHED_AT_MB * MiB)
        f.write(cached)
    src_sock, dst_sock = short_dir / "src.sock", short_dir / "dst.sock"
    src_ctl, dst_ctl = short_dir / "src.ctl", short_dir / "dst.ctl"
    # Two daemons on the same storage: one per QEMU, as on two hosts sharing a disk.
    src_daemon = vdev_daemon("blk", "--socket", str(src_sock), "--backend", f"file:{image}", "--queues", "1",
                             "--dataplane", dataplane, "--control", str(src_ctl), wait_for=src_sock)
    vdev_daemon("blk", "--socket", str(dst_sock), "--backend", f"file:{image}", "--queues", "1",
                "--dataplane", dataplane, "--control", str(dst_ctl), wait_for=dst_sock)
    src = GuestVM(guest_image, SCRIPT, workdir=short_dir, name="src", qemu_args=blk_args(src_sock),
                  kernel_args=["init_on_alloc=0"])
    dst = src.incoming_twin("dst", qemu_args=blk_args(dst_sock))
    try:
        await src.start()
        await dst.start()
        await src.wait_output(r"\nready\r?\n", timeout=240)
        # 1. Copy all of RAM once, and keep iterating.
        first = await first_pass_then_hold(src, dst)
        assert first["status"] == "active", first
        # 2. The daemon fills page-cache pages behind the copy's cursor.
        await src.send_console("dd\n")
        await src.wait_output(r"\ncached\r?\n", timeout=240)
        before = await src.migration()
        assert before["status"] == "active", before      # the move has not happened yet
        # 3. Let it converge: full speed, and 10 s covers far more than the loop dirties.
        await src.set_migration(max_bandwidth=FAST, downtime_ms=10_000)
        migration = await src.wait_migration(timeout=240)
        assert migration["status"] == "completed", migration
        assert (await dst.execute("query-status"))["status"] == "running"
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        during = await info(src_ctl)
        await dst.send_console("go\n")
        result = await dst.wait_result(src, timeout=300)
    finally:
        await src.close()
        await dst.close()
    out = result.output
    assert result.exit_status == 0, result.console
    assert "fio-exit=0" in out and "err= 0" in out, out
    assert not re.search(r"verify failed|bad magic|bad header", out), out
    assert "kernel-errors=0" in out, out
    # What dd read into the page cache during the migration, read again from
    # the cache on the destination: the pages the source daemon wrote were logged.
    assert "sectors-read-from-disk=0" in out, out
    assert f"cached-sha={hashlib.sha256(cached).hexdigest()}" in out, out
    # The source daemon logged dirty pages while QEMU copied RAM, then its
    # rings stopped; fio went on writing and reading on the destination's.
    assert "dirty logging on" in src_daemon.log(), src_daemon.log()
    assert int(during["stats"].get("OUT", 0)) > 0 and int(during["stats"].get("IN", 0)) > 0, during
    after_src, after_dst = await info(src_ctl), await info(dst_ctl)
    assert after_src["stats"] == during["stats"], (during, after_src)     # the source is done
    assert int(after_dst["stats"].get("OUT", 0)) > 0 and int(after_dst["stats"].get("IN", 0)) > 0, after_dst
    assert after_src["inflight"] == 0 and after_dst["stats"].get("errors", 0) == 0, (after_src, after_dst)
