"""QEMU 7.2 guests against `vdev blk` while its disk is mirrored to other storage.

The guest runs fio random writes with crc32c verify (and a second,
verify-only pass) while the host drives ``mirror`` through the control
socket, as an operator would.  Checked: fio finds every block it wrote,
wherever the disk is by then; the target equals the source at the pivot
(hashed while the disk is paused right after it; the source is not written
after the pivot); a mirror that fails mid-copy or is cancelled leaves the
disk on its source, and the guest sees no error.

The failing target is a file on a 32 MiB tmpfs that fills up (ENOSPC)
while the 128 MiB disk is copied: a real file system running out of space,
not a test double (mounting it needs root, as the suite does).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.control import control_request
from vdev.testing.guest import GuestImage, run_in_guest

MiB = 1 << 20
DISK = 128 * MiB


def blk_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=blk0,path={sock}", "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=1"]


def fio(name: str, offset: int, size: int, *extra: str, bs: int = 64 * 1024) -> str:
    return (f"fio --name={name} --filename=/dev/vda --ioengine=libaio --direct=1 --iodepth=8 "
            f"--rw=randwrite --bs={bs} --offset={offset} --size={size} --verify=crc32c --do_verify=1 "
            f"--verify_fatal=1 --group_reporting {' '.join(extra)}")


def sha256(path: Path, size: int = DISK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 8 * MiB))
            assert chunk, f"{path} is shorter than {size}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


class Ctl:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    async def __call__(self, command: str, **params: Any) -> dict[str, Any]:
        return await control_request(self.path, {"command": command, **params})

    async def writes(self) -> int:
        return int((await self("info"))["stats"].get("OUT", 0))

    async def until_writes(self, n: int, timeout: float = 240) -> int:
        async with asyncio.timeout(timeout):
            while (w := await self.writes()) < n:
                await asyncio.sleep(0.05)
        return w

    async def job(self) -> dict[str, Any]:
        jobs = (await self("jobs"))["jobs"]
        return dict(jobs[-1])

    async def until_phase(self, *phases: str, timeout: float = 120) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while (job := await self.job())["phase"] not in phases:
                await asyncio.sleep(0.05)
        return job


def make_image(path: Path, size: int = DISK, data: bool = False) -> Path:
    with open(path, "wb") as f:
        if data:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
        else:
            f.truncate(size)
    return path


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    img = make_image(tmp_path / "nbd.img")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "--socket", str(sock), "--format", "raw", "--export-name", "disk",
                             "--persistent", "--shared=4", "--cache=writeback", str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.05)
    yield sock, img
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (the suite runs as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_mirror_to_file_then_to_nbd_under_fio_target_equals_source(
        guest_image: GuestImage, vdev_daemon, qemu_nbd, tmp_path: Path) -> None:
    # One guest, two mirrors, each while fio writes: file a -> file b (native
    # path both sides), then b -> nbd+unix:// served by qemu-nbd (the disk
    # moves to the Python path).  pivot=manual: each pivot comes right after
    # a fio write phase ends, so nothing writes between the pivot and the
    # pause in which the host hashes source and target.
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")
    nbd_sock, nbd_img = qemu_nbd
    nbd_url = f"nbd+unix:///disk?socket={nbd_sock}"
    sock, ctl_path = tmp_path / "blk.sock", tmp_path / "blk.ctl"
    vdev_daemon("blk", "--socket", str(sock), "--backend", f"file:{a}", "--control", str(ctl_path),
                wait_for=sock)
    ctl = Ctl(ctl_path)
    half = 64 * MiB
    script = f"""
set -e
{fio("one", 0, half)}
{fio("one", 0, half, "--verify_only")}
echo one-ok
{fio("two", half, half)}
{fio("two", half, half, "--verify_only")}
echo two-ok
"""
    writes_per_run = half // (64 * 1024)
    checks: list[dict[str, Any]] = []

    async def mirror_once(target: str, src: Path, dst: Path, writes_before: int) -> None:
        await ctl.until_writes(writes_before + 100)              # fio is writing
        started = await ctl("mirror", target=target, pivot="manual")
        assert started["ok"], started
        ready = await ctl.until_phase("ready", "failed")
        assert ready["phase"] == "ready", ready
        writes_ready = await ctl.writes()
        await ctl.until_writes(writes_before + writes_per_run)  # this fio run's writes are over
        assert (await ctl("pivot"))["ok"]
        done = await ctl.until_phase("done", "failed")
        paused = await ctl("pause")
        try:
            equal = await asyncio.to_thread(lambda: sha256(src) == sha256(dst))
            writes_at_pause = int(paused["stats"].get("OUT", 0))
        finally:
            await ctl("resume")
        checks.append({"job": done, "equal": equal, "writes_ready": writes_ready,
                       "writes_at_pause": writes_at_pause, "backend": paused["backend"],
                       "dataplane": paused["dataplane"], "writes_before": writes_before})

    async def host() -> None:
        await mirror_once(f"file:{b}", a, b, 0)
        await mirror_once(nbd_url, b, nbd_img, writes_per_run)

    task = asyncio.create_task(host())
    result = await run_in_guest(guest_image, script, timeout=600, qemu_args=blk_args(sock))
    await asyncio.wait_for(task, 30)
    assert result.exit_status == 0, result.console
    out = result.output
    assert out.count("err= 0") == 4 and "one-ok" in out and "two-ok" in out, out
    first, second = checks
    for check, target, dataplane in ((first, f"file:{b}", "native"), (second, nbd_url, "python")):
        job = check["job"]
        assert job["phase"] == "done" and job["target"] == target and job["error"] is None, check
        assert check["backend"] == target and check["dataplane"] == dataplane, check
        # the guest wrote while the job copied, so it copied more than the disk once
        assert check["writes_before"] + 100 <= check["writes_ready"] < check["writes_before"] + writes_per_run
        assert job["bytes_copied"] > DISK and job["passes"] >= 2, job
        assert job["pivot_pause_ms"] is not None, job
        # nothing was written between the pivot and the hashing
        assert check["writes_at_pause"] == check["writes_before"] + writes_per_run, check
        assert check["equal"], check
    info = await ctl("info")
    assert info["stats"].get("errors", 0) == 0, info


async def test_failing_auto_and_cancelled_mirrors_under_fio(guest_image: GuestImage, vdev_daemon,
                                                             small_tmpfs: Path, tmp_path: Path) -> None:
    # One guest writing with verify while three mirrors run in turn:
    #  1. a -> a file on a 32 MiB tmpfs: fails mid-copy (ENOSPC), the disk stays on a;
    #  2. a -> file d, pivoting by itself while fio writes;
    #  3. d -> file c, rate-limited, cancelled part-way: the disk stays on d.
    # fio verifies everything it wrote, then a verify-only pass reads it all
    # back from d.
    a = make_image(tmp_path / "a.img", data=True)      # all data: no holes to skip
    full = make_image(small_tmpfs / "full.img")
    c, d = make_image(tmp_path / "c.img"), make_image(tmp_path / "d.img")
    sock, ctl_path = tmp_path / "blk.sock", tmp_path / "blk.ctl"
    vdev_daemon("blk", "--socket", str(sock), "--backend", f"file:{a}", "--control", str(ctl_path),
                wait_for=sock)
    ctl = Ctl(ctl_path)
    # 4 KiB writes: 32768 of them keep fio writing through all three mirrors
    # (with 16 KiB ones, a quiet machine's guest finished writing before the
    # rate-limited mirror was cancelled).
    bs = 4 * 1024
    script = f"""
set -e
{fio("all", 0, DISK, bs=bs)}
{fio("all", 0, DISK, "--verify_only", bs=bs)}
echo all-ok
"""
    total_writes = DISK // bs
    seen: dict[str, Any] = {}

    async def host() -> None:
        await ctl.until_writes(50)
        r = await ctl("mirror", target=f"file:{full}")
        assert r["ok"], r
        seen["failed"] = await ctl.until_phase("failed", "done")
        seen["after_failure"] = await ctl("info")

        seen["writes_at_auto"] = await ctl.writes()
        r = await ctl("mirror", target=f"file:{d}")
        assert r["ok"], r
        seen["auto"] = await ctl.until_phase("done", "failed")
        seen["writes_after_auto"] = await ctl.writes()
        seen["after_auto"] = await ctl("info")

        r = await ctl("mirror", target=f"file:{c}", rate="64M")
        assert r["ok"], r
        async with asyncio.timeout(60):
            while (await ctl.job())["bytes_copied"] < DISK * 3 // 10:
                await asyncio.sleep(0.05)
        seen["writes_at_cancel"] = await ctl.writes()
        seen["cancel"] = await ctl("cancel")
        seen["after_cancel"] = await ctl("info")

    task = asyncio.create_task(host())
    result = await run_in_guest(guest_image, script, timeout=600, qemu_args=blk_args(sock))
    await asyncio.wait_for(task, 30)
    assert result.exit_status == 0, result.console
    assert result.output.count("err= 0") == 2 and "all-ok" in result.output, result.output

    failed = seen["failed"]
    assert failed["phase"] == "failed", failed
    assert "writing the target" in failed["error"] and "No space left on device" in failed["error"], failed
    assert 0 < failed["bytes_copied"] < DISK, failed
    assert seen["after_failure"]["backend"] == f"file:{a}" and not seen["after_failure"]["paused"]

    auto = seen["auto"]
    assert auto["phase"] == "done" and auto["pivot"] == "auto", auto
    # the pivot came while fio was still writing
    assert seen["writes_at_auto"] < seen["writes_after_auto"] < total_writes, seen
    assert seen["after_auto"]["backend"] == f"file:{d}", seen["after_auto"]

    cancel = seen["cancel"]
    assert cancel["ok"] and cancel["job"]["phase"] == "cancelled" and cancel["backend"] == f"file:{d}", cancel
    assert cancel["job"]["bytes_copied"] < DISK, cancel
    assert seen["writes_at_cancel"] < total_writes, seen          # cancelled under writes too
    assert seen["after_cancel"]["backend"] == f"file:{d}" and not seen["after_cancel"]["paused"]
    info = await ctl("info")
    assert info["backend"] == f"file:{d}" and info["stats"].get("errors", 0) == 0, info
