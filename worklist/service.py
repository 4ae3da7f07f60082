"""The worklist as one service for ``raddraft serve`` (and ``python -m worklist``): the database, the bridge with
the signed-delivery callback, and the HTTP server on ``http_bind:http_port`` that also answers ``/healthz`` and
``/metrics``.

    service = WorklistService(settings)   # after workers.celery_app.configure(settings)
    service.start()                       # moves old signed deliveries, re-publishes pending ones, listens
    ...
    service.stop()
"""

from __future__ import annotations

import logging

from core.http import respond
from core.settings import Settings
from dicom_node.episodes import BrokerUnavailableError
from worklist.app import DEFAULT_REFRESH_MS, WorklistApp
from worklist.bridge import Bridge, QuestionModel
from worklist.delivery import Publisher, SignedDeliveryQueue, celery_publish, import_worklist_deliveries
from worklist.server import RunningServer
from worklist.storage import Store

logger = logging.getLogger(__name__)


class WorklistService:
    """Store + bridge + delivery queue + HTTP server; ``url`` once started."""

    def __init__(self, settings: Settings, model: QuestionModel | None = None, *,
                 publish: Publisher = celery_publish, refresh_ms: int = DEFAULT_REFRESH_MS) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        try:
            self.bridge = Bridge(settings, self.store, model)
            self.deliveries = SignedDeliveryQueue(settings, self.store, publish)
            self.bridge.on_sign(self.deliveries)
            app = WorklistApp(self.bridge, refresh_ms=refresh_ms,
                              ops=lambda method, path, details: respond(settings, method, path, details=details))
            self.server = RunningServer(app, settings.http_bind, settings.http_port)
        except BaseException:
            self.store.close()
            raise

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, republish: bool = True) -> WorklistService:
        """Copy the signed deliveries of the old ``worklist_deliveries`` table into the state store (idempotent);
        *republish*: publish the pending deliveries of signed reports again (their messages may be lost)."""
        import_worklist_deliveries(self.settings, self.store)
        if republish:
            try:
                self.deliveries.republish_pending()
            except BrokerUnavailableError as exc:  # they stay pending for the next start; serving goes on
                logger.warning("pending deliveries of signed reports stay pending: %s", exc)
        self.server.start()
        return self

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.store.close()

    def __enter__(self) -> WorklistService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
