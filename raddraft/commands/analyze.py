"""``raddraft analyze FILE.dcm [--task T] [--prompt TEXT] [--model PRESET_OR_PATH] [--json]``: run the model on one
image. Without ``--task`` it drafts the report and localizes findings (one batched generate call)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raddraft.settings import Settings

TASK_CHOICES = ("report", "detection", "refer", "identify", "grounding", "vqa")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a DICOM image file")
    parser.add_argument("--task", choices=TASK_CHOICES, help="one task only (default: report + boxes)")
    parser.add_argument("--prompt", help="label/phrase (detection, refer), question (vqa), box x1,y1,x2,y2 in "
                                         "source pixels (identify)")
    parser.add_argument("--model", help="'embedded', a preset name or a model folder (default: settings.model)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pydicom import dcmread  # noqa: PLC0415 - heavy imports only when the command runs
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    from model.analyze import analyze_series, run_task  # noqa: PLC0415
    from model.embedded import load_model  # noqa: PLC0415
    from workers.inference import set_threads  # noqa: PLC0415

    if not args.file.is_file():
        sys.stderr.write(f"raddraft analyze: {args.file} is not a file\n")
        return 2
    try:
        ds = dcmread(args.file)
        set_threads(settings.inference_threads)  # RADDRAFT_INFERENCE_THREADS, as the gpu workers
        loaded = load_model(args.model or settings.model)
        if args.task is None:
            analysis = analyze_series(loaded.model, [ds])
            payload = {"model": loaded.identity.model_dump(), "status": "preliminary",
                       "report": analysis.report.model_dump(), "findings": [f.model_dump() for f in analysis.findings],
                       "raw_outputs": analysis.raw_outputs, "seconds": round(analysis.seconds, 3)}
            text = (f"PRELIMINARY (AI draft, not signed) — {loaded.identity.name} {loaded.identity.version}\n"
                    f"{analysis.report.text}\n\nFINDINGS WITH BOXES (source pixels x1, y1, x2, y2):\n"
                    + ("".join(f"  {f.laterality or '':5} {f.label:18} {tuple(round(v, 1) for v in f.box)}\n"
                               for f in analysis.findings) or "  none\n")
                    + f"({analysis.seconds:.2f} s)\n")
        else:
            answer = run_task(loaded.model, ds, args.task, args.prompt)
            payload = {"model": loaded.identity.model_dump(), "status": "preliminary", "task": answer.task,
                       "instruction": answer.instruction, "answer": answer.text,
                       "findings": [f.model_dump() for f in answer.findings]}
            text = f"{answer.instruction}\n{answer.text}\n" + "".join(
                f"  {f.label}: {tuple(round(v, 1) for v in f.box)}\n" for f in answer.findings)
    except (InvalidDicomError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"raddraft analyze: {args.file}: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(payload, indent=2) + "\n" if args.json else text)
    return 0
