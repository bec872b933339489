"""A dirty bitmap of the disk, shared by both data paths, for a running mirror.

One bit per ``granularity`` bytes (a power of two, at least a sector).  Both
data paths set the bits of every range a write, a discard or a write-zeroes
touched, once it completed (failed ones too: part of the range may have
changed): the native engines in C (``vd_bitmap_mark``, an atomic OR on the
word), the Python path through the same function.  The mirror takes bits
with `take` — each 64-bit word is read and cleared in one atomic exchange —
*before* it reads the blocks they stand for, so a write completing after the
take marks its block again and it is copied again.

The bitmap lives in memory allocated by cffi; the device hands its address
to the engines while they are held, and takes it back the same way before
the bitmap is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vdev._native import ffi, lib

__all__ = ["DirtyBitmap"]

SECTOR = 512


class DirtyBitmap:
    """Dirty blocks of a ``size``-byte disk at ``granularity`` bytes per bit."""

    def __init__(self, size: int, granularity: int = 64 << 10) -> None:
        if granularity < SECTOR or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two of at least {SECTOR}")
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.nbits = max(1, -(-size // granularity))
        self.words = -(-self.nbits // 64)
        self.cdata: Any = ffi.new("uint64_t[]", self.words)

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of ``[offset, offset+length)``."""
        if length > 0:
            lib.vd_bitmap_mark(self.cdata, self.nbits, self.shift, offset, length)

    def mark_all(self) -> None:
        self.mark(0, self.size)

    def take(self, word: int) -> int:
        """Read and clear word ``word`` (64 blocks) in one atomic step."""
        return int(lib.vd_bitmap_take(self.cdata, word))

    def take_blocks(self) -> Iterator[int]:
        """Take every set bit now, yielding block numbers in order."""
        for w in range(self.words):
            bits = self.take(w)
            while bits:
                low = bits & -bits
                yield w * 64 + low.bit_length() - 1
                bits ^= low

    def count(self) -> int:
        """Set bits right now (a racy snapshot, for progress reports)."""
        return sum(int(self.cdata[w]).bit_count() for w in range(self.words))

    @property
    def dirty_bytes(self) -> int:
        return min(self.size, self.count() * self.granularity)

    def block_range(self, block: int) -> tuple[int, int]:
        """(offset, length) of block ``block``, clipped to the disk."""
        off = block * self.granularity
        return off, max(0, min(self.granularity, self.size - off))
