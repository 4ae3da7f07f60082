"""Several queued studies in one forward pass: infer tasks running in several threads of one gpu worker process
hand their requests to a :class:`MicroBatcher`, which answers up to ``max_batch`` of them with one call.

Each task still owns its message (late acknowledgement after its own response is published): a worker that dies
mid-batch leaves every message of the batch unacknowledged, and the broker delivers them again. The model runs
one batch at a time; a thread that finds the model free waits ``window_s`` for company (unless the batch is full
already), takes the oldest pending requests and runs them; the others wait for their answer. Requests with the
same id (a message delivered twice) are run once and share the answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model.payload import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[InferenceRequest]], list[InferenceResponse]]


@dataclass
class _Slot:
    request: InferenceRequest
    done: threading.Event = field(default_factory=threading.Event)
    response: InferenceResponse | None = None
    error: BaseException | None = None


class MicroBatcher:
    def __init__(self, run: Runner, max_batch: int, window_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        if window_s < 0:
            raise ValueError(f"window_s {window_s} must not be negative")
        self._run = run
        self._max = max_batch
        self._window = window_s
        self._pending: list[_Slot] = []
        self._lock = threading.Lock()  # guards _pending
        self._model = threading.Lock()  # one batch at a time

    def submit(self, request: InferenceRequest) -> InferenceResponse:
        """The response to *request*, computed in a batch with whatever else is pending; raises what the run
        raised."""
        slot = _Slot(request)
        with self._lock:
            self._pending.append(slot)
        with self._model:
            while not slot.done.is_set():
                with self._lock:
                    full = len(self._pending) >= self._max
                if not full and self._window:
                    time.sleep(self._window)
                with self._lock:
                    batch, self._pending = self._pending[: self._max], self._pending[self._max:]
                self._answer(batch)
        if slot.error is not None:
            raise slot.error
        assert slot.response is not None
        return slot.response

    def _answer(self, batch: list[_Slot]) -> None:
        unique: dict[str, InferenceRequest] = {}
        for slot in batch:
            unique.setdefault(slot.request.request_id, slot.request)
        try:
            responses = {r.request_id: r for r in self._run(list(unique.values()))}
            for slot in batch:
                slot.response = responses[slot.request.request_id]
        except Exception as exc:  # every task of the batch re-raises it and retries or dead-letters on its own
            log.warning("batch of %d request(s) failed: %s", len(unique), exc)
            for slot in batch:
                slot.error = exc
        if len(unique) > 1:
            log.info("answered %d request(s) in one batch", len(unique))
        for slot in batch:
            slot.done.set()
