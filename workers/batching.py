"""Queued studies decoded together at the token level: infer tasks running in several threads of one gpu worker
process hand their requests to the process's :class:`ContinuousBatcher`, whose one decoder thread runs a
:class:`~model.continuous.ContinuousDecoder` (a fixed number of slots, one preallocated KV cache).

Each task runs the one analysis path itself (:func:`model.analyze.run_batch` on its own request, the follow-up
``[detection]`` round included) with the batcher as its row generator: its rows join the running batch when a slot
frees, decode one token per step beside the rows of the other studies, and leave at EOS or at their own
``max_new_tokens``; nothing waits for a window or for the longest answer. Each task still owns its message (late
acknowledgement after its own response is published): a worker that dies mid-decode leaves every message in
flight unacknowledged, and the broker delivers them again. A step that raises fails every row in the decoder
(each task re-raises it and retries or dead-letters on its own); the decoder then starts empty. Requests with the
same id (a message delivered twice) are run once and share the answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from model.analyze import run_batch
from model.continuous import ContinuousDecoder, Row
from model.embedded import LoadedModel
from model.payload import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """The rows of one generate call of one task thread."""

    images: torch.Tensor  # (R, 3, S, S)
    instructions: list[str]
    limits: list[int]
    rows: list[Row] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


@dataclass(eq=False)
class _Flight:
    """One request being answered; a duplicate of it waits for the same answer."""

    done: threading.Event = field(default_factory=threading.Event)
    response: InferenceResponse | None = None
    error: BaseException | None = None


class ContinuousBatcher:
    """The gpu worker's decoder (module docstring): *slots* rows at a time, cache positions *max_len* per row."""

    def __init__(self, loaded: LoadedModel, slots: int, max_len: int | None = None) -> None:
        self.loaded = loaded
        self.decoder = ContinuousDecoder(loaded.model, slots, max_len)
        self._jobs: list[_Job] = []
        self._wake = threading.Condition()  # guards _jobs and _closed
        self._closed = False
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="raddraft-decoder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ task threads

    def submit(self, request: InferenceRequest) -> InferenceResponse:
        """The response to *request* (:func:`model.analyze.run_batch` with this decoder); raises what it raised."""
        with self._flights_lock:
            flight = self._flights.get(request.request_id)
            owner = flight is None
            if flight is None:
                flight = self._flights[request.request_id] = _Flight()
        if owner:
            try:
                [flight.response] = run_batch(self.loaded, [request], generate=self.generate)
            except Exception as exc:  # the duplicates re-raise it too
                flight.error = exc
            finally:
                with self._flights_lock:
                    del self._flights[request.request_id]
                flight.done.set()
        else:
            log.info("request %s is running already: waiting for its answer", request.request_id)
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.response is None:
            raise RuntimeError(f"request {request.request_id} ended without a response")
        return flight.response

    def generate(self, images: torch.Tensor, instructions: list[str], limits: list[int]) -> list[list[int]]:
        """A :data:`model.analyze.RowGenerator`: the rows decoded by the decoder thread, each to its own limit."""
        if not (len(instructions) == len(limits) == images.shape[0]):
            raise ValueError(f"got {images.shape[0]} images, {len(instructions)} instructions and {len(limits)} "
                             "token budgets")
        job = _Job(images, instructions, limits)
        with self._wake:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._jobs.append(job)
            self._wake.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return [row.tokens for row in job.rows]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the decoder thread; rows still in it fail with ``RuntimeError``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the decoder thread

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # closed, or the thread ends on an error no step caught: no task waits for ever
            with self._wake:
                self._closed = True
                jobs, self._jobs = self._jobs, []
            ended = RuntimeError("the decoder was closed")
            for job in jobs + [row.owner for row in self.decoder.clear() if isinstance(row.owner, _Job)]:
                job.fail(ended)

    def _serve(self) -> None:
        decoder = self.decoder
        while True:
            with self._wake:
                while not self._jobs and not decoder.pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                self._admit(job)
            try:
                finished = decoder.step()
            except Exception as exc:  # every row in the decoder fails; the tasks retry or dead-letter on their own
                dropped = decoder.clear()
                log.warning("decode step with %d row(s) failed: %s", len(dropped), exc)
                for job in {row.owner for row in dropped if isinstance(row.owner, _Job)}:
                    job.fail(exc)
                continue
            for job in {row.owner for row in finished if isinstance(row.owner, _Job)}:
                if all(row.done for row in job.rows):
                    job.done.set()

    def _admit(self, job: _Job) -> None:
        """Embed the job's prompts and queue its rows; a job that cannot be decoded fails alone."""
        try:
            embeds = self.decoder.embed(job.images, job.instructions)
            rows = [Row(one, limit, owner=job) for one, limit in zip(embeds, job.limits, strict=True)]
            for row in rows:
                self.decoder.check(row)
        except Exception as exc:
            log.warning("rows of a request could not be queued: %s", exc)
            job.fail(exc)
            return
        job.rows = rows
        if not rows:
            job.done.set()
        for row in rows:
            self.decoder.add(row)
