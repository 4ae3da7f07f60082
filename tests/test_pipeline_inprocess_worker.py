"""The in-process worker's watchdog (workers/inprocess.py, issue 21) against a real Celery worker on the embedded
broker, killed by a real fault: a message its consumer cannot take (a task message without an ``id`` header) ends
the worker's thread with Celery's "Unrecoverable error", and the broker restores the message, so the next worker
dies of it too."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from node_helpers import wait_for

from core import probes
from core.settings import Settings
from workers.celery_app import IO_QUEUE, configure
from workers.inprocess import DEAD, RESTARTING, RUNNING, STOPPED, InProcessWorker, read_state


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # the in-process worker runs with the SQLite transport (an explicit opt-in); the embedded default's workers
    # are processes (tests/test_serve_embedded_broker.py)
    return Settings(home=tmp_path / "home", broker_url=f"sqla+sqlite:///{tmp_path / 'home' / 'broker.sqlite'}")


@pytest.fixture
def app(settings: Settings) -> Celery:
    return configure(settings)


def poison(app: Celery) -> None:
    """Publish a task message the consumer chokes on (no ``id``): it raises KeyError out of Celery's strategy."""
    with app.connection_for_write() as connection:
        connection.Producer().publish({"x": 1}, exchange="", routing_key=IO_QUEUE, serializer="json",
                                      headers={"task": "raddraft.prepare"})


def io_depth(settings: Settings) -> int:
    return probes.queue_depths(settings.effective_broker_url, [IO_QUEUE])[IO_QUEUE]


@pytest.fixture
def worker_factory() -> Iterator[list[InProcessWorker]]:
    started: list[InProcessWorker] = []
    yield started
    for worker in started:
        worker.stop(timeout=10)


def start(app: Celery, settings: Settings, started: list[InProcessWorker], **options: Any) -> InProcessWorker:
    worker = InProcessWorker(app, [IO_QUEUE], concurrency=1, state_path=settings.home / "run" / "worker.json",
                             check_interval_s=0.2, **options)
    worker.start()
    started.append(worker)
    wait_for(lambda: worker.health()["heartbeat"] is not None, timeout=30, what="first heartbeat")
    return worker


def test_a_worker_that_keeps_dying_is_restarted_then_left_dead(app, settings, worker_factory, caplog):
    caplog.set_level(logging.WARNING, logger="workers.inprocess")
    worker = start(app, settings, worker_factory, max_restarts=2, restart_backoff_s=0.2)
    assert worker.health() | {"since": None, "heartbeat": None} == {
        "ok": True, "detail": "the in-process worker is running", "state": RUNNING, "restarts": 0, "since": None,
        "heartbeat": None}
    state = read_state(settings.home / "run" / "worker.json")
    assert state is not None and state["state"] == RUNNING and state["process_running"] is True

    poison(app)
    wait_for(lambda: worker.health()["state"] == DEAD, timeout=60, what="worker left dead")
    health = worker.health()
    assert health["ok"] is False and health["restarts"] == 2 and not worker.alive
    assert health["detail"].startswith("the in-process worker is dead since ") and "(KeyError)" in health["detail"]
    state = read_state(settings.home / "run" / "worker.json")
    assert state is not None
    assert (state["state"], state["restarts"], state["last_error"]) == (DEAD, 2, "KeyError")
    messages = [record.getMessage() for record in caplog.records if record.name == "workers.inprocess"]
    assert [m for m in messages if "restarting it in" in m] == [
        "in-process worker died (KeyError); restarting it in 0.2 s (restart 1 of at most 2 in a row)",
        "in-process worker died (KeyError); restarting it in 0.4 s (restart 2 of at most 2 in a row)"]
    assert sum("in-process worker restarted" in m for m in messages) == 2
    assert any("3 time(s) in a row: not restarted again" in m for m in messages)
    assert io_depth(settings) == 1  # the message that kills it is still there (nothing consumed it)

    worker.stop(timeout=10)
    state = read_state(settings.home / "run" / "worker.json")
    assert state is not None and state["state"] == STOPPED


def test_a_worker_restarted_after_its_fault_is_gone_consumes_again(app, settings, worker_factory):
    worker = start(app, settings, worker_factory, max_restarts=3, restart_backoff_s=3.0)
    poison(app)
    wait_for(lambda: worker.health()["state"] == RESTARTING, timeout=30, what="worker dead, restart pending")
    assert worker.health()["ok"] is True  # a restart within its bound is not yet a failure
    with app.connection_for_write() as connection:  # the fault goes away: an operator takes the message off
        queue = connection.SimpleQueue(IO_QUEUE)
        message = queue.get(timeout=5)
        assert message.headers["task"] == "raddraft.prepare" and "id" not in message.headers
        message.ack()
        queue.close()
    wait_for(lambda: worker.health()["state"] == RUNNING and worker.alive, timeout=30, what="worker restarted")
    beat = worker.health()["heartbeat"]
    assert worker.health()["restarts"] == 1

    app.send_task("raddraft.no_such_task", args=[], queue=IO_QUEUE)  # a well-formed message: consumed, discarded
    wait_for(lambda: io_depth(settings) == 0, timeout=30, what="the restarted worker consumes")
    time.sleep(2.5)  # the consumer loop turns at least every 2 s
    assert worker.alive and worker.health()["state"] == RUNNING and worker.health()["heartbeat"] >= beat
    state = read_state(settings.home / "run" / "worker.json")
    assert state is not None and (state["state"], state["restarts"], state["last_error"]) == (RUNNING, 1, "KeyError")


def test_a_worker_that_stays_up_starts_its_death_count_again(app, settings, worker_factory):
    worker = start(app, settings, worker_factory, max_restarts=1, restart_backoff_s=0.2, stable_after_s=1.0)
    for round_ in (1, 2):  # two deaths, each after the worker stayed up: restarted both times, never left dead
        poison(app)
        wait_for(lambda: worker.health()["state"] == RESTARTING, timeout=30, what="dead")
        with app.connection_for_write() as connection:
            queue = connection.SimpleQueue(IO_QUEUE)
            queue.get(timeout=5).ack()
            queue.close()
        wait_for(lambda r=round_: worker.health()["restarts"] == r and worker.health()["state"] == RUNNING,
                 timeout=30, what=f"restart {round_}")
        time.sleep(1.5)  # up for longer than stable_after_s
    assert worker.alive and worker.state.consecutive_deaths == 0


def test_the_sqlite_broker_keeps_no_message_it_delivered(app, settings, worker_factory):
    """Before: kombu marked a delivered row invisible and kept it (0.74 MB a study, every poll scanning them all)."""
    start(app, settings, worker_factory, max_restarts=1)
    for _ in range(20):
        app.send_task("raddraft.no_such_task", args=[], queue=IO_QUEUE)  # consumed and discarded
    wait_for(lambda: io_depth(settings) == 0, timeout=60, what="every message consumed")
    database = sqlite3.connect(settings.home / "broker.sqlite")
    try:
        wait_for(lambda: database.execute("SELECT COUNT(*) FROM kombu_message").fetchone()[0] == 0, timeout=10,
                 what="no message row left")
    finally:
        database.close()
