"""Source images as the output builders need them: real-world DICOM made to fit the modules they copy.

highdicom copies the Patient, General Study and (for the evidence) the series modules of the first source into
every SR and presentation state; hl7apy and dcmtk are strict about what they are given. Real files are not: an
absent Type 2 attribute (PatientName, PatientID, PatientBirthDate, PatientSex, StudyDate/Time, StudyID,
AccessionNumber, ReferringPhysicianName, Modality), an ACR-NEMA date ``1997.04.24``, a control character in a
patient's name. :func:`conform` fixes each on the in-memory dataset (the spooled file is never changed):

- an absent Type 2 attribute of those modules is added empty (a Type 2 attribute may be empty, never absent);
- a date that is not ``YYYYMMDD`` is converted when it is ``YYYY.MM.DD`` and emptied otherwise (a time that is
  not ``HHMMSS[.F]`` is emptied), since a wrong date is worse than none;
- control characters (other than none: these are single-line attributes) are removed from patient and study
  text attributes.

No value is logged: only the attribute's keyword.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

logger = logging.getLogger(__name__)

TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality")
DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
TIMES = ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime")
TEXTS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientSex", "ReferringPhysicianName", "StudyID",
         "AccessionNumber", "StudyDescription", "SeriesDescription", "InstitutionName", "BodyPartExamined",
         "Modality", "Laterality")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DATE = re.compile(r"\d{8}")
_ACR_NEMA_DATE = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def conform(dataset: Dataset) -> Dataset:
    """*dataset*, changed in place as described in the module docstring; returned for chaining."""
    for keyword in TYPE2_EMPTY:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    for keyword in TEXTS:
        _clean_text(dataset, keyword)
    for keyword in DATES:
        _fix(dataset, keyword, _date)
    for keyword in TIMES:
        _fix(dataset, keyword, _time)
    return dataset


def _raw(dataset: Dataset, keyword: str) -> str | None:
    if keyword not in dataset:
        return None
    value = dataset[keyword].value
    if value is None:
        return ""
    if isinstance(value, PersonName):
        return str(value)
    return value if isinstance(value, str) else None  # multi-valued or binary: left as it is


def _clean_text(dataset: Dataset, keyword: str) -> None:
    value = _raw(dataset, keyword)
    if value and _CONTROL.search(value):
        setattr(dataset, keyword, _CONTROL.sub("", value).strip())
        logger.info("%s had control characters; removed for the outputs", keyword)


def _date(value: str) -> str:
    text = value.strip()
    match = _ACR_NEMA_DATE.fullmatch(text)
    if match:
        return "".join(match.groups())
    return text if _DATE.fullmatch(text) else ""


def _time(value: str) -> str:
    text = value.strip().replace(":", "")
    return text if _TIME.fullmatch(text) else ""


def _fix(dataset: Dataset, keyword: str, convert: Callable[[str], str]) -> None:
    value = _raw(dataset, keyword)
    if not value:
        return
    fixed = convert(value)
    if fixed != value:
        setattr(dataset, keyword, fixed)
        logger.info("%s was not a DICOM %s; %s for the outputs", keyword,
                    "date" if keyword in DATES else "time", "converted" if fixed else "left empty")
