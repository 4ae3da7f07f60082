"""Infer tasks of one gpu worker process decode together at the token level (workers/batching.py), with the real
tiny model: requests submitted from several threads share decode steps and get the answers each gets alone (the
one-call runner, follow-up round included); duplicates run once; a failure reaches exactly the tasks it concerns."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from pipeline_infra_helpers import TINY, request, tiny_model
from test_pipeline_infra_request import IDENTITY, spool_study

from model import analyze
from model.embedded import LoadedModel
from model.phantoms import generate_studies
from workers import pipeline
from workers.batching import ContinuousBatcher


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(tiny_model(), IDENTITY, trained=False)


@pytest.fixture
def batcher(loaded: LoadedModel):
    batcher = ContinuousBatcher(loaded, slots=6, max_len=200)
    yield batcher
    batcher.close()


def requests_of(tmp_path: Path, count: int):
    requests = []
    for i, study in enumerate(generate_studies(11, count, "CR")):
        folder = tmp_path / str(i)
        folder.mkdir()
        requests.append(pipeline.build_request(folder, spool_study(study, folder), TINY.vision.image_size,
                                               dtype="float32", max_new_tokens=16))
    return requests


def submit_all(batcher: ContinuousBatcher, requests, stagger_s: float = 0.0):
    answers: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            answers[i] = batcher.submit(requests[i])
        except Exception as exc:  # the test looks at what each thread got
            answers[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
        time.sleep(stagger_s)  # later studies arrive while the first ones decode
    for thread in threads:
        thread.join(timeout=120)
    return [answers[i] for i in range(len(requests))]


def test_queued_requests_decode_together_and_get_their_own_answers(loaded, batcher, tmp_path):
    requests = [*requests_of(tmp_path, 3), request("1.2.3.9", [1, 2, 3], detection="pleural effusion", tokens=9)]
    alone = [analyze.run_batch(loaded, [r])[0] for r in requests]  # one generate call per request, to the longest
    steps_alone = []
    for req, one in zip(requests, alone, strict=True):  # the decoder with one study at a time
        before = batcher.decoder.steps
        assert batcher.submit(req).texts() == one.texts()
        steps_alone.append(batcher.decoder.steps - before)
    before = batcher.decoder.steps
    answers = submit_all(batcher, requests)
    for req, answer, one in zip(requests, answers, alone, strict=True):
        assert not isinstance(answer, Exception), answer
        assert answer.request_id == req.request_id
        assert answer.texts() == one.texts()
        assert answer.batch_rows == one.batch_rows
    # the studies shared decode steps: fewer than one study after the other
    assert 0 < batcher.decoder.steps - before < sum(steps_alone), steps_alone
    assert batcher.decoder.pending == 0


def test_duplicates_run_once_and_a_failure_reaches_the_tasks_it_concerns(loaded, batcher, tmp_path):
    requests = requests_of(tmp_path, 2)
    answers = submit_all(batcher, [requests[0], requests[1], requests[0]])
    assert answers[2].texts() == answers[0].texts() and answers[0].texts() != answers[1].texts()
    assert batcher.decoder.prefills <= 4  # 2 studies x (rows + follow-up round): the duplicate added none

    # a request whose prompt + budget does not fit a slot fails alone; the others are answered
    (tmp_path / "long").mkdir()
    [long] = requests_of(tmp_path / "long", 1)
    too_long = long.model_copy(update={"tasks": [t.model_copy(update={"max_new_tokens": 190}) for t in long.tasks]})
    mixed = submit_all(batcher, [too_long, requests[1]])
    assert isinstance(mixed[0], ValueError) and "exceeds the decoder's cache length 200" in str(mixed[0])
    assert mixed[1].texts() == answers[1].texts()

    # a step that raises (the accelerator out of memory) fails every row in the decoder; the decoder goes on
    def out_of_memory(module: torch.nn.Module, args: object) -> None:
        raise RuntimeError("CUDA out of memory")

    hook = loaded.model.llm.model.register_forward_pre_hook(out_of_memory)
    try:
        failed = submit_all(batcher, requests)
    finally:
        hook.remove()
    assert all(isinstance(a, RuntimeError) and "out of memory" in str(a) for a in failed)
    assert batcher.decoder.pending == 0
    assert [a.texts() for a in submit_all(batcher, requests)] == [answers[0].texts(), answers[1].texts()]


def test_a_closed_batcher_refuses_work(loaded):
    batcher = ContinuousBatcher(loaded, slots=1, max_len=120)
    batcher.close()
    with pytest.raises(RuntimeError, match="the decoder is closed"):
        batcher.submit(request("1.2.3.4", [1], tokens=3))
