"""QEMU 7.2 guests against `vdev vsock`: socat in the guest, Unix sockets on the host.

Each test starts `vdev vsock` as its own process, boots a TCG guest with
``-device vhost-user-vsock-pci`` and runs socat in it (VSOCK-LISTEN,
VSOCK-CONNECT); the host side is the hybrid-vsock convention a user's
program follows (``CONNECT <port>`` on ``--uds-path``, a listener on
``<uds-path>_<port>``).  One boot covers several checks: the guest's CID,
16 MiB each way, 32 connections open at once, and a guest that unbinds and
rebinds its vsock driver (a reboot, as the device sees it) while a host
connection is open.  Two guests under two daemons of one group make the
second test.

Not here: "the guest's connections are reset when the daemon restarts and
the VMM reconnects".  QEMU 7.2 cannot reconnect a vhost-user-vsock back
end: with ``-chardev socket,...,reconnect=1`` the device fails at realize
("Failed to set msg fds": vhost-user-vsock does not wait for the chardev to
connect, unlike vhost-user-blk), and with ``server=on`` it accepts a new back
end but never sends it the handshake or the memory table again; its event
queue, where TRANSPORT_RESET goes, belongs to QEMU itself
(hw/virtio/vhost-vsock-common.c).  That behaviour of the device is tested
with a real daemon restart and an in-process VMM that does reconnect
(tests/unit/test_vsock_cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
HERE = Path(__file__).parent


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths (and <uds>_<port>) must stay under 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="vsq-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def vsock_cid_tool() -> bytes:
    """A static binary that prints the guest's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to build the guest's vsock-cid tool (apt-get install gcc)")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d, "vsock-cid")
        subprocess.run([cc, "-static", "-Os", "-o", str(out), str(HERE / "vsock_cid.c")], check=True)
        return out.read_bytes()


def vsock_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=vs0,path={sock}", "-device", "vhost-user-vsock-pci,chardev=vs0"]


async def host_send(uds: Path, port: int, data: bytes, timeout: float = 120) -> bytes:
    """CONNECT to the guest's ``port`` (retrying until it listens), send ``data``, close."""
    async with asyncio.timeout(timeout):
        while True:
            reader, writer = await asyncio.open_unix_connection(str(uds))
            writer.write(b"CONNECT %d\n" % port)
            line = await reader.readline()
            if line.startswith(b"OK "):
                break
            writer.close()          # nobody listens yet: the guest answered RST
            await asyncio.sleep(0.5)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await reader.read()
        writer.close()
        return line


GUEST_SCRIPT = """
vsock-cid
socat -u VSOCK-LISTEN:5000 STDOUT | sha256sum > /tmp/down.sha &
head -c 16777216 /dev/urandom > /tmp/up
echo "up=$(sha256sum /tmp/up | cut -d' ' -f1)"
socat -u FILE:/tmp/up VSOCK-CONNECT:2:5001 && echo up-sent
wait
echo "down=$(cut -d' ' -f1 /tmp/down.sha)"
for i in $(seq 1 32); do head -c 262144 /dev/urandom > /tmp/p$i; done
for i in $(seq 1 32); do
    (socat -t 60 STDIO VSOCK-CONNECT:2:5002 < /tmp/p$i > /tmp/r$i && cmp -s /tmp/p$i /tmp/r$i && echo echo-ok-$i) &
done
wait
echo done
socat -u VSOCK-LISTEN:5003 STDOUT > /tmp/held &
for i in $(seq 1 150); do grep -q hold /tmp/held 2>/dev/null && break; sleep 0.2; done
echo "held=$(cat /tmp/held)"
drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport
dev=$(basename $(ls -d $drv/virtio*))
echo $dev > $drv/unbind && echo $dev > $drv/bind && echo rebound
echo "host-saw=$(echo again | socat -t 60 STDIO VSOCK-CONNECT:2:5004)"
"""


async def test_guest_cid_16_mib_each_way_32_connections_and_a_driver_restart(guest_image: GuestImage, vdev_daemon,
                                                            short_dir: Path, vsock_cid_tool: bytes) -> None:
    sock, uds, ctl = short_dir / "vhost.sock", short_dir / "vm.vsock", short_dir / "ctl"
    vdev_daemon("vsock", "--socket", str(sock), "--guest-cid", "7", "--uds-path", str(uds),
                "--control", str(ctl), wait_for=sock)
    down = os.urandom(16 * MiB)
    uploaded: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()                     # until the guest's SHUTDOWN(SEND)
        writer.close()
        uploaded.set_result(hashlib.sha256(data).hexdigest())

    # 32 connections, all held open until the last one arrives, then echoed.
    arrived, everyone = [0], asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived[0] += 1
        if arrived[0] == 32:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), 120)
        writer.write(await reader.read())
        await writer.drain()
        writer.close()

    # A connection the guest holds while its driver restarts (a reboot, as the device sees it).
    async def held() -> bytes:
        async with asyncio.timeout(300):
            while True:
                reader, writer = await asyncio.open_unix_connection(str(uds))
                writer.write(b"CONNECT 5003\n")
                if (await reader.readline()).startswith(b"OK "):
                    break
                writer.close()
                await asyncio.sleep(0.5)
            writer.write(b"hold\n")
            data = await reader.read()              # end of stream once the driver restarts
            writer.close()
            return data

    again: list[bytes] = []

    async def after_restart(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The restarted driver connects; answer whether the held connection has ended by now.
        again.append(await reader.read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(holder), 30)
        writer.write(b"eof" if holder.done() else b"still-open")
        await writer.drain()
        writer.close()

    servers = [await asyncio.start_unix_server(upload, f"{uds}_5001"),
               await asyncio.start_unix_server(echo, f"{uds}_5002", limit=MiB),
               await asyncio.start_unix_server(after_restart, f"{uds}_5004")]
    try:
        sender = asyncio.create_task(host_send(uds, 5000, down))
        holder = asyncio.create_task(held())
        result = await run_in_guest(guest_image, GUEST_SCRIPT, timeout=400, qemu_args=vsock_args(sock),
                                    files={"/usr/bin/vsock-cid": vsock_cid_tool})
        ok_line = await asyncio.wait_for(sender, 10)
        held_rest = await asyncio.wait_for(holder, 10)
    finally:
        for s in servers:
            s.close()
    out = result.output
    assert result.exit_status == 0, result.console
    assert "cid=7\n" in out, out                                      # the guest read its CID
    assert f"down={hashlib.sha256(down).hexdigest()}" in out, out      # 16 MiB host → guest
    assert f"up={await asyncio.wait_for(uploaded, 5)}" in out, out     # 16 MiB guest → host
    assert int(ok_line.split()[1]) >= 1 << 30
    assert arrived[0] == 32
    echoed = sorted(int(line.removeprefix("echo-ok-")) for line in out.splitlines() if line.startswith("echo-ok-"))
    assert echoed == list(range(1, 33)), out
    assert "done" in out
    # The guest's driver started over: the host side of its old connection ended, and
    # the new driver connects again.
    assert "held=hold" in out and "rebound" in out and "host-saw=eof" in out, out
    assert held_rest == b"" and again == [b"again\n"]
    info = await control_request(str(ctl), {"command": "info"})
    assert info["guest_cid"] == 7
    assert info["stats"]["guest_connects"] == 34 and info["stats"]["host_connects"] >= 2, info
    assert not any(info["errors"].values()), info["errors"]


SIBLING_SCRIPT = """
head -c 4194304 /dev/urandom > /tmp/mine
echo "sent=$(sha256sum /tmp/mine | cut -d' ' -f1)"
socat -u VSOCK-LISTEN:{listen} STDOUT | sha256sum > /tmp/got.sha &
for i in $(seq 1 90); do
    socat -u FILE:/tmp/mine VSOCK-CONNECT:{peer}:{port} 2>/dev/null && break
    sleep 1
done
echo "tries=$i"
wait
echo "got=$(cut -d' ' -f1 /tmp/got.sha)"
"""


async def test_two_guests_in_one_group_exchange_data(guest_image: GuestImage, vdev_daemon, short_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Two daemons (two processes) meet through the group's sockets under this directory.
    monkeypatch.setenv("VDEV_VSOCK_RUNTIME_DIR", str(short_dir / "run"))
    socks = {}
    for cid in (7, 8):
        socks[cid] = short_dir / f"vhost{cid}.sock"
        vdev_daemon("vsock", "--socket", str(socks[cid]), "--guest-cid", str(cid),
                    "--uds-path", str(short_dir / f"vm{cid}.vsock"), "--group", "pair", wait_for=socks[cid])
    a, b = await asyncio.gather(
        run_in_guest(guest_image, SIBLING_SCRIPT.format(listen=6001, peer=8, port=6000), timeout=300,
                     qemu_args=vsock_args(socks[7])),
        run_in_guest(guest_image, SIBLING_SCRIPT.format(listen=6000, peer=7, port=6001), timeout=300,
                     qemu_args=vsock_args(socks[8])))
    assert a.exit_status == 0 and b.exit_status == 0, (a.console, b.console)

    def field(out: str, name: str) -> str:
        return out.split(f"{name}=")[1].split()[0]

    assert field(a.output, "sent") == field(b.output, "got"), (a.output, b.output)
    assert field(b.output, "sent") == field(a.output, "got"), (a.output, b.output)
    assert field(a.output, "got") != hashlib.sha256(b"").hexdigest()
