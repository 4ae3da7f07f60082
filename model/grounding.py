"""Grounding a draft: link each sentence of the report with the boxes that support it, flag what is not.

A MiniGPT-Med draft is two generations, the report text and the ``[grounding]`` boxes, and they can disagree.
:func:`link` reads the report (:mod:`model.sentences`) and ties every *positive* sentence to the findings whose
label it states (:func:`model.sentences.supports`: same label or a compatible one, "mass" ↔ "tumor") on a
compatible side; the sentence is then ``grounded``, else ``text_only``. A finding no sentence states is
``box_only``. Negative, normal and neutral sentences are ``statement``\\ s and need no box.

Grounding after generation (the analysis asks the model again, model/analyze.py): :func:`follow_up_labels`
names the labels of the text-only sentences, each asked as ``[detection] <label>`` on every analysed slice
(MiniGPT-Med's detection task answers every box of that class, or none: unlike ``[refer]``, which presumes
the thing is there, it can say a stated finding is not in the image); the boxes found that way join the
findings with ``source="detection"`` and :func:`link` runs again. Nothing is retrained and any model that
answers ``[detection]`` (the released MiniGPT-Med weights included) gains the mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.result import Consistency, DraftReport, Finding, ReportSentence
from model.sentences import FOCAL_LABELS, StatedSentence, read_report, supports


def _same_side(sentence: StatedSentence, finding: Finding) -> bool:
    return (sentence.laterality in (None, "bilateral") or finding.laterality in (None, "bilateral")
            or sentence.laterality == finding.laterality)


def _supported_by(sentence: StatedSentence, finding: Finding) -> bool:
    if not _same_side(sentence, finding):
        return False
    if not sentence.labels:  # "a lesion", "an opacity": a finding whose kind the text does not name
        return finding.label.lower() in FOCAL_LABELS
    return any(supports(label, finding.label) for label in sentence.labels)


def link(report: DraftReport, findings: Sequence[Finding]) -> tuple[DraftReport, list[Finding], Consistency]:
    """The report with its sentences linked to *findings*, the findings linked back, and the counts."""
    stated = read_report(report)
    links: list[list[int]] = [[] for _ in stated]
    backlinks: list[list[int]] = [[] for _ in findings]
    for number, sentence in enumerate(stated):
        if sentence.polarity != "positive":
            continue
        for index, finding in enumerate(findings):
            if _supported_by(sentence, finding):
                links[number].append(index)
                backlinks[index].append(number)
    sentences = [
        ReportSentence(section=sentence.section, text=sentence.text, polarity=sentence.polarity,
                       labels=list(sentence.labels), laterality=sentence.laterality, site=sentence.site,
                       findings=links[number],
                       status="statement" if sentence.polarity != "positive"
                       else "grounded" if links[number] else "text_only")
        for number, sentence in enumerate(stated)
    ]
    linked = [finding.model_copy(update={"sentences": backlinks[index],
                                         "status": "grounded" if backlinks[index] else "box_only"})
              for index, finding in enumerate(findings)]
    consistency = Consistency(
        grounded=sum(sentence.status == "grounded" for sentence in sentences),
        text_only=sum(sentence.status == "text_only" for sentence in sentences),
        box_only=sum(finding.status == "box_only" for finding in linked),
    )
    return report.model_copy(update={"sentences": sentences}), linked, consistency


def follow_up_labels(report: DraftReport) -> list[str]:
    """The labels of the text-only positive sentences of a linked *report*, each once, in order of appearance:
    what a follow-up question should look for. A text-only sentence with no label ("a lesion", "an opacity")
    names nothing to look for and stays text-only."""
    labels: list[str] = []
    for sentence in report.sentences:
        if sentence.status != "text_only":
            continue
        for label in sentence.labels:
            if label not in labels:
                labels.append(label)
    return labels
