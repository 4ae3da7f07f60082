"""Signed reports to the PACS and the RIS through the pipeline's one delivery task, like the drafts.

``SignedDeliveryQueue(settings, store)`` is the ``Bridge.on_sign`` callback. For every configured destination
(``dicom_destinations``, ``dicomweb_destinations``, ``hl7_destinations``) it records a pending row of the signed
version in the state store's ``deliveries`` (output set ``signed:<version>``, beside the draft's rows), then
publishes the pipeline's delivery task ``raddraft.deliver`` (workers/delivery.py: the runner of every delivery)
with IDs only: ``[study UID, episode id, "signed:<version>", kind, destination]``. The runner sends the version's
final set exactly as signing wrote it (an amendment's from its ``amendment_<n>/`` folder), so a retry resends the
same UIDs and the same MSH-10; dead letters and ``raddraft retry`` are the drafts'. A broker that is down leaves
the rows pending; ``republish_pending`` at start-up publishes them again.

The runner reports how each signed delivery ended with ``worklist.delivery_outcome`` (worklist/tasks.py), which
writes the audit line (``delivered-<kind>``, ``skipped-<kind>``, ``delivery-failed-<kind>``);
:func:`audit_outcome` is its work. The study page reads the rows from the state store
(:func:`signed_deliveries`).

Before the state store kept them, signed deliveries had their own table in the worklist database,
``worklist_deliveries``: :func:`import_worklist_deliveries` copies its rows (every state: the study page shows the
done ones too) into the state store at ``WorklistService.start()``. It is idempotent (a row already there is never
overwritten), so the old table is read at each start and left as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings
from core.states import DRAFT_OUTPUT, DeliveryState, signed_output, signed_version
from dicom_node.episodes import BrokerUnavailableError
from state.store import Delivery, DeliveryKey, StateStore
from workers.celery_app import DELIVER_TASK
from workers.delivery import DICOM, DICOMWEB, HL7, MAX_ERROR_CHARS, task_args, task_id
from worklist.signing import SignedReport
from worklist.storage import Store

logger = logging.getLogger(__name__)

AUDIT_USER = "pipeline"
# the audit action of a signed delivery's end, by the state the runner reported
AUDIT_ACTIONS = {DeliveryState.DONE: "delivered-{kind}", DeliveryState.SKIPPED: "skipped-{kind}",
                 DeliveryState.DEAD: "delivery-failed-{kind}"}

Publisher = Callable[[str, list[Any], str], None]  # (task name, args, task id); raises BrokerUnavailableError


def delivery_targets(settings: Settings) -> list[tuple[str, str]]:
    """``(kind, destination)`` of every configured destination."""
    return ([(DICOM, str(d)) for d in settings.dicom_destinations]
            + [(DICOMWEB, url) for url in settings.dicomweb_destinations]
            + [(HL7, str(d)) for d in settings.hl7_destinations])


def celery_publish(task_name: str, args: list[Any], task_id: str) -> None:
    """``workers.celery_app.publish``: the io queue of the broker the app is configured with."""
    from workers.celery_app import publish  # noqa: PLC0415 (Celery only where something is published)

    publish(task_name, args, task_id)


class SignedDeliveryQueue:
    """The sign callback: pending rows of the signed version in the state store, then one io task each."""

    def __init__(self, settings: Settings, store: Store, publish: Publisher = celery_publish,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.publish = publish
        self.clock = clock

    def __call__(self, report: SignedReport) -> None:
        """Raises ``BrokerUnavailableError`` (after trying every row) when the broker refused some of them."""
        index = StateStore(self.settings.index_path)
        try:
            rows = index.add_deliveries(report.study_uid, report.episode_id, delivery_targets(self.settings),
                                        self.clock(), signed_output(report.version))
        finally:
            index.close()
        if not rows:
            logger.info("worklist entry %d version %d: no destination configured; the final set stays in %s",
                        report.study_id, report.version, report.output_dir)
        self._publish([row.key for row in rows if row.state is DeliveryState.PENDING])

    def republish_pending(self) -> int:
        """Publish every pending delivery of a signed version again (after a restart: its message may be lost);
        returns how many."""
        if not self.settings.index_path.is_file():
            return 0
        index = StateStore(self.settings.index_path)
        try:
            pending = [row.key for row in index.deliveries(state=DeliveryState.PENDING)
                       if row.output_set != DRAFT_OUTPUT]
        finally:
            index.close()
        self._publish(pending)
        if pending:
            logger.info("published %d pending delivery(ies) of signed reports again", len(pending))
        return len(pending)

    def _publish(self, keys: list[DeliveryKey]) -> None:
        refused = []
        for key in keys:
            try:
                self.publish(DELIVER_TASK, task_args(key), task_id(key))
            except BrokerUnavailableError as exc:
                refused.append(str(exc))
        if refused:
            raise BrokerUnavailableError(f"{len(refused)} of {len(keys)} delivery(ies) stay pending until the "
                                         f"broker is back: {refused[0]}")


def audit_outcome(store: Store, key: DeliveryKey, state: DeliveryState, detail: str, *,
                  clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> bool:
    """Write the audit line of a signed delivery that ended in *state* (what ``worklist.delivery_outcome`` does);
    False when the study is not on the worklist or *key* is a draft's."""
    version = signed_version(key.output_set)
    study = store.find_study(key.study_instance_uid, key.episode_id)
    if version is None or study is None:
        return False
    action = AUDIT_ACTIONS[state].format(kind=key.kind)
    store.audit(AUDIT_USER, action, study.id, f"version {version} to {key.destination}: {detail}"[:MAX_ERROR_CHARS],
                clock())
    logger.info("worklist entry %d version %d to %s: %s", study.id, version, key.destination, action)
    return True


def signed_deliveries(settings: Settings, study_uid: str, episode_id: int) -> dict[int, list[Delivery]]:
    """The delivery rows of each signed version of one episode, from the state store ({} when there is none)."""
    if not settings.index_path.is_file():
        return {}
    index = StateStore(settings.index_path)
    try:
        rows = index.deliveries(study_uid, episode_id)
    finally:
        index.close()
    by_version: dict[int, list[Delivery]] = {}
    for row in rows:
        version = signed_version(row.output_set)
        if version is not None:
            by_version.setdefault(version, []).append(row)
    return by_version


def import_worklist_deliveries(settings: Settings, store: Store) -> int:
    """Copy the rows of the worklist database's old ``worklist_deliveries`` into the state store (idempotent: a row
    already there is kept as it is); returns how many were new."""
    old = store.legacy_deliveries()
    if not old:
        return 0
    rows = []
    for row in old:
        study = store.get_study(row["study_id"])
        done_at = row["done_at"]
        rows.append(Delivery(study.study_uid, study.episode_id, row["kind"], row["destination"],
                             DeliveryState(row["state"]), row["attempts"], row["created_at"].timestamp(),
                             done_at.timestamp() if done_at is not None else None, row["last_error"] or None,
                             signed_output(row["version"])))
    index = StateStore(settings.index_path)
    try:
        added = index.import_deliveries(rows)
    finally:
        index.close()
    if added:
        logger.info("%d delivery(ies) of signed reports moved from worklist_deliveries to the state store", added)
    return added
