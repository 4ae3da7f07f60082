"""MiniGPT-Med prompt and box formats, and the parser of model answers (never raises on any text)."""

from __future__ import annotations

import random
import re

import pytest

from model.prompts import (
    BOX_GRID,
    GridBox,
    build_prompt,
    detection_instruction,
    format_grounded,
    grounding_instruction,
    identify_instruction,
    parse_grounded,
    refer_instruction,
    report_instruction,
    vqa_instruction,
)


def test_prompt_format_is_exactly_minigpt_med() -> None:
    assert build_prompt("Describe this image in detail") == (
        "<s>[INST] <Img><ImageHere></Img> Describe this image in detail [/INST]"
    )
    assert report_instruction() == "Describe this image in detail"
    assert detection_instruction("pneumonia") == "[detection] pneumonia"
    assert refer_instruction("tumor") == "[refer] where is tumor ?"
    assert identify_instruction(GridBox(12, 30, 40, 66)) == "[identify] what is it in {<12><30><40><66>}"
    assert grounding_instruction() == "[grounding] describe this image in detail"
    assert vqa_instruction("  is there a  pneumothorax? ") == "[vqa] is there a pneumothorax?"
    assert (
        build_prompt(detection_instruction("nodule")) == "<s>[INST] <Img><ImageHere></Img> [detection] nodule [/INST]"
    )
    with pytest.raises(ValueError, match="must not contain '<ImageHere>'"):
        build_prompt("look <ImageHere>")
    with pytest.raises(ValueError, match="instruction must not be empty"):
        build_prompt("  ")
    with pytest.raises(ValueError, match="must not contain '<p>'"):
        detection_instruction("<p>x")


def test_box_text_and_grounded_answer_format() -> None:
    boxes = [GridBox(12, 30, 40, 66), GridBox(55, 28, 80, 70)]
    assert boxes[0].text() == "{<12><30><40><66>}"
    assert format_grounded("nodule", boxes) == "<p>nodule</p> {<12><30><40><66>}<delim>{<55><28><80><70>}"
    with pytest.raises(ValueError, match=r"box x2=101 must be an integer in 0\.\.100"):
        GridBox(0, 0, 101, 5)
    with pytest.raises(ValueError, match=r"must have x1 < x2 and y1 < y2"):
        GridBox(40, 0, 40, 5)
    with pytest.raises(ValueError, match="needs at least one box"):
        format_grounded("nodule", [])
    assert GridBox.from_fractions(0.123, 0.3, 0.401, 0.66) == GridBox(12, 30, 41, 66)
    assert GridBox.from_fractions(1.0, 0.0, 1.0, 0.001) == GridBox(99, 0, 100, 1)
    assert GridBox(25, 50, 75, 100).to_fractions() == (0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError, match=r"box fraction x2=1\.5 must be in 0\.\.1"):
        GridBox.from_fractions(0, 0, 1.5, 1)


def test_parse_well_formed_answers() -> None:
    text = format_grounded("nodule", [GridBox(12, 30, 40, 66), GridBox(55, 28, 80, 70)])
    parsed = parse_grounded(text)
    assert [(p.phrase, [b.as_tuple() for b in p.boxes]) for p in parsed.phrases] == [
        ("nodule", [(12, 30, 40, 66), (55, 28, 80, 70)])
    ]
    assert parsed.dropped == [] and parsed.notes == [] and parsed.text == "nodule"

    caption = "<p>Cardiomegaly</p> {<20><40><80><85>} with <p>left pleural effusion</p> {<5><60><40><95>} noted."
    parsed = parse_grounded(caption)
    assert [p.phrase for p in parsed.phrases] == ["Cardiomegaly", "left pleural effusion"]
    assert parsed.text == "Cardiomegaly with left pleural effusion noted."
    assert parsed.dropped == []

    two_classes = "<p>pneumonia</p> {<1><2><30><40>} <p>nodule</p> {<50><50><60><60>}<delim>{<70><10><90><30>}"
    assert [len(p.boxes) for p in parse_grounded(two_classes).phrases] == [1, 2]

    bare = parse_grounded("{<0><0><100><100>}")  # a [refer] answer without a phrase
    assert bare.phrases[0].phrase is None and bare.boxes == [GridBox(0, 0, 100, 100)]

    plain = parse_grounded("The lungs are clear. No pneumothorax.")
    assert plain.phrases == [] and plain.dropped == [] and plain.text == "The lungs are clear. No pneumothorax."


@pytest.mark.parametrize(
    ("text", "boxes", "reason"),
    [
        ("<p>nodule</p> {<12><30><40>}", [], "a box needs 4 coordinates, found 3"),
        ("<p>nodule</p> {<12><30><40><66><70>}", [], "a box needs 4 coordinates, found 5"),
        ("<p>nodule</p> {<40><30><12><66>}", [], r"degenerate box: needs x1 < x2 and y1 < y2, got \(40, 30, 12, 66\)"),
        ("<p>nodule</p> {<12><30><12><66>}", [], "degenerate box"),
        ("<p>nodule</p> {<12><130><40><166>}", [], r"degenerate box.*\(12, 100, 40, 100\)"),
        ("<p>nodule</p>", [], "phrase has no box"),
        ("<p></p> {<1><2><3><4>}", [(1, 2, 3, 4)], "empty phrase"),
        ("nodule</p> {<1><2><3><4>}", [(1, 2, 3, 4)], "</p> without a matching <p>"),
        ("<p>nodule</p> <1><2> and more", [], r"2 coordinate\(s\) outside a box"),
        ("<p>nodule</p> {<1><2><3><4>}}", [(1, 2, 3, 4)], "} without a matching {"),
        ("<p>nodule <p>mass</p> {<1><2><3><4>}", [(1, 2, 3, 4)], "not closed before the next <p>"),
        ("<p>nodule {<1><2><3><4>} and <p>mass", [(1, 2, 3, 4)], "never closed"),
    ],
)
def test_parse_malformed_answers_keeps_what_it_can(text: str, boxes: list[tuple[int, ...]], reason: str) -> None:
    parsed = parse_grounded(text)
    assert [b.as_tuple() for b in parsed.boxes] == boxes
    assert any(re.search(reason, d.reason) for d in parsed.dropped), parsed.dropped


def test_parse_repairs_are_noted() -> None:
    parsed = parse_grounded("<p>mass</p> {<-3><10><104><50>} and {<1><2><3><4> and <p>x</p> <5><6><7><8>")
    assert [b.as_tuple() for b in parsed.boxes] == [(0, 10, 100, 50), (1, 2, 3, 4), (5, 6, 7, 8)]
    assert [p.phrase for p in parsed.phrases] == ["mass", "x"]
    joined = " | ".join(parsed.notes)
    assert "coordinate -3" in joined and "clamped to 0" in joined and "coordinate 104" in joined
    assert "was not closed with }" in joined and "box written without braces" in joined
    rounded = parse_grounded("<p>a</p> {<1.6><2><3><4>}")
    assert rounded.boxes == [GridBox(2, 2, 3, 4)] and "rounded" in rounded.notes[0]
    implicit = parse_grounded("<p>nodule {<1><2><3><4>}")
    assert implicit.phrases[0].phrase == "nodule" and "closed implicitly" in implicit.notes[0]


def test_parser_never_raises_on_random_garbage() -> None:
    rng = random.Random(1234)
    pieces = ["<p>", "</p>", "<delim>", "{", "}", "<", ">", "<12>", "<-5>", "<105>", "<3.5>", "<99999999>",
              "<1e5>", "nodule", " ", "\n", "Ω", "\x00", "[INST]", "<ImageHere>", "</s>", "<0>", "<100>", "{{",
              "}}", "<<1>>", "<p", "/p>", ",", "1", "-"]  # fmt: skip
    total_boxes = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        parsed = parse_grounded(text)
        for box in parsed.boxes:
            assert 0 <= box.x1 < box.x2 <= BOX_GRID and 0 <= box.y1 < box.y2 <= BOX_GRID
        total_boxes += len(parsed.boxes)
        assert all(d.reason and len(d.fragment) <= 80 for d in parsed.dropped)
    assert total_boxes > 0  # the garbage did contain readable boxes sometimes
    for _ in range(500):
        raw = "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 60)))
        parse_grounded(raw)
    assert parse_grounded("").phrases == []
    assert len(parse_grounded("{<1><2><3><4>}" * 2000).boxes) == 2000
