"""The training loop on a tiny config: the loss falls on a fixed batch; resume continues with identical state."""

import argparse
import json

import pytest
import torch
from train_helpers import TINY

from model import training
from model.minigpt import MiniGPTMed
from model.phantoms import generate_study
from model.training import (
    CHECKPOINT_DIR,
    TrainConfig,
    balanced_loss,
    batch_for_step,
    lr_factor,
    make_optimizer,
    new_model,
    stack_images,
    train,
)
from raddraft.commands.train import modality_mix

CONFIG = TrainConfig(steps=4, batch_size=4, studies_per_step=2, lr=2e-3, warmup_steps=1, checkpoint_every=2,
                     log_every=1, tokenizer_studies=8, seed=5)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model = new_model(CONFIG, TINY)
    model.train()
    examples = batch_for_step(CONFIG, 0, TINY.vision.image_size)
    images = stack_images(examples)
    instructions, answers = [e.instruction for e in examples], [e.answer for e in examples]
    optimizer = make_optimizer(model, CONFIG)
    losses = []
    for _ in range(25):
        loss = balanced_loss(model, images, instructions, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_balanced_loss_weights_examples_equally():
    model = new_model(CONFIG, TINY).eval()
    examples = batch_for_step(CONFIG, 0, TINY.vision.image_size)[:2]
    with torch.no_grad():
        both = balanced_loss(model, stack_images(examples), [e.instruction for e in examples],
                             [e.answer for e in examples])
        each = [balanced_loss(model, stack_images([e]), [e.instruction], [e.answer]) for e in examples]
    assert float(both) == pytest.approx(float(sum(each) / 2), rel=1e-4)


def test_batches_depend_only_on_seed_and_step():
    a = batch_for_step(CONFIG, 3, 56)
    b = batch_for_step(CONFIG, 3, 56)
    assert [(e.instruction, e.answer) for e in a] == [(e.instruction, e.answer) for e in b]
    assert all((x.image == y.image).all() for x, y in zip(a, b, strict=True))
    assert [e.answer for e in batch_for_step(CONFIG, 4, 56)] != [e.answer for e in a]


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(55, config) == pytest.approx(0.55)
    assert lr_factor(100, config) == pytest.approx(0.1)


def test_resume_continues_from_the_same_step_with_identical_state(tmp_path):
    whole = train(CONFIG, tmp_path / "whole", model_config=TINY, progress=False)
    assert whole.steps_done == 4

    split = tmp_path / "split"
    first = train(CONFIG, split, model_config=TINY, progress=False, stop_after=2)
    assert first.steps_done == 2
    assert torch.load(split / CHECKPOINT_DIR / "trainer.pt", weights_only=True)["step"] == 2
    assert not (split / "final").exists()
    with pytest.raises(FileExistsError, match="resume"):
        train(CONFIG, split, model_config=TINY, progress=False)
    second = train(CONFIG, split, model_config=TINY, progress=False, resume=True)
    assert second.steps_done == 4

    a = MiniGPTMed.load(whole.final_dir).state_dict()
    b = MiniGPTMed.load(second.final_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (split / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    whole_losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "loss.jsonl").read_text().splitlines()]
    split_losses = [json.loads(line)["loss"] for line in (split / "loss.jsonl").read_text().splitlines()]
    assert whole_losses == split_losses


def test_resume_refuses_changed_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(CONFIG, tmp_path / "none", model_config=TINY, progress=False, resume=True)
    train(CONFIG, tmp_path / "run", model_config=TINY, progress=False, stop_after=1)
    changed = TrainConfig(**{**CONFIG.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"\['lr'\] differ .*only steps may change"):
        train(changed, tmp_path / "run", model_config=TINY, progress=False, resume=True)


def test_resume_may_change_the_total_steps(tmp_path):
    train(CONFIG, tmp_path / "run", model_config=TINY, progress=False, stop_after=2)
    longer = TrainConfig(**{**CONFIG.__dict__, "steps": 5})
    summary = train(longer, tmp_path / "run", model_config=TINY, progress=False, resume=True)
    assert summary.steps_done == 5 and (tmp_path / "run" / "final").is_dir()
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 5


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size 0 must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"modality_weights \[1.0, 1.0\] must be 4 non-negative weights"):
        TrainConfig(modality_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="not all zero"):
        TrainConfig(modality_weights=(0.0, 0.0, 0.0, 0.0))


def test_the_modality_mix_decides_which_studies_a_step_draws(monkeypatch):
    drawn: list[str] = []

    def recording(rng, modality):
        drawn.append(modality)
        return generate_study(rng, modality)

    monkeypatch.setattr(training, "generate_study", recording)
    only_ct = TrainConfig(**{**CONFIG.__dict__, "modality_weights": (0.0, 0.0, 1.0, 0.0)})
    for step in range(4):
        batch_for_step(only_ct, step, 56)
    assert drawn == ["CT"] * 8
    drawn.clear()
    for step in range(6):
        batch_for_step(CONFIG, step, 56)
    assert len(set(drawn)) > 1


def test_a_stored_config_without_a_mix_reads_as_the_default_mix():
    stored = CONFIG.to_dict()
    assert stored["modality_weights"] == [0.3, 0.3, 0.2, 0.2]
    del stored["modality_weights"]
    assert TrainConfig.from_dict(stored) == CONFIG
    assert TrainConfig.from_dict(TrainConfig(modality_weights=(1, 0, 0, 1)).to_dict()).modality_weights == (1, 0, 0, 1)


def test_cli_modality_mix_parses_names_and_rejects_bad_ones():
    assert modality_mix("ct=0.3, CR=0.3,DX=0.3,MR=0.1") == (0.3, 0.3, 0.3, 0.1)
    for text, message in (("CR=1,DX=1,CT=1", "lacks MR"), ("CR=1,CR=1,DX=1,CT=1,MR=1", "once each"),
                          ("US=1", "must be MODALITY=WEIGHT"), ("CR=x,DX=1,CT=1,MR=1", "'x' of CR is not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            modality_mix(text)
