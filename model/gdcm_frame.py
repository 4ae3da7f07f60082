"""Decode one encapsulated frame with GDCM, run as a child process by :mod:`model.decoders`.

``python -m model.gdcm_frame`` reads one JSON line (the frame's geometry and pixel format) and then the frame's
bytes from standard input, and writes the decoded frame to standard output. It runs in a process of its own because
GDCM's native codecs can crash the whole process (SIGSEGV, SIGABRT) on corrupt data instead of raising; the parent
turns such an exit into a decoder error. GDCM's libjpeg messages ("Unsupported JPEG data precision 12", printed
before it retries with its 12-bit codec) go to this process's standard error, which the parent logs.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def decode(src: bytes, geometry: dict[str, Any]) -> bytes:
    """The decoded bytes of the encoded frame *src* (pydicom's GDCM plugin, without its 12-bit refusal)."""
    import gdcm  # noqa: PLC0415  (only in the child: a crash there does not take the worker down)

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((geometry["columns"], geometry["rows"], 1))
    image.SetDataElement(element)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(geometry["photometric_interpretation"])
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    if geometry["samples_per_pixel"] > 1:
        image.SetPlanarConfiguration(geometry["planar_configuration"])
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(geometry["transfer_syntax"])))
    bits_stored = geometry["bits_stored"]
    image.SetPixelFormat(gdcm.PixelFormat(geometry["samples_per_pixel"], geometry["bits_allocated"], bits_stored,
                                          bits_stored - 1, geometry["pixel_representation"]))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM returned no pixel data for the frame")
    return buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str


def main() -> int:
    geometry = json.loads(sys.stdin.buffer.readline())
    src = sys.stdin.buffer.read()
    try:
        decoded = decode(src, geometry)
    except Exception as exc:  # every GDCM failure is "cannot decode these bytes"; the parent reports it
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.buffer.write(decoded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
