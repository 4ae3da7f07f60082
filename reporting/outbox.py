"""Write every output of one study episode to ``<home>/outbox/<study_uid>/<episode>/``, each file atomically.

Draft set: ``sr.dcm``, ``narrative.dcm``, ``gsps_<n>.dcm``, ``overlay_<n>.png``, ``findings.json`` and
``oru.hl7`` (bytes made by reporting/hl7_oru.py). After a radiologist signs, the final set sits beside it:
``sr_final.dcm``, ``narrative_final.dcm``, ``gsps_final_<n>.dcm``, ``overlay_final_<n>.png``,
``findings_final.json`` and ``oru_final.hl7``. Everything is built in memory first, so invalid input
writes nothing; a retry rewrites identical UIDs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from model.result import AnalysisResult
from raddraft.jsonio import write_atomic
from reporting.context import ReportInputs, Signoff
from reporting.gsps import build_presentation_states
from reporting.narrative import build_narrative_sr
from reporting.overlay import findings_json, render_overlay
from reporting.sr import build_findings_sr
from workers.manifest import StudyManifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxEntry:
    path: Path
    kind: str  # "sr", "narrative", "gsps", "overlay", "findings", "hl7"
    sop_instance_uid: str | None = None  # for DICOM files


def episode_dir(outbox_dir: Path, study_uid: str, episode_id: int) -> Path:
    if not study_uid or "/" in study_uid or study_uid.startswith("."):
        raise ValueError(f"study UID {study_uid!r} cannot name an outbox folder")
    return outbox_dir / study_uid / str(episode_id)


def read_sources(spool_dir: Path, manifest: StudyManifest) -> list[Dataset]:
    """Every instance of the manifest, read from the spool (the evidence and pixels the outputs need)."""
    sources = []
    for _, instance in manifest.instances():
        path = spool_dir / instance.path
        if not path.is_file():
            raise FileNotFoundError(f"instance {instance.sop_instance_uid} of the manifest is missing from the "
                                    f"spool: {path}")
        sources.append(pydicom.dcmread(path))
    return sources


def dicom_bytes(dataset: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file."""
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def write_outbox(
    outbox_dir: Path,
    manifest: StudyManifest,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    hl7_message: bytes,
    *,
    signoff: Signoff | None = None,
) -> list[OutboxEntry]:
    """Build the draft set (or, with ``signoff``, the final set) and write it; returns what was written."""
    if not hl7_message:
        raise ValueError("hl7_message must not be empty: pass the ORU^R01 bytes from reporting.hl7_oru")
    signed = signoff is not None
    suffix = "_final" if signed else ""
    inputs = ReportInputs.check(manifest, result, sources)
    folder = episode_dir(outbox_dir, manifest.study_instance_uid, manifest.episode_id)

    files: list[tuple[OutboxEntry, bytes]] = []
    sr = build_findings_sr(manifest, result, sources, signoff)
    files.append((OutboxEntry(folder / f"sr{suffix}.dcm", "sr", str(sr.SOPInstanceUID)), dicom_bytes(sr)))
    narrative = build_narrative_sr(manifest, result, sources, signoff)
    files.append((OutboxEntry(folder / f"narrative{suffix}.dcm", "narrative", str(narrative.SOPInstanceUID)),
                  dicom_bytes(narrative)))
    for n, state in enumerate(build_presentation_states(manifest, result, sources, signed), start=1):
        files.append((OutboxEntry(folder / f"gsps{suffix}_{n}.dcm", "gsps", str(state.SOPInstanceUID)),
                      dicom_bytes(state)))
    overlays: dict[str, str] = {}
    for n, (image, findings) in enumerate(inputs.annotated_images(), start=1):
        name = f"overlay{suffix}_{n}.png"
        overlays[str(image.SOPInstanceUID)] = name
        files.append((OutboxEntry(folder / name, "overlay"), render_overlay(image, findings, signed)))
    files.append((OutboxEntry(folder / f"findings{suffix}.json", "findings"), findings_json(inputs, overlays,
                                                                                            signed)))
    files.append((OutboxEntry(folder / f"oru{suffix}.hl7", "hl7"), hl7_message))

    for entry, data in files:
        write_atomic(entry.path, data)
    logger.info("wrote %d %s output file(s) for episode %d to the outbox", len(files),
                "final" if signed else "draft", manifest.episode_id)
    return [entry for entry, _ in files]
