"""A new episode of a study supersedes the last one's report: predecessor documents and carried tracking UIDs.

A PACS that sends a study again (more images, a corrected header, the whole study re-sent) opens a new episode
(state/store.py). Its outputs must not read as a second, unrelated report of the same study: the new
findings SR and narrative list the previous episode's current documents in Predecessor Documents Sequence
(the signed ones when a radiologist signed, else the drafts), and a finding that is the same lesion as one of the
previous report keeps that finding's tracking UID (TID 1410), so a viewer or a registry follows one lesion across
the versions. "The same lesion" is deliberately narrow: the same image (and frame), the same coded finding
type (or, uncoded, the same label) and boxes overlapping by at least :data:`MATCH_IOU`; anything else is a new
lesion with a new UID.

The previous report is read from the outbox (``<outbox>/<study>/<episode>/``, reporting/outbox.py): the SR's and
the narrative's identifiers from the set's index (reporting/outputs.py, no DICOM file opened) and the findings from
the findings document it lists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from core.layout import study_outbox_dir
from core.result import AnalysisResult, DocumentReference, Finding
from model.slices import iou
from reporting import codes as rcodes
from reporting.outputs import OutboxEntry, OutboxIndexError, read_entries

logger = logging.getLogger(__name__)

MATCH_IOU = 0.3
_DOCUMENTS = ("sr", "narrative")  # the outbox kinds a new report supersedes (DocumentReference.kind)


@dataclass(frozen=True)
class PriorFinding:
    tracking_uid: str
    code: str  # the coded finding type's value, or the label when it has none
    sop_instance_uid: str
    frame_number: int | None
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class PriorReport:
    """The current report of an earlier episode: its documents and its findings."""

    episode_id: int
    signed: bool
    documents: list[DocumentReference]
    findings: list[PriorFinding]


def _document(entry: OutboxEntry, study_uid: str, episode_id: int) -> DocumentReference | None:
    if not (entry.sop_class_uid and entry.sop_instance_uid and entry.series_instance_uid):
        return None
    return DocumentReference(kind=entry.kind, episode_id=episode_id, study_instance_uid=study_uid,
                             series_instance_uid=entry.series_instance_uid, sop_class_uid=entry.sop_class_uid,
                             sop_instance_uid=entry.sop_instance_uid)


def _read_findings(path: Path) -> list[PriorFinding]:
    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return [PriorFinding(tracking_uid=str(item["tracking_uid"]),
                             code=label_code(str(item["label"])),
                             sop_instance_uid=str(item["sop_instance_uid"]),
                             frame_number=item.get("frame_number"),
                             box=(float(item["box"][0]), float(item["box"][1]), float(item["box"][2]),
                                  float(item["box"][3])))
                for item in document.get("findings", [])]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        logger.warning("the previous findings at %s cannot be read (%s: %s); no tracking UID is carried",
                       path.name, type(exc).__name__, exc)
        return []


def prior_report(outbox_dir: Path, study_uid: str, episode_id: int) -> PriorReport | None:
    """The report of the latest earlier episode of *study_uid* that has a findings SR in the outbox, or None."""
    try:
        folder = study_outbox_dir(outbox_dir, study_uid)
    except ValueError:  # a UID that cannot name a folder has no earlier report
        return None
    if not folder.is_dir():
        return None
    earlier = sorted((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()
                      and int(p.name) < episode_id), reverse=True)
    for previous in earlier:
        episode = folder / str(previous)
        try:
            entries, signed = read_entries(episode, signed=True), True
            if not any(entry.kind == "sr" for entry in entries):
                entries, signed = read_entries(episode), False
        except (OSError, ValueError, OutboxIndexError) as exc:
            logger.warning("episode %d: the outbox index of the previous episode %d cannot be read (%s: %s); it "
                           "is not superseded", episode_id, previous, type(exc).__name__, exc)
            continue
        if not any(entry.kind == "sr" for entry in entries):
            continue
        documents = [document for kind in _DOCUMENTS for entry in entries if entry.kind == kind
                     and (document := _document(entry, study_uid, previous)) is not None]
        findings = next((entry.path for entry in entries if entry.kind == "findings"), None)
        return PriorReport(previous, signed, documents, _read_findings(findings) if findings else [])
    return None


def label_code(label: str) -> str:
    """What "the same finding type" compares: the code of a coded label, the normalized text of an uncoded one."""
    coded = rcodes.lookup_finding(label)
    return coded.text if coded.is_fallback else str(coded.finding_type.value)


def match_findings(findings: list[Finding], prior: list[PriorFinding]) -> dict[int, str]:
    """Index of a new finding -> the tracking UID of the prior finding that is the same lesion; one to one, the
    best-overlapping pairs first."""
    pairs = []
    for n, finding in enumerate(findings):
        code = label_code(finding.label)
        for m, old in enumerate(prior):
            if (old.sop_instance_uid, old.frame_number, old.code) != (finding.sop_instance_uid,
                                                                      finding.frame_number, code):
                continue
            overlap = iou(finding.box, old.box)
            if overlap >= MATCH_IOU:
                pairs.append((overlap, n, m))
    matched: dict[int, str] = {}
    used: set[int] = set()
    for _, n, m in sorted(pairs, key=lambda pair: (-pair[0], pair[1], pair[2])):
        if n not in matched and m not in used:
            matched[n] = prior[m].tracking_uid
            used.add(m)
    return matched


def supersede(outbox_dir: Path, result: AnalysisResult) -> AnalysisResult:
    """*result* with the previous episode's documents in ``supersedes`` and matched findings' tracking UIDs carried
    over; unchanged when the study has no earlier report."""
    prior = prior_report(outbox_dir, result.study_instance_uid, result.episode_id)
    if prior is None:
        return result
    matched = match_findings(result.findings, prior.findings)
    findings = [finding.model_copy(update={"tracking_uid": matched[n]}) if n in matched else finding
                for n, finding in enumerate(result.findings)]
    logger.info("episode %d supersedes episode %d (%s report): %d document(s), %d of %d finding(s) matched to "
                "the previous report's lesions", result.episode_id, prior.episode_id,
                "signed" if prior.signed else "draft", len(prior.documents), len(matched), len(findings))
    return result.model_copy(update={"findings": findings, "supersedes": prior.documents})
