"""The worklist's HTTP server closes a connection that stalls mid-request (worklist/server.py)."""

from __future__ import annotations

import socket
import time

import pytest

from worklist import server


def test_a_client_that_stalls_mid_request_is_disconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.QuietHandler, "timeout", 0.5)

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:  # never reached
        raise AssertionError("a request that never finished reached the application")

    with server.RunningServer(app) as running:  # type: ignore[arg-type]
        sock = socket.create_connection((running.host, running.port))
        try:
            sock.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            sock.settimeout(5)
            start = time.monotonic()
            data = sock.recv(65536)
            while data:
                data = sock.recv(65536)
            assert time.monotonic() - start < 4  # closed at the handler's timeout, not held open
        finally:
            sock.close()
