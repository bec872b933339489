"""Fixtures for the tests that boot a real QEMU guest (see vdev.testing.guest).

Every test under tests/qemu gets the ``qemu`` marker, so ``-m "not qemu"``
leaves out the slow ones.  Without qemu-system-x86_64 they are skipped, unless
``CI`` or ``VDEV_REQUIRE_QEMU`` is set: there a silent skip would hide that the
integration tests never ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdev.testing import stop_process
from vdev.testing.guest import QEMU, GuestImage, build_guest_image

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached guest kernel + initramfs, built on first use (a few seconds plus a download)."""
    if shutil.which(QEMU) is None:
        message = f"{QEMU} is not installed (apt-get install qemu-system-x86)"
        if os.environ.get("CI") or os.environ.get("VDEV_REQUIRE_QEMU"):
            pytest.fail(message)
        pytest.skip(message)
    return build_guest_image()


class Daemon:
    """A `vdev` back end running as its own process, as users run it."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: Path | None, timeout: float = 15.0) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vdev", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while wait_for is not None and not wait_for.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vdev {self.args} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vdev {self.args} did not create {wait_for}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit status (the daemon must exit cleanly)."""
        assert self.proc is not None
        code = stop_process(self.proc)
        self._log.close()
        return code


@pytest.fixture
def vdev_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``vdev <args>``; every daemon is stopped at teardown and must exit 0."""
    daemons: list[Daemon] = []

    def start(*args: str, wait_for: Path | None) -> Daemon:
        d = Daemon(list(args), tmp_path / f"vdev-{len(daemons)}.log")
        daemons.append(d)
        d.start(wait_for)
        return d

    yield start
    for d in daemons:
        rc = d.stop()
        assert rc == 0, f"vdev {d.args} exited {rc}:\n{d.log()}"
