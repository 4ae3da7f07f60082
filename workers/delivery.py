"""Deliver one output set of one study episode to one destination: DICOM with C-STORE, HL7 with MLLP.

One runner for every output set: the draft the report stage wrote (``draft``: the episode's outbox folder) and a
version the radiologists signed on the worklist (``signed:<n>``: its final set, in the episode's folder for the
first signature and in ``amendment_<n>/`` for an amendment, core/layout.py ``version_dir``). A delivery is one row
of the state store's ``deliveries`` (:class:`state.store.DeliveryKey`) and one io task, ``raddraft.deliver``, whose
arguments are IDs only: :func:`task_args` ``[study UID, episode id, output set, kind, destination]``.

The files are read from the outbox exactly as the report stage (or signing) wrote them, so a retried delivery
resends the same SR (same UIDs) and the same ORU (same MSH-10), never a different one. A DICOM delivery is done
only when every object got a Success status; an HL7 delivery only when the peer answered AA (or CA).

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

from core import metrics
from core.layout import episode_dir, version_dir
from core.settings import Destination, HL7Destination, Settings
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


KINDS = (DICOM, HL7)
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
        raise PermanentDeliveryError(f"delivery kind {kind!r} must be {DICOM!r} or {HL7!r}")
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
        if not entries or any(entry.delivery == kind for entry in entries):
            return None
        problems = read_problems(folder, signed=output_set is OutputSet.FINAL)
    except (OSError, ValueError):
        return None
    names = ("sr", "narrative", "gsps") if kind == DICOM else (HL7,)
    reason = "; ".join(f"{p.kind} {p.state}: {p.reason}" for p in problems if p.kind in names)
    return reason or f"no {'DICOM output' if kind == DICOM else 'ORU'} was built"


def send(settings: Settings, key: DeliveryKey, entries: Sequence[OutboxEntry] | None = None) -> str:
    """Send *key*'s output set to its destination (*entries*: its index, read here when not given); what was done,
    for the log and the audit. Raises :class:`DeliveryError` (transient or permanent)."""
    folder, output_set = folder_of(settings, key)
    if key.kind == DICOM:
        summary = send_dicom_folder(settings, folder, Destination.parse(key.destination), output_set, entries)
        detail = f"{len(summary.results)} object(s) stored"
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
