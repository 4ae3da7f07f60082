"""The analysis gate on real files nobody here wrote (pydicom's bundled test data): what the model reads, what
it does not and why, and the end states a study reaches before the model (not-analysed, failed), never
'prepared' for ever."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_helpers import PYDICOM_TEST_FILES

from core.settings import Settings
from core.states import EpisodeState
from dicom_node.index import Index, InstanceRecord
from reporting.sources import conform
from state.store import StateStore
from workers import pipeline
from workers.gate import GateRules, gate
from workers.prepare import build_manifest, prepare_episode
from workers.tasks import _end_before_analysis
from worklist.storage import Store, StudyState
from worklist.tasks import run_announcement


class ConsumedHere:
    """A publisher that is the broker and the io worker at once: the worklist's task sent runs here, now."""

    def __init__(self, settings: Settings, worklist: Store) -> None:
        self.settings, self.worklist = settings, worklist
        self.sent: list[str] = []

    def __call__(self, task_name: str, args: list[object], task_id: str) -> None:
        self.sent.append(task_name)
        run_announcement(self.settings, self.worklist, task_name, list(args))


@contextmanager
def consumed_here(settings: Settings) -> Iterator[ConsumedHere]:
    worklist = Store.from_settings(settings)
    try:
        yield ConsumedHere(settings, worklist)
    finally:
        worklist.close()


def spool_file(spool: Path, name: str) -> InstanceRecord:
    source = PYDICOM_TEST_FILES / name
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    target = spool / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), patient_id="", sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="X", peer_address="127.0.0.1",
        size_bytes=target.stat().st_size, sha256=hashlib.sha256(target.read_bytes()).hexdigest(), path=name,
        received_at=0.0)


@pytest.mark.parametrize(("name", "reason"), [
    ("CT_small.dcm", None),
    ("MR_small.dcm", None),  # DERIVED\SECONDARY MR: a reformat a radiologist reads
    ("examples_palette.dcm", "modality US is not analysed"),
    ("JPEG2000.dcm", "modality NM is not analysed"),
    ("rtdose.dcm", "modality RTDOSE is not analysed"),
    ("rtplan.dcm", "not an image (RTPLAN)"),
    ("waveform_ecg.dcm", "not an image (ECG)"),
    ("SC_rgb_rle.dcm", "modality OT is not analysed"),
    # dicom_node/derived.py: the rule that also keeps them from opening an episode
    ("test-SR.dcm", "structured report is not analysed"),
    ("reportsi.dcm", "structured report is not analysed"),
])
def test_the_gate_reads_what_the_model_was_made_for(tmp_path, name, reason):
    record = spool_file(tmp_path, name)
    manifest = build_manifest(tmp_path, record.study_instance_uid, 1, [record])
    decision = gate(manifest, GateRules())
    assert decision.analysable is (reason is None)
    if reason is not None:
        assert decision.reason() == f"not analysed: 1 {reason}"


def test_settings_widen_and_narrow_the_gate(tmp_path):
    record = spool_file(tmp_path, "CT_small.dcm")
    manifest = build_manifest(tmp_path, record.study_instance_uid, 1, [record])
    image_types = manifest.series[0].instances[0].image_type
    assert image_types  # ORIGINAL\PRIMARY\AXIAL
    narrowed = GateRules.from_settings(Settings(home=tmp_path, analysis_excluded_image_types=image_types[-1]))
    assert gate(manifest, narrowed).reason() == f"not analysed: 1 image type {image_types[-1].upper()} is not analysed"
    assert not gate(manifest, GateRules.from_settings(Settings(home=tmp_path, analysis_modalities="MR"))).analysable
    us = spool_file(tmp_path, "examples_rgb_color.dcm")
    us_manifest = build_manifest(tmp_path, us.study_instance_uid, 1, [us])
    rules = GateRules.from_settings(Settings(home=tmp_path, analysis_modalities="CR,US"))
    assert gate(us_manifest, rules).reason().endswith("is not grey scale")  # an RGB ultrasound


def test_a_localizer_and_our_own_output_are_kept_out(tmp_path):
    record = spool_file(tmp_path, "CT_small.dcm")
    manifest = build_manifest(tmp_path, record.study_instance_uid, 1, [record])
    series = manifest.series[0]
    scout = series.instances[0].model_copy(update={"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")})
    ours = series.instances[0].model_copy(update={"manufacturer": "raddraft", "sop_instance_uid": "1.2.3"})
    both = manifest.model_copy(update={"series": [series.model_copy(update={"instances": [scout, ours]})]})
    decision = gate(both, GateRules())
    assert not decision.analysable
    assert dict(decision.refused) == {"image type LOCALIZER is not analysed": 1, "raddraft output (sent back)": 1}


def _prepared(tmp_path: Path, names: list[str]) -> tuple[Settings, str]:
    settings = Settings(home=tmp_path / "home")
    settings.spool_dir.mkdir(parents=True)
    store = StateStore(settings.index_path)
    index = Index(store)
    try:
        study = ""
        for name in names:
            record = spool_file(settings.spool_dir, name)
            index.record_instance(record, place=lambda: None, is_duplicate=lambda _: False)
            study = record.study_instance_uid
        episode = store.episodes()[0]
        store.set_state(study, episode.episode_id, EpisodeState.QUEUED, 0.0)
    finally:
        store.close()
    assert prepare_episode(settings, study, 1) is not None
    return settings, study


def test_an_ecg_ends_not_analysed_and_a_corrupt_image_ends_failed_with_the_decoders_reason(tmp_path):
    settings, study = _prepared(tmp_path / "ecg", ["waveform_ecg.dcm"])
    with pytest.raises(pipeline.NotAnalysedError) as not_analysed:
        pipeline.prepare_request(settings, study, 1)
    _end_before_analysis(settings, study, 1, not_analysed.value)
    store = StateStore(settings.index_path)
    try:
        episode = store.episode(study, 1)
        assert episode.state is EpisodeState.NOT_ANALYSED
        assert episode.last_error == "not analysed: 1 not an image (ECG)"
        assert not pipeline.stranded_work(store)  # a restart does not run it again
    finally:
        store.close()

    settings, study = _prepared(tmp_path / "bad", ["CT_small.dcm"])
    path = settings.spool_dir / "CT_small.dcm"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data) // 3])  # truncated pixel data
    with pytest.raises(pipeline.StageError) as failed:
        pipeline.prepare_request(settings, study, 1)
    reason = str(failed.value)
    assert reason.startswith("no image of the 1 chosen") and "less than expected" in reason  # the decoder's own reason
    with consumed_here(settings) as publish:
        _end_before_analysis(settings, study, 1, failed.value, publish=publish)
    assert publish.sent == ["worklist.episode_failed"]
    store = StateStore(settings.index_path)
    try:
        episode = store.episode(study, 1)
        assert episode.state is EpisodeState.FAILED and episode.last_error.startswith("prepare: no image")
        assert not pipeline.stranded_work(store)  # the announcement was consumed: nothing to send again
    finally:
        store.close()
    store = Store.from_settings(settings)  # the radiologists see why the CT has no draft
    try:
        [entry] = store.list_studies(states=[StudyState.FAILED.value])
        assert entry.error == episode.last_error and "less than expected" in entry.error
    finally:
        store.close()


def test_sources_get_their_type2_attributes_and_real_dates(tmp_path):
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    for keyword in ("PatientBirthDate", "PatientName", "Modality", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyDate = "1997.04.24"
    ds.StudyTime = "not a time"
    ds.PatientID = "ID\x07 1"
    conform(ds)
    assert (ds.PatientBirthDate, str(ds.PatientName), ds.Modality, ds.AccessionNumber) == ("", "", "", "")
    assert ds.StudyDate == "19970424" and ds.StudyTime == "" and ds.PatientID == "ID 1"
