"""Hyper-parameters of the MiniGPT-Med architecture, one frozen dataclass per part, and the named presets.

``minigpt-med`` is the published model (EVA-CLIP ViT-g/14 at 448 → 4-token join → Linear(5632, 4096) →
Llama-2-7b-chat with LoRA r=64 on q_proj/v_proj). ``raddraft-small`` is the embedded model: the same
architecture family at a size that drafts a radiograph in well under 3 s on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import LlamaConfig

DType = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT (BEiT-style pre-norm blocks, q/v biases, no final norm) as used by MiniGPT-v2/MiniGPT-Med."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    layer_norm_eps: float = 1e-6
    pretrain_image_size: int = 224  # the position embeddings in eva_vit_g.pth were made for 224 (16×16 grid)
    dtype: DType = "float32"
    frozen: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.pretrain_image_size % self.patch_size:
            raise ValueError(
                f"vision.pretrain_image_size {self.pretrain_image_size} must be a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} must be divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # EVA-g: int(1408 * 4.3637) = 6144


@dataclass(frozen=True)
class ProjectorConfig:
    """``join`` consecutive patch tokens (row-major) are concatenated, then ``Linear(join * width, hidden)``."""

    join: int = 4


@dataclass(frozen=True)
class LLMConfig:
    """A Llama decoder (transformers ``LlamaForCausalLM``)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dtype: DType = "float32"
    frozen: bool = True

    def to_hf(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        )


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class MiniGPTConfig:
    name: str
    vision: VisionConfig
    llm: LLMConfig
    lora: LoraSettings
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self) -> None:
        if self.vision.num_patches % self.projector.join:
            raise ValueError(
                f"vision patches {self.vision.num_patches} must be divisible by projector.join {self.projector.join}"
            )

    @property
    def image_tokens(self) -> int:
        """Tokens the image occupies in the LLM sequence (MiniGPT-Med: 1024 / 4 = 256)."""
        return self.vision.num_patches // self.projector.join

    @property
    def projector_in(self) -> int:
        return self.vision.width * self.projector.join

    def replace(self, **parts: Any) -> MiniGPTConfig:
        """A copy with whole parts or nested fields replaced: ``cfg.replace(vision={"depth": 2})``."""
        changes: dict[str, Any] = {}
        for key, value in parts.items():
            current = getattr(self, key)
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                changes[key] = dataclasses.replace(current, **value)
            else:
                changes[key] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniGPTConfig:
        expected = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - expected
        if unknown:
            raise ValueError(f"model config has unknown keys {sorted(unknown)}; expected {sorted(expected)}")
        try:
            lora = dict(data["lora"])
            lora["target_modules"] = tuple(lora["target_modules"])
            return cls(
                name=data["name"],
                vision=VisionConfig(**data["vision"]),
                llm=LLMConfig(**data["llm"]),
                lora=LoraSettings(**lora),
                projector=ProjectorConfig(**data.get("projector", {})),
            )
        except KeyError as exc:
            raise ValueError(f"model config is missing key {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise ValueError(f"model config is invalid: {exc}") from exc


MINIGPT_MED = MiniGPTConfig(
    name="minigpt-med",
    vision=VisionConfig(
        image_size=448, patch_size=14, width=1408, depth=39, heads=16, mlp_ratio=4.3637, dtype="float16", frozen=True
    ),
    llm=LLMConfig(
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        dtype="float16",
        frozen=True,
    ),
    lora=LoraSettings(r=64, alpha=16, dropout=0.05),
)

RADDRAFT_SMALL = MiniGPTConfig(
    name="raddraft-small",
    vision=VisionConfig(
        image_size=224, patch_size=14, width=192, depth=4, heads=3, mlp_ratio=4.0, dtype="float32", frozen=False
    ),
    llm=LLMConfig(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=688,
        vocab_size=2048,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        dtype="float32",
        frozen=False,
    ),
    lora=LoraSettings(r=16, alpha=16, dropout=0.05),
)

PRESETS: dict[str, MiniGPTConfig] = {c.name: c for c in (MINIGPT_MED, RADDRAFT_SMALL)}


def get_preset(name: str) -> MiniGPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
