"""The preset benchmark (bench/real_preset.py) runs end to end on the small preset on the CPU: every sample decodes
exactly the asked number of tokens, and the figures are consistent."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_preset_bench_decodes_the_fixed_length_for_every_batch():
    done = subprocess.run([sys.executable, "-m", "bench.real_preset", "--preset", "raddraft-small", "--device", "cpu",
                           "--dtype", "float32", "--batches", "1,3", "--new-tokens", "12", "--json"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["preset"] == "raddraft-small" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["parameters"]["total"] > report["parameters"]["vision"] + report["parameters"]["llm"] > 0
    assert [run["batch"] for run in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["new_tokens"] == 12 and run["prefill_s"] > 0 and run["total_s"] > 0
        # tokens_per_s is rounded to 0.1 and total_s to 0.1 ms: on a fast machine (a 40 ms run) the latter alone
        # moves tokens / total_s by over 1 %, so the bound is the rounding's own
        tokens, total = run["batch"] * 12, run["total_s"]
        assert abs(run["tokens_per_s"] - tokens / total) <= 0.05 + tokens / (total - 5e-5) - tokens / total + 1e-6


def test_preset_bench_rejects_an_unknown_preset():
    done = subprocess.run([sys.executable, "-m", "bench.real_preset", "--preset", "nope", "--device", "cpu"],
                          cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model preset 'nope'" in done.stderr
