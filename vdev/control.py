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
a VdevError) to report a failure; the server keeps serving.  A handler made
with `accepts` (or given a ``params`` attribute) names the parameters it
takes, and a request with any other key is refused naming that key before
the handler runs.  `ControlCommand` describes a command for ``vdev ctl
--help`` and shell completion.

Hostile clients: every request line gets exactly one JSON reply, whatever it
holds (nesting too deep for the parser, integers past CPython's 4,300-digit
limit, bad UTF-8); error texts quote at most a few hundred characters of the
offending value.  At most `MAX_CLIENTS` clients are connected at once (the
next one gets a one-line JSON error and is closed) and a client that sends no
request for `IDLE_TIMEOUT` seconds is told so and closed, so idle
connections cannot use up the daemon's file descriptors.  When accepting
fails for lack of descriptors (EMFILE/ENFILE), the event loop backs off and
retries; the daemon and its guest carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vhost_user.server import accept

from .errors import VdevError

log = logging.getLogger("vdev.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class ControlCommand:
    """A control command as the user sees it: ``usage`` like
    ``("target=URL", "[rate=BYTES_PER_SEC]")`` and a one-line summary."""

    name: str
    usage: tuple[str, ...] = ()
    summary: str = ""
    #: The reply carries a ``job`` (with an ``id``) that ``jobs`` reports on:
    #: ``vdev ctl ... --wait`` follows it until its phase is final.
    starts_job: bool = False

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names (``usage`` without brackets and values)."""
        return tuple(u.strip("[]").partition("=")[0] for u in self.usage)

    def synopsis(self) -> str:
        return " ".join((self.name, *self.usage))


#: Phases after which a job (``jobs``) changes no more.
JOB_FINAL_PHASES = ("done", "failed", "cancelled")

#: Request keys whose values are storage URLs.  `vdev ctl` makes the paths
#: in them absolute against the caller's directory before sending (the
#: daemon's working directory is not the caller's), and a daemon refuses
#: relative ones from any other client.
URL_KEYS = ("backend", "target")

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def url_paths(url: str) -> list[tuple[str, int, int]]:
    """The file-system paths inside a storage URL, as (kind, start, end)
    slices of ``url``: kind ``path`` for a bare path or ``file:PATH``,
    ``socket`` for a ``socket=`` option (``nbd+unix://``)."""
    out: list[tuple[str, int, int]] = []
    m = _SCHEME_RE.match(url)
    query_at = url.find("?")
    end = len(url) if query_at < 0 else query_at
    if url.startswith(("/", "./", "../")) or m is None:
        out.append(("path", 0, end))
    elif m.group(1).lower() == "file" and not url[m.end():].startswith("//"):
        out.append(("path", m.end(), end))
    if query_at >= 0:
        pos = query_at + 1
        for item in url[query_at + 1:].split("&"):
            if item.lower().startswith("socket="):
                out.append(("socket", pos + len("socket="), pos + len(item)))
            pos += len(item) + 1
    return [p for p in out if p[2] > p[1]]


def relative_url_paths(url: str) -> list[tuple[str, str]]:
    """(kind, path) of every relative path in a storage URL."""
    return [(kind, url[a:b]) for kind, a, b in url_paths(url) if not os.path.isabs(url[a:b])]


def absolute_url(url: str, cwd: str) -> str:
    """``url`` with every relative path in it made absolute against ``cwd``."""
    for _kind, a, b in reversed(url_paths(url)):
        path = url[a:b]
        if not os.path.isabs(path):
            url = url[:a] + os.path.abspath(os.path.join(cwd, path)) + url[b:]
    return url


def accepts(handler: Handler, params: tuple[str, ...] | list[str]) -> Handler:
    """Mark ``handler`` as taking exactly ``params`` (besides ``command``)."""
    handler.params = tuple(params)  # type: ignore[attr-defined]
    return handler


def check_params(command: str, request: dict[str, Any], params: tuple[str, ...]) -> None:
    """Refuse a request with a key ``command`` does not take, naming it.

    Raises:
        ValueError: e.g. ``swap: unknown parameter 'queues' (swap takes: backend, force)``.
    """
    unknown = [k for k in request if k != "command" and k not in params]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        takes = ", ".join(params) if params else "no parameters"
        raise ValueError(f"{command}: unknown parameter {quote(unknown[0])}{more} ({command} takes: {takes})")
#: Longest request line accepted, so a client cannot make us buffer without end.
MAX_LINE = 64 * 1024
#: Most clients connected at once; the next one is answered with an error and closed.
MAX_CLIENTS = 64
#: Seconds a client may stay connected without sending a request.
IDLE_TIMEOUT = 60.0
#: Longest quote of a client's value in an error message.
MAX_QUOTE = 200


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (a 5,000-digit
    int or a deeply nested list makes plain ``repr`` fail)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _error(message: str) -> dict[str, Any]:
    if len(message) > 4 * MAX_QUOTE:
        message = message[:4 * MAX_QUOTE] + f"... ({len(message)} characters)"
    return {"ok": False, "error": message}


def _encode(reply: dict[str, Any]) -> bytes:
    """One reply line; a reply that cannot be encoded becomes an error reply."""
    try:
        return json.dumps(reply).encode() + b"\n"
    except (ValueError, TypeError, RecursionError) as exc:
        log.warning("control reply cannot be encoded: %s", quote(exc))
        return json.dumps(_error(f"internal error: reply cannot be encoded ({type(exc).__name__})")
                          ).encode() + b"\n"


class ControlServer:
    def __init__(self, path: str, handlers: Mapping[str, Handler], *, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.clients = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.path)
            listener.listen(16)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop(listener))
        log.info("control socket on %s (commands: %s)", self.path, ", ".join(sorted(self.handlers)))

    async def _accept_loop(self, listener: socket.socket) -> None:
        # Our own accept loop (not asyncio.start_unix_server) so that EMFILE
        # is handled the way the vhost-user socket handles it: logged once,
        # retried every 100 ms.
        while True:
            conn = await accept(listener, f"a control client on {self.path}")
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_LINE)
            except OSError as exc:
                conn.close()
                log.warning("control socket: cannot set up a client: %s", exc)
                continue
            task = asyncio.get_running_loop().create_task(self._client(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def handle(self, line: bytes) -> dict[str, Any]:
        """One request line in, one reply out; never raises (except a cancel)."""
        try:
            request = json.loads(line)
        except RecursionError:
            return _error("not JSON this server accepts: nested too deeply")
        except UnicodeDecodeError as exc:
            return _error(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})")
        except ValueError as exc:     # JSONDecodeError, and ints past the digit limit
            return _error(f"not JSON this server accepts: {exc}")
        if not isinstance(request, dict):
            return _error(f"request must be a JSON object, got {quote(request)}")
        name = request.get("command")
        handler = self.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            return _error(f"unknown command {quote(name)}; known: {sorted(self.handlers)}")
        try:
            params = getattr(handler, "params", None)
            if params is not None:
                check_params(str(name), request, params)
            result = await handler(request)
        except (ValueError, VdevError, OSError) as exc:
            log.warning("control %s failed: %s", name, quote(str(exc), 4 * MAX_QUOTE))
            return _error(str(exc))
        except Exception as exc:   # a handler bug must not end the daemon
            log.exception("control %s crashed", name)
            return _error(f"internal error: {quote(exc)}")
        return {"ok": True, **result}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            if self.clients > self.max_clients:
                log.warning("control socket: refusing a client, %d are connected already", self.max_clients)
                writer.write(_encode(_error(f"too many control clients (at most {self.max_clients}); "
                                            f"try again later")))
                return
            await self._serve_client(reader, writer)
        except ConnectionError:
            pass
        finally:
            self.clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    line = await reader.readline()
            except TimeoutError:
                writer.write(_encode(_error(f"idle for {self.idle_timeout:g} s; closing")))
                return
            except (asyncio.LimitOverrunError, ValueError):
                writer.write(_encode(_error(f"request line too long (more than {MAX_LINE} bytes)")))
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await self.handle(line)
            writer.write(_encode(reply))
            await writer.drain()


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
