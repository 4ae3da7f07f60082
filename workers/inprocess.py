"""A Celery worker running in a thread of the current process (``raddraft serve`` with the SQLite transport, an
explicit opt-in; the embedded default runs its workers as processes, workers/supervisor.py), watched so that a
dead worker does not go unnoticed (issue 21).

The worker is a threads-pool :class:`celery.worker.WorkController` in a thread. A watchdog thread checks it every
``check_interval_s``:

* **liveness**: the worker's thread is alive (Celery ends it on an "unrecoverable error", e.g. a message its
  consumer cannot take, and a restored message kills the next one too);
* **heartbeat**: the consumer's event loop runs a small callback the watchdog schedules (``consumer.call_soon``),
  so a loop that no longer turns (thread alive, nothing consumed) shows as a heartbeat older than
  ``stale_after_s``: state ``stalled`` (a thread cannot be killed, so it is reported, not restarted).

A worker whose thread ended is restarted (a new WorkController) after a backoff that doubles with each
consecutive death (``restart_backoff_s``, 2x, up to 60 s); each restart is logged. After ``max_restarts``
consecutive deaths (a worker that stays up ``stable_after_s`` starts the count again) it is left ``dead``. The
state (running, restarting, stalled, dead, stopped, the restarts, the last heartbeat) is in :meth:`health`
(``/healthz`` through ``core.http.register_check``) and, with *state_path*, in a small JSON file that
``raddraft status`` reads (:func:`read_state`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the status command reads the state file without importing Celery
    from celery import Celery
    from celery.apps.worker import WorkController

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
RUNNING, RESTARTING, STALLED, DEAD, STOPPED = "running", "restarting", "stalled", "dead", "stopped"
# celery.worker.worker, a child of this one, logs "Unrecoverable error: …" (with exc_info) as a worker ends
_CELERY_WORKER_LOGGER = "celery.worker"


@dataclass
class WorkerState:
    """What the watchdog knows of the worker; the state file holds this (wall-clock times, epoch seconds)."""

    pid: int
    queues: list[str]
    state: str = RUNNING
    since: float = field(default_factory=time.time)  # when *state* began
    restarts: int = 0  # restarts since the gateway started
    consecutive_deaths: int = 0
    last_death: float | None = None
    last_error: str | None = None  # the exception type (no message: it may quote a message's content)
    heartbeat: float | None = None  # the consumer loop's last turn
    max_restarts: int = 0


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file a serve process wrote at *path* (None without one), with ``"process_running"``: whether
    its process still runs (a killed serve leaves its last state behind)."""
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "error": f"{path.name} cannot be read: {exc}", "process_running": False}
    document["process_running"] = _pid_running(int(document.get("pid", 0)))
    return document


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _CrashNote(logging.Handler):
    """Keeps the type of the exception Celery logs as it ends a worker in one of the watched threads."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.by_thread: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None and record.thread is not None:
            self.by_thread[record.thread] = record.exc_info[0].__name__


class InProcessWorker:
    """A threads-pool WorkController consuming *queues*, started and stopped from code, restarted when it dies."""

    def __init__(self, app: Celery, queues: list[str], concurrency: int = 2, *, state_path: Path | None = None,
                 max_restarts: int = 5, restart_backoff_s: float = 2.0, stable_after_s: float = 60.0,
                 check_interval_s: float = 1.0, stale_after_s: float = 60.0) -> None:
        self._app = app
        self.queues = queues
        self._concurrency = concurrency
        self._state_path = state_path
        self._max_restarts = max_restarts
        self._backoff_s = restart_backoff_s
        self._stable_after_s = stable_after_s
        self._check_interval_s = check_interval_s
        self._stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._controller: WorkController | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._started_at = 0.0  # monotonic, of the current controller
        self._beat_pending = False
        self._beat_at: float | None = None  # monotonic
        self._restart_at: float | None = None  # monotonic: when the dead worker is started again
        self._written_at = 0.0
        self._crashes = _CrashNote()
        self.state = WorkerState(pid=os.getpid(), queues=list(queues), max_restarts=max_restarts)

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the in-process worker is already running")
        logging.getLogger(_CELERY_WORKER_LOGGER).addHandler(self._crashes)
        self._stopping.clear()
        self._start_controller()
        self._set_state(RUNNING)
        self._watchdog = threading.Thread(target=self._watch, name="raddraft-worker-watchdog", daemon=True)
        self._watchdog.start()
        log.info("in-process Celery worker consuming %s", ", ".join(self.queues))

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: finish running tasks, then return."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout)
            self._watchdog = None
        with self._lock:
            controller, thread = self._controller, self._thread
        if controller is not None and thread.is_alive():
            controller.stop(in_sighandler=False)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("in-process worker did not stop within %.0f s", timeout)
        logging.getLogger(_CELERY_WORKER_LOGGER).removeHandler(self._crashes)
        self._thread = None
        self._set_state(STOPPED)

    @property
    def alive(self) -> bool:
        """The worker's thread is running."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` check: ok while running (or restarting within its bound); not ok stalled or dead."""
        with self._lock:
            state = WorkerState(**asdict(self.state))
        ok = state.state in (RUNNING, RESTARTING)
        detail = {
            RUNNING: "the in-process worker is running",
            RESTARTING: f"the in-process worker died ({state.last_error}); restarting",
            STALLED: f"the in-process worker's loop has not turned for over {self._stale_after_s:.0f} s",
            DEAD: f"the in-process worker is dead since {iso_utc(state.since)} after {state.restarts} restart(s) "
                  f"({state.last_error})",
            STOPPED: "the in-process worker is stopped",
        }[state.state]
        return {"ok": ok, "detail": detail, "state": state.state, "restarts": state.restarts,
                "since": iso_utc(state.since),
                "heartbeat": iso_utc(state.heartbeat) if state.heartbeat is not None else None}

    # --- the watchdog ------------------------------------------------------------------------------------------

    def _start_controller(self) -> None:
        controller = self._app.WorkController(
            pool_cls="threads",
            concurrency=self._concurrency,
            queues=self.queues,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            hostname=f"raddraft-inprocess-{'-'.join(self.queues)}@%h",
        )
        thread = threading.Thread(target=controller.start, name="raddraft-worker", daemon=True)
        with self._lock:
            self._controller, self._thread = controller, thread
            self._started_at = time.monotonic()
            self._beat_pending = False
            self._beat_at = None
        thread.start()

    def _beat(self) -> None:
        """Run by the consumer's event loop: it turned."""
        now = time.monotonic()
        with self._lock:
            self._beat_pending = False
            self._beat_at = now
            self.state.heartbeat = time.time()

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_interval_s):
            try:
                self._check()
            except Exception:  # the watchdog must outlive whatever it trips on
                log.exception("in-process worker watchdog check failed")

    def _check(self) -> None:
        now = time.monotonic()
        if self.state.state == DEAD:
            return
        if self._restart_at is not None:
            if now >= self._restart_at and not self._stopping.is_set():
                self._restart_at = None
                self._start_controller()
                with self._lock:
                    self.state.restarts += 1
                log.warning("in-process worker restarted (%d restart(s) since start-up)", self.state.restarts)
                self._set_state(RUNNING)
            return
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self._on_death(thread)
            return
        self._heartbeat(now)
        if self.state.consecutive_deaths and now - self._started_at >= self._stable_after_s:
            with self._lock:
                self.state.consecutive_deaths = 0  # it stayed up: the next death starts the count again
        if time.time() - self._written_at >= max(5.0, self._check_interval_s):
            self._write()

    def _heartbeat(self, now: float) -> None:
        controller = self._controller
        consumer = getattr(controller, "consumer", None)
        if consumer is not None and not self._beat_pending:
            with self._lock:
                self._beat_pending = True
            consumer.call_soon(self._beat)
        last = self._beat_at if self._beat_at is not None else self._started_at
        if now - last > self._stale_after_s:
            if self.state.state != STALLED:
                log.error("in-process worker: its consumer loop has not turned for %.0f s", now - last)
                self._set_state(STALLED)
        elif self.state.state == STALLED:
            log.warning("in-process worker: its consumer loop turns again")
            self._set_state(RUNNING)

    def _on_death(self, thread: threading.Thread) -> None:
        error = self._crashes.by_thread.pop(thread.ident or 0, None)
        exitcode = getattr(self._controller, "exitcode", None)
        with self._lock:
            self.state.consecutive_deaths += 1
            self.state.last_death = time.time()
            self.state.last_error = error or f"the worker ended with exit code {exitcode}"
            deaths = self.state.consecutive_deaths
        if deaths > self._max_restarts:
            log.error("in-process worker died (%s) %d time(s) in a row: not restarted again; the gateway "
                      "processes nothing until it is restarted", self.state.last_error, deaths)
            self._set_state(DEAD)
            return
        backoff = min(MAX_BACKOFF_S, self._backoff_s * 2 ** (deaths - 1))
        log.error("in-process worker died (%s); restarting it in %.1f s (restart %d of at most %d in a row)",
                  self.state.last_error, backoff, deaths, self._max_restarts)
        self._restart_at = time.monotonic() + backoff
        self._set_state(RESTARTING)

    def _set_state(self, state: str) -> None:
        with self._lock:
            if self.state.state != state:
                self.state.state = state
                self.state.since = time.time()
        self._write()

    def _write(self) -> None:
        """The state file (replaced whole: a reader never sees a part); not fsynced, it is only a status."""
        self._written_at = time.time()
        if self._state_path is None:
            return
        with self._lock:
            document = asdict(self.state)
        write_state(self._state_path, document, "in-process worker")


def write_state(path: Path, document: dict[str, Any], what: str) -> None:
    """Replace the state file :func:`read_state` reads with *document* (whole: a reader never sees a part; not
    fsynced, it is only a status); a file that cannot be written is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(document, indent=2).encode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("%s state %s not written: %s", what, path, exc)


def iso_utc(timestamp: float) -> str:
    """Epoch seconds as the ISO UTC text of the health checks and the state file's readers."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
