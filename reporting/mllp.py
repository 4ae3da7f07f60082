"""MLLP client: send HL7 v2 messages over TCP (``0x0B`` message ``0x1C 0x0D``) and check the ACK.

One ``MLLPClient`` holds one connection to one destination and is not thread-safe. ``send`` returns the ACK
when the peer answers AA (or CA, enhanced-mode commit accept) with MSA-2 equal to the message's MSH-10; every
other outcome raises an ``MLLPError`` subclass whose ``transient`` says whether a retry may help:

- ``MLLPConnectionError`` (transient): cannot connect, or the peer closed the connection without an ACK;
- ``MLLPTimeoutError`` (transient): connect or ACK wait ran past its timeout;
- ``HL7NegativeAck`` (not transient): AE / AR (CE / CR) with the peer's reason from MSA-3 and ERR;
- ``MLLPProtocolError`` (not transient): the answer is not a framed HL7 ACK for this message.

An idle connection that the peer closed (or that holds unsolicited bytes) is replaced before sending, and a send
that fails while writing on a reused connection is retried once on a fresh one. After any error the connection
is dropped, so a late ACK of a timed-out message can never be taken for the next message's ACK.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

import hl7

from core.settings import HL7Destination, Settings

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20
_ACCEPTED = frozenset({"AA", "CA"})
_REJECTED = frozenset({"AE", "AR", "CE", "CR"})


class MLLPError(Exception):
    """Delivery of one HL7 message to one destination failed."""

    transient: ClassVar[bool] = False

    def __init__(self, message: str, destination: str, control_id: str | None = None) -> None:
        super().__init__(message)
        self.destination = destination
        self.control_id = control_id


class MLLPConnectionError(MLLPError):
    transient = True


class MLLPTimeoutError(MLLPError):
    transient = True


class MLLPProtocolError(MLLPError):
    """The peer's answer is not an MLLP-framed HL7 ACK for the message sent."""


class HL7NegativeAck(MLLPError):
    """The peer answered AE or AR (or CE / CR): ``ack_code`` and the peer's ``reason``."""

    def __init__(self, destination: str, control_id: str, ack_code: str, reason: str) -> None:
        super().__init__(f"HL7 destination {destination} answered {ack_code} to message {control_id}: "
                         f"{reason or 'no reason given'}", destination, control_id)
        self.ack_code = ack_code
        self.reason = reason


@dataclass(frozen=True)
class Ack:
    code: str
    control_id: str
    text: str
    message: hl7.Message


def frame(message: bytes) -> bytes:
    """Wrap one HL7 message in the MLLP block; a message containing the block characters is an error."""
    if START_BLOCK in message or b"\x1c" in message:
        raise ValueError("HL7 message contains an MLLP block character (0x0B or 0x1C) and cannot be framed")
    return START_BLOCK + message + END_BLOCK


def message_control_id(message: bytes) -> str:
    """MSH-10 of an ER7-encoded message."""
    if not message.startswith(b"MSH") or len(message) < 8:
        raise ValueError("HL7 message must start with an MSH segment")
    first_segment = message.split(b"\r", 1)[0].decode("utf-8", errors="strict")
    fields = first_segment.split(first_segment[3])
    if len(fields) < 10 or not fields[9]:
        raise ValueError("HL7 message has no MSH-10 message control id")
    return fields[9]


class MLLPClient:
    """A blocking MLLP client for one destination; use as a context manager or call ``close``."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0, ack_timeout: float = 30.0) -> None:
        if connect_timeout <= 0 or ack_timeout <= 0:
            raise ValueError(f"connect_timeout {connect_timeout} and ack_timeout {ack_timeout} must be > 0 seconds")
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self._sock: socket.socket | None = None

    @classmethod
    def for_destination(cls, destination: HL7Destination, settings: Settings) -> MLLPClient:
        """A client for a configured destination; both timeouts are ``settings.network_timeout_s``."""
        return cls(destination.host, destination.port, connect_timeout=settings.network_timeout_s,
                   ack_timeout=settings.network_timeout_s)

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> MLLPClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, message: bytes) -> Ack:
        """Send one ER7 message (``\\r``-separated segments) and return the peer's AA/CA acknowledgement."""
        control_id = message_control_id(message)
        data = frame(message)
        reused = self._sock is not None and not self._idle_connection_closed()
        if not reused:
            self._connect(control_id)
        try:
            self._write(data, control_id)
        except MLLPConnectionError:
            if not reused:
                raise
            logger.info("HL7 connection to %s was broken; reconnecting for message %s", self.destination, control_id)
            self._connect(control_id)
            self._write(data, control_id)
        try:
            payload = self._read_frame(control_id)
        except MLLPError:
            self.close()
            raise
        ack = self._check_ack(payload, control_id)
        logger.info("HL7 message %s delivered to %s (%s)", control_id, self.destination, ack.code)
        return ack

    # --- connection ------------------------------------------------------------------------------------------
    def _connect(self, control_id: str) -> None:
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise MLLPTimeoutError(f"connecting to HL7 destination {self.destination} timed out after "
                                   f"{self.connect_timeout} s", self.destination, control_id) from None
        except OSError as exc:
            raise MLLPConnectionError(f"cannot connect to HL7 destination {self.destination}: {exc}",
                                      self.destination, control_id) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        logger.debug("connected to HL7 destination %s", self.destination)

    def _idle_connection_closed(self) -> bool:
        """True (and the socket dropped) when the idle connection is readable: peer closed it or sent junk."""
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            readable = [self._sock]
        if readable:
            logger.debug("idle HL7 connection to %s was closed by the peer; reconnecting", self.destination)
            self.close()
            return True
        return False

    def _write(self, data: bytes, control_id: str) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(self.ack_timeout)
            self._sock.sendall(data)
        except TimeoutError:
            self.close()
            raise MLLPTimeoutError(f"sending message {control_id} to HL7 destination {self.destination} timed out "
                                   f"after {self.ack_timeout} s", self.destination, control_id) from None
        except OSError as exc:
            self.close()
            raise MLLPConnectionError(f"connection to HL7 destination {self.destination} broke while sending "
                                      f"message {control_id}: {exc}", self.destination, control_id) from exc

    def _read_frame(self, control_id: str) -> bytes:
        """Read one MLLP block within ``ack_timeout`` (a deadline for the whole ACK, not per read)."""
        assert self._sock is not None
        deadline = time.monotonic() + self.ack_timeout
        buffer = bytearray()
        while END_BLOCK not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._ack_timeout(control_id)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise self._ack_timeout(control_id) from None
            except OSError as exc:
                raise MLLPConnectionError(f"connection to HL7 destination {self.destination} broke while waiting "
                                          f"for the ACK of message {control_id}: {exc}",
                                          self.destination, control_id) from exc
            if not chunk:
                raise MLLPConnectionError(f"HL7 destination {self.destination} closed the connection without an "
                                          f"ACK for message {control_id}", self.destination, control_id)
            buffer += chunk
            if not buffer.startswith(START_BLOCK):
                raise MLLPProtocolError(f"HL7 destination {self.destination} answered message {control_id} with "
                                        f"bytes that are not MLLP-framed: {bytes(buffer[:40])!r}",
                                        self.destination, control_id)
            if len(buffer) > MAX_ACK_BYTES:
                raise MLLPProtocolError(f"ACK from HL7 destination {self.destination} for message {control_id} "
                                        f"exceeds {MAX_ACK_BYTES} bytes", self.destination, control_id)
        end = buffer.index(END_BLOCK)
        if end + len(END_BLOCK) != len(buffer):
            raise MLLPProtocolError(f"HL7 destination {self.destination} sent more than one block in answer to "
                                    f"message {control_id}", self.destination, control_id)
        return bytes(buffer[len(START_BLOCK):end])

    def _ack_timeout(self, control_id: str) -> MLLPTimeoutError:
        return MLLPTimeoutError(f"no ACK from HL7 destination {self.destination} for message {control_id} within "
                                f"{self.ack_timeout} s", self.destination, control_id)

    # --- acknowledgement -------------------------------------------------------------------------------------
    def _check_ack(self, payload: bytes, control_id: str) -> Ack:
        try:
            text = payload.decode("utf-8")
            message = hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))
            message_type = message["MSH.F9.R1.C1"]
            msa = message.segment("MSA")
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, hl7.HL7Exception) as exc:
            self.close()
            raise MLLPProtocolError(f"HL7 destination {self.destination} answered message {control_id} with "
                                    f"something that is not an HL7 ACK ({exc}): {payload[:60]!r}",
                                    self.destination, control_id) from exc
        code = _field(msa, 1)
        acked_id = _field(msa, 2)
        if message_type != "ACK":
            self.close()
            raise MLLPProtocolError(f"HL7 destination {self.destination} answered message {control_id} with a "
                                    f"{message_type!r} message instead of ACK", self.destination, control_id)
        if acked_id != control_id:
            self.close()
            raise MLLPProtocolError(f"ACK from HL7 destination {self.destination} acknowledges message "
                                    f"{acked_id!r} (MSA-2), not {control_id!r} (MSH-10)",
                                    self.destination, control_id)
        reason = _ack_reason(message)
        if code in _REJECTED:
            logger.warning("HL7 destination %s answered %s to message %s", self.destination, code, control_id)
            logger.debug("reason given by %s: %s", self.destination, reason)
            raise HL7NegativeAck(self.destination, control_id, code, reason)
        if code not in _ACCEPTED:
            self.close()
            raise MLLPProtocolError(f"ACK from HL7 destination {self.destination} for message {control_id} has "
                                    f"acknowledgment code {code!r} (MSA-1); expected AA, AE or AR",
                                    self.destination, control_id)
        return Ack(code=code, control_id=acked_id, text=reason, message=message)


def _ack_reason(message: hl7.Message) -> str:
    """MSA-3 text plus, per ERR segment, ERR-8 user message, ERR-3 error code text, or the v2.4 ERR-1."""
    reasons = [_field(message.segment("MSA"), 3)]
    try:
        errors = message.segments("ERR")
    except KeyError:
        errors = []
    for err in errors:
        reasons.append(_field(err, 8) or _field(err, 3, 2) or _field(err, 3, 1) or _field(err, 1, 4, 2)
                       or _field(err, 1, 4, 1))
    unique = [r for index, r in enumerate(reasons) if r and r not in reasons[:index]]
    return "; ".join(unique)


def _field(segment: hl7.Segment, field: int, component: int = 1, subcomponent: int = 1) -> str:
    """An unescaped value of a parsed segment, ``""`` where the peer left it out."""
    try:
        return str(segment.extract_field(1, field, 1, component, subcomponent))
    except IndexError:
        return ""


def deliver(message: bytes, destination: HL7Destination, settings: Settings) -> Ack:
    """Send one message on a fresh connection to a configured destination and close it."""
    with MLLPClient.for_destination(destination, settings) as client:
        return client.send(message)
