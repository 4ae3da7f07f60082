"""Study completeness and hand-off: close idle episodes, queue them in the outbox and publish them to the broker.

A study episode becomes ready after ``study_idle_seconds`` without a new instance. Ready episodes enter the
outbox (state ``queued`` with ``published_at`` NULL) unless an earlier episode of the same study is still in
flight, and the dispatcher publishes each outbox entry until the broker accepts it, retrying every
``handoff_retry_seconds``. Publishing is injected (``publish(study_uid, episode_id, task_id)``) so this module
knows nothing about Celery; a publisher signals a broker it cannot reach with :class:`BrokerUnavailableError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from state.store import StateStore

log = logging.getLogger(__name__)

Publisher = Callable[[str, int, str], None]


class BrokerUnavailableError(Exception):
    """The broker did not take the message (connection refused, timed out, ...)."""


class HandoffDispatcher:
    """Runs :meth:`tick` every *poll_seconds* in a daemon thread until :meth:`stop`."""

    def __init__(
        self, store: StateStore, publish: Publisher, idle_seconds: float, retry_seconds: float, *,
        poll_seconds: float | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publish = publish
        self.idle_seconds = idle_seconds
        self.retry_seconds = retry_seconds
        self.poll_seconds = poll_seconds if poll_seconds is not None else min(0.5, idle_seconds / 4, retry_seconds)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover(self, reset_claimed: bool) -> int:
        """Re-publish episodes a previous run left queued (and, with *reset_claimed*, claimed): tasks are idempotent."""
        count = self.store.requeue_after_restart(self._clock(), reset_claimed=reset_claimed)
        if count:
            log.info("re-publishing %d episode(s) left in flight by a previous run", count)
        return count

    def tick(self) -> None:
        """One pass: close idle episodes, queue ready ones, publish due outbox entries."""
        now = self._clock()
        for episode in self.store.close_idle_episodes(now, self.idle_seconds):
            log.info("study %s episode %d complete: %d instance(s) received, idle for %.1f s",
                     episode.study_instance_uid, episode.episode_id, episode.received, self.idle_seconds)
        for episode in self.store.queue_ready_episodes(now):
            log.debug("study %s episode %d queued for hand-off", episode.study_instance_uid, episode.episode_id)
        for episode in self.store.due_handoffs(now):
            if self._stop.is_set():
                return
            try:
                self.publish(episode.study_instance_uid, episode.episode_id, episode.task_id)
            except BrokerUnavailableError as exc:
                retry_at = self._clock() + self.retry_seconds
                self.store.mark_publish_failed(episode.study_instance_uid, episode.episode_id, retry_at, str(exc))
                log.warning("hand-off of study %s episode %d failed (attempt %d), retrying in %.1f s: %s",
                            episode.study_instance_uid, episode.episode_id, episode.attempts + 1,
                            self.retry_seconds, exc)
                return  # the broker is down: do not hammer it with the rest of the outbox in this pass
            self.store.mark_published(episode.study_instance_uid, episode.episode_id, self._clock())
            log.info("study %s episode %d handed off as task %s", episode.study_instance_uid,
                     episode.episode_id, episode.task_id)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the hand-off dispatcher is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="raddraft-handoff", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                # The dispatcher must outlive a transient fault (e.g. the index busy); log it with its traceback.
                log.exception("hand-off pass failed; retrying in %.1f s", self.retry_seconds)
                self._stop.wait(self.retry_seconds)
                continue
            self._stop.wait(self.poll_seconds)
