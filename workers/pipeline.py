"""The stages of the pipeline as plain functions (the Celery tasks in workers/tasks.py are thin wrappers).

    prepare (io)  manifest → images chosen by model/slices.py → model inputs (model/imaging.py) → InferenceRequest
    infer (gpu)   InferenceRequest → InferenceResponse (workers/inference.py; no spool, no index)
    report (io)   InferenceResponse → AnalysisResult → SR, narrative SR, GSPS, overlay, ORU in the outbox, and
                  the draft announced to the radiologists' worklist (workers/announce.py: a task it consumes)
    deliver (io)  one task per configured destination (workers/delivery.py)

Every stage is idempotent. The report stage keeps the first AnalysisResult it wrote for an episode
(``<home>/work/<study>/<episode>/analysis.json``) and builds the ORU with a control id derived from the
episode, so a re-run rewrites byte-identical outputs with the same UIDs. The request and the result are those of
the one analysis path, :mod:`model.analyze` (``raddraft analyze`` goes through it too): the prepare stage only
decodes the slices the slice policy picks (an image, or a frame of a multi-frame image: model/slices.py) and hands
them to :func:`model.analyze.build_request`; the report stage assembles the result with
:func:`model.analyze.assemble`. A finding on a frame carries its frame number through the result to the SR SCOORD
and the GSPS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.jsonio import write_atomic
from core.layout import analysis_path, manifest_path, request_path
from core.manifest import StudyManifest
from core.result import AnalysisResult
from core.settings import Settings
from core.states import DRAFT_OUTPUT, DeliveryState, EpisodeState
from model import analyze
from model.config import PRESETS, MiniGPTConfig
from model.embedded import EMBEDDED_DIR, MINIGPT_MED_FILES
from model.imaging import (
    ImageDecodeError,
    NotAnImageError,
    PreparedImage,
)
from model.payload import ArrayDType, InferenceRequest, InferenceResponse
from model.slices import SlicePolicy, SliceRef, plan_study
from model.weights import CONFIG_FILE
from reporting.hl7_oru import (
    MAX_CONTROL_ID_LENGTH,
    HL7BuildError,
    HL7NotApplicable,
    ResultStatus,
    oru_r01_from_settings,
)
from reporting.lineage import supersede
from reporting.outbox import OutboxEntry, OutputProblem, pixel_sources, read_sources, write_outputs
from state.store import Delivery, DeliveryKey, StateStore
from workers import announce
from workers.decode_child import isolated_decoder, prepare_slices
from workers.delivery import DICOM, DICOMWEB, HL7
from workers.gate import GateRules, gate

log = logging.getLogger(__name__)
Decoder = Callable[[Path, Sequence[SliceRef], int], list[PreparedImage]]

DICOM_KINDS = ("sr", "narrative", "gsps")  # the outbox outputs a DICOM delivery sends
MINIGPT_MED_IMAGE_SIZE = PRESETS["minigpt-med"].vision.image_size


class StageError(ValueError):
    """A stage cannot run on this input (no readable image, mismatched response…); retrying cannot help."""


class NotAnalysedError(StageError):
    """The analysis gate let no instance of the episode through: an end state, not a failure."""


def model_input_size(spec: str) -> int:
    """The square input size of the model ``settings.model`` names, without loading its weights."""
    if spec in PRESETS:
        return PRESETS[spec].vision.image_size
    folder = EMBEDDED_DIR if spec == "embedded" else Path(spec).expanduser()
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
            return MiniGPTConfig.from_dict(meta["config"]).vision.image_size
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{config_path}: cannot read the model's vision.image_size: {exc}") from exc
    if folder.is_dir() and all((folder / name).exists() for name in MINIGPT_MED_FILES):
        return MINIGPT_MED_IMAGE_SIZE
    raise ValueError(f"model {spec!r}: no preset of that name and no model folder at {folder} "
                     "(io workers need the model's config.json, or the preset name 'minigpt-med')")


# --- prepare ------------------------------------------------------------------------------------------------
def build_request(spool_dir: Path, manifest: StudyManifest, model_size: int, policy: SlicePolicy | None = None,
                  *, dtype: ArrayDType = "float16", max_new_tokens: int | None = None,
                  decode: Decoder = prepare_slices) -> InferenceRequest:
    """The inference request of a prepared episode (:func:`model.analyze.build_request`) of the slices the slice
    policy picks (images, or frames of a multi-frame image: only those frames are read from its file). Pixels travel
    as *dtype*; *max_new_tokens* replaces the per-task budgets when given. *decode* reads the picked slices of one
    instance (in this process, or an :class:`~workers.decode_child.IsolatedDecoder`); an instance that cannot be
    decoded is left out, and a :class:`StageError` says when none could be."""
    policy = policy or SlicePolicy()
    chosen, _ = plan_study(manifest, policy)
    per_instance: dict[tuple[str, str], list[SliceRef]] = {}  # (series, SOP Instance UID) -> its picked slices
    for series, picked in chosen:
        per_instance.setdefault((series.series_instance_uid, picked.sop_instance_uid), []).append(picked)
    by_series: dict[str, list[tuple[SliceRef, PreparedImage]]] = {}
    modality = {series.series_instance_uid: series.modality for series, _ in chosen}
    reasons: list[str] = []
    for (series_uid, sop_uid), picks in per_instance.items():
        what = f"instance {sop_uid}" + (f" ({len(picks)} frame(s))" if picks[0].frame_number is not None else "")
        try:
            prepared = decode(spool_dir / picks[0].instance.path, picks, model_size)
        except (ImageDecodeError, NotAnImageError) as exc:
            log.warning("%s is not analysed: %s", what, exc)
            reasons.append(str(exc))
            continue
        except Exception as exc:  # a file pydicom cannot parse at all (truncated, a malformed element)
            log.warning("%s cannot be read: %s: %s", what, type(exc).__name__, exc)
            reasons.append(f"{type(exc).__name__}: {exc}")
            continue
        by_series.setdefault(series_uid, []).extend(zip(picks, prepared, strict=True))
    if not by_series:
        first = f": {reasons[0]}" if reasons else ""
        raise StageError(f"no image of the {len(chosen)} chosen by the slice policy could be decoded{first}")
    series = [analyze.SeriesSlices(series_uid, modality[series_uid], [
        analyze.AnalysedSlice(picked.sop_instance_uid, prepared, picked.frame_index, picked.instance.number_of_frames)
        for picked, prepared in members]) for series_uid, members in by_series.items()]
    return analyze.build_request(f"{manifest.study_instance_uid}-{manifest.episode_id}", manifest.study_instance_uid,
                                 manifest.episode_id, series, model_size, dtype=dtype, max_new_tokens=max_new_tokens)


def prepare_request(settings: Settings, study_uid: str, episode_id: int) -> InferenceRequest:
    """Read the episode's manifest (written by workers/prepare.py), pass it through the analysis gate
    (workers/gate.py; :class:`NotAnalysedError` when nothing passes), build its inference request and keep a copy
    beside the manifest for the report stage."""
    manifest = StudyManifest.read(manifest_path(settings.home, study_uid, episode_id))
    decision = gate(manifest, GateRules.from_settings(settings))
    if decision.refused:
        kept_out = decision.reason().removeprefix("not analysed: ")
        log.info("study %s episode %d: kept out of the analysis: %s", study_uid, episode_id, kept_out)
    if not decision.analysable:
        raise NotAnalysedError(decision.reason())
    store = StateStore(settings.index_path)
    try:
        interrupted = decode_interruptions(store, study_uid, episode_id)
        if interrupted >= settings.max_decode_interruptions:
            raise StageError(f"decoding the images was interrupted {interrupted} time(s) without finishing: the "
                             "worker died while decoding them (out of memory?); not tried again")
        store.record_task_run(DECODE_RUN, study_uid, episode_id, "started", time.time())
        decode = isolated_decoder(settings.decode_memory_mb) if settings.decode_in_child else prepare_slices
        request = build_request(settings.spool_dir, decision.manifest, model_input_size(settings.model),
                                decode=decode)
        write_atomic(request_path(settings.home, study_uid, episode_id), request.to_json())
        store.record_task_run(DECODE_RUN, study_uid, episode_id, "built", time.time())
    finally:
        store.close()
    return request


DECODE_RUN = "decode"  # task_runs of building the inference request: "started", then "built" unless the worker died


def decode_interruptions(store: StateStore, study_uid: str, episode_id: int) -> int:
    """How often building the episode's request started and never finished: each one a worker that died while
    decoding (a restart or the broker re-delivers the task; without a count it would die again for ever)."""
    runs = store.task_runs(study_uid, episode_id)
    return runs.count((DECODE_RUN, "started")) - runs.count((DECODE_RUN, "built"))


# --- report -------------------------------------------------------------------------------------------------
def control_id(study_uid: str, episode_id: int, status: ResultStatus) -> str:
    """MSH-10 of the episode's ORU: the same for every (re)build of the same message."""
    digest = hashlib.sha256(f"{study_uid}\x1f{episode_id}\x1f{status.value}".encode()).hexdigest()
    return digest[:MAX_CONTROL_ID_LENGTH]


@dataclass(frozen=True)
class ReportOutcome:
    result: AnalysisResult
    entries: list[OutboxEntry]
    problems: list[OutputProblem]  # outputs not built (failed or skipped), with their reasons
    deliveries: list[DeliveryKey]  # pending deliveries to publish
    reused: bool  # the analysis of an earlier run of this stage was kept


def report_episode(settings: Settings, response: InferenceResponse, *, publish: announce.Publisher,
                   clock: Callable[[], float] = time.time) -> ReportOutcome | None:
    """Write the outbox of an analysed episode and its delivery rows, and announce the draft to the worklist with
    *publish* (before the episode is ``reported``: a refused send raises, and the retried stage sends again); None
    when the episode is already past this stage (a duplicate)."""
    study_uid, episode_id = response.study_instance_uid, response.episode_id
    store = StateStore(settings.index_path)
    try:
        episode = store.episode(study_uid, episode_id)
        if episode is None:
            raise StageError(f"episode {episode_id} of study {study_uid} is not in the index")
        if episode.state in (EpisodeState.REPORTED, EpisodeState.DELIVERED):
            store.record_task_run("report", study_uid, episode_id, "duplicate", clock())
            log.info("study %s episode %d is already reported; duplicate ignored", study_uid, episode_id)
            return None
        manifest = StudyManifest.read(manifest_path(settings.home, study_uid, episode_id))
        saved = analysis_path(settings.home, study_uid, episode_id)
        reused = saved.is_file()
        if reused:
            result = AnalysisResult.read(saved)
            sources = read_sources(settings.spool_dir, manifest, pixel_sources(result))
        else:
            request = InferenceRequest.from_json(request_path(settings.home, study_uid, episode_id).read_bytes())
            # pixels only of the analysed images (the findings are on them): the rest of the study is evidence
            analysed = {image.sop_instance_uid for image in request.images if image.sop_instance_uid is not None}
            sources = read_sources(settings.spool_dir, manifest, analysed)
            # a re-sent study's new report supersedes the last one: predecessor documents, carried tracking UIDs
            result = supersede(settings.outbox_dir, analyze.assemble(request, response, sources=sources))
            result.write(saved)
        try:
            message: bytes | OutputProblem = oru_r01_from_settings(
                manifest, result, ResultStatus.PRELIMINARY, settings=settings,
                control_id=control_id(study_uid, episode_id, ResultStatus.PRELIMINARY),
                message_time=result.created_at)
        except HL7BuildError as exc:
            message = OutputProblem(HL7, "skipped" if isinstance(exc, HL7NotApplicable) else "failed",
                                    manifest.study.redact(str(exc)))
        entries, problems = write_outputs(settings.outbox_dir, manifest, result, sources, message)
        # on the radiologists' worklist (a repeated registration finds the same entry)
        announce.draft_ready(store, study_uid, episode_id, publish, now=clock())
        built = {entry.kind for entry in entries}
        targets = [(DICOM, str(d)) for d in settings.dicom_destinations]
        targets += [(DICOMWEB, url) for url in settings.dicomweb_destinations]
        targets += [(HL7, str(d)) for d in settings.hl7_destinations]
        rows = store.add_deliveries(study_uid, episode_id, targets, clock())
        store.advance(study_uid, episode_id, tuple(s for s in EpisodeState if s not in (
            EpisodeState.REPORTED, EpisodeState.DELIVERED)), EpisodeState.REPORTED, clock(),
            task_run=("report", "reported"))
        rows = _skip_unbuilt(store, rows, built, problems, clock)
        if not rows:
            log.info("study %s episode %d reported: no destination configured; outputs stay in the outbox",
                     study_uid, episode_id)
        pending = [DeliveryKey(r.study_instance_uid, r.episode_id, r.kind, r.destination) for r in rows
                   if r.state is DeliveryState.PENDING]
    finally:
        store.close()
    log.info("study %s episode %d reported: %d finding(s), %d output file(s), %d delivery(ies) to run", study_uid,
             episode_id, len(result.findings), len(entries), len(pending))
    return ReportOutcome(result, entries, problems, pending, reused)


def _skip_unbuilt(store: StateStore, rows: list[Delivery], built: set[str], problems: Sequence[OutputProblem],
                  clock: Callable[[], float]) -> list[Delivery]:
    """Mark ``skipped`` each pending delivery that has nothing to send (no DICOM output, or no ORU), with the
    reason; the episode is delivered once every other delivery is done. Returns the rows as they are now."""
    reasons = {kind: "; ".join(f"{p.kind} {p.state}: {p.reason}" for p in problems if p.kind in kinds)
               for kind, kinds in ((DICOM, DICOM_KINDS), (DICOMWEB, DICOM_KINDS), (HL7, (HL7,)))}
    has = {DICOM: bool(built & set(DICOM_KINDS)), DICOMWEB: bool(built & set(DICOM_KINDS)), HL7: HL7 in built}
    for row in rows:
        if row.state is DeliveryState.PENDING and not has.get(row.kind, True):
            key = DeliveryKey(row.study_instance_uid, row.episode_id, row.kind, row.destination)
            store.finish_delivery(key, DeliveryState.SKIPPED, clock(), reasons[row.kind] or "nothing was built",
                                  attempted=False)
            log.info("%s skipped: no %s output was built", key, row.kind)
    return store.deliveries(rows[0].study_instance_uid, rows[0].episode_id, DRAFT_OUTPUT) if rows else rows


@dataclass(frozen=True)
class StrandedWork:
    """A stage to publish again after a restart: ``stage`` is ``prepare``, ``deliver-<kind>`` (of ``output_set``:
    the draft, or a signed version), or an announcement to the worklist no worklist task consumed
    (``worklist-draft``, ``worklist-failure`` with its ``reason``)."""

    stage: str
    study_uid: str
    episode_id: int
    destination: str | None = None
    reason: str | None = None
    output_set: str = DRAFT_OUTPUT

    @property
    def delivery(self) -> DeliveryKey | None:
        """The delivery a ``deliver-<kind>`` stage publishes."""
        if not self.stage.startswith("deliver-") or self.destination is None:
            return None
        return DeliveryKey(self.study_uid, self.episode_id, self.stage.removeprefix("deliver-"), self.destination,
                           self.output_set)


def stranded_work(store: StateStore) -> list[StrandedWork]:
    """Work a previous run left between stages: prepared episodes (their infer or report message was lost; the
    prepare stage re-publishes infer), pending draft deliveries of reported episodes and pending deliveries of
    signed versions, and announcements to the worklist still pending (workers/announce.py). Use it only where a
    lost message is possible and no other worker still holds it (the embedded broker with in-process workers); a
    duplicate announcement is harmless."""
    work: list[StrandedWork] = []
    for episode in store.episodes():
        if episode.state is EpisodeState.PREPARED:
            work.append(StrandedWork("prepare", episode.study_instance_uid, episode.episode_id))
        elif episode.state is EpisodeState.REPORTED:
            for row in store.deliveries(episode.study_instance_uid, episode.episode_id, DRAFT_OUTPUT):
                if row.state is DeliveryState.PENDING:
                    work.append(StrandedWork(f"deliver-{row.kind}", row.study_instance_uid, row.episode_id,
                                             row.destination))
    for row in store.deliveries(state=DeliveryState.PENDING):
        if row.output_set != DRAFT_OUTPUT:
            work.append(StrandedWork(f"deliver-{row.kind}", row.study_instance_uid, row.episode_id, row.destination,
                                     output_set=row.output_set))
    for notice in announce.unconsumed(store):
        if notice.run == announce.DRAFT_RUN:
            work.append(StrandedWork(notice.run, notice.study_uid, notice.episode_id))
            continue
        reason = announce.failure_reason(store, notice.study_uid, notice.episode_id)
        if reason is not None:  # still failed: a re-played stage that reported it announces its draft instead
            work.append(StrandedWork(notice.run, notice.study_uid, notice.episode_id, reason=reason))
    return work
