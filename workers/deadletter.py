"""The dead-letter table: tasks that failed for good, shown by ``raddraft status`` and re-played by ``raddraft retry``.

A task lands here after its last retry of a transient error, or at once for a permanent one. Recording also
marks what the failure means for the episode: a failed ``infer`` or ``report`` makes the episode ``failed``; a
failed delivery makes that delivery ``dead`` (the episode stays ``reported``; a signed version's is reported to
the worklist for its audit); a failed ``prepare`` keeps the
state workers/prepare.py gave it. A failed ``infer`` or ``report`` is announced to the worklist
(workers/announce.py) so the radiologists see the study failed rather than waiting for a draft. Re-playing undoes
that mark and publishes the same task with the same arguments under a new task id (a delivery task of a name it
replaced, ``raddraft.deliver_dicom`` … ``raddraft.deliver_signed_hl7``, as ``raddraft.deliver`` with its arguments
mapped); every stage is idempotent, so a re-played task that finds its work done exits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.layout import manifest_path
from core.settings import Settings
from core.states import DeliveryState, EpisodeState
from dicom_node.episodes import BrokerUnavailableError
from state.store import DeadLetter, DeliveryKey, StateStore
from workers import announce, celery_app, delivery
from workers.celery_app import (
    DELIVER_TASK,
    INFER_TASK,
    PREPARE_TASK,
    REPORT_TASK,
)

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
# The state a re-played task needs to find its episode in (FAILED is undone to this).
_REPLAY_STATE = {PREPARE_TASK: EpisodeState.QUEUED, INFER_TASK: EpisodeState.PREPARED,
                 REPORT_TASK: EpisodeState.PREPARED}


def episode_of(task_name: str, args: Sequence[Any]) -> tuple[str, int]:
    """(study UID, episode id) of a task's arguments: IDs first, or a request/response message."""
    if task_name in (INFER_TASK, REPORT_TASK):
        message = args[0]
        return str(message["study_instance_uid"]), int(message["episode_id"])
    return str(args[0]), int(args[1])


def delivery_of(task_name: str, args: Sequence[Any]) -> DeliveryKey | None:
    """The delivery a task of *task_name* with *args* does (a name it replaced too); None for another task."""
    if task_name != DELIVER_TASK and task_name not in delivery.LEGACY_TASKS:
        return None
    try:
        return delivery.key_of_args(args, task_name)
    except (delivery.DeliveryError, ValueError, TypeError):
        return None


def current_task(task_name: str, args: list[Any]) -> tuple[str, list[Any]]:
    """The task to publish for a dead letter of *task_name* with *args*: a delivery task of a name it replaced
    becomes ``raddraft.deliver``; any other stays as it is."""
    key = delivery_of(task_name, args) if task_name in delivery.LEGACY_TASKS else None
    return (task_name, args) if key is None else (DELIVER_TASK, delivery.task_args(key))


def record(settings: Settings, task_name: str, task_id: str, args: Sequence[Any], *, error: str, retries: int,
           clock: Callable[[], float] = time.time, publish: announce.Publisher | None = None) -> int:
    """Add a dead letter and mark the episode or delivery it concerns; returns the dead letter's id. A failed
    episode is announced to the worklist with *publish* (default :func:`workers.celery_app.publish`); if the broker
    refuses, the announcement stays pending and is sent again with the stranded work."""
    study_uid, episode_id = episode_of(task_name, args)
    error = error[:MAX_ERROR_CHARS]
    store = StateStore(settings.index_path)
    try:
        letter_id = store.add_dead_letter(task_name, task_id, json.dumps(list(args)), study_uid=study_uid,
                                          episode_id=episode_id, error=error, retries=retries, now=clock())
        key = delivery_of(task_name, args)
        if key is not None:
            if store.delivery(key) is not None:
                store.finish_delivery(key, DeliveryState.DEAD, clock(), error, attempted=False)
                delivery.report_outcome(key, DeliveryState.DEAD, error, publish or celery_app.publish)
        elif task_name in (INFER_TASK, REPORT_TASK) and store.episode(study_uid, episode_id) is not None:
            stage = task_name.rsplit(".", 1)[-1]
            store.set_state(study_uid, episode_id, EpisodeState.FAILED, clock(), error=f"{stage}: {error}",
                            task_run=(stage, "dead-lettered"))
            manifest = manifest_path(settings.home, study_uid, episode_id)
            if manifest.is_file():  # the radiologists see the study as failed rather than waiting for a draft
                reason = announce.dead_letter_reason(task_name, letter_id)
                try:
                    announce.episode_failed(store, study_uid, episode_id, reason, publish or celery_app.publish,
                                            now=clock())
                except BrokerUnavailableError as exc:
                    log.warning("study %s episode %d: the worklist learns of the failure with the stranded work "
                                "(broker refused: %s)", study_uid, episode_id, exc)
    finally:
        store.close()
    log.error("task %s of study %s episode %d dead-lettered as #%d after %d retry(ies): %s", task_id, study_uid,
              episode_id, letter_id, retries, error)
    return letter_id


@dataclass(frozen=True)
class Replayed:
    dead_letter_id: int
    task: str
    task_id: str


Publisher = Callable[[str, list[Any], str], None]


def replay(settings: Settings, ids: Sequence[int] | None, publish: Publisher,
           *, clock: Callable[[], float] = time.time) -> list[Replayed]:
    """Re-publish the dead letters *ids* (None: every one not yet re-played). Unknown or already re-played ids
    raise ``KeyError`` before anything is published."""
    store = StateStore(settings.index_path)
    try:
        pending = {letter.id: letter for letter in store.dead_letters()}
        chosen = sorted(pending) if ids is None else list(ids)
        unknown = [i for i in chosen if i not in pending]
        if unknown:
            raise KeyError(f"dead letter(s) {', '.join(map(str, unknown))} do not exist or were re-played already")
        done = []
        for letter_id in chosen:
            letter = pending[letter_id]
            _undo_mark(store, letter, clock())
            task_id = f"{letter.task_id.split('~replay', 1)[0]}~replay{letter.id}"
            task_name, args = current_task(letter.task, json.loads(letter.args))
            publish(task_name, args, task_id)
            store.mark_replayed(letter.id, clock())
            log.info("dead letter #%d re-played as task %s", letter.id, task_id)
            done.append(Replayed(letter.id, task_name, task_id))
        return done
    finally:
        store.close()


def _undo_mark(store: StateStore, letter: DeadLetter, now: float) -> None:
    key = delivery_of(letter.task, json.loads(letter.args))
    if key is not None:
        store.reopen_delivery(key)
        return
    target = _REPLAY_STATE.get(letter.task)
    if target is not None:
        store.advance(letter.study_instance_uid, letter.episode_id, (EpisodeState.FAILED,), target, now)
