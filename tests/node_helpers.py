"""Fixtures of the DICOM node tests: an in-process raddraft SCP on a free port, real redis-server, datasets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from core.settings import Settings, load_settings
from dicom_node.index import Index
from dicom_node.receive import InstanceReceiver
from dicom_node.scp import DicomNode
from dicom_node.spool import Spool
from state.store import StateStore

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SCU_AE = "NODETEST"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home, "dicom_bind": "127.0.0.1", "dicom_port": 0, "min_free_disk_mb": 0,
        "study_idle_seconds": 0.5, "handoff_retry_seconds": 0.3, "network_timeout_s": 10,
    }
    values.update(overrides)
    return load_settings(**values)


@dataclass
class RunningNode:
    settings: Settings
    spool: Spool
    store: StateStore
    index: Index
    node: DicomNode

    @property
    def port(self) -> int:
        return self.node.address[1]

    def associate(self, contexts: list[str] | None = None, ae_title: str = SCU_AE,
                  called: str | None = None, **kwargs: Any) -> Any:
        ae = AE(ae_title=ae_title)
        for uid in contexts or [CTImageStorage]:
            ae.add_requested_context(uid)
        return ae.associate("127.0.0.1", self.port, ae_title=called or self.settings.ae_title, **kwargs)

    def files(self) -> list[Path]:
        """Every file under the spool (including tmp)."""
        return sorted(p for p in self.spool.root.rglob("*") if p.is_file())


@contextmanager
def running_node(settings: Settings) -> Iterator[RunningNode]:
    """A raddraft SCP started in-process on a free port (``dicom_port`` 0) with the settings' home."""
    spool = Spool(settings.spool_dir)
    spool.ensure()
    store = StateStore(settings.index_path)
    index = Index(store)
    receiver = InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb)
    node = DicomNode(settings, receiver)
    node.start()
    try:
        yield RunningNode(settings, spool, store, index, node)
    finally:
        node.stop()
        store.close()


@contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A real redis-server on *port* (a free one by default), without persistence; yields its URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (scripts/bootstrap.sh installs it)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _accepts(port) or process.poll() is not None, timeout=10, what="redis-server")
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode} on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def make_ct(study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None, *,
            position: float = 0.0, instance_number: int = 1, description: str = "node test") -> Dataset:
    """A small valid CT slice (8×8, 16-bit) in Explicit VR Little Endian with file meta."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Node^Test"
    ds.PatientID = "NODE-PID-1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = description
    ds.ImagePositionPatient = [0.0, 0.0, position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows = 8
    ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(128))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_ct(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file (after the file meta)."""
    with pydicom.dcmread(path, stop_before_pixels=False) as ds:
        meta_end = ds.file_meta.get("FileMetaInformationGroupLength")
    raw = path.read_bytes()
    assert meta_end is not None
    return raw[132 + 12 + int(meta_end):]


class Serve:
    """A ``raddraft serve`` subprocess on a free port (read from its INFO log); *prefix* wraps the command line
    (e.g. ``unshare ...``; it must exec the command so that ``process.pid`` is the server's)."""

    def __init__(self, home: Path, *args: str, prefix: tuple[str, ...] = (), **env: str) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}
        environment.update({"RADDRAFT_HOME": str(home), "RADDRAFT_DICOM_PORT": "0",
                            "RADDRAFT_DICOM_BIND": "127.0.0.1", "RADDRAFT_MIN_FREE_DISK_MB": "0",
                            "RADDRAFT_HTTP_PORT": "0", **env})
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "raddraft.cli", "serve", *args],
                                        env=environment, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.port or self.process.poll() is not None, timeout=60, what="serve listening")
        assert self.port, "".join(self.log)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))

    def associate(self, contexts: list[str] | None = None, **kwargs: Any) -> Association:
        ae = AE(ae_title=SCU_AE)
        for uid in contexts or [CTImageStorage]:
            ae.add_requested_context(uid)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="RADDRAFT", **kwargs)
        assert assoc.is_established
        return assoc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code
