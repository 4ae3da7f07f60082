"""The training-only patch supervision and warm starts: targets from truth boxes, masked loss, never saved."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from train_helpers import TINY

from model.examples import make_example, prepare_phantom
from model.minigpt import MiniGPTMed
from model.patch_probe import PROBE_LABELS, PatchProbe, patch_boxes, patch_targets
from model.phantoms import generate_study, study_rng
from model.prompts import GridBox
from model.training import TrainConfig, new_model, train

CONFIG = TrainConfig(steps=2, batch_size=4, studies_per_step=2, lr=2e-3, warmup_steps=1, checkpoint_every=2,
                     log_every=1, tokenizer_studies=8, seed=5)


def grid_of(targets: torch.Tensor, label: str, grid: int) -> torch.Tensor:
    return targets.reshape(grid, grid, len(PROBE_LABELS))[..., PROBE_LABELS.index(label)]


def test_a_box_smaller_than_a_patch_marks_the_patch_of_its_centre():
    targets = patch_targets([("nodule", GridBox(10, 10, 13, 13))], 16)  # patches are 6.25 grid units wide
    assert grid_of(targets, "nodule", 16).nonzero().tolist() == [[1, 1]]
    assert targets.sum() == 1


def test_a_large_box_marks_the_patches_it_covers_by_a_quarter():
    targets = patch_targets([("pleural effusion", GridBox(50, 60, 100, 100))], 16)
    marked = grid_of(targets, "pleural effusion", 16)
    # rows: 60/6.25 = 9.6 → row 9 is 40 % covered; columns 8..15 fully
    assert marked[9:, 8:].all() and marked.sum() == 7 * 8
    assert grid_of(targets, "nodule", 16).sum() == 0


def test_an_unknown_region_label_is_an_error():
    with pytest.raises(ValueError, match="'fracture' must be one of"):
        patch_targets([("fracture", GridBox(1, 1, 5, 5))], 16)


def test_the_loss_reads_only_images_with_known_regions():
    torch.manual_seed(0)
    probe = PatchProbe(8)
    patches = torch.randn(3, 16, 8)
    regions = [None, [("nodule", GridBox(0, 0, 30, 30))], None]
    with torch.no_grad():
        alone = probe.loss(patches[1:2], regions[1:2], 4)
        assert float(probe.loss(patches, regions, 4)) == pytest.approx(float(alone))
        assert float(probe.loss(patches, [None, None, None], 4)) == 0.0
    with pytest.raises(ValueError, match="got 16 patch tokens, expected 9"):
        probe.loss(patches, regions, 3)


def test_examples_carry_the_boxes_of_their_image_and_none_for_a_montage():
    rng = np.random.default_rng(3)
    for modality in ("CR", "CT", "MR"):
        study = prepare_phantom(generate_study(study_rng(11, 0), modality), 56)
        assert study.view_shows_boxes == (modality != "MR")  # a radiograph, a CT projection; an MR montage
        for task in ("report", "vqa", "grounding", "detection"):
            example = make_example(rng, study, task)
            if task in ("report", "vqa") and not study.view_shows_boxes:
                assert example.regions is None  # tiles: no per-patch truth
                continue
            assert example.regions is not None
            assert {r[0] for r in example.regions} <= {f.label for f in study.findings}


def test_a_run_starts_from_the_weights_of_init_from_and_never_saves_the_probe(tmp_path):
    torch.manual_seed(1)
    start = new_model(CONFIG, TINY)
    start.save_pretrained(tmp_path / "start")
    warm = new_model(dataclasses.replace(CONFIG, init_from=str(tmp_path / "start")), TINY)
    for name, tensor in start.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name
    with pytest.raises(ValueError, match="holds model 'raddraft-tiny', not 'raddraft-small'"):
        new_model(dataclasses.replace(CONFIG, init_from=str(tmp_path / "start")))

    summary = train(dataclasses.replace(CONFIG, init_from=str(tmp_path / "start")), tmp_path / "run",
                    model_config=TINY, progress=False)
    trained = MiniGPTMed.load(summary.final_dir).state_dict()
    assert not any("probe" in name for name in trained)
    assert trained.keys() == start.state_dict().keys()
    assert any(not torch.equal(trained[n], start.state_dict()[n]) for n in trained)
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer.pt", weights_only=True)
    assert set(state["probe"]) == {"head.weight", "head.bias", "box.weight", "box.bias"}


def test_each_patch_a_box_covers_gets_the_smallest_box_covering_it():
    big, small = GridBox(0, 0, 50, 50), GridBox(10, 10, 13, 13)
    boxes, marked = patch_boxes([("consolidation", big), ("nodule", small)], 16)
    boxes, marked = boxes.reshape(16, 16, 4), marked.reshape(16, 16)
    assert marked[:8, :8].all() and marked.sum() == 64
    assert boxes[1, 1].tolist() == pytest.approx([0.10, 0.10, 0.13, 0.13])
    assert boxes[5, 5].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5])


def test_positive_patches_weigh_as_much_as_all_negative_ones():
    torch.manual_seed(0)
    probe = PatchProbe(8)
    torch.nn.init.zeros_(probe.head.weight)
    torch.nn.init.zeros_(probe.box.weight)
    torch.nn.init.zeros_(probe.head.bias)
    torch.nn.init.zeros_(probe.box.bias)
    regions = [[("nodule", GridBox(0, 0, 20, 20))]]  # one patch of 16
    with torch.no_grad():
        loss = probe.loss(torch.randn(1, 16, 8), regions, 4)
    # every logit 0: BCE log 2 on positives and negatives alike; box 0.5 everywhere vs (0, 0, 0.2, 0.2): L1 0.4
    assert float(loss) == pytest.approx(math.log(2) + 0.4, rel=1e-5)


def test_probe_weight_zero_trains_without_the_probe(tmp_path):
    summary = train(dataclasses.replace(CONFIG, probe_weight=0.0), tmp_path / "run", model_config=TINY,
                    progress=False)
    assert summary.steps_done == CONFIG.steps
    assert "probe" not in torch.load(tmp_path / "run" / "checkpoint" / "trainer.pt", weights_only=True)
