"""Parsers for command-line values shared by devices; each error names the value."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_int(value: str, what: str, *, lo: int, hi: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ValueError(f"{what}: not a number: {value!r}") from None
    if not lo <= n <= hi:
        raise ValueError(f"{what}: {n} is out of range {lo}..{hi}")
    return n


def parse_queue_size(value: str, what: str = "--queue-size") -> int:
    n = parse_int(value, what, lo=1, hi=32768)
    if n & (n - 1):
        raise ValueError(f"{what}: {n} is not a power of 2")
    return n


def parse_size(value: str, what: str = "size") -> int:
    """``4096``, ``64M``, ``1G``, ``2GiB`` (powers of 1024) → bytes."""
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"{what}: cannot parse size {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]
