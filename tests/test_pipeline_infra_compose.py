"""compose/: the YAML parses and has the services, health checks, networks and volumes a hospital needs; the
TOML examples load as raddraft settings. (No Docker engine here: the files are checked, not run.)"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings, load_settings

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text(encoding="utf-8"))


def test_services_and_only_the_node_publishes_a_port(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert set(services) == {"redis", "node", "io-worker", "gpu-worker", "orthanc"}
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"node"}
    dicom, worklist = services["node"]["ports"]
    assert dicom.endswith(":11112")  # the DICOM port, for the PACS
    assert worklist.startswith("127.0.0.1:") and worklist.endswith(":8080")  # worklist: host loopback only
    assert all("expose" not in s or name == "node" for name, s in services.items())


def test_health_checks(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any("/healthz" in part for part in services["node"]["healthcheck"]["test"])
    assert any("/system" in part for part in services["orthanc"]["healthcheck"]["test"])
    for name in ("node", "io-worker", "gpu-worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    for name in ("io-worker", "gpu-worker"):  # each worker serves its own /healthz and /metrics
        command = services[name]["command"]
        port = command[command.index("--http-port") + 1]
        assert any(f"127.0.0.1:{port}/healthz" in part for part in services[name]["healthcheck"]["test"]), name
        assert services[name]["environment"]["RADDRAFT_HTTP_BIND"] == "0.0.0.0" and not services[name].get("ports")


def test_networks_are_internal_except_the_dicom_one(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert spec["networks"]["backend"]["internal"] is True
    assert spec["networks"]["dicom"].get("internal", False) is False
    assert set(services["node"]["networks"]) == {"backend", "dicom"}
    for name in ("redis", "io-worker", "gpu-worker", "orthanc"):
        assert services[name]["networks"] == ["backend"], name
    assert services["orthanc"]["profiles"] == ["integration"]


def test_volumes_home_shared_by_node_and_io_workers_weights_read_only(spec: dict[str, Any]) -> None:
    services = spec["services"]

    def mounts(name: str) -> list[str]:
        return services[name].get("volumes", [])

    assert "raddraft-home:/var/lib/raddraft" in mounts("node")
    assert "raddraft-home:/var/lib/raddraft" in mounts("io-worker")
    assert not any(m.startswith("raddraft-home:") for m in mounts("gpu-worker"))  # inputs come through the broker
    weights = [m for m in mounts("gpu-worker") if m.split(":")[-2] == "/models"]
    assert len(weights) == 1 and weights[0].endswith(":ro")
    assert set(spec["volumes"]) >= {"raddraft-home", "redis-data"}


def test_gpu_worker_reserves_an_nvidia_gpu_and_runs_the_gpu_queue(spec: dict[str, Any]) -> None:
    gpu = spec["services"]["gpu-worker"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["command"][2:5] == ["worker", "--queues", "gpu"]
    assert gpu["build"]["target"] == "gpu" and spec["services"]["node"]["build"]["target"] == "cpu"
    assert spec["services"]["io-worker"]["command"][2:5] == ["worker", "--queues", "io"]


def test_dockerfile_targets_and_constraints() -> None:
    text = (COMPOSE / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, re.MULTILINE)
    assert [name for _, name in stages] == ["base", "cpu", "gpu"]
    assert "python:3.11-slim" in text
    assert text.count("pip install -c constraints.txt") == 2
    assert "whl/cpu" in text and "whl/cu" in text and "USER raddraft" in text


@pytest.mark.parametrize("name", ["raddraft.toml.example", "minigpt-med.toml.example"])
def test_toml_examples_are_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("RADDRAFT_")]:
        monkeypatch.delenv(key)
    settings = load_settings(COMPOSE / name)
    if name.startswith("minigpt"):
        assert settings.model == "/models/minigpt-med" and settings.inference_device == "cuda"
    else:
        assert settings.dicom_destinations[0].ae_title == "PACS" and settings.allowed_peers


def test_compose_env_names_are_settings_fields(spec: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name, service in spec["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("RADDRAFT_") and key != "RADDRAFT_DICOM_PUBLISH":
                assert key.removeprefix("RADDRAFT_").lower() in fields, (name, key)
