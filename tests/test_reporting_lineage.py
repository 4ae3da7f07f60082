"""A re-sent study's new report supersedes the last one: the new SR and narrative list the previous episode's
documents as predecessors, and the same lesion keeps its tracking UID (before: every episode wrote an unrelated
SR set with new tracking UIDs for the same lesion; three sends left three SR sets in Orthanc)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pydicom
from reporting_dicom_helpers import cr_findings, cr_study, dciodvfy, dsrdump, load, manifest_for, result_for

from core.result import Finding
from model.slices import iou
from reporting.context import Signoff
from reporting.lineage import (
    MATCH_IOU,
    PriorFinding,
    label_code,
    match_findings,
    prior_report,
    supersede,
)
from reporting.outbox import write_outputs
from reporting.outputs import OutputProblem

NO_HL7 = OutputProblem("hl7", "skipped", "no HL7 in this test")


def _tracking_uids(sr: pydicom.Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "UIDREF" and name and name[0].CodeValue == "112040":
                found.append(str(item.UID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _predecessors(dataset: pydicom.Dataset) -> set[str]:
    return {str(sop.ReferencedSOPInstanceUID) for study in dataset.get("PredecessorDocumentsSequence", [])
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


def _second_episode(tmp_path: Path, findings: list[Finding]):
    first = cr_study(tmp_path, episode_id=7)
    outbox = tmp_path / "outbox"
    write_outputs(outbox, first.manifest, result_for(first, cr_findings(first)), first.sources, NO_HL7)
    manifest = manifest_for(first.spool, ["cr/pa.dcm", "cr/ll.dcm"], episode_id=8)
    second = type(first)(first.spool, manifest, load(first.spool, manifest))
    return first, second, outbox, result_for(second, findings)


def test_the_same_lesion_keeps_its_tracking_uid_and_the_new_report_names_its_predecessors(tmp_path):
    study = cr_study(tmp_path / "probe")
    pa = study.manifest.series[0].instances[0].sop_instance_uid
    moved = Finding(label="pneumothorax", sop_instance_uid=pa, box=(420.0, 70.0, 600.0, 310.0), laterality="left")
    elsewhere = Finding(label="nodule", sop_instance_uid=pa, box=(300.0, 500.0, 340.0, 540.0))
    first, second, outbox, result = _second_episode(tmp_path, [moved, elsewhere])
    previous = json.loads((outbox / first.manifest.study_instance_uid / "7" / "findings.json").read_text())
    old_uids = [f["tracking_uid"] for f in previous["findings"]]

    superseding = supersede(outbox, result)
    assert superseding.findings[0].tracking_uid == old_uids[0]  # pneumothorax, box moved a little
    assert superseding.findings[1].tracking_uid is None  # a nodule somewhere else is a new lesion
    entries, problems = write_outputs(outbox, second.manifest, superseding, second.sources, NO_HL7)
    assert [p.kind for p in problems] == ["hl7"]
    files = {entry.kind: entry.path for entry in entries}
    old_sr = pydicom.dcmread(outbox / first.manifest.study_instance_uid / "7" / "sr.dcm")
    old_narrative = pydicom.dcmread(outbox / first.manifest.study_instance_uid / "7" / "narrative.dcm")
    sr, narrative = pydicom.dcmread(files["sr"]), pydicom.dcmread(files["narrative"])
    assert _predecessors(sr) == {old_sr.SOPInstanceUID}
    assert _predecessors(narrative) == {old_narrative.SOPInstanceUID}
    assert sr.SOPInstanceUID != old_sr.SOPInstanceUID
    uids = _tracking_uids(sr)
    assert uids[0] == old_uids[0] and uids[1] not in old_uids
    gsps = pydicom.dcmread(files["gsps"])
    graphic_uids = {str(g.TrackingUID) for a in gsps.GraphicAnnotationSequence for g in a.GraphicObjectSequence}
    assert old_uids[0] in graphic_uids
    written = json.loads(files["findings"].read_text())
    assert written["findings"][0]["tracking_uid"] == old_uids[0]
    for path in (files["sr"], files["narrative"]):
        assert dciodvfy(path) == [], path.name
        assert dsrdump(path).returncode == 0


def test_a_signed_previous_report_is_the_predecessor(tmp_path):
    first, _, outbox, result = _second_episode(tmp_path, cr_findings(cr_study(tmp_path / "probe")))
    signoff = Signoff("Curie^Marie", "Radiology", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
    write_outputs(outbox, first.manifest, result_for(first, cr_findings(first)), first.sources, NO_HL7,
                  signoff=signoff)
    prior = prior_report(outbox, first.manifest.study_instance_uid, 8)
    assert prior is not None and prior.signed and prior.episode_id == 7
    final = pydicom.dcmread(outbox / first.manifest.study_instance_uid / "7" / "sr_final.dcm")
    assert {d.sop_instance_uid for d in prior.documents if d.kind == "sr"} == {final.SOPInstanceUID}
    superseding = supersede(outbox, result)
    assert all(f.tracking_uid for f in superseding.findings)  # the identical findings: every lesion matched


def test_no_earlier_report_changes_nothing_and_a_later_episode_is_never_a_predecessor(tmp_path):
    first, _, outbox, _ = _second_episode(tmp_path, [])
    assert prior_report(outbox, first.manifest.study_instance_uid, 7) is None
    assert supersede(outbox, result_for(first, cr_findings(first))) == result_for(first, cr_findings(first))
    assert prior_report(outbox, "1.2.3.4", 2) is None


def test_matching_is_one_to_one_on_the_same_image_type_and_overlap():
    a = Finding(label="nodule", sop_instance_uid="1.2.3", box=(0.0, 0.0, 10.0, 10.0))
    twin = Finding(label="nodule", sop_instance_uid="1.2.3", box=(1.0, 1.0, 11.0, 11.0))
    old = [PriorFinding("2.25.1", label_code("nodules"), "1.2.3", None, (0.0, 0.0, 10.0, 10.0))]
    assert match_findings([a, twin], old) == {0: "2.25.1"}  # the best overlap wins; the twin is new
    other_image = a.model_copy(update={"sop_instance_uid": "1.2.4"})
    other_type = a.model_copy(update={"label": "pneumothorax"})
    other_frame = a.model_copy(update={"frame_number": 2})
    assert match_findings([other_image, other_type, other_frame], old) == {}
    far = Finding(label="nodule", sop_instance_uid="1.2.3", box=(6.0, 6.0, 16.0, 16.0))
    assert iou(far.box, old[0].box) < MATCH_IOU and match_findings([far], old) == {}
