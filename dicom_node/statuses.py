"""Named DIMSE statuses and A-ASSOCIATE-RJ reasons used by the raddraft DICOM node (PS3.4 B.2.3, PS3.8 9.3.4)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210


class StowFailureReason(IntEnum):
    """Failure Reason (0008,1197) of a STOW-RS response's Failed SOP Sequence (PS3.18 10.5.3)."""

    PROCESSING_FAILURE = 0x0110
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


class EchoStatus(IntEnum):
    """C-ECHO response statuses (PS3.7 9.1.5)."""

    SUCCESS = 0x0000


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ *Result* (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ *Source*."""

    SERVICE_USER = 0x01


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ *Reason/Diag.* for source service-user."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07
