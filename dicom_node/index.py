"""The DICOM node's index of received instances and its counters, in ``index.sqlite``.

The instances table (one row per SOP instance: where its file is, its digest, the episode it arrived in) and
``node_counters`` (what the node turned away or stored once: rejected presentation contexts, identical re-sends,
refused instances, for ``raddraft status``). The pipeline's state (episodes, deliveries, dead letters, task runs)
is the state store's (state/store.py); both keep their tables in the one database of the store
(state/database.py), so an arrival stores its instance row and opens or extends its episode
(:meth:`state.store.StateStore.episode_for_arrival`) in one transaction.

Arrivals are committed in groups (:meth:`Index.record_instance`): the associations that arrive while one batch
is being made durable share the next batch's directory fsyncs and its SQLite commit. ``instance_totals`` keeps the
counts ``raddraft status`` shows, updated in each arrival's transaction, so that reading them does not count the
whole history; the queries of an arrival and of ``status`` read through indexes
(tests/test_node_index_growth.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from core.jsonio import fsync_directory
from state.database import Database
from state.store import StateStore

log = logging.getLogger(__name__)

# The episode_id of an instance that belongs to no episode: an AI/derived object (dicom_node/derived.py), stored
# but never analysed. Episodes count from 1, so such instances are part of every episode's view of the study.
NO_EPISODE = 0


class NodeCounter(StrEnum):
    """What the DICOM node counts in ``node_counters`` for ``raddraft status`` (a separate process)."""

    REJECTED_CONTEXTS = "rejected_presentation_contexts"  # proposed contexts the SCP rejected in negotiation
    IDENTICAL_RESENDS = "identical_resends"  # an instance received again byte for byte: stored once
    REFUSED_INSTANCES = "refused_instances"  # a C-STORE answered with a failure status


_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS instances_by_episode ON instances (episode_id, study_instance_uid);
CREATE TABLE IF NOT EXISTS instance_totals (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as stored in the ``instances`` table."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    size_bytes: int
    sha256: str
    path: str
    received_at: float
    episode_id: int = 0


# Totals kept up to date by each arrival's transaction, so that reading them does not count the whole history;
# the query computes one from the rows (run once, when an index without them is opened).
_TOTALS = {
    "instances": "SELECT COUNT(*) FROM instances",
    "instances_without_episode": f"SELECT COUNT(*) FROM instances WHERE episode_id = {NO_EPISODE}",
}
_ADD_TO_TOTAL = "UPDATE instance_totals SET value = value + ? WHERE name = ?"
# The queries of one arrival and of ``raddraft status`` (tests/test_node_index_growth.py checks their plans).
INSTANCE_BY_UID = "SELECT * FROM instances WHERE sop_instance_uid = ?"
EXISTING = "SELECT sha256, path, episode_id FROM instances WHERE sop_instance_uid = ?"
STUDY_COUNTS_OF = ("SELECT COUNT(*) AS n, COUNT(DISTINCT series_instance_uid) AS s FROM instances "
                   "WHERE study_instance_uid = ?")
STUDIES_WITHOUT_EPISODE = (
    f"SELECT DISTINCT study_instance_uid FROM instances WHERE episode_id = {NO_EPISODE} AND NOT EXISTS "
    "(SELECT 1 FROM episodes WHERE episodes.study_instance_uid = instances.study_instance_uid) "
    "ORDER BY study_instance_uid LIMIT ?"
)
TOTAL = "SELECT value FROM instance_totals WHERE name = ?"


class Arrival(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class ArrivalOutcome:
    kind: Arrival
    episode_id: int
    new_episode: bool
    previous_path: str | None = None


@dataclass(eq=False)
class _Arrival:
    """One arrival waiting in the group commit; *done* is set once its outcome or error is known."""

    record: InstanceRecord
    place: Callable[[], Path | None]
    is_duplicate: Callable[[str], bool]
    opens_episode: bool
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # handed the next batch by the previous leader
    outcome: ArrivalOutcome | None = None
    error: BaseException | None = None


class Index:
    """Thread-safe access to the instance index, in the database of *store* (whose episodes arrivals open).

    Arrivals are committed in groups (:meth:`record_instance`): the associations that arrive while one batch is
    being made durable wait for the next one, which renames all their files, fsyncs each of their directories once
    and commits all their rows in one SQLite transaction (one WAL fsync). Lookups of single instances go through a
    connection of their own (SQLite's WAL lets it read while a batch commits) instead of waiting for the batch.
    """

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._database = store.database
        self._database.create(_SCHEMA)
        with self._database.transaction() as db:  # once, for an index written before the totals were kept
            for name, query in _TOTALS.items():
                db.execute(f"INSERT OR IGNORE INTO instance_totals (name, value) SELECT ?, ({query})", (name,))
        self._queue: list[_Arrival] = []
        self._queue_lock = threading.Lock()
        self._leading = False  # a thread is committing a batch; arrivals meanwhile wait for the next one
        self._reader: Database | None = None
        self._reader_lock = threading.Lock()

    # --- instances -------------------------------------------------------------------------------------------
    def record_instance(
        self, record: InstanceRecord, place: Callable[[], Path | None], is_duplicate: Callable[[str], bool], *,
        opens_episode: bool = True,
    ) -> ArrivalOutcome:
        """Record an arrival durably; *place* makes the file visible before the commit and returns the directory
        whose entry must be fsynced before the commit (None: nothing to fsync).

        Returns once the row is committed: after *place*, the fsync of its directory and the SQLite commit, which
        it may share with arrivals of other associations (group commit). *is_duplicate(stored_path)* is asked
        when the stored instance has the same sha256; if it answers True nothing is written and *place* is not
        called. If *place* raises, nothing is recorded; if the directory fsync or the commit fails, none of the
        batch is recorded and each arrival gets the error (its caller puts its file back). An instance that does
        not *open_episode* (an AI/derived object) is stored with episode :data:`NO_EPISODE`: it opens no episode
        and neither joins nor extends the study's open one, nor re-opens a handed-off one.
        """
        arrival = _Arrival(record, place, is_duplicate, opens_episode)
        with self._queue_lock:
            self._queue.append(arrival)
            leads = not self._leading
            self._leading = True
        if not leads:
            arrival.done.wait()
            if not arrival.lead:
                return self._result(arrival)
        self._lead()
        return self._result(arrival)

    @staticmethod
    def _result(arrival: _Arrival) -> ArrivalOutcome:
        if arrival.error is not None:
            raise arrival.error
        assert arrival.outcome is not None
        return arrival.outcome

    def _lead(self) -> None:
        """Commit every queued arrival as one batch, then hand the next batch to the oldest waiting arrival (each
        thread commits at most one batch, so no association is kept waiting by others' arrivals)."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        try:
            self._commit_batch(batch)
        finally:
            with self._queue_lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].done.set()
                else:
                    self._leading = False
            for arrival in batch:
                arrival.done.set()

    def _commit_batch(self, batch: list[_Arrival]) -> None:
        placed: list[_Arrival] = []
        directories: dict[Path, None] = {}
        try:
            with self._database.transaction() as db:
                for arrival in batch:
                    db.execute("SAVEPOINT arrival")
                    try:
                        arrival.outcome, directory = self._record(db, arrival)
                    except BaseException as exc:  # this arrival only: the batch goes on without it
                        db.execute("ROLLBACK TO arrival")
                        db.execute("RELEASE arrival")
                        arrival.error = exc
                        continue
                    db.execute("RELEASE arrival")
                    placed.append(arrival)
                    if directory is not None:
                        directories[directory] = None
                for directory in directories:
                    fsync_directory(directory)
        except BaseException as exc:  # a directory fsync or the commit failed: nothing of the batch is recorded
            for arrival in placed:
                arrival.outcome, arrival.error = None, exc
            if not isinstance(exc, Exception):
                raise

    def _record(self, db: sqlite3.Connection, arrival: _Arrival) -> tuple[ArrivalOutcome, Path | None]:
        """Write *arrival*'s row (in the batch's open transaction) and place its file; its outcome and the
        directory to fsync."""
        record = arrival.record
        existing = db.execute(EXISTING, (record.sop_instance_uid,)).fetchone()
        if existing is not None and existing["sha256"] == record.sha256 and arrival.is_duplicate(existing["path"]):
            return ArrivalOutcome(Arrival.DUPLICATE, existing["episode_id"], new_episode=False), None
        if arrival.opens_episode:
            episode_id, new_episode = self._store.episode_for_arrival(db, record.study_instance_uid,
                                                                       record.received_at)
        else:
            episode_id, new_episode = NO_EPISODE, False
        db.execute(
            "INSERT OR REPLACE INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, "
            "patient_id, sop_class_uid, transfer_syntax_uid, calling_ae, peer_address, size_bytes, sha256, "
            "path, received_at, episode_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.sop_instance_uid, record.study_instance_uid, record.series_instance_uid,
                record.patient_id, record.sop_class_uid, record.transfer_syntax_uid, record.calling_ae,
                record.peer_address, record.size_bytes, record.sha256, record.path, record.received_at,
                episode_id,
            ),
        )
        was_without = existing is not None and existing["episode_id"] == NO_EPISODE
        db.execute(_ADD_TO_TOTAL, (int(existing is None), "instances"))
        db.execute(_ADD_TO_TOTAL, (int(episode_id == NO_EPISODE) - int(was_without), "instances_without_episode"))
        directory = arrival.place()
        if existing is None:
            return ArrivalOutcome(Arrival.NEW, episode_id, new_episode), directory
        return ArrivalOutcome(Arrival.REPLACED, episode_id, new_episode, previous_path=existing["path"]), directory

    def _reading(self) -> Database:
        """The connection for single-instance lookups, opened on first use."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = Database(self._database.path)
            return self._reader

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._reading().reading() as db:
            row = db.execute(INSTANCE_BY_UID, (sop_instance_uid,)).fetchone()
        return None if row is None else InstanceRecord(**dict(row))

    def instances_for_episode(self, study_uid: str, episode_id: int) -> list[InstanceRecord]:
        """The study's instances as of *episode_id* (received in it or in an earlier episode)."""
        with self._database.reading() as db:
            rows = db.execute(
                "SELECT * FROM instances WHERE study_instance_uid = ? AND episode_id <= ? ORDER BY sop_instance_uid",
                (study_uid, episode_id),
            ).fetchall()
        return [InstanceRecord(**dict(row)) for row in rows]

    def count_instances(self) -> int:
        with self._database.reading() as db:
            return int(db.execute(TOTAL, ("instances",)).fetchone()[0])

    def count_instances_without_episode(self) -> int:
        """Instances stored without analysis: the AI/derived objects (episode :data:`NO_EPISODE`)."""
        with self._database.reading() as db:
            return int(db.execute(TOTAL, ("instances_without_episode",)).fetchone()[0])

    def study_counts(self, study_uids: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
        """Study UID → (instances, series) over all episodes: of *study_uids* (each read through the study's
        index), or of every study when None (reads the whole table: tests and small homes only)."""
        with self._database.reading() as db:
            if study_uids is not None:
                counted = {uid: db.execute(STUDY_COUNTS_OF, (uid,)).fetchone() for uid in study_uids}
                return {uid: (row["n"], row["s"]) for uid, row in counted.items() if row["n"]}
            rows = db.execute(
                "SELECT study_instance_uid, COUNT(*) AS n, COUNT(DISTINCT series_instance_uid) AS s "
                "FROM instances GROUP BY study_instance_uid"
            ).fetchall()
        return {row["study_instance_uid"]: (row["n"], row["s"]) for row in rows}

    def studies_without_episode(self, limit: int) -> list[str]:
        """Up to *limit* studies of which only AI/derived objects were received (no episode), by UID."""
        with self._database.reading() as db:
            return [row[0] for row in db.execute(STUDIES_WITHOUT_EPISODE, (limit,)).fetchall()]

    # --- node counters ----------------------------------------------------------------------------------------
    def add_to_counter(self, counter: NodeCounter, amount: int = 1) -> None:
        """Add *amount* to *counter* (created at 0 on first use)."""
        with self._database.transaction() as db:
            db.execute(
                "INSERT INTO node_counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (str(counter), amount),
            )

    def counters(self) -> dict[NodeCounter, int]:
        """Every counter, 0 for those never added to."""
        with self._database.reading() as db:
            rows = db.execute("SELECT name, value FROM node_counters").fetchall()
        stored = {row["name"]: int(row["value"]) for row in rows}
        return {counter: stored.get(str(counter), 0) for counter in NodeCounter}
