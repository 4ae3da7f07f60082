"""``raddraft serve`` as a subprocess, seen from outside (issue 21): its in-process worker killed by a real broker
message says so on ``/healthz`` and in ``raddraft status``; ``/metrics`` of serve and of ``raddraft worker
--http-port`` has the queue depths and the studies by state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kombu import Connection
from node_helpers import Serve, make_ct, wait_for
from pydicom.uid import generate_uid

from dicom_node.statuses import StoreStatus
from peers import RedisServer
from peers.gateway import base_env, sample, scrape, worker


def worklist_url(serve: Serve) -> str:
    def found() -> str | None:
        for line in serve.log:
            if "worklist listening on " in line:
                return line.split("worklist listening on ", 1)[1].strip()
        return None

    return wait_for(found, timeout=60, what="worklist URL in the log")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def status(home: Path, *args: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "raddraft.cli", "status", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sqlite_broker_url(home: Path) -> str:
    """The SQLite transport (an explicit opt-in): serve's worker runs in its own process."""
    return f"sqla+sqlite:///{(home / 'broker.sqlite').resolve()}"


def embedded_broker_url(home: Path) -> str:
    """The default: the redis-server serve owns, on its unix socket."""
    return f"redis+socket://{(home / 'run' / 'broker.sock').resolve()}"


def test_a_dead_in_process_worker_fails_healthz_and_shows_in_status(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="3600", RADDRAFT_INPROCESS_WORKER_MAX_RESTARTS="1",
                  RADDRAFT_INPROCESS_WORKER_RESTART_BACKOFF_S="0.2", RADDRAFT_BROKER_URL=sqlite_broker_url(home))
    try:
        url = worklist_url(serve)
        wait_for(lambda: get(f"{url}/healthz")[0] == 200, timeout=60, what="healthy gateway")
        assert "in-process worker: running since " in status(home)

        # the fault: a task message the worker's consumer cannot take (no id), restored to the queue as it dies
        with Connection(sqlite_broker_url(home)) as connection:
            connection.Producer().publish({"x": 1}, exchange="", routing_key="io", serializer="json",
                                          headers={"task": "raddraft.prepare"})
        wait_for(lambda: get(f"{url}/healthz")[0] == 503, timeout=90, what="/healthz 503")
        code, body = get(f"{url}/healthz")
        assert (code, json.loads(body)) == (503, {"status": "not ok"})  # no session: nothing more
        document = json.loads(status(home, "--json"))["inprocess_worker"]
        assert (document["state"], document["restarts"], document["last_error"]) == ("dead", 1, "KeyError")
        assert document["process_running"] is True
        (line,) = [line for line in status(home).splitlines() if line.startswith("in-process worker:")]
        assert line.startswith("in-process worker: dead since ") and "after 1 restart(s) (KeyError)" in line
        # the DICOM node still accepts (the instances are kept for a restarted gateway)
        assoc = serve.associate()
        assert assoc.send_c_store(make_ct(generate_uid(), generate_uid())).Status == StoreStatus.SUCCESS
        assoc.release()
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    log = "".join(serve.log)
    assert "in-process worker died (KeyError); restarting it in 0.2 s (restart 1 of at most 1 in a row)" in log
    assert "in-process worker restarted (1 restart(s) since start-up)" in log
    assert "in-process worker died (KeyError) 2 time(s) in a row: not restarted again" in log
    assert "health check failed: worker" in log
    assert "in-process worker: stopped since " in status(home)


def test_metrics_show_queue_depths_and_studies_by_state(tmp_path):
    """No in-process worker: what is published stays in the embedded broker's queues and /metrics counts it."""
    home = tmp_path / "home"
    serve = Serve(home, "--no-worker", RADDRAFT_STUDY_IDLE_SECONDS="3600")
    try:
        url = worklist_url(serve)
        assoc = serve.associate()
        for _ in range(2):  # two studies: two episodes receiving
            assert assoc.send_c_store(make_ct(generate_uid(), generate_uid())).Status == StoreStatus.SUCCESS
        assoc.release()
        with Connection(embedded_broker_url(home)) as connection:
            for queue, count in (("io", 3), ("gpu", 2)):
                simple = connection.SimpleQueue(queue)
                for i in range(count):
                    simple.put({"n": i}, serializer="json")
                simple.close()
        code, body = get(f"{url}/metrics")
        assert code == 200
        text = body.decode()
        assert sample(text, "raddraft_queue_depth", queue="io") == 3
        assert sample(text, "raddraft_queue_depth", queue="gpu") == 2
        assert sample(text, "raddraft_study_episodes", state="receiving") == 2
        assert sample(text, "raddraft_study_episodes", state="prepared") == 0
        assert "in-process worker" not in status(home)  # --no-worker: no worker to report
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)


def test_an_io_worker_serves_the_queue_depths_of_redis(tmp_path, redis_server: RedisServer):
    home = tmp_path / "home"
    with Connection(redis_server.url) as connection:
        simple = connection.SimpleQueue("gpu")  # no gpu worker: they wait
        for i in range(4):
            simple.put({"n": i}, serializer="json")
        simple.close()
    env = base_env(home, RADDRAFT_BROKER_URL=redis_server.url)
    with worker("io", env, "--http-port", "0") as io:
        status, text = scrape(io.log, "/metrics")
    assert status == 200
    assert sample(text, "raddraft_queue_depth", queue="gpu") == 4
    assert sample(text, "raddraft_queue_depth", queue="io") == 0
    assert sample(text, "raddraft_study_episodes", state="receiving") == 0  # no index yet: every state 0
