"""The DICOM node's index of received instances and its counters, in ``index.sqlite``.

The instances table (one row per SOP instance: where its file is, its digest, the episode it arrived in) and
``node_counters`` (what the node turned away or stored once: rejected presentation contexts, identical re-sends,
refused instances, for ``raddraft status``). The pipeline's state (episodes, deliveries, dead letters, task runs)
is the state store's (state/store.py); both keep their tables in the one database of the store
(state/database.py), so an arrival stores its instance row and opens or extends its episode
(:meth:`state.store.StateStore.episode_for_arrival`) in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

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


class Index:
    """Thread-safe access to the instance index, in the database of *store* (whose episodes arrivals open)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._database = store.database
        self._database.create(_SCHEMA)

    # --- instances -------------------------------------------------------------------------------------------
    def record_instance(
        self, record: InstanceRecord, place: Callable[[], None], is_duplicate: Callable[[str], bool], *,
        opens_episode: bool = True,
    ) -> ArrivalOutcome:
        """Record an arrival in one transaction; *place* makes the file visible just before the commit.

        *is_duplicate(stored_path)* is asked when the stored instance has the same sha256; if it answers True
        nothing is written and *place* is not called. If *place* raises, nothing is recorded. An instance that
        does not *open_episode* (an AI/derived object) is stored with episode :data:`NO_EPISODE`: it opens no
        episode and neither joins nor extends the study's open one, nor re-opens a handed-off one.
        """
        with self._database.transaction() as db:
            existing = db.execute(
                "SELECT sha256, path FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,)
            ).fetchone()
            if existing is not None and existing["sha256"] == record.sha256 and is_duplicate(existing["path"]):
                current = db.execute(
                    "SELECT episode_id FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,)
                ).fetchone()
                return ArrivalOutcome(Arrival.DUPLICATE, current["episode_id"], new_episode=False)
            if opens_episode:
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
            place()
        if existing is None:
            return ArrivalOutcome(Arrival.NEW, episode_id, new_episode)
        return ArrivalOutcome(Arrival.REPLACED, episode_id, new_episode, previous_path=existing["path"])

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._database.reading() as db:
            row = db.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
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
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def count_instances_without_episode(self) -> int:
        """Instances stored without analysis: the AI/derived objects (episode :data:`NO_EPISODE`)."""
        with self._database.reading() as db:
            return int(db.execute("SELECT COUNT(*) FROM instances WHERE episode_id = ?",
                                  (NO_EPISODE,)).fetchone()[0])

    def study_counts(self) -> dict[str, tuple[int, int]]:
        """Study UID → (instances, series) over all episodes."""
        with self._database.reading() as db:
            rows = db.execute(
                "SELECT study_instance_uid, COUNT(*) AS n, COUNT(DISTINCT series_instance_uid) AS s "
                "FROM instances GROUP BY study_instance_uid"
            ).fetchall()
        return {row["study_instance_uid"]: (row["n"], row["s"]) for row in rows}

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
