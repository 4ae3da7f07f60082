"""Thin io-queue Celery tasks delivering signed reports; the work is ``worklist.delivery.deliver_signed``.

They share the pipeline's base task (workers/tasks.py): late acknowledgement, re-queued when a worker dies,
transient errors retried with backoff up to ``task_max_retries``, then a dead letter in the index (re-played
with ``raddraft retry``); the worklist row of the delivery becomes ``dead`` too. A worker knows these tasks once
this module is imported: the Celery app's ``include`` list names it.
"""

from __future__ import annotations

import threading
from typing import Any

from billiard.einfo import ExceptionInfo

from workers.celery_app import app, current_settings
from workers.delivery import DICOM, HL7, TransientDeliveryError
from workers.tasks import PipelineTask
from worklist.delivery import (
    DELIVER_SIGNED_DICOM_TASK,
    DELIVER_SIGNED_HL7_TASK,
    SignedTarget,
    deliver_signed,
    mark_dead,
)
from worklist.storage import Store

_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def _store() -> Store:
    """One store per database per worker process (opening one creates the schema: not once per task)."""
    settings = current_settings()
    key = settings.database_url or str(settings.home)
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store.from_settings(settings)
        return _stores[key]


class SignedDeliveryTask(PipelineTask):
    kind = ""

    def run_delivery(self, *args: Any) -> bool:
        try:
            return deliver_signed(current_settings(), _store(), SignedTarget.from_task_args(self.kind, args))
        except TransientDeliveryError as exc:
            self.retry_transient(exc)

    def on_failure(self, exc: Exception, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: ExceptionInfo) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)
        mark_dead(_store(), SignedTarget.from_task_args(self.kind, args), f"{type(exc).__name__}: {exc}")


class DicomDeliveryTask(SignedDeliveryTask):
    kind = DICOM


class HL7DeliveryTask(SignedDeliveryTask):
    kind = HL7


@app.task(name=DELIVER_SIGNED_DICOM_TASK, base=DicomDeliveryTask, bind=True)
def deliver_signed_dicom(self: DicomDeliveryTask, study_uid: str, episode_id: int, version: int,
                         destination: str) -> bool:
    """C-STORE the final SR, narrative SR and GSPS of one signed version to one destination."""
    return self.run_delivery(study_uid, episode_id, version, destination)


@app.task(name=DELIVER_SIGNED_HL7_TASK, base=HL7DeliveryTask, bind=True)
def deliver_signed_hl7(self: HL7DeliveryTask, study_uid: str, episode_id: int, version: int,
                       destination: str) -> bool:
    """Send the final ORU (F, or C for an amendment) of one signed version to one MLLP destination."""
    return self.run_delivery(study_uid, episode_id, version, destination)
