"""Decompression bombs: a small, valid file whose header announces a huge image is never decoded.

Before: a valid 13 MB RLE instance decoding to 30000 x 30000 was stored, then the prepare stage decoded it,
ran out of memory and took the whole gateway down, again at every restart. Now the decoded size (rows x columns x
frames x samples x bytes) is worked out from the header before any decode: the gate keeps the image out of the
analysis with that reason, and the other decode sites (the report's overlay and GSPS, the worklist's PNG) refuse
it too. The bomb here is a real RLE Lossless file (one PackBits segment of zero runs) that pydicom would decode.
"""

from __future__ import annotations

import struct
import tracemalloc

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless
from test_pipeline_gate import _prepared

from core.layout import manifest_path
from core.manifest import StudyManifest
from dicom_node.index import Index
from model import decoders
from model.imaging import ImageDecodeError, decode_frame
from reporting.overlay import frame_values
from state.store import StateStore
from workers import pipeline
from workers.prepare import build_manifest
from worklist import wado

SIDE = 30000


def rle_zeros(rows: int, columns: int) -> bytes:
    """One RLE Lossless frame of 8-bit zeros: a 64-byte header with one segment, then runs of 128 (PackBits -127)."""
    count = rows * columns
    runs = b"\x81\x00" * (count // 128)
    rest = count % 128
    if rest:
        runs += bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00"
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return header + runs


def make_bomb(path) -> None:
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = encapsulate([rle_zeros(SIDE, SIDE)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(path)


def test_a_bomb_is_kept_out_of_the_analysis_from_its_header_alone(tmp_path):
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    path = settings.spool_dir / "CT_small.dcm"
    make_bomb(path)
    store = StateStore(settings.index_path)
    index = Index(store)
    try:  # the manifest as prepare writes it from the bomb's header
        build_manifest(settings.spool_dir, study, 1, index.instances_for_episode(study, 1)).write(
            manifest_path(settings.home, study, 1))
    finally:
        store.close()
    assert path.stat().st_size < 16 * 2**20  # 900 MB of pixels in a 14 MB file
    tracemalloc.start()
    try:
        with pytest.raises(pipeline.NotAnalysedError) as refused:
            pipeline.prepare_request(settings, study, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "a frame would decode to 858 MiB, over max_decoded_mb 256" in str(refused.value)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB while refusing the bomb"

    image = pydicom.dcmread(path)
    with pytest.raises(ImageDecodeError, match="decoding would take 858 MiB"):
        decode_frame(image)
    with pytest.raises(decoders.DecodedTooLargeError):
        frame_values(image, None)  # the report's overlay and GSPS window
    (_, instance), = StudyManifest.read(manifest_path(settings.home, study, 1)).instances()
    with pytest.raises(wado.WadoUnavailableError, match="RADDRAFT_MAX_DECODED_MB"):
        wado.frames(settings.spool_dir, instance, "1")  # the worklist viewer's frames (WADO-RS)


def test_the_limit_is_a_setting(tmp_path):
    settings, study = _prepared(tmp_path, ["CT_small.dcm"])
    strict = settings.model_copy(update={"max_decoded_mb": 0.1})  # CT_small: 128 x 128 x 2 bytes = 32 KiB
    assert pipeline.prepare_request(settings, study, 1).images
    with pytest.raises(pipeline.NotAnalysedError, match="over max_decoded_mb 0"):
        pipeline.prepare_request(strict.model_copy(update={"max_decoded_mb": 0.01}), study, 1)
    assert decoders.decoded_size(512, 512, 3, 1, 16) == 512 * 512 * 3 * 2
