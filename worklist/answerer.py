"""``QuestionModel`` over a loaded MiniGPT-Med, for ``Bridge(model=…)`` (imports torch; the web app does not).

``MiniGPTAnswerer`` is also how the gpu worker answers the worklist's questions on its model socket
(raddraft/analyze_output.py); ``raddraft serve`` with child workers asks there (raddraft/model_socket.py
``SocketAnswerer``) and uses ``SharedModelAnswerer`` only with in-process workers (the SQLite opt-in).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from core.settings import Settings
from model.minigpt import MiniGPTMed
from workers.inference import settings_model

ASK_MAX_NEW_TOKENS = 100  # MiniGPT-Med's budget for box answers


class MiniGPTAnswerer:
    """One question at a time, greedy, under inference mode."""

    def __init__(self, model: MiniGPTMed, max_new_tokens: int = ASK_MAX_NEW_TOKENS) -> None:
        self._model = model.eval()
        self._max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self._model.config.vision.image_size

    def answer(self, pixels: np.ndarray, instruction: str) -> str:
        images = torch.from_numpy(np.ascontiguousarray(pixels))[None].to(self._model.device)  # (1, 3, S, S)
        with self._lock, torch.inference_mode():
            return self._model.generate(images, [instruction], max_new_tokens=self._max_new_tokens)[0]


class SharedModelAnswerer:
    """``QuestionModel`` over the gpu worker's model of this process (``raddraft serve`` with in-process workers):
    loaded on the first question, or already loaded by inference; the input size is known without loading."""

    def __init__(self, settings: Settings, image_size: int) -> None:
        self._settings = settings
        self._image_size = image_size
        self._answerer: MiniGPTAnswerer | None = None
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self._image_size

    def answer(self, pixels: np.ndarray, instruction: str) -> str:
        with self._lock:
            if self._answerer is None:
                self._answerer = MiniGPTAnswerer(settings_model(self._settings).model)
        return self._answerer.answer(pixels, instruction)
