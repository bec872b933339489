"""The mirror (live storage migration) in-process: a real BlkDevice served over a
real vhost-user socket, a VirtioFrontend writing while the disk is copied, real
file and NBD storage (qemu-nbd), `FaultyStorage` for a target that fails.

What is checked: the target equals the source at the pivot, the guest's view
never changes (no write lost across the pivot, on both data paths), holes are
copied as zeros, a failing or cancelled mirror leaves the disk on its storage
with the guest seeing no error, every refusal names its reason, and the
control commands (mirror, jobs, cancel, pivot, and swap/pause/resume/resize
while a mirror runs) answer as documented.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.blk import control_handlers
from backends.blk.device import BlkDevice
from backends.blk.dirty import DirtyBitmap
from backends.blk.mirror import Jobs, _batches, _dirty_bits, _dirty_words, _intersect, _runs, parse_mirror_params
from backends.blk.storage import FileStorage, Storage, open_storage
from backends.blk.storage.testing import FaultyStorage, QemuNbdServer
from vdev.control import ControlServer, control_request
from vdev.testing import Buffer, VirtioFrontend, device_pair

SECTOR = 512
KiB, MiB = 1 << 10, 1 << 20
GRAN = 64 * KiB
DISK = 8 * MiB

needs_qemu_nbd = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")


@pytest.fixture(params=["python", "auto"])
def dataplane(request: pytest.FixtureRequest) -> str:
    """The Python path, and the native engine (file storage has one)."""
    return str(request.param)


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-mirror-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- guest requests, spelled out ---------------------------------------------------------------

def _header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


async def guest_write(vm: VirtioFrontend, offset: int, data: bytes) -> None:
    used = await vm.request(0, [_header(1, offset // SECTOR), Buffer.readable(data), Buffer.writable(1)])
    assert used.written[-1] == 0, f"guest write at {offset} failed"


async def guest_read(vm: VirtioFrontend, offset: int, n: int) -> bytes:
    used = await vm.request(0, [_header(0, offset // SECTOR), Buffer.writable(n), Buffer.writable(1)])
    assert used.written[-1] == 0, f"guest read at {offset} failed"
    return bytes(used.written[:n])


def make_file(path: str, size: int = DISK, fill: bytes | None = None) -> str:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return path


def sha(path: str, size: int = DISK) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


class Writer:
    """Random writes from the guest, remembered in a model of the disk."""

    def __init__(self, vm: VirtioFrontend, model: bytearray, seed: int = 1) -> None:
        self.vm, self.model = vm, model
        self.rnd = random.Random(seed)
        self.count = 0
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        size = len(self.model)
        while not self._stop.is_set():
            n = self.rnd.choice([SECTOR, 4 * KiB, 64 * KiB, 200 * KiB])
            off = self.rnd.randrange(0, (size - n) // SECTOR) * SECTOR
            data = self.rnd.randbytes(n)
            await guest_write(self.vm, off, data)
            self.model[off: off + n] = data
            self.count += 1

    async def stop(self) -> None:
        self._stop.set()
        assert self.task is not None
        await self.task


async def wait_phase(job, *phases: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while job.phase not in phases:
            await asyncio.sleep(0.005)


async def guest_view(vm: VirtioFrontend, size: int = DISK) -> bytes:
    return b"".join([await guest_read(vm, off, MiB) for off in range(0, size, MiB)])


# ---- pure helpers ---------------------------------------------------------------------------

def test_runs_of_a_word() -> None:
    assert _runs(0) == []
    assert _runs(0b1) == [(0, 1)]
    assert _runs(0b1101_1100) == [(2, 3), (6, 2)]
    assert _runs((1 << 64) - 1) == [(0, 64)]
    assert _runs(1 << 63 | 1) == [(0, 1), (63, 1)]


def test_intersect_cuts_runs_along_extents() -> None:
    extents = [(0, 100, True), (100, 50, False), (150, 50, True)]
    assert _intersect([(10, 20)], extents) == [(10, 10, True)]
    assert _intersect([(90, 160)], extents) == [(90, 10, True), (100, 50, False), (150, 10, True)]
    assert _intersect([(0, 20), (120, 180)], extents) == [(0, 20, True), (120, 30, False), (150, 30, True)]
    # past what the storage described: copied as data
    assert _intersect([(190, 260)], extents) == [(190, 10, True), (200, 60, True)]


def test_dirty_words_and_bits_see_every_set_bit() -> None:
    bitmap = DirtyBitmap(1 << 36, 64 * KiB)            # 2**20 bits, 16384 words
    assert list(_dirty_words(bitmap)) == [] and _dirty_bits(bitmap) == 0
    for block in (0, 63, 64, 511 * 64, 512 * 64 + 1, bitmap.nbits - 1):
        bitmap.mark(block * 64 * KiB, 1)
    assert list(_dirty_words(bitmap)) == [0, 1, 511, 512, bitmap.words - 1]
    assert _dirty_bits(bitmap) == 6 == bitmap.count()
    odd = DirtyBitmap(1000 * SECTOR, SECTOR)            # a last word only partly used
    odd.mark_all()
    assert list(_dirty_words(odd)) == list(range(odd.words)) and _dirty_bits(odd) == 1000


def test_batches_cut_runs_to_a_size() -> None:
    assert _batches([(0, 10)], 4) == [[(0, 4)], [(4, 8)], [(8, 10)]]
    assert _batches([(0, 3), (5, 6), (8, 20)], 4) == [[(0, 3), (5, 6)], [(8, 12)], [(12, 16)], [(16, 20)]]
    assert _batches([(0, 3), (5, 6)], 1 << 62) == [[(0, 3), (5, 6)]]
    assert _batches([], 4) == []


@pytest.mark.parametrize("params, error", [
    ({}, "mirror needs a storage URL 'target'"),
    ({"target": "mem:1M", "granularity": "3K"}, "granularity '3K' is not a power of two"),
    ({"target": "mem:1M", "granularity": "256"}, "granularity '256' is not a power of two"),
    ({"target": "mem:1M", "granularity": "x"}, "granularity 'x' is not a size"),
    ({"target": "mem:1M", "rate": "0"}, "rate '0' must be a positive"),
    ({"target": "mem:1M", "rate": "fast"}, "rate 'fast' is not a size"),
    ({"target": "mem:1M", "pivot": "later"}, "pivot 'later' is not 'auto' or 'manual'"),
])
def test_bad_mirror_parameters_are_named(params: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_mirror_params(params)


def test_mirror_parameters_parse() -> None:
    assert parse_mirror_params({"target": "mem:1M", "granularity": "1M", "rate": "10M", "pivot": "manual"}) \
        == ("mem:1M", MiB, 10 * MiB, True)
    assert parse_mirror_params({"target": "mem:1M"}) == ("mem:1M", 64 * KiB, None, False)


async def test_file_extents_tell_holes_from_data(tmp_path) -> None:
    path = make_file(str(tmp_path / "sparse.img"), 4 * MiB)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * (64 * KiB))
        f.seek(3 * MiB)
        f.write(b"y")
    storage = await open_storage(f"file:{path}")
    try:
        runs = await storage.extents(0, 4 * MiB)
        # contiguous, covering the range, alternating
        assert runs[0][0] == 0 and sum(r[1] for r in runs) == 4 * MiB
        for a, b in zip(runs, runs[1:], strict=False):
            assert a[0] + a[1] == b[0] and a[2] != b[2]
        data = [(o, n) for o, n, d in runs if d]
        assert any(o <= MiB < o + n for o, n in data)
        assert any(o <= 3 * MiB < o + n for o, n in data)
        assert not any(o <= 2 * MiB < o + n for o, n in data)   # a hole in between
        assert await storage.extents(MiB + 4096, 4096) == [(MiB + 4096, 4096, True)]
    finally:
        await storage.aclose()
    mem = await open_storage("mem:1M")
    assert await mem.extents(0, MiB) == [(0, MiB, True)]        # the default: all data
    await mem.aclose()


# ---- mirrors under guest writes ---------------------------------------------------------------

async def test_mirror_under_writes_pivots_and_loses_nothing(tmp_path, dataplane: str) -> None:
    # The guest writes all the time, before, during and after the pivot; a
    # slow target makes its writes land on blocks already copied.  Whatever
    # the guest wrote it reads back, now from the target.
    src = await open_storage("file:" + make_file(str(tmp_path / "src.img")))
    dst_path = make_file(str(tmp_path / "dst.img"), fill=b"\xee")   # not zeros: holes must be written
    device = BlkDevice(src, dataplane=dataplane)
    model = bytearray(DISK)
    async with device_pair(device) as vm:
        writer = Writer(vm, model).start()
        while writer.count < 20:
            await asyncio.sleep(0.001)
        target = FaultyStorage(await open_storage(f"file:{dst_path}"))
        target.delay(0.002, "write")
        jobs = Jobs(device)
        job = await jobs.start(target, granularity=GRAN)
        writes_at_start = writer.count
        await asyncio.wait_for(job.wait(), 60)
        writes_at_end = writer.count
        await asyncio.sleep(0.05)
        await writer.stop()
        assert job.phase == "done", job.describe()
        assert device.storage is target and device.dirty is None
        assert writes_at_end > writes_at_start, "the guest did not write during the copy"
        assert job.passes >= 2
        assert await guest_view(vm) == bytes(model)
    info = job.describe()
    assert info["dirty_bytes"] == 0 and info["progress"] == 1.0 and info["error"] is None
    assert info["pivot_pause_ms"] is not None and info["bytes_copied"] >= DISK
    with open(dst_path, "rb") as f:
        assert f.read() == bytes(model)


async def test_manual_pivot_target_equals_source_at_the_pivot(tmp_path, dataplane: str) -> None:
    # pivot=manual: the job copies while the guest writes, stays ready, and
    # switches only when told; the guest stops writing before that, so the
    # source (closed at the pivot) and the target must hash the same.
    src_path = make_file(str(tmp_path / "src.img"))
    dst_path = make_file(str(tmp_path / "dst.img"), fill=b"\x5a")
    src = await open_storage(f"file:{src_path}")
    device = BlkDevice(src, dataplane=dataplane)
    model = bytearray(DISK)
    async with device_pair(device) as vm:
        await guest_write(vm, 0, b"first" * 1024)
        model[0:5120] = b"first" * 1024
        writer = Writer(vm, model, seed=7).start()
        jobs = Jobs(device)
        job = await jobs.start(await open_storage(f"file:{dst_path}"), granularity=GRAN, manual=True)
        await wait_phase(job, "ready")
        await asyncio.sleep(0.05)              # ready, and the guest still writes
        await writer.stop()
        assert job.phase == "ready" and device.storage is src
        jobs.pivot()
        await asyncio.wait_for(job.wait(), 30)
        assert job.phase == "done" and device.storage.url == f"file:{dst_path}"
        assert sha(src_path) == sha(dst_path)
        assert await guest_view(vm) == bytes(model)
    assert sha(dst_path) == hashlib.sha256(bytes(model)).hexdigest()


async def test_sparse_source_holes_become_zeros_on_the_target(tmp_path, dataplane: str) -> None:
    src_path = make_file(str(tmp_path / "src.img"))
    with open(src_path, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"data" * 4096)
    dst_path = make_file(str(tmp_path / "dst.img"), DISK + MiB, fill=b"\xff")   # bigger: allowed
    device = BlkDevice(await open_storage(f"file:{src_path}"), dataplane=dataplane)
    async with device_pair(device) as vm:
        jobs = Jobs(device)
        job = await jobs.start(await open_storage(f"file:{dst_path}"), manual=True)
        await wait_phase(job, "ready")
        jobs.pivot()
        await job.wait()
        assert job.phase == "done"
        assert job.bytes_zeroed > DISK // 2, job.describe()
        assert await guest_read(vm, 3 * MiB, 16 * KiB) == b"data" * 4096
    with open(dst_path, "rb") as f:
        assert f.read(DISK) == open(src_path, "rb").read()
        assert f.read() == b"\xff" * MiB      # beyond the disk: untouched


@needs_qemu_nbd
async def test_mirror_file_to_nbd_changes_data_path(tmp_path, short_dir: str) -> None:
    # file: (native engine) -> nbd+unix:// (Python path) under writes; the
    # target is a real qemu-nbd, read back through its image file.
    src_path = make_file(str(tmp_path / "src.img"))
    nbd_img = make_file(str(tmp_path / "nbd.img"), fill=b"\x11")
    device = BlkDevice(await open_storage(f"file:{src_path}"))
    model = bytearray(DISK)
    with QemuNbdServer(nbd_img, socket_path=os.path.join(short_dir, "nbd.sock"), export="disk",
                       shared=4) as srv:
        async with device_pair(device) as vm:
            assert device.info()["dataplane"] == "native"
            writer = Writer(vm, model, seed=3).start()
            jobs = Jobs(device)
            job = await jobs.start(await open_storage(srv.url), granularity=GRAN, manual=True)
            await wait_phase(job, "ready")
            await writer.stop()
            jobs.pivot()
            await asyncio.wait_for(job.wait(), 30)
            assert job.phase == "done", job.describe()
            assert device.info()["dataplane"] == "python" and device.storage.url == srv.url
            assert sha(src_path) == hashlib.sha256(bytes(model)).hexdigest()
            assert await guest_view(vm) == bytes(model)
        with open(nbd_img, "rb") as f:
            assert f.read() == bytes(model)


# ---- failures and cancel ---------------------------------------------------------------------

async def test_target_failing_mid_copy_fails_the_job_and_the_guest_sees_nothing(tmp_path,
                                                                                  dataplane: str) -> None:
    src = await open_storage("file:" + make_file(str(tmp_path / "src.img"), fill=b"\x01"))
    inner = await open_storage("file:" + make_file(str(tmp_path / "dst.img")))
    target = FaultyStorage(inner)
    target.delay(0.001, "write")
    device = BlkDevice(src, dataplane=dataplane)
    model = bytearray(b"\x01" * DISK)
    async with device_pair(device) as vm:
        writer = Writer(vm, model).start()
        jobs = Jobs(device)
        job = await jobs.start(target, granularity=GRAN)
        async with asyncio.timeout(10):
            while target.calls["write"] < 3:
                await asyncio.sleep(0.001)
        target.fail_writes(None, errno=errno.ENOSPC)
        await asyncio.wait_for(job.wait(), 30)
        await asyncio.sleep(0.05)
        await writer.stop()
        assert job.phase == "failed"
        assert "writing the target" in job.error and "No space left on device" in job.error, job.error
        assert device.storage is src and device.dirty is None
        assert inner._closed, "the failed target was not closed"
        assert device.info()["stats"].get("errors", 0) == 0
        assert await guest_view(vm) == bytes(model)
        # and a new mirror may start afterwards
        job2 = await jobs.start(await open_storage("file:" + make_file(str(tmp_path / "dst2.img"))),
                                manual=True)
        await jobs.cancel()
        assert job2.phase == "cancelled"
        assert [j["phase"] for j in jobs.describe()] == ["failed", "cancelled"]


async def test_source_read_failure_fails_the_job(tmp_path) -> None:
    src = FaultyStorage(await open_storage("mem:8M"))
    device = BlkDevice(src, dataplane="python")
    async with device_pair(device):
        src.fail_reads(None)
        jobs = Jobs(device)
        job = await jobs.start(await open_storage("file:" + make_file(str(tmp_path / "dst.img"))))
        await asyncio.wait_for(job.wait(), 10)
        assert job.phase == "failed" and "reading the disk's storage mem:8M" in job.error, job.error
        assert device.storage is src and device.dirty is None


async def test_cancel_half_way_leaves_the_disk_on_its_source(tmp_path, dataplane: str) -> None:
    src = await open_storage("file:" + make_file(str(tmp_path / "src.img"), fill=b"\x02"))
    inner = await open_storage("file:" + make_file(str(tmp_path / "dst.img")))
    device = BlkDevice(src, dataplane=dataplane)
    model = bytearray(b"\x02" * DISK)
    async with device_pair(device) as vm:
        writer = Writer(vm, model).start()
        jobs = Jobs(device)
        job = await jobs.start(inner, granularity=GRAN, rate=4 * MiB)   # the first pass: 2 s
        async with asyncio.timeout(20):
            while job.bytes_copied < DISK * 3 // 10:
                await asyncio.sleep(0.005)
        assert job.phase == "copying" and job.passes == 0
        cancelled = await jobs.cancel()
        assert cancelled is job and job.phase == "cancelled"
        assert job.bytes_copied < DISK, job.describe()
        await writer.stop()
        assert device.storage is src and device.dirty is None and inner._closed
        with pytest.raises(ValueError, match="no mirror is running"):
            await jobs.cancel()
        assert await guest_view(vm) == bytes(model)


async def test_rate_limit_bounds_the_copy(tmp_path) -> None:
    # Not a speed test: a lower bound on the time a rate-limited copy takes,
    # which load on the machine can only lengthen.
    src = await open_storage("mem:4M")
    device = BlkDevice(src)
    async with device_pair(device) as vm:
        await guest_write(vm, 0, os.urandom(4 * MiB))
        jobs = Jobs(device)
        job = await jobs.start(await open_storage("file:" + make_file(str(tmp_path / "d.img"), 4 * MiB)),
                               rate=8 * MiB)
        await asyncio.wait_for(job.wait(), 30)
        assert job.phase == "done"
        # 4 MiB at 8 MiB/s, with a burst of at most 0.1 s worth: at least 0.35 s.
        assert job.describe()["elapsed"] >= 0.35, job.describe()


# ---- refusals -------------------------------------------------------------------------------

async def test_target_refusals_name_the_reason(tmp_path, short_dir: str) -> None:
    src_path = make_file(str(tmp_path / "src.img"))
    device = BlkDevice(await open_storage(f"file:{src_path}"))
    small = make_file(str(tmp_path / "small.img"), DISK - MiB)
    async with device_pair(device):
        jobs = Jobs(device)
        with pytest.raises(ValueError, match=rf"has {DISK - MiB} bytes, fewer than the disk's {DISK}"):
            await jobs.start_mirror({"target": f"file:{small}"})
        with pytest.raises(ValueError, match="opened read-only"):
            await jobs.start_mirror({"target": f"file:{small}?readonly=on"})
        with pytest.raises(ValueError, match="the disk's own storage"):
            await jobs.start_mirror({"target": src_path})
        with pytest.raises(ValueError, match="no such file"):
            await jobs.start_mirror({"target": str(tmp_path / "missing.img")})
        missing_sock = os.path.join(short_dir, "nobody.sock")
        with pytest.raises(Exception, match=r"cannot open the mirror target .*nobody\.sock"):
            await jobs.start_mirror({"target": f"nbd+unix:///disk?socket={missing_sock}"})
        await device.pause()
        with pytest.raises(ValueError, match="the disk is paused"):
            await jobs.start_mirror({"target": f"file:{make_file(str(tmp_path / 'ok.img'))}"})
        device.resume()
        assert jobs.current is None and device.dirty is None


@needs_qemu_nbd
async def test_read_only_nbd_export_is_refused(tmp_path, short_dir: str) -> None:
    img = make_file(str(tmp_path / "ro.img"))
    device = BlkDevice(await open_storage("mem:8M"))
    with QemuNbdServer(img, socket_path=os.path.join(short_dir, "ro.sock"), export="disk",
                       read_only=True) as srv:
        async with device_pair(device):
            with pytest.raises(ValueError, match="is read-only"):
                await Jobs(device).start_mirror({"target": srv.url})


# ---- the control commands ----------------------------------------------------------------------

@pytest.fixture
async def controlled(tmp_path, short_dir: str) -> AsyncIterator[tuple[BlkDevice, str, VirtioFrontend]]:
    device = BlkDevice(await open_storage("file:" + make_file(str(tmp_path / "src.img"))))
    ctl = os.path.join(short_dir, "blk.ctl")
    server = ControlServer(ctl, control_handlers(device))
    await server.start()
    try:
        async with device_pair(device) as vm:
            yield device, ctl, vm
    finally:
        await server.close()


async def test_control_mirror_jobs_info_and_refusals_while_it_runs(controlled, tmp_path) -> None:
    device, ctl, vm = controlled
    dst = make_file(str(tmp_path / "dst.img"))
    reply = await control_request(ctl, {"command": "mirror", "target": f"file:{dst}", "rate": "8M",
                                        "granularity": "128K"})
    assert reply["ok"], reply
    job = reply["job"]
    assert (job["id"], job["type"], job["phase"], job["target"]) == (1, "mirror", "copying", f"file:{dst}")
    assert job["granularity"] == 128 * KiB and job["rate_limit"] == 8 * MiB and job["size"] == DISK
    for command, extra in [("swap", {"backend": "mem:8M"}), ("pause", {}), ("resume", {}),
                           ("resize", {}), ("mirror", {"target": f"file:{dst}"})]:
        r = await control_request(ctl, {"command": command, **extra})
        assert not r["ok"], (command, r)
        assert "mirror" in r["error"] and "running" in r["error"], (command, r)
    await asyncio.sleep(0.2)
    info = await control_request(ctl, {"command": "info"})
    m = info["mirror"]
    assert m["phase"] == "copying" and 0 < m["bytes_copied"] < DISK, m
    assert m["dirty_bytes"] > 0 and 0 < m["progress"] < 1 and m["rate"] > 0, m
    jobs = await control_request(ctl, {"command": "jobs"})
    assert [j["id"] for j in jobs["jobs"]] == [1]
    r = await control_request(ctl, {"command": "pivot"})
    assert not r["ok"] and "pivots by itself" in r["error"], r
    r = await control_request(ctl, {"command": "cancel"})
    assert r["ok"] and r["job"]["phase"] == "cancelled" and r["backend"] == device.storage.url, r
    assert not device.paused and device.dirty is None
    # after the cancel everything works again
    r = await control_request(ctl, {"command": "pause"})
    assert r["ok"]
    r = await control_request(ctl, {"command": "resume"})
    assert r["ok"]


async def test_control_manual_mirror_pivots_on_request(controlled, tmp_path) -> None:
    device, ctl, vm = controlled
    dst = make_file(str(tmp_path / "dst.img"))
    await guest_write(vm, 5 * MiB, b"keep" * 1024)
    r = await control_request(ctl, {"command": "mirror", "target": f"file:{dst}", "pivot": "manual"})
    assert r["ok"] and r["job"]["pivot"] == "manual", r
    async with asyncio.timeout(20):
        while (await control_request(ctl, {"command": "jobs"}))["jobs"][-1]["phase"] != "ready":
            await asyncio.sleep(0.01)
    assert device.storage.url != f"file:{dst}"
    r = await control_request(ctl, {"command": "pivot"})
    assert r["ok"], r
    async with asyncio.timeout(20):
        while (await control_request(ctl, {"command": "jobs"}))["jobs"][-1]["phase"] != "done":
            await asyncio.sleep(0.01)
    info = await control_request(ctl, {"command": "info"})
    assert info["backend"] == f"file:{dst}" and info["mirror"]["phase"] == "done", info
    assert info["mirror"]["pivot_pause_ms"] is not None
    assert await guest_read(vm, 5 * MiB, 4 * KiB) == b"keep" * 1024


async def test_control_relative_paths_and_unknown_keys_are_refused(controlled) -> None:
    device, ctl, _vm = controlled
    for request, error in [
        ({"command": "mirror", "target": "dst.img"}, "relative path 'dst.img'"),
        ({"command": "mirror", "target": "nbd+unix:///d?socket=rel.sock"}, "relative socket 'rel.sock'"),
        ({"command": "swap", "backend": "file:x/y.img"}, "relative path 'x/y.img'"),
        ({"command": "swap", "backend": "mem:1G", "queues": "4"}, "swap: unknown parameter 'queues'"),
        ({"command": "mirror", "target": "mem:8M", "speed": "1"}, "mirror: unknown parameter 'speed'"),
        ({"command": "info", "verbose": "1"}, "info: unknown parameter 'verbose' (info takes: no parameters)"),
    ]:
        r = await control_request(ctl, request)
        assert not r["ok"] and error in r["error"], (request, r)
    assert device.storage.url.startswith("file:") and not device.paused


async def test_swap_after_pause_says_it_resumed(controlled) -> None:
    device, ctl, _vm = controlled
    r = await control_request(ctl, {"command": "swap", "backend": "mem:8M"})
    assert r["ok"] and r["resumed"] is False and "note" not in r, r
    await control_request(ctl, {"command": "pause"})
    r = await control_request(ctl, {"command": "swap", "backend": "mem:8M"})
    assert r["ok"] and r["resumed"] is True and r["paused"] is False, r
    assert "swap resumed it" in r["note"]


async def test_info_reports_requests_held_by_a_pause_apart(tmp_path, dataplane: str) -> None:
    # A request the guest sends during a pause waits (parked at the gate on
    # the Python path, left in the ring on the native one): it is "held",
    # not "inflight".
    device = BlkDevice(await open_storage("file:" + make_file(str(tmp_path / "d.img"))),
                       dataplane=dataplane)
    async with device_pair(device) as vm:
        await guest_write(vm, 0, b"a" * SECTOR)
        await device.pause()
        for n in range(3):
            vm.post(0, [_header(1, n), Buffer.readable(b"z" * SECTOR), Buffer.writable(1)])
        async with asyncio.timeout(5):
            while device.info()["held"] < 3:
                await asyncio.sleep(0.002)
        info = device.info()
        assert (info["held"], info["inflight"], info["paused"]) == (3, 0, True), info
        device.resume()
        used = await vm.wait_used(0, 3)
        assert [u.written[-1] for u in used] == [0, 0, 0]
        info = device.info()
        assert (info["held"], info["inflight"], info["paused"]) == (0, 0, False), info


async def test_filestorage_is_not_copied_through_its_own_fd_when_direct_misaligned(tmp_path) -> None:
    # O_DIRECT with a granularity below the logical block falls back to the
    # storage API path (which bounces); the copy is still exact.
    src_path = make_file(str(tmp_path / "s.img"), fill=b"ab")
    src = await open_storage(f"file:{src_path}")
    assert isinstance(src, FileStorage)
    device = BlkDevice(src)
    dst_path = make_file(str(tmp_path / "d.img"))
    async with device_pair(device):
        jobs = Jobs(device)
        target: Storage = await open_storage(f"file:{dst_path}?direct=on")
        job = await jobs.start(target, granularity=512, manual=True)
        assert (job._files is None) == (target.block_size > 512)
        await wait_phase(job, "ready")
        jobs.pivot()
        await job.wait()
        assert job.phase == "done", job.describe()
    assert sha(src_path) == sha(dst_path)


@pytest.fixture
def small_tmpfs(short_dir: str) -> Iterator[str]:
    """A 2 MiB tmpfs: a real file system that fills up (ENOSPC) mid-copy."""
    import subprocess

    mnt = os.path.join(short_dir, "small")
    os.mkdir(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


async def test_file_target_that_fills_up_fails_the_job(tmp_path, small_tmpfs: str, dataplane: str) -> None:
    # The file-to-file path (a worker copies whole words): the target's file
    # system runs out of space after 2 MiB of the 8 MiB disk.
    src_path = make_file(str(tmp_path / "src.img"), fill=b"\x03")
    dst_path = make_file(os.path.join(small_tmpfs, "dst.img"))
    device = BlkDevice(await open_storage(f"file:{src_path}"), dataplane=dataplane)
    model = bytearray(b"\x03" * DISK)
    async with device_pair(device) as vm:
        writer = Writer(vm, model).start()
        jobs = Jobs(device)
        target = await open_storage(f"file:{dst_path}")
        job = await jobs.start(target)
        assert job._files is not None
        await asyncio.wait_for(job.wait(), 30)
        await writer.stop()
        assert job.phase == "failed", job.describe()
        assert "writing the target" in job.error and "No space left on device" in job.error, job.error
        assert device.storage.url == f"file:{src_path}" and device.dirty is None
        assert await guest_view(vm) == bytes(model)
    assert sha(src_path) == hashlib.sha256(bytes(model)).hexdigest()


async def test_cancel_while_the_pivot_waits_for_its_pause_lets_io_go(tmp_path) -> None:
    # The pivot's pause waits for a write stuck on storage; a cancel then
    # must not leave the guest's I/O held (pause cut short, resumed).
    src = FaultyStorage(await open_storage("mem:8M"))
    device = BlkDevice(src, dataplane="python")
    async with device_pair(device) as vm:
        jobs = Jobs(device)
        job = await jobs.start(await open_storage("file:" + make_file(str(tmp_path / "d.img"))), manual=True)
        await wait_phase(job, "ready")
        src.pause("write")
        stuck = asyncio.ensure_future(guest_write(vm, 0, b"s" * SECTOR))
        async with asyncio.timeout(5):
            while not src.in_flight and src.calls["write"] < 1:
                await asyncio.sleep(0.002)
        jobs.pivot()
        await wait_phase(job, "pivoting")
        await asyncio.sleep(0.05)                   # the pause is waiting for the stuck write
        assert device.paused and job.phase == "pivoting"
        await jobs.cancel()
        assert job.phase == "cancelled" and not device.paused and device.storage is src
        src.resume()
        await asyncio.wait_for(stuck, 5)
        await asyncio.wait_for(guest_write(vm, SECTOR, b"t" * SECTOR), 5)    # I/O flows again
        assert await guest_read(vm, 0, 2 * SECTOR) == b"s" * SECTOR + b"t" * SECTOR
