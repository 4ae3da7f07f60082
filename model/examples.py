"""Training examples for every MiniGPT-Med task, drawn from phantom studies, and the images the model reads.

What the model reads (the same in training, analysis and evaluation):

* each image of a study, prepared by :func:`model.imaging.prepare_image` (window, letterbox, CLIP normalisation);
  box tasks run per image, boxes are on the 0–100 grid of that image's letterboxed square;
* a study-level *view* for the report and VQA (:func:`model.imaging.study_view`): the single image of a
  radiograph, the maximum-intensity projection of a CT series' analysed slices, or a montage of an MR series'.

This module is training only: production (the analysis, the pipeline, the CLI) never imports it or the phantom
generator it draws from (the ``phantoms and training`` contract of pyproject.toml).

Tasks and answers (box text as in :mod:`model.prompts`):

=============  ===============================================  ============================================
task           instruction                                      answer
=============  ===============================================  ============================================
report         ``Describe this image in detail``                the study's FINDINGS/IMPRESSION text
detection      ``[detection] <label>``                          ``<p>label</p> {box}<delim>{box}`` or ``none``
refer          ``[refer] where is <side label> ?``              ``<p>side label</p> {box}…``
identify       ``[identify] what is it in {box}``               ``side label`` (e.g. ``left pleural effusion``)
grounding      ``[grounding] describe this image in detail``    ``<p>label</p> {box}… <p>label</p> {box}`` per
                                                                label, or ``no abnormality``
vqa            ``[vqa] <question>``                             the short answer (``yes``, ``left``, ``2`` …)
=============  ===============================================  ============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model import prompts
from model.imaging import Letterbox, prepare_image, projects, study_view
from model.phantoms import PhantomStudy
from model.prompts import CT_LABELS, MR_LABELS, RADIOGRAPH_LABELS, TASKS, GridBox

NO_BOX_ANSWER = "none"  # [detection] answer when the label is absent
NORMAL_GROUNDING = "no abnormality"  # [grounding] answer for an image without findings
MODALITY_LABELS: dict[str, tuple[str, ...]] = {"CR": RADIOGRAPH_LABELS, "DX": RADIOGRAPH_LABELS, "CT": CT_LABELS,
                                               "MR": MR_LABELS}
# How often each task is drawn for a training example (box tasks are short answers, so they get more draws).
TASK_WEIGHTS: dict[str, float] = {"report": 0.2, "detection": 0.15, "refer": 0.05, "identify": 0.05,
                                  "grounding": 0.35, "vqa": 0.2}


@dataclass(frozen=True)
class GridFinding:
    label: str
    image_index: int
    box: GridBox  # on the 0–100 grid of that image's model square
    laterality: str | None

    @property
    def phrase(self) -> str:
        return f"{self.laterality} {self.label}" if self.laterality else self.label


@dataclass(frozen=True)
class PreparedStudy:
    """A study as the model sees it, with the truth mapped onto the model grid."""

    modality: str
    images: list[np.ndarray]  # (3, S, S) float32 per image, CLIP-normalised
    overview: np.ndarray  # (3, S, S) float32: the report/VQA input (study_view)
    findings: list[GridFinding]  # what the box tasks teach: truth findings, or every CT/MR lesion section
    report: str
    qa: list[dict[str, str]]
    view_shows_boxes: bool = False  # the grid boxes of the findings apply to the view (one image, or a CT MIP)


@dataclass(frozen=True)
class Example:
    task: str
    image: np.ndarray  # (3, S, S) float32
    instruction: str
    answer: str
    # the truth boxes on this image (label, grid box), for the training-only patch probe; None for a montage
    regions: tuple[tuple[str, GridBox], ...] | None = None


def grid_box(transform: Letterbox, box: Sequence[float]) -> GridBox:
    """A source-pixel box → a non-degenerate box on the 0–100 grid (a sub-unit side is widened to one unit)."""
    x1, y1, x2, y2 = transform.source_to_grid((float(box[0]), float(box[1]), float(box[2]), float(box[3])))
    x1, y1 = min(x1, prompts.BOX_GRID - 1), min(y1, prompts.BOX_GRID - 1)
    return GridBox(x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))


def prepare_phantom(study: PhantomStudy, model_size: int) -> PreparedStudy:
    """Prepare every image of *study* as analysis would, and map its boxes onto the model grid: a radiograph's
    truth findings, or every visible lesion section of a CT/MR series (``Rendering.drawn``), slice by slice."""
    prepared = [prepare_image(ds, model_size) for ds in study.datasets]
    findings = [GridFinding(f.label, f.image_index, grid_box(prepared[f.image_index].transform, f.box), f.laterality)
                for f in study.rendering.drawn]
    view = study_view(prepared, study.modality, model_size)
    return PreparedStudy(study.modality, [p.pixels for p in prepared], view, findings, study.report, study.qa,
                         view_shows_boxes=len(prepared) == 1 or projects(study.modality, prepared))


def grounded_answer(findings: Sequence[GridFinding]) -> str:
    """The [grounding] answer: one ``<p>label</p> {box}<delim>…`` group per label, in order of appearance."""
    if not findings:
        return NORMAL_GROUNDING
    groups: dict[str, list[GridBox]] = {}
    for finding in sorted(findings, key=lambda f: (f.box.x1, f.box.y1)):
        groups.setdefault(finding.label, []).append(finding.box)
    return " ".join(prompts.format_grounded(label, boxes) for label, boxes in groups.items())


def _choice(rng: np.random.Generator, items: Sequence) -> object:
    return items[int(rng.integers(len(items)))]


def _box_image(rng: np.random.Generator, study: PreparedStudy) -> int:
    """Which image a box task reads: a finding's image most of the time, else any image."""
    if study.findings and (len(study.images) == 1 or rng.random() < 0.7):
        return int(_choice(rng, study.findings).image_index)
    return int(rng.integers(len(study.images)))


def make_example(rng: np.random.Generator, study: PreparedStudy, task: str) -> Example:
    """One example of *task* from *study* (tasks that need a finding fall back to detection/grounding)."""
    labels = MODALITY_LABELS[study.modality]
    if task in ("report", "vqa"):
        regions = tuple((f.label, f.box) for f in study.findings) if study.view_shows_boxes else None
        if task == "report":
            return Example(task, study.overview, prompts.report_instruction(), study.report, regions)
        pair = _choice(rng, study.qa)
        return Example(task, study.overview, prompts.vqa_instruction(pair["question"]), pair["answer"].lower(),
                       regions)
    index = _box_image(rng, study)
    here = [f for f in study.findings if f.image_index == index]
    image = study.images[index]
    example = _box_example(rng, task, image, here, labels)
    return dataclasses.replace(example, regions=tuple((f.label, f.box) for f in here))


def _box_example(rng: np.random.Generator, task: str, image: np.ndarray, here: list[GridFinding],
                 labels: Sequence[str]) -> Example:
    if task in ("refer", "identify") and not here:
        task = "detection"
    if task == "grounding":
        return Example(task, image, prompts.grounding_instruction(), grounded_answer(here))
    if task == "detection":
        present = sorted({f.label for f in here})
        label = str(_choice(rng, present)) if present and rng.random() < 0.6 else str(_choice(rng, labels))
        boxes = [f.box for f in sorted(here, key=lambda f: (f.box.x1, f.box.y1)) if f.label == label]
        answer = prompts.format_grounded(label, boxes) if boxes else NO_BOX_ANSWER
        return Example(task, image, prompts.detection_instruction(label), answer)
    target = _choice(rng, here)
    assert isinstance(target, GridFinding)
    if task == "identify":
        return Example(task, image, prompts.identify_instruction(target.box), target.phrase)
    if task == "refer":
        same = [f.box for f in sorted(here, key=lambda f: (f.box.x1, f.box.y1)) if f.phrase == target.phrase]
        return Example(task, image, prompts.refer_instruction(target.phrase),
                       prompts.format_grounded(target.phrase, same))
    raise ValueError(f"task {task!r} must be one of {', '.join(TASKS)}")


def sample_examples(rng: np.random.Generator, study: PreparedStudy, count: int) -> list[Example]:
    """*count* examples from *study*, tasks drawn with :data:`TASK_WEIGHTS`."""
    names = list(TASK_WEIGHTS)
    weights = np.asarray([TASK_WEIGHTS[n] for n in names])
    tasks = rng.choice(names, size=count, p=weights / weights.sum())
    return [make_example(rng, study, str(task)) for task in tasks]


def corpus_texts(studies: Sequence[PhantomStudy]) -> list[str]:
    """Texts to train the tokenizer on: reports, QA, instructions and labels of *studies*."""
    texts = [prompts.report_instruction(), prompts.grounding_instruction(), NO_BOX_ANSWER, NORMAL_GROUNDING]
    for study in studies:
        texts.append(study.report)
        texts.extend(f"{prompts.vqa_instruction(p['question'])} {p['answer'].lower()}" for p in study.qa)
        for label in MODALITY_LABELS[study.modality]:
            texts.append(prompts.detection_instruction(label))
            for side in ("left", "right"):
                texts.append(prompts.refer_instruction(f"{side} {label}"))
    return texts
