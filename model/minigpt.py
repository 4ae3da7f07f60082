"""The MiniGPT-Med model: EVA ViT → ln_vision → drop CLS → join 4 tokens → llama_proj → Llama-2 + LoRA.

Attribute names follow MiniGPT-v2/MiniGPT-Med (``visual_encoder``, ``ln_vision``, ``llama_proj``,
``llama_model``), so this module's state-dict keys are the keys of their checkpoints.

    images (B, 3, S, S) ──EVA──▶ (B, 1+N, C) ──ln_vision, drop CLS──▶ (B, N, C)
        ──view──▶ (B, N/4, 4C) ──llama_proj──▶ (B, N/4, D) image tokens
    prompt  "<s>[INST] <Img>" + image tokens + "</Img> {instruction} [/INST]" (+ answer + </s> for training)
        ──Llama (inputs_embeds, left padding)──▶ logits
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import peft
import torch
from torch import Tensor, nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from model import weights
from model.config import MiniGPTConfig, get_preset
from model.eva_vit import EvaViT
from model.prompts import BOS, IMAGE_PLACEHOLDER, build_prompt
from model.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, image, padding)


class MiniGPTMed(nn.Module):
    def __init__(
        self,
        config: MiniGPTConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        llm: LlamaForCausalLM | None = None,
        visual_encoder: EvaViT | None = None,
    ) -> None:
        """Build the model; *llm* / *visual_encoder* are given when their weights were loaded already."""
        super().__init__()
        if len(tokenizer) > config.llm.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than llm.vocab_size {config.llm.vocab_size}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"tokenizer has no {name}")
        self.config = config
        self.tokenizer = tokenizer

        self.visual_encoder = (visual_encoder or EvaViT(config.vision)).to(getattr(torch, config.vision.dtype))
        self.ln_vision = nn.LayerNorm(config.vision.width)  # MiniGPT's frozen LayerNorm, default eps, fp32
        self.llama_proj = nn.Linear(config.projector_in, config.llm.hidden_size)

        if llm is None:
            llm = LlamaForCausalLM(config.llm.to_hf())
        llm = llm.to(getattr(torch, config.llm.dtype))
        lora = peft.LoraConfig(
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=list(config.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``: an upstream FutureWarning that
            # would otherwise print on every command that loads a model
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            self.llama_model = peft.get_peft_model(llm, lora)  # freezes every non-LoRA LLM weight
        self._set_trainable()

    def _set_trainable(self) -> None:
        for module in (self.visual_encoder, self.ln_vision):
            for param in module.parameters():
                param.requires_grad = not self.config.vision.frozen
        if not self.config.llm.frozen:
            for param in self.llama_model.parameters():
                param.requires_grad = True

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_preset(cls, name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> MiniGPTMed:
        """A freshly initialised model of a named preset (``raddraft-small`` builds its own tokenizer)."""
        config = get_preset(name)
        if tokenizer is None:
            if config.name == "minigpt-med":
                raise ValueError("preset 'minigpt-med' needs the Llama-2 tokenizer: use MiniGPTMed.from_minigpt_med")
            tokenizer = build_tokenizer(vocab_size=config.llm.vocab_size)
        return cls(config, tokenizer)

    @classmethod
    def from_minigpt_med(
        cls,
        llama_dir: Path,
        eva_path: Path,
        checkpoint_path: Path | None,
        config: MiniGPTConfig | None = None,
    ) -> MiniGPTMed:
        """The published model from local files: HF Llama-2 folder, ``eva_vit_g.pth``, ``checkpoint_stage3.pth``.

        Every tensor is mapped by name; a missing, unexpected or mis-shaped tensor is an error naming it.
        """
        config = config or get_preset("minigpt-med")
        with torch.device("meta"):
            encoder = EvaViT(config.vision)
        weights.assign_state_dict(encoder, weights.read_eva_checkpoint(eva_path, config.vision), str(eva_path))
        trained = weights.read_minigpt_checkpoint(checkpoint_path) if checkpoint_path is not None else None
        tokenizer = weights.load_llama_tokenizer(llama_dir)
        llm = weights.load_llama(llama_dir, config.llm)
        model = cls(config, tokenizer, llm=llm, visual_encoder=encoder)
        if trained is None:
            logger.warning("no MiniGPT-Med checkpoint given: llama_proj is random and LoRA is at its initial value")
        else:
            tensors, stored_as = trained
            expected = weights.minigpt_checkpoint_keys(model)
            weights.assign_state_dict(model, tensors, str(checkpoint_path), expected=expected, stored_as=stored_as)
        logger.info("loaded MiniGPT-Med (%s) from local files", config.name)
        return model

    @classmethod
    def load(cls, folder: Path) -> MiniGPTMed:
        """A model saved by :meth:`save_pretrained` (config.json + model.safetensors + tokenizer files)."""
        config, tensors, tokenizer = weights.read_folder(folder)
        model = cls(config, tokenizer)
        weights.assign_state_dict(model, tensors, str(folder / weights.WEIGHTS_FILE))
        return model

    def save_pretrained(self, folder: Path) -> None:
        weights.write_folder(folder, self.config, self.state_dict(), self.tokenizer)

    # ------------------------------------------------------------------ parts

    @property
    def llm(self) -> LlamaForCausalLM:
        """The Llama model with the LoRA layers injected (calling it runs LoRA)."""
        return self.llama_model.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images → (B, N/4, D) image tokens in the LLM's embedding dtype."""
        size = self.config.vision.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.vision.frozen):
            feats = self.visual_encoder(images.to(self.device))  # (B, 1+N, C)
            feats = self.ln_vision(feats.to(self.ln_vision.weight.dtype))  # (B, 1+N, C)
        feats = feats[:, 1:, :]  # (B, N, C): drop CLS
        b, n, c = feats.shape
        join = self.config.projector.join
        feats = feats.reshape(b, n // join, c * join)  # (B, N/4, 4C): 4 consecutive tokens, row-major
        tokens = self.llama_proj(feats.to(self.llama_proj.weight.dtype))  # (B, N/4, D)
        return tokens.to(self.llm.get_input_embeddings().weight.dtype)

    def _token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _embed(self, ids: list[int]) -> Tensor:
        table = self.llm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))  # (T, D)

    def embed_prompts(
        self, images: Tensor, instructions: list[str], answers: list[str] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Left-padded ``(inputs_embeds (B, T, D), attention_mask (B, T), labels (B, T))``.

        Per sample: BOS + "[INST] <Img>" + image tokens + "</Img> {instruction} [/INST]" (+ answer + EOS).
        Labels are the answer ids (EOS included) and ``IGNORE_INDEX`` everywhere else.
        """
        if len(instructions) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(instructions)} instructions")
        if answers is not None and len(answers) != len(instructions):
            raise ValueError(f"got {len(instructions)} instructions but {len(answers)} answers")
        image_tokens = self.encode_images(images)  # (B, N/4, D)
        rows: list[tuple[Tensor, list[int]]] = []
        for i, instruction in enumerate(instructions):
            before, after = build_prompt(instruction).removeprefix(BOS).split(IMAGE_PLACEHOLDER)
            ids_before = [self.tokenizer.bos_token_id, *self._token_ids(before)]
            ids_after = self._token_ids(after)
            parts = [self._embed(ids_before), image_tokens[i], self._embed(ids_after)]  # (t, D) each
            labels = [IGNORE_INDEX] * (len(ids_before) + image_tokens.shape[1] + len(ids_after))
            if answers is not None:
                ids_answer = [*self._token_ids(answers[i]), self.tokenizer.eos_token_id]
                parts.append(self._embed(ids_answer))
                labels += ids_answer
            rows.append((torch.cat(parts), labels))

        length = max(len(labels) for _, labels in rows)
        limit = self.config.llm.max_position_embeddings
        if length > limit:
            raise ValueError(f"sequence of {length} tokens is longer than llm.max_position_embeddings {limit}")
        width = image_tokens.shape[-1]
        embeds = image_tokens.new_zeros(len(rows), length, width)  # (B, T, D)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)  # (B, T)
        target = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=self.device)  # (B, T)
        for i, (row, labels) in enumerate(rows):
            pad = length - row.shape[0]
            embeds[i, pad:] = row
            mask[i, pad:] = 1
            target[i, pad:] = torch.tensor(labels, dtype=torch.long, device=self.device)
        return embeds, mask, target

    # ------------------------------------------------------------------ training

    def training_loss(self, images: Tensor, instructions: list[str], answers: list[str]) -> Tensor:
        """Mean next-token cross-entropy over the answer tokens (prompt and image masked)."""
        embeds, mask, labels = self.embed_prompts(images, instructions, answers)  # (B, T, D), (B, T), (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding keeps positions from 0
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels)
        return out.loss

    def forward(self, images: Tensor, instructions: list[str], answers: list[str]) -> Tensor:
        return self.training_loss(images, instructions, answers)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate_ids(self, images: Tensor, instructions: list[str], max_new_tokens: int = 300, *,
                     min_new_tokens: int = 0) -> list[list[int]]:
        """Greedy decoding with a KV cache; per sample the new ids up to (not including) EOS.

        EOS cannot be chosen before *min_new_tokens* new tokens (as transformers' ``min_new_tokens``; benchmarks
        use it to decode a fixed length). Runs in eval mode (no LoRA dropout) and restores the previous mode.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens {min_new_tokens} must be in [0, max_new_tokens {max_new_tokens}]")
        was_training = self.training
        self.eval()
        try:
            return self._greedy(images, instructions, max_new_tokens, min_new_tokens)
        finally:
            self.train(was_training)

    def _greedy(self, images: Tensor, instructions: list[str], max_new_tokens: int, min_new_tokens: int
                ) -> list[list[int]]:
        embeds, mask, _ = self.embed_prompts(images, instructions)  # (B, T, D), (B, T)
        limit = self.config.llm.max_position_embeddings
        if embeds.shape[1] + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {embeds.shape[1]} tokens + max_new_tokens {max_new_tokens} exceeds "
                f"llm.max_position_embeddings {limit}"
            )
        llm, table = self.llm, self.llm.get_input_embeddings()
        eos = self.tokenizer.eos_token_id
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.cache
        finished = torch.zeros(embeds.shape[0], dtype=torch.bool, device=self.device)  # (B,)
        steps: list[Tensor] = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :]  # (B, V)
            if step < min_new_tokens:
                logits = logits.clone()
                logits[:, eos] = float("-inf")
            token = logits.argmax(dim=-1)  # (B,)
            token = torch.where(finished, torch.full_like(token, eos), token)
            steps.append(token)
            finished |= token == eos
            if bool(finished.all()) or step == max_new_tokens - 1:
                break  # (no forward pass for logits that would never be read)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (B, T+1)
            positions = positions[:, -1:] + 1  # (B, 1)
            out = llm(
                inputs_embeds=table(token[:, None]),  # (B, 1, D)
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
        generated = torch.stack(steps, dim=1).tolist()  # (B, steps)
        return [row[: row.index(eos)] if eos in row else row for row in generated]

    def generate(self, images: Tensor, instructions: list[str], max_new_tokens: int = 300) -> list[str]:
        """Greedy answers, one per (image, instruction); box and phrase markers are kept."""
        ids = self.generate_ids(images, instructions, max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
