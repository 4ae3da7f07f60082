"""What the report stage wrote of an episode's outputs, and why the rest was not: the index and ``outputs.json``.

Beside each output set (the draft, the first signed set, each amendment's) the outbox keeps

* its index, ``outbox.json`` (``outbox_final.json`` for a signed set): every file of the set, in delivery order, with
  its kind, the delivery that sends it, its DICOM identifiers and its SHA-256. It is written last, after every file
  it names, so a set with an index is complete; readers (deliveries, lineage, ``raddraft demo``) take the files from
  it (:func:`read_entries`) and never guess them from file names;
* ``outputs.json`` (``outputs_final.json``): what was built and the problems of what was not.

An outbox written before the index existed is migrated on its first read by :func:`_legacy_index`, the one place
that still knows the old file names; it writes the index it found so the next read is an ordinary one.

A light module (no DICOM or imaging imports at module level) so that ``raddraft status`` and the deliveries can
read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.jsonio import fsync_directory
from core.layout import episode_dir, index_name, outputs_name

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
OUTPUT_KINDS = ("sr", "narrative", "gsps", "overlay", "findings", "hl7")
DELIVERY_OF_KIND = {"sr": "dicom", "narrative": "dicom", "gsps": "dicom", "hl7": "hl7"}  # the rest stays here


class OutboxIndexError(ValueError):
    """An output set's index cannot be read (malformed, or names a file outside its folder)."""


@dataclass(frozen=True)
class OutboxEntry:
    """One file of an output set, as its index lists it."""

    path: Path
    kind: str  # one of OUTPUT_KINDS
    sop_instance_uid: str | None = None  # for DICOM files
    sop_class_uid: str | None = None
    series_instance_uid: str | None = None
    sha256: str = ""  # of the bytes written; empty in an index migrated without reading the file

    @property
    def delivery(self) -> str | None:
        """The delivery kind that sends this file (``dicom``, ``hl7``), None for one that stays in the outbox."""
        return DELIVERY_OF_KIND.get(self.kind)


@dataclass(frozen=True)
class OutputProblem:
    """An output that was not built: ``failed`` (it could not be) or ``skipped`` (by design: no order number
    under the skip policy, a colour image without a presentation state, ...). The reason names no patient value."""

    kind: str
    state: str  # "failed" | "skipped"
    reason: str


def index_document(entries: Sequence[OutboxEntry], *, study_uid: str, episode_id: int, version: int,
                   migrated: bool = False) -> dict[str, Any]:
    """The index of an output set, as written beside it (names relative to its folder)."""
    document: dict[str, Any] = {
        "format": INDEX_FORMAT, "study_instance_uid": study_uid, "episode_id": episode_id, "version": version,
        "entries": [{"kind": e.kind, "name": e.path.name, "delivery": e.delivery, "sop_class_uid": e.sop_class_uid,
                     "sop_instance_uid": e.sop_instance_uid, "series_instance_uid": e.series_instance_uid,
                     "sha256": e.sha256} for e in entries]}
    if migrated:
        document["migrated"] = True
    return document


def index_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def entry_of(path: Path, kind: str, data: bytes, *, sop_instance_uid: str | None = None,
             sop_class_uid: str | None = None, series_instance_uid: str | None = None) -> OutboxEntry:
    """The entry of a file about to be written with *data*."""
    return OutboxEntry(path, kind, sop_instance_uid, sop_class_uid, series_instance_uid,
                       hashlib.sha256(data).hexdigest())


def read_index(folder: Path, signed: bool = False) -> dict[str, Any] | None:
    """The index document of the set in *folder* (after migrating an outbox written before indexes), or None when
    the set was never written."""
    path = folder / index_name(signed)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _legacy_index(folder, signed)
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise OutboxIndexError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != INDEX_FORMAT:
        raise OutboxIndexError(f"{path}: not an outbox index of format {INDEX_FORMAT}")
    return document


def read_entries(folder: Path, signed: bool = False) -> list[OutboxEntry]:
    """Every file of the draft set (or the signed set) in *folder*, in delivery order, as its index lists them;
    empty when the set was never written."""
    document = read_index(folder, signed)
    if document is None:
        return []
    entries = []
    for item in document.get("entries", []):
        name = item.get("name")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise OutboxIndexError(f"{folder / index_name(signed)}: entry name {name!r} is not a file of its folder")
        if item.get("kind") not in OUTPUT_KINDS:
            raise OutboxIndexError(f"{folder / index_name(signed)}: entry {name} has unknown kind {item.get('kind')!r}")
        entries.append(OutboxEntry(folder / name, item["kind"], item.get("sop_instance_uid"),
                                   item.get("sop_class_uid"), item.get("series_instance_uid"),
                                   item.get("sha256") or ""))
    return entries


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


# --- legacy: outboxes written before the index ---------------------------------------------------------------
# The file names of an output set as reporting/outbox.py wrote them before it kept an index. Nothing else may
# parse these names: the index says what a set holds.
_LEGACY_NAME = re.compile(r"^(?P<kind>sr|narrative|gsps|overlay|findings|oru)(?P<final>_final)?(?:_(?P<n>\d+))?"
                          r"\.(?:dcm|png|json|hl7)$")
_LEGACY_ORDER = {"sr": 0, "narrative": 1, "gsps": 2, "overlay": 3, "findings": 4, "oru": 5}
_LEGACY_NUMBERED = {"gsps", "overlay"}
_LEGACY_EXTENSION = {"sr": ".dcm", "narrative": ".dcm", "gsps": ".dcm", "overlay": ".png", "findings": ".json",
                     "oru": ".hl7"}
_AMENDMENT = re.compile(r"^amendment_(\d+)$")


def _legacy_index(folder: Path, signed: bool) -> dict[str, Any] | None:
    """LEGACY (outboxes written before ``outbox.json``): find the set's files by their old names, read each DICOM
    file's identifiers from its header, and write the index it would have had, so that this runs once per set.
    None when *folder* holds no file of the set (it was never written). A set whose report stage was interrupted
    before ``outputs.json`` is taken as it is on disk; a report stage that finishes later rewrites the index."""
    if not folder.is_dir():
        return None
    found: list[tuple[int, int, str, Path]] = []
    for path in folder.iterdir():
        match = _LEGACY_NAME.match(path.name)
        if match is None or bool(match["final"]) != signed or not path.is_file():
            continue
        stem = match["kind"]
        if (match["n"] is not None) != (stem in _LEGACY_NUMBERED) or path.suffix != _LEGACY_EXTENSION[stem]:
            continue
        found.append((_LEGACY_ORDER[stem], int(match["n"] or 0), "hl7" if stem == "oru" else stem, path))
    if not found:
        return None
    import pydicom  # noqa: PLC0415 - only here: the light module reads no DICOM otherwise

    entries = []
    for _, _, kind, path in sorted(found):
        data = path.read_bytes()
        if path.suffix == ".dcm":
            header = pydicom.dcmread(path, stop_before_pixels=True)
            entries.append(entry_of(path, kind, data, sop_instance_uid=str(header.SOPInstanceUID),
                                    sop_class_uid=str(header.SOPClassUID),
                                    series_instance_uid=str(header.SeriesInstanceUID)))
        else:
            entries.append(entry_of(path, kind, data))
    amendment = _AMENDMENT.match(folder.name)
    episode = folder.parent if amendment else folder
    version = int(amendment[1]) if amendment else int(signed)
    document = index_document(entries, study_uid=episode.parent.name, episode_id=int(episode.name)
                              if episode.name.isdigit() else -1, version=version, migrated=True)
    written = _create_once(folder / index_name(signed), index_bytes(document))
    logger.info("migrated the %s set in %s to an outbox index (%d file(s))%s", "signed" if signed else "draft",
                folder.name, len(entries), "" if written else ": another reader wrote it first")
    return document if written else read_index(folder, signed)


def _create_once(path: Path, data: bytes) -> bool:
    """Write *path* atomically unless it exists (a report stage's index is never replaced by a migration); False
    when it did."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)  # fails if path exists: no clobbering
        except FileExistsError:
            return False
        fsync_directory(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
