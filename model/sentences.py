"""A report's sentences and what each one states: polarity, finding labels, laterality and site.

The grounding of a draft (issue 19) links each *positive* sentence with the boxes that support it; this module
is the text half of it: it cuts FINDINGS and IMPRESSION into sentences and reads each with a deliberately
simple, conservative rule set (NegEx-like, not a language model):

* a **finding cue** is a word or phrase of the label vocabulary (:data:`LABEL_CUES`: "nodule", "nodular
  opacity", "pleural effusion", "blunting of the costophrenic angle", "enlarged heart" …) or any other finding
  word (:data:`_FINDING_WORDS`: "fracture", "atelectasis" …, whose label is then the word itself, so the code
  table's fallback keeps it);
* a cue is **negated** when a negation cue ("no", "not", "without", "negative for", "free of" …) stands before
  it in the same clause (clauses end at sentence punctuation and at "but", "however", "with", "there is" …),
  unless a pseudo-negation keeps the finding ("no change in …", "cannot be excluded");
* a sentence is ``positive`` when it holds a cue that is not negated, ``negative`` when all its cues are
  negated, ``normal`` when it has no cue but normal phrasing ("unremarkable", "within normal limits", "the
  lungs are clear"), and ``neutral`` otherwise (recommendations, technique: "Follow-up CT is recommended").

Every doubt answers "positive": a sentence wrongly read as stating a finding is flagged as not localized for
the radiologist to look at, while one wrongly read as negative would hide a statement without evidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from core.result import DraftReport, Laterality

Section = Literal["findings", "impression"]
Polarity = Literal["positive", "negative", "normal", "neutral"]

# label -> the words and phrases that state it. A label is the model's vocabulary (core/result.py
# Finding.label, reporting/codes.py FINDING_CODES); the longest cue is matched first so "pleural effusion"
# is not also read as "effusion", and "pulmonary oedema" not as "oedema".
LABEL_CUES: dict[str, tuple[str, ...]] = {
    "nodule": (r"nodul(?:e|es|ar\s+opacit(?:y|ies))", r"pulmonary\s+nodules?"),
    "mass": (r"mass(?:es)?", r"space[-\s]occupying\s+lesions?"),
    "tumor": (r"tumou?rs?", r"neoplasms?", r"gliomas?"),
    "pleural effusion": (r"pleural\s+effusions?", r"effusions?", r"blunting\s+of\s+the\s+(?:\w+\s+)?"
                         r"costophrenic\s+angles?", r"meniscus"),
    "pneumothorax": (r"pneumothora(?:x|ces)", r"visceral\s+pleural\s+line", r"pleural\s+line"),
    "consolidation": (r"consolidations?", r"consolidated", r"airspace\s+opacit(?:y|ies)", r"air[-\s]space\s+disease"),
    "cardiomegaly": (r"cardiomegaly", r"(?:heart|cardiac\s+silhouette)\s+(?:is\s+|appears\s+)?(?:mildly\s+|"
                     r"moderately\s+|markedly\s+)?enlarged", r"enlarged\s+(?:heart|cardiac\s+silhouette)"),
    "pulmonary edema": (r"pulmonary\s+o?edema",),
    "edema": (r"o?edema", r"flair\s+hyperintensity"),
}
# labels a box of another label may support: a "mass" sentence is grounded by a "tumor" box, and so on
COMPATIBLE_LABELS: dict[str, frozenset[str]] = {
    **{label: frozenset({"nodule", "mass", "tumor"}) for label in ("nodule", "mass", "tumor")},
    **{label: frozenset({"edema", "pulmonary edema"}) for label in ("edema", "pulmonary edema")},
    "pneumonia": frozenset({"consolidation"}),  # an interpretation whose image evidence is the consolidation
}
# a positive sentence naming only these words ("lesion", "opacity") states a finding whose label the
# vocabulary cannot tell; a box of a focal finding (FOCAL_LABELS) supports it, a box of edema or an effusion not
FOCAL_LABELS = frozenset({"nodule", "mass", "tumor", "consolidation"})
UNSPECIFIC_WORDS = frozenset({"lesion", "lesions", "opacity", "opacities", "density", "densities", "abnormality"})

_CUE = re.compile("|".join(f"(?P<c{i}>\\b(?:{'|'.join(cues)})\\b)" for i, cues in enumerate(LABEL_CUES.values())),
                  re.IGNORECASE)
_CUE_LABELS = list(LABEL_CUES)
_FINDING_WORDS = re.compile(
    r"\b(?:effusion|pneumothora|consolidat|opacit|infiltrat|atelecta|o?edema|cardiomegal|enlarge|nodul|mass"
    r"|tumou?r|lesion|pneumoni|fractur|emphysem|fibros|scar|thicken|calcif|granulom|hernia|collapse|congesti"
    r"|widen|blunt|abnormal|adenopath|metasta|ha?emorrhag|bleed|infarct|obstruct|dilat|pneumoperitone"
    r"|aneurysm|dissection|embol|thromb|cyst|stenos|deformit|haziness|density|densities|free\s+air"
    r"|hydrocephal|midline\s+shift)\w*",
    re.IGNORECASE)
_NORMAL_PHRASES = re.compile(
    r"\bno\s+(?:acute|active)\b|\bno\s+(?:\w+\s+){0,2}abnormalit(?:y|ies)\b|\bnormal\b|\bunremarkable\b"
    r"|\bwithin\s+normal\s+limits\b|\bclear\s+lungs?\b|\b(?:lungs?|pleural\s+spaces?)\s+(?:are|is)\s+(?:\w+\s+)?"
    r"clear\b",
    re.IGNORECASE)
_NEGATION_CUE = re.compile(r"\b(?:no|not|without|negative\s+for|free\s+of|absence\s+of|neither|nor)\b",
                           re.IGNORECASE)
# Look like negations but state or keep a finding: "no change in the effusion", "cannot be excluded".
_PSEUDO_NEGATION = re.compile(
    r"\bno\s+(?:\w+\s+)?(?:change|increase|decrease|improvement|worsening|resolution)\b"
    r"|\bnot\s+(?:be\s+)?(?:excluded?|ruled?\s+out|changed|improved|resolved|normal|clear)\b",
    re.IGNORECASE)
_CLAUSE_END = re.compile(
    r"[.;:!?\n]|\b(?:but|however|although|though|except|apart\s+from|aside\s+from|which|with|there\s+(?:is|are))\b",
    re.IGNORECASE)
# a sentence ends at . ! ? followed by white space and not inside a number ("0.55", "11.5 mm")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_LATERALITY = re.compile(r"\b(?P<bi>bilateral(?:ly)?|both)\b|\b(?P<side>right|left)\b", re.IGNORECASE)
_SITE = re.compile(
    r"\b(?:(?:upper|middle|lower)\s+(?:lobe|zone)|mid\s+zone|lingula|apex|apical|base|basal|hilum|hilar"
    r"|(?:frontal|parietal|temporal|occipital)\s+lobe|hemisphere|cerebellum|mediastinum|lung)\b",
    re.IGNORECASE)


@dataclass(frozen=True)
class StatedSentence:
    """One sentence of a report and what it states."""

    section: Section
    text: str
    polarity: Polarity
    labels: tuple[str, ...]  # positive labels, in order of appearance; empty unless polarity is positive
    negated: tuple[str, ...]  # labels the sentence denies ("No pleural effusion or pneumothorax.")
    laterality: Laterality | None = None
    site: str | None = None


def split_sentences(text: str) -> list[str]:
    """The sentences of *text*, stripped; a decimal point ("0.55") or an abbreviation-free line ends none."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


def _cues(clause: str) -> list[tuple[int, str]]:
    """(position, label) of every finding cue in *clause*: vocabulary labels, else the finding word itself."""
    found: list[tuple[int, str]] = []
    covered: list[tuple[int, int]] = []
    for match in _CUE.finditer(clause):
        group = next(name for name, value in match.groupdict().items() if value is not None)
        found.append((match.start(), _CUE_LABELS[int(group[1:])]))
        covered.append(match.span())
    for match in _FINDING_WORDS.finditer(clause):
        if any(start <= match.start() < end for start, end in covered):
            continue
        word = match.group(0).lower()
        found.append((match.start(), "" if word in UNSPECIFIC_WORDS or word.startswith(("enlarge", "abnormal",
                                                                                        "blunt", "widen"))
                      else re.sub(r"\s+", " ", word)))
    return sorted(found)


def _negated(clause: str, position: int) -> bool:
    return bool(_NEGATION_CUE.search(clause, 0, position)) and not _PSEUDO_NEGATION.search(clause)


def read_sentence(text: str, section: Section) -> StatedSentence:
    """What one sentence states (see the module docstring for the rule)."""
    positive: list[str] = []
    negated: list[str] = []
    stated_without_label = denied_without_label = False
    for clause in _CLAUSE_END.split(text):
        for position, label in _cues(clause):
            if _negated(clause, position):
                if not label:
                    denied_without_label = True
                elif label not in negated:
                    negated.append(label)
            elif label:
                if label not in positive:
                    positive.append(label)
            else:
                stated_without_label = True
    polarity: Polarity
    if positive or stated_without_label:
        polarity = "positive"
    elif negated or denied_without_label:
        polarity = "negative"
    elif _NORMAL_PHRASES.search(text):
        polarity = "normal"
    else:
        polarity = "neutral"
    return StatedSentence(section=section, text=text, polarity=polarity, labels=tuple(positive),
                          negated=tuple(label for label in negated if label not in positive),
                          laterality=laterality_in(text) if polarity == "positive" else None,
                          site=site_in(text) if polarity == "positive" else None)


def laterality_in(text: str) -> Laterality | None:
    """``bilateral`` for "bilateral"/"both" or both sides named, else the one side named, else None."""
    sides = set()
    for match in _LATERALITY.finditer(text):
        if match.group("bi"):
            return "bilateral"
        sides.add(match.group("side").lower())
    if len(sides) > 1:
        return "bilateral"
    return "right" if sides == {"right"} else "left" if sides == {"left"} else None


def site_in(text: str) -> str | None:
    """The first anatomical site named ("upper lobe", "apex", "temporal lobe"), normalized, or None."""
    match = _SITE.search(text)
    return re.sub(r"\s+", " ", match.group(0).lower()) if match else None


def read_report(report: DraftReport) -> list[StatedSentence]:
    """Every sentence of FINDINGS then IMPRESSION, read."""
    return [read_sentence(sentence, section)
            for section, text in (("findings", report.findings), ("impression", report.impression))
            for sentence in split_sentences(text)]


def supports(sentence_label: str, box_label: str) -> bool:
    """Whether a box labelled *box_label* is evidence for a sentence stating *sentence_label*."""
    sentence_label, box_label = sentence_label.lower(), box_label.lower()
    return box_label == sentence_label or box_label in COMPATIBLE_LABELS.get(sentence_label, frozenset())


def states_normal(report: DraftReport) -> bool:
    """True when the report says the study is normal: some normal phrasing and no sentence stating a finding."""
    sentences = read_report(report)
    return (any(s.polarity == "normal" or _NORMAL_PHRASES.search(s.text) for s in sentences)
            and not any(s.polarity == "positive" for s in sentences))
