"""What a grounded draft says about itself, in the words every output uses (issue 19, "grounded drafts").

A grounded draft (core/result.py: ``report.sentences``, ``Finding.status``, ``AnalysisResult.consistency``,
filled in by :func:`model.grounding.link`) tells which positive sentences a box supports (``grounded``), which
have no image evidence (``text_only``) and which boxes no sentence states (``box_only``). The SR, narrative
SR, ORU, GSPS and PNG overlay all read it from here; nothing downstream reads the report text again.

The annotations appear on the outputs of every grounded result: the preliminary draft, and the signed version,
which carries the radiologist's sentences linked to the boxes they accepted (worklist/grounding.py) -- a
statement the radiologist accepted without image evidence stays "not localized by the AI" in the signed SR
and ORU, which is true. A result written before grounding (``consistency`` None, no sentences) gets none, so
its outputs are what they were before grounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.result import AnalysisResult, Consistency, Finding, ReportSentence

logger = logging.getLogger(__name__)

NOT_LOCALIZED = "not localized by the AI"
NOT_LOCALIZED_MARK = f"[{NOT_LOCALIZED}]"  # appended to a text-only sentence in the narrative and the ORU
NOT_STATED = "not stated in the draft text"
NOT_IN_TEXT = "(not in text)"  # the short form of NOT_STATED on a box's caption (GSPS, PNG)
BOX_ONLY_PREFIX = "Localized by the AI, not stated in the draft text: "


@dataclass(frozen=True)
class DraftGrounding:
    """The grounding of one result (draft or signed version), as the outputs need it."""

    result: AnalysisResult
    consistency: Consistency

    @property
    def flagged(self) -> bool:
        return self.consistency.flagged

    def text_only_sentences(self) -> list[tuple[int, ReportSentence]]:
        """(index, sentence) of every positive sentence no box supports, in report order."""
        return [(n, s) for n, s in enumerate(self.result.report.sentences) if s.status == "text_only"]

    def grounded_sentences(self) -> list[tuple[int, ReportSentence]]:
        return [(n, s) for n, s in enumerate(self.result.report.sentences) if s.status == "grounded"]

    def box_only_findings(self) -> list[tuple[int, Finding]]:
        """(index, finding) of every box no sentence states, in result order."""
        return [(n, f) for n, f in enumerate(self.result.findings) if f.status == "box_only"]

    def summary(self) -> str:
        """E.g. ``AI consistency: 1 of 2 stated findings localized; 1 box not stated in the text``."""
        counts = self.consistency
        stated = counts.grounded + counts.text_only
        return (f"AI consistency: {counts.grounded} of {stated} stated finding{'s' if stated != 1 else ''} "
                f"localized; {counts.box_only} box{'es' if counts.box_only != 1 else ''} not stated in the text")

    def box_only_lines(self) -> list[str]:
        """``Localized by the AI, not stated in the draft text: nodule (right)``, one per box-only finding."""
        return [BOX_ONLY_PREFIX + finding_words(finding) for _, finding in self.box_only_findings()]

    def annotated(self, section: str) -> str:
        """The text of *section* ("findings", "impression") with :data:`NOT_LOCALIZED_MARK` after each of its
        text-only sentences. The sentences are the section's own words (model/sentences.py cuts them out of it);
        one that is not found there any more is logged and left unmarked, never guessed at."""
        text = self.result.report.findings if section == "findings" else self.result.report.impression
        pieces: list[str] = []
        cursor = 0
        for sentence in self.result.report.sentences:
            if sentence.section != section:
                continue
            start = text.find(sentence.text, cursor)
            if start < 0:
                logger.warning("episode %d: a %s sentence of the grounded draft is not in its text; its "
                               "consistency mark is left out", self.result.episode_id, section)
                continue
            end = start + len(sentence.text)
            pieces.append(text[cursor:end])
            if sentence.status == "text_only":
                pieces.append(" " + NOT_LOCALIZED_MARK)
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces)


def draft_grounding(result: AnalysisResult) -> DraftGrounding | None:
    """The grounding the outputs of *result* show, or None for a result written before grounding."""
    if result.consistency is None or not result.report.sentences:
        return None
    return DraftGrounding(result=result, consistency=result.consistency)


def finding_words(finding: Finding) -> str:
    """``nodule (right)``, ``Kerley B lines``: the label, with its side when it has one."""
    label = finding.label.strip()
    return f"{label} ({finding.laterality})" if finding.laterality else label


def is_box_only(result: AnalysisResult, index: int) -> bool:
    """Whether finding *index* is a box of a grounded result that no sentence states."""
    return draft_grounding(result) is not None and result.findings[index].status == "box_only"
