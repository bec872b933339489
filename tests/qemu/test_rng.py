"""QEMU boots with `vdev rng` as its vhost-user-rng back end; the guest reads /dev/hwrng."""

from __future__ import annotations

from pathlib import Path

from vdev.testing.guest import GuestImage, run_in_guest

SCRIPT = """
cat /sys/class/misc/hw_random/rng_available
echo "current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/a bs=512 count=8 2>/dev/null
dd if=/dev/hwrng of=/tmp/b bs=512 count=8 2>/dev/null
echo "size=$(wc -c < /tmp/a)"
echo "zeros=$(od -An -tx1 -v /tmp/a | tr -s ' ' '\\n' | grep -c '^00$')"
cmp -s /tmp/a /tmp/b && echo same || echo differ
"""


async def test_guest_reads_hwrng_from_vdev_rng(guest_image: GuestImage, vdev_daemon, tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    vdev_daemon("rng", "--socket", str(sock), wait_for=sock)
    result = await run_in_guest(guest_image, SCRIPT, timeout=120, qemu_args=[
        "-chardev", f"socket,id=rng0,path={sock}",
        "-device", "vhost-user-rng-pci,chardev=rng0",
    ])
    assert result.exit_status == 0, result.console
    out = result.output
    assert "virtio_rng" in out, out
    assert "current=virtio_rng" in out, out
    assert "size=4096" in out, out
    # 4096 random bytes hold ~16 zero bytes on average; a buffer the device never
    # filled would be all zeros (or all the same), so bound it well below that.
    zeros = int(out.split("zeros=")[1].split()[0])
    assert zeros < 200, out
    assert "differ" in out, out


async def test_second_guest_reconnects_after_first_exits(guest_image: GuestImage, vdev_daemon,
                                                         tmp_path: Path) -> None:
    """The device resets when QEMU goes away, and the next QEMU gets a working device."""
    sock = tmp_path / "rng.sock"
    daemon = vdev_daemon("rng", "--socket", str(sock), wait_for=sock)
    args = ["-chardev", f"socket,id=rng0,path={sock}", "-device", "vhost-user-rng-pci,chardev=rng0"]
    script = "dd if=/dev/hwrng bs=512 count=4 2>/dev/null | wc -c"
    for _ in range(2):
        result = await run_in_guest(guest_image, script, timeout=120, qemu_args=args)
        assert result.exit_status == 0 and result.output.strip() == "2048", result.console
    log = daemon.log()
    assert log.count("front-end connected") == 2, log
    assert log.count("front-end disconnected") >= 1, log


async def test_client_mode_connects_to_listening_qemu(guest_image: GuestImage, vdev_daemon,
                                                      tmp_path: Path) -> None:
    """`vdev rng --client` connects to a QEMU started with server=on (it waits for the socket)."""
    sock = tmp_path / "qemu-rng.sock"
    vdev_daemon("rng", "--socket", str(sock), "--client", wait_for=None)
    result = await run_in_guest(guest_image, "dd if=/dev/hwrng bs=512 count=4 2>/dev/null | wc -c",
                                timeout=120, qemu_args=[
                                    "-chardev", f"socket,id=rng0,path={sock},server=on,wait=on",
                                    "-device", "vhost-user-rng-pci,chardev=rng0"])
    assert result.exit_status == 0 and result.output.strip() == "2048", result.console
