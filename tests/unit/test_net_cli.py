"""`vdev net` as users run it: bad values, refusals, and a cable between two daemons."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from backends.net.testing import NetHdr, can_use_tap, eth_frame
from vdev.testing import Buffer, DaemonProcess, VirtioFrontend

RX, TX = 0, 1


def run_vdev(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdev", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-net-")
    try:
        yield d
    finally:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


@pytest.mark.parametrize("args, named", [
    ([], "exactly one of --tap"),
    (["--tap", "t0", "--cable", "c"], "got --tap and --cable"),
    (["--loopback", "--mac", "zz:00:00:00:00:00"], "'zz:00:00:00:00:00'"),
    (["--loopback", "--mac", "01:00:5e:00:00:01"], "01:00:5e:00:00:01 is a multicast"),
    (["--loopback", "--mtu", "20"], "--mtu: 20"),
    (["--loopback", "--mtu", "big"], "--mtu: not a number: 'big'"),
    (["--loopback", "--queues", "0"], "--queues: 0"),
    (["--tap", "t0", "--tap-address", "10.0.0.300/24"], "'10.0.0.300/24'"),
    (["--tap", "t" * 16], "'" + "t" * 16 + "'"),
    (["--tap", "t0", "--bridge", "a/b"], "--bridge: 'a/b'"),
    (["--cable", "bad name!"], "'bad name!'"),
    (["--loopback", "--tap-netns", "ns1"], "--tap-netns needs --tap"),
])
def test_bad_values_exit_2_with_one_line_before_any_socket(short_dir: str, args: list[str], named: str) -> None:
    sock = os.path.join(short_dir, "net.sock")
    done = run_vdev("net", "--socket", sock, *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert not os.path.exists(sock)


@pytest.mark.skipif(not can_use_tap(), reason="needs root and /dev/net/tun")
@pytest.mark.parametrize("args, named", [
    (["--tap", "lo"], "--tap lo: an interface of that name exists"),
    (["--tap", "vdevnosuch0", "--tap-existing"], "--tap vdevnosuch0: no such interface"),
    (["--tap", "vdevnx0", "--tap-netns", "vdev-no-such-ns"], "'vdev-no-such-ns' does not exist"),
])
def test_system_refusals_exit_1_with_one_line_before_any_socket(short_dir: str, args: list[str],
                                                                named: str) -> None:
    sock = os.path.join(short_dir, "net.sock")
    done = run_vdev("net", "--socket", sock, *args)
    assert done.returncode == 1, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert not os.path.exists(sock)


class Daemon(DaemonProcess):
    """``vdev net --socket <sock> <args>``, its output in ``log`` (appended to on a restart)."""

    def __init__(self, args: list[str], sock: str, log: str) -> None:
        self.sock = sock
        super().__init__("net", "--socket", sock, *args, wait_for=[sock], log=log)


async def wait_link(vm: VirtioFrontend, up: bool, timeout: float = 15) -> None:
    want = b"\x01\x00" if up else b"\x00\x00"
    async with asyncio.timeout(timeout):
        while await vm.fe.get_config(6, 2) != want:
            await asyncio.sleep(0.05)


async def exchange(vma: VirtioFrontend, vmb: VirtioFrontend, tag: bytes) -> None:
    """One frame each way; each arrives intact."""
    for vm in (vma, vmb):
        vm.post(RX, [Buffer.writable(2048)])
    fa = eth_frame(b"\xff" * 6, b"\x52\x54\x00\x00\x00\x0a", 0x88B5, b"a->b " + tag)
    fb = eth_frame(b"\xff" * 6, b"\x52\x54\x00\x00\x00\x0b", 0x88B5, b"b->a " + tag * 300)
    vma.post(TX, [Buffer.readable(NetHdr().pack() + fa)])
    vmb.post(TX, [Buffer.readable(NetHdr().pack() + fb)])
    (rb,) = await vmb.wait_used(RX, 1)
    (ra,) = await vma.wait_used(RX, 1)
    assert rb.written[12:rb.length] == fa
    assert ra.written[12:ra.length] == fb
    await vma.wait_used(TX, 1)
    await vmb.wait_used(TX, 1)


async def test_cable_between_two_daemons_survives_a_restart(short_dir: str) -> None:
    """Two daemons on one --cable: frames both ways over the socket pair handed
    over at the rendezvous; when one daemon stops the other's link goes down
    (frames dropped, counted); the restarted daemon joins again."""
    name = "t-" + uuid.uuid4().hex[:10]
    a = Daemon(["--cable", name, "--control", os.path.join(short_dir, "a.ctl")],
               os.path.join(short_dir, "a.sock"), os.path.join(short_dir, "a.log")).start()
    b = Daemon(["--cable", name], os.path.join(short_dir, "b.sock"), os.path.join(short_dir, "b.log")).start()
    vma = vmb = None
    try:
        vma = await VirtioFrontend.start(a.sock)
        vmb = await VirtioFrontend.start(b.sock)
        await wait_link(vma, True)
        await exchange(vma, vmb, b"first")

        await vmb.close()
        vmb = None
        assert b.stop() == 0
        await wait_link(vma, False)
        vma.post(TX, [Buffer.readable(NetHdr().pack() + eth_frame(b"\xff" * 6, b"\x52\x54\x00\x00\x00\x0a",
                                                                  0x88B5, b"into the void"))])
        await vma.wait_used(TX, 1)

        assert not os.path.exists(b.sock)        # removed on exit: the restart waits for a new one
        b.start()
        vmb = await VirtioFrontend.start(b.sock)
        await wait_link(vma, True)
        await wait_link(vmb, True)
        await exchange(vma, vmb, b"again")

        done = await asyncio.to_thread(run_vdev, "ctl", os.path.join(short_dir, "a.ctl"), "info")
        info = json.loads(done.stdout)
        assert info["ok"] and info["link"] == "cable" and info["peer"] == "another daemon"
        tx = next(q for q in info["queues"] if q["kind"] == "tx")
        assert tx["frames"] == 2 and tx["link_down_drops"] == 1
    finally:
        for vm in (vma, vmb):
            if vm is not None:
                await vm.close()
        assert a.stop() == 0, a.log()
        if b.proc is not None and b.proc.poll() is None:
            assert b.stop() == 0, b.log()


def test_loading_every_device_command_leaves_pyroute2_unimported() -> None:
    """`vdev` loads every device's module to list them, so `vdev blk` paid for
    pyroute2 (about 8 MiB resident, past the 40 MiB an idle daemon may use)."""
    code = ("import sys, vdev.cli; vdev.cli.load_commands(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
