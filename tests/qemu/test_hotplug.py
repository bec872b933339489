"""Memory hot-plug under a running `vdev blk` disk: a pc-dimm added through QMP.

QEMU 7.2 runs with room for DIMMs (``-m 512M,slots=2,maxmem=1G``).  While fio
writes and verifies on the ``vhost-user-blk-pci`` disk, the test adds a
256 MiB ``memory-backend-memfd`` (``share=on``, as a vhost-user back end must
map it) and a ``pc-dimm`` on it through QMP (``qemu.qmp``).  QEMU tells the
back end with ADD_MEM_REG (we offer CONFIGURE_MEM_SLOTS): the daemon's
``info`` must list the new region at the DIMM's address, and its log say so.

Then the guest itself uses the new memory for the daemon's buffers — the
variant of issue 10 where the guest onlines it, not the test kit standing
in (that one is `tests/unit/test_blk_device.py::
test_memory_added_and_removed_under_running_queues`):

* the kernel starts with ``memhp_default_state=offline``; the script onlines
  every new memory block as ``online_kernel``.  All boot RAM lies below
  4 GiB (ZONE_DMA32), so the DIMM, above it, becomes the whole of
  ZONE_NORMAL — the zone every page-cache and user allocation tries first.
  (``online_movable`` would not do: a block device's page cache is not
  movable, so it would never land there.)
* a buffered read of 64 MiB of known random bytes from the disk: the daemon
  writes them into page-cache pages, and ``/proc/zoneinfo`` must show at
  least 60 MiB of file pages in ZONE_NORMAL — the DIMM; the bytes, read
  again from the cache, must hash right.
* fio with ``--verify=crc32c`` again, its buffers now allocated after the
  plug (user memory, also first from ZONE_NORMAL), finishes without error.
"""

from __future__ import annotations

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
DIMM_MB = 256
CACHED_MB, CACHED_AT_MB = 64, 64
FIO = ("fio --name=h --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite "
       "--bs=4k --size=16M --verify=crc32c --verify_backlog=64 --verify_fatal=1 --group_reporting")

SCRIPT = f"""
exec 3< /dev/vda          # keep /dev/vda open: its last close drops the page cache
{FIO} --time_based --runtime=20 > /tmp/fio1.out 2>&1 &
fio=$!
echo ready
read -r step < /dev/ttyS0
wait $fio
echo "fio1-exit=$?"
cat /tmp/fio1.out
n=0
for m in /sys/devices/system/memory/memory*; do
    if [ "$(cat $m/state)" = offline ]; then echo online_kernel > $m/state && n=$((n + 1)); fi
done
echo "onlined=$n"
echo "normal-present=$(awk '/^Node .*zone/ {{z=$4}} z=="Normal" && $1=="present" {{print $2; exit}}' /proc/zoneinfo)"
file0=$(awk '/^Node .*zone/ {{z=$4}} z=="Normal" && ($1=="nr_zone_inactive_file" || $1=="nr_zone_active_file") {{s+=$2}} END {{print s+0}}' /proc/zoneinfo)
dd if=/dev/vda of=/dev/null bs=1M skip={CACHED_AT_MB} count={CACHED_MB} 2>/dev/null
file1=$(awk '/^Node .*zone/ {{z=$4}} z=="Normal" && ($1=="nr_zone_inactive_file" || $1=="nr_zone_active_file") {{s+=$2}} END {{print s+0}}' /proc/zoneinfo)
echo "normal-file-pages-added=$((file1 - file0))"
before=$(awk '{{print $3}}' /sys/block/vda/stat)
echo "cached-sha=$(dd if=/dev/vda bs=1M skip={CACHED_AT_MB} count={CACHED_MB} 2>/dev/null | sha256sum)"
echo "sectors-read-from-disk=$(( $(awk '{{print $3}}' /sys/block/vda/stat) - before ))"
{FIO} --do_verify=1 > /tmp/fio2.out 2>&1
echo "fio2-exit=$?"
cat /tmp/fio2.out
echo "kernel-errors=$(dmesg | grep -ciE 'error|blocked for more than')"
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # QMP and vhost-user sockets live here: Unix paths stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="vhp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def info(ctl: Path) -> dict[str, Any]:
    return await control_request(str(ctl), {"command": "info"})


@pytest.mark.parametrize("dataplane", ["native", "python"])
async def test_pc_dimm_plugged_under_fio_reaches_vdev_blk_and_holds_its_buffers(
        guest_image: GuestImage, vdev_daemon, short_dir: Path, dataplane: str) -> None:
    image = short_dir / "disk.img"
    cached = os.urandom(CACHED_MB * MiB)
    with open(image, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(CACHED_AT_MB * MiB)
        f.write(cached)
    sock, ctl = short_dir / "blk.sock", short_dir / "blk.ctl"
    daemon = vdev_daemon("blk", "--socket", str(sock), "--backend", f"file:{image}", "--queues", "1",
                         "--dataplane", dataplane, "--control", str(ctl), wait_for=sock)
    vm = GuestVM(guest_image, SCRIPT, workdir=short_dir, name="hp", memory_slots=2, max_memory_mb=1024,
                 kernel_args=["memhp_default_state=offline"],
                 qemu_args=["-chardev", f"socket,id=blk0,path={sock}",
                            "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"])
    try:
        await vm.start()
        await vm.wait_output(r"\nready\r?\n", timeout=240)
        before = await info(ctl)
        # fio is running: plug the DIMM under it.
        await vm.execute("object-add", {"qom-type": "memory-backend-memfd", "id": "hp0",
                                        "size": DIMM_MB * MiB, "share": True})
        await vm.execute("device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "hp0"})
        dimm = next(d["data"] for d in await vm.execute("query-memory-devices") if d["data"]["id"] == "dimm0")
        during = await info(ctl)
        await vm.send_console("go\n")
        result = await vm.wait_result(timeout=300)
    finally:
        await vm.close()
    out = result.output
    assert result.exit_status == 0, result.console
    # The back end was told (ADD_MEM_REG) and maps the DIMM where QEMU put it.
    assert [(r["gpa"], r["size"]) for r in before["memory"]] == [(0, 512 * MiB)], before["memory"]
    assert [(r["gpa"], r["size"]) for r in during["memory"]] == [(0, 512 * MiB), (dimm["addr"], DIMM_MB * MiB)], \
        (during["memory"], dimm)
    assert f"memory region added: guest {dimm['addr']:#x}, {DIMM_MB} MiB (2 regions)" in daemon.log(), daemon.log()
    # fio ran across the plug without an error.
    assert "fio1-exit=0" in out and not re.search(r"verify failed|bad magic|bad header", out), out
    # The guest onlined the DIMM, and ZONE_NORMAL is the DIMM.
    assert f"onlined={DIMM_MB // 128}" in out, out
    assert f"normal-present={DIMM_MB * MiB // 4096}" in out, out
    # The daemon's DMA landed in it: the page cache filled there, and holds the right bytes.
    added = int(re.search(r"normal-file-pages-added=(-?\d+)", out).group(1))    # type: ignore[union-attr]
    assert added * 4096 >= 60 * MiB, out
    assert "sectors-read-from-disk=0" in out, out
    assert f"cached-sha={hashlib.sha256(cached).hexdigest()}" in out, out
    assert "fio2-exit=0" in out and out.count("err= 0") == 2, out
    assert "kernel-errors=0" in out, out
    after = await info(ctl)
    assert after["stats"].get("errors", 0) == 0 and after["stats"].get("rejected", 0) == 0, after["stats"]
