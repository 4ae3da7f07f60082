"""The model socket: ``raddraft analyze`` answered by a running gateway's model over a real Unix socket, the same
output as a process that loads the model itself; garbage, stalled clients, another model, a stale socket file
and a second server on the same path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_helpers import wait_for
from train_helpers import tiny_model

from core.settings import load_settings
from model.phantoms import write_studies
from peers.gateway import MODEL, REPO, base_env, gateway, worker
from raddraft.analyze_output import socket_handler, start_model_socket
from raddraft.cli import main
from raddraft.model_socket import (
    AnalyzeReply,
    AnalyzeRequest,
    ModelSocketError,
    ModelSocketServer,
    ModelSocketUnavailable,
    normalize_model_spec,
    request_analysis,
    socket_path,
)

# a client process that reports whether it imported torch (the JSON goes to the file named by argv[1])
CLIENT = ("import json, sys\n"
          "from raddraft.cli import main\n"
          "rc = main(sys.argv[2:])\n"
          "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules,"
          " 'pydicom': 'pydicom' in sys.modules}))\n")


@pytest.fixture
def home() -> Iterator[Path]:
    """A home short enough for a Unix socket path (pytest's tmp_path may not be)."""
    folder = Path(tempfile.mkdtemp(prefix="rdsock", dir="/tmp"))
    yield folder / "home"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def radiograph(tmp_path: Path) -> Path:
    return write_studies(tmp_path / "phantoms", seed=4242, count=1, modality="DX")[0]


def _exchange(path: Path, data: bytes, timeout: float = 10.0) -> AnalyzeReply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(os.fspath(path))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return AnalyzeReply.model_validate_json(client.makefile("rb").readline())


def _stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a killed gateway leaves it."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()


def _client(home: Path, out: Path, *argv: str) -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
    done = subprocess.run([sys.executable, "-c", CLIENT, str(out), *argv], env=base_env(home), cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert out.is_file(), done.stderr
    return json.loads(out.read_text()), done


def test_raddraft_serve_answers_analyze_and_the_client_loads_no_model(home, radiograph, tmp_path):
    with gateway(home, base_env(home)) as running:
        wait_for(lambda: "answering raddraft analyze on" in running.log, timeout=60, what="model socket")
        assert socket_path(home).is_socket() and (socket_path(home).parent.stat().st_mode & 0o777) == 0o700
        started = time.perf_counter()
        report, served = _client(home, tmp_path / "served.json", "analyze", str(radiograph), "--json")
        seconds = time.perf_counter() - started
        assert report == {"rc": 0, "torch": False, "pydicom": False}, served.stderr
        vqa, asked = _client(home, tmp_path / "vqa.json", "analyze", str(radiograph), "--task", "vqa",
                             "--prompt", "Which imaging modality is this?")
        assert vqa["rc"] == 0 and not vqa["torch"], asked.stderr
        assert "model socket: answered a report request" in running.log
        assert "model socket: answered a vqa request" in running.log
    assert not socket_path(home).exists()  # removed when the gateway stops
    local = subprocess.run([sys.executable, "-m", "raddraft.cli", "analyze", str(radiograph), "--json", "--local"],
                           env=base_env(home), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert local.returncode == 0, local.stderr
    from_gateway, from_here = json.loads(served.stdout), json.loads(local.stdout)
    assert (from_gateway.pop("served_by"), from_here.pop("served_by")) == ("gateway", "this process")
    from_gateway.pop("seconds"), from_here.pop("seconds")
    assert from_gateway == from_here  # the same model, the same greedy answer, the same boxes
    assert from_gateway["status"] == "preliminary"
    assert seconds < 30  # no model load in the client (the analysis itself is under a second here)


def test_a_production_gpu_worker_answers_analyze_with_its_model(home, radiograph, tmp_path, redis_server):
    env = base_env(home, RADDRAFT_BROKER_URL=redis_server.url)
    with worker("gpu", env) as gpu:
        wait_for(lambda: "answering raddraft analyze on" in gpu.log, timeout=60, what="model socket")
        done = subprocess.run([sys.executable, "-m", "raddraft.cli", "analyze", str(radiograph), "--json"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["served_by"] == "gateway"
        assert "model socket: answered a report request" in gpu.log
    assert not socket_path(home).exists()


def test_garbage_stalled_and_oversized_requests_get_protocol_errors_and_the_server_goes_on(home, radiograph):
    settings = load_settings(home=home, model=MODEL)
    server = ModelSocketServer(socket_path(home), socket_handler(settings), max_bytes=1 << 20, read_timeout_s=0.5)
    server.start()
    try:
        path = socket_path(home)
        http = _exchange(path, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (http.ok, http.kind) == (False, "protocol") and "not an analyze request" in http.error
        long = _exchange(path, b"x" * (70 * 1024))
        assert long.kind == "protocol" and "longer than 64 KiB" in long.error
        big = _exchange(path, AnalyzeRequest(model=normalize_model_spec(MODEL), size=2 << 20).model_dump_json()
                        .encode() + b"\n")
        assert big.kind == "protocol" and "at most 1048576" in big.error
        unknown = _exchange(path, b'{"protocol": 1, "model": "embedded", "size": 0, "task": "segment"}\n')
        assert unknown.kind == "protocol" and "not an analyze request" in unknown.error
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:  # connects, sends half a file, stops
            stalled.connect(os.fspath(path))
            stalled.sendall(AnalyzeRequest(model="embedded", size=1000).model_dump_json().encode() + b"\n" + b"x")
            time.sleep(1.0)  # past the server's read timeout
        not_dicom = _exchange(path, AnalyzeRequest(model=normalize_model_spec(MODEL), size=9).model_dump_json()
                              .encode() + b"\nnot dicom")
        assert not_dicom.kind == "input" and "DICM" in not_dicom.error
        data = radiograph.read_bytes()
        good = request_analysis(path, AnalyzeRequest(model=normalize_model_spec(MODEL), size=len(data)), data)
        assert good.ok and good.payload is not None and good.payload["status"] == "preliminary"
        assert "FINDINGS WITH BOXES" in good.text
    finally:
        server.stop()


def test_analyze_loads_its_own_model_for_another_model_a_stale_socket_or_local(home, radiograph, tmp_path,
                                                                             monkeypatch, capsys):
    tiny_model().save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("RADDRAFT_HOME", str(home))
    settings = load_settings(home=home, model=MODEL)
    server = start_model_socket(settings)
    assert server is not None
    try:
        # the gateway serves the embedded model; this asks for another: refused with kind 'model', loaded here
        assert main(["analyze", str(radiograph), "--json", "--model", str(tmp_path / "tiny")]) == 0
        other = json.loads(capsys.readouterr().out)
        assert (other["served_by"], other["model"]["name"]) == ("this process", "raddraft-tiny")
        assert main(["analyze", str(radiograph), "--json", "--model", MODEL]) == 0
        assert json.loads(capsys.readouterr().out)["served_by"] == "gateway"
        assert main(["analyze", str(radiograph), "--json", "--model", str(tmp_path / "tiny"), "--local"]) == 0
        assert json.loads(capsys.readouterr().out)["served_by"] == "this process"
        (tmp_path / "bad.dcm").write_bytes(b"not dicom")
        assert main(["analyze", str(tmp_path / "bad.dcm"), "--model", MODEL]) == 2  # answered by the gateway
        assert "bad.dcm" in capsys.readouterr().err
    finally:
        server.stop()
    _stale_socket(socket_path(home))
    with pytest.raises(ModelSocketUnavailable, match="no model server"):
        request_analysis(socket_path(home), AnalyzeRequest(model="embedded", size=0), b"")
    assert main(["analyze", str(radiograph), "--json", "--model", str(tmp_path / "tiny")]) == 0
    assert json.loads(capsys.readouterr().out)["served_by"] == "this process"


def test_one_server_per_path_a_stale_file_is_replaced_and_a_long_path_is_refused(home, tmp_path, caplog):
    def echo(request: AnalyzeRequest, data: bytes) -> AnalyzeReply:
        return AnalyzeReply(ok=True, payload={"bytes": len(data)}, text=request.model)

    first = ModelSocketServer(socket_path(home), echo, max_bytes=1000)
    first.start()
    second = ModelSocketServer(socket_path(home), echo, max_bytes=1000)
    try:
        with pytest.raises(FileExistsError, match="already answers"):
            second.start()
        reply = request_analysis(socket_path(home), AnalyzeRequest(model="m", size=3), b"abc")
        assert (reply.payload, reply.text) == ({"bytes": 3}, "m")
    finally:
        first.stop()
    assert not socket_path(home).exists()
    _stale_socket(socket_path(home))
    second.start()  # the stale file of a dead server is replaced
    try:
        assert request_analysis(socket_path(home), AnalyzeRequest(model="m", size=0), b"").ok
    finally:
        second.stop()
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ValueError, match="at most 107"):
        ModelSocketServer(socket_path(deep), echo, max_bytes=1).start()
    with pytest.raises(ModelSocketUnavailable, match="at most 107"):
        request_analysis(socket_path(deep), AnalyzeRequest(model="m", size=0), b"")
    assert start_model_socket(load_settings(home=deep)) is None
    assert "the model socket is off" in caplog.text


def test_a_gateway_that_does_not_answer_in_time_is_an_error_not_a_second_analysis(home):
    release = threading.Event()

    def slow(request: AnalyzeRequest, data: bytes) -> AnalyzeReply:
        release.wait(10)
        return AnalyzeReply(ok=True, payload={}, text="late")

    server = ModelSocketServer(socket_path(home), slow, max_bytes=1000)
    server.start()
    try:
        with pytest.raises(ModelSocketError, match=r"did not answer within 1 s"):
            request_analysis(socket_path(home), AnalyzeRequest(model="m", size=0), b"", timeout_s=1.0)
    finally:
        release.set()
        server.stop()
