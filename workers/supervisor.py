"""``raddraft serve``'s worker processes with the embedded broker: one ``raddraft worker --queues io`` and one
``--queues gpu`` child, watched and restarted when they die (issue 21).

Each child is a production worker (raddraft/commands/worker.py) of the same settings (environment and
``--config``), started with ``--supervised-by <serve's pid>``: it gets SIGTERM when serve ends, even by kill -9,
so no worker outlives its gateway. Its output goes to serve's. A watchdog thread checks every
``check_interval_s`` that each child still runs; a child that ended is started again after a backoff doubling
with each death in a row (``restart_backoff_s``, 2x, up to 60 s), each restart logged; after ``max_restarts``
deaths in a row (a child that stays up ``stable_after_s`` starts its count again) it is left ``dead``. Messages a
dead child held unacknowledged stay in Redis and are delivered again (the visibility timeout), so a restart
loses nothing.

The state of each child (running, restarting, dead, stopped; restarts, last exit) is in :meth:`health`
(``/healthz``, through ``core.http.register_check``) and in the state file ``raddraft status`` reads
(:func:`workers.inprocess.read_state`: the same file the in-process worker writes, with a ``workers`` entry per
child).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.inprocess import iso_utc, write_state

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
STOP_TIMEOUT_S = 30.0
RUNNING, RESTARTING, DEAD, STOPPED = "running", "restarting", "dead", "stopped"


@dataclass
class ChildState:
    """What the watchdog knows of one child worker (wall-clock times, epoch seconds)."""

    queue: str
    pid: int | None = None
    state: str = RUNNING
    since: float = field(default_factory=time.time)
    restarts: int = 0
    consecutive_deaths: int = 0
    last_death: float | None = None
    last_error: str | None = None  # how it ended: "exit code N" or "killed by SIGNAME"


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _Child:
    def __init__(self, queue: str, argv: list[str], http_port: int | None) -> None:
        self.argv = argv
        self.http_port = http_port
        self.state = ChildState(queue=queue)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # monotonic
        self.restart_at: float | None = None  # monotonic


class WorkerSupervisor:
    """The child workers of one serve: :meth:`start`, :meth:`stop` (SIGTERM: warm shutdown), :meth:`health`."""

    def __init__(self, queues: Sequence[str], *, cli_options: Sequence[str] = (),
                 worker_options: dict[str, Sequence[str]] | None = None, state_path: Path | None = None,
                 max_restarts: int = 5, restart_backoff_s: float = 2.0, stable_after_s: float = 60.0,
                 check_interval_s: float = 0.5, http_host: str | None = None) -> None:
        pid = os.getpid()
        options = worker_options or {}
        self._http_host = http_host
        self._children = []
        for queue in queues:
            # with http_host: each child serves /healthz and /metrics on a port of its own (the same after a restart)
            port = _free_port(http_host) if http_host is not None else None
            http = ["--http-port", str(port)] if port is not None else []
            self._children.append(_Child(queue, [sys.executable, "-m", "raddraft.cli", *cli_options, "worker",
                                                 "--queues", queue, *options.get(queue, ()), *http,
                                                 "--supervised-by", str(pid)], port))
        self._state_path = state_path
        self._max_restarts = max_restarts
        self._backoff_s = restart_backoff_s
        self._stable_after_s = stable_after_s
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._written_at = 0.0

    @property
    def queues(self) -> list[str]:
        return [child.state.queue for child in self._children]

    def metrics_urls(self) -> list[str]:
        """The ``/metrics`` URL of every child now running (with ``http_host``)."""
        with self._lock:
            return [f"http://{self._http_host}:{child.http_port}/metrics" for child in self._children
                    if child.http_port is not None and child.state.state == RUNNING]

    # --- life cycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._watchdog is not None:
            raise RuntimeError("the worker supervisor is already running")
        self._stopping.clear()
        for child in self._children:
            self._spawn(child)
        self._write()
        # the watchdog thread starts the restarted children: it lives as long as they may (PR_SET_PDEATHSIG
        # follows the thread that forked a child)
        self._watchdog = threading.Thread(target=self._watch, name="raddraft-worker-supervisor", daemon=True)
        self._watchdog.start()
        log.info("worker processes: %s", ", ".join(f"{c.state.queue} (pid {c.state.pid})" for c in self._children))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every child (Celery's warm shutdown: running tasks finish), wait, SIGKILL what is left."""
        if self._watchdog is None:
            return
        self._stopping.set()
        self._watchdog.join(timeout)
        self._watchdog = None
        running = [child.process for child in self._children if child.process is not None]
        for process in running:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker process %d did not stop within %.0f s: killed", process.pid, timeout)
                process.kill()
                process.wait(timeout=10)
        with self._lock:
            for child in self._children:
                child.process = None
                child.state.pid = None
                self._set(child, STOPPED)
        self._write()

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` check: ok while every child runs or restarts within its bound; not ok once one is dead."""
        with self._lock:
            states = [ChildState(**asdict(child.state)) for child in self._children]
        details = []
        for state in states:
            details.append({
                RUNNING: f"the {state.queue} worker is running (pid {state.pid})",
                RESTARTING: f"the {state.queue} worker died ({state.last_error}); restarting",
                DEAD: f"the {state.queue} worker is dead since {iso_utc(state.since)} after {state.restarts} "
                      f"restart(s) ({state.last_error})",
                STOPPED: f"the {state.queue} worker is stopped",
            }[state.state])
        return {"ok": all(state.state in (RUNNING, RESTARTING) for state in states), "detail": "; ".join(details),
                "workers": {state.queue: {"state": state.state, "pid": state.pid, "restarts": state.restarts,
                                          "since": iso_utc(state.since), "last_error": state.last_error}
                            for state in states}}

    # --- the watchdog ------------------------------------------------------------------------------------------

    def _spawn(self, child: _Child) -> None:
        # stdout/stderr: serve's own (the worker's log lines join the gateway's)
        process = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL)
        with self._lock:
            child.process = process
            child.state.pid = process.pid
            child.started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_interval_s):
            try:
                self._check()
            except Exception:  # the watchdog must outlive whatever it trips on
                log.exception("worker supervisor check failed")

    def _check(self) -> None:
        now = time.monotonic()
        changed = False
        for child in self._children:
            if child.state.state in (DEAD, STOPPED):
                continue
            if child.restart_at is not None:
                if now >= child.restart_at and not self._stopping.is_set():
                    child.restart_at = None
                    self._spawn(child)
                    with self._lock:
                        child.state.restarts += 1
                        self._set(child, RUNNING)
                    log.warning("%s worker restarted as pid %d (%d restart(s) since start-up)", child.state.queue,
                                child.state.pid, child.state.restarts)
                    changed = True
                continue
            process = child.process
            if process is not None and process.poll() is not None:
                self._on_death(child, process.returncode)
                changed = True
            elif child.state.consecutive_deaths and now - child.started_at >= self._stable_after_s:
                with self._lock:
                    child.state.consecutive_deaths = 0  # it stayed up: the next death starts the count again
        if changed or time.time() - self._written_at >= 5.0:
            self._write()

    def _on_death(self, child: _Child, returncode: int) -> None:
        with self._lock:
            child.process = None
            child.state.pid = None
            child.state.consecutive_deaths += 1
            child.state.last_death = time.time()
            child.state.last_error = _how_it_ended(returncode)
            deaths = child.state.consecutive_deaths
        queue, error = child.state.queue, child.state.last_error
        if deaths > self._max_restarts:
            log.error("%s worker died (%s) %d time(s) in a row: not restarted again; its queue is not consumed "
                      "until raddraft serve is restarted", queue, error, deaths)
            with self._lock:
                self._set(child, DEAD)
            return
        backoff = min(MAX_BACKOFF_S, self._backoff_s * 2 ** (deaths - 1))
        log.error("%s worker died (%s); restarting it in %.1f s (restart %d of at most %d in a row)", queue, error,
                  backoff, deaths, self._max_restarts)
        child.restart_at = time.monotonic() + backoff
        with self._lock:
            self._set(child, RESTARTING)

    @staticmethod
    def _set(child: _Child, state: str) -> None:
        """Under the lock."""
        if child.state.state != state:
            child.state.state = state
            child.state.since = time.time()

    def _write(self) -> None:
        """The state file (replaced whole); not fsynced, it is only a status."""
        self._written_at = time.time()
        if self._state_path is None:
            return
        with self._lock:
            states = [asdict(child.state) for child in self._children]
        worst = next((s for s in (DEAD, RESTARTING, RUNNING, STOPPED) if any(c["state"] == s for c in states)),
                     STOPPED)
        document = {"pid": os.getpid(), "state": worst, "kind": "processes",
                    "restarts": sum(c["restarts"] for c in states), "workers": states,
                    "since": min((c["since"] for c in states if c["state"] == worst), default=time.time())}
        write_state(self._state_path, document, "worker")
