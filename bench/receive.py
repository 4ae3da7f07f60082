"""The DICOM node's own cost per instance, without the network: ``InstanceReceiver.receive`` on received files.

Each measurement is a child process that writes ``--count`` CT copies (pydicom's ``CT_small.dcm``, new UIDs, one
study) to files, as pynetdicom's chunked receive leaves them, and hands them to a fresh spool and index through
:meth:`dicom_node.receive.InstanceReceiver.receive` from 1 or more threads at once (each its own share): the
checks, the staging fsync, the rename, the directory fsync and the SQLite commit, as a C-STORE does them, minus
pynetdicom. It prints instances/s and CPU ms per instance (user + system of the child over the count).

``--baseline CHECKOUT`` measures another checkout (e.g. the code before a change) in the same rounds, side by side
(its ``dicom_node`` is imported through ``PYTHONPATH``), and prints the ratio. Run from the repository root:
``.venv/bin/python -m bench.receive [--count 300] [--threads 1,8] [--rounds 3] [--baseline CHECKOUT]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("bench.receive")

REPO = Path(__file__).resolve().parents[1]


def child(count: int, threads: int) -> dict[str, float]:
    """In the child process: receive *count* instances from *threads* threads; instances/s and CPU ms each."""
    import pydicom  # noqa: PLC0415 -- imported from the checkout under test (PYTHONPATH), in the child only
    from pydicom.uid import generate_uid  # noqa: PLC0415

    from dicom_node.index import Index  # noqa: PLC0415
    from dicom_node.receive import IncomingInstance, InstanceReceiver  # noqa: PLC0415
    from dicom_node.spool import Spool  # noqa: PLC0415
    from state.store import StateStore  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="raddraft-bench-receive-"))
    try:
        ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        files = []
        for number in range(count):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = work / f"received{number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(IncomingInstance(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                          str(ds.file_meta.TransferSyntaxUID), "BENCH", "127.0.0.1"))
        spool = Spool(work / "home" / "spool")
        spool.ensure()
        store = StateStore(work / "home" / "index.sqlite")
        receiver = InstanceReceiver(spool, Index(store), 100, 0)
        failures: list[int] = []

        def run(share: list[IncomingInstance]) -> None:
            failures.extend(int(status) for incoming in share if (status := receiver.receive(incoming)) != 0)

        workers = [threading.Thread(target=run, args=(files[n::threads],)) for n in range(threads)]
        started, cpu = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        store.close()
        if failures:
            raise RuntimeError(f"{len(failures)} instance(s) refused: statuses {sorted(set(failures))}")
        return {"instances_per_s": round(count / seconds, 1), "cpu_ms_per_instance": round(1000 * cpu / count, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(checkout: Path, count: int, threads: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(count), str(threads)],
                          cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def spread(values: list[float]) -> str:
    return f"{min(values):g} / {statistics.median(values):g} / {max(values):g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receive", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per measurement (default 300)")
    parser.add_argument("--threads", default="1,8", help="comma-separated thread counts (default 1,8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, checkouts side by side (default 3)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT", help="another checkout to compare")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    checkouts = {"raddraft": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    for threads in [int(n) for n in args.threads.split(",") if n]:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
        for number in range(1, args.rounds + 1):
            for name, checkout in checkouts.items():
                runs[name].append(measure(checkout, args.count, threads))
                log.info("%d thread(s) round %d %s: %s", threads, number, name, runs[name][-1])
        print(f"{args.count} instances, {threads} thread(s), {args.rounds} rounds: min / median / max")
        for name, measured in runs.items():
            print(f"  {name:<10} {spread([m['instances_per_s'] for m in measured]):>24} inst/s   "
                  f"{spread([m['cpu_ms_per_instance'] for m in measured]):>20} CPU ms/instance")
        if "baseline" in runs:
            ratios = [new["instances_per_s"] / old["instances_per_s"]
                      for new, old in zip(runs["raddraft"], runs["baseline"], strict=True)]
            print(f"  raddraft/baseline {spread([round(r, 2) for r in ratios])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
