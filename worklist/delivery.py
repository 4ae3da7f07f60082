"""Signed reports to the PACS and the RIS through the pipeline's io queue, like the drafts.

``SignedDeliveryQueue(settings, store)`` is the ``Bridge.on_sign`` callback. For every configured destination
(``dicom_destinations``, ``hl7_destinations``) it records a pending row of the signed version in the worklist
database (``worklist_deliveries``), then publishes one io task (worklist/tasks.py) whose arguments are IDs only:
``[study UID, episode id, version, destination]``, the shape of the draft delivery tasks (so dead letters and
``raddraft retry`` work the same). A broker that is down leaves the rows pending; ``republish_pending`` at
start-up publishes them again.

``deliver_signed`` is the work of one task, a plain function: it sends the version's final set exactly as
signing wrote it (``sr_final.dcm``, ``narrative_final.dcm``, ``gsps_final_<n>.dcm``, ``oru_final.hl7``;
an amendment's from its ``amendment_<n>/`` folder), so a retry resends the same UIDs and the same MSH-10, and
marks the row done. Errors are sorted as in workers/delivery.py: transient (retried with backoff) or permanent
(dead letter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core import metrics
from core.settings import Destination, HL7Destination, Settings
from core.states import DeliveryState
from dicom_node.episodes import BrokerUnavailableError
from reporting.outputs import read_entries, read_problems
from workers.delivery import (
    DICOM,
    HL7,
    OutputSet,
    PermanentDeliveryError,
    TransientDeliveryError,
    send_dicom_folder,
    send_hl7_folder,
)
from worklist.signing import SignedReport
from worklist.storage import SignedDelivery, Store

logger = logging.getLogger(__name__)

DELIVER_SIGNED_DICOM_TASK = "raddraft.deliver_signed_dicom"
DELIVER_SIGNED_HL7_TASK = "raddraft.deliver_signed_hl7"
TASK_OF_KIND = {DICOM: DELIVER_SIGNED_DICOM_TASK, HL7: DELIVER_SIGNED_HL7_TASK}
AUDIT_USER = "pipeline"
MAX_ERROR_CHARS = 500

Publisher = Callable[[str, list[Any], str], None]  # (task name, args, task id); raises BrokerUnavailableError


@dataclass(frozen=True)
class SignedTarget:
    """Which delivery a task does: one signed version of one study episode to one destination."""

    kind: str  # "dicom" or "hl7"
    study_uid: str
    episode_id: int
    version: int
    destination: str

    def task_args(self) -> list[Any]:
        return [self.study_uid, self.episode_id, self.version, self.destination]

    @classmethod
    def from_task_args(cls, kind: str, args: Sequence[Any]) -> SignedTarget:
        study_uid, episode_id, version, destination = args
        return cls(kind, str(study_uid), int(episode_id), int(version), str(destination))

    def task_id(self) -> str:
        """Deterministic: a re-published delivery gets the id of the original."""
        return (f"deliver-signed-{self.kind}-{self.study_uid}-{self.episode_id}-v{self.version}-"
                f"{self.destination}")


def delivery_targets(settings: Settings) -> list[tuple[str, str]]:
    """``(kind, destination)`` of every configured destination."""
    return [(DICOM, str(d)) for d in settings.dicom_destinations] + [(HL7, str(d)) for d in settings.hl7_destinations]


def celery_publish(task_name: str, args: list[Any], task_id: str) -> None:
    """``workers.celery_app.publish``: the io queue of the broker the app is configured with."""
    from workers.celery_app import publish  # noqa: PLC0415 (Celery only where something is published)

    publish(task_name, args, task_id)


class SignedDeliveryQueue:
    """The sign callback: pending rows for the signed version, then one io task per destination."""

    def __init__(self, settings: Settings, store: Store, publish: Publisher = celery_publish,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.store = store
        self.publish = publish
        self.clock = clock

    def __call__(self, report: SignedReport) -> None:
        """Raises ``BrokerUnavailableError`` (after trying every row) when the broker refused some of them."""
        rows = self.store.add_deliveries(report.study_id, report.version, delivery_targets(self.settings),
                                         self.clock())
        if not rows:
            logger.info("worklist entry %d version %d: no destination configured; the final set stays in %s",
                        report.study_id, report.version, report.output_dir)
        self._publish_rows(report.study_uid, report.episode_id,
                           [r for r in rows if r.state is DeliveryState.PENDING])

    def republish_pending(self) -> int:
        """Publish every pending delivery again (after a restart: its message may be lost); returns how many."""
        pending = self.store.deliveries(state=DeliveryState.PENDING)
        by_study: dict[int, list[SignedDelivery]] = {}
        for row in pending:
            by_study.setdefault(row.study_id, []).append(row)
        for study_id, rows in by_study.items():
            study = self.store.get_study(study_id)
            self._publish_rows(study.study_uid, study.episode_id, rows)
        if pending:
            logger.info("published %d pending delivery(ies) of signed reports again", len(pending))
        return len(pending)

    def _publish_rows(self, study_uid: str, episode_id: int, rows: list[SignedDelivery]) -> None:
        refused = []
        for row in rows:
            target = SignedTarget(row.kind, study_uid, episode_id, row.version, row.destination)
            try:
                self.publish(TASK_OF_KIND[row.kind], target.task_args(), target.task_id())
            except BrokerUnavailableError as exc:
                refused.append(str(exc))
        if refused:
            raise BrokerUnavailableError(f"{len(refused)} of {len(rows)} delivery(ies) stay pending until the "
                                         f"broker is back: {refused[0]}")


def deliver_signed(settings: Settings, store: Store, target: SignedTarget, *,
                   clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> bool:
    """Send one signed version to one destination; False when it was already done (a duplicate)."""
    row, folder = _row_and_folder(store, target)
    version, destination = target.version, target.destination
    if row.state is DeliveryState.DONE:
        logger.info("worklist entry %d version %d to %s is already delivered; duplicate ignored", row.study_id,
                    version, destination)
        return False
    if target.kind == HL7 and not any(entry.kind == "hl7" for entry in read_entries(folder, signed=True)):
        reason = "; ".join(f"{p.state}: {p.reason}" for p in read_problems(folder, signed=True) if p.kind == HL7)
        reason = reason or "no final ORU was built"
        store.finish_delivery(row, DeliveryState.SKIPPED, clock(), reason[:MAX_ERROR_CHARS], audit=(
            AUDIT_USER, f"skipped-{target.kind}", f"version {version} to {destination}: {reason}"))
        logger.info("worklist entry %d version %d to %s skipped: no final ORU", row.study_id, version, destination)
        return False
    try:
        if target.kind == DICOM:
            detail = send_final_dicom(settings, folder, Destination.parse(destination))
        else:
            detail = send_final_hl7(settings, folder, HL7Destination.parse(destination))
    except Exception as exc:
        metrics.record_delivery(target.kind, ok=False)
        if isinstance(exc, TransientDeliveryError):
            store.note_delivery_error(row, str(exc)[:MAX_ERROR_CHARS])
        raise
    metrics.record_delivery(target.kind, ok=True)
    now = clock()
    store.finish_delivery(row, DeliveryState.DONE, now, audit=(
        AUDIT_USER, f"delivered-{target.kind}", f"version {version} to {destination}: {detail}"))
    logger.info("worklist entry %d version %d delivered to %s (%s)", row.study_id, version, destination, detail)
    return True


def mark_dead(store: Store, target: SignedTarget, error: str, *,
              clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
    """A delivery that failed for good (its dead letter is in the index): the row and the audit say so."""
    study = store.find_study(target.study_uid, target.episode_id)
    if study is None:
        return
    error = error[:MAX_ERROR_CHARS]
    for row in store.deliveries(study.id, target.version):
        if (row.kind, row.destination) == (target.kind, target.destination):
            now = clock()
            detail = f"version {target.version} to {target.destination}: {error}"
            store.finish_delivery(row, DeliveryState.DEAD, now, error,
                                  audit=(AUDIT_USER, f"delivery-failed-{target.kind}", detail))


def _row_and_folder(store: Store, target: SignedTarget) -> tuple[SignedDelivery, Path]:
    if target.kind not in TASK_OF_KIND:
        raise PermanentDeliveryError(f"delivery kind {target.kind!r} must be {DICOM!r} or {HL7!r}")
    study = store.find_study(target.study_uid, target.episode_id)
    if study is None:
        raise PermanentDeliveryError(f"study {target.study_uid} episode {target.episode_id} is not on the worklist")
    signed = next((v for v in store.versions(study.id) if v.version == target.version), None)
    row = next((r for r in store.deliveries(study.id, target.version)
                if (r.kind, r.destination) == (target.kind, target.destination)), None)
    if signed is None or row is None:
        raise PermanentDeliveryError(f"worklist entry {study.id} has no signed version {target.version} to deliver "
                                     f"to {target.destination}")
    return row, Path(signed.output_dir)


def send_final_dicom(settings: Settings, folder: Path, destination: Destination) -> str:
    """C-STORE the final SR, narrative and GSPS of *folder* (an episode's or an amendment's); done only when every
    one got a Success status."""
    summary = send_dicom_folder(settings, folder, destination, OutputSet.FINAL)
    return f"{len(summary.results)} object(s) stored"


def send_final_hl7(settings: Settings, folder: Path, destination: HL7Destination) -> str:
    """Send the final ORU (OBR-25 F, or C for an amendment) of *folder*; done only on AA (or CA)."""
    ack = send_hl7_folder(settings, folder, destination, OutputSet.FINAL)
    return f"ORU {ack.control_id} {ack.code}"
