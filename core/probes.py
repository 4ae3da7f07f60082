"""Short, bounded checks of what a raddraft process depends on: the index, the broker, the disk.

Each probe either returns its measurement or raises :class:`ProbeError` with a message naming what failed
(never a password: broker URLs are redacted). ``/healthz`` and ``/metrics`` (``core.http``) use them.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kombu import Connection
from kombu.exceptions import ChannelError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0


class ProbeError(RuntimeError):
    """A dependency is not usable; the message says which and why."""


def redact_url(url: str) -> str:
    """*url* without the user:password part."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def index_readable(path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Open the SQLite index read-only and read its schema; returns the number of schema objects.

    Never creates the file: a missing index is an error.
    """
    if not path.is_file():
        raise ProbeError(f"index {path} does not exist or is not a file")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    except sqlite3.Error as exc:
        raise ProbeError(f"index {path} cannot be opened: {exc}") from exc
    try:
        return int(db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0])
    except sqlite3.Error as exc:
        raise ProbeError(f"index {path} cannot be read: {exc}") from exc
    finally:
        db.close()


def disk_free_mb(path: Path) -> float:
    """Free space, in MiB, of the file system holding *path*."""
    try:
        return shutil.disk_usage(path).free / (1024 * 1024)
    except OSError as exc:
        raise ProbeError(f"free space of {path} cannot be read: {exc}") from exc


def _transport_options(url: str, timeout: float) -> dict[str, Any]:
    if url.startswith("sqla+"):
        # kombu's sqlalchemy transport passes these to sqlalchemy.create_engine
        return {"connect_args": {"timeout": timeout}} if url.startswith("sqla+sqlite") else {}
    return {"socket_connect_timeout": timeout, "socket_timeout": timeout, "max_retries": 0}


def queue_depths(broker_url: str, queues: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, int]:
    """Messages waiting (not yet delivered to a worker) in each queue of the broker.

    Redis: the lengths of the queue's lists (all priority levels); the embedded SQLAlchemy broker: its visible
    rows. A queue that was never declared has 0. Any broker error is a :class:`ProbeError`.
    """
    depths: dict[str, int] = {}
    try:
        with Connection(broker_url, connect_timeout=timeout,
                        transport_options=_transport_options(broker_url, timeout)) as connection:
            connection.ensure_connection(max_retries=0, timeout=timeout)
            channel = connection.default_channel
            for queue in queues:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except ChannelError:
                    depths[queue] = 0  # redis: a queue with no messages has no key
    except ProbeError:
        raise
    except Exception as exc:  # each transport raises its own types (redis, sqlalchemy, OSError …)
        raise ProbeError(f"broker {redact_url(broker_url)} is not reachable: {type(exc).__name__}: {exc}") from exc
    return depths
