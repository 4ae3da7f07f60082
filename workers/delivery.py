"""Deliver one output set of one study episode to one destination: DICOM with C-STORE or DICOMweb STOW-RS, HL7
with MLLP.

One runner for every output set: the draft the report stage wrote (``draft``: the episode's outbox folder) and a
version the radiologists signed on the worklist (``signed:<n>``: its final set, in the episode's folder for the
first signature and in ``amendment_<n>/`` for an amendment, core/layout.py ``version_dir``). A delivery is one row
of the state store's ``deliveries`` (:class:`state.store.DeliveryKey`) and one io task, ``raddraft.deliver``, whose
arguments are IDs only: :func:`task_args` ``[study UID, episode id, output set, kind, destination]``.

The files are read from the outbox exactly as the report stage (or signing) wrote them, so a retried delivery
resends the same SR (same UIDs) and the same ORU (same MSH-10), never a different one. A DICOM delivery is done
only when every object got a Success status; a DICOMweb delivery only when the STOW-RS response (HTTP 200) lists
every instance sent in its Referenced SOP Sequence and none in a Failed SOP Sequence (a partial 202 is a failure);
an HL7 delivery only when the peer answered AA (or CA).

Errors are sorted for the retry policy: :class:`TransientDeliveryError` (the peer is down, busy, timed out or
closed the connection: a later retry may succeed) and :class:`PermanentDeliveryError` (rejected, refused, or
the outputs are missing: retrying cannot help, it goes to the dead-letter table at once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_auth
from pydicom.errors import InvalidDicomError

from core import metrics
from core.layout import episode_dir, version_dir
from core.settings import Destination, DicomWebAuth, HL7Destination, Settings, normalize_dicomweb_url
from core.states import DeliveryState, signed_output, signed_version
from dicom_node.episodes import BrokerUnavailableError
from dicom_node.scu import (
    AssociationFailedError,
    AssociationRejectedError,
    Outcome,
    PeerUnreachableError,
    SendSummary,
    send_instances,
)
from reporting.mllp import Ack, MLLPError, deliver
from reporting.outputs import OutboxEntry, read_entries, read_problems
from state.store import DeliveryKey, StateStore
from workers.celery_app import WORKLIST_DELIVERY_OUTCOME_TASK

log = logging.getLogger(__name__)

DICOM = "dicom"  # delivery kinds, as stored in the index
DICOMWEB = "dicomweb"  # the DICOM outputs, over STOW-RS
HL7 = "hl7"
DICOM_CONNECT_TIMEOUT_S = 10.0
# DIMSE statuses of a C-STORE failure worth retrying: 0xA7xx "Refused: Out of Resources" (PS3.4 B.2.3)
_OUT_OF_RESOURCES = range(0xA700, 0xA800)


class OutputSet(StrEnum):
    """Which files of the outbox folder a delivery sends."""

    DRAFT = "draft"
    FINAL = "final"


class DeliveryError(Exception):
    """A delivery failed; ``transient`` says whether a later retry may succeed."""

    transient: bool = False


class TransientDeliveryError(DeliveryError):
    transient = True


class PermanentDeliveryError(DeliveryError):
    transient = False


KINDS = (DICOM, DICOMWEB, HL7)
# which outputs of the outbox index (OutboxEntry.delivery) a delivery of each kind sends
ENTRY_DELIVERY = {DICOM: DICOM, DICOMWEB: DICOM, HL7: HL7}
# HTTP statuses of a STOW-RS request worth retrying: the peer is busy or a gateway in front of it timed out
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_ERROR_CHARS = 500  # of an error or a reason kept in the row and the worklist's audit
Publisher = Callable[[str, list[Any], str], None]  # (task name, args, task id); raises BrokerUnavailableError
# The delivery tasks before there was one (their dead letters may still be re-played): name → the output set of
# their arguments ([study UID, episode id, destination], or [study UID, episode id, version, destination]).
LEGACY_TASKS = {"raddraft.deliver_dicom": DICOM, "raddraft.deliver_hl7": HL7,
                "raddraft.deliver_signed_dicom": DICOM, "raddraft.deliver_signed_hl7": HL7}


def task_args(key: DeliveryKey) -> list[Any]:
    """The arguments of the delivery task of *key*: IDs only."""
    return [key.study_instance_uid, key.episode_id, key.output_set, key.kind, key.destination]


def key_of_args(args: Sequence[Any], task_name: str | None = None) -> DeliveryKey:
    """The delivery of a task's arguments; *task_name* a name of :data:`LEGACY_TASKS` reads the old arguments.
    Raises :class:`PermanentDeliveryError` for a kind or an output set that is not one."""
    if task_name in LEGACY_TASKS:
        kind = LEGACY_TASKS[task_name]
        if "signed" in task_name:
            study_uid, episode_id, version, destination = args
            return DeliveryKey(str(study_uid), int(episode_id), kind, str(destination), signed_output(int(version)))
        study_uid, episode_id, destination = args
        return DeliveryKey(str(study_uid), int(episode_id), kind, str(destination))
    study_uid, episode_id, output_set, kind, destination = args
    if kind not in KINDS:
        raise PermanentDeliveryError(f"delivery kind {kind!r} must be {DICOM!r}, {DICOMWEB!r} or {HL7!r}")
    try:
        signed_version(str(output_set))
    except ValueError as exc:
        raise PermanentDeliveryError(str(exc)) from exc
    return DeliveryKey(str(study_uid), int(episode_id), str(kind), str(destination), str(output_set))


def task_id(key: DeliveryKey) -> str:
    """Deterministic: a re-published delivery gets the id of the original (the ids of the tasks it replaced)."""
    version = signed_version(key.output_set)
    if version is None:
        return f"deliver-{key.kind}-{key.study_instance_uid}-{key.episode_id}-{key.destination}"
    return f"deliver-signed-{key.kind}-{key.study_instance_uid}-{key.episode_id}-v{version}-{key.destination}"


def folder_of(settings: Settings, key: DeliveryKey) -> tuple[Path, OutputSet]:
    """Where the files of *key*'s output set are, and which set of that folder they are."""
    version = signed_version(key.output_set)
    if version is None:
        return episode_dir(settings.outbox_dir, key.study_instance_uid, key.episode_id), OutputSet.DRAFT
    return version_dir(settings.outbox_dir, key.study_instance_uid, key.episode_id, version), OutputSet.FINAL


def unbuilt_reason(folder: Path, output_set: OutputSet, kind: str,
                   entries: Sequence[OutboxEntry] | None = None) -> str | None:
    """Why *folder*'s *output_set* has nothing of *kind* to send (the outputs its index records as not built), or
    None when it has something, or was never written, or its index cannot be read (sending raises the permanent
    error). *entries*: the set's index as the caller read it (read here when not given)."""
    try:
        if entries is None:
            entries = read_entries(folder, signed=output_set is OutputSet.FINAL)
        delivery = ENTRY_DELIVERY.get(kind, kind)
        if not entries or any(entry.delivery == delivery for entry in entries):
            return None
        problems = read_problems(folder, signed=output_set is OutputSet.FINAL)
    except (OSError, ValueError):
        return None
    names = ("sr", "narrative", "gsps") if delivery == DICOM else (HL7,)
    reason = "; ".join(f"{p.kind} {p.state}: {p.reason}" for p in problems if p.kind in names)
    return reason or f"no {'DICOM output' if delivery == DICOM else 'ORU'} was built"


def send(settings: Settings, key: DeliveryKey, entries: Sequence[OutboxEntry] | None = None) -> str:
    """Send *key*'s output set to its destination (*entries*: its index, read here when not given); what was done,
    for the log and the audit. Raises :class:`DeliveryError` (transient or permanent)."""
    folder, output_set = folder_of(settings, key)
    if key.kind == DICOM:
        summary = send_dicom_folder(settings, folder, Destination.parse(key.destination), output_set, entries)
        detail = f"{len(summary.results)} object(s) stored"
    elif key.kind == DICOMWEB:
        stored = send_dicomweb_folder(settings, folder, key.destination, output_set, entries)
        detail = f"{len(stored)} object(s) stored over STOW-RS"
    else:
        ack = send_hl7_folder(settings, folder, HL7Destination.parse(key.destination), output_set, entries)
        detail = f"ORU {ack.control_id} {ack.code}"
    log.info("%s: %s", key, detail)
    return detail


def run(settings: Settings, store: StateStore, key: DeliveryKey, publish: Publisher, *,
        clock: Callable[[], float] = time.time) -> bool:
    """The work of one delivery task: send *key*'s output set unless its row is done (a duplicate: False) or the
    set has nothing of its kind (``skipped`` with the reason: False); done when the peer stored it all (True).

    Every failed attempt is counted in the row and re-raised (the task retries a transient error, and a dead letter
    marks the row ``dead``). A signed version's end (done, skipped) is reported to the worklist for its audit
    (:func:`report_outcome`)."""
    row = store.delivery(key)
    if row is None:
        raise PermanentDeliveryError(f"{key} is not in the index (nothing created it)")
    if row.state in (DeliveryState.DONE, DeliveryState.SKIPPED):
        log.info("%s is already %s; duplicate ignored", key, row.state)
        return False
    folder, output_set = folder_of(settings, key)
    try:  # the set's index, read once for the whole stage
        entries: list[OutboxEntry] | None = read_entries(folder, signed=output_set is OutputSet.FINAL)
    except (OSError, ValueError):
        entries = None  # sending reads it again and raises the permanent error with its reason
    reason = unbuilt_reason(folder, output_set, key.kind, entries)
    if reason is not None:
        store.finish_delivery(key, DeliveryState.SKIPPED, clock(), reason[:MAX_ERROR_CHARS], attempted=False)
        log.info("%s skipped: %s", key, reason)
        report_outcome(key, DeliveryState.SKIPPED, reason, publish)
        return False
    try:
        detail = send(settings, key, entries)
    except Exception as exc:
        metrics.record_delivery(key.kind, ok=False)
        store.note_delivery_error(key, str(exc)[:MAX_ERROR_CHARS])
        raise
    metrics.record_delivery(key.kind, ok=True)
    store.finish_delivery(key, DeliveryState.DONE, clock())
    report_outcome(key, DeliveryState.DONE, detail, publish)
    return True


def report_outcome(key: DeliveryKey, state: DeliveryState, detail: str, publish: Publisher) -> None:
    """Tell the worklist how a signed version's delivery ended (``worklist.delivery_outcome``, sent by name: the
    worklist writes its audit line); nothing for a draft. The row in the state store is the record: a broker that
    refuses costs the audit line only (logged)."""
    version = signed_version(key.output_set)
    if version is None:
        return
    args = [*task_args(key), str(state), detail[:MAX_ERROR_CHARS]]
    try:
        publish(WORKLIST_DELIVERY_OUTCOME_TASK, args, f"outcome-{state}-{task_id(key)}")
    except BrokerUnavailableError as exc:
        log.warning("%s ended %s; the worklist's audit misses it (broker refused: %s)", key, state, exc)


def dicom_outputs(folder: Path, output_set: OutputSet = OutputSet.DRAFT,
                  entries: Sequence[OutboxEntry] | None = None) -> list[Path]:
    """The DICOM files of one output set in *folder* as its outbox index lists them (reporting/outputs.py): SR,
    narrative SR, then the GSPS in order, those the report stage could build (it records the others). A file
    the index does not list (a GSPS left by an earlier run that built more) is never sent.

    Raises :class:`PermanentDeliveryError` when there is none (the report stage has not run, or built none), or
    the index is unreadable.
    """
    files = [entry.path for entry in _entries(folder, output_set, entries) if entry.delivery == DICOM]
    if not files:
        raise PermanentDeliveryError(f"outbox folder {folder} has no DICOM output of the {output_set.value} set: "
                                     "the report stage has not written it, or could build none")
    return files


def hl7_output(folder: Path, output_set: OutputSet = OutputSet.DRAFT,
               entries: Sequence[OutboxEntry] | None = None) -> bytes:
    paths = [entry.path for entry in _entries(folder, output_set, entries) if entry.delivery == HL7]
    if not paths:
        raise PermanentDeliveryError(f"outbox folder {folder} has no ORU: the report stage has not written the "
                                     f"{output_set.value} set, or could not build it")
    return paths[0].read_bytes()


def _entries(folder: Path, output_set: OutputSet, entries: Sequence[OutboxEntry] | None = None
             ) -> Sequence[OutboxEntry]:
    if entries is not None:
        return entries
    try:
        return read_entries(folder, signed=output_set is OutputSet.FINAL)
    except (OSError, ValueError) as exc:  # OutboxIndexError is a ValueError; a torn index is a JSON ValueError
        raise PermanentDeliveryError(f"outbox folder {folder}: its index cannot be read: {exc}") from exc


def send_dicom_folder(settings: Settings, folder: Path, destination: Destination,
                      output_set: OutputSet = OutputSet.DRAFT, entries: Sequence[OutboxEntry] | None = None
                      ) -> SendSummary:
    """C-STORE the DICOM outputs of *output_set* in *folder* (an episode's, or an amendment's); the summary when
    every one got a Success status, else a transient (no status, Out of Resources) or permanent error."""
    files = dicom_outputs(folder, output_set, entries)
    try:
        summary = send_instances(destination, files, calling_ae_title=settings.ae_title,
                                 connection_timeout_s=min(DICOM_CONNECT_TIMEOUT_S, settings.network_timeout_s),
                                 timeout_s=settings.network_timeout_s)
    except (PeerUnreachableError, AssociationFailedError) as exc:
        raise TransientDeliveryError(f"DICOM destination {destination} is not reachable: {exc}") from exc
    except AssociationRejectedError as exc:
        kind = TransientDeliveryError if exc.transient else PermanentDeliveryError
        raise kind(f"DICOM destination {destination} rejected the association: {exc}") from exc
    except OSError as exc:
        raise TransientDeliveryError(f"DICOM destination {destination}: {exc}") from exc
    not_stored = [r for r in summary.results if r.outcome is not Outcome.SUCCESS]
    if summary.skipped or not_stored:
        reasons = "; ".join(f"{r.sop_instance_uid}: {r.outcome.value} "
                            f"{'no status' if r.status is None else f'0x{r.status:04X}'} {r.reason}".rstrip()
                            for r in not_stored)
        reasons += "".join(f"; {s.path.name}: skipped, {s.reason}" for s in summary.skipped)
        transient = all(r.status is None or r.status in _OUT_OF_RESOURCES for r in not_stored) and not summary.skipped
        kind = TransientDeliveryError if transient else PermanentDeliveryError
        raise kind(f"DICOM destination {destination} did not store {len(not_stored) + len(summary.skipped)} of "
                   f"{len(files)} object(s) with a Success status: {reasons.lstrip('; ')}")
    return summary


def send_hl7_folder(settings: Settings, folder: Path, destination: HL7Destination,
                    output_set: OutputSet = OutputSet.DRAFT, entries: Sequence[OutboxEntry] | None = None) -> Ack:
    """Send the ORU of *output_set* in *folder* to *destination*; the ACK when it is AA (or CA)."""
    message = hl7_output(folder, output_set, entries)
    try:
        ack = deliver(message, destination, settings)
    except MLLPError as exc:
        kind = TransientDeliveryError if exc.transient else PermanentDeliveryError
        raise kind(f"HL7 destination {destination}: {exc}") from exc
    except OSError as exc:
        raise TransientDeliveryError(f"HL7 destination {destination}: {exc}") from exc
    return ack


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>``, added to each request as it is sent (so that the token is in no header
    dictionary a client logs)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(**********)"


def dicomweb_session(settings: Settings, url: str) -> requests.Session:
    """The HTTP session of one delivery to DICOMweb destination *url*: its credentials (``dicomweb_auth_file``,
    else ``dicomweb_bearer_token``, else none) and TLS verification (``dicomweb_ca_bundle``, else the default
    CAs; off only with ``dicomweb_insecure``, logged as a warning)."""
    auth: DicomWebAuth | None = settings.dicomweb_auth(url)
    if auth is None:
        session = create_session()
    elif auth.scheme == "basic":
        session = create_session_from_auth(requests.auth.HTTPBasicAuth(auth.username or "",
                                                                       auth.secret.get_secret_value()))
    else:
        session = create_session_from_auth(BearerAuth(auth.secret.get_secret_value()))
    if settings.dicomweb_insecure:
        log.warning("DICOMweb destination %s: TLS certificate verification is OFF (dicomweb_insecure)", url)
        session.verify = False
    elif settings.dicomweb_ca_bundle is not None:
        session.verify = str(settings.dicomweb_ca_bundle)
    else:
        session.verify = True
    return session


def _read_outputs(files: Sequence[Path]) -> list[pydicom.Dataset]:
    datasets = []
    for path in files:
        try:
            dataset = pydicom.dcmread(path)
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            raise PermanentDeliveryError(f"output {path.name} cannot be read: {type(exc).__name__}: {exc}") from exc
        if "SOPInstanceUID" not in dataset:
            raise PermanentDeliveryError(f"output {path.name} has no SOP Instance UID")
        datasets.append(dataset)
    return datasets


def _failures(document: pydicom.Dataset | None) -> list[tuple[str, int | None]]:
    """``(SOP Instance UID, Failure Reason)`` of each item of a Store Instances Response's Failed SOP Sequence."""
    if document is None:
        return []
    failed = []
    for item in document.get("FailedSOPSequence", None) or []:
        reason = item.get("FailureReason", None)
        failed.append((str(item.get("ReferencedSOPInstanceUID", "") or "?"),
                       int(reason) if reason is not None else None))
    return failed


def _referenced(document: pydicom.Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in document.get("ReferencedSOPSequence", None) or []
            if "ReferencedSOPInstanceUID" in item}


def _describe_failures(failed: Sequence[tuple[str, int | None]]) -> str:
    return "; ".join(f"{uid}: {'no Failure Reason' if reason is None else f'Failure Reason 0x{reason:04X}'}"
                     for uid, reason in failed)


def _error_document(response: requests.Response | None) -> pydicom.Dataset | None:
    """The Store Instances Response of an error answer (a 409 names the failed instances), when it has one."""
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json",):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def send_dicomweb_folder(settings: Settings, folder: Path, url: str, output_set: OutputSet = OutputSet.DRAFT,
                         entries: Sequence[OutboxEntry] | None = None) -> list[str]:
    """STOW-RS the DICOM outputs of *output_set* in *folder* to DICOMweb destination *url* (``<url>/studies``);
    the SOP Instance UIDs stored, when the answer was HTTP 200 and its Store Instances Response references every
    one and fails none. Otherwise a transient error (no connection, a timeout, HTTP 408/429/5xx, every failed
    instance Out of Resources 0xA7xx) or a permanent one (401/403, another 4xx, a refused instance, an answer
    that does not account for every instance), naming the failed instances and their Failure Reasons.

    The client's own retries are off: the delivery task retries, with its backoff and its dead letter."""
    url = normalize_dicomweb_url(url)
    files = dicom_outputs(folder, output_set, entries)
    datasets = _read_outputs(files)
    sent = [str(dataset.SOPInstanceUID) for dataset in datasets]
    statuses: list[int] = []

    def _note_status(response: requests.Response, *_args: Any, **_kwargs: Any) -> requests.Response:
        statuses.append(response.status_code)
        return response

    timeout = settings.network_timeout_s
    session = dicomweb_session(settings, url)
    try:
        client = DICOMwebClient(url, session=session, callback=_note_status,
                                timeout=(min(DICOM_CONNECT_TIMEOUT_S, timeout), timeout))
        client.set_http_retry_params(retry=False)
        document = client.store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        failed = _failures(_error_document(exc.response))
        detail = f"; failed: {_describe_failures(failed)}" if failed else ""
        if status in (401, 403):
            raise PermanentDeliveryError(f"DICOMweb destination {url} refused the credentials: HTTP {status} "
                                         f"{'Unauthorized' if status == 401 else 'Forbidden'}") from exc
        transient = status in _TRANSIENT_HTTP or (
            bool(failed) and all(reason is not None and reason in _OUT_OF_RESOURCES for _, reason in failed))
        kind = TransientDeliveryError if transient else PermanentDeliveryError
        raise kind(f"DICOMweb destination {url} answered HTTP {status} to the STOW-RS of {len(sent)} object(s)"
                   f"{detail}") from exc
    except requests.exceptions.SSLError as exc:  # a ConnectionError too, but retrying cannot fix a certificate
        raise PermanentDeliveryError(f"DICOMweb destination {url}: TLS failed: {exc}") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise TransientDeliveryError(f"DICOMweb destination {url} is not reachable: {type(exc).__name__}: "
                                     f"{exc}") from exc
    except requests.RequestException as exc:
        raise PermanentDeliveryError(f"DICOMweb destination {url}: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # an answer of another media type than DICOM JSON or XML
        raise PermanentDeliveryError(f"DICOMweb destination {url} answered the STOW-RS with no readable Store "
                                     f"Instances Response: {exc}") from exc
    finally:
        session.close()
    status = statuses[-1] if statuses else None
    failed = _failures(document)
    referenced = _referenced(document)
    not_stored = [uid for uid in sent if uid not in referenced]
    # a sent instance neither referenced nor failed by its UID (a peer names a failed one by the UID it read)
    unaccounted = [uid for uid in not_stored if uid not in {u for u, _ in failed}]
    if status != 200 or failed or not_stored:
        reasons = _describe_failures(failed)
        if unaccounted:
            reasons += f"{'; ' if reasons else ''}not referenced in the response: {', '.join(unaccounted)}"
        transient = bool(failed) and len(unaccounted) <= len(failed) and all(
            reason is not None and reason in _OUT_OF_RESOURCES for _, reason in failed)
        kind = TransientDeliveryError if transient else PermanentDeliveryError
        count = max(len(failed), len(not_stored))
        raise kind(f"DICOMweb destination {url} (HTTP {status}) did not store {count} of {len(sent)} object(s): "
                   f"{reasons or 'the response names no failure'}")
    return sent
