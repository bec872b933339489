"""Constants from the virtio specification, grouped by the header they come from."""
