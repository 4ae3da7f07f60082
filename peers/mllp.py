"""A real MLLP listener for tests: a TCP server thread on a loopback port that stores what it receives.

    with MLLPListener() as listener:                     # free port; listener.host / listener.port
        ...send to listener.port...
        messages = listener.wait_for_messages(1)         # parsed with python-hl7 (hl7.Message)
        listener.mode = AckMode.AE; listener.reason = "unknown patient"

Modes: AA, AE / AR (with ``reason`` in MSA-3 and an ERR segment), WRONG_CONTROL_ID (AA acknowledging another
MSH-10), GARBAGE (a framed block that is not HL7), NO_ANSWER (keeps the connection open, never answers), CLOSE
(closes the connection without answering). ``MLLPListener(port=old.port)`` restarts on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType

import hl7

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


class AckMode(StrEnum):
    AA = "AA"
    AE = "AE"
    AR = "AR"
    WRONG_CONTROL_ID = "WRONG_CONTROL_ID"
    GARBAGE = "GARBAGE"
    NO_ANSWER = "NO_ANSWER"
    CLOSE = "CLOSE"


def build_ack(message: hl7.Message, code: str, reason: str = "", control_id: str | None = None) -> bytes:
    """An ACK (v2.5.1 style) for ``message``: MSA-1 ``code``, MSA-2 its MSH-10 (or ``control_id``), MSA-3 and ERR
    carrying ``reason``."""
    acked = control_id if control_id is not None else message["MSH.F10"]
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    esc = message.escape
    segments = [
        f"MSH|^~\\&|{message['MSH.F5']}|{message['MSH.F6']}|{message['MSH.F3']}|{message['MSH.F4']}|{now}||"
        f"ACK^{message['MSH.F9.R1.C2']}^ACK|ACK{esc(acked)}|P|2.5.1",
        f"MSA|{code}|{esc(acked)}|{esc(reason)}",
    ]
    if code != "AA" and reason:
        segments.append(f"ERR|||207^Application internal error^HL70357|E||||{esc(reason)}")
    return ("\r".join(segments) + "\r").encode("utf-8")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True

    def __init__(self, listener: MLLPListener, address: tuple[str, int]) -> None:
        self.listener = listener
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        listener = self.server.listener
        sock: socket.socket = self.request
        listener._opened(sock)
        try:
            buffer = bytearray()
            while not listener.stopped.is_set():
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while END_BLOCK in buffer:
                    end = buffer.index(END_BLOCK)
                    block = bytes(buffer[:end]).removeprefix(START_BLOCK)
                    del buffer[: end + len(END_BLOCK)]
                    if not self._answer(listener, sock, block):
                        return
        finally:
            listener._closed(sock)

    @staticmethod
    def _answer(listener: MLLPListener, sock: socket.socket, block: bytes) -> bool:
        """Store and answer one message; False ends the connection."""
        mode, reason = listener.mode, listener.reason
        try:
            message = hl7.parse(block.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, hl7.HL7Exception):
            listener.unparsable.append(block)
            return False
        listener._store(block, message)
        if mode is AckMode.CLOSE:
            return False
        if mode is AckMode.NO_ANSWER:
            listener.stopped.wait()
            return False
        if mode is AckMode.GARBAGE:
            answer = b"this is not an HL7 acknowledgement"
        elif mode is AckMode.WRONG_CONTROL_ID:
            answer = build_ack(message, "AA", control_id="NOT-" + message["MSH.F10"])
        else:
            answer = build_ack(message, mode.value, reason)
        sock.sendall(START_BLOCK + answer + END_BLOCK)
        return True


class MLLPListener:
    """A real MLLP server on ``host`` (loopback) and ``port`` (0 = a free port), answering per ``mode``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, mode: AckMode = AckMode.AA, reason: str = "") -> None:
        self.mode = mode
        self.reason = reason
        self.raw: list[bytes] = []
        self.received: list[hl7.Message] = []
        self.unparsable: list[bytes] = []
        self.connections_accepted = 0
        self.stopped = threading.Event()
        self._lock = threading.Condition()
        self._open: set[socket.socket] = set()
        self._server = _Server(self, (host, port))
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"mllp-listener-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> MLLPListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, drop open connections (so clients see them closed) and join every thread."""
        self.stopped.set()
        self._server.shutdown()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MLLPListener:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[hl7.Message]:
        """The first ``count`` messages received, waiting up to ``timeout`` seconds for them."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.received) >= count, timeout=timeout):
                raise TimeoutError(f"MLLP listener {self.address} received {len(self.received)} of {count} "
                                   f"messages within {timeout} s")
            return list(self.received[:count])

    def _store(self, block: bytes, message: hl7.Message) -> None:
        with self._lock:
            self.raw.append(block)
            self.received.append(message)
            self._lock.notify_all()

    def _opened(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections_accepted += 1
            self._open.add(sock)
            if self.stopped.is_set():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
