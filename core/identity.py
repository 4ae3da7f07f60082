"""Who writes raddraft's DICOM objects: the Manufacturer (0008,0070), software version and device serial number
that the SR, narrative and GSPS carry, and by which the DICOM node knows its own objects sent back to it
(dicom_node/derived.py)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MANUFACTURER = "raddraft"
DEVICE_SERIAL_NUMBER = "0"  # software device: no hardware serial number (GSPS General Equipment needs a value)


def software_version() -> str:
    """Version of the installed raddraft distribution (the software that writes the objects)."""
    try:
        return version("raddraft")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
