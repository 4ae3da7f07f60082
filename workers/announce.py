"""What the pipeline tells the radiologists' worklist: a draft is ready, an episode failed for good.

The worklist consumes these as io-queue tasks it defines itself (worklist/tasks.py); the pipeline sends them by
name (``worklist.draft_ready(study_uid, episode_id)``, ``worklist.episode_failed(study_uid, episode_id,
reason)``), so workers/ never imports worklist/ (the layers contract of pyproject.toml). The arguments are IDs and
a reason that holds no patient data.

No announcement is lost: before each send a ``pending`` task run (``worklist-draft`` or ``worklist-failure``) is
recorded in the state store, and the worklist task records ``registered`` once the entry is on the worklist. A
sender whose broker refuses retries like any other stage (the report stage re-runs and sends again); an
announcement still ``pending`` at a restart (a message the broker lost, a sender that gave up) is sent again by
:func:`workers.pipeline.stranded_work` (``raddraft serve`` with in-process workers at start-up, ``raddraft retry
--stranded`` otherwise). Registration is idempotent, so a duplicate is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.states import EpisodeState
from state.store import StateStore
from workers.celery_app import INFER_TASK, REPORT_TASK, WORKLIST_DRAFT_READY_TASK, WORKLIST_EPISODE_FAILED_TASK

log = logging.getLogger(__name__)

Publisher = Callable[[str, list[Any], str], None]  # (task name, arguments, task id), like celery_app.publish

DRAFT_RUN = "worklist-draft"
FAILURE_RUN = "worklist-failure"
PENDING = "pending"
REGISTERED = "registered"
SKIPPED = "skipped"  # a failure announced for an episode that has a draft since (a re-played stage): not shown
RUN_OF_TASK = {WORKLIST_DRAFT_READY_TASK: DRAFT_RUN, WORKLIST_EPISODE_FAILED_TASK: FAILURE_RUN}
# A failure announced for an episode in one of these states is stale: a re-played stage has given it a draft.
PAST_FAILURE = (EpisodeState.REPORTED, EpisodeState.DELIVERED)


def draft_ready(store: StateStore, study_uid: str, episode_id: int, publish: Publisher, *, now: float) -> None:
    """Tell the worklist that the episode's draft (its manifest and ``analysis.json``) is ready."""
    store.record_task_run(DRAFT_RUN, study_uid, episode_id, PENDING, now)
    publish(WORKLIST_DRAFT_READY_TASK, [study_uid, episode_id], f"worklist-draft-{study_uid}-{episode_id}")


def episode_failed(store: StateStore, study_uid: str, episode_id: int, reason: str, publish: Publisher, *,
                   now: float) -> None:
    """Tell the worklist that the episode failed for good; *reason* is shown to the radiologists (no patient data)."""
    store.record_task_run(FAILURE_RUN, study_uid, episode_id, PENDING, now)
    publish(WORKLIST_EPISODE_FAILED_TASK, [study_uid, episode_id, reason],
            f"worklist-failure-{study_uid}-{episode_id}")


def record_outcome(store: StateStore, task_name: str, study_uid: str, episode_id: int, outcome: str, *,
                   now: float) -> None:
    """What the worklist task made of an announcement (``registered``, or ``skipped`` for a stale failure)."""
    store.record_task_run(RUN_OF_TASK[task_name], study_uid, episode_id, outcome, now)


@dataclass(frozen=True)
class Unconsumed:
    """An announcement whose latest run is still ``pending``: ``run`` is ``worklist-draft`` or ``worklist-failure``."""

    run: str
    study_uid: str
    episode_id: int


def unconsumed(store: StateStore) -> list[Unconsumed]:
    """Announcements sent (or about to be) that no worklist task has consumed yet, oldest first."""
    latest: dict[tuple[str, str, int], str] = {}
    for task, study_uid, episode_id, outcome in store.runs_of((DRAFT_RUN, FAILURE_RUN)):
        latest[(task, study_uid, episode_id)] = outcome
    return [Unconsumed(*key) for key, outcome in latest.items() if outcome == PENDING]


def failure_reason(store: StateStore, study_uid: str, episode_id: int) -> str | None:
    """The reason to show again for a failed episode (what the stage that failed sent: the prepare stage's reason,
    or the dead letter of the stage, never the error text of a later stage); None when it is not failed (any more).
    """
    episode = store.episode(study_uid, episode_id)
    if episode is None or episode.state is not EpisodeState.FAILED:
        return None
    error = episode.last_error or ""
    if error.startswith("prepare: "):
        return error
    letters = [letter for letter in store.dead_letters() if letter.task in (INFER_TASK, REPORT_TASK)
               and (letter.study_instance_uid, letter.episode_id) == (study_uid, episode_id)]
    if letters:
        return dead_letter_reason(letters[-1].task, letters[-1].id)
    stage = error.split(":", 1)[0] if ":" in error else "analysis"
    return f"{stage} failed"


def dead_letter_reason(task_name: str, dead_letter_id: int) -> str:
    """What the worklist shows of an episode whose *task_name* was dead-lettered (no error text: no patient data)."""
    return f"{task_name.rsplit('.', 1)[-1]} failed (dead letter #{dead_letter_id})"
