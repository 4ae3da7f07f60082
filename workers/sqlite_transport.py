"""kombu's SQLAlchemy transport (the ``sqla+sqlite`` opt-in broker) with one change: a message taken by a worker
is deleted, not kept.

kombu marks a delivered row ``visible = 0`` and never removes it, so the SQLite file grows with every message
ever delivered and each poll scans all of them (issue 21: 0.74 MB a study; after 1000 studies a poll took
150-200 ms). Deleting the row is what the transport's semantics already are: an invisible row is never read again
(a message a worker held unacknowledged comes back by being published again when its channel closes, as kombu's
virtual transports do), so nothing is lost that was not lost before and the file holds only what is queued.

Selected by ``broker_transport`` in workers/celery_app.py for ``sqla+sqlite:`` brokers (the URL without its
``sqla+`` prefix, which would pick kombu's own class).
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from sqlalchemy import text

TRANSPORT = "workers.sqlite_transport:Transport"
URL_PREFIX = "sqla+sqlite:"


class Channel(sqlalchemy.Channel):
    def _get(self, queue: str) -> Any:
        obj = self._get_or_create(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            message = (self.session.query(self.message_cls)
                       .filter(self.message_cls.queue_id == obj.id)
                       .filter(self.message_cls.visible.is_not(False))
                       .order_by(self.message_cls.sent_at, self.message_cls.id)
                       .limit(1).first())
            if message is None:
                raise Empty()
            payload = loads(bytes_to_str(message.payload))
            self.session.delete(message)
            return payload
        finally:
            self.session.commit()


class Transport(sqlalchemy.Transport):
    Channel = Channel


def transport_url(url: str) -> str:
    """``sqla+sqlite:///FILE`` → ``sqlite:///FILE``, the URL :class:`Transport` takes."""
    if not url.startswith(URL_PREFIX):
        raise ValueError(f"not a SQLite transport URL ({URL_PREFIX}///FILE): {url!r}")
    return url[len("sqla+"):]
