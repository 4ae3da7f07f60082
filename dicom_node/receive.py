"""Accept one received instance: check it, write it durably to the spool and record it in the index.

Network-free so every branch is testable directly; :mod:`dicom_node.handlers` maps a C-STORE event onto
:meth:`InstanceReceiver.receive` and returns the status it gives. The instance is either bytes in memory or the
path of the file pynetdicom received it to (chunked receive, :func:`dicom_node.scp.build_ae`); a file is
checked, hashed and staged in bounded pieces and read with its large values deferred (never loaded whole).
Success is returned only after the file is fsynced under its final name and its index row is committed; on any
failure neither remains.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.uid import UID
from pydicom.valuerep import VR

from core import metrics
from core.layout import InvalidUIDError, validate_uid
from dicom_node.derived import DerivedKind, derived_kind
from dicom_node.index import Arrival, Index, InstanceRecord, NodeCounter
from dicom_node.inflate import InflatedTooLargeError, check_inflated_size
from dicom_node.spool import Placement, Spool, StagedFile, content_sha256, content_size
from dicom_node.statuses import StoreStatus

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# values larger than this are not loaded when a received file is read (pydicom's defer_size): the pixel data
DEFER_SIZE = MIB
# PARSING_GATE: associations parse and check their data sets one at a time (the C-STORE handler's only long
# stretch of Python). Under the GIL they run one at a time anyway; left to contend, eight associations' parsers
# force a GIL hand-off every few milliseconds on each other and on the threads returning from an fsync (with
# eight threads in bench/receive.py: 72 000 context switches instead of 27 000 for 300 instances, 5.2 instead of
# 3.9 CPU ms per instance). The files' fsyncs and the group commit still run beside the parsing.
INSTANCE_LOCK_STRIPES = 64  # instances whose UIDs hash alike share a lock: bounded memory, rare contention
# the outcome label of raddraft_instances_received (core/metrics.py); refusals are "rejected"
ARRIVAL_OUTCOMES = {Arrival.NEW: "stored", Arrival.DUPLICATE: "duplicate", Arrival.REPLACED: "replaced"}


@dataclass(frozen=True)
class IncomingInstance:
    """A C-STORE request as received: the encoded file (preamble, file meta, dataset) and its context.

    *data*: the encoded file in memory, or the path of the file holding it (left in place: its owner, pynetdicom
    or the STOW-RS handler, removes it after :meth:`InstanceReceiver.receive` returns). *expected_study_uid*: the
    study the request was addressed to (STOW-RS ``POST /dicomweb/studies/{uid}``); an instance of another study
    is refused. None (C-STORE): any study."""

    data: bytes | Path
    abstract_syntax: str
    affected_sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    expected_study_uid: str | None = None


@dataclass(frozen=True)
class RejectedContext:
    """A presentation context the SCP rejected in association negotiation, as the peer proposed it."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    result: str  # why, in pynetdicom's words: "Abstract Syntax Not Supported", ...

    def describe(self) -> str:
        """``1.2.840.10008.5.1.4.1.1.6 (Ultrasound Image Storage (Retired)) in [1.2.840.10008.1.2]: ...``."""
        uid = UID(self.abstract_syntax)
        name = f"{uid.name} (Retired)" if uid.is_retired and "Retired" not in uid.name else uid.name
        named = f" ({name})" if name != self.abstract_syntax else " (unknown to pydicom)"
        return (f"context {self.context_id} {self.abstract_syntax}{named} in "
                f"[{', '.join(self.transfer_syntaxes)}]: {self.result.lower()}")


class RefusedError(Exception):
    """An instance that is refused with *status*; the message names the attribute and the rule."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class _Identity:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    derived: DerivedKind | None  # an AI/derived object: stored, but opens no episode


class InstanceReceiver:
    """Applies the acceptance rules and persists accepted instances."""

    def __init__(
        self, spool: Spool, index: Index, max_instance_mb: float, min_free_disk_mb: float, *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.index = index
        self.max_instance_bytes = int(max_instance_mb * MIB)
        self.min_free_bytes = int(min_free_disk_mb * MIB)
        self._clock = clock
        self._locks = [threading.Lock() for _ in range(INSTANCE_LOCK_STRIPES)]
        self._parsing = threading.Lock()

    def receive(self, incoming: IncomingInstance) -> StoreStatus:
        """Return the C-STORE status for *incoming*; every refusal is logged with its reason."""
        try:
            outcome = self._receive(incoming)
        except RefusedError as exc:
            log.warning("refused instance %s from %s (%s): 0x%04X %s", incoming.affected_sop_instance_uid,
                        incoming.calling_ae, incoming.peer_address, exc.status, exc)
            metrics.record_instance("rejected")
            self._count(NodeCounter.REFUSED_INSTANCES)
            return exc.status
        metrics.record_instance(outcome)
        if outcome == ARRIVAL_OUTCOMES[Arrival.DUPLICATE]:
            self._count(NodeCounter.IDENTICAL_RESENDS)
        return StoreStatus.SUCCESS

    def note_rejected_contexts(self, calling_ae: str, peer_address: str, rejected: list[RejectedContext]) -> None:
        """Log the presentation contexts an association's negotiation rejected (one INFO line) and count them."""
        if not rejected:
            return
        log.info("association from %r at %s: %d proposed presentation context(s) rejected: %s", calling_ae,
                 peer_address, len(rejected), "; ".join(context.describe() for context in rejected))
        self._count(NodeCounter.REJECTED_CONTEXTS, len(rejected))

    def _count(self, counter: NodeCounter, amount: int = 1) -> None:
        """Add to a ``raddraft status`` counter; an index that cannot take it costs the count, not the C-STORE."""
        try:
            self.index.add_to_counter(counter, amount)
        except sqlite3.Error as exc:
            log.warning("could not count %d %s in the index: %s", amount, counter, exc)

    def _receive(self, incoming: IncomingInstance) -> str:
        """Persist *incoming*; its outcome (``stored``, ``duplicate``, ``replaced``) or :class:`RefusedError`."""
        try:
            size = content_size(incoming.data)
        except OSError as exc:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES, f"cannot read the received file: {exc}") from exc
        if size > self.max_instance_bytes:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES,
                               f"instance is {size / MIB:.1f} MiB; max_instance_mb is {self.max_instance_bytes / MIB}")
        try:  # a deflated data set is inflated in bounded pieces first: pydicom would inflate it whole
            check_inflated_size(incoming.data, UID(incoming.transfer_syntax_uid), self.max_instance_bytes)
        except InflatedTooLargeError as exc:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES, str(exc)) from exc
        except ValueError as exc:
            raise RefusedError(StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from exc
        except OSError as exc:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES, f"cannot read the received file: {exc}") from exc
        with self._parsing:  # one data set parsed at a time: see PARSING_GATE
            identity = self._identify(incoming, size)
        try:
            free = self.spool.free_bytes()
        except OSError as exc:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES, f"cannot measure free disk space: {exc}") from exc
        if free - size < self.min_free_bytes:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES,
                               f"free disk space {free / MIB:.0f} MiB minus the instance is below min_free_disk_mb "
                               f"{self.min_free_bytes / MIB:.0f}")
        try:
            return self._persist(incoming, identity)
        except (OSError, sqlite3.Error) as exc:
            raise RefusedError(StoreStatus.OUT_OF_RESOURCES, f"cannot persist the instance: {exc}") from exc

    @staticmethod
    def _identify(incoming: IncomingInstance, size: int) -> _Identity:
        """Parse the dataset (of *size* bytes with preamble and file meta) and check its identifiers against the
        request. A received file is read with values over :data:`DEFER_SIZE` deferred (not loaded)."""
        try:
            syntax = UID(incoming.transfer_syntax_uid)
            if isinstance(incoming.data, Path):
                # a deflated data set is inflated whole by pydicom (its size was checked above): the offsets of
                # deferred values would be offsets in the inflated stream, not in the file, so none are deferred
                dataset = dcmread(incoming.data, defer_size=None if syntax.is_deflated else DEFER_SIZE)
                source: Path | None = incoming.data
            else:
                dataset, source = dcmread(BytesIO(incoming.data)), None
            check_instance(dataset, size, syntax, source=source)
            sop_class_uid = dataset.get("SOPClassUID")
            sop_instance_uid = dataset.get("SOPInstanceUID")
            study_uid = dataset.get("StudyInstanceUID")
            series_uid = dataset.get("SeriesInstanceUID")
            patient_id = str(dataset.get("PatientID", ""))
            manufacturer = str(dataset.get("Manufacturer", "") or "")
        # Untrusted bytes: pydicom signals malformed data with many exception types (struct.error, ValueError,
        # EOFError, NotImplementedError, InvalidDicomError...); every one of them means "cannot understand".
        except Exception as exc:
            raise RefusedError(StoreStatus.CANNOT_UNDERSTAND,
                               f"dataset cannot be decoded: {type(exc).__name__}: {exc}") from exc
        mismatch = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            validate_uid(str(study_uid) if study_uid is not None else None, "Study Instance UID (0020,000D)")
            validate_uid(str(series_uid) if series_uid is not None else None, "Series Instance UID (0020,000E)")
            validate_uid(str(sop_instance_uid) if sop_instance_uid is not None else None,
                         "SOP Instance UID (0008,0018)")
        except InvalidUIDError as exc:
            raise RefusedError(mismatch, str(exc)) from exc
        if sop_class_uid != incoming.abstract_syntax:
            raise RefusedError(mismatch, f"SOP Class UID (0008,0016) {sop_class_uid} does not match the "
                                         f"presentation context's abstract syntax {incoming.abstract_syntax}")
        if sop_instance_uid != incoming.affected_sop_instance_uid:
            raise RefusedError(mismatch, f"SOP Instance UID (0008,0018) {sop_instance_uid} differs from the "
                                         f"request's Affected SOP Instance UID {incoming.affected_sop_instance_uid}")
        if incoming.expected_study_uid is not None and study_uid != incoming.expected_study_uid:
            raise RefusedError(mismatch, f"Study Instance UID (0020,000D) {study_uid} is not the study "
                                         f"{incoming.expected_study_uid} the request was addressed to")
        return _Identity(str(study_uid), str(series_uid), str(sop_instance_uid), str(sop_class_uid), patient_id,
                         derived_kind(str(sop_class_uid), manufacturer))

    @staticmethod
    def _log_identical(incoming: IncomingInstance, identity: _Identity) -> None:
        log.info("identical instance %s received again from %r at %s; stored once", identity.sop_instance_uid,
                 incoming.calling_ae, incoming.peer_address)

    def _persist(self, incoming: IncomingInstance, identity: _Identity) -> str:
        digest = content_sha256(incoming.data)
        final = self.spool.instance_path(identity.study_uid, identity.series_uid, identity.sop_instance_uid)
        stored = self.index.instance(identity.sop_instance_uid)
        if stored is not None and stored.sha256 == digest and final.is_file():
            self._log_identical(incoming, identity)
            return "duplicate"
        staged = self.spool.stage(incoming.data, digest)
        # One association at a time per SOP Instance UID from placing the file to removing the one it replaced:
        # another association re-sending the same instance (to the same path, or under another study) could
        # otherwise write its file between this one's commit and its clean-up, which would then delete it.
        with self._instance_lock(identity.sop_instance_uid):
            return self._place_and_record(incoming, identity, staged, final)

    def _instance_lock(self, sop_instance_uid: str) -> threading.Lock:
        return self._locks[int(hashlib.blake2b(sop_instance_uid.encode(), digest_size=4).hexdigest(), 16)
                           % len(self._locks)]

    def _place_and_record(self, incoming: IncomingInstance, identity: _Identity, staged: StagedFile, final: Path
                          ) -> str:
        placed: list[Placement] = []

        def place() -> Path:
            placement = self.spool.place(staged, identity.study_uid, identity.series_uid,
                                         identity.sop_instance_uid, sync_directory=False)
            placed.append(placement)
            return placement.path.parent  # the index fsyncs it before the commit, once for its whole batch

        def is_duplicate(stored_path: str) -> bool:
            return (self.spool.root / stored_path).is_file()

        record = InstanceRecord(
            sop_instance_uid=identity.sop_instance_uid, study_instance_uid=identity.study_uid,
            series_instance_uid=identity.series_uid, patient_id=identity.patient_id,
            sop_class_uid=identity.sop_class_uid, transfer_syntax_uid=incoming.transfer_syntax_uid,
            calling_ae=incoming.calling_ae, peer_address=incoming.peer_address, size_bytes=staged.size,
            sha256=staged.sha256, path=self.spool.relative(final), received_at=self._clock(),
        )
        try:
            outcome = self.index.record_instance(record, place, is_duplicate,
                                                 opens_episode=identity.derived is None)
        except BaseException:
            for placement in placed:
                placement.rollback()
            self.spool.discard(staged)
            raise
        for placement in placed:
            placement.commit()
        if outcome.kind is Arrival.DUPLICATE:
            self.spool.discard(staged)
            self._log_identical(incoming, identity)
        elif outcome.kind is Arrival.REPLACED:
            if outcome.previous_path is not None and outcome.previous_path != record.path:
                (self.spool.root / outcome.previous_path).unlink(missing_ok=True)
                log.info("instance %s moved to study %s: it was filed under another study before",
                         identity.sop_instance_uid, identity.study_uid)
            log.info("instance %s of study %s replaced by a different version; %s", identity.sop_instance_uid,
                     identity.study_uid, f"stored without analysis ({identity.derived})" if identity.derived
                     else f"episode {outcome.episode_id}{' (new)' if outcome.new_episode else ''}")
        elif identity.derived is not None:
            log.info("instance %s of study %s stored without analysis: %s, opens no episode",
                     identity.sop_instance_uid, identity.study_uid, identity.derived)
        if outcome.new_episode:
            log.info("study %s: episode %d opened", identity.study_uid, outcome.episode_id)
        return ARRIVAL_OUTCOMES[outcome.kind]


UNDEFINED_LENGTH = 0xFFFFFFFF
# The attributes (top level) whose values are converted at the door, so that one pydicom cannot decode is refused
# here rather than failing its study's episode later: what the node reads (_identify: the identifying UIDs,
# Patient ID, Manufacturer) and what the prepare stage reads for the manifest (workers/prepare.py study_info,
# instance_entry, series_entry; tests/test_node_perf_ingest.py keeps the two lists in step).
READ_ATTRIBUTES = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "Manufacturer",
    "PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "StudyDescription", "ReferringPhysicianName", "InstitutionName", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation", "PixelSpacing", "ImagerPixelSpacing",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "ViewPosition", "ImageLaterality",
    "ImageType",
)


def check_instance(dataset: Dataset, data_length: int, transfer_syntax: UID, *, source: Path | None = None) -> None:
    """Raise ``ValueError`` for a data set the node must refuse: one whose structure cannot be parsed
    (:func:`check_parsable`) or whose :data:`READ_ATTRIBUTES` cannot be decoded. Nothing else is converted."""
    check_parsable(dataset, data_length, transfer_syntax, source=source)
    for keyword in READ_ATTRIBUTES:
        dataset.get(keyword)  # converts the element (and resolves an ambiguous VR), raising for a bad value


def check_parsable(dataset: Dataset, data_length: int, transfer_syntax: UID, *, source: Path | None = None) -> None:
    """Raise ``ValueError`` for a data set whose structure cannot be parsed: :func:`check_structure` at the top
    level, then every sequence parsed into its items and each item checked likewise, nested sequences too.

    Values are not converted here (:func:`check_instance` converts :data:`READ_ATTRIBUTES`): a value that cannot
    be decoded (a 3-byte US inside an item, say) in an element no stage reads is stored as received, as a PACS
    stores it.

    *source*: the file *dataset* was read from with ``defer_size``; a deferred sequence is read from it.
    """
    check_structure(dataset, data_length, transfer_syntax)
    _check_sequences(dataset, data_length, transfer_syntax, source)


def _check_sequences(dataset: Dataset, data_length: int, transfer_syntax: UID, source: Path | None) -> None:
    for tag in dataset.keys():  # noqa: SIM118 -- iterating a Dataset itself would convert every element
        held = dataset.get_item(tag, keep_deferred=True)
        if isinstance(held, RawDataElement):
            if not _may_be_sequence(held):
                continue
            if held.value is None and held.length > 0:  # deferred (over DEFER_SIZE): read it from the file
                if source is None:
                    raise ValueError(f"element {tag} was deferred but the file it was read from is not known")
                held = read_deferred_data_element(open, str(source), None, held)
            element = convert_raw_data_element(held, encoding=dataset.original_character_set, ds=dataset)
        else:
            element = held
        if element.VR != VR.SQ:
            continue
        for item in element.value:
            check_structure(item, data_length, transfer_syntax, whole=False)
            _check_sequences(item, data_length, transfer_syntax, source)


def _may_be_sequence(raw: RawDataElement) -> bool:
    """Whether pydicom would convert *raw* to a sequence: VR SQ, or (implicit VR, or UN) an undefined length or a
    tag its dictionary knows as SQ."""
    if raw.VR == VR.SQ:
        return True
    if raw.VR not in (None, VR.UN):
        return False
    if raw.length == UNDEFINED_LENGTH:
        return True
    try:
        return bool(dictionary_VR(raw.tag) == VR.SQ)
    except KeyError:  # private or unknown: pydicom reads it as UN, not as a sequence
        return False


def check_structure(dataset: Dataset, data_length: int, transfer_syntax: UID, *, whole: bool = True) -> None:
    """Raise ``ValueError`` for a stream pydicom only warns about: wrong VR encoding, truncated or trailing bytes.

    Must run before the elements are converted (it inspects the raw elements' lengths and offsets). *data_length*:
    the bytes received (preamble and file meta included). A deferred element (read with ``defer_size``: its value
    is ``None``, pydicom skipped over it) must lie wholly within them. *whole*: *dataset* is the whole data set
    (not a sequence item), which must end where the received bytes end.
    """
    end: int | None = None
    for tag in dataset.keys():  # noqa: SIM118 -- iterating a Dataset itself would convert the raw elements
        raw = dataset.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement):
            end = None
            continue
        if raw.is_implicit_VR != transfer_syntax.is_implicit_VR:
            raise ValueError(f"element {tag} is not encoded in {'im' if transfer_syntax.is_implicit_VR else 'ex'}"
                             f"plicit VR as transfer syntax {transfer_syntax.name} requires")
        if raw.length == UNDEFINED_LENGTH:
            end = None
            continue
        if raw.value is None and raw.length > 0:  # deferred: compare with what was received
            present = max(0, min(raw.length, data_length - raw.value_tell))
        elif isinstance(raw.value, bytes):
            present = len(raw.value)
        else:
            end = None
            continue
        if present != raw.length:
            raise ValueError(f"element {tag} is truncated: {present} of {raw.length} bytes present")
        end = raw.value_tell + raw.length
    if whole and end is not None and not transfer_syntax.is_deflated and end != data_length:
        raise ValueError(f"the data set ends at byte {end} but {data_length} bytes were received "
                         "(truncated element header or trailing bytes)")
