"""Ring fields under a concurrent peer: every load and store is one access of its width.

The other side of a ring (the driver) runs at the same time as the device
and reads or writes the shared fields while we store or load them.  A store
that first zeroes the field and then writes it byte by byte (what
``struct.pack_into`` does) lets a driver read ``used.idx == 0`` or a value
torn across its two bytes; a load byte by byte lets the device see an
``avail.idx`` torn the same way.  A check after the fact cannot see either,
so these tests run the peer in another process, spinning on the field while
this process works, and fail on the first impossible value.

The peer is a second Python process on the same memfd (not a thread: the
GIL would serialise it against the very store under test).  It reads and
writes through ``memoryview.cast("H")`` item access, which is one 16-bit
load or store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vdev.queue import Queue
from vdev.testing import Buffer, DriverQueue, MemfdGuestMemory

QSIZE = 256
COMPLETIONS = 40_000          # stays below 2**16, so the true used.idx never wraps

_PEER = textwrap.dedent(r"""
    import json, mmap, os, sys, time
    fd, size, off, mode, count = (int(a) if a.isdigit() else a for a in sys.argv[1:6])
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    field = memoryview(mm)[off: off + 2].cast("H")
    if mode == "write":
        field[0] = 0x00FF          # a valid value is in place before the device looks
    print("ready", flush=True)
    if mode == "read":
        # Spin on used.idx until it reaches `count`; it may only ever grow.
        prev, reads, bad = 0, 0, []
        deadline = time.monotonic() + 120
        while prev != count and time.monotonic() < deadline:
            v = field[0]
            reads += 1
            if v < prev and len(bad) < 5:
                bad.append([prev, v])
            prev = max(prev, v)
        print(json.dumps({"reads": reads, "bad": bad, "last": prev}), flush=True)
    else:
        # Toggle avail.idx across a high-byte boundary until told to stop.
        stop = memoryview(mm)[off + 2: off + 4].cast("H")
        n = 0
        while stop[0] == 0:
            field[0] = 0x00FF
            field[0] = 0x0100
            n += 2
        print(json.dumps({"writes": n}), flush=True)
""")


def _start_peer(mem: MemfdGuestMemory, gpa: int, mode: str, count: int = 0) -> subprocess.Popen[str]:
    fd = mem.fds[0]
    peer = subprocess.Popen([sys.executable, "-c", _PEER, str(fd), str(mem.regions[0].size), str(gpa),
                             mode, str(count)], pass_fds=(fd,), stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None
    assert peer.stdout.readline().strip() == "ready"
    return peer


@pytest.fixture
def ring() -> tuple[MemfdGuestMemory, DriverQueue, Queue]:
    mem = MemfdGuestMemory(1 << 20)
    dq = DriverQueue(mem, QSIZE, 0, data_start=0x10000, data_size=0x80000)
    q = Queue(QSIZE, dq.desc, dq.avail, dq.used)
    yield mem, dq, q
    mem.close()


def test_used_idx_never_goes_back_while_a_driver_spins_on_it(ring) -> None:
    mem, dq, q = ring
    peer = _start_peer(mem, dq.used + 2, "read", COMPLETIONS)
    try:
        done = 0
        while done < COMPLETIONS:
            batch = min(2, COMPLETIONS - done)     # queue depth 2, as the report had it
            for _ in range(batch):
                dq.add_chain([Buffer.readable(b"r" * 16), Buffer.writable(1)])
            for _ in range(batch):
                chain = q.pop(mem)
                assert chain is not None
                q.add_used(mem, chain.head, 1)
            done += batch
            assert len(dq.reap()) == batch
        out, _ = peer.communicate(timeout=60)
    finally:
        peer.kill()
    result = json.loads(out)
    assert result["last"] == COMPLETIONS
    assert result["reads"] > COMPLETIONS      # the reader really ran alongside
    assert result["bad"] == [], f"driver saw used.idx go back (prev, seen): {result['bad']}"


def test_avail_idx_is_never_torn_while_the_driver_stores_it(ring) -> None:
    mem, dq, q = ring
    # The peer toggles avail.idx between 0x00FF and 0x0100; the word after
    # it (the first avail ring entry, unused here) is its stop flag.
    stop = dq.avail + 4
    peer = _start_peer(mem, dq.avail + 2, "write")
    seen: dict[int, int] = {}
    try:
        for _ in range(400_000):
            v = q.avail_idx(mem)
            seen[v] = seen.get(v, 0) + 1
    finally:
        mem.view(stop, 2).cast("H")[0] = 1
        out, _ = peer.communicate(timeout=30)
    torn = {hex(v): n for v, n in seen.items() if v not in (0x00FF, 0x0100)}
    assert torn == {}, f"device read torn avail.idx values: {torn}"
    assert json.loads(out)["writes"] > 0 and len(seen) == 2   # both values really alternated


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs a second CPU for the peer to run alongside")
def test_used_event_and_flags_loads_are_single_accesses(ring) -> None:
    # The same tear on the two other driver-written fields the device loads.
    mem, dq, q = ring
    for gpa, load in ((dq.avail + 4 + 2 * QSIZE, q.used_event), (dq.avail, q.avail_flags)):
        peer = _start_peer(mem, gpa, "write")
        seen: set[int] = set()
        try:
            for _ in range(200_000):
                seen.add(load(mem))
        finally:
            mem.view(gpa + 2, 2).cast("H")[0] = 1
            peer.communicate(timeout=30)
            mem.view(gpa + 2, 2).cast("H")[0] = 0
        assert seen <= {0x00FF, 0x0100}, sorted(hex(v) for v in seen)
