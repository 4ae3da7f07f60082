"""HL7 v2.5.1 ORU^R01 for a study's report and findings: one pure function, manifest + result in, bytes out.

Layout of the message (segments separated by ``\\r``, UTF-8, MSH-18 ``UNICODE UTF-8``)::

    MSH  sending/receiving application and facility, MSH-9 ORU^R01^ORU_R01, MSH-10 control id, MSH-12 2.5.1
    PID  PID-3 patient ID (CX, issuer in CX-4), PID-5 name (XPN from DICOM PN), PID-7 birth date, PID-8 sex
    ORC  RE, placer/filler order number = accession number (see "Studies without an order" below)
    OBR  OBR-2/3 accession, OBR-4 study description, OBR-7 study date/time, OBR-25 result status
    OBX  ST   110180^Study Instance UID^DCM
    OBX  TX   59776-5^Procedure findings^LN, sub-ID 1: one OBX per line of the findings text
    OBX  TX   19005-8^Radiology Imaging study [Impression] (narrative)^LN, sub-ID 2: one per impression line
    OBX  CWE  121071^Finding^DCM, sub-ID 3, 4, ...: one per finding, the label coded with the one table of
              reporting/codes.py (SNOMED CT; generic "Finding" for an unknown label), the label with its site
              and laterality in CWE-9 (original text); NTE after it for each line of the finding's description
    OBX  TX   AI-CONSISTENCY^AI text and image consistency^99RADDRAFT, sub-ID after the findings' (grounded
              drafts where anything is not grounded): "AI consistency: N of M stated findings localized; K boxes
              not stated in the text", then "Localized by the AI, not stated in the draft text: <label> (<side>)"

A grounded preliminary draft (reporting/consistency.py) also has " [not localized by the AI]" after each
findings/impression sentence no box supports, and an NTE "Localized by the AI, not stated in the draft text"
under each finding no sentence states. A result written before grounding, or signed, has neither.

OBR-25 and every OBX-11 carry the same result status: P for the AI draft, F after a radiologist signed, C for a
correction. Free text is escaped here (``\\E\\ \\F\\ \\S\\ \\T\\ \\R\\``) before hl7apy sees it; hl7apy only escapes
some of the delimiters and leaves complete escape sequences alone. Line breaks become separate OBX/NTE segments,
and a line break in a single-line attribute (name, ID, description) is an error, as it is in DICOM.

Studies without an order: unscheduled and imported studies have an empty AccessionNumber (DICOM Type 2). With
``unsolicited=True`` (setting ``hl7_without_accession = unsolicited``, the default) the ORU is an unsolicited
result: no placer order number, and a filler order number raddraft assigns from the Study Instance UID
(:func:`assigned_filler_order_number`, the same for every message of the study) in ORC-3 / OBR-3. With
``unsolicited=False`` (``skip``) no ORU is built: :class:`HL7NotApplicable` says why, and the pipeline records
the HL7 output as skipped. A study without a Patient ID is always skipped (PID-3 is required).

Error texts never carry a patient value: they name the attribute and the rule only. A date that is not a DICOM
date (the ACR-NEMA ``YYYY.MM.DD`` of old files is converted) is left out of the message, not fatal.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message

from core.manifest import StudyManifest
from core.result import AnalysisResult, Finding
from core.settings import Settings
from reporting import codes as rcodes
from reporting.consistency import draft_grounding

logger = logging.getLogger(__name__)

HL7_VERSION = "2.5.1"
MAX_CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in v2.5.1
MAX_TEXT_VALUE_LENGTH = 199  # hl7apy's strict length of one TX value in OBX-5 and FT in NTE-3

STUDY_UID_OBSERVATION = ("110180", "Study Instance UID", "DCM")
FINDINGS_TEXT_OBSERVATION = ("59776-5", "Procedure findings", "LN")
IMPRESSION_TEXT_OBSERVATION = ("19005-8", "Radiology Imaging study [Impression] (narrative)", "LN")
FINDING_OBSERVATION = ("121071", "Finding", "DCM")
# A local code (HL7 table 0396 "99zzz": a locally defined coding system, the designator raddraft's SR uses too):
# neither LOINC nor DICOM has a concept for the agreement of an AI draft's text with its boxes.
CONSISTENCY_OBSERVATION = ("AI-CONSISTENCY", "AI text and image consistency", rcodes.RADDRAFT_SCHEME)
BOX_ONLY_NOTE = "Localized by the AI, not stated in the draft text"

_SEX_TO_HL7 = {"M": "M", "F": "F", "O": "O", "": "U"}  # DICOM (0010,0040) -> HL7 table 0001
_ORDER_STATUS = {"P": "A", "F": "CM", "C": "CM"}  # ORC-5, HL7 table 0038: A = some results available
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_DICOM_TIME = re.compile(r"(?P<hh>\d{2})(?:(?P<mm>\d{2})(?:(?P<ss>\d{2})(?:\.(?P<frac>\d{1,6}))?)?)?")

class ResultStatus(StrEnum):
    """OBR-25 / OBX-11 result status (HL7 table 0085)."""

    PRELIMINARY = "P"
    FINAL = "F"
    CORRECTED = "C"


class HL7BuildError(ValueError):
    """The manifest or result cannot be expressed as a valid ORU^R01; the message names the attribute (never its
    value: it may be patient data)."""


class HL7NotApplicable(HL7BuildError):
    """No ORU is sent for this study by design (no order number under the ``skip`` policy, no Patient ID)."""


FILLER_NAMESPACE = "RADDRAFT"  # EI-2 of the filler order numbers raddraft assigns


def assigned_filler_order_number(study_uid: str) -> str:
    """The filler order number raddraft assigns to a study that has no accession number: ``RD`` + 14 hex digits
    of the SHA-256 of the Study Instance UID (stable across episodes and re-sends of the same study)."""
    return "RD" + hashlib.sha256(study_uid.encode()).hexdigest()[:14].upper()


@dataclass(frozen=True)
class HL7Endpoints:
    """MSH-3 to MSH-6."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str

    @classmethod
    def from_settings(cls, settings: Settings) -> HL7Endpoints:
        return cls(
            sending_application=settings.hl7_sending_application,
            sending_facility=settings.hl7_sending_facility,
            receiving_application=settings.hl7_receiving_application,
            receiving_facility=settings.hl7_receiving_facility,
        )


@dataclass(frozen=True)
class CodedConcept:
    code: str
    meaning: str
    scheme: str  # HL7 table 0396: SCT, LN, DCM (the DICOM coding scheme designators are the same names)
    is_fallback: bool = False  # the label is not in reporting/codes.py: generic SNOMED CT "Finding"


def finding_code(label: str) -> CodedConcept:
    """The code of a finding label from the one table in reporting/codes.py (the SR uses the same).

    An unknown label gets the generic SNOMED CT "Finding" (404684003); its words go to CWE-9 (original text).
    """
    coded = rcodes.lookup_finding(label)
    code = coded.finding_type
    return CodedConcept(code=code.value, meaning=code.meaning, scheme=code.scheme_designator,
                        is_fallback=coded.is_fallback)


def new_control_id() -> str:
    """A fresh MSH-10 value (20 characters). Store it with the outgoing message: a retry must reuse it."""
    return uuid.uuid4().hex[:MAX_CONTROL_ID_LENGTH]


def escape(text: str, what: str) -> str:
    """Escape an HL7 v2 text value for any position (field, component or subcomponent).

    ``what`` names the attribute for the error raised on a line break or other control character.
    """
    if _CONTROL_CHARS.search(text):
        raise HL7BuildError(f"{what} contains a line break or control character; it must be a single line of text")
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def text_lines(text: str, what: str, width: int = MAX_TEXT_VALUE_LENGTH) -> list[str]:
    """Escaped HL7 values, one per line of *text*; a line longer than *width* once escaped is wrapped at word
    boundaries (a word longer than the width is split) so every value fits one TX / FT field."""
    values: list[str] = []
    for line in text.splitlines():
        words = line.split(" ")
        current = ""
        for word in words:
            candidate = f"{current} {word}" if current else word
            if len(escape(candidate, what)) <= width:
                current = candidate
                continue
            if current:
                values.append(escape(current, what))
            current = word
            while len(escape(current, what)) > width:  # a single word too long for one value
                cut = width
                while len(escape(current[:cut], what)) > width:
                    cut -= 1
                values.append(escape(current[:cut], what))
                current = current[cut:]
        values.append(escape(current, what))
    return values


def build_oru_r01(
    manifest: StudyManifest,
    result: AnalysisResult,
    status: ResultStatus,
    *,
    endpoints: HL7Endpoints,
    control_id: str,
    message_time: datetime,
    unsolicited: bool = True,
) -> bytes:
    """ORU^R01 v2.5.1 for one study's report; ``\\r``-separated segments, UTF-8 encoded.

    Raises ``HL7BuildError`` when the status contradicts the result (an unsigned draft is only ever P), when
    the result belongs to another study, or when an attribute cannot be sent (named in the message), and
    ``HL7NotApplicable`` when the study has no Patient ID, or no accession number and *unsolicited* is False.
    """
    status = ResultStatus(status)
    _check_status(result, status)
    if result.study_instance_uid != manifest.study_instance_uid:
        raise HL7BuildError(f"AnalysisResult.study_instance_uid {result.study_instance_uid} is not the manifest's "
                            f"study {manifest.study_instance_uid}")
    _check_control_id(control_id)
    study = manifest.study
    if not study.patient_id.strip():
        raise HL7NotApplicable("the study has no Patient ID; an ORU^R01 needs one in PID-3")
    if study.accession_number.strip():
        placer = filler = escape(study.accession_number.strip(), "StudyInfo.accession_number")
    elif unsolicited:
        placer, filler = "", f"{assigned_filler_order_number(manifest.study_instance_uid)}^{FILLER_NAMESPACE}"
    else:
        raise HL7NotApplicable("the study has no accession number (no order) and hl7_without_accession is 'skip'")

    message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = message.msh
    msh.msh_3 = escape(endpoints.sending_application, "sending application")
    msh.msh_4 = escape(endpoints.sending_facility, "sending facility")
    msh.msh_5 = escape(endpoints.receiving_application, "receiving application")
    msh.msh_6 = escape(endpoints.receiving_facility, "receiving facility")
    msh.msh_7 = _hl7_datetime(message_time)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control_id
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"

    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").add_segment("PID")
    pid.pid_1 = "1"
    pid.pid_3 = _patient_identifier(study.patient_id, study.issuer_of_patient_id)
    pid.pid_5 = person_name_to_xpn(study.patient_name)
    birth_date = dicom_date(study.patient_birth_date)
    if birth_date:
        pid.pid_7 = birth_date
    pid.pid_8 = _sex(study.patient_sex)

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"
    if placer:
        orc.orc_2 = placer
    orc.orc_3 = filler
    orc.orc_5 = _ORDER_STATUS[status]
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    if placer:
        obr.obr_2 = placer
    obr.obr_3 = filler
    obr.obr_4 = "^" + escape(_procedure_text(manifest), "StudyInfo.study_description")
    observed = _dicom_datetime(study.study_date, study.study_time)
    if observed:
        obr.obr_7 = observed
    obr.obr_22 = _hl7_datetime(message_time)
    obr.obr_24 = "RAD"
    obr.obr_25 = status.value

    observations = _Observations(order, status)
    observations.add("ST", STUDY_UID_OBSERVATION, "", escape(manifest.study_instance_uid, "study_instance_uid"))
    grounding = draft_grounding(result)
    findings_text = grounding.annotated("findings") if grounding else result.report.findings
    impression_text = grounding.annotated("impression") if grounding else result.report.impression
    for line in text_lines(findings_text, "report findings line"):
        observations.add("TX", FINDINGS_TEXT_OBSERVATION, "1", line)
    for line in text_lines(impression_text, "report impression line"):
        observations.add("TX", IMPRESSION_TEXT_OBSERVATION, "2", line)
    for number, finding in enumerate(result.findings, start=1):
        group = observations.add("CWE", FINDING_OBSERVATION, str(2 + number),
                                 _finding_value(manifest, finding, number))
        notes = text_lines(finding.description, f"description of finding {number}")
        if grounding is not None and finding.status == "box_only":
            notes.append(escape(BOX_ONLY_NOTE, "consistency note"))
        for index, line in enumerate(notes, start=1):
            nte = group.add_segment("NTE")
            nte.nte_1 = str(index)
            nte.nte_3 = line
    if grounding is not None and grounding.flagged:
        sub_id = str(3 + len(result.findings))
        for line in [grounding.summary(), *grounding.box_only_lines()]:
            for value in text_lines(line, "consistency line"):
                observations.add("TX", CONSISTENCY_OBSERVATION, sub_id, value)

    text = message.to_er7() + "\r"  # every segment, the last included, ends with a carriage return
    logger.debug("built ORU^R01 %s (%s) for study %s: %d OBX", control_id, status.value,
                 manifest.study_instance_uid, observations.count)
    return text.encode("utf-8")


def oru_r01_from_settings(
    manifest: StudyManifest,
    result: AnalysisResult,
    status: ResultStatus,
    *,
    settings: Settings,
    control_id: str,
    message_time: datetime,
) -> bytes:
    """``build_oru_r01`` with MSH-3..6 taken from ``settings.hl7_sending_*`` / ``hl7_receiving_*`` and the
    policy for studies without an accession number from ``settings.hl7_without_accession``."""
    return build_oru_r01(manifest, result, status, endpoints=HL7Endpoints.from_settings(settings),
                         control_id=control_id, message_time=message_time,
                         unsolicited=settings.hl7_without_accession == "unsolicited")


def person_name_to_xpn(person_name: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` (alphabetic group) -> escaped XPN.

    XPN order is family, given, middle, suffix, prefix, degree, name type (L = legal; U when the name is empty).
    """
    alphabetic = person_name.split("=", 1)[0]
    components = alphabetic.split("^")
    if len(components) > 5:  # not a valid PN: the components past the fifth are kept in the suffix
        components = [*components[:4], " ".join(c for c in components[4:] if c)]
    parts = [*components, "", "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (escape(p.strip(), "StudyInfo.patient_name") for p in parts)
    if not any((family, given, middle, prefix, suffix)):
        return "^^^^^^U"
    return f"{family}^{given}^{middle}^{suffix}^{prefix}^^L"


class _Observations:
    """Appends OBSERVATION groups (OBX + NTE) with consecutive OBX-1 and one result status."""

    def __init__(self, order: Group, status: ResultStatus) -> None:
        self._order = order
        self._status = status
        self.count = 0

    def add(self, value_type: str, identifier: tuple[str, str, str], sub_id: str, value: str) -> Group:
        self.count += 1
        group = self._order.add_group("ORU_R01_OBSERVATION")
        obx = group.add_segment("OBX")
        obx.obx_1 = str(self.count)
        obx.obx_2 = value_type
        obx.obx_3 = "^".join(escape(part, "observation identifier") for part in identifier)
        if sub_id:
            obx.obx_4 = sub_id
        if value:
            obx.obx_5 = value
        obx.obx_11 = self._status.value
        return group


def _finding_value(manifest: StudyManifest, finding: Finding, number: int) -> str:
    """CWE: code^text^scheme of the finding type, CWE-9 (original text) the label with its location.

    The location is the one the SR gives the finding (reporting/codes.py ``finding_site``): the model's own
    site words when it gave some, else the anatomy its label implies or the body part examined, and laterality.
    """
    what = f"finding {number}"
    try:
        series, _ = manifest.find_instance(finding.sop_instance_uid)
    except KeyError:
        raise HL7BuildError(f"{what} ({finding.label!r}) is on SOP Instance UID {finding.sop_instance_uid}, "
                            f"which is not in the manifest of study {manifest.study_instance_uid}") from None
    concept = finding_code(finding.label)
    site = (finding.site or "").strip()
    if not site:
        site_code = rcodes.finding_site(rcodes.lookup_finding(finding.label), None, series.body_part_examined)
        site = site_code.meaning if site_code is not None else ""
    location = [f"site: {site}" if site else "", f"laterality: {finding.laterality}" if finding.laterality else ""]
    location_text = "; ".join(part for part in location if part)
    label = finding.label.strip()
    original = f"{label} ({location_text})" if location_text else label
    return "^".join((
        escape(concept.code, f"code of {what}"),
        escape(concept.meaning, f"label of {what}"),
        concept.scheme,
        "", "", "", "", "",
        escape(original, f"label/site of {what}"),
    ))


def _check_status(result: AnalysisResult, status: ResultStatus) -> None:
    if result.status == "preliminary" and status is not ResultStatus.PRELIMINARY:
        raise HL7BuildError(f"result status {status.value} is not allowed for an unsigned AI draft "
                            f"(AnalysisResult.status 'preliminary'); it must be P until a radiologist signs")
    if result.status == "final" and status is ResultStatus.PRELIMINARY:
        raise HL7BuildError("result status P is not allowed for a signed report (AnalysisResult.status 'final'); "
                            "use F, or C for a correction")


def _check_control_id(control_id: str) -> None:
    if not control_id or len(control_id) > MAX_CONTROL_ID_LENGTH:
        raise HL7BuildError(f"message control id {control_id!r} must be 1-{MAX_CONTROL_ID_LENGTH} characters (MSH-10)")
    if not re.fullmatch(r"[\x21-\x7e]+", control_id) or any(c in control_id for c in "|^~\\&"):
        raise HL7BuildError(f"message control id {control_id!r} must be printable ASCII without spaces "
                            "or HL7 delimiters (MSH-10)")


def _patient_identifier(patient_id: str, issuer: str) -> str:
    """CX: ID^^^assigning authority^MR."""
    cx = escape(patient_id.strip(), "StudyInfo.patient_id")
    if issuer.strip():
        return f"{cx}^^^{escape(issuer.strip(), 'StudyInfo.issuer_of_patient_id')}^MR"
    return f"{cx}^^^^MR"


def _sex(dicom_sex: str) -> str:
    """HL7 administrative sex; a value that is not a DICOM PatientSex (M, F, O) is sent as U (unknown)."""
    return _SEX_TO_HL7.get(dicom_sex.strip().upper(), "U")


def _procedure_text(manifest: StudyManifest) -> str:
    """OBR-4 text: the study description, else the modalities (e.g. ``CT study``)."""
    description = manifest.study.study_description.strip()
    if description:
        return description
    modalities = "/".join(manifest.modalities) or "Imaging"
    logger.debug("study %s has no description; OBR-4 says %s study", manifest.study_instance_uid, modalities)
    return f"{modalities} study"


def dicom_date(value: str) -> str:
    """A DICOM DA as ``YYYYMMDD``; the ACR-NEMA form ``YYYY.MM.DD`` is converted; anything else (empty, not a
    calendar date) is ``""``: the date is left out rather than sent wrong."""
    text = value.strip()
    if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text):
        text = text.replace(".", "")
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        if text:
            logger.info("a date that is not a DICOM date (YYYYMMDD) is left out of the ORU")
        return ""
    return text


def _dicom_datetime(date: str, time: str) -> str:
    """DICOM DA + TM -> HL7 DTM ``YYYYMMDD[HH[MM[SS[.SSSS]]]]`` (HL7 allows 4 fraction digits); ``""`` without a
    valid date, the date alone when the time is not a DICOM time."""
    result = dicom_date(date)
    time = time.strip().replace(":", "")
    if not result or not time:
        return result
    match = _DICOM_TIME.fullmatch(time)
    if match is None or int(match["hh"]) > 23 or int(match["mm"] or 0) > 59 or int(match["ss"] or 0) > 60:
        logger.info("a time that is not a DICOM time (HHMMSS) is left out of the ORU")
        return result
    result += match["hh"] + (match["mm"] or "") + (match["ss"] or "")
    if match["frac"]:
        result += "." + match["frac"][:4]
    return result


def _hl7_datetime(value: datetime) -> str:
    """HL7 DTM with seconds, and the UTC offset when the datetime is aware."""
    return value.strftime("%Y%m%d%H%M%S%z")
