"""Worklist questions over the model socket: the gpu worker's model answers them (the same text as
``MiniGPTAnswerer`` in process), a wrong pixel size or a garbage header is refused and the server goes on, a socket
nobody answers is 'model not connected', and ``raddraft serve`` with child workers answers a signed-in question
without loading the model in its own process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from node_helpers import wait_for
from worklist_helpers import Client, write_draft

from core.settings import load_settings
from model.imaging import prepare_image
from model.phantoms import write_studies
from peers.gateway import MODEL, REPO, base_env, gateway
from raddraft.analyze_output import start_model_socket
from raddraft.commands.serve import _question_model
from raddraft.model_socket import (
    AnalyzeReply,
    AskRequest,
    SocketAnswerer,
    normalize_model_spec,
    request_answer,
    socket_path,
)
from workers.inference import get_model
from workers.pipeline import model_input_size
from worklist import auth
from worklist.answerer import MiniGPTAnswerer, SharedModelAnswerer
from worklist.bridge import Bridge, ModelUnavailableError
from worklist.storage import Store

VQA = "[vqa] Which imaging modality is this?"
REFER = "[refer] where is left lung nodule ?"
MODEL_LOADED = re.compile(r"workers\.inference: model .+ loaded on ")


@pytest.fixture
def home() -> Iterator[Path]:
    """A home short enough for a Unix socket path (pytest's tmp_path may not be)."""
    folder = Path(tempfile.mkdtemp(prefix="rdask", dir="/tmp"))
    yield folder / "home"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pixels(tmp_path: Path) -> np.ndarray:
    """A phantom radiograph as the worklist prepares it for the model: (3, S, S) float32, CLIP-normalised."""
    path = write_studies(tmp_path / "phantoms", seed=4242, count=1, modality="DX")[0]
    return prepare_image(pydicom.dcmread(path), model_input_size(MODEL)).pixels


def _in_process(instruction: str, pixels: np.ndarray) -> str:
    loaded = get_model(MODEL, load_settings(home=Path(tempfile.gettempdir())).inference_device)  # as the worker
    return MiniGPTAnswerer(loaded.model).answer(pixels, instruction)


def _raw(path: Path, data: bytes) -> AnalyzeReply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(os.fspath(path))
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        return AnalyzeReply.model_validate_json(client.makefile("rb").readline())


def test_the_socket_answers_a_question_with_the_text_of_the_model_in_process(home, pixels):
    server = start_model_socket(load_settings(home=home, model=MODEL))
    assert server is not None
    try:
        answerer = SocketAnswerer(socket_path(home), MODEL, model_input_size(MODEL))
        assert answerer.image_size == pixels.shape[-1]
        for instruction in (VQA, REFER):
            answered = answerer.answer(pixels, instruction)
            assert answered == _in_process(instruction, pixels)  # the same model, the same pixels, greedy
            assert answered.strip()
        other = _in_process(VQA, np.ascontiguousarray(pixels[:, ::-1]))  # the pixels matter: not a fixed text
        assert answerer.answer(np.ascontiguousarray(pixels[:, ::-1]), VQA) == other
    finally:
        server.stop()


def test_a_wrong_pixel_size_or_a_bad_question_is_refused_and_the_server_goes_on(home, pixels):
    server = start_model_socket(load_settings(home=home, model=MODEL))
    assert server is not None
    path, model = socket_path(home), normalize_model_spec(MODEL)
    try:
        side = pixels.shape[-1]
        small = request_answer(path, model, VQA, np.ascontiguousarray(pixels[:, ::2, ::2]))
        assert (small.ok, small.kind) == (False, "protocol")
        assert f"exactly {3 * side * side * 4} bytes" in small.error
        assert request_answer(path, model, VQA, pixels).ok  # the next request is answered
        lying = AskRequest(model=model, instruction=VQA, shape=(3, side, side), size=10)
        short = _raw(path, lying.model_dump_json().encode() + b"\n" + b"x" * 10)
        assert short.kind == "protocol" and "exactly" in short.error
        wrong_dtype = _raw(path, json.dumps({"kind": "ask", "model": model, "instruction": VQA,
                                             "shape": [3, side, side], "dtype": "<f8", "size": 8}).encode() + b"\n")
        assert wrong_dtype.kind == "protocol" and "not a question request" in wrong_dtype.error
        garbage = _raw(path, b'{"kind": "ask", "pixels": "lots"}\n')
        assert garbage.kind == "protocol" and "not a question request" in garbage.error
        nan = request_answer(path, model, VQA, np.full_like(pixels, np.nan))
        assert nan.kind == "input" and "NaN" in nan.error
        with pytest.raises(ValueError, match="cannot take this question"):
            SocketAnswerer(path, MODEL, side).answer(np.full_like(pixels, np.inf), VQA)
        another = request_answer(path, "raddraft-tiny", VQA, pixels)
        assert another.kind == "model"
        with pytest.raises(ModelUnavailableError, match="did not answer"):
            SocketAnswerer(path, "raddraft-tiny", side).answer(pixels, VQA)
        after = SocketAnswerer(path, MODEL, side).answer(pixels, REFER)
        assert after == _in_process(REFER, pixels)
    finally:
        server.stop()


def test_a_socket_nobody_answers_is_model_not_connected(home, pixels):
    answerer = SocketAnswerer(socket_path(home), MODEL, model_input_size(MODEL))
    with pytest.raises(ModelUnavailableError, match="the model is not connected: the gpu worker does not answer"):
        answerer.answer(pixels, VQA)
    socket_path(home).parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a killed gpu worker leaves its socket file
    stale.bind(os.fspath(socket_path(home)))
    stale.close()
    with pytest.raises(ModelUnavailableError, match=r"not connected.*no model server"):
        answerer.answer(pixels, VQA)


# a client process asking a question where no server answers; it reports what it imported
CLIENT = ("import sys, numpy\n"
          "from pathlib import Path\n"
          "from raddraft.model_socket import ModelSocketUnavailable, request_answer\n"
          "try:\n"
          "    request_answer(Path(sys.argv[1]), 'embedded', '[vqa] ?', numpy.zeros((3, 4, 4), 'float32'))\n"
          "except ModelSocketUnavailable:\n"
          "    print('torch' in sys.modules, 'pydicom' in sys.modules)\n")


def test_the_question_client_imports_neither_torch_nor_pydicom(home):
    done = subprocess.run([sys.executable, "-c", CLIENT, str(socket_path(home))], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout.split()) == (0, ["False", "False"]), done.stderr


def test_serve_asks_the_socket_with_child_workers_and_its_own_model_with_the_sqlite_opt_in(home):
    children = _question_model(load_settings(home=home, model=MODEL))
    assert isinstance(children, SocketAnswerer) and children.image_size == model_input_size(MODEL)
    sqlite = _question_model(load_settings(home=home, model=MODEL,
                                           broker_url=f"sqla+sqlite:///{home / 'broker.sqlite'}"))
    assert isinstance(sqlite, SharedModelAnswerer)


@dataclass(frozen=True)
class _Worklist:
    host: str
    port: int


def _gpu_worker(serve_pid: int) -> list[int]:
    """The pids of the gpu worker children serve supervises (``raddraft worker --queues gpu --supervised-by``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--supervised-by" in argv and str(serve_pid).encode() in argv and b"gpu" in argv:
            found.append(int(entry.name))
    return found


def test_raddraft_serve_answers_a_question_with_the_gpu_workers_model_only(home):
    settings = load_settings(home=home, model=MODEL)
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="IR", now=datetime.now(UTC))
        draft = write_draft(settings)
        entry = Bridge(settings, store).register_draft(draft.manifest_path, draft.result_path)
    finally:
        store.close()
    dataset = pydicom.dcmread(next(settings.spool_dir.rglob(f"{draft.result.analysed_instances[0]}.dcm")))
    expected = _in_process(REFER, prepare_image(dataset, model_input_size(MODEL)).pixels)
    with gateway(home, base_env(home)) as running:
        url = wait_for(lambda: re.search(r"worklist listening on http://([\d.]+):(\d+)", running.log), timeout=60,
                       what="worklist URL")
        wait_for(lambda: MODEL_LOADED.search(running.log) and "answering raddraft analyze on" in running.log,
                 timeout=120, what="the gpu worker's model loaded")
        client = Client(_Worklist(url[1], int(url[2])))
        client.login()
        status, body = client.post_json(f"/api/studies/{entry}/ask",
                                        {"image": 0, "kind": "refer", "text": "left lung nodule"})
        assert status == 200, body
        assert (body["instruction"], body["raw"]) == (REFER, expected)
        assert "model socket: answered a question" in running.log
        # the model was loaded once, by the gpu worker: serve (SharedModelAnswerer) would log a second load
        assert len(MODEL_LOADED.findall(running.log)) == 1, running.log

        gpu = _gpu_worker(running.process.pid)
        assert len(gpu) == 1
        os.kill(gpu[0], signal.SIGKILL)  # the supervisor restarts it; until its socket answers: not connected
        status, body = client.post_json(f"/api/studies/{entry}/ask", {"image": 0, "kind": "vqa", "text": "?"})
        assert status == 503 and "the model is not connected" in body["error"], body
        assert len(MODEL_LOADED.findall(running.log)) == 1
