"""Memory per received instance (issue 17): the node receives a C-STORE data set to disk, not into memory.

Before: the whole data set was held in memory (``event.encoded_dataset``), then parsed, hashed and staged from
those bytes: a 200 MiB instance raised the node's traced memory by about three times its size. Now pynetdicom's
chunked receive writes it to a file as its PDUs arrive (:func:`dicom_node.scp.build_ae`); the node checks its
size from the file, reads it with the pixel data deferred, hashes it in pieces and stages it by a hard link (or
a copy in pieces). The sender is dcmtk's storescu in its own process, so tracemalloc measures only the node.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import tempfile
import tracemalloc
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from node_helpers import (
    PYDICOM_TEST_FILES,
    SCU_AE,
    make_ct,
    node_settings,
    running_node,
    wait_for,
)
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode

from dicom_node.inflate import dataset_offset
from dicom_node.statuses import StoreStatus

MIB = 1024 * 1024
BIG_MIB = 200
PEAK_LIMIT = 32 * MIB


@pytest.fixture
def recv_dir(tmp_path, monkeypatch):
    """The directory pynetdicom's chunked receive writes to (its tempfile.gettempdir()), private to the test."""
    folder = tmp_path / "recv"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def write_big_ct(path: Path, pixel_mib: int, *, sop_uid: str | None = None, pixel_length: int | None = None,
                 trailing: bytes = b"") -> Path:
    """A CT in Explicit VR Little Endian whose pixel data (random, written in pieces) is *pixel_mib* MiB.

    *pixel_length*: the length its Pixel Data header announces (default: what is written); *trailing*: bytes
    after the pixel data."""
    ds = make_ct(sop_uid=sop_uid)
    pixels = pixel_mib * MIB
    ds.Columns = 1024 if pixel_mib <= 64 else 8192  # 16-bit: Rows x Columns x 2 bytes, each at most 65535
    ds.Rows = pixels // (ds.Columns * 2)
    del ds.PixelData
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with path.open("wb") as handle:
        handle.write(buffer.getvalue())
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_length or pixels))
        for _ in range(pixel_mib):
            handle.write(os.urandom(MIB))
        handle.write(trailing)
    return path


def data_set_sha256(path: Path) -> str:
    """The SHA-256 of a Part 10 file's data set (what follows its file meta), read in pieces."""
    with path.open("rb") as handle:
        handle.seek(dataset_offset(handle.read(144)))
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def storescu(node, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-v", *options, "-aet", SCU_AE, "-aec", node.settings.ae_title, "127.0.0.1",
                           str(node.port), str(path)], capture_output=True, text=True, timeout=300, check=False)


def stored_path(node, ds_path: Path) -> Path:
    ds = pydicom.dcmread(ds_path, stop_before_pixels=True)
    return node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def send_raw(node, path: Path) -> int:
    """Send *path* without decoding it (pynetdicom's STORE_SEND_CHUNKED_DATASET, set by the fixture
    ``raw_sender``): the request names the file meta's SOP instance, the data set goes as it is in the file."""
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


@pytest.fixture
def raw_sender(monkeypatch):
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


def assert_nothing_left(node, recv_dir: Path) -> None:
    assert [p for p in node.files() if p.suffix == ".dcm"] == []
    assert list(node.spool.tmp_dir.iterdir()) == []
    assert list(recv_dir.iterdir()) == []


# --- (1) a 200 MiB instance -----------------------------------------------------------------------------------
def test_a_200_mib_instance_is_received_to_disk_with_bounded_memory(tmp_path, recv_dir, capsys):
    big = write_big_ct(tmp_path / "big.dcm", BIG_MIB)
    size = big.stat().st_size
    with running_node(node_settings(tmp_path / "home", max_instance_mb=512)) as node:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            done = storescu(node, big)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        growth = peak - before
        with capsys.disabled():
            print(f"\nnode traced peak growth while storing a {size / MIB:.0f} MiB instance: {growth / MIB:.1f} MiB")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Received Store Response (Success)" in done.stdout + done.stderr, done.stdout + done.stderr
        assert growth < PEAK_LIMIT, f"traced peak grew by {growth / MIB:.1f} MiB for a {size / MIB:.0f} MiB instance"

        stored = stored_path(node, big)
        assert data_set_sha256(stored) == data_set_sha256(big)  # the data set byte for byte as sent
        ds = pydicom.dcmread(big, stop_before_pixels=True)
        record = node.index.instance(ds.SOPInstanceUID)
        assert record is not None
        assert record.sha256 == file_sha256(stored)
        assert record.size_bytes == stored.stat().st_size
        assert record.transfer_syntax_uid == ExplicitVRLittleEndian
        assert record.study_instance_uid == ds.StudyInstanceUID
        assert record.series_instance_uid == ds.SeriesInstanceUID
        assert record.path == node.spool.relative(stored)
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(node.spool.tmp_dir.iterdir()) == []
        assert list(recv_dir.iterdir()) == []  # pynetdicom removed its file after the handler


def test_received_file_on_another_file_system_is_staged_by_copy(tmp_path, monkeypatch):
    """pynetdicom's temporary directory on tmpfs (/dev/shm), the spool elsewhere: no hard link, a copy."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temporary directory")
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="raddraft-test-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    try:
        big = write_big_ct(tmp_path / "big.dcm", 8)
        with running_node(node_settings(tmp_path / "home")) as node:
            done = storescu(node, big)
            assert done.returncode == 0, done.stdout + done.stderr
            stored = stored_path(node, big)
            assert data_set_sha256(stored) == data_set_sha256(big)
            assert node.index.instance(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID).sha256 == \
                file_sha256(stored)
            assert list(node.spool.tmp_dir.iterdir()) == []
            assert list(folder.iterdir()) == []
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


# --- (2) deflated and compressed instances ----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "option"), [("image_dfl.dcm", "-xd"), ("JPEG2000.dcm", "-xw"),
                                              ("MR_small_RLE.dcm", "-xr")])
def test_deflated_and_compressed_instances_are_still_stored(tmp_path, recv_dir, name, option):
    source = PYDICOM_TEST_FILES / name
    with running_node(node_settings(tmp_path / "home")) as node:
        done = storescu(node, source, option)
        assert done.returncode == 0, done.stdout + done.stderr
        original = pydicom.dcmread(source)
        record = node.index.instance(original.SOPInstanceUID)
        assert record is not None, done.stdout + done.stderr
        assert record.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        stored = node.spool.root / record.path
        assert pydicom.dcmread(stored).PixelData == original.PixelData
        assert list(recv_dir.iterdir()) == []


# --- (3) a connection dropped mid-data-set ----------------------------------------------------------------------
def _pdv_pdu(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one presentation data value (*control*: its message control header)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _store_command(sop_uid: str) -> bytes:
    command = pydicom.Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001  # C-STORE-RQ
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000  # a data set follows
    command.AffectedSOPInstanceUID = sop_uid
    command.CommandGroupLength = 0
    command.CommandGroupLength = len(encode(command, True, True)) - 12
    return encode(command, True, True)


def test_a_connection_dropped_mid_data_set_leaves_no_file_and_the_next_store_works(tmp_path, recv_dir):
    sop_uid = generate_uid()
    with running_node(node_settings(tmp_path / "home")) as node:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.ae_title)
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        sock = assoc.dul.socket.socket
        sock.sendall(_pdv_pdu(context_id, 0x03, _store_command(sop_uid)))  # command, last fragment
        sock.sendall(_pdv_pdu(context_id, 0x00, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + bytes(64 * 1024)))
        partial = wait_for(lambda: list(recv_dir.iterdir()), timeout=10, what="the partial received file")
        assert len(partial) == 1
        sock.shutdown(socket.SHUT_RDWR)  # the peer goes away in the middle of the data set
        wait_for(lambda: not partial[0].exists(), timeout=15, what="the partial file to be removed")
        assoc.kill()
        assert_nothing_left(node, recv_dir)

        ds = make_ct()
        assoc = node.associate([CTImageStorage])
        try:
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
        finally:
            assoc.release()
        assert node.index.instance(ds.SOPInstanceUID) is not None
        assert list(recv_dir.iterdir()) == []


# --- (4) over max_instance_mb ------------------------------------------------------------------------------------
def test_an_instance_over_max_instance_mb_is_refused_without_keeping_a_file(tmp_path, recv_dir, caplog):
    big = write_big_ct(tmp_path / "big.dcm", 6)
    with running_node(node_settings(tmp_path / "home", max_instance_mb=4)) as node:
        done = storescu(node, big)
        assert "Refused: OutOfResources" in done.stdout + done.stderr, done.stdout + done.stderr
        assert node.index.count_instances() == 0
        assert_nothing_left(node, recv_dir)
        assert any("max_instance_mb is 4" in r.getMessage() for r in caplog.records)


# --- (5) refusal reasons on the file path ------------------------------------------------------------------------
def test_truncated_pixel_data_is_refused_as_truncated(tmp_path, recv_dir, raw_sender, caplog):
    """The deferred pixel data announces 3 MiB more than the file holds: its truncation is still seen."""
    big = write_big_ct(tmp_path / "short.dcm", 4, pixel_length=7 * MIB)
    with running_node(node_settings(tmp_path / "home")) as node:
        assert send_raw(node, big) == StoreStatus.CANNOT_UNDERSTAND
        assert_nothing_left(node, recv_dir)
        assert node.index.count_instances() == 0
        assert any("element (7FE0,0010) is truncated" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]


def test_trailing_bytes_after_deferred_pixel_data_are_refused(tmp_path, recv_dir, raw_sender, caplog):
    big = write_big_ct(tmp_path / "trailing.dcm", 2, trailing=b"\x01\x02\x03\x04")
    with running_node(node_settings(tmp_path / "home")) as node:
        assert send_raw(node, big) == StoreStatus.CANNOT_UNDERSTAND
        assert node.index.count_instances() == 0
        assert_nothing_left(node, recv_dir)
        assert any("trailing bytes" in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]


def test_sop_instance_uid_differing_from_the_request_is_refused_on_the_file_path(tmp_path, recv_dir, raw_sender,
                                                                                  caplog):
    big = write_big_ct(tmp_path / "other.dcm", 2)
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    with big.open("rb") as handle:  # the file meta (hence the request) names another instance
        handle.seek(dataset_offset(handle.read(144)))
        body = handle.read()
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, ds.file_meta)
    other = tmp_path / "mismatch.dcm"
    other.write_bytes(buffer.getvalue() + body)
    with running_node(node_settings(tmp_path / "home")) as node:
        assert send_raw(node, other) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert node.index.count_instances() == 0
        assert_nothing_left(node, recv_dir)
        assert any("differs from the request's Affected SOP Instance UID" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
