"""The worklist's interface to the pipeline: drafts in, questions to the model, signed reports out.

The pipeline connects three things:

* ``Bridge.register_draft(manifest_path, result_path)`` when a draft is ready (``register_failure`` when an
  episode failed): the io tasks ``worklist.draft_ready`` / ``worklist.episode_failed`` (worklist/tasks.py) the
  pipeline sends (workers/announce.py) call them; a caller that holds the manifest and the result passes
  them too (``manifest=``, ``result=``) and neither file is read again;
* a model for questions: any object with ``image_size`` and ``answer(pixels, instruction) -> str``
  (``worklist/answerer.py`` wraps a ``MiniGPTMed``); without one the Ask box says the model is off;
* ``Bridge.on_sign(callback)``: the callback gets a ``SignedReport`` (every final file, the ORU path, F or C)
  after the signature is stored; ``worklist.delivery.SignedDeliveryQueue`` is the callback that enqueues the
  deliveries on the io queue, like the drafts' (``worklist/service.py`` wires it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydicom import dcmread

from core.manifest import StudyInfo, StudyManifest
from core.result import AnalysisResult, Consistency
from core.settings import Settings
from model.imaging import prepare_image
from model.prompts import parse_grounded, refer_instruction, vqa_instruction
from worklist.signing import SignedReport, sign_study
from worklist.storage import Priority, Store, StudyState, User

logger = logging.getLogger(__name__)

SignCallback = Callable[[SignedReport], None]
AskKind = Literal["vqa", "refer"]


class QuestionModel(Protocol):
    """What ``Bridge.ask`` needs of a model: its square input size and a greedy answer to one instruction."""

    @property
    def image_size(self) -> int: ...

    def answer(self, pixels: np.ndarray, instruction: str) -> str:
        """*pixels*: (3, S, S) float32 CLIP-normalised; returns the raw answer text (box markup kept)."""
        ...


class ModelUnavailableError(RuntimeError):
    """No model is connected to the worklist."""


@dataclass(frozen=True)
class Answer:
    kind: AskKind
    instruction: str
    raw: str  # the model's text as generated
    text: str  # without markup
    boxes: list[tuple[float, float, float, float]]  # source pixels (x1, y1, x2, y2)
    dropped: list[str]  # fragments the box parser could not read, with the reason

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "instruction": self.instruction, "raw": self.raw, "text": self.text,
                "boxes": [list(b) for b in self.boxes], "dropped": self.dropped}


def age_in_years(info: StudyInfo) -> int | None:
    """Patient age at the study date (DICOM dates YYYYMMDD); None when either date is missing or invalid."""
    try:
        born = datetime.strptime(info.patient_birth_date.strip(), "%Y%m%d").date()
        studied = datetime.strptime(info.study_date.strip(), "%Y%m%d").date()
    except ValueError:
        return None
    years = studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))
    return years if years >= 0 else None


class Bridge:
    """One per process: the store, the settings, the model (optional) and the sign callbacks."""

    def __init__(self, settings: Settings, store: Store, model: QuestionModel | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.store = store
        self.model = model
        self.clock = clock
        self._callbacks: list[SignCallback] = []

    # ------------------------------------------------------------------ drafts in

    def register_draft(self, manifest_path: Path, result_path: Path, priority: Priority = Priority.ROUTINE, *,
                       manifest: StudyManifest | None = None, result: AnalysisResult | None = None) -> int:
        """Put a ready draft on the worklist (idempotent for a retried task); returns the entry id. The entry names
        the two files; *manifest* and *result*, when the caller has them (what it wrote there), are used instead
        of reading them back."""
        manifest = manifest if manifest is not None else StudyManifest.read(manifest_path)
        result = result if result is not None else AnalysisResult.read(result_path)
        if (result.study_instance_uid, result.episode_id) != (manifest.study_instance_uid, manifest.episode_id):
            raise ValueError(f"result {result_path} is for study {result.study_instance_uid} episode "
                             f"{result.episode_id}, not the manifest's {manifest.study_instance_uid} episode "
                             f"{manifest.episode_id}")
        if result.status != "preliminary":
            raise ValueError(f"result {result_path} has status {result.status!r}; a draft must be 'preliminary'")
        entry_id, changed = self._upsert(manifest, manifest_path, result_path, state=StudyState.DRAFT_READY,
                                         priority=priority, findings=result.report.findings,
                                         impression=result.report.impression, error="",
                                         consistency=result.consistency)
        if changed:
            self.store.audit("pipeline", "draft-registered", entry_id, f"episode {manifest.episode_id}, "
                             f"{len(result.findings)} finding(s)", self.clock())
        logger.info("worklist entry %d: draft ready (episode %d, %d finding(s))", entry_id, manifest.episode_id,
                    len(result.findings))
        return entry_id

    def register_failure(self, manifest_path: Path, error: str, priority: Priority = Priority.ROUTINE) -> int:
        """Show an episode whose analysis failed (the error text must hold no patient data)."""
        manifest = StudyManifest.read(manifest_path)
        entry_id, _ = self._upsert(manifest, manifest_path, None, state=StudyState.FAILED, priority=priority,
                                   findings="", impression="", error=error)
        self.store.audit("pipeline", "analysis-failed", entry_id, error[:500], self.clock())
        return entry_id

    def _upsert(self, manifest: StudyManifest, manifest_path: Path, result_path: Path | None, *, state: StudyState,
                priority: Priority, findings: str, impression: str, error: str,
                consistency: Consistency | None = None) -> tuple[int, bool]:
        info = manifest.study
        return self.store.upsert_study(
            study_uid=manifest.study_instance_uid, episode_id=manifest.episode_id,
            manifest_path=str(manifest_path.resolve()),
            result_path=str(result_path.resolve()) if result_path else None, state=state,
            modality="/".join(manifest.modalities), accession=info.accession_number, description=info.study_description,
            age_years=age_in_years(info), priority=Priority(priority), draft_findings=findings,
            draft_impression=impression, error=error, now=self.clock(),
            ai_text_only=consistency.text_only if consistency else None,
            ai_box_only=consistency.box_only if consistency else None)

    # ------------------------------------------------------------------ questions to the model

    def ask(self, study_id: int, sop_instance_uid: str, *, frame_number: int | None, kind: AskKind, text: str,
            user: User) -> Answer:
        """Ask the model a [vqa] question or a [refer] phrase about one image; boxes come back in source pixels."""
        if self.model is None:
            raise ModelUnavailableError("no model is connected to the worklist: questions are unavailable")
        study = self.store.get_study(study_id)
        manifest = StudyManifest.read(Path(study.manifest_path))
        _, instance = manifest.find_instance(sop_instance_uid)
        if kind == "vqa":
            instruction = vqa_instruction(text)
        elif kind == "refer":
            instruction = refer_instruction(text)
        else:
            raise ValueError(f"question kind {kind!r} must be 'vqa' or 'refer'")
        dataset = dcmread(self.settings.spool_dir / instance.path)
        prepared = prepare_image(dataset, self.model.image_size, (frame_number or 1) - 1)
        raw = self.model.answer(prepared.pixels, instruction)
        parsed = parse_grounded(raw)
        boxes = [prepared.transform.grid_to_source(b.as_tuple()) for b in parsed.boxes]
        self.store.audit(user.username, f"ask-{kind}", study_id, f"{len(boxes)} box(es) answered", self.clock())
        return Answer(kind=kind, instruction=instruction, raw=raw, text=parsed.text, boxes=boxes,
                      dropped=[f"{d.fragment}: {d.reason}" for d in parsed.dropped])

    # ------------------------------------------------------------------ signatures out

    def on_sign(self, callback: SignCallback) -> None:
        """Call *callback* with every ``SignedReport`` after it is stored (the pipeline enqueues delivery)."""
        self._callbacks.append(callback)

    def sign(self, study_id: int, user: User) -> tuple[SignedReport, list[str]]:
        """Sign; returns the report and the errors of callbacks that failed (the signature itself stands)."""
        now = self.clock()
        report = sign_study(self.store, self.settings, study_id, user, now)
        self.store.audit(user.username, "sign", study_id, f"version {report.version} ({report.result_status.value})",
                         now)
        errors = []
        for callback in self._callbacks:
            try:
                callback(report)
            except Exception as exc:  # a delivery hand-off failure must not undo a stored signature
                logger.exception("sign callback failed for worklist entry %d", study_id)
                errors.append(f"{type(exc).__name__}: {exc}")
                self.store.audit(user.username, "delivery-handoff-failed", study_id, str(exc)[:500], self.clock())
        return report, errors
