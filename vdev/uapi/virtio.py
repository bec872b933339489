"""Transport-independent virtio constants (virtio 1.2 §2, §6; linux/virtio_config.h, virtio_ring.h)."""

from __future__ import annotations

import enum


class VirtioFeature(enum.IntFlag):
    """Reserved feature bits (virtio 1.2 §6), as masks."""

    NOTIFY_ON_EMPTY = 1 << 24      # legacy
    ANY_LAYOUT = 1 << 27           # legacy; implied by VERSION_1
    RING_INDIRECT_DESC = 1 << 28   # §2.7.5.3
    RING_EVENT_IDX = 1 << 29       # §2.7.7, §2.7.10
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38


class DeviceStatus(enum.IntFlag):
    """The device-status byte (virtio 1.2 §2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(enum.IntEnum):
    """Virtio device ids (virtio 1.2 §5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    VSOCK = 19


# Split virtqueue (virtio 1.2 §2.7)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
USED_ELEM_SIZE = 8
