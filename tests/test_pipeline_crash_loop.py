"""A study whose decoding kills the worker ends failed after a few tries instead of a crash loop.

Before: a worker that died while decoding an episode's images (out of memory on a decompression bomb, killed)
left the episode ``prepared``; a restart (or the broker) ran the same decode again and the worker died again,
for ever. Here a real child process decodes a large CT and is killed with SIGKILL while it does, twice; the third
attempt does not decode: the episode ends ``failed`` with the reason, and nothing is left to re-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_pipeline_gate import _prepared, consumed_here

from core.states import EpisodeState
from state.store import StateStore
from workers import pipeline
from workers.tasks import _end_before_analysis

CHILD = """
import sys
from core.settings import Settings
from workers import pipeline
pipeline.prepare_request(Settings(home=sys.argv[1]), sys.argv[2], 1)
"""


def _enlarge(path: Path, side: int = 4096) -> None:
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(1).integers(0, 2000, (side, side), dtype=np.int16).tobytes()
    ds.save_as(path)


def _runs(settings, study: str) -> list[tuple[str, str]]:
    store = StateStore(settings.index_path)
    try:
        return store.task_runs(study, 1)
    finally:
        store.close()


def _kill_while_decoding(settings, study: str) -> None:
    before = _runs(settings, study).count((pipeline.DECODE_RUN, "started"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(settings.home), study], env=env)
    try:
        deadline = time.monotonic() + 60
        while _runs(settings, study).count((pipeline.DECODE_RUN, "started")) == before:
            assert child.poll() is None, "the child ended before it started decoding"
            assert time.monotonic() < deadline, "the child never started decoding"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert _runs(settings, study).count((pipeline.DECODE_RUN, "built")) == 0, "the decode finished before the kill"


def test_a_decode_that_kills_its_worker_twice_ends_failed_and_is_not_run_again(tmp_path):
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    _enlarge(settings.spool_dir / "CT_small.dcm")
    assert settings.max_decode_interruptions == 2
    for _ in range(settings.max_decode_interruptions):
        _kill_while_decoding(settings, study)
    with pytest.raises(pipeline.StageError, match="interrupted 2 time"):
        pipeline.prepare_request(settings, study, 1)
    assert _runs(settings, study).count((pipeline.DECODE_RUN, "started")) == 2  # no third decode
    with pytest.raises(pipeline.StageError) as failed:
        pipeline.prepare_request(settings, study, 1)
    with consumed_here(settings) as publish:  # the failure is announced to the worklist
        _end_before_analysis(settings, study, 1, failed.value, publish=publish)
    store = StateStore(settings.index_path)
    try:
        episode = store.episode(study, 1)
        assert episode.state is EpisodeState.FAILED and "worker died while decoding" in episode.last_error
        assert not pipeline.stranded_work(store)
    finally:
        store.close()


def test_a_finished_decode_is_not_counted_as_an_interruption(tmp_path):
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    for _ in range(3):  # duplicate deliveries of the prepare task re-build the request: never a failure
        pipeline.prepare_request(settings, study, 1)
    runs = _runs(settings, study)
    assert runs.count((pipeline.DECODE_RUN, "started")) == runs.count((pipeline.DECODE_RUN, "built")) == 3
