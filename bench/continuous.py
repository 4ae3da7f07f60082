"""Queued studies through the gpu worker's three ways of decoding, side by side in one run: the continuous decoder
(workers/batching.py: studies' rows join and leave a running batch at the token level), the former micro-batch
(up to 4 studies in ONE generate call, decoded to the longest row) and one study after the other.

    .venv/bin/python -m bench.continuous                       # embedded model, 8 queued studies vs 1, 3 runs
    .venv/bin/python -m bench.continuous --model raddraft-small --studies 1,8 --runs 3 --json

Every mode answers the same requests through :func:`model.analyze.run_batch` (follow-up round included); the texts
of every mode must be equal (the bench fails otherwise). Tokens are the new tokens the answers keep (each row cut
at EOS or its own budget), the same count in every mode: tokens/s and requests/s differ by the time only. The
continuous mode runs like the worker: ``--threads`` task threads (``inference_batch_size``) pull the queued studies,
``threads x ROWS_PER_STUDY`` decoder slots. Each run measures every mode once, in turn; the figures are min / median
/ max over the runs, and the ratios are taken within a run (continuous / micro-batch, continuous / one-by-one).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch

from model import analyze
from model.embedded import LoadedModel, load_model
from model.payload import InferenceRequest, InferenceResponse
from model.phantoms import generate_studies
from workers.batching import ContinuousBatcher
from workers.inference import ROWS_PER_STUDY, decoder_length

logger = logging.getLogger("bench.continuous")

MICRO_BATCH = 4  # the former MicroBatcher's max_batch (inference_batch_size)
MODES = ("continuous", "micro-batch", "one-by-one")


def phantom_requests(loaded: LoadedModel, count: int, seed: int) -> list[InferenceRequest]:
    """*count* phantom studies (CR, DX, CT, MR mixed) as the analysis builds their requests."""
    size = loaded.model.config.vision.image_size
    requests = []
    for i, study in enumerate(generate_studies(seed, count)):
        request = analyze.local_request(study.datasets[: 3], size)
        requests.append(request.model_copy(update={"request_id": f"bench-{i}"}))
    return requests


class Counter:
    """A row generator around *inner* that counts the new tokens the answers keep."""

    def __init__(self, inner: analyze.RowGenerator) -> None:
        self.inner = inner
        self.tokens = 0
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor, instructions: list[str], limits: list[int]) -> list[list[int]]:
        ids = self.inner(images, instructions, limits)
        with self._lock:
            self.tokens += sum(len(row[:limit]) for row, limit in zip(ids, limits, strict=True))
        return ids


def one_call(loaded: LoadedModel) -> analyze.RowGenerator:
    """run_batch's default: ONE generate_ids call, every row to the longest budget."""
    def generate(images: torch.Tensor, instructions: list[str], limits: list[int]) -> list[list[int]]:
        return loaded.model.generate_ids(images, instructions, max_new_tokens=max(limits))
    return generate


def run_one_by_one(loaded: LoadedModel, requests: Sequence[InferenceRequest], counter: Counter
                   ) -> list[InferenceResponse]:
    return [r for request in requests for r in analyze.run_batch(loaded, [request], generate=counter)]


def run_micro_batch(loaded: LoadedModel, requests: Sequence[InferenceRequest], counter: Counter
                    ) -> list[InferenceResponse]:
    return [r for start in range(0, len(requests), MICRO_BATCH)
            for r in analyze.run_batch(loaded, requests[start:start + MICRO_BATCH], generate=counter)]


def run_continuous(batcher: ContinuousBatcher, requests: Sequence[InferenceRequest], threads: int
                   ) -> list[InferenceResponse]:
    """*threads* task threads take the queued requests in turn, as the gpu worker's pool does."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(requests)):
        todo.put(i)
    answers: dict[int, InferenceResponse] = {}
    errors: list[BaseException] = []

    def task() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                answers[i] = batcher.submit(requests[i])
            except Exception as exc:  # reported after the run
                errors.append(exc)

    pool = [threading.Thread(target=task) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed in the continuous decoder: {errors[0]}")
    return [answers[i] for i in range(len(requests))]


def timed(run: Callable[[], list[InferenceResponse]]) -> tuple[float, list[InferenceResponse]]:
    started = time.perf_counter()
    responses = run()
    return time.perf_counter() - started, responses


def spread(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def measure(loaded: LoadedModel, requests: list[InferenceRequest], runs: int, threads: int) -> dict[str, object]:
    """Every mode once per run, in turn; the answers of every mode must be the same."""
    counter = Counter(one_call(loaded))
    batcher = ContinuousBatcher(loaded, threads * ROWS_PER_STUDY, decoder_length(loaded.model.config))
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, int] = {}
    reference: list[dict[str, str]] | None = None
    try:
        run_continuous(batcher, requests[:1], 1)  # warm-up
        for _ in range(runs):
            for mode in MODES:
                counter.tokens, before = 0, batcher.decoder.tokens
                if mode == "continuous":
                    wall, responses = timed(lambda: run_continuous(batcher, requests, threads))
                    counter.tokens = batcher.decoder.tokens - before  # it decodes each row to its own end
                elif mode == "micro-batch":
                    wall, responses = timed(lambda: run_micro_batch(loaded, requests, counter))
                else:
                    wall, responses = timed(lambda: run_one_by_one(loaded, requests, counter))
                texts = [r.texts() for r in responses]
                if reference is None:
                    reference = texts
                elif texts != reference:
                    raise RuntimeError(f"mode {mode} answered differently from the first mode")
                seconds[mode].append(wall)
                tokens[mode] = counter.tokens
    finally:
        batcher.close()
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the modes kept different token counts: {tokens}")
    kept = tokens["continuous"]
    result: dict[str, object] = {"studies": len(requests), "rows": sum(len(r.tasks) for r in requests),
                                 "tokens": kept}
    for mode in MODES:
        result[mode] = {"seconds": spread(seconds[mode], 3),
                        "tokens_per_s": spread([kept / s for s in seconds[mode]], 1),
                        "requests_per_s": spread([len(requests) / s for s in seconds[mode]], 3)}
    result["speedup"] = {  # within each run: the other mode's time / the continuous time
        "vs_micro_batch": spread([m / c for m, c in zip(seconds["micro-batch"], seconds["continuous"], strict=True)]),
        "vs_one_by_one": spread([o / c for o, c in zip(seconds["one-by-one"], seconds["continuous"], strict=True)]),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="settings.model: embedded, raddraft-small or a folder")
    parser.add_argument("--studies", default="1,8", help="comma-separated queue lengths (default 1,8)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="task threads of the worker (inference_batch_size)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        counts = [int(n) for n in args.studies.split(",")]
    except ValueError:
        parser.error(f"--studies {args.studies!r} must be comma-separated integers")
    if args.runs < 1 or args.threads < 1 or min(counts) < 1:
        parser.error("--runs, --threads and every --studies value must be at least 1")
    loaded = load_model(args.model)
    requests = phantom_requests(loaded, max(counts), args.seed)
    with torch.inference_mode():
        results = [measure(loaded, requests[:n], args.runs, args.threads) for n in counts]
    report = {"model": loaded.identity.name, "trained": loaded.trained, "threads": args.threads,
              "torch_threads": torch.get_num_threads(), "runs": args.runs, "results": results}
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    sys.stdout.write(f"{report['model']} on the cpu ({report['torch_threads']} torch threads), {args.runs} runs, "
                     "min / median / max\n")
    for result in results:
        sys.stdout.write(f"\n{result['studies']} queued stud{'y' if result['studies'] == 1 else 'ies'}, "
                         f"{result['rows']} rows (+ follow-ups), {result['tokens']} tokens kept\n")
        sys.stdout.write(f"{'mode':<12} {'tokens/s':>22} {'requests/s':>22}\n")
        for mode in MODES:
            figures = result[mode]
            assert isinstance(figures, dict)
            tps, rps = figures["tokens_per_s"], figures["requests_per_s"]
            sys.stdout.write(f"{mode:<12} {tps['min']:>6} {tps['median']:>7} {tps['max']:>7}  "
                             f"{rps['min']:>6} {rps['median']:>7} {rps['max']:>7}\n")
        speedup = result["speedup"]
        assert isinstance(speedup, dict)
        for name, values in speedup.items():
            sys.stdout.write(f"continuous speed-up {name.replace('_', ' ')}: {values['min']} / {values['median']} / "
                             f"{values['max']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
