"""What ``raddraft analyze --json`` prints for a full analysis (raddraft/analyze_output.py): today's fields and
the grounded draft (issue 19)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from core.result import AnalysisResult, Consistency, DraftReport, Finding, ModelIdentity
from model.analyze import SeriesAnalysis
from model.grounding import link
from raddraft.analyze_output import analysis_payload, consistency_text

IDENTITY: dict[str, object] = {"name": "MiniGPT-Med", "version": "test", "parameters": {}}
REPORT = DraftReport(findings="Nodule in the right lung. Small right pleural effusion.",
                     impression="Right lung nodule.")
BOXES = [Finding(label="nodule", sop_instance_uid="1.2.3.4", box=(10.0, 10.0, 40.0, 40.0), laterality="right"),
         Finding(label="pneumothorax", sop_instance_uid="1.2.3.4", box=(50.0, 10.0, 90.0, 40.0), laterality="left")]


def analysis(report: DraftReport, findings: list[Finding], consistency: Consistency | None = None
             ) -> SeriesAnalysis:
    result = AnalysisResult(study_instance_uid="1.2.3", episode_id=0, model=ModelIdentity(name="m", version="1"),
                            report=report, findings=findings, analysed_instances=["1.2.3.4"],
                            raw_outputs={"report": report.text}, created_at=datetime.now(UTC),
                            consistency=consistency)
    return SeriesAnalysis(result=result, seconds=1.23456, model_findings=findings)


def test_the_json_carries_the_grounded_draft() -> None:
    linked_report, linked, consistency = link(REPORT, BOXES)
    payload = json.loads(json.dumps(analysis_payload(IDENTITY, analysis(linked_report, linked, consistency))))
    assert payload["consistency"] == {"grounded": 2, "text_only": 1, "box_only": 1, "flagged": True}
    sentences = payload["report"]["sentences"]
    assert [(s["section"], s["polarity"], s["labels"], s["findings"], s["status"]) for s in sentences] == [
        ("findings", "positive", ["nodule"], [0], "grounded"),
        ("findings", "positive", ["pleural effusion"], [], "text_only"),
        ("impression", "positive", ["nodule"], [0], "grounded")]
    assert sentences[1]["text"] == "Small right pleural effusion."
    assert [(f["sentences"], f["status"], f["source"]) for f in payload["findings"]] == [
        ([0, 2], "grounded", "grounding"), ([], "box_only", "grounding")]
    # today's fields stay
    assert payload["report"]["findings"] == REPORT.findings and payload["findings"][0]["box"] == [10, 10, 40, 40]
    assert (payload["model"], payload["status"], payload["seconds"]) == (IDENTITY, "preliminary", 1.235)


def test_an_analysis_that_was_not_grounded_says_so() -> None:
    payload = analysis_payload(IDENTITY, analysis(REPORT, BOXES))
    assert payload["consistency"] is None
    assert payload["report"]["sentences"] == [] and payload["findings"][0]["status"] is None


def test_the_text_output_names_each_statement_without_image_evidence() -> None:
    linked_report, linked, consistency = link(REPORT, BOXES)
    text = consistency_text(analysis(linked_report, linked, consistency))
    assert text.splitlines() == [
        "AI consistency: 2 stated finding(s) localized, 1 not localized by the AI, 1 box(es) not in the text",
        "  not localized by the AI: Small right pleural effusion."]
    assert consistency_text(analysis(REPORT, BOXES)) == ""
