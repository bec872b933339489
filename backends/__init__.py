"""The devices: each subpackage is one virtio device built on `vdev`.

Devices plug into the `vdev` command through the ``vdev.devices``
entry-point group, exactly as a third party's device would.
"""
