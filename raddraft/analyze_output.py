"""What ``raddraft analyze`` prints for one dataset, the same whether the command loaded the model itself or a
gateway answered on its model socket (:mod:`raddraft.model_socket`); and the gateway's side of that socket, which
also answers the worklist's questions (worklist/answerer.py ``MiniGPTAnswerer`` on the same loaded model).

Both go through the one analysis path, :mod:`model.analyze` (build the request → run it → assemble), as the
pipeline does. Imports the model stack (torch): only the process that runs the model imports this module.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from core.settings import Settings
from model.analyze import SeriesAnalysis, analyze_series, run_task
from model.embedded import LoadedModel
from raddraft.model_socket import (
    AnalyzeError,
    AnalyzeReply,
    AnalyzeRequest,
    AskRequest,
    Handler,
    ModelSocketServer,
    QuestionHandler,
    normalize_model_spec,
    socket_path,
)
from workers.inference import settings_model
from workers.pipeline import model_input_size
from worklist.answerer import ASK_MAX_NEW_TOKENS, MiniGPTAnswerer

log = logging.getLogger(__name__)


def describe(loaded: LoadedModel, ds: Dataset, task: str | None, prompt: str | None) -> AnalyzeReply:
    """The analysis of *ds* (report + boxes without *task*) as the JSON payload and the text of the command.

    Raises ``ValueError`` for an image or prompt the model cannot take (the command's exit status 2).
    """
    identity = loaded.identity.model_dump()
    if task is None:
        analysis = analyze_series(loaded, [ds])
        payload = analysis_payload(identity, analysis)
        text = (f"PRELIMINARY (AI draft, not signed) — {loaded.identity.name} {loaded.identity.version}\n"
                f"{analysis.report.text}\n\nFINDINGS WITH BOXES (source pixels x1, y1, x2, y2):\n"
                + ("".join(f"  {f.laterality or '':5} {f.label:18} {tuple(round(v, 1) for v in f.box)}"
                           f"{'  (not in the text)' if f.status == 'box_only' else ''}\n"
                           for f in analysis.findings) or "  none\n")
                + consistency_text(analysis)
                + f"({analysis.seconds:.2f} s)\n")
        return AnalyzeReply(ok=True, payload=payload, text=text)
    answer = run_task(loaded, ds, task, prompt)
    payload = {"model": identity, "status": "preliminary", "task": answer.task, "instruction": answer.instruction,
               "answer": answer.text, "findings": [f.model_dump() for f in answer.findings]}
    text = f"{answer.instruction}\n{answer.text}\n" + "".join(
        f"  {f.label}: {tuple(round(v, 1) for v in f.box)}\n" for f in answer.findings)
    return AnalyzeReply(ok=True, payload=payload, text=text)


def consistency_text(analysis: SeriesAnalysis) -> str:
    """``AI consistency: …`` and each statement without image evidence, for the command's text output."""
    consistency = analysis.result.consistency
    if consistency is None:
        return ""
    lines = [f"AI consistency: {consistency.grounded} stated finding(s) localized, {consistency.text_only} not "
             f"localized by the AI, {consistency.box_only} box(es) not in the text\n"]
    lines += [f"  not localized by the AI: {s.text}\n" for s in analysis.report.sentences if s.status == "text_only"]
    return "".join(lines)


def analysis_payload(identity: dict[str, object], analysis: SeriesAnalysis) -> dict[str, object]:
    """The JSON of ``raddraft analyze --json`` for a full analysis: the report with its sentences (section, text,
    polarity, labels, laterality, site, findings, status), the findings with their sentences, status and source,
    and ``consistency`` (grounded, text_only, box_only, flagged; null for an analysis that was not grounded)."""
    consistency = analysis.result.consistency
    return {
        "model": identity, "status": "preliminary", "report": analysis.report.model_dump(),
        "findings": [f.model_dump() for f in analysis.findings],
        "consistency": None if consistency is None else {**consistency.model_dump(), "flagged": consistency.flagged},
        "raw_outputs": analysis.raw_outputs, "seconds": round(analysis.seconds, 3)}


def socket_handler(settings: Settings) -> Handler:
    """Answers with the model this process's gpu work uses (``settings.model`` on ``settings.inference_device``),
    loaded once for both; a request for another model is refused with kind ``model``."""
    served = normalize_model_spec(settings.model)

    def handle(request: AnalyzeRequest, data: bytes) -> AnalyzeReply:
        if request.model != served:
            raise AnalyzeError("model", f"this gateway serves model {served!r}, not {request.model!r}")
        try:
            ds = dcmread(io.BytesIO(data))
            return describe(settings_model(settings), ds, request.task, request.prompt)
        except (InvalidDicomError, ValueError) as exc:
            raise AnalyzeError("input", str(exc)) from exc

    return handle


def question_handler(settings: Settings) -> QuestionHandler | None:
    """Answers worklist questions with the model :func:`socket_handler` uses, greedy, as ``MiniGPTAnswerer``
    does in process (at most ``ASK_MAX_NEW_TOKENS``); None (logged) when the model's input size is unknown."""
    served = normalize_model_spec(settings.model)
    try:
        size = model_input_size(settings.model)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        log.warning("the model socket answers no worklist questions: %s", exc)
        return None

    def answer(request: AskRequest, pixels: np.ndarray) -> str:
        if request.model != served:
            raise AnalyzeError("model", f"this gateway serves model {served!r}, not {request.model!r}")
        loaded = settings_model(settings)
        return MiniGPTAnswerer(loaded.model, max_new_tokens=ASK_MAX_NEW_TOKENS).answer(pixels, request.instruction)

    return QuestionHandler(image_size=size, answer=answer)


def start_model_socket(settings: Settings) -> ModelSocketServer | None:
    """Answer ``raddraft analyze`` and the worklist's questions on ``<home>/run/model.sock``; None (logged) when
    it cannot be served here."""
    if not settings.model_socket:
        return None
    server = ModelSocketServer(socket_path(settings.home), socket_handler(settings),
                               max_bytes=settings.max_instance_bytes, questions=question_handler(settings))
    try:
        server.start()
    except (ValueError, FileExistsError, OSError) as exc:
        log.warning("raddraft analyze will load its own model: the model socket is off: %s", exc)
        return None
    return server
