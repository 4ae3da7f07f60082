"""Group commit of arrivals (issue 21): concurrent associations share one directory fsync and one SQLite commit
per batch, and each C-STORE is still answered only once its own file, directory entry and index row are durable.

Before: one index lock held across each arrival's rename, directory fsync and SQLite commit, so eight associations
queued on it one instance at a time; every arrival was committed in the thread that received it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from node_helpers import make_ct, node_settings, running_node, wait_for
from pydicom.uid import generate_uid

from dicom_node.index import Arrival, Index, InstanceRecord
from dicom_node.statuses import StoreStatus
from state.store import StateStore

STUDY = "1.2.826.0.1.3680043.8.498.21"


class PlaceFailedError(Exception):
    """The file of one arrival could not be made visible."""


def record(sop: str, sha: str | None = None) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.1", patient_id="P",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="X",
        peer_address="127.0.0.1", size_bytes=1, sha256=sha or f"sha-{sop}", path=f"{STUDY}/{sop}.dcm",
        received_at=1000.0,
    )


@pytest.fixture
def store(tmp_path: Path):
    store = StateStore(tmp_path / "index.sqlite")
    yield store
    store.close()


def test_arrivals_queued_behind_a_commit_are_committed_together_in_one_batch(store, tmp_path):
    """The first arrival's place() holds its batch open until seven more arrivals are on their way; they are then
    committed as later batches, each led by one of their threads: some arrival is placed by another thread."""
    index = Index(store)
    directory = tmp_path / "series"
    directory.mkdir()
    started, release = threading.Event(), threading.Event()
    callers = threading.Semaphore(0)
    placed_by: dict[str, int] = {}
    called_by: dict[str, int] = {}

    def arrive(sop: str, first: bool = False) -> Arrival:
        called_by[sop] = threading.get_ident()

        def place() -> Path:
            placed_by[sop] = threading.get_ident()
            if first:
                started.set()
                assert release.wait(30)
            return directory

        if not first:
            callers.release()
        return index.record_instance(record(sop), place, lambda _path: False).kind

    with ThreadPoolExecutor(max_workers=8) as pool:
        first = pool.submit(arrive, "1.0", True)
        assert started.wait(30)
        others = [pool.submit(arrive, f"1.{n}") for n in range(1, 8)]
        for _ in others:
            assert callers.acquire(timeout=30)
        release.set()
        kinds = [first.result(timeout=30)] + [future.result(timeout=30) for future in others]
    assert kinds == [Arrival.NEW] * 8
    assert index.count_instances() == 8
    assert store.episode(STUDY, 1).received == 8
    assert placed_by["1.0"] == called_by["1.0"]
    assert any(placed_by[sop] != called_by[sop] for sop in placed_by), "every arrival was committed on its own"


def test_a_failing_place_in_a_batch_fails_only_its_own_arrival(store, tmp_path):
    index = Index(store)
    directory = tmp_path / "series"
    directory.mkdir()
    started, release = threading.Event(), threading.Event()
    callers = threading.Semaphore(0)

    def arrive(sop: str) -> Arrival:
        def place() -> Path:
            if sop == "1.0":
                started.set()
                assert release.wait(30)
            if sop == "1.3":
                raise PlaceFailedError("no space left on device")
            return directory

        if sop != "1.0":
            callers.release()
        return index.record_instance(record(sop), place, lambda _path: False).kind

    with ThreadPoolExecutor(max_workers=6) as pool:
        first = pool.submit(arrive, "1.0")
        assert started.wait(30)
        others = {sop: pool.submit(arrive, sop) for sop in ("1.1", "1.2", "1.3", "1.4", "1.5")}
        for _ in others:
            assert callers.acquire(timeout=30)
        release.set()
        assert first.result(timeout=30) is Arrival.NEW
        with pytest.raises(PlaceFailedError, match="no space left"):
            others["1.3"].result(timeout=30)
        assert [others[sop].result(timeout=30) for sop in ("1.1", "1.2", "1.4", "1.5")] == [Arrival.NEW] * 4
    assert index.instance("1.3") is None
    assert index.count_instances() == 5
    assert store.episode(STUDY, 1).received == 5


def test_a_directory_that_cannot_be_fsynced_fails_the_batch_and_records_nothing(store, tmp_path):
    index = Index(store)
    with pytest.raises(FileNotFoundError):
        index.record_instance(record("1.1"), lambda: tmp_path / "gone", lambda _path: False)
    assert index.instance("1.1") is None
    assert store.episodes() == []


def test_every_success_over_eight_associations_has_its_file_and_committed_row_on_disk(tmp_path):
    """Eight associations at once: right after each Success, before the next C-STORE, the file is under its final
    name with the bytes sent and its row is read by a connection of its own (committed, not only in a batch)."""
    per_association, associations = 12, 8
    with running_node(node_settings(tmp_path / "home", study_idle_seconds=60)) as node:
        study = generate_uid()

        def send(number: int) -> int:
            checked, series = 0, generate_uid()  # one series per association: batches share directories
            assoc = node.associate()
            assert assoc.is_established
            db = sqlite3.connect(node.settings.index_path)
            try:
                for position in range(per_association):
                    ds = make_ct(study, series, position=float(position),
                                 instance_number=number * per_association + position + 1)
                    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
                    row = db.execute("SELECT path, sha256 FROM instances WHERE sop_instance_uid = ?",
                                     (ds.SOPInstanceUID,)).fetchone()
                    assert row is not None, "Success before the index row was committed"
                    stored = (node.spool.root / row[0]).read_bytes()
                    assert hashlib.sha256(stored).hexdigest() == row[1]
                    assert stored.endswith(bytes(ds.PixelData))
                    checked += 1
            finally:
                db.close()
                assoc.release()
            return checked

        with ThreadPoolExecutor(max_workers=associations) as pool:
            assert sum(pool.map(send, range(associations))) == per_association * associations
        wait_for(lambda: node.index.count_instances() == per_association * associations, what="every row")
        assert list(node.spool.tmp_dir.iterdir()) == []
