"""The typed study manifest: what the prepare task found in the spool, used by every later stage.

Paths are relative to the spool directory so a manifest stays valid when the data directory moves.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.jsonio import write_atomic

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]

MANIFEST_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FrameEntry(_Strict):
    """One frame of a multi-frame image: its 1-based number and, when the image says (the Plane Position of its
    functional groups), its position."""

    number: int = Field(ge=1, description="1-based frame number, as the SR and GSPS reference it")
    image_position_patient: tuple[float, float, float] | None = None


class InstanceEntry(_Strict):
    sop_instance_uid: str
    sop_class_uid: str
    path: str = Field(description="file path relative to the spool directory")
    transfer_syntax_uid: str
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    photometric_interpretation: str | None = None
    pixel_spacing: tuple[float, float] | None = Field(None, description="(row spacing, column spacing) in mm")
    image_position_patient: tuple[float, float, float] | None = None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None
    slice_location: float | None = None
    view_position: str | None = Field(None, description="e.g. PA, AP, LL for radiographs")
    image_laterality: str | None = None
    image_type: tuple[str, ...] = Field((), description="ImageType values, e.g. ORIGINAL, PRIMARY, LOCALIZER")
    manufacturer: str = ""
    size_bytes: int = 0
    frames: tuple[FrameEntry, ...] = Field((), description="the frames of a multi-frame image in spatial order "
                                           "(position along the slice normal) when every frame has a position, "
                                           "else by number; empty for a single-frame image (and in manifests "
                                           "written before frames were listed)")

    @property
    def has_pixels(self) -> bool:
        return self.rows is not None and self.columns is not None

    @property
    def is_multiframe(self) -> bool:
        return self.number_of_frames > 1

    def frame_numbers(self) -> list[int]:
        """The 1-based frames of a multi-frame image in the order of :attr:`frames` (by number when they are not
        listed); ``[]`` for a single-frame image."""
        if not self.is_multiframe:
            return []
        return [frame.number for frame in self.frames] or list(range(1, self.number_of_frames + 1))


class SeriesEntry(_Strict):
    series_instance_uid: str
    modality: str
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    orientation: Orientation | None = Field(None, description="derived from Image Orientation (Patient)")
    instances: list[InstanceEntry] = Field(description="in spatial order (slice position), else instance number")


class StudyInfo(_Strict):
    """Patient and study attributes that reports and HL7 messages need. Never logged at INFO."""

    patient_name: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    institution_name: str = ""

    def redact(self, text: str) -> str:
        """*text* with every patient value of this study replaced by ``<redacted>``: for error texts that quote
        what a library said (highdicom, hl7apy may quote the value they refused) before they reach a log, the
        index or a dead letter."""
        values = {self.patient_id, self.patient_birth_date, self.accession_number, self.patient_name,
                  self.referring_physician_name}
        for name in (self.patient_name, self.referring_physician_name):
            values.update(part for part in re.split(r"[\^=]", name) if len(part.strip()) >= 3)
        for value in sorted((v.strip() for v in values if v and v.strip()), key=len, reverse=True):
            text = text.replace(value, "<redacted>")
        return text


class StudyManifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    study_instance_uid: str
    episode_id: int
    created_at: datetime
    study: StudyInfo
    series: list[SeriesEntry]

    @property
    def modalities(self) -> list[str]:
        return sorted({series.modality for series in self.series})

    def instances(self) -> list[tuple[SeriesEntry, InstanceEntry]]:
        return [(series, instance) for series in self.series for instance in series.instances]

    def find_instance(self, sop_instance_uid: str) -> tuple[SeriesEntry, InstanceEntry]:
        for series, instance in self.instances():
            if instance.sop_instance_uid == sop_instance_uid:
                return series, instance
        raise KeyError(f"SOP Instance UID {sop_instance_uid} is not in the manifest of study "
                       f"{self.study_instance_uid}")

    def write(self, path: Path) -> None:
        write_atomic(path, self.model_dump_json(indent=2).encode())

    @classmethod
    def read(cls, path: Path) -> StudyManifest:
        return cls.model_validate_json(path.read_bytes())
