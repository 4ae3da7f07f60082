"""End to end against a real Orthanc: Orthanc C-STOREs a phantom study to ``raddraft serve``; raddraft analyses it
and stores its SR and GSPS back into the same study; an MLLP listener gets the ORU.

Runs once with the embedded broker (``raddraft serve`` alone) and once with a real redis-server and separate
``raddraft worker`` processes. With the shipped trained checkpoint (``model.embedded.embedded_available()``)
every box in the SR must point at a lesion the phantom drew on that image (its centre inside a drawn lesion
section: a CT/MR lesion crosses several slices) and a study with findings must get a box; how well the boxes
fit (IoU) is what ``raddraft evaluate`` measures. With the untrained small preset the boxes are meaningless and
only their structure is checked.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from core.states import DeliveryState, EpisodeState
from peers import wait_for
from peers.gateway import (
    MODEL,
    PR_MODALITY,
    Phantoms,
    base_env,
    connect_orthanc,
    gateway,
    instances_of_modality,
    push_study,
    sample,
    scrape,
    sr_boxes,
    wait_for_outputs,
    worker,
)
from peers.mllp import MLLPListener
from state.store import StateStore

pytestmark = pytest.mark.slow
ANALYSIS_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return Phantoms(tmp_path_factory.mktemp("phantoms"))


def check_study(orthanc, study_id, truth, lesions, listener):
    (sr,) = wait_for_outputs(orthanc, study_id, ANALYSIS_TIMEOUT_S)
    assert sr.StudyInstanceUID == truth["study_uid"]
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    boxes = sr_boxes(sr)
    if boxes:
        assert instances_of_modality(orthanc, study_id, PR_MODALITY), "findings with boxes need a GSPS"
    if MODEL == "embedded":  # every box points at a lesion drawn on its image (box IoU is raddraft evaluate's)
        for sop_uid, box in boxes:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            assert any(x1 <= cx <= x2 and y1 <= cy <= y2 for x1, y1, x2, y2 in lesions.get(sop_uid, [])), (
                f"box {box} on {sop_uid} points at no lesion drawn there")
        if truth["findings"]:
            assert boxes, "a study with findings needs at least one box"
    messages = listener.wait_for_messages(1, timeout=90)
    oru = next(m for m in messages if str(m.segment("OBX")[5]) == truth["study_uid"])
    assert str(oru.segment("OBR")[25]) == "P"
    return sr


def deliveries_done(home, study_uid):
    store = StateStore(home / "index.sqlite")
    try:
        episode = store.episode(study_uid, 1)
        rows = store.deliveries(study_uid, 1)
    finally:
        store.close()
    return (episode is not None and episode.state is EpisodeState.DELIVERED and len(rows) == 2
            and all(r.state is DeliveryState.DONE for r in rows))


def test_embedded_broker_cr_study_round_trip(tmp_path, orthanc, phantoms):
    home = tmp_path / "home"
    with MLLPListener() as listener:
        env = base_env(home, RADDRAFT_HL7_DESTINATIONS=f"127.0.0.1:{listener.port}")
        env["RADDRAFT_DICOM_DESTINATIONS"] = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        with gateway(home, env) as serve:
            connect_orthanc(orthanc, serve.port)
            study_id = push_study(orthanc, phantoms.files("CR"))
            check_study(orthanc, study_id, phantoms.truth("CR"), phantoms.lesions("CR"), listener)
            wait_for(lambda: deliveries_done(home, phantoms.truth("CR")["study_uid"]), timeout=90,
                     what="both deliveries done")
            # the gateway's /metrics counted what it did (the worklist port serves it)
            worklist = re.search(r"worklist listening on (http://\S+)", serve.log)
            assert worklist is not None, serve.log
            with urllib.request.urlopen(f"{worklist.group(1)}/metrics", timeout=10) as response:
                text = response.read().decode()
            assert sample(text, "raddraft_instances_received_total", outcome="stored") == len(phantoms.files("CR"))
            for task in ("prepare", "infer", "report", "deliver"):
                assert (sample(text, "raddraft_task_seconds_count", task=task) or 0) >= 1, task
            for kind in ("dicom", "hl7"):
                assert (sample(text, "raddraft_deliveries_total", kind=kind, outcome="ok") or 0) >= 1, kind
        assert "PHANTOM" not in serve.log  # no patient names at INFO


def test_redis_broker_with_separate_workers_ct_study(tmp_path, orthanc, redis_server, phantoms):
    home = tmp_path / "home"
    with MLLPListener() as listener:
        env = base_env(home, RADDRAFT_BROKER_URL=redis_server.url,
                       RADDRAFT_HL7_DESTINATIONS=f"127.0.0.1:{listener.port}",
                       RADDRAFT_DICOM_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        with (gateway(home, env) as serve, worker("io", env, "--http-port", "0") as io,
              worker("gpu", env, "--http-port", "0") as gpu):
            connect_orthanc(orthanc, serve.port)
            study_id = push_study(orthanc, phantoms.files("CT"))
            check_study(orthanc, study_id, phantoms.truth("CT"), phantoms.lesions("CT"), listener)
            wait_for(lambda: deliveries_done(home, phantoms.truth("CT")["study_uid"]), timeout=90,
                     what="both deliveries done")
            # each worker serves the counters of what it ran and its health
            status, text = scrape(io.log, "/metrics")
            assert status == 200
            for task in ("prepare", "report", "deliver"):
                assert (sample(text, "raddraft_task_seconds_count", task=task) or 0) >= 1, task
            for kind in ("dicom", "hl7"):
                assert (sample(text, "raddraft_deliveries_total", kind=kind, outcome="ok") or 0) >= 1, kind
            status, text = scrape(gpu.log, "/metrics")
            assert status == 200 and (sample(text, "raddraft_task_seconds_count", task="infer") or 0) >= 1
            for log in (gpu.log, io.log):  # a worker's port has no sessions: ok / not ok only
                status, document = scrape(log, "/healthz")
                assert status == 200 and json.loads(document) == {"status": "ok"}, document
