"""Thin Celery tasks: arguments are IDs, the work is done by plain functions tested without a broker."""

from __future__ import annotations

from workers.celery_app import PREPARE_TASK, app, current_settings
from workers.prepare import prepare_episode


@app.task(name=PREPARE_TASK, acks_late=True, reject_on_worker_lost=True)
def prepare(study_uid: str, episode_id: int) -> str | None:
    """Write the manifest of one study episode; a duplicate delivery finds the episode claimed and does nothing."""
    path = prepare_episode(current_settings(), study_uid, episode_id)
    return None if path is None else str(path)
