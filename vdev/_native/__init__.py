"""The native data plane: C compiled through cffi (API mode), GIL released in its calls.

This package exports only ``ffi`` and ``lib``; the Python wrappers that give
them a typed, safe face live beside the code that uses them
(`vdev.native`).  The C sources are in ``src/`` (see ``build.py``); ``pip
install`` compiles them.
"""

from __future__ import annotations

try:
    from ._lib import ffi, lib
except ImportError as exc:   # pragma: no cover - a broken install, named plainly
    raise ImportError(
        "vdev's native data plane is not built: reinstall with `pip install -e .` "
        f"(needs gcc, python3-dev and liburing-dev) ({exc})") from exc

ABI_VERSION = 3
if lib.vd_abi_version() != ABI_VERSION:   # pragma: no cover
    raise ImportError(f"vdev._native was built for ABI {lib.vd_abi_version()}, "
                      f"this vdev needs {ABI_VERSION}: reinstall with `pip install -e .`")

__all__ = ["ffi", "lib"]
