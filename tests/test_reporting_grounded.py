"""Outputs of a grounded draft (issue 19): SR, narrative SR, ORU, GSPS, PNG overlay and findings JSON built from
report.sentences / Finding.status / consistency, checked with the real validators (dciodvfy, dsrdump, PixelMed,
hl7apy strict). Three drafts on the chest CR: every statement grounded, a stated effusion without a box
(text-only), and a box no sentence states (box-only). Results written before grounding are covered, unchanged,
by test_reporting_dicom_sr.py, test_hl7_oru.py and test_reporting_dicom_gsps.py."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import hl7
import numpy as np
import pydicom
import pytest
from hl7_samples import ENDPOINTS, MESSAGE_TIME
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from PIL import Image
from pydicom.sr.codedict import codes
from reporting_dicom_helpers import (
    Study,
    cr_findings,
    cr_study,
    dciodvfy,
    dsrdump,
    grounded_result,
    new_dciodvfy_warnings,
    pixelmed_sr_validate,
    walk,
)

from core.result import AnalysisResult, DraftReport
from reporting.context import ReportInputs
from reporting.gsps import build_presentation_states
from reporting.hl7_oru import CONSISTENCY_OBSERVATION, ResultStatus, build_oru_r01
from reporting.narrative import build_narrative_sr
from reporting.overlay import finding_caption, findings_document, render_overlay
from reporting.sr import build_findings_sr

GROUNDED = DraftReport(findings="Small left pneumothorax. Nodule in the right lung.",
                       impression="Left pneumothorax; right lung nodule.")
TEXT_ONLY = DraftReport(findings="Small left pneumothorax. Nodule in the right lung. Small right pleural effusion.",
                        impression="Left pneumothorax; right lung nodule.")
VARIANTS = ("grounded", "text_only", "box_only")
PRIVATE_SCHEME_WARNING = "Unrecognized defined term = <99RADDRAFT>"


@pytest.fixture(scope="module")
def cr(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return cr_study(tmp_path_factory.mktemp("cr"))


@pytest.fixture(scope="module")
def results(cr: Study) -> dict[str, AnalysisResult]:
    """(a) all grounded: pneumothorax and nodule stated and boxed; (b) text-only: an effusion stated, no box;
    (c) box-only: the unlabelled "Kerley B lines" box, which no sentence states."""
    boxes = cr_findings(cr)
    return {
        "grounded": grounded_result(cr, GROUNDED, boxes[:2]),
        "text_only": grounded_result(cr, TEXT_ONLY, boxes[:2]),
        "box_only": grounded_result(cr, GROUNDED, boxes),
    }


@pytest.fixture(scope="module")
def written(cr: Study, results: dict[str, AnalysisResult], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("grounded_out")
    paths = {}
    for name, result in results.items():
        for kind, build in (("sr", build_findings_sr), ("narrative", build_narrative_sr)):
            paths[f"{kind}_{name}"] = out / f"{kind}_{name}.dcm"
            build(cr.inputs(result)).save_as(paths[f"{kind}_{name}"], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def pixelmed_reports(written: dict[str, Path]) -> dict[Path, str]:
    return pixelmed_sr_validate(list(written.values()))


@pytest.mark.parametrize("document", [*(f"sr_{name}" for name in VARIANTS), "narrative_text_only",
                                      "narrative_box_only"])
def test_grounded_documents_validate(cr: Study, written: dict[str, Path], pixelmed_reports: dict[Path, str],
                                     document: str) -> None:
    """Every document the grounding changes (the narrative of an all-grounded draft is the plain report)."""
    path = written[document]
    assert dciodvfy(path) == []
    # dciodvfy knows no private coding scheme designator; the SR registers 99RADDRAFT (Coding Scheme
    # Identification Sequence), and that is the only warning the grounding adds.
    assert [w for w in new_dciodvfy_warnings(path, cr) if PRIVATE_SCHEME_WARNING not in w] == []
    done = dsrdump(path)
    assert done.returncode == 0, done.stderr
    assert "Preliminary Flag    : PRELIMINARY" in done.stdout
    assert '"Comment")="AI consistency:' in done.stdout or '"Finding")="AI consistency:' in done.stdout
    report = pixelmed_reports[path]
    assert "Root Template Validation Complete" in report and "IOD validation complete" in report
    assert "Error" not in report
    assert "Warning" not in report


def _evaluations(path: Path) -> list[tuple[str, str]]:
    """(concept name meaning, value) of each item of the SR's Qualitative Evaluations container."""
    ds = pydicom.dcmread(path)
    [container] = [item for item in ds.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    return [(item.ConceptNameCodeSequence[0].CodeMeaning,
             item.TextValue if item.ValueType == "TEXT" else item.ConceptCodeSequence[0].CodeMeaning)
            for item in container.ContentSequence]


def test_sr_of_an_all_grounded_draft_links_each_box_to_its_sentences(written: dict[str, Path]) -> None:
    evaluations = _evaluations(written["sr_grounded"])
    assert evaluations[1:] == [
        ("Comment", 'Finding 1, Pneumothorax (left), is stated in the draft text: "Small left pneumothorax." '
                    '"Left pneumothorax; right lung nodule."'),
        ("Comment", 'Finding 2, nodule (right), is stated in the draft text: "Nodule in the right lung." '
                    '"Left pneumothorax; right lung nodule."'),
        ("Comment", "AI consistency: 3 of 3 stated findings localized; 0 boxes not stated in the text"),
    ]
    ds = pydicom.dcmread(written["sr_grounded"])
    assert "CodingSchemeIdentificationSequence" not in ds  # no private code used: the scheme is not declared
    groups = hd.sr.srread(written["sr_grounded"]).content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Finding 1: left Pneumothorax", "Finding 2: right nodule"]


def test_sr_records_a_text_only_statement_as_a_coded_evaluation_not_localized(written: dict[str, Path]) -> None:
    evaluations = _evaluations(written["sr_text_only"])
    assert ("Stated finding not localized by the AI", "Pleural effusion") in evaluations
    assert ("Comment", 'Stated in the draft text, not localized by the AI: "Small right pleural effusion."'
            ) in evaluations
    assert evaluations[-1] == ("Comment", "AI consistency: 3 of 4 stated findings localized; 0 boxes not stated "
                                          "in the text")
    ds = pydicom.dcmread(written["sr_text_only"])
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99RADDRAFT"  # declared where used
    [coded] = [item for item in walk(ds.ContentSequence) if item.ValueType == "CODE"
               and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99RADDRAFT"]
    name, value = coded.ConceptNameCodeSequence[0], coded.ConceptCodeSequence[0]
    assert (name.CodeValue, value.CodeValue, value.CodingSchemeDesignator) == ("RD001", "60046008", "SCT")
    # the boxes stay TID 1410 groups with their SCOORDs
    assert len(hd.sr.srread(written["sr_text_only"]).content.get_planar_roi_measurement_groups()) == 2


def test_sr_marks_a_box_only_finding_as_not_stated(written: dict[str, Path]) -> None:
    groups = hd.sr.srread(written["sr_box_only"]).content.get_planar_roi_measurement_groups()
    assert groups[2].tracking_identifier == "Finding 3: Kerley B lines (not stated in the draft text)"
    assert groups[2].roi is not None and groups[0].tracking_identifier == "Finding 1: left Pneumothorax"
    evaluations = _evaluations(written["sr_box_only"])
    assert ("Localized finding not stated in the draft text", "Finding") in evaluations
    assert ("Comment", "Finding 3, Kerley B lines: localized by the AI, not stated in the draft text") in evaluations
    assert evaluations[-1] == ("Comment", "AI consistency: 3 of 3 stated findings localized; 1 box not stated in "
                                          "the text")
    assert ('CODE:(,,"Localized finding not stated in the draft text")=(404684003,SCT,"Finding")'
            in dsrdump(written["sr_box_only"]).stdout)


def _narrative(path: Path) -> dict[str, list[str]]:
    ds = pydicom.dcmread(path)
    return {item.ConceptNameCodeSequence[0].CodeMeaning: [text.TextValue for text in item.ContentSequence]
            for item in ds.ContentSequence if item.ValueType == "CONTAINER"}


def test_narrative_marks_what_the_ai_did_not_localize_or_not_state(written: dict[str, Path]) -> None:
    assert _narrative(written["narrative_grounded"]) == {"Findings": [GROUNDED.findings],
                                                         "Impressions": [GROUNDED.impression]}
    assert _narrative(written["narrative_text_only"]) == {
        "Findings": ["Small left pneumothorax. Nodule in the right lung. Small right pleural effusion. "
                     "[not localized by the AI]",
                     "AI consistency: 3 of 4 stated findings localized; 0 boxes not stated in the text"],
        "Impressions": [TEXT_ONLY.impression]}
    assert _narrative(written["narrative_box_only"]) == {
        "Findings": [GROUNDED.findings, "Localized by the AI, not stated in the draft text: Kerley B lines",
                     "AI consistency: 3 of 3 stated findings localized; 1 box not stated in the text"],
        "Impressions": [GROUNDED.impression]}


def _oru(cr: Study, result: AnalysisResult) -> str:
    data = build_oru_r01(cr.manifest, result, ResultStatus.PRELIMINARY, endpoints=ENDPOINTS, control_id="G1",
                         message_time=MESSAGE_TIME)
    text = data.decode("utf-8")
    assert parse_message(text, validation_level=VALIDATION_LEVEL.STRICT).validate() is True
    return text


def _obx(text: str) -> list[tuple[str, str, str]]:
    """(OBX-3 identifier, OBX-4 sub-ID, OBX-5 value) of every OBX, unescaped by python-hl7."""
    message = hl7.parse(text)
    return [(obx.extract_field(1, 3, 1, 1), obx.extract_field(1, 4), message.unescape(obx.extract_field(1, 5)))
            for obx in message.segments("OBX")]


def test_oru_says_not_localized_and_adds_the_consistency_observation(
    cr: Study, results: dict[str, AnalysisResult],
) -> None:
    observations = _obx(_oru(cr, results["text_only"]))
    assert [value for code, _, value in observations if code == "59776-5"] == [
        "Small left pneumothorax. Nodule in the right lung. Small right pleural effusion. [not localized by the AI]"]
    assert [(sub, value) for code, sub, value in observations if code == "AI-CONSISTENCY"] == [
        ("5", "AI consistency: 3 of 4 stated findings localized; 0 boxes not stated in the text")]
    assert "^99RADDRAFT|" in _oru(cr, results["text_only"])
    plain = _oru(cr, results["grounded"])  # nothing to say when every statement is localized and stated
    assert "not localized" not in plain and CONSISTENCY_OBSERVATION[0] not in plain
    assert [value for code, _, value in _obx(plain) if code == "59776-5"] == [GROUNDED.findings]


def test_oru_lists_a_box_only_finding(cr: Study, results: dict[str, AnalysisResult]) -> None:
    text = _oru(cr, results["box_only"])
    assert [(sub, value) for code, sub, value in _obx(text) if code == "AI-CONSISTENCY"] == [
        ("6", "AI consistency: 3 of 3 stated findings localized; 1 box not stated in the text"),
        ("6", "Localized by the AI, not stated in the draft text: Kerley B lines")]
    message = hl7.parse(text)
    notes = [str(nte(3)) for nte in message.segments("NTE")]
    assert notes == ["Localized by the AI, not stated in the draft text"]  # under finding 3, the only NTE
    assert "Tester" not in text.split("PID|")[1].split("\r", 1)[1]  # no patient name past the PID segment


def test_gsps_and_png_captions_say_not_in_text_for_a_box_only_finding(
    cr: Study, results: dict[str, AnalysisResult], tmp_path: Path,
) -> None:
    result = results["box_only"]
    [state] = build_presentation_states(cr.inputs(result))
    path = tmp_path / "gsps.dcm"
    state.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, cr) == []
    texts = [t.UnformattedTextValue for t in pydicom.dcmread(path).GraphicAnnotationSequence[0].TextObjectSequence]
    assert texts == ["1 left pneumothorax (AI, preliminary)", "2 right nodule (AI, preliminary)",
                     "3 kerley b lines (not in text) (AI, preliminary)"]
    located = ReportInputs.check(cr.manifest, result, cr.sources).located_findings()
    assert [finding_caption(f, signed=True) for f in located][2] == "3 kerley b lines (AI, signed)"
    png = np.asarray(Image.open(io.BytesIO(render_overlay(cr.by_uid(result.findings[0].sop_instance_uid),
                                                          located))))
    assert png.shape[:2] == (800, 600)
    [grounded] = build_presentation_states(cr.inputs(results["grounded"]))
    assert [t.UnformattedTextValue for t in grounded.GraphicAnnotationSequence[0].TextObjectSequence] == texts[:2]


def test_findings_json_carries_the_grounding(cr: Study, results: dict[str, AnalysisResult]) -> None:
    document = findings_document(ReportInputs.check(cr.manifest, results["box_only"], cr.sources), {})
    assert document["consistency"] == {"grounded": 3, "text_only": 0, "box_only": 1, "flagged": True}
    assert [(f["status"], f["sentences"]) for f in document["findings"]] == [
        ("grounded", [0, 2]), ("grounded", [1, 2]), ("box_only", [])]
    assert [s["status"] for s in document["report"]["sentences"]] == ["grounded", "grounded", "grounded"]


def test_a_signed_version_carries_its_own_structure_and_one_without_sentences_none(
        cr: Study, results: dict[str, AnalysisResult]) -> None:
    """A signed grounded version (worklist/grounding.py: the radiologist's sentences linked to the accepted boxes)
    keeps the marks of the statements accepted without image evidence; a signed result without sentences (a
    draft written before grounding) gets none."""
    signed = results["text_only"].model_copy(update={"status": "final"})
    data = build_oru_r01(cr.manifest, signed, ResultStatus.FINAL, endpoints=ENDPOINTS, control_id="G2",
                         message_time=MESSAGE_TIME).decode("utf-8")
    assert "not localized" in data and "AI-CONSISTENCY" in data
    plain = signed.model_copy(update={"report": signed.report.model_copy(update={"sentences": []}),
                                      "findings": [f.model_copy(update={"sentences": [], "status": None})
                                                   for f in signed.findings]})
    data = build_oru_r01(cr.manifest, plain, ResultStatus.FINAL, endpoints=ENDPOINTS, control_id="G2",
                         message_time=MESSAGE_TIME).decode("utf-8")
    assert "not localized" not in data and "AI-CONSISTENCY" not in data
    content = build_narrative_sr(cr.inputs(plain))
    assert "not localized" not in str(content.ContentSequence)
    sr = build_findings_sr(cr.inputs(plain))
    assert "CodingSchemeIdentificationSequence" not in sr
    assert codes.DCM.Comment.value in str(sr.ContentSequence)  # the analysed series comment, and nothing else
    assert "AI consistency" not in str(sr.ContentSequence)
