"""``raddraft demo --exit``: phantoms in, three preliminary drafts printed with the paths of every output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peers.gateway import MODEL, base_env

pytestmark = pytest.mark.slow


def test_demo_prints_three_drafts_and_their_outputs(tmp_path):
    home = tmp_path / "demo"
    env = base_env(tmp_path / "unused", RADDRAFT_MODEL=MODEL)
    result = subprocess.run([sys.executable, "-m", "raddraft.cli", "demo", "--home", str(home), "--exit"], env=env,
                            capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    out = result.stdout
    assert out.count("DRAFT REPORT (preliminary") == 3
    for modality in ("CR", "CT", "MR"):
        assert f"=== {modality} study" in out
    for line in (ln for ln in out.splitlines() if ln.strip().startswith(("SR:", "ORU:", "GSPS:", "overlay:"))):
        assert (home / "outbox").as_posix() in line
        assert Path(line.split(":", 1)[1].strip()).is_file(), line
    assert "PHANTOM" not in result.stderr  # no patient names in the INFO log
    # every study has findings in its truth, and the draft is shown sentence by sentence with its status
    for folder in sorted((home / "phantoms").iterdir()):
        assert json.loads((folder / "truth.json").read_text())["studies"][0]["findings"], folder.name
    assert out.count("consistency: ") == 3
    statuses = re.findall(r"^      \[(grounded: box [\d, box]+|TEXT ONLY: not localized by the AI|positive|negative|"
                          r"normal|neutral)\] \S", out, flags=re.MULTILINE)
    assert len(statuses) >= 6, out  # at least two sentences per study, each with its status
    assert re.search(r"^    box 1: \w", out, flags=re.MULTILINE), out
