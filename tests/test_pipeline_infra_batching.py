"""Several infer tasks of one gpu worker process answered in one forward pass (workers/batching.py), with the real
tiny model: the batched answers equal the one-by-one answers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pipeline_infra_helpers import TINY, tiny_model
from test_pipeline_infra_request import IDENTITY, spool_study

from model import analyze
from model.embedded import LoadedModel
from model.phantoms import generate_studies
from workers import pipeline
from workers.batching import MicroBatcher


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(tiny_model(), IDENTITY, trained=False)


def requests_of(tmp_path: Path, count: int):
    requests = []
    for i, study in enumerate(generate_studies(11, count, "CR")):
        folder = tmp_path / str(i)
        folder.mkdir()
        requests.append(pipeline.build_request(folder, spool_study(study, folder), TINY.vision.image_size,
                                               dtype="float32", max_new_tokens=16))
    return requests


def submit_all(batcher: MicroBatcher, requests):
    answers: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            answers[i] = batcher.submit(requests[i])
        except Exception as exc:  # the test looks at what each thread got
            answers[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return [answers[i] for i in range(len(requests))]


def recording(loaded: LoadedModel, sizes: list[int]):
    """The real batch runner, noting each batch's size in *sizes*."""

    def run(batch):
        sizes.append(len(batch))
        return analyze.run_batch(loaded, batch)

    return run


def test_queued_requests_share_one_forward_pass_and_get_their_own_answers(loaded, tmp_path):
    requests = requests_of(tmp_path, 3)
    calls: list[int] = []
    answers = submit_all(MicroBatcher(recording(loaded, calls), max_batch=4, window_s=0.5), requests)
    assert calls == [3]
    for request, answer in zip(requests, answers, strict=True):
        [alone] = analyze.run_batch(loaded, [request])
        assert answer.request_id == request.request_id
        assert answer.texts() == alone.texts()
        assert answer.batch_rows == sum(len(r.tasks) for r in requests)


def test_batches_are_capped_duplicates_run_once_and_errors_reach_every_task(loaded, tmp_path):
    requests = requests_of(tmp_path, 3)
    sizes: list[int] = []
    answers = submit_all(MicroBatcher(recording(loaded, sizes), max_batch=2, window_s=0.3), [*requests, requests[0]])
    assert sorted(sizes) in ([1, 2], [2, 2], [1, 1, 2]) and max(sizes) <= 2
    assert answers[3].texts() == answers[0].texts()

    def broken(batch):
        raise RuntimeError("CUDA out of memory")

    failed = submit_all(MicroBatcher(broken, max_batch=4, window_s=0.2), requests)
    assert all(isinstance(a, RuntimeError) and "out of memory" in str(a) for a in failed)
    with pytest.raises(ValueError, match="max_batch 0 must be at least 1"):
        MicroBatcher(broken, max_batch=0, window_s=0)
