"""A finding on a multi-frame image names its frame: the report stage used to refuse it ("frame_number is
required"), which cost the study its SR. pydicom's bundled files hold no multi-frame CR/DX/CT/MR (the enhanced
MR emri_small is in the external pydicom-data set), so the image is pydicom's MR_small made a 2-frame image."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from test_pipeline_gate import spool_file

from model.result import ModelIdentity
from raddraft.settings import Settings
from reporting.hl7_oru import ResultStatus, oru_r01_from_settings
from reporting.outbox import read_sources, write_outputs
from workers import pipeline
from workers.gate import GateRules, gate
from workers.payload import InferenceResponse, TaskOutput
from workers.prepare import build_manifest

IDENTITY = ModelIdentity(name="test", version="test", parameters={})


def test_a_finding_on_a_multiframe_mr_reaches_the_sr_with_its_frame(tmp_path):
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
    request = pipeline.build_request(spool, decision.manifest, 56)
    uid = record.sop_instance_uid
    texts = {pipeline.REPORT_TASK_ID: "FINDINGS: Mass. IMPRESSION: Mass.",
             f"grounding:{uid}": "<p>mass</p> {<20><20><60><60>}"}
    response = InferenceResponse(request_id=request.request_id, study_instance_uid=request.study_instance_uid,
                                 episode_id=1, model=IDENTITY, batch_rows=2, seconds=0.1,
                                 outputs=[TaskOutput(task_id=k, text=v) for k, v in texts.items()])
    sources = read_sources(spool, manifest)
    result = pipeline.analysis_from_response(request, response, sources=sources)
    [finding] = result.findings
    assert finding.frame_number == pipeline.ANALYSED_FRAME
    oru = oru_r01_from_settings(manifest, result, ResultStatus.PRELIMINARY, settings=Settings(home=tmp_path),
                                control_id="C1", message_time=result.created_at)
    entries, problems = write_outputs(tmp_path / "outbox", manifest, result, sources, oru)
    built = {entry.kind for entry in entries}
    assert {"sr", "narrative", "findings", "hl7"} <= built, problems
    sr = pydicom.dcmread(next(e.path for e in entries if e.kind == "sr"))
    frames = []

    def walk(items):
        for item in items:
            for reference in item.get("ContentSequence", []):
                for sop in reference.get("ReferencedSOPSequence", []):
                    value = sop.get("ReferencedFrameNumber")
                    if value is not None:
                        frames.extend(int(f) for f in (value if isinstance(value, list | MultiValue) else [value]))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert pipeline.ANALYSED_FRAME in frames
