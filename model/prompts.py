"""MiniGPT-Med prompts, box text and a tolerant parser of the model's grounded answers.

Prompt (Llama-2 chat, as MiniGPT-v2/MiniGPT-Med): ``<s>[INST] <Img><ImageHere></Img> {instruction} [/INST]``;
``<ImageHere>`` is where the projected image tokens go. Instructions use the task identifiers of MiniGPT-Med's
datasets; report generation has none. Boxes are integers on a 0–100 grid of the (resized) model image:
``{<x1><y1><x2><y2>}``; a phrase is ``<p>label</p>``; several boxes of one phrase are joined by ``<delim>``:
``<p>nodule</p> {<12><30><40><66>}<delim>{<55><28><80><70>}``.

The parser never raises on model text: it returns what it can read and a list of what it dropped and why, and
the answer's words without markup (:func:`strip_markup`, also what the report text goes through).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

BOX_GRID = 100
BOS = "<s>"
IMAGE_PLACEHOLDER = "<ImageHere>"
PROMPT_TEMPLATE = "[INST] {} [/INST]"
IMAGE_SEGMENT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"

# MiniGPT-Med's MIMIC-CXR report instruction (first of its pool; the evaluation picks from the same pool).
REPORT_INSTRUCTION = "Describe this image in detail"
GROUNDING_INSTRUCTION = "[grounding] describe this image in detail"
TASKS = ("report", "detection", "refer", "identify", "grounding", "vqa")  # what the model is taught to do

# The model's vocabulary: the labels it is taught per modality family, and those that have a side.
RADIOGRAPH_LABELS = ("nodule", "mass", "pleural effusion", "pneumothorax", "consolidation", "cardiomegaly")
CT_LABELS = ("nodule",)
MR_LABELS = ("tumor", "edema")
LATERAL_LABELS = frozenset({"nodule", "mass", "pleural effusion", "pneumothorax", "consolidation", "tumor", "edema"})


@dataclass(frozen=True)
class GridBox:
    """A box on the 0–100 grid: (x1, y1) top-left, (x2, y2) bottom-right, x1 < x2 and y1 < y2."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= BOX_GRID:
                raise ValueError(f"box {name}={value!r} must be an integer in 0..{BOX_GRID}")
        if self.x1 >= self.x2 or self.y1 >= self.y2:
            raise ValueError(f"box {self.as_tuple()} must have x1 < x2 and y1 < y2")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x1, self.y1, self.x2, self.y2)

    def text(self) -> str:
        return "{" + "".join(f"<{v}>" for v in self.as_tuple()) + "}"

    def to_fractions(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) as fractions of the model image's width and height."""
        return (self.x1 / BOX_GRID, self.y1 / BOX_GRID, self.x2 / BOX_GRID, self.y2 / BOX_GRID)

    @classmethod
    def from_fractions(cls, x1: float, y1: float, x2: float, y2: float) -> GridBox:
        """Quantize fractions of the model image to the grid (outwards, so the box still covers the region)."""
        for name, value in (("x1", x1), ("y1", y1), ("x2", x2), ("y2", y2)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"box fraction {name}={value!r} must be in 0..1")
        lo = [min(BOX_GRID - 1, int(v * BOX_GRID)) for v in (x1, y1)]
        hi = [min(BOX_GRID, math.ceil(v * BOX_GRID)) for v in (x2, y2)]
        return cls(lo[0], lo[1], max(hi[0], lo[0] + 1), max(hi[1], lo[1] + 1))


def build_prompt(instruction: str) -> str:
    """``<s>[INST] <Img><ImageHere></Img> {instruction} [/INST]``."""
    instruction = instruction.strip()
    if not instruction:
        raise ValueError("instruction must not be empty")
    if IMAGE_PLACEHOLDER in instruction:
        raise ValueError(f"instruction must not contain {IMAGE_PLACEHOLDER!r}: the prompt adds it once")
    return BOS + PROMPT_TEMPLATE.format(f"{IMAGE_SEGMENT} {instruction}")


def report_instruction() -> str:
    return REPORT_INSTRUCTION


def detection_instruction(label: str) -> str:
    return f"[detection] {_phrase(label)}"


def refer_instruction(phrase: str) -> str:
    """MiniGPT-Med's wording, space before the question mark included: ``[refer] where is tumor ?``."""
    return f"[refer] where is {_phrase(phrase)} ?"


def identify_instruction(box: GridBox) -> str:
    """MiniGPT-Med's wording: ``[identify] what is it in {<x1><y1><x2><y2>}``."""
    return f"[identify] what is it in {box.text()}"


def grounding_instruction() -> str:
    return GROUNDING_INSTRUCTION


def vqa_instruction(question: str) -> str:
    return f"[vqa] {_phrase(question)}"


def format_grounded(label: str, boxes: list[GridBox]) -> str:
    """``<p>label</p> {box}<delim>{box}`` — the answer format of [detection] and [refer]."""
    if not boxes:
        raise ValueError(f"phrase {label!r} needs at least one box")
    return f"<p>{_phrase(label)}</p> " + "<delim>".join(b.text() for b in boxes)


def _phrase(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise ValueError("phrase must not be empty")
    for marker in ("<p>", "</p>", "<delim>", "{", "}"):
        if marker in text:
            raise ValueError(f"phrase {text!r} must not contain {marker!r}")
    return text


# ---------------------------------------------------------------- text without markup

# Model markup, removed in this order by strip_markup.
_PROMPT_TOKENS = re.compile(r"</?s>|\[/?INST\]|</?Img>|<ImageHere>|<unk>|<pad>", re.IGNORECASE)
_TASK_IDENTIFIER = re.compile(r"\[/?[A-Za-z_]{1,30}\]")  # [grounding], [refer], [detection], [vqa] …
_PHRASE_TAGS = re.compile(r"</?p\s*>|<delim>", re.IGNORECASE)
_BOX = re.compile(r"\{[\s<>\d.,\-]*\}?")  # {<54><41><75><60>}, a truncated {<54><41, an empty {}
_COORDINATE = re.compile(r"<\s*-?\d+(?:\.\d*)?\s*>")  # a coordinate outside braces: <54>
_TRUNCATED_COORDINATE = re.compile(r"<\s*-?\d*(?:\.\d*)?\s*$")  # the answer stopped inside one: …<5
_TAG = re.compile(r"</?[A-Za-z][\w-]{0,30}\s*/?>")  # any other tag-like token: <unk>, </s>, <br/>
_BRACES = re.compile(r"[{}]")  # braces left around words ({left edema}): the words stay
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([.,;:!?])")


def strip_markup(text: str) -> str:
    """Model text as a reader should see it: model markup removed, the words of its phrases kept.

    ``There is <p>left edema</p>{<54><41><75><60>}.`` → ``There is left edema.``. Removed: box text (well-formed,
    truncated ``{<54><41>``, several per phrase joined by ``<delim>``, coordinates outside braces), the
    ``<p>``/``</p>`` tags (their words stay, also when nested or unclosed), task identifiers (``[grounding]``),
    prompt tokens (``<Img>``, ``<ImageHere>``, ``[INST]``, ``</s>``) and any other tag-like token; braces left
    around words go, the words stay. Runs of whitespace become one space, and no space is left before
    punctuation. Text without markup only has its whitespace folded. Never raises.
    """
    cleaned = _PROMPT_TOKENS.sub(" ", text)
    cleaned = _TASK_IDENTIFIER.sub(" ", cleaned)
    cleaned = _PHRASE_TAGS.sub(" ", cleaned)
    cleaned = _BOX.sub(" ", cleaned)
    cleaned = _COORDINATE.sub(" ", cleaned)
    cleaned = _TRUNCATED_COORDINATE.sub(" ", cleaned)
    cleaned = _TAG.sub(" ", cleaned)
    cleaned = _BRACES.sub(" ", cleaned)
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(cleaned.split()))


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class GroundedPhrase:
    phrase: str | None  # None for boxes with no <p>…</p> before them
    boxes: tuple[GridBox, ...]


@dataclass(frozen=True)
class Dropped:
    fragment: str
    reason: str


@dataclass
class ParsedAnswer:
    phrases: list[GroundedPhrase] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repairs that kept a box (clamped, rounded, unclosed)
    text: str = ""  # the answer without markup, phrases kept as words (strip_markup)

    @property
    def boxes(self) -> list[GridBox]:
        return [b for p in self.phrases for b in p.boxes]


_TOKEN = re.compile(r"<p>|</p>|<delim>|\{|\}|<(-?\d{1,6}(?:\.\d{1,6})?)>")
_MAX_FRAGMENT = 80


class _Parser:
    def __init__(self) -> None:
        self.out = ParsedAnswer()
        self.phrase: str | None = None
        self.phrase_boxes: list[GridBox] = []
        self.open_phrase: list[str] | None = None  # text collected since <p>
        self.numbers: list[str] | None = None  # numbers collected since {
        self.loose: list[str] = []  # numbers seen outside braces

    def drop(self, fragment: str, reason: str) -> None:
        self.out.dropped.append(Dropped(fragment[:_MAX_FRAGMENT], reason))

    def text(self, chunk: str) -> None:
        if not chunk.strip():
            return
        self.flush_loose()
        if self.numbers is not None:
            self.close_box(closed=False)
        if self.open_phrase is not None:
            self.open_phrase.append(chunk)

    def start_phrase(self) -> None:
        self.flush_loose()
        if self.numbers is not None:
            self.close_box(closed=False)
        if self.open_phrase is not None:
            self.drop("<p>" + "".join(self.open_phrase), "phrase opened with <p> but not closed before the next <p>")
        self.finish_phrase()
        self.open_phrase = []

    def end_phrase(self) -> None:
        if self.open_phrase is None:
            self.drop("</p>", "</p> without a matching <p>")
            return
        words = " ".join("".join(self.open_phrase).split())
        self.open_phrase = None
        self.finish_phrase()
        if not words:
            self.drop("<p></p>", "empty phrase")
            return
        self.phrase = words

    def finish_phrase(self) -> None:
        if self.phrase_boxes:
            self.out.phrases.append(GroundedPhrase(self.phrase, tuple(self.phrase_boxes)))
        elif self.phrase is not None:
            self.drop(f"<p>{self.phrase}</p>", "phrase has no box")
        self.phrase, self.phrase_boxes = None, []

    def implicit_phrase_close(self) -> None:
        """A box right after an unclosed <p>: take the text so far as the phrase."""
        if self.open_phrase is not None:
            self.out.notes.append("phrase opened with <p> was closed implicitly by a box")
            self.end_phrase()

    def open_box(self) -> None:
        self.flush_loose()
        if self.numbers is not None:
            self.close_box(closed=False)
        self.implicit_phrase_close()
        self.numbers = []

    def number(self, value: str) -> None:
        if self.numbers is None:
            self.loose.append(value)
            if len(self.loose) == 4:
                self.implicit_phrase_close()
                self.out.notes.append("box written without braces")
                self.add_box(self.loose, "<" + "><".join(self.loose) + ">")
                self.loose = []
        else:
            self.numbers.append(value)

    def flush_loose(self) -> None:
        if self.loose:
            self.drop("<" + "><".join(self.loose) + ">", f"{len(self.loose)} coordinate(s) outside a box")
            self.loose = []

    def close_box(self, closed: bool = True) -> None:
        if self.numbers is None:
            self.drop("}", "} without a matching {")
            return
        numbers, self.numbers = self.numbers, None
        fragment = "{" + "".join(f"<{n}>" for n in numbers) + ("}" if closed else "")
        if len(numbers) != 4:
            self.drop(fragment, f"a box needs 4 coordinates, found {len(numbers)}")
            return
        if not closed:
            self.out.notes.append(f"box {fragment} was not closed with }}")
        self.add_box(numbers, fragment)

    def add_box(self, numbers: list[str], fragment: str) -> None:
        values: list[int] = []
        for raw in numbers:
            value = float(raw)
            if value != int(value):
                self.out.notes.append(f"coordinate {raw} in {fragment} rounded to an integer")
            clamped = min(BOX_GRID, max(0, round(value)))
            if clamped != round(value):
                self.out.notes.append(f"coordinate {raw} in {fragment} clamped to {clamped}")
            values.append(clamped)
        x1, y1, x2, y2 = values
        if x1 >= x2 or y1 >= y2:
            self.drop(fragment, f"degenerate box: needs x1 < x2 and y1 < y2, got {tuple(values)}")
            return
        self.phrase_boxes.append(GridBox(x1, y1, x2, y2))

    def delim(self) -> None:
        self.flush_loose()
        if self.numbers is not None:
            self.close_box(closed=False)

    def finish(self) -> ParsedAnswer:
        self.flush_loose()
        if self.numbers is not None:
            self.close_box(closed=False)
        if self.open_phrase is not None:
            self.drop("<p>" + "".join(self.open_phrase), "phrase opened with <p> but never closed")
            self.open_phrase = None
        self.finish_phrase()
        return self.out


def parse_grounded(text: str) -> ParsedAnswer:
    """Read phrases and boxes from model text; never raises (for any ``str``)."""
    parser = _Parser()
    position = 0
    for match in _TOKEN.finditer(text):
        parser.text(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if match.group(1) is not None:
            parser.number(match.group(1))
        elif token == "<p>":
            parser.start_phrase()
        elif token == "</p>":
            parser.end_phrase()
        elif token == "<delim>":
            parser.delim()
        elif token == "{":
            parser.open_box()
        else:
            parser.close_box()
    parser.text(text[position:])
    parsed = parser.finish()
    parsed.text = strip_markup(text)
    return parsed
