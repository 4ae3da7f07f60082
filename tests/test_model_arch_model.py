"""The small preset end to end on CPU: shapes, greedy decoding with a KV cache, left-padded batches,
the training loss, a short overfit, save/load, and the local tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from model.config import RADDRAFT_SMALL, get_preset
from model.minigpt import IGNORE_INDEX, MiniGPTMed
from model.prompts import BOX_GRID
from model.tokenizer import BOX_TOKENS, build_tokenizer

INSTRUCTIONS = ["Describe this image in detail", "[detection] pleural effusion in the left lung"]


@pytest.fixture(scope="module")
def model() -> MiniGPTMed:
    """The small preset with its LLM weights drawn wider than at init, so attention is sharp.

    At the default init (std 0.02) attention is almost uniform, and greedy output barely depends on positions
    or padding; sharp attention makes the decoding tests sensitive to position ids, masks and the cache.
    """
    torch.manual_seed(0)
    model = MiniGPTMed.from_preset("raddraft-small").eval()
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and "lora_" not in name:
                param.normal_(0.0, 0.12)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def test_shapes_through_the_small_model(model: MiniGPTMed, images: torch.Tensor) -> None:
    cfg = RADDRAFT_SMALL
    assert cfg.image_tokens == 64 and cfg.projector_in == 4 * 192
    with torch.no_grad():
        feats = model.visual_encoder(images)
        tokens = model.encode_images(images)
        embeds, mask, labels = model.embed_prompts(images, INSTRUCTIONS, ["clear lungs", "<p>effusion</p>"])
    assert feats.shape == (2, 1 + 256, 192)
    assert tokens.shape == (2, 64, 256)
    assert embeds.shape[:2] == mask.shape == labels.shape and embeds.shape[2] == 256
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == embeds.shape[1]  # the shorter prompt is padded on the left
    assert mask[0, : embeds.shape[1] - lengths[0]].sum() == 0
    answer = model.tokenizer("clear lungs", add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]
    assert labels[0][labels[0] != IGNORE_INDEX].tolist() == answer
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 224, 224\)"):
        model.encode_images(torch.zeros(1, 3, 448, 448))
    with pytest.raises(ValueError, match="got 2 images but 1 instructions"):
        model.embed_prompts(images, INSTRUCTIONS[:1])


def test_image_tokens_join_four_consecutive_patches(model: MiniGPTMed, images: torch.Tensor) -> None:
    with torch.no_grad():
        feats = model.ln_vision(model.visual_encoder(images))[:, 1:]  # (B, 256, C)
        tokens = model.encode_images(images)
        w = model.llama_proj.weight  # (D, 4C)
        c = feats.shape[-1]
        # image token 5 is patches 20..23 (row-major) side by side
        manual = sum(feats[:, 20 + j] @ w[:, j * c : (j + 1) * c].T for j in range(4)) + model.llama_proj.bias
    assert torch.allclose(tokens[:, 5], manual, atol=1e-5)


def _reference_greedy(model: MiniGPTMed, image: torch.Tensor, instruction: str, steps: int) -> list[int]:
    """Argmax step by step, recomputing the whole sequence each step (no cache, no padding)."""
    embeds, _, _ = model.embed_prompts(image[None], [instruction])
    table = model.llm.get_input_embeddings()
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([embeds, table(torch.tensor([ids], dtype=torch.long))], dim=1) if ids else embeds
            logits = model.llm(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], dtype=torch.long)).logits
            token = int(logits[0, -1].argmax())
            if token == model.tokenizer.eos_token_id:
                break
            ids.append(token)
    return ids


def test_generate_is_greedy_argmax_step_by_step(model: MiniGPTMed, images: torch.Tensor) -> None:
    got = model.generate_ids(images[:1], INSTRUCTIONS[:1], max_new_tokens=12)[0]
    assert got == _reference_greedy(model, images[0], INSTRUCTIONS[0], 12)
    assert len(set(got)) > 1  # not a degenerate comparison of one repeated token


def test_min_new_tokens_holds_back_eos(model: MiniGPTMed, images: torch.Tensor) -> None:
    eos = model.tokenizer.eos_token_id
    model.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.llm.vocab_size))
    try:
        with torch.no_grad():
            model.llm.lm_head.bias[eos] = 1e4  # EOS is every step's argmax
        assert model.generate_ids(images[:1], INSTRUCTIONS[:1], max_new_tokens=6) == [[]]
        held = model.generate_ids(images, INSTRUCTIONS, max_new_tokens=6, min_new_tokens=4)
        assert [len(row) for row in held] == [4, 4] and all(eos not in row for row in held)
        assert [len(r) for r in model.generate_ids(images, INSTRUCTIONS, max_new_tokens=5, min_new_tokens=5)] == [5, 5]
    finally:
        model.llm.lm_head.bias = None
    with pytest.raises(ValueError, match=r"min_new_tokens 7 must be in \[0, max_new_tokens 6\]"):
        model.generate_ids(images[:1], INSTRUCTIONS[:1], max_new_tokens=6, min_new_tokens=7)


def test_batch_with_different_prompt_lengths_equals_one_by_one(model: MiniGPTMed, images: torch.Tensor) -> None:
    model.train()
    batch = model.generate_ids(images, INSTRUCTIONS, max_new_tokens=20)  # decodes in eval mode (no dropout)
    assert model.training
    model.eval()
    single = [model.generate_ids(images[i : i + 1], [INSTRUCTIONS[i]], max_new_tokens=20)[0] for i in range(2)]
    assert batch == single
    assert model.generate(images, INSTRUCTIONS, max_new_tokens=20) == [
        model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in single
    ]
    with pytest.raises(ValueError, match=r"exceeds llm\.max_position_embeddings 1024"):
        model.generate_ids(images[:1], INSTRUCTIONS[:1], max_new_tokens=2000)


def test_batched_loss_is_the_token_weighted_mean_of_single_losses(model: MiniGPTMed, images: torch.Tensor) -> None:
    answers = ["the lungs are clear", "<p>pleural effusion</p> {<10><50><45><90>}"]
    with torch.no_grad():
        batch = model.training_loss(images, INSTRUCTIONS, answers)
        parts = []
        for i in range(2):
            _, _, labels = model.embed_prompts(images[i : i + 1], [INSTRUCTIONS[i]], [answers[i]])
            count = int((labels != IGNORE_INDEX).sum())  # every answer token (EOS included) is predicted
            parts.append((model.training_loss(images[i : i + 1], [INSTRUCTIONS[i]], [answers[i]]), count))
    expected = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert torch.isfinite(batch)
    assert torch.allclose(batch, expected, atol=1e-5)


def test_training_overfits_one_example_and_greedy_reproduces_it(images: torch.Tensor) -> None:
    torch.manual_seed(2)
    model = MiniGPTMed.from_preset("raddraft-small").train()
    answer = "<p>nodule</p> {<12><30><40><66>}"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    start = time.perf_counter()
    for _ in range(40):
        loss = model.training_loss(images[:1], ["[detection] nodule"], [answer])
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    assert loss.item() < 0.3, f"loss after 40 steps: {loss.item():.3f} ({time.perf_counter() - start:.1f} s)"
    model.eval()
    assert model.generate(images[:1], ["[detection] nodule"], max_new_tokens=30) == [answer]


def test_freezing_follows_the_preset() -> None:
    small = MiniGPTMed.from_preset("raddraft-small")
    assert all(p.requires_grad for p in small.parameters())  # the embedded model is trained from scratch
    frozen_cfg = get_preset("raddraft-small").replace(vision={"frozen": True}, llm={"frozen": True})
    frozen = MiniGPTMed(frozen_cfg, small.tokenizer)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("llama_proj.") or ".lora_" in n for n in trainable)
    assert {"llama_proj.weight", "llama_proj.bias"} <= trainable


def test_save_and_load_round_trip(model: MiniGPTMed, images: torch.Tensor, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "small")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "small").iterdir()}
    loaded = MiniGPTMed.load(tmp_path / "small").eval()
    assert loaded.config == model.config
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    assert all(torch.equal(t, original[k]) for k, t in loaded.state_dict().items())
    text = "<p>nodule</p> {<12><30><40><66>} Ünïcode ✓"
    assert loaded.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]
    assert loaded.generate_ids(images, INSTRUCTIONS, 8) == model.generate_ids(images, INSTRUCTIONS, 8)


def test_load_rejects_a_bad_folder(model: MiniGPTMed, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        MiniGPTMed.load(tmp_path)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"format": "raddraft-minigpt", "format_version": 7}')
    with pytest.raises(ValueError, match="format_version 7 is not 1"):
        MiniGPTMed.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        MiniGPTMed.load(tmp_path / "m")


def test_tokenizer_is_local_deterministic_and_keeps_markers() -> None:
    texts = ["Small left pleural effusion.", "No pneumothorax. <p>nodule</p> {<1><2><3><4>}"] * 3
    a, b = build_tokenizer(texts, vocab_size=600), build_tokenizer(texts, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 600
    for token in (*BOX_TOKENS, "<p>", "</p>", "<delim>", "[INST]", "[/INST]", "<Img>", "</Img>", "<ImageHere>"):
        assert len(a(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert len(BOX_TOKENS) == BOX_GRID + 1
    assert [a.convert_ids_to_tokens(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    text = "<p>mass</p> {<0><5><100><99>}<delim>{<3><4><5><6>} — never seen: Ωμέγα 42 °C"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.unk_token_id not in ids
    assert a.decode(ids, skip_special_tokens=True) == text
    assert a.decode(a("[INST] hi [/INST]")["input_ids"], skip_special_tokens=True) == " hi "
    with pytest.raises(ValueError, match="vocab_size 300 must be at least"):
        build_tokenizer(texts, vocab_size=300)


def test_presets() -> None:
    with pytest.raises(
        ValueError, match=r"unknown model preset 'gpt-5'; known presets: \['minigpt-med', 'raddraft-small'\]"
    ):
        get_preset("gpt-5")
    with pytest.raises(ValueError, match="needs the Llama-2 tokenizer"):
        MiniGPTMed.from_preset("minigpt-med")
    cfg = get_preset("raddraft-small")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        type(cfg).from_dict({**cfg.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="image_size 230 must be a multiple of patch_size 14"):
        cfg.replace(vision={"image_size": 230})
