"""Shared helpers of the pipeline_infra tests: a tiny random-weight model folder and inference requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import prompts
from model.config import RADDRAFT_SMALL, MiniGPTConfig
from model.imaging import prepare_display
from model.minigpt import MiniGPTMed
from model.payload import InferenceRequest, ModelImage, ModelTask
from model.tokenizer import build_tokenizer

TINY: MiniGPTConfig = RADDRAFT_SMALL.replace(
    name="pipeline-tiny",
    vision={"image_size": 56, "depth": 2, "width": 96, "heads": 3},
    llm={"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "max_position_embeddings": 512},
)


def tiny_model(seed: int = 0) -> MiniGPTMed:
    """A random-weight tiny model with its LLM weights drawn wide, so greedy output depends on its input."""
    torch.manual_seed(seed)
    model = MiniGPTMed(TINY, build_tokenizer(vocab_size=TINY.llm.vocab_size)).eval()
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and "lora_" not in name:
                param.normal_(0.0, 0.12)
    return model


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    tiny_model(seed).save_pretrained(folder)
    return folder


def display(seed: int, rows: int = 80, cols: int = 64) -> np.ndarray:
    """A smooth random gray image in [0, 1] (rows × cols)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    image = 0.5 + 0.3 * np.sin(x / (3 + seed % 5)) * np.cos(y / 7) + 0.05 * rng.standard_normal((rows, cols))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def request(study: str, seeds: list[int], size: int = TINY.vision.image_size, *, detection: str | None = None,
            tokens: int = 12) -> InferenceRequest:
    """A study request: the report on the first image, then [grounding] (or [detection]) on every image."""
    images, tasks = [], []
    for i, seed in enumerate(seeds):
        prepared = prepare_display(display(seed), size)
        uid = f"{study}.{i + 1}"
        images.append(ModelImage.build(f"img{i}", prepared.pixels, sop_instance_uid=uid, transform=prepared.transform))
        instruction = prompts.detection_instruction(detection) if detection else prompts.grounding_instruction()
        tasks.append(ModelTask(task_id=f"boxes:{uid}", image=f"img{i}", task="detection" if detection else "grounding",
                               instruction=instruction, max_new_tokens=tokens))
    tasks.insert(0, ModelTask(task_id="report", image="img0", task="report", instruction=prompts.report_instruction(),
                              max_new_tokens=tokens + 8))
    return InferenceRequest(request_id=f"infer-{study}-1", study_instance_uid=study, episode_id=1, model_size=size,
                            images=images, tasks=tasks)
