"""Continuous batching of greedy decoding: rows join a running batch when a slot frees and leave when they are done.

A :class:`ContinuousDecoder` has a fixed number of *slots* and one key/value cache for all of them, allocated once
(:class:`SlotCache`: per layer ``(slots, kv_heads, max_len, head_dim)``; it is passed to the model's own Llama +
LoRA forward through transformers' public ``Cache`` interface, so the weights are used as they are). A row is one
prompt (the image tokens and the instruction, :meth:`ContinuousDecoder.embed`) with its own token budget:

    waiting rows ──admit (lowest free slots)──▶ prefill (J, T, D), right-padded ──▶ first token of each
    every step: the last token of every active slot (R, 1, D) ──decode──▶ one new token per slot
    a row that chose EOS or reached its max_new_tokens leaves; its slot takes the next waiting row

Slot *s* holds its row's keys at positions ``0 … n-1`` of ``cache[s]``: the prefill writes the prompt (its
padding lands past the row's length and is overwritten before it is ever read), each decode step writes one
position per row. A row attends through a 4D mask to its own positions only, so what a row decodes does not
depend on which other rows share the batch: the answers are those of one-by-one greedy decoding
(:meth:`model.minigpt.MiniGPTMed.generate_ids`). Decode steps run over slots ``0 … hi-1`` (hi: one past the
highest busy slot; a free slot among them computes a throw-away row) and attend to the first
``max(position) + 1`` cache positions: slicing, no gather, nothing allocated in the cache after the start.

Single-threaded: a caller (workers/batching.py) drives :meth:`ContinuousDecoder.step` from one thread.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import Cache, CacheLayerMixin

from model.minigpt import MiniGPTMed

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    """Where the forward pass that is about to run reads and writes the cache (set by the decoder per call)."""

    prefill: bool = False
    slots: Tensor | None = None  # (J,) the slots a prefill writes, or (R,) arange(R) for a decode step
    positions: Tensor | None = None  # (R,) the position each decode row writes
    length: int = 0  # cache positions a decode step attends to


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values of every slot, ``(slots, kv_heads, max_len, head_dim)``, allocated once."""

    is_compileable = False
    is_sliding = False

    def __init__(self, plan: _Plan, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self._plan = plan
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (S, H, L, hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (S, H, L, hd)
        self.max_len = shape[2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the tensors were allocated by the constructor."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        plan = self._plan
        if plan.prefill:  # key_states (J, H, T, hd) of slots plan.slots, positions 0 … T-1
            width = key_states.shape[2]
            self.keys[plan.slots, :, :width] = key_states
            self.values[plan.slots, :, :width] = value_states
            return key_states, value_states  # a prompt attends to itself only
        rows = key_states.shape[0]  # key_states (R, H, 1, hd) of slots 0 … R-1, one position each
        self.keys[plan.slots, :, plan.positions] = key_states[:, :, 0]
        self.values[plan.slots, :, plan.positions] = value_states[:, :, 0]
        return self.keys[:rows, :, :plan.length], self.values[:rows, :, :plan.length]  # (R, H, P, hd) views

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length if self._plan.prefill else self._plan.length), 0

    def get_seq_length(self) -> int:
        return self._plan.length

    def get_max_length(self) -> int:
        return self.max_len


class SlotCache(Cache):
    """The decoder's cache: one :class:`SlotLayer` per Llama layer, sharing the plan of the next forward pass."""

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.plan = _Plan()
        super().__init__(layers=[SlotLayer(self.plan, shape, dtype, device) for _ in range(layers)])

    def tensors(self) -> list[Tensor]:
        """Every key and value tensor (tests check that their storage never moves)."""
        return [t for layer in self.layers for t in (layer.keys, layer.values)]


@dataclass(eq=False)
class Row:
    """One prompt to decode and what it decoded so far; *owner* is the caller's handle."""

    embeds: Tensor  # (T, D) the prompt: BOS, text, image tokens, text
    max_new_tokens: int
    min_new_tokens: int = 0
    owner: object = None
    tokens: list[int] = field(default_factory=list)  # new ids, EOS excluded
    slot: int | None = None
    position: int = 0  # the cache position of the next token fed (= tokens in the cache)
    last: int | None = None  # the token fed at the next decode step
    done: bool = False


class ContinuousDecoder:
    """Greedy decoding of rows in *slots* cache slots of up to *max_len* positions (module docstring)."""

    def __init__(self, model: MiniGPTMed, slots: int, max_len: int | None = None) -> None:
        limit = model.config.llm.max_position_embeddings
        max_len = limit if max_len is None else max_len
        if slots < 1:
            raise ValueError(f"slots {slots} must be at least 1")
        if not 2 <= max_len <= limit:
            raise ValueError(f"max_len {max_len} must be in [2, llm.max_position_embeddings {limit}]")
        self.model = model
        self.slots = slots
        self.max_len = max_len
        hf = model.llm.config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        table = model.llm.get_input_embeddings()
        self._dtype = table.weight.dtype
        with torch.inference_mode():
            self.cache = SlotCache(hf.num_hidden_layers, (slots, hf.num_key_value_heads, max_len, head_dim),
                                   self._dtype, model.device)
            self._rows_index = torch.arange(slots, device=model.device)  # (S,)
            self._key_index = torch.arange(max_len, device=model.device)  # (L,)
        self._busy: list[Row | None] = [None] * slots
        self._waiting: deque[Row] = deque()
        self._eos = int(model.tokenizer.eos_token_id)
        self.steps = 0  # decode steps run (figures, tests)
        self.prefills = 0  # prefill passes run
        self.tokens = 0  # new tokens chosen (EOS excluded)
        logger.info("continuous decoder: %d slot(s) x %d positions, %.1f MiB of cache", slots, max_len,
                    sum(t.numel() * t.element_size() for t in self.cache.tensors()) / 2**20)

    # ------------------------------------------------------------------ rows in

    @torch.inference_mode()
    def embed(self, images: Tensor, instructions: list[str]) -> list[Tensor]:
        """The prompt embeddings of each (image, instruction), each ``(T_i, D)`` without padding."""
        embeds, mask, _ = self.model.embed_prompts(images, instructions)  # (B, T, D), (B, T) left-padded
        return [embeds[i, mask[i].bool()] for i in range(embeds.shape[0])]

    def add(self, row: Row) -> None:
        """Queue *row* (:meth:`check` first); it joins the batch at a step when a slot is free."""
        self.check(row)
        self._waiting.append(row)

    def check(self, row: Row) -> None:
        """A ``ValueError`` naming the rule when *row* cannot be decoded here (its budget, its length)."""
        if row.embeds.dim() != 2 or row.embeds.shape[0] < 1:
            raise ValueError(f"a row's embeds must have shape (T, D) with T >= 1, got {tuple(row.embeds.shape)}")
        if row.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {row.max_new_tokens}")
        if not 0 <= row.min_new_tokens <= row.max_new_tokens:
            raise ValueError(f"min_new_tokens {row.min_new_tokens} must be in [0, max_new_tokens "
                             f"{row.max_new_tokens}]")
        length = row.embeds.shape[0]
        if length + row.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {length} tokens + max_new_tokens {row.max_new_tokens} exceeds the "
                             f"decoder's cache length {self.max_len}")

    @property
    def active(self) -> int:
        """Rows in a slot."""
        return sum(row is not None for row in self._busy)

    @property
    def pending(self) -> int:
        """Rows in a slot or waiting for one."""
        return self.active + len(self._waiting)

    def clear(self) -> list[Row]:
        """Drop every row (after a failed step); returns them. The cache stays allocated."""
        dropped = [row for row in self._busy if row is not None] + list(self._waiting)
        self._busy = [None] * self.slots
        self._waiting.clear()
        for row in dropped:
            row.slot = None
        return dropped

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit waiting rows into the free slots (their prefill and first token), then decode one token for every
        row in a slot; returns the rows that finished during this step (their slots are free again)."""
        finished: list[Row] = []
        free = [s for s, row in enumerate(self._busy) if row is None]
        if free and self._waiting:
            joining = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
            for slot, row in zip(free, joining, strict=False):
                row.slot = slot
                self._busy[slot] = row
            finished += self._prefill(joining)
        if any(row is not None for row in self._busy):
            finished += self._decode()
        return finished

    def _prefill(self, rows: list[Row]) -> list[Row]:
        llm = self.model.llm
        lengths = [row.embeds.shape[0] for row in rows]
        width = max(lengths)
        device = self.model.device
        embeds = torch.zeros(len(rows), width, rows[0].embeds.shape[1], dtype=self._dtype, device=device)  # (J, T, D)
        for i, row in enumerate(rows):
            embeds[i, : lengths[i]] = row.embeds  # right padding: position = index in the row
        size = torch.tensor(lengths, device=device)  # (J,)
        keys = self._key_index[:width]  # (T,)
        allowed = (keys[None, None, :] <= keys[None, :, None]) & (keys[None, None, :] < size[:, None, None])
        positions = keys[None, :].expand(len(rows), width)  # (J, T)
        plan = self.cache.plan
        plan.prefill, plan.slots, plan.positions, plan.length = True, self._slot_tensor(rows), None, 0
        hidden = llm.model(inputs_embeds=embeds, attention_mask=self._additive(allowed[:, None]),  # (J, 1, T, T)
                           position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state  # (J, T, D)
        last = hidden[torch.arange(len(rows), device=device), size - 1]  # (J, D)
        self.prefills += 1
        for row, length in zip(rows, lengths, strict=True):
            row.position = length
        return self._choose(rows, llm.lm_head(last))  # (J, V)

    def _decode(self) -> list[Row]:
        llm, table = self.model.llm, self.model.llm.get_input_embeddings()
        device = self.model.device
        hi = max(s for s, row in enumerate(self._busy) if row is not None) + 1
        busy = self._busy[:hi]
        # a free slot below hi feeds EOS at position 0 of its own slot: a throw-away row
        tokens = torch.tensor([row.last if row is not None else self._eos for row in busy], device=device)  # (R,)
        where = [row.position if row is not None else 0 for row in busy]
        positions = torch.tensor(where, device=device)  # (R,)
        length = max(where) + 1
        allowed = self._key_index[None, :length] <= positions[:, None]  # (R, P)
        plan = self.cache.plan
        plan.prefill, plan.slots, plan.positions, plan.length = False, self._rows_index[:hi], positions, length
        hidden = llm.model(inputs_embeds=table(tokens[:, None]), attention_mask=self._additive(allowed[:, None, None]),
                           position_ids=positions[:, None], cache=self.cache, use_cache=True
                           ).last_hidden_state  # (R, 1, D)
        self.steps += 1
        logits = llm.lm_head(hidden)[:, -1, :]  # (R, V)
        rows = [row for row in busy if row is not None]
        index = [s for s, row in enumerate(busy) if row is not None]
        for row in rows:
            row.position += 1
        return self._choose(rows, logits[index] if len(index) < hi else logits)

    def _choose(self, rows: list[Row], logits: Tensor) -> list[Row]:
        """The greedy token of each row from its logits (R, V): EOS held back before min_new_tokens, as in
        ``generate_ids``; rows that chose EOS or reached max_new_tokens leave their slot."""
        early = [len(row.tokens) < row.min_new_tokens for row in rows]
        if any(early):
            logits = logits.clone()
            held = torch.tensor(early, device=logits.device)
            logits[:, self._eos] = torch.where(held, float("-inf"), logits[:, self._eos])
        finished = []
        for row, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
            if token == self._eos:
                row.done = True
            else:
                row.tokens.append(token)
                row.last = token
                self.tokens += 1
                row.done = len(row.tokens) >= row.max_new_tokens
            if row.done:
                assert row.slot is not None
                self._busy[row.slot] = None
                row.slot = None
                finished.append(row)
        return finished

    def _slot_tensor(self, rows: list[Row]) -> Tensor:
        return torch.tensor([row.slot for row in rows], device=self.model.device)

    def _additive(self, allowed: Tensor) -> Tensor:
        """A boolean "may attend" mask as the additive float mask both sdpa and eager attention take."""
        zero = torch.zeros((), dtype=self._dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=self._dtype, device=allowed.device))

    # ------------------------------------------------------------------ everything at once

    def generate_ids(self, images: Tensor, instructions: list[str], max_new_tokens: list[int], *,
                     min_new_tokens: int = 0) -> list[list[int]]:
        """Decode every (image, instruction) to its own ``max_new_tokens`` in this thread; ids per row as
        ``generate_ids`` returns them (up to, not including, EOS)."""
        if len(max_new_tokens) != len(instructions):
            raise ValueError(f"got {len(instructions)} instructions but {len(max_new_tokens)} token budgets")
        was_training = self.model.training
        self.model.eval()
        try:
            rows = [Row(embeds, limit, min(min_new_tokens, limit))
                    for embeds, limit in zip(self.embed(images, instructions), max_new_tokens, strict=True)]
            for row in rows:
                self.add(row)
            while not all(row.done for row in rows):
                self.step()
        finally:
            self.model.train(was_training)
        return [row.tokens for row in rows]
