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

The worklist's questions (a [vqa] question or a [refer] phrase on one image) take the same socket, so that
``raddraft serve`` with child workers holds the model once, in its gpu worker: the header line is an
:class:`AskRequest` (``"kind": "ask"``, the instruction, the pixels' shape and dtype) followed by exactly the
``3*S*S*4`` bytes of the (3, S, S) float32 little-endian model input, S the served model's input size; anything
else is refused as ``protocol`` before the pixels are read. The reply is an :class:`AnalyzeReply` whose ``text``
is the raw answer. :class:`SocketAnswerer` is the worklist's ``QuestionModel`` over it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

PROTOCOL = 1
HEADER_LIMIT = 64 * 1024
SUN_PATH_LIMIT = 107  # bytes of a Unix socket path (sun_path is 108 bytes with its NUL)
ANSWER_TIMEOUT_S = 300.0  # how long a client waits for its answer (the gateway may be busy with studies)
ASK_TIMEOUT_S = 120.0  # how long a worklist question waits for the gpu worker (a radiologist waits on the page)
INSTRUCTION_LIMIT = 4000  # characters of a question's instruction
PIXEL_DTYPE = "<f4"  # the model input's bytes on the socket: float32, little-endian

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


class AskRequest(BaseModel):
    """The header line of a worklist question, before the ``size`` bytes of the (3, S, S) float32 model input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal[1] = PROTOCOL
    kind: Literal["ask"] = "ask"
    model: str = Field(description="the model asked for, as normalize_model_spec gives it")
    instruction: str = Field(min_length=1, max_length=INSTRUCTION_LIMIT)
    shape: tuple[int, int, int]
    dtype: Literal["<f4"] = PIXEL_DTYPE
    size: int = Field(ge=0, description="bytes of the pixels that follow the header line")


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


@dataclass(frozen=True)
class QuestionHandler:
    """How a server answers :class:`AskRequest` s: the model's input size S and the raw answer to one question
    on (3, S, S) float32 pixels (raising :class:`AnalyzeError` for a question it refuses)."""

    image_size: int
    answer: Callable[[AskRequest, np.ndarray], str]


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
    """Serves :class:`AnalyzeRequest` s at *path* with *handler*, and :class:`AskRequest` s with *questions*
    (refused without), one at a time, in a daemon thread."""

    def __init__(self, path: Path, handler: Handler, max_bytes: int, read_timeout_s: float = 30.0,
                 questions: QuestionHandler | None = None) -> None:
        self.path = path
        self._handler = handler
        self._questions = questions
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
        if _is_question(line):
            return self._ask(stream, line)
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


    def _ask(self, stream: io.BufferedReader, line: bytes) -> AnalyzeReply:
        if self._questions is None:
            return _refused("this gateway answers no questions (its model's input size is unknown)")
        try:
            request = AskRequest.model_validate_json(line)
        except ValidationError as exc:
            return _refused(f"the request header is not a question request: {exc.errors()[0]['msg']}")
        side = self._questions.image_size
        expected = 3 * side * side * 4
        if request.shape != (3, side, side) or request.size != expected:
            return _refused(f"the pixels are {request.shape} in {request.size} bytes; this model takes (3, {side}, "
                            f"{side}) float32: exactly {expected} bytes")
        pixels = np.frombuffer(_read_exactly(stream, expected), dtype=PIXEL_DTYPE).reshape(3, side, side).copy()
        if not np.isfinite(pixels).all():
            return AnalyzeReply(ok=False, kind="input", error="the pixels hold NaN or infinite values")
        started = time.perf_counter()
        try:
            text = self._questions.answer(request, pixels)
        except AnalyzeError as exc:
            return AnalyzeReply(ok=False, kind=exc.kind, error=str(exc))
        except Exception as exc:  # the gateway keeps serving; the worklist hears why its question failed
            log.exception("model socket: a question failed")
            return AnalyzeReply(ok=False, kind="internal", error=f"the question failed in the gateway: {exc}")
        log.info("model socket: answered a question in %.2f s", time.perf_counter() - started)
        return AnalyzeReply(ok=True, text=text)


def _is_question(line: bytes) -> bool:
    """True for a header line that is a JSON object naming a ``kind`` (analyze requests have none)."""
    try:
        header = json.loads(line)
    except ValueError:
        return False
    return isinstance(header, dict) and "kind" in header


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
    return _request(path, request.model_dump_json().encode(), data, timeout_s)


def request_answer(path: Path, model: str, instruction: str, pixels: np.ndarray,
                   timeout_s: float = ASK_TIMEOUT_S) -> AnalyzeReply:
    """Ask the server at *path* one question on *pixels* ((3, S, S), sent as float32); its reply's ``text`` is
    the raw answer. Raises as :func:`request_analysis`."""
    if pixels.ndim != 3:
        raise ValueError(f"the pixels of a question are (3, S, S), not {pixels.shape}")
    data = np.ascontiguousarray(pixels, dtype=PIXEL_DTYPE).tobytes()
    request = AskRequest(model=model, instruction=instruction, shape=pixels.shape, size=len(data))
    return _request(path, request.model_dump_json().encode(), data, timeout_s)


def _request(path: Path, header: bytes, data: bytes, timeout_s: float) -> AnalyzeReply:
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
            client.sendall(header + b"\n")
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


class SocketAnswerer:
    """The worklist's ``QuestionModel`` (worklist/bridge.py) answered by the gpu worker's model on *path*
    (``raddraft serve`` with child workers): this process loads no model. *image_size* is the model's input
    size, read from its config without loading it. While nothing answers (the gpu worker is starting,
    restarting or stopped) or the exchange breaks, ``answer`` raises ``ModelUnavailableError``; an input the
    model refuses is a ``ValueError``."""

    def __init__(self, path: Path, model: str, image_size: int, timeout_s: float = ASK_TIMEOUT_S) -> None:
        self._path = path
        self._model = normalize_model_spec(model)
        self._image_size = image_size
        self._timeout_s = timeout_s

    @property
    def image_size(self) -> int:
        return self._image_size

    def answer(self, pixels: np.ndarray, instruction: str) -> str:
        from worklist.bridge import ModelUnavailableError  # noqa: PLC0415 (pydicom: raddraft analyze needs none)

        try:
            reply = request_answer(self._path, self._model, instruction, pixels, self._timeout_s)
        except ModelSocketUnavailable as exc:
            raise ModelUnavailableError(f"the model is not connected: the gpu worker does not answer (starting, "
                                        f"restarting or stopped): {exc}") from None
        except ModelSocketError as exc:
            raise ModelUnavailableError(f"the model is not connected: {exc}") from None
        if reply.ok:
            return reply.text
        if reply.kind == "input":
            raise ValueError(f"the model cannot take this question: {reply.error}")
        raise ModelUnavailableError(f"the gpu worker's model did not answer ({reply.kind}): {reply.error}")
