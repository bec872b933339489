"""Errors of the virtio core and of devices.

`GuestError` is what the guest (the driver) got wrong: a descriptor outside
guest memory, a looping chain, a writable buffer before a readable one.  It
fails one request or marks one queue broken; it never ends the process.

`DeviceError` is what the device's own back end got wrong (storage I/O, a TAP
write).  It knows the virtio status byte it turns into, so a request handler
can always answer the guest instead of dropping the descriptor.
"""

from __future__ import annotations

from vhost_user.errors import ProtocolError, Unsupported, VdevError

__all__ = ["VdevError", "ProtocolError", "Unsupported", "GuestError", "DeviceError"]


class GuestError(VdevError):
    """The guest put something invalid in a ring or descriptor chain.

    Attributes name where: ``queue`` index, chain ``head``, guest address
    ``gpa`` and ``length`` where they are known.
    """

    def __init__(self, message: str, *, queue: int | None = None, head: int | None = None,
                 gpa: int | None = None, length: int | None = None, code: int | None = None) -> None:
        self.message = message
        #: For ring errors, the `vdev.queue.RingError` kind (shared with the C ring).
        self.code = code
        self.queue = queue
        self.head = head
        self.gpa = gpa
        self.length = length
        #: For a bad chain whose last descriptor is writable and inside guest
        #: memory: that descriptor (a `vdev.queue.Descriptor`), where a device
        #: may still write a status.  None otherwise.
        self.tail: object = None
        super().__init__(message)

    def at(self, *, queue: int | None = None, head: int | None = None) -> GuestError:
        """Fill in location details known only to an outer layer; returns self."""
        if self.queue is None:
            self.queue = queue
        if self.head is None:
            self.head = head
        return self

    def __str__(self) -> str:
        where = []
        if self.queue is not None:
            where.append(f"queue={self.queue}")
        if self.head is not None:
            where.append(f"head={self.head}")
        if self.gpa is not None:
            where.append(f"gpa={self.gpa:#x}")
        if self.length is not None:
            where.append(f"len={self.length}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class DeviceError(VdevError):
    """The device's back end failed a request.

    ``status`` is the device-specific status to report to the guest (for
    virtio-blk: 1 = IOERR, 2 = UNSUPP); ``cause`` the underlying exception.
    """

    def __init__(self, message: str, *, status: int = 1, value: object = None,
                 cause: BaseException | None = None) -> None:
        self.message = message
        self.status = status
        self.value = value
        self.cause = cause
        super().__init__(message)

    def __str__(self) -> str:
        s = self.message
        if self.value is not None:
            s += f" (value={self.value!r})"
        if self.cause is not None:
            s += f": {self.cause}"
        return s
