"""Ingest benchmark (issues 2 and 21): how fast do raddraft, dcmtk storescp and Orthanc take a study over DICOM?

Each *case* sends ``--count`` instances of one new study with dcmtk ``storescu +sd`` on loopback, the same files
and flags for every target, over one association or several in parallel (one ``storescu`` process each, each
with its own share of the files):

* ``nodelay`` (the case reported first): CT copies of pydicom's ``CT_small.dcm`` (~38 KB), one association,
  ``storescu`` with ``TCP_NODELAY=1`` (Nagle off on the client: what the receivers themselves cost);
* ``nodelay-8``: the same over eight associations at once;
* ``nodelay-big``: ``--big-count`` CT instances of ~0.5 MB (``CT_small.dcm`` with its pixel data tiled 4 × 4
  to 512 × 512), one association;
* ``nagle``: as ``nodelay`` with dcmtk's default client (Nagle on), as a modality with dcmtk defaults sends.

Targets: ``raddraft serve --no-worker`` (a subprocess with a temporary home and default settings, so every
instance is fsynced; the study idle time is raised and the in-process workers are off, so no analysis and no
model loading compete with the measured ingest), dcmtk ``storescp`` and Orthanc (both from ``peers/``, with
``TCP_NODELAY=1`` in their environment in the TCP_NODELAY cases) and ``pynetdicom``, an SCP configured as
raddraft's that stores nothing (bench/null_scp.py: pynetdicom's own ceiling), each started fresh for every
measurement. Every target must have stored all instances, else the run fails. In the
same round the disk's *fsync limit* is measured: files of the case's size written, fsynced, renamed into one
directory and the directory fsynced, by as many streams as the case has associations.

``--rounds`` rounds (default 3) run the targets side by side; the report gives min/median/max of instances/s,
of the receiver's CPU use and of its peak RSS (resident memory over the idle process, per association), and of
the per-round ratios raddraft/Orthanc, raddraft/storescp and raddraft/fsync-limit. ``--py-spy DIR`` records
raddraft with py-spy during each of its runs and prints where its association threads spend their time.

Run from the repository root: ``.venv/bin/python -m bench.ingest [--count 500] [--cases nodelay,nodelay-8]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from peers import Orthanc, StoreSCP, free_port, stop_process, wait_for

log = logging.getLogger("bench.ingest")

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
CALLING_AET = "BENCH"
TARGETS = ("raddraft", "storescp", "orthanc", "pynetdicom")
# issue 21: raddraft >= 1.5 x Orthanc and >= 70 % of the disk's fsync limit on one association
GOAL_OVER_ORTHANC = 1.5
GOAL_OF_FSYNC_LIMIT = 0.70
BIG_TILES = 4  # CT_small's 128 x 128 pixel data tiled 4 x 4: 512 x 512 x 16 bit, 0.5 MiB
SAMPLE_INTERVAL_S = 0.05  # how often the receiver's RSS and CPU are read during a run
MIB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    associations: int
    big: bool
    nodelay: bool

    def describe(self, count: int) -> str:
        client = "TCP_NODELAY=1" if self.nodelay else "Nagle on (dcmtk default)"
        size = "0.5 MB CT" if self.big else "38 KB CT"
        return f"{self.name}: {count} {size} instances, {self.associations} association(s), storescu {client}"


CASES: dict[str, Case] = {case.name: case for case in (
    Case("nodelay", 1, big=False, nodelay=True),
    Case("nodelay-8", 8, big=False, nodelay=True),
    Case("nodelay-big", 1, big=True, nodelay=True),
    Case("nagle", 1, big=False, nodelay=False),
)}


@dataclass
class Measurement:
    target: str
    seconds: float
    stored: int
    instances_per_s: float
    cpu_percent: float  # CPU time of the receiver (its process tree) over the wall-clock time, in % of one core
    rss_idle_mib: float
    rss_peak_mib: float
    rss_per_association_mib: float  # (peak - idle) / associations


@dataclass
class Folders:
    """The instances of one case: one folder per association (each its own share of the files)."""

    shares: list[Path]
    count: int
    instance_bytes: int


def _pixels(big: bool) -> tuple[pydicom.Dataset, bytes | None]:
    template = pydicom.dcmread(SOURCE)
    if not big:
        return template, None
    original = template.pixel_array
    tiled = np.tile(original, (BIG_TILES, BIG_TILES)).astype(original.dtype)
    template.Rows, template.Columns = tiled.shape
    return template, tiled.tobytes()


def generate(folder: Path, count: int, associations: int, big: bool) -> Folders:
    """Write *count* CT instances of one new study/series into *associations* sub-folders (round robin)."""
    shares = [folder / f"association{number:02d}" for number in range(associations)]
    for share in shares:
        share.mkdir(parents=True, exist_ok=True)
    template, pixels = _pixels(big)
    if pixels is not None:
        template.PixelData = pixels
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    for number in range(1, count + 1):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = number
        template.save_as(shares[number % associations] / f"ct{number:05d}.dcm", enforce_file_format=True)
    size = next(shares[1 % associations].iterdir()).stat().st_size
    return Folders(shares, count, size)


def client_env(nodelay: bool) -> dict[str, str]:
    """storescu's environment: dcmtk sets TCP_NODELAY on its socket only when TCP_NODELAY=1 is in it."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def storescu(folders: Folders, called_aet: str, port: int, nodelay: bool) -> float:
    """Send every share over its own association, all at once; return the wall-clock seconds until all are done."""
    env = client_env(nodelay)
    started = time.perf_counter()
    processes = [subprocess.Popen(["storescu", "+sd", "-aet", CALLING_AET, "-aec", called_aet, "127.0.0.1",
                                   str(port), str(share)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for share in folders.shares]
    failures = []
    for process in processes:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            failures.append(f"storescu exited with {process.returncode}: {stderr[-1000:]}")
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"sending to {called_aet}: " + "; ".join(failures))
    return seconds


def echo_ok(called_aet: str, port: int) -> bool:
    argv = ["echoscu", "-aet", CALLING_AET, "-aec", called_aet, "-to", "2", "127.0.0.1", str(port)]
    return subprocess.run(argv, check=False, capture_output=True, timeout=30).returncode == 0


# --- the receiver's memory and CPU ------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """*pid* and its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _rss_and_cpu(pid: int) -> tuple[int, float]:
    """Resident bytes and CPU seconds (user + system) of *pid*'s process tree now."""
    rss, cpu = 0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for member in _tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            rss += int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
            cpu += (int(stat[11]) + int(stat[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return rss, cpu


@dataclass
class Sampler:
    """Reads the RSS and CPU time of a process tree every :data:`SAMPLE_INTERVAL_S` while running."""

    pid: int
    idle_rss: int = 0
    peak_rss: int = 0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak_rss = max(self.peak_rss, _rss_and_cpu(self.pid)[0])

    @contextmanager
    def sampling(self) -> Iterator[None]:
        self.idle_rss, self.cpu_start = _rss_and_cpu(self.pid)
        self.peak_rss = self.idle_rss
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            rss, self.cpu_end = _rss_and_cpu(self.pid)
            self.peak_rss = max(self.peak_rss, rss)


@contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """Record *pid* with py-spy (raw collapsed stacks, idle frames too) into *output*, if given."""
    if output is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    process = subprocess.Popen([spy, "record", "--idle", "--nonblocking", "-r", "250", "-f", "raw", "-o",
                                str(output), "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def measure(target: str, folders: Folders, case: Case, called_aet: str, port: int, pid: int,
            stored: Callable[[], int], profile: Path | None = None) -> Measurement:
    sampler = Sampler(pid)
    with py_spy(pid, profile), sampler.sampling():
        seconds = storescu(folders, called_aet, port, case.nodelay)
    wait_for(lambda: stored() >= folders.count, timeout=60, what=f"{folders.count} instances stored by {target}")
    return Measurement(
        target, round(seconds, 3), stored(), round(folders.count / seconds, 1),
        cpu_percent=round(100 * (sampler.cpu_end - sampler.cpu_start) / seconds, 1),
        rss_idle_mib=round(sampler.idle_rss / MIB, 1), rss_peak_mib=round(sampler.peak_rss / MIB, 1),
        rss_per_association_mib=round((sampler.peak_rss - sampler.idle_rss) / MIB / case.associations, 2),
    )


@contextmanager
def server_nodelay(nodelay: bool) -> Iterator[None]:
    """``TCP_NODELAY=1`` in the environment a dcmtk-based server (storescp, Orthanc) inherits, when *nodelay*:
    dcmtk's switch for its own sockets, as for storescu. A Nagle-on server answers each C-STORE a delayed ACK
    late (~40 ms) even to a Nagle-off client; raddraft sets TCP_NODELAY itself (dicom_node/handlers.py)."""
    saved = os.environ.pop("TCP_NODELAY", None)
    if nodelay:
        os.environ["TCP_NODELAY"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TCP_NODELAY", None)
        if saved is not None:
            os.environ["TCP_NODELAY"] = saved


def bench_storescp(workdir: Path, folders: Folders, case: Case, profile: Path | None) -> Measurement:
    with server_nodelay(case.nodelay), StoreSCP(workdir / "storescp", accept_all_syntaxes=False) as scp:
        assert scp.process is not None
        return measure("storescp", folders, case, scp.aet, scp.port, scp.process.pid, lambda: len(scp.received()))


def bench_orthanc(workdir: Path, folders: Folders, case: Case, profile: Path | None) -> Measurement:
    with server_nodelay(case.nodelay), Orthanc(workdir / "orthanc") as orthanc:  # Orthanc's DICOM is dcmtk's
        assert orthanc.process is not None
        return measure("orthanc", folders, case, orthanc.aet, orthanc.dicom_port, orthanc.process.pid,
                       lambda: int(orthanc.get("/statistics")["CountInstances"]))


def bench_raddraft(workdir: Path, folders: Folders, case: Case, profile: Path | None, *, repo: Path = REPO,
                   target: str = "raddraft") -> Measurement:
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
        process = subprocess.Popen([sys.executable, "-m", "raddraft.cli", "serve", "--no-worker"], cwd=repo,
                                   env={**env, "PYTHONPATH": str(repo)}, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"raddraft serve exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            return echo_ok("RADDRAFT", port)

        wait_for(ready, timeout=60, interval=0.2, what="raddraft serve answering C-ECHO")
        spool = home / "spool"
        return measure(target, folders, case, "RADDRAFT", port, process.pid,
                       lambda: sum(1 for p in spool.glob("*/*/*.dcm") if p.parent.parent.name != "tmp"), profile)
    finally:
        stop_process(process, timeout=30)


def bench_null_scp(workdir: Path, folders: Folders, case: Case, profile: Path | None) -> Measurement:
    """bench/null_scp.py: a pynetdicom SCP configured as raddraft's that stores nothing (pynetdicom's ceiling)."""
    port, count_file = free_port(), workdir / "null-scp.count"
    count_file.touch()
    process = subprocess.Popen([sys.executable, "-m", "bench.null_scp", str(port), str(count_file)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: process.poll() is None and echo_ok("NULLSCP", port), timeout=60, interval=0.2,
                 what="the null SCP answering C-ECHO")
        return measure("pynetdicom", folders, case, "NULLSCP", port, process.pid,
                       lambda: count_file.stat().st_size, profile=None)
    finally:
        stop_process(process, timeout=30)


RUNNERS: dict[str, Callable[[Path, Folders, Case, Path | None], Measurement]] = {
    "raddraft": bench_raddraft,
    "storescp": bench_storescp,
    "orthanc": bench_orthanc,
    "pynetdicom": bench_null_scp,
}


# --- the disk -------------------------------------------------------------------------------------------------
def fsync_limit(directory: Path, size: int, count: int, streams: int) -> float:
    """Files/s the disk takes as a durable store does: write *size* bytes to a temporary file, fsync it, rename
    it into one directory and fsync that directory; *count* files over *streams* parallel threads."""
    final_dir, tmp_dir = directory / "final", directory / "tmp"
    final_dir.mkdir(parents=True)
    tmp_dir.mkdir()
    payload = os.urandom(size)

    def stream(files: int) -> None:
        for _ in range(files):
            name = f"{uuid.uuid4().hex}.dcm"
            fd = os.open(tmp_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_dir / name, final_dir / name)
            dir_fd = os.open(final_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    shares = [count // streams + (1 if n < count % streams else 0) for n in range(streams)]
    threads = [threading.Thread(target=stream, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    shutil.rmtree(directory)
    return round(count / seconds, 1)


# --- rounds and the report ------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def run_case(case: Case, count: int, targets: list[str], rounds: int, workdir: Path,
             profile_dir: Path | None) -> dict[str, object]:
    folders = generate(workdir / f"study-{case.name}", count, case.associations, case.big)
    per_round: list[dict[str, Measurement]] = []
    limits: list[float] = []
    for number in range(1, rounds + 1):
        measured: dict[str, Measurement] = {}
        for target in targets:
            target_dir = workdir / f"{case.name}-{target}-{number}"
            target_dir.mkdir()
            profile = profile_dir / f"{case.name}-round{number}.txt" if profile_dir and target == "raddraft" else None
            measured[target] = RUNNERS[target](target_dir, folders, case, profile)
            shutil.rmtree(target_dir, ignore_errors=True)
            log.info("%s round %d %s: %.1f inst/s", case.name, number, target, measured[target].instances_per_s)
        limits.append(fsync_limit(workdir / f"fsync-{case.name}-{number}", folders.instance_bytes, min(count, 500),
                                  case.associations))
        per_round.append(measured)
    report: dict[str, object] = {
        "case": case.describe(count),
        "instance_bytes": folders.instance_bytes,
        "rounds": rounds,
        "targets": {target: {
            metric: spread([float(getattr(m[target], metric)) for m in per_round])
            for metric in ("instances_per_s", "cpu_percent", "rss_peak_mib", "rss_per_association_mib")
        } for target in targets},
        "fsync_limit_files_per_s": spread(limits),
        "runs": [{target: asdict(m) for target, m in measured.items()} for measured in per_round],
    }
    ratios: dict[str, dict[str, float]] = {}
    if "raddraft" in targets:
        for other in ("orthanc", "storescp", "pynetdicom", "baseline"):
            if other in targets:
                ratios[f"raddraft/{other}"] = spread([m["raddraft"].instances_per_s / m[other].instances_per_s
                                                      for m in per_round])
        ratios["raddraft/fsync-limit"] = spread([m["raddraft"].instances_per_s / limit
                                                 for m, limit in zip(per_round, limits, strict=True)])
    report["ratios"] = ratios
    if case.associations == 1 and "raddraft/orthanc" in ratios:
        report["goals"] = {
            f"raddraft/orthanc >= {GOAL_OVER_ORTHANC}": ratios["raddraft/orthanc"]["median"] >= GOAL_OVER_ORTHANC,
            f"raddraft/fsync-limit >= {GOAL_OF_FSYNC_LIMIT}":
                ratios["raddraft/fsync-limit"]["median"] >= GOAL_OF_FSYNC_LIMIT,
        }
    if profile_dir is not None and "raddraft" in targets:
        report["profile"] = profile_breakdown(sorted(profile_dir.glob(f"{case.name}-round*.txt")))
    shutil.rmtree(folders.shares[0].parent, ignore_errors=True)
    return report


# --- py-spy profiles ------------------------------------------------------------------------------------------
# What an association's thread does, by the first frame (root to leaf) that names it; see profile_breakdown.
PROFILE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("parse (dcmread)", "dcmread ("),
    ("validate (decode / check)", "decode_all ("),
    ("validate (decode / check)", "check_structure ("),
    ("validate (decode / check)", "check_instance ("),
    ("validate (decode / check)", "check_inflated_size ("),
    ("hash (sha256)", "content_sha256 ("),
    ("stage + file fsync", "stage ("),
    ("index commit (rename, dir fsync, SQLite)", "record_instance ("),
    ("index commit (rename, dir fsync, SQLite)", "_commit_batch ("),
    ("index reads", "Index.instance ("),
    ("free-space check", "free_bytes ("),
    ("C-STORE handler, other", "handle_store ("),
)


def _leaf(stack: str) -> str:
    """The function name of the innermost frame of a collapsed stack (``Class.method (file:line)``)."""
    return stack.rsplit(";", 1)[-1].split(" (", 1)[0]


def _category(stack: str) -> str:
    if _leaf(stack).endswith("._run_reactor"):  # its loop itself: time.sleep(0.001), a C call with no frame
        return "pynetdicom reactor loop (1 ms sleeps)"
    if _leaf(stack) == "InstanceReceiver._receive":  # blocked in `with self._parsing` (dicom_node/receive.py)
        return "wait for the parsing gate"
    for label, marker in PROFILE_CATEGORIES:
        if marker in stack:
            return label
    return "pynetdicom (DIMSE decode, response, other)"


def profile_breakdown(paths: list[Path]) -> dict[str, dict[str, float]]:
    """Where the association threads' wall-clock time goes, in % of their samples per category: ``association``
    (stacks through ``Association._run_reactor``: the C-STORE handler runs there) and ``dul`` (pynetdicom's
    DUL thread of each association, which reads and decodes the PDUs)."""
    tally: dict[str, Counter[str]] = {"association": Counter(), "dul": Counter()}
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            if not samples.isdigit():
                continue
            if "._run_reactor (" in stack:
                tally["association"][_category(stack)] += int(samples)
            elif "DULServiceProvider.run_reactor (" in stack:
                idle = _leaf(stack) == "DULServiceProvider.run_reactor"
                tally["dul"]["reactor loop (1 ms sleeps)" if idle else "reading and decoding PDUs"] += int(samples)
    return {thread: {label: round(100 * n / (sum(counts.values()) or 1), 1) for label, n in counts.most_common()}
            for thread, counts in tally.items()}


def table(reports: list[dict[str, object]]) -> str:
    lines = []
    for report in reports:
        lines.append(f"{report['case']} ({report['instance_bytes'] / 1024:.1f} KiB), {report['rounds']} rounds: "
                     "min / median / max")
        lines.append(f"  {'target':<10} {'inst/s':>22} {'CPU %':>20} {'peak RSS MiB':>20} {'MiB/association':>18}")
        for name, metrics in report["targets"].items():  # type: ignore[attr-defined]
            cells = [" / ".join(f"{metrics[key][s]:g}" for s in ("min", "median", "max"))
                     for key in ("instances_per_s", "cpu_percent", "rss_peak_mib", "rss_per_association_mib")]
            lines.append(f"  {name:<10} {cells[0]:>22} {cells[1]:>20} {cells[2]:>20} {cells[3]:>18}")
        limit = report["fsync_limit_files_per_s"]
        lines.append(f"  {'fsync limit':<10} {' / '.join(f'{limit[s]:g}' for s in ('min', 'median', 'max')):>22}"  # type: ignore[index]
                     " files/s (write + fsync + rename + directory fsync)")
        for name, ratio in report["ratios"].items():  # type: ignore[attr-defined]
            lines.append(f"  {name:<22} {ratio['min']:.2f} / {ratio['median']:.2f} / {ratio['max']:.2f}")
        for goal, met in report.get("goals", {}).items():  # type: ignore[attr-defined]
            lines.append(f"  goal (median) {goal}: {'met' if met else 'NOT met'}")
        for thread, shares in report.get("profile", {}).items():  # type: ignore[attr-defined]
            for label, share in shares.items():
                lines.append(f"  profile, {thread} threads: {share:5.1f} % {label}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="38 KB instances per case (default 500)")
    parser.add_argument("--big-count", type=int, default=100, help="0.5 MB instances of nodelay-big (default 100)")
    parser.add_argument("--cases", default="nodelay,nagle,nodelay-8,nodelay-big",
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--associations", type=int, default=None,
                        help="run only the 38 KB TCP_NODELAY case over this many associations (e.g. 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every target side by side (default 3)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record raddraft with py-spy into DIR and print where its association threads' time goes")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="also run raddraft serve from another checkout (e.g. the code before a change) as "
                             "target 'baseline', side by side, with the ratio raddraft/baseline")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, received files)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        RUNNERS["baseline"] = lambda workdir, folders, case, _profile: bench_raddraft(
            workdir, folders, case, None, repo=baseline, target="baseline")
        targets.insert(1 if "raddraft" in targets else 0, "baseline")
    if args.associations is not None:
        cases = [Case(f"nodelay-{args.associations}" if args.associations > 1 else "nodelay", args.associations,
                      big=False, nodelay=True)]
    else:
        cases = [CASES[name] for name in args.cases.split(",") if name in CASES]
    unknown = sorted(set(targets) - set(RUNNERS)) + sorted(set(args.cases.split(",")) - set(CASES))
    if unknown or args.count < 1 or args.rounds < 1 or not cases:
        parser.error(f"unknown targets or cases {unknown}" if unknown else "--count, --rounds and cases are needed")
    for case in cases:
        count = args.big_count if case.big else args.count
        if count < case.associations:
            parser.error(f"case {case.name}: {count} instance(s) are fewer than its {case.associations} associations "
                         "(each sends its own share): give more with --count / --big-count")
    for tool in ("storescu", "echoscu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (dcmtk, orthanc: see scripts/bootstrap.sh)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="raddraft-bench-"))
    try:
        reports = [run_case(case, args.big_count if case.big else args.count, targets, args.rounds, workdir,
                            args.py_spy) for case in cases]
    finally:
        if args.keep:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(reports, indent=2) if args.json else table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
