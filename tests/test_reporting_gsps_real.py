"""Presentation states on pydicom's real files, loaded by dcmtk's presentation-state tools beside dciodvfy.

dcmp2pgm renders an image through a GSPS (exit 0, its PGM shows the state's window); it draws no graphic
objects and knows no colour state, so those are checked from the dataset. What each test caught before the
presentation states were reworked is said in its docstring.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid
from reporting_dicom_helpers import (
    PYDICOM_TEST_FILES,
    Study,
    dciodvfy,
    load,
    manifest_for,
    new_dciodvfy_warnings,
    result_for,
    shipped_study,
    write_source,
)

from core.result import Finding
from reporting.gsps import (
    CT_DEFAULT_WINDOW,
    OVERLAY_LAYER,
    SIGNED_FIRST_INSTANCE_NUMBER,
    build_presentation_state_set,
    build_presentation_states,
)
from reporting.outbox import write_outputs
from reporting.outputs import OutputProblem, read_problems
from reporting.uids import OutputKind, output_uid

GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
COLOR_PS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.2"
# dciodvfy's warning for an empty Laterality: the side of an image that names neither side nor body part is
# unknown, and absent would be an error ("Missing attribute for Type 2C Conditional").
UNKNOWN_SIDE = ("Warning - </Laterality(0020,0060)> - is only permitted to be empty when actually unknown; should "
                "be absent (not empty) if an unpaired body part, and have a value if a paired body part")


def _write(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def _image_path(study: Study, image: Dataset) -> Path:
    _, instance = study.manifest.find_instance(str(image.SOPInstanceUID))
    return study.spool / instance.path


def _dcmp2pgm(state: Path, image: Path, out_dir: Path, frame: int | None = None) -> tuple[int, str, Path]:
    """dcmtk renders *image* through the presentation state (run in *out_dir*: it writes overlay bitmaps there)."""
    out = out_dir / f"{image.stem}.pgm"
    command = ["dcmp2pgm", "-v", "-p", str(state), *(["-f", str(frame)] if frame else []), str(image), str(out)]
    done = subprocess.run(command, cwd=out_dir, check=False, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr, out


def _windowed(image: Dataset, center: float, width: float, frame: int | None = None) -> np.ndarray:
    """8-bit grey levels of the image's modality values through a linear window (PS3.3 C.11.2.1.2.1)."""
    pixels = image.pixel_array
    if frame is not None:
        pixels = pixels[frame - 1]
    values = np.asarray(apply_modality_lut(pixels, image), dtype=np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


def _one_state(study: Study, finding: Finding) -> Dataset:
    states, reasons = build_presentation_state_set(study.inputs(result_for(study, [finding])))
    assert reasons == []
    [state] = states
    return state


@pytest.mark.parametrize(("name", "box", "frame", "window"), [
    ("CT_small.dcm", (5, 6, 40, 50), None, (40.0, 400.0)),  # no window of its own: the soft-tissue default (HU)
    ("MR_small.dcm", (5, 6, 40, 50), None, (600.0, 1600.0)),  # its own window
    ("examples_overlay.dcm", (5, 6, 40, 50), None, (450.0, 790.0)),  # windows [450, 200]/[790, 443]: the first
    ("rtdose.dcm", (1, 2, 8, 9), 2, None),  # multi-frame (15 frames), no window, not CT: the full range
])
def test_dcmtk_renders_each_image_through_its_gsps_with_one_window(
        tmp_path: Path, name: str, box: tuple[float, float, float, float], frame: int | None,
        window: tuple[float, float] | None) -> None:
    """Before: highdicom copied examples_overlay's two windows (dcmp2pgm refused the state: "windowCenter present
    but windowWidth VM != 1") and CT_small got its full pixel range, not a soft-tissue window."""
    study = shipped_study(tmp_path, name)
    image = study.sources[0]
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=box,
                                      frame_number=frame))
    path = _write(state, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert set(new_dciodvfy_warnings(path, study)) <= {UNKNOWN_SIDE}

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == GSPS_STORAGE
    [voi] = ds.SoftcopyVOILUTSequence
    assert not isinstance(voi.WindowCenter, MultiValue) and not isinstance(voi.WindowWidth, MultiValue)
    center, width = float(voi.WindowCenter), float(voi.WindowWidth)
    if window is not None:
        assert (center, width) == window
    else:  # every frame's values, 0 .. 2049000 in rtdose.dcm
        assert voi.WindowCenterWidthExplanation == "AI: full pixel range"
        assert center - width / 2 == pytest.approx(float(image.pixel_array.min()))
        assert center + width / 2 == pytest.approx(float(image.pixel_array.max()))

    rc, log, out = _dcmp2pgm(path, _image_path(study, image), tmp_path, frame)
    assert rc == 0, log
    assert f"VOI transformation: window center={center:g} width={width:g}" in log
    rendered = np.asarray(Image.open(out), dtype=np.float64)
    np.testing.assert_allclose(rendered, _windowed(image, center, width, frame), atol=1.0)


def _ct_series(root: Path) -> Study:
    """CT_small as a 5-slice series: slices 1-3 alike, slice 4 with another rescale intercept, slice 5 cropped
    (neither fits a state of slices 1-3: highdicom requires one rescale and one size)."""
    spool = root / "spool"
    relatives = []
    for number in range(1, 6):
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
        uid = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), str(number)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = number
        if number == 4:
            ds.RescaleIntercept = -1000
        if number == 5:
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64]).tobytes()
            ds.Rows = 64
        relatives.append(f"ct/{number}.dcm")
        write_source(spool, relatives[-1], ds)
    manifest = manifest_for(spool, relatives)
    return Study(spool, manifest, load(spool, manifest))


def test_one_state_covers_every_slice_of_the_series_that_fits_it(tmp_path: Path) -> None:
    """Before: one state per boxed image, referencing it alone: the other slices lost the presentation."""
    study = _ct_series(tmp_path)
    slices = study.sources
    findings = [Finding(label="nodule", sop_instance_uid=slices[1].SOPInstanceUID, box=(10, 10, 30, 30)),
                Finding(label="mass", sop_instance_uid=slices[0].SOPInstanceUID, box=(40, 40, 60, 70)),
                Finding(label="cyst", sop_instance_uid=slices[3].SOPInstanceUID, box=(5, 5, 20, 20))]
    result = result_for(study, findings)
    states, reasons = build_presentation_state_set(study.inputs(result))
    assert reasons == []
    first, other = states  # slices 1-3 (two boxed) and slice 4 (its own rescale)
    [series] = first.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == slices[0].SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedImageSequence] == [
        s.SOPInstanceUID for s in slices[:3]]
    # the boxes stay on their own slice
    assert [[r.ReferencedSOPInstanceUID for r in a.ReferencedImageSequence] for a in first.GraphicAnnotationSequence
            ] == [[slices[1].SOPInstanceUID], [slices[0].SOPInstanceUID]]
    assert [r.ReferencedSOPInstanceUID for r in other.ReferencedSeriesSequence[0].ReferencedImageSequence] == [
        slices[3].SOPInstanceUID]
    assert float(other.RescaleIntercept) == -1000.0

    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    assert [s.SOPInstanceUID for s in states] == [output_uid(*uid_args, OutputKind.GSPS, n) for n in (0, 1)]
    assert [s.InstanceNumber for s in states] == [1, 2]
    again, _ = build_presentation_state_set(study.inputs(result))
    assert [s.SOPInstanceUID for s in again] == [s.SOPInstanceUID for s in states]  # a retry rewrites them
    signed = build_presentation_states(study.inputs(result), version=1)
    assert [s.SOPInstanceUID for s in signed] == [output_uid(*uid_args, OutputKind.GSPS, n, version=1) for n in (0, 1)]
    assert [s.InstanceNumber for s in signed] == [SIGNED_FIRST_INSTANCE_NUMBER, SIGNED_FIRST_INSTANCE_NUMBER + 1]
    assert {s.SeriesInstanceUID for s in signed} == {states[0].SeriesInstanceUID}

    path = _write(first, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, study) == []
    center, width, _ = CT_DEFAULT_WINDOW
    # an unboxed slice of the series, rendered through the state: the state's window
    rc, log, out = _dcmp2pgm(path, _image_path(study, slices[2]), tmp_path)
    assert rc == 0, log
    assert "Number of graphic objects: 0" in log.split("Graphic Layer #1 [AI_FINDINGS]")[1]  # boxes: slice 2 only
    np.testing.assert_allclose(np.asarray(Image.open(out), dtype=np.float64), _windowed(slices[2], center, width),
                               atol=1.0)


def test_the_images_overlay_is_activated_on_its_own_layer(tmp_path: Path) -> None:
    """Before: examples_overlay's overlay plane (group 6000, a Siemens graphic) was not activated: no viewer
    showed it with the state."""
    study = shipped_study(tmp_path, "examples_overlay.dcm")
    image = study.sources[0]
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50)))
    path = _write(state, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, study) == []
    ds = pydicom.dcmread(path)
    assert ds[0x6000, 0x1001].value == OVERLAY_LAYER.GraphicLayer
    assert [layer.GraphicLayer for layer in ds.GraphicLayerSequence] == ["AI_FINDINGS", "IMAGE_OVERLAY"]
    assert all(annotation.GraphicLayer == "AI_FINDINGS" for annotation in ds.GraphicAnnotationSequence)
    rc, log, _ = _dcmp2pgm(path, _image_path(study, image), tmp_path)
    assert rc == 0, log
    overlay_layer = log.split("Graphic Layer #2 [IMAGE_OVERLAY]")[1]
    assert "Number of activated overlays: 1" in overlay_layer and "group=0x6000" in overlay_layer

    plain = shipped_study(tmp_path / "plain", "MR_small.dcm")  # no overlay: no activation, no extra layer
    ds = _one_state(plain, Finding(label="mass", sop_instance_uid=plain.sources[0].SOPInstanceUID,
                                   box=(5, 6, 40, 50)))
    assert [0x6000, 0x1001] not in ds
    assert [layer.GraphicLayer for layer in ds.GraphicLayerSequence] == ["AI_FINDINGS"]


@pytest.mark.parametrize(("attributes", "expected"), [
    ({"Laterality": "R"}, "R"),
    ({"Laterality": None, "ImageLaterality": "L"}, "L"),
    ({"Laterality": None, "ImageLaterality": "B"}, ""),  # both sides: no value of the series attribute
    ({"Laterality": None, "BodyPartExamined": "ABDOMEN"}, None),  # unpaired: absent
])
def test_series_laterality_is_r_or_l_else_empty_or_absent(tmp_path: Path, attributes: dict[str, str | None],
                                                          expected: str | None) -> None:
    """Before: ImageLaterality B became the state's Laterality (not an enumerated value) and an abdomen got an
    empty one (dciodvfy: "should be absent (not empty) if an unpaired body part")."""
    study = shipped_study(tmp_path, "MR_small.dcm")
    image = study.sources[0]
    for keyword, value in attributes.items():
        if value is None:
            delattr(image, keyword)
        else:
            setattr(image, keyword, value)
    _write(image, _image_path(study, image))  # the source on file as the state's source (dciodvfy baseline)
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50)))
    path = _write(state, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert set(new_dciodvfy_warnings(path, study)) <= ({UNKNOWN_SIDE} if expected == "" else set())
    ds = pydicom.dcmread(path)
    assert ds.get("Laterality") == expected
    assert ds.get("BodyPartExamined") == attributes.get("BodyPartExamined")


@pytest.mark.parametrize(("name", "frame"), [
    ("examples_rgb_color.dcm", None), ("examples_ybr_color.dcm", 2), ("SC_rgb_rle.dcm", None)])
def test_colour_images_get_a_colour_softcopy_presentation_state(tmp_path: Path, name: str,
                                                                 frame: int | None) -> None:
    """Before: a finding on an RGB/YBR image raised "a grayscale presentation state needs SamplesPerPixel 1"."""
    study = shipped_study(tmp_path, name)
    image = study.sources[0]
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50),
                                      frame_number=frame))
    path = _write(state, tmp_path / "csps.dcm")
    assert dciodvfy(path) == []
    assert set(new_dciodvfy_warnings(path, study)) <= {UNKNOWN_SIDE}
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == COLOR_PS_STORAGE
    assert "SoftcopyVOILUTSequence" not in ds and "PresentationLUTShape" not in ds
    profile = bytes(ds.ICCProfile)
    assert profile[12:16] == b"scnr" and profile[16:20] == b"RGB "  # an input profile (PS3.3 C.11.15.1.1)
    [annotation] = ds.GraphicAnnotationSequence
    [reference] = annotation.ReferencedImageSequence
    assert reference.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert reference.get("ReferencedFrameNumber") == frame
    assert [r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedImageSequence] == [
        image.SOPInstanceUID]


def test_a_colour_image_keeps_its_own_icc_profile(tmp_path: Path) -> None:
    """Its own profile (pydicom's crayons.icc, a display profile) as an input profile: header class only."""
    study = shipped_study(tmp_path, "SC_rgb_rle.dcm")
    image = study.sources[0]
    own = (PYDICOM_TEST_FILES / "crayons.icc").read_bytes()
    assert own[12:16] == b"mntr"
    image.ICCProfile = own
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50)))
    profile = bytes(state.ICCProfile)
    assert profile[:12] == own[:12] and profile[12:16] == b"scnr" and profile[16:84] == own[16:84]
    assert profile[84:100] == bytes(16) and profile[100:] == own[100:]


def test_a_palette_colour_image_gets_no_state_and_the_reason_is_in_outputs_json(tmp_path: Path) -> None:
    """Before: PALETTE COLOR (SamplesPerPixel 1) got a grayscale state, which dcmtk showed grey."""
    study = shipped_study(tmp_path, "examples_palette.dcm")
    image = study.sources[0]
    result = result_for(study, [Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50))])
    states, [reason] = build_presentation_state_set(study.inputs(result))
    assert states == []
    assert "PALETTE COLOR" in reason and str(image.SOPInstanceUID) in reason
    entries, problems = write_outputs(tmp_path / "outbox", study.manifest, result, study.sources,
                                      OutputProblem("hl7", "skipped", "no order number"))
    assert OutputProblem("gsps", "skipped", reason) in problems
    assert not [entry for entry in entries if entry.kind == "gsps"]
    assert {"sr", "narrative"} <= {entry.kind for entry in entries}
    folder = entries[0].path.parent
    assert OutputProblem("gsps", "skipped", reason) in read_problems(folder)
    document = json.loads((folder / "outputs.json").read_text(encoding="utf-8"))
    assert "gsps" not in document["built"]
    assert str(study.manifest.study.patient_name) not in json.dumps(document)


def test_an_image_with_only_a_voi_lut_keeps_its_first_lut(tmp_path: Path) -> None:
    """MR_small with a 12-bit inverting VOI LUT (two of them) instead of its window: the state holds the first LUT,
    as 16 bits (a presentation state allows 8 or 16), and dcmtk renders through it. Before: the image's LUTs were
    copied as they were (and a multi-frame image's were replaced by the full range)."""
    study = shipped_study(tmp_path, "MR_small.dcm")
    image = study.sources[0]
    del image.WindowCenter, image.WindowWidth
    luts = []
    for explanation, data in (("INVERT", 4095 - np.arange(4096)), ("FLAT", np.full(4096, 2048))):
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTExplanation = explanation
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())
        luts.append(item)
    image.VOILUTSequence = luts
    _write(image, _image_path(study, image))
    state = _one_state(study, Finding(label="mass", sop_instance_uid=image.SOPInstanceUID, box=(5, 6, 40, 50)))
    path = _write(state, tmp_path / "gsps.dcm")
    assert dciodvfy(path) == []
    assert new_dciodvfy_warnings(path, study) == []
    [voi] = pydicom.dcmread(path).SoftcopyVOILUTSequence
    [lut] = voi.VOILUTSequence
    assert list(lut.LUTDescriptor) == [4096, 0, 16] and lut.LUTExplanation == "INVERT"
    assert "WindowCenter" not in voi
    rc, log, out = _dcmp2pgm(path, _image_path(study, image), tmp_path)
    assert rc == 0, log
    expected = (4095 - np.clip(image.pixel_array.astype(np.float64), 0, 4095)) / 4095 * 255
    np.testing.assert_allclose(np.asarray(Image.open(out), dtype=np.float64), expected, atol=1.0)
