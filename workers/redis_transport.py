"""kombu's Redis transport with one fix: a worker whose broker connection was lost survives its reconnect.

When Redis goes away, Celery's consumer releases the old connection and reconnects, but the old channel is still
used twice: closing it restores the messages this worker holds unacknowledged, and a task that was running
acknowledges its message on it when it finishes. Both open a new Redis client through the released connection
(``Transport.client`` or ``Channel.connection`` is None): an ``AttributeError`` that Celery treats as
unrecoverable, so the worker exits (kombu 5.x, threads and prefork pools alike). Here, with the connection gone,
neither is attempted: the message stays in Redis's unacknowledged set, from which the visibility-timeout sweep of
any worker restores it (``broker_visibility_timeout_s``), as after a kill -9. The task runs again; every task is
idempotent. With the connection alive nothing changes.

Selected by ``broker_transport`` in workers/celery_app.py for ``redis://`` brokers.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

log = logging.getLogger(__name__)

TRANSPORT = "workers.redis_transport:Transport"


class QoS(redis.QoS):
    def _released(self) -> bool:
        transport = self.channel.connection
        return transport is None or transport.client is None

    def ack(self, delivery_tag: Any) -> None:
        if self._released():
            log.warning("broker connection lost: message %s stays unacknowledged in Redis and is delivered again "
                        "after the visibility timeout", delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if self._released():
            log.warning("broker connection lost: message %s stays unacknowledged in Redis and is delivered again "
                        "after the visibility timeout", delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked_once(self, stderr: Any = None) -> None:
        if self._released():
            held = len(self._delivered)
            self._delivered.restored = True
            if held:
                log.warning("broker connection lost: %d unacknowledged message(s) stay in Redis and come back "
                            "after the visibility timeout", held)
            return
        super().restore_unacked_once(stderr)


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
