"""Live storage migration: copy a running disk to other storage, then switch to it.

``vdev ctl CTL mirror target=URL`` starts a `MirrorJob` in the daemon.  The
guest keeps running while the disk is copied; only the last step stops its
I/O, briefly.  The steps, after QEMU's ``blockdev-mirror`` (block/mirror.c):

1. **Open the target** (any storage URL: ``file:``, ``nbd://``,
   ``nbd+unix://``), writable, and refuse one that is read-only, smaller
   than the disk, or the disk's own storage.  Nothing has changed yet.
2. **Track** — `BlkDevice.track_dirty` installs a `DirtyBitmap` (one bit per
   ``granularity`` bytes, marked by both data paths for every completed
   write, discard and write-zeroes), and every bit is set.
3. **Copy passes** — take the dirty bits (each 64-bit word is read and
   cleared in one atomic step), *then* read those blocks from the disk's
   storage and write them to the target, several chunks at a time.  A
   guest write that completes after the take marks its block again and it
   is copied again in the next pass; one that completed before the take is
   in what the read sees.  Runs the source knows to be holes
   (`Storage.extents`: SEEK_DATA on a sparse file) become write-zeroes on
   the target instead of reads.  Passes repeat until the dirty set is small
   enough to copy in `PIVOT_BUDGET` seconds, or stops shrinking
   (`STALL_PASSES` passes without a new low, or `MAX_PASSES` in all): then
   the job pivots anyway and the last copy takes longer.  ``rate=`` limits
   the copy passes (not the last copy under the pause).  The target is
   flushed at the end of the passes, so the pivot's flush is short.
4. **Pivot** — one more pass, then `BlkDevice.pause` (requests in flight
   finish, and mark their blocks), copy what is still dirty (nothing can
   dirty it now), flush the target, stop tracking, and
   `BlkDevice.swap_storage` to the target, which resumes I/O.  The guest's
   requests waited only for this step (``pivot_pause_ms`` in the job).  The
   old storage is closed, untouched since the pause: at that moment the
   target held exactly the same bytes.

With ``pivot=manual`` the job stops before step 4 in phase ``ready`` and
keeps copying what the guest dirties, until ``vdev ctl CTL pivot`` (QEMU's
``job-complete``).

A failure — the target refuses a write or goes away, the source cannot be
read, the pause times out — or ``cancel`` ends the job: tracking stops, the
target is closed, the disk stays on its storage and the guest sees nothing
but the copy's load.  The copy reads the disk's storage through its Python
API even while a native engine writes to it; that is safe because the
bitmap is taken before the read (above).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import mmap
import os
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vdev._native import ffi
from vdev.control import JOB_FINAL_PHASES
from vdev.errors import DeviceError

from .device import BlkDevice
from .dirty import DirtyBitmap
from .storage import FileStorage, Storage, open_storage, parse_size, parse_storage_url
from .storage.file import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    _fallocate,
    _preadv_full,
    _pwritev_full,
    _seek_extents,
)

__all__ = ["DEFAULT_GRANULARITY", "PHASES", "Jobs", "MirrorError", "MirrorJob"]

log = logging.getLogger("backends.blk.mirror")

#: Bytes per dirty bit unless ``granularity=`` says otherwise (QEMU's default too).
DEFAULT_GRANULARITY = 64 << 10
MIN_GRANULARITY = 512
MAX_GRANULARITY = 64 << 20
#: Largest single read/write of a copy.
MAX_CHUNK = 1 << 20
#: Largest single read/write of a file-to-file copy (a worker thread's syscall:
#: fewer of them means fewer hand-overs of the GIL between the workers).
FILE_CHUNK = 4 << 20
#: Chunks being copied at once.
MAX_INFLIGHT = 12
#: Worker threads of a file-to-file mirror.
FILE_WORKERS = 6
#: Pivot when the dirty set can be copied in about this long (seconds) ...
PIVOT_BUDGET = 0.005
#: ... or is at most this many blocks.
PIVOT_MIN_BLOCKS = 4
#: Passes without a new low of the dirty set before pivoting anyway.
STALL_PASSES = 8
#: Passes in all before pivoting anyway.
MAX_PASSES = 200
#: With pivot=manual: seconds between the passes that keep a ready target in step.
READY_INTERVAL = 0.01
#: Finished jobs `Jobs` remembers for ``jobs``.
HISTORY = 8

#: Every phase a job goes through, in order; the last three are final.
PHASES = ("copying", "ready", "pivoting", "done", "failed", "cancelled")
FINAL = frozenset(JOB_FINAL_PHASES)


class MirrorError(DeviceError):
    """The copy failed; the message says which side and where."""


def parse_mirror_params(request: dict[str, Any]) -> tuple[str, int, int | None, bool]:
    """(target, granularity, rate, manual) from a ``mirror`` request.

    Raises:
        ValueError: a missing target or a bad value, named.
    """
    target = request.get("target")
    if not isinstance(target, str) or not target:
        raise ValueError(f"mirror needs a storage URL 'target', got {target!r}")
    granularity = DEFAULT_GRANULARITY
    if "granularity" in request:
        granularity = _size_param("granularity", request["granularity"])
        if not (MIN_GRANULARITY <= granularity <= MAX_GRANULARITY) or granularity & (granularity - 1):
            raise ValueError(f"granularity {request['granularity']!r} is not a power of two between "
                             f"{MIN_GRANULARITY} and {MAX_GRANULARITY >> 20}M")
    rate = None
    if "rate" in request:
        rate = _size_param("rate", request["rate"])
        if rate <= 0:
            raise ValueError(f"rate {request['rate']!r} must be a positive number of bytes per second")
    pivot = request.get("pivot", "auto")
    if pivot not in ("auto", "manual"):
        raise ValueError(f"pivot {pivot!r} is not 'auto' or 'manual'")
    return target, granularity, rate, pivot == "manual"


def _size_param(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a size (bytes, or with K, M, G suffix)") from None
    raise ValueError(f"{name} {value!r} is not a size")


class _RateLimit:
    """A token bucket: ``rate`` bytes per second, bursts of at most a tenth of a second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.slept = 0.0

    async def take(self, n: int) -> None:
        now = time.monotonic()
        cap = max(float(n), self.rate * 0.1)
        self.tokens = min(cap, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            wait = (n - self.tokens) / self.rate
            await asyncio.sleep(wait)
            self.slept += wait
            self.tokens = float(n)
            self.stamp = time.monotonic()
        self.tokens -= n

    def refund(self, n: int) -> None:
        """Give back bytes taken for what turned out to need no copying."""
        self.tokens = min(self.rate * 0.1, self.tokens + n)


#: Bitmap words scanned at once for any set bit (4 KiB).
_SCAN_WORDS = 512
_ZERO_SCAN = bytes(8 * _SCAN_WORDS)


def _dirty_words(bitmap: DirtyBitmap) -> Iterator[int]:
    """Indices of the words with a bit set, found without a call per word.

    The scan reads the words without taking them, so a bit set just after
    its word was looked at waits for the next pass; under the pivot's pause
    nothing sets bits, so that scan misses none.  A 1 TiB disk at 64 KiB a
    bit has 262144 words: skipping runs of zero words by 4 KiB comparisons
    keeps a pass over a clean bitmap at a few milliseconds.
    """
    raw = ffi.buffer(bitmap.cdata, 8 * bitmap.words)
    for first in range(0, bitmap.words, _SCAN_WORDS):
        n = min(_SCAN_WORDS, bitmap.words - first)
        chunk = raw[8 * first: 8 * (first + n)]
        if chunk == _ZERO_SCAN[:8 * n]:
            continue
        words = memoryview(chunk).cast("Q")
        for i in range(n):
            if words[i]:
                yield first + i


def _dirty_bits(bitmap: DirtyBitmap) -> int:
    """Set bits right now (a racy snapshot for progress and the pivot decision), in one
    big-integer popcount rather than a Python loop over the words."""
    return int.from_bytes(ffi.buffer(bitmap.cdata, 8 * bitmap.words), "little").bit_count()


def _runs(bits: int) -> list[tuple[int, int]]:
    """Consecutive set bits of a 64-bit word as (first bit, count)."""
    out = []
    while bits:
        low = (bits & -bits).bit_length() - 1
        rest = bits >> low
        n = (~rest & (rest + 1)).bit_length() - 1      # length of the run of ones at the bottom
        out.append((low, n))
        bits &= ~(((1 << n) - 1) << low)
    return out


class MirrorJob:
    """One mirror of ``device`` to ``target`` (an open, writable `Storage`)."""

    kind = "mirror"

    def __init__(self, device: BlkDevice, target: Storage, *, job_id: int, granularity: int,
                 rate: int | None, manual: bool) -> None:
        self.device = device
        self.source = device.storage
        self.target = target
        self.id = job_id
        self.size = device.capacity
        self.bitmap = DirtyBitmap(self.size, granularity)
        # Everything is to copy; nothing takes bits before tracking is on.
        self.bitmap.mark_all()
        self.rate_limit = rate
        self.manual = manual
        self.phase = "copying"
        self.error: str | None = None
        self.bytes_copied = 0
        self.bytes_zeroed = 0
        self.passes = 0
        self.pivot_pause_ms: float | None = None
        self.pivot_bytes: int | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._pending = 0            # taken from the bitmap, not yet on the target
        self._busy = 0.0             # seconds spent in copy passes, rate-limit sleeps excluded
        self._busy_bytes = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=512)
        self._limiter = _RateLimit(rate) if rate else None
        self._pivot_requested = asyncio.Event()
        self._committing = False     # swap_storage under way: too late to cancel
        self._cancelling = False
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._buffers: list[mmap.mmap] = []
        self._free: list[memoryview] = []
        self._free_files: list[memoryview] = []
        self._steps: dict[str, float] = {}
        self._files = _file_pair(self.source, target, granularity, self.size)

    # -- life -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mirror-{self.id}")

    @property
    def finished_phase(self) -> bool:
        return self.phase in FINAL

    async def wait(self) -> None:
        await self._done.wait()

    async def cancel(self) -> None:
        """Stop the job and wait until it has cleaned up; the disk stays on the source.

        Raises:
            ValueError: the job has finished, or is switching the disk already.
        """
        if self.finished_phase:
            raise ValueError(f"mirror job {self.id} has finished ({self.phase}); nothing to cancel")
        if self._committing:
            raise ValueError(f"mirror job {self.id} is switching the disk to {self.target.url} "
                             "right now; too late to cancel")
        if not self._cancelling:
            self._cancelling = True
            assert self._task is not None
            self._task.cancel()
            await asyncio.wait({self._task})
            if not self._done.is_set():
                # Cancelled before its first step: _run never ran, so its
                # clean-up did not either (nothing was tracked yet).
                self.phase = "cancelled"
                self.finished = time.monotonic()
                await self._cleanup()
                self._done.set()
        await self.wait()

    def request_pivot(self) -> None:
        """pivot=manual: switch now (the job must be ``ready``).

        Raises:
            ValueError: not a manual job, or not ready yet.
        """
        if not self.manual:
            raise ValueError(f"mirror job {self.id} pivots by itself (pivot=auto)")
        if self.phase != "ready":
            raise ValueError(f"mirror job {self.id} is not ready to pivot (phase {self.phase}, "
                             f"{self.dirty_bytes} bytes dirty); try again when its phase is ready")
        self._pivot_requested.set()

    async def _run(self) -> None:
        device = self.device
        try:
            await device.track_dirty(self.bitmap)
            log.info("blk: mirror %d: copying %s (%d bytes) to %s, %d bytes per block%s", self.id,
                     self.source.url, self.size, self.target.url, self.bitmap.granularity,
                     f", at most {self.rate_limit} bytes/s" if self.rate_limit else "")
            await self._converge()
            if self.manual:
                await self._stay_ready()
            await self._pivot()
            self.phase = "done"
            log.info("blk: mirror %d: done; the disk is on %s (guest I/O paused %.1f ms for the last "
                     "%d bytes)", self.id, self.target.url, self.pivot_pause_ms or 0.0,
                     self.pivot_bytes or 0)
        except asyncio.CancelledError:
            self.phase = "cancelled"
            log.info("blk: mirror %d to %s cancelled; the disk stays on %s", self.id, self.target.url,
                     self.source.url)
        except Exception as exc:   # any failure ends the job, not the daemon
            self.phase = "failed"
            self.error = str(exc)
            if not isinstance(exc, DeviceError):
                log.exception("blk: mirror %d crashed", self.id)
            log.warning("blk: mirror %d to %s failed: %s; the disk stays on %s", self.id,
                        self.target.url, exc, self.source.url)
        finally:
            self.finished = time.monotonic()
            await self._cleanup()
            self._done.set()

    async def _cleanup(self) -> None:
        # Shielded: a second cancel (daemon shutdown) must not leave the
        # bitmap installed in the engines or the target open.
        async def clean() -> None:
            if self.device.dirty is self.bitmap:
                with contextlib.suppress(Exception):
                    await self.device.track_dirty(None)
            if self._files is not None:
                # No worker may still use the target's (or the source's) fd
                # when it is closed: a reused number would be another file.
                await asyncio.to_thread(self._files[2].shutdown, True)
            if self.device.storage is not self.target:
                with contextlib.suppress(Exception):
                    await self.target.aclose()
            self._free.clear()
            self._free_files.clear()
            for mm in self._buffers:
                with contextlib.suppress(BufferError):
                    mm.close()
            self._buffers.clear()

        task = asyncio.ensure_future(clean())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})

    # -- the copy ----------------------------------------------------------------------

    def _threshold(self) -> int:
        """Dirty bytes small enough to copy while the guest waits."""
        g = self.bitmap.granularity
        floor = PIVOT_MIN_BLOCKS * g
        if self._busy <= 0 or not self._busy_bytes:
            return floor
        return max(floor, int(self._busy_bytes / self._busy * PIVOT_BUDGET))

    async def _converge(self) -> None:
        best: int | None = None
        stalled = 0
        while True:
            await self._pass(limited=True)
            dirty = _dirty_bits(self.bitmap) * self.bitmap.granularity
            if dirty <= self._threshold():
                break
            if best is None or dirty < best:
                best, stalled = dirty, 0
            else:
                stalled += 1
            if stalled >= STALL_PASSES or self.passes >= MAX_PASSES:
                log.info("blk: mirror %d: the dirty set stays near %d bytes after %d passes (the guest "
                         "writes about as fast as the copy goes); pivoting with it", self.id, dirty,
                         self.passes)
                break
        await self._flush_target()
        self.phase = "ready"

    async def _stay_ready(self) -> None:
        log.info("blk: mirror %d: ready; waiting for `pivot`", self.id)
        while not self._pivot_requested.is_set():
            await self._pass(limited=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_INTERVAL):
                    await self._pivot_requested.wait()
        await self._flush_target()

    async def _pivot(self) -> None:
        """Switch the disk to the target."""
        device = self.device
        self.phase = "pivoting"
        await self._pass(limited=False)        # what the last moments dirtied, while the guest runs
        started = time.monotonic()
        try:
            await device.pause()               # DeviceError if storage hangs: nothing changed
        except BaseException:
            # A pause cut short (cancel) must not leave the guest's I/O held;
            # a no-op if it never began or already let go (its timeout).
            device.resume()
            raise
        steps = self._steps = {"paused": time.monotonic()}
        try:
            before = self.bytes_copied
            await self._pass(limited=False)
            steps["copied"] = time.monotonic()
            self.pivot_bytes = self.bytes_copied - before
            await self._flush_target()
            steps["flushed"] = time.monotonic()
            # Nested in the pause's hold, so it takes no time; no write can complete now.
            await device.track_dirty(None)
            steps["untracked"] = time.monotonic()
            self._committing = True
        except BaseException:
            device.resume()
            raise
        try:
            old = await device.swap_storage(self.target)      # resumes I/O
        except BaseException:
            self._committing = False
            device.resume()        # a failed swap leaves the pause in place
            raise
        self.pivot_pause_ms = round((time.monotonic() - started) * 1000, 3)
        log.debug("blk: mirror %d: pivot steps (ms): %s", self.id,
                  {k: round((v - started) * 1000, 3) for k, v in self._steps.items()})
        self._committing = False
        with contextlib.suppress(Exception):
            await asyncio.shield(old.aclose())

    async def _flush_target(self) -> None:
        try:
            await self.target.flush()
        except DeviceError as exc:
            raise MirrorError(f"flushing the target {self.target.url} failed", cause=exc) from exc

    async def _pass(self, *, limited: bool) -> None:
        """Take every dirty bit and copy the blocks they stand for."""
        bitmap, g = self.bitmap, self.bitmap.granularity
        started = time.monotonic()
        limiter = self._limiter if limited else None
        slept = self._limiter.slept if self._limiter else 0.0
        moved = self.bytes_copied - self.bytes_zeroed
        copier = _Copier()
        try:
            for word in _dirty_words(bitmap):
                bits = bitmap.take(word)          # before the read: see the module docstring
                if not bits:
                    continue
                runs = []
                for first, count in _runs(bits):
                    start = (word * 64 + first) * g
                    end = min((word * 64 + first + count) * g, self.size)
                    if start < end:
                        runs.append((start, end))
                        self._pending += end - start
                if not runs:
                    continue
                if self._files is not None:
                    # A rate limit is kept chunk by chunk; without one a
                    # whole word goes to the worker at once.
                    for batch in _batches(runs, MAX_CHUNK if limiter is not None else 1 << 62):
                        if limiter is not None:
                            await limiter.take(sum(e - s for s, e in batch))
                        await copier.submit(self._copy_runs_files(batch, limiter))
                    continue
                lo, hi = runs[0][0], runs[-1][1]
                try:
                    extents = await self.source.extents(lo, hi - lo)
                except DeviceError as exc:
                    raise MirrorError(f"reading the disk's storage {self.source.url} failed",
                                      cause=exc) from exc
                for off, length, data in _intersect(runs, extents):
                    if not data:
                        await copier.submit(self._zero_chunk(off, length))
                        continue
                    pos, end = off, off + length
                    while pos < end:
                        n = min(MAX_CHUNK, end - pos)
                        if limiter is not None:
                            await limiter.take(n)
                        await copier.submit(self._copy_chunk(pos, n))
                        pos += n
            await copier.wait()
        finally:
            await copier.abort()
            self.passes += 1
            slept = (self._limiter.slept if self._limiter else 0.0) - slept
            self._busy += max(0.0, time.monotonic() - started - slept)
            # The copy speed that sets the pivot threshold counts data only:
            # zeroing a hole costs next to nothing and would overstate it.
            self._busy_bytes += self.bytes_copied - self.bytes_zeroed - moved
            log.debug("blk: mirror %d: pass %d copied %d bytes in %.3f s", self.id, self.passes,
                      self.bytes_copied - self.bytes_zeroed - moved, time.monotonic() - started)

    async def _copy_chunk(self, offset: int, length: int) -> None:
        """Any storage to any storage, through their Python API."""
        buf = self._free.pop() if self._free else self._buffer()
        try:
            view = buf[:length]
            try:
                await self.source.readv(offset, [view])
            except DeviceError as exc:
                raise MirrorError(f"reading the disk's storage {self.source.url} at offset {offset} "
                                  "failed", cause=exc) from exc
            try:
                await self.target.writev(offset, [view])
            except DeviceError as exc:
                raise MirrorError(f"writing the target {self.target.url} at offset {offset} failed",
                                  cause=exc) from exc
        finally:
            self._free.append(buf)
        self._copied(length, zeroed=False)

    async def _zero_chunk(self, offset: int, length: int) -> None:
        try:
            await self.target.write_zeroes(offset, length, may_unmap=True)
        except DeviceError as exc:
            raise MirrorError(f"zeroing the target {self.target.url} at offset {offset} failed",
                              cause=exc) from exc
        self._copied(length, zeroed=True)

    async def _copy_runs_files(self, runs: list[tuple[int, int]], limiter: _RateLimit | None) -> None:
        """File to file: one worker call copies a bitmap word's runs (see `_copy_file_runs`)."""
        assert self._files is not None
        src_fd, dst_fd, executor = self._files
        buf = self._free_files.pop() if self._free_files else self._buffer(FILE_CHUNK)
        fut = asyncio.get_running_loop().run_in_executor(executor, _copy_file_runs, src_fd, dst_fd,
                                                          runs, buf)
        try:
            # The worker cannot be stopped halfway; a cancelled pass waits for
            # it, so the target is never closed under a running copy.
            data, zeroed = await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait({fut})
            raise
        except _CopyFailed as exc:
            url = self.source.url if exc.side == "read" else self.target.url
            what = "reading the disk's storage" if exc.side == "read" else f"{exc.side} the target"
            raise MirrorError(f"{what} {url} at offset {exc.offset} failed", cause=exc.cause) from exc
        finally:
            self._free_files.append(buf)
        if limiter is not None and zeroed:
            limiter.refund(zeroed)       # holes cost no copying
        self._copied(data, zeroed=False)
        self._copied(zeroed, zeroed=True)

    def _buffer(self, size: int = MAX_CHUNK) -> memoryview:
        mm = mmap.mmap(-1, size)            # page-aligned: O_DIRECT storage takes it as is
        self._buffers.append(mm)
        return memoryview(mm)

    def _copied(self, n: int, zeroed: bool) -> None:
        self._pending -= n
        self.bytes_copied += n
        if zeroed:
            self.bytes_zeroed += n
        self._samples.append((time.monotonic(), self.bytes_copied))

    # -- reporting ----------------------------------------------------------------------

    @property
    def dirty_bytes(self) -> int:
        """Bytes still to copy: dirty in the bitmap plus taken and not yet written."""
        if self.phase == "done":
            return 0
        return min(self.size, _dirty_bits(self.bitmap) * self.bitmap.granularity + max(0, self._pending))

    @property
    def rate(self) -> int:
        """Bytes per second over the last two seconds of copying."""
        now = time.monotonic()
        recent = [(t, b) for t, b in self._samples if now - t <= 2.0]
        if len(recent) < 2 or self.finished_phase:
            return 0
        (t0, b0), (t1, b1) = recent[0], recent[-1]
        span = max(now - t0, 1e-3)
        return int((b1 - b0) / span) if t1 > t0 else 0

    def describe(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        dirty = self.dirty_bytes
        return {
            "id": self.id,
            "type": self.kind,
            "phase": self.phase,
            "source": self.source.url,
            "target": self.target.url,
            "pivot": "manual" if self.manual else "auto",
            "size": self.size,
            "granularity": self.bitmap.granularity,
            "rate_limit": self.rate_limit,
            "bytes_copied": self.bytes_copied,
            "bytes_zeroed": self.bytes_zeroed,
            "dirty_bytes": dirty,
            "progress": round(1.0 - dirty / self.size, 4) if self.size else 1.0,
            "rate": self.rate,
            "passes": self.passes,
            "elapsed": round(end - self.started, 3),
            "pivot_pause_ms": self.pivot_pause_ms,
            "pivot_bytes": self.pivot_bytes,
            "error": self.error,
        }


def _batches(runs: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """``runs`` cut and grouped into batches of at most ``limit`` bytes each."""
    out: list[list[tuple[int, int]]] = []
    batch: list[tuple[int, int]] = []
    size = 0
    for start, end in runs:
        while start < end:
            n = min(end - start, limit - size)
            batch.append((start, start + n))
            size += n
            start += n
            if size == limit:
                out.append(batch)
                batch, size = [], 0
    if batch:
        out.append(batch)
    return out


def _file_pair(source: Storage, target: Storage, granularity: int, size: int
               ) -> tuple[int, int, ThreadPoolExecutor] | None:
    """For a file-to-file mirror: (source fd, target fd, workers).

    The copy then runs a bitmap word at a time in a worker (`_copy_file_runs`)
    instead of two event-loop round trips per chunk.  Under O_DIRECT every
    range must be whole logical blocks, else the Python API path is taken.
    """
    if not (isinstance(source, FileStorage) and isinstance(target, FileStorage)):
        return None
    block = max(source.block_size, target.block_size)
    if (source.direct or target.direct) and (granularity % block or size % block):
        return None
    workers = ThreadPoolExecutor(max_workers=FILE_WORKERS, thread_name_prefix="vdev-mirror")
    return source.fileno, target.fileno, workers


def _intersect(runs: list[tuple[int, int]], extents: list[tuple[int, int, bool]]
               ) -> list[tuple[int, int, bool]]:
    """The dirty runs cut along the storage's data/hole extents (both sorted)."""
    out: list[tuple[int, int, bool]] = []
    i = 0
    for start, end in runs:
        while i < len(extents) and extents[i][0] + extents[i][1] <= start:
            i += 1
        j, pos = i, start
        while pos < end:
            if j >= len(extents):       # past what the storage described: copy it
                out.append((pos, end - pos, True))
                break
            e_off, e_len, data = extents[j]
            if e_off > pos:
                stop = min(end, e_off)
                out.append((pos, stop - pos, True))
                pos = stop
                continue
            stop = min(end, e_off + e_len)
            if out and out[-1][2] == data and out[-1][0] + out[-1][1] == pos:
                prev = out.pop()
                out.append((prev[0], stop - prev[0], data))
            else:
                out.append((pos, stop - pos, data))
            pos = stop
            if stop == e_off + e_len:
                j += 1
    return out


class _Copier:
    """At most `MAX_INFLIGHT` copies at once; the first failure stops the pass."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(MAX_INFLIGHT)
        self.tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def submit(self, copy: Coroutine[Any, Any, None]) -> None:
        try:
            if self.error is not None:
                raise self.error
            await self.slots.acquire()
        except BaseException:
            copy.close()
            raise
        if self.error is not None:
            self.slots.release()
            copy.close()
            raise self.error
        task = asyncio.get_running_loop().create_task(self._run(copy))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, copy: Coroutine[Any, Any, None]) -> None:
        try:
            await copy
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # handed to the pass
            if self.error is None:
                self.error = exc
        finally:
            self.slots.release()

    async def wait(self) -> None:
        while self.tasks:
            await asyncio.wait(set(self.tasks))
        if self.error is not None:
            raise self.error

    async def abort(self) -> None:
        """Cancel what is still running (the pass failed or was cancelled) and wait for it."""
        for task in self.tasks:
            task.cancel()
        while self.tasks:
            await asyncio.wait(set(self.tasks))


class _CopyFailed(Exception):
    """A syscall of `_copy_file_runs` failed: on which side, where, why."""

    def __init__(self, side: str, offset: int, cause: OSError) -> None:
        super().__init__(f"{side} at {offset}: {cause}")
        self.side = side
        self.offset = offset
        self.cause = cause


def _copy_file_runs(src: int, dst: int, runs: list[tuple[int, int]], buf: memoryview) -> tuple[int, int]:
    """Copy ``runs`` (byte ranges) from fd ``src`` to fd ``dst``, in a worker thread.

    Holes of the source (SEEK_DATA) are punched in the target; data goes by
    preadv/pwritev through ``buf`` (page-aligned, so O_DIRECT accepts it).
    (copy_file_range(2) was slower here: 0.6 against 1.0 GB/s into a new
    tmpfs file, whose pages it fills one at a time.)  Returns (data bytes,
    hole bytes).

    Raises:
        _CopyFailed: a read, write or zeroing failed.
    """
    lo, hi = runs[0][0], runs[-1][1]
    try:
        extents = _seek_extents(src, lo, hi - lo)
    except OSError as exc:
        raise _CopyFailed("read", lo, exc) from exc
    data_bytes = hole_bytes = 0
    for off, length, data in _intersect(runs, extents):
        if not data:
            _zero_file_range(dst, off, length, buf)
            hole_bytes += length
            continue
        pos, end = off, off + length
        while pos < end:
            n = min(len(buf), end - pos)
            view = buf[:n]
            try:
                got = _preadv_full(src, pos, [view])
            except OSError as exc:
                raise _CopyFailed("read", pos, exc) from exc
            if got != n:
                raise _CopyFailed("read", pos, OSError(errno.EIO, f"short read: {got} of {n} bytes"))
            try:
                _pwritev_full(dst, pos, [view])
            except OSError as exc:
                raise _CopyFailed("writing", pos, exc) from exc
            pos += n
        data_bytes += length
    return data_bytes, hole_bytes


def _zero_file_range(fd: int, offset: int, length: int, buf: memoryview) -> None:
    """Make ``[offset, offset+length)`` read as zeros: punch a hole, else write zeros."""
    for mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
        try:
            _fallocate(fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY, errno.EINVAL):
                raise _CopyFailed("zeroing", offset, exc) from exc
    zeros = buf[:min(len(buf), length)]
    zeros[:] = bytes(len(zeros))
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(zeros), end - pos)
        try:
            _pwritev_full(fd, pos, [zeros[:n]])
        except OSError as exc:
            raise _CopyFailed("zeroing", pos, exc) from exc
        pos += n


class Jobs:
    """The mirror jobs of one device: at most one running, a few finished ones remembered."""

    def __init__(self, device: BlkDevice) -> None:
        self.device = device
        self.current: MirrorJob | None = None
        self.history: collections.deque[MirrorJob] = collections.deque(maxlen=HISTORY)
        self._next_id = 1
        self._starting = False

    @property
    def running(self) -> MirrorJob | None:
        job = self.current
        return job if job is not None and not job.finished_phase else None

    def check_idle(self, command: str) -> None:
        """Refuse ``command`` (swap, pause, resume, resize) while a mirror runs.

        Raises:
            ValueError: naming the job and how to stop it.
        """
        job = self.running
        if job is not None or self._starting:
            where = f"job {job.id} to {job.target.url}, phase {job.phase}" if job else "starting"
            raise ValueError(f"{command} refused: a mirror is running ({where}); it pauses, swaps and "
                             f"resumes the disk itself. Wait for it, or stop it with `cancel`")

    async def start_mirror(self, request: dict[str, Any]) -> MirrorJob:
        """Validate, open the target, and start a job (returns once it is copying).

        Raises:
            ValueError: a bad parameter, a paused disk, a target that cannot
                stand in for the disk (read-only, too small, the disk itself).
            DeviceError: the target cannot be opened (unreachable, missing).
        """
        target_url, granularity, rate, manual = parse_mirror_params(request)
        device = self.device
        running = self.running
        if running is not None or self._starting:
            raise ValueError(f"a mirror is already running (job {running.id} to {running.target.url})"
                             if running else "a mirror is already starting")
        if device.paused:
            raise ValueError("the disk is paused: `resume` it first (a mirror's pivot resumes I/O, "
                             "which would end your pause)")
        spec = parse_storage_url(target_url)
        if spec.read_only:
            raise ValueError(f"target {target_url!r} is opened read-only (readonly=on): a mirror "
                             "writes to it")
        self._starting = True
        try:
            try:
                target = await open_storage(spec)
            except (DeviceError, OSError) as exc:
                raise DeviceError(f"cannot open the mirror target {target_url!r}", cause=exc) from exc
        finally:
            self._starting = False
        return await self.start(target, granularity=granularity, rate=rate, manual=manual)

    async def start(self, target: Storage, *, granularity: int = DEFAULT_GRANULARITY, rate: int | None = None,
              manual: bool = False) -> MirrorJob:
        """Start a job to an open ``target``; on any refusal the target is closed.

        Raises:
            ValueError: a job is running, the disk is paused, or the target
                cannot stand in for the disk.
        """
        try:
            running = self.running
            if running is not None:
                raise ValueError(f"a mirror is already running (job {running.id} to {running.target.url})")
            if self.device.paused:
                raise ValueError("the disk is paused: `resume` it first (a mirror's pivot resumes I/O, "
                                 "which would end your pause)")
            self._check_target(target)
            job = MirrorJob(self.device, target, job_id=self._next_id, granularity=granularity,
                            rate=rate, manual=manual)
        except BaseException:
            await target.aclose()
            raise
        self._next_id += 1
        if self.current is not None:
            self.history.append(self.current)
        self.current = job
        job.start()
        return job

    def _check_target(self, target: Storage) -> None:
        device = self.device
        if target.read_only:
            raise ValueError(f"target {target.url!r} is read-only (its server exports it read-only): "
                             "a mirror writes to it")
        if target.size < device.capacity:
            raise ValueError(f"target {target.url!r} has {target.size} bytes, fewer than the disk's "
                             f"{device.capacity}")
        if _same_storage(target, device.storage):
            raise ValueError(f"target {target.url!r} is the disk's own storage")

    async def cancel(self) -> MirrorJob:
        """Cancel the running job and return it once it has cleaned up.

        Raises:
            ValueError: no job is running, or it is too late.
        """
        job = self.running
        if job is None:
            raise ValueError("no mirror is running")
        await job.cancel()
        return job

    def pivot(self) -> MirrorJob:
        job = self.running
        if job is None:
            raise ValueError("no mirror is running")
        job.request_pivot()
        return job

    def latest(self) -> MirrorJob | None:
        return self.current

    def describe(self) -> list[dict[str, Any]]:
        jobs = list(self.history) + ([self.current] if self.current is not None else [])
        return [j.describe() for j in jobs]

    async def aclose(self) -> None:
        """The daemon is stopping: cancel a running job (the disk stays where it is)."""
        job = self.running
        if job is not None and not job._committing:
            with contextlib.suppress(ValueError):
                await job.cancel()
        elif job is not None:
            await job.wait()


def _same_storage(a: Storage, b: Storage) -> bool:
    if a.url == b.url:
        return True
    fa, fb = getattr(a, "fileno", None), getattr(b, "fileno", None)
    if isinstance(fa, int) and isinstance(fb, int):
        try:
            sa, sb = os.fstat(fa), os.fstat(fb)
        except OSError:
            return False
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    return False
