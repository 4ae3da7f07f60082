"""The Redis sweep lock: a restart of Redis during a visibility sweep must not hold back re-delivery.

kombu's sweep (``restore_visible``) holds the ``unacked_mutex`` lock while it runs. Redis with an append-only
file keeps that lock across a restart, so with kombu's 300 s expiry no worker would restore an unacknowledged
message for five minutes after Redis was restarted mid-sweep. raddraft caps the lock at the visibility timeout.
Real redis-server, kombu with raddraft's transport and transport options, a consumer that dies holding a message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis
from kombu import Connection

from core.settings import Settings
from peers.gateway import DurableRedis
from workers.celery_app import configure, unacked_mutex_expire
from workers.redis_transport import TRANSPORT

QUEUE = "raddraft-sweep-test"
VISIBILITY_S = 2.0

# Takes one message without acknowledging it and dies as after kill -9 (no restore at shutdown).
DYING_CONSUMER = """
import json, os, sys
from kombu import Connection
with Connection(sys.argv[1], transport=sys.argv[2], transport_options=json.loads(sys.argv[3])) as conn:
    message = conn.SimpleQueue(sys.argv[4]).get(timeout=20)
    sys.stdout.write(json.dumps(message.payload))
    sys.stdout.flush()
    os._exit(0)
"""


@pytest.mark.parametrize(("visibility", "expected"), [(1.0, 5), (6.0, 6), (90.0, 90), (3600.0, 300)])
def test_the_sweep_lock_lives_as_long_as_the_visibility_timeout(visibility, expected):
    assert unacked_mutex_expire(visibility) == expected


@pytest.fixture
def durable_redis(tmp_path):
    with DurableRedis(tmp_path / "redis") as peer:
        yield peer


def test_message_of_a_dead_consumer_comes_back_after_redis_restarted_during_a_sweep(tmp_path, durable_redis):
    settings = Settings(home=tmp_path / "home", broker_url=durable_redis.url,
                        broker_visibility_timeout_s=VISIBILITY_S)
    options = configure(settings).conf.broker_transport_options
    assert options["unacked_mutex_expire"] == unacked_mutex_expire(VISIBILITY_S)
    with Connection(durable_redis.url, transport=TRANSPORT, transport_options=options) as conn:
        conn.SimpleQueue(QUEUE).put({"study": "1.2.3", "episode": 1})
    taken = subprocess.run([sys.executable, "-c", DYING_CONSUMER, durable_redis.url, TRANSPORT, json.dumps(options),
                            QUEUE], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(taken.stdout) == {"study": "1.2.3", "episode": 1}
    client = redis.Redis.from_url(durable_redis.url)
    assert client.hlen("unacked") == 1  # the dead consumer's message waits in the unacknowledged set

    lock = client.lock("unacked_mutex", timeout=options["unacked_mutex_expire"])
    assert lock.acquire(blocking=False)  # a sweep is running ...
    durable_redis.restart()  # ... when Redis restarts: the lock survives in the append-only file
    assert client.ttl("unacked_mutex") > 0

    started = time.monotonic()
    deadline = started + VISIBILITY_S + options["unacked_mutex_expire"] + 15
    payload = None
    with Connection(durable_redis.url, transport=TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue(QUEUE)
        while payload is None and time.monotonic() < deadline:
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                continue
            payload = message.payload
            message.ack()
    assert payload == {"study": "1.2.3", "episode": 1}, (
        f"the message was not re-delivered within {deadline - started:.0f} s of the restart")
    assert client.hlen("unacked") == 0
