"""vdev: the virtio core and the daemon framework.

* `vdev.memory` — guest memory mapped from the front-end's fds, bounds-checked.
* `vdev.queue` — the split virtqueue, plain state with memory passed in.
* `vdev.device` — the `Device` base class and the runtime that serves it.
* `vdev.cli` — the `vdev` command; devices plug in through the
  ``vdev.devices`` entry-point group.
* `vdev.testing` — fakes for device authors (public API).

Imports run one way: devices (``backends``) → ``vdev`` → ``vhost_user``.
"""

from __future__ import annotations

from .device import Device, DeviceRuntime, VirtQueue, serve
from .errors import DeviceError, GuestError, ProtocolError, Unsupported, VdevError
from .queue import Descriptor, DescriptorChain, Queue

__version__ = "0.1.0"

__all__ = ["Descriptor", "DescriptorChain", "Device", "DeviceError", "DeviceRuntime", "GuestError",
           "ProtocolError", "Queue", "Unsupported", "VdevError", "VirtQueue", "serve", "__version__"]
