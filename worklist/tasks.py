"""The worklist's io-queue Celery tasks, sent by the pipeline by name: drafts and failures in, and how the
deliveries of signed reports ended.

* ``worklist.draft_ready(study_uid, episode_id)``: the report stage wrote the episode's draft (its manifest and
  ``analysis.json``); put it on the worklist (:meth:`worklist.bridge.Bridge.register_draft`).
* ``worklist.episode_failed(study_uid, episode_id, reason)``: the episode failed for good (the prepare stage, or
  the dead letter of ``infer``/``report``); show it failed with *reason* (no patient data), unless a re-played
  stage has reported it since (the state store says ``reported``/``delivered``).
* ``worklist.delivery_outcome(study_uid, episode_id, output_set, kind, destination, state, detail)``: the
  pipeline's delivery task (or its dead letter) ended a signed version's delivery ``done``, ``skipped`` or
  ``dead``; write the audit line (``worklist.delivery.audit_outcome``). The deliveries themselves are the
  pipeline's (``raddraft.deliver``, workers/delivery.py), their rows in the state store.

Registration is idempotent; each task records what it did in the state store (workers/announce.py) so that an
announcement nobody consumed is sent again with the stranded work. They share the pipeline's base task
(workers/tasks.py): late acknowledgement, re-queued when a worker dies, transient errors (the worklist database
unavailable or locked, a peer down) retried with backoff up to ``task_max_retries``, then a dead letter in the
index (re-played with ``raddraft retry``). A worker knows these tasks once this module is imported: ``raddraft
worker`` and ``raddraft serve`` pass it to :func:`workers.celery_app.configure` (``worklist.TASK_MODULE``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy.exc import OperationalError as DatabaseUnavailableError

from core.layout import analysis_path, manifest_path
from core.settings import Settings
from core.states import DeliveryState
from state.store import StateStore
from workers import announce
from workers.celery_app import (
    WORKLIST_DELIVERY_OUTCOME_TASK,
    WORKLIST_DRAFT_READY_TASK,
    WORKLIST_EPISODE_FAILED_TASK,
    app,
    current_settings,
)
from workers.delivery import key_of_args
from workers.tasks import TRANSIENT_ERRORS, PipelineTask
from worklist.bridge import Bridge
from worklist.delivery import audit_outcome
from worklist.storage import Store

log = logging.getLogger(__name__)

# a database that is down, locked or restarting: the registration is tried again, like a peer that is down
TRANSIENT_REGISTRATION_ERRORS: tuple[type[Exception], ...] = (
    *TRANSIENT_ERRORS, DatabaseUnavailableError, sqlite3.OperationalError,
)

_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def _store() -> Store:
    """One store per database per worker process (opening one creates the schema: not once per task)."""
    settings = current_settings()
    key = settings.database_url or str(settings.home)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store.from_settings(settings)
        return _stores[key]


# ---------------------------------------------------------------------------------------------- drafts and failures in
def register_draft_of(settings: Settings, store: Store, study_uid: str, episode_id: int) -> int:
    """Put the episode's draft on the worklist (idempotent) and note it consumed; returns the entry id."""
    entry = Bridge(settings, store).register_draft(manifest_path(settings.home, study_uid, episode_id),
                                                   analysis_path(settings.home, study_uid, episode_id))
    _note(settings, WORKLIST_DRAFT_READY_TASK, study_uid, episode_id, announce.REGISTERED)
    return entry


def register_failure_of(settings: Settings, store: Store, study_uid: str, episode_id: int, reason: str) -> int | None:
    """Show the episode failed with *reason* and note it consumed; None (and nothing shown) when the state store
    says a re-played stage has reported the episode since (the failure is stale: its draft is, or will be, there).
    """
    index = StateStore(settings.index_path)
    try:
        episode = index.episode(study_uid, episode_id)
    finally:
        index.close()
    if episode is not None and episode.state in announce.PAST_FAILURE:
        log.info("study %s episode %d is %s: its earlier failure is not shown", study_uid, episode_id, episode.state)
        _note(settings, WORKLIST_EPISODE_FAILED_TASK, study_uid, episode_id, announce.SKIPPED)
        return None
    entry = Bridge(settings, store).register_failure(manifest_path(settings.home, study_uid, episode_id), reason)
    _note(settings, WORKLIST_EPISODE_FAILED_TASK, study_uid, episode_id, announce.REGISTERED)
    return entry


def _note(settings: Settings, task_name: str, study_uid: str, episode_id: int, outcome: str) -> None:
    index = StateStore(settings.index_path)
    try:
        announce.record_outcome(index, task_name, study_uid, episode_id, outcome, now=time.time())
    finally:
        index.close()


def run_announcement(settings: Settings, store: Store, task_name: str, args: list[Any]) -> int | None:
    """Run one announcement here, without a broker (what the task does): *task_name* and *args* as sent."""
    if task_name == WORKLIST_DRAFT_READY_TASK:
        study_uid, episode_id = args
        return register_draft_of(settings, store, str(study_uid), int(episode_id))
    if task_name == WORKLIST_EPISODE_FAILED_TASK:
        study_uid, episode_id, reason = args
        return register_failure_of(settings, store, str(study_uid), int(episode_id), str(reason))
    raise ValueError(f"{task_name!r} is not an announcement the worklist consumes")


class AnnouncementTask(PipelineTask):
    """A registration on the worklist; a database that is unavailable is retried with backoff."""

    def register(self, *args: Any) -> int | None:
        try:
            return run_announcement(current_settings(), _store(), self.name, list(args))
        except TRANSIENT_REGISTRATION_ERRORS as exc:
            self.retry_transient(exc)


@app.task(name=WORKLIST_DRAFT_READY_TASK, base=AnnouncementTask, bind=True)
def draft_ready(self: AnnouncementTask, study_uid: str, episode_id: int) -> int | None:
    """Put the draft the report stage wrote on the worklist."""
    return self.register(study_uid, episode_id)


@app.task(name=WORKLIST_EPISODE_FAILED_TASK, base=AnnouncementTask, bind=True)
def episode_failed(self: AnnouncementTask, study_uid: str, episode_id: int, reason: str) -> int | None:
    """Show an episode that failed for good, with the reason the pipeline gave (no patient data)."""
    return self.register(study_uid, episode_id, reason)


@app.task(name=WORKLIST_DELIVERY_OUTCOME_TASK, base=PipelineTask, bind=True)
def delivery_outcome(self: PipelineTask, study_uid: str, episode_id: int, output_set: str, kind: str,  # noqa: PLR0917
                     destination: str, state: str, detail: str) -> bool:
    """Write the audit line of a signed version's delivery that ended (sent by workers/delivery.py)."""
    key = key_of_args([study_uid, episode_id, output_set, kind, destination])
    try:
        return audit_outcome(_store(), key, DeliveryState(state), detail)
    except TRANSIENT_REGISTRATION_ERRORS as exc:
        self.retry_transient(exc)
