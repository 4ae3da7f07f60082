"""Worklist test data and databases: a phantom study in a real spool with its manifest and draft result, the
two database backends (SQLite file, PostgreSQL database created for the test and dropped after), and reading
back what a real Orthanc stored.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pydicom
import pytest

from core.result import AnalysisResult, DraftReport, Finding, ModelIdentity
from core.settings import Settings, load_settings
from dicom_node.index import InstanceRecord
from model.grounding import link
from model.phantoms import PhantomStudy, generate_study, study_rng
from peers import Orthanc
from workers.prepare import build_manifest
from worklist.server import RunningServer

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
# (seed, index) of a CR phantom with three findings: left nodule, left consolidation, right nodule
THREE_FINDINGS_CR = (5, 4)
ONE_FINDING_CR = (5, 5)
# (seed, index) of a CT phantom of four sections with three nodules: left (section 2), right (sections 1 and 2)
THREE_NODULES_CT = (5, 4)


@dataclass(frozen=True)
class DraftOnDisk:
    manifest_path: Path
    result_path: Path
    phantom: PhantomStudy
    result: AnalysisResult


def settings_for(home: Path, database_url: str, **overrides: object) -> Settings:
    return load_settings(home=home, database_url=database_url, hl7_sending_facility="RADDRAFT HOSPITAL",
                         **overrides)


def orthanc_instance(orthanc: Orthanc, sop_instance_uid: str) -> pydicom.Dataset | None:
    """The instance Orthanc stored under *sop_instance_uid*, read back from its REST API; None if it has none."""
    found = [r for r in orthanc.request("POST", "/tools/lookup", sop_instance_uid) if r["Type"] == "Instance"]
    if not found:
        return None
    with urllib.request.urlopen(f"{orthanc.url}/instances/{found[0]['ID']}/file", timeout=30) as response:
        return pydicom.dcmread(io.BytesIO(response.read()))


def write_draft(settings: Settings, which: tuple[int, int] = THREE_FINDINGS_CR, episode_id: int = 1,
                accession: str | None = None, *, modality: str = "CR", grounded: bool = False,
                extra_text: str = "", extra_boxes: tuple[Finding, ...] = ()) -> DraftOnDisk:
    """A phantom study (CR unless *modality*) in ``settings.spool_dir``, its manifest (workers.prepare) and a
    preliminary result whose findings and report are the phantom's ground truth (what a perfect model would have
    drafted). *grounded*: the draft is linked (model.grounding.link) as a grounded draft is, after *extra_text*
    is appended to FINDINGS and *extra_boxes* (``sop_instance_uid`` "" means the first image) to the findings."""
    phantom = generate_study(study_rng(*which), modality)
    records = []
    for ds in phantom.datasets:
        if accession is not None:
            ds.AccessionNumber = accession
        relative = Path(str(ds.StudyInstanceUID)) / f"{ds.SOPInstanceUID}.dcm"
        path = settings.spool_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        records.append(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID), patient_id=str(ds.PatientID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="TEST", peer_address="127.0.0.1", size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), path=str(relative), received_at=0.0, episode_id=episode_id))
    manifest = build_manifest(settings.spool_dir, phantom.study_uid, episode_id, records)
    work = settings.home / "work" / phantom.study_uid / str(episode_id)
    manifest_path = work / "manifest.json"
    manifest.write(manifest_path)
    findings_text, impression_text = phantom.report.split("IMPRESSION:")
    report = DraftReport(findings=" ".join(filter(None, (findings_text.replace("FINDINGS:", "").strip(),
                                                         extra_text))),
                         impression=impression_text.strip())
    findings = [Finding(label=f.label, sop_instance_uid=f.sop_instance_uid, box=tuple(map(float, f.box)),
                        laterality=f.laterality, site=f.site) for f in phantom.findings]
    first_image = str(phantom.datasets[0].SOPInstanceUID)
    findings += [b.model_copy(update={"sop_instance_uid": b.sop_instance_uid or first_image}) for b in extra_boxes]
    consistency = None
    if grounded:
        report, findings, consistency = link(report, findings)
    result = AnalysisResult(
        study_instance_uid=phantom.study_uid, episode_id=episode_id,
        model=ModelIdentity(name="raddraft-small", version="0.1.0-test"),
        report=report, findings=findings,
        analysed_instances=[str(ds.SOPInstanceUID) for ds in phantom.datasets],
        created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), consistency=consistency,
    )
    result_path = work / "result.json"
    result.write(result_path)
    return DraftOnDisk(manifest_path, result_path, phantom, result)


def spool_study(settings: Settings, datasets: list[pydicom.Dataset], episode_id: int = 1, *,
                findings: Sequence[Finding] = (), report: DraftReport | None = None,
                analysed: Sequence[str] = ()) -> tuple[Path, Path]:
    """*datasets* (one study, any files) written to the spool, their manifest (workers.prepare) and a draft result
    with *findings* and *report* (none: a normal draft): the paths of the manifest and the result."""
    records = []
    study_uid = str(datasets[0].StudyInstanceUID)
    for ds in datasets:
        relative = Path(study_uid) / f"{ds.SOPInstanceUID}.dcm"
        path = settings.spool_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()
        records.append(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=study_uid,
            series_instance_uid=str(ds.SeriesInstanceUID), patient_id=str(ds.get("PatientID", "")),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="TEST", peer_address="127.0.0.1", size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(), path=str(relative), received_at=0.0, episode_id=episode_id))
    manifest = build_manifest(settings.spool_dir, study_uid, episode_id, records)
    work = settings.home / "work" / study_uid / str(episode_id)
    manifest.write(work / "manifest.json")
    result = AnalysisResult(
        study_instance_uid=study_uid, episode_id=episode_id, model=ModelIdentity(name="raddraft-small",
                                                                                 version="0.1.0-test"),
        report=report or DraftReport(findings="No acute findings.", impression="Normal."), findings=list(findings),
        analysed_instances=list(analysed), created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    result.write(work / "result.json")
    return work / "manifest.json", work / "result.json"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test; its SQLAlchemy-style URL; dropped afterwards."""
    name = f"worklist_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc}")
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"], name="database_url")
def database_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using it runs twice: on a SQLite file and on a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    else:
        with postgres_database() as url:
            yield url


class Client:
    """http.client with a cookie jar of one host; no redirects followed."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.cookies: dict[str, str] = {}
        self.csrf = ""

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
        try:
            all_headers = dict(headers or {})
            if self.cookies:
                all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            set_cookies = response.headers.get_all("Set-Cookie") or []
            for cookie in set_cookies:
                name, value = cookie.split(";", 1)[0].split("=", 1)
                if value:
                    self.cookies[name] = value
                else:
                    self.cookies.pop(name, None)
            return response, data, set_cookies
        finally:
            conn.close()

    def login(self, username="curie", password="radium-226"):
        _, page, _ = self.request("GET", "/login")
        token = re.search(rb'name="csrf_token" value="([^"]+)"', page)[1].decode()
        form = urlencode({"csrf_token": token, "username": username, "password": password})
        response, data, cookies = self.request("POST", "/login", form,
                                               {"Content-Type": "application/x-www-form-urlencoded"})
        if response.status == 303:
            _, page, _ = self.request("GET", "/")
            self.csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page)[1].decode()
        return response, data, cookies

    def post_json(self, path, value, csrf=True, headers=None):
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if csrf:
            all_headers["X-CSRF-Token"] = self.csrf
        response, data, _ = self.request("POST", path, json.dumps(value), all_headers)
        return response.status, json.loads(data)
