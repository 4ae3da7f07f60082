"""A Celery worker running in a thread of the current process (``raddraft serve`` with the embedded broker)."""

from __future__ import annotations

import logging
import threading

from celery import Celery

log = logging.getLogger(__name__)


class InProcessWorker:
    """A threads-pool :class:`celery.worker.WorkController` consuming *queues*, started and stopped from code."""

    def __init__(self, app: Celery, queues: list[str], concurrency: int = 2) -> None:
        self._controller = app.WorkController(
            pool_cls="threads",
            concurrency=concurrency,
            queues=queues,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            hostname=f"raddraft-inprocess-{'-'.join(queues)}@%h",
        )
        self.queues = queues
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the in-process worker is already running")
        self._thread = threading.Thread(target=self._controller.start, name="raddraft-worker", daemon=True)
        self._thread.start()
        log.info("in-process Celery worker consuming %s", ", ".join(self.queues))

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: finish running tasks, then return."""
        if self._thread is None:
            return
        self._controller.stop(in_sighandler=False)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("in-process worker did not stop within %.0f s", timeout)
        self._thread = None
