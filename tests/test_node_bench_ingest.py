"""bench/ingest.py (issue 21): its cases' files, the disk's fsync limit, the profile breakdown and one real round."""

from __future__ import annotations

import numpy as np
import pydicom
from node_helpers import PYDICOM_TEST_FILES

from bench.ingest import CASES, fsync_limit, generate, profile_breakdown, run_case


def test_the_big_case_tiles_a_real_ct_into_half_a_megabyte_and_shares_the_files_round_robin(tmp_path):
    folders = generate(tmp_path / "study", 10, associations=4, big=True)
    assert sorted(len(list(share.iterdir())) for share in folders.shares) == [2, 2, 3, 3]
    assert 512 * 1024 < folders.instance_bytes < 540 * 1024
    original = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm").pixel_array
    ds = pydicom.dcmread(next(folders.shares[1].iterdir()))
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert np.array_equal(ds.pixel_array[128:256, 256:384], original)
    uids = {pydicom.dcmread(path).SOPInstanceUID for share in folders.shares for path in share.iterdir()}
    assert len(uids) == 10


def test_the_fsync_limit_writes_every_file_and_leaves_nothing(tmp_path):
    assert fsync_limit(tmp_path / "disk", 38 * 1024, 20, streams=4) > 0
    assert not (tmp_path / "disk").exists()


def test_the_profile_breakdown_attributes_each_association_sample_once(tmp_path):
    association = ("Thread.run (threading.py:982);Association.run_reactor (pynetdicom/association.py:675);"
                   "Association._run_reactor (pynetdicom/association.py:{line})")
    store = association.format(line=731) + ";handle_store (dicom_node/handlers.py:104);InstanceReceiver.receive "
    raw = tmp_path / "profile.txt"
    raw.write_text("\n".join([
        association.format(line=714) + " 6",  # the loop itself: time.sleep(0.001)
        store + "(dicom_node/receive.py:121);Spool.stage (dicom_node/spool.py:124) 3",
        store + "(dicom_node/receive.py:121);check_instance (dicom_node/receive.py:318) 1",
        "Thread.run (threading.py:982);DULServiceProvider.run_reactor (pynetdicom/dul.py:403) 9",
        "Thread.run (threading.py:982);DULServiceProvider.run_reactor (pynetdicom/dul.py:420);"
        "DULServiceProvider._is_transport_event (pynetdicom/dul.py:300) 1",
        "MainThread (raddraft/cli.py:10) 50",
    ]) + "\n")
    breakdown = profile_breakdown([raw])
    assert breakdown["association"] == {"pynetdicom reactor loop (1 ms sleeps)": 60.0, "stage + file fsync": 30.0,
                                        "validate (decode / check)": 10.0}
    assert breakdown["dul"] == {"reactor loop (1 ms sleeps)": 90.0, "reading and decoding PDUs": 10.0}


def test_one_round_against_raddraft_and_the_null_scp_stores_everything_and_reports_ratios(tmp_path):
    report = run_case(CASES["nodelay-8"], 16, ["raddraft", "pynetdicom"], 1, tmp_path, None)
    (run,) = report["runs"]
    assert run["raddraft"]["stored"] == run["pynetdicom"]["stored"] == 16
    assert run["raddraft"]["rss_peak_mib"] >= run["raddraft"]["rss_idle_mib"] > 0
    assert set(report["ratios"]) == {"raddraft/pynetdicom", "raddraft/fsync-limit"}
    assert report["fsync_limit_files_per_s"]["median"] > 0
