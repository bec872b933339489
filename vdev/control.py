"""A small JSON control socket for running daemons (``--control PATH``).

Protocol: connect to the Unix socket, send one JSON object per line, read one
JSON object per line back.  Every request names a ``command``; every reply
has ``"ok": true`` plus the command's fields, or ``"ok": false`` and an
``"error"`` string naming the offending value.  Several requests may be sent
on one connection, one after another.

    $ echo '{"command": "info"}' | socat - UNIX-CONNECT:/tmp/blk.ctl
    {"ok": true, "backend": "mem:1G", ...}

or with the built-in client: ``vdev ctl /tmp/blk.ctl info`` /
``vdev ctl /tmp/blk.ctl swap backend=file:/images/b.img``.

A device command supplies the handlers: a mapping from command name to an
``async (request: dict) -> dict`` function.  A handler raises ValueError (or
a VdevError) to report a failure; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .errors import VdevError

log = logging.getLogger("vdev.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: Longest request line accepted, so a client cannot make us buffer without end.
MAX_LINE = 64 * 1024


class ControlServer:
    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        log.info("control socket on %s (commands: %s)", self.path, ", ".join(sorted(self.handlers)))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": f"request must be a JSON object, got {request!r}"}
        name = request.get("command")
        handler = self.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r}; known: {sorted(self.handlers)}"}
        try:
            result = await handler(request)
        except (ValueError, VdevError, OSError) as exc:
            log.warning("control %s failed: %s", name, exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:   # a handler bug must not end the daemon
            log.exception("control %s crashed", name)
            return {"ok": False, "error": f"internal error: {exc!r}"}
        return {"ok": True, **result}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(b'{"ok": false, "error": "request line too long"}\n')
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = await self.handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def control_request(path: str, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to a control socket and return the reply."""
    reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError(f"control socket {path} closed without a reply")
        reply: dict[str, Any] = json.loads(line)
        return reply
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
