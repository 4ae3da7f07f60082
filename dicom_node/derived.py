"""Which received objects are results about images (AI or derived objects) rather than images to analyse.

One rule, shared by the DICOM node and the analysis gate (workers/gate.py): such an object is stored in the
spool and the index like any other (C-STORE success, nothing lost) but opens no study episode, joins none and
never re-opens or extends a delivered one, so a PACS that sends a study back with raddraft's outputs (or only
the outputs) starts no new analysis; the gate keeps any that sit in a study out of the model's input.

An object is derived when

* raddraft wrote it: its Manufacturer (0008,0070) is :data:`core.identity.MANUFACTURER` (SR, narrative and
  presentation states carry it in their General Equipment module); or
* its SOP class is a Structured Report Document storage class (``1.2.840.10008.5.1.4.1.1.88.x``, Key Object
  Selection Document 88.59 included, and the two ophthalmic SR-based reports outside that arc; PS3.4 B.5) or a
  Presentation State storage class
  (``1.2.840.10008.5.1.4.1.1.11.x``: grayscale, color, pseudo-color, blending, volumetric ...), from any vendor.
"""

from __future__ import annotations

from enum import StrEnum

from pydicom.uid import (
    KeyObjectSelectionDocumentStorage,
    MacularGridThicknessAndVolumeReportStorage,
    SpectaclePrescriptionReportStorage,
)

from core.identity import MANUFACTURER

SR_DOCUMENT_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every SR Document storage SOP class
SR_BASED_REPORTS = frozenset({SpectaclePrescriptionReportStorage, MacularGridThicknessAndVolumeReportStorage})
PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."  # every Presentation State storage SOP class


class DerivedKind(StrEnum):
    """Why an object is not analysed; the value is the reason the gate and the logs give."""

    OWN_OUTPUT = "raddraft output (sent back)"
    KEY_OBJECT_SELECTION = "key object selection"
    STRUCTURED_REPORT = "structured report"
    PRESENTATION_STATE = "presentation state"


def is_own_manufacturer(manufacturer: str) -> bool:
    """True when *manufacturer* is raddraft's own (compared as the gate always did: trimmed, any case)."""
    return manufacturer.strip().lower() == MANUFACTURER.lower()


def derived_kind(sop_class_uid: str, manufacturer: str) -> DerivedKind | None:
    """What kind of AI/derived object a (SOP Class UID, Manufacturer) pair is, or None for an acquisition."""
    if is_own_manufacturer(manufacturer):
        return DerivedKind.OWN_OUTPUT
    if sop_class_uid == KeyObjectSelectionDocumentStorage:
        return DerivedKind.KEY_OBJECT_SELECTION
    if sop_class_uid.startswith(SR_DOCUMENT_PREFIX) or sop_class_uid in SR_BASED_REPORTS:
        return DerivedKind.STRUCTURED_REPORT
    if sop_class_uid.startswith(PRESENTATION_STATE_PREFIX):
        return DerivedKind.PRESENTATION_STATE
    return None
