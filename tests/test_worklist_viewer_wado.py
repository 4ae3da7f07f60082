"""The worklist's WADO-RS (worklist/wado.py) over real files: pydicom's own test files (uncompressed, RLE, JPEG-LS,
a two-frame RGB RLE image) in a real spool, served by the worklist app on a real loopback server.

Frames must be byte-exact against pydicom's decoded pixel array; sign-in, the entry's study and its manifest bound
what is served.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES
from pydicom.uid import generate_uid
from worklist_helpers import Client, settings_for, spool_study, write_draft

from worklist import auth
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import RunningServer
from worklist.storage import Store

# (file, transfer syntax it is stored in)
REAL_FILES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian, signed 16-bit
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "SC_rgb_rle_2frame.dcm": "1.2.840.10008.1.2.5",  # RLE, RGB, two frames
}


def real_files_study() -> list[pydicom.Dataset]:
    """pydicom's real files as the instances of one study, each in a series of its own (two of them are the same
    MR slice in two transfer syntaxes, with the same UIDs), their pixel data untouched."""
    study_uid = generate_uid()
    datasets = []
    for name, syntax in REAL_FILES.items():
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
        assert ds.file_meta.TransferSyntaxUID == syntax
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    return datasets


@pytest.fixture
def wado(tmp_path):
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'worklist.sqlite'}")
    store = Store.from_settings(settings)
    try:
        store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                       organization="IR", now=datetime.now(UTC))
        bridge = Bridge(settings, store)
        datasets = real_files_study()
        entry = bridge.register_draft(*spool_study(settings, datasets))
        foreign = write_draft(settings, accession="ACC-OTHER", episode_id=1)  # another entry's study (a CR)
        bridge.register_draft(foreign.manifest_path, foreign.result_path)
        with RunningServer(WorklistApp(bridge)) as server:
            client = Client(server)
            client.login()
            yield server, client, entry, datasets, foreign
    finally:
        store.close()


def _series_path(ds: pydicom.Dataset) -> str:
    return f"/wado/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


def _frames_path(ds: pydicom.Dataset, frames: str) -> str:
    return f"{_series_path(ds)}/instances/{ds.SOPInstanceUID}/frames/{frames}"


def _parts(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """The parts of a multipart/related body: (media type, transfer-syntax parameter, payload), read with the
    standard library's MIME parser."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert message.is_multipart()
    return [(part.get_content_type(), part.get_param("transfer-syntax"), part.get_payload(decode=True))
            for part in message.iter_parts()]


def _decoded(name: str, frame: int) -> bytes:
    """pydicom's decoded pixel array of frame *frame* (0-based) of a real file, as little-endian bytes."""
    array = pydicom.dcmread(PYDICOM_TEST_FILES / name).pixel_array
    frames = int(pydicom.dcmread(PYDICOM_TEST_FILES / name, stop_before_pixels=True).get("NumberOfFrames") or 1)
    one = array[frame] if frames > 1 else array
    return np.ascontiguousarray(one, dtype=one.dtype.newbyteorder("<")).tobytes()


def test_unsigned_requests_get_401_not_the_images(wado):
    server, _, _, datasets, _ = wado
    anonymous = Client(server)
    for path in (f"{_series_path(datasets[0])}/metadata", _frames_path(datasets[0], "1")):
        response, data, _ = anonymous.request("GET", path)
        assert response.status == 401
        assert json.loads(data) == {"error": "sign in first"}
    response, _, _ = anonymous.request("GET", "/wado/studies/1.2.3/series/4.5.6/metadata")
    assert response.status == 401  # no hint of which studies exist before sign-in


def test_what_is_not_in_the_entrys_study_is_404(wado):
    _, client, _, datasets, foreign = wado
    ct = datasets[0]
    other = foreign.phantom.datasets[0]
    cases = {
        "/wado/studies/1.2.3.999/series/1.2.3/metadata": "study 1.2.3.999 is not on the worklist",
        f"/wado/studies/{ct.StudyInstanceUID}/series/{other.SeriesInstanceUID}/metadata":
            f"series {other.SeriesInstanceUID} is not in study {ct.StudyInstanceUID}",
        # an instance of the other entry's study, asked for under this study's series
        f"{_series_path(ct)}/instances/{other.SOPInstanceUID}/frames/1":
            f"instance {other.SOPInstanceUID} is not in series {ct.SeriesInstanceUID}",
        # an instance of this study, under another of its series
        f"{_series_path(datasets[1])}/instances/{ct.SOPInstanceUID}/frames/1":
            f"instance {ct.SOPInstanceUID} is not in series {datasets[1].SeriesInstanceUID}",
        _frames_path(ct, "2"): f"frame 2 is not in instance {ct.SOPInstanceUID} (frames 1..1)",
    }
    for path, error in cases.items():
        response, data, _ = client.request("GET", path)
        assert (response.status, json.loads(data)) == (404, {"error": error}), path
    for bad in ("0x1", "1,,2", ",".join(["1"] * 65)):
        response, data, _ = client.request("GET", _frames_path(ct, quote(bad)))
        assert response.status == 400, bad
        assert "comma-separated list of 1 to 64 frame numbers" in json.loads(data)["error"]
    response, data, _ = client.request("GET", _frames_path(ct, "1"), headers={"Accept": "image/jpeg"})
    assert response.status == 406


def test_series_metadata_is_dicom_json_without_bulk_data(wado):
    _, client, _, datasets, _ = wado
    for ds in datasets:
        response, data, _ = client.request("GET", f"{_series_path(ds)}/metadata")
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/dicom+json"
        (instance,) = json.loads(data)
        assert instance["00080018"] == {"vr": "UI", "Value": [ds.SOPInstanceUID]}
        assert instance["0020000D"] == {"vr": "UI", "Value": [ds.StudyInstanceUID]}
        assert instance["0020000E"] == {"vr": "UI", "Value": [ds.SeriesInstanceUID]}
        assert instance["00280010"] == {"vr": "US", "Value": [ds.Rows]}
        assert instance["00280011"] == {"vr": "US", "Value": [ds.Columns]}
        assert instance["00280100"] == {"vr": "US", "Value": [ds.BitsAllocated]}
        assert instance["00280103"] == {"vr": "US", "Value": [ds.PixelRepresentation]}
        assert instance["00083002"] == {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]}  # how the frames come
        assert "7FE00010" not in instance  # no pixel data, no bulk data URI
        assert not any(v.get("InlineBinary") and len(v["InlineBinary"]) > 1400 for v in instance.values())
    ct = json.loads(client.request("GET", f"{_series_path(datasets[0])}/metadata")[1])[0]
    assert ct["00281052"] == {"vr": "DS", "Value": [float(datasets[0].RescaleIntercept)]}
    assert ct["00200032"]["Value"] == [float(v) for v in datasets[0].ImagePositionPatient]
    rgb = json.loads(client.request("GET", f"{_series_path(datasets[3])}/metadata")[1])[0]
    assert rgb["00280004"] == {"vr": "CS", "Value": ["RGB"]}
    assert rgb["00280006"] == {"vr": "US", "Value": [0]}  # interleaved, as the frames are sent
    assert rgb["00280008"]["Value"] == [2]


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_frames_are_byte_exact_against_pydicoms_decoded_pixels(wado, name):
    _, client, _, datasets, _ = wado
    ds = datasets[list(REAL_FILES).index(name)]
    frames = int(ds.get("NumberOfFrames") or 1)
    numbers = ",".join(str(n) for n in range(1, frames + 1))
    response, data, _ = client.request("GET", _frames_path(ds, numbers),
                                       headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert response.status == 200, data[:200]
    content_type = response.headers["Content-Type"]
    assert re.fullmatch(r'multipart/related; type="application/octet-stream"; boundary=[0-9a-f]{32}', content_type)
    parts = _parts(content_type, data)
    assert [(kind, syntax) for kind, syntax, _ in parts] == [("application/octet-stream", "1.2.840.10008.1.2.1")
                                                             ] * frames
    for index, (_, _, payload) in enumerate(parts):
        assert payload == _decoded(name, index), f"frame {index + 1} of {name}"
    if REAL_FILES[name] == "1.2.840.10008.1.2.1":  # uncompressed: the stored bytes themselves
        assert parts[0][2] == pydicom.dcmread(PYDICOM_TEST_FILES / name).PixelData
