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

import pytest

from backends.blk.storage import NbdStorage
from backends.blk.storage import nbd_proto as P
from backends.blk.storage.testing import FakeNbdServer
from vdev.errors import DeviceError


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
