"""The outbox: every output of an episode written atomically under <home>/outbox/<study_uid>/<episode>/."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from reporting_dicom_helpers import Study, cr_findings, cr_study, result_for

from core.layout import episode_dir
from core.result import Finding
from reporting.context import Signoff
from reporting.outbox import OutboxError, OutputProblem, read_problems, read_sources, write_outbox, write_outputs

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
