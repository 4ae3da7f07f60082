"""Faults end to end, each ending with exactly one findings SR per episode in Orthanc and no instance lost:
kill -9 of the gpu worker during inference, Redis restarted mid-flow, Orthanc down during delivery, the same
study sent twice, and a second episode of a study while the first is being analysed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import ExitStack

import pydicom
import pytest
import redis
from pydicom.uid import generate_uid

from core.states import DeliveryState
from peers import wait_for
from peers.gateway import (
    DurableRedis,
    Phantoms,
    base_env,
    connect_orthanc,
    deliveries,
    episode_state,
    findings_srs,
    gateway,
    push_study,
    wait_for_outputs,
    worker,
)
from workers.celery_app import GPU_QUEUE

pytestmark = pytest.mark.slow
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return Phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture
def durable_redis(tmp_path_factory):
    with DurableRedis(tmp_path_factory.mktemp("redis")) as peer:
        yield peer


def orthanc_env(home, orthanc, **extra):
    return base_env(home, RADDRAFT_DICOM_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", **extra)


def assert_one_sr_and_nothing_lost(orthanc, study_id, files, episodes=1):
    srs = findings_srs(orthanc, study_id)
    assert len(srs) == episodes, [sr.SOPInstanceUID for sr in srs]
    assert len({sr.SOPInstanceUID for sr in srs}) == episodes
    stored = orthanc.sop_instance_uids()
    for path in files:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) in stored


def delivered(home, study_uid, episode_id=1):
    rows = deliveries(home, study_uid, episode_id)
    return episode_state(home, study_uid, episode_id) == "delivered" and rows and all(
        r.state is DeliveryState.DONE for r in rows)


def test_kill_9_of_the_gpu_worker_during_inference(tmp_path, orthanc, durable_redis, phantoms):
    home = tmp_path / "home"
    env = orthanc_env(home, orthanc, RADDRAFT_BROKER_URL=durable_redis.url, RADDRAFT_BROKER_VISIBILITY_TIMEOUT_S="4")
    truth = phantoms.truth("CT")
    with gateway(home, env) as serve, worker("io", env):
        connect_orthanc(orthanc, serve.port)
        with worker("gpu", env) as doomed:
            study_id = push_study(orthanc, phantoms.files("CT"))
            wait_for(lambda: "loaded on" in doomed.log, timeout=TIMEOUT_S, what="inference started")
            doomed.process.send_signal(signal.SIGKILL)
            assert doomed.stop() == -signal.SIGKILL
            assert "generated" not in doomed.log, "the worker finished before it was killed: nothing was tested"
        with worker("gpu", env) as survivor:
            wait_outputs = wait_for_outputs(orthanc, study_id, TIMEOUT_S)
            assert "generated" in survivor.log  # the unacknowledged task was re-delivered to the new worker
        assert wait_outputs
        wait_for(lambda: delivered(home, truth["study_uid"]), timeout=30, what="delivery done")
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("CT"))


def test_redis_restarted_mid_flow(tmp_path, orthanc, durable_redis, phantoms):
    home = tmp_path / "home"
    env = orthanc_env(home, orthanc, RADDRAFT_BROKER_URL=durable_redis.url, RADDRAFT_BROKER_VISIBILITY_TIMEOUT_S="6")
    truth = phantoms.truth("MR")
    with gateway(home, env) as serve, ExitStack() as stack:
        workers = {queue: stack.enter_context(worker(queue, env)) for queue in ("io", "gpu")}
        connect_orthanc(orthanc, serve.port)
        study_id = push_study(orthanc, phantoms.files("MR"))
        wait_for(lambda: episode_state(home, truth["study_uid"]) == "prepared", timeout=TIMEOUT_S,
                 what="episode handed to the gpu queue")
        durable_redis.restart()
        wait_for_outputs(orthanc, study_id, 60)
        wait_for(lambda: delivered(home, truth["study_uid"]), timeout=60, what="delivery done")
        for queue, running in workers.items():
            assert running.alive(), f"the {queue} worker died when Redis restarted"
        assert serve.alive()  # the node itself rides out the broker restart
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("MR"))


def test_orthanc_down_during_delivery_then_back(tmp_path, orthanc, phantoms):
    home = tmp_path / "home"
    truth = phantoms.truth("CR")
    with gateway(home, orthanc_env(home, orthanc)) as serve:
        connect_orthanc(orthanc, serve.port)
        study_id = push_study(orthanc, phantoms.files("CR"))
        orthanc.stop()
        wait_for(lambda: any(r.attempts >= 2 for r in deliveries(home, truth["study_uid"])), timeout=TIMEOUT_S,
                 what="two failed delivery attempts")
        (row,) = deliveries(home, truth["study_uid"])
        assert row.state is DeliveryState.PENDING and "not reachable" in row.last_error
        orthanc.start()
        wait_for_outputs(orthanc, study_id, TIMEOUT_S)
        wait_for(lambda: delivered(home, truth["study_uid"]), timeout=30, what="delivery done")
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("CR"))


def test_same_study_sent_twice(tmp_path, orthanc, phantoms):
    home = tmp_path / "home"
    truth = phantoms.truth("CR")
    with gateway(home, orthanc_env(home, orthanc)) as serve:
        connect_orthanc(orthanc, serve.port)
        study_id = push_study(orthanc, phantoms.files("CR"))
        wait_for_outputs(orthanc, study_id, TIMEOUT_S)
        originals = [orthanc.upload(path)["ID"] for path in phantoms.files("CR")]  # already stored: same IDs
        orthanc.store_to("raddraft", originals)
        wait_for(lambda: delivered(home, truth["study_uid"]), timeout=30, what="delivery done")
        assert episode_state(home, truth["study_uid"], 2) is None  # identical instances open no new episode
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("CR"))


def test_second_episode_while_the_first_is_analysed(tmp_path, orthanc, phantoms):
    home = tmp_path / "home"
    truth = phantoms.truth("CT")
    late = pydicom.dcmread(phantoms.files("CT")[0])
    late.SeriesInstanceUID = generate_uid()
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.SeriesNumber = 99
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    with gateway(home, orthanc_env(home, orthanc)) as serve:
        connect_orthanc(orthanc, serve.port)
        study_id = push_study(orthanc, phantoms.files("CT"))
        wait_for(lambda: episode_state(home, truth["study_uid"]) in ("prepared", "reported"), timeout=TIMEOUT_S,
                 what="episode 1 being analysed")
        orthanc.store_to("raddraft", [orthanc.upload(late_path)["ID"]])
        wait_for(lambda: delivered(home, truth["study_uid"], 1) and delivered(home, truth["study_uid"], 2),
                 timeout=TIMEOUT_S, what="both episodes delivered")
    assert_one_sr_and_nothing_lost(orthanc, study_id, [*phantoms.files("CT"), late_path], episodes=2)


def raddraft(env, *argv):
    return subprocess.run([sys.executable, "-m", "raddraft.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_delivery_dead_lettered_then_replayed_with_raddraft_retry(tmp_path, orthanc, phantoms):
    home = tmp_path / "home"
    truth = phantoms.truth("CR")
    env = orthanc_env(home, orthanc, RADDRAFT_TASK_MAX_RETRIES="1")
    with gateway(home, env) as serve:
        connect_orthanc(orthanc, serve.port)
        study_id = push_study(orthanc, phantoms.files("CR"))
        orthanc.stop()

        def dead_letter():
            status = raddraft(env, "status", "--json")
            assert status.returncode == 0, status.stderr
            document = json.loads(status.stdout)
            return document if document["dead_letters"] else None

        document = wait_for(dead_letter, timeout=TIMEOUT_S, what="a dead letter in raddraft status")
        (letter,) = document["dead_letters"]
        assert letter["task"] == "raddraft.deliver" and letter["retries"] == 1
        assert letter["study_instance_uid"] == truth["study_uid"] and "not reachable" in letter["error"]
        (row,) = document["deliveries"]
        assert row["state"] == "dead" and row["attempts"] == 2
        text = raddraft(env, "status").stdout
        assert f"#{letter['id']}" in text and "raddraft retry" in text

        orthanc.start()
        replayed = raddraft(env, "retry", str(letter["id"]))
        assert replayed.returncode == 0, replayed.stderr
        assert f"re-played dead letter #{letter['id']}" in replayed.stdout
        wait_for_outputs(orthanc, study_id, TIMEOUT_S)
        wait_for(lambda: delivered(home, truth["study_uid"]), timeout=60, what="delivery done after the re-play")
        again = raddraft(env, "retry", str(letter["id"]))
        assert again.returncode == 2 and "re-played already" in again.stderr
        assert json.loads(raddraft(env, "status", "--json").stdout)["dead_letters"] == []
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("CR"))


def test_a_message_the_broker_lost_is_published_again_by_raddraft_retry_stranded(tmp_path, orthanc, durable_redis,
                                                                                phantoms):
    home = tmp_path / "home"
    env = orthanc_env(home, orthanc, RADDRAFT_BROKER_URL=durable_redis.url)
    truth = phantoms.truth("CR")
    client = redis.Redis.from_url(durable_redis.url)
    with gateway(home, env) as serve:
        connect_orthanc(orthanc, serve.port)
        with worker("io", env):  # no gpu worker yet: the infer message waits in Redis
            study_id = push_study(orthanc, phantoms.files("CR"))
            wait_for(lambda: episode_state(home, truth["study_uid"]) == "prepared"
                     and sum(client.llen(k) for k in client.keys(f"{GPU_QUEUE}*")) == 1,
                     timeout=TIMEOUT_S, what="infer message queued")
        lost = client.delete(*client.keys(f"{GPU_QUEUE}*"))  # the broker loses it
        assert lost >= 1
        with worker("io", env), worker("gpu", env):
            result = raddraft(env, "retry", "--stranded")
            assert result.returncode == 0, result.stderr
            assert f"published prepare of study {truth['study_uid']} episode 1" in result.stdout
            wait_for_outputs(orthanc, study_id, TIMEOUT_S)
            wait_for(lambda: delivered(home, truth["study_uid"]), timeout=60, what="delivery done")
            again = raddraft(env, "retry", "--stranded")
            assert again.returncode == 0 and again.stdout.strip() == "no stranded work", again.stdout
    assert_one_sr_and_nothing_lost(orthanc, study_id, phantoms.files("CR"))
