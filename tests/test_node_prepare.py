"""The prepare step without a broker: orientation, spatial order, manifest fields, claims."""

from __future__ import annotations

import hashlib
import shutil

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES, make_ct, write_ct

from dicom_node.index import InstanceRecord
from workers.prepare import build_manifest, orientation_of


@pytest.mark.parametrize(("iop", "expected"), [
    ([1, 0, 0, 0, 1, 0], "axial"),
    ([1, 0, 0, 0, 0, -1], "coronal"),
    ([0, 1, 0, 0, 0, -1], "sagittal"),
    ([1, 0, 0, 0, 0.7071, 0.7071], "oblique"),
    ([0.995, 0.0998, 0, -0.0998, 0.995, 0], "axial"),  # rotated in plane: still axial
])
def test_orientation_from_image_orientation_patient(iop, expected):
    assert orientation_of(iop) == expected


def test_parallel_directions_are_an_error():
    with pytest.raises(ValueError, match="parallel row and column directions"):
        orientation_of([1, 0, 0, 1, 0, 0])


def _record(spool, path, ds):
    relative = path.relative_to(spool).as_posix()
    return InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID, study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, patient_id=str(ds.get("PatientID", "")),
        sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, calling_ae="X",
        peer_address="127.0.0.1", size_bytes=path.stat().st_size,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), path=relative, received_at=0.0,
    )


def test_manifest_of_real_and_generated_instances(tmp_path):
    spool = tmp_path / "spool"
    ct_source = PYDICOM_TEST_FILES / "CT_small.dcm"
    ct = pydicom.dcmread(ct_source)
    study = ct.StudyInstanceUID
    ct_path = spool / "ct.dcm"
    spool.mkdir()
    shutil.copyfile(ct_source, ct_path)
    records = [_record(spool, ct_path, ct)]
    # a second series of the same study, sent out of order, sagittal
    for n, x in ((2, 5.0), (1, -5.0)):
        ds = make_ct(study, "1.2.3.4", position=0.0, instance_number=n)
        ds.SeriesNumber = 7
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x, 0, 0]
        path = write_ct(spool / f"sag{n}.dcm", ds)
        records.append(_record(spool, path, ds))

    manifest = build_manifest(spool, study, 3, records)
    assert manifest.study.patient_id == str(ct.PatientID)
    first, second = manifest.series
    assert first.modality == "CT" and first.series_number == ct.SeriesNumber
    (ct_entry,) = first.instances
    assert ct_entry.rows == 128 and ct_entry.columns == 128
    assert ct_entry.pixel_spacing == tuple(float(v) for v in ct.PixelSpacing)
    assert ct_entry.transfer_syntax_uid == ct.file_meta.TransferSyntaxUID
    assert first.orientation == "axial"
    assert second.series_number == 7 and second.orientation == "sagittal"
    # ordered by position along the slice normal row × column = (0,1,0) × (0,0,-1) = -x, not by instance number
    assert [i.image_position_patient[0] for i in second.instances] == [5.0, -5.0]
    assert [i.instance_number for i in second.instances] == [2, 1]


def test_manifest_refuses_an_instance_of_another_study(tmp_path):
    ds = make_ct()
    path = write_ct(tmp_path / "a.dcm", ds)
    with pytest.raises(ValueError, match="belongs to study"):
        build_manifest(tmp_path, "1.2.3", 1, [_record(tmp_path, path, ds)])


def test_manifest_of_a_radiograph_has_its_view_and_no_orientation(tmp_path):
    ds = make_ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.Rows, ds.Columns = 4, 16
    path = write_ct(tmp_path / "dx.dcm", ds)

    (series,) = build_manifest(tmp_path, ds.StudyInstanceUID, 1, [_record(tmp_path, path, ds)]).series
    (entry,) = series.instances
    assert series.modality == "DX" and series.orientation is None
    assert (entry.view_position, entry.image_laterality) == ("PA", "U")
    assert (entry.rows, entry.columns, entry.pixel_spacing) == (4, 16, (0.5, 0.5))
    assert entry.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert entry.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1.1"
