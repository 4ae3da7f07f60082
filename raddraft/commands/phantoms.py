"""``raddraft phantoms OUT --count N --seed S [--modality CR|DX|CT|MR]``: synthetic studies with ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.settings import Settings
from model.phantoms import MODALITIES, write_studies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder: one sub-folder per study, plus truth.json")
    parser.add_argument("--count", type=int, default=10, help="number of studies (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same files")
    parser.add_argument("--modality", choices=MODALITIES, help="one modality only (default: a mix)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.count < 1:
        sys.stderr.write(f"raddraft phantoms: --count {args.count} must be at least 1\n")
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        sys.stderr.write(f"raddraft phantoms: {args.out} exists and is not an empty folder; choose a new one\n")
        return 2
    paths = write_studies(args.out, args.seed, args.count, args.modality)
    sys.stdout.write(f"wrote {args.count} studies ({len(paths)} images) and {args.out / 'truth.json'}\n")
    return 0
