"""Deterministic UIDs for every object raddraft writes.

A UID is a 2.25 UUID-derived UID (PS3.5 B.2) of a name-based (SHA-1, version 5) UUID of (study UID, episode
id, model version, object kind, index): a retried task rebuilds the same identifiers, so a PACS that already
stored the SR replaces it instead of showing a second, different one. A new episode or model version gives new UIDs.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from pydicom.uid import UID

# Fixed namespace of raddraft's name-based UUIDs (itself a name-based UUID in the URL namespace).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/raddraft/raddraft/reporting/uids/v1")


class OutputKind(StrEnum):
    """Which object (or part of one) a UID names."""

    SR_SERIES = "sr-series"
    SR_DRAFT = "sr-draft"
    SR_FINAL = "sr-final"
    NARRATIVE_SERIES = "narrative-series"
    NARRATIVE_DRAFT = "narrative-draft"
    NARRATIVE_FINAL = "narrative-final"
    GSPS_SERIES = "gsps-series"
    GSPS = "gsps"  # index: position of the image among the annotated images
    GSPS_FINAL = "gsps-final"  # the signed GSPS: other labels, so another instance (a UID names one content)
    FINDING = "finding"  # index: position of the finding in AnalysisResult.findings (tracking UID)


def output_uid(study_uid: str, episode_id: int, model_version: str, kind: OutputKind, index: int | None = None) -> UID:
    """The UID of one output object; identical inputs always give the identical UID."""
    if not study_uid:
        raise ValueError("study_uid must not be empty")
    if index is not None and index < 0:
        raise ValueError(f"index {index} of {kind.value} must be >= 0")
    parts = [study_uid, str(episode_id), model_version, kind.value]
    if index is not None:
        parts.append(str(index))
    return _uuid_uid(parts)


def device_uid(model_name: str, model_version: str) -> UID:
    """Device Observer UID of the algorithm: the same for every study analysed by one model version."""
    return _uuid_uid(["device", model_name, model_version])


def _uuid_uid(parts: list[str]) -> UID:
    """``2.25.<decimal UUID>`` (at most 44 characters) of a version-5 UUID of the parts."""
    name = "\x1f".join(parts)  # unit separator: ("a b", "c") and ("a", "b c") stay distinct
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
