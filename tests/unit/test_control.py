"""The JSON control socket under hostile clients (issue "Defects found by
hostile testing", items 3 and 9).

* item 9: every request line gets one JSON reply, whatever it holds (deep
  nesting, 5,000-digit integers, bad UTF-8, a huge command name ...), and the
  connection goes on serving;
* item 3: clients are capped (the one over the cap gets a one-line JSON
  error and is closed) and idle clients are dropped, so idle connections
  cannot use up the daemon's file descriptors.

The server is the real `ControlServer` on a real Unix socket, with handlers
that echo, so only the socket's own behaviour is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev import control
from vdev.control import ControlServer


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vdev-ctl-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"echo": sorted(request)}


async def boom(request: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("x" * 100000)


@contextlib.asynccontextmanager
async def control_server(path: str, **kw: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, {"info": echo, "boom": boom}, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> dict[str, Any]:
    writer.write(line + b"\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.readline(), 10)
    assert raw.endswith(b"\n"), f"no reply line to {line[:80]!r}..."
    reply = json.loads(raw)
    assert isinstance(reply, dict)
    return reply


# ---- item 9: every line gets a JSON reply -------------------------------------------------

HOSTILE = {
    "deep-array": b"[" * 30000 + b"]" * 30000,
    "deep-object": b'{"a":' * 10000 + b"1" + b"}" * 10000,
    "deep-in-a-request": b'{"command": "info", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}",
    "5000-digit-int": b'{"command": "info", "n": ' + b"7" * 5000 + b"}",
    "5000-digit-int-as-command": b'{"command": ' + b"9" * 5000 + b"}",
    "5000-digit-int-alone": b"1" * 5000,
    "deep-command": b'{"command": ' + b"[" * 30000 + b"]" * 30000 + b"}",
    "huge-float": b'{"command": "info", "f": 1e999999}',
    "nan": b'{"command": NaN}',
    "bad-utf8": b'{"command": "\xff\xfe"}',
    "lone-surrogate": b'{"command": "\\ud800"}',
    "not-json": b"hello",
    "array": b"[1, 2, 3]",
    "null": b"null",
    "nul-bytes": b"\x00\x00\x00",
    "unknown-command": b'{"command": "explode"}',
    "handler-raises-huge": b'{"command": "boom"}',
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_every_request_line_gets_a_json_reply(short_dir: str, case: str) -> None:
    path = os.path.join(short_dir, "ctl.sock")
    async with control_server(path):
        reader, writer = await asyncio.open_unix_connection(path, limit=control.MAX_LINE)
        try:
            reply = await ask(reader, writer, HOSTILE[case])
            if case == "huge-float":      # valid JSON (inf) and a known command
                assert reply["ok"] is True
            else:
                assert reply["ok"] is False and isinstance(reply["error"], str) and reply["error"]
                assert len(reply["error"]) < 2000
            # the same connection goes on serving
            assert (await ask(reader, writer, b'{"command": "info"}'))["ok"] is True
        finally:
            writer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(min_size=1, max_size=300).filter(lambda b: b"\n" not in b and b.strip()),
                      min_size=1, max_size=5))
def test_arbitrary_lines_each_get_one_reply(short_dir: str, lines: list[bytes]) -> None:
    async def main() -> None:
        path = os.path.join(short_dir, "fuzz.sock")
        async with control_server(path):
            reader, writer = await asyncio.open_unix_connection(path, limit=control.MAX_LINE)
            try:
                for line in lines:
                    reply = await ask(reader, writer, line)
                    assert "ok" in reply
                assert (await ask(reader, writer, b'{"command": "info"}'))["ok"] is True
            finally:
                writer.close()

    asyncio.run(main())


# ---- item 3: a cap on clients, and idle clients dropped ---------------------------------------

async def test_client_over_the_cap_gets_an_error_line_and_is_closed(short_dir: str) -> None:
    path = os.path.join(short_dir, "cap.sock")
    async with control_server(path):
        conns = []
        try:
            for _ in range(control.MAX_CLIENTS):
                conns.append(await asyncio.open_unix_connection(path))
            # every one of them is served
            for reader, writer in conns[:: max(1, len(conns) // 8)]:
                assert (await ask(reader, writer, b'{"command": "info"}'))["ok"] is True
            reader, writer = await asyncio.open_unix_connection(path)
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = json.loads(line)
            assert reply["ok"] is False and str(control.MAX_CLIENTS) in reply["error"]
            assert await asyncio.wait_for(reader.read(), 10) == b""     # and closed
            writer.close()
            # one leaves: a newcomer is served again
            conns.pop()[1].close()
            for _ in range(100):
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(b'{"command": "info"}\n')
                reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
                writer.close()
                if reply["ok"]:
                    break
                await asyncio.sleep(0.01)      # the old one's close is still being noticed
            assert reply["ok"] is True
        finally:
            for _, writer in conns:
                writer.close()


async def test_idle_client_is_dropped(short_dir: str) -> None:
    path = os.path.join(short_dir, "idle.sock")
    async with control_server(path, idle_timeout=0.3):
        idle_r, idle_w = await asyncio.open_unix_connection(path)
        busy_r, busy_w = await asyncio.open_unix_connection(path)
        try:
            # a client that keeps asking is not idle
            for _ in range(6):
                assert (await ask(busy_r, busy_w, b'{"command": "info"}'))["ok"] is True
                await asyncio.sleep(0.1)
            # the silent one was told why, and closed
            line = await asyncio.wait_for(idle_r.readline(), 10)
            assert "idle" in json.loads(line)["error"]
            assert await asyncio.wait_for(idle_r.read(), 10) == b""
        finally:
            idle_w.close()
            busy_w.close()
