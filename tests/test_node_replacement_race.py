"""Replacement under load loses nothing that was acknowledged.

Before: when an instance was replaced, the old file was deleted after the index commit and outside the lock, so it
could delete the file another association had just written to the same path: 8 associations re-sending 20 SOP
Instance UIDs alternately under two Study UIDs got Success for every store, and afterwards some index rows pointed
at missing files (plus a spurious 0xA700 "No such file ... .backup"). Here 8 real associations do that; then
every index row must point at a file whose bytes hash to the row's digest and that holds the row's study.
"""

from __future__ import annotations

import hashlib
import subprocess

import pydicom
from node_helpers import make_ct, node_settings, running_node, write_ct
from pydicom.uid import generate_uid

from core.states import EpisodeState
from dicom_node.index import NodeCounter
from dicom_node.statuses import StoreStatus
from workers.prepare import prepare_episode

ASSOCIATIONS = 8
INSTANCES = 20
ROUNDS = 8


def test_replacing_instances_from_many_associations_keeps_every_acknowledged_file(tmp_path):
    studies = [generate_uid(), generate_uid()]
    series = {study: generate_uid() for study in studies}
    sop_uids = [generate_uid() for _ in range(INSTANCES)]
    batches = []
    for worker in range(ASSOCIATIONS):  # each association sends every instance ROUNDS times, alternating studies
        files = []
        for round_ in range(ROUNDS):
            for n, sop_uid in enumerate(sop_uids):
                study = studies[(worker + n + round_) % 2]
                files.append(write_ct(tmp_path / "out" / f"{worker}-{round_}-{n}.dcm", make_ct(
                    study, series[study], sop_uid, description=f"association {worker} round {round_}")))
        batches.append(files)
    with running_node(node_settings(tmp_path / "home", max_associations=16, study_idle_seconds=600)) as node:
        senders = [subprocess.Popen(["storescu", "-aet", "HAMMER", "-aec", node.settings.ae_title, "127.0.0.1",
                                     str(node.port), *map(str, files)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for files in batches]
        outputs = [sender.communicate(timeout=600)[0] for sender in senders]
        assert [sender.returncode for sender in senders] == [0] * ASSOCIATIONS, outputs
        assert not any("Store Response" in out and "Success" not in out for out in outputs)
        lost = []
        for sop_uid in sop_uids:
            row = node.index.instance(sop_uid)
            assert row is not None
            path = node.spool.root / row.path
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != row.sha256:
                lost.append(sop_uid)
                continue
            assert str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) == row.study_instance_uid
        assert lost == [], f"{len(lost)} acknowledged instance(s) lost"
        refused = node.index.counters().get(NodeCounter.REFUSED_INSTANCES, 0)
        assert refused == 0
        stray = [p.name for p in node.spool.root.rglob("*") if p.is_file() and p.suffix != ".dcm"]
        assert stray == []
        on_disk = sorted(p.stem for p in node.spool.root.rglob("*.dcm"))
        assert on_disk == sorted(sop_uids)  # each instance once, under the study it was last filed under


def test_an_instance_refiled_under_another_study_leaves_the_first_study_with_a_true_state(tmp_path):
    """The same SOP Instance UID sent under another Study UID moves there (the PACS corrected the study): the first
    study, left without instances, ends not-analysed saying so instead of failed "no instances in the index"."""
    first, second = generate_uid(), generate_uid()
    sop_uid = generate_uid()
    with running_node(node_settings(tmp_path / "home", study_idle_seconds=600)) as node:
        assoc = node.associate()
        try:
            assert assoc.send_c_store(make_ct(first, generate_uid(), sop_uid)).Status == StoreStatus.SUCCESS
            assert assoc.send_c_store(make_ct(second, generate_uid(), sop_uid,
                                              description="re-filed")).Status == StoreStatus.SUCCESS
        finally:
            assoc.release()
        assert node.index.instance(sop_uid).study_instance_uid == second
        for study in (first, second):
            node.store.set_state(study, 1, EpisodeState.QUEUED, 0.0)
        assert prepare_episode(node.settings, first, 1) is None
        episode = node.store.episode(first, 1)
        assert episode.state is EpisodeState.NOT_ANALYSED
        assert episode.last_error == "not analysed: no instance left: each was re-sent under another study"
        assert prepare_episode(node.settings, second, 1) is not None
        assert node.store.episode(second, 1).state is EpisodeState.PREPARED
