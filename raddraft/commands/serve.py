"""``raddraft serve``: the DICOM node, the hand-off dispatcher and (embedded broker) an in-process io worker."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from dicom_node.episodes import HandoffDispatcher
from dicom_node.index import Index
from dicom_node.receive import InstanceReceiver
from dicom_node.scp import DicomNode
from dicom_node.spool import Spool
from raddraft.settings import Settings
from workers.celery_app import IO_QUEUE, configure, publish_prepare
from workers.inprocess import InProcessWorker

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start the in-process io worker even with the embedded broker")


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
    index = Index(settings.index_path)
    app = configure(settings)
    receiver = InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb)
    node = DicomNode(settings, receiver)
    dispatcher = HandoffDispatcher(index, publish_prepare, settings.study_idle_seconds,
                                   settings.handoff_retry_seconds)
    worker = InProcessWorker(app, [IO_QUEUE]) if settings.uses_embedded_broker and not args.no_worker else None

    dispatcher.recover(reset_claimed=settings.uses_embedded_broker)
    node.start()
    try:
        dispatcher.start()
        if worker is not None:
            worker.start()
        log.info("raddraft serving; home %s, broker %s", settings.home,
                 "embedded" if settings.uses_embedded_broker else "external")
        stop.wait()
    finally:
        node.stop()
        dispatcher.stop()
        if worker is not None:
            worker.stop()
        index.close()
    log.info("raddraft stopped")
    return 0
