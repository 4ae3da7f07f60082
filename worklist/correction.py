"""Corrections in words, as in RaDialog ("The patient also has X", "remove Y"), as a deterministic rewrite.

The request is split into clauses; each clause is an *add* or a *remove* of a finding named in the known label
vocabulary (``VOCABULARY``), with an optional laterality. The report text is then rewritten sentence by
sentence, nothing else is touched:

* add: negative sentences that deny the finding lose it ("There is no pleural effusion or pneumothorax." with
  pneumothorax added becomes "There is no pleural effusion."; a sentence left with nothing to deny is dropped),
  a sentence stating the finding is appended to FINDINGS, and to IMPRESSION after removing a "normal" statement
  such as "No active disease.";
* remove: positive sentences that mention the finding (and the laterality, when one is named) are dropped from
  FINDINGS and IMPRESSION; negative sentences stay. An IMPRESSION left empty says "No acute abnormality.".

No model is involved, so the same request on the same text always gives the same report; the model is used for
[vqa] and [refer] questions only (see ``worklist/bridge.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from core.result import DraftReport

# label -> pattern of the words that mention it in report prose
VOCABULARY: dict[str, str] = {
    "pleural effusion": r"(?:pleural\s+)?effusions?",
    "pneumothorax": r"pneumothora(?:x|ces)",
    "consolidation": r"consolidat\w*|airspace\s+opacit\w*",
    "cardiomegaly": r"cardiomegaly|enlarged\s+(?:heart|cardiac\s+silhouette)|heart\s+is\s+enlarged"
                    r"|cardiac\s+silhouette\s+is\s+enlarged",
    "nodule": r"nodul(?:e|es|ar)",
    "mass": r"mass(?:es)?",
    "atelectasis": r"atelecta\w*",
    "pulmonary edema": r"pulmonary\s+o?edema",
    "edema": r"o?edema",
    "tumor": r"tumou?rs?",
    "fracture": r"fractur\w*",
    "emphysema": r"emphysema\w*",
    "pneumonia": r"pneumonias?",
}
MASS_NOUNS = frozenset({"cardiomegaly", "consolidation", "atelectasis", "edema", "pulmonary edema", "emphysema",
                        "pneumonia"})
NO_ABNORMALITY_SENTENCE = "No acute abnormality."

_LATERALITY = r"(?P<lat>left|right|bilateral)"
_NEGATION = re.compile(r"\b(?:no|not|without|negative\s+for|free\s+of|absent|resolved)\b", re.IGNORECASE)
_NORMAL = re.compile(r"\bno\s+(?:active|acute)\s+(?:disease|abnormality|cardiopulmonary\s+\w+)|\bnormal\s+"
                     r"(?:study|examination|chest)|\bunremarkable\b", re.IGNORECASE)
_REMOVE_CUES = re.compile(r"\b(?:remove|delete|drop|strike|there\s+is\s+no|there\s+are\s+no|does\s*n[o']t\s+have|"
                          r"do\s*n[o']t\s+have|has\s+no|have\s+no|no\s+evidence\s+of|without|rule\s+out|not\s+present|"
                          r"is\s+not\s+there|absent|wrong)\b", re.IGNORECASE)
_ADD_CUES = re.compile(r"\b(?:also|additionally|add|there\s+is|there\s+are|has|have|shows?|missed|include)\b",
                       re.IGNORECASE)
_CLAUSE_SPLIT = re.compile(r"[.;!?\n]+|,\s*(?:but|and)\s+|\s+but\s+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Edit:
    action: Literal["add", "remove"]
    label: str
    laterality: str | None = None

    def describe(self) -> str:
        words = " ".join(w for w in (self.laterality, self.label) if w)
        return f"{'added' if self.action == 'add' else 'removed'} {words}"


@dataclass(frozen=True)
class CorrectedReport:
    report: DraftReport
    edits: list[Edit]
    changed_sentences: list[str] = field(default_factory=list)  # sentences added or dropped, for the UI


def _label_regex(label: str) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{VOCABULARY[label]})\b", re.IGNORECASE)


_LABEL_PATTERNS = {label: _label_regex(label) for label in VOCABULARY}


def parse_request(text: str) -> list[Edit]:
    """The add/remove edits a correction request asks for; ``ValueError`` if it names none."""
    edits: list[Edit] = []
    for clause in _CLAUSE_SPLIT.split(text):
        labels = _labels_in(clause)
        if not labels:
            continue
        if _REMOVE_CUES.search(clause) or re.match(r"\s*no\b", clause, re.IGNORECASE):
            action: Literal["add", "remove"] = "remove"
        elif _ADD_CUES.search(clause):
            action = "add"
        else:
            continue
        for label, laterality in labels:
            edit = Edit(action, label, laterality)
            if edit not in edits:
                edits.append(edit)
    if not edits:
        raise ValueError(f"correction {text.strip()[:200]!r} must ask to add ('the patient also has X') or remove "
                         f"('remove Y') a known finding: {', '.join(sorted(VOCABULARY))}")
    return edits


def _labels_in(clause: str) -> list[tuple[str, str | None]]:
    """Known labels mentioned in a clause, longest first, each with the laterality word just before it."""
    found: list[tuple[str, str | None]] = []
    taken: list[tuple[int, int]] = []
    for label in sorted(VOCABULARY, key=len, reverse=True):
        for match in _LABEL_PATTERNS[label].finditer(clause):
            if any(start < match.end() and match.start() < end for start, end in taken):
                continue  # "pulmonary edema" already took these words
            taken.append(match.span())
            before = clause[:match.start()]
            lateral = re.search(rf"\b{_LATERALITY}\b(?:\s+\w+){{0,3}}\s*$", before, re.IGNORECASE)
            found.append((label, lateral["lat"].lower() if lateral else None))
    return found


def apply_correction(report: DraftReport, request: str) -> CorrectedReport:
    """Rewrite FINDINGS and IMPRESSION as the request asks; ``ValueError`` if it names no known finding."""
    edits = parse_request(request)
    findings, impression = _sentences(report.findings), _sentences(report.impression)
    changed: list[str] = []
    for edit in edits:
        if edit.action == "remove":
            findings = _drop_positive(findings, edit, changed)
            impression = _drop_positive(impression, edit, changed)
        else:
            findings = _clear_denials(findings, edit.label, changed)
            impression = _clear_denials([s for s in impression if not _drop_normal(s, changed)], edit.label,
                                        changed)
            findings.append(_finding_sentence(edit))
            impression.append(_impression_sentence(edit))
            changed += [findings[-1], impression[-1]]
    if not impression:
        impression = [NO_ABNORMALITY_SENTENCE]
    return CorrectedReport(DraftReport(findings=" ".join(findings), impression=" ".join(impression)), edits,
                           changed)


def mentions(sentence: str, label: str) -> bool:
    return bool(_LABEL_PATTERNS[label].search(sentence)) if label in _LABEL_PATTERNS else \
        label.lower() in sentence.lower()


def is_negative(sentence: str, label: str) -> bool:
    """True if the sentence denies the finding (a negation word before its mention)."""
    match = _LABEL_PATTERNS[label].search(sentence)
    return bool(match and _NEGATION.search(sentence[:match.start()]))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(" ".join(text.split())) if s.strip()]


def _drop_positive(sentences: list[str], edit: Edit, changed: list[str]) -> list[str]:
    kept = []
    for sentence in sentences:
        lateral_ok = edit.laterality is None or re.search(rf"\b{edit.laterality}\b", sentence, re.IGNORECASE)
        if mentions(sentence, edit.label) and not is_negative(sentence, edit.label) and lateral_ok:
            changed.append(sentence)
            continue
        kept.append(sentence)
    return kept


def _clear_denials(sentences: list[str], label: str, changed: list[str]) -> list[str]:
    """Take *label* out of sentences that deny it; drop a sentence left denying nothing."""
    out = []
    pattern = VOCABULARY[label]
    for sentence in sentences:
        if not (mentions(sentence, label) and is_negative(sentence, label)):
            out.append(sentence)
            continue
        rewritten = re.sub(rf"\s*(?:,|\bor\b|\band\b)\s+(?:{pattern})\b", "", sentence, count=1, flags=re.IGNORECASE)
        if rewritten == sentence:
            rewritten = re.sub(rf"\b(?:{pattern})\b\s*(?:,|\bor\b|\band\b)\s*", "", sentence, count=1,
                               flags=re.IGNORECASE)
        changed.append(sentence)
        if rewritten != sentence and _labels_in(rewritten):
            out.append(rewritten)
    return out


def _drop_normal(sentence: str, changed: list[str]) -> bool:
    if _NORMAL.search(sentence):
        changed.append(sentence)
        return True
    return False


def _finding_sentence(edit: Edit) -> str:
    words = " ".join(w for w in (edit.laterality, edit.label) if w)
    if edit.label in MASS_NOUNS:
        return f"There is {words}."
    article = "an" if words[0] in "aeiou" else "a"
    return f"There is {article} {words}."


def _impression_sentence(edit: Edit) -> str:
    words = " ".join(w for w in (edit.laterality, edit.label) if w)
    return words[0].upper() + words[1:] + "."
