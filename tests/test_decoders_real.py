"""Real compressed files, one or more per transfer syntax a PACS sends, through raddraft's own decode path.

The files are the ones pydicom ships (no download). Each decodes through :func:`model.imaging.decode_frame`, the
function the prepare stage reads pixels with, to the expected shape and either the values of its uncompressed (or
losslessly compressed) twin or a recorded checksum. Checksums hold for the plugin versions pinned in
constraints.txt; a lossy JPEG may decode a grey level apart with another libjpeg. The last test fails when a
dependency change makes a file undecodable that decodes today.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGExtended12Bit

from model import decoders
from model.imaging import ImageDecodeError, NotAnImageError, decode_frame

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(TEST_FILES / name)


def _decode(name: str, frame: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_frame(_read(name), frame)[0]


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


# file, transfer syntax, shape, dtype, sha256 (first 16 hex digits) of the decoded first frame
CHECKSUMS = [
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", (100, 100, 3), "uint8", "ddb100d8f45a7fbf"),
    ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50", (240, 320, 3), "uint8", "91535e129c01109b"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", (1024, 256), "uint16", "b1d76492f77a12c5"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", (1024, 256), "uint16", "d30242775a414c01"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", (100, 100, 3), "uint8", "169e619557b12114"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81", (45, 10), "uint8", "9eb46aa86c342094"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", (50, 10), "uint16", "f929318278115ce9"),
    ("SC_rgb_jls_lossy_line.dcm", "1.2.840.10008.1.2.4.81", (100, 100, 3), "uint8", "bd5344c0a46bc6c0"),
    ("GDCMJ2K_TextGBR.dcm", "1.2.840.10008.1.2.4.90", (400, 400, 3), "uint8", "bea5673fdd49313f"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", (1024, 256), "int16", "0b1224a6dcd0dceb"),
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91", (512, 512), "int16", "f249f833d5e3cbc3"),
    ("SC_rgb_rle_16bit.dcm", "1.2.840.10008.1.2.5", (100, 100, 3), "uint16", "36de0258708d3af7"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", (512, 512), "uint8", "1f5f1b1c1a57606a"),
]


@pytest.mark.parametrize(("name", "syntax", "shape", "dtype", "sha"), CHECKSUMS, ids=[c[0] for c in CHECKSUMS])
def test_a_real_file_decodes_to_its_recorded_pixels(name, syntax, shape, dtype, sha):
    assert _read(name).file_meta.TransferSyntaxUID == syntax
    pixels = _decode(name)
    assert (pixels.shape, str(pixels.dtype)) == (shape, dtype)
    assert _sha(pixels) == sha


# compressed file, its uncompressed or losslessly compressed twin, the largest difference allowed
TWINS = [
    ("MR_small_RLE.dcm", "MR_small.dcm", 0),  # RLE Lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),  # JPEG-LS Lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),  # JPEG 2000 Lossless
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # RLE vs JPEG Lossless SV1, both lossless
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0),  # JPEG 2000 (lossy syntax, reversible wavelet)
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 2),  # JPEG-LS near-lossless: NEAR = 2
    ("SC_rgb_jls_lossy_sample.dcm", "SC_rgb_rle.dcm", 2),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 4),  # JPEG Baseline, YBR_FULL, odd size
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 6),  # JPEG Baseline, YBR_FULL
    ("JPEG-lossy.dcm", "JPGExtended.dcm", 1),  # the same 12-bit JPEG, GDCM vs libjpeg (IDCT rounding)
]


@pytest.mark.parametrize(("name", "twin", "tolerance"), TWINS, ids=[t[0] for t in TWINS])
def test_a_compressed_file_equals_its_twin(name, twin, tolerance):
    pixels, reference = _decode(name), _decode(twin)
    assert pixels.shape == reference.shape
    assert int(np.abs(pixels.astype(np.int64) - reference.astype(np.int64)).max()) <= tolerance


def test_every_frame_of_a_multi_frame_rle_file_decodes():
    assert _read("SC_rgb_rle_2frame.dcm").NumberOfFrames == 2
    single = _decode("SC_rgb_rle.dcm")
    np.testing.assert_array_equal(_decode("SC_rgb_rle_2frame.dcm", 0), single)
    np.testing.assert_array_equal(_decode("SC_rgb_rle_2frame.dcm", 1), 255 - single)  # frame 2 is the inverse


def test_gdcm_decodes_the_12_bit_jpeg_that_libjpeg_rejects():
    ds = _read("JPEG-lossy.dcm")
    decoder = get_decoder(JPEGExtended12Bit)
    with pytest.raises(RuntimeError, match="libjpeg error"):
        decoder.as_array(ds, decoding_plugin="pylibjpeg")
    # its fixed twin decoded by the same GDCM gives the same pixels (both equal DCMTK's dcmdjpeg output)
    fixed, _ = decoder.as_array(_read("JPGExtended.dcm"), decoding_plugin=decoders.GDCM_12BIT_PLUGIN)
    np.testing.assert_array_equal(_decode("JPEG-lossy.dcm"), fixed)


def test_pydicoms_in_process_gdcm_plugin_is_not_used():
    for syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, UID("1.2.840.10008.1.2.4.90")):
        assert "gdcm" not in get_decoder(syntax).available_plugins
    assert decoders.GDCM_12BIT_PLUGIN in get_decoder(JPEGExtended12Bit).available_plugins


def _corrupt_jpeg_header(name: str) -> pydicom.Dataset:
    """*name* with its frame's SOF sample precision set to 33 bits (GDCM's in-process codec segfaults on it)."""
    from pydicom.encaps import encapsulate, generate_frames  # noqa: PLC0415

    ds = _read(name)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = next(i for i in range(len(frame) - 1) if frame[i] == 0xFF and frame[i + 1] in (0xC0, 0xC1))
    frame[sof + 4] = 33
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


@pytest.mark.parametrize(("name", "reasons"), [
    ("SC_rgb_jpeg_dcmtk.dcm", r"pylibjpeg: libjpeg error .* frame precision in baseline mode must be 8"),
    # GDCM, the last 12-bit plugin, segfaults on it in its child process: a reason, and this process lives on
    ("JPGExtended.dcm", r"pylibjpeg: libjpeg error .*\n.*gdcm-12bit: GDCM crashed \(SIGSEGV\) on the frame"),
])
def test_a_corrupt_jpeg_is_a_decoder_error_not_a_crash(name, reasons):
    with pytest.raises(ImageDecodeError, match=r"(?s)cannot be decoded: .*" + reasons):
        decode_frame(_corrupt_jpeg_header(name))


@pytest.mark.parametrize(("name", "reason"), [
    ("MR_truncated.dcm", r"Explicit VR Little Endian\) cannot be decoded: The number of bytes of pixel data is less"),
    ("JPEG2000-embedded-sequence-delimiter.dcm",
     r"(?s)JPEG 2000 Image Compression\) cannot be decoded: .*pylibjpeg: Error decoding the J2K data"),
])
def test_deliberately_corrupt_files_end_in_a_decoder_error(name, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        _decode(name)


def test_a_number_of_frames_that_is_not_a_number_is_a_decoder_error():
    ds = _read("badVR.dcm")  # an RT dose grid with Number of Frames "1A", made an MR image here
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.4")
    with pytest.raises(ImageDecodeError, match=r"Number of Frames \(0028,0008\) is not an integer: .*'1A'"):
        decode_frame(ds)


# every file pydicom ships whose pixels decode today; a plugin dropped from the dependencies shrinks this set
DECODABLE = {
    "693_J2KI.dcm", "CT_small.dcm", "ExplVR_BigEnd.dcm", "GDCMJ2K_TextGBR.dcm", "J2K_pixelrep_mismatch.dcm",
    "JPEG-lossy.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "JPGExtended.dcm",
    "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm",
    "SC_jpeg_no_color_transform.dcm", "SC_jpeg_no_color_transform_2.dcm", "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm", "SC_rgb_jpeg.dcm", "SC_rgb_jpeg_app14_dcmd.dcm", "SC_rgb_jpeg_dcmd.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_32bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm",
    "SC_rgb_small_odd_jpeg.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_jpeg2k.dcm", "examples_overlay.dcm",
    "examples_palette.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "image_dfl.dcm",
}
# pixel data that is not to be decoded: broken on purpose, or not an image for reading (RT dose, segmentation)
UNDECODABLE = {
    "JPEG2000-embedded-sequence-delimiter.dcm": ImageDecodeError, "MR_truncated.dcm": ImageDecodeError,
    "meta_missing_tsyntax.dcm": ImageDecodeError, "nested_priv_SQ.dcm": ImageDecodeError,
    "badVR.dcm": NotAnImageError, "liver_1frame.dcm": NotAnImageError, "liver_expb_1frame.dcm": NotAnImageError,
    "rtdose.dcm": NotAnImageError, "rtdose_1frame.dcm": NotAnImageError, "rtdose_expb.dcm": NotAnImageError,
    "rtdose_expb_1frame.dcm": NotAnImageError, "rtdose_rle.dcm": NotAnImageError,
    "rtdose_rle_1frame.dcm": NotAnImageError,
}


def test_the_decodable_set_of_pydicoms_files_does_not_shrink():
    decoded, refused = set(), {}
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = _read(path.name)
        except Exception:  # not a DICOM file pydicom can read at all
            continue
        if "PixelData" not in ds:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decode_frame(ds)
        except (ImageDecodeError, NotAnImageError) as exc:
            refused[path.name] = type(exc)
        else:
            decoded.add(path.name)
    assert DECODABLE - decoded == set(), f"no longer decoded: {sorted(DECODABLE - decoded)}"
    assert set(refused) <= set(UNDECODABLE), f"refused, not known to be bad: {sorted(set(refused) - set(UNDECODABLE))}"
    assert {name: UNDECODABLE[name] for name in refused} == refused
