"""Helpers of the end-to-end tests and the benchmarks: ``raddraft serve`` / ``raddraft worker`` as real
processes, phantom studies pushed from a real Orthanc, and checks of what came back into Orthanc."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pydicom

from model.embedded import embedded_available
from model.phantoms import generate_studies, write_studies
from peers import LOOPBACK, Orthanc, RedisServer, port_is_open, wait_for
from state.store import StateStore

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
SR_MODALITY = "SR"
PR_MODALITY = "PR"
RADDRAFT_AET = "RADDRAFT"
# The embedded (trained) checkpoint when it is shipped; otherwise the untrained small preset, whose boxes are
# meaningless: the box-vs-truth check applies only to the trained model (see test_e2e_orthanc.py).
MODEL = "embedded" if embedded_available() else "raddraft-small"


def base_env(home: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}
    env.update({
        "RADDRAFT_HOME": str(home), "RADDRAFT_DICOM_BIND": LOOPBACK, "RADDRAFT_DICOM_PORT": "0",
        "RADDRAFT_HTTP_PORT": "0",
        "RADDRAFT_MIN_FREE_DISK_MB": "0",
        "RADDRAFT_STUDY_IDLE_SECONDS": "1", "RADDRAFT_HANDOFF_RETRY_SECONDS": "0.5", "RADDRAFT_MODEL": MODEL,
        "RADDRAFT_NETWORK_TIMEOUT_S": "10", "RADDRAFT_TASK_RETRY_BACKOFF_S": "0.5",
        "RADDRAFT_TASK_RETRY_BACKOFF_MAX_S": "2", "RADDRAFT_INFERENCE_THREADS": "1",
    })
    env.update(settings)
    return env


class Process:
    """A raddraft command as a child process; its output (the log) is collected in ``lines``."""

    def __init__(self, argv: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "raddraft.cli", *argv], env=env, cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        return code


class Gateway(Process):
    """``raddraft serve``; ``port`` is read from its INFO log line ``listening on host:port``."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        super().__init__(["serve"], env, "serve")
        self.home = home

        def listening() -> int | None:
            if not self.alive():
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log}")
            match = re.search(r"listening on [\d.]+:(\d+)", self.log)
            return int(match.group(1)) if match else None

        self.port: int = wait_for(listening, timeout=60, what="raddraft serve listening")


@contextmanager
def gateway(home: Path, env: dict[str, str]) -> Iterator[Gateway]:
    running = Gateway(home, env)
    try:
        yield running
    except BaseException:
        log.error("--- raddraft serve log ---\n%s", running.log[-30000:])  # shown by pytest for the failed test
        raise
    finally:
        running.stop()


@contextmanager
def worker(queue: str, env: dict[str, str], *options: str) -> Iterator[Process]:
    running = Process(["worker", "--queues", queue, *options], env, f"worker-{queue}")
    try:
        # the Celery banner lists the tasks just before the worker starts consuming
        wait_for(lambda: "[tasks]" in running.log or not running.alive(), timeout=60, what=f"{queue} worker up")
        assert running.alive(), running.log
        yield running
    except BaseException:
        log.error("--- raddraft worker %s log ---\n%s", queue, running.log[-30000:])
        raise
    finally:
        running.stop()


class Phantoms:
    """Phantom studies written once per test session (CR, CT, MR) with their truth."""

    SEEDS: ClassVar[dict[str, int]] = {"CR": 5, "CT": 6, "MR": 7}  # a seed each: distinct study UIDs

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_modality: dict[str, tuple[Path, dict[str, Any]]] = {}
        for modality, seed in self.SEEDS.items():
            out = root / modality
            write_studies(out, seed=seed, count=1, modality=modality)
            truth = json.loads((out / "truth.json").read_text())["studies"][0]
            self.by_modality[modality] = (next(p for p in out.iterdir() if p.is_dir()), truth)

    def files(self, modality: str) -> list[Path]:
        return sorted(self.by_modality[modality][0].glob("*.dcm"))

    def truth(self, modality: str) -> dict[str, Any]:
        return self.by_modality[modality][1]

    def lesions(self, modality: str) -> dict[str, list[tuple[float, float, float, float]]]:
        """SOP Instance UID → the box of every lesion section drawn on that image (a CT/MR lesion crosses
        several slices; truth.json names only its largest section)."""
        study = next(generate_studies(self.SEEDS[modality], 1, modality))  # the same study write_studies wrote
        uids = [str(ds.SOPInstanceUID) for ds in study.datasets]
        found: dict[str, list[tuple[float, float, float, float]]] = {}
        for section in study.rendering.drawn:
            found.setdefault(uids[section.image_index], []).append(tuple(float(v) for v in section.box))
        return found


def connect_orthanc(orthanc: Orthanc, gateway_port: int) -> str:
    """Declare raddraft as Orthanc's modality ``raddraft``; returns the destination raddraft should use."""
    orthanc.add_modality("raddraft", RADDRAFT_AET, LOOPBACK, gateway_port)
    return f"{orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}"


def push_study(orthanc: Orthanc, files: list[Path]) -> str:
    """Upload *files* to Orthanc over REST and have Orthanc C-STORE the study to raddraft; returns its Orthanc ID."""
    study_id = ""
    for path in files:
        study_id = orthanc.upload(path)["ParentStudy"]
    orthanc.store_to("raddraft", [study_id])
    return study_id


def series_by_modality(orthanc: Orthanc, study_id: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series"):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def instances_of_modality(orthanc: Orthanc, study_id: str, modality: str) -> list[str]:
    return [i for s in series_by_modality(orthanc, study_id).get(modality, []) for i in s["Instances"]]


def read_instance(orthanc: Orthanc, instance_id: str) -> pydicom.Dataset:
    req = f"{orthanc.url}/instances/{instance_id}/file"
    with urllib.request.urlopen(req, timeout=30) as response:
        return pydicom.dcmread(io.BytesIO(response.read()))


def findings_srs(orthanc: Orthanc, study_id: str) -> list[pydicom.Dataset]:
    """The Comprehensive 3D SRs (TID 1500 findings) raddraft stored in the study (not the narrative SRs)."""
    datasets = [read_instance(orthanc, i) for i in instances_of_modality(orthanc, study_id, SR_MODALITY)]
    return [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]


def wait_for_outputs(orthanc: Orthanc, study_id: str, timeout: float) -> list[pydicom.Dataset]:
    """Wait until raddraft's findings SR is in the study, and the GSPS too when the SR has boxes (the SR and the
    GSPS are stored one after the other, so the SR alone may be there first)."""
    def done() -> list[pydicom.Dataset] | None:
        modalities = series_by_modality(orthanc, study_id)
        if SR_MODALITY not in modalities:
            return None
        srs = findings_srs(orthanc, study_id)
        if any(sr_boxes(sr) for sr in srs) and PR_MODALITY not in modalities:
            return None
        return srs or None

    return wait_for(done, timeout=timeout, interval=0.5,
                    what=f"SR (and GSPS when it has boxes) in Orthanc study {study_id}")


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def sr_boxes(sr: pydicom.Dataset) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(referenced SOP Instance UID, box) of every closed 5-point POLYLINE in the SR content tree."""
    boxes = []

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD" and item.get("GraphicType") == "POLYLINE":
                data = [float(v) for v in item.GraphicData]
                xs, ys = data[0::2], data[1::2]
                ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                boxes.append((str(ref), (min(xs), min(ys), max(xs), max(ys))))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return boxes



class DurableRedis(RedisServer):
    """redis-server with an append-only file (fsync always) that can be restarted on the same port and keeps its
    queues, as a production broker must."""

    def start(self) -> None:
        self._spawn([
            "redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.workdir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
        ])
        wait_for(lambda: self._check_alive() and self.ping(), timeout=20, what="redis PING")

    def restart(self) -> None:
        self.stop()  # SIGTERM: redis flushes the append-only file and exits
        wait_for(lambda: not port_is_open(self.port), timeout=10, what="redis port closed")
        self.start()


def episode_state(home: Path, study_uid: str, episode_id: int = 1) -> str | None:
    store = StateStore(home / "index.sqlite")
    try:
        episode = store.episode(study_uid, episode_id)
    finally:
        store.close()
    return None if episode is None else str(episode.state)


def deliveries(home: Path, study_uid: str, episode_id: int = 1, output_set: str = "draft") -> list[Any]:
    store = StateStore(home / "index.sqlite")
    try:
        return store.deliveries(study_uid, episode_id, output_set)
    finally:
        store.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text output."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


def scrape(log: str, path: str) -> tuple[int, str]:
    """(status, body) of GET *path* on the ops HTTP server a raddraft process announced in its *log*."""
    found = re.search(r"health and metrics on (http://[\d.]+:\d+)/healthz", log)
    assert found is not None, log[-5000:]
    try:
        with urllib.request.urlopen(found.group(1) + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
