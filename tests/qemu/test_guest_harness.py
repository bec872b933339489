"""The guest harness itself: the image boots, its tools run, its modules load.

The cpio test needs no QEMU; the others boot the real guest (about 6-10 s each under TCG).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from vdev.testing.guest import GuestBootError, GuestImage, NewcWriter, run_in_guest

VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_pci", "virtio_rng", "virtio_blk", "virtio_net",
                  "vsock", "vmw_vsock_virtio_transport")


def _parse_newc(data: bytes) -> list[tuple[str, int, tuple[int, int], bytes]]:
    """Read back (name, mode, rdev, data) entries, checking the 4-byte alignment on the way."""
    entries: list[tuple[str, int, tuple[int, int], bytes]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        assert data[pos + 110 + namesize - 1] == 0
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            assert not data[pos:].strip(b"\0")
            return entries
        entries.append((name, mode, rdev, data[pos:pos + size]))
        pos = (pos + size + 3) & ~3


def test_newc_writer_round_trip(tmp_path: Path) -> None:
    buf = io.BytesIO()
    w = NewcWriter(buf)
    w.file("/etc/deep/dir/hello.txt", b"hello\n", 0o640)
    w.file("odd", b"12345")  # sizes that are not multiples of 4 exercise the padding
    w.symlink("bin/sh", "/bin/busybox")
    w.char_device("dev/console", 5, 1)
    w.close()
    data = buf.getvalue()
    assert len(data) % 512 == 0

    entries = {name: (mode, rdev, body) for name, mode, rdev, body in _parse_newc(data)}
    assert list(entries)[:4] == ["etc", "etc/deep", "etc/deep/dir", "etc/deep/dir/hello.txt"]
    assert entries["etc/deep/dir/hello.txt"] == (0o100640, (0, 0), b"hello\n")
    assert entries["odd"][2] == b"12345"
    assert entries["bin/sh"] == (0o120777, (0, 0), b"/bin/busybox")
    assert entries["dev/console"][:2] == (0o020600, (5, 1))

    # An independent reader: GNU cpio lists and extracts the same archive.
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert set(listing.decode().split()) == set(entries)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "etc/*", "odd", "bin/*"], input=data, cwd=out, check=True)
    assert (out / "etc/deep/dir/hello.txt").read_bytes() == b"hello\n"
    assert (out / "odd").read_bytes() == b"12345"
    assert (out / "bin/sh").readlink() == Path("/bin/busybox")


async def test_guest_runs_script_with_tools_and_modules(guest_image: GuestImage) -> None:
    script = """
        echo "kernel=$(uname -r)"
        fio --version
        socat -V | grep 'socat version'
        iperf3 --version | head -n 1
        cat /etc/vdev/extra.txt
        cat /proc/modules
        exit 3
    """
    result = await run_in_guest(guest_image, script, timeout=240, files={"/etc/vdev/extra.txt": b"extra-file-ok\n"})
    assert result.exit_status == 3, result.console
    lines = result.output.splitlines()
    assert f"kernel={guest_image.kernel_version}" in lines
    assert any(line.startswith("fio-") for line in lines), result.output
    assert any(line.startswith("socat version") for line in lines), result.output
    assert any(line.startswith("iperf 3") for line in lines), result.output
    assert "extra-file-ok" in lines
    loaded = {line.split()[0] for line in lines if " Live " in line}
    assert set(VIRTIO_MODULES) <= loaded, result.output
    # Only the script's own output, without the markers or the boot noise around it.
    assert "@@" not in result.output and "\r" not in result.output
    assert "vdev-guest: insmod" not in result.console


async def test_guest_boot_error_carries_qemu_diagnostics(guest_image: GuestImage, tmp_path: Path) -> None:
    # QEMU refuses to start when the vhost-user socket is missing; that must surface, not hang.
    missing = tmp_path / "missing.sock"
    with pytest.raises(GuestBootError) as info:
        await run_in_guest(guest_image, "true", timeout=60,
                           qemu_args=["-chardev", f"socket,id=c0,path={missing}",
                                      "-device", "vhost-user-rng-pci,chardev=c0"])
    assert info.value.returncode not in (None, 0)
    assert str(missing) in info.value.stderr and str(missing) in str(info.value)
