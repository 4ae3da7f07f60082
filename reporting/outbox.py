"""Write every output of one study episode to ``<home>/outbox/<study_uid>/<episode>/``, each file atomically.

Draft set (version 0): ``sr.dcm``, ``narrative.dcm``, ``gsps_<n>.dcm``, ``overlay_<n>.png``, ``findings.json`` and
``oru.hl7`` (bytes made by reporting/hl7_oru.py). After a radiologist signs, the final set (version 1) sits beside
it: ``sr_final.dcm``, ``narrative_final.dcm``, ``gsps_final_<n>.dcm``, ``overlay_final_<n>.png``,
``findings_final.json`` and ``oru_final.hl7``; amendment *n* writes the same names to ``amendment_<n>/``
(core/layout.py ``version_dir``). Each output is built once, in memory, from inputs checked once
(:class:`~reporting.context.ReportInputs`) with the UIDs of its version (reporting/uids.py): one that cannot be
built (an image no presentation state fits, a study without an order number under the skip policy) is recorded
with its reason in ``outputs.json`` (``outputs_final.json``) and never stops the others. The set's index
(``outbox.json``, ``outbox_final.json``: reporting/outputs.py) is written last and is how every reader finds the
files. A retry rewrites identical UIDs.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from core.jsonio import write_atomic
from core.layout import index_name, outputs_name, version_dir
from core.manifest import StudyManifest
from core.result import AnalysisResult
from reporting.context import ReportInputs, Signoff
from reporting.gsps import build_presentation_state_set
from reporting.narrative import build_narrative_sr
from reporting.outputs import (
    OUTPUT_KINDS,
    OutboxEntry,
    OutputProblem,
    entry_of,
    index_bytes,
    index_document,
    read_entries,
    read_problems,
)
from reporting.overlay import findings_json, render_overlay
from reporting.sources import conform
from reporting.sr import build_findings_sr

logger = logging.getLogger(__name__)


__all__ = ["OUTPUT_KINDS", "OutboxEntry", "OutboxError", "OutputProblem", "dicom_bytes", "pixel_sources",
           "read_entries", "read_problems", "read_sources", "write_outbox", "write_outputs"]


class OutboxError(ValueError):
    """An output required by the caller (a signed report needs its SR and narrative) could not be built."""


def read_sources(spool_dir: Path, manifest: StudyManifest, pixels_of: Collection[str] | None = None
                 ) -> list[Dataset]:
    """Every instance of the manifest, read from the spool, each made to fit the modules the outputs copy
    (reporting/sources.py). Only the instances in *pixels_of* (SOP Instance UIDs: :func:`pixel_sources`) are read
    with their pixel data; the others up to it (their headers are the SR evidence and the images a presentation
    state references: a 300-slice CT with 8 slices analysed reads 8 slices' pixels, not 300). None reads every
    instance whole."""
    sources = []
    for _, instance in manifest.instances():
        path = spool_dir / instance.path
        if not path.is_file():
            raise FileNotFoundError(f"instance {instance.sop_instance_uid} of the manifest is missing from the "
                                    f"spool: {path}")
        headers_only = pixels_of is not None and instance.sop_instance_uid not in pixels_of
        sources.append(conform(pydicom.dcmread(path, stop_before_pixels=headers_only)))
    return sources


def pixel_sources(result: AnalysisResult) -> set[str]:
    """The instances whose pixel data the outputs of *result* may read: the analysed images (box refinement) and
    the images with findings (overlay PNG, a presentation state's window when the image has none)."""
    return set(result.analysed_instances) | {finding.sop_instance_uid for finding in result.findings}


def dicom_bytes(dataset: Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file."""
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dicom_file(path: Path, kind: str, dataset: Dataset) -> tuple[OutboxEntry, bytes]:
    data = dicom_bytes(dataset)
    return entry_of(path, kind, data, sop_instance_uid=str(dataset.SOPInstanceUID),
                    sop_class_uid=str(dataset.SOPClassUID),
                    series_instance_uid=str(dataset.SeriesInstanceUID)), data


def write_outputs(
    outbox_dir: Path,
    manifest: StudyManifest,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    hl7_message: bytes | OutputProblem,
    *,
    signoff: Signoff | None = None,
) -> tuple[list[OutboxEntry], list[OutputProblem]]:
    """Build every output of the draft set (or, with ``signoff``, the set of signed version ``signoff.version``)
    on its own and write those that could be built: one that cannot (its builder raised) is an
    :class:`OutputProblem` and the others still go. *hl7_message* is the ORU's bytes, or the problem that kept it
    from being built. The outcome of each output is written to ``outputs.json`` (``outputs_final.json``) beside the
    files, and last the set's index (``outbox.json``, ``outbox_final.json``)."""
    signed = signoff is not None
    version = signoff.version if signoff is not None else 0
    suffix = "_final" if signed else ""
    folder = version_dir(outbox_dir, manifest.study_instance_uid, manifest.episode_id, version)
    files: list[tuple[OutboxEntry, bytes]] = []
    problems: list[OutputProblem] = []

    def attempt(kind: str, build: Callable[[], list[tuple[OutboxEntry, bytes]]]) -> None:
        try:
            files.extend(build())
        except Exception as exc:
            reason = manifest.study.redact(f"{type(exc).__name__}: {exc}")
            problems.append(OutputProblem(kind, "failed", reason))
            logger.warning("episode %d: the %s output could not be built: %s", manifest.episode_id, kind, reason)

    inputs: ReportInputs | None = None
    try:
        inputs = ReportInputs.check(manifest, result, sources)
    except ValueError as exc:
        reason = manifest.study.redact(f"{type(exc).__name__}: {exc}")
        logger.warning("episode %d: no DICOM output can be built: %s", manifest.episode_id, reason)
        problems.extend(OutputProblem(kind, "failed", reason) for kind in OUTPUT_KINDS if kind != "hl7")

    if inputs is not None:
        checked = inputs

        def sr() -> list[tuple[OutboxEntry, bytes]]:
            return [_dicom_file(folder / f"sr{suffix}.dcm", "sr", build_findings_sr(checked, signoff))]

        def narrative() -> list[tuple[OutboxEntry, bytes]]:
            return [_dicom_file(folder / f"narrative{suffix}.dcm", "narrative", build_narrative_sr(checked, signoff))]

        def gsps() -> list[tuple[OutboxEntry, bytes]]:
            states, reasons = build_presentation_state_set(checked, version)
            built = [_dicom_file(folder / f"gsps{suffix}_{n}.dcm", "gsps", state)
                     for n, state in enumerate(states, start=1)]
            # An image no presentation state fits (PALETTE COLOR, ...) is skipped by design, the others still go.
            problems.extend(OutputProblem("gsps", "skipped", manifest.study.redact(reason)) for reason in reasons)
            return built

        overlays: dict[str, str] = {}

        def overlay() -> list[tuple[OutboxEntry, bytes]]:
            built = []
            for n, (image, findings) in enumerate(checked.annotated_images(), start=1):
                name = f"overlay{suffix}_{n}.png"
                data = render_overlay(image, findings, signed)
                built.append((entry_of(folder / name, "overlay", data), data))
                overlays[str(image.SOPInstanceUID)] = name
            return built

        def findings() -> list[tuple[OutboxEntry, bytes]]:
            data = findings_json(checked, overlays, signed)
            return [(entry_of(folder / f"findings{suffix}.json", "findings", data), data)]

        for kind, build in (("sr", sr), ("narrative", narrative), ("gsps", gsps), ("overlay", overlay),
                            ("findings", findings)):
            attempt(kind, build)

    if isinstance(hl7_message, OutputProblem):
        problems.append(hl7_message)
    elif not hl7_message:
        raise ValueError("hl7_message must not be empty: pass the ORU^R01 bytes from reporting.hl7_oru, or the "
                         "OutputProblem that kept it from being built")
    else:
        files.append((entry_of(folder / f"oru{suffix}.hl7", "hl7", hl7_message), hl7_message))

    for entry, data in files:
        write_atomic(entry.path, data)
    document = {"built": sorted({entry.kind for entry, _ in files}),
                "problems": [asdict(problem) for problem in problems]}
    write_atomic(folder / outputs_name(signed), json.dumps(document, indent=2).encode())
    entries = [entry for entry, _ in files]
    index = index_document(entries, study_uid=manifest.study_instance_uid, episode_id=manifest.episode_id,
                           version=version)
    write_atomic(folder / index_name(signed), index_bytes(index))  # last: a set with an index is complete
    logger.info("wrote %d %s output file(s) for episode %d to the outbox%s", len(files),
                "final" if signed else "draft", manifest.episode_id,
                "".join(f"; {p.kind} {p.state}" for p in problems))
    return entries, problems


def write_outbox(
    outbox_dir: Path,
    manifest: StudyManifest,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    hl7_message: bytes | OutputProblem,
    *,
    signoff: Signoff | None = None,
) -> list[OutboxEntry]:
    """:func:`write_outputs`, for a caller that needs the report documents: raises :class:`OutboxError` when
    the SR or the narrative could not be built (what could be built is written all the same)."""
    entries, problems = write_outputs(outbox_dir, manifest, result, sources, hl7_message, signoff=signoff)
    essential = [p for p in problems if p.kind in ("sr", "narrative") and p.state == "failed"]
    if essential:
        raise OutboxError("; ".join(f"{p.kind}: {p.reason}" for p in essential))
    return entries
