"""Thin Celery tasks: arguments are IDs (or the inference request/response messages), the work is done by plain
functions tested without a broker (workers/prepare.py, workers/pipeline.py, workers/delivery.py).

Every task is idempotent, acknowledged late and re-queued when its worker dies. Transient errors (a peer or the
broker down, a timeout) are retried with exponential backoff (``task_retry_backoff_s`` doubling up to
``task_retry_backoff_max_s``, at most ``task_max_retries`` times); the retry is explicit rather than
``autoretry_for`` so that these limits come from the settings at run time. A task that fails for good lands in
the dead-letter table (workers/deadletter.py); the gpu worker has no index, so it publishes the dead letter
to the io queue.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, NoReturn

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.signals import task_postrun, task_prerun

from core import metrics
from core.layout import manifest_path
from core.settings import Settings
from core.states import EpisodeState
from dicom_node.episodes import BrokerUnavailableError
from model.payload import InferenceRequest, InferenceResponse
from state.store import StateStore
from workers import announce, deadletter, delivery, pipeline
from workers.batching import ContinuousBatcher
from workers.celery_app import (
    DEAD_LETTER_TASK,
    DELIVER_TASK,
    INFER_TASK,
    PREPARE_TASK,
    REPORT_TASK,
    TASK_PREFIX,
    WORKLIST_DRAFT_READY_TASK,
    WORKLIST_EPISODE_FAILED_TASK,
    app,
    current_settings,
    publish,
)
from workers.inference import continuous_batcher
from workers.prepare import prepare_episode

log = logging.getLogger(__name__)

# One decoder per process: infer tasks in the worker's threads share the model, their rows decode together.
_batchers: dict[str, ContinuousBatcher] = {}
_batchers_lock = threading.Lock()


def _batcher() -> ContinuousBatcher:
    settings = current_settings()
    key = (f"{settings.model}@{settings.inference_device}/{settings.inference_dtype}"
           f"x{settings.inference_batch_size}")
    with _batchers_lock:
        if key not in _batchers:
            _batchers[key] = continuous_batcher(settings)
        return _batchers[key]

# Wall time of every task this process runs (raddraft_task_seconds, by the name after "raddraft."), from the
# worker's own signals: they fire around the task body in whichever thread runs it.
_task_started: dict[str, float] = {}
_task_started_lock = threading.Lock()


@task_prerun.connect
def _time_task(task_id: str, **_: Any) -> None:
    with _task_started_lock:
        _task_started[task_id] = time.perf_counter()


@task_postrun.connect
def _observe_task(task_id: str, task: Task, **_: Any) -> None:
    with _task_started_lock:
        started = _task_started.pop(task_id, None)
    if started is not None and task.name.startswith(TASK_PREFIX):
        metrics.observe_task(task.name.removeprefix(TASK_PREFIX), time.perf_counter() - started)


TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    delivery.TransientDeliveryError, BrokerUnavailableError, ConnectionError, TimeoutError,
)


def backoff_seconds(retries: int, settings: Settings) -> float:
    """Delay before retry number ``retries + 1``: full jitter over an exponentially growing, capped window."""
    window = min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2 ** retries)
    return window / 2 + random.uniform(0.0, window / 2)


def task_id(stage: str, study_uid: str, episode_id: int, detail: str = "") -> str:
    """Deterministic task ids: a re-published stage gets the id of the original."""
    return f"{stage}-{study_uid}-{episode_id}" + (f"-{detail}" if detail else "")


class PipelineTask(Task):
    """Base of the pipeline tasks: late acknowledgement, retries of transient errors, dead letter at the end."""

    acks_late = True
    reject_on_worker_lost = True
    uses_index = True  # False for the gpu task: its dead letter travels through the broker

    def retry_transient(self, exc: Exception) -> NoReturn:
        """Retry after a backoff; after ``task_max_retries`` the error propagates (and :meth:`on_failure` runs)."""
        settings = current_settings()
        countdown = backoff_seconds(self.request.retries, settings)
        log.warning("task %s failed (attempt %d of %d), retrying in %.1f s: %s", self.request.id,
                    self.request.retries + 1, settings.task_max_retries + 1, countdown, exc)
        # an explicit fresh connection: the worker's default producer does not reach the embedded sqla broker
        # from the in-process worker (the retry message was silently lost), and a fresh one survives broker restarts
        with app.connection_for_write() as connection:
            raise self.retry(exc=exc, countdown=countdown, max_retries=settings.task_max_retries,
                             connection=connection)

    def on_failure(self, exc: Exception, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: ExceptionInfo) -> None:
        error = f"{type(exc).__name__}: {exc}"
        retries = int(self.request.retries or 0)
        if self.uses_index:
            deadletter.record(current_settings(), self.name, task_id, list(args), error=error, retries=retries)
        else:
            publish(DEAD_LETTER_TASK, [self.name, task_id, list(args), error, retries], f"dead-letter-{task_id}")


@app.task(name=PREPARE_TASK, base=PipelineTask, bind=True)
def prepare(self: PipelineTask, study_uid: str, episode_id: int) -> str | None:
    """Write the manifest of one study episode, then its inference request, and publish ``infer``.

    A duplicate delivery finds the episode claimed; if it is already prepared, ``infer`` is published again
    (it may be the first delivery's publish that was lost).
    """
    settings = current_settings()
    path = prepare_episode(settings, study_uid, episode_id)
    if path is None:
        store = StateStore(settings.index_path)
        try:
            episode = store.episode(study_uid, episode_id)
        finally:
            store.close()
        if episode is None or episode.state is not EpisodeState.PREPARED:
            return None
    try:
        request = pipeline.prepare_request(settings, study_uid, episode_id)
    except pipeline.StageError as exc:  # nothing the model reads, or nothing decodable: an end state, no retry
        try:
            _end_before_analysis(settings, study_uid, episode_id, exc)
        except BrokerUnavailableError as refused:  # the failure was not announced: the retry announces it
            self.retry_transient(refused)
        return None if path is None else str(path)
    try:
        publish(INFER_TASK, [request.to_message()], task_id("infer", study_uid, episode_id))
    except BrokerUnavailableError as exc:
        self.retry_transient(exc)
    return None if path is None else str(path)


def _end_before_analysis(settings: Settings, study_uid: str, episode_id: int, exc: pipeline.StageError,
                         publish: announce.Publisher = publish) -> None:
    """``not-analysed`` (the gate let nothing through) or ``failed`` (no chosen image could be decoded), with the
    reason in the index: shown by ``raddraft status`` and never re-run at a restart (neither state is stranded).

    A failure is announced to the worklist with *publish* first (the radiologists see why an image study has no
    draft): a refused send raises :class:`BrokerUnavailableError` before the episode ends, so the retried task
    announces it again."""
    not_analysed = isinstance(exc, pipeline.NotAnalysedError)
    state = EpisodeState.NOT_ANALYSED if not_analysed else EpisodeState.FAILED
    reason = str(exc) if not_analysed else f"prepare: {exc}"
    store = StateStore(settings.index_path)
    try:
        if not not_analysed and manifest_path(settings.home, study_uid, episode_id).is_file():
            announce.episode_failed(store, study_uid, episode_id, reason, publish, now=time.time())
        store.advance(study_uid, episode_id, (EpisodeState.PREPARED,), state, time.time(), error=reason,
                      task_run=("prepare", str(state)))
    finally:
        store.close()
    log.info("study %s episode %d ends %s: %s", study_uid, episode_id, state, reason)


class InferTask(PipelineTask):
    uses_index = False


@app.task(name=INFER_TASK, base=InferTask, bind=True)
def infer(self: InferTask, request_message: dict[str, Any]) -> None:
    """Run the model on one request (no spool, no index) and publish ``report`` with the response."""
    request = InferenceRequest.from_message(request_message)
    response = _batcher().submit(request)
    try:
        publish(REPORT_TASK, [response.to_message()],
                task_id("report", request.study_instance_uid, request.episode_id))
    except BrokerUnavailableError as exc:
        self.retry_transient(exc)


@app.task(name=REPORT_TASK, base=PipelineTask, bind=True)
def report(self: PipelineTask, response_message: dict[str, Any]) -> None:
    """Write the outputs to the outbox, announce the draft to the worklist and publish one delivery task per
    pending destination."""
    response = InferenceResponse.from_message(response_message)
    try:
        outcome = pipeline.report_episode(current_settings(), response, publish=publish)
        if outcome is None:
            return
        for key in outcome.deliveries:
            publish(DELIVER_TASK, delivery.task_args(key), delivery.task_id(key))
    except BrokerUnavailableError as exc:
        self.retry_transient(exc)


@app.task(name=DELIVER_TASK, base=PipelineTask, bind=True)
def deliver(self: PipelineTask, study_uid: str, episode_id: int, output_set: str, kind: str,  # noqa: PLR0917
            destination: str) -> bool:
    """Send one output set of one episode (the draft, or a signed version) to one destination: C-STORE (done only
    on Success statuses), STOW-RS (done only when every instance is stored) or MLLP (done only on AA or CA). The
    work is :func:`workers.delivery.run`."""
    settings = current_settings()
    key = delivery.key_of_args([study_uid, episode_id, output_set, kind, destination])
    store = StateStore(settings.index_path)
    try:
        return delivery.run(settings, store, key, publish)
    except delivery.TransientDeliveryError as exc:
        self.retry_transient(exc)
    finally:
        store.close()


@app.task(name=DEAD_LETTER_TASK, acks_late=True, reject_on_worker_lost=True)
def dead_letter(task_name: str, failed_task_id: str, args: list[Any], error: str, retries: int) -> int:
    """Record the dead letter of a task that ran where there is no index (the gpu worker)."""
    return deadletter.record(current_settings(), task_name, failed_task_id, args, error=error, retries=retries)


def republish(work: pipeline.StrandedWork, send: announce.Publisher = publish) -> None:
    """Publish (with *send*) a stage a previous run left stranded (see :func:`workers.pipeline.stranded_work`)."""
    if work.stage == "prepare":
        send(PREPARE_TASK, [work.study_uid, work.episode_id], task_id("prepare", work.study_uid, work.episode_id))
        return
    if work.stage == announce.DRAFT_RUN:
        send(WORKLIST_DRAFT_READY_TASK, [work.study_uid, work.episode_id],
             task_id(work.stage, work.study_uid, work.episode_id, "again"))
        return
    if work.stage == announce.FAILURE_RUN:
        send(WORKLIST_EPISODE_FAILED_TASK, [work.study_uid, work.episode_id, work.reason or "failed"],
             task_id(work.stage, work.study_uid, work.episode_id, "again"))
        return
    key = work.delivery
    if key is None:
        raise ValueError(f"stranded work {work} is no stage that can be published")
    send(DELIVER_TASK, delivery.task_args(key), delivery.task_id(key))


def republish_stranded(store: StateStore) -> list[pipeline.StrandedWork]:
    """Publish every stage of *store* a previous run or a broker incident left stranded; returns them."""
    work = pipeline.stranded_work(store)
    for item in work:
        republish(item)
    return work
