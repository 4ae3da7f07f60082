"""Storage SCU: send DICOM instances (files, folders or in-memory datasets) to a peer with C-STORE.

Presentation contexts: every instance is sent in the transfer syntax it is stored in. One context is proposed
per (SOP Class, transfer syntax) found, offering exactly that transfer syntax; the two uncompressed little
endian syntaxes (Explicit and Implicit VR) share one context that offers both, so the peer may pick either and
pynetdicom re-encodes between them. Compressed, deflated and big endian data are never transcoded here: if the
peer accepts none of them for that SOP Class, those instances fail with a reason saying so. At most 128
contexts fit in one association, so more distinct pairs are split into several associations (batches).

The TCP socket gets ``TCP_NODELAY`` as soon as it is connected: DIMSE exchanges many small PDUs and Nagle's
algorithm would otherwise delay each response.

A peer that cannot be reached, rejects the association or answers nothing raises a :class:`SendError`
subclass naming the destination (with the partial summary of earlier batches); per-instance problems
(unreadable file, refused status, no accepted context, no response) are recorded in the :class:`SendSummary`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage
from pynetdicom import AE, Association, build_context, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from core.settings import Destination

log = logging.getLogger(__name__)

MAX_CONTEXTS_PER_ASSOCIATION = 128
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_MESSAGE_ID = 0xFFFF

SendItem = Path | str | Dataset


class Outcome(StrEnum):
    """What happened to one instance."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, but the peer reported a warning status (e.g. 0xB000 coercion)
    FAILURE = "failure"


@dataclass(frozen=True)
class InstanceResult:
    """The outcome of one instance: its DIMSE *status* (``None`` when it was never answered) and why."""

    source: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax_uid: str | None
    outcome: Outcome
    status: int | None
    reason: str = ""


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not a DICOM instance to send (not DICOM at all, or a DICOMDIR)."""

    path: Path
    reason: str


@dataclass
class SendSummary:
    """Everything one send did, in the order the instances were given."""

    destination: Destination
    results: list[InstanceResult] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    associations: int = 0
    elapsed_s: float = 0.0

    @property
    def succeeded(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.SUCCESS]

    @property
    def warnings(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.WARNING]

    @property
    def failed(self) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is Outcome.FAILURE]

    @property
    def ok(self) -> bool:
        """True when every instance was stored (warnings included) and none failed."""
        return not self.failed

    def describe(self) -> str:
        return (
            f"{len(self.results)} instance(s) to {self.destination}: {len(self.succeeded)} ok, "
            f"{len(self.warnings)} warning, {len(self.failed)} failed, {len(self.skipped)} file(s) skipped; "
            f"{self.associations} association(s) in {self.elapsed_s:.2f} s"
        )


class SendError(Exception):
    """The destination could not take the instances at all; *summary* holds what earlier batches did."""

    def __init__(self, message: str, destination: Destination, summary: SendSummary) -> None:
        super().__init__(message)
        self.destination = destination
        self.summary = summary


class PeerUnreachableError(SendError):
    """No TCP connection could be made (host unknown, port closed, timeout, TLS handshake failed)."""


class AssociationRejectedError(SendError):
    """The peer answered A-ASSOCIATE-RJ (wrong called AE title, calling AE not allowed, busy…).

    *transient* is True for "rejected-transient" (result 2: worth retrying later), False for permanent.
    """

    def __init__(self, message: str, destination: Destination, summary: SendSummary, *, transient: bool) -> None:
        super().__init__(message, destination, summary)
        self.transient = transient


class AssociationFailedError(SendError):
    """The peer accepted the connection but aborted or never answered the association request."""


@dataclass(frozen=True)
class PlannedInstance:
    """One instance to send: read from *path* when its turn comes, or the in-memory *dataset*."""

    source: str
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax_uid: UID
    path: Path | None = None
    dataset: Dataset | None = None

    @property
    def context_key(self) -> tuple[UID, tuple[UID, ...]]:
        """(abstract syntax, proposed transfer syntaxes) of the presentation context this instance needs."""
        if self.transfer_syntax_uid in _UNCOMPRESSED_LE:
            return self.sop_class_uid, _UNCOMPRESSED_LE
        return self.sop_class_uid, (self.transfer_syntax_uid,)

    def failure(self, reason: str, status: int | None = None) -> InstanceResult:
        return InstanceResult(
            self.source, self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid,
            Outcome.FAILURE, status, reason,
        )


@dataclass
class SendPlan:
    """Instances ready to send, plus what was skipped or unreadable while reading the inputs."""

    instances: list[PlannedInstance] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    unreadable: list[InstanceResult] = field(default_factory=list)

    def batches(self) -> list[list[PlannedInstance]]:
        """Instances grouped so that each group needs at most 128 presentation contexts."""
        keys: dict[tuple[UID, tuple[UID, ...]], None] = {}
        for instance in self.instances:
            keys.setdefault(instance.context_key, None)
        ordered = list(keys)
        groups = []
        for start in range(0, len(ordered), MAX_CONTEXTS_PER_ASSOCIATION):
            chunk = set(ordered[start : start + MAX_CONTEXTS_PER_ASSOCIATION])
            groups.append([i for i in self.instances if i.context_key in chunk])
        return groups


def iter_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Each path given, with folders expanded recursively (sorted, hidden files included)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def prepare(items: Sequence[SendItem]) -> SendPlan:
    """Read each file's header (up to the pixel data) and check every dataset; nothing is sent yet."""
    plan = SendPlan()
    paths = [item for item in items if not isinstance(item, Dataset)]
    datasets = [(n, item) for n, item in enumerate(items) if isinstance(item, Dataset)]
    for path in iter_files(paths):
        _prepare_file(path, plan)
    for number, dataset in datasets:
        _prepare_dataset(number, dataset, plan)
    return plan


def _prepare_file(path: Path, plan: SendPlan) -> None:
    source = str(path)
    try:
        header = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        log.warning("skipping %s: not a DICOM file (no DICM prefix and file meta information)", path)
        plan.skipped.append(SkippedFile(path, "not a DICOM file"))
        return
    except FileNotFoundError:
        plan.unreadable.append(_unreadable(source, "no such file or directory"))
        return
    except Exception as exc:  # any parser error of an untrusted file is reported for that file
        plan.unreadable.append(_unreadable(source, f"cannot read DICOM header: {type(exc).__name__}: {exc}"))
        return
    if header.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        log.warning("skipping %s: a DICOMDIR is a media index, not an instance to store", path)
        plan.skipped.append(SkippedFile(path, "DICOMDIR"))
        return
    problem = _missing_identity(header)
    if problem:
        plan.unreadable.append(_unreadable(source, problem))
        return
    plan.instances.append(
        PlannedInstance(
            source, header.SOPClassUID, header.SOPInstanceUID, header.file_meta.TransferSyntaxUID, path=path
        )
    )


def _prepare_dataset(number: int, dataset: Dataset, plan: SendPlan) -> None:
    source = f"dataset #{number}"
    problem = _missing_identity(dataset)
    if problem:
        plan.unreadable.append(_unreadable(source, problem))
        return
    plan.instances.append(
        PlannedInstance(source, dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.file_meta.TransferSyntaxUID,
                  dataset=dataset)
    )


def _missing_identity(dataset: Dataset) -> str:
    """Empty if *dataset* names its SOP Class, SOP Instance and transfer syntax; else which one is missing."""
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not dataset.get(keyword):
            return f"{keyword} (0008,{'0016' if keyword == 'SOPClassUID' else '0018'}) is missing or empty"
    meta = getattr(dataset, "file_meta", None)
    if meta is None or not meta.get("TransferSyntaxUID"):
        return "file meta TransferSyntaxUID (0002,0010) is missing or empty"
    return ""


def _unreadable(source: str, reason: str) -> InstanceResult:
    return InstanceResult(source, None, None, None, Outcome.FAILURE, None, reason)


def send_instances(
    destination: Destination,
    items: Sequence[SendItem] | SendPlan,
    *,
    calling_ae_title: str = "RADDRAFT",
    tls_context: ssl.SSLContext | None = None,
    connection_timeout_s: float = 10.0,
    timeout_s: float = 60.0,
    progress: Callable[[InstanceResult], None] | None = None,
) -> SendSummary:
    """Send files, folders or datasets to *destination*; return what happened to each instance.

    *timeout_s* bounds each wait for the peer (association reply, each C-STORE response, idle network).
    *progress* is called once per instance result, including unreadable ones.
    Raises :class:`PeerUnreachableError`, :class:`AssociationRejectedError` or
    :class:`AssociationFailedError` when the peer cannot take an association.
    """
    plan = items if isinstance(items, SendPlan) else prepare(items)
    summary = SendSummary(destination, skipped=list(plan.skipped))
    started = time.monotonic()
    for result in plan.unreadable:
        _record(summary, result, progress)

    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = connection_timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    address = _resolve(destination, summary)
    try:
        for batch in plan.batches():
            _send_batch(
                ae, address, destination, batch, tls_context=tls_context, summary=summary, progress=progress
            )
    finally:
        summary.elapsed_s = time.monotonic() - started
        ae.shutdown()
    log.info("sent %s", summary.describe())
    return summary


def _resolve(destination: Destination, summary: SendSummary) -> str | tuple[str, int, int]:
    try:
        infos = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PeerUnreachableError(
            f"cannot resolve host {destination.host!r} of DICOM destination {destination}: {exc}",
            destination, summary,
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    if family == socket.AF_INET6:
        return (str(sockaddr[0]), int(sockaddr[2]), int(sockaddr[3]))
    return str(sockaddr[0])


@dataclass
class _Trace:
    """What the association's event handlers saw: the TCP connection opened; an A-ASSOCIATE-RJ arrived."""

    opened: bool = False
    rejection: A_ASSOCIATE_RJ | None = None


def _on_conn_open(event: evt.Event, trace: _Trace) -> None:
    """EVT_CONN_OPEN (requestor side): disable Nagle on the association's socket."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    trace.opened = True


def _on_pdu_recv(event: evt.Event, trace: _Trace) -> None:
    """EVT_PDU_RECV: keep an A-ASSOCIATE-RJ. A peer that closes the socket right after rejecting (storescp
    --refuse) can make pynetdicom report an abort instead of the rejection; the PDU still says why."""
    if isinstance(event.pdu, A_ASSOCIATE_RJ):
        trace.rejection = event.pdu


def _send_batch(
    ae: AE,
    address: str | tuple[str, int, int],
    destination: Destination,
    batch: list[PlannedInstance],
    *,
    tls_context: ssl.SSLContext | None,
    summary: SendSummary,
    progress: Callable[[InstanceResult], None] | None,
) -> None:
    keys = list(dict.fromkeys(i.context_key for i in batch))
    contexts = [build_context(abstract, list(syntaxes)) for abstract, syntaxes in keys]
    trace = _Trace()
    assoc = ae.associate(
        address,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        tls_args=(tls_context, destination.host) if tls_context is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, _on_conn_open, [trace]), (evt.EVT_PDU_RECV, _on_pdu_recv, [trace])],
    )
    summary.associations += 1
    if not assoc.is_established:
        reply = assoc.acceptor.primitive
        if reply is None or reply.result != 0:
            _raise_for_association(ae, destination, trace, summary)
        # Accepted, but not one presentation context: pynetdicom aborted it. A permanent per-instance failure.
        for instance in batch:
            syntax = instance.transfer_syntax_uid
            reason = (
                f"{destination} accepted none of the {len(contexts)} proposed presentation contexts "
                f"(this one: SOP Class {instance.sop_class_uid.name}, transfer syntax {syntax.name})"
            )
            _record(summary, instance.failure(reason), progress)
        return
    try:
        for number, instance in enumerate(batch):
            if not assoc.is_established:
                result = instance.failure("association was aborted before this instance could be sent")
            else:
                result = _store(assoc, instance, number % _MAX_MESSAGE_ID + 1)
            _record(summary, result, progress)
    finally:
        if assoc.is_established:
            assoc.release()


def _raise_for_association(ae: AE, destination: Destination, trace: _Trace, summary: SendSummary) -> None:
    rejection = trace.rejection
    if rejection is not None:
        raise AssociationRejectedError(
            f"DICOM destination {destination} rejected the association: {rejection.result_str}, "
            f"source {rejection.source_str}, reason {rejection.reason_str!r} (calling AE {ae.ae_title!r}, "
            f"called AE {destination.ae_title!r})",
            destination, summary, transient=rejection.result == 2,
        )
    if not trace.opened:
        raise PeerUnreachableError(
            f"cannot connect to DICOM destination {destination}: connection refused, timed out or TLS "
            f"handshake failed (connection timeout {ae.connection_timeout} s)",
            destination, summary,
        )
    raise AssociationFailedError(
        f"DICOM destination {destination} closed or aborted the association request without answering it "
        f"(or sent no answer within {ae.acse_timeout} s)",
        destination, summary,
    )


def _store(assoc: Association, instance: PlannedInstance, message_id: int) -> InstanceResult:
    if instance.dataset is not None:
        dataset = instance.dataset
    else:
        try:
            dataset = dcmread(instance.path)
        except Exception as exc:  # any parser error of an untrusted file is reported for that file
            return instance.failure(f"cannot read DICOM file: {type(exc).__name__}: {exc}")
    try:
        response = assoc.send_c_store(dataset, msg_id=message_id)
    except ValueError as exc:  # no accepted presentation context, or the dataset cannot be encoded
        syntax = instance.transfer_syntax_uid
        return instance.failure(
            f"not sent: {exc} (SOP Class {instance.sop_class_uid.name}, transfer syntax {syntax.name})"
        )
    status = response.get("Status")
    if status is None:
        return instance.failure("no C-STORE response: DIMSE timeout or association aborted")
    category = code_to_category(status)
    description = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown status"))[1]
    comment = response.get("ErrorComment")
    reason = f"0x{status:04X} {description}" + (f": {comment}" if comment else "")
    if category == "Success":
        return InstanceResult(
            instance.source, instance.sop_class_uid, instance.sop_instance_uid, instance.transfer_syntax_uid,
            Outcome.SUCCESS, status,
        )
    if category == "Warning":
        return InstanceResult(
            instance.source, instance.sop_class_uid, instance.sop_instance_uid, instance.transfer_syntax_uid,
            Outcome.WARNING, status, reason,
        )
    return instance.failure(f"refused by peer: {reason}", status)


def _record(summary: SendSummary, result: InstanceResult, progress: Callable[[InstanceResult], None] | None) -> None:
    summary.results.append(result)
    if result.outcome is Outcome.FAILURE:
        log.warning("%s (SOP Instance %s) failed: %s", result.source, result.sop_instance_uid, result.reason)
    if progress is not None:
        progress(result)
