"""The published architecture's sizes (built on the meta device) and strict loading of its weight files.

The loading tests write tiny files with the REAL key names and shape rules (eva_vit_g.pth with a 16×16
position embedding made at 224, an HF Llama folder with a tokenizer, a checkpoint_stage3.pth with peft-0.2 LoRA
names) and load them through ``MiniGPTMed.from_minigpt_med`` with a config override for the tiny sizes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from model.config import MINIGPT_MED, MiniGPTConfig
from model.eva_vit import EvaViT, interpolate_pos_embed
from model.minigpt import MiniGPTMed
from model.tokenizer import build_tokenizer
from model.weights import WeightsError, minigpt_checkpoint_keys

EVA_G_PARAMS_448 = 986_975_872  # patch 829,312 + cls 1,408 + pos 1,025×1,408 + 39 blocks × 25,248,768
LLAMA2_7B_PARAMS = 6_738_415_616
LORA_R64_QV_PARAMS = 33_554_432  # 32 layers × 2 modules × (64×4096 + 4096×64)
LLAMA_PROJ_PARAMS = 5632 * 4096 + 4096


def _count(named: list[tuple[str, torch.nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in named)


def test_real_preset_builds_on_meta_with_published_sizes() -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = MiniGPTMed(MINIGPT_MED, build_tokenizer())
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"building on meta took {elapsed:.1f} s"

    assert _count(list(model.visual_encoder.named_parameters())) == EVA_G_PARAMS_448
    llm = list(model.llama_model.named_parameters())
    assert _count([(n, p) for n, p in llm if "lora_" not in n]) == LLAMA2_7B_PARAMS
    lora = [(n, p) for n, p in llm if "lora_" in n]
    assert _count(lora) == LORA_R64_QV_PARAMS
    assert _count(list(model.llama_proj.named_parameters())) == LLAMA_PROJ_PARAMS
    assert model.config.image_tokens == 256 and model.config.projector_in == 5632
    assert model.visual_encoder.pos_embed.shape == (1, 1 + 32 * 32, 1408)
    assert model.visual_encoder.blocks[0].mlp.fc1.out_features == 6144
    assert model.visual_encoder.pos_embed.dtype == torch.float16
    assert model.llm.model.embed_tokens.weight.dtype == torch.float16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == minigpt_checkpoint_keys(model)  # what MiniGPT-Med trains is what its checkpoint holds
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LORA_R64_QV_PARAMS + LLAMA_PROJ_PARAMS


def test_eva_state_dict_layout_matches_eva_vit_g() -> None:
    cfg = MINIGPT_MED.vision
    with torch.device("meta"):
        names = set(EvaViT(cfg).state_dict())
    block = {
        "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias",
    }  # fmt: skip
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {f"blocks.{i}.{name}" for i in range(39) for name in block}
    assert names == expected


def test_interpolate_pos_embed_keeps_cls_and_resizes_grid() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    out = interpolate_pos_embed(pos, 32)
    assert out.shape == (1, 1 + 32 * 32, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert interpolate_pos_embed(pos, 16) is pos
    constant = torch.ones(1, 1 + 4, 3)
    assert torch.allclose(interpolate_pos_embed(constant, 7), torch.ones(1, 1 + 49, 3))
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 15, 8), 4)


# ---------------------------------------------------------------- tiny files with the real layout

TINY: MiniGPTConfig = MINIGPT_MED.replace(
    vision={"width": 16, "depth": 2, "heads": 2},  # 448 px, patch 14: a 32×32 grid, pos_embed from 16×16
    llm={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "vocab_size": 512,
         "dtype": "float32"},
)  # fmt: skip


def _legacy_lora_key(layer: int, module: str, ab: str) -> str:
    return f"llama_model.base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("minigpt_files")
    vision, llm, r = TINY.vision, TINY.llm, TINY.lora.r
    # eva_vit_g.pth: a flat state dict made at 224 px (16×16 grid)
    with torch.device("meta"):
        layout = EvaViT(vision).state_dict()
    eva = {name: torch.randn(t.shape) for name, t in layout.items()}
    eva["pos_embed"] = torch.randn(1, 1 + 16 * 16, vision.width)
    torch.save(eva, root / "eva_vit_g.pth")
    # the HF Llama folder with its tokenizer
    llama = LlamaForCausalLM(llm.to_hf())
    llama.save_pretrained(root / "llama")
    build_tokenizer(vocab_size=llm.vocab_size).save_pretrained(root / "llama")
    # checkpoint_stage3.pth: llama_proj + LoRA (peft 0.2 names), as MiniGPT-Med saved it
    trained = {"llama_proj.weight": torch.randn(llm.hidden_size, TINY.projector_in), "llama_proj.bias": torch.randn(64)}
    for layer in range(llm.num_layers):
        for module in TINY.lora.target_modules:
            trained[_legacy_lora_key(layer, module, "A")] = torch.randn(r, llm.hidden_size)
            trained[_legacy_lora_key(layer, module, "B")] = torch.randn(llm.hidden_size, r)
    torch.save({"model": trained, "optimizer": None, "epoch": 3}, root / "checkpoint_stage3.pth")
    return {
        "root": root,
        "eva": root / "eva_vit_g.pth",
        "llama": root / "llama",
        "stage3": root / "checkpoint_stage3.pth",
    }


def _load(files: dict[str, Path], **paths: Path) -> MiniGPTMed:
    chosen = {"eva": files["eva"], "llama": files["llama"], "stage3": files["stage3"], **paths}
    return MiniGPTMed.from_minigpt_med(chosen["llama"], chosen["eva"], chosen["stage3"], config=TINY)


def test_loading_maps_every_tensor(files: dict[str, Path]) -> None:
    model = _load(files)
    eva = torch.load(files["eva"], weights_only=True)
    stage3 = torch.load(files["stage3"], weights_only=True)["model"]
    llama = load_file(files["llama"] / "model.safetensors")
    enc = model.visual_encoder
    assert enc.pos_embed.dtype == torch.float16  # the real preset's vision precision
    assert enc.pos_embed.shape == (1, 1 + 32 * 32, 16)
    assert torch.equal(enc.pos_embed.float(), interpolate_pos_embed(eva["pos_embed"], 32).half().float())
    for name, tensor in eva.items():
        if name != "pos_embed":
            assert torch.equal(enc.state_dict()[name], tensor.half()), name
    own = model.state_dict()
    for key, tensor in stage3.items():
        assert torch.equal(own[key.replace(".weight", ".default.weight") if "lora_" in key else key], tensor), key
    base = model.llm.state_dict()
    for key, tensor in llama.items():
        name = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(base[name], tensor), key
    assert torch.equal(model.ln_vision.weight, torch.ones(16))  # MiniGPT-v2's ln_vision is frozen at its init
    # it runs: 448-px images → 256 image tokens → text
    out = model.generate_ids(torch.randn(1, 3, 448, 448), ["[detection] nodule"], max_new_tokens=3)
    assert len(out) == 1 and len(out[0]) <= 3


def test_current_peft_names_are_accepted(files: dict[str, Path], tmp_path: Path) -> None:
    stage3 = torch.load(files["stage3"], weights_only=True)["model"]
    renamed = {k.replace(".weight", ".default.weight") if "lora_" in k else k: v for k, v in stage3.items()}
    torch.save({"model": renamed}, tmp_path / "stage3.pth")
    model = _load(files, stage3=tmp_path / "stage3.pth")
    assert torch.equal(model.state_dict()[next(k for k in renamed if "lora_B" in k)], next(
        v for k, v in renamed.items() if "lora_B" in k))  # fmt: skip


def test_missing_eva_tensor_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    eva = torch.load(files["eva"], weights_only=True)
    del eva["blocks.1.attn.q_bias"]
    torch.save(eva, tmp_path / "eva.pth")
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) blocks\.1\.attn\.q_bias"):
        _load(files, eva=tmp_path / "eva.pth")


def test_extra_eva_tensor_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    eva = torch.load(files["eva"], weights_only=True)
    eva["norm.weight"] = torch.ones(16)  # a final norm MiniGPT's encoder does not have
    torch.save(eva, tmp_path / "eva.pth")
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) norm\.weight"):
        _load(files, eva=tmp_path / "eva.pth")


def test_wrong_shape_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    raw = torch.load(files["stage3"], weights_only=True)
    key = _legacy_lora_key(1, "v_proj", "A")
    raw["model"][key] = torch.randn(8, 64)
    torch.save(raw, tmp_path / "stage3.pth")
    pattern = rf"tensor llama_model\.\S+layers\.1\.self_attn\.v_proj\.lora_A\.default\.weight \(stored as {key}\) "
    with pytest.raises(WeightsError, match=pattern + r"has shape \(8, 64\), the model expects \(64, 64\)"):
        _load(files, stage3=tmp_path / "stage3.pth")


def test_missing_and_extra_checkpoint_tensors_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    raw = torch.load(files["stage3"], weights_only=True)
    del raw["model"]["llama_proj.bias"]
    torch.save(raw, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) llama_proj\.bias"):
        _load(files, stage3=tmp_path / "missing.pth")
    raw = torch.load(files["stage3"], weights_only=True)
    raw["model"]["llama_model.base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(64, 64)
    torch.save(raw, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) \S+layers\.0\.self_attn\.k_proj\.lora_A"):
        _load(files, stage3=tmp_path / "extra.pth")
    torch.save({"state": raw["model"]}, tmp_path / "nomodel.pth")
    with pytest.raises(WeightsError, match="must be a dict with key 'model'"):
        _load(files, stage3=tmp_path / "nomodel.pth")


def test_missing_llama_tensor_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    folder.mkdir()
    for item in files["llama"].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"missing keys: model\.layers\.1\.mlp\.down_proj\.weight"):
        _load(files, llama=folder)


def test_llama_size_mismatch_is_named(files: dict[str, Path]) -> None:
    config = TINY.replace(llm={"intermediate_size": 256})
    with pytest.raises(
        WeightsError, match=r"intermediate_size is 128, the model config expects llm\.intermediate_size = 256"
    ):
        MiniGPTMed.from_minigpt_med(files["llama"], files["eva"], files["stage3"], config=config)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {"x": Path("/etc")}}, tmp_path / "evil.pth")  # a pickled class, not tensors
    with pytest.raises(WeightsError, match="weights_only=True"):
        MiniGPTMed.from_minigpt_med(tmp_path, tmp_path / "evil.pth", None, config=TINY)
