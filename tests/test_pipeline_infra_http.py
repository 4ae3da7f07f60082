"""/healthz and /metrics over a real loopback HTTP connection, with a real index, real brokers (embedded SQLite
broker, redis-server) and kombu publishing real messages."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from core import metrics
from core.http import OpsServer
from core.settings import Settings
from dicom_node.index import Index, InstanceRecord
from peers import RedisServer
from peers.gateway import sample
from state.store import StateStore, episode_state_counts


def get(server: OpsServer, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def health(server: OpsServer) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(server, "/healthz")
    assert content_type == "application/json"
    return status, json.loads(body)


def make_settings(home: Path, **overrides: Any) -> Settings:
    overrides.setdefault("broker_url", f"sqla+sqlite:///{(home / 'broker.sqlite').resolve()}")  # no process to start
    return Settings(home=home, http_bind="127.0.0.1", http_port=0, min_free_disk_mb=0, **overrides)


def add_instance(index: Index, study: str, sop: str) -> None:
    record = InstanceRecord(sop_instance_uid=sop, study_instance_uid=study, series_instance_uid=f"{study}.1",
                            patient_id="P", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="SCU", peer_address="127.0.0.1",
                            size_bytes=10, sha256=sop, path=f"{sop}.dcm", received_at=1.0)
    index.record_instance(record, place=lambda: None, is_duplicate=lambda _path: False)


def publish(broker_url: str, queue: str, count: int) -> None:
    with Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        for i in range(count):
            simple.put({"n": i}, serializer="json")
        simple.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    store = StateStore(tmp_path / "index.sqlite")  # the node creates its database at start-up
    Index(store)
    store.close()
    return tmp_path


@pytest.fixture
def server(home: Path) -> Iterator[OpsServer]:
    settings = make_settings(home)
    metrics.configure(settings, episode_state_counts(settings.index_path))
    with OpsServer(settings, details=True) as running:
        yield running
    metrics.set_study_state_source(None)
    metrics.set_queue_depth_source(None)


def test_healthz_is_200_then_503_when_the_index_is_broken(server: OpsServer, home: Path) -> None:
    status, document = health(server)
    assert status == 200 and document["ok"] is True
    assert {name: check["ok"] for name, check in document["checks"].items()} == {
        "index": True, "broker": True, "disk": True}
    assert document["checks"]["broker"]["queue_depths"] == {"io": 0, "gpu": 0}

    index = home / "index.sqlite"
    index.unlink()
    index.write_bytes(b"this is not an SQLite database" * 100)
    status, document = health(server)
    assert status == 503 and document["ok"] is False
    assert document["checks"]["index"]["ok"] is False
    assert "cannot be read: file is not a database" in document["checks"]["index"]["detail"]
    assert document["checks"]["broker"]["ok"] and document["checks"]["disk"]["ok"]

    index.unlink()
    index.mkdir()
    status, document = health(server)
    assert status == 503 and "does not exist or is not a file" in document["checks"]["index"]["detail"]


def test_healthz_without_details_says_only_ok_or_not_ok(home: Path) -> None:
    """A worker's port has no sessions: by default it names no path, broker address or free space."""
    with OpsServer(make_settings(home)) as server:
        assert health(server) == (200, {"status": "ok"})
    with OpsServer(make_settings(home).model_copy(update={"min_free_disk_mb": 1e12})) as server:
        status, _, body = get(server, "/healthz")
    assert (status, json.loads(body)) == (503, {"status": "not ok"}) and str(home) not in body.decode()


def test_healthz_fails_on_the_disk_floor(home: Path) -> None:
    with OpsServer(make_settings(home).model_copy(update={"min_free_disk_mb": 1e12}), details=True) as server:
        status, document = health(server)
    assert status == 503
    assert document["checks"]["disk"]["ok"] is False and document["checks"]["disk"]["floor_mb"] == 1e12
    assert "below the floor of" in document["checks"]["disk"]["detail"]


def test_healthz_and_queue_depth_follow_a_real_redis(home: Path, redis_server: RedisServer) -> None:
    settings = make_settings(home, broker_url=redis_server.url)
    metrics.set_queue_depth_source(metrics.broker_depths(settings))
    try:
        publish(redis_server.url, "gpu", 3)
        with OpsServer(settings, details=True) as server:
            status, document = health(server)
            assert status == 200 and document["checks"]["broker"]["queue_depths"] == {"io": 0, "gpu": 3}
            text = get(server, "/metrics")[2].decode()
            assert sample(text, "raddraft_queue_depth", queue="gpu") == 3
            assert sample(text, "raddraft_queue_depth", queue="io") == 0

            redis_server.stop()
            status, document = health(server)
            assert status == 503 and document["checks"]["broker"]["ok"] is False
            assert "is not reachable" in document["checks"]["broker"]["detail"]
            text = get(server, "/metrics")[2].decode()
            assert sample(text, "raddraft_queue_depth", queue="gpu") == -1
    finally:
        metrics.set_queue_depth_source(None)


def test_metrics_has_the_names_and_recorded_values(server: OpsServer, home: Path) -> None:
    registry = metrics.REGISTRY
    stored = registry.get_sample_value("raddraft_instances_received_total", {"outcome": "stored"}) or 0.0
    failed = registry.get_sample_value("raddraft_deliveries_total", {"kind": "hl7", "outcome": "failed"}) or 0.0
    infer = registry.get_sample_value("raddraft_task_seconds_count", {"task": "infer"}) or 0.0
    metrics.record_instance("stored")
    metrics.record_instance("stored")
    metrics.record_delivery("hl7", ok=False)
    metrics.record_delivery("dicom", ok=True)
    metrics.observe_task("infer", 0.7)
    store = StateStore(home / "index.sqlite")
    index = Index(store)
    try:
        add_instance(index, "1.2.3", "1.2.3.1.1")
        add_instance(index, "1.2.4", "1.2.4.1.1")
    finally:
        store.close()
    publish(make_settings(home).effective_broker_url, "io", 2)

    status, content_type, body = get(server, "/metrics")
    text = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    for name in ("raddraft_instances_received_total", "raddraft_task_seconds_bucket", "raddraft_deliveries_total",
                 "raddraft_study_episodes", "raddraft_queue_depth", "process_cpu_seconds_total"):
        assert f"\n{name}" in text, name
    assert sample(text, "raddraft_instances_received_total", outcome="stored") == stored + 2
    assert sample(text, "raddraft_deliveries_total", kind="hl7", outcome="failed") == failed + 1
    assert sample(text, "raddraft_task_seconds_count", task="infer") == infer + 1
    assert sample(text, "raddraft_task_seconds_bucket", le="1.0", task="infer") is not None
    assert sample(text, "raddraft_study_episodes", state="receiving") == 2
    assert sample(text, "raddraft_study_episodes", state="failed") == 0
    assert sample(text, "raddraft_queue_depth", queue="io") == 2
    assert "1.2.3" not in text and "patient" not in text.lower()


def test_record_functions_reject_bad_labels() -> None:
    with pytest.raises(ValueError, match="label outcome='Stored OK' must be 1-48 lowercase"):
        metrics.record_instance("Stored OK")
    with pytest.raises(ValueError, match="delivery kind 'fax' must be 'dicom', 'dicomweb' or 'hl7'"):
        metrics.record_delivery("fax", ok=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be negative"):
        metrics.observe_task("infer", -1.0)


def test_unknown_path_and_method(server: OpsServer) -> None:
    assert get(server, "/")[0] == 404
    assert get(server, "/healthz", method="POST")[0] == 405
    assert get(server, "/metrics", method="HEAD")[0] == 200


def test_a_busy_port_is_a_clear_error(server: OpsServer, home: Path) -> None:
    settings = make_settings(home).model_copy(update={"http_port": server.port})
    with pytest.raises(OSError, match=f"cannot listen on http_bind 127.0.0.1 http_port {server.port}"):
        OpsServer(settings).start()
