"""cffi builder of ``vdev._native._lib`` (out-of-line API mode), run by ``pip install``.

Every component of the native data plane is a pair of files in ``src/``:
``NAME.h`` (the C declarations, included by every ``.c`` that needs them)
and ``NAME.cdef`` (the subset cffi parses: the same declarations, without
preprocessor tricks).  This builder concatenates every ``*.cdef`` and
compiles every ``*.c``, so a component is added by dropping its files in
``src/`` — no shared list to edit.

The module links liburing (Debian ``liburing-dev``) for the io_uring file
path; the README's set-up installs it with the compiler.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

SRC = Path(__file__).resolve().parent / "src"


def _rel(p: Path) -> str:
    # setuptools wants source paths relative to the project root.
    root = SRC.parents[2]
    return os.path.relpath(p, root)


def make_ffi() -> FFI:
    ffi = FFI()
    cdefs = sorted(SRC.glob("*.cdef"))
    ffi.cdef("\n".join(p.read_text() for p in cdefs))
    headers = "".join(f'#include "{p.with_suffix(".h").name}"\n' for p in cdefs)
    ffi.set_source(
        "vdev._native._lib",
        headers,
        sources=[_rel(p) for p in sorted(SRC.glob("*.c"))],
        include_dirs=[str(SRC)],
        libraries=["uring", "pthread"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-fno-strict-aliasing", "-D_GNU_SOURCE"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
