"""Deterministic UIDs for every object raddraft writes: one scheme, for the draft and every signed version.

A UID is a 2.25 UUID-derived UID (PS3.5 B.2) of a name-based (SHA-1, version 5) UUID of (study UID, episode
id, model version, object kind, version, index): a retried task rebuilds the same identifiers, so a PACS that
already stored the SR replaces it instead of showing a second, different one. A new episode or model version gives
new UIDs, and so does each version of the report: the draft is version 0, the first signature version 1, amendment
*n* version *n* (worklist/signing.py). The series of an output kind, and a finding's tracking UID, are the same for
every version: a signed SR is a new instance in the draft's series.

The names hashed for the draft and the first signed version are those of the scheme before versions were numbered
(``sr-draft``, ``sr-final`` …), so the UIDs of outputs already delivered stay what they were.
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
    SR = "sr"  # the findings SR of one version
    NARRATIVE_SERIES = "narrative-series"
    NARRATIVE = "narrative"  # the narrative SR of one version
    GSPS_SERIES = "gsps-series"
    GSPS = "gsps"  # index: position of the state among the version's presentation states
    FINDING = "finding"  # index: position of the finding in AnalysisResult.findings (tracking UID)


# The kinds that name one instance of one version; the others (series, tracking UIDs) are shared by all versions.
VERSIONED_KINDS = frozenset({OutputKind.SR, OutputKind.NARRATIVE, OutputKind.GSPS})
# The name hashed for each versioned kind: (draft, signed). Those of the scheme before versions were numbered.
_NAMES = {OutputKind.SR: ("sr-draft", "sr-final"), OutputKind.NARRATIVE: ("narrative-draft", "narrative-final"),
          OutputKind.GSPS: ("gsps", "gsps-final")}


def output_uid(study_uid: str, episode_id: int, model_version: str, kind: OutputKind, index: int | None = None,
               *, version: int = 0) -> UID:
    """The UID of one output object of report *version* (0 the draft, n >= 1 signed version n); identical inputs
    always give the identical UID. A series or a tracking UID has no version (pass 0)."""
    if not study_uid:
        raise ValueError("study_uid must not be empty")
    if index is not None and index < 0:
        raise ValueError(f"index {index} of {kind.value} must be >= 0")
    if version < 0:
        raise ValueError(f"version {version} of {kind.value} must be >= 0 (0 the draft, n the signed version n)")
    if kind in VERSIONED_KINDS:
        name = _NAMES[kind][version > 0]
        parts = [study_uid, str(episode_id), model_version, name]
        if version > 1:  # the first signed version hashes what the signed set always did
            parts.append(f"v{version}")
    elif version:
        raise ValueError(f"{kind.value} is the same for every version of the report: version must be 0, "
                         f"not {version}")
    else:
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
