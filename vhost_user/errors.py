"""The exception hierarchy shared by every layer of the project.

It lives in the protocol package because that package sits at the bottom of
the import graph: `vdev` and `backends` may import it, it imports nothing of
ours.  Each class carries the offending value as an attribute and shows it in
``str()`` (the h2 habit), so a log line always says *what* was wrong, not only
that something was.

    VdevError
    ├─ ProtocolError   the peer broke vhost-user            (.request, .value, .fatal)
    ├─ GuestError      a bad ring, chain or address          (vdev.errors)
    ├─ DeviceError     the device's own I/O failed           (vdev.errors, .status)
    └─ Unsupported     an optional feature was not offered   (.what)
"""

from __future__ import annotations


class VdevError(Exception):
    """Root of every error this project raises on purpose."""


class ProtocolError(VdevError):
    """The peer sent something vhost-user does not allow.

    ``fatal`` is the recovery policy (rust-vmm's ``should_reconnect``): a fatal
    error means the byte stream can no longer be trusted (bad header, bad
    version, short payload) and the connection must be dropped; a non-fatal
    one fails only the request that carried it.
    """

    def __init__(self, message: str, *, request: object = None, value: object = None,
                 fatal: bool = False) -> None:
        self.message = message
        self.request = request
        self.value = value
        self.fatal = fatal
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.request is not None:
            parts.append(f"request={self.request!s}")
        if self.value is not None:
            parts.append(f"value={self.value!r}")
        return " ".join(parts) if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


class Unsupported(VdevError):
    """An optional request or feature that this back end does not offer."""

    def __init__(self, what: object, message: str = "not supported") -> None:
        self.what = what
        self.message = message
        super().__init__(f"{what!s}: {message}")
