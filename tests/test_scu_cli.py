"""``raddraft send`` as a user runs it: a real subprocess against real peers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
from node_helpers import Serve

from dicom_node.index import Index
from peers import Orthanc, free_port
from state.store import StateStore

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def raddraft_send(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RADDRAFT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "raddraft.cli", "send", *args], check=False, capture_output=True,
                          text=True, timeout=120, env=env)


def test_send_a_folder_to_orthanc_skips_the_non_dicom_file(orthanc, tmp_path):
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "a" / "1.dcm")
    shutil.copy(TEST_FILES / "JPEG2000.dcm", folder / "2.dcm")
    (folder / "readme.txt").write_text("hello")

    result = raddraft_send(str(folder), "--to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--calling-aet", "CLI",
                           home=tmp_path / "home")

    assert result.returncode == 0, result.stderr
    assert f"skipped {folder / 'readme.txt'}: not a DICOM file" in result.stderr
    assert f"2 instance(s) to ORTHANC@127.0.0.1:{orthanc.dicom_port}: 2 ok, 0 warning, 0 failed, 1 file(s) skipped" \
        in result.stdout
    assert len(orthanc.instances()) == 2
    assert orthanc.get(f"/instances/{orthanc.instances()[0]}/metadata/RemoteAET") == "CLI"


def test_peer_down_exits_non_zero_naming_the_destination(tmp_path):
    port = free_port()

    result = raddraft_send(str(TEST_FILES / "CT_small.dcm"), "--to", f"PACS@127.0.0.1:{port}", home=tmp_path)

    assert result.returncode == 3
    assert f"cannot connect to DICOM destination PACS@127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_rejected_association_exits_non_zero_with_the_reason(tmp_path):
    with Orthanc(tmp_path / "orthanc", check_called_aet=True) as peer:
        result = raddraft_send(str(TEST_FILES / "CT_small.dcm"), "--to", f"WRONG@127.0.0.1:{peer.dicom_port}",
                               home=tmp_path / "home")

    assert result.returncode == 3
    assert "rejected the association" in result.stderr
    assert "Called AE title not recognised" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failed_instance_gives_exit_code_1_and_is_listed(dcmtk_storescp, tmp_path):
    missing = tmp_path / "missing.dcm"

    result = raddraft_send(str(TEST_FILES / "CT_small.dcm"), str(missing), "--to",
                           f"{dcmtk_storescp.aet}@127.0.0.1:{dcmtk_storescp.port}", home=tmp_path)

    assert result.returncode == 1
    assert f"FAILED {missing}: no such file or directory" in result.stderr
    assert "1 ok, 0 warning, 1 failed" in result.stdout
    assert len(dcmtk_storescp.received()) == 1


def test_a_malformed_destination_is_a_usage_error(tmp_path):
    result = raddraft_send(str(TEST_FILES / "CT_small.dcm"), "--to", "PACS@host-without-port", home=tmp_path)

    assert result.returncode == 2
    assert "must be written AETITLE@host:port" in result.stderr


def test_a_missing_tls_ca_file_is_reported(tmp_path):
    result = raddraft_send(str(TEST_FILES / "CT_small.dcm"), "--to", "PACS@127.0.0.1:104", "--tls-ca",
                           str(tmp_path / "nope.pem"), home=tmp_path)

    assert result.returncode == 2
    assert f"--tls-ca {tmp_path / 'nope.pem'} does not exist" in result.stderr


def test_send_a_folder_of_compressed_instances_to_raddraft_serve(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
             "JPGExtended.dcm", "SC_rgb_rle.dcm"]  # distinct SOP Instance UIDs, one per transfer syntax
    for name in names:
        shutil.copy(TEST_FILES / name, folder / name)
    serve = Serve(tmp_path / "node", "--no-worker", RADDRAFT_STUDY_IDLE_SECONDS="3600")
    try:
        result = raddraft_send(str(folder), "--to", f"RADDRAFT@127.0.0.1:{serve.port}", "--calling-aet", "CLI",
                               home=tmp_path / "home")
    finally:
        assert serve.stop() == 0, "".join(serve.log)

    assert result.returncode == 0, result.stderr
    assert f"{len(names)} ok, 0 warning, 0 failed" in result.stdout
    assert "1 association(s)" in result.stdout  # every needed presentation context in one association
    store = StateStore(tmp_path / "node" / "index.sqlite")
    index = Index(store)
    try:
        for name in names:
            original = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
            record = index.instance(original.SOPInstanceUID)
            assert record is not None and record.calling_ae == "CLI", name
            assert record.transfer_syntax_uid == original.file_meta.TransferSyntaxUID, name  # stored as sent
    finally:
        store.close()
