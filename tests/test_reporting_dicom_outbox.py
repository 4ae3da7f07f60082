"""The outbox: every output of an episode written atomically under <home>/outbox/<study_uid>/<episode>/."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from reporting_dicom_helpers import (
    Study,
    classic_slices,
    cr_findings,
    cr_study,
    manifest_for,
    result_for,
    write_source,
)

from core.layout import episode_dir
from core.result import Finding
from reporting.context import ReportInputs, Signoff
from reporting.outbox import (
    OutboxError,
    OutputProblem,
    pixel_sources,
    read_entries,
    read_problems,
    read_sources,
    write_outbox,
    write_outputs,
)
from reporting.outputs import OutboxIndexError
from reporting.uids import OutputKind, output_uid

# Opaque to the outbox: the ORU^R01 bytes come from reporting/hl7_oru.py.
HL7 = b"MSH|^~\\&|RADDRAFT|RADDRAFT|RIS|HOSPITAL|20240506070809||ORU^R01|1|P|2.5.1\rOBR|1||||||||||||||||||||||||P\r"


@pytest.fixture
def cr(tmp_path: Path) -> Study:
    return cr_study(tmp_path)


def test_draft_set_is_written_and_readable(cr: Study, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    sources = read_sources(cr.spool, cr.manifest)
    entries = write_outbox(outbox, cr.manifest, result, sources, HL7)

    folder = outbox / cr.manifest.study_instance_uid / str(cr.manifest.episode_id)
    assert folder == episode_dir(outbox, cr.manifest.study_instance_uid, cr.manifest.episode_id)
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["findings.json", "gsps_1.dcm", "narrative.dcm", "oru.hl7", "outbox.json", "outputs.json",
                     "overlay_1.png", "sr.dcm"]
    assert sorted(entry.path.name for entry in entries) == [name for name in names
                                                            if name not in ("outputs.json", "outbox.json")]
    assert json.loads((folder / "outputs.json").read_text()) == {
        "built": ["findings", "gsps", "hl7", "narrative", "overlay", "sr"], "problems": []}
    assert (folder / "oru.hl7").read_bytes() == HL7
    sr = pydicom.dcmread(folder / "sr.dcm")
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert next(e for e in entries if e.kind == "sr").sop_instance_uid == sr.SOPInstanceUID
    assert pydicom.dcmread(folder / "gsps_1.dcm").Modality == "PR"
    assert Image.open(folder / "overlay_1.png").size == (600, 800)
    findings = json.loads((folder / "findings.json").read_text())
    assert findings["status"] == "preliminary" and len(findings["findings"]) == 3
    assert findings["findings"][0]["overlay"] == "overlay_1.png"


def test_retry_rewrites_identical_uids(cr: Study, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    first = write_outbox(outbox, cr.manifest, result, cr.sources, HL7)
    second = write_outbox(outbox, cr.manifest, result, cr.sources, HL7)
    assert [(e.path, e.sop_instance_uid) for e in first] == [(e.path, e.sop_instance_uid) for e in second]
    folder = first[0].path.parent
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_final_set_sits_beside_the_draft(cr: Study, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    write_outbox(outbox, cr.manifest, result, cr.sources, HL7)
    signoff = Signoff("Curie^Marie", "General Hospital", datetime(2024, 5, 7, 8, 0, tzinfo=UTC))
    write_outbox(outbox, cr.manifest, result, cr.sources, HL7.replace(b"|P\r", b"|F\r"), signoff=signoff)
    folder = episode_dir(outbox, cr.manifest.study_instance_uid, cr.manifest.episode_id)
    draft, final = pydicom.dcmread(folder / "sr.dcm"), pydicom.dcmread(folder / "sr_final.dcm")
    assert (draft.PreliminaryFlag, final.PreliminaryFlag) == ("PRELIMINARY", "FINAL")
    assert final.VerificationFlag == "VERIFIED"
    assert pydicom.dcmread(folder / "narrative_final.dcm").VerificationFlag == "VERIFIED"
    assert json.loads((folder / "findings_final.json").read_text())["status"] == "final"
    assert (folder / "gsps_final_1.dcm").is_file() and (folder / "overlay_final_1.png").is_file()


def test_a_result_that_fits_no_image_fails_the_dicom_outputs_and_the_oru_still_goes(cr: Study,
                                                                                    tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    pa = cr.manifest.series[0].instances[0].sop_instance_uid
    bad = result_for(cr, [Finding(label="mass", sop_instance_uid=pa, box=(10, 10, 20, 900))])
    with pytest.raises(OutboxError, match=r"sr: ValueError: .*y2 <= Rows \(800\)"):
        write_outbox(outbox, cr.manifest, bad, cr.sources, HL7)
    entries, problems = write_outputs(outbox, cr.manifest, bad, cr.sources, HL7)
    assert [e.kind for e in entries] == ["hl7"]
    assert {(p.kind, p.state) for p in problems} == {(k, "failed") for k in ("sr", "narrative", "gsps", "overlay",
                                                                             "findings")}
    assert read_problems(episode_dir(outbox, cr.manifest.study_instance_uid, cr.manifest.episode_id)) == problems
    with pytest.raises(ValueError, match="hl7_message must not be empty"):
        write_outbox(outbox, cr.manifest, result_for(cr, []), cr.sources, b"")


def test_one_output_that_cannot_be_built_never_stops_the_others(cr: Study, tmp_path: Path) -> None:
    """A truncated pixel data element (a real-world failure) breaks what needs the pixels: the presentation state
    of an image without a window and the overlay. The SR, narrative, findings and ORU still go; a skipped ORU is
    recorded as skipped."""
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    sources = read_sources(cr.spool, cr.manifest)
    annotated = next(ds for ds in sources if ds.SOPInstanceUID == result.findings[0].sop_instance_uid)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if keyword in annotated:
            delattr(annotated, keyword)
    annotated.PixelData = annotated.PixelData[: len(annotated.PixelData) // 3]
    skipped = OutputProblem("hl7", "skipped", "the study has no accession number (no order)")
    entries, problems = write_outputs(outbox, cr.manifest, result, sources, skipped)
    assert sorted({e.kind for e in entries}) == ["findings", "narrative", "sr"]
    assert {(p.kind, p.state) for p in problems} == {("gsps", "failed"), ("overlay", "failed"), ("hl7", "skipped")}
    assert all(p.reason for p in problems)
    folder = episode_dir(outbox, cr.manifest.study_instance_uid, cr.manifest.episode_id)
    assert pydicom.dcmread(folder / "sr.dcm").PreliminaryFlag == "PRELIMINARY"
    assert not (folder / "oru.hl7").exists()
    document = json.loads((folder / "outputs.json").read_text())
    assert document["built"] == ["findings", "narrative", "sr"]
    text = json.dumps(document)
    for value in (cr.manifest.study.patient_name, cr.manifest.study.patient_id):
        assert not value or value not in text


def test_missing_spool_file_is_reported(cr: Study) -> None:
    (cr.spool / "cr" / "ll.dcm").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing from the spool: .*ll\.dcm"):
        read_sources(cr.spool, cr.manifest)


SIGNOFF = Signoff("Curie^Marie", "General Hospital", datetime(2024, 5, 7, 8, 0, tzinfo=UTC))


def test_the_index_lists_every_file_of_the_set_in_delivery_order(cr: Study, tmp_path: Path) -> None:
    """outbox.json is what the set holds: each file's kind, delivery, DICOM identifiers and hash, read back as the
    writer returned them; the signed set has its own (outbox_final.json), and an amendment's is version n."""
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    entries, _ = write_outputs(outbox, cr.manifest, result, cr.sources, HL7)
    folder = episode_dir(outbox, cr.manifest.study_instance_uid, cr.manifest.episode_id)
    assert read_entries(folder) == entries
    assert [e.kind for e in entries] == ["sr", "narrative", "gsps", "overlay", "findings", "hl7"]
    document = json.loads((folder / "outbox.json").read_text())
    assert (document["format"], document["version"], document["episode_id"]) == (1, 0, cr.manifest.episode_id)
    assert [(e["name"], e["delivery"]) for e in document["entries"]] == [
        ("sr.dcm", "dicom"), ("narrative.dcm", "dicom"), ("gsps_1.dcm", "dicom"), ("overlay_1.png", None),
        ("findings.json", None), ("oru.hl7", "hl7")]
    for entry in entries:
        assert entry.sha256 == hashlib.sha256(entry.path.read_bytes()).hexdigest()
        if entry.delivery == "dicom":
            header = pydicom.dcmread(entry.path, stop_before_pixels=True)
            assert (entry.sop_class_uid, entry.sop_instance_uid, entry.series_instance_uid) == (
                header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID)
    assert read_entries(folder, signed=True) == []  # not signed yet

    amended = Signoff(SIGNOFF.verifying_observer_name, SIGNOFF.verifying_organization, SIGNOFF.signed_at,
                      version=2, previous_sr_uid="1.2.3", previous_narrative_uid="1.2.4")
    signed, _ = write_outputs(outbox, cr.manifest, result, cr.sources, HL7, signoff=amended)
    assert {e.path.parent for e in signed} == {folder / "amendment_2"}
    assert read_entries(folder / "amendment_2", signed=True) == signed
    assert json.loads((folder / "amendment_2" / "outbox_final.json").read_text())["version"] == 2
    sr = pydicom.dcmread(signed[0].path)
    uid_args = (result.study_instance_uid, result.episode_id, result.model.version)
    assert sr.SOPInstanceUID == sr.file_meta.MediaStorageSOPInstanceUID == output_uid(*uid_args, OutputKind.SR,
                                                                                      version=2)
    assert sr.InstanceNumber == 3
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == "1.2.3"


def test_an_outbox_without_an_index_is_migrated_once_from_its_file_names(cr: Study, tmp_path: Path) -> None:
    """An outbox written before the index: the one legacy reader finds the files by their old names, in delivery
    order, and writes the index it would have had; a later read is an ordinary one. A stale file a later retry no
    longer writes (a third GSPS) is in no index once the report stage wrote one."""
    outbox = tmp_path / "outbox"
    result = result_for(cr, cr_findings(cr))
    entries, _ = write_outputs(outbox, cr.manifest, result, cr.sources, HL7)
    write_outputs(outbox, cr.manifest, result, cr.sources, HL7, signoff=SIGNOFF)
    folder = entries[0].path.parent
    final = read_entries(folder, signed=True)
    for name in ("outbox.json", "outbox_final.json"):
        (folder / name).unlink()

    assert read_entries(folder) == entries
    assert read_entries(folder, signed=True) == final
    migrated = json.loads((folder / "outbox.json").read_text())
    assert migrated["migrated"] is True and migrated["version"] == 0
    assert json.loads((folder / "outbox_final.json").read_text())["version"] == 1
    (folder / "gsps_7.dcm").write_bytes(b"not listed")  # a legacy name: the index, not the name, decides
    assert read_entries(folder) == entries
    assert read_entries(tmp_path / "never-written") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_entries(empty) == [] and not (empty / "outbox.json").exists()

    (folder / "outbox.json").write_text(json.dumps({"format": 1, "entries": [{"kind": "sr", "name": "../x.dcm"}]}))
    with pytest.raises(OutboxIndexError, match="is not a file of its folder"):
        read_entries(folder)


def test_the_inputs_are_checked_once_per_output_set(cr: Study, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One ReportInputs.check for the six outputs (it ran once per builder, four times, before)."""
    calls = []
    check = ReportInputs.check.__func__

    def counting(cls: type[ReportInputs], *args: object) -> ReportInputs:
        calls.append(args)
        return check(cls, *args)

    monkeypatch.setattr(ReportInputs, "check", classmethod(counting))
    entries, problems = write_outputs(tmp_path / "outbox", cr.manifest, result_for(cr, cr_findings(cr)), cr.sources,
                                      HL7)
    assert problems == [] and len(entries) == 6
    assert len(calls) == 1


def test_a_report_inputs_is_only_made_checked(cr: Study) -> None:
    inputs = cr.inputs(result_for(cr, cr_findings(cr)))
    with pytest.raises(TypeError, match=r"made by ReportInputs.check"):
        ReportInputs(manifest=inputs.manifest, result=inputs.result, sources=inputs.sources)
    with pytest.raises(TypeError):
        inputs.sources["x"] = inputs.evidence()[0]  # type: ignore[index]


def test_only_the_analysed_images_are_read_with_pixels_and_the_outputs_are_the_same(tmp_path: Path) -> None:
    """Issue 21: the report stage read every slice of a study with its pixel data (a 300-slice CT, 8 slices
    analysed). Read with pixels only the analysed images and those with findings, the outputs are byte for byte
    those built from every image read whole (GSPS windows from pixels: the MR slices carry no window)."""
    spool = tmp_path / "spool"
    slices = classic_slices("MR_small.dcm", 12)
    relatives = []
    for k, ds in enumerate(slices):
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        relatives.append(f"mr/{k:02d}.dcm")
        write_source(spool, relatives[-1], ds)
    study = Study(spool, manifest_for(spool, relatives), [])
    uids = [instance.sop_instance_uid for _, instance in study.manifest.instances()]
    analysed = [uids[3], uids[6], uids[9]]
    result = result_for(study, [Finding(label="nodule", sop_instance_uid=uids[6], box=(10.0, 12.0, 30.0, 34.0))],
                        analysed=analysed)
    assert pixel_sources(result) == set(analysed)

    partial = read_sources(spool, study.manifest, pixel_sources(result))
    assert [str(ds.SOPInstanceUID) for ds in partial if "PixelData" in ds] == analysed
    whole = read_sources(spool, study.manifest)
    assert all("PixelData" in ds for ds in whole)

    built = {}
    for name, sources in (("partial", partial), ("whole", whole)):
        entries = write_outbox(tmp_path / name, study.manifest, result, sources, HL7)
        built[name] = {entry.path.name: _without_clock(entry.path) for entry in entries}
    assert sorted(built["partial"]) == ["findings.json", "gsps_1.dcm", "narrative.dcm", "oru.hl7", "overlay_1.png",
                                        "sr.dcm"]
    assert built["partial"] == built["whole"]


def _without_clock(path: Path) -> bytes:
    """The file's bytes; a DICOM file's with the times highdicom stamps from the wall clock emptied."""
    if path.suffix != ".dcm":
        return path.read_bytes()
    ds = pydicom.dcmread(path)
    ds.InstanceCreationTime = ""
    if "PresentationCreationTime" in ds:
        ds.PresentationCreationTime = ""
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = ""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
