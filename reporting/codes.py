"""The one mapping table from model vocabulary to coded concepts (SNOMED CT, DICOM, LOINC).

Every label the model emits (see core/result.py ``Finding.label``) is looked up here; an unknown label maps
to the generic SNOMED CT "Finding" concept and keeps its text (``FindingCode.text``) so nothing is lost.
Codes come from pydicom's code dictionary where it has them (``codes.SCT.*``); the few it lacks are written
out with their SNOMED CT identifiers (SCTID) and fully specified meanings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from core.result import DraftReport, Laterality
from model.sentences import states_normal

# --- finding types ------------------------------------------------------------------------------------------
# Not in pydicom's dictionary (or present there only under a different concept):
LUNG_CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")  # the disorder concept used for chest radiograph findings

GENERIC_FINDING = codes.SCT.Finding  # 404684003 "Finding" (clinical finding): fallback for unknown labels
NO_ABNORMALITY = codes.DCM.NoAbnormality  # 111286: only when the model drew no box AND its report states a
# normal study (report_states_normal); a report stating a finding never gets it


@dataclass(frozen=True)
class FindingCode:
    """Coded meaning of one model label."""

    text: str  # the label as the model wrote it, normalized (lower case, single spaces)
    finding_type: Code
    default_site: Code | None = None  # the anatomy the finding implies, when it implies one
    is_fallback: bool = False  # True when the label is not in the table

    @property
    def display(self) -> str:
        """What a reader sees: the code meaning, or the model's own words for an unknown label."""
        return self.text if self.is_fallback else self.finding_type.meaning


_PLEURA = codes.SCT.Pleura  # 3120008
_LUNG = codes.SCT.Lung  # 39607008
_HEART = codes.SCT.Heart  # 80891009

FINDING_CODES: dict[str, tuple[Code, Code | None]] = {
    "nodule": (codes.SCT.Nodule, None),  # 27925004
    "mass": (codes.SCT.Mass, None),  # 4147007
    "pleural effusion": (codes.SCT.PleuralEffusion, _PLEURA),  # 60046008
    "effusion": (codes.SCT.PleuralEffusion, _PLEURA),
    "pneumothorax": (codes.SCT.Pneumothorax, _PLEURA),  # 36118008
    "consolidation": (LUNG_CONSOLIDATION, _LUNG),
    "cardiomegaly": (CARDIOMEGALY, _HEART),
    "tumor": (codes.SCT.Tumor, None),  # 108369006 Neoplasm
    "tumour": (codes.SCT.Tumor, None),
    "edema": (codes.SCT.Edema, None),  # 79654002
    "oedema": (codes.SCT.Edema, None),
    "pulmonary edema": (codes.SCT.PulmonaryEdema, _LUNG),  # 19242006
    "pulmonary oedema": (codes.SCT.PulmonaryEdema, _LUNG),
    "normal": (codes.SCT.Normal, None),  # 17621005
}

# --- anatomy (finding sites) --------------------------------------------------------------------------------
SITE_CODES: dict[str, Code] = {
    "lung": _LUNG,
    "lungs": _LUNG,
    "heart": _HEART,
    "pleura": _PLEURA,
    "pleural": _PLEURA,
    "mediastinum": codes.SCT.Mediastinum,  # 72410000
    "chest": codes.SCT.Thorax,  # 816094009
    "thorax": codes.SCT.Thorax,
    "brain": codes.SCT.Brain,  # 12738006
    "head": codes.SCT.Head,  # 69536005
    "liver": codes.SCT.Liver,  # 10200004
    "kidney": codes.SCT.Kidney,  # 64033007
    "abdomen": codes.SCT.Abdomen,  # 818981001
    "pelvis": codes.SCT.Pelvis,  # 816092008
    "breast": codes.SCT.Breast,  # 76752008
    "neck": codes.SCT.Neck,  # 45048000
    "spine": codes.SCT.Spine,  # 421060004
}

# DICOM Body Part Examined (CS defined terms) to anatomy, for findings whose label implies no site.
BODY_PART_SITES: dict[str, Code] = {
    "CHEST": codes.SCT.Thorax,
    "LUNG": _LUNG,
    "HEART": _HEART,
    "BRAIN": codes.SCT.Brain,
    "HEAD": codes.SCT.Head,
    "LIVER": codes.SCT.Liver,
    "ABDOMEN": codes.SCT.Abdomen,
    "PELVIS": codes.SCT.Pelvis,
    "BREAST": codes.SCT.Breast,
    "NECK": codes.SCT.Neck,
}

LATERALITY_CODES: dict[Laterality, Code] = {
    "left": codes.SCT.Left,  # 7771000
    "right": codes.SCT.Right,  # 24028007
    "bilateral": codes.SCT.RightAndLeft,  # 51440002
}

# --- procedures (TID 1500 "Procedure reported": the imaging procedure, not the algorithm) -------------------
# From CID 100 "Quantitative Diagnostic Imaging Procedures", the context group TID 1500 row 4 names. Radiographs
# get the generic "Imaging procedure": CID 100 gained "XR unspecified body region" (LN 43468-8) only recently,
# and validators built on the 2019 edition (PixelMed) reject it.
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # 363679005
CT_PROCEDURE = codes.LN.CTUnspecifiedBodyRegion  # 25045-6
MR_PROCEDURE = codes.LN.MRIUnspecifiedBodyRegion  # 25056-3
NM_PROCEDURE = codes.LN.NMUnspecifiedBodyRegion  # 49118-3
PET_PROCEDURE = codes.LN.PETUnspecifiedBodyRegion  # 44136-0

_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": CT_PROCEDURE,
    "MR": MR_PROCEDURE,
    "NM": NM_PROCEDURE,
    "PT": PET_PROCEDURE,
}

# --- consistency of a grounded draft (issue 19) --------------------------------------------------------------
# Neither DICOM (PS3.16), SNOMED CT nor LOINC has a concept for "the AI's text states this finding but it drew no
# box" or the converse, so raddraft defines two under a private coding scheme designator (PS3.3 8.2: "99" +
# the organization), registered in every SR that uses them (Coding Scheme Identification Sequence). Each names a
# TID 1500 qualitative evaluation (row 13) whose value is the finding type of the label (FINDING_CODES).
RADDRAFT_SCHEME = "99RADDRAFT"
RADDRAFT_SCHEME_NAME = "raddraft local codes"
NOT_LOCALIZED_FINDING = Code("RD001", RADDRAFT_SCHEME, "Stated finding not localized by the AI")
NOT_STATED_FINDING = Code("RD002", RADDRAFT_SCHEME, "Localized finding not stated in the draft text")

# --- narrative report (TID 2000 Basic Diagnostic Imaging Report) --------------------------------------------
DIAGNOSTIC_IMAGING_REPORT = codes.LN.DiagnosticImagingReport  # 18748-4, CID 7000
FINDINGS_SECTION = codes.DCM.Findings  # 121070, CID 7001
FINDING_TEXT = codes.DCM.Finding  # 121071, CID 7002
IMPRESSIONS_SECTION = codes.DCM.Impressions  # 121072, CID 7001
IMPRESSION_TEXT = codes.DCM.Impression  # 121073, CID 7002


def normalize_label(text: str) -> str:
    """Lower case, words separated by single spaces, no surrounding punctuation."""
    return re.sub(r"\s+", " ", text.strip().strip(".,;:").replace("_", " ")).lower()


def lookup_finding(label: str) -> FindingCode:
    """The coded finding type of a model label; unknown labels get ``GENERIC_FINDING`` with their text kept."""
    text = normalize_label(label)
    if not text:
        raise ValueError(f"finding label {label!r} must contain a word")
    entry = FINDING_CODES.get(text)
    if entry is None and text.endswith("s") and text[:-1] in FINDING_CODES:
        entry = FINDING_CODES[text[:-1]]  # plural: "nodules", "masses" is not covered and falls back
    if entry is None:
        return FindingCode(text=text, finding_type=GENERIC_FINDING, is_fallback=True)
    finding_type, default_site = entry
    return FindingCode(text=text, finding_type=finding_type, default_site=default_site)


def lookup_site(site: str | None) -> Code | None:
    """The anatomy code of a free-text site from the model ("left lung" -> Lung), or None when unknown."""
    if not site:
        return None
    words = normalize_label(site)
    if words in SITE_CODES:
        return SITE_CODES[words]
    for word in reversed(words.split(" ")):  # the head noun is usually last: "right upper lung"
        if word in SITE_CODES:
            return SITE_CODES[word]
    return None


def finding_site(label: FindingCode, site: str | None, body_part: str = "") -> Code | None:
    """Best anatomy for a finding: the model's site, else what the label implies, else the body part examined."""
    return lookup_site(site) or label.default_site or BODY_PART_SITES.get(body_part.strip().upper())


def procedure_code(modality: str) -> Code:
    """The imaging procedure that produced the analysed images, by modality (generic imaging otherwise)."""
    return _PROCEDURE_BY_MODALITY.get(modality.strip().upper(), IMAGING_PROCEDURE)


def report_states_normal(report: DraftReport) -> bool:
    """True when the report text says the study is normal, so a findings SR without boxes may say "No abnormality".

    The rule (:func:`model.sentences.states_normal`, the sentence reading the grounding uses too), on FINDINGS
    and IMPRESSION together:

    * some normal-study phrasing occurs: "no acute …", "no (…) abnormality", "normal", "unremarkable",
      "within normal limits", "clear lungs", "the lungs are clear";
    * and no clause states a finding: the text is cut into clauses at sentence punctuation and at "but",
      "however", "with", "there is" and the like; a clause states a finding when a finding word (effusion,
      pneumothorax, opacity, nodule, enlarged, abnormal …) has no negation cue ("no", "not", "without",
      "negative for", "free of" …) before it in that clause, or when it holds a pseudo-negation that keeps a
      finding ("no change in …", "cannot be excluded", "not normal").

    "No pleural effusion or pneumothorax. Lungs are clear." is normal; "Right pleural effusion." is not, nor is
    a text with no normal phrasing at all ("The study is limited.").
    """
    return states_normal(report)
