"""Per-study cost of each pipeline stage, called as the workers call them (no broker): prepare (manifest +
inference request), infer (the embedded model on the CPU), report (assemble, SR, narrative, GSPS, overlay, ORU)
and deliver (C-STORE to a real dcmtk ``storescp``), for a phantom radiograph and a phantom CT made ``--slices``
deep (default 300: the phantom's sections repeated with new UIDs and positions, 8 of them analysed).

    .venv/bin/python -m bench.stages                 # CR + 300-slice CT, 3 runs each
    .venv/bin/python -m bench.stages --runs 1 --slices 60 --json

Prints per study and stage the seconds (min/median/max over the runs, after one warm-up run), the bytes the report
stage read, and the size of the gpu message (the inference request as it travels).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from core.layout import request_path
from core.settings import Destination, Settings
from core.states import EpisodeState
from dicom_node.index import Index, InstanceRecord
from model.phantoms import generate_studies
from peers import StoreSCP
from state.store import StateStore
from workers import delivery, inference, pipeline
from workers.prepare import prepare_episode

log = logging.getLogger(__name__)
MODEL = "embedded"  # the trained small model in model/weights
STAGES = ("prepare", "infer", "report", "deliver")


@dataclass
class StudyFigures:
    name: str
    instances: int
    study_bytes: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    report_read_bytes: list[int] = field(default_factory=list)
    message_bytes: list[int] = field(default_factory=list)
    request_file_bytes: list[int] = field(default_factory=list)  # the report stage reads it back


def phantom_files(out: Path, modality: str, slices: int) -> list[Path]:
    """One phantom study of *modality* written to *out*; a CT/MR is made *slices* deep by repeating its sections
    (new SOP Instance UIDs, positions 1 mm apart), so the slice policy picks from a series of that length."""
    study = next(generate_studies(6 if modality == "CT" else 5, 1, modality))
    datasets = list(study.datasets)
    if modality != "CR" and slices > len(datasets):
        repeats = [copy.deepcopy(datasets[i * len(datasets) // slices]) for i in range(slices)]
        for number, ds in enumerate(repeats, start=1):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = number
            x, y, _ = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, float(number)]
            ds.SliceLocation = float(number)
        datasets = repeats
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = out / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def spool(settings: Settings, files: list[Path]) -> str:
    """Put *files* in the spool and the index as the node would (one episode, queued); the study UID."""
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    store = StateStore(settings.index_path)
    index = Index(store)
    study = ""
    try:
        for source in files:
            data = source.read_bytes()
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            target = settings.spool_dir / source.name
            target.write_bytes(data)
            record = InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID), patient_id="", sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="BENCH",
                peer_address="127.0.0.1", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                path=source.name, received_at=time.time())
            index.record_instance(record, place=lambda: None, is_duplicate=lambda _: False)
            study = record.study_instance_uid
        episode = store.episodes()[0]
        store.set_state(study, episode.episode_id, EpisodeState.QUEUED, time.time())
    finally:
        store.close()
    return study


@contextmanager
def read_bytes() -> Iterator[list[int]]:
    """The bytes this process read while the block runs (``rchar`` of /proc/self/io: every read call, files and
    the index alike; nothing else runs in this process meanwhile)."""
    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise RuntimeError("/proc/self/io has no rchar line")

    total: list[int] = []
    before = rchar()
    yield total
    total.append(rchar() - before)


def one_run(root: Path, files: list[Path], scp: StoreSCP, figures: StudyFigures) -> None:
    settings = Settings(home=root / "home", model=MODEL,
                        dicom_destinations=[Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port)])
    study = spool(settings, files)
    started = time.perf_counter()
    prepare_episode(settings, study, 1)
    request = pipeline.prepare_request(settings, study, 1)
    figures.seconds["prepare"].append(time.perf_counter() - started)
    figures.message_bytes.append(len(json.dumps(request.to_message())))
    figures.request_file_bytes.append(request_path(settings.home, study, 1).stat().st_size)
    started = time.perf_counter()
    [response] = inference.infer(settings, [request])
    figures.seconds["infer"].append(time.perf_counter() - started)
    started = time.perf_counter()
    with read_bytes() as read:
        outcome = pipeline.report_episode(settings, response, publish=lambda *_args, **_kw: None)
    figures.seconds["report"].append(time.perf_counter() - started)
    figures.report_read_bytes.append(read[0])
    if outcome is None:
        raise RuntimeError("the report stage found the episode already reported")
    started = time.perf_counter()
    store = StateStore(settings.index_path)
    try:
        for key in outcome.deliveries:
            delivery.run(settings, store, key, publish=lambda *_args, **_kw: None)
    finally:
        store.close()
    figures.seconds["deliver"].append(time.perf_counter() - started)


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300, help="depth of the CT study (default 300)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    inference.get_model(MODEL, "cpu")  # loaded once, outside the timed stages
    results: list[StudyFigures] = []
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp, StoreSCP(Path(tmp) / "scp") as scp:
        for modality in ("CR", "CT"):
            files = phantom_files(Path(tmp) / f"files-{modality}", modality, args.slices)
            size = sum(path.stat().st_size for path in files)
            figures = StudyFigures(f"{modality} ({len(files)} instance(s))", len(files), size)
            one_run(Path(tmp) / f"warm-{modality}", files, scp, StudyFigures("warm-up", len(files), 0))
            for run in range(args.runs):
                one_run(Path(tmp) / f"run-{modality}-{run}", files, scp, figures)
            results.append(figures)
    if args.json:
        print(json.dumps([f.__dict__ for f in results], indent=2))
        return 0
    print(f"seconds per stage, min / median / max of {args.runs} run(s)")
    for figures in results:
        print(f"\n{figures.name}")
        for stage in STAGES:
            print(f"  {stage:8s} {spread(figures.seconds[stage])} s")
        read = statistics.median(figures.report_read_bytes)
        request = statistics.median(figures.request_file_bytes)
        print(f"  report stage read {read / 2**20:.1f} MiB: the inference request ({request / 2**20:.1f} MiB), the "
              f"index, and {(read - request) / 2**20:.1f} MiB of the {figures.study_bytes / 2**20:.1f} MiB study")
        print(f"  gpu message {statistics.median(figures.message_bytes) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
