"""NBD client defects (issue "Defects found by hostile testing", items 4, 5, 7, 10).

* item 10: an error code the NBD spec does not define (>= 2^31 included) is
  a storage error naming the code, not an OverflowError from ``os.strerror``;
* item 4: a server that stops answering fails the request with IOERR after
  ``?timeout=SECONDS`` and the connection is treated as dead;
* item 5: the client reconnects in the background, with backoff, and shows
  the connection state;
* item 7: ``resize`` against a one-client qemu-nbd answers, with the size or a
  reason, without hanging on a second connection.

Scripted misbehaviour runs against `FakeNbdServer`; the hang, crash and
restart scenarios against a real ``qemu-nbd`` (SIGSTOP, SIGKILL, restart).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from backends.blk import control_handlers
from backends.blk import device as blk_device
from backends.blk.device import BlkDevice
from backends.blk.storage import MemoryStorage, NbdStorage, open_storage, parse_storage_url
from backends.blk.storage import nbd_proto as P
from backends.blk.storage.testing import FakeNbdServer, FaultyStorage, QemuNbdServer
from vdev.control import ControlServer, control_request
from vdev.errors import DeviceError
from vdev.testing import Buffer, VirtioFrontend, device_pair
from vhost_user.messages import BackendReq


async def connect(srv: FakeNbdServer, **kw: object) -> NbdStorage:
    return await NbdStorage.connect(socket_path=srv.path, export="disk", **kw)  # type: ignore[arg-type]


# ---- item 10: unknown error codes --------------------------------------------------------

@pytest.mark.parametrize("code", [2**31, 2**32 - 1, 0x7FFF_FFFF, 77])
async def test_unknown_nbd_error_code_is_a_device_error(tmp_path, code: int) -> None:
    async with FakeNbdServer(str(tmp_path / "e.sock")) as fake:
        s = await connect(fake)
        try:
            fake.errors[P.NBD_CMD_READ] = code
            with pytest.raises(DeviceError) as ei:
                await s.readv(0, [memoryview(bytearray(512))])
            assert ei.value.status == 1
            assert str(code) in str(ei.value)
            assert isinstance(ei.value.cause, OSError)
            # the connection survives an error reply, whatever its number
            await s.readv(0, [memoryview(bytearray(512))])
        finally:
            await s.aclose()


# ---- helpers for the real-server tests ----------------------------------------------------

needs_qemu_nbd = pytest.mark.skipif(not QemuNbdServer.available(), reason="qemu-nbd not installed")


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-nbd-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_image(path: str, size: int = 4 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


def read_req(sector: int) -> list[Buffer]:
    return [header(0, sector), Buffer.writable(SECTOR), Buffer.writable(1)]


def write_req(sector: int, data: bytes) -> list[Buffer]:
    return [header(1, sector), Buffer.readable(data), Buffer.writable(1)]


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


SECTOR = 512


# ---- item 4: a server that stops answering ----------------------------------------------------

async def test_request_times_out_and_the_connection_is_replaced(tmp_path) -> None:
    """Fake server: replies held for ever; the request fails after ?timeout,
    the connection is dropped, and a new one serves the next request."""
    async with FakeNbdServer(str(tmp_path / "t.sock")) as fake:
        s = await open_storage(fake.url + "&timeout=0.3")
        assert isinstance(s, NbdStorage) and s.timeout == 0.3
        try:
            fake.hold = True
            with pytest.raises(DeviceError) as ei:
                await asyncio.wait_for(s.readv(0, [memoryview(bytearray(512))]), 10)
            assert ei.value.status == 1 and "did not answer a READ within 0.3 s" in str(ei.value)
            assert s.status()["connection"] in ("reconnecting", "connected")
            fake.hold = False
            await until(lambda: s.connection_state == "connected", 10, "reconnected")
            out = bytearray(512)
            await s.readv(0, [memoryview(out)])
            assert s.status()["reconnects"] == 1
        finally:
            await s.aclose()


def test_timeout_options_are_checked_before_anything_opens() -> None:
    spec = parse_storage_url("nbd://h/x?timeout=2.5&reconnect-delay=0")
    assert spec.options["timeout"] == "2.5"
    for bad in ("nbd://h/x?timeout=0", "nbd://h/x?timeout=-1", "nbd://h/x?timeout=soon",
                "nbd+unix:///x?socket=/s&reconnect-delay=nan", "nbd://h/x?timeout=inf"):
        with pytest.raises(ValueError, match=r"timeout|reconnect-delay"):
            parse_storage_url(bad)


async def test_swap_that_times_out_never_takes_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage with no timeout of its own that hangs: the swap fails at its
    bound, and it does not happen later when the storage comes back."""
    monkeypatch.setattr(blk_device, "QUIESCE_TIMEOUT", 0.3)
    old = FaultyStorage(MemoryStorage(1 << 20, url="mem:old"))
    device = BlkDevice(old)
    async with device_pair(device) as vm:
        old.pause("read")
        vm.post(0, read_req(0))
        await until(lambda: old.calls["read"] == 1, 5, "read on storage")
        new = MemoryStorage(1 << 20, url="mem:new")
        with pytest.raises(DeviceError, match="swap timed out"):
            await asyncio.wait_for(device.swap_storage(new), 10)
        assert not device.paused
        old.resume()
        (used,) = await vm.wait_used(0, 1)
        assert used.written[-1] == 0
        await asyncio.sleep(0.1)
        assert device.storage is old and device.info()["backend"] == "mem:old"
        used = await vm.request(0, write_req(1, b"o" * SECTOR))
        assert used.written == b"\0"
        assert old.calls["write"] == 1
        await new.aclose()


@needs_qemu_nbd
async def test_stopped_qemu_nbd_fails_requests_and_sigterm_is_bounded(short_dir: str) -> None:
    """The issue's scenario against a real daemon, qemu-nbd SIGSTOPped with
    requests in flight and ?timeout=3:

    * GET_VRING_BASE (QEMU's stop) returns once the stuck read has failed
      with IOERR, instead of never;
    * info shows the connection state and why;
    * SIGCONT brings the disk back with no operator action;
    * a VMM that reconnects while its old connection still drains a stuck
      request is held, not refused (the drain takes longer than the 2 s
      reconnect grace);
    * SIGTERM with the server stopped again ends the daemon well within 15 s.
    """
    image = make_image(os.path.join(short_dir, "disk.img"))
    nbd = QemuNbdServer(image, socket_path=os.path.join(short_dir, "nbd.sock"), export="disk")
    sock, ctl = os.path.join(short_dir, "blk.sock"), os.path.join(short_dir, "blk.ctl")
    log_path = os.path.join(short_dir, "daemon.log")
    nbd.start()
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--control", ctl,
                             "--backend", nbd.url + "&timeout=3"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)

    async def wait_connected() -> None:
        for _ in range(400):
            info = await control_request(ctl, {"command": "info"})
            if info["connection"] == "connected":
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not reconnected: {info}\n{open(log_path).read()}")

    try:
        vm = await VirtioFrontend.start(sock, timeout=15)
        try:
            assert (await vm.request(0, write_req(0, b"x" * SECTOR))).written == b"\0"
            nbd.suspend()
            vm.post(0, read_req(0))
            await asyncio.sleep(0.2)
            await asyncio.wait_for(vm.stop(), 10)              # GET_VRING_BASE: bounded
            (used,) = vm.queues[0].reap()
            assert used.written[-1] == 1                       # the stuck read: IOERR
            info = await control_request(ctl, {"command": "info"})
            assert info["connection"] in ("reconnecting", "failed"), info
            assert "did not answer a READ within 3 s" in info["connection_error"], info
        finally:
            await vm.close()
        nbd.resume()
        await wait_connected()
        vm = await VirtioFrontend.start(sock, timeout=15)
        try:
            assert (await vm.request(0, read_req(0))).written == b"x" * SECTOR + b"\0"
            nbd.suspend()
            vm.post(0, read_req(0))                            # stuck; the VMM goes away
            await asyncio.sleep(0.2)
        finally:
            await vm.close()
        vm = await VirtioFrontend.start(sock, timeout=15)      # and comes straight back
        try:
            nbd.resume()
            await wait_connected()
            assert (await vm.request(0, read_req(0))).written == b"x" * SECTOR + b"\0"
            # stopped again, with a read in flight: SIGTERM still ends the daemon
            nbd.suspend()
            vm.post(0, read_req(1))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            await vm.close()
        assert took < 15, f"SIGTERM took {took:.1f} s"
        assert code == 0, open(log_path).read()
        assert "refusing a second front-end" not in open(log_path).read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
        nbd.stop()


# ---- item 5: reconnect after a restart ---------------------------------------------------------

@needs_qemu_nbd
async def test_reconnects_after_qemu_nbd_is_killed_and_restarted(short_dir: str) -> None:
    image = make_image(os.path.join(short_dir, "disk.img"))
    nbd = QemuNbdServer(image, socket_path=os.path.join(short_dir, "nbd.sock"), export="disk")
    nbd.start()
    try:
        storage = await open_storage(nbd.url)
        device = BlkDevice(storage)
        ctl = os.path.join(short_dir, "ctl.sock")
        control = ControlServer(ctl, control_handlers(device))
        await control.start()
        try:
            async with device_pair(device) as vm:
                assert (await vm.request(0, write_req(3, b"k" * SECTOR))).written == b"\0"
                info = await control_request(ctl, {"command": "info"})
                assert (info["connection"], info["connection_error"]) == ("connected", None), info
                nbd.kill()
                used = await vm.request(0, read_req(3))
                assert used.written[-1] == 1                     # IOERR while it is down
                info = await control_request(ctl, {"command": "info"})
                assert info["connection"] == "reconnecting" and info["connection_error"], info
                nbd.start()                                      # restarted; nobody tells vdev
                await until(lambda: storage.connection_state == "connected", 15, "reconnected")
                used = await vm.request(0, read_req(3))
                assert used.written == b"k" * SECTOR + b"\0"
                info = await control_request(ctl, {"command": "info"})
                assert info["connection"] == "connected" and info["reconnects"] == 1, info
        finally:
            await control.close()
            await storage.aclose()
    finally:
        nbd.stop()


@needs_qemu_nbd
async def test_reconnect_delay_holds_requests_until_the_server_is_back(short_dir: str) -> None:
    image = make_image(os.path.join(short_dir, "disk.img"))
    nbd = QemuNbdServer(image, socket_path=os.path.join(short_dir, "nbd.sock"), export="disk")
    nbd.start()
    try:
        s = await open_storage(nbd.url + "&reconnect-delay=20")
        try:
            await s.writev(0, [memoryview(b"r" * 4096)])
            nbd.kill()
            out = bytearray(4096)
            reading = asyncio.ensure_future(s.readv(0, [memoryview(out)]))
            await asyncio.sleep(0.5)
            assert not reading.done()                # waits: the delay has not passed
            nbd.start()
            await asyncio.wait_for(reading, 20)
            assert out == b"r" * 4096
        finally:
            await s.aclose()
        s = await open_storage(nbd.url + "&reconnect-delay=0.5")
        try:
            nbd.kill()
            with pytest.raises(DeviceError, match="lost"):
                await asyncio.wait_for(s.readv(0, [memoryview(bytearray(512))]), 10)
        finally:
            await s.aclose()
    finally:
        nbd.stop()


# ---- item 7: resize against a one-client qemu-nbd ----------------------------------------------

@needs_qemu_nbd
async def test_resize_on_a_one_client_qemu_nbd(short_dir: str) -> None:
    """qemu-nbd's defaults: one client, exits when it leaves.  A second
    connection is never greeted, so resize must not hang on one; a restart
    with a bigger image is picked up by the reconnect and `resize`."""
    image = make_image(os.path.join(short_dir, "disk.img"), 4 << 20)
    nbd = QemuNbdServer(image, socket_path=os.path.join(short_dir, "nbd.sock"), export="disk",
                        shared=1, persistent=False)
    nbd.start()
    try:
        storage = await open_storage(nbd.url)
        device = BlkDevice(storage)
        ctl = os.path.join(short_dir, "ctl.sock")
        control = ControlServer(ctl, control_handlers(device))
        await control.start()
        try:
            async with device_pair(device) as vm:
                reply = await control_request(ctl, {"command": "resize"}, timeout=30)
                assert reply["ok"] is True, reply
                assert reply["capacity"] == 4 << 20 and reply["connection"] == "connected"
                used = await vm.request(0, write_req(0, b"z" * SECTOR))
                assert used.written == b"\0"            # the one connection is untouched
                # a restart with a bigger image
                nbd.kill()
                os.truncate(image, 8 << 20)
                nbd.start()
                await until(lambda: storage.connection_state == "connected" and storage.reconnects == 1,
                            15, "reconnected")
                reply = await control_request(ctl, {"command": "resize"}, timeout=30)
                assert reply["ok"] is True and reply["capacity"] == 8 << 20, reply
                msg = await asyncio.wait_for(vm.fe.backend_requests.get(), 5)
                assert msg.request == BackendReq.CONFIG_CHANGE_MSG
                used = await vm.request(0, write_req((8 << 20) // SECTOR - 1, b"e" * SECTOR))
                assert used.written == b"\0"
        finally:
            await control.close()
            await storage.aclose()
    finally:
        nbd.stop()


async def test_resize_failure_always_has_a_reason(tmp_path) -> None:
    async with FakeNbdServer(str(tmp_path / "r.sock")) as fake:
        s = await connect(fake)
        try:
            fake.silent = True        # the next connection is never greeted
            fake.flags |= P.NBD_FLAG_CAN_MULTI_CONN
            s.export_flags |= P.NBD_FLAG_CAN_MULTI_CONN
            s._connect_timeout = 0.3
            with pytest.raises(DeviceError) as ei:
                await s.refresh_size()
            text = str(ei.value)
            assert "cannot re-read the size" in text
            tail = text.split("cannot re-read the size", 1)[1]
            assert "no answer within 0.3 s" in tail, text
        finally:
            fake.silent = False
            await s.aclose()
