"""The gpu queue's work as plain functions: the model loaded once per worker process, and batched generation.

:func:`get_model` loads ``settings.model`` lazily on first use and caches it for the life of the process (a
lock makes concurrent first calls load it once), on ``settings.inference_device`` in ``settings.inference_dtype``
(:func:`resolve_dtype`: ``auto`` is bfloat16 on CUDA, float32 on the CPU; MiniGPT-Med's ``ln_vision`` stays
float32). :func:`infer` answers several queued :class:`~model.payload.InferenceRequest` s with
:func:`model.analyze.run_batch`, the runner of the one analysis path: ONE greedy ``generate`` call over every
task row of every request (typically the report instruction on the study view plus a ``[grounding]``
instruction per image). The gpu worker's infer tasks go through :func:`continuous_batcher` instead: the same
runner, each study's rows decoded in the process's continuous decoder (workers/batching.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from core.settings import Settings
from model.analyze import run_batch
from model.config import MiniGPTConfig
from model.embedded import LoadedModel, load_model
from model.payload import MAX_NEW_TOKENS, InferenceRequest, InferenceResponse
from workers.batching import ContinuousBatcher

log = logging.getLogger(__name__)

# Decoder slots per study in flight: a radiograph has 2 rows (report + grounding), a CT up to 1 + 8 (the slice
# policy's max_per_series); rows beyond the slots wait for one to free.
ROWS_PER_STUDY = 4
PROMPT_TEXT_TOKENS = 128  # room for the instruction text around the image tokens in a decoder slot
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_lock = threading.Lock()
_cache: dict[str, LoadedModel] = {}


def settings_model(settings: Settings) -> LoadedModel:
    """The process's model as *settings* name it (model, device, dtype): every user of the model in one process
    (infer tasks, the model socket, the warm-up, worklist questions) gets this one copy."""
    return get_model(settings.model, settings.inference_device, settings.inference_dtype)


def warm_up(settings: Settings) -> None:
    """Load the process's model ahead of its first use (a worker's first infer task, a gateway's first study);
    a model that cannot be loaded is logged here and reported by the task that needs it."""
    try:
        settings_model(settings)
    except Exception:
        log.exception("model %s could not be loaded ahead of time; the first infer task will report why",
                      settings.model)


def get_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model named by *spec* (``settings.model``) on *device* in *dtype* (:func:`resolve_dtype`), loaded once
    per process."""
    key = f"{spec}@{device}/{dtype}"
    with _lock:
        loaded = _cache.get(key)
        if loaded is None:
            started = time.perf_counter()
            loaded = _load(spec, device, dtype)
            _cache[key] = loaded
            log.info("model %s %s loaded on %s in %s in %.1f s", loaded.identity.name, loaded.identity.version,
                     loaded.model.device, loaded.model.llama_proj.weight.dtype, time.perf_counter() - started)
        return loaded


def _load(spec: str, device: str, dtype: str) -> LoadedModel:
    """The one place a worker builds its model (``model.embedded.load_model`` knows every kind of spec)."""
    target = resolve_device(device)
    kind = resolve_dtype(dtype, target)
    loaded = load_model(spec)
    loaded.model.to(device=target, dtype=kind)
    loaded.model.ln_vision.float()  # MiniGPT-Med's frozen LayerNorm runs in fp32 (model/minigpt.py)
    loaded.model.eval()
    return loaded


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device and float32 elsewhere; otherwise float32, bfloat16 or float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"inference dtype {dtype!r} must be auto, {', '.join(DTYPES)}") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; otherwise a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"inference device {device!r} is not a torch device (auto, cpu, cuda, cuda:1 …)") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"inference device {device!r} asks for CUDA, which this torch build/machine does not have")
    return target


def clear_cache() -> None:
    """Forget the loaded models (tests; a worker keeps its model for life)."""
    with _lock:
        _cache.clear()


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads of torch in this process (None keeps torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"inference threads {threads} must be at least 1")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.debug("torch uses %d CPU thread(s)", threads)


def infer(settings: Settings, requests: Sequence[InferenceRequest]) -> list[InferenceResponse]:
    """The one-call runner on the process's model (``settings.model`` on ``settings.inference_device`` in
    ``settings.inference_dtype``); the gpu worker's tasks use :func:`continuous_batcher`."""
    set_threads(settings.inference_threads)
    return run_batch(settings_model(settings), requests)


def decoder_length(config: MiniGPTConfig) -> int:
    """Cache positions of a decoder slot: the image tokens, the instruction text and the largest token budget a
    request may ask (``MAX_NEW_TOKENS``), within the LLM's ``max_position_embeddings``."""
    return min(config.llm.max_position_embeddings, config.image_tokens + PROMPT_TEXT_TOKENS + MAX_NEW_TOKENS)


def continuous_batcher(settings: Settings) -> ContinuousBatcher:
    """The gpu worker's continuous decoder over ``settings.model``: ``ROWS_PER_STUDY`` slots per study the worker
    runs at once (``settings.inference_batch_size``)."""
    set_threads(settings.inference_threads)
    loaded = settings_model(settings)
    return ContinuousBatcher(loaded, settings.inference_batch_size * ROWS_PER_STUDY,
                             decoder_length(loaded.model.config))
