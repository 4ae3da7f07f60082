"""The storage SCP against real peers: dcmtk echoscu/storescu and pynetdicom SCUs on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from io import BytesIO

import pydicom
import pynetdicom
import pytest
from node_helpers import (
    PYDICOM_TEST_FILES,
    SCU_AE,
    dataset_bytes,
    make_ct,
    node_settings,
    running_node,
    wait_for,
)
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom.dsutils import encode

from core import metrics
from dicom_node.index import NodeCounter
from dicom_node.statuses import StoreStatus


@pytest.fixture
def node(tmp_path):
    with running_node(node_settings(tmp_path / "home", study_idle_seconds=60)) as running:
        yield running


def store(node, ds, contexts=None):
    assoc = node.associate(contexts or [ds.SOPClassUID])
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status.Status


def dcm_files(node):
    return [p for p in node.files() if p.suffix == ".dcm"]


def test_echoscu_gets_success(node):
    result = subprocess.run(["echoscu", "-aet", SCU_AE, "-aec", "RADDRAFT", "127.0.0.1", str(node.port)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# (file, storescu option proposing its transfer syntax): compressed files are stored without conversion
STORESCU_FILES = [
    ("CT_small.dcm", "-xe"), ("MR_small_bigendian.dcm", "-xb"), ("image_dfl.dcm", "-xd"),
    ("MR_small_RLE.dcm", "-xr"), ("SC_rgb_jpeg_dcmtk.dcm", "-xy"), ("JPGExtended.dcm", "-xx"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("MR_small_jp2klossless.dcm", "-xv"), ("JPEG2000.dcm", "-xw"),
]


def assert_same_content(stored, source):
    """Same elements (dcmtk drops group lengths and padding) and the pixel data still in its encoded form."""
    a, b = pydicom.dcmread(stored), pydicom.dcmread(source)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    for element in b:
        if element.tag.element == 0 or element.tag == 0xFFFCFFFC:
            continue
        assert a[element.tag].value == element.value, f"{source.name} {element.tag}"
    assert a.PixelData == b.PixelData


def test_storescu_files_are_stored_byte_for_byte_in_their_transfer_syntax(node):
    for name, propose in STORESCU_FILES:
        source = PYDICOM_TEST_FILES / name
        result = subprocess.run(["storescu", "-aet", SCU_AE, "-aec", "RADDRAFT", propose, "-R", "127.0.0.1",
                                 str(node.port), str(source)], check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        original = pydicom.dcmread(source, stop_before_pixels=True)
        record = node.index.instance(original.SOPInstanceUID)
        assert record is not None, name
        stored = node.spool.root / record.path
        assert record.transfer_syntax_uid == original.file_meta.TransferSyntaxUID, name
        assert_same_content(stored, source)
        assert record.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert record.calling_ae == SCU_AE
        assert record.peer_address == "127.0.0.1"
        assert stored.relative_to(node.spool.root).parts == (
            original.StudyInstanceUID, original.SeriesInstanceUID, f"{original.SOPInstanceUID}.dcm")
    assert list(node.spool.tmp_dir.iterdir()) == []


# --- exact bytes, duplicates, replacement ----------------------------------------------------------------------
def test_stored_file_holds_the_received_bytes_unchanged(node):
    ds = make_ct()
    assert store(node, ds) == StoreStatus.SUCCESS
    stored = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    syntax = UID(node.index.instance(ds.SOPInstanceUID).transfer_syntax_uid)
    assert syntax == ExplicitVRLittleEndian  # the node prefers it among the SCU's proposals
    expected = encode(ds, False, True, False)  # what pynetdicom put on the wire in that syntax
    assert dataset_bytes(stored) == expected
    assert pydicom.dcmread(stored).file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_identical_instance_sent_twice_is_stored_once(node):
    ds = make_ct()
    assert store(node, ds) == StoreStatus.SUCCESS
    first = node.index.instance(ds.SOPInstanceUID)
    assert store(node, ds) == StoreStatus.SUCCESS
    assert node.index.instance(ds.SOPInstanceUID) == first
    assert len(dcm_files(node)) == 1
    assert node.store.episode(ds.StudyInstanceUID, 1).received == 1


def test_different_instance_with_same_uid_replaces_the_old_one(node):
    ds = make_ct(description="first version")
    assert store(node, ds) == StoreStatus.SUCCESS
    old = node.index.instance(ds.SOPInstanceUID)
    ds.SeriesDescription = "corrected version"
    assert store(node, ds) == StoreStatus.SUCCESS
    new = node.index.instance(ds.SOPInstanceUID)
    assert new.sha256 != old.sha256
    files = dcm_files(node)
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).SeriesDescription == "corrected version"
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() == new.sha256
    assert node.index.count_instances() == 1
    assert list(node.spool.tmp_dir.iterdir()) == []


def test_replacement_filed_under_another_series_removes_the_old_file(node):
    ds = make_ct()
    assert store(node, ds) == StoreStatus.SUCCESS
    old = node.index.instance(ds.SOPInstanceUID)
    ds.SeriesInstanceUID = generate_uid()  # the sender corrected the series: same SOP Instance UID, new path
    assert store(node, ds) == StoreStatus.SUCCESS
    new = node.index.instance(ds.SOPInstanceUID)
    assert new.path != old.path and new.series_instance_uid == ds.SeriesInstanceUID
    assert [f.relative_to(node.spool.root).as_posix() for f in dcm_files(node)] == [new.path]
    assert node.index.count_instances() == 1


# --- what was refused or stored once: an INFO line each, counted for `raddraft status` -------------------------
RETIRED_US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired): not supported


def raddraft_status(home, *args):
    """`raddraft status` in its own process, as an operator runs it beside the server."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "raddraft.cli", "status", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def storescu(node, path):
    return subprocess.run(["storescu", "-aet", SCU_AE, "-aec", "RADDRAFT", "-R", "127.0.0.1", str(node.port),
                           str(path)], check=False, capture_output=True, text=True, timeout=60)


def test_a_rejected_context_and_an_identical_resend_are_logged_at_info_and_counted(node, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dicom_node")
    # a real ultrasound image (Philips) filed under the retired US SOP class, which the SCP does not support
    retired = pydicom.dcmread(PYDICOM_TEST_FILES / "examples_palette.dcm")
    retired.SOPClassUID = retired.file_meta.MediaStorageSOPClassUID = RETIRED_US_IMAGE_STORAGE
    retired_path = tmp_path / "retired_us.dcm"
    retired.save_as(retired_path, enforce_file_format=True)
    refused = storescu(node, retired_path)  # storescu proposes only the file's SOP class (-R)
    assert refused.returncode != 0 and "No Acceptable Presentation Contexts" in refused.stderr
    assert node.index.count_instances() == 0
    (line,) = [r for r in caplog.records if "presentation context(s) rejected" in r.getMessage()]
    assert line.levelname == "INFO"
    # storescu proposes the class twice: in the file's transfer syntax, and in the other uncompressed ones
    rejection = f"{RETIRED_US_IMAGE_STORAGE} (Ultrasound Image Storage (Retired))"
    assert line.getMessage() == (
        f"association from '{SCU_AE}' at 127.0.0.1: 2 proposed presentation context(s) rejected: "
        f"context 1 {rejection} in [1.2.840.10008.1.2.1]: abstract syntax not supported; "
        f"context 3 {rejection} in [1.2.840.10008.1.2.2, 1.2.840.10008.1.2]: abstract syntax not supported")

    source = PYDICOM_TEST_FILES / "CT_small.dcm"
    sop_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    for _ in range(2):  # the same file twice, each in its own association
        sent = storescu(node, source)
        assert sent.returncode == 0, sent.stderr
    (again,) = [r for r in caplog.records if "received again" in r.getMessage()]
    assert again.levelname == "INFO"
    assert again.getMessage() == (f"identical instance {sop_uid} received again from '{SCU_AE}' at 127.0.0.1; "
                                  "stored once")
    patient = pydicom.dcmread(source, stop_before_pixels=True)
    for value in (str(patient.PatientName), str(patient.PatientID), str(retired.PatientName)):
        assert value not in caplog.text  # no patient values in what the node logs

    home = node.settings.home
    text = raddraft_status(home)
    assert "rejected presentation contexts: 2\n" in text and "identical re-sends: 1\n" in text
    assert "refused instances: 0\n" in text
    document = json.loads(raddraft_status(home, "--json"))
    assert document["node"] == {"rejected_presentation_contexts": 2, "identical_resends": 1,
                                "refused_instances": 0, "stored_without_analysis": 0}
    assert document["instances"] == 1


def test_a_refused_instance_is_counted_and_an_empty_home_shows_zero_counts(node, tmp_path):
    empty = raddraft_status(tmp_path / "nothing-here")
    assert "no studies in" in empty and "rejected presentation contexts: 0\n" in empty
    assert store(node, make_ct(study_uid="1.2.3/../../etc")) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert node.index.counters()[NodeCounter.REFUSED_INSTANCES] == 1
    assert "refused instances: 1\n" in raddraft_status(node.settings.home)


# --- bad input ---------------------------------------------------------------------------------------------------
def raw_file(tmp_path, ds, body: bytes, meta_sop_class=None, meta_sop_instance=None):
    """A Part-10 file whose file meta names the request's SOP class/instance and whose data set is *body*."""
    meta = ds.file_meta
    meta.MediaStorageSOPClassUID = meta_sop_class or ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_sop_instance or ds.SOPInstanceUID
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path = tmp_path / f"raw-{generate_uid()}.dcm"
    path.write_bytes(buffer.getvalue() + body)
    return path


@pytest.fixture
def send_raw(monkeypatch, node):
    """Send files without decoding them: the C-STORE carries the request UIDs from the file meta and the data set
    bytes as they are in the file (pynetdicom's documented STORE_SEND_CHUNKED_DATASET option)."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)

    def send(path, contexts):
        assoc = node.associate(contexts)
        assert assoc.is_established
        try:
            return assoc.send_c_store(path).Status
        finally:
            assoc.release()

    return send


def assert_nothing_stored(node):
    assert dcm_files(node) == []
    assert list(node.spool.tmp_dir.iterdir()) == []
    assert node.index.count_instances() == 0


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_dataset_without_an_identifying_uid_is_refused(node, send_raw, tmp_path, caplog, missing):
    ds = make_ct()
    request_sop = ds.SOPInstanceUID
    delattr(ds, missing)
    path = raw_file(tmp_path, ds, encode(ds, False, True, False), meta_sop_instance=request_sop)
    assert send_raw(path, [CTImageStorage]) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert_nothing_stored(node)
    assert any("is missing" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_uid_that_is_not_a_uid_is_refused_and_never_becomes_a_path(node, tmp_path):
    ds = make_ct(study_uid="1.2.3/../../etc")
    assert store(node, ds) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert_nothing_stored(node)


def test_sop_class_differing_from_the_context_is_refused(node, send_raw, tmp_path, caplog):
    ds = make_ct()
    ds.SOPClassUID = MRImageStorage  # the data set says MR, the request and context say CT
    path = raw_file(tmp_path, ds, encode(ds, False, True, False), meta_sop_class=CTImageStorage)
    assert send_raw(path, [CTImageStorage]) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert_nothing_stored(node)
    assert any("does not match the presentation context" in r.getMessage() for r in caplog.records)


def test_sop_instance_differing_from_the_request_is_refused(node, send_raw, tmp_path, caplog):
    ds = make_ct()
    path = raw_file(tmp_path, ds, encode(ds, False, True, False), meta_sop_instance=generate_uid())
    assert send_raw(path, [CTImageStorage]) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert_nothing_stored(node)
    assert any("differs from the request's Affected SOP Instance UID" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncated", "trailing", "garbage"])
def test_dataset_that_cannot_be_decoded_is_refused(node, send_raw, tmp_path, caplog, damage):
    ds = make_ct()
    body = encode(ds, False, True, False)
    body = {"truncated": body[:-20], "trailing": body + b"\x01\x02\x03\x04",
            "garbage": bytes(range(256)) * 4}[damage]
    path = raw_file(tmp_path, ds, body)
    assert send_raw(path, [CTImageStorage]) == StoreStatus.CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert any("cannot be decoded" in r.getMessage() for r in caplog.records)
    # the association and the server survive: a good instance still goes through
    assert store(node, make_ct()) == StoreStatus.SUCCESS


def test_every_arrival_is_counted_by_outcome_for_metrics(node, send_raw, tmp_path):
    def counts():
        return {outcome: metrics.REGISTRY.get_sample_value("raddraft_instances_received_total",
                                                           {"outcome": outcome}) or 0.0
                for outcome in ("stored", "duplicate", "replaced", "rejected")}

    before = counts()
    ds = make_ct(description="first version")
    assert store(node, ds) == StoreStatus.SUCCESS
    assert store(node, ds) == StoreStatus.SUCCESS  # identical: stored once
    ds.SeriesDescription = "corrected version"
    assert store(node, ds) == StoreStatus.SUCCESS
    broken = make_ct()
    assert send_raw(raw_file(tmp_path, broken, bytes(range(256)) * 4), [CTImageStorage]) == \
        StoreStatus.CANNOT_UNDERSTAND
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {"stored": 1, "duplicate": 1, "replaced": 1, "rejected": 1}


# --- robustness --------------------------------------------------------------------------------------------------
def test_garbage_on_the_port_does_not_stop_the_server(node):
    junk = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 64, b"\x01\x00\x00\x00\xff\xff"]
    sockets = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in junk]
    try:
        for sock, data in zip(sockets, junk, strict=True):
            sock.sendall(data)
        # while the junk connections are still open, a real association is served
        assert store(node, make_ct()) == StoreStatus.SUCCESS
    finally:
        for sock in sockets:
            sock.close()
    assert store(node, make_ct()) == StoreStatus.SUCCESS


def test_aborted_association_keeps_the_instances_completed_before_it(node):
    study = generate_uid()
    kept = [make_ct(study, instance_number=n) for n in (1, 2)]
    assoc = node.associate()
    assert assoc.is_established
    for ds in kept:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.abort()
    wait_for(lambda: not node.node._server or not node.node._server.active_associations, what="abort handled")
    for ds in kept:
        record = node.index.instance(ds.SOPInstanceUID)
        assert record is not None
        assert hashlib.sha256((node.spool.root / record.path).read_bytes()).hexdigest() == record.sha256
    assert store(node, make_ct()) == StoreStatus.SUCCESS


# --- resources ---------------------------------------------------------------------------------------------------
def test_disk_below_min_free_refuses_with_out_of_resources(tmp_path, caplog):
    """The free-space floor; a disk that is really full is in test_node_disk_full.py."""
    free_mb = shutil.disk_usage(tmp_path).free / 1024 / 1024
    settings = node_settings(tmp_path / "home", min_free_disk_mb=free_mb + 1024)
    with running_node(settings) as full:
        assert store(full, make_ct()) == StoreStatus.OUT_OF_RESOURCES
        assert_nothing_stored(full)
    assert any("below min_free_disk_mb" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_instance_over_max_instance_mb_is_refused(tmp_path, caplog):
    with running_node(node_settings(tmp_path / "home", max_instance_mb=0.0005)) as small:  # 524 bytes
        assert store(small, make_ct()) == StoreStatus.OUT_OF_RESOURCES
        assert_nothing_stored(small)
    assert any("max_instance_mb" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_unwritable_study_directory_answers_out_of_resources_and_leaves_nothing(node, caplog):
    ds = make_ct()
    blocker = node.spool.root / ds.StudyInstanceUID
    blocker.write_bytes(b"a file where the study directory must go")
    assert store(node, ds) == StoreStatus.OUT_OF_RESOURCES
    assert list(node.spool.tmp_dir.iterdir()) == []
    assert node.index.count_instances() == 0
    assert node.store.episodes() == []
    assert any("cannot persist" in r.getMessage() for r in caplog.records)


def test_unwritable_spool_tmp_answers_out_of_resources(node):
    node.spool.tmp_dir.rmdir()
    node.spool.tmp_dir.write_bytes(b"not a directory")
    assert store(node, make_ct()) == StoreStatus.OUT_OF_RESOURCES
    assert node.index.count_instances() == 0
    assert dcm_files(node) == []
