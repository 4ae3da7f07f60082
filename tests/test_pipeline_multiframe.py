"""Multi-frame images are read frame by frame: the slice policy picks frames of an enhanced multi-frame series as it
picks instances of a classic one, only the picked frames are decoded, and a finding on frame k reaches the SR SCOORD
and the GSPS as frame k. pydicom's bundled files hold no enhanced CT/MR (emri_small is in the external pydicom-data
set), so the enhanced images are made from CT_small/MR_small slices by highdicom's legacy converters
(tests/reporting_dicom_helpers.py), and the 2-frame image is MR_small with a second frame."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pipeline_infra_helpers import TINY, tiny_model
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import RLELossless
from reporting_dicom_helpers import (
    SLICE_GAP_MM,
    Study,
    analysed_series_comments,
    classic_slices,
    dciodvfy,
    legacy_enhanced,
    library_frames,
    new_dciodvfy_warnings,
    pixelmed_sr_validate,
    scoord_frames,
    write_source,
)
from test_pipeline_gate import spool_file

from core.manifest import StudyManifest
from core.result import AnalysisResult, ModelIdentity
from core.settings import Settings
from dicom_node.index import InstanceRecord
from model import analyze
from model.embedded import LoadedModel
from model.imaging import display_values
from model.payload import InferenceRequest, InferenceResponse, TaskOutput
from model.refine import hounsfield
from reporting.hl7_oru import ResultStatus, oru_r01_from_settings
from reporting.outbox import OutboxEntry, read_sources, write_outputs
from workers import pipeline
from workers.gate import GateRules, gate
from workers.prepare import build_manifest

IDENTITY = ModelIdentity(name="test", version="test", parameters={})
FRAMES = 20
# select_indices(20, 8): spatial indices 1, 3, 6, 8, 11, 13, 16, 18. The converter keeps the slices' order (given
# from the top down), so spatial index i (from the bottom up) is frame 20 - i.
PICKED_FRAMES = [19, 17, 14, 12, 9, 7, 4, 2]


def _record(spool: Path, relative: str) -> InstanceRecord:
    path = spool / relative
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    return InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), patient_id="", sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="X", peer_address="127.0.0.1",
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), path=relative, received_at=0.0)


def _spool(spool: Path, datasets: dict[str, Dataset]) -> StudyManifest:
    records = []
    for relative, ds in datasets.items():
        write_source(spool, relative, ds)
        records.append(_record(spool, relative))
    return build_manifest(spool, records[0].study_instance_uid, 1, records)


def _response(request: InferenceRequest, grounding: dict[str, str]) -> InferenceResponse:
    texts = {task.task_id: grounding.get(task.task_id, "no finding") for task in request.tasks}
    texts[analyze.REPORT_TASK_ID] = "FINDINGS: Effusion. IMPRESSION: Effusion."
    return InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                             episode_id=request.episode_id, model=IDENTITY, batch_rows=len(texts), seconds=0.1,
                             outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])


def _frames_read(request: InferenceRequest) -> list[int | None]:
    return [image.frame_number for image in request.images if image.sop_instance_uid is not None]


def _outputs(tmp_path: Path, manifest: StudyManifest, result: AnalysisResult, sources: list[Dataset], *,
             gsps: bool = True) -> dict[str, list[OutboxEntry]]:
    """The outbox of the result; a GSPS too when *gsps* and the result has findings."""
    oru = oru_r01_from_settings(manifest, result, ResultStatus.PRELIMINARY, settings=Settings(home=tmp_path),
                                control_id="C1", message_time=result.created_at)
    entries, problems = write_outputs(tmp_path / "outbox", manifest, result, sources, oru)
    by_kind: dict[str, list[OutboxEntry]] = {}
    for entry in entries:
        by_kind.setdefault(entry.kind, []).append(entry)
    expected = {"sr", "narrative", "findings", "hl7"} | ({"gsps"} if gsps and result.findings else set())
    assert expected <= set(by_kind), problems
    return by_kind


@pytest.fixture(scope="module")
def ct_slices() -> list[Dataset]:
    return classic_slices("CT_small.dcm", FRAMES)


def test_the_manifest_lists_the_frames_of_an_enhanced_ct_in_spatial_order(tmp_path, ct_slices):
    manifest = _spool(tmp_path, {"enhanced.dcm": legacy_enhanced(ct_slices)})
    [series] = manifest.series
    [entry] = series.instances
    assert entry.number_of_frames == FRAMES and series.orientation == "axial"
    assert entry.pixel_spacing == tuple(float(v) for v in ct_slices[0].PixelSpacing)  # from the functional groups
    assert [frame.number for frame in entry.frames] == list(range(FRAMES, 0, -1))  # bottom up: frame 20 first
    z = [frame.image_position_patient[2] for frame in entry.frames]
    assert np.allclose(np.diff(z), SLICE_GAP_MM)
    # a manifest written before frames were listed still reads, its frames by number
    old = entry.model_copy(update={"frames": ()})
    assert old.frame_numbers() == list(range(1, FRAMES + 1))


def test_the_policy_picks_frames_of_an_enhanced_ct_as_it_picks_instances_of_the_classic_series(tmp_path, ct_slices):
    classic = _spool(tmp_path / "classic", {f"ct{k}.dcm": ds for k, ds in enumerate(ct_slices)})
    enhanced = _spool(tmp_path / "enhanced", {"enhanced.dcm": legacy_enhanced(ct_slices)})
    assert gate(enhanced, GateRules()).analysable
    by_instances = pipeline.build_request(tmp_path / "classic", classic, 56, dtype="float32")
    by_frames = pipeline.build_request(tmp_path / "enhanced", enhanced, 56, dtype="float32")
    assert _frames_read(by_frames) == PICKED_FRAMES  # the middle frames of 8 equal runs, in spatial order
    read = [image for image in by_instances.images if image.sop_instance_uid is not None]
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in ct_slices}
    assert [numbers[image.sop_instance_uid] for image in read] == PICKED_FRAMES  # the same slices
    assert len(by_frames.images) == len(by_instances.images) == 1 + len(PICKED_FRAMES)  # + the CT projection
    for frame_image, instance_image in zip(by_frames.images, by_instances.images, strict=True):
        np.testing.assert_allclose(frame_image.array(), instance_image.array(), atol=1e-5)  # rescale, window
    tasks = [task.task_id for task in by_frames.tasks if task.task == "grounding"]
    uid = enhanced.series[0].instances[0].sop_instance_uid
    assert tasks == [f"grounding:{uid}:{frame}" for frame in PICKED_FRAMES]


def test_only_the_picked_frames_are_decoded(tmp_path, ct_slices):
    """An RLE enhanced CT whose frames that the policy does not pick are undecodable: the picked ones are read all
    the same (and are the same model inputs as those of the intact image), so no other frame was decoded."""
    enhanced = legacy_enhanced(ct_slices)
    intact = _spool(tmp_path / "intact", {"enhanced.dcm": enhanced})
    enhanced.compress(RLELossless)
    frames = list(generate_frames(enhanced.PixelData, number_of_frames=FRAMES))
    enhanced.PixelData = encapsulate([frame if number in PICKED_FRAMES else b"\xff" * 64  # no RLE header
                                      for number, frame in enumerate(frames, start=1)])
    broken = _spool(tmp_path / "broken", {"enhanced.dcm": enhanced})
    with pytest.raises(RuntimeError, match="invalid number of segments"):
        pixel_array(tmp_path / "broken" / "enhanced.dcm")  # every frame: fails
    request = pipeline.build_request(tmp_path / "broken", broken, 56, dtype="float32")
    assert _frames_read(request) == PICKED_FRAMES
    expected = pipeline.build_request(tmp_path / "intact", intact, 56, dtype="float32")
    for got, want in zip(request.images, expected.images, strict=True):
        np.testing.assert_allclose(got.array(), want.array(), atol=1e-5)


def test_a_frame_of_an_enhanced_ct_has_the_values_of_its_classic_slice(ct_slices):
    enhanced = legacy_enhanced(ct_slices)
    for k in (0, 7):
        assert np.array_equal(hounsfield(enhanced, k), hounsfield(ct_slices[k]))  # its own rescale: HU
        np.testing.assert_allclose(display_values(enhanced, k), display_values(ct_slices[k]))  # its own window


def test_a_finding_on_frame_k_of_an_enhanced_ct_reaches_the_sr_and_gsps_as_frame_k(tmp_path, ct_slices):
    spool = tmp_path / "spool"
    manifest = _spool(spool, {"enhanced.dcm": legacy_enhanced(ct_slices)})
    request = pipeline.build_request(spool, gate(manifest, GateRules()).manifest, 56)
    uid = manifest.series[0].instances[0].sop_instance_uid
    sources = read_sources(spool, manifest)
    response = _response(request, {f"grounding:{uid}:14": "<p>pleural effusion</p> {<20><30><60><70>}"})
    result = analyze.assemble(request, response, sources=sources)
    [finding] = result.findings
    assert (finding.sop_instance_uid, finding.frame_number) == (uid, 14)
    assert result.analysed_instances == [uid] and result.analysed_frames == {uid: sorted(PICKED_FRAMES)}
    assert AnalysisResult.model_validate_json(result.model_dump_json()) == result

    outputs = _outputs(tmp_path, manifest, result, sources)
    sr_path = outputs["sr"][0].path
    sr = pydicom.dcmread(sr_path)
    assert library_frames(sr) == {uid: sorted(PICKED_FRAMES)}  # the image library: the frames read
    assert scoord_frames(sr) == [[14]]
    assert analysed_series_comments(sr) == [
        f'Analysed series 9 "enhanced CT" (CT): 8 of {FRAMES} frames of 1 multi-frame image read']
    [gsps] = outputs["gsps"]
    [annotation] = pydicom.dcmread(gsps.path).GraphicAnnotationSequence
    assert int(annotation.ReferencedImageSequence[0].ReferencedFrameNumber) == 14

    assert dciodvfy(sr_path) == []
    assert new_dciodvfy_warnings(sr_path, Study(spool, manifest, sources)) == []
    report = pixelmed_sr_validate([sr_path])[sr_path]
    assert "Root Template Validation Complete" in report and "TID_1500" in report
    assert "Error" not in report and "Warning" not in report


def test_an_enhanced_mr_goes_through_the_pipeline_with_the_model_in_process(tmp_path):
    spool = tmp_path / "spool"
    slices = classic_slices("MR_small.dcm", 11)
    manifest = _spool(spool, {"mr.dcm": legacy_enhanced(slices)})
    decision = gate(manifest, GateRules())
    assert decision.analysable
    request = pipeline.build_request(spool, decision.manifest, TINY.vision.image_size, max_new_tokens=24)
    request = InferenceRequest.from_message(request.to_message())  # what the broker carries
    # select_indices(11, 8) = 0, 2, 3, 4, 6, 7, 8, 10 from the bottom up; frame 11 is the bottom slice
    picked = [11 - i for i in (0, 2, 3, 4, 6, 7, 8, 10)]
    assert _frames_read(request) == picked
    loaded = LoadedModel(tiny_model(), ModelIdentity(name=TINY.name, version="test"), trained=False)
    [response] = analyze.run_batch(loaded, [request])
    sources = read_sources(spool, manifest)
    result = analyze.assemble(request, response, sources=sources)
    uid = manifest.series[0].instances[0].sop_instance_uid
    assert result.analysed_frames == {uid: sorted(picked)}
    assert all(f.sop_instance_uid == uid and f.frame_number in picked for f in result.findings)
    outputs = _outputs(tmp_path, manifest, result, sources)
    sr = pydicom.dcmread(outputs["sr"][0].path)
    assert library_frames(sr) == {uid: sorted(picked)}


def test_both_frames_of_a_two_frame_mr_are_read_and_a_finding_on_frame_2_names_it(tmp_path):
    spool = tmp_path / "spool"
    record = spool_file(spool, "MR_small.dcm")
    path = spool / record.path
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame[::-1]]).tobytes()
    ds.save_as(path)
    manifest = build_manifest(spool, record.study_instance_uid, 1, [record])
    assert manifest.series[0].instances[0].number_of_frames == 2
    decision = gate(manifest, GateRules())
    assert decision.analysable
    request = pipeline.build_request(spool, decision.manifest, 56, dtype="float32")
    assert _frames_read(request) == [1, 2]  # no frame positions: by number
    by_key = {image.key: image.array() for image in request.images}
    series_uid, uid = manifest.series[0].series_instance_uid, record.sop_instance_uid
    assert not np.allclose(by_key[f"{series_uid}/{uid}:1"], by_key[f"{series_uid}/{uid}:2"])  # each its own frame
    sources = read_sources(spool, manifest)
    response = _response(request, {f"grounding:{uid}:2": "<p>mass</p> {<20><20><60><60>}"})
    result = analyze.assemble(request, response, sources=sources)
    [finding] = result.findings
    assert finding.frame_number == 2
    # a GSPS cannot name a frame of an image whose IOD has no Multi-frame module (highdicom refuses it)
    outputs = _outputs(tmp_path, manifest, result, sources, gsps=False)
    sr = pydicom.dcmread(outputs["sr"][0].path)
    assert scoord_frames(sr) == [[2]]
    assert library_frames(sr) == {uid: [1, 2]}
