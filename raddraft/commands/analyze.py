"""``raddraft analyze FILE.dcm [--task T] [--prompt TEXT] [--model PRESET_OR_PATH] [--json] [--local]``: run the
model on one image. Without ``--task`` it drafts the report and localizes findings (one batched generate call).

When a gateway of the same home (``RADDRAFT_HOME``) is running and serves the model asked for, the file goes to
its model socket and the gateway's loaded model answers (:mod:`raddraft.model_socket`): this process then
imports neither torch nor pydicom and takes well under a second more than the analysis. Otherwise, or with
``--local``, the command loads the model itself. The output is the same either way; the JSON's ``served_by``
says which (``gateway`` or ``this process``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.settings import Settings
from raddraft.model_socket import (
    TASK_CHOICES,
    AnalyzeReply,
    AnalyzeRequest,
    ModelSocketError,
    ModelSocketUnavailable,
    normalize_model_spec,
    request_analysis,
    socket_path,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a DICOM image file")
    parser.add_argument("--task", choices=TASK_CHOICES, help="one task only (default: report + boxes)")
    parser.add_argument("--prompt", help="label/phrase (detection, refer), question (vqa), box x1,y1,x2,y2 in "
                                         "source pixels (identify)")
    parser.add_argument("--model", help="'embedded', a preset name or a model folder (default: settings.model)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--local", action="store_true",
                        help="load the model in this process even when a running gateway could answer")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.file.is_file():
        sys.stderr.write(f"raddraft analyze: {args.file} is not a file\n")
        return 2
    spec = args.model or settings.model
    reply: AnalyzeReply | None = None
    if settings.model_socket and not args.local:
        try:
            reply = _ask_gateway(args, settings, spec)
        except ModelSocketError as exc:
            sys.stderr.write(f"raddraft analyze: {exc}; --local analyses in this process instead\n")
            return 1
    served_by = "gateway"
    if reply is None:
        served_by = "this process"
        reply = _analyse_here(args, settings, spec)
    if not reply.ok:
        sys.stderr.write(f"raddraft analyze: {args.file}: {reply.error}\n")
        return 2 if reply.kind == "input" else 1
    assert reply.payload is not None
    if args.json:
        sys.stdout.write(json.dumps({**reply.payload, "served_by": served_by}, indent=2) + "\n")
    else:
        sys.stdout.write(reply.text)
    return 0


def _ask_gateway(args: argparse.Namespace, settings: Settings, spec: str) -> AnalyzeReply | None:
    """The running gateway's answer, or None when no gateway here serves *spec* (the caller loads it itself)."""
    path = socket_path(settings.home)
    size = args.file.stat().st_size
    if size > settings.max_instance_bytes:
        return None  # the gateway would refuse it; this process takes any size
    request = AnalyzeRequest(model=normalize_model_spec(spec), task=args.task, prompt=args.prompt, size=size)
    try:
        reply = request_analysis(path, request, args.file.read_bytes())
    except ModelSocketUnavailable as exc:
        log.debug("analysing in this process: %s", exc)
        return None
    if not reply.ok and reply.kind == "model":
        log.info("analysing in this process: %s", reply.error)
        return None
    log.info("answered by the gateway's model at %s", path)
    return reply


def _analyse_here(args: argparse.Namespace, settings: Settings, spec: str) -> AnalyzeReply:
    from pydicom import dcmread  # noqa: PLC0415 - heavy imports only when this process runs the model
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    from model.embedded import load_model  # noqa: PLC0415
    from raddraft.analyze_output import describe  # noqa: PLC0415
    from workers.inference import set_threads  # noqa: PLC0415

    try:
        ds = dcmread(args.file)
        set_threads(settings.inference_threads)  # RADDRAFT_INFERENCE_THREADS, as the gpu workers
        return describe(load_model(spec), ds, args.task, args.prompt)
    except (InvalidDicomError, ValueError, FileNotFoundError) as exc:
        return AnalyzeReply(ok=False, kind="input", error=str(exc))
