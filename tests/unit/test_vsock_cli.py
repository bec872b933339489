"""`vdev vsock` on the command line: validation before any socket, and the real daemon
as a subprocess (two in one group, a restart, the control socket) driven by in-process
front-ends with a guest vsock stack on their rings."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from backends.vsock.testing import VsockGuest, attach_guest
from vdev.cli import main
from vdev.testing import DaemonProcess, VirtioFrontend


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vs-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def test_help_shows_the_qemu_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["vsock", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "vhost-user-vsock-pci" in out and "memory-backend-memfd" in out and "share=on" in out
    for option in ("--socket", "--guest-cid", "--uds-path", "--group", "--client", "--control"):
        assert option in out


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["vsock", "--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "vsock"


@pytest.mark.parametrize("args, named", [
    (["--guest-cid", "0"], "--guest-cid: 0"),
    (["--guest-cid", "1"], "--guest-cid: 1"),
    (["--guest-cid", "2"], "--guest-cid: 2"),
    (["--guest-cid", "4294967295"], "--guest-cid: 4294967295"),
    (["--guest-cid", "18446744073709551615"], "--guest-cid: 18446744073709551615"),
    (["--guest-cid", "three"], "'three'"),
    (["--uds-path", "/nonexistent-dir/v.sock"], "'/nonexistent-dir'"),
    (["--group", "../escape"], "'../escape'"),
    (["--group", ""], "''"),
    (["--control", "/nonexistent-dir/ctl"], "'/nonexistent-dir'"),
    (["--queue-size", "100"], "100"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_a_bad_value_is_one_line_naming_it_and_exit_2_before_any_socket(
        args: list[str], named: str, short_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    opts = {"--socket": os.path.join(short_dir, "vhost.sock"), "--guest-cid": "3",
            "--uds-path": os.path.join(short_dir, "v.sock"), "--control": None, "--group": None,
            "--queue-size": None}
    opts.update(dict(zip(args[::2], args[1::2])))
    argv = ["vsock"] + [x for k, v in opts.items() if v is not None for x in (k, v)]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert os.listdir(short_dir) == []


# -- the daemon as users run it -------------------------------------------------------------------------

class Daemon(DaemonProcess):
    """``vdev vsock --socket <dir>/<name>.vhost <args>``, output in ``log`` (default
    <dir>/<name>.log); ``wait=False``: do not wait for the socket (it should fail)."""

    def __init__(self, short_dir: str, name: str, *args: str, env: dict[str, str] | None = None,
                 nofile: int | None = None, log: str | None = None, wait: bool = True) -> None:
        self.sock = os.path.join(short_dir, f"{name}.vhost")

        def limit_files() -> None:
            assert nofile is not None
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        super().__init__("vsock", "--socket", self.sock, *args, wait_for=[self.sock] if wait else [],
                         log=log or os.path.join(short_dir, f"{name}.log"), env=env,
                         preexec_fn=None if nofile is None else limit_files)


@contextlib.asynccontextmanager
async def guest_of(daemon: Daemon, cid: int, events: int = 0) -> AsyncIterator[VsockGuest]:
    vm = await VirtioFrontend.start(daemon.sock, memory_size=32 << 20)
    guest = await attach_guest(vm, cid, events=events)
    try:
        yield guest
    finally:
        await guest.stop()
        await guest.vm.close()


async def host_connect(uds: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_unix_connection(uds)
    writer.write(b"CONNECT %d\n" % port)
    return reader, writer, await asyncio.wait_for(reader.readline(), 10)


async def test_two_daemons_in_one_group_carry_data_between_their_guests(short_dir: str) -> None:
    env = {"VDEV_VSOCK_RUNTIME_DIR": os.path.join(short_dir, "run")}
    ctl = os.path.join(short_dir, "a.ctl")
    a = Daemon(short_dir, "a", "--guest-cid", "3", "--uds-path", os.path.join(short_dir, "a.sock"),
               "--group", "lab", "--control", ctl, env=env).start()
    b = Daemon(short_dir, "b", "--guest-cid", "4", "--uds-path", os.path.join(short_dir, "b.sock"),
               "--group", "lab", env=env).start()
    try:
        assert os.path.exists(os.path.join(short_dir, "run", "lab", "3.sock"))
        async with guest_of(a, 3) as ga, guest_of(b, 4) as gb:
            accepted = gb.listen(9000)
            sa = await ga.connect(9000, cid=4)
            sb = await asyncio.wait_for(accepted.get(), 5)
            assert (sb.peer_cid, sb.peer_port) == (3, sa.local_port)
            there, back = os.urandom(2 << 20), os.urandom(1 << 20)
            sending = asyncio.create_task(sa.send(there))
            assert hashlib.sha256(await sb.recv_exactly(len(there))).digest() == hashlib.sha256(there).digest()
            await sending
            sending = asyncio.create_task(sb.send(back))
            assert await sa.recv_exactly(len(back)) == back
            await sending
            await sb.close()
            # CID 5 is in no daemon of the group.
            with pytest.raises(ConnectionRefusedError):
                await ga.connect(9000, cid=5)
            # The control socket, through `vdev ctl` as an operator types it.
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "vdev", "ctl", ctl, "info",
                                                        stdout=subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
            info = json.loads(out)
            assert info["ok"] and info["guest_cid"] == 3 and info["group"] == "lab"
            assert info["stats"]["sibling_connects_out"] == 1 and info["errors"]["connect_failed"] == 1
        # A third device claiming CID 3 in the group: one line, exit 1.
        c = Daemon(short_dir, "c", "--guest-cid", "3", "--uds-path", os.path.join(short_dir, "c.sock"),
                   "--group", "lab", env=env, wait=False).start()
        try:
            assert c.proc is not None and c.proc.wait(15) == 1
        finally:
            c.stop()
        assert "CID 3 is already held" in c.log() and c.log().count("error:") == 1, c.log()
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
    # Stopped daemons leave no sockets behind.
    assert not os.path.exists(os.path.join(short_dir, "run", "lab", "3.sock"))
    assert not os.path.exists(os.path.join(short_dir, "a.sock"))


async def test_guest_connections_are_reset_when_the_daemon_restarts_and_the_vmm_reconnects(
        short_dir: str) -> None:
    uds = os.path.join(short_dir, "v.sock")
    args = ("--guest-cid", "3", "--uds-path", uds)
    # One vhost-user socket path (the VMM reconnects to it), an output file each.
    first = Daemon(short_dir, "d", *args, log=os.path.join(short_dir, "first.log")).start()
    second = Daemon(short_dir, "d", *args, log=os.path.join(short_dir, "second.log"))
    try:
        async with guest_of(first, 3, events=1) as guest:
            accepted = guest.listen(1234)
            reader, writer, line = await host_connect(uds, 1234)
            assert line.startswith(b"OK ")
            stream = await accepted.get()
            writer.write(b"before")
            assert await stream.recv_exactly(6) == b"before"
            assert first.stop() == 0
            assert await asyncio.wait_for(reader.read(), 5) == b""     # host side closed
            second.start()
            await guest.vm.reconnect(second.sock)
            # The new daemon sees rings that already moved: the guest gets TRANSPORT_RESET
            # and drops the connection the old daemon had.
            async with asyncio.timeout(10):
                while guest.events != [0]:
                    await asyncio.sleep(0.01)
            assert stream.was_reset and stream.state == "closed"
            with pytest.raises(ConnectionResetError):
                await stream.recv()
            # The new daemon serves new connections.
            _r2, w2, line = await host_connect(uds, 1234)
            assert line.startswith(b"OK ")
            s2 = await accepted.get()
            w2.write(b"after")
            assert await s2.recv_exactly(5) == b"after"
            w2.close()
            writer.close()
    finally:
        first.stop()
        if second.proc is not None:
            assert second.stop() == 0, second.log()
    assert "transport reset" in second.log(), second.log()


def test_a_low_open_file_limit_is_raised_or_reported(short_dir: str) -> None:
    d = Daemon(short_dir, "d", "--guest-cid", "3", "--uds-path", os.path.join(short_dir, "v.sock"),
               nofile=256).start()
    assert d.stop() == 0
    assert "open-file limit is 256" in d.log(), d.log()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_file_descriptors_the_daemon_backs_off_and_recovers(short_dir: str) -> None:
    uds, ctl = os.path.join(short_dir, "v.sock"), os.path.join(short_dir, "ctl")
    d = Daemon(short_dir, "d", "--guest-cid", "3", "--uds-path", uds, "--control", ctl, nofile=64).start()
    assert d.proc is not None
    try:
        flood = []
        try:
            for _ in range(100):           # more than the daemon can accept: they wait in the backlog
                flood.append(await asyncio.open_unix_connection(uds))
            await asyncio.sleep(0.3)
            before = _cpu_seconds(d.proc.pid)
            await asyncio.sleep(1.0)
            # Not spinning on a listener it cannot accept from (that would be ~1 s of CPU).
            assert _cpu_seconds(d.proc.pid) - before < 0.5
        finally:
            for _r, w in flood:
                w.close()
        await asyncio.sleep(0.5)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "vdev", "ctl", ctl, "info",
                                                    stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        info = json.loads(out)
        assert info["errors"]["accept_failed"] >= 1, info
        # It serves again: a host program gets through to the handshake.
        reader, writer = await asyncio.open_unix_connection(uds)
        writer.write(b"HELLO\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        assert d.stop() == 0, d.log()
    assert "cannot accept" in d.log()
