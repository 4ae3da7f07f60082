"""Real peers for tests and benchmarks: Orthanc, dcmtk storescp and redis-server on free loopback ports.

pytest-free: each peer is a context manager that starts the real program in its own temporary folder, waits
until it answers, and stops it on exit. ``tests/conftest.py`` turns them into the fixtures ``orthanc``,
``dcmtk_storescp`` and ``redis_server``; the benchmarks (``python -m bench.ingest``) use them directly. A
package of its own, beside ``tests/`` and ``bench/``, so that neither imports the other; the product imports
none of them (the import contracts in pyproject.toml).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str | None = None
) -> T:
    """Poll *condition* until it returns a truthy value (returned) or raise ``TimeoutError`` after *timeout*.

    Exceptions raised by *condition* count as "not yet"; the last one is chained to the ``TimeoutError``.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:  # not ready yet: keep polling, remember why
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            label = what or getattr(condition, "__name__", repr(condition))
            raise TimeoutError(f"{label} not true after {timeout} s") from last_error
        time.sleep(interval)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM *process* and wait up to *timeout* seconds for it; SIGKILL it if it is still running then."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def port_is_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _Process:
    """A child process with its log file; stopped (terminate, then kill) on exit."""

    name = "process"
    graceful_stop = True  # False: SIGKILL at once (for throw-away state whose clean shutdown is slow)

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        executable = shutil.which(argv[0])
        if executable is None:
            raise FileNotFoundError(f"{argv[0]} is not installed (see scripts/bootstrap.sh apt_packages)")
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [executable, *argv[1:]], cwd=self.workdir, stdout=log_file, stderr=subprocess.STDOUT
            )

    def _check_alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}; log {self.log_path}:\n{self.log()[-2000:]}"
            )
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if not self.graceful_stop:
            self.process.kill()
            self.process.wait(timeout=10)
            return
        stop_process(self.process)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError


# Where Debian's orthanc-dicomweb package puts the DICOMweb plugin (scripts/bootstrap.sh installs it).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc(_Process):
    """Orthanc from its own JSON config: no authentication, storage and index in *workdir*.

    ``dicom_port``/``http_port`` are free ports; ``aet`` is its AE title. With ``check_called_aet`` Orthanc
    rejects associations whose called AE title is not ``aet``. No plugins, unless ``dicomweb``: then the DICOMweb
    plugin (:data:`DICOMWEB_PLUGIN`) serves QIDO-RS/WADO-RS/STOW-RS under ``dicomweb_url``. With ``users``
    (name → password) its HTTP server requires HTTP basic authentication (``RegisteredUsers``) for every request,
    the DICOMweb ones included; :meth:`request` signs in as the first user.
    """

    name = "orthanc"
    graceful_stop = False  # a clean stop takes ~3.5 s (HTTP and DICOM servers poll); its temp state is discarded

    def __init__(self, workdir: Path, aet: str = "ORTHANC", check_called_aet: bool = False,
                 dicomweb: bool = False, users: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.aet = aet
        self.users = dict(users or {})
        self.check_called_aet = check_called_aet
        self.dicomweb = dicomweb
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        if self.dicomweb and not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(f"{DICOMWEB_PLUGIN} is missing (apt package orthanc-dicomweb, see "
                                    "scripts/bootstrap.sh)")
        extra: dict[str, Any] = {}
        if self.dicomweb:
            # Metadata from the stored files ("Full"), so WADO-RS metadata has every attribute a viewer asks for.
            extra["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                                 "WadoRoot": "/wado", "Ssl": False, "StudiesMetadata": "Full",
                                 "SeriesMetadata": "Full"}
        return {
            **extra,
            "Name": f"test-{self.dicom_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomModalities": {},
            "DicomModalitiesInDatabase": False,
            "SaveJobs": False,
            "StorageCompression": False,
            "DicomScuTimeout": 30,
        }

    def start(self) -> None:
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._spawn(["Orthanc", str(config_path)])
        wait_for(lambda: self._check_alive() and self.get("/system"), timeout=START_TIMEOUT_S, what="Orthanc /system")

    # --- REST ----------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | dict[str, Any] | str | None = None) -> Any:
        """Call the REST API: a dict body is sent as JSON; a JSON answer is decoded, any other is returned as
        text. HTTP errors raise ``urllib.error.HTTPError``."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=60) as response:
            payload = response.read()
            content_type = response.headers.get_content_type()
        if content_type == "application/json":
            return json.loads(payload)
        return payload.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, dicom_file: Path) -> dict[str, Any]:
        """POST /instances: store a file; returns Orthanc's answer (ID, ParentStudy, Status…)."""
        return self.request("POST", "/instances", Path(dicom_file).read_bytes())

    def studies(self) -> list[str]:
        return self.get("/studies")

    def instances(self) -> list[str]:
        return self.get("/instances")

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        expanded = self.get("/instances?expand")
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in expanded}

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """PUT /modalities/{name}: declare a C-STORE SCP Orthanc can send to."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def store_to(self, modality: str, resources: list[str]) -> dict[str, Any]:
        """POST /modalities/{name}/store synchronously: C-STORE the given studies/series/instances."""
        return self.request("POST", f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})


class StoreSCP(_Process):
    """dcmtk ``storescp`` writing every received instance into ``output_dir``.

    ``accept_all_syntaxes`` (``+xa``) accepts compressed transfer syntaxes too; without it storescp accepts only
    uncompressed ones. ``refuse`` (``--refuse``) rejects every association. ``promiscuous`` (``-pm``) also
    accepts SOP classes dcmtk does not know. ``tls`` = (PEM private key, PEM certificate) serves DICOM over TLS
    without asking for a client certificate.
    """

    name = "storescp"

    def __init__(self, workdir: Path, aet: str = "STORESCP", accept_all_syntaxes: bool = True,
                 refuse: bool = False, promiscuous: bool = False, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(workdir)
        self.aet = aet
        self.port = free_port()
        self.output_dir = self.workdir / "received"
        self.accept_all_syntaxes = accept_all_syntaxes
        self.refuse = refuse
        self.promiscuous = promiscuous
        self.tls = tls

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        argv = ["storescp", "--aetitle", self.aet, "--output-directory", str(self.output_dir)]
        if self.accept_all_syntaxes:
            argv.append("+xa")
        if self.refuse:
            argv.append("--refuse")
        if self.promiscuous:
            argv.append("--promiscuous")
        if self.tls is not None:
            argv += ["+tls", str(self.tls[0]), str(self.tls[1]), "--ignore-peer-cert"]
        self._spawn([*argv, str(self.port)])
        wait_for(lambda: self._check_alive() and port_is_open(self.port), timeout=START_TIMEOUT_S,
                 what=f"storescp on port {self.port}")

    def received(self) -> list[Path]:
        """Files written so far (storescp writes each one before it answers the C-STORE)."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())


class RedisServer(_Process):
    """``redis-server`` on a free loopback port, no persistence, working directory in *workdir*."""

    name = "redis"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        self._spawn([
            "redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
        ])
        wait_for(lambda: self._check_alive() and self.ping(), timeout=START_TIMEOUT_S, what="redis PING")

    def ping(self) -> bool:
        with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
