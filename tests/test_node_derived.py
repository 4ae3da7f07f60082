"""AI/derived objects (raddraft's own SR, narrative and GSPS, any vendor's SR, presentation state or key-object
selection) are stored but open no episode: a PACS that sends a study back with raddraft's outputs starts no new
analysis. Real peers: dcmtk storescu on loopback to the in-process SCP, `raddraft status` in its own process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pydicom.uid
import pytest
from node_helpers import PYDICOM_TEST_FILES, SCU_AE, node_settings, running_node
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid
from reporting_dicom_helpers import cr_findings, cr_study, result_for

from core.states import EpisodeState
from dicom_node.derived import DerivedKind, derived_kind
from dicom_node.index import NO_EPISODE
from reporting.context import Signoff
from reporting.gsps import build_presentation_states
from reporting.narrative import build_narrative_sr
from reporting.sr import build_findings_sr

SIGNOFF = Signoff("Curie^Marie", "General Hospital Radiology", datetime(2024, 5, 6, 9, 30, tzinfo=UTC))


@pytest.fixture
def node(tmp_path):
    with running_node(node_settings(tmp_path / "home", study_idle_seconds=600)) as running:
        yield running


def storescu(node, *paths: Path) -> None:
    """Send *paths* in one association, proposing only their SOP classes (-R), as a PACS sends a study."""
    done = subprocess.run(["storescu", "-aet", SCU_AE, "-aec", "RADDRAFT", "-R", "127.0.0.1", str(node.port),
                           *map(str, paths)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def raddraft_status(home: Path, *args: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "raddraft.cli", "status", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def save(dataset: pydicom.Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_the_predicate_knows_every_sr_presentation_state_and_key_object_class():
    public = [value for value in vars(pydicom.uid).values() if isinstance(value, UID) and value.is_valid]
    derived = {uid for uid in public if derived_kind(uid, "Other Vendor") is not None}
    for uid in public:
        name = uid.name
        if name.endswith(("SR Storage", "SR Storage - Trial", "Presentation State Storage")) or "Report St" in name:
            assert uid in derived or name == "DICOS Threat Detection Report Storage", name  # DICOS: not SR
    assert derived_kind(pydicom.uid.KeyObjectSelectionDocumentStorage, "") is DerivedKind.KEY_OBJECT_SELECTION
    assert derived_kind(pydicom.uid.ProcedureLogStorage, "") is DerivedKind.STRUCTURED_REPORT
    for image in (pydicom.uid.CTImageStorage, pydicom.uid.MRImageStorage, pydicom.uid.SegmentationStorage,
                  pydicom.uid.DigitalXRayImageStorageForPresentation, pydicom.uid.SecondaryCaptureImageStorage,
                  pydicom.uid.EncapsulatedPDFStorage, pydicom.uid.UltrasoundImageStorage):
        assert image not in derived, image.name
    # raddraft's own objects whatever their class (its Manufacturer, as reporting/context.py writes it)
    assert derived_kind(pydicom.uid.CTImageStorage, " RadDraft ") is DerivedKind.OWN_OUTPUT


def test_raddraft_outputs_sent_back_alone_or_with_the_whole_study_open_no_episode(node, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dicom_node")
    cr = cr_study(tmp_path / "cr")
    images = sorted((cr.spool / "cr").glob("*.dcm"))
    study = cr.manifest.study_instance_uid
    storescu(node, *images)
    (episode,) = node.store.episodes()
    assert (episode.episode_id, episode.state, episode.received) == (1, EpisodeState.RECEIVING, 2)

    # what raddraft built for the study: findings SR, narrative SR, one GSPS (all made by tests' real builders)
    result = result_for(cr, cr_findings(cr))
    out = tmp_path / "outputs"
    out.mkdir()
    ours = [save(build_findings_sr(cr.inputs(result)), out / "sr.dcm"),
            save(build_narrative_sr(cr.inputs(result)), out / "narrative.dcm"),
            *(save(state, out / f"gsps_{n}.dcm")
              for n, state in enumerate(build_presentation_states(cr.inputs(result))))]
    assert len(ours) == 3
    storescu(node, *ours)  # while the episode is still receiving: stored, but the episode does not grow
    assert node.store.episodes() == [episode]  # same received count and last arrival: not extended
    for path in ours:
        record = node.index.instance(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert record is not None and record.episode_id == NO_EPISODE
        stored = pydicom.dcmread(node.spool.root / record.path)  # in the spool, as storescu sent it
        assert stored.SOPClassUID == record.sop_class_uid and stored.Manufacturer == "raddraft"
    assert sum("stored without analysis: raddraft output (sent back)" in r.getMessage()
               for r in caplog.records) == 3

    node.store.set_state(study, 1, EpisodeState.DELIVERED, 1.0)  # the pipeline delivered them to the PACS
    # the PACS sends back only a new output (the signed SR) ...
    signed = save(build_findings_sr(cr.inputs(result), SIGNOFF), out / "sr_final.dcm")
    storescu(node, signed)
    # ... and later the whole study: the original images (identical) plus every output
    storescu(node, *images, *ours, signed)
    (after,) = node.store.episodes()
    assert (after.episode_id, after.state, after.received) == (1, EpisodeState.DELIVERED, 2)
    assert node.index.count_instances() == 6 and node.index.count_instances_without_episode() == 4

    text = raddraft_status(node.settings.home)
    assert "1 episode(s): delivered 1; 6 instance(s) stored" in text
    assert "stored without analysis (AI/derived objects): 4\n" in text
    assert "identical re-sends: 6\n" in text  # 2 images, 3 outputs and the signed SR sent again
    assert "Tester^Chest" not in caplog.text and "RD-0001" not in caplog.text


def test_an_sr_and_a_key_object_selection_of_other_vendors_are_stored_without_an_episode(node, tmp_path):
    ct = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    title = codes.DCM.OfInterest  # a radiologist's key images: a KO that references CT_small
    content = hd.ko.KeyObjectSelection(document_title=title, referenced_objects=[ct])
    ko = hd.ko.KeyObjectSelectionDocument(evidence=[ct], content=content, series_instance_uid=generate_uid(),
                                          series_number=99, sop_instance_uid=generate_uid(), instance_number=1,
                                          manufacturer="Other Vendor")
    files = [PYDICOM_TEST_FILES / "reportsi.dcm", PYDICOM_TEST_FILES / "test-SR.dcm",
             save(ko, tmp_path / "ko.dcm")]
    storescu(node, *files)
    assert node.store.episodes() == []
    assert node.index.count_instances() == node.index.count_instances_without_episode() == 3
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    kinds = [derived_kind(str(ds.SOPClassUID), str(ds.get("Manufacturer", ""))) for ds in datasets]
    assert kinds == [DerivedKind.STRUCTURED_REPORT, DerivedKind.STRUCTURED_REPORT, DerivedKind.KEY_OBJECT_SELECTION]
    text = raddraft_status(node.settings.home)
    assert "no studies in" in text and "stored without analysis (AI/derived objects): 3\n" in text
    document = json.loads(raddraft_status(node.settings.home, "--json"))
    assert document["studies"] == [] and document["node"]["stored_without_analysis"] == 3
    assert document["studies_without_episode"] == sorted({str(ds.StudyInstanceUID) for ds in datasets})
