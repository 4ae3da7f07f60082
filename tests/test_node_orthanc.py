"""A real Orthanc sends a study to raddraft with ``POST /modalities/{id}/store`` (issue 2).

Orthanc runs from its own JSON config on free ports (fixture ``orthanc``); the raddraft SCP, its hand-off
dispatcher and an in-process io worker run in this process on the embedded broker, as ``raddraft serve`` does.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES, node_settings, running_node, wait_for
from pydicom.uid import generate_uid

from core.layout import manifest_path
from core.manifest import StudyManifest
from core.states import EpisodeState
from dicom_node.episodes import HandoffDispatcher
from workers.celery_app import IO_QUEUE, configure, publish_prepare
from workers.inprocess import InProcessWorker

MODALITY = "raddraft"
PADDING = 0xFFFCFFFC  # Data Set Trailing Padding
# (pydicom test file, series): three CT slices and one MR image, re-UID'd into one study of two series
SOURCES = [("CT_small.dcm", 0), ("CT_small.dcm", 0), ("CT_small.dcm", 0), ("MR_small.dcm", 1)]


def write_study(folder: Path) -> tuple[str, list[Path]]:
    """Write the SOURCES as one new study (same patient, new study/series/SOP UIDs); return (study UID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    files = []
    for number, (name, series_index) in enumerate(SOURCES, start=1):
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
        ds.PatientID, ds.PatientName = "ORTHANC-PID-1", "Orthanc^Test"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series[series_index]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        path = folder / f"{number:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def assert_same_elements(stored: Path, source: Path) -> None:
    """Every element of *source* arrived unchanged (Orthanc's DCMTK drops Data Set Trailing Padding only)."""
    received, sent = pydicom.dcmread(stored), pydicom.dcmread(source)
    assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    expected = {element.tag: element.value for element in sent if element.tag != PADDING}
    assert {element.tag: element.value for element in received} == expected, source.name


def upload(orthanc, files: list[Path]) -> str:
    """Upload *files* to Orthanc by REST; return the Orthanc ID of their (single) study."""
    parents = {orthanc.upload(path)["ParentStudy"] for path in files}
    assert len(parents) == 1, parents
    return parents.pop()


def job_state(orthanc, job_id: str) -> dict:
    job = orthanc.get(f"/jobs/{job_id}")
    return job if job["State"] in ("Success", "Failure") else {}


@pytest.fixture
def pipeline(tmp_path):
    """raddraft SCP (only ORTHANC@127.0.0.1 allowed) + hand-off dispatcher + in-process io worker."""
    # a worker in this process: the SQLite transport (the embedded default is a Redis that raddraft serve starts)
    settings = node_settings(tmp_path / "home", allowed_peers="ORTHANC@127.0.0.1",
                             broker_url=f"sqla+sqlite:///{(tmp_path / 'home' / 'broker.sqlite').resolve()}")
    worker = InProcessWorker(configure(settings), [IO_QUEUE], concurrency=1)
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


def test_orthanc_sends_a_study_that_is_stored_byte_for_byte_and_prepared_once(orthanc, pipeline, tmp_path):
    node = pipeline
    study, files = write_study(tmp_path / "study")
    orthanc_study = upload(orthanc, files)
    orthanc.add_modality(MODALITY, node.settings.ae_title, "127.0.0.1", node.port)

    answer = orthanc.store_to(MODALITY, [orthanc_study])
    assert answer["InstancesCount"] == len(files) and answer["FailedInstancesCount"] == 0, answer

    sent = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in files}
    wait_for(lambda: all(node.index.instance(sop) is not None for sop in sent), timeout=30, what="all indexed")
    for sop, source in sent.items():
        record = node.index.instance(sop)
        stored = node.spool.root / record.path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == record.sha256
        assert_same_elements(stored, source)
        assert record.study_instance_uid == study and record.calling_ae == orthanc.aet
    assert node.index.study_counts()[study] == (len(files), 2)

    def prepared():
        episode = node.store.episode(study, 1)
        return episode is not None and episode.state == EpisodeState.PREPARED

    wait_for(prepared, timeout=60, what="episode 1 prepared")
    assert node.store.task_runs(study, 1, "prepare") == [("prepare", "prepared")]
    assert node.store.episode(study, 2) is None
    manifest = StudyManifest.read(manifest_path(node.settings.home, study, 1))
    assert {i.sop_instance_uid for s in manifest.series for i in s.instances} == set(sent)


def test_orthanc_not_in_allowed_peers_gets_a_failed_job_and_nothing_is_stored(orthanc, tmp_path):
    settings = node_settings(tmp_path / "home", allowed_peers="MODALITY1@127.0.0.1")
    study, files = write_study(tmp_path / "study")
    orthanc_study = upload(orthanc, files)
    with running_node(settings) as node:
        orthanc.add_modality(MODALITY, settings.ae_title, "127.0.0.1", node.port)
        with pytest.raises(urllib.error.HTTPError) as refused:  # the synchronous store answers with an error
            orthanc.store_to(MODALITY, [orthanc_study])
        assert refused.value.code >= 400

        job = orthanc.request("POST", f"/modalities/{MODALITY}/store",
                              {"Resources": [orthanc_study], "Asynchronous": True})
        finished = wait_for(lambda: job_state(orthanc, job["ID"]), timeout=30, what="Orthanc store job finished")
        assert finished["State"] == "Failure", finished
        assert finished["ErrorCode"] != 0 and finished["ErrorDescription"], finished
        assert node.index.count_instances() == 0
        assert [p for p in node.files() if p.suffix == ".dcm"] == []
        assert node.index.study_counts().get(study) is None
