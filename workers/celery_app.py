"""The Celery application of raddraft: every Celery setting in one place, static routes to the io and gpu queues.

``app`` is module-level (``raddraft worker`` and ``raddraft serve`` start its workers, adding the worklist's task
module, which this layer does not name); :func:`configure` binds it to a
:class:`~core.settings.Settings` (the broker is ``settings.effective_broker_url``: by default the embedded
redis-server ``raddraft serve`` owns, on a unix socket in ``home`` (workers/owned_redis.py); ``redis://`` in
production; ``sqla+sqlite`` as an explicit opt-in). Tasks are idempotent, so they are acknowledged late and
re-queued when a worker dies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from core.settings import Settings, load_settings
from dicom_node.episodes import BrokerUnavailableError
from model import decoders
from workers import redis_transport, sqlite_transport

log = logging.getLogger(__name__)

TASK_PREFIX = "raddraft."
PREPARE_TASK = f"{TASK_PREFIX}prepare"
INFER_TASK = f"{TASK_PREFIX}infer"
REPORT_TASK = f"{TASK_PREFIX}report"
# One delivery task for every output set and kind: [study UID, episode id, output set, kind, destination]
# (workers/delivery.py). The names it replaced may still be in dead letters: workers/deadletter.py maps them.
DELIVER_TASK = f"{TASK_PREFIX}deliver"
DEAD_LETTER_TASK = f"{TASK_PREFIX}dead_letter"
# What the pipeline tells the radiologists' worklist (workers/announce.py): tasks the worklist defines
# (worklist/tasks.py) and the pipeline sends by name, so workers/ never imports worklist/.
WORKLIST_DRAFT_READY_TASK = "worklist.draft_ready"
WORKLIST_EPISODE_FAILED_TASK = "worklist.episode_failed"
WORKLIST_DELIVERY_OUTCOME_TASK = "worklist.delivery_outcome"  # a signed version's delivery ended: its audit line

IO_QUEUE = "io"
GPU_QUEUE = "gpu"

TASK_ROUTES: dict[str, dict[str, str]] = {
    PREPARE_TASK: {"queue": IO_QUEUE},
    REPORT_TASK: {"queue": IO_QUEUE},
    DELIVER_TASK: {"queue": IO_QUEUE},
    DEAD_LETTER_TASK: {"queue": IO_QUEUE},
    WORKLIST_DRAFT_READY_TASK: {"queue": IO_QUEUE},
    WORKLIST_EPISODE_FAILED_TASK: {"queue": IO_QUEUE},
    WORKLIST_DELIVERY_OUTCOME_TASK: {"queue": IO_QUEUE},
    INFER_TASK: {"queue": GPU_QUEUE},
}

CONNECT_TIMEOUT_S = 2.0  # a dead broker must not block the hand-off dispatcher for long
SOCKET_TIMEOUT_S = 10.0
SQLITE_BUSY_TIMEOUT_S = 30.0

PIPELINE_TASK_MODULES = ("workers.tasks",)

# The worklist's task modules are added by whoever starts a worker (``configure(settings, task_modules=…)``,
# raddraft/commands/worker.py and serve.py): this layer does not name the worklist.
app = Celery("raddraft", include=list(PIPELINE_TASK_MODULES))

_bound: dict[str, Settings] = {}


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.uses_sqlite_broker:
        # kombu's sqlalchemy transport passes these to sqlalchemy.create_engine
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    # visibility_timeout: a task whose worker died unacknowledged is re-delivered after this long; the sweep
    # that restores such tasks runs every quarter of it (at most every 10 s), on every call (throttle 1).
    # unacked_mutex_expire: the sweep holds a Redis lock while it runs; a Redis restarted (or a worker killed)
    # during a sweep leaves that lock in the append-only file, and no worker sweeps until it expires. kombu's
    # 300 s would hold back re-delivery far beyond a short visibility timeout, so it is capped at the timeout.
    visibility = settings.broker_visibility_timeout_s
    return {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S,
            "visibility_timeout": visibility, "unacked_restore_interval": max(1, min(10, int(visibility / 4))),
            "unacked_restore_throttle": 1, "unacked_mutex_expire": unacked_mutex_expire(visibility)}


def unacked_mutex_expire(visibility_timeout_s: float) -> int:
    """Seconds the Redis sweep lock lives: the visibility timeout, within 5 s (a sweep's own time) and kombu's
    300 s."""
    return int(min(300, max(5, visibility_timeout_s)))


def _transport(settings: Settings) -> tuple[str, str | None]:
    """(broker URL, kombu transport class): plain Redis, and the embedded broker's unix socket, get the reconnect
    fix of workers/redis_transport.py, SQLite the row deletion of workers/sqlite_transport.py; others (TLS Redis,
    other SQL databases) follow their URL scheme."""
    url = settings.effective_broker_url
    if url.startswith(redis_transport.SOCKET_URL_PREFIX):
        return redis_transport.socket_url(url), redis_transport.SOCKET_TRANSPORT
    if url.startswith(sqlite_transport.URL_PREFIX):  # delivered messages deleted: the file holds what is queued
        return sqlite_transport.transport_url(url), sqlite_transport.TRANSPORT
    return url, redis_transport.TRANSPORT if url.startswith("redis://") else None


def configure(settings: Settings, task_modules: Sequence[str] = ()) -> Celery:
    """Bind :data:`app` to *settings* (call once per process before publishing or starting a worker).

    *task_modules*: modules of tasks defined above this layer (the worklist's) that a worker started from this
    app imports besides :data:`PIPELINE_TASK_MODULES`; publishing needs none (tasks are sent by name).
    """
    if settings.uses_sqlite_broker:
        settings.home.mkdir(parents=True, exist_ok=True)
    broker_url, transport = _transport(settings)
    app.conf.update(
        broker_url=broker_url,
        broker_transport=transport,
        broker_transport_options=_transport_options(settings),
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        task_routes=TASK_ROUTES,
        task_default_queue=IO_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_publish_retry=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # the sqlalchemy transport has no fan-out exchanges, which remote control needs
        worker_enable_remote_control=not settings.uses_sqlite_broker,
        enable_utc=True,
        include=[*PIPELINE_TASK_MODULES, *task_modules],
    )
    _bound["settings"] = settings
    decoders.limit_decoded_size(settings.max_decoded_mb)
    return app


def current_settings() -> Settings:
    """The settings :data:`app` is bound to; loaded from the environment in a bare ``celery`` worker."""
    if "settings" not in _bound:
        configure(load_settings())
    return _bound["settings"]


def publish_prepare(study_uid: str, episode_id: int, task_id: str) -> None:
    """Send one ``prepare`` task carrying IDs only; raise :class:`BrokerUnavailableError` if the broker refuses."""
    publish(PREPARE_TASK, [study_uid, episode_id], task_id)


def publish(task_name: str, args: list[Any], task_id: str) -> None:
    """Send one task (routed by :data:`TASK_ROUTES`); raise :class:`BrokerUnavailableError` if the broker refuses."""
    try:
        # a fresh connection per message: nothing stale survives a broker restart, and retry=False fails fast
        with app.connection_for_write() as connection:
            app.send_task(task_name, args=args, task_id=task_id, retry=False, connection=connection)
    except (OperationalError, OSError) as exc:
        broker = _redacted(app.conf.broker_url)
        raise BrokerUnavailableError(f"broker {broker} did not accept {task_id}: {exc}") from exc


def _redacted(url: str) -> str:
    """The broker URL without a password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
