"""Signing through the bridge: final SR/narrative/GSPS/ORU in the outbox, amendments as new versions (C)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hl7
import pydicom
import pytest
from reporting_dicom_helpers import dciodvfy, dsrdump
from test_pipeline_report_reads import counting_reads
from worklist_helpers import database_url_fixture, settings_for, write_draft  # noqa: F401 - fixture

from core.layout import index_name
from reporting.outputs import read_entries
from reporting.uids import OutputKind, output_uid
from worklist import auth
from worklist.bridge import Bridge
from worklist.signing import SignConflictError, SignedReport, SignError
from worklist.storage import Decision, Store, StudyState

NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)


@pytest.fixture
def setup(tmp_path, database_url):
    settings = settings_for(tmp_path, database_url)
    store = Store.from_settings(settings)
    clock = iter(NOW + timedelta(minutes=n) for n in range(1000))
    bridge = Bridge(settings, store, clock=lambda: next(clock))
    radiologist = store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                                 organization="Institut du Radium", now=NOW)
    draft = write_draft(settings)
    entry = bridge.register_draft(draft.manifest_path, draft.result_path)
    yield bridge, store, radiologist, draft, entry
    store.close()


def _texts(dataset):
    """Every TextValue in an SR content tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


def _oru(path):
    return hl7.parse(path.read_bytes().decode("utf-8"))


def test_sign_writes_the_final_set_without_the_rejected_finding(setup, caplog):
    bridge, store, radiologist, draft, entry = setup
    signed: list[SignedReport] = []
    bridge.on_sign(signed.append)
    assert [f.label for f in draft.result.findings] == ["nodule", "consolidation", "nodule"]
    with pytest.raises(SignError, match=r"finding 1 \('nodule'\) is still pending"):
        bridge.sign(entry, radiologist)
    assert store.get_study(entry).state is StudyState.DRAFT_READY  # a refused signature changes nothing
    store.set_finding_review(entry, 0, Decision.ACCEPTED, label="nodule", username="curie", now=NOW)
    store.set_finding_review(entry, 1, Decision.REJECTED, label="consolidation", username="curie", now=NOW)
    store.set_finding_review(entry, 2, Decision.ACCEPTED, label="pulmonary nodule", username="curie", now=NOW)
    store.save_draft_text(entry, "Two pulmonary nodules.", "Bilateral pulmonary nodules.", NOW)

    report, errors = bridge.sign(entry, radiologist)
    assert errors == [] and signed == [report]
    assert report.version == 1 and report.result_status.value == "F"
    sr = pydicom.dcmread(next(e.path for e in report.files if e.kind == "sr"))
    assert report.files[0].path.name == "sr_final.dcm"
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL" and sr.CompletionFlag == "COMPLETE"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
    assert sr.VerifyingObserverSequence[0].VerifyingOrganization == "Institut du Radium"
    sr_text = repr(sr)
    assert "Lung consolidation" not in sr_text and "Nodule" in sr_text
    narrative = pydicom.dcmread(next(e.path for e in report.files if e.kind == "narrative"))
    assert "Two pulmonary nodules." in _texts(narrative) and narrative.VerificationFlag == "VERIFIED"
    assert len([e for e in report.files if e.kind == "gsps"]) == 1
    message = _oru(report.hl7_path)
    assert str(message.segment("OBR")[25]) == "F"
    finding_obx = [str(s[5]) for s in message.segments("OBX") if str(s[3]).startswith("121071")]
    assert len(finding_obx) == 2 and not any("onsolidation" in v for v in finding_obx)
    assert store.get_study(entry).state is StudyState.SIGNED
    with pytest.raises(SignConflictError, match="is signed: only a draft or a report under review"):
        bridge.sign(entry, radiologist)
    assert [e.action for e in store.audit_entries(entry)][:1] == ["sign"]
    info = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    source = draft.phantom.datasets[0]
    assert "signed as version 1 (F)" in info
    for identity in (str(source.PatientName), str(source.PatientID), str(source.PatientName).split("^")[-1]):
        assert identity not in info


def test_amendment_is_a_new_version_with_status_c_and_the_signed_text_stays(setup):
    bridge, store, radiologist, draft, entry = setup
    for index in range(3):
        store.set_finding_review(entry, index, Decision.ACCEPTED, label="x" if index == 9 else
                                 ["nodule", "consolidation", "nodule"][index], username="curie", now=NOW)
    first, _ = bridge.sign(entry, radiologist)
    first_sr = pydicom.dcmread(first.files[0].path)
    first_bytes = first.files[0].path.read_bytes()
    store.set_state(entry, StudyState.IN_REVIEW, NOW, expect=[StudyState.SIGNED])  # what "Amend" does
    store.save_draft_text(entry, "Amended findings.", "Amended impression.", NOW)
    with counting_reads() as reads:
        second, _ = bridge.sign(entry, radiologist)
    assert second.version == 2 and second.result_status.value == "C"
    # built once, from the signed result: nothing of the outbox is read back (before: every file was written to a
    # staging folder, read back, re-stamped with amendment UIDs and written again)
    spool = bridge.settings.spool_dir.resolve()
    assert not [path for path in reads if Path(path).is_relative_to(bridge.settings.home)
                and Path(path).suffix in (".dcm", ".png", ".hl7")
                and not Path(path).resolve().is_relative_to(spool)], reads
    assert reads[str(draft.manifest_path.resolve())] <= 1 and reads[str(draft.result_path.resolve())] <= 1
    assert read_entries(second.output_dir, signed=True) == second.files
    assert (second.output_dir / index_name(signed=True)).is_file()
    assert second.output_dir.name == "amendment_2" and second.output_dir.parent == first.output_dir
    amended = pydicom.dcmread(next(e.path for e in second.files if e.kind == "sr"))
    assert amended.SOPInstanceUID != first_sr.SOPInstanceUID
    assert amended.SOPInstanceUID == output_uid(draft.result.study_instance_uid, draft.result.episode_id,
                                                draft.result.model.version, OutputKind.SR, version=2)
    assert (first_sr.InstanceNumber, amended.InstanceNumber) == (2, 3)
    assert amended.file_meta.MediaStorageSOPInstanceUID == amended.SOPInstanceUID
    predecessor = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert amended.VerificationFlag == "VERIFIED" and amended.PreliminaryFlag == "FINAL"
    for entry_file in second.files:
        if entry_file.kind in ("sr", "narrative", "gsps"):
            assert dciodvfy(entry_file.path) == [], entry_file.path.name
    assert dsrdump(next(e.path for e in second.files if e.kind == "sr")).returncode == 0
    assert str(_oru(second.hl7_path).segment("OBR")[25]) == "C"
    assert first.files[0].path.read_bytes() == first_bytes  # the first signed set is untouched
    versions = store.versions(entry)
    assert [(v.version, v.result_status) for v in versions] == [(1, "F"), (2, "C")]
    assert versions[0].findings != "Amended findings." and versions[1].findings == "Amended findings."


def test_only_radiologists_sign_and_a_failing_callback_keeps_the_signature(setup):
    bridge, store, radiologist, _, entry = setup
    admin = store.add_user("root", "admin", auth.hash_password("admin-pass"), full_name="Admin", organization="X",
                           now=NOW)
    with pytest.raises(SignError, match="role 'admin': only a radiologist can sign"):
        bridge.sign(entry, admin)
    for index in range(3):
        store.set_finding_review(entry, index, Decision.REJECTED, label="n", username="curie", now=NOW)

    def broken_queue(report: SignedReport) -> None:
        raise ConnectionError("broker unreachable")

    bridge.on_sign(broken_queue)
    report, errors = bridge.sign(entry, radiologist)
    assert errors == ["ConnectionError: broker unreachable"]
    assert store.get_study(entry).state is StudyState.SIGNED and report.hl7_path.is_file()
    assert "delivery-handoff-failed" in [e.action for e in store.audit_entries(entry)]
