"""The C ring against the Python reference: `vdev.testing.check_queue`."""

from __future__ import annotations

import pytest

from vdev.native import NativeQueue
from vdev.queue import Queue
from vdev.testing import check_queue
from vdev.testing.conformance import _run


def test_native_queue_conforms() -> None:
    check_queue(NativeQueue, max_examples=400)


def test_the_reference_conforms_to_itself() -> None:
    check_queue(Queue, max_examples=30)


class _IgnoresUsedEvent(Queue):
    """A queue that interrupts on every completion even when EVENT_IDX says not to."""

    def needs_notification(self, mem):  # type: ignore[no-untyped-def]
        return super().needs_notification(mem) or self.event_idx


class _NoTail(NativeQueue):
    """A queue that forgets a bad chain's status-capable tail."""

    def pop(self, mem):  # type: ignore[no-untyped-def]
        try:
            return super().pop(mem)
        except Exception as exc:
            exc.tail = None  # type: ignore[attr-defined]
            raise


@pytest.mark.parametrize("bad", [_IgnoresUsedEvent, _NoTail])
def test_the_suite_catches_a_wrong_queue(bad: type) -> None:
    with pytest.raises(AssertionError):
        check_queue(bad, max_examples=300, shrink=False)


def test_a_chain_outside_memory_keeps_its_tail_in_both() -> None:
    # desc 0: readable buffer in the hole -> desc 1: writable status byte in memory
    ops = [("desc", 0, (0x9000, 16, 1, 1)), ("desc", 1, (0x1000, 1, 2, 0)), ("publish", 0), ("pop",)]
    _run(NativeQueue, 4, 0, False, True, ops)
