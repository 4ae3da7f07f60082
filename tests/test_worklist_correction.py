"""Corrections in words: a deterministic rewrite of FINDINGS and IMPRESSION."""

from __future__ import annotations

import pytest

from core.result import DraftReport
from worklist.correction import Edit, apply_correction, parse_request

NORMAL = DraftReport(
    findings="The heart size is normal. There is no pleural effusion or pneumothorax. No focal consolidation.",
    impression="No active disease.",
)
TWO_FINDINGS = DraftReport(
    findings="A well-defined nodular opacity measuring 17 mm projects over the left upper zone. Airspace opacity in "
             "the left lower zone is consistent with consolidation. A 16 mm pulmonary nodule is seen in the right "
             "lower zone. The heart size is normal. There is no pleural effusion or pneumothorax.",
    impression="Left upper zone pulmonary nodule. Left lower zone consolidation, likely pneumonia. "
               "Right lung nodule.",
)


def test_parse_requests_in_radialog_wording():
    assert parse_request("The patient also has a right pleural effusion, correct the report. "
                         "Don't make other changes.") == [Edit("add", "pleural effusion", "right")]
    assert parse_request("remove the left nodule") == [Edit("remove", "nodule", "left")]
    assert parse_request("There is no pneumothorax; add cardiomegaly") == [Edit("remove", "pneumothorax"),
                                                                          Edit("add", "cardiomegaly")]
    assert parse_request("also has pulmonary oedema") == [Edit("add", "pulmonary edema")]


def test_request_without_a_known_finding_is_refused():
    with pytest.raises(ValueError, match=r"must ask to add .* or remove .* a known finding: atelectasis"):
        apply_correction(NORMAL, "please make it nicer")


def test_adding_a_finding_clears_its_denial_and_the_normal_impression():
    out = apply_correction(NORMAL, "The patient also has a right pleural effusion, correct the report.")
    assert out.report.findings == ("The heart size is normal. There is no pneumothorax. No focal consolidation. "
                                   "There is a right pleural effusion.")
    assert out.report.impression == "Right pleural effusion."
    assert "No active disease." in out.changed_sentences


def test_adding_a_mass_noun_and_dropping_an_emptied_denial():
    out = apply_correction(NORMAL, "the patient also has consolidation")
    assert out.report.findings == ("The heart size is normal. There is no pleural effusion or pneumothorax. "
                                   "There is consolidation.")
    assert out.report.impression == "Consolidation."


def test_removing_a_finding_drops_positive_sentences_only():
    out = apply_correction(TWO_FINDINGS, "remove consolidation")
    assert "consolidation" not in out.report.findings.lower().replace("no focal consolidation", "")
    assert out.report.findings.startswith("A well-defined nodular opacity")
    assert "There is no pleural effusion or pneumothorax." in out.report.findings  # a denial stays
    assert out.report.impression == "Left upper zone pulmonary nodule. Right lung nodule."


def test_removing_with_laterality_keeps_the_other_side():
    out = apply_correction(TWO_FINDINGS, "Remove the right nodule.")
    assert "right lower zone" not in out.report.findings
    assert "left upper zone" in out.report.findings
    assert out.report.impression == "Left upper zone pulmonary nodule. Left lower zone consolidation, likely pneumonia."


def test_removing_the_only_finding_leaves_a_normal_impression_and_is_deterministic():
    report = DraftReport(findings="There is a right pleural effusion. The lungs are clear.",
                         impression="Right pleural effusion.")
    first = apply_correction(report, "there is no pleural effusion")
    assert first.report == DraftReport(findings="The lungs are clear.", impression="No acute abnormality.")
    assert apply_correction(report, "there is no pleural effusion") == first
