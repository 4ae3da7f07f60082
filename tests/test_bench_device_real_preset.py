"""The device script of the real preset (bench/device_real_preset.py) runs on the CPU with the small preset: batch 1
against the roofline, a batch static vs continuous, the mixed queue's kept tokens; the JSON is consistent."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_device_script_smoke_on_the_cpu(tmp_path):
    out = tmp_path / "out" / "real_preset.json"
    done = subprocess.run([sys.executable, "-m", "bench.device_real_preset", "--preset", "raddraft-small", "--device",
                           "cpu", "--dtype", "float32", "--new-tokens", "4", "--batches", "2", "--runs", "1",
                           "--out", str(out)], cwd=REPO, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["preset"] == "raddraft-small" and report["device"] == "cpu" and report["dtype"] == "float32"
    assert abs(report["roofline_ms_per_token"] - 1000 * report["llm_weight_bytes"] / 4.8e12) < 1e-6
    for mode in ("generate_ids", "continuous"):
        one = report["batch_1"][mode]
        assert one["ms_per_token"]["runs"] == 1 and one["ms_per_token"]["median"] >= 0  # 0: noise hid the decode
        ratio = one["ms_per_token"]["median"] / report["roofline_ms_per_token"]
        assert abs(one["ratio_to_roofline"]["median"] - ratio) <= 0.001 * ratio + 0.01
        assert one["tokens_per_s"]["median"] > 0 and one["first_token_s"]["median"] > 0
    [batch] = report["batches"]
    assert batch["batch"] == 2 and batch["mixed_rows"] == 4
    assert batch["mixed_tokens_kept"] == 1 + 2 + 3 + 4  # budgets from new_tokens / 4 to new_tokens
    for name in ("fixed_static", "fixed_continuous", "mixed_static", "mixed_continuous"):
        assert batch[f"{name}_tokens_per_s"]["median"] > 0
    assert report["elapsed_s"] > 0


def test_device_script_refuses_a_missing_accelerator_or_preset():
    done = subprocess.run([sys.executable, "-m", "bench.device_real_preset", "--preset", "nope"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model preset 'nope'" in done.stderr
