"""``raddraft serve`` as a subprocess: dcmtk peers against it, kill -9 between instances loses no accepted instance,
SIGTERM stops it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pydicom
from node_helpers import PYDICOM_TEST_FILES, SCU_AE, Serve, make_ct, wait_for
from pydicom.uid import generate_uid

from core.layout import manifest_path
from core.manifest import StudyManifest
from core.states import EpisodeState
from dicom_node.index import Index
from dicom_node.statuses import StoreStatus
from state.store import StateStore

# distinct SOP Instance UIDs, and the storescu option proposing each file's own transfer syntax
DCMTK_FILES = {"CT_small.dcm": "-xe", "MR_small_jpeg_ls_lossless.dcm": "-xt", "JPEG2000.dcm": "-xw",
               "SC_rgb_jpeg_dcmtk.dcm": "-xy", "JPGExtended.dcm": "-xx"}


def test_dcmtk_echoscu_and_storescu_against_raddraft_serve(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, "--no-worker", RADDRAFT_STUDY_IDLE_SECONDS="3600")
    try:
        echo = subprocess.run(["echoscu", "-aet", SCU_AE, "-aec", "RADDRAFT", "127.0.0.1", str(serve.port)],
                              check=False, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        sources = [PYDICOM_TEST_FILES / name for name in DCMTK_FILES]
        started = time.time()
        for source in sources:
            stored = subprocess.run(["storescu", "-R", DCMTK_FILES[source.name], "-aet", SCU_AE, "-aec", "RADDRAFT",
                                     "127.0.0.1", str(serve.port), str(source)],
                                    check=False, capture_output=True, text=True, timeout=120)
            assert stored.returncode == 0, f"{source.name}: {stored.stderr}"
        finished = time.time()

        store = StateStore(home / "index.sqlite")
        index = Index(store)
        try:
            for source in sources:
                original = pydicom.dcmread(source, stop_before_pixels=True)
                record = index.instance(original.SOPInstanceUID)
                assert record is not None, source.name
                data = (home / "spool" / record.path).read_bytes()
                assert (record.study_instance_uid, record.series_instance_uid, record.sop_class_uid) == (
                    original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPClassUID), source.name
                assert record.patient_id == str(original.get("PatientID", ""))
                assert record.transfer_syntax_uid == original.file_meta.TransferSyntaxUID, source.name
                assert (record.calling_ae, record.peer_address) == (SCU_AE, "127.0.0.1")
                assert record.size_bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()
                assert started - 1 <= record.received_at <= finished + 1
                assert pydicom.dcmread(home / "spool" / record.path).PixelData == pydicom.dcmread(source).PixelData
        finally:
            store.close()
        with sqlite3.connect(home / "index.sqlite") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        # `raddraft status` while the server runs: one receiving episode per study, with its counts
        studies: dict[str, int] = {}
        for source in sources:
            study = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
            studies[study] = studies.get(study, 0) + 1
        document = json.loads(_status(home, "--json").stdout)
        assert {r["study_instance_uid"]: (r["state"], r["study_instances"]) for r in document["studies"]} == {
            study: ("receiving", count) for study, count in studies.items()}
        assert document["totals"] == {"receiving": len(studies)} and document["instances"] == len(sources)
        text = _status(home).stdout
        for study, count in studies.items():
            (line,) = [line for line in text.splitlines() if line.startswith(study)]
            assert line.split()[1:4] == ["1", "receiving", str(count)], line
        assert f"{len(studies)} episode(s): receiving {len(studies)}; {len(sources)} instance(s) stored" in text
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    log = "".join(serve.log)
    for identifier in ("CompressedSamples", "Lestrade", "1CT1", "4MR1", "8NM1"):  # patient names and IDs
        assert identifier not in log, identifier


def test_kill_9_between_instances_loses_no_accepted_instance_and_restart_prepares_the_study(tmp_path):
    home = tmp_path / "home"
    study, series = generate_uid(), generate_uid()
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="30")
    try:
        assoc = serve.associate()
        accepted = []
        for z in range(5):
            ds = make_ct(study, series, position=float(z), instance_number=z + 1)
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
            accepted.append(ds.SOPInstanceUID)
        serve.process.kill()  # SIGKILL with the association still open, between two instances
        assert serve.process.wait(timeout=30) == -signal.SIGKILL
        assoc.abort()
    finally:
        serve.stop(signal.SIGKILL)

    store = StateStore(home / "index.sqlite")
    index = Index(store)
    for sop in accepted:
        record = index.instance(sop)
        assert record is not None, sop
        assert hashlib.sha256((home / "spool" / record.path).read_bytes()).hexdigest() == record.sha256
    store.close()

    restarted = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5")
    try:
        store = StateStore(home / "index.sqlite")
        wait_for(lambda: (e := store.episode(study, 1)) is not None and e.state == EpisodeState.PREPARED,
                 timeout=60, what="study prepared after restart")
        manifest = StudyManifest.read(manifest_path(home, study, 1))
        assert [i.sop_instance_uid for i in manifest.series[0].instances] == accepted
        assert store.task_runs(study, 1, "prepare") == [("prepare", "prepared")]
        store.close()
    finally:
        code = restarted.stop()
    assert code == 0, "".join(restarted.log)
    log = "".join(restarted.log)
    assert "raddraft stopped" in log
    assert "NODE-PID-1" not in log and "Node^Test" not in log  # no patient identifiers at INFO


def _status(home, *args):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "raddraft.cli", "status", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


def test_status_command_reports_states(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "raddraft.cli", "status"], env=env, check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no studies" in result.stdout
