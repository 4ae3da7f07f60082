"""Both ends of the gpu queue on the io side: a prepared study → :class:`InferenceRequest`, and the
:class:`InferenceResponse` → :class:`~model.result.AnalysisResult`.

The split mirrors :func:`model.analyze.analyze_manifest`: the images the slice policy picks are prepared
(decoded, windowed, letterboxed) from the spool; per series the report instruction runs on the series overview
(the image itself for a radiograph, a montage for a CT/MR series) and ``[grounding]`` on every picked image.
Boxes come back on the 0–100 grid and are mapped to source pixels through each image's letterbox transform;
findings of neighbouring slices are merged. The result is preliminary until a radiologist signs it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread

from model import prompts
from model.analyze import REPORT_TOKENS, findings_from_answer, split_report
from model.config import PRESETS, MiniGPTConfig
from model.embedded import EMBEDDED_DIR, MINIGPT_MED_FILES
from model.examples import overview
from model.imaging import prepare_image
from model.result import AnalysisResult, Finding
from model.slices import SlicePolicy, merge_findings, plan_study
from model.weights import CONFIG_FILE
from workers.manifest import StudyManifest
from workers.payload import ArrayDType, InferenceRequest, InferenceResponse, ModelImage, ModelTask

REPORT_PREFIX = "report:"
GROUNDING_PREFIX = "grounding:"
OVERVIEW_PREFIX = "overview:"


def model_input_size(spec: str) -> int:
    """The square input size of the model ``settings.model`` names, without loading its weights."""
    if spec in PRESETS:
        return PRESETS[spec].vision.image_size
    folder = EMBEDDED_DIR if spec == "embedded" else Path(spec).expanduser()
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
            return MiniGPTConfig.from_dict(meta["config"]).vision.image_size
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{config_path}: cannot read the model's vision.image_size: {exc}") from exc
    if folder.is_dir() and all((folder / name).exists() for name in MINIGPT_MED_FILES):
        return PRESETS["minigpt-med"].vision.image_size
    raise ValueError(f"model {spec!r}: no preset of that name and no model folder at {folder} "
                     "(io workers need the model's config.json, or the preset name 'minigpt-med')")


def request_id(study_uid: str, episode_id: int) -> str:
    return f"infer-{study_uid}-{episode_id}"


def build_request(manifest: StudyManifest, spool_dir: Path, model_size: int, policy: SlicePolicy | None = None,
                  *, dtype: ArrayDType = "float16", max_new_tokens: int = REPORT_TOKENS) -> InferenceRequest:
    """The gpu work of one prepared study: images and tasks, everything the model needs, nothing else."""
    policy = policy or SlicePolicy()
    chosen, _ = plan_study(manifest, policy)
    if not chosen:
        raise ValueError(f"study {manifest.study_instance_uid} has no image the model can read")
    by_series: dict[str, list[tuple[str, ModelImage, np.ndarray]]] = {}
    for series, instance in chosen:
        prepared = prepare_image(dcmread(spool_dir / instance.path), model_size)
        image = ModelImage.build(f"{GROUNDING_PREFIX}{instance.sop_instance_uid}", prepared.pixels,
                                 sop_instance_uid=instance.sop_instance_uid, transform=prepared.transform,
                                 dtype=dtype)
        by_series.setdefault(series.series_instance_uid, []).append((instance.sop_instance_uid, image,
                                                                     prepared.display))
    images: list[ModelImage] = []
    tasks: list[ModelTask] = []
    for series_uid, members in by_series.items():
        if len(members) == 1:
            report_image = members[0][1].key
        else:
            montage = overview([display for _, _, display in members], model_size)
            report_image = f"{OVERVIEW_PREFIX}{series_uid}"
            images.append(ModelImage.build(report_image, montage, dtype=dtype))
        tasks.append(ModelTask(task_id=f"{REPORT_PREFIX}{series_uid}", image=report_image, task="report",
                               instruction=prompts.report_instruction(), max_new_tokens=max_new_tokens))
        for uid, image, _ in members:
            images.append(image)
            tasks.append(ModelTask(task_id=f"{GROUNDING_PREFIX}{uid}", image=image.key, task="grounding",
                                   instruction=prompts.grounding_instruction(), max_new_tokens=max_new_tokens))
    return InferenceRequest(request_id=request_id(manifest.study_instance_uid, manifest.episode_id),
                            study_instance_uid=manifest.study_instance_uid, episode_id=manifest.episode_id,
                            model_size=model_size, images=images, tasks=tasks)


def assemble_result(manifest: StudyManifest, request: InferenceRequest, response: InferenceResponse,
                    policy: SlicePolicy | None = None) -> AnalysisResult:
    """The analysis of the study from the model's texts; every task of the request must have its answer."""
    policy = policy or SlicePolicy()
    if response.request_id != request.request_id:
        raise ValueError(f"response {response.request_id} does not answer request {request.request_id}")
    texts = response.texts()
    missing = [task.task_id for task in request.tasks if task.task_id not in texts]
    if missing:
        raise ValueError(f"response {response.request_id} has no answer for task(s) {missing}")
    _, positions = plan_study(manifest, policy)
    reports: list[str] = []
    by_series: dict[str, list[Finding]] = {}
    analysed: list[str] = []
    for task in request.tasks:
        if task.task_id.startswith(REPORT_PREFIX):
            reports.append(texts[task.task_id])
            continue
        image = request.image(task.image)
        if image.sop_instance_uid is None or image.transform is None or image.sop_instance_uid not in positions:
            raise ValueError(f"task {task.task_id} of request {request.request_id} is not on an analysed image of "
                             f"study {manifest.study_instance_uid}")
        analysed.append(image.sop_instance_uid)
        series_uid = positions[image.sop_instance_uid].series_instance_uid
        by_series.setdefault(series_uid, []).extend(
            findings_from_answer(texts[task.task_id], image.transform.to_letterbox(), image.sop_instance_uid))
    findings: list[Finding] = []
    for series_uid, series_findings in by_series.items():
        slices = sum(1 for uid in analysed if positions[uid].series_instance_uid == series_uid)
        if slices > 1:  # as analyze_series: neighbouring slices showing one lesion become one finding
            findings.extend(m.finding for m in merge_findings(series_findings, positions, policy))
        else:
            findings.extend(series_findings)
    if not reports:
        raise ValueError(f"request {request.request_id} has no report task")
    return AnalysisResult(
        study_instance_uid=request.study_instance_uid,
        episode_id=request.episode_id,
        model=response.model,
        report=split_report(reports[0]),
        findings=findings,
        analysed_instances=analysed,
        raw_outputs=texts,
        status="preliminary",
        created_at=datetime.now(UTC),
    )

