"""A tiny WSGI toolkit: request parsing, responses with security headers, and a regex router.

The standard library's ``wsgiref`` serves it (``worklist/server.py``); nothing here needs a web framework.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

MAX_BODY_BYTES = 1024 * 1024
MAX_ID = 2**31 - 1  # ids in paths: the database's INTEGER (PostgreSQL's is 32-bit; SQLite's 64-bit)

SECURITY_HEADERS = [
    # blob: images: the viewer's tool cursors (Cornerstone3D draws them as SVG blobs)
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                "script-src 'self'; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]


class HTTPError(Exception):
    """Ends a request with a status and a message for the user (never with patient data)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET").upper()
        self.path: str = environ.get("PATH_INFO", "") or "/"
        self.query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        self.query_lists = parse_qs(environ.get("QUERY_STRING", ""))
        self._body: bytes | None = None
        self.params: dict[str, str] = {}

    @property
    def remote_address(self) -> str:
        """The peer's IP address (a TLS proxy in front: the proxy's)."""
        return str(self.environ.get("REMOTE_ADDR") or "-")[:64]

    @property
    def is_https(self) -> bool:
        return self.environ.get("wsgi.url_scheme") == "https"

    def header(self, name: str) -> str | None:
        key = "HTTP_" + name.upper().replace("-", "_")
        if name.lower() == "content-type":
            key = "CONTENT_TYPE"
        return self.environ.get(key) or None

    @property
    def cookies(self) -> dict[str, str]:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(self.environ.get("HTTP_COOKIE", ""))
        except CookieError:
            return {}
        return {key: morsel.value for key, morsel in jar.items()}

    def body(self) -> bytes:
        if self._body is None:
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                raise HTTPError(HTTPStatus.BAD_REQUEST, "Content-Length must be an integer") from None
            if length > MAX_BODY_BYTES:
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
            self._body = self.environ["wsgi.input"].read(length) if length > 0 else b""
        return self._body

    def form(self) -> dict[str, str]:
        text = self.body().decode("utf-8", errors="replace")
        return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}

    def json(self) -> dict[str, Any]:
        if not (self.header("content-type") or "").startswith("application/json"):
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "request body must be application/json")
        try:
            value = json.loads(self.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {exc.msg}") from None
        except RecursionError:  # e.g. 100 000 nested arrays: the parser runs out of stack before the body ends
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body nests JSON arrays or objects too deeply") from None
        if not isinstance(value, dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return value


@dataclass
class Response:
    body: bytes = b""
    status: HTTPStatus = HTTPStatus.OK
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    cache: bool = False

    @classmethod
    def json(cls, value: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
        return cls(json.dumps(value).encode(), status, "application/json")

    @classmethod
    def redirect(cls, location: str) -> Response:
        return cls(b"", HTTPStatus.SEE_OTHER, headers=[("Location", location)])

    def set_cookie(self, name: str, value: str, *, secure: bool, max_age: int | None = None) -> None:
        parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if secure:
            parts.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(parts)))

    def wsgi(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = [("Content-Type", self.content_type), ("Content-Length", str(len(self.body))),
                   *SECURITY_HEADERS, *self.headers]
        if not self.cache:
            headers.append(("Cache-Control", "no-store"))
        start_response(f"{self.status.value} {self.status.phrase}", headers)
        return [self.body]


Handler = Callable[[Request], Response]


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """*pattern*: a path with ``{name}`` (digits for names ending in ``id``, else one path segment)."""
        regex = re.sub(r"\{(\w+)\}", lambda m: rf"(?P<{m[1]}>\d+)" if m[1].endswith("id") else rf"(?P<{m[1]}>[^/]+)",
                       pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))

    def match(self, request: Request) -> Handler:
        allowed = False
        for method, regex, handler in self._routes:
            found = regex.match(request.path)
            if found:
                if method == request.method:
                    request.params = found.groupdict()
                    for name, value in request.params.items():
                        if name.endswith("id") and int(value) > MAX_ID:  # would overflow the database's INTEGER
                            raise HTTPError(HTTPStatus.NOT_FOUND, f"{name.replace('_', ' ')} {value[:40]} does not "
                                                                  f"exist: ids are at most {MAX_ID}")
                    return handler
                allowed = True
        if allowed:
            raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on this path")
        raise HTTPError(HTTPStatus.NOT_FOUND, "no such page")
