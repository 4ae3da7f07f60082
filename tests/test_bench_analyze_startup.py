"""The startup benchmark (bench/analyze_startup.py) runs end to end: a phantom radiograph, the library floors, the
whole ``raddraft analyze`` command loading the model and answered by a running gateway, each a fresh process,
with figures that add up."""

import json
import subprocess
import sys
from pathlib import Path

from bench.analyze_startup import run_once

REPO = Path(__file__).resolve().parent.parent


def test_startup_bench_times_the_command_beside_the_library_floors():
    done = subprocess.run([sys.executable, "-m", "bench.analyze_startup", "--rounds", "1", "--json"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = report["rows"]
    assert list(rows) == ["import torch", "import torch + transformers Llama + peft",
                          "raddraft analyze (whole command)", "raddraft analyze, gateway running"]
    torch_only, floor, whole, served = (rows[name] for name in rows)
    # the command imports everything the floors import, and more: slower than torch alone, and bigger
    assert whole["median_s"] > torch_only["median_s"] > 0
    assert whole["peak_rss_mib"] > floor["peak_rss_mib"] > torch_only["peak_rss_mib"] > 50
    # answered by the gateway's model (the bench checks served_by), the client imports no torch: smaller, faster
    assert 0 < served["median_s"] < torch_only["median_s"] and served["peak_rss_mib"] < 100
    assert report["gateway_command_met"] == (served["median_s"] <= 3.0)
    assert 0 < report["analysis_s"]["median"] <= report["analysis_s"]["max"] < whole["median_s"]
    assert abs(report["raddraft_share_s"] - (whole["median_s"] - floor["median_s"])) <= 0.0015  # of rounded figures
    assert report["whole_command_met"] == (whole["median_s"] <= report["target_s"] == 3.0)
    assert report["file"].endswith(".dcm")


def test_run_once_reports_a_failing_process_with_its_error():
    try:
        run_once([sys.executable, "-c", "import sys; sys.exit('no such model here')"])
    except RuntimeError as exc:
        assert "exited with 1" in str(exc) and "no such model here" in str(exc)
    else:
        raise AssertionError("a failing process must be an error")


def test_run_once_measures_each_process_on_its_own():
    wall, big, stdout = run_once([sys.executable, "-c", "x = b'1' * (200 * 2**20); print(len(x) // 2**20)"])
    assert stdout == "200\n" and wall > 0 and big >= 200
    ballast = b"1" * (300 * 2**20)  # this process is big now: a child exec'd straight from it would report >= 300
    _, small, _ = run_once([sys.executable, "-c", "pass"])
    assert len(ballast) and small < 100  # its own peak, not the parent's nor the largest child's so far


def test_startup_bench_rejects_a_missing_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.analyze_startup", "--file", str(tmp_path / "none.dcm")],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a file" in done.stderr
