"""``vdev bench``: load generators that drive back ends the way a guest does.

``vdev bench blk`` (`vdev.bench.cli`) runs a virtio-blk driver written in C
(``vdev/_native/src/driver.c``) against any vhost-user-blk socket: the
vhost-user set-up and the memory layout are Python (`vdev.bench.driver`), the
per-request loop is C, one thread per queue.  `vdev.bench.report` turns a
run into the printed table, ``result.json``, HdrHistogram files and PNGs.
See README.md beside this file, including the driver's own measured ceiling.
"""

from __future__ import annotations

from .driver import (
    BackEndFault,
    BenchError,
    BlkSession,
    Job,
    RingBaseMismatch,
    RunResult,
)

__all__ = ["BackEndFault", "BenchError", "BlkSession", "Job", "RingBaseMismatch", "RunResult"]
