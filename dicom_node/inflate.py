"""The inflated size of a Deflated Explicit VR Little Endian instance, measured without holding it.

A deflated data set is a compression bomb like any other: a few MB on the wire can inflate to gigabytes, and
pydicom inflates the whole stream in memory when it reads it (the node reads every instance it accepts). The
node first inflates the stream in bounded pieces, keeping only the count, and refuses an instance whose
data set would exceed ``max_instance_mb`` inflated, before pydicom sees it. The instance is either in memory
(bytes) or in a file (pynetdicom's chunked receive); a file is read in pieces of :data:`PIECE` bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from pydicom.uid import UID

PREAMBLE_AND_PREFIX = 132  # 128-byte preamble + "DICM"
GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
PIECE = 1024 * 1024


class InflatedTooLargeError(ValueError):
    """The deflated data set inflates past the limit."""


def dataset_offset(data: bytes) -> int:
    """Where the data set starts after the preamble and the File Meta Information of a Part 10 file.

    *data*: the file, or at least its first ``PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT`` bytes."""
    if len(data) < PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT:
        raise ValueError(f"the encoded instance is {len(data)} bytes, too short for a preamble and File Meta "
                         "Information")
    if data[128:132] != b"DICM":
        raise ValueError("the encoded instance has no DICM prefix after its preamble")
    tag = data[PREAMBLE_AND_PREFIX:PREAMBLE_AND_PREFIX + 4]
    if tag != b"\x02\x00\x00\x00" or data[PREAMBLE_AND_PREFIX + 4:PREAMBLE_AND_PREFIX + 6] != b"UL":
        raise ValueError("the File Meta Information does not start with its group length (0002,0000) UL")
    (group_length,) = struct.unpack_from("<I", data, PREAMBLE_AND_PREFIX + 8)
    return PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT + group_length


def check_inflated_size(data: bytes | Path, transfer_syntax: UID, limit: int) -> int:
    """The inflated size of the data set of *data* (a Part 10 file, in memory or its path) when its transfer
    syntax is deflated, else its plain size; :class:`InflatedTooLargeError` as soon as it passes *limit* bytes
    (nothing beyond one piece of :data:`PIECE` bytes is held), ``ValueError`` when the stream is not valid
    deflate."""
    if isinstance(data, Path):
        with data.open("rb") as handle:
            offset = dataset_offset(handle.read(PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT))
            if not transfer_syntax.is_deflated:
                return data.stat().st_size - offset
            handle.seek(offset)
            return _inflated_size(iter(lambda: handle.read(PIECE), b""), limit)
    offset = dataset_offset(data)
    if not transfer_syntax.is_deflated:
        return len(data) - offset
    return _inflated_size([memoryview(data)[offset:]], limit)


def _inflated_size(compressed: Iterable[bytes | memoryview], limit: int) -> int:
    """Inflate the raw deflate stream given in *compressed* pieces, keeping only the count of inflated bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for chunk in compressed:
            pending: bytes | memoryview = chunk
            while pending and not inflater.eof:
                piece = inflater.decompress(pending, PIECE)
                total += len(piece)
                if total > limit:
                    raise InflatedTooLargeError(f"the deflated data set inflates to more than "
                                                f"{limit / 2**20:.0f} MiB (max_instance_mb)")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        total += len(inflater.flush())
    except zlib.error as exc:
        raise ValueError(f"the deflated data set is not a valid deflate stream: {exc}") from exc
    if total > limit:
        raise InflatedTooLargeError(f"the deflated data set inflates to more than {limit / 2**20:.0f} MiB "
                                    "(max_instance_mb)")
    return total
