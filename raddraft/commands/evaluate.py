"""``raddraft evaluate DIR [--model PRESET_OR_PATH] [--limit N] [--out FILE]``: metrics JSON on a phantom folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.jsonio import write_atomic
from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="a folder written by 'raddraft phantoms' (with truth.json)")
    parser.add_argument("--model", help="'embedded', a preset name or a model folder (default: settings.model)")
    parser.add_argument("--limit", type=int, help="evaluate the first N studies only")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON to this file")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from model.embedded import load_model  # noqa: PLC0415 - torch only when the command runs
    from model.evaluation import evaluate_folder  # noqa: PLC0415
    from workers.inference import set_threads  # noqa: PLC0415

    if args.limit is not None and args.limit < 1:
        sys.stderr.write(f"raddraft evaluate: --limit {args.limit} must be at least 1\n")
        return 2
    try:
        set_threads(settings.inference_threads)  # RADDRAFT_INFERENCE_THREADS, as the gpu workers
        loaded = load_model(args.model or settings.model)
        metrics = evaluate_folder(loaded, args.folder, limit=args.limit)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"raddraft evaluate: {exc}\n")
        return 2
    metrics = {"model": loaded.identity.model_dump(), "folder": str(args.folder), **metrics}
    text = json.dumps(metrics, indent=2) + "\n"
    if args.out:
        write_atomic(args.out, text.encode())
    sys.stdout.write(text)
    return 0
