"""io side of the gpu queue (workers/pipeline.py): a prepared phantom study → InferenceRequest (through JSON) → one
batched generate → InferenceResponse → AnalysisResult, the same as model.analyze.analyze_series in process."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pipeline_infra_helpers import TINY, tiny_model
from pydicom import dcmread

from core.manifest import StudyManifest
from core.result import ModelIdentity
from dicom_node.index import InstanceRecord
from model import analyze
from model.analyze import analyze_series
from model.embedded import LoadedModel
from model.payload import InferenceRequest, InferenceResponse, TaskOutput
from model.phantoms import PhantomStudy, generate_studies, generate_study, study_rng
from model.slices import iou
from workers import pipeline
from workers.prepare import build_manifest

TOKENS = 24
IDENTITY = ModelIdentity(name=TINY.name, version="test", parameters={"decoding": "greedy"})


def spool_study(study: PhantomStudy, spool: Path) -> StudyManifest:
    records = []
    for i, ds in enumerate(study.datasets):
        path = spool / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        records.append(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID), patient_id=str(ds.PatientID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="SCU", peer_address="127.0.0.1", size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), path=path.name, received_at=1.0, episode_id=1))
    return build_manifest(spool, str(study.datasets[0].StudyInstanceUID), 1, records)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return LoadedModel(tiny_model(), IDENTITY, trained=False)


@pytest.mark.parametrize("modality", ["CR", "CT", "MR"])
def test_queue_round_trip_equals_in_process_analysis(modality: str, loaded: LoadedModel, tmp_path: Path) -> None:
    study = next(generate_studies(7, 1, modality))
    manifest = spool_study(study, tmp_path)
    request = pipeline.build_request(tmp_path, manifest, TINY.vision.image_size, dtype="float32",
                                     max_new_tokens=TOKENS)
    request = InferenceRequest.from_message(request.to_message())  # what the broker carries
    assert {t.task for t in request.tasks} == {"report", "grounding"}
    assert len([t for t in request.tasks if t.task == "grounding"]) == len(study.datasets)
    if modality != "CR":
        assert any(image.sop_instance_uid is None for image in request.images)  # the study view: CT MIP, MR montage
    [response] = analyze.run_batch(loaded, [request])
    [series] = manifest.series
    datasets = [dcmread(tmp_path / instance.path) for instance in series.instances]  # all slices: 4 < 8 per series
    result = analyze.assemble(request, InferenceResponse.from_json(response.to_json()),
                                             sources=datasets)
    expected = analyze_series(loaded, datasets, max_new_tokens=TOKENS)
    assert result.report == expected.report
    assert result.findings == expected.findings
    assert result.analysed_instances == expected.analysed_instances
    assert result.raw_outputs[analyze.REPORT_TASK_ID] == expected.raw_outputs["report"]
    assert result.status == "preliminary" and result.model == IDENTITY


def test_boxes_map_back_to_source_pixels(tmp_path: Path) -> None:
    study = next(generate_studies(7, 1, "CR"))
    manifest = spool_study(study, tmp_path)
    request = pipeline.build_request(tmp_path, manifest, 56)
    uid = str(study.datasets[0].SOPInstanceUID)
    key = f"{manifest.series[0].series_instance_uid}/{uid}"
    texts = {analyze.REPORT_TASK_ID: "FINDINGS: Nodule. IMPRESSION: Nodule.",
             "grounding:" + uid: "<p>nodule</p> {<10><20><50><60>}"}
    response = InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                                 episode_id=1, model=IDENTITY, batch_rows=2, seconds=0.1,
                                 outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])
    result = analyze.assemble(request, response)
    transform = request.image(key).transform.to_letterbox()  # type: ignore[union-attr]
    [finding] = result.findings
    assert finding.label == "nodule" and finding.sop_instance_uid == uid
    assert finding.box == pytest.approx(transform.grid_to_source((10, 20, 50, 60)))
    assert result.report.findings == "Nodule." and result.report.impression == "Nodule."

    with pytest.raises(analyze.AnalysisError, match=r"has no output for task\(s\) grounding:"):
        analyze.assemble(request, response.model_copy(update={"outputs": response.outputs[:1]}))
    with pytest.raises(analyze.AnalysisError, match="does not answer request"):
        analyze.assemble(request, response.model_copy(update={"request_id": "other"}))


def test_nodule_boxes_are_refined_on_the_source_pixels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study = next(s for s in (generate_study(study_rng(31, i), "DX") for i in range(100))
                 if any(f.label == "nodule" for f in s.findings))
    truth = next(f for f in study.findings if f.label == "nodule")
    manifest = spool_study(study, tmp_path)
    request = pipeline.build_request(tmp_path, manifest, 224)
    uid = str(study.datasets[0].SOPInstanceUID)
    key = f"{manifest.series[0].series_instance_uid}/{uid}"
    transform = request.image(key).transform.to_letterbox()  # type: ignore[union-attr]
    side = truth.box[2] - truth.box[0]
    off = (truth.box[0] + 0.3 * side, truth.box[1] - 0.2 * side, truth.box[2] + 0.3 * side, truth.box[3])
    grid = transform.source_to_grid(off)
    texts = {analyze.REPORT_TASK_ID: "FINDINGS: Nodule. IMPRESSION: Nodule.",
             "grounding:" + uid: "<p>nodule</p> {" + "".join(f"<{v}>" for v in grid) + "}"}
    response = InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                                 episode_id=1, model=IDENTITY, batch_rows=2, seconds=0.1,
                                 outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])
    [model_box] = analyze.assemble(request, response).findings  # no sources: the grid box
    assert model_box.box == pytest.approx(transform.grid_to_source(grid))
    [refined] = analyze.assemble(request, response, sources=study.datasets).findings
    assert iou(refined.box, truth.box) > max(0.6, iou(model_box.box, truth.box))
    other = next(generate_studies(8, 1, "CR")).datasets
    with caplog.at_level("WARNING"):
        [kept] = analyze.assemble(request, response, sources=other).findings
    assert kept == model_box and "its boxes stay unrefined" in caplog.text


def test_model_input_size_without_loading(tmp_path: Path) -> None:
    assert pipeline.model_input_size("minigpt-med") == 448
    assert pipeline.model_input_size("raddraft-small") == 224
    tiny_model().save_pretrained(tmp_path / "tiny")
    assert pipeline.model_input_size(str(tmp_path / "tiny")) == 56
    with pytest.raises(ValueError, match="no preset of that name and no model folder"):
        pipeline.model_input_size(str(tmp_path / "missing"))
