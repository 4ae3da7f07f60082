"""A burst of studies sent at once, end to end (issue 21): the embedded default against the Redis deployment.

    .venv/bin/python -m bench.burst                  # 40 CR + 10 CT phantom studies, 3 runs of each mode
    .venv/bin/python -m bench.burst --studies 10 --runs 1
    .venv/bin/python -m bench.burst --modes embedded,redis,sqlite

Modes, alternating within each run (so that both see the same machine load):

* ``embedded``: ``raddraft serve`` with no ``broker_url`` (its own redis-server on a unix socket, its io and gpu
  worker processes);
* ``redis``: a redis-server peer (append-only, fsync always, as a production broker), ``raddraft serve`` (with
  an external broker it starts no workers, as ``--no-worker``) and one ``raddraft worker --queues io`` and one
  ``--queues gpu``;
* ``sqlite``: ``broker_url = "sqla+sqlite:///…"`` (the previous default: in-process workers, a polled broker).

Each run of a mode gets a fresh home and a fresh Orthanc (source and destination); the phantom studies are
uploaded to Orthanc first, the model is loaded and the workers are up, then Orthanc C-STOREs every study to the
gateway in one request. Measured: the burst (first send to the last study's SR in Orthanc, seen on Orthanc's
change feed), studies per minute, each study's latency from its last instance (the gateway's
``last_received_at``) to its SR, the CPU the gateway's processes used during the burst (serve, its children,
the workers and the broker, from /proc; in % of one core), and the broker's files after the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from model.phantoms import write_studies
from peers import Orthanc, wait_for
from peers.gateway import MODEL, DurableRedis, Process, base_env, connect_orthanc, gateway, worker
from state.store import StateStore

log = logging.getLogger("bench.burst")
MODES = ("embedded", "redis", "sqlite")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    burst_s: float
    per_minute: float
    latency_median_s: float
    latency_p90_s: float
    cpu_percent: float  # of one core, summed over the gateway's processes
    broker_bytes: int


# --- /proc ---------------------------------------------------------------------------------------------------

def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _tree(roots: list[int]) -> list[int]:
    pids, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


class CpuMeter:
    """CPU seconds used by the process trees of *roots* between :meth:`start` and :meth:`stop`."""

    def __init__(self, roots: Callable[[], list[int]]) -> None:
        self._roots = roots
        self._start: dict[int, int] = {}

    def start(self) -> None:
        self._start = {pid: t for pid in _tree(self._roots()) if (t := _cpu_ticks(pid)) is not None}

    def stop(self) -> float:
        used = 0
        for pid in _tree(self._roots()):
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                used += ticks - self._start.get(pid, 0)
        return used / CLOCK_TICKS


# --- Orthanc ---------------------------------------------------------------------------------------------------

class SrWatch:
    """Follows Orthanc's change feed; the wall-clock time each study (Orthanc ID) first had an SR series."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.first_sr: dict[str, float] = {}
        self._since = int(orthanc.get("/changes?last")["Last"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            answer = self.orthanc.get(f"/changes?since={self._since}&limit=1000")
            for change in answer["Changes"]:
                if change["ChangeType"] == "NewSeries":
                    series = self.orthanc.get(f"/series/{change['ID']}")
                    if series["MainDicomTags"].get("Modality") == "SR":
                        self.first_sr.setdefault(series["ParentStudy"], time.time())
            self._since = int(answer["Last"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- the modes ---------------------------------------------------------------------------------------------------

@contextmanager
def running_mode(mode: str, root: Path, orthanc: Orthanc) -> Iterator[tuple[int, Callable[[], list[int]], Path,
                                                                           list[Process]]]:
    """The gateway of *mode*: (its DICOM port, its process roots, the broker's data folder, its processes)."""
    home = root / "home"
    env = base_env(home, RADDRAFT_DICOM_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    with ExitStack() as stack:
        if mode == "embedded":
            serve = stack.enter_context(gateway(home, env))
            processes = [serve]
            broker_dir = home / "broker" / "appendonlydir"
            wait_for(lambda: serve.log.count("[tasks]") >= 2, timeout=120, what="both worker processes up")
            roots: Callable[[], list[int]] = lambda: [serve.process.pid]  # noqa: E731 - its tree has all
        elif mode == "redis":
            redis = stack.enter_context(DurableRedis(root / "redis"))
            env["RADDRAFT_BROKER_URL"] = redis.url
            serve = stack.enter_context(gateway(home, env))  # an external broker: serve starts no workers
            io = stack.enter_context(worker("io", env))
            gpu = stack.enter_context(worker("gpu", env))
            processes = [serve, io, gpu]
            broker_dir = redis.workdir / "appendonlydir"
            assert redis.process is not None
            redis_pid = redis.process.pid
            roots = lambda: [serve.process.pid, io.process.pid, gpu.process.pid, redis_pid]  # noqa: E731
        else:
            env["RADDRAFT_BROKER_URL"] = f"sqla+sqlite:///{(home / 'broker.sqlite').resolve()}"
            serve = stack.enter_context(gateway(home, env))
            processes = [serve]
            broker_dir = home / "broker.sqlite"
            roots = lambda: [serve.process.pid]  # noqa: E731
        wait_for(lambda: any("workers.inference: model" in p.log and " loaded on " in p.log for p in processes),
                 timeout=120, what="model loaded")
        yield serve.port, roots, broker_dir, processes


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def one_run(mode: str, root: Path, studies: list[list[Path]]) -> Result:
    with Orthanc(root / "orthanc") as orthanc:
        ids = []
        for files in studies:
            study_id = ""
            for path in files:
                study_id = orthanc.upload(path)["ParentStudy"]
            ids.append(study_id)
        with running_mode(mode, root, orthanc) as (port, roots, broker_dir, _processes):
            connect_orthanc(orthanc, port)
            watch = SrWatch(orthanc)
            meter = CpuMeter(roots)
            meter.start()
            started = time.time()
            orthanc.store_to("raddraft", ids)  # one association, every study, returns after the last C-STORE
            wait_for(lambda: len(watch.first_sr) >= len(ids), timeout=1800, interval=0.2,
                     what=f"an SR for each of {len(ids)} studies")
            cpu_s = meter.stop()
            watch.stop()
            burst = max(watch.first_sr.values()) - started
            store = StateStore(root / "home" / "index.sqlite")
            try:
                last_received = {e.study_instance_uid: e.last_received_at for e in store.episodes()}
            finally:
                store.close()
            by_orthanc = {orthanc.get(f"/studies/{i}")["MainDicomTags"]["StudyInstanceUID"]: i for i in ids}
            latencies = sorted(watch.first_sr[by_orthanc[uid]] - at for uid, at in last_received.items())
        broker_bytes = _size(broker_dir)  # after the gateway (and its broker) stopped
    return Result(burst_s=burst, per_minute=len(ids) / burst * 60, latency_median_s=statistics.median(latencies),
                  latency_p90_s=latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
                  cpu_percent=cpu_s / burst * 100, broker_bytes=broker_bytes)


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(min(values))} / {fmt.format(statistics.median(values))} / "
            f"{fmt.format(max(values))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50, help="studies in the burst, 4 CR to 1 CT (default 50)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="embedded,redis", help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("peers").setLevel(logging.WARNING)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown or not modes:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    ct = max(1, args.studies // 5) if args.studies >= 5 else 0
    cr = args.studies - ct
    results: dict[str, list[Result]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        root = Path(tmp)
        studies: list[list[Path]] = []
        for modality, count, seed in (("CR", cr, 1000), ("CT", ct, 2000)):
            if count:
                out = root / "phantoms" / modality
                write_studies(out, seed=seed, count=count, modality=modality)
                studies += [sorted(folder.glob("*.dcm")) for folder in sorted(out.iterdir()) if folder.is_dir()]
        log.info("%d studies (%d CR, %d CT, %d instances), model %s, %d run(s) of %s", len(studies), cr, ct,
                 sum(map(len, studies)), MODEL, args.runs, ", ".join(modes))
        for run in range(args.runs):
            order = modes if run % 2 == 0 else modes[::-1]  # alternate which mode goes first
            for mode in order:
                result = one_run(mode, root / f"run{run}-{mode}", studies)
                results[mode].append(result)
                log.info("run %d %s: burst %.1f s, %.0f studies/min, latency median %.1f s p90 %.1f s, CPU %.0f %%, "
                         "broker %.0f KB", run + 1, mode, result.burst_s, result.per_minute,
                         result.latency_median_s, result.latency_p90_s, result.cpu_percent,
                         result.broker_bytes / 1e3)
    lines = [f"{len(studies)} studies ({cr} CR + {ct} CT), {args.runs} run(s), {os.cpu_count()} CPU(s); "
             "min / median / max over runs", "",
             "| mode | burst s | studies/min | latency median s | latency p90 s | gateway CPU % of one core | "
             "broker files KB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in modes:
        rs = results[mode]
        lines.append(f"| {mode} | {_spread([r.burst_s for r in rs])} | "
                     f"{_spread([r.per_minute for r in rs], '{:.0f}')} | "
                     f"{_spread([r.latency_median_s for r in rs])} | {_spread([r.latency_p90_s for r in rs])} | "
                     f"{_spread([r.cpu_percent for r in rs], '{:.0f}')} | "
                     f"{_spread([r.broker_bytes / 1e3 for r in rs], '{:.0f}')} |")
    if "embedded" in results and "redis" in results:
        pairs = list(zip(results["embedded"], results["redis"], strict=True))
        lines += ["", "embedded / redis, run by run (min / median / max):",
                  f"- studies/min: {_spread([e.per_minute / r.per_minute for e, r in pairs], '{:.2f}')}",
                  f"- latency median (lower is better): "
                  f"{_spread([e.latency_median_s / r.latency_median_s for e, r in pairs], '{:.2f}')}",
                  f"- burst seconds: {_spread([e.burst_s / r.burst_s for e, r in pairs], '{:.2f}')}",
                  f"- gateway CPU: {_spread([e.cpu_percent / r.cpu_percent for e, r in pairs], '{:.2f}')}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
