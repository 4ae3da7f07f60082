"""ORU^R01 built from a manifest + result: strict hl7apy validation and a python-hl7 round trip of every field."""

from __future__ import annotations

import hl7
import pytest
from hl7_samples import ENDPOINTS, MESSAGE_TIME, STUDY_UID, make_manifest, make_result
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from core.manifest import StudyManifest
from core.result import AnalysisResult, Finding
from core.settings import Settings
from model.examples import MODALITY_LABELS
from reporting import codes as rcodes
from reporting.hl7_oru import (
    FILLER_NAMESPACE,
    MAX_TEXT_VALUE_LENGTH,
    HL7BuildError,
    HL7NotApplicable,
    ResultStatus,
    assigned_filler_order_number,
    build_oru_r01,
    escape,
    finding_code,
    oru_r01_from_settings,
    text_lines,
)

ODD_TEXT = "a|b^c&d~e\\f \\F\\ literal"

def build(manifest: StudyManifest | None = None, result: AnalysisResult | None = None,
          status: ResultStatus = ResultStatus.PRELIMINARY, control_id: str = "CTRL0001") -> bytes:
    return build_oru_r01(manifest or make_manifest(), result or make_result(), status,
                         endpoints=ENDPOINTS, control_id=control_id, message_time=MESSAGE_TIME)


def parsed(data: bytes) -> hl7.Message:
    return hl7.parse(data.decode("utf-8"))


def obx_values(message: hl7.Message, code: str) -> list[str]:
    return [obx.extract_field(1, 5) for obx in message.segments("OBX") if obx.extract_field(1, 3, 1, 1) == code]


def test_message_validates_in_hl7apy_strict_mode() -> None:
    data = build()
    text = data.decode("utf-8")
    assert "\n" not in text
    assert text.endswith("\r")
    assert text.count("\r") == len(text.rstrip("\r").split("\r"))
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert message.validate() is True
    assert message.name == "ORU_R01"
    assert [segment.name for segment in message.children] == ["MSH", "ORU_R01_PATIENT_RESULT"]


def test_header_fields_round_trip() -> None:
    message = parsed(build(control_id="C-77"))
    assert message["MSH.F3"] == "RADDRAFT"
    assert message["MSH.F4"] == "RAD^DEPT"
    assert message["MSH.F5"] == "RIS"
    assert message["MSH.F6"] == "HOSP&1"
    assert message["MSH.F7"] == "20240506070809+0000"
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert message["MSH.F10"] == "C-77"
    assert message["MSH.F12"] == "2.5.1"
    assert message["MSH.F18"] == "UNICODE UTF-8"


def test_patient_fields_round_trip() -> None:
    message = parsed(build())
    assert message["PID.F3.R1.C1"] == "PID-42"
    assert message["PID.F3.R1.C4"] == "HOSP&MRN"
    assert message["PID.F3.R1.C5"] == "MR"
    name = [message[f"PID.F5.R1.C{i}"] for i in range(1, 8)]
    # DICOM Family^Given^Middle^Prefix^Suffix -> XPN family^given^middle^suffix^prefix^degree^type
    assert name == ["O'Brien", "Mary", "Ann", "Jr.", "Dr.", "", "L"]
    assert message["PID.F7"] == "19610203"
    assert message["PID.F8"] == "F"


@pytest.mark.parametrize(
    ("dicom_name", "family", "given"),
    [
        ("Müller-Lüdenscheidt^Jürgen", "Müller-Lüdenscheidt", "Jürgen"),
        ("A^B&C|D~E\\F", "A", "B&C|D~E\\F"),
        ("Smith&Jones|x~y\\z^Given=山田^太郎", "Smith&Jones|x~y\\z", "Given"),
    ],
)
def test_odd_patient_names_round_trip(dicom_name: str, family: str, given: str) -> None:
    data = build(make_manifest(patient_name=dicom_name))
    parse_message(data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT).validate()
    message = parsed(data)
    assert message["PID.F5.R1.C1"] == family
    assert message["PID.F5.R1.C2"] == given
    assert len(message.segment("PID")(5)(1)) == 7  # nothing leaked into extra components


def test_empty_name_is_unspecified_and_sex_maps_to_table_0001() -> None:
    message = parsed(build(make_manifest(patient_name="", patient_sex="", patient_birth_date="")))
    assert message["PID.F5.R1.C7"] == "U"
    assert message["PID.F5.R1.C1"] == ""
    assert message["PID.F8"] == "U"
    assert message["PID.F7"] == ""
    assert parsed(build(make_manifest(patient_sex="O")))["PID.F8"] == "O"


def test_order_carries_accession_description_and_study_time() -> None:
    message = parsed(build())
    assert message["ORC.F1"] == "RE"
    assert message["ORC.F2"] == message["ORC.F3"] == "ACC^001"
    assert message["OBR.F2"] == message["OBR.F3"] == "ACC^001"
    assert message["OBR.F4.R1.C2"] == "CT Chest w/o contrast"
    assert message["OBR.F7"] == "20240501134501.1234"
    assert message["OBR.F24"] == "RAD"


def test_missing_description_falls_back_to_modalities() -> None:
    message = parsed(build(make_manifest(study_description="", study_time="")))
    assert message["OBR.F4.R1.C2"] == "CT study"
    assert message["OBR.F7"] == "20240501"


@pytest.mark.parametrize(
    ("result_status", "status", "order_status"),
    [("preliminary", ResultStatus.PRELIMINARY, "A"), ("final", ResultStatus.FINAL, "CM"),
     ("final", ResultStatus.CORRECTED, "CM")],
)
def test_result_status_in_obr_25_and_every_obx_11(result_status: str, status: ResultStatus, order_status: str) -> None:
    data = build(result=make_result(status=result_status), status=status)
    assert parse_message(data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT).validate() is True
    message = parsed(data)
    assert message["OBR.F25"] == status.value
    assert message["ORC.F5"] == order_status
    observations = message.segments("OBX")
    assert len(observations) > 3
    assert {obx.extract_field(1, 11) for obx in observations} == {status.value}
    assert [obx.extract_field(1, 1) for obx in observations] == [str(i) for i in range(1, len(observations) + 1)]


def test_unsigned_draft_cannot_be_final_and_signed_cannot_be_preliminary() -> None:
    with pytest.raises(HL7BuildError, match="not allowed for an unsigned AI draft"):
        build(result=make_result(status="preliminary"), status=ResultStatus.FINAL)
    with pytest.raises(HL7BuildError, match="not allowed for a signed report"):
        build(result=make_result(status="final"), status=ResultStatus.PRELIMINARY)


def test_report_text_lines_round_trip() -> None:
    findings_text = f"First line.\n{ODD_TEXT}\n\nAfter a blank line."
    message = parsed(build(result=make_result(findings_text=findings_text)))
    assert obx_values(message, "59776-5") == findings_text.split("\n")
    assert obx_values(message, "19005-8") == ["No acute | finding."]
    text_obx = [obx for obx in message.segments("OBX") if obx.extract_field(1, 2) == "TX"]
    assert len(text_obx) == 5


def test_study_instance_uid_observation() -> None:
    message = parsed(build())
    (uid_obx,) = [obx for obx in message.segments("OBX") if obx.extract_field(1, 3, 1, 1) == "110180"]
    assert uid_obx.extract_field(1, 2) == "ST"
    assert uid_obx.extract_field(1, 3, 1, 3) == "DCM"
    assert uid_obx.extract_field(1, 5) == STUDY_UID


def test_one_coded_observation_per_finding_with_location() -> None:
    message = parsed(build())
    coded = [obx for obx in message.segments("OBX") if obx.extract_field(1, 2) == "CWE"]
    assert len(coded) == 2
    first, second = coded
    assert [first.extract_field(1, 5, 1, i) for i in (1, 2, 3)] == ["36118008", "Pneumothorax", "SCT"]
    assert first.extract_field(1, 5, 1, 9) == "Pneumothorax (site: apex; laterality: left)"
    assert first.extract_field(1, 4) == "3"
    # not in reporting/codes.py: the generic SNOMED CT "Finding", the model's words kept as original text
    assert [second.extract_field(1, 5, 1, i) for i in (1, 2, 3, 9)] == [
        "404684003", "Finding", "SCT", "ground glass & haze"]
    assert second.extract_field(1, 4) == "4"
    # the first finding's description follows its OBX as NTE lines
    notes = [segment for segment in message.segments("NTE")]
    assert [note.extract_field(1, 3) for note in notes] == ["small", "no shift"]
    assert len(parsed(build(result=make_result(findings=[]))).segments("OBX")) == 4


def test_finding_code_lookup_is_case_and_space_insensitive() -> None:
    assert finding_code("  Pleural   EFFUSION ").code == "60046008"
    widget = finding_code("widget")
    assert (widget.code, widget.scheme, widget.is_fallback) == ("404684003", "SCT", True)


@pytest.mark.parametrize("label", sorted({label for labels in MODALITY_LABELS.values() for label in labels}))
def test_hl7_and_sr_code_every_model_label_from_the_one_table(label: str) -> None:
    """The ORU and the SR code a label identically: both read reporting/codes.py, nothing else."""
    coded = rcodes.lookup_finding(label)
    assert not coded.is_fallback
    hl7_code = finding_code(label)
    assert (hl7_code.code, hl7_code.meaning, hl7_code.scheme) == (
        coded.finding_type.value, coded.finding_type.meaning, coded.finding_type.scheme_designator)
    pixel_box = (1.0, 2.0, 30.0, 40.0)
    finding = Finding(label=label, sop_instance_uid=f"{STUDY_UID}.1.1", box=pixel_box)
    message = parsed(build(result=make_result(findings=[finding])))
    (obx,) = [obx for obx in message.segments("OBX") if obx.extract_field(1, 2) == "CWE"]
    assert [obx.extract_field(1, 5, 1, i) for i in (1, 3)] == [coded.finding_type.value, "SCT"]


def test_finding_location_is_the_srs_finding_site_when_the_model_gave_none() -> None:
    uid = f"{STUDY_UID}.1.1"
    findings = [
        Finding(label="pleural effusion", sop_instance_uid=uid, box=(1, 2, 30, 40), laterality="right"),  # label
        Finding(label="nodule", sop_instance_uid=uid, box=(1, 2, 30, 40)),  # body part examined
        Finding(label="nodule", sop_instance_uid=uid, box=(1, 2, 30, 40), site="left upper lobe"),  # model words
    ]
    message = parsed(build(make_manifest(body_part_examined="CHEST"), make_result(findings=findings)))
    texts = [obx.extract_field(1, 5, 1, 9) for obx in message.segments("OBX") if obx.extract_field(1, 2) == "CWE"]
    assert texts == ["pleural effusion (site: Pleura; laterality: right)", "nodule (site: Thorax)",
                     "nodule (site: left upper lobe)"]


def test_finding_on_an_image_outside_the_manifest_is_an_error() -> None:
    stray = Finding(label="mass", sop_instance_uid="1.2.3.4.5", box=(1, 2, 3, 4))
    with pytest.raises(HL7BuildError, match=r"finding 1 \('mass'\) is on SOP Instance UID 1\.2\.3\.4\.5, which is "
                                            r"not in the manifest"):
        build(result=make_result(findings=[stray]))


@pytest.mark.parametrize(
    ("study", "field", "expected"),
    [
        ({"patient_birth_date": "1961.02.03"}, "PID.F7", "19610203"),  # ACR-NEMA date of an old real file
        ({"patient_birth_date": "1961-02-03"}, "PID.F7", ""),  # not a DICOM date: left out
        ({"patient_birth_date": ""}, "PID.F7", ""),
        ({"patient_sex": "X"}, "PID.F8", "U"),
        ({"study_time": "25"}, "OBR.F7", "20240501"),  # the date alone
        ({"study_date": "", "study_time": "101500"}, "OBR.F7", ""),
        ({"patient_name": "a^b^c^d^e^f"}, "PID.F5", "a^b^c^e f^d^^L"),
        ({"patient_name": ""}, "PID.F5", "^^^^^^U"),
    ],
)
def test_real_world_values_are_converted_or_left_out(study: dict[str, str], field: str, expected: str) -> None:
    message = parsed(build(make_manifest(**study)))
    segment, number = field.split(".F")
    assert str(message.segment(segment)[int(number)]) == expected
    assert parse_message(build(make_manifest(**study)).decode(), validation_level=VALIDATION_LEVEL.STRICT).validate()


def test_study_without_accession_is_an_unsolicited_result_with_an_assigned_filler_number() -> None:
    data = build_oru_r01(make_manifest(accession_number=""), make_result(), ResultStatus.PRELIMINARY,
                         endpoints=ENDPOINTS, control_id="C1", message_time=MESSAGE_TIME)
    message = parsed(data)
    filler = assigned_filler_order_number(STUDY_UID)
    assert filler.startswith("RD") and len(filler) == 16
    orc, obr = message.segment("ORC"), message.segment("OBR")
    assert str(orc[2]) == "" and str(obr[2]) == ""
    assert str(orc[3]) == f"{filler}^{FILLER_NAMESPACE}" == str(obr[3])
    assert parse_message(data.decode(), validation_level=VALIDATION_LEVEL.STRICT).validate()
    again = parsed(build_oru_r01(make_manifest(accession_number=""), make_result(), ResultStatus.PRELIMINARY,
                                 endpoints=ENDPOINTS, control_id="C2", message_time=MESSAGE_TIME))
    assert str(again.segment("OBR")[3]) == str(obr[3])  # the same number for every message of the study


def test_skip_policy_and_missing_patient_id_are_not_applicable_without_patient_values() -> None:
    with pytest.raises(HL7NotApplicable, match="no accession number") as skipped:
        build_oru_r01(make_manifest(accession_number=""), make_result(), ResultStatus.PRELIMINARY,
                      endpoints=ENDPOINTS, control_id="C1", message_time=MESSAGE_TIME, unsolicited=False)
    with pytest.raises(HL7NotApplicable, match="no Patient ID") as no_id:
        build(make_manifest(patient_id=" "))
    settings = Settings(hl7_without_accession="skip")
    with pytest.raises(HL7NotApplicable):
        oru_r01_from_settings(make_manifest(accession_number=""), make_result(), ResultStatus.PRELIMINARY,
                              settings=settings, control_id="C1", message_time=MESSAGE_TIME)
    manifest = make_manifest()
    for error in (skipped.value, no_id.value):
        assert manifest.study.redact(str(error)) == str(error)


def test_an_error_text_never_carries_the_value() -> None:
    with pytest.raises(HL7BuildError, match="study_description contains a line break") as caught:
        build(make_manifest(study_description="Secret^Name\nlines"))
    assert "Secret" not in str(caught.value)


def test_control_id_and_study_mismatch_are_errors() -> None:
    with pytest.raises(HL7BuildError, match="must be 1-20 characters"):
        build(control_id="x" * 21)
    with pytest.raises(HL7BuildError, match="without spaces or HL7 delimiters"):
        build(control_id="A|B")
    other = make_result().model_copy(update={"study_instance_uid": "1.2.3"})
    with pytest.raises(HL7BuildError, match="is not the manifest's study"):
        build(result=other)


def test_escape_covers_all_delimiters() -> None:
    assert escape("|^&~\\", "x") == "\\F\\\\S\\\\T\\\\R\\\\E\\"


def test_endpoints_from_settings() -> None:
    settings = Settings(hl7_sending_application="GATEWAY", hl7_receiving_facility="WARD 7")
    message = parsed(oru_r01_from_settings(make_manifest(), make_result(), ResultStatus.PRELIMINARY,
                                           settings=settings, control_id="S1", message_time=MESSAGE_TIME))
    assert message["MSH.F3"] == "GATEWAY"
    assert message["MSH.F6"] == "WARD 7"



def test_long_report_lines_are_wrapped_into_values_that_validate_strictly() -> None:
    sentence = "There is a moderate right pleural effusion with adjacent compressive atelectasis | A^B&C~D\\E. "
    paragraph = sentence * 6 + "x" * 450
    lines = text_lines(paragraph, "findings")
    assert len(lines) > 3
    assert all(len(line) <= MAX_TEXT_VALUE_LENGTH for line in lines)
    assert text_lines("", "x") == []
    assert text_lines("a\n\nb", "x") == ["a", "", "b"]

    data = build(result=make_result(findings_text=paragraph))
    parse_message(data.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT).validate()
    values = obx_values(parsed(data), "59776-5")
    # the values come back unescaped; joined again they give the paragraph back (spaces at the cuts aside)
    rejoined = "".join(values)
    assert rejoined.replace(" ", "") == paragraph.replace(" ", "")
