"""Serving the worklist: a threaded ``wsgiref`` server in a background thread.

``worklist/service.py`` runs it on the settings' ``http_bind:http_port`` (``raddraft serve``, ``python -m
worklist``); tests run it on a free port.
"""

from __future__ import annotations

import logging
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from worklist.app import WorklistApp

logger = logging.getLogger(__name__)


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


REQUEST_TIMEOUT_S = 30.0  # a client silent this long mid-request (headers or body) is disconnected


class QuietHandler(WSGIRequestHandler):
    """Access lines at DEBUG through logging (paths hold entry ids only, never patient data); a connection that
    stalls for :data:`REQUEST_TIMEOUT_S` (a slow-loris client, a STOW-RS upload that stops) is closed, so it
    holds a thread and its part files no longer."""

    timeout = REQUEST_TIMEOUT_S  # socketserver.StreamRequestHandler: the connection's socket timeout

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class RunningServer:
    """A server on a background thread; ``url`` is ``http://host:port``; ``stop()`` shuts it down."""

    def __init__(self, app: WorklistApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = make_server(host, port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
        self.host, self.port = str(self.server.server_address[0]), int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="worklist-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> RunningServer:
        self._thread.start()
        logger.info("worklist listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only when it runs
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

