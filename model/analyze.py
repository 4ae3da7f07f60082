"""The analysis of a study, one path for every caller: build the requests → run them as one batch → assemble.

``raddraft analyze`` (in its own process or on a gateway's model socket), the pipeline (workers/pipeline.py, its
gpu queue in between) and the evaluation (model/evaluation.py) all go through these three steps:

1. :func:`build_request` — the model inputs of a study as one :class:`~model.payload.InferenceRequest`, from the
   prepared slices of each series (:class:`SeriesSlices`; the pipeline decodes the slices the slice policy picks
   (:mod:`model.slices`), ``raddraft analyze`` and the evaluation prepare the images they are given:
   :func:`series_of`). Task ``report`` is the report instruction on the first series' study view
   (:func:`model.imaging.study_view`: the image, a CT projection or a montage); each slice gets one task
   ``grounding:<slice key>``, the ``[grounding]`` instruction on that slice.
2. a runner answers it: :func:`run_batch` here, on the model in this process (ONE greedy ``generate`` call over
   every task row of every request it is given); in the pipeline the gpu worker runs the same function with its
   continuous decoder as the row generator (workers/batching.py: each study's rows join the running batch at the
   token level); a gateway's model socket answers ``raddraft analyze`` with it too.
3. :func:`assemble` — the :class:`~core.result.AnalysisResult` of the answers. The texts are cleaned of control
   characters (they go into DICOM and HL7 text); each grounded answer is parsed with the never-raising parser
   and each ``<p>label</p> {box}`` becomes a :class:`~core.result.Finding` with its box mapped from the 0–100 grid
   back to source pixels through the slice's letterbox transform (:func:`findings_from_answer`; boxes wholly in
   the letterbox padding are dropped). The boxes of focal lesions (CT and radiograph nodules and masses) are
   snapped to the lesion in the source pixels by :func:`model.refine.refine_findings` (a grid unit is 2.6–8 px,
   too coarse for a small nodule) when the study's instances are given; findings of neighbouring slices of a
   series are merged by :func:`model.slices.merge_findings`. The report text is cleaned of model markup
   (:func:`model.prompts.strip_markup`) and split at ``FINDINGS:`` / ``IMPRESSION:`` (:func:`split_report`).
   The draft is then grounded (:mod:`model.grounding`): its sentences are linked with the boxes that support
   them, and :func:`run_batch` has already asked ``[detection] <label>`` on every slice for each label the report
   states without a box (grounding after generation; those boxes join with ``source="detection"``).

:func:`analyze_series` is the three steps on the model in this process; :func:`run_task` is one single task on one
image (``raddraft analyze --task``), through the same request and runner. Everything returned is preliminary until
a radiologist signs it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from pydicom.dataset import Dataset

from core.result import AnalysisResult, DraftReport, Finding
from model import prompts
from model.embedded import LoadedModel
from model.grounding import follow_up_labels, link
from model.imaging import Letterbox, PreparedImage, prepare_image, study_view
from model.payload import ArrayDType, InferenceRequest, InferenceResponse, ModelImage, ModelTask, TaskOutput
from model.prompts import GridBox
from model.refine import RefinePolicy, refine_findings
from model.slices import SlicePolicy, SlicePosition, merge_findings, slice_key

logger = logging.getLogger(__name__)

REPORT_TOKENS = 200  # new tokens of the report task (the report is the longest answer)
TASK_TOKENS = 100  # new tokens of a grounding task and of a single box/VQA task
REPORT_TASK_ID = "report"
GROUNDING_PREFIX = "grounding:"  # + the slice key: the task id of a slice's grounding task
DETECTION_PREFIX = "detection:"  # + "<label>@<slice key>": a follow-up on a sentence without a box
NO_REPORT_TEXT = "The AI model produced no report text for this study; it needs a report by a radiologist."
IN_PROCESS_DTYPE: ArrayDType = "float32"  # pixels that never leave the process are not rounded to float16
_SECTION = re.compile(r"(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE)
# Model text is free text: control characters (other than the whitespace split_report already folds) cannot go
# into DICOM or HL7 text, so they are replaced by a space before the result is built.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# A runner's way of decoding rows: (images (R, 3, S, S), instructions, max_new_tokens per row) → the new ids of each
# row (EOS excluded). The default is ONE ``generate_ids`` call to the longest budget; the gpu worker passes its
# continuous decoder (workers/batching.py), where each row decodes to its own budget among other studies' rows.
RowGenerator = Callable[[torch.Tensor, list[str], list[int]], list[list[int]]]


class AnalysisError(ValueError):
    """A response that does not answer its request, or a request that is not an analysis; retrying cannot help."""


# --- 1. build the requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnalysedSlice:
    """One slice the model reads: an image, or one frame of a multi-frame image, prepared for the model."""

    sop_instance_uid: str
    image: PreparedImage
    frame: int = 0  # 0-based frame index, as model.imaging.prepare_image takes it
    number_of_frames: int = 1  # frames of the source image: a finding on an image of several names its frame

    @property
    def frame_number(self) -> int | None:
        """The 1-based frame of a multi-frame source image; None for a single-frame image."""
        return self.frame + 1 if self.number_of_frames > 1 else None

    @property
    def key(self) -> str:
        return slice_key(self.sop_instance_uid, self.frame_number)


@dataclass(frozen=True)
class SeriesSlices:
    """The analysed slices of one series, in slice order."""

    series_instance_uid: str
    modality: str
    slices: Sequence[AnalysedSlice]


def series_of(datasets: Sequence[Dataset], model_size: int) -> SeriesSlices:
    """The images of one series as given (spatial order; a radiograph: one image), each read at its first frame."""
    if not datasets:
        raise ValueError("an analysis needs at least one image")
    slices = [AnalysedSlice(str(ds.SOPInstanceUID), prepare_image(ds, model_size),
                            number_of_frames=_frames_of(ds)) for ds in datasets]
    first = datasets[0]
    return SeriesSlices(str(first.get("SeriesInstanceUID", "")), str(first.get("Modality", "")), slices)


def _frames_of(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def build_request(request_id: str, study_instance_uid: str, episode_id: int, series: Sequence[SeriesSlices],
                  model_size: int, *, dtype: ArrayDType = "float16", max_new_tokens: int | None = None
                  ) -> InferenceRequest:
    """The request of one study (see the module docstring). Images are keyed ``<series UID>/<slice key>``, a study
    view ``overview/<series UID>``. Pixels travel as *dtype*; *max_new_tokens* replaces the per-task budgets
    (:data:`REPORT_TOKENS`, :data:`TASK_TOKENS`) when given."""
    if not series or not all(one.slices for one in series):
        raise ValueError("an analysis needs at least one slice in every series")
    images: list[ModelImage] = []
    tasks: list[ModelTask] = []
    for number, one in enumerate(series):
        uid, slices = one.series_instance_uid, one.slices
        if number == 0:
            if len(slices) == 1:
                report_image = f"{uid}/{slices[0].key}"
            else:
                report_image = f"overview/{uid}"
                view = study_view([s.image for s in slices], one.modality, model_size)
                images.append(ModelImage.build(report_image, view, dtype=dtype))
            tasks.append(ModelTask(task_id=REPORT_TASK_ID, image=report_image, task="report",
                                   instruction=prompts.report_instruction(),
                                   max_new_tokens=max_new_tokens or REPORT_TOKENS))
        for picked in slices:
            key = f"{uid}/{picked.key}"
            images.append(ModelImage.build(key, picked.image.pixels, sop_instance_uid=picked.sop_instance_uid,
                                           frame=picked.frame, number_of_frames=picked.number_of_frames,
                                           transform=picked.image.transform, dtype=dtype))
            tasks.append(ModelTask(task_id=GROUNDING_PREFIX + picked.key, image=key, task="grounding",
                                   instruction=prompts.grounding_instruction(),
                                   max_new_tokens=max_new_tokens or TASK_TOKENS))
    return InferenceRequest(request_id=request_id, study_instance_uid=study_instance_uid, episode_id=episode_id,
                            model_size=model_size, images=images, tasks=tasks)


# --- 2. run a batch -----------------------------------------------------------------------------------------
def run_batch(loaded: LoadedModel, requests: Sequence[InferenceRequest], *, follow_up: bool = True,
              generate: RowGenerator | None = None) -> list[InferenceResponse]:
    """Answer every task of every request with one greedy generate call; responses in request order. *generate*
    decodes the rows (:data:`RowGenerator`; default: one ``generate_ids`` call of the model in this process).

    Greedy decoding of a row does not depend on the other rows (left padding + attention mask), so each row is cut
    to its own ``max_new_tokens`` and a batch gives the texts each request would get alone.

    With *follow_up* (grounding after generation, model/grounding.py), a second generate call asks
    ``[detection] <label>`` on every grounding slice of a request for each label its report states without a
    box in its grounding answers (:func:`follow_up_tasks`); those answers come back as outputs
    ``detection:<label>@<slice key>`` of the same response. No label without a box: no second call."""
    if not requests:
        return []
    size = loaded.model.config.vision.image_size
    ids = [r.request_id for r in requests]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"request ids in one batch must be unique, repeated: {repeated}")
    for request in requests:
        if request.model_size != size:
            raise ValueError(f"request {request.request_id}: model_size {request.model_size} does not match the "
                             f"model's vision.image_size {size}")
    rows = [(request, task) for request in requests for task in request.tasks]
    texts, batch_rows, seconds = _generate(loaded, rows, generate)
    outputs: dict[str, list[TaskOutput]] = {request.request_id: [] for request in requests}
    for (request, task), text in zip(rows, texts, strict=True):
        outputs[request.request_id].append(TaskOutput(task_id=task.task_id, text=text))
    if follow_up:
        second = [(request, task) for request in requests
                  for task in follow_up_tasks(request, {o.task_id: o.text for o in outputs[request.request_id]})]
        if second:
            more, rows_two, seconds_two = _generate(loaded, second, generate)
            batch_rows, seconds = batch_rows + rows_two, seconds + seconds_two
            for (request, task), text in zip(second, more, strict=True):
                outputs[request.request_id].append(TaskOutput(task_id=task.task_id, text=text))
    return [InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                              episode_id=request.episode_id, model=loaded.identity,
                              outputs=outputs[request.request_id], batch_rows=batch_rows, seconds=seconds)
            for request in requests]


def _generate(loaded: LoadedModel, rows: Sequence[tuple[InferenceRequest, ModelTask]],
              generate: RowGenerator | None = None) -> tuple[list[str], int, float]:
    """The texts of one greedy generate call over *rows* (with *generate* when given), its row count and its wall
    time."""
    model = loaded.model
    decoded: dict[tuple[str, str], np.ndarray] = {}
    images: list[np.ndarray] = []
    for request, task in rows:
        key = (request.request_id, task.image)
        if key not in decoded:
            decoded[key] = request.image(task.image).array()
        images.append(decoded[key])
    limits = [task.max_new_tokens for _, task in rows]
    started = time.perf_counter()
    with torch.inference_mode():
        batch = torch.from_numpy(np.stack(images))  # (R, 3, S, S)
        instructions = [task.instruction for _, task in rows]
        if generate is None:
            generated = model.generate_ids(batch, instructions, max_new_tokens=max(limits))
        else:
            generated = generate(batch, instructions, limits)
    seconds = time.perf_counter() - started
    texts = [model.tokenizer.decode(row[:limit], skip_special_tokens=True).strip()
             for row, limit in zip(generated, limits, strict=True)]
    logger.info("generated %d row(s) for %d request(s) in %.2f s", len(generated),
                len({request.request_id for request, _ in rows}), seconds)
    return texts, len(generated), seconds


def follow_up_tasks(request: InferenceRequest, texts: dict[str, str]) -> list[ModelTask]:
    """The ``[detection] <label>`` tasks for the labels the report in *texts* states with no box in the grounding
    answers (on a compatible side), one per label and grounding slice (model/grounding.py)."""
    report = split_report(clean_text(texts.get(REPORT_TASK_ID, "")))
    grounding = [task for task in request.tasks if task.task == "grounding"]
    boxes: list[Finding] = []
    for task in grounding:
        image = request.image(task.image)
        if image.sop_instance_uid is None or image.transform is None or task.task_id not in texts:
            continue
        boxes.extend(findings_from_answer(clean_text(texts[task.task_id]), image.transform.to_letterbox(),
                                          image.sop_instance_uid))
    linked, _, _ = link(report, boxes)
    labels = follow_up_labels(linked)
    if labels:
        logger.debug("request %s: %d stated label(s) without a box; asking [detection] on %d slice(s)",
                     request.request_id, len(labels), len(grounding))
    return [ModelTask(task_id=f"{DETECTION_PREFIX}{label}@{task.task_id.removeprefix(GROUNDING_PREFIX)}",
                      image=task.image, task="detection", instruction=prompts.detection_instruction(label),
                      max_new_tokens=TASK_TOKENS)
            for label in labels for task in grounding]


# --- 3. assemble the result ---------------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """Model text without control characters (each becomes a space)."""
    return _CONTROL.sub(" ", text)


def split_report(text: str) -> DraftReport:
    """``FINDINGS: … IMPRESSION: …`` → :class:`DraftReport`; text without headers is all findings.

    The text is cleaned first (:func:`model.prompts.strip_markup`), so every consumer of the draft (the narrative
    SR, the ORU, the worklist) gets prose without box markup. Boxes the model wrote into its report are dropped,
    not made into findings: the report request is answered on the study view (:func:`model.imaging.study_view`),
    which may be a CT projection or a montage of several images rather than one analysed instance, so its grid
    cannot be mapped back to a source image. The localized findings come from the ``[grounding]`` answers on each
    analysed image (:func:`findings_from_answer`); the raw report text is kept in the result's ``raw_outputs``.

    Model text with nothing in either section (an empty answer, headers alone, or markup alone) becomes
    :data:`NO_REPORT_TEXT` as the impression, so the draft says plainly that the study still needs its report.
    """
    cleaned = prompts.strip_markup(text)
    if cleaned != " ".join(text.split()):
        logger.debug("removed model markup from the report text (%d -> %d characters)", len(text), len(cleaned))
    text = cleaned
    parts: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        parts.setdefault(match.group(1).upper(), " ".join(text[match.end():end].split()))
    if matches:
        report = DraftReport(findings=parts.get("FINDINGS", ""), impression=parts.get("IMPRESSION", ""))
    else:
        report = DraftReport(findings=" ".join(text.split()), impression="")
    if not (report.findings or report.impression):
        logger.warning("the model produced no report text; the draft says so")
        return DraftReport(findings="", impression=NO_REPORT_TEXT)
    return report


def laterality_of(label: str, box: GridBox) -> str | None:
    """The patient's side of a lateral finding from its box: image left (low x) is the patient's right."""
    if label not in prompts.LATERAL_LABELS:
        return None
    centre = (box.x1 + box.x2) / 2
    return "right" if centre < prompts.BOX_GRID / 2 else "left"


def findings_from_answer(text: str, transform: Letterbox, sop_instance_uid: str, default_label: str | None = None
                         ) -> list[Finding]:
    """Findings of one grounded answer, boxes in source pixels; unreadable or off-image boxes are dropped."""
    parsed = prompts.parse_grounded(text)
    for dropped in parsed.dropped:
        logger.debug("dropped %r from the model answer: %s", dropped.fragment, dropped.reason)
    findings = []
    for phrase in parsed.phrases:
        label = phrase.phrase or default_label
        if not label:
            continue
        words = label.split()
        side = words[0] if words[0] in ("left", "right") and len(words) > 1 else None
        label = " ".join(words[1:]) if side else label
        for box in phrase.boxes:
            source = transform.grid_to_source(box.as_tuple())
            if source[2] - source[0] < 1.0 or source[3] - source[1] < 1.0:
                logger.debug("dropped box %s of %r: it lies outside the image", box.as_tuple(), label)
                continue
            findings.append(Finding(label=label, sop_instance_uid=sop_instance_uid, box=source,
                                    laterality=side or laterality_of(label, box)))
    return findings


def assemble(request: InferenceRequest, response: InferenceResponse, policy: SlicePolicy | None = None, *,
             sources: Sequence[Dataset] = (), refine: RefinePolicy | None = None, follow_ups: bool = True
             ) -> AnalysisResult:
    """The analysis result of *response* to *request* (module docstring, step 3). Focal-lesion boxes are refined on
    the *sources* (the study's instances; a series whose instances are not all among them keeps the model's boxes);
    ``refine=RefinePolicy(enabled=False)`` keeps the model's boxes everywhere. The boxes of the follow-up
    ``detection:`` answers (:func:`run_batch`) join the findings with ``source="detection"`` unless
    *follow_ups* is False (the evaluation's "before grounding"); the report's sentences are then linked with the
    findings (:func:`model.grounding.link`)."""
    policy = policy or SlicePolicy()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if (response.request_id, response.study_instance_uid, response.episode_id) != (
            request.request_id, request.study_instance_uid, request.episode_id):
        raise AnalysisError(f"response {response.request_id} (study {response.study_instance_uid} episode "
                            f"{response.episode_id}) does not answer request {request.request_id}")
    texts = {task_id: clean_text(text) for task_id, text in response.texts().items()}
    missing = [task.task_id for task in request.tasks if task.task_id not in texts]
    if missing:
        raise AnalysisError(f"response {response.request_id} has no output for task(s) {', '.join(missing)}")
    report_text = texts.get(REPORT_TASK_ID, "")
    per_series: dict[str, list[Finding]] = {}
    members: dict[str, list[tuple[str, int | None]]] = {}  # series -> its analysed slices in slice order
    positions: dict[str, SlicePosition] = {}
    analysed: dict[str, list[int]] = {}  # SOP Instance UID -> the frames read of a multi-frame image
    grounding_slices: dict[str, tuple[ModelImage, str, int | None]] = {}  # slice key -> image, series, frame
    for task in request.tasks:
        if task.task != "grounding":
            continue
        image = request.image(task.image)
        if image.sop_instance_uid is None or image.transform is None:
            raise AnalysisError(f"grounding task {task.task_id} must refer to an instance image, not {image.key}")
        uid, frame_number = image.sop_instance_uid, _frame_number(image, by_uid)
        frames = analysed.setdefault(uid, [])
        if frame_number is not None and frame_number not in frames:
            frames.append(frame_number)
        series_key = image.key.split("/", 1)[0]  # instance images are keyed "<series UID>/<slice key>"
        found = findings_from_answer(texts[task.task_id], image.transform.to_letterbox(), uid)
        if frame_number is not None:
            found = [finding.model_copy(update={"frame_number": frame_number}) for finding in found]
        per_series.setdefault(series_key, []).extend(found)
        slices = members.setdefault(series_key, [])
        positions[slice_key(uid, frame_number)] = SlicePosition(series_key, len(slices))
        slices.append((uid, frame_number))
        grounding_slices[task.task_id.removeprefix(GROUNDING_PREFIX)] = (image, series_key, frame_number)
    for task_id, text in texts.items():
        if not (follow_ups and task_id.startswith(DETECTION_PREFIX)):
            continue
        label, _, key = task_id.removeprefix(DETECTION_PREFIX).rpartition("@")
        if key not in grounding_slices or not label or grounding_slices[key][0].transform is None:
            raise AnalysisError(f"response {response.request_id}: follow-up {task_id} names no grounding slice")
        image, series_key, frame_number = grounding_slices[key]
        found = [finding.model_copy(update={"label": label, "source": "detection", "frame_number": frame_number})
                 for finding in findings_from_answer(text, _letterbox(image), str(image.sop_instance_uid), label)]
        per_series[series_key].extend(found)
    findings: list[Finding] = []
    for series_key, found in per_series.items():
        slices = members[series_key]
        if all(uid in by_uid for uid, _ in slices):
            findings.extend(refine_findings(found, [by_uid[uid] for uid, _ in slices], policy=refine,
                                            frames=[number for _, number in slices]))
            continue
        if sources:
            logger.warning("series %s: not every analysed instance is among the sources; its boxes stay "
                           "unrefined", series_key)
        findings.extend(found)
    merged = [m.finding for m in merge_findings(findings, positions, policy)]
    report, linked, consistency = link(split_report(report_text), merged)
    if consistency.flagged:
        logger.info("study %s episode %d: %d stated finding(s) without a box, %d box(es) not in the text",
                    request.study_instance_uid, request.episode_id, consistency.text_only, consistency.box_only)
    return AnalysisResult(
        study_instance_uid=request.study_instance_uid, episode_id=request.episode_id, model=response.model,
        report=report, consistency=consistency,
        findings=linked, analysed_instances=list(analysed),
        analysed_frames={uid: sorted(frames) for uid, frames in analysed.items() if frames},
        raw_outputs=texts, status="preliminary", created_at=datetime.now(UTC),
    )


def _letterbox(image: ModelImage) -> Letterbox:
    """The letterbox transform of an instance image; ``AnalysisError`` for a study view, which has none."""
    if image.transform is None:
        raise AnalysisError(f"image {image.key} has no transform: a follow-up must name an instance slice")
    return image.transform.to_letterbox()


def _frame_number(image: ModelImage, sources: dict[str, Dataset]) -> int | None:
    """The 1-based frame *image* was read from when its source image has several frames (the SR SCOORD and the GSPS
    must name it), else None. A request written before images carried their frame count read frame index
    ``image.frame`` of a multi-frame source as well: the source (when among *sources*) tells."""
    if image.frame_number is not None:
        return image.frame_number
    source = sources.get(image.sop_instance_uid or "")
    if source is None:
        return None
    return image.frame + 1 if _frames_of(source) > 1 else None


# --- the three steps in this process ------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesAnalysis:
    """The analysis of one series (or one radiograph) in this process: the result and what the evaluation needs."""

    result: AnalysisResult
    seconds: float  # build + run + assemble
    model_findings: list[Finding]  # the model's own boxes (merged, not refined)
    without_follow_up: AnalysisResult | None = None  # the same answers without the follow-up boxes (evaluation)

    @property
    def report(self) -> DraftReport:
        return self.result.report

    @property
    def report_text(self) -> str:
        return self.result.raw_outputs.get(REPORT_TASK_ID, "")

    @property
    def findings(self) -> list[Finding]:
        return self.result.findings

    @property
    def analysed_instances(self) -> list[str]:
        return self.result.analysed_instances

    @property
    def raw_outputs(self) -> dict[str, str]:
        """``report`` and ``grounding:<slice key>``: the model's text per task."""
        return self.result.raw_outputs


def local_request(datasets: Sequence[Dataset], model_size: int, *, max_new_tokens: int | None = None
                  ) -> InferenceRequest:
    """The request of the images of one series analysed in this process (:func:`series_of`; pixels in float32)."""
    series = series_of(datasets, model_size)
    study_uid = str(datasets[0].get("StudyInstanceUID", "")) or "unknown"
    return build_request(f"local-{study_uid}", study_uid, 0, [series], model_size, dtype=IN_PROCESS_DTYPE,
                         max_new_tokens=max_new_tokens)


def analyze_series(loaded: LoadedModel, datasets: Sequence[Dataset], policy: SlicePolicy | None = None,
                   *, max_new_tokens: int | None = None, refine: RefinePolicy | None = None) -> SeriesAnalysis:
    """Report + findings of one series given in spatial order (a radiograph: one dataset): build → run → assemble."""
    if not datasets:
        raise ValueError("analyze_series needs at least one image")
    started = time.perf_counter()
    request = local_request(datasets, loaded.model.config.vision.image_size, max_new_tokens=max_new_tokens)
    [response] = run_batch(loaded, [request])
    result = assemble(request, response, policy, sources=datasets, refine=refine)
    unrefined = assemble(request, response, policy, refine=RefinePolicy(enabled=False)).findings
    seconds = time.perf_counter() - started
    logger.debug("analysed %d image(s) in %.2f s: %d finding(s)", len(datasets), seconds, len(result.findings))
    asked = any(task_id.startswith(DETECTION_PREFIX) for task_id in response.texts())
    without = assemble(request, response, policy, sources=datasets, refine=refine, follow_ups=False) if asked \
        else result
    return SeriesAnalysis(result, seconds, unrefined, without)


# --- a single task ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskAnswer:
    task: str
    instruction: str
    text: str
    findings: list[Finding]


def task_instruction(task: str, prompt: str | None, transform: Letterbox) -> str:
    """The instruction of a single task; *prompt* is the label/phrase, the question, or for ``identify`` a
    source-pixel box ``x1,y1,x2,y2``."""
    if task == "report":
        return prompts.report_instruction()
    if task == "grounding":
        return prompts.grounding_instruction()
    if not prompt:
        raise ValueError(f"task {task!r} needs --prompt (a label, phrase, question or box)")
    if task == "detection":
        return prompts.detection_instruction(prompt)
    if task == "refer":
        return prompts.refer_instruction(prompt)
    if task == "vqa":
        return prompts.vqa_instruction(prompt)
    if task == "identify":
        try:
            box = tuple(float(v) for v in prompt.split(","))
        except ValueError:
            raise ValueError(f"identify prompt {prompt!r} must be a source-pixel box x1,y1,x2,y2") from None
        if len(box) != 4:
            raise ValueError(f"identify prompt {prompt!r} must have 4 numbers x1,y1,x2,y2")
        x1, y1, x2, y2 = transform.source_to_grid(box)
        return prompts.identify_instruction(prompts.GridBox(x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
    raise ValueError(f"task {task!r} must be one of {', '.join(prompts.TASKS)}")


def run_task(loaded: LoadedModel, ds: Dataset, task: str, prompt: str | None = None) -> TaskAnswer:
    """One task on one image, e.g. ``[detection] nodule``; box answers come back as source-pixel findings."""
    image = prepare_image(ds, loaded.model.config.vision.image_size)
    instruction = task_instruction(task, prompt, image.transform)
    uid = str(ds.SOPInstanceUID)
    request = InferenceRequest(
        request_id=f"task-{uid}", study_instance_uid=str(ds.get("StudyInstanceUID", "")) or "unknown", episode_id=0,
        model_size=image.transform.model_size,
        images=[ModelImage.build(uid, image.pixels, sop_instance_uid=uid, transform=image.transform,
                                 dtype=IN_PROCESS_DTYPE)],
        tasks=[ModelTask(task_id=task, image=uid, task=task, instruction=instruction,
                         max_new_tokens=REPORT_TOKENS if task == "report" else TASK_TOKENS)])
    [response] = run_batch(loaded, [request])
    text = response.texts()[task]
    default = prompt if task == "detection" else None
    found = [] if task in ("report", "vqa", "identify") else refine_findings(
        findings_from_answer(text, image.transform, uid, default), [ds], [image.display])
    return TaskAnswer(task, instruction, text, found)
