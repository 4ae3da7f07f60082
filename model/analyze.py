"""Analysis of one image or one series in this process: a draft report and localized findings (the gateway's
queued path, workers/pipeline.py, assembles the same result from a batched response).

One :func:`analyze_series` call makes ONE batched ``generate`` call: row 0 is the report request on the study
view (:func:`model.examples.study_view`: the image, a CT projection or a montage), rows 1… are the
``[grounding]`` request on each analysed image. The grounded answers are parsed with the never-raising parser,
each ``<p>label</p> {box}`` becomes a :class:`~core.result.Finding` with its box mapped from the 0–100 grid
back to source pixels through the image's letterbox transform; boxes that fall wholly in the letterbox padding
are dropped. The boxes of focal lesions (CT and radiograph nodules and masses) are then snapped to the lesion in
the source pixels by :func:`model.refine.refine_findings` (a grid unit is 2.6–8 px, too coarse for a small
nodule). Findings of neighbouring slices of a CT/MR series are merged by :func:`model.slices.merge_findings`.
The report text is cleaned of model markup (:func:`model.prompts.strip_markup`) and split at ``FINDINGS:`` /
``IMPRESSION:``. Everything returned is preliminary until a radiologist signs it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from pydicom.dataset import Dataset

from core.result import DraftReport, Finding
from model import prompts
from model.examples import TASKS, laterality_of, study_view
from model.imaging import Letterbox, PreparedImage, prepare_image
from model.minigpt import MiniGPTMed
from model.refine import RefinePolicy, refine_findings
from model.slices import SlicePolicy, SlicePosition, merge_findings

logger = logging.getLogger(__name__)

REPORT_TOKENS = 200  # new tokens of the batched call (the report is the longest answer)
TASK_TOKENS = 100  # new tokens of a single box/VQA task
NO_REPORT_TEXT = "The AI model produced no report text for this study; it needs a report by a radiologist."
_SECTION = re.compile(r"(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE)



@dataclass(frozen=True)
class SeriesAnalysis:
    """What the model said about one series (or one radiograph)."""

    report: DraftReport
    report_text: str
    findings: list[Finding]
    analysed_instances: list[str]
    raw_outputs: dict[str, str] = field(default_factory=dict)  # "report", "grounding:<SOP Instance UID>"
    seconds: float = 0.0
    model_findings: list[Finding] = field(default_factory=list)  # the model's own boxes (merged, not refined)


@dataclass(frozen=True)
class TaskAnswer:
    task: str
    instruction: str
    text: str
    findings: list[Finding]


def split_report(text: str) -> DraftReport:
    """``FINDINGS: … IMPRESSION: …`` → :class:`DraftReport`; text without headers is all findings.

    The text is cleaned first (:func:`model.prompts.strip_markup`), so every consumer of the draft (the narrative
    SR, the ORU, the worklist) gets prose without box markup. Boxes the model wrote into its report are dropped,
    not made into findings: the report request is answered on the study view (:func:`model.examples.study_view`), which
    may be a CT projection or a montage of several images rather than one analysed instance, so its grid cannot
    be mapped back to a source image. The localized findings come from the ``[grounding]`` answers on each
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


def _images(prepared: Sequence[PreparedImage]) -> torch.Tensor:
    return torch.from_numpy(np.stack([p.pixels for p in prepared]))  # (N, 3, S, S)


def analyze_series(model: MiniGPTMed, datasets: Sequence[Dataset], policy: SlicePolicy | None = None,
                   *, max_new_tokens: int = REPORT_TOKENS, refine: RefinePolicy | None = None) -> SeriesAnalysis:
    """Report + findings of one series given in spatial order (a radiograph: one dataset)."""
    if not datasets:
        raise ValueError("analyze_series needs at least one image")
    started = time.perf_counter()
    policy = policy or SlicePolicy()
    size = model.config.vision.image_size
    prepared = [prepare_image(ds, size) for ds in datasets]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    view = study_view(prepared, str(datasets[0].get("Modality", "")), size)
    images = torch.cat([torch.from_numpy(view)[None], _images(prepared)])  # (1 + N, 3, S, S)
    instructions = [prompts.report_instruction()] + [prompts.grounding_instruction()] * len(prepared)
    texts = model.generate(images, instructions, max_new_tokens=max_new_tokens)
    raw = {"report": texts[0]}
    findings: list[Finding] = []
    for uid, image, text in zip(uids, prepared, texts[1:], strict=True):
        raw[f"grounding:{uid}"] = text
        findings.extend(findings_from_answer(text, image.transform, uid))
    unrefined = findings
    findings = refine_findings(findings, datasets, [p.display for p in prepared], refine)
    if len(datasets) > 1:
        series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
        positions = {uid: SlicePosition(series_uid, rank) for rank, uid in enumerate(uids)}
        findings = [m.finding for m in merge_findings(findings, positions, policy)]
        unrefined = [m.finding for m in merge_findings(unrefined, positions, policy)]
    seconds = time.perf_counter() - started
    logger.debug("analysed %d image(s) in %.2f s: %d finding(s)", len(datasets), seconds, len(findings))
    return SeriesAnalysis(split_report(texts[0]), texts[0], findings, uids, raw, seconds, unrefined)


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
    raise ValueError(f"task {task!r} must be one of {', '.join(TASKS)}")


def run_task(model: MiniGPTMed, ds: Dataset, task: str, prompt: str | None = None) -> TaskAnswer:
    """One task on one image, e.g. ``[detection] nodule``; box answers come back as source-pixel findings."""
    image = prepare_image(ds, model.config.vision.image_size)
    instruction = task_instruction(task, prompt, image.transform)
    tokens = REPORT_TOKENS if task == "report" else TASK_TOKENS
    text = model.generate(_images([image]), [instruction], max_new_tokens=tokens)[0]
    default = prompt if task == "detection" else None
    found = [] if task in ("report", "vqa", "identify") else refine_findings(
        findings_from_answer(text, image.transform, str(ds.SOPInstanceUID), default), [ds], [image.display])
    return TaskAnswer(task, instruction, text, found)
