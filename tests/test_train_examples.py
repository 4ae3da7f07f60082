"""Training examples: every task, well-formed answers, box text that parses back to the truth grid box."""

from dataclasses import replace

import numpy as np
import pytest

from model import prompts
from model.examples import (
    NO_BOX_ANSWER,
    NORMAL_GROUNDING,
    grid_box,
    make_example,
    prepare_phantom,
    sample_examples,
)
from model.imaging import Letterbox, overview, prepare_display, study_view
from model.phantom_sections import SECTION_MIN_RADIUS_PX
from model.phantoms import generate_studies, generate_study, study_rng
from model.prompts import TASKS

SIZE = 224


def _studies(count=12, seed=3):
    return [prepare_phantom(s, SIZE) for s in generate_studies(seed, count)]


def test_sampling_covers_every_task_with_valid_shapes():
    rng = np.random.default_rng(0)
    examples = [e for s in _studies() for e in sample_examples(rng, s, 12)]
    assert {e.task for e in examples} == set(TASKS)
    for e in examples:
        assert e.image.shape == (3, SIZE, SIZE) and e.image.dtype == np.float32
        assert e.answer.strip() and e.instruction.strip()
        prompts.build_prompt(e.instruction)  # raises on a malformed instruction


def test_box_answers_parse_back_to_the_truth_grid_boxes():
    rng = np.random.default_rng(1)
    checked = 0
    for study in _studies(20):
        for finding in study.findings:
            here = [f for f in study.findings if f.image_index == finding.image_index]
            grounding = make_example(rng, _only(study, finding.image_index), "grounding")
            parsed = prompts.parse_grounded(grounding.answer)
            assert not parsed.dropped
            assert {(p.phrase, b) for p in parsed.phrases for b in p.boxes} == {(f.label, f.box) for f in here}
            for _ in range(5):
                refer = make_example(rng, _only(study, finding.image_index), "refer")
                parsed = prompts.parse_grounded(refer.answer)
                target = refer.instruction.removeprefix("[refer] where is ").removesuffix(" ?")
                assert parsed.phrases[0].phrase == target
                assert set(parsed.boxes) == {f.box for f in here if f.phrase == target}
            checked += 1
    assert checked >= 10


def _only(study, index):
    """The study reduced to one image so that box tasks are asked about that image."""
    return replace(study, images=[study.images[index]],
                   findings=[replace(f, image_index=0) for f in study.findings if f.image_index == index])


def test_identify_and_detection_answers():
    rng = np.random.default_rng(2)
    study = next(s for s in _studies(20) if s.modality in ("CR", "DX") and len(s.findings) == 1)
    finding = study.findings[0]
    identify = make_example(rng, study, "identify")
    assert identify.instruction == prompts.identify_instruction(finding.box)
    assert identify.answer == finding.phrase
    seen = {make_example(rng, study, "detection").answer for _ in range(40)}
    assert NO_BOX_ANSWER in seen
    assert prompts.format_grounded(finding.label, [finding.box]) in seen


def test_normal_image_grounding_and_report_vqa():
    rng = np.random.default_rng(4)
    normal = next(s for s in _studies(30) if not s.findings)
    assert make_example(rng, normal, "grounding").answer == NORMAL_GROUNDING
    report = make_example(rng, normal, "report")
    assert report.answer.startswith("FINDINGS:") and "IMPRESSION:" in report.answer
    vqa = make_example(rng, normal, "vqa")
    assert vqa.answer in {q["answer"].lower() for q in normal.qa}


def test_grid_box_covers_the_drawn_region():
    study = generate_study(study_rng(11, 0), "CR")
    prepared = prepare_phantom(study, SIZE)
    transform = Letterbox(int(study.datasets[0].Rows), int(study.datasets[0].Columns), SIZE)
    for truth, grid in zip(study.findings, prepared.findings, strict=True):
        back = transform.grid_to_source(grid.box.as_tuple())
        x1, y1, x2, y2 = truth.box
        slack = max(transform.source_rows, transform.source_cols) / 100  # one grid unit
        assert abs(back[0] - x1) <= slack and abs(back[1] - y1) <= slack
        assert abs(back[2] - x2) <= slack and abs(back[3] - y2) <= slack


def test_tiny_box_is_widened_not_degenerate():
    transform = Letterbox(512, 512, SIZE)
    box = grid_box(transform, (100.0, 100.0, 100.5, 100.5))
    assert box.x2 == box.x1 + 1 and box.y2 == box.y1 + 1


def test_overview_tiles_every_slice():
    displays = [np.full((64, 64), v, dtype=np.float32) for v in (0.2, 0.4, 0.6, 0.8, 1.0)]
    pixels = overview(displays, 90)
    assert pixels.shape == (3, 90, 90)
    gray = pixels[0] * 0.26862954 + 0.48145466  # undo CLIP normalisation of channel 0
    tile = 90 // 3
    top = (90 - 2 * tile) // 2
    for i, v in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        r, c = divmod(i, 3)
        centre = gray[top + r * tile + tile // 2, c * tile + tile // 2]
        assert centre == pytest.approx(v, abs=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        overview([], 90)


def test_every_visible_section_of_a_lesion_is_taught_on_its_own_slice():
    """A CT nodule or MR tumour crosses several slices; each slice's box tasks name what that slice shows, so
    a lesion seen on a neighbour of its truth slice is never taught as "no abnormality"."""
    rng = np.random.default_rng(5)
    checked = 0
    for modality in ("CT", "MR"):
        for study in generate_studies(21, 8, modality):
            sections = study.rendering.sections
            assert set(study.rendering.findings) <= set(sections)  # the truth is the largest section
            for truth in study.rendering.findings:
                slices = sorted(f.image_index for f in sections if f.label == truth.label and f.site == truth.site
                                and f.laterality == truth.laterality)
                assert truth.image_index in slices
            prepared = prepare_phantom(study, SIZE)
            for index in {f.image_index for f in sections} - {f.image_index for f in study.rendering.findings}:
                answer = make_example(rng, _only(prepared, index), "grounding").answer
                assert answer != NORMAL_GROUNDING  # the neighbour slice shows the lesion
                checked += 1
    assert checked >= 5


def test_sections_keep_only_visible_slices():
    for modality, label in (("CT", "nodule"), ("MR", "tumor")):
        for study in generate_studies(22, 6, modality):
            for section in study.rendering.sections:
                if section.label == label and section not in study.rendering.findings:
                    x1, _, x2, _ = section.box
                    assert x2 - x1 + 1 >= 2 * SECTION_MIN_RADIUS_PX - 1  # a sliver of a sphere is never taught


def test_study_view_projects_ct_slices_and_tiles_mr_slices():
    def slices(spots):
        images = []
        for row, col in spots:
            display = np.zeros((64, 64), dtype=np.float32)
            if row is not None:
                display[row - 2:row + 2, col - 2:col + 2] = 1.0
            images.append(prepare_display(display, 64))
        return images

    ct = study_view(slices([(10, 10), (None, None), (40, 50)]), "CT", 64)
    gray = ct[0] * 0.26862954 + 0.48145466  # undo CLIP normalisation of channel 0
    assert gray[10, 10] == pytest.approx(1.0, abs=1e-4) and gray[40, 50] == pytest.approx(1.0, abs=1e-4)
    assert gray[30, 30] == pytest.approx(0.0, abs=1e-4)  # the projection of three slices, full size
    mr = study_view(slices([(10, 10), (None, None), (40, 50)]), "MR", 64)
    assert not np.array_equal(mr, ct)  # a montage of tiles
    np.testing.assert_array_equal(mr, overview([p.display for p in slices([(10, 10), (None, None), (40, 50)])], 64))
    one = slices([(10, 10)])
    np.testing.assert_array_equal(study_view(one, "CT", 64), one[0].pixels)
    mixed = [prepare_display(np.zeros((64, 64), np.float32), 64), prepare_display(np.zeros((32, 64), np.float32), 64)]
    np.testing.assert_array_equal(study_view(mixed, "CT", 64), overview([p.display for p in mixed], 64))
    with pytest.raises(ValueError, match="at least one image"):
        study_view([], "CT", 64)
