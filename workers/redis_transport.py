"""kombu's Redis transport with one fix: a worker whose broker connection was lost survives its reconnect.

When Redis goes away, Celery's consumer releases the old connection and reconnects, but the old channel is still
used twice: closing it restores the messages this worker holds unacknowledged, and a task that was running
acknowledges its message on it when it finishes. Both open a new Redis client through the released connection
(``Transport.client`` or ``Channel.connection`` is None): an ``AttributeError`` that Celery treats as
unrecoverable, so the worker exits (kombu 5.x, threads and prefork pools alike). Here, with the connection gone,
neither is attempted: the message stays in Redis's unacknowledged set, from which the visibility-timeout sweep of
any worker restores it (``broker_visibility_timeout_s``), as after a kill -9. The task runs again; every task is
idempotent. With the connection alive nothing changes.

Selected by ``broker_transport`` in workers/celery_app.py for ``redis://`` brokers, and as :class:`SocketTransport`
for the embedded broker's unix socket (``redis+socket://``, workers/owned_redis.py). :func:`restore_unacknowledged`
puts every unacknowledged message back in its queue at once: ``raddraft serve`` calls it at start-up, before any
worker of its own Redis runs, so nothing waits for the visibility timeout after a crash.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu import Connection
from kombu.transport import redis

log = logging.getLogger(__name__)

TRANSPORT = "workers.redis_transport:Transport"
SOCKET_TRANSPORT = "workers.redis_transport:SocketTransport"
SOCKET_URL_PREFIX = "redis+socket://"


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


class SocketTransport(Transport):
    """:class:`Transport` on a unix socket: the URL is ``socket:///path`` (kombu's ``redis+socket://`` without its
    transport prefix, which would pick kombu's own class), kept whole for the channel, which connects to it."""

    can_parse_url = True


def socket_url(url: str) -> str:
    """``redis+socket:///path`` → ``socket:///path``, the URL :class:`SocketTransport` takes."""
    if not url.startswith(SOCKET_URL_PREFIX):
        raise ValueError(f"not a redis unix-socket URL ({SOCKET_URL_PREFIX}/path): {url!r}")
    return url[len("redis+"):]


def restore_unacknowledged(url: str) -> int:
    """Put every message Redis holds unacknowledged (delivered to a worker that has not acknowledged it) back in
    its queue; returns how many. Only when no worker of this Redis runs: a live worker's messages would run twice
    (harmless, tasks are idempotent, but wasted)."""
    with Connection(url, transport_options={"visibility_timeout": 0}) as connection:
        channel = connection.default_channel
        client = channel.client
        held = int(client.zcard(channel.unacked_index_key))
        if not held:
            return 0
        # the sweep lock a killed worker may have left: no worker runs, so nobody else holds it
        client.delete(channel.unacked_mutex_key)
        channel.qos.restore_visible(num=held, interval=1)
        left = int(client.zcard(channel.unacked_index_key))
        if left:
            log.warning("%d unacknowledged message(s) could not be put back now; the visibility-timeout sweep "
                        "delivers them again", left)
        return held - left
