"""Outputs delivered to a real Orthanc: the outbox under RADDRAFT_HOME, C-STORE with the storage SCU to each of
RADDRAFT_DICOM_DESTINATIONS, then read back over Orthanc's REST API and compared with what was built.

Orthanc (fixture ``orthanc``, peers/) holds the source CR study first, as the PACS would; the SR, the
narrative SR and the GSPS must land in that study, each in its own new series, and come back unchanged.
"""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from reporting_dicom_helpers import Study, cr_findings, cr_study, result_for

from core.layout import episode_dir
from core.settings import Settings, load_settings
from dicom_node.scu import Outcome, send_instances
from peers import Orthanc
from reporting.context import Signoff
from reporting.hl7_oru import HL7Endpoints, ResultStatus, build_oru_r01
from reporting.outbox import OutboxEntry, write_outbox

SIGNOFF = Signoff("Curie^Marie", "General Hospital Radiology", datetime(2024, 5, 6, 9, 30, tzinfo=UTC))
DICOM_KINDS = ("sr", "narrative", "gsps")


@pytest.fixture
def cr(tmp_path: Path) -> Study:
    return cr_study(tmp_path / "source")


@pytest.fixture
def settings(tmp_path: Path, orthanc: Orthanc, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings from the environment, as ``raddraft serve`` loads them."""
    monkeypatch.setenv("RADDRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RADDRAFT_DICOM_DESTINATIONS", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    return load_settings()


def write_set(settings: Settings, cr: Study, signoff: Signoff | None = None) -> list[OutboxEntry]:
    result = result_for(cr, cr_findings(cr))
    status = ResultStatus.PRELIMINARY
    if signoff is not None:
        result, status = result.model_copy(update={"status": "final"}), ResultStatus.FINAL
    oru = build_oru_r01(cr.manifest, result, status, endpoints=HL7Endpoints.from_settings(settings),
                        control_id="ORTHANC1", message_time=result.created_at)
    return write_outbox(settings.outbox_dir, cr.manifest, result, cr.sources, oru, signoff=signoff)


def deliver(settings: Settings, entries: list[OutboxEntry]) -> None:
    files = [entry.path for entry in entries if entry.kind in DICOM_KINDS]
    assert settings.dicom_destinations, "RADDRAFT_DICOM_DESTINATIONS must name the Orthanc"
    for destination in settings.dicom_destinations:
        summary = send_instances(destination, files, calling_ae_title=settings.ae_title, timeout_s=30)
        assert summary.ok, summary.describe()
        assert [r.outcome for r in summary.results] == [Outcome.SUCCESS] * len(files)


def orthanc_instance(orthanc: Orthanc, sop_instance_uid: str) -> dict[str, Any]:
    (found,) = orthanc.request("POST", "/tools/find", {"Level": "Instance", "Expand": True,
                                                       "Query": {"SOPInstanceUID": sop_instance_uid}})
    return found


def served_back(orthanc: Orthanc, sop_instance_uid: str) -> pydicom.Dataset:
    """GET /instances/{id}/file: the stored Part 10 file, as Orthanc serves it."""
    instance = orthanc_instance(orthanc, sop_instance_uid)
    with urllib.request.urlopen(orthanc.url + f"/instances/{instance['ID']}/file", timeout=60) as response:
        return pydicom.dcmread(BytesIO(response.read()))


def upload_sources(orthanc: Orthanc, cr: Study) -> str:
    """Store the source study in Orthanc (the PACS) and return Orthanc's study ID."""
    study_ids = {orthanc.upload(cr.spool / instance.path)["ParentStudy"] for _, instance in cr.manifest.instances()}
    (study_id,) = study_ids
    return study_id


def test_outputs_are_stored_in_the_source_study_and_served_back_unchanged(
    orthanc: Orthanc, settings: Settings, cr: Study
) -> None:
    study_id = upload_sources(orthanc, cr)
    entries = write_set(settings, cr)
    folder = episode_dir(settings.home / "outbox", cr.manifest.study_instance_uid, cr.manifest.episode_id)
    assert {entry.path.parent for entry in entries} == {folder}  # RADDRAFT_HOME/outbox/<study>/<episode>/
    deliver(settings, entries)

    assert orthanc.studies() == [study_id]  # same study: nothing new at study level
    series = orthanc.get(f"/studies/{study_id}/series")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["CR", "PR", "SR", "SR"]  # the source series, then one new series per output kind

    for entry in (e for e in entries if e.kind in DICOM_KINDS):
        assert entry.sop_instance_uid is not None
        stored = orthanc_instance(orthanc, entry.sop_instance_uid)
        assert orthanc.get(f"/instances/{stored['ID']}/study")["ID"] == study_id
        back = served_back(orthanc, entry.sop_instance_uid)
        written = pydicom.dcmread(entry.path)
        assert back == written, f"{entry.path.name} changed on its way through Orthanc"  # data set, not meta

    sr_entry = next(e for e in entries if e.kind == "sr")
    assert sr_entry.sop_instance_uid is not None
    sr = hd.sr.Comprehensive3DSR.from_dataset(served_back(orthanc, sr_entry.sop_instance_uid))
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    groups = sr.content.get_planar_roi_measurement_groups()
    findings = cr_findings(cr)
    assert len(groups) == len(findings)
    for group, finding in zip(groups, findings, strict=True):
        x1, y1, x2, y2 = finding.box
        np.testing.assert_allclose(group.roi.value, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            finding.sop_instance_uid

    gsps_entry = next(e for e in entries if e.kind == "gsps")
    assert gsps_entry.sop_instance_uid is not None
    gsps = served_back(orthanc, gsps_entry.sop_instance_uid)
    graphics = gsps.GraphicAnnotationSequence[0].GraphicObjectSequence
    for graphic, finding in zip(graphics, findings, strict=True):
        x1, y1, x2, y2 = finding.box
        np.testing.assert_allclose(np.array(graphic.GraphicData, dtype=float).reshape(-1, 2),
                                   [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]])


def test_redelivery_replaces_and_the_final_set_joins_the_same_series(
    orthanc: Orthanc, settings: Settings, cr: Study
) -> None:
    study_id = upload_sources(orthanc, cr)
    draft = write_set(settings, cr)
    deliver(settings, draft)
    count = len(orthanc.instances())
    deliver(settings, write_set(settings, cr))  # a retried report + delivery: identical UIDs, nothing added
    assert len(orthanc.instances()) == count

    final = write_set(settings, cr, SIGNOFF)
    deliver(settings, final)
    assert len(orthanc.instances()) == count + 3  # final SR, final narrative, signed GSPS
    final_sr = next(e for e in final if e.kind == "sr")
    draft_sr = next(e for e in draft if e.kind == "sr")
    assert final_sr.sop_instance_uid is not None and draft_sr.sop_instance_uid is not None
    back = served_back(orthanc, final_sr.sop_instance_uid)
    assert (back.VerificationFlag, back.PreliminaryFlag) == ("VERIFIED", "FINAL")
    assert str(back.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
    draft_series = orthanc_instance(orthanc, draft_sr.sop_instance_uid)["ParentSeries"]
    assert orthanc_instance(orthanc, final_sr.sop_instance_uid)["ParentSeries"] == draft_series
    assert orthanc.studies() == [study_id]
