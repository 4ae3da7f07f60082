"""The ingest benchmark runs end to end on a few instances and reports every target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ingest_bench_reports_all_targets_with_everything_stored():
    done = subprocess.run([sys.executable, "-m", "bench.ingest", "--count", "5", "--json"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["count"] == 5
    assert set(report["targets"]) == {"raddraft", "storescp", "orthanc"}
    for measurement in report["targets"].values():
        assert measurement["stored"] == 5
        assert measurement["instances_per_s"] > 0
    assert set(report["ratios"]) == {"raddraft/storescp", "raddraft/orthanc"}
    assert isinstance(report["goal_met"], bool)


def test_ingest_bench_rejects_an_unknown_target():
    done = subprocess.run([sys.executable, "-m", "bench.ingest", "--targets", "pacs"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert "unknown targets ['pacs']" in done.stderr
