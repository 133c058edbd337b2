"""fleetd: a fleet runner for QEMU SMP virtual machines."""

__version__ = "0.1.0"
