"""Helpers of the train_* tests: a tiny model config so training and generation take well under a second."""

from __future__ import annotations

import torch

from core.result import ModelIdentity
from model.config import MiniGPTConfig, get_preset
from model.embedded import LoadedModel
from model.minigpt import MiniGPTMed
from model.tokenizer import build_tokenizer

TINY: MiniGPTConfig = get_preset("raddraft-small").replace(
    name="raddraft-tiny",
    vision={"image_size": 56, "width": 32, "depth": 1, "heads": 2},
    llm={"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128, "vocab_size": 512,
         "max_position_embeddings": 512},
    lora={"r": 4, "alpha": 4, "dropout": 0.05},
)


def tiny_model(seed: int = 0) -> MiniGPTMed:
    torch.manual_seed(seed)
    return MiniGPTMed(TINY, build_tokenizer(vocab_size=TINY.llm.vocab_size)).eval()


def tiny_loaded(seed: int = 0) -> LoadedModel:
    """:func:`tiny_model` as the analysis takes a model: with its identity."""
    return LoadedModel(tiny_model(seed), ModelIdentity(name=TINY.name, version="test"), trained=False)
