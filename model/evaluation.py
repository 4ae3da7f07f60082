"""Metrics of a model on a phantom folder written by ``raddraft phantoms`` (DICOM files + truth.json).

Per study the model runs :func:`model.analyze.analyze_series` on the analysed slices (the slice policy), then
answers every VQA question of the truth in one batched call on the study view.

* **finding F1** — a predicted finding matches a truth finding when the label is the same, it is on the same
  SOP instance and the boxes' IoU ≥ 0.5; matching is one-to-one, greedy by IoU, per study and label; precision, recall
  and F1 are computed over all studies' true positives, false positives and false negatives; ``by_label`` has
  the same counts per modality and label (``"CT nodule"``), which add up to the totals. The findings are the
  pipeline's (boxes of focal lesions refined by :mod:`model.refine`); ``finding_model_boxes`` has the same
  counts for the model's own grid boxes, to show what the refinement adds.
* **mean IoU** — the mean IoU of the matched pairs.
* **VQA accuracy** — exact match after normalisation (lower case, punctuation and articles removed, number
  words as digits).
* **report label F1** — labels extracted from the generated report text by :func:`extract_labels`, compared with
  the set of truth labels of the study; micro F1 over (study, label) pairs.
* **latency** — seconds of ``analyze_series`` per study (report + boxes, one generate call), all and by modality.
* **grounding** (issue 19: text and boxes) — per study, the positive labels the draft's sentences state
  (:mod:`model.sentences`) against the labels of its boxes (compatible labels agree: "mass" and "tumor"):
  ``disagree_before`` studies where they differ before grounding after generation (the same answers without the
  follow-up ``[detection]`` boxes; no flag existed then), ``disagree_after`` after it, and
  ``disagree_unflagged`` studies where they differ although the draft is not flagged (the target is 0);
  ``hallucinated`` positive sentences none of whose labels is in the study's truth, ``hallucinated_flagged``
  those marked text-only (target ≥ 90 %); ``follow_up_boxes`` boxes the follow-up added, ``follow_up_true``
  those that match a truth finding; ``finding_before_follow_up`` the finding counts without them.

:func:`extract_labels` — a keyword extractor with negation: the text is cut into clauses (at ``.``, ``;``,
``:`` and line breaks); a label is present when one of its keywords occurs in a clause and no negation cue
(``no``, ``not``, ``without``, ``negative for``, ``free of``, ``absence of``) stands before it in that clause.
Keywords are per modality family (for brain MR, ``mass``/``lesion``/``glioma`` mean *tumor*).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset

from core.result import AnalysisResult, Finding
from model import prompts
from model.analyze import analyze_series
from model.embedded import LoadedModel
from model.imaging import prepare_image, study_view
from model.minigpt import MiniGPTMed
from model.sentences import supports
from model.slices import SlicePolicy, iou, select_indices

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
VQA_TOKENS = 16

_RADIOGRAPH_KEYWORDS = {
    "nodule": ("nodule", "nodular"),
    "mass": ("mass",),
    "pleural effusion": ("pleural effusion", "effusion"),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "cardiomegaly": ("cardiomegaly", "heart is enlarged", "enlarged cardiac silhouette",
                     "cardiac silhouette is enlarged", "enlarged heart"),
}
KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "CR": _RADIOGRAPH_KEYWORDS,
    "DX": _RADIOGRAPH_KEYWORDS,
    "CT": {"nodule": ("nodule", "nodules")},
    "MR": {"tumor": ("tumor", "tumour", "mass", "lesion", "glioma"), "edema": ("edema", "oedema")},
}
_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|absence of)\b")
_CLAUSE = re.compile(r"[.;:\n]+")
_NUMBERS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


@dataclass(frozen=True)
class TruthFinding:
    label: str
    sop_instance_uid: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class MatchCounts:
    tp: int
    fp: int
    fn: int
    ious: tuple[float, ...]


def match_findings(predicted: Sequence[Finding | TruthFinding], truth: Sequence[TruthFinding],
                   threshold: float = IOU_THRESHOLD) -> MatchCounts:
    """One-to-one greedy matching by IoU of same-label, same-instance pairs with IoU ≥ *threshold*."""
    pairs = []
    for i, p in enumerate(predicted):
        for j, t in enumerate(truth):
            if p.label == t.label and p.sop_instance_uid == t.sop_instance_uid:
                value = iou(p.box, t.box)
                if value >= threshold:
                    pairs.append((value, i, j))
    used_p: set[int] = set()
    used_t: set[int] = set()
    ious = []
    for value, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            ious.append(value)
    return MatchCounts(len(ious), len(predicted) - len(ious), len(truth) - len(ious), tuple(ious))


def f1(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0 if not fn else 0.0
    recall = tp / (tp + fn) if tp + fn else 1.0 if not fp else 0.0
    score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": score}


def extract_labels(text: str, modality: str) -> set[str]:
    """Labels the report *text* states as present (negation-aware; see the module docstring)."""
    keywords = KEYWORDS.get(modality)
    if keywords is None:
        raise ValueError(f"modality {modality!r} must be one of {', '.join(KEYWORDS)}")
    found = set()
    for clause in _CLAUSE.split(text.lower()):
        for label, words in keywords.items():
            for word in words:
                for match in re.finditer(rf"\b{re.escape(word)}\b", clause):
                    if not _NEGATION.search(clause[: match.start()]):
                        found.add(label)
    return found


def _counts(counts: Counter[str]) -> dict[str, float | int]:
    """precision/recall/F1 and the tp/fp/fn they come from."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {**f1(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}


def normalise_answer(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def label_counts(predicted: Iterable[set[str]], truth: Iterable[set[str]]) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for p, t in zip(predicted, truth, strict=True):
        tp += len(p & t)
        fp += len(p - t)
        fn += len(t - p)
    return tp, fp, fn


def load_phantom_folder(folder: Path) -> list[tuple[dict[str, Any], list[Path]]]:
    """(truth study, its image files in instance order) for every study of truth.json."""
    truth_path = folder / "truth.json"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{folder} is not a phantom folder: truth.json is missing")
    studies = json.loads(truth_path.read_text(encoding="utf-8"))["studies"]
    files: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        files.setdefault(str(ds.StudyInstanceUID), []).append((int(ds.get("InstanceNumber") or 0), path))
    result = []
    for study in studies:
        paths = [p for _, p in sorted(files.get(study["study_uid"], []))]
        if not paths:
            raise FileNotFoundError(f"{folder}: no DICOM file of study {study['study_uid']} from truth.json")
        result.append((study, paths))
    return result


def answer_questions(model: MiniGPTMed, datasets: Sequence[Dataset], questions: Sequence[str]) -> list[str]:
    """All *questions* about one study in one batched call on the study view."""
    if not questions:
        return []
    size = model.config.vision.image_size
    prepared = [prepare_image(ds, size) for ds in datasets]
    view = study_view(prepared, str(datasets[0].get("Modality", "")), size)
    images = torch.from_numpy(np.stack([view] * len(questions)))  # (Q, 3, S, S)
    return model.generate(images, [prompts.vqa_instruction(q) for q in questions], max_new_tokens=VQA_TOKENS)


def _study_counts(findings: Sequence[Finding], truth: Sequence[TruthFinding], modality: str,
                  by_label: defaultdict[str, Counter[str]]) -> tuple[Counter[str], list[float]]:
    """One study's tp/fp/fn (the sum over its labels: matching is per label) and matched IoUs; *by_label* is
    updated with the per-label counts."""
    counts: Counter[str] = Counter()
    ious: list[float] = []
    for label in sorted({f.label for f in findings} | {f.label for f in truth}):
        one = match_findings([f for f in findings if f.label == label], [f for f in truth if f.label == label])
        row = {"tp": one.tp, "fp": one.fp, "fn": one.fn}
        by_label[f"{modality} {label}"].update(row)
        counts.update(row)
        ious.extend(one.ious)
    return counts, ious


def _disagree(result: AnalysisResult) -> bool:
    """Whether the positive labels the draft states differ from the labels of its boxes (either way)."""
    stated = {label for sentence in result.report.sentences if sentence.polarity == "positive"
              for label in sentence.labels}
    boxed = {finding.label for finding in result.findings}
    return (any(not any(supports(label, box) for box in boxed) for label in stated)
            or any(not any(supports(label, box) for label in stated) for box in boxed))


def _grounding_counts(before: AnalysisResult, after: AnalysisResult, truth: Sequence[TruthFinding]
                      ) -> Counter[str]:
    """One study's grounding figures (module docstring)."""
    counts: Counter[str] = Counter()
    counts["disagree_before"] += _disagree(before)
    counts["disagree_after"] += _disagree(after)
    counts["disagree_unflagged"] += _disagree(after) and not (after.consistency and after.consistency.flagged)
    truth_labels = {f.label for f in truth}
    for sentence in after.report.sentences:
        if sentence.polarity == "positive" and sentence.labels and not any(
                supports(label, truth_label) for label in sentence.labels for truth_label in truth_labels):
            counts["hallucinated"] += 1
            counts["hallucinated_flagged"] += sentence.status == "text_only"
    added = [f for f in after.findings if f.source == "detection"]
    counts["follow_up_boxes"] += len(added)
    counts["follow_up_true"] += sum(
        match_findings([f], [t for t in truth if t.label == f.label]).tp for f in added)
    return counts


def evaluate_folder(loaded: LoadedModel, folder: Path, *, limit: int | None = None,
                    policy: SlicePolicy | None = None) -> dict[str, Any]:
    """Every metric of the module docstring on the phantom *folder* (the first *limit* studies)."""
    policy = policy or SlicePolicy()
    studies = load_phantom_folder(folder)[:limit]
    ious: list[float] = []
    vqa_right = vqa_total = 0
    predicted_labels: list[set[str]] = []
    truth_labels: list[set[str]] = []
    latency: dict[str, list[float]] = {}
    totals: Counter[str] = Counter()  # tp/fp/fn over all studies
    by_label: defaultdict[str, Counter[str]] = defaultdict(Counter)  # "modality label" -> tp/fp/fn
    model_totals: Counter[str] = Counter()  # the same for the unrefined model boxes
    model_by_label: defaultdict[str, Counter[str]] = defaultdict(Counter)
    grounding: Counter[str] = Counter()
    before_totals: Counter[str] = Counter()  # finding tp/fp/fn without the follow-up boxes
    for number, (study, paths) in enumerate(studies, start=1):
        all_datasets = [dcmread(p) for p in paths]
        datasets = [all_datasets[i] for i in select_indices(len(all_datasets), policy.max_per_series)]
        analysis = analyze_series(loaded, datasets, policy)
        truth = [TruthFinding(f["label"], f["sop_instance_uid"], tuple(float(v) for v in f["box"]))
                 for f in study["findings"]]
        counts, study_ious = _study_counts(analysis.findings, truth, study["modality"], by_label)
        totals.update(counts)
        ious.extend(study_ious)
        model_totals.update(_study_counts(analysis.model_findings, truth, study["modality"], model_by_label)[0])
        before = analysis.without_follow_up or analysis.result
        grounding.update(_grounding_counts(before, analysis.result, truth))
        before_totals.update(_study_counts(before.findings, truth, study["modality"], defaultdict(Counter))[0])
        predicted_labels.append(extract_labels(analysis.report_text, study["modality"]))
        truth_labels.append({f["label"] for f in study["findings"]})
        answers = answer_questions(loaded.model, datasets, [q["question"] for q in study["qa"]])
        for qa, answer in zip(study["qa"], answers, strict=True):
            vqa_total += 1
            vqa_right += normalise_answer(answer) == normalise_answer(qa["answer"])
        latency.setdefault(study["modality"], []).append(analysis.seconds)
        logger.info("evaluated study %d/%d (%s): %d tp, %d fp, %d fn, %.2f s", number, len(studies),
                    study["modality"], counts["tp"], counts["fp"], counts["fn"], analysis.seconds)
    every = [s for values in latency.values() for s in values]
    label_tp, label_fp, label_fn = label_counts(predicted_labels, truth_labels)
    return {
        "studies": len(studies),
        "finding": {**_counts(totals), "iou_threshold": IOU_THRESHOLD,
                    "by_label": {name: _counts(counts) for name, counts in sorted(by_label.items())}},
        "finding_model_boxes": {**_counts(model_totals),
                                "by_label": {name: _counts(c) for name, c in sorted(model_by_label.items())}},
        "finding_before_follow_up": _counts(before_totals),
        "grounding": {
            **{key: grounding[key] for key in ("disagree_before", "disagree_after", "disagree_unflagged",
                                               "hallucinated", "hallucinated_flagged", "follow_up_boxes",
                                               "follow_up_true")},
            "hallucinated_flagged_share": (grounding["hallucinated_flagged"] / grounding["hallucinated"]
                                           if grounding["hallucinated"] else 1.0),
        },
        "mean_iou": statistics.fmean(ious) if ious else 0.0,
        "vqa_accuracy": vqa_right / vqa_total if vqa_total else 0.0,
        "vqa_questions": vqa_total,
        "report_labels": {**f1(label_tp, label_fp, label_fn), "tp": label_tp, "fp": label_fp, "fn": label_fn},
        "latency_s": {
            "mean": statistics.fmean(every) if every else 0.0,
            "p95": float(np.percentile(every, 95)) if every else 0.0,
            "by_modality": {m: statistics.fmean(v) for m, v in sorted(latency.items())},
        },
    }
