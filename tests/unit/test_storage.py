"""Tests of the storage layer behind virtio-blk.

One conformance suite runs against every back end (mem, null, file,
file?direct=on, nbd+unix and nbd:// against a real qemu-nbd), then
back-end-specific tests (file descriptors failing under a FileStorage,
fallocate fallbacks), the FaultyStorage wrapper, and the URL parser with
every error message.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import mmap
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from backends.blk.storage import (
    FileStorage,
    MemoryStorage,
    NbdStorage,
    NullStorage,
    Storage,
    StorageSpec,
    open_storage,
    parse_size,
    parse_storage_url,
    register_scheme,
    registered_schemes,
)
from backends.blk.storage.testing import FaultyStorage, QemuNbdServer
from vdev.errors import DeviceError

IMAGE_SIZE = 8 << 20

needs_qemu_nbd = pytest.mark.skipif(not QemuNbdServer.available(), reason="qemu-nbd not installed")


@functools.lru_cache(maxsize=64)
def pattern(n: int, seed: int = 1) -> bytes:
    """Deterministic, position-dependent bytes (so misplaced data shows)."""
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def guest_buffer(n: int) -> tuple[mmap.mmap, memoryview]:
    """A page-aligned buffer, like guest memory."""
    mm = mmap.mmap(-1, max(n, mmap.PAGESIZE))
    return mm, memoryview(mm)[:n]


# ---- back ends under test ------------------------------------------------------------

@dataclass
class Backend:
    kind: str
    url: str
    keeps_data: bool          # False for null:
    zero_after_discard: bool  # reads zeros after discard (NBD TRIM need not)
    opened: list[Storage]

    async def open(self, *, read_only: bool = False) -> Storage:
        url = self.url
        if read_only:
            url += ("&" if "?" in url else "?") + "readonly=on"
        storage = await open_storage(url)
        self.opened.append(storage)
        return storage


@pytest.fixture(scope="module")
def qemu_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("nbd") / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return str(path)


@pytest.fixture(scope="module")
def qemu_unix(qemu_image: str, tmp_path_factory: pytest.TempPathFactory):
    if not QemuNbdServer.available():
        pytest.skip("qemu-nbd not installed")
    sock = tmp_path_factory.mktemp("sock") / "nbd.sock"
    with QemuNbdServer(qemu_image, socket_path=sock, export="disk") as srv:
        yield srv


@pytest.fixture(scope="module")
def qemu_tcp(tmp_path_factory: pytest.TempPathFactory):
    if not QemuNbdServer.available():
        pytest.skip("qemu-nbd not installed")
    path = tmp_path_factory.mktemp("nbdtcp") / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with QemuNbdServer(path, host="127.0.0.1", export="tcpdisk") as srv:
        yield srv


KINDS = ["mem", "null", "file", "file-direct", "nbd-unix", "nbd-tcp"]


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Backend]:
    kind = request.param
    opened: list[Storage] = []
    if kind in ("mem", "null"):
        url = f"{kind}:{IMAGE_SIZE // (1 << 20)}M"
        be = Backend(kind, url, kind == "mem", True, opened)
    elif kind.startswith("file"):
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(IMAGE_SIZE)
        url = str(img) + ("?direct=on" if kind == "file-direct" else "")
        if kind == "file-direct":
            try:
                probe = await open_storage(url)
            except DeviceError as e:
                if isinstance(e.cause, OSError) and e.cause.errno == errno.EINVAL:
                    pytest.skip(f"the tmp file system rejects O_DIRECT: {e}")
                raise
            await probe.aclose()
        be = Backend(kind, url, True, True, opened)
    else:
        srv = request.getfixturevalue("qemu_unix" if kind == "nbd-unix" else "qemu_tcp")
        be = Backend(kind, srv.url, True, False, opened)
    yield be
    for s in opened:
        await s.aclose()


# ---- conformance ---------------------------------------------------------------------

async def test_size(backend: Backend) -> None:
    s = await backend.open()
    assert s.size == IMAGE_SIZE
    assert await s.refresh_size() == IMAGE_SIZE
    assert s.block_size in (512, 4096)
    assert s.url == backend.url


async def test_capabilities_are_bools(backend: Backend) -> None:
    s = await backend.open()
    for cap in (s.supports_flush, s.supports_discard, s.supports_write_zeroes, s.read_only):
        assert isinstance(cap, bool)
    assert s.supports_write_zeroes and not s.read_only


async def test_roundtrip_several_buffers(backend: Backend) -> None:
    s = await backend.open()
    data = pattern(3 * 4096 + 1024, seed=2)
    mms = []
    # Write from three guest-like buffers of different sizes...
    sizes = [4096, 1024, 2 * 4096]
    src, pos = [], 0
    for n in sizes:
        mm, view = guest_buffer(n)
        view[:] = data[pos:pos + n]
        mms.append(mm)
        src.append(view)
        pos += n
    await s.writev(65536, src)
    # ...and read back split differently.
    out_sizes = [512, 7 * 512, len(data) - 8 * 512]
    dst = []
    for n in out_sizes:
        mm, view = guest_buffer(n)
        mms.append(mm)
        dst.append(view)
    await s.readv(65536, dst)
    got = b"".join(bytes(v) for v in dst)
    assert got == (data if backend.keeps_data else bytes(len(data)))
    for v in src + dst:
        v.release()


async def test_unaligned_memory_and_offsets(backend: Backend) -> None:
    """Buffers at odd addresses, odd lengths and byte offsets (bounce paths)."""
    s = await backend.open()
    base = 3 * 65536
    await s.writev(base, [memoryview(pattern(8192, seed=5))])
    backing = bytearray(5000)
    src = memoryview(backing)[3:3 + 1000]          # misaligned address and length
    src[:] = pattern(1000, seed=9)
    await s.writev(base + 100, [src])
    out_backing = bytearray(2100)
    dst = [memoryview(out_backing)[1:701], memoryview(out_backing)[701:2001]]
    await s.readv(base + 50, dst)
    expect = bytearray(pattern(8192, seed=5))
    expect[100:1100] = pattern(1000, seed=9)
    got = bytes(out_backing[1:2001])
    assert got == (bytes(expect[50:2050]) if backend.keeps_data else bytes(2000))


async def test_non_byte_format_views(backend: Backend) -> None:
    s = await backend.open()
    data = pattern(4096, seed=3)
    await s.writev(0, [memoryview(bytearray(data)).cast("I")])
    out = bytearray(4096)
    await s.readv(0, [memoryview(out).cast("Q")])
    assert bytes(out) == (data if backend.keeps_data else bytes(4096))


async def test_flush(backend: Backend) -> None:
    s = await backend.open()
    await s.writev(0, [memoryview(pattern(512))])
    assert s.supports_flush
    await s.flush()


async def test_discard_then_read(backend: Backend) -> None:
    s = await backend.open()
    off = 1 << 20
    await s.writev(off, [memoryview(pattern(3 * 65536, seed=4))])
    await s.discard(off + 65536, 65536)
    out = bytearray(3 * 65536)
    await s.readv(off, [memoryview(out)])
    if backend.keeps_data:
        assert out[:65536] == pattern(3 * 65536, seed=4)[:65536]
        assert out[2 * 65536:] == pattern(3 * 65536, seed=4)[2 * 65536:]
    if backend.zero_after_discard:
        assert out[65536:2 * 65536] == bytes(65536)


@pytest.mark.parametrize("may_unmap", [False, True])
async def test_write_zeroes(backend: Backend, may_unmap: bool) -> None:
    s = await backend.open()
    off = 2 << 20
    await s.writev(off, [memoryview(pattern(65536, seed=6))])
    await s.write_zeroes(off + 512, 65536 - 1024, may_unmap=may_unmap)
    out = bytearray(65536)
    await s.readv(off, [memoryview(out)])
    if backend.keeps_data:
        assert out[:512] == pattern(65536, seed=6)[:512]
        assert out[-512:] == pattern(65536, seed=6)[-512:]
    assert out[512:-512] == bytes(65536 - 1024)


async def test_read_only_refuses_writes(backend: Backend) -> None:
    rw = await backend.open()
    await rw.writev(4 << 20, [memoryview(pattern(4096, seed=8))])
    await rw.flush()
    ro = await backend.open(read_only=True)
    assert ro.read_only
    assert not ro.supports_write_zeroes
    for call in (lambda: ro.writev(4 << 20, [memoryview(bytes(512))]),
                 lambda: ro.write_zeroes(4 << 20, 512),
                 lambda: ro.discard(4 << 20, 512)):
        with pytest.raises(DeviceError) as ei:
            await call()
        assert ei.value.status == 1
        assert isinstance(ei.value.cause, OSError) and ei.value.cause.errno == errno.EROFS
    out = bytearray(4096)
    await ro.readv(4 << 20, [memoryview(out)])
    # mem: is a new RAM disk per open; the others see the same image.
    shared = backend.keeps_data and backend.kind != "mem"
    assert out == (pattern(4096, seed=8) if shared else bytes(4096))


async def test_out_of_range_refused(backend: Backend) -> None:
    s = await backend.open()
    end = s.size
    cases = [
        lambda: s.readv(end - 512, [memoryview(bytearray(1024))]),
        lambda: s.readv(-512, [memoryview(bytearray(512))]),
        lambda: s.writev(end, [memoryview(bytes(512))]),
        lambda: s.writev(end - 511, [memoryview(bytes(512))]),
        lambda: s.discard(end - 512, 1024),
        lambda: s.write_zeroes(end, 512),
        lambda: s.write_zeroes(0, -1),
    ]
    for call in cases:
        with pytest.raises(DeviceError) as ei:
            await call()
        assert ei.value.status == 1
        assert ei.value.cause is not None
    # The image did not grow, and the last sector is still usable.
    assert await s.refresh_size() == end
    await s.writev(end - 512, [memoryview(pattern(512))])
    if backend.kind.startswith("file"):
        assert os.path.getsize(backend.url.partition("?")[0]) == end


async def test_zero_length_io(backend: Backend) -> None:
    s = await backend.open()
    await s.readv(0, [])
    await s.writev(s.size, [memoryview(b"")])
    await s.discard(0, 0)
    await s.write_zeroes(0, 0)


async def test_aclose_idempotent(backend: Backend) -> None:
    s = await backend.open()
    await s.writev(0, [memoryview(pattern(512))])
    await s.aclose()
    await s.aclose()
    await asyncio.gather(s.aclose(), s.aclose())
    with pytest.raises(DeviceError) as ei:
        await s.readv(0, [memoryview(bytearray(512))])
    assert ei.value.status == 1


async def test_context_manager_closes(backend: Backend) -> None:
    async with await backend.open() as s:
        await s.readv(0, [memoryview(bytearray(512))])
    with pytest.raises(DeviceError):
        await s.writev(0, [memoryview(bytes(512))])


async def test_concurrent_requests(backend: Backend) -> None:
    """Many requests in flight at once land in the right places."""
    s = await backend.open()
    n, chunk = 32, 8192
    blobs = [pattern(chunk, seed=i) for i in range(n)]
    await asyncio.gather(*(s.writev(i * chunk, [memoryview(b)]) for i, b in enumerate(blobs)))
    outs = [bytearray(chunk) for _ in range(n)]
    await asyncio.gather(*(s.readv(i * chunk, [memoryview(o)]) for i, o in enumerate(outs)))
    for o, b in zip(outs, blobs, strict=True):
        assert bytes(o) == (b if backend.keeps_data else bytes(chunk))


# ---- production loop -----------------------------------------------------------------

@needs_qemu_nbd
def test_roundtrip_under_uvloop(tmp_path, qemu_unix: QemuNbdServer) -> None:
    uvloop = pytest.importorskip("uvloop")
    img = tmp_path / "u.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)

    async def main() -> None:
        for url in (str(img), f"{img}?direct=on", "mem:1M", qemu_unix.url):
            async with await open_storage(url) as s:
                data = pattern(300_000, seed=11)
                src = memoryview(bytearray(data))
                await s.writev(4096, [src[:1000], src[1000:]])
                out = bytearray(len(data) + 1)
                await s.readv(4096, [memoryview(out)[1:]])
                assert bytes(out[1:]) == data, url
                await s.flush()

    uvloop.run(main())


# ---- FileStorage specifics ----------------------------------------------------------

def make_image(path, size: int = 1 << 20, fill: bytes | None = None) -> str:
    with open(path, "wb") as f:
        if fill is not None:
            f.write(fill)
        f.truncate(size)
    return str(path)


async def test_file_fd_failing_under_storage(tmp_path) -> None:
    """The fd starts failing (here: swapped for a read-only /dev/null):
    every operation is a DeviceError carrying the OSError."""
    img = make_image(tmp_path / "f.img", fill=pattern(4096))
    s = await FileStorage.open_path(img)
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, s.fileno)
        os.close(null)
        with pytest.raises(DeviceError) as ei:
            await s.writev(0, [memoryview(bytes(512))])
        assert ei.value.status == 1
        assert isinstance(ei.value.cause, OSError) and ei.value.cause.errno == errno.EBADF
        with pytest.raises(DeviceError) as ei:
            await s.flush()
        assert isinstance(ei.value.cause, OSError) and ei.value.cause.errno == errno.EINVAL
        with pytest.raises(DeviceError) as ei:   # /dev/null reads EOF: a short read
            await s.readv(0, [memoryview(bytearray(512))])
        assert "short read" in str(ei.value)
        with pytest.raises(DeviceError) as ei:
            await s.write_zeroes(0, 4096, may_unmap=True)
        assert isinstance(ei.value.cause, OSError)
    finally:
        await s.aclose()


async def test_file_syscall_fault_injected(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing syscall inside the worker thread surfaces as DeviceError(cause=OSError)."""
    from backends.blk.storage import file as file_mod

    img = make_image(tmp_path / "f.img")
    s = await FileStorage.open_path(img)
    try:
        def broken(*a: object) -> int:
            raise OSError(errno.EIO, "injected")
        monkeypatch.setattr(file_mod.os, "preadv", broken)
        with pytest.raises(DeviceError) as ei:
            await s.readv(0, [memoryview(bytearray(512))])
        assert ei.value.cause.errno == errno.EIO
        assert ei.value.__cause__ is ei.value.cause
    finally:
        monkeypatch.undo()
        await s.aclose()


async def test_file_short_read_after_truncation(tmp_path) -> None:
    img = make_image(tmp_path / "f.img", size=65536)
    s = await FileStorage.open_path(img)
    try:
        os.truncate(img, 4096)   # shrunk behind our back; cached size is stale
        with pytest.raises(DeviceError, match="short read"):
            await s.readv(0, [memoryview(bytearray(8192))])
        assert await s.refresh_size() == 4096
        with pytest.raises(DeviceError, match="out of range"):
            await s.readv(0, [memoryview(bytearray(8192))])
    finally:
        await s.aclose()


async def test_file_refresh_size_after_growth(tmp_path) -> None:
    img = make_image(tmp_path / "f.img", size=65536)
    async with await open_storage(img) as s:
        os.truncate(img, 131072)
        assert s.size == 65536
        assert await s.refresh_size() == 131072
        await s.writev(131072 - 512, [memoryview(pattern(512))])


async def test_file_discard_punches_hole(tmp_path) -> None:
    img = make_image(tmp_path / "f.img", size=4 << 20, fill=os.urandom(4 << 20))
    async with await open_storage(img) as s:
        before = os.stat(img).st_blocks
        await s.discard(1 << 20, 2 << 20)
        await s.flush()
        assert os.stat(img).st_blocks < before
        assert os.path.getsize(img) == 4 << 20   # KEEP_SIZE


@pytest.mark.parametrize("direct", [False, True])
async def test_file_write_zeroes_fallback_writes_zeros(tmp_path, direct: bool) -> None:
    img = make_image(tmp_path / "f.img", fill=pattern(1 << 20, seed=3))
    try:
        s = await FileStorage.open_path(img, direct=direct)
    except DeviceError as e:
        pytest.skip(f"O_DIRECT unavailable: {e}")
    try:
        s._can_punch = False
        s._can_zero_range = False
        await s.write_zeroes(4096, 3 << 18, may_unmap=True)
        await s.discard(0, 4096)   # no punching possible: a no-op, data stays
        out = bytearray(1 << 20)
        await s.readv(0, [memoryview(out)])
        assert out[:4096] == pattern(1 << 20, seed=3)[:4096]
        assert out[4096:4096 + (3 << 18)] == bytes(3 << 18)
        assert out[4096 + (3 << 18):] == pattern(1 << 20, seed=3)[4096 + (3 << 18):]
    finally:
        await s.aclose()


async def test_file_fallocate_unsupported(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without PUNCH_HOLE/ZERO_RANGE: discard becomes a no-op,
    write_zeroes writes zeros, and neither is tried again."""
    from backends.blk.storage import file as file_mod

    calls: list[int] = []

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_mod, "_fallocate", no_fallocate)
    img = make_image(tmp_path / "f.img", fill=b"\xee" * 65536)
    async with await FileStorage.open_path(img) as s:
        await s.discard(0, 4096)
        await s.write_zeroes(4096, 4096, may_unmap=True)
        await s.write_zeroes(8192, 4096)
        await s.discard(0, 4096)
        assert len(calls) == 2      # one PUNCH_HOLE, one ZERO_RANGE, then remembered
        out = bytearray(16384)
        await s.readv(0, [memoryview(out)])
        assert out[:4096] == b"\xee" * 4096 and out[4096:12288] == bytes(8192)


def _losetup(image: str) -> str | None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return None
    r = subprocess.run(["losetup", "--find", "--show", image], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


async def test_block_device(tmp_path) -> None:
    """A real block device (a loop device): size by ioctl, discard/zeroing by fallocate."""
    img = make_image(tmp_path / "loop.img", size=3 << 20, fill=b"\xab" * 65536)
    dev = _losetup(img)
    if dev is None:
        pytest.skip("no loop device available (needs root and losetup)")
    try:
        for url in (dev, f"{dev}?direct=on"):
            async with await open_storage(url) as s:
                assert isinstance(s, FileStorage) and s.is_block_device
                assert s.size == 3 << 20 and await s.refresh_size() == 3 << 20
                assert s.block_size >= 512
                await s.write_zeroes(0, 4096)
                await s.discard(8192, 4096)
                await s.writev(65536, [memoryview(pattern(4096))])
                await s.flush()
                out = bytearray(4096)
                await s.readv(0, [memoryview(out)])
                assert out == bytes(4096)
                await s.readv(65536, [memoryview(out)])
                assert out == pattern(4096)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


async def test_file_direct_misaligned_buffers_bounce(tmp_path) -> None:
    img = make_image(tmp_path / "f.img")
    try:
        s = await FileStorage.open_path(img, direct=True)
    except DeviceError as e:
        pytest.skip(f"O_DIRECT unavailable: {e}")
    async with s:
        backing = bytearray(4096 + 7)
        v = memoryview(backing)[7:]
        v[:] = pattern(4096, seed=12)
        await s.writev(8192, [v])                       # aligned offset, odd address
        out = bytearray(4096 + 1)
        await s.readv(8192, [memoryview(out)[1:]])
        assert bytes(out[1:]) == pattern(4096, seed=12)
        # read-only views are fine too (a guest's read-only buffer)
        await s.writev(0, [memoryview(bytes(pattern(512, seed=1))).toreadonly()])


async def test_file_direct_unaligned_write_at_ragged_end_refused(tmp_path) -> None:
    img = make_image(tmp_path / "f.img", size=1000)
    try:
        s = await FileStorage.open_path(img, direct=True)
    except DeviceError as e:
        pytest.skip(f"O_DIRECT unavailable: {e}")
    async with s:
        with pytest.raises(DeviceError, match="crosses the end"):
            await s.writev(600, [memoryview(bytes(100))])
        out = bytearray(400)
        await s.readv(600, [memoryview(out)])          # reading the ragged end works
        assert os.path.getsize(img) == 1000


async def test_file_open_failures(tmp_path) -> None:
    with pytest.raises(DeviceError) as ei:
        await FileStorage.open_path(str(tmp_path / "missing.img"))
    assert isinstance(ei.value.cause, FileNotFoundError)
    with pytest.raises(DeviceError) as ei:
        await FileStorage.open_path(str(tmp_path))
    assert isinstance(ei.value.cause, OSError)
    ro = make_image(tmp_path / "ro.img")
    os.chmod(ro, 0o444)
    if os.geteuid() != 0:   # root ignores permission bits
        with pytest.raises(DeviceError):
            await FileStorage.open_path(ro)
    async with await FileStorage.open_path(ro, read_only=True) as s:
        assert s.read_only


async def test_file_close_waits_for_inflight(tmp_path) -> None:
    img = make_image(tmp_path / "f.img", size=8 << 20)
    s = await FileStorage.open_path(img)
    data = memoryview(os.urandom(4 << 20))
    writes = [asyncio.ensure_future(s.writev(i * (1 << 20), [data[:1 << 20]])) for i in range(4)]
    await asyncio.sleep(0)
    await s.aclose()
    await asyncio.gather(*writes)   # submitted before close: they completed
    with open(img, "rb") as f:
        assert f.read(1 << 20) == bytes(data[:1 << 20])


# ---- MemoryStorage / NullStorage specifics -------------------------------------------

async def test_memory_storage_is_sparse_and_releases() -> None:
    s = MemoryStorage(1 << 40)   # 1 TiB, nothing committed
    await s.writev((1 << 40) - 4096, [memoryview(pattern(4096))])
    out = bytearray(4096)
    await s.readv((1 << 40) - 4096, [memoryview(out)])
    assert bytes(out) == pattern(4096)
    await s.aclose()
    await s.aclose()


def test_memory_and_null_reject_bad_sizes() -> None:
    for cls in (MemoryStorage, NullStorage):
        for bad in (0, -512, 1000):
            with pytest.raises(ValueError, match=f"size {bad} is not a positive multiple of 512"):
                cls(bad)


async def test_null_reads_zeros_over_garbage() -> None:
    s = NullStorage(1 << 20)
    out = bytearray(b"\xff" * 3000)
    await s.readv(0, [memoryview(out)])
    assert out == bytes(3000)


# ---- FaultyStorage -------------------------------------------------------------------

async def test_faulty_fails_next_n_then_recovers() -> None:
    inner = MemoryStorage(1 << 20)
    disk = FaultyStorage(inner)
    disk.fail_reads(2, errno.EIO)
    for _ in range(2):
        with pytest.raises(DeviceError) as ei:
            await disk.readv(0, [memoryview(bytearray(512))])
        assert ei.value.status == 1 and ei.value.cause.errno == errno.EIO
    await disk.readv(0, [memoryview(bytearray(512))])
    assert disk.calls["read"] == 3
    assert [c.failed for c in disk.history] == [True, True, False]
    await disk.aclose()


async def test_faulty_write_fault_does_not_reach_inner() -> None:
    inner = MemoryStorage(1 << 20)
    disk = FaultyStorage(inner)
    disk.fail_writes(1, errno.ENOSPC)
    with pytest.raises(DeviceError) as ei:
        await disk.writev(0, [memoryview(b"\x01" * 512)])
    assert ei.value.cause.errno == errno.ENOSPC
    out = bytearray(512)
    await inner.readv(0, [memoryview(out)])
    assert out == bytes(512)
    await disk.writev(0, [memoryview(b"\x01" * 512)])
    await inner.readv(0, [memoryview(out)])
    assert out == b"\x01" * 512
    assert disk.history[-1].op == "write" and disk.history[-1].length == 512


async def test_faulty_flush_unsupported_and_forever() -> None:
    disk = FaultyStorage(MemoryStorage(1 << 20))
    disk.fail_flushes(errno=errno.EOPNOTSUPP)
    with pytest.raises(DeviceError) as ei:
        await disk.flush()
    assert ei.value.status == 2
    await disk.flush()
    disk.fail("discard", count=None)
    for _ in range(3):
        with pytest.raises(DeviceError):
            await disk.discard(0, 512)
    disk.heal()
    await disk.discard(0, 512)
    with pytest.raises(ValueError, match="unknown storage operation 'bogus'"):
        disk.fail("bogus")


async def test_faulty_delay_and_pause() -> None:
    disk = FaultyStorage(MemoryStorage(1 << 20))
    disk.delay(0.05, "write")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await disk.writev(0, [memoryview(bytes(512))])
    assert loop.time() - t0 >= 0.04
    disk.delay(0, "write")
    disk.pause("read")
    task = asyncio.ensure_future(disk.readv(0, [memoryview(bytearray(512))]))
    await asyncio.sleep(0.01)
    assert not task.done()
    await disk.writev(0, [memoryview(bytes(512))])   # writes are not held
    disk.resume()
    await asyncio.wait_for(task, 1)
    assert disk.calls == {"write": 2, "read": 1}
    assert disk.size == 1 << 20 and disk.url == "mem:1048576" and disk.supports_discard
    await disk.aclose()


# ---- URL parsing ------------------------------------------------------------------------

def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("2T") == 2 << 40
    assert parse_size("8KiB") == 8192
    assert parse_size("3mib") == 3 << 20
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("512b") == 512
    for bad in ("", "M", "1.5G", "12Q", "-1", "1 G B", "8KB", "1mb"):
        with pytest.raises(ValueError, match=re.escape(f"cannot parse size {bad!r}")):
            parse_size(bad)


def test_parse_mem_and_null() -> None:
    assert parse_storage_url("mem:1G").size == 1 << 30
    assert parse_storage_url("MEM:64M").scheme == "mem"
    spec = parse_storage_url("mem:4096?readonly=on")
    assert (spec.size, spec.read_only) == (4096, True)
    spec = parse_storage_url("null:2GiB?readonly")
    assert (spec.scheme, spec.size, spec.read_only) == ("null", 2 << 30, True)
    assert parse_storage_url("mem:1M?readonly=off").read_only is False


def test_parse_file_forms(tmp_path) -> None:
    img = make_image(tmp_path / "a.img")
    for url in (img, f"file:{img}", f"file://{img}"):
        spec = parse_storage_url(url)
        assert (spec.scheme, spec.path, spec.direct, spec.read_only) == ("file", img, False, False)
    spec = parse_storage_url(f"file:{img}?direct=on&readonly=yes")
    assert (spec.direct, spec.read_only) == (True, True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert parse_storage_url("./a.img").path == "./a.img"
        assert parse_storage_url("a.img").path == "a.img"
        assert parse_storage_url("file:a.img").path == "a.img"
    finally:
        os.chdir(cwd)


def test_parse_nbd_forms() -> None:
    spec = parse_storage_url("nbd://example.org/disk")
    assert (spec.scheme, spec.host, spec.port, spec.export) == ("nbd", "example.org", 10809, "disk")
    spec = parse_storage_url("nbd://127.0.0.1:10900/a%20b?readonly=on")
    assert (spec.host, spec.port, spec.export, spec.read_only) == ("127.0.0.1", 10900, "a b", True)
    spec = parse_storage_url("nbd://[::1]:1234")
    assert (spec.host, spec.port, spec.export) == ("::1", 1234, "")
    spec = parse_storage_url("nbd+unix:///exp?socket=/run/vm+1.sock")
    assert (spec.scheme, spec.socket, spec.export, spec.host) == ("nbd+unix", "/run/vm+1.sock", "exp", None)
    assert parse_storage_url("nbd+unix://?socket=/s").export == ""


@pytest.mark.parametrize(("url", "message"), [
    ("foo:bar", "unknown storage scheme 'foo' in 'foo:bar'"),
    ("nbds://h/x", "unknown storage scheme 'nbds' in 'nbds://h/x'"),
    ("", "empty storage URL ''"),
    ("mem:12Q", "cannot parse size '12Q' in 'mem:12Q'"),
    ("mem:", "cannot parse size '' in 'mem:'"),
    ("null:1.5G", "cannot parse size '1.5G' in 'null:1.5G'"),
    ("mem:100", "size '100' in 'mem:100' is not a positive multiple of 512"),
    ("mem:0", "size '0' in 'mem:0' is not a positive multiple of 512"),
    ("mem:1M?direct=on", "unknown option 'direct' in 'mem:1M?direct=on' (accepted: readonly)"),
    ("null:1M?bogus", "unknown option 'bogus' in 'null:1M?bogus' (accepted: readonly)"),
    ("mem:1M?readonly=maybe", "cannot parse value 'maybe' of option 'readonly' in 'mem:1M?readonly=maybe'"),
    ("mem:1M?readonly=on&readonly=off", "option 'readonly' given twice in 'mem:1M?readonly=on&readonly=off'"),
    ("/x/y.img", "no such file: '/x/y.img'"),
    ("file:/x/y.img?direct=on", "no such file: '/x/y.img'"),
    ("file:", "empty path in 'file:'"),
    ("file://otherhost/x.img", "file URL with host 'otherhost' is not supported in 'file://otherhost/x.img'"),
    ("/tmp", "not a regular file or block device: '/tmp'"),
    ("/dev/null", "not a regular file or block device: '/dev/null'"),
    ("nbd:///disk", "missing host in 'nbd:///disk'"),
    ("nbd://h:abc/x", "cannot parse port 'abc' in 'nbd://h:abc/x'"),
    ("nbd://h:70000/x", "cannot parse port '70000' in 'nbd://h:70000/x'"),
    ("nbd://h:0/x", "cannot parse port '0' in 'nbd://h:0/x'"),
    ("nbd://h/x?socket=/s", "unknown option 'socket' in 'nbd://h/x?socket=/s'"),
    ("nbd://h/x?tls=on", "unknown option 'tls' in 'nbd://h/x?tls=on'"),
    ("nbd+unix:///x", "missing socket=PATH in 'nbd+unix:///x'"),
    ("nbd+unix:///x?socket=", "empty socket= in 'nbd+unix:///x?socket='"),
    ("nbd+unix://host/x?socket=/s", "nbd+unix URL must not name a host ('host') in 'nbd+unix://host/x?socket=/s'"),
])
def test_parse_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_storage_url(url)
    assert str(ei.value).startswith(message), str(ei.value)


def test_parse_file_with_bad_direct_value(tmp_path) -> None:
    img = make_image(tmp_path / "a.img")
    message = f"cannot parse value 'sometimes' of option 'direct' in '{img}?direct=sometimes'"
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_storage_url(f"{img}?direct=sometimes")


async def test_open_storage_each_scheme(tmp_path) -> None:
    img = make_image(tmp_path / "a.img")
    for url, cls in ((img, FileStorage), ("mem:64K", MemoryStorage), ("null:1M", NullStorage)):
        async with await open_storage(url) as s:
            assert type(s) is cls and s.url == url
    # an already-parsed spec opens too
    async with await open_storage(parse_storage_url("mem:1M?readonly=on")) as s:
        assert s.read_only and s.size == 1 << 20
    with pytest.raises(ValueError, match="unknown storage scheme"):
        await open_storage("nope:1")
    assert {"file", "mem", "null", "nbd", "nbd+unix"} <= set(registered_schemes())


async def test_open_nbd_unreachable_is_device_error(tmp_path) -> None:
    with pytest.raises(DeviceError) as ei:
        await open_storage(f"nbd+unix:///x?socket={tmp_path}/nothing.sock")
    assert isinstance(ei.value.cause, OSError)


async def test_register_third_party_scheme() -> None:
    class ZeroDisk(NullStorage):
        url_options = frozenset({"readonly", "sectors"})

        @classmethod
        def parse_spec(cls, spec: StorageSpec) -> StorageSpec:
            from dataclasses import replace
            if not spec.options.get("sectors", "").isdigit():
                raise ValueError(f"sectors= must be a number in {spec.url!r}")
            return replace(spec, size=int(spec.options["sectors"]) * 512)

        @classmethod
        async def open(cls, spec: StorageSpec) -> ZeroDisk:
            return cls(spec.size, url=spec.url, read_only=spec.read_only)

    register_scheme("zero", ZeroDisk)
    assert parse_storage_url("zero:?sectors=8").size == 4096
    with pytest.raises(ValueError, match="unknown option 'size'"):
        parse_storage_url("zero:?size=1")
    with pytest.raises(ValueError, match="sectors= must be a number"):
        parse_storage_url("zero:?sectors=x")
    async with await open_storage("zero:?sectors=8") as s:
        assert isinstance(s, ZeroDisk) and s.size == 4096

    # A bare callable works too; its URLs accept any option.
    seen: list[StorageSpec] = []

    async def factory(spec: StorageSpec) -> Storage:
        seen.append(spec)
        return MemoryStorage(4096, url=spec.url)

    register_scheme("Custom", factory)
    async with await open_storage("custom:anything?x=1&y") as s:
        assert s.size == 4096
    assert seen[0].target == "anything" and dict(seen[0].options) == {"x": "1", "y": ""}
    with pytest.raises(ValueError, match="invalid storage scheme name"):
        register_scheme("bad name", factory)
    with pytest.raises(TypeError):
        register_scheme("thing", 42)  # type: ignore[arg-type]


def test_nbd_class_is_registered() -> None:
    assert parse_storage_url("nbd://h/x").scheme == "nbd"
    assert NbdStorage.url_options == frozenset({"readonly", "socket", "timeout", "reconnect-delay"})
