"""Report text hygiene (issue 16): model markup never reaches the draft, the narrative SR or the ORU, and the
findings SR claims "no abnormality" only when the report text says so."""

from __future__ import annotations

from pathlib import Path

import hl7
import pydicom
import pytest
from hl7_samples import ENDPOINTS, MESSAGE_TIME, make_manifest, make_result
from reporting_dicom_helpers import cr_study, dciodvfy, result_for

from core.result import DraftReport
from model.analyze import NO_REPORT_TEXT, split_report
from model.prompts import parse_grounded, strip_markup
from reporting.codes import report_states_normal
from reporting.hl7_oru import ResultStatus, build_oru_r01
from reporting.narrative import build_narrative_sr

MARKUP = ("<", ">", "{", "}", "[", "]")

# (model text, clean text): the shapes seen on real images and the ways generation can cut them.
MARKUP_CASES = [
    ("<p>left edema</p>{<54><41><75><60>}", "left edema"),
    ("There is <p>left edema</p>{<54><41><75><60>}.", "There is left edema."),
    ("There is <p>left edema</p> {<54><41><75><60>} and a <p>right effusion</p> {<54><41>",
     "There is left edema and a right effusion"),
    ("<p>nodule</p> {<12><30><40><66>}<delim>{<55><28><80><70>}<delim>{<1><2><3><4>} in both lungs.",
     "nodule in both lungs."),
    ("<p>left <p>upper lobe</p> nodule</p>{<54><41><75><60>} is seen.", "left upper lobe nodule is seen."),
    ("<p>mass</p>{<54><41><75><60>}} and {{<1><2><3><4>}} {<5", "mass and"),
    ("<p>edema</p> <54><41><75><60> stray coordinates", "edema stray coordinates"),
    ("[grounding] <Img><ImageHere></Img> [/INST] The lungs are clear.</s>", "The lungs are clear."),
    ("{left edema} with <unk> tokens", "left edema with tokens"),
    ("Cardiomegaly {<30><40><60><7", "Cardiomegaly"),
    ("Cardiomegaly <p>", "Cardiomegaly"),
]


@pytest.mark.parametrize(("text", "clean"), MARKUP_CASES)
def test_markup_is_removed_and_phrases_stay_as_words(text: str, clean: str) -> None:
    assert strip_markup(text) == clean
    assert not any(mark in strip_markup(text) for mark in MARKUP)
    assert parse_grounded(text).text == clean  # what the worklist shows of an answer


@pytest.mark.parametrize("text", [
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "A 4 mm nodule (image 12) measures < 5 mm; follow-up in 12 months.",
    "Heart size normal, mediastinum: unremarkable!",
])
def test_text_without_markup_is_unchanged(text: str) -> None:
    assert strip_markup(text) == text
    assert split_report(text).findings == text


def test_whitespace_is_folded_and_no_space_is_left_before_punctuation() -> None:
    assert strip_markup("  Small   <p>effusion</p> {<1><2><3><4>} .\n\nStable\t.") == "Small effusion. Stable."


def test_split_report_cleans_both_sections() -> None:
    report = split_report("FINDINGS: There is <p>left edema</p>{<54><41><75><60>}.\n"
                          "IMPRESSION: <p>left edema</p>{<54><41><75><60>}<delim>{<10><10><20><20>}")
    assert report == DraftReport(findings="There is left edema.", impression="left edema")


def test_markup_alone_is_no_report_text() -> None:
    assert split_report("{<54><41><75><60>}<delim>{<1><2>") == DraftReport(findings="", impression=NO_REPORT_TEXT)


MODEL_REPORT = ("FINDINGS: There is <p>left edema</p>{<54><41><75><60>} and <p>right pleural effusion</p> "
                "{<60><50><90><80>}<delim>{<62><40><88><70>}. IMPRESSION: [grounding] <p>left edema</p>{<54><41>")


def test_narrative_sr_stores_clean_text(tmp_path: Path) -> None:
    study = cr_study(tmp_path)
    result = result_for(study, []).model_copy(update={"report": split_report(MODEL_REPORT)})
    path = tmp_path / "narrative.dcm"
    build_narrative_sr(study.inputs(result)).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.ContentSequence[0].TextValue
             for item in ds.ContentSequence if item.ValueType == "CONTAINER"}
    assert texts == {"Findings": "There is left edema and right pleural effusion.", "Impressions": "left edema"}
    assert not any(mark in text for text in texts.values() for mark in MARKUP)
    assert dciodvfy(path) == []


def test_oru_carries_clean_text() -> None:
    result = make_result().model_copy(update={"report": split_report(MODEL_REPORT)})
    data = build_oru_r01(make_manifest(), result, ResultStatus.PRELIMINARY, endpoints=ENDPOINTS,
                         control_id="CTRL0001", message_time=MESSAGE_TIME)
    message = hl7.parse(data.decode("utf-8"))
    text = [str(obx.extract_field(1, 5)) for obx in message.segments("OBX") if obx.extract_field(1, 2) == "TX"]
    assert "There is left edema and right pleural effusion." in text
    assert "left edema" in text
    assert not any(mark in line for line in text for mark in MARKUP)


# --- does the report state a normal study? ------------------------------------------------------------------

@pytest.mark.parametrize(("findings", "impression"), [
    ("The lungs are clear. No pleural effusion or pneumothorax.", "No acute cardiopulmonary process."),
    ("Heart size is normal. No focal consolidation, pleural effusion, or pneumothorax.", "No acute abnormality."),
    ("", "Normal chest radiograph."),
    ("Clear lungs. The heart is not enlarged.", "Unremarkable study."),
    ("There is no evidence of pneumothorax or effusion.", "No active disease."),
])
def test_normal_reports_state_normal(findings: str, impression: str) -> None:
    assert report_states_normal(DraftReport(findings=findings, impression=impression))


@pytest.mark.parametrize(("findings", "impression"), [
    ("Right pleural effusion.", ""),  # a finding, no normal phrasing
    ("The lungs are clear. Small right pleural effusion.", "No acute disease."),  # normal words + a finding
    ("No pneumothorax, but there is a left lower lobe opacity.", "No acute process."),
    ("No change in the left effusion.", "Otherwise normal."),  # "no change" is no negation
    ("Heart size is normal. A nodule in the right upper lobe.", ""),
    ("No consolidation. Pneumonia cannot be excluded.", "Normal heart size."),
    ("The study is limited by rotation.", ""),  # nothing said either way
    ("", NO_REPORT_TEXT),
    ("", ""),
])
def test_reports_stating_a_finding_or_nothing_do_not_state_normal(findings: str, impression: str) -> None:
    assert not report_states_normal(DraftReport(findings=findings, impression=impression))
