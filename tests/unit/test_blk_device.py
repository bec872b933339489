"""virtio-blk in-process: BlkDevice served by `device_pair`, driven by a VirtioFrontend.

Every test goes through the real stack (Unix socket, vhost-user handshake,
memfd guest memory, split rings).  `FaultyStorage` counts storage calls, so
the error-path tests prove a malformed request never reached storage, and
injects failures, delays and pauses for the storage-failure, multi-queue and
live-swap tests.  The NBD storage is tested against a real ``qemu-nbd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from backends.blk import control_handlers
from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage, Storage, open_storage
from backends.blk.storage.testing import FaultyStorage, QemuNbdServer
from vdev.control import ControlServer, control_request
from vdev.device import serve
from vdev.testing import Buffer, Used, VirtioFrontend, device_pair
from vhost_user.messages import BackendReq

# ---- the wire format, spelled out here rather than imported ------------------------------

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_RO, F_BLK_SIZE, F_FLUSH, F_CONFIG_WCE, F_MQ, F_DISCARD, F_WRITE_ZEROES = (
    1 << 5, 1 << 6, 1 << 9, 1 << 11, 1 << 12, 1 << 13, 1 << 14)
UNMAP = 1
SECTOR = 512
MiB = 1 << 20
POISON = 0xAA          # DriverQueue fills writable buffers with it before posting
# struct virtio_blk_config up to write_zeroes_may_unmap, padded to 60 bytes
CONFIG_LAYOUT = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_FIELDS = ("capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
                 "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "wce",
                 "unused", "num_queues", "max_discard_sectors", "max_discard_seg",
                 "discard_sector_alignment", "max_write_zeroes_sectors", "max_write_zeroes_seg",
                 "write_zeroes_may_unmap")



@pytest.fixture(autouse=True, params=["python", "auto"])
def dataplane(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both data paths: the Python reference, and the native
    engine wherever the storage has one (null, mem, file)."""
    monkeypatch.setattr(BlkDevice, "default_dataplane", request.param)
    return str(request.param)


needs_qemu_nbd = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")


def _is_tmpfs(path: str) -> bool:
    # statfs f_type TMPFS_MAGIC, read from /proc/mounts (os has no statfs)
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        return any(line.split()[1:3] == [path, "tmpfs"] for line in f)
    return False


# A file on tmpfs takes the native engine's own path (preadv/pwritev in the
# worker, not io_uring, which would punt every request to an io-wq thread).
needs_tmpfs = pytest.mark.skipif(not _is_tmpfs("/dev/shm"), reason="/dev/shm is not a tmpfs")


def header(rtype: int, sector: int = 0) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


def segment(sector: int, nsect: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, nsect, flags)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13 + i // 251) & 0xFF for i in range(n))


def status(used: Used) -> int:
    return used.written[-1]


def write_req(sector: int, data: bytes) -> list[Buffer]:
    return [header(T_OUT, sector), Buffer.readable(data), Buffer.writable(1)]


def read_req(sector: int, n: int) -> list[Buffer]:
    return [header(T_IN, sector), Buffer.writable(n), Buffer.writable(1)]


async def write(vm: VirtioFrontend, sector: int, data: bytes, q: int = 0) -> Used:
    return await vm.request(q, write_req(sector, data))


async def read(vm: VirtioFrontend, sector: int, n: int, q: int = 0) -> Used:
    return await vm.request(q, read_req(sector, n))


async def read_ok(vm: VirtioFrontend, sector: int, n: int, q: int = 0) -> bytes:
    used = await read(vm, sector, n, q)
    assert (status(used), used.length) == (S_OK, n + 1)
    return used.written[:n]


async def write_ok(vm: VirtioFrontend, sector: int, data: bytes, q: int = 0) -> None:
    used = await write(vm, sector, data, q)
    assert (status(used), used.length) == (S_OK, 1)


async def config(vm: VirtioFrontend) -> dict[str, int]:
    raw = await vm.fe.get_config(0, CONFIG_LAYOUT.size)
    assert len(raw) == 60
    return dict(zip(CONFIG_FIELDS, CONFIG_LAYOUT.unpack(raw)))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


async def direct_read(storage: Storage, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    await storage.readv(offset, [memoryview(buf)])
    return bytes(buf)


async def no_backend_request(vm: VirtioFrontend) -> None:
    await asyncio.sleep(0.05)
    assert vm.fe.backend_requests.empty()


# ---- storages -------------------------------------------------------------------------------

DISK = 1 * MiB
KINDS = ["mem", "null", "file", pytest.param("tmpfs", marks=needs_tmpfs),
         pytest.param("nbd", marks=needs_qemu_nbd)]


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="vdev-blk-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_image(path: str, size: int = DISK) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def storage_url(request: pytest.FixtureRequest, tmp_path, short_dir: str) -> Iterator[str]:
    kind = request.param
    if kind == "mem":
        yield f"mem:{DISK}"
    elif kind == "null":
        yield f"null:{DISK}"
    elif kind == "file":
        yield "file:" + make_image(str(tmp_path / "disk.img"))
    elif kind == "tmpfs":
        fd, image = tempfile.mkstemp(prefix="vdev-blk-test-", suffix=".img", dir="/dev/shm")
        os.close(fd)
        try:
            yield "file:" + make_image(image)
        finally:
            os.unlink(image)
    else:
        image = make_image(str(tmp_path / "nbd.img"))
        sock = os.path.join(short_dir, "nbd.sock")
        # qemu-nbd --socket=S --format=raw --export-name=disk --persistent --shared=4 IMG
        with QemuNbdServer(image, socket_path=sock, export="disk", shared=4) as srv:
            assert os.path.exists(sock)
            yield srv.url


@pytest.fixture
async def opened(storage_url: str) -> AsyncIterator[Storage]:
    storage = await open_storage(storage_url)
    try:
        yield storage
    finally:
        await storage.aclose()


def is_null(storage: Storage) -> bool:
    return storage.url.startswith("null:")


all_storages = pytest.mark.parametrize("storage_url", KINDS, indirect=True)


# ---- every request type on every storage -------------------------------------------------------

@all_storages
async def test_out_then_in_returns_the_data(opened: Storage) -> None:
    data = pattern(8 * SECTOR)
    async with device_pair(BlkDevice(opened)) as vm:
        await write_ok(vm, 16, data)
        got = await read_ok(vm, 16, len(data))
        assert got == (bytes(len(data)) if is_null(opened) else data)
        # neighbours untouched, and the last sector of the disk is reachable
        assert await read_ok(vm, 15, SECTOR) == bytes(SECTOR)
        last = DISK // SECTOR - 1
        await write_ok(vm, last, pattern(SECTOR, 5))
        assert await read_ok(vm, last, SECTOR) == (bytes(SECTOR) if is_null(opened) else pattern(SECTOR, 5))


@all_storages
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
async def test_multi_descriptor_data(opened: Storage, indirect: bool) -> None:
    data = pattern(4 * SECTOR, 3)
    async with device_pair(BlkDevice(opened)) as vm:
        # OUT: data split over three readable buffers at unaligned boundaries
        used = await vm.request(0, [header(T_OUT, 40), Buffer.readable(data[:100]),
                                    Buffer.readable(data[100:1500]), Buffer.readable(data[1500:]),
                                    Buffer.writable(1)],
                                indirect=indirect)
        assert (status(used), used.length) == (S_OK, 1)
        # IN: into three writable buffers, the status byte in a buffer of its own
        used = await vm.request(0, [header(T_IN, 40), Buffer.writable(SECTOR), Buffer.writable(1000),
                                    Buffer.writable(4 * SECTOR - SECTOR - 1000), Buffer.writable(1)],
                                indirect=indirect)
        assert (status(used), used.length) == (S_OK, 4 * SECTOR + 1)
        assert used.written[:-1] == (bytes(len(data)) if is_null(opened) else data)
        # header + data in one readable buffer, data + status in one writable buffer
        hdr = struct.pack("<IIQ", T_OUT, 0, 60)
        used = await vm.request(0, [Buffer.readable(hdr + data), Buffer.writable(1)], indirect=indirect)
        assert (status(used), used.length) == (S_OK, 1)
        used = await vm.request(0, [header(T_IN, 60), Buffer.writable(len(data) + 1)], indirect=indirect)
        assert (status(used), used.length) == (S_OK, len(data) + 1)
        assert used.written[:-1] == (bytes(len(data)) if is_null(opened) else data)


@pytest.mark.parametrize("storage_url", ["mem", "file"], indirect=True)
async def test_seg_max_segments_in_an_indirect_table_longer_than_the_queue(opened: Storage) -> None:
    """QEMU's vhost-user-blk-pci rings hold 128 descriptors, and the device
    advertises seg_max 254: Linux then puts up to 256 data segments, plus the
    header and the status, in one indirect table (it checks a chain against
    the ring size only without indirect descriptors).  Such a request was
    returned unanswered, and the guest took the stale status byte for OK: a
    lost write under writeback."""
    async with device_pair(BlkDevice(opened), queue_size=128) as vm:
        seg_max = (await config(vm))["seg_max"]
        assert seg_max + 2 > 128
        data = pattern(seg_max * SECTOR, 9)
        pieces = [Buffer.readable(data[i:i + SECTOR]) for i in range(0, len(data), SECTOR)]
        used = await vm.request(0, [header(T_OUT, 8), *pieces, Buffer.writable(1)], indirect=True)
        assert (status(used), used.length) == (S_OK, 1)
        used = await vm.request(0, [header(T_IN, 8), *[Buffer.writable(SECTOR)] * seg_max,
                                    Buffer.writable(1)], indirect=True)
        assert (status(used), used.length) == (S_OK, len(data) + 1)
        assert used.written[:-1] == data


async def test_data_buffer_across_adjacent_regions() -> None:
    """A data buffer may run from one memory region into the next (adjacent
    regions, as hot-plugged memory gives): it is two pieces of host memory.
    Seven one-sector buffers come first, so the crossing buffer's second
    piece is the ninth: the native engine's inline iovec array (8) fills
    inside that buffer, and mapping goes on there once the array has grown."""
    boundary = 1 * MiB
    async with device_pair(BlkDevice(MemoryStorage(DISK)),
                           regions=[(0, boundary), (boundary, 64 * 1024)]) as vm:
        q = vm.queues[0]
        data = pattern(9 * SECTOR, 3)
        across = boundary - SECTOR                  # two sectors: one in each region

        def chain(rtype: int) -> tuple[list[tuple[int, int, bool]], list[int], int]:
            hdr, st = q.alloc.alloc(16), q.alloc.alloc(16)
            vm.mem.write(hdr, struct.pack("<IIQ", rtype, 0, 8))
            vm.mem.write(st, bytes([POISON]))
            sectors = [q.alloc.alloc(SECTOR) for _ in range(7)]
            w = rtype == T_IN
            return ([(hdr, 16, False), *[(a, SECTOR, w) for a in sectors], (across, 2 * SECTOR, w),
                     (st, 1, True)], sectors, st)

        bufs, sectors, st = chain(T_OUT)
        for k, a in enumerate(sectors):
            vm.mem.write(a, data[k * SECTOR:(k + 1) * SECTOR])
        vm.mem.write(across, data[7 * SECTOR:])
        q.add_chain_at(bufs)
        vm.kick(0)
        (used,) = await vm.wait_used(0, 1)
        assert (used.length, vm.mem.read(st, 1)) == (1, bytes([S_OK]))
        assert await read_ok(vm, 8, len(data)) == data          # on the disk in order

        bufs, sectors, st = chain(T_IN)
        vm.mem.write(across, bytes([POISON]) * 2 * SECTOR)
        q.add_chain_at(bufs)
        vm.kick(0)
        (used,) = await vm.wait_used(0, 1)
        assert (used.length, vm.mem.read(st, 1)) == (len(data) + 1, bytes([S_OK]))
        got = b"".join(vm.mem.read(a, SECTOR) for a in sectors) + vm.mem.read(across, 2 * SECTOR)
        assert got == data


@all_storages
async def test_flush(opened: Storage) -> None:
    async with device_pair(BlkDevice(opened)) as vm:
        await write_ok(vm, 0, pattern(SECTOR))
        used = await vm.request(0, [header(T_FLUSH), Buffer.writable(1)])
        assert (used.length, used.written) == (1, bytes([S_OK]))


@all_storages
async def test_get_id_explicit_serial(opened: Storage) -> None:
    async with device_pair(BlkDevice(opened, serial="disk-42")) as vm:
        used = await vm.request(0, [header(T_GET_ID), Buffer.writable(20), Buffer.writable(1)])
        assert used.length == 21
        assert used.written == b"disk-42" + bytes(13) + bytes([S_OK])
    # a full-length serial has no NUL at all
    async with device_pair(BlkDevice(MemoryStorage(DISK), serial="S" * 20)) as vm:
        used = await vm.request(0, [header(T_GET_ID), Buffer.writable(20), Buffer.writable(1)])
        assert (used.written, used.length) == (b"S" * 20 + bytes([S_OK]), 21)


@all_storages
async def test_get_id_default_serial(opened: Storage) -> None:
    async with device_pair(BlkDevice(opened)) as vm:
        used = await vm.request(0, [header(T_GET_ID), Buffer.writable(20), Buffer.writable(1)])
        assert (status(used), used.length) == (S_OK, 21)
        ident = used.written[:20]
        assert ident.startswith(b"vdev-")
        assert ident.rstrip(b"\0").isascii() and len(ident.rstrip(b"\0")) > len(b"vdev-")
        # split over two writable buffers: same bytes
        used = await vm.request(0, [header(T_GET_ID), Buffer.writable(7), Buffer.writable(13),
                                    Buffer.writable(1)])
        assert used.written[:20] == ident
    # the default is stable for one URL and differs between URLs
    for url, same in ((opened.url, True), (opened.url + "x", False)):
        async with device_pair(BlkDevice(MemoryStorage(DISK, url=url))) as vm:
            used = await vm.request(0, [header(T_GET_ID), Buffer.writable(20), Buffer.writable(1)])
            assert used.written[:5] == b"vdev-"
            assert (used.written[:20] == ident) is same


@all_storages
async def test_discard_then_read(opened: Storage) -> None:
    data = pattern(16 * SECTOR, 9)
    async with device_pair(BlkDevice(opened)) as vm:
        assert vm.features & F_DISCARD
        await write_ok(vm, 0, data)
        used = await vm.request(0, [header(T_DISCARD), Buffer.readable(segment(4, 8)), Buffer.writable(1)])
        assert (used.length, used.written) == (1, bytes([S_OK]))
        got = await read_ok(vm, 0, len(data))
        if opened.url.startswith(("mem:", "file:")):
            # the discarded range reads as zeros, the rest is kept
            assert got == data[:4 * SECTOR] + bytes(8 * SECTOR) + data[12 * SECTOR:]
        elif is_null(opened):
            assert got == bytes(len(data))
        else:
            # NBD: discard is advisory; the untouched sectors must stay
            assert got[:4 * SECTOR] == data[:4 * SECTOR] and got[12 * SECTOR:] == data[12 * SECTOR:]


@all_storages
@pytest.mark.parametrize("flags", [0, UNMAP], ids=["plain", "unmap"])
async def test_write_zeroes_then_read(opened: Storage, flags: int) -> None:
    data = pattern(16 * SECTOR, 11)
    async with device_pair(BlkDevice(opened)) as vm:
        assert vm.features & F_WRITE_ZEROES
        await write_ok(vm, 0, data)
        # two segments in one request
        segs = segment(2, 3, flags) + segment(10, 4, flags)
        used = await vm.request(0, [header(T_WRITE_ZEROES), Buffer.readable(segs), Buffer.writable(1)])
        assert (used.length, used.written) == (1, bytes([S_OK]))
        got = await read_ok(vm, 0, len(data))
        if is_null(opened):
            assert got == bytes(len(data))
        else:
            expected = bytearray(data)
            expected[2 * SECTOR:5 * SECTOR] = bytes(3 * SECTOR)
            expected[10 * SECTOR:14 * SECTOR] = bytes(4 * SECTOR)
            assert got == bytes(expected)


# ---- config space and features --------------------------------------------------------------------

async def test_config_space() -> None:
    async with device_pair(BlkDevice(MemoryStorage(3 * MiB), queue_size=128)) as vm:
        cfg = await config(vm)
        assert cfg["capacity"] == 3 * MiB // SECTOR
        assert cfg["blk_size"] == 512
        assert cfg["seg_max"] == 126          # queue size minus header and status
        assert cfg["size_max"] > 0
        assert cfg["num_queues"] == 1
        assert cfg["wce"] == 1                # writeback by default
        assert cfg["max_discard_sectors"] > 0 and 1 <= cfg["max_discard_seg"] <= 256
        assert cfg["discard_sector_alignment"] >= 1
        assert cfg["max_write_zeroes_sectors"] > 0 and cfg["max_write_zeroes_seg"] >= 1
        assert cfg["write_zeroes_may_unmap"] == 1
        # a partial read at an offset gives the same bytes
        assert await vm.fe.get_config(36, 4) == struct.pack("<I", cfg["max_discard_sectors"])
        # the advertised max_discard_seg is accepted (one more is in BAD_REQUESTS)
        n = cfg["max_discard_seg"]
        ok = await vm.request(0, [header(T_DISCARD), Buffer.readable(b"".join(segment(i, 1) for i in range(n))),
                                  Buffer.writable(1)])
        assert status(ok) == S_OK


@pytest.mark.parametrize("queues", [1, 2, 4])
async def test_num_queues_and_mq(queues: int) -> None:
    async with device_pair(BlkDevice(MemoryStorage(DISK), num_queues=queues)) as vm:
        assert (await config(vm))["num_queues"] == queues
        assert bool(vm.features & F_MQ) == (queues > 1)
        assert len(vm.queues) == queues
        for q in range(queues):       # every queue serves requests
            await write_ok(vm, q, pattern(SECTOR, q), q=q)
        for q in range(queues):
            assert await read_ok(vm, q, SECTOR, q=(q + 1) % queues) == pattern(SECTOR, q)


async def test_features_read_write_mem() -> None:
    async with device_pair(BlkDevice(MemoryStorage(DISK))) as vm:
        f = vm.features
        assert not f & F_RO
        assert f & F_DISCARD and f & F_WRITE_ZEROES
        assert f & F_FLUSH and f & F_BLK_SIZE and f & F_CONFIG_WCE


@pytest.mark.parametrize("how", ["option", "storage"])
async def test_read_only_offers_ro(how: str) -> None:
    if how == "option":
        device = BlkDevice(MemoryStorage(DISK), read_only=True)
    else:
        device = BlkDevice(await open_storage("mem:1M?readonly=on"))
    async with device_pair(device) as vm:
        assert vm.features & F_RO
        assert device.info()["read_only"] is True
        used = await write(vm, 0, pattern(SECTOR))
        assert (used.length, status(used)) == (1, S_IOERR)
        assert await read_ok(vm, 0, SECTOR) == bytes(SECTOR)


# ---- error paths: answered without touching storage --------------------------------------------------

@pytest.fixture
def faulty() -> FaultyStorage:
    return FaultyStorage(MemoryStorage(DISK))


LAST = DISK // SECTOR
BAD_REQUESTS = {
    "read-past-capacity": ([header(T_IN, LAST), Buffer.writable(SECTOR), Buffer.writable(1)], S_IOERR),
    "read-far-past-capacity": ([header(T_IN, 1 << 60), Buffer.writable(SECTOR), Buffer.writable(1)], S_IOERR),
    "read-straddling-end": ([header(T_IN, LAST - 1), Buffer.writable(2 * SECTOR), Buffer.writable(1)],
                            S_IOERR),
    "write-straddling-end": (write_req(LAST - 1, pattern(2 * SECTOR)), S_IOERR),
    "read-not-sector-multiple": ([header(T_IN, 0), Buffer.writable(SECTOR + 100), Buffer.writable(1)],
                                 S_IOERR),
    "write-not-sector-multiple": (write_req(0, pattern(100)), S_IOERR),
    "unknown-type-99": ([header(99), Buffer.writable(1)], S_UNSUPP),
    "unknown-type-99-with-data": ([header(99), Buffer.readable(pattern(SECTOR)), Buffer.writable(1)],
                                  S_UNSUPP),
    "discard-with-unmap": ([header(T_DISCARD), Buffer.readable(segment(0, 8, UNMAP)), Buffer.writable(1)],
                           S_UNSUPP),
    "write-zeroes-unknown-flag": ([header(T_WRITE_ZEROES), Buffer.readable(segment(0, 8, 2)),
                                   Buffer.writable(1)], S_UNSUPP),
    "too-many-discard-segments": ([header(T_DISCARD),
                                   Buffer.readable(b"".join(segment(i, 1) for i in range(17))),
                                   Buffer.writable(1)], S_IOERR),
    "discard-past-capacity": ([header(T_DISCARD), Buffer.readable(segment(LAST - 1, 2)), Buffer.writable(1)],
                              S_IOERR),
    "discard-ragged-payload": ([header(T_DISCARD), Buffer.readable(segment(0, 1)[:10]), Buffer.writable(1)],
                               S_IOERR),
    "write-zeroes-empty-payload": ([header(T_WRITE_ZEROES), Buffer.writable(1)], S_IOERR),
    "short-header": ([Buffer.readable(struct.pack("<II", T_IN, 0)), Buffer.writable(SECTOR),
                      Buffer.writable(1)], S_IOERR),
    "no-header": ([Buffer.writable(1)], S_IOERR),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_request_answered_without_storage(faulty: FaultyStorage, case: str) -> None:
    buffers, expected = BAD_REQUESTS[case]
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        used = await vm.request(0, buffers)
        assert used.length == 1
        assert status(used) == expected
        # the data buffers were not written (still the driver's poison)
        assert set(used.written[:-1]) <= {POISON}
        assert sum(faulty.calls.values()) == 0, faulty.history
        assert device.info()["stats"]["rejected"] == 1
        # and the queue goes on
        await write_ok(vm, 0, pattern(SECTOR))
        assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)


async def test_out_on_read_only_is_ioerr_without_storage(faulty: FaultyStorage) -> None:
    async with device_pair(BlkDevice(faulty, read_only=True)) as vm:
        for buffers in (write_req(0, pattern(SECTOR)),
                        [header(T_DISCARD), Buffer.readable(segment(0, 1)), Buffer.writable(1)],
                        [header(T_WRITE_ZEROES), Buffer.readable(segment(0, 1)), Buffer.writable(1)]):
            used = await vm.request(0, buffers)
            assert (used.length, status(used)) == (1, S_IOERR)
        assert sum(faulty.calls.values()) == 0
        assert await read_ok(vm, 0, SECTOR) == bytes(SECTOR)
        assert faulty.calls["read"] == 1


async def test_chain_without_writable_byte_returned_with_zero_length(faulty: FaultyStorage) -> None:
    async with device_pair(BlkDevice(faulty)) as vm:
        used = await vm.request(0, [header(T_OUT, 0), Buffer.readable(pattern(SECTOR))])
        assert (used.length, used.written) == (0, b"")
        used = await vm.request(0, [header(T_FLUSH)])
        assert used.length == 0
        assert sum(faulty.calls.values()) == 0
        assert await read_ok(vm, 0, SECTOR) == bytes(SECTOR)       # the write never happened
        await write_ok(vm, 0, pattern(SECTOR))
        assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)


@pytest.mark.parametrize("op, buffers", [
    ("read", read_req(0, SECTOR)),
    ("write", write_req(0, pattern(SECTOR))),
    ("flush", [header(T_FLUSH), Buffer.writable(1)]),
    ("discard", [header(T_DISCARD), Buffer.readable(segment(0, 1)), Buffer.writable(1)]),
    ("write_zeroes", [header(T_WRITE_ZEROES), Buffer.readable(segment(0, 1)), Buffer.writable(1)]),
])
async def test_storage_failure_is_ioerr_for_that_request_only(faulty: FaultyStorage, op: str,
                                                              buffers: list[Buffer]) -> None:
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        faulty.fail(op)
        used = await vm.request(0, buffers)
        assert (used.length, status(used)) == (1, S_IOERR)
        assert faulty.calls[op] == 1
        used = await vm.request(0, buffers)
        assert status(used) == S_OK
        assert faulty.calls[op] == 2
        assert device.info()["stats"]["errors"] == 1


async def test_storage_failures_counted(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR))
        faulty.fail_reads(count=2)
        faulty.fail_writes()
        faulty.fail_flushes()
        assert status(await read(vm, 0, SECTOR)) == S_IOERR
        assert status(await read(vm, 0, SECTOR)) == S_IOERR
        assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)
        assert status(await write(vm, 1, pattern(SECTOR, 2))) == S_IOERR
        await write_ok(vm, 1, pattern(SECTOR, 2))
        flush = [header(T_FLUSH), Buffer.writable(1)]
        assert status(await vm.request(0, flush)) == S_IOERR
        assert status(await vm.request(0, flush)) == S_OK
        stats = device.info()["stats"]
        assert stats["errors"] == 4
        assert stats.get("rejected", 0) == 0
        # an ENOTSUP failure is answered UNSUPP
        faulty.fail_flushes(errno=errno.EOPNOTSUPP)
        used = await vm.request(0, flush)
        assert (used.length, status(used)) == (1, S_UNSUPP)
        assert device.info()["stats"]["errors"] == 5


async def test_failed_read_does_not_report_data_written(faulty: FaultyStorage) -> None:
    async with device_pair(BlkDevice(faulty)) as vm:
        faulty.fail_reads()
        used = await read(vm, 0, 4 * SECTOR)
        assert used.length == 1            # only the status byte counts as written
        assert status(used) == S_IOERR


async def test_burst_of_mixed_requests_loses_no_descriptor(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty)
    faulty.delay(0.001, "write")             # completions come back out of order
    faulty.fail("read", count=15)
    kinds = ["write", "read", "unsupp", "past-end", "no-status", "flush", "zeroes"]
    async with device_pair(device, queue_size=64) as vm:
        total = 0
        returned: list[int] = []
        statuses: dict[str, list[int]] = {k: [] for k in kinds}
        i = 0
        while i < 300:
            posted: dict[int, str] = {}
            for _ in range(18):                # up to 3 descriptors each: 54 of 64
                if i == 300:
                    break
                kind = kinds[i % len(kinds)]
                if kind == "write":
                    bufs = write_req(i % 64, pattern(SECTOR, i))
                elif kind == "read":
                    bufs = read_req(i % 64, SECTOR)
                elif kind == "unsupp":
                    bufs = [header(99), Buffer.writable(1)]
                elif kind == "past-end":
                    bufs = read_req(LAST, SECTOR)
                elif kind == "no-status":
                    bufs = [header(T_OUT, 0), Buffer.readable(pattern(SECTOR))]
                elif kind == "flush":
                    bufs = [header(T_FLUSH), Buffer.writable(1)]
                else:
                    bufs = [header(T_WRITE_ZEROES), Buffer.readable(segment(i % 64, 1)), Buffer.writable(1)]
                head = vm.post(0, bufs, indirect=(i % 3 == 0), kick=False)
                assert head not in posted
                posted[head] = kind
                i += 1
            vm.kick(0)
            got = await vm.wait_used(0, len(posted))
            await asyncio.sleep(0)
            got += vm.queues[0].reap()
            heads = [u.head for u in got]
            assert sorted(heads) == sorted(posted), "each posted head comes back exactly once"
            for u in got:
                kind = posted[u.head]
                if kind == "no-status":
                    assert u.length == 0
                else:
                    statuses[kind].append(status(u))
                    if kind == "read" and status(u) == S_OK:
                        assert u.length == SECTOR + 1
                    else:
                        assert u.length == 1
            returned += heads
            total += len(posted)
        assert total == len(returned) == 300
        assert vm.queues[0].used_idx == 300
        assert set(statuses["write"]) == {S_OK}
        assert set(statuses["flush"]) == {S_OK}
        assert set(statuses["zeroes"]) == {S_OK}
        assert set(statuses["unsupp"]) == {S_UNSUPP}
        assert set(statuses["past-end"]) == {S_IOERR}
        assert statuses["read"].count(S_IOERR) == 15
        assert device.info()["stats"]["errors"] == 15
        assert device.info()["inflight"] == 0


# ---- multi-queue ---------------------------------------------------------------------------------------

async def test_queues_are_independent(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty, num_queues=2)
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR, 1), q=0)
        assert await read_ok(vm, 0, SECTOR, q=1) == pattern(SECTOR, 1)    # one disk behind both
        faulty.pause("write")
        head = vm.post(0, write_req(8, pattern(SECTOR, 2)))
        await until(lambda: faulty.calls["write"] == 2)
        # queue 1 is served while queue 0's write sits on storage
        assert await read_ok(vm, 0, SECTOR, q=1) == pattern(SECTOR, 1)
        # and so is another request on queue 0 itself (one task per request)
        assert await read_ok(vm, 0, SECTOR, q=0) == pattern(SECTOR, 1)
        assert vm.queues[0].used_idx == 2          # write and read: the paused write is not back
        assert device.info()["inflight"] == 1
        faulty.resume()
        (used,) = await vm.wait_used(0, 1)
        assert (used.head, status(used)) == (head, S_OK)
        assert await read_ok(vm, 8, SECTOR, q=1) == pattern(SECTOR, 2)


# ---- live swap, pause, resume -------------------------------------------------------------------------------

async def test_swap_waits_for_inflight_then_switches() -> None:
    old = FaultyStorage(MemoryStorage(DISK, url="mem:old"))
    new = FaultyStorage(MemoryStorage(DISK, url="mem:new"))
    device = BlkDevice(old)
    async with device_pair(device) as vm:
        old.delay(0.2, "write")
        heads = [vm.post(0, write_req(8 * n, pattern(SECTOR, n))) for n in range(3)]
        await until(lambda: old.calls["write"] == 3)
        swap = asyncio.create_task(device.swap_storage(new))
        await asyncio.sleep(0.05)
        assert not swap.done(), "the swap waits for the requests in flight"
        assert device.paused
        # posted during the swap: must wait, then run on the new storage
        late = vm.post(0, read_req(0, SECTOR))
        returned = await asyncio.wait_for(swap, 5)
        assert returned is old
        assert not device.paused
        got = {u.head: u for u in await vm.wait_used(0, 4)}
        assert sorted(got) == sorted([*heads, late])
        assert all(status(got[h]) == S_OK for h in heads)
        # the writes landed on the old storage...
        for n in range(3):
            assert await direct_read(old.inner, 8 * n * SECTOR, SECTOR) == pattern(SECTOR, n)
        # ...and the late read was answered by the new one: zeros, not the old data
        assert (status(got[late]), got[late].written[:-1]) == (S_OK, bytes(SECTOR))
        assert (new.calls["read"], old.calls["read"]) == (1, 0)
        # later requests go to the new storage only
        old.reset_counts()
        await write_ok(vm, 0, pattern(SECTOR, 7))
        assert await read_ok(vm, 8, SECTOR) == bytes(SECTOR)          # old data not visible
        assert await direct_read(new.inner, 0, SECTOR) == pattern(SECTOR, 7)
        assert await direct_read(old.inner, 0, SECTOR) == pattern(SECTOR, 0)
        assert sum(old.calls.values()) == 0
        assert device.info()["backend"] == "mem:new"
        # same size: no config change
        await no_backend_request(vm)
    await old.aclose()


async def test_swap_to_other_size_updates_capacity_and_notifies() -> None:
    device = BlkDevice(MemoryStorage(DISK))
    async with device_pair(device) as vm:
        assert (await config(vm))["capacity"] == DISK // SECTOR
        # beyond the old end: refused before the swap
        assert status(await read(vm, LAST, SECTOR)) == S_IOERR
        old = await device.swap_storage(MemoryStorage(4 * DISK))
        msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
        assert msg.request == BackendReq.CONFIG_CHANGE_MSG
        assert (await config(vm))["capacity"] == 4 * DISK // SECTOR
        assert device.info()["sectors"] == 4 * DISK // SECTOR
        # the new sectors are usable at once
        await write_ok(vm, 4 * LAST - 1, pattern(SECTOR, 3))
        assert await read_ok(vm, 4 * LAST - 1, SECTOR) == pattern(SECTOR, 3)
        # shrinking (forced): a second notification, and the far end is refused again
        await old.aclose()
        old = await device.swap_storage(MemoryStorage(DISK // 2), force=True)
        msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
        assert msg.request == BackendReq.CONFIG_CHANGE_MSG
        assert (await config(vm))["capacity"] == DISK // 2 // SECTOR
        assert status(await read(vm, LAST // 2, SECTOR)) == S_IOERR
        await old.aclose()


async def test_swap_to_read_only_storage_is_refused() -> None:
    device = BlkDevice(MemoryStorage(DISK, url="mem:first"))
    ro = await open_storage("mem:1M?readonly=on")
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR))
        with pytest.raises(ValueError, match=re.escape("mem:1M?readonly=on")):
            await device.swap_storage(ro)
        assert device.info()["backend"] == "mem:first"
        assert not device.paused
        assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)       # still the old storage
        await write_ok(vm, 1, pattern(SECTOR, 2))
    await ro.aclose()


async def test_swap_read_only_disk_to_read_only_storage_is_allowed() -> None:
    device = BlkDevice(MemoryStorage(DISK), read_only=True)
    ro = await open_storage("mem:1M?readonly=on")
    async with device_pair(device) as vm:
        old = await device.swap_storage(ro)
        await old.aclose()
        assert device.info()["backend"] == "mem:1M?readonly=on"
        assert await read_ok(vm, 0, SECTOR) == bytes(SECTOR)


async def test_pause_holds_requests_and_resume_releases_them(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR))
        await device.pause()
        assert device.paused and device.info()["paused"] is True
        head = vm.post(0, read_req(0, SECTOR))
        with pytest.raises(TimeoutError):
            await vm.wait_used(0, 1, timeout=0.3)
        assert faulty.calls["read"] == 0
        device.resume()
        assert not device.info()["paused"]
        (used,) = await vm.wait_used(0, 1)
        assert used.head == head
        assert (status(used), used.written[:-1]) == (S_OK, pattern(SECTOR))
        device.resume()                     # idempotent
        assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)


async def test_pause_waits_for_requests_on_storage(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        faulty.pause("write")
        vm.post(0, write_req(0, pattern(SECTOR)))
        await until(lambda: faulty.calls["write"] == 1)
        pausing = asyncio.create_task(device.pause())
        await asyncio.sleep(0.05)
        assert not pausing.done(), "pause returns only once nothing is on storage"
        faulty.resume()
        await asyncio.wait_for(pausing, 5)
        (used,) = await vm.wait_used(0, 1)
        assert status(used) == S_OK
        device.resume()


@contextlib.asynccontextmanager
async def served(device: BlkDevice, short_dir: str) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """Serve ``device`` on a socket in ``short_dir``; the server is always stopped (within 5 s)."""
    path = os.path.join(short_dir, "vhost.sock")
    server = asyncio.create_task(serve(device, path))
    try:
        yield path, server
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(server, 5)


async def test_daemon_stops_while_paused(faulty: FaultyStorage, short_dir: str) -> None:
    # SIGTERM cancels serve(); requests held at the pause gate must not keep it alive
    device = BlkDevice(faulty)
    async with served(device, short_dir) as (path, server):
        try:
            vm = await VirtioFrontend.start(path)
            try:
                await device.pause()
                vm.post(0, read_req(0, SECTOR))
                await asyncio.sleep(0.05)
            finally:
                await vm.close()
            server.cancel()
            done, _ = await asyncio.wait({server}, timeout=3)
            assert server in done, "serve() did not end within 3 s of being cancelled while paused"
            assert faulty.calls["read"] == 0
        finally:
            device.resume()


async def test_cancel_while_draining_a_disconnect_still_cleans_up(faulty: FaultyStorage,
                                                                  short_dir: str) -> None:
    device = BlkDevice(faulty)
    async with served(device, short_dir) as (path, server):
        try:
            vm = await VirtioFrontend.start(path)
            try:
                await vm.fe.set_config(32, b"\x00")       # writethrough: a reset puts it back to 1
                assert device.wce == 0 and device.acked_features
                faulty.pause("read")
                vm.post(0, read_req(0, SECTOR))          # stuck on storage
                await until(lambda: faulty.calls["read"] == 1)
            finally:
                await vm.close()
            await asyncio.sleep(0.05)                    # the connection now drains the stuck read
            server.cancel()                              # SIGTERM
            done, _ = await asyncio.wait({server}, timeout=3)
            assert server in done
            # the connection's end ran in full: the device was reset
            assert (device.acked_features, device.wce) == (0, 1)
        finally:
            faulty.resume()


async def test_reconnect_while_paused(faulty: FaultyStorage, short_dir: str) -> None:
    device = BlkDevice(faulty)
    async with served(device, short_dir) as (path, server):
        try:
            vm = await VirtioFrontend.start(path)
            try:
                await device.pause()
                vm.post(0, read_req(0, SECTOR))        # held at the gate, never reaches storage
                await asyncio.sleep(0.05)
            finally:
                await vm.close()
            # the VMM restarts and reconnects while the operator still holds I/O
            try:
                vm = await asyncio.wait_for(VirtioFrontend.start(path, timeout=1), 3)
            except (ConnectionError, TimeoutError) as exc:
                pytest.fail(f"reconnect refused while paused: {exc!r}")
            try:
                assert (await config(vm))["capacity"] == DISK // SECTOR
                device.resume()
                await write_ok(vm, 0, pattern(SECTOR))
                assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR)
            finally:
                await vm.close()
        finally:
            device.resume()


# ---- control socket --------------------------------------------------------------------------------------

async def test_control_socket(tmp_path, short_dir: str) -> None:
    image = make_image(str(tmp_path / "ctl.img"))
    device = BlkDevice(await open_storage("file:" + image))
    path = os.path.join(short_dir, "ctl.sock")
    server = ControlServer(path, control_handlers(device))
    await server.start()
    try:
        async with device_pair(device) as vm:
            reply = await control_request(path, {"command": "info"})
            assert reply["ok"] is True
            assert reply["backend"] == "file:" + image
            assert (reply["capacity"], reply["sectors"]) == (DISK, DISK // SECTOR)
            assert reply["read_only"] is False and reply["queues"] == 1
            assert reply["write_cache"] == "writeback" and reply["paused"] is False

            await write_ok(vm, 0, pattern(SECTOR, 4))
            reply = await control_request(path, {"command": "info"})
            assert reply["stats"]["OUT"] == 1

            # resize: the image grew under us
            os.truncate(image, 2 * DISK)
            reply = await control_request(path, {"command": "resize"})
            assert reply["ok"] is True and reply["sectors"] == 2 * DISK // SECTOR
            msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
            assert msg.request == BackendReq.CONFIG_CHANGE_MSG
            assert (await config(vm))["capacity"] == 2 * DISK // SECTOR

            # pause / resume
            reply = await control_request(path, {"command": "pause"})
            assert reply["ok"] is True and reply["paused"] is True
            head = vm.post(0, read_req(0, SECTOR))
            with pytest.raises(TimeoutError):
                await vm.wait_used(0, 1, timeout=0.3)
            reply = await control_request(path, {"command": "resume"})
            assert reply["ok"] is True and reply["paused"] is False
            (used,) = await vm.wait_used(0, 1)
            assert used.head == head and used.written[:-1] == pattern(SECTOR, 4)

            # swap to RAM of another size
            reply = await control_request(path, {"command": "swap", "backend": "mem:3M"})
            assert reply["ok"] is True
            assert reply["previous"] == "file:" + image
            assert reply["backend"] == "mem:3M" and reply["capacity"] == 3 * MiB
            msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
            assert msg.request == BackendReq.CONFIG_CHANGE_MSG
            assert await read_ok(vm, 0, SECTOR) == bytes(SECTOR)       # the RAM disk, not the file

            # errors name the value, and the server keeps answering
            reply = await control_request(path, {"command": "explode"})
            assert reply["ok"] is False and "explode" in reply["error"]
            reply = await control_request(path, {"command": "swap", "backend": "foo:bar"})
            assert reply["ok"] is False and "foo" in reply["error"]
            reply = await control_request(path, {"command": "swap", "backend": "mem:12Q"})
            assert reply["ok"] is False and "12Q" in reply["error"]
            reply = await control_request(path, {"command": "swap", "backend": "file:/nonexistent/x.img"})
            assert reply["ok"] is False and "/nonexistent/x.img" in reply["error"]
            reply = await control_request(path, {"command": "swap", "backend": "mem:1M?readonly=on"})
            assert reply["ok"] is False and "mem:1M?readonly=on" in reply["error"]
            reply = await control_request(path, {"command": "swap"})
            assert reply["ok"] is False and "backend" in reply["error"]
            reply = await control_request(path, {"command": "info"})
            assert reply["ok"] is True and reply["backend"] == "mem:3M" and reply["paused"] is False
            await write_ok(vm, 0, pattern(SECTOR, 6))
            assert await read_ok(vm, 0, SECTOR) == pattern(SECTOR, 6)
            # the failed swaps sent no config change
            await no_backend_request(vm)
    finally:
        await server.close()
    assert not os.path.exists(path)


# ---- write cache (CONFIG_WCE) ---------------------------------------------------------------------------------

async def test_wce_writethrough_flushes_after_each_write(faulty: FaultyStorage) -> None:
    device = BlkDevice(faulty)
    async with device_pair(device) as vm:
        assert device.info()["write_cache"] == "writeback"
        await write_ok(vm, 0, pattern(SECTOR))
        assert (faulty.calls["write"], faulty.calls["flush"]) == (1, 0)

        await vm.fe.set_config(32, b"\x00")
        assert device.info()["write_cache"] == "writethrough"
        assert (await config(vm))["wce"] == 0
        await write_ok(vm, 1, pattern(SECTOR, 2))
        assert (faulty.calls["write"], faulty.calls["flush"]) == (2, 1)
        # the flush comes after the write
        assert [c.op for c in faulty.history][-2:] == ["write", "flush"]
        # a failing flush fails the write it follows
        faulty.fail_flushes()
        used = await write(vm, 2, pattern(SECTOR, 3))
        assert (used.length, status(used)) == (1, S_IOERR)
        # reads do not flush
        await read_ok(vm, 0, SECTOR)
        assert faulty.calls["flush"] == 2

        await vm.fe.set_config(32, b"\x01")
        assert device.info()["write_cache"] == "writeback"
        assert (await config(vm))["wce"] == 1
        await write_ok(vm, 3, pattern(SECTOR, 4))
        assert faulty.calls["flush"] == 2


@pytest.mark.parametrize("direction", ["python-to-native", "native-to-python"])
async def test_swap_that_changes_path_answers_every_request(direction: str) -> None:
    # A swap between storage with and without a native path restarts the ring
    # on the other path.  Requests the Python path took — on storage, and
    # parked at the gate while the swap waits — must all be answered first;
    # one parked request used to be dropped by the restart (found by the
    # file: -> nbd:// -> file: QEMU swap test: avail 517, used 516).
    slow = FaultyStorage(MemoryStorage(DISK, url="mem:slow"))
    fast = MemoryStorage(DISK, url="mem:fast")
    first, second = (slow, fast) if direction == "python-to-native" else (fast, slow)
    device = BlkDevice(first, dataplane="auto")
    async with device_pair(device) as vm:
        before = "python" if first is slow else "native"
        assert device.info()["dataplane"] == before
        slow.delay(0.2, "write")
        heads = [vm.post(0, write_req(8 * n, pattern(SECTOR, n))) for n in range(3)]
        early = await vm.wait_used(0, 3)   # answered before the swap: only parked ones remain
        # Posted without a kick, then a queue pass is scheduled just after the
        # swap task: the swap closes the gate first, the pass then takes the
        # chains and they park at the gate (the QEMU test's race, made certain).
        late = [vm.post(0, write_req(8 * n, pattern(SECTOR, n)), kick=False) for n in range(3, 6)]
        swap = asyncio.create_task(device.swap_storage(second))
        device.runtime.schedule(0)
        await asyncio.wait_for(swap, 5)
        got = {u.head: u for u in early + await vm.wait_used(0, 3)}
        assert sorted(got) == sorted(heads + late)
        assert all(status(u) == S_OK for u in got.values())
        assert device.info()["dataplane"] == ("native" if before == "python" else "python")
        # and the new path serves the next requests, on the new storage
        await write_ok(vm, 64, pattern(SECTOR, 9))
        assert await direct_read(second if second is fast else slow.inner, 64 * SECTOR,
                                 SECTOR) == pattern(SECTOR, 9)
        bases = await vm.stop()
        assert bases == [7], bases         # 3 + 3 + 1 requests, every one answered
    await slow.aclose()


async def test_dirty_tracking_marks_completed_writes_on_both_paths(tmp_path) -> None:
    # What a mirror relies on: from track_dirty() on, every completed write,
    # discard and write-zeroes marks its blocks; reads do not; after
    # track_dirty(None) nothing does.  The dataplane fixture runs this on the
    # Python path and on the native engine (file storage has both).
    from backends.blk.dirty import DirtyBitmap

    storage = await open_storage("file:" + make_image(str(tmp_path / "d.img")))
    device = BlkDevice(storage)
    gran = 64 << 10
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR, 1))          # before tracking: not marked
        bitmap = DirtyBitmap(DISK, gran)
        await device.track_dirty(bitmap)
        await write_ok(vm, (3 * gran) // SECTOR + 5, pattern(2 * SECTOR, 2))
        await read_ok(vm, (5 * gran) // SECTOR, SECTOR)
        # a write across a block boundary marks both blocks
        await write_ok(vm, (7 * gran) // SECTOR - 1, pattern(2 * SECTOR, 3))
        used = await vm.request(0, [header(T_DISCARD), Buffer.readable(segment((9 * gran) // SECTOR, 8)),
                                    Buffer.writable(1)])
        assert status(used) == S_OK
        assert list(bitmap.take_blocks()) == [3, 6, 7, 9]
        assert list(bitmap.take_blocks()) == []              # taken means cleared
        await write_ok(vm, (3 * gran) // SECTOR, pattern(SECTOR, 4))
        assert bitmap.count() == 1
        await device.track_dirty(None)
        await write_ok(vm, (11 * gran) // SECTOR, pattern(SECTOR, 5))
        assert list(bitmap.take_blocks()) == [3]
    await storage.aclose()


async def test_memory_added_and_removed_under_running_queues() -> None:
    # ADD_MEM_REG / REM_MEM_REG while the queue runs (QEMU's memory hot-plug):
    # the ring is quiesced, takes the new table and resumes; a buffer in the
    # new region works, and after removal the same buffer is refused (IOERR
    # in a sound status byte) without touching anything.
    import mmap as _mmap

    from vdev.testing import FRONTEND_VA_BASE
    from vhost_user.messages import MemoryRegion

    device = BlkDevice(MemoryStorage(DISK))
    async with device_pair(device) as vm:
        await write_ok(vm, 0, pattern(SECTOR, 5))
        gpa, size = 0x4000_0000, 1 << 20
        fd = os.memfd_create("hotplug", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        plugged = _mmap.mmap(fd, size)
        region = MemoryRegion(gpa, size, FRONTEND_VA_BASE + gpa, 0)
        try:
            await vm.fe.add_mem_reg(region, fd)
            q = vm.queues[0]

            def read_into_new_region() -> int:
                # header and status from the test kit's memory, data in the new region
                hdr = q.alloc.alloc(16)
                vm.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
                st = q.alloc.alloc(16)
                vm.mem.write(st, b"\xaa")
                d0, d1, d2 = q.free_desc.pop(), q.free_desc.pop(), q.free_desc.pop()
                q.write_desc(d0, hdr, 16, 1, d1)
                q.write_desc(d1, gpa + 8192, SECTOR, 1 | 2, d2)
                q.write_desc(d2, st, 1, 2, 0)
                q.chains[d0] = ([d0, d1, d2], [(hdr, 16, False), (st, 1, True)], None)
                q.publish(d0)
                vm.kick(0)
                return st

            read_into_new_region()
            (used,) = await vm.wait_used(0, 1)
            assert used.length == SECTOR + 1 and used.written == b"\0"     # status OK
            assert plugged[8192: 8192 + SECTOR] == pattern(SECTOR, 5)
            await vm.fe.rem_mem_reg(region)
            plugged[8192: 8192 + SECTOR] = bytes(SECTOR)
            read_into_new_region()
            (used,) = await vm.wait_used(0, 1)
            assert used.written == bytes([S_IOERR])                         # buffer no longer memory
            assert plugged[8192: 8192 + SECTOR] == bytes(SECTOR)            # and nothing written there
            await write_ok(vm, 8, pattern(SECTOR, 6))                       # the queue goes on
        finally:
            plugged.close()
            os.close(fd)
