"""Decoding runs in a child process with a memory limit: a decode that needs more, or a child that dies, is a
decoder error for that study, and the gateway's own process goes on (before: the decode ran in the process of
``raddraft serve`` with the embedded broker, so a decoder that ran out of memory took the DICOM node and the
worklist down with it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_pipeline_gate import _prepared

from workers import pipeline
from workers.decode_child import IsolatedDecoder, isolated_decoder


def _enlarge(path: Path, side: int) -> None:
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(2).integers(0, 2000, (side, side), dtype=np.int16).tobytes()
    ds.save_as(path)


def _children() -> list[int]:
    mine = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == mine:
                found.append(int(entry.name))
    return found


def test_a_decode_over_the_childs_memory_limit_fails_that_study_only(tmp_path):
    settings, study = _prepared(tmp_path / "big", ["CT_small.dcm"])
    _enlarge(settings.spool_dir / "CT_small.dcm", 6000)  # 72 MB stored, several times that while windowing
    tight = settings.model_copy(update={"decode_memory_mb": 48})
    with pytest.raises(pipeline.StageError, match="decoding needs more than RADDRAFT_DECODE_MEMORY_MB 48 MiB"):
        pipeline.prepare_request(tight, study, 1)
    small, small_study = _prepared(tmp_path / "small", ["CT_small.dcm"])
    request = pipeline.prepare_request(small.model_copy(update={"decode_memory_mb": 48}), small_study, 1)
    assert request.images  # the same child decodes the next study


def test_a_child_killed_while_decoding_is_a_decoder_error_and_is_started_again(tmp_path):
    settings, study = _prepared(tmp_path / "big", ["CT_small.dcm"])
    _enlarge(settings.spool_dir / "CT_small.dcm", 4096)
    decoder = IsolatedDecoder(4096)
    before = set(_children())
    outcome: dict[str, BaseException | list] = {}

    def run() -> None:
        try:
            outcome["images"] = pipeline.build_request(
                settings.spool_dir, pipeline.StudyManifest.read(pipeline.manifest_path(settings.home, study, 1)),
                56, decode=decoder).images
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not (new := set(_children()) - before):
        assert time.monotonic() < deadline, "no decoding child started"
        time.sleep(0.05)
    time.sleep(0.5)  # let it start decoding
    for pid in new:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=120)
    error = outcome.get("error")
    assert isinstance(error, pipeline.StageError) and "the decoding process died" in str(error), outcome
    small, small_study = _prepared(tmp_path / "small", ["CT_small.dcm"])
    manifest = pipeline.StudyManifest.read(pipeline.manifest_path(small.home, small_study, 1))
    assert pipeline.build_request(small.spool_dir, manifest, 56, decode=decoder).images  # a new child
    decoder.close()


def test_the_process_keeps_one_child_per_budget():
    assert isolated_decoder(100) is isolated_decoder(100)
    assert isolated_decoder(100) is not isolated_decoder(200)
