"""Signing a reviewed draft: the final SR, narrative, GSPS and ORU, written to the outbox, and the signed version.

The final result holds the radiologist's text and only the accepted findings (with edited labels); for a
grounded draft also the sentences of that text linked to those findings (worklist/grounding.py), which the SR
and the ORU are built from. The first
signature writes the final set of ``reporting/outbox.py`` beside the draft (``sr_final.dcm`` …, ORU with
OBR-25 = F). An amendment of a signed report writes a complete new final set to
``<episode folder>/amendment_<n>/``, built once from the signed result with the UIDs of version *n*
(reporting/uids.py), each SR naming the previous signed version as its predecessor, and an ORU with OBR-25 = C;
earlier versions stay on disk and in the database unchanged.
The entry is claimed (state -> signed) before anything is written, so two radiologists signing at once cannot
both write: the second gets ``SignConflictError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.layout import version_dir
from core.manifest import StudyManifest
from core.result import AnalysisResult, DraftReport, Finding
from core.settings import Settings
from reporting.context import Signoff
from reporting.hl7_oru import (
    HL7BuildError,
    HL7Endpoints,
    HL7NotApplicable,
    ResultStatus,
    build_oru_r01,
    new_control_id,
)
from reporting.outbox import OutboxEntry, OutputProblem, pixel_sources, read_sources, write_outbox
from worklist.grounding import final_structure, ground_draft, is_grounded
from worklist.storage import Decision, ReportVersion, Store, Study, StudyState, User

logger = logging.getLogger(__name__)

FINAL_RESULT_NAME = "result_final.json"


class SignError(ValueError):
    """The entry cannot be signed as it is (pending findings, no text, wrong role); the message says why."""


class SignConflictError(SignError):
    """Another radiologist signed (or is signing) this entry first."""


@dataclass(frozen=True)
class SignedReport:
    """What the pipeline delivers after a signature: every file of the final set, and who signed."""

    study_id: int
    study_uid: str
    episode_id: int
    version: int
    result_status: ResultStatus  # F for the first signature, C for an amendment
    signed_by: str  # worklist user name
    verifying_observer: str  # DICOM PN written in the SR
    signed_at: datetime
    output_dir: Path
    files: list[OutboxEntry]
    hl7_path: Path | None  # None when no ORU was built (outputs_final.json says why)
    manifest_path: Path
    result_path: Path  # the final AnalysisResult (status "final") as JSON

    def dicom_files(self) -> list[Path]:
        return [entry.path for entry in self.files if entry.kind in ("sr", "narrative", "gsps")]


def final_result(draft: AnalysisResult, study: Study, reviews: dict[int, tuple[Decision, str]],
                 sentence_reviews: dict[tuple[str, str], Decision] | None = None) -> AnalysisResult:
    """The signed result: the edited text and the accepted findings (relabelled), status final.

    A grounded draft (``draft.report.sentences``) also carries the radiologist's version of its structure: the
    sentences of the edited text linked to the accepted findings (worklist/grounding.py), and its consistency;
    an AI statement without image evidence that was neither accepted (*sentence_reviews*), edited nor removed
    refuses the signature, like a pending finding. A draft written before grounding is signed as before."""
    kept: list[Finding] = []
    kept_indices: list[int] = []
    labels: dict[int, str] = {}
    for index, finding in enumerate(draft.findings):
        decision, label = reviews.get(index, (Decision.PENDING, finding.label))
        labels[index] = label
        if decision is Decision.PENDING:
            raise SignError(f"finding {index + 1} ({finding.label!r}) is still pending: accept or reject every "
                            "finding before signing")
        if decision is Decision.ACCEPTED:
            kept.append(finding.model_copy(update={"label": label}) if label != finding.label else finding)
            kept_indices.append(index)
    findings_text, impression_text = study.draft_findings.strip(), study.draft_impression.strip()
    if not findings_text and not impression_text:
        raise SignError("the report has neither FINDINGS nor IMPRESSION text: write the report before signing")
    report = DraftReport(findings=findings_text, impression=impression_text)
    if not is_grounded(draft.report):
        return draft.model_copy(update={"report": report, "findings": kept, "status": "final"})
    accepted = {key for key, decision in (sentence_reviews or {}).items() if decision is Decision.ACCEPTED}
    grounded = ground_draft(draft.report, draft.findings, findings_text, impression_text,
                            rejected={i for i in range(len(draft.findings)) if i not in kept_indices},
                            labels=labels, accepted=accepted)
    undecided = grounded.undecided
    if undecided:
        raise SignError(f"{len(undecided)} AI statement(s) without image evidence still need a decision: "
                        + "; ".join(s.describe() for s in undecided)
                        + ": accept each as stated, edit it or remove it before signing")
    sentences, linked, consistency = final_structure(grounded, kept, kept_indices)
    final = draft.model_copy(update={"report": report.model_copy(update={"sentences": sentences}),
                                     "findings": linked, "status": "final", "consistency": consistency})
    # model_copy does not validate: the links must check both ways for readers of result_final.json
    return AnalysisResult.model_validate_json(final.model_dump_json())


def sign_study(store: Store, settings: Settings, study_id: int, user: User, now: datetime) -> SignedReport:
    """Sign (or, after an amendment was started, re-sign) an entry; write the final set and the version row."""
    if user.role != "radiologist":
        raise SignError(f"user {user.username!r} has role {user.role!r}: only a radiologist can sign")
    study = store.get_study(study_id)
    if study.state not in (StudyState.DRAFT_READY, StudyState.IN_REVIEW):
        raise SignConflictError(f"worklist entry {study_id} is {study.state.value}: only a draft or a report under "
                                "review can be signed")
    if study.result_path is None:
        raise SignError(f"worklist entry {study_id} has no model result to sign")
    manifest = StudyManifest.read(Path(study.manifest_path))
    draft = AnalysisResult.read(Path(study.result_path))
    reviews = {i: (r.decision, r.label) for i, r in store.finding_reviews(study_id).items()}
    result = final_result(draft, study, reviews, store.sentence_reviews(study_id))
    previous = store.versions(study_id)
    version = len(previous) + 1
    status = ResultStatus.FINAL if version == 1 else ResultStatus.CORRECTED
    signoff = Signoff(verifying_observer_name=user.full_name, verifying_organization=user.organization,
                      signed_at=now, version=version,
                      previous_sr_uid=previous[-1].sr_uid if previous else "",
                      previous_narrative_uid=previous[-1].narrative_uid if previous else "")
    sources = read_sources(settings.spool_dir, manifest, pixel_sources(result))
    hl7: bytes | OutputProblem
    try:
        hl7 = build_oru_r01(manifest, result, status, endpoints=HL7Endpoints.from_settings(settings),
                            control_id=new_control_id(), message_time=now,
                            unsolicited=settings.hl7_without_accession == "unsolicited")
    except HL7BuildError as exc:  # the signed DICOM documents go all the same; the delivery says skipped
        hl7 = OutputProblem("hl7", "skipped" if isinstance(exc, HL7NotApplicable) else "failed",
                            manifest.study.redact(str(exc)))

    if not store.set_state(study_id, StudyState.SIGNED, now, expect=[StudyState.DRAFT_READY, StudyState.IN_REVIEW],
                           claimant=user.username):  # a report another radiologist has claimed is theirs to sign
        holder = store.get_study(study_id).claimant
        if holder is not None and holder != user.username:
            raise SignConflictError(f"worklist entry {study_id} is in review by {holder}: take it over to sign it")
        raise SignConflictError(f"worklist entry {study_id} was signed by someone else a moment ago")
    try:
        folder = version_dir(settings.outbox_dir, manifest.study_instance_uid, manifest.episode_id, version)
        entries = write_outbox(settings.outbox_dir, manifest, result, sources, hl7, signoff=signoff)
        result_path = folder / FINAL_RESULT_NAME
        result.write(result_path)
        sr_uid = next(e.sop_instance_uid for e in entries if e.kind == "sr")
        narrative_uid = next(e.sop_instance_uid for e in entries if e.kind == "narrative")
        store.add_version(ReportVersion(
            study_id=study_id, version=version, result_status=status.value, findings=result.report.findings,
            impression=result.report.impression, signed_by=user.username, signed_at=now, output_dir=str(folder),
            sr_uid=sr_uid or "", narrative_uid=narrative_uid or ""), now)
    except BaseException:
        store.set_state(study_id, StudyState.IN_REVIEW, now, expect=[StudyState.SIGNED])
        raise
    logger.info("worklist entry %d signed as version %d (%s) by %s", study_id, version, status.value, user.username)
    hl7_path = next((e.path for e in entries if e.kind == "hl7"), None)
    return SignedReport(study_id=study_id, study_uid=manifest.study_instance_uid, episode_id=manifest.episode_id,
                        version=version, result_status=status, signed_by=user.username,
                        verifying_observer=user.full_name, signed_at=now, output_dir=folder, files=entries,
                        hl7_path=hl7_path, manifest_path=Path(study.manifest_path), result_path=result_path)
