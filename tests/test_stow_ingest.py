"""DICOMweb ingest (issue 20): STOW-RS on the gateway's HTTP port, on loopback sockets.

Senders: ``dicomweb-client`` (Content-Length bodies, and chunked ones above its chunk size), raw HTTP for the bad
inputs (truncated instance, broken multipart, a client that goes away mid-body), Orthanc's DICOMweb plugin
pushing a study, and ``raddraft serve`` itself (the wiring in front of the worklist).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from node_helpers import PYDICOM_TEST_FILES, Serve, make_ct, node_settings, wait_for
from pydicom.uid import generate_uid

from core.http import Mounts
from core.settings import Settings, StowSource, load_settings, read_stow_tokens_file
from dicom_node.index import Index
from dicom_node.receive import InstanceReceiver
from dicom_node.spool import Spool
from dicom_node.statuses import StowFailureReason
from dicom_node.stow import STOW_PREFIX, MultipartSplitter, RequestBody, StowApp, bearer_token
from peers import Orthanc
from state.store import StateStore
from worklist.server import RunningServer

SOURCE = "pacs"
TOKEN = "stow-token-0123456789abcdef"
OTHER_SOURCE, OTHER_TOKEN = "modality", "another-token-abcdefghij"
BOUNDARY = "raddraft-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
# distinct SOP Instance UIDs and studies, uncompressed and compressed
FILES = ["CT_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def not_found(environ, start_response):
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"the worklist would answer here"]


@dataclass
class Gateway:
    settings: Settings
    spool: Spool
    store: StateStore
    index: Index
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, token: str | None = TOKEN) -> DICOMwebClient:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        return DICOMwebClient(url=f"{self.url}/dicomweb", headers=headers)

    def post(self, body: bytes, *, path: str = "/dicomweb/studies", token: str | None = TOKEN,
             content_type: str = MULTIPART) -> requests.Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + path, data=body, headers=headers, timeout=60)

    def stow_files(self) -> list[Path]:
        return [p for p in self.spool.tmp_dir.iterdir()]

    def dcm_files(self) -> list[Path]:
        return sorted(p for p in self.spool.root.rglob("*.dcm"))


@contextmanager
def gateway(home: Path, **overrides: Any) -> Iterator[Gateway]:
    """A receiver with STOW-RS mounted in front of a stand-in worklist, on the worklist's own server class."""
    settings = node_settings(home, stow_sources=f"{SOURCE}:{TOKEN},{OTHER_SOURCE}:{OTHER_TOKEN}",
                             study_idle_seconds=3600, **overrides)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    store = StateStore(settings.index_path)
    index = Index(store)
    receiver = InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb)
    mounts = Mounts(not_found)
    mounts.mount(STOW_PREFIX, StowApp(receiver, settings.stow_credentials, settings.stow_max_request_bytes))
    try:
        with RunningServer(mounts, "127.0.0.1", 0) as server:
            yield Gateway(settings, spool, store, index, server.url)
    finally:
        store.close()


@pytest.fixture
def gw(tmp_path):
    with gateway(tmp_path / "home") as running:
        yield running


def multipart(*parts: bytes, boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    out = BytesIO()
    for data in parts:
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def encoded(ds: pydicom.Dataset) -> bytes:
    """*ds* as a DICOM Part 10 file (preamble, file meta with its group length)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def part10(ds: pydicom.Dataset) -> pydicom.Dataset:
    """*ds* read back from its Part 10 file: dicomweb-client's dcmwrite then writes the preamble and group length."""
    return pydicom.dcmread(BytesIO(encoded(ds)))


def failures(document: dict[str, Any]) -> dict[str, int]:
    """SOP Instance UID -> Failure Reason of a Store Instances Response (DICOM JSON)."""
    items = document.get("00081198", {}).get("Value", [])
    return {item["00081155"].get("Value", [""])[0]: item["00081197"]["Value"][0] for item in items}


def referenced(document: dict[str, Any]) -> set[str]:
    return {item["00081155"]["Value"][0] for item in document.get("00081199", {}).get("Value", [])}


def assert_stored_like_c_store(gw: Gateway, source: Path, calling_ae: str = SOURCE) -> None:
    """In the spool, in the index (with the source's name as calling AE) and in a receiving episode."""
    original = pydicom.dcmread(source, stop_before_pixels=True)
    record = gw.index.instance(original.SOPInstanceUID)
    assert record is not None, source.name
    stored = gw.spool.root / record.path
    assert stored.relative_to(gw.spool.root).parts == (
        original.StudyInstanceUID, original.SeriesInstanceUID, f"{original.SOPInstanceUID}.dcm")
    assert record.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert (record.calling_ae, record.peer_address) == (calling_ae, "127.0.0.1")
    assert record.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(source).PixelData
    episode = gw.store.episode(original.StudyInstanceUID, 1)
    assert episode is not None and episode.received >= 1


# --- dicomweb-client as the sender -----------------------------------------------------------------------------
def test_dicomweb_client_stores_real_files_durably_with_episodes(gw):
    sources = [PYDICOM_TEST_FILES / name for name in FILES]
    response = gw.client().store_instances([pydicom.dcmread(path) for path in sources])
    assert "FailedSOPSequence" not in response
    expected = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in sources}
    assert {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence} == expected
    for path in sources:
        assert_stored_like_c_store(gw, path)
    assert gw.index.count_instances() == len(sources)
    assert gw.stow_files() == []


def test_chunked_body_and_status_codes_through_dicomweb_client(gw):
    client = gw.client(OTHER_TOKEN)
    client.set_chunk_size(16 * 1024)  # dicomweb-client sends a larger body with Transfer-Encoding: chunked
    ct = PYDICOM_TEST_FILES / "CT_small.dcm"
    response = client.store_instances([pydicom.dcmread(ct)])
    assert len(response.ReferencedSOPSequence) == 1
    assert_stored_like_c_store(gw, ct, calling_ae=OTHER_SOURCE)
    # the same instance again: stored once, answered as stored
    assert len(client.store_instances([pydicom.dcmread(ct)]).ReferencedSOPSequence) == 1
    assert len(gw.dcm_files()) == 1


def test_instance_of_another_study_than_the_path_fails_alone(gw):
    study = generate_uid()
    mine, other = part10(make_ct(study)), part10(make_ct())
    with pytest.raises(requests.HTTPError) as refused:  # dicomweb-client raises for 4xx; 202 is partial success
        gw.client().store_instances([other], study_instance_uid=study)
    assert refused.value.response.status_code == 409
    response = gw.client().store_instances([mine, other], study_instance_uid=study)
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [mine.SOPInstanceUID]
    (failed,) = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == other.SOPInstanceUID
    assert failed.FailureReason == StowFailureReason.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert gw.index.instance(other.SOPInstanceUID) is None
    assert gw.index.instance(mine.SOPInstanceUID) is not None


def test_file_meta_that_does_not_match_the_data_set_is_refused_like_c_store(gw):
    good, bad = make_ct(), make_ct()
    bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    bad.preamble = bytes(128)
    bad.file_meta.FileMetaInformationGroupLength = 0  # written with its real value
    mismatched = BytesIO()
    bad.save_as(mismatched, enforce_file_format=False)  # as it is: True would correct the file meta
    response = gw.post(multipart(encoded(good), mismatched.getvalue()))
    assert response.status_code == 202
    assert failures(response.json()) == {bad.file_meta.MediaStorageSOPInstanceUID: 0xA900}


# --- bad input over raw HTTP -----------------------------------------------------------------------------------
def test_truncated_instance_among_good_ones_is_202_naming_it(gw):
    good = [(PYDICOM_TEST_FILES / name).read_bytes() for name in FILES[1:3]]
    whole = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    truncated_uid = str(pydicom.dcmread(BytesIO(whole), stop_before_pixels=True).SOPInstanceUID)
    response = gw.post(multipart(good[0], whole[:-100], good[1]))  # cut in the pixel data
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/dicom+json"
    document = response.json()
    assert failures(document) == {truncated_uid: StowFailureReason.CANNOT_UNDERSTAND}
    assert StowFailureReason.CANNOT_UNDERSTAND == 0xC000
    assert len(referenced(document)) == 2
    assert "00081190" in document  # Retrieve URL: present, empty (no WADO-RS here)
    assert gw.index.instance(truncated_uid) is None
    assert gw.index.count_instances() == 2
    assert gw.stow_files() == []


def test_a_part_without_preamble_or_complete_file_meta_cannot_be_understood(gw):
    ds = make_ct()  # no preamble and no group length (0002,0000): pydicom writes the file meta as it is
    raw = BytesIO()
    pydicom.dcmwrite(raw, ds)
    with_preamble = bytes(128) + b"DICM" + raw.getvalue()
    response = gw.post(multipart(raw.getvalue(), with_preamble))
    assert response.status_code == 409
    assert failures(response.json()) == {"": 0xC000, ds.SOPInstanceUID: 0xC000}
    assert gw.index.count_instances() == 0


def test_all_failed_is_409_and_garbage_parts_are_not_named(gw):
    response = gw.post(multipart(b"not dicom at all", b"\0" * 200))
    assert response.status_code == 409
    items = response.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in items] == [[0xC000], [0xC000]]
    assert all("Value" not in item["00081155"] for item in items)
    assert gw.index.count_instances() == 0


def test_oversize_instance_fails_with_out_of_resources(tmp_path):
    with gateway(tmp_path / "home", max_instance_mb=0.01, stow_max_request_mb=8) as gw:
        small, large = make_ct(), make_ct()
        large.PixelData = bytes(64 * 1024)
        large.Rows = large.Columns = 181  # not read: the part is refused on its size
        response = gw.post(multipart(encoded(small), encoded(large)))
        assert response.status_code == 202
        assert failures(response.json()) == {large.SOPInstanceUID: 0xA700}
        assert gw.index.instance(large.SOPInstanceUID) is None
        assert gw.stow_files() == []


def test_no_token_or_a_wrong_one_is_401_and_stores_nothing(gw, caplog):
    body = multipart((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes())
    for token, error in ((None, False), ("wrong-token-0123456789abc", True), (TOKEN + "x", True)):
        response = gw.post(body, token=token)
        assert response.status_code == 401
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ") and ('error="invalid_token"' in challenge) == error
    response = requests.post(gw.url + "/dicomweb/studies", data=body, timeout=30,
                             headers={"Content-Type": MULTIPART, "Authorization": f"Basic {TOKEN}"})
    assert response.status_code == 401
    with pytest.raises(requests.HTTPError) as refused:
        gw.client(token=None).store_instances([pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")])
    assert refused.value.response.status_code == 401
    assert gw.index.count_instances() == 0 and gw.dcm_files() == [] and gw.stow_files() == []
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text
    assert "refused: no bearer token" in caplog.text


def test_over_the_size_limit_is_413_and_stores_nothing(tmp_path):
    with gateway(tmp_path / "home", stow_max_request_mb=0.1) as gw:
        first = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
        big = make_ct()
        big.PixelData = bytes(200 * 1024)
        body = multipart(first, encoded(big))
        assert gw.post(body).status_code == 413  # Content-Length over the limit: refused before the body
        client = gw.client()
        client.set_chunk_size(8 * 1024)  # chunked: refused once the body passes the limit
        with pytest.raises(requests.HTTPError) as refused:
            client.store_instances([pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm"), big])
        assert refused.value.response.status_code == 413
        assert gw.index.count_instances() == 0 and gw.dcm_files() == []
        assert gw.stow_files() == []
        assert gw.post(multipart(first)).status_code == 200  # under it: stored


def test_wrong_content_type_is_415(gw):
    body = multipart((PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes())
    for content_type in ("application/dicom", "application/json", f"multipart/mixed; boundary={BOUNDARY}",
                         f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', ""):
        assert gw.post(body, content_type=content_type).status_code == 415, content_type
    assert gw.index.count_instances() == 0


def test_malformed_requests_are_400_and_store_nothing(gw):
    good = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    unclosed = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + good
    cases = {
        "no boundary parameter": (multipart(good), 'multipart/related; type="application/dicom"'),
        "boundary not in the body": (good, MULTIPART),
        "no closing boundary": (unclosed, MULTIPART),
        "no part": (f"--{BOUNDARY}--\r\n".encode(), MULTIPART),
    }
    for what, (body, content_type) in cases.items():
        assert gw.post(body, content_type=content_type).status_code == 400, what
    assert gw.post(multipart(good), path="/dicomweb/studies/not-a-uid").status_code == 400
    assert gw.index.count_instances() == 0 and gw.stow_files() == []


def test_other_paths_and_methods(gw):
    assert requests.get(gw.url + "/dicomweb/studies", timeout=10).status_code == 405
    assert requests.get(gw.url + "/dicomweb/studies", timeout=10).headers["Allow"] == "POST"
    assert gw.post(b"", path="/dicomweb/studies/1.2.3/series").status_code == 404
    assert requests.get(gw.url + "/dicomweb", timeout=10).status_code == 404
    assert requests.get(gw.url + "/other", timeout=10).text == "the worklist would answer here"
    request = urllib.request.Request(gw.url + "/dicomweb/studies", data=None, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": MULTIPART})
    with pytest.raises(urllib.error.HTTPError) as no_length:
        urllib.request.urlopen(request, timeout=10)
    assert no_length.value.code in (400, 411)


def test_client_that_disconnects_mid_body_leaves_nothing(gw, caplog):
    caplog.set_level(logging.INFO, logger="dicom_node.stow")
    first, second = ((PYDICOM_TEST_FILES / name).read_bytes() for name in FILES[:2])
    body = multipart(first, second)
    cut = len(body) - len(second) // 2  # the first part whole, the second half sent
    for chunked in (False, True):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
            sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"Content-Type: {MULTIPART}\r\n{length}\r\n\r\n").encode())
            sent = body[:cut]
            sock.sendall(f"{len(sent):x}\r\n".encode() + sent + b"\r\n" if chunked else sent)
            wait_for(gw.stow_files, timeout=10, what="part files being written")
        wait_for(lambda done=1 + chunked: caplog.text.count("ended early") == done, timeout=10, what="given up")
        wait_for(lambda: gw.stow_files() == [], timeout=10, what="part files removed")
    assert gw.index.count_instances() == 0 and gw.dcm_files() == []
    assert "nothing stored" in caplog.text


# --- the parts of the module ----------------------------------------------------------------------------------
def test_splitter_keeps_memory_bounded_and_content_exact(tmp_path):
    """Parts whose bytes look like the start of a delimiter, split across reads of every size."""
    payloads = [b"\r\n--" + BOUNDARY.encode()[:-1] + b"x" * 70_000, b"", b"\r\n" * 40_000 + b"--", os.urandom(150_000)]
    body = b"preamble\r\n" + multipart(*payloads) + b"epilogue"
    files: list[Path] = []

    def make_file():
        path = tmp_path / f"{len(files)}.part"
        files.append(path)
        return path.open("wb"), path

    class Trickle(BytesIO):  # returns at most 777 bytes a read, like a slow socket
        def read(self, size=-1):
            return super().read(min(size, 777))

    parts = MultipartSplitter(BOUNDARY.encode(), make_file, 10**9).split(
        RequestBody(Trickle(body), len(body), 10**9))  # type: ignore[arg-type]
    assert [part.path.read_bytes() for part in parts] == payloads
    assert [part.headers for part in parts] == [{"content-type": "application/dicom"}] * 4


def test_chunked_body_decoding():
    stream = BytesIO(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n")
    body = RequestBody(stream, None, 100)  # type: ignore[arg-type]
    assert b"".join(iter(lambda: body.read(4), b"")) == b"hello world"


def test_bearer_token_parsing():
    assert bearer_token(f"Bearer {TOKEN}") == TOKEN
    assert bearer_token(f"bearer   {TOKEN} ") == TOKEN
    assert bearer_token(f"Basic {TOKEN}") is None
    assert bearer_token("Bearer") is None and bearer_token("") is None


# --- settings --------------------------------------------------------------------------------------------------
def test_stow_settings_from_the_environment_and_a_tokens_file(tmp_path, monkeypatch):
    tokens = tmp_path / "stow-tokens"
    tokens.write_text(f"# DICOMweb sources\n\nviewer   {OTHER_TOKEN}\n")
    monkeypatch.setenv("RADDRAFT_STOW_SOURCES", f"{SOURCE}:{TOKEN}")
    monkeypatch.setenv("RADDRAFT_STOW_TOKENS_FILE", str(tokens))
    settings = load_settings(home=tmp_path)
    assert [source.name for source in settings.stow_credentials] == [SOURCE, "viewer"]
    assert settings.stow_credentials[1].token.get_secret_value() == OTHER_TOKEN
    assert TOKEN not in repr(settings) and OTHER_TOKEN not in repr(settings)
    assert settings.stow_max_request_bytes == 4 * settings.max_instance_bytes
    monkeypatch.delenv("RADDRAFT_STOW_SOURCES")
    monkeypatch.delenv("RADDRAFT_STOW_TOKENS_FILE")
    assert load_settings(home=tmp_path).stow_credentials == []
    assert load_settings(home=tmp_path, stow_max_request_mb=2).stow_max_request_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(("value", "message"), [
    ("pacs", "name:token"),
    ("pacs:short", "at least 16 characters"),
    (f"bad name:{TOKEN}", "must be 1-64 letters"),
    (f"pacs:{TOKEN},pacs:{OTHER_TOKEN}", "configured twice"),
    (f"pacs:{TOKEN},other:{TOKEN}", "the token of another source"),
])
def test_bad_stow_sources_are_named_without_the_token(tmp_path, value, message):
    with pytest.raises(ValueError, match=message) as refused:
        load_settings(home=tmp_path, stow_sources=value)
    assert TOKEN not in str(refused.value) and OTHER_TOKEN not in str(refused.value)


def test_bad_tokens_file_line_is_named_by_number(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"pacs {TOKEN}\nviewer {OTHER_TOKEN} extra\n")
    with pytest.raises(ValueError, match="line 2") as refused:
        read_stow_tokens_file(tokens)
    assert OTHER_TOKEN not in str(refused.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(home=tmp_path, stow_tokens_file=tmp_path / "missing")
    assert StowSource.parse(f"pacs:{TOKEN}:more").token.get_secret_value() == f"{TOKEN}:more"


# --- Orthanc's DICOMweb plugin as the sender -------------------------------------------------------------------
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancWithDicomWeb(Orthanc):
    """Orthanc with its DICOMweb plugin and raddraft declared as a DICOMweb server it can STOW to."""

    def __init__(self, workdir: Path, raddraft_url: str, token: str) -> None:
        super().__init__(workdir)
        self.raddraft_url, self.token = raddraft_url, token

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Servers": {"raddraft": {
            "Url": f"{self.raddraft_url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {self.token}"}}}}
        return config


@pytest.mark.skipif(not DICOMWEB_PLUGIN.is_file(),
                    reason="Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
def test_orthanc_dicomweb_plugin_pushes_a_study(gw, tmp_path):
    study, series = generate_uid(), generate_uid()
    slices = [make_ct(study, series, position=float(z), instance_number=z + 1) for z in range(3)]
    with OrthancWithDicomWeb(tmp_path / "orthanc", gw.url, TOKEN) as orthanc:
        for ds in slices:
            orthanc.request("POST", "/instances", encoded(ds))
        (study_id,) = orthanc.studies()
        answer = orthanc.request("POST", "/dicom-web/servers/raddraft/stow", {"Resources": [study_id]})
        assert answer["InstancesCount"] == "3"  # Orthanc reads the 200 as every instance sent
    for ds in slices:
        record = wait_for(lambda ds=ds: gw.index.instance(ds.SOPInstanceUID), timeout=30, what="stored")
        assert (record.calling_ae, record.study_instance_uid) == (SOURCE, study)
        assert pydicom.dcmread(gw.spool.root / record.path).SOPInstanceUID == ds.SOPInstanceUID
    episode = gw.store.episode(study, 1)
    assert episode is not None and episode.received == 3
    assert gw.stow_files() == []


@pytest.mark.skipif(not DICOMWEB_PLUGIN.is_file(), reason="Orthanc's DICOMweb plugin is not installed")
def test_orthanc_with_a_wrong_token_stores_nothing(gw, tmp_path):
    with OrthancWithDicomWeb(tmp_path / "orthanc", gw.url, "not-the-token-0123456789") as orthanc:
        orthanc.request("POST", "/instances", encoded(make_ct()))
        with pytest.raises(urllib.error.HTTPError):
            orthanc.request("POST", "/dicom-web/servers/raddraft/stow", {"Resources": orthanc.studies()})
    assert gw.index.count_instances() == 0


# --- raddraft serve ---------------------------------------------------------------------------------------------
def _worklist_url(serve: Serve) -> str:
    def found() -> str | None:
        for line in serve.log:
            if "worklist listening on " in line:
                return line.split("worklist listening on ", 1)[1].strip()
        return None

    return wait_for(found, timeout=30, what="worklist URL in the log")


def test_raddraft_serve_takes_stow_on_its_http_port_next_to_healthz(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, "--no-worker", RADDRAFT_STUDY_IDLE_SECONDS="3600", RADDRAFT_STOW_SOURCES=f"{SOURCE}:{TOKEN}")
    try:
        url = _worklist_url(serve)
        client = DICOMwebClient(url=f"{url}/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})
        ct = PYDICOM_TEST_FILES / "CT_small.dcm"
        assert len(client.store_instances([pydicom.dcmread(ct)]).ReferencedSOPSequence) == 1
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as health:
            assert json.loads(health.read())["status"] in ("ok", "not ok")
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as exposition:
            assert b'raddraft_instances_received_total{outcome="stored"} 1.0' in exposition.read()
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    log = "".join(serve.log)
    assert "DICOMweb ingest (STOW-RS) on" in log and TOKEN not in log
    store = StateStore(home / "index.sqlite")
    try:
        record = Index(store).instance(str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID))
        assert record is not None and record.calling_ae == SOURCE
    finally:
        store.close()


def test_raddraft_serve_without_sources_has_no_stow(tmp_path):
    serve = Serve(tmp_path / "home", "--no-worker")
    try:
        url = _worklist_url(serve)
        request = urllib.request.Request(f"{url}/dicomweb/studies", data=b"x", method="POST",
                                         headers={"Content-Type": MULTIPART, "Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (403, 404)  # the worklist's answer: no such route (or no CSRF token)
    finally:
        serve.stop()
    assert "DICOMweb ingest (STOW-RS) is off" in "".join(serve.log)


