"""The ingest benchmark runs end to end on a few instances and reports every target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ingest_bench_reports_all_targets_with_everything_stored():
    done = subprocess.run([sys.executable, "-m", "bench.ingest", "--cases", "nodelay", "--count", "5", "--rounds", "1",
                           "--json"], cwd=REPO, check=False, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    [report] = json.loads(done.stdout)
    assert set(report["targets"]) == {"raddraft", "storescp", "orthanc", "pynetdicom"}
    for measurement in report["runs"][0].values():
        assert measurement["stored"] == 5
        assert measurement["instances_per_s"] > 0
    assert set(report["ratios"]) == {"raddraft/storescp", "raddraft/orthanc", "raddraft/pynetdicom",
                                     "raddraft/fsync-limit"}
    assert all(isinstance(met, bool) for met in report["goals"].values())


def test_ingest_bench_rejects_an_unknown_target_and_too_few_instances_for_a_case():
    done = subprocess.run([sys.executable, "-m", "bench.ingest", "--targets", "pacs"], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown targets or cases ['pacs']" in done.stderr
    done = subprocess.run([sys.executable, "-m", "bench.ingest", "--associations", "8", "--count", "5"], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "case nodelay-8: 5 instance(s) are fewer than its 8 associations" in done.stderr
