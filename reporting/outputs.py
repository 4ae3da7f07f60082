"""What the report stage built of an episode's outputs, and why the rest was not: ``outputs.json`` beside them.

A light module (no DICOM or imaging imports) so that ``raddraft status`` and the deliveries can read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.layout import episode_dir, outputs_name


@dataclass(frozen=True)
class OutputProblem:
    """An output that was not built: ``failed`` (it could not be) or ``skipped`` (by design: no order number
    under the skip policy, a colour image without a presentation state, ...). The reason names no patient value."""

    kind: str
    state: str  # "failed" | "skipped"
    reason: str


def read_problems(folder: Path, signed: bool = False) -> list[OutputProblem]:
    """The problems recorded in *folder* (none when none were recorded, or the report stage never ran)."""
    path = folder / outputs_name(signed)
    if not path.is_file():
        return []
    document = json.loads(path.read_text(encoding="utf-8"))
    return [OutputProblem(**p) for p in document.get("problems", [])]


def episode_problems(outbox_dir: Path, study_uid: str, episode_id: int) -> list[OutputProblem]:
    """:func:`read_problems` of an episode's draft set (``<outbox>/<study>/<episode>/``)."""
    try:
        folder = episode_dir(outbox_dir, study_uid, episode_id)
    except ValueError:  # a UID that cannot name a folder has no outputs
        return []
    return read_problems(folder)
