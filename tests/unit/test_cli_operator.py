"""The operator's experience, item by item (issue 12's list), each through the
real command: `vdev` on PATH after the set-up, the help texts, the
capabilities, `vdev ctl` (relative paths resolved on the caller's side,
unknown keys refused, `--wait` with its progress bar on a terminal only),
the daemon's log for the two mistakes only QEMU used to see (guest RAM not
shared, too few queues), systemd socket activation through ``--fd``, the
units under contrib/, and the generated bash completion."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.blk import CONTROL_COMMANDS, BlkCommand, control_handlers
from backends.blk.device import BlkDevice
from backends.blk.storage import open_storage
from vdev.cli import build_parser, load_commands, main, progress_line
from vdev.errors import GuestError
from vdev.memory import RegionTable
from vdev.testing import Buffer, DaemonProcess, VirtioFrontend
from vhost_user.frontend import Frontend

REPO = Path(__file__).resolve().parents[2]
SECTOR = 512
MiB = 1 << 20


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-op-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def start_daemon(args: list[str], *, cwd: str, wait_for: str) -> DaemonProcess:
    """`vdev <args>` as its own process in ``cwd`` (this checkout on its
    PYTHONPATH, whatever the directory), ready once ``wait_for`` exists."""
    return DaemonProcess(*args, wait_for=[wait_for], cwd=cwd, env={"PYTHONPATH": str(REPO)},
                         stop_timeout=15).start()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        rc = d.stop()
        assert rc == 0, d.log()


def _header(rtype: int, sector: int) -> Buffer:
    return Buffer.readable(struct.pack("<IIQ", rtype, 0, sector))


# ---- vdev on PATH ------------------------------------------------------------------------------

def test_install_launcher_puts_vdev_on_path(short_dir: str) -> None:
    # What scripts/setup.sh runs last: afterwards `which vdev` finds it and the
    # README's commands run as written.  (Into a scratch directory here.)
    bindir, compdir = os.path.join(short_dir, "bin"), os.path.join(short_dir, "completions")
    env = {**os.environ, "VDEV_BIN_DIR": bindir, "VDEV_COMPLETION_DIR": compdir}
    r = subprocess.run(["bash", str(REPO / "scripts/install-launcher.sh")], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    path = f"{bindir}:/usr/bin:/bin"
    assert shutil.which("vdev", path=path) == os.path.join(bindir, "vdev")
    out = subprocess.run(["vdev", "--version"], env={**os.environ, "PATH": path}, capture_output=True,
                         text=True, check=True, cwd=short_dir)
    assert out.stdout.startswith("vdev ")
    out = subprocess.run(["vdev", "blk", "--print-capabilities"], env={**os.environ, "PATH": path},
                         capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout)["type"] == "block"
    assert "complete" in open(os.path.join(compdir, "vdev")).read()
    # Run again: the launcher is replaced; a foreign `vdev` is left alone.
    r = subprocess.run(["bash", str(REPO / "scripts/install-launcher.sh")], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0
    with open(os.path.join(bindir, "vdev"), "w") as f:
        f.write("#!/bin/sh\necho someone else's\n")
    r = subprocess.run(["bash", str(REPO / "scripts/install-launcher.sh")], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and "left alone" in r.stderr
    assert "someone else's" in open(os.path.join(bindir, "vdev")).read()


def test_setup_runs_the_launcher_and_readme_says_so() -> None:
    setup = (REPO / "scripts/setup.sh").read_text()
    assert "scripts/install-launcher.sh" in setup
    readme = (REPO / "README.md").read_text()
    assert "/usr/local/bin/vdev" in readme and ".venv/bin/vdev" in readme
    assert "](benchmarks/README.md)" in readme


@pytest.mark.parametrize("args, needle", [
    (["--image", "/nonexistent/disk.img"], "--image: no such image file '/nonexistent/disk.img'"),
    (["--dir", "/nonexistent-dir"], "--dir: no such directory '/nonexistent-dir'"),
    (["--size", "12Q"], "--size: cannot parse size '12Q'"),
])
def test_benchmark_names_a_missing_file_in_one_line(args: list[str], needle: str) -> None:
    # benchmarks/ used to end with a bare "[Errno 2] No such file or directory".
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/mirror_blk.py"), *args], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


# ---- help texts --------------------------------------------------------------------------------

def test_top_level_help_lists_devices_apart_from_tools(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of([], capsys)
    devices, _, tools = out.partition("tools:")
    device_names = re.findall(r"^    (\S+)\s", devices.partition("devices:")[2], re.MULTILINE)
    assert "blk" in device_names and "rng" in device_names
    assert not {"ctl", "bench", "completion"} & set(device_names), device_names
    for tool in ("ctl", "bench", "completion"):
        assert re.search(rf"^  {tool}\s", tools, re.MULTILINE), tools


def test_ctl_help_lists_every_control_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of(["ctl"], capsys)
    for name in ("info", "swap", "pause", "resume", "resize", "mirror", "jobs", "cancel", "pivot"):
        assert re.search(rf"^    {name}\b", out, re.MULTILINE), (name, out)
    assert "mirror target=URL [granularity=SIZE] [rate=BYTES_PER_SEC]" in out
    assert "--wait" in out


async def test_ctl_help_cannot_drift_from_the_handlers(tmp_path) -> None:
    device = BlkDevice(await open_storage("mem:1M"))
    handlers = control_handlers(device)
    assert set(handlers) == {c.name for c in CONTROL_COMMANDS}
    for c in CONTROL_COMMANDS:
        assert handlers[c.name].params == c.params
    await device.aclose()


def test_blk_help_qemu_example_is_indented_as_one_block(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of(["blk"], capsys)
    example = out.partition("QEMU example:\n")[2].rstrip("\n").splitlines()
    assert len(example) >= 5 and example[0].lstrip().startswith("vdev blk"), example
    assert all(line.startswith("  ") for line in example), example
    # the continuation lines stay indented under the qemu command
    qemu = next(i for i, line in enumerate(example) if "qemu-system" in line)
    assert all(line.startswith("      -") for line in example[qemu + 1:]), example


# ---- capabilities ------------------------------------------------------------------------------

def test_print_capabilities_lists_the_spec_block_features(capsys: pytest.CaptureFixture[str]) -> None:
    # vhost-user.json VHostUserBackendBlockFeature: read-only, blk-file.
    assert run(["blk", "--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps == {"type": "block", "features": ["read-only", "blk-file"]}
    parser = build_parser(load_commands())
    blk_help = parser._subparsers._group_actions[0].choices["blk"].format_help()  # type: ignore[union-attr]
    for feature in caps["features"]:
        assert f"--{feature}" in blk_help      # each one is an option that works


def test_blk_file_is_the_file_backend(tmp_path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    cmd = BlkCommand()
    parser = build_parser(load_commands())
    args = parser.parse_args(["blk", "--socket", str(tmp_path / "s"), "--blk-file", str(img)])
    assert cmd.configure(args).backend == f"file:{img}"


@pytest.mark.parametrize("extra, needle", [
    ([], "give exactly one of --backend URL and --blk-file PATH"),
    (["--backend", "mem:1M", "--blk-file", "/x.img"], "give exactly one of --backend URL and --blk-file"),
    (["--blk-file", "/nonexistent/x.img"], "no such file: '/nonexistent/x.img'"),
])
def test_blk_file_errors_are_one_line(extra: list[str], needle: str, short_dir: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["blk", "--socket", os.path.join(short_dir, "s.sock"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert os.listdir(short_dir) == []


# ---- vdev ctl ----------------------------------------------------------------------------------

def test_ctl_swap_resolves_a_relative_path_on_the_callers_side(short_dir: str, daemons: list[DaemonProcess],
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_dir, my_dir = os.path.join(short_dir, "daemon"), os.path.join(short_dir, "me")
    os.mkdir(daemon_dir)
    os.mkdir(my_dir)
    with open(os.path.join(my_dir, "disk.img"), "wb") as f:
        f.truncate(MiB)
    ctl = os.path.join(short_dir, "blk.ctl")
    daemons.append(start_daemon(["blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend", "mem:1M",
                           "--control", ctl], cwd=daemon_dir, wait_for=ctl))
    monkeypatch.chdir(my_dir)
    assert run(["ctl", ctl, "swap", "backend=disk.img"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["backend"] == os.path.join(my_dir, "disk.img"), reply
    assert run(["ctl", ctl, "swap", "backend=file:./disk.img?readonly=on"]) == 1   # writable disk
    assert "read-only storage 'file:" + os.path.join(my_dir, "disk.img") in capsys.readouterr().out


def test_ctl_unknown_key_is_refused_naming_it(short_dir: str, daemons: list[DaemonProcess],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ctl = os.path.join(short_dir, "blk.ctl")
    daemons.append(start_daemon(["blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend", "mem:1M",
                           "--control", ctl], cwd=short_dir, wait_for=ctl))
    assert run(["ctl", ctl, "swap", "backend=mem:1G", "queues=4"]) == 1
    reply = json.loads(capsys.readouterr().out)
    assert not reply["ok"] and "unknown parameter 'queues'" in reply["error"], reply
    assert run(["ctl", ctl, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "mem:1M"     # nothing was swapped
    assert run(["ctl", ctl, "pause", "now=1"]) == 1
    assert "unknown parameter 'now'" in capsys.readouterr().out


def test_ctl_wait_only_with_a_command_that_starts_a_job(short_dir: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["ctl", os.path.join(short_dir, "none.ctl"), "info", "--wait"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'info' starts no job (only mirror do)" in err[0], err


def test_progress_line() -> None:
    line = progress_line({"type": "mirror", "id": 3, "phase": "copying", "progress": 0.5, "size": 1 << 30,
                          "dirty_bytes": 12 << 20, "rate": 200 << 20})
    assert line.startswith("mirror 3 [" + "#" * 15 + "-" * 15 + "]  50.0%  512.0/1024.0 MiB")
    assert "dirty 12.0 MiB" in line and "200.0 MiB/s" in line and "copying" in line


def _start_mirror_daemon(short_dir: str, daemons: list[DaemonProcess]) -> tuple[str, str]:
    src, dst = os.path.join(short_dir, "src.img"), os.path.join(short_dir, "dst.img")
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB))
    with open(dst, "wb") as f:
        f.truncate(8 * MiB)
    ctl = os.path.join(short_dir, "blk.ctl")
    daemons.append(start_daemon(["blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend", f"file:{src}",
                           "--control", ctl], cwd=short_dir, wait_for=ctl))
    return ctl, dst


def test_ctl_mirror_wait_without_a_terminal_prints_only_the_result(short_dir: str, daemons: list[DaemonProcess]
                                                                    ) -> None:
    ctl, dst = _start_mirror_daemon(short_dir, daemons)
    r = subprocess.run([sys.executable, "-m", "vdev", "ctl", ctl, "mirror", "target=dst.img", "rate=16M",
                        "--wait"], cwd=short_dir, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stderr == ""                   # no progress bar when not on a terminal
    final = json.loads(r.stdout)
    # target=dst.img was the caller's ./dst.img
    assert final["phase"] == "done" and final["target"] == dst and final["elapsed"] >= 0.3, final
    info = subprocess.run([sys.executable, "-m", "vdev", "ctl", ctl, "info"], capture_output=True, text=True,
                          check=True)
    assert json.loads(info.stdout)["backend"] == dst
    assert open(dst, "rb").read() == open(os.path.join(short_dir, "src.img"), "rb").read()


def _run_on_a_terminal(argv: list[str], cwd: str, timeout: float = 60) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        rc = proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_ctl_mirror_wait_on_a_terminal_shows_a_progress_bar(short_dir: str, daemons: list[DaemonProcess]) -> None:
    ctl, dst = _start_mirror_daemon(short_dir, daemons)
    rc, out = _run_on_a_terminal([sys.executable, "-m", "vdev", "ctl", ctl, "mirror", f"target={dst}",
                                  "rate=8M", "--wait"], cwd=short_dir)
    assert rc == 0, out
    assert re.search(r"mirror 1 \[#*-*\] +\d+\.\d%", out), out
    assert '"phase": "done"' in out


def test_ctl_mirror_wait_exits_1_when_the_job_is_cancelled(short_dir: str, daemons: list[DaemonProcess]) -> None:
    ctl, dst = _start_mirror_daemon(short_dir, daemons)
    waiting = subprocess.Popen([sys.executable, "-m", "vdev", "ctl", ctl, "mirror", f"target={dst}",
                                "rate=2M", "--wait"], cwd=short_dir, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        jobs = json.loads(subprocess.run([sys.executable, "-m", "vdev", "ctl", ctl, "jobs"],
                                         capture_output=True, text=True, check=True).stdout)["jobs"]
        if jobs and jobs[-1]["bytes_copied"] > 0:
            break
        assert time.monotonic() < deadline and waiting.poll() is None
        time.sleep(0.1)
    cancel = subprocess.run([sys.executable, "-m", "vdev", "ctl", ctl, "cancel"], capture_output=True,
                            text=True, check=False)
    assert cancel.returncode == 0, cancel.stdout
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 1, (out, err)
    assert json.loads(out)["phase"] == "cancelled"


# ---- the daemon's log for mistakes only QEMU used to see -----------------------------------------

def test_unmapped_ring_address_names_shared_memory() -> None:
    table = RegionTable([])
    with pytest.raises(GuestError, match=r"share=on") as exc:
        table.frontend_to_guest(0x7F0000001000)
    assert "the table has 0 regions" in str(exc.value) and "memory-backend-memfd" in str(exc.value)


async def test_queue_count_mismatch_is_logged_by_the_daemon(short_dir: str, daemons: list[DaemonProcess]) -> None:
    # QEMU with num-queues above what a back end offers asks GET_QUEUE_NUM
    # and leaves at once (the conversation replayed here; tests/qemu has QEMU).
    sock = os.path.join(short_dir, "blk.sock")
    d = start_daemon(["blk", "--socket", sock, "--backend", "mem:1M", "--queues", "2"], cwd=short_dir,
               wait_for=sock)
    daemons.append(d)
    fe = await Frontend.connect(sock)
    try:
        await fe.get_features()
        await fe.set_protocol_features(await fe.get_protocol_features())
        assert await fe.get_queue_num() == 2
    finally:
        await fe.close()
    deadline = time.monotonic() + 10
    while "probably wants more queues" not in d.log():
        assert time.monotonic() < deadline, d.log()
        await asyncio.sleep(0.05)
    log = d.log()
    assert "front-end asked for the queue count: 2 offered" in log
    assert "right after asking for the queue count, which was 2" in log and "--queues N" in log


async def test_driver_ok_logs_queues_started_of_offered(short_dir: str, daemons: list[DaemonProcess]) -> None:
    sock = os.path.join(short_dir, "blk.sock")
    d = start_daemon(["blk", "--socket", sock, "--backend", "mem:1M", "--queues", "4"], cwd=short_dir,
               wait_for=sock)
    daemons.append(d)
    vm = await VirtioFrontend.start(sock, num_queues=2, timeout=15)
    try:
        await vm.fe.set_status(0xF)     # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
        deadline = time.monotonic() + 10
        while "DRIVER_OK" not in d.log():
            assert time.monotonic() < deadline, d.log()
            await asyncio.sleep(0.05)
    finally:
        await vm.close()
    assert "front-end set DRIVER_OK with 2 of the 4 queues offered started (0, 1)" in d.log()


# ---- systemd: socket activation through --fd, and the units -----------------------------------------

def _unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(REPO / "contrib/systemd" / name)
    return cp


def _exec_start(unit: str, instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd would run it: %i, ${VAR} (one word), $VAR (split)."""
    line = _unit(unit)["Service"]["ExecStart"].replace("%i", instance)
    words: list[str] = []
    for word in line.split():
        m = re.fullmatch(r"\$\{(\w+)\}", word)
        if m:
            words.append(env[m.group(1)])
        elif word.startswith("$"):
            words.extend(env.get(word[1:], "").split())
        else:
            words.append(word)
    return words


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd not installed")
async def test_socket_activated_unit_serves_through_fd_3(short_dir: str) -> None:
    # systemd-socket-activate passes the listening socket exactly as systemd
    # does (fd 3, LISTEN_FDS=1) and starts the unit's command on the first
    # connection; the command is the ExecStart of contrib's template unit.
    sock = os.path.join(short_dir, "blk-disk0.sock")
    assert _unit("vdev-blk@.socket")["Socket"]["ListenStream"] == "/run/vdev/blk-%i.sock"
    words = _exec_start("vdev-blk@.service", "disk0", {"VDEV_BACKEND": "mem:4M",
                                                       "VDEV_BLK_ARGS": "--queues 2 --serial unit-disk"})
    assert words[0] == "/usr/local/bin/vdev" and words[1:4] == ["blk", "--fd", "3"], words
    words = [sys.executable, "-m", "vdev", *words[1:]]
    ctl_at = words.index("--control") + 1
    assert words[ctl_at] == "/run/vdev/blk-disk0.ctl"
    words[ctl_at] = os.path.join(short_dir, "blk.ctl")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(["systemd-socket-activate", "-l", sock, *words], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.02)
        vm = await VirtioFrontend.start(sock, timeout=20)
        try:
            data = bytes(range(256)) * 2
            used = await vm.request(0, [_header(1, 8), Buffer.readable(data), Buffer.writable(1)])
            assert used.written == b"\x00"
            used = await vm.request(0, [_header(0, 8), Buffer.writable(len(data)), Buffer.writable(1)])
            assert used.written == data + b"\x00"
            used = await vm.request(0, [_header(8, 0), Buffer.writable(20), Buffer.writable(1)])
            assert used.written.startswith(b"unit-disk")
        finally:
            await vm.close()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 15)
        log.seek(0)
        out = log.read().decode(errors="replace")
        assert rc == 0, out
        assert "listening on fd 3" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_units_name_the_documented_paths() -> None:
    socket_unit = _unit("vdev-blk@.socket")
    assert socket_unit["Socket"]["Accept"] == "no"
    for name, flag in (("vdev-blk@.service", "--fd 3"), ("vdev-blk-plain@.service", "--socket /run/vdev/")):
        service = _unit(name)["Service"]
        assert flag in service["ExecStart"] and service["EnvironmentFile"] == "/etc/vdev/blk-%i.env"
        assert service["KillSignal"] == "SIGTERM"
    readme = (REPO / "contrib/README.md").read_text()
    for name in ("vdev-blk@.socket", "vdev-blk@.service", "vdev-blk-plain@.service", "/etc/vdev/blk-"):
        assert name in readme


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
@pytest.mark.parametrize("unit", ["vdev-blk@.socket", "vdev-blk@.service", "vdev-blk-plain@.service"])
def test_units_pass_systemd_analyze_verify(unit: str, short_dir: str) -> None:
    # verify wants the ExecStart binary to exist: point it at this checkout's vdev.
    text = (REPO / "contrib/systemd" / unit).read_text()
    text = text.replace("/usr/local/bin/vdev", str(Path(sys.executable).with_name("vdev")))
    for other in os.listdir(REPO / "contrib/systemd"):
        shutil.copy(REPO / "contrib/systemd" / other, os.path.join(short_dir, other))
    path = os.path.join(short_dir, unit)
    with open(path, "w") as f:
        f.write(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", path], capture_output=True, text=True,
                       check=False, cwd=short_dir)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if unit.split("@")[0] in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


# ---- bash completion -------------------------------------------------------------------------------

def _complete(script: str, words: list[str]) -> list[str]:
    """Run the completion function for ``words`` (the last one being completed) in bash."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = (f"source {script}\n"
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
            f"COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n"
            "fn=$(complete -p vdev | sed -E 's/.* -F ([^ ]+) .*/\\1/')\n"
            "$fn vdev \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\"\n"
            "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True,
                       check=True, timeout=30)
    return r.stdout.split()


@pytest.fixture(scope="module")
def completion_script(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("completion") / "vdev"
    r = subprocess.run([sys.executable, "-m", "vdev", "completion", "bash"], capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    path.write_text(r.stdout)
    return str(path)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("words, expected", [
    (["vdev", ""], {"blk", "rng", "ctl", "bench", "completion"}),
    (["vdev", "b"], {"blk", "bench"}),
    (["vdev", "blk", "--"], {"--backend", "--blk-file", "--socket", "--socket-path", "--fd", "--queues",
                             "--read-only", "--control", "--dataplane", "--print-capabilities"}),
    (["vdev", "blk", "--log-level", ""], {"debug", "info", "warning", "error"}),
    (["vdev", "blk", "--backend", "nb"], {"nbd://", "nbd+unix:///"}),
    (["vdev", "rng", "--q"], {"--queue-size"}),
    (["vdev", "ctl", "/tmp/blk.ctl", ""], {"info", "swap", "pause", "resume", "resize", "mirror", "jobs",
                                          "cancel", "pivot"}),
    (["vdev", "ctl", "/tmp/blk.ctl", "mirror", ""], {"target=", "granularity=", "rate=", "pivot="}),
    (["vdev", "ctl", "/tmp/blk.ctl", "swap", "b"], {"backend="}),
    (["vdev", "ctl", "/tmp/blk.ctl", "mirror", "target", "=", "fi"], {"file:"}),
    (["vdev", "ctl", "--"], {"--wait", "--help"}),
    (["vdev", "bench", "blk", "--rw"], {"--rw", "--rwmixread"}),
    (["vdev", "completion", ""], {"bash"}),
])
def test_bash_completion_from_the_parser(completion_script: str, words: list[str], expected: set[str]) -> None:
    got = set(_complete(completion_script, words))
    assert expected <= got, (words, sorted(got))
    if words[-1]:
        assert all(w.startswith(words[-1]) for w in got), (words, sorted(got))
