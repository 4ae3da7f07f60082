"""bench/stages.py in one short run: every stage runs as the workers run it, and the report stage of a CT reads a
fraction of the study (issue 21: it read every slice with its pixel data)."""

from __future__ import annotations

import json

from bench import stages


def test_one_short_run_times_every_stage_and_the_report_stage_reads_less_than_the_study(capsys):
    assert stages.main(["--runs", "1", "--slices", "40", "--json"]) == 0
    figures = {entry["name"].split()[0]: entry for entry in json.loads(capsys.readouterr().out)}
    assert set(figures) == {"CR", "CT"}
    ct = figures["CT"]
    assert ct["instances"] == 40
    assert all(len(ct["seconds"][stage]) == 1 for stage in stages.STAGES)
    # 8 of 40 slices analysed: their pixels, the other slices' headers (and the request it reads back, the index)
    assert ct["report_read_bytes"][0] - ct["request_file_bytes"][0] < 0.5 * ct["study_bytes"]
    assert ct["message_bytes"][0] > 0
