"""The index's queries do not grow with its history (issue 21): with 10 000 instances already stored, an arrival's
queries and ``raddraft status``'s read through indexes and touch what they return, not the whole table.

Counted, not timed: SQLite's virtual-machine steps for each query (a progress handler called every step) with
1 000 and with 10 000 instances in the index (the same 100 studies, 10 or 100 instances each) must be the same,
and the plans must search an index. Before: ``status`` grouped every instance by study and counted the table
(``study_counts``, ``count_instances``, ``count_instances_without_episode``: steps × 10 with 10 × the rows).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from node_helpers import node_settings

from dicom_node.index import (
    EXISTING,
    INSTANCE_BY_UID,
    NO_EPISODE,
    STUDIES_WITHOUT_EPISODE,
    STUDY_COUNTS_OF,
    TOTAL,
    Index,
)
from raddraft.commands.status import collect
from state.store import LATEST_EPISODE, RECENT_EPISODES, StateStore

STUDIES = 100


def seed(path: Path, per_study: int) -> None:
    """An index of :data:`STUDIES` studies, one episode each, *per_study* instances each, and one study of AI
    objects only, written as rows (an index written before its totals were kept: opening it computes them)."""
    store = StateStore(path)
    Index(store)
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM instance_totals")
        db.executemany(
            "INSERT INTO episodes (study_instance_uid, episode_id, state, opened_at, last_received_at, received) "
            "VALUES (?, 1, 'delivered', ?, ?, ?)",
            [(f"1.2.{study}", 1000.0 + study, 1000.0 + study, per_study) for study in range(STUDIES)])
        rows = [(f"1.2.{study}.{n}", f"1.2.{study}", f"1.2.{study}.0", "P", "1.2.840.10008.5.1.4.1.1.2",
                 "1.2.840.10008.1.2.1", "X", "127.0.0.1", 1, "sha", f"1.2.{study}/{n}.dcm", 1000.0, 1)
                for study in range(STUDIES) for n in range(per_study)]
        rows.append(("1.3.1", "1.3", "1.3.0", "P", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.1.2.1", "X",
                     "127.0.0.1", 1, "sha", "1.3/1.dcm", 1000.0, NO_EPISODE))
        db.executemany("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()


QUERIES = {  # name: (SQL, parameters)
    "an arrival's stored instance": (EXISTING, ("1.2.50.5",)),
    "an instance by UID": (INSTANCE_BY_UID, ("1.2.50.5",)),
    "an arrival's episode": (LATEST_EPISODE, ("1.2.50",)),
    "status: the recent episodes": (RECENT_EPISODES, (20,)),
    "status: a total": (TOTAL, ("instances",)),
    "status: studies of AI objects only": (STUDIES_WITHOUT_EPISODE, (20,)),
}


def steps(path: Path, sql: str, parameters: tuple) -> int:
    """SQLite VM steps of *sql* (the progress handler runs every step)."""
    db = sqlite3.connect(path)
    counted = [0]

    def step() -> int:
        counted[0] += 1
        return 0

    try:
        db.execute("SELECT 1 FROM instances LIMIT 1").fetchall()  # the schema read, not counted
        db.set_progress_handler(step, 1)
        db.execute(sql, parameters).fetchall()
    finally:
        db.close()
    return counted[0]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> dict[int, Path]:
    paths = {}
    for per_study in (10, 100):
        path = tmp_path_factory.mktemp(f"index{per_study}") / "index.sqlite"
        seed(path, per_study)
        store = StateStore(path)
        Index(store)  # computes the totals once
        store.close()
        paths[per_study * STUDIES] = path
    return paths


@pytest.mark.parametrize("name", QUERIES)
def test_a_query_touches_the_same_rows_with_1000_or_10000_instances(indexes, name):
    sql, parameters = QUERIES[name]
    small, large = steps(indexes[1000], sql, parameters), steps(indexes[10000], sql, parameters)
    assert large == small, f"{name}: {small} steps with 1 000 instances, {large} with 10 000"


def test_a_study_is_counted_through_its_index(indexes):
    """A study's counts grow with that study (the 100 instances it has), not with the other studies."""
    with sqlite3.connect(indexes[10000]) as db:
        plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {STUDY_COUNTS_OF}", ("1.2.5",)))
    db.close()
    assert "USING INDEX instances_by_study" in plan or "USING COVERING INDEX instances_by_study" in plan, plan


def test_the_instance_queries_search_an_index(indexes):
    with sqlite3.connect(indexes[10000]) as db:
        for name, (sql, parameters) in QUERIES.items():
            plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", parameters))
            assert "SCAN instances" not in plan or "INDEX" in plan, f"{name}: {plan}"
    db.close()


def test_status_lists_the_recent_episodes_and_counts_everything(indexes, tmp_path):
    settings = node_settings(tmp_path / "home")
    settings.index_path.parent.mkdir(parents=True, exist_ok=True)
    settings.index_path.write_bytes(indexes[10000].read_bytes())
    document = collect(settings, limit=5)
    assert [row["study_instance_uid"] for row in document["studies"]] == [f"1.2.{n}" for n in range(95, 100)]
    assert all(row["study_instances"] == 100 and row["study_series"] == 1 for row in document["studies"])
    assert document["totals"] == {"delivered": STUDIES}
    assert document["instances"] == 10001
    assert document["node"]["stored_without_analysis"] == 1
    assert document["studies_without_episode"] == ["1.3"]


def test_status_lists_the_unfinished_deliveries_and_those_of_the_listed_episodes_not_the_history(tmp_path):
    """Issue 21 (growth): with 10 000 finished deliveries in the index, ``raddraft status`` lists the deliveries of
    the episodes it lists and every unfinished one (pending, dead) however old (read through
    ``deliveries_by_state``), never the finished history (before: every delivery row ever written)."""
    settings = node_settings(tmp_path)
    seed(settings.index_path, per_study=1)
    with sqlite3.connect(settings.index_path) as db:
        db.executemany(
            "INSERT INTO deliveries (study_instance_uid, episode_id, output_set, kind, destination, state, attempts, "
            "created_at, done_at) VALUES (?, 1, 'draft', 'dicom', ?, ?, 1, ?, ?)",
            [("1.2.0", f"OLD{n}@127.0.0.1:{1000 + n % 60000}", "done", 1.0 + n, 2.0 + n) for n in range(10_000)]
            + [("1.2.1", "PACS@127.0.0.1:104", "dead", 0.5, None),
               ("1.2.99", "PACS@127.0.0.1:104", "done", 3.0, 4.0)])
        plan = " | ".join(row[-1] for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM deliveries WHERE state IN (?, ?)", ("pending", "dead")))
    db.close()
    document = collect(settings, limit=1)  # the most recently opened episode only: study 1.2.99
    listed = [(d["study_instance_uid"], d["state"]) for d in document["deliveries"]]
    assert listed == [("1.2.99", "done"), ("1.2.1", "dead")]
    assert "deliveries_by_state" in plan, plan
