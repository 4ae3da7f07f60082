"""Weight files of the model, read and written with every tensor mapped by name.

* the published model from local paths: an HF-format Llama-2 folder (with its tokenizer), ``eva_vit_g.pth``
  (a flat EVA state dict made at 224 px; position embeddings are interpolated to the configured grid) and
  MiniGPT-Med's ``checkpoint_stage3.pth`` (``{"model": {llama_proj.* and LoRA tensors}}``, saved with peft 0.2:
  ``…q_proj.lora_A.weight``, which current peft names ``…q_proj.lora_A.default.weight``);
* a raddraft model folder: ``config.json`` + ``model.safetensors`` + tokenizer files.

A missing or unexpected tensor, or a shape mismatch, is a :class:`WeightsError` naming the tensor and the file.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.jsonio import write_atomic
from model.config import LLMConfig, MiniGPTConfig, VisionConfig
from model.eva_vit import interpolate_pos_embed

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FOLDER_FORMAT = "raddraft-minigpt"
FOLDER_FORMAT_VERSION = 1

_LEGACY_LORA = re.compile(r"\.(lora_[AB])\.weight$")  # peft 0.2 names, without the adapter name
_TRAINED_BY_MINIGPT = re.compile(r"^llama_proj\.(weight|bias)$|\.lora_[AB]\.")


class WeightsError(ValueError):
    """A weights file does not match the model: names the tensor (or setting) and the file."""


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} … ({len(keys)} in all)"


def assign_state_dict(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    source: str,
    *,
    expected: set[str] | None = None,
    stored_as: Mapping[str, str] | None = None,
) -> None:
    """Copy *tensors* into *module* by name, cast to the module's dtypes.

    *expected* (default: every key of ``module.state_dict()``) is exactly the set of names *tensors* must have.
    *stored_as* maps a name to the key the file used, when they differ (for error messages).
    Modules on the ``meta`` device get the tensors assigned instead of copied.
    """
    stored_as = stored_as or {}

    def label(name: str) -> str:
        return f"{name} (stored as {stored_as[name]})" if name in stored_as else name

    own = module.state_dict(keep_vars=True)
    expected = set(own) if expected is None else expected
    if not expected <= set(own):
        raise ValueError(f"expected tensors {_names(sorted(expected - set(own)))} are not in the model")
    unexpected = [label(name) for name in sorted(set(tensors) - expected)]
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor(s) {_names(unexpected)}")
    missing = sorted(expected - set(tensors))
    if missing:
        raise WeightsError(f"{source}: missing tensor(s) {_names(missing)}")
    for name in sorted(tensors):
        got, want = tuple(tensors[name].shape), tuple(own[name].shape)
        if got != want:
            raise WeightsError(f"{source}: tensor {label(name)} has shape {got}, the model expects {want}")
        if own[name].is_floating_point() and not tensors[name].is_floating_point():
            dtype = tensors[name].dtype
            raise WeightsError(f"{source}: tensor {label(name)} has dtype {dtype}, expected floating point")
    converted = {name: tensor.to(own[name].dtype) for name, tensor in tensors.items()}
    on_meta = any(own[name].is_meta for name in converted)
    # A checkpoint may hold only part of a module (MiniGPT-Med's holds the projection and LoRA tensors): the
    # expected/unexpected/shape checks above are the strict check for that part, and the result is checked below.
    result = module.load_state_dict(converted, strict=False, assign=on_meta)
    left = sorted(set(result.missing_keys) & expected) + sorted(result.unexpected_keys)
    if left:
        raise WeightsError(f"{source}: tensors {_names(left)} were not loaded")
    logger.debug("loaded %d tensors from %s", len(converted), source)


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise WeightsError(f"{path} is not a torch checkpoint loadable with weights_only=True: {exc}") from exc


def _tensor_mapping(value: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(value, Mapping):
        raise WeightsError(f"{what} must be a mapping of names to tensors, got {type(value).__name__}")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            raise WeightsError(f"{what} entry {key!r} must map a name to a tensor, got {type(tensor).__name__}")
    return dict(value)


def read_eva_checkpoint(path: Path, vision: VisionConfig) -> dict[str, Tensor]:
    """The EVA state dict of ``eva_vit_g.pth`` with ``pos_embed`` interpolated to the configured grid."""
    tensors = _tensor_mapping(_torch_load(path), str(path))
    if "pos_embed" in tensors:
        try:
            tensors["pos_embed"] = interpolate_pos_embed(tensors["pos_embed"], vision.grid)
        except ValueError as exc:
            raise WeightsError(f"{path}: tensor pos_embed: {exc}") from exc
    return tensors


def read_minigpt_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``checkpoint["model"]`` of a MiniGPT checkpoint with peft 0.2 LoRA names mapped to current peft names.

    Returns the tensors by model name and, for renamed ones, the key the file used.
    """
    raw = _torch_load(path)
    if not isinstance(raw, Mapping) or "model" not in raw:
        raise WeightsError(f"{path} must be a dict with key 'model' holding the trained tensors")
    tensors: dict[str, Tensor] = {}
    stored_as: dict[str, str] = {}
    for key, tensor in _tensor_mapping(raw["model"], f"{path} ['model']").items():
        name = key if ".default." in key else _LEGACY_LORA.sub(r".\1.default.weight", key)
        if name in tensors:
            raise WeightsError(f"{path}: tensor {key} is given twice (with and without the adapter name)")
        tensors[name] = tensor
        if name != key:
            stored_as[name] = key
    return tensors, stored_as


def minigpt_checkpoint_keys(model: nn.Module) -> set[str]:
    """Names a MiniGPT-Med stage checkpoint holds: ``llama_proj.*`` and every LoRA tensor."""
    return {name for name in model.state_dict() if _TRAINED_BY_MINIGPT.search(name)}


def load_llama(folder: Path, llm: LLMConfig) -> LlamaForCausalLM:
    """An HF-format Llama folder, strictly: every checkpoint tensor used, none missing, sizes as configured."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an HF model folder: config.json is missing")
    model, info = LlamaForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, llm.dtype), local_files_only=True, output_loading_info=True
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        problems = sorted(str(p) for p in info.get(kind) or ())
        if problems:
            raise WeightsError(f"{folder}: {kind.replace('_', ' ')}: {_names(problems)}")
    hf = model.config
    for ours, theirs in (
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_hidden_layers"),
        ("num_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
        ("vocab_size", "vocab_size"),
    ):
        if getattr(llm, ours) != getattr(hf, theirs):
            raise WeightsError(
                f"{folder}/config.json: {theirs} is {getattr(hf, theirs)}, the model config expects "
                f"llm.{ours} = {getattr(llm, ours)}"
            )
    return model


def load_llama_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name) is None:
            raise WeightsError(f"{folder}: the tokenizer has no {name}")
    return tokenizer


def write_folder(
    folder: Path, config: MiniGPTConfig, state_dict: Mapping[str, Tensor], tokenizer: PreTrainedTokenizerBase
) -> None:
    """Write tokenizer files, ``model.safetensors``, then ``config.json`` (last: its presence marks a whole folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    partial = folder / f".{WEIGHTS_FILE}.partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, folder / WEIGHTS_FILE)
    meta = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "config": config.to_dict()}
    write_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=2).encode())
    logger.info("saved model %s (%d tensors) to %s", config.name, len(tensors), folder)


def read_folder(folder: Path) -> tuple[MiniGPTConfig, dict[str, Tensor], PreTrainedTokenizerBase]:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a raddraft model folder: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise WeightsError(f"{config_path}: 'format' must be {FOLDER_FORMAT!r}")
    if meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise WeightsError(
            f"{config_path}: format_version {meta.get('format_version')!r} is not {FOLDER_FORMAT_VERSION}"
        )
    if not isinstance(meta.get("config"), dict):
        raise WeightsError(f"{config_path}: 'config' must be an object with the model hyper-parameters")
    config = MiniGPTConfig.from_dict(meta["config"])
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: {WEIGHTS_FILE} is missing")
    tensors = load_file(weights_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return config, tensors, tokenizer
