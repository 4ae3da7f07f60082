"""``raddraft serve``: the DICOM node, the hand-off dispatcher, the radiologists' worklist (with ``/healthz`` and
``/metrics``) on the HTTP port and, with the embedded broker, the broker itself and its io and gpu workers.

With no ``broker_url`` this one command is the whole gateway: it starts and owns a redis-server on a unix socket
in its home (workers/owned_redis.py: append-only, fsync always, rewritten as it grows; restarted if it dies) and
runs one ``raddraft worker --queues io`` and one ``--queues gpu`` as child processes, restarted when they die
(workers/supervisor.py; ``/healthz`` says not ok and ``raddraft status`` says since when once one keeps dying).
Redis re-delivers what a dead worker held; at start-up, before any worker runs, every message a previous run's
workers held unacknowledged is put back in its queue at once. The gpu child answers ``raddraft analyze`` on
``<home>/run/model.sock`` (raddraft/model_socket.py), and the worklist's questions too (``SocketAnswerer``): this
process loads no model, and while the gpu child is starting or restarting the Ask box says the model is not
connected. With ``broker_url = "sqla+sqlite:///…"`` (an explicit opt-in) the workers run in this process
(workers/inprocess.py), worklist questions use their model (loaded once, in this process) and work a previous
run left between two stages is published again at start-up (that transport does not re-deliver). With an
external Redis the workers are separate ``raddraft worker`` processes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from redis.exceptions import RedisError

from core import http, metrics
from core.http import Mounts
from core.layout import inprocess_worker_state_path
from core.settings import Settings
from dicom_node.episodes import HandoffDispatcher
from dicom_node.index import Index
from dicom_node.receive import InstanceReceiver
from dicom_node.scp import DicomNode
from dicom_node.spool import Spool
from dicom_node.stow import STOW_PREFIX, StowApp
from raddraft.model_socket import ModelSocketServer, SocketAnswerer, socket_path
from state.store import StateStore, episode_state_counts
from workers.celery_app import GPU_QUEUE, IO_QUEUE, configure, publish_prepare
from workers.child_metrics import include_children
from workers.inprocess import InProcessWorker
from workers.owned_redis import BrokerStartError, OwnedRedis
from workers.redis_transport import restore_unacknowledged
from workers.supervisor import WorkerSupervisor
from worklist import TASK_MODULE as WORKLIST_TASK_MODULE
from worklist.bridge import QuestionModel
from worklist.service import WorklistService

log = logging.getLogger(__name__)
COMPACT_EVERY_S = 10  # how often the embedded broker's append-only file is checked (OwnedRedis.compact)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start the io and gpu workers even with the embedded broker")
    parser.add_argument("--io-threads", type=int, default=None,
                        help="threads of the io worker (default 4, as raddraft worker; 2 in process with the "
                             "SQLite transport)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    settings.home.mkdir(parents=True, exist_ok=True)
    broker: OwnedRedis | None = None
    if settings.uses_embedded_broker:  # first, before any thread: the child is forked with a death signal
        broker = OwnedRedis(settings)
        try:
            broker.start()
        except BrokerStartError as exc:
            raise SystemExit(f"raddraft serve: {exc}") from exc
    try:
        return _serve(args, settings, stop, broker)
    finally:
        if broker is not None:
            broker.stop()


def _serve(args: argparse.Namespace, settings: Settings, stop: threading.Event, broker: OwnedRedis | None) -> int:
    spool = Spool(settings.spool_dir)
    spool.ensure()
    store = StateStore(settings.index_path)
    index = Index(store)
    # /metrics (on the worklist port): studies by episode state from the index, queue depths from the broker
    metrics.configure(settings, episode_state_counts(settings.index_path))
    app = configure(settings, task_modules=[WORKLIST_TASK_MODULE])  # an in-process worker runs them
    receiver = InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb)
    node = DicomNode(settings, receiver)
    dispatcher = HandoffDispatcher(store, publish_prepare, settings.study_idle_seconds,
                                   settings.handoff_retry_seconds)
    in_process = settings.uses_sqlite_broker and not args.no_worker
    children = broker is not None and not args.no_worker
    worklist = WorklistService(settings, _question_model(settings) if in_process or children else None)
    _mount_stow(worklist, settings, receiver)
    workers: list[InProcessWorker | WorkerSupervisor] = []
    if children:
        # two processes, two interpreters: io (prepare, report, deliver) and gpu (infer) use both cores, as the
        # Redis deployment's workers do (bench/burst.py measures it)
        workers = [WorkerSupervisor([IO_QUEUE, GPU_QUEUE], cli_options=_cli_options(args),
                                    worker_options={IO_QUEUE: ["--concurrency", str(args.io_threads or 4)]},
                                    state_path=inprocess_worker_state_path(settings.home),
                                    max_restarts=settings.inprocess_worker_max_restarts,
                                    restart_backoff_s=settings.inprocess_worker_restart_backoff_s,
                                    http_host=_loopback(settings.http_bind))]
        include_children(workers[0].metrics_urls)  # this /metrics sums the workers' task and delivery counts
    elif in_process:
        # one worker for both queues: two Celery WorkControllers in one process do not consume; infer tasks take
        # a process-wide lock (workers/tasks.py), so the model runs one batch at a time in one of these threads
        workers = [InProcessWorker(app, [IO_QUEUE, GPU_QUEUE], concurrency=(args.io_threads or 2) + 1,
                                   state_path=inprocess_worker_state_path(settings.home),
                                   max_restarts=settings.inprocess_worker_max_restarts,
                                   restart_backoff_s=settings.inprocess_worker_restart_backoff_s)]

    # the SQLite transport does not re-deliver: episodes claimed by the previous run's in-process worker and
    # stages it left unfinished are published again. Redis keeps queued and unacknowledged messages; no worker of
    # the owned Redis runs yet, so every unacknowledged one belonged to a worker that is gone: back in its queue.
    dispatcher.recover(reset_claimed=in_process)
    if in_process:
        _republish_stranded(store)
    if children:
        restored = restore_unacknowledged(settings.effective_broker_url)
        if restored:
            log.info("put back %d message(s) the previous run's workers held unacknowledged", restored)
    model_socket: ModelSocketServer | None = None
    node.start()
    try:
        worklist.start()
        dispatcher.start()
        for worker in workers:
            worker.start()
            http.register_check("worker", worker.health)
        if in_process:  # with child workers the gpu child loads the model and answers raddraft analyze
            threading.Thread(target=_warm_model, args=(settings,), name="raddraft-model-warmup", daemon=True).start()
            model_socket = _model_socket(settings)
        log.info("raddraft serving; home %s, broker %s", settings.home,
                 "embedded (owned redis-server)" if broker is not None else
                 "sqlite (in-process workers)" if settings.uses_sqlite_broker else "external")
        ticks = 0
        while not stop.wait(1.0):
            ticks += 1
            if broker is not None:
                _tend(broker, stop, compact=ticks % COMPACT_EVERY_S == 0)
    finally:
        if model_socket is not None:
            model_socket.stop()
        node.stop()
        dispatcher.stop()
        for worker in workers:
            http.register_check("worker", None)
            worker.stop()
        worklist.stop()
        store.close()
    log.info("raddraft stopped")
    return 0


def _tend(broker: OwnedRedis, stop: threading.Event, *, compact: bool) -> None:
    """Start the embedded broker again if it ended; now and then, compact its file (workers/owned_redis.py)."""
    if not broker.running and not stop.wait(0.2):
        log.error("the embedded broker (redis-server) ended; starting it again")
        try:
            broker.start()
        except BrokerStartError as exc:
            log.error("the embedded broker could not be started again: %s", exc)
    elif compact:
        try:
            broker.compact()
        except RedisError as exc:
            log.warning("the embedded broker's file was not compacted: %s", exc)


def _loopback(bind: str) -> str:
    """Where this process reaches a child's ops server bound like its own (an any-address bind: loopback)."""
    return "127.0.0.1" if bind in ("", "0.0.0.0") else "::1" if bind == "::" else bind


def _cli_options(args: argparse.Namespace) -> list[str]:
    """The ``raddraft`` options a child worker needs to read the settings this serve read."""
    options: list[str] = []
    if getattr(args, "config", None) is not None:
        options += ["--config", str(args.config.resolve())]
    if getattr(args, "log_level", None):
        options += ["--log-level", args.log_level]
    return options


def _mount_stow(worklist: WorklistService, settings: Settings, receiver: InstanceReceiver) -> None:
    """Put STOW-RS (``/dicomweb``) in front of the worklist on the HTTP port, if any source is configured."""
    sources = settings.stow_credentials
    if not sources:
        log.info("DICOMweb ingest (STOW-RS) is off: no stow_sources or stow_tokens_file")
        return
    server = worklist.server.server  # the worklist's wsgiref server: its application gets the mounts in front
    mounts = Mounts(server.get_app())
    mounts.mount(STOW_PREFIX, StowApp(receiver, sources, settings.stow_max_request_bytes))
    server.set_app(mounts)
    log.info("DICOMweb ingest (STOW-RS) on %s%s/studies for %d source(s): %s", worklist.url, STOW_PREFIX,
             len(sources), ", ".join(source.name for source in sources))


def _republish_stranded(store: StateStore) -> None:
    from workers.tasks import republish_stranded  # noqa: PLC0415 - the model stack (torch): only with in-process workers

    work = republish_stranded(store)
    if work:
        log.info("published %d stage(s) a previous run left unfinished", len(work))


def _question_model(settings: Settings) -> QuestionModel | None:
    """The model for worklist questions: with in-process workers (the SQLite transport) theirs, in this process;
    with child workers the gpu child's, over the model socket. None (questions answered 'no model') when the
    model's input size is unknown."""
    from workers.pipeline import model_input_size  # noqa: PLC0415 (torch: only when the workers run)

    try:
        size = model_input_size(settings.model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        log.warning("worklist questions are off: %s", exc)
        return None
    if not settings.uses_sqlite_broker:
        return SocketAnswerer(socket_path(settings.home), settings.model, size)
    from worklist.answerer import SharedModelAnswerer  # noqa: PLC0415 (torch: only with in-process workers)

    return SharedModelAnswerer(settings, size)


def _model_socket(settings: Settings) -> ModelSocketServer | None:
    """``raddraft analyze`` answered by this process's model (raddraft/model_socket.py)."""
    from raddraft.analyze_output import start_model_socket  # noqa: PLC0415 (torch: only with in-process workers)

    return start_model_socket(settings)


def _warm_model(settings: Settings) -> None:
    """Load the model before the first study arrives (the in-process gpu worker would load it on first use)."""
    from workers.inference import warm_up  # noqa: PLC0415 (torch: only when the workers run here)

    warm_up(settings)
