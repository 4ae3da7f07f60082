"""``raddraft worker --queues io|gpu``: a production Celery worker (gpu: one process, one model, a thread per
message up to ``inference_batch_size``, each handing its rows to the process's continuous decoder, where queued
studies share every decoding step: workers/batching.py; ``solo`` at 1).
A gpu worker also answers ``raddraft analyze`` of the same home with its model (raddraft/model_socket.py).
``--http-port`` serves the worker's own ``/healthz`` and ``/metrics`` (core/http.py). ``raddraft serve`` with the
embedded broker runs one of each queue as its children (workers/supervisor.py) with ``--supervised-by``: such a
worker ends when serve does."""

from __future__ import annotations

import argparse
import logging
import threading

from core import metrics
from core.http import OpsServer
from core.settings import Settings
from state.store import episode_state_counts
from workers.celery_app import GPU_QUEUE, IO_QUEUE, configure
from workers.owned_redis import die_with_parent
from worklist import TASK_MODULE as WORKLIST_TASK_MODULE

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", choices=[IO_QUEUE, GPU_QUEUE], required=True, help="queue to consume")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="io worker threads (default 4); the gpu worker always runs one task at a time")
    parser.add_argument("--http-port", type=int, default=None, metavar="PORT",
                        help="serve this worker's /healthz and /metrics on http_bind:PORT (0: a free port)")
    parser.add_argument("--supervised-by", type=int, default=None, metavar="PID",
                        help="a child of raddraft serve (workers/supervisor.py): end when process PID ends")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.supervised_by is not None:
        die_with_parent(args.supervised_by)
    app = configure(settings, task_modules=[WORKLIST_TASK_MODULE])  # the worklist's tasks run on io workers
    if args.queues == GPU_QUEUE:
        # one process, one model; a thread per message so that queued studies share the decoder (workers/batching.py)
        if args.concurrency is not None:
            raise SystemExit("raddraft worker: the gpu queue takes RADDRAFT_INFERENCE_BATCH_SIZE, not --concurrency")
        pool, concurrency = ("solo", 1) if settings.inference_batch_size == 1 else ("threads",
                                                                                     settings.inference_batch_size)
    else:
        pool, concurrency = "threads", args.concurrency or 4
    log.info("Celery worker for queue %s (pool %s, concurrency %d)", args.queues, pool, concurrency)
    # no gossip and no mingle: raddraft workers share nothing with each other (fewer channels to lose with Redis)
    worker = app.Worker(queues=[args.queues], pool_cls=pool, concurrency=concurrency, without_gossip=True,
                        without_mingle=True, loglevel=settings.log_level, hostname=f"raddraft-{args.queues}@%h")
    ops = None
    if args.http_port is not None:  # the counters this worker records (core/metrics.py) live in this process
        if not 0 <= args.http_port <= 65535:
            raise SystemExit(f"raddraft worker: --http-port {args.http_port} is not a TCP port (0-65535)")
        if args.queues == GPU_QUEUE:  # no index on a gpu machine: the queue depths only
            metrics.set_queue_depth_source(metrics.broker_depths(settings))
        else:
            metrics.configure(settings, episode_state_counts(settings.index_path))
        ops = OpsServer(settings.model_copy(update={"http_port": args.http_port}),
                        check_index=args.queues != GPU_QUEUE)  # a gpu worker has no index
        try:
            ops.start()
        except OSError as exc:
            raise SystemExit(f"raddraft worker: {exc}") from exc
    model_socket = None
    if args.queues == GPU_QUEUE:
        from raddraft.analyze_output import start_model_socket  # noqa: PLC0415 - the model stack: gpu workers only

        model_socket = start_model_socket(settings)  # raddraft analyze on this machine uses this worker's model
        # the model is loaded before the first study arrives, not by the first infer task
        threading.Thread(target=_warm_model, args=(settings,), name="raddraft-model-warmup", daemon=True).start()
    try:
        worker.start()
    finally:
        if model_socket is not None:
            model_socket.stop()
        if ops is not None:
            ops.stop()
    return int(worker.exitcode or 0)


def _warm_model(settings: Settings) -> None:
    """Load the gpu worker's model ahead of its first infer task."""
    from workers.inference import warm_up  # noqa: PLC0415 - the model stack: gpu workers only

    warm_up(settings)
