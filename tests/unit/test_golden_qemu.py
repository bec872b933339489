"""Replay real QEMU 7.2 conversations (tests/data/*.capture) through the sans-IO sessions.

Each capture line is one ``recvmsg`` chunk as the kernel delivered it
(direction, fd count, bytes; see tests/data/capture_qemu.py).  Replaying the
chunks with as many fresh fds as were recorded checks that every front-end
request decodes, that each fd lands on the request that carried it even where
Linux glued messages together, and that every reply parses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhost_user.messages import FRONTEND_REQUESTS, HEADER, FrontendReq
from vhost_user.session import NEED_DATA, BackendSession, FrontendSession, InvalidMessage, Message, close_fds

DATA = Path(__file__).resolve().parent.parent / "data"
CAPTURES = sorted(DATA.glob("qemu72_*.capture"))


def load(path: Path) -> list[tuple[str, int, bytes]]:
    chunks = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        direction, nfds, hexdata = line.split()
        chunks.append((direction, int(nfds), bytes.fromhex(hexdata)))
    return chunks


def replay(chunks: list[tuple[str, int, bytes]]) -> tuple[list[Message], int]:
    session, replies, messages = BackendSession(), FrontendSession(), []
    n_replies = 0
    for direction, nfds, data in chunks:
        if direction == "<":
            replies.receive_data(data)
            while replies.next_reply() is not NEED_DATA:
                n_replies += 1
            continue
        session.receive_data(data, [os.eventfd(0) for _ in range(nfds)])
        while (event := session.next_event()) is not NEED_DATA:
            assert not isinstance(event, InvalidMessage), event.error
            assert isinstance(event, Message)
            messages.append(event)
    return messages, n_replies


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_every_request_decodes_with_its_fds(capture: Path) -> None:
    chunks = load(capture)
    messages, n_replies = replay(chunks)
    try:
        names = [m.request for m in messages]
        assert names[0] is FrontendReq.GET_FEATURES
        assert FrontendReq.SET_OWNER in names and FrontendReq.SET_VRING_KICK in names
        # Every message carries exactly the fds its request allows, and all
        # recorded fds were handed out.
        for m in messages:
            lo, hi = FRONTEND_REQUESTS[m.request].fds
            assert lo <= len(m.fds) <= hi, (m.request, len(m.fds))
        assert sum(len(m.fds) for m in messages) == sum(n for d, n, _ in chunks if d == ">")
        memory = [m for m in messages if m.request in (FrontendReq.SET_MEM_TABLE, FrontendReq.ADD_MEM_REG)]
        assert memory and all(m.fds for m in memory)
        # Requests with a defined reply were all answered.
        assert n_replies >= sum(1 for m in messages if FRONTEND_REQUESTS[m.request].reply is not None)
    finally:
        for m in messages:
            close_fds(m.fds)


def test_captures_hold_the_glued_read_trap() -> None:
    """At least one recorded read carries an fd-less message glued before the one with the fd.

    This is the case that broke the first fd-attachment rule; the captures
    keep the replay test honest about it.
    """
    glued = 0
    for capture in CAPTURES:
        for direction, nfds, data in load(capture):
            if direction != ">" or not nfds:
                continue
            starts, pos = 0, 0
            while pos + HEADER.size <= len(data):
                starts += 1
                pos += HEADER.size + HEADER.unpack_from(data, pos)[2]
            glued += starts > 1
    assert CAPTURES and glued >= 1
