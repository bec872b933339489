"""Storage URLs: parsing, the scheme registry, and `open_storage`.

The command line validates the ``--storage`` URL with `parse_storage_url`
before it creates any socket, so parsing is synchronous, opens nothing and
fails with a ``ValueError`` that quotes the offending value.  Opening is a
second, async step (`open_storage`).

Forms (see README.md beside this file)::

    /abs/path.img   ./rel.img   file:PATH   file:///abs/path   [?direct=on&readonly=on]
    mem:SIZE        null:SIZE                                   [?readonly=on]
    nbd://HOST[:PORT]/EXPORT                                    [?readonly=on]
    nbd+unix:///EXPORT?socket=PATH                              [&readonly=on]

Every scheme is an entry in `_SCHEMES`, so a third party adds one with
`register_scheme` exactly the way the built-in ones are added.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable
from urllib.parse import unquote

from .base import SECTOR_SIZE, Storage, StorageSpec

__all__ = [
    "StorageFactory",
    "parse_size",
    "parse_bool",
    "parse_storage_url",
    "open_storage",
    "register_scheme",
    "registered_schemes",
]


@runtime_checkable
class StorageFactory(Protocol):
    """What `register_scheme` wants: a `Storage` subclass already is one."""

    url_options: frozenset[str]

    def parse_spec(self, spec: StorageSpec) -> StorageSpec: ...

    def open(self, spec: StorageSpec) -> Awaitable[Storage]: ...


class _CallableFactory:
    """Adapts a bare ``factory(spec) -> Storage | Awaitable[Storage]``."""

    url_options: frozenset[str] | None = None  # None: any option passes

    def __init__(self, fn: Callable[[StorageSpec], Storage | Awaitable[Storage]]) -> None:
        self._fn = fn

    def parse_spec(self, spec: StorageSpec) -> StorageSpec:
        return spec

    async def open(self, spec: StorageSpec) -> Storage:
        result = self._fn(spec)
        if inspect.isawaitable(result):
            result = await result
        return result


_SCHEMES: dict[str, StorageFactory | _CallableFactory] = {}


def register_scheme(name: str, factory: StorageFactory | Callable[[StorageSpec], object]) -> None:
    """Make ``name:...`` URLs open through ``factory``.

    ``factory`` is a `Storage` subclass (or any object) with ``url_options``,
    ``parse_spec(spec)`` and async ``open(spec)``; or a plain callable taking
    the `StorageSpec` and returning a Storage or an awaitable of one (its URLs
    then accept any query option).  Registering a name again replaces it.
    """
    key = name.lower()
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", key):
        raise ValueError(f"invalid storage scheme name {name!r}")
    if all(hasattr(factory, a) for a in ("parse_spec", "open", "url_options")):
        _SCHEMES[key] = factory  # type: ignore[assignment]
    elif callable(factory):
        _SCHEMES[key] = _CallableFactory(factory)  # type: ignore[arg-type]
    else:
        raise TypeError(f"storage factory for {name!r} is neither a factory nor callable: {factory!r}")


def registered_schemes() -> list[str]:
    return sorted(_SCHEMES)


# ---- small value parsers -----------------------------------------------------

# "KB" is refused on purpose: it means 1000 to some and 1024 to others.
_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([kmgt])(?:ib)?|b)?\s*", re.IGNORECASE)
_SIZE_SHIFT = {None: 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864.  Suffixes K/M/G/T (also KiB/MiB/GiB/TiB; B for
    bytes) are powers of 1024, any case; no fractions.  Raises ValueError."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"cannot parse size {text!r}")
    unit = m.group(2).lower() if m.group(2) else None
    return int(m.group(1)) << _SIZE_SHIFT[unit]


def parse_size_in_url(text: str, url: str) -> int:
    """`parse_size` plus the disk rule (a positive multiple of 512), with
    messages that quote the URL."""
    try:
        size = parse_size(text)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} in {url!r}") from None
    if size <= 0 or size % SECTOR_SIZE:
        raise ValueError(f"size {text!r} in {url!r} is not a positive multiple of {SECTOR_SIZE}")
    return size


_TRUE = {"", "on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


def parse_bool(name: str, value: str, url: str) -> bool:
    """An on/off option; a bare ``?name`` means on."""
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"cannot parse value {value!r} of option {name!r} in {url!r} (use on/off)")


# ---- the URL parser ----------------------------------------------------------

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def _split_query(query: str, url: str) -> dict[str, str]:
    # Not urllib's parse_qsl: it turns '+' into a space, which would mangle
    # a socket path like /run/vm+1.sock.
    options: dict[str, str] = {}
    if not query:
        return options
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = unquote(name).lower()
        if name in options:
            raise ValueError(f"option {name!r} given twice in {url!r}")
        options[name] = unquote(value)
    return options


def parse_storage_url(url: str) -> StorageSpec:
    """Parse and validate a storage URL without opening anything.

    Raises ValueError whose message names the offending part, e.g.
    ``unknown storage scheme 'foo' in 'foo:bar'``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"empty storage URL {url!r}")
    m = _SCHEME_RE.match(url)
    if url.startswith(("/", "./", "../")) or m is None:
        # A bare path (or anything without a scheme): a file.
        scheme, rest = "file", url
    else:
        scheme, rest = m.group(1).lower(), url[m.end():]
    factory = _SCHEMES.get(scheme)
    if factory is None:
        raise ValueError(f"unknown storage scheme {_spelled_scheme(url)!r} in {url!r}")
    target, _, query = rest.partition("?")
    options = _split_query(query, url)
    accepted = factory.url_options
    if accepted is not None:
        for name in options:
            if name not in accepted:
                raise ValueError(f"unknown option {name!r} in {url!r}"
                                 f" (accepted: {', '.join(sorted(accepted)) or 'none'})")
    read_only = parse_bool("readonly", options["readonly"], url) if "readonly" in options else False
    spec = StorageSpec(url=url, scheme=scheme, target=target, options=options, read_only=read_only)
    return factory.parse_spec(spec)


async def open_storage(url: str | StorageSpec) -> Storage:
    """Parse ``url`` (unless it is a spec already) and open it.

    Parse errors are ValueError; failures to open are `DeviceError`.
    """
    spec = parse_storage_url(url) if isinstance(url, str) else url
    factory = _SCHEMES.get(spec.scheme)
    if factory is None:
        raise ValueError(f"unknown storage scheme {spec.scheme!r} in {spec.url!r}")
    return await factory.open(spec)


def _spelled_scheme(url: str) -> str:
    """The scheme as the user spelled it (for messages)."""
    m = _SCHEME_RE.match(url)
    return m.group(1) if m else "file"
