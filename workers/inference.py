"""The gpu queue's work as plain functions: the model loaded once per worker process, and batched generation.

:func:`get_model` loads ``settings.model`` lazily on first use and caches it for the life of the process (a
lock makes concurrent first calls load it once). :func:`infer` answers several queued
:class:`~model.payload.InferenceRequest` s with :func:`model.analyze.run_batch`, the runner of the one analysis
path: ONE greedy ``generate`` call over every task row of every request (typically the report instruction on the
study view plus a ``[grounding]`` instruction per image).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from core.settings import Settings
from model.analyze import run_batch
from model.embedded import LoadedModel, load_model
from model.payload import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: dict[str, LoadedModel] = {}


def get_model(spec: str, device: str = "auto") -> LoadedModel:
    """The model named by *spec* (``settings.model``) on *device*, loaded once per process."""
    key = f"{spec}@{device}"
    with _lock:
        loaded = _cache.get(key)
        if loaded is None:
            started = time.perf_counter()
            loaded = _load(spec, device)
            _cache[key] = loaded
            log.info("model %s %s loaded on %s in %.1f s", loaded.identity.name, loaded.identity.version,
                     loaded.model.device, time.perf_counter() - started)
        return loaded


def _load(spec: str, device: str) -> LoadedModel:
    """The one place a worker builds its model (``model.embedded.load_model`` knows every kind of spec)."""
    loaded = load_model(spec)
    target = resolve_device(device)
    if target.type != "cpu":
        loaded.model.to(target)
    loaded.model.eval()
    return loaded


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
    """What a gpu task calls: the process's model (``settings.model`` on ``settings.inference_device``)."""
    set_threads(settings.inference_threads)
    return run_batch(get_model(settings.model, settings.inference_device), requests)
