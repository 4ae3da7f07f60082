"""``raddraft serve``: the DICOM node, the hand-off dispatcher, the radiologists' worklist (with ``/healthz`` and
``/metrics``) on the HTTP port and (embedded broker) in-process io and gpu workers, restarted when they die
(``/healthz`` says not ok and ``raddraft status`` says since when once they keep dying: workers/inprocess.py).

With the embedded broker (no ``broker_url``) this one command is the whole gateway: io tasks run in a thread
pool, the model runs in a single gpu thread, and work a previous run left between two stages is published
again at start-up (the embedded broker does not re-deliver a message whose worker died). With Redis the
workers are separate ``raddraft worker --queues io|gpu`` processes and Redis re-delivers. Questions asked on
the worklist go to the in-process model; without in-process workers the worklist answers that no model is
loaded here. With in-process workers ``raddraft analyze`` is answered by the same model on
``<home>/run/model.sock`` (raddraft/model_socket.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

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
from raddraft.model_socket import ModelSocketServer
from state.store import StateStore, episode_state_counts
from workers.celery_app import GPU_QUEUE, IO_QUEUE, configure, publish_prepare
from workers.inprocess import InProcessWorker
from worklist import TASK_MODULE as WORKLIST_TASK_MODULE
from worklist.bridge import QuestionModel
from worklist.service import WorklistService

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start the in-process io and gpu workers even with the embedded broker")
    parser.add_argument("--io-threads", type=int, default=2, help="threads of the in-process io worker (default 2)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    settings.home.mkdir(parents=True, exist_ok=True)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    store = StateStore(settings.index_path)
    index = Index(store)
    # /metrics (on the worklist port): studies by episode state from the index, queue depths from the broker
    metrics.configure(settings, episode_state_counts(settings.index_path))
    app = configure(settings, task_modules=[WORKLIST_TASK_MODULE])  # the in-process worker runs them
    receiver = InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb)
    node = DicomNode(settings, receiver)
    dispatcher = HandoffDispatcher(store, publish_prepare, settings.study_idle_seconds,
                                   settings.handoff_retry_seconds)
    workers: list[InProcessWorker] = []
    in_process = settings.uses_embedded_broker and not args.no_worker
    worklist = WorklistService(settings, _question_model(settings) if in_process else None)
    _mount_stow(worklist, settings, receiver)
    if in_process:
        # one worker for both queues: two Celery WorkControllers in one process do not consume; infer tasks take
        # a process-wide lock (workers/tasks.py), so the model runs one batch at a time in one of these threads
        # watched (workers/inprocess.py): a dead worker is restarted, and /healthz and `raddraft status` say so
        workers = [InProcessWorker(app, [IO_QUEUE, GPU_QUEUE], concurrency=args.io_threads + 1,
                                   state_path=inprocess_worker_state_path(settings.home),
                                   max_restarts=settings.inprocess_worker_max_restarts,
                                   restart_backoff_s=settings.inprocess_worker_restart_backoff_s)]

    dispatcher.recover(reset_claimed=settings.uses_embedded_broker)
    if workers:
        _republish_stranded(store)
    model_socket: ModelSocketServer | None = None
    node.start()
    try:
        worklist.start()
        dispatcher.start()
        for worker in workers:
            worker.start()
            http.register_check("worker", worker.health)
        if workers:
            threading.Thread(target=_warm_model, args=(settings,), name="raddraft-model-warmup", daemon=True).start()
            model_socket = _model_socket(settings)
        log.info("raddraft serving; home %s, broker %s", settings.home,
                 "embedded" if settings.uses_embedded_broker else "external")
        stop.wait()
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
    """The in-process model for worklist questions; None (questions answered 'no model') when it is not there."""
    from workers.pipeline import model_input_size  # noqa: PLC0415 (torch: only when the workers run here)
    from worklist.answerer import SharedModelAnswerer  # noqa: PLC0415

    try:
        size = model_input_size(settings.model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        log.warning("worklist questions are off: %s", exc)
        return None
    return SharedModelAnswerer(settings.model, settings.inference_device, size)


def _model_socket(settings: Settings) -> ModelSocketServer | None:
    """``raddraft analyze`` answered by this process's model (raddraft/model_socket.py)."""
    from raddraft.analyze_output import start_model_socket  # noqa: PLC0415 (torch: only with in-process workers)

    return start_model_socket(settings)


def _warm_model(settings: Settings) -> None:
    """Load the model before the first study arrives (the in-process gpu worker would load it on first use)."""
    from workers.inference import get_model  # noqa: PLC0415 (torch: only when the workers run here)

    try:
        get_model(settings.model, settings.inference_device)
    except Exception:
        log.exception("model %s could not be loaded ahead of time; the first infer task will report why",
                      settings.model)
