"""Image preparation: decoding every shipped transfer syntax, windows, MONOCHROME1, letterbox geometry."""

import copy
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import UID

from model.imaging import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    Letterbox,
    NotAnImageError,
    display_values,
    prepare_display,
    prepare_image,
)
from model.phantoms import generate_study, study_rng

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# shipped on purpose as broken or not radiology images; everything else with grayscale pixels must decode
KNOWN_BAD = {"JPEG2000-embedded-sequence-delimiter.dcm", "MR_truncated.dcm", "badVR.dcm"}


def _read(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(TEST_FILES / name)


def _compressed_grayscale_files():
    found = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        if path.name in KNOWN_BAD:
            continue
        try:
            ds = _read(path.name)
        except Exception:
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if ("PixelData" in ds and syntax is not None and UID(syntax).is_compressed
                and ds.get("Modality") != "RTDOSE"):  # dose grids are refused as non-images (tested below)
            found.append(path.name)
    return found


COMPRESSED = _compressed_grayscale_files()


def test_the_shipped_test_files_cover_the_compressed_syntaxes():
    syntaxes = {UID(_read(name).file_meta.TransferSyntaxUID).name for name in COMPRESSED}
    assert {"RLE Lossless", "JPEG-LS Lossless Image Compression", "JPEG 2000 Image Compression (Lossless Only)",
            "JPEG Baseline (Process 1)", "JPEG Extended (Process 2 and 4)"} <= syntaxes


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_transfer_syntaxes_decode(name):
    prepared = prepare_image(_read(name), 64)
    assert prepared.pixels.shape == (3, 64, 64)
    assert prepared.pixels.dtype == np.float32
    assert prepared.display.min() >= 0.0 and prepared.display.max() <= 1.0
    assert prepared.display.max() > prepared.display.min()


def test_compressed_and_uncompressed_give_the_same_display():
    plain = display_values(_read("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_allclose(display_values(_read(name)), plain, atol=1e-6)


def test_undecodable_pixels_name_the_transfer_syntax():
    ds = _read("JPEG2000-embedded-sequence-delimiter.dcm")
    with pytest.raises(ImageDecodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.91 \(JPEG 2000 Image Compression\)"):
        prepare_image(ds, 32)
    ds = _read("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    with pytest.raises(ImageDecodeError, match=r"MPEG2 Main Profile / Main Level\) has no pixel data decoder"):
        prepare_image(ds, 32)


@pytest.mark.parametrize(("name", "sop_class"), [("test-SR.dcm", "Comprehensive SR Storage"),
                                                 ("rtplan.dcm", "RT Plan Storage"),
                                                 ("liver_1frame.dcm", "Segmentation Storage"),
                                                 ("rtdose_rle.dcm", "RT Dose Storage")])
def test_non_image_sop_classes_are_refused(name, sop_class):
    with pytest.raises(NotAnImageError, match=rf"\({sop_class}\).*not an image"):
        prepare_image(_read(name), 32)


def test_ct_rescale_and_windows():
    ds = _read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    shown = display_values(ds)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.all(shown[hu <= 40 - 200] == 0.0) and np.all(shown[hu >= 40 + 200] == 1.0)
    del ds.WindowCenter, ds.WindowWidth
    ds.BodyPartExamined = "CHEST"  # no window in the dataset: the lung window default
    lung = display_values(ds)
    np.testing.assert_allclose(lung, display_values(ds, window=(-600, 1500)))
    ds.BodyPartExamined = "ABDOMEN"
    np.testing.assert_allclose(display_values(ds), display_values(ds, window=(40, 400)))


def test_monochrome1_is_inverted():
    study = next(generate_study(study_rng(3, i), "CR") for i in range(20)
                 if generate_study(study_rng(3, i), "CR").datasets[0].PhotometricInterpretation == "MONOCHROME1")
    ds = study.datasets[0]
    as_mono2 = copy.deepcopy(ds)
    as_mono2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(display_values(ds), 1.0 - display_values(as_mono2), atol=1e-6)


def test_normalisation_and_letterbox_of_a_non_square_image():
    display = np.ones((300, 600), dtype=np.float32)
    prepared = prepare_display(display, 224)
    t = prepared.transform
    assert (t.resized_cols, t.resized_rows, t.pad_x, t.pad_y) == (224, 112, 0, 56)
    white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    black = -np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(prepared.pixels[:, 112, 112], white, rtol=1e-5)
    np.testing.assert_allclose(prepared.pixels[:, 10, 112], black, rtol=1e-5)  # padding above the image


def test_box_round_trip_source_grid_source_stays_within_one_grid_cell():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, cols = (int(v) for v in rng.integers(50, 1500, size=2))
        t = Letterbox(rows, cols, int(rng.choice([224, 448])))
        x1, x2 = sorted(rng.uniform(0, cols, size=2))
        y1, y2 = sorted(rng.uniform(0, rows, size=2))
        grid = t.source_to_grid((x1, y1, x2, y2))
        back = t.grid_to_source(grid)
        cell_x = cols / t.resized_cols * t.model_size / 100  # source pixels per grid cell
        cell_y = rows / t.resized_rows * t.model_size / 100
        for got, want, cell in zip(back, (x1, y1, x2, y2), (cell_x, cell_y, cell_x, cell_y), strict=True):
            assert abs(got - want) <= cell, (rows, cols, grid)


def test_grid_corners_map_to_the_image_corners():
    t = Letterbox(800, 400, 448)  # tall: padded left and right
    assert t.source_to_grid((0, 0, 400, 800)) == (25, 0, 75, 100)
    assert t.grid_to_source((25, 0, 75, 100)) == pytest.approx((0.0, 0.0, 400.0, 800.0))
    assert t.grid_to_source((0, 0, 100, 100)) == pytest.approx((0.0, 0.0, 400.0, 800.0))  # clipped to the image
    with pytest.raises(ValueError, match=r"source box .* exceeds the image of 400 columns x 800 rows"):
        t.source_to_grid((0, 0, 401, 10))
    with pytest.raises(ValueError, match="grid box"):
        t.grid_to_source((10, 10, 5, 20))


def test_phantom_truth_box_survives_the_trip_through_the_model_grid():
    for index in range(10):
        study = generate_study(study_rng(8, index), "DX")
        prepared = prepare_image(study.datasets[0], 448)
        for finding in study.findings:
            grid = prepared.transform.source_to_grid(finding.box)
            back = prepared.transform.grid_to_source(grid)
            cell = max(study.datasets[0].Rows, study.datasets[0].Columns) / 100
            assert max(abs(a - b) for a, b in zip(back, finding.box, strict=True)) <= cell
