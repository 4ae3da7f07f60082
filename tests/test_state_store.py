"""The pipeline's state store (state/store.py) and the DICOM node's instance index (dicom_node/index.py) in one
database: an arrival stores its instance and opens its episode in one transaction, an index.sqlite written
before the two were split opens unchanged, and the episode state machine has no state that nothing sets."""

from __future__ import annotations

import ast
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.states import DeliveryState, EpisodeState, signed_output, signed_version
from dicom_node.index import Arrival, Index, InstanceRecord
from state.store import IN_FLIGHT_STATES, DeliveryKey, StateStore

STUDY = "1.2.826.0.1.3680043.10.7"

# index.sqlite as dicom_node/index.py created it before the pipeline's state moved to state/store.py
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_id          TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae          TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    path                TEXT NOT NULL,
    received_at         REAL NOT NULL,
    episode_id          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid, episode_id);
CREATE TABLE IF NOT EXISTS episodes (
    study_instance_uid TEXT NOT NULL,
    episode_id         INTEGER NOT NULL,
    state              TEXT NOT NULL,
    opened_at          REAL NOT NULL,
    last_received_at   REAL NOT NULL,
    received           INTEGER NOT NULL DEFAULT 0,
    closed_at          REAL,
    queued_at          REAL,
    published_at       REAL,
    next_attempt_at    REAL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    claimed_at         REAL,
    finished_at        REAL,
    last_error         TEXT,
    PRIMARY KEY (study_instance_uid, episode_id)
);
CREATE INDEX IF NOT EXISTS episodes_by_state ON episodes (state);
CREATE TABLE IF NOT EXISTS task_runs (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    task               TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    episode_id         INTEGER NOT NULL,
    outcome            TEXT NOT NULL,
    at                 REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    study_instance_uid TEXT NOT NULL,
    episode_id         INTEGER NOT NULL,
    kind               TEXT NOT NULL,
    destination        TEXT NOT NULL,
    state              TEXT NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    created_at         REAL NOT NULL,
    done_at            REAL,
    last_error         TEXT,
    PRIMARY KEY (study_instance_uid, episode_id, kind, destination)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    task               TEXT NOT NULL,
    task_id            TEXT NOT NULL,
    args               TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    episode_id         INTEGER NOT NULL,
    error              TEXT NOT NULL,
    retries            INTEGER NOT NULL,
    at                 REAL NOT NULL,
    replayed_at        REAL
);
CREATE TABLE IF NOT EXISTS node_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class PlaceFailedError(Exception):
    """The file could not be made visible (a full disk, a rename that failed)."""


def record(sop: str, received_at: float = 1000.0, study: str = STUDY) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=f"{study}.1", patient_id="P",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="X",
        peer_address="127.0.0.1", size_bytes=1, sha256=f"sha-{sop}", path=f"{study}/{sop}.dcm",
        received_at=received_at,
    )


def receive(index: Index, sop: str, received_at: float = 1000.0) -> None:
    index.record_instance(record(sop, received_at), place=lambda: None, is_duplicate=lambda _path: False)


def fail_to_place() -> None:
    raise PlaceFailedError("no space left on device")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path / "index.sqlite")
    yield store
    store.close()


def test_the_index_and_the_store_share_one_database(tmp_path: Path, store: StateStore) -> None:
    index = Index(store)
    receive(index, "1.1")
    assert index.instance("1.1").episode_id == 1
    assert store.episode(STUDY, 1).received == 1
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"instances", "node_counters", "episodes", "deliveries", "dead_letters", "task_runs"} <= tables
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM episodes").fetchone()[0] == 1
    assert {p.name for p in tmp_path.iterdir()} <= {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm"}


def test_a_failing_place_leaves_neither_the_instance_nor_a_new_episode(store: StateStore) -> None:
    index = Index(store)
    with pytest.raises(PlaceFailedError):
        index.record_instance(record("1.1"), place=fail_to_place, is_duplicate=lambda _path: False)
    assert index.count_instances() == 0
    assert store.episodes() == []


def test_a_failing_place_neither_extends_the_open_episode_nor_opens_the_next(store: StateStore) -> None:
    index = Index(store)
    receive(index, "1.1", received_at=1000.0)
    with pytest.raises(PlaceFailedError):
        index.record_instance(record("1.2", received_at=1005.0), place=fail_to_place, is_duplicate=lambda _: False)
    episode = store.episode(STUDY, 1)
    assert (episode.received, episode.last_received_at) == (1, 1000.0)

    store.close_idle_episodes(2000.0, 5.0)
    store.queue_ready_episodes(2000.0)  # handed off: the next arrival would open episode 2
    with pytest.raises(PlaceFailedError):
        index.record_instance(record("1.3", received_at=2001.0), place=fail_to_place, is_duplicate=lambda _: False)
    assert [e.episode_id for e in store.episodes()] == [1]
    assert index.instance("1.3") is None
    receive(index, "1.3", received_at=2002.0)
    assert [e.episode_id for e in store.episodes()] == [1, 2]
    assert index.instance("1.3").episode_id == 2


def test_an_episode_is_opened_for_an_arrival_only_inside_its_transaction(store: StateStore) -> None:
    with store.database.reading() as db, pytest.raises(RuntimeError, match="inside the transaction"):
        store.episode_for_arrival(db, STUDY, 1000.0)
    assert store.episodes() == []


def test_an_index_written_before_the_split_opens_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO instances VALUES ('1.1', ?, ?, 'P', 'c', 't', 'X', '127.0.0.1', 1, 'sha', 'p', 1.0, 1)",
                   (STUDY, f"{STUDY}.1"))
        db.execute("INSERT INTO episodes (study_instance_uid, episode_id, state, opened_at, last_received_at, "
                   "received) VALUES (?, 1, 'reported', 1.0, 1.0, 1)", (STUDY,))
        db.execute("INSERT INTO deliveries (study_instance_uid, episode_id, kind, destination, state, created_at) "
                   "VALUES (?, 1, 'dicom', 'PACS', 'pending', 2.0)", (STUDY,))
        db.execute("INSERT INTO dead_letters (task, task_id, args, study_instance_uid, episode_id, error, retries, "
                   "at) VALUES ('raddraft.deliver', 'id', '[]', ?, 1, 'refused', 8, 3.0)", (STUDY,))
        db.execute("INSERT INTO node_counters VALUES ('identical_resends', 2)")
    db.close()
    store = StateStore(path)
    try:
        index = Index(store)
        assert index.instance("1.1").episode_id == 1
        assert index.study_counts() == {STUDY: (1, 1)}
        assert store.episode(STUDY, 1).state is EpisodeState.REPORTED
        assert [(d.destination, d.output_set) for d in store.deliveries(STUDY, 1)] == [("PACS", "draft")]
        assert [letter.error for letter in store.dead_letters()] == ["refused"]
        # the rebuilt table has the output set in its key: a signed version's row beside the draft's
        store.add_deliveries(STUDY, 1, [("dicom", "PACS")], 3.5, "signed:1")
        assert [d.output_set for d in store.deliveries(STUDY, 1)] == ["draft", "signed:1"]
        assert store.finish_delivery(DeliveryKey(STUDY, 1, "dicom", "PACS"), DeliveryState.DONE, 4.0)
        assert store.episode(STUDY, 1).state is EpisodeState.DELIVERED
        receive(index, "1.2", received_at=5.0)  # the study sent again: episode 2, after the old file's episode 1
        assert index.instance("1.2").episode_id == 2
    finally:
        store.close()


def test_a_resend_byte_for_byte_touches_no_episode(store: StateStore) -> None:
    index = Index(store)
    receive(index, "1.1", received_at=1000.0)
    outcome = index.record_instance(record("1.1", received_at=1003.0), place=fail_to_place,
                                    is_duplicate=lambda _path: True)
    assert outcome.kind is Arrival.DUPLICATE and not outcome.new_episode
    assert store.episode(STUDY, 1).last_received_at == 1000.0


def test_the_last_delivery_done_delivers_the_episode_and_a_dead_letter_is_replayed_once(store: StateStore) -> None:
    index = Index(store)
    receive(index, "1.1")
    store.set_state(STUDY, 1, EpisodeState.REPORTED, 1010.0, task_run=("report", "reported"))
    rows = store.add_deliveries(STUDY, 1, [("dicom", "PACS"), ("hl7", "RIS")], 1010.0)
    assert [(row.kind, row.state) for row in rows] == [("dicom", DeliveryState.PENDING), ("hl7", DeliveryState.PENDING)]
    assert not store.finish_delivery(DeliveryKey(STUDY, 1, "dicom", "PACS"), DeliveryState.DONE, 1011.0)
    assert store.finish_delivery(DeliveryKey(STUDY, 1, "hl7", "RIS"), DeliveryState.SKIPPED, 1012.0, "no HL7")
    assert store.episode(STUDY, 1).state is EpisodeState.DELIVERED
    assert store.task_runs(STUDY, 1) == [("report", "reported")]

    letter = store.add_dead_letter("raddraft.deliver", "t-1", "[]", study_uid=STUDY, episode_id=1, error="refused",
                                   retries=8, now=1013.0)
    assert store.mark_replayed(letter, 1014.0)
    assert not store.mark_replayed(letter, 1015.0)
    assert store.dead_letters() == []
    assert [d.id for d in store.dead_letters(include_replayed=True)] == [letter]


def test_an_index_is_migrated_once_in_one_transaction(tmp_path: Path) -> None:
    """Opening a migrated file (every worker opens the store) changes nothing; a migration that fails half-way
    leaves the old table as it was."""
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO deliveries (study_instance_uid, episode_id, kind, destination, state, attempts, "
                   "created_at, done_at, last_error) VALUES (?, 1, 'hl7', 'RIS', 'dead', 3, 2.0, NULL, 'refused')",
                   (STUDY,))
        db.execute("CREATE TABLE deliveries_with_output_set (x)")  # the rebuild's CREATE TABLE fails
    db.close()
    with pytest.raises(sqlite3.OperationalError):
        StateStore(path)
    with sqlite3.connect(path) as db:
        assert "output_set" not in [row[1] for row in db.execute("PRAGMA table_info(deliveries)")]
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 1
        db.execute("DROP TABLE deliveries_with_output_set")
    db.close()
    for _ in range(2):
        store = StateStore(path)
        try:
            (row,) = store.deliveries()
            assert (row.key, row.state, row.attempts, row.last_error) == (
                DeliveryKey(STUDY, 1, "hl7", "RIS", "draft"), DeliveryState.DEAD, 3, "refused")
        finally:
            store.close()


def test_a_signed_version_has_its_own_deliveries_that_never_move_the_episode(store: StateStore) -> None:
    receive(Index(store), "1.1")
    store.set_state(STUDY, 1, EpisodeState.REPORTED, 1010.0)
    store.add_deliveries(STUDY, 1, [("dicom", "PACS")], 1010.0)
    signed = store.add_deliveries(STUDY, 1, [("dicom", "PACS"), ("hl7", "RIS")], 1011.0, signed_output(2))
    assert [(row.output_set, row.kind) for row in signed] == [("signed:2", "dicom"), ("signed:2", "hl7")]
    for row in signed:
        assert not store.finish_delivery(row.key, DeliveryState.DONE, 1012.0)  # the draft's is still pending
    assert store.episode(STUDY, 1).state is EpisodeState.REPORTED
    pending = [row.key for row in store.deliveries(state=DeliveryState.PENDING)]
    assert pending == [DeliveryKey(STUDY, 1, "dicom", "PACS")]
    assert store.finish_delivery(DeliveryKey(STUDY, 1, "dicom", "PACS"), DeliveryState.DONE, 1013.0)
    assert [row.state for row in store.deliveries(STUDY, 1, "signed:2")] == [DeliveryState.DONE] * 2
    assert signed_version("signed:2") == 2 and signed_version("draft") is None
    with pytest.raises(ValueError, match="must be 'draft' or 'signed:<version>'"):
        signed_version("signed:0")


def test_every_episode_state_is_reached_by_the_pipeline():
    """The state machine has no state that nothing sets (``analysing`` and ``analysed`` were never set, so the
    in-flight rule that named them did not hold the next episode back)."""
    root = Path(__file__).resolve().parent.parent
    used: set[str] = set()
    for path in [*(root / "state").glob("*.py"), *(root / "dicom_node").glob("*.py"),
                 *(root / "workers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "EpisodeState":
                used.add(node.attr)
    declared = {state.name for state in EpisodeState}
    in_flight_only = {state.name for state in IN_FLIGHT_STATES}
    assert declared <= used, declared - used
    assert in_flight_only == {"QUEUED", "PREPARING", "PREPARED"}

