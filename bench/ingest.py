"""Ingest benchmark (issue 2): how fast do raddraft, dcmtk storescp and Orthanc take one study over DICOM?

Generates ``--count`` CT instances (copies of pydicom's ``CT_small.dcm``, ~38 KB, one study and series, new
UIDs) and sends them with the same client and flags to each target: dcmtk ``storescu +sd`` over one
association on loopback. Targets: ``raddraft serve --no-worker`` (a subprocess with a temporary home and default
settings, so every instance is fsynced; the study idle time is raised and the in-process workers are off, so no
analysis and no model loading compete with the measured ingest),
dcmtk ``storescp`` and Orthanc (both from ``peers/``). Every target must have stored all instances,
else the run fails. Prints instances/s per target and the ratios raddraft/storescp and raddraft/Orthanc;
``--json`` prints the same as JSON.

Run from the repository root: ``.venv/bin/python -m bench.ingest [--count 500] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from peers import Orthanc, StoreSCP, free_port, stop_process, wait_for

log = logging.getLogger("bench.ingest")

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
CALLING_AET = "BENCH"
TARGETS = ("raddraft", "storescp", "orthanc")
GOAL_RADDRAFT_OVER_STORESCP = 1.5
# dcmtk's storescu leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment (--client-nodelay).
CLIENT_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}


@dataclass
class Measurement:
    target: str
    seconds: float
    stored: int
    instances_per_s: float


def generate(folder: Path, count: int) -> int:
    """Write *count* CT instances of one new study/series into *folder*; return the bytes of one file."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(SOURCE)
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    for number in range(1, count + 1):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = number
        template.save_as(folder / f"ct{number:05d}.dcm", enforce_file_format=True)
    return (folder / "ct00001.dcm").stat().st_size


def storescu(folder: Path, called_aet: str, port: int) -> float:
    """Send every file of *folder* over one association; return the wall-clock seconds."""
    argv = ["storescu", "+sd", "-aet", CALLING_AET, "-aec", called_aet, "127.0.0.1", str(port), str(folder)]
    started = time.perf_counter()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=3600, env=CLIENT_ENV)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {called_aet} exited with {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def echo_ok(called_aet: str, port: int) -> bool:
    argv = ["echoscu", "-aet", CALLING_AET, "-aec", called_aet, "-to", "2", "127.0.0.1", str(port)]
    return subprocess.run(argv, check=False, capture_output=True, timeout=30).returncode == 0


def measure(
    target: str, folder: Path, count: int, called_aet: str, port: int, stored: Callable[[], int]
) -> Measurement:
    seconds = storescu(folder, called_aet, port)
    wait_for(lambda: stored() >= count, timeout=30, what=f"{count} instances stored by {target}")
    return Measurement(target, round(seconds, 3), stored(), round(count / seconds, 1))


def bench_storescp(workdir: Path, folder: Path, count: int) -> Measurement:
    with StoreSCP(workdir / "storescp", accept_all_syntaxes=False) as scp:
        return measure("storescp", folder, count, scp.aet, scp.port, lambda: len(scp.received()))


def bench_orthanc(workdir: Path, folder: Path, count: int) -> Measurement:
    with Orthanc(workdir / "orthanc") as orthanc:
        return measure("orthanc", folder, count, orthanc.aet, orthanc.dicom_port,
                       lambda: int(orthanc.get("/statistics")["CountInstances"]))


def bench_raddraft(workdir: Path, folder: Path, count: int) -> Measurement:
    home = workdir / "raddraft-home"
    port = free_port()
    env = {
        **os.environ,
        "RADDRAFT_HOME": str(home),
        "RADDRAFT_DICOM_BIND": "127.0.0.1",
        "RADDRAFT_DICOM_PORT": str(port),
        "RADDRAFT_AE_TITLE": "RADDRAFT",
        "RADDRAFT_HTTP_PORT": str(free_port()),
        "RADDRAFT_STUDY_IDLE_SECONDS": "3600",  # measure ingest only: no hand-off or analysis during the run
        "RADDRAFT_LOG_LEVEL": "WARNING",
    }
    log_path = workdir / "raddraft-serve.log"
    with log_path.open("wb") as log_file:
        # --no-worker: ingest only; with the embedded broker serve would otherwise start the io/gpu workers and
        # load the model in the background while the instances arrive
        process = subprocess.Popen([sys.executable, "-m", "raddraft.cli", "serve", "--no-worker"], cwd=REPO, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"raddraft serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            return echo_ok("RADDRAFT", port)

        wait_for(ready, timeout=60, interval=0.2, what="raddraft serve answering C-ECHO")
        spool = home / "spool"
        return measure("raddraft", folder, count, "RADDRAFT", port,
                       lambda: sum(1 for p in spool.glob("*/*/*.dcm") if p.parent.parent.name != "tmp"))
    finally:
        stop_process(process, timeout=30)


RUNNERS: dict[str, Callable[[Path, Path, int], Measurement]] = {
    "raddraft": bench_raddraft,
    "storescp": bench_storescp,
    "orthanc": bench_orthanc,
}


def run(count: int, targets: list[str], workdir: Path, client_nodelay: bool = False) -> dict[str, object]:
    CLIENT_ENV.pop("TCP_NODELAY", None)
    if client_nodelay:
        CLIENT_ENV["TCP_NODELAY"] = "1"
    folder = workdir / "study"
    size = generate(folder, count)
    results = {target: RUNNERS[target](workdir, folder, count) for target in targets}
    ratios = {}
    if "raddraft" in results:
        for other in ("storescp", "orthanc"):
            if other in results:
                ratios[f"raddraft/{other}"] = round(
                    results["raddraft"].instances_per_s / results[other].instances_per_s, 2
                )
    report: dict[str, object] = {
        "count": count,
        "instance_bytes": size,
        "client": "dcmtk storescu +sd, one association, loopback"
        + (", TCP_NODELAY=1" if client_nodelay else " (Nagle on, dcmtk default)"),
        "targets": {name: asdict(m) for name, m in results.items()},
        "ratios": ratios,
    }
    if "raddraft/storescp" in ratios:
        report["goal_raddraft_over_storescp"] = GOAL_RADDRAFT_OVER_STORESCP
        report["goal_met"] = ratios["raddraft/storescp"] >= GOAL_RADDRAFT_OVER_STORESCP
    return report


def table(report: dict[str, object]) -> str:
    lines = [f"{report['count']} CT instances of {report['instance_bytes'] / 1024:.1f} KiB, {report['client']}",
             f"{'target':<10} {'seconds':>9} {'stored':>7} {'inst/s':>9}"]
    for name, m in report["targets"].items():  # type: ignore[attr-defined]
        lines.append(f"{name:<10} {m['seconds']:>9.2f} {m['stored']:>7} {m['instances_per_s']:>9.1f}")
    for name, ratio in report["ratios"].items():  # type: ignore[attr-defined]
        lines.append(f"{name:<20} {ratio:>6.2f}x")
    if "goal_met" in report:
        verdict = "met" if report["goal_met"] else "NOT met"
        lines.append(f"goal raddraft/storescp >= {GOAL_RADDRAFT_OVER_STORESCP}: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="instances to send (default 500)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--client-nodelay", action="store_true",
                        help="run storescu with TCP_NODELAY=1 (Nagle off on the client; off by default in dcmtk)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, received files)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or args.count < 1:
        parser.error(f"unknown targets {unknown}" if unknown else "--count must be at least 1")
    for tool in ("storescu", "echoscu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (dcmtk, orthanc: see scripts/bootstrap.sh)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="raddraft-bench-"))
    try:
        report = run(args.count, targets, workdir, client_nodelay=args.client_nodelay)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
