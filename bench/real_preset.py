"""Speed and memory of a model preset at full size with random weights: vision encoder + prefill (time to the first
token) and greedy decoding of a fixed number of new tokens with the KV cache, for several batch sizes.

    .venv/bin/python -m bench.real_preset                                   # minigpt-med, bf16, cuda, batch 1 and 8
    .venv/bin/python -m bench.real_preset --preset raddraft-small --device cpu --dtype float32

The real preset (EVA ViT-g 448 + Llama-2-7b + LoRA r64) needs about 16 GB of accelerator memory in bf16; the
weights are random (no download, no released file needed): speed does not depend on their values. EOS is held
back (``min_new_tokens``) so every sample decodes exactly ``--new-tokens`` tokens. The tokenizer is the
project's byte-level BPE trained on phantom texts: the prompt is a few text tokens either way, the image tokens
(256 at 448 px) dominate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import time

import torch

from model import prompts
from model.config import MiniGPTConfig, get_preset
from model.minigpt import MiniGPTMed
from model.tokenizer import build_tokenizer

logger = logging.getLogger("bench.real_preset")


def build(config: MiniGPTConfig, device: torch.device, dtype: torch.dtype) -> MiniGPTMed:
    """*config* with random weights, made directly on *device* in *dtype* (no full-precision copy on the host)."""
    name = str(dtype).removeprefix("torch.")
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, dtype=name),
                                 llm=dataclasses.replace(config.llm, dtype=name))
    tokenizer = build_tokenizer(vocab_size=min(config.llm.vocab_size, 2048))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = MiniGPTMed(config, tokenizer)
    finally:
        torch.set_default_dtype(previous)
    model.ln_vision.float()  # MiniGPT-Med keeps its LayerNorm in fp32
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: MiniGPTMed, images: torch.Tensor, new_tokens: int) -> tuple[float, list[list[int]]]:
    instructions = [prompts.grounding_instruction()] * images.shape[0]
    _sync(model.device)
    started = time.perf_counter()
    ids = model.generate_ids(images, instructions, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    _sync(model.device)
    return time.perf_counter() - started, ids


def measure(model: MiniGPTMed, batch: int, new_tokens: int) -> dict[str, float | int]:
    size = model.config.vision.image_size
    images = torch.randn(batch, 3, size, size, device=model.device)  # (B, 3, S, S)
    timed(model, images, 2)  # warm-up: kernels, allocator
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    first, _ = timed(model, images, 1)  # vision encoder + prefill + the first token
    total, ids = timed(model, images, new_tokens)
    if any(len(row) != new_tokens for row in ids):
        raise RuntimeError(f"decoding stopped early: {[len(row) for row in ids]} tokens, wanted {new_tokens}")
    decode = max(total - first, 0.0) / max(new_tokens - 1, 1)
    result: dict[str, float | int] = {
        "batch": batch,
        "new_tokens": new_tokens,
        "prefill_s": round(first, 4),
        "decode_s_per_token": round(decode, 5),
        "total_s": round(total, 4),
        "tokens_per_s": round(batch * new_tokens / total, 1),
    }
    if model.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="minigpt-med")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=300)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        config = get_preset(args.preset)
    except ValueError as exc:
        parser.error(str(exc))
    device = torch.device(args.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model = build(config, device, getattr(torch, args.dtype))
    built = time.perf_counter() - started
    counts = {"vision": sum(p.numel() for p in model.visual_encoder.parameters()),
              "llm": sum(p.numel() for p in model.llm.parameters()),
              "total": sum(p.numel() for p in model.parameters())}
    logger.info("built %s (%.2f B parameters) on %s in %.1f s", config.name, counts["total"] / 1e9, device, built)
    runs = [measure(model, batch, args.new_tokens) for batch in batches]
    report = {"preset": config.name, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": args.dtype, "parameters": counts,
              "build_s": round(built, 1), "runs": runs,
              "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    sys.stdout.write(f"{config.name} on {report['device_name']}, {args.dtype}, random weights, "
                     f"{counts['total'] / 1e9:.2f} B parameters\n")
    sys.stdout.write("batch  prefill s  decode ms/token  total s  tokens/s\n")
    for run in runs:
        per_token_ms = 1000 * float(run["decode_s_per_token"])
        sys.stdout.write(f"{run['batch']:>5}  {run['prefill_s']:>9.3f}  {per_token_ms:>15.2f}  {run['total_s']:>7.2f}"
                         f"  {run['tokens_per_s']:>8.1f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
