"""Deliver one output set of one study episode to one destination: DICOM with C-STORE, HL7 with MLLP.

The files are read from the outbox exactly as the report stage wrote them, so a retried delivery resends the
same SR (same UIDs) and the same ORU (same MSH-10), never a different one. A DICOM delivery is done only when
every object got a Success status; an HL7 delivery only when the peer answered AA (or CA).

Errors are sorted for the retry policy: :class:`TransientDeliveryError` (the peer is down, busy, timed out or
closed the connection: a later retry may succeed) and :class:`PermanentDeliveryError` (rejected, refused, or
the outputs are missing: retrying cannot help, it goes to the dead-letter table at once).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

from core.layout import episode_dir
from core.settings import Destination, HL7Destination, Settings
from dicom_node.scu import (
    AssociationFailedError,
    AssociationRejectedError,
    Outcome,
    PeerUnreachableError,
    SendSummary,
    send_instances,
)
from reporting.mllp import Ack, MLLPError, deliver
from reporting.outputs import OutboxEntry, read_entries

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


def dicom_outputs(folder: Path, output_set: OutputSet = OutputSet.DRAFT) -> list[Path]:
    """The DICOM files of one output set in *folder* as its outbox index lists them (reporting/outputs.py): SR,
    narrative SR, then the GSPS in order, those the report stage could build (it records the others). A file
    the index does not list (a GSPS left by an earlier run that built more) is never sent.

    Raises :class:`PermanentDeliveryError` when there is none (the report stage has not run, or built none), or
    the index is unreadable.
    """
    files = [entry.path for entry in _entries(folder, output_set) if entry.delivery == DICOM]
    if not files:
        raise PermanentDeliveryError(f"outbox folder {folder} has no DICOM output of the {output_set.value} set: "
                                     "the report stage has not written it, or could build none")
    return files


def hl7_output(folder: Path, output_set: OutputSet = OutputSet.DRAFT) -> bytes:
    paths = [entry.path for entry in _entries(folder, output_set) if entry.delivery == HL7]
    if not paths:
        raise PermanentDeliveryError(f"outbox folder {folder} has no ORU: the report stage has not written the "
                                     f"{output_set.value} set, or could not build it")
    return paths[0].read_bytes()


def _entries(folder: Path, output_set: OutputSet) -> list[OutboxEntry]:
    try:
        return read_entries(folder, signed=output_set is OutputSet.FINAL)
    except (OSError, ValueError) as exc:  # OutboxIndexError is a ValueError; a torn index is a JSON ValueError
        raise PermanentDeliveryError(f"outbox folder {folder}: its index cannot be read: {exc}") from exc


def deliver_dicom(settings: Settings, study_uid: str, episode_id: int, destination: Destination,
                  output_set: OutputSet = OutputSet.DRAFT) -> SendSummary:
    """C-STORE the episode's DICOM outputs to *destination*; return the summary when every one succeeded."""
    summary = send_dicom_folder(settings, episode_dir(settings.outbox_dir, study_uid, episode_id), destination,
                                output_set)
    log.info("delivered %d DICOM object(s) of study %s episode %d to %s", len(summary.results), study_uid,
             episode_id, destination)
    return summary


def send_dicom_folder(settings: Settings, folder: Path, destination: Destination,
                      output_set: OutputSet = OutputSet.DRAFT) -> SendSummary:
    """C-STORE the DICOM outputs of *output_set* in *folder* (an episode's, or an amendment's); the summary when
    every one got a Success status, else a transient (no status, Out of Resources) or permanent error."""
    files = dicom_outputs(folder, output_set)
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


def deliver_hl7(settings: Settings, study_uid: str, episode_id: int, destination: HL7Destination,
                output_set: OutputSet = OutputSet.DRAFT) -> Ack:
    """Send the episode's ORU^R01 to *destination*; return the ACK when it is AA (or CA)."""
    ack = send_hl7_folder(settings, episode_dir(settings.outbox_dir, study_uid, episode_id), destination, output_set)
    log.info("delivered ORU %s of study %s episode %d to %s (%s)", ack.control_id, study_uid, episode_id,
             destination, ack.code)
    return ack


def send_hl7_folder(settings: Settings, folder: Path, destination: HL7Destination,
                    output_set: OutputSet = OutputSet.DRAFT) -> Ack:
    """Send the ORU of *output_set* in *folder* to *destination*; the ACK when it is AA (or CA)."""
    message = hl7_output(folder, output_set)
    try:
        ack = deliver(message, destination, settings)
    except MLLPError as exc:
        kind = TransientDeliveryError if exc.transient else PermanentDeliveryError
        raise kind(f"HL7 destination {destination}: {exc}") from exc
    except OSError as exc:
        raise TransientDeliveryError(f"HL7 destination {destination}: {exc}") from exc
    return ack
