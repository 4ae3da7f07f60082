"""One analysis path (issue 18): ``raddraft analyze`` and the pipeline give the same result for the same study.

The study is a DICOM file on disk, the model the embedded trained one (model/weights) on the CPU. The command runs
in this process (``--local``: the gateway's model socket answers with the same :func:`raddraft.analyze_output.describe`,
tests/test_model_socket.py); the pipeline spools the file, builds its request from the manifest (the slice
policy, the decode), runs it through the gpu queue's runner and assembles the result as the report stage does. The
request's pixels travel as float32 here, as they do in the command's own process (the gpu queue rounds them to
float16 for the broker: the one difference between the two, a transport setting).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from test_pipeline_infra_request import spool_study

from model import analyze, embedded
from model.embedded import EMBEDDED_DIR, embedded_available, load_model
from model.phantoms import generate_study, study_rng
from raddraft.cli import main
from workers import pipeline

pytestmark = pytest.mark.skipif(not embedded_available(), reason=f"no shipped checkpoint in {EMBEDDED_DIR}")


def test_raddraft_analyze_and_the_pipeline_give_the_same_result(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    study = next(s for s in (generate_study(study_rng(900_123, i), "DX") for i in range(50)) if s.findings)
    spool = tmp_path / "spool"
    spool.mkdir()
    manifest = spool_study(study, spool)
    [path] = sorted(spool.glob("*.dcm"))
    monkeypatch.setenv("RADDRAFT_HOME", str(tmp_path / "home"))
    loaded = load_model("embedded")
    monkeypatch.setattr(embedded, "load_model", lambda spec: loaded)  # the command's load, done once for both

    assert main(["analyze", str(path), "--model", "embedded", "--local", "--json"]) == 0
    command = json.loads(capsys.readouterr().out)

    request = pipeline.build_request(spool, manifest, loaded.model.config.vision.image_size, dtype="float32")
    [response] = analyze.run_batch(loaded, [request])
    result = analyze.assemble(request, response, sources=[dcmread(path)])

    assert command["served_by"] == "this process" and command["status"] == result.status == "preliminary"
    assert command["model"] == result.model.model_dump()
    assert command["raw_outputs"] == result.raw_outputs
    assert command["report"] == result.report.model_dump()
    assert command["findings"] == json.loads(json.dumps([f.model_dump(mode="json") for f in result.findings]))
    assert result.findings, "the trained model finds something on a radiograph with findings"
