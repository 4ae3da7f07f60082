"""The real preset on an accelerator, random weights: batch-1 decoding against the memory-bandwidth roofline, and
throughput at larger batches, static batches (``generate_ids``) beside the continuous decoder (model/continuous.py).

    python3 -m bench.device_real_preset --out "$OUT/real_preset.json"          # minigpt-med, bf16, cuda
    .venv/bin/python -m bench.device_real_preset --preset raddraft-small --device cpu --dtype float32 \\
        --new-tokens 6 --batches 2 --runs 1                                   # the CPU smoke test

Batch 1: decode ms/token of ``generate_ids`` (transformers' dynamic cache) and of the continuous decoder with one
slot, each against the roofline ``LLM weight bytes / bandwidth`` (Llama-2-7B in bf16: 13.5 GB at 4.8 TB/s on an
H200 ≈ 2.8 ms/token; a ratio of 1 is the bound). Each batch B of ``--batches``: tokens/s of B rows of ``--new-tokens``
each (EOS held back), static vs continuous with B slots; then a mixed queue of 2B rows whose budgets run from a
quarter of ``--new-tokens`` to all of it (static: two batches of B, each decoded to its longest row; continuous:
B slots, a row leaves at its budget and the next joins), tokens/s of the tokens kept. Every figure is min / median /
max over ``--runs`` (fewer when ``--budget-s`` is spent); the JSON is rewritten after every section, so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaModel

from bench.real_preset import build
from model import prompts
from model.config import get_preset
from model.continuous import ContinuousDecoder
from model.minigpt import MiniGPTMed

logger = logging.getLogger("bench.device_real_preset")

PROMPT_TEXT_TOKENS = 128  # room for the instruction text in a decoder slot


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(device: torch.device, run: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - started


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    if not values:
        return {"runs": 0}
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


class Bench:
    def __init__(self, model: MiniGPTMed, args: argparse.Namespace) -> None:
        self.model = model
        self.device = model.device
        self.new = args.new_tokens
        self.runs = args.runs
        self.deadline = time.perf_counter() + args.budget_s
        self.instruction = prompts.grounding_instruction()
        size = model.config.vision.image_size
        generator = torch.Generator(device=self.device).manual_seed(0)
        self.images = torch.randn(2 * max(args.batches), 3, size, size, device=self.device, generator=generator)
        self.max_len = min(model.config.llm.max_position_embeddings,
                           model.config.image_tokens + PROMPT_TEXT_TOKENS + self.new)

    def repeat(self, measure: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
        """*measure* ``--runs`` times (at least once, no more once the budget is spent), figures by name."""
        figures: dict[str, list[float]] = {}
        for run in range(self.runs):
            if run and time.perf_counter() > self.deadline:
                logger.warning("time budget spent: %d of %d run(s)", run, self.runs)
                break
            for name, value in measure().items():
                figures.setdefault(name, []).append(value)
        return figures

    def static(self, images: torch.Tensor, new: int) -> float:
        return seconds(self.device, lambda: self.model.generate_ids(
            images, [self.instruction] * images.shape[0], max_new_tokens=new, min_new_tokens=new))

    def continuous(self, decoder: ContinuousDecoder, images: torch.Tensor, budgets: list[int]) -> float:
        return seconds(self.device, lambda: decoder.generate_ids(
            images, [self.instruction] * images.shape[0], budgets, min_new_tokens=max(budgets)))

    def batch_one(self, roofline_ms: float) -> dict[str, Any]:
        images = self.images[:1]
        decoder = ContinuousDecoder(self.model, 1, self.max_len)
        self.static(images, 2)
        self.continuous(decoder, images, [2])  # warm-up: kernels, allocator

        def measure() -> dict[str, float]:
            first, total = self.static(images, 1), self.static(images, self.new)
            first_c, total_c = self.continuous(decoder, images, [1]), self.continuous(decoder, images, [self.new])
            # decode ms/token: the time past the first token over the tokens after it (0 when noise hides it)
            return {"generate_ids": 1000 * max(total - first, 0.0) / (self.new - 1), "generate_ids_first_s": first,
                    "generate_ids_total_s": total,
                    "continuous": 1000 * max(total_c - first_c, 0.0) / (self.new - 1), "continuous_first_s": first_c,
                    "continuous_total_s": total_c}

        figures = self.repeat(measure)
        result: dict[str, Any] = {}
        for mode in ("generate_ids", "continuous"):
            result[mode] = {"ms_per_token": spread(figures[mode]),
                            "decode_tokens_per_s": spread([1000 / ms for ms in figures[mode] if ms > 0], 1),
                            "tokens_per_s": spread([self.new / s for s in figures[f"{mode}_total_s"]], 1),
                            "first_token_s": spread(figures[f"{mode}_first_s"]),
                            "ratio_to_roofline": spread([ms / roofline_ms for ms in figures[mode]], 2)}
        return result

    def batch(self, size: int) -> dict[str, Any]:
        decoder = ContinuousDecoder(self.model, size, self.max_len)
        fixed = self.images[:size]
        queue = self.images[: 2 * size]
        low = max(1, self.new // 4)
        budgets = [low + (self.new - low) * i // max(2 * size - 1, 1) for i in range(2 * size)]
        kept = sum(budgets)
        chunks = [budgets[i:i + size] for i in range(0, 2 * size, size)]
        self.static(fixed, 2)
        self.continuous(decoder, fixed, [2] * size)  # warm-up

        def measure() -> dict[str, float]:
            static_mixed = sum(self.static(queue[i * size:(i + 1) * size], max(chunk))
                               for i, chunk in enumerate(chunks))
            return {"fixed_static": size * self.new / self.static(fixed, self.new),
                    "fixed_continuous": size * self.new / self.continuous(decoder, fixed, [self.new] * size),
                    "mixed_static": kept / static_mixed,
                    "mixed_continuous": kept / self.continuous(decoder, queue, budgets)}

        figures = self.repeat(measure)
        return {"batch": size, "new_tokens": self.new, "mixed_rows": 2 * size, "mixed_tokens_kept": kept,
                **{f"{name}_tokens_per_s": spread(values, 1) for name, values in figures.items()},
                "mixed_speedup": spread([c / s for c, s in zip(figures["mixed_continuous"], figures["mixed_static"],
                                                               strict=True)], 2)}


def write(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2) + "\n"
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tmp")
    partial.write_text(text)
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minigpt-med")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes beside batch 1")
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bandwidth-tb-s", type=float, default=4.8, help="memory bandwidth (H200: 4.8 TB/s)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no further runs once this is spent")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "real_preset.json"
                        if os.environ.get("OUT") else None, help="JSON file (default $OUT/real_preset.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
        config = get_preset(args.preset)
    except ValueError as exc:
        parser.error(str(exc))
    if args.new_tokens < 2 or args.runs < 1 or not args.batches or min(args.batches) < 1:
        parser.error("--new-tokens must be at least 2, --runs and every --batches value at least 1")
    if "cache" not in inspect.signature(LlamaModel.forward).parameters:
        parser.error(f"transformers {transformers.__version__} has no `cache` argument (model/minigpt.py needs it): "
                     "install this project's transformers (bench/README.md)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device")
    started = time.perf_counter()
    with torch.inference_mode():
        model = build(config, device, getattr(torch, args.dtype))
    llm_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    roofline_ms = 1000 * llm_bytes / (args.bandwidth_tb_s * 1e12)
    report: dict[str, Any] = {
        "preset": config.name, "device": str(device), "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters()),
        "llm_weight_bytes": llm_bytes, "bandwidth_tb_s": args.bandwidth_tb_s,
        "roofline_ms_per_token": round(roofline_ms, 6), "new_tokens": args.new_tokens,
        "build_s": round(time.perf_counter() - started, 1)}
    logger.info("built %s (%.2f B parameters, LLM %.1f GB) on %s: roofline %.2f ms/token", config.name,
                report["parameters"] / 1e9, llm_bytes / 1e9, report["device_name"], roofline_ms)
    write(report, args.out)
    bench = Bench(model, args)
    with torch.inference_mode():
        report["batch_1"] = bench.batch_one(roofline_ms)
        logger.info("batch 1: %s", json.dumps(report["batch_1"]))
        write(report, args.out)
        report["batches"] = []
        for size in args.batches:
            report["batches"].append(bench.batch(size))
            logger.info("batch %d: %s", size, json.dumps(report["batches"][-1]))
            write(report, args.out)
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    write(report, args.out)
    if args.out is None:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
