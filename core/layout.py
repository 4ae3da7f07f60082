"""Where a study and its episodes live on disk, as plain functions of ``home`` (or its outbox) and the UIDs.

* ``<home>/spool/<study>/<series>/<sop>.dcm``: the received instances (dicom_node/spool.py), named only by UIDs
  that pass :func:`validate_uid`;
* ``<home>/work/<study>/<episode>/``: what the pipeline keeps of an episode: ``manifest.json`` (the prepare
  stage), ``request.json`` (the request it sent to the gpu stage) and ``analysis.json`` (the model's result);
* ``<outbox>/<study>/<episode>/``: the episode's outputs (reporting/outbox.py): the draft set, the first signed
  set beside it and each amendment's set in ``amendment_<n>/``; beside each set its index (``outbox.json``,
  ``outbox_final.json``: every file written) and ``outputs.json`` (``outputs_final.json``) saying what was not
  built and why.
"""

from __future__ import annotations

import re
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64


class InvalidUIDError(ValueError):
    """A UID that cannot name a spool path (bad characters or too long)."""


def validate_uid(value: object, attribute: str) -> str:
    """Return *value* if it is a DICOM UID usable in a path, else raise :class:`InvalidUIDError` naming it."""
    if not isinstance(value, str) or not value:
        raise InvalidUIDError(f"{attribute} is missing or empty")
    if len(value) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"{attribute} is {len(value)} characters long; a UID has at most {UID_MAX_LENGTH}")
    if not UID_PATTERN.match(value):
        raise InvalidUIDError(f"{attribute} {value!r} must be digits separated by single dots")
    return value


def inprocess_worker_state_path(home: Path) -> Path:
    """The state of ``raddraft serve``'s in-process worker (workers/inprocess.py), read by ``raddraft status``."""
    return home / "run" / "inprocess-worker.json"


def manifest_path(home: Path, study_uid: str, episode_id: int) -> Path:
    """The episode's manifest, written by the prepare stage."""
    validate_uid(study_uid, "study UID")
    return home / "work" / study_uid / str(episode_id) / "manifest.json"


def analysis_path(home: Path, study_uid: str, episode_id: int) -> Path:
    """The episode's analysis result, beside its manifest."""
    return manifest_path(home, study_uid, episode_id).with_name("analysis.json")


def request_path(home: Path, study_uid: str, episode_id: int) -> Path:
    """Where the prepare stage keeps the request it sent (the report stage maps boxes back with it)."""
    return manifest_path(home, study_uid, episode_id).with_name("request.json")


def study_outbox_dir(outbox_dir: Path, study_uid: str) -> Path:
    """The outbox folder of every episode of *study_uid*; ValueError when the UID cannot name a folder."""
    if not study_uid or "/" in study_uid or study_uid.startswith("."):
        raise ValueError(f"study UID {study_uid!r} cannot name an outbox folder")
    return outbox_dir / study_uid


def episode_dir(outbox_dir: Path, study_uid: str, episode_id: int) -> Path:
    """The outbox folder of one episode's outputs."""
    return study_outbox_dir(outbox_dir, study_uid) / str(episode_id)


def outputs_name(signed: bool) -> str:
    """The file beside an output set that records what was not built: the draft set's or the signed set's."""
    return "outputs_final.json" if signed else "outputs.json"


def version_dir(outbox_dir: Path, study_uid: str, episode_id: int, version: int) -> Path:
    """The folder of one version's output set: the episode's folder for the draft (0) and the first signature
    (1), ``amendment_<n>/`` in it for amendment *n*."""
    if version < 0:
        raise ValueError(f"version {version} must be >= 0 (0 the draft, n the signed version n)")
    folder = episode_dir(outbox_dir, study_uid, episode_id)
    return folder / f"amendment_{version}" if version > 1 else folder


def index_name(signed: bool) -> str:
    """The index of an output set (reporting/outputs.py): every file the set has, as written."""
    return "outbox_final.json" if signed else "outbox.json"
