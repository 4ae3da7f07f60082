"""Sample study manifest and analysis result for HL7 tests (odd characters on purpose); reusable end to end."""

from __future__ import annotations

from datetime import UTC, datetime

from core.manifest import InstanceEntry, SeriesEntry, StudyInfo, StudyManifest
from core.result import AnalysisResult, DraftReport, Finding, ModelIdentity
from reporting.hl7_oru import HL7Endpoints

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
ENDPOINTS = HL7Endpoints("RADDRAFT", "RAD^DEPT", "RIS", "HOSP&1")
MESSAGE_TIME = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def make_manifest(body_part_examined: str = "", **study: str) -> StudyManifest:
    info = {
        "patient_name": "O'Brien^Mary^Ann^Dr.^Jr.",
        "patient_id": "PID-42",
        "issuer_of_patient_id": "HOSP&MRN",
        "patient_birth_date": "19610203",
        "patient_sex": "F",
        "accession_number": "ACC^001",
        "study_date": "20240501",
        "study_time": "134501.123456",
        "study_description": "CT Chest w/o contrast",
    } | study
    instance = InstanceEntry(sop_instance_uid=f"{STUDY_UID}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                             path="a/b.dcm", transfer_syntax_uid="1.2.840.10008.1.2.1", rows=64, columns=64)
    series = SeriesEntry(series_instance_uid=f"{STUDY_UID}.1", modality="CT", body_part_examined=body_part_examined,
                         instances=[instance])
    return StudyManifest(study_instance_uid=STUDY_UID, episode_id=3, created_at=MESSAGE_TIME,
                         study=StudyInfo(**info), series=[series])


def make_result(status: str = "preliminary", findings_text: str = "Line one.\nLine | two ^ & ~ \\ end.",
                findings: list[Finding] | None = None) -> AnalysisResult:
    if findings is None:
        findings = [
            Finding(label="Pneumothorax", sop_instance_uid=f"{STUDY_UID}.1.1", box=(1, 2, 30, 40),
                    laterality="left", site="apex", description="small\nno shift"),
            Finding(label="ground glass & haze", sop_instance_uid=f"{STUDY_UID}.1.1", box=(5, 5, 9, 9)),
        ]
    return AnalysisResult(
        study_instance_uid=STUDY_UID, episode_id=3,
        model=ModelIdentity(name="minigpt-med", version="1.0"),
        report=DraftReport(findings=findings_text, impression="No acute | finding."),
        findings=findings, analysed_instances=[f"{STUDY_UID}.1.1"], status=status, created_at=MESSAGE_TIME,
    )
