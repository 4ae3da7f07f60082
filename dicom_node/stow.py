"""DICOMweb ingest: STOW-RS (PS3.18 10.5) ``POST /dicomweb/studies[/{StudyInstanceUID}]`` as a WSGI application.

For sources that only speak DICOMweb. Each instance goes through the same :meth:`InstanceReceiver.receive` as a
C-STORE (checks, durable spool write, index row, episode), with the source's name as the calling AE and the
client's address as the peer address; the response is sent only after every instance has been decided, so an
instance named stored in it is on disk and indexed.

The request is ``multipart/related; type="application/dicom"; boundary=…`` with one DICOM Part 10 file per part,
its body sized by ``Content-Length`` or sent chunked. It is never held in memory: :class:`MultipartSplitter`
cuts the stream at the boundary in bounded pieces (:data:`READ_BYTES` at a time) and writes each part to its own
file in the spool's ``tmp`` (where staging hard-links it rather than copying it). Only a whole request is stored:
a body that ends early (the client went away), breaks the multipart syntax or passes ``max_request_bytes`` stores
nothing, and its part files are removed. A part larger than the receiver's ``max_instance_bytes`` stops being
written at that size and fails with 0xA700.

Answers (``application/dicom+json``, the Store Instances Response Module: Retrieve URL (0008,1190) empty, as this
gateway serves no WADO-RS; Referenced SOP Sequence (0008,1199) of the stored instances; Failed SOP Sequence
(0008,1198) with a Failure Reason (0008,1197) per refused instance):

* 200 every instance stored, 202 some stored and some failed, 409 none stored;
* 400 a malformed request (no boundary, broken multipart, no part, a bad Study Instance UID in the path);
* 401 no bearer token, or one that matches no source (``WWW-Authenticate: Bearer``); nothing is read or stored;
* 404 another path under ``/dicomweb``; 405 another method than POST; 411 no length and not chunked;
* 413 a body over ``max_request_bytes``; 415 not ``multipart/related`` of ``application/dicom``;
* 503 the request cannot be written to the spool's disk.

Sources and tokens come from the settings (``stow_sources``, ``stow_tokens_file``). A presented token is compared
with every source's token, always all of them, as SHA-256 digests with :func:`hmac.compare_digest` (constant time,
no length leak, no early exit). The log names the source and the client address, never a token; the instances'
log lines are the receiver's (UIDs, no patient identifiers).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydicom.filereader import read_file_meta_info
from pynetdicom import AllStoragePresentationContexts

from core import metrics
from core.layout import InvalidUIDError, validate_uid
from core.settings import StowSource
from dicom_node.receive import IncomingInstance, InstanceReceiver
from dicom_node.scp import TRANSFER_SYNTAXES
from dicom_node.statuses import StoreStatus, StowFailureReason

log = logging.getLogger(__name__)

STOW_PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
JSON_TYPE = "application/json"
READ_BYTES = 64 * 1024  # bytes read from the socket at a time: with a boundary's tail, a request's memory bound
MAX_PART_HEADER_BYTES = 16 * 1024  # the header block of one part
MAX_CHUNK_LINE_BYTES = 1024  # a chunk-size line of a chunked body (with extensions), or a trailer line
# RFC 2046 says at most 70; Orthanc's DICOMweb plugin sends 73 (two UUIDs): taken, within a bound
MAX_BOUNDARY_LENGTH = 256
MAX_PARTS = 10_000  # parts of one request: each is a file until the request is decided
# Bytes of a refused request's body read and discarded before the answer, so that a client that sends its whole
# body before reading the answer (most do) reads it instead of a connection reset; a larger body is not read.
DRAIN_BYTES = 8 * 1024 * 1024
_STUDIES_ROUTE = re.compile(r"^/dicomweb/studies(?:/(?P<study>[^/]+))?/?$")
STORAGE_SOP_CLASSES = frozenset(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
SUPPORTED_TRANSFER_SYNTAXES = frozenset(str(syntax) for syntax in TRANSFER_SYNTAXES)
# the receiver's C-STORE status -> the Failure Reason of PS3.18 10.5.3 (C-STORE's 0xC210 is STOW-RS's 0xC000)
FAILURE_REASONS = {
    StoreStatus.OUT_OF_RESOURCES: StowFailureReason.OUT_OF_RESOURCES,
    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS: StowFailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    StoreStatus.CANNOT_UNDERSTAND: StowFailureReason.CANNOT_UNDERSTAND,
}


class RequestError(Exception):
    """A request answered with *status* and *message* (JSON ``{"error": message}``) before any instance is stored."""

    def __init__(self, status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


class BodyEndedError(RequestError):
    """The body ended (or the connection failed) before its declared end: the client went away."""

    def __init__(self, message: str) -> None:
        super().__init__(HTTPStatus.BAD_REQUEST, message)


class BodyTooLargeError(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"the request body is over the limit of {limit / 1024 / 1024:g} MiB (stow_max_request_mb)")


class MalformedError(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(HTTPStatus.BAD_REQUEST, message)


class RequestBody:
    """A request body as a stream of at most *limit* bytes: ``Content-Length`` bytes of *stream*, or (*length*
    None) *stream* decoded from the chunked transfer coding. :meth:`read` returns ``b""`` at its end and raises
    :class:`BodyEndedError` when the stream ends (or fails) before, :class:`BodyTooLargeError` past *limit*."""

    def __init__(self, stream: BinaryIO, length: int | None, limit: int) -> None:
        self._stream = stream
        # read1: what the socket has (one read), where read(n) would wait for n bytes; WSGI only promises read
        self._read = getattr(stream, "read1", stream.read)
        self._left = length  # Content-Length bytes still to read; None: chunked
        self._chunk_left = 0
        self._done = length == 0
        self.limit = limit
        self.consumed = 0

    def read(self, size: int = READ_BYTES) -> bytes:
        if self._done:
            return b""
        if self._left is not None:
            data = self._read_raw(min(size, self._left))
            self._left -= len(data)
            self._done = self._left == 0
        else:
            if self._chunk_left == 0:
                self._chunk_left = self._next_chunk_size()
                if self._chunk_left == 0:
                    self._read_trailers()
                    self._done = True
                    return b""
            data = self._read_raw(min(size, self._chunk_left))
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and self._read_line() != b"":
                raise MalformedError("a chunk of the chunked body is not followed by CRLF")
        self.consumed += len(data)
        if self.consumed > self.limit:
            raise BodyTooLargeError(self.limit)
        return data

    def drain(self, most: int) -> None:
        """Read and discard up to *most* more bytes (the rest of a refused request); errors end it quietly."""
        discarded = 0
        self.limit = max(self.limit, self.consumed + most)
        try:
            while discarded < most and (data := self.read(min(READ_BYTES, most - discarded))):
                discarded += len(data)
        except (RequestError, OSError):
            return

    def _read_raw(self, size: int) -> bytes:
        try:
            data = self._read(size)
        except OSError as exc:  # reset, timeout
            raise BodyEndedError(f"the connection failed during the body: {exc}") from exc
        if not data:
            raise BodyEndedError(f"the body ended after {self.consumed} bytes, before its declared end")
        return data

    def _read_line(self) -> bytes:
        """One CRLF-terminated line of the chunked coding, without its CRLF."""
        try:
            line = self._stream.readline(MAX_CHUNK_LINE_BYTES + 1)
        except OSError as exc:
            raise BodyEndedError(f"the connection failed during the body: {exc}") from exc
        if not line:
            raise BodyEndedError(f"the chunked body ended after {self.consumed} bytes, before its last chunk")
        if len(line) > MAX_CHUNK_LINE_BYTES or not line.endswith(b"\r\n"):
            raise MalformedError("a line of the chunked body is too long or not terminated by CRLF")
        return line[:-2]

    def _next_chunk_size(self) -> int:
        text = self._read_line().split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", text):
            raise MalformedError("a chunk size of the chunked body is not a hexadecimal number")
        return int(text, 16)

    def _read_trailers(self) -> None:
        for _ in range(64):
            if self._read_line() == b"":
                return
        raise MalformedError("the chunked body has too many trailer lines")


@dataclass
class Part:
    """One part of the multipart body, written to *path* (its *size* bytes; with *oversize*, only the first ones)."""

    headers: dict[str, str]
    path: Path
    size: int = 0
    oversize: bool = False


class MultipartSplitter:
    """Cuts a ``multipart/related`` body (RFC 2046) into part files, reading it :data:`READ_BYTES` at a time.

    *make_file*: a new open binary file and its path, for each part. At most :data:`MAX_PARTS` parts; a part is
    written up to *max_part_bytes* + 1 bytes (then marked oversize, the rest discarded). Memory: one read piece
    plus the delimiter's length, or a part's header block (at most :data:`MAX_PART_HEADER_BYTES`).
    """

    def __init__(self, boundary: bytes, make_file: Callable[[], tuple[IO[bytes], Path]], max_part_bytes: int
                 ) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.make_file = make_file
        self.max_part_bytes = max_part_bytes
        self.parts: list[Part] = []  # as they are made, so that a failed request's files can be removed
        self._body: RequestBody | None = None
        self._buffer = b""
        self._ended = False

    def split(self, body: RequestBody) -> list[Part]:
        """Every part of *body*, in order; the body is read to its end."""
        self._body, self._buffer, self._ended = body, b"\r\n", False  # the first delimiter has no CRLF before it
        keep = len(self.delimiter) - 1
        while (start := self._buffer.find(self.delimiter)) < 0:  # the preamble, skipped
            if self._ended:
                raise MalformedError("the body holds no multipart boundary of its Content-Type")
            self._buffer = self._buffer[-keep:]
            self._more()
        self._buffer = self._buffer[start + len(self.delimiter):]
        while True:
            while len(self._buffer) < 2 and not self._ended:
                self._more()
            if self._buffer.startswith(b"--"):  # the close delimiter; the epilogue is read and ignored
                body.drain(DRAIN_BYTES)
                return self.parts
            self._skip_boundary_line_end()
            if len(self.parts) >= MAX_PARTS:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request has over {MAX_PARTS} parts")
            self._part(self._headers())

    def _more(self) -> None:
        assert self._body is not None
        data = self._body.read(READ_BYTES)
        if not data:
            self._ended = True
        self._buffer += data

    def _skip_boundary_line_end(self) -> None:
        """After a delimiter: optional transport padding (spaces, tabs), then CRLF."""
        while (end := self._buffer.find(b"\r\n")) < 0 and not self._ended and len(self._buffer) < 256:
            self._more()
        if end < 0 or self._buffer[:end].strip(b" \t"):
            raise MalformedError("a multipart boundary is not followed by CRLF")
        self._buffer = self._buffer[end + 2:]

    def _headers(self) -> dict[str, str]:
        """The part's header block (names lower-cased), consumed with the empty line after it."""
        while True:
            if self._buffer.startswith(b"\r\n"):
                block, self._buffer = b"", self._buffer[2:]
                break
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                block, self._buffer = self._buffer[:end], self._buffer[end + 4:]
                break
            if len(self._buffer) > MAX_PART_HEADER_BYTES:
                raise MalformedError(f"a part's headers are over {MAX_PART_HEADER_BYTES} bytes")
            if self._ended:
                raise MalformedError("the body ended in a part's headers")
            self._more()
        headers: dict[str, str] = {}
        name = ""
        for line in block.decode("latin-1").split("\r\n"):
            if line[:1] in (" ", "\t") and name:  # a folded continuation line
                headers[name] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MalformedError("a part's header line is not 'Name: value'")
            name = name.strip().lower()
            headers[name] = value.strip()
        return headers

    def _part(self, headers: dict[str, str]) -> None:
        """Write the part's content, up to the next delimiter (consumed), to a new file."""
        handle, path = self.make_file()
        part = Part(headers=headers, path=path)
        self.parts.append(part)
        keep = len(self.delimiter) - 1
        with handle:
            while True:
                end = self._buffer.find(self.delimiter)
                if end >= 0:
                    self._write(handle, part, self._buffer[:end])
                    self._buffer = self._buffer[end + len(self.delimiter):]
                    return
                if self._ended:
                    raise MalformedError("the body ended inside a part, without the closing multipart boundary")
                if len(self._buffer) > keep:
                    self._write(handle, part, self._buffer[:-keep])
                    self._buffer = self._buffer[-keep:]
                self._more()

    def _write(self, handle: IO[bytes], part: Part, data: bytes) -> None:
        if not data:
            return
        part.size += len(data)
        if part.oversize:
            return
        room = self.max_part_bytes + 1 - (part.size - len(data))
        handle.write(data[:room])
        if part.size > self.max_part_bytes:
            part.oversize = True


@dataclass(frozen=True)
class PartResult:
    """What became of one part: the instance it named (UIDs empty when unreadable) and its failure, if any."""

    sop_class_uid: str
    sop_instance_uid: str
    failure: StowFailureReason | None = None


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class SourceTokens:
    """The configured sources' tokens, held as SHA-256 digests; :meth:`match` compares with all of them."""

    def __init__(self, sources: Sequence[StowSource]) -> None:
        self._digests = [(source.name, _token_digest(source.token.get_secret_value())) for source in sources]

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def match(self, presented: str) -> str | None:
        """The name of the source whose token is *presented*, else None: every token is compared, in constant
        time (:func:`hmac.compare_digest` of equal-length digests), whichever matches."""
        digest = _token_digest(presented)
        matched: str | None = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected) and matched is None:
                matched = name
        return matched


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _uid_or_empty(value: object) -> str:
    """*value* when it is a well-formed UID (safe to echo in the response), else ``""``."""
    try:
        return validate_uid(str(value) if value is not None else None, "UID")
    except InvalidUIDError:
        return ""


def _uid_element(uid: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def store_instances_response(results: Sequence[PartResult]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3) in the DICOM JSON model (PS3.18 F)."""
    document: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL: empty, no WADO-RS here
    failed = [{"00081150": _uid_element(r.sop_class_uid), "00081155": _uid_element(r.sop_instance_uid),
               "00081197": {"vr": "US", "Value": [int(r.failure)]}} for r in results if r.failure is not None]
    stored = [{"00081150": _uid_element(r.sop_class_uid), "00081155": _uid_element(r.sop_instance_uid)}
              for r in results if r.failure is None]
    if failed:
        document["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        document["00081199"] = {"vr": "SQ", "Value": stored}
    return document


def _error_reply(error: RequestError) -> Reply:
    body = json.dumps({"error": str(error)}).encode()
    return Reply(error.status, JSON_TYPE, body, tuple(error.headers))


class StowApp:
    """The WSGI application of ``/dicomweb``: STOW-RS for the *sources*, into *receiver*.

    *max_request_bytes*: the largest request body; *tmp_dir*: where the parts are written (default: the receiver's
    spool ``tmp``, so that staging hard-links them and a crash's leftovers are removed at the next start).
    """

    def __init__(self, receiver: InstanceReceiver, sources: Sequence[StowSource], max_request_bytes: int, *,
                 tmp_dir: Path | None = None) -> None:
        if not sources:
            raise ValueError("STOW-RS needs at least one source (stow_sources or stow_tokens_file)")
        self.receiver = receiver
        self.tokens = SourceTokens(sources)
        self.max_request_bytes = max_request_bytes
        self.tmp_dir = tmp_dir if tmp_dir is not None else receiver.spool.tmp_dir

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            reply = self.respond(environ)
        except Exception:
            log.exception("STOW-RS request failed")
            reply = Reply(HTTPStatus.INTERNAL_SERVER_ERROR, JSON_TYPE, b'{"error": "internal error; see the log"}')
        headers = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                   ("Cache-Control", "no-store"), *reply.headers]
        start_response(f"{reply.status.value} {reply.status.phrase}", headers)
        return [reply.body]

    def respond(self, environ: dict[str, Any]) -> Reply:
        """The reply to one request (its body read from ``wsgi.input``)."""
        peer = str(environ.get("REMOTE_ADDR", "?"))
        route = _STUDIES_ROUTE.match(str(environ.get("PATH_INFO", "")))
        body: RequestBody | None = None
        try:
            if route is None:
                raise RequestError(HTTPStatus.NOT_FOUND, "not found: this gateway serves STOW-RS on "
                                   "POST /dicomweb/studies[/{StudyInstanceUID}] only")
            if environ.get("REQUEST_METHOD") != "POST":
                raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "only POST (STOW-RS) is served here",
                                   [("Allow", "POST")])
            body, length = self._body(environ)
            source = self._authenticate(environ, peer)
            if length is not None and length > self.max_request_bytes:
                raise BodyTooLargeError(self.max_request_bytes)
            boundary = self._boundary(str(environ.get("CONTENT_TYPE", "")))
            study = route.group("study")
            if study is not None:
                try:
                    validate_uid(study, "Study Instance UID of the path")
                except InvalidUIDError as exc:
                    raise MalformedError(str(exc)) from exc
            self._check_disk(environ)
        except RequestError as exc:
            if exc.status != HTTPStatus.UNAUTHORIZED:  # logged by _authenticate
                log.warning("STOW-RS request from %s refused: HTTP %d %s", peer, exc.status.value, exc)
            if body is not None:
                body.drain(DRAIN_BYTES)
            return _error_reply(exc)
        return self._store(body, boundary, source, peer, study)

    # --- the request, before its body ---------------------------------------------------------------------
    def _body(self, environ: dict[str, Any]) -> tuple[RequestBody, int | None]:
        """The body to read (at most ``max_request_bytes`` of it) and its Content-Length (None: chunked)."""
        stream = environ["wsgi.input"]
        if "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower():
            return RequestBody(stream, None, self.max_request_bytes), None
        text = str(environ.get("CONTENT_LENGTH", "") or "").strip()
        if not text:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a STOW-RS request needs a Content-Length or a chunked "
                               "body")
        if not text.isdigit():
            raise MalformedError("Content-Length is not a number")
        return RequestBody(stream, int(text), self.max_request_bytes), int(text)

    def _authenticate(self, environ: dict[str, Any], peer: str) -> str:
        token = bearer_token(str(environ.get("HTTP_AUTHORIZATION", "")))
        source = self.tokens.match(token) if token is not None else None
        if source is not None:
            return source
        reason = "no bearer token" if token is None else "a bearer token that matches no source"
        log.warning("STOW-RS request from %s refused: %s", peer, reason)
        challenge = 'Bearer realm="raddraft"' + ('' if token is None else ', error="invalid_token"')
        raise RequestError(HTTPStatus.UNAUTHORIZED, f"authentication required: {reason}",
                           [("WWW-Authenticate", challenge)])

    @staticmethod
    def _boundary(content_type: str) -> bytes:
        header = Message()
        header["Content-Type"] = content_type
        media = header.get_content_type()
        kind = str(header.get_param("type") or "application/dicom").strip().lower()
        if not content_type.strip() or media != "multipart/related" or kind != "application/dicom":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               'STOW-RS takes multipart/related; type="application/dicom" (DICOM Part 10 files)')
        boundary = header.get_param("boundary")
        if not isinstance(boundary, str) or not 1 <= len(boundary) <= MAX_BOUNDARY_LENGTH:
            raise MalformedError(f"the multipart/related Content-Type has no boundary (1-{MAX_BOUNDARY_LENGTH} "
                                 "characters)")
        return boundary.encode("latin-1")

    def _check_disk(self, environ: dict[str, Any]) -> None:
        """A body of known length must fit on the spool's disk above the receiver's floor."""
        text = str(environ.get("CONTENT_LENGTH", "") or "")
        length = int(text) if text.isdigit() else 0
        try:
            free = self.receiver.spool.free_bytes()
        except OSError as exc:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot measure free disk space: {exc}") from exc
        if free - length < self.receiver.min_free_bytes:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "not enough free disk space for the request",
                               [("Retry-After", "60")])

    # --- the body -----------------------------------------------------------------------------------------
    def _new_part_file(self) -> tuple[IO[bytes], Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="stow-", suffix=".part")
        return os.fdopen(fd, "wb"), Path(name)

    def _store(self, body: RequestBody, boundary: bytes, source: str, peer: str, study: str | None) -> Reply:
        splitter = MultipartSplitter(boundary, self._new_part_file, self.receiver.max_instance_bytes)
        try:
            try:
                parts = splitter.split(body)
                if not parts:
                    raise MalformedError("the request holds no part")
            except BodyEndedError as exc:
                log.warning("STOW-RS request of source %r from %s ended early (%s): nothing stored", source, peer,
                            exc)
                return _error_reply(exc)
            except RequestError as exc:
                log.warning("STOW-RS request of source %r from %s refused: %s", source, peer, exc)
                body.drain(DRAIN_BYTES)
                return _error_reply(exc)
            except OSError as exc:  # ENOSPC, EIO writing the parts
                log.error("STOW-RS request of source %r from %s: cannot write its parts: %s", source, peer, exc)
                return _error_reply(RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                                                 "cannot write the request to disk", [("Retry-After", "60")]))
            results = [self._store_part(part, source, peer, study) for part in parts]
        finally:
            for part in splitter.parts:
                part.path.unlink(missing_ok=True)
        failed = sum(result.failure is not None for result in results)
        status = (HTTPStatus.OK if not failed else HTTPStatus.CONFLICT if failed == len(results)
                  else HTTPStatus.ACCEPTED)
        log.info("STOW-RS from source %r at %s: %d instance(s) stored, %d failed (HTTP %d)", source, peer,
                 len(results) - failed, failed, status.value)
        document = json.dumps(store_instances_response(results)).encode()
        return Reply(status, DICOM_JSON, document)

    def _store_part(self, part: Part, source: str, peer: str, study: str | None) -> PartResult:
        """Hand one part to the receiver (after the checks C-STORE's negotiation makes) and say what became of it."""
        media = Message()
        media["Content-Type"] = part.headers.get("content-type", "application/dicom")
        if media.get_content_type() != "application/dicom":
            return self._refused(PartResult("", "", StowFailureReason.CANNOT_UNDERSTAND), source, peer,
                                 f"a part of type {media.get_content_type()}, not application/dicom")
        try:
            meta = read_file_meta_info(part.path)
        # untrusted bytes: pydicom signals a bad preamble or file meta with many exception types
        except Exception as exc:
            return self._refused(PartResult("", "", StowFailureReason.CANNOT_UNDERSTAND), source, peer,
                                 f"a part that is not a DICOM Part 10 file: {type(exc).__name__}: {exc}")
        sop_class = _uid_or_empty(meta.get("MediaStorageSOPClassUID"))
        sop_instance = _uid_or_empty(meta.get("MediaStorageSOPInstanceUID"))
        syntax = _uid_or_empty(meta.get("TransferSyntaxUID"))
        named = PartResult(sop_class, sop_instance)
        if part.oversize:
            return self._refused(PartResult(sop_class, sop_instance, StowFailureReason.OUT_OF_RESOURCES), source,
                                 peer, f"instance {sop_instance} is over max_instance_mb "
                                 f"({self.receiver.max_instance_bytes / 1024 / 1024:g} MiB)")
        if not (sop_class and sop_instance and syntax):
            return self._refused(PartResult(sop_class, sop_instance, StowFailureReason.CANNOT_UNDERSTAND), source,
                                 peer, "a part whose file meta lacks a valid Media Storage SOP Class UID, Media "
                                 "Storage SOP Instance UID or Transfer Syntax UID")
        if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
            return self._refused(PartResult(sop_class, sop_instance,
                                            StowFailureReason.REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED), source,
                                 peer, f"instance {sop_instance} in transfer syntax {syntax}, which the node does "
                                 "not accept")
        if sop_class not in STORAGE_SOP_CLASSES:
            return self._refused(PartResult(sop_class, sop_instance,
                                            StowFailureReason.REFERENCED_SOP_CLASS_NOT_SUPPORTED), source, peer,
                                 f"instance {sop_instance} of SOP class {sop_class}, not a storage SOP class the "
                                 "node accepts")
        status = self.receiver.receive(IncomingInstance(
            data=part.path, abstract_syntax=sop_class, affected_sop_instance_uid=sop_instance,
            transfer_syntax_uid=syntax, calling_ae=source, peer_address=peer, expected_study_uid=study,
        ))
        if status == StoreStatus.SUCCESS:
            return named
        return PartResult(sop_class, sop_instance,
                          FAILURE_REASONS.get(StoreStatus(status), StowFailureReason.PROCESSING_FAILURE))

    @staticmethod
    def _refused(result: PartResult, source: str, peer: str, reason: str) -> PartResult:
        log.warning("STOW-RS part from source %r at %s refused: 0x%04X %s", source, peer, result.failure, reason)
        metrics.record_instance("rejected")
        return result
