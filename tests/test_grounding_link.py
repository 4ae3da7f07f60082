"""Linking a draft's sentences with its boxes (model/grounding.py) and the result's link checks (core/result.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from core.result import AnalysisResult, DraftReport, Finding, ModelIdentity
from model.grounding import follow_up_labels, link

NODULE_REPORT = DraftReport(
    findings="Solid nodule in the right upper lobe measuring 11 mm. No pleural effusion.",
    impression="Solitary right pulmonary nodule. Recommend follow-up per Fleischner guidelines.")


def box(label: str, laterality: str | None = None) -> Finding:
    return Finding(label=label, sop_instance_uid="1.2.3.4", box=(10.0, 10.0, 40.0, 40.0), laterality=laterality)


def test_a_stated_nodule_without_a_box_is_text_only_and_flagged() -> None:
    report, findings, consistency = link(NODULE_REPORT, [])
    assert [s.status for s in report.sentences] == ["text_only", "statement", "text_only", "statement"]
    assert (consistency.grounded, consistency.text_only, consistency.box_only) == (0, 2, 0)
    assert consistency.flagged
    assert follow_up_labels(report) == ["nodule"]
    assert findings == []


def test_a_box_grounds_the_sentences_of_its_label_and_side_only() -> None:
    report, findings, consistency = link(NODULE_REPORT, [box("nodule", "right"), box("nodule", "left"),
                                                         box("pleural effusion", "right")])
    # both sentences say right: the left nodule supports neither, and no sentence states the effusion
    assert [s.findings for s in report.sentences] == [[0], [], [0], []]
    assert [f.status for f in findings] == ["grounded", "box_only", "box_only"]
    assert findings[0].sentences == [0, 2]
    assert (consistency.grounded, consistency.text_only, consistency.box_only) == (2, 0, 2)
    assert follow_up_labels(report) == []


def test_a_mass_sentence_is_grounded_by_a_tumour_box_on_the_same_side() -> None:
    report, _, consistency = link(DraftReport(findings="A 20 mm mass in the left temporal lobe.",
                                                     impression="Left temporal lobe tumor with surrounding edema."),
                                         [box("tumor", "left"), box("edema", "left")])
    assert [s.findings for s in report.sentences] == [[0], [0, 1]]
    assert not consistency.flagged


def result_with(report: DraftReport, findings: list[Finding]) -> AnalysisResult:
    return AnalysisResult(study_instance_uid="1.2.3", episode_id=1, model=ModelIdentity(name="m", version="1"),
                          report=report, findings=findings, analysed_instances=["1.2.3.4"],
                          created_at=datetime.now(UTC))


def test_a_linked_result_round_trips_and_one_sided_links_are_refused() -> None:
    report, findings, consistency = link(NODULE_REPORT, [box("nodule", "right")])
    result = result_with(report, findings).model_copy(update={"consistency": consistency})
    again = AnalysisResult.model_validate_json(result.model_dump_json())
    assert again == result
    broken = findings[0].model_copy(update={"sentences": [1]})
    with pytest.raises(ValidationError, match=r"does not name the (finding|sentence) back"):
        result_with(report, [broken])


def test_results_written_before_grounding_still_read() -> None:
    old = result_with(DraftReport(findings="Nodule.", impression=""), [box("nodule")])
    payload = old.model_dump(mode="json")
    del payload["consistency"]
    del payload["report"]["sentences"]
    for finding in payload["findings"]:
        for key in ("sentences", "status", "source"):
            del finding[key]
    assert AnalysisResult.model_validate(payload).consistency is None


def test_a_sentence_naming_no_kind_is_grounded_by_a_focal_box_only() -> None:
    report, findings, _ = link(DraftReport(findings="A rim-enhancing 21 mm lesion is seen in the left parietal lobe.",
                                           impression=""), [box("edema", "left"), box("tumor", "left")])
    assert report.sentences[0].findings == [1]
    assert [f.status for f in findings] == ["box_only", "grounded"]
