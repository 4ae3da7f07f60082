"""The SQLite database ``index.sqlite``: one connection, its lock and its transactions, no tables.

The DICOM node's instance index (dicom_node/index.py) and the pipeline's state store (state/store.py) keep their
tables in this one file so that an arrival writes its instance row and opens its episode in one transaction.
Each of them creates its own tables (``CREATE TABLE IF NOT EXISTS``) and is the only place that knows their schema.

One connection shared under a lock (pynetdicom runs one thread per association); WAL journal with
``synchronous=FULL`` so a committed row survives a crash. Every write is one short ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class Database:
    """Thread-safe access to one SQLite file (created, with its folder, when missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, schema: str) -> None:
        """Run the ``;``-separated ``CREATE ... IF NOT EXISTS`` statements of *schema* in one transaction."""
        with self.transaction() as db:
            for statement in schema.split(";"):
                if statement.strip():
                    db.execute(statement)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` write transaction under the lock: committed on exit, rolled back on an exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, for reads outside a transaction."""
        with self._lock:
            yield self._db
