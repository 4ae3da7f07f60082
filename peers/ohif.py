"""The OHIF viewer's static build served on loopback, with Orthanc's DICOMweb root behind the same origin.

pytest-free, like tests/peers.py. :class:`OhifServer` serves the ``dist/`` that scripts/bootstrap.sh unpacks from
npm (``@ohif/app``) into .cache/ohif, answers ``/app-config.js`` with a configuration whose one data source is
this server's ``/dicom-web`` (so the browser needs no CORS), and forwards every ``/dicom-web/...`` request to
Orthanc's DICOMweb plugin. Any other path that is not a file gets ``index.html`` (OHIF routes in the browser).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
DICOMWEB_PREFIX = "/dicom-web"
_FORWARDED_HEADERS = ("Content-Type", "Content-Length", "Content-Encoding", "ETag", "Last-Modified")
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


def app_config(origin: str, **overrides: Any) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at *origin*/dicom-web, no study-list detours, no
    confirmation prompts (an SR in the viewport is loaded as measurements at once, as "Yes" to OHIF's
    "Do you want to continue tracking measurements for this study?" does), no investigational-use dialog."""
    root = origin + DICOMWEB_PREFIX
    config: dict[str, Any] = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "orthanc",
            "configuration": {
                "friendlyName": "Orthanc (test)",
                "name": "orthanc",
                "wadoUriRoot": root,
                "qidoRoot": root,
                "wadoRoot": root,
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True},
            },
        }],
        **overrides,
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class OhifServer:
    """OHIF at ``url`` (a free loopback port), its DICOMweb requests forwarded to *dicomweb_url* (Orthanc's)."""

    def __init__(self, dicomweb_url: str, dist: Path = OHIF_DIST, **config_overrides: Any) -> None:
        self.dist = Path(dist)
        self.dicomweb_url = dicomweb_url.rstrip("/")
        self.config_overrides = config_overrides
        self.requests: list[tuple[str, int]] = []  # (path, status) of every request, for a failing test's report
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        if not (self.dist / "index.html").exists():
            raise FileNotFoundError(f"no OHIF build in {self.dist} (scripts/bootstrap.sh fetches @ohif/app)")
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("ohif: " + format, *args)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith(DICOMWEB_PREFIX + "/") or path == DICOMWEB_PREFIX:
                    self._forward()
                elif path == "/app-config.js":
                    self._send(200, app_config(server.url, **server.config_overrides).encode(), "text/javascript")
                else:
                    self._static(path)

            def _static(self, path: str) -> None:
                target = (server.dist / path.lstrip("/")).resolve()
                if not target.is_file() or server.dist.resolve() not in target.parents:
                    target = server.dist / "index.html"
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(200, target.read_bytes(), kind)

            def _forward(self) -> None:
                upstream = server.dicomweb_url + self.path[len(DICOMWEB_PREFIX):]
                headers = {"Accept": self.headers.get("Accept", "*/*")}
                request = urllib.request.Request(upstream, headers=headers, method="GET")
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        body, status = response.read(), response.status
                        forwarded = {k: v for k, v in response.headers.items() if k in _FORWARDED_HEADERS}
                except urllib.error.HTTPError as error:
                    body, status = error.read(), error.code
                    forwarded = {"Content-Type": error.headers.get("Content-Type", "text/plain")}
                forwarded.pop("Content-Length", None)
                self._send(status, body, forwarded.pop("Content-Type", "application/octet-stream"), forwarded)

            def _send(self, status: int, body: bytes, kind: str, extra: dict[str, str] | None = None) -> None:
                server.requests.append((self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                # Cross-origin isolation: cornerstone's workers may use SharedArrayBuffer.
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        logger.info("OHIF %s at %s, DICOMweb from %s", OHIF_VERSION, self.url, self.dicomweb_url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
