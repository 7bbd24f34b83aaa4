"""scratchfs: read-only squashfs datasets over FUSE, SSD promotion and purge keepalive."""

__version__ = "0.1.0"
