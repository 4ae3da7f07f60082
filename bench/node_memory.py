"""Node memory per received instance (issue 17): pynetdicom's chunked receive off (the old path) and on.

Starts the raddraft storage SCP in this process (a temporary home, default settings: every instance fsynced) and
sends it, with dcmtk ``storescu`` in its own process (so only the node is measured), one instance of
``--big-mib`` MiB (a CT, Explicit VR Little Endian, random pixel data) and then ``--small`` copies of pydicom's
``CT_small.dcm`` (new UIDs, one association). Chunked receive (``pynetdicom._config.STORE_RECV_CHUNKED_DATASET``,
which :func:`dicom_node.scp.build_ae` turns on) is set off or on after the AE is built; the modes alternate,
``--runs`` times each. Per run: the traced peak (tracemalloc, growth over the traced memory before the store),
the RSS growth (peak RSS after ``/proc/self/clear_refs`` reset it, minus the RSS before) while the big instance
is stored, and the wall-clock time per small instance. Prints min/median/max per mode and the on/off ratios of
the medians; ``--json`` prints the same as JSON.

Run from the repository root: ``.venv/bin/python -m bench.node_memory [--runs 3] [--big-mib 200] [--small 50]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config

from core.settings import load_settings
from dicom_node.index import Index
from dicom_node.receive import InstanceReceiver
from dicom_node.scp import DicomNode
from dicom_node.spool import Spool

log = logging.getLogger("bench.node_memory")

MIB = 1024 * 1024
SOURCE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
CALLING_AET = "BENCH"
MODES = {"off": False, "on": True}


@dataclass
class Run:
    mode: str
    traced_peak_mib: float
    rss_growth_mib: float | None
    small_ms: float


def write_big(path: Path, mib: int) -> int:
    """A CT of *mib* MiB of random 16-bit pixel data, written in pieces; its file size."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BENCH-1"
    ds.Modality = "CT"
    ds.Columns = 8192
    ds.Rows = mib * MIB // (ds.Columns * 2)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    pixels = ds.Rows * ds.Columns * 2
    with path.open("wb") as handle:
        handle.write(buffer.getvalue())
        handle.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels))
        for _ in range(pixels // MIB):
            handle.write(os.urandom(MIB))
    return path.stat().st_size


def write_small(folder: Path, count: int) -> None:
    """*count* copies of ``CT_small.dcm`` with new UIDs (one study and series)."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(SOURCE)
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    for number in range(1, count + 1):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.save_as(folder / f"ct{number:05d}.dcm", enforce_file_format=True)


def storescu(port: int, *paths: Path, scan_dir: bool = False) -> float:
    """Send *paths* over one association with dcmtk's storescu; its wall-clock seconds."""
    argv = ["storescu", *(["+sd"] if scan_dir else []), "-aet", CALLING_AET, "-aec", "RADDRAFT", "127.0.0.1",
            str(port), *map(str, paths)]
    started = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "Failed" in done.stderr:
        raise RuntimeError(f"storescu exited with {done.returncode}: {done.stderr[-2000:]}")
    return seconds


@contextmanager
def node(home: Path, chunked: bool) -> Iterator[tuple[DicomNode, Index]]:
    settings = load_settings(home=home, dicom_bind="127.0.0.1", dicom_port=0, min_free_disk_mb=0,
                             study_idle_seconds=3600, max_instance_mb=4096)
    spool = Spool(settings.spool_dir)
    spool.ensure()
    index = Index(settings.index_path)
    dicom = DicomNode(settings, InstanceReceiver(spool, index, settings.max_instance_mb, settings.min_free_disk_mb))
    _config.STORE_RECV_CHUNKED_DATASET = chunked  # build_ae turned it on; off reproduces the old receive path
    dicom.start()
    try:
        yield dicom, index
    finally:
        dicom.stop()
        index.close()
        _config.STORE_RECV_CHUNKED_DATASET = True


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def one_run(workdir: Path, mode: str, big: Path, small: Path, small_count: int) -> Run:
    home = workdir / f"home-{mode}"
    try:
        with node(home, MODES[mode]) as (dicom, index):
            port = dicom.address[1]
            storescu(port, SOURCE)  # warm-up: first association, imports, index schema
            resettable = _reset_peak_rss()
            rss_before = _status_kib("VmRSS")
            tracemalloc.start()
            try:
                traced_before, _ = tracemalloc.get_traced_memory()
                storescu(port, big)
                _, traced_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            rss_growth = (_status_kib("VmHWM") - rss_before) / 1024 if resettable else None
            before = index.count_instances()
            seconds = storescu(port, small, scan_dir=True)
            if index.count_instances() - before != small_count:
                raise RuntimeError(f"{small_count} small instances sent, "
                                   f"{index.count_instances() - before} stored")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return Run(mode, round((traced_peak - traced_before) / MIB, 1),
               None if rss_growth is None else round(rss_growth, 1), round(seconds * 1000 / small_count, 2))


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run(workdir: Path, runs: int, big_mib: int, small_count: int) -> dict[str, object]:
    big = workdir / "big.dcm"
    size = write_big(big, big_mib)
    small = workdir / "small"
    write_small(small, small_count)
    results: list[Run] = []
    for number in range(runs):
        for mode in MODES:
            results.append(one_run(workdir, mode, big, small, small_count))
            log.info("run %d %s: %s", number + 1, mode, results[-1])
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode in MODES:
        mine = [r for r in results if r.mode == mode]
        summary[mode] = {"traced_peak_mib": spread([r.traced_peak_mib for r in mine]),
                         "small_ms": spread([r.small_ms for r in mine])}
        rss = [r.rss_growth_mib for r in mine if r.rss_growth_mib is not None]
        if rss:
            summary[mode]["rss_growth_mib"] = spread(rss)
    ratios = {metric: round(summary["on"][metric]["median"] / summary["off"][metric]["median"], 3)
              for metric in summary["on"] if summary["off"][metric]["median"]}
    return {"big_instance_mib": round(size / MIB, 1), "small_instances": small_count, "runs": runs,
            "client": "dcmtk storescu (own process), loopback", "results": [asdict(r) for r in results],
            "summary": summary, "ratios_on_over_off": ratios}


def table(report: dict[str, object]) -> str:
    lines = [f"one {report['big_instance_mib']} MiB CT, then {report['small_instances']} CT_small over one "
             f"association; {report['runs']} runs per mode; {report['client']}",
             f"{'metric':<18} {'mode':<4} {'min':>9} {'median':>9} {'max':>9}"]
    summary = report["summary"]
    assert isinstance(summary, dict)
    for metric in ("traced_peak_mib", "rss_growth_mib", "small_ms"):
        for mode in MODES:
            if metric in summary[mode]:
                s = summary[mode][metric]
                lines.append(f"{metric:<18} {mode:<4} {s['min']:>9.1f} {s['median']:>9.1f} {s['max']:>9.1f}"
                             if metric != "small_ms" else
                             f"{metric:<18} {mode:<4} {s['min']:>9.2f} {s['median']:>9.2f} {s['max']:>9.2f}")
    ratios = report["ratios_on_over_off"]
    assert isinstance(ratios, dict)
    for metric, ratio in ratios.items():
        lines.append(f"on/off {metric:<18} {ratio:>8.3f}x (medians)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument("--big-mib", type=int, default=200, help="size of the big instance's pixel data (200)")
    parser.add_argument("--small", type=int, default=50, help="small instances per run (default 50)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.big_mib < 1 or args.small < 1:
        parser.error("--runs, --big-mib and --small must be at least 1")
    if shutil.which("storescu") is None:
        parser.error("storescu is not installed (dcmtk: see scripts/bootstrap.sh)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    log.setLevel(logging.INFO)
    workdir = Path(tempfile.mkdtemp(prefix="raddraft-bench-memory-"))
    try:
        report = run(workdir, args.runs, args.big_mib, args.small)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
