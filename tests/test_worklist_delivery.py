"""Signed reports delivered like the drafts: pending rows + io tasks with IDs only, then the final set to a real
Orthanc and the final ORU to a real MLLP listener (F, then C for an amendment), on both database backends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from worklist_helpers import (  # noqa: F401 - fixture
    Client,
    database_url_fixture,
    orthanc_instance,
    settings_for,
    write_draft,
)

from core import metrics
from core.states import DeliveryState
from dicom_node.episodes import BrokerUnavailableError
from peers import free_port
from peers.mllp import MLLPListener
from workers.delivery import PermanentDeliveryError, TransientDeliveryError
from worklist import auth
from worklist.bridge import Bridge
from worklist.delivery import (
    DELIVER_SIGNED_DICOM_TASK,
    DELIVER_SIGNED_HL7_TASK,
    SignedDeliveryQueue,
    SignedTarget,
    deliver_signed,
    mark_dead,
)
from worklist.service import WorklistService
from worklist.storage import Decision, Store, StudyState

NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)


class Broker:
    """Records what is published; ``down`` makes it refuse like a dead broker."""

    def __init__(self) -> None:
        self.published: list[tuple[str, list[object], str]] = []
        self.down = False

    def __call__(self, task_name: str, args: list[object], task_id: str) -> None:
        if self.down:
            raise BrokerUnavailableError(f"broker did not accept {task_id}: connection refused")
        self.published.append((task_name, args, task_id))


def _signed_entry(tmp_path, database_url, **destinations):
    settings = settings_for(tmp_path, database_url, **destinations)
    store = Store.from_settings(settings)
    clock = iter(NOW + timedelta(minutes=n) for n in range(1000))
    bridge = Bridge(settings, store, clock=lambda: next(clock))
    radiologist = store.add_user("curie", "radiologist", auth.hash_password("radium-226"), full_name="Curie^Marie",
                                 organization="Institut du Radium", now=NOW)
    draft = write_draft(settings)
    entry = bridge.register_draft(draft.manifest_path, draft.result_path)
    for index, decision in enumerate([Decision.ACCEPTED, Decision.REJECTED, Decision.ACCEPTED]):
        store.set_finding_review(entry, index, decision, label="nodule", username="curie", now=NOW)
    return settings, store, bridge, radiologist, draft, entry


def test_signing_records_pending_rows_and_publishes_io_tasks_with_ids_only(tmp_path, database_url):
    settings, store, bridge, radiologist, draft, entry = _signed_entry(
        tmp_path, database_url, dicom_destinations="PACS@127.0.0.1:104", hl7_destinations="127.0.0.1:2575")
    broker = Broker()
    queue = SignedDeliveryQueue(settings, store, broker, clock=lambda: NOW)
    bridge.on_sign(queue)
    try:
        broker.down = True
        report, errors = bridge.sign(entry, radiologist)
        uid = draft.phantom.study_uid
        assert errors == ["BrokerUnavailableError: 2 of 2 delivery(ies) stay pending until the broker is back: "
                          f"broker did not accept deliver-signed-dicom-{uid}-1-v1-PACS@127.0.0.1:104: connection "
                          "refused"]
        assert store.get_study(entry).state is StudyState.SIGNED  # the signature stands
        rows = store.deliveries(entry, 1)
        assert [(r.kind, r.destination, r.state) for r in rows] == [
            ("dicom", "PACS@127.0.0.1:104", DeliveryState.PENDING), ("hl7", "127.0.0.1:2575", DeliveryState.PENDING)]
        assert "delivery-handoff-failed" in [e.action for e in store.audit_entries(entry)]

        broker.down = False
        assert queue.republish_pending() == 2  # what `raddraft serve` does at start-up
        assert broker.published == [
            (DELIVER_SIGNED_DICOM_TASK, [uid, 1, 1, "PACS@127.0.0.1:104"],
             f"deliver-signed-dicom-{uid}-1-v1-PACS@127.0.0.1:104"),
            (DELIVER_SIGNED_HL7_TASK, [uid, 1, 1, "127.0.0.1:2575"], f"deliver-signed-hl7-{uid}-1-v1-127.0.0.1:2575"),
        ]
        assert report.version == 1
        queue(report)  # a repeated callback creates no second row
        assert len(store.deliveries(entry)) == 2
    finally:
        store.close()


def _deliveries(kind: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("raddraft_deliveries_total", {"kind": kind, "outcome": outcome}) or 0.0


def test_final_set_reaches_orthanc_and_the_oru_the_listener_f_then_c(tmp_path, database_url, orthanc):
    with MLLPListener() as listener:
        settings, store, bridge, radiologist, _, entry = _signed_entry(
            tmp_path, database_url, dicom_destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            hl7_destinations=f"127.0.0.1:{listener.port}")
        broker = Broker()
        bridge.on_sign(SignedDeliveryQueue(settings, store, broker))
        try:
            first, errors = bridge.sign(entry, radiologist)
            assert errors == [] and len(broker.published) == 2
            delivered = {kind: _deliveries(kind, "ok") for kind in ("dicom", "hl7")}
            for task_name, args, _ in broker.published:  # what the io worker runs for each task
                kind = "dicom" if task_name == DELIVER_SIGNED_DICOM_TASK else "hl7"
                assert deliver_signed(settings, store, SignedTarget.from_task_args(kind, args))
            assert {kind: _deliveries(kind, "ok") - delivered[kind] for kind in delivered} == {"dicom": 1, "hl7": 1}
            final_uids = {e.sop_instance_uid for e in first.files if e.kind in ("sr", "narrative", "gsps")}
            sr_uid = next(e.sop_instance_uid for e in first.files if e.kind == "sr")
            assert final_uids <= orthanc.sop_instance_uids()
            sr = orthanc_instance(orthanc, sr_uid)
            assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
            assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
            (message,) = listener.wait_for_messages(1)
            assert str(message.segment("OBR")[25]) == "F"
            assert [r.state for r in store.deliveries(entry, 1)] == [DeliveryState.DONE] * 2
            dicom_target = SignedTarget.from_task_args("dicom", broker.published[0][1])
            assert not deliver_signed(settings, store, dicom_target)  # a duplicate task sends nothing

            store.set_state(entry, StudyState.IN_REVIEW, NOW, expect=[StudyState.SIGNED])  # "Amend"
            store.save_draft_text(entry, "Amended findings.", "Amended impression.", NOW)
            second, _ = bridge.sign(entry, radiologist)
            for task_name, args, _ in broker.published[2:]:
                kind = "dicom" if task_name == DELIVER_SIGNED_DICOM_TASK else "hl7"
                assert deliver_signed(settings, store, SignedTarget.from_task_args(kind, args))
            amended_uid = next(e.sop_instance_uid for e in second.files if e.kind == "sr")
            amended = orthanc_instance(orthanc, amended_uid)
            predecessor = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
            assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_uid
            assert orthanc_instance(orthanc, sr_uid) is not None  # the first signed SR is still there
            _, correction = listener.wait_for_messages(2)
            assert str(correction.segment("OBR")[25]) == "C"
            assert all(str(s[11]) == "C" for s in correction.segments("OBX"))
            actions = [e.action for e in store.audit_entries(entry)]
            assert actions.count("delivered-dicom") == 2 and actions.count("delivered-hl7") == 2
        finally:
            store.close()


def test_an_unreachable_destination_stays_pending_then_dies_with_its_error(tmp_path, database_url):
    port = free_port()  # nothing listens there
    settings, store, bridge, radiologist, draft, entry = _signed_entry(
        tmp_path, database_url, hl7_destinations=f"127.0.0.1:{port}", network_timeout_s=2.0)
    broker = Broker()
    bridge.on_sign(SignedDeliveryQueue(settings, store, broker))
    try:
        bridge.sign(entry, radiologist)
        ((_, args, _),) = broker.published
        target = SignedTarget.from_task_args("hl7", args)
        failed = _deliveries("hl7", "failed")
        with pytest.raises(TransientDeliveryError, match=f"HL7 destination 127.0.0.1:{port}"):
            deliver_signed(settings, store, target)
        assert _deliveries("hl7", "failed") == failed + 1  # raddraft_deliveries_total on /metrics
        (row,) = store.deliveries(entry)
        assert row.state is DeliveryState.PENDING and row.attempts == 1 and str(port) in row.last_error
        mark_dead(store, target, "TransientDeliveryError: gave up after 5 retries")  # the task's on_failure
        (row,) = store.deliveries(entry)
        assert row.state is DeliveryState.DEAD and row.last_error.endswith("gave up after 5 retries")
        assert "delivery-failed-hl7" in [e.action for e in store.audit_entries(entry)]
        assert str(draft.phantom.datasets[0].PatientName) not in row.last_error
    finally:
        store.close()


def test_a_finished_delivery_and_its_audit_entry_are_one_transaction(tmp_path, database_url):
    """A reader that sees the row done sees the entry (the browser test once saw DONE before 'delivered-hl7'); an
    audit entry the database refuses (NOT NULL username) leaves the row pending."""
    settings, store, bridge, radiologist, _, entry = _signed_entry(
        tmp_path, database_url, hl7_destinations="127.0.0.1:2575")
    bridge.on_sign(SignedDeliveryQueue(settings, store, Broker()))
    try:
        bridge.sign(entry, radiologist)
        (row,) = store.deliveries(entry)
        before = len(store.audit_entries(entry))
        with pytest.raises(IntegrityError):
            store.finish_delivery(row, DeliveryState.DONE, NOW, audit=(None, "delivered-hl7", "refused"))
        (row,) = store.deliveries(entry)
        assert row.state is DeliveryState.PENDING and row.attempts == 0 and len(store.audit_entries(entry)) == before
        store.finish_delivery(row, DeliveryState.DONE, NOW, audit=("raddraft", "delivered-hl7", "version 1 to x"))
        (row,) = store.deliveries(entry)
        latest = store.audit_entries(entry)[0]
        assert row.state is DeliveryState.DONE and row.attempts == 1
        assert (latest.action, latest.study_id, latest.detail) == ("delivered-hl7", entry, "version 1 to x")
    finally:
        store.close()


def test_a_delivery_of_an_unknown_version_is_permanent(tmp_path, database_url):
    settings, store, _, _, draft, _ = _signed_entry(tmp_path, database_url)
    try:
        target = SignedTarget("dicom", draft.phantom.study_uid, 1, 3, "PACS@127.0.0.1:104")
        with pytest.raises(PermanentDeliveryError, match=r"has no signed version 3 to deliver to PACS@127\.0\.0\.1"):
            deliver_signed(settings, store, target)
        with pytest.raises(PermanentDeliveryError, match="is not on the worklist"):
            deliver_signed(settings, store, SignedTarget("hl7", "1.2.3", 1, 1, "127.0.0.1:1"))
    finally:
        store.close()


def test_the_service_publishes_pending_deliveries_again_at_start_and_serves_health(tmp_path, database_url):
    settings, store, bridge, radiologist, draft, entry = _signed_entry(
        tmp_path, database_url, hl7_destinations="127.0.0.1:2575", http_port=0)
    broker = Broker()
    broker.down = True
    bridge.on_sign(SignedDeliveryQueue(settings, store, broker))
    bridge.sign(entry, radiologist)  # the broker refused: the row stays pending
    store.close()
    broker.down = False
    with WorklistService(settings, publish=broker) as service:  # what `raddraft serve` starts
        uid = draft.phantom.study_uid
        assert broker.published == [(DELIVER_SIGNED_HL7_TASK, [uid, 1, 1, "127.0.0.1:2575"],
                                      f"deliver-signed-hl7-{uid}-1-v1-127.0.0.1:2575")]
        client = Client(service.server)
        response, data, _ = client.request("GET", "/healthz")
        health = json.loads(data)  # without an admin session: ok / not ok, no paths or free space
        assert (response.status, health) in ((200, {"status": "ok"}), (503, {"status": "not ok"}))
        response, _, _ = client.request("GET", "/")
        assert response.status == 303  # the worklist, behind its login
