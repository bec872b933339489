"""vdev.testing.DaemonProcess: the real `vdev` daemon as a subprocess, for tests.

What a test relies on: it returns only once the daemon serves (its sockets
exist); a daemon that fails to start is reported with its exit status and its
output, and is not left running; the context manager stops it and fails the
block on an unclean exit, without hiding an error the block raised; the
output is kept across a restart of the same object.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest

from vdev.testing import DaemonProcess, DaemonStartError


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-dp-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def blk(short_dir: str, *extra: str, **kw: object) -> DaemonProcess:
    sock, ctl = os.path.join(short_dir, "blk.sock"), os.path.join(short_dir, "blk.ctl")
    return DaemonProcess("blk", "--socket", sock, "--control", ctl, "--backend", "null:1M", *extra,
                         wait_for=[sock, ctl], **kw)  # type: ignore[arg-type]


def test_ready_when_its_sockets_exist_and_stopped_cleanly_at_the_end(short_dir: str) -> None:
    with blk(short_dir, "--log-level", "info", wait_log=r"listening on (\S+)") as d:
        assert d.proc is not None and d.proc.poll() is None
        assert os.path.exists(os.path.join(short_dir, "blk.sock"))
        assert os.path.exists(os.path.join(short_dir, "blk.ctl"))
        assert d.match is not None and "blk.sock" in d.match.group(1)
    assert d.proc.returncode == 0
    assert not os.path.exists(os.path.join(short_dir, "blk.sock"))


def test_a_daemon_that_exits_first_is_reported_with_status_and_output(short_dir: str) -> None:
    d = DaemonProcess("blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend", "floppy:1M",
                      wait_for=[os.path.join(short_dir, "blk.sock")])
    with pytest.raises(DaemonStartError) as exc:
        d.start()
    assert exc.value.status == 2
    assert "'floppy:1M'" in exc.value.log and "'floppy:1M'" in str(exc.value)
    assert "vdev blk exited with status 2" in str(exc.value)


def test_a_daemon_not_ready_in_time_is_stopped(short_dir: str) -> None:
    never = os.path.join(short_dir, "never")
    d = DaemonProcess("blk", "--socket", os.path.join(short_dir, "blk.sock"), "--backend", "null:1M",
                      wait_for=[never], timeout=1.0)
    with pytest.raises(DaemonStartError) as exc:
        d.start()
    assert exc.value.status is None and never in str(exc.value)
    assert d.proc is not None and d.proc.returncode == 0      # stopped with SIGTERM, cleanly


def test_the_block_fails_on_an_unclean_exit_but_keeps_its_own_error(short_dir: str) -> None:
    with pytest.raises(AssertionError, match="exited with status -9"), blk(short_dir) as d:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
    with pytest.raises(KeyError), blk(short_dir) as d:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        raise KeyError("the block's own error")


def test_output_is_kept_across_a_restart_with_or_without_a_file(short_dir: str) -> None:
    for log in (os.path.join(short_dir, "blk.log"), None):
        d = blk(short_dir, "--log-level", "info", log=log)
        with d:
            pass
        with d:
            pass
        assert d.log().count("listening on") == 2, d.log()
