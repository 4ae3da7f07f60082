"""Where the seconds of ``raddraft analyze`` on one radiograph go: the whole command beside the bare imports of the
libraries the issue prescribes, each a fresh process, interleaved, in one run.

    .venv/bin/python -m bench.analyze_startup                     # a phantom CR, 3 rounds, table
    .venv/bin/python -m bench.analyze_startup --file IM.dcm --rounds 5 --json

Rows (every process started the same way, with this virtual environment's Python):

- ``python -c 'import torch'`` — the floor of any process that runs a torch model;
- ``import torch, transformers' Llama, peft`` — the floor of any process that runs MiniGPT-Med as prescribed
  (``LlamaForCausalLM`` + peft LoRA);
- ``raddraft analyze FILE --json --local`` — the whole command loading the model itself (report + boxes, box
  refinement included); its JSON's ``seconds`` is the analysis itself (image preparation, one batched generate
  call, parsing, refinement);
- ``raddraft analyze FILE --json`` with a gateway running — the same command answered by the model a
  ``raddraft serve`` of the same home already holds (raddraft/model_socket.py); the bench starts that gateway
  in a temporary home, sends it one warm-up request, and keeps it running (idle) through every round.

``raddraft's share`` is the local command's median minus the libraries' floor: the project's own imports, reading the
file, loading the checkpoint and the analysis. Peak RSS is each process's own (``wait4`` in a small launcher).
Target of issue 3: one radiograph ≤ 3 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peers import stop_process
from raddraft.model_socket import socket_path

logger = logging.getLogger("bench.analyze_startup")

TARGET_S = 3.0
PYTHON = sys.executable
RADDRAFT = str(Path(PYTHON).with_name("raddraft"))
FLOOR_ROW = "import torch + transformers Llama + peft"
COMMAND_ROW = "raddraft analyze (whole command)"
GATEWAY_ROW = "raddraft analyze, gateway running"
ROWS: dict[str, list[str]] = {
    "import torch": [PYTHON, "-c", "import torch"],
    FLOOR_ROW: [PYTHON, "-c",
                "import torch, peft; from transformers import LlamaForCausalLM; LlamaForCausalLM.forward"],
}


# Started between the bench and each measured process. Linux's ru_maxrss of a child that was forked (or vforked)
# and then exec'd includes the high-water mark of the memory it had before exec, the parent's: measured straight
# from a big parent (a test run that loaded torch), every child would show that parent's peak. This launcher is
# a few MiB of plain Python (-S: no site), so the peak it reports is the measured process's own.
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
process.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w", encoding="utf-8") as out:
    json.dump({"wall_s": wall, "peak_rss_kib": usage.ru_maxrss, "returncode": process.returncode}, out)
"""


def run_once(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one fresh process; a failing process is an error."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        result, out, err = Path(tmp) / "result.json", Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("w") as stdout_file, err.open("w") as stderr_file:
            subprocess.run([PYTHON, "-S", "-c", LAUNCHER, str(result), *command], stdout=stdout_file,
                           stderr=stderr_file, check=False, env=env)
        stdout, stderr = out.read_text(), err.read_text()
        if not result.is_file():
            raise RuntimeError(f"the launcher of {' '.join(command)} failed: {stderr.strip()[-2000:]}")
        measured = json.loads(result.read_text(encoding="utf-8"))
    if measured["returncode"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {measured['returncode']}: {stderr.strip()[-2000:]}")
    return float(measured["wall_s"]), int(measured["peak_rss_kib"]) // 1024, stdout


def phantom_radiograph(folder: Path, seed: int) -> Path:
    """One phantom CR written by ``raddraft phantoms``."""
    subprocess.run([RADDRAFT, "--log-level", "WARNING", "phantoms", str(folder), "--count", "1", "--modality", "CR",
                    "--seed", str(seed)], check=True, capture_output=True, text=True)
    files = sorted(folder.rglob("*.dcm"))
    if len(files) != 1:
        raise RuntimeError(f"raddraft phantoms wrote {len(files)} files in {folder}, expected one radiograph")
    return files[0]


@contextmanager
def running_gateway(home: Path, timeout_s: float = 120.0) -> Iterator[dict[str, str]]:
    """``raddraft serve`` (embedded defaults, loopback, free ports) in *home*; yields the environment of a client
    of it, once its model socket answered a first request."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}
    env.update({"RADDRAFT_HOME": str(home), "RADDRAFT_DICOM_BIND": "127.0.0.1", "RADDRAFT_DICOM_PORT": "0",
                "RADDRAFT_HTTP_PORT": "0", "RADDRAFT_LOG_LEVEL": "WARNING"})
    home.mkdir(parents=True, exist_ok=True)
    with (home / "serve.log").open("w") as log_file:
        serve = subprocess.Popen([RADDRAFT, "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not socket_path(home).is_socket():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"raddraft serve gave no model socket in {home}: "
                                   f"{(home / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield env
    finally:
        stop_process(serve, timeout=60)


def measure(file: Path, rounds: int, gateway_env: dict[str, str]) -> dict[str, object]:
    analyze = [RADDRAFT, "--log-level", "WARNING", "analyze", str(file), "--json"]
    rows = {**ROWS, COMMAND_ROW: [*analyze, "--local"], GATEWAY_ROW: analyze}
    run_once(analyze, gateway_env)  # the gateway loads its model on the first request
    walls: dict[str, list[float]] = {name: [] for name in rows}
    rss: dict[str, int] = dict.fromkeys(rows, 0)
    analysis: dict[str, list[float]] = {COMMAND_ROW: [], GATEWAY_ROW: []}
    for number in range(1, rounds + 1):
        for name, command in rows.items():  # interleaved: a slow moment of the machine hits every row alike
            wall, peak, stdout = run_once(command, gateway_env if name == GATEWAY_ROW else None)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
            if name in analysis:
                answer = json.loads(stdout)
                expected = "gateway" if name == GATEWAY_ROW else "this process"
                if answer["served_by"] != expected:
                    raise RuntimeError(f"{name}: answered by {answer['served_by']}, expected {expected}")
                analysis[name].append(float(answer["seconds"]))
        logger.info("round %d/%d done", number, rounds)
    medians = {name: statistics.median(values) for name, values in walls.items()}
    floor, whole, served = medians[FLOOR_ROW], medians[COMMAND_ROW], medians[GATEWAY_ROW]
    inside = analysis[COMMAND_ROW] + analysis[GATEWAY_ROW]
    return {
        "file": str(file),
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "rows": {name: {"median_s": round(medians[name], 3), "min_s": round(min(walls[name]), 3),
                        "max_s": round(max(walls[name]), 3), "peak_rss_mib": rss[name]} for name in rows},
        "analysis_s": {"median": round(statistics.median(inside), 3), "max": round(max(inside), 3)},
        "raddraft_share_s": round(whole - floor, 3),
        "target_s": TARGET_S,
        "whole_command_met": whole <= TARGET_S,
        "gateway_command_met": served <= TARGET_S,
        "analysis_met": max(inside) <= TARGET_S,
        "libraries_floor_over_target": floor > TARGET_S,
    }


def table(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, dict)
    lines = [f"{'process':44} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS MiB':>13}"]
    for name, row in rows.items():
        lines.append(f"{name:44} {row['median_s']:9.2f} {row['min_s']:7.2f} {row['max_s']:7.2f} "
                     f"{row['peak_rss_mib']:13d}")
    analysis = result["analysis_s"]
    assert isinstance(analysis, dict)
    lines.append(f"analysis inside the command (JSON 'seconds'): median {analysis['median']:.2f} s, "
                 f"max {analysis['max']:.2f} s")
    lines.append(f"raddraft's share (command - libraries' floor): {result['raddraft_share_s']:.2f} s")
    def verdict(key: str) -> str:
        return "met" if result[key] else "MISSED"

    lines.append(f"target {TARGET_S:.0f} s: analysis {verdict('analysis_met')}, whole command with a gateway running "
                 f"{verdict('gateway_command_met')}, whole command loading the model "
                 f"{verdict('whole_command_met')}" + (" (the prescribed libraries alone take longer to import)"
                                                       if result["libraries_floor_over_target"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="a radiograph (default: a phantom CR made for the run)")
    parser.add_argument("--seed", type=int, default=4242, help="seed of the phantom radiograph")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each row once per round)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.file is not None and not args.file.is_file():
        parser.error(f"--file {args.file} is not a file")
    with tempfile.TemporaryDirectory(prefix="bench-analyze-", dir="/tmp") as tmp:  # short: a Unix socket path
        file = args.file or phantom_radiograph(Path(tmp) / "phantom", args.seed)
        with running_gateway(Path(tmp) / "home") as gateway_env:
            result = measure(file, args.rounds, gateway_env)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else table(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
