"""The pipeline's state store: study episodes, their deliveries, dead letters and task runs (``index.sqlite``).

It shares the database of the DICOM node's instance index (state/database.py, dicom_node/index.py): an arrival
opens or extends its episode (:meth:`StateStore.episode_for_arrival`) inside the index's transaction that writes the
instance row, so an instance is never stored without its episode, nor an episode opened for an instance that was
not stored. It lives in ``state/``, below ``dicom_node`` and above ``core``, because the node and the workers both
write it (state/__init__.py).

Episode life cycle: ``receiving`` (instances arriving) → ``ready`` (idle for ``study_idle_seconds``; waits in
the outbox) → ``queued`` (handed off, or being handed off when ``published_at`` is NULL) → ``preparing`` (claimed
by the prepare task) → ``prepared`` (manifest written, inference requested) → ``reported`` (outputs in the
outbox, one delivery row per destination) → ``delivered`` (every delivery done), or ``failed`` (a stage gave up:
see the dead-letter table), or ``not-analysed`` (the analysis gate let nothing through). The next episode of a
study waits while one is ``queued``, ``preparing`` or ``prepared`` (``IN_FLIGHT_STATES``).

Deliveries: one row per (episode, output set, kind, destination), ``pending`` → ``done``, ``dead`` or ``skipped``;
the output set is the episode's draft (``draft``, the rows that make the episode ``delivered``) or a version the
radiologists signed on the worklist (``signed:<n>``, core/states.py). Dead letters: one row
per task that failed for good (after its last retry, or at once for a permanent error), with the task name and
its arguments so ``raddraft retry`` can publish it again. Task runs: one row per run of a stage and its outcome.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.states import DRAFT_OUTPUT, DeliveryState, EpisodeState
from state.database import Database

log = logging.getLogger(__name__)

# An episode in one of these states blocks the hand-off of the next episode of the same study: the next one starts
# once this one's outputs are in the outbox (reported), so that its report can supersede them.
IN_FLIGHT_STATES: tuple[EpisodeState, ...] = (EpisodeState.QUEUED, EpisodeState.PREPARING, EpisodeState.PREPARED)
# New instances join the latest episode of a study while it is in one of these states (not yet handed off).
OPEN_STATES: tuple[EpisodeState, ...] = (EpisodeState.RECEIVING, EpisodeState.READY)

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS episodes_by_opened ON episodes (opened_at, study_instance_uid, episode_id);
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
    output_set         TEXT NOT NULL DEFAULT 'draft',
    kind               TEXT NOT NULL,
    destination        TEXT NOT NULL,
    state              TEXT NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    created_at         REAL NOT NULL,
    done_at            REAL,
    last_error         TEXT,
    PRIMARY KEY (study_instance_uid, episode_id, output_set, kind, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state);
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
"""
# An index.sqlite written before deliveries had an output set: SQLite cannot change a primary key in place, so
# the table is rebuilt (create, copy, drop, rename) in the transaction that opens the store; its rows are drafts.
_DELIVERIES_BEFORE_OUTPUT_SETS = (
    "CREATE TABLE deliveries_with_output_set (" + _SCHEMA.split("CREATE TABLE IF NOT EXISTS deliveries (", 1)[1]
    .split(");", 1)[0] + ")",
    "INSERT INTO deliveries_with_output_set (study_instance_uid, episode_id, output_set, kind, destination, state, "
    "attempts, created_at, done_at, last_error) SELECT study_instance_uid, episode_id, 'draft', kind, destination, "
    "state, attempts, created_at, done_at, last_error FROM deliveries",
    "DROP TABLE deliveries",
    "ALTER TABLE deliveries_with_output_set RENAME TO deliveries",
)


@dataclass(frozen=True)
class Episode:
    study_instance_uid: str
    episode_id: int
    state: EpisodeState
    opened_at: float
    last_received_at: float
    received: int
    queued_at: float | None
    published_at: float | None
    attempts: int
    last_error: str | None

    @property
    def task_id(self) -> str:
        return f"prepare-{self.study_instance_uid}-{self.episode_id}"


@dataclass(frozen=True)
class DeliveryKey:
    """Which delivery: one output set (``draft``, or ``signed:<n>``) of one episode to one destination (``kind``
    ``dicom`` or ``hl7``)."""

    study_instance_uid: str
    episode_id: int
    kind: str
    destination: str
    output_set: str = DRAFT_OUTPUT

    def sql(self) -> tuple[str, int, str, str, str]:
        """The values of ``_KEY_WHERE``."""
        return (self.study_instance_uid, self.episode_id, self.output_set, self.kind, self.destination)

    def __str__(self) -> str:
        of = "" if self.output_set == DRAFT_OUTPUT else f" ({self.output_set})"
        return (f"{self.kind} delivery to {self.destination} of study {self.study_instance_uid} "
                f"episode {self.episode_id}{of}")


_KEY_WHERE = "study_instance_uid = ? AND episode_id = ? AND output_set = ? AND kind = ? AND destination = ?"


@dataclass(frozen=True)
class Delivery:
    """The state of one delivery."""

    study_instance_uid: str
    episode_id: int
    kind: str
    destination: str
    state: DeliveryState
    attempts: int
    created_at: float
    done_at: float | None
    last_error: str | None
    output_set: str = DRAFT_OUTPUT

    @property
    def key(self) -> DeliveryKey:
        return DeliveryKey(self.study_instance_uid, self.episode_id, self.kind, self.destination, self.output_set)


@dataclass(frozen=True)
class DeadLetter:
    """A task that failed for good; ``args`` is its JSON argument list, as published."""

    id: int
    task: str
    task_id: str
    args: str
    study_instance_uid: str
    episode_id: int
    error: str
    retries: int
    at: float
    replayed_at: float | None


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(**{**dict(row), "state": DeliveryState(row["state"])})


_EPISODE_COLUMNS = (
    "study_instance_uid, episode_id, state, opened_at, last_received_at, received, queued_at, published_at, "
    "attempts, last_error"
)


# The queries of ``raddraft status`` over the episodes (tests/test_node_index_growth.py checks their plans).
RECENT_EPISODES = (f"SELECT {_EPISODE_COLUMNS} FROM episodes ORDER BY opened_at DESC, study_instance_uid DESC, "
                   "episode_id DESC LIMIT ?")
EPISODE_TOTALS = "SELECT state, COUNT(*) AS n FROM episodes GROUP BY state"
# an arrival's episode (episode_for_arrival)
LATEST_EPISODE = "SELECT episode_id, state FROM episodes WHERE study_instance_uid = ? ORDER BY episode_id DESC LIMIT 1"


def _episode(row: sqlite3.Row) -> Episode:
    return Episode(
        study_instance_uid=row["study_instance_uid"],
        episode_id=row["episode_id"],
        state=EpisodeState(row["state"]),
        opened_at=row["opened_at"],
        last_received_at=row["last_received_at"],
        received=row["received"],
        queued_at=row["queued_at"],
        published_at=row["published_at"],
        attempts=row["attempts"],
        last_error=row["last_error"],
    )


class StateStore:
    """The pipeline's state in the database at *path* (``index.sqlite``), which it opens and owns."""

    def __init__(self, path: Path) -> None:
        self.database = Database(path)
        with self.database.transaction() as db:
            columns = [row["name"] for row in db.execute("PRAGMA table_info(deliveries)")]
            if columns and "output_set" not in columns:
                for statement in _DELIVERIES_BEFORE_OUTPUT_SETS:
                    db.execute(statement)
                log.info("%s: the deliveries table has an output set now (its rows are drafts)", path)
        self.database.create(_SCHEMA)

    def close(self) -> None:
        self.database.close()

    # --- arrivals (called by the instance index, inside its transaction) -------------------------------------
    @staticmethod
    def episode_for_arrival(db: sqlite3.Connection, study_uid: str, now: float) -> tuple[int, bool]:
        """The episode an instance of *study_uid* arriving at *now* belongs to, and whether it is new.

        Runs on *db* inside the caller's open transaction (the instance index's arrival, dicom_node/index.py), so
        the episode is opened or extended atomically with the instance row: the latest episode is joined while it
        is open (``receiving`` or ``ready``, it goes back to ``receiving``); otherwise the next one is opened.
        """
        if not db.in_transaction:
            raise RuntimeError("an arrival's episode is opened inside the transaction that stores its instance")
        latest = db.execute(LATEST_EPISODE, (study_uid,)).fetchone()
        if latest is not None and latest["state"] in OPEN_STATES:
            db.execute(
                "UPDATE episodes SET state = ?, last_received_at = ?, received = received + 1, closed_at = NULL "
                "WHERE study_instance_uid = ? AND episode_id = ?",
                (EpisodeState.RECEIVING, now, study_uid, latest["episode_id"]),
            )
            return latest["episode_id"], False
        episode_id = 1 if latest is None else latest["episode_id"] + 1
        db.execute(
            "INSERT INTO episodes (study_instance_uid, episode_id, state, opened_at, last_received_at, received) "
            "VALUES (?, ?, ?, ?, ?, 1)",
            (study_uid, episode_id, EpisodeState.RECEIVING, now, now),
        )
        return episode_id, True

    # --- episodes and hand-off --------------------------------------------------------------------------------
    def episode(self, study_uid: str, episode_id: int) -> Episode | None:
        with self.database.reading() as db:
            row = db.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM episodes WHERE study_instance_uid = ? AND episode_id = ?",
                (study_uid, episode_id),
            ).fetchone()
        return None if row is None else _episode(row)

    def episodes(self) -> list[Episode]:
        with self.database.reading() as db:
            rows = db.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM episodes ORDER BY opened_at, study_instance_uid, episode_id"
            ).fetchall()
        return [_episode(row) for row in rows]

    def recent_episodes(self, limit: int) -> list[Episode]:
        """The *limit* most recently opened episodes, oldest of them first (read through ``episodes_by_opened``)."""
        with self.database.reading() as db:
            rows = db.execute(RECENT_EPISODES, (limit,)).fetchall()
        return [_episode(row) for row in reversed(rows)]

    def episode_totals(self) -> dict[str, int]:
        """Episodes per state (counted in ``episodes_by_state``, not in the table)."""
        with self.database.reading() as db:
            rows = db.execute(EPISODE_TOTALS).fetchall()
        return {row["state"]: int(row["n"]) for row in rows}

    def close_idle_episodes(self, now: float, idle_seconds: float) -> list[Episode]:
        """Move episodes with no arrival for *idle_seconds* from ``receiving`` to ``ready``."""
        with self.database.transaction() as db:
            rows = db.execute(
                f"UPDATE episodes SET state = ?, closed_at = ? WHERE state = ? AND last_received_at <= ? "
                f"RETURNING {_EPISODE_COLUMNS}",
                (EpisodeState.READY, now, EpisodeState.RECEIVING, now - idle_seconds),
            ).fetchall()
        return [_episode(row) for row in rows]

    def queue_ready_episodes(self, now: float) -> list[Episode]:
        """Put ``ready`` episodes in the outbox unless an episode of the same study is still in flight."""
        in_flight = ", ".join("?" for _ in IN_FLIGHT_STATES)
        with self.database.transaction() as db:
            rows = db.execute(
                f"UPDATE episodes SET state = ?, queued_at = ?, published_at = NULL, next_attempt_at = ? "
                f"WHERE state = ? AND NOT EXISTS (SELECT 1 FROM episodes AS other "
                f"WHERE other.study_instance_uid = episodes.study_instance_uid "
                f"AND other.episode_id <> episodes.episode_id AND other.state IN ({in_flight})) "
                f"RETURNING {_EPISODE_COLUMNS}",
                (EpisodeState.QUEUED, now, now, EpisodeState.READY, *IN_FLIGHT_STATES),
            ).fetchall()
        return [_episode(row) for row in rows]

    def due_handoffs(self, now: float) -> list[Episode]:
        """Queued episodes not yet accepted by the broker whose next attempt is due (the outbox)."""
        with self.database.reading() as db:
            rows = db.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM episodes WHERE published_at IS NULL AND next_attempt_at <= ? "
                f"AND state = ? ORDER BY queued_at",
                (now, EpisodeState.QUEUED),
            ).fetchall()
        return [_episode(row) for row in rows]

    def mark_published(self, study_uid: str, episode_id: int, now: float) -> None:
        with self.database.transaction() as db:
            db.execute(
                "UPDATE episodes SET published_at = ?, attempts = attempts + 1, last_error = NULL "
                "WHERE study_instance_uid = ? AND episode_id = ?",
                (now, study_uid, episode_id),
            )

    def mark_publish_failed(self, study_uid: str, episode_id: int, retry_at: float, error: str) -> None:
        with self.database.transaction() as db:
            db.execute(
                "UPDATE episodes SET next_attempt_at = ?, attempts = attempts + 1, last_error = ? "
                "WHERE study_instance_uid = ? AND episode_id = ?",
                (retry_at, error, study_uid, episode_id),
            )

    def requeue_after_restart(self, now: float, reset_claimed: bool) -> int:
        """Put episodes a previous run handed off back in the outbox; with *reset_claimed* also unclaim them.

        Use *reset_claimed* only when no worker outside this process can still be running a claimed episode
        (the embedded broker with its in-process worker).
        """
        states = [EpisodeState.QUEUED] + ([EpisodeState.PREPARING] if reset_claimed else [])
        marks = ", ".join("?" for _ in states)
        with self.database.transaction() as db:
            cursor = db.execute(
                f"UPDATE episodes SET state = ?, published_at = NULL, next_attempt_at = ?, claimed_at = NULL "
                f"WHERE state IN ({marks})",
                (EpisodeState.QUEUED, now, *states),
            )
            return cursor.rowcount

    def claim(self, study_uid: str, episode_id: int, now: float, stale_after: float) -> bool:
        """Atomically move a queued episode to ``preparing``; False if it is not queued (already claimed/done).

        A claim older than *stale_after* seconds (a worker that died without giving it back) may be taken over.
        """
        with self.database.transaction() as db:
            cursor = db.execute(
                "UPDATE episodes SET state = ?, claimed_at = ? WHERE study_instance_uid = ? AND episode_id = ? "
                "AND (state = ? OR (state = ? AND claimed_at < ?))",
                (EpisodeState.PREPARING, now, study_uid, episode_id, EpisodeState.QUEUED, EpisodeState.PREPARING,
                 now - stale_after),
            )
            return cursor.rowcount == 1

    def set_state(self, study_uid: str, episode_id: int, state: EpisodeState, now: float, *,
                  error: str | None = None, task_run: tuple[str, str] | None = None) -> None:
        """Set an episode's state; *task_run* ``(task, outcome)`` is recorded in the same transaction."""
        with self.database.transaction() as db:
            cursor = db.execute(
                "UPDATE episodes SET state = ?, finished_at = ?, last_error = ? "
                "WHERE study_instance_uid = ? AND episode_id = ?",
                (state, now, error, study_uid, episode_id),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"episode {episode_id} of study {study_uid} is not in the store")
            if task_run is not None:
                db.execute(
                    "INSERT INTO task_runs (task, study_instance_uid, episode_id, outcome, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (task_run[0], study_uid, episode_id, task_run[1], now),
                )

    def advance(self, study_uid: str, episode_id: int, allowed: tuple[EpisodeState, ...], state: EpisodeState,
                now: float, *, error: str | None = None, task_run: tuple[str, str] | None = None) -> bool:
        """Compare-and-set: move the episode to *state* only if it is in one of *allowed*; False otherwise."""
        marks = ", ".join("?" for _ in allowed)
        with self.database.transaction() as db:
            cursor = db.execute(
                f"UPDATE episodes SET state = ?, finished_at = ?, last_error = ? "
                f"WHERE study_instance_uid = ? AND episode_id = ? AND state IN ({marks})",
                (state, now, error, study_uid, episode_id, *allowed),
            )
            if cursor.rowcount == 1 and task_run is not None:
                db.execute(
                    "INSERT INTO task_runs (task, study_instance_uid, episode_id, outcome, at) VALUES (?, ?, ?, ?, ?)",
                    (task_run[0], study_uid, episode_id, task_run[1], now),
                )
            return cursor.rowcount == 1

    # --- deliveries -------------------------------------------------------------------------------------------
    def add_deliveries(self, study_uid: str, episode_id: int, targets: list[tuple[str, str]], now: float,
                       output_set: str = DRAFT_OUTPUT) -> list[Delivery]:
        """Create the ``(kind, destination)`` delivery rows of *output_set* that do not exist yet; return every row
        of the episode's *output_set*."""
        with self.database.transaction() as db:
            for kind, destination in targets:
                db.execute(
                    "INSERT OR IGNORE INTO deliveries (study_instance_uid, episode_id, output_set, kind, destination, "
                    "state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (study_uid, episode_id, output_set, kind, destination, DeliveryState.PENDING, now),
                )
        return self.deliveries(study_uid, episode_id, output_set)

    def deliveries(self, study_uid: str | None = None, episode_id: int | None = None, output_set: str | None = None,
                   *, state: DeliveryState | None = None) -> list[Delivery]:
        """Delivery rows: of one episode when *study_uid* and *episode_id* are given, of one output set when
        *output_set* is, in one *state* when it is."""
        where, values = [], []
        if study_uid is not None:
            where.append("study_instance_uid = ? AND episode_id = ?")
            values += [study_uid, episode_id]
        if output_set is not None:
            where.append("output_set = ?")
            values.append(output_set)
        if state is not None:
            where.append("state = ?")
            values.append(str(state))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        order = "created_at, " if study_uid is None else ""
        with self.database.reading() as db:
            rows = db.execute(f"SELECT * FROM deliveries {clause}ORDER BY {order}output_set, kind, destination",
                              values).fetchall()
        return [_delivery(row) for row in rows]

    def unfinished_deliveries(self) -> list[Delivery]:
        """Every delivery not ``done`` nor ``skipped`` (pending or dead: what is in flight or needs someone),
        oldest first; read through ``deliveries_by_state``, not the history of finished ones."""
        unfinished = [str(s) for s in DeliveryState if s not in (DeliveryState.DONE, DeliveryState.SKIPPED)]
        marks = ", ".join("?" * len(unfinished))  # IN, not NOT IN: SQLite searches an index only for the former
        with self.database.reading() as db:
            rows = db.execute(f"SELECT * FROM deliveries WHERE state IN ({marks}) ORDER BY created_at, output_set, "
                              "kind, destination", unfinished).fetchall()
        return [_delivery(row) for row in rows]

    def delivery(self, key: DeliveryKey) -> Delivery | None:
        with self.database.reading() as db:
            row = db.execute(f"SELECT * FROM deliveries WHERE {_KEY_WHERE}", key.sql()).fetchone()
        return None if row is None else _delivery(row)

    def finish_delivery(self, key: DeliveryKey, state: DeliveryState, now: float, error: str | None = None, *,
                        attempted: bool = True) -> bool:
        """Record a delivery's end (*attempted*: it ends an attempt not counted yet; a dead letter of an attempt
        already counted by :meth:`note_delivery_error` passes False); when every draft delivery of a ``reported``
        episode is done, the episode becomes ``delivered`` in the same transaction (returned True). A signed
        version's deliveries never move the episode."""
        with self.database.transaction() as db:
            cursor = db.execute(
                f"UPDATE deliveries SET state = ?, attempts = attempts + ?, done_at = ?, last_error = ? "
                f"WHERE {_KEY_WHERE}",
                (state, int(attempted), now if state is DeliveryState.DONE else None, error, *key.sql()),
            )
            if cursor.rowcount != 1:
                raise KeyError(f"{key} is not in the store")
            if key.output_set != DRAFT_OUTPUT:
                return False
            study_uid, episode_id = key.study_instance_uid, key.episode_id
            open_rows = db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE study_instance_uid = ? AND episode_id = ? AND output_set = ? "
                "AND state NOT IN (?, ?)",
                (study_uid, episode_id, DRAFT_OUTPUT, DeliveryState.DONE, DeliveryState.SKIPPED),
            ).fetchone()[0]
            if open_rows:
                return False
            moved = db.execute(
                "UPDATE episodes SET state = ?, finished_at = ?, last_error = NULL "
                "WHERE study_instance_uid = ? AND episode_id = ? AND state IN (?, ?)",
                (EpisodeState.DELIVERED, now, study_uid, episode_id, EpisodeState.REPORTED, EpisodeState.FAILED),
            )
            return moved.rowcount == 1

    def import_deliveries(self, rows: list[Delivery]) -> int:
        """Add *rows* as they are, keeping a row of the same key that is already here (the worklist's signed
        deliveries, copied once from the table it kept them in); returns how many were added."""
        with self.database.transaction() as db:
            added = 0
            for row in rows:
                added += db.execute(
                    "INSERT OR IGNORE INTO deliveries (study_instance_uid, episode_id, output_set, kind, destination, "
                    "state, attempts, created_at, done_at, last_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row.key.sql(), str(row.state), row.attempts, row.created_at, row.done_at, row.last_error),
                ).rowcount
            return added

    def note_delivery_error(self, key: DeliveryKey, error: str) -> None:
        """Count a failed attempt that will be retried (the row stays ``pending``)."""
        with self.database.transaction() as db:
            db.execute(f"UPDATE deliveries SET attempts = attempts + 1, last_error = ? WHERE {_KEY_WHERE}",
                       (error, *key.sql()))

    def reopen_delivery(self, key: DeliveryKey) -> None:
        """A dead delivery being re-played goes back to ``pending``."""
        with self.database.transaction() as db:
            db.execute(f"UPDATE deliveries SET state = ? WHERE {_KEY_WHERE} AND state = ?",
                       (DeliveryState.PENDING, *key.sql(), DeliveryState.DEAD))

    # --- dead letters -----------------------------------------------------------------------------------------
    def add_dead_letter(self, task: str, task_id: str, args: str, *, study_uid: str, episode_id: int, error: str,
                        retries: int, now: float) -> int:
        with self.database.transaction() as db:
            cursor = db.execute(
                "INSERT INTO dead_letters (task, task_id, args, study_instance_uid, episode_id, error, retries, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task, task_id, args, study_uid, episode_id, error, retries, now),
            )
            return int(cursor.lastrowid or 0)

    def dead_letters(self, include_replayed: bool = False) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE replayed_at IS NULL "
        with self.database.reading() as db:
            rows = db.execute(f"SELECT * FROM dead_letters {where}ORDER BY id").fetchall()
        return [DeadLetter(**dict(row)) for row in rows]

    def mark_replayed(self, dead_letter_id: int, now: float) -> bool:
        """Mark a dead letter re-played; False if it does not exist or was re-played already."""
        with self.database.transaction() as db:
            cursor = db.execute("UPDATE dead_letters SET replayed_at = ? WHERE id = ? AND replayed_at IS NULL",
                                (now, dead_letter_id))
            return cursor.rowcount == 1

    # --- task runs (observability and tests) ------------------------------------------------------------------
    def record_task_run(self, task: str, study_uid: str, episode_id: int, outcome: str, now: float) -> None:
        with self.database.transaction() as db:
            db.execute(
                "INSERT INTO task_runs (task, study_instance_uid, episode_id, outcome, at) VALUES (?, ?, ?, ?, ?)",
                (task, study_uid, episode_id, outcome, now),
            )

    def task_runs(self, study_uid: str, episode_id: int, task: str | None = None) -> list[tuple[str, str]]:
        """(task, outcome) of every run for the episode (of *task* only, when given), oldest first."""
        with self.database.reading() as db:
            rows = db.execute(
                "SELECT task, outcome FROM task_runs WHERE study_instance_uid = ? AND episode_id = ? ORDER BY id",
                (study_uid, episode_id),
            ).fetchall()
        return [(row["task"], row["outcome"]) for row in rows if task is None or row["task"] == task]

    def runs_of(self, tasks: tuple[str, ...]) -> list[tuple[str, str, int, str]]:
        """(task, study UID, episode id, outcome) of every run of *tasks*, oldest first."""
        marks = ", ".join("?" for _ in tasks)
        with self.database.reading() as db:
            rows = db.execute(
                f"SELECT task, study_instance_uid, episode_id, outcome FROM task_runs WHERE task IN ({marks}) "
                "ORDER BY id", tasks).fetchall()
        return [(row["task"], row["study_instance_uid"], row["episode_id"], row["outcome"]) for row in rows]


def episode_state_counts(path: Path) -> Callable[[], Mapping[str, int]]:
    """A source of ``{episode state: number of episodes}`` read from the store at *path* at each call (the
    studies-by-state gauge of core/metrics.py); {} before the database exists."""

    def count() -> Mapping[str, int]:
        if not path.is_file():
            return {}
        store = StateStore(path)
        try:
            return Tally(str(episode.state) for episode in store.episodes())
        finally:
            store.close()

    return count
