"""The storage SCU library against real peers: dcmtk storescp and Orthanc on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AllStoragePresentationContexts

from core.settings import Destination
from dicom_node.scu import (
    MAX_CONTEXTS_PER_ASSOCIATION,
    AssociationRejectedError,
    Outcome,
    PeerUnreachableError,
    prepare,
    send_instances,
)
from peers import Orthanc, StoreSCP, free_port

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# One file per transfer syntax family, compressed ones included.
BY_SYNTAX = {
    "CT_small.dcm": ExplicitVRLittleEndian,
    "MR_small_implicit.dcm": ImplicitVRLittleEndian,
    "MR_small_bigendian.dcm": ExplicitVRBigEndian,
    "MR_small_RLE.dcm": RLELossless,
    "MR_small_jpeg_ls_lossless.dcm": JPEGLSLossless,
    "JPEG2000.dcm": JPEG2000,
    "SC_rgb_jpeg_dcmtk.dcm": JPEGBaseline8Bit,
}


def _uid_and_syntax(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID


@pytest.fixture
def one_per_syntax(tmp_path) -> dict[Path, str]:
    """Copies of the BY_SYNTAX files, each with its own SOP Instance UID (several MR_small* share one),
    pixel data untouched: {path: transfer syntax}."""
    copies = {}
    for name, syntax in BY_SYNTAX.items():
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / "per-syntax" / name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        assert _uid_and_syntax(path)[1] == syntax
        copies[path] = syntax
    return copies


def _family(syntax: str) -> str:
    """The two uncompressed little endian syntaxes share one context: the peer picks, pynetdicom re-encodes."""
    return "uncompressed LE" if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) else syntax


def _ct(sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_every_shipped_pydicom_file_reaches_storescp_in_its_transfer_syntax(dcmtk_storescp):
    destination = Destination(ae_title=dcmtk_storescp.aet, host="127.0.0.1", port=dcmtk_storescp.port)
    plan = prepare([TEST_FILES])
    seen: list[str] = []

    summary = send_instances(destination, plan, calling_ae_title="SCUTEST", progress=lambda r: seen.append(r.source))

    assert len(seen) == len(summary.results) == len(plan.instances) + len(plan.unreadable)
    assert summary.associations == 1
    # What pydicom ships that cannot be sent: datasets without a SOP Class (fragments for parser tests) and
    # one file whose data set is implicit VR although its meta says JPEG Baseline (pynetdicom cannot encode it).
    for failed in summary.failed:
        assert failed.reason.startswith(("SOPClassUID (0008,0016) is missing", "not sent: Failed to encode")), failed
    assert len(summary.failed) <= 8
    assert len(summary.succeeded) >= 140
    assert {s.reason for s in summary.skipped} == {"not a DICOM file", "DICOMDIR"}
    assert any(s.path.name == "README.txt" for s in summary.skipped)

    received = {_uid_and_syntax(p) for p in dcmtk_storescp.received()}
    received_uids = {uid for uid, _ in received}
    assert {r.sop_instance_uid for r in summary.succeeded} == received_uids
    # Several shipped files share a SOP Instance UID (storescp keeps the last); compressed families all arrive.
    assert {syntax for _, syntax in received} >= {JPEGBaseline8Bit, JPEG2000, JPEGLSNearLossless, RLELossless}


def test_each_transfer_syntax_arrives_unchanged_at_storescp(dcmtk_storescp, one_per_syntax):
    destination = Destination(ae_title=dcmtk_storescp.aet, host="127.0.0.1", port=dcmtk_storescp.port)

    summary = send_instances(destination, list(one_per_syntax))

    assert summary.ok, summary.failed
    received = {(uid, _family(syntax)) for uid, syntax in map(_uid_and_syntax, dcmtk_storescp.received())}
    assert received == {(uid, _family(syntax)) for uid, syntax in map(_uid_and_syntax, one_per_syntax)}


def test_compressed_files_reach_orthanc_in_their_transfer_syntax(orthanc, one_per_syntax):
    destination = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)

    summary = send_instances(destination, list(one_per_syntax))

    assert summary.ok, summary.failed
    assert len(summary.succeeded) == len(one_per_syntax) == len(orthanc.instances())
    stored = {}
    for instance_id in orthanc.instances():
        uid = orthanc.get(f"/instances/{instance_id}/simplified-tags")["SOPInstanceUID"]
        stored[uid] = _family(orthanc.get(f"/instances/{instance_id}/metadata/TransferSyntax"))
    assert stored == {uid: _family(syntax) for uid, syntax in map(_uid_and_syntax, one_per_syntax)}


def test_peer_down_raises_an_error_naming_the_destination():
    destination = Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port())

    expected = rf"cannot connect to DICOM destination NOBODY@127\.0\.0\.1:{destination.port}: connection refused"
    with pytest.raises(PeerUnreachableError, match=expected):
        send_instances(destination, [TEST_FILES / "CT_small.dcm"], connection_timeout_s=2)


def test_unknown_host_is_unreachable():
    destination = Destination(ae_title="NOBODY", host="no-such-host.invalid", port=104)

    with pytest.raises(PeerUnreachableError, match=r"cannot resolve host 'no-such-host\.invalid'"):
        send_instances(destination, [TEST_FILES / "CT_small.dcm"])


def test_orthanc_checking_the_called_ae_title_rejects_a_wrong_one(tmp_path):
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC", check_called_aet=True) as peer:
        wrong = Destination(ae_title="NOT-ORTHANC", host="127.0.0.1", port=peer.dicom_port)
        expected = r"NOT-ORTHANC@127\.0\.0\.1:\d+ rejected the association"
        with pytest.raises(AssociationRejectedError, match=expected) as info:
            send_instances(wrong, [TEST_FILES / "CT_small.dcm"])
        assert "Called AE title not recognised" in str(info.value)
        assert info.value.destination == wrong
        assert info.value.transient is False
        assert peer.instances() == []

        right = Destination(ae_title="ORTHANC", host="127.0.0.1", port=peer.dicom_port)
        assert send_instances(right, [TEST_FILES / "CT_small.dcm"]).ok


def test_storescp_refusing_associations_is_a_clear_error(tmp_path):
    with StoreSCP(tmp_path / "scp", refuse=True) as peer:
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        with pytest.raises(AssociationRejectedError, match=r"STORESCP@127\.0\.0\.1:\d+ rejected the association"):
            send_instances(destination, [TEST_FILES / "CT_small.dcm"])
        assert peer.received() == []


def test_a_transfer_syntax_the_peer_does_not_accept_fails_only_that_instance(tmp_path):
    with StoreSCP(tmp_path / "scp", accept_all_syntaxes=False) as peer:  # uncompressed syntaxes only
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        summary = send_instances(destination, [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small_RLE.dcm"])
        received = {_uid_and_syntax(p)[0] for p in peer.received()}

    assert [r.outcome for r in summary.results] == [Outcome.SUCCESS, Outcome.FAILURE]
    assert "RLE Lossless" in summary.failed[0].reason
    assert summary.failed[0].status is None
    assert received == {_uid_and_syntax(TEST_FILES / "CT_small.dcm")[0]}


def test_a_peer_accepting_no_context_fails_every_instance_without_raising(tmp_path):
    with StoreSCP(tmp_path / "scp", accept_all_syntaxes=False) as peer:
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        summary = send_instances(destination, [TEST_FILES / "MR_small_RLE.dcm", TEST_FILES / "JPEG2000.dcm"])

    assert len(summary.failed) == 2
    assert all("accepted none of the 2 proposed presentation contexts" in r.reason for r in summary.failed)


def test_a_folder_with_a_non_dicom_file_is_warned_and_skipped(dcmtk_storescp, tmp_path, caplog):
    folder = tmp_path / "study"
    (folder / "series").mkdir(parents=True)
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "series" / "ct.dcm")
    (folder / "notes.txt").write_text("not an image\n")
    destination = Destination(ae_title=dcmtk_storescp.aet, host="127.0.0.1", port=dcmtk_storescp.port)

    summary = send_instances(destination, [folder])

    assert [s.path.name for s in summary.skipped] == ["notes.txt"]
    assert "notes.txt: not a DICOM file" in caplog.text
    assert len(summary.succeeded) == 1
    assert summary.ok
    assert len(dcmtk_storescp.received()) == 1


def test_missing_and_broken_inputs_are_reported_and_the_rest_is_sent(dcmtk_storescp, tmp_path):
    no_uid = _ct()
    del no_uid.SOPInstanceUID
    no_meta = _ct()
    no_meta.file_meta = FileMetaDataset()
    good = _ct()
    destination = Destination(ae_title=dcmtk_storescp.aet, host="127.0.0.1", port=dcmtk_storescp.port)

    summary = send_instances(destination, [tmp_path / "absent.dcm", no_uid, no_meta, good])

    reasons = sorted(r.reason for r in summary.failed)
    assert reasons == [
        "SOPInstanceUID (0008,0018) is missing or empty",
        "file meta TransferSyntaxUID (0002,0010) is missing or empty",
        "no such file or directory",
    ]
    assert [r.sop_instance_uid for r in summary.succeeded] == [good.SOPInstanceUID]
    assert not summary.ok
    assert "1 ok, 0 warning, 3 failed" in summary.describe()


def test_more_than_128_contexts_are_split_over_several_associations(tmp_path):
    sop_classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:MAX_CONTEXTS_PER_ASSOCIATION + 5]
    datasets = [_ct(sop_class) for sop_class in sop_classes]
    assert len(prepare(datasets).batches()) == 2

    with StoreSCP(tmp_path / "scp", promiscuous=True) as peer:
        destination = Destination(ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        summary = send_instances(destination, datasets)
        received = {_uid_and_syntax(p)[0] for p in peer.received()}

    assert summary.associations == 2
    assert summary.ok, summary.failed[:3]
    assert received == {ds.SOPInstanceUID for ds in datasets}
