"""The DICOM node's transport guards: a pynetdicom association server that survives hostile peers.

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer` accepts every TCP connection, runs the TLS
handshake in its accept loop and reads each PDU whole, with blocking sockets, before looking at it. This module
subclasses it through its public extension points only (``AE.make_server(..., server_class=...)``, the
socketserver hooks ``get_request``/``verify_request``/``process_request_thread``, ``SSLContext.sslsocket_class``)
and hands pynetdicom socket objects that watch the PDU stream:

* **accept**: a connection is closed at once when its address already has ``max_connections_per_address`` open,
  or, when allowed peers are configured, when it comes from an address no allowed peer has and such strangers
  already hold ``max_associations - reserved_associations`` connections (the rest is kept for allowed peers);
* **TLS**: the handshake runs in the connection's own thread with ``request_timeout_s``, never in the accept loop;
* **A-ASSOCIATE-RQ deadline**: the request must arrive complete within ``request_timeout_s`` of the connection
  (of the end of the TLS handshake); a connection that sends nothing is closed by pynetdicom's ARTIM timer,
  which :func:`dicom_node.scp.build_ae` sets to the same value (``acse_timeout``). Once associated, a peer that
  stops in the middle of a PDU is closed after ``network_timeout_s``;
* **PDU length**: a PDU header announcing more than the node accepts (P-DATA-TF: the maximum PDU size we
  announce plus its header; any other PDU: :data:`ASSOCIATION_PDU_LIMIT`) or an unknown PDU type is answered
  with an A-ABORT and the connection is closed before any of its body is read.

Every refusal is logged at WARNING with the peer's address and the reason (rate-limited per address at accept).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom.transport import ThreadedAssociationServer

from core.settings import PeerSpec
from dicom_node.statuses import RejectReason, RejectResult, RejectSource

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.presentation import PresentationContext

log = logging.getLogger(__name__)

PDU_HEADER_BYTES = 6  # type (1), reserved (1), length (4, big endian)
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ … A-ABORT
ASSOCIATION_PDU_LIMIT = 256 * 1024  # A-ASSOCIATE-RQ with 128 contexts and user identity fits many times over
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value) / 1 (unrecognized PDU)
_ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
_ABORT_UNRECOGNIZED_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
REFUSAL_LOG_INTERVAL_S = 10.0  # at most one "closed at accept" line per address per interval


@dataclass(frozen=True)
class TransportLimits:
    """What one connection may do; built from the settings by :func:`dicom_node.scp.transport_limits`."""

    request_timeout_s: float
    network_timeout_s: float
    max_pdu_size: int  # the Maximum Length Received we announce; P-DATA-TF PDUs may carry it plus the header
    max_associations: int
    max_connections_per_address: int
    reserved_associations: int  # slots strangers cannot take; only when allowed_peers is not empty
    allowed_peers: Sequence[PeerSpec] = ()

    def pdu_limit(self, pdu_type: int) -> int:
        """The largest PDU length field accepted for *pdu_type*."""
        if pdu_type == P_DATA_TF:
            return self.max_pdu_size + PDU_HEADER_BYTES
        return ASSOCIATION_PDU_LIMIT

    @property
    def stranger_limit(self) -> int:
        """Connections that addresses of no allowed peer may hold together."""
        if not self.allowed_peers:
            return self.max_associations
        return max(self.max_associations - self.reserved_associations, 0)


@dataclass(eq=False)
class _Connection:
    """One accepted connection, open until its socket is shut down, closed or collected."""

    address: str
    allowed: bool
    closed: bool = False
    socket_ref: Callable[[], socket.socket | None] = field(default=lambda: None)

    def is_open(self) -> bool:
        if self.closed:
            return False
        sock = self.socket_ref()
        return sock is not None and sock.fileno() != -1


ASSOCIATE_RQ = 0x01
# PS3.8 9.3.2: the 16-byte called and calling AE title fields, as offsets into the A-ASSOCIATE-RQ's body (after its
# 6-byte header: protocol version 2, reserved 2)
RQ_AE_FIELDS = (("called", 4, RejectReason.CALLED_AE_NOT_RECOGNIZED),
                ("calling", 20, RejectReason.CALLING_AE_NOT_RECOGNIZED))
RQ_AE_FIELDS_END = 36


def ae_title_problem(field: bytes) -> str | None:
    """Why a 16-byte AE title field of a PDU is not an AE title (PS3.5 AE: no control characters, no backslash,
    not only spaces), or None."""
    if not field.strip(b" "):
        return "is empty"
    if b"\x00" in field:
        return "contains a NUL byte"
    if b"\\" in field:
        return "contains a backslash"
    if any(byte < 0x20 or byte > 0x7E for byte in field):
        return "contains a control or non-ASCII character"
    return None


class _PduGuard:
    """Mixin of the socket classes handed to pynetdicom: deadlines and PDU header checks on ``recv``.

    Until :meth:`guard` is called the socket behaves like its base class. Class attributes are the defaults
    because ``ssl.SSLSocket`` instances are not built through ``__init__``.
    """

    _connection: _Connection | None = None
    _limits: TransportLimits | None = None
    _deadline: float = 0.0
    _associated = False  # a complete A-ASSOCIATE-RQ went through
    _rejected = False
    _header: bytearray | None = None
    _body_left = 0
    _body_type = 0
    _rq_head: bytearray | None = None  # the first bytes of the A-ASSOCIATE-RQ body, up to its AE title fields

    def guard(self, connection: _Connection, limits: TransportLimits) -> None:
        """Start checking: the A-ASSOCIATE-RQ must be complete within ``limits.request_timeout_s`` from now."""
        self._connection = connection
        self._limits = limits
        self._deadline = time.monotonic() + limits.request_timeout_s
        self._header = bytearray()
        connection.socket_ref = weakref.ref(self)  # type: ignore[assignment]

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        limits = self._limits
        if limits is None or flags & socket.MSG_PEEK:  # a peek (dicom_node/handlers.py) reads nothing off the stream
            return super().recv(bufsize, flags)  # type: ignore[misc, no-any-return]
        if self._rejected:
            return b""
        if not self._associated:
            left = self._deadline - time.monotonic()
            if left <= 0:
                return self._reject(f"no complete A-ASSOCIATE-RQ within {limits.request_timeout_s:g} s")
            self.settimeout(left)  # type: ignore[attr-defined]
        try:
            data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        except TimeoutError:
            if not self._associated:
                return self._reject(f"no complete A-ASSOCIATE-RQ within {limits.request_timeout_s:g} s")
            return self._reject(f"stalled in the middle of a PDU for {limits.network_timeout_s:g} s")
        reason = self._inspect(data, limits)
        if reason is not None:
            return self._reject(reason[0], reason[1])
        return data

    def _inspect(self, data: bytes, limits: TransportLimits) -> tuple[str, bytes] | None:
        """Follow the PDU boundaries in *data*; a reason (and the A-ABORT to send) if a header is refused."""
        assert self._header is not None
        view = memoryview(data)
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                if self._body_type == ASSOCIATE_RQ and not self._associated:
                    refused = self._check_ae_titles(view[:taken])
                    if refused is not None:
                        return refused
                self._body_left -= taken
                view = view[taken:]
                if not self._body_left:
                    self._pdu_complete()
                continue
            needed = PDU_HEADER_BYTES - len(self._header)
            self._header += view[:needed]
            view = view[needed:]
            if len(self._header) < PDU_HEADER_BYTES:
                break
            pdu_type, _, length = struct.unpack(">BBL", self._header)
            self._header.clear()
            if pdu_type not in PDU_TYPES:
                return f"unknown PDU type 0x{pdu_type:02X}", _ABORT_UNRECOGNIZED_PDU
            if length > limits.pdu_limit(pdu_type):
                return (f"PDU type 0x{pdu_type:02X} announces {length} bytes, over the limit of "
                        f"{limits.pdu_limit(pdu_type)}"), _ABORT_INVALID_PARAMETER
            self._body_type, self._body_left = pdu_type, length
            if not length:
                self._pdu_complete()
        return None

    def _check_ae_titles(self, body: memoryview) -> tuple[str, bytes] | None:
        """Once the A-ASSOCIATE-RQ's called and calling AE title fields are in: an empty, NUL-, backslash- or
        control-character title gets an A-ASSOCIATE-RJ with its reason (pynetdicom could not decode it and would
        abort with a traceback), the calling title's reason first."""
        if self._rq_head is None:
            self._rq_head = bytearray()
        if len(self._rq_head) >= RQ_AE_FIELDS_END:
            return None
        self._rq_head += body[:RQ_AE_FIELDS_END - len(self._rq_head)]
        if len(self._rq_head) < RQ_AE_FIELDS_END:
            return None
        found = [(name, field, reason, problem) for name, start, reason in RQ_AE_FIELDS
                 if (problem := ae_title_problem(field := bytes(self._rq_head[start:start + 16]))) is not None]
        if not found:
            return None
        name, field, reason, problem = found[-1]
        return (f"association rejected: {name} AE title {field.rstrip(b' ').decode('latin-1')!r} {problem} "
                "(A-ASSOCIATE-RJ)",
                bytes([0x03, 0, 0, 0, 0, 4, 0, RejectResult.PERMANENT, RejectSource.SERVICE_USER, reason]))

    def _pdu_complete(self) -> None:
        if not self._associated and self._body_type == 0x01:
            self._associated = True
            assert self._limits is not None
            self.settimeout(self._limits.network_timeout_s)  # type: ignore[attr-defined]

    def _reject(self, reason: str, abort: bytes | None = None) -> bytes:
        """Log *reason*, send *abort* (if any) and close the connection; pynetdicom then reads end of stream."""
        self._rejected = True
        address = self._connection.address if self._connection else "?"
        log.warning("DICOM connection from %s closed: %s", address, reason)
        if abort is not None:
            try:
                self.settimeout(1.0)  # type: ignore[attr-defined]
                self.sendall(abort)  # type: ignore[attr-defined]
            except OSError:
                pass
        self._mark_closed()
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self, socket.SHUT_RDWR)  # type: ignore[arg-type]  # not SSLSocket's: no unwrap
        return b""

    def _mark_closed(self) -> None:
        if self._connection is not None:
            self._connection.closed = True

    def shutdown(self, how: int) -> None:
        self._mark_closed()
        super().shutdown(how)  # type: ignore[misc]

    def close(self) -> None:
        self._mark_closed()
        super().close()  # type: ignore[misc]


class GuardedSocket(_PduGuard, socket.socket):
    """A plain TCP connection handed to pynetdicom."""


class GuardedSSLSocket(_PduGuard, ssl.SSLSocket):
    """A TLS connection handed to pynetdicom (an ``SSLSocket``, so pynetdicom still sees its pending bytes)."""


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the guards of this module; see the module docstring."""

    request_queue_size = 128  # listen backlog: a burst of strangers must not crowd out the next SYN

    def __init__(  # noqa: PLR0917 - the positional signature AE.make_server() calls
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: TransportLimits,
    ) -> None:
        self.limits = limits
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._allowed_cache: dict[str, tuple[bool, float]] = {}
        self._last_refusal_log: dict[str, float] = {}
        self._pending: dict[int, _Connection] = {}  # admitted by the accept loop, not yet taken by their thread
        if ssl_context is not None:
            ssl_context.sslsocket_class = GuardedSSLSocket  # documented: the class wrap_socket() returns
        super().__init__(ae, address, ae_title, contexts, ssl_context=ssl_context, evt_handlers=evt_handlers)

    # --- socketserver hooks ---------------------------------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:  # type: ignore[override]
        """Accept only; the TLS handshake is left to the connection's thread (:meth:`process_request_thread`)."""
        assert self.socket is not None
        accepted, address = self.socket.accept()
        if self.ssl_context is not None:
            return accepted, address
        guarded = GuardedSocket(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        return guarded, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection, or refuse it (socketserver then closes it) when a connection limit is reached."""
        address = str(client_address[0])
        allowed = self._is_allowed(address)
        with self._lock:
            self._connections = {c for c in self._connections if c.is_open()}
            from_address = sum(1 for c in self._connections if c.address == address)
            strangers = sum(1 for c in self._connections if not c.allowed)
            if from_address >= self.limits.max_connections_per_address:
                reason = (f"{from_address} connections open from this address "
                          f"(max_connections_per_address {self.limits.max_connections_per_address})")
            elif not allowed and strangers >= self.limits.stranger_limit:
                reason = (f"{strangers} connections open from addresses not in allowed_peers (at most "
                          f"{self.limits.stranger_limit}: {self.limits.reserved_associations} of "
                          f"{self.limits.max_associations} associations are reserved for allowed peers)")
            else:
                connection = _Connection(address, allowed, socket_ref=weakref.ref(request))
                if isinstance(request, GuardedSocket):
                    request.guard(connection, self.limits)
                self._connections.add(connection)
                self._pending[id(request)] = connection
                return True
        self._log_refusal(address, reason)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake (with its timeout), then pynetdicom's handling."""
        connection = self._pending.pop(id(request), None) or _Connection(str(client_address[0]), allowed=False)
        if self.ssl_context is not None:
            request = self._handshake(request, client_address, connection)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop serving and close the port (pynetdicom's ``shutdown`` also unregisters from ``AE._servers``,
        where :meth:`dicom_node.scp.DicomNode.start` never registered this server)."""
        socketserver.BaseServer.shutdown(self)  # stop serve_forever
        self.server_close()

    # --- helpers ----------------------------------------------------------------------------------------------
    def _handshake(self, raw: socket.socket, client_address: Any, connection: _Connection) -> GuardedSSLSocket | None:
        assert self.ssl_context is not None
        timeout = self.limits.request_timeout_s
        raw.settimeout(timeout)
        tls: GuardedSSLSocket | None = None
        try:
            with self._lock:  # the accept loop must not see the connection between detach() and socket_ref
                wrapped = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                assert isinstance(wrapped, GuardedSSLSocket)
                tls = wrapped
                connection.socket_ref = weakref.ref(tls)  # type: ignore[assignment]
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            connection.closed = True
            reason = f"no TLS handshake within {timeout:g} s" if isinstance(exc, TimeoutError) else (
                f"TLS handshake failed: {exc}")
            log.warning("DICOM connection from %s closed: %s", client_address[0], reason)
            (tls or raw).close()
            return None
        tls.guard(connection, self.limits)
        tls.settimeout(None)
        return tls

    def _is_allowed(self, address: str) -> bool:
        """Whether an allowed peer has *address* (cached for a minute: host names are resolved)."""
        if not self.limits.allowed_peers:
            return True
        now = time.monotonic()
        cached = self._allowed_cache.get(address)
        if cached is not None and cached[1] > now:
            return cached[0]
        allowed = any(address in peer.addresses() for peer in self.limits.allowed_peers)
        if len(self._allowed_cache) > 4096:
            self._allowed_cache.clear()
        self._allowed_cache[address] = (allowed, now + 60.0)
        return allowed

    def _log_refusal(self, address: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log.get(address, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._last_refusal_log) > 4096:
            self._last_refusal_log.clear()
        self._last_refusal_log[address] = now
        log.warning("DICOM connection from %s closed at accept: %s (further ones logged at most every %g s)",
                    address, reason, REFUSAL_LOG_INTERVAL_S)


def start_server(
    ae: AE,
    address: tuple[str, int],
    *,
    limits: TransportLimits,
    evt_handlers: list[Any],
    ssl_context: ssl.SSLContext | None,
) -> GuardedAssociationServer:
    """``AE.start_server(block=False)`` with :class:`GuardedAssociationServer`: bind, then serve in a thread."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, limits=limits)
    thread = threading.Thread(target=server.serve_forever, name=f"DicomNodeServer@{address[1]}", daemon=True)
    thread.start()
    return server
