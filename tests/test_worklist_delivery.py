"""Signed reports delivered like the drafts: pending rows + io tasks with IDs only, then the final set to a real
Orthanc and the final ORU to a real MLLP listener (F, then C for an amendment), on both database backends."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
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
from state.store import DeliveryKey, StateStore
from workers import deadletter, delivery
from workers.celery_app import DELIVER_TASK, WORKLIST_DELIVERY_OUTCOME_TASK
from workers.delivery import PermanentDeliveryError, TransientDeliveryError, key_of_args
from worklist import auth
from worklist.bridge import Bridge
from worklist.delivery import SignedDeliveryQueue, audit_outcome, signed_deliveries
from worklist.service import WorklistService
from worklist.storage import Decision, Store, StudyState
from worklist.storage import signed_deliveries as old_table

NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)


class Broker:
    """Records what is published; ``down`` makes it refuse like a dead broker. A delivery's outcome is run at once
    on *store* (what the worklist's ``worklist.delivery_outcome`` task does: the audit line)."""

    def __init__(self, store: Store | None = None) -> None:
        self.published: list[tuple[str, list[object], str]] = []
        self.outcomes: list[list[object]] = []
        self.down = False
        self.store = store

    def __call__(self, task_name: str, args: list[object], task_id: str) -> None:
        if self.down:
            raise BrokerUnavailableError(f"broker did not accept {task_id}: connection refused")
        if task_name == WORKLIST_DELIVERY_OUTCOME_TASK:
            self.outcomes.append(args)
            if self.store is not None:
                audit_outcome(self.store, key_of_args(args[:5]), DeliveryState(args[5]), str(args[6]))
            return
        self.published.append((task_name, args, task_id))


def _run(settings, broker, args) -> bool:
    """What the io worker's ``raddraft.deliver`` does with *args*."""
    index = StateStore(settings.index_path)
    try:
        return delivery.run(settings, index, key_of_args(args), broker)
    finally:
        index.close()


def _rows(settings, study_uid, output_set=None):
    index = StateStore(settings.index_path)
    try:
        return index.deliveries(study_uid, 1, output_set)
    finally:
        index.close()


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
    queue = SignedDeliveryQueue(settings, store, broker, clock=lambda: 1000.0)
    bridge.on_sign(queue)
    try:
        broker.down = True
        report, errors = bridge.sign(entry, radiologist)
        uid = draft.phantom.study_uid
        assert errors == ["BrokerUnavailableError: 2 of 2 delivery(ies) stay pending until the broker is back: "
                          f"broker did not accept deliver-signed-dicom-{uid}-1-v1-PACS@127.0.0.1:104: connection "
                          "refused"]
        assert store.get_study(entry).state is StudyState.SIGNED  # the signature stands
        rows = _rows(settings, uid, "signed:1")  # in the state store, beside the draft's (none configured here)
        assert [(r.kind, r.destination, r.state) for r in rows] == [
            ("dicom", "PACS@127.0.0.1:104", DeliveryState.PENDING), ("hl7", "127.0.0.1:2575", DeliveryState.PENDING)]
        assert "delivery-handoff-failed" in [e.action for e in store.audit_entries(entry)]

        broker.down = False
        assert queue.republish_pending() == 2  # what `raddraft serve` does at start-up
        assert broker.published == [
            (DELIVER_TASK, [uid, 1, "signed:1", "dicom", "PACS@127.0.0.1:104"],
             f"deliver-signed-dicom-{uid}-1-v1-PACS@127.0.0.1:104"),
            (DELIVER_TASK, [uid, 1, "signed:1", "hl7", "127.0.0.1:2575"],
             f"deliver-signed-hl7-{uid}-1-v1-127.0.0.1:2575"),
        ]
        assert report.version == 1
        queue(report)  # a repeated callback creates no second row
        assert len(_rows(settings, uid)) == 2
        assert {v: len(rows) for v, rows in signed_deliveries(settings, uid, 1).items()} == {1: 2}  # the study page
    finally:
        store.close()


def _deliveries(kind: str, outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("raddraft_deliveries_total", {"kind": kind, "outcome": outcome}) or 0.0


def test_final_set_reaches_orthanc_and_the_oru_the_listener_f_then_c(tmp_path, database_url, orthanc):
    with MLLPListener() as listener:
        settings, store, bridge, radiologist, draft, entry = _signed_entry(
            tmp_path, database_url, dicom_destinations=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            hl7_destinations=f"127.0.0.1:{listener.port}")
        broker = Broker(store)
        bridge.on_sign(SignedDeliveryQueue(settings, store, broker))
        try:
            first, errors = bridge.sign(entry, radiologist)
            assert errors == [] and len(broker.published) == 2
            delivered = {kind: _deliveries(kind, "ok") for kind in ("dicom", "hl7")}
            for task_name, args, _ in broker.published:  # what the io worker runs for each task
                assert task_name == DELIVER_TASK and _run(settings, broker, args)
            assert {kind: _deliveries(kind, "ok") - delivered[kind] for kind in delivered} == {"dicom": 1, "hl7": 1}
            final_uids = {e.sop_instance_uid for e in first.files if e.kind in ("sr", "narrative", "gsps")}
            sr_uid = next(e.sop_instance_uid for e in first.files if e.kind == "sr")
            assert final_uids <= orthanc.sop_instance_uids()
            sr = orthanc_instance(orthanc, sr_uid)
            assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL"
            assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Curie^Marie"
            (message,) = listener.wait_for_messages(1)
            assert str(message.segment("OBR")[25]) == "F"
            uid = draft.phantom.study_uid
            assert [r.state for r in _rows(settings, uid, "signed:1")] == [DeliveryState.DONE] * 2
            assert not _run(settings, broker, broker.published[0][1])  # a duplicate task sends nothing

            store.set_state(entry, StudyState.IN_REVIEW, NOW, expect=[StudyState.SIGNED])  # "Amend"
            store.save_draft_text(entry, "Amended findings.", "Amended impression.", NOW)
            second, _ = bridge.sign(entry, radiologist)
            for _, args, _ in broker.published[2:]:
                assert args[2] == "signed:2" and _run(settings, broker, args)  # from amendment_2/
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
    broker = Broker(store)
    bridge.on_sign(SignedDeliveryQueue(settings, store, broker))
    try:
        bridge.sign(entry, radiologist)
        ((task_name, args, task_id),) = broker.published
        failed = _deliveries("hl7", "failed")
        with pytest.raises(TransientDeliveryError, match=f"HL7 destination 127.0.0.1:{port}"):
            _run(settings, broker, args)
        assert _deliveries("hl7", "failed") == failed + 1  # raddraft_deliveries_total on /metrics
        uid = draft.phantom.study_uid
        (row,) = _rows(settings, uid)
        assert row.state is DeliveryState.PENDING and row.attempts == 1 and str(port) in row.last_error
        # the task's last retry: its dead letter marks the row dead and the worklist audits it
        letter = deadletter.record(settings, task_name, task_id, args, retries=5, publish=broker,
                                   error="TransientDeliveryError: gave up after 5 retries")
        (row,) = _rows(settings, uid)
        assert row.state is DeliveryState.DEAD and row.last_error.endswith("gave up after 5 retries")
        assert row.attempts == 1  # the dead letter ends the attempt already counted
        assert "delivery-failed-hl7" in [e.action for e in store.audit_entries(entry)]
        assert str(draft.phantom.datasets[0].PatientName) not in row.last_error
        replayed = deadletter.replay(settings, [letter], broker)  # `raddraft retry`
        assert [r.task for r in replayed] == [DELIVER_TASK] and broker.published[-1][1] == args
        (row,) = _rows(settings, uid)
        assert row.state is DeliveryState.PENDING
    finally:
        store.close()


@pytest.mark.parametrize(("task_name", "old_args", "output_set", "kind"), [
    ("raddraft.deliver_signed_hl7", [1, "127.0.0.1:2575"], "signed:1", "hl7"),
    ("raddraft.deliver_signed_dicom", [1, "PACS@127.0.0.1:104"], "signed:1", "dicom"),
    ("raddraft.deliver_dicom", ["PACS@127.0.0.1:104"], "draft", "dicom"),
    ("raddraft.deliver_hl7", ["127.0.0.1:2575"], "draft", "hl7"),
])
def test_a_dead_letter_of_a_delivery_task_name_that_was_replaced_replays_as_the_one_task(
        tmp_path, task_name, old_args, output_set, kind):
    settings = settings_for(tmp_path, None)
    destination = old_args[-1]
    index = StateStore(settings.index_path)
    try:
        index.add_deliveries("1.2.3", 1, [(kind, destination)], 1.0, output_set)
    finally:
        index.close()
    args = ["1.2.3", 1, *old_args]
    letter = deadletter.record(settings, task_name, "old-id", args, error="refused", retries=0, publish=Broker())
    assert [r.state for r in _rows(settings, "1.2.3")] == [DeliveryState.DEAD]
    broker = Broker()
    (replayed,) = deadletter.replay(settings, [letter], broker)
    assert broker.published == [(DELIVER_TASK, ["1.2.3", 1, output_set, kind, destination],
                                 f"old-id~replay{letter}")]
    assert replayed.task == DELIVER_TASK and [r.state for r in _rows(settings, "1.2.3")] == [DeliveryState.PENDING]


def test_a_delivery_of_an_unknown_version_or_kind_is_permanent(tmp_path, database_url):
    settings, store, _, _, draft, _ = _signed_entry(tmp_path, database_url)
    try:
        with pytest.raises(PermanentDeliveryError, match=r"is not in the index"):
            _run(settings, Broker(), [draft.phantom.study_uid, 1, "signed:3", "dicom", "PACS@127.0.0.1:104"])
        with pytest.raises(PermanentDeliveryError, match="must be 'dicom', 'dicomweb' or 'hl7'"):
            key_of_args(["1.2.3", 1, "signed:1", "fax", "x"])
        with pytest.raises(PermanentDeliveryError, match="must be 'draft' or 'signed:<version>'"):
            key_of_args(["1.2.3", 1, "final", "hl7", "x"])
    finally:
        store.close()


def test_the_service_moves_old_rows_and_publishes_pending_deliveries_again_at_start(tmp_path, database_url):
    """Signed deliveries kept in the worklist database before the state store had them (worklist_deliveries, on
    SQLite or PostgreSQL) are copied there at start, once; the pending ones are published again."""
    settings, store, bridge, radiologist, draft, entry = _signed_entry(
        tmp_path, database_url, hl7_destinations="127.0.0.1:2575", http_port=0)
    bridge.sign(entry, radiologist)  # no callback: nothing in the state store, as before the move
    with store.engine.begin() as conn:
        conn.execute(insert(old_table), [
            {"study_id": entry, "version": 1, "kind": "hl7", "destination": "127.0.0.1:2575", "state": "pending",
             "attempts": 2, "last_error": "refused", "created_at": NOW, "done_at": None},
            {"study_id": entry, "version": 1, "kind": "dicom", "destination": "PACS@127.0.0.1:104", "state": "done",
             "attempts": 1, "last_error": "", "created_at": NOW, "done_at": NOW + timedelta(minutes=1)}])
    store.close()
    broker = Broker()
    uid = draft.phantom.study_uid
    # a second start copies nothing again and keeps what the state store has (the delivery done since)
    for hl7_row in [(DeliveryState.PENDING, 2, "refused"), (DeliveryState.DONE, 3, None)]:
        with WorklistService(settings, publish=broker) as service:  # what `raddraft serve` starts
            rows = _rows(settings, uid, "signed:1")
            assert [(r.kind, r.state, r.attempts, r.last_error) for r in rows] == [
                ("dicom", DeliveryState.DONE, 1, None), ("hl7", *hl7_row)]
            assert rows[0].done_at == (NOW + timedelta(minutes=1)).timestamp()
            client = Client(service.server)
            response, data, _ = client.request("GET", "/healthz")
            health = json.loads(data)  # without an admin session: ok / not ok, no paths or free space
            assert (response.status, health) in ((200, {"status": "ok"}), (503, {"status": "not ok"}))
            response, _, _ = client.request("GET", "/")
            assert response.status == 303  # the worklist, behind its login
        index = StateStore(settings.index_path)
        try:
            index.finish_delivery(DeliveryKey(uid, 1, "hl7", "127.0.0.1:2575", "signed:1"), DeliveryState.DONE, 5.0)
        finally:
            index.close()
    assert broker.published == [(DELIVER_TASK, [uid, 1, "signed:1", "hl7", "127.0.0.1:2575"],
                                 f"deliver-signed-hl7-{uid}-1-v1-127.0.0.1:2575")]
