"""The grounded draft as the radiologist edits it: sentences, their boxes, and what still needs a decision.

A grounded AI draft (``AnalysisResult.report.sentences``, issue 19) ties each positive sentence to the boxes
that support it. The worklist keeps the draft as free text the radiologist edits and the findings' reviews, so
the sentence structure is recomputed from them (:func:`ground_draft`):

* the current text is cut into sentences with the same reader as the analysis (:mod:`model.sentences`);
* a sentence whose section and text are those of a sentence of the AI draft *is* that sentence (``origin``
  ``ai``): it keeps the AI's links, less the rejected boxes;
* any other sentence was written by the radiologist (typed, edited, or added by a correction; ``origin``
  ``radiologist``) and is linked with the analysis's rule (:func:`model.grounding.link`) to the boxes that
  are not rejected;
* a positive sentence with no box left is ``text_only``; a box no sentence states is ``box_only``.

**The review rule** (:attr:`GroundedSentence.needs_decision`): an AI sentence that states a finding no box
shows (``text_only``, also when its only box was rejected) must be accepted as stated, edited or removed
before signing, like a pending finding. A sentence the radiologist wrote is their statement: it needs no
decision. :func:`final_structure` turns the reviewed draft into the signed result's sentences and findings.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from core.result import Consistency, DraftReport, Finding, ReportSentence
from model.grounding import link
from model.sentences import split_sentences

Section = Literal["findings", "impression"]
SentenceKey = tuple[str, str]  # (section, text with white space collapsed): what a sentence decision is about


def normalized(text: str) -> str:
    """*text* with runs of white space as one space, stripped: the identity of a sentence's wording."""
    return " ".join(text.split())


def sentence_key(section: str, text: str) -> SentenceKey:
    """The key a sentence decision is stored under."""
    return section, normalized(text)


def sentence_digest(section: str, text: str) -> str:
    """A fixed-length digest of :func:`sentence_key` (the database key; sentences may be long)."""
    return hashlib.sha256("\x1f".join(sentence_key(section, text)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GroundedSentence:
    """One sentence of the current draft text, linked to the draft's findings (indices of ``result.findings``)."""

    index: int
    section: Section
    text: str
    polarity: str
    labels: tuple[str, ...]
    laterality: str | None
    site: str | None
    findings: tuple[int, ...]
    status: Literal["grounded", "text_only", "statement"]
    origin: Literal["ai", "radiologist"]
    accepted: bool  # the radiologist accepted it as stated
    position: int = 0  # 0-based place in its section


    @property
    def needs_decision(self) -> bool:
        """An AI statement without image evidence that the radiologist has not accepted yet."""
        return self.status == "text_only" and self.origin == "ai" and not self.accepted

    def describe(self) -> str:
        """How an error message names the sentence (clinical text, no patient identifier)."""
        return f"{self.section.upper()} sentence {self.position + 1} ({self.text!r})"


@dataclass(frozen=True)
class GroundedDraft:
    """The current draft's sentences, the back-links of the findings that are not rejected, and the counts."""

    sentences: list[GroundedSentence]
    finding_sentences: dict[int, list[int]] = field(default_factory=dict)  # finding index -> sentence indices
    rejected: frozenset[int] = frozenset()

    def finding_status(self, index: int) -> Literal["grounded", "box_only"] | None:
        """``grounded`` or ``box_only`` for a finding that is not rejected; None for a rejected one."""
        if index in self.rejected:
            return None
        return "grounded" if self.finding_sentences.get(index) else "box_only"

    @property
    def consistency(self) -> Consistency:
        return Consistency(grounded=sum(s.status == "grounded" for s in self.sentences),
                           text_only=sum(s.status == "text_only" for s in self.sentences),
                           box_only=sum(not links for links in self.finding_sentences.values()))

    @property
    def undecided(self) -> list[GroundedSentence]:
        return [s for s in self.sentences if s.needs_decision]


def is_grounded(ai_report: DraftReport) -> bool:
    """Whether a draft was grounded (results written before issue 19 have no sentences: shown as before)."""
    return bool(ai_report.sentences)


def ground_draft(ai_report: DraftReport, ai_findings: Sequence[Finding], findings_text: str, impression_text: str,
                 *, rejected: frozenset[int] | set[int] = frozenset(), labels: Mapping[int, str] | None = None,
                 accepted: set[SentenceKey] | frozenset[SentenceKey] = frozenset()) -> GroundedDraft:
    """The sentences of the current text linked to the findings not *rejected* (see the module docstring).

    *labels*: the radiologist's label of a finding, by index (a new sentence is linked by it); *accepted*: the
    keys (:func:`sentence_key`) of the sentences the radiologist accepted as stated."""
    rejected = frozenset(rejected)
    labels = labels or {}
    candidates = [index for index in range(len(ai_findings)) if index not in rejected]
    relabelled = [ai_findings[index].model_copy(update={"label": labels.get(index, ai_findings[index].label)})
                  for index in candidates]
    current, _, _ = link(DraftReport(findings=findings_text, impression=impression_text), relabelled)
    originals: dict[SentenceKey, deque[ReportSentence]] = defaultdict(deque)
    for sentence in ai_report.sentences:
        originals[sentence_key(sentence.section, sentence.text)].append(sentence)
    sentences: list[GroundedSentence] = []
    backlinks: dict[int, list[int]] = {index: [] for index in candidates}
    for number, read in enumerate(current.sentences):
        key = sentence_key(read.section, read.text)
        original = originals[key].popleft() if originals.get(key) else None
        if original is not None:
            source = original
            links = tuple(index for index in original.findings if index not in rejected
                          and 0 <= index < len(ai_findings))
        else:
            source = read
            links = tuple(candidates[position] for position in read.findings)
        status: Literal["grounded", "text_only", "statement"] = (
            "statement" if source.polarity != "positive" else "grounded" if links else "text_only")
        for index in links:
            backlinks[index].append(number)
        sentences.append(GroundedSentence(
            index=number, section=read.section, text=read.text, polarity=source.polarity,
            labels=tuple(source.labels), laterality=source.laterality, site=source.site, findings=links,
            status=status, origin="ai" if original is not None else "radiologist", accepted=key in accepted,
            position=sum(s.section == read.section for s in sentences)))
    return GroundedDraft(sentences, backlinks, rejected)


def final_structure(grounded: GroundedDraft, findings: Sequence[Finding], kept: Sequence[int]
                    ) -> tuple[list[ReportSentence], list[Finding], Consistency]:
    """The signed result's sentences and findings: *findings* are the signed ones (accepted, relabelled), the
    draft's findings *kept* (their indices, in order); links are renumbered to them."""
    position = {index: number for number, index in enumerate(kept)}
    sentences = [ReportSentence(section=s.section, text=s.text, polarity=s.polarity,  # type: ignore[arg-type]
                                labels=list(s.labels), laterality=s.laterality,  # type: ignore[arg-type]
                                site=s.site, findings=[position[i] for i in s.findings if i in position],
                                status=s.status)
                 for s in grounded.sentences]
    sentences = [s.model_copy(update={"status": "text_only"}) if s.status == "grounded" and not s.findings else s
                 for s in sentences]
    backlinks: list[list[int]] = [[] for _ in kept]
    for number, sentence in enumerate(sentences):
        for index in sentence.findings:
            backlinks[index].append(number)
    linked = [finding.model_copy(update={"sentences": backlinks[number],
                                         "status": "grounded" if backlinks[number] else "box_only"})
              for number, finding in enumerate(findings)]
    consistency = Consistency(grounded=sum(s.status == "grounded" for s in sentences),
                              text_only=sum(s.status == "text_only" for s in sentences),
                              box_only=sum(f.status == "box_only" for f in linked))
    return sentences, linked, consistency


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) in *text* of each sentence :func:`model.sentences.split_sentences` finds, in order."""
    spans: list[tuple[int, int]] = []
    position = 0
    for sentence in split_sentences(text):
        start = text.find(sentence, position)
        if start < 0:  # split_sentences returns stripped slices of text: this cannot happen
            raise ValueError("sentence not found in its text")
        spans.append((start, start + len(sentence)))
        position = start + len(sentence)
    return spans


def replace_sentence(text: str, number: int, replacement: str) -> str:
    """*text* with its sentence *number* (0-based, of :func:`sentence_spans`) replaced by *replacement*; an empty
    *replacement* removes it with the white space after it (or before it, for the last one)."""
    spans = sentence_spans(text)
    if not 0 <= number < len(spans):
        raise IndexError(f"sentence {number + 1} does not exist: the text has {len(spans)}")
    start, end = spans[number]
    if replacement:
        return text[:start] + replacement + text[end:]
    if number + 1 < len(spans):
        end = spans[number + 1][0]
    elif number > 0:
        start = spans[number - 1][1]
    return (text[:start] + text[end:]).strip()
