"""Prepare one study episode: read its instances from the spool and write the typed StudyManifest.

The manifest goes to ``<home>/work/<study_uid>/<episode>/manifest.json``; series and instances are sorted
spatially (position along the slice normal), else by Instance Number. The episode is claimed atomically in the
index first, so a duplicate delivery of the task exits without doing anything.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from core.layout import manifest_path
from core.manifest import FrameEntry, InstanceEntry, Orientation, SeriesEntry, StudyInfo, StudyManifest
from core.settings import Settings
from core.states import EpisodeState
from dicom_node.index import Index, InstanceRecord
from model.imaging import frame_header
from state.store import StateStore

log = logging.getLogger(__name__)

TASK_NAME = "prepare"
CLAIM_STALE_AFTER_S = 600.0  # a claim older than this is from a dead worker and may be taken over
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
AXIS_ALIGNED_COSINE = 0.9  # |normal · axis| above this (within ~25°) names the plane; below it is oblique


NO_INSTANCE_LEFT = "not analysed: no instance left: each was re-sent under another study"


def prepare_episode(
    settings: Settings, study_uid: str, episode_id: int, *, clock: Callable[[], float] = time.time
) -> Path | None:
    """Claim the episode, write its manifest and mark it prepared; None if another delivery already claimed it."""
    path = manifest_path(settings.home, study_uid, episode_id)
    store = StateStore(settings.index_path)
    index = Index(store)
    try:
        if not store.claim(study_uid, episode_id, clock(), CLAIM_STALE_AFTER_S):
            store.record_task_run(TASK_NAME, study_uid, episode_id, "duplicate", clock())
            log.info("study %s episode %d is already claimed or done; duplicate delivery ignored",
                     study_uid, episode_id)
            return None
        records = index.instances_for_episode(study_uid, episode_id)
        if not records:  # each instance arrived again under another Study Instance UID and moved there
            store.set_state(study_uid, episode_id, EpisodeState.NOT_ANALYSED, clock(), error=NO_INSTANCE_LEFT,
                            task_run=(TASK_NAME, str(EpisodeState.NOT_ANALYSED)))
            log.info("study %s episode %d ends %s: %s", study_uid, episode_id, EpisodeState.NOT_ANALYSED,
                     NO_INSTANCE_LEFT)
            return None
        try:
            manifest = build_manifest(settings.spool_dir, study_uid, episode_id, records)
            manifest.write(path)
        except Exception as exc:
            store.set_state(study_uid, episode_id, EpisodeState.FAILED, clock(), error=f"prepare: {exc}",
                            task_run=(TASK_NAME, "failed"))
            raise
        store.set_state(study_uid, episode_id, EpisodeState.PREPARED, clock(), task_run=(TASK_NAME, "prepared"))
    finally:
        store.close()
    log.info("study %s episode %d prepared: %d series, %d instance(s)", study_uid, episode_id,
             len(manifest.series), len(records))
    return path


def build_manifest(spool_dir: Path, study_uid: str, episode_id: int, records: Sequence[InstanceRecord]
                   ) -> StudyManifest:
    """The manifest of the given spool instances (all of one study)."""
    if not records:
        raise ValueError(f"study {study_uid} episode {episode_id} has no instances in the index")
    by_series: dict[str, list[tuple[InstanceEntry, Dataset]]] = {}
    for record in records:
        if record.study_instance_uid != study_uid:
            raise ValueError(f"instance {record.sop_instance_uid} belongs to study {record.study_instance_uid}, "
                             f"not {study_uid}")
        dataset = dcmread(spool_dir / record.path, stop_before_pixels=True)
        entry = instance_entry(dataset, record)
        by_series.setdefault(record.series_instance_uid, []).append((entry, dataset))
    series = [series_entry(uid, members) for uid, members in by_series.items()]
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    first_dataset = next(iter(by_series.values()))[0][1]
    return StudyManifest(
        study_instance_uid=study_uid,
        episode_id=episode_id,
        created_at=datetime.now(UTC),
        study=study_info(first_dataset),
        series=series,
    )


def study_info(dataset: Dataset) -> StudyInfo:
    """The patient and study attributes of *dataset*; an absent or empty one (Type 2 and 3 attributes often are)
    is ``""``, control characters are removed (no output may carry them), surrounding spaces trimmed."""
    def text(keyword: str) -> str:
        return clean_attribute(dataset.get(keyword))

    return StudyInfo(
        patient_name=text("PatientName"), patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"), patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"), accession_number=text("AccessionNumber"), study_id=text("StudyID"),
        study_date=text("StudyDate"), study_time=text("StudyTime"), study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"), institution_name=text("InstitutionName"),
    )


def clean_attribute(value: object) -> str:
    """A DICOM attribute value as single-line text: ``""`` for an absent or empty value, multiple values joined
    with a backslash (as DICOM encodes them), control characters removed."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    return _CONTROL.sub("", str(value)).strip()


def instance_entry(dataset: Dataset, record: InstanceRecord) -> InstanceEntry:
    """The manifest entry of one instance. Of an enhanced multi-frame image (functional groups), the orientation and
    pixel spacing come from its shared functional groups (else its first frame's) and each frame's position from
    its own: :func:`frame_entries`."""
    where = f"instance {record.sop_instance_uid}"
    frames = _int(dataset, "NumberOfFrames") or 1
    geometry = frame_header(dataset, 0)  # the data set itself unless it has functional groups
    spacing = _floats(geometry, "PixelSpacing", 2, where) or _floats(dataset, "ImagerPixelSpacing", 2, where)
    orientation = _floats(geometry, "ImageOrientationPatient", 6, where)
    return InstanceEntry(
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        path=record.path,
        transfer_syntax_uid=record.transfer_syntax_uid,
        instance_number=_int(dataset, "InstanceNumber"),
        rows=_int(dataset, "Rows"),
        columns=_int(dataset, "Columns"),
        number_of_frames=frames,
        samples_per_pixel=_int(dataset, "SamplesPerPixel") or 1,
        bits_allocated=_int(dataset, "BitsAllocated") or 16,
        photometric_interpretation=dataset.get("PhotometricInterpretation"),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        image_position_patient=_floats(dataset, "ImagePositionPatient", 3, where),  # type: ignore[arg-type]
        image_orientation_patient=orientation,  # type: ignore[arg-type]
        slice_location=float(dataset.SliceLocation) if dataset.get("SliceLocation") is not None else None,
        view_position=dataset.get("ViewPosition") or None,
        image_laterality=dataset.get("ImageLaterality") or None,
        image_type=_strings(dataset, "ImageType"),
        manufacturer=clean_attribute(dataset.get("Manufacturer")),
        size_bytes=record.size_bytes,
        frames=frame_entries(dataset, frames, orientation, where) if frames > 1 else (),
    )


def frame_entries(dataset: Dataset, count: int, orientation: Sequence[float] | None, where: str
                  ) -> tuple[FrameEntry, ...]:
    """The *count* frames of a multi-frame image, each with its Plane Position (Patient) from the functional groups
    when it has one; in spatial order (along the slice normal of *orientation*) when every frame has a position,
    else by number (a cine loop, a legacy multi-frame image: frames in time, or of one plane)."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != count:
        log.warning("%s: Per-frame Functional Groups Sequence has %d items for %d frames; frame positions ignored",
                    where, len(per_frame), count)
        per_frame = None
    shared = dataset.get("SharedFunctionalGroupsSequence")
    shared_plane = shared[0].get("PlanePositionSequence") if shared else None
    frames = []
    for index in range(count):
        plane = (per_frame[index].get("PlanePositionSequence") if per_frame is not None else None) or shared_plane
        position = _floats(plane[0], "ImagePositionPatient", 3, f"{where} frame {index + 1}") if plane else None
        frames.append(FrameEntry(number=index + 1, image_position_patient=position))  # type: ignore[arg-type]
    if orientation is not None and all(f.image_position_patient is not None for f in frames):
        normal = slice_normal(orientation)
        frames.sort(key=lambda f: (float(np.dot(normal, f.image_position_patient)), f.number))  # type: ignore[arg-type]
    return tuple(frames)


def series_entry(series_uid: str, members: list[tuple[InstanceEntry, Dataset]]) -> SeriesEntry:
    first = members[0][1]
    instances = sort_spatially([entry for entry, _ in members])
    iop = next((i.image_orientation_patient for i in instances if i.image_orientation_patient), None)
    return SeriesEntry(
        series_instance_uid=series_uid,
        modality=clean_attribute(first.get("Modality")),
        series_number=_int(first, "SeriesNumber"),
        series_description=clean_attribute(first.get("SeriesDescription")),
        body_part_examined=clean_attribute(first.get("BodyPartExamined")),
        orientation=None if iop is None else orientation_of(iop),
        instances=instances,
    )


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane (row direction × column direction)."""
    normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:6], dtype=float))
    length = float(np.linalg.norm(normal))
    if length == 0:
        raise ValueError(f"Image Orientation (Patient) {list(iop)} has parallel row and column directions")
    return normal / length


def orientation_of(iop: Sequence[float]) -> Orientation:
    """axial / coronal / sagittal when the slice normal is within ~25° of the z / y / x axis, else oblique."""
    normal = np.abs(slice_normal(iop))
    axis = int(np.argmax(normal))
    if normal[axis] < AXIS_ALIGNED_COSINE:
        return "oblique"
    planes: tuple[Orientation, Orientation, Orientation] = ("sagittal", "coronal", "axial")
    return planes[axis]


def sort_spatially(instances: list[InstanceEntry]) -> list[InstanceEntry]:
    """Order by position along the slice normal when every instance has a position and orientation."""
    if instances and all(i.image_position_patient and i.image_orientation_patient for i in instances):
        normal = slice_normal(instances[0].image_orientation_patient)  # type: ignore[arg-type]
        return sorted(instances, key=lambda i: (float(np.dot(normal, i.image_position_patient)),  # type: ignore[arg-type]
                                                i.instance_number or 0, i.sop_instance_uid))
    return sorted(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop_instance_uid))


def _int(dataset: Dataset, keyword: str) -> int | None:
    """An integer attribute; None when absent, empty or not an integer (a ``NumberOfFrames`` of ``1A`` is a
    malformed file: logged, and the image is then refused where it is decoded)."""
    try:
        value = dataset.get(keyword)
        if value is None or value == "":
            return None
        return int(value)
    except (TypeError, ValueError, OverflowError):
        log.warning("%s is not an integer; ignored", keyword)
        return None


def _strings(dataset: Dataset, keyword: str) -> tuple[str, ...]:
    value = dataset.get(keyword)
    if value is None or value == "":
        return ()
    values = value if isinstance(value, MultiValue | list | tuple) else [value]
    return tuple(clean_attribute(v) for v in values)


def _floats(dataset: Dataset, keyword: str, count: int, where: str) -> tuple[float, ...] | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    values = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
    if len(values) != count:
        log.warning("%s: %s has %d values, expected %d; ignored", where, keyword, len(values), count)
        return None
    return tuple(values)
