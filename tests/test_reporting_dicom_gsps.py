"""GSPS per annotated image (dciodvfy, graphics, VOI) and the overlay PNG + findings JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from reporting_dicom_helpers import (
    Study,
    cr_findings,
    cr_study,
    dciodvfy,
    multiframe_study,
    new_dciodvfy_warnings,
    result_for,
    shipped_study,
)

from core.result import Finding
from reporting.context import ReportInputs
from reporting.gsps import build_presentation_states
from reporting.overlay import BOX_COLOR, findings_document, render_overlay
from reporting.uids import OutputKind, output_uid


@pytest.fixture(scope="module")
def cr(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return cr_study(tmp_path_factory.mktemp("cr"))


def _write(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_one_valid_gsps_per_annotated_image_with_boxes_and_labels(cr: Study, tmp_path: Path) -> None:
    findings = cr_findings(cr)
    result = result_for(cr, findings)
    states = build_presentation_states(cr.inputs(result))
    assert len(states) == 1  # all findings are on the PA view; the lateral view has none
    path = _write(states[0], tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, cr) == []

    ds = pydicom.dcmread(path)
    pa = cr.by_uid(findings[0].sop_instance_uid)
    assert ds.StudyInstanceUID == pa.StudyInstanceUID and ds.SeriesInstanceUID != pa.SeriesInstanceUID
    # The state covers the series (the lateral view keeps the presentation); the boxes are on the PA view only.
    [series] = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == pa.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedImageSequence] == [s.SOPInstanceUID
                                                                                     for s in cr.sources]
    [annotation] = ds.GraphicAnnotationSequence
    assert [r.ReferencedSOPInstanceUID for r in annotation.ReferencedImageSequence] == [pa.SOPInstanceUID]
    assert annotation.GraphicLayer == ds.GraphicLayerSequence[0].GraphicLayer == "AI_FINDINGS"
    assert len(annotation.GraphicObjectSequence) == len(findings)
    for index, (graphic, finding) in enumerate(zip(annotation.GraphicObjectSequence, findings, strict=True)):
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        points = np.array(graphic.GraphicData, dtype=float).reshape(-1, 2)
        x1, y1, x2, y2 = finding.box
        np.testing.assert_allclose(points, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])
        assert graphic.TrackingUID == output_uid(result.study_instance_uid, result.episode_id,
                                                 result.model.version, OutputKind.FINDING, index)
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert texts == ["1 left pneumothorax (AI, preliminary)", "2 right nodule (AI, preliminary)",
                     "3 kerley b lines (AI, preliminary)"]
    # The CR carries its own window: kept as is.
    voi = ds.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2048.0, 4096.0)


def test_gsps_uids_are_deterministic(cr: Study) -> None:
    result = result_for(cr, cr_findings(cr))
    first = build_presentation_states(cr.inputs(result))[0]
    again = build_presentation_states(cr.inputs(result))[0]
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)


@pytest.mark.parametrize(("name", "window"), [("MR_small.dcm", (600.0, 1600.0)), ("CT_small.dcm", (40.0, 400.0))])
def test_voi_window_kept_or_defaulted(tmp_path: Path, name: str, window: tuple[float, float]) -> None:
    study = shipped_study(tmp_path, name)
    image = study.sources[0]
    result = result_for(study, [Finding(label="tumour", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50))])
    path = _write(build_presentation_states(study.inputs(result))[0], tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, study) == []
    [voi] = pydicom.dcmread(path).SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == window
    if "WindowCenter" not in image:  # CT_small has no window: the soft-tissue default in HU, not its full range
        assert voi.WindowCenterWidthExplanation == "AI: CT soft tissue default (the image has no window)"


def test_legacy_multiframe_image_gets_a_valid_gsps_on_the_findings_frame(tmp_path: Path) -> None:
    """highdicom reads a multi-frame IOD's rescale/window from functional groups, which a legacy multi-frame
    image (here Multi-frame Grayscale Word SC) does not have: the GSPS must still build, valid, on frame 2."""
    study = multiframe_study(tmp_path)
    image = study.sources[0]
    assert "SharedFunctionalGroupsSequence" not in image
    finding = Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, frame_number=2, box=(20, 10, 40, 30))
    result = result_for(study, [finding])
    (state,) = build_presentation_states(study.inputs(result))
    assert "SharedFunctionalGroupsSequence" not in image  # the source is left alone
    path = _write(state, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, study) == []
    ds = pydicom.dcmread(path)
    assert "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    annotation = ds.GraphicAnnotationSequence[0]
    assert int(annotation.ReferencedImageSequence[0].ReferencedFrameNumber) == 2
    np.testing.assert_allclose(np.array(annotation.GraphicObjectSequence[0].GraphicData, dtype=float).reshape(-1, 2),
                               [[20, 10], [40, 10], [40, 30], [20, 30], [20, 10]])
    voi = ds.SoftcopyVOILUTSequence[0]  # no window of its own: the full range over every frame (500 .. 4000)
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2250.0, 3500.0)

    inputs = ReportInputs.check(study.manifest, result, study.sources)
    [(_, located)] = inputs.annotated_images()
    pixels = np.asarray(Image.open(io.BytesIO(render_overlay(image, located))))
    assert tuple(pixels[20, 20]) == BOX_COLOR  # left edge of the box
    grey = pixels[50, 60]  # frame 2 (1000) through the full-range window of that frame alone (1000 .. 4000)
    assert grey[0] == grey[1] == grey[2] == 0


def test_signed_gsps_labels_say_signed_in_a_new_instance_of_the_same_series(cr: Study, tmp_path: Path) -> None:
    result = result_for(cr, cr_findings(cr))
    state = build_presentation_states(cr.inputs(result), version=1)[0]
    texts = [t.UnformattedTextValue for t in state.GraphicAnnotationSequence[0].TextObjectSequence]
    assert all(text.endswith("(AI, signed)") for text in texts)
    draft = build_presentation_states(cr.inputs(result))[0]
    # other content, so another SOP Instance UID: a PACS holding the draft would otherwise keep the draft labels
    assert state.SOPInstanceUID != draft.SOPInstanceUID
    assert state.SOPInstanceUID == output_uid(result.study_instance_uid, result.episode_id, result.model.version,
                                              OutputKind.GSPS, 0, version=1)
    assert state.SeriesInstanceUID == draft.SeriesInstanceUID
    assert (draft.InstanceNumber, state.InstanceNumber) == (1, 1001)
    path = _write(state, tmp_path / "gsps_final.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, cr) == []


def test_no_findings_no_gsps(cr: Study) -> None:
    assert build_presentation_states(cr.inputs(result_for(cr, []))) == []


def test_overlay_png_draws_boxes_in_image_geometry(cr: Study) -> None:
    inputs = ReportInputs.check(cr.manifest, result_for(cr, cr_findings(cr)), cr.sources)
    [(image, located)] = inputs.annotated_images()
    png = Image.open(io.BytesIO(render_overlay(image, located)))
    assert png.format == "PNG" and png.mode == "RGB"
    assert png.size == (600, 800)  # (width = Columns, height = Rows)
    pixels = np.asarray(png)
    x1, y1, x2, y2 = (int(v) for v in located[1].finding.box)  # the nodule box
    assert tuple(pixels[(y1 + y2) // 2, x1]) == BOX_COLOR  # left edge, half-way down
    assert tuple(pixels[y2, (x1 + x2) // 2]) == BOX_COLOR  # bottom edge
    inside = pixels[y1 + 20, x1 + 20]
    assert inside[0] == inside[1] == inside[2]  # the image itself stays grey


def test_findings_document_has_codes_boxes_and_no_patient_identity(cr: Study) -> None:
    inputs = ReportInputs.check(cr.manifest, result_for(cr, cr_findings(cr)), cr.sources)
    document = findings_document(inputs, {cr.sources[0].SOPInstanceUID: "overlay_1.png"})
    assert document["status"] == "preliminary"
    first, _, unknown = document["findings"]
    assert first["code"] == {"value": "36118008", "scheme": "SCT", "meaning": "Pneumothorax"}
    assert first["laterality_code"]["value"] == "7771000"
    assert first["polyline"][0] == first["polyline"][-1]
    assert first["overlay"] == "overlay_1.png"
    assert unknown["coded_as_generic_finding"] is True and unknown["label"] == "Kerley B lines"
    text = json.dumps(document)
    assert "Tester" not in text and "RD-0001" not in text
