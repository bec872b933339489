"""`vdev blk` on the command line: help, validation before any socket, capabilities,
and the real daemon as a subprocess driven by a VirtioFrontend."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from vdev import __version__
from vdev.cli import main
from vdev.testing import Buffer, VirtioFrontend

SECTOR = 512


@pytest.fixture
def short_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="vdev-cli-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str]) -> int:
    """main() returns a code for its own errors and raises SystemExit for argparse's."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# ---- help, version, capabilities ---------------------------------------------------------------

def test_blk_help_shows_a_qemu_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["blk", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "qemu-system" in out
    assert "vhost-user-blk-pci" in out
    assert "chardev" in out
    for option in ("--backend", "--socket", "--queues", "--queue-size", "--serial", "--read-only",
                   "--control"):
        assert option in out


def test_top_level_help_lists_blk(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "blk" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vdev {__version__}"


def test_print_capabilities(capsys: pytest.CaptureFixture[str], short_dir: str) -> None:
    sock = os.path.join(short_dir, "s.sock")
    assert run(["blk", "--socket", sock, "--backend", "mem:1M", "--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps["type"] == "block"
    assert isinstance(caps.get("features", []), list)
    assert not os.path.exists(sock)


def test_print_capabilities_alone(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["blk", "--print-capabilities"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["type"] == "block"


# ---- bad values: exit 2, one line naming the value, no socket ---------------------------------------

BAD = {
    "unknown-scheme": (["--backend", "foo:bar"], "foo"),
    "missing-file": (["--backend", "/nonexistent/vdev-test/disk.img"], "/nonexistent/vdev-test/disk.img"),
    "missing-file-url": (["--backend", "file:/nonexistent/vdev-test/d.img"], "/nonexistent/vdev-test/d.img"),
    "bad-size": (["--backend", "mem:12Q"], "12Q"),
    "size-not-sectors": (["--backend", "mem:1000"], "1000"),
    "bad-url-option": (["--backend", "mem:1M?colour=red"], "colour"),
    "queues-zero": (["--backend", "mem:1M", "--queues", "0"], "--queues"),
    "queues-too-many": (["--backend", "mem:1M", "--queues", "65"], "65"),
    "queues-not-a-number": (["--backend", "mem:1M", "--queues", "abc"], "abc"),
    "queue-size-not-power-of-2": (["--backend", "mem:1M", "--queue-size", "100"], "100"),
    "queue-size-too-small": (["--backend", "mem:1M", "--queue-size", "2"], "2"),
    "serial-too-long": (["--backend", "mem:1M", "--serial", "S" * 21], "S" * 21),
    "serial-not-ascii": (["--backend", "mem:1M", "--serial", "disk-\u00e9"], "disk-"),
    "log-level": (["--backend", "mem:1M", "--log-level", "loud"], "loud"),
    "unknown-option": (["--backend", "mem:1M", "--colour"], "--colour"),
    "no-backend": ([], "--backend"),
    "dataplane-unknown": (["--backend", "mem:1M", "--dataplane", "rust"], "rust"),
    "dataplane-native-nbd": (["--backend", "nbd://localhost:10809/x", "--dataplane", "native"], "nbd"),
    "poll-us-negative": (["--backend", "mem:1M", "--poll-us", "-1"], "-1"),
    "poll-us-not-a-number": (["--backend", "mem:1M", "--poll-us", "fast"], "fast"),
    "poll-us-too-long": (["--backend", "mem:1M", "--poll-us", "2000000"], "2000000"),
    "poll-us-on-python": (["--backend", "mem:1M", "--dataplane", "python", "--poll-us", "50"], "--poll-us"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_exits_2_with_one_line(case: str, capsys: pytest.CaptureFixture[str],
                                         short_dir: str) -> None:
    args, named = BAD[case]
    sock = os.path.join(short_dir, "blk.sock")
    code = run(["blk", "--socket", sock, *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    prefix = "vdev blk: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert named in lines[0]
    assert captured.out == ""
    assert os.listdir(short_dir) == [], "nothing may be created for a bad command line"


def test_queues_zero_names_the_value(capsys: pytest.CaptureFixture[str], short_dir: str) -> None:
    assert run(["blk", "--socket", os.path.join(short_dir, "s"), "--backend", "mem:1M",
                "--queues", "0"]) == 2
    err = capsys.readouterr().err
    assert "--queues" in err and " 0 " in err


def test_socket_in_missing_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["blk", "--socket", "/nonexistent/vdev-test/blk.sock", "--backend", "mem:1M"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent/vdev-test" in err


def test_socket_and_fd_are_exclusive(capsys: pytest.CaptureFixture[str], short_dir: str) -> None:
    assert run(["blk", "--backend", "mem:1M"]) == 2
    assert "--socket" in capsys.readouterr().err
    assert run(["blk", "--socket", os.path.join(short_dir, "s"), "--fd", "3", "--backend", "mem:1M"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert os.listdir(short_dir) == []


# ---- the real daemon ------------------------------------------------------------------------------------

def _header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


async def test_daemon_serves_and_stops_on_sigterm(short_dir: str) -> None:
    sock = os.path.join(short_dir, "blk.sock")
    ctl = os.path.join(short_dir, "blk.ctl")
    proc = subprocess.Popen([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--backend", "mem:64M",
                             "--serial", "cli-disk", "--control", ctl],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        vm = await VirtioFrontend.start(sock, timeout=15)
        try:
            raw = await vm.fe.get_config(0, 8)
            assert struct.unpack("<Q", raw)[0] == (64 << 20) // SECTOR
            data = bytes(range(256)) * 16
            used = await vm.request(0, [_header(1, 100), Buffer.readable(data), Buffer.writable(1)])
            assert (used.length, used.written) == (1, b"\x00")
            used = await vm.request(0, [_header(0, 100), Buffer.writable(len(data)), Buffer.writable(1)])
            assert (used.length, used.written) == (len(data) + 1, data + b"\x00")
            used = await vm.request(0, [_header(8, 0), Buffer.writable(20), Buffer.writable(1)])
            assert used.written == b"cli-disk" + bytes(12) + b"\x00"
            # the control socket answers through `vdev ctl`
            code = await asyncio.to_thread(main, ["ctl", ctl, "info"])
            assert code == 0
        finally:
            await vm.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        out, err = proc.communicate()
        assert code == 0, err.decode(errors="replace")
        assert not os.path.exists(sock), "the socket file is removed on exit"
        assert not os.path.exists(ctl), "the control socket is removed on exit"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def test_daemon_sigterm_with_frontend_connected(short_dir: str) -> None:
    sock = os.path.join(short_dir, "blk.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vdev", "blk", "--socket", sock, "--backend", "null:1M"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        vm = await VirtioFrontend.start(sock, timeout=15)
        try:
            used = await vm.request(0, [_header(0, 0), Buffer.writable(SECTOR), Buffer.writable(1)])
            assert (used.length, used.written) == (SECTOR + 1, bytes(SECTOR + 1))
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 10)
        finally:
            await vm.close()
        assert code == 0, proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_storage_that_will_not_open_fails_in_one_line(capsys: pytest.CaptureFixture[str],
                                                      short_dir: str) -> None:
    """A URL that parses but cannot be opened (no NBD server) exits 1, one line, no socket."""
    sock = os.path.join(short_dir, "blk.sock")
    missing = os.path.join(short_dir, "no-nbd.sock")
    code = run(["blk", "--socket", sock, "--backend", f"nbd+unix:///disk?socket={missing}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("vdev blk: error: ") and missing in lines[0], lines
    assert not os.path.exists(sock)


def test_main_in_process_leaves_sigterm_as_it_found_it(short_dir: str) -> None:
    """Calling main() must not leave SIGTERM bound to its closed event loop."""
    before = signal.getsignal(signal.SIGTERM)
    missing = os.path.join(short_dir, "no-nbd.sock")
    run(["blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend",
         f"nbd+unix:///disk?socket={missing}"])
    assert signal.getsignal(signal.SIGTERM) == before
