"""virtio-rng (entropy device, virtio 1.2 §5.4) — the smallest useful device.

One queue; the driver posts device-writable buffers and the device fills
them with random bytes from the kernel (``getrandom``).  No feature bits, no
config space.  This is the proof that a device is small to write: everything
else (memory, rings, notifications, vhost-user) is the framework's.

    vdev rng --socket /tmp/rng.sock
    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -numa node,memdev=mem -chardev socket,id=rng0,path=/tmp/rng.sock \\
        -device vhost-user-rng-pci,chardev=rng0
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from vdev.cli import DeviceCommand
from vdev.config import parse_queue_size
from vdev.device import Device, VirtQueue
from vdev.uapi.virtio import DeviceId

#: Largest chunk filled per chain, so one huge buffer cannot stall the loop.
MAX_FILL = 64 * 1024


class RngDevice(Device):
    device_id = DeviceId.ENTROPY
    name = "rng"

    def __init__(self, *, queue_size: int = 256) -> None:
        super().__init__(num_queues=1, queue_size=queue_size)
        self.bytes_served = 0

    async def process_queue(self, vq: VirtQueue) -> None:
        for chain in vq.chains():
            writer = chain.writer(vq.mem)
            writer.write(os.urandom(min(writer.available, MAX_FILL)))
            self.bytes_served += writer.written
            vq.complete(chain, writer.written)


@dataclass(frozen=True)
class RngConfig:
    queue_size: int


class RngCommand(DeviceCommand):
    name = "rng"
    summary = "virtio entropy device (vhost-user-rng)"
    capability_type = "rng"
    qemu_example = ("qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=512M,share=on "
                    "-numa node,memdev=mem -chardev socket,id=rng0,path=/tmp/rng.sock "
                    "-device vhost-user-rng-pci,chardev=rng0 ...")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--queue-size", default="256", metavar="N",
                            help="largest queue size offered (power of 2, default 256)")

    def configure(self, args: argparse.Namespace) -> RngConfig:
        return RngConfig(parse_queue_size(args.queue_size))

    async def create(self, config: RngConfig) -> Device:
        return RngDevice(queue_size=config.queue_size)
