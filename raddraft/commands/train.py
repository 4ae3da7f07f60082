"""``raddraft train [--out DIR] [--steps N] [--batch-size B] [--seed S] [--init-from MODEL] [--modality-mix MIX]
[--resume]``: train the embedded model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="run folder (default: <home>/train-run)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the phantom stream")
    parser.add_argument("--lr", type=float, default=8e-4, help="peak learning rate (default 8e-4)")
    parser.add_argument("--warmup", type=int, default=150, help="linear warm-up steps (default 150)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    parser.add_argument("--preset", default="raddraft-small", help="model preset to train (default raddraft-small)")
    parser.add_argument("--init-from", type=Path,
                        help="start from the weights of this model folder (e.g. model/weights/raddraft-small)")
    parser.add_argument("--probe-weight", type=float, default=0.5,
                        help="weight of the training-only patch supervision of the vision encoder (0: off)")
    parser.add_argument("--modality-mix", type=modality_mix, metavar="CR=W,DX=W,CT=W,MR=W",
                        help="relative weights of the modalities drawn for training studies "
                             "(default CR=0.3,DX=0.3,CT=0.2,MR=0.2)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def modality_mix(text: str) -> tuple[float, ...]:
    """``CR=0.3,DX=0.3,CT=0.3,MR=0.1`` → the weights in the order of ``model.phantoms.MODALITIES``."""
    from model.phantoms import MODALITIES  # noqa: PLC0415 - the phantom module only when the command runs

    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep or name not in MODALITIES or name in weights:
            raise argparse.ArgumentTypeError(f"{part!r} must be MODALITY=WEIGHT, once each of {', '.join(MODALITIES)}")
        try:
            weights[name] = float(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"weight {value!r} of {name} is not a number") from exc
    missing = [m for m in MODALITIES if m not in weights]
    if missing:
        raise argparse.ArgumentTypeError(f"--modality-mix lacks {', '.join(missing)}")
    return tuple(weights[m] for m in MODALITIES)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from model.training import TrainConfig, train  # noqa: PLC0415 - torch only when the command runs

    out = args.out or settings.home / "train-run"
    try:
        config = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                             studies_per_step=max(1, args.batch_size // 4), seed=args.seed, lr=args.lr,
                             warmup_steps=args.warmup, checkpoint_every=args.checkpoint_every,
                             probe_weight=args.probe_weight,
                             init_from=str(args.init_from) if args.init_from else None,
                             **({"modality_weights": args.modality_mix} if args.modality_mix else {}))
        summary = train(config, out, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        sys.stderr.write(f"raddraft train: {exc}\n")
        return 2
    sys.stdout.write(f"trained {summary.steps_done} steps in {summary.seconds:.0f} s; loss {summary.first_loss} → "
                     f"{summary.last_loss}; model in {summary.final_dir}\n")
    return 0
