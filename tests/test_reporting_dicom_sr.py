"""Findings SR (TID 1500) and narrative SR (TID 2000): validators, read-back, flags, UIDs, evidence."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from reporting_dicom_helpers import (
    MODEL,
    Study,
    analysed_series_comments,
    cr_findings,
    cr_study,
    dciodvfy,
    dsrdump,
    enhanced_study,
    library_frames,
    load,
    manifest_for,
    multiframe_study,
    new_dciodvfy_warnings,
    pixelmed_sr_validate,
    result_for,
    shipped_study,
)

from core.result import AnalysisResult, DraftReport, Finding
from reporting.context import Signoff
from reporting.narrative import build_narrative_sr
from reporting.sr import NO_FINDING_IDENTIFIER, NOT_LOCALIZED_IDENTIFIER, build_findings_sr
from reporting.uids import OutputKind, device_uid, output_uid

SIGNOFF = Signoff("Curie^Marie", "General Hospital Radiology", datetime(2024, 5, 6, 9, 30, tzinfo=UTC))
SR_NAMES = ["sr_draft", "sr_final", "sr_no_findings", "sr_no_findings_normal", "sr_ct", "sr_multiframe",
            "sr_enhanced", "sr_sparse", "narrative_draft", "narrative_final"]
ENHANCED_FRAMES = 12
ENHANCED_READ = [2, 5, 8, 11]
EFFUSION_REPORT = DraftReport(findings="Right pleural effusion.", impression="Right pleural effusion.")
NORMAL_REPORT = DraftReport(findings="The lungs are clear. No pleural effusion or pneumothorax.",
                            impression="No acute abnormality.")
CT_BOX = (5.0, 6.0, 40.0, 50.0)
FRAME_BOX = (20.0, 10.0, 40.0, 30.0)


@pytest.fixture(scope="module")
def cr(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return cr_study(tmp_path_factory.mktemp("cr"))


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return shipped_study(tmp_path_factory.mktemp("ct"), "CT_small.dcm")


@pytest.fixture(scope="module")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return multiframe_study(tmp_path_factory.mktemp("mf"))


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return enhanced_study(tmp_path_factory.mktemp("enhanced"), frames=ENHANCED_FRAMES)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """pydicom's CT_small without the Type 2/3 attributes the SR names the series by: Series Number empty, no
    Series Description, no Frame of Reference UID, Body Part Examined empty."""
    study = shipped_study(tmp_path_factory.mktemp("sparse"), "CT_small.dcm")
    path = study.spool / study.manifest.series[0].instances[0].path
    ds = pydicom.dcmread(path)
    ds.SeriesNumber = None
    ds.BodyPartExamined = ""
    for keyword in ("SeriesDescription", "FrameOfReferenceUID"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path)
    manifest = manifest_for(study.spool, [study.manifest.series[0].instances[0].path], study.manifest.episode_id)
    return Study(study.spool, manifest, load(study.spool, manifest))


@pytest.fixture(scope="module")
def studies(cr: Study, ct: Study, multiframe: Study, enhanced: Study, sparse: Study) -> dict[str, Study]:
    """The source study of each SR variant."""
    on_ct = ("sr_no_findings", "sr_no_findings_normal", "sr_ct")
    named = {"sr_multiframe": multiframe, "sr_enhanced": enhanced, "sr_sparse": sparse}
    return {name: ct if name in on_ct else named.get(name, cr) for name in SR_NAMES}


def enhanced_result(study: Study) -> AnalysisResult:
    """A finding on frame 8 of the enhanced CT, frames ENHANCED_READ read."""
    uid = study.sources[0].SOPInstanceUID
    finding = Finding(label="mass", sop_instance_uid=uid, frame_number=8, box=FRAME_BOX)
    return result_for(study, [finding]).model_copy(update={"analysed_frames": {uid: ENHANCED_READ}})


@pytest.fixture(scope="module")
def written(cr: Study, ct: Study, multiframe: Study, enhanced: Study, sparse: Study,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every SR variant written to disk once for the (slow-ish) validators."""
    out = tmp_path_factory.mktemp("sr_out")
    result = result_for(cr, cr_findings(cr))
    ct_image, frames_image = ct.sources[0], multiframe.sources[0]
    ct_finding = Finding(label="nodule", sop_instance_uid=ct_image.SOPInstanceUID, box=CT_BOX, laterality="right")
    frame_finding = Finding(label="mass", sop_instance_uid=frames_image.SOPInstanceUID, frame_number=2,
                            box=FRAME_BOX)
    objects = {
        "sr_draft": build_findings_sr(cr.inputs(result)),
        "sr_final": build_findings_sr(cr.inputs(result), SIGNOFF),
        "sr_no_findings": build_findings_sr(
            ct.inputs(result_for(ct, []).model_copy(update={"report": EFFUSION_REPORT}))),
        "sr_no_findings_normal": build_findings_sr(
            ct.inputs(result_for(ct, []).model_copy(update={"report": NORMAL_REPORT}))),
        "sr_ct": build_findings_sr(ct.inputs(result_for(ct, [ct_finding]))),
        "sr_multiframe": build_findings_sr(multiframe.inputs(result_for(multiframe, [frame_finding]))),
        "sr_enhanced": build_findings_sr(enhanced.inputs(enhanced_result(enhanced))),
        "sr_sparse": build_findings_sr(sparse.inputs(result_for(sparse, []))),
        "narrative_draft": build_narrative_sr(cr.inputs(result)),
        "narrative_final": build_narrative_sr(cr.inputs(result), SIGNOFF),
    }
    paths = {}
    for name, dataset in objects.items():
        paths[name] = out / f"{name}.dcm"
        dataset.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def pixelmed_reports(written: dict[str, Path]) -> dict[Path, str]:
    return pixelmed_sr_validate(list(written.values()))


@pytest.mark.parametrize("name", SR_NAMES)
def test_dciodvfy_finds_no_errors(written: dict[str, Path], studies: dict[str, Study], name: str) -> None:
    assert dciodvfy(written[name]) == []
    # Only warnings the source images have themselves (CT_small.dcm: Patient's Weight 0) are allowed.
    assert new_dciodvfy_warnings(written[name], studies[name]) == []


@pytest.mark.parametrize("name", SR_NAMES)
def test_dsrdump_reads_the_document(written: dict[str, Path], name: str) -> None:
    done = dsrdump(written[name])
    assert done.returncode == 0, done.stderr
    assert "Verification Flag" in done.stdout


@pytest.mark.parametrize("name", SR_NAMES)
def test_pixelmed_finds_no_errors_or_warnings(written: dict[str, Path], pixelmed_reports: dict[Path, str],
                                              name: str) -> None:
    report = pixelmed_reports[written[name]]
    assert "Root Template Validation Complete" in report
    assert "IOD validation complete" in report
    assert "Error" not in report
    assert "Warning" not in report
    assert ("TID_1500" if name.startswith("sr") else "TID_2000") in report


def test_boxes_read_back_as_closed_polylines_on_their_source_images(cr: Study, written: dict[str, Path]) -> None:
    sr = hd.sr.srread(written["sr_draft"])
    findings = cr_findings(cr)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(findings)
    for index, (group, finding) in enumerate(zip(groups, findings, strict=True)):
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        x1, y1, x2, y2 = finding.box
        expected = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])
        np.testing.assert_allclose(group.roi.value, expected)
        source = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == finding.sop_instance_uid
        assert group.tracking_uid == output_uid(cr.manifest.study_instance_uid, cr.manifest.episode_id,
                                                MODEL.version, OutputKind.FINDING, index)
        assert group.tracking_identifier.startswith(f"Finding {index + 1}:")
    # (column, row) order: every x is within the 600 columns, the y of the last box goes past 600 rows.
    assert max(group.roi.value[:, 0].max() for group in groups) <= 600
    assert max(group.roi.value[:, 1].max() for group in groups) > 600


@pytest.mark.parametrize(("name", "box", "frames"), [("sr_ct", CT_BOX, None), ("sr_multiframe", FRAME_BOX, [2])])
def test_boxes_on_ct_and_on_one_frame_of_a_multiframe_image_read_back(
    written: dict[str, Path], studies: dict[str, Study], name: str, box: tuple[float, float, float, float],
    frames: list[int] | None,
) -> None:
    (group,) = hd.sr.srread(written[name]).content.get_planar_roi_measurement_groups()
    x1, y1, x2, y2 = box
    np.testing.assert_allclose(group.roi.value, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])
    source = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == studies[name].sources[0].SOPInstanceUID
    assert ([int(f) for f in np.atleast_1d(source.ReferencedFrameNumber)] if "ReferencedFrameNumber" in source
            else None) == frames


@pytest.mark.parametrize(("name", "comment"), [
    ("sr_draft", "Analysed series 1 (CR): 2 of 2 images read"),
    ("sr_ct", 'Analysed series 1 (CT): 1 of 1 image read'),
    ("sr_sparse", "Analysed series (CT): 1 of 1 image read"),  # no number, description, frame of reference
    ("sr_enhanced", f'Analysed series 9 "enhanced CT" (CT): {len(ENHANCED_READ)} of {ENHANCED_FRAMES} frames of '
                    "1 multi-frame image read"),
])
def test_the_sr_names_the_series_and_images_it_analysed(written: dict[str, Path], studies: dict[str, Study],
                                                        name: str, comment: str) -> None:
    sr = pydicom.dcmread(written[name])
    study = studies[name]
    frames = ENHANCED_READ if name == "sr_enhanced" else None
    assert library_frames(sr) == {str(ds.SOPInstanceUID): frames for ds in study.sources}
    assert analysed_series_comments(sr) == [comment]
    [library] = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    [group] = library.ContentSequence
    shared = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.ContentSequence
              if item.RelationshipType == "HAS ACQ CONTEXT"}
    assert shared["Modality"].ConceptCodeSequence[0].CodeValue == study.manifest.series[0].modality
    assert ("Frame of Reference UID" in shared) is ("FrameOfReferenceUID" in study.sources[0])  # CR, sparse: not
    assert hd.sr.srread(written[name]).content.get_planar_roi_measurement_groups() is not None  # highdicom reads it


def test_findings_are_coded_with_site_laterality_and_fallback(written: dict[str, Path]) -> None:
    groups = hd.sr.srread(written["sr_draft"]).content.get_planar_roi_measurement_groups()
    pneumothorax, nodule, unknown = groups
    assert pneumothorax.finding_type == codes.SCT.Pneumothorax
    site = pneumothorax.finding_sites[0]
    assert site.value == codes.SCT.Pleura
    assert site.laterality == codes.SCT.Left
    assert nodule.finding_type == codes.SCT.Nodule
    assert nodule.finding_sites[0].value == codes.SCT.Lung  # from the model's site "right upper lung"
    assert nodule.finding_sites[0].laterality == codes.SCT.Right
    assert unknown.finding_type == codes.SCT.Finding  # "Kerley B lines" is not in the table
    assert "Kerley B lines" in unknown.tracking_identifier  # the label survives as text


def test_observer_is_the_algorithm_device_and_algorithm_is_identified(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["sr_draft"])
    items = {(item.ConceptNameCodeSequence[0].CodeValue, item.ValueType): item for item in ds.ContentSequence}
    assert items[("121005", "CODE")].ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value
    assert device_uid(MODEL.name, MODEL.version) == items[("121012", "UIDREF")].UID
    procedure = items[("121058", "CODE")].ConceptCodeSequence[0]
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("363679005", "SCT")  # imaging, not AI
    text = dsrdump(written["sr_draft"]).stdout
    assert '"Algorithm Name")="MiniGPT-Med"' in text
    assert '"Algorithm Version")="stage3-test"' in text
    assert '"Algorithm Parameters")="max_new_tokens=300"' in text
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in ds.ContributingEquipmentSequence]
    assert codes.DCM.ProcessingEquipment.value in purposes
    raddraft = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == "raddraft"]
    assert raddraft[0].SoftwareVersions == MODEL.version


@pytest.mark.parametrize("kind", ["sr", "narrative"])
def test_flags_draft_versus_final(written: dict[str, Path], kind: str) -> None:
    draft = pydicom.dcmread(written[f"{kind}_draft"])
    final = pydicom.dcmread(written[f"{kind}_final"])
    assert (draft.CompletionFlag, draft.VerificationFlag, draft.PreliminaryFlag) == (
        "COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in draft
    assert (final.CompletionFlag, final.VerificationFlag, final.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    observer = final.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Curie^Marie"
    assert observer.VerifyingOrganization == "General Hospital Radiology"
    assert observer.VerificationDateTime.startswith("20240506093000")
    assert final.SOPInstanceUID != draft.SOPInstanceUID
    assert final.SeriesInstanceUID == draft.SeriesInstanceUID
    predecessor = final.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == draft.SOPInstanceUID


@pytest.mark.parametrize("name", SR_NAMES)
def test_same_study_new_series_and_every_source_is_evidence(studies: dict[str, Study], written: dict[str, Path],
                                                           name: str) -> None:
    ds = pydicom.dcmread(written[name])
    doc = hd.sr.Comprehensive3DSR.from_dataset(ds) if name.startswith("sr") else hd.sr.EnhancedSR.from_dataset(ds)
    evidence = doc.get_evidence()
    source_series = {e[1] for e in evidence}
    assert ds.StudyInstanceUID == evidence[0][0]
    assert ds.SeriesInstanceUID not in source_series
    assert ds.Modality == "SR"
    study = studies[name]
    assert ds.StudyInstanceUID == study.manifest.study_instance_uid
    assert {e[2] for e in evidence} == {str(s.SOPInstanceUID) for s in study.sources}  # the CR lateral view too
    assert ds.PatientID == study.sources[0].PatientID


def test_no_box_and_a_normal_report_gives_one_group_stating_no_abnormality(written: dict[str, Path]) -> None:
    sr = hd.sr.srread(written["sr_no_findings_normal"])
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type == codes.DCM.NoAbnormality
    assert group.tracking_identifier == NO_FINDING_IDENTIFIER
    assert len(group.source_images) == 1  # the analysed CT image


def test_no_box_and_a_report_stating_a_finding_says_only_that_nothing_was_localized(
    written: dict[str, Path],
) -> None:
    sr = hd.sr.srread(written["sr_no_findings"])
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    assert group.finding_type is None  # neither "No abnormality" nor a claim of a finding
    assert group.tracking_identifier == NOT_LOCALIZED_IDENTIFIER
    assert "the AI drew no box" in group.tracking_identifier
    assert "111286" not in dsrdump(written["sr_no_findings"]).stdout


def test_narrative_holds_findings_and_impression_text(written: dict[str, Path]) -> None:
    ds = pydicom.dcmread(written["narrative_draft"])
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    sections = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in ds.ContentSequence
                if item.ValueType == "CONTAINER"}
    assert sections["Findings"].ContentSequence[0].TextValue == "Small left pneumothorax. Nodule in the right lung."
    assert sections["Impressions"].ContentSequence[0].TextValue == "Left pneumothorax; right lung nodule."


def test_uids_are_deterministic_and_change_with_the_episode(cr: Study, tmp_path: Path) -> None:
    result = result_for(cr, cr_findings(cr))
    first = build_findings_sr(cr.inputs(result))
    again = build_findings_sr(cr.inputs(result))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    narrative = build_narrative_sr(cr.inputs(result))
    assert narrative.SOPInstanceUID == build_narrative_sr(cr.inputs(result)).SOPInstanceUID
    assert narrative.SOPInstanceUID != first.SOPInstanceUID

    other = cr_study(tmp_path, episode_id=cr.manifest.episode_id + 1)
    retried = build_findings_sr(other.inputs(result_for(other, cr_findings(other))))
    assert retried.SOPInstanceUID != first.SOPInstanceUID
    assert retried.SeriesInstanceUID != first.SeriesInstanceUID


def test_a_box_outside_its_image_is_refused(cr: Study) -> None:
    pa = cr.manifest.series[0].instances[0].sop_instance_uid
    # 700 is inside the 800 rows but outside the 600 columns: x is the column.
    bad = result_for(cr, [Finding(label="mass", sop_instance_uid=pa, box=(100, 100, 700, 200))])
    with pytest.raises(ValueError, match=r"finding 0 \('mass'\).*x2 <= Columns \(600\)"):
        build_findings_sr(cr.inputs(bad))


def test_a_finding_on_an_image_that_was_not_passed_is_refused(cr: Study) -> None:
    pa = cr.manifest.series[0].instances[0].sop_instance_uid
    lateral_only = [ds for ds in cr.sources if ds.SOPInstanceUID != pa]
    result = result_for(cr, [Finding(label="mass", sop_instance_uid=pa, box=(1, 1, 20, 20))],
                        analysed=[lateral_only[0].SOPInstanceUID])
    with pytest.raises(ValueError, match=rf"finding 0 \('mass'\): SOP Instance UID {pa} has no source dataset"):
        build_findings_sr(cr.inputs(result, lateral_only))


def test_a_result_of_another_study_is_refused(cr: Study, tmp_path: Path) -> None:
    ct = shipped_study(tmp_path, "CT_small.dcm")
    with pytest.raises(ValueError, match=r"AnalysisResult\.study_instance_uid .* must equal the manifest's"):
        build_findings_sr(cr.inputs(result_for(ct, [])))


def test_signoff_needs_observer_and_organization() -> None:
    with pytest.raises(ValueError, match="verifying_organization must not be empty"):
        Signoff("Curie^Marie", " ", datetime(2024, 1, 1, tzinfo=UTC))
