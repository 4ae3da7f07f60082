"""Training of the embedded model on phantom studies: AdamW, linear warm-up + cosine decay, gradient clipping.

Data: step *s* draws ``studies_per_step`` fresh phantom studies (seeded by ``(seed, s, j)``) and samples
``batch_size`` examples of every task from them (:mod:`model.examples`), so the stream depends only on the
seed and the step: a resumed run sees exactly the batches an uninterrupted run would.

The loss is the per-example mean of the answer tokens' cross-entropy, averaged over the batch, so a long
report does not outweigh a short box answer, plus ``probe_weight`` times the training-only patch supervision of
the vision encoder (:mod:`model.patch_probe`; its head is saved in ``trainer.pt``, never in the model folder).
Every weight is trained (the vision encoder too: no pretrained EVA exists here). ``init_from`` starts from the
weights of a model folder (e.g. the shipped checkpoint) instead of a fresh initialisation.

Output folder::

    OUT/checkpoint/model/       model folder (config.json, model.safetensors, tokenizer) at the last checkpoint
    OUT/checkpoint/trainer.pt   optimizer + scheduler state, step, torch RNG state
    OUT/final/                  the model folder after the last step
    OUT/train_config.json       the TrainConfig of the run (on resume only ``steps`` may differ: the
                                cosine schedule then follows the new total)
    OUT/loss.jsonl              {"step", "loss", "probe_loss", "lr", "elapsed_s"} every log_every steps
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from core.jsonio import write_atomic
from model.config import MiniGPTConfig, get_preset
from model.examples import Example, corpus_texts, prepare_phantom, sample_examples
from model.minigpt import IGNORE_INDEX, MiniGPTMed
from model.patch_probe import PatchProbe
from model.phantoms import MODALITIES, MODALITY_WEIGHTS, generate_study, study_rng
from model.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
TRAINER_FILE = "trainer.pt"


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "raddraft-small"
    steps: int = 3000
    batch_size: int = 16
    studies_per_step: int = 4
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    tokenizer_studies: int = 400  # phantom studies whose texts train the tokenizer
    probe_weight: float = 0.5  # weight of the patch supervision (model.patch_probe); 0 turns it off
    init_from: str | None = None  # a model folder whose weights (and tokenizer) the run starts from
    modality_weights: tuple[float, ...] = MODALITY_WEIGHTS  # how often each of MODALITIES is drawn per study

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "studies_per_step", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} {getattr(self, name)} must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train lr {self.lr} must be > 0 and min_lr_ratio {self.min_lr_ratio} in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"train warmup_steps {self.warmup_steps} must not be negative")
        if self.probe_weight < 0:
            raise ValueError(f"train probe_weight {self.probe_weight} must not be negative")
        if (len(self.modality_weights) != len(MODALITIES) or min(self.modality_weights) < 0
                or sum(self.modality_weights) <= 0):
            raise ValueError(f"train modality_weights {list(self.modality_weights)} must be {len(MODALITIES)} "
                             f"non-negative weights of {', '.join(MODALITIES)}, not all zero")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        data["modality_weights"] = list(self.modality_weights)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["betas"] = tuple(data["betas"])
        if "modality_weights" in data:  # absent in runs made before the mix could be set: the default mix
            data["modality_weights"] = tuple(data["modality_weights"])
        return cls(**data)


@dataclass(frozen=True)
class TrainSummary:
    steps_done: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    final_dir: Path


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at *step*: linear warm-up, then cosine down to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_for_step(config: TrainConfig, step: int, model_size: int) -> list[Example]:
    """The examples of *step*: a pure function of (seed, step)."""
    examples: list[Example] = []
    per_study = math.ceil(config.batch_size / config.studies_per_step)
    mix = np.asarray(config.modality_weights, dtype=np.float64)
    mix = mix / mix.sum()
    for j in range(config.studies_per_step):
        rng = np.random.default_rng([config.seed, step, j])
        modality = str(rng.choice(MODALITIES, p=mix))
        study = generate_study(study_rng(config.seed * 1_000_003 + step, j), modality)
        examples.extend(sample_examples(rng, prepare_phantom(study, model_size), per_study))
    return examples[: config.batch_size]


def stack_images(examples: list[Example]) -> Tensor:
    return torch.from_numpy(np.stack([e.image for e in examples]))  # (B, 3, S, S)


def balanced_loss(model: MiniGPTMed, images: Tensor, instructions: list[str], answers: list[str]) -> Tensor:
    """Mean over examples of each example's mean answer-token cross-entropy."""
    embeds, mask, labels = model.embed_prompts(images, instructions, answers)  # (B, T, D), (B, T), (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at t
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # (B, T-1)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)  # (B,)
    return (token_loss.sum(dim=1) / counts).mean()


def new_model(config: TrainConfig, model_config: MiniGPTConfig | None = None) -> MiniGPTMed:
    """A freshly initialised model with a tokenizer trained on phantom texts (seeded), or the model of
    ``config.init_from``."""
    if config.init_from is not None:
        model = MiniGPTMed.load(Path(config.init_from))
        expected = model_config.name if model_config is not None else config.preset
        if model.config.name != expected:
            raise ValueError(f"init_from {config.init_from} holds model {model.config.name!r}, not {expected!r}")
        return model
    model_config = model_config or get_preset(config.preset)
    torch.manual_seed(config.seed)
    studies = []
    for i in range(config.tokenizer_studies):
        rng = study_rng(config.seed + 7_919, i)
        studies.append(generate_study(rng, str(rng.choice(MODALITIES, p=MODALITY_WEIGHTS))))
    tokenizer = build_tokenizer(corpus_texts(studies), vocab_size=model_config.llm.vocab_size)
    return MiniGPTMed(model_config, tokenizer)


def make_optimizer(model: MiniGPTMed, config: TrainConfig, probe: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the model (and the probe head); no weight decay on biases, norms, embeddings of
    position/class (1-D or token tables)."""
    decay, no_decay = [], []
    named = list(model.named_parameters()) + (list(probe.named_parameters("probe")) if probe is not None else [])
    for name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "embed" in name or "cls_token" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def new_probe(model: MiniGPTMed, config: TrainConfig) -> PatchProbe | None:
    return PatchProbe(model.config.vision.width) if config.probe_weight > 0 else None


def probe_loss(probe: PatchProbe, vision_out: Tensor, examples: list[Example], grid: int) -> Tensor:
    """The probe's loss on the ``ln_vision`` output (B, 1+N, C) of *examples* (CLS dropped)."""
    return probe.loss(vision_out[:, 1:, :], [e.regions for e in examples], grid)


def save_checkpoint(out: Path, model: MiniGPTMed, optimizer: torch.optim.Optimizer, step: int,
                    probe: nn.Module | None = None) -> None:
    """Write the checkpoint to a temporary folder, then swap it in (a crash leaves the old one whole)."""
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    if probe is not None:
        state["probe"] = probe.state_dict()
    torch.save(state, tmp / TRAINER_FILE)
    old = out / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / CHECKPOINT_DIR).exists():
        (out / CHECKPOINT_DIR).rename(old)
    tmp.rename(out / CHECKPOINT_DIR)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d in %s", step, out / CHECKPOINT_DIR)


def load_checkpoint(out: Path, config: TrainConfig
                    ) -> tuple[MiniGPTMed, PatchProbe | None, torch.optim.AdamW, int]:
    folder = out / CHECKPOINT_DIR
    if not (folder / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: {folder / TRAINER_FILE} does not exist")
    model = MiniGPTMed.load(folder / "model")
    state = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
    probe = new_probe(model, config)
    if probe is not None:
        if "probe" not in state:
            raise ValueError(f"cannot resume: {folder / TRAINER_FILE} has no patch probe state")
        probe.load_state_dict(state["probe"])
    optimizer = make_optimizer(model, config, probe)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return model, probe, optimizer, int(state["step"])


def _check_resume_config(out: Path, config: TrainConfig) -> None:
    path = out / "train_config.json"
    if not path.is_file():
        return
    stored = TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))).to_dict()
    changed = sorted(k for k, v in config.to_dict().items() if stored.get(k) != v and k != "steps")
    if changed:
        raise ValueError(f"cannot resume {out}: train settings {changed} differ from the stored train_config.json "
                         "(only steps may change on resume)")
    if stored["steps"] != config.steps:
        logger.warning("resuming with %d total steps instead of %d: the learning-rate schedule follows the new total",
                       config.steps, stored["steps"])


def train(config: TrainConfig, out: Path, *, resume: bool = False, model_config: MiniGPTConfig | None = None,
          progress: bool = True, stop_after: int | None = None) -> TrainSummary:
    """Train (or resume) into *out*; returns losses and where the final model folder is.

    *stop_after* ends this call after that many steps (with a checkpoint), as an interruption would.
    """
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_resume_config(out, config)
        model, probe, optimizer, step = load_checkpoint(out, config)
        logger.info("resuming from step %d of %d", step, config.steps)
    else:
        if (out / CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{out / CHECKPOINT_DIR} exists: pass resume=True (--resume) or choose a new --out")
        model = new_model(config, model_config)
        probe = new_probe(model, config)
        optimizer = make_optimizer(model, config, probe)
        step = 0
    write_atomic(out / "train_config.json", json.dumps(config.to_dict(), indent=2).encode())
    size = model.config.vision.image_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training %s (%.1f M trainable parameters) for %d steps, batch %d", model.config.name,
                trainable / 1e6, config.steps, config.batch_size)
    model.train()
    vision_out: list[Tensor] = []  # the ln_vision output of the current step, for the probe
    hook = (model.ln_vision.register_forward_hook(lambda _m, _i, output: vision_out.append(output))
            if probe is not None else None)
    stop_at = config.steps if stop_after is None else min(config.steps, step + stop_after)
    first: float | None = None
    last: float | None = None
    started = time.monotonic()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="train", unit="step")
    log_file = (out / "loss.jsonl").open("a", encoding="utf-8")
    try:
        while step < stop_at:
            examples = batch_for_step(config, step, size)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config)
            vision_out.clear()
            loss = balanced_loss(model, stack_images(examples), [e.instruction for e in examples],
                                 [e.answer for e in examples])
            probe_value = 0.0
            if probe is not None:
                patch_loss = probe_loss(probe, vision_out[-1], examples, model.config.vision.grid)
                probe_value = float(patch_loss.detach())
                loss = loss + config.probe_weight * patch_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [*model.parameters(), *(probe.parameters() if probe is not None else ())]
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            step += 1
            last = float(loss.detach())
            first = last if first is None else first
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.monotonic() - started
                logger.info("step %d loss %.4f lr %.2e (%.1f s)", step, last, optimizer.param_groups[0]["lr"], elapsed)
                log_file.write(json.dumps({"step": step, "loss": round(last, 5), "probe_loss": round(probe_value, 5),
                                           "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1)})
                               + "\n")
                log_file.flush()
            if step % config.checkpoint_every == 0 or step == stop_at:
                save_checkpoint(out, model, optimizer, step, probe)
    finally:
        if hook is not None:
            hook.remove()
        bar.close()
        log_file.close()
    final = out / FINAL_DIR
    if step == config.steps:
        model.save_pretrained(final)
    return TrainSummary(step, first, last, time.monotonic() - started, final)
