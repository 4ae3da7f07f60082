"""The model socket: ``raddraft analyze`` hands its file to the model a running gateway already holds.

Loading torch, transformers and peft takes a fresh process 5–10 s on the 2-core machines here, far longer than
the analysis itself (under 1 s). A gateway (``raddraft serve`` with its in-process workers, or a
``raddraft worker --queues gpu``) keeps its model loaded, so it also listens on a Unix socket,
``<home>/run/model.sock`` (the folder is private to the gateway's user: mode 0700). ``raddraft analyze`` sends its
file there when a gateway of the same home answers and serves the model asked for; otherwise it loads the
model itself. The client side imports neither torch nor pydicom.

Protocol, one request per connection: the client writes one line of JSON, :class:`AnalyzeRequest` (at most
:data:`HEADER_LIMIT` bytes), then exactly ``size`` bytes of the DICOM file; the server answers one line of JSON,
:class:`AnalyzeReply`, and closes. Anything else (garbage, a header that is too long, a size over the gateway's
``max_instance_mb``, a client that stops sending) gets a ``protocol`` error reply where the connection still
allows one, and the server goes on serving. Requests are answered one at a time, in the order they connect.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

PROTOCOL = 1
HEADER_LIMIT = 64 * 1024
SUN_PATH_LIMIT = 107  # bytes of a Unix socket path (sun_path is 108 bytes with its NUL)
ANSWER_TIMEOUT_S = 300.0  # how long a client waits for its answer (the gateway may be busy with studies)

ErrorKind = Literal["input", "model", "protocol", "internal"]
Task = Literal["report", "detection", "refer", "identify", "grounding", "vqa"]
TASK_CHOICES: tuple[str, ...] = get_args(Task)


class AnalyzeRequest(BaseModel):
    """The header line a client sends before the file's bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal[1] = PROTOCOL
    model: str = Field(description="the model asked for, as normalize_model_spec gives it")
    task: Task | None = None
    prompt: str | None = None
    size: int = Field(ge=0, description="bytes of the DICOM file that follow the header line")


class AnalyzeReply(BaseModel):
    """The server's answer: the analysis (``payload`` and ``text`` as ``raddraft analyze`` prints them) or an error.

    ``kind`` says what an error was about: ``input`` (the file: not DICOM, a bad prompt), ``model`` (this gateway
    serves another model), ``protocol`` (the request), ``internal`` (the analysis failed in the gateway).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    payload: dict[str, object] | None = None
    text: str = ""
    error: str = ""
    kind: ErrorKind | None = None


class AnalyzeError(Exception):
    """An analysis the handler refuses, with the reply's ``kind``."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Handler = Callable[[AnalyzeRequest, bytes], AnalyzeReply]


class ModelSocketUnavailable(Exception):
    """Nobody answers at the socket path: the caller analyses in its own process."""


class ModelSocketError(Exception):
    """A gateway took the request but the exchange failed (timeout, broken connection, malformed reply)."""


def normalize_model_spec(spec: str) -> str:
    """``settings.model`` in a form two processes compare: an existing path resolved, a preset name as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def socket_path(home: Path) -> Path:
    """Where the gateway of *home* listens."""
    return home / "run" / "model.sock"


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > SUN_PATH_LIMIT:
        raise ValueError(f"model socket path {path} is {len(os.fsencode(path))} bytes; a Unix socket path has at "
                         f"most {SUN_PATH_LIMIT} (choose a shorter RADDRAFT_HOME)")


def _answers(path: Path) -> bool:
    """True when a server accepts connections at *path*."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def _read_exactly(stream: io.BufferedReader, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the peer closed the connection {size - left} of {size} bytes into the file")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class ModelSocketServer:
    """Serves :class:`AnalyzeRequest` s at *path* with *handler*, one at a time, in a daemon thread."""

    def __init__(self, path: Path, handler: Handler, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.path = path
        self._handler = handler
        self._max_bytes = max_bytes
        self._read_timeout_s = read_timeout_s
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Bind and serve; a stale socket file (no server behind it) is replaced.

        Raises ``ValueError`` for a path too long for a Unix socket and ``FileExistsError`` when another server
        already answers there (a second gateway on the same home).
        """
        _check_length(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)  # only the gateway's user may connect
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise FileExistsError(f"another model server already answers at {self.path}")
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(os.fspath(self.path))
        listener.listen(16)
        listener.settimeout(0.5)  # wakes the accept loop to see stop()
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="raddraft-model-socket", daemon=True)
        self._thread.start()
        log.info("answering raddraft analyze on %s", self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._read_timeout_s + 5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        listener = self._listener  # stop() drops the attribute; this thread keeps its own reference
        assert listener is not None
        while not self._stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("model socket %s: accept failed", self.path)
                time.sleep(0.5)
                continue
            with connection:
                self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        connection.settimeout(self._read_timeout_s)
        try:
            reply = self._exchange(connection)
        except OSError as exc:  # the client went away or stopped sending (timeout, reset): nothing to answer
            log.warning("model socket: a client's request was not read whole: %s", exc)
            return
        try:
            connection.sendall(reply.model_dump_json().encode() + b"\n")
        except OSError as exc:
            log.warning("model socket: the answer could not be sent back: %s", exc)

    def _exchange(self, connection: socket.socket) -> AnalyzeReply:
        with connection.makefile("rb") as stream:
            return self._read_and_handle(stream)

    def _read_and_handle(self, stream: io.BufferedReader) -> AnalyzeReply:
        line = stream.readline(HEADER_LIMIT + 1)
        if not line.endswith(b"\n"):
            what = "is longer than 64 KiB" if len(line) > HEADER_LIMIT else "ended before its newline"
            return _refused(f"the request header {what}")
        try:
            request = AnalyzeRequest.model_validate_json(line)
        except ValidationError as exc:
            return _refused(f"the request header is not an analyze request: {exc.errors()[0]['msg']}")
        if request.size > self._max_bytes:
            return _refused(f"the file is {request.size} bytes; this gateway takes at most {self._max_bytes} "
                            "(max_instance_mb)")
        data = _read_exactly(stream, request.size)
        started = time.perf_counter()
        try:
            reply = self._handler(request, data)
        except AnalyzeError as exc:
            return AnalyzeReply(ok=False, kind=exc.kind, error=str(exc))
        except Exception as exc:  # the gateway keeps serving; the client hears why its analysis failed
            log.exception("model socket: the analysis failed")
            return AnalyzeReply(ok=False, kind="internal", error=f"the analysis failed in the gateway: {exc}")
        log.info("model socket: answered a %s request in %.2f s", request.task or "report",
                 time.perf_counter() - started)
        return reply


def _refused(message: str) -> AnalyzeReply:
    log.warning("model socket: refused a request: %s", message)
    return AnalyzeReply(ok=False, kind="protocol", error=message)


def request_analysis(path: Path, request: AnalyzeRequest, data: bytes,
                     timeout_s: float = ANSWER_TIMEOUT_S) -> AnalyzeReply:
    """Send one request to the server at *path* and return its reply.

    Raises :class:`ModelSocketUnavailable` when nothing answers there (no socket file, a stale one, a path too
    long for a socket), and :class:`ModelSocketError` when the exchange fails after the server took the
    connection.
    """
    try:
        _check_length(path)
    except ValueError as exc:
        raise ModelSocketUnavailable(str(exc)) from exc
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        client.settimeout(5.0)
        try:
            client.connect(os.fspath(path))
        except OSError as exc:  # FileNotFoundError, ConnectionRefusedError (stale file), PermissionError
            raise ModelSocketUnavailable(f"no model server at {path}: {exc.strerror or exc}") from exc
        client.settimeout(timeout_s)
        try:
            client.sendall(request.model_dump_json().encode() + b"\n")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                client.sendall(data)  # a server that refused the header has closed: its reply says why
            with client.makefile("rb") as answer:
                line = answer.readline()
        except TimeoutError as exc:
            raise ModelSocketError(f"the gateway at {path} did not answer within {timeout_s:.0f} s") from exc
        except OSError as exc:
            raise ModelSocketError(f"the exchange with the gateway at {path} failed: {exc}") from exc
    if not line:
        raise ModelSocketError(f"the gateway at {path} closed the connection without an answer")
    try:
        return AnalyzeReply.model_validate(json.loads(line))
    except (ValueError, ValidationError) as exc:
        raise ModelSocketError(f"the gateway at {path} sent a malformed answer: {exc}") from exc
