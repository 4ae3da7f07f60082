"""Study completeness and hand-off to the queue: one prepare task per episode, outbox retries, restart recovery."""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import pydicom
import pytest
import redis
from node_helpers import free_port, make_ct, node_settings, redis_server, running_node, wait_for
from pydicom.uid import generate_uid

from core.layout import manifest_path
from core.manifest import StudyManifest
from core.states import EpisodeState
from dicom_node.episodes import HandoffDispatcher
from dicom_node.index import Index, InstanceRecord
from dicom_node.statuses import StoreStatus
from raddraft.commands import status
from state.store import StateStore
from workers.celery_app import IO_QUEUE, PREPARE_TASK, configure, publish_prepare
from workers.inprocess import InProcessWorker
from workers.prepare import prepare_episode


def sqlite_broker(home: Path) -> str:
    """kombu's SQLite transport in *home*: the opt-in broker whose workers run in the test's own process."""
    return f"sqla+sqlite:///{(home / 'broker.sqlite').resolve()}"


def send(node, datasets):
    assoc = node.associate()
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def state(store, study, episode):
    found = store.episode(study, episode)
    return None if found is None else found.state


@pytest.fixture
def pipeline(tmp_path):
    """SCP + dispatcher + in-process worker on the sqla broker (the opt-in) in a temp home."""
    settings = node_settings(tmp_path / "home", broker_url=sqlite_broker(tmp_path / "home"))
    app = configure(settings)
    worker = InProcessWorker(app, [IO_QUEUE], concurrency=1)
    worker.start()
    with running_node(settings) as node:
        dispatcher = HandoffDispatcher(node.store, publish_prepare, settings.study_idle_seconds,
                                       settings.handoff_retry_seconds)
        dispatcher.start()
        try:
            yield node
        finally:
            dispatcher.stop()
            worker.stop()


def test_idle_study_is_prepared_once_and_a_later_arrival_opens_a_new_episode(pipeline):
    node = pipeline
    study, series = generate_uid(), generate_uid()
    slices = [make_ct(study, series, position=z, instance_number=n) for n, z in ((3, 10.0), (1, -10.0), (2, 0.0))]
    assert send(node, slices) == [StoreStatus.SUCCESS] * 3

    wait_for(lambda: state(node.store, study, 1) == EpisodeState.PREPARED, timeout=30, what="episode 1 prepared")
    assert node.store.task_runs(study, 1, "prepare") == [("prepare", "prepared")]
    manifest = StudyManifest.read(manifest_path(node.settings.home, study, 1))
    assert manifest.study_instance_uid == study and manifest.episode_id == 1
    (only,) = manifest.series
    assert only.orientation == "axial"
    assert [i.image_position_patient[2] for i in only.instances] == [-10.0, 0.0, 10.0]
    assert only.instances[0].pixel_spacing == (0.5, 0.5)
    assert all((node.spool.root / i.path).is_file() for i in only.instances)

    # a duplicate delivery of the same task finds the episode claimed and does nothing
    assert prepare_episode(node.settings, study, 1) is None
    assert node.store.task_runs(study, 1, "prepare") == [("prepare", "prepared"), ("prepare", "duplicate")]

    extra = make_ct(study, generate_uid(), position=0.0)
    assert send(node, [extra]) == [StoreStatus.SUCCESS]
    wait_for(lambda: state(node.store, study, 2) == EpisodeState.READY, timeout=30, what="episode 2 ready")
    node.store.set_state(study, 1, EpisodeState.REPORTED, time.time())  # this pipeline has no gpu stage
    wait_for(lambda: state(node.store, study, 2) == EpisodeState.PREPARED, timeout=30, what="episode 2 prepared")
    second = StudyManifest.read(manifest_path(node.settings.home, study, 2))
    assert sum(len(s.instances) for s in second.series) == 4
    assert node.store.task_runs(study, 2, "prepare") == [("prepare", "prepared")]


def test_changed_instance_resent_after_hand_off_replaces_the_old_one_and_opens_a_new_episode(pipeline, caplog):
    node = pipeline
    study, series = generate_uid(), generate_uid()
    changed, other = make_ct(study, series, description="first version"), make_ct(study, series, position=1.0)
    assert send(node, [changed, other]) == [StoreStatus.SUCCESS] * 2
    wait_for(lambda: state(node.store, study, 1) == EpisodeState.PREPARED, timeout=30, what="episode 1 prepared")
    old = node.index.instance(changed.SOPInstanceUID)

    assert send(node, [changed]) == [StoreStatus.SUCCESS]  # identical after hand-off: stored once, no episode
    assert node.index.instance(changed.SOPInstanceUID) == old
    assert node.store.episode(study, 2) is None

    changed.SeriesDescription = "corrected version"
    with caplog.at_level(logging.INFO, logger="dicom_node.receive"):
        assert send(node, [changed]) == [StoreStatus.SUCCESS]
    assert any(f"instance {changed.SOPInstanceUID} of study {study} replaced by a different version; episode 2 (new)"
               in r.getMessage() for r in caplog.records)
    new = node.index.instance(changed.SOPInstanceUID)
    assert new.sha256 != old.sha256 and new.episode_id == 2 and new.path == old.path
    assert pydicom.dcmread(node.spool.root / new.path).SeriesDescription == "corrected version"
    assert sorted(p.name for p in node.spool.root.rglob("*.dcm")) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in (changed, other))
    assert node.index.count_instances() == 2

    node.store.set_state(study, 1, EpisodeState.REPORTED, time.time())  # this pipeline has no gpu stage
    wait_for(lambda: state(node.store, study, 2) == EpisodeState.PREPARED, timeout=30, what="episode 2 prepared")
    assert node.store.task_runs(study, 2, "prepare") == [("prepare", "prepared")]
    manifest = StudyManifest.read(manifest_path(node.settings.home, study, 2))
    entries = {i.sop_instance_uid: i for s in manifest.series for i in s.instances}
    assert set(entries) == {changed.SOPInstanceUID, other.SOPInstanceUID}
    assert entries[changed.SOPInstanceUID].size_bytes == new.size_bytes


def _receive_study(index, study, count=2, now=1000.0):
    for n in range(count):
        record = InstanceRecord(
            sop_instance_uid=generate_uid(), study_instance_uid=study, series_instance_uid="1.2.3",
            patient_id="P", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae="X", peer_address="127.0.0.1", size_bytes=1, sha256=f"{study}-{n}", path=f"{study}/{n}.dcm",
            received_at=now,
        )
        index.record_instance(record, place=lambda: None, is_duplicate=lambda path: False)


def test_next_episode_waits_while_an_earlier_one_is_in_flight(tmp_path):
    store = StateStore(tmp_path / "index.sqlite")
    index = Index(store)
    published = []
    clock = [1000.0]
    dispatcher = HandoffDispatcher(store, lambda s, e, t: published.append(t), 5.0, 1.0, clock=lambda: clock[0])
    study = "1.2.826.0.1.3680043.10.1"
    _receive_study(index, study, now=clock[0])
    dispatcher.tick()
    assert published == []  # still receiving
    clock[0] += 5.0
    dispatcher.tick()
    assert published == [f"prepare-{study}-1"]
    assert store.claim(study, 1, clock[0], stale_after=600)
    assert not store.claim(study, 1, clock[0], stale_after=600)  # claimed once only

    _receive_study(index, study, now=clock[0])  # arrives after hand-off: episode 2
    clock[0] += 5.0
    dispatcher.tick()
    assert state(store, study, 2) == EpisodeState.READY
    assert published == [f"prepare-{study}-1"]  # episode 1 is still preparing
    store.set_state(study, 1, EpisodeState.PREPARED, clock[0])
    dispatcher.tick()  # prepared: at or in the gpu stage, still in flight (before, episode 2 started here and
    assert published == [f"prepare-{study}-1"]  # two draft SR sets that did not name each other reached the PACS)
    store.set_state(study, 1, EpisodeState.REPORTED, clock[0])
    dispatcher.tick()  # its outputs are in the outbox: episode 2's report supersedes them (reporting/lineage.py)
    assert published == [f"prepare-{study}-1", f"prepare-{study}-2"]
    store.close()


def test_hand_off_waits_for_a_dead_broker_and_runs_exactly_once_when_it_is_up(tmp_path):
    port = free_port()
    settings = node_settings(tmp_path / "home", broker_url=f"redis://127.0.0.1:{port}/0")
    app = configure(settings)
    with running_node(settings) as node:
        dispatcher = HandoffDispatcher(node.store, publish_prepare, settings.study_idle_seconds,
                                       settings.handoff_retry_seconds)
        dispatcher.start()
        try:
            study = generate_uid()
            # the broker is down: the instances are still accepted (they are on disk and in the index)
            assert send(node, [make_ct(study, position=z) for z in (0.0, 1.0)]) == [StoreStatus.SUCCESS] * 2

            def failed_twice():
                episode = node.store.episode(study, 1)
                return episode is not None and episode.attempts >= 2 and episode.published_at is None

            wait_for(failed_twice, timeout=30, what="two failed hand-off attempts")
            assert state(node.store, study, 1) == EpisodeState.QUEUED
            assert "did not accept" in node.store.episode(study, 1).last_error

            with redis_server(tmp_path / "redis", port) as url:
                wait_for(lambda: node.store.episode(study, 1).published_at is not None, timeout=30,
                         what="hand-off accepted by redis")
                client = redis.Redis.from_url(url)
                # exactly one message in the io queue, and it carries IDs only
                (message,) = [json.loads(raw) for raw in client.lrange(IO_QUEUE, 0, -1)]
                assert message["headers"]["task"] == PREPARE_TASK
                assert message["headers"]["id"] == f"prepare-{study}-1"
                args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
                assert (args, kwargs) == ([study, 1], {})
                worker = InProcessWorker(app, [IO_QUEUE], concurrency=1)
                worker.start()
                try:
                    wait_for(lambda: state(node.store, study, 1) == EpisodeState.PREPARED, timeout=30,
                             what="episode prepared")
                    wait_for(lambda: client.llen(IO_QUEUE) == 0 and client.hlen("unacked") == 0, timeout=30,
                             what="the task acknowledged and nothing else queued")
                finally:
                    worker.stop()
                client.close()
        finally:
            dispatcher.stop()
        assert node.store.task_runs(study, 1, "prepare") == [("prepare", "prepared")]
        assert manifest_path(settings.home, study, 1).is_file()


def test_restart_republishes_episodes_left_in_flight(tmp_path):
    settings = node_settings(tmp_path / "home", broker_url=sqlite_broker(tmp_path / "home"))
    store = StateStore(settings.index_path)
    index = Index(store)
    study = "1.2.826.0.1.3680043.10.2"
    _receive_study(index, study, now=1.0)
    store.close_idle_episodes(100.0, 1.0)
    store.queue_ready_episodes(100.0)
    store.mark_published(study, 1, 100.0)  # a previous run handed it off; its broker message was lost
    assert store.claim(study, 1, 101.0, stale_after=600)  # ... and its in-process worker died while preparing
    sent = []
    dispatcher = HandoffDispatcher(store, lambda s, e, t: sent.append(t), 1.0, 1.0)
    assert dispatcher.recover(reset_claimed=True) == 1
    dispatcher.tick()
    assert sent == [f"prepare-{study}-1"]
    assert state(store, study, 1) == EpisodeState.QUEUED
    store.close()


def test_status_json_lists_episodes(pipeline, capsys):
    node = pipeline
    study = generate_uid()
    send(node, [make_ct(study)])
    wait_for(lambda: state(node.store, study, 1) == EpisodeState.PREPARED, timeout=30, what="prepared")
    args = type("Args", (), {"json": True})()
    assert status.run(args, node.settings) == 0
    document = json.loads(capsys.readouterr().out)
    (row,) = [r for r in document["studies"] if r["study_instance_uid"] == study]
    assert row["state"] == "prepared" and row["study_instances"] == 1 and row["handed_off"]


def test_status_names_the_signed_version_of_an_unfinished_delivery(pipeline, capsys):
    node = pipeline
    study = generate_uid()
    send(node, [make_ct(study)])
    wait_for(lambda: state(node.store, study, 1) == EpisodeState.PREPARED, timeout=30, what="prepared")
    node.store.add_deliveries(study, 1, [("hl7", "127.0.0.1:2575")], time.time())
    node.store.add_deliveries(study, 1, [("hl7", "127.0.0.1:2575")], time.time(), output_set="signed:1")
    args = type("Args", (), {"json": False})()
    assert status.run(args, node.settings) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("delivery pending")]
    assert sorted(lines) == sorted([
        f"delivery pending: hl7 to 127.0.0.1:2575 of {study} episode 1 after 0 attempt(s)",
        f"delivery pending: hl7 (signed version 1) to 127.0.0.1:2575 of {study} episode 1 after 0 attempt(s)"])
