"""The operations HTTP endpoint: ``GET /healthz`` and ``GET /metrics`` (stdlib ``http.server`` in a thread).

``/healthz`` answers 200 when every check passes and 503 otherwise, with JSON ``{"status": "ok"}`` or
``{"status": "not ok"}`` and nothing else: paths, broker addresses and free space are for operators. With
*details* (an admin's session on the worklist port) the document adds ``"ok": bool, "checks": {name: {"ok":
bool, "detail": str, …}}``. Checks: the index is readable (read-only, never created), the broker answers within
a short timeout, free disk space in ``home`` is above ``min_free_disk_mb``, and any check the process added with
:func:`register_check` (``raddraft serve``: its in-process worker is alive). ``/metrics`` is
:mod:`core.metrics` in the Prometheus text format.

:func:`respond` is the whole application as a function of the path, so another server (the worklist's WSGI
app) can route the two paths to it instead of opening a second port. :class:`Mounts` puts more WSGI applications
on such a port by path prefix (``raddraft serve`` mounts the DICOMweb ingest, ``dicom_node/stow.py``, in front of
the worklist); ``/healthz`` and ``/metrics`` cannot be mounted over.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from prometheus_client import CONTENT_TYPE_LATEST

from core import metrics, probes
from core.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 10.0
JSON_TYPE = "application/json"


# checks a process adds to /healthz (raddraft serve: its in-process worker), by name: each returns {"ok": bool,
# "detail": str, …} without patient data
HealthCheck = Callable[[], dict[str, Any]]
_CHECKS: dict[str, HealthCheck] = {}
_CHECKS_LOCK = threading.Lock()


def register_check(name: str, check: HealthCheck | None) -> None:
    """Add *check* to ``/healthz`` as *name* (None removes it); its ``ok`` False makes the answer 503."""
    with _CHECKS_LOCK:
        if check is None:
            _CHECKS.pop(name, None)
        else:
            _CHECKS[name] = check


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    content_type: str
    body: bytes


def health(settings: Settings, timeout: float = CHECK_TIMEOUT_S, *, index: bool = True) -> dict[str, Any]:
    """The health document: every check with its outcome (*index* False: a gpu worker, which has no index)."""
    checks: dict[str, dict[str, Any]] = {}
    if index:
        try:
            probes.index_readable(settings.index_path, timeout)
            checks["index"] = {"ok": True, "detail": f"{settings.index_path} is readable"}
        except probes.ProbeError as exc:
            checks["index"] = {"ok": False, "detail": str(exc)}
    try:
        depths = probes.queue_depths(settings.effective_broker_url, metrics.QUEUES, timeout)
        checks["broker"] = {"ok": True, "detail": f"{probes.redact_url(settings.effective_broker_url)} answered",
                            "queue_depths": depths}
    except probes.ProbeError as exc:
        checks["broker"] = {"ok": False, "detail": str(exc)}
    try:
        free = probes.disk_free_mb(settings.home)
        ok = free >= settings.min_free_disk_mb
        rule = "at least" if ok else "below the floor of"
        checks["disk"] = {"ok": ok, "free_mb": round(free, 1), "floor_mb": settings.min_free_disk_mb,
                          "detail": f"{free:.0f} MiB free in {settings.home}, {rule} {settings.min_free_disk_mb:g} MiB"}
    except probes.ProbeError as exc:
        checks["disk"] = {"ok": False, "detail": str(exc)}
    with _CHECKS_LOCK:
        extra = dict(_CHECKS)
    for name, check in extra.items():
        try:
            checks[name] = dict(check())
        except Exception as exc:  # a broken check is a failed check, not a broken /healthz
            checks[name] = {"ok": False, "detail": f"the {name} check failed: {type(exc).__name__}"}
    return {"ok": all(check["ok"] for check in checks.values()), "checks": checks}


def respond(settings: Settings, method: str, path: str, *, index: bool = True, details: bool = False) -> Reply:
    """The reply to one request (*index*: whether ``/healthz`` checks the index; *details*: whether it says what
    each check found, or only ok / not ok)."""
    route = path.split("?", 1)[0]
    if route not in ("/healthz", "/metrics"):
        return Reply(HTTPStatus.NOT_FOUND, JSON_TYPE, b'{"error": "not found: use /healthz or /metrics"}')
    if method not in ("GET", "HEAD"):
        return Reply(HTTPStatus.METHOD_NOT_ALLOWED, JSON_TYPE, b'{"error": "only GET and HEAD are allowed"}')
    if route == "/metrics":
        return Reply(HTTPStatus.OK, CONTENT_TYPE_LATEST, metrics.exposition())
    document = health(settings, index=index)
    if not document["ok"]:
        failed = ", ".join(name for name, check in document["checks"].items() if not check["ok"])
        log.warning("health check failed: %s", failed)
    status = HTTPStatus.OK if document["ok"] else HTTPStatus.SERVICE_UNAVAILABLE
    answer: dict[str, Any] = {"status": "ok" if document["ok"] else "not ok"}
    if details:
        answer.update(document)
    return Reply(status, JSON_TYPE, json.dumps(answer, indent=2).encode())


# a WSGI application (PEP 3333): (environ, start_response) -> body
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
OPS_ROUTES = ("/healthz", "/metrics")


class Mounts:
    """A WSGI application that hands each request under a mounted path prefix to that prefix's application and
    every other request to *fallback* (the longest matching prefix wins).

    A prefix ``/dicomweb`` takes ``/dicomweb`` and ``/dicomweb/…``, not ``/dicomwebx``. The mounted application
    sees the whole path in ``PATH_INFO`` (it is not stripped of the prefix).
    """

    def __init__(self, fallback: WSGIApp) -> None:
        self.fallback = fallback
        self._routes: list[tuple[str, WSGIApp]] = []

    def mount(self, prefix: str, app: WSGIApp) -> None:
        """Route the requests under *prefix* (``/name``, no trailing slash) to *app*."""
        if not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix:
            raise ValueError(f"mount prefix {prefix!r} must start with '/' and not end with one")
        if any(route == prefix or route.startswith(prefix + "/") for route in OPS_ROUTES):
            raise ValueError(f"mount prefix {prefix!r} would hide {', '.join(OPS_ROUTES)}")
        if any(mounted == prefix for mounted, _ in self._routes):
            raise ValueError(f"mount prefix {prefix!r} is already mounted")
        self._routes.append((prefix, app))
        self._routes.sort(key=lambda route: len(route[0]), reverse=True)

    def route(self, path: str) -> WSGIApp:
        """The application that answers *path*."""
        for prefix, app in self._routes:
            if path == prefix or path.startswith(prefix + "/"):
                return app
        return self.fallback

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return self.route(str(environ.get("PATH_INFO", "") or "/"))(environ, start_response)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    server_version = "raddraft"
    sys_version = ""

    def _answer(self, method: str) -> None:
        reply = respond(self.server.settings, method, self.path, index=self.server.check_index,
                        details=self.server.details)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        if reply.status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: Settings, check_index: bool, details: bool) -> None:
        self.settings = settings
        self.check_index = check_index
        self.details = details
        super().__init__((settings.http_bind, settings.http_port), _Handler)


class OpsServer:
    """``/healthz`` and ``/metrics`` on ``settings.http_bind:http_port`` (port 0: a free port), in a thread.

    A process without the index (a gpu worker) passes ``check_index=False``: its health is the broker and disk.
    This port has no sessions: ``/healthz`` says only ok / not ok unless *details* (every check, to anyone who
    reaches the port).
    """

    def __init__(self, settings: Settings, *, check_index: bool = True, details: bool = False) -> None:
        self.settings = settings
        self.check_index = check_index
        self.details = details
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the ops HTTP server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the ops HTTP server is already running")
        try:
            self._server = _Server(self.settings, self.check_index, self.details)
        except OSError as exc:
            raise OSError(f"cannot listen on http_bind {self.settings.http_bind} http_port "
                          f"{self.settings.http_port}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="raddraft-http", daemon=True)
        self._thread.start()
        log.info("health and metrics on http://%s:%d/healthz and /metrics", self.settings.http_bind, self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT_S)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
