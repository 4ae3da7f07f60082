"""Durable instance files: ``spool/<study>/<series>/<sop>.dcm`` written via ``spool/tmp`` and an atomic rename.

A file is first *staged* (written to ``spool/tmp`` and fsynced), then *placed* (renamed over its final path and
the directory fsynced, by :meth:`Spool.place` or, for a batch of arrivals, once per directory by the index's group
commit in dicom_node/index.py, before the rows are committed). A placement can be rolled back until it is
committed, so the caller can make the file and its index row appear together or not at all. Paths are built
only from UIDs that pass :func:`validate_uid`.

An instance received to a file (pynetdicom's chunked receive, see :func:`dicom_node.scp.build_ae`) is staged by
a hard link into ``spool/tmp`` when that file lies on the spool's file system (no copy), else by a copy in
pieces of :data:`PIECE` bytes; either way the staged file is fsynced before it is placed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from core.jsonio import fsync_directory
from core.layout import validate_uid

log = logging.getLogger(__name__)

PIECE = 1024 * 1024  # bytes read at a time when hashing or copying a received file


def content_sha256(source: bytes | Path) -> str:
    """The SHA-256 of *source* (bytes, or a file read in pieces) as hex."""
    if isinstance(source, Path):
        with source.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    return hashlib.sha256(source).hexdigest()


def content_size(source: bytes | Path) -> int:
    """The size of *source* in bytes (of the file, for a path)."""
    return source.stat().st_size if isinstance(source, Path) else len(source)

@dataclass(frozen=True)
class StagedFile:
    """Bytes written and fsynced in ``spool/tmp``, not yet visible under their final name."""

    path: Path
    sha256: str
    size: int


@dataclass
class Placement:
    """A staged file renamed to its final path; :meth:`rollback` undoes it until :meth:`commit`.

    *created_dirs*: the study/series directories this placement created (deepest last); a rollback removes them
    again when they are still empty, so a refused instance of a new study leaves no empty directories.
    """

    path: Path
    backup: Path | None
    created_dirs: list[Path] = field(default_factory=list)

    def commit(self) -> None:
        if self.backup is not None:
            self.backup.unlink(missing_ok=True)
            self.backup = None
        self.created_dirs = []

    def rollback(self) -> None:
        if self.backup is not None:
            os.replace(self.backup, self.path)
            self.backup = None
        else:
            self.path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)
        _remove_empty(self.created_dirs)
        self.created_dirs = []


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories in *created* (parents first in the list) that are empty, deepest first."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: another association placed an instance there meanwhile; it stays
            return
        fsync_directory(directory.parent)


class Spool:
    """The spool directory of received instances."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"

    def ensure(self) -> None:
        """Create the spool and its tmp directory, and remove temporary files a crash left behind."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            log.info("removing leftover temporary spool file %s", leftover.name)
            leftover.unlink()

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_uid, "Series Instance UID")
        sop = validate_uid(sop_instance_uid, "SOP Instance UID")
        return self.root / study / series / f"{sop}.dcm"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def free_bytes(self) -> int:
        """Free space on the file system holding the spool (its nearest existing ancestor)."""
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def stage(self, source: bytes | Path, sha256: str | None = None) -> StagedFile:
        """Put *source* (bytes, or the path of a received file) as a new file in ``spool/tmp`` and fsync it
        (*sha256*: its digest, if already known). A file is hard-linked when it lies on the spool's file system,
        else copied in pieces; it is left where it is either way (its owner removes it)."""
        if isinstance(source, Path):
            return self._stage_file(source, sha256)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(source)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        digest = sha256 if sha256 is not None else hashlib.sha256(source).hexdigest()
        return StagedFile(path=Path(name), sha256=digest, size=len(source))

    def _stage_file(self, source: Path, sha256: str | None) -> StagedFile:
        staged = self._link(source) or self._copy(source)
        try:
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            digest = sha256 if sha256 is not None else content_sha256(staged)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return StagedFile(path=staged, sha256=digest, size=size)

    def _link(self, source: Path) -> Path | None:
        """A hard link to *source* in ``spool/tmp``, or None when the file systems differ (or links fail)."""
        target = self.tmp_dir / f"tmp{uuid.uuid4().hex}.part"
        try:
            os.link(source, target)
        except OSError as exc:  # EXDEV (another file system), EPERM/ENOTSUP (no hard links there), ...
            log.debug("cannot hard-link the received file into %s (%s); copying it", self.tmp_dir, exc)
            return None
        return target

    def _copy(self, source: Path) -> Path:
        """A copy of *source* in ``spool/tmp``, written in pieces of :data:`PIECE` bytes."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle, source.open("rb") as original:
                shutil.copyfileobj(original, handle, PIECE)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def discard(self, staged: StagedFile) -> None:
        staged.path.unlink(missing_ok=True)

    def place(self, staged: StagedFile, study_uid: str, series_uid: str, sop_instance_uid: str, *,
              sync_directory: bool = True) -> Placement:
        """Rename *staged* to its final path (replacing an older file atomically) and fsync the directory, unless
        *sync_directory* is False: then the caller fsyncs ``placement.path.parent`` before it relies on the file
        (the group commit of dicom_node/index.py fsyncs each directory of a batch once)."""
        final = self.instance_path(study_uid, series_uid, sop_instance_uid)
        created: list[Path] = []
        backup: Path | None = None
        renamed = False
        try:
            self._make_dirs(final.parent, created)
            if final.exists():
                backup = staged.path.with_suffix(".backup")
                os.link(final, backup)
            os.replace(staged.path, final)
            renamed = True
            if sync_directory:
                fsync_directory(final.parent)
        except BaseException:
            if renamed:  # the directory fsync failed: put the old file (or nothing) back, as a rollback does
                Placement(path=final, backup=backup, created_dirs=created).rollback()
            else:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                _remove_empty(created)
            raise
        return Placement(path=final, backup=backup, created_dirs=created)

    def _make_dirs(self, directory: Path, created: list[Path]) -> None:
        """Create *directory* below the spool root, fsyncing each parent whose entry was created; each directory
        this call created is appended to *created* (parents first)."""
        missing: list[Path] = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue  # another association created it meanwhile: not ours to remove
            created.append(path)
            fsync_directory(path.parent)
