"""Real DICOM nobody here wrote, through a real Orthanc into ``raddraft serve``: every file of pydicom's bundled
test data, as shipped (bench/real_world.py does the sending and prints the same table).

Before issue 16, 13 of those studies came back with results; the others died in the report stage (an empty
accession, an absent birth date, a colour image, a multi-frame image), stayed ``prepared`` for ever (non-image
objects) or got chest drafts (ultrasound, secondary captures). Now every study ends delivered or with a stated
reason, none is stuck in flight, nothing becomes a dead letter, and every CR/DX/CT/MR grey-scale image study
comes back with results. Sent back a second time as Orthanc then holds them (with raddraft's SR, narrative and
GSPS), they open no new episode: before, each re-send started a new analysis and piled up SR sets.
"""

from __future__ import annotations

import pytest

from bench.real_world import END_STATES, run

pytestmark = pytest.mark.slow


def test_every_bundled_pydicom_study_ends_delivered_or_with_its_reason():
    report = run(None, timeout=900, send_again=True)
    rows = report["rows"]
    assert report["studies"] >= 25 and len(rows) >= 25, report
    stuck = [(r["state"], r["files"]) for r in rows if r["state"] not in END_STATES]
    assert stuck == []
    assert report["dead_letters"] == []
    assert report["never_arrived"] == []
    without_reason = [r["files"] for r in rows if r["state"] != "delivered" and not r["reason"]]
    assert without_reason == []
    missing = [(r["state"], r["files"], r["reason"]) for r in rows if r["grey_images"] and not r["results_in_orthanc"]]
    assert missing == []
    delivered = [r for r in rows if r["state"] == "delivered"]
    assert len(delivered) >= 10 and all(r["results_in_orthanc"] for r in delivered)
    assert report["hl7_messages"] >= len(delivered)  # an ORU per delivered study (unsolicited when no order)
    # the PACS sends every study back with raddraft's SR, narrative and GSPS: no new episode, nothing re-analysed
    again = report["send_again"]
    assert again["episodes_after"] == again["episodes_before"], again
    assert again["node"]["identical_resends"] > 0 and again["node"]["stored_without_analysis"] >= len(delivered)
