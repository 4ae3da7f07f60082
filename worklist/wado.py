"""A minimal WADO-RS (DICOM PS3.18) over one worklist entry's spool files, for the study page's viewer.

Two resources of a series the entry's manifest lists:

* ``…/series/{series}/metadata``: the DICOM JSON model (PS3.18 F.2) of every instance, bulk data left out (Pixel
  Data and any other binary value longer than :data:`BULK_DATA_THRESHOLD` bytes). The pixel attributes describe
  the frames as :func:`frames` returns them (decoded: Planar Configuration 0, a YBR colour image as RGB).
* ``…/instances/{sop}/frames/{n}[,{n}…]``: a ``multipart/related; type="application/octet-stream"`` message, one
  part per frame, each the frame's stored values uncompressed, little endian (transfer syntax 1.2.840.10008.1.2.1).
  Compressed files are decoded on the server with the project's decoders (:func:`model.imaging.decode_frame`).

The files come from the spool through the manifest only: an instance that is not in the series of that manifest is
:class:`WadoNotFoundError`, whatever the spool holds. Sign-in and the entry lookup are the application's
(worklist/app.py).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from core.manifest import InstanceEntry, SeriesEntry, StudyManifest
from model.imaging import ImageDecodeError, NotAnImageError, decode_frame

logger = logging.getLogger(__name__)

BULK_DATA_THRESHOLD = 1024  # bytes: a longer binary value is bulk data, left out of the metadata
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_FRAMES_PER_REQUEST = 64
DECODED_COLOUR = "RGB"  # what pydicom's decoders return for a YBR image


class WadoNotFoundError(LookupError):
    """The series, instance or frame is not in the entry's study."""


class WadoBadRequestError(ValueError):
    """The request names frames in a form PS3.18 does not allow."""


class WadoUnavailableError(RuntimeError):
    """The spool file of a listed instance cannot be read or decoded."""


@dataclass(frozen=True)
class Multipart:
    body: bytes
    content_type: str


def find_series(manifest: StudyManifest, series_uid: str) -> SeriesEntry:
    for series in manifest.series:
        if series.series_instance_uid == series_uid:
            return series
    raise WadoNotFoundError(f"series {series_uid[:64]} is not in study {manifest.study_instance_uid}")


def find_instance(series: SeriesEntry, sop_uid: str) -> InstanceEntry:
    for instance in series.instances:
        if instance.sop_instance_uid == sop_uid:
            return instance
    raise WadoNotFoundError(f"instance {sop_uid[:64]} is not in series {series.series_instance_uid}")


def series_metadata(spool_dir: Path, series: SeriesEntry) -> list[dict[str, Any]]:
    """The DICOM JSON of every instance of *series*, in the manifest's order (spatial, else instance number)."""
    return [instance_metadata(spool_dir, instance) for instance in series.instances]


def instance_metadata(spool_dir: Path, instance: InstanceEntry) -> dict[str, Any]:
    dataset = _read(spool_dir, instance, pixels=False)
    _drop_bulk_data(dataset)
    if instance.has_pixels:
        if int(dataset.get("SamplesPerPixel") or 1) > 1:
            dataset.PlanarConfiguration = 0  # the frames are returned interleaved, as pydicom decodes them
            if str(dataset.get("PhotometricInterpretation", "")).startswith("YBR"):
                dataset.PhotometricInterpretation = DECODED_COLOUR
        dataset.AvailableTransferSyntaxUID = ExplicitVRLittleEndian
    return dataset.to_json_dict()


def frames(spool_dir: Path, instance: InstanceEntry, numbers: str) -> Multipart:
    """The frames *numbers* (``"1"``, ``"2,5"``: 1-based, as PS3.18 numbers them) of *instance* as one multipart
    message of uncompressed little-endian stored values."""
    wanted = parse_frame_list(numbers)
    if not instance.has_pixels:
        raise WadoNotFoundError(f"instance {instance.sop_instance_uid} has no pixel data: it has no frames")
    for number in wanted:
        if not 1 <= number <= instance.number_of_frames:
            raise WadoNotFoundError(f"frame {number} is not in instance {instance.sop_instance_uid} (frames 1.."
                                    f"{instance.number_of_frames})")
    dataset = _read(spool_dir, instance, pixels=True)
    boundary = secrets.token_hex(16)
    parts: list[bytes] = []
    for number in wanted:
        try:
            array, _ = decode_frame(dataset, number - 1)
        except (ImageDecodeError, NotAnImageError) as exc:
            raise WadoUnavailableError(f"frame {number} of instance {instance.sop_instance_uid} cannot be "
                                       f"decoded: {exc}") from exc
        parts.append(b"--" + boundary.encode() + b"\r\n"
                     b"Content-Type: application/octet-stream; transfer-syntax=" + ExplicitVRLittleEndian.encode()
                     + b"\r\n\r\n" + frame_bytes(array) + b"\r\n")
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    content_type = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return Multipart(body, content_type)


def frame_bytes(array: np.ndarray) -> bytes:
    """One decoded frame as little-endian bytes, pixel by pixel (colour samples interleaved)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def parse_frame_list(numbers: str) -> list[int]:
    items = numbers.split(",")
    if not numbers or len(items) > MAX_FRAMES_PER_REQUEST or not all(item.isdigit() for item in items):
        raise WadoBadRequestError(f"frames must be a comma-separated list of 1 to {MAX_FRAMES_PER_REQUEST} frame "
                                  "numbers (1-based)")
    return [int(item) for item in items]


def _read(spool_dir: Path, instance: InstanceEntry, *, pixels: bool) -> Dataset:
    path = spool_dir / instance.path
    try:
        return dcmread(path, stop_before_pixels=not pixels)
    except (OSError, InvalidDicomError) as exc:
        logger.warning("spool file of instance %s cannot be read: %s", instance.sop_instance_uid, exc)
        raise WadoUnavailableError(f"the spool file of instance {instance.sop_instance_uid} cannot be read: "
                                   f"{type(exc).__name__}") from exc


def _drop_bulk_data(dataset: Dataset) -> None:
    for element in list(dataset):
        if element.VR == "SQ":
            for item in element.value:
                _drop_bulk_data(item)
        elif element.VR in BINARY_VRS and element.value is not None and len(element.value) > BULK_DATA_THRESHOLD:
            del dataset[element.tag]
